//! The forwarding core against real str0m clients over a virtual, lossless network stepped in
//! virtual time (no sockets, no clock): four participants of one consultation each publish
//! audio and video and receive every other's, the uplink carries each publication once,
//! keyframe requests reach the publisher rate-limited, a leave frees the slots, and a handover
//! (ICE restart from a new address) keeps the media flowing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bedside_sfu::{Core, Counters, Event, KEYFRAME_REQUEST_INTERVAL};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

const SFU_ADDR: &str = "10.0.0.1:3478";
const ROOM: &str = "c1";

struct Client {
    name: String,
    addr: SocketAddr,
    rtc: Rtc,
    audio: Mid,
    video: Mid,
    connected: bool,
    /// Slot mid -> participant, from the last layout.
    layout: HashMap<Mid, String>,
    /// Frames received per (participant, kind).
    received: HashMap<(String, MediaKind), u64>,
    bytes_sent: u64,
    keyframe_requests: u64,
    /// Forwarding delay of each audio frame received (virtual time).
    audio_delay: Vec<Duration>,
    next_timeout: Instant,
}

impl Client {
    fn new(name: &str, ip_last: u8, slots: usize, now: Instant) -> (Client, String) {
        let addr: SocketAddr = format!("10.0.1.{ip_last}:5000").parse().unwrap();
        let mut rtc = Rtc::builder().build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut change = rtc.sdp_api();
        let audio = change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let video = change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        for _ in 0..slots {
            change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
            change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        }
        let (offer, pending) = change.apply().unwrap();
        let client = Client {
            name: name.to_owned(),
            addr,
            rtc,
            audio,
            video,
            connected: false,
            layout: HashMap::new(),
            received: HashMap::new(),
            bytes_sent: 0,
            keyframe_requests: 0,
            audio_delay: Vec::new(),
            next_timeout: now,
        };
        PENDING.with(|p| p.borrow_mut().insert(name.to_owned(), pending));
        (client, offer.to_sdp_string())
    }

    fn accept(&mut self, answer: &str) {
        let answer = SdpAnswer::from_sdp_string(answer).unwrap();
        let pending = PENDING.with(|p| p.borrow_mut().remove(&self.name)).unwrap();
        self.rtc.sdp_api().accept_answer(pending, answer).unwrap();
    }

    fn write(&mut self, kind: MediaKind, now: Instant, n: u64) {
        if !self.connected {
            return;
        }
        let (mid, codec, time, data) = match kind {
            MediaKind::Audio => (
                self.audio,
                Codec::Opus,
                MediaTime::new(n * 960, str0m::media::Frequency::FORTY_EIGHT_KHZ),
                vec![0x5a; 80],
            ),
            MediaKind::Video => {
                // An IDR NAL header and an opaque body, as SFrame ciphertext would be: no
                // start codes inside, nothing the SFU could decode.
                let mut f = vec![0, 0, 0, 1, 0x65];
                f.extend((0..3000u32).map(|i| 0x10 + (i.wrapping_mul(2654435761) >> 28) as u8));
                (
                    self.video,
                    Codec::H264,
                    MediaTime::new(n * 3000, str0m::media::Frequency::NINETY_KHZ),
                    f,
                )
            }
        };
        let writer = self.rtc.writer(mid).unwrap();
        let pt = writer
            .payload_params()
            .find(|p| p.spec().codec == codec)
            .map(|p| p.pt())
            .unwrap();
        writer.write(pt, now, time, data).unwrap();
    }
}

thread_local! {
    static START: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    static PENDING: std::cell::RefCell<HashMap<String, str0m::change::SdpPendingOffer>> =
        std::cell::RefCell::new(HashMap::new());
}

struct Net {
    now: Instant,
    core: Core,
    clients: Vec<Client>,
}

impl Net {
    fn new() -> Net {
        let now = Instant::now();
        let addr: SocketAddr = SFU_ADDR.parse().unwrap();
        Net {
            now,
            core: Core::new(addr, addr, Arc::new(Counters::default())),
            clients: Vec::new(),
        }
    }

    fn join(&mut self, name: &str, ip_last: u8, slots: usize) {
        let (mut c, offer) = Client::new(name, ip_last, slots, self.now);
        let answer = self.core.connect(self.now, ROOM, name, &offer).unwrap();
        c.accept(&answer);
        self.clients.push(c);
        self.events();
    }

    fn events(&mut self) {
        while let Some(e) = self.core.poll_event() {
            if let Event::Layout {
                participant, slots, ..
            } = e
            {
                let c = self
                    .clients
                    .iter_mut()
                    .find(|c| c.name == participant)
                    .unwrap();
                c.layout.clear();
                for s in slots {
                    for mid in [s.audio_mid, s.video_mid].into_iter().flatten() {
                        c.layout
                            .insert(Mid::from(mid.as_str()), s.participant.clone());
                    }
                }
            }
        }
    }

    /// Steps the network by `step` until `until`, writing media at 50 audio and 30 video frames
    /// a second from every client.
    fn run(&mut self, dur: Duration) {
        let end = self.now + dur;
        let start = self.now;
        START.with(|s| s.set(Some(start)));
        let step = Duration::from_millis(1);
        while self.now < end {
            let t = self.now.duration_since(start).as_millis() as u64;
            let abs = self.now;
            for c in &mut self.clients {
                if t.is_multiple_of(20) {
                    c.write(MediaKind::Audio, abs, t / 20);
                }
                if t.is_multiple_of(33) {
                    c.write(MediaKind::Video, abs, t / 33);
                }
            }
            self.pump();
            self.now += step;
            for c in &mut self.clients {
                if c.next_timeout <= self.now {
                    c.rtc.handle_input(Input::Timeout(self.now)).unwrap();
                }
            }
            if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
                self.core.handle_timeout(self.now);
            }
            self.pump();
        }
    }

    /// Delivers everything queued both ways until both sides are quiet.
    fn pump(&mut self) {
        let sfu: SocketAddr = SFU_ADDR.parse().unwrap();
        loop {
            let mut moved = false;
            for i in 0..self.clients.len() {
                loop {
                    let c = &mut self.clients[i];
                    match c.rtc.poll_output().unwrap() {
                        Output::Timeout(t) => {
                            c.next_timeout = t;
                            break;
                        }
                        Output::Transmit(tx) => {
                            c.bytes_sent += tx.contents.len() as u64;
                            let (from, data) = (tx.source, tx.contents.to_vec());
                            self.core.handle_receive(self.now, from, &data);
                            moved = true;
                        }
                        Output::Event(e) => match e {
                            RtcEvent::IceConnectionStateChange(s) => {
                                c.connected = matches!(
                                    s,
                                    IceConnectionState::Connected | IceConnectionState::Completed
                                )
                            }
                            RtcEvent::MediaData(d) => {
                                if let Some(who) = c.layout.get(&d.mid) {
                                    if d.params.spec().codec == Codec::Opus {
                                        // Audio frame n was written at start + 20n ms.
                                        let sent = START.with(|s| s.get()).unwrap()
                                            + Duration::from_millis(d.time.numer() / 48);
                                        c.audio_delay
                                            .push(self.now.saturating_duration_since(sent));
                                    }
                                    let kind = if d.params.spec().codec == Codec::Opus {
                                        MediaKind::Audio
                                    } else {
                                        MediaKind::Video
                                    };
                                    *c.received.entry((who.clone(), kind)).or_default() += 1;
                                }
                            }
                            RtcEvent::KeyframeRequest(_) => c.keyframe_requests += 1,
                            _ => {}
                        },
                    }
                }
            }
            while let Some((to, data)) = self.core.poll_transmit() {
                if let Some(c) = self.clients.iter_mut().find(|c| c.addr == to) {
                    let input = Input::Receive(
                        self.now,
                        Receive {
                            proto: Protocol::Udp,
                            source: sfu,
                            destination: to,
                            contents: data.as_slice().try_into().unwrap(),
                        },
                    );
                    c.rtc.handle_input(input).unwrap();
                    moved = true;
                }
            }
            self.events();
            if !moved {
                break;
            }
        }
    }

    fn client(&mut self, name: &str) -> &mut Client {
        self.clients.iter_mut().find(|c| c.name == name).unwrap()
    }
}

const FOUR: [&str; 4] = ["doctor", "clinician", "interpreter", "patient"];

fn four() -> Net {
    let mut net = Net::new();
    for (i, name) in FOUR.iter().enumerate() {
        net.join(name, i as u8 + 2, 3);
    }
    net
}

#[test]
fn four_participants_each_receive_every_other() {
    let mut net = four();
    net.run(Duration::from_secs(4));
    for c in &net.clients {
        assert!(c.connected, "{} connected", c.name);
        let others: HashSet<&str> = FOUR.iter().copied().filter(|n| *n != c.name).collect();
        let shown: HashSet<&str> = c.layout.values().map(String::as_str).collect();
        assert_eq!(shown, others, "{}'s slots", c.name);
        for o in &others {
            let audio = c.received.get(&(o.to_string(), MediaKind::Audio)).copied();
            let video = c.received.get(&(o.to_string(), MediaKind::Video)).copied();
            // About 3 s of media after connecting: 150 audio and 90 video frames are sent.
            assert!(audio.unwrap_or(0) > 100, "{} hears {o}: {audio:?}", c.name);
            assert!(video.unwrap_or(0) > 60, "{} sees {o}: {video:?}", c.name);
        }
    }
}

#[test]
fn forwarding_adds_no_delay_on_a_lossless_network() {
    let mut net = four();
    net.run(Duration::from_secs(3));
    for c in &net.clients {
        let mut d = c.audio_delay.clone();
        d.sort();
        let p99 = d[d.len() * 99 / 100];
        assert!(p99 <= Duration::from_millis(5), "{}: p99 {p99:?}", c.name);
    }
}

#[test]
fn the_uplink_carries_each_publication_once() {
    let mut net = four();
    net.run(Duration::from_secs(4));
    let patient_up = net
        .core
        .participant_stats(ROOM, "patient")
        .unwrap()
        .bytes_in;
    let doctor_down = net
        .core
        .participant_stats(ROOM, "doctor")
        .unwrap()
        .bytes_out;
    // The doctor receives three publications; the patient sends one. Were the patient's
    // media sent once per subscriber, its uplink would be about three times one publication.
    let one_publication = doctor_down / 3;
    assert!(
        patient_up < one_publication * 13 / 10,
        "patient uplink {patient_up} B vs one publication {one_publication} B"
    );
    assert!(patient_up > one_publication * 7 / 10);
    assert!(
        net.core
            .participant_stats(ROOM, "patient")
            .unwrap()
            .frames_out
            > 0
    );
}

#[test]
fn keyframe_requests_reach_the_publisher_rate_limited() {
    let mut net = four();
    net.run(Duration::from_secs(2));
    let before = net.client("patient").keyframe_requests;
    // Every subscriber asks for the patient's keyframe every 10 ms for a second.
    for _ in 0..100 {
        for name in ["doctor", "clinician", "interpreter"] {
            let c = net.client(name);
            let mid = c
                .layout
                .iter()
                .filter(|(_, who)| *who == "patient")
                .map(|(m, _)| *m)
                .find(|m| c.rtc.media(*m).unwrap().kind() == MediaKind::Video)
                .unwrap();
            c.rtc
                .writer(mid)
                .unwrap()
                .request_keyframe(None, KeyframeRequestKind::Pli)
                .unwrap();
        }
        net.run(Duration::from_millis(10));
    }
    let got = net.client("patient").keyframe_requests - before;
    let most = (1000 / KEYFRAME_REQUEST_INTERVAL.as_millis() as u64) + 1;
    assert!(got >= 1, "the publisher saw no keyframe request");
    assert!(got <= most, "{got} requests in 1 s, at most {most} allowed");
}

#[test]
fn a_leave_frees_the_slots_and_a_newcomer_takes_them() {
    let mut net = four();
    net.run(Duration::from_secs(2));
    net.core.leave(net.now, ROOM, "interpreter");
    net.events();
    net.clients.retain(|c| c.name != "interpreter");
    for c in &net.clients {
        assert!(!c.layout.values().any(|w| w == "interpreter"), "{}", c.name);
        assert_eq!(c.layout.len(), 4, "{} shows two others", c.name);
    }
    net.join("family", 9, 3);
    net.run(Duration::from_secs(3));
    for name in ["doctor", "clinician", "patient"] {
        let c = net.client(name);
        let v = c
            .received
            .get(&("family".into(), MediaKind::Video))
            .copied();
        assert!(v.unwrap_or(0) > 30, "{name} sees the newcomer: {v:?}");
    }
}

#[test]
fn a_handover_keeps_the_media_flowing() {
    let mut net = four();
    net.run(Duration::from_secs(2));
    // The patient's network changes: new address, ICE restart offered over signaling.
    let c = net.client("patient");
    let new_addr: SocketAddr = "10.0.2.5:6000".parse().unwrap();
    c.addr = new_addr;
    let mut change = c.rtc.sdp_api();
    change.ice_restart(false);
    let (offer, pending): (SdpOffer, _) = change.apply().unwrap();
    let answer = net
        .core
        .connect(net.now, ROOM, "patient", &offer.to_sdp_string())
        .unwrap();
    let c = net.client("patient");
    c.rtc
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    // The old candidates went with the restart; the new network's is gathered now.
    c.rtc
        .add_local_candidate(Candidate::host(new_addr, "udp").unwrap());
    let before = net.client("doctor").received[&("patient".into(), MediaKind::Video)];
    net.run(Duration::from_secs(3));
    let after = net.client("doctor").received[&("patient".into(), MediaKind::Video)];
    assert!(
        after - before > 60,
        "video from the patient after the handover: {}",
        after - before
    );
    let heard = net.client("patient").received[&("doctor".into(), MediaKind::Audio)];
    assert!(heard > 150, "the patient still hears the doctor: {heard}");
}

//! The forwarding core, sans-IO: every participant's [`Rtc`], the consultations they sit in, and
//! the forwarding between them. Time is an argument, datagrams go in through
//! [`Core::handle_receive`] and come out of [`Core::poll_transmit`]; nothing here reads a clock
//! or touches a socket (the driver in `driver.rs` does both), so the tests step it in virtual
//! time.
//!
//! ## Slots
//! A client offers one connection to the SFU with, in this order: its own audio and video
//! (`sendonly` from its side: the upstream it publishes) and then pairs of `recvonly` audio and
//! video m-lines, the *slots* in which it receives the others. The SFU puts each other
//! participant of the consultation in a free slot of every subscriber and announces the
//! assignment ([`Event::Layout`]): slot `mid`s -> participant id. So the client never has to
//! answer an offer from the SFU: joins and leaves change only which participant a slot carries
//! (its RTP timestamps jump and a keyframe is requested from the new source), and the only
//! renegotiations are the client's own (ICE restarts). A consultation larger than a
//! subscriber's slots leaves the latest joiners out of that subscriber's view (the server's
//! `max-participants` bounds it; clients offer `max-participants - 1` slots).
//!
//! ## What it reads
//! str0m's frame API: packets of one frame are depacketized (Opus: as is; H.264: by the NAL
//! header byte, the FU-A/STAP-A structure of RFC 6184) and repacketized per subscriber with the
//! subscriber's own SSRC, sequence numbers, NACK/RTX history and pacing. The payload of every NAL
//! unit is opaque: SFrame ciphertext (which keeps each NAL header in the clear) forwards the
//! same. RTCP (PLI/FIR, TWCC, reports) is terminated per connection; keyframe requests are
//! relayed to the publisher at most once per [`KEYFRAME_REQUEST_INTERVAL`]; the RFC 6464
//! audio-level header extension gives the active speaker.
//!
//! ## Per-hop figures
//! With the `bedside_sfu::hops` log target at debug, every connection reports once a second
//! (str0m's stats events): packets and bytes per received and sent `mid`, NACKs, PLIs, loss,
//! round trip, and how far each publication arrives behind its own media clock
//! (`audio_lag_ms`, `video_lag_ms`: see `ArrivalLag`). Participants appear by index only.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use str0m::change::SdpOffer;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

/// The shortest interval between two keyframe requests relayed to one publisher. The clients'
/// own state machine asks at most every 300 ms; the SFU merges every subscriber's requests
/// (and its own, after a gap in what a publisher sent) into at most this many.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

/// How often the active speaker of each consultation is decided.
pub const SPEAKER_INTERVAL: Duration = Duration::from_millis(500);

/// A participant's RFC 6464 level (dBov, 0 loudest, -127 silence) above which it may be the
/// active speaker: the synthetic tone and speech both sit well above it, room noise below.
pub const SPEAKER_THRESHOLD_DBOV: f32 = -50.0;

/// An idle connection (no datagram) is dropped after this long. The signaling server also
/// tells the SFU when a participant leaves; this only bounds what a vanished client holds.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Video packets each subscriber's stream keeps for retransmission (NACK). str0m's default,
/// 1000, held about 2.6 MiB per participant of a four-person consultation at 720p-like rates
/// (`cargo xtask bench-sfu`); 300 is still about 2 s of a 1.5 Mbit/s stream, far more than a
/// NACK's round trip.
pub const SEND_BUFFER_VIDEO: usize = 300;

/// Errors the SFU gives to the signaling side.
#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("the offer is not a valid session description: {0}")]
    BadOffer(String),
    #[error("the offer could not be accepted: {0}")]
    Rejected(String),
    #[error("no such participant on this SFU")]
    UnknownParticipant,
    #[error("the candidate is not valid")]
    BadCandidate,
    #[error("the SFU is not running")]
    Stopped,
}

impl SfuError {
    /// A short name for logs (the full message may quote the offer).
    pub fn kind(&self) -> &'static str {
        match self {
            SfuError::BadOffer(_) => "bad_offer",
            SfuError::Rejected(_) => "rejected",
            SfuError::UnknownParticipant => "unknown_participant",
            SfuError::BadCandidate => "bad_candidate",
            SfuError::Stopped => "stopped",
        }
    }
}

/// One slot of a subscriber, as announced to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    /// The participant whose media this slot now carries.
    pub participant: String,
    pub audio_mid: Option<String>,
    pub video_mid: Option<String>,
}

/// What the SFU tells the signaling side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The slots of `participant` (in `room`) changed: this is what each now carries.
    Layout {
        room: String,
        participant: String,
        slots: Vec<SlotLayout>,
    },
    /// The loudest participant of `room` changed (`None`: nobody speaks).
    ActiveSpeaker {
        room: String,
        participant: Option<String>,
    },
    /// A participant's connection closed (idle, DTLS closed, or failed).
    Disconnected { room: String, participant: String },
}

/// Counters over the whole SFU (read by `/metrics` and the tests).
#[derive(Debug, Default)]
pub struct Counters {
    pub datagrams_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Audio and video frames written to subscribers.
    pub frames_forwarded: AtomicU64,
    /// Keyframe requests sent to publishers (after rate limiting).
    pub keyframe_requests: AtomicU64,
    /// Keyframe requests not sent: one went to the publisher less than
    /// [`KEYFRAME_REQUEST_INTERVAL`] before.
    pub keyframe_requests_suppressed: AtomicU64,
    /// Datagrams no connection claimed.
    pub unclaimed: AtomicU64,
    /// Participants connected now.
    pub participants: AtomicU64,
}

/// One participant's traffic, as the SFU measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParticipantStats {
    /// Bytes of datagrams received from the participant (its uplink, everything included).
    pub bytes_in: u64,
    /// Bytes of datagrams sent to it.
    pub bytes_out: u64,
    /// Frames received from it (audio and video).
    pub frames_in: u64,
    /// Frames written to it.
    pub frames_out: u64,
    pub connected: bool,
}

#[derive(Debug)]
struct Slot {
    audio: Option<Mid>,
    video: Option<Mid>,
    /// The peer whose media the slot carries.
    source: Option<usize>,
}

#[derive(Debug)]
struct Peer {
    room: String,
    participant: String,
    rtc: Rtc,
    /// The DTLS fingerprint of the client's current connection: an offer with another one is
    /// a new peer connection (the client rebuilt it) and gets a fresh `Rtc`.
    fingerprint: Option<String>,
    pub_audio: Option<Mid>,
    pub_video: Option<Mid>,
    slots: Vec<Slot>,
    next_timeout: Instant,
    last_input: Instant,
    last_keyframe_request: Option<Instant>,
    keyframe_wanted: bool,
    /// Smoothed RFC 6464 level of its audio (dBov).
    level: f32,
    level_at: Option<Instant>,
    connected: bool,
    stats: ParticipantStats,
    /// How far its audio and video arrive behind their own media clock (debug logs only).
    lag: [ArrivalLag; 2],
}

/// How late a publication arrives against its own media clock: the largest
/// `(arrival - first arrival) - (media time - first media time)`, the first pair being the one
/// that arrived earliest for its media time. A publisher that falls behind (its packets
/// leave late, or queue on the way) shows here before anything reaches a subscriber; a lag
/// at the SFU near zero with seconds at the subscriber puts the delay downstream.
#[derive(Clone, Copy, Debug, Default)]
struct ArrivalLag {
    base: Option<(Instant, f64)>,
    max: f64,
}

impl ArrivalLag {
    fn observe(&mut self, arrived: Instant, media_secs: f64) {
        let Some((at, media)) = self.base else {
            self.base = Some((arrived, media_secs));
            return;
        };
        let lag = arrived.saturating_duration_since(at).as_secs_f64() - (media_secs - media);
        if lag < 0.0 {
            self.base = Some((arrived, media_secs));
        } else {
            self.max = self.max.max(lag);
        }
    }

    /// The largest lag since the last call, ms.
    fn take_max_ms(&mut self) -> u64 {
        (std::mem::take(&mut self.max) * 1e3) as u64
    }
}

/// A frame to forward, from one peer's publication.
struct Forward {
    from: usize,
    kind: MediaKind,
    data: MediaData,
}

/// The sans-IO SFU: see the module docs.
pub struct Core {
    /// The address put in every answer as the SFU's one host candidate.
    public: SocketAddr,
    /// The socket's own address (the destination of what it receives).
    local: SocketAddr,
    peers: Vec<Option<Peer>>,
    by_addr: FxHashMap<SocketAddr, usize>,
    by_name: FxHashMap<(String, String), usize>,
    rooms: FxHashMap<String, Vec<usize>>,
    speakers: FxHashMap<String, Option<String>>,
    next_speaker_check: Option<Instant>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<Event>,
    audio_q: VecDeque<Forward>,
    video_q: VecDeque<Forward>,
    dirty: Vec<usize>,
    counters: Arc<Counters>,
    #[cfg(feature = "payload-tap")]
    taps: FxHashMap<String, PayloadTap>,
}

/// The first payloads the SFU forwarded in a room, as they went out (feature `payload-tap`,
/// which only the tests enable: a server built on its own cannot record media). The tests use
/// it to show that with SFrame what the SFU forwards is ciphertext.
#[cfg(feature = "payload-tap")]
#[derive(Clone, Debug, Default)]
pub struct PayloadTap {
    limit: usize,
    /// Opus packets (or their SFrame ciphertext), as forwarded.
    pub audio: Vec<Vec<u8>>,
    /// H.264 access units (or their SFrame ciphertext), as forwarded.
    pub video: Vec<Vec<u8>>,
}

#[cfg(feature = "payload-tap")]
impl PayloadTap {
    fn record(&mut self, kind: MediaKind, payload: &[u8]) {
        let frames = match kind {
            MediaKind::Audio => &mut self.audio,
            MediaKind::Video => &mut self.video,
        };
        if frames.len() < self.limit {
            frames.push(payload.to_vec());
        }
    }
}

/// Logs one of str0m's per-media stats (ingress and egress have the same fields) on the
/// `bedside_sfu::hops` debug target.
macro_rules! log_media_stats {
    ($peer:expr, $s:expr, $what:literal) => {
        tracing::debug!(
            target: "bedside_sfu::hops",
            peer = $peer,
            mid = %$s.mid,
            packets = $s.packets,
            bytes = $s.bytes,
            nacks = $s.nacks,
            plis = $s.plis,
            loss = ?$s.loss,
            $what
        )
    };
}

impl Core {
    /// A core whose socket is bound to `local` and announced as `public`.
    pub fn new(local: SocketAddr, public: SocketAddr, counters: Arc<Counters>) -> Core {
        Core {
            public,
            local,
            peers: Vec::new(),
            by_addr: FxHashMap::default(),
            by_name: FxHashMap::default(),
            rooms: FxHashMap::default(),
            speakers: FxHashMap::default(),
            next_speaker_check: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            audio_q: VecDeque::new(),
            video_q: VecDeque::new(),
            dirty: Vec::new(),
            counters,
            #[cfg(feature = "payload-tap")]
            taps: FxHashMap::default(),
        }
    }

    /// Starts recording the first `limit` audio and video payloads forwarded in `room`.
    #[cfg(feature = "payload-tap")]
    pub fn tap(&mut self, room: &str, limit: usize) {
        self.taps.insert(
            room.to_owned(),
            PayloadTap {
                limit,
                ..PayloadTap::default()
            },
        );
    }

    /// What the tap of `room` recorded so far (it stops recording).
    #[cfg(feature = "payload-tap")]
    pub fn take_tap(&mut self, room: &str) -> Option<PayloadTap> {
        self.taps.remove(room)
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn new_rtc(&self, now: Instant) -> Rtc {
        // Opus and H.264 only (what the clients send); no RED towards the SFU (each
        // subscriber's slot must take what the publisher sends; RED stays a peer-to-peer
        // option). No send-side estimation: with it str0m paces each subscriber's media at an
        // estimate that starts low and ramps up slowly, and three publications queued
        // seconds behind it (measured: 3.7 s mouth to ear in the four-probe test). TWCC
        // feedback to the publishers (their own congestion control) is sent regardless.
        let stats = tracing::enabled!(target: "bedside_sfu::hops", tracing::Level::DEBUG)
            .then_some(Duration::from_secs(1));
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(true)
            .set_send_buffer_video(SEND_BUFFER_VIDEO)
            .set_stats_interval(stats)
            .build(now);
        if let Ok(c) = Candidate::host(self.public, "udp") {
            rtc.add_local_candidate(c);
        }
        rtc
    }

    /// A participant's offer: a new connection, a renegotiation of its current one (an ICE
    /// restart after a handover), or a rebuilt connection (a new DTLS fingerprint). Returns the
    /// answer.
    pub fn connect(
        &mut self,
        now: Instant,
        room: &str,
        participant: &str,
        offer: &str,
    ) -> Result<String, SfuError> {
        let parsed =
            SdpOffer::from_sdp_string(offer).map_err(|e| SfuError::BadOffer(e.to_string()))?;
        let fingerprint = fingerprint_of(offer);
        let key = (room.to_owned(), participant.to_owned());
        if let Some(&k) = self.by_name.get(&key) {
            let peer = self.peers[k].as_mut().expect("indexed peer exists");
            if peer.fingerprint == fingerprint && peer.rtc.is_alive() {
                let answer = peer
                    .rtc
                    .sdp_api()
                    .accept_offer(parsed)
                    .map_err(|e| SfuError::Rejected(e.to_string()))?;
                peer.last_input = now;
                self.dirty.push(k);
                self.run(now);
                return Ok(answer.to_sdp_string());
            }
            // A new peer connection from the same seat: a fresh Rtc in the same place, so the
            // slots the others hold for it stay valid.
            let mut rtc = self.new_rtc(now);
            let answer = rtc
                .sdp_api()
                .accept_offer(parsed)
                .map_err(|e| SfuError::Rejected(e.to_string()))?;
            self.by_addr.retain(|_, v| *v != k);
            let peer = self.peers[k].as_mut().expect("indexed peer exists");
            if peer.connected {
                self.counters.participants.fetch_sub(1, Relaxed);
            }
            peer.rtc = rtc;
            peer.fingerprint = fingerprint;
            peer.pub_audio = None;
            peer.pub_video = None;
            peer.connected = false;
            peer.last_input = now;
            peer.next_timeout = now;
            let old = std::mem::take(&mut peer.slots);
            self.drain_setup(k, now);
            // Keep the sources the old slots carried, in order, where the new ones allow.
            let peer = self.peers[k].as_mut().expect("indexed peer exists");
            for (slot, old) in peer.slots.iter_mut().zip(old) {
                slot.source = old.source;
            }
            self.assign(k);
            self.announce(k);
            self.dirty.push(k);
            self.run(now);
            return Ok(answer.to_sdp_string());
        }

        let mut rtc = self.new_rtc(now);
        let answer = rtc
            .sdp_api()
            .accept_offer(parsed)
            .map_err(|e| SfuError::Rejected(e.to_string()))?;
        let peer = Peer {
            room: room.to_owned(),
            participant: participant.to_owned(),
            rtc,
            fingerprint,
            pub_audio: None,
            pub_video: None,
            slots: Vec::new(),
            next_timeout: now,
            last_input: now,
            last_keyframe_request: None,
            keyframe_wanted: false,
            level: -127.0,
            level_at: None,
            connected: false,
            stats: ParticipantStats::default(),
            lag: [ArrivalLag::default(); 2],
        };
        let k = match self.peers.iter().position(Option::is_none) {
            Some(free) => {
                self.peers[free] = Some(peer);
                free
            }
            None => {
                self.peers.push(Some(peer));
                self.peers.len() - 1
            }
        };
        self.by_name.insert(key, k);
        self.rooms.entry(room.to_owned()).or_default().push(k);
        self.drain_setup(k, now);
        // Everyone else in the room gets a slot for the newcomer, and it one for each of them.
        let members = self.rooms.get(room).cloned().unwrap_or_default();
        for &m in &members {
            if m != k {
                self.assign(m);
                self.announce(m);
            }
        }
        self.assign(k);
        self.announce(k);
        self.dirty.push(k);
        self.run(now);
        Ok(answer.to_sdp_string())
    }

    /// Reads the `MediaAdded` events of a freshly accepted offer: which mids the client
    /// publishes on and which are its slots.
    fn drain_setup(&mut self, k: usize, now: Instant) {
        let peer = self.peers[k].as_mut().expect("peer exists");
        // str0m reports the new m-lines on the next poll after time is given.
        if peer.rtc.handle_input(Input::Timeout(now)).is_err() {
            peer.rtc.disconnect();
        }
        loop {
            match peer.rtc.poll_output() {
                Ok(Output::Event(RtcEvent::MediaAdded(m))) => {
                    add_media(peer, m.mid, m.kind, m.direction)
                }
                Ok(Output::Event(_)) => {}
                Ok(Output::Transmit(t)) => {
                    self.transmits.push_back((t.destination, t.contents.into()))
                }
                Ok(Output::Timeout(t)) => {
                    peer.next_timeout = t.max(now);
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Fills `k`'s free slots with the room's members it does not show yet, in join order.
    fn assign(&mut self, k: usize) {
        let Some(room) = self.peers[k].as_ref().map(|p| p.room.clone()) else {
            return;
        };
        let members = self.rooms.get(&room).cloned().unwrap_or_default();
        let mut newly = Vec::new();
        let peer = self.peers[k].as_mut().expect("peer exists");
        for &m in members.iter().filter(|&&m| m != k) {
            if peer.slots.iter().any(|s| s.source == Some(m)) {
                continue;
            }
            if let Some(slot) = peer.slots.iter_mut().find(|s| s.source.is_none()) {
                slot.source = Some(m);
                newly.push(m);
            }
        }
        // A new subscriber needs a keyframe from each source it now shows.
        for m in newly {
            if let Some(p) = self.peers[m].as_mut() {
                p.keyframe_wanted = true;
                self.dirty.push(m);
            }
        }
    }

    fn announce(&mut self, k: usize) {
        let Some(peer) = self.peers[k].as_ref() else {
            return;
        };
        let slots = peer
            .slots
            .iter()
            .filter_map(|s| {
                let src = self.peers.get(s.source?)?.as_ref()?;
                Some(SlotLayout {
                    participant: src.participant.clone(),
                    audio_mid: s.audio.map(|m| m.to_string()),
                    video_mid: s.video.map(|m| m.to_string()),
                })
            })
            .collect();
        self.events.push_back(Event::Layout {
            room: peer.room.clone(),
            participant: peer.participant.clone(),
            slots,
        });
    }

    /// A trickled ICE candidate from the participant (`a=candidate` or `candidate:` form).
    /// The SFU is ICE-lite: it answers checks from any address, so this only helps a client
    /// whose checks arrive late.
    pub fn add_candidate(
        &mut self,
        room: &str,
        participant: &str,
        candidate: &str,
    ) -> Result<(), SfuError> {
        let k = *self
            .by_name
            .get(&(room.to_owned(), participant.to_owned()))
            .ok_or(SfuError::UnknownParticipant)?;
        let line = candidate.trim().trim_start_matches("a=");
        if line.is_empty() {
            return Ok(());
        }
        let c = Candidate::from_sdp_string(line).map_err(|_| SfuError::BadCandidate)?;
        let peer = self.peers[k].as_mut().expect("indexed peer exists");
        peer.rtc.add_remote_candidate(c);
        self.dirty.push(k);
        Ok(())
    }

    /// The participant left the consultation (or moved back to peer to peer): its connection
    /// closes and the others' slots for it are freed.
    pub fn leave(&mut self, now: Instant, room: &str, participant: &str) {
        if let Some(k) = self
            .by_name
            .get(&(room.to_owned(), participant.to_owned()))
            .copied()
        {
            self.remove(k, false);
            self.run(now);
        }
    }

    /// Every participant of a room leaves (the consultation ended).
    pub fn close_room(&mut self, now: Instant, room: &str) {
        for k in self.rooms.get(room).cloned().unwrap_or_default() {
            self.remove(k, false);
        }
        self.run(now);
    }

    fn remove(&mut self, k: usize, tell: bool) {
        let Some(mut peer) = self.peers[k].take() else {
            return;
        };
        peer.rtc.disconnect();
        if peer.connected {
            self.counters.participants.fetch_sub(1, Relaxed);
        }
        self.by_addr.retain(|_, v| *v != k);
        self.by_name
            .remove(&(peer.room.clone(), peer.participant.clone()));
        if tell {
            self.events.push_back(Event::Disconnected {
                room: peer.room.clone(),
                participant: peer.participant.clone(),
            });
        }
        let members = match self.rooms.get_mut(&peer.room) {
            Some(m) => {
                m.retain(|&x| x != k);
                m.clone()
            }
            None => Vec::new(),
        };
        if members.is_empty() {
            self.rooms.remove(&peer.room);
            self.speakers.remove(&peer.room);
        }
        for m in members {
            let Some(p) = self.peers[m].as_mut() else {
                continue;
            };
            for s in p.slots.iter_mut().filter(|s| s.source == Some(k)) {
                s.source = None;
            }
            // A freed slot may take someone left out for lack of slots.
            self.assign(m);
            self.announce(m);
        }
    }

    /// One datagram from the socket.
    pub fn handle_receive(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        self.counters.datagrams_in.fetch_add(1, Relaxed);
        self.counters.bytes_in.fetch_add(data.len() as u64, Relaxed);
        let Ok(contents) = data.try_into() else {
            self.counters.unclaimed.fetch_add(1, Relaxed);
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        let k = match self.by_addr.get(&source) {
            Some(&k) => Some(k),
            // A new address (the first check, or a handover): ask each connection. Only STUN
            // from a new address gets here; everything else of a known client goes by map.
            None => self
                .peers
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| p.rtc.accepts(&input))),
        };
        let Some(k) = k else {
            self.counters.unclaimed.fetch_add(1, Relaxed);
            return;
        };
        let peer = self.peers[k].as_mut().expect("claimed by a live peer");
        peer.stats.bytes_in += data.len() as u64;
        peer.last_input = now;
        if peer.rtc.handle_input(input).is_err() {
            peer.rtc.disconnect();
        }
        self.by_addr.insert(source, k);
        self.dirty.push(k);
        self.run(now);
    }

    /// Time passes: every connection whose timer is due is driven, idle ones dropped, and the
    /// active speakers decided.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (k, p) in self.peers.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            if p.next_timeout <= now {
                if p.rtc.handle_input(Input::Timeout(now)).is_err() {
                    p.rtc.disconnect();
                }
                self.dirty.push(k);
            }
        }
        let idle: Vec<usize> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(k, p)| {
                let p = p.as_ref()?;
                (!p.rtc.is_alive() || now.duration_since(p.last_input) > IDLE_TIMEOUT).then_some(k)
            })
            .collect();
        for k in idle {
            self.remove(k, true);
        }
        if self.next_speaker_check.is_none_or(|t| t <= now) {
            self.next_speaker_check = Some(now + SPEAKER_INTERVAL);
            self.decide_speakers(now);
        }
        self.run(now);
    }

    /// When [`Core::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.iter().flatten().map(|p| p.next_timeout).min();
        match (peers, self.next_speaker_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next datagram to send: (destination, bytes).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn participant_stats(&self, room: &str, participant: &str) -> Option<ParticipantStats> {
        let k = self
            .by_name
            .get(&(room.to_owned(), participant.to_owned()))?;
        self.peers[*k].as_ref().map(|p| p.stats)
    }

    /// Every participant of `room` held now, with its traffic.
    pub fn room_stats(&self, room: &str) -> Vec<(String, ParticipantStats)> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter_map(|&k| self.peers[k].as_ref())
            .map(|p| (p.participant.clone(), p.stats))
            .collect()
    }

    /// The number of participants held (connected or connecting).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Drives the dirty connections until they have nothing more to say, forwarding what they
    /// received (audio before video) and relaying keyframe requests.
    fn run(&mut self, now: Instant) {
        loop {
            while let Some(k) = self.dirty.pop() {
                self.drive(k, now);
            }
            if let Some(f) = self
                .audio_q
                .pop_front()
                .or_else(|| self.video_q.pop_front())
            {
                self.forward(f);
                continue;
            }
            if self.dirty.is_empty() {
                break;
            }
        }
    }

    fn drive(&mut self, k: usize, now: Instant) {
        let Some(peer) = self.peers[k].as_mut() else {
            return;
        };
        if peer.keyframe_wanted && peer.connected {
            peer.keyframe_wanted = false;
            request_keyframe(peer, now, &self.counters);
        }
        // Publishers whose keyframe a subscriber of `k` asked for.
        let mut wanted = Vec::new();
        // Slots appeared (a renegotiation added some): fill and announce them.
        let mut relayout = false;
        loop {
            let out = match peer.rtc.poll_output() {
                Ok(o) => o,
                Err(_) => {
                    peer.rtc.disconnect();
                    peer.next_timeout = now;
                    return;
                }
            };
            match out {
                Output::Timeout(t) => {
                    peer.next_timeout = t.max(now);
                    break;
                }
                Output::Transmit(t) => {
                    let n = t.contents.len() as u64;
                    peer.stats.bytes_out += n;
                    self.counters.datagrams_out.fetch_add(1, Relaxed);
                    self.counters.bytes_out.fetch_add(n, Relaxed);
                    // str0m's buffer itself, not a copy (measured: one allocation and one
                    // copy less per datagram, see `cargo xtask bench-sfu`).
                    self.transmits.push_back((t.destination, t.contents.into()));
                }
                Output::Event(e) => match e {
                    RtcEvent::IceConnectionStateChange(s) => {
                        let up = matches!(
                            s,
                            IceConnectionState::Connected | IceConnectionState::Completed
                        );
                        if up && !peer.connected {
                            self.counters.participants.fetch_add(1, Relaxed);
                            peer.keyframe_wanted = true;
                        } else if !up && peer.connected {
                            self.counters.participants.fetch_sub(1, Relaxed);
                        }
                        peer.connected = up;
                        peer.stats.connected = up;
                    }
                    RtcEvent::MediaAdded(m) => {
                        relayout |= m.direction == Direction::SendOnly;
                        add_media(peer, m.mid, m.kind, m.direction)
                    }
                    RtcEvent::MediaData(data) => {
                        peer.stats.frames_in += 1;
                        let i = usize::from(Some(data.mid) == peer.pub_video);
                        peer.lag[i].observe(data.network_time, data.time.as_seconds());
                        let kind = if Some(data.mid) == peer.pub_audio {
                            if let Some(level) = data.ext_vals.audio_level {
                                // A fast attack, slow release average of -dBov.
                                let l = f32::from(level);
                                let a = if l > peer.level { 0.5 } else { 0.1 };
                                peer.level += a * (l - peer.level);
                                peer.level_at = Some(now);
                            }
                            MediaKind::Audio
                        } else if Some(data.mid) == peer.pub_video {
                            if !data.contiguous {
                                // Lost packets on the way in: every subscriber's decoder will
                                // need a keyframe, so ask the publisher once for all.
                                request_keyframe(peer, now, &self.counters);
                            }
                            MediaKind::Video
                        } else {
                            continue;
                        };
                        let f = Forward {
                            from: k,
                            kind,
                            data,
                        };
                        match kind {
                            MediaKind::Audio => self.audio_q.push_back(f),
                            MediaKind::Video => self.video_q.push_back(f),
                        }
                    }
                    // Two stats types with the same fields, logged alike.
                    RtcEvent::MediaIngressStats(s) => {
                        log_media_stats!(k, s, "ingress")
                    }
                    RtcEvent::MediaEgressStats(s) => log_media_stats!(k, s, "egress"),
                    RtcEvent::PeerStats(s) => tracing::debug!(
                        target: "bedside_sfu::hops",
                        peer = k,
                        audio_lag_ms = peer.lag[0].take_max_ms(),
                        video_lag_ms = peer.lag[1].take_max_ms(),
                        rx = s.bytes_rx,
                        tx = s.bytes_tx,
                        ingress_loss = ?s.ingress_loss_fraction,
                        egress_loss = ?s.egress_loss_fraction,
                        rtt = ?s.rtt,
                        "peer"
                    ),
                    RtcEvent::KeyframeRequest(req) => {
                        let source = peer
                            .slots
                            .iter()
                            .find(|s| s.video == Some(req.mid))
                            .and_then(|s| s.source);
                        wanted.extend(source.filter(|&s| s != k));
                    }
                    _ => {}
                },
            }
        }
        for src in wanted {
            if let Some(p) = self.peers[src].as_mut() {
                p.keyframe_wanted = true;
                self.dirty.push(src);
            }
        }
        if relayout {
            self.assign(k);
            self.announce(k);
        }
    }

    fn forward(&mut self, f: Forward) {
        let Some(room) = self.peers[f.from].as_ref().map(|p| p.room.clone()) else {
            return;
        };
        #[cfg(feature = "payload-tap")]
        if let Some(tap) = self.taps.get_mut(&room) {
            tap.record(f.kind, &f.data.data);
        }
        let members = self.rooms.get(&room).cloned().unwrap_or_default();
        for m in members {
            if m == f.from {
                continue;
            }
            let Some(sub) = self.peers[m].as_mut() else {
                continue;
            };
            if !sub.connected {
                continue;
            }
            let Some(slot) = sub.slots.iter().find(|s| s.source == Some(f.from)) else {
                continue;
            };
            let mid = match f.kind {
                MediaKind::Audio => slot.audio,
                MediaKind::Video => slot.video,
            };
            let Some(mid) = mid else { continue };
            let Some(writer) = sub.rtc.writer(mid) else {
                continue;
            };
            let Some(pt) = writer.match_params(f.data.params) else {
                continue;
            };
            let writer = match f.data.ext_vals.audio_level {
                Some(level) if f.kind == MediaKind::Audio => {
                    writer.audio_level(level, f.data.ext_vals.voice_activity.unwrap_or(false))
                }
                _ => writer,
            };
            if writer
                .write(pt, f.data.network_time, f.data.time, f.data.data.clone())
                .is_ok()
            {
                sub.stats.frames_out += 1;
                self.counters.frames_forwarded.fetch_add(1, Relaxed);
            }
            self.dirty.push(m);
        }
    }

    fn decide_speakers(&mut self, now: Instant) {
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            let loudest = self.rooms[&room]
                .iter()
                .filter_map(|&k| self.peers[k].as_ref())
                .filter(|p| {
                    p.level_at
                        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
                        && p.level > SPEAKER_THRESHOLD_DBOV
                })
                .max_by(|a, b| a.level.total_cmp(&b.level))
                .map(|p| p.participant.clone());
            let current = self.speakers.entry(room.clone()).or_insert(None);
            if *current != loudest {
                *current = loudest.clone();
                self.events.push_back(Event::ActiveSpeaker {
                    room,
                    participant: loudest,
                });
            }
        }
    }
}

fn add_media(peer: &mut Peer, mid: Mid, kind: MediaKind, direction: Direction) {
    match direction {
        // The client sends: its publication.
        Direction::RecvOnly | Direction::SendRecv => match kind {
            MediaKind::Audio if peer.pub_audio.is_none() => peer.pub_audio = Some(mid),
            MediaKind::Video if peer.pub_video.is_none() => peer.pub_video = Some(mid),
            _ => {}
        },
        // The client receives: a slot (an audio m-line opens one, the next video joins it).
        Direction::SendOnly => match kind {
            MediaKind::Audio => peer.slots.push(Slot {
                audio: Some(mid),
                video: None,
                source: None,
            }),
            MediaKind::Video => match peer.slots.iter_mut().find(|s| s.video.is_none()) {
                Some(s) => s.video = Some(mid),
                None => peer.slots.push(Slot {
                    audio: None,
                    video: Some(mid),
                    source: None,
                }),
            },
        },
        Direction::Inactive => {}
    }
}

fn request_keyframe(peer: &mut Peer, now: Instant, counters: &Counters) {
    if peer
        .last_keyframe_request
        .is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL)
    {
        // Asked recently: the keyframe on its way serves this request too.
        counters.keyframe_requests_suppressed.fetch_add(1, Relaxed);
        return;
    }
    let Some(mid) = peer.pub_video else { return };
    let Some(mut writer) = peer.rtc.writer(mid) else {
        return;
    };
    if writer
        .request_keyframe(None, KeyframeRequestKind::Pli)
        .is_ok()
    {
        peer.last_keyframe_request = Some(now);
        counters.keyframe_requests.fetch_add(1, Relaxed);
    }
}

/// The `a=fingerprint` value of a session description (session or first media level).
fn fingerprint_of(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=fingerprint:"))
        .map(|f| f.trim().to_ascii_lowercase())
}

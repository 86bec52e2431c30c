//! The load generator: `4 x N` str0m clients, each with its own UDP socket on loopback, all
//! driven by the calling thread. Each publishes 720p-like video (30 frames/s, about 1.4 Mbit/s:
//! a 24 KB IDR frame every 2 s and 5.5 KB frames between) and audio-like frames (50/s, 100 B, with
//! an RFC 6464 level) through the SFU, and receives the other three participants' media.
//!
//! What it receives is counted from the RTP header alone (SRTP leaves it in the clear) and not
//! handed to str0m: decrypting and depacketizing three streams per publication would cost the
//! generator about what forwarding costs the SFU, and the generator must not be what limits the
//! SFU. Everything else (STUN, DTLS, RTCP: the SFU's reports and TWCC feedback) goes to the
//! client's `Rtc`, so ICE, DTLS and SRTP run for real.
//!
//! Each packet's RTP timestamp is its frame's send time (microseconds since the bench started,
//! at the codec's clock rate), which the SFU forwards as it is (str0m's frame API keeps the
//! publisher's media time): the receiver reads its one-way delay through the SFU from the
//! header, and only packets of frames sent inside the measuring window are counted on both
//! sides, so a packet in flight at a window's edge is neither lost nor counted twice.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bedside_sfu::SfuHandle;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

pub const PARTICIPANTS_PER_ROOM: usize = 4;
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
const VIDEO_INTERVAL_US: u64 = 33_333;
const IDR_EVERY: u64 = 60;
const IDR_BYTES: usize = 24_000;
const P_BYTES: usize = 5_500;
const AUDIO_BYTES: usize = 100;

/// Packets counted inside the measuring window.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent_audio: u64,
    pub sent_video: u64,
    pub recv_audio: u64,
    pub recv_video: u64,
    /// One-way delay publisher -> SFU -> subscriber of every counted packet, microseconds.
    pub delay_us: Vec<u32>,
    /// The same, audio packets only.
    pub audio_delay_us: Vec<u32>,
}

struct Client {
    sock: UdpSocket,
    addr: SocketAddr,
    rtc: Rtc,
    audio: Mid,
    video: Mid,
    pts: Option<(Pt, Pt)>,
    connected: bool,
    dead: bool,
    next_timeout: Instant,
    next_audio: Instant,
    next_video: Instant,
    frame: u64,
}

pub struct LoadGen {
    epoch: Instant,
    sfu: SfuHandle,
    rt: tokio::runtime::Runtime,
    epfd: OwnedFd,
    clients: Vec<Client>,
    rooms: usize,
    buf: Vec<u8>,
    idr: Arc<[u8]>,
    pframe: Arc<[u8]>,
    audio: Arc<[u8]>,
    /// Measuring window, microseconds since `epoch` (start, end).
    window: Option<(u64, u64)>,
    pub tally: Tally,
    seed: u64,
}

/// A body with no start code inside (SFrame ciphertext looks like this to the SFU).
fn body(nal: u8, len: usize) -> Arc<[u8]> {
    let mut f = vec![0, 0, 0, 1, nal];
    f.extend((0..len as u32).map(|i| 0x10 + (i.wrapping_mul(2654435761) >> 28) as u8));
    f.into()
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl LoadGen {
    pub fn new(sfu: SfuHandle, epoch: Instant) -> io::Result<LoadGen> {
        // SAFETY: epoll_create1 returns a new descriptor we own, or -1.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(LoadGen {
            epoch,
            sfu,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            // SAFETY: fd is a fresh descriptor nobody else owns.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            clients: Vec::new(),
            rooms: 0,
            buf: vec![0u8; 2048],
            idr: body(0x65, IDR_BYTES),
            pframe: body(0x41, P_BYTES),
            audio: vec![0x5a; AUDIO_BYTES].into(),
            window: None,
            tally: Tally::default(),
            seed: 0x9e37_79b9_7f4a_7c15,
        })
    }

    pub fn participants(&self) -> usize {
        self.clients.len()
    }

    pub fn rooms(&self) -> usize {
        self.rooms
    }

    fn rand_us(&mut self, below: u64) -> u64 {
        // xorshift64*: offsets that spread the publishers' frames over their period.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }

    /// Adds one consultation of four participants (offers answered by the SFU; ICE and DTLS
    /// then run in [`LoadGen::pump`]).
    pub fn add_room(&mut self) -> io::Result<()> {
        let room = format!("bench-{}", self.rooms);
        self.rooms += 1;
        for p in 0..PARTICIPANTS_PER_ROOM {
            let now = Instant::now();
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.set_nonblocking(true)?;
            set_rcvbuf(&sock, 1 << 20);
            let addr = sock.local_addr()?;
            let mut rtc = Rtc::builder()
                .clear_codecs()
                .enable_opus(true, false)
                .enable_h264(true)
                .build(now);
            rtc.add_local_candidate(
                Candidate::host(addr, "udp").map_err(|e| io::Error::other(e.to_string()))?,
            );
            let mut change = rtc.sdp_api();
            let audio = change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
            let video = change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
            for _ in 0..PARTICIPANTS_PER_ROOM - 1 {
                change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
            }
            let (offer, pending): (_, SdpPendingOffer) =
                change.apply().ok_or_else(|| io::Error::other("no offer"))?;
            let handle = self.sfu.clone();
            let name = format!("p{p}");
            let answer = self
                .rt
                .block_on(handle.connect(&room, &name, offer.to_sdp_string()))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let answer =
                SdpAnswer::from_sdp_string(&answer).map_err(|e| io::Error::other(e.to_string()))?;
            rtc.sdp_api()
                .accept_answer(pending, answer)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let index = self.clients.len() as u64;
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: index,
            };
            // SAFETY: registering a live socket with our own epoll descriptor.
            cvt(unsafe {
                libc::epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    sock.as_raw_fd(),
                    &mut ev,
                )
            })?;
            let next_audio = now + Duration::from_micros(self.rand_us(20_000));
            let next_video = now + Duration::from_micros(self.rand_us(VIDEO_INTERVAL_US));
            self.clients.push(Client {
                sock,
                addr,
                rtc,
                audio,
                video,
                pts: None,
                connected: false,
                dead: false,
                next_timeout: now,
                next_audio,
                next_video,
                frame: 0,
            });
        }
        Ok(())
    }

    /// Clients whose DTLS is up.
    pub fn connected(&self) -> usize {
        self.clients.iter().filter(|c| c.connected).count()
    }

    /// The clients' UDP ports (to read their sockets' drop counts).
    pub fn ports(&self) -> Vec<u16> {
        self.clients.iter().map(|c| c.addr.port()).collect()
    }

    pub fn dead(&self) -> usize {
        self.clients.iter().filter(|c| c.dead).count()
    }

    /// Starts counting packets of frames sent from now until `len` from now.
    pub fn open_window(&mut self, len: Duration) {
        let start = self.epoch.elapsed().as_micros() as u64;
        self.window = Some((start, start + len.as_micros() as u64));
        self.tally = Tally::default();
    }

    /// Runs everything (media, timers, sockets) until `until`.
    pub fn pump(&mut self, until: Instant) {
        let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let us = now.duration_since(self.epoch).as_micros() as u64;
            let mut soonest = until;
            for c in self.clients.iter_mut() {
                if c.dead {
                    continue;
                }
                let mut wrote = false;
                if c.connected {
                    if c.pts.is_none() {
                        c.pts = payload_types(&mut c.rtc, c.audio, c.video);
                    }
                    if let Some((apt, vpt)) = c.pts {
                        if c.next_audio <= now {
                            c.next_audio += AUDIO_INTERVAL;
                            let t = MediaTime::new(us * 48 / 1000, Frequency::FORTY_EIGHT_KHZ);
                            if let Some(w) = c.rtc.writer(c.audio) {
                                let _ =
                                    w.audio_level(-30, true)
                                        .write(apt, now, t, self.audio.clone());
                            }
                            wrote = true;
                        }
                        if c.next_video <= now {
                            c.next_video += Duration::from_micros(VIDEO_INTERVAL_US);
                            let t = MediaTime::new(us * 90 / 1000, Frequency::NINETY_KHZ);
                            let data = if c.frame.is_multiple_of(IDR_EVERY) {
                                self.idr.clone()
                            } else {
                                self.pframe.clone()
                            };
                            c.frame += 1;
                            if let Some(w) = c.rtc.writer(c.video) {
                                let _ = w.write(vpt, now, t, data);
                            }
                            wrote = true;
                        }
                    }
                }
                if wrote || c.next_timeout <= now {
                    if c.rtc.handle_input(Input::Timeout(now)).is_err() {
                        c.dead = true;
                        continue;
                    }
                    drain(c, now, self.epoch, self.window, &mut self.tally);
                }
                soonest = soonest.min(c.next_timeout);
                if c.connected {
                    soonest = soonest.min(c.next_audio).min(c.next_video);
                }
            }
            let wait = soonest.saturating_duration_since(Instant::now());
            let ms = if wait.is_zero() {
                0
            } else {
                wait.as_micros().div_ceil(1000).min(5) as libc::c_int
            };
            // SAFETY: events is a live buffer of the length passed.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    ms,
                )
            };
            for e in events.iter().take(n.max(0) as usize) {
                self.read(e.u64 as usize);
            }
        }
    }

    fn read(&mut self, i: usize) {
        let now = Instant::now();
        let ticks_us = now.duration_since(self.epoch).as_micros() as u64;
        let c = &mut self.clients[i];
        let mut fed = false;
        loop {
            let (n, from) = match c.sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let d = &self.buf[..n];
            let rtp = n >= 12 && (128..192).contains(&d[0]) && !(192..=223).contains(&d[1]);
            if rtp {
                let pt = Pt::from(d[1] & 0x7f);
                let ts = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                let Some((apt, vpt)) = c.pts else { continue };
                let rate = if pt == apt {
                    48
                } else if pt == vpt {
                    90
                } else {
                    continue;
                };
                if let Some(delay) = in_window(self.window, ts, rate, ticks_us) {
                    if rate == 48 {
                        self.tally.recv_audio += 1;
                        self.tally.audio_delay_us.push(delay);
                    } else {
                        self.tally.recv_video += 1;
                    }
                    self.tally.delay_us.push(delay);
                }
                continue;
            }
            let Ok(contents) = d.try_into() else { continue };
            let input = Input::Receive(
                now,
                Receive {
                    proto: Protocol::Udp,
                    source: from,
                    destination: c.addr,
                    contents,
                },
            );
            if c.rtc.handle_input(input).is_err() {
                c.dead = true;
                return;
            }
            fed = true;
        }
        if fed {
            drain(c, now, self.epoch, self.window, &mut self.tally);
        }
    }
}

/// If the packet's frame (its RTP timestamp, `rate` ticks per millisecond since the epoch) was
/// sent inside the window: its one-way delay until `now_us`, microseconds.
fn in_window(window: Option<(u64, u64)>, ts: u32, rate: u64, now_us: u64) -> Option<u32> {
    let (start, end) = window?;
    let now_ticks = (now_us * rate / 1000) as u32;
    let age = now_ticks.wrapping_sub(ts) as u64 * 1000 / rate; // µs since the frame was sent
    let sent_us = now_us.checked_sub(age)?;
    (sent_us >= start && sent_us < end).then_some(age.min(u32::MAX as u64) as u32)
}

fn payload_types(rtc: &mut Rtc, audio: Mid, video: Mid) -> Option<(Pt, Pt)> {
    let pt = |rtc: &mut Rtc, mid, codec| {
        rtc.writer(mid)?
            .payload_params()
            .find(|p| p.spec().codec == codec)
            .map(|p| p.pt())
    };
    Some((pt(rtc, audio, Codec::Opus)?, pt(rtc, video, Codec::H264)?))
}

/// Sends what the client's `Rtc` has queued, counting its media packets in the window.
fn drain(c: &mut Client, now: Instant, epoch: Instant, window: Option<(u64, u64)>, t: &mut Tally) {
    let now_us = now.duration_since(epoch).as_micros() as u64;
    for _ in 0..10_000 {
        match c.rtc.poll_output() {
            Ok(Output::Transmit(tx)) => {
                let d: &[u8] = &tx.contents;
                if let Some((apt, vpt)) = c.pts
                    && d.len() >= 12
                    && (128..192).contains(&d[0])
                    && !(192..=223).contains(&d[1])
                {
                    let pt = Pt::from(d[1] & 0x7f);
                    let ts = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                    if pt == apt && in_window(window, ts, 48, now_us).is_some() {
                        t.sent_audio += 1;
                    } else if pt == vpt && in_window(window, ts, 90, now_us).is_some() {
                        t.sent_video += 1;
                    }
                }
                let _ = c.sock.send_to(d, tx.destination);
            }
            Ok(Output::Timeout(at)) => {
                c.next_timeout = at;
                return;
            }
            Ok(Output::Event(e)) => match e {
                RtcEvent::Connected => c.connected = true,
                RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    c.connected = false
                }
                _ => {}
            },
            Err(_) => {
                c.dead = true;
                return;
            }
        }
    }
}

fn set_rcvbuf(sock: &UdpSocket, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: setsockopt with a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

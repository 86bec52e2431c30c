//! The socket loop: one OS thread owns one UDP socket and the [`Core`] (every participant's
//! `Rtc`), reads the clock and hands it in. Commands from the signaling side arrive over a
//! channel plus an eventfd that wakes the thread's `poll(2)`; events go out on a tokio channel.
//!
//! Per wake-up: read the socket with `recvmmsg` ([`BATCH`] datagrams a call, each handed to the
//! core, which forwards at once), drive the timers that are due (str0m hands a written frame's
//! packets out on its next timeout), send everything the core queued with `sendmmsg`, and
//! repeat while the socket has more (up to [`ROUNDS`] batches before the commands get a turn);
//! then sleep until the socket, a command or the next timer. Measured with `cargo xtask
//! bench-sfu` side by side with the previous loop (one `recv_from`/`send_to` per datagram,
//! timers after every 64, default buffers), 64 participants, load average 16: the CPU per
//! datagram sent did not change (11.7-11.8 µs before, 12.1-12.5 µs after: the cost is str0m's,
//! not the system calls'), but the p99 delay through the SFU fell from 200-245 ms to 13-20 ms.
//! A consultation lives on one thread (today there is one shard; more shards would each own a
//! socket and a core, with the room mapped to a shard by the signaling side).
//!
//! The socket asks for [`SOCKET_BUFFER`]-byte kernel buffers: a publisher's keyframe is a burst
//! of tens of datagrams, and with the default (208 KiB) the bench lost 1,649 datagrams in 2 s
//! at 16 participants whenever the thread was kept off its core for tens of milliseconds.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::core::{Core, Counters, Event, ParticipantStats, SfuError};
use crate::metrics::{IoMetrics, SfuMetrics};

/// Datagrams per `recvmmsg` and per `sendmmsg`.
pub const BATCH: usize = 64;

/// Receive batches per wake-up before the commands get a turn.
pub const ROUNDS: usize = 16;

/// The socket's kernel buffers, each way (`SO_RCVBUFFORCE` where the process may, else
/// `SO_RCVBUF`, which `net.core.rmem_max` caps).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Largest datagram read (longer ones are truncated and dropped by the core as unparsable).
const RECV_BUF: usize = 2048;

enum Cmd {
    Connect {
        room: String,
        participant: String,
        offer: String,
        reply: oneshot::Sender<Result<String, SfuError>>,
    },
    Candidate {
        room: String,
        participant: String,
        candidate: String,
    },
    Leave {
        room: String,
        participant: String,
    },
    CloseRoom {
        room: String,
    },
    Stats {
        room: String,
        participant: String,
        reply: oneshot::Sender<Option<ParticipantStats>>,
    },
    RoomStats {
        room: String,
        reply: oneshot::Sender<Vec<(String, ParticipantStats)>>,
    },
    #[cfg(feature = "payload-tap")]
    Tap {
        room: String,
        limit: usize,
    },
    #[cfg(feature = "payload-tap")]
    TakeTap {
        room: String,
        reply: oneshot::Sender<Option<crate::core::PayloadTap>>,
    },
    Shutdown,
}

/// Where the SFU listens and what it announces.
#[derive(Clone, Debug)]
pub struct SfuSettings {
    /// The UDP address to bind (port 0: one the OS picks).
    pub listen: SocketAddr,
    /// The address put in answers as the SFU's candidate; `None`: the bound address (an
    /// unspecified bound IP is replaced by 127.0.0.1, for tests on one host).
    pub public: Option<SocketAddr>,
}

/// The running SFU: a cheap, cloneable handle to its thread.
#[derive(Clone)]
pub struct SfuHandle {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
    local: SocketAddr,
    public: SocketAddr,
    metrics: SfuMetrics,
}

/// The SFU's thread; [`Sfu::shutdown`] stops it.
pub struct Sfu {
    handle: SfuHandle,
    thread: Option<JoinHandle<()>>,
}

impl Sfu {
    /// Binds the socket and starts the thread. Events (layouts, speakers, disconnections) go
    /// to `events`.
    pub fn start(settings: SfuSettings, events: tmpsc::UnboundedSender<Event>) -> io::Result<Sfu> {
        Sfu::start_with(settings, events, SfuMetrics::default())
    }

    /// [`Sfu::start`], counting into `metrics` (registered on `/metrics` before the start).
    pub fn start_with(
        settings: SfuSettings,
        events: tmpsc::UnboundedSender<Event>,
        metrics: SfuMetrics,
    ) -> io::Result<Sfu> {
        let socket = UdpSocket::bind(settings.listen)?;
        socket.set_nonblocking(true)?;
        set_buffers(socket.as_raw_fd(), SOCKET_BUFFER);
        let local = socket.local_addr()?;
        let public = settings.public.unwrap_or_else(|| {
            let mut a = local;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a
        });
        // SAFETY: eventfd returns a new descriptor we then own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a valid descriptor nobody else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = mpsc::channel();
        let core = Core::new(local, public, metrics.counters.clone());
        let thread_wake = wake.clone();
        let io = metrics.io.clone();
        let thread = std::thread::Builder::new()
            .name("bedside-sfu".into())
            .spawn(move || run(socket, core, rx, thread_wake, events, &io))?;
        Ok(Sfu {
            handle: SfuHandle {
                tx,
                wake,
                local,
                public,
                metrics,
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> &SfuHandle {
        &self.handle
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(mut self) {
        self.handle.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sfu {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.send(Cmd::Shutdown);
        }
    }
}

impl SfuHandle {
    fn send(&self, c: Cmd) -> bool {
        if self.tx.send(c).is_err() {
            return false;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we hold.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        true
    }

    /// The socket's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address clients are told to reach.
    pub fn public_addr(&self) -> SocketAddr {
        self.public
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.metrics.counters
    }

    /// The core's counters and the socket loop's, as `/metrics` reads them.
    pub fn metrics(&self) -> &SfuMetrics {
        &self.metrics
    }

    /// A participant's offer to the SFU; returns the SFU's answer.
    pub async fn connect(
        &self,
        room: &str,
        participant: &str,
        offer: String,
    ) -> Result<String, SfuError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::Connect {
            room: room.to_owned(),
            participant: participant.to_owned(),
            offer,
            reply,
        }) {
            return Err(SfuError::Stopped);
        }
        rx.await.map_err(|_| SfuError::Stopped)?
    }

    pub fn add_candidate(&self, room: &str, participant: &str, candidate: String) {
        self.send(Cmd::Candidate {
            room: room.to_owned(),
            participant: participant.to_owned(),
            candidate,
        });
    }

    pub fn leave(&self, room: &str, participant: &str) {
        self.send(Cmd::Leave {
            room: room.to_owned(),
            participant: participant.to_owned(),
        });
    }

    pub fn close_room(&self, room: &str) {
        self.send(Cmd::CloseRoom {
            room: room.to_owned(),
        });
    }

    /// What the SFU measured of one participant's traffic.
    pub async fn participant_stats(
        &self,
        room: &str,
        participant: &str,
    ) -> Option<ParticipantStats> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::Stats {
            room: room.to_owned(),
            participant: participant.to_owned(),
            reply,
        }) {
            return None;
        }
        rx.await.ok().flatten()
    }
}

impl SfuHandle {
    /// Every participant of a consultation on the SFU, with what it measured of each.
    pub async fn room_stats(&self, room: &str) -> Vec<(String, ParticipantStats)> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::RoomStats {
            room: room.to_owned(),
            reply,
        }) {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Records the first `limit` audio and video payloads forwarded in `room`
    /// ([`crate::core::PayloadTap`], tests only).
    #[cfg(feature = "payload-tap")]
    pub fn tap(&self, room: &str, limit: usize) {
        self.send(Cmd::Tap {
            room: room.to_owned(),
            limit,
        });
    }

    /// What the tap of `room` recorded (`None`: no tap there).
    #[cfg(feature = "payload-tap")]
    pub async fn take_tap(&self, room: &str) -> Option<crate::core::PayloadTap> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::TakeTap {
            room: room.to_owned(),
            reply,
        }) {
            return None;
        }
        rx.await.ok().flatten()
    }
}

fn run(
    socket: UdpSocket,
    mut core: Core,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<OwnedFd>,
    events: tmpsc::UnboundedSender<Event>,
    io: &IoMetrics,
) {
    let fd = socket.as_raw_fd();
    let mut recv = RecvBatch::new();
    let mut send = SendBatch::new();
    loop {
        let now = Instant::now();
        // Commands.
        let mut drained = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our own nonblocking eventfd.
        unsafe { libc::read(wake.as_raw_fd(), (&mut drained as *mut u64).cast(), 8) };
        loop {
            match rx.try_recv() {
                Ok(Cmd::Connect {
                    room,
                    participant,
                    offer,
                    reply,
                }) => {
                    let _ = reply.send(core.connect(now, &room, &participant, &offer));
                }
                Ok(Cmd::Candidate {
                    room,
                    participant,
                    candidate,
                }) => {
                    let _ = core.add_candidate(&room, &participant, &candidate);
                }
                Ok(Cmd::Leave { room, participant }) => core.leave(now, &room, &participant),
                Ok(Cmd::CloseRoom { room }) => core.close_room(now, &room),
                Ok(Cmd::Stats {
                    room,
                    participant,
                    reply,
                }) => {
                    let _ = reply.send(core.participant_stats(&room, &participant));
                }
                Ok(Cmd::RoomStats { room, reply }) => {
                    let _ = reply.send(core.room_stats(&room));
                }
                #[cfg(feature = "payload-tap")]
                Ok(Cmd::Tap { room, limit }) => core.tap(&room, limit),
                #[cfg(feature = "payload-tap")]
                Ok(Cmd::TakeTap { room, reply }) => {
                    let _ = reply.send(core.take_tap(&room));
                }
                Ok(Cmd::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        send.flush(fd, &mut core, io);
        // Datagrams, batch by batch, each followed by the timers due and one sendmmsg.
        for _ in 0..ROUNDS {
            let n = recv.recv(fd);
            let received = Instant::now();
            for i in 0..n {
                if let Some((from, data)) = recv.datagram(i) {
                    core.handle_receive(received, from, data);
                }
            }
            let now = Instant::now();
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            if send.flush(fd, &mut core, io) > 0 && n > 0 {
                io.forwarded(received.elapsed().as_micros() as u64, n as u64);
            }
            if n < BATCH {
                break;
            }
        }
        while let Some(e) = core.poll_event() {
            let _ = events.send(e);
        }
        // Sleep until the socket, a command or the next timer.
        let wait = core
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    }
}

/// Asks for `size`-byte kernel buffers both ways: the *FORCE options (which may exceed
/// `net.core.rmem_max`/`wmem_max` but need CAP_NET_ADMIN), else the ordinary ones.
fn set_buffers(fd: RawFd, size: usize) {
    let v = size.min(i32::MAX as usize) as libc::c_int;
    let p = (&v as *const libc::c_int).cast();
    let l = size_of::<libc::c_int>() as libc::socklen_t;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt with a pointer to a live c_int.
        unsafe {
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, l) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, l);
            }
        }
    }
}

fn to_sockaddr(addr: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Buffers for `recvmmsg`: [`BATCH`] slots of [`RECV_BUF`] bytes, allocated once.
struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new() -> Self {
        let mut b = RecvBatch {
            bufs: vec![0u8; BATCH * RECV_BUF],
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        };
        for i in 0..BATCH {
            b.iovs[i].iov_base = b.bufs[i * RECV_BUF..].as_mut_ptr().cast();
            b.iovs[i].iov_len = RECV_BUF;
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
        }
        b
    }

    /// Receives up to BATCH datagrams (0 when none is waiting).
    fn recv(&mut self, fd: RawFd) -> usize {
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: the headers point into buffers owned by self that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        // Errors (EAGAIN; ICMP errors surfacing as ECONNREFUSED) leave nothing to read now.
        n.max(0) as usize
    }

    fn datagram(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let from = from_sockaddr(&self.addrs[i])?;
        Some((
            from,
            &self.bufs[i * RECV_BUF..i * RECV_BUF + h.msg_len as usize],
        ))
    }
}

/// What the core queued, sent with `sendmmsg` straight from its buffers.
struct SendBatch {
    queued: Vec<(SocketAddr, Vec<u8>)>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    fn new() -> Self {
        SendBatch {
            queued: Vec::with_capacity(BATCH),
            // SAFETY: all-zero is valid for these C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// Sends everything the core has queued; returns how many datagrams went.
    fn flush(&mut self, fd: RawFd, core: &mut Core, io: &IoMetrics) -> usize {
        let mut total = 0;
        loop {
            self.queued.clear();
            while self.queued.len() < BATCH {
                match core.poll_transmit() {
                    Some(t) => self.queued.push(t),
                    None => break,
                }
            }
            let n = self.queued.len();
            if n == 0 {
                return total;
            }
            let mut rtp = 0;
            for (i, (to, data)) in self.queued.iter().enumerate() {
                // RTP, not RTCP (RFC 5761: RTCP packet types 192-223 in the second byte).
                if data.len() >= 12
                    && (128..192).contains(&data[0])
                    && !(192..=223).contains(&data[1])
                {
                    rtp += 1;
                }
                self.iovs[i].iov_base = data.as_ptr() as *mut libc::c_void;
                self.iovs[i].iov_len = data.len();
                let h = &mut self.hdrs[i].msg_hdr;
                h.msg_namelen = to_sockaddr(to, &mut self.addrs[i]);
                h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_iov = &mut self.iovs[i];
                h.msg_iovlen = 1;
            }
            io.rtp_out.fetch_add(rtp, Relaxed);
            let mut sent = 0;
            while sent < n {
                // SAFETY: the headers point at buffers in self.queued, alive until the clear.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs[sent..].as_mut_ptr(),
                        (n - sent) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // A full send buffer or an unreachable client drops the datagram, as the
                    // network would; RTP recovers.
                    io.send_errors.fetch_add(1, Relaxed);
                    sent += 1;
                } else {
                    sent += r as usize;
                }
            }
            total += n;
        }
    }
}

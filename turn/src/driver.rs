//! The socket loop: one OS thread owns the [`Core`], every UDP socket (listening and relay) and
//! an epoll instance; TCP/TLS connections live on the caller's tokio runtime and hand frames to
//! that thread over a channel plus an eventfd.
//!
//! Fast path per wake-up: `epoll_wait` returns every ready socket; each is drained with
//! `recvmmsg` (up to [`BATCH`] datagrams per call); peer payloads land after [`HEADROOM`] bytes
//! so ChannelData is framed in place; replies to UDP clients are queued and flushed with one
//! `sendmmsg` per listening socket per wake-up. No allocation per packet on the UDP paths.
//!
//! **Segmentation offload (Linux, `udp-offload`).** Most of the relay's time is the kernel's
//! per-datagram path (a profile at 25,000 messages a second: about 92 % in syscalls, 4 % in our
//! code), so consecutive datagrams of one size to one destination (a video frame's packets, or
//! whatever one relay socket read in one batch) go out as one `UDP_SEGMENT` (GSO) message:
//! one trip through the stack for up to [`GSO_MAX_SEGMENTS`], split at the device (or by the
//! NIC). Client-to-peer payloads are sent in place from the receive buffer, one `iovec` a
//! segment; peer-to-client ChannelData is copied into the send batch's arena, where a run to
//! one client grows. Every UDP socket also sets `UDP_GRO`, so a NIC's GRO may hand several
//! datagrams of one flow to one `recvmmsg` slot (the `UDP_GRO` cmsg gives the segment size);
//! each segment is then handled as the datagram it was. A GSO message the kernel refuses is
//! sent again as single datagrams (and `EIO`, a device that cannot checksum, turns GSO off).
//! Written by hand rather than with `quinn-udp`: its `Transmit` is one contiguous buffer to one
//! destination, while the relay needs gather sends (payloads read in place) and batches to
//! many destinations in one `sendmmsg`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::{FxHashMap, FxHashSet};
use socket2::{Domain, Protocol, Socket, Type};

use crate::core::{Client, Core, HEADROOM, Output, RelayId, RelaySockets, Transport};
use crate::metrics::Metrics;

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 32;
const BUF: usize = 4096;
const TAIL: usize = 4;
const TAG_CTRL: u64 = 0;
/// Wake-ups that found fewer datagrams than this are followed by the coalescing pause.
const COALESCE_BELOW: usize = 16;
/// The coalescing pause is taken only while the relay handles at least this many datagrams a
/// second (measured over [`RATE_WINDOW_MS`]). Below it a pause batches almost nothing (at 10,000
/// a second a 200 µs pause collects about two datagrams) but delays every reply that arrives
/// during it: a relayed round trip measured 502 µs p50 with the pause against coturn's 140 µs.
/// Above it (25,000 messages a second, 50,000 datagrams) the pause is what brings CPU per
/// packet from 9.6 to 5.7 µs (turn/README.md).
const COALESCE_MIN_RATE: u64 = 20_000;
const RATE_WINDOW_MS: u64 = 100;
/// Most segments in one GSO send (the kernel's `UDP_MAX_SEGMENTS` was 64 before Linux 6.9
/// raised it to 128).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send (an IP datagram holds at most 65,535 bytes, headers
/// included).
const GSO_MAX_BYTES: usize = 64_000;
/// A receive slot when GRO is on: the kernel coalesces up to 64 KiB into one buffer, and a
/// smaller buffer would truncate it (losing the segments past its end).
const GRO_BUF: usize = HEADROOM + 65_536 + TAIL;
/// Bytes of one send batch's arena (room for a full batch of GSO runs of ordinary packets).
const ARENA: usize = 256 * 1024;
/// Room for one control message carrying an int (`UDP_GRO`) or a u16 (`UDP_SEGMENT`).
type Ctrl64 = [u64; 8];
const TAG_LISTENER: u64 = 1 << 32;
const TAG_RELAY: u64 = 2 << 32;

/// Messages from the async side to the relay thread.
#[derive(Debug)]
pub(crate) enum Ctrl {
    Open {
        conn: u64,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    },
    Frame {
        conn: u64,
        addr: SocketAddr,
        data: Vec<u8>,
    },
    Closed {
        conn: u64,
        addr: SocketAddr,
    },
    Shutdown,
}

/// Wakes the relay thread (an eventfd).
#[derive(Debug, Clone)]
pub(crate) struct Waker {
    fd: Arc<OwnedFd>,
    tx: mpsc::Sender<Ctrl>,
}

impl Waker {
    pub(crate) fn send(&self, c: Ctrl) -> bool {
        if self.tx.send(c).is_err() {
            return false;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        true
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_add(epfd: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: plain syscall with a valid pointer.
    cvt(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
    Ok(())
}

fn epoll_del(epfd: RawFd, fd: RawFd) {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
}

/// Binds a non-blocking UDP socket with large buffers (IPv6 sockets are IPv6-only).
pub(crate) fn udp_socket(addr: SocketAddr, bufsize: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if bufsize > 0 {
        set_buffers(s.as_raw_fd(), bufsize);
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Asks for `size`-byte kernel buffers: the *FORCE options (which may exceed
/// net.core.rmem_max, but need CAP_NET_ADMIN), else the ordinary ones (capped by the sysctl).
pub fn set_buffers(fd: RawFd, size: usize) {
    let v = size.min(i32::MAX as usize) as libc::c_int;
    let p = &v as *const libc::c_int as *const libc::c_void;
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

/// Whether this kernel takes `UDP_SEGMENT` (Linux 4.18), probed on a throwaway socket: the
/// option set on a socket segments every send of that socket, which the relay never wants.
fn gso_supported() -> bool {
    let Ok(s) = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0")) else {
        return false;
    };
    setsockopt_int(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, 1200)
}

/// Turns `UDP_GRO` (Linux 5.0) on for `fd`; false when the kernel refuses it.
fn enable_gro(fd: RawFd) -> bool {
    setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1)
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: setsockopt with a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Points `h` at `ctrl` holding one `UDP_SEGMENT` control message for `seg`-byte segments.
fn set_gso(h: &mut libc::msghdr, ctrl: &mut Ctrl64, seg: u16) {
    *ctrl = [0; 8];
    h.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE(2) (24) fits the 64-byte, 8-aligned buffer; CMSG_FIRSTHDR is non-null
    // because msg_controllen covers a cmsghdr.
    unsafe {
        h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
    }
}

fn clear_ctrl(h: &mut libc::msghdr) {
    h.msg_control = std::ptr::null_mut();
    h.msg_controllen = 0;
}

/// The segment size of a GRO buffer, from its `UDP_GRO` control message.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    if h.msg_control.is_null() || h.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: the kernel filled msg_controllen bytes of our control buffer with cmsgs; the
    // CMSG_* walk stays inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return (v > 0).then_some(v as usize);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Sends `hdrs` on `fd` with `sendmmsg`. A message the kernel refuses is retried as single
/// datagrams when it was a GSO send (`EIO`, a device that cannot segment or checksum, also
/// turns `gso` off for good), else counted as dropped.
fn send_all(fd: RawFd, hdrs: &mut [libc::mmsghdr], gso: &mut bool, metrics: &Metrics) {
    let mut sent = 0;
    while sent < hdrs.len() {
        // SAFETY: the headers point at buffers, addresses and control data that outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[sent..].as_mut_ptr(),
                (hdrs.len() - sent) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            sent += r as usize;
            continue;
        }
        let h = &hdrs[sent].msg_hdr;
        if h.msg_controllen > 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EIO) {
                *gso = false;
            }
            // SAFETY: as above; the header describes one GSO message of ours.
            let failed = unsafe { send_segments(fd, h) };
            metrics.dropped_packets.fetch_add(failed, Relaxed);
        } else {
            // Buffer full, unreachable...: drop this datagram and go on.
            metrics.dropped_packets.fetch_add(1, Relaxed);
        }
        sent += 1;
    }
}

/// Sends a refused GSO message's segments one by one; returns how many failed.
///
/// # Safety
/// `h` must describe live buffers: `msg_iov` with `msg_iovlen` entries, `msg_name`, and a
/// `UDP_SEGMENT` control message.
unsafe fn send_segments(fd: RawFd, h: &libc::msghdr) -> u64 {
    // SAFETY: per the function's contract.
    let (iovs, seg) = unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        let seg = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const u16) as usize;
        (
            std::slice::from_raw_parts(h.msg_iov, h.msg_iovlen),
            seg.max(1),
        )
    };
    let mut failed = 0;
    for iov in iovs {
        let mut off = 0;
        while off < iov.iov_len {
            let len = if iovs.len() > 1 {
                iov.iov_len
            } else {
                seg.min(iov.iov_len - off)
            };
            // SAFETY: a slice of a live iovec, to the message's own address.
            let r = unsafe {
                libc::sendto(
                    fd,
                    (iov.iov_base as *const u8).add(off) as *const libc::c_void,
                    len,
                    libc::MSG_DONTWAIT,
                    h.msg_name as *const libc::sockaddr,
                    h.msg_namelen,
                )
            };
            if r < 0 {
                failed += 1;
            }
            off += len;
        }
    }
    failed
}

fn to_sockaddr(addr: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above for sockaddr_in6.
            let sin6 = unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in6) };
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
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Buffers for `recvmmsg`: BATCH slots of `slot` bytes (BUF, or GRO_BUF with GRO on).
struct RecvBatch {
    bufs: Vec<u8>,
    slot: usize,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<Ctrl64>,
    gro: bool,
}

impl RecvBatch {
    fn new(gro: bool) -> Self {
        let slot = if gro { GRO_BUF } else { BUF };
        let mut b = RecvBatch {
            bufs: vec![0u8; BATCH * slot],
            slot,
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0; 8]; BATCH],
            gro,
        };
        for i in 0..BATCH {
            b.iovs[i].iov_base = b.bufs[i * slot + HEADROOM..].as_mut_ptr() as *mut libc::c_void;
            b.iovs[i].iov_len = slot - HEADROOM - TAIL;
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = &mut b.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
        }
        b
    }

    /// Receives up to BATCH datagrams (or GRO buffers); payload i is at
    /// `slot(i)[HEADROOM..HEADROOM + len(i)]`.
    fn recv(&mut self, fd: RawFd) -> usize {
        for (h, c) in self.hdrs.iter_mut().zip(self.ctrl.iter_mut()) {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            if self.gro {
                h.msg_hdr.msg_control = c.as_mut_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_controllen = size_of::<Ctrl64>() as _;
            }
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
        if n < 0 { 0 } else { n as usize }
    }

    /// Datagram i: its source, its slot, its length and its segment size (the length itself
    /// unless GRO joined several datagrams of that size, the last one possibly shorter).
    fn datagram(&mut self, i: usize) -> Option<(SocketAddr, &mut [u8], usize, usize)> {
        let h = &self.hdrs[i].msg_hdr;
        if h.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let len = self.hdrs[i].msg_len as usize;
        let stride = if self.gro {
            gro_segment(h).unwrap_or(len).clamp(1, len.max(1))
        } else {
            len.max(1)
        };
        let from = from_sockaddr(&self.addrs[i])?;
        let slot = self.slot;
        Some((from, &mut self.bufs[i * slot..(i + 1) * slot], len, stride))
    }
}

/// One queued message of a [`SendBatch`]: `len` bytes at `off` in the arena, in segments of
/// `seg` bytes (the last may be shorter); `open` while another segment may join it.
#[derive(Clone, Copy)]
struct Queued {
    to: SocketAddr,
    off: usize,
    len: usize,
    seg: usize,
    open: bool,
}

/// Outgoing datagrams for one socket, flushed with `sendmmsg`; consecutive datagrams to one
/// destination join one GSO message while they have one size.
struct SendBatch {
    arena: Vec<u8>,
    used: usize,
    msgs: Vec<Queued>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<Ctrl64>,
    gso: bool,
}

impl SendBatch {
    fn new(gso: bool) -> Self {
        SendBatch {
            arena: vec![0u8; ARENA],
            used: 0,
            msgs: Vec::with_capacity(BATCH),
            // SAFETY: all-zero is valid for these C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0; 8]; BATCH],
            gso,
        }
    }

    fn pending(&self) -> bool {
        !self.msgs.is_empty()
    }

    /// Queues a datagram; returns false if it does not fit (send it directly instead).
    fn push(&mut self, fd: RawFd, data: &[u8], to: &SocketAddr, metrics: &Metrics) -> bool {
        let len = data.len();
        if len > GSO_MAX_BYTES {
            return false;
        }
        if self.gso
            && len > 0
            && self.used + len <= self.arena.len()
            && let Some(q) = self.msgs.last_mut()
            && q.open
            && q.to == *to
            && len <= q.seg
            && q.len / q.seg < GSO_MAX_SEGMENTS
            && q.len + len <= GSO_MAX_BYTES
        {
            self.arena[self.used..self.used + len].copy_from_slice(data);
            self.used += len;
            q.len += len;
            q.open = len == q.seg;
            return true;
        }
        if self.msgs.len() == BATCH || self.used + len > self.arena.len() {
            self.flush(fd, metrics);
        }
        self.arena[self.used..self.used + len].copy_from_slice(data);
        self.msgs.push(Queued {
            to: *to,
            off: self.used,
            len,
            seg: len,
            open: len > 0,
        });
        self.used += len;
        true
    }

    fn flush(&mut self, fd: RawFd, metrics: &Metrics) {
        let n = self.msgs.len();
        for (k, q) in self.msgs.iter().enumerate() {
            self.iovs[k].iov_base = self.arena[q.off..].as_ptr() as *mut libc::c_void;
            self.iovs[k].iov_len = q.len;
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_namelen = to_sockaddr(&q.to, &mut self.addrs[k]);
            h.msg_name = &mut self.addrs[k] as *mut _ as *mut libc::c_void;
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            if q.len > q.seg {
                set_gso(h, &mut self.ctrl[k], q.seg as u16);
                metrics
                    .gso_datagrams
                    .fetch_add(q.len.div_ceil(q.seg) as u64, Relaxed);
            } else {
                clear_ctrl(h);
            }
        }
        send_all(fd, &mut self.hdrs[..n], &mut self.gso, metrics);
        self.msgs.clear();
        self.used = 0;
    }
}

/// Client-to-peer datagrams of one receive batch, sent per relay socket (the payloads are read
/// in place from the receive buffer): one `send_to` for a lone datagram, else one `sendmmsg`
/// whose messages are runs to one peer, each a GSO message while its datagrams have one size.
pub(crate) struct PeerQueue {
    items: Vec<(RelayId, SocketAddr, usize, usize)>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<Ctrl64>,
    gso: bool,
}

impl PeerQueue {
    fn new(gso: bool) -> Self {
        PeerQueue {
            items: Vec::with_capacity(BATCH),
            addrs: Vec::new(),
            iovs: Vec::new(),
            hdrs: Vec::new(),
            ctrl: Vec::new(),
            gso,
        }
    }

    fn flush(&mut self, relays: &Relays, rx: &RecvBatch, metrics: &Metrics) {
        if self.items.is_empty() {
            return;
        }
        // Stable: each relay socket's datagrams keep their order.
        self.items.sort_by_key(|it| it.0);
        let n = self.items.len();
        if self.hdrs.len() < n {
            // Grows to the largest batch seen, then stays (GRO can make a batch of
            // BATCH x 64 segments).
            // SAFETY: all-zero is valid for these C structs.
            self.addrs.resize_with(n, || unsafe { zeroed() });
            self.iovs.resize_with(n, || unsafe { zeroed() });
            self.hdrs.resize_with(n, || unsafe { zeroed() });
            self.ctrl.resize(n, [0; 8]);
        }
        let mut i = 0;
        while i < n {
            let relay = self.items[i].0;
            let mut j = i;
            while j < n && self.items[j].0 == relay {
                j += 1;
            }
            let Some(Some(sock)) = relays.socks.get(relay as usize) else {
                i = j;
                continue;
            };
            if j - i == 1 {
                let (_, peer, off, len) = self.items[i];
                if sock.send_to(&rx.bufs[off..off + len], peer).is_err() {
                    metrics.dropped_packets.fetch_add(1, Relaxed);
                }
                i = j;
                continue;
            }
            let mut m = 0;
            let mut k = i;
            while k < j {
                let (_, peer, _, seg) = self.items[k];
                let mut e = k + 1;
                let mut total = seg;
                if self.gso && seg > 0 {
                    while e < j
                        && e - k < GSO_MAX_SEGMENTS
                        && self.items[e].1 == peer
                        && self.items[e - 1].3 == seg
                        && (1..=seg).contains(&self.items[e].3)
                        && total + self.items[e].3 <= GSO_MAX_BYTES
                    {
                        total += self.items[e].3;
                        e += 1;
                    }
                }
                for t in k..e {
                    let (_, _, off, len) = self.items[t];
                    self.iovs[t].iov_base = rx.bufs[off..].as_ptr() as *mut libc::c_void;
                    self.iovs[t].iov_len = len;
                }
                let h = &mut self.hdrs[m].msg_hdr;
                h.msg_namelen = to_sockaddr(&peer, &mut self.addrs[m]);
                h.msg_name = &mut self.addrs[m] as *mut _ as *mut libc::c_void;
                h.msg_iov = &mut self.iovs[k];
                h.msg_iovlen = (e - k) as _;
                if e - k > 1 {
                    set_gso(h, &mut self.ctrl[m], seg as u16);
                    metrics.gso_datagrams.fetch_add((e - k) as u64, Relaxed);
                } else {
                    clear_ctrl(h);
                }
                m += 1;
                k = e;
            }
            send_all(
                sock.as_raw_fd(),
                &mut self.hdrs[..m],
                &mut self.gso,
                metrics,
            );
            i = j;
        }
        self.items.clear();
    }
}

/// Relay sockets: bound in the configured port range and registered with epoll.
pub(crate) struct Relays {
    socks: Vec<Option<UdpSocket>>,
    free: Vec<RelayId>,
    used_ports: FxHashSet<(bool, u16)>,
    epfd: RawFd,
    ip4: Option<IpAddr>,
    ip6: Option<IpAddr>,
    /// Announced instead of the bound IP (1:1 NAT), per family.
    adv4: Option<IpAddr>,
    adv6: Option<IpAddr>,
    port_min: u16,
    port_max: u16,
    next: u32,
    bufsize: usize,
    /// `UDP_GRO` is set on every relay socket.
    gro: bool,
}

impl Relays {
    /// Registers a bound relay socket; returns its id and announced address.
    fn register(&mut self, s: UdpSocket, ipv6: bool) -> Result<(RelayId, SocketAddr), u16> {
        let mut addr = s.local_addr().map_err(|_| 500u16)?;
        let port = addr.port();
        if let Some(adv) = if ipv6 { self.adv6 } else { self.adv4 } {
            addr.set_ip(adv);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.socks.push(None);
                (self.socks.len() - 1) as RelayId
            }
        };
        if self.gro {
            enable_gro(s.as_raw_fd());
        }
        if epoll_add(self.epfd, s.as_raw_fd(), TAG_RELAY | id as u64).is_err() {
            self.free.push(id);
            return Err(500);
        }
        self.socks[id as usize] = Some(s);
        self.used_ports.insert((ipv6, port));
        Ok((id, addr))
    }

    /// Tries ports of the range, from a moving start, until `bind` succeeds (at most 64
    /// failed binds); `even` skips odd ports.
    fn search<T>(
        &mut self,
        ipv6: bool,
        even: bool,
        mut bind: impl FnMut(&Self, u16) -> Option<T>,
    ) -> Option<T> {
        let span = (self.port_max as u32).saturating_sub(self.port_min as u32) + 1;
        let mut failures = 0;
        for _ in 0..span {
            let port = (self.port_min as u32 + self.next % span) as u16;
            self.next = self.next.wrapping_add(1);
            if (even && port % 2 == 1) || self.used_ports.contains(&(ipv6, port)) {
                continue;
            }
            match bind(self, port) {
                Some(t) => return Some(t),
                None => {
                    failures += 1;
                    if failures > 64 {
                        break;
                    }
                }
            }
        }
        None
    }
}

impl RelaySockets for Relays {
    fn open(&mut self, ipv6: bool, even: bool) -> Result<(RelayId, SocketAddr), u16> {
        let ip = if ipv6 { self.ip6 } else { self.ip4 }.ok_or(440u16)?;
        let bufsize = self.bufsize;
        let s = self
            .search(ipv6, even, |_, port| {
                udp_socket(SocketAddr::new(ip, port), bufsize).ok()
            })
            .ok_or(508u16)?;
        self.register(s, ipv6)
    }

    fn open_pair(&mut self, ipv6: bool) -> Result<[(RelayId, SocketAddr); 2], u16> {
        let ip = if ipv6 { self.ip6 } else { self.ip4 }.ok_or(440u16)?;
        let bufsize = self.bufsize;
        let (a, b) = self
            .search(ipv6, true, |r, port| {
                if port >= r.port_max || r.used_ports.contains(&(ipv6, port + 1)) {
                    return None;
                }
                let a = udp_socket(SocketAddr::new(ip, port), bufsize).ok()?;
                let b = udp_socket(SocketAddr::new(ip, port + 1), bufsize).ok()?;
                Some((a, b))
            })
            .ok_or(508u16)?;
        let first = self.register(a, ipv6)?;
        match self.register(b, ipv6) {
            Ok(second) => Ok([first, second]),
            Err(e) => {
                self.close(first.0);
                Err(e)
            }
        }
    }

    fn close(&mut self, id: RelayId) {
        if let Some(slot) = self.socks.get_mut(id as usize)
            && let Some(s) = slot.take()
        {
            epoll_del(self.epfd, s.as_raw_fd());
            if let Ok(a) = s.local_addr() {
                self.used_ports.remove(&(a.is_ipv6(), a.port()));
            }
            self.free.push(id);
        }
    }
}

/// Everything the relay thread owns.
pub(crate) struct Engine {
    pub(crate) core: Core,
    pub(crate) relays: Relays,
    listeners: Vec<UdpSocket>,
    epfd: OwnedFd,
    evfd: Arc<OwnedFd>,
    ctrl: mpsc::Receiver<Ctrl>,
    streams: FxHashMap<u64, tokio::sync::mpsc::Sender<Vec<u8>>>,
    metrics: Arc<Metrics>,
    base_unix_ms: u64,
    start: Instant,
    coalesce: std::time::Duration,
    gso: bool,
    gro: bool,
}

/// Milliseconds since the epoch, monotonic after start.
fn now_ms(base: u64, start: Instant) -> u64 {
    base + start.elapsed().as_millis() as u64
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        core: Core,
        listeners: Vec<UdpSocket>,
        ip4: Option<IpAddr>,
        ip6: Option<IpAddr>,
        advertised: &[IpAddr],
        port_min: u16,
        port_max: u16,
        bufsize: usize,
        coalesce_us: u32,
        offload: bool,
        metrics: Arc<Metrics>,
    ) -> io::Result<(Engine, Waker)> {
        let gso = offload && gso_supported();
        // GRO on only if every listener takes it (each receive batch serves them all).
        let gro = offload && listeners.iter().all(|l| enable_gro(l.as_raw_fd()));
        if offload && !gro {
            for l in &listeners {
                setsockopt_int(l.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 0);
            }
        }
        // SAFETY: plain syscalls; the returned fds are owned below.
        let epfd = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let evfd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
            ))?)
        };
        epoll_add(epfd.as_raw_fd(), evfd.as_raw_fd(), TAG_CTRL)?;
        for (i, l) in listeners.iter().enumerate() {
            epoll_add(epfd.as_raw_fd(), l.as_raw_fd(), TAG_LISTENER | i as u64)?;
        }
        let (tx, rx) = mpsc::channel();
        let evfd = Arc::new(evfd);
        let relays = Relays {
            socks: Vec::new(),
            free: Vec::new(),
            used_ports: FxHashSet::default(),
            epfd: epfd.as_raw_fd(),
            ip4,
            ip6,
            adv4: advertised.iter().copied().find(|ip| ip.is_ipv4()),
            adv6: advertised.iter().copied().find(|ip| ip.is_ipv6()),
            port_min: port_min.min(port_max),
            port_max: port_max.max(port_min),
            next: rand::random::<u32>(),
            bufsize,
            gro,
        };
        let base_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok((
            Engine {
                core,
                relays,
                listeners,
                epfd,
                evfd: evfd.clone(),
                ctrl: rx,
                streams: FxHashMap::default(),
                metrics,
                base_unix_ms,
                start: Instant::now(),
                coalesce: std::time::Duration::from_micros(coalesce_us as u64),
                gso,
                gro,
            },
            Waker { fd: evfd, tx },
        ))
    }

    /// Runs until [`Ctrl::Shutdown`] (or every sender is gone).
    pub(crate) fn run(mut self) {
        let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut rx = RecvBatch::new(self.gro);
        let mut tx: Vec<SendBatch> = self
            .listeners
            .iter()
            .map(|_| SendBatch::new(self.gso))
            .collect();
        let mut pq = PeerQueue::new(self.gso);
        // One GRO segment copied out with headroom before it (see `relay_ready`).
        let mut scratch = vec![0u8; if self.gro { GRO_BUF } else { 0 }];
        let mut out = Vec::with_capacity(2048);
        let mut next_tick = now_ms(self.base_unix_ms, self.start) + 1000;
        if !self.coalesce.is_zero() {
            // Sleep as long as asked, not the default 50 us longer.
            // SAFETY: prctl on the calling thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        }
        let mut rate = RateGate::new(now_ms(self.base_unix_ms, self.start));
        'outer: loop {
            let now = now_ms(self.base_unix_ms, self.start);
            let timeout = next_tick.saturating_sub(now).min(1000) as libc::c_int;
            // SAFETY: events has room for len entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            let now = now_ms(self.base_unix_ms, self.start);
            let mut packets = 0;
            for ev in events.iter().take(n.max(0) as usize) {
                let token = ev.u64;
                let idx = (token & 0xFFFF_FFFF) as usize;
                match token & !0xFFFF_FFFF {
                    TAG_CTRL => {
                        if !self.control(now, &mut out) {
                            break 'outer;
                        }
                    }
                    TAG_LISTENER => {
                        packets +=
                            self.listener_ready(now, idx, &mut rx, &mut tx, &mut pq, &mut out)
                    }
                    _ => {
                        packets += self.relay_ready(
                            now,
                            idx as RelayId,
                            &mut rx,
                            &mut tx,
                            &mut scratch,
                            &mut out,
                        )
                    }
                }
            }
            for (i, b) in tx.iter_mut().enumerate() {
                if b.pending() {
                    b.flush(self.listeners[i].as_raw_fd(), &self.metrics);
                }
            }
            if now >= next_tick {
                self.core.tick(now, &mut self.relays);
                next_tick = now + 1000;
            }
            // Interrupt moderation: after a wake-up that found only a few datagrams, let the
            // next ones queue up for a moment so they are handled in one batch (one wake-up,
            // one epoll_wait and fewer sendmmsg calls for many packets). Under load batches
            // are full and this never sleeps; when idle, epoll_wait blocks as usual; at a light
            // load it would only add latency (`COALESCE_MIN_RATE`).
            let busy = rate.count(now, packets);
            if busy && packets > 0 && packets < COALESCE_BELOW && !self.coalesce.is_zero() {
                std::thread::sleep(self.coalesce);
            }
        }
        self.core.clear(&mut self.relays);
    }

    fn control(&mut self, now: u64, out: &mut Vec<u8>) -> bool {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our eventfd.
        unsafe {
            libc::read(
                self.evfd.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        loop {
            match self.ctrl.try_recv() {
                Ok(Ctrl::Open { conn, tx }) => {
                    self.streams.insert(conn, tx);
                }
                Ok(Ctrl::Frame { conn, addr, data }) => {
                    let client = Client {
                        transport: Transport::Stream { conn },
                        addr,
                    };
                    let t0 = is_allocate(&data).then(Instant::now);
                    match self
                        .core
                        .handle_client(now, client, &data, out, &mut self.relays)
                    {
                        Output::Nothing => {}
                        Output::Reply(b) => {
                            if let Some(tx) = self.streams.get(&conn) {
                                let _ = tx.try_send(b.to_vec());
                            }
                        }
                        Output::ToPeer { relay, peer, data } => {
                            send_relay(&self.relays, relay, peer, data, &self.metrics)
                        }
                    }
                    if let Some(t0) = t0 {
                        self.metrics
                            .allocate_latency(t0.elapsed().as_micros() as u64);
                    }
                }
                Ok(Ctrl::Closed { conn, addr }) => {
                    self.streams.remove(&conn);
                    let client = Client {
                        transport: Transport::Stream { conn },
                        addr,
                    };
                    self.core.client_closed(&client, &mut self.relays);
                }
                Ok(Ctrl::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Drains listening socket `li`; returns the datagrams handled (GRO segments counted
    /// one by one).
    fn listener_ready(
        &mut self,
        now: u64,
        li: usize,
        rx: &mut RecvBatch,
        tx: &mut [SendBatch],
        pq: &mut PeerQueue,
        out: &mut Vec<u8>,
    ) -> usize {
        let mut total = 0;
        let Some(sock) = self.listeners.get(li) else {
            return 0;
        };
        let fd = sock.as_raw_fd();
        let base = rx.bufs.as_ptr() as usize;
        for _round in 0..8 {
            let n = rx.recv(fd);
            for i in 0..n {
                let Some((from, slot, len, stride)) = rx.datagram(i) else {
                    continue;
                };
                if stride < len {
                    self.metrics
                        .gro_datagrams
                        .fetch_add(len.div_ceil(stride) as u64, Relaxed);
                }
                let client = Client {
                    transport: Transport::Udp {
                        listener: li as u16,
                    },
                    addr: from,
                };
                // Each GRO segment is the datagram it was; handle_client reads it in place.
                let mut at = 0;
                while at < len || (len == 0 && at == 0) {
                    let seg = stride.min(len - at);
                    let data = &slot[HEADROOM + at..HEADROOM + at + seg];
                    at += seg.max(1);
                    total += 1;
                    let t0 = is_allocate(data).then(Instant::now);
                    match self
                        .core
                        .handle_client(now, client, data, out, &mut self.relays)
                    {
                        Output::Nothing => {}
                        Output::Reply(b) => {
                            if !tx[li].push(fd, b, &from, &self.metrics) {
                                let _ = self.listeners[li].send_to(b, from);
                            }
                        }
                        Output::ToPeer { relay, peer, data } => {
                            // Payloads stay in the receive buffer; sent after the batch.
                            let off = data.as_ptr() as usize - base;
                            pq.items.push((relay, peer, off, data.len()));
                        }
                    }
                    if let Some(t0) = t0 {
                        self.metrics
                            .allocate_latency(t0.elapsed().as_micros() as u64);
                    }
                }
            }
            pq.flush(&self.relays, rx, &self.metrics);
            if n < BATCH {
                break;
            }
        }
        total
    }

    /// Drains relay socket `id`; returns the datagrams handled (GRO segments counted one by
    /// one).
    fn relay_ready(
        &mut self,
        now: u64,
        id: RelayId,
        rx: &mut RecvBatch,
        tx: &mut [SendBatch],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut total = 0;
        let Some(Some(sock)) = self.relays.socks.get(id as usize) else {
            return 0;
        };
        let fd = sock.as_raw_fd();
        for _round in 0..4 {
            let n = rx.recv(fd);
            for i in 0..n {
                let Some((from, slot, len, stride)) = rx.datagram(i) else {
                    continue;
                };
                if stride >= len {
                    total += 1;
                    self.peer_datagram(now, id, from, slot, len, tx, out);
                    continue;
                }
                // A GRO buffer. handle_peer frames ChannelData in the 4 bytes before its
                // payload and pads stream frames after it, which here are the neighbouring
                // segments: each segment is copied out with headroom first.
                self.metrics
                    .gro_datagrams
                    .fetch_add(len.div_ceil(stride) as u64, Relaxed);
                let mut at = 0;
                while at < len {
                    let seg = stride.min(len - at);
                    scratch[HEADROOM..HEADROOM + seg]
                        .copy_from_slice(&slot[HEADROOM + at..HEADROOM + at + seg]);
                    at += seg;
                    total += 1;
                    self.peer_datagram(now, id, from, scratch, seg, tx, out);
                }
            }
            if n < BATCH {
                break;
            }
        }
        total
    }

    /// One datagram from a peer, `len` bytes at `buf[HEADROOM..]`: relayed to its client.
    #[allow(clippy::too_many_arguments)]
    fn peer_datagram(
        &mut self,
        now: u64,
        id: RelayId,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
        tx: &mut [SendBatch],
        out: &mut Vec<u8>,
    ) {
        let Some((client, bytes)) = self.core.handle_peer(now, id, from, buf, len, out) else {
            return;
        };
        match client.transport {
            Transport::Udp { listener } => {
                let li = listener as usize;
                if let Some(l) = self.listeners.get(li)
                    && !tx[li].push(l.as_raw_fd(), bytes, &client.addr, &self.metrics)
                {
                    let _ = l.send_to(bytes, client.addr);
                }
            }
            Transport::Stream { conn } => {
                if let Some(s) = self.streams.get(&conn)
                    && s.try_send(bytes.to_vec()).is_err()
                {
                    self.metrics.dropped_packets.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// Whether the datagram rate of the last complete window reached [`COALESCE_MIN_RATE`].
struct RateGate {
    window_start: u64,
    packets: u64,
    busy: bool,
}

impl RateGate {
    fn new(now_ms: u64) -> Self {
        RateGate {
            window_start: now_ms,
            packets: 0,
            busy: false,
        }
    }

    /// Counts `packets` handled at `now_ms`; true while the load is high.
    fn count(&mut self, now_ms: u64, packets: usize) -> bool {
        self.packets += packets as u64;
        let elapsed = now_ms.saturating_sub(self.window_start);
        if elapsed >= RATE_WINDOW_MS {
            self.busy = self.packets * 1000 / elapsed >= COALESCE_MIN_RATE;
            self.window_start = now_ms;
            self.packets = 0;
        }
        self.busy
    }
}

#[inline]
fn is_allocate(data: &[u8]) -> bool {
    data.len() >= 2 && data[0] == 0 && data[1] == 3
}

#[inline]
fn send_relay(relays: &Relays, relay: RelayId, peer: SocketAddr, data: &[u8], metrics: &Metrics) {
    if let Some(Some(s)) = relays.socks.get(relay as usize)
        && s.send_to(data, peer).is_err()
    {
        metrics.dropped_packets.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause is allowed only after a window at or above the rate, and stops after a
    /// window below it.
    #[test]
    fn coalescing_follows_the_datagram_rate() {
        let mut gate = RateGate::new(0);
        // 10 datagrams a millisecond (10,000/s) for 300 ms: light.
        assert!((1..=300).all(|ms| !gate.count(ms, 10)));
        // 50 a millisecond (50,000/s): busy from the end of the first full window.
        let busy: Vec<bool> = (301..=600).map(|ms| gate.count(ms, 50)).collect();
        assert!(!busy[0] && busy[150..].iter().all(|b| *b));
        // A second idle (one wake-up at the end): light again.
        assert!(!gate.count(1600, 1));
    }
}

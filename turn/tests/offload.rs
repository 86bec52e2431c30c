//! UDP segmentation offload on real loopback sockets. A burst sent with `UDP_SEGMENT` (GSO)
//! crosses loopback as one buffer and reaches a socket with `UDP_GRO` whole, so these tests
//! hand the relay GRO buffers on both of its receive paths (the listener and a relay socket)
//! and check that every datagram comes out, in order, byte for byte, and, with offload on,
//! that the relay's own sends of those bursts were GSO sends. The same bursts with
//! `udp-offload = false` must give the same datagrams (the kernel splits them on receipt).

mod common;

use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bedside_turn::stun;
use common::*;

const BURST: usize = 41;

/// Whether this kernel takes `UDP_SEGMENT` (Linux 4.18).
fn gso_available() -> bool {
    let s = StdUdp::bind("127.0.0.1:0").unwrap();
    let v: libc::c_int = 1200;
    // SAFETY: setsockopt with a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            &v as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Sends `segments` (all of the first one's size but the last, which may be shorter) as one
/// GSO message to `to` (or on a connected socket with `to` None).
fn gso_send(fd: RawFd, to: Option<SocketAddr>, segments: &[Vec<u8>]) {
    let seg = segments[0].len() as u16;
    let data: Vec<u8> = segments.concat();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut ctrl = [0u64; 8];
    // SAFETY: zeroed msghdr and sockaddr are valid; every pointer below lives until sendmsg
    // returns; the control buffer is 64 bytes, 8-aligned, more than CMSG_SPACE(2).
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut h: libc::msghdr = std::mem::zeroed();
        if let Some(SocketAddr::V4(a)) = to {
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_port = a.port().to_be();
            addr.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            h.msg_name = &mut addr as *mut _ as *mut libc::c_void;
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
        h.msg_controllen = libc::CMSG_SPACE(2) as _;
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        let r = libc::sendmsg(fd, &h, 0);
        assert_eq!(
            r,
            data.len() as isize,
            "GSO send: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// BURST payloads: `len` bytes each, the last one `len / 2`, each stamped with its index.
fn payloads(len: usize, tag: u8) -> Vec<Vec<u8>> {
    (0..BURST)
        .map(|i| {
            let n = if i == BURST - 1 { len / 2 } else { len };
            let mut p: Vec<u8> = (0..n).map(|k| (k as u8) ^ tag).collect();
            p[0] = i as u8;
            p[1] = tag;
            p
        })
        .collect()
}

fn channel_data(ch: u16, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    stun::ChannelData { channel: ch, data }.encode(&mut b, false);
    b
}

/// Peer -> relay as one GSO burst; the client must get every payload as ChannelData, in order.
async fn burst_to_client(c: &mut Client, peer: &StdUdp, relayed: SocketAddr, len: usize) {
    let back = payloads(len, 0x5A);
    gso_send(peer.as_raw_fd(), Some(relayed), &back);
    for (i, want) in back.iter().enumerate() {
        let b = c.recv().await;
        let cd = stun::ChannelData::parse(&b).expect("ChannelData");
        assert_eq!(cd.channel, 0x4001);
        assert_eq!(
            cd.data,
            &want[..],
            "datagram {i} of the burst to the client"
        );
    }
}

async fn udp_bursts_both_ways(offload: bool) {
    if !gso_available() {
        skip("this kernel has no UDP_SEGMENT (GSO needs Linux 4.18)");
        return;
    }
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    cfg.udp_offload = offload;
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let peer = StdUdp::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let p = peer.local_addr().unwrap();
    let mut c = udp_client(h.udp_addrs()[0], "gso").await;
    let relayed = c.allocate().await;
    assert_eq!(c.channel_bind(0x4001, p).await, None);

    // Client -> relay: 41 ChannelData messages in one GSO send (one GRO buffer at the relay).
    let out = payloads(200, 0xA5);
    let frames: Vec<Vec<u8>> = out.iter().map(|d| channel_data(0x4001, d)).collect();
    let Link::Udp(s) = &c.link else {
        unreachable!()
    };
    gso_send(s.as_raw_fd(), None, &frames);
    let mut buf = [0u8; 2048];
    for (i, want) in out.iter().enumerate() {
        let (n, from) = peer.recv_from(&mut buf).expect("a datagram at the peer");
        assert_eq!(from, relayed);
        assert_eq!(
            &buf[..n],
            &want[..],
            "datagram {i} of the burst to the peer"
        );
    }
    burst_to_client(&mut c, &peer, relayed, 1200).await;

    let m = h.metrics().snapshot();
    assert_eq!(m.relayed_packets, 2 * BURST as u64);
    if offload {
        assert_eq!(
            m.gro_datagrams,
            2 * BURST as u64,
            "both bursts read as GRO buffers"
        );
        assert_eq!(
            m.gso_datagrams,
            2 * BURST as u64,
            "both bursts sent with GSO"
        );
    } else {
        assert_eq!((m.gro_datagrams, m.gso_datagrams), (0, 0));
    }
    h.shutdown();
    h.join().await;
}

#[tokio::test]
async fn a_udp_burst_is_relayed_whole_and_in_order_with_gso_and_gro() {
    udp_bursts_both_ways(true).await;
}

#[tokio::test]
async fn the_same_bursts_are_relayed_alike_with_offload_off() {
    udp_bursts_both_ways(false).await;
}

/// A GRO buffer from a peer to a TCP client: each segment is framed and padded on its own
/// (the padding must not overwrite the next segment).
#[tokio::test]
async fn a_gro_burst_to_a_tcp_client_is_framed_and_padded_per_datagram() {
    if !gso_available() {
        skip("this kernel has no UDP_SEGMENT (GSO needs Linux 4.18)");
        return;
    }
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let peer = StdUdp::bind("127.0.0.1:0").unwrap();
    let p = peer.local_addr().unwrap();
    let mut c = tcp_client(h.tcp_addrs()[0], "gro-tcp").await;
    let relayed = c.allocate().await;
    assert_eq!(c.channel_bind(0x4001, p).await, None);
    // 201 bytes: each frame needs 3 bytes of padding.
    burst_to_client(&mut c, &peer, relayed, 201).await;
    assert_eq!(h.metrics().snapshot().gro_datagrams, BURST as u64);
    h.shutdown();
    h.join().await;
}

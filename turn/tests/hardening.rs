//! Relay policy under attack, on real loopback sockets: idle and over-cap TCP connections are
//! closed, while an honest TCP client on the same relay keeps working; the relay's host
//! addresses are known to the peer policy.

mod common;

use std::time::{Duration, Instant};

use bedside_turn::stun::method;
use common::*;
use tokio::io::AsyncReadExt;

/// Whether the server closed `s` (a read returns end of stream or an error) within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn idle_and_over_cap_tcp_connections_are_closed_and_a_client_keeps_working() {
    let mut cfg = config();
    cfg.stream_idle_timeout_secs = 2;
    cfg.max_stream_connections_per_source = 20;
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let addr = h.tcp_addrs()[0];
    let mut idle = Vec::new();
    for _ in 0..19 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The honest client takes the twentieth place and keeps sending.
    let mut honest = tcp_client(addr, "honest").await;
    assert_eq!(honest.request(method::BINDING, &|_| {}).await.code(), None);
    // Beyond the per-source cap a connection is closed at once.
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    // The idle ones go within the timeout (and a margin); the honest one is still served.
    let started = Instant::now();
    let watch_idle = async {
        let mut closed = 0;
        for s in &mut idle {
            if closed_within(s, Duration::from_secs(5)).await {
                closed += 1;
            }
        }
        (closed, started.elapsed())
    };
    let keep_talking = async {
        for _ in 0..8 {
            assert_eq!(honest.request(method::BINDING, &|_| {}).await.code(), None);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let ((closed, took), ()) = tokio::join!(watch_idle, keep_talking);
    println!(
        "19 idle TURN TCP connections: {closed} closed within {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(closed, 19);
    assert_eq!(honest.request(method::BINDING, &|_| {}).await.code(), None);
    h.shutdown();
    h.join().await;
}

#[test]
fn the_host_addresses_include_loopback() {
    let own = bedside_turn::host_addresses();
    assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
}

/// Unauthenticated requests a forger would send in a victim's name: a bare Allocate (20 bytes),
/// webrtc-rs's first Allocate (REQUESTED-TRANSPORT and FINGERPRINT, 36 bytes), a Refresh with
/// no allocation, and a request with an unknown comprehension-required attribute (420).
fn forged_requests() -> Vec<Vec<u8>> {
    use bedside_turn::stun::{Builder, Class, attr};
    let build = |m: u16, i: u8, f: &dyn Fn(&mut Builder)| {
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, m, Class::Request, &[i; 12]);
        f(&mut b);
        b.finish(None, i % 2 == 1);
        buf
    };
    vec![
        build(method::ALLOCATE, 2, &|_| {}),
        build(method::ALLOCATE, 1, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        }),
        build(method::REFRESH, 4, &|_| {}),
        build(method::ALLOCATE, 6, &|b| {
            b.attr(0x0077, &[0; 4]);
        }),
    ]
}

#[tokio::test]
async fn unauthenticated_replies_reflect_no_more_than_was_sent_and_clients_still_allocate() {
    let h = bedside_turn::start(config(), std::future::pending())
        .await
        .unwrap();
    let addr = h.udp_addrs()[0];
    let forger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    forger.connect(addr).await.unwrap();
    let requests = forged_requests();
    // One of each first: what a single exchange reflects.
    let mut single = Vec::new();
    for r in &requests {
        forger.send(r).await.unwrap();
        let mut b = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(2), forger.recv(&mut b))
            .await
            .expect("the first challenge is answered")
            .unwrap();
        single.push((r.len(), n));
    }
    // Then a flood, paced so that loopback drops nothing, while a reader counts what comes back.
    let forger = std::sync::Arc::new(forger);
    let reader = {
        let forger = forger.clone();
        tokio::spawn(async move {
            let (mut bytes, mut replies) = (0usize, 0usize);
            let mut b = [0u8; 1500];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), forger.recv(&mut b)).await
            {
                bytes += n;
                replies += 1;
            }
            (bytes, replies)
        })
    };
    let started = Instant::now();
    let mut sent = single.iter().map(|s| s.0).sum::<usize>();
    let received_single = single.iter().map(|s| s.1).sum::<usize>();
    const FLOOD: usize = 4_000;
    for i in 0..FLOOD {
        let r = &requests[i % requests.len()];
        forger.send(r).await.unwrap();
        sent += r.len();
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let flood = started.elapsed();
    let (bytes, replies) = reader.await.unwrap();
    let received = received_single + bytes;
    let allowance = bedside_turn::core::UNAUTH_EXCESS_BURST as f64
        + bedside_turn::core::UNAUTH_EXCESS_PER_SEC as f64 * (flood.as_secs_f64() + 1.0);
    println!(
        "single unauthenticated exchanges (request -> reply bytes): {single:?}; flood of {FLOOD} \
         requests in {:.2} s: {sent} bytes in, {received} bytes out in {replies} replies \
         (ratio {:.2}; the allowance is {allowance:.0} bytes)",
        flood.as_secs_f64(),
        received as f64 / sent as f64
    );
    assert!(
        (received as f64) <= sent as f64 + allowance,
        "{received} bytes reflected for {sent}"
    );
    assert!(
        replies > 0,
        "replies that fit within their request still go"
    );
    // An honest client on another address allocates at once, and one on the flooded address as
    // soon as its allowance has refilled a little.
    let other = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.connect(addr).await.unwrap();
    let mut honest = Client::new(Link::Udp(other), "honest");
    honest.allocate().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut neighbour = udp_client(addr, "neighbour").await;
    neighbour.allocate().await;
    h.shutdown();
    h.join().await;
}

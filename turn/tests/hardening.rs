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

//! Real sockets on 127.0.0.1, port 0: STUN, TURN over UDP/TCP/TLS, denied peers, shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bedside_turn::stun::{self, Message, attr, method};
use common::*;
use tokio::net::UdpSocket;

#[tokio::test]
async fn binding_over_udp_and_tcp() {
    let h = bedside_turn::start(config(), std::future::pending())
        .await
        .unwrap();
    for mut c in [
        udp_client(h.udp_addrs()[0], "b").await,
        tcp_client(h.tcp_addrs()[0], "b").await,
    ] {
        let r = c.request(method::BINDING, &|_| {}).await;
        assert_eq!(r.code(), None);
        let mapped = r.addr(attr::XOR_MAPPED_ADDRESS);
        assert_eq!(mapped.ip().to_string(), "127.0.0.1");
        assert_ne!(mapped.port(), 0);
    }
    assert_eq!(h.metrics().snapshot().binding_requests, 2);
    h.shutdown();
    tokio::time::timeout(Duration::from_secs(5), h.join())
        .await
        .expect("join after shutdown");
}

#[tokio::test]
async fn loopback_peers_refused_by_default() {
    let h = bedside_turn::start(config(), std::future::pending())
        .await
        .unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let p = peer.local_addr().unwrap();
    for mut c in [
        udp_client(h.udp_addrs()[0], "d").await,
        tcp_client(h.tcp_addrs()[0], "d").await,
    ] {
        let relayed = c.allocate().await;
        assert_eq!(relayed.ip().to_string(), "127.0.0.1");
        assert_eq!(c.create_permission(p).await, Some(403));
        assert_eq!(c.channel_bind(0x4000, p).await, Some(403));
        // An IPv6 peer on an IPv4 relay is a family mismatch.
        assert_eq!(
            c.create_permission("[::ffff:127.0.0.1]:9".parse().unwrap())
                .await,
            Some(443)
        );
        assert_eq!(
            c.create_permission("10.0.0.1:9".parse().unwrap()).await,
            Some(403)
        );
        // The relay's own address is refused too.
        assert_eq!(c.create_permission(relayed).await, Some(403));
    }
    assert!(h.metrics().errors_with(403) >= 8);
    h.shutdown();
    h.join().await;
}

async fn relay_round_trip(mut c: Client) {
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let p = peer.local_addr().unwrap();
    let relayed = c.allocate().await;
    // Before any permission the peer's packets are dropped.
    peer.send_to(b"too early", relayed).await.unwrap();
    // Let the relay thread see (and drop) it before the permission exists.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.create_permission(p).await, None);
    // Send indication -> peer; peer -> Data indication.
    c.send_indication(p, b"via send").await;
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"via send");
    assert_eq!(from, relayed);
    peer.send_to(b"data back", relayed).await.unwrap();
    let b = c.recv().await;
    let m = Message::parse(&b).unwrap();
    assert_eq!(m.method, method::DATA);
    assert_eq!(m.get(attr::DATA), Some(&b"data back"[..]));
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(p)));
    // Channel both ways, with a 1200-byte payload.
    assert_eq!(c.channel_bind(0x4001, p).await, None);
    let payload: Vec<u8> = (0..1200u32).map(|i| i as u8).collect();
    c.send_channel(0x4001, &payload).await;
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], &payload[..]);
    peer.send_to(&payload[..1199], relayed).await.unwrap();
    let b = c.recv().await;
    let cd = stun::ChannelData::parse(&b).unwrap();
    assert_eq!(cd.channel, 0x4001);
    assert_eq!(cd.data, &payload[..1199]);
    // Refresh with lifetime 0 releases the allocation and its port.
    let r = c
        .request(method::REFRESH, &|b| {
            b.attr_u32(attr::LIFETIME, 0);
        })
        .await;
    assert_eq!(r.code(), None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    UdpSocket::bind(relayed).await.expect("relay port released");
}

#[tokio::test]
async fn relays_udp_and_tcp_clients_with_loopback_allowed() {
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    relay_round_trip(udp_client(h.udp_addrs()[0], "r1").await).await;
    relay_round_trip(tcp_client(h.tcp_addrs()[0], "r2").await).await;
    let s = h.metrics().snapshot();
    assert_eq!(s.relayed_packets, 8);
    assert_eq!(s.allocations_total, 2);
    assert_eq!(s.active_allocations, 0);
    assert!(s.dropped_packets >= 2);
    h.shutdown();
    h.join().await;
}

#[tokio::test]
async fn tcp_close_releases_allocation() {
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let mut c = tcp_client(h.tcp_addrs()[0], "t").await;
    c.allocate().await;
    assert_eq!(h.metrics().snapshot().active_allocations, 1);
    drop(c);
    for _ in 0..100 {
        if h.metrics().snapshot().active_allocations == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.metrics().snapshot().active_allocations, 0);
    h.shutdown();
    h.join().await;
}

#[tokio::test]
async fn tls_client_allocates_and_relays() {
    let dir = std::env::temp_dir().join(format!("bedside-turn-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    cfg.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.tls_cert = Some(cert_path);
    cfg.tls_key = Some(key_path);
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let tcp = tokio::net::TcpStream::connect(h.tls_addrs()[0])
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let c = Client::new(Link::Stream(Box::new(tls)), "tls-user");
    relay_round_trip(c).await;
    h.shutdown();
    h.join().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shutdown_future_stops_the_relay() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = bedside_turn::start(config(), async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    let udp = h.udp_addrs()[0];
    let mut c = udp_client(udp, "s").await;
    c.allocate().await;
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), h.join())
        .await
        .expect("stopped");
    // The listening port is free again.
    UdpSocket::bind(udp).await.expect("port released");
}

#[tokio::test]
async fn bad_config_is_an_error() {
    let mut cfg = config();
    cfg.auth_secret.clear();
    assert!(matches!(
        bedside_turn::start(cfg, std::future::pending()).await,
        Err(bedside_turn::TurnError::Config(_))
    ));
    let mut cfg = config();
    cfg.allowed_peers = vec!["not-a-cidr".into()];
    assert!(
        bedside_turn::start(cfg, std::future::pending())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn ipv6_relay_refuses_mapped_loopback_and_relays_over_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        println!("SKIP: no IPv6 loopback on this machine");
        return;
    }
    let mut cfg = config();
    cfg.listen_udp = vec!["[::1]:0".parse().unwrap()];
    cfg.listen_tcp = vec![];
    cfg.relay_ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    s.connect(h.udp_addrs()[0]).await.unwrap();
    let mut c = Client::new(Link::Udp(s), "six");
    let r = c
        .request(method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        })
        .await;
    assert_eq!(r.code(), None);
    assert!(r.addr(attr::XOR_RELAYED_ADDRESS).is_ipv6());
    for denied in [
        "[::ffff:127.0.0.1]:9",
        "[::1]:9",
        "[fd00::1]:9",
        "[fe80::1]:9",
        "[::ffff:10.0.0.1]:9",
        // IPv4-translated, NAT64 and local-use NAT64 forms of loopback and private addresses.
        "[::ffff:0:127.0.0.1]:9",
        "[::ffff:0:10.0.0.1]:9",
        "[64:ff9b::7f00:1]:9",
        "[64:ff9b:1::7f00:1]:9",
        "[64:ff9b:1:7f00:1::]:9",
    ] {
        assert_eq!(
            c.create_permission(denied.parse().unwrap()).await,
            Some(403),
            "{denied}"
        );
    }
    h.shutdown();
    h.join().await;
    // With loopback allowed, data flows over IPv6.
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    cfg.listen_udp = vec!["[::1]:0".parse().unwrap()];
    cfg.listen_tcp = vec![];
    cfg.relay_ips = vec!["::1".parse().unwrap()];
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    s.connect(h.udp_addrs()[0]).await.unwrap();
    let mut c = Client::new(Link::Udp(s), "six");
    let r = c
        .request(method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        })
        .await;
    let relayed = r.addr(attr::XOR_RELAYED_ADDRESS);
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let p = peer.local_addr().unwrap();
    assert_eq!(c.channel_bind(0x4abc, p).await, None);
    c.send_channel(0x4abc, b"over six").await;
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"over six"[..], relayed));
    h.shutdown();
    h.join().await;
}

#[tokio::test]
async fn advertised_relay_address_for_nat() {
    let mut cfg = config();
    cfg.relay_advertised_ips = vec!["203.0.113.50".parse().unwrap()];
    let h = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let mut c = udp_client(h.udp_addrs()[0], "nat").await;
    let relayed = c.allocate().await;
    assert_eq!(relayed.ip().to_string(), "203.0.113.50");
    // The announced address is the relay's own: refused as a peer.
    assert_eq!(c.create_permission(relayed).await, Some(403));
    h.shutdown();
    h.join().await;
}

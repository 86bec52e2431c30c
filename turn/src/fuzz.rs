//! Fuzzing entry points, for the targets in `fuzz/` and the corpus run in
//! `tests/fuzz_corpus.rs`. Built only with the `fuzzing` feature: nothing here is the relay's
//! API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::core::{Core, CoreConfig};
use crate::{Metrics, TurnConfig, auth, rest_credentials, stun};

/// Fuzzing entry: parses `data` as STUN and as ChannelData and walks every attribute.
pub fn fuzz_parse_stun(data: &[u8]) {
    if let Ok(m) = stun::Message::parse(data) {
        for a in m.attrs() {
            let _ = stun::decode_xor_addr(a.value, &m.tid);
            let _ = stun::parse_error_code(a.value);
        }
        let _ = m.check_integrity(b"key");
        let _ = m.unknown_required(&[]).count();
    }
    let _ = stun::stream_frame_len(data);
}

/// Fuzzing entry: ChannelData framing plus a relay core fed `data` as client messages and as
/// peer datagrams (the first byte picks the split).
pub fn fuzz_channel_data(data: &[u8]) {
    let _ = stun::ChannelData::parse(data);
    fuzz_core(data);
}

/// Fuzzing entry: drives a [`core::Core`] with arbitrary client and peer input, after setting
/// up authenticated allocations (with a permission and a channel) so the input reaches the
/// relaying paths, not only the authentication checks.
pub fn fuzz_core(data: &[u8]) {
    use crate::core::{Client, RelayId, RelaySockets, Transport};
    use crate::stun::{Builder, Class, attr, method};
    struct Fake(u32);
    impl RelaySockets for Fake {
        fn open(&mut self, ipv6: bool, _even: bool) -> Result<(RelayId, SocketAddr), u16> {
            self.0 += 1;
            let ip: IpAddr = if ipv6 {
                "2001:db8::1".parse().expect("ip")
            } else {
                "192.0.2.1".parse().expect("ip")
            };
            Ok((self.0, SocketAddr::new(ip, 50000 + self.0 as u16)))
        }
        fn close(&mut self, _: RelayId) {}
    }
    const NOW: u64 = 1_800_000_000_000;
    let cfg = TurnConfig {
        auth_secret: "fuzz".into(),
        allow_loopback_peers: true,
        ..Default::default()
    };
    let Ok(cc) = CoreConfig::from_config(&cfg, vec![]) else {
        return;
    };
    let mut core = Core::new(cc, [1; 32], Arc::new(Metrics::default()));
    let mut relays = Fake(0);
    let mut out = Vec::new();
    let udp = Client {
        transport: Transport::Udp { listener: 0 },
        addr: "198.51.100.1:4000".parse().expect("addr"),
    };
    let stream = Client {
        transport: Transport::Stream { conn: 1 },
        addr: "198.51.100.2:4000".parse().expect("addr"),
    };
    let peer: SocketAddr = "203.0.113.9:9".parse().expect("addr");
    let (username, password) =
        rest_credentials("fuzz", "f", std::time::Duration::from_secs(60), NOW / 1000);
    let key = auth::long_term_key(&username, "bedside", &password);
    for c in [udp, stream] {
        let nonce = auth::NonceKey::new([1; 32]).make(NOW, c.addr.ip());
        let mut tid = [0u8; 12];
        for (m, add) in [
            (
                method::ALLOCATE,
                &(|b: &mut Builder| {
                    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                }) as &dyn Fn(&mut Builder),
            ),
            (method::CREATE_PERMISSION, &|b: &mut Builder| {
                b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
            }),
            (method::CHANNEL_BIND, &|b: &mut Builder| {
                b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0]);
                b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
            }),
        ] {
            tid[0] += 1;
            let mut req = Vec::new();
            let mut b = Builder::new(&mut req, m, Class::Request, &tid);
            add(&mut b);
            b.attr(attr::USERNAME, username.as_bytes());
            b.attr(attr::REALM, b"bedside");
            b.attr(attr::NONCE, nonce.as_bytes());
            b.finish(Some(&key), true);
            let _ = core.handle_client(NOW, c, &req, &mut out, &mut relays);
        }
    }
    debug_assert_eq!(core.allocation_count(), 2);
    let split = data
        .first()
        .map(|b| *b as usize)
        .unwrap_or(0)
        .min(data.len());
    let (a, b) = data.split_at(split);
    for (i, chunk) in [a, b, data].into_iter().enumerate() {
        let c = if i == 1 { stream } else { udp };
        let _ = core.handle_client(NOW + i as u64, c, chunk, &mut out, &mut relays);
        let mut buf = vec![0u8; chunk.len() + 8];
        buf[4..4 + chunk.len()].copy_from_slice(chunk);
        let relay = 1 + (i as u32 % 2);
        let _ = core.handle_peer(NOW, relay, peer, &mut buf, chunk.len(), &mut out);
    }
    core.tick(NOW + 400_000, &mut relays);
    core.tick(u64::MAX / 2, &mut relays);
    debug_assert_eq!(core.allocation_count(), 0);
}

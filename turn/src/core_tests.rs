//! Unit tests of the sans-IO core with a fake clock and fake relay sockets.

use super::*;
use crate::auth::rest_credentials;
use crate::stun::parse_error_code;

const SECRET: &str = "s3cret";
const T0: u64 = 1_800_000_000_000; // ms since epoch

#[derive(Default)]
struct FakeRelays {
    next: u32,
    open: Vec<RelayId>,
    closed: Vec<RelayId>,
    no_v6: bool,
}

impl RelaySockets for FakeRelays {
    fn open(&mut self, ipv6: bool, _even: bool) -> Result<(RelayId, SocketAddr), u16> {
        if ipv6 && self.no_v6 {
            return Err(440);
        }
        let id = self.next;
        self.next += 1;
        self.open.push(id);
        let ip: IpAddr = if ipv6 {
            "2001:db8::7".parse().unwrap()
        } else {
            "203.0.113.7".parse().unwrap()
        };
        Ok((id, SocketAddr::new(ip, 50000 + id as u16)))
    }
    fn open_pair(&mut self, ipv6: bool) -> Result<[(RelayId, SocketAddr); 2], u16> {
        let (a, addr) = self.open(ipv6, true)?;
        let (b, _) = self.open(ipv6, true)?;
        Ok([(a, addr), (b, SocketAddr::new(addr.ip(), addr.port() + 1))])
    }
    fn close(&mut self, id: RelayId) {
        self.open.retain(|x| *x != id);
        self.closed.push(id);
    }
}

fn config() -> TurnConfig {
    TurnConfig {
        auth_secret: SECRET.into(),
        realm: "bedside".into(),
        user_quota: 2,
        total_quota: 3,
        ..Default::default()
    }
}

fn core_with(cfg: TurnConfig) -> Core {
    let own = vec!["203.0.113.7".parse().unwrap()];
    Core::new(
        CoreConfig::from_config(&cfg, own).unwrap(),
        [3; 32],
        Arc::new(Metrics::default()),
    )
}

fn udp_client(port: u16) -> Client {
    Client {
        transport: Transport::Udp { listener: 0 },
        addr: SocketAddr::new("198.51.100.10".parse().unwrap(), port),
    }
}

/// A test TURN client: remembers nonce and key like a real one.
struct TestClient {
    client: Client,
    username: String,
    password: String,
    nonce: Option<Vec<u8>>,
    tid: u8,
}

impl TestClient {
    fn new(client: Client, user: &str) -> Self {
        let (username, password) =
            rest_credentials(SECRET, user, Duration::from_secs(3600), T0 / 1000);
        TestClient {
            client,
            username,
            password,
            nonce: None,
            tid: 0,
        }
    }

    fn build(&mut self, method: u16, attrs: &dyn Fn(&mut Builder), sign: bool) -> Vec<u8> {
        self.tid += 1;
        let tid = [self.tid; 12];
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, method, Class::Request, &tid);
        attrs(&mut b);
        let key = if sign {
            b.attr(attr::USERNAME, self.username.as_bytes());
            b.attr(attr::REALM, b"bedside");
            b.attr(attr::NONCE, self.nonce.as_deref().unwrap_or(b"none"));
            Some(auth::long_term_key(
                &self.username,
                "bedside",
                &self.password,
            ))
        } else {
            None
        };
        b.finish(key.as_ref().map(|k| &k[..]), true);
        buf
    }

    /// Sends, handling 401/438 challenges once like a real client; returns the final response.
    fn request(
        &mut self,
        core: &mut Core,
        now: u64,
        relays: &mut FakeRelays,
        method: u16,
        attrs: &dyn Fn(&mut Builder),
    ) -> (Class, Option<u16>, Vec<u8>) {
        for _ in 0..3 {
            let req = self.build(method, attrs, self.nonce.is_some());
            let mut out = Vec::new();
            let Output::Reply(resp) = core.handle_client(now, self.client, &req, &mut out, relays)
            else {
                panic!("no reply")
            };
            let resp = resp.to_vec();
            let m = Message::parse(&resp).unwrap();
            assert_eq!(m.tid, [self.tid; 12]);
            assert!(m.has_fingerprint);
            let code = m.get(attr::ERROR_CODE).and_then(parse_error_code);
            if matches!(code, Some(401) | Some(438)) && m.get(attr::NONCE).is_some() {
                let fresh = m.get(attr::NONCE).unwrap().to_vec();
                if self.nonce.as_ref() != Some(&fresh)
                    && (code == Some(438) || self.nonce.is_none())
                {
                    self.nonce = Some(fresh);
                    continue;
                }
            }
            return (m.class, code, resp);
        }
        panic!("challenge loop")
    }

    fn allocate(
        &mut self,
        core: &mut Core,
        now: u64,
        relays: &mut FakeRelays,
    ) -> (Class, Option<u16>, Vec<u8>) {
        self.request(core, now, relays, method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }

    fn key(&self) -> [u8; 16] {
        auth::long_term_key(&self.username, "bedside", &self.password)
    }
}

fn peer(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn binding_needs_no_auth() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let c = udp_client(5000);
    let mut buf = Vec::new();
    Builder::new(&mut buf, method::BINDING, Class::Request, &[1; 12]).finish(None, false);
    let mut out = Vec::new();
    let Output::Reply(resp) = core.handle_client(T0, c, &buf, &mut out, &mut r) else {
        panic!()
    };
    let m = Message::parse(resp).unwrap();
    assert_eq!((m.method, m.class), (method::BINDING, Class::Success));
    assert_eq!(m.get_xor_addr(attr::XOR_MAPPED_ADDRESS), Some(Ok(c.addr)));
    assert!(!m.has_fingerprint);
}

#[test]
fn allocate_challenge_then_success_signed() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "alice");
    // First an unauthenticated request gets 401 with realm and nonce.
    let req = tc.build(
        method::ALLOCATE,
        &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
        false,
    );
    let mut out = Vec::new();
    let Output::Reply(resp) = core.handle_client(T0, tc.client, &req, &mut out, &mut r) else {
        panic!()
    };
    let m = Message::parse(resp).unwrap();
    assert_eq!(
        m.get(attr::ERROR_CODE).and_then(parse_error_code),
        Some(401)
    );
    assert_eq!(m.get(attr::REALM), Some(&b"bedside"[..]));
    assert!(m.get(attr::NONCE).is_some());
    let (class, code, resp) = tc.allocate(&mut core, T0, &mut r);
    assert_eq!((class, code), (Class::Success, None));
    let m = Message::parse(&resp).unwrap();
    assert!(m.check_integrity(&tc.key()));
    let relayed = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed, peer("203.0.113.7:50000"));
    assert_eq!(m.get(attr::LIFETIME), Some(&600u32.to_be_bytes()[..]));
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS),
        Some(Ok(tc.client.addr))
    );
    assert_eq!(core.allocation_count(), 1);
    assert_eq!(core.metrics.active_allocations.load(Relaxed), 1);
    // A second Allocate on the same 5-tuple is a mismatch.
    let (_, code, _) = tc.allocate(&mut core, T0, &mut r);
    assert_eq!(code, Some(437));
}

#[test]
fn bad_integrity_is_401_and_stale_nonce_is_438() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "bob");
    tc.allocate(&mut core, T0, &mut r);
    // Wrong password.
    let mut evil = TestClient::new(udp_client(5001), "bob");
    evil.nonce = tc.nonce.clone();
    evil.password = "wrong".into();
    let req = evil.build(
        method::ALLOCATE,
        &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
        true,
    );
    let mut out = Vec::new();
    // The nonce is bound to the client IP; same IP here, so it passes the nonce check.
    let Output::Reply(resp) = core.handle_client(T0, evil.client, &req, &mut out, &mut r) else {
        panic!()
    };
    let m = Message::parse(resp).unwrap();
    assert_eq!(
        m.get(attr::ERROR_CODE).and_then(parse_error_code),
        Some(401)
    );
    // Expired REST credentials: 401 too.
    let mut old = TestClient::new(udp_client(5002), "carol");
    let (u, p) = rest_credentials(SECRET, "carol", Duration::from_secs(10), T0 / 1000 - 100);
    old.username = u;
    old.password = p;
    let (_, code, _) = old.allocate(&mut core, T0, &mut r);
    assert_eq!(code, Some(401));
    // After the nonce lifetime, a signed refresh gets 438 with a new nonce, and the client recovers.
    let old_nonce = tc.nonce.clone().unwrap();
    let later = T0 + 601_000;
    let req = tc.build(method::REFRESH, &|_| {}, true);
    let Output::Reply(resp) = core.handle_client(later, tc.client, &req, &mut out, &mut r) else {
        panic!()
    };
    let m = Message::parse(resp).unwrap();
    assert_eq!(
        m.get(attr::ERROR_CODE).and_then(parse_error_code),
        Some(438)
    );
    assert_ne!(m.get(attr::NONCE).unwrap(), &old_nonce[..]);
    let (class, code, _) = tc.request(&mut core, later, &mut r, method::REFRESH, &|_| {});
    assert_eq!((class, code), (Class::Success, None));
    assert!(core.metrics.errors_with(438) >= 2);
}

#[test]
fn requests_on_missing_allocation_and_wrong_user() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "dan");
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::REFRESH, &|_| {});
    assert_eq!(code, Some(437));
    tc.allocate(&mut core, T0, &mut r);
    let mut other = TestClient::new(tc.client, "eve");
    other.nonce = tc.nonce.clone();
    let (_, code, _) = other.request(&mut core, T0, &mut r, method::REFRESH, &|_| {});
    assert_eq!(code, Some(441));
    // Missing REQUESTED-TRANSPORT is 400, TCP is 442.
    let mut t2 = TestClient::new(udp_client(5003), "dan");
    let (_, code, _) = t2.request(&mut core, T0, &mut r, method::ALLOCATE, &|_| {});
    assert_eq!(code, Some(400));
    let (_, code, _) = t2.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    assert_eq!(code, Some(442));
    // Unknown comprehension-required attribute: 420.
    let (_, code, resp) = t2.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(0x0030, &[0; 4]);
    });
    assert_eq!(code, Some(420));
    assert_eq!(
        Message::parse(&resp).unwrap().get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0, 0x30][..])
    );
}

#[test]
fn quotas_486_and_508() {
    let mut core = core_with(config()); // 2 per user, 3 total
    let mut r = FakeRelays::default();
    for port in [1, 2] {
        let (c, code, _) = TestClient::new(udp_client(port), "u").allocate(&mut core, T0, &mut r);
        assert_eq!((c, code), (Class::Success, None));
    }
    let (_, code, _) = TestClient::new(udp_client(3), "u").allocate(&mut core, T0, &mut r);
    assert_eq!(code, Some(486));
    let (_, code, _) = TestClient::new(udp_client(4), "v").allocate(&mut core, T0, &mut r);
    assert_eq!(code, None);
    let (_, code, _) = TestClient::new(udp_client(5), "w").allocate(&mut core, T0, &mut r);
    assert_eq!(code, Some(508));
}

#[test]
fn denied_peers_get_403() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "p");
    tc.allocate(&mut core, T0, &mut r);
    for bad in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "192.168.1.1:9",
        "169.254.169.254:80",
        "0.0.0.0:1",
        "203.0.113.7:50001",
        "224.0.0.1:5",
    ] {
        let p = peer(bad);
        let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, p);
        });
        assert_eq!(code, Some(403), "{bad}");
        let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0]);
            b.xor_addr(attr::XOR_PEER_ADDRESS, p);
        });
        assert_eq!(code, Some(403), "{bad}");
    }
    // IPv6 peer on an IPv4 relay: 443.
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("[2a00::1]:9"));
    });
    assert_eq!(code, Some(443));
    // One bad peer among good ones: nothing is installed.
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("8.8.8.8:1"));
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("10.1.1.1:1"));
    });
    assert_eq!(code, Some(403));
    let rid = *core.by_client.get(&tc.client).unwrap();
    assert!(core.allocs[rid as usize].as_ref().unwrap().perms.is_empty());
    // With allow-loopback-peers, loopback is allowed.
    let mut cfg = config();
    cfg.allow_loopback_peers = true;
    let mut core = core_with(cfg);
    let mut tc = TestClient::new(udp_client(5000), "p");
    tc.allocate(&mut core, T0, &mut r);
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("127.0.0.1:9"));
    });
    assert_eq!(code, None);
}

#[test]
fn permission_send_data_and_channels() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "q");
    tc.allocate(&mut core, T0, &mut r);
    let p = peer("198.18.0.1:7000");
    let p = if core.cfg.policy.permits(p.ip()) {
        p
    } else {
        peer("8.8.4.4:7000")
    };
    // Send indication without permission is dropped.
    let send = |tid: u8, data: &[u8]| {
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, method::SEND, Class::Indication, &[tid; 12]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
        b.attr(attr::DATA, data);
        b.finish(None, false);
        buf
    };
    let mut out = Vec::new();
    assert_eq!(
        core.handle_client(T0, tc.client, &send(1, b"hi"), &mut out, &mut r),
        Output::Nothing
    );
    // Peer data without permission is dropped too.
    let mut pbuf = vec![0u8; 64];
    pbuf[4..7].copy_from_slice(b"yo!");
    assert!(core.handle_peer(T0, 0, p, &mut pbuf, 3, &mut out).is_none());
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    assert_eq!(code, None);
    assert_eq!(
        core.handle_client(T0, tc.client, &send(2, b"hi"), &mut out, &mut r),
        Output::ToPeer {
            relay: 0,
            peer: p,
            data: b"hi"
        }
    );
    // Peer data arrives as a Data indication.
    let (client, bytes) = core.handle_peer(T0, 0, p, &mut pbuf, 3, &mut out).unwrap();
    assert_eq!(client, tc.client);
    let m = Message::parse(bytes).unwrap();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA), Some(&b"yo!"[..]));
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(p)));
    // Channel bind: bad numbers are 400; then ChannelData both ways.
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x30, 0, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    assert_eq!(code, Some(400));
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 1, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    assert_eq!(code, None);
    // The same channel to another peer, or another channel to the same peer: 400.
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 2, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    assert_eq!(code, Some(400));
    let mut cd = Vec::new();
    ChannelData {
        channel: 0x4001,
        data: b"media",
    }
    .encode(&mut cd, false);
    assert_eq!(
        core.handle_client(T0, tc.client, &cd, &mut out, &mut r),
        Output::ToPeer {
            relay: 0,
            peer: p,
            data: b"media"
        }
    );
    ChannelData {
        channel: 0x4002,
        data: b"media",
    }
    .encode(&mut cd, false);
    assert_eq!(
        core.handle_client(T0, tc.client, &cd, &mut out, &mut r),
        Output::Nothing
    );
    let (_, bytes) = core.handle_peer(T0, 0, p, &mut pbuf, 3, &mut out).unwrap();
    assert_eq!(bytes, &[0x40, 0x01, 0, 3, b'y', b'o', b'!']);
    // Over a stream the ChannelData is padded.
    let snap = core.metrics.snapshot();
    assert_eq!(snap.relayed_packets, 4);
    assert!(snap.dropped_packets >= 3);
}

#[test]
fn expiry_runs_on_tick_with_fake_time() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "x");
    tc.allocate(&mut core, T0, &mut r);
    let p = peer("8.8.8.8:53");
    tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    let mut cd = Vec::new();
    ChannelData {
        channel: 0x4000,
        data: b"x",
    }
    .encode(&mut cd, false);
    let mut out = Vec::new();
    // Permission lasts 300 s: relayed at 299 s, dropped at 301 s (channel lives on, 600 s).
    assert!(matches!(
        core.handle_client(T0 + 299_000, tc.client, &cd, &mut out, &mut r),
        Output::ToPeer { .. }
    ));
    core.tick(T0 + 301_000, &mut r);
    assert_eq!(
        core.handle_client(T0 + 301_000, tc.client, &cd, &mut out, &mut r),
        Output::Nothing
    );
    let rid = *core.by_client.get(&tc.client).unwrap() as usize;
    assert!(core.allocs[rid].as_ref().unwrap().perms.is_empty());
    assert_eq!(core.allocs[rid].as_ref().unwrap().channels.len(), 1);
    // Refresh with a lifetime extends; the allocation expires when the tick passes it.
    let (_, code, resp) = tc.request(&mut core, T0 + 500_000, &mut r, method::REFRESH, &|b| {
        b.attr_u32(attr::LIFETIME, 1200);
    });
    assert_eq!(code, None);
    assert_eq!(
        Message::parse(&resp).unwrap().get(attr::LIFETIME),
        Some(&1200u32.to_be_bytes()[..])
    );
    core.tick(T0 + 1_600_000, &mut r);
    assert_eq!(core.allocation_count(), 1);
    assert!(core.allocs[rid].as_ref().unwrap().channels.is_empty());
    core.tick(T0 + 1_700_000, &mut r);
    assert_eq!(core.allocation_count(), 0);
    assert_eq!(r.closed, vec![0]);
    assert_eq!(core.metrics.active_allocations.load(Relaxed), 0);
}

#[test]
fn refresh_zero_deletes_and_lifetime_is_clamped() {
    let mut cfg = config();
    cfg.max_lifetime_secs = 900;
    let mut core = core_with(cfg);
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "y");
    let (_, _, resp) = tc.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr_u32(attr::LIFETIME, 99_999);
    });
    assert_eq!(
        Message::parse(&resp).unwrap().get(attr::LIFETIME),
        Some(&900u32.to_be_bytes()[..])
    );
    let (_, code, resp) = tc.request(&mut core, T0, &mut r, method::REFRESH, &|b| {
        b.attr_u32(attr::LIFETIME, 0);
    });
    assert_eq!(code, None);
    assert_eq!(
        Message::parse(&resp).unwrap().get(attr::LIFETIME),
        Some(&[0, 0, 0, 0][..])
    );
    assert_eq!(core.allocation_count(), 0);
    assert!(r.open.is_empty());
}

#[test]
fn ipv6_allocation_and_unsupported_family() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "z");
    let (_, code, resp) = tc.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code, None);
    let relayed = Message::parse(&resp)
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert!(relayed.is_ipv6());
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("[2a00:1450::5]:9"));
    });
    assert_eq!(code, None);
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("[::ffff:127.0.0.1]:9"));
    });
    assert_eq!(code, Some(403));
    let (_, code, _) = tc.request(&mut core, T0, &mut r, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer("[fd00::1]:9"));
    });
    assert_eq!(code, Some(403));
    let mut r2 = FakeRelays {
        no_v6: true,
        ..Default::default()
    };
    let mut t2 = TestClient::new(udp_client(5001), "z");
    let (_, code, _) = t2.request(&mut core, T0, &mut r2, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code, Some(440));
}

#[test]
fn stream_clients_get_padded_channel_data_and_close_frees() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let client = Client {
        transport: Transport::Stream { conn: 9 },
        addr: peer("198.51.100.20:4444"),
    };
    let mut tc = TestClient::new(client, "s");
    tc.allocate(&mut core, T0, &mut r);
    let p = peer("8.8.8.8:53");
    tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x4F, 0xFF, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    let mut pbuf = vec![0xAAu8; 32];
    let mut out = Vec::new();
    let (_, bytes) = core.handle_peer(T0, 0, p, &mut pbuf, 5, &mut out).unwrap();
    assert_eq!(bytes.len(), 12);
    assert_eq!(&bytes[..4], &[0x4F, 0xFF, 0, 5]);
    assert_eq!(&bytes[9..], &[0, 0, 0]);
    core.client_closed(&client, &mut r);
    assert_eq!(core.allocation_count(), 0);
}

#[test]
fn bandwidth_quota_drops_excess() {
    let mut cfg = config();
    cfg.max_bps_per_allocation = 100_000; // burst 64 KiB min
    let mut core = core_with(cfg);
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "bw");
    tc.allocate(&mut core, T0, &mut r);
    let p = peer("8.8.8.8:53");
    tc.request(&mut core, T0, &mut r, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    });
    let payload = vec![0u8; 1000];
    let mut cd = Vec::new();
    ChannelData {
        channel: 0x4000,
        data: &payload,
    }
    .encode(&mut cd, false);
    let mut out = Vec::new();
    let mut sent = 0;
    for _ in 0..200 {
        if let Output::ToPeer { .. } = core.handle_client(T0, tc.client, &cd, &mut out, &mut r) {
            sent += 1;
        }
    }
    assert_eq!(sent, 100_000 / 1000); // burst = max(rate, 64 KiB) = 100 kB
    // One second later another second's worth passes.
    let mut later = 0;
    for _ in 0..200 {
        if let Output::ToPeer { .. } =
            core.handle_client(T0 + 1000, tc.client, &cd, &mut out, &mut r)
        {
            later += 1;
        }
    }
    assert_eq!(later, 100);
}

#[test]
fn allocate_retransmission_gets_same_answer() {
    let mut core = core_with(config());
    let mut r = FakeRelays::default();
    let mut tc = TestClient::new(udp_client(5000), "rt");
    tc.allocate(&mut core, T0, &mut r);
    // Rebuild the same request with the same tid.
    tc.tid -= 1;
    let req = tc.build(
        method::ALLOCATE,
        &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
        true,
    );
    let mut out = Vec::new();
    let Output::Reply(resp) = core.handle_client(T0 + 10, tc.client, &req, &mut out, &mut r) else {
        panic!()
    };
    let m = Message::parse(resp).unwrap();
    assert_eq!(m.class, Class::Success);
    assert_eq!(r.open.len(), 1);
}

#[test]
fn even_port_reservation_token() {
    // Room for three allocations and a reservation (reservations count toward the total).
    let mut core = core_with(TurnConfig {
        total_quota: 4,
        ..config()
    });
    let mut r = FakeRelays::default();
    let mut rtp = TestClient::new(udp_client(6000), "rtp");
    let (_, code, resp) = rtp.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::EVEN_PORT, &[0x80]);
    });
    assert_eq!(code, None);
    let m = Message::parse(&resp).unwrap();
    let first = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    let token = m.get(attr::RESERVATION_TOKEN).expect("token").to_vec();
    assert_eq!(token.len(), 8);
    // EVEN-PORT together with a token is a bad request; a wrong token gets 508.
    let mut rtcp = TestClient::new(udp_client(6001), "rtp");
    let t = token.clone();
    let (_, code, _) = rtcp.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::EVEN_PORT, &[0]);
        b.attr(attr::RESERVATION_TOKEN, &t);
    });
    assert_eq!(code, Some(400));
    let (_, code, _) = rtcp.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::RESERVATION_TOKEN, &[9; 8]);
    });
    assert_eq!(code, Some(508));
    let t = token.clone();
    let (_, code, resp) = rtcp.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::RESERVATION_TOKEN, &t);
    });
    assert_eq!(code, None);
    let second = Message::parse(&resp)
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(second.port(), first.port() + 1);
    // An unclaimed reservation is released by the tick after 30 s.
    let mut other = TestClient::new(udp_client(6002), "rtp2");
    other.request(&mut core, T0, &mut r, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        b.attr(attr::EVEN_PORT, &[0x80]);
    });
    let open_before = r.open.len();
    core.tick(T0 + 31_000, &mut r);
    assert_eq!(r.open.len(), open_before - 1);
    assert!(core.reservations.is_empty());
}

#[test]
fn even_port_reservations_count_toward_quotas() {
    let mut core = core_with(config()); // 2 per user, 3 total
    let mut r = FakeRelays::default();
    let reserve = |core: &mut Core, r: &mut FakeRelays, port: u16, user: &str| {
        let mut c = TestClient::new(udp_client(port), user);
        c.request(core, T0, r, method::ALLOCATE, &|b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            b.attr(attr::EVEN_PORT, &[0x80]);
        })
        .1
    };
    // An allocation with a reserved second port takes both of the user's two.
    assert_eq!(reserve(&mut core, &mut r, 7000, "u"), None);
    assert_eq!(reserve(&mut core, &mut r, 7001, "u"), Some(486));
    let (_, code, _) = TestClient::new(udp_client(7002), "u").allocate(&mut core, T0, &mut r);
    assert_eq!(code, Some(486));
    // The total counts the reservation too: one port left of three.
    assert_eq!(reserve(&mut core, &mut r, 7003, "v"), Some(508));
    let (_, code, _) = TestClient::new(udp_client(7004), "v").allocate(&mut core, T0, &mut r);
    assert_eq!(code, None);
    // Once the reservation expires, its port is the user's again.
    core.tick(T0 + 31_000, &mut r);
    assert!(core.reservations.is_empty());
    let (_, code, _) =
        TestClient::new(udp_client(7005), "u").allocate(&mut core, T0 + 31_000, &mut r);
    assert_eq!(code, None);
}

#[test]
fn one_source_is_held_to_its_quota_whatever_the_users() {
    let mut core = core_with(TurnConfig {
        source_quota: 2,
        total_quota: 10,
        ..config()
    });
    let mut r = FakeRelays::default();
    // Fresh credentials for every allocation do not help one address past its quota.
    for (port, user, want) in [(1, "a", None), (2, "b", None), (3, "c", Some(486))] {
        let (_, code, _) = TestClient::new(udp_client(port), user).allocate(&mut core, T0, &mut r);
        assert_eq!(code, want, "{user}");
    }
    let other = Client {
        transport: Transport::Udp { listener: 0 },
        addr: "203.0.113.20:5".parse().unwrap(),
    };
    let (_, code, _) = TestClient::new(other, "d").allocate(&mut core, T0, &mut r);
    assert_eq!(code, None);
}

#[test]
fn one_consultation_is_held_to_its_group_quota_whatever_its_seats() {
    let mut core = core_with(TurnConfig {
        group_quota: 3,
        total_quota: 10,
        ..config()
    });
    let mut r = FakeRelays::default();
    // Users `<consultation>/<participant>`: two seats of c1 hold the group's three, a third
    // seat is refused; another consultation and an ungrouped user are not held by c1.
    for (port, user, want) in [
        (1, "c1/a", None),
        (2, "c1/a", None),
        (3, "c1/b", None),
        (4, "c1/b", Some(486)),
        (5, "c1/c", Some(486)),
        (6, "c2/a", None),
        (7, "c1", None),
    ] {
        let (_, code, _) = TestClient::new(udp_client(port), user).allocate(&mut core, T0, &mut r);
        assert_eq!(code, want, "{user} from port {port}");
    }
    // When one of c1's allocations goes, the group has room again.
    let first = *core.by_client.get(&udp_client(1)).expect("allocated");
    core.remove(first, &mut r);
    let (_, code, _) = TestClient::new(udp_client(8), "c1/c").allocate(&mut core, T0, &mut r);
    assert_eq!(code, None);
}

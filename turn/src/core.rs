//! The relay's routing state, free of I/O: messages in, messages out, time passed in.
//!
//! The socket loop ([`crate::driver`]) feeds client datagrams/frames to [`Core::handle_client`],
//! peer datagrams received on relay sockets to [`Core::handle_peer`], and calls [`Core::tick`]
//! about once a second; it carries out what they return. Opening and closing relay sockets
//! goes through the [`RelaySockets`] seam so tests and fuzzers use a fake. Time is
//! milliseconds since the Unix epoch, as told by the caller; nothing here reads a clock.
//!
//! **Reflection.** A UDP request's source address can be forged, so a reply to a request
//! that proved nothing (no valid nonce and integrity: the 401 challenge, 438, 400, 420, 437
//! before authentication) could be aimed at a victim. The first challenge cannot fit inside
//! the request that asks for it (webrtc-rs's first Allocate is 36 bytes; a 401 needs REALM and
//! NONCE, 92 bytes here; coturn's is 3.6-5.4 times its request), so the bytes such replies
//! carry *beyond their request's size* are charged to a per-source allowance
//! ([`UNAUTH_EXCESS_BURST`] bytes, refilled at [`UNAUTH_EXCESS_PER_SEC`]): past it the reply is
//! not sent. Over any interval a forged source receives at most what was sent in its name plus
//! that allowance, so a flood is reflected at 1:1 (measured in `turn/tests/hardening.rs`),
//! while an honest client's handful of challenges fits the allowance. Replies signed with the
//! client's key answered a nonce bound to the source address (`auth::NonceKey`), which only a
//! client that receives there can have: they are free. Binding responses (32 or 44 bytes to a
//! request of at least 20) are free too: ICE needs them from every STUN server, and their
//! excess is at most 24 bytes. TCP and TLS sources cannot be forged and are not charged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::auth::{self, NonceCheck, NonceKey};
use crate::metrics::Metrics;
use crate::peer::{Cidr, PeerPolicy};
use crate::stun::{
    self, Builder, CHANNEL_MAX, CHANNEL_MIN, ChannelData, Class, Message, attr, method,
};
use crate::{TurnConfig, TurnError};

/// Identifies a relay socket; chosen by the [`RelaySockets`] implementation (a small index).
pub type RelayId = u32;

/// How a client reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Datagrams on the UDP listening socket with this index.
    Udp {
        /// Index of the listening socket.
        listener: u16,
    },
    /// A TCP or TLS connection.
    Stream {
        /// Connection id.
        conn: u64,
    },
}

/// A client: transport plus its address (with our listening address, the TURN 5-tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client {
    /// How it reached us.
    pub transport: Transport,
    /// Its address as we see it.
    pub addr: SocketAddr,
}

impl Client {
    fn is_stream(&self) -> bool {
        matches!(self.transport, Transport::Stream { .. })
    }
}

/// Opening and closing relay sockets (the only I/O the core asks for).
pub trait RelaySockets {
    /// Opens a UDP relay socket of the given family; `Err(code)` is a STUN error code
    /// (440 family not supported, 508 no port free).
    /// `even` asks for an even port (EVEN-PORT).
    fn open(&mut self, ipv6: bool, even: bool) -> Result<(RelayId, SocketAddr), u16>;
    /// Opens two sockets on an even port and the next one (EVEN-PORT with the R bit); the
    /// default says 508 (not offered).
    fn open_pair(&mut self, _ipv6: bool) -> Result<[(RelayId, SocketAddr); 2], u16> {
        Err(508)
    }
    /// Closes a relay socket opened by `open`.
    fn close(&mut self, id: RelayId);
}

/// What to do with a client's message.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<'a> {
    /// Nothing (dropped or fully handled).
    Nothing,
    /// Send these bytes back to the client that sent the message.
    Reply(&'a [u8]),
    /// Send `data` from relay socket `relay` to `peer`.
    ToPeer {
        /// Relay socket.
        relay: RelayId,
        /// Destination.
        peer: SocketAddr,
        /// Payload.
        data: &'a [u8],
    },
}

/// Room the caller leaves before a peer payload in [`Core::handle_peer`]'s buffer.
pub const HEADROOM: usize = 4;

const PERMISSION_LIFETIME_MS: u64 = 300_000;
const CHANNEL_LIFETIME_MS: u64 = 600_000;
const MAX_PERMISSIONS: usize = 256;
const MAX_CHANNELS: usize = 256;
const UDP: u8 = 17;
/// How long a port reserved by EVEN-PORT's R bit waits for its RESERVATION-TOKEN.
const RESERVATION_MS: u64 = 30_000;

const KNOWN_ATTRS: &[u16] = &[
    attr::MAPPED_ADDRESS,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::REQUESTED_TRANSPORT,
    attr::DONT_FRAGMENT,
    attr::XOR_MAPPED_ADDRESS,
    attr::EVEN_PORT,
    attr::RESERVATION_TOKEN,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
];

#[derive(Debug)]
struct Channel {
    num: u16,
    peer: SocketAddr,
    expires: u64,
}

#[derive(Debug)]
struct Bucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: u64,
}

impl Bucket {
    fn new(rate: u64, now: u64) -> Self {
        let burst = rate.max(64 * 1024);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    #[inline]
    fn take(&mut self, n: usize, now: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        if now > self.last {
            let add = (now - self.last).saturating_mul(self.rate) / 1000;
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            self.last = now;
        }
        if self.tokens >= n as u64 {
            self.tokens -= n as u64;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Allocation {
    client: Client,
    relay_addr: SocketAddr,
    username: Box<str>,
    user: Box<str>,
    key: [u8; 16],
    expires: u64,
    alloc_tid: [u8; 12],
    perms: Vec<(IpAddr, u64)>,
    channels: Vec<Channel>,
    bucket: Bucket,
}

impl Allocation {
    #[inline]
    fn permitted(&self, ip: IpAddr, now: u64) -> bool {
        self.perms.iter().any(|(p, e)| *p == ip && *e > now)
    }
}

struct Creds {
    username: Box<str>,
    user: Box<str>,
    key: [u8; 16],
}

enum AuthFail {
    /// Plain error (400).
    Code(u16),
    /// 401 or 438 with REALM and a fresh NONCE.
    Challenge(u16),
}

/// Settings of the core, taken from [`TurnConfig`].
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Realm.
    pub realm: String,
    /// REST secret.
    pub secret: String,
    /// Peer policy.
    pub policy: PeerPolicy,
    /// Allocations per user.
    pub user_quota: u32,
    /// Allocations in total.
    pub total_quota: u32,
    /// Allocations per group (a consultation; 0: none).
    pub group_quota: u32,
    /// Allocations per client address (IPv6 per /64).
    pub source_quota: u32,
    /// Bytes per second per allocation (0: none).
    pub bps: u64,
    /// Default lifetime (s).
    pub default_lifetime: u32,
    /// Max lifetime (s).
    pub max_lifetime: u32,
    /// Nonce lifetime.
    pub nonce_lifetime: Duration,
}

impl CoreConfig {
    /// From the public config plus the relay's own addresses.
    pub fn from_config(c: &TurnConfig, own: Vec<IpAddr>) -> Result<Self, TurnError> {
        let allowed = c
            .allowed_peers
            .iter()
            .map(|s| s.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TurnError::Config(e.to_string()))?;
        if c.auth_secret.is_empty() {
            return Err(TurnError::Config("auth-secret must not be empty".into()));
        }
        Ok(CoreConfig {
            realm: c.realm.clone(),
            secret: c.auth_secret.clone(),
            policy: PeerPolicy {
                allowed,
                allow_loopback: c.allow_loopback_peers,
                own,
            },
            user_quota: c.user_quota,
            total_quota: c.total_quota,
            group_quota: c.group_quota,
            source_quota: c.source_quota,
            bps: c.max_bps_per_allocation,
            default_lifetime: c.default_lifetime_secs.max(1),
            max_lifetime: c.max_lifetime_secs.max(c.default_lifetime_secs).max(1),
            nonce_lifetime: Duration::from_secs(c.nonce_lifetime_secs.max(1) as u64),
        })
    }
}

/// The key a client source is counted under: its IPv4 address, or its IPv6 address's /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match crate::peer::canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The group a REST user id belongs to: the part before its first `/`, if any (Bedside's
/// server names users `<consultation>/<participant>`).
fn group_of(user: &str) -> Option<&str> {
    user.split_once('/').map(|(group, _)| group)
}

/// Adds `delta` to `key`'s count in `map`, dropping the entry at zero.
fn count(map: &mut FxHashMap<Box<str>, u32>, key: &str, delta: i32) {
    if delta > 0 {
        *map.entry(key.into()).or_insert(0) += delta as u32;
    } else if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(delta.unsigned_abs());
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// The sans-IO relay state.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    nonce_key: NonceKey,
    allocs: Vec<Option<Allocation>>,
    by_client: FxHashMap<Client, RelayId>,
    users: FxHashMap<Box<str>, u32>,
    /// Allocations (and reservations) per group (see [`group_of`]).
    groups: FxHashMap<Box<str>, u32>,
    /// Allocations per client source (see [`source_key`]).
    sources: FxHashMap<IpAddr, u32>,
    count: u32,
    /// Ports reserved by EVEN-PORT (R bit): token -> (socket, address, expiry, user). A
    /// reservation holds a port, so it counts toward its user's quota and the total (in `users`
    /// and `reserved`) until it is claimed or expires.
    reservations: FxHashMap<[u8; 8], (RelayId, SocketAddr, u64, Box<str>)>,
    reserved: u32,
    metrics: Arc<Metrics>,
    /// Per-source allowance for unauthenticated replies larger than their request: bytes left
    /// and when last charged (ms). See the module doc.
    unauth: FxHashMap<IpAddr, (u64, u64)>,
    /// The allowance shared by the sources that find `unauth` full.
    unauth_overflow: (u64, u64),
}

/// Bytes unauthenticated replies may carry beyond their requests' size, per source, in a burst.
pub const UNAUTH_EXCESS_BURST: u64 = 16 * 1024;
/// How fast that allowance refills (bytes per second).
pub const UNAUTH_EXCESS_PER_SEC: u64 = 2 * 1024;
/// Sources whose allowance is tracked; the rest share one (an attacker forging many sources
/// then spends the shared allowance, not every honest client's own).
const UNAUTH_SOURCES: usize = 65_536;

impl Core {
    /// A core with no allocations. `nonce_key` should be random.
    pub fn new(cfg: CoreConfig, nonce_key: [u8; 32], metrics: Arc<Metrics>) -> Self {
        Core {
            cfg,
            nonce_key: NonceKey::new(nonce_key),
            allocs: Vec::new(),
            by_client: FxHashMap::default(),
            users: FxHashMap::default(),
            groups: FxHashMap::default(),
            sources: FxHashMap::default(),
            count: 0,
            reservations: FxHashMap::default(),
            reserved: 0,
            metrics,
            unauth: FxHashMap::default(),
            unauth_overflow: (UNAUTH_EXCESS_BURST, 0),
        }
    }

    /// Whether an unauthenticated reply of `reply` bytes to a request of `request` bytes from
    /// `ip` may go: its excess is charged to the source's allowance (see the module doc).
    fn unauth_allows(&mut self, now: u64, ip: IpAddr, request: usize, reply: usize) -> bool {
        let excess = reply.saturating_sub(request) as u64;
        if excess == 0 {
            return true;
        }
        let key = source_key(ip);
        let full = self.unauth.len() >= UNAUTH_SOURCES;
        let slot = match self.unauth.get_mut(&key) {
            Some(slot) => slot,
            None if full => &mut self.unauth_overflow,
            None => self.unauth.entry(key).or_insert((UNAUTH_EXCESS_BURST, now)),
        };
        let refill = now.saturating_sub(slot.1) * UNAUTH_EXCESS_PER_SEC / 1000;
        let left = (slot.0 + refill).min(UNAUTH_EXCESS_BURST);
        if left < excess {
            // Keep the fraction of a byte the refill did not make whole.
            if refill > 0 {
                *slot = (left, now);
            }
            return false;
        }
        *slot = (left - excess, now);
        true
    }

    /// A reply to a request (`request` bytes) in `out`: sent unless it is an unauthenticated
    /// reply over its source's allowance.
    fn reply<'a>(
        &mut self,
        now: u64,
        client: &Client,
        m: &Message,
        request: usize,
        out: &'a [u8],
    ) -> Output<'a> {
        let free = client.is_stream()
            || m.method == method::BINDING
            || Message::parse(out).is_ok_and(|r| r.integrity_offset.is_some());
        if free || self.unauth_allows(now, client.addr.ip(), request, out.len()) {
            Output::Reply(out)
        } else {
            self.metrics.dropped_packets.fetch_add(1, Relaxed);
            Output::Nothing
        }
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.count as usize
    }

    /// The relayed address of `client`'s allocation, if it has one.
    pub fn allocation_of(&self, client: &Client) -> Option<SocketAddr> {
        let rid = *self.by_client.get(client)?;
        self.allocs
            .get(rid as usize)?
            .as_ref()
            .map(|a| a.relay_addr)
    }

    /// Handles one message from a client (a UDP datagram or one TCP/TLS frame).
    pub fn handle_client<'a>(
        &mut self,
        now: u64,
        client: Client,
        data: &'a [u8],
        out: &'a mut Vec<u8>,
        relays: &mut dyn RelaySockets,
    ) -> Output<'a> {
        if data.len() >= 4 && data[0] & 0xC0 == 0x40 {
            return self.channel_from_client(now, &client, data);
        }
        let Ok(m) = Message::parse(data) else {
            return Output::Nothing;
        };
        out.clear();
        match m.class {
            Class::Request => {
                if m.unknown_required(KNOWN_ATTRS).next().is_some() {
                    let unknown: Vec<u8> = m
                        .unknown_required(KNOWN_ATTRS)
                        .take(16)
                        .flat_map(|t| t.to_be_bytes())
                        .collect();
                    self.error(out, &m, 420, None, false, Some(&unknown), now, &client);
                    return self.reply(now, &client, &m, data.len(), out);
                }
                let sent = match m.method {
                    method::BINDING => {
                        self.metrics.binding_requests.fetch_add(1, Relaxed);
                        let mut b = Builder::new(out, method::BINDING, Class::Success, &m.tid);
                        b.xor_addr(attr::XOR_MAPPED_ADDRESS, client.addr);
                        b.finish(None, m.has_fingerprint);
                        true
                    }
                    method::ALLOCATE => self.allocate(now, &client, &m, out, relays),
                    method::REFRESH => self.refresh(now, &client, &m, out, relays),
                    method::CREATE_PERMISSION => self.create_permission(now, &client, &m, out),
                    method::CHANNEL_BIND => self.channel_bind(now, &client, &m, out),
                    _ => {
                        self.error(out, &m, 400, None, false, None, now, &client);
                        true
                    }
                };
                if sent {
                    self.reply(now, &client, &m, data.len(), out)
                } else {
                    Output::Nothing
                }
            }
            Class::Indication if m.method == method::SEND => self.send_indication(now, &client, &m),
            _ => Output::Nothing,
        }
    }

    #[inline]
    fn channel_from_client<'a>(&mut self, now: u64, client: &Client, data: &'a [u8]) -> Output<'a> {
        let Some(cd) = ChannelData::parse(data) else {
            return Output::Nothing;
        };
        let Some(&rid) = self.by_client.get(client) else {
            return Output::Nothing;
        };
        let Some(Some(a)) = self.allocs.get_mut(rid as usize) else {
            return Output::Nothing;
        };
        let Some(ch) = a
            .channels
            .iter()
            .find(|c| c.num == cd.channel && c.expires > now)
        else {
            self.metrics.dropped_packets.fetch_add(1, Relaxed);
            return Output::Nothing;
        };
        let peer = ch.peer;
        if !a.permitted(peer.ip(), now) || !a.bucket.take(cd.data.len(), now) {
            self.metrics.dropped_packets.fetch_add(1, Relaxed);
            return Output::Nothing;
        }
        self.metrics.relayed_packets.fetch_add(1, Relaxed);
        self.metrics
            .relayed_bytes
            .fetch_add(cd.data.len() as u64, Relaxed);
        Output::ToPeer {
            relay: rid,
            peer,
            data: cd.data,
        }
    }

    fn send_indication<'a>(&mut self, now: u64, client: &Client, m: &Message<'a>) -> Output<'a> {
        let Some(&rid) = self.by_client.get(client) else {
            return Output::Nothing;
        };
        let Some(Some(a)) = self.allocs.get_mut(rid as usize) else {
            return Output::Nothing;
        };
        let (Some(Ok(peer)), Some(data)) =
            (m.get_xor_addr(attr::XOR_PEER_ADDRESS), m.get(attr::DATA))
        else {
            return Output::Nothing;
        };
        if peer.is_ipv4() != a.relay_addr.is_ipv4()
            || !a.permitted(peer.ip(), now)
            || !a.bucket.take(data.len(), now)
        {
            self.metrics.dropped_packets.fetch_add(1, Relaxed);
            return Output::Nothing;
        }
        self.metrics.relayed_packets.fetch_add(1, Relaxed);
        self.metrics
            .relayed_bytes
            .fetch_add(data.len() as u64, Relaxed);
        Output::ToPeer {
            relay: rid,
            peer,
            data,
        }
    }

    /// Handles a datagram that arrived from `from` on relay socket `relay`. The payload is
    /// `buf[HEADROOM..HEADROOM + len]`; `buf` must have at least three spare bytes after it
    /// (ChannelData padding on streams). Returns the client and the bytes to send it: either
    /// ChannelData framed in place inside `buf`, or a Data indication built in `out`.
    pub fn handle_peer<'a>(
        &mut self,
        now: u64,
        relay: RelayId,
        from: SocketAddr,
        buf: &'a mut [u8],
        len: usize,
        out: &'a mut Vec<u8>,
    ) -> Option<(Client, &'a [u8])> {
        if len > 0xFFFF || buf.len() < HEADROOM + len {
            return None;
        }
        let a = self.allocs.get_mut(relay as usize)?.as_mut()?;
        if !a.permitted(from.ip(), now) || !a.bucket.take(len, now) {
            self.metrics.dropped_packets.fetch_add(1, Relaxed);
            return None;
        }
        self.metrics.relayed_packets.fetch_add(1, Relaxed);
        self.metrics.relayed_bytes.fetch_add(len as u64, Relaxed);
        let client = a.client;
        if let Some(ch) = a
            .channels
            .iter()
            .find(|c| c.peer == from && c.expires > now)
        {
            buf[0..2].copy_from_slice(&ch.num.to_be_bytes());
            buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            let mut total = HEADROOM + len;
            if client.is_stream() {
                let padded = HEADROOM + stun::pad4(len);
                if buf.len() < padded {
                    return None;
                }
                buf[total..padded].fill(0);
                total = padded;
            }
            return Some((client, &buf[..total]));
        }
        out.clear();
        let tid: [u8; 12] = rand::random();
        let mut b = Builder::new(out, method::DATA, Class::Indication, &tid);
        b.xor_addr(attr::XOR_PEER_ADDRESS, from);
        b.attr(attr::DATA, &buf[HEADROOM..HEADROOM + len]);
        b.finish(None, false);
        Some((client, &out[..]))
    }

    /// Expires allocations, permissions and channels. Call about once a second.
    pub fn tick(&mut self, now: u64, relays: &mut dyn RelaySockets) {
        // A source whose allowance has refilled is as good as untracked.
        self.unauth.retain(|_, (left, at)| {
            left.saturating_add(now.saturating_sub(*at) * UNAUTH_EXCESS_PER_SEC / 1000)
                < UNAUTH_EXCESS_BURST
        });
        let expired: Vec<[u8; 8]> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.2 <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            if let Some((rid, _, _, user)) = self.reservations.remove(&t) {
                relays.close(rid);
                self.unreserve(&user);
            }
        }
        for rid in 0..self.allocs.len() {
            let expired = match &mut self.allocs[rid] {
                Some(a) if a.expires <= now => true,
                Some(a) => {
                    a.perms.retain(|(_, e)| *e > now);
                    a.channels.retain(|c| c.expires > now);
                    false
                }
                None => false,
            };
            if expired {
                self.remove(rid as RelayId, relays);
            }
        }
    }

    /// A reservation of `user` ended (claimed or expired): its port no longer counts.
    fn unreserve(&mut self, user: &str) {
        self.reserved = self.reserved.saturating_sub(1);
        self.count_user(user, -1);
    }

    /// One more (or one fewer) allocation or reservation held by `user` and its group.
    fn count_user(&mut self, user: &str, delta: i32) {
        count(&mut self.users, user, delta);
        if let Some(group) = group_of(user) {
            count(&mut self.groups, group, delta);
        }
    }

    /// A TCP/TLS client went away: its allocation goes too (RFC 8656 section 3.1).
    pub fn client_closed(&mut self, client: &Client, relays: &mut dyn RelaySockets) {
        if let Some(&rid) = self.by_client.get(client) {
            self.remove(rid, relays);
        }
    }

    /// Removes every allocation (shutdown).
    pub fn clear(&mut self, relays: &mut dyn RelaySockets) {
        for (_, (rid, _, _, _)) in std::mem::take(&mut self.reservations) {
            relays.close(rid);
        }
        self.reserved = 0;
        for rid in 0..self.allocs.len() {
            if self.allocs[rid].is_some() {
                self.remove(rid as RelayId, relays);
            }
        }
    }

    fn remove(&mut self, rid: RelayId, relays: &mut dyn RelaySockets) {
        let Some(slot) = self.allocs.get_mut(rid as usize) else {
            return;
        };
        let Some(a) = slot.take() else { return };
        self.by_client.remove(&a.client);
        let src = source_key(a.client.addr.ip());
        if let Some(n) = self.sources.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.sources.remove(&src);
            }
        }
        self.count_user(&a.user, -1);
        self.count -= 1;
        self.metrics.active_allocations.fetch_sub(1, Relaxed);
        relays.close(rid);
    }

    fn authenticate(&self, now: u64, client: &Client, m: &Message) -> Result<Creds, AuthFail> {
        if m.integrity_offset.is_none() {
            return Err(AuthFail::Challenge(401));
        }
        let (Some(username), Some(realm), Some(nonce)) = (
            m.get(attr::USERNAME),
            m.get(attr::REALM),
            m.get(attr::NONCE),
        ) else {
            return Err(AuthFail::Code(400));
        };
        if self
            .nonce_key
            .check(nonce, client.addr.ip(), now, self.cfg.nonce_lifetime)
            == NonceCheck::Stale
        {
            return Err(AuthFail::Challenge(438));
        }
        if realm != self.cfg.realm.as_bytes() {
            return Err(AuthFail::Challenge(401));
        }
        let Ok(username) = std::str::from_utf8(username) else {
            return Err(AuthFail::Challenge(401));
        };
        let Some((expiry, user)) = auth::parse_rest_username(username) else {
            return Err(AuthFail::Challenge(401));
        };
        if expiry < now / 1000 {
            return Err(AuthFail::Challenge(401));
        }
        let password = auth::rest_password(&self.cfg.secret, username);
        let key = auth::long_term_key(username, &self.cfg.realm, &password);
        if !m.check_integrity(&key) {
            return Err(AuthFail::Challenge(401));
        }
        Ok(Creds {
            username: username.into(),
            user: user.into(),
            key,
        })
    }

    /// Writes an error response; counts it.
    #[allow(clippy::too_many_arguments)]
    fn error(
        &self,
        out: &mut Vec<u8>,
        m: &Message,
        code: u16,
        key: Option<&[u8]>,
        challenge: bool,
        unknown: Option<&[u8]>,
        now: u64,
        client: &Client,
    ) {
        self.metrics.error(code);
        out.clear();
        let mut b = Builder::new(out, m.method, Class::Error, &m.tid);
        b.error_code(code);
        if let Some(u) = unknown {
            b.attr(attr::UNKNOWN_ATTRIBUTES, u);
        }
        if challenge {
            b.attr(attr::REALM, self.cfg.realm.as_bytes());
            let nonce = self.nonce_key.make(now, client.addr.ip());
            b.attr(attr::NONCE, nonce.as_bytes());
        }
        b.finish(key, m.has_fingerprint);
    }

    fn auth_error(&self, out: &mut Vec<u8>, m: &Message, f: AuthFail, now: u64, client: &Client) {
        match f {
            AuthFail::Code(c) => self.error(out, m, c, None, false, None, now, client),
            AuthFail::Challenge(c) => self.error(out, m, c, None, true, None, now, client),
        }
    }

    fn lifetime_ms(&self, m: &Message) -> u64 {
        let req = m
            .get(attr::LIFETIME)
            .filter(|v| v.len() == 4)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        let secs = match req {
            Some(r) => r.min(self.cfg.max_lifetime).max(self.cfg.default_lifetime),
            None => self.cfg.default_lifetime,
        };
        secs as u64 * 1000
    }

    fn allocate(
        &mut self,
        now: u64,
        client: &Client,
        m: &Message,
        out: &mut Vec<u8>,
        relays: &mut dyn RelaySockets,
    ) -> bool {
        let creds = match self.authenticate(now, client, m) {
            Ok(c) => c,
            Err(f) => {
                self.auth_error(out, m, f, now, client);
                return true;
            }
        };
        let key = creds.key;
        if let Some(&rid) = self.by_client.get(client) {
            if let Some(Some(a)) = self.allocs.get(rid as usize)
                && a.alloc_tid == m.tid
                && a.username == creds.username
            {
                // Retransmission: answer again.
                let left = (a.expires.saturating_sub(now) / 1000) as u32;
                let relay_addr = a.relay_addr;
                let mut b = Builder::new(out, method::ALLOCATE, Class::Success, &m.tid);
                b.xor_addr(attr::XOR_RELAYED_ADDRESS, relay_addr)
                    .attr_u32(attr::LIFETIME, left)
                    .xor_addr(attr::XOR_MAPPED_ADDRESS, client.addr);
                b.finish(Some(&key), m.has_fingerprint);
                return true;
            }
            self.error(out, m, 437, Some(&key), false, None, now, client);
            return true;
        }
        match m.get(attr::REQUESTED_TRANSPORT) {
            None => {
                self.error(out, m, 400, Some(&key), false, None, now, client);
                return true;
            }
            Some(v) if v.len() != 4 || v[0] != UDP => {
                self.error(out, m, 442, Some(&key), false, None, now, client);
                return true;
            }
            _ => {}
        }
        let ipv6 = match m.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => false,
            Some([1, ..]) => false,
            Some([2, ..]) => true,
            Some(_) => {
                self.error(out, m, 440, Some(&key), false, None, now, client);
                return true;
            }
        };
        // EVEN-PORT (R bit: also reserve the next port) and RESERVATION-TOKEN.
        let even_port = m.get(attr::EVEN_PORT);
        let token = m.get(attr::RESERVATION_TOKEN);
        if (even_port.is_some() && token.is_some())
            || even_port.is_some_and(|v| v.is_empty())
            || token.is_some_and(|t| t.len() != 8)
            || (token.is_some() && m.get(attr::REQUESTED_ADDRESS_FAMILY).is_some())
        {
            self.error(out, m, 400, Some(&key), false, None, now, client);
            return true;
        }
        // Ports this request takes: two with the R bit (the second is reserved), none when it
        // claims a reservation (already counted).
        let need: u32 = match (even_port, token) {
            (_, Some(_)) => 0,
            (Some(v), None) if v[0] & 0x80 != 0 => 2,
            _ => 1,
        };
        if self.users.get(&creds.user).copied().unwrap_or(0) + need > self.cfg.user_quota {
            self.error(out, m, 486, Some(&key), false, None, now, client);
            return true;
        }
        if self.cfg.group_quota > 0
            && group_of(&creds.user).is_some_and(|g| {
                self.groups.get(g).copied().unwrap_or(0) + need > self.cfg.group_quota
            })
        {
            self.error(out, m, 486, Some(&key), false, None, now, client);
            return true;
        }
        let src = source_key(client.addr.ip());
        if self.sources.get(&src).copied().unwrap_or(0) + need.min(1) > self.cfg.source_quota {
            self.error(out, m, 486, Some(&key), false, None, now, client);
            return true;
        }
        if self.count + self.reserved + need > self.cfg.total_quota {
            self.error(out, m, 508, Some(&key), false, None, now, client);
            return true;
        }
        let mut new_token = None;
        let opened = match (even_port, token) {
            (_, Some(t)) => {
                let mut k = [0u8; 8];
                k.copy_from_slice(t);
                match self.reservations.remove(&k) {
                    Some((rid, addr, _, user)) => {
                        self.unreserve(&user);
                        Ok((rid, addr))
                    }
                    None => Err(508),
                }
            }
            (Some(v), None) if v[0] & 0x80 != 0 => relays.open_pair(ipv6).map(|[a, b]| {
                let t: [u8; 8] = rand::random();
                self.reservations
                    .insert(t, (b.0, b.1, now + RESERVATION_MS, creds.user.clone()));
                self.count_user(&creds.user, 1);
                self.reserved += 1;
                new_token = Some(t);
                a
            }),
            (Some(_), None) => relays.open(ipv6, true),
            (None, None) => relays.open(ipv6, false),
        };
        let (rid, relay_addr) = match opened {
            Ok(r) => r,
            Err(code) => {
                self.error(out, m, code, Some(&key), false, None, now, client);
                return true;
            }
        };
        let lifetime = self.lifetime_ms(m);
        let idx = rid as usize;
        if self.allocs.len() <= idx {
            self.allocs.resize_with(idx + 1, || None);
        }
        if self.allocs[idx].is_some() {
            // The socket layer reused a live id: refuse rather than corrupt state.
            relays.close(rid);
            self.error(out, m, 500, Some(&key), false, None, now, client);
            return true;
        }
        self.count_user(&creds.user, 1);
        *self.sources.entry(src).or_insert(0) += 1;
        self.allocs[idx] = Some(Allocation {
            client: *client,
            relay_addr,
            username: creds.username,
            user: creds.user,
            key,
            expires: now + lifetime,
            alloc_tid: m.tid,
            perms: Vec::new(),
            channels: Vec::new(),
            bucket: Bucket::new(self.cfg.bps, now),
        });
        self.by_client.insert(*client, rid);
        self.count += 1;
        self.metrics.active_allocations.fetch_add(1, Relaxed);
        self.metrics.allocations_total.fetch_add(1, Relaxed);
        let mut b = Builder::new(out, method::ALLOCATE, Class::Success, &m.tid);
        b.xor_addr(attr::XOR_RELAYED_ADDRESS, relay_addr)
            .attr_u32(attr::LIFETIME, (lifetime / 1000) as u32)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, client.addr);
        if let Some(t) = new_token {
            b.attr(attr::RESERVATION_TOKEN, &t);
        }
        b.finish(Some(&key), m.has_fingerprint);
        true
    }

    /// Authenticates a request on an existing allocation: Ok(relay id) or an error written.
    fn existing(
        &self,
        now: u64,
        client: &Client,
        m: &Message,
        out: &mut Vec<u8>,
    ) -> Result<RelayId, ()> {
        let creds = match self.authenticate(now, client, m) {
            Ok(c) => c,
            Err(f) => {
                self.auth_error(out, m, f, now, client);
                return Err(());
            }
        };
        let Some(&rid) = self.by_client.get(client) else {
            self.error(out, m, 437, Some(&creds.key), false, None, now, client);
            return Err(());
        };
        match self.allocs.get(rid as usize) {
            Some(Some(a)) if a.username == creds.username => Ok(rid),
            _ => {
                self.error(out, m, 441, Some(&creds.key), false, None, now, client);
                Err(())
            }
        }
    }

    fn refresh(
        &mut self,
        now: u64,
        client: &Client,
        m: &Message,
        out: &mut Vec<u8>,
        relays: &mut dyn RelaySockets,
    ) -> bool {
        let Ok(rid) = self.existing(now, client, m, out) else {
            return true;
        };
        let lifetime = self.lifetime_ms(m);
        let zero = m.get(attr::LIFETIME) == Some(&[0, 0, 0, 0][..]);
        let Some(Some(a)) = self.allocs.get_mut(rid as usize) else {
            return false;
        };
        let key = a.key;
        if let Some(v) = m.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let v6 = v.first() == Some(&2);
            if v6 == a.relay_addr.is_ipv4() {
                self.error(out, m, 443, Some(&key), false, None, now, client);
                return true;
            }
        }
        let granted = if zero {
            self.remove(rid, relays);
            0
        } else {
            a.expires = now + lifetime;
            (lifetime / 1000) as u32
        };
        let mut b = Builder::new(out, method::REFRESH, Class::Success, &m.tid);
        b.attr_u32(attr::LIFETIME, granted);
        b.finish(Some(&key), m.has_fingerprint);
        true
    }

    fn check_peer(
        &self,
        a: &Allocation,
        peer: Option<Result<SocketAddr, stun::ParseError>>,
    ) -> Result<SocketAddr, u16> {
        let peer = match peer {
            Some(Ok(p)) => p,
            _ => return Err(400),
        };
        if peer.is_ipv4() != a.relay_addr.is_ipv4() {
            return Err(443);
        }
        if !self.cfg.policy.permits(peer.ip()) {
            return Err(403);
        }
        Ok(peer)
    }

    fn create_permission(
        &mut self,
        now: u64,
        client: &Client,
        m: &Message,
        out: &mut Vec<u8>,
    ) -> bool {
        let Ok(rid) = self.existing(now, client, m, out) else {
            return true;
        };
        let Some(Some(a)) = self.allocs.get(rid as usize) else {
            return false;
        };
        let key = a.key;
        let mut peers: Vec<IpAddr> = Vec::new();
        for v in m.get_all(attr::XOR_PEER_ADDRESS) {
            match self.check_peer(a, Some(stun::decode_xor_addr(v, &m.tid))) {
                Ok(p) => peers.push(p.ip()),
                Err(code) => {
                    self.error(out, m, code, Some(&key), false, None, now, client);
                    return true;
                }
            }
        }
        if peers.is_empty() {
            self.error(out, m, 400, Some(&key), false, None, now, client);
            return true;
        }
        let Some(Some(a)) = self.allocs.get_mut(rid as usize) else {
            return false;
        };
        let new = peers
            .iter()
            .filter(|p| !a.perms.iter().any(|(q, _)| q == *p))
            .count();
        if a.perms.len() + new > MAX_PERMISSIONS {
            self.error(out, m, 508, Some(&key), false, None, now, client);
            return true;
        }
        for p in peers {
            install_permission(a, p, now);
        }
        let b = Builder::new(out, method::CREATE_PERMISSION, Class::Success, &m.tid);
        b.finish(Some(&key), m.has_fingerprint);
        true
    }

    fn channel_bind(&mut self, now: u64, client: &Client, m: &Message, out: &mut Vec<u8>) -> bool {
        let Ok(rid) = self.existing(now, client, m, out) else {
            return true;
        };
        let Some(Some(a)) = self.allocs.get(rid as usize) else {
            return false;
        };
        let key = a.key;
        let num = match m.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => {
                self.error(out, m, 400, Some(&key), false, None, now, client);
                return true;
            }
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&num) {
            self.error(out, m, 400, Some(&key), false, None, now, client);
            return true;
        }
        let peer = match self.check_peer(a, m.get_xor_addr(attr::XOR_PEER_ADDRESS)) {
            Ok(p) => p,
            Err(code) => {
                self.error(out, m, code, Some(&key), false, None, now, client);
                return true;
            }
        };
        let conflict = a
            .channels
            .iter()
            .any(|c| (c.num == num) != (c.peer == peer));
        if conflict
            || (a.channels.len() >= MAX_CHANNELS && !a.channels.iter().any(|c| c.num == num))
        {
            self.error(out, m, 400, Some(&key), false, None, now, client);
            return true;
        }
        let Some(Some(a)) = self.allocs.get_mut(rid as usize) else {
            return false;
        };
        match a.channels.iter_mut().find(|c| c.num == num) {
            Some(c) => c.expires = now + CHANNEL_LIFETIME_MS,
            None => a.channels.push(Channel {
                num,
                peer,
                expires: now + CHANNEL_LIFETIME_MS,
            }),
        }
        if a.perms.len() < MAX_PERMISSIONS || a.perms.iter().any(|(q, _)| *q == peer.ip()) {
            install_permission(a, peer.ip(), now);
        }
        let b = Builder::new(out, method::CHANNEL_BIND, Class::Success, &m.tid);
        b.finish(Some(&key), m.has_fingerprint);
        true
    }
}

fn install_permission(a: &mut Allocation, ip: IpAddr, now: u64) {
    match a.perms.iter_mut().find(|(q, _)| *q == ip) {
        Some((_, e)) => *e = now + PERMISSION_LIFETIME_MS,
        None => a.perms.push((ip, now + PERMISSION_LIFETIME_MS)),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

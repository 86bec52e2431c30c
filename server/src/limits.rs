//! What the server allows one participant, one source and one web page: inbound budgets per
//! WebSocket, waiting-seat caps, resume throttles, HTTP connection caps and timeouts, the trusted
//! proxies that may tell the client's address, and the `Host`/`Origin` allow-lists.
//!
//! The `[limits]` table of the configuration is [`LimitsConfig`]; README's "Security" section
//! gives the defaults and what each one promises.
//!
//! The client address behind a proxy is worked out here (a dozen lines) rather than with
//! `axum-client-ip`: that crate picks one header position for a fixed proxy layout, while a
//! clinic may chain a load balancer and a TLS terminator. We walk `X-Forwarded-For` from the
//! right, skipping every hop whose address is a trusted proxy, which is the rule RFC 7239 §7.4
//! recommends, and never believe the header from an untrusted peer.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The `[limits]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub inbound_messages_per_sec: u32,
    pub inbound_message_burst: u32,
    pub inbound_bytes_per_sec: u32,
    pub inbound_byte_burst: u32,
    pub throttled_messages_before_close: u32,
    pub max_waiting: usize,
    pub max_waiting_per_invite: usize,
    pub waiting_timeout_secs: u64,
    pub resumes_per_minute: u32,
    pub resume_burst: u32,
    pub waiting_room_interval_ms: u64,
    pub header_read_timeout_secs: u64,
    pub http_idle_timeout_secs: u64,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub listen_backlog: u32,
    pub trusted_proxies: Vec<IpNet>,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            inbound_messages_per_sec: 50,
            inbound_message_burst: 400,
            inbound_bytes_per_sec: 256 * 1024,
            inbound_byte_burst: 1024 * 1024,
            throttled_messages_before_close: 200,
            max_waiting: 4,
            max_waiting_per_invite: 2,
            waiting_timeout_secs: 1800,
            resumes_per_minute: 30,
            resume_burst: 10,
            waiting_room_interval_ms: 250,
            header_read_timeout_secs: 10,
            http_idle_timeout_secs: 30,
            max_connections: 10_000,
            max_connections_per_source: 256,
            listen_backlog: 4096,
            trusted_proxies: Vec::new(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

impl LimitsConfig {
    /// Ranges serde cannot check; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.inbound_messages_per_sec == 0
            || self.inbound_message_burst == 0
            || self.inbound_bytes_per_sec == 0
            || self.resumes_per_minute == 0
            || self.resume_burst == 0
        {
            return Err("limits: rates and bursts must be at least 1".into());
        }
        if (self.inbound_byte_burst as usize) < bedside_protocol::MAX_MESSAGE_BYTES {
            return Err(format!(
                "limits.inbound-byte-burst must be at least one largest message ({} bytes)",
                bedside_protocol::MAX_MESSAGE_BYTES
            ));
        }
        if self.max_waiting == 0 || self.max_waiting_per_invite == 0 {
            return Err("limits.max-waiting and max-waiting-per-invite must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_connections_per_source == 0 {
            return Err("limits: connection caps must be at least 1".into());
        }
        if self.header_read_timeout_secs == 0 || self.http_idle_timeout_secs == 0 {
            return Err("limits: HTTP timeouts must be at least 1 second".into());
        }
        Ok(())
    }

    pub fn resume_quota(&self) -> Quota {
        Quota::per_minute(nz(self.resumes_per_minute)).allow_burst(nz(self.resume_burst))
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("at least 1")
}

/// One WebSocket's inbound budget: messages and bytes per second, each with a burst.
pub struct Budget {
    messages: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl Budget {
    pub fn new(c: &LimitsConfig) -> Self {
        Budget {
            messages: RateLimiter::direct(
                Quota::per_second(nz(c.inbound_messages_per_sec))
                    .allow_burst(nz(c.inbound_message_burst)),
            ),
            bytes: RateLimiter::direct(
                Quota::per_second(nz(c.inbound_bytes_per_sec))
                    .allow_burst(nz(c.inbound_byte_burst)),
            ),
            clock: DefaultClock::default(),
        }
    }

    /// Charges one message of `bytes`: `None` when the budget had room (it is spent), or how long
    /// to wait before asking again (nothing is spent).
    pub fn charge(&self, bytes: usize) -> Option<Duration> {
        let n = nz(u32::try_from(bytes).unwrap_or(u32::MAX).max(1));
        let now = self.clock.now();
        // A refused byte charge may have spent the message's token; the retry spends another,
        // which errs on the strict side for a sender already over its budget.
        if let Err(wait) = self.messages.check() {
            return Some(wait.wait_time_from(now));
        }
        match self.bytes.check_n(n) {
            Ok(Ok(())) => None,
            Ok(Err(wait)) => Some(wait.wait_time_from(now)),
            // Larger than the burst: validation keeps the burst above the frame limit.
            Err(_) => Some(Duration::from_secs(1)),
        }
    }
}

/// Failed attempts per key (invite codes per source), as a token bucket of `per_minute` that
/// refills continuously: [`FailureBudget::blocked`] while the bucket is empty, and only
/// [`FailureBudget::fail`] spends. A source that redeems right codes is never slowed, and one
/// that guesses is refused (right codes too, since the guess and the right code cannot be told
/// apart before the lookup) until its bucket refills.
///
/// Hand-written rather than a `governor` keyed limiter: governor spends a cell on every check
/// and cannot look without spending, and here the check comes before the lookup while only its
/// outcome may spend. Time is an argument, so the unit test runs without a clock.
pub struct FailureBudget {
    per_minute: f64,
    buckets: std::sync::Mutex<Buckets>,
}

/// Each key's failures left and when that was reckoned.
type Buckets = std::collections::HashMap<IpAddr, (f64, std::time::Instant)>;

impl FailureBudget {
    pub fn new(per_minute: u32) -> Self {
        FailureBudget {
            per_minute: f64::from(per_minute.max(1)),
            buckets: Default::default(),
        }
    }

    fn level(&self, bucket: (f64, std::time::Instant), now: std::time::Instant) -> f64 {
        let refill = now.saturating_duration_since(bucket.1).as_secs_f64() * self.per_minute / 60.0;
        (bucket.0 + refill).min(self.per_minute)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key` has no failure left to spend.
    pub fn blocked(&self, key: &IpAddr, now: std::time::Instant) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|b| self.level(*b, now) < 1.0)
    }

    /// Spends one failure of `key`.
    pub fn fail(&self, key: IpAddr, now: std::time::Instant) {
        let mut buckets = self.lock();
        let level = buckets
            .get(&key)
            .map_or(self.per_minute, |b| self.level(*b, now));
        buckets.insert(key, ((level - 1.0).max(0.0), now));
    }

    /// Forgets the keys whose bucket is full again (they are as good as new).
    pub fn retain_recent(&self, now: std::time::Instant) {
        let mut buckets = self.lock();
        buckets.retain(|_, b| self.level(*b, now) < self.per_minute);
        buckets.shrink_to_fit();
    }
}

/// The key a source is limited by: an IPv4 address, or an IPv6 address's /64 (one subscriber's
/// prefix), with IPv4-mapped IPv6 taken as the IPv4 address it maps.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// rightmost `X-Forwarded-For` hop that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&source_key_exact(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            // A malformed hop: stop at the last address we could trust.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// An IPv4-mapped IPv6 address as its IPv4 address (for CIDR matching).
fn source_key_exact(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.split(']').next())
        .and_then(|h| h.parse().ok())
}

/// The host part of a `Host` header or an origin's authority, lower-cased, without port or
/// brackets.
fn host_only(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("").to_owned();
    }
    match a.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => {
            h.to_owned()
        }
        _ => a,
    }
}

/// The host named by a URL such as the configured public URL.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    (!authority.is_empty()).then(|| host_only(authority))
}

/// The allow-lists for `Host` and `Origin`, fixed at start.
#[derive(Clone, Debug)]
pub struct Gate {
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl Gate {
    pub fn new(public_url: &str, limits: &LimitsConfig) -> Self {
        let mut hosts: Vec<String> = limits.allowed_hosts.iter().map(|h| host_only(h)).collect();
        hosts.push("localhost".into());
        hosts.extend(url_host(public_url));
        let mut origins: Vec<String> = limits
            .allowed_origins
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        if !public_url.is_empty() {
            let o = public_url.trim_end_matches('/').to_ascii_lowercase();
            let o = match o.split_once("://") {
                Some((scheme, rest)) => {
                    format!("{scheme}://{}", rest.split('/').next().unwrap_or(""))
                }
                None => o,
            };
            origins.push(o);
        }
        Gate { hosts, origins }
    }

    /// A `Host` is allowed when it is an IP literal (DNS rebinding always names a host the
    /// attacker controls, never an address), `localhost`, the public URL's host, or listed in
    /// `allowed-hosts`. No `Host` at all (HTTP/1.0) is allowed.
    pub fn host_allowed(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let h = host_only(host);
        h.parse::<IpAddr>().is_ok() || self.hosts.contains(&h)
    }

    /// An `Origin` is allowed when absent (native apps send none), when it is the public URL's
    /// or listed in `allowed-origins`, when it is the page the server itself served (same host
    /// and port as `Host`), or a loopback page.
    pub fn origin_allowed(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        let o = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.contains(&o) {
            return true;
        }
        let Some((scheme, authority)) = o.split_once("://") else {
            return false;
        };
        if !matches!(scheme, "http" | "https") {
            return false;
        }
        if host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority)) {
            return true;
        }
        let h = host_only(authority);
        h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// The `Host` header's value, if any.
pub fn host_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn only_failures_spend_the_invite_budget_and_it_refills() {
        let t0 = std::time::Instant::now();
        let budget = FailureBudget::new(3);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(!budget.blocked(&a, t0));
        for _ in 0..3 {
            budget.fail(a, t0);
        }
        assert!(budget.blocked(&a, t0));
        assert!(!budget.blocked(&b, t0), "another source keeps its budget");
        // One failure comes back every 20 s (3 a minute).
        assert!(budget.blocked(&a, t0 + Duration::from_secs(19)));
        assert!(!budget.blocked(&a, t0 + Duration::from_secs(21)));
        budget.retain_recent(t0 + Duration::from_secs(61));
        assert!(budget.lock().is_empty());
    }

    #[test]
    fn ipv6_sources_are_limited_per_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let m: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(m), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 198.51.100.4, 10.1.1.1"),
        );
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        // The spoofed leftmost hop is ignored: the first untrusted hop from the right wins.
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "198.51.100.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }

    #[test]
    fn hosts_and_origins() {
        let g = Gate::new("https://clinic.example.org", &LimitsConfig::default());
        assert!(g.host_allowed(Some("clinic.example.org")));
        assert!(g.host_allowed(Some("127.0.0.1:8443")));
        assert!(g.host_allowed(Some("[::1]:8443")));
        assert!(g.host_allowed(Some("localhost:8443")));
        assert!(!g.host_allowed(Some("evil.example.com:8443")));
        assert!(g.origin_allowed(None, None));
        assert!(g.origin_allowed(Some("https://clinic.example.org"), None));
        assert!(g.origin_allowed(Some("http://localhost:5173"), None));
        assert!(!g.origin_allowed(Some("https://evil.example.com"), Some("127.0.0.1:8443")));
        assert!(g.origin_allowed(Some("http://127.0.0.1:8443"), Some("127.0.0.1:8443")));
        assert!(!g.origin_allowed(Some("null"), Some("127.0.0.1:8443")));
    }
}

//! Which peer addresses a client may reach through the relay.
//!
//! Safe by default: loopback, "this network" (0.0.0.0/8), RFC 1918, CGNAT (100.64/10),
//! link-local, unique-local (fc00::/7), multicast, broadcast, unspecified, IPv4-mapped and
//! IPv4-compatible forms of those, and the relay's own addresses are refused (403) unless an
//! entry of `allowed-peers` covers them. `allow-loopback-peers` (tests only) lets loopback through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`, a bare address means a host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A CIDR string that did not parse.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid CIDR {0:?}")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let err = || CidrError(s.to_string());
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address matches IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Unwraps IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`, RFC 2765) and
/// IPv4-compatible (`::a.b.c.d`) IPv6 addresses, plus NAT64 (64:ff9b::/96) ones, so policy sees
/// the IPv4 address that would be reached. (The local-use NAT64 prefix 64:ff9b:1::/48 is refused
/// as a whole by [`classify`]: where the IPv4 address sits in it depends on the operator's
/// prefix length.)
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0, 0, 0, 0, 0, 0] && !(s[6] == 0 && s[7] <= 1) {
                // Deprecated IPv4-compatible form; `::` and `::1` stay IPv6.
                return IpAddr::V4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
                return IpAddr::V4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            ip
        }
        v4 => v4,
    }
}

/// Why an address is special.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    /// Globally routable as far as this check knows.
    Public,
    /// Loopback (127/8, ::1).
    Loopback,
    /// Any other non-public range (private, link-local, multicast, unspecified...).
    Special,
}

/// Classifies a peer address (after unwrapping IPv4-mapped forms).
pub fn classify(ip: IpAddr) -> AddrClass {
    match canonical(ip) {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> AddrClass {
    let o = a.octets();
    if o[0] == 127 {
        return AddrClass::Loopback;
    }
    let special = o[0] == 0 // this network, incl. 0.0.0.0
        || a.is_private()
        || a.is_link_local()
        || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 shared address space
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18.0.0/15 benchmarking
        || a.is_multicast()
        || o[0] >= 240; // reserved and broadcast
    if special {
        AddrClass::Special
    } else {
        AddrClass::Public
    }
}

fn classify_v6(a: Ipv6Addr) -> AddrClass {
    if a == Ipv6Addr::LOCALHOST {
        return AddrClass::Loopback;
    }
    let s = a.segments();
    let special = a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xFE00) == 0xFC00 // fc00::/7 unique local
        || (s[0] & 0xFFC0) == 0xFE80 // fe80::/10 link local
        || (s[0] & 0xFFC0) == 0xFEC0 // fec0::/10 deprecated site local
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // 100::/64 discard
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || s[0] == 0x2002 // 6to4 can embed any IPv4 address
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48 local-use NAT64
        || (s[0] == 0x2001 && s[1] == 0); // Teredo can too
    if special {
        AddrClass::Special
    } else {
        AddrClass::Public
    }
}

/// The peer policy of one server.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Networks always allowed, even when special.
    pub allowed: Vec<Cidr>,
    /// Let loopback peers through (tests only).
    pub allow_loopback: bool,
    /// The relay's own addresses (refused unless allowed explicitly).
    pub own: Vec<IpAddr>,
}

impl PeerPolicy {
    /// Whether a client may reach `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.allowed.iter().any(|c| c.contains(ip)) {
            return true;
        }
        let c = canonical(ip);
        match classify(c) {
            AddrClass::Public => !self.own.iter().any(|o| canonical(*o) == c),
            AddrClass::Loopback => self.allow_loopback,
            AddrClass::Special => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classification() {
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.1.2.3",
            "::127.0.0.2",
            "::ffff:0:127.0.0.1",
            "64:ff9b::127.0.0.1",
        ] {
            assert_eq!(classify(ip(s)), AddrClass::Loopback, "{s}");
        }
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::10.0.0.1",
            "::ffff:0:10.0.0.1",
            "::ffff:0:169.254.169.254",
            "64:ff9b:1::a00:1",
            "64:ff9b:1:ffff::7f00:1",
            "2002:0a00:0001::1",
        ] {
            assert_eq!(classify(ip(s)), AddrClass::Special, "{s}");
        }
        for s in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(classify(ip(s)), AddrClass::Public, "{s}");
        }
    }

    #[test]
    fn policy() {
        let mut p = PeerPolicy {
            own: vec![ip("203.0.113.7")],
            ..Default::default()
        };
        assert!(p.permits(ip("8.8.8.8")));
        assert!(!p.permits(ip("127.0.0.1")));
        assert!(!p.permits(ip("::ffff:127.0.0.1")));
        assert!(!p.permits(ip("203.0.113.7")));
        assert!(!p.permits(ip("::ffff:203.0.113.7")));
        assert!(!p.permits(ip("10.0.0.1")));
        p.allow_loopback = true;
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::1")));
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(!p.permits(ip("10.0.0.1")));
        p.allowed.push("10.0.0.0/8".parse().unwrap());
        assert!(p.permits(ip("10.200.0.1")));
        assert!(p.permits(ip("::ffff:10.200.0.1")));
        assert!(p.permits(ip("11.0.0.1")));
        assert!(!p.permits(ip("192.168.0.1")));
    }

    #[test]
    fn cidr_parse() {
        let c: Cidr = "fc00::/7".parse().unwrap();
        assert!(c.contains(ip("fd00::1")));
        assert!(!c.contains(ip("fe00::1")));
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains(ip("1.2.3.4")));
        let h: Cidr = "192.0.2.1".parse().unwrap();
        assert!(h.contains(ip("192.0.2.1")) && !h.contains(ip("192.0.2.2")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}

//! Relay configuration (kebab-case, every field optional with a safe default).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Configuration of the bundled STUN/TURN relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TurnConfig {
    /// Realm sent to clients and mixed into the long-term credential key.
    pub realm: String,
    /// Shared secret of the TURN REST API (coturn's `static-auth-secret`): passwords are
    /// `base64(HMAC-SHA1(auth-secret, username))`. Must not be empty.
    pub auth_secret: String,
    /// UDP addresses answering STUN and TURN (port 0 picks a free port).
    pub listen_udp: Vec<SocketAddr>,
    /// TCP addresses answering STUN and TURN.
    pub listen_tcp: Vec<SocketAddr>,
    /// TLS-over-TCP addresses answering TURN (e.g. `0.0.0.0:443`); needs `tls-cert` and `tls-key`.
    pub listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain for TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// Addresses relay sockets bind to, at most one IPv4 and one IPv6; these are also the
    /// relayed addresses told to clients. Empty: the specific IPs of `listen-udp`.
    pub relay_ips: Vec<IpAddr>,
    /// Public addresses to announce instead of `relay-ips` (at most one per family), for a
    /// host behind 1:1 NAT (coturn's `external-ip`): relay sockets still bind `relay-ips`, but
    /// XOR-RELAYED-ADDRESS carries these. Empty: announce the bound addresses.
    pub relay_advertised_ips: Vec<IpAddr>,
    /// Lowest relay port (inclusive).
    pub relay_port_min: u16,
    /// Highest relay port (inclusive).
    pub relay_port_max: u16,
    /// Peer networks (CIDR) allowed even though they are private, loopback or otherwise special.
    pub allowed_peers: Vec<String>,
    /// Allow loopback peers (127.0.0.0/8, ::1). For tests only.
    pub allow_loopback_peers: bool,
    /// Maximum simultaneous allocations of one user (the part after `:` in the REST username); 486 beyond.
    pub user_quota: u32,
    /// Maximum simultaneous allocations in total; 508 beyond.
    pub total_quota: u32,
    /// Maximum simultaneous allocations of one group: the part of the user id before its first
    /// `/` (Bedside's server names users `<consultation>/<participant>`, so a group is one
    /// consultation); 486 beyond. A user id without `/` is in no group. 0: no group limit.
    /// Bounds what one consultation can hold however many seats it mints credentials for.
    pub group_quota: u32,
    /// Bandwidth limit per allocation in bytes per second, both directions together (0: none).
    pub max_bps_per_allocation: u64,
    /// Lifetime granted when the client asks for none, in seconds.
    pub default_lifetime_secs: u32,
    /// Largest lifetime granted, in seconds.
    pub max_lifetime_secs: u32,
    /// How long a nonce stays valid, in seconds; older ones get 438 Stale Nonce.
    pub nonce_lifetime_secs: u32,
    /// Validity of credentials made by [`crate::TurnConfig::credentials`], in seconds.
    pub credential_ttl_secs: u64,
    /// Kernel socket buffer size asked for UDP sockets, in bytes.
    pub udp_socket_buffer: usize,
    /// Interrupt moderation, in microseconds: after a wake-up that found only a few
    /// datagrams the relay thread waits this long before polling again, so packets are
    /// handled in batches (far fewer wake-ups and syscalls per packet at moderate load). Taken
    /// only while the relay handles at least 20,000 datagrams a second (below that it batches
    /// little and only adds latency); adds at most this much delay per relayed packet; 0
    /// disables it.
    pub coalesce_us: u32,
    /// UDP segmentation offload (Linux): consecutive datagrams of one size to one destination
    /// leave in one `UDP_SEGMENT` send, and the relay's UDP sockets accept `UDP_GRO` buffers
    /// (several datagrams of one source in one read). Used only where the kernel takes the
    /// options; a device that cannot segment turns it off on its first refusal.
    pub udp_offload: bool,
    /// A TCP/TLS client connection that reads nothing for this long is closed, in seconds
    /// (one that has not sent a complete first frame within 10 s is closed sooner).
    pub stream_idle_timeout_secs: u64,
    /// Most TCP/TLS client connections open at once, and from one source address.
    pub max_stream_connections: usize,
    pub max_stream_connections_per_source: usize,
    /// Maximum simultaneous allocations from one client address (IPv6: one /64), whatever
    /// the users; 486 beyond. Bounds what one source can hold with many credentials.
    pub source_quota: u32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            realm: "bedside".into(),
            auth_secret: String::new(),
            listen_udp: vec!["0.0.0.0:3478".parse().expect("valid")],
            listen_tcp: vec!["0.0.0.0:3478".parse().expect("valid")],
            listen_tls: Vec::new(),
            tls_cert: None,
            tls_key: None,
            relay_ips: Vec::new(),
            relay_advertised_ips: Vec::new(),
            relay_port_min: 49152,
            relay_port_max: 65535,
            allowed_peers: Vec::new(),
            allow_loopback_peers: false,
            user_quota: 10,
            total_quota: 10_000,
            group_quota: 50,
            max_bps_per_allocation: 2_500_000,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            nonce_lifetime_secs: 600,
            credential_ttl_secs: 86_400,
            udp_socket_buffer: 4 << 20,
            coalesce_us: 200,
            udp_offload: true,
            stream_idle_timeout_secs: 60,
            max_stream_connections: 4096,
            max_stream_connections_per_source: 64,
            source_quota: 200,
        }
    }
}

impl TurnConfig {
    /// TURN REST credentials for `user_id`, valid for `credential-ttl-secs` from `now_unix`.
    pub fn credentials(&self, user_id: &str, now_unix: u64) -> (String, String) {
        crate::rest_credentials(
            &self.auth_secret,
            user_id,
            std::time::Duration::from_secs(self.credential_ttl_secs),
            now_unix,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_case_defaults_and_unknown_fields() {
        let c: TurnConfig = serde_json::from_str(
            r#"{"auth-secret":"s","allow-loopback-peers":true,"relay-ips":["127.0.0.1"]}"#,
        )
        .unwrap();
        assert_eq!(c.auth_secret, "s");
        assert!(c.allow_loopback_peers);
        assert_eq!(c.default_lifetime_secs, 600);
        assert!(serde_json::from_str::<TurnConfig>(r#"{"no-such":1}"#).is_err());
        let back: TurnConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}

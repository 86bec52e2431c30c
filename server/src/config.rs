//! Server configuration: a kebab-case TOML file whose commented reference is
//! `config.reference.toml` (printed by `bedside-server --print-config`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The commented reference configuration, which is also the default.
pub const REFERENCE_TOML: &str = include_str!("../config.reference.toml");

/// Everything `bedside-server` can be told. See `config.reference.toml` for each field's meaning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: String,
    pub data_dir: PathBuf,
    pub admin_api_key: String,
    pub token_secret: String,
    pub join_token_ttl_secs: u64,
    pub invite_ttl_secs: u64,
    pub max_invite_ttl_secs: u64,
    pub rejoin_window_secs: u64,
    pub keepalive_interval_secs: u64,
    pub keepalive_timeout_secs: u64,
    pub join_timeout_secs: u64,
    pub invite_attempts_per_minute: u32,
    pub max_participants: usize,
    pub tls: TlsConfig,
    pub ice: IceConfig,
    pub turn: TurnSection,
    /// The selective forwarding unit for group consultations (`[sfu]`).
    pub sfu: SfuSection,
    /// Budgets, caps, timeouts, trusted proxies, host and origin allow-lists (`[limits]`).
    pub limits: crate::limits::LimitsConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub alerts: crate::alerts::AlertsConfig,
    /// The join page's app links (`/.well-known/…`).
    pub web: crate::web::WebSection,
    /// Where the durable data lives: SQLite (default) or PostgreSQL (`[store]`).
    pub store: crate::store::StoreConfig,
    /// `text` (colour only on a terminal, `NO_COLOR` honoured) or `json` (one object a line).
    pub log_format: LogFormat,
    /// Days the audit log is kept; older rows and the consultations that ended before are
    /// pruned daily. 0 keeps everything.
    pub audit_retention_days: u32,
    /// Files holding the secrets instead of the file or the store (for containers and systemd
    /// credentials). The environment (`BEDSIDE_ADMIN_API_KEY`, `BEDSIDE_TOKEN_SECRET`,
    /// `BEDSIDE_TURN_SECRET`) may also carry them; see [`Config::load_secrets`].
    pub admin_api_key_file: PathBuf,
    pub token_secret_file: PathBuf,
    pub turn_secret_file: PathBuf,
    /// A fleet node (`[cluster]`): live state in Redis, any node serves any participant. Absent
    /// (the default), the server is one process with nothing else to run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The bundled STUN/TURN relay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TurnSection {
    pub enabled: bool,
    pub public_host: String,
    pub relay: bedside_turn::TurnConfig,
}

impl Default for TurnSection {
    fn default() -> Self {
        TurnSection {
            enabled: true,
            public_host: String::new(),
            relay: bedside_turn::TurnConfig::default(),
        }
    }
}

/// The in-process SFU (`bedside-sfu`): its UDP socket and the address clients reach it on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct SfuSection {
    /// Off by default until group calls through it pass end to end (see ARCHITECTURE.md,
    /// `sfu/`): group consultations stay a mesh of peer connections, which works today.
    pub enabled: bool,
    /// `ip:port` of the UDP socket. Empty: the signaling address's IP, a port the OS picks.
    pub listen: String,
    /// `ip:port` put in answers as the SFU's one ICE candidate. Empty: the bound address
    /// (an unspecified IP becomes 127.0.0.1, so set this when listening on 0.0.0.0).
    pub public_address: String,
}

impl SfuSection {
    /// The settings the SFU starts with, given the signaling listen address.
    pub fn settings(&self, signaling: SocketAddr) -> Result<bedside_sfu::SfuSettings, String> {
        let listen = if self.listen.is_empty() {
            SocketAddr::new(signaling.ip(), 0)
        } else {
            self.listen
                .parse()
                .map_err(|_| format!("sfu.listen {:?} is not ip:port", self.listen))?
        };
        let public = if self.public_address.is_empty() {
            None
        } else {
            Some(self.public_address.parse().map_err(|_| {
                format!(
                    "sfu.public-address {:?} is not ip:port",
                    self.public_address
                )
            })?)
        };
        Ok(bedside_sfu::SfuSettings { listen, public })
    }
}

/// The port the relay listens on unless configured otherwise.
pub const TURN_PORT: u16 = 3478;

/// How the server terminates TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Auto,
    Off,
    SelfSigned,
    Files,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct IceConfig {
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    pub turn_secret: String,
    pub turn_credential_ttl_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            public_url: String::new(),
            data_dir: PathBuf::new(),
            admin_api_key: String::new(),
            token_secret: String::new(),
            join_token_ttl_secs: 900,
            invite_ttl_secs: 4 * 3600,
            max_invite_ttl_secs: 7 * 24 * 3600,
            rejoin_window_secs: 60,
            keepalive_interval_secs: 2,
            keepalive_timeout_secs: 6,
            join_timeout_secs: 10,
            invite_attempts_per_minute: 10,
            max_participants: 8,
            tls: TlsConfig::default(),
            ice: IceConfig::default(),
            turn: TurnSection::default(),
            sfu: SfuSection::default(),
            limits: crate::limits::LimitsConfig::default(),
            telemetry: Default::default(),
            alerts: Default::default(),
            web: crate::web::WebSection::default(),
            store: crate::store::StoreConfig::default(),
            log_format: LogFormat::Text,
            audit_retention_days: 0,
            admin_api_key_file: PathBuf::new(),
            token_secret_file: PathBuf::new(),
            turn_secret_file: PathBuf::new(),
            cluster: None,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            mode: TlsMode::Auto,
            cert: PathBuf::new(),
            key: PathBuf::new(),
        }
    }
}

impl Default for IceConfig {
    fn default() -> Self {
        IceConfig {
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret: String::new(),
            turn_credential_ttl_secs: 600,
        }
    }
}

/// A configuration that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; every setting it leaves out keeps its default.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks what serde cannot: ranges and settings that only make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.rejoin_window_secs == 0 {
            return bad("rejoin-window-secs must be at least 1");
        }
        if self.keepalive_interval_secs == 0
            || self.keepalive_timeout_secs <= self.keepalive_interval_secs
        {
            return bad("keepalive-timeout-secs must be longer than keepalive-interval-secs (> 0)");
        }
        if self.join_token_ttl_secs == 0 || self.invite_ttl_secs == 0 {
            return bad("token and invite lifetimes must be at least 1 second");
        }
        if self.invite_ttl_secs > self.max_invite_ttl_secs {
            return bad("invite-ttl-secs is longer than max-invite-ttl-secs");
        }
        if self.invite_attempts_per_minute == 0 {
            return bad("invite-attempts-per-minute must be at least 1");
        }
        if self.max_participants < 2 {
            return bad("max-participants must be at least 2");
        }
        if !self.ice.turn_urls.is_empty() && self.ice.turn_secret.is_empty() {
            return bad("ice.turn-urls needs ice.turn-secret");
        }
        if self.turn.enabled
            && self.listen.ip().is_unspecified()
            && self.turn.relay.relay_ips.is_empty()
            && self.turn.public_host.is_empty()
        {
            return bad(
                "listening on all addresses: set turn.public-host and turn.relay.relay-ips \
                 (the address peers reach the relay at), or turn.enabled = false",
            );
        }
        if self.tls.mode == TlsMode::Files
            && (self.tls.cert.as_os_str().is_empty() || self.tls.key.as_os_str().is_empty())
        {
            return bad("tls.mode = \"files\" needs tls.cert and tls.key");
        }
        self.limits.validate().map_err(ConfigError::Invalid)?;
        self.alerts.validate().map_err(ConfigError::Invalid)?;
        if self.telemetry.window_secs == 0 {
            return bad("telemetry.window-secs must be at least 1");
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(ConfigError::Invalid)?;
        }
        if !self.admin_api_key.is_empty() && self.admin_api_key.len() < 16 {
            return bad("admin-api-key must be at least 16 characters");
        }
        Ok(())
    }

    /// The data directory, with the platform default filled in.
    pub fn data_dir(&self) -> PathBuf {
        if !self.data_dir.as_os_str().is_empty() {
            return self.data_dir.clone();
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(xdg).join("bedside");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(home).join(".local/share/bedside");
        }
        PathBuf::from("bedside-data")
    }

    pub fn rejoin_window(&self) -> Duration {
        Duration::from_secs(self.rejoin_window_secs)
    }

    /// The relay's configuration with what was left unset filled in: it listens on the
    /// signaling address's IP, port 3478 (UDP and TCP), and uses `secret`.
    pub fn turn_relay(&self, secret: &str) -> bedside_turn::TurnConfig {
        let defaults = bedside_turn::TurnConfig::default();
        let mut relay = self.turn.relay.clone();
        let here = SocketAddr::new(self.listen.ip(), TURN_PORT);
        if relay.listen_udp == defaults.listen_udp {
            relay.listen_udp = vec![here];
        }
        if relay.listen_tcp == defaults.listen_tcp {
            relay.listen_tcp = vec![here];
        }
        if relay.auth_secret.is_empty() {
            relay.auth_secret = secret.to_owned();
        }
        relay
    }

    /// Whether TLS is on, once `auto` is resolved against the listen address.
    pub fn tls_enabled(&self) -> bool {
        match self.tls.mode {
            TlsMode::Auto => !self.listen.ip().is_loopback(),
            TlsMode::Off => false,
            TlsMode::SelfSigned | TlsMode::Files => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_file_is_the_default() {
        assert_eq!(
            Config::from_toml(REFERENCE_TOML).unwrap(),
            Config::default()
        );
        Config::default().validate().unwrap();
    }

    #[test]
    fn an_empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("rejoin-windw-secs = 5").unwrap_err();
        assert!(err.to_string().contains("rejoin-windw-secs"), "{err}");
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let c = Config {
            keepalive_timeout_secs: 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.ice.turn_urls = vec!["turn:x:3478".into()];
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.tls.mode = TlsMode::Files;
        assert!(c.validate().is_err());
    }

    #[test]
    fn tls_auto_is_off_only_on_loopback() {
        assert!(!Config::default().tls_enabled());
        let c = Config {
            listen: "0.0.0.0:8443".parse().unwrap(),
            ..Config::default()
        };
        assert!(c.tls_enabled());
    }
}

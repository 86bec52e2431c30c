//! Prometheus metrics, served as text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Which limit held an attacker (or a heavy client) back.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabel {
    pub direction: &'static str,
    pub r#type: &'static str,
}

/// Every metric the signaling server exports.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub consultations_active: Gauge,
    pub participants_connected: Gauge,
    pub joins: Family<RoleLabel, Counter>,
    pub admissions: Counter,
    pub denials: Counter,
    pub resumes: Family<ResultLabel, Counter>,
    pub seats_timed_out: Counter,
    pub errors: Family<CodeLabel, Counter>,
    pub messages: Family<MessageLabel, Counter>,
    pub stats_rtt_seconds: Histogram,
    pub http_connections: Gauge,
    pub limited: Family<LimitLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bedside");
        let m = Metrics {
            connections: Gauge::default(),
            consultations_active: Gauge::default(),
            participants_connected: Gauge::default(),
            joins: Family::default(),
            admissions: Counter::default(),
            denials: Counter::default(),
            resumes: Family::default(),
            seats_timed_out: Counter::default(),
            errors: Family::default(),
            messages: Family::default(),
            stats_rtt_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 10)),
            http_connections: Gauge::default(),
            limited: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_connections",
            "Open TCP connections to the API and signaling port",
            m.http_connections.clone(),
        );
        registry.register(
            "limited",
            "Times a limit refused, throttled, closed or dropped something, by limit",
            m.limited.clone(),
        );
        registry.register(
            "websocket_connections",
            "Open signaling WebSockets",
            m.connections.clone(),
        );
        registry.register(
            "consultations_active",
            "Consultations with at least one seat",
            m.consultations_active.clone(),
        );
        registry.register(
            "participants_connected",
            "Participants whose link is up",
            m.participants_connected.clone(),
        );
        registry.register("joins", "Successful joins by role", m.joins.clone());
        registry.register(
            "admissions",
            "Patients admitted from the waiting room",
            m.admissions.clone(),
        );
        registry.register(
            "denials",
            "Patients denied from the waiting room",
            m.denials.clone(),
        );
        registry.register("resumes", "Resume attempts by result", m.resumes.clone());
        registry.register(
            "seats_timed_out",
            "Seats released because the rejoin window passed",
            m.seats_timed_out.clone(),
        );
        registry.register(
            "errors",
            "Error replies sent, by stable code",
            m.errors.clone(),
        );
        registry.register(
            "messages",
            "Signaling messages by direction and type",
            m.messages.clone(),
        );
        registry.register(
            "client_rtt_seconds",
            "Round-trip times reported by clients' call statistics",
            m.stats_rtt_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn error(&self, code: bedside_protocol::ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// Counts one hit of `limit`.
    pub fn limit(&self, limit: &'static str) {
        self.limited.get_or_create(&LimitLabel { limit }).inc();
    }

    pub fn message(&self, direction: &'static str, r#type: &'static str) {
        self.messages
            .get_or_create(&MessageLabel { direction, r#type })
            .inc();
    }
}

//! Prometheus metrics, served as text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// prometheus-client's OpenMetrics text as Prometheus' classic text format (0.0.4), for
/// scrapers and tools that read only that (promtool's `check metrics`). prometheus-client
/// writes OpenMetrics alone; the two differ, for what it emits, only in that a counter family
/// is named without `_total` (its samples carry it) and in the `# EOF` and `# UNIT` lines, so
/// this rewrites those few lines rather than keep a second encoder.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

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
pub struct QualityLabel {
    pub quality: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// How a patient's stay in the waiting room ended.
pub const OUTCOME_ADMITTED: &str = "admitted";
pub const OUTCOME_DENIED: &str = "denied";
pub const OUTCOME_LEFT: &str = "left";

/// Buckets (seconds) of the join→admitted and waiting-room histograms: 0.1 s to about 27 min.
fn wait_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.1, 2.0, 15)
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
    /// From a join to its admission (0 for doctors and clinicians, admitted on joining).
    pub join_admitted_seconds: Histogram,
    /// A patient's time in the waiting room, by how it ended.
    pub waiting_room_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    /// Live calls by their quality score (set by the dashboard's feed every second).
    pub calls: Family<QualityLabel, Gauge>,
    /// The bundled relay's `total-quota` (0 without it).
    pub relay_allocation_quota: Gauge,
    /// The longest a held seat's link has been down now, seconds.
    pub seat_held_longest_seconds: Gauge,
    /// A fleet node: 1 while its subscription to the region's Redis is live.
    pub cluster_redis_up: Gauge,
    /// A fleet node: links relayed to another node's consultation, and messages published to
    /// other nodes.
    pub cluster_relayed_links: Counter,
    pub cluster_published: Counter,
    /// A fleet node: joins and resumes sent to the consultation's own region.
    pub cluster_redirects: Counter,
    /// A fleet node: its bundled relay's relayed bandwidth over the last load period, bits/s.
    pub cluster_relay_bandwidth: Gauge,
    /// A fleet node: every node of the region as it last published its load (relay live
    /// allocations and relayed bandwidth), so one scrape shows the region to an autoscaler.
    pub fleet_relay_allocations: Family<NodeLabel, Gauge>,
    pub fleet_relay_bandwidth: Family<NodeLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
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
            join_admitted_seconds: Histogram::new(wait_buckets()),
            waiting_room_seconds: Family::new_with_constructor(|| Histogram::new(wait_buckets())),
            calls: Family::default(),
            relay_allocation_quota: Gauge::default(),
            seat_held_longest_seconds: Gauge::default(),
            cluster_redis_up: Gauge::default(),
            cluster_relayed_links: Counter::default(),
            cluster_published: Counter::default(),
            cluster_redirects: Counter::default(),
            cluster_relay_bandwidth: Gauge::default(),
            fleet_relay_allocations: Family::default(),
            fleet_relay_bandwidth: Family::default(),
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
        registry.register(
            "join_admitted_seconds",
            "Time from a join to its admission (0 for doctors and clinicians)",
            m.join_admitted_seconds.clone(),
        );
        registry.register(
            "waiting_room_seconds",
            "Time patients spent in the waiting room, by outcome (admitted, denied, left)",
            m.waiting_room_seconds.clone(),
        );
        registry.register(
            "calls",
            "Live calls by quality score (good, fair, poor; the shared score of bedside-protocol)",
            m.calls.clone(),
        );
        registry.register(
            "relay_allocation_quota",
            "The bundled relay's total allocation quota (0 when it does not run)",
            m.relay_allocation_quota.clone(),
        );
        registry.register(
            "seat_held_longest_seconds",
            "The longest any held seat's link has been down now",
            m.seat_held_longest_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The fleet's families, registered only on a fleet node.
    pub fn register_cluster(&mut self) {
        self.registry.register(
            "cluster_redis_up",
            "1 while this fleet node's subscription to the region's Redis is live",
            self.cluster_redis_up.clone(),
        );
        self.registry.register(
            "cluster_relayed_links",
            "Signaling links this node relayed to the consultation's home node",
            self.cluster_relayed_links.clone(),
        );
        self.registry.register(
            "cluster_published",
            "Messages this node published to other fleet nodes",
            self.cluster_published.clone(),
        );
        self.registry.register(
            "cluster_redirects",
            "Joins and resumes this node sent to their consultation's region",
            self.cluster_redirects.clone(),
        );
        self.registry.register(
            "cluster_relay_bandwidth_bits_per_second",
            "This node's bundled relay: relayed bandwidth over the last 2 s (0 without a relay)",
            self.cluster_relay_bandwidth.clone(),
        );
        self.registry.register(
            "fleet_relay_allocations",
            "Live relay allocations of each node of the region, as it last published them",
            self.fleet_relay_allocations.clone(),
        );
        self.registry.register(
            "fleet_relay_bandwidth_bits_per_second",
            "Relayed bandwidth of each node of the region, as it last published it",
            self.fleet_relay_bandwidth.clone(),
        );
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Adds the bundled relay's families (`bedside_turn_*`) to this exposition.
    pub fn register_relay(&mut self, relay: std::sync::Arc<bedside_turn::Metrics>) {
        self.registry
            .sub_registry_with_prefix("turn")
            .register_collector(Box::new(relay));
    }

    /// Adds the in-process SFU's families (`bedside_sfu_*`: participants, datagrams and bytes,
    /// forwarded packets and frames, keyframe requests relayed and suppressed, the
    /// receive-to-send histogram; see `bedside_sfu::metrics`).
    pub fn register_sfu(&mut self, sfu: bedside_sfu::SfuMetrics) {
        self.registry
            .sub_registry_with_prefix("sfu")
            .register_collector(Box::new(sfu));
    }

    /// The store's health: `bedside_store_up`, `bedside_store_buffered_writes`,
    /// `bedside_store_dropped_writes_total` (see `store/postgres.rs`).
    pub fn register_store(&mut self, health: &crate::store::StoreHealth) {
        let store = self.registry.sub_registry_with_prefix("store");
        store.register(
            "up",
            "1 while the store (SQLite file or PostgreSQL database) answers",
            health.up.clone(),
        );
        store.register(
            "buffered_writes",
            "Audit events and seat changes waiting in memory for the database",
            health.buffered.clone(),
        );
        store.register(
            "dropped_writes",
            "Audit events and seat changes dropped because the outage buffer was full",
            health.dropped.clone(),
        );
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

    /// Records a patient's stay in the waiting room.
    pub fn waited(&self, outcome: &'static str, secs: f64) {
        self.waiting_room_seconds
            .get_or_create(&OutcomeLabel { outcome })
            .observe(secs);
    }

    pub fn message(&self, direction: &'static str, r#type: &'static str) {
        self.messages
            .get_or_create(&MessageLabel { direction, r#type })
            .inc();
    }
}

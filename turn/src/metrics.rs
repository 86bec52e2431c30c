//! Counters of a running relay: atomics, cheap to read from any thread.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Error codes counted separately (anything else counts as the last slot).
pub const ERROR_CODES: [u16; 14] = [
    400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508, 0,
];

/// Upper bounds (microseconds) of the allocation latency histogram buckets; the last is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 7] = [10, 50, 100, 500, 1_000, 5_000, u64::MAX];

/// Live counters of one relay. Read with [`Metrics::snapshot`] or [`Metrics::prometheus`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// Allocations alive now (gauge).
    pub active_allocations: AtomicI64,
    /// Allocations created since start.
    pub allocations_total: AtomicU64,
    /// Packets relayed (both directions).
    pub relayed_packets: AtomicU64,
    /// Payload bytes relayed (both directions).
    pub relayed_bytes: AtomicU64,
    /// Packets dropped: no permission, bandwidth quota, send failures.
    pub dropped_packets: AtomicU64,
    /// STUN Binding requests answered.
    pub binding_requests: AtomicU64,
    /// Error responses sent, by code (indices of [`ERROR_CODES`]).
    pub errors: [AtomicU64; ERROR_CODES.len()],
    /// Sum of Allocate handling times in microseconds.
    pub allocate_latency_us_sum: AtomicU64,
    /// Number of Allocate requests timed.
    pub allocate_latency_count: AtomicU64,
    /// Histogram of Allocate handling times (buckets of [`LATENCY_BUCKETS_US`], not cumulative).
    pub allocate_latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    /// UDP datagrams sent as segments of a GSO send (several to one destination, one syscall
    /// and one trip through the stack).
    pub gso_datagrams: AtomicU64,
    /// UDP datagrams received as segments of a GRO buffer (several from one source, one read).
    pub gro_datagrams: AtomicU64,
}

/// A plain copy of [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Allocations alive now.
    pub active_allocations: i64,
    /// Allocations created since start.
    pub allocations_total: u64,
    /// Packets relayed.
    pub relayed_packets: u64,
    /// Payload bytes relayed.
    pub relayed_bytes: u64,
    /// Packets dropped.
    pub dropped_packets: u64,
    /// Binding requests answered.
    pub binding_requests: u64,
    /// Error responses by code (code 0 means "other"), only nonzero ones.
    pub errors: Vec<(u16, u64)>,
    /// Sum of Allocate handling times in microseconds.
    pub allocate_latency_us_sum: u64,
    /// Number of Allocate requests timed.
    pub allocate_latency_count: u64,
    /// Datagrams sent inside GSO sends.
    pub gso_datagrams: u64,
    /// Datagrams received inside GRO buffers.
    pub gro_datagrams: u64,
}

impl Metrics {
    /// Counts an error response.
    pub fn error(&self, code: u16) {
        let i = ERROR_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(ERROR_CODES.len() - 1);
        self.errors[i].fetch_add(1, Relaxed);
    }

    /// Error responses sent with `code` so far.
    pub fn errors_with(&self, code: u16) -> u64 {
        ERROR_CODES
            .iter()
            .position(|c| *c == code)
            .map(|i| self.errors[i].load(Relaxed))
            .unwrap_or(0)
    }

    /// Records how long one Allocate took to handle.
    pub fn allocate_latency(&self, us: u64) {
        self.allocate_latency_us_sum.fetch_add(us, Relaxed);
        self.allocate_latency_count.fetch_add(1, Relaxed);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len() - 1);
        self.allocate_latency_buckets[i].fetch_add(1, Relaxed);
    }

    /// A plain copy.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            active_allocations: self.active_allocations.load(Relaxed),
            allocations_total: self.allocations_total.load(Relaxed),
            relayed_packets: self.relayed_packets.load(Relaxed),
            relayed_bytes: self.relayed_bytes.load(Relaxed),
            dropped_packets: self.dropped_packets.load(Relaxed),
            binding_requests: self.binding_requests.load(Relaxed),
            errors: ERROR_CODES
                .iter()
                .zip(self.errors.iter())
                .map(|(c, n)| (*c, n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            allocate_latency_us_sum: self.allocate_latency_us_sum.load(Relaxed),
            allocate_latency_count: self.allocate_latency_count.load(Relaxed),
            gso_datagrams: self.gso_datagrams.load(Relaxed),
            gro_datagrams: self.gro_datagrams.load(Relaxed),
        }
    }

    /// Prometheus text exposition (OpenMetrics, metric names prefixed `bedside_turn_`), for
    /// `--only-turn`. `bedside-server` registers [`Metrics`] as a collector in its own registry
    /// instead, so its `/metrics` is one exposition.
    pub fn prometheus(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("bedside_turn");
        registry.register_collector(Box::new(Collector(self.snapshot_full())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn snapshot_full(&self) -> Full {
        Full {
            s: self.snapshot(),
            errors: ERROR_CODES
                .iter()
                .zip(self.errors.iter())
                .map(|(c, n)| (*c, n.load(Relaxed)))
                .collect(),
            buckets: LATENCY_BUCKETS_US
                .iter()
                .zip(self.allocate_latency_buckets.iter())
                .map(|(b, n)| {
                    let le = if *b == u64::MAX {
                        f64::MAX
                    } else {
                        *b as f64 / 1e6
                    };
                    (le, n.load(Relaxed))
                })
                .collect(),
        }
    }
}

/// Everything one scrape reads, copied once.
#[derive(Debug)]
struct Full {
    s: MetricsSnapshot,
    /// Every error code with its count (0 included, so the family is always present).
    errors: Vec<(u16, u64)>,
    /// Allocate latency buckets: (upper bound in seconds, count in that bucket alone).
    buckets: Vec<(f64, u64)>,
}

/// The relay's metrics as a prometheus-client collector. The counters stay plain atomics
/// (the hot path adds to them per packet); a scrape copies them and encodes the copy, with
/// HELP text for every family.
#[derive(Debug)]
struct Collector(Full);

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Full { s, errors, buckets } = &self.0;
        ConstGauge::new(s.active_allocations).encode(encoder.encode_descriptor(
            "active_allocations",
            "TURN allocations alive now",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, v) in [
            (
                "allocations",
                "TURN allocations created",
                s.allocations_total,
            ),
            (
                "relayed_packets",
                "Packets relayed, both directions",
                s.relayed_packets,
            ),
            (
                "relayed_bytes",
                "Payload bytes relayed, both directions",
                s.relayed_bytes,
            ),
            (
                "dropped_packets",
                "Packets dropped: no permission, bandwidth quota, send failures",
                s.dropped_packets,
            ),
            (
                "binding_requests",
                "STUN Binding requests answered",
                s.binding_requests,
            ),
            (
                "gso_datagrams",
                "UDP datagrams sent as segments of a GSO send",
                s.gso_datagrams,
            ),
            (
                "gro_datagrams",
                "UDP datagrams received as segments of a GRO buffer",
                s.gro_datagrams,
            ),
        ] {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "error_responses",
            "STUN/TURN error responses sent, by code",
            None,
            MetricType::Counter,
        )?;
        for (code, n) in errors {
            let code = if *code == 0 {
                "other".to_owned()
            } else {
                code.to_string()
            };
            let labels = [("code", code.as_str())];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        encoder
            .encode_descriptor(
                "allocate_seconds",
                "Time to handle an Allocate request",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                s.allocate_latency_us_sum as f64 / 1e6,
                s.allocate_latency_count,
                buckets,
                None,
            )
    }
}

impl prometheus_client::collector::Collector for Metrics {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        prometheus_client::collector::Collector::encode(&Collector(self.snapshot_full()), encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_its_values() {
        let m = Metrics::default();
        m.relayed_packets.fetch_add(3, Relaxed);
        m.active_allocations.fetch_add(2, Relaxed);
        m.error(486);
        m.error(999);
        m.allocate_latency(70);
        let text = m.prometheus();
        for family in [
            "active_allocations",
            "allocations",
            "relayed_packets",
            "relayed_bytes",
            "dropped_packets",
            "binding_requests",
            "gso_datagrams",
            "gro_datagrams",
            "error_responses",
            "allocate_seconds",
        ] {
            assert!(
                text.contains(&format!("# HELP bedside_turn_{family} ")),
                "{family}: {text}"
            );
        }
        for sample in [
            "bedside_turn_active_allocations 2",
            "bedside_turn_relayed_packets_total 3",
            "bedside_turn_error_responses_total{code=\"486\"} 1",
            "bedside_turn_error_responses_total{code=\"other\"} 1",
            "bedside_turn_allocate_seconds_bucket{le=\"0.00005\"} 0",
            "bedside_turn_allocate_seconds_bucket{le=\"0.0001\"} 1",
            "bedside_turn_allocate_seconds_bucket{le=\"+Inf\"} 1",
            "bedside_turn_allocate_seconds_count 1",
        ] {
            assert!(text.contains(sample), "{sample}: {text}");
        }
        assert!(text.trim_end().ends_with("# EOF"));
    }
}

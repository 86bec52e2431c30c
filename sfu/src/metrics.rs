//! What the SFU counts, for `/metrics`: the core's [`Counters`] (participants, datagrams and
//! bytes, frames forwarded, keyframe requests relayed and suppressed) and the socket loop's
//! [`IoMetrics`] (RTP packets sent, send failures, and how long a datagram spends in the SFU
//! from its receive to the send of what it released). All plain atomics, added to on the hot
//! path; a scrape copies them ([`SfuMetrics`] is a prometheus-client collector, families
//! `bedside_sfu_*` once registered under the server's `bedside` prefix with `sfu`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::core::Counters;

/// Upper bounds (microseconds) of the receive-to-send histogram's buckets; the last is +Inf.
pub const FORWARD_BUCKETS_US: [u64; 12] = [
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    100_000,
    u64::MAX,
];

/// The socket loop's own counts.
#[derive(Debug, Default)]
pub struct IoMetrics {
    /// RTP packets sent (media, not RTCP or STUN/DTLS).
    pub rtp_out: AtomicU64,
    /// Datagrams the kernel refused to send (a full buffer, an unreachable client): dropped.
    pub send_errors: AtomicU64,
    /// Datagrams whose receive released something sent in the same wake-up, by the time from
    /// the receive call's return to the send call's (buckets of [`FORWARD_BUCKETS_US`], each
    /// counting its own range, not cumulative).
    pub forward_buckets: [AtomicU64; FORWARD_BUCKETS_US.len()],
    pub forward_sum_us: AtomicU64,
    pub forward_count: AtomicU64,
}

impl IoMetrics {
    /// Records `n` datagrams that each spent `us` microseconds in the SFU.
    pub fn forwarded(&self, us: u64, n: u64) {
        if n == 0 {
            return;
        }
        let i = FORWARD_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(FORWARD_BUCKETS_US.len() - 1);
        self.forward_buckets[i].fetch_add(n, Relaxed);
        self.forward_sum_us.fetch_add(us * n, Relaxed);
        self.forward_count.fetch_add(n, Relaxed);
    }

    /// The bucket counts now (for a delta between two readings).
    pub fn forward_snapshot(&self) -> [u64; FORWARD_BUCKETS_US.len()] {
        std::array::from_fn(|i| self.forward_buckets[i].load(Relaxed))
    }
}

/// The upper bound (microseconds) of the bucket holding quantile `q` of `counts` (per-bucket
/// counts in [`FORWARD_BUCKETS_US`] order); `None` when empty.
pub fn quantile_bound_us(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(FORWARD_BUCKETS_US[i]);
        }
    }
    FORWARD_BUCKETS_US.last().copied()
}

/// Everything the SFU exports, shared by its thread and the scraper.
#[derive(Clone, Debug, Default)]
pub struct SfuMetrics {
    pub counters: Arc<Counters>,
    pub io: Arc<IoMetrics>,
}

impl prometheus_client::collector::Collector for SfuMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        ConstGauge::new(c.participants.load(Relaxed) as i64).encode(encoder.encode_descriptor(
            "participants",
            "Participants whose connection to the SFU is up (one connection each)",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, v) in [
            (
                "received_datagrams",
                "Datagrams the SFU received (media, RTCP, STUN, DTLS)",
                &c.datagrams_in,
            ),
            (
                "received_bytes",
                "Bytes of datagrams the SFU received",
                &c.bytes_in,
            ),
            (
                "sent_datagrams",
                "Datagrams the SFU sent (forwarded media, RTCP, STUN, DTLS)",
                &c.datagrams_out,
            ),
            (
                "sent_bytes",
                "Bytes of datagrams the SFU sent",
                &c.bytes_out,
            ),
            (
                "forwarded_packets",
                "RTP media packets the SFU sent to subscribers",
                &self.io.rtp_out,
            ),
            (
                "forwarded_frames",
                "Audio and video frames the SFU wrote to subscribers",
                &c.frames_forwarded,
            ),
            (
                "keyframe_requests_relayed",
                "Keyframe requests (PLI) the SFU sent to publishers, for subscribers or after a gap",
                &c.keyframe_requests,
            ),
            (
                "keyframe_requests_suppressed",
                "Keyframe requests merged into one already sent less than 500 ms before",
                &c.keyframe_requests_suppressed,
            ),
            (
                "unclaimed_datagrams",
                "Datagrams no SFU connection claimed (dropped)",
                &c.unclaimed,
            ),
            (
                "send_errors",
                "Datagrams the kernel refused to send (dropped)",
                &self.io.send_errors,
            ),
        ] {
            ConstCounter::new(v.load(Relaxed)).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let buckets: Vec<(f64, u64)> = FORWARD_BUCKETS_US
            .iter()
            .zip(self.io.forward_snapshot())
            .map(|(b, n)| {
                let le = if *b == u64::MAX {
                    f64::MAX
                } else {
                    *b as f64 / 1e6
                };
                (le, n)
            })
            .collect();
        encoder
            .encode_descriptor(
                "forward_seconds",
                "Time from receiving a datagram to sending what it released (forwarded media or replies)",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                self.io.forward_sum_us.load(Relaxed) as f64 / 1e6,
                self.io.forward_count.load(Relaxed),
                &buckets,
                None,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_the_histogram_its_buckets() {
        let m = SfuMetrics::default();
        m.counters
            .keyframe_requests_suppressed
            .fetch_add(2, Relaxed);
        m.io.rtp_out.fetch_add(5, Relaxed);
        m.io.forwarded(40, 3);
        m.io.forwarded(3_000, 1);
        let mut registry = prometheus_client::registry::Registry::with_prefix("bedside_sfu");
        registry.register_collector(Box::new(m.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for family in [
            "participants",
            "received_datagrams",
            "sent_datagrams",
            "forwarded_packets",
            "forwarded_frames",
            "keyframe_requests_relayed",
            "keyframe_requests_suppressed",
            "forward_seconds",
        ] {
            assert!(
                text.contains(&format!("# HELP bedside_sfu_{family} ")),
                "{family}: {text}"
            );
        }
        for sample in [
            "bedside_sfu_keyframe_requests_suppressed_total 2",
            "bedside_sfu_forwarded_packets_total 5",
            "bedside_sfu_forward_seconds_bucket{le=\"0.000025\"} 0",
            "bedside_sfu_forward_seconds_bucket{le=\"0.00005\"} 3",
            "bedside_sfu_forward_seconds_bucket{le=\"0.005\"} 4",
            "bedside_sfu_forward_seconds_count 4",
        ] {
            assert!(text.contains(sample), "{sample}: {text}");
        }
        let counts = m.io.forward_snapshot();
        assert_eq!(quantile_bound_us(&counts, 0.5), Some(50));
        assert_eq!(quantile_bound_us(&counts, 0.99), Some(5_000));
        assert_eq!(quantile_bound_us(&[0; 12], 0.5), None);
    }
}

//! Call telemetry: a bounded in-memory window of each live consultation's per-participant
//! stats samples (the `stats` messages clients send about once a second) and its state
//! transitions, read by the dashboard and the alert rules.
//!
//! Nothing here reaches the disk, and nothing here can identify a patient: samples are figures,
//! the connection state a client reports is mapped onto a fixed set of words (a client could put
//! anything in that string), and participants are known by id and role only.
//!
//! The store sits behind [`TelemetryStore`] so a fleet can later keep the window in Redis with a
//! short TTL (every node writing its own calls, every dashboard reading all of them); today only
//! [`MemoryTelemetry`] exists. Time is an argument (milliseconds since the Unix epoch), so the
//! store is tested without a clock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bedside_protocol::{CandidatePairType, ConsultationId, ParticipantId, Role, StatsReport};
use serde::{Deserialize, Serialize};

/// How much telemetry is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Seconds of samples kept per participant (the dashboard's sparklines span this).
    pub window_secs: u64,
    /// State transitions kept per consultation (the newest).
    pub max_transitions: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            window_secs: 180,
            max_transitions: 64,
        }
    }
}

/// Milliseconds since the Unix epoch, the store's clock (read by its callers, never by it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Samples closer together than this are dropped: a client that floods `stats` costs nothing
/// (clients send one a second).
pub const MIN_SAMPLE_GAP_MS: u64 = 250;

/// One stats sample as kept: when, and the figures (non-finite numbers removed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub report: StatsReport,
}

/// What changed in a consultation, as shown on its timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// The media connection to a peer changed state (`connected`, `disconnected`, ...).
    Media { state: &'static str },
    /// The call went audio-only.
    AudioOnly,
    /// Video came back after audio-only.
    VideoBack,
    /// The ICE candidate pair type in use changed (e.g. to a relay).
    Path { pair: CandidatePairType },
    /// The participant's signaling link dropped; the seat is held.
    LinkDropped,
    /// The participant resumed its seat.
    Resumed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub at_ms: u64,
    pub participant_id: ParticipantId,
    pub role: Role,
    #[serde(flatten)]
    pub change: Change,
}

/// One participant's window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ParticipantTelemetry {
    pub samples: VecDeque<Sample>,
}

impl ParticipantTelemetry {
    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
    }
}

/// One consultation's window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsultationTelemetry {
    pub participants: HashMap<ParticipantId, ParticipantTelemetry>,
    pub transitions: VecDeque<Transition>,
}

/// Where telemetry is kept. In memory today; a Redis-backed store for a fleet would implement
/// the same calls.
pub trait TelemetryStore: Send + Sync {
    /// A sample from a seated participant.
    fn record(
        &self,
        cid: &ConsultationId,
        pid: &ParticipantId,
        role: Role,
        at_ms: u64,
        report: &StatsReport,
    );
    /// A change the server itself saw (a link dropped, a seat resumed).
    fn note(&self, cid: &ConsultationId, pid: &ParticipantId, role: Role, at_ms: u64, c: Change);
    /// A copy of one consultation's window with at most the `max_samples` newest samples per
    /// participant (the dashboard reads every live consultation every second: it copies only
    /// what it shows).
    fn consultation(
        &self,
        cid: &ConsultationId,
        max_samples: usize,
    ) -> Option<ConsultationTelemetry>;
    /// Forgets consultations not in `live`, participants not in them, and samples older than
    /// the window.
    fn retain(&self, live: &HashMap<ConsultationId, HashSet<ParticipantId>>, now_ms: u64);
}

/// The in-memory store: one map behind one mutex (a sample is a few hundred bytes and a clinic
/// has tens of calls, so contention is not a concern; nothing awaits while it is held).
pub struct MemoryTelemetry {
    config: TelemetryConfig,
    inner: Mutex<HashMap<ConsultationId, ConsultationTelemetry>>,
}

impl MemoryTelemetry {
    pub fn new(config: TelemetryConfig) -> Self {
        MemoryTelemetry {
            config,
            inner: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConsultationId, ConsultationTelemetry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn window_ms(&self) -> u64 {
        self.config.window_secs.saturating_mul(1000)
    }

    fn push_transition(&self, c: &mut ConsultationTelemetry, t: Transition) {
        c.transitions.push_back(t);
        while c.transitions.len() > self.config.max_transitions {
            c.transitions.pop_front();
        }
    }
}

/// The media connection state words a client may report; anything else reads as `other`.
pub fn media_state(reported: Option<&str>) -> Option<&'static str> {
    Some(match reported? {
        "new" => "new",
        "connecting" => "connecting",
        "connected" => "connected",
        "disconnected" => "disconnected",
        "failed" => "failed",
        "closed" => "closed",
        _ => "other",
    })
}

/// The report with every figure a dashboard can show and nothing else: non-finite or negative
/// numbers become absent, the connection state one of [`media_state`]'s words.
fn clean(report: &StatsReport) -> StatsReport {
    let ok = |v: Option<f64>| v.filter(|v| v.is_finite() && *v >= 0.0);
    let video = |v: &Option<bedside_protocol::VideoStats>| {
        v.as_ref().map(|v| bedside_protocol::VideoStats {
            width: v.width,
            height: v.height,
            fps: ok(Some(v.fps)).unwrap_or(0.0),
            bitrate_kbps: ok(Some(v.bitrate_kbps)).unwrap_or(0.0),
        })
    };
    StatsReport {
        rtt_ms: ok(report.rtt_ms),
        loss_in_pct: ok(report.loss_in_pct).map(|l| l.min(100.0)),
        loss_out_pct: ok(report.loss_out_pct).map(|l| l.min(100.0)),
        audio_jitter_ms: ok(report.audio_jitter_ms),
        audio_buffer_ms: ok(report.audio_buffer_ms),
        video_sent: video(&report.video_sent),
        video_received: video(&report.video_received),
        candidate_pair: report.candidate_pair,
        transport: report.transport,
        connection_state: media_state(report.connection_state.as_deref()).map(str::to_owned),
        audio_only: report.audio_only,
        send_estimate_kbps: ok(report.send_estimate_kbps),
    }
}

impl TelemetryStore for MemoryTelemetry {
    fn record(
        &self,
        cid: &ConsultationId,
        pid: &ParticipantId,
        role: Role,
        at_ms: u64,
        report: &StatsReport,
    ) {
        let report = clean(report);
        let window = self.window_ms();
        let mut map = self.lock();
        let c = map.entry(cid.clone()).or_default();
        let p = c.participants.entry(pid.clone()).or_default();
        let prev = p.last().cloned();
        if prev
            .as_ref()
            .is_some_and(|s| at_ms < s.at_ms.saturating_add(MIN_SAMPLE_GAP_MS))
        {
            return;
        }
        p.samples.push_back(Sample {
            at_ms,
            report: report.clone(),
        });
        while p
            .samples
            .front()
            .is_some_and(|s| s.at_ms.saturating_add(window) < at_ms)
        {
            p.samples.pop_front();
        }
        let prev = prev.map(|s| s.report).unwrap_or_default();
        let mut changes = Vec::new();
        let state = report.connection_state.as_deref();
        if state.is_some() && state != prev.connection_state.as_deref() {
            changes.push(Change::Media {
                state: media_state(state).unwrap_or("other"),
            });
        }
        match (prev.audio_only, report.audio_only) {
            (Some(false) | None, Some(true)) => changes.push(Change::AudioOnly),
            (Some(true), Some(false)) => changes.push(Change::VideoBack),
            _ => {}
        }
        if let Some(pair) = report
            .candidate_pair
            .filter(|p| Some(*p) != prev.candidate_pair)
        {
            changes.push(Change::Path { pair });
        }
        for change in changes {
            let t = Transition {
                at_ms,
                participant_id: pid.clone(),
                role,
                change,
            };
            self.push_transition(c, t);
        }
    }

    fn note(&self, cid: &ConsultationId, pid: &ParticipantId, role: Role, at_ms: u64, c: Change) {
        let mut map = self.lock();
        let entry = map.entry(cid.clone()).or_default();
        let t = Transition {
            at_ms,
            participant_id: pid.clone(),
            role,
            change: c,
        };
        self.push_transition(entry, t);
    }

    fn consultation(
        &self,
        cid: &ConsultationId,
        max_samples: usize,
    ) -> Option<ConsultationTelemetry> {
        let map = self.lock();
        let c = map.get(cid)?;
        Some(ConsultationTelemetry {
            participants: c
                .participants
                .iter()
                .map(|(pid, p)| {
                    let skip = p.samples.len().saturating_sub(max_samples);
                    let samples = p.samples.iter().skip(skip).cloned().collect();
                    (pid.clone(), ParticipantTelemetry { samples })
                })
                .collect(),
            transitions: c.transitions.clone(),
        })
    }

    fn retain(&self, live: &HashMap<ConsultationId, HashSet<ParticipantId>>, now_ms: u64) {
        let window = self.window_ms();
        let mut map = self.lock();
        map.retain(|cid, c| {
            let Some(seats) = live.get(cid) else {
                return false;
            };
            c.participants.retain(|pid, p| {
                p.samples
                    .retain(|s| s.at_ms.saturating_add(window) >= now_ms);
                seats.contains(pid)
            });
            c.transitions
                .retain(|t| t.at_ms.saturating_add(window) >= now_ms);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (ConsultationId, ParticipantId) {
        (ConsultationId("c_1".into()), ParticipantId("p_1".into()))
    }

    #[test]
    fn the_window_is_bounded_and_floods_are_dropped() {
        let store = MemoryTelemetry::new(TelemetryConfig {
            window_secs: 10,
            max_transitions: 3,
        });
        let (cid, pid) = ids();
        for i in 0..100u64 {
            // Four a second: every other one is under the minimum gap.
            store.record(&cid, &pid, Role::Patient, i * 125, &StatsReport::default());
        }
        let c = store.consultation(&cid, usize::MAX).unwrap();
        let samples = &c.participants[&pid].samples;
        assert!(samples.len() <= 41, "{}", samples.len());
        let (first, last) = (
            samples.front().unwrap().at_ms,
            samples.back().unwrap().at_ms,
        );
        assert!(first > 0 && first + 10_000 >= last, "{first} {last}");
    }

    #[test]
    fn transitions_come_from_changes_and_are_sanitised() {
        let store = MemoryTelemetry::new(TelemetryConfig::default());
        let (cid, pid) = ids();
        let s = |state: &str, audio_only: bool, at: u64| {
            let r = StatsReport {
                connection_state: Some(state.into()),
                audio_only: Some(audio_only),
                rtt_ms: Some(f64::NAN),
                ..StatsReport::default()
            };
            store.record(&cid, &pid, Role::Doctor, at, &r);
        };
        s("connected", false, 0);
        s("connected", false, 1000);
        s("Jane Doe 10.1.2.3", true, 2000);
        store.note(&cid, &pid, Role::Doctor, 3000, Change::LinkDropped);
        let c = store.consultation(&cid, usize::MAX).unwrap();
        let kinds: Vec<_> = c.transitions.iter().map(|t| t.change.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                Change::Media { state: "connected" },
                Change::Media { state: "other" },
                Change::AudioOnly,
                Change::LinkDropped
            ]
        );
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            !json.contains("Jane") && !json.contains("10.1.2.3"),
            "{json}"
        );
        assert_eq!(c.participants[&pid].last().unwrap().report.rtt_ms, None);

        store.retain(&HashMap::new(), 4000);
        assert!(store.consultation(&cid, 1).is_none());
    }
}

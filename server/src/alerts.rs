//! Alert rules the server evaluates itself (for clinics that run no Prometheus), raised and
//! resolved to the dashboard and to a webhook in Alertmanager's webhook payload format
//! (version 4), so a clinic can route them to its pager as it would Alertmanager's.
//!
//! [`conditions`] turns one [`Observation`] of the server into the rules that hold now;
//! [`Engine::evaluate`] keeps each alert's state (pending for the rule's `for`, firing,
//! resolved) and says what to send, re-sending a firing alert every `repeat-interval-secs`.
//! Both are pure: time is an argument (ms since the Unix epoch). [`spawn_webhook`] is the only
//! part that does I/O. The same rules over `/metrics` ship as `deploy/prometheus/alerts.yml`.
//!
//! Alert texts and labels carry ids, roles and figures only: never names, codes, tokens or
//! addresses. In a fleet one node of the region evaluates them over every node's calls (see
//! [`crate::fleet_view`]), and the "node gone" rule watches the fleet's nodes.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Thresholds and delivery of the alert rules (`[alerts]` in the TOML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Where raised and resolved alerts are POSTed (Alertmanager webhook format); empty: none.
    pub webhook_url: String,
    /// A firing alert is sent again this often (seconds).
    pub repeat_interval_secs: u64,
    /// How often the rules are evaluated (seconds).
    pub eval_interval_secs: u64,
    /// The `region` label of this server's alerts.
    pub region: String,
    /// "Calls poor": more than this share of live calls scored poor...
    pub calls_poor_share: f64,
    /// ...for this long (seconds)...
    pub calls_poor_for_secs: u64,
    /// ...with at least this many calls scored.
    pub calls_poor_min_calls: usize,
    /// "Relay near quota": active allocations above this share of `turn.relay.total-quota`...
    pub relay_quota_share: f64,
    /// ...for this long (seconds).
    pub relay_quota_for_secs: u64,
    /// "Join failures": refused tokens, unknown invite codes and rate-limited joins above this
    /// many in the last minute...
    pub join_failures_per_minute: u64,
    /// ...for this long (seconds).
    pub join_failures_for_secs: u64,
    /// "Stuck reconnecting": a participant's link down this long (seconds) while its seat is
    /// held.
    pub stuck_reconnecting_secs: u64,
    /// "Node gone" (a fleet only): a node of the region no longer subscribed to its channel in
    /// Redis for this long (seconds); a node that stops gracefully (SIGTERM) leaves quietly.
    pub node_gone_for_secs: u64,
    /// A node gone this long (seconds) is forgotten: its alert resolves.
    pub node_gone_forget_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_url: String::new(),
            repeat_interval_secs: 3600,
            eval_interval_secs: 5,
            region: "clinic".into(),
            calls_poor_share: 0.2,
            calls_poor_for_secs: 120,
            calls_poor_min_calls: 1,
            relay_quota_share: 0.8,
            relay_quota_for_secs: 0,
            join_failures_per_minute: 20,
            join_failures_for_secs: 0,
            stuck_reconnecting_secs: 30,
            node_gone_for_secs: 10,
            node_gone_forget_secs: 24 * 3600,
        }
    }
}

impl AlertsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.eval_interval_secs == 0 || self.repeat_interval_secs == 0 {
            return Err("alerts.eval-interval-secs and repeat-interval-secs must be >= 1".into());
        }
        if !(0.0..=1.0).contains(&self.calls_poor_share)
            || !(0.0..=1.0).contains(&self.relay_quota_share)
        {
            return Err("alerts.*-share must be between 0 and 1".into());
        }
        let url = &self.webhook_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err("alerts.webhook-url must be an http:// or https:// URL".into());
        }
        Ok(())
    }
}

/// What the rules look at, gathered once per evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Live calls with a fresh quality score.
    pub calls_scored: usize,
    /// Of those, the ones scored poor.
    pub calls_poor: usize,
    /// Each relay's active allocations and total quota: one for a single server (node `None`),
    /// one per node running its relay in a fleet.
    pub relays: Vec<(Option<String>, i64, u32)>,
    /// Refused joins in the last minute.
    pub join_failures_last_minute: u64,
    /// Consultations with a participant whose link has been down this many seconds (the
    /// longest per consultation).
    pub reconnecting: Vec<(String, u64)>,
    /// Nodes of the fleet seen before and gone from it now.
    pub nodes_gone: Vec<String>,
}

/// A rule that holds now.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub name: &'static str,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    /// How long it must hold before the alert fires (ms).
    pub for_ms: u64,
}

pub const CALLS_POOR: &str = "BedsideCallsPoor";
pub const RELAY_NEAR_QUOTA: &str = "BedsideRelayNearQuota";
pub const JOIN_FAILURES: &str = "BedsideJoinFailures";
pub const STUCK_RECONNECTING: &str = "BedsideStuckReconnecting";
pub const NODE_GONE: &str = "BedsideNodeGone";
const NAMES: [&str; 5] = [
    CALLS_POOR,
    RELAY_NEAR_QUOTA,
    JOIN_FAILURES,
    STUCK_RECONNECTING,
    NODE_GONE,
];

/// The rules that hold for `obs`.
pub fn conditions(cfg: &AlertsConfig, obs: &Observation) -> Vec<Condition> {
    let labels = |name: &str, severity: &str| {
        let mut l = BTreeMap::new();
        l.insert("alertname".to_owned(), name.to_owned());
        l.insert("severity".to_owned(), severity.to_owned());
        l.insert("region".to_owned(), cfg.region.clone());
        l
    };
    let mut out = Vec::new();
    if obs.calls_scored >= cfg.calls_poor_min_calls.max(1)
        && obs.calls_poor as f64 > cfg.calls_poor_share * obs.calls_scored as f64
    {
        out.push(Condition {
            name: CALLS_POOR,
            labels: labels(CALLS_POOR, "warning"),
            summary: format!(
                "{} of {} live calls in region {} are poor",
                obs.calls_poor, obs.calls_scored, cfg.region
            ),
            description: format!(
                "More than {:.0}% of live calls have had poor quality (heavy loss or a slow round \
                 trip) for {} s: look for a network problem shared by these calls.",
                cfg.calls_poor_share * 100.0,
                cfg.calls_poor_for_secs
            ),
            for_ms: cfg.calls_poor_for_secs * 1000,
        });
    }
    for (node, active, quota) in &obs.relays {
        let (active, quota) = (*active, *quota);
        if quota == 0 || active as f64 <= cfg.relay_quota_share * f64::from(quota) {
            continue;
        }
        let mut l = labels(RELAY_NEAR_QUOTA, "warning");
        let whose = match node {
            Some(node) => {
                l.insert("node".to_owned(), node.clone());
                format!("The relay of node {node}")
            }
            None => "The relay".to_owned(),
        };
        out.push(Condition {
            name: RELAY_NEAR_QUOTA,
            labels: l,
            summary: format!("{whose} holds {active} of its {quota} allocations"),
            description: format!(
                "The TURN relay is above {:.0}% of its allocation quota: new calls that need it \
                 will fail once it is full.",
                cfg.relay_quota_share * 100.0
            ),
            for_ms: cfg.relay_quota_for_secs * 1000,
        });
    }
    if obs.join_failures_last_minute > cfg.join_failures_per_minute {
        out.push(Condition {
            name: JOIN_FAILURES,
            labels: labels(JOIN_FAILURES, "warning"),
            summary: format!(
                "{} joins refused in the last minute",
                obs.join_failures_last_minute
            ),
            description: "Many joins were refused (invalid or expired tokens, unknown invite \
                          codes, rate limits): a misconfigured clinic system or someone guessing \
                          codes."
                .into(),
            for_ms: cfg.join_failures_for_secs * 1000,
        });
    }
    for node in &obs.nodes_gone {
        let mut l = labels(NODE_GONE, "critical");
        l.insert("node".to_owned(), node.clone());
        out.push(Condition {
            name: NODE_GONE,
            labels: l,
            summary: format!(
                "Node {node} is gone from the fleet of region {}",
                cfg.region
            ),
            description: "The node no longer answers on the region's Redis (crashed, killed or \
                          cut off): its consultations are taken over by the other nodes, and \
                          the region has that much less capacity."
                .into(),
            for_ms: cfg.node_gone_for_secs * 1000,
        });
    }
    for (cid, secs) in &obs.reconnecting {
        if *secs >= cfg.stuck_reconnecting_secs {
            let mut l = labels(STUCK_RECONNECTING, "info");
            l.insert("consultation".to_owned(), cid.clone());
            out.push(Condition {
                name: STUCK_RECONNECTING,
                labels: l,
                summary: format!("Consultation {cid} has a participant reconnecting for {secs} s"),
                description: "A participant's link has been down past the alert threshold; the \
                              seat is held until the rejoin window passes."
                    .into(),
                for_ms: 0,
            });
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Firing,
    Resolved,
}

/// An alert as sent and shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub status: Status,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    pub starts_at_ms: u64,
    /// When it resolved (resolved alerts only).
    pub ends_at_ms: Option<u64>,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }
}

struct State {
    condition: Condition,
    /// When the condition started to hold.
    since_ms: u64,
    /// When the alert fired, once it has.
    fired_ms: Option<u64>,
    last_sent_ms: u64,
}

/// Alerts kept for the dashboard's history.
pub const HISTORY: usize = 20;

/// The alerts' states between evaluations.
pub struct Engine {
    repeat_ms: u64,
    states: HashMap<BTreeMap<String, String>, State>,
    history: VecDeque<Alert>,
}

impl Engine {
    pub fn new(cfg: &AlertsConfig) -> Self {
        Engine {
            repeat_ms: cfg.repeat_interval_secs.saturating_mul(1000),
            states: HashMap::new(),
            history: VecDeque::new(),
        }
    }

    /// Takes the conditions that hold at `now_ms`; returns the alerts to send now (newly
    /// firing, repeated, resolved).
    pub fn evaluate(&mut self, now_ms: u64, holding: Vec<Condition>) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in holding {
            seen.insert(c.labels.clone());
            let st = self
                .states
                .entry(c.labels.clone())
                .or_insert_with(|| State {
                    condition: c.clone(),
                    since_ms: now_ms,
                    fired_ms: None,
                    last_sent_ms: 0,
                });
            st.condition = c;
            match st.fired_ms {
                None if now_ms.saturating_sub(st.since_ms) >= st.condition.for_ms => {
                    st.fired_ms = Some(now_ms);
                    st.last_sent_ms = now_ms;
                    let a = firing(st);
                    self.history.push_back(a.clone());
                    out.push(a);
                }
                Some(_) if now_ms.saturating_sub(st.last_sent_ms) >= self.repeat_ms => {
                    st.last_sent_ms = now_ms;
                    out.push(firing(st));
                }
                _ => {}
            }
        }
        let gone: Vec<_> = self
            .states
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let st = self.states.remove(&key).expect("listed");
            if let Some(fired) = st.fired_ms {
                let a = Alert {
                    status: Status::Resolved,
                    labels: st.condition.labels,
                    summary: st.condition.summary,
                    description: st.condition.description,
                    starts_at_ms: fired,
                    ends_at_ms: Some(now_ms),
                };
                self.history.push_back(a.clone());
                out.push(a);
            }
        }
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        out
    }

    /// Takes over alerts another node had fired (the region's evaluator moved here): they stay
    /// firing without being sent again, and resolve here when their conditions no longer hold.
    pub fn adopt(&mut self, now_ms: u64, firing: Vec<Alert>, history: Vec<Alert>) {
        if self.history.is_empty() {
            self.history = history.into_iter().rev().take(HISTORY).rev().collect();
        }
        for a in firing {
            if a.status != Status::Firing || self.states.contains_key(&a.labels) {
                continue;
            }
            let name = NAMES
                .iter()
                .copied()
                .find(|n| *n == a.name())
                .unwrap_or(CALLS_POOR);
            self.states.insert(
                a.labels.clone(),
                State {
                    condition: Condition {
                        name,
                        labels: a.labels,
                        summary: a.summary,
                        description: a.description,
                        for_ms: 0,
                    },
                    since_ms: a.starts_at_ms,
                    fired_ms: Some(a.starts_at_ms),
                    last_sent_ms: now_ms,
                },
            );
        }
    }

    /// Alerts firing now, oldest first.
    pub fn firing(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self
            .states
            .values()
            .filter(|s| s.fired_ms.is_some())
            .map(firing)
            .collect();
        v.sort_by_key(|a| a.starts_at_ms);
        v
    }

    /// The last raised and resolved alerts, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Alert> {
        self.history.iter()
    }
}

fn firing(st: &State) -> Alert {
    Alert {
        status: Status::Firing,
        labels: st.condition.labels.clone(),
        summary: st.condition.summary.clone(),
        description: st.condition.description.clone(),
        starts_at_ms: st.fired_ms.unwrap_or(st.since_ms),
        ends_at_ms: None,
    }
}

fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "0001-01-01T00:00:00Z".to_owned())
}

/// The body Alertmanager POSTs to a webhook receiver (version 4), for one alert.
pub fn webhook_payload(alert: &Alert, external_url: &str) -> serde_json::Value {
    let status = match alert.status {
        Status::Firing => "firing",
        Status::Resolved => "resolved",
    };
    let mut annotations = BTreeMap::new();
    annotations.insert("summary", alert.summary.as_str());
    annotations.insert("description", alert.description.as_str());
    let fingerprint = {
        let mut h = Sha256::new();
        for (k, v) in &alert.labels {
            h.update(k.as_bytes());
            h.update([0xff]);
            h.update(v.as_bytes());
            h.update([0xff]);
        }
        hex::encode(&h.finalize()[..8])
    };
    let group_labels: BTreeMap<&str, &str> = [("alertname", alert.name())].into();
    serde_json::json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{}\"}}", alert.name()),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "bedside",
        "groupLabels": group_labels,
        "commonLabels": alert.labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [{
            "status": status,
            "labels": alert.labels,
            "annotations": annotations,
            "startsAt": rfc3339(alert.starts_at_ms),
            "endsAt": alert.ends_at_ms.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339),
            "generatorURL": format!("{}/dashboard", external_url.trim_end_matches('/')),
            "fingerprint": fingerprint,
        }],
    })
}

/// Alerts waiting for the webhook beyond this are dropped (with a log line): a dead receiver
/// must not grow the server's memory.
pub const WEBHOOK_QUEUE: usize = 64;

/// Starts the task that POSTs alerts to `url`; returns where to queue them.
pub fn spawn_webhook(url: String, external_url: String) -> mpsc::Sender<Alert> {
    let (tx, mut rx) = mpsc::channel::<Alert>(WEBHOOK_QUEUE);
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the alert webhook client");
                return;
            }
        };
        while let Some(alert) = rx.recv().await {
            let body = webhook_payload(&alert, &external_url);
            match client.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(
                        status = r.status().as_u16(),
                        alert = alert.name(),
                        "alert webhook refused"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e.without_url(), alert = alert.name(), "alert webhook failed")
                }
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AlertsConfig {
        AlertsConfig {
            calls_poor_for_secs: 10,
            repeat_interval_secs: 60,
            ..AlertsConfig::default()
        }
    }

    #[test]
    fn calls_poor_fires_after_its_for_repeats_and_resolves() {
        let cfg = cfg();
        let mut e = Engine::new(&cfg);
        let bad = Observation {
            calls_scored: 4,
            calls_poor: 1,
            ..Observation::default()
        };
        assert_eq!(
            conditions(&cfg, &bad).len(),
            1,
            "1 of 4 is more than a fifth"
        );
        let fifth = Observation {
            calls_scored: 5,
            calls_poor: 1,
            ..Observation::default()
        };
        assert!(
            conditions(&cfg, &fifth).is_empty(),
            "exactly a fifth is not more"
        );

        assert!(e.evaluate(0, conditions(&cfg, &bad)).is_empty());
        assert!(e.evaluate(9_000, conditions(&cfg, &bad)).is_empty());
        let sent = e.evaluate(10_000, conditions(&cfg, &bad));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].status, Status::Firing);
        assert_eq!(sent[0].name(), CALLS_POOR);
        assert!(e.evaluate(20_000, conditions(&cfg, &bad)).is_empty());
        assert_eq!(
            e.evaluate(70_000, conditions(&cfg, &bad)).len(),
            1,
            "repeat"
        );
        let sent = e.evaluate(75_000, Vec::new());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].status, Status::Resolved);
        assert_eq!(sent[0].ends_at_ms, Some(75_000));
        assert!(e.firing().is_empty());
        assert_eq!(e.history().count(), 2);
    }

    #[test]
    fn a_blip_shorter_than_for_sends_nothing() {
        let cfg = cfg();
        let mut e = Engine::new(&cfg);
        let bad = Observation {
            calls_scored: 1,
            calls_poor: 1,
            ..Observation::default()
        };
        assert!(e.evaluate(0, conditions(&cfg, &bad)).is_empty());
        assert!(e.evaluate(5_000, Vec::new()).is_empty());
        assert!(e.evaluate(12_000, conditions(&cfg, &bad)).is_empty());
    }

    #[test]
    fn relay_and_reconnecting_rules() {
        let cfg = cfg();
        let obs = Observation {
            relays: vec![(None, 9, 10)],
            reconnecting: vec![("c_a".into(), 31), ("c_b".into(), 5)],
            join_failures_last_minute: 21,
            ..Observation::default()
        };
        let names: Vec<_> = conditions(&cfg, &obs).iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            vec![RELAY_NEAR_QUOTA, JOIN_FAILURES, STUCK_RECONNECTING]
        );
        let ok = Observation {
            relays: vec![(None, 8, 10)],
            ..Observation::default()
        };
        assert!(conditions(&cfg, &ok).is_empty(), "80% is not above 80%");
    }

    #[test]
    fn a_node_gone_fires_per_node_and_a_new_evaluator_resolves_it() {
        let cfg = AlertsConfig {
            node_gone_for_secs: 2,
            ..cfg()
        };
        let gone = Observation {
            nodes_gone: vec!["node-b".into()],
            relays: vec![(Some("node-a".into()), 9, 10)],
            ..Observation::default()
        };
        let mut e = Engine::new(&cfg);
        let first = e.evaluate(0, conditions(&cfg, &gone));
        assert_eq!(
            first.len(),
            1,
            "the relay fires at once, the node after 2 s"
        );
        assert_eq!(first[0].labels["node"], "node-a");
        let sent = e.evaluate(2_000, conditions(&cfg, &gone));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].name(), NODE_GONE);
        assert_eq!(sent[0].labels["node"], "node-b");
        assert!(sent[0].summary.contains("node-b"), "{}", sent[0].summary);

        // The evaluator moves to another node: it adopts what fires, sends nothing again, and
        // resolves the node alert once the node is back.
        let mut other = Engine::new(&cfg);
        other.adopt(3_000, e.firing(), e.history().cloned().collect());
        let back = Observation {
            relays: gone.relays.clone(),
            ..Observation::default()
        };
        let sent = other.evaluate(4_000, conditions(&cfg, &back));
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(
            (sent[0].name(), sent[0].status),
            (NODE_GONE, Status::Resolved)
        );
        assert_eq!(sent[0].starts_at_ms, 2_000);
        assert_eq!(other.firing().len(), 1, "the relay still fires");
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = [
            AlertsConfig {
                eval_interval_secs: 0,
                ..AlertsConfig::default()
            },
            AlertsConfig {
                calls_poor_share: 1.5,
                ..AlertsConfig::default()
            },
            AlertsConfig {
                webhook_url: "pager.example/hook".into(),
                ..AlertsConfig::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
        AlertsConfig::default().validate().unwrap();
    }

    #[test]
    fn the_payload_is_alertmanagers() {
        let cfg = cfg();
        let obs = Observation {
            relays: vec![(None, 9, 10)],
            ..Observation::default()
        };
        let mut e = Engine::new(&cfg);
        let a = e
            .evaluate(1_700_000_000_000, conditions(&cfg, &obs))
            .remove(0);
        let p = webhook_payload(&a, "http://clinic.example");
        assert_eq!(p["version"], "4");
        assert_eq!(p["status"], "firing");
        assert_eq!(p["alerts"][0]["labels"]["alertname"], RELAY_NEAR_QUOTA);
        assert_eq!(p["alerts"][0]["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(p["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(p["alerts"][0]["fingerprint"].as_str().unwrap().len(), 16);
    }
}

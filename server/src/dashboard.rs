//! The operations dashboard: `/dashboard` (a page compiled into the binary, plain SVG, no CDN:
//! clinics run offline networks) and its live feed `/dashboard/events` (server-sent events,
//! authenticated with the administration key, which the page asks for and keeps only in the
//! tab's `sessionStorage`).
//!
//! One task ([`spawn`]) builds a snapshot every second from the hub (live consultations, seats,
//! roles) and the telemetry window (each participant's last stats), evaluates the alert rules
//! every `alerts.eval-interval-secs`, and publishes the snapshot's JSON on a `watch` channel:
//! every open dashboard gets the newest snapshot, a slow one skips the ones it missed, and no
//! dashboard can hold up the server. Snapshots carry ids, roles and figures only: never display
//! names, invite codes, tokens or addresses (`tests/tests/dashboard.rs` greps for them).
//!
//! In a fleet the same task also writes this node's view to Redis and shows the region's
//! (every node's consultations, and the nodes themselves), and the alert rules run on one node
//! of the region ([`crate::fleet_view`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bedside_protocol::quality::{self, Quality};
use bedside_protocol::{ParticipantId, Role};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::AppState;
use crate::alerts::{self, Alert, AlertsConfig, Engine, Observation};
use crate::fleet_view::{self, AlertsView, NodeView, Tally};
use crate::hub::LiveConsultation;
use crate::metrics::{CodeLabel, QualityLabel, RoleLabel};
use crate::telemetry::{ConsultationTelemetry, Transition, now_ms};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// A sample older than this does not score a call (its client stopped reporting).
pub const STALE_MS: u64 = 5_000;
/// Points in each participant's sparkline (one per sample, the newest last).
pub const SPARK_POINTS: usize = 60;
/// The error codes that count as refused joins.
pub const JOIN_FAILURE_CODES: [&str; 4] = [
    "invalid_token",
    "token_expired",
    "invalid_invite_code",
    "rate_limited",
];

/// The dashboard's routes, merged into the API's router.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/dashboard",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/dashboard/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/dashboard/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route("/dashboard/events", get(events))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, crate::api::ApiError> {
    crate::api::require_admin(&state, &headers)?;
    let mut rx = state.dashboard.subscribe();
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let json = rx.borrow_and_update().clone();
        Some((Ok(Event::default().event("snapshot").data(&*json)), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The channel the feed publishes on (the newest snapshot's JSON).
pub fn channel() -> watch::Sender<Arc<str>> {
    watch::Sender::new(Arc::from("{}"))
}

/// The whole dashboard at one instant.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub at_ms: u64,
    pub overview: Overview,
    /// [`ConsultationRow`]s: this server's, or in a fleet every node's (each with its `node`).
    pub consultations: Vec<serde_json::Value>,
    pub alerts_firing: Vec<Alert>,
    pub alerts_history: Vec<Alert>,
}

#[derive(Debug, Default, Serialize)]
pub struct Overview {
    pub consultations: usize,
    /// Counted but not listed: in a fleet each other node lists at most
    /// [`fleet_view::MAX_ROWS_PER_VIEW`] of its consultations, the worst first.
    pub consultations_unlisted: usize,
    pub participants_connected: usize,
    pub participants_waiting: usize,
    pub participants_reconnecting: usize,
    pub joins_per_minute: u64,
    pub calls_good: usize,
    pub calls_fair: usize,
    pub calls_poor: usize,
    pub relay: Option<RelayOverview>,
    /// In a fleet: the region, the node that answered, and every live node.
    pub region: Option<String>,
    pub node: Option<String>,
    pub nodes: Vec<NodeRow>,
}

/// One live node of the fleet, as the region's "now" view lists it.
#[derive(Debug, Serialize)]
pub struct NodeRow {
    pub node: String,
    pub consultations: usize,
    pub participants_connected: usize,
    pub connections: i64,
    pub relay: Option<RelayOverview>,
    /// How old its view is (ms).
    pub age_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayOverview {
    pub allocations: i64,
    pub quota: u32,
    pub kbps: f64,
}

#[derive(Debug, Serialize)]
pub struct ConsultationRow {
    pub id: String,
    pub age_secs: u64,
    /// The worst of its participants' fresh scores; `None` before any.
    pub quality: Option<Quality>,
    /// Seats per role.
    pub roles: BTreeMap<&'static str, usize>,
    pub participants: Vec<ParticipantRow>,
    pub transitions: Vec<Transition>,
    /// The longest a participant's link has been down while its seat is held (seconds).
    pub reconnecting_secs: Option<u64>,
    /// In a fleet: the node that homes it.
    pub node: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ParticipantRow {
    pub id: ParticipantId,
    pub role: Role,
    /// `waiting`, `connected` or `reconnecting`.
    pub state: &'static str,
    pub quality: Option<Quality>,
    pub pair: Option<bedside_protocol::CandidatePairType>,
    /// How that pair carries media (for a relay: UDP, TCP or TLS to the relay).
    pub transport: Option<bedside_protocol::TransportProtocol>,
    pub rtt_ms: Option<f64>,
    pub loss_in_pct: Option<f64>,
    pub loss_out_pct: Option<f64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub buffer_ms: Option<f64>,
    pub audio_only: Option<bool>,
    /// The last samples' round trip (ms) and loss received (%), oldest first.
    pub spark_rtt: Vec<f64>,
    pub spark_loss: Vec<f64>,
}

/// Builds one row from the hub's view and the telemetry window.
pub fn row(
    live: &LiveConsultation,
    t: Option<&ConsultationTelemetry>,
    now: u64,
) -> ConsultationRow {
    let mut roles = BTreeMap::new();
    let participants: Vec<ParticipantRow> = live
        .seats
        .iter()
        .map(|seat| {
            *roles.entry(seat.role.as_str()).or_insert(0) += 1;
            let p = t.and_then(|t| t.participants.get(&seat.participant_id));
            let last = p
                .and_then(|p| p.last())
                .filter(|s| s.at_ms.saturating_add(STALE_MS) >= now && seat.down_for.is_none());
            let r = last.map(|s| &s.report);
            let video = r.and_then(|r| r.video_received.as_ref());
            let spark = |f: &dyn Fn(&bedside_protocol::StatsReport) -> Option<f64>| -> Vec<f64> {
                p.map(|p| {
                    let skip = p.samples.len().saturating_sub(SPARK_POINTS);
                    p.samples
                        .iter()
                        .skip(skip)
                        .map(|s| f(&s.report).unwrap_or(0.0))
                        .collect()
                })
                .unwrap_or_default()
            };
            ParticipantRow {
                id: seat.participant_id.clone(),
                role: seat.role,
                state: if !seat.admitted {
                    "waiting"
                } else if seat.down_for.is_some() {
                    "reconnecting"
                } else {
                    "connected"
                },
                quality: r.map(|r| quality::score(r, r.audio_only.unwrap_or(false))),
                pair: r.and_then(|r| r.candidate_pair),
                transport: r.and_then(|r| r.transport),
                rtt_ms: r.and_then(|r| r.rtt_ms),
                loss_in_pct: r.and_then(|r| r.loss_in_pct),
                loss_out_pct: r.and_then(|r| r.loss_out_pct),
                width: video.map(|v| v.width),
                height: video.map(|v| v.height),
                fps: video.map(|v| v.fps),
                jitter_ms: r.and_then(|r| r.audio_jitter_ms),
                buffer_ms: r.and_then(|r| r.audio_buffer_ms),
                audio_only: r.and_then(|r| r.audio_only),
                spark_rtt: spark(&|r| r.rtt_ms),
                spark_loss: spark(&|r| r.loss_in_pct),
            }
        })
        .collect();
    ConsultationRow {
        id: live.id.0.clone(),
        age_secs: live.age.as_secs(),
        quality: participants.iter().filter_map(|p| p.quality).max(),
        roles,
        participants,
        transitions: t
            .map(|t| t.transitions.iter().cloned().collect())
            .unwrap_or_default(),
        reconnecting_secs: live
            .seats
            .iter()
            .filter_map(|s| s.down_for)
            .max()
            .map(|d| d.as_secs()),
        node: None,
    }
}

/// A counter's value a minute ago, from samples taken once a second.
#[derive(Default)]
struct PerMinute(VecDeque<(u64, u64)>);

impl PerMinute {
    fn push(&mut self, now: u64, total: u64) -> u64 {
        self.0.push_back((now, total));
        while self
            .0
            .front()
            .is_some_and(|(t, _)| t.saturating_add(60_000) < now)
        {
            self.0.pop_front();
        }
        total.saturating_sub(self.0.front().map_or(total, |(_, v)| *v))
    }
}

/// The overview of a set of node views (one for a single server, the region's in a fleet) and
/// what the alert rules observe of it.
fn overview_of(views: &[NodeView], now: u64, fleet: bool) -> (Overview, Observation) {
    let mut o = Overview::default();
    let mut obs = Observation::default();
    for v in views {
        let counted;
        let t = match &v.tally {
            Some(t) => t,
            None => {
                counted = Tally::of(&v.rows);
                &counted
            }
        };
        let node = NodeRow {
            node: v.node.clone(),
            consultations: t.consultations,
            participants_connected: t.participants_connected,
            connections: v.connections,
            relay: v.relay.clone(),
            age_ms: now.saturating_sub(v.at_ms),
        };
        o.consultations += t.consultations;
        o.consultations_unlisted += t.consultations.saturating_sub(v.rows.len());
        o.participants_connected += t.participants_connected;
        o.participants_waiting += t.participants_waiting;
        o.participants_reconnecting += t.participants_reconnecting;
        o.calls_good += t.calls_good;
        o.calls_fair += t.calls_fair;
        o.calls_poor += t.calls_poor;
        obs.reconnecting.extend(t.reconnecting.iter().cloned());
        o.joins_per_minute += v.joins_per_minute;
        obs.join_failures_last_minute += v.join_failures_last_minute;
        if let Some(relay) = &v.relay {
            obs.relays.push((
                fleet.then(|| v.node.clone()),
                relay.allocations,
                relay.quota,
            ));
            let total = o.relay.get_or_insert(RelayOverview {
                allocations: 0,
                quota: 0,
                kbps: 0.0,
            });
            total.allocations += relay.allocations;
            total.quota = total.quota.saturating_add(relay.quota);
            total.kbps += relay.kbps;
        }
        if fleet {
            o.nodes.push(node);
        }
    }
    obs.calls_scored = o.calls_good + o.calls_fair + o.calls_poor;
    obs.calls_poor = o.calls_poor;
    (o, obs)
}

/// Starts the task that publishes snapshots and evaluates the alert rules.
pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut cfg: AlertsConfig = state.config.alerts.clone();
        if let Some(cluster) = &state.cluster {
            // In a fleet the alerts are the region's.
            cfg.region = cluster.region().to_owned();
        }
        let eval_every = cfg.eval_interval_secs.max(1);
        let mut engine = Engine::new(&cfg);
        let mut evaluating = false;
        let mut region_alerts = AlertsView::default();
        let webhook = (!cfg.webhook_url.is_empty()).then(|| {
            let external = if state.config.public_url.is_empty() {
                state
                    .ws_url
                    .replacen("ws", "http", 1)
                    .trim_end_matches("/ws")
                    .to_owned()
            } else {
                state.config.public_url.clone()
            };
            alerts::spawn_webhook(cfg.webhook_url.clone(), external)
        });
        let mut joins = PerMinute::default();
        let mut failures = PerMinute::default();
        let mut last_relay: Option<(u64, u64)> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            let now = now_ms();
            let live = state.hub.live();
            let seats: HashMap<_, HashSet<_>> = live
                .iter()
                .map(|c| {
                    let ids = c.seats.iter().map(|s| s.participant_id.clone()).collect();
                    (c.id.clone(), ids)
                })
                .collect();
            state.telemetry.retain(&seats, now);
            let node_name = state.cluster.as_ref().map(|c| c.node_id().to_owned());
            let rows: Vec<ConsultationRow> = live
                .iter()
                .map(|c| {
                    let t = state.telemetry.consultation(&c.id, SPARK_POINTS);
                    let mut r = row(c, t.as_ref(), now);
                    r.node = node_name.clone();
                    r
                })
                .collect();

            let joins_total: u64 = ["doctor", "clinician", "patient"]
                .into_iter()
                .map(|role| state.metrics.joins.get_or_create(&RoleLabel { role }).get())
                .sum();
            let failures_total: u64 = JOIN_FAILURE_CODES
                .into_iter()
                .map(|code| {
                    state
                        .metrics
                        .errors
                        .get_or_create(&CodeLabel { code })
                        .get()
                })
                .sum();
            let relay = state.relay_metrics.as_ref().map(|relay| {
                let s = relay.snapshot();
                let kbps = match last_relay {
                    Some((t, bytes)) if now > t => {
                        s.relayed_bytes.saturating_sub(bytes) as f64 * 8.0 / (now - t) as f64
                    }
                    _ => 0.0,
                };
                last_relay = Some((now, s.relayed_bytes));
                RelayOverview {
                    allocations: s.active_allocations,
                    quota: state.config.turn.relay.total_quota,
                    kbps,
                }
            });

            // This node's gauges, from its own calls.
            let m = &state.metrics;
            for quality in [Quality::Good, Quality::Fair, Quality::Poor] {
                let count = rows.iter().filter(|r| r.quality == Some(quality)).count();
                m.calls
                    .get_or_create(&QualityLabel {
                        quality: quality.as_str(),
                    })
                    .set(count as i64);
            }
            m.relay_allocation_quota
                .set(relay.as_ref().map_or(0, |r| i64::from(r.quota)));
            let longest_down = live
                .iter()
                .flat_map(|c| c.seats.iter().filter_map(|s| s.down_for))
                .max()
                .unwrap_or_default();
            m.seat_held_longest_seconds
                .set(longest_down.as_secs() as i64);

            let local = NodeView {
                node: node_name.clone().unwrap_or_default(),
                at_ms: now,
                connections: m.connections.get(),
                joins_per_minute: joins.push(now, joins_total),
                join_failures_last_minute: failures.push(now, failures_total),
                relay,
                rows: rows
                    .iter()
                    .filter_map(|r| serde_json::to_value(r).ok())
                    .collect(),
                tally: None,
            };
            let local = NodeView {
                tally: Some(Tally::of(&local.rows)),
                ..local
            };
            let watching = state.dashboard.receiver_count() > 0;
            let evaluate_now = n.is_multiple_of(eval_every);
            n += 1;

            // The views the overview and the rules are built from: this server's, or the
            // region's when this node shows it or evaluates for it.
            let (views, evaluator) = match &state.cluster {
                None => (vec![local], true),
                Some(cluster) => {
                    fleet_view::publish(cluster, &local.listing(fleet_view::MAX_ROWS_PER_VIEW))
                        .await;
                    let lease_ms = eval_every * 1000 * fleet_view::LEASE_EVALS;
                    let evaluator = if evaluate_now {
                        cluster.is_up() && fleet_view::hold_lease(cluster, lease_ms).await
                    } else {
                        evaluating
                    };
                    if evaluator && !evaluating {
                        // The region's evaluator moved here: carry on from what it raised.
                        let before = fleet_view::read_alerts(cluster).await.unwrap_or_default();
                        engine = Engine::new(&cfg);
                        engine.adopt(now, before.firing, before.history);
                        tracing::info!("evaluating the region's alert rules");
                    } else if !evaluator && evaluating {
                        engine = Engine::new(&cfg);
                    }
                    evaluating = evaluator;
                    let views = if watching || (evaluator && evaluate_now) {
                        let mut views = fleet_view::region(cluster).await.unwrap_or_default();
                        if !views.iter().any(|v| v.node == local.node) {
                            views.push(local);
                        }
                        views
                    } else {
                        vec![local]
                    };
                    (views, evaluator)
                }
            };
            let fleet = state.cluster.is_some();
            let (mut o, mut obs) = overview_of(&views, now, fleet);

            if evaluator && evaluate_now {
                if let Some(cluster) = &state.cluster {
                    let forget = cfg.node_gone_forget_secs.saturating_mul(1000);
                    match fleet_view::nodes_gone(cluster, now, forget).await {
                        Some(gone) => obs.nodes_gone = gone,
                        // Redis did not answer: keep what was judged last.
                        None => {
                            obs.nodes_gone = engine
                                .firing()
                                .iter()
                                .filter(|a| a.name() == alerts::NODE_GONE)
                                .filter_map(|a| a.labels.get("node").cloned())
                                .collect()
                        }
                    }
                }
                for alert in engine.evaluate(now, alerts::conditions(&cfg, &obs)) {
                    tracing::warn!(alert = alert.name(), status = ?alert.status, summary = %alert.summary, "alert");
                    if let Some(tx) = &webhook
                        && tx.try_send(alert).is_err()
                    {
                        tracing::warn!("alert webhook queue full: alert dropped");
                    }
                }
                if let Some(cluster) = &state.cluster {
                    region_alerts = AlertsView {
                        evaluator: cluster.node_id().to_owned(),
                        firing: engine.firing(),
                        history: engine.history().cloned().collect(),
                    };
                    let ttl = eval_every * fleet_view::LEASE_EVALS * 2;
                    fleet_view::publish_alerts(cluster, &region_alerts, ttl).await;
                }
            }

            // The gauges and the alert rules need the overview every second; the JSON only
            // while someone watches.
            if !watching {
                // A dashboard that opens later must not be shown an old snapshot first.
                if &**state.dashboard.borrow() != "{}" {
                    state.dashboard.send_replace(Arc::from("{}"));
                }
                continue;
            }
            let (firing, history) = match &state.cluster {
                None => (engine.firing(), engine.history().cloned().collect()),
                Some(cluster) => {
                    if !evaluator {
                        region_alerts = fleet_view::read_alerts(cluster).await.unwrap_or_default();
                    }
                    (region_alerts.firing.clone(), region_alerts.history.clone())
                }
            };
            if let Some(cluster) = &state.cluster {
                o.region = Some(cluster.region().to_owned());
                o.node = Some(cluster.node_id().to_owned());
            }
            let mut consultations: Vec<serde_json::Value> =
                views.into_iter().flat_map(|v| v.rows).collect();
            consultations.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
            let snapshot = Snapshot {
                at_ms: now,
                overview: o,
                consultations,
                alerts_firing: firing,
                alerts_history: history,
            };
            match serde_json::to_string(&snapshot) {
                Ok(json) => {
                    state.dashboard.send_replace(Arc::from(json));
                }
                Err(e) => tracing::error!(error = %e, "dashboard snapshot not encodable"),
            }
        }
    })
}

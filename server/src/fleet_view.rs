//! The dashboard and the alert rules across a fleet (`[cluster]`): any node's dashboard shows
//! every live consultation of the region, and one node of the region evaluates the alert rules.
//!
//! A consultation's stats arrive only at its home node (a relayed link is handled there, by
//! the same code as a local one), so each call's telemetry window stays in its home's memory
//! ([`crate::telemetry::MemoryTelemetry`]) and is written nowhere else. What the region shares
//! is each node's *view*: every second a node writes its live consultations' dashboard rows
//! (ids, roles, figures, sparklines, state transitions: the window as the dashboard shows it,
//! never a name, an invite code, a token or an address) and its own counters to
//! `dash:<node>` in Redis with a [`VIEW_TTL_SECS`] lifetime, so a node's calls leave the
//! region's view within seconds of the node. Reading the whole window of every participant
//! from Redis each second instead would move about 36 KB per call (60 samples of about 300
//! bytes, two participants) where a row is about 2 KB.
//!
//! **One evaluator per region.** The alert rules run on the node holding the lease
//! `alerts:lease` ([`LEASE`]: taken when free, renewed by its holder at each evaluation,
//! [`LEASE_EVALS`] evaluation intervals long). It evaluates over the region's views and
//! publishes the firing alerts and their history to `alerts:view`, which the other nodes'
//! dashboards show. When the lease moves (its holder died) the new holder adopts the firing
//! alerts ([`crate::alerts::Engine::adopt`]), so it resolves what the old one raised.
//!
//! **Node gone.** The evaluator keeps `fleet:seen` (node → the last time it was alive, in ms):
//! a node is alive while it is subscribed to its channel (as in [`crate::cluster`]). A node
//! seen before and not alive now is gone ([`crate::alerts::NODE_GONE`], after
//! `alerts.node-gone-for-secs`); one stopped with SIGTERM is marked `left` first ([`leave`])
//! (with the time) and raises nothing; one gone or left longer than
//! `alerts.node-gone-forget-secs` is forgotten.
//! Nothing is judged while this node's own Redis link is down.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use bedside_protocol::quality::Quality;

use crate::alerts::Alert;
use crate::cluster::Cluster;
use crate::dashboard::RelayOverview;

/// How long a node's view lives in Redis after its last write (seconds).
pub const VIEW_TTL_SECS: u64 = 5;
/// At most this many of a node's rows go into its view, the worst first
/// ([`NodeView::listing`]); its [`Tally`] counts all of them. A row is about 2 KB, so a node
/// homing 5,000 calls writes about 200 KB a second instead of 10 MB, and a dashboard lists
/// every poor call before a good one.
pub const MAX_ROWS_PER_VIEW: usize = 100;
/// The evaluator's lease lasts this many evaluation intervals.
pub const LEASE_EVALS: u64 = 3;

/// Takes or renews the evaluator's lease: `KEYS[1]` the lease, `ARGV`: this node, its length
/// (ms). Returns 1 if this node holds it now.
const LEASE: &str = r"
local h = redis.call('GET', KEYS[1])
if h == false or h == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Lets the lease go if it is still this node's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// What a node shows of itself, as the region's dashboards read it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    pub at_ms: u64,
    /// Signaling WebSockets open on it.
    pub connections: i64,
    pub joins_per_minute: u64,
    pub join_failures_last_minute: u64,
    /// Its bundled relay, when it runs one.
    pub relay: Option<RelayOverview>,
    /// Its live consultations' rows (`dashboard::ConsultationRow`, with `node` set); in Redis
    /// at most [`MAX_ROWS_PER_VIEW`] of them.
    pub rows: Vec<serde_json::Value>,
    /// All its live consultations, counted (`None` from a node that does not send it: then
    /// its rows are counted).
    #[serde(default)]
    pub tally: Option<Tally>,
}

/// What a node's live consultations add up to, over all of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub consultations: usize,
    pub participants_connected: usize,
    pub participants_waiting: usize,
    pub participants_reconnecting: usize,
    pub calls_good: usize,
    pub calls_fair: usize,
    pub calls_poor: usize,
    /// The consultations with a participant's link down while its seat is held: (id, seconds).
    pub reconnecting: Vec<(String, u64)>,
}

impl Tally {
    /// Counts `rows` (`dashboard::ConsultationRow`s as JSON; a row that does not read as one is
    /// skipped).
    pub fn of(rows: &[serde_json::Value]) -> Tally {
        #[derive(Deserialize)]
        struct Row {
            id: String,
            quality: Option<Quality>,
            participants: Vec<Participant>,
            reconnecting_secs: Option<u64>,
        }
        #[derive(Deserialize)]
        struct Participant {
            state: String,
        }
        let mut t = Tally::default();
        for row in rows {
            let Ok(r) = Row::deserialize(row) else {
                continue;
            };
            t.consultations += 1;
            for p in &r.participants {
                match p.state.as_str() {
                    "waiting" => t.participants_waiting += 1,
                    "reconnecting" => t.participants_reconnecting += 1,
                    _ => t.participants_connected += 1,
                }
            }
            match r.quality {
                Some(Quality::Good) => t.calls_good += 1,
                Some(Quality::Fair) => t.calls_fair += 1,
                Some(Quality::Poor) => t.calls_poor += 1,
                None => {}
            }
            if let Some(secs) = r.reconnecting_secs {
                t.reconnecting.push((r.id, secs));
            }
        }
        t
    }
}

impl NodeView {
    /// This view as it goes to Redis: every row counted in its tally, at most `max` rows
    /// listed, the worst first (poor, fair, not yet scored, good; then by id).
    pub fn listing(&self, max: usize) -> NodeView {
        let rank = |row: &serde_json::Value| match row["quality"].as_str() {
            Some("poor") => 0,
            Some("fair") => 1,
            Some("good") => 3,
            _ => 2,
        };
        let mut order: Vec<&serde_json::Value> = self.rows.iter().collect();
        order.sort_by(|a, b| (rank(a), a["id"].as_str()).cmp(&(rank(b), b["id"].as_str())));
        NodeView {
            rows: order.into_iter().take(max).cloned().collect(),
            tally: Some(self.tally.clone().unwrap_or_else(|| Tally::of(&self.rows))),
            relay: self.relay.clone(),
            node: self.node.clone(),
            ..*self
        }
    }
}

/// The region's alerts as its evaluator publishes them for the other dashboards.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AlertsView {
    pub evaluator: String,
    pub firing: Vec<Alert>,
    pub history: Vec<Alert>,
}

/// Writes this node's view (a failure is tried again next second).
pub async fn publish(cluster: &Cluster, view: &NodeView) {
    let Ok(json) = serde_json::to_string(view) else {
        return;
    };
    let key = cluster.key("dash", cluster.node_id());
    let written: Result<(), _> = cluster.redis().set_ex(key, json, VIEW_TTL_SECS).await;
    if let Err(e) = written {
        tracing::debug!(error = %e, "redis: the dashboard view was not written");
    }
}

/// Every registered node's view that is still alive, by node name; `None` if Redis did not
/// answer.
pub async fn region(cluster: &Cluster) -> Option<Vec<NodeView>> {
    let mut conn = cluster.redis();
    let mut names: Vec<String> = conn.smembers(cluster.nodes_key()).await.ok()?;
    if !names.iter().any(|n| n == cluster.node_id()) {
        names.push(cluster.node_id().to_owned());
    }
    names.sort();
    let keys: Vec<String> = names.iter().map(|n| cluster.key("dash", n)).collect();
    let views: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(
        views
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(&v).ok())
            .collect(),
    )
}

/// Takes or renews the evaluator's lease for `ttl_ms`; true if this node holds it.
pub async fn hold_lease(cluster: &Cluster, ttl_ms: u64) -> bool {
    let held: Result<i64, _> = redis::Script::new(LEASE)
        .key(cluster.key("alerts", "lease"))
        .arg(cluster.node_id())
        .arg(ttl_ms)
        .invoke_async(&mut cluster.redis())
        .await;
    held.is_ok_and(|h| h == 1)
}

/// The alerts the region's evaluator published last.
pub async fn read_alerts(cluster: &Cluster) -> Option<AlertsView> {
    let json: Option<String> = cluster
        .redis()
        .get(cluster.key("alerts", "view"))
        .await
        .ok()?;
    serde_json::from_str(&json?).ok()
}

/// Publishes the evaluator's alerts for `ttl_secs`.
pub async fn publish_alerts(cluster: &Cluster, view: &AlertsView, ttl_secs: u64) {
    let Ok(json) = serde_json::to_string(view) else {
        return;
    };
    let _: Result<(), _> = cluster
        .redis()
        .set_ex(cluster.key("alerts", "view"), json, ttl_secs.max(1))
        .await;
}

/// How `fleet:seen` marks a node stopped with SIGTERM: `left:<ms>` (when it left).
const LEFT: &str = "left:";

/// The nodes of the region seen alive before and gone now (sorted); `None` if Redis did not
/// answer (then nothing is judged). Marks the live ones seen at `now_ms`, and forgets nodes
/// gone (or left) longer than `forget_ms`, so the hash stays as small as the recent fleet.
pub async fn nodes_gone(cluster: &Cluster, now_ms: u64, forget_ms: u64) -> Option<Vec<String>> {
    let mut conn = cluster.redis();
    let seen_key = cluster.key("fleet", "seen");
    let mut seen: HashMap<String, String> = conn.hgetall(&seen_key).await.ok()?;
    let registered: Vec<String> = conn.smembers(cluster.nodes_key()).await.ok()?;
    for node in &registered {
        seen.entry(node.clone()).or_default();
    }
    let mut gone = Vec::new();
    for (node, last) in seen {
        let alive = cluster.numsub(&node).await? > 0;
        let left = last.starts_with(LEFT);
        let mark = if alive {
            // A node that is stopping stays `left`; one that came back registers again.
            !left || registered.contains(&node)
        } else if left {
            match last[LEFT.len()..].parse::<u64>() {
                Ok(at) if now_ms.saturating_sub(at) > forget_ms => {
                    let _: Result<(), _> = conn.hdel(&seen_key, &node).await;
                }
                Ok(_) => {}
                // Not a time (an older server's bare mark): it left about now.
                Err(_) => {
                    let mark = format!("{LEFT}{now_ms}");
                    let _: Result<(), _> = conn.hset(&seen_key, &node, mark).await;
                }
            }
            false
        } else {
            match last.parse::<u64>() {
                Ok(at) if now_ms.saturating_sub(at) > forget_ms => {
                    let _: Result<(), _> = conn.hdel(&seen_key, &node).await;
                    false
                }
                Ok(_) => {
                    gone.push(node.clone());
                    false
                }
                // Registered but never marked (it died before an evaluation saw it): from now.
                Err(_) => {
                    gone.push(node.clone());
                    true
                }
            }
        };
        if mark {
            let _: Result<(), _> = conn.hset(&seen_key, &node, now_ms.to_string()).await;
        }
    }
    gone.sort();
    Some(gone)
}

/// A graceful stop: this node is marked as having left (so no "node gone" is raised for it),
/// its view removed and the evaluator's lease let go if it held it.
pub async fn leave(cluster: &Cluster) {
    let mut conn = cluster.redis();
    let _: Result<(), _> = conn
        .hset(
            cluster.key("fleet", "seen"),
            cluster.node_id(),
            format!("{LEFT}{}", crate::telemetry::now_ms()),
        )
        .await;
    let _: Result<(), _> = conn.del(cluster.key("dash", cluster.node_id())).await;
    let _: Result<i64, _> = redis::Script::new(RELEASE)
        .key(cluster.key("alerts", "lease"))
        .arg(cluster.node_id())
        .invoke_async(&mut conn)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(
        id: &str,
        quality: Option<&str>,
        states: &[&str],
        reconnecting: Option<u64>,
    ) -> serde_json::Value {
        json!({
            "id": id,
            "quality": quality,
            "participants": states.iter().map(|s| json!({ "state": s })).collect::<Vec<_>>(),
            "reconnecting_secs": reconnecting,
        })
    }

    #[test]
    fn a_view_in_redis_lists_the_worst_rows_and_counts_them_all() {
        let mut rows = Vec::new();
        for i in 0..150 {
            rows.push(row(
                &format!("g{i:03}"),
                Some("good"),
                &["connected", "connected"],
                None,
            ));
        }
        rows.push(row(
            "p1",
            Some("poor"),
            &["connected", "reconnecting"],
            Some(40),
        ));
        rows.push(row("f1", Some("fair"), &["connected", "waiting"], None));
        rows.push(row("n1", None, &["waiting"], None));
        let view = NodeView {
            node: "a".into(),
            at_ms: 1,
            connections: 305,
            joins_per_minute: 0,
            join_failures_last_minute: 0,
            relay: None,
            rows,
            tally: None,
        };
        let listed = view.listing(MAX_ROWS_PER_VIEW);
        assert_eq!(listed.rows.len(), MAX_ROWS_PER_VIEW);
        let ids: Vec<&str> = listed
            .rows
            .iter()
            .take(4)
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["p1", "f1", "n1", "g000"]);
        let t = listed.tally.expect("a listing carries its tally");
        assert_eq!(t.consultations, 153);
        assert_eq!((t.calls_good, t.calls_fair, t.calls_poor), (150, 1, 1));
        assert_eq!(
            (
                t.participants_connected,
                t.participants_waiting,
                t.participants_reconnecting
            ),
            (302, 2, 1)
        );
        assert_eq!(t.reconnecting, vec![("p1".to_owned(), 40)]);
        assert_eq!(listed.connections, 305);
    }
}

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

use crate::alerts::Alert;
use crate::cluster::Cluster;
use crate::dashboard::RelayOverview;

/// How long a node's view lives in Redis after its last write (seconds).
pub const VIEW_TTL_SECS: u64 = 5;
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
    /// Its live consultations' rows (`dashboard::ConsultationRow`, with `node` set).
    pub rows: Vec<serde_json::Value>,
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

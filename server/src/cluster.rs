//! The fleet (`[cluster]`): several nodes of one region share their live state through one
//! Redis, so any node accepts any participant and a node's death loses no consultation.
//! The design and its invariants are in ARCHITECTURE.md ("The fleet"); in short:
//!
//! - **Home.** Each live consultation is homed on one node, whose hub holds its `Room`, runs
//!   its rules and fires its rejoin timers. The home is the Redis key `home:<cid>`, written only
//!   by the [`CLAIM`] script, atomic in Redis: the node named there keeps the consultation while
//!   it is alive (a node is alive while it is subscribed to its own channel: Redis drops the
//!   subscription the moment the node's connection closes, so a `kill -9` is seen at once),
//!   otherwise the caller takes it over. Two nodes claiming at once get one answer.
//! - **Relay.** A participant whose link lands on another node (the *edge*) is relayed: the edge
//!   keeps the transport (budget, keepalive, frame size) and publishes each frame on the home's
//!   channel; the home runs them through the same handling as a local link
//!   ([`crate::ws::serve_remote`]) and publishes what it sends on the edge's channel.
//! - **Mirror.** The home mirrors each seat (role, admission, the hash of its latest resume
//!   token) into `seats:<cid>`, so a node that takes a consultation over gives its seats back
//!   exactly as a restarted single server does from its store: every link down, a fresh rejoin
//!   window, only the latest resume token accepted.
//! - **Loss.** A watchdog (every [`WATCH_EVERY`]) closes relayed links whose home is gone (the
//!   clients resume through the load balancer, and the node they reach takes the consultation
//!   over), drops the home's side of links whose edge is gone (their seats go into the rejoin
//!   window), and sweeps dead nodes' consultations so their seats are released after the window
//!   even if nobody comes back.
//! - **Redis trouble** is not a crash: live rooms keep running from memory; `/readyz` says
//!   `redis`; when the subscription is back the node re-claims its rooms and rewrites its
//!   mirror ([`Cluster::reconcile`]).
//!
//! Messages between nodes are JSON [`Envelope`]s over Redis pub/sub carrying the protocol's own
//! text frames, so no wire protocol of our own is involved.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bedside_protocol::{
    ClientMessage, ConsultationId, JoinAuth, ParticipantId, Role, ServerMessage, close_code,
};
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::AppState;
use crate::hub::{ConnHandle, Hub, MirroredSeat, SeatMirror};
use crate::metrics::Metrics;
use crate::store::SeatRow;

/// `[cluster]`: how this node finds its region's Redis and names itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub redis_url: String,
    pub redis_url_file: PathBuf,
    /// Unique in the region; empty: a random one at each start.
    pub node_id: String,
    pub region: String,
    /// The fleet's region map (`[cluster.regions.<name>]`), the same on every node of every
    /// region; empty: one region, no redirects, each node hands out its own relay.
    pub regions: BTreeMap<String, RegionConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: String::new(),
            redis_url_file: PathBuf::new(),
            node_id: String::new(),
            region: "default".into(),
            regions: BTreeMap::new(),
        }
    }
}

/// One region (cell) of the fleet in the region map: where its clients connect, what its
/// invite codes start with, and its relays.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct RegionConfig {
    /// The region's public web address (`https://eu.clinic.example`): its join page.
    pub public_url: String,
    /// Its signaling URL; empty: `public-url` as `wss://…/ws`.
    pub signaling_url: String,
    /// What its invite codes start with, 1 to 4 letters or digits (`EU-7K3M9-Q2XR4`); empty:
    /// the region's name in capitals.
    pub invite_tag: String,
    /// Its STUN/TURN relays. Each participant is handed all of them, the one with the fewest
    /// live allocations first (by the load its node publishes).
    pub relays: Vec<RelayConfig>,
}

/// One relay of a region.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct RelayConfig {
    /// The node whose bundled relay it is (its published load orders the list); empty: a relay
    /// of its own whose load nobody publishes (listed after those whose load is known).
    pub node: String,
    /// Its `stun:`, `turn:` and `turns:` URLs; every `turn:` relay of a region shares the TURN
    /// secret (`turn.relay.auth-secret` or `ice.turn-secret`).
    pub urls: Vec<String>,
}

impl RegionConfig {
    /// The region's signaling URL.
    pub fn ws_url(&self) -> String {
        if !self.signaling_url.is_empty() {
            return self.signaling_url.clone();
        }
        format!(
            "{}/ws",
            self.public_url
                .trim_end_matches('/')
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1)
        )
    }

    fn tag(&self, name: &str) -> String {
        if self.invite_tag.is_empty() {
            name.to_ascii_uppercase()
        } else {
            self.invite_tag.to_ascii_uppercase()
        }
    }
}

/// How a consultation shows its region: the `rgn` claim of its tokens (join and resume), and
/// the tag in front of its invite codes (`EU-7K3M9-Q2XR4`). The tag names the region only: the
/// code after it is as random as a single clinic's, and only the whole code's SHA-256 is kept.
/// Codes and tokens without one (made before the region map, or by a single clinic) belong to
/// the region that reads them.
pub struct Regions {
    here: String,
    map: BTreeMap<String, RegionConfig>,
}

impl Regions {
    pub fn new(config: &ClusterConfig) -> Self {
        Regions {
            here: config.region.clone(),
            map: config.regions.clone(),
        }
    }

    /// Whether the fleet has a region map at all.
    pub fn mapped(&self) -> bool {
        !self.map.is_empty()
    }

    /// The tag this region's new invite codes start with (none without a region map).
    pub fn own_tag(&self) -> Option<String> {
        self.map.get(&self.here).map(|r| r.tag(&self.here))
    }

    /// The region whose invite codes carry `tag`.
    fn region_of_tag(&self, tag: &str) -> Option<&str> {
        self.map
            .iter()
            .find(|(name, r)| r.tag(name) == tag)
            .map(|(name, _)| name.as_str())
    }

    /// The canonical form of a typed invite code (its tag, if any, kept in front).
    pub fn normalize_invite(&self, typed: &str) -> Option<String> {
        if !self.mapped() {
            return crate::auth::invite::normalize(typed);
        }
        crate::auth::invite::normalize_tagged(typed).map(|(_, code)| code)
    }

    /// The other region a `join` or `resume` belongs to, if it names one this map knows.
    pub fn elsewhere(&self, msg: &ClientMessage, tokens: &crate::auth::Tokens) -> Option<&str> {
        if !self.mapped() {
            return None;
        }
        use crate::auth::TokenKind;
        let region = match msg {
            ClientMessage::Join {
                auth: JoinAuth::InviteCode { code },
                ..
            } => {
                let (tag, _) = crate::auth::invite::normalize_tagged(code)?;
                self.region_of_tag(&tag)?
            }
            ClientMessage::Join {
                auth: JoinAuth::Token { token },
                ..
            } => self.known(tokens.verify(token, TokenKind::Join).ok()?.rgn?)?,
            ClientMessage::Resume { resume_token, .. } => {
                self.known(tokens.verify(resume_token, TokenKind::Resume).ok()?.rgn?)?
            }
            _ => return None,
        };
        (region != self.here).then_some(region)
    }

    fn known(&self, region: String) -> Option<&str> {
        self.map.get_key_value(&region).map(|(k, _)| k.as_str())
    }

    /// What a client that reached the wrong region is told.
    pub fn redirect(&self, region: &str) -> Option<ServerMessage> {
        let r = self.map.get(region)?;
        Some(ServerMessage::Redirect {
            region: region.to_owned(),
            url: r.ws_url(),
            web_url: (!r.public_url.is_empty())
                .then(|| r.public_url.trim_end_matches('/').to_owned()),
        })
    }

    /// This region's relays.
    fn relays(&self) -> &[RelayConfig] {
        self.map.get(&self.here).map_or(&[], |r| &r.relays)
    }
}

/// Orders a region's relays for the next participant: fewest live allocations first (as
/// their nodes last published), relays whose load is unknown (no node, or a node that has
/// not published within [`LOAD_TTL_SECS`]: perhaps gone) after them; ties keep the map's order.
pub fn order_relays(relays: &[RelayConfig], loads: &HashMap<String, NodeLoad>) -> Vec<Vec<String>> {
    let mut ranked: Vec<(usize, i64, &RelayConfig)> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let load = loads.get(&r.node).map_or(i64::MAX, |l| l.relay_allocations);
            (i, load, r)
        })
        .collect();
    ranked.sort_by_key(|(i, load, _)| (*load, *i));
    ranked.into_iter().map(|(_, _, r)| r.urls.clone()).collect()
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.redis_url.is_empty() && self.redis_url_file.as_os_str().is_empty() {
            return Err("[cluster] needs redis-url or redis-url-file".into());
        }
        if !self.node_id.is_empty() && !is_name(&self.node_id) {
            return Err("cluster.node-id: letters, digits, '-' and '_', at most 64".into());
        }
        if !is_name(&self.region) {
            return Err("cluster.region: letters, digits, '-' and '_', at most 64".into());
        }
        self.validate_regions()
    }

    /// The region map: it names this node's region, every signaling URL is a WebSocket URL,
    /// every relay URL a STUN/TURN one, and no two regions share an invite tag.
    fn validate_regions(&self) -> Result<(), String> {
        if self.regions.is_empty() {
            return Ok(());
        }
        if !self.regions.contains_key(&self.region) {
            return Err(format!(
                "cluster.regions: the map must name this node's region {:?}",
                self.region
            ));
        }
        let mut tags = HashSet::new();
        for (name, r) in &self.regions {
            let key = format!("cluster.regions.{name}");
            if !is_name(name) {
                return Err(format!("{key}: letters, digits, '-' and '_', at most 64"));
            }
            if r.public_url.is_empty() && r.signaling_url.is_empty() {
                return Err(format!("{key}: needs public-url or signaling-url"));
            }
            let ws = r.ws_url();
            if !(ws.starts_with("wss://") || ws.starts_with("ws://")) {
                return Err(format!("{key}.signaling-url: a ws:// or wss:// URL"));
            }
            let tag = r.tag(name);
            if tag.is_empty()
                || tag.len() > crate::auth::invite::MAX_TAG
                || !tag.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!(
                    "{key}.invite-tag: 1 to {} letters or digits (the default is the region's name)",
                    crate::auth::invite::MAX_TAG
                ));
            }
            if !tags.insert(tag) {
                return Err(format!("{key}.invite-tag: another region has the same tag"));
            }
            for relay in &r.relays {
                if !relay.node.is_empty() && !is_name(&relay.node) {
                    return Err(format!(
                        "{key}.relays: node names are letters, digits, '-' and '_'"
                    ));
                }
                let stun_or_turn = |u: &String| {
                    u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:")
                };
                if relay.urls.is_empty() || !relay.urls.iter().all(stun_or_turn) {
                    return Err(format!(
                        "{key}.relays: each has stun:, turn: or turns: URLs"
                    ));
                }
            }
        }
        Ok(())
    }

    fn url(&self) -> Result<String, String> {
        if !self.redis_url.is_empty() {
            return Ok(self.redis_url.clone());
        }
        std::fs::read_to_string(&self.redis_url_file)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("cluster.redis-url-file: {e}"))
    }
}

/// How often the watchdog looks for dead homes, dead edges and dead nodes' consultations.
pub const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Frames queued from Redis for one relayed link at its home before they are dropped.
const REMOTE_QUEUE: usize = 256;
/// How long one Redis command may take before it counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// A home key outlives its consultation's last claim by this long, then Redis forgets it.
const HOME_TTL_SECS: u64 = 24 * 3600;

/// Who homes a consultation: `KEYS[1]` the home key; `ARGV`: this node, the channel prefix, the
/// room-set prefix, the consultation id, the key's lifetime. The named node keeps it while it is
/// subscribed to its channel; otherwise this node takes it (and its place in the node's room
/// set). Returns the home.
const CLAIM: &str = r"
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then
  local n = redis.call('PUBSUB', 'NUMSUB', ARGV[2] .. h)
  if tonumber(n[2]) > 0 then return h end
  redis.call('SREM', ARGV[3] .. h, ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
redis.call('SADD', ARGV[3] .. ARGV[1], ARGV[4])
return ARGV[1]
";

/// Lets go of a home key only if it is still this node's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// Marks a mirrored seat admitted: `KEYS[1]` the seats hash, `ARGV[1]` the participant.
const ADMIT: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  local t = cjson.decode(v)
  t['admitted'] = true
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(t))
end
return 1
";

/// What nodes say to each other on their channels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Envelope {
    /// Edge to home: a link starts relaying (the client's address, for the home's limiters).
    Open { from: String, conn: u64, ip: IpAddr },
    /// Edge to home: one text frame from the client.
    Frame {
        from: String,
        conn: u64,
        text: String,
    },
    /// Edge to home: the client's link ended without a close from the home.
    Gone { from: String, conn: u64 },
    /// Home to edge: one server message for the client.
    Out { conn: u64, text: String },
    /// Home to edge: close the client's link with this code.
    Close { conn: u64, code: u16 },
    /// To a consultation's home: end it (the administration API was asked elsewhere).
    End { cid: String },
    /// To a consultation's home: take the patients waiting with an invite out of its waiting
    /// room (the invites were revoked elsewhere); answered with [`Envelope::Revoked`].
    RevokeInvites { from: String, req: u64, cid: String },
    /// Home to the asking node: how many waiting patients left.
    Revoked { req: u64, removed: usize },
}

/// What the home's side of a relayed link receives.
pub enum Inbound {
    Frame(String),
}

/// Where a consultation is homed.
#[derive(Debug, PartialEq, Eq)]
pub enum Home {
    Here,
    There(String),
}

/// A seat as mirrored in Redis.
#[derive(Serialize, Deserialize)]
struct SeatRecord {
    role: Role,
    admitted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_hash: Option<String>,
}

enum MirrorOp {
    Put(ConsultationId, ParticipantId, String),
    Remove(ConsultationId, ParticipantId),
    RoomGone(ConsultationId),
    Ended(ConsultationId),
    /// Answered once every earlier change is written (or failed).
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// What each node publishes about itself (every [`LOAD_EVERY`], kept [`LOAD_TTL_SECS`]), for
/// `/api/v1/fleet` and an autoscaler.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeLoad {
    pub node: String,
    /// Consultations homed on the node.
    pub consultations: i64,
    /// Signaling WebSockets open on it.
    pub connections: i64,
    /// Its bundled relay's live allocations and bytes relayed since start (0 without one).
    pub relay_allocations: i64,
    pub relayed_bytes: u64,
    /// Its relay's relayed bandwidth over the last [`LOAD_EVERY`], bits per second.
    #[serde(default)]
    pub relayed_bps: u64,
    /// When it said so (Unix seconds).
    pub at: u64,
}

/// The region as `/api/v1/fleet` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fleet {
    pub region: String,
    /// The node that answered.
    pub node: String,
    /// Every node that published its load in the last [`LOAD_TTL_SECS`], by name.
    pub nodes: Vec<NodeLoad>,
}

/// How often a node publishes its [`NodeLoad`], and how long Redis keeps it.
pub const LOAD_EVERY: Duration = Duration::from_secs(2);
pub const LOAD_TTL_SECS: u64 = 6;

/// One node's part in the fleet.
pub struct Cluster {
    node: String,
    region: String,
    prefix: String,
    client: redis::Client,
    conn: ConnectionManager,
    /// Whether this node's subscription to its channel is live.
    up: Arc<AtomicBool>,
    /// Edge side: this node's links relayed to another home (link id to its handle and home).
    edges: Mutex<HashMap<u64, (ConnHandle, String)>>,
    /// Home side: links relayed here ((edge node, edge link id) to the link's task).
    remotes: Mutex<HashMap<(String, u64), mpsc::Sender<Inbound>>>,
    mirror_tx: mpsc::UnboundedSender<MirrorOp>,
    mirror_rx: Mutex<Option<mpsc::UnboundedReceiver<MirrorOp>>>,
    /// Set once a graceful stop gave the consultations up: the mirror is then left alone.
    handed_over: AtomicBool,
    metrics: Arc<Metrics>,
    hub: OnceLock<Weak<Hub>>,
    /// The fleet's region map.
    regions: Regions,
    /// This region's relays, least loaded first, as of the last load period.
    relay_order: Mutex<Vec<Vec<String>>>,
    /// Admin requests sent to other homes, waiting for their answer.
    pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<usize>>>,
    next_req: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// Connects to the region's Redis (it must answer at start).
    pub async fn connect(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let url = config.url()?;
        let client = redis::Client::open(url).map_err(|e| format!("cluster.redis-url: {e}"))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            REDIS_TIMEOUT * 2,
            client.get_connection_manager_with_config(manager),
        )
        .await
        .map_err(|_| "redis: no answer".to_owned())?
        .map_err(|e| format!("redis: {e}"))?;
        let node = if config.node_id.is_empty() {
            crate::auth::random_id("n")
        } else {
            config.node_id.clone()
        };
        let (mirror_tx, mirror_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Cluster {
            node,
            region: config.region.clone(),
            prefix: format!("bedside:{}:", config.region),
            client,
            conn,
            up: Arc::new(AtomicBool::new(false)),
            edges: Mutex::new(HashMap::new()),
            remotes: Mutex::new(HashMap::new()),
            mirror_tx,
            mirror_rx: Mutex::new(Some(mirror_rx)),
            handed_over: AtomicBool::new(false),
            metrics,
            hub: OnceLock::new(),
            relay_order: Mutex::new(
                Regions::new(config)
                    .relays()
                    .iter()
                    .map(|r| r.urls.clone())
                    .collect(),
            ),
            regions: Regions::new(config),
            pending: Mutex::new(HashMap::new()),
            next_req: std::sync::atomic::AtomicU64::new(1),
        }))
    }

    /// The fleet's region map.
    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Counts one join or resume sent to its consultation's region.
    pub fn redirected(&self) {
        self.metrics.cluster_redirects.inc();
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// A handle on the region's Redis, for the fleet's dashboard and alerts
    /// ([`crate::fleet_view`]).
    pub fn redis(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Whether this node's Redis link is up (nothing is judged about other nodes while not).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether this node's subscription to Redis is live (for `/readyz`).
    pub fn redis_up(&self) -> Arc<AtomicBool> {
        self.up.clone()
    }

    fn channel(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }

    /// The region's set of registered nodes.
    pub(crate) fn nodes_key(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    pub(crate) fn key(&self, what: &str, id: &str) -> String {
        format!("{}{what}:{id}", self.prefix)
    }

    fn hub(&self) -> Option<Arc<Hub>> {
        self.hub.get().and_then(Weak::upgrade)
    }

    /// Mirrors the hub's seats from now on.
    pub fn attach(self: &Arc<Self>, hub: &Arc<Hub>) {
        let _ = self.hub.set(Arc::downgrade(hub));
        hub.set_mirror(self.clone());
        if self.regions.mapped() {
            hub.set_relay_choice(self.clone());
        }
    }

    /// Starts the subscriber, the mirror writer and the watchdog.
    pub fn spawn(self: &Arc<Self>, state: Weak<AppState>) {
        tokio::spawn(self.clone().subscribe_loop(state.clone()));
        if let Some(rx) = lock(&self.mirror_rx).take() {
            tokio::spawn(self.clone().mirror_loop(rx));
        }
        tokio::spawn(self.clone().watchdog());
        tokio::spawn(self.clone().publish_load(state));
    }

    /// Publishes this node's load every [`LOAD_EVERY`], then reads the region's (for the
    /// relay order and the fleet gauges of `/metrics`).
    async fn publish_load(self: Arc<Self>, state: Weak<AppState>) {
        let mut tick = tokio::time::interval(LOAD_EVERY);
        let mut last: Option<(u64, std::time::Instant)> = None;
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let relay = state.relay_metrics.as_ref().map(|m| m.snapshot());
            let relayed_bytes = relay.as_ref().map_or(0, |r| r.relayed_bytes);
            let now = std::time::Instant::now();
            let relayed_bps = relayed_bandwidth(last, relayed_bytes, now);
            last = Some((relayed_bytes, now));
            state
                .metrics
                .cluster_relay_bandwidth
                .set(relayed_bps as i64);
            let load = NodeLoad {
                node: self.node.clone(),
                consultations: state.metrics.consultations_active.get(),
                connections: state.metrics.connections.get(),
                relay_allocations: relay.as_ref().map_or(0, |r| r.active_allocations),
                relayed_bytes,
                relayed_bps,
                at: crate::auth::unix_now(),
            };
            drop(state);
            let json = serde_json::to_string(&load).expect("loads serialize");
            let _: Result<(), _> = self
                .conn
                .clone()
                .set_ex(self.key("load", &self.node), json, LOAD_TTL_SECS)
                .await;
            if let Ok(fleet) = self.fleet().await {
                self.note_region_load(&fleet.nodes);
            }
        }
    }

    /// The region's loads as just read: the relay order for the next participants, and the
    /// per-node gauges of `/metrics`.
    fn note_region_load(&self, nodes: &[NodeLoad]) {
        let loads: HashMap<String, NodeLoad> =
            nodes.iter().map(|n| (n.node.clone(), n.clone())).collect();
        *lock(&self.relay_order) = order_relays(self.regions.relays(), &loads);
        let (allocations, bandwidth) = (
            &self.metrics.fleet_relay_allocations,
            &self.metrics.fleet_relay_bandwidth,
        );
        allocations.clear();
        bandwidth.clear();
        for n in nodes {
            let label = crate::metrics::NodeLabel {
                node: n.node.clone(),
            };
            allocations.get_or_create(&label).set(n.relay_allocations);
            bandwidth.get_or_create(&label).set(n.relayed_bps as i64);
        }
    }

    /// The region's nodes and their load, as published.
    pub async fn fleet(&self) -> Result<Fleet, redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn.smembers(format!("{}nodes", self.prefix)).await?;
        names.sort();
        let mut nodes = Vec::new();
        for name in names {
            let load: Option<String> = conn.get(self.key("load", &name)).await?;
            if let Some(load) = load.and_then(|l| serde_json::from_str(&l).ok()) {
                nodes.push(load);
            }
        }
        Ok(Fleet {
            region: self.region.clone(),
            node: self.node.clone(),
            nodes,
        })
    }

    /// Who homes `cid` now (taking it over if its node is gone or nobody has it).
    pub async fn home_of(&self, cid: &ConsultationId) -> Result<Home, redis::RedisError> {
        let home: String = redis::Script::new(CLAIM)
            .key(self.key("home", &cid.0))
            .arg(&self.node)
            .arg(self.channel(""))
            .arg(format!("{}rooms:", self.prefix))
            .arg(&cid.0)
            .arg(HOME_TTL_SECS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if home == self.node {
            Home::Here
        } else {
            Home::There(home)
        })
    }

    /// The mirrored seats of `cid`, with each one's latest resume token hash.
    pub async fn seats(&self, cid: &ConsultationId) -> Result<Vec<SeatRow>, redis::RedisError> {
        let all: HashMap<String, String> =
            self.conn.clone().hgetall(self.key("seats", &cid.0)).await?;
        Ok(all
            .into_iter()
            .filter_map(|(pid, json)| {
                let rec: SeatRecord = serde_json::from_str(&json).ok()?;
                let hash = rec
                    .resume_hash
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|h| <[u8; 32]>::try_from(h).ok());
                Some(SeatRow {
                    participant_id: ParticipantId(pid),
                    role: rec.role,
                    admitted: rec.admitted,
                    resume_hash: hash,
                    // The mirror keeps no join token: a seat taken over is bound by its resume
                    // token only.
                    token: None,
                })
            })
            .collect())
    }

    async fn publish(&self, node: &str, env: &Envelope) -> Result<i64, redis::RedisError> {
        let text = serde_json::to_string(env).expect("envelopes serialize");
        self.metrics.cluster_published.inc();
        self.conn.clone().publish(self.channel(node), text).await
    }

    /// Edge side: starts relaying link `handle` to `home` with its first frame. False if the
    /// home is not there to hear it.
    pub async fn open_relay(
        &self,
        handle: &ConnHandle,
        home: &str,
        ip: IpAddr,
        text: &str,
    ) -> bool {
        lock(&self.edges).insert(handle.id, (handle.clone(), home.to_owned()));
        let from = self.node.clone();
        let opened = self
            .publish(
                home,
                &Envelope::Open {
                    from: from.clone(),
                    conn: handle.id,
                    ip,
                },
            )
            .await;
        matches!(opened, Ok(n) if n > 0) && self.relay_frame(handle.id, home, text).await
    }

    /// Edge side: one more frame of a relayed link. False only if the home is gone (nobody
    /// listens on its channel); while Redis is unreachable the frame is dropped and the link
    /// kept, since the call's media does not need the server.
    pub async fn relay_frame(&self, conn: u64, home: &str, text: &str) -> bool {
        let env = Envelope::Frame {
            from: self.node.clone(),
            conn,
            text: text.to_owned(),
        };
        match self.publish(home, &env).await {
            Ok(n) => n > 0,
            Err(e) => {
                self.metrics.limit("fleet_frame_dropped");
                tracing::debug!(error = %e, "redis: a relayed frame was dropped");
                true
            }
        }
    }

    /// Edge side: a relayed link ended; `dropped` if the home did not close it.
    pub async fn relay_end(&self, conn: u64, home: &str, dropped: bool) {
        lock(&self.edges).remove(&conn);
        if dropped {
            let env = Envelope::Gone {
                from: self.node.clone(),
                conn,
            };
            let _ = self.publish(home, &env).await;
        }
    }

    /// Home side: a message or a close for a link relayed from `edge`.
    pub async fn to_edge(&self, edge: &str, env: Envelope) {
        if let Err(e) = self.publish(edge, &env).await {
            tracing::warn!(error = %e, "relay to an edge node failed");
        }
    }

    /// Home side: a relayed link's task ended.
    pub fn remote_done(&self, edge: &str, conn: u64) {
        lock(&self.remotes).remove(&(edge.to_owned(), conn));
    }

    /// Writes an admission to the mirror before anyone is told (as the store does), so a node
    /// that takes the consultation over never asks for it again.
    pub async fn persist_admission(
        &self,
        cid: &ConsultationId,
        pid: &ParticipantId,
    ) -> Result<(), String> {
        let (done, written) = tokio::sync::oneshot::channel();
        let _ = self.mirror_tx.send(MirrorOp::Barrier(done));
        let _ = written.await;
        let _: i64 = redis::Script::new(ADMIT)
            .key(self.key("seats", &cid.0))
            .arg(&pid.0)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The node `cid` is homed on, if Redis knows and answers (a read: unlike
    /// [`Self::home_of`], it claims nothing).
    async fn current_home(&self, cid: &ConsultationId) -> Option<String> {
        self.conn
            .clone()
            .get(self.key("home", &cid.0))
            .await
            .unwrap_or(None)
    }

    /// Asks the home of `cid`, wherever it is, to end it.
    pub async fn end_everywhere(&self, cid: &ConsultationId) {
        let home = self.current_home(cid).await;
        if let Some(home) = home.filter(|h| *h != self.node) {
            let _ = self
                .publish(&home, &Envelope::End { cid: cid.0.clone() })
                .await;
        }
        let _ = self.mirror_tx.send(MirrorOp::Ended(cid.clone()));
    }

    /// Asks the home of `cid`, wherever it is, to take the patients waiting with an invite
    /// out of the waiting room; how many left. Here, the local hub does it; elsewhere the home
    /// answers over Redis (`None` if it did not within [`REDIS_TIMEOUT`]).
    pub async fn revoke_invites_everywhere(&self, cid: &ConsultationId) -> Option<usize> {
        let home = self.current_home(cid).await;
        let Some(home) = home.filter(|h| *h != self.node) else {
            return self.hub().map(|h| h.revoke_invites(cid));
        };
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.pending).insert(req, tx);
        let env = Envelope::RevokeInvites {
            from: self.node.clone(),
            req,
            cid: cid.0.clone(),
        };
        let sent = matches!(self.publish(&home, &env).await, Ok(n) if n > 0);
        let removed = if sent {
            tokio::time::timeout(REDIS_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        lock(&self.pending).remove(&req);
        removed
    }

    /// A graceful stop: gives up every consultation homed here (the mirror stays, so the node
    /// each participant resumes on takes it over) and closes the links relayed from here, so
    /// their clients resume elsewhere at once.
    pub async fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let rooms_key = self.key("rooms", &self.node);
        let rooms: Vec<String> = conn.smembers(&rooms_key).await.unwrap_or_default();
        for cid in &rooms {
            let _: Result<i64, _> = redis::Script::new(RELEASE)
                .key(self.key("home", cid))
                .arg(&self.node)
                .invoke_async(&mut conn)
                .await;
        }
        let _: Result<i64, _> = conn.del(&rooms_key).await;
        let _: Result<i64, _> = conn.srem(format!("{}nodes", self.prefix), &self.node).await;
        for (_, (handle, _)) in lock(&self.edges).drain() {
            handle.close(close_code::GOING_AWAY, "server shutting down");
        }
        tracing::info!(consultations = rooms.len(), "handed over to the fleet");
    }

    /// Subscribes to this node's channel, and again after every Redis outage.
    async fn subscribe_loop(self: Arc<Self>, state: Weak<AppState>) {
        let channel = self.channel(&self.node);
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub.subscribe(&channel).await.is_ok() {
                        self.set_up(true);
                        tokio::spawn(self.clone().reconcile());
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let Ok(text) = msg.get_payload::<String>() else {
                                continue;
                            };
                            match serde_json::from_str::<Envelope>(&text) {
                                Ok(env) => self.dispatch(&state, env),
                                Err(_) => tracing::warn!("unreadable fleet message dropped"),
                            }
                        }
                    }
                    self.set_up(false);
                }
                Err(_) => self.set_up(false),
            }
            if state.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        self.metrics.cluster_redis_up.set(up as i64);
        if was != up {
            if up {
                tracing::info!(node = %self.node, "redis: subscribed");
            } else {
                tracing::warn!(node = %self.node, "redis: unreachable; serving live consultations from memory");
            }
        }
    }

    fn dispatch(self: &Arc<Self>, state: &Weak<AppState>, env: Envelope) {
        match env {
            Envelope::Open { from, conn, ip } => {
                let Some(state) = state.upgrade() else { return };
                let (tx, rx) = mpsc::channel(REMOTE_QUEUE);
                lock(&self.remotes).insert((from.clone(), conn), tx);
                tokio::spawn(crate::ws::serve_remote(
                    state,
                    self.clone(),
                    from,
                    conn,
                    ip,
                    rx,
                ));
            }
            Envelope::Frame { from, conn, text } => {
                let tx = lock(&self.remotes).get(&(from, conn)).cloned();
                if let Some(tx) = tx
                    && tx.try_send(Inbound::Frame(text)).is_err()
                {
                    self.metrics.limit("fleet_remote_queue_full");
                }
            }
            Envelope::Gone { from, conn } => {
                // Dropping the sender ends the link's task as a dropped link.
                lock(&self.remotes).remove(&(from, conn));
            }
            Envelope::Out { conn, text } => {
                let handle = lock(&self.edges).get(&conn).map(|(h, _)| h.clone());
                if let (Some(handle), Ok(msg)) = (handle, ServerMessage::decode(&text)) {
                    handle.send(&self.metrics, msg);
                }
            }
            Envelope::Close { conn, code } => {
                if let Some((handle, _)) = lock(&self.edges).remove(&conn) {
                    handle.close(code, "closed by the consultation's node");
                }
            }
            Envelope::End { cid } => {
                if let Some(hub) = self.hub() {
                    hub.end(&ConsultationId(cid));
                }
            }
            Envelope::RevokeInvites { from, req, cid } => {
                let removed = self
                    .hub()
                    .map_or(0, |h| h.revoke_invites(&ConsultationId(cid)));
                let this = self.clone();
                tokio::spawn(async move {
                    let _ = this
                        .publish(&from, &Envelope::Revoked { req, removed })
                        .await;
                });
            }
            Envelope::Revoked { req, removed } => {
                if let Some(tx) = lock(&self.pending).remove(&req) {
                    let _ = tx.send(removed);
                }
            }
        }
    }

    /// After (re)subscribing: registers this node, re-claims its live rooms and rewrites their
    /// mirror (Redis may have restarted empty).
    async fn reconcile(self: Arc<Self>) {
        let mut conn = self.conn.clone();
        let _: Result<i64, _> = conn.sadd(format!("{}nodes", self.prefix), &self.node).await;
        let Some(hub) = self.hub() else { return };
        let mut conflicts = 0;
        let live = hub.live();
        for room in &live {
            match self.home_of(&room.id).await {
                Ok(Home::Here) => hub.mirror_room(&room.id),
                Ok(Home::There(_)) => conflicts += 1,
                Err(_) => return,
            }
        }
        tracing::info!(rooms = live.len(), conflicts, "fleet state reconciled");
    }

    /// Applies seat changes to the mirror, in order.
    async fn mirror_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<MirrorOp>) {
        while let Some(op) = rx.recv().await {
            if self.handed_over.load(Ordering::Relaxed) {
                continue;
            }
            let mut conn = self.conn.clone();
            let result: Result<(), redis::RedisError> = match op {
                MirrorOp::Put(cid, pid, json) => {
                    conn.hset(self.key("seats", &cid.0), pid.0, json).await
                }
                MirrorOp::Remove(cid, pid) => conn.hdel(self.key("seats", &cid.0), pid.0).await,
                MirrorOp::RoomGone(cid) => {
                    // Only if the room was not made again since.
                    if self.hub().is_some_and(|h| !h.has_room(&cid)) {
                        conn.srem(self.key("rooms", &self.node), cid.0).await
                    } else {
                        Ok(())
                    }
                }
                MirrorOp::Barrier(done) => {
                    let _ = done.send(());
                    Ok(())
                }
                MirrorOp::Ended(cid) => {
                    let _: Result<(), _> = conn.del(self.key("seats", &cid.0)).await;
                    conn.srem(self.key("rooms", &self.node), cid.0).await
                }
            };
            if let Err(e) = result {
                // Reconciliation rewrites the mirror once Redis is back.
                tracing::debug!(error = %e, "mirror write failed");
            }
        }
    }

    /// How many subscribers `node`'s channel has (1 while the node is alive); `None` if Redis
    /// did not answer.
    pub(crate) async fn numsub(&self, node: &str) -> Option<i64> {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(self.channel(node))
            .query_async(&mut self.conn.clone())
            .await
            .ok()?;
        Some(n)
    }

    /// Closes relayed links whose home died, drops the home's side of links whose edge died, and
    /// takes over dead nodes' consultations. Nothing is judged dead while Redis is unreachable.
    async fn watchdog(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.hub().is_none() {
                return;
            }
            if !self.up.load(Ordering::Relaxed) {
                continue;
            }
            let homes: HashSet<String> =
                lock(&self.edges).values().map(|(_, h)| h.clone()).collect();
            for home in homes {
                if self.numsub(&home).await == Some(0) {
                    let mut edges = lock(&self.edges);
                    let gone: Vec<u64> = edges
                        .iter()
                        .filter(|(_, (_, h))| *h == home)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in gone {
                        if let Some((handle, _)) = edges.remove(&id) {
                            handle.close(close_code::GOING_AWAY, "the consultation's node is gone");
                        }
                    }
                    tracing::warn!("a home node is gone: its relayed links were closed to resume");
                }
            }
            let edge_nodes: HashSet<String> =
                lock(&self.remotes).keys().map(|(n, _)| n.clone()).collect();
            for edge in edge_nodes {
                if self.numsub(&edge).await == Some(0) {
                    lock(&self.remotes).retain(|(n, _), _| *n != edge);
                    tracing::warn!("an edge node is gone: its participants' seats are held");
                }
            }
            self.sweep().await;
        }
    }

    /// Takes over the consultations of nodes that are gone, so their seats are held for the
    /// rest of a rejoin window and released after it by this node.
    async fn sweep(&self) {
        let Some(hub) = self.hub() else { return };
        let mut conn = self.conn.clone();
        let nodes_key = format!("{}nodes", self.prefix);
        let nodes: Vec<String> = conn.smembers(&nodes_key).await.unwrap_or_default();
        for node in nodes.into_iter().filter(|n| *n != self.node) {
            if self.numsub(&node).await != Some(0) {
                continue;
            }
            let rooms_key = self.key("rooms", &node);
            let rooms: Vec<String> = conn.smembers(&rooms_key).await.unwrap_or_default();
            for cid in rooms {
                let cid = ConsultationId(cid);
                if let Ok(Home::Here) = self.home_of(&cid).await {
                    match self.seats(&cid).await {
                        Ok(seats) if !seats.is_empty() => {
                            tracing::info!(consultation = %cid, seats = seats.len(), "taken over from a node that is gone");
                            hub.restore(&cid, seats);
                        }
                        Ok(_) => {
                            let _ = self.mirror_tx.send(MirrorOp::RoomGone(cid));
                        }
                        Err(_) => {}
                    }
                }
            }
            let left: i64 = conn.scard(&rooms_key).await.unwrap_or(1);
            if left == 0 {
                let _: Result<i64, _> = conn.srem(&nodes_key, &node).await;
            }
        }
    }
}

/// A relay's bandwidth from its byte counter: bits per second since the last reading.
fn relayed_bandwidth(
    last: Option<(u64, std::time::Instant)>,
    bytes: u64,
    now: std::time::Instant,
) -> u64 {
    let Some((before, at)) = last else { return 0 };
    let secs = now.duration_since(at).as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (bytes.saturating_sub(before) as f64 * 8.0 / secs) as u64
}

impl crate::hub::RelayChoice for Cluster {
    fn relays(&self) -> Option<Vec<Vec<String>>> {
        let order = lock(&self.relay_order).clone();
        (!order.is_empty()).then_some(order)
    }
}

impl SeatMirror for Cluster {
    fn put(&self, cid: &ConsultationId, pid: &ParticipantId, seat: MirroredSeat) {
        let rec = SeatRecord {
            role: seat.role,
            admitted: seat.admitted,
            resume_hash: seat.resume_hash.map(hex::encode),
        };
        let json = serde_json::to_string(&rec).expect("seat records serialize");
        let _ = self
            .mirror_tx
            .send(MirrorOp::Put(cid.clone(), pid.clone(), json));
    }

    fn remove(&self, cid: &ConsultationId, pid: &ParticipantId) {
        let _ = self
            .mirror_tx
            .send(MirrorOp::Remove(cid.clone(), pid.clone()));
    }

    fn room_gone(&self, cid: &ConsultationId) {
        let _ = self.mirror_tx.send(MirrorOp::RoomGone(cid.clone()));
    }

    fn ended(&self, cid: &ConsultationId) {
        let _ = self.mirror_tx.send(MirrorOp::Ended(cid.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_section_needs_redis_and_plain_names() {
        let config = crate::Config::from_toml(
            "[cluster]\nredis-url = \"redis://127.0.0.1:6379/\"\nnode-id = \"node-a\"\nregion = \"eu\"\n",
        )
        .unwrap();
        let cluster = config.cluster.clone().unwrap();
        assert_eq!(
            (cluster.node_id.as_str(), cluster.region.as_str()),
            ("node-a", "eu")
        );
        config.validate().unwrap();
        let bad = |c: ClusterConfig| c.validate().unwrap_err();
        bad(ClusterConfig::default());
        bad(ClusterConfig {
            node_id: "a b".into(),
            ..cluster.clone()
        });
        bad(ClusterConfig {
            region: String::new(),
            ..cluster
        });
        // Without the section, nothing of the fleet is configured.
        assert_eq!(crate::Config::default().cluster, None);
    }

    const MAP: &str = "[cluster]\nredis-url = \"redis://127.0.0.1:6379/\"\nregion = \"us\"\n\
        [cluster.regions.us]\npublic-url = \"https://us.example\"\n\
        [cluster.regions.eu]\npublic-url = \"https://eu.example/\"\n\
        [[cluster.regions.eu.relays]]\nnode = \"eu-a\"\nurls = [\"turn:a.eu.example:3478\"]\n\
        [[cluster.regions.eu.relays]]\nnode = \"eu-b\"\nurls = [\"turn:b.eu.example:3478\"]\n\
        [[cluster.regions.eu.relays]]\nurls = [\"stun:c.eu.example:3478\"]\n";

    #[test]
    fn a_region_map_sends_other_regions_codes_and_tokens_to_their_region() {
        let config = crate::Config::from_toml(MAP).unwrap();
        config.validate().unwrap();
        let cluster = config.cluster.unwrap();
        let regions = Regions::new(&cluster);
        assert_eq!(regions.own_tag().as_deref(), Some("US"));
        let join = |code: &str| ClientMessage::Join {
            protocol_version: 1,
            auth: JoinAuth::InviteCode { code: code.into() },
            display_name: None,
        };
        let tokens = crate::auth::Tokens::new(b"a-shared-token-secret");
        assert_eq!(
            regions.elsewhere(&join("eu-7k3m9-q2xr4"), &tokens),
            Some("eu")
        );
        // This region's codes, untagged ones and unknown tags stay here.
        for code in ["US-7K3M9-Q2XR4", "7K3M9-Q2XR4", "ZZ-7K3M9-Q2XR4"] {
            assert_eq!(regions.elsewhere(&join(code), &tokens), None, "{code}");
        }
        let eu = crate::auth::Tokens::new(b"a-shared-token-secret").in_region("eu");
        let cid = ConsultationId("c-1".into());
        let resume = ClientMessage::Resume {
            protocol_version: 1,
            resume_token: eu.issue_resume(&cid, Role::Patient, &ParticipantId("p-1".into())),
        };
        assert_eq!(regions.elsewhere(&resume, &tokens), Some("eu"));
        let Some(ServerMessage::Redirect { url, web_url, .. }) = regions.redirect("eu") else {
            panic!()
        };
        assert_eq!(url, "wss://eu.example/ws");
        assert_eq!(web_url.as_deref(), Some("https://eu.example"));
        // Without a map nothing is ever elsewhere.
        let alone = Regions::new(&ClusterConfig::default());
        assert_eq!(alone.elsewhere(&join("eu-7k3m9-q2xr4"), &tokens), None);
        // A map that leaves this node's region out, or gives two regions one tag, is refused.
        let bad = |toml: &str| crate::Config::from_toml(toml).unwrap().validate().is_err();
        assert!(bad(&MAP.replace("region = \"us\"", "region = \"asia\"")));
        assert!(bad(&format!(
            "{MAP}[cluster.regions.us2]\npublic-url = \"https://x\"\ninvite-tag = \"US\"\n"
        )));
        assert!(bad(&MAP.replace("turn:b.eu", "http://b.eu")));
    }

    #[test]
    fn relays_are_handed_out_least_loaded_first_unknown_loads_last() {
        let config =
            crate::Config::from_toml(&MAP.replace("region = \"us\"", "region = \"eu\"")).unwrap();
        let regions = Regions::new(config.cluster.as_ref().unwrap());
        let load = |node: &str, relay_allocations: i64| NodeLoad {
            node: node.into(),
            consultations: 0,
            connections: 0,
            relay_allocations,
            relayed_bytes: 0,
            relayed_bps: 0,
            at: 0,
        };
        let first = |loads: &[NodeLoad]| {
            let loads = loads.iter().map(|l| (l.node.clone(), l.clone())).collect();
            order_relays(regions.relays(), &loads)
                .into_iter()
                .map(|urls| urls[0].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            first(&[load("eu-a", 4), load("eu-b", 1)]),
            [
                "turn:b.eu.example:3478",
                "turn:a.eu.example:3478",
                "stun:c.eu.example:3478"
            ]
        );
        // Ties keep the map's order; a node that stopped publishing goes after the others.
        assert_eq!(
            first(&[load("eu-a", 2), load("eu-b", 2)])[0],
            "turn:a.eu.example:3478"
        );
        assert_eq!(
            first(&[load("eu-b", 9)]),
            [
                "turn:b.eu.example:3478",
                "turn:a.eu.example:3478",
                "stun:c.eu.example:3478"
            ]
        );
        let t0 = std::time::Instant::now();
        assert_eq!(relayed_bandwidth(None, 500, t0), 0);
        assert_eq!(
            relayed_bandwidth(Some((1000, t0)), 3500, t0 + Duration::from_secs(2)),
            10_000
        );
    }

    #[test]
    fn envelopes_round_trip_as_tagged_json() {
        let env = Envelope::Close {
            conn: 7,
            code: 1001,
        };
        let text = serde_json::to_string(&env).unwrap();
        assert_eq!(text, r#"{"k":"close","conn":7,"code":1001}"#);
        assert!(matches!(
            serde_json::from_str::<Envelope>(&text).unwrap(),
            Envelope::Close {
                conn: 7,
                code: 1001
            }
        ));
    }
}

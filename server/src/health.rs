//! Health for orchestrators and load balancers: `/healthz` (the process answers) and `/readyz`
//! (it can serve: the store answers a query, the relay answers a STUN binding request on its
//! first UDP address, and the server is not draining). `--only-turn` serves both and the
//! relay's `/metrics` on the `listen` address ([`turn_router`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::AppState;
use crate::store::Store;

/// How long each readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What `/readyz` checks.
pub struct Readiness {
    pub store: Store,
    /// The relay's first UDP address, when a relay runs in this process.
    pub relay_udp: Option<SocketAddr>,
    /// Set when shutdown begins: a load balancer stops sending new clients.
    pub draining: AtomicBool,
    /// A fleet node: whether its subscription to the region's Redis is live.
    pub redis_up: Option<Arc<AtomicBool>>,
}

impl Readiness {
    pub fn new(store: Store, relay_udp: Option<SocketAddr>) -> Self {
        Readiness {
            store,
            relay_udp,
            draining: AtomicBool::new(false),
            redis_up: None,
        }
    }

    /// What is not ready (empty: ready).
    pub async fn not_ready(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            failing.push("draining");
        }
        if self
            .redis_up
            .as_ref()
            .is_some_and(|up| !up.load(Ordering::Relaxed))
        {
            failing.push("redis");
        }
        if !matches!(
            tokio::time::timeout(PROBE_TIMEOUT, self.store.ping()).await,
            Ok(Ok(()))
        ) {
            failing.push("store");
        }
        if let Some(addr) = self.relay_udp
            && !stun_answers(addr).await
        {
            failing.push("relay");
        }
        failing
    }

    pub async fn response(&self) -> Response {
        let failing = self.not_ready().await;
        if failing.is_empty() {
            (StatusCode::OK, "ready\n").into_response()
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", failing.join(", ")),
            )
                .into_response()
        }
    }
}

/// Whether a STUN binding request to `addr` (the loopback address when it is unspecified)
/// gets a binding success response.
async fn stun_answers(addr: SocketAddr) -> bool {
    let target = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        }
    } else {
        addr
    };
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = async {
        let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
        let txid: [u8; 12] = rand::random();
        let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        req.extend_from_slice(&txid);
        sock.send_to(&req, target).await.ok()?;
        let mut buf = [0u8; 576];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.ok()?;
            if from == target && n >= 20 && buf[..2] == [0x01, 0x01] && buf[8..20] == txid {
                return Some(());
            }
        }
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(()))
    )
}

/// `/readyz` of the full server.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    state.readiness.response().await
}

/// The small HTTP listener of `--only-turn`: `/healthz`, `/readyz`, `/metrics` (the relay's).
pub fn turn_router(readiness: Arc<Readiness>, metrics: Arc<bedside_turn::Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { readiness.response().await }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                // The relay's families are OpenMetrics (counters named without `_total`).
                let text = format!("{}# EOF\n", metrics.prometheus());
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

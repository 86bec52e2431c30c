//! `bedside-server`: the clinic server. Signaling over WebSocket (`/ws`), the waiting room, the
//! rejoin window, the administration API, the store (embedded SQLite, or PostgreSQL for a
//! fleet), metrics.
//!
//! A library with a thin `main`: [`run`] (or [`Server::bind`] then [`Server::serve`], which tells
//! the bound address first) is what the binary and the tests call.
//!
//! Code map: [`config`] (the TOML file), [`auth`] (tokens, invite codes, TURN credentials),
//! [`store`] (SQLite or PostgreSQL, and the audit log), [`hub`] (live consultations: seats, waiting room,
//! relay, rejoin window), [`ws`] (reader and writer tasks per WebSocket), [`api`] (HTTP
//! routes), [`metrics`], [`tls`], [`limits`] (budgets, caps, trusted proxies, Host/Origin),
//! [`net`] (the accept path: connection caps, idle timeout, backlog), [`telemetry`] (the calls'
//! stats window), [`alerts`] (rules and webhook), [`dashboard`] (`/dashboard` and its live
//! feed), [`web`] (the patient join page and app links) and [`credentials`] (doctor
//! credentials for a remote clinic), [`cluster`] (a fleet node: live state in Redis, links
//! relayed to each consultation's home node), [`fleet_view`] (the fleet's dashboard and its one
//! alert evaluator per region).

pub mod alerts;
pub mod api;
pub mod auth;
pub mod checkconfig;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod dashboard;
pub mod filemodes;
pub mod fleet_view;
pub mod health;
pub mod hub;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod web;
pub mod ws;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub use config::Config;

use crate::auth::Tokens;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::Store;

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Turn(#[from] bedside_turn::TurnError),
    #[error("data directory: {0}")]
    DataDir(String),
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Extra Prometheus text appended to `/metrics` (the in-process relay's families are registered
/// in the server's own registry instead).
pub type ExtraMetrics = Box<dyn Fn() -> String + Send + Sync>;

/// What every request and connection handler shares.
pub struct AppState {
    pub config: Config,
    pub store: Store,
    pub tokens: Arc<Tokens>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Failed invite codes per source (only failures spend it).
    pub invite_limiter: limits::FailureBudget,
    pub admin_key: String,
    pub ws_url: String,
    pub extra_metrics: Option<ExtraMetrics>,
    /// Resumes per seat (participant id) and per source address.
    pub resume_limiter: DefaultKeyedRateLimiter<String>,
    pub resume_source_limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// The `Host` and `Origin` allow-lists.
    pub gate: limits::Gate,
    /// The calls' stats window, read by the dashboard and the alert rules.
    pub telemetry: Arc<dyn telemetry::TelemetryStore>,
    /// The newest dashboard snapshot (JSON), published by [`dashboard::spawn`].
    pub dashboard: tokio::sync::watch::Sender<Arc<str>>,
    /// The bundled relay's counters, when it runs in-process.
    pub relay_metrics: Option<Arc<bedside_turn::Metrics>>,
    /// What `/readyz` checks.
    pub readiness: Arc<health::Readiness>,
    /// This node's part in a fleet (`[cluster]`); `None` for a single server.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

/// A server bound to its port and ready to serve.
pub struct Server {
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<AppState>,
    generated_admin_key: bool,
    data_dir: PathBuf,
    turn: Option<bedside_turn::TurnHandle>,
    sfu: Option<bedside_sfu::Sfu>,
}

/// Starts the SFU and the task that hands its events (slot layouts, active speakers) to the
/// hub.
fn start_sfu(
    config: &Config,
    signaling: SocketAddr,
    hub: &Arc<Hub>,
    metrics: bedside_sfu::SfuMetrics,
) -> Result<bedside_sfu::Sfu, ServerError> {
    let settings = config
        .sfu
        .settings(signaling)
        .map_err(|e| ServerError::Config(config::ConfigError::Invalid(e)))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sfu = bedside_sfu::Sfu::start_with(settings.clone(), tx, metrics).map_err(|source| {
        ServerError::Bind {
            addr: settings.listen,
            source,
        }
    })?;
    hub.set_sfu(sfu.handle().clone());
    let hub = Arc::downgrade(hub);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let Some(hub) = hub.upgrade() else { break };
            hub.sfu_event(event);
        }
    });
    tracing::info!(addr = %sfu.handle().local_addr(), "sfu listening");
    Ok(sfu)
}

/// Starts the bundled relay with its secret (configured, or generated once and kept in the
/// store).
pub async fn start_turn(
    config: &Config,
    store: &Store,
) -> Result<(bedside_turn::TurnHandle, String), ServerError> {
    let secret = if !config.turn.relay.auth_secret.is_empty() {
        config.turn.relay.auth_secret.clone()
    } else if !config.ice.turn_secret.is_empty() {
        config.ice.turn_secret.clone()
    } else {
        store
            .setting_or_init("turn_secret", || auth::random_secret(24))
            .await?
    };
    let relay = config.turn_relay(&secret);
    // The relay stops through `TurnHandle::shutdown`.
    let handle = bedside_turn::start(relay, std::future::pending()).await?;
    Ok((handle, secret))
}

/// The ICE servers that hand clients the bundled relay: STUN and TURN over UDP, TURN over TCP,
/// and TURN over TLS when it listens for it.
fn ice_for_relay(
    config: &Config,
    relay: &bedside_turn::TurnHandle,
    secret: &str,
) -> config::IceConfig {
    let host = |addr: &SocketAddr| -> String {
        let ip = if addr.ip().is_unspecified() {
            relay.relay_ips().first().copied().unwrap_or(addr.ip())
        } else {
            addr.ip()
        };
        if !config.turn.public_host.is_empty() {
            config.turn.public_host.clone()
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    };
    let mut ice = config.ice.clone();
    for a in relay.udp_addrs() {
        ice.stun_urls.push(format!("stun:{}:{}", host(a), a.port()));
        ice.turn_urls
            .push(format!("turn:{}:{}?transport=udp", host(a), a.port()));
    }
    for a in relay.tcp_addrs() {
        ice.turn_urls
            .push(format!("turn:{}:{}?transport=tcp", host(a), a.port()));
    }
    for a in relay.tls_addrs() {
        ice.turn_urls
            .push(format!("turns:{}:{}?transport=tcp", host(a), a.port()));
    }
    ice.turn_secret = secret.to_owned();
    ice
}

impl Server {
    /// Opens the store, loads or generates the secrets, and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        Self::bind_with(config, None).await
    }

    /// [`Server::bind`], with more text for `/metrics`.
    pub async fn bind_with(
        config: Config,
        extra_metrics: Option<ExtraMetrics>,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let data_dir = config.data_dir();
        filemodes::prepare_data_dir(&data_dir).map_err(ServerError::DataDir)?;
        let store = Store::from_config(&config).await?;

        let token_secret = if config.token_secret.is_empty() {
            store
                .setting_or_init("token_secret", || auth::random_secret(32))
                .await?
        } else {
            config.token_secret.clone()
        };
        let (admin_key, generated_admin_key) = admin_key(&config, &data_dir)?;

        let listener =
            net::listen(config.listen, config.limits.listen_backlog).map_err(|source| {
                ServerError::Bind {
                    addr: config.listen,
                    source,
                }
            })?;
        let local = listener.local_addr()?;
        let tls = tls::server_config(&config, &data_dir)?;
        let ws_url = if config.public_url.is_empty() {
            let scheme = if tls.is_some() { "wss" } else { "ws" };
            format!("{scheme}://{local}/ws")
        } else {
            format!(
                "{}/ws",
                config
                    .public_url
                    .trim_end_matches('/')
                    .replacen("https://", "wss://", 1)
                    .replacen("http://", "ws://", 1)
            )
        };

        let (turn, ice) = if config.turn.enabled {
            let (relay, secret) = start_turn(&config, &store).await?;
            let ice = if config.ice.turn_urls.is_empty() {
                ice_for_relay(&config, &relay, &secret)
            } else {
                config.ice.clone()
            };
            (Some(relay), ice)
        } else {
            (None, config.ice.clone())
        };
        let relay_metrics = turn.as_ref().map(|relay| relay.metrics());
        let mut metrics = Metrics::default();
        if let Some(relay) = &relay_metrics {
            metrics.register_relay(relay.clone());
        }
        metrics.register_store(store.health());
        let sfu_metrics = config.sfu.enabled.then(bedside_sfu::SfuMetrics::default);
        if let Some(sfu) = &sfu_metrics {
            metrics.register_sfu(sfu.clone());
        }
        if config.cluster.is_some() {
            metrics.register_cluster();
        }
        let metrics = Arc::new(metrics);
        let tokens = match &config.cluster {
            // With a region map, every token names the region its consultation belongs to.
            Some(c) if !c.regions.is_empty() => {
                Tokens::new(token_secret.as_bytes()).in_region(&c.region)
            }
            _ => Tokens::new(token_secret.as_bytes()),
        };
        let tokens = Arc::new(tokens);
        let hub = Hub::new(
            store.clone(),
            metrics.clone(),
            tokens.clone(),
            ice,
            config.rejoin_window(),
            config.max_participants,
            &config.limits,
        );
        let sfu = match sfu_metrics {
            Some(m) => Some(start_sfu(&config, local, &hub, m)?),
            None => None,
        };
        let per_minute =
            NonZeroU32::new(config.invite_attempts_per_minute).expect("validated to be > 0");
        let resume_quota = config.limits.resume_quota();
        let source_quota = Quota::per_minute(
            NonZeroU32::new(config.limits.resumes_per_minute.saturating_mul(4)).expect("> 0"),
        )
        .allow_burst(NonZeroU32::new(config.limits.resume_burst.saturating_mul(4)).expect("> 0"));
        let telemetry = Arc::new(telemetry::MemoryTelemetry::new(config.telemetry.clone()));
        let cluster = match &config.cluster {
            Some(c) => {
                let cluster = cluster::Cluster::connect(c, metrics.clone())
                    .await
                    .map_err(ServerError::Cluster)?;
                cluster.attach(&hub);
                Some(cluster)
            }
            None => None,
        };
        let readiness = Arc::new(health::Readiness {
            redis_up: cluster.as_ref().map(|c| c.redis_up()),
            ..health::Readiness::new(
                store.clone(),
                turn.as_ref().and_then(|t| t.udp_addrs().first().copied()),
            )
        });
        let state = Arc::new(AppState {
            resume_limiter: RateLimiter::keyed(resume_quota),
            resume_source_limiter: RateLimiter::keyed(source_quota),
            gate: limits::Gate::new(&config.public_url, &config.limits),
            invite_limiter: limits::FailureBudget::new(per_minute.get()),
            telemetry,
            dashboard: dashboard::channel(),
            relay_metrics,
            config,
            store,
            tokens,
            hub,
            metrics,
            admin_key,
            ws_url,
            extra_metrics,
            readiness,
            cluster,
        });
        Ok(Server {
            listener,
            tls,
            state,
            generated_admin_key,
            data_dir,
            turn,
            sfu,
        })
    }

    /// The SFU, when it runs.
    pub fn sfu(&self) -> Option<&bedside_sfu::SfuHandle> {
        self.sfu.as_ref().map(|s| s.handle())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound socket")
    }

    /// `http(s)://address` of the API.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr())
    }

    /// Where clients open the signaling WebSocket.
    pub fn ws_url(&self) -> &str {
        &self.state.ws_url
    }

    pub fn admin_api_key(&self) -> &str {
        &self.state.admin_key
    }

    /// True when this start generated the administration key (it is printed once).
    pub fn generated_admin_key(&self) -> bool {
        self.generated_admin_key
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The bundled relay, when it runs.
    pub fn turn(&self) -> Option<&bedside_turn::TurnHandle> {
        self.turn.as_ref()
    }

    /// Serves until `shutdown` completes, then closes every WebSocket with "going away" (seats
    /// are kept for resuming) and drains connections for at most five seconds.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let handle = axum_server::Handle::new();
        let state = self.state.clone();
        let h = handle.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            state
                .readiness
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(cluster) = &state.cluster {
                cluster.hand_over().await;
                // After leaving the node set: a node stopped on purpose raises no "node gone".
                fleet_view::leave(cluster).await;
            }
            state.hub.shutdown();
            h.graceful_shutdown(Some(Duration::from_secs(5)));
        });
        let pruner = tokio::spawn(prune_daily(
            self.state.store.clone(),
            self.state.config.audit_retention_days,
        ));
        let state = self.state.clone();
        let janitor = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                state
                    .invite_limiter
                    .retain_recent(std::time::Instant::now());
                state.resume_limiter.retain_recent();
                state.resume_limiter.shrink_to_fit();
                state.resume_source_limiter.retain_recent();
                state.resume_source_limiter.shrink_to_fit();
            }
        });
        let feed = dashboard::spawn(self.state.clone());
        if let Some(cluster) = &self.state.cluster {
            cluster.spawn(Arc::downgrade(&self.state));
        }
        let app =
            api::router(self.state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let local = self.local_addr();
        tracing::info!(tls = self.tls.is_some(), port = local.port(), "listening");
        let limits = &self.state.config.limits;
        let guard = net::Guard::new(limits, self.state.metrics.clone());
        let header_timeout = Duration::from_secs(limits.header_read_timeout_secs);
        let result = match self.tls {
            Some(tls) => {
                let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls);
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
                    .handshake_timeout(header_timeout)
                    .acceptor(guard);
                let mut server = axum_server::from_tcp(self.listener)?
                    .acceptor(acceptor)
                    .first_request_timeout(header_timeout)
                    .handle(handle);
                http_timeouts(&mut server, header_timeout);
                server.serve(app).await
            }
            None => {
                let mut server = axum_server::from_tcp(self.listener)?
                    .acceptor(guard)
                    .first_request_timeout(header_timeout)
                    .handle(handle);
                http_timeouts(&mut server, header_timeout);
                server.serve(app).await
            }
        };
        janitor.abort();
        feed.abort();
        pruner.abort();
        if let Some(relay) = self.turn {
            relay.shutdown();
            relay.join().await;
        }
        if let Some(sfu) = self.sfu {
            sfu.shutdown();
        }
        self.state.store.flush_audit().await?;
        result.map_err(ServerError::Io)
    }
}

/// hyper's header read timeout (it needs a timer to take effect).
fn http_timeouts<A: axum_server::Address, Acc>(
    server: &mut axum_server::Server<A, Acc>,
    header_timeout: Duration,
) {
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
}

fn admin_key(config: &Config, data_dir: &std::path::Path) -> Result<(String, bool), ServerError> {
    if !config.admin_api_key.is_empty() {
        return Ok((config.admin_api_key.clone(), false));
    }
    let path = data_dir.join("admin-api-key");
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => Ok((key.trim().to_owned(), false)),
        _ => {
            let key = auth::random_secret(24);
            tls::write_private(&path, key.as_bytes())?;
            Ok((key, true))
        }
    }
}

/// Prunes the store at start and then once a day (see [`Store::prune`]).
async fn prune_daily(store: Store, audit_retention_days: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
    loop {
        tick.tick().await;
        match store.prune(audit_retention_days, auth::unix_now()).await {
            Ok(p) => tracing::info!(
                invites = p.invites,
                seats = p.seats,
                audit_rows = p.audit_rows,
                consultations = p.consultations,
                "store pruned"
            ),
            Err(e) => tracing::error!(error = %e, "store prune failed"),
        }
    }
}

/// Binds and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(config).await?.serve(shutdown).await
}

/// Completes on ctrl-c or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives right after start-up is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! Bedside's bundled STUN/TURN relay.
//!
//! Speaks STUN Binding (RFC 8489) on UDP and TCP, and TURN (RFC 8656) to clients over UDP, TCP
//! and TLS: Allocate, Refresh, CreatePermission, ChannelBind, Send/Data indications and
//! ChannelData, IPv4 and IPv6 relays (UDP relaying only; no RFC 6062 TCP allocations).
//! Credentials are coturn's TURN REST form ([`rest_credentials`]); nonces are stateless and
//! expire (438). Peers in loopback, private, link-local, unique-local, multicast and other
//! special ranges, and the relay's own addresses, are refused (403) unless `allowed-peers`
//! lists them.
//!
//! # Use
//! ```no_run
//! # async fn f() -> Result<(), bedside_turn::TurnError> {
//! let config = bedside_turn::TurnConfig { auth_secret: "s3cret".into(), ..Default::default() };
//! let handle = bedside_turn::start(config, async { /* e.g. ctrl-c */ }).await?;
//! println!("UDP on {:?}, active allocations {}", handle.udp_addrs(), handle.metrics().snapshot().active_allocations);
//! handle.join().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`stun`]: message codec and ChannelData framing (no I/O, no allocation on parse);
//! - [`auth`]: REST credentials, long-term keys, stateless nonces;
//! - [`peer`]: which peer addresses are allowed;
//! - [`core`]: routing state, sans-IO (time passed in, relay sockets behind a trait);
//! - `driver`: the epoll/recvmmsg socket loop on its own thread, TCP/TLS on tokio.
//!
//! Architecture invariant: nothing under `stun`, `auth`, `peer` or `core` reads a clock or
//! touches a socket; a panic on network input is a bug (see the fuzz targets in `fuzz/`).

pub mod auth;
mod config;
pub mod core;
#[doc(hidden)]
pub mod driver;
mod metrics;
pub mod peer;
pub mod stun;
// The fuzz targets' entry points: not part of the relay's API, built only for `fuzz/` (and
// this crate's own corpus test) with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
#[cfg(feature = "fuzzing")]
pub use fuzz::{fuzz_channel_data, fuzz_core, fuzz_parse_stun};

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::rest_credentials;
pub use config::TurnConfig;
pub use metrics::{ERROR_CODES, Metrics, MetricsSnapshot};

use crate::core::{Core, CoreConfig};
use crate::driver::{Ctrl, Engine, Waker};

/// Errors starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The configuration is not usable.
    #[error("invalid TURN configuration: {0}")]
    Config(String),
    /// Binding a socket or starting the relay thread failed.
    #[error("TURN socket error: {0}")]
    Io(#[from] io::Error),
    /// Loading the TLS certificate or key failed.
    #[error("TURN TLS setup failed: {0}")]
    Tls(String),
}

/// A running relay.
#[derive(Debug)]
pub struct TurnHandle {
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    relay_ips: Vec<IpAddr>,
    metrics: Arc<Metrics>,
    engine: std::thread::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    waker: Waker,
}

impl TurnHandle {
    /// Bound UDP addresses (STUN + TURN), in config order.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }
    /// Bound TCP addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }
    /// Bound TLS addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }
    /// IPs relay sockets bind to.
    pub fn relay_ips(&self) -> &[IpAddr] {
        &self.relay_ips
    }
    /// Live counters (cheap: atomics).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
    /// Stops the relay now (same effect as the shutdown future completing).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.waker.send(Ctrl::Shutdown);
    }
    /// Waits until the relay has stopped (after the shutdown future completed or
    /// [`TurnHandle::shutdown`]); all allocations are released.
    pub async fn join(self) {
        let engine = self.engine;
        let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

fn tls_acceptor(config: &TurnConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, TurnError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if config.listen_tls.is_empty() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Err(TurnError::Config(
            "listen-tls needs tls-cert and tls-key".into(),
        ));
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TurnError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TurnError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TurnError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TurnError::Tls(e.to_string()))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(sc))))
}

/// Starts the relay: binds every listening socket, spawns the relay thread and the TCP/TLS
/// accept tasks on the current tokio runtime, and returns once all are bound. The relay stops
/// when `shutdown` completes (or [`TurnHandle::shutdown`]); await [`TurnHandle::join`] then.
pub async fn start(
    config: TurnConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<TurnHandle, TurnError> {
    if config.listen_udp.is_empty() && config.listen_tcp.is_empty() && config.listen_tls.is_empty()
    {
        return Err(TurnError::Config("no listen address".into()));
    }
    let acceptor = tls_acceptor(&config)?;
    let mut relay_ips = config.relay_ips.clone();
    if relay_ips.is_empty() {
        relay_ips = config
            .listen_udp
            .iter()
            .chain(&config.listen_tcp)
            .chain(&config.listen_tls)
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        relay_ips.dedup();
    }
    let ip4 = relay_ips.iter().copied().find(|ip| ip.is_ipv4());
    let ip6 = relay_ips.iter().copied().find(|ip| ip.is_ipv6());
    if ip4.is_none() && ip6.is_none() {
        return Err(TurnError::Config(
            "relay-ips is empty and the listen addresses are unspecified: set relay-ips".into(),
        ));
    }
    if relay_ips.iter().any(|ip| ip.is_unspecified()) {
        return Err(TurnError::Config(
            "relay-ips must be specific addresses".into(),
        ));
    }
    let mut own: Vec<IpAddr> = relay_ips.clone();
    own.extend(config.relay_advertised_ips.iter().copied());
    own.extend(
        config
            .listen_udp
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified()),
    );
    // Every address of this host, not only the relay's: a peer on another interface of the
    // relay's own machine (a public service bound there, say) is as internal as loopback.
    own.extend(host_addresses());
    own.sort();
    own.dedup();
    let core_cfg = CoreConfig::from_config(&config, own)?;
    let metrics = Arc::new(Metrics::default());
    let core = Core::new(core_cfg, rand::random(), metrics.clone());

    let mut udp = Vec::new();
    let mut udp_addrs = Vec::new();
    for a in &config.listen_udp {
        let s = driver::udp_socket(*a, config.udp_socket_buffer)?;
        udp_addrs.push(s.local_addr()?);
        udp.push(s);
    }
    let mut tcp = Vec::new();
    for a in &config.listen_tcp {
        tcp.push(TcpListener::bind(a).await?);
    }
    let mut tls = Vec::new();
    for a in &config.listen_tls {
        tls.push(TcpListener::bind(a).await?);
    }
    let tcp_addrs = tcp
        .iter()
        .map(|l| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    let tls_addrs = tls
        .iter()
        .map(|l| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;

    let (engine, waker) = Engine::new(
        core,
        udp,
        ip4,
        ip6,
        &config.relay_advertised_ips,
        config.relay_port_min,
        config.relay_port_max,
        config.udp_socket_buffer,
        config.coalesce_us,
        config.udp_offload,
        metrics.clone(),
    )?;
    let engine = std::thread::Builder::new()
        .name("turn-relay".into())
        .spawn(move || engine.run())?;

    let (stop, stop_rx) = watch::channel(false);
    let conn_ids = Arc::new(AtomicU64::new(1));
    let streams = Arc::new(StreamLimits {
        open: std::sync::Mutex::new((0, std::collections::HashMap::new())),
        max: config.max_stream_connections,
        per_source: config.max_stream_connections_per_source,
        idle: std::time::Duration::from_secs(config.stream_idle_timeout_secs.max(1)),
    });
    let mut tasks = Vec::new();
    for l in tcp {
        tasks.push(tokio::spawn(accept_loop(
            l,
            None,
            waker.clone(),
            stop_rx.clone(),
            conn_ids.clone(),
            streams.clone(),
        )));
    }
    if let Some(acc) = acceptor {
        for l in tls {
            tasks.push(tokio::spawn(accept_loop(
                l,
                Some(acc.clone()),
                waker.clone(),
                stop_rx.clone(),
                conn_ids.clone(),
                streams.clone(),
            )));
        }
    }
    {
        let waker = waker.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
            waker.send(Ctrl::Shutdown);
        }));
    }
    Ok(TurnHandle {
        udp: udp_addrs,
        tcp: tcp_addrs,
        tls: tls_addrs,
        relay_ips,
        metrics,
        engine,
        tasks,
        stop,
        waker,
    })
}

/// Caps and timeouts of TCP/TLS client connections.
struct StreamLimits {
    /// Open connections: in total, and per source address.
    open: std::sync::Mutex<(usize, std::collections::HashMap<IpAddr, usize>)>,
    max: usize,
    per_source: usize,
    idle: std::time::Duration,
}

/// Time a new TCP/TLS connection has for its TLS handshake and its first complete frame.
const FIRST_FRAME: std::time::Duration = std::time::Duration::from_secs(10);

/// One connection's place under the caps, given back on drop.
struct StreamSlot(Arc<StreamLimits>, IpAddr);

impl StreamLimits {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.1.get(&ip).copied().unwrap_or(0);
        if open.0 >= self.max || mine >= self.per_source {
            return None;
        }
        open.0 += 1;
        open.1.insert(ip, mine + 1);
        Some(StreamSlot(self.clone(), ip))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.1);
            }
        }
    }
}

async fn accept_loop(
    l: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    waker: Waker,
    mut stop: watch::Receiver<bool>,
    ids: Arc<AtomicU64>,
    limits: Arc<StreamLimits>,
) {
    loop {
        let (sock, addr) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("turn accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(slot) = limits.take(addr.ip()) else {
            // Over the cap: closed at once, before any read.
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let conn = ids.fetch_add(1, Relaxed);
        let waker = waker.clone();
        let stop = stop.clone();
        let idle = limits.idle;
        match &tls {
            None => {
                tokio::spawn(async move {
                    serve_stream(sock, conn, addr, waker, stop, idle).await;
                    drop(slot);
                });
            }
            Some(acc) => {
                let acc = acc.clone();
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(FIRST_FRAME, acc.accept(sock)).await;
                    if let Ok(Ok(s)) = hs {
                        serve_stream(s, conn, addr, waker, stop, idle).await;
                    }
                    drop(slot);
                });
            }
        }
    }
}

/// Reads frames from one TCP/TLS client into the relay thread, writes its replies back.
async fn serve_stream<S: AsyncRead + AsyncWrite + Send + 'static>(
    s: S,
    conn: u64,
    addr: SocketAddr,
    waker: Waker,
    mut stop: watch::Receiver<bool>,
    idle: std::time::Duration,
) {
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    if !waker.send(Ctrl::Open { conn, tx }) {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16384];
    // Until the first complete frame the client gets FIRST_FRAME, then `idle` between reads.
    let mut wait = FIRST_FRAME.min(idle);
    'read: loop {
        let n = tokio::select! {
            r = tokio::time::timeout(wait, rd.read(&mut chunk)) => match r {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => n,
                Err(_) => {
                    tracing::debug!("turn stream idle: closed");
                    break;
                }
            },
            _ = stop.changed() => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match stun::stream_frame_len(&buf) {
                Err(_) => break 'read,
                Ok(None) => break,
                Ok(Some(len)) if buf.len() >= len => {
                    let data: Vec<u8> = buf.drain(..len).collect();
                    wait = idle;
                    if !waker.send(Ctrl::Frame { conn, addr, data }) {
                        break 'read;
                    }
                }
                Ok(Some(_)) => break,
            }
        }
    }
    waker.send(Ctrl::Closed { conn, addr });
    let _ = writer.await;
}

/// The addresses of this host's interfaces (empty if the OS will not say).
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

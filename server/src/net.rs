//! The accept path: the listening socket (with a configurable backlog), and an axum-server
//! acceptor that caps connections globally and per source, sets `TCP_NODELAY`, and closes a
//! connection that has read nothing for the idle timeout.
//!
//! Header read time is bounded by hyper (`header_read_timeout`) and the first request by
//! axum-server (`first_request_timeout`); what neither has is a cap on open connections or an
//! idle timeout between keep-alive requests, so those two live here, in a stream wrapper: it
//! holds the connection's permits (released on drop) and fails a read that waited longer than
//! the idle timeout. WebSockets go through the same wrapper after the upgrade, which is harmless:
//! the server pings every `keepalive-interval-secs`, so a live client's pongs keep it reading.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::limits::{LimitsConfig, source_key};
use crate::metrics::Metrics;

/// Binds `addr` with `backlog` pending connections (std's `bind` always asks for 128).
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Same as std: an IPv6 listener takes only IPv6 unless the OS says otherwise.
        let _ = socket.set_only_v6(true);
    }
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Open connections, in total and per source (IPv6 per /64).
pub struct ConnCounts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// The acceptor: caps, `TCP_NODELAY`, idle timeout.
#[derive(Clone)]
pub struct Guard {
    counts: Arc<Mutex<ConnCounts>>,
    max_total: usize,
    max_per_source: usize,
    /// Proxies are many clients at one address: they are not held to the per-source cap.
    trusted: Arc<Vec<ipnet::IpNet>>,
    idle: Duration,
    metrics: Arc<Metrics>,
}

impl Guard {
    pub fn new(limits: &LimitsConfig, metrics: Arc<Metrics>) -> Self {
        Guard {
            counts: Arc::new(Mutex::new(ConnCounts {
                total: 0,
                per_source: HashMap::new(),
            })),
            max_total: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            trusted: Arc::new(limits.trusted_proxies.clone()),
            idle: Duration::from_secs(limits.http_idle_timeout_secs),
            metrics,
        }
    }

    fn admit(&self, peer: IpAddr) -> Result<Slot, &'static str> {
        let key = source_key(peer);
        let proxy = self.trusted.iter().any(|n| n.contains(&key));
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.max_total {
            return Err("connections_total");
        }
        let mine = c.per_source.entry(key).or_insert(0);
        if !proxy && *mine >= self.max_per_source {
            return Err("connections_per_source");
        }
        *mine += 1;
        c.total += 1;
        self.metrics.http_connections.inc();
        Ok(Slot {
            counts: self.counts.clone(),
            key,
            metrics: self.metrics.clone(),
        })
    }
}

/// One admitted connection's place in the counts; given back on drop.
struct Slot {
    counts: Arc<Mutex<ConnCounts>>,
    key: IpAddr,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.key);
            }
        }
        self.metrics.http_connections.dec();
    }
}

impl<S: Send + 'static> Accept<TcpStream, S> for Guard {
    type Stream = Guarded;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Guarded, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let admitted = stream
            .peer_addr()
            .map_err(|e| (e, "peer_addr"))
            .and_then(|peer| {
                self.admit(peer.ip())
                    .map_err(|why| (io::Error::other("connection cap reached"), why))
            });
        let result = match admitted {
            Ok(slot) => {
                // Small signaling messages must not wait for Nagle's timer.
                let _ = stream.set_nodelay(true);
                Ok((
                    Guarded {
                        inner: stream,
                        _slot: slot,
                        idle: self.idle,
                        deadline: Box::pin(tokio::time::sleep(self.idle)),
                    },
                    service,
                ))
            }
            Err((e, why)) => {
                self.metrics.limit(why);
                // Dropping the stream closes it at once: the cheapest answer to a flood.
                drop(stream);
                Err(e)
            }
        };
        Box::pin(std::future::ready(result))
    }
}

/// An accepted connection: the TCP stream, its place in the counts, and its idle deadline.
pub struct Guarded {
    inner: TcpStream,
    _slot: Slot,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection closed",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

//! Delay and jitter on what this client sends, for the impairment lab: this kernel has no
//! netem, so the delay is added where the packets leave, in the WebRTC stack's sockets. The
//! webrtc crate's runtime is a seam for this: [`DelayRuntime`] hands every peer connection
//! sockets whose sends are held for `delay` plus up to `jitter` (in order, as a path with a
//! deep buffer would), and delegates everything else to the default runtime.
//!
//! Only the probe uses it (`--delay-ms`, `--jitter-ms`); a real client never does: it is built
//! only with the `impair` feature, which the probe turns on and the apps do not.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, EcnCodepoint, JoinHandle,
    RecvMeta, Runtime, Transmit, default_runtime,
};

/// How long each sent datagram is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendDelay {
    pub delay: Duration,
    /// Up to this much more, drawn per datagram (order is kept).
    pub jitter: Duration,
}

/// The default runtime with delayed UDP sends.
pub struct DelayRuntime {
    inner: Arc<dyn Runtime>,
    delay: SendDelay,
}

impl fmt::Debug for DelayRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayRuntime")
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

impl DelayRuntime {
    /// `None` when the webrtc crate has no default runtime (it always has tokio here).
    pub fn new(delay: SendDelay) -> Option<Self> {
        Some(DelayRuntime {
            inner: default_runtime()?,
            delay,
        })
    }
}

impl Runtime for DelayRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = self.inner.wrap_udp_socket(socket)?;
        Ok(Arc::new(DelayedSocket::new(inner, self.delay)))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn name(&self) -> &'static str {
        "delay"
    }
}

/// One datagram waiting for its time.
struct Held {
    due: Instant,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    contents: Vec<u8>,
    src_ip: Option<IpAddr>,
}

/// A UDP socket whose sends leave `delay` (plus jitter) later, in order.
struct DelayedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    delay: SendDelay,
    held: mpsc::UnboundedSender<Held>,
    last_due: Mutex<Instant>,
    sender: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for DelayedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayedSocket")
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

impl Drop for DelayedSocket {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

impl DelayedSocket {
    fn new(inner: Arc<dyn AsyncUdpSocket>, delay: SendDelay) -> Self {
        let (held, mut queue) = mpsc::unbounded_channel::<Held>();
        let socket = inner.clone();
        let sender = tokio::spawn(async move {
            while let Some(h) = queue.recv().await {
                tokio::time::sleep_until(h.due.into()).await;
                let transmit = Transmit {
                    destination: h.destination,
                    ecn: h.ecn,
                    contents: &h.contents,
                    segment_size: None,
                    src_ip: h.src_ip,
                };
                // A failed send is a lost datagram, as on a real path.
                let _ = std::future::poll_fn(|cx| socket.poll_send(cx, &transmit)).await;
            }
        });
        DelayedSocket {
            inner,
            delay,
            held,
            last_due: Mutex::new(Instant::now()),
            sender,
        }
    }
}

impl AsyncUdpSocket for DelayedSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(&self, _cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        let jitter = if self.delay.jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..=self.delay.jitter)
        };
        let due = {
            let mut last = self.last_due.lock().unwrap_or_else(|p| p.into_inner());
            *last = (Instant::now() + self.delay.delay + jitter).max(*last);
            *last
        };
        // GSO is off (one segment per send, below), so `contents` is one datagram.
        let held = Held {
            due,
            destination: transmit.destination,
            ecn: transmit.ecn,
            contents: transmit.contents.to_vec(),
            src_ip: transmit.src_ip,
        };
        match self.held.send(held) {
            Ok(()) => Poll::Ready(Ok(transmit.contents.len())),
            Err(_) => Poll::Ready(Err(io::Error::other("the delayed sender stopped"))),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn max_gso_segments(&self) -> usize {
        1
    }

    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams sent through a delayed socket arrive whole, in order, and no sooner than the
    /// delay.
    #[tokio::test]
    async fn sends_are_held_for_the_delay_and_keep_their_order() {
        let runtime = DelayRuntime::new(SendDelay {
            delay: Duration::from_millis(80),
            jitter: Duration::from_millis(20),
        })
        .unwrap();
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = receiver.local_addr().unwrap();
        let socket = runtime
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let start = Instant::now();
        for i in 0..20u8 {
            socket.send_to(&[i; 32], to).await.unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "sends must not block"
        );
        let mut buf = [0u8; 64];
        for i in 0..20u8 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(2), receiver.recv_from(&mut buf))
                .await
                .expect("delivered")
                .unwrap();
            assert_eq!(&buf[..n], &[i; 32]);
            if i == 0 {
                assert!(
                    start.elapsed() >= Duration::from_millis(80),
                    "{:?}",
                    start.elapsed()
                );
            }
        }
    }
}

//! TURN over TCP and TLS for networks where only TCP (often only port 443) gets out.
//!
//! webrtc 0.21's TURN client speaks only UDP: it skips `turn:...?transport=tcp` and `turns:`
//! URLs (upstream webrtc-rs issue #848). So for each such URL the engine starts a
//! [`TurnTcpShim`]: a UDP socket on 127.0.0.1 that the TURN client is pointed at instead, and
//! that carries each datagram, unchanged, over one TCP (or TLS) connection per client socket to
//! the real server. TURN's messages are self-delimiting on a stream (RFC 8656 section 12.5:
//! STUN messages, and ChannelData padded to four bytes), so the way back splits the stream into
//! messages and returns each as one datagram. Authentication, permissions and channels are the
//! TURN client's business and pass through untouched; media stays DTLS-SRTP end to end, and
//! with `turns:` the relay hop is inside TLS as well.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How many datagrams may wait for a slow TCP connection before new ones are dropped (as UDP
/// would drop them).
const QUEUE: usize = 256;
/// The largest datagram the TURN client sends.
const MAX_DATAGRAM: usize = 65_535;

/// A TURN server reached over a byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTurnServer {
    pub host: String,
    pub port: u16,
    /// `turns:`: TLS on top of TCP.
    pub tls: bool,
}

/// Reads `turn:host:port?transport=tcp` and `turns:host[:port][?transport=tcp]`; `None` for
/// any other URL (UDP TURN, STUN), which needs no shim.
pub fn stream_turn_server(url: &str) -> Option<StreamTurnServer> {
    let (scheme, rest) = url.split_once(':')?;
    let tls = match scheme {
        "turns" => true,
        "turn" => false,
        _ => return None,
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let transport = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("transport="))
        .unwrap_or(if tls { "tcp" } else { "udp" });
    if !transport.eq_ignore_ascii_case("tcp") {
        return None;
    }
    let default_port = if tls { 5349 } else { 3478 };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (hostport, default_port),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some(StreamTurnServer {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// Length of the next TURN message at the start of a stream buffer: `Ok(None)` until four
/// bytes are there, `Err` for bytes that are not STUN or ChannelData. The client's side of the
/// framing the relay reads with `bedside_turn::stun::stream_frame_len`; client-core does not
/// depend on the relay crate (the phones would build it too).
fn frame_len(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    match buf[0] >> 6 {
        0 => Ok(Some(20 + len)),
        1 => Ok(Some(4 + len.next_multiple_of(4))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the TURN server sent something that is not STUN or ChannelData",
        )),
    }
}

/// A local UDP endpoint for the TURN client that relays to a TURN server over TCP or TLS.
/// Dropping it closes the socket and every connection.
pub struct TurnTcpShim {
    local: SocketAddr,
    tls: bool,
    task: JoinHandle<()>,
}

impl Drop for TurnTcpShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TurnTcpShim {
    /// Binds the local socket (127.0.0.1, a free port) and starts relaying to `server`. TLS
    /// uses `tls` (its roots decide which certificates are trusted).
    ///
    /// # Errors
    /// When no local UDP socket can be bound.
    pub async fn start(
        server: StreamTurnServer,
        tls: Arc<rustls::ClientConfig>,
    ) -> io::Result<TurnTcpShim> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let local = socket.local_addr()?;
        let over_tls = server.tls;
        let task = tokio::spawn(relay(socket, Arc::new(server), tls));
        Ok(TurnTcpShim {
            local,
            tls: over_tls,
            task,
        })
    }

    /// The local address the TURN client is pointed at, and what it is carried over (for the
    /// stats' transport of a relay pair).
    pub fn carries(&self) -> (SocketAddr, bedside_protocol::TransportProtocol) {
        let t = if self.tls {
            bedside_protocol::TransportProtocol::Tls
        } else {
            bedside_protocol::TransportProtocol::Tcp
        };
        (self.local, t)
    }

    /// The URL to give the TURN client instead of the stream one.
    pub fn url(&self) -> String {
        format!("turn:{}?transport=udp", self.local)
    }
}

/// Hands each datagram to the connection of the socket it came from, opening one if needed.
async fn relay(
    socket: Arc<UdpSocket>,
    server: Arc<StreamTurnServer>,
    tls: Arc<rustls::ClientConfig>,
) {
    let mut conns: HashMap<SocketAddr, mpsc::Sender<BytesMut>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "TURN-over-TCP shim socket failed");
                return;
            }
        };
        let mut datagram = BytesMut::from(&buf[..n]);
        // ChannelData on a stream must be padded to four bytes (RFC 8656 section 12.5).
        if n >= 4 && buf[0] >> 6 == 1 {
            datagram.resize(4 + (n - 4).next_multiple_of(4), 0);
        }
        let tx = match conns.get(&from) {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(connection(
                    socket.clone(),
                    from,
                    server.clone(),
                    tls.clone(),
                    rx,
                ));
                conns.insert(from, tx);
                &conns[&from]
            }
        };
        // A full queue drops the datagram, as a congested UDP path would.
        let _ = tx.try_send(datagram);
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn open(
    server: &StreamTurnServer,
    tls: Arc<rustls::ClientConfig>,
) -> io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect((server.host.as_str(), server.port)).await?;
    tcp.set_nodelay(true)?;
    if !server.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(server.host.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}

/// One TURN client socket's connection: datagrams out as they come, messages back as
/// datagrams. Ends (and the next datagram opens a new one) when either side fails.
async fn connection(
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    server: Arc<StreamTurnServer>,
    tls: Arc<rustls::ClientConfig>,
    mut outgoing: mpsc::Receiver<BytesMut>,
) {
    let stream = match open(&server, tls).await {
        Ok(s) => s,
        Err(e) => {
            // Never the address: logs carry no addresses.
            tracing::debug!(error.kind = ?e.kind(), "TURN server unreachable over TCP");
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut incoming = BytesMut::with_capacity(MAX_DATAGRAM);
    loop {
        tokio::select! {
            msg = outgoing.recv() => {
                let Some(msg) = msg else { return };
                if wr.write_all(&msg).await.is_err() {
                    return;
                }
            }
            read = rd.read_buf(&mut incoming) => {
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                loop {
                    let len = match frame_len(&incoming) {
                        Ok(Some(len)) if incoming.len() >= len => len,
                        Ok(_) => break,
                        Err(_) => return,
                    };
                    let _ = socket.send_to(&incoming[..len], client).await;
                    incoming.advance(len);
                }
                if incoming.capacity() - incoming.len() < 4096 {
                    incoming.reserve(MAX_DATAGRAM);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls_are_recognized_and_others_left_alone() {
        let s = |host: &str, port, tls| {
            Some(StreamTurnServer {
                host: host.into(),
                port,
                tls,
            })
        };
        assert_eq!(
            stream_turn_server("turn:clinic.example:443?transport=tcp"),
            s("clinic.example", 443, false)
        );
        assert_eq!(
            stream_turn_server("turns:clinic.example:443?transport=tcp"),
            s("clinic.example", 443, true)
        );
        assert_eq!(
            stream_turn_server("turns:clinic.example"),
            s("clinic.example", 5349, true)
        );
        assert_eq!(
            stream_turn_server("turn:[2001:db8::1]:3478?transport=TCP"),
            s("2001:db8::1", 3478, false)
        );
        for other in [
            "turn:clinic.example:3478?transport=udp",
            "turn:clinic.example:3478",
            "stun:clinic.example:3478",
            "turns:clinic.example:443?transport=udp",
            "turn::443?transport=tcp",
            "turn:clinic.example:http?transport=tcp",
            "nonsense",
        ] {
            assert_eq!(stream_turn_server(other), None, "{other}");
        }
    }

    #[test]
    fn stream_frames_are_stun_or_padded_channel_data() {
        assert_eq!(frame_len(&[0, 1, 0]).unwrap(), None);
        // A STUN header announcing 8 bytes of attributes.
        assert_eq!(frame_len(&[0x01, 0x01, 0, 8]).unwrap(), Some(28));
        // ChannelData of 5 bytes takes 8 on a stream.
        assert_eq!(frame_len(&[0x40, 0x00, 0, 5]).unwrap(), Some(12));
        assert_eq!(frame_len(&[0x7f, 0xff, 0, 4]).unwrap(), Some(8));
        assert!(frame_len(&[0x80, 0, 0, 0]).is_err());
    }

    async fn recv(socket: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            socket.recv_from(&mut buf),
        )
        .await
        .expect("a datagram back")
        .unwrap();
        buf[..n].to_vec()
    }

    /// A TCP "server" that echoes what it reads: the shim must return each message as one
    /// datagram to the socket that sent it, in order, with ChannelData padded on the stream.
    #[tokio::test]
    async fn datagrams_cross_the_stream_and_come_back_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return seen;
                }
                seen.extend_from_slice(&buf[..n]);
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let server = StreamTurnServer {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        };
        let tls = crate::signaling::tls_config(None).unwrap();
        let shim = TurnTcpShim::start(server, tls).await.unwrap();
        assert!(shim.url().starts_with("turn:127.0.0.1:"), "{}", shim.url());
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = shim.local;
        let stun = [
            &[0x00, 0x01, 0x00, 0x04][..],
            &[0x21, 0x12, 0xa4, 0x42],
            &[7; 12],
            &[1, 2, 3, 4],
        ]
        .concat();
        let channel_data = [0x40, 0x01, 0x00, 0x03, 9, 9, 9];
        client.send_to(&stun, to).await.unwrap();
        client.send_to(&channel_data, to).await.unwrap();
        assert_eq!(recv(&client).await, stun);
        assert_eq!(recv(&client).await, [0x40, 0x01, 0x00, 0x03, 9, 9, 9, 0]);
        drop(shim);
        let seen = echo.await.unwrap();
        assert_eq!(
            seen.len(),
            stun.len() + 8,
            "ChannelData padded on the stream"
        );
    }
}

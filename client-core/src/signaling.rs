//! A signaling connection to `bedside-server`: typed messages over one WebSocket (TLS when the
//! URL is `wss://`).

use std::sync::Arc;
use std::time::Duration;

use bedside_protocol::{ClientMessage, DecodeError, MAX_MESSAGE_BYTES, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
pub use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("the server sent something this client cannot read: {0}")]
    Decode(#[from] DecodeError),
    #[error("timed out waiting for the server")]
    Timeout,
}

/// What arrives from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message(ServerMessage),
    /// The server closed the connection with this code and reason.
    Closed {
        code: u16,
        reason: String,
    },
}

pub struct SignalingConnection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// A rustls client configuration trusting the web's root certificates and `extra_roots` (for a
/// clinic's self-signed development certificate, as PEM).
pub fn tls_config(extra_roots_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_roots_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("bad certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl SignalingConnection {
    /// Opens the WebSocket. `tls` overrides the TLS configuration for `wss://` URLs.
    pub async fn connect(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, SignalingError> {
        let connector = tls.map(Connector::Rustls);
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(Self::ws_config()),
            true,
            connector,
        )
        .await
        .map_err(|e| SignalingError::Connect(e.to_string()))?;
        Ok(SignalingConnection { ws })
    }

    /// Opens the WebSocket over a TCP connection the caller made (to pick the local address or
    /// interface, say).
    pub async fn connect_over(
        url: &str,
        stream: TcpStream,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, SignalingError> {
        let connector = tls.map(Connector::Rustls);
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            url,
            stream,
            Some(Self::ws_config()),
            connector,
        )
        .await
        .map_err(|e| SignalingError::Connect(e.to_string()))?;
        Ok(SignalingConnection { ws })
    }

    fn ws_config() -> WebSocketConfig {
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_MESSAGE_BYTES);
        config.max_frame_size = Some(MAX_MESSAGE_BYTES);
        // Signaling messages are small: keep the per-connection buffers small too.
        config.read_buffer_size = 4096;
        config.write_buffer_size = 0;
        config
    }

    pub async fn send(&mut self, msg: &ClientMessage) -> Result<(), SignalingError> {
        self.send_raw(Message::Text(msg.encode().into())).await
    }

    /// Sends a frame as it is (tests use this to send what a correct client never would).
    pub async fn send_raw(&mut self, msg: Message) -> Result<(), SignalingError> {
        self.ws
            .send(msg)
            .await
            .map_err(|e| SignalingError::Lost(e.to_string()))
    }

    /// The next message or close from the server; `Lost` if the link broke without a close.
    ///
    /// A message of a type this client does not know (from a newer server) is logged and
    /// skipped: treated as an error it would drop the link, and the resumed link would get
    /// the same message again, a reconnect loop. A known type that does not parse is still an
    /// error.
    pub async fn recv(&mut self) -> Result<Incoming, SignalingError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => match ServerMessage::decode(&text) {
                    Ok(msg) => return Ok(Incoming::Message(msg)),
                    Err(DecodeError::UnknownType(ty)) => {
                        // The type name only, cut short: the rest may carry anything.
                        let ty: String = ty.chars().take(32).collect();
                        tracing::info!(%ty, "ignored a server message of a type this client does not know");
                    }
                    Err(e) => return Err(e.into()),
                },
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((u16::from(CloseCode::Status), String::new()));
                    return Ok(Incoming::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                    return Err(SignalingError::Lost("closed".into()));
                }
                Some(Err(e)) => return Err(SignalingError::Lost(e.to_string())),
            }
        }
    }

    /// [`Self::recv`] with a deadline.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Incoming, SignalingError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| SignalingError::Timeout)?
    }

    /// Closes the WebSocket politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Drops the TCP connection without a close handshake, as a lost link would.
    pub fn abort(self) {
        drop(self.ws);
    }
}

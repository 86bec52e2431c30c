//! The signaling connection's forward compatibility: a message of a type this client does not
//! know (sent by a newer server; the peer here plays one, over a real WebSocket on loopback) is
//! skipped and the link stays up, where it used to drop the link into a reconnect loop. A
//! known type that does not parse is still an error.

use bedside_client_core::signaling::{Incoming, SignalingConnection, SignalingError};
use bedside_protocol::ServerMessage;
use futures_util::SinkExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket peer on loopback that sends `frames`, then waits for the client to go.
async fn newer_server(frames: Vec<&'static str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        for frame in frames {
            ws.send(Message::Text(frame.into())).await.unwrap();
        }
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    });
    url
}

#[tokio::test]
async fn a_message_of_an_unknown_type_is_skipped_and_the_link_stays_up() {
    let url = newer_server(vec![
        r#"{"type":"hologram","protocol_version":9,"beam":{"x":1}}"#,
        r#"{"type":"ping","nonce":7}"#,
        r#"{"type":"ping","nonce":"seven"}"#,
    ])
    .await;
    let mut conn = SignalingConnection::connect(&url, None).await.unwrap();
    let first = conn.recv_timeout(std::time::Duration::from_secs(5)).await;
    assert_eq!(
        first.unwrap(),
        Incoming::Message(ServerMessage::Ping { nonce: 7 })
    );
    // A type it knows, badly formed, is an error as before.
    let bad = conn.recv_timeout(std::time::Duration::from_secs(5)).await;
    assert!(matches!(bad, Err(SignalingError::Decode(_))), "{bad:?}");
    conn.close().await;
}

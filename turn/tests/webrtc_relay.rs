//! Two `webrtc` 0.21 peer connections forced to relay-only ICE (transport policy `relay`)
//! connect through OUR TURN server and exchange data-channel messages.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnectionState,
};
use webrtc::runtime::{Runtime, Sender, channel, default_runtime};

struct Handler {
    gathered: Sender<()>,
    connected: Sender<()>,
    /// Messages received on data channels the remote side opened.
    incoming: Option<(Sender<String>, Arc<dyn Runtime>)>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.try_send(());
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if state == RTCPeerConnectionState::Connected {
            let _ = self.connected.try_send(());
        }
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let Some((tx, rt)) = self.incoming.clone() else {
            return;
        };
        rt.spawn(Box::pin(async move {
            while let Some(ev) = dc.poll().await {
                match ev {
                    DataChannelEvent::OnMessage(m) => {
                        let text = String::from_utf8_lossy(&m.data).to_string();
                        let _ = dc.send_text(&format!("echo: {text}")).await;
                        let _ = tx.try_send(text);
                    }
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_peer_connections_exchange_data() {
    let mut cfg = config();
    cfg.allow_loopback_peers = true; // both peers and both relays are on 127.0.0.1
    let turn = bedside_turn::start(cfg, std::future::pending())
        .await
        .unwrap();
    let (username, credential) =
        bedside_turn::rest_credentials(SECRET, "webrtc", Duration::from_secs(600), unix_now());
    let ice = vec![RTCIceServer {
        urls: vec![format!(
            "turn:127.0.0.1:{}?transport=udp",
            turn.udp_addrs()[0].port()
        )],
        username,
        credential,
    }];
    let rt = default_runtime().expect("webrtc runtime");
    let build = |h: Arc<Handler>| {
        PeerConnectionBuilder::new()
            .with_configuration(
                RTCConfigurationBuilder::new()
                    .with_ice_servers(ice.clone())
                    .with_ice_transport_policy(RTCIceTransportPolicy::Relay)
                    .build(),
            )
            .with_handler(h)
            .with_runtime(rt.clone())
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .build()
    };
    let (og_tx, mut og_rx) = channel::<()>(1);
    let (oc_tx, mut oc_rx) = channel::<()>(1);
    let (ag_tx, mut ag_rx) = channel::<()>(1);
    let (ac_tx, mut ac_rx) = channel::<()>(1);
    let (msg_tx, mut msg_rx) = channel::<String>(16);
    let (echo_tx, mut echo_rx) = channel::<String>(16);
    let (open_tx, mut open_rx) = channel::<()>(1);
    let offerer = build(Arc::new(Handler {
        gathered: og_tx,
        connected: oc_tx,
        incoming: None,
    }))
    .await
    .unwrap();
    let answerer = build(Arc::new(Handler {
        gathered: ag_tx,
        connected: ac_tx,
        incoming: Some((msg_tx, rt.clone())),
    }))
    .await
    .unwrap();

    let dc = offerer.create_data_channel("chat", None).await.unwrap();
    {
        let dc = dc.clone();
        rt.spawn(Box::pin(async move {
            while let Some(ev) = dc.poll().await {
                match ev {
                    DataChannelEvent::OnOpen => {
                        let _ = open_tx.try_send(());
                    }
                    DataChannelEvent::OnMessage(m) => {
                        let _ = echo_tx.try_send(String::from_utf8_lossy(&m.data).to_string());
                    }
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        }));
    }
    let wait = Duration::from_secs(20);
    let offer = offerer.create_offer(None).await.unwrap();
    offerer.set_local_description(offer).await.unwrap();
    tokio::time::timeout(wait, og_rx.recv())
        .await
        .expect("offerer gathering");
    let offer = offerer.local_description().await.unwrap();
    assert!(
        offer.sdp.contains("typ relay"),
        "offer has no relay candidate:\n{}",
        offer.sdp
    );
    assert!(
        !offer.sdp.contains("typ host"),
        "relay-only offer has host candidates"
    );
    answerer.set_remote_description(offer).await.unwrap();
    let answer = answerer.create_answer(None).await.unwrap();
    answerer.set_local_description(answer).await.unwrap();
    tokio::time::timeout(wait, ag_rx.recv())
        .await
        .expect("answerer gathering");
    let answer = answerer.local_description().await.unwrap();
    offerer.set_remote_description(answer).await.unwrap();
    tokio::time::timeout(wait, oc_rx.recv())
        .await
        .expect("offerer connected");
    tokio::time::timeout(wait, ac_rx.recv())
        .await
        .expect("answerer connected");
    tokio::time::timeout(wait, open_rx.recv())
        .await
        .expect("data channel open");

    for i in 0..5 {
        dc.send_text(&format!("hello {i}")).await.unwrap();
        let got = tokio::time::timeout(wait, msg_rx.recv())
            .await
            .expect("message")
            .unwrap();
        assert_eq!(got, format!("hello {i}"));
        let echo = tokio::time::timeout(wait, echo_rx.recv())
            .await
            .expect("echo")
            .unwrap();
        assert_eq!(echo, format!("echo: hello {i}"));
    }
    let m = turn.metrics().snapshot();
    println!("TURN metrics after the call: {m:?}");
    assert!(
        m.allocations_total >= 2,
        "both peers allocated on our server"
    );
    assert!(m.relayed_packets >= 20, "media went through the relay");
    let _ = offerer.close().await;
    let _ = answerer.close().await;
    turn.shutdown();
    turn.join().await;
}

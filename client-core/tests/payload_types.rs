//! client-core's engine against a plain `webrtc` peer whose media engine puts H.264, Opus and
//! RED on other payload types than ours, as a browser does (Chromium offers H.264 on e.g. 108).
//! In both offer and answer roles, what we send must arrive on the numbers the session
//! negotiated (`webrtc` silently drops a packet on any other), and what the peer sends must be
//! read by them (which audio is RED). A peer whose session has no H.264 at all gets no video,
//! and the send path says so (a count, and a warning in the log).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bedside_client_core::call::{EngineCommand, EngineEvent, PeerConnectionState, SdpKind};
use bedside_client_core::engine::{
    Engine, EngineSettings, LocalTracks, MediaKind, PayloadTypes, RemoteMedia,
};
use bedside_client_core::media::{RedBlock, red};
use bedside_protocol::ParticipantId;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tokio::sync::mpsc;
use webrtc::media_stream::Track;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
};

/// The foreign peer's numbers: none of them ours (125, 111, 63).
const H264: u8 = 108;
const OPUS: u8 = 109;
const RED: u8 = 100;

/// What the foreign peer received: (kind, payload type, payload).
type Received = Arc<Mutex<Vec<(RtpCodecKind, u8, bytes::Bytes)>>>;

struct ForeignHandler {
    received: Received,
    gathered: mpsc::UnboundedSender<()>,
    connected: mpsc::UnboundedSender<()>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ForeignHandler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(());
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if state == RTCPeerConnectionState::Connected {
            let _ = self.connected.send(());
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let received = self.received.clone();
        tokio::spawn(async move {
            let kind = track.kind().await;
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    let mut received = received.lock().unwrap();
                    received.push((kind, packet.header.payload_type, packet.payload));
                }
            }
        });
    }
}

fn codec(mime: &str, clock_rate: u32, channels: u16, fmtp: &str) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: mime.to_owned(),
        clock_rate,
        channels,
        sdp_fmtp_line: fmtp.to_owned(),
        rtcp_feedback: vec![],
    }
}

const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

/// A `webrtc` peer connection with its own numbers for our codecs (and no H.264 unless
/// `video`), sending a video and an audio track.
struct Foreign {
    pc: Arc<dyn PeerConnection>,
    video: Arc<TrackLocalStaticSample>,
    audio: Arc<TrackLocalStaticSample>,
    received: Received,
    gathered: mpsc::UnboundedReceiver<()>,
    connected: mpsc::UnboundedReceiver<()>,
}

impl Foreign {
    async fn new(video: bool) -> Self {
        let mut media = MediaEngine::default();
        let opus = codec("audio/opus", 48_000, 2, "minptime=10;useinbandfec=1");
        let red = codec("audio/red", 48_000, 2, &format!("{OPUS}/{OPUS}"));
        let h264 = codec("video/H264", 90_000, 0, H264_FMTP);
        for (rtp_codec, payload_type, kind) in [
            (opus.clone(), OPUS, RtpCodecKind::Audio),
            (red, RED, RtpCodecKind::Audio),
            (h264.clone(), H264, RtpCodecKind::Video),
        ] {
            if kind == RtpCodecKind::Video && !video {
                continue;
            }
            let params = RTCRtpCodecParameters {
                rtp_codec,
                payload_type,
            };
            media.register_codec(params, kind).unwrap();
        }
        let received = Received::default();
        let (gathered_tx, gathered) = mpsc::unbounded_channel();
        let (connected_tx, connected) = mpsc::unbounded_channel();
        let handler = Arc::new(ForeignHandler {
            received: received.clone(),
            gathered: gathered_tx,
            connected: connected_tx,
        });
        let pc = PeerConnectionBuilder::new()
            .with_media_engine(media)
            .with_handler(handler)
            .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
            .build()
            .await
            .unwrap();
        let track = |kind: RtpCodecKind, codec: RTCRtpCodec| {
            let ssrc = rand::random::<u32>();
            let coding = RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            };
            let id = format!("foreign-{kind}");
            let track = MediaStreamTrack::new("foreign".into(), id.clone(), id, kind, vec![coding]);
            Arc::new(TrackLocalStaticSample::new(Instant::now(), track).unwrap())
        };
        let video_track = track(RtpCodecKind::Video, h264);
        let audio_track = track(RtpCodecKind::Audio, opus);
        if video {
            pc.add_track(video_track.clone() as Arc<dyn TrackLocal>)
                .await
                .unwrap();
        }
        pc.add_track(audio_track.clone() as Arc<dyn TrackLocal>)
            .await
            .unwrap();
        Foreign {
            pc: Arc::new(pc),
            video: video_track,
            audio: audio_track,
            received,
            gathered,
            connected,
        }
    }

    /// Its description once all its candidates are in it (no trickling to do this way).
    async fn gathered_description(&mut self) -> RTCSessionDescription {
        tokio::time::timeout(Duration::from_secs(10), self.gathered.recv())
            .await
            .expect("foreign peer gathered its candidates");
        self.pc.local_description().await.unwrap()
    }

    /// The payload types this peer may send on, as its own sender reports them.
    async fn negotiated(&self) -> PayloadTypes {
        let mut codecs = Vec::new();
        for sender in self.pc.get_senders().await {
            codecs.extend(sender.get_parameters().await.unwrap().rtp_parameters.codecs);
        }
        PayloadTypes::from_codecs(&codecs)
    }
}

/// What one call of a few hundred milliseconds of media both ways showed.
struct Outcome {
    /// The foreign peer's numbers, as negotiated.
    foreign: PayloadTypes,
    /// What the foreign peer received: video and audio payload types (and RED's block type).
    video_pts: Vec<u8>,
    audio_pts: Vec<u8>,
    red_block_pts: Vec<u8>,
    /// What our engine received, with the session's numbers it read them by.
    ours: Vec<RemoteMedia>,
    /// What `write_video` reported it could not send.
    video_unsent: u64,
}

async fn call(engine_offers: bool, foreign_video: bool) -> Outcome {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (media_tx, media_rx) = std::sync::mpsc::sync_channel(4096);
    let tracks = LocalTracks::new("bedside").unwrap();
    // Redundant audio on: where the session has RED, audio goes out as RED.
    tracks
        .audio_redundancy
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let settings = EngineSettings {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..Default::default()
    };
    let mut engine = Engine::new(settings, tracks.clone(), events_tx, media_tx);
    let peer = ParticipantId("foreign".into());
    let mut foreign = Foreign::new(foreign_video).await;
    engine
        .execute(EngineCommand::CreatePeer {
            peer: peer.clone(),
            offerer: engine_offers,
            ice_servers: vec![],
        })
        .await
        .unwrap();
    if !engine_offers {
        let offer = foreign.pc.create_offer(None).await.unwrap();
        foreign.pc.set_local_description(offer).await.unwrap();
        let offer = foreign.gathered_description().await;
        engine
            .execute(EngineCommand::SetRemoteDescription {
                peer: peer.clone(),
                kind: SdpKind::Offer,
                sdp: offer.sdp,
            })
            .await
            .unwrap();
    }
    // Our description (offer or answer) and candidates go to the foreign peer; media flows
    // both ways until both ends have had plenty.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut connected = (false, false);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut frames, mut video_unsent) = (0u32, 0);
    let mut foreign_types = None;
    let mut red = bedside_client_core::media::RedEncoder::default();
    while tokio::time::Instant::now() < deadline && frames < 40 {
        tokio::select! {
            Some(event) = events.recv() => match event {
                EngineEvent::LocalDescription { kind, sdp, .. } => {
                    let description = match kind {
                        SdpKind::Offer => RTCSessionDescription::offer(sdp).unwrap(),
                        SdpKind::Answer => RTCSessionDescription::answer(sdp).unwrap(),
                    };
                    foreign.pc.set_remote_description(description).await.unwrap();
                    if kind == SdpKind::Offer {
                        let answer = foreign.pc.create_answer(None).await.unwrap();
                        foreign.pc.set_local_description(answer).await.unwrap();
                        let answer = foreign.gathered_description().await;
                        engine
                            .execute(EngineCommand::SetRemoteDescription {
                                peer: peer.clone(),
                                kind: SdpKind::Answer,
                                sdp: answer.sdp,
                            })
                            .await
                            .unwrap();
                    }
                }
                EngineEvent::LocalCandidate { candidate, .. } => {
                    let init = RTCIceCandidateInit {
                        candidate: candidate.candidate,
                        sdp_mid: candidate.sdp_mid,
                        sdp_mline_index: candidate.sdp_mline_index,
                        username_fragment: candidate.username_fragment,
                        url: None,
                    };
                    let _ = foreign.pc.add_ice_candidate(init).await;
                }
                EngineEvent::ConnectionState { state: PeerConnectionState::Connected, .. } => {
                    connected.0 = true;
                }
                _ => {}
            },
            Some(()) = foreign.connected.recv() => connected.1 = true,
            _ = tick.tick(), if connected == (true, true) => {
                frames += 1;
                // An Annex-B access unit (SPS, PPS, IDR slice): its bytes need not decode,
                // only go out as H.264 RTP.
                let unit = bytes::Bytes::from_static(&[
                    0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f, 0xda, 0, 0, 0, 1, 0x68, 0xce, 0x3c,
                    0x80, 0, 0, 0, 1, 0x65, 0x88, 0x84, 0x21, 0xa0,
                ]);
                let frame = Duration::from_millis(20);
                video_unsent += tracks.write_video(unit.clone(), frame).await;
                let opus = bytes::Bytes::from(vec![0x78; 60]);
                tracks.write_audio(opus.clone(), frame, 30).await;
                // The foreign peer sends on the numbers its own session negotiated, its audio
                // as RED like Chromium's on a lossy link.
                let types = match foreign_types {
                    Some(types) => types,
                    None => *foreign_types.insert(foreign.negotiated().await),
                };
                let sample = |data| Sample { data, duration: frame, ..Sample::new(Instant::now()) };
                if let Some(pt) = types.h264 {
                    let ssrc = foreign.video.ssrcs().await[0];
                    let _ = foreign.video.sample_writer(ssrc, pt).write_sample(&sample(unit)).await;
                }
                if let (Some(red_pt), Some(opus_pt)) = (types.red, types.opus) {
                    let block: Option<RedBlock> = red.redundant(opus_pt, opus.clone(), 960);
                    let payload = red::encode_payload(block.as_slice(), opus_pt, &opus);
                    let ssrc = foreign.audio.ssrcs().await[0];
                    let _ = foreign
                        .audio
                        .sample_writer(ssrc, red_pt)
                        .write_sample(&sample(payload))
                        .await;
                }
            }
        }
    }
    assert_eq!(connected, (true, true), "the call connected");
    // Let the last packets land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.close_all().await;
    let _ = foreign.pc.close().await;
    let received = foreign.received.lock().unwrap().clone();
    let pts = |kind| {
        let mut pts: Vec<u8> = received
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, pt, _)| *pt)
            .collect();
        pts.dedup();
        pts
    };
    let mut red_block_pts: Vec<u8> = received
        .iter()
        .filter(|(k, _, _)| *k == RtpCodecKind::Audio)
        .filter_map(|(_, _, payload)| red::decode(payload).ok())
        .map(|(_, primary)| primary.payload_type)
        .collect();
    red_block_pts.dedup();
    Outcome {
        foreign: foreign_types.expect("media was sent"),
        video_pts: pts(RtpCodecKind::Video),
        audio_pts: pts(RtpCodecKind::Audio),
        red_block_pts,
        ours: media_rx.try_iter().collect(),
        video_unsent,
    }
}

/// Both roles: all our media arrives on the session's numbers, and we read the peer's by them.
async fn check_both_ways(engine_offers: bool) {
    let outcome = call(engine_offers, true).await;
    let expected = if engine_offers {
        // The answerer takes the offerer's numbers (RFC 3264): ours.
        PayloadTypes::OFFERED
    } else {
        PayloadTypes {
            h264: Some(H264),
            opus: Some(OPUS),
            red: Some(RED),
        }
    };
    assert_eq!(
        outcome.foreign, expected,
        "the foreign peer's negotiated numbers"
    );
    assert_eq!(outcome.video_pts, vec![expected.h264.unwrap()], "our video");
    assert_eq!(
        outcome.audio_pts,
        vec![expected.red.unwrap()],
        "our audio, as RED"
    );
    assert_eq!(
        outcome.red_block_pts,
        vec![expected.opus.unwrap()],
        "RED's primary"
    );
    assert_eq!(outcome.video_unsent, 0);
    let video: Vec<_> = outcome
        .ours
        .iter()
        .filter(|m| m.kind == MediaKind::Video)
        .collect();
    let audio: Vec<_> = outcome
        .ours
        .iter()
        .filter(|m| m.kind == MediaKind::Audio)
        .collect();
    assert!(
        video.len() >= 10,
        "{} video packets reached us",
        video.len()
    );
    assert!(
        audio.len() >= 10,
        "{} audio packets reached us",
        audio.len()
    );
    for m in &outcome.ours {
        assert_eq!(m.payload_types, expected, "the numbers we read media by");
    }
    assert!(
        video
            .iter()
            .all(|m| Some(m.packet.header.payload_type) == expected.h264)
    );
    assert!(
        audio
            .iter()
            .all(|m| Some(m.packet.header.payload_type) == expected.red)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_a_browser_like_offer_sends_and_reads_on_its_payload_types() {
    check_both_ways(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offering_sends_and_reads_on_the_payload_types_of_the_answer() {
    check_both_ways(true).await;
}

/// A peer whose session has no H.264 gets no video; every access unit is counted, and audio
/// still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_a_session_did_not_negotiate_is_counted_as_unsent() {
    let outcome = call(false, false).await;
    assert_eq!(outcome.foreign.h264, None);
    assert!(outcome.video_pts.is_empty());
    assert_eq!(outcome.video_unsent, 40, "every access unit counted");
    assert_eq!(outcome.audio_pts, vec![RED]);
}

//! The WebRTC engine: carries out the call state machine's [`EngineCommand`]s on `webrtc` 0.21
//! peer connections (one per remote participant) and reports back [`EngineEvent`]s. It makes no
//! decisions: who offers, when to restart ICE and when to rebuild are the state machine's.
//!
//! Each peer connection gets its own pair of local tracks (H.264 video and Opus audio) from
//! [`LocalTracks`]: the pipeline encodes once and [`LocalTracks`] packetizes each access unit for
//! every peer (a `webrtc` 0.21 track bound to several peer connections sends only to the last
//! one bound). What a peer connection receives goes out as [`RemoteMedia`] on a channel the media
//! pipeline (`pipeline.rs`) reads. DTLS-SRTP is always on (WebRTC has no unencrypted mode).
//!
//! RTCP from the far end: [`FeedbackForwarder`] lets keyframe requests (PLI, FIR) and reception
//! reports through to the application, so a peer's PLI becomes [`EngineEvent::KeyframeRequested`]
//! and its receiver reports give the loss on what we send ([`SendFeedback`]), which the crate's
//! own sender statistics leave at 0. The other way, [`Engine::request_keyframe_from`] sends a PLI
//! for a peer's video when the state machine asks (`EngineCommand::RequestKeyframeFrom`: the
//! pipeline cannot decode it).
//!
//! The SFU (group consultations) is one more peer connection, [`crate::call::SFU_PEER`]: our
//! two tracks upstream plus receive-only audio and video *slots*. [`SfuRoutes`] maps what
//! arrives on a slot (by SSRC, from the SFU's answer) to the participant the SFU's layout puts
//! there, so the pipeline decodes and mixes each participant apart as if they were peers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bedside_protocol::{IceCandidate, IceServer, ParticipantId};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{
    Attribute, BandwidthEstimator, EstimatorStats, Interceptor, NackGeneratorBuilder, Packet,
    PacketReport, Registry, Slot, StreamInfo, TaggedPacket,
};
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    CongestionFeedback, configure_congestion_control,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use std::sync::atomic::AtomicU64;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceServer, RTCIceTransportPolicy,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
    register_default_interceptors,
};

use crate::call::{EngineCommand, EngineEvent, PeerConnectionState, SdpKind};
use crate::congestion::{CongestionConfig, Estimator};
#[cfg(feature = "impair")]
use crate::impair::{DelayRuntime, SendDelay};
use crate::media::{RED_PAYLOAD_TYPE, RedBlock, RedEncoder, SAMPLE_RATE, red};
use crate::pacer::{MediaPacer, PacerStats};
use crate::turn_tcp::{self, TurnTcpShim};

/// RFC 6464's client-to-mixer audio level header extension.
const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// At or above this loudness (−dBov at most this) a packet is marked as voice. A level, not a
/// voice detector: the SFU decides on the levels and ignores the flag.
const VOICE_LEVEL_DBOV: u8 = 50;

/// The payload types Bedside offers. A session may negotiate others (see [`PayloadTypes`]).
pub const OPUS_PAYLOAD_TYPE: u8 = 111;
pub const H264_PAYLOAD_TYPE: u8 = 125;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
    #[error("no peer connection for that participant")]
    UnknownPeer,
    #[error("local socket: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// Whether the peer connection's event loop has ended: webrtc 0.21 then answers every
    /// command with `Error::Other` naming the failed send to its driver (`SendError(..)`, seen
    /// in a lab as `SendError(IceGathering)` on every ICE-restart offer) or saying the driver
    /// stopped. Such a connection never recovers; the call rebuilds it
    /// ([`crate::call::EngineEvent::PeerStopped`]).
    pub fn is_peer_stopped(&self) -> bool {
        match self {
            EngineError::WebRtc(webrtc::error::Error::Other(what)) => {
                what.starts_with("SendError") || what.contains("driver stopped")
            }
            _ => false,
        }
    }
}

/// Where the engine's sockets live and which candidates it may use.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Local UDP addresses to bind (one host candidate each). Port 0 picks a free port.
    pub udp_addrs: Vec<String>,
    /// Use only relay (TURN) candidates.
    pub relay_only: bool,
    /// Also reach the TURN servers listed with TCP or TLS URLs (through [`TurnTcpShim`]), for
    /// networks where only TCP gets out. On by default.
    pub turn_over_tcp: bool,
    /// Which certificates a `turns:` server may present (`None`: the web's roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Testing only (the impairment lab, the `impair` feature): hold every media datagram
    /// sent this long.
    #[cfg(feature = "impair")]
    pub send_delay: Option<SendDelay>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            udp_addrs: vec!["0.0.0.0:0".into()],
            relay_only: false,
            turn_over_tcp: true,
            tls: None,
            #[cfg(feature = "impair")]
            send_delay: None,
        }
    }
}

/// Audio or video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Audio,
    Video,
}

/// What arrives from a peer: one RTP packet (decrypted), for the media pipeline.
#[derive(Debug, Clone)]
pub struct RemoteMedia {
    pub peer: ParticipantId,
    pub kind: MediaKind,
    pub packet: rtc::rtp::Packet,
    /// The payload types of the peer's session (which one is RED, which Opus).
    pub payload_types: PayloadTypes,
    pub arrived: Instant,
}

fn h264_codec() -> RTCRtpCodec {
    let feedback = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    RTCRtpCodec {
        mime_type: "video/H264".to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
            .to_owned(),
        rtcp_feedback: vec![
            feedback("ccm", "fir"),
            feedback("nack", ""),
            feedback("nack", "pli"),
            feedback("transport-cc", ""),
        ],
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![RTCPFeedback {
            typ: "transport-cc".to_owned(),
            parameter: String::new(),
        }],
    }
}

/// RED (RFC 2198) over Opus, as Chrome offers it: redundant audio (see `media::red`).
fn red_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/red".to_owned(),
        sdp_fmtp_line: format!("{OPUS_PAYLOAD_TYPE}/{OPUS_PAYLOAD_TYPE}"),
        ..opus_codec()
    }
}

/// The RTP payload types one peer connection's session negotiated for our codecs (`None`: that
/// codec was not negotiated).
///
/// Only the negotiated numbers hold for a call: a browser offers its own (Chromium puts H.264
/// on e.g. 108) and the answer takes the offerer's (RFC 3264). `webrtc` drops every packet sent
/// on a number not negotiated for the sender ("unsupported codec type by this transceiver",
/// logged only at trace level), so the send path takes these numbers from the sender's
/// negotiated codecs, and counts and warns about what it cannot send. `webrtc` gives a
/// transceiver's sender and receiver the same negotiated codecs, so they also name what we
/// receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadTypes {
    pub h264: Option<u8>,
    pub opus: Option<u8>,
    /// RED over Opus (RFC 2198).
    pub red: Option<u8>,
}

impl PayloadTypes {
    /// The numbers we offer (and assume for what arrives before a session is negotiated).
    pub const OFFERED: PayloadTypes = PayloadTypes {
        h264: Some(H264_PAYLOAD_TYPE),
        opus: Some(OPUS_PAYLOAD_TYPE),
        red: Some(RED_PAYLOAD_TYPE),
    };

    /// The numbers of our codecs among a session's negotiated `codecs` (audio and video). Of
    /// several H.264 entries, the one our encoder's stream fits best: packetization mode 1
    /// (our packetizer fragments large NAL units) is required, constrained baseline preferred.
    pub fn from_codecs(codecs: &[RTCRtpCodecParameters]) -> Self {
        let find = |mime: &str| {
            codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
                .map(|c| c.payload_type)
        };
        let h264 = codecs
            .iter()
            .filter(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case("video/H264"))
            .filter_map(|c| h264_fit(&c.rtp_codec.sdp_fmtp_line).map(|fit| (fit, c.payload_type)))
            // The first of the best (the peer's order is its preference).
            .fold(None, |best: Option<(u8, u8)>, (fit, pt)| match best {
                Some((b, _)) if b >= fit => best,
                _ => Some((fit, pt)),
            })
            .map(|(_, pt)| pt);
        PayloadTypes {
            h264,
            opus: find("audio/opus"),
            red: find("audio/red"),
        }
    }

    /// The payload type for one of our samples of `kind` (`red`: a RED payload).
    fn for_sample(&self, kind: MediaKind, red: bool) -> Option<u8> {
        match (kind, red) {
            (MediaKind::Video, _) => self.h264,
            (MediaKind::Audio, true) => self.red,
            (MediaKind::Audio, false) => self.opus,
        }
    }
}

/// How well an H.264 format (its fmtp line) takes our stream: `None` without packetization
/// mode 1; 1 for constrained baseline (profile-level-id 42e0..), 0 for another profile.
fn h264_fit(fmtp: &str) -> Option<u8> {
    let param = |name: &str| {
        fmtp.split(';').find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    if param("packetization-mode") != Some("1") {
        return None;
    }
    let constrained_baseline = param("profile-level-id").is_some_and(|id| {
        id.len() == 6 && id[..2].eq_ignore_ascii_case("42") && id[2..4].eq_ignore_ascii_case("e0")
    });
    Some(u8::from(constrained_baseline))
}

/// One peer connection's local tracks: its own packetizers, sequence numbers and SSRCs, and the
/// payload types its session negotiated.
pub struct PeerTracks {
    video: Arc<TrackLocalStaticSample>,
    audio: Arc<TrackLocalStaticSample>,
    video_ssrc: u32,
    audio_ssrc: u32,
    /// What we send on and what we receive on; `None` until the session is negotiated.
    payload_types: Mutex<Option<(PayloadTypes, PayloadTypes)>>,
    /// A codec this peer's session lacks has been warned about (video, audio).
    warned: [AtomicBool; 2],
    /// Audio packets carry their level (the SFU's connection, which negotiates the extension:
    /// [`LocalTracks::write_audio`]).
    audio_level: bool,
}

impl PeerTracks {
    fn new(stream_id: &str, audio_level: bool) -> Result<Self, EngineError> {
        let now = Instant::now();
        // Track ids must differ from the far end's: `webrtc` routes inbound RTCP to a track by
        // id, looking at received tracks first, so two Bedside clients naming their tracks alike
        // would hand our feedback to the track we receive.
        let make = |kind: RtpCodecKind, codec: RTCRtpCodec, ssrc: u32| {
            TrackLocalStaticSample::new(
                now,
                MediaStreamTrack::new(
                    stream_id.to_owned(),
                    format!("{stream_id}-{kind}-{ssrc:08x}"),
                    format!("{kind}"),
                    kind,
                    vec![RTCRtpEncodingParameters {
                        rtp_coding_parameters: RTCRtpCodingParameters {
                            ssrc: Some(ssrc),
                            ..Default::default()
                        },
                        codec,
                        ..Default::default()
                    }],
                ),
            )
        };
        let video_ssrc = rand::random::<u32>();
        let audio_ssrc = rand::random::<u32>();
        Ok(PeerTracks {
            video: Arc::new(make(RtpCodecKind::Video, h264_codec(), video_ssrc)?),
            audio: Arc::new(make(RtpCodecKind::Audio, opus_codec(), audio_ssrc)?),
            video_ssrc,
            audio_ssrc,
            payload_types: Mutex::new(None),
            warned: [AtomicBool::new(false), AtomicBool::new(false)],
            audio_level,
        })
    }

    /// The payload types this peer's session negotiated for what we send, `None` before it
    /// is negotiated.
    pub fn sending(&self) -> Option<PayloadTypes> {
        self.payload_types().map(|(send, _)| send)
    }

    /// The payload types the peer sends us on (ours until the session is negotiated).
    pub fn receiving(&self) -> PayloadTypes {
        self.payload_types()
            .map_or(PayloadTypes::OFFERED, |(_, receive)| receive)
    }

    fn payload_types(&self) -> Option<(PayloadTypes, PayloadTypes)> {
        *self.payload_types.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_negotiated(&self, send: PayloadTypes, receive: PayloadTypes) {
        *self.payload_types.lock().unwrap_or_else(|p| p.into_inner()) = Some((send, receive));
        self.warned
            .iter()
            .for_each(|w| w.store(false, Ordering::Relaxed));
    }

    /// A sample of `kind` cannot be sent: the session has no payload type for its codec. Said
    /// once per negotiation and kind (the stats count every one).
    fn warn_unsent(&self, kind: MediaKind) {
        let (i, codec) = match kind {
            MediaKind::Video => (0, "H.264"),
            MediaKind::Audio => (1, "Opus"),
        };
        if !self.warned[i].swap(true, Ordering::Relaxed) {
            tracing::warn!(
                codec,
                "the peer's session negotiated no payload type for this codec: its media is not sent"
            );
        }
    }
}

/// The local audio and video of the call: one encoding, sent to every peer connection on that
/// peer's own [`PeerTracks`].
pub struct LocalTracks {
    stream_id: String,
    peers: Mutex<HashMap<ParticipantId, Arc<PeerTracks>>>,
    /// Video is not sent while false (audio-only or camera off).
    pub video_enabled: AtomicBool,
    /// Audio is not sent while false (muted).
    pub audio_enabled: AtomicBool,
    /// Audio packets also carry the previous frame (RED) to peers that negotiated it.
    pub audio_redundancy: AtomicBool,
    red: Mutex<RedEncoder>,
}

impl LocalTracks {
    pub fn new(stream_id: &str) -> Result<Arc<Self>, EngineError> {
        Ok(Arc::new(LocalTracks {
            stream_id: stream_id.to_owned(),
            peers: Mutex::new(HashMap::new()),
            video_enabled: AtomicBool::new(true),
            audio_enabled: AtomicBool::new(true),
            audio_redundancy: AtomicBool::new(false),
            red: Mutex::new(RedEncoder::default()),
        }))
    }

    /// Fresh tracks for a (new) peer connection, not sent to before [`Self::add_peer`].
    fn new_peer_tracks(&self, audio_level: bool) -> Result<Arc<PeerTracks>, EngineError> {
        Ok(Arc::new(PeerTracks::new(&self.stream_id, audio_level)?))
    }

    /// Sends to `peer` on `tracks` from now on, instead of any tracks it had.
    fn add_peer(&self, peer: &ParticipantId, tracks: Arc<PeerTracks>) {
        self.lock().insert(peer.clone(), tracks);
    }

    fn remove_peer(&self, peer: &ParticipantId) {
        self.lock().remove(peer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ParticipantId, Arc<PeerTracks>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many peer connections the media goes to.
    pub fn peer_count(&self) -> usize {
        self.lock().len()
    }

    /// Sends one H.264 access unit (Annex-B) lasting `duration` to every peer. Returns to how
    /// many peers it could not be sent because their session negotiated no payload type for
    /// H.264 (each is also warned about, once).
    pub async fn write_video(&self, data: bytes::Bytes, duration: Duration) -> u64 {
        self.write(MediaKind::Video, data, duration, None).await
    }

    /// Sends one Opus packet lasting `duration` to every peer, its packets marked with the
    /// frame's `level` (RFC 6464 −dBov, [`crate::media::AudioFrame::level_dbov`]); returns what
    /// [`Self::write_video`] does, for Opus.
    ///
    /// The level travels in the RTP header, outside SFrame's encryption: the SFU reads it to
    /// pick the active speaker, as every SFU does (RFC 6464 section 5: it says when someone
    /// speaks and how loudly, never what). Only to the SFU: a mesh peer has no use for it, and
    /// a webrtc 0.21 peer that had not negotiated it received none of our audio once it was
    /// on (`tests/payload_types.rs`; why is not pinned down: the SDP had not negotiated it, so
    /// the id it went out with meant nothing, or something else, there).
    pub async fn write_audio(&self, data: bytes::Bytes, duration: Duration, level: u8) -> u64 {
        self.write(MediaKind::Audio, data, duration, Some(level))
            .await
    }

    /// The redundant block for this audio packet while redundancy is on (`Some(None)`: on, but
    /// no previous frame to carry); the encoder forgets the previous frame whenever a frame is
    /// not sent as RED (it is then not the one before). Its payload type is set per peer.
    fn redundant_audio(
        &self,
        sent: bool,
        data: &bytes::Bytes,
        duration: Duration,
    ) -> Option<Option<RedBlock>> {
        let mut red = self.red.lock().unwrap_or_else(|p| p.into_inner());
        if !sent || !self.audio_redundancy.load(Ordering::Relaxed) {
            red.reset();
            return None;
        }
        let samples = (duration.as_secs_f64() * f64::from(SAMPLE_RATE)) as u32;
        Some(red.redundant(OPUS_PAYLOAD_TYPE, data.clone(), samples))
    }

    /// Writes to every peer on the payload types its session negotiated; a peer whose
    /// connection is not ready yet (or is gone) does not keep the others from getting the
    /// sample. Returns how many peers could not be sent it for want of a payload type.
    async fn write(
        &self,
        kind: MediaKind,
        data: bytes::Bytes,
        duration: Duration,
        level: Option<u8>,
    ) -> u64 {
        let enabled = match kind {
            MediaKind::Video => &self.video_enabled,
            MediaKind::Audio => &self.audio_enabled,
        };
        let enabled = enabled.load(Ordering::Relaxed);
        // With redundancy on, the block for peers that negotiated RED (made once for all).
        let redundant = match kind {
            MediaKind::Audio => self.redundant_audio(enabled, &data, duration),
            MediaKind::Video => None,
        };
        if !enabled {
            return 0;
        }
        let targets: Vec<Arc<PeerTracks>> = self.lock().values().cloned().collect();
        let plain = Sample {
            data: data.clone(),
            duration,
            ..Sample::new(Instant::now())
        };
        let mut unsent = 0;
        for peer in targets {
            // Before its session is negotiated a track is not bound: nothing can be sent yet.
            let Some(types) = peer.sending() else {
                continue;
            };
            let (track, ssrc) = match kind {
                MediaKind::Video => (&peer.video, peer.video_ssrc),
                MediaKind::Audio => (&peer.audio, peer.audio_ssrc),
            };
            // RED where redundancy is on and the session has both RED and Opus.
            let red = match (&redundant, types.opus) {
                (Some(block), Some(opus)) if types.red.is_some() => {
                    let block: Vec<RedBlock> = block
                        .iter()
                        .map(|b| RedBlock {
                            payload_type: opus,
                            ..b.clone()
                        })
                        .collect();
                    Some(Sample {
                        data: red::encode_payload(&block, opus, &data),
                        duration,
                        ..Sample::new(plain.timestamp)
                    })
                }
                _ => None,
            };
            let Some(payload_type) = types.for_sample(kind, red.is_some()) else {
                unsent += 1;
                peer.warn_unsent(kind);
                continue;
            };
            let mut writer = track.sample_writer(ssrc, payload_type);
            if let Some(level) = level.filter(|_| peer.audio_level) {
                writer = writer.with_audio_level(AudioLevelExtension {
                    level,
                    voice: level <= VOICE_LEVEL_DBOV,
                });
            }
            if let Err(e) = writer.write_sample(red.as_ref().unwrap_or(&plain)).await {
                tracing::debug!(error = %e, "writing a sample failed");
            }
        }
        unsent
    }
}

/// What a peer's latest reception report says about one of our streams: cumulative packets
/// lost and the extended highest sequence number received (RFC 3550 6.4.1). Two readings give
/// the loss over the interval between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamLoss {
    pub packets_lost: i64,
    pub highest_sequence: u64,
}

/// [`StreamLoss`] for our audio and our video to one peer (`None` before its first report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SentLoss {
    pub audio: Option<StreamLoss>,
    pub video: Option<StreamLoss>,
}

/// Feedback about what we send to one peer, filled from its RTCP.
#[derive(Debug, Default)]
pub struct SendFeedback {
    loss: Mutex<SentLoss>,
    /// Keyframe requests (PLI or FIR) received.
    pub keyframe_requests: std::sync::atomic::AtomicU64,
}

impl SendFeedback {
    fn record(&self, tracks: &PeerTracks, report: &ReceptionReport) {
        // Cumulative lost is a signed 24-bit field: a negative count (duplicates) counts as 0.
        let lost = if report.total_lost >= 0x80_0000 {
            0
        } else {
            i64::from(report.total_lost)
        };
        let stream = Some(StreamLoss {
            packets_lost: lost,
            highest_sequence: u64::from(report.last_sequence_number),
        });
        let mut loss = self.loss.lock().unwrap_or_else(|p| p.into_inner());
        if report.ssrc == tracks.audio_ssrc {
            loss.audio = stream;
        } else if report.ssrc == tracks.video_ssrc {
            loss.video = stream;
        }
    }

    /// The latest reports on our streams.
    pub fn sent_loss(&self) -> SentLoss {
        *self.loss.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets the far end's keyframe requests and reception reports reach the application (the
/// pattern of the crate's `rtcp-processing` example). Inbound RTCP otherwise ends at the end of
/// the interceptor chain; everything else stays there. It sits after every built-in
/// interceptor, so they have all seen the whole packet first.
#[derive(Default)]
struct FeedbackForwarder {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

fn wanted_feedback(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>()
        || any.is::<FullIntraRequest>()
        || any.is::<ReceiverReport>()
        || any.is::<SenderReport>()
}

impl rtc::sansio::Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackForwarder {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let wanted: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| wanted_feedback(p.as_ref()))
                .cloned()
                .collect();
            if wanted.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(wanted);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for FeedbackForwarder {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Reads the far end's feedback on one of our tracks until the track is unbound.
async fn read_feedback(
    track: Arc<TrackLocalStaticSample>,
    tracks: Arc<PeerTracks>,
    feedback: Arc<SendFeedback>,
    peer: ParticipantId,
    events: mpsc::UnboundedSender<EngineEvent>,
) {
    while let Some(event) = track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else {
            continue;
        };
        let mut keyframe = false;
        for packet in &packets {
            let any = packet.as_any();
            if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                keyframe = true;
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                rr.reports.iter().for_each(|r| feedback.record(&tracks, r));
            } else if let Some(sr) = any.downcast_ref::<SenderReport>() {
                sr.reports.iter().for_each(|r| feedback.record(&tracks, r));
            }
        }
        if keyframe {
            feedback.keyframe_requests.fetch_add(1, Ordering::Relaxed);
            let _ = events.send(EngineEvent::KeyframeRequested { peer: peer.clone() });
        }
    }
}

/// mDNS for a new peer connection: webrtc 0.21 joins the mDNS multicast group when it builds one
/// (and again at every ICE-restart rebind) unless mDNS is off, and in a network with no route
/// for 224.0.0.0/4 (a locked-down host, a container, a bare network namespace) that join fails
/// with ENODEV and so does the build. So mDNS stays on (remote `.local` candidates are resolved)
/// only where a socket here can join the group; otherwise it is off, and a peer's `.local`
/// candidates are ignored (its server-reflexive and relay candidates still connect; browsers
/// give real host addresses once the page may use the camera).
fn multicast_dns_mode() -> MulticastDnsMode {
    let joined = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
        s.join_multicast_v4(
            &std::net::Ipv4Addr::new(224, 0, 0, 251),
            &std::net::Ipv4Addr::UNSPECIFIED,
        )
    });
    match joined {
        Ok(()) => MulticastDnsMode::QueryOnly,
        Err(e) => {
            tracing::info!(error = %e, "no multicast route: mDNS off for this peer connection");
            MulticastDnsMode::Disabled
        }
    }
}

/// What one peer connection's estimator shares with the engine.
#[derive(Debug)]
struct SharedEstimate {
    /// The published target (f64 bits, bits per second).
    bps: AtomicU64,
    /// Bumped when the path changes: an ICE restart (ours or the peer's) or a new session
    /// description ([`Estimator::path_changed`] says why that matters).
    path_changes: AtomicU64,
}

impl SharedEstimate {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            bps: AtomicU64::new(CongestionConfig::default().initial_bps.to_bits()),
            path_changes: AtomicU64::new(0),
        })
    }

    fn kbps(&self) -> f64 {
        f64::from_bits(self.bps.load(Ordering::Relaxed)) / 1000.0
    }

    fn path_changed(&self) {
        self.path_changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The driver of the sans-IO [`Estimator`] (`congestion.rs`) inside the interceptor chain: it
/// feeds it the feedback, the pacer's byte count and path changes, and publishes its target
/// where the engine can read it (the estimator lives inside the chain; this is the crate's
/// `bandwidth-estimation-from-disk` pattern).
struct PublishingEstimator {
    estimator: Estimator,
    pacer: Arc<PacerStats>,
    shared: Arc<SharedEstimate>,
    /// The path changes seen so far.
    path_changes: u64,
}

impl PublishingEstimator {
    fn new(pacer: Arc<PacerStats>, shared: Arc<SharedEstimate>) -> Self {
        Self {
            estimator: Estimator::new(CongestionConfig::default()),
            pacer,
            shared,
            path_changes: 0,
        }
    }

    fn publish(&mut self) {
        let target = self.estimator.target_bps();
        self.shared.bps.store(target.to_bits(), Ordering::Relaxed);
    }
}

impl BandwidthEstimator for PublishingEstimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        let changes = self.shared.path_changes.load(Ordering::Relaxed);
        if changes != self.path_changes {
            self.path_changes = changes;
            self.estimator.path_changed();
        }
        let sent = self.pacer.bytes_sent.load(Ordering::Relaxed);
        self.estimator.on_reports(now, reports, sent);
        self.publish();
    }

    fn target_bitrate(&self) -> f64 {
        self.estimator.pacing_bps()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.estimator.handle_timeout(now);
        self.publish();
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.estimator.poll_timeout()
    }

    fn stats(&self) -> EstimatorStats {
        self.estimator.stats()
    }
}

/// Reads a peer's chat channel until it closes. What cannot be read is dropped with a log line
/// that says why (never the text).
async fn read_chat(
    channel: Arc<dyn DataChannel>,
    peer: ParticipantId,
    events: mpsc::UnboundedSender<EngineEvent>,
) {
    use bedside_protocol::chat::PeerMessage;
    while let Some(event) = channel.poll().await {
        match event {
            DataChannelEvent::OnMessage(msg) => match PeerMessage::decode(&msg.data) {
                Ok(PeerMessage::Chat { id, text }) => {
                    let received = EngineEvent::ChatReceived {
                        peer: peer.clone(),
                        id,
                        text,
                    };
                    if events.send(received).is_err() {
                        break;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "dropped a data channel message"),
            },
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
}

/// A peer's remote video track once it has arrived, for sending it keyframe requests.
type RemoteVideo = Arc<Mutex<Option<Arc<dyn TrackRemote>>>>;

/// Which participant each SFU slot carries: the SFU's answer gives each slot's `mid` its
/// SSRCs, the SFU's layout gives each `mid` a participant.
#[derive(Default)]
pub struct SfuRoutes {
    ssrc_mid: Mutex<HashMap<u32, String>>,
    mid_participant: Mutex<HashMap<String, ParticipantId>>,
    /// Slot video tracks by `mid`, for keyframe requests.
    videos: Mutex<HashMap<String, Arc<dyn TrackRemote>>>,
}

impl SfuRoutes {
    /// Reads `a=mid` and `a=ssrc` lines of the SFU's answer.
    fn learn_answer(&self, sdp: &str) {
        let mut map = lock(&self.ssrc_mid);
        let mut mid: Option<String> = None;
        for line in sdp.lines() {
            let line = line.trim();
            if line.starts_with("m=") {
                mid = None;
            } else if let Some(m) = line.strip_prefix("a=mid:") {
                mid = Some(m.to_owned());
            } else if let Some(rest) = line.strip_prefix("a=ssrc:")
                && let (Some(m), Some(ssrc)) = (
                    mid.as_ref(),
                    rest.split_whitespace()
                        .next()
                        .and_then(|s| s.parse::<u32>().ok()),
                )
            {
                map.insert(ssrc, m.clone());
            }
        }
    }

    fn set_layout(&self, slots: &[bedside_protocol::SfuSlot]) {
        let mut map = lock(&self.mid_participant);
        map.clear();
        for slot in slots {
            for mid in [&slot.audio_mid, &slot.video_mid].into_iter().flatten() {
                map.insert(mid.clone(), slot.participant_id.clone());
            }
        }
    }

    fn participant(&self, ssrc: u32) -> Option<ParticipantId> {
        let mid = lock(&self.ssrc_mid).get(&ssrc).cloned()?;
        lock(&self.mid_participant).get(&mid).cloned()
    }

    fn video_of(&self, participant: &ParticipantId) -> Option<Arc<dyn TrackRemote>> {
        let layout = lock(&self.mid_participant);
        lock(&self.videos)
            .iter()
            .find(|(mid, _)| layout.get(*mid) == Some(participant))
            .map(|(_, t)| t.clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Handler {
    peer: ParticipantId,
    events: mpsc::UnboundedSender<EngineEvent>,
    media: std::sync::mpsc::SyncSender<RemoteMedia>,
    remote_video: RemoteVideo,
    /// This peer connection's tracks, for the payload types its session negotiated.
    tracks: Arc<PeerTracks>,
    /// Set on the SFU's connection: packets go out as the slot's participant's.
    sfu: Option<Arc<SfuRoutes>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.events.send(EngineEvent::LocalCandidate {
                peer: self.peer.clone(),
                candidate: IceCandidate {
                    candidate: init.candidate,
                    sdp_mid: init.sdp_mid,
                    sdp_mline_index: init.sdp_mline_index,
                    username_fragment: init.username_fragment,
                },
            });
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let state = match state {
            RTCPeerConnectionState::Connecting => PeerConnectionState::Connecting,
            RTCPeerConnectionState::Connected => PeerConnectionState::Connected,
            RTCPeerConnectionState::Disconnected => PeerConnectionState::Disconnected,
            RTCPeerConnectionState::Failed => PeerConnectionState::Failed,
            RTCPeerConnectionState::Closed => PeerConnectionState::Closed,
            // New, Unspecified and any state a later version adds.
            _ => PeerConnectionState::New,
        };
        let _ = self.events.send(EngineEvent::ConnectionState {
            peer: self.peer.clone(),
            state,
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let kind = match track.kind().await {
            RtpCodecKind::Video => MediaKind::Video,
            _ => MediaKind::Audio,
        };
        if kind == MediaKind::Video {
            *self.remote_video.lock().unwrap_or_else(|p| p.into_inner()) = Some(track.clone());
            if let Some(routes) = &self.sfu {
                for ssrc in track.ssrcs().await {
                    if let Some(mid) = lock(&routes.ssrc_mid).get(&ssrc).cloned() {
                        lock(&routes.videos).insert(mid, track.clone());
                    }
                }
            }
        }
        let (peer, media, tracks) = (self.peer.clone(), self.media.clone(), self.tracks.clone());
        let sfu = self.sfu.clone();
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    let peer = match &sfu {
                        // A slot nobody holds (yet): nothing to show.
                        Some(routes) => match routes.participant(packet.header.ssrc) {
                            Some(p) => p,
                            None => continue,
                        },
                        None => peer.clone(),
                    };
                    let item = RemoteMedia {
                        peer,
                        kind,
                        packet,
                        payload_types: tracks.receiving(),
                        arrived: Instant::now(),
                    };
                    // A full pipeline drops packets rather than stalling the transport.
                    if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) =
                        media.try_send(item)
                    {
                        break;
                    }
                }
            }
        });
    }
}

/// Everything the engine holds for one remote participant's peer connection: made together by
/// [`Engine::build`] and dropped together (its TURN-over-TCP shims close with it).
struct PeerSlot {
    pc: Arc<dyn PeerConnection>,
    /// Its local tracks and the payload types its session negotiated.
    tracks: Arc<PeerTracks>,
    /// Its congestion-controller estimate, and its path changes.
    estimate: Arc<SharedEstimate>,
    /// What the peer reports about the media we send it.
    feedback: Arc<SendFeedback>,
    /// Its video track, once it arrives.
    remote_video: RemoteVideo,
    /// The chat data channel.
    chat: Arc<dyn DataChannel>,
    /// What its pacer sent and dropped.
    pacer_stats: Arc<PacerStats>,
    /// On the SFU's connection: its slots' routes.
    sfu: Option<Arc<SfuRoutes>>,
    shims: Vec<TurnTcpShim>,
}

/// The peer connections of one call, one [`PeerSlot`] per remote participant.
pub struct Engine {
    settings: EngineSettings,
    tracks: Arc<LocalTracks>,
    peers: HashMap<ParticipantId, PeerSlot>,
    events: mpsc::UnboundedSender<EngineEvent>,
    media: std::sync::mpsc::SyncSender<RemoteMedia>,
    /// The SFU connection's slot routes (kept across rebuilds of that connection: the layout
    /// stays the SFU's).
    sfu_routes: Arc<SfuRoutes>,
}

impl Engine {
    pub fn new(
        settings: EngineSettings,
        tracks: Arc<LocalTracks>,
        events: mpsc::UnboundedSender<EngineEvent>,
        media: std::sync::mpsc::SyncSender<RemoteMedia>,
    ) -> Self {
        Engine {
            settings,
            tracks,
            peers: HashMap::new(),
            events,
            media,
            sfu_routes: Arc::default(),
        }
    }

    /// The lowest send-side bandwidth estimate over all peers, kbps: the one shared video
    /// encoding has to fit. `None` without peers.
    pub fn bandwidth_estimate_kbps(&self) -> Option<u32> {
        self.peers
            .values()
            .map(|slot| slot.estimate.kbps())
            .min_by(f64::total_cmp)
            .map(|kbps| kbps as u32)
    }

    /// What the pacer of `peer`'s connection sent, and dropped because it waited too long.
    pub fn pacer_stats(&self, peer: &ParticipantId) -> Option<&Arc<PacerStats>> {
        self.peers.get(peer).map(|slot| &slot.pacer_stats)
    }

    /// The congestion controller's estimate for `peer`, kbps.
    pub fn peer_estimate_kbps(&self, peer: &ParticipantId) -> Option<f64> {
        self.peers.get(peer).map(|slot| slot.estimate.kbps())
    }

    pub fn tracks(&self) -> &Arc<LocalTracks> {
        &self.tracks
    }

    /// The peer connection for `peer`, for statistics.
    pub fn peer(&self, peer: &ParticipantId) -> Option<&Arc<dyn PeerConnection>> {
        self.peers.get(peer).map(|slot| &slot.pc)
    }

    pub fn peer_ids(&self) -> impl Iterator<Item = &ParticipantId> {
        self.peers.keys()
    }

    /// `peer`'s TURN-over-TCP/TLS shims: their local addresses and what they carry over.
    pub fn stream_relays(
        &self,
        peer: &ParticipantId,
    ) -> Vec<(std::net::SocketAddr, bedside_protocol::TransportProtocol)> {
        self.peers
            .get(peer)
            .map(|slot| slot.shims.iter().map(TurnTcpShim::carries).collect())
            .unwrap_or_default()
    }

    /// What `peer` reports about the media we send it.
    pub fn send_feedback(&self, peer: &ParticipantId) -> Option<&Arc<SendFeedback>> {
        self.peers.get(peer).map(|slot| &slot.feedback)
    }

    fn pc(&self, peer: &ParticipantId) -> Result<Arc<dyn PeerConnection>, EngineError> {
        self.peers
            .get(peer)
            .map(|slot| slot.pc.clone())
            .ok_or(EngineError::UnknownPeer)
    }

    /// Takes `peer`'s slot out (our media stops going to it); the caller closes its
    /// connection.
    fn remove(&mut self, peer: &ParticipantId) -> Option<PeerSlot> {
        self.tracks.remove_peer(peer);
        self.peers.remove(peer)
    }

    /// Asks `peer` for a video keyframe (RTCP PLI), when its video cannot be decoded. Does
    /// nothing before its video track has arrived.
    pub async fn request_keyframe_from(&self, peer: &ParticipantId) -> Result<(), EngineError> {
        let track = match self.peers.get(peer) {
            Some(slot) => slot
                .remote_video
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            // A participant seen through the SFU: its slot's track on the SFU connection.
            None => self
                .peers
                .values()
                .find_map(|slot| slot.sfu.as_ref())
                .and_then(|routes| routes.video_of(peer)),
        };
        let Some(track) = track else {
            return Ok(());
        };
        let Some(media_ssrc) = track.ssrcs().await.first().copied() else {
            return Ok(());
        };
        track
            .write_rtcp(vec![Box::new(PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            })])
            .await?;
        Ok(())
    }

    /// Carries out one command of the call state machine.
    pub async fn execute(&mut self, cmd: EngineCommand) -> Result<(), EngineError> {
        match cmd {
            EngineCommand::CreatePeer {
                peer,
                offerer,
                ice_servers,
            } => {
                if let Some(old) = self.remove(&peer) {
                    let _ = old.pc.close().await;
                }
                let slot = self.build(&peer, ice_servers).await?;
                let pc = slot.pc.clone();
                self.peers.insert(peer.clone(), slot);
                if offerer {
                    let offer = pc.create_offer(None).await?;
                    pc.set_local_description(offer.clone()).await?;
                    self.local_description(peer, SdpKind::Offer, offer.sdp);
                }
            }
            EngineCommand::CreateSfu { ice_servers, slots } => {
                let peer = crate::call::sfu_peer();
                if let Some(old) = self.remove(&peer) {
                    let _ = old.pc.close().await;
                }
                let mut slot = self.build(&peer, ice_servers).await?;
                let pc = slot.pc.clone();
                use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
                for _ in 0..slots {
                    for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
                        pc.add_transceiver_from_kind(
                            kind,
                            Some(RTCRtpTransceiverInit {
                                direction: RTCRtpTransceiverDirection::Recvonly,
                                streams: vec![],
                                send_encodings: vec![],
                            }),
                        )
                        .await?;
                    }
                }
                slot.sfu = Some(self.sfu_routes.clone());
                *lock(&self.sfu_routes.videos) = HashMap::new();
                self.peers.insert(peer.clone(), slot);
                let offer = pc.create_offer(None).await?;
                pc.set_local_description(offer.clone()).await?;
                self.local_description(peer, SdpKind::Offer, offer.sdp);
            }
            EngineCommand::SetSfuLayout { slots } => self.sfu_routes.set_layout(&slots),
            EngineCommand::SetRemoteDescription { peer, kind, sdp } => {
                if peer.0 == crate::call::SFU_PEER {
                    self.sfu_routes.learn_answer(&sdp);
                }
                let pc = self.pc(&peer)?;
                // A description after the first renegotiates, on an ICE restart a new path.
                if pc.remote_description().await.is_some() {
                    self.path_changed(&peer);
                }
                match kind {
                    SdpKind::Offer => {
                        pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
                            .await?;
                        let answer = pc.create_answer(None).await?;
                        pc.set_local_description(answer.clone()).await?;
                        self.learn_payload_types(&peer, pc.as_ref()).await;
                        self.local_description(peer, SdpKind::Answer, answer.sdp);
                    }
                    SdpKind::Answer => {
                        pc.set_remote_description(RTCSessionDescription::answer(sdp)?)
                            .await?;
                        self.learn_payload_types(&peer, pc.as_ref()).await;
                    }
                }
            }
            EngineCommand::AddRemoteCandidate { peer, candidate } => {
                let pc = self.pc(&peer)?;
                if candidate.candidate.is_empty() {
                    return Ok(());
                }
                pc.add_ice_candidate(RTCIceCandidateInit {
                    candidate: candidate.candidate,
                    sdp_mid: candidate.sdp_mid,
                    sdp_mline_index: candidate.sdp_mline_index,
                    username_fragment: candidate.username_fragment,
                    url: None,
                })
                .await?;
            }
            EngineCommand::RestartIce { peer } => {
                let pc = self.pc(&peer)?;
                self.path_changed(&peer);
                pc.restart_ice().await?;
                let offer = pc.create_offer(None).await?;
                pc.set_local_description(offer.clone()).await?;
                self.local_description(peer, SdpKind::Offer, offer.sdp);
            }
            EngineCommand::ClosePeer { peer } => {
                if let Some(slot) = self.remove(&peer) {
                    slot.pc.close().await?;
                }
            }
            EngineCommand::SetMicrophoneMuted(muted) => {
                self.tracks.audio_enabled.store(!muted, Ordering::Relaxed);
            }
            EngineCommand::SetVideoSending(on) => {
                self.tracks.video_enabled.store(on, Ordering::Relaxed);
            }
            EngineCommand::SetAudioRedundancy(on) => {
                self.tracks.audio_redundancy.store(on, Ordering::Relaxed);
            }
            EngineCommand::SendChat { peer, id, text } => {
                let sent = match self.peers.get(&peer).map(|slot| &slot.chat) {
                    Some(channel) => {
                        let wire = bedside_protocol::chat::PeerMessage::Chat { id, text }.encode();
                        channel.send_text(&wire).await
                    }
                    None => Err(rtc::shared::error::Error::ErrConnectionClosed),
                };
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "chat line not handed to the data channel");
                    let _ = self.events.send(EngineEvent::ChatUndelivered { peer, id });
                }
            }
            EngineCommand::RequestKeyframeFrom { peer } => {
                self.request_keyframe_from(&peer).await?;
            }
        }
        Ok(())
    }

    /// Closes every peer connection.
    pub async fn close_all(&mut self) {
        let peers: Vec<_> = self.peers.keys().cloned().collect();
        for peer in &peers {
            if let Some(slot) = self.remove(peer) {
                let _ = slot.pc.close().await;
            }
        }
    }

    /// `peer`'s path is changing (see [`SharedEstimate`]).
    fn path_changed(&self, peer: &ParticipantId) {
        if let Some(slot) = self.peers.get(peer) {
            slot.estimate.path_changed();
        }
    }

    /// `peer`'s session was negotiated (an offer and its answer applied): the payload types
    /// it gave our codecs are what we send and receive on from now on. A transceiver counts
    /// only in a direction it was negotiated for: `webrtc` reports the media engine's codecs
    /// for a sender the answer left out, and its packets would be dropped unseen.
    async fn learn_payload_types(&self, peer: &ParticipantId, pc: &dyn PeerConnection) {
        use webrtc::rtp_transceiver::RTCRtpTransceiverDirection as Direction;
        let Some(tracks) = self.peers.get(peer).map(|slot| &slot.tracks) else {
            return;
        };
        let (mut send, mut receive) = (Vec::new(), Vec::new());
        for transceiver in pc.get_transceivers().await {
            let direction = transceiver.current_direction().await.unwrap_or_default();
            // The receiver's own parameters come back empty in `webrtc` 0.21; a transceiver's
            // sender and receiver take the same codecs from the negotiation.
            let Ok(Some(sender)) = transceiver.sender().await else {
                continue;
            };
            let Ok(parameters) = sender.get_parameters().await else {
                continue;
            };
            let codecs = parameters.rtp_parameters.codecs;
            if matches!(direction, Direction::Sendrecv | Direction::Recvonly) {
                receive.extend(codecs.iter().cloned());
            }
            if matches!(direction, Direction::Sendrecv | Direction::Sendonly) {
                send.extend(codecs);
            }
        }
        let (send, receive) = (
            PayloadTypes::from_codecs(&send),
            PayloadTypes::from_codecs(&receive),
        );
        tracing::debug!(?send, ?receive, "negotiated payload types");
        tracks.set_negotiated(send, receive);
    }

    fn local_description(&self, peer: ParticipantId, kind: SdpKind, sdp: String) {
        let _ = self
            .events
            .send(EngineEvent::LocalDescription { peer, kind, sdp });
    }

    /// A new peer connection for `peer`, with everything that goes with it; our media goes to
    /// it from now on.
    async fn build(
        &mut self,
        peer: &ParticipantId,
        ice_servers: Vec<IceServer>,
    ) -> Result<PeerSlot, EngineError> {
        let estimate = SharedEstimate::new();
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: OPUS_PAYLOAD_TYPE,
            },
            RtpCodecKind::Audio,
        )?;
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: red_codec(),
                payload_type: RED_PAYLOAD_TYPE,
            },
            RtpCodecKind::Audio,
        )?;
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: h264_codec(),
                payload_type: H264_PAYLOAD_TYPE,
            },
            RtpCodecKind::Video,
        )?;
        // Each audio packet's level (`LocalTracks::write_audio`), for the SFU's active speaker.
        let audio_level = peer.0 == crate::call::SFU_PEER;
        if audio_level {
            media_engine.register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )?;
        }
        let tracks = self.tracks.new_peer_tracks(audio_level)?;
        let pacer_stats = Arc::new(PacerStats::default());
        let estimator = PublishingEstimator::new(pacer_stats.clone(), estimate.clone());
        // Last in the chain (slots are distances from the wire; the jitter buffer is 13_000).
        let registry = Registry::new().with(Slot::from(14_000), FeedbackForwarder::default());
        let registry = configure_congestion_control(
            registry,
            estimator,
            CongestionFeedback::Twcc,
            &mut media_engine,
        )?;
        let congestion = CongestionConfig::default();
        // Our pacer instead of the crate's (see `pacer.rs`).
        let registry = registry.with(
            Slot::Pacer,
            MediaPacer::new(&congestion, tracks.audio_ssrc, pacer_stats.clone()),
        );
        let registry = register_default_interceptors(registry, &mut media_engine)?;
        // Bounded NACK (`CongestionConfig::nack_log_packets` says why).
        let registry = registry.with(
            Slot::NackGenerator,
            NackGeneratorBuilder::new()
                .with_size(congestion.nack_log_packets)
                .with_max_nacks_per_packet(congestion.nacks_per_packet_max)
                .build(),
        );
        let mut servers = Vec::with_capacity(ice_servers.len());
        let mut shims = Vec::new();
        for s in ice_servers {
            let mut urls = Vec::with_capacity(s.urls.len());
            for url in s.urls {
                match turn_tcp::stream_turn_server(&url) {
                    Some(server) if self.settings.turn_over_tcp => {
                        let tls = match &self.settings.tls {
                            Some(tls) => tls.clone(),
                            None => crate::signaling::tls_config(None)
                                .map_err(|e| EngineError::Io(std::io::Error::other(e)))?,
                        };
                        let shim = TurnTcpShim::start(server, tls).await?;
                        urls.push(shim.url());
                        shims.push(shim);
                    }
                    // The crate would skip it with a warning.
                    Some(_) => {}
                    None => urls.push(url),
                }
            }
            if !urls.is_empty() {
                servers.push(RTCIceServer {
                    urls,
                    username: s.username.unwrap_or_default(),
                    credential: s.credential.unwrap_or_default(),
                });
            }
        }
        let mut config = RTCConfigurationBuilder::new().with_ice_servers(servers);
        if self.settings.relay_only {
            config = config.with_ice_transport_policy(RTCIceTransportPolicy::Relay);
        }
        let remote_video = RemoteVideo::default();
        let handler = Arc::new(Handler {
            peer: peer.clone(),
            events: self.events.clone(),
            media: self.media.clone(),
            remote_video: remote_video.clone(),
            tracks: tracks.clone(),
            sfu: (peer.0 == crate::call::SFU_PEER).then(|| self.sfu_routes.clone()),
        });
        // On an ICE restart (a network change), rebind the sockets and gather afresh: the old
        // address may be gone. Notice a dead path in 2 s rather than the default 5 s. mDNS
        // only where the network has a multicast route (see `multicast_dns_mode`).
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(multicast_dns_mode())
            .with_discard_local_candidates_during_ice_restart(true)
            .with_ice_timeouts(
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(10)),
                Some(Duration::from_millis(500)),
            )
            .build();
        #[allow(unused_mut)]
        let mut builder = PeerConnectionBuilder::new();
        #[cfg(feature = "impair")]
        if let Some(delay) = self.settings.send_delay
            && let Some(runtime) = DelayRuntime::new(delay)
        {
            builder = builder.with_runtime(Arc::new(runtime));
        }
        let pc = builder
            .with_configuration(config.build())
            .with_setting_engine(settings)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(self.settings.udp_addrs.clone())
            .build()
            .await?;
        self.tracks.add_peer(peer, tracks.clone());
        pc.add_track(tracks.audio.clone() as Arc<dyn TrackLocal>)
            .await?;
        pc.add_track(tracks.video.clone() as Arc<dyn TrackLocal>)
            .await?;
        // The chat channel is negotiated (same stream id on both sides), so it exists before
        // the offer and neither side waits for the other to announce it.
        let chat = pc
            .create_data_channel(
                bedside_protocol::chat::CHANNEL_LABEL,
                Some(RTCDataChannelInit {
                    negotiated: Some(bedside_protocol::chat::CHANNEL_ID),
                    ..Default::default()
                }),
            )
            .await?;
        tokio::spawn(read_chat(chat.clone(), peer.clone(), self.events.clone()));
        let feedback = Arc::new(SendFeedback::default());
        for track in [tracks.audio.clone(), tracks.video.clone()] {
            tokio::spawn(read_feedback(
                track,
                tracks.clone(),
                feedback.clone(),
                peer.clone(),
                self.events.clone(),
            ));
        }
        Ok(PeerSlot {
            pc: Arc::new(pc),
            tracks,
            estimate,
            feedback,
            remote_video,
            chat,
            pacer_stats,
            sfu: None,
            shims,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feedback every 100 ms for `secs` at 1.2 Mbps, all of it arrived; the pacer's count
    /// follows.
    fn steady(
        e: &mut PublishingEstimator,
        start: Instant,
        t: &mut Instant,
        id: &mut u64,
        secs: f64,
    ) {
        for _ in 0..(secs * 10.0) as usize {
            feedback(e, start, t, id, 15, 0);
        }
    }

    /// One feedback batch 100 ms on: `arrived + lost` packets of 1000 bytes, the arrived ones
    /// spread evenly among the lost (as an overflowing queue drops them). Packet `id` left at
    /// `start` + id x 6.667 ms (150 a second) and took 20 ms.
    fn feedback(
        e: &mut PublishingEstimator,
        start: Instant,
        t: &mut Instant,
        id: &mut u64,
        arrived: usize,
        lost: usize,
    ) {
        use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
        *t += Duration::from_millis(100);
        let total = arrived + lost;
        let reports: Vec<PacketReport> = (0..total)
            .map(|i| {
                let came = (i + 1) * arrived / total > i * arrived / total;
                *id += 1;
                let sent = Duration::from_micros(6_667 * *id);
                PacketReport {
                    ssrc: 1,
                    id: *id,
                    rtp_sequence_number: *id as u16,
                    is_twcc: true,
                    twcc_sequence_number: *id as u16,
                    size: 1000,
                    arrived: came,
                    departure: start + sent,
                    arrival: came.then(|| sent + Duration::from_millis(20)),
                    ecn: Ecn::NotEct,
                }
            })
            .collect();
        e.pacer
            .bytes_sent
            .fetch_add(1000 * (arrived + lost) as u64, Ordering::Relaxed);
        e.on_reports(*t, &reports);
    }

    fn codec(mime: &str, fmtp: &str, payload_type: u8) -> RTCRtpCodecParameters {
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: mime.into(),
                sdp_fmtp_line: fmtp.into(),
                ..Default::default()
            },
            payload_type,
        }
    }

    /// Chromium's H.264 list (several profiles, both packetization modes): the first
    /// constrained-baseline entry in mode 1 is ours; without mode 1 there is none.
    #[test]
    fn the_h264_entry_our_stream_fits_is_chosen_from_a_browser_s_list() {
        let chromium = [
            codec("video/VP8", "", 96),
            codec(
                "video/H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
                102,
            ),
            codec(
                "video/H264",
                "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f",
                106,
            ),
            codec(
                "video/H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
                108,
            ),
            codec(
                "video/H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
                123,
            ),
            codec("audio/opus", "minptime=10;useinbandfec=1", 111),
            codec("audio/red", "111/111", 63),
        ];
        let types = PayloadTypes::from_codecs(&chromium);
        assert_eq!(
            types,
            PayloadTypes {
                h264: Some(108),
                opus: Some(111),
                red: Some(63)
            }
        );
        // Baseline in mode 1 still beats nothing; mode 0 alone is no H.264 for us.
        assert_eq!(PayloadTypes::from_codecs(&chromium[..3]).h264, Some(102));
        let mode0 = PayloadTypes::from_codecs(&chromium[2..3]);
        assert_eq!((mode0.h264, mode0.opus, mode0.red), (None, None, None));
        assert_eq!(mode0.for_sample(MediaKind::Video, false), None);
        assert_eq!(types.for_sample(MediaKind::Audio, true), Some(63));
    }

    /// A second in which 2 of every 15 packets arrive, then a second in which all do.
    fn collapse(e: &mut PublishingEstimator, start: Instant, t: &mut Instant, id: &mut u64) {
        for _ in 0..10 {
            feedback(e, start, t, id, 2, 13);
        }
        steady(e, start, t, id, 1.0);
    }

    fn estimator() -> PublishingEstimator {
        PublishingEstimator::new(Arc::default(), SharedEstimate::new())
    }

    /// A second of feedback saying most packets were lost, as the first feedback over a new
    /// path does after a handover (the old path swallowed them): with the path change
    /// signalled that is not read as congestion; without one it is a collapse.
    #[test]
    fn the_old_path_s_lost_packets_do_not_cut_the_estimate_after_a_path_change() {
        let run = |signal: bool| {
            let mut e = estimator();
            let start = Instant::now();
            let (mut t, mut id) = (start, 0);
            steady(&mut e, start, &mut t, &mut id, 5.0);
            let before = e.shared.kbps();
            if signal {
                e.shared.path_changed();
            }
            collapse(&mut e, start, &mut t, &mut id);
            (before, e.shared.kbps())
        };
        let (before, after) = run(true);
        assert!(after >= before * 0.9, "{before} -> {after} kbps");
        // Once the path has settled, the same feedback is judged again.
        let mut e = estimator();
        let start = Instant::now();
        let (mut t, mut id) = (start, 0);
        steady(&mut e, start, &mut t, &mut id, 5.0);
        e.shared.path_changed();
        steady(&mut e, start, &mut t, &mut id, 3.0);
        let settled = e.shared.kbps();
        collapse(&mut e, start, &mut t, &mut id);
        assert!(
            e.shared.kbps() < settled * 0.5,
            "{settled} -> {}",
            e.shared.kbps()
        );
        // The same feedback without a path change is a collapse, and is treated as one.
        let (before, after) = run(false);
        assert!(after < before * 0.5, "{before} -> {after} kbps");
    }
}

//! The media pipeline: the threads that turn captured frames into encoded samples on the local
//! tracks, and received RTP into decoded frames and played audio, with the measurements a call
//! report needs (decoded frame rate, glass-to-glass and mouth-to-ear latency, which tone was
//! heard).
//!
//! Encoding and decoding are CPU work, so they run on threads of their own: video is encoded
//! on "send", audio (with whatever the microphone source does, such as echo cancellation) on
//! "audio", so that no microphone can hold up video, and received media is decoded on
//! "receive". The audio thread holds its source to real time ([`RealTimeGate`]): a device that
//! delivers faster is cut, not sent. The async side only moves encoded samples onto the tracks. The pipeline decides
//! nothing about the call: the state machine's media commands (`call::MediaCommand`: a keyframe,
//! an encoding) reach it as [`SendCommand`]s.
//!
//! Time base: synthetic markers carry wall-clock microseconds modulo 2^48 ([`wall_us`]), so two
//! processes on the same host (a test, a probe, a bench) measure latency across processes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bedside_protocol::ParticipantId;
use tokio::sync::mpsc;

use crate::e2ee::{Codec, FrameCrypto, FrameCryptoStats};
use crate::engine::{LocalTracks, MediaKind, PayloadTypes, RemoteMedia};
use crate::media::red;
use crate::media::screen::{self, LadderTarget};
use crate::media::{
    AccessUnit, AudioFrame, AudioMarkerReader, AudioPlayoutBuffer, AudioSource, Capture,
    ContentHint, DOCTOR_TONE_HZ, FRAME_SAMPLES, FRAME_US, FrameAssembler, H264Config, H264Decoder,
    H264Encoder, LatestFrame, NoDevice, OpusConfig, OpusEncoder, PATIENT_TONE_HZ, PatternConfig,
    PlayedAudio, PlayoutConfig, PlayoutKind, RealTimeGate, TestPatternSource, ToneConfig,
    ToneSource, VideoFrame, VideoSource, contains_idr, detect_tone, read_marker,
};

const WRAP_48: u64 = 1 << 48;

/// Wall-clock microseconds modulo 2^48: the time base of synthetic markers.
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64 % WRAP_48)
        .unwrap_or(0)
}

/// `later - earlier` on the 48-bit wall clock, in milliseconds.
fn elapsed_ms(later: u64, earlier: u64) -> f64 {
    ((later + WRAP_48 - earlier) % WRAP_48) as f64 / 1000.0
}

/// The frame transform hook: what happens to each encoded frame between the encoder and the
/// packetizer ([`Self::outbound`]) and between the depacketizer and the decoder
/// ([`Self::inbound`]). With end-to-end encryption on it is SFrame ([`crate::e2ee`]); off, frames
/// pass as they are. Clones share one state.
#[derive(Clone, Default)]
pub struct FrameTransform {
    crypto: Option<Arc<Mutex<FrameCrypto>>>,
    tap: Option<Arc<FrameTap>>,
}

/// Testing only: a copy of the first frames handed to the packetizer (after the transform),
/// to show what goes on the wire.
#[derive(Debug, Default)]
pub struct FrameTap {
    limit: usize,
    frames: Mutex<Vec<(Codec, Vec<u8>)>>,
}

impl FrameTap {
    /// The frames recorded so far.
    pub fn frames(&self) -> Vec<(Codec, Vec<u8>)> {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl FrameTransform {
    /// Frames pass untouched.
    pub fn none() -> Self {
        FrameTransform::default()
    }

    /// SFrame with the keys `crypto` is given (by the driver's `e2ee::Session`).
    pub fn encrypted(crypto: Arc<Mutex<FrameCrypto>>) -> Self {
        FrameTransform {
            crypto: Some(crypto),
            tap: None,
        }
    }

    /// Also records the first `limit` outbound frames of each kind ([`Self::tap`]).
    pub fn with_tap(mut self, limit: usize) -> Self {
        self.tap = Some(Arc::new(FrameTap {
            limit,
            frames: Mutex::new(Vec::new()),
        }));
        self
    }

    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    pub fn tap(&self) -> Option<&Arc<FrameTap>> {
        self.tap.as_ref()
    }

    /// What encryption has done so far (`None`: off).
    pub fn stats(&self) -> Option<FrameCryptoStats> {
        Some(self.lock()?.stats().clone())
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, FrameCrypto>> {
        Some(
            self.crypto
                .as_ref()?
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// The frame to packetize, or `None` to send nothing (no key yet).
    pub fn outbound(&self, codec: Codec, frame: bytes::Bytes) -> Option<bytes::Bytes> {
        let frame = match self.lock() {
            None => frame,
            Some(mut crypto) => crypto.encrypt(codec, &frame).ok()?.into(),
        };
        if let Some(tap) = &self.tap {
            let mut frames = tap.frames.lock().unwrap_or_else(|p| p.into_inner());
            if frames.iter().filter(|(c, _)| *c == codec).count() < tap.limit {
                frames.push((codec, frame.to_vec()));
            }
        }
        Some(frame)
    }

    /// The frame to decode, or `None` when it does not decrypt (no key for it yet, or not
    /// ours to read): it is then treated as lost.
    pub fn inbound(&self, from: &ParticipantId, codec: Codec, frame: &[u8]) -> Option<Vec<u8>> {
        match self.lock() {
            None => Some(frame.to_vec()),
            Some(mut crypto) => crypto.decrypt(from, codec, frame).ok(),
        }
    }
}

/// What a participant captures.
pub struct MediaSources {
    pub video: Box<dyn VideoSource>,
    pub audio: Box<dyn AudioSource>,
}

impl MediaSources {
    /// No camera and no microphone (a normal state: the call still connects).
    pub fn none() -> Self {
        MediaSources {
            video: Box::new(NoDevice),
            audio: Box::new(NoDevice),
        }
    }

    /// The moving test pattern (its frames carry a counter, the capture time and `tag`) and a
    /// tone with markers (`tone_hz`: [`DOCTOR_TONE_HZ`] or [`PATIENT_TONE_HZ`]).
    pub fn synthetic(width: u32, height: u32, tag: u8, tone_hz: f32) -> Self {
        let pattern = TestPatternSource::new(PatternConfig {
            width,
            height,
            fps: 30,
            tag,
        })
        .expect("valid pattern size");
        let tone = ToneSource::new(ToneConfig {
            freq_hz: tone_hz,
            ..Default::default()
        })
        .with_index_base(wall_us() / FRAME_US);
        MediaSources {
            video: Box::new(pattern),
            audio: Box::new(tone),
        }
    }
}

/// What the call asks of the sender.
pub enum SendCommand {
    Encoding {
        width: u32,
        height: u32,
        fps: u32,
        bitrate_kbps: u32,
    },
    Keyframe,
    /// Capture from another camera (or [`NoDevice`]); the next frame is a keyframe.
    VideoSource(Box<dyn VideoSource>),
    /// Capture from another microphone (or [`NoDevice`]).
    AudioSource(Box<dyn AudioSource>),
    Stop,
}

impl std::fmt::Debug for SendCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendCommand::Encoding {
                width,
                height,
                fps,
                bitrate_kbps,
            } => write!(f, "Encoding({width}x{height}@{fps}, {bitrate_kbps} kbps)"),
            SendCommand::Keyframe => f.write_str("Keyframe"),
            SendCommand::VideoSource(_) => f.write_str("VideoSource"),
            SendCommand::AudioSource(_) => f.write_str("AudioSource"),
            SendCommand::Stop => f.write_str("Stop"),
        }
    }
}

/// What the sender has done.
#[derive(Debug, Default)]
pub struct SendStats {
    pub video_frames_encoded: AtomicU64,
    pub audio_frames_encoded: AtomicU64,
    /// Audio frames dropped before encoding because the source delivered them faster than real
    /// time (see [`RealTimeGate`]).
    pub audio_frames_too_fast: AtomicU64,
    /// Keyframe requests (PLI/FIR) received from peers, before rate limiting.
    pub keyframe_requests_received: AtomicU64,
    /// Encoded samples not sent to a peer because its session negotiated no payload type for
    /// the codec (counted once per peer and sample; the engine also logs a warning).
    pub samples_unsent: AtomicU64,
    /// The picture being sent, for the self view: at most [`PREVIEW_FPS`] a second, emptied
    /// while video is off.
    pub preview: LatestFrame,
}

/// How often the self view is refreshed.
pub const PREVIEW_FPS: u32 = 15;

/// The largest self-view picture: the self view is small, and a shared screen converted to RGBA
/// at full size 15 times a second kept the desktop's UI thread busy.
const PREVIEW_MAX: (u32, u32) = (640, 360);

fn preview_of(frame: &VideoFrame) -> VideoFrame {
    let (w, h) = screen::fit_within((frame.width(), frame.height()), PREVIEW_MAX);
    frame.scaled(w, h).unwrap_or_else(|_| frame.clone())
}

enum Encoded {
    Video(bytes::Bytes, Duration),
    /// An Opus packet and its frame's RFC 6464 level (−dBov).
    Audio(bytes::Bytes, u8),
}

/// How often the sender forces a keyframe, so a receiver that lost one recovers without a PLI.
const KEYFRAME_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the send thread and the task writing its output to the tracks.
pub fn start_sender(
    mut sources: MediaSources,
    tracks: Arc<LocalTracks>,
    video: H264Config,
    transform: FrameTransform,
) -> (std_mpsc::Sender<SendCommand>, Arc<SendStats>) {
    let (commands, command_rx) = std_mpsc::channel();
    let stats = Arc::new(SendStats::default());
    let (out_tx, mut out_rx) = mpsc::channel::<Encoded>(64);
    let thread_stats = stats.clone();
    let thread_tracks = tracks.clone();
    // Audio has a thread of its own, so that no microphone (a flood, a stall, the echo
    // canceller's cost) can hold up video.
    // Its own queue to the tracks too: a video frame waiting on the pacer (a shared screen's
    // keyframe on a thin link) must not hold audio back.
    let (audio_tx, mut audio_rx) = mpsc::channel::<Encoded>(64);
    let audio_commands = start_audio_sender(
        std::mem::replace(&mut sources.audio, Box::new(NoDevice)),
        tracks.clone(),
        stats.clone(),
        audio_tx,
    );
    std::thread::Builder::new()
        .name("bedside-media-send".into())
        .spawn(move || {
            let mut encoder = match H264Encoder::new(video) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::error!(error = %e, "no video encoder");
                    None
                }
            };
            let mut fps = video.max_fps.max(1.0);
            // The ladder's last word; screen content replaces its resolution and frame rate
            // (`media::screen`), and is encoded no faster than that rate.
            let mut ladder = LadderTarget {
                width: video.width,
                height: video.height,
                fps: video.max_fps.max(1.0) as u32,
                bitrate_kbps: video.bitrate_bps / 1000,
            };
            let mut last_encoded: Option<Instant> = None;
            let mut last_keyframe = Instant::now();
            let mut last_preview: Option<Instant> = None;
            loop {
                match command_rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(SendCommand::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                        return;
                    }
                    Ok(SendCommand::Keyframe) => {
                        if let Some(e) = encoder.as_mut() {
                            e.request_keyframe();
                        }
                    }
                    Ok(SendCommand::VideoSource(source)) => {
                        sources.video = source;
                        if let Some(e) = encoder.as_mut() {
                            e.request_keyframe();
                        }
                    }
                    Ok(SendCommand::AudioSource(source)) => {
                        let _ = audio_commands.send(source);
                    }
                    Ok(SendCommand::Encoding {
                        width,
                        height,
                        fps,
                        bitrate_kbps,
                    }) => {
                        ladder = LadderTarget {
                            width,
                            height,
                            fps,
                            bitrate_kbps,
                        };
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                }
                let now = wall_us();
                if let Capture::Frame(frame) = sources.video.poll_video(now) {
                    if !thread_tracks.video_enabled.load(Ordering::Relaxed) {
                        if last_preview.take().is_some() {
                            thread_stats.preview.clear();
                        }
                        continue;
                    }
                    if last_preview
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1) / PREVIEW_FPS)
                    {
                        last_preview = Some(Instant::now());
                        thread_stats.preview.publish(preview_of(&frame));
                    }
                    let Some(encoder) = encoder.as_mut() else {
                        continue;
                    };
                    let content = sources.video.content_hint();
                    match screen::tune(encoder, content, ladder, (frame.width(), frame.height())) {
                        Ok(f) => fps = f as f32,
                        Err(e) => tracing::debug!(error = %e, "video encoder settings refused"),
                    }
                    if content == ContentHint::Text
                        && last_encoded.is_some_and(|t| t.elapsed().as_secs_f32() < 1.0 / fps)
                    {
                        continue;
                    }
                    last_encoded = Some(Instant::now());
                    if last_keyframe.elapsed() >= KEYFRAME_INTERVAL {
                        encoder.request_keyframe();
                    }
                    match encoder.encode(&frame) {
                        Ok(Some(au)) => {
                            if au.keyframe {
                                last_keyframe = Instant::now();
                            }
                            thread_stats
                                .video_frames_encoded
                                .fetch_add(1, Ordering::Relaxed);
                            let duration = Duration::from_secs_f32(1.0 / fps);
                            let _ = out_tx.blocking_send(Encoded::Video(au.data.into(), duration));
                        }
                        Ok(None) => {} // Rate control skipped this frame.
                        Err(e) => tracing::warn!(error = %e, "video encode failed"),
                    }
                }
            }
        })
        .expect("spawn the media send thread");
    let (audio_tracks, audio_transform, audio_stats) =
        (tracks.clone(), transform.clone(), stats.clone());
    tokio::spawn(async move {
        while let Some(encoded) = audio_rx.recv().await {
            let Encoded::Audio(data, level) = encoded else {
                continue;
            };
            let unsent = match audio_transform.outbound(Codec::Opus, data) {
                Some(data) => {
                    audio_tracks
                        .write_audio(data, Duration::from_millis(20), level)
                        .await
                }
                None => 0,
            };
            audio_stats
                .samples_unsent
                .fetch_add(unsent, Ordering::Relaxed);
        }
    });
    let task_stats = stats.clone();
    tokio::spawn(async move {
        while let Some(encoded) = out_rx.recv().await {
            let unsent = match encoded {
                Encoded::Video(data, duration) => match transform.outbound(Codec::H264, data) {
                    Some(data) => tracks.write_video(data, duration).await,
                    None => 0,
                },
                Encoded::Audio(data, level) => match transform.outbound(Codec::Opus, data) {
                    Some(data) => {
                        tracks
                            .write_audio(data, Duration::from_millis(20), level)
                            .await
                    }
                    None => 0,
                },
            };
            task_stats
                .samples_unsent
                .fetch_add(unsent, Ordering::Relaxed);
        }
    });
    (commands, stats)
}

/// The most audio frames the audio thread takes from its source in one turn (a turn is at most
/// 5 ms): twice real time and more, so a backlog drains, but a source that always has a frame
/// cannot keep the thread from its commands.
const AUDIO_FRAMES_PER_TURN: usize = 10;

/// How far an audio source may run ahead of real time to make up a stall (see
/// [`RealTimeGate`]); frames beyond it are dropped before encoding.
const AUDIO_AHEAD_CREDIT: Duration = Duration::from_secs(1);

/// Starts the thread that encodes audio: it polls `source` (replaced by each source sent on the
/// returned channel), holds it to real time, and hands Opus packets to `out`. It ends when the
/// returned sender is dropped.
fn start_audio_sender(
    mut source: Box<dyn AudioSource>,
    tracks: Arc<LocalTracks>,
    stats: Arc<SendStats>,
    out: mpsc::Sender<Encoded>,
) -> std_mpsc::Sender<Box<dyn AudioSource>> {
    let (commands, command_rx) = std_mpsc::channel::<Box<dyn AudioSource>>();
    std::thread::Builder::new()
        .name("bedside-media-audio".into())
        .spawn(move || {
            let mut opus = OpusEncoder::new(OpusConfig::default()).ok();
            let mut gate = RealTimeGate::new(FRAME_US, AUDIO_AHEAD_CREDIT.as_micros() as u64);
            loop {
                match command_rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(next) => source = next,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                }
                let now = wall_us();
                // Every frame that is due (the tone source never skips), within real time.
                for _ in 0..AUDIO_FRAMES_PER_TURN {
                    let Capture::Frame(frame) = source.poll_audio(now) else {
                        break;
                    };
                    if !gate.admit(now) {
                        stats.audio_frames_too_fast.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if !tracks.audio_enabled.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Some(Ok(packet)) = opus.as_mut().map(|o| o.encode(&frame)) {
                        stats.audio_frames_encoded.fetch_add(1, Ordering::Relaxed);
                        let level = frame.level_dbov();
                        if out
                            .blocking_send(Encoded::Audio(packet.into(), level))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        })
        .expect("spawn the media audio thread");
    commands
}

/// A longer wait between two decoded frames counts as the picture freezing.
pub const VIDEO_GAP: Duration = Duration::from_millis(250);

/// What one remote participant's media looked like, as measured on arrival.
#[derive(Clone, Debug, Default)]
pub struct ReceiveStats {
    pub video_frames_decoded: u64,
    pub video_decode_errors: u64,
    /// Frames not decoded because a reference was lost: the picture froze until a keyframe.
    pub video_frames_skipped: u64,
    /// Keyframe requests (PLI) sent to this participant (when the call asked, see
    /// `call::KEYFRAME_REQUEST_INTERVAL`).
    pub keyframes_requested: u64,
    pub width: u32,
    pub height: u32,
    /// Frames whose marker was read.
    pub frames_with_marker: u64,
    /// Frame counters that never arrived between two that did.
    pub frames_missing: u64,
    /// Glass-to-glass latency of each frame with a marker, ms.
    pub glass_to_glass_ms: Vec<f64>,
    pub audio_frames_played: u64,
    pub audio_frames_fec: u64,
    /// Frames played from a redundant copy (RED) after their own packet was lost.
    pub audio_frames_red: u64,
    pub audio_frames_concealed: u64,
    /// Mouth-to-ear latency of each audio marker, ms.
    pub mouth_to_ear_ms: Vec<f64>,
    /// How often each participant tone was heard (Hz → frames).
    pub tones: HashMap<u32, u64>,
    pub audio_buffer_ms: u32,
    /// When the first and the latest frame were decoded (for the frame rate).
    pub first_frame: Option<Instant>,
    pub last_frame: Option<Instant>,
    /// Stretches longer than [`VIDEO_GAP`] without a decoded frame: (when the picture moved
    /// again, how long it had been frozen). How long media took to come back after an event.
    pub video_gaps: Vec<(Instant, Duration)>,
    last_counter: Option<u32>,
}

impl ReceiveStats {
    /// Decoded frames per second between the first and the latest frame.
    pub fn decoded_fps(&self) -> Option<f64> {
        let secs = self
            .last_frame?
            .duration_since(self.first_frame?)
            .as_secs_f64();
        (secs > 0.5).then(|| (self.video_frames_decoded.saturating_sub(1)) as f64 / secs)
    }

    /// The participant tone heard most.
    pub fn tone_heard(&self) -> Option<u32> {
        self.tones
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(hz, _)| *hz)
    }
}

type ReceivedMap = HashMap<ParticipantId, (Arc<LatestFrame>, ReceiveStats)>;

/// Remote video sinks, the call's decoded audio and receive statistics, shared with the UI and
/// the probe.
#[derive(Clone, Default)]
pub struct Received {
    inner: Arc<Mutex<ReceivedMap>>,
    audio: Arc<PlayedAudio>,
}

impl Received {
    /// Everyone's decoded audio, mixed, in 20 ms frames: what a speaker or a platform player
    /// plays.
    pub fn audio(&self) -> &Arc<PlayedAudio> {
        &self.audio
    }

    /// The latest decoded frame of `peer`'s video.
    pub fn video(&self, peer: &ParticipantId) -> Option<Arc<LatestFrame>> {
        self.lock().get(peer).map(|(sink, _)| sink.clone())
    }

    pub fn stats(&self) -> HashMap<ParticipantId, ReceiveStats> {
        self.lock()
            .iter()
            .map(|(p, (_, s))| (p.clone(), s.clone()))
            .collect()
    }

    /// A keyframe request went to `peer` (the driver counts what the call asks for).
    pub fn keyframe_requested(&self, peer: &ParticipantId) {
        if let Some((_, stats)) = self.lock().get_mut(peer) {
            stats.keyframes_requested += 1;
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ParticipantId, (Arc<LatestFrame>, ReceiveStats)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct PeerRx {
    video: FrameAssembler,
    decoder: Option<H264Decoder>,
    /// Packets of the video were lost for good: nothing decodes until the next keyframe.
    lost_reference: bool,
    audio: Option<AudioPlayoutBuffer>,
    markers: AudioMarkerReader,
    samples_played: u64,
    sink: Arc<LatestFrame>,
}

impl PeerRx {
    /// What a newly heard participant gets, its entry in `shared` included.
    fn new(peer: &ParticipantId, shared: &Received) -> Self {
        let sink = Arc::new(LatestFrame::new());
        shared
            .lock()
            .insert(peer.clone(), (sink.clone(), ReceiveStats::default()));
        PeerRx {
            video: FrameAssembler::new(),
            decoder: H264Decoder::new().ok(),
            lost_reference: false,
            audio: AudioPlayoutBuffer::new(PlayoutConfig::default()).ok(),
            markers: AudioMarkerReader::new(),
            samples_played: 0,
            sink,
        }
    }
}

/// Starts the receive thread; it reads `media` until the sender side closes. When a
/// participant's video cannot be decoded (lost packets, a decoder error, no keyframe yet), the
/// participant is sent on `keyframe_needed` for every frame that cannot be shown; when to ask
/// it for a keyframe is the call's decision (`EngineEvent::KeyframeNeeded`).
pub fn start_receiver(
    media: std_mpsc::Receiver<RemoteMedia>,
    keyframe_needed: mpsc::UnboundedSender<ParticipantId>,
    transform: FrameTransform,
) -> Received {
    let received = Received::default();
    let shared = received.clone();
    std::thread::Builder::new()
        .name("bedside-media-recv".into())
        .spawn(move || receive_loop(media, shared, keyframe_needed, transform))
        .expect("spawn the media receive thread");
    received
}

fn receive_loop(
    media: std_mpsc::Receiver<RemoteMedia>,
    shared: Received,
    keyframe_needed: mpsc::UnboundedSender<ParticipantId>,
    transform: FrameTransform,
) {
    let epoch = Instant::now();
    let mut peers: HashMap<ParticipantId, PeerRx> = HashMap::new();
    let mut next_pull = Instant::now() + Duration::from_millis(20);
    loop {
        let wait = next_pull.saturating_duration_since(Instant::now());
        match media.recv_timeout(wait) {
            Ok(item) => {
                let rx = peers
                    .entry(item.peer.clone())
                    .or_insert_with(|| PeerRx::new(&item.peer, &shared));
                match item.kind {
                    MediaKind::Video => {
                        receive_video(&item, rx, &shared, &keyframe_needed, &transform)
                    }
                    MediaKind::Audio => {
                        if let Some(buffer) = rx.audio.as_mut() {
                            let arrival = item.arrived.duration_since(epoch).as_micros() as u64;
                            let open =
                                |data: &[u8]| transform.inbound(&item.peer, Codec::Opus, data);
                            push_audio(buffer, &item.packet, item.payload_types, arrival, open);
                        }
                    }
                }
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_pull {
            next_pull += Duration::from_millis(20);
            let now_us = Instant::now().duration_since(epoch).as_micros() as u64;
            let mut mix: Option<AudioFrame> = None;
            for (peer, rx) in peers.iter_mut() {
                let Some(played) = play_audio(peer, rx, now_us, &shared) else {
                    continue;
                };
                match mix.as_mut() {
                    None => mix = Some(played),
                    Some(mix) => {
                        for (m, s) in mix.samples.iter_mut().zip(played.samples.iter()) {
                            *m = m.saturating_add(*s);
                        }
                    }
                }
            }
            if let Some(frame) = mix {
                shared.audio.push(frame);
            }
        }
    }
}

fn receive_video(
    item: &RemoteMedia,
    rx: &mut PeerRx,
    shared: &Received,
    keyframe_needed: &mpsc::UnboundedSender<ParticipantId>,
    transform: &FrameTransform,
) {
    rx.video.push(item.packet.clone());
    while let Some(unit) = rx.video.pop() {
        decode_access_unit(&item.peer, unit, rx, shared, keyframe_needed, transform);
    }
}

/// Decodes one reassembled access unit of `peer`'s video (the step right after depacketizing)
/// and shows it, or freezes and asks for a keyframe when its reference was lost.
fn decode_access_unit(
    peer: &ParticipantId,
    mut sample: AccessUnit,
    rx: &mut PeerRx,
    shared: &Received,
    keyframe_needed: &mpsc::UnboundedSender<ParticipantId>,
    transform: &FrameTransform,
) {
    let Some(decoder) = rx.decoder.as_mut() else {
        return;
    };
    // NAL headers stay in the clear under SFrame, so this reads the same either way.
    let mut idr = contains_idr(&sample.data);
    if transform.is_encrypted() {
        match transform.inbound(peer, Codec::H264, &sample.data) {
            Some(plain) => sample.data = plain.into(),
            // Not readable (yet): like a lost frame, nothing decodes until a keyframe that is.
            None => {
                rx.lost_reference = true;
                idr = false;
            }
        }
    }
    // Padding-only packets (Chromium's bandwidth probes on the video SSRC when it has no
    // RTX) take sequence numbers and carry no media: the assembler counts them apart, as
    // they are not loss. Only dropped media packets lose a reference.
    if idr {
        rx.lost_reference = false;
    } else if sample.dropped_before > 0 {
        rx.lost_reference = true;
    }
    // Decoding a frame whose reference is missing shows garbage: freeze on the last
    // picture instead, and ask for a keyframe.
    let undecodable = !idr && (rx.lost_reference || decoder.needs_keyframe());
    let decoded = if undecodable {
        None
    } else {
        Some(decoder.decode(&sample.data, 0))
    };
    let needs_keyframe = undecodable || matches!(decoded, Some(Err(_)));
    let now = wall_us();
    let mut map = shared.lock();
    let Some((_, stats)) = map.get_mut(peer) else {
        return;
    };
    if needs_keyframe {
        let _ = keyframe_needed.send(peer.clone());
    }
    let Some(decoded) = decoded else {
        stats.video_frames_skipped += 1;
        return;
    };
    match decoded {
        Ok(Some(frame)) => {
            stats.video_frames_decoded += 1;
            stats.width = frame.width();
            stats.height = frame.height();
            let at = Instant::now();
            stats.first_frame.get_or_insert(at);
            if let Some(last) = stats.last_frame
                && at.duration_since(last) > VIDEO_GAP
            {
                stats.video_gaps.push((at, at.duration_since(last)));
            }
            stats.last_frame = Some(at);
            if let Some(marker) = read_marker(&frame) {
                stats.frames_with_marker += 1;
                stats
                    .glass_to_glass_ms
                    .push(elapsed_ms(now, marker.capture_us));
                if let Some(last) = stats.last_counter {
                    stats.frames_missing +=
                        u64::from(marker.counter.wrapping_sub(last).saturating_sub(1));
                }
                stats.last_counter = Some(marker.counter);
            }
            drop(map);
            rx.sink.publish(frame);
        }
        Ok(None) => {}
        Err(_) => stats.video_decode_errors += 1,
    }
}

/// Puts one audio packet into the playout buffer: Opus as it is; RED (`media::red`) as its
/// primary frame plus the earlier frames it carries, for the buffer to fill gaps with. Which is
/// which the peer's session says (`types`). A malformed RED payload is dropped with a log line
/// (counted as lost by the buffer).
fn push_audio(
    buffer: &mut AudioPlayoutBuffer,
    packet: &rtc::rtp::Packet,
    types: PayloadTypes,
    arrival_us: u64,
    open: impl Fn(&[u8]) -> Option<Vec<u8>>,
) {
    let (seq, ts) = (packet.header.sequence_number, packet.header.timestamp);
    if Some(packet.header.payload_type) != types.red {
        // A packet that does not open is left out: the buffer conceals it as lost.
        if let Some(frame) = open(&packet.payload) {
            buffer.push(seq, ts, frame, arrival_us);
        }
        return;
    }
    match red::decode(&packet.payload) {
        Ok((redundant, primary)) => {
            if let Some(frame) = open(&primary.data) {
                buffer.push(seq, ts, frame, arrival_us);
            }
            // Oldest first, one 20 ms frame per packet: the last block is the packet just
            // before. A block that is not Opus or not where that puts it (another sender's
            // distance, a gap) is not placed.
            let count = redundant.len();
            for (i, block) in redundant.into_iter().enumerate() {
                let back = count - i;
                if Some(block.payload_type) == types.opus
                    && block.timestamp_offset as usize == back * FRAME_SAMPLES
                    && let Some(frame) = open(&block.data)
                {
                    buffer.push_redundant(seq.wrapping_sub(back as u16), frame);
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "dropped a RED packet"),
    }
}

/// Plays the next 20 ms of `peer`'s audio: measures it and returns it for the mix.
fn play_audio(
    peer: &ParticipantId,
    rx: &mut PeerRx,
    now_us: u64,
    shared: &Received,
) -> Option<AudioFrame> {
    let buffer = rx.audio.as_mut()?;
    let st = buffer.stats();
    if st.played + st.fec_recovered + st.red_recovered + st.concealed == 0
        && buffer.buffered_ms() == 0
    {
        return None; // Nothing has arrived yet.
    }
    let playout = buffer.pull(now_us);
    let now = wall_us();
    let samples = &playout.frame.samples[..];
    rx.samples_played += samples.len() as u64;
    let markers = rx.markers.push(samples);
    let tone = detect_tone(samples, &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ]);
    let mut map = shared.lock();
    let (_, stats) = map.get_mut(peer)?;
    match playout.kind {
        PlayoutKind::Normal => stats.audio_frames_played += 1,
        PlayoutKind::Fec => stats.audio_frames_fec += 1,
        PlayoutKind::Redundant => stats.audio_frames_red += 1,
        PlayoutKind::Concealed => stats.audio_frames_concealed += 1,
        _ => {}
    }
    stats.audio_buffer_ms = buffer.buffered_ms();
    if let Some(hz) = tone {
        *stats.tones.entry(hz as u32).or_default() += 1;
    }
    for marker in markers {
        // The marker's frame was captured at (wall frame number) * 20 ms; find the latest such
        // wall time not after now with the same low 16 bits.
        let now_frames = now / FRAME_US;
        let back = (now_frames as u16).wrapping_sub(marker.frame_index) as u64;
        let captured = (now_frames - back) * FRAME_US;
        // It started playing this long ago.
        let since_start_us = (rx.samples_played - marker.sample_offset) * 1_000_000 / 48_000;
        let latency = elapsed_ms(now, captured) - since_start_us as f64 / 1000.0;
        if (0.0..10_000.0).contains(&latency) {
            stats.mouth_to_ear_ms.push(latency);
        }
    }
    Some(playout.frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::OPUS_PAYLOAD_TYPE;
    use crate::media::RED_PAYLOAD_TYPE;

    const OFFERED: PayloadTypes = PayloadTypes::OFFERED;

    /// No end-to-end encryption: every frame opens as it is.
    fn plain(data: &[u8]) -> Option<Vec<u8>> {
        Some(data.to_vec())
    }

    /// An RTP packet of RED payload, sequence number `seq`, one 20 ms frame per number.
    fn red_packet(seq: u16, payload: bytes::Bytes) -> rtc::rtp::Packet {
        rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                payload_type: RED_PAYLOAD_TYPE,
                sequence_number: seq,
                timestamp: u32::from(seq) * 960,
                ..Default::default()
            },
            payload,
        }
    }

    /// Real Opus through `push_audio` as RED packets: with packets 10 and 11 lost, 11 plays
    /// from its copy in 12 and 10 through the FEC inside that copy.
    #[test]
    fn red_packets_fill_two_lost_in_a_row() {
        use crate::media::{RedEncoder, ToneConfig, ToneSource};
        let mut tone = ToneSource::new(ToneConfig::default());
        let mut opus = OpusEncoder::new(OpusConfig::default()).unwrap();
        let mut red = RedEncoder::default();
        let mut buffer = AudioPlayoutBuffer::new(PlayoutConfig::default()).unwrap();
        let mut now = 0;
        for seq in 0..40u16 {
            let encoded = opus.encode(&tone.next_frame(now)).unwrap();
            let payload = red.encode(OPUS_PAYLOAD_TYPE, encoded.into(), 960);
            if seq != 10 && seq != 11 {
                push_audio(
                    &mut buffer,
                    &red_packet(seq, payload),
                    OFFERED,
                    now + 5_000,
                    plain,
                );
            }
            buffer.pull(now + 10_000);
            now += FRAME_US;
        }
        // Every frame but the last one or two (still buffered) played with its own audio; the
        // two packets' silence was an underrun, bridged by concealment without skipping.
        let st = buffer.stats();
        assert_eq!((st.red_recovered, st.fec_recovered), (1, 1), "{st:?}");
        assert!(st.played + 2 + st.buffered_ms as u64 / 20 >= 40, "{st:?}");
        assert_eq!((st.late_dropped, st.duplicates), (0, 0), "{st:?}");
    }

    /// A copy whose timestamp offset says two frames back while it is the only block (another
    /// sender's distance, or a gap) is not placed; one frame back is.
    #[test]
    fn a_red_block_is_placed_only_where_its_offset_puts_it() {
        use crate::media::{RedBlock, ToneConfig, ToneSource};
        let recovered = |offset: u32| {
            let mut tone = ToneSource::new(ToneConfig::default());
            let mut opus = OpusEncoder::new(OpusConfig::default()).unwrap();
            let mut buffer = AudioPlayoutBuffer::new(PlayoutConfig::default()).unwrap();
            let mut now = 0;
            let mut previous = Vec::new();
            for seq in 0..12u16 {
                let encoded = opus.encode(&tone.next_frame(now)).unwrap();
                let block = RedBlock {
                    payload_type: OPUS_PAYLOAD_TYPE,
                    timestamp_offset: offset,
                    data: std::mem::replace(&mut previous, encoded.clone()).into(),
                };
                let payload = red::encode_payload(&[block], OPUS_PAYLOAD_TYPE, &encoded);
                if seq != 5 {
                    push_audio(
                        &mut buffer,
                        &red_packet(seq, payload),
                        OFFERED,
                        now + 5_000,
                        plain,
                    );
                }
                buffer.pull(now + 10_000);
                now += FRAME_US;
            }
            buffer.stats().red_recovered
        };
        assert_eq!(recovered(960), 1);
        assert_eq!(recovered(1920), 0);
    }

    /// A session that put Opus on 109 and RED on 100 (a browser's numbers): RED is read by
    /// those numbers, and a packet on our own RED number is plain Opus there.
    #[test]
    fn red_is_read_on_the_payload_types_the_session_negotiated() {
        use crate::media::{RedEncoder, ToneConfig, ToneSource};
        let theirs = PayloadTypes {
            h264: Some(108),
            opus: Some(109),
            red: Some(100),
        };
        let run = |packet_pt: u8, block_pt: u8| {
            let mut tone = ToneSource::new(ToneConfig::default());
            let mut opus = OpusEncoder::new(OpusConfig::default()).unwrap();
            let mut red = RedEncoder::default();
            let mut buffer = AudioPlayoutBuffer::new(PlayoutConfig::default()).unwrap();
            let mut now = 0;
            for seq in 0..20u16 {
                let encoded = opus.encode(&tone.next_frame(now)).unwrap();
                let mut packet = red_packet(seq, red.encode(block_pt, encoded.into(), 960));
                packet.header.payload_type = packet_pt;
                if seq != 10 {
                    push_audio(&mut buffer, &packet, theirs, now + 5_000, plain);
                }
                buffer.pull(now + 10_000);
                now += FRAME_US;
            }
            buffer.stats()
        };
        assert_eq!(run(100, 109).red_recovered, 1);
        // Blocks of another payload type than the session's Opus are not placed.
        assert_eq!(run(100, OPUS_PAYLOAD_TYPE).red_recovered, 0);
        // Our RED number is not RED in this session: the payload goes to the decoder as is.
        assert_eq!(run(RED_PAYLOAD_TYPE, 109).red_recovered, 0);
    }

    /// Real H.264 packetized as webrtc does, with two padding-only packets (Chromium's
    /// bandwidth probes: the padding bit, no payload, the last frame's timestamp) after each
    /// frame. Padding is not loss: every frame decodes and no keyframe is asked for. A lost
    /// media packet still freezes the picture until a keyframe (so the test can tell).
    #[test]
    fn padding_only_packets_are_not_loss() {
        use crate::media::{H264Config, PatternConfig, TestPatternSource};
        use rtc::rtp::packetizer::{Packetizer, new_packetizer};
        use rtc::rtp::sequence::Sequencer;
        let run = |drop_media_packet: Option<usize>| {
            let config = H264Config {
                width: 320,
                height: 180,
                bitrate_bps: 300_000,
                frame_skip: false,
                ..Default::default()
            };
            let mut encoder = H264Encoder::new(config).unwrap();
            let mut pattern = TestPatternSource::new(PatternConfig {
                width: 320,
                height: 180,
                fps: 30,
                tag: 1,
            })
            .unwrap();
            let sequencer: Box<dyn Sequencer> =
                Box::new(rtc::rtp::sequence::new_random_sequencer());
            let start = Instant::now();
            let mut packetizer = new_packetizer(
                start,
                1200,
                108,
                7,
                Box::new(rtc::rtp::codec::h264::H264Payloader::default()),
                sequencer.clone(),
                90_000,
            );
            let (shared, (tx, mut needs)) = (Received::default(), mpsc::unbounded_channel());
            let peer = ParticipantId("browser".into());
            let mut rx = PeerRx::new(&peer, &shared);
            let mut media_packets = 0;
            for i in 0..30u64 {
                let frame = pattern.next_frame(i * 33_333);
                let au = encoder.encode(&frame).unwrap().expect("a frame");
                let packets = packetizer.packetize(start, &au.data.into(), 3000).unwrap();
                let timestamp = packets[0].header.timestamp;
                let mut padding = Vec::new();
                for _ in 0..2 {
                    let mut header = packets[0].header.clone();
                    header.sequence_number = sequencer.next_sequence_number();
                    header.padding = true;
                    header.marker = false;
                    header.timestamp = timestamp;
                    padding.push(rtc::rtp::Packet {
                        header,
                        payload: bytes::Bytes::new(),
                    });
                }
                let at = start + Duration::from_millis(i * 33);
                let mut wire = Vec::new();
                for packet in packets {
                    media_packets += 1;
                    if Some(media_packets) != drop_media_packet {
                        wire.push((packet, at));
                    }
                }
                wire.extend(
                    padding
                        .into_iter()
                        .map(|p| (p, at + Duration::from_millis(1))),
                );
                for (packet, arrived) in wire {
                    rx_push(&mut rx, &shared, &tx, &peer, packet, arrived);
                }
            }
            let mut needed = 0;
            while needs.try_recv().is_ok() {
                needed += 1;
            }
            (shared.stats().remove(&peer).unwrap(), needed)
        };
        let (clean, clean_needs) = run(None);
        assert_eq!(clean.video_frames_skipped, 0, "{clean:?}");
        assert_eq!(clean_needs, 0, "{clean:?}");
        assert!(clean.video_frames_decoded >= 28, "{clean:?}");
        // A real loss in the fifth frame's packets (after the keyframe) freezes until a keyframe.
        let (lossy, lossy_needs) = run(Some(12));
        assert!(lossy.video_frames_skipped > 0, "{lossy:?}");
        assert!(lossy_needs > 0, "{lossy:?}");
    }

    fn rx_push(
        rx: &mut PeerRx,
        shared: &Received,
        tx: &mpsc::UnboundedSender<ParticipantId>,
        peer: &ParticipantId,
        packet: rtc::rtp::Packet,
        arrived: Instant,
    ) {
        let item = RemoteMedia {
            peer: peer.clone(),
            kind: MediaKind::Video,
            packet,
            payload_types: OFFERED,
            arrived,
        };
        receive_video(&item, rx, shared, tx, &FrameTransform::none());
    }

    #[test]
    fn elapsed_wraps_around_48_bits() {
        assert_eq!(elapsed_ms(5_000, 1_000), 4.0);
        assert_eq!(elapsed_ms(500, WRAP_48 - 1_500), 2.0);
    }
}

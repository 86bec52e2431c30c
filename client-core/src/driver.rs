//! The tokio driver: owns the signaling WebSocket and the WebRTC [`Engine`], feeds the
//! [`Call`] state machine and carries out its outputs. It decides nothing itself; it reads the
//! clock (the state machine does not) and does I/O.
//!
//! [`start`] returns a [`ClientHandle`] (commands in) and a stream of [`CallEvent`]s (out): the
//! one API the desktop app and the mobile bindings build on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bedside_protocol::ParticipantId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc::peer_connection::StatsSelector;

use crate::call::{
    Call, CallConfig, CallEvent, EngineEvent, MediaCommand, Output, SignalingCommand,
    SignalingEvent, UserCommand,
};
use crate::e2ee::{self, FrameCrypto};
use crate::engine::{Engine, EngineError, EngineSettings, LocalTracks};
use crate::media::H264Config;
use crate::pipeline::{self, FrameTransform, MediaSources, Received, SendCommand, SendStats};
use crate::signaling::{Incoming, SignalingConnection};
use crate::stats::{RawStats, StatsTracker};

/// How a client reaches its clinic and sets up media.
#[derive(Clone)]
pub struct ClientOptions {
    /// The server's signaling URL (`wss://clinic.example/ws`).
    pub server_url: String,
    /// TLS settings for `wss://` (`None`: the web's root certificates).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub engine: EngineSettings,
    pub call: CallConfig,
    /// Seeds the reconnection jitter.
    pub seed: u64,
    /// The video encoder's starting point (the quality ladder moves it).
    pub video: H264Config,
    /// End-to-end encryption of media (SFrame, `e2ee`): every participant of the consultation
    /// must have it on, or they cannot decode each other. Off by default: a 1:1 call is
    /// already end to end (DTLS-SRTP, peer to peer); calls through a forwarding server need it.
    pub e2ee: bool,
    /// Testing only: record this many of the first encoded frames of each kind as they go to
    /// the packetizer (`Client::transform`'s tap).
    pub tap_frames: usize,
}

impl ClientOptions {
    pub fn new(server_url: impl Into<String>) -> Self {
        ClientOptions {
            server_url: server_url.into(),
            tls: None,
            engine: EngineSettings::default(),
            call: CallConfig::default(),
            seed: rand::random(),
            video: H264Config::default(),
            e2ee: false,
            tap_frames: 0,
        }
    }
}

/// Commands into a running client. Dropping it leaves the consultation.
pub struct ClientHandle {
    commands: mpsc::UnboundedSender<UserCommand>,
    media: std::sync::mpsc::Sender<SendCommand>,
    tracks: Arc<LocalTracks>,
    task: JoinHandle<()>,
}

impl ClientHandle {
    pub fn send(&self, cmd: UserCommand) {
        let _ = self.commands.send(cmd);
    }

    /// Captures video from `source` from now on: the camera the user picked (see
    /// `media::devices::open_camera` with the `devices` feature), a phone's other camera pushed
    /// by the host, or [`crate::media::NoDevice`]. The call and its encoder go on; the next
    /// frame sent is a keyframe. Turning the camera off is [`UserCommand::SetCameraEnabled`].
    pub fn set_video_source(&self, source: Box<dyn crate::media::VideoSource>) {
        let _ = self.media.send(SendCommand::VideoSource(source));
    }

    /// Captures audio from `source` from now on (the microphone the user picked).
    pub fn set_audio_source(&self, source: Box<dyn crate::media::AudioSource>) {
        let _ = self.media.send(SendCommand::AudioSource(source));
    }

    /// The local tracks the media pipeline writes encoded audio and video into.
    pub fn tracks(&self) -> &Arc<LocalTracks> {
        &self.tracks
    }

    /// Waits until the client has ended (after `Leave`, or when the call ended otherwise).
    pub async fn finished(self) {
        let _ = self.task.await;
    }
}

/// What [`start`] gives back: commands in, events out, and what was received.
pub struct Client {
    pub handle: ClientHandle,
    pub events: mpsc::UnboundedReceiver<CallEvent>,
    /// Remote video (latest frame per participant) and receive statistics.
    pub received: Received,
    pub sent: Arc<SendStats>,
    /// The frame transform between codecs and packetizer (end-to-end encryption, the tap).
    pub transform: FrameTransform,
}

/// Starts a client capturing from `sources`; it does nothing until it is sent
/// [`UserCommand::Join`].
pub fn start(options: ClientOptions, sources: MediaSources) -> Result<Client, EngineError> {
    let tracks = LocalTracks::new("bedside")?;
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (event_tx, events) = mpsc::unbounded_channel();
    let (media_tx, media_rx) = std::sync::mpsc::sync_channel(1024);
    let (engine_tx, engine_rx) = mpsc::unbounded_channel();
    let mut engine_settings = options.engine.clone();
    // A `turns:` relay is trusted like the signaling server.
    if engine_settings.tls.is_none() {
        engine_settings.tls.clone_from(&options.tls);
    }
    let engine = Engine::new(engine_settings, tracks.clone(), engine_tx, media_tx);
    let (keyframe_tx, keyframe_rx) = mpsc::unbounded_channel();
    let crypto = Arc::new(std::sync::Mutex::new(FrameCrypto::new()));
    let (e2ee, mut transform) = match options.e2ee {
        true => (
            Some(e2ee::Session::new(rand::random())),
            FrameTransform::encrypted(crypto.clone()),
        ),
        false => (None, FrameTransform::none()),
    };
    if options.tap_frames > 0 {
        transform = transform.with_tap(options.tap_frames);
    }
    let received = pipeline::start_receiver(media_rx, keyframe_tx, transform.clone());
    let (media, sent) =
        pipeline::start_sender(sources, tracks.clone(), options.video, transform.clone());
    let media_commands = media.clone();
    let mut call_config = options.call.clone();
    call_config.video_size = (options.video.width, options.video.height);
    let call = Call::new(call_config, options.seed);
    let driver = Driver {
        options,
        call,
        engine,
        engine_rx,
        keyframe_needed: keyframe_rx,
        commands: command_rx,
        events: event_tx,
        link: None,
        generation: 0,
        signaling_tx: None,
        trackers: HashMap::new(),
        media,
        received: received.clone(),
        sent: sent.clone(),
        e2ee,
        crypto,
    };
    let task = tokio::spawn(driver.run());
    Ok(Client {
        handle: ClientHandle {
            commands,
            media: media_commands,
            tracks,
            task,
        },
        events,
        received,
        sent,
        transform,
    })
}

/// What the signaling task reports, tagged with the link it belongs to.
struct LinkEvent {
    generation: u64,
    event: SignalingEvent,
}

struct Driver {
    options: ClientOptions,
    call: Call,
    engine: Engine,
    engine_rx: mpsc::UnboundedReceiver<crate::call::EngineEvent>,
    /// Participants whose video the pipeline cannot decode: they are sent a PLI.
    keyframe_needed: mpsc::UnboundedReceiver<ParticipantId>,
    commands: mpsc::UnboundedReceiver<UserCommand>,
    events: mpsc::UnboundedSender<CallEvent>,
    /// Messages to the current signaling link.
    link: Option<mpsc::UnboundedSender<bedside_protocol::ClientMessage>>,
    /// Which link is current: events from older ones are ignored.
    generation: u64,
    signaling_tx: Option<mpsc::UnboundedSender<LinkEvent>>,
    trackers: HashMap<ParticipantId, StatsTracker>,
    /// Commands to the media send thread.
    media: std::sync::mpsc::Sender<SendCommand>,
    /// What the media pipeline decoded, for the statistics.
    received: Received,
    sent: Arc<SendStats>,
    /// The end-to-end key schedule (when on) and the keys it gives the frame transform.
    e2ee: Option<e2ee::Session>,
    crypto: Arc<std::sync::Mutex<FrameCrypto>>,
}

/// How often call statistics are read.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the congestion controller's estimate is handed to the quality ladder.
pub const BANDWIDTH_INTERVAL: Duration = Duration::from_millis(250);

impl Driver {
    async fn run(mut self) {
        let (link_tx, mut link_rx) = mpsc::unbounded_channel::<LinkEvent>();
        self.signaling_tx = Some(link_tx);
        let mut commands_open = true;
        let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bandwidth_tick = tokio::time::interval(BANDWIDTH_INTERVAL);
        bandwidth_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.carry_out_e2ee();
            self.carry_out().await;
            if matches!(self.call.state(), crate::call::CallState::Ended(_)) {
                break;
            }
            let deadline = self.call.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = self.commands.recv(), if commands_open => match cmd {
                    Some(cmd) => self.call.handle_user(Instant::now(), cmd),
                    None => {
                        // The handle was dropped: leave.
                        commands_open = false;
                        self.call.handle_user(Instant::now(), UserCommand::Leave);
                    }
                },
                Some(ev) = link_rx.recv() => {
                    if ev.generation == self.generation
                        && let Some(event) = self.observe_e2ee(ev.event)
                    {
                        self.call.handle_signaling(Instant::now(), event);
                    }
                }
                Some(ev) = self.engine_rx.recv() => {
                    if matches!(ev, EngineEvent::KeyframeRequested { .. }) {
                        self.sent
                            .keyframe_requests_received
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.call.handle_engine(Instant::now(), ev);
                }
                Some(peer) = self.keyframe_needed.recv() => {
                    let needed = EngineEvent::KeyframeNeeded { peer };
                    self.call.handle_engine(Instant::now(), needed);
                }
                _ = sleep => self.call.handle_timeout(Instant::now()),
                _ = stats_tick.tick() => self.collect_stats().await,
                _ = bandwidth_tick.tick() => {
                    if let Some(kbps) = self.engine.bandwidth_estimate_kbps() {
                        self.call.handle_bandwidth(Instant::now(), kbps);
                    }
                }
            }
        }
        self.engine.close_all().await;
        self.link = None;
        let _ = self.media.send(SendCommand::Stop);
    }

    /// Carries out everything the state machine asked for.
    async fn carry_out(&mut self) {
        while let Some(output) = self.call.poll_output() {
            match output {
                Output::Signaling(SignalingCommand::Open) => self.open_link(),
                Output::Signaling(SignalingCommand::OpenAt(url)) => {
                    tracing::info!("the consultation is in another region: following the redirect");
                    self.options.server_url = url;
                    self.open_link();
                }
                Output::Signaling(SignalingCommand::Send(msg)) => {
                    if let Some(link) = &self.link {
                        let _ = link.send(msg);
                    }
                }
                Output::Signaling(SignalingCommand::Close) => {
                    self.link = None;
                    self.generation += 1;
                }
                Output::Media(MediaCommand::Keyframe) => {
                    let _ = self.media.send(SendCommand::Keyframe);
                }
                Output::Media(MediaCommand::SetVideoEncoding {
                    width,
                    height,
                    fps,
                    bitrate_kbps,
                }) => {
                    let _ = self.media.send(SendCommand::Encoding {
                        width,
                        height,
                        fps,
                        bitrate_kbps,
                    });
                }
                Output::Engine(cmd) => {
                    let peer = cmd.peer().cloned();
                    if let crate::call::EngineCommand::RequestKeyframeFrom { peer } = &cmd {
                        self.received.keyframe_requested(peer);
                    }
                    if let Err(e) = self.engine.execute(cmd).await {
                        tracing::warn!(error = %e, "media engine command failed");
                        // A connection whose event loop ended is the call's to rebuild.
                        if let Some(peer) = peer.filter(|_| e.is_peer_stopped()) {
                            self.call
                                .handle_engine(Instant::now(), EngineEvent::PeerStopped { peer });
                        }
                    }
                }
                Output::Event(event) => {
                    let _ = self.events.send(event);
                }
            }
        }
    }

    /// Shows the key schedule what it needs of the consultation (who is there, who joined,
    /// who left) and takes its own messages; everything else goes on to the call.
    fn observe_e2ee(&mut self, event: SignalingEvent) -> Option<SignalingEvent> {
        use bedside_protocol::ServerMessage;
        let Some(session) = self.e2ee.as_mut() else {
            return Some(event);
        };
        if let SignalingEvent::Message(msg) = &event {
            match msg {
                ServerMessage::E2ee { from, message } => {
                    session.handle_message(from, message.clone());
                    return None;
                }
                ServerMessage::Admitted { peers, .. } => {
                    for peer in peers {
                        session.peer_present(&peer.participant_id);
                    }
                }
                ServerMessage::PeerJoined { peer } => session.peer_joined(&peer.participant_id),
                ServerMessage::PeerBack { participant_id } => session.peer_present(participant_id),
                ServerMessage::PeerLeft { participant_id, .. } => session.peer_left(participant_id),
                _ => {}
            }
        }
        Some(event)
    }

    /// Carries out what the key schedule asked for: messages to peers, keys to the frame
    /// transform (a new send key also forces a keyframe, the first picture its readers can
    /// decode), the safety code to the UI.
    fn carry_out_e2ee(&mut self) {
        let Some(session) = self.e2ee.as_mut() else {
            return;
        };
        while let Some(output) = session.poll_output() {
            let mut crypto = self.crypto.lock().unwrap_or_else(|p| p.into_inner());
            let applied = match output {
                e2ee::Output::Send { to, message } => {
                    if let Some(link) = &self.link {
                        let _ = link.send(bedside_protocol::ClientMessage::E2ee { to, message });
                    }
                    Ok(())
                }
                e2ee::Output::SendKey { key_id, material } => {
                    let _ = self.media.send(SendCommand::Keyframe);
                    crypto.set_send_key(key_id, &material)
                }
                e2ee::Output::ReceiveKey {
                    from,
                    key_id,
                    material,
                } => crypto.add_receive_key(&from, key_id, &material),
                e2ee::Output::Forget(peer) => {
                    crypto.forget(&peer);
                    Ok(())
                }
                e2ee::Output::SafetyCode(code) => {
                    let _ = self.events.send(CallEvent::SafetyCode(code));
                    Ok(())
                }
            };
            if let Err(e) = applied {
                tracing::warn!(error = %e, "an end-to-end key was not usable");
            }
        }
    }

    /// Reads each peer connection's statistics and hands them to the state machine.
    async fn collect_stats(&mut self) {
        let received = self.received.stats();
        let peers: Vec<_> = self.engine.peer_ids().cloned().collect();
        for peer in peers {
            let Some(pc) = self.engine.peer(&peer).cloned() else {
                continue;
            };
            let now = Instant::now();
            let report = pc.get_stats(now, StatsSelector::None).await;
            let mut raw = RawStats::from_report(&report, &self.engine.stream_relays(&peer));
            if let Some(feedback) = self.engine.send_feedback(&peer) {
                raw.sent = feedback.sent_loss();
            }
            if let Some(media) = received.get(&peer) {
                raw.frames_decoded = media.video_frames_decoded;
                raw.frame_width = media.width;
                raw.frame_height = media.height;
                raw.audio_buffer_ms = Some(media.audio_buffer_ms);
            }
            let mut sample = self
                .trackers
                .entry(peer.clone())
                .or_default()
                .sample(now, raw);
            sample.send_estimate_kbps = self.engine.peer_estimate_kbps(&peer);
            self.call.handle_stats(now, peer, sample);
        }
        let live: Vec<_> = self.engine.peer_ids().cloned().collect();
        self.trackers.retain(|p, _| live.contains(p));
    }

    /// Opens a new signaling link in its own task; the old one (if any) is dropped.
    fn open_link(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        self.link = Some(tx);
        let events = self.signaling_tx.clone().expect("set in run");
        let url = self.options.server_url.clone();
        let tls = self.options.tls.clone();
        tokio::spawn(link_task(url, tls, generation, rx, events));
    }
}

async fn link_task(
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    generation: u64,
    mut outbound: mpsc::UnboundedReceiver<bedside_protocol::ClientMessage>,
    events: mpsc::UnboundedSender<LinkEvent>,
) {
    let report = |event| {
        let _ = events.send(LinkEvent { generation, event });
    };
    let connect = SignalingConnection::connect(&url, tls);
    let mut conn = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => conn,
        _ => {
            report(SignalingEvent::Failed);
            return;
        }
    };
    report(SignalingEvent::Opened);
    loop {
        tokio::select! {
            incoming = conn.recv() => match incoming {
                Ok(Incoming::Message(msg)) => report(SignalingEvent::Message(msg)),
                Ok(Incoming::Closed { code, .. }) => {
                    report(SignalingEvent::Closed(code));
                    return;
                }
                Err(_) => {
                    report(SignalingEvent::Failed);
                    return;
                }
            },
            out = outbound.recv() => match out {
                Some(msg) => {
                    if conn.send(&msg).await.is_err() {
                        report(SignalingEvent::Failed);
                        return;
                    }
                }
                // The driver dropped this link.
                None => {
                    conn.close().await;
                    return;
                }
            },
        }
    }
}

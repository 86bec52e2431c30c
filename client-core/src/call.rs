//! The consultation's call logic as one sans-IO state machine.
//!
//! [`Call`] owns every decision: joining, the waiting room, who offers to whom, ICE restarts,
//! resuming the seat after a lost signaling link (and escalating to a full rejoin), leaving. It
//! never reads the clock, never spawns and holds no lock: time comes in with every input, and
//! the RNG used for backoff jitter is passed in at construction. A driver feeds it inputs
//! (`handle_*`) and carries out its outputs ([`Call::poll_output`]) until
//! [`Call::poll_timeout`], when it calls [`Call::handle_timeout`].
//!
//! Inputs: user commands ([`UserCommand`]), signaling events ([`SignalingEvent`]), media engine
//! events ([`EngineEvent`]), call statistics, timeouts. Outputs ([`Output`]): signaling commands
//! (open, send, close), engine commands (create a peer connection, apply a description, restart
//! ICE...: the WebRTC engine's), media commands (a keyframe, an encoding: the encoder's, which
//! the media pipeline owns) and events for the UI ([`CallEvent`]).
//!
//! A peer connection that stops is rebuilt: when its event loop has ended (the engine reports
//! [`EngineEvent::PeerStopped`]: every command to it fails), or when the peer's video has
//! arrived undecodable for [`CallConfig::frozen_video_rebuild_after`] with keyframe requests
//! going unanswered. The side that notices rebuilds as the offerer (the far side sees an offer
//! from a new session and rebuilds to answer it); if both rebuild at once, the offer of the
//! participant with the lower id wins and the other side answers it.
//!
//! Reconnection follows LiveKit's policy: a lost signaling link is first resumed cheaply (same
//! seat, resume token, media untouched); if the server says the seat is gone the call escalates
//! to a full rejoin and stays escalated; it never retries after an authentication failure or a
//! server-ordered end (denied, ended, replaced), and gives up after `give_up_after`.
//!
//! Group consultations: when the server runs an SFU (`admitted` says so) and two or more others
//! are admitted, the call closes its peer connections and opens one to the SFU instead (the
//! engine's peer [`SFU_PEER`], always the offerer: `sfu_offer`, `sfu_answer`, `sfu_candidate`),
//! publishing once and receiving everyone in the slots the SFU assigns (`sfu_layout`). Each
//! peer's media state then follows the SFU connection's; ICE restarts and rebuilds apply to it
//! as to a peer. The call stays on the SFU once there, even when it is two again (a freeze per
//! move is what switching costs; staying costs nothing the SFU cannot carry).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bedside_protocol::{
    ClientMessage, ErrorCode, IceCandidate, IceServer, JoinAuth, LeaveReason, PROTOCOL_VERSION,
    ParticipantId, Peer, Role, ServerMessage, StatsReport, WaitingPatient, close_code,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::backoff::Backoff;
use crate::quality::{AudioRedundancy, LADDER, QualityConfig, QualityController, VideoTarget};

/// Timers and limits of the call logic.
#[derive(Clone, Debug)]
pub struct CallConfig {
    pub backoff: Backoff,
    /// How long one attempt to open the WebSocket and be seated may take.
    pub join_timeout: Duration,
    /// How often the client pings the server when nothing else is said.
    pub ping_interval: Duration,
    /// Silence from the server after which the signaling link counts as lost.
    pub signaling_dead_after: Duration,
    /// How long an ICE restart may take before the peer connection is rebuilt.
    pub ice_restart_timeout: Duration,
    /// How long the call keeps trying to get its signaling back before it ends.
    pub give_up_after: Duration,
    /// The size video is captured at: the quality ladder never climbs above it.
    pub video_size: (u32, u32),
    /// A peer's video that keeps arriving and cannot be decoded for this long, with keyframe
    /// requests going out all that time, means its connection is stuck (seen in a lab on a
    /// long lossy path: a picture frozen for good despite 22 requests): it is rebuilt. Well
    /// above what loss alone costs: the sender also forces a keyframe every 2 s, so this is
    /// four keyframes lost or refused in a row.
    pub frozen_video_rebuild_after: Duration,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            backoff: Backoff::default(),
            join_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(5),
            signaling_dead_after: Duration::from_secs(12),
            ice_restart_timeout: Duration::from_secs(8),
            give_up_after: Duration::from_secs(120),
            video_size: (1280, 720),
            frozen_video_rebuild_after: Duration::from_secs(8),
        }
    }
}

/// What the user (or the host app) asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum UserCommand {
    Join {
        auth: JoinAuth,
        display_name: Option<String>,
    },
    Admit(ParticipantId),
    Deny(ParticipantId),
    SetMicrophoneMuted(bool),
    SetCameraEnabled(bool),
    SetAudioOnly(bool),
    /// The host saw the network change (Wi-Fi to cellular...): reconnect everything now.
    NetworkChanged,
    /// The app went to the background (true) or came back (false). In the background no video
    /// is sent (mobile systems take the camera away) and audio goes on; coming back resumes
    /// video and checks the signaling link at once, since a suspended app may have lost it.
    SetBackgrounded(bool),
    /// Send a chat line to everyone whose media is connected (over the data channel, end to
    /// end; nothing is stored). Answered by [`CallEvent::Chat`] (sent) or
    /// [`CallEvent::ChatNotDelivered`].
    SendChat(String),
    Leave,
}

/// What happened to the signaling WebSocket.
#[derive(Clone, Debug, PartialEq)]
pub enum SignalingEvent {
    /// The WebSocket is open.
    Opened,
    Message(ServerMessage),
    /// The server closed it with this code.
    Closed(u16),
    /// It could not be opened, or broke without a close.
    Failed,
}

/// The state of one peer connection, as WebRTC reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerConnectionState {
    New,
    Connecting,
    Connected,
    Disconnected,
    Failed,
    Closed,
}

/// What the media engine reports.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    LocalDescription {
        peer: ParticipantId,
        kind: SdpKind,
        sdp: String,
    },
    LocalCandidate {
        peer: ParticipantId,
        candidate: IceCandidate,
    },
    ConnectionState {
        peer: ParticipantId,
        state: PeerConnectionState,
    },
    /// The peer asked for a video keyframe (RTCP PLI or FIR): it lost video and cannot decode.
    KeyframeRequested { peer: ParticipantId },
    /// We cannot decode the peer's video (a reference was lost, or decoding failed): it must
    /// send a keyframe. Reported for every frame that cannot be shown; the call decides when
    /// to ask ([`EngineCommand::RequestKeyframeFrom`]).
    KeyframeNeeded { peer: ParticipantId },
    /// A chat line arrived on the peer's data channel (already checked against the limits).
    ChatReceived {
        peer: ParticipantId,
        id: u64,
        text: String,
    },
    /// Our chat line `id` could not be handed to the peer's data channel.
    ChatUndelivered { peer: ParticipantId, id: u64 },
    /// The peer connection's event loop has ended: commands to it fail (webrtc 0.21 answers
    /// them with `SendError`) and it reports nothing more, so it must be rebuilt.
    PeerStopped { peer: ParticipantId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SdpKind {
    Offer,
    Answer,
}

/// What the signaling driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum SignalingCommand {
    /// Open the WebSocket (closing any old one first).
    Open,
    Send(ClientMessage),
    Close,
    /// The consultation lives in another region of the fleet: from now on (this join and
    /// every later reconnection) the signaling URL is this one; open the WebSocket there
    /// (closing the old one).
    OpenAt(String),
}

/// How many `redirect`s in a row a join follows before it gives up on them.
pub const MAX_REDIRECTS: u32 = 3;

/// The engine's peer id for the connection to the SFU (never a participant's: those are
/// server-made opaque ids, and this one is not one the server makes).
pub const SFU_PEER: &str = "~sfu";

/// The SFU connection's peer id.
pub fn sfu_peer() -> ParticipantId {
    ParticipantId(SFU_PEER.to_owned())
}

/// How many receive slots the SFU connection offers: every other participant of the largest
/// consultation the server admits by default (8).
pub const SFU_SLOTS: usize = 7;

/// What the media engine must do.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineCommand {
    /// Create the connection to the SFU ([`SFU_PEER`]): our tracks plus `slots` receive-only
    /// audio and video pairs, and an offer (as a `LocalDescription`).
    CreateSfu {
        ice_servers: Vec<IceServer>,
        slots: usize,
    },
    /// Which participant each SFU slot carries now.
    SetSfuLayout {
        slots: Vec<bedside_protocol::SfuSlot>,
    },
    /// Create a peer connection for `peer` with our tracks. An offerer then produces an offer
    /// (as [`EngineEvent::LocalDescription`]); an answerer waits for one.
    CreatePeer {
        peer: ParticipantId,
        offerer: bool,
        ice_servers: Vec<IceServer>,
    },
    /// Apply the remote description; for an offer, answer it (as a `LocalDescription`).
    SetRemoteDescription {
        peer: ParticipantId,
        kind: SdpKind,
        sdp: String,
    },
    AddRemoteCandidate {
        peer: ParticipantId,
        candidate: IceCandidate,
    },
    /// Gather fresh candidates and produce an offer with new ICE credentials.
    RestartIce {
        peer: ParticipantId,
    },
    ClosePeer {
        peer: ParticipantId,
    },
    SetMicrophoneMuted(bool),
    /// Send video or not (off while the camera is off or the call is audio-only).
    SetVideoSending(bool),
    /// Ask the peer for a keyframe (RTCP PLI): its video cannot be decoded.
    RequestKeyframeFrom {
        peer: ParticipantId,
    },
    /// Let audio packets carry the previous frame too (RED), to peers that negotiated it.
    SetAudioRedundancy(bool),
    /// Send a chat line on the peer's data channel.
    SendChat {
        peer: ParticipantId,
        id: u64,
        text: String,
    },
}

impl EngineCommand {
    /// The peer connection the command is for, if it is for one.
    pub fn peer(&self) -> Option<&ParticipantId> {
        match self {
            EngineCommand::CreatePeer { peer, .. }
            | EngineCommand::SetRemoteDescription { peer, .. }
            | EngineCommand::AddRemoteCandidate { peer, .. }
            | EngineCommand::RestartIce { peer }
            | EngineCommand::ClosePeer { peer }
            | EngineCommand::RequestKeyframeFrom { peer }
            | EngineCommand::SendChat { peer, .. } => Some(peer),
            EngineCommand::SetMicrophoneMuted(_)
            | EngineCommand::SetVideoSending(_)
            | EngineCommand::SetAudioRedundancy(_)
            | EngineCommand::CreateSfu { .. }
            | EngineCommand::SetSfuLayout { .. } => None,
        }
    }
}

/// What the encoder must do (the media pipeline owns it, not the WebRTC engine).
#[derive(Clone, Debug, PartialEq)]
pub enum MediaCommand {
    /// Send a keyframe now (a peer's media just connected, or a peer asked for one).
    Keyframe,
    /// Encode video at this size, frame rate and bitrate (the quality ladder moved).
    SetVideoEncoding {
        width: u32,
        height: u32,
        fps: u32,
        bitrate_kbps: u32,
    },
}

/// The call as the UI shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallState {
    Idle,
    /// Opening the link and entering the consultation for the first time.
    Joining,
    /// In the waiting room.
    Waiting,
    /// Admitted, nobody else is here yet.
    WaitingForPeers,
    /// Admitted, media being set up.
    Connecting,
    Connected,
    /// The signaling link or a peer's media is being restored.
    Reconnecting,
    Ended(EndReason),
}

/// Why a call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    Left,
    Denied,
    ConsultationEnded,
    /// The seat was resumed on another device.
    Replaced,
    /// The server refused our credentials (expired token, unknown invite code...).
    AuthFailed(ErrorCode),
    /// The consultation does not exist or is full.
    Refused(ErrorCode),
    /// The server could not be reached again within `give_up_after`.
    ConnectionLost,
}

/// Events for the UI.
#[derive(Clone, Debug, PartialEq)]
pub enum CallEvent {
    State(CallState),
    /// Who we are, once seated.
    Seated {
        participant_id: ParticipantId,
        role: Role,
    },
    WaitingRoom(Vec<WaitingPatient>),
    PeerJoined(Peer),
    PeerLeft {
        participant_id: ParticipantId,
        reason: LeaveReason,
    },
    /// The peer's signaling link dropped; its seat is held.
    PeerReconnecting(ParticipantId),
    PeerBack(ParticipantId),
    PeerMedia {
        participant_id: ParticipantId,
        state: PeerConnectionState,
    },
    MicrophoneMuted(bool),
    CameraEnabled(bool),
    /// Whether the call is audio-only now, and whether the user asked for it (`manual`) or the
    /// network forced it.
    AudioOnly {
        on: bool,
        manual: bool,
    },
    /// Call quality with one peer, about once a second.
    Stats {
        participant_id: ParticipantId,
        report: StatsReport,
    },
    /// A chat line: ours once it is on its way (`outgoing`), or a peer's. `id` counts the
    /// sender's lines.
    Chat {
        id: u64,
        from: ParticipantId,
        text: String,
        outgoing: bool,
    },
    /// Our chat line `id` did not reach `to` (or anyone, when `None`), and why.
    ChatNotDelivered {
        id: u64,
        to: Option<ParticipantId>,
        reason: String,
    },
    /// End-to-end encryption's safety code (`e2ee::safety_code`) changed: the participants
    /// compare it aloud. `None` while some participant's key is still missing.
    SafetyCode(Option<String>),
    /// The SFU's active speaker changed (`None`: nobody speaks).
    ActiveSpeaker(Option<ParticipantId>),
    /// A refusal that does not end the call (e.g. admitting someone who already left).
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Signaling(SignalingCommand),
    Engine(EngineCommand),
    Media(MediaCommand),
    Event(CallEvent),
}

#[derive(Clone, Debug)]
struct PeerConn {
    info: Peer,
    offerer: bool,
    media: PeerConnectionState,
    /// Set while an ICE restart is under way: rebuild the connection if still down by then.
    restart_deadline: Option<Instant>,
    /// A restart was wanted while signaling was down: do it once we are seated again.
    restart_pending: bool,
    /// The session id (`o=` line) of the peer's last description: an offer with another one
    /// comes from a new peer connection (a browser page reloaded, say), which ours cannot
    /// continue (new DTLS), so it is rebuilt to answer it.
    remote_session: Option<String>,
    /// When we last asked this peer for a keyframe.
    last_keyframe_request: Option<Instant>,
    /// Since when the peer's video has arrived undecodable with no frame shown (cleared by a
    /// statistics sample with frames decoded).
    undecodable_since: Option<Instant>,
    /// We rebuilt the connection as the offerer and wait for the answer: an offer from a new
    /// session of the peer meanwhile is glare (see the module docs).
    rebuilt_offer: bool,
}

/// The connection to the SFU.
#[derive(Clone, Debug)]
struct SfuConn {
    media: PeerConnectionState,
    restart_deadline: Option<Instant>,
    restart_pending: bool,
}

/// The session id of a session description's `o=` line.
fn sdp_session_id(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.strip_prefix("o="))
        .and_then(|o| o.split_whitespace().nth(1))
        .map(str::to_owned)
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Idle,
    /// Getting (back) to a seat. `open_at` is when to open the WebSocket next (`None` while an
    /// attempt is under way, until `deadline`).
    Connecting {
        attempt: u32,
        open_at: Option<Instant>,
        deadline: Option<Instant>,
        /// When the link was lost (or the first join began): bounds the whole effort.
        since: Instant,
        /// Send `resume` (true) or a full `join`.
        resume: bool,
        open: bool,
    },
    Seated {
        admitted: bool,
    },
    Leaving,
    Ended(EndReason),
}

/// The consultation's call logic. See the module documentation.
pub struct Call {
    config: CallConfig,
    rng: StdRng,
    phase: Phase,
    auth: Option<JoinAuth>,
    display_name: Option<String>,
    me: Option<(ParticipantId, Role)>,
    resume_token: Option<String>,
    /// Once a resume failed, later losses go straight to a full rejoin.
    escalated: bool,
    /// Whether our seat was admitted when we last heard.
    admitted: bool,
    ever_seated: bool,
    /// Redirects followed since we were last seated (bounded: two servers that each send
    /// the client to the other must not keep it going round).
    redirects: u32,
    ice_servers: Vec<IceServer>,
    peers: BTreeMap<ParticipantId, PeerConn>,
    last_heard: Option<Instant>,
    next_ping: Option<Instant>,
    ping_nonce: u64,
    muted: bool,
    camera: bool,
    /// Audio-only because the user asked.
    audio_only: bool,
    /// The app is in the background: no video.
    backgrounded: bool,
    quality: QualityController,
    /// Whether audio carries redundancy (RED).
    redundancy: AudioRedundancy,
    /// When we last asked the encoder for a keyframe because a peer requested one.
    last_keyframe: Option<Instant>,
    /// Our last chat line's id.
    chat_seq: u64,
    /// The server runs an SFU.
    sfu_available: bool,
    /// The connection to the SFU, once the call moved there.
    sfu: Option<SfuConn>,
    shown: CallState,
    out: VecDeque<Output>,
}

/// The one keyframe policy, both ways. Keyframe requests closer together than this share one
/// keyframe: a burst of PLIs after a loss (or one per peer in a group) must not turn the video
/// into a stream of keyframes. And while a peer's video cannot be decoded we ask it for a
/// keyframe at most this often (a lost request is repeated; a keyframe is about one round
/// trip away). The sender also forces a keyframe every 2 s (`pipeline::KEYFRAME_INTERVAL`),
/// so a receiver whose requests are all lost still recovers.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);

impl Call {
    /// A call that has not joined yet. `seed` feeds the backoff jitter.
    pub fn new(config: CallConfig, seed: u64) -> Self {
        Call {
            rng: StdRng::seed_from_u64(seed),
            last_keyframe: None,
            chat_seq: 0,
            sfu_available: false,
            sfu: None,
            backgrounded: false,
            phase: Phase::Idle,
            auth: None,
            display_name: None,
            me: None,
            resume_token: None,
            escalated: false,
            admitted: false,
            ever_seated: false,
            redirects: 0,
            ice_servers: Vec::new(),
            peers: BTreeMap::new(),
            last_heard: None,
            next_ping: None,
            ping_nonce: 0,
            muted: false,
            camera: true,
            audio_only: false,
            quality: QualityController::new(
                QualityConfig::default(),
                QualityController::top_rung_for(config.video_size.0, config.video_size.1),
            ),
            redundancy: AudioRedundancy::default(),
            shown: CallState::Idle,
            out: VecDeque::new(),
            config,
        }
    }

    /// The call as the UI shows it.
    pub fn state(&self) -> CallState {
        match &self.phase {
            Phase::Idle => CallState::Idle,
            Phase::Ended(reason) => CallState::Ended(reason.clone()),
            Phase::Connecting { .. } if !self.ever_seated => CallState::Joining,
            Phase::Connecting { .. } => CallState::Reconnecting,
            Phase::Leaving => self.shown.clone(),
            Phase::Seated { admitted: false } => CallState::Waiting,
            Phase::Seated { admitted: true } => {
                if self.peers.is_empty() {
                    CallState::WaitingForPeers
                } else if self
                    .peers
                    .values()
                    .all(|p| p.media == PeerConnectionState::Connected)
                {
                    CallState::Connected
                } else if self.peers.values().any(|p| p.restart_deadline.is_some()) {
                    CallState::Reconnecting
                } else {
                    CallState::Connecting
                }
            }
        }
    }

    pub fn participant_id(&self) -> Option<&ParticipantId> {
        self.me.as_ref().map(|(p, _)| p)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values().map(|p| &p.info)
    }

    /// Whether no video is sent for lack of bandwidth or by the user's choice.
    pub fn is_audio_only(&self) -> bool {
        self.audio_only || self.quality.target() == VideoTarget::AudioOnly
    }

    fn video_sending(&self) -> bool {
        self.camera && !self.is_audio_only() && !self.backgrounded
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Call::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match &self.phase {
            Phase::Connecting {
                open_at, deadline, ..
            } => {
                consider(*open_at);
                consider(*deadline);
            }
            Phase::Seated { .. } | Phase::Leaving => {
                consider(self.next_ping);
                consider(
                    self.last_heard
                        .map(|h| h + self.config.signaling_dead_after),
                );
            }
            Phase::Idle | Phase::Ended(_) => {}
        }
        if !matches!(self.phase, Phase::Ended(_)) {
            for p in self.peers.values() {
                consider(p.restart_deadline);
            }
        }
        t
    }

    pub fn handle_user(&mut self, now: Instant, cmd: UserCommand) {
        match cmd {
            UserCommand::Join { auth, display_name } => {
                if matches!(self.phase, Phase::Idle | Phase::Ended(_)) {
                    self.auth = Some(auth);
                    self.display_name = display_name;
                    self.escalated = false;
                    self.ever_seated = false;
                    self.phase = Phase::Connecting {
                        attempt: 0,
                        open_at: Some(now),
                        deadline: None,
                        since: now,
                        resume: false,
                        open: false,
                    };
                }
            }
            UserCommand::Admit(pid) => self.send(ClientMessage::Admit {
                participant_id: pid,
            }),
            UserCommand::Deny(pid) => self.send(ClientMessage::Deny {
                participant_id: pid,
            }),
            UserCommand::SetMicrophoneMuted(m) => {
                self.muted = m;
                self.engine(EngineCommand::SetMicrophoneMuted(m));
                self.event(CallEvent::MicrophoneMuted(m));
            }
            UserCommand::SetCameraEnabled(on) => {
                self.camera = on;
                self.engine(EngineCommand::SetVideoSending(self.video_sending()));
                self.event(CallEvent::CameraEnabled(on));
            }
            UserCommand::SetAudioOnly(on) => {
                self.audio_only = on;
                self.engine(EngineCommand::SetVideoSending(self.video_sending()));
                self.event(CallEvent::AudioOnly {
                    on: self.is_audio_only(),
                    manual: on,
                });
            }
            UserCommand::NetworkChanged => {
                if let Phase::Seated { .. } = self.phase {
                    // The old link is bound to an address that is gone: do not wait for the
                    // keepalive to notice. Resume at once, and restart ICE meanwhile.
                    self.signaling(SignalingCommand::Close);
                    self.lost_signaling(now, true);
                }
                let peers: Vec<_> = self.peers.keys().cloned().collect();
                for peer in peers {
                    self.restart_ice(now, &peer);
                }
                // Through the SFU the one connection to restart is the SFU's (once the seat
                // is resumed: the restart's offer goes over signaling). Without this the
                // call waited for ICE to notice the dead path, seconds of frozen media.
                if self.sfu.is_some() {
                    self.restart_sfu(now);
                }
            }
            UserCommand::SetBackgrounded(on) => {
                if on != self.backgrounded {
                    self.backgrounded = on;
                    self.engine(EngineCommand::SetVideoSending(self.video_sending()));
                    if !on && matches!(self.phase, Phase::Seated { .. }) {
                        // Ping now: a link that died while the app was suspended is found out
                        // by the keepalive in seconds rather than at the next ping.
                        self.next_ping = Some(now);
                    }
                }
            }
            UserCommand::SendChat(text) => self.send_chat(text),
            UserCommand::Leave => match self.phase {
                Phase::Seated { .. } => {
                    self.send(ClientMessage::Leave);
                    self.phase = Phase::Leaving;
                }
                Phase::Idle | Phase::Ended(_) | Phase::Leaving => {}
                Phase::Connecting { .. } => {
                    self.signaling(SignalingCommand::Close);
                    self.end(EndReason::Left);
                }
            },
        }
        self.update_state();
    }

    pub fn handle_signaling(&mut self, now: Instant, event: SignalingEvent) {
        match event {
            SignalingEvent::Opened => {
                if let Phase::Connecting {
                    open: open @ false,
                    resume,
                    ..
                } = &mut self.phase
                {
                    *open = true;
                    let resume = *resume;
                    self.last_heard = Some(now);
                    let msg = match (&self.resume_token, resume) {
                        (Some(token), true) => ClientMessage::Resume {
                            protocol_version: PROTOCOL_VERSION,
                            resume_token: token.clone(),
                        },
                        _ => ClientMessage::Join {
                            protocol_version: PROTOCOL_VERSION,
                            auth: self.auth.clone().expect("joining without auth"),
                            display_name: self.display_name.clone(),
                        },
                    };
                    self.signaling(SignalingCommand::Send(msg));
                }
            }
            SignalingEvent::Message(msg) => {
                self.last_heard = Some(now);
                self.on_message(now, msg);
            }
            SignalingEvent::Closed(code) => self.on_closed(now, Some(code)),
            SignalingEvent::Failed => self.on_closed(now, None),
        }
        self.update_state();
    }

    pub fn handle_engine(&mut self, now: Instant, event: EngineEvent) {
        match event {
            EngineEvent::LocalDescription { peer, kind, sdp } if peer.0 == SFU_PEER => {
                if self.sfu.is_some() && kind == SdpKind::Offer {
                    self.send(ClientMessage::SfuOffer { sdp });
                }
            }
            EngineEvent::LocalCandidate { peer, candidate } if peer.0 == SFU_PEER => {
                if self.sfu.is_some() {
                    self.send(ClientMessage::SfuCandidate { candidate });
                }
            }
            EngineEvent::ConnectionState { peer, state } if peer.0 == SFU_PEER => {
                self.sfu_state(now, state);
            }
            EngineEvent::KeyframeRequested { peer } if peer.0 == SFU_PEER => {
                let recent = self
                    .last_keyframe
                    .is_some_and(|at| now.duration_since(at) < KEYFRAME_REQUEST_INTERVAL);
                if self.sfu.is_some() && self.video_sending() && !recent {
                    self.last_keyframe = Some(now);
                    self.media(MediaCommand::Keyframe);
                }
            }
            // The mesh's connections, closing after the move to the SFU.
            EngineEvent::ConnectionState { .. }
            | EngineEvent::KeyframeRequested { .. }
            | EngineEvent::LocalDescription { .. }
            | EngineEvent::LocalCandidate { .. }
                if self.sfu.is_some() => {}
            EngineEvent::LocalDescription { peer, kind, sdp } => {
                if self.peers.contains_key(&peer) {
                    self.send(match kind {
                        SdpKind::Offer => ClientMessage::Offer { to: peer, sdp },
                        SdpKind::Answer => ClientMessage::Answer { to: peer, sdp },
                    });
                }
            }
            EngineEvent::LocalCandidate { peer, candidate } => {
                if self.peers.contains_key(&peer) {
                    self.send(ClientMessage::IceCandidate {
                        to: peer,
                        candidate,
                    });
                }
            }
            EngineEvent::ConnectionState { peer, state } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.media == state {
                    return;
                }
                p.media = state;
                self.event(CallEvent::PeerMedia {
                    participant_id: peer.clone(),
                    state,
                });
                match state {
                    PeerConnectionState::Connected => {
                        let p = self.peers.get_mut(&peer).expect("present");
                        p.restart_deadline = None;
                        p.restart_pending = false;
                        p.undecodable_since = None;
                        self.media(MediaCommand::Keyframe);
                    }
                    PeerConnectionState::Disconnected | PeerConnectionState::Failed
                        if self.peers[&peer].restart_deadline.is_none() =>
                    {
                        self.restart_ice(now, &peer);
                    }
                    _ => {}
                }
            }
            EngineEvent::KeyframeRequested { peer } => {
                let recent = self
                    .last_keyframe
                    .is_some_and(|at| now.duration_since(at) < KEYFRAME_REQUEST_INTERVAL);
                if self.peers.contains_key(&peer) && self.video_sending() && !recent {
                    self.last_keyframe = Some(now);
                    self.media(MediaCommand::Keyframe);
                }
            }
            EngineEvent::KeyframeNeeded { peer } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    let since = *p.undecodable_since.get_or_insert(now);
                    if p.media == PeerConnectionState::Connected
                        && now.duration_since(since) >= self.config.frozen_video_rebuild_after
                    {
                        tracing::warn!(
                            frozen_ms = now.duration_since(since).as_millis() as u64,
                            "a peer's video stayed undecodable despite keyframe requests: \
                             rebuilding its connection"
                        );
                        self.rebuild_as_offerer(now, &peer);
                        self.update_state();
                        return;
                    }
                    let due = p
                        .last_keyframe_request
                        .is_none_or(|at| now.duration_since(at) >= KEYFRAME_REQUEST_INTERVAL);
                    if due {
                        p.last_keyframe_request = Some(now);
                        self.engine(EngineCommand::RequestKeyframeFrom { peer });
                    }
                }
            }
            EngineEvent::PeerStopped { peer } => {
                if self.peers.contains_key(&peer) {
                    tracing::warn!("a peer connection's event loop ended: rebuilding it");
                    self.rebuild_as_offerer(now, &peer);
                }
            }
            EngineEvent::ChatReceived { peer, id, text } => {
                if self.peers.contains_key(&peer) {
                    self.event(CallEvent::Chat {
                        id,
                        from: peer,
                        text,
                        outgoing: false,
                    });
                }
            }
            EngineEvent::ChatUndelivered { peer, id } => {
                self.event(CallEvent::ChatNotDelivered {
                    id,
                    to: Some(peer),
                    reason: "their connection dropped before it was sent".into(),
                });
            }
        }
        self.update_state();
    }

    /// Hands a chat line to every peer whose media is connected (their data channels are
    /// open), or says why it cannot go.
    fn send_chat(&mut self, text: String) {
        self.chat_seq += 1;
        let id = self.chat_seq;
        let not_delivered = |reason: String| CallEvent::ChatNotDelivered {
            id,
            to: None,
            reason,
        };
        if let Err(e) = bedside_protocol::chat::check_chat_text(&text) {
            self.event(not_delivered(e.to_string()));
            return;
        }
        let Some((me, _)) = self.me.clone().filter(|_| self.admitted) else {
            self.event(not_delivered("not in the consultation yet".into()));
            return;
        };
        let connected: Vec<ParticipantId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.media == PeerConnectionState::Connected)
            .map(|(id, _)| id.clone())
            .collect();
        if connected.is_empty() {
            self.event(not_delivered("nobody is connected to receive it".into()));
            return;
        }
        for peer in connected {
            self.engine(EngineCommand::SendChat {
                peer,
                id,
                text: text.clone(),
            });
        }
        self.event(CallEvent::Chat {
            id,
            from: me,
            text,
            outgoing: true,
        });
    }

    /// A call-quality sample for one peer from the driver: shown to the UI and sent on to the
    /// server as telemetry.
    ///
    /// Through the SFU the one connection is the SFU's ([`SFU_PEER`]): its sample (round trip,
    /// loss, candidate pair and transport of this client's own link) is reported like a
    /// peer's. It was once dropped, and a group consult reported no quality at all.
    pub fn handle_stats(&mut self, now: Instant, peer: ParticipantId, mut report: StatsReport) {
        let media = if peer.0 == SFU_PEER {
            let Some(sfu) = &self.sfu else {
                return;
            };
            sfu.media
        } else {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            if report.video_received.as_ref().is_some_and(|v| v.fps > 0.0) {
                p.undecodable_since = None;
            }
            p.media
        };
        if let Some(on) = report
            .loss_out_pct
            .and_then(|loss| self.redundancy.handle_loss(now, loss))
        {
            self.engine(EngineCommand::SetAudioRedundancy(on));
        }
        report.audio_only = Some(self.is_audio_only());
        report.connection_state = Some(format!("{media:?}").to_lowercase());
        self.event(CallEvent::Stats {
            participant_id: peer,
            report: report.clone(),
        });
        if matches!(self.phase, Phase::Seated { admitted: true }) {
            self.send(ClientMessage::Stats { report });
        }
    }

    /// The congestion controller's bandwidth estimate for what we send, kbps.
    pub fn handle_bandwidth(&mut self, now: Instant, estimate_kbps: u32) {
        if let Some(on) = self.redundancy.handle_estimate(now, estimate_kbps) {
            self.engine(EngineCommand::SetAudioRedundancy(on));
        }
        let was_audio_only = self.is_audio_only();
        let Some(target) = self.quality.handle_estimate(now, estimate_kbps) else {
            return;
        };
        if let VideoTarget::Video { rung, bitrate_kbps } = target {
            let r = LADDER[rung];
            self.media(MediaCommand::SetVideoEncoding {
                width: r.width,
                height: r.height,
                fps: r.fps,
                bitrate_kbps,
            });
        }
        if self.is_audio_only() != was_audio_only {
            self.engine(EngineCommand::SetVideoSending(self.video_sending()));
            self.event(CallEvent::AudioOnly {
                on: self.is_audio_only(),
                manual: self.audio_only,
            });
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase.clone() {
            Phase::Connecting {
                attempt,
                open_at,
                deadline,
                since,
                resume,
                ..
            } => {
                if open_at.is_some_and(|t| now >= t) {
                    self.open_attempt(now, SignalingCommand::Open, attempt, since, resume);
                } else if deadline.is_some_and(|t| now >= t) {
                    self.signaling(SignalingCommand::Close);
                    self.retry(now);
                }
            }
            Phase::Seated { .. } | Phase::Leaving => {
                if self
                    .last_heard
                    .is_some_and(|h| now >= h + self.config.signaling_dead_after)
                {
                    self.signaling(SignalingCommand::Close);
                    if self.phase == Phase::Leaving {
                        self.end(EndReason::Left);
                    } else {
                        self.lost_signaling(now, false);
                    }
                } else if self.next_ping.is_some_and(|t| now >= t) {
                    self.ping_nonce += 1;
                    self.send(ClientMessage::Ping {
                        nonce: self.ping_nonce,
                    });
                    self.next_ping = Some(now + self.config.ping_interval);
                }
            }
            Phase::Idle | Phase::Ended(_) => {}
        }
        let expired: Vec<ParticipantId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.restart_deadline.is_some_and(|t| now >= t))
            .map(|(id, _)| id.clone())
            .collect();
        for peer in expired {
            self.rebuild_peer(now, &peer);
        }
        if self
            .sfu
            .as_ref()
            .is_some_and(|s| s.restart_deadline.is_some_and(|t| now >= t))
        {
            self.restart_sfu(now);
        }
        self.update_state();
    }

    fn on_message(&mut self, now: Instant, msg: ServerMessage) {
        match msg {
            ServerMessage::Joined {
                participant_id,
                role,
                resume_token,
                resumed,
                ..
            } => {
                if !resumed {
                    // A new seat: every old peer connection belonged to the old one.
                    self.close_all_peers();
                }
                self.me = Some((participant_id.clone(), role));
                self.resume_token = Some(resume_token);
                self.ever_seated = true;
                self.redirects = 0;
                // A resumed seat keeps its admission (the server confirms it next): the call
                // does not flash through the waiting room on every reconnect.
                self.admitted &= resumed;
                self.phase = Phase::Seated {
                    admitted: self.admitted,
                };
                self.next_ping = Some(now + self.config.ping_interval);
                self.event(CallEvent::Seated {
                    participant_id,
                    role,
                });
            }
            ServerMessage::Waiting => {
                self.admitted = false;
                self.phase = Phase::Seated { admitted: false };
            }
            ServerMessage::Admitted {
                peers,
                ice_servers,
                sfu,
            } => {
                self.sfu_available = sfu;
                self.admitted = true;
                self.phase = Phase::Seated { admitted: true };
                self.ice_servers = ice_servers;
                // Peers we had that are gone now left while we were away.
                let listed: Vec<ParticipantId> =
                    peers.iter().map(|p| p.participant_id.clone()).collect();
                let stale: Vec<ParticipantId> = self
                    .peers
                    .keys()
                    .filter(|id| !listed.contains(id))
                    .cloned()
                    .collect();
                for id in stale {
                    self.remove_peer(&id, LeaveReason::Left);
                }
                // We were admitted after everyone listed: we offer to each.
                for peer in peers {
                    let id = peer.participant_id.clone();
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.info = peer;
                        if p.restart_pending {
                            self.restart_ice(now, &id);
                        }
                    } else {
                        // Someone already in the consultation: the UI hears of them as it does
                        // of anyone who joins later.
                        self.event(CallEvent::PeerJoined(peer.clone()));
                        self.add_peer(peer, true);
                    }
                }
                if let Some(s) = &self.sfu
                    && s.restart_pending
                {
                    self.restart_sfu(now);
                }
                self.update_mode(now);
            }
            ServerMessage::Denied => self.end(EndReason::Denied),
            ServerMessage::WaitingRoom { waiting } => self.event(CallEvent::WaitingRoom(waiting)),
            ServerMessage::PeerJoined { peer } => {
                if !self.peers.contains_key(&peer.participant_id) {
                    self.event(CallEvent::PeerJoined(peer.clone()));
                    self.add_peer(peer, false);
                }
                self.update_mode(now);
            }
            ServerMessage::PeerLeft {
                participant_id,
                reason,
            } => self.remove_peer(&participant_id, reason),
            ServerMessage::PeerReconnecting { participant_id } => {
                if let Some(p) = self.peers.get_mut(&participant_id) {
                    p.info.connected = false;
                    self.event(CallEvent::PeerReconnecting(participant_id));
                }
            }
            ServerMessage::PeerBack { participant_id } => {
                if let Some(p) = self.peers.get_mut(&participant_id) {
                    p.info.connected = true;
                    self.event(CallEvent::PeerBack(participant_id));
                }
            }
            // On the SFU, peers' own offers belong to the mesh we left (a race with the move).
            ServerMessage::Offer { .. } if self.sfu.is_some() => {}
            ServerMessage::Offer { from, sdp } => {
                if !self.peers.contains_key(&from) {
                    // An offer from someone we were not told about (a race with peer_joined).
                    let peer = Peer {
                        participant_id: from.clone(),
                        role: Role::Clinician,
                        display_name: None,
                        connected: true,
                    };
                    self.add_peer(peer, false);
                }
                let session = sdp_session_id(&sdp);
                let we_win_glare = self.participant_id().is_some_and(|me| *me < from);
                if let Some(p) = self.peers.get_mut(&from) {
                    let new_connection = p.remote_session.is_some() && session != p.remote_session;
                    if new_connection && p.rebuilt_offer && we_win_glare {
                        // Both rebuilt at once: our offer stands, theirs is dropped (they
                        // answer ours, seeing it come from a new session too).
                        return;
                    }
                    p.remote_session = session;
                    if new_connection {
                        p.offerer = false;
                        p.rebuilt_offer = false;
                        p.media = PeerConnectionState::New;
                        p.restart_deadline = None;
                        self.engine(EngineCommand::ClosePeer { peer: from.clone() });
                        self.engine(EngineCommand::CreatePeer {
                            peer: from.clone(),
                            offerer: false,
                            ice_servers: self.ice_servers.clone(),
                        });
                    }
                }
                self.engine(EngineCommand::SetRemoteDescription {
                    peer: from,
                    kind: SdpKind::Offer,
                    sdp,
                });
            }
            ServerMessage::Answer { from, sdp } => {
                if let Some(p) = self.peers.get_mut(&from) {
                    p.remote_session = sdp_session_id(&sdp);
                    p.rebuilt_offer = false;
                    self.engine(EngineCommand::SetRemoteDescription {
                        peer: from,
                        kind: SdpKind::Answer,
                        sdp,
                    });
                }
            }
            ServerMessage::IceCandidate { from, candidate } => {
                if self.peers.contains_key(&from) {
                    self.engine(EngineCommand::AddRemoteCandidate {
                        peer: from,
                        candidate,
                    });
                }
            }
            ServerMessage::IceRestart { from } => {
                if self.peers.get(&from).is_some_and(|p| p.offerer) {
                    self.restart_ice(now, &from);
                }
            }
            ServerMessage::IceServers { ice_servers } => self.ice_servers = ice_servers,
            // The driver hands these to its `e2ee::Session`: keys are not the call's business.
            ServerMessage::E2ee { .. } => {}
            ServerMessage::Ended { .. } => self.end(EndReason::ConsultationEnded),
            ServerMessage::Error { code, message, .. } => self.on_error(now, code, message),
            ServerMessage::Ping { nonce } => self.send(ClientMessage::Pong { nonce }),
            ServerMessage::Pong { .. } => {}
            ServerMessage::SfuAnswer { sdp } => {
                if self.sfu.is_some() {
                    self.engine(EngineCommand::SetRemoteDescription {
                        peer: sfu_peer(),
                        kind: SdpKind::Answer,
                        sdp,
                    });
                }
            }
            ServerMessage::SfuLayout { slots } => {
                if self.sfu.is_some() {
                    self.engine(EngineCommand::SetSfuLayout { slots });
                }
            }
            // The UI's grid shows the speaker large; the call itself does nothing with it.
            ServerMessage::ActiveSpeaker { participant_id } => {
                self.event(CallEvent::ActiveSpeaker(participant_id))
            }
            ServerMessage::Redirect { url, .. } => self.redirect(now, url),
        }
    }

    /// The server we reached is not in the consultation's region: send the same `join` or
    /// `resume` to the region it names, at once, as part of the same attempt. Only while
    /// joining, only to a WebSocket URL, and at most [`MAX_REDIRECTS`] times in a row; otherwise
    /// it is ignored and the `error` the server sends after it ends or retries the attempt.
    fn redirect(&mut self, now: Instant, url: String) {
        let Phase::Connecting {
            attempt,
            since,
            resume,
            ..
        } = self.phase
        else {
            return;
        };
        let websocket = url.starts_with("wss://") || url.starts_with("ws://");
        if !websocket || self.redirects >= MAX_REDIRECTS {
            return;
        }
        self.redirects += 1;
        self.open_attempt(now, SignalingCommand::OpenAt(url), attempt, since, resume);
    }

    /// Opens the link for an attempt (`open`: where to) and gives it the join deadline.
    fn open_attempt(
        &mut self,
        now: Instant,
        open: SignalingCommand,
        attempt: u32,
        since: Instant,
        resume: bool,
    ) {
        self.signaling(open);
        self.phase = Phase::Connecting {
            attempt,
            open_at: None,
            deadline: Some(now + self.config.join_timeout),
            since,
            resume,
            open: false,
        };
    }

    fn on_error(&mut self, now: Instant, code: ErrorCode, message: String) {
        let joining = matches!(self.phase, Phase::Connecting { .. });
        match code {
            ErrorCode::ResumeExpired if joining => {
                // The seat is gone: rejoin from the start, and stay escalated.
                self.escalated = true;
                self.close_all_peers();
                if let Phase::Connecting { resume, .. } = &mut self.phase {
                    *resume = false;
                }
                self.signaling(SignalingCommand::Send(ClientMessage::Join {
                    protocol_version: PROTOCOL_VERSION,
                    auth: self.auth.clone().expect("seated calls have auth"),
                    display_name: self.display_name.clone(),
                }));
            }
            ErrorCode::InvalidToken | ErrorCode::TokenExpired | ErrorCode::InvalidInviteCode
                if joining =>
            {
                self.signaling(SignalingCommand::Close);
                self.end(EndReason::AuthFailed(code));
            }
            ErrorCode::ConsultationNotFound
            | ErrorCode::ConsultationFull
            | ErrorCode::UnsupportedVersion
                if joining =>
            {
                self.signaling(SignalingCommand::Close);
                self.end(EndReason::Refused(code));
            }
            ErrorCode::RateLimited | ErrorCode::Internal if joining => {
                self.signaling(SignalingCommand::Close);
                self.retry(now);
            }
            _ => self.event(CallEvent::Error { code, message }),
        }
    }

    fn on_closed(&mut self, now: Instant, code: Option<u16>) {
        match (&self.phase, code) {
            (Phase::Idle | Phase::Ended(_), _) => {}
            (Phase::Leaving, _) => self.end(EndReason::Left),
            (_, Some(close_code::DENIED)) => self.end(EndReason::Denied),
            (_, Some(close_code::ENDED)) => self.end(EndReason::ConsultationEnded),
            (_, Some(close_code::REPLACED)) => self.end(EndReason::Replaced),
            (Phase::Connecting { .. }, _) => self.retry(now),
            (Phase::Seated { .. }, _) => self.lost_signaling(now, false),
        }
    }

    /// The seat's link is gone: try to get it back (resume unless escalated).
    fn lost_signaling(&mut self, now: Instant, immediately: bool) {
        let delay = if immediately {
            Duration::ZERO
        } else {
            self.config.backoff.delay(0, &mut self.rng)
        };
        self.phase = Phase::Connecting {
            attempt: 0,
            open_at: Some(now + delay),
            deadline: None,
            since: now,
            resume: !self.escalated && self.resume_token.is_some(),
            open: false,
        };
        self.next_ping = None;
    }

    /// One attempt failed: wait and try again, unless it is time to give up.
    fn retry(&mut self, now: Instant) {
        let Phase::Connecting {
            attempt,
            since,
            resume,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        if now.duration_since(since) >= self.config.give_up_after {
            self.end(EndReason::ConnectionLost);
            return;
        }
        let attempt = attempt + 1;
        let delay = self.config.backoff.delay(attempt, &mut self.rng);
        self.phase = Phase::Connecting {
            attempt,
            open_at: Some(now + delay),
            deadline: None,
            since,
            resume,
            open: false,
        };
    }

    fn add_peer(&mut self, info: Peer, offerer: bool) {
        let id = info.participant_id.clone();
        self.peers.insert(
            id.clone(),
            PeerConn {
                info,
                offerer,
                media: PeerConnectionState::New,
                restart_deadline: None,
                restart_pending: false,
                remote_session: None,
                last_keyframe_request: None,
                undecodable_since: None,
                rebuilt_offer: false,
            },
        );
        if let Some(sfu) = &self.sfu {
            // On the SFU: the newcomer's media arrives in a slot, with the SFU's state.
            let state = sfu.media;
            self.peers.get_mut(&id).expect("inserted").media = state;
            return;
        }
        self.engine(EngineCommand::CreatePeer {
            peer: id,
            offerer,
            ice_servers: self.ice_servers.clone(),
        });
    }

    /// Moves the call to the SFU when the server has one and two or more others are admitted.
    fn update_mode(&mut self, now: Instant) {
        let _ = now;
        if self.sfu.is_some() || !self.sfu_available || self.peers.len() < 2 {
            return;
        }
        if !matches!(self.phase, Phase::Seated { admitted: true }) {
            return;
        }
        for (id, p) in self.peers.iter_mut() {
            p.media = PeerConnectionState::New;
            p.restart_deadline = None;
            p.restart_pending = false;
            p.remote_session = None;
            self.out.push_back(Output::Engine(EngineCommand::ClosePeer {
                peer: id.clone(),
            }));
        }
        self.sfu = Some(SfuConn {
            media: PeerConnectionState::New,
            restart_deadline: None,
            restart_pending: false,
        });
        self.engine(EngineCommand::CreateSfu {
            ice_servers: self.ice_servers.clone(),
            slots: SFU_SLOTS,
        });
    }

    /// The SFU connection's state changed: every peer's media follows it.
    fn sfu_state(&mut self, now: Instant, state: PeerConnectionState) {
        let Some(sfu) = self.sfu.as_mut() else {
            return;
        };
        if sfu.media == state {
            return;
        }
        sfu.media = state;
        let ids: Vec<ParticipantId> = self.peers.keys().cloned().collect();
        for id in ids {
            self.peers.get_mut(&id).expect("listed").media = state;
            self.event(CallEvent::PeerMedia {
                participant_id: id,
                state,
            });
        }
        match state {
            PeerConnectionState::Connected => {
                let sfu = self.sfu.as_mut().expect("checked");
                sfu.restart_deadline = None;
                sfu.restart_pending = false;
                self.media(MediaCommand::Keyframe);
            }
            PeerConnectionState::Disconnected | PeerConnectionState::Failed
                if self
                    .sfu
                    .as_ref()
                    .is_some_and(|s| s.restart_deadline.is_none()) =>
            {
                self.restart_sfu(now);
            }
            _ => {}
        }
    }

    /// Restarts ICE with the SFU (we are always its offerer), or, past the deadline of a
    /// restart that did not recover, rebuilds the connection.
    fn restart_sfu(&mut self, now: Instant) {
        let seated = matches!(self.phase, Phase::Seated { admitted: true });
        let timeout = self.config.ice_restart_timeout;
        let Some(sfu) = self.sfu.as_mut() else {
            return;
        };
        let rebuild = sfu.restart_deadline.is_some_and(|t| now >= t);
        sfu.restart_deadline = Some(now + timeout);
        if !seated {
            sfu.restart_pending = true;
            return;
        }
        sfu.restart_pending = false;
        if rebuild {
            sfu.media = PeerConnectionState::New;
            self.engine(EngineCommand::ClosePeer { peer: sfu_peer() });
            self.engine(EngineCommand::CreateSfu {
                ice_servers: self.ice_servers.clone(),
                slots: SFU_SLOTS,
            });
        } else {
            self.engine(EngineCommand::RestartIce { peer: sfu_peer() });
        }
    }

    fn remove_peer(&mut self, id: &ParticipantId, reason: LeaveReason) {
        if self.peers.remove(id).is_some() {
            self.engine(EngineCommand::ClosePeer { peer: id.clone() });
            self.event(CallEvent::PeerLeft {
                participant_id: id.clone(),
                reason,
            });
        }
    }

    fn close_all_peers(&mut self) {
        if self.sfu.take().is_some() {
            self.engine(EngineCommand::ClosePeer { peer: sfu_peer() });
        }
        let ids: Vec<_> = self.peers.keys().cloned().collect();
        for id in ids {
            self.remove_peer(&id, LeaveReason::Left);
        }
    }

    /// Restarts ICE with a peer: the offerer does it, the answerer asks the offerer to.
    fn restart_ice(&mut self, now: Instant, peer: &ParticipantId) {
        if self.sfu.is_some() {
            return;
        }
        let seated = matches!(self.phase, Phase::Seated { admitted: true });
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.restart_deadline = Some(now + self.config.ice_restart_timeout);
        if !seated {
            p.restart_pending = true;
            return;
        }
        p.restart_pending = false;
        if p.offerer {
            self.engine(EngineCommand::RestartIce { peer: peer.clone() });
        } else {
            self.send(ClientMessage::IceRestart { to: peer.clone() });
        }
    }

    /// An ICE restart did not bring the peer back in time: start over with a new connection.
    fn rebuild_peer(&mut self, now: Instant, peer: &ParticipantId) {
        if self.sfu.is_some() {
            return;
        }
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.restart_deadline = Some(now + self.config.ice_restart_timeout);
        if !matches!(self.phase, Phase::Seated { admitted: true }) {
            p.restart_pending = true;
            return;
        }
        let offerer = p.offerer;
        p.media = PeerConnectionState::New;
        self.engine(EngineCommand::ClosePeer { peer: peer.clone() });
        self.engine(EngineCommand::CreatePeer {
            peer: peer.clone(),
            offerer,
            ice_servers: self.ice_servers.clone(),
        });
    }

    /// The connection with `peer` stopped (see the module docs): rebuild it, offering.
    fn rebuild_as_offerer(&mut self, now: Instant, peer: &ParticipantId) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.offerer = true;
        p.rebuilt_offer = true;
        p.undecodable_since = None;
        self.rebuild_peer(now, peer);
    }

    fn end(&mut self, reason: EndReason) {
        if self.sfu.take().is_some() {
            self.engine(EngineCommand::ClosePeer { peer: sfu_peer() });
        }
        let ids: Vec<_> = self.peers.keys().cloned().collect();
        for id in ids {
            self.engine(EngineCommand::ClosePeer { peer: id });
        }
        self.peers.clear();
        self.next_ping = None;
        self.phase = Phase::Ended(reason);
    }

    fn send(&mut self, msg: ClientMessage) {
        // Messages while the link is down are dropped: what matters is renegotiated after the
        // resume (an ICE restart brings fresh candidates).
        if matches!(self.phase, Phase::Seated { .. }) {
            self.signaling(SignalingCommand::Send(msg));
        }
    }

    fn signaling(&mut self, cmd: SignalingCommand) {
        self.out.push_back(Output::Signaling(cmd));
    }

    fn engine(&mut self, cmd: EngineCommand) {
        self.out.push_back(Output::Engine(cmd));
    }

    fn media(&mut self, cmd: MediaCommand) {
        self.out.push_back(Output::Media(cmd));
    }

    fn event(&mut self, event: CallEvent) {
        self.out.push_back(Output::Event(event));
    }

    fn update_state(&mut self) {
        let state = self.state();
        if state != self.shown {
            self.shown = state.clone();
            self.event(CallEvent::State(state));
        }
    }
}

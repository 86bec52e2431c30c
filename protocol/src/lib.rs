//! Bedside signaling wire types, shared by `bedside-server` and the clients.
//!
//! Every message is one JSON object in one WebSocket text frame, tagged by its `"type"` field
//! (`snake_case`). The protocol is versioned: a client states [`PROTOCOL_VERSION`] in its
//! [`ClientMessage::Join`] or [`ClientMessage::Resume`], and the server refuses versions it does
//! not speak with [`ErrorCode::UnsupportedVersion`]. Inside one version, fields are only ever
//! added, never renamed or removed, and receivers ignore fields they do not know; this is what the
//! fixtures in `tests/fixtures/` hold the crate to.
//!
//! ## The flow of a consultation
//! 1. A client opens the WebSocket and sends `join` (with a signed token, or with the patient's
//!    invite code) or `resume` (with the resume token of a seat it held before its link dropped).
//! 2. The server answers `joined` (the participant's id, role and resume token), then either
//!    `admitted` (doctors and clinicians, and patients once a doctor admits them) or `waiting`
//!    (patients in the waiting room). Doctors receive `waiting_room` whenever it changes.
//! 3. Admitted participants exchange `offer`, `answer`, `ice_candidate` and `ice_restart`, each
//!    addressed to one peer (`to`) and delivered with the sender's id (`from`). By convention the
//!    participant who is admitted later sends the offer to each peer listed in its `admitted`.
//!    With end-to-end encryption on, they also exchange `e2ee` messages ([`E2eeMessage`]) the
//!    same way.
//! 4. A group consultation (three or more admitted) goes through the server's SFU when
//!    `admitted` said `sfu: true`: each client sends `sfu_offer` (its upstream audio and video,
//!    then pairs of receive-only audio and video *slots*), gets `sfu_answer`, trickles
//!    `sfu_candidate`, and learns from `sfu_layout` which participant each slot carries and from
//!    `active_speaker` who speaks. `sfu_leave` goes back to peer to peer (two left). The SFU
//!    forwards what it receives without reading the media payloads.
//! 5. A fleet of several regions (cells): a `join` or `resume` that reaches a server of another
//!    region than the consultation's is answered with `redirect` (that region's signaling URL);
//!    the client opens the WebSocket there and sends the same message again.
//! 6. When a participant's link drops, its seat is kept for the rejoin window and the others see
//!    `peer_reconnecting`; a `resume` inside the window brings `peer_back`, otherwise they see
//!    `peer_left`.
//!
//! Anything the server cannot accept is answered with an [`ServerMessage::Error`] carrying a stable
//! [`ErrorCode`]; the connection stays open. Only a frame over [`MAX_MESSAGE_BYTES`] closes it,
//! with [`close_code::MESSAGE_TOO_BIG`].

use std::fmt;

pub mod chat;
pub mod quality;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest text frame either side accepts (session descriptions are the large messages,
/// typically 3 to 10 KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// WebSocket close codes used by Bedside (RFC 6455 codes and the 4000-4999 private range).
pub mod close_code {
    /// The participant left, or the server is done with the connection.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; resume once it is back.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame was larger than [`crate::MAX_MESSAGE_BYTES`].
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// No `join` or `resume` arrived in time after the connection opened.
    pub const JOIN_TIMEOUT: u16 = 4000;
    /// The doctor denied admission from the waiting room.
    pub const DENIED: u16 = 4003;
    /// The same seat was resumed on another connection; this one is stale.
    pub const REPLACED: u16 = 4004;
    /// The consultation was ended by the doctor or an administrator.
    pub const ENDED: u16 = 4005;
    /// The client did not read its messages fast enough.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client sent more than its message budget for too long; its seat is held, so it may
    /// resume (and should send less).
    pub const FLOODING: u16 = 4009;
    /// The patient waited longer than the server's waiting-room timeout, or the invite it came
    /// with was revoked.
    pub const WAITING_CLOSED: u16 = 4010;
}

/// Identifies one participant's seat in a consultation. Opaque to clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ParticipantId(pub String);

/// Identifies a consultation. Opaque to clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConsultationId(pub String);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ConsultationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a participant is in a consultation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Owns the consultation: admits and denies patients.
    Doctor,
    /// Another clinician in a group consult: admitted at once, may admit and deny too.
    Clinician,
    /// Joins with an invite code and waits to be admitted.
    Patient,
}

impl Role {
    /// Whether this role may admit or deny patients from the waiting room.
    pub fn can_admit(self) -> bool {
        matches!(self, Role::Doctor | Role::Clinician)
    }

    /// The name used on the wire and in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Doctor => "doctor",
            Role::Clinician => "clinician",
            Role::Patient => "patient",
        }
    }
}

/// How a `join` proves it may enter a consultation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JoinAuth {
    /// A signed, short-lived token handed out by the clinic (doctors and clinicians).
    Token { token: String },
    /// The short invite code a patient was given.
    InviteCode { code: String },
}

/// One ICE candidate as trickled by WebRTC (`RTCIceCandidateInit`). An empty `candidate` string
/// means the sender has gathered all its candidates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mline_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// What participants tell each other to encrypt media end to end (SFrame, RFC 9605; the key
/// schedule is `client-core`'s `e2ee` module). The server relays these between admitted seats
/// and can read none of the keys: the sender keys are sealed with HPKE to the recipient's
/// X25519 public key. Binary fields are base64 (standard alphabet, padded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum E2eeMessage {
    /// SHA-256 of the public key the sender will reveal: sent before the key, so that whoever
    /// relays the keys must commit to a key of its own before it sees the recipient's (what
    /// keeps the safety code short).
    Commit { hash: String },
    /// The sender's X25519 public key (32 bytes), sent to a peer once its commitment arrived.
    PublicKey { key: String },
    /// The sender's media key (its SFrame base key) for `key_id`, sealed to the recipient with
    /// HPKE (X25519, HKDF-SHA256, AES-128-GCM, authenticated mode): `enc` is the encapsulated
    /// key, `sealed` the ciphertext.
    SenderKey {
        key_id: u64,
        enc: String,
        sealed: String,
    },
}

/// A STUN or TURN server a client should use, with short-lived TURN credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Another participant as the server describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub participant_id: ParticipantId,
    pub role: Role,
    /// The name the participant typed, shown to the others. Never logged or stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// False while the peer's link is down and its seat is held for the rejoin window.
    #[serde(default = "default_true")]
    pub connected: bool,
}

fn default_true() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One receive slot of a participant's SFU connection and whose media it now carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfuSlot {
    pub participant_id: ParticipantId,
    /// The `mid` of the slot's audio m-line in the client's offer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_mid: Option<String>,
    /// The `mid` of the slot's video m-line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_mid: Option<String>,
}

/// A patient in the waiting room, as shown to doctors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingPatient {
    pub participant_id: ParticipantId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Seconds since the patient first joined the waiting room.
    pub waiting_secs: u64,
    /// False while the patient's link is down and the seat is held.
    pub connected: bool,
}

/// Why a participant is no longer in the consultation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The participant said `leave`.
    Left,
    /// The link dropped and the rejoin window passed without a `resume`.
    TimedOut,
    /// A doctor denied the patient from the waiting room.
    Denied,
    /// The consultation ended.
    Ended,
}

/// The ICE candidate pair type in use, as a call reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidatePairType {
    Host,
    Srflx,
    Prflx,
    Relay,
}

/// How the selected candidate pair carries media: for a relay pair, how this client reaches the
/// relay (UDP, or TURN over TCP or TLS); for any other pair, the candidates' own protocol (UDP,
/// or ICE-TCP). A value a later client sends that this one does not know reads as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportProtocol {
    Udp,
    Tcp,
    Tls,
    #[serde(other)]
    Other,
}

/// Video stream figures in one direction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VideoStats {
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub bitrate_kbps: f64,
}

/// One call-quality sample a client sends as telemetry, about once a second. Only figures: no
/// media, no names, no addresses. Every field is optional so that a client reports what it has.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Share of packets lost on the way to us, 0 to 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_in_pct: Option<f64>,
    /// Share of our packets the far end lost, 0 to 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_out_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_jitter_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_buffer_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_sent: Option<VideoStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_received: Option<VideoStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_pair: Option<CandidatePairType>,
    /// The selected pair's transport (added in 1.x; absent from older clients).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportProtocol>,
    /// The peer connection state, as WebRTC names it (`connected`, `disconnected`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// Whether the call is audio-only right now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_only: Option<bool>,
    /// The congestion controller's estimate of what we may send this peer, kbps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_estimate_kbps: Option<f64>,
}

/// A stable error code: clients branch on these, so they never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not a JSON object of a known shape.
    MalformedMessage,
    /// The `type` is not one this server knows.
    UnknownMessageType,
    /// The `protocol_version` is not one this server speaks.
    UnsupportedVersion,
    /// The message is valid but not allowed now (e.g. an offer before `join`).
    OutOfOrder,
    /// `join` or `resume` already succeeded on this connection.
    AlreadyJoined,
    /// The token is missing, forged, or for something else.
    InvalidToken,
    /// The token was valid but has expired.
    TokenExpired,
    /// The invite code is unknown, used up, or expired.
    InvalidInviteCode,
    /// Too many attempts from this source; wait and try again.
    RateLimited,
    /// The participant's role may not do this (e.g. a patient admitting).
    Forbidden,
    /// Media signaling before the doctor admitted this participant.
    NotAdmitted,
    /// The addressed participant is not (or no longer) in the consultation.
    UnknownParticipant,
    /// The consultation does not exist or has ended.
    ConsultationNotFound,
    /// The consultation has no seat left.
    ConsultationFull,
    /// The seat's rejoin window has passed: join again from the start.
    ResumeExpired,
    /// Something went wrong on the server; nothing was lost on the client's side.
    Internal,
    /// A code from a newer server that this client does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it is written on the wire and used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedMessage => "malformed_message",
            ErrorCode::UnknownMessageType => "unknown_message_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::InvalidInviteCode => "invalid_invite_code",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotAdmitted => "not_admitted",
            ErrorCode::UnknownParticipant => "unknown_participant",
            ErrorCode::ConsultationNotFound => "consultation_not_found",
            ErrorCode::ConsultationFull => "consultation_full",
            ErrorCode::ResumeExpired => "resume_expired",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Messages a client sends to the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Enter a consultation.
    Join {
        protocol_version: u32,
        auth: JoinAuth,
        /// The name the patient typed, shown to the doctor. Never stored or logged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        display_name: Option<String>,
    },
    /// Take back a seat held since this client's link dropped.
    Resume {
        protocol_version: u32,
        resume_token: String,
    },
    /// Let a waiting patient in (doctors and clinicians).
    Admit {
        participant_id: ParticipantId,
    },
    /// Turn a waiting patient away (doctors and clinicians).
    Deny {
        participant_id: ParticipantId,
    },
    Offer {
        to: ParticipantId,
        sdp: String,
    },
    Answer {
        to: ParticipantId,
        sdp: String,
    },
    IceCandidate {
        to: ParticipantId,
        candidate: IceCandidate,
    },
    /// Ask a peer to restart ICE (it sends a new offer with fresh credentials).
    IceRestart {
        to: ParticipantId,
    },
    /// An end-to-end encryption message for one peer ([`E2eeMessage`]), relayed as it is: the
    /// server reads only `to`.
    E2ee {
        to: ParticipantId,
        message: E2eeMessage,
    },
    /// Ask for fresh ICE servers (TURN credentials are short-lived).
    RefreshIceServers,
    /// Call-quality telemetry.
    Stats {
        report: StatsReport,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Leave the consultation for good (the seat is released at once).
    Leave,
    /// An offer (a new connection, or an ICE restart of the current one) to the server's SFU.
    SfuOffer {
        sdp: String,
    },
    /// A trickled candidate for the connection to the SFU.
    SfuCandidate {
        candidate: IceCandidate,
    },
    /// Close the connection to the SFU (the consultation is back to peer to peer).
    SfuLeave,
}

/// Messages the server sends to a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The join or resume succeeded: this is who you are.
    Joined {
        protocol_version: u32,
        participant_id: ParticipantId,
        consultation_id: ConsultationId,
        role: Role,
        /// Present in `resume` to take this seat back after a dropped link.
        resume_token: String,
        /// How long the seat is held after the link drops.
        rejoin_window_secs: u64,
        /// True when this answers a `resume` (the seat, its role and admission are unchanged).
        #[serde(default)]
        resumed: bool,
    },
    /// You are in the waiting room until a doctor admits you.
    Waiting,
    /// You are in the consultation: these are the others, and the ICE servers to use.
    Admitted {
        peers: Vec<Peer>,
        ice_servers: Vec<IceServer>,
        /// The server runs an SFU: a consultation of three or more should use it.
        #[serde(default, skip_serializing_if = "is_false")]
        sfu: bool,
    },
    /// A doctor turned you away; the connection closes next.
    Denied,
    /// The waiting room changed (sent to doctors and clinicians).
    WaitingRoom {
        waiting: Vec<WaitingPatient>,
    },
    PeerJoined {
        peer: Peer,
    },
    PeerLeft {
        participant_id: ParticipantId,
        reason: LeaveReason,
    },
    /// The peer's link dropped; its seat is held for the rejoin window.
    PeerReconnecting {
        participant_id: ParticipantId,
    },
    /// The peer resumed its seat.
    PeerBack {
        participant_id: ParticipantId,
    },
    Offer {
        from: ParticipantId,
        sdp: String,
    },
    Answer {
        from: ParticipantId,
        sdp: String,
    },
    IceCandidate {
        from: ParticipantId,
        candidate: IceCandidate,
    },
    IceRestart {
        from: ParticipantId,
    },
    E2ee {
        from: ParticipantId,
        message: E2eeMessage,
    },
    IceServers {
        ice_servers: Vec<IceServer>,
    },
    /// The consultation is over; the connection closes next.
    Ended {
        reason: LeaveReason,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// The `type` of the message that caused it, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<String>,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The SFU's answer to `sfu_offer`.
    SfuAnswer {
        sdp: String,
    },
    /// Which participant each of your SFU slots carries now (slots not listed carry no one).
    SfuLayout {
        slots: Vec<SfuSlot>,
    },
    /// The loudest participant of the consultation (from the SFU's RFC 6464 audio levels),
    /// or none.
    ActiveSpeaker {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        participant_id: Option<ParticipantId>,
    },
    /// Answers a `join` or `resume` that reached a server of another region than the
    /// consultation's: open the signaling WebSocket at `url` and send the same message there.
    /// An `error` (`consultation_not_found`, naming the region) and a close follow, for clients
    /// that do not know this message.
    Redirect {
        /// The consultation's region, as the fleet's region map names it.
        region: String,
        /// That region's signaling URL (`wss://eu.clinic.example/ws`).
        url: String,
        /// That region's public web address, for the browser join page
        /// (`<web_url>/j/<invite code>`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        web_url: Option<String>,
    },
}

/// Why an incoming frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is over the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("message has no string \"type\" field")]
    MissingType,
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("invalid {ty:?} message: {reason}")]
    Invalid { ty: String, reason: String },
}

impl DecodeError {
    /// The error code a server answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownType(_) => ErrorCode::UnknownMessageType,
            _ => ErrorCode::MalformedMessage,
        }
    }

    /// The `type` of the offending message, when it had a readable one.
    pub fn message_type(&self) -> Option<&str> {
        match self {
            DecodeError::UnknownType(ty) | DecodeError::Invalid { ty, .. } => Some(ty),
            _ => None,
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(text: &str, known: &[&str]) -> Result<T, DecodeError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(text.len()));
    }
    // The happy path parses once; only a failure pays for a second look to say what was wrong.
    match serde_json::from_str::<T>(text) {
        Ok(msg) => Ok(msg),
        Err(err) => {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
            let object = value
                .as_object()
                .ok_or_else(|| DecodeError::NotJson("expected a JSON object".into()))?;
            let ty = object
                .get("type")
                .and_then(|t| t.as_str())
                .ok_or(DecodeError::MissingType)?;
            if !known.contains(&ty) {
                // Keep the echoed type short: it goes back to the client and into metrics.
                let ty: String = ty.chars().take(64).collect();
                return Err(DecodeError::UnknownType(ty));
            }
            Err(DecodeError::Invalid {
                ty: ty.to_owned(),
                reason: err.to_string(),
            })
        }
    }
}

impl ClientMessage {
    /// Every `type` a client may send in this protocol version.
    pub const TYPES: &'static [&'static str] = &[
        "join",
        "resume",
        "admit",
        "deny",
        "offer",
        "answer",
        "ice_candidate",
        "ice_restart",
        "e2ee",
        "refresh_ice_servers",
        "stats",
        "ping",
        "pong",
        "leave",
        "sfu_offer",
        "sfu_candidate",
        "sfu_leave",
    ];

    /// Decodes one text frame, telling a malformed frame from an unknown type.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text, Self::TYPES)
    }

    /// The message as one JSON text frame.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("client messages always serialize")
    }

    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Resume { .. } => "resume",
            ClientMessage::Admit { .. } => "admit",
            ClientMessage::Deny { .. } => "deny",
            ClientMessage::Offer { .. } => "offer",
            ClientMessage::Answer { .. } => "answer",
            ClientMessage::IceCandidate { .. } => "ice_candidate",
            ClientMessage::IceRestart { .. } => "ice_restart",
            ClientMessage::E2ee { .. } => "e2ee",
            ClientMessage::RefreshIceServers => "refresh_ice_servers",
            ClientMessage::Stats { .. } => "stats",
            ClientMessage::Ping { .. } => "ping",
            ClientMessage::Pong { .. } => "pong",
            ClientMessage::Leave => "leave",
            ClientMessage::SfuOffer { .. } => "sfu_offer",
            ClientMessage::SfuCandidate { .. } => "sfu_candidate",
            ClientMessage::SfuLeave => "sfu_leave",
        }
    }
}

impl ServerMessage {
    /// Every `type` a server may send in this protocol version.
    pub const TYPES: &'static [&'static str] = &[
        "joined",
        "waiting",
        "admitted",
        "denied",
        "waiting_room",
        "peer_joined",
        "peer_left",
        "peer_reconnecting",
        "peer_back",
        "offer",
        "answer",
        "ice_candidate",
        "ice_restart",
        "e2ee",
        "ice_servers",
        "ended",
        "error",
        "ping",
        "pong",
        "sfu_answer",
        "sfu_layout",
        "active_speaker",
        "redirect",
    ];

    /// Decodes one text frame, telling a malformed frame from an unknown type.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text, Self::TYPES)
    }

    /// The message as one JSON text frame.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }

    /// Shorthand for an error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>, in_reply_to: Option<&str>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            in_reply_to: in_reply_to.map(str::to_owned),
        }
    }

    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMessage::Joined { .. } => "joined",
            ServerMessage::Waiting => "waiting",
            ServerMessage::Admitted { .. } => "admitted",
            ServerMessage::Denied => "denied",
            ServerMessage::WaitingRoom { .. } => "waiting_room",
            ServerMessage::PeerJoined { .. } => "peer_joined",
            ServerMessage::PeerLeft { .. } => "peer_left",
            ServerMessage::PeerReconnecting { .. } => "peer_reconnecting",
            ServerMessage::PeerBack { .. } => "peer_back",
            ServerMessage::Offer { .. } => "offer",
            ServerMessage::Answer { .. } => "answer",
            ServerMessage::IceCandidate { .. } => "ice_candidate",
            ServerMessage::IceRestart { .. } => "ice_restart",
            ServerMessage::E2ee { .. } => "e2ee",
            ServerMessage::IceServers { .. } => "ice_servers",
            ServerMessage::Ended { .. } => "ended",
            ServerMessage::Error { .. } => "error",
            ServerMessage::Ping { .. } => "ping",
            ServerMessage::Pong { .. } => "pong",
            ServerMessage::SfuAnswer { .. } => "sfu_answer",
            ServerMessage::SfuLayout { .. } => "sfu_layout",
            ServerMessage::ActiveSpeaker { .. } => "active_speaker",
            ServerMessage::Redirect { .. } => "redirect",
        }
    }
}

/// Fuzzing entry (`fuzz/fuzz_targets/signaling_json.rs`, and the corpus run in
/// `protocol/tests/fuzz_corpus.rs`): any bytes, as a client's or the server's text frame. Decoding
/// must never panic, and whatever decodes must encode to text that decodes to the same message.
#[doc(hidden)]
pub fn fuzz_signaling(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = ClientMessage::decode(text) {
        let again = ClientMessage::decode(&m.encode()).expect("an encoded message decodes");
        assert_eq!(again, m, "client message round trip");
    }
    if let Ok(m) = ServerMessage::decode(text) {
        let again = ServerMessage::decode(&m.encode()).expect("an encoded message decodes");
        assert_eq!(again, m, "server message round trip");
    }
}

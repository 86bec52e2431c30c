//! Plain data mirrored from `bedside-client-core` and `bedside-protocol`: one-to-one
//! conversions, no interpretation.

use bedside_client_core::call::{CallState, EndReason, PeerConnectionState};
use bedside_protocol::{LeaveReason, Peer, Role, StatsReport, WaitingPatient};

/// Options for [`crate::BedsideClient::new`]. Get the defaults from [`default_client_options`].
#[derive(Debug, Clone, uniffi::Record)]
pub struct ClientOptionsFfi {
    /// Local UDP addresses to bind, one host candidate each (`0.0.0.0:0`: any, free port).
    pub udp_addrs: Vec<String>,
    /// Use only TURN relay candidates.
    pub relay_only: bool,
    /// Encoded video size (even); pushed frames of another size are scaled.
    pub video_width: u32,
    pub video_height: u32,
    /// Starting video bitrate (the quality ladder in client-core moves it).
    pub video_bitrate_bps: u32,
}

/// client-core's defaults.
#[uniffi::export]
pub fn default_client_options() -> ClientOptionsFfi {
    let o = bedside_client_core::driver::ClientOptions::new("");
    ClientOptionsFfi {
        udp_addrs: o.engine.udp_addrs,
        relay_only: o.engine.relay_only,
        video_width: o.video.width,
        video_height: o.video.height,
        video_bitrate_bps: o.video.bitrate_bps,
    }
}

/// Why a call ended (`EndReason`); `code` is the server's stable error code where there is one.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum EndReasonFfi {
    Left,
    Denied,
    ConsultationEnded,
    Replaced,
    AuthFailed { code: String },
    Refused { code: String },
    ConnectionLost,
}

/// The call's state (`CallState`).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum CallStateFfi {
    Idle,
    Joining,
    /// In the waiting room.
    Waiting,
    /// Admitted, nobody else is here yet.
    WaitingForPeers,
    /// Admitted, media being set up.
    Connecting,
    Connected,
    Reconnecting,
    Ended {
        reason: EndReasonFfi,
    },
}

impl From<CallState> for CallStateFfi {
    fn from(s: CallState) -> Self {
        match s {
            CallState::Idle => CallStateFfi::Idle,
            CallState::Joining => CallStateFfi::Joining,
            CallState::Waiting => CallStateFfi::Waiting,
            CallState::WaitingForPeers => CallStateFfi::WaitingForPeers,
            CallState::Connecting => CallStateFfi::Connecting,
            CallState::Connected => CallStateFfi::Connected,
            CallState::Reconnecting => CallStateFfi::Reconnecting,
            CallState::Ended(r) => CallStateFfi::Ended {
                reason: match r {
                    EndReason::Left => EndReasonFfi::Left,
                    EndReason::Denied => EndReasonFfi::Denied,
                    EndReason::ConsultationEnded => EndReasonFfi::ConsultationEnded,
                    EndReason::Replaced => EndReasonFfi::Replaced,
                    EndReason::AuthFailed(c) => EndReasonFfi::AuthFailed {
                        code: c.as_str().to_owned(),
                    },
                    EndReason::Refused(c) => EndReasonFfi::Refused {
                        code: c.as_str().to_owned(),
                    },
                    EndReason::ConnectionLost => EndReasonFfi::ConnectionLost,
                },
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum RoleFfi {
    Doctor,
    Clinician,
    Patient,
}

impl From<Role> for RoleFfi {
    fn from(r: Role) -> Self {
        match r {
            Role::Doctor => RoleFfi::Doctor,
            Role::Clinician => RoleFfi::Clinician,
            Role::Patient => RoleFfi::Patient,
        }
    }
}

/// Another participant (`Peer`).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PeerFfi {
    pub participant_id: String,
    pub role: RoleFfi,
    pub display_name: Option<String>,
    pub connected: bool,
}

impl From<Peer> for PeerFfi {
    fn from(p: Peer) -> Self {
        PeerFfi {
            participant_id: p.participant_id.0,
            role: p.role.into(),
            display_name: p.display_name,
            connected: p.connected,
        }
    }
}

/// A patient in the waiting room (only doctors and clinicians receive these).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct WaitingPatientFfi {
    pub participant_id: String,
    pub display_name: Option<String>,
    pub waiting_secs: u64,
    pub connected: bool,
}

impl From<WaitingPatient> for WaitingPatientFfi {
    fn from(w: WaitingPatient) -> Self {
        WaitingPatientFfi {
            participant_id: w.participant_id.0,
            display_name: w.display_name,
            waiting_secs: w.waiting_secs,
            connected: w.connected,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum LeaveReasonFfi {
    Left,
    TimedOut,
    Denied,
    Ended,
}

impl From<LeaveReason> for LeaveReasonFfi {
    fn from(r: LeaveReason) -> Self {
        match r {
            LeaveReason::Left => LeaveReasonFfi::Left,
            LeaveReason::TimedOut => LeaveReasonFfi::TimedOut,
            LeaveReason::Denied => LeaveReasonFfi::Denied,
            LeaveReason::Ended => LeaveReasonFfi::Ended,
        }
    }
}

/// What happened to a peer, one case per peer `CallEvent`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum PeerEventFfi {
    Joined {
        peer: PeerFfi,
    },
    Left {
        reason: LeaveReasonFfi,
    },
    /// Its signaling link dropped; its seat is held.
    Reconnecting,
    Back,
    /// Its peer connection changed state (`new`, `connecting`, `connected`...).
    Media {
        state: String,
    },
}

pub(crate) fn media_state(s: PeerConnectionState) -> String {
    format!("{s:?}").to_lowercase()
}

/// Sent or received video figures.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct VideoStatsFfi {
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub bitrate_kbps: f64,
}

/// Call quality with one peer, about once a second (`StatsReport`).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct StatsFfi {
    pub rtt_ms: Option<f64>,
    pub loss_in_pct: Option<f64>,
    pub loss_out_pct: Option<f64>,
    pub audio_jitter_ms: Option<f64>,
    pub audio_buffer_ms: Option<f64>,
    pub video_sent: Option<VideoStatsFfi>,
    pub video_received: Option<VideoStatsFfi>,
    /// `host`, `srflx`, `relay`...
    pub candidate_pair: Option<String>,
    pub connection_state: Option<String>,
    pub audio_only: Option<bool>,
}

impl From<StatsReport> for StatsFfi {
    fn from(r: StatsReport) -> Self {
        let video = |v: bedside_protocol::VideoStats| VideoStatsFfi {
            width: v.width,
            height: v.height,
            fps: v.fps,
            bitrate_kbps: v.bitrate_kbps,
        };
        StatsFfi {
            rtt_ms: r.rtt_ms,
            loss_in_pct: r.loss_in_pct,
            loss_out_pct: r.loss_out_pct,
            audio_jitter_ms: r.audio_jitter_ms,
            audio_buffer_ms: r.audio_buffer_ms,
            video_sent: r.video_sent.map(video),
            video_received: r.video_received.map(video),
            candidate_pair: r.candidate_pair.map(|c| format!("{c:?}").to_lowercase()),
            connection_state: r.connection_state,
            audio_only: r.audio_only,
        }
    }
}

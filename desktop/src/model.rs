//! The app's pure state: what the UI shows, updated only by [`AppModel::apply`] (events from
//! `bedside-client-core`) and a few app-level notes (clinic started, failure). No I/O, no egui.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use bedside_client_core::call::{CallEvent, CallState, EndReason, UserCommand};
use bedside_protocol::{ConsultationId, ParticipantId, Peer, Role, StatsReport, WaitingPatient};
use bedside_server::api::ConsultationSummary;

use crate::devices::DeviceLists;

/// How many stats samples (about one a second) the plots keep.
pub const HISTORY_LEN: usize = 120;
/// The chat lines kept on screen (memory only: chat is never stored).
pub const CHAT_LINES_KEPT: usize = 500;

/// What a click asks for. The view only produces these; the app carries them out.
#[derive(Clone, Debug, PartialEq)]
pub enum UiCommand {
    /// Run a clinic server in this process and open a consultation on it.
    StartLocalClinic,
    /// Join a consultation on a remote clinic as its doctor, with a one-off join token.
    ConnectToClinic {
        ws_url: String,
        token: String,
    },
    /// Sign in to a remote clinic with a doctor credential (then see today's consultations).
    SignIn {
        address: String,
        credential: String,
    },
    /// Put text on the clipboard (the patient's invite link, or its code).
    Copy(String),
    /// Send the chat draft to the patient.
    SendChat(String),
    /// Use this camera, microphone or speaker (a device id or a synthetic choice).
    ChooseCamera(String),
    ChooseMicrophone(String),
    ChooseSpeaker(String),
    /// Open a new consultation on the local clinic and move the doctor into it.
    NewConsultation,
    /// Move the doctor into another of today's consultations.
    OpenConsultation(ConsultationId),
    /// Fetch today's consultations again.
    RefreshConsultations,
    /// Sign out of the remote clinic: the credential is revoked on the clinic and forgotten here.
    SignOut,
    /// Look again for screens and windows to share (the share menu opened).
    ListShareable,
    /// Share this screen or window (a [`crate::share::ShareChoice`] id) instead of the camera.
    ShareScreen(String),
    /// Stop sharing: the camera again.
    StopSharing,
    /// Show this participant large whoever speaks (`None`: follow the speaker again).
    Pin(Option<ParticipantId>),
    /// Pass a command to the call (admit, deny, mute, camera, audio only, leave).
    Call(UserCommand),
    /// Back to the connect screen after a call ended or failed.
    Reset,
}

/// Which screen is up; derived from the state, never set by the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Screen {
    Connect,
    /// Signed in to a clinic, in no consultation: today's list.
    Clinic,
    Consultation,
    InCall,
    Ended,
}

/// One plotted series: `[sample index, value]` points, oldest dropped first.
#[derive(Clone, Debug, Default)]
pub struct Series(pub VecDeque<[f64; 2]>);

impl Series {
    fn push(&mut self, x: f64, y: Option<f64>) {
        if let Some(y) = y.filter(|y| y.is_finite()) {
            if self.0.len() == HISTORY_LEN {
                self.0.pop_front();
            }
            self.0.push_back([x, y]);
        }
    }

    pub fn last(&self) -> Option<f64> {
        self.0.back().map(|p| p[1])
    }

    pub fn points(&self) -> Vec<[f64; 2]> {
        self.0.iter().copied().collect()
    }
}

/// Ring buffers of call quality with the remote participant.
#[derive(Clone, Debug, Default)]
pub struct StatsHistory {
    pub samples: u64,
    pub rtt_ms: Series,
    pub loss_pct: Series,
    pub bitrate_kbps: Series,
    pub fps: Series,
    /// Height of the received picture (720 for 1280x720).
    pub height: Series,
}

impl StatsHistory {
    /// Adds one sample.
    pub fn push(&mut self, report: &StatsReport) {
        let x = self.samples as f64;
        self.samples += 1;
        self.rtt_ms.push(x, report.rtt_ms);
        self.loss_pct.push(x, report.loss_in_pct);
        let video = report.video_received.as_ref();
        self.bitrate_kbps.push(x, video.map(|v| v.bitrate_kbps));
        self.fps.push(x, video.map(|v| v.fps));
        self.height.push(x, video.map(|v| f64::from(v.height)));
    }
}

/// One line of the consultation's chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatLine {
    pub outgoing: bool,
    /// "You", or the participant's display name.
    pub who: String,
    pub text: String,
}

/// The call-quality light next to the patient's video: the score shared with the server's
/// dashboard (`bedside_protocol::quality`).
pub use bedside_protocol::quality::Quality;

/// Everything the screens show.
#[derive(Clone, Debug)]
pub struct AppModel {
    /// Set while a clinic is being started or a client connected ("Starting the local clinic…").
    pub busy: Option<String>,
    /// True once a client exists (the call screens apply).
    pub has_session: bool,
    /// Where we are connected, for the header (a host name, never a token).
    pub clinic_label: Option<String>,
    /// The patient's invite code, when we created the consultation.
    pub invite_code: Option<String>,
    /// The patient's invite link (`<public-url>/j/<code>`), when the clinic gave one: shown and
    /// copied instead of the code.
    pub invite_url: Option<String>,
    pub call_state: CallState,
    pub me: Option<ParticipantId>,
    pub waiting: Vec<WaitingPatient>,
    /// When `waiting` arrived (its `waiting_secs` count from then).
    pub waiting_at: Option<Instant>,
    /// Everybody else in the consultation.
    pub peers: Vec<Peer>,
    pub peers_reconnecting: HashSet<ParticipantId>,
    pub mic_muted: bool,
    pub camera_enabled: bool,
    /// `Some(manual)` while audio-only.
    pub audio_only: Option<bool>,
    /// With end-to-end encryption on: `Some(code)` to compare aloud, `Some(None)` while keys are
    /// still on their way. `None`: encryption is off (or no key has been exchanged yet).
    pub safety_code: Option<Option<String>>,
    pub stats: StatsHistory,
    pub last_stats: Option<StatsReport>,
    /// The last non-fatal error, or why connecting failed.
    pub error: Option<String>,
    /// The participant the SFU last heard speaking most (a group consult): shown large. It
    /// stays through silences (`ActiveSpeaker(None)`) so the picture does not jump back and
    /// forth between pauses.
    pub active_speaker: Option<ParticipantId>,
    /// Shown large whoever speaks, at the doctor's click on their tile.
    pub pinned: Option<ParticipantId>,
    /// Remote video frames uploaded for whoever is shown large, so far (set by the app).
    pub remote_frames_shown: u64,
    pub remote_size: Option<(u32, u32)>,
    /// Video frames uploaded per participant, large or in a tile (set by the app).
    pub frames_shown: HashMap<ParticipantId, u64>,
    /// Self-view frames uploaded so far (set by the app).
    pub self_frames_shown: u64,
    /// The chat, oldest first (memory only).
    pub chat: Vec<ChatLine>,
    /// Why the last chat line did not go out.
    pub chat_notice: Option<String>,
    /// What the device pickers offer, and what is chosen (ids from those lists).
    pub devices: DeviceLists,
    pub camera: String,
    pub microphone: String,
    pub speaker: String,
    /// Today's consultations on this clinic: `None` where the app has no administration key
    /// (a remote clinic gives the doctor one link per consultation).
    pub consultations: Option<Vec<ConsultationSummary>>,
    /// Signed in to a remote clinic with a doctor credential (so the app can sign out).
    pub signed_in: bool,
    /// The consultation the doctor is in, when known.
    pub consultation_id: Option<ConsultationId>,
    /// Said under the connect form: whether the token is remembered, and where.
    pub keyring_note: Option<String>,
    /// The doctor's time zone, as an offset from UTC in seconds (times are shown in it).
    pub utc_offset_secs: i32,
    /// Every patient seen in the waiting room this session, to tell an arrival from an update.
    pub seen_waiting: HashSet<ParticipantId>,
    /// How many patients arrived in the waiting room this session (the app raises the window's
    /// attention and chimes when it grows).
    pub arrivals: u64,
    /// What is being shared instead of the camera ("Entire screen (1920x1080)"), if anything.
    pub sharing: Option<String>,
    /// What the share menu offers (listed when it opens).
    pub shareable: Vec<crate::share::ShareChoice>,
}

impl Default for AppModel {
    fn default() -> Self {
        AppModel {
            busy: None,
            has_session: false,
            clinic_label: None,
            invite_code: None,
            invite_url: None,
            call_state: CallState::Idle,
            me: None,
            waiting: Vec::new(),
            waiting_at: None,
            peers: Vec::new(),
            peers_reconnecting: HashSet::new(),
            mic_muted: false,
            camera_enabled: true,
            audio_only: None,
            safety_code: None,
            stats: StatsHistory::default(),
            last_stats: None,
            error: None,
            active_speaker: None,
            pinned: None,
            remote_frames_shown: 0,
            remote_size: None,
            frames_shown: HashMap::new(),
            self_frames_shown: 0,
            chat: Vec::new(),
            chat_notice: None,
            devices: DeviceLists::default(),
            camera: crate::settings::TEST_PATTERN.to_owned(),
            microphone: crate::settings::TEST_TONE.to_owned(),
            speaker: crate::settings::SPEAKER_OFF.to_owned(),
            consultations: None,
            signed_in: false,
            consultation_id: None,
            keyring_note: None,
            utc_offset_secs: 0,
            seen_waiting: HashSet::new(),
            arrivals: 0,
            sharing: None,
            shareable: Vec::new(),
        }
    }
}

impl AppModel {
    /// Applies one event from the call. This is the only way call state changes.
    pub fn apply(&mut self, event: CallEvent) {
        match event {
            CallEvent::State(state) => {
                if matches!(state, CallState::Ended(_)) {
                    self.waiting.clear();
                    self.peers.clear();
                    // The capture went with the session.
                    self.sharing = None;
                    self.peers_reconnecting.clear();
                }
                self.busy = None;
                self.call_state = state;
            }
            CallEvent::Seated { participant_id, .. } => self.me = Some(participant_id),
            CallEvent::WaitingRoom(list) => {
                for p in &list {
                    if self.seen_waiting.insert(p.participant_id.clone()) {
                        self.arrivals += 1;
                    }
                }
                self.waiting = list;
                self.waiting_at = Some(Instant::now());
            }
            CallEvent::PeerJoined(peer) => {
                self.peers
                    .retain(|p| p.participant_id != peer.participant_id);
                self.peers.push(peer);
            }
            CallEvent::PeerLeft { participant_id, .. } => {
                self.peers.retain(|p| p.participant_id != participant_id);
                self.peers_reconnecting.remove(&participant_id);
                self.frames_shown.remove(&participant_id);
                if self.active_speaker.as_ref() == Some(&participant_id) {
                    self.active_speaker = None;
                }
                if self.pinned.as_ref() == Some(&participant_id) {
                    self.pinned = None;
                }
            }
            CallEvent::PeerReconnecting(pid) => {
                self.peers_reconnecting.insert(pid);
            }
            CallEvent::PeerBack(pid) => {
                self.peers_reconnecting.remove(&pid);
            }
            CallEvent::PeerMedia { .. } => {}
            CallEvent::MicrophoneMuted(m) => self.mic_muted = m,
            CallEvent::CameraEnabled(c) => self.camera_enabled = c,
            CallEvent::AudioOnly { on, manual } => self.audio_only = on.then_some(manual),
            CallEvent::Stats { report, .. } => {
                self.stats.push(&report);
                self.last_stats = Some(report);
            }
            CallEvent::Chat {
                from,
                text,
                outgoing,
                ..
            } => {
                let who = if outgoing {
                    "You".to_owned()
                } else {
                    self.peers
                        .iter()
                        .find(|p| p.participant_id == from)
                        .and_then(|p| p.display_name.clone())
                        .unwrap_or_else(|| "Patient".to_owned())
                };
                if self.chat.len() == CHAT_LINES_KEPT {
                    self.chat.remove(0);
                }
                self.chat.push(ChatLine {
                    outgoing,
                    who,
                    text,
                });
                self.chat_notice = None;
            }
            CallEvent::ChatNotDelivered { reason, .. } => {
                self.chat_notice = Some(format!("Message not delivered: {reason}"));
            }
            CallEvent::SafetyCode(code) => self.safety_code = Some(code),
            CallEvent::ActiveSpeaker(Some(speaker)) => {
                if self.me.as_ref() != Some(&speaker) {
                    self.active_speaker = Some(speaker);
                }
            }
            // Silence: whoever spoke last stays large.
            CallEvent::ActiveSpeaker(None) => {}
            CallEvent::Error { code, message } => {
                self.error = Some(format!("{code:?}: {message}"));
            }
        }
    }

    pub fn screen(&self) -> Screen {
        if !self.has_session {
            if self.consultations.is_some() && self.busy.is_none() {
                return Screen::Clinic;
            }
            return Screen::Connect;
        }
        match self.call_state {
            CallState::Idle
            | CallState::Joining
            | CallState::Waiting
            | CallState::WaitingForPeers => Screen::Consultation,
            CallState::Connecting | CallState::Connected | CallState::Reconnecting => {
                Screen::InCall
            }
            CallState::Ended(_) => Screen::Ended,
        }
    }

    /// The participant shown large: the one the doctor pinned, else whoever the SFU last heard
    /// speaking, else the first patient, else anyone.
    pub fn main_peer(&self) -> Option<&Peer> {
        let find = |id: &Option<ParticipantId>| {
            id.as_ref()
                .and_then(|id| self.peers.iter().find(|p| &p.participant_id == id))
        };
        find(&self.pinned)
            .or_else(|| find(&self.active_speaker))
            .or_else(|| self.peers.iter().find(|p| p.role == Role::Patient))
            .or_else(|| self.peers.first())
    }

    /// Everyone else in a group consult, in the order they joined: the tiles under the large
    /// picture (none in a 1:1 call).
    pub fn tile_peers(&self) -> Vec<&Peer> {
        let main = self.main_peer().map(|p| &p.participant_id);
        self.peers
            .iter()
            .filter(|p| Some(&p.participant_id) != main)
            .collect()
    }

    /// Whether the last stats sample says the patient's network is poor.
    pub fn network_poor(&self) -> bool {
        self.last_stats
            .as_ref()
            .is_some_and(bedside_protocol::quality::network_poor)
    }

    /// A fresh model for the next session: the call's state goes; what belongs to this computer
    /// and clinic (the devices and choices, the keyring note, today's consultations) stays.
    pub fn next_session(&mut self) -> AppModel {
        AppModel {
            devices: std::mem::take(&mut self.devices),
            camera: std::mem::take(&mut self.camera),
            microphone: std::mem::take(&mut self.microphone),
            speaker: std::mem::take(&mut self.speaker),
            consultations: self.consultations.take(),
            signed_in: self.signed_in,
            keyring_note: self.keyring_note.take(),
            clinic_label: self.clinic_label.take(),
            utc_offset_secs: self.utc_offset_secs,
            ..AppModel::default()
        }
    }

    /// The quality light ([`bedside_protocol::quality::score`]: poor on heavy loss or a slow
    /// round trip; fair with some loss, a slowish round trip or a halting picture); `None`
    /// before the first sample.
    pub fn quality(&self) -> Option<Quality> {
        let s = self.last_stats.as_ref()?;
        Some(bedside_protocol::quality::score(
            s,
            self.audio_only.is_some(),
        ))
    }

    /// Why the quality light shows what it shows, in plain words; `None` while all is well or
    /// before the first sample.
    pub fn quality_reason(&self) -> Option<&'static str> {
        use bedside_protocol::quality::{
            FAIR_LOSS_PCT, FAIR_MIN_FPS, FAIR_RTT_MS, POOR_LOSS_PCT, POOR_RTT_MS,
        };
        let s = self.last_stats.as_ref()?;
        if s.loss_in_pct.is_some_and(|l| l > POOR_LOSS_PCT) {
            return Some("the patient's connection is losing many packets");
        }
        if s.rtt_ms.is_some_and(|r| r > POOR_RTT_MS) {
            return Some("the patient's connection is very slow to answer");
        }
        if s.loss_in_pct.is_some_and(|l| l > FAIR_LOSS_PCT) {
            return Some("the patient's connection is losing packets");
        }
        if s.rtt_ms.is_some_and(|r| r > FAIR_RTT_MS) {
            return Some("the patient's connection is slow to answer");
        }
        if self.audio_only.is_none()
            && s.video_received
                .as_ref()
                .is_some_and(|v| v.fps < FAIR_MIN_FPS)
        {
            return Some("the patient's picture is arriving slowly");
        }
        None
    }

    /// A time of day (seconds since the Unix epoch) in the doctor's time zone, `HH:MM`.
    pub fn local_time(&self, unix_secs: u64) -> String {
        let local = (unix_secs as i64 + i64::from(self.utc_offset_secs)).rem_euclid(86_400);
        format!("{:02}:{:02}", local / 3600, local % 3600 / 60)
    }

    /// The end-to-end encryption line of the side panel, when encryption is on.
    pub fn encryption_line(&self) -> Option<String> {
        match self.safety_code.as_ref()? {
            Some(code) => Some(format!(
                "End-to-end encrypted. Safety code {code}: read it aloud; everyone must see the same."
            )),
            None => Some("End-to-end encryption: exchanging keys…".to_owned()),
        }
    }

    /// The banners over the call, most important first.
    pub fn banners(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.call_state {
            CallState::Connecting => out.push("Connecting…".to_owned()),
            CallState::Reconnecting => out.push("Reconnecting…".to_owned()),
            _ => {}
        }
        // Who dropped, by name in a group consult (a patient is "the patient" in any call).
        let mut dropped: Vec<String> = self
            .peers_reconnecting
            .iter()
            .map(|id| {
                let peer = self.peers.iter().find(|p| &p.participant_id == id);
                match peer.map(|p| (p.role, p.display_name.as_deref())) {
                    Some((Role::Patient, _)) | None => {
                        "The patient's connection dropped: holding their seat".to_owned()
                    }
                    Some((_, Some(name))) => {
                        format!("{name}'s connection dropped: holding their seat")
                    }
                    Some((_, None)) => {
                        "A participant's connection dropped: holding their seat".to_owned()
                    }
                }
            })
            .collect();
        dropped.sort();
        dropped.dedup();
        out.extend(dropped);
        match self.audio_only {
            Some(true) => out.push("Audio only".to_owned()),
            Some(false) => out.push("Audio only: the network is too weak for video".to_owned()),
            None => {}
        }
        if self.network_poor() {
            out.push("Patient's network is poor".to_owned());
        }
        out
    }

    /// Seconds a waiting patient has waited, counting from when the list arrived.
    pub fn waited_secs(&self, patient: &WaitingPatient) -> u64 {
        let since = self.waiting_at.map_or(0, |t| t.elapsed().as_secs());
        patient.waiting_secs + since
    }

    /// "waiting 42 s", "waiting 3 min 05 s": the counter next to a waiting patient.
    pub fn waited_text(&self, patient: &WaitingPatient) -> String {
        let secs = self.waited_secs(patient);
        if secs < 60 {
            format!("waiting {secs} s")
        } else {
            format!("waiting {} min {:02} s", secs / 60, secs % 60)
        }
    }

    /// Why the call ended, in words.
    pub fn ended_text(&self) -> String {
        match &self.call_state {
            CallState::Ended(reason) => match reason {
                EndReason::Left => "You left the consultation.".into(),
                EndReason::Denied => "The clinic refused to seat you.".into(),
                EndReason::ConsultationEnded => "The consultation has ended.".into(),
                EndReason::Replaced => "You joined this consultation from another device.".into(),
                EndReason::AuthFailed(code) => format!("The clinic refused the token ({code:?})."),
                EndReason::Refused(code) => format!("The clinic refused to join ({code:?})."),
                EndReason::ConnectionLost => "The connection to the clinic was lost.".into(),
            },
            _ => String::new(),
        }
    }

    /// A summary without names, tokens or addresses, for the status file and logs.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "screen": format!("{:?}", self.screen()),
            "call_state": format!("{:?}", self.call_state),
            "waiting": self.waiting.len(),
            "peers": self.peers.len(),
            "remote_frames_shown": self.remote_frames_shown,
            "remote_size": self.remote_size,
            // Roles and counts only: a grid of names would be a list of who is in the call.
            "main_peer_role": self.main_peer().map(|p| format!("{:?}", p.role)),
            "main_is_active_speaker": self.active_speaker.is_some()
                && self.main_peer().map(|p| &p.participant_id) == self.active_speaker.as_ref(),
            "tiles": self.tile_peers().len(),
            "peers_with_video": self.frames_shown.values().filter(|n| **n > 0).count(),
            "self_frames_shown": self.self_frames_shown,
            "chat_lines": self.chat.len(),
            "quality": self.quality().map(|q| format!("{q:?}")),
            "consultations": self.consultations.as_ref().map(Vec::len),
            "camera_is_synthetic": self.camera == crate::settings::TEST_PATTERN,
            "microphone_is_synthetic": self.microphone == crate::settings::TEST_TONE,
            "speaker_is_off": self.speaker == crate::settings::SPEAKER_OFF,
            "banners": self.banners(),
            "stats_samples": self.stats.samples,
            // Whether, not what: a window's title may hold a patient's name.
            "sharing": self.sharing.is_some(),
        })
    }
}

//! The call state machine in virtual time: every transition, no sockets, no sleeping. A test of
//! minutes of call time runs in microseconds because the machine never reads the clock.

use std::time::{Duration, Instant};

use bedside_client_core::call::*;
use bedside_protocol::*;

struct Harness {
    call: Call,
    now: Instant,
    out: Vec<Output>,
}

fn pid(s: &str) -> ParticipantId {
    ParticipantId(s.into())
}

fn peer(s: &str, role: Role) -> Peer {
    Peer {
        participant_id: pid(s),
        role,
        display_name: None,
        connected: true,
    }
}

impl Harness {
    fn new() -> Self {
        Harness {
            call: Call::new(CallConfig::default(), 42),
            now: Instant::now(),
            out: Vec::new(),
        }
    }

    fn drain(&mut self) -> Vec<Output> {
        while let Some(o) = self.call.poll_output() {
            self.out.push(o);
        }
        std::mem::take(&mut self.out)
    }

    /// Moves virtual time forward by `d`, firing every timeout on the way.
    fn advance(&mut self, d: Duration) -> Vec<Output> {
        let end = self.now + d;
        while let Some(t) = self.call.poll_timeout() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.call.handle_timeout(self.now);
            while let Some(o) = self.call.poll_output() {
                self.out.push(o);
            }
        }
        self.now = end;
        self.drain()
    }

    fn user(&mut self, cmd: UserCommand) -> Vec<Output> {
        self.call.handle_user(self.now, cmd);
        self.drain()
    }

    fn sig(&mut self, ev: SignalingEvent) -> Vec<Output> {
        self.call.handle_signaling(self.now, ev);
        self.drain()
    }

    fn msg(&mut self, m: ServerMessage) -> Vec<Output> {
        self.sig(SignalingEvent::Message(m))
    }

    fn engine(&mut self, ev: EngineEvent) -> Vec<Output> {
        self.call.handle_engine(self.now, ev);
        self.drain()
    }

    fn joined(&mut self, me: &str, role: Role, resumed: bool) -> Vec<Output> {
        self.msg(ServerMessage::Joined {
            protocol_version: 1,
            participant_id: pid(me),
            consultation_id: ConsultationId("c".into()),
            role,
            resume_token: format!("resume-{me}"),
            rejoin_window_secs: 60,
            resumed,
        })
    }

    /// Join to the point where the WebSocket is open and `join` was sent.
    fn open_and_join(&mut self, auth: JoinAuth) -> Vec<Output> {
        self.user(UserCommand::Join {
            auth,
            display_name: Some("Ana".into()),
        });
        let opened = self.advance(Duration::ZERO);
        assert!(
            opened.contains(&Output::Signaling(SignalingCommand::Open)),
            "{opened:?}"
        );
        self.sig(SignalingEvent::Opened)
    }

    /// A patient admitted with a doctor present and media connected.
    fn connected_patient() -> Self {
        let mut h = Harness::new();
        h.open_and_join(JoinAuth::InviteCode { code: "X".into() });
        h.joined("pat", Role::Patient, false);
        h.msg(ServerMessage::Waiting);
        h.msg(ServerMessage::Admitted {
            sfu: false,
            peers: vec![peer("doc", Role::Doctor)],
            ice_servers: vec![],
        });
        h.engine(EngineEvent::ConnectionState {
            peer: pid("doc"),
            state: PeerConnectionState::Connected,
        });
        assert_eq!(h.call.state(), CallState::Connected);
        h
    }
}

fn sent(out: &[Output]) -> Vec<&ClientMessage> {
    out.iter()
        .filter_map(|o| match o {
            Output::Signaling(SignalingCommand::Send(m)) => Some(m),
            _ => None,
        })
        .collect()
}

fn engine(out: &[Output]) -> Vec<&EngineCommand> {
    out.iter()
        .filter_map(|o| match o {
            Output::Engine(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn states(out: &[Output]) -> Vec<&CallState> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event(CallEvent::State(s)) => Some(s),
            _ => None,
        })
        .collect()
}

fn opens(out: &[Output]) -> usize {
    out.iter()
        .filter(|o| **o == Output::Signaling(SignalingCommand::Open))
        .count()
}

#[test]
fn a_patient_joins_waits_is_admitted_and_offers_to_the_doctor() {
    let mut h = Harness::new();
    let out = h.open_and_join(JoinAuth::InviteCode {
        code: "K7QM".into(),
    });
    assert!(matches!(
        sent(&out)[..],
        [ClientMessage::Join { display_name: Some(n), .. }] if n == "Ana"
    ));
    assert_eq!(h.call.state(), CallState::Joining);
    h.joined("pat", Role::Patient, false);
    let out = h.msg(ServerMessage::Waiting);
    assert_eq!(h.call.state(), CallState::Waiting);
    assert!(engine(&out).is_empty(), "no media before admission");

    let out = h.msg(ServerMessage::Admitted {
        sfu: false,
        peers: vec![peer("doc", Role::Doctor)],
        ice_servers: vec![IceServer {
            urls: vec!["turn:x".into()],
            username: Some("u".into()),
            credential: Some("p".into()),
        }],
    });
    // Admitted later than the doctor: we offer.
    assert!(matches!(
        engine(&out)[..],
        [EngineCommand::CreatePeer { peer, offerer: true, ice_servers }] if peer == &pid("doc") && ice_servers.len() == 1
    ));
    // The doctor, already there, is announced to the UI like anyone who joins.
    assert!(
        out.contains(&Output::Event(CallEvent::PeerJoined(peer(
            "doc",
            Role::Doctor
        )))),
        "{out:?}"
    );
    assert_eq!(h.call.state(), CallState::Connecting);

    let out = h.engine(EngineEvent::LocalDescription {
        peer: pid("doc"),
        kind: SdpKind::Offer,
        sdp: "offer".into(),
    });
    assert_eq!(
        sent(&out),
        [&ClientMessage::Offer {
            to: pid("doc"),
            sdp: "offer".into()
        }]
    );
    let out = h.msg(ServerMessage::Answer {
        from: pid("doc"),
        sdp: "answer".into(),
    });
    assert_eq!(
        engine(&out),
        [&EngineCommand::SetRemoteDescription {
            peer: pid("doc"),
            kind: SdpKind::Answer,
            sdp: "answer".into()
        }]
    );
    let cand = IceCandidate {
        candidate: "candidate:1".into(),
        sdp_mid: None,
        sdp_mline_index: Some(0),
        username_fragment: None,
    };
    let out = h.engine(EngineEvent::LocalCandidate {
        peer: pid("doc"),
        candidate: cand.clone(),
    });
    assert_eq!(
        sent(&out),
        [&ClientMessage::IceCandidate {
            to: pid("doc"),
            candidate: cand.clone()
        }]
    );
    let out = h.msg(ServerMessage::IceCandidate {
        from: pid("doc"),
        candidate: cand.clone(),
    });
    assert_eq!(
        engine(&out),
        [&EngineCommand::AddRemoteCandidate {
            peer: pid("doc"),
            candidate: cand
        }]
    );
    let out = h.engine(EngineEvent::ConnectionState {
        peer: pid("doc"),
        state: PeerConnectionState::Connected,
    });
    assert_eq!(states(&out), [&CallState::Connected]);
}

/// A doctor seated and admitted, alone in the consultation.
fn admitted_doctor() -> Harness {
    let mut h = Harness::new();
    h.open_and_join(JoinAuth::Token { token: "t".into() });
    h.joined("doc", Role::Doctor, false);
    h.msg(ServerMessage::Admitted {
        sfu: false,
        peers: vec![],
        ice_servers: vec![],
    });
    h
}

#[test]
fn a_doctor_admits_and_answers_the_patients_offer() {
    let mut h = admitted_doctor();
    assert_eq!(h.call.state(), CallState::WaitingForPeers);
    let waiting = vec![WaitingPatient {
        participant_id: pid("pat"),
        display_name: Some("Ana".into()),
        waiting_secs: 3,
        connected: true,
    }];
    let out = h.msg(ServerMessage::WaitingRoom {
        waiting: waiting.clone(),
    });
    assert!(out.contains(&Output::Event(CallEvent::WaitingRoom(waiting))));
    let out = h.user(UserCommand::Admit(pid("pat")));
    assert_eq!(
        sent(&out),
        [&ClientMessage::Admit {
            participant_id: pid("pat")
        }]
    );
    let out = h.msg(ServerMessage::PeerJoined {
        peer: peer("pat", Role::Patient),
    });
    assert!(matches!(
        engine(&out)[..],
        [EngineCommand::CreatePeer { offerer: false, .. }]
    ));
    let out = h.msg(ServerMessage::Offer {
        from: pid("pat"),
        sdp: "o".into(),
    });
    assert!(matches!(
        engine(&out)[..],
        [EngineCommand::SetRemoteDescription {
            kind: SdpKind::Offer,
            ..
        }]
    ));
    let out = h.engine(EngineEvent::LocalDescription {
        peer: pid("pat"),
        kind: SdpKind::Answer,
        sdp: "a".into(),
    });
    assert_eq!(
        sent(&out),
        [&ClientMessage::Answer {
            to: pid("pat"),
            sdp: "a".into()
        }]
    );
}

#[test]
fn denied_ends_the_call_without_retrying() {
    let mut h = Harness::new();
    h.open_and_join(JoinAuth::InviteCode { code: "X".into() });
    h.joined("pat", Role::Patient, false);
    h.msg(ServerMessage::Waiting);
    h.msg(ServerMessage::Denied);
    h.sig(SignalingEvent::Closed(close_code::DENIED));
    assert_eq!(h.call.state(), CallState::Ended(EndReason::Denied));
    let later = h.advance(Duration::from_secs(600));
    assert_eq!(opens(&later), 0);
    assert_eq!(h.call.poll_timeout(), None);
}

#[test]
fn a_lost_link_resumes_the_seat_and_keeps_the_media() {
    let mut h = Harness::connected_patient();
    let out = h.sig(SignalingEvent::Failed);
    assert_eq!(states(&out), [&CallState::Reconnecting]);
    assert!(
        engine(&out).is_empty(),
        "media is not touched when only signaling drops"
    );
    // The first attempt comes within the first backoff ceiling (250 ms).
    let out = h.advance(Duration::from_millis(250));
    assert_eq!(opens(&out), 1);
    let out = h.sig(SignalingEvent::Opened);
    assert_eq!(
        sent(&out),
        [&ClientMessage::Resume {
            protocol_version: 1,
            resume_token: "resume-pat".into()
        }]
    );
    let out = h.joined("pat", Role::Patient, true);
    // The seat is still admitted: the call goes straight back to connected, never through the
    // waiting room.
    assert_eq!(states(&out), [&CallState::Connected]);
    let out = h.msg(ServerMessage::Admitted {
        sfu: false,
        peers: vec![peer("doc", Role::Doctor)],
        ice_servers: vec![],
    });
    assert!(
        engine(&out).is_empty(),
        "no renegotiation after a cheap resume: {out:?}"
    );
    assert!(states(&out).is_empty());
    assert_eq!(h.call.state(), CallState::Connected);
}

#[test]
fn failed_attempts_back_off_with_jitter_and_give_up_after_the_limit() {
    let mut h = Harness::connected_patient();
    h.sig(SignalingEvent::Failed);
    let mut attempt_times = Vec::new();
    let start = h.now;
    loop {
        let out = h.advance(Duration::from_millis(10));
        if opens(&out) > 0 {
            attempt_times.push(h.now.duration_since(start));
            h.sig(SignalingEvent::Failed);
        }
        if matches!(h.call.state(), CallState::Ended(_)) {
            break;
        }
        assert!(
            h.now.duration_since(start) < Duration::from_secs(200),
            "never gave up"
        );
    }
    assert_eq!(h.call.state(), CallState::Ended(EndReason::ConnectionLost));
    let gaps: Vec<Duration> = attempt_times.windows(2).map(|w| w[1] - w[0]).collect();
    // Gaps are bounded by the doubling ceiling (plus one 10 ms step of the harness).
    let b = bedside_client_core::backoff::Backoff::default();
    for (n, gap) in gaps.iter().enumerate() {
        assert!(
            *gap <= b.ceiling(n as u32 + 1) + Duration::from_millis(10),
            "gap {n}: {gap:?}"
        );
    }
    // The cap holds attempts to at least one every 5 s: about two minutes means many tries.
    assert!(attempt_times.len() >= 20, "{}", attempt_times.len());
    assert!(h.now.duration_since(start) >= Duration::from_secs(120));
}

#[test]
fn an_expired_seat_escalates_to_a_full_rejoin_and_stays_escalated() {
    let mut h = Harness::connected_patient();
    h.sig(SignalingEvent::Closed(close_code::GOING_AWAY));
    h.advance(Duration::from_millis(250));
    h.sig(SignalingEvent::Opened);
    let out = h.msg(ServerMessage::Error {
        code: ErrorCode::ResumeExpired,
        message: "gone".into(),
        in_reply_to: Some("resume".into()),
    });
    // The old peer connection belonged to the old seat.
    assert!(engine(&out).contains(&&EngineCommand::ClosePeer { peer: pid("doc") }));
    assert!(matches!(sent(&out)[..], [ClientMessage::Join { .. }]));
    h.joined("pat2", Role::Patient, false);
    h.msg(ServerMessage::Waiting);
    assert_eq!(h.call.state(), CallState::Waiting);
    // A second loss goes straight to join, not resume.
    h.sig(SignalingEvent::Failed);
    h.advance(Duration::from_millis(250));
    let out = h.sig(SignalingEvent::Opened);
    assert!(
        matches!(sent(&out)[..], [ClientMessage::Join { .. }]),
        "{out:?}"
    );
}

#[test]
fn authentication_failures_and_server_orders_are_final() {
    for (event, reason) in [
        (
            SignalingEvent::Message(ServerMessage::Error {
                code: ErrorCode::TokenExpired,
                message: String::new(),
                in_reply_to: None,
            }),
            EndReason::AuthFailed(ErrorCode::TokenExpired),
        ),
        (
            SignalingEvent::Closed(close_code::ENDED),
            EndReason::ConsultationEnded,
        ),
        (
            SignalingEvent::Closed(close_code::REPLACED),
            EndReason::Replaced,
        ),
    ] {
        let mut h = Harness::connected_patient();
        h.sig(SignalingEvent::Failed);
        h.advance(Duration::from_millis(250));
        h.sig(SignalingEvent::Opened);
        let out = h.sig(event);
        assert_eq!(h.call.state(), CallState::Ended(reason));
        assert!(engine(&out).contains(&&EngineCommand::ClosePeer { peer: pid("doc") }));
        assert_eq!(opens(&h.advance(Duration::from_secs(300))), 0);
    }
}

#[test]
fn a_join_that_gets_no_answer_times_out_and_retries() {
    let mut h = Harness::new();
    h.open_and_join(JoinAuth::Token { token: "t".into() });
    let out = h.advance(Duration::from_secs(10));
    assert!(out.contains(&Output::Signaling(SignalingCommand::Close)));
    let out = h.advance(Duration::from_millis(500));
    assert_eq!(opens(&out), 1);
    assert_eq!(h.call.state(), CallState::Joining);
}

#[test]
fn a_silent_server_is_noticed_by_the_keepalive() {
    let mut h = Harness::connected_patient();
    // Pings go out every 5 s while seated.
    let out = h.advance(Duration::from_secs(5));
    assert!(matches!(sent(&out)[..], [ClientMessage::Ping { .. }]));
    // The server answers nothing for 12 s: the link counts as lost.
    let out = h.advance(Duration::from_secs(7));
    assert!(
        out.contains(&Output::Signaling(SignalingCommand::Close)),
        "{out:?}"
    );
    assert_eq!(h.call.state(), CallState::Reconnecting);
    // Any message resets the silence timer.
    let mut h = Harness::connected_patient();
    for _ in 0..10 {
        h.advance(Duration::from_secs(4));
        h.msg(ServerMessage::Pong { nonce: 1 });
    }
    assert_eq!(h.call.state(), CallState::Connected);
}

#[test]
fn ice_disconnect_restarts_from_the_offerer_and_asks_from_the_answerer() {
    // The patient offered: it restarts ICE itself.
    let mut h = Harness::connected_patient();
    let out = h.engine(EngineEvent::ConnectionState {
        peer: pid("doc"),
        state: PeerConnectionState::Disconnected,
    });
    assert_eq!(
        engine(&out),
        [&EngineCommand::RestartIce { peer: pid("doc") }]
    );
    assert_eq!(h.call.state(), CallState::Reconnecting);
    h.engine(EngineEvent::ConnectionState {
        peer: pid("doc"),
        state: PeerConnectionState::Connected,
    });
    assert_eq!(h.call.state(), CallState::Connected);

    // The doctor answered: it asks the patient to restart.
    let mut d = Harness::new();
    d.open_and_join(JoinAuth::Token { token: "t".into() });
    d.joined("doc", Role::Doctor, false);
    d.msg(ServerMessage::Admitted {
        sfu: false,
        peers: vec![],
        ice_servers: vec![],
    });
    d.msg(ServerMessage::PeerJoined {
        peer: peer("pat", Role::Patient),
    });
    d.engine(EngineEvent::ConnectionState {
        peer: pid("pat"),
        state: PeerConnectionState::Connected,
    });
    let out = d.engine(EngineEvent::ConnectionState {
        peer: pid("pat"),
        state: PeerConnectionState::Failed,
    });
    assert_eq!(sent(&out), [&ClientMessage::IceRestart { to: pid("pat") }]);
    // And when asked, the offerer restarts.
    let out = h.msg(ServerMessage::IceRestart { from: pid("doc") });
    assert_eq!(
        engine(&out),
        [&EngineCommand::RestartIce { peer: pid("doc") }]
    );
}

#[test]
fn an_ice_restart_that_does_not_recover_rebuilds_the_peer_connection() {
    let mut h = Harness::connected_patient();
    h.engine(EngineEvent::ConnectionState {
        peer: pid("doc"),
        state: PeerConnectionState::Failed,
    });
    let out = h.advance(Duration::from_secs(8));
    assert_eq!(
        engine(&out),
        [
            &EngineCommand::ClosePeer { peer: pid("doc") },
            &EngineCommand::CreatePeer {
                peer: pid("doc"),
                offerer: true,
                ice_servers: vec![]
            }
        ]
    );
}

#[test]
fn a_network_change_resumes_signaling_and_restarts_ice_at_once() {
    let mut h = Harness::connected_patient();
    let out = h.user(UserCommand::NetworkChanged);
    assert!(out.contains(&Output::Signaling(SignalingCommand::Close)));
    // Signaling is down, so the restart waits for the resume...
    assert!(engine(&out).is_empty());
    let out = h.advance(Duration::ZERO);
    assert_eq!(opens(&out), 1, "reconnects without backoff");
    h.sig(SignalingEvent::Opened);
    h.joined("pat", Role::Patient, true);
    let out = h.msg(ServerMessage::Admitted {
        sfu: false,
        peers: vec![peer("doc", Role::Doctor)],
        ice_servers: vec![],
    });
    // ...and happens as soon as the seat is back.
    assert_eq!(
        engine(&out),
        [&EngineCommand::RestartIce { peer: pid("doc") }]
    );
}

/// The same handover in a group consult through the SFU: the connection to restart is the
/// SFU's, and it restarts as soon as the seat is back (it once waited for ICE to notice the
/// dead path).
#[test]
fn a_network_change_in_an_sfu_call_restarts_ice_with_the_sfu() {
    let mut h = Harness::new();
    h.open_and_join(JoinAuth::InviteCode { code: "X".into() });
    h.joined("pat", Role::Patient, false);
    let group = || vec![peer("doc", Role::Doctor), peer("cli", Role::Clinician)];
    let out = h.msg(ServerMessage::Admitted {
        sfu: true,
        peers: group(),
        ice_servers: vec![],
    });
    assert!(
        engine(&out)
            .iter()
            .any(|c| matches!(c, EngineCommand::CreateSfu { .. })),
        "three participants go through the SFU: {out:?}"
    );
    h.engine(EngineEvent::ConnectionState {
        peer: sfu_peer(),
        state: PeerConnectionState::Connected,
    });
    assert_eq!(h.call.state(), CallState::Connected);
    let out = h.user(UserCommand::NetworkChanged);
    assert!(out.contains(&Output::Signaling(SignalingCommand::Close)));
    assert!(engine(&out).is_empty(), "nothing before the seat is back");
    let out = h.advance(Duration::ZERO);
    assert_eq!(opens(&out), 1, "reconnects without backoff");
    h.sig(SignalingEvent::Opened);
    h.joined("pat", Role::Patient, true);
    let out = h.msg(ServerMessage::Admitted {
        sfu: true,
        peers: group(),
        ice_servers: vec![],
    });
    assert_eq!(
        engine(&out),
        [&EngineCommand::RestartIce { peer: sfu_peer() }]
    );
}

#[test]
fn peers_come_and_go_with_the_server_s_word() {
    let mut h = Harness::connected_patient();
    let out = h.msg(ServerMessage::PeerReconnecting {
        participant_id: pid("doc"),
    });
    assert!(out.contains(&Output::Event(CallEvent::PeerReconnecting(pid("doc")))));
    let out = h.msg(ServerMessage::PeerBack {
        participant_id: pid("doc"),
    });
    assert!(out.contains(&Output::Event(CallEvent::PeerBack(pid("doc")))));
    let out = h.msg(ServerMessage::PeerLeft {
        participant_id: pid("doc"),
        reason: LeaveReason::TimedOut,
    });
    assert_eq!(
        engine(&out),
        [&EngineCommand::ClosePeer { peer: pid("doc") }]
    );
    assert_eq!(h.call.state(), CallState::WaitingForPeers);
}

#[test]
fn leave_says_goodbye_and_ends_when_the_server_closes() {
    let mut h = Harness::connected_patient();
    let out = h.user(UserCommand::Leave);
    assert_eq!(sent(&out), [&ClientMessage::Leave]);
    let out = h.sig(SignalingEvent::Closed(close_code::NORMAL));
    assert_eq!(h.call.state(), CallState::Ended(EndReason::Left));
    assert!(engine(&out).contains(&&EngineCommand::ClosePeer { peer: pid("doc") }));
    assert_eq!(opens(&h.advance(Duration::from_secs(60))), 0);
}

#[test]
fn device_and_audio_only_commands_reach_the_engine_and_the_ui() {
    let mut h = Harness::connected_patient();
    let out = h.user(UserCommand::SetAudioOnly(true));
    assert!(out.contains(&Output::Engine(EngineCommand::SetVideoSending(false))));
    assert!(out.contains(&Output::Event(CallEvent::AudioOnly {
        on: true,
        manual: true
    })));
    assert!(h.call.is_audio_only());
    let out = h.user(UserCommand::SetMicrophoneMuted(true));
    assert!(out.contains(&Output::Engine(EngineCommand::SetMicrophoneMuted(true))));
    let out = h.user(UserCommand::SetCameraEnabled(false));
    assert!(out.contains(&Output::Engine(EngineCommand::SetVideoSending(false))));
    // Leaving audio-only with the camera off still sends no video; turning the camera on does.
    let out = h.user(UserCommand::SetAudioOnly(false));
    assert!(out.contains(&Output::Engine(EngineCommand::SetVideoSending(false))));
    let out = h.user(UserCommand::SetCameraEnabled(true));
    assert!(out.contains(&Output::Engine(EngineCommand::SetVideoSending(true))));
    h.user(UserCommand::SetAudioOnly(true));
    // Stats go to the server as telemetry, saying whether the call is audio-only.
    h.call.handle_stats(
        h.now,
        pid("doc"),
        StatsReport {
            rtt_ms: Some(40.0),
            ..Default::default()
        },
    );
    let out = h.drain();
    assert!(matches!(
        sent(&out)[..],
        [ClientMessage::Stats { report }] if report.audio_only == Some(true) && report.rtt_ms == Some(40.0)
    ));
    assert!(out.iter().any(
        |o| matches!(o, Output::Event(CallEvent::Stats { report, .. })
        if report.connection_state.as_deref() == Some("connected"))
    ));
    // Stats about someone who is not a peer are ignored.
    h.call
        .handle_stats(h.now, pid("stranger"), StatsReport::default());
    assert!(h.drain().is_empty());
}

#[test]
fn a_peer_s_keyframe_requests_force_keyframes_at_a_bounded_rate() {
    let mut h = Harness::connected_patient();
    let request = || EngineEvent::KeyframeRequested { peer: pid("doc") };
    let keyframes = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Media(MediaCommand::Keyframe)))
            .count()
    };
    h.advance(Duration::from_secs(1));
    assert_eq!(keyframes(&h.engine(request())), 1);
    // A burst of requests (several PLIs after one loss) shares that keyframe.
    h.advance(Duration::from_millis(100));
    assert_eq!(keyframes(&h.engine(request())), 0);
    h.advance(Duration::from_millis(100));
    assert_eq!(keyframes(&h.engine(request())), 0);
    // Past the interval, a new request gets a new keyframe.
    h.advance(KEYFRAME_REQUEST_INTERVAL);
    assert_eq!(keyframes(&h.engine(request())), 1);
    // Not while no video is sent, and not for someone who is not a peer.
    h.user(UserCommand::SetAudioOnly(true));
    h.advance(Duration::from_secs(1));
    assert_eq!(keyframes(&h.engine(request())), 0);
    h.user(UserCommand::SetAudioOnly(false));
    assert_eq!(
        keyframes(&h.engine(EngineEvent::KeyframeRequested {
            peer: pid("stranger")
        })),
        0
    );
    assert_eq!(keyframes(&h.engine(request())), 1);
}

/// Our receiver cannot decode the doctor's video: it reports every frame it cannot show, and
/// the call asks the doctor for a keyframe at most once per interval (the one keyframe policy),
/// per peer, and never for someone who is not a peer.
#[test]
fn keyframes_are_asked_of_a_peer_through_the_call_at_a_bounded_rate() {
    let mut h = Harness::connected_patient();
    let needed = |peer: &str| EngineEvent::KeyframeNeeded { peer: pid(peer) };
    let asks = |out: &[Output]| {
        engine(out)
            .iter()
            .filter(
                |c| matches!(c, EngineCommand::RequestKeyframeFrom { peer } if *peer == pid("doc")),
            )
            .count()
    };
    h.advance(Duration::from_secs(1));
    assert_eq!(asks(&h.engine(needed("doc"))), 1);
    // Thirty undecodable frames a second share that request...
    for _ in 0..5 {
        h.advance(Duration::from_millis(33));
        assert_eq!(asks(&h.engine(needed("doc"))), 0);
    }
    // ...and past the interval, still frozen, the request is repeated (it may have been lost).
    h.advance(KEYFRAME_REQUEST_INTERVAL);
    assert_eq!(asks(&h.engine(needed("doc"))), 1);
    assert!(engine(&h.engine(needed("stranger"))).is_empty());
}

#[test]
fn backgrounding_pauses_video_and_coming_back_checks_the_link() {
    let mut h = Harness::connected_patient();
    h.advance(Duration::from_secs(1));
    let out = h.user(UserCommand::SetBackgrounded(true));
    assert_eq!(engine(&out), [&EngineCommand::SetVideoSending(false)]);
    // Audio goes on: nothing is said to the server, the call stays connected.
    assert!(sent(&out).is_empty());
    assert_eq!(h.call.state(), CallState::Connected);
    h.advance(Duration::from_secs(2));
    let out = h.user(UserCommand::SetBackgrounded(false));
    assert_eq!(engine(&out), [&EngineCommand::SetVideoSending(true)]);
    // The link is checked at once rather than at the next regular ping.
    let out = h.advance(Duration::from_millis(1));
    assert!(
        sent(&out)
            .iter()
            .any(|m| matches!(m, ClientMessage::Ping { .. })),
        "{out:?}"
    );
    // Camera off stays off through a trip to the background.
    h.user(UserCommand::SetCameraEnabled(false));
    h.user(UserCommand::SetBackgrounded(true));
    let out = h.user(UserCommand::SetBackgrounded(false));
    assert_eq!(engine(&out), [&EngineCommand::SetVideoSending(false)]);

    // Suspended for longer than the keepalive allows: when its timers run again, the client
    // finds the link lost and reconnects to resume its seat.
    h.user(UserCommand::SetBackgrounded(true));
    let out = h.advance(Duration::from_secs(30));
    assert!(opens(&out) >= 1, "{out:?}");
    assert!(states(&out).contains(&&CallState::Reconnecting), "{out:?}");
}

#[test]
fn an_hour_of_virtual_time_runs_instantly() {
    let mut h = Harness::connected_patient();
    for _ in 0..720 {
        h.advance(Duration::from_secs(5));
        h.msg(ServerMessage::Pong { nonce: 0 });
    }
    assert_eq!(h.call.state(), CallState::Connected);
}

#[test]
fn a_bandwidth_collapse_goes_audio_only_and_recovery_brings_video_back() {
    let mut h = Harness::connected_patient();
    let feed = |h: &mut Harness, kbps: u32, secs: u64| {
        let mut out = Vec::new();
        for _ in 0..secs * 10 {
            h.now += Duration::from_millis(100);
            h.call.handle_bandwidth(h.now, kbps);
            out.extend(h.drain());
        }
        out
    };
    feed(&mut h, 3000, 3);
    assert!(!h.call.is_audio_only());
    let out = feed(&mut h, 100, 3);
    assert!(
        out.contains(&Output::Event(CallEvent::AudioOnly {
            on: true,
            manual: false
        })),
        "{out:?}"
    );
    assert!(out.contains(&Output::Engine(EngineCommand::SetVideoSending(false))));
    assert!(h.call.is_audio_only());
    // Telemetry says so.
    h.call
        .handle_stats(h.now, pid("doc"), StatsReport::default());
    assert!(
        sent(&h.drain()).iter().any(
            |m| matches!(m, ClientMessage::Stats { report } if report.audio_only == Some(true))
        )
    );
    let out = feed(&mut h, 2000, 10);
    assert!(
        out.contains(&Output::Event(CallEvent::AudioOnly {
            on: false,
            manual: false
        })),
        "{out:?}"
    );
    assert!(out.contains(&Output::Engine(EngineCommand::SetVideoSending(true))));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Media(MediaCommand::SetVideoEncoding { width: 320, .. })
    )));
}

#[test]
fn chat_goes_to_connected_peers_and_says_when_it_cannot() {
    let mut h = Harness::new();
    // Not in a consultation yet.
    let out = h.user(UserCommand::SendChat("hello".into()));
    assert!(
        matches!(
            &out[..],
            [Output::Event(CallEvent::ChatNotDelivered { to: None, .. })]
        ),
        "{out:?}"
    );
    let mut h = Harness::connected_patient();
    let out = h.user(UserCommand::SendChat("My knee hurts".into()));
    assert_eq!(
        engine(&out),
        [&EngineCommand::SendChat {
            peer: pid("doc"),
            id: 1,
            text: "My knee hurts".into()
        }]
    );
    assert!(out.contains(&Output::Event(CallEvent::Chat {
        id: 1,
        from: pid("pat"),
        text: "My knee hurts".into(),
        outgoing: true,
    })));
    // Blank or oversized text never reaches the engine.
    for text in ["  \n".to_owned(), "x".repeat(5000)] {
        let out = h.user(UserCommand::SendChat(text));
        assert!(engine(&out).is_empty(), "{out:?}");
        assert!(
            matches!(
                &out[..],
                [Output::Event(CallEvent::ChatNotDelivered { .. })]
            ),
            "{out:?}"
        );
    }
    // A line from the doctor, and from someone unknown (dropped).
    let out = h.engine(EngineEvent::ChatReceived {
        peer: pid("doc"),
        id: 9,
        text: "Can you bend it?".into(),
    });
    assert!(out.contains(&Output::Event(CallEvent::Chat {
        id: 9,
        from: pid("doc"),
        text: "Can you bend it?".into(),
        outgoing: false,
    })));
    let out = h.engine(EngineEvent::ChatReceived {
        peer: pid("stranger"),
        id: 1,
        text: "hi".into(),
    });
    assert!(out.is_empty(), "{out:?}");
    // The engine could not hand it over: the sender is told.
    let out = h.engine(EngineEvent::ChatUndelivered {
        peer: pid("doc"),
        id: 4,
    });
    assert!(
        matches!(
            &out[..],
            [Output::Event(CallEvent::ChatNotDelivered {
                id: 4,
                to: Some(_),
                ..
            })]
        ),
        "{out:?}"
    );
    // The doctor's media dropped: nobody to send to.
    h.engine(EngineEvent::ConnectionState {
        peer: pid("doc"),
        state: PeerConnectionState::Disconnected,
    });
    let out = h.user(UserCommand::SendChat("are you there?".into()));
    assert!(
        engine(&out)
            .iter()
            .all(|c| !matches!(c, EngineCommand::SendChat { .. }))
    );
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Event(CallEvent::ChatNotDelivered { to: None, .. })
        )),
        "{out:?}"
    );
}

/// The connection was rebuilt as the answerer and the offer applied to it.
fn rebuilt_to_answer(out: &[Output]) -> bool {
    matches!(
        engine(out)[..],
        [
            EngineCommand::ClosePeer { .. },
            EngineCommand::CreatePeer { offerer: false, .. },
            EngineCommand::SetRemoteDescription {
                kind: SdpKind::Offer,
                ..
            }
        ]
    )
}

#[test]
fn an_offer_from_a_new_session_of_a_known_peer_rebuilds_the_connection() {
    // A browser patient reloads its page mid-call: it resumes its seat and offers from a new
    // peer connection (new session id, new DTLS), which the old one cannot continue.
    let mut h = admitted_doctor();
    h.msg(ServerMessage::PeerJoined {
        peer: peer("pat", Role::Patient),
    });
    let offer = |session: u32, version: u32| ServerMessage::Offer {
        from: pid("pat"),
        sdp: format!("v=0\r\no=- {session} {version} IN IP4 127.0.0.1\r\ns=-\r\n"),
    };
    let applied = |out: &[Output]| {
        matches!(
            engine(out)[..],
            [EngineCommand::SetRemoteDescription {
                kind: SdpKind::Offer,
                ..
            }]
        )
    };
    assert!(applied(&h.msg(offer(7, 2))));
    // An ICE restart renegotiates the same session: applied to the same connection.
    assert!(applied(&h.msg(offer(7, 3))));
    let out = h.msg(offer(9, 2));
    assert!(rebuilt_to_answer(&out), "{out:?}");
}

fn sdp(session: u32, version: u32) -> String {
    format!("v=0\r\no=- {session} {version} IN IP4 127.0.0.1\r\ns=-\r\n")
}

/// A doctor whose patient joined after it, offered (session 7) and connected: the doctor is
/// the answerer.
fn doctor_answering_a_connected_patient() -> Harness {
    let mut h = admitted_doctor();
    h.msg(ServerMessage::PeerJoined {
        peer: peer("pat", Role::Patient),
    });
    h.msg(ServerMessage::Offer {
        from: pid("pat"),
        sdp: sdp(7, 2),
    });
    h.engine(EngineEvent::ConnectionState {
        peer: pid("pat"),
        state: PeerConnectionState::Connected,
    });
    assert_eq!(h.call.state(), CallState::Connected);
    h
}

fn rebuilt_as_offerer(out: &[Output]) -> bool {
    matches!(
        engine(out)[..],
        [
            EngineCommand::ClosePeer { .. },
            EngineCommand::CreatePeer { offerer: true, .. }
        ]
    )
}

/// The lab's miss: the doctor's peer connection's event loop had stopped, every ICE-restart
/// offer was answered with a failed command, and nothing rebuilt it. Now the engine says the
/// connection stopped and the call rebuilds it, offering (it was the answerer), and the new
/// connection's offer goes to the patient.
#[test]
fn a_peer_connection_whose_event_loop_stopped_is_rebuilt_offering() {
    let mut h = doctor_answering_a_connected_patient();
    let out = h.engine(EngineEvent::PeerStopped { peer: pid("pat") });
    assert!(rebuilt_as_offerer(&out), "{out:?}");
    assert_eq!(h.call.state(), CallState::Reconnecting);
    let out = h.engine(EngineEvent::LocalDescription {
        peer: pid("pat"),
        kind: SdpKind::Offer,
        sdp: sdp(11, 2),
    });
    assert!(
        matches!(sent(&out)[..], [ClientMessage::Offer { to, .. }] if *to == pid("pat")),
        "{out:?}"
    );
    // The patient answers from its rebuilt connection; media comes back.
    let out = h.msg(ServerMessage::Answer {
        from: pid("pat"),
        sdp: sdp(12, 2),
    });
    assert!(matches!(
        engine(&out)[..],
        [EngineCommand::SetRemoteDescription {
            kind: SdpKind::Answer,
            ..
        }]
    ));
    h.engine(EngineEvent::ConnectionState {
        peer: pid("pat"),
        state: PeerConnectionState::Connected,
    });
    assert_eq!(h.call.state(), CallState::Connected);
    // A stopped connection of someone who is not a peer is nobody's business.
    assert!(
        engine(&h.engine(EngineEvent::PeerStopped {
            peer: pid("stranger")
        }))
        .is_empty()
    );
}

/// Both sides rebuilt at once and offered: the lower participant id's offer wins ("doc" <
/// "pat"), so the doctor keeps its offer and drops the patient's, and the patient, seeing the
/// doctor's offer from a new session, gives its own up and answers.
#[test]
fn when_both_sides_rebuild_at_once_one_offer_wins() {
    let mut h = doctor_answering_a_connected_patient();
    h.engine(EngineEvent::PeerStopped { peer: pid("pat") });
    let out = h.msg(ServerMessage::Offer {
        from: pid("pat"),
        sdp: sdp(13, 2),
    });
    assert!(engine(&out).is_empty(), "{out:?}");
    // The patient's side: it offered first (admitted after the doctor) and rebuilt too.
    let mut p = Harness::connected_patient();
    p.msg(ServerMessage::Answer {
        from: pid("doc"),
        sdp: sdp(5, 2),
    });
    let out = p.engine(EngineEvent::PeerStopped { peer: pid("doc") });
    assert!(rebuilt_as_offerer(&out), "{out:?}");
    let out = p.msg(ServerMessage::Offer {
        from: pid("doc"),
        sdp: sdp(6, 2),
    });
    assert!(rebuilt_to_answer(&out), "{out:?}");
}

/// The lab's other miss: the doctor's picture of the patient froze for good while the
/// patient's video kept arriving, despite 22 keyframe requests. Undecodable video with
/// requests going unanswered for `frozen_video_rebuild_after` rebuilds the connection; a
/// picture that moves in between (frames decoded) starts the count again.
#[test]
fn video_that_stays_undecodable_despite_keyframe_requests_rebuilds_the_connection() {
    let mut h = doctor_answering_a_connected_patient();
    let after = CallConfig::default().frozen_video_rebuild_after;
    let needed = || EngineEvent::KeyframeNeeded { peer: pid("pat") };
    // The signaling link stays up meanwhile (the server answers pings).
    let tick = |h: &mut Harness| {
        h.advance(Duration::from_millis(100));
        h.msg(ServerMessage::Pong { nonce: 0 });
    };
    let moving = StatsReport {
        video_received: Some(VideoStats {
            width: 320,
            height: 180,
            fps: 12.0,
            bitrate_kbps: 200.0,
        }),
        ..Default::default()
    };
    // Frozen for most of the interval, then a frame decodes: no rebuild, the count restarts.
    let mut requests = 0;
    let mut frozen_for = Duration::ZERO;
    while frozen_for + Duration::from_millis(100) < after {
        let out = h.engine(needed());
        assert!(!rebuilt_as_offerer(&out), "{out:?}");
        requests += engine(&out)
            .iter()
            .filter(|c| matches!(c, EngineCommand::RequestKeyframeFrom { .. }))
            .count();
        tick(&mut h);
        frozen_for += Duration::from_millis(100);
    }
    assert!(requests >= 20, "{requests} keyframe requests");
    h.call.handle_stats(h.now, pid("pat"), moving.clone());
    h.drain();
    let mut rebuilt_at = None;
    for i in 0..200u32 {
        let out = h.engine(needed());
        if rebuilt_as_offerer(&out) {
            rebuilt_at = Some(Duration::from_millis(100) * i);
            break;
        }
        tick(&mut h);
    }
    let rebuilt_at = rebuilt_at.expect("rebuilt");
    assert!(
        rebuilt_at >= after && rebuilt_at <= after + Duration::from_millis(100),
        "rebuilt after {rebuilt_at:?}"
    );
    // The rebuilt connection is not judged before it connects.
    for _ in 0..100 {
        assert!(!rebuilt_as_offerer(&h.engine(needed())));
        tick(&mut h);
    }
}

fn redirect(url: &str) -> ServerMessage {
    ServerMessage::Redirect {
        region: "eu".into(),
        url: url.into(),
        web_url: None,
    }
}

fn opens_at(out: &[Output]) -> Option<String> {
    out.iter().find_map(|o| match o {
        Output::Signaling(SignalingCommand::OpenAt(url)) => Some(url.clone()),
        _ => None,
    })
}

#[test]
fn a_redirect_while_joining_sends_the_same_join_to_the_region_it_names() {
    let mut h = Harness::new();
    let auth = JoinAuth::InviteCode {
        code: "EU-7K3M9-Q2XR4".into(),
    };
    h.open_and_join(auth.clone());
    let out = h.msg(redirect("wss://eu.clinic.example/ws"));
    assert_eq!(
        opens_at(&out).as_deref(),
        Some("wss://eu.clinic.example/ws"),
        "{out:?}"
    );
    let out = h.sig(SignalingEvent::Opened);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Signaling(SignalingCommand::Send(ClientMessage::Join { auth: a, .. })) if *a == auth
        )),
        "{out:?}"
    );
    // Two regions sending the client to each other: followed a few times, then ignored (the
    // error after it then ends the attempt).
    for _ in 1..MAX_REDIRECTS {
        assert!(opens_at(&h.msg(redirect("wss://us.clinic.example/ws"))).is_some());
        h.sig(SignalingEvent::Opened);
    }
    assert_eq!(
        opens_at(&h.msg(redirect("wss://eu.clinic.example/ws"))),
        None
    );
    let out = h.msg(ServerMessage::error(
        ErrorCode::ConsultationNotFound,
        "elsewhere",
        Some("join"),
    ));
    assert!(
        out.contains(&Output::Signaling(SignalingCommand::Close)),
        "{out:?}"
    );
}

#[test]
fn a_redirect_to_something_else_than_a_websocket_or_once_seated_is_ignored() {
    let mut h = Harness::new();
    h.open_and_join(JoinAuth::InviteCode { code: "X".into() });
    assert_eq!(opens_at(&h.msg(redirect("https://evil.example/"))), None);
    h.joined("pat", Role::Patient, false);
    assert_eq!(
        opens_at(&h.msg(redirect("wss://eu.clinic.example/ws"))),
        None
    );
}

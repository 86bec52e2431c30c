//! The screens rendered from a model with egui_kittest (no server, no window, no GPU): what they
//! show for each state, and which commands clicks produce.

use bedside_client_core::call::{CallEvent, CallState, UserCommand};
use bedside_desktop::{AppModel, Drafts, Screen, UiCommand, VideoView, view};
use bedside_protocol::{ParticipantId, Peer, Role, StatsReport, VideoStats, WaitingPatient};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

mod support;
use support::raster::SoftRenderer;

struct State {
    model: AppModel,
    drafts: Drafts,
    commands: Vec<UiCommand>,
}

fn harness(model: AppModel) -> Harness<'static, State> {
    Harness::builder()
        .with_size(egui::vec2(1200.0, 900.0))
        .renderer(SoftRenderer::default())
        .build_ui_state(
            |ui, state: &mut State| {
                bedside_desktop::view::apply_style(ui.ctx());
                let out = view(ui, &state.model, &mut state.drafts, &VideoView::default());
                state.commands.extend(out);
            },
            State {
                model,
                drafts: Drafts::default(),
                commands: Vec::new(),
            },
        )
}

fn pid(s: &str) -> ParticipantId {
    ParticipantId(s.into())
}

fn consultation() -> AppModel {
    let mut m = AppModel {
        has_session: true,
        invite_code: Some("ABCD-1234".into()),
        ..AppModel::default()
    };
    m.apply(CallEvent::State(CallState::WaitingForPeers));
    m
}

fn in_call() -> AppModel {
    let mut m = consultation();
    m.apply(CallEvent::PeerJoined(Peer {
        participant_id: pid("p1"),
        role: Role::Patient,
        display_name: Some("Ada Lovelace".into()),
        connected: true,
    }));
    m.apply(CallEvent::State(CallState::Connected));
    m
}

fn report(rtt: f64, loss: f64) -> StatsReport {
    StatsReport {
        rtt_ms: Some(rtt),
        loss_in_pct: Some(loss),
        video_received: Some(VideoStats {
            width: 640,
            height: 360,
            fps: 25.0,
            bitrate_kbps: 700.0,
        }),
        ..StatsReport::default()
    }
}

#[test]
fn connect_screen_offers_both_ways() {
    let mut h = harness(AppModel::default());
    h.run();
    assert_eq!(h.state().model.screen(), Screen::Connect);
    h.snapshot("connect");
    h.get_by_label("Start a local clinic on this computer")
        .click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::StartLocalClinic]);
    // "Connect to a clinic" is the section title and the button.
    assert!(h.query_all_by_label("Connect to a clinic").count() >= 1);
}

#[test]
fn connect_button_sends_url_and_token() {
    let mut h = harness(AppModel::default());
    h.state_mut().drafts = Drafts {
        ws_url: " ws://clinic.test/ws ".into(),
        token: "secret-token".into(),
        ..Drafts::default()
    };
    h.run();
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Connect to a clinic")
        .click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::ConnectToClinic {
            ws_url: "ws://clinic.test/ws".into(),
            token: "secret-token".into()
        }]
    );
}

#[test]
fn waiting_room_shows_patient_and_admit_deny_produce_commands() {
    let mut m = consultation();
    m.apply(CallEvent::WaitingRoom(vec![WaitingPatient {
        participant_id: pid("p7"),
        display_name: Some("Grace Hopper".into()),
        waiting_secs: 42,
        connected: true,
    }]));
    // The counter counts up from when the list arrived: held still for the snapshots.
    m.waiting_at = None;
    let mut h = harness(m);
    h.run();
    assert_eq!(h.state().model.screen(), Screen::Consultation);
    h.snapshot("waiting_room");
    h.get_by_label("Grace Hopper");
    h.get_by_label("waiting 42 s");
    h.get_by_label("ABCD-1234");
    h.get_by_label("Admit").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Call(UserCommand::Admit(pid("p7")))]
    );
    h.state_mut().commands.clear();
    // Deny asks first; cancelling sends nothing.
    h.get_by_label("Deny").click();
    h.run();
    // The pointer away from the button, so no tooltip depends on timing.
    h.hover_at(egui::pos2(600.0, 890.0));
    h.run();
    h.snapshot("confirm_deny");
    h.get_by_label("Turn Grace Hopper away?");
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Cancel")
        .click();
    h.run();
    assert!(h.state().commands.is_empty());
    assert!(h.query_by_label("Turn Grace Hopper away?").is_none());
    h.get_by_label("Deny").click();
    h.run();
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Turn away")
        .click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Call(UserCommand::Deny(pid("p7")))]
    );
    assert!(h.state().drafts.confirm.is_none());
    h.state_mut().commands.clear();
    h.get_by_label("Copy").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Copy("ABCD-1234".into())]
    );
}

#[test]
fn empty_waiting_room_says_so() {
    let mut h = harness(consultation());
    h.run();
    h.get_by_label("Nobody is waiting.");
}

#[test]
fn in_call_shows_reconnecting_banner() {
    let mut m = in_call();
    m.apply(CallEvent::State(CallState::Reconnecting));
    let mut h = harness(m);
    h.run();
    assert_eq!(h.state().model.screen(), Screen::InCall);
    h.get_by_label("Reconnecting…");
    h.get_by_label("Ada Lovelace");
}

#[test]
fn in_call_shows_audio_only_banner_and_toggle() {
    let mut m = in_call();
    m.apply(CallEvent::AudioOnly {
        on: true,
        manual: false,
    });
    let mut h = harness(m);
    h.run();
    h.snapshot("in_call_audio_only");
    h.get_by_label("Audio only: the network is too weak for video");
    // Not asked for by the doctor: the button still offers audio-only.
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Audio only")
        .click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Call(UserCommand::SetAudioOnly(true))]
    );

    let mut m = in_call();
    m.apply(CallEvent::AudioOnly {
        on: true,
        manual: true,
    });
    let mut h = harness(m);
    h.run();
    h.get_by_label("Video back on").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Call(UserCommand::SetAudioOnly(false))]
    );
}

#[test]
fn in_call_buttons_produce_commands() {
    let mut h = harness(in_call());
    h.run();
    for (label, expected) in [
        ("Mute", UserCommand::SetMicrophoneMuted(true)),
        ("Camera off", UserCommand::SetCameraEnabled(false)),
    ] {
        h.state_mut().commands.clear();
        h.get_by_label(label).click();
        h.run();
        assert_eq!(
            h.state().commands,
            vec![UiCommand::Call(expected)],
            "{label}"
        );
    }
    // Leave asks first.
    h.state_mut().commands.clear();
    h.get_by_label("Leave").click();
    h.run();
    // The pointer away from the button, so no tooltip depends on timing.
    h.hover_at(egui::pos2(600.0, 890.0));
    h.run();
    h.snapshot("confirm_leave");
    assert!(h.state().commands.is_empty());
    h.get_by_label("Leave now").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Call(UserCommand::Leave)]
    );
    // The model changes only through events: muting shows once the client confirms it.
    h.state_mut().model.apply(CallEvent::MicrophoneMuted(true));
    h.run();
    h.get_by_label("Unmute");
}

#[test]
fn poor_network_banner_and_stats_panel_render_with_history() {
    let mut m = in_call();
    for i in 0..30 {
        m.apply(CallEvent::Stats {
            participant_id: pid("p1"),
            report: report(40.0 + f64::from(i), 0.5),
        });
    }
    let mut h = harness(m);
    h.run();
    // The plots are folded away in "Call details" until asked for.
    assert!(h.query_by_label("RTT (ms): 69.0").is_none());
    h.get_by_label("Call details").click();
    h.run();
    h.snapshot("in_call_with_stats");
    assert!(h.query_by_label("Patient's network is poor").is_none());
    h.get_by_label("Call quality");
    h.get_by_label("RTT (ms): 69.0");
    h.get_by_label("Loss (%): 0.5");
    h.get_by_label("Bitrate (kbps): 700.0");
    h.get_by_label("Frame rate (fps): 25.0");
    h.get_by_label("Resolution (lines): 360.0");
    h.get_by_label("Call quality: good");
    assert_eq!(h.state().model.stats.rtt_ms.0.len(), 30);

    h.state_mut().model.apply(CallEvent::Stats {
        participant_id: pid("p1"),
        report: report(450.0, 0.0),
    });
    h.run();
    h.get_by_label("Patient's network is poor");
    h.get_by_label("Call quality: poor");
    h.get_by_label("(the patient's connection is very slow to answer)");
    h.state_mut().model.apply(CallEvent::Stats {
        participant_id: pid("p1"),
        report: report(250.0, 0.0),
    });
    h.run();
    h.get_by_label("Call quality: fair");
    h.get_by_label("(the patient's connection is slow to answer)");
    h.state_mut().model.apply(CallEvent::Stats {
        participant_id: pid("p1"),
        report: report(50.0, 7.5),
    });
    h.run();
    h.get_by_label("Patient's network is poor");
    h.get_by_label("(the patient's connection is losing many packets)");
}

#[test]
fn stats_history_is_a_ring_buffer() {
    let mut m = in_call();
    for i in 0..(bedside_desktop::model::HISTORY_LEN + 10) {
        m.apply(CallEvent::Stats {
            participant_id: pid("p1"),
            report: report(i as f64, 0.0),
        });
    }
    assert_eq!(m.stats.rtt_ms.0.len(), bedside_desktop::model::HISTORY_LEN);
    assert_eq!(m.stats.rtt_ms.0.front().unwrap()[1], 10.0);
}

#[test]
fn ended_screen_goes_back() {
    let mut m = in_call();
    m.apply(CallEvent::State(CallState::Ended(
        bedside_client_core::call::EndReason::ConsultationEnded,
    )));
    let mut h = harness(m);
    h.run();
    assert_eq!(h.state().model.screen(), Screen::Ended);
    h.snapshot("ended");
    h.get_by_label("The consultation has ended.");
    h.get_by_label("Back to start").click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::Reset]);
}

#[test]
fn status_json_has_no_names() {
    let mut m = in_call();
    m.apply(CallEvent::WaitingRoom(vec![WaitingPatient {
        participant_id: pid("p9"),
        display_name: Some("Secret Name".into()),
        waiting_secs: 1,
        connected: true,
    }]));
    let s = m.status_json().to_string();
    assert!(
        !s.contains("Secret Name") && !s.contains("Ada") && !s.contains("ABCD"),
        "{s}"
    );
    assert!(s.contains("\"waiting\":1"), "{s}");
}

#[test]
fn chat_sends_the_draft_and_shows_both_sides() {
    let mut h = harness(in_call());
    h.run();
    h.get_by_label("Messages are not stored.");
    // Nothing to send yet: the button is disabled.
    h.get_by_label("Send").click();
    h.run();
    assert!(h.state().commands.is_empty());
    h.state_mut().drafts.chat = "Please sit closer to the camera".into();
    h.run();
    h.get_by_label("Send").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::SendChat(
            "Please sit closer to the camera".into()
        )]
    );
    assert!(h.state().drafts.chat.is_empty(), "the draft is cleared");
    // Lines show once the client reports them, ours and the patient's (by name).
    let m = &mut h.state_mut().model;
    m.apply(CallEvent::Chat {
        id: 1,
        from: pid("me"),
        text: "Please sit closer to the camera".into(),
        outgoing: true,
    });
    m.apply(CallEvent::Chat {
        id: 1,
        from: pid("p1"),
        text: "Is this better?".into(),
        outgoing: false,
    });
    h.run();
    h.snapshot("in_call_chat");
    h.get_by_label("You:");
    h.get_by_label("Ada Lovelace:");
    h.get_by_label("Is this better?");
    h.state_mut().model.apply(CallEvent::ChatNotDelivered {
        id: 2,
        to: None,
        reason: "nobody is connected to receive it".into(),
    });
    h.run();
    h.get_by_label("Message not delivered: nobody is connected to receive it");
    // Over the limit: not sendable, and the doctor is told why.
    h.state_mut().commands.clear();
    h.state_mut().drafts.chat = "x".repeat(bedside_protocol::chat::MAX_CHAT_BYTES + 1);
    h.run();
    h.get_by_label("Send").click();
    h.run();
    assert!(h.state().commands.is_empty());
    h.get_by_label(&format!(
        "Too long: {} of {} bytes",
        bedside_protocol::chat::MAX_CHAT_BYTES + 1,
        bedside_protocol::chat::MAX_CHAT_BYTES
    ));
}

#[test]
fn chat_keeps_a_bounded_history_and_stays_out_of_the_status() {
    let mut m = in_call();
    for i in 0..(bedside_desktop::model::CHAT_LINES_KEPT + 5) {
        m.apply(CallEvent::Chat {
            id: i as u64,
            from: pid("p1"),
            text: format!("secret symptom {i}"),
            outgoing: false,
        });
    }
    assert_eq!(m.chat.len(), bedside_desktop::model::CHAT_LINES_KEPT);
    assert_eq!(m.chat[0].text, "secret symptom 5");
    let s = m.status_json().to_string();
    assert!(!s.contains("symptom"), "{s}");
}

#[test]
fn self_view_says_why_there_is_no_picture() {
    let mut m = in_call();
    let mut h = harness(m.clone());
    h.run();
    h.get_by_label("Starting the camera…");
    m.apply(CallEvent::CameraEnabled(false));
    let mut h = harness(m);
    h.run();
    // The banner text and the self view both say so.
    assert!(h.query_all_by_label("Camera off").count() >= 1);
}

#[test]
fn device_pickers_list_the_devices_and_a_pick_sends_a_command() {
    use bedside_desktop::devices::{Choice, DeviceLists};
    let mut m = consultation();
    m.devices = DeviceLists::with_devices(
        vec![Choice {
            id: "0".into(),
            name: "USB camera".into(),
        }],
        Vec::new(),
        Vec::new(),
    );
    m.camera = "0".into();
    let mut h = harness(m);
    h.run();
    // A camera exists: no "no camera" note; the microphone list has only the test tone.
    assert!(
        h.query_by_label("No camera found: the patient sees a test pattern.")
            .is_none()
    );
    h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Camera")
        .click();
    h.run();
    h.get_by_label("Test pattern").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::ChooseCamera(
            bedside_desktop::settings::TEST_PATTERN.into()
        )]
    );
}

#[test]
fn today_s_consultations_open_and_create() {
    use bedside_protocol::ConsultationId;
    use bedside_server::api::ConsultationSummary;
    let summary = |id: &str, created_at: u64, ended: bool| ConsultationSummary {
        consultation_id: ConsultationId(id.into()),
        created_at,
        ended_at: ended.then_some(created_at + 60),
        seats: 2,
        waiting: 1,
        connected: 1,
    };
    let mut m = consultation();
    // Without an administration key (a remote clinic) there is no list.
    let mut h = harness(m.clone());
    h.run();
    assert!(h.query_by_label("Today's consultations").is_none());
    m.consultations = Some(vec![
        summary("c-new", 3600 * 14 + 5 * 60, false),
        summary("c-old", 3600 * 9, true),
        summary("c-here", 3600 * 8, false),
    ]);
    m.consultation_id = Some(ConsultationId("c-here".into()));
    let mut h = harness(m);
    h.run();
    // Times are the doctor's (UTC here; one hour ahead below).
    h.get_by_label("14:05");
    h.get_by_label("ended");
    h.get_by_label("you are here");
    // Only the open consultation that the doctor is not in can be opened.
    h.get_by_label("Open").click();
    h.run();
    h.get_by_label("New consultation").click();
    h.run();
    h.get_by_label("Refresh").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![
            UiCommand::OpenConsultation(ConsultationId("c-new".into())),
            UiCommand::NewConsultation,
            UiCommand::RefreshConsultations,
        ]
    );
}

#[test]
fn times_are_in_the_doctor_s_time_zone() {
    let m = AppModel {
        utc_offset_secs: 3600,
        ..AppModel::default()
    };
    assert_eq!(m.local_time(3600 * 14 + 5 * 60), "15:05");
    let m = AppModel {
        utc_offset_secs: -5 * 3600,
        ..AppModel::default()
    };
    assert_eq!(m.local_time(3600 * 2), "21:00");
}

#[test]
fn a_doctor_credential_signs_in_and_the_clinic_list_shows() {
    use bedside_protocol::ConsultationId;
    use bedside_server::api::ConsultationSummary;
    let mut h = harness(AppModel::default());
    h.state_mut().drafts = Drafts {
        ws_url: "https://clinic.example".into(),
        token: "bdc_0123456789".into(),
        ..Drafts::default()
    };
    h.run();
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Connect to a clinic")
        .click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::SignIn {
            address: "https://clinic.example".into(),
            credential: "bdc_0123456789".into(),
        }]
    );
    // Signed in, no consultation yet: today's list.
    let mut m = AppModel {
        clinic_label: Some("clinic.example".into()),
        consultations: Some(vec![ConsultationSummary {
            consultation_id: ConsultationId("c-1".into()),
            created_at: 3600 * 9 + 30 * 60,
            ended_at: None,
            seats: 1,
            waiting: 1,
            connected: 0,
        }]),
        ..AppModel::default()
    };
    m.utc_offset_secs = 0;
    let mut h = harness(m);
    h.run();
    assert_eq!(h.state().model.screen(), Screen::Clinic);
    h.snapshot("remote_clinic");
    h.get_by_label("09:30");
    h.get_by_label("1 waiting · 0 connected");
    h.get_by_label("Open").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::OpenConsultation(ConsultationId("c-1".into()))]
    );
    // Signed in with a credential, the list offers to sign out (a local clinic's does not).
    let mut h = harness(AppModel {
        signed_in: true,
        consultations: Some(Vec::new()),
        ..AppModel::default()
    });
    h.run();
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Sign out")
        .click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::SignOut]);
}

#[test]
fn a_patient_arriving_during_a_call_is_announced_and_counted_once() {
    let mut m = in_call();
    let grace = WaitingPatient {
        participant_id: pid("p8"),
        display_name: Some("Grace Hopper".into()),
        waiting_secs: 75,
        connected: true,
    };
    m.apply(CallEvent::WaitingRoom(vec![grace.clone()]));
    assert_eq!(m.arrivals, 1);
    // The same patient in a later snapshot is not a new arrival.
    m.apply(CallEvent::WaitingRoom(vec![grace]));
    assert_eq!(m.arrivals, 1);
    m.waiting_at = None;
    let mut h = harness(m);
    h.run();
    h.snapshot("attention_on_arrival");
    h.get_by_label("Grace Hopper is in the waiting room (waiting 1 min 15 s)");
}

#[test]
fn shortcuts_mute_and_turn_the_camera_off_and_tooltips_name_them() {
    let mut h = harness(in_call());
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::D);
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::E);
    h.run();
    assert_eq!(
        h.state().commands,
        vec![
            UiCommand::Call(UserCommand::SetMicrophoneMuted(true)),
            UiCommand::Call(UserCommand::SetCameraEnabled(false)),
        ]
    );
    // Leave's shortcut asks first, like the button.
    h.key_press_modifiers(
        egui::Modifiers::COMMAND | egui::Modifiers::SHIFT,
        egui::Key::L,
    );
    h.run();
    h.get_by_label("Leave the consultation?");
    // Cancel the question, then hover Mute until its tooltip shows (egui waits a moment).
    h.get_by_label("Cancel").click();
    h.run();
    h.get_by_label("Mute").hover();
    for _ in 0..60 {
        h.step();
    }
    h.get_by_label("Microphone on or off (Ctrl+D)");
}

/// WCAG's contrast ratio between two colours.
fn contrast(a: egui::Color32, b: egui::Color32) -> f32 {
    fn luminance(c: egui::Color32) -> f32 {
        let lin = |v: u8| {
            let v = f32::from(v) / 255.0;
            if v <= 0.039_28 {
                v / 12.92
            } else {
                ((v + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * lin(c.r()) + 0.7152 * lin(c.g()) + 0.0722 * lin(c.b())
    }
    let (x, y) = (luminance(a), luminance(b));
    (x.max(y) + 0.05) / (x.min(y) + 0.05)
}

#[test]
fn all_text_has_at_least_4_5_to_1_contrast() {
    for theme in [egui::Theme::Dark, egui::Theme::Light] {
        let dark = theme == egui::Theme::Dark;
        let ctx = egui::Context::default();
        let before = ctx.style_of(theme).visuals.weak_text_color();
        bedside_desktop::view::apply_style(&ctx);
        let v = ctx.style_of(theme).visuals.clone();
        for (what, color) in [
            ("weak text", v.weak_text_color()),
            ("text", v.widgets.noninteractive.fg_stroke.color),
            ("button text", v.widgets.inactive.fg_stroke.color),
        ] {
            for (bg_name, bg) in [("panel", v.panel_fill), ("window", v.window_fill)] {
                let ratio = contrast(color, bg);
                assert!(
                    ratio >= 4.5,
                    "{what} on the {bg_name} is {ratio:.2}:1 (dark: {dark})"
                );
            }
        }
        // egui's own weak text in the dark theme is below the bar: the style is what fixes it.
        if dark {
            assert!(contrast(before, v.panel_fill) < 4.5);
        }
    }
}

#[test]
fn the_patient_s_invite_link_is_shown_and_copied_instead_of_the_code() {
    let mut m = consultation();
    m.invite_url = Some("https://clinic.test/j/ABCD-1234".into());
    let mut h = harness(m);
    h.run();
    h.get_by_label("Invite link for the patient:");
    h.get_by_label("https://clinic.test/j/ABCD-1234");
    h.get_by_label("Copy").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Copy("https://clinic.test/j/ABCD-1234".into())]
    );
    // Without a link (a join token typed by hand, an old clinic), the code.
    let mut h = harness(consultation());
    h.run();
    h.get_by_label("Invite code for the patient:");
    h.get_by_label("Copy").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::Copy("ABCD-1234".into())]
    );
}

#[test]
fn sharing_the_screen_is_one_menu_away_says_so_and_stops_in_one_click() {
    let mut m = in_call();
    m.shareable = vec![
        bedside_desktop::share::ShareChoice {
            id: "screen".into(),
            name: "Entire screen (1920x1080)".into(),
        },
        bedside_desktop::share::ShareChoice {
            id: "window:4194311".into(),
            name: "X-ray viewer".into(),
        },
    ];
    let mut h = harness(m);
    h.run();
    h.get_by_label("Share screen").click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::ListShareable]);
    h.state_mut().commands.clear();
    h.get_by_label("X-ray viewer").click();
    h.run();
    assert_eq!(
        h.state().commands,
        vec![UiCommand::ShareScreen("window:4194311".into())]
    );

    // While sharing, a bar says what the patient sees; one click stops it.
    h.state_mut().commands.clear();
    h.state_mut().model.sharing = Some("X-ray viewer".into());
    h.run();
    h.hover_at(egui::pos2(600.0, 890.0));
    h.run();
    h.get_by_label("You are sharing: X-ray viewer. The patient sees it.");
    assert!(h.query_by_label("Share screen").is_none());
    h.snapshot("in_call_sharing");
    h.get_by_label("Stop sharing").click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::StopSharing]);
    // The status says whether, never what (a window's title may hold a name).
    assert_eq!(h.state().model.status_json()["sharing"], true);
    // The capture ends with the call, and so does the bar.
    h.state_mut().model.apply(CallEvent::State(CallState::Ended(
        bedside_client_core::call::EndReason::Left,
    )));
    assert_eq!(h.state().model.sharing, None);
}

/// With end-to-end encryption on, the side panel says so, first while keys are exchanged and
/// then with the safety code to read aloud.
#[test]
fn in_call_shows_the_safety_code_when_encrypted() {
    let mut m = in_call();
    assert_eq!(m.encryption_line(), None, "no line while encryption is off");
    m.apply(CallEvent::SafetyCode(None));
    let mut h = harness(m.clone());
    h.run();
    h.get_by_label("End-to-end encryption: exchanging keys…");
    m.apply(CallEvent::SafetyCode(Some("042 917 335 608".into())));
    let mut h = harness(m);
    h.run();
    h.get_by_label(
        "End-to-end encrypted. Safety code 042 917 335 608: read it aloud; everyone must see the same.",
    );
}

/// The UI follows the system's scale: eframe hands the window's scale factor to egui as its
/// pixels per point and the app never overrides it, so at 150% and 200% (a HiDPI laptop) the
/// in-call controls are all on screen at their logical size, and clicks still reach them.
#[test]
fn the_call_follows_the_system_scale() {
    for scale in [1.5_f32, 2.0] {
        let logical = egui::vec2(960.0, 640.0);
        let mut h = Harness::builder()
            .with_size(logical)
            .with_pixels_per_point(scale)
            .build_ui_state(
                |ui, state: &mut State| {
                    bedside_desktop::view::apply_style(ui.ctx());
                    let out = view(ui, &state.model, &mut state.drafts, &VideoView::default());
                    state.commands.extend(out);
                },
                State {
                    model: in_call(),
                    drafts: Drafts::default(),
                    commands: Vec::new(),
                },
            );
        h.run();
        assert_eq!(
            h.ctx.pixels_per_point(),
            scale,
            "the app kept the system's scale"
        );
        let screen = egui::Rect::from_min_size(egui::Pos2::ZERO, logical);
        for label in ["Mute", "Camera off", "Share screen"] {
            let rect = h.get_by_label(label).rect();
            assert!(
                screen.contains_rect(rect),
                "{label} at {rect:?} is off the {logical:?} screen at scale {scale}"
            );
        }
        h.get_by_label("Mute").click();
        h.run();
        assert_eq!(
            h.state().commands,
            vec![UiCommand::Call(UserCommand::SetMicrophoneMuted(true))],
            "at scale {scale}"
        );
    }
}

/// A group consult (through the SFU): whoever the SFU hears speaking is shown large and named
/// in the header; everyone else is a tile under it, the speaker's outlined; a click on a tile
/// pins that participant large until "Follow the speaker"; a participant who leaves goes from
/// the grid, and the one shown large falls back to the patient.
#[test]
fn a_group_consult_shows_the_speaker_large_and_the_others_as_tiles() {
    let mut m = in_call();
    for (id, name) in [("c1", "Dr Grey"), ("i1", "Interpreter Ruiz")] {
        m.apply(CallEvent::PeerJoined(Peer {
            participant_id: pid(id),
            role: Role::Clinician,
            display_name: Some(name.into()),
            connected: true,
        }));
    }
    // Before anyone speaks: the patient large, the others in tiles.
    assert_eq!(m.main_peer().unwrap().participant_id, pid("p1"));
    assert_eq!(m.tile_peers().len(), 2);
    m.apply(CallEvent::ActiveSpeaker(Some(pid("c1"))));
    // A silence keeps the last speaker large.
    m.apply(CallEvent::ActiveSpeaker(None));
    assert_eq!(m.main_peer().unwrap().participant_id, pid("c1"));
    let mut h = harness(m);
    h.run();
    h.get_by_label("speaking");
    h.get_by_label("Waiting for Dr Grey's video…");
    h.get_by_label("Show Ada Lovelace large");
    h.get_by_label("Show Interpreter Ruiz large");
    assert!(
        h.query_by_label("Show Dr Grey large").is_none(),
        "the speaker is large, not a tile"
    );
    h.snapshot("group_call");
    let status = h.state().model.status_json();
    assert_eq!(status["main_peer_role"], "Clinician", "{status}");
    assert_eq!(status["main_is_active_speaker"], true, "{status}");
    assert_eq!(status["tiles"], 2, "{status}");
    assert!(
        !status.to_string().contains("Grey"),
        "no names in the status: {status}"
    );

    h.get_by_label("Show Ada Lovelace large").click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::Pin(Some(pid("p1")))]);
    // The app carries the pin out; the speaker no longer moves the picture.
    h.state_mut().model.pinned = Some(pid("p1"));
    h.state_mut()
        .model
        .apply(CallEvent::ActiveSpeaker(Some(pid("i1"))));
    h.run();
    assert_eq!(
        h.state().model.main_peer().unwrap().participant_id,
        pid("p1")
    );
    h.state_mut().commands.clear();
    h.get_by_label("Follow the speaker").click();
    h.run();
    assert_eq!(h.state().commands, vec![UiCommand::Pin(None)]);
    h.state_mut().model.pinned = None;
    assert_eq!(
        h.state().model.main_peer().unwrap().participant_id,
        pid("i1")
    );

    // The interpreter drops, then leaves: named in the banner, then gone from the grid.
    h.state_mut()
        .model
        .apply(CallEvent::PeerReconnecting(pid("i1")));
    h.run();
    h.get_by_label("Interpreter Ruiz's connection dropped: holding their seat");
    h.state_mut().model.apply(CallEvent::PeerLeft {
        participant_id: pid("i1"),
        reason: bedside_protocol::LeaveReason::Left,
    });
    h.run();
    assert_eq!(
        h.state().model.main_peer().unwrap().participant_id,
        pid("p1")
    );
    assert!(h.query_by_label("Show Interpreter Ruiz large").is_none());
    h.get_by_label("Show Dr Grey large");
}

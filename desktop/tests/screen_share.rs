//! Screen sharing end to end without the window: client-core's X11 capture of an Xvfb screen
//! on which the test drew a black and white checkerboard is the doctor's video source (as the
//! app's share menu makes it), through a real server to a probe patient, whose report gives
//! the resolution it decoded (the screen's own 1280x800: the camera ladder's largest rung is
//! 1280x720, and this doctor's camera is set up for 640x360) and the checkerboard's mean luma.
//! Skips without Xvfb (fails under `CI=true`).

use std::sync::Arc;
use std::time::Duration;

use bedside_client_core::call::{CallEvent, UserCommand};
use bedside_client_core::driver::{self, ClientOptions};
use bedside_client_core::engine::EngineSettings;
use bedside_client_core::media::screen::{ShareTarget, open_screen, shareable};
use bedside_client_core::media::{DOCTOR_TONE_HZ, H264Config, VideoSource};
use bedside_client_core::pipeline::{MediaSources, wall_us};
use bedside_protocol::JoinAuth;
use bedside_tests::TestServer;

#[path = "support/xvfb.rs"]
mod xvfb;
use xvfb::{assert_checkerboard, draw_checkerboard, on_path, start_xvfb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_screen_reaches_the_patient_at_its_own_resolution() {
    let Some(xvfb) = on_path("Xvfb") else {
        bedside_tests::skip("Xvfb is not installed (apt-get install xvfb)");
        return;
    };
    let Some((_xvfb, display)) = start_xvfb(&xvfb) else {
        bedside_tests::skip("could not start an Xvfb display");
        return;
    };
    let _checkerboard = draw_checkerboard(&display);
    let offered = shareable(Some(&display)).expect("the display lists what can be shared");
    assert_eq!(offered[0].target, ShareTarget::Screen);
    assert_eq!(offered[0].name, "Entire screen (1280x800)");
    let screen = open_screen(Some(&display), ShareTarget::Screen, Arc::new(wall_us))
        .expect("the screen opens");
    assert_eq!(
        screen.content_hint(),
        bedside_client_core::media::ContentHint::Text
    );

    let server = TestServer::start().await.unwrap();
    let c = server.create_consultation().await.unwrap();
    let mut options = ClientOptions::new(&server.ws_url);
    options.engine = EngineSettings {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..EngineSettings::default()
    };
    // The desktop's camera set-up: 640x360, whose top rung allows 600 kbps.
    options.video = H264Config {
        width: 640,
        height: 360,
        bitrate_bps: 600_000,
        ..H264Config::default()
    };
    let tone = MediaSources::synthetic(640, 360, 1, DOCTOR_TONE_HZ).audio;
    let sources = MediaSources {
        video: Box::new(screen),
        audio: tone,
    };
    let mut doctor = driver::start(options, sources).unwrap();
    doctor.handle.send(UserCommand::Join {
        auth: JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        display_name: None,
    });

    let mut patient = bedside_probe::ProbeOptions::new(
        server.ws_url.clone(),
        JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
    );
    patient.width = 320;
    patient.height = 180;
    patient.bitrate_kbps = 300;
    patient.duration = Duration::from_secs(8);
    patient.udp_addrs = vec!["127.0.0.1:0".into()];
    let mut patient = tokio::spawn(bedside_probe::run(patient));

    let report = loop {
        tokio::select! {
            report = &mut patient => break report.unwrap().expect("the patient's report"),
            Some(event) = doctor.events.recv() => {
                if let CallEvent::WaitingRoom(waiting) = event {
                    for w in waiting {
                        doctor.handle.send(UserCommand::Admit(w.participant_id));
                    }
                }
            }
        }
    };
    eprintln!(
        "patient: {:?} decoded {} frames at {:?} fps, luma grid {:?}",
        report.received_resolution,
        report.video_frames_decoded,
        report.decoded_fps,
        report.received_luma_grid
    );
    assert!(report.connected, "{report:?}");
    assert_eq!(report.received_resolution, Some((1280, 800)), "{report:?}");
    assert!(report.video_frames_decoded >= 3, "{report:?}");
    assert_checkerboard(&report.received_luma_grid);
    doctor.handle.send(UserCommand::Leave);
}

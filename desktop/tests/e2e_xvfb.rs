//! End to end under Xvfb: the real server binary in its own process (a remote clinic), a
//! simulated patient (the probe), and the real app binary in a virtual X display signing in with
//! a doctor credential the administrator issued, opening the consultation and joining as its
//! doctor. The app admits the patient (`--auto-admit`, which goes through the same command path
//! as the Admit button) and reports through its status file that remote frames are being shown;
//! a screenshot is saved to `target/desktop-e2e.png`. Once connected the app shares the whole
//! virtual screen (`--share-screen`, the share menu's command path), on which the test has drawn
//! a black and white checkerboard; the patient's probe reports the resolution it decoded (the
//! screen's 1280x800, which no camera rung has) and the mean luma of the checkerboard's cells.
//!
//! The app's microphone and speaker are the machine's ALSA `null` device (real device code,
//! echo canceller included), and its audio must leave at real time.
//!
//! Skips, with a message, when `Xvfb` is not installed or no display can be started (fails
//! under `CI=true` when the server binary is missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bedside_protocol::JoinAuth;
use bedside_server::api::CreatedConsultation;
use bedside_server::credentials::IssuedCredential;

#[path = "support/xvfb.rs"]
mod xvfb;
use xvfb::{Reaped, assert_checkerboard, draw_checkerboard, on_path, start_xvfb};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn read_status(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// A virtual display for the app; `None` (the test skips, which fails under `CI=true`) where
/// Xvfb is missing or no display starts.
fn display() -> Option<(Reaped, String)> {
    let Some(xvfb) = on_path("Xvfb") else {
        bedside_tests::skip("Xvfb is not installed (apt-get install xvfb x11-apps imagemagick)");
        return None;
    };
    let display = start_xvfb(&xvfb);
    if display.is_none() {
        bedside_tests::skip("could not start an Xvfb display");
    }
    display
}

/// The app's microphone and speaker: ALSA's `null` device, which every machine with ALSA has
/// (real device code, echo canceller included; capture is silence).
fn alsa_null_devices(dir: &Path) {
    std::fs::write(
        dir.join("desktop.toml"),
        "microphone = \"alsa:null\"\nspeaker = \"alsa:null\"\n",
    )
    .unwrap();
}

/// The whole virtual screen to `target/<name>` (kept as a CI artifact by xtask).
fn screenshot(display: &str, name: &str) {
    if on_path("import").is_none() {
        eprintln!("no screenshot: imagemagick's `import` is not installed");
        return;
    }
    let shot = target_dir().join(name);
    let ok = Command::new("import")
        .args(["-window", "root"])
        .arg(&shot)
        .env("DISPLAY", display)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "screenshot failed");
    eprintln!("screenshot: {}", shot.display());
}

/// Reads the app's status file until `until` holds (at most 90 s); panics, with the app's log,
/// if the app exits first, and on the deadline with the last status (the log is then kept as
/// `target/<log>`).
async fn wait_for_status(
    app: &mut Reaped,
    dir: &Path,
    status: &Path,
    log: &str,
    mut until: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    loop {
        if let Some(Ok(Some(exit))) = app.0.as_mut().map(|c| c.try_wait()) {
            panic!(
                "the app exited early ({exit}); log:\n{}",
                std::fs::read_to_string(dir.join("app.log")).unwrap_or_default()
            );
        }
        if let Some(s) = read_status(status) {
            if until(&s) {
                return s;
            }
            last = Some(s);
        }
        if Instant::now() > deadline {
            let _ = std::fs::copy(dir.join("app.log"), target_dir().join(log));
            panic!("the app did not get there within 90 s; last status: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One app (and its Xvfb display) at a time: two would each take half of two cores.
static ONE_APP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A remote clinic for the app to sign in to: bedside-server in its own process, with a doctor
/// credential the administrator issued and a consultation booked with it.
struct Clinic {
    _server: tokio::process::Child,
    base_url: String,
    admin_key: &'static str,
    credential: IssuedCredential,
    created: CreatedConsultation,
}

/// Starts the clinic with `extra_toml` appended to its configuration; `None` (the test skips)
/// where the server binary is not built, which fails under `CI=true`.
async fn clinic(dir: &Path, extra_toml: &str) -> Option<Clinic> {
    let binary = bedside_tests::netns::workspace_bin("bedside-server");
    if !binary.is_file() {
        let why = format!(
            "{} is not built (cargo build -p bedside-server)",
            binary.display()
        );
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let admin_key = "e2e-admin-key-0123456789";
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = {:?}\nadmin-api-key = \"{admin_key}\"\n\
             token-secret = \"e2e-token-secret\"\n[turn]\nenabled = false\n{extra_toml}",
            dir.join("server-data")
        ),
    )
    .unwrap();
    let (server, base_url) = bedside_tests::spawn_server_process(&binary, &config)
        .await
        .expect("the server process");
    let http = reqwest::Client::new();
    let credential: IssuedCredential = http
        .post(format!("{base_url}/api/v1/doctor-credentials"))
        .bearer_auth(admin_key)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("a doctor credential")
        .json()
        .await
        .unwrap();
    let created: CreatedConsultation = http
        .post(format!("{base_url}/api/v1/doctor/consultations"))
        .bearer_auth(&credential.credential)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("a consultation")
        .json()
        .await
        .unwrap();
    Some(Clinic {
        _server: server,
        base_url,
        admin_key,
        credential,
        created,
    })
}

/// The app binary on `display`, signing in to `clinic` with its credential, opening its
/// consultation, admitting whoever waits and writing its status to `status`; its log goes to
/// `dir/app.log`.
fn start_app(
    dir: &Path,
    display: &str,
    status: &Path,
    clinic: &Clinic,
    extra_args: &[&str],
) -> Reaped {
    let log = std::fs::File::create(dir.join("app.log")).unwrap();
    let app = Command::new(env!("CARGO_BIN_EXE_bedside-desktop"))
        .args(["--udp", "127.0.0.1:0", "--auto-admit"])
        .args(extra_args)
        .arg("--status-file")
        .arg(status)
        .arg("--data-dir")
        .arg(dir)
        .arg("--config-dir")
        .arg(dir)
        .env("DISPLAY", display)
        .env("BEDSIDE_CLINIC_URL", &clinic.base_url)
        .env("BEDSIDE_CREDENTIAL", &clinic.credential.credential)
        .env("BEDSIDE_CONSULTATION", &clinic.created.consultation_id.0)
        .env_remove("BEDSIDE_SERVER_URL")
        .env_remove("BEDSIDE_TOKEN")
        .env_remove("BEDSIDE_DEMO")
        .env_remove("WAYLAND_DISPLAY")
        .env(
            "RUST_LOG",
            "info,bedside_client_core::media=debug,webrtc=warn,rtc=warn,rtc_ice=warn,winit=warn",
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the app");
    Reaped(Some(app))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_app_shows_the_admitted_patients_video_under_xvfb() {
    let _one = ONE_APP.lock().await;
    let Some((_xvfb, display)) = display() else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let Some(clinic) = clinic(dir.path(), "").await else {
        return;
    };
    let created = &clinic.created;

    // The patient: a probe with synthetic 640x360 media, waiting with the invite code.
    let mut patient = bedside_probe::ProbeOptions::new(
        created.ws_url.clone(),
        JoinAuth::InviteCode {
            code: created.invite_code.clone(),
        },
    );
    patient.width = 640;
    patient.height = 360;
    patient.bitrate_kbps = 800;
    // Long enough for the checks below; the probe's report is read when it leaves.
    patient.duration = Duration::from_secs(60);
    patient.udp_addrs = vec!["127.0.0.1:0".into()];
    let patient = tokio::spawn(bedside_probe::run(patient));

    // Real audio devices: ALSA's `null` device, which every machine with ALSA has, as the
    // microphone (through the echo canceller) and the speaker (feeding the echo reference). It
    // has no clock: it hands over capture as fast as it is read (about 70 times real time
    // here), which once flooded the echo canceller, the encoder and the link, and the patient
    // decoded no video at all. The devices are now paced to real time and audio has its own
    // thread (client-core's `media::devices` and `pipeline`).
    alsa_null_devices(dir.path());
    let status = dir.path().join("status.json");
    let mut app = start_app(dir.path(), &display, &status, &clinic, &["--share-screen"]);

    let mut connected_at = None;
    let shown = wait_for_status(&mut app, dir.path(), &status, "desktop-e2e.log", |s| {
        if s["call_state"] != "Connected" {
            return false;
        }
        connected_at.get_or_insert_with(Instant::now);
        // Ten frames: the picture moves (on a loaded machine the debug build shows well
        // under one frame a second while it also encodes its shared screen).
        s["remote_frames_shown"].as_u64().unwrap_or(0) >= 10
    })
    .await;
    let _ = std::fs::copy(
        dir.path().join("app.log"),
        target_dir().join("desktop-e2e.log"),
    );
    let shown_at = Instant::now();
    let connected_secs = connected_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    eprintln!("app status {connected_secs:.1} s after connecting: {shown}");
    assert_eq!(shown["microphone_is_synthetic"], false, "{shown}");
    assert_eq!(shown["speaker_is_off"], false, "{shown}");
    // Drawn over the app's window, which covers the screen: it is what the patient must see.
    let _checkerboard = draw_checkerboard(&display);
    assert_eq!(shown["screen"], "InCall");
    assert_eq!(shown["remote_size"], serde_json::json!([640, 360]));
    // The self view shows what the doctor sends.
    assert!(shown["self_frames_shown"].as_u64().unwrap() > 0, "{shown}");

    // Let a few more frames arrive, then take the screenshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    screenshot(&display, "desktop-e2e.png");
    // The picture keeps moving (within 15 s: a frame or two a second at best under load).
    let frames = |s: &serde_json::Value| s["remote_frames_shown"].as_u64().unwrap_or(0);
    let moving_by = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let after = read_status(&status).unwrap();
        if frames(&after) > frames(&shown) || Instant::now() > moving_by {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(frames(&after) > frames(&shown), "frames stopped: {after}");

    assert_eq!(after["sharing"], true, "the app says it shares: {after}");
    let _ = std::fs::copy(
        dir.path().join("app.log"),
        target_dir().join("desktop-e2e.log"),
    );
    // The microphone's audio went out at real time (50 frames a second), not at the device's
    // pace; each status is up to half a second old, hence the second of slack each way.
    let secs = shown_at.elapsed().as_secs_f64();
    let encoded = |s: &serde_json::Value| s["audio_frames_encoded"].as_u64().unwrap_or(0);
    let sent = encoded(&after).saturating_sub(encoded(&shown)) as f64;
    eprintln!("audio frames encoded in {secs:.1} s: {sent}");
    assert!(
        sent <= 50.0 * (secs + 1.0) && sent >= 40.0 * (secs - 1.0),
        "{sent} audio frames in {secs:.1} s: {shown} {after}"
    );

    let report = patient.await.unwrap().expect("the patient's report");
    drop(app);
    // The app's log beside the screenshot, for when this fails in CI.
    let _ = std::fs::copy(
        dir.path().join("app.log"),
        target_dir().join("desktop-e2e.log"),
    );
    eprintln!("patient report: {report:?}");
    // The screen's own size: the camera ladder's largest rung is 1280x720.
    assert_eq!(report.received_resolution, Some((1280, 800)));
    assert_checkerboard(&report.received_luma_grid);
}

/// A group consult through the SFU on the doctor's screen: the patient and a clinician (two
/// probes with their own tones) each have a place with a moving picture, one large and one in
/// the tile strip, and the one shown large is whoever the SFU names the active speaker (from
/// the audio levels the clients put on their packets; the doctor's microphone is ALSA's silent
/// `null` device, so it is one of the two). A screenshot goes to `target/desktop-group.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_app_shows_a_group_consult_with_the_speaker_large_under_xvfb() {
    let _one = ONE_APP.lock().await;
    let Some((_xvfb, display)) = display() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sfu = "[sfu]\nenabled = true\nlisten = \"127.0.0.1:0\"\n";
    let Some(clinic) = clinic(dir.path(), sfu).await else {
        return;
    };
    let created = &clinic.created;
    let issued: bedside_server::api::IssuedToken = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/consultations/{}/tokens",
            clinic.base_url, created.consultation_id.0
        ))
        .bearer_auth(clinic.admin_key)
        .json(&serde_json::json!({ "role": "clinician" }))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("a clinician's token")
        .json()
        .await
        .unwrap();
    let probe = |auth| {
        let mut p = bedside_probe::ProbeOptions::new(created.ws_url.clone(), auth);
        (p.width, p.height, p.bitrate_kbps) = (320, 180, 300);
        p.duration = Duration::from_secs(60);
        p.udp_addrs = vec!["127.0.0.1:0".into()];
        tokio::spawn(bedside_probe::run(p))
    };
    let patient = probe(JoinAuth::InviteCode {
        code: created.invite_code.clone(),
    });
    let clinician = probe(JoinAuth::Token {
        token: issued.token,
    });
    alsa_null_devices(dir.path());
    let status = dir.path().join("status.json");
    let mut app = start_app(dir.path(), &display, &status, &clinic, &[]);

    let shown = wait_for_status(&mut app, dir.path(), &status, "desktop-group.log", |s| {
        s["call_state"] == "Connected"
            && s["peers"] == 2
            && s["tiles"] == 1
            && s["peers_with_video"] == 2
            && s["main_is_active_speaker"] == true
            && s["remote_frames_shown"].as_u64().unwrap_or(0) >= 10
    })
    .await;
    eprintln!("app status: {shown}");
    let role = shown["main_peer_role"].as_str().unwrap_or_default();
    assert!(["Patient", "Clinician"].contains(&role), "{shown}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    screenshot(&display, "desktop-group.png");
    drop(app);
    patient.abort();
    clinician.abort();
}

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
//! Skips, with a message, when `Xvfb` is not installed or no display can be started (fails
//! under `CI=true` when the server binary is missing).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bedside_protocol::JoinAuth;
use bedside_server::api::CreatedConsultation;
use bedside_server::credentials::IssuedCredential;

/// Kills (by PID) and reaps a child process when dropped.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Starts Xvfb on a free display number; `None` if none came up.
fn start_xvfb(xvfb: &Path) -> Option<(Reaped, String)> {
    for n in 90..120 {
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
        if socket.exists() || Path::new(&format!("/tmp/.X{n}-lock")).exists() {
            continue;
        }
        let child = Command::new(xvfb)
            .args([
                format!(":{n}").as_str(),
                "-screen",
                "0",
                "1280x800x24",
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut guard = Reaped(Some(child));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if socket.exists() {
                return Some((guard, format!(":{n}")));
            }
            if let Some(Ok(Some(_))) = guard.0.as_mut().map(|c| c.try_wait()) {
                break; // exited: the display was taken after all
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    None
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn read_status(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_app_shows_the_admitted_patients_video_under_xvfb() {
    let Some(xvfb) = on_path("Xvfb") else {
        bedside_tests::skip("Xvfb is not installed (apt-get install xvfb x11-apps imagemagick)");
        return;
    };
    let Some((_xvfb, display)) = start_xvfb(&xvfb) else {
        bedside_tests::skip("could not start an Xvfb display");
        return;
    };

    // The clinic: bedside-server in its own process, as a remote clinic runs it.
    let binary = bedside_tests::netns::workspace_bin("bedside-server");
    if !binary.is_file() {
        let why = format!(
            "{} is not built (cargo build -p bedside-server)",
            binary.display()
        );
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let admin_key = "e2e-admin-key-0123456789";
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = {:?}\nadmin-api-key = \"{admin_key}\"\n\
             token-secret = \"e2e-token-secret\"\n[turn]\nenabled = false\n",
            dir.path().join("server-data")
        ),
    )
    .unwrap();
    let (_server, base_url) = bedside_tests::spawn_server_process(&binary, &config)
        .await
        .expect("the server process");
    let http = reqwest::Client::new();
    // The administrator issues a doctor credential; with it a consultation is booked.
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
    patient.duration = Duration::from_secs(25);
    patient.udp_addrs = vec!["127.0.0.1:0".into()];
    let patient = tokio::spawn(bedside_probe::run(patient));

    let status = dir.path().join("status.json");
    let log = std::fs::File::create(dir.path().join("app.log")).unwrap();
    let app = Command::new(env!("CARGO_BIN_EXE_bedside-desktop"))
        .args([
            "--udp",
            "127.0.0.1:0",
            "--auto-admit",
            "--share-screen",
            "--status-file",
        ])
        .arg(&status)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--config-dir")
        .arg(dir.path())
        .env("DISPLAY", &display)
        .env("BEDSIDE_CLINIC_URL", &base_url)
        .env("BEDSIDE_CREDENTIAL", &credential.credential)
        .env("BEDSIDE_CONSULTATION", &created.consultation_id.0)
        .env_remove("BEDSIDE_SERVER_URL")
        .env_remove("BEDSIDE_TOKEN")
        .env_remove("BEDSIDE_DEMO")
        .env_remove("WAYLAND_DISPLAY")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the app");
    let mut app = Reaped(Some(app));

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    let shown = loop {
        if let Some(Ok(Some(exit))) = app.0.as_mut().map(|c| c.try_wait()) {
            panic!(
                "the app exited early ({exit}); log:\n{}",
                std::fs::read_to_string(dir.path().join("app.log")).unwrap_or_default()
            );
        }
        if let Some(s) = read_status(&status) {
            let frames = s["remote_frames_shown"].as_u64().unwrap_or(0);
            if frames >= 30 && s["call_state"] == "Connected" {
                break s;
            }
            last = Some(s);
        }
        assert!(
            Instant::now() < deadline,
            "no remote frames shown within 90 s; last status: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("app status: {shown}");
    // Drawn over the app's window, which covers the screen: it is what the patient must see.
    let _checkerboard = draw_checkerboard(&display);
    assert_eq!(shown["screen"], "InCall");
    assert_eq!(shown["remote_size"], serde_json::json!([640, 360]));
    // The self view shows what the doctor sends.
    assert!(shown["self_frames_shown"].as_u64().unwrap() > 0, "{shown}");

    // Let a few more frames arrive, then take the screenshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shot = target_dir().join("desktop-e2e.png");
    if on_path("import").is_some() {
        let ok = Command::new("import")
            .args(["-window", "root"])
            .arg(&shot)
            .env("DISPLAY", &display)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "screenshot failed");
        eprintln!("screenshot: {}", shot.display());
    } else {
        eprintln!("no screenshot: imagemagick's `import` is not installed");
    }
    let after = read_status(&status).unwrap();
    assert!(
        after["remote_frames_shown"].as_u64().unwrap()
            > shown["remote_frames_shown"].as_u64().unwrap(),
        "frames stopped: {after}"
    );

    assert_eq!(after["sharing"], true, "the app says it shares: {after}");

    let report = patient.await.unwrap().expect("the patient's report");
    drop(app);
    eprintln!(
        "patient received {:?}, {} frames, luma grid {:?}",
        report.received_resolution, report.video_frames_decoded, report.received_luma_grid
    );
    // The screen's own size: the camera ladder's largest rung is 1280x720.
    assert_eq!(report.received_resolution, Some((1280, 800)));
    let grid = &report.received_luma_grid;
    assert_eq!(grid.len(), 64, "{report:?}");
    for (row, col, white) in [(6, 6, true), (6, 7, false), (7, 6, false), (7, 7, true)] {
        let luma = grid[row * 8 + col];
        if white {
            assert!(luma > 200, "cell {row},{col} should be white: {luma}");
        } else {
            assert!(luma < 50, "cell {row},{col} should be black: {luma}");
        }
    }
}

/// Four 160x100 windows in the screen's bottom-right corner, white, black / black, white
/// (cells (6..8, 6..8) of an 8x8 grid over 1280x800), over every other window. They last as
/// long as the returned connection.
fn draw_checkerboard(display: &str) -> impl Sized {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{ConnectionExt, CreateWindowAux, WindowClass};
    let (conn, screen) = x11rb::connect(Some(display)).expect("connect to Xvfb");
    let root = conn.setup().roots[screen].clone();
    for (x, y, white) in [
        (960, 600, true),
        (1120, 600, false),
        (960, 700, false),
        (1120, 700, true),
    ] {
        let window = conn.generate_id().unwrap();
        let pixel = if white {
            root.white_pixel
        } else {
            root.black_pixel
        };
        conn.create_window(
            root.root_depth,
            window,
            root.root,
            x,
            y,
            160,
            100,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new()
                .background_pixel(pixel)
                .override_redirect(1),
        )
        .unwrap();
        conn.map_window(window).unwrap();
    }
    conn.get_input_focus().unwrap().reply().unwrap();
    conn
}

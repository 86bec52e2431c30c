//! End to end under Xvfb: a real server, a simulated patient (the probe), and the real app binary
//! in a virtual X display joining as the doctor. The app admits the patient (`--auto-admit`,
//! which goes through the same command path as the Admit button) and reports through its status
//! file that remote frames are being shown; a screenshot is saved to `target/desktop-e2e.png`.
//!
//! Skips, with a message, when `Xvfb` is not installed or no display can be started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bedside_protocol::JoinAuth;
use bedside_tests::TestServer;

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

    let mut server = TestServer::start().await.expect("server");
    let created = server.create_consultation().await.expect("consultation");

    // The patient: a probe with synthetic 640x360 media, waiting with the invite code.
    let mut patient = bedside_probe::ProbeOptions::new(
        server.ws_url.clone(),
        JoinAuth::InviteCode {
            code: created.invite_code.clone(),
        },
    );
    patient.width = 640;
    patient.height = 360;
    patient.bitrate_kbps = 800;
    patient.duration = Duration::from_secs(60);
    patient.udp_addrs = vec!["127.0.0.1:0".into()];
    let patient = tokio::spawn(bedside_probe::run(patient));

    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status.json");
    let log = std::fs::File::create(dir.path().join("app.log")).unwrap();
    let app = Command::new(env!("CARGO_BIN_EXE_bedside-desktop"))
        .args(["--udp", "127.0.0.1:0", "--auto-admit", "--status-file"])
        .arg(&status)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--config-dir")
        .arg(dir.path())
        .env("DISPLAY", &display)
        .env("BEDSIDE_SERVER_URL", &server.ws_url)
        .env("BEDSIDE_TOKEN", &created.doctor_token)
        .env("BEDSIDE_INVITE_CODE", &created.invite_code)
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

    drop(app);
    patient.abort();
    let _ = patient.await;
    server.shutdown().await.unwrap();
}

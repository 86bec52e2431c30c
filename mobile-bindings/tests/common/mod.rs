//! Shared by the integration tests: where the cdylib is, and a server with a doctor in it.
#![allow(dead_code)] // each test crate uses part of it

use std::path::PathBuf;
use std::time::Duration;

use bedside_probe::{ProbeOptions, run};
use bedside_protocol::JoinAuth;
use bedside_tests::TestServer;

/// The cdylib built with this test binary.
pub fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    let name = format!(
        "{}bedside_mobile{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    // `cargo test` leaves the cdylib it built for this run next to the test binary (`deps/`);
    // `cargo build` also copies it one level up.
    let here = deps.join(&name);
    if here.exists() {
        return here;
    }
    deps.parent().expect("profile dir").join(name)
}

/// A local server with one consultation and a headless doctor (`bedside-probe`, 320x180) who
/// admits whoever waits and stays 40 s. Abort the task when done.
pub struct Clinic {
    pub server: TestServer,
    pub invite_code: String,
    pub doctor: tokio::task::JoinHandle<anyhow::Result<bedside_probe::Report>>,
}

pub async fn clinic() -> anyhow::Result<Clinic> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let doctor = tokio::spawn(run(ProbeOptions {
        duration: Duration::from_secs(40),
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 320,
        height: 180,
        bitrate_kbps: 300,
        ..ProbeOptions::new(
            server.ws_url.clone(),
            JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
        )
    }));
    Ok(Clinic {
        server,
        invite_code: c.invite_code,
        doctor,
    })
}

/// Runs `command` (killed on timeout) and asserts it succeeded and printed `ok_marker`.
pub async fn run_app(
    mut command: tokio::process::Command,
    timeout: Duration,
    ok_marker: &str,
) -> anyhow::Result<()> {
    let out = tokio::time::timeout(timeout, command.kill_on_drop(true).output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "app failed: {}", out.status);
    anyhow::ensure!(stdout.contains(ok_marker), "no {ok_marker:?} in the output");
    Ok(())
}

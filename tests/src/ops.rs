//! Helpers for the operations suites (`tests/dashboard.rs`, `tests/alerts.rs`): probe calls
//! through a real server, one of them impaired; a webhook receiver; tools that must exist
//! under `CI=true` (Chromium, npm, promtool, coturn's `turnutils_uclient`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bedside_probe::{ProbeOptions, Report, SendDelay};
use bedside_protocol::JoinAuth;
use bedside_server::api::CreatedConsultation;
use tokio::task::JoinHandle;

use crate::TestServer;

/// The display names the probes give, which must never reach the dashboard.
pub const DOCTOR_NAME: &str = "Dr Ophelia Quill";
pub const PATIENT_NAME: &str = "Patient Barnaby Wren";

/// Whether a suite can run: true when `found`; otherwise it skips (printing why), or fails
/// under `CI=true`.
pub fn tool_available(found: bool, why: &str) -> bool {
    if !found {
        crate::skip(why);
    }
    found
}

/// Whether `program` runs (`program --version` or the given probe arguments).
pub fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The workspace's `ci-artifacts/` directory (created).
pub fn artifacts_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci-artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The pinned playwright-core from npm, installed into `target/node-tools` if missing
/// (never committed). Returns the module's path.
pub const PLAYWRIGHT_CORE: &str = "playwright-core@1.65.1";

pub fn playwright_core() -> Result<PathBuf> {
    let prefix = target_dir().join("node-tools");
    let module = prefix.join("node_modules/playwright-core");
    if module.join("package.json").exists() {
        return Ok(module);
    }
    std::fs::create_dir_all(&prefix)?;
    let status = std::process::Command::new("npm")
        .args([
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--prefix",
        ])
        .arg(&prefix)
        .arg(PLAYWRIGHT_CORE)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .status()
        .context("running npm")?;
    if !status.success() || !module.exists() {
        bail!("npm install {PLAYWRIGHT_CORE} failed ({status})");
    }
    Ok(module)
}

/// One probe call (a doctor and a patient) running in this process.
pub struct ProbeCall {
    pub consultation: CreatedConsultation,
    pub doctor: JoinHandle<Result<Report>>,
    pub patient: JoinHandle<Result<Report>>,
}

impl ProbeCall {
    /// Starts a call of `duration`. `impaired` holds each datagram the patient sends for
    /// 450 ms (so the round trip is past the quality score's 400 ms: poor); `relay_only` makes
    /// both probes use only relay candidates (the server must run its relay).
    pub async fn start(
        server: &TestServer,
        duration: Duration,
        impaired: bool,
        relay_only: bool,
    ) -> Result<Self> {
        let c = server.create_consultation().await?;
        let options = |auth: JoinAuth, name: &str| ProbeOptions {
            display_name: Some(name.to_owned()),
            duration,
            relay_only,
            udp_addrs: vec!["127.0.0.1:0".into()],
            width: 320,
            height: 180,
            bitrate_kbps: 200,
            ..ProbeOptions::new(server.ws_url.clone(), auth)
        };
        let doctor = options(
            JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
            DOCTOR_NAME,
        );
        let mut patient = options(
            JoinAuth::InviteCode {
                code: c.invite_code.clone(),
            },
            PATIENT_NAME,
        );
        if impaired {
            patient.send_delay = Some(SendDelay {
                delay: Duration::from_millis(450),
                jitter: Duration::from_millis(20),
            });
        }
        Ok(ProbeCall {
            consultation: c,
            doctor: tokio::spawn(bedside_probe::run(doctor)),
            patient: tokio::spawn(bedside_probe::run(patient)),
        })
    }

    /// Waits for both probes and checks they connected.
    pub async fn finish(self) -> Result<(Report, Report)> {
        let (d, p) = (self.doctor.await??, self.patient.await??);
        if !d.connected || !p.connected {
            bail!("a probe did not connect: doctor {d:?}, patient {p:?}");
        }
        Ok((d, p))
    }

    pub fn is_finished(&self) -> bool {
        self.doctor.is_finished() && self.patient.is_finished()
    }
}

/// A webhook receiver on loopback in this process; returns its URL (`/hook`) and the JSON
/// bodies it receives.
pub async fn webhook_receiver() -> Result<(
    String,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
)> {
    use axum::Json;
    use axum::extract::State;
    use tokio::sync::mpsc;
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |State(tx): State<mpsc::UnboundedSender<serde_json::Value>>,
                 Json(body): Json<serde_json::Value>| async move {
                    let _ = tx.send(body);
                    "ok"
                },
            ),
        )
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, rx))
}

/// The next webhook payload for `alertname` with `status` (`firing`, `resolved`) within
/// `within`; earlier payloads for other alerts are skipped.
pub async fn next_alert(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    alertname: &str,
    status: &str,
    within: Duration,
) -> Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let body = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| format!("no {status} {alertname} within {within:?}"))?
            .context("receiver closed")?;
        if body["alerts"][0]["labels"]["alertname"] == alertname && body["status"] == status {
            return Ok(body);
        }
    }
}

/// Reads the dashboard's event stream for `for_how_long`; returns what arrived.
pub async fn read_events(
    base_url: &str,
    admin_key: &str,
    for_how_long: Duration,
) -> Result<String> {
    let mut resp = reqwest::Client::new()
        .get(format!("{base_url}/dashboard/events"))
        .bearer_auth(admin_key)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("events: {}", resp.status());
    }
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + for_how_long;
    while let Ok(chunk) = tokio::time::timeout_at(deadline, resp.chunk()).await {
        match chunk? {
            Some(bytes) => out.extend_from_slice(&bytes),
            None => break,
        }
    }
    Ok(String::from_utf8(out)?)
}

/// The snapshots in an event stream capture, parsed.
pub fn snapshots(events: &str) -> Vec<serde_json::Value> {
    events
        .split("\n\n")
        .filter_map(|block| {
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            serde_json::from_str(&data).ok()
        })
        .collect()
}

/// What must never appear in what the dashboard serves, for the calls given: display names,
/// invite codes (as given and without the dash), tokens, and the loopback address every
/// participant here has.
pub fn secrets_of(calls: &[&CreatedConsultation]) -> Vec<String> {
    let mut out = vec![
        DOCTOR_NAME.to_owned(),
        PATIENT_NAME.to_owned(),
        "127.0.0.1".to_owned(),
    ];
    for c in calls {
        out.push(c.invite_code.clone());
        out.push(c.invite_code.replace('-', ""));
        out.push(c.doctor_token.clone());
    }
    out
}

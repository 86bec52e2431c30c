//! The patient's join page in a real browser: headless Chromium (Debian's `chromium`, with its
//! fake camera and microphone) driven by `tests/browser/driver.mjs` (playwright-core, installed
//! with npm into `target/node-tools/` when missing), against the real server and a
//! `bedside-probe` on the other side. Both sides say what they decoded: the probe's report, and
//! the page's `getStats()` (inbound-rtp frames decoded, audio energy, the candidate in use).
//!
//! Without Chromium, node or npm the suite skips, saying why; under `CI=true` it fails.
//! One browser at a time (the machine is small): the tests take a shared lock.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bedside_probe::{ProbeOptions, Report, run};
use bedside_protocol::JoinAuth;
use bedside_server::Config;
use bedside_tests::{TestServer, test_config, with_turn};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();

/// The tone the page sends instead of its microphone (`?tone=`): the patient's, which the probe's
/// detector names.
const PATIENT_TONE_HZ: u32 = 660;
/// The tone a doctor probe sends (`bedside_client_core::media::DOCTOR_TONE_HZ`).
const DOCTOR_TONE_HZ: f64 = 440.0;

#[derive(Clone, Debug)]
struct Driver {
    chromium: PathBuf,
    node_modules: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// Finds Chromium and node, and installs playwright-core into `target/` once.
fn find_driver() -> Result<Driver, String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.is_file()))
        .ok_or("no Chromium (apt-get install chromium, or set CHROMIUM)")?;
    on_path("node").ok_or("no node on PATH (apt-get install nodejs)")?;
    on_path("npm").ok_or("no npm on PATH (apt-get install npm)")?;
    // The same pinned playwright-core as the dashboard's test, installed once into target/.
    let module = bedside_tests::ops::playwright_core().map_err(|e| format!("{e:#}"))?;
    let node_modules = module
        .parent()
        .expect("playwright-core lives in node_modules")
        .to_owned();
    Ok(Driver {
        chromium,
        node_modules,
    })
}

/// The driver, or `None` (skipped, with the reason printed) when a tool is missing outside CI.
fn driver() -> Option<Driver> {
    match DRIVER.get_or_init(find_driver) {
        Ok(d) => Some(d.clone()),
        Err(why) => {
            bedside_tests::skip(&format!("the browser suite cannot run: {why}"));
            None
        }
    }
}

/// One run of `driver.mjs`: its events as they come, and its exit.
struct Page {
    events: mpsc::UnboundedReceiver<Value>,
    child: tokio::process::Child,
    seen: Vec<Value>,
}

impl Page {
    async fn open(driver: &Driver, mut scenario: Value) -> Result<Page> {
        let profile = tempfile::tempdir()?;
        scenario["chromium"] = json!(driver.chromium);
        scenario["userDataDir"] = json!(profile.path());
        let mut child = tokio::process::Command::new("node")
            .arg(workspace().join("tests/browser/driver.mjs"))
            .arg(scenario.to_string())
            .env("BEDSIDE_NODE_MODULES", &driver.node_modules)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting node")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _profile = profile;
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("driver: {line}"),
                }
            }
        });
        Ok(Page {
            events,
            child,
            seen: Vec::new(),
        })
    }

    /// Waits (bounded) for the driver's event `name`, failing on its error.
    async fn expect(&mut self, name: &str) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("no '{name}' from the page; saw {:?}", self.seen))?
                .with_context(|| {
                    format!("the driver ended before '{name}'; saw {:?}", self.seen)
                })?;
            self.seen.push(v.clone());
            if let Some(e) = v.get("error") {
                bail!("the page failed: {}", e.as_str().unwrap_or_default());
            }
            if v.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(v);
            }
            if name == "result" && v.get("result").is_some() {
                return Ok(v["result"].clone());
            }
        }
    }

    async fn finish(mut self) -> Result<Value> {
        let result = self.expect("result").await?;
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        if !status.success() {
            bail!("driver exited with {status}");
        }
        Ok(result)
    }
}

fn probe(server: &TestServer, auth: JoinAuth, duration: Duration) -> ProbeOptions {
    ProbeOptions {
        duration,
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 320,
        height: 180,
        bitrate_kbps: 300,
        ..ProbeOptions::new(server.ws_url.clone(), auth)
    }
}

/// The probe decoded the page's video and heard its tone.
fn assert_probe_got_the_page(report: &Report) {
    assert!(report.connected, "{report:?}");
    assert!(report.video_frames_decoded >= 20, "{report:?}");
    assert!(report.audio_frames_received >= 50, "{report:?}");
    assert_eq!(report.heard.as_deref(), Some("patient"), "{report:?}");
    assert_eq!(report.chat_received, 1, "{report:?}");
    // Every sample went out on a payload type the session negotiated.
    assert_eq!(report.samples_unsent, 0, "{report:?}");
}

/// The page decoded the probe's video (320x180) and heard its tone, on the candidate type given.
fn assert_page_got_the_probe(
    result: &Value,
    tone_hz: f64,
    candidate: &str,
    relay_protocol: Option<&str>,
) {
    let stats = result["stats"].as_object().expect("stats per peer");
    assert_eq!(stats.len(), 1, "{result}");
    let s = stats.values().next().unwrap();
    assert!(s["framesDecoded"].as_u64().unwrap_or(0) >= 20, "{result}");
    assert_eq!(s["frameWidth"], 320, "{result}");
    assert!(s["audioPackets"].as_u64().unwrap_or(0) >= 25, "{result}");
    let heard = result["remoteAudio"]["peakHz"].as_f64().unwrap_or(0.0);
    assert!((heard - tone_hz).abs() < 15.0, "heard {heard} Hz: {result}");
    assert_eq!(s["localCandidateType"], candidate, "{result}");
    if let Some(p) = relay_protocol {
        assert_eq!(s["relayProtocol"], p, "{result}");
    }
    assert_eq!(
        result["chatReceived"],
        json!(["echo: hello from the browser"]),
        "{result}"
    );
    assert_eq!(result["errors"], json!([]), "{result}");
}

fn screenshot_path() -> PathBuf {
    let dir = workspace().join("ci-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir.join("browser-call.png")
}

/// A patient opens the link, waits, is admitted by a doctor probe; video and the tone flow
/// both ways (the browser offers, the probe answers), the chat line arrives and is echoed; a
/// reload mid-call takes the same seat back and the media again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_joins_by_link_is_admitted_chats_and_resumes_after_a_reload() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    let _one = ONE_BROWSER.lock().await;
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    assert_eq!(
        c.invite_url,
        format!("{}/j/{}", server.base_url, c.invite_code)
    );
    let mut page = Page::open(
        &driver,
        json!({
            "url": format!("{}?tone={PATIENT_TONE_HZ}", c.invite_url),
            "name": "Ada Patient",
            "chat": "hello from the browser",
            "screenshot": screenshot_path(),
            "reload": true,
            "holdMs": 3000,
        }),
    )
    .await?;
    let loaded = page.expect("page").await?;
    assert_eq!(loaded["status"], 200);
    assert_eq!(loaded["csp"], bedside_server::web::CSP);
    let waiting = page.expect("waiting").await?;
    assert_eq!(waiting["text"], "You are in the waiting room");
    // The doctor comes only once the patient waits, and admits whoever waits.
    let doctor = tokio::spawn(run(probe(
        &server,
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        Duration::from_secs(14),
    )));
    page.expect("media").await?;
    page.expect("chat").await?;
    page.expect("reloaded").await?;
    page.expect("resumed").await?;
    let result = page.finish().await?;
    assert_page_got_the_probe(&result, DOCTOR_TONE_HZ, "host", None);
    assert_eq!(result["resumed"], true, "{result}");
    let report = doctor.await??;
    assert_probe_got_the_page(&report);
    // The reload was a resume of the same seat: one participant besides the doctor, ever.
    let audit: Value = server
        .http()
        .get(server.api(&format!("/consultations/{}/audit", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    let patient_events: Vec<&str> = audit
        .as_array()
        .context("an audit log")?
        .iter()
        .filter(|e| e["role"] == "patient")
        .filter_map(|e| e["event"].as_str())
        .collect();
    let count = |kind: &str| patient_events.iter().filter(|k| **k == kind).count();
    assert_eq!(count("joined"), 1, "{patient_events:?}");
    assert_eq!(count("admitted"), 1, "{patient_events:?}");
    let kinds = patient_events;
    assert!(kinds.contains(&"resumed"), "{kinds:?}");
    Ok(())
}

/// The server restarts mid-call: the page says it is reconnecting, resumes its seat with the
/// token it kept, and the media (peer to peer) never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_call_resumes_the_page_s_seat() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    let _one = ONE_BROWSER.lock().await;
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let doctor = tokio::spawn(run(probe(
        &server,
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        Duration::from_secs(12),
    )));
    let mut page = Page::open(
        &driver,
        json!({
            "url": format!("{}?tone={PATIENT_TONE_HZ}", c.invite_url),
            "name": "Ada Patient",
            "outage": true,
            "timeoutMs": 30000,
        }),
    )
    .await?;
    page.expect("ready-for-outage").await?;
    let server = server.restart().await?;
    page.expect("resumed").await?;
    let result = page.finish().await?;
    assert_eq!(result["resumed"], true, "{result}");
    assert_eq!(result["sawReconnecting"], true, "{result}");
    // The peer connection never left "connected": media went on through the outage.
    assert_eq!(
        result["events"],
        json!(["pc:connecting", "pc:connected", "resumed"]),
        "{result}"
    );
    let report = doctor.await??;
    assert!(report.connected, "{report:?}");
    assert!(report.video_frames_decoded >= 20, "{report:?}");
    drop(server);
    Ok(())
}

/// A relay-only browser call through the bundled relay over `relay` ("udp", "tcp" or "tls").
async fn relay_only_call(relay: &str) -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    let _one = ONE_BROWSER.lock().await;
    let dir = tempfile::tempdir()?;
    let mut config: Config = with_turn(test_config());
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    config.turn.relay.listen_tls = vec!["127.0.0.1:0".parse()?];
    config.turn.relay.tls_cert = Some(cert_path);
    config.turn.relay.tls_key = Some(key_path);
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let doctor = tokio::spawn(run(probe(
        &server,
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        Duration::from_secs(8),
    )));
    let mut page = Page::open(
        &driver,
        json!({
            "url": format!("{}?tone={PATIENT_TONE_HZ}&relay={relay}", c.invite_url),
            "name": "Ada Patient",
            "chat": "hello from the browser",
            "holdMs": 1000,
            "timeoutMs": 30000,
        }),
    )
    .await?;
    page.expect("media").await?;
    let result = page.finish().await?;
    assert_page_got_the_probe(&result, DOCTOR_TONE_HZ, "relay", Some(relay));
    assert_probe_got_the_page(&doctor.await??);
    let metrics = server.metrics().await?;
    assert!(
        metrics.contains("bedside_turn_relayed_packets_total"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_browser_call_goes_through_turn_over_udp() -> Result<()> {
    relay_only_call("udp").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_browser_call_goes_through_turn_over_tcp() -> Result<()> {
    relay_only_call("tcp").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_browser_call_goes_through_turn_over_tls() -> Result<()> {
    relay_only_call("tls").await
}

/// The page as a clinician (a join token in the link's fragment) admits a native patient probe,
/// which offers: the browser answers. The browser then goes offline and back: the page asks the
/// probe to restart ICE, and the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_clinician_admits_a_native_patient_and_answers_its_offer() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    let _one = ONE_BROWSER.lock().await;
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let token: Value = server
        .http()
        .post(server.api(&format!("/consultations/{}/tokens", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .json(&json!({"role": "clinician"}))
        .send()
        .await?
        .json()
        .await?;
    let token = token["token"].as_str().context("a token")?;
    let mut page = Page::open(
        &driver,
        json!({
            "url": format!("{}/j?tone={PATIENT_TONE_HZ}#token={token}", server.base_url),
            "name": "Dr Browser",
            "clinician": true,
            "admit": true,
            "chat": "hello from the browser",
            "networkChange": true,
            "holdMs": 2000,
            "timeoutMs": 25000,
        }),
    )
    .await?;
    page.expect("admitted").await?;
    let patient = tokio::spawn(run(probe(
        &server,
        JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        Duration::from_secs(12),
    )));
    page.expect("someone-waits").await?;
    page.expect("media").await?;
    page.expect("network-changed").await?;
    let result = page.finish().await?;
    // The network change restarted ICE: the probe (the offerer) sent a second offer, with new
    // credentials, and the media went on.
    let ufrags = result["afterNetworkChange"]["remoteUfrags"]
        .as_u64()
        .unwrap_or(0);
    assert!(ufrags >= 2, "{result}");
    assert_page_got_the_probe(&result, f64::from(PATIENT_TONE_HZ), "host", None);
    // The page sends the patient's tone whatever its role: the probe names what it heard.
    assert_probe_got_the_page(&patient.await??);
    Ok(())
}

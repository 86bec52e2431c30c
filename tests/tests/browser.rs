//! The patient's join page in a real browser: headless Chromium (Debian's `chromium`, with its
//! fake camera and microphone) driven by `tests/browser/driver.mjs` (playwright-core, installed
//! with npm into `target/node-tools/` when missing), against the real server and a
//! `bedside-probe` on the other side. Both sides say what they decoded: the probe's report, and
//! the page's `getStats()` (inbound-rtp frames decoded, audio energy, the candidate in use).
//!
//! Without Chromium, node, npm or NSS's `certutil` the suite skips, saying why; under `CI=true`
//! it fails. One browser at a time (the machine is small): the tests take a shared lock.
//!
//! TLS (the relay's TURN/TLS, the lab's HTTPS) is verified by Chromium as a patient's browser
//! would verify it: the tests make a private CA and trust it in an NSS database in Chromium's
//! HOME (`certutil`, from `libnss3-tools`), never `--ignore-certificate-errors`. NSS rather than
//! `--ignore-certificate-errors-spki-list` pinned to the test key: the NSS path checks the chain,
//! the names (IP subject alternative names) and the dates, as a clinic's own CA installed on a
//! managed machine is checked; a pinned key would skip all of that.

use std::net::{IpAddr, Ipv4Addr};
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
    on_path("certutil").ok_or("no certutil on PATH (apt-get install libnss3-tools)")?;
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
    async fn open(driver: &Driver, scenario: Value) -> Result<Page> {
        Self::open_in(driver, scenario, None).await
    }

    /// [`Page::open`] with the browser in the network namespace `netns` (a lab host).
    async fn open_in(driver: &Driver, mut scenario: Value, netns: Option<&str>) -> Result<Page> {
        let profile = tempfile::tempdir()?;
        scenario["chromium"] = json!(driver.chromium);
        scenario["userDataDir"] = json!(profile.path());
        let mut command = match netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, "node"]);
                c
            }
            None => tokio::process::Command::new("node"),
        };
        let mut child = command
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

/// A private CA, a server certificate it signed for `ips`, and a HOME for Chromium whose NSS
/// database trusts the CA (and nothing else beyond the system's roots).
struct TestCa {
    dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn new(ips: &[IpAddr]) -> Result<TestCa> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Bedside test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let names: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
        let mut leaf = CertificateParams::new(names.clone())?;
        leaf.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate()?;
        let cert = leaf.signed_by(&leaf_key, &ca)?;
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.pem())?;
        std::fs::write(path("cert.pem"), cert.pem())?;
        std::fs::write(path("key.pem"), leaf_key.serialize_pem())?;
        // Chromium on Linux reads $HOME/.pki/nssdb: an empty database, then the CA trusted to
        // issue server certificates ("C,,").
        let nssdb = path("home/.pki/nssdb");
        std::fs::create_dir_all(&nssdb)?;
        let db = format!("sql:{}", nssdb.display());
        for args in [
            vec!["-N", "-d", &db, "--empty-password"],
            vec![
                "-A",
                "-d",
                &db,
                "-n",
                "Bedside test CA",
                "-t",
                "C,,",
                "-i",
                path("ca.pem").to_str().context("a UTF-8 path")?,
            ],
        ] {
            let out = std::process::Command::new("certutil")
                .args(&args)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "certutil {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(TestCa {
            ca: path("ca.pem"),
            cert: path("cert.pem"),
            key: path("key.pem"),
            dir,
        })
    }

    /// Chromium's HOME.
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
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
    let ca = TestCa::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)])?;
    let mut config: Config = with_turn(test_config());
    config.turn.relay.listen_tls = vec!["127.0.0.1:0".parse()?];
    config.turn.relay.tls_cert = Some(ca.cert.clone());
    config.turn.relay.tls_key = Some(ca.key.clone());
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
            // The relay's certificate is verified against the test's CA.
            "home": ca.home(),
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

/// The doctor turns audio-only on mid-call and off again: the page says so in plain words
/// while the doctor's video stops reaching it (getStats: no frames decoded) and the sound goes
/// on, then shows the doctor's video again and takes the notice down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_doctor_going_audio_only_and_back_to_video() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    let _one = ONE_BROWSER.lock().await;
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let doctor = tokio::spawn(run(ProbeOptions {
        audio_only_between: Some((Duration::from_secs(5), Duration::from_secs(13))),
        ..probe(
            &server,
            JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
            Duration::from_secs(20),
        )
    }));
    let mut page = Page::open(
        &driver,
        json!({
            "url": format!("{}?tone={PATIENT_TONE_HZ}", c.invite_url),
            "name": "Ada Patient",
            "audioOnly": true,
            "timeoutMs": 30000,
        }),
    )
    .await?;
    page.expect("media").await?;
    let notice = page.expect("audio-only").await?;
    assert_eq!(
        notice["banner"], "Audio only: the doctor’s video is paused. You can still talk.",
        "{notice}"
    );
    assert_eq!(notice["by"], "remote", "{notice}");
    page.expect("video-back").await?;
    let result = page.finish().await?;
    let a = &result["audioOnly"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    // While audio-only: still audio-only 2 s later, no new frame (one in flight at most), the
    // doctor's sound still arriving.
    assert_eq!(a["during"]["still"], true, "{a}");
    assert!(
        n(&a["during"]["frames"]) <= n(&a["at"]["frames"]) + 1,
        "{a}"
    );
    assert!(n(&a["during"]["audio"]) >= n(&a["at"]["audio"]) + 50, "{a}");
    // Then the video again, and the notice gone.
    assert!(
        n(&a["after"]["frames"]) >= n(&a["during"]["frames"]) + 20,
        "{a}"
    );
    assert_eq!(a["bannerAfter"], Value::Null, "{a}");
    assert_eq!(result["errors"], json!([]), "{result}");
    let report = doctor.await??;
    assert!(report.connected, "{report:?}");
    let switched: Vec<bool> = report.audio_only.iter().map(|(_, on)| *on).collect();
    assert_eq!(switched, [true, false], "{report:?}");
    Ok(())
}

/// A call in the impairment lab with the browser: the server on `srv` (HTTPS on 443, the relay
/// on UDP 3478 and TURN/TLS on 443 of a second address, no plain TURN/TCP, every certificate the test CA's), a
/// doctor probe on `doc` (trusting the CA for `wss://`), and the browser on `pat`, started by
/// [`BrowserLab::page`].
struct BrowserLab {
    lab: bedside_tests::netns::Lab,
    ca: TestCa,
    invite_url: String,
    doctor_token: String,
    doctor: Option<u32>,
    _dir: tempfile::TempDir,
}

impl BrowserLab {
    /// `prepare` sets the lab's rules before anything starts.
    fn start(prepare: impl FnOnce(&bedside_tests::netns::Lab) -> Result<()>) -> Result<BrowserLab> {
        use bedside_tests::netns::{Lab, workspace_bin};
        use std::io::Read;
        let mut lab = Lab::new(&["srv", "doc", "pat"])?;
        let srv = lab.addr("srv");
        let relay_tls = Ipv4Addr::new(198, 18, 0, 10);
        lab.run("srv", &format!("ip addr add {relay_tls}/24 dev eth0"))?;
        prepare(&lab)?;
        let ca = TestCa::new(&[IpAddr::V4(srv), IpAddr::V4(relay_tls)])?;
        let dir = tempfile::tempdir()?;
        let key = "lab-admin-key-0123456789";
        let config = dir.path().join("lab.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{srv}:443\"\npublic-url = \"https://{srv}\"\ndata-dir = \"{data}\"\n\
                 admin-api-key = \"{key}\"\n[tls]\nmode = \"files\"\ncert = \"{cert}\"\n\
                 key = \"{tls_key}\"\n[turn]\nenabled = true\n[turn.relay]\n\
                 listen-udp = [\"{srv}:3478\"]\nlisten-tcp = []\n\
                 listen-tls = [\"{relay_tls}:443\"]\n\
                 tls-cert = \"{cert}\"\ntls-key = \"{tls_key}\"\nrelay-ips = [\"{srv}\"]\n\
                 allowed-peers = [\"198.18.0.0/24\"]\n",
                data = dir.path().join("data").display(),
                cert = ca.cert.display(),
                tls_key = ca.key.display(),
            ),
        )?;
        let server_bin = workspace_bin("bedside-server");
        let probe_bin = workspace_bin("bedside-probe");
        for bin in [&server_bin, &probe_bin] {
            anyhow::ensure!(
                bin.exists(),
                "{} is not built: run `cargo build -p bedside-server -p bedside-probe --bins` first",
                bin.display()
            );
        }
        let config_arg = config.display().to_string();
        let server = lab.spawn("srv", &server_bin, &["--config", &config_arg])?;
        // It listens once it has said so.
        let mut first = [0u8; 16];
        lab.child(server)
            .stdout
            .as_mut()
            .context("server output")?
            .read_exact(&mut first)
            .context("the lab's server did not start")?;
        let created = lab.run(
            "srv",
            &format!(
                "curl -sS --fail --cacert {} -X POST -H 'Authorization: Bearer {key}' \
                 https://{srv}/api/v1/consultations",
                ca.ca.display()
            ),
        )?;
        let c: Value = serde_json::from_str(&created).with_context(|| created.clone())?;
        let invite_url = c["invite_url"]
            .as_str()
            .context("an invite link")?
            .to_owned();
        anyhow::ensure!(invite_url.starts_with(&format!("https://{srv}/j/")), "{c}");
        Ok(BrowserLab {
            lab,
            ca,
            invite_url,
            doctor_token: c["doctor_token"]
                .as_str()
                .context("a doctor token")?
                .to_owned(),
            doctor: None,
            _dir: dir,
        })
    }

    /// Starts the doctor probe on `doc` (trusting the CA for `wss://`); it admits whoever waits
    /// and stays `secs` once connected.
    fn start_doctor(&mut self, secs: u64) -> Result<()> {
        let ws = format!("wss://{}/ws", self.lab.addr("srv"));
        let udp = format!("{}:0", self.lab.addr("doc"));
        let ca = self.ca.ca.display().to_string();
        let secs = secs.to_string();
        let probe = bedside_tests::netns::workspace_bin("bedside-probe");
        let pid = self.lab.spawn(
            "doc",
            &probe,
            &[
                "--server",
                &ws,
                "--token",
                &self.doctor_token,
                "--duration",
                &secs,
                "--width",
                "320",
                "--height",
                "180",
                "--bitrate-kbps",
                "300",
                "--udp",
                &udp,
                "--ca-cert",
                &ca,
            ],
        )?;
        self.doctor = Some(pid);
        Ok(())
    }

    /// The join page in Chromium on `pat`, trusting the test CA.
    async fn page(&self, driver: &Driver, mut scenario: Value) -> Result<Page> {
        scenario["url"] = json!(format!("{}?tone={PATIENT_TONE_HZ}", self.invite_url));
        scenario["home"] = json!(self.ca.home());
        Page::open_in(driver, scenario, Some(&self.lab.namespace("pat"))).await
    }

    /// The doctor probe's report, once it has left; then the lab is taken down.
    async fn doctor_report(self) -> Result<Value> {
        let BrowserLab {
            mut lab, doctor, ..
        } = self;
        let doctor = doctor.context("the doctor was not started")?;
        tokio::task::spawn_blocking(move || bedside_tests::scenarios::report(&mut lab, doctor))
            .await?
    }
}

/// The lab can run here (root, iproute2, nftables), or the test skips saying why.
fn lab_available() -> bool {
    match bedside_tests::netns::Lab::unavailable() {
        None => true,
        Some(why) => {
            bedside_tests::skip(&format!("the browser lab cannot run: {why}"));
            false
        }
    }
}

/// The doctor probe decoded the page's video and heard its tone (its JSON report).
fn assert_lab_doctor_got_the_page(report: &Value, chat: u64) {
    assert_eq!(report["connected"], true, "{report}");
    assert!(
        report["video_frames_decoded"].as_u64().unwrap_or(0) >= 20,
        "{report}"
    );
    assert!(
        report["audio_frames_received"].as_u64().unwrap_or(0) >= 50,
        "{report}"
    );
    assert_eq!(report["heard"], "patient", "{report}");
    assert_eq!(report["chat_received"], chat, "{report}");
    assert_eq!(report["samples_unsent"], 0, "{report}");
}

/// The patient's browser is in a network that drops all UDP (a lab host with nftables): it
/// opens the link over HTTPS, finds the server's relay over TURN/TLS on port 443 (a second
/// address of the server's host) and holds the call with a doctor probe on another host,
/// media both ways. Every certificate (the page's HTTPS, the relay's TLS, the probe's wss) is
/// the test CA's and is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_the_browser_connects_through_turn_over_tls() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    if !lab_available() {
        return Ok(());
    }
    let _one = ONE_BROWSER.lock().await;
    let mut call = BrowserLab::start(|lab| {
        // No UDP in or out of the patient's host, loopback aside.
        lab.nft(
            "pat",
            "table inet lab {\n chain output {\n  type filter hook output priority 0;\n  \
             oif lo accept\n  meta l4proto udp drop\n }\n chain input {\n  \
             type filter hook input priority 0;\n  iif lo accept\n  meta l4proto udp drop\n }\n}\n",
        )
    })?;
    let mut page = call
        .page(
            &driver,
            json!({
                "name": "Ada Patient",
                "chat": "hello from the browser",
                "holdMs": 1000,
                "timeoutMs": 45000,
            }),
        )
        .await?;
    let loaded = page.expect("page").await?;
    assert_eq!(loaded["status"], 200, "{loaded}");
    // The doctor comes once the patient waits.
    page.expect("waiting").await?;
    call.start_doctor(10)?;
    page.expect("media").await?;
    let result = page.finish().await?;
    // No UDP could leave: the only way was the relay over TLS.
    assert_page_got_the_probe(&result, DOCTOR_TONE_HZ, "relay", Some("tls"));
    assert_lab_doctor_got_the_page(&call.doctor_report().await?, 1);
    Ok(())
}

/// Renomination, the browser controlling and the native side controlled: while UDP between the
/// patient's and the doctor's hosts is dropped the browser nominates a relayed pair, the only
/// one that works; once the path opens it nominates the direct pair, a better one, and the
/// native side must follow (webrtc-rs 0.21's controlled agent kept the first nominated pair:
/// see `vendor/rtc-ice`), so that both ends send direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_browser_renominates_a_direct_pair_the_native_side_follows() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    if !lab_available() {
        return Ok(());
    }
    let _one = ONE_BROWSER.lock().await;
    let mut call = BrowserLab::start(|lab| {
        let (pat, doc) = (lab.addr("pat"), lab.addr("doc"));
        let drop_from = |from| {
            format!(
                "table inet lab {{\n chain input {{\n  type filter hook input priority 0;\n  \
                 ip saddr {from} meta l4proto udp drop\n }}\n}}\n"
            )
        };
        lab.nft("pat", &drop_from(doc))?;
        lab.nft("doc", &drop_from(pat))
    })?;
    let mut page = call
        .page(
            &driver,
            json!({"name": "Ada Patient", "holdMs": 12000, "timeoutMs": 45000}),
        )
        .await?;
    page.expect("waiting").await?;
    call.start_doctor(20)?;
    let media = page.expect("media").await?;
    let first = media["stats"]
        .as_object()
        .and_then(|s| s.values().next().cloned())
        .with_context(|| format!("the page's stats: {media}"))?;
    assert!(
        first["localCandidateType"] == "relay" || first["remoteCandidateType"] == "relay",
        "{first}"
    );
    // The direct path opens.
    call.lab.nft("pat", "delete table inet lab")?;
    call.lab.nft("doc", "delete table inet lab")?;
    let result = page.finish().await?;
    let last = result["stats"]
        .as_object()
        .and_then(|s| s.values().next().cloned())
        .with_context(|| format!("the page's stats at the end: {result}"))?;
    assert_eq!(last["localCandidateType"], "host", "{result}");
    assert!(
        ["host", "prflx"].contains(&last["remoteCandidateType"].as_str().unwrap_or_default()),
        "{result}"
    );
    let report = call.doctor_report().await?;
    eprintln!("the doctor's pairs: {}", report["candidate_pairs"]);
    assert_lab_doctor_got_the_page(&report, 0);
    // The native side first sent through a relay (its own or the browser's), then on the
    // direct pair the browser nominated last (its type is `relay` while either end is one).
    assert_eq!(report["candidate_pairs"][0][1], "relay", "{report}");
    assert_eq!(report["candidate_pair"], "host", "{report}");
    Ok(())
}

/// The page's own network gets too weak for video (the patient's uplink held to 50 kbit/s in
/// the lab): the page stops sending video and says so in words while the doctor's video and
/// voice go on; once the link is back, its probes find it and the video goes out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_weak_uplink_the_page_goes_audio_only_and_back_to_video() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    if !lab_available() {
        return Ok(());
    }
    let _one = ONE_BROWSER.lock().await;
    let mut call = BrowserLab::start(|_| Ok(()))?;
    let mut page = call
        .page(
            &driver,
            json!({
                "name": "Ada Patient",
                "audioOnly": true,
                "audioOnlyBySelf": true,
                "audioOnlyHoldMs": 1000,
                "timeoutMs": 60000,
            }),
        )
        .await?;
    page.expect("waiting").await?;
    call.start_doctor(45)?;
    page.expect("media").await?;
    call.lab.limit_uplink("pat", Some(50))?;
    let notice = page.expect("audio-only").await?;
    assert_eq!(
        notice["banner"], "Audio only: your connection is too weak for video. You can still talk.",
        "{notice}"
    );
    assert_eq!(notice["by"], "network", "{notice}");
    page.expect("audio-only-held").await?;
    call.lab.limit_uplink("pat", None)?;
    page.expect("video-back").await?;
    let result = page.finish().await?;
    let a = &result["audioOnly"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    // Audio-only: the page sent no video (a few frames at most, were a probe starting), the
    // doctor's picture and sound still came in.
    assert_eq!(a["during"]["still"], true, "{a}");
    assert!(
        n(&a["during"]["framesSent"]) <= n(&a["at"]["framesSent"]) + 3,
        "{a}"
    );
    assert!(n(&a["during"]["audio"]) > n(&a["at"]["audio"]), "{a}");
    // Then its video again, and the notice gone.
    assert!(
        n(&a["after"]["framesSent"]) >= n(&a["during"]["framesSent"]) + 20,
        "{a}"
    );
    assert_eq!(a["bannerAfter"], Value::Null, "{a}");
    let report = call.doctor_report().await?;
    assert_eq!(report["connected"], true, "{report}");
    assert!(
        report["video_frames_decoded"].as_u64().unwrap_or(0) >= 20,
        "{report}"
    );
    Ok(())
}

//! The continuity scenarios, shared by the lab tests (`tests/continuity.rs`, which assert on
//! them) and the continuity bench (`continuity-bench`, which prints a table of them): a real
//! server and two real probes (`doc`, `pat`) on hosts of their own in the impairment lab, an
//! impairment at a known time, and the probes' JSON reports.

use std::io::Read;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::{Lab, workspace_bin};

const ADMIN_KEY: &str = "lab-admin-key-0123456789";

/// Why the lab cannot run here (not root, no iproute2 or nftables), if it cannot. Missing
/// server or probe binaries are not a reason to skip: starting a call fails, saying so.
pub fn unavailable() -> Option<String> {
    Lab::unavailable()
}

fn lab_bin(name: &str) -> Result<std::path::PathBuf> {
    let path = workspace_bin(name);
    anyhow::ensure!(
        path.exists(),
        "{} is not built: run `cargo build -p bedside-server -p bedside-probe --bins` first",
        path.display()
    );
    Ok(path)
}

/// A consultation running in the lab.
pub struct Call {
    pub lab: Lab,
    pub doctor: u32,
    pub patient: u32,
    pub server: u32,
    server_args: Vec<String>,
    /// When the probes started (their report times count from about then).
    pub started: Instant,
    /// The server's data directory, kept until the call is dropped.
    _dir: tempfile::TempDir,
}

/// How the lab's server is set up.
pub struct Setup {
    /// Seconds each probe stays once connected.
    pub seconds: u64,
    /// The patient's sockets on every address, as a phone's are (for handovers).
    pub roaming: bool,
    /// The signaling port.
    pub port: u16,
    /// The relay's configuration (TOML).
    pub turn: String,
    /// Extra arguments for the patient's probe (e.g. `--delay-ms`).
    pub patient_args: Vec<String>,
    /// More of the server's configuration (TOML sections, e.g. `[alerts]`).
    pub extra_config: String,
}

impl Setup {
    pub fn new(seconds: u64) -> Self {
        Setup {
            seconds,
            roaming: false,
            port: 8443,
            turn: "[turn]\nenabled = false\n".into(),
            patient_args: Vec::new(),
            extra_config: String::new(),
        }
    }
}

impl Call {
    /// Server on `srv`, a doctor probe on `doc` and a patient probe on `pat`.
    pub fn start(setup: Setup) -> Result<Call> {
        Self::start_in(Lab::new(&["srv", "doc", "pat"])?, setup)
    }

    /// [`Call::start`] in a lab the caller prepared (addresses, firewall rules).
    pub fn start_in(mut lab: Lab, setup: Setup) -> Result<Call> {
        let dir = tempfile::tempdir()?;
        let srv = lab.addr("srv");
        let port = setup.port;
        let config = dir.path().join("lab.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{srv}:{port}\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
                 [tls]\nmode = \"off\"\n{}{}",
                dir.path().join("data").display(),
                setup.turn,
                setup.extra_config
            ),
        )?;
        let server_args = vec!["--config".to_owned(), config.display().to_string()];
        let server = spawn_server(&mut lab, &server_args)?;
        let body = lab.http(
            "srv",
            &srv.to_string(),
            port,
            "POST",
            "/api/v1/consultations",
            ADMIN_KEY,
        )?;
        let created: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        let ws = format!("ws://{srv}:{port}/ws");
        let secs = setup.seconds.to_string();
        let started = Instant::now();
        let probe = |lab: &mut Lab, host: &str, auth: &str, secret: &str| {
            let udp = if setup.roaming && host == "pat" {
                "0.0.0.0:0".to_owned()
            } else {
                format!("{}:0", lab.addr(host))
            };
            let mut args = vec![
                "--server",
                &ws,
                auth,
                secret,
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
            ];
            if host == "pat" {
                args.extend(setup.patient_args.iter().map(String::as_str));
            }
            lab.spawn(host, &lab_bin("bedside-probe")?, &args)
        };
        let doctor = probe(
            &mut lab,
            "doc",
            "--token",
            created["doctor_token"].as_str().unwrap(),
        )?;
        let patient = probe(
            &mut lab,
            "pat",
            "--invite",
            created["invite_code"].as_str().unwrap(),
        )?;
        Ok(Call {
            lab,
            doctor,
            patient,
            server,
            server_args,
            started,
            _dir: dir,
        })
    }

    /// Milliseconds since the probes started: the time base of their reports.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Kills the server (as a crash or a redeploy would), waits `down`, starts it again on the
    /// same store.
    pub fn restart_server(&mut self, down: Duration) -> Result<()> {
        let child = self.lab.child(self.server);
        child.kill()?;
        child.wait()?;
        std::thread::sleep(down);
        self.server = spawn_server(&mut self.lab, &self.server_args)?;
        Ok(())
    }

    /// Waits for both probes and returns their reports (doctor, patient).
    pub fn finish(mut self) -> Result<(Value, Value)> {
        let patient = report(&mut self.lab, self.patient)?;
        let doctor = report(&mut self.lab, self.doctor)?;
        Ok((doctor, patient))
    }
}

fn spawn_server(lab: &mut Lab, args: &[String]) -> Result<u32> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = lab.spawn("srv", &lab_bin("bedside-server")?, &args)?;
    // Wait until it listens (its first line says so).
    let mut first = [0u8; 64];
    lab.child(server)
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .context("server output")?;
    Ok(server)
}

/// A probe's JSON report, once it has finished.
pub fn report(lab: &mut Lab, pid: u32) -> Result<Value> {
    let child = lab.child(pid);
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out)?;
    child.wait()?;
    serde_json::from_str(&out).with_context(|| format!("probe report: {out}"))
}

/// One scenario's outcome: both reports and when the impairments happened (ms since start).
pub struct Trial {
    pub name: &'static str,
    pub doctor: Value,
    pub patient: Value,
    pub events_ms: Vec<u64>,
    /// When the impairment was lifted, if it was (a collapse's recovery).
    pub lifted_ms: Option<u64>,
}

/// A 15 s signaling outage for the patient (the server drops its signaling port): the media
/// must go on and the seat come back.
pub fn signaling_outage() -> Result<Trial> {
    let call = Call::start(Setup::new(30))?;
    std::thread::sleep(Duration::from_secs(8));
    let pat = call.lab.addr("pat");
    call.lab.nft(
        "srv",
        &format!(
            "table inet lab {{\n chain input {{\n  type filter hook input priority 0;\n  \
             ip saddr {pat} tcp dport 8443 drop\n }}\n}}\n"
        ),
    )?;
    let at = call.now_ms();
    std::thread::sleep(Duration::from_secs(15));
    call.lab.nft("srv", "delete table inet lab")?;
    let lifted = call.now_ms();
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name: "signaling outage 15 s",
        doctor,
        patient,
        events_ms: vec![at],
        lifted_ms: Some(lifted),
    })
}

/// Random loss of `pct` percent of what reaches the patient's host, media and signaling alike.
pub fn random_loss(pct: u32) -> Result<Trial> {
    let call = Call::start(Setup::new(20))?;
    call.lab.nft(
        "pat",
        &format!(
            "table inet lab {{\n chain input {{\n  type filter hook input priority 0;\n  \
             numgen random mod 100 < {pct} drop\n }}\n}}\n"
        ),
    )?;
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name: match pct {
            5 => "random loss 5%",
            10 => "random loss 10%",
            20 => "random loss 20%",
            _ => "random loss",
        },
        doctor,
        patient,
        events_ms: vec![0],
        lifted_ms: None,
    })
}

/// Drops `rule` (an nftables match, e.g. `numgen random mod 100 < 12`) of what reaches the
/// patient's host and of what the patient sends the doctor: loss on both directions of the
/// patient's link, so the feedback about what the patient sends is lost too.
fn lose_both_ways(call: &Call, rule: &str) -> Result<()> {
    let pat = call.lab.addr("pat");
    call.lab.nft(
        "pat",
        &format!(
            "table inet lab {{\n chain input {{\n  type filter hook input priority 0;\n  \
             {rule} drop\n }}\n}}\n"
        ),
    )?;
    call.lab.nft(
        "doc",
        &format!(
            "table inet lab {{\n chain input {{\n  type filter hook input priority 0;\n  \
             ip saddr {pat} {rule} drop\n }}\n}}\n"
        ),
    )
}

/// A trial whose impairment held from the start to the end of `call`.
fn steady_trial(name: &'static str, call: Call) -> Result<Trial> {
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name,
        doctor,
        patient,
        events_ms: vec![0],
        lifted_ms: None,
    })
}

/// 12% random loss on both directions of the patient's link (between the one-way 10% and 20%
/// cases, which impair less of the path: here the feedback is lost too).
pub fn both_ways_loss() -> Result<Trial> {
    let call = Call::start(Setup::new(30))?;
    lose_both_ways(&call, "numgen random mod 100 < 12")?;
    steady_trial("loss 12% both ways", call)
}

/// Bursty loss both ways: five packets in a row of every hundred (5%, in bursts; nftables has
/// no random burst model, so the bursts are regular).
pub fn bursty_loss() -> Result<Trial> {
    let call = Call::start(Setup::new(30))?;
    lose_both_ways(&call, "numgen inc mod 100 < 5")?;
    steady_trial("bursty loss 5% both ways", call)
}

/// A long lossy path: what the patient sends is held 160 ms plus up to 80 ms of jitter, and 5%
/// is lost both ways (the case where an independent lab saw the call break twice in four).
pub fn delay_and_loss() -> Result<Trial> {
    let call = Call::start(Setup {
        patient_args: ["--delay-ms", "160", "--jitter-ms", "80"]
            .map(str::to_owned)
            .to_vec(),
        ..Setup::new(30)
    })?;
    lose_both_ways(&call, "numgen random mod 100 < 5")?;
    steady_trial("delay 160 ms + jitter 80 ms, loss 5% both ways", call)
}

/// Wi-Fi to cellular, `count` times, `every` apart: the patient's address changes and the app
/// says so (SIGUSR1: the probe's network-change signal).
pub fn handovers(count: u8, every: Duration) -> Result<Trial> {
    let seconds = 8 + every.as_secs() * u64::from(count.saturating_sub(1)) + 17;
    let call = Call::start(Setup {
        roaming: true,
        ..Setup::new(seconds)
    })?;
    std::thread::sleep(Duration::from_secs(8));
    let mut events = Vec::new();
    let mut addr = call.lab.addr("pat");
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(every);
        }
        let next = Ipv4Addr::new(198, 18, 0, 13 + i);
        call.lab.handover("pat", addr, next)?;
        unsafe { libc::kill(call.patient as i32, libc::SIGUSR1) };
        events.push(call.now_ms());
        addr = next;
    }
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name: if count == 1 {
            "handover"
        } else {
            "long call, handover every 30 s"
        },
        doctor,
        patient,
        events_ms: events,
        lifted_ms: None,
    })
}

/// The server is killed mid-call and comes back 5 s later on the same store.
pub fn server_restart() -> Result<Trial> {
    let mut call = Call::start(Setup::new(25))?;
    std::thread::sleep(Duration::from_secs(8));
    let at = call.now_ms();
    call.restart_server(Duration::from_secs(5))?;
    let lifted = call.now_ms();
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name: "server restart",
        doctor,
        patient,
        events_ms: vec![at],
        lifted_ms: Some(lifted),
    })
}

/// Only TCP to port 443 gets out of the patient's network: no UDP at all. The signaling is on
/// 443 and the relay takes TURN over TCP on 443 (a second address of the server's host).
pub fn tcp_443_only() -> Result<Trial> {
    let lab = Lab::new(&["srv", "doc", "pat"])?;
    let srv = lab.addr("srv");
    let relay_tcp = Ipv4Addr::new(198, 18, 0, 10);
    lab.run("srv", &format!("ip addr add {relay_tcp}/24 dev eth0"))?;
    lab.nft(
        "pat",
        "table inet lab {\n chain output {\n  type filter hook output priority 0; policy drop;\n  \
         oif lo accept\n  ct state established,related accept\n  tcp dport 443 accept\n }\n \
         chain input {\n  type filter hook input priority 0; policy drop;\n  iif lo accept\n  \
         ct state established,related accept\n }\n}\n",
    )?;
    let turn = format!(
        "[turn]\nenabled = true\n[turn.relay]\nlisten-udp = [\"{srv}:3478\"]\n\
         listen-tcp = [\"{relay_tcp}:443\"]\nrelay-ips = [\"{srv}\"]\n\
         allowed-peers = [\"198.18.0.0/24\"]\n"
    );
    let call = Call::start_in(
        lab,
        Setup {
            port: 443,
            turn,
            ..Setup::new(15)
        },
    )?;
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name: "UDP blocked, TCP 443 only",
        doctor,
        patient,
        events_ms: vec![0],
        lifted_ms: None,
    })
}

/// A long, uneven path from the patient: everything it sends is held 150 ms plus up to 60 ms
/// of jitter (a satellite or a congested cellular link), with no loss.
pub fn delay_and_jitter() -> Result<Trial> {
    let call = Call::start(Setup {
        patient_args: ["--delay-ms", "150", "--jitter-ms", "60"]
            .map(str::to_owned)
            .to_vec(),
        ..Setup::new(20)
    })?;
    steady_trial("delay 150 ms + jitter 60 ms", call)
}

/// The patient's uplink collapses to 100 kbit/s for 12 s, then recovers.
pub fn bandwidth_collapse() -> Result<Trial> {
    let call = Call::start(Setup::new(40))?;
    std::thread::sleep(Duration::from_secs(8));
    call.lab.limit_uplink("pat", Some(100))?;
    let at = call.now_ms();
    std::thread::sleep(Duration::from_secs(12));
    call.lab.limit_uplink("pat", None)?;
    let lifted = call.now_ms();
    let (doctor, patient) = call.finish()?;
    Ok(Trial {
        name: "bandwidth collapse 100 kbps, back",
        doctor,
        patient,
        events_ms: vec![at],
        lifted_ms: Some(lifted),
    })
}

impl Trial {
    /// Both probes connected and left on their own, the patient still decoding video at the end.
    pub fn survived(&self) -> bool {
        [&self.doctor, &self.patient]
            .iter()
            .all(|r| r["connected"] == true && r["ended"] == "Left")
    }

    /// The patient's state changes, in order.
    pub fn patient_states(&self) -> Vec<String> {
        states(&self.patient)
    }

    /// The longest freeze of the doctor's view of the patient (or the patient's of the doctor,
    /// whichever is worse) that ended after each event; ms. 0: the picture never froze for
    /// longer than the pipeline's gap threshold.
    pub fn media_back_ms(&self) -> Vec<u64> {
        self.events_ms
            .iter()
            .map(|&event| {
                [&self.doctor, &self.patient]
                    .iter()
                    .flat_map(|r| gaps(r))
                    .filter(|(end, gap)| *end >= event && end.saturating_sub(*gap) <= event + 5000)
                    .map(|(end, _)| end - event)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// When the patient went audio-only after the first event, and when video came back after
    /// the impairment was lifted (ms after each).
    pub fn audio_only_and_back_ms(&self) -> (Option<u64>, Option<u64>) {
        let changes: Vec<(u64, bool)> =
            serde_json::from_value(self.patient["audio_only"].clone()).unwrap_or_default();
        let event = self.events_ms.first().copied().unwrap_or(0);
        let went = changes
            .iter()
            .find(|(t, on)| *on && *t >= event)
            .map(|(t, _)| t - event);
        let back = self.lifted_ms.and_then(|lifted| {
            changes
                .iter()
                .find(|(t, on)| !*on && *t >= lifted)
                .map(|(t, _)| t - lifted)
        });
        (went, back)
    }

    /// How many times the patient's call went audio-only for lack of bandwidth.
    pub fn audio_only_spells(&self) -> usize {
        let changes: Vec<(u64, bool)> =
            serde_json::from_value(self.patient["audio_only"].clone()).unwrap_or_default();
        changes.iter().filter(|(_, on)| *on).count()
    }

    /// The longest freeze of either side's picture that ended during the call, ms.
    pub fn longest_freeze_ms(&self) -> u64 {
        [&self.doctor, &self.patient]
            .iter()
            .flat_map(|r| gaps(r))
            .map(|(_, gap)| gap)
            .max()
            .unwrap_or(0)
    }

    /// Share of the audio frames the doctor and the patient played that came from real packets
    /// (not FEC, not concealment), percent.
    pub fn audio_played_pct(&self) -> (f64, f64) {
        let pct = |r: &Value| 100.0 * r["audio_played_share"].as_f64().unwrap_or(0.0);
        (pct(&self.doctor), pct(&self.patient))
    }

    /// Share of the audio frames played that carried real audio (their packet, a redundant
    /// copy, or rebuilt by FEC), percent: doctor, patient.
    pub fn audio_recovered_pct(&self) -> (f64, f64) {
        let pct = |r: &Value| 100.0 * r["audio_recovered_share"].as_f64().unwrap_or(0.0);
        (pct(&self.doctor), pct(&self.patient))
    }
}

/// A report's state changes, in order.
pub fn states(report: &Value) -> Vec<String> {
    report["states"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s[1].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn gaps(report: &Value) -> Vec<(u64, u64)> {
    serde_json::from_value(report["video_gaps_ms"].clone()).unwrap_or_default()
}

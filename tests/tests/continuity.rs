//! Continuity scenarios in the impairment lab (network namespaces, nftables): the real server
//! and two real probes on hosts of their own. Skips, saying why, where namespaces can't be made
//! (not root, no iproute2 or nftables).

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result};
use bedside_tests::netns::{Lab, workspace_bin};
use serde_json::Value;

const ADMIN_KEY: &str = "lab-admin-key-0123456789";

fn lab_or_skip() -> Option<()> {
    if let Some(why) = Lab::unavailable() {
        eprintln!("SKIPPED: the impairment lab cannot run here: {why}");
        return None;
    }
    for bin in ["bedside-server", "bedside-probe"] {
        if !workspace_bin(bin).exists() {
            eprintln!("SKIPPED: {bin} is not built (cargo build --workspace)");
            return None;
        }
    }
    Some(())
}

/// Server on `srv`, a doctor probe on `doc` and a patient probe on `pat`, each staying
/// `seconds` once connected. Returns the lab and the two probes' pids.
fn consultation(seconds: u64) -> Result<(Lab, u32, u32)> {
    consultation_with(seconds, false)
}

/// [`consultation`], with the patient's sockets on every address (`roaming`), as a phone's are.
fn consultation_with(seconds: u64, roaming: bool) -> Result<(Lab, u32, u32)> {
    let lab = Lab::new(&["srv", "doc", "pat"])?;
    consultation_in(lab, seconds, roaming, 8443, "[turn]\nenabled = false\n")
}

/// [`consultation_with`] in a lab made by the caller, the server's signaling on `port` and
/// `turn` as its relay configuration (TOML).
fn consultation_in(
    mut lab: Lab,
    seconds: u64,
    roaming: bool,
    port: u16,
    turn: &str,
) -> Result<(Lab, u32, u32)> {
    let dir = tempfile::tempdir()?;
    let srv = lab.addr("srv");
    let config = dir.path().join("lab.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{srv}:{port}\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
             [tls]\nmode = \"off\"\n{turn}",
            dir.path().join("data").display()
        ),
    )?;
    let server = lab.spawn(
        "srv",
        &workspace_bin("bedside-server"),
        &["--config", config.to_str().unwrap()],
    )?;
    // Wait until it listens (its first line says so).
    let mut first = [0u8; 64];
    lab.child(server)
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .context("server output")?;
    std::mem::forget(dir); // The server uses it until the lab is dropped.
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
    let secs = seconds.to_string();
    let probe = |lab: &mut Lab, host: &str, auth: &str, secret: &str| {
        let udp = if roaming && host == "pat" {
            "0.0.0.0:0".to_owned()
        } else {
            format!("{}:0", lab.addr(host))
        };
        lab.spawn(
            host,
            &workspace_bin("bedside-probe"),
            &[
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
            ],
        )
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
    Ok((lab, doctor, patient))
}

fn report(lab: &mut Lab, pid: u32) -> Result<Value> {
    let child = lab.child(pid);
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out)?;
    child.wait()?;
    serde_json::from_str(&out).with_context(|| format!("probe report: {out}"))
}

#[test]
fn a_signaling_outage_keeps_the_media_and_the_seat() -> Result<()> {
    if lab_or_skip().is_none() {
        return Ok(());
    }
    let (mut lab, doctor, patient) = consultation(30)?;
    std::thread::sleep(Duration::from_secs(8));
    // The patient's signaling link is cut for 15 s: the server drops everything the patient
    // sends to its port. Media between the two hosts is untouched.
    let pat = lab.addr("pat");
    lab.nft(
        "srv",
        &format!(
            "table inet lab {{\n chain input {{\n  type filter hook input priority 0;\n  \
             ip saddr {pat} tcp dport 8443 drop\n }}\n}}\n"
        ),
    )?;
    std::thread::sleep(Duration::from_secs(15));
    lab.nft("srv", "delete table inet lab")?;
    let patient = report(&mut lab, patient)?;
    let doctor = report(&mut lab, doctor)?;
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(r["ended"], "Left", "{who}: {r}");
        assert!(
            r["decoded_fps"].as_f64().unwrap_or(0.0) > 10.0,
            "{who}: {r}"
        );
    }
    // The patient noticed the outage and got its seat back; the media did not stop: frames
    // kept arriving with few gaps.
    assert!(patient["reconnections"].as_u64().unwrap() >= 1, "{patient}");
    let decoded = doctor["video_frames_decoded"].as_f64().unwrap();
    let missing = doctor["video_frames_missing"].as_f64().unwrap();
    assert!(missing / (decoded + missing) < 0.05, "{doctor}");
    Ok(())
}

#[test]
fn a_call_survives_ten_percent_random_loss() -> Result<()> {
    if lab_or_skip().is_none() {
        return Ok(());
    }
    let (mut lab, doctor, patient) = consultation(20)?;
    // One packet in ten that reaches the patient's host is dropped, media and signaling alike.
    lab.nft(
        "pat",
        "table inet lab {\n chain input {\n  type filter hook input priority 0;\n  \
         numgen random mod 100 < 10 drop\n }\n}\n",
    )?;
    let patient = report(&mut lab, patient)?;
    let doctor = report(&mut lab, doctor)?;
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(r["ended"], "Left", "{who}: {r}");
    }
    // The patient still sees video and hears the doctor, with losses measured and repaired.
    assert!(
        patient["video_frames_decoded"].as_u64().unwrap() > 100,
        "{patient}"
    );
    assert_eq!(patient["heard"], "doctor", "{patient}");
    let loss = patient["loss_in_pct_max"].as_f64().unwrap_or(0.0);
    assert!(loss > 2.0, "the loss was not measured: {patient}");
    // The doctor sees the same loss on what it sends, from the patient's reception reports.
    let loss_out = doctor["loss_out_pct_max"].as_f64().unwrap_or(0.0);
    assert!(loss_out > 2.0, "outbound loss was not measured: {doctor}");
    // Video the patient could not decode was recovered by asking the doctor for keyframes.
    assert!(
        patient["keyframes_requested"].as_u64().unwrap() > 0,
        "{patient}"
    );
    assert!(
        doctor["keyframe_requests_received"].as_u64().unwrap() > 0,
        "{doctor}"
    );
    eprintln!(
        "10% loss: patient audio played from real packets {:.1}%, video frames decoded {}, \
         missing {}, skipped {}, PLIs sent {} (doctor received {}), doctor's outbound loss \
         {loss_out:.1}%, glass-to-glass p95 {} ms",
        100.0 * patient["audio_played_share"].as_f64().unwrap_or(0.0),
        patient["video_frames_decoded"],
        patient["video_frames_missing"],
        patient["video_frames_skipped"],
        patient["keyframes_requested"],
        doctor["keyframe_requests_received"],
        patient["glass_to_glass_ms_p95"]
    );
    Ok(())
}

/// The patient's network lets only TCP to port 443 out (a hospital guest network, a hotel):
/// no UDP at all. The server's signaling is on 443 and its relay takes TURN over TCP on 443 (a
/// second address); the patient's client tries host, STUN and TURN candidates at once, and the
/// call connects through the relay over TCP.
#[test]
fn only_tcp_443_gets_out_and_the_call_connects_through_turn_over_tcp() -> Result<()> {
    if lab_or_skip().is_none() {
        return Ok(());
    }
    let lab = Lab::new(&["srv", "doc", "pat"])?;
    let srv = lab.addr("srv");
    let relay_tcp = std::net::Ipv4Addr::new(198, 18, 0, 10);
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
    let (mut lab, doctor, patient) = consultation_in(lab, 15, false, 443, &turn)?;
    let patient = report(&mut lab, patient)?;
    let doctor = report(&mut lab, doctor)?;
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(r["ended"], "Left", "{who}: {r}");
        assert!(
            r["decoded_fps"].as_f64().unwrap_or(0.0) > 10.0,
            "{who}: {r}"
        );
    }
    assert_eq!(patient["candidate_pair"], "relay", "{patient}");
    assert_eq!(patient["heard"], "doctor", "{patient}");
    eprintln!(
        "TCP 443 only: patient connected in {} ms, decoding {:.1} fps, glass-to-glass p95 {} ms, \
         RTT p50 {} ms",
        patient["time_to_connect_ms"],
        patient["decoded_fps"].as_f64().unwrap_or(0.0),
        patient["glass_to_glass_ms_p95"],
        patient["rtt_ms_p50"]
    );
    Ok(())
}

#[test]
fn a_handover_restarts_ice_and_keeps_the_call() -> Result<()> {
    if lab_or_skip().is_none() {
        return Ok(());
    }
    let (mut lab, doctor, patient) = consultation_with(25, true)?;
    std::thread::sleep(Duration::from_secs(8));
    // Wi-Fi to cellular: the patient's address changes and the app says so.
    let old = lab.addr("pat");
    lab.handover("pat", old, std::net::Ipv4Addr::new(198, 18, 0, 13))?;
    unsafe { libc::kill(patient as i32, libc::SIGUSR1) };
    let patient = report(&mut lab, patient)?;
    let doctor = report(&mut lab, doctor)?;
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(r["ended"], "Left", "{who}: {r}");
    }
    // The patient went through reconnecting and came back; the doctor kept receiving video
    // after the handover.
    let states: Vec<&str> = patient["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s[1].as_str())
        .collect();
    assert!(states.contains(&"Reconnecting"), "{states:?}");
    // A resumed, admitted seat never goes back through the waiting room.
    let after_connect = states.iter().skip_while(|s| **s != "Connected");
    assert!(after_connect.clone().all(|s| *s != "Waiting"), "{states:?}");
    let decoded = doctor["video_frames_decoded"].as_f64().unwrap();
    assert!(decoded > 25.0 * 10.0, "video did not come back: {doctor}");
    eprintln!(
        "handover: doctor decoded {decoded} frames, {} missing; patient states {states:?}",
        doctor["video_frames_missing"]
    );
    Ok(())
}

/// The patient's uplink collapses to 100 kbit/s for 12 s, then recovers: the call goes
/// audio-only (on purpose, both sides told), the doctor keeps hearing the patient, and video
/// comes back by itself after the recovery (probed: with audio alone on the wire the estimate
/// cannot see the link come back).
#[test]
fn a_bandwidth_collapse_goes_audio_only_and_video_comes_back() -> Result<()> {
    if lab_or_skip().is_none() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let (mut lab, doctor, patient) = consultation(40)?;
    std::thread::sleep(Duration::from_secs(8));
    lab.limit_uplink("pat", Some(100))?;
    let collapse_ms = started.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(12));
    lab.limit_uplink("pat", None)?;
    let recovery_ms = started.elapsed().as_millis() as u64;
    let patient = report(&mut lab, patient)?;
    let doctor = report(&mut lab, doctor)?;
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(r["ended"], "Left", "{who}: {r}");
    }
    // Probe times count from the probe's start, a few ms after `started`.
    let changes: Vec<(u64, bool)> = serde_json::from_value(patient["audio_only"].clone())?;
    let went = changes
        .iter()
        .find(|(t, on)| *on && *t >= collapse_ms)
        .map(|(t, _)| t - collapse_ms);
    let back = changes
        .iter()
        .find(|(t, on)| !*on && *t >= recovery_ms)
        .map(|(t, _)| t - recovery_ms);
    eprintln!(
        "bandwidth collapse: audio-only {went:?} ms after the collapse, video back {back:?} ms \
         after the recovery; changes {changes:?}; send estimate (ms, kbps) {}",
        patient["send_estimate_kbps"]
    );
    assert!(
        went.is_some_and(|ms| ms < 4000),
        "audio-only too late: {changes:?}"
    );
    assert!(
        back.is_some_and(|ms| ms < 15_000),
        "video not back: {changes:?}"
    );
    // It stayed back: the last change is video on.
    assert_eq!(changes.last().map(|c| c.1), Some(false), "{changes:?}");
    assert_eq!(doctor["heard"], "patient", "{doctor}");
    Ok(())
}

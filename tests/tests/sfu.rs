//! Group consultations through the server's SFU (`bedside-sfu`): four probes (doctor,
//! clinician, interpreter, patient) in one consultation, each decoding every other's video and
//! hearing their audio, with the patient's uplink carrying its media once; and a 1:1 call that
//! moves to the SFU when a third participant joins, without dropping the call.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use bedside_probe::{ProbeOptions, Report, run};
use bedside_protocol::JoinAuth;
use bedside_sfu::ParticipantStats;
use bedside_tests::{TestServer, test_config, with_sfu};

/// Logs for a failing run: `RUST_LOG=bedside_sfu::hops=debug` shows the SFU's per-hop counts.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn options(server: &TestServer, auth: JoinAuth, secs: u64) -> ProbeOptions {
    ProbeOptions {
        duration: Duration::from_secs(secs),
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 160,
        height: 96,
        bitrate_kbps: 150,
        ..ProbeOptions::new(server.ws_url.clone(), auth)
    }
}

async fn clinician_token(server: &TestServer, consultation: &str) -> Result<String> {
    let issued: bedside_server::api::IssuedToken = server
        .http()
        .post(server.api(&format!("/consultations/{consultation}/tokens")))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "role": "clinician" }))
        .send()
        .await?
        .json()
        .await?;
    Ok(issued.token)
}

/// Polls the SFU's per-participant counters while the call runs; keeps the last of each.
fn watch_sfu(
    server: &TestServer,
    consultation: String,
) -> tokio::task::JoinHandle<HashMap<String, ParticipantStats>> {
    let sfu = server.sfu.clone().expect("the SFU runs");
    tokio::spawn(async move {
        let mut last = HashMap::new();
        for _ in 0..200 {
            for (pid, stats) in sfu.room_stats(&consultation).await {
                last.insert(pid, stats);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    })
}

/// What a probe measured, in one line for the test's output.
fn summary(who: &str, r: &Report) {
    let remotes: Vec<_> = r
        .remotes
        .values()
        .map(|m| (m.video_frames_decoded, m.audio_frames_received))
        .collect();
    eprintln!(
        "{who}: sent {}v/{}a, remotes (video, audio) {remotes:?}, g2g p50 {:?} p95 {:?}, m2e p50 {:?} p95 {:?}, skipped {}, missing {}, plis sent {} got {}, estimate {:?}, audio-only {:?}",
        r.video_frames_sent,
        r.audio_frames_sent,
        r.glass_to_glass_ms_p50,
        r.glass_to_glass_ms_p95,
        r.mouth_to_ear_ms_p50,
        r.mouth_to_ear_ms_p95,
        r.video_frames_skipped,
        r.video_frames_missing,
        r.keyframes_requested,
        r.keyframe_requests_received,
        r.send_estimate_kbps,
        r.audio_only,
    );
}

fn check_hears_and_sees_all(who: &str, r: &Report, others: usize) -> Result<()> {
    ensure!(r.connected, "{who}: {r:?}");
    ensure!(
        r.remotes.len() == others,
        "{who} received from {} remotes: {:?}",
        r.remotes.len(),
        r.remotes
    );
    for (pid, m) in &r.remotes {
        ensure!(
            m.video_frames_decoded >= 1,
            "{who} decoded {} frames of {pid}: {r:?}",
            m.video_frames_decoded
        );
        ensure!(
            m.audio_frames_received > 30,
            "{who} heard {} audio frames of {pid}",
            m.audio_frames_received
        );
    }
    Ok(())
}

/// One call at a time: four probes (or three) in this one debug process are already most of the
/// machine's two cores, and a client starved of CPU falls seconds behind its media clock.
static ONE_CALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_participants_each_receive_every_other_through_the_sfu() -> Result<()> {
    four_through_the_sfu(false).await
}

/// The same with end-to-end encryption: the SFU forwards SFrame-encrypted frames it cannot
/// read, and every participant decrypts every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_participants_with_sframe_decrypt_every_other_through_the_sfu() -> Result<()> {
    four_through_the_sfu(true).await
}

async fn four_through_the_sfu(e2ee: bool) -> Result<()> {
    let _one = ONE_CALL.lock().await;
    logs();
    let server = TestServer::start_with(with_sfu(test_config())).await?;
    let c = server.create_consultation().await?;
    let watch = watch_sfu(&server, c.consultation_id.0.clone());
    let mut probes = Vec::new();
    for who in ["doctor", "clinician", "interpreter", "patient"] {
        let auth = match who {
            "doctor" => JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
            "patient" => JoinAuth::InviteCode {
                code: c.invite_code.clone(),
            },
            _ => JoinAuth::Token {
                token: clinician_token(&server, &c.consultation_id.0).await?,
            },
        };
        let options = ProbeOptions {
            e2ee,
            ..options(&server, auth, 10)
        };
        probes.push((who, tokio::spawn(run(options))));
    }
    let mut reports = HashMap::new();
    for (who, p) in probes {
        reports.insert(who, p.await??);
    }
    for (who, r) in &reports {
        summary(who, r);
    }
    for (who, r) in &reports {
        check_hears_and_sees_all(who, r, 3)?;
        // A conversation, not a trickle: over 10 s at 30 frames a second, at least a third of
        // every other's frames and half of their audio, and their voice well under a second
        // late (measured on a quiet machine: 279-300 frames each, 31-76 ms mouth to ear).
        for (pid, m) in &r.remotes {
            ensure!(
                m.video_frames_decoded >= 100 && m.audio_frames_received >= 250,
                "{who} got {} frames and {} audio frames of {pid}",
                m.video_frames_decoded,
                m.audio_frames_received
            );
        }
        if let Some(m2e) = r.mouth_to_ear_ms_p95 {
            ensure!(m2e < 1000.0, "{who}: mouth to ear p95 {m2e} ms");
        }
        if e2ee {
            ensure!(
                r.e2ee_frames_encrypted > 0 && r.e2ee_frames_decrypted > 0,
                "{who}: SFrame encrypted {} and decrypted {} frames",
                r.e2ee_frames_encrypted,
                r.e2ee_frames_decrypted
            );
            // A frame that arrives before its sender's key, or that lost a packet on the way
            // (the receiver then asks for a keyframe), fails once; a broken path fails them all.
            ensure!(
                r.e2ee_decrypt_failures <= 3.max(r.e2ee_frames_decrypted / 100),
                "{who}: {} frames failed to decrypt, {} decrypted",
                r.e2ee_decrypt_failures,
                r.e2ee_frames_decrypted
            );
        }
    }
    // The patient's uplink: about one publication's worth, not one per other participant.
    let stats = watch.await?;
    let patient = reports["patient"].participant_id.clone().expect("seated");
    let up = stats[&patient].bytes_in as f64;
    let down_total: u64 = stats.values().map(|s| s.bytes_out).sum();
    // Every publication reaches three subscribers: one publication's average downlink share.
    let one_publication = down_total as f64 / (4.0 * 3.0);
    ensure!(
        up < one_publication * 1.6 && up > one_publication * 0.4,
        "patient uplink {up} B vs one publication {one_publication} B ({stats:?})"
    );
    Ok(())
}

/// A doctor and a patient are peer to peer; a clinician joins, the call moves to the SFU, and
/// neither of the first two drops: both end by leaving, and everyone sees everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_participant_moves_a_one_to_one_call_to_the_sfu() -> Result<()> {
    let _one = ONE_CALL.lock().await;
    logs();
    let server = TestServer::start_with(with_sfu(test_config())).await?;
    let c = server.create_consultation().await?;
    let watch = watch_sfu(&server, c.consultation_id.0.clone());
    let doctor = tokio::spawn(run(options(
        &server,
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        10,
    )));
    let patient = tokio::spawn(run(options(
        &server,
        JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        10,
    )));
    // Let the pair connect peer to peer first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_sfu_before = server
        .sfu
        .as_ref()
        .expect("the SFU runs")
        .room_stats(&c.consultation_id.0)
        .await
        .len();
    let token = clinician_token(&server, &c.consultation_id.0).await?;
    let clinician = run(options(&server, JoinAuth::Token { token }, 5)).await?;
    let (doctor, patient) = (doctor.await??, patient.await??);
    ensure!(on_sfu_before == 0, "a 1:1 call stays peer to peer");
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        check_hears_and_sees_all(who, r, 2)?;
        ensure!(r.ended.as_deref() == Some("Left"), "{who} dropped: {r:?}");
        ensure!(r.reconnections == 0, "{who} reconnected: {:?}", r.states);
    }
    check_hears_and_sees_all("clinician", &clinician, 2)?;
    let stats = watch.await?;
    ensure!(stats.len() == 3, "all three went to the SFU: {stats:?}");
    Ok(())
}

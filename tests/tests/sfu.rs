//! Group consultations through the server's SFU (`bedside-sfu`): four probes (doctor,
//! clinician, interpreter, patient) in one consultation, each decoding every other's video and
//! hearing their audio, with the patient's uplink carrying its media once and everyone told who
//! the active speaker is; with SFrame, the payloads the SFU forwarded (tapped there) are
//! ciphertext; a 1:1 call that moves to the SFU when a third participant joins, without
//! dropping the call; a participant's handover (ICE restart with the SFU) that drops nobody;
//! and a participant who reaches the SFU only through the TURN relay.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use bedside_probe::{ProbeOptions, Report, run};
use bedside_protocol::{CandidatePairType, JoinAuth};
use bedside_sfu::ParticipantStats;
use bedside_tests::{TestServer, test_config, with_sfu, with_turn};

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
/// read (its first forwarded payloads, tapped, decode as neither H.264 nor Opus), and every
/// participant decrypts every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_participants_with_sframe_decrypt_every_other_through_the_sfu() -> Result<()> {
    four_through_the_sfu(true).await
}

/// How many forwarded frames of each kind the SFrame run taps at the SFU.
const TAPPED: usize = 60;

/// What the SFU forwarded in an SFrame call, as it went out, is ciphertext: the H.264 access
/// units keep their NAL headers (the SFU still finds keyframes) but decode into no picture,
/// and the Opus packets decode into noise, not the participants' tones; the receivers decoded
/// the same frames (the caller checked it).
fn forwarded_ciphertext_only(tap: &bedside_sfu::core::PayloadTap) -> Result<()> {
    use bedside_client_core::e2ee::frame::nal_units;
    use bedside_client_core::media::{
        DOCTOR_TONE_HZ, H264Decoder, OpusDecoder, PATIENT_TONE_HZ, detect_tone,
    };
    ensure!(
        tap.video.len() == TAPPED && tap.audio.len() == TAPPED,
        "tapped {} video and {} audio frames",
        tap.video.len(),
        tap.audio.len()
    );
    let mut decoder = H264Decoder::new()?;
    let (mut pictures, mut keyframes) = (0, 0);
    for au in &tap.video {
        let nals = nal_units(au);
        ensure!(!nals.is_empty(), "a forwarded access unit has no NAL unit");
        keyframes += nals.iter().filter(|n| n[0] & 0x1f == 5).count();
        if let Ok(Some(_)) = decoder.decode(au, 0) {
            pictures += 1;
        }
    }
    ensure!(keyframes > 0, "the SFU could not have found keyframes");
    ensure!(pictures == 0, "{pictures} forwarded access units decoded");
    // Noise fed to the tone detector finds a tone now and then by chance (seen: 1 in 60).
    let mut opus = OpusDecoder::new()?;
    let toned = tap
        .audio
        .iter()
        .filter(|p| {
            opus.decode_frame(p, 0).is_ok_and(|f| {
                detect_tone(&f.samples[..], &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ]).is_some()
            })
        })
        .count();
    ensure!(
        toned <= 3,
        "{toned} of {TAPPED} forwarded Opus packets played a participant's tone"
    );
    Ok(())
}

async fn four_through_the_sfu(e2ee: bool) -> Result<()> {
    let _one = ONE_CALL.lock().await;
    logs();
    let server = TestServer::start_with(with_sfu(test_config())).await?;
    let c = server.create_consultation().await?;
    let watch = watch_sfu(&server, c.consultation_id.0.clone());
    let sfu = server.sfu.clone().expect("the SFU runs");
    if e2ee {
        sfu.tap(&c.consultation_id.0, TAPPED);
    }
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
        // Its own link's quality, from the SFU connection's statistics (once dropped: a group
        // consult reported none, to the UI or the dashboard).
        ensure!(
            r.rtt_ms_p50.is_some() && r.candidate_pair == Some(CandidatePairType::Host),
            "{who} reported no quality of its link to the SFU: rtt {:?}, pairs {:?}",
            r.rtt_ms_p50,
            r.candidate_pairs
        );
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
    // The active speaker: every client marks its audio packets with their level (RFC 6464),
    // the SFU picks the loudest, and everyone is told who it is (all four tones are equally
    // loud, so which one it picks is not asserted; that it is one of the four is).
    let seated: Vec<String> = reports
        .values()
        .filter_map(|r| r.participant_id.clone())
        .collect();
    for (who, r) in &reports {
        let named: Vec<&String> = r
            .active_speakers
            .iter()
            .filter_map(|(_, p)| p.as_ref())
            .collect();
        ensure!(
            !named.is_empty() && named.iter().all(|p| seated.contains(p)),
            "{who} was told these active speakers: {:?} (seated: {seated:?})",
            r.active_speakers
        );
    }
    if e2ee {
        let tap = sfu
            .take_tap(&c.consultation_id.0)
            .await
            .expect("the tap ran");
        forwarded_ciphertext_only(&tap)?;
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

/// A doctor and a clinician, then (a second later, so the call is on the SFU by the time they
/// connect) a patient with `patient` applied to its options, all for `secs`; each checked to
/// see and hear the other two. Reports: patient, doctor, clinician.
async fn three_with_a_patient(
    server: &TestServer,
    secs: u64,
    patient: impl FnOnce(ProbeOptions) -> ProbeOptions,
) -> Result<[Report; 3]> {
    let c = server.create_consultation().await?;
    let token = clinician_token(server, &c.consultation_id.0).await?;
    let doctor = JoinAuth::Token {
        token: c.doctor_token.clone(),
    };
    let doctor = tokio::spawn(run(options(server, doctor, secs)));
    let clinician = tokio::spawn(run(options(server, JoinAuth::Token { token }, secs)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let code = c.invite_code.clone();
    let patient = patient(options(server, JoinAuth::InviteCode { code }, secs));
    let patient = tokio::spawn(run(patient));
    let reports = [patient.await??, doctor.await??, clinician.await??];
    for (who, r) in ["patient", "doctor", "clinician"].iter().zip(&reports) {
        summary(who, r);
        check_hears_and_sees_all(who, r, 2)?;
    }
    Ok(reports)
}

/// A participant's handover in a group consult through the SFU: 4 s into the call the
/// patient's client is told its network changed (as the phone's OS says after a Wi-Fi to
/// cellular switch: signaling resumes the seat, ICE restarts with the SFU), and nobody drops.
/// Everyone ends by leaving; the patient's picture freezes at the others for under 2.5 s
/// around the change and keeps moving to the end, and the patient keeps seeing them.
///
/// On loopback the old path does not die, so this checks what the restart itself costs
/// (measured: a 535 ms freeze of the patient at the others, 264 ms of the others at the
/// patient; none without the restart) and that it drops nobody; that a dead path is restarted
/// at once, not when ICE notices, is `a_network_change_in_an_sfu_call_restarts_ice_with_the_sfu`
/// in client-core's call tests. Each probe's times are on its own clock (the others started
/// a second or more before the patient), so the freezes counted are a superset of those after
/// the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_s_handover_through_the_sfu_drops_nobody() -> Result<()> {
    let _one = ONE_CALL.lock().await;
    logs();
    let server = TestServer::start_with(with_sfu(test_config())).await?;
    let [patient, doctor, clinician] = three_with_a_patient(&server, 12, |o| ProbeOptions {
        network_change_after: Some(Duration::from_secs(4)),
        ..o
    })
    .await?;
    for (who, r) in [
        ("patient", &patient),
        ("doctor", &doctor),
        ("clinician", &clinician),
    ] {
        ensure!(r.ended.as_deref() == Some("Left"), "{who} dropped: {r:?}");
    }
    let changed = patient
        .network_changed_ms
        .expect("the network change was played");
    ensure!(
        patient.reconnections >= 1,
        "the handover resumed the seat: {:?}",
        patient.states
    );
    let patient_id = patient.participant_id.clone().expect("seated");
    // Whose picture each one watched across the change: the others watch the patient's, the
    // patient everyone's.
    let mut watched = Vec::new();
    for (who, r) in [("doctor", &doctor), ("clinician", &clinician)] {
        watched.push((who, "patient", &r.remotes[&patient_id]));
    }
    for m in patient.remotes.values() {
        watched.push(("patient", "another", m));
    }
    for (who, whose, m) in watched {
        let froze = m
            .video_gaps_ms
            .iter()
            .filter(|(end, _)| *end >= changed)
            .map(|(_, gap)| *gap)
            .max()
            .unwrap_or(0);
        eprintln!(
            "{who} watching the {whose}: longest freeze after the change {froze} ms, last frame at {:?} ms (change at {changed} ms)",
            m.last_video_frame_ms
        );
        ensure!(
            froze < 2500,
            "{who}: the {whose}'s picture froze {froze} ms after the change: {:?}",
            m.video_gaps_ms
        );
        ensure!(
            m.last_video_frame_ms.is_some_and(|t| t > changed + 4000),
            "{who}: the {whose}'s picture stopped at {:?} ms (change at {changed} ms)",
            m.last_video_frame_ms
        );
    }
    Ok(())
}

/// A participant whose network lets only the relay through (the patient's client gathers
/// relay candidates only) reaches the SFU through the bundled TURN relay, and the group
/// consult works both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_behind_the_relay_reaches_the_sfu() -> Result<()> {
    let _one = ONE_CALL.lock().await;
    logs();
    let server = TestServer::start_with(with_turn(with_sfu(test_config()))).await?;
    let [patient, ..] = three_with_a_patient(&server, 8, |o| ProbeOptions {
        relay_only: true,
        ..o
    })
    .await?;
    eprintln!(
        "patient's pairs {:?}, transports {:?}",
        patient.candidate_pairs, patient.transports
    );
    ensure!(
        patient.candidate_pair == Some(CandidatePairType::Relay),
        "the patient reached the SFU through the relay: {:?}",
        patient.candidate_pairs
    );
    Ok(())
}

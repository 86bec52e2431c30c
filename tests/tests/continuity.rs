//! Continuity scenarios in the impairment lab (network namespaces, nftables, tc): the real
//! server and two real probes on hosts of their own (`bedside_tests::scenarios`). Skips, saying
//! why, where namespaces can't be made (not root, no iproute2 or nftables). The scenarios run
//! one at a time: each is two real-time video calls' worth of CPU, and the machine has two
//! cores.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use bedside_tests::scenarios::{self, Trial};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `scenario` unless the lab is unavailable; `None` (and a SKIPPED line) then.
fn run(scenario: impl FnOnce() -> Result<Trial>) -> Result<Option<Trial>> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = scenarios::unavailable() {
        bedside_tests::skip(&format!("the impairment lab cannot run here: {why}"));
        return Ok(None);
    }
    let trial = scenario()?;
    eprintln!(
        "{}: survived {}, media back {:?} ms, audio played {:?} %, patient states {:?}",
        trial.name,
        trial.survived(),
        trial.media_back_ms(),
        trial.audio_played_pct(),
        trial.patient_states()
    );
    Ok(Some(trial))
}

fn both_stayed(t: &Trial) {
    for (who, r) in [("doctor", &t.doctor), ("patient", &t.patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(r["ended"], "Left", "{who}: {r}");
    }
}

fn decoded_fps(r: &Value) -> f64 {
    r["decoded_fps"].as_f64().unwrap_or(0.0)
}

#[test]
fn a_signaling_outage_keeps_the_media_and_the_seat() -> Result<()> {
    let Some(t) = run(scenarios::signaling_outage)? else {
        return Ok(());
    };
    both_stayed(&t);
    for r in [&t.doctor, &t.patient] {
        assert!(decoded_fps(r) > 10.0, "{r}");
    }
    // The patient noticed the outage and got its seat back; the media did not stop: frames
    // kept arriving with few gaps.
    assert!(
        t.patient["reconnections"].as_u64().unwrap() >= 1,
        "{}",
        t.patient
    );
    let decoded = t.doctor["video_frames_decoded"].as_f64().unwrap();
    let missing = t.doctor["video_frames_missing"].as_f64().unwrap();
    assert!(missing / (decoded + missing) < 0.05, "{}", t.doctor);
    Ok(())
}

fn survives_random_loss(pct: u32) -> Result<()> {
    let Some(t) = run(|| scenarios::random_loss(pct))? else {
        return Ok(());
    };
    both_stayed(&t);
    let (doctor, patient) = (&t.doctor, &t.patient);
    // The patient still sees video and hears the doctor, with losses measured and repaired.
    assert!(
        patient["video_frames_decoded"].as_u64().unwrap() > 100,
        "{patient}"
    );
    assert_eq!(patient["heard"], "doctor", "{patient}");
    let loss = patient["loss_in_pct_max"].as_f64().unwrap_or(0.0);
    assert!(
        loss > f64::from(pct) / 5.0,
        "the loss was not measured: {patient}"
    );
    // The doctor sees the loss on what it sends, from the patient's reception reports.
    let loss_out = doctor["loss_out_pct_max"].as_f64().unwrap_or(0.0);
    assert!(
        loss_out > f64::from(pct) / 5.0,
        "outbound loss was not measured: {doctor}"
    );
    // The doctor saw the loss and sent redundant audio (RED), and the patient played frames
    // from the copies.
    assert!(
        patient["audio_frames_redundant"].as_u64().unwrap() > 0,
        "no audio frame came from a redundant copy: {patient}"
    );
    // Video the patient could not decode (NACK did not repair it in time) was recovered by
    // asking the doctor for keyframes. At low loss NACK may repair everything: then no frame
    // was skipped and no keyframe was needed.
    if patient["video_frames_skipped"].as_u64().unwrap() > 0 {
        assert!(
            patient["keyframes_requested"].as_u64().unwrap() > 0,
            "{patient}"
        );
        assert!(
            doctor["keyframe_requests_received"].as_u64().unwrap() > 0,
            "{doctor}"
        );
    }
    eprintln!(
        "{pct}% loss: patient audio played from real packets {:.1}% (with RED and FEC {:.1}%), \
         video frames decoded {}, \
         missing {}, skipped {}, PLIs sent {} (doctor received {}), doctor's outbound loss \
         {loss_out:.1}%, glass-to-glass p95 {} ms",
        100.0 * patient["audio_played_share"].as_f64().unwrap_or(0.0),
        100.0 * patient["audio_recovered_share"].as_f64().unwrap_or(0.0),
        patient["video_frames_decoded"],
        patient["video_frames_missing"],
        patient["video_frames_skipped"],
        patient["keyframes_requested"],
        doctor["keyframe_requests_received"],
        patient["glass_to_glass_ms_p95"]
    );
    Ok(())
}

#[test]
fn a_call_survives_five_percent_random_loss() -> Result<()> {
    survives_random_loss(5)
}

#[test]
fn a_call_survives_ten_percent_random_loss() -> Result<()> {
    survives_random_loss(10)
}

#[test]
fn a_call_survives_twenty_percent_random_loss() -> Result<()> {
    survives_random_loss(20)
}

/// The patient went through reconnecting and came back, never through the waiting room again,
/// and the doctor kept receiving video after the handovers.
fn handovers_keep_the_call(t: &Trial, min_frames: f64) {
    both_stayed(t);
    let states = t.patient_states();
    assert!(states.iter().any(|s| s == "Reconnecting"), "{states:?}");
    let after_connect = states.iter().skip_while(|s| *s != "Connected");
    assert!(after_connect.clone().all(|s| s != "Waiting"), "{states:?}");
    let decoded = t.doctor["video_frames_decoded"].as_f64().unwrap();
    assert!(
        decoded > min_frames,
        "video did not come back: {}",
        t.doctor
    );
    // The last handover's video is back: the patient is still decoding at the end.
    assert!(decoded_fps(&t.doctor) > 10.0, "{}", t.doctor);
}

#[test]
fn a_handover_restarts_ice_and_keeps_the_call() -> Result<()> {
    let Some(t) = run(|| scenarios::handovers(1, Duration::ZERO))? else {
        return Ok(());
    };
    handovers_keep_the_call(&t, 25.0 * 10.0);
    Ok(())
}

#[test]
fn a_long_call_with_a_handover_every_half_minute_keeps_going() -> Result<()> {
    let Some(t) = run(|| scenarios::handovers(3, Duration::from_secs(30)))? else {
        return Ok(());
    };
    handovers_keep_the_call(&t, 25.0 * 60.0);
    assert_eq!(t.events_ms.len(), 3);
    Ok(())
}

/// The server is killed mid-call and comes back 5 s later on the same store: the media between
/// the two never stops, and both get their seats back.
#[test]
fn a_server_restart_keeps_the_media_and_the_seats() -> Result<()> {
    let Some(t) = run(scenarios::server_restart)? else {
        return Ok(());
    };
    both_stayed(&t);
    for r in [&t.doctor, &t.patient] {
        assert!(r["reconnections"].as_u64().unwrap() >= 1, "{r}");
        assert!(decoded_fps(r) > 10.0, "{r}");
        // Seats come back as they were: nobody goes through the waiting room again.
        let states = scenarios::states(r);
        let after_connect = states.iter().skip_while(|s| *s != "Connected");
        assert!(after_connect.clone().all(|s| s != "Waiting"), "{states:?}");
    }
    // Peer to peer, the picture did not freeze while the server was away.
    assert!(
        t.media_back_ms().iter().all(|ms| *ms < 1000),
        "{:?}",
        t.media_back_ms()
    );
    Ok(())
}

/// The patient's network lets only TCP to port 443 out (a hospital guest network, a hotel): no
/// UDP at all. The client tries host, STUN and TURN candidates at once, and the call connects
/// through the relay over TCP.
#[test]
fn only_tcp_443_gets_out_and_the_call_connects_through_turn_over_tcp() -> Result<()> {
    let Some(t) = run(scenarios::tcp_443_only)? else {
        return Ok(());
    };
    both_stayed(&t);
    for r in [&t.doctor, &t.patient] {
        assert!(decoded_fps(r) > 10.0, "{r}");
    }
    assert_eq!(t.patient["candidate_pair"], "relay", "{}", t.patient);
    assert_eq!(t.patient["heard"], "doctor", "{}", t.patient);
    Ok(())
}

/// Everything the patient sends takes 150-210 ms more (delay plus jitter, in order): the call
/// holds, the playout buffers absorb the jitter, and the latency the doctor sees includes the
/// delay (the impairment is real).
#[test]
fn a_long_jittery_path_keeps_the_call() -> Result<()> {
    let Some(t) = run(scenarios::delay_and_jitter)? else {
        return Ok(());
    };
    both_stayed(&t);
    for r in [&t.doctor, &t.patient] {
        assert!(decoded_fps(r) > 10.0, "{r}");
    }
    let g2g = t.doctor["glass_to_glass_ms_p50"].as_f64().unwrap_or(0.0);
    assert!(g2g >= 150.0, "the delay was not applied: {}", t.doctor);
    assert!(
        t.patient["rtt_ms_p50"].as_f64().unwrap_or(0.0) >= 150.0,
        "{}",
        t.patient
    );
    assert_eq!(t.doctor["heard"], "patient", "{}", t.doctor);
    let (doctor_heard, _) = t.audio_recovered_pct();
    assert!(doctor_heard > 90.0, "{}", t.doctor);
    Ok(())
}

/// What a lossy path in both directions must keep: both stay, both pictures move at the end
/// and never froze for long, both hear each other, and (`video_kept`) neither side's call went
/// audio-only.
fn lossy_both_ways(scenario: impl FnOnce() -> Result<Trial>, video_kept: bool) -> Result<()> {
    let Some(t) = run(scenario)? else {
        return Ok(());
    };
    let t = &t;
    both_stayed(t);
    for r in [&t.doctor, &t.patient] {
        assert!(decoded_fps(r) > 5.0, "{r}");
    }
    eprintln!(
        "{}: {} audio-only spells, longest freeze {} ms, audio from packets {:?} %, with RED \
         and FEC {:?} %, video frames decoded {} / {}, doctor's glass-to-glass p50 {} p95 {} ms",
        t.name,
        t.audio_only_spells(),
        t.longest_freeze_ms(),
        t.audio_played_pct(),
        t.audio_recovered_pct(),
        t.doctor["video_frames_decoded"],
        t.patient["video_frames_decoded"],
        t.doctor["glass_to_glass_ms_p50"],
        t.doctor["glass_to_glass_ms_p95"],
    );
    assert!(
        t.longest_freeze_ms() < 5000,
        "a picture froze: {}",
        t.longest_freeze_ms()
    );
    assert_eq!(t.doctor["heard"], "patient", "{}", t.doctor);
    assert_eq!(t.patient["heard"], "doctor", "{}", t.patient);
    if video_kept {
        for r in [&t.doctor, &t.patient] {
            assert_eq!(r["audio_only"], serde_json::json!([]), "{r}");
        }
    }
    Ok(())
}

/// 12% loss on both directions of the patient's link (the feedback about what the patient
/// sends is lost too): read as the path's loss, not congestion, so video stays on.
#[test]
fn loss_on_both_ways_keeps_video() -> Result<()> {
    lossy_both_ways(scenarios::both_ways_loss, true)
}

/// Bursts of five lost packets in every hundred, both ways.
#[test]
fn bursty_loss_on_both_ways_keeps_video() -> Result<()> {
    lossy_both_ways(scenarios::bursty_loss, true)
}

/// A long lossy path (160 ms + up to 80 ms of jitter one way, 5% loss both ways): the call
/// connects and holds, and no picture stays frozen.
#[test]
fn a_long_lossy_path_keeps_the_call() -> Result<()> {
    lossy_both_ways(scenarios::delay_and_loss, false)
}

/// The patient's uplink collapses to 100 kbit/s for 12 s, then recovers: the call goes
/// audio-only (on purpose, both sides told), the doctor keeps hearing the patient, and video
/// comes back by itself after the recovery (probed: with audio alone on the wire the estimate
/// cannot see the link come back).
#[test]
fn a_bandwidth_collapse_goes_audio_only_and_video_comes_back() -> Result<()> {
    let Some(t) = run(scenarios::bandwidth_collapse)? else {
        return Ok(());
    };
    both_stayed(&t);
    let (went, back) = t.audio_only_and_back_ms();
    let changes = &t.patient["audio_only"];
    eprintln!(
        "bandwidth collapse: audio-only {went:?} ms after, video back {back:?} ms after the \
         recovery; changes {changes}; send estimate (ms, kbps) {}",
        t.patient["send_estimate_kbps"]
    );
    assert!(
        went.is_some_and(|ms| ms < 4000),
        "audio-only too late: {changes}"
    );
    assert!(
        back.is_some_and(|ms| ms < 15_000),
        "video not back: {changes}"
    );
    // It stayed back: the last change is video on.
    let last = changes
        .as_array()
        .and_then(|a| a.last())
        .map(|c| c[1].clone());
    assert_eq!(last, Some(Value::Bool(false)), "{changes}");
    assert_eq!(t.doctor["heard"], "patient", "{}", t.doctor);
    Ok(())
}

/// A peer connection builds, and offers, in a network with no multicast route (a locked-down
/// host, a container): webrtc 0.21 joins the mDNS group by default and failed there with
/// ENODEV. The network is a fresh namespace of this test's own thread (root), holding only a
/// loopback interface that is down, so there is no route at all.
#[test]
fn a_peer_connection_builds_where_there_is_no_multicast_route() {
    use bedside_client_core::call::{EngineCommand, EngineEvent, SdpKind};
    use bedside_client_core::engine::{Engine, EngineSettings, LocalTracks};
    use bedside_protocol::ParticipantId;
    if let Some(why) = scenarios::unavailable() {
        bedside_tests::skip(&format!("no network namespaces here: {why}"));
        return;
    }
    let outcome = std::thread::spawn(|| -> Result<String> {
        // SAFETY: unshare only moves this thread into a new network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        anyhow::ensure!(rc == 0, "unshare: {}", std::io::Error::last_os_error());
        // The precondition: joining the mDNS group fails here.
        let join = std::net::UdpSocket::bind("0.0.0.0:0")?.join_multicast_v4(
            &std::net::Ipv4Addr::new(224, 0, 0, 251),
            &std::net::Ipv4Addr::UNSPECIFIED,
        );
        anyhow::ensure!(join.is_err(), "this namespace has a multicast route");
        // Every socket of a current-thread runtime is made on this thread, in the namespace.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
            let (media_tx, _media_rx) = std::sync::mpsc::sync_channel(16);
            let tracks = LocalTracks::new("bedside")?;
            let mut engine = Engine::new(EngineSettings::default(), tracks, events_tx, media_tx);
            engine
                .execute(EngineCommand::CreatePeer {
                    peer: ParticipantId("far".into()),
                    offerer: true,
                    ice_servers: vec![],
                })
                .await?;
            let offer = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match events.recv().await {
                        Some(EngineEvent::LocalDescription {
                            kind: SdpKind::Offer,
                            sdp,
                            ..
                        }) => return Some(sdp),
                        Some(_) => continue,
                        None => return None,
                    }
                }
            })
            .await?
            .ok_or_else(|| anyhow::anyhow!("no offer"))?;
            engine.close_all().await;
            Ok(offer)
        })
    })
    .join()
    .expect("the namespace thread")
    .expect("a peer connection built and offered");
    assert!(outcome.contains("m=video"), "an offer with our media");
}

//! Two real clients (state machine + driver + WebRTC engine) in a consultation through a real
//! server on 127.0.0.1: the waiting room gates the call, media connects with DTLS-SRTP, RTP flows
//! both ways, and leaving ends the call for both.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use bedside_client_core::call::{CallEvent, CallState, EndReason, UserCommand};
use bedside_client_core::driver::{self, Client, ClientOptions};
use bedside_client_core::engine::EngineSettings;
use bedside_client_core::media::{
    DOCTOR_TONE_HZ, H264Config, PATIENT_TONE_HZ, PatternConfig, TestPatternSource, detect_tone,
    read_marker,
};
use bedside_client_core::pipeline::MediaSources;
use bedside_client_core::signaling::tls_config;
use bedside_protocol::{CandidatePairType, JoinAuth, LeaveReason, ParticipantId};
use bedside_server::api::CreatedConsultation;
use bedside_tests::{TestServer, test_config, with_turn};

/// A client sending a small synthetic picture (tagged `tag`) and the tone `tone_hz`.
fn client(server: &TestServer, tag: u8, tone_hz: f32) -> Result<Client> {
    client_with(server, tag, tone_hz, &EngineSettings::default())
}

/// Relay candidates only, trusting `tls` for `turns:` relays.
fn relay_only(tls: Option<Arc<rustls::ClientConfig>>) -> EngineSettings {
    EngineSettings {
        relay_only: true,
        tls,
        ..EngineSettings::default()
    }
}

/// [`client`] with `engine`'s settings (its sockets on loopback).
fn client_with(
    server: &TestServer,
    tag: u8,
    tone_hz: f32,
    engine: &EngineSettings,
) -> Result<Client> {
    let mut options = ClientOptions::new(&server.ws_url);
    options.engine = EngineSettings {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..engine.clone()
    };
    options.video = H264Config {
        width: 320,
        height: 180,
        bitrate_bps: 300_000,
        ..H264Config::default()
    };
    Ok(driver::start(
        options,
        MediaSources::synthetic(320, 180, tag, tone_hz),
    )?)
}

/// Waits for an event that `pick` accepts, up to `within`.
async fn wait_for<T>(
    client: &mut Client,
    within: Duration,
    mut pick: impl FnMut(&CallEvent) -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, client.events.recv()).await {
            Ok(Some(event)) => {
                if let Some(t) = pick(&event) {
                    return Ok(t);
                }
            }
            Ok(None) => bail!("client stopped"),
            Err(_) => bail!("timed out"),
        }
    }
}

/// The next chat line `client` receives from someone else.
async fn next_chat(client: &mut Client) -> Result<String> {
    wait_for(client, Duration::from_secs(5), |e| match e {
        CallEvent::Chat {
            text,
            outgoing: false,
            ..
        } => Some(text.clone()),
        _ => None,
    })
    .await
}

async fn wait_state(client: &mut Client, want: CallState) -> Result<()> {
    wait_for(client, Duration::from_secs(15), |e| {
        matches!(e, CallEvent::State(s) if *s == want).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("waiting for {want:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_patient_connect_and_exchange_encrypted_media() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;

    let mut doctor = client(&server, 1, DOCTOR_TONE_HZ)?;
    doctor.handle.send(UserCommand::Join {
        auth: JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        display_name: None,
    });
    wait_state(&mut doctor, CallState::WaitingForPeers).await?;

    let mut patient = client(&server, 2, PATIENT_TONE_HZ)?;
    patient.handle.send(UserCommand::Join {
        auth: JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        display_name: Some("Ana".into()),
    });
    wait_state(&mut patient, CallState::Waiting).await?;

    // The doctor sees the patient waiting and admits them.
    let waiting = wait_for(&mut doctor, Duration::from_secs(5), |e| match e {
        CallEvent::WaitingRoom(w) if !w.is_empty() => Some(w[0].participant_id.clone()),
        _ => None,
    })
    .await?;
    // No media before admission.
    assert!(patient.received.stats().is_empty());
    doctor.handle.send(UserCommand::Admit(waiting));

    wait_state(&mut patient, CallState::Connected).await?;
    wait_state(&mut doctor, CallState::Connected).await?;

    // Each side decodes the other's video (markers read, counters advancing) and hears the
    // other's tone, through DTLS-SRTP.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let done = [
            (&doctor, 2u8, PATIENT_TONE_HZ),
            (&patient, 1u8, DOCTOR_TONE_HZ),
        ]
        .iter()
        .all(|(c, _, tone)| {
            c.received.stats().values().any(|s| {
                s.frames_with_marker >= 20
                    && s.audio_frames_played >= 50
                    && s.tone_heard() == Some(*tone as u32)
            })
        });
        if done {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "media did not flow: doctor received {:?}, patient received {:?}",
                doctor.received.stats(),
                patient.received.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in [&doctor, &patient] {
        let stats = c.received.stats();
        let s = stats.values().next().unwrap();
        assert_eq!((s.width, s.height), (320, 180));
        assert!(
            s.glass_to_glass_ms
                .iter()
                .all(|ms| (0.0..2000.0).contains(ms)),
            "{s:?}"
        );
        assert!(!s.mouth_to_ear_ms.is_empty(), "no audio marker read: {s:?}");
        assert!(
            c.sent
                .video_frames_encoded
                .load(std::sync::atomic::Ordering::Relaxed)
                > 20
        );
    }
    // The remote video sink holds the latest decoded frame for the UI.
    let peer = doctor.received.stats().keys().next().unwrap().clone();
    let (seq, frame) = doctor.received.video(&peer).unwrap().latest();
    assert!(seq > 0 && frame.is_some());

    // The decoded audio, mixed, is there for the speaker or the platform's player: 20 ms frames
    // in which the doctor hears the patient's tone.
    let audio = doctor.received.audio();
    assert!(audio.pushed() >= 50, "{}", audio.pushed());
    let mut heard = 0;
    for _ in 0..25 {
        let frame = audio
            .wait(Duration::from_secs(1))
            .expect("audio keeps coming");
        if detect_tone(&frame.samples[..], &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ])
            == Some(PATIENT_TONE_HZ)
        {
            heard += 1;
        }
    }
    assert!(
        heard >= 15,
        "the patient's tone was in {heard} of 25 frames"
    );

    // The patient picks another camera: the doctor's picture changes to it, mid-call.
    patient.handle.set_video_source(Box::new(
        TestPatternSource::new(PatternConfig {
            width: 320,
            height: 180,
            fps: 30,
            tag: 7,
        })
        .unwrap(),
    ));
    let sink = doctor.received.video(&peer).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tag = sink.latest().1.and_then(|f| read_marker(&f)).map(|m| m.tag);
        if tag == Some(7) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still showing tag {tag:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The self view shows what is sent: the new camera's picture.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while patient
        .sent
        .preview
        .latest()
        .1
        .and_then(|f| read_marker(&f))
        .map(|m| m.tag)
        != Some(7)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "self view not updated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Chat, end to end on the data channel, both ways.
    doctor
        .handle
        .send(UserCommand::SendChat("Can you show me the rash?".into()));
    let got = next_chat(&mut patient).await?;
    assert_eq!(got, "Can you show me the rash?");
    patient
        .handle
        .send(UserCommand::SendChat("Yes, one moment 👍".into()));
    let got = next_chat(&mut doctor).await?;
    assert_eq!(got, "Yes, one moment 👍");

    // Statistics arrive about once a second: a round-trip time and the pair type (host on
    // loopback).
    let report = wait_for(&mut doctor, Duration::from_secs(5), |e| match e {
        CallEvent::Stats { report, .. } if report.rtt_ms.is_some() => Some(report.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(report.candidate_pair, Some(CandidatePairType::Host));
    assert!(report.rtt_ms.unwrap() < 200.0, "{report:?}");
    assert_eq!(report.connection_state.as_deref(), Some("connected"));
    // What the pipeline decoded is in the report too (resolution, frame rate, playout buffer).
    let report = wait_for(&mut doctor, Duration::from_secs(5), |e| match e {
        CallEvent::Stats { report, .. }
            if report.video_received.as_ref().is_some_and(|v| v.fps > 0.0) =>
        {
            Some(report.clone())
        }
        _ => None,
    })
    .await?;
    let video = report.video_received.unwrap();
    assert_eq!((video.width, video.height), (320, 180));
    assert!(report.audio_buffer_ms.is_some());

    // The patient leaves: the doctor sees them go, the patient's call ends.
    patient.handle.send(UserCommand::Leave);
    wait_state(&mut patient, CallState::Ended(EndReason::Left)).await?;
    wait_for(&mut doctor, Duration::from_secs(5), |e| {
        matches!(
            e,
            CallEvent::PeerLeft {
                reason: LeaveReason::Left,
                ..
            }
        )
        .then_some(())
    })
    .await?;
    wait_state(&mut doctor, CallState::WaitingForPeers).await?;
    Ok(())
}

/// A group consult: a doctor, a second clinician and a patient, each with its own picture tag.
/// Every participant decodes both others' video and receives both others' audio (one peer
/// connection per pair, each with its own tracks), and reception reports give each sender its
/// outbound loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_consult_delivers_everyone_s_media_to_everyone() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let issued: bedside_server::api::IssuedToken = server
        .http()
        .post(server.api(&format!("/consultations/{}/tokens", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "role": "clinician" }))
        .send()
        .await?
        .json()
        .await?;
    let seated = |e: &CallEvent| match e {
        CallEvent::Seated { participant_id, .. } => Some(participant_id.clone()),
        _ => None,
    };
    let mut doctor = client(&server, 1, DOCTOR_TONE_HZ)?;
    doctor.handle.send(UserCommand::Join {
        auth: JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        display_name: None,
    });
    let doctor_id = wait_for(&mut doctor, Duration::from_secs(10), seated).await?;
    let mut clinician = client(&server, 3, DOCTOR_TONE_HZ)?;
    clinician.handle.send(UserCommand::Join {
        auth: JoinAuth::Token {
            token: issued.token,
        },
        display_name: None,
    });
    let clinician_id = wait_for(&mut clinician, Duration::from_secs(10), seated).await?;
    let mut patient = client(&server, 2, PATIENT_TONE_HZ)?;
    patient.handle.send(UserCommand::Join {
        auth: JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        display_name: None,
    });
    let patient_id = wait_for(&mut patient, Duration::from_secs(10), seated).await?;
    doctor.handle.send(UserCommand::Admit(patient_id.clone()));
    for c in [&mut doctor, &mut clinician, &mut patient] {
        wait_state(c, CallState::Connected).await?;
    }

    let everyone = [
        (&doctor, &doctor_id),
        (&clinician, &clinician_id),
        (&patient, &patient_id),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = everyone.iter().all(|(me, my_id)| {
            let stats = me.received.stats();
            everyone
                .iter()
                .filter(|(_, id)| id != my_id)
                .all(|(_, id)| {
                    stats
                        .get(*id)
                        .is_some_and(|s| s.frames_with_marker >= 20 && s.audio_frames_played >= 50)
                })
        });
        if done {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "group media did not flow: doctor {:?}, clinician {:?}, patient {:?}",
                doctor.received.stats(),
                clinician.received.stats(),
                patient.received.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each picture came from whom it should: the patient's carries tag 2, and so on.
    for (me, my_id) in everyone {
        for (tag, id) in [(1u8, &doctor_id), (3, &clinician_id), (2, &patient_id)] {
            if id == my_id {
                continue;
            }
            let (_, frame) = me.received.video(id).unwrap().latest();
            let marker = read_marker(&frame.unwrap());
            assert_eq!(
                marker.map(|m| m.tag),
                Some(tag),
                "{id:?} as seen by {my_id:?}"
            );
        }
    }
    // A chat line reaches every clinician, from the patient.
    patient
        .handle
        .send(UserCommand::SendChat("Thank you both".into()));
    for me in [&mut doctor, &mut clinician] {
        let from = wait_for(me, Duration::from_secs(5), |e| match e {
            CallEvent::Chat {
                from,
                text,
                outgoing: false,
                ..
            } if text == "Thank you both" => Some(from.clone()),
            _ => None,
        })
        .await?;
        assert_eq!(from, patient_id);
    }
    // Outbound loss, from the peers' reception reports: measured, and 0 on loopback.
    let report = wait_for(&mut patient, Duration::from_secs(10), |e| match e {
        CallEvent::Stats { report, .. } if report.loss_out_pct.is_some() => Some(report.clone()),
        _ => None,
    })
    .await?;
    assert!(report.loss_out_pct.unwrap() < 1.0, "{report:?}");
    Ok(())
}

/// A doctor and an admitted patient with media connected; their participant ids.
async fn connected_pair(
    server: &TestServer,
    c: &CreatedConsultation,
    engine: &EngineSettings,
) -> Result<(Client, Client, ParticipantId, ParticipantId)> {
    let seated = |e: &CallEvent| match e {
        CallEvent::Seated { participant_id, .. } => Some(participant_id.clone()),
        _ => None,
    };
    let mut doctor = client_with(server, 1, DOCTOR_TONE_HZ, engine)?;
    doctor.handle.send(UserCommand::Join {
        auth: JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        display_name: None,
    });
    let doctor_id = wait_for(&mut doctor, Duration::from_secs(10), seated).await?;
    let mut patient = client_with(server, 2, PATIENT_TONE_HZ, engine)?;
    patient.handle.send(UserCommand::Join {
        auth: JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        display_name: None,
    });
    let patient_id = wait_for(&mut patient, Duration::from_secs(10), seated).await?;
    doctor.handle.send(UserCommand::Admit(patient_id.clone()));
    wait_state(&mut patient, CallState::Connected).await?;
    wait_state(&mut doctor, CallState::Connected).await?;
    Ok((doctor, patient, doctor_id, patient_id))
}

/// Media decoded both ways, with each side's tone heard by the other.
async fn media_flows(doctor: &Client, patient: &Client) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = [(doctor, PATIENT_TONE_HZ), (patient, DOCTOR_TONE_HZ)]
            .iter()
            .all(|(c, tone)| {
                c.received.stats().values().any(|s| {
                    s.frames_with_marker >= 20
                        && s.audio_frames_played >= 50
                        && s.tone_heard() == Some(*tone as u32)
                })
            });
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "media did not flow: doctor received {:?}, patient received {:?}",
                doctor.received.stats(),
                patient.received.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The candidate pair `client` reports in its first statistics that name one.
async fn candidate_pair(client: &mut Client) -> Result<CandidatePairType> {
    wait_for(client, Duration::from_secs(5), |e| match e {
        CallEvent::Stats { report, .. } => report.candidate_pair,
        _ => None,
    })
    .await
}

/// A counter from the server's `/metrics`.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} on /metrics: {metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_call_goes_through_the_bundled_turn() -> Result<()> {
    let server = TestServer::start_with(with_turn(test_config())).await?;
    let c = server.create_consultation().await?;
    let (doctor, mut patient, _, _) = connected_pair(&server, &c, &relay_only(None)).await?;
    assert_eq!(
        candidate_pair(&mut patient).await?,
        CandidatePairType::Relay
    );
    media_flows(&doctor, &patient).await?;
    // The relay says so too.
    let metrics = server.metrics().await?;
    let allocations = metric(&metrics, "bedside_turn_active_allocations");
    assert!(allocations >= 2, "{metrics}");
    let relayed = metric(&metrics, "bedside_turn_relayed_packets_total");
    assert!(relayed > 100, "{relayed}");
    assert!(metrics.trim_end().ends_with("# EOF"));
    Ok(())
}

/// Where no UDP reaches the relay (only its TCP port is open, as on networks where only TCP
/// 443 gets out), the call still connects: the clients reach TURN over TCP through client-core's
/// shim, since webrtc 0.21's own TURN client speaks only UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_call_connects_through_turn_over_tcp() -> Result<()> {
    let mut config = with_turn(test_config());
    config.turn.relay.listen_udp.clear();
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let (doctor, mut patient, _, _) = connected_pair(&server, &c, &relay_only(None)).await?;
    assert_eq!(
        candidate_pair(&mut patient).await?,
        CandidatePairType::Relay
    );
    media_flows(&doctor, &patient).await?;
    let metrics = server.metrics().await?;
    let relayed = metric(&metrics, "bedside_turn_relayed_packets_total");
    assert!(relayed > 100, "{relayed}");
    Ok(())
}

/// The same over TLS (`turns:`), the relay's certificate trusted like the clinic's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_call_connects_through_turn_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let mut config = with_turn(test_config());
    config.turn.relay.listen_udp.clear();
    config.turn.relay.listen_tcp.clear();
    config.turn.relay.listen_tls = vec!["127.0.0.1:0".parse()?];
    config.turn.relay.tls_cert = Some(cert_path);
    config.turn.relay.tls_key = Some(key_path);
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    let trusting = tls_config(Some(cert.cert.pem().as_bytes())).map_err(anyhow::Error::msg)?;
    let (doctor, patient, _, _) = connected_pair(&server, &c, &relay_only(Some(trusting))).await?;
    media_flows(&doctor, &patient).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_call_keeps_the_media_and_the_seats() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let (mut doctor, mut patient, doctor_id, patient_id) =
        connected_pair(&server, &c, &EngineSettings::default()).await?;
    media_flows(&doctor, &patient).await?;

    let decoded = |c: &Client| -> u64 {
        c.received
            .stats()
            .values()
            .map(|s| s.video_frames_decoded)
            .sum()
    };
    let before = decoded(&patient);
    // The server goes away (graceful: "going away") and comes back on the same address.
    let server = server.restart().await?;
    wait_state(&mut patient, CallState::Reconnecting).await?;
    wait_state(&mut patient, CallState::Connected).await?;
    wait_state(&mut doctor, CallState::Connected).await?;
    // Media kept flowing peer to peer through it all.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        decoded(&patient) > before + 20,
        "{} -> {}",
        before,
        decoded(&patient)
    );
    let audit = server
        .http()
        .get(server.api(&format!("/consultations/{}/audit", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .text()
        .await?;
    // Same seats: two joins before the restart, two resumes after it (a rejoin would be a
    // third join, and the patient would be back in the waiting room).
    assert_eq!(audit.matches("\"joined\"").count(), 2, "{audit}");
    assert_eq!(audit.matches("\"resumed\"").count(), 2, "{audit}");
    assert!(audit.contains(&doctor_id.0) && audit.contains(&patient_id.0));
    assert!(!audit.contains("\"timed_out\""), "{audit}");
    Ok(())
}

//! Two real clients (state machine + driver + WebRTC engine) in a consultation through a real
//! server on 127.0.0.1: the waiting room gates the call, media connects with DTLS-SRTP, RTP flows
//! both ways, and leaving ends the call for both.

use std::time::Duration;

use anyhow::{Result, bail};
use bedside_client_core::call::{CallEvent, CallState, EndReason, UserCommand};
use bedside_client_core::driver::{self, Client, ClientOptions};
use bedside_client_core::engine::{EngineSettings, MediaKind};
use bedside_protocol::{CandidatePairType, JoinAuth, LeaveReason};
use bedside_tests::TestServer;

fn client(server: &TestServer) -> Result<Client> {
    let mut options = ClientOptions::new(&server.ws_url);
    options.engine = EngineSettings {
        udp_addrs: vec!["127.0.0.1:0".into()],
        relay_only: false,
    };
    Ok(driver::start(options)?)
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

    let mut doctor = client(&server)?;
    doctor.handle.send(UserCommand::Join {
        auth: JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        display_name: None,
    });
    wait_state(&mut doctor, CallState::WaitingForPeers).await?;

    let mut patient = client(&server)?;
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
    assert!(patient.media.try_recv().is_err());
    doctor.handle.send(UserCommand::Admit(waiting));

    wait_state(&mut patient, CallState::Connected).await?;
    wait_state(&mut doctor, CallState::Connected).await?;

    // Encrypted RTP both ways: the patient sends audio, the doctor sends video.
    let (pt, dt) = (
        patient.handle.tracks().clone(),
        doctor.handle.tracks().clone(),
    );
    let sender = tokio::spawn(async move {
        for i in 0..50u8 {
            pt.write_audio(vec![0xf8, i, 1, 2, 3].into(), Duration::from_millis(20))
                .await?;
            dt.write_video(
                vec![0, 0, 0, 1, 0x65, 0x88, i, 4, 5, 6].into(),
                Duration::from_millis(33),
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    });
    let mut doctor_heard = 0;
    let mut patient_saw = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (doctor_heard < 10 || patient_saw < 10) && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(m) = doctor.media.recv() => if m.kind == MediaKind::Audio { doctor_heard += 1 },
            Some(m) = patient.media.recv() => if m.kind == MediaKind::Video { patient_saw += 1 },
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    sender.await??;
    assert!(
        doctor_heard >= 10,
        "doctor received {doctor_heard} audio packets"
    );
    assert!(
        patient_saw >= 10,
        "patient received {patient_saw} video packets"
    );

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

//! `bedside-probe` as a clinic uses it: a doctor probe and a patient probe in one consultation
//! through a real server, each reporting what it measured.

use std::time::Duration;

use anyhow::Result;
use bedside_probe::{ProbeOptions, run};
use bedside_protocol::{CandidatePairType, JoinAuth};
use bedside_tests::TestServer;

fn options(server: &TestServer, auth: JoinAuth) -> ProbeOptions {
    ProbeOptions {
        duration: Duration::from_secs(4),
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 320,
        height: 180,
        bitrate_kbps: 300,
        ..ProbeOptions::new(server.ws_url.clone(), auth)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doctor_probe_admits_a_patient_probe_and_both_report() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let doctor = tokio::spawn(run(options(
        &server,
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
    )));
    let patient = tokio::spawn(run(options(
        &server,
        JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
    )));
    let (doctor, patient) = (doctor.await??, patient.await??);
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert!(r.connected, "{who}: {r:?}");
        assert!(r.time_to_connect_ms.is_some(), "{who}");
        assert_eq!(r.candidate_pair, Some(CandidatePairType::Host), "{who}");
        assert!(r.rtt_ms_p50.is_some(), "{who}: {r:?}");
        assert!(r.video_frames_sent > 60, "{who}: {r:?}");
        assert!(r.video_frames_decoded > 30, "{who}: {r:?}");
        assert_eq!(r.received_resolution, Some((320, 180)), "{who}");
        assert!(r.glass_to_glass_ms_p95.is_some(), "{who}: {r:?}");
        assert!(r.mouth_to_ear_ms_p50.is_some(), "{who}: {r:?}");
        assert!(r.audio_frames_received > 100, "{who}: {r:?}");
        assert_eq!(r.ended.as_deref(), Some("Left"), "{who}: {r:?}");
    }
    // Each heard the other.
    assert_eq!(doctor.heard.as_deref(), Some("patient"));
    assert_eq!(patient.heard.as_deref(), Some("doctor"));
    // The patient went through the waiting room first.
    assert!(
        patient.states.iter().any(|(_, s)| s == "Waiting"),
        "{:?}",
        patient.states
    );
    // The report is JSON a clinic's tooling can read.
    let json = serde_json::to_value(&patient)?;
    assert!(json["time_to_connect_ms"].is_u64());
    Ok(())
}

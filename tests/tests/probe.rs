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

/// A 1:1 call with end-to-end encryption on: both probes decode video and hear audio, show the
/// same safety code, and what the patient hands its packetizer is SFrame ciphertext: the H.264
/// does not decode (though its NAL headers, keyframes included, stay readable) and the Opus
/// does not play the patient's tone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_call_decodes_while_its_frames_on_the_wire_do_not() -> Result<()> {
    use bedside_client_core::e2ee::frame::nal_units;
    use bedside_client_core::media::{
        DOCTOR_TONE_HZ, H264Decoder, OpusConfig, OpusDecoder, OpusEncoder, PATIENT_TONE_HZ,
        ToneConfig, ToneSource, detect_tone,
    };
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let encrypted = |auth, tap_frames| ProbeOptions {
        e2ee: true,
        tap_frames,
        ..options(&server, auth)
    };
    let doctor = tokio::spawn(run(encrypted(
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        0,
    )));
    let patient = tokio::spawn(run(encrypted(
        JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        60,
    )));
    let (doctor, patient) = (doctor.await??, patient.await??);
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert!(r.connected, "{who}: {r:?}");
        // Few frames is enough (the debug build on shared cores encodes slowly): the point is
        // that they decode at all.
        assert!(r.video_frames_decoded >= 10, "{who}: {r:?}");
        assert_eq!(r.received_resolution, Some((320, 180)), "{who}");
        assert!(r.audio_frames_received > 100, "{who}: {r:?}");
        assert!(r.e2ee_frames_encrypted > 100, "{who}: {r:?}");
        assert!(r.e2ee_frames_decrypted > 100, "{who}: {r:?}");
    }
    assert_eq!(doctor.heard.as_deref(), Some("patient"));
    assert_eq!(patient.heard.as_deref(), Some("doctor"));
    let code = doctor.safety_code.clone().expect("a safety code");
    assert_eq!(patient.safety_code.as_deref(), Some(code.as_str()));

    let video: Vec<_> = patient
        .tapped_frames
        .iter()
        .filter(|(c, _)| c == "h264")
        .collect();
    let audio: Vec<_> = patient
        .tapped_frames
        .iter()
        .filter(|(c, _)| c == "opus")
        .collect();
    assert_eq!((video.len(), audio.len()), (60, 60));
    let mut decoder = H264Decoder::new()?;
    let mut pictures = 0;
    let mut keyframes = 0;
    for (_, au) in &video {
        let nals = nal_units(au);
        assert!(!nals.is_empty());
        keyframes += nals.iter().filter(|n| n[0] & 0x1f == 5).count();
        if let Ok(Some(_)) = decoder.decode(au, 0) {
            pictures += 1;
        }
    }
    assert!(
        keyframes > 0,
        "a forwarding server can still find keyframes"
    );
    assert_eq!(pictures, 0, "encrypted H.264 decoded into pictures");
    let toned = |packets: &mut dyn Iterator<Item = Vec<u8>>| -> Result<usize> {
        let mut opus = OpusDecoder::new()?;
        Ok(packets
            .filter(|p| {
                opus.decode_frame(p, 0).is_ok_and(|f| {
                    detect_tone(&f.samples[..], &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ]).is_some()
                })
            })
            .count())
    };
    // Ciphertext fed to an Opus decoder is noise, in which the tone detector may now and then
    // find one of its two frequencies by chance (seen: 1 frame in 60): the plaintext below
    // plays the tone in most frames, the ciphertext in almost none.
    let encrypted_toned = toned(&mut audio.iter().map(|(_, p)| p.clone()))?;
    assert!(
        encrypted_toned <= 3,
        "encrypted Opus played the tone in {encrypted_toned} frames of 60"
    );
    // The same check on the patient's tone in the clear does hear it.
    let mut tone = ToneSource::new(ToneConfig {
        freq_hz: PATIENT_TONE_HZ,
        ..Default::default()
    });
    let mut encoder = OpusEncoder::new(OpusConfig::default())?;
    let mut clear = (0..60u64).map(|i| encoder.encode(&tone.next_frame(i * 20_000)).unwrap());
    assert!(toned(&mut clear)? > 30);
    Ok(())
}

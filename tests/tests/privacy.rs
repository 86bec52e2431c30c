//! No names, tokens, invite codes, session descriptions or IP addresses in the server's logs,
//! even at debug level, through a whole consultation with every kind of message.

use anyhow::Result;
use bedside_protocol::{ClientMessage, IceCandidate, StatsReport};
use bedside_tests::{CapturedLogs as Captured, TestServer};

#[tokio::test]
async fn nothing_identifying_reaches_the_logs() -> Result<()> {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        // Everything at debug, except the test's own HTTP client (it names the address it dials).
        .with_env_filter("debug,reqwest=off,hyper_util::client=off")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    // The patient opens the join page: the invite code is in its path.
    let page = server.http().get(&c.invite_url).send().await?;
    assert!(page.status().is_success());
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Zelda Quintana").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    let sdp = "v=0\r\no=- 4611731400430051336 2 IN IP4 203.0.113.77\r\ns=SECRET-SDP\r\n";
    patient
        .send(ClientMessage::Offer {
            to: doctor.id(),
            sdp: sdp.into(),
        })
        .await?;
    doctor.expect_type("offer").await?;
    patient
        .send(ClientMessage::IceCandidate {
            to: doctor.id(),
            candidate: IceCandidate {
                candidate: "candidate:1 1 udp 2130706431 198.51.100.23 50000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_mline_index: Some(0),
                username_fragment: None,
            },
        })
        .await?;
    doctor.expect_type("ice_candidate").await?;
    patient
        .send(ClientMessage::Stats {
            report: StatsReport {
                rtt_ms: Some(33.0),
                ..Default::default()
            },
        })
        .await?;
    // A bad token and a bad invite code are refused without being echoed into the log.
    let mut intruder = server.connect().await?;
    intruder
        .send(ClientMessage::Join {
            protocol_version: 1,
            auth: bedside_protocol::JoinAuth::Token {
                token: "forged.TOKEN-LEAK.value".into(),
            },
            display_name: Some("Intruder Name".into()),
        })
        .await?;
    intruder.expect_type("error").await?;
    let resume = patient.resume_token.clone().unwrap();
    patient.conn.abort();
    doctor.expect_type("peer_reconnecting").await?;
    let mut back = server.connect().await?;
    back.send(ClientMessage::Resume {
        protocol_version: 1,
        resume_token: resume.clone(),
    })
    .await?;
    back.expect_type("admitted").await?;
    doctor.expect_type("peer_back").await?;
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone())?;
    assert!(
        text.contains("joined"),
        "the log captured nothing useful:\n{text}"
    );
    let secrets = [
        "Zelda",
        "Quintana",
        "Intruder",
        "127.0.0.1",
        "203.0.113.77",
        "198.51.100.23",
        "SECRET-SDP",
        "TOKEN-LEAK",
        &c.doctor_token,
        &resume,
        &c.invite_code,
        &c.invite_code.replace('-', ""),
        "test-admin-key",
    ];
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{secret:?} reached the log:\n{text}"
        );
    }
    Ok(())
}

//! The administration API, the audit log, metrics and TLS, against a real server.

use anyhow::Result;
use bedside_client_core::signaling::{Incoming, SignalingConnection, tls_config};
use bedside_protocol::{ClientMessage, JoinAuth, PROTOCOL_VERSION, ServerMessage};
use bedside_server::api::{ConsultationSummary, IssuedInvite, IssuedToken};
use bedside_server::config::TlsMode;
use bedside_tests::{TestServer, test_config};
use serde_json::Value;

#[tokio::test]
async fn the_api_requires_the_admin_key() -> Result<()> {
    let server = TestServer::start().await?;
    for key in [None, Some("wrong-key-wrong-key"), Some("")] {
        let mut req = server.http().post(server.api("/consultations"));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await?;
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await?;
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let resp = server
        .http()
        .get(server.api("/consultations"))
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() -> Result<()> {
    let server = TestServer::start().await?;
    let post = |body: &'static str| {
        server
            .http()
            .post(server.api("/consultations"))
            .bearer_auth(&server.admin_key)
            .header("content-type", "application/json")
            .body(body)
    };
    for body in [
        "{not json",
        r#"{"invite_ttl_secs":"soon"}"#,
        r#"{"surprise":1}"#,
        r#"{"invite_ttl_secs":0}"#,
    ] {
        let resp = post(body).send().await?;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await?;
        assert!(
            !err["error"]["message"].as_str().unwrap().is_empty(),
            "{body}"
        );
    }
    let list: Vec<ConsultationSummary> = server
        .http()
        .get(server.api("/consultations"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert!(
        list.is_empty(),
        "a refused request created something: {list:?}"
    );
    let resp = post(r#"{"invite_ttl_secs":600}"#).send().await?;
    assert_eq!(resp.status(), 201);
    let resp = server
        .http()
        .delete(server.api("/consultations/c-unknown"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}

#[tokio::test]
async fn clinicians_join_with_issued_tokens_and_patients_with_new_invites() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let id = &c.consultation_id;
    let issued: IssuedToken = server
        .http()
        .post(server.api(&format!("/consultations/{id}/tokens")))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "role": "clinician" }))
        .send()
        .await?
        .json()
        .await?;
    let mut doctor = server.doctor(&c).await?;
    let mut clinician = server.connect().await?;
    match clinician.join_token(&issued.token).await? {
        ServerMessage::Joined { role, .. } => assert_eq!(role, bedside_protocol::Role::Clinician),
        other => panic!("{other:?}"),
    }
    match clinician.expect_type("admitted").await? {
        ServerMessage::Admitted { peers, .. } => assert_eq!(peers[0].participant_id, doctor.id()),
        other => panic!("{other:?}"),
    }
    doctor.expect_type("peer_joined").await?;

    let invite: IssuedInvite = server
        .http()
        .post(server.api(&format!("/consultations/{id}/invites")))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert_ne!(invite.invite_code, c.invite_code);
    let mut patient = server.connect().await?;
    patient.join_invite(&invite.invite_code, Some("Lu")).await?;
    // Clinicians may admit too.
    clinician.expect_type("waiting_room").await?;
    clinician
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    match patient.expect_type("admitted").await? {
        ServerMessage::Admitted { peers, .. } => assert_eq!(peers.len(), 2),
        other => panic!("{other:?}"),
    }

    let summary: ConsultationSummary = server
        .http()
        .get(server.api(&format!("/consultations/{id}")))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        (summary.seats, summary.waiting, summary.connected),
        (3, 0, 3)
    );
    Ok(())
}

#[tokio::test]
async fn the_audit_log_records_who_and_when_but_no_names() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Maria Privacy").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    patient.send(ClientMessage::Leave).await?;
    patient.expect_close().await?;
    doctor.expect_type("peer_left").await?;

    let resp = server
        .http()
        .get(server.api(&format!("/consultations/{}/audit", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    let text = resp.text().await?;
    assert!(
        !text.contains("Maria"),
        "a name reached the audit log: {text}"
    );
    assert!(
        !text.contains("127.0.0.1"),
        "an address reached the audit log"
    );
    assert!(
        !text.contains(&c.invite_code),
        "an invite code reached the audit log"
    );
    let log: Vec<Value> = serde_json::from_str(&text)?;
    let events: Vec<(&str, Option<&str>)> = log
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["role"].as_str()))
        .collect();
    assert_eq!(
        events,
        [
            ("created", None),
            ("joined", Some("doctor")),
            ("joined", Some("patient")),
            ("admitted", Some("patient")),
            ("left", Some("patient")),
        ]
    );
    assert_eq!(log[3]["actor_id"], serde_json::json!(doctor.id().0));
    assert!(
        log.windows(2)
            .all(|w| w[0]["at_ms"].as_u64() <= w[1]["at_ms"].as_u64())
    );

    // Nothing but hashes of invite codes is in the database file either.
    let db = std::fs::read(server.data_dir.path().join("bedside.db"))?;
    let db = String::from_utf8_lossy(&db);
    assert!(!db.contains("Maria"));
    assert!(!db.contains(&c.invite_code.replace('-', "")));
    Ok(())
}

#[tokio::test]
async fn metrics_and_health_are_served() -> Result<()> {
    let server = TestServer::start().await?;
    let health = server
        .http()
        .get(format!("{}/healthz", server.base_url))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    doctor
        .conn
        .send_raw(bedside_client_core::signaling::Message::Text("{".into()))
        .await?;
    doctor.expect_type("error").await?;
    let m = server.metrics().await?;
    for line in [
        "bedside_websocket_connections 1",
        "bedside_consultations_active 1",
        "bedside_joins_total{role=\"doctor\"} 1",
        "bedside_errors_total{code=\"malformed_message\"} 1",
        "bedside_messages_total{direction=\"in\",type=\"join\"} 1",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    Ok(())
}

#[tokio::test]
async fn self_signed_tls_serves_wss() -> Result<()> {
    let mut config = test_config();
    config.tls.mode = TlsMode::SelfSigned;
    let server = TestServer::start_with(config).await?;
    assert!(
        server.ws_url.starts_with("wss://127.0.0.1:"),
        "{}",
        server.ws_url
    );
    let cert = std::fs::read(server.data_dir.path().join("dev-cert.pem"))?;

    // The API over HTTPS, trusting the development certificate.
    let http = reqwest_tls(&cert)?;
    let created: Value = http
        .post(format!("{}/api/v1/consultations", server.base_url))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    let token = created["doctor_token"].as_str().unwrap().to_owned();

    let tls = tls_config(Some(&cert)).map_err(anyhow::Error::msg)?;
    let mut ws = SignalingConnection::connect(&server.ws_url, Some(tls)).await?;
    ws.send(&ClientMessage::Join {
        protocol_version: PROTOCOL_VERSION,
        auth: JoinAuth::Token { token },
        display_name: None,
    })
    .await?;
    assert!(matches!(
        ws.recv_timeout(bedside_tests::STEP).await?,
        Incoming::Message(ServerMessage::Joined { .. })
    ));
    // A client that does not trust the certificate cannot connect.
    let untrusting = tls_config(None).map_err(anyhow::Error::msg)?;
    assert!(
        SignalingConnection::connect(&server.ws_url, Some(untrusting))
            .await
            .is_err()
    );
    Ok(())
}

fn reqwest_tls(cert: &[u8]) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert)?)
        .build()?)
}

//! Doctor credentials against a real server: an administrator issues one, the doctor's app
//! lists, creates and joins consultations with it, and a revoked or unknown credential gets
//! nothing. The secret is stored only as a hash.

use anyhow::Result;
use bedside_server::api::{ConsultationSummary, CreatedConsultation, IssuedToken};
use bedside_server::credentials::{CredentialEvent, CredentialSummary, IssuedCredential};
use bedside_tests::TestServer;
use serde_json::Value;

async fn issue(server: &TestServer) -> Result<IssuedCredential> {
    let resp = server
        .http()
        .post(server.api("/doctor-credentials"))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "ttl_days": 30 }))
        .send()
        .await?;
    assert_eq!(resp.status(), 201);
    Ok(resp.json().await?)
}

#[tokio::test]
async fn a_doctor_credential_lists_creates_and_joins_until_revoked() -> Result<()> {
    let server = TestServer::start().await?;
    let cred = issue(&server).await?;
    assert!(cred.credential.starts_with("bdc_"));
    let now = bedside_server::auth::unix_now();
    assert!(cred.expires_at > now + 29 * 24 * 3600 && cred.expires_at <= now + 30 * 24 * 3600);

    // Create a consultation with it, as the app does.
    let resp = server
        .http()
        .post(server.api("/doctor/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 201);
    let created: CreatedConsultation = resp.json().await?;
    // The list shows it.
    let list: Vec<ConsultationSummary> = server
        .http()
        .get(server.api("/doctor/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].consultation_id, created.consultation_id);
    // A fresh join token for the doctor, which the signaling server accepts.
    let resp = server
        .http()
        .post(server.api(&format!(
            "/doctor/consultations/{}/tokens",
            created.consultation_id
        )))
        .bearer_auth(&cred.credential)
        .json(&serde_json::json!({ "role": "doctor" }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let token: IssuedToken = resp.json().await?;
    let mut doctor = server.connect().await?;
    doctor.join_token(&token.token).await?;
    doctor.expect_type("admitted").await?;

    // The doctor credential is not the admin key: the admin routes refuse it.
    let resp = server
        .http()
        .get(server.api("/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    let resp = server
        .http()
        .post(server.api("/doctor-credentials"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 401);

    // Revoked: refused from then on, and listed as revoked (never with its secret).
    let resp = server
        .http()
        .delete(server.api(&format!("/doctor-credentials/{}", cred.credential_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(resp.status(), 204);
    let resp = server
        .http()
        .get(server.api("/doctor/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "unauthorized");
    let resp = server
        .http()
        .get(server.api("/doctor-credentials"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    let text = resp.text().await?;
    assert!(!text.contains(&cred.credential), "the list shows a secret");
    let listed: Vec<CredentialSummary> = serde_json::from_str(&text)?;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked_at.is_some());
    Ok(())
}

#[tokio::test]
async fn unknown_credentials_and_bad_requests_get_clear_errors() -> Result<()> {
    let server = TestServer::start().await?;
    for bearer in [
        None,
        Some("bdc_0000000000000000"),
        Some(server.admin_key.as_str()),
    ] {
        let mut req = server.http().get(server.api("/doctor/consultations"));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        assert_eq!(req.send().await?.status(), 401);
    }
    for body in [r#"{"ttl_days":0}"#, r#"{"ttl_days":9999}"#, "{not json"] {
        let resp = server
            .http()
            .post(server.api("/doctor-credentials"))
            .bearer_auth(&server.admin_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(resp.status().as_u16() / 100, 4, "{body}");
    }
    let resp = server
        .http()
        .delete(server.api("/doctor-credentials/d-nope"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}

#[tokio::test]
async fn the_store_keeps_only_a_hash_and_credentials_survive_a_restart() -> Result<()> {
    let server = TestServer::start().await?;
    let cred = issue(&server).await?;
    let server = server.restart().await?;
    let resp = server
        .http()
        .get(server.api("/doctor/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let dir = server.data_dir.path().to_owned();
    let mut server = server;
    server.shutdown().await?;
    for entry in std::fs::read_dir(&dir)? {
        // SQLite deletes its `-wal` and `-shm` files as its last connection closes, which may
        // be after the listing (seen once in CI): a file gone is not on disk.
        let bytes = match std::fs::read(entry?.path()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            read => read?,
        };
        let secret = cred.credential.as_bytes();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "the credential's secret is on disk"
        );
    }
    Ok(())
}

/// `POST /doctor/consultations/{id}/tokens` for `role` with `credential`.
async fn token_for(
    server: &TestServer,
    credential: &str,
    cid: &str,
    role: &str,
) -> Result<reqwest::Response> {
    Ok(server
        .http()
        .post(server.api(&format!("/doctor/consultations/{cid}/tokens")))
        .bearer_auth(credential)
        .json(&serde_json::json!({ "role": role }))
        .send()
        .await?)
}

#[tokio::test]
async fn a_doctor_credential_gets_doctor_tokens_only_signs_out_and_is_audited() -> Result<()> {
    let server = TestServer::start().await?;
    let cred = issue(&server).await?;
    let created: CreatedConsultation = server
        .http()
        .post(server.api("/doctor/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?
        .json()
        .await?;
    let cid = created.consultation_id.0.clone();
    // Never a token to sit in a patient's or a clinician's seat...
    for role in ["patient", "clinician"] {
        let resp = token_for(&server, &cred.credential, &cid, role).await?;
        assert_eq!(resp.status(), 403, "{role}");
        let body: Value = resp.json().await?;
        assert_eq!(body["error"]["code"], "forbidden");
    }
    // ...nor the audit log or invite revocation, which are not routed for it.
    for (method, path) in [
        (
            reqwest::Method::GET,
            format!("/doctor/consultations/{cid}/audit"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/doctor/consultations/{cid}/invites"),
        ),
    ] {
        let resp = server
            .http()
            .request(method, server.api(&path))
            .bearer_auth(&cred.credential)
            .send()
            .await?;
        assert!(resp.status().is_client_error(), "{path}: {}", resp.status());
    }
    // Its own doctor token and an invite for the patient, as the app needs.
    assert_eq!(
        token_for(&server, &cred.credential, &cid, "doctor")
            .await?
            .status(),
        200
    );
    let resp = server
        .http()
        .post(server.api(&format!("/doctor/consultations/{cid}/invites")))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    // The administrator's key still issues any role.
    let resp = server
        .http()
        .post(server.api(&format!("/consultations/{cid}/tokens")))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "role": "clinician" }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);

    // Sign-out revokes the credential it is sent with.
    let resp = server
        .http()
        .delete(server.api("/doctor/credential"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 204);
    let resp = server
        .http()
        .get(server.api("/doctor/consultations"))
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    let listed: Vec<CredentialSummary> = server
        .http()
        .get(server.api("/doctor-credentials"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert!(listed[0].revoked_at.is_some());
    // A second credential, revoked by the administrator.
    let other = issue(&server).await?;
    let resp = server
        .http()
        .delete(server.api(&format!("/doctor-credentials/{}", other.credential_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(resp.status(), 204);

    // Both are in the credentials' audit logs (admin key only), with ids and times, no secret.
    let audit = |id: String| {
        let req = server
            .http()
            .get(server.api(&format!("/doctor-credentials/{id}/audit")));
        async move { anyhow::Ok(req) }
    };
    let resp = audit(cred.credential_id.clone())
        .await?
        .bearer_auth(&cred.credential)
        .send()
        .await?;
    assert_eq!(resp.status(), 401, "a doctor credential reads no audit log");
    let text = audit(cred.credential_id.clone())
        .await?
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .text()
        .await?;
    assert!(!text.contains(&cred.credential), "the audit shows a secret");
    let events: Vec<CredentialEvent> = serde_json::from_str(&text)?;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "issued",
            "consultation_created",
            "token_issued",
            "invite_issued",
            "signed_out"
        ],
        "{text}"
    );
    assert_eq!(events[2].consultation_id.as_deref(), Some(cid.as_str()));
    let events: Vec<CredentialEvent> = audit(other.credential_id.clone())
        .await?
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["issued", "revoked"]);
    Ok(())
}

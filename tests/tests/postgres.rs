//! The store on a real PostgreSQL (`[store] backend = "postgres"`): each test starts its own
//! cluster on a free loopback port (`bedside_tests::postgres`) and real servers on it, in this
//! process and in processes of their own. Without PostgreSQL's binaries it skips (and fails
//! under `CI=true`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bedside_protocol::{ClientMessage, PROTOCOL_VERSION, ServerMessage};
use bedside_server::Config;
use bedside_server::store::{Store, StoreBackend, StoreError};
use bedside_tests::postgres::Postgres;
use bedside_tests::{TestServer, test_config};
use serde_json::Value;

/// A running cluster and a fresh database on it, or `None` (skipped) where PostgreSQL is
/// missing.
async fn database(name: &str) -> Result<Option<(Postgres, String)>> {
    if let Some(reason) = bedside_tests::postgres::unavailable() {
        bedside_tests::skip(&reason);
        return Ok(None);
    }
    let pg = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = pg.create_database(name).await?;
    Ok(Some((pg, url)))
}

fn on_postgres(url: &str) -> Config {
    let mut config = test_config();
    config.store.backend = StoreBackend::Postgres;
    config.store.postgres_url = url.to_owned();
    config.store.postgres_pool_size = 4;
    // The test's clients read (and so answer the server's pings) only when they expect
    // something; an outage with waits in it must not look like a dead link.
    config.keepalive_timeout_secs = 30;
    config
}

/// The events of a consultation's audit log, as the API returns it, in its order.
async fn audit_events(server: &TestServer, cid: &str) -> Result<Vec<Value>> {
    let resp = server
        .http()
        .get(server.api(&format!("/consultations/{cid}/audit")))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "audit: {}", resp.status());
    Ok(resp.json().await?)
}

/// A sample's value in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn kinds(log: &[Value]) -> Vec<&str> {
    log.iter().filter_map(|e| e["event"].as_str()).collect()
}

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_again_are_a_no_op() -> Result<()> {
    let Some((pg, url)) = database("migrations").await? else {
        return Ok(());
    };
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        anyhow::Ok(client)
    };
    // Two nodes starting at once: the advisory lock lets one apply, the other sees it done.
    let (mut a, mut b) = (connect().await?, connect().await?);
    let (ra, rb) = tokio::join!(
        bedside_server::store::postgres::migrate(&mut a),
        bedside_server::store::postgres::migrate(&mut b)
    );
    let mut applied = [ra?, rb?];
    applied.sort();
    let all: Vec<i64> = (1..=bedside_server::store::postgres::schema_version()).collect();
    assert_eq!(
        applied,
        [vec![], all.clone()],
        "one node applies, the other finds it done"
    );
    let versions: Vec<i64> = a
        .query(
            "SELECT version FROM bedside_schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, all);
    // Again: nothing to do.
    assert!(
        bedside_server::store::postgres::migrate(&mut a)
            .await?
            .is_empty()
    );
    for table in [
        "consultations",
        "invites",
        "audit",
        "seats",
        "settings",
        "doctor_credentials",
    ] {
        let n: i64 = a
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .await?
            .get(0);
        assert_eq!(n, 1, "{table}");
    }
    // A server starts on it and keeps its data across a restart of the store.
    let config = on_postgres(&url);
    let store = Store::from_config(&config).await?;
    let secret = store
        .setting_or_init("token_secret", || "first".into())
        .await?;
    drop(store);
    let store = Store::from_config(&config).await?;
    assert_eq!(
        store
            .setting_or_init("token_secret", || "second".into())
            .await?,
        secret
    );
    // A database migrated by a newer release is refused.
    a.execute(
        "INSERT INTO bedside_schema_migrations(version, applied_at_ms) VALUES (99, 0)",
        &[],
    )
    .await?;
    match Store::from_config(&config).await {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        Err(e) => bail!("wrong error: {e}"),
        Ok(_) => bail!("a database from a newer release was used"),
    }
    drop(pg);
    Ok(())
}

#[tokio::test]
async fn a_consultation_end_to_end_on_postgres() -> Result<()> {
    let Some((pg, url)) = database("e2e").await? else {
        return Ok(());
    };
    let server = TestServer::start_with(on_postgres(&url)).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Ana").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;
    patient.send(ClientMessage::Leave).await?;
    doctor.expect_type("peer_left").await?;

    let cid = c.consultation_id.0.as_str();
    let log = audit_events(&server, cid).await?;
    assert_eq!(
        kinds(&log),
        ["created", "joined", "joined", "admitted", "left"],
        "{log:?}"
    );
    assert_eq!(log[1]["role"], "doctor");
    assert_eq!(log[2]["role"], "patient");
    assert_eq!(log[3]["participant_id"], patient.id().0.as_str());
    assert_eq!(log[3]["actor_id"], doctor.id().0.as_str());
    // Nothing but ids and roles: the patient's name is nowhere in the database.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let dump: i64 = client
        .query_one(
            "SELECT count(*) FROM audit WHERE participant_id LIKE '%Ana%' OR actor_id LIKE '%Ana%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(dump, 0);
    // The server's own metrics say the store is up.
    let metrics = server.metrics().await?;
    assert!(metrics.contains("bedside_store_up 1"), "{metrics}");
    // Ended: the doctor's token no longer joins, on this or any node.
    let resp = server
        .http()
        .delete(server.api(&format!("/consultations/{cid}")))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "end: {}", resp.status());
    let mut late = server.connect().await?;
    late.send_join(bedside_protocol::JoinAuth::Token {
        token: c.doctor_token.clone(),
    })
    .await?;
    late.expect_error(bedside_protocol::ErrorCode::ConsultationNotFound)
        .await?;
    drop(pg);
    Ok(())
}

/// A `server-under-test` process on the database at `url`; no token secret configured, so
/// the nodes share the one the first generated in the database.
async fn node(
    dir: &std::path::Path,
    name: &str,
    url: &str,
) -> Result<(tokio::process::Child, String)> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN}\"\n\
             [turn]\nenabled = false\n[store]\nbackend = \"postgres\"\npostgres-url = \"{url}\"\n\
             postgres-pool-size = 4\n",
            dir.join(name).display()
        ),
    )?;
    bedside_tests::spawn_server_process(
        std::path::Path::new(env!("CARGO_BIN_EXE_server-under-test")),
        &config,
    )
    .await
}

const ADMIN: &str = "fleet-store-admin-key-0123";

fn ws(base: &str) -> String {
    format!("{}/ws", base.replacen("http://", "ws://", 1))
}

#[tokio::test]
async fn two_server_processes_on_one_database_see_each_others_consultations_and_invites()
-> Result<()> {
    let Some((pg, url)) = database("two_nodes").await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // Started together: both migrate and both initialise the token secret at once.
    let (a, b) = tokio::join!(node(dir.path(), "a", &url), node(dir.path(), "b", &url));
    let ((_a, base_a), (_b, base_b)) = (a?, b?);
    let http = reqwest::Client::new();
    let post = |base: &str, path: &str| {
        http.post(format!("{base}/api/v1{path}"))
            .bearer_auth(ADMIN)
            .send()
    };

    // Consultations created on both nodes at once, all of them listed by each.
    let mut created = Vec::new();
    let mut pending = Vec::new();
    for i in 0..10 {
        let base = if i % 2 == 0 { &base_a } else { &base_b };
        pending.push(post(base, "/consultations"));
    }
    for resp in futures_util::future::join_all(pending).await {
        let c: bedside_server::api::CreatedConsultation = resp?.error_for_status()?.json().await?;
        created.push(c);
    }
    for base in [&base_a, &base_b] {
        let listed: Vec<Value> = http
            .get(format!("{base}/api/v1/consultations"))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        for c in &created {
            assert!(
                listed
                    .iter()
                    .any(|l| l["consultation_id"] == c.consultation_id.0.as_str()),
                "{} missing on {base}",
                c.consultation_id
            );
        }
    }

    // Created on A: the doctor's token joins on B (one token secret), the invite redeems on B.
    let c = &created[0];
    let mut doctor = bedside_tests::Client::connect(&ws(&base_b)).await?;
    doctor.join_token(&c.doctor_token).await?;
    doctor.expect_type("admitted").await?;
    let mut patient = bedside_tests::Client::connect(&ws(&base_b)).await?;
    patient.join_invite(&c.invite_code, Some("Bo")).await?;
    patient.expect_type("waiting").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;

    // An invite issued on B for it redeems on A.
    let invite: Value = post(
        &base_b,
        &format!("/consultations/{}/invites", c.consultation_id),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    let code = invite["invite_code"].as_str().context("invite_code")?;
    let mut second = bedside_tests::Client::connect(&ws(&base_a)).await?;
    second.join_invite(code, None).await?;
    second.expect_type("waiting").await?;

    // The audit log read on A holds what happened on B, in order. B writes its events in
    // batches (at most 20 ms apart), so they may take a moment to show on A.
    let audit_url = format!("{base_a}/api/v1/consultations/{}/audit", c.consultation_id);
    let expected = [
        "created",
        "joined",
        "joined",
        "admitted",
        "invite_issued",
        "joined",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log: Vec<Value> = http
            .get(&audit_url)
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        if kinds(&log) == expected {
            break;
        }
        assert!(Instant::now() < deadline, "{log:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Ended on A: B refuses its invite from then on.
    http.delete(format!(
        "{base_a}/api/v1/consultations/{}",
        created[1].consultation_id
    ))
    .bearer_auth(ADMIN)
    .send()
    .await?
    .error_for_status()?;
    let mut refused = bedside_tests::Client::connect(&ws(&base_b)).await?;
    refused
        .send_join(bedside_protocol::JoinAuth::InviteCode {
            code: created[1].invite_code.clone(),
        })
        .await?;
    refused
        .expect_error(bedside_protocol::ErrorCode::InvalidInviteCode)
        .await?;
    drop(pg);
    Ok(())
}

/// Polls `f` every 100 ms until it is true, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(server: &TestServer) -> Result<(u16, String)> {
    let resp = server
        .http()
        .get(format!("{}/readyz", server.base_url))
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_mid_consultation_keeps_the_seats_and_the_audit_events() -> Result<()> {
    let Some((mut pg, url)) = database("outage").await? else {
        return Ok(());
    };
    let server = TestServer::start_with(on_postgres(&url)).await?;
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let mut patient = server.waiting_patient(&c, "Cy").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;
    assert_eq!(readyz(&server).await?.0, 200);

    // The database goes away.
    let stopped_at = Instant::now();
    tokio::task::block_in_place(|| pg.stop())?;
    eventually(Duration::from_secs(5), "readyz says store", || async {
        let (status, body) = readyz(&server).await?;
        Ok(status == 503 && body.contains("store"))
    })
    .await?;
    eventually(Duration::from_secs(5), "bedside_store_up 0", || async {
        Ok(server.metrics().await?.contains("bedside_store_up 0"))
    })
    .await?;

    // Meanwhile the call goes on: the patient's link drops and resumes its seat, signaling
    // flows both ways.
    let pid = patient.id();
    let token = patient.resume_token.clone().context("resume token")?;
    patient.conn.abort();
    doctor.expect_type("peer_reconnecting").await?;
    let mut back = server.connect().await?;
    back.send(ClientMessage::Resume {
        protocol_version: PROTOCOL_VERSION,
        resume_token: token,
    })
    .await?;
    match back.next().await? {
        ServerMessage::Joined { resumed, .. } => assert!(resumed),
        other => bail!("expected joined, got {other:?}"),
    }
    back.expect_type("admitted").await?;
    back.participant_id = Some(pid.clone());
    doctor.expect_type("peer_back").await?;
    doctor
        .send(ClientMessage::Offer {
            to: pid.clone(),
            sdp: "v=0\r\n".into(),
        })
        .await?;
    back.expect_type("offer").await?;
    back.send(ClientMessage::Answer {
        to: doctor.id(),
        sdp: "v=0\r\n".into(),
    })
    .await?;
    doctor.expect_type("answer").await?;
    let metrics = server.metrics().await?;
    let buffered = metric(&metrics, "bedside_store_buffered_writes");
    assert!(
        buffered >= 2.0,
        "the disconnect and the resume wait in memory: {metrics}"
    );
    // A few seconds of outage in all.
    let outage = Duration::from_secs(4);
    tokio::time::sleep(outage.saturating_sub(stopped_at.elapsed())).await;

    // Back: ready again, the buffer written, the audit log complete and in order.
    tokio::task::block_in_place(|| pg.start_again())?;
    eventually(Duration::from_secs(10), "ready again", || async {
        Ok(readyz(&server).await?.0 == 200)
    })
    .await?;
    eventually(Duration::from_secs(10), "buffer written", || async {
        let m = server.metrics().await?;
        Ok(m.contains("bedside_store_up 1") && m.contains("bedside_store_buffered_writes 0"))
    })
    .await?;
    let log = audit_events(&server, &c.consultation_id.0).await?;
    assert_eq!(
        kinds(&log),
        [
            "created",
            "joined",
            "joined",
            "admitted",
            "disconnected",
            "resumed"
        ],
        "{log:?}"
    );
    let times: Vec<u64> = log.iter().filter_map(|e| e["at_ms"].as_u64()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // The seats are still held after the outage: the doctor's offers still reach the patient.
    doctor
        .send(ClientMessage::Offer {
            to: pid,
            sdp: "v=0\r\n".into(),
        })
        .await?;
    back.expect_type("offer").await?;
    Ok(())
}

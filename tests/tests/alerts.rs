//! The server's own alert rules, delivered to a webhook receiver run by the test (Alertmanager's
//! webhook payload): "calls poor" raised by an impaired probe call and resolved once the
//! impairment is gone; "relay near quota" under a quota-sized load from coturn's
//! `turnutils_uclient`; refused joins and a seat held past the threshold, also shown as firing
//! on the dashboard's feed.

use std::time::Duration;

use anyhow::{Context, Result};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use bedside_protocol::ClientMessage;
use bedside_tests::ops::{self, ProbeCall};
use bedside_tests::{TestServer, test_config, with_turn};
use serde_json::Value;
use tokio::sync::mpsc;

/// A webhook receiver on loopback; returns its URL and what it receives.
async fn receiver() -> Result<(String, mpsc::UnboundedReceiver<Value>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(
                |State(tx): State<mpsc::UnboundedSender<Value>>, Json(body): Json<Value>| async move {
                    let _ = tx.send(body);
                    "ok"
                },
            ),
        )
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, rx))
}

/// The next payload for `alertname` with `status`, within `within`.
async fn next_alert(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    alertname: &str,
    status: &str,
    within: Duration,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let body = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| format!("no {status} {alertname} within {within:?}"))?
            .context("receiver closed")?;
        if body["alerts"][0]["labels"]["alertname"] == alertname && body["status"] == status {
            return Ok(body);
        }
    }
}

/// The bundled relay's UDP port, as the server hands it to an admitted participant.
async fn relay_udp_port(server: &TestServer) -> Result<u16> {
    let c = server.create_consultation().await?;
    let mut doctor = server.connect().await?;
    doctor.join_token(&c.doctor_token).await?;
    let admitted = doctor.expect_type("admitted").await?;
    let bedside_protocol::ServerMessage::Admitted { ice_servers, .. } = admitted else {
        anyhow::bail!("not admitted: {admitted:?}");
    };
    let url = ice_servers
        .iter()
        .flat_map(|s| &s.urls)
        .find(|u| u.starts_with("turn:") && u.ends_with("?transport=udp"))
        .context("no TURN/UDP URL")?;
    let port = url
        .trim_end_matches("?transport=udp")
        .rsplit(':')
        .next()
        .context("no port")?;
    Ok(port.parse()?)
}

fn alerting(mut config: bedside_server::Config, webhook: String) -> bedside_server::Config {
    config.alerts.webhook_url = webhook;
    config.alerts.eval_interval_secs = 1;
    config.alerts.calls_poor_for_secs = 2;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impaired_call_raises_calls_poor_and_it_resolves_when_the_impairment_ends() -> Result<()>
{
    let (url, mut hooks) = receiver().await?;
    let server = TestServer::start_with(alerting(test_config(), url)).await?;
    let healthy = ProbeCall::start(&server, Duration::from_secs(24), false, false).await?;
    let impaired = ProbeCall::start(&server, Duration::from_secs(9), true, false).await?;

    let fired = next_alert(
        &mut hooks,
        "BedsideCallsPoor",
        "firing",
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(fired["version"], "4");
    assert_eq!(fired["alerts"][0]["labels"]["region"], "clinic");
    assert!(
        fired["alerts"][0]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("live calls"),
        "{fired}"
    );
    assert!(
        !impaired.is_finished(),
        "fired only after the impaired call ended"
    );

    let resolved = next_alert(
        &mut hooks,
        "BedsideCallsPoor",
        "resolved",
        Duration::from_secs(25),
    )
    .await?;
    assert!(
        impaired.is_finished(),
        "resolved while the impairment lasted"
    );
    assert!(
        !healthy.is_finished(),
        "resolved only because every call ended"
    );
    assert_ne!(resolved["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(
        resolved["alerts"][0]["fingerprint"],
        fired["alerts"][0]["fingerprint"]
    );
    assert_eq!(
        fired["alerts"][0]["generatorURL"],
        format!("{}/dashboard", server.base_url)
    );

    // The payloads link to this server's own dashboard (externalURL, generatorURL); apart
    // from that server address nothing in them may name or locate anyone.
    let strip = |mut v: Value| {
        v["externalURL"] = Value::Null;
        v["alerts"][0]["generatorURL"] = Value::Null;
        v
    };
    let text = format!("{}{}", strip(fired), strip(resolved));
    for secret in ops::secrets_of(&[&healthy.consultation, &impaired.consultation]) {
        assert!(!text.contains(&secret), "an alert holds {secret:?}");
    }
    impaired.finish().await?;
    healthy.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_sized_relay_load_raises_relay_near_quota() -> Result<()> {
    if !ops::tool_available(
        ops::runs("turnutils_uclient", &[]),
        "the relay quota test needs coturn's turnutils_uclient",
    ) {
        return Ok(());
    }
    let (url, mut hooks) = receiver().await?;
    let mut config = alerting(with_turn(test_config()), url);
    config.turn.relay.auth_secret = "test-turn-secret".into();
    config.turn.relay.total_quota = 4;
    let server = TestServer::start_with(config).await?;
    let port = relay_udp_port(&server).await?;

    // Four clients relaying to each other: four allocations, the whole quota. (uclient exits
    // non-zero when it asks for more and is refused; its exit status is not the point.)
    let mut uclient = tokio::process::Command::new("turnutils_uclient")
        .args(["-y", "-c", "-m", "4", "-n", "400", "-z", "20"])
        .args(["-u", "loadtest", "-W", "test-turn-secret", "-p"])
        .arg(port.to_string())
        .arg("127.0.0.1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let fired = next_alert(
        &mut hooks,
        "BedsideRelayNearQuota",
        "firing",
        Duration::from_secs(15),
    )
    .await?;
    let summary = fired["alerts"][0]["annotations"]["summary"]
        .as_str()
        .unwrap_or("");
    assert!(summary.contains("of its 4 allocations"), "{summary}");
    let _ = uclient.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_joins_and_a_held_seat_raise_their_alerts_and_the_dashboard_shows_them()
-> Result<()> {
    let (url, mut hooks) = receiver().await?;
    let mut config = alerting(test_config(), url);
    config.alerts.join_failures_per_minute = 2;
    config.alerts.stuck_reconnecting_secs = 2;
    let server = TestServer::start_with(config).await?;

    // Three forged tokens: more than two refused joins in a minute.
    for _ in 0..3 {
        let mut c = server.connect().await?;
        c.send_join(bedside_protocol::JoinAuth::Token {
            token: "not.a.token".into(),
        })
        .await?;
        c.expect_error(bedside_protocol::ErrorCode::InvalidToken)
            .await?;
    }
    next_alert(
        &mut hooks,
        "BedsideJoinFailures",
        "firing",
        Duration::from_secs(15),
    )
    .await?;

    // A doctor whose link drops without `leave`: the seat is held, then "stuck reconnecting".
    let c = server.create_consultation().await?;
    let doctor = server.doctor(&c).await?;
    let token = doctor.resume_token.clone().context("resume token")?;
    drop(doctor);
    let stuck = next_alert(
        &mut hooks,
        "BedsideStuckReconnecting",
        "firing",
        Duration::from_secs(15),
    )
    .await?;
    assert_eq!(
        stuck["alerts"][0]["labels"]["consultation"],
        c.consultation_id.0.as_str()
    );

    // The dashboard lists both as firing.
    let events =
        ops::read_events(&server.base_url, &server.admin_key, Duration::from_secs(3)).await?;
    let last = ops::snapshots(&events)
        .into_iter()
        .rfind(|s| s.get("overview").is_some())
        .context("no snapshot")?;
    let firing: Vec<&str> = last["alerts_firing"]
        .as_array()
        .context("alerts_firing")?
        .iter()
        .filter_map(|a| a["labels"]["alertname"].as_str())
        .collect();
    assert!(
        firing.contains(&"BedsideJoinFailures") && firing.contains(&"BedsideStuckReconnecting"),
        "{firing:?}"
    );

    // Resuming the seat resolves the held-seat alert.
    let mut back = server.connect().await?;
    back.send(ClientMessage::Resume {
        protocol_version: bedside_protocol::PROTOCOL_VERSION,
        resume_token: token,
    })
    .await?;
    back.expect_type("joined").await?;
    next_alert(
        &mut hooks,
        "BedsideStuckReconnecting",
        "resolved",
        Duration::from_secs(15),
    )
    .await?;
    Ok(())
}

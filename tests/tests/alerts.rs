//! The server's own alert rules, delivered to a webhook receiver run by the test (Alertmanager's
//! webhook payload): "calls poor" raised by an impaired probe call and resolved once the
//! impairment is gone; "relay near quota" under a quota-sized load from coturn's
//! `turnutils_uclient`; refused joins and a seat held past the threshold, also shown as firing
//! on the dashboard's feed; and in the impairment lab, real loss (nftables) raising "calls poor"
//! and lifted mid-call, resolving it while the call goes on.

use std::time::Duration;

use anyhow::{Context, Result};
use bedside_protocol::ClientMessage;
use bedside_tests::ops::{self, ProbeCall, next_alert, webhook_receiver as receiver};
use bedside_tests::{TestServer, test_config, with_turn};
use serde_json::Value;

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

/// Real loss in the impairment lab (nftables on the patient's host), lifted while the call
/// goes on: "calls poor" is raised at a webhook receiver while the loss lasts and resolved
/// after it is gone, before the call ends. The server runs in a network namespace of its own,
/// so the receiver is a process there too (`webhook-receiver`).
#[test]
fn real_loss_in_the_lab_raises_calls_poor_and_lifting_it_resolves_it_mid_call() -> Result<()> {
    use bedside_tests::netns::Lab;
    use bedside_tests::scenarios::{Call, Setup};
    use std::io::BufRead;
    use std::time::Instant;

    if let Some(why) = bedside_tests::scenarios::unavailable() {
        bedside_tests::skip(&format!("the impairment lab cannot run here: {why}"));
        return Ok(());
    }
    let mut lab = Lab::new(&["srv", "doc", "pat"])?;
    let hook = format!("{}:9099", lab.addr("srv"));
    let receiver = lab.spawn(
        "srv",
        std::path::Path::new(env!("CARGO_BIN_EXE_webhook-receiver")),
        &[&hook],
    )?;
    let mut lines = std::io::BufReader::new(
        lab.child(receiver)
            .stdout
            .take()
            .context("receiver output")?,
    )
    .lines();
    anyhow::ensure!(
        lines.next().transpose()?.as_deref() == Some("listening"),
        "the receiver did not start"
    );
    let (tx, hooks) = std::sync::mpsc::channel::<(Instant, Value)>();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send((Instant::now(), v)).is_err()
            {
                break;
            }
        }
    });
    let next = |name: &str, status: &str, within: Duration| -> Result<(Instant, Value)> {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let (at, body) = hooks
                .recv_timeout(left)
                .with_context(|| format!("no {status} {name} within {within:?}"))?;
            if body["alerts"][0]["labels"]["alertname"] == name && body["status"] == status {
                return Ok((at, body));
            }
        }
    };

    let call = Call::start_in(
        lab,
        Setup {
            extra_config: format!(
                "[alerts]\nwebhook-url = \"http://{hook}/hook\"\neval-interval-secs = 1\n\
                 calls-poor-for-secs = 3\n"
            ),
            ..Setup::new(75)
        },
    )?;
    // The call settles; a slow first few seconds on a loaded machine may read poor, and must
    // have resolved before the loss starts, or it would prove nothing.
    std::thread::sleep(Duration::from_secs(12));
    while let Ok((_, early)) = hooks.try_recv() {
        if early["alerts"][0]["labels"]["alertname"] == "BedsideCallsPoor"
            && early["status"] == "firing"
        {
            next("BedsideCallsPoor", "resolved", Duration::from_secs(20))?;
        }
    }

    // 25% of what reaches the patient's host is dropped: media and signaling alike.
    call.lab.nft(
        "pat",
        "table inet lab {\n chain input {\n  type filter hook input priority 0;\n  \
         numgen random mod 100 < 25 drop\n }\n}\n",
    )?;
    let lossy = Instant::now();
    let (fired_at, fired) = next("BedsideCallsPoor", "firing", Duration::from_secs(30))?;
    eprintln!(
        "calls poor fired {:.1} s after the loss began: {}",
        fired_at.duration_since(lossy).as_secs_f64(),
        fired["alerts"][0]["annotations"]["summary"]
    );
    std::thread::sleep(Duration::from_secs(3));
    call.lab.nft("pat", "delete table inet lab")?;
    let lifted = Instant::now();
    let (resolved_at, resolved) = next("BedsideCallsPoor", "resolved", Duration::from_secs(30))?;
    let call_left = Duration::from_secs(75).saturating_sub(call.started.elapsed());
    eprintln!(
        "resolved {:.1} s after the loss was lifted, {:.0} s of the call left",
        resolved_at.duration_since(lifted).as_secs_f64(),
        call_left.as_secs_f64()
    );
    assert!(
        call_left > Duration::from_secs(10),
        "resolved only near the call's end"
    );
    assert_eq!(
        resolved["alerts"][0]["fingerprint"],
        fired["alerts"][0]["fingerprint"]
    );
    let (doctor, patient) = call.finish()?;
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        assert_eq!(r["connected"], true, "{who}: {r}");
        assert_eq!(
            r["ended"], "Left",
            "{who}: the call went on to its end: {r}"
        );
    }
    Ok(())
}

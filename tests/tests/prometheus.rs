//! `/metrics` as Prometheus reads it, checked by `promtool check metrics`, and the shipped
//! rules (`deploy/prometheus/alerts.yml`) against their unit tests with `promtool test rules`,
//! and the Grafana dashboard's queries evaluated by a real Prometheus scraping a real server.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use bedside_protocol::ClientMessage;
use bedside_tests::ops;
use bedside_tests::{TestServer, test_config, with_sfu, with_turn};

fn promtool_available() -> bool {
    ops::tool_available(
        ops::runs("promtool", &["--version"]),
        "this suite needs promtool (Debian's prometheus package)",
    )
}

#[tokio::test]
async fn promtool_check_metrics_passes_on_metrics() -> Result<()> {
    if !promtool_available() {
        return Ok(());
    }
    // The relay and the SFU run in-process, so their families are checked too.
    let server = TestServer::start_with(with_sfu(with_turn(test_config()))).await?;
    // A doctor, a patient admitted and one denied: every histogram family has samples.
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let admitted = server.waiting_patient(&c, "Patient One").await?;
    doctor.expect_type("waiting_room").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: admitted.id(),
        })
        .await?;
    doctor.expect_type("peer_joined").await?;
    let invite = server
        .http()
        .post(server.api(&format!("/consultations/{}/invites", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json::<bedside_server::api::IssuedInvite>()
        .await?;
    let mut denied = server.connect().await?;
    denied
        .join_invite(&invite.invite_code, Some("Patient Two"))
        .await?;
    denied.expect_type("waiting").await?;
    doctor
        .send(ClientMessage::Deny {
            participant_id: denied.id(),
        })
        .await?;
    denied.expect_type("denied").await?;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await; // one dashboard tick

    let text = server
        .http()
        .get(format!("{}/metrics", server.base_url))
        .header("Accept", "text/plain; version=0.0.4")
        .send()
        .await?
        .text()
        .await?;
    for family in [
        "# HELP bedside_turn_active_allocations ",
        "# HELP bedside_turn_relayed_packets_total ",
        "# HELP bedside_sfu_participants ",
        "# HELP bedside_sfu_forwarded_packets_total ",
        "# HELP bedside_sfu_keyframe_requests_relayed_total ",
        "# HELP bedside_sfu_keyframe_requests_suppressed_total ",
        "bedside_sfu_forward_seconds_count ",
        "bedside_join_admitted_seconds_count 2",
        "bedside_waiting_room_seconds_count{outcome=\"admitted\"} 1",
        "bedside_waiting_room_seconds_count{outcome=\"denied\"} 1",
        "bedside_relay_allocation_quota 10000",
        "bedside_calls{quality=\"poor\"} 0",
    ] {
        assert!(text.contains(family), "no {family:?} in\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = promtool.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );

    // Every family the shipped Grafana dashboard and Prometheus rules query is served.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let grafana: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("deploy/grafana/bedside.json"),
    )?)?;
    let mut queries: Vec<String> = grafana["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    queries.push(std::fs::read_to_string(
        root.join("deploy/prometheus/alerts.yml"),
    )?);
    for q in &queries {
        for name in metric_names(q) {
            assert!(
                text.lines().any(|l| l.starts_with(&name)),
                "{name} (queried by {q:?}) is not in /metrics"
            );
        }
    }

    // Prometheus itself asks for OpenMetrics, and gets it.
    let om = server.metrics().await?;
    assert!(om.trim_end().ends_with("# EOF"));
    Ok(())
}

/// The `bedside_*` metric names in a query or rule file.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("bedside_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `bedside_errors_total` is a family; `bedside-server` in prose is not a metric.
        if end > "bedside_".len() {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_prometheus_rules_pass_their_unit_tests() -> Result<()> {
    if !promtool_available() {
        return Ok(());
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()?;
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The shipped Grafana dashboard's queries, run by a real Prometheus (Debian's `prometheus`,
/// started by the test, scraping a real server every second): each one parses and evaluates
/// to a non-empty result, and carries the labels its legend names. Grafana itself is not in
/// Debian 12, so the dashboard's layout was never loaded in Grafana; its queries are what this
/// checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_query_evaluates_in_a_real_prometheus() -> Result<()> {
    if !ops::tool_available(
        ops::runs("prometheus", &["--version"]),
        "this test needs prometheus (Debian's prometheus package)",
    ) {
        return Ok(());
    }
    let server = TestServer::start_with(with_turn(test_config())).await?;
    // A doctor admitted a patient and a forged token was refused: the families the panels
    // break down by role, outcome and code have samples.
    let c = server.create_consultation().await?;
    let mut doctor = server.doctor(&c).await?;
    let patient = server.waiting_patient(&c, "Patient One").await?;
    doctor.expect_type("waiting_room").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    doctor.expect_type("peer_joined").await?;
    let mut forged = server.connect().await?;
    forged
        .send_join(bedside_protocol::JoinAuth::Token {
            token: "not.a.token".into(),
        })
        .await?;
    forged
        .expect_error(bedside_protocol::ErrorCode::InvalidToken)
        .await?;

    let dir = tempfile::tempdir()?;
    let target = server.base_url.trim_start_matches("http://").to_owned();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: bedside\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )?;
    let port = bedside_tests::fleet::free_port()?;
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus")?;
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let http = reqwest::Client::new();
    let query = |expr: String| {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let body: serde_json::Value = http
                .get(&api)
                .query(&[("query", expr.as_str())])
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(body)
        }
    };
    // Scraped several times (rates need two samples in their range).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let up = query("count_over_time(up{job=\"bedside\"}[1m])".into()).await;
        let scrapes = up
            .ok()
            .and_then(|b| {
                b["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_owned)
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if scrapes >= 5.0 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < until,
            "prometheus did not scrape the server 5 times in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let grafana: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("deploy/grafana/bedside.json"),
    )?)?;
    let mut checked = 0;
    for panel in grafana["panels"].as_array().context("panels")? {
        for t in panel["targets"].as_array().cloned().unwrap_or_default() {
            let expr = t["expr"].as_str().context("expr")?;
            let body = query(expr.to_owned()).await?;
            assert_eq!(body["status"], "success", "{expr}: {body}");
            let result = body["data"]["result"].as_array().context("result")?;
            assert!(
                !result.is_empty(),
                "{expr} (panel {:?}) evaluates to nothing",
                panel["title"]
            );
            // `{{label}}` in the legend must be a label of the result.
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap_or("").trim();
                assert!(
                    result.iter().all(|r| r["metric"][label].is_string()),
                    "{expr}: no label {label:?} for the legend in {result:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} queries");
    eprintln!("{checked} Grafana queries evaluated in Prometheus");
    let _ = prometheus.kill().await;
    drop(patient);
    Ok(())
}

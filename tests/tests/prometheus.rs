//! `/metrics` as Prometheus reads it, checked by `promtool check metrics`, and the shipped
//! rules (`deploy/prometheus/alerts.yml`) against their unit tests with `promtool test rules`.

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

//! The fleet's dashboard and alerts (issue #16 over #13's fleet): two `bedside-server` nodes in
//! processes of their own sharing a real `redis-server`, a probe call homed on each, one node's
//! dashboard feed showing both calls and both nodes, and a `kill -9` of the other node raising
//! "node gone" at a webhook receiver in the test (whichever node evaluated the region's rules
//! before). Without redis-server the suite skips, and fails under `CI=true`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bedside_probe::{ProbeOptions, Report};
use bedside_protocol::JoinAuth;
use bedside_server::api::CreatedConsultation;
use bedside_tests::fleet::{ADMIN_KEY, Node, NodeOptions, Redis, tools};
use bedside_tests::ops::{self, next_alert, webhook_receiver};
use serde_json::Value;
use tokio::task::JoinHandle;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_server-under-test"))
}

/// A doctor and a patient probe, both on `node`, for `secs` once connected.
async fn call_on(
    node: &Node,
    secs: u64,
) -> Result<(CreatedConsultation, Vec<JoinHandle<Result<Report>>>)> {
    let c = node.create_consultation().await?;
    let probe = |auth: JoinAuth, name: &str| ProbeOptions {
        display_name: Some(name.to_owned()),
        duration: Duration::from_secs(secs),
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 320,
        height: 180,
        bitrate_kbps: 200,
        ..ProbeOptions::new(node.ws_url(), auth)
    };
    let doctor = probe(
        JoinAuth::Token {
            token: c.doctor_token.clone(),
        },
        ops::DOCTOR_NAME,
    );
    let patient = probe(
        JoinAuth::InviteCode {
            code: c.invite_code.clone(),
        },
        ops::PATIENT_NAME,
    );
    let probes = vec![
        tokio::spawn(bedside_probe::run(doctor)),
        tokio::spawn(bedside_probe::run(patient)),
    ];
    Ok((c, probes))
}

/// The newest snapshot in a capture of a feed.
fn newest(events: &str) -> Option<Value> {
    ops::snapshots(events)
        .into_iter()
        .rfind(|s| s.get("overview").is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nodes_dashboard_shows_the_regions_calls_and_a_killed_node_raises_node_gone()
-> Result<()> {
    if let Err(reason) = tools() {
        bedside_tests::skip(&reason);
        return Ok(());
    }
    let (hook, mut hooks) = webhook_receiver().await?;
    let dir = tempfile::tempdir()?;
    let redis = Redis::start(dir.path()).await?;
    let options = NodeOptions {
        region: "north".into(),
        extra_toml: format!(
            "[alerts]\nwebhook-url = \"{hook}\"\neval-interval-secs = 1\nnode-gone-for-secs = 2\n"
        ),
        ..NodeOptions::default()
    };
    let a = Node::start(binary(), dir.path(), "node-a", &redis, &options).await?;
    let mut b = Node::start(binary(), dir.path(), "node-b", &redis, &options).await?;

    let (on_a, probes_a) = call_on(&a, 40).await?;
    let (on_b, probes_b) = call_on(&b, 40).await?;
    let (id_a, id_b) = (
        on_a.consultation_id.0.clone(),
        on_b.consultation_id.0.clone(),
    );

    // Node A's feed shows both calls, each with its node and figures, and both nodes.
    let until = tokio::time::Instant::now() + Duration::from_secs(45);
    let (snapshot, captured) = loop {
        let events = ops::read_events(&a.base_url, ADMIN_KEY, Duration::from_secs(3)).await?;
        let last = newest(&events);
        let shown = |s: &Value| -> bool {
            let rows = s["consultations"].as_array().cloned().unwrap_or_default();
            let on = |id: &str, node: &str| {
                rows.iter().any(|r| {
                    r["id"] == id
                        && r["node"] == node
                        && r["participants"].as_array().is_some_and(|p| {
                            p.len() == 2 && p.iter().all(|p| p["rtt_ms"].is_number())
                        })
                })
            };
            on(&id_a, "node-a") && on(&id_b, "node-b")
        };
        match last {
            Some(s) if shown(&s) => break (s, events),
            _ if tokio::time::Instant::now() > until => {
                anyhow::bail!("node A's dashboard never showed both calls: {last:?}")
            }
            _ => {}
        }
    };
    let o = &snapshot["overview"];
    assert_eq!(o["region"], "north", "{o}");
    assert_eq!(o["node"], "node-a", "{o}");
    let nodes: Vec<&str> = o["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b"], "{o}");
    assert_eq!(o["consultations"], 2, "{o}");
    assert_eq!(o["participants_connected"], 4, "{o}");
    for secret in ops::secrets_of(&[&on_a, &on_b]) {
        assert!(
            !captured.contains(&secret),
            "the region's feed holds {secret:?}"
        );
    }

    // Node B dies. The region's evaluator (A, or A once B's lease has run out) raises it.
    let killed = tokio::time::Instant::now();
    b.kill().await?;
    let gone = next_alert(
        &mut hooks,
        "BedsideNodeGone",
        "firing",
        Duration::from_secs(30),
    )
    .await?;
    eprintln!(
        "node gone raised {:.1} s after the kill: {}",
        killed.elapsed().as_secs_f64(),
        gone["alerts"][0]["annotations"]["summary"]
    );
    let labels = &gone["alerts"][0]["labels"];
    assert_eq!(labels["node"], "node-b", "{gone}");
    assert_eq!(labels["region"], "north", "{gone}");
    assert_eq!(labels["severity"], "critical", "{gone}");
    // It links to the evaluator's own dashboard (A's: B is dead); apart from that server
    // address nothing in it may name or locate anyone.
    assert_eq!(gone["externalURL"], a.base_url.as_str(), "{gone}");
    let mut stripped = gone.clone();
    stripped["externalURL"] = Value::Null;
    stripped["alerts"][0]["generatorURL"] = Value::Null;
    let text = stripped.to_string();
    for secret in ops::secrets_of(&[&on_a, &on_b]) {
        assert!(!text.contains(&secret), "the alert holds {secret:?}");
    }

    // A's dashboard lists it as firing, and once the dead node's view has expired (its
    // lifetime is 5 s) only A is listed.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let events = ops::read_events(&a.base_url, ADMIN_KEY, Duration::from_secs(2)).await?;
        let last = newest(&events).context("no snapshot after the kill")?;
        let firing: Vec<&str> = last["alerts_firing"]
            .as_array()
            .context("alerts_firing")?
            .iter()
            .filter_map(|a| a["labels"]["alertname"].as_str())
            .collect();
        let nodes: Vec<&str> = last["overview"]["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .filter_map(|n| n["node"].as_str())
            .collect();
        if firing.contains(&"BedsideNodeGone") && nodes == ["node-a"] {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "node A's dashboard: firing {firing:?}, nodes {nodes:?}"
        );
    }

    for p in probes_a {
        let r = p.await??;
        assert!(r.connected, "{r:?}");
    }
    for p in probes_b {
        // B's call lost its node; its probes' reports are not the point here.
        p.abort();
    }
    Ok(())
}

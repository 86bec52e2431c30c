//! Regions of the fleet (issue #13): two cells, "us" and "eu", that share nothing but the token
//! secret and the region map in their configuration. Each has its own `redis-server` and its
//! own PostgreSQL database (one PostgreSQL cluster started by the lab, two databases); "us" has
//! one node, "eu" two, each node with its bundled relay on a loopback UDP port. Real server
//! processes, real probes (client-core's WebRTC) and coturn's `turnutils_uclient` as relay
//! load. Without redis-server, haproxy, PostgreSQL or turnutils_uclient the suite skips, and
//! fails under `CI=true`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bedside_probe::{ProbeOptions, run};
use bedside_protocol::{ClientMessage, ErrorCode, JoinAuth, ServerMessage};
use bedside_tests::Client;
use bedside_tests::fleet::{
    ADMIN_KEY, Node, NodeOptions, Redis, eventually, free_port, free_udp_port, tools,
};
use bedside_tests::postgres::Postgres;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_server-under-test"))
}

fn available() -> bool {
    let uclient = std::process::Command::new("turnutils_uclient")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    let reason = match tools() {
        Err(reason) => reason,
        Ok(()) if !uclient => "coturn's turnutils_uclient is not installed".to_owned(),
        Ok(()) => return true,
    };
    bedside_tests::skip(&reason);
    false
}

/// One relay as the region map lists it: its node and its loopback UDP port.
fn relay_toml(region: &str, node: &str, port: u16) -> String {
    format!(
        "[[cluster.regions.{region}.relays]]\nnode = \"{node}\"\n\
         urls = [\"stun:127.0.0.1:{port}\", \"turn:127.0.0.1:{port}?transport=udp\"]\n"
    )
}

fn relay_urls(port: u16) -> Vec<String> {
    vec![
        format!("stun:127.0.0.1:{port}"),
        format!("turn:127.0.0.1:{port}?transport=udp"),
    ]
}

const US_TURN_SECRET: &str = "us-turn-secret-0123";
const EU_TURN_SECRET: &str = "eu-turn-secret-0123";

struct Cells {
    // Dropped in this order: the nodes stop before their Redis and database do.
    us: Node,
    eu1: Node,
    eu2: Node,
    /// The relay ports of us-1, eu-1 and eu-2.
    relays: [u16; 3],
    _redis: (Redis, Redis),
    _dir: tempfile::TempDir,
    _postgres: Postgres,
}

impl Cells {
    async fn start() -> Result<Self> {
        let postgres = Postgres::start()?;
        let us_db = postgres.create_database("region_us").await?;
        let eu_db = postgres.create_database("region_eu").await?;
        let dir = tempfile::tempdir()?;
        for d in ["redis-us", "redis-eu"] {
            std::fs::create_dir_all(dir.path().join(d))?;
        }
        let redis_us = Redis::start(&dir.path().join("redis-us")).await?;
        let redis_eu = Redis::start(&dir.path().join("redis-eu")).await?;
        let ports = [free_port()?, free_port()?, free_port()?];
        let relays = [free_udp_port()?, free_udp_port()?, free_udp_port()?];
        // eu-1, the busy relay below, is listed first: the order handed out is the load's.
        let map = format!(
            "[cluster.regions.us]\npublic-url = \"http://127.0.0.1:{}\"\n{}\
             [cluster.regions.eu]\npublic-url = \"http://127.0.0.1:{}\"\n{}{}",
            ports[0],
            relay_toml("us", "us-1", relays[0]),
            ports[1],
            relay_toml("eu", "eu-1", relays[1]),
            relay_toml("eu", "eu-2", relays[2]),
        );
        let node = |region: &str, db: &str, port: u16, relay: u16, secret: &str| NodeOptions {
            region: region.into(),
            postgres_url: db.to_owned(),
            listen_port: port,
            turn_udp_port: relay,
            turn_secret: secret.into(),
            extra_toml: map.clone(),
            ..NodeOptions::default()
        };
        let us = Node::start(
            binary(),
            dir.path(),
            "us-1",
            &redis_us,
            &node("us", &us_db, ports[0], relays[0], US_TURN_SECRET),
        )
        .await?;
        let eu1 = Node::start(
            binary(),
            dir.path(),
            "eu-1",
            &redis_eu,
            &node("eu", &eu_db, ports[1], relays[1], EU_TURN_SECRET),
        )
        .await?;
        let eu2 = Node::start(
            binary(),
            dir.path(),
            "eu-2",
            &redis_eu,
            &node("eu", &eu_db, ports[2], relays[2], EU_TURN_SECRET),
        )
        .await?;
        Ok(Cells {
            us,
            eu1,
            eu2,
            relays,
            _redis: (redis_us, redis_eu),
            _dir: dir,
            _postgres: postgres,
        })
    }
}

async fn fleet(node: &Node) -> Result<serde_json::Value> {
    Ok(reqwest::Client::new()
        .get(format!("{}/api/v1/fleet", node.base_url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// One node's entry in a `/api/v1/fleet` answer.
fn entry<'a>(fleet: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    fleet["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
}

/// The join a client that reached the wrong region sends there: `redirect` (the eu cell's
/// signaling URL), then, for clients that do not know it, `consultation_not_found` naming the
/// region, then a close.
async fn expect_redirect(client: &mut Client, to: &Node) -> Result<String> {
    let url = match client.next().await? {
        ServerMessage::Redirect {
            region,
            url,
            web_url,
        } => {
            ensure!(region == "eu", "{region}");
            ensure!(
                web_url.as_deref() == Some(to.base_url.as_str()),
                "{web_url:?}"
            );
            url
        }
        other => bail!("expected redirect, got {other:?}"),
    };
    ensure!(url == to.ws_url(), "{url} is not {}", to.ws_url());
    match client.next().await? {
        ServerMessage::Error { code, message, .. } => {
            ensure!(code == ErrorCode::ConsultationNotFound, "{code}");
            ensure!(message.contains("\"eu\""), "{message}");
        }
        other => bail!("expected the old clients' error, got {other:?}"),
    }
    ensure!(client.expect_close().await? == 1000);
    Ok(url)
}

/// Holds four allocations on a relay (coturn's load client, client to client) for `secs`.
fn relay_load(port: u16, secret: &str, secs: u64) -> Result<tokio::process::Child> {
    tokio::process::Command::new("turnutils_uclient")
        .args(["-y", "-c", "-m", "4", "-z", "20", "-n"])
        .arg((secs * 50).to_string())
        .args(["-u", "loadtest", "-W", secret, "-p"])
        .arg(port.to_string())
        .arg("127.0.0.1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting turnutils_uclient")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eu_patient_at_the_us_cell_is_redirected_admitted_in_eu_and_handed_its_least_loaded_relay()
-> Result<()> {
    if !available() {
        return Ok(());
    }
    let cells = Cells::start().await?;
    // A consultation of the eu cell: its invite code and tokens say so.
    let c = cells.eu2.create_consultation().await?;
    ensure!(c.invite_code.starts_with("EU-"), "{}", c.invite_code);
    ensure!(c.region.as_deref() == Some("eu"), "{:?}", c.region);

    // Load on eu-1's relay, published to the eu cell's Redis: eu-2's relay is now the least
    // loaded, though the map lists eu-1's first.
    let mut load = relay_load(cells.relays[1], EU_TURN_SECRET, 60)?;
    eventually(
        Duration::from_secs(15),
        "eu-1's relay load in the fleet",
        || async {
            let f = fleet(&cells.eu2).await?;
            let eu1 = entry(&f, "eu-1").cloned().unwrap_or_default();
            Ok(f["region"] == "eu"
                && eu1["relay_allocations"].as_i64() >= Some(2)
                && eu1["relayed_bps"].as_u64() > Some(0)
                && entry(&f, "eu-2").is_some()
                && entry(&f, "us-1").is_none())
        },
    )
    .await?;
    // What an autoscaler scrapes, per node, from any node of the region.
    eventually(
        Duration::from_secs(6),
        "the fleet gauges on eu-1",
        || async {
            let m = cells.eu1.metrics().await?;
            let v = |name: &str| bedside_tests::fleet::metric_value(&m, name);
            Ok(v("bedside_fleet_relay_allocations{node=\"eu-1\"}") >= 2.0
                && v("bedside_fleet_relay_bandwidth_bits_per_second{node=\"eu-1\"}") > 0.0
                && v("bedside_fleet_relay_allocations{node=\"eu-2\"}") == 0.0
                && v("bedside_cluster_relay_bandwidth_bits_per_second") > 0.0)
        },
    )
    .await?;

    // A client that knows no `redirect` (it reads on) gets a clear error and a close.
    let mut old = Client::connect(&cells.us.ws_url()).await?;
    old.send_join(JoinAuth::InviteCode {
        code: c.invite_code.clone(),
    })
    .await?;
    let url = expect_redirect(&mut old, &cells.eu1).await?;
    // A clinician's eu token is sent to eu the same way.
    let token = cells.eu2.token(&c.consultation_id.0, "clinician").await?;
    let mut clinician = Client::connect(&cells.us.ws_url()).await?;
    clinician.send_join(JoinAuth::Token { token }).await?;
    expect_redirect(&mut clinician, &cells.eu1).await?;

    // Followed by hand: admitted in eu, handed eu's relays, the least loaded (eu-2's) first.
    let mut doctor = Client::connect(&cells.eu1.ws_url()).await?;
    doctor.join_token(&c.doctor_token).await?;
    doctor.expect_type("admitted").await?;
    let mut patient = Client::connect(&url).await?;
    patient.join_invite(&c.invite_code, None).await?;
    patient.expect_type("waiting").await?;
    doctor
        .send(ClientMessage::Admit {
            participant_id: patient.id(),
        })
        .await?;
    let ServerMessage::Admitted { ice_servers, .. } = patient.expect_type("admitted").await? else {
        unreachable!()
    };
    let urls: Vec<_> = ice_servers.iter().map(|s| s.urls.clone()).collect();
    ensure!(
        urls == vec![relay_urls(cells.relays[2]), relay_urls(cells.relays[1])],
        "{urls:?}"
    );
    ensure!(
        ice_servers
            .iter()
            .all(|s| s.username.is_some() && s.credential.is_some()),
        "{ice_servers:?}"
    );
    patient.send(ClientMessage::Leave).await?;
    doctor.send(ClientMessage::Leave).await?;

    // Real clients: the patient's probe starts at the us cell with a new consultation's eu
    // invite, follows the redirect by itself, is admitted in eu and talks with the doctor
    // through the relays it was handed (relay candidates only).
    let c = cells.eu2.create_consultation().await?;
    let probe = |url: String, auth: JoinAuth, relay_only: bool| ProbeOptions {
        duration: Duration::from_secs(6),
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 320,
        height: 180,
        bitrate_kbps: 300,
        relay_only,
        ..ProbeOptions::new(url, auth)
    };
    let doctor = tokio::spawn(run(probe(
        cells.eu1.ws_url(),
        JoinAuth::Token {
            token: c.doctor_token,
        },
        false,
    )));
    let patient = tokio::spawn(run(probe(
        cells.us.ws_url(),
        JoinAuth::InviteCode {
            code: c.invite_code,
        },
        true,
    )));
    let (doctor, patient) = (doctor.await??, patient.await??);
    for (who, r) in [("doctor", &doctor), ("patient", &patient)] {
        eprintln!(
            "{who}: states {:?}, decoded {}, audio {}",
            r.states, r.video_frames_decoded, r.audio_frames_received
        );
        ensure!(r.connected, "{who}: {r:?}");
        ensure!(r.video_frames_decoded > 30, "{who}: {r:?}");
        ensure!(r.heard.is_some(), "{who}: {r:?}");
    }
    ensure!(
        patient.states.iter().any(|(_, s)| s == "Waiting"),
        "{:?}",
        patient.states
    );
    let _ = load.kill().await;

    // The us cell sent three joins away and seated nobody; eu admitted both patients.
    let us = cells.us.metrics().await?;
    let v = |m: &str, name: &str| bedside_tests::fleet::metric_value(m, name);
    ensure!(v(&us, "bedside_cluster_redirects_total") == 3.0, "{us}");
    ensure!(v(&us, "bedside_admissions_total") == 0.0, "{us}");
    ensure!(v(&us, "bedside_turn_active_allocations") == 0.0, "{us}");
    let eu1 = cells.eu1.metrics().await?;
    ensure!(v(&eu1, "bedside_admissions_total") == 2.0, "{eu1}");
    Ok(())
}

/// Invite revocation asked of a node that is not the consultation's home reaches the home's
/// waiting room: the waiting patient is told and let go, and the API counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_invites_on_another_node_empties_the_home_s_waiting_room() -> Result<()> {
    if !available() {
        return Ok(());
    }
    let cells = Cells::start().await?;
    let c = cells.eu2.create_consultation().await?;
    // The doctor homes it on eu-1; the patient waits there.
    let mut doctor = Client::connect(&cells.eu1.ws_url()).await?;
    doctor.join_token(&c.doctor_token).await?;
    let mut patient = Client::connect(&cells.eu1.ws_url()).await?;
    patient.join_invite(&c.invite_code, None).await?;
    patient.expect_type("waiting").await?;
    let revoked: serde_json::Value = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/consultations/{}/invites",
            cells.eu2.base_url, c.consultation_id.0
        ))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(revoked["revoked"] == 1, "{revoked}");
    ensure!(revoked["waiting_removed"] == 1, "{revoked}");
    ensure!(patient.expect_close().await? == 4010);
    // The invite is spent for every node of the region.
    let mut again = Client::connect(&cells.eu2.ws_url()).await?;
    again
        .send_join(JoinAuth::InviteCode {
            code: c.invite_code,
        })
        .await?;
    again.expect_error(ErrorCode::InvalidInviteCode).await?;
    Ok(())
}

//! The fleet (issue #13): `bedside-server` nodes in processes of their own sharing a real
//! `redis-server`, behind a real `haproxy`, with real probes (client-core's WebRTC) as the
//! doctor and the patient. Each test starts what it needs on loopback ports in a temporary
//! directory (`bedside_tests::fleet`). Without redis-server or haproxy the suite skips, and
//! fails under `CI=true`.
//!
//! The nodes share the region's durable store, a real PostgreSQL started by the lab: a
//! consultation is created on node B, its doctor joins on node A and its patient with the invite
//! code on node B, and the audit log read on the survivor is the whole consultation's.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use bedside_probe::{ProbeOptions, Report, run};
use bedside_protocol::{ClientMessage, JoinAuth, ServerMessage};
use bedside_tests::Client;
use bedside_tests::fleet::{Haproxy, Node, NodeOptions, Redis, eventually, tools};
use bedside_tests::postgres::Postgres;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_server-under-test"))
}

fn available() -> bool {
    match tools() {
        Ok(()) => true,
        Err(reason) => {
            bedside_tests::skip(&reason);
            false
        }
    }
}

fn probe(url: String, auth: JoinAuth, secs: u64) -> ProbeOptions {
    ProbeOptions {
        duration: Duration::from_secs(secs),
        udp_addrs: vec!["127.0.0.1:0".into()],
        width: 320,
        height: 180,
        bitrate_kbps: 300,
        ..ProbeOptions::new(url, auth)
    }
}

/// Media flowed both ways the whole call: connected, video decoded, audio heard, and no video
/// gap longer than `max_gap_ms`.
fn assert_call(who: &str, r: &Report, max_gap_ms: u64) {
    eprintln!(
        "{who}: states {:?}, reconnections {}, video gaps {:?}, decoded {}",
        r.states, r.reconnections, r.video_gaps_ms, r.video_frames_decoded
    );
    assert!(r.connected, "{who}: {r:?}");
    assert_eq!(r.ended.as_deref(), Some("Left"), "{who}: {r:?}");
    assert!(r.video_frames_decoded > 30, "{who}: {r:?}");
    assert!(r.audio_frames_received > 100, "{who}: {r:?}");
    assert!(r.heard.is_some(), "{who}: {r:?}");
    let longest = r.video_gaps_ms.iter().map(|(_, g)| *g).max().unwrap_or(0);
    assert!(
        longest <= max_gap_ms,
        "{who}: video stopped for {longest} ms: {:?}",
        r.video_gaps_ms
    );
}

/// The audit log (one, in PostgreSQL) holds the whole consultation in order, read on `node`:
/// what the first home wrote before it went, then the two resumes and the two leaves the
/// survivor saw, and no second join or admission.
async fn audit_complete(node: &Node, cid: &str) -> Result<()> {
    // The survivor writes in batches (at most 20 ms apart): the last leave may take a moment.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = node.audit(cid).await?;
        if log.iter().filter(|e| *e == "left").count() >= 2 || std::time::Instant::now() > until {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        log.get(..4),
        Some(&["created", "joined", "joined", "admitted"].map(String::from)[..]),
        "{log:?}"
    );
    let count = |k: &str| log[4..].iter().filter(|e| *e == k).count();
    assert_eq!((count("resumed"), count("left")), (2, 2), "{log:?}");
    assert_eq!(count("joined") + count("admitted"), 0, "{log:?}");
    Ok(())
}

/// The patient waited once and was never sent back to the waiting room.
fn admitted_once(r: &Report) -> bool {
    r.states.iter().filter(|(_, s)| s == "Waiting").count() == 1
}

struct Lab {
    // Dropped in this order: the nodes stop before their database does.
    a: Node,
    b: Node,
    redis: Redis,
    dir: tempfile::TempDir,
    _postgres: Postgres,
}

impl Lab {
    async fn start(mut options: NodeOptions) -> Result<Self> {
        let postgres = Postgres::start()?;
        options.postgres_url = postgres.create_database("fleet").await?;
        let dir = tempfile::tempdir()?;
        let redis = Redis::start(dir.path()).await?;
        let a = Node::start(binary(), dir.path(), "node-a", &redis, &options).await?;
        let b = Node::start(binary(), dir.path(), "node-b", &redis, &options).await?;
        Ok(Lab {
            a,
            b,
            redis,
            dir,
            _postgres: postgres,
        })
    }

    /// A consultation created on node B: its id, the doctor's token and the invite code.
    async fn consultation(&self) -> Result<(String, String, String)> {
        let c = self.b.create_consultation().await?;
        Ok((c.consultation_id.0, c.doctor_token, c.invite_code))
    }
}

/// Starts the doctor's probe on `doctor_url`, waits until node A seated it, then the patient's
/// on `patient_url`; both stay `secs` after connecting.
async fn call(
    lab: &Lab,
    doctor_url: String,
    patient_url: String,
    secs: u64,
) -> Result<(
    String,
    tokio::task::JoinHandle<Result<Report>>,
    tokio::task::JoinHandle<Result<Report>>,
)> {
    let (cid, doctor_token, invite_code) = lab.consultation().await?;
    let doctor = tokio::spawn(run(probe(
        doctor_url,
        JoinAuth::Token {
            token: doctor_token,
        },
        secs,
    )));
    eventually(
        Duration::from_secs(10),
        "the doctor seated on node A",
        || async { Ok(lab.a.metric("bedside_participants_connected").await? >= 1.0) },
    )
    .await?;
    let patient = tokio::spawn(run(probe(
        patient_url,
        JoinAuth::InviteCode { code: invite_code },
        secs,
    )));
    eventually(
        Duration::from_secs(15),
        "the admission on node A",
        || async { Ok(lab.a.metric("bedside_admissions_total").await? >= 1.0) },
    )
    .await?;
    Ok((cid, doctor, patient))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doctor_on_one_node_admits_a_patient_on_another_and_they_talk() -> Result<()> {
    if !available() {
        return Ok(());
    }
    let lab = Lab::start(NodeOptions::default()).await?;
    let (_, doctor, patient) = call(&lab, lab.a.ws_url(), lab.b.ws_url(), 6).await?;
    // Mid-call, either node lists the region: A homes the consultation, B holds the patient's
    // link (and A the doctor's and the relayed one).
    eventually(Duration::from_secs(8), "/api/v1/fleet", || async {
        let fleet: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/fleet", lab.b.base_url))
            .bearer_auth(bedside_tests::fleet::ADMIN_KEY)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let nodes = fleet["nodes"].as_array().cloned().unwrap_or_default();
        let field = |i: usize, f: &str| nodes.get(i).and_then(|n| n[f].as_i64());
        Ok(fleet["node"] == "node-b"
            && nodes.len() == 2
            && nodes[0]["node"] == "node-a"
            && field(0, "consultations") == Some(1)
            && field(1, "consultations") == Some(0)
            && field(1, "connections") == Some(1))
    })
    .await?;
    let (doctor, patient) = (doctor.await??, patient.await??);
    assert_call("doctor", &doctor, 1000);
    assert_call("patient", &patient, 1000);
    assert_eq!(doctor.heard.as_deref(), Some("patient"));
    assert_eq!(patient.heard.as_deref(), Some("doctor"));
    assert!(admitted_once(&patient), "{:?}", patient.states);
    // The patient's link was relayed by B to the consultation's home, A.
    assert!(lab.b.metric("bedside_cluster_relayed_links_total").await? >= 1.0);
    assert_eq!(
        lab.b
            .metric("bedside_joins_total{role=\"patient\"}")
            .await?,
        0.0
    );
    assert_eq!(
        lab.a
            .metric("bedside_joins_total{role=\"patient\"}")
            .await?,
        1.0
    );
    Ok(())
}

/// Kill -9 of the consultation's home mid-call: the doctor (on A) and the patient (relayed by
/// B) both resume on B through the load balancer, in the same seats, with no re-admission,
/// while the peer-to-peer media goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_call_loses_no_consultation() -> Result<()> {
    if !available() {
        return Ok(());
    }
    let mut lab = Lab::start(NodeOptions::default()).await?;
    let lb = Haproxy::start(lab.dir.path(), &[&lab.a, &lab.b]).await?;
    let (cid, doctor, patient) = call(&lab, lb.ws_url(0), lb.ws_url(1), 14).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    lab.a.kill().await?;
    eventually(
        Duration::from_secs(10),
        "both seats resumed on B",
        || async { Ok(lab.b.metric("bedside_resumes_total{result=\"ok\"}").await? >= 2.0) },
    )
    .await?;
    let (doctor, patient) = (doctor.await??, patient.await??);
    assert_call("doctor", &doctor, 1000);
    assert_call("patient", &patient, 1000);
    assert!(admitted_once(&patient), "{:?}", patient.states);
    // No one was admitted again, no seat was lost or taken anew on the survivor.
    assert_eq!(lab.b.metric("bedside_admissions_total").await?, 0.0);
    assert_eq!(
        lab.b
            .metric("bedside_joins_total{role=\"patient\"}")
            .await?,
        0.0
    );
    assert_eq!(
        lab.b.metric("bedside_joins_total{role=\"doctor\"}").await?,
        0.0
    );
    assert_eq!(
        lab.b
            .metric("bedside_resumes_total{result=\"expired\"}")
            .await?,
        0.0
    );
    audit_complete(&lab.b, &cid).await?;
    drop(lb);
    Ok(())
}

/// A graceful stop (SIGTERM) of the home hands the consultation over: both participants resume
/// on the other node and the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_hands_its_consultations_over() -> Result<()> {
    if !available() {
        return Ok(());
    }
    let mut lab = Lab::start(NodeOptions::default()).await?;
    let lb = Haproxy::start(lab.dir.path(), &[&lab.a, &lab.b]).await?;
    let (cid, doctor, patient) = call(&lab, lb.ws_url(0), lb.ws_url(1), 12).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = lab.a.terminate(Duration::from_secs(15)).await?;
    ensure!(status.success(), "node A exited with {status}");
    eventually(
        Duration::from_secs(10),
        "both seats resumed on B",
        || async { Ok(lab.b.metric("bedside_resumes_total{result=\"ok\"}").await? >= 2.0) },
    )
    .await?;
    let (doctor, patient) = (doctor.await??, patient.await??);
    assert_call("doctor", &doctor, 1000);
    assert_call("patient", &patient, 1000);
    assert!(admitted_once(&patient), "{:?}", patient.states);
    assert_eq!(lab.b.metric("bedside_admissions_total").await?, 0.0);
    audit_complete(&lab.b, &cid).await?;
    drop(lb);
    Ok(())
}

/// Nobody comes back after their node died: a survivor takes the consultation over and
/// releases the seats when the rejoin window passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_whose_node_died_is_released_after_the_window_by_a_survivor() -> Result<()> {
    if !available() {
        return Ok(());
    }
    let mut lab = Lab::start(NodeOptions {
        rejoin_window_secs: 3,
        ..NodeOptions::default()
    })
    .await?;
    let (_, doctor_token, invite_code) = lab.consultation().await?;
    let mut doctor = Client::connect(&lab.a.ws_url()).await?;
    doctor.join_token(&doctor_token).await?;
    // A waiting patient, relayed by B: the waiting room is lost with no one either.
    let mut patient = Client::connect(&lab.b.ws_url()).await?;
    patient.join_invite(&invite_code, None).await?;
    patient.expect_type("waiting").await?;
    lab.a.kill().await?;
    // B's watchdog closes the relayed link (the client would resume); this one does not.
    drop(patient);
    drop(doctor);
    eventually(
        Duration::from_secs(15),
        "both seats released by B",
        || async { Ok(lab.b.metric("bedside_seats_timed_out_total").await? >= 2.0) },
    )
    .await?;
    eventually(
        Duration::from_secs(5),
        "no consultation left on B",
        || async { Ok(lab.b.metric("bedside_consultations_active").await? == 0.0) },
    )
    .await?;
    Ok(())
}

/// Redis killed and started again (empty) mid-call: the call goes on, `/readyz` says so while
/// it is away, and a new consultation across the two nodes works after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_call_the_call_goes_on() -> Result<()> {
    if !available() {
        return Ok(());
    }
    let mut lab = Lab::start(NodeOptions::default()).await?;
    let (_, doctor, patient) = call(&lab, lab.a.ws_url(), lab.b.ws_url(), 10).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.redis.kill().await?;
    eventually(Duration::from_secs(5), "/readyz naming redis", || async {
        let (ok, body) = lab.a.ready().await?;
        Ok(!ok && body.contains("redis"))
    })
    .await?;
    assert_eq!(lab.a.metric("bedside_cluster_redis_up").await?, 0.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.redis.start_again().await?;
    for node in [&lab.a, &lab.b] {
        eventually(Duration::from_secs(10), "ready again", || async {
            Ok(node.ready().await?.0)
        })
        .await?;
    }
    let (doctor, patient) = (doctor.await??, patient.await??);
    assert_call("doctor", &doctor, 1000);
    assert_call("patient", &patient, 1000);

    // After: a new consultation, doctor on A, patient on B, admitted across the nodes.
    let (_, doctor_token, invite_code) = lab.consultation().await?;
    let mut doctor = Client::connect(&lab.a.ws_url()).await?;
    doctor.join_token(&doctor_token).await?;
    let mut patient = Client::connect(&lab.b.ws_url()).await?;
    patient.join_invite(&invite_code, None).await?;
    patient.expect_type("waiting").await?;
    let waiting = loop {
        if let ServerMessage::WaitingRoom { waiting } = doctor.expect_type("waiting_room").await?
            && let Some(w) = waiting.first()
        {
            break w.participant_id.clone();
        }
    };
    doctor
        .send(ClientMessage::Admit {
            participant_id: waiting,
        })
        .await?;
    patient.expect_type("admitted").await?;
    doctor.expect_type("peer_joined").await?;
    Ok(())
}

//! Signaling capacity bench: N concurrent consultations (doctor + patient, both admitted, an offer
//! and answer exchanged) against a `bedside-server` running as its own process, so that its RSS
//! is measured apart from the load generator's.
//!
//! Phases: create N consultations over the API; open most of them at a steady pace;
//! then a storm of `--storm-joins` joins (half doctors, half patients) at once, timing each
//! patient's join→admitted;
//! then hold everything (clients keep answering the server's keepalive pings) and read the
//! server's RSS.
//!
//! `cargo xtask bench-signaling` builds it in release and runs it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_client_core::signaling::{Incoming, SignalingConnection};
use bedside_protocol::{ClientMessage, JoinAuth, PROTOCOL_VERSION, ServerMessage};
use bedside_server::api::CreatedConsultation;
use clap::Parser;
use tokio::sync::{Semaphore, watch};

#[derive(Parser, Debug)]
struct Args {
    /// Consultations held at once (two WebSockets each).
    #[arg(long, default_value_t = 9_900)]
    consultations: usize,
    /// How many joins (two per consultation: doctor and patient) arrive in one storm, all at
    /// once, at the end.
    #[arg(long, default_value_t = 5_000)]
    storm_joins: usize,
    /// The server binary (a release build).
    #[arg(long, default_value = "target/release/bedside-server")]
    server: PathBuf,
    /// How long to hold every connection before reading the server's RSS.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
}

const ADMIN_KEY: &str = "bench-admin-key-0123456789";

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// One consultation: the doctor joins, the patient joins and is admitted, offer and answer are
/// exchanged. Returns the patient's join→admitted time and both connections, still open.
/// Connects from a loopback source address chosen by `n`. Twenty thousand connections from one
/// source address to one port make the kernel's ephemeral-port search the load generator's main
/// cost (76% of its CPU, measured with perf); spreading them over 127.0.0.2-201 removes it.
async fn connect(
    ws_url: &str,
    server: std::net::SocketAddr,
    n: usize,
) -> Result<SignalingConnection> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((
        [127, 0, 0, 2 + (n % 200) as u8],
        0,
    )))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(SignalingConnection::connect_over(ws_url, stream, None).await?)
}

async fn consult(
    ws_url: &str,
    server: std::net::SocketAddr,
    n: usize,
    c: &CreatedConsultation,
) -> Result<(Duration, SignalingConnection, SignalingConnection)> {
    let step = Duration::from_secs(30);
    let mut doctor = connect(ws_url, server, 2 * n).await?;
    doctor
        .send(&ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth: JoinAuth::Token {
                token: c.doctor_token.clone(),
            },
            display_name: None,
        })
        .await?;
    let doctor_id = loop {
        match doctor.recv_timeout(step).await? {
            Incoming::Message(ServerMessage::Joined { participant_id, .. }) => {
                break participant_id;
            }
            Incoming::Message(_) => {}
            other => bail!("doctor: {other:?}"),
        }
    };
    let mut patient = connect(ws_url, server, 2 * n + 1).await?;
    let started = Instant::now();
    patient
        .send(&ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth: JoinAuth::InviteCode {
                code: c.invite_code.clone(),
            },
            display_name: Some("Bench".into()),
        })
        .await?;
    // The doctor admits whoever shows up in the waiting room.
    let patient_id = loop {
        match doctor.recv_timeout(step).await? {
            Incoming::Message(ServerMessage::WaitingRoom { waiting }) if !waiting.is_empty() => {
                break waiting[0].participant_id.clone();
            }
            Incoming::Message(_) => {}
            other => bail!("doctor: {other:?}"),
        }
    };
    doctor
        .send(&ClientMessage::Admit {
            participant_id: patient_id,
        })
        .await?;
    loop {
        match patient.recv_timeout(step).await? {
            Incoming::Message(ServerMessage::Admitted { .. }) => break,
            Incoming::Message(ServerMessage::Error { code, .. }) => bail!("patient: {code}"),
            Incoming::Message(_) => {}
            other => bail!("patient: {other:?}"),
        }
    }
    let latency = started.elapsed();
    patient
        .send(&ClientMessage::Offer {
            to: doctor_id,
            sdp: "v=0\r\n".repeat(200),
        })
        .await?;
    let patient_id = loop {
        match doctor.recv_timeout(step).await? {
            Incoming::Message(ServerMessage::Offer { from, .. }) => break from,
            Incoming::Message(_) => {}
            other => bail!("doctor: {other:?}"),
        }
    };
    doctor
        .send(&ClientMessage::Answer {
            to: patient_id,
            sdp: "v=0\r\n".repeat(200),
        })
        .await?;
    loop {
        match patient.recv_timeout(step).await? {
            Incoming::Message(ServerMessage::Answer { .. }) => break,
            Incoming::Message(_) => {}
            other => bail!("patient: {other:?}"),
        }
    }
    Ok((latency, doctor, patient))
}

/// Keeps a connection read (so keepalive pings are answered) until `stop`.
async fn hold(mut conn: SignalingConnection, mut stop: watch::Receiver<bool>) -> bool {
    loop {
        tokio::select! {
            _ = stop.changed() => return true,
            incoming = conn.recv() => match incoming {
                Ok(Incoming::Message(_)) => {}
                _ => return false,
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let limit = bedside_tests::raise_fd_limit();
    let needed = args.consultations as u64 * 2 + 64;
    if limit < needed {
        bail!("open-files limit is {limit}, {needed} needed: lower --consultations");
    }
    let storm = args.storm_joins / 2;
    if storm > args.consultations {
        bail!("--storm-joins must not exceed twice --consultations");
    }
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
             invite-attempts-per-minute = 1000000\n\
             [limits]\nmax-connections-per-source = 1000000\n",
            dir.path().join("data").display()
        ),
    )?;
    let (mut server, base) = bedside_tests::spawn_server_process(&args.server, &config).await?;
    let pid = server.id().context("server pid")?;
    let ws_url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let server_addr: std::net::SocketAddr = base.trim_start_matches("http://").parse()?;
    println!(
        "server pid {pid} at {base}; {} consultations ({} WebSockets), storm of {}",
        args.consultations,
        args.consultations * 2,
        storm * 2
    );

    // 1. Consultations over the API.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()?;
    let t = Instant::now();
    let sem = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..args.consultations {
        let (http, base, sem) = (http.clone(), base.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let resp = http
                .post(format!("{base}/api/v1/consultations"))
                .bearer_auth(ADMIN_KEY)
                .send()
                .await?;
            anyhow::Ok(
                resp.error_for_status()?
                    .json::<CreatedConsultation>()
                    .await?,
            )
        }));
    }
    let mut consultations = Vec::new();
    for t in tasks {
        consultations.push(t.await??);
    }
    drop(http);
    println!(
        "created {} consultations in {:.1} s",
        consultations.len(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut holders = Vec::new();
    let spawn_all = |batch: Vec<(usize, CreatedConsultation)>, limit: Option<Arc<Semaphore>>| {
        let mut tasks = Vec::new();
        for (n, c) in batch {
            let (ws_url, limit) = (ws_url.clone(), limit.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = match &limit {
                    Some(s) => Some(s.clone().acquire_owned().await?),
                    None => None,
                };
                consult(&ws_url, server_addr, n, &c).await
            }));
        }
        tasks
    };

    // 2. The steady part.
    let mut consultations: Vec<_> = consultations.into_iter().enumerate().collect();
    let steady: Vec<_> = consultations.drain(storm..).collect();
    let t = Instant::now();
    let n_steady = steady.len();
    for task in spawn_all(steady, Some(Arc::new(Semaphore::new(200)))) {
        let (_, d, p) = task.await??;
        holders.push(tokio::spawn(hold(d, stop_rx.clone())));
        holders.push(tokio::spawn(hold(p, stop_rx.clone())));
    }
    if n_steady > 0 {
        println!(
            "steady: {n_steady} consultations in {:.1} s ({:.0} joins/s)",
            t.elapsed().as_secs_f64(),
            2.0 * n_steady as f64 / t.elapsed().as_secs_f64()
        );
    }

    // 3. The storm: every remaining consultation at once.
    let cpu_before_storm = bedside_tests::process_cpu_time(pid)?;
    let me = std::process::id();
    let own_cpu_before_storm = bedside_tests::process_cpu_time(me)?;
    let t = Instant::now();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in spawn_all(consultations, None) {
        match task.await? {
            Ok((latency, d, p)) => {
                latencies.push(latency);
                holders.push(tokio::spawn(hold(d, stop_rx.clone())));
                holders.push(tokio::spawn(hold(p, stop_rx.clone())));
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 {
                    eprintln!("storm consultation failed: {e:#}");
                }
            }
        }
    }
    let storm_secs = t.elapsed().as_secs_f64();
    let storm_cpu = bedside_tests::process_cpu_time(pid)? - cpu_before_storm;
    let own_storm_cpu = bedside_tests::process_cpu_time(me)? - own_cpu_before_storm;
    latencies.sort();

    // 4. Hold everything, then measure.
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_after = rss_kib(pid)?;
    let connections = holders.len();
    let _ = stop_tx.send(true);
    let mut alive = 0;
    for h in holders {
        if h.await? {
            alive += 1;
        }
    }
    let _ = server.start_kill();

    println!();
    println!("consultations held at once:   {}", connections / 2);
    println!("WebSockets held at once:      {connections} (still open after hold: {alive})");
    println!(
        "storm joins:                  {} ({failures} failed)",
        latencies.len() * 2
    );
    println!(
        "storm join->admitted latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "storm joins per second:       {:.0}",
        (latencies.len() * 2) as f64 / storm_secs
    );
    println!(
        "server CPU per storm join:    {:.0} us (connect, join, admit, offer/answer relay)",
        storm_cpu.as_secs_f64() * 1e6 / (latencies.len() * 2).max(1) as f64
    );
    println!(
        "storm CPU, server and bench:  {:.2} s and {:.2} s over {:.2} s of wall time on {} cores",
        storm_cpu.as_secs_f64(),
        own_storm_cpu.as_secs_f64(),
        storm_secs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "server RSS:                   {:.1} MiB before, {:.1} MiB holding",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "server RSS per connection:    {:.1} KiB",
        (rss_after.saturating_sub(rss_before)) as f64 / connections.max(1) as f64
    );
    if failures > 0 || alive != connections {
        bail!(
            "{failures} storm consultations failed, {} connections dropped",
            connections - alive
        );
    }
    Ok(())
}

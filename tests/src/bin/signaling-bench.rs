//! Signaling bench: join latency and rate beside a bare tokio-tungstenite echo server, then N
//! concurrent consultations (doctor + patient, both admitted, an offer and answer exchanged)
//! held against a `bedside-server` running as its own process, so that its RSS and CPU are
//! measured apart from the load generator's.
//!
//! Each patient's join is timed twice: from its first SYN (the timer starts before the TCP
//! connect, so listen-queue overflows and SYN retransmits count) and from its `join` (sent on
//! an open WebSocket) to `admitted`. Two load shapes, each also run against the echo anchor
//! (connect, handshake, one `join`-sized frame echoed):
//! - bounded: `--bounded-joins` joins with at most `--in-flight` (128) consultations being set
//!   up at once;
//! - storm: `--storm-joins` joins all at once, at the end, while the rest are held.
//!
//! Then everything is held for `--hold-secs` and the server's CPU measured while idle: what it
//! spends keeping 2 x N links alive (keepalive), beside its idle CPU with no links.
//!
//! `cargo xtask bench-signaling` builds it in release and runs it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_client_core::signaling::{Incoming, SignalingConnection};
use bedside_server::api::CreatedConsultation;
use bedside_tests::bench::{self, Secrets, Target, p50_p99};
use clap::Parser;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, watch};

#[derive(Parser, Debug)]
struct Args {
    /// Consultations held at once (two WebSockets each).
    #[arg(long, default_value_t = 9_900)]
    consultations: usize,
    /// Joins (two per consultation: doctor and patient) that arrive in one storm, all at
    /// once, at the end.
    #[arg(long, default_value_t = 5_000)]
    storm_joins: usize,
    /// Joins in the bounded phase, first.
    #[arg(long, default_value_t = 5_000)]
    bounded_joins: usize,
    /// Consultations being set up at once in the bounded phase.
    #[arg(long, default_value_t = 128)]
    in_flight: usize,
    /// The server binary (a release build).
    #[arg(long, default_value = "target/release/bedside-server")]
    server: PathBuf,
    /// How long to hold every connection, measuring the server's idle CPU, before reading its
    /// RSS.
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
    /// The server's `keepalive-interval-secs` (its default if not given).
    #[arg(long)]
    keepalive_interval_secs: Option<u64>,
    /// The server's `keepalive-timeout-secs` (its default if not given).
    #[arg(long)]
    keepalive_timeout_secs: Option<u64>,
    /// Skip the echo anchor.
    #[arg(long)]
    no_echo: bool,
    /// Run as the echo anchor (the bench starts itself so).
    #[arg(long, hide = true)]
    echo_server: bool,
}

const ADMIN_KEY: &str = "bench-admin-key-0123456789";

/// One timed phase.
#[derive(Default)]
struct Phase {
    syn: Vec<Duration>,
    join: Vec<Duration>,
    joins: usize,
    secs: f64,
    cpu: Duration,
    overflows: u64,
    failures: usize,
}

/// What a phase costs: wall time, the measured process's CPU and the host's listen overflows
/// from `start` to `end`.
struct Meter {
    pid: u32,
    started: Instant,
    cpu: Duration,
    overflows: u64,
}

impl Meter {
    fn start(pid: u32) -> Result<Self> {
        Ok(Meter {
            pid,
            overflows: bench::listen_overflows(),
            cpu: bedside_tests::process_cpu_time(pid)?,
            started: Instant::now(),
        })
    }

    /// Fills in `phase`'s costs and sorts its timings.
    fn end(self, phase: &mut Phase) -> Result<()> {
        phase.secs = self.started.elapsed().as_secs_f64();
        phase.cpu = bedside_tests::process_cpu_time(self.pid)? - self.cpu;
        phase.overflows = bench::listen_overflows().saturating_sub(self.overflows);
        phase.syn.sort();
        phase.join.sort();
        Ok(())
    }
}

impl Phase {
    /// Counts a failure, printing the first three.
    fn failed(&mut self, what: &str, e: &anyhow::Error) {
        self.failures += 1;
        if self.failures <= 3 {
            eprintln!("{what}: {e:#}");
        }
    }

    fn rate(&self) -> f64 {
        self.joins as f64 / self.secs.max(1e-9)
    }

    fn cpu_per_join_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.joins.max(1) as f64
    }
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

/// A process's CPU over an idle `span`, as a share of one core.
async fn idle_cpu(pid: u32, span: Duration) -> Result<f64> {
    let before = bedside_tests::process_cpu_time(pid)?;
    let t = Instant::now();
    tokio::time::sleep(span).await;
    let used = bedside_tests::process_cpu_time(pid)? - before;
    Ok(used.as_secs_f64() / t.elapsed().as_secs_f64())
}

/// Runs `batch` consultations on `target`, at most `limit` at once (all at once if `None`),
/// timing each patient's join. The links are kept in `holders`.
async fn consultations(
    target: &Target,
    pid: u32,
    batch: Vec<(usize, Secrets)>,
    limit: Option<usize>,
    holders: &mut Vec<tokio::task::JoinHandle<bool>>,
    stop: &watch::Receiver<bool>,
) -> Result<Phase> {
    let limit = limit.map(|n| Arc::new(Semaphore::new(n)));
    let mut phase = Phase::default();
    let meter = Meter::start(pid)?;
    let mut tasks = Vec::new();
    for (n, c) in batch {
        let (target, limit) = (target.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = match &limit {
                Some(s) => Some(s.clone().acquire_owned().await?),
                None => None,
            };
            bench::consult(&target, &target, n, &c).await
        }));
    }
    for task in tasks {
        match task.await? {
            Ok(done) => {
                phase.syn.push(done.syn_to_admitted);
                phase.join.push(done.join_to_admitted);
                phase.joins += 2;
                holders.push(tokio::spawn(hold(done.doctor, stop.clone())));
                holders.push(tokio::spawn(hold(done.patient, stop.clone())));
            }
            Err(e) => phase.failed("consultation failed", &e),
        }
    }
    meter.end(&mut phase)?;
    Ok(phase)
}

/// `joins` joins against the echo anchor, at most `limit` at once; the links stay open until
/// the phase ends.
async fn echo_phase(
    target: &Target,
    pid: u32,
    joins: usize,
    limit: Option<usize>,
) -> Result<Phase> {
    let limit = limit.map(|n| Arc::new(Semaphore::new(n)));
    let mut phase = Phase::default();
    let meter = Meter::start(pid)?;
    let mut tasks = Vec::new();
    for n in 0..joins {
        let (target, limit) = (target.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = match &limit {
                Some(s) => Some(s.clone().acquire_owned().await?),
                None => None,
            };
            bench::echo_join(&target, n).await
        }));
    }
    let mut links = Vec::new();
    for task in tasks {
        match task.await? {
            Ok((syn, join, ws)) => {
                phase.syn.push(syn);
                phase.join.push(join);
                phase.joins += 1;
                links.push(ws);
            }
            Err(e) => phase.failed("echo join failed", &e),
        }
    }
    meter.end(&mut phase)?;
    drop(links);
    // Let the closes drain before the next phase.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(phase)
}

/// The echo anchor in a process of its own (this binary with `--echo-server`).
async fn start_echo() -> Result<(tokio::process::Child, Target)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--echo-server")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = lines.next_line().await?.context("the echo server exited")?;
    let url = line
        .strip_prefix("listening on ")
        .context("echo server line")?;
    let addr = url.trim_start_matches("ws://").parse()?;
    Ok((
        child,
        Target {
            ws_url: url.to_owned(),
            addr,
        },
    ))
}

fn row(name: &str, cells: [String; 4]) {
    println!(
        "{name:<34} {:>16} {:>16} {:>16} {:>16}",
        cells[0], cells[1], cells[2], cells[3]
    );
}

fn table(title: &str, server: [&Phase; 2], echo: [Option<&Phase>; 2]) {
    let e = |p: Option<&Phase>, f: &dyn Fn(&Phase) -> String| p.map_or("-".into(), f);
    println!();
    println!("{title}");
    row(
        "",
        [
            "bounded: server".into(),
            "echo".into(),
            "storm: server".into(),
            "echo".into(),
        ],
    );
    let cells =
        |f: &dyn Fn(&Phase) -> String| [f(server[0]), e(echo[0], f), f(server[1]), e(echo[1], f)];
    row(
        "joins (failed)",
        cells(&|p| format!("{} ({})", p.joins, p.failures)),
    );
    row(
        "first SYN -> admitted p50 / p99 ms",
        cells(&|p| p50_p99(&p.syn)),
    );
    row(
        "join -> admitted p50 / p99 ms",
        cells(&|p| p50_p99(&p.join)),
    );
    row(
        "max first SYN -> admitted ms",
        cells(&|p| {
            format!(
                "{:.1}",
                p.syn.last().copied().unwrap_or_default().as_secs_f64() * 1e3
            )
        }),
    );
    row("joins per second", cells(&|p| format!("{:.0}", p.rate())));
    row(
        "server CPU per join us",
        cells(&|p| format!("{:.0}", p.cpu_per_join_us())),
    );
    row(
        "listen overflows (whole host)",
        cells(&|p| p.overflows.to_string()),
    );
    println!(
        "(echo: connect, handshake and one join-sized frame echoed per join; server: the \
         patient's join, timed to admitted, and the doctor's, each a join)"
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.echo_server {
        return bench::echo_server().await;
    }
    let limit = bedside_tests::raise_fd_limit();
    let needed = args.consultations as u64 * 2 + 64;
    if limit < needed {
        bail!("open-files limit is {limit}, {needed} needed: lower --consultations");
    }
    let (storm, bounded) = (args.storm_joins / 2, args.bounded_joins / 2);
    if storm + bounded > args.consultations {
        bail!("--storm-joins plus --bounded-joins must not exceed twice --consultations");
    }
    let load = bench::load_average();

    // 0. The echo anchor, alone on the machine's loopback.
    let (echo_bounded, echo_storm) = if args.no_echo {
        (None, None)
    } else {
        let (echo, target) = start_echo().await?;
        let pid = echo.id().context("echo pid")?;
        let b = echo_phase(&target, pid, 2 * bounded, Some(args.in_flight)).await?;
        let s = echo_phase(&target, pid, 2 * storm, None).await?;
        drop(echo);
        (Some(b), Some(s))
    };

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    let mut keepalive = String::new();
    if let Some(s) = args.keepalive_interval_secs {
        keepalive.push_str(&format!("keepalive-interval-secs = {s}\n"));
    }
    if let Some(s) = args.keepalive_timeout_secs {
        keepalive.push_str(&format!("keepalive-timeout-secs = {s}\n"));
    }
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
             invite-attempts-per-minute = 1000000\n{keepalive}\
             [turn]\nenabled = false\n\
             [limits]\nmax-connections = 1000000\nmax-connections-per-source = 1000000\n",
            dir.path().join("data").display()
        ),
    )?;
    let (mut server, base) = bedside_tests::spawn_server_process(&args.server, &config).await?;
    let pid = server.id().context("server pid")?;
    let target = Target::of_base(&base)?;
    println!(
        "server pid {pid} at {base}; {} consultations ({} WebSockets): {} joins bounded at {} in \
         flight, a storm of {}; load average {load}",
        args.consultations,
        args.consultations * 2,
        bounded * 2,
        args.in_flight,
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
    let mut created = Vec::new();
    for t in tasks {
        let c = t.await??;
        created.push(Secrets {
            doctor_token: c.doctor_token,
            invite_code: c.invite_code,
        });
    }
    drop(http);
    println!(
        "created {} consultations in {:.1} s",
        created.len(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_empty = idle_cpu(pid, Duration::from_secs(args.hold_secs.min(5))).await?;
    let rss_before = bench::rss_kib(pid)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut holders = Vec::new();
    let mut items: Vec<_> = created.into_iter().enumerate().collect();

    // 2. Bounded: at most `in_flight` consultations being set up at once.
    let first: Vec<_> = items.drain(..bounded).collect();
    let bounded_phase = consultations(
        &target,
        pid,
        first,
        Some(args.in_flight),
        &mut holders,
        &stop_rx,
    )
    .await?;

    // 3. The steady fill, up to the storm.
    let fill: Vec<_> = items.drain(..items.len() - storm).collect();
    let n_fill = fill.len();
    let fill_phase = consultations(&target, pid, fill, Some(200), &mut holders, &stop_rx).await?;
    if n_fill > 0 {
        println!(
            "fill: {n_fill} consultations in {:.1} s ({:.0} joins/s, 200 in flight)",
            fill_phase.secs,
            fill_phase.rate()
        );
    }

    // 4. The storm: every remaining consultation at once.
    let me = std::process::id();
    let own_cpu = bedside_tests::process_cpu_time(me)?;
    let storm_phase = consultations(&target, pid, items, None, &mut holders, &stop_rx).await?;
    let own_storm_cpu = bedside_tests::process_cpu_time(me)? - own_cpu;

    // 5. Hold everything: the server's idle CPU is its keepalive, then its RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_holding = idle_cpu(pid, Duration::from_secs(args.hold_secs)).await?;
    let rss_after = bench::rss_kib(pid)?;
    let connections = holders.len();
    let _ = stop_tx.send(true);
    let mut alive = 0;
    for h in holders {
        if h.await? {
            alive += 1;
        }
    }
    let _ = server.start_kill();

    table(
        &format!("Joins (load average {load} at the start)"),
        [&bounded_phase, &storm_phase],
        [echo_bounded.as_ref(), echo_storm.as_ref()],
    );
    println!();
    println!("consultations held at once:   {}", connections / 2);
    println!("WebSockets held at once:      {connections} (still open after hold: {alive})");
    println!(
        "storm CPU, server and bench:  {:.2} s and {:.2} s over {:.2} s of wall time on {} cores",
        storm_phase.cpu.as_secs_f64(),
        own_storm_cpu.as_secs_f64(),
        storm_phase.secs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "server idle CPU:              {:.1}% of a core with no links, {:.1}% holding {connections} \
         ({:.2} us per link-second; keepalive {}/{} s)",
        idle_empty * 100.0,
        idle_holding * 100.0,
        (idle_holding - idle_empty).max(0.0) * 1e6 / connections.max(1) as f64,
        args.keepalive_interval_secs
            .map_or("default".into(), |s| s.to_string()),
        args.keepalive_timeout_secs
            .map_or("default".into(), |s| s.to_string()),
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
    println!("load average at the end:      {}", bench::load_average());
    let failures = bounded_phase.failures + fill_phase.failures + storm_phase.failures;
    if failures > 0 || alive != connections {
        bail!(
            "{failures} consultations failed, {} connections dropped",
            connections - alive
        );
    }
    Ok(())
}

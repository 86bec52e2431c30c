//! Fleet bench (`cargo xtask bench-fleet`, issue #13): two `bedside-server` nodes sharing a
//! real Redis and PostgreSQL, behind real HAProxy, beside one node with no Redis (SQLite), in
//! the same run.
//!
//! Every process here is capped at 20,000 open files, so the load is spread over several
//! client processes (this binary with `--client`, driven over its stdin and stdout), and a
//! proxied connection costs HAProxy two descriptors: two HAProxy processes share the proxied
//! load. For each setup:
//! 1. capacity: consultations (doctor and patient admitted, offer and answer exchanged) opened
//!    on the nodes directly, in turn (as DNS round robin or an L4 balancer would: a doctor and
//!    their patient land on the same node or on different ones with equal odds), up to the
//!    storm;
//! 2. storm: the last `--storm-joins` joins at once through HAProxy (round robin, no
//!    stickiness), each patient timed from its first SYN and from its `join` to `admitted`;
//! 3. hold: RSS per connection per node, and Redis commands per join (`INFO commandstats`
//!    deltas, the nodes' own background rate beside them).
//!
//! Then, for the fleet only, failover: a fresh fleet holds `--failover-consultations` through
//! HAProxy, one node is killed with SIGKILL, and every client whose link drops resumes its seat
//! with its resume token through HAProxy: the share of them back within the rejoin window and
//! the time to resume (from the drop the client saw to `joined` with `resumed`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_client_core::signaling::{Incoming, SignalingConnection};
use bedside_server::api::CreatedConsultation;
use bedside_tests::bench::{self, Secrets, Target, p50_p99};
use bedside_tests::fleet::{Redis, free_port, metric_value, run_haproxy};
use bedside_tests::postgres::Postgres;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
struct Args {
    /// Consultations the two-node fleet holds at once (two WebSockets each).
    #[arg(long, default_value_t = 10_000)]
    consultations: usize,
    /// Consultations the single node holds (its 20,000 open files fit about 9,900).
    #[arg(long, default_value_t = 9_900)]
    single_consultations: usize,
    /// Joins in the storm through HAProxy (two per consultation), part of those held.
    #[arg(long, default_value_t = 5_000)]
    storm_joins: usize,
    /// Consultations held through HAProxy when a node is killed.
    #[arg(long, default_value_t = 5_000)]
    failover_consultations: usize,
    /// Client processes the load is spread over.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// The server binary (a release build).
    #[arg(long, default_value = "target/release/bedside-server")]
    server: PathBuf,
    #[arg(long, default_value_t = 60)]
    rejoin_window_secs: u64,
    /// How long everything is held before the RSS is read.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    #[arg(long)]
    skip_single: bool,
    #[arg(long)]
    skip_failover: bool,
    /// Run as a client process (the bench starts itself so).
    #[arg(long, hide = true)]
    client: bool,
}

const ADMIN_KEY: &str = "fleet-bench-admin-key-0123";
const TOKEN_SECRET: &str = "fleet-bench-token-secret-0123";

/// One consultation for a client process: its secrets, where each participant connects, and
/// where a dropped link resumes (none: a drop is counted, not resumed).
#[derive(Clone, Serialize, Deserialize)]
struct Item {
    n: usize,
    secrets: Secrets,
    doctor: Target,
    patient: Target,
    resume_via: Option<Target>,
}

/// The parent's requests to a client process, one JSON line each.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Job {
    /// Open these consultations (at most `in_flight` at once, all at once if none) and hold them.
    Consult {
        items: Vec<Item>,
        in_flight: Option<usize>,
    },
    /// Wait until every dropped link has resumed, or `within_secs` passed, then report.
    Resumes { within_secs: u64 },
    /// How many links are open.
    Count,
}

/// A client process's answers, one JSON line each.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Reply {
    Consulted {
        syn_us: Vec<u64>,
        join_us: Vec<u64>,
        failed: usize,
        first_error: Option<String>,
    },
    Resumes {
        lost: usize,
        resumed: usize,
        resume_us: Vec<u64>,
        errors: BTreeMap<String, usize>,
    },
    Count {
        open: usize,
    },
}

/// What the holders of one client process saw of dropped links.
#[derive(Default)]
struct Drops {
    lost: usize,
    resumed: usize,
    resume_us: Vec<u64>,
    /// Resume attempts refused or failed, by the first words of why.
    errors: BTreeMap<String, usize>,
    open: usize,
}

/// Holds one link, answering pings; when it drops and `resume_via` is set, takes the seat
/// back with the resume token, retrying until the rejoin window has passed.
async fn hold(
    mut conn: SignalingConnection,
    mut token: String,
    n: usize,
    resume_via: Option<Target>,
    window: Duration,
    drops: Arc<Mutex<Drops>>,
) {
    drops.lock().unwrap().open += 1;
    loop {
        if let Ok(Incoming::Message(_)) = conn.recv().await {
            continue;
        }
        let lost_at = Instant::now();
        {
            let mut d = drops.lock().unwrap();
            d.lost += 1;
            d.open -= 1;
        }
        let Some(target) = &resume_via else { return };
        let mut backoff = Duration::from_millis(50);
        loop {
            if lost_at.elapsed() > window {
                return;
            }
            match bench::resume(target, n, &token).await {
                Ok((c, t)) => {
                    let mut d = drops.lock().unwrap();
                    d.resumed += 1;
                    d.open += 1;
                    d.resume_us.push(lost_at.elapsed().as_micros() as u64);
                    (conn, token) = (c, t);
                    break;
                }
                Err(e) => {
                    let why: String = format!("{e:#}").chars().take(48).collect();
                    *drops.lock().unwrap().errors.entry(why).or_default() += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// A client process: reads jobs on stdin, answers on stdout.
async fn client(window: Duration) -> Result<()> {
    bedside_tests::raise_fd_limit();
    let drops = Arc::new(Mutex::new(Drops::default()));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Job>(&line)? {
            Job::Consult { items, in_flight } => {
                let limit = in_flight.map(|n| Arc::new(Semaphore::new(n)));
                let mut tasks = Vec::new();
                for item in items {
                    let limit = limit.clone();
                    tasks.push(tokio::spawn(async move {
                        let _permit = match &limit {
                            Some(s) => Some(s.clone().acquire_owned().await?),
                            None => None,
                        };
                        let done =
                            bench::consult(&item.doctor, &item.patient, item.n, &item.secrets)
                                .await?;
                        anyhow::Ok((item, done))
                    }));
                }
                let (mut syn_us, mut join_us, mut failed, mut first_error) =
                    (Vec::new(), Vec::new(), 0, None);
                for task in tasks {
                    match task.await? {
                        Ok((item, done)) => {
                            syn_us.push(done.syn_to_admitted.as_micros() as u64);
                            join_us.push(done.join_to_admitted.as_micros() as u64);
                            for (conn, token, n) in [
                                (done.doctor, done.doctor_resume, 2 * item.n),
                                (done.patient, done.patient_resume, 2 * item.n + 1),
                            ] {
                                tokio::spawn(hold(
                                    conn,
                                    token,
                                    n,
                                    item.resume_via.clone(),
                                    window,
                                    drops.clone(),
                                ));
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                Reply::Consulted {
                    syn_us,
                    join_us,
                    failed,
                    first_error,
                }
            }
            Job::Resumes { within_secs } => {
                let until = Instant::now() + Duration::from_secs(within_secs);
                loop {
                    let settled = {
                        let d = drops.lock().unwrap();
                        d.lost > 0 && d.resumed >= d.lost
                    };
                    if settled || Instant::now() > until {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let d = drops.lock().unwrap();
                Reply::Resumes {
                    lost: d.lost,
                    resumed: d.resumed,
                    resume_us: d.resume_us.clone(),
                    errors: d.errors.clone(),
                }
            }
            Job::Count => Reply::Count {
                open: drops.lock().unwrap().open,
            },
        };
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        out.write_all(text.as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

/// A client process as the parent drives it.
struct ClientProc {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ClientProc {
    async fn start(window: u64) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--client", "--rejoin-window-secs", &window.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(ClientProc {
            stdin: child.stdin.take().context("stdin")?,
            stdout: BufReader::new(child.stdout.take().context("stdout")?).lines(),
            _child: child,
        })
    }

    async fn send(&mut self, job: &Job) -> Result<()> {
        let mut text = serde_json::to_string(job)?;
        text.push('\n');
        self.stdin.write_all(text.as_bytes()).await?;
        Ok(self.stdin.flush().await?)
    }

    async fn reply(&mut self) -> Result<Reply> {
        let line = self
            .stdout
            .next_line()
            .await?
            .context("a client process exited")?;
        Ok(serde_json::from_str(&line)?)
    }
}

/// Sends each client its job at once, then collects every reply.
async fn all(clients: &mut [ClientProc], jobs: Vec<Job>) -> Result<Vec<Reply>> {
    for (c, job) in clients.iter_mut().zip(&jobs) {
        c.send(job).await?;
    }
    let mut replies = Vec::new();
    for c in clients.iter_mut().take(jobs.len()) {
        replies.push(c.reply().await?);
    }
    Ok(replies)
}

/// The merged timings of a phase run over every client process.
#[derive(Default)]
struct Joins {
    syn: Vec<Duration>,
    join: Vec<Duration>,
    joins: usize,
    failed: usize,
    secs: f64,
}

/// Opens `items` over the client processes (each gets an equal share, run at once), at most
/// `in_flight` in total being set up at a time.
async fn consult(
    clients: &mut [ClientProc],
    items: Vec<Item>,
    in_flight: Option<usize>,
) -> Result<Joins> {
    let k = clients.len();
    let mut shares: Vec<Vec<Item>> = vec![Vec::new(); k];
    for (i, item) in items.into_iter().enumerate() {
        shares[i % k].push(item);
    }
    let jobs = shares
        .into_iter()
        .map(|items| Job::Consult {
            items,
            in_flight: in_flight.map(|n| n.div_ceil(k)),
        })
        .collect();
    let t = Instant::now();
    let replies = all(clients, jobs).await?;
    let mut joins = Joins {
        secs: t.elapsed().as_secs_f64(),
        ..Joins::default()
    };
    for r in replies {
        if let Reply::Consulted {
            syn_us,
            join_us,
            failed,
            first_error,
        } = r
        {
            joins.joins += 2 * syn_us.len();
            joins
                .syn
                .extend(syn_us.into_iter().map(Duration::from_micros));
            joins
                .join
                .extend(join_us.into_iter().map(Duration::from_micros));
            joins.failed += failed;
            if let Some(e) = first_error {
                eprintln!("a consultation failed: {e}");
            }
        }
    }
    joins.syn.sort();
    joins.join.sort();
    Ok(joins)
}

/// One `bedside-server` process.
struct NodeProc {
    child: Option<Child>,
    pid: u32,
    base: String,
    port: u16,
    target: Target,
}

impl NodeProc {
    async fn start(
        binary: &Path,
        dir: &Path,
        name: &str,
        cluster: Option<(&Redis, &str)>,
        window: u64,
    ) -> Result<Self> {
        let data = dir.join(name);
        std::fs::create_dir_all(&data)?;
        let config = data.join("node.toml");
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
             token-secret = \"{TOKEN_SECRET}\"\nrejoin-window-secs = {window}\n\
             [turn]\nenabled = false\n\
             [limits]\nmax-connections = 19900\ntrusted-proxies = [\"127.0.0.1/32\"]\n",
            data.display(),
        );
        if let Some((redis, postgres_url)) = cluster {
            text.push_str(&format!(
                "[cluster]\nredis-url = \"{}\"\nnode-id = \"{name}\"\nregion = \"default\"\n\
                 [store]\nbackend = \"postgres\"\npostgres-url = \"{postgres_url}\"\n",
                redis.url()
            ));
        }
        std::fs::write(&config, text)?;
        let (child, base) = bedside_tests::spawn_server_process(binary, &config).await?;
        let pid = child.id().context("pid")?;
        let target = Target::of_base(&base)?;
        Ok(NodeProc {
            child: Some(child),
            pid,
            port: target.addr.port(),
            base,
            target,
        })
    }

    async fn metric(&self, name: &str) -> Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await?
            .text()
            .await?;
        Ok(metric_value(&text, name))
    }

    async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }
}

/// HAProxy in HTTP mode (WebSockets tunnel after the upgrade), round robin over `nodes` with no
/// stickiness, health-checked every 200 ms (down after three failed checks: one slow answer in
/// a storm must not take a node out), redispatching a refused connection, and adding
/// `X-Forwarded-For` (the nodes trust it from 127.0.0.1), so that each client is its own
/// source to the nodes' per-source limits.
struct Haproxy {
    _child: Child,
    target: Target,
}

impl Haproxy {
    async fn start(dir: &Path, name: &str, nodes: &[&NodeProc]) -> Result<Self> {
        let port = free_port()?;
        // Two descriptors per proxied connection, under the 20,000 open files of a process.
        let mut cfg = format!(
            "global\n  maxconn 9000\ndefaults\n  mode http\n  timeout connect 1s\n  \
             timeout client 120s\n  timeout server 120s\n  timeout tunnel 1h\n  \
             timeout check 2s\n  retries 3\n  \
             option redispatch\n  option forwardfor\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  option httpchk GET /healthz\n"
        );
        for (i, node) in nodes.iter().enumerate() {
            cfg.push_str(&format!(
                "  server n{i} 127.0.0.1:{} check inter 200 fall 3 rise 2\n",
                node.port
            ));
        }
        let child = run_haproxy(&dir.join(format!("{name}.cfg")), &cfg, &[port]).await?;
        Ok(Haproxy {
            _child: child,
            target: Target {
                ws_url: format!("ws://127.0.0.1:{port}/ws"),
                addr: ([127, 0, 0, 1], port).into(),
            },
        })
    }
}

/// Total calls of every Redis command so far (`INFO commandstats`, less `INFO` itself).
fn redis_calls(redis: &Redis) -> Result<u64> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
        .output()
        .context("running redis-cli")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| {
            l.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

/// Creates `n` consultations, spread over the nodes' API (`bases`).
async fn create(bases: &[String], n: usize) -> Result<Vec<Secrets>> {
    let http = reqwest::Client::new();
    let sem = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (http, sem) = (http.clone(), sem.clone());
        let base = bases[i % bases.len()].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let c: CreatedConsultation = http
                .post(format!("{base}/api/v1/consultations"))
                .bearer_auth(ADMIN_KEY)
                .json(&serde_json::json!({}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(Secrets {
                doctor_token: c.doctor_token,
                invite_code: c.invite_code,
            })
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// The figures of one setup (the fleet, or the single node).
struct Figures {
    held: usize,
    open: usize,
    storm: Joins,
    rss_per_conn_kib: Vec<f64>,
    conns_per_node: Vec<f64>,
    redis_per_join_fill: Option<f64>,
    redis_per_join_storm: Option<f64>,
    redis_idle_per_sec: Option<f64>,
    failed: usize,
}

/// Capacity, storm and hold on `nodes` (behind two HAProxy processes), with `consultations`
/// held in all.
async fn capacity(
    args: &Args,
    dir: &Path,
    nodes: &[NodeProc],
    redis: Option<&Redis>,
    consultations: usize,
) -> Result<Figures> {
    let storm = args.storm_joins / 2;
    let refs: Vec<&NodeProc> = nodes.iter().collect();
    let lbs = [
        Haproxy::start(dir, "lb1", &refs).await?,
        Haproxy::start(dir, "lb2", &refs).await?,
    ];
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(ClientProc::start(args.rejoin_window_secs).await?);
    }
    let t = Instant::now();
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let secrets = create(&bases, consultations).await?;
    println!(
        "  created {consultations} consultations in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before: Vec<u64> = nodes
        .iter()
        .map(|n| bench::rss_kib(n.pid))
        .collect::<Result<_>>()?;
    let k = nodes.len();
    let mut items: Vec<Item> = secrets
        .into_iter()
        .enumerate()
        .map(|(n, secrets)| {
            let (doctor, patient) = if n < consultations - storm {
                (
                    nodes[n % k].target.clone(),
                    nodes[(n / 2) % k].target.clone(),
                )
            } else {
                let lb = lbs[n % 2].target.clone();
                (lb.clone(), lb)
            };
            Item {
                n,
                secrets,
                doctor,
                patient,
                resume_via: None,
            }
        })
        .collect();
    let storm_items = items.split_off(consultations - storm);

    // Redis's own rate while nothing joins (the nodes' heartbeats and watchdogs).
    let idle = match redis {
        Some(r) => {
            let (c0, t0) = (redis_calls(r)?, Instant::now());
            tokio::time::sleep(Duration::from_secs(2)).await;
            Some((redis_calls(r)? - c0) as f64 / t0.elapsed().as_secs_f64())
        }
        None => None,
    };
    let c0 = redis.map(redis_calls).transpose()?;
    let fill = consult(&mut clients, items, Some(200)).await?;
    println!(
        "  fill: {} joins direct to the nodes in {:.1} s ({:.0} joins/s, 200 in flight, {} failed)",
        fill.joins,
        fill.secs,
        fill.joins as f64 / fill.secs,
        fill.failed
    );
    let c1 = redis.map(redis_calls).transpose()?;
    let storm = consult(&mut clients, storm_items, None).await?;
    let c2 = redis.map(redis_calls).transpose()?;
    let per_join = |a: Option<u64>, b: Option<u64>, joins: usize, secs: f64| {
        Some((b? - a?) as f64 / joins.max(1) as f64 - idle? * secs / joins.max(1) as f64)
    };
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let mut rss_per_conn_kib = Vec::new();
    let mut conns_per_node = Vec::new();
    for (node, before) in nodes.iter().zip(&rss_before) {
        let conns = node.metric("bedside_websocket_connections").await?;
        let rss = bench::rss_kib(node.pid)?;
        conns_per_node.push(conns);
        rss_per_conn_kib.push(rss.saturating_sub(*before) as f64 / conns.max(1.0));
    }
    let mut open = 0;
    let count = (0..clients.len()).map(|_| Job::Count).collect();
    for r in all(&mut clients, count).await? {
        if let Reply::Count { open: o } = r {
            open += o;
        }
    }
    Ok(Figures {
        held: (fill.joins + storm.joins) / 2,
        open,
        redis_per_join_fill: per_join(c0, c1, fill.joins, fill.secs),
        redis_per_join_storm: per_join(c1, c2, storm.joins, storm.secs),
        redis_idle_per_sec: idle,
        failed: fill.failed + storm.failed,
        storm,
        rss_per_conn_kib,
        conns_per_node,
    })
}

/// The failover figures.
struct Failover {
    consultations: usize,
    on_killed: f64,
    lost: usize,
    resumed: usize,
    resume: Vec<Duration>,
    errors: BTreeMap<String, usize>,
}

async fn failover(args: &Args, binary: &Path, postgres: &Postgres) -> Result<Failover> {
    let dir = tempfile::tempdir()?;
    let url = postgres.create_database("fleet_failover").await?;
    let redis = Redis::start(dir.path()).await?;
    let window = args.rejoin_window_secs;
    let mut a = NodeProc::start(binary, dir.path(), "node-a", Some((&redis, &url)), window).await?;
    let b = NodeProc::start(binary, dir.path(), "node-b", Some((&redis, &url)), window).await?;
    let lbs = [
        Haproxy::start(dir.path(), "lb1", &[&a, &b]).await?,
        Haproxy::start(dir.path(), "lb2", &[&a, &b]).await?,
    ];
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(ClientProc::start(window).await?);
    }
    let n = args.failover_consultations;
    let secrets = create(&[a.base.clone(), b.base.clone()], n).await?;
    let items = secrets
        .into_iter()
        .enumerate()
        .map(|(i, secrets)| {
            let lb = lbs[i % 2].target.clone();
            Item {
                n: i,
                secrets,
                doctor: lb.clone(),
                patient: lb.clone(),
                resume_via: Some(lb),
            }
        })
        .collect();
    let joins = consult(&mut clients, items, Some(200)).await?;
    println!(
        "  {} consultations through HAProxy in {:.1} s ({} failed)",
        joins.joins / 2,
        joins.secs,
        joins.failed
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let on_killed = a.metric("bedside_websocket_connections").await?;
    a.kill().await?;
    // Links relayed by the survivor to the dead home are closed by its watchdog (every
    // 500 ms): let every drop happen before waiting for the resumes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let replies = all(
        &mut clients,
        (0..args.clients)
            .map(|_| Job::Resumes {
                within_secs: window + 5,
            })
            .collect(),
    )
    .await?;
    let mut f = Failover {
        consultations: joins.joins / 2,
        on_killed,
        lost: 0,
        resumed: 0,
        resume: Vec::new(),
        errors: BTreeMap::new(),
    };
    for r in replies {
        if let Reply::Resumes {
            lost,
            resumed,
            resume_us,
            errors,
        } = r
        {
            f.lost += lost;
            f.resumed += resumed;
            f.resume
                .extend(resume_us.into_iter().map(Duration::from_micros));
            for (k, v) in errors {
                *f.errors.entry(k).or_default() += v;
            }
        }
    }
    f.resume.sort();
    let on_b = b.metric("bedside_websocket_connections").await?;
    println!("  after the kill the survivor holds {on_b:.0} WebSockets");
    Ok(f)
}

fn print_setup(name: &str, f: &Figures) {
    println!("  {name}:");
    println!(
        "    consultations held at once:       {} ({} WebSockets open, {} failed)",
        f.held, f.open, f.failed
    );
    println!(
        "    storm: first SYN -> admitted p50 / p99 ms {}; join -> admitted {}",
        p50_p99(&f.storm.syn),
        p50_p99(&f.storm.join)
    );
    println!(
        "    storm: {} joins in {:.2} s: {:.0} joins/s",
        f.storm.joins,
        f.storm.secs,
        f.storm.joins as f64 / f.storm.secs
    );
    for (i, (rss, conns)) in f.rss_per_conn_kib.iter().zip(&f.conns_per_node).enumerate() {
        println!("    node {i}: {conns:.0} WebSockets, RSS {rss:.1} KiB per connection");
    }
    match (
        f.redis_per_join_fill,
        f.redis_per_join_storm,
        f.redis_idle_per_sec,
    ) {
        (Some(fill), Some(storm), Some(idle)) => println!(
            "    Redis commands per join: {fill:.1} (fill), {storm:.1} (storm), beside {idle:.0}/s idle"
        ),
        _ => println!("    Redis commands per join: - (no Redis)"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.client {
        return client(Duration::from_secs(args.rejoin_window_secs)).await;
    }
    bedside_tests::raise_fd_limit();
    if let Err(reason) = bedside_tests::fleet::tools() {
        bail!("the fleet bench cannot run: {reason}");
    }
    let binary = std::fs::canonicalize(&args.server)
        .with_context(|| format!("{} (build it in release first)", args.server.display()))?;
    println!(
        "fleet bench: {} consultations on two nodes with Redis, {} on one node without; storm \
         of {}; {} client processes; load average {}",
        args.consultations,
        args.single_consultations,
        args.storm_joins,
        args.clients,
        bench::load_average()
    );
    let postgres = Postgres::start()?;

    println!("two nodes, Redis, PostgreSQL, two HAProxy:");
    let fleet = {
        let dir = tempfile::tempdir()?;
        let url = postgres.create_database("fleet_capacity").await?;
        let redis = Redis::start(dir.path()).await?;
        let window = args.rejoin_window_secs;
        let nodes = vec![
            NodeProc::start(&binary, dir.path(), "node-a", Some((&redis, &url)), window).await?,
            NodeProc::start(&binary, dir.path(), "node-b", Some((&redis, &url)), window).await?,
        ];
        capacity(&args, dir.path(), &nodes, Some(&redis), args.consultations).await?
    };
    let single = if args.skip_single {
        None
    } else {
        println!("one node, no Redis (SQLite), two HAProxy:");
        let dir = tempfile::tempdir()?;
        let nodes = vec![
            NodeProc::start(&binary, dir.path(), "single", None, args.rejoin_window_secs).await?,
        ];
        Some(capacity(&args, dir.path(), &nodes, None, args.single_consultations).await?)
    };
    let failover = if args.skip_failover {
        None
    } else {
        println!("failover:");
        Some(failover(&args, &binary, &postgres).await?)
    };

    println!();
    println!(
        "Fleet bench (load average {} at the end)",
        bench::load_average()
    );
    print_setup("two nodes + Redis", &fleet);
    if let Some(s) = &single {
        print_setup("one node, no Redis", s);
    }
    if let Some(f) = &failover {
        let share = f.resumed as f64 * 100.0 / f.lost.max(1) as f64;
        println!(
            "  failover: kill -9 of the node holding {:.0} of the {} WebSockets of {} consultations",
            f.on_killed,
            2 * f.consultations,
            f.consultations
        );
        println!(
            "    links dropped {}, resumed within the {} s window {} ({share:.2}%); time to \
             resume p50 / p99 ms {}, max {:.0} ms",
            f.lost,
            args.rejoin_window_secs,
            f.resumed,
            p50_p99(&f.resume),
            f.resume.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
        if !f.errors.is_empty() {
            println!("    resume attempts that failed first: {:?}", f.errors);
        }
    }
    Ok(())
}

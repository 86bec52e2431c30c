//! Call quality bench: a 720p30 consultation on loopback between two `bedside-probe` processes
//! through a `bedside-server` process, all release builds. Prints, per client: encoded and
//! decoded frame rates, glass-to-glass video latency p50/p95, mouth-to-ear audio latency
//! p50/p95, and CPU used (share of one core, from /proc): from the probe's start to a second
//! before its call ends, and in the steady state (from [`WARMUP`] after the start to that
//! point) split by thread name.
//!
//! `cargo xtask bench-call` builds and runs it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_server::api::CreatedConsultation;
use clap::Parser;
use serde_json::Value;
use tokio::io::AsyncReadExt;

#[derive(Parser, Debug)]
struct Args {
    /// Seconds of connected call to measure.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 1280)]
    width: u32,
    #[arg(long, default_value_t = 720)]
    height: u32,
    #[arg(long, default_value_t = 1500)]
    bitrate_kbps: u32,
    /// Release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
}

const ADMIN_KEY: &str = "bench-admin-key-0123456789";
/// The steady-state CPU window starts this long after the probes (joined, connected, the
/// encoder's first keyframes out).
const WARMUP: Duration = Duration::from_secs(5);

type Threads = std::collections::BTreeMap<String, Duration>;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
             [turn]\nenabled = false\n",
            dir.path().join("data").display()
        ),
    )?;
    let (mut server, base) =
        bedside_tests::spawn_server_process(&args.bin_dir.join("bedside-server"), &config).await?;
    let ws = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let c: CreatedConsultation = reqwest::Client::new()
        .post(format!("{base}/api/v1/consultations"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;

    let probe = |auth: [&str; 2]| {
        let mut cmd = tokio::process::Command::new(args.bin_dir.join("bedside-probe"));
        cmd.args(["--server", &ws, auth[0], auth[1]])
            .args(["--duration", &args.seconds.to_string()])
            .args(["--width", &args.width.to_string()])
            .args(["--height", &args.height.to_string()])
            .args(["--bitrate-kbps", &args.bitrate_kbps.to_string()])
            .args(["--udp", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn()
    };
    let started = Instant::now();
    let mut doctor = probe(["--token", &c.doctor_token])?;
    let mut patient = probe(["--invite", &c.invite_code])?;
    let pids = [doctor.id().unwrap(), patient.id().unwrap()];
    // CPU is sampled just before the probes leave, so start-up and tear-down barely count;
    // and at WARMUP, for the steady state by thread.
    let mut cpu = [0.0; 2];
    // A second before the call's end: the probe's call lasts `--duration` from its connection,
    // about half a second after its start, and once it has exited (a zombie until waited for)
    // its threads are gone from /proc (read at `seconds + 1`, the breakdown came out empty).
    let sample_at = Duration::from_secs(args.seconds.saturating_sub(1).max(1));
    let threads_at =
        |pids: [u32; 2]| pids.map(|p| bedside_tests::thread_cpu_times(p).unwrap_or_default());
    let warm = (sample_at > WARMUP + Duration::from_secs(2)).then_some(WARMUP);
    let mut steady_from: Option<(Instant, [Threads; 2])> = None;
    if let Some(warm) = warm {
        tokio::time::sleep(warm).await;
        steady_from = Some((Instant::now(), threads_at(pids)));
    }
    tokio::time::sleep_until((started + sample_at).into()).await;
    for (i, pid) in pids.iter().enumerate() {
        cpu[i] = bedside_tests::process_cpu_time(*pid).map_or(0.0, |d| d.as_secs_f64());
    }
    let wall = started.elapsed().as_secs_f64();
    let steady = steady_from.map(|(at, before)| {
        let after = threads_at(pids);
        let secs = at.elapsed().as_secs_f64();
        [0, 1].map(|i| thread_shares(&before[i], &after[i], secs))
    });
    let mut reports = Vec::new();
    for child in [&mut doctor, &mut patient] {
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await?;
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
        if !status.success() {
            bail!("probe failed: {status}");
        }
        reports.push(serde_json::from_str::<Value>(&out).context("probe report")?);
    }
    let _ = server.start_kill();

    println!(
        "{}x{} call at {} kbps, {} s connected, on {} cores",
        args.width,
        args.height,
        args.bitrate_kbps,
        args.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<8} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9} {:>8}",
        "client",
        "sent fps",
        "dec fps",
        "g2g p50",
        "g2g p95",
        "m2e p50",
        "m2e p95",
        "heard",
        "CPU/core",
        "steady"
    );
    for (i, (name, r)) in ["doctor", "patient"].iter().zip(&reports).enumerate() {
        let f = |k: &str| r[k].as_f64();
        let ms = |k: &str| f(k).map_or("-".into(), |v| format!("{v:.1} ms"));
        let sent_fps = f("video_frames_sent").map(|n| n / args.seconds as f64);
        println!(
            "{:<8} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7} {:>8.0}% {:>8}",
            name,
            sent_fps.map_or("-".into(), |v| format!("{v:.1}")),
            f("decoded_fps").map_or("-".into(), |v| format!("{v:.1}")),
            ms("glass_to_glass_ms_p50"),
            ms("glass_to_glass_ms_p95"),
            ms("mouth_to_ear_ms_p50"),
            ms("mouth_to_ear_ms_p95"),
            r["heard"].as_str().unwrap_or("-"),
            100.0 * cpu[i] / wall,
            steady.as_ref().map_or("-".into(), |s| format!(
                "{:.1}%",
                s[i].iter().map(|t| t.1).sum::<f64>()
            ))
        );
    }
    if let Some(steady) = &steady {
        println!(
            "steady-state CPU by thread (share of one core, from {} s to the end):",
            WARMUP.as_secs()
        );
        for (name, shares) in ["doctor", "patient"].iter().zip(steady) {
            let list: Vec<String> = shares
                .iter()
                .filter(|(_, share)| *share >= 0.05)
                .map(|(thread, share)| format!("{thread} {share:.1}%"))
                .collect();
            println!("  {name:<8} {}", list.join(", "));
        }
    }
    println!(
        "CPU/core is the probe process from its start (its join included) to a second before \
         its {} s call ends; each probe also renders the synthetic test pattern it sends.",
        args.seconds
    );
    Ok(())
}

/// Each thread name's CPU between two samples as a share of one core over `secs`, largest
/// first.
fn thread_shares(before: &Threads, after: &Threads, secs: f64) -> Vec<(String, f64)> {
    let mut shares: Vec<(String, f64)> = after
        .iter()
        .map(|(name, cpu)| {
            let used = cpu.saturating_sub(before.get(name).copied().unwrap_or_default());
            (name.clone(), 100.0 * used.as_secs_f64() / secs.max(1e-3))
        })
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
}

//! `bedside-probe`: joins a consultation headless and prints a JSON quality report.

use std::time::Duration;

use bedside_probe::{ProbeOptions, SendDelay, run};
use bedside_protocol::JoinAuth;
use clap::Parser;

/// A headless Bedside participant: as a doctor (--token) it admits whoever waits, as a patient
/// (--invite) it waits to be admitted. Prints a JSON report when it leaves.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The server's signaling URL.
    #[arg(long, default_value = "ws://127.0.0.1:8443/ws")]
    server: String,
    /// Join with this doctor or clinician token.
    #[arg(long, conflicts_with = "invite", required_unless_present = "invite")]
    token: Option<String>,
    /// Join as a patient with this invite code.
    #[arg(long)]
    invite: Option<String>,
    /// The name shown to the doctor.
    #[arg(long, default_value = "Probe")]
    name: String,
    /// Seconds to stay connected.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Use only TURN relay candidates.
    #[arg(long)]
    relay_only: bool,
    /// Local address for host candidates.
    #[arg(long, default_value = "0.0.0.0:0")]
    udp: String,
    /// Width of the synthetic picture sent.
    #[arg(long, default_value_t = 1280)]
    width: u32,
    /// Height of the synthetic picture sent.
    #[arg(long, default_value_t = 720)]
    height: u32,
    /// Starting video bitrate, kbps.
    #[arg(long, default_value_t = 1500)]
    bitrate_kbps: u32,
    /// Testing only: hold every media datagram this probe sends this long (ms), as a long
    /// path would.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Testing only: up to this much more delay per datagram (ms), drawn at random.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Also trust this CA's certificates (a PEM file), for wss:// and TURN over TLS with a
    /// private CA.
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
    /// Encrypt media end to end (SFrame, keys over signaling); every participant must.
    #[arg(long)]
    e2ee: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| bedside_client_core::LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let auth = match (args.token, args.invite) {
        (Some(token), _) => JoinAuth::Token { token },
        (None, Some(code)) => JoinAuth::InviteCode { code },
        (None, None) => unreachable!("clap requires one"),
    };
    let ca_cert_pem = match &args.ca_cert {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let report = run(ProbeOptions {
        ca_cert_pem,
        display_name: Some(args.name),
        duration: Duration::from_secs(args.duration),
        relay_only: args.relay_only,
        udp_addrs: vec![args.udp],
        width: args.width,
        height: args.height,
        bitrate_kbps: args.bitrate_kbps,
        send_delay: (args.delay_ms + args.jitter_ms > 0).then(|| SendDelay {
            delay: Duration::from_millis(args.delay_ms),
            jitter: Duration::from_millis(args.jitter_ms),
        }),
        e2ee: args.e2ee,
        ..ProbeOptions::new(args.server, auth)
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

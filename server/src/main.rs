//! `bedside-server`: parses flags and the config file, then calls the library.

use std::path::PathBuf;

mod admin_cli;

use anyhow::Context;
use bedside_server::{Config, Server, config::REFERENCE_TOML, shutdown_signal};
use clap::Parser;

/// Bedside's clinic server: signaling, waiting room and consultation store.
///
/// With no flags and no config file it starts a local clinic on 127.0.0.1:8443.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML configuration file (see --print-config).
    #[arg(short, long, env = "BEDSIDE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address for HTTP and WebSocket, overriding the file's `listen`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory, overriding the file's `data-dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print the default configuration, with comments, and exit.
    #[arg(long)]
    print_config: bool,
    /// Run only the bundled STUN/TURN relay (the [turn.relay] settings), no signaling.
    #[arg(long)]
    only_turn: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Administer consultations through the API: create, list, invite, token, end, audit.
    Admin(admin_cli::AdminArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_config {
        print!("{REFERENCE_TOML}");
        return Ok(());
    }
    if let Some(Command::Admin(admin)) = args.command {
        return admin_cli::run(admin, args.config.as_deref(), args.data_dir).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    raise_open_files_limit();
    let shutdown = shutdown_signal();
    if args.only_turn {
        config.validate()?;
        let store = bedside_server::store::Store::open(&config.data_dir())?;
        let (relay, _) = bedside_server::start_turn(&config, &store).await?;
        println!(
            "bedside-server relay only: STUN/TURN on UDP {:?}, TCP {:?}, TLS {:?}",
            relay.udp_addrs(),
            relay.tcp_addrs(),
            relay.tls_addrs()
        );
        shutdown.await;
        relay.shutdown();
        relay.join().await;
        return Ok(());
    }
    let server = Server::bind(config)
        .await
        .context("starting bedside-server")?;
    if server.generated_admin_key() {
        // Printed to the terminal, never to the log.
        println!(
            "Administration key (kept in {}): {}",
            server.data_dir().join("admin-api-key").display(),
            server.admin_api_key()
        );
    }
    println!(
        "bedside-server listening on {} (signaling at {})",
        server.base_url(),
        server.ws_url()
    );
    if let Some(relay) = server.turn() {
        println!(
            "STUN/TURN relay on UDP {:?}, TCP {:?}, TLS {:?}",
            relay.udp_addrs(),
            relay.tcp_addrs(),
            relay.tls_addrs()
        );
    }
    server.serve(shutdown).await?;
    Ok(())
}

/// Every WebSocket is a file descriptor: use all the process may have.
fn raise_open_files_limit() {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

//! `bedside-server`: parses flags and the config file, then calls the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

mod admin_cli;

use anyhow::{Context, bail};
use bedside_server::{Config, Server, config::REFERENCE_TOML, shutdown_signal};
use clap::{Parser, Subcommand};

/// `println!` that ignores a closed standard output: a server whose starter stopped reading
/// keeps serving.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Bedside's clinic server: signaling, waiting room and consultation store.
///
/// With no flags and no config file it starts a local clinic on 127.0.0.1:8443.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML configuration file (see --print-config).
    #[arg(short, long, env = "BEDSIDE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Listen address for HTTP and WebSocket, overriding the file's `listen`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory, overriding the file's `data-dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print the default configuration, with comments, and exit. With --config, print the
    /// effective configuration of that file instead, secrets redacted.
    #[arg(long)]
    print_config: bool,
    /// Check a configuration file and exit: every problem is printed with its key, and the
    /// exit code is 1 when there is one.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Run only the bundled STUN/TURN relay (the [turn.relay] settings), no signaling;
    /// `listen` then serves /healthz, /readyz and /metrics only.
    #[arg(long)]
    only_turn: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Administer consultations and doctor credentials through the API: create, list, invite,
    /// token, end, audit, issue-credential, credentials, revoke-credential.
    Admin(admin_cli::AdminArgs),
    /// Copy the store to DEST (a new file), consistently, while the server runs. The copy
    /// holds the token and relay secrets: keep it as secret as the server.
    Backup { dest: PathBuf },
    /// Replace the store with the backup SRC. The server must be stopped.
    Restore { src: PathBuf },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bedside-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    config.load_secrets()?;
    Ok(config)
}

#[tokio::main]
async fn real_main() -> anyhow::Result<std::process::ExitCode> {
    let mut args = Args::parse();
    if matches!(args.command, Some(Command::Admin(_))) {
        let Some(Command::Admin(admin)) = args.command.take() else {
            unreachable!("matched just above")
        };
        admin_cli::run(admin, args.config.as_deref(), args.data_dir).await?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(path) = &args.check_config {
        let problems = bedside_server::checkconfig::check_file(path);
        for p in &problems {
            say!("{p}");
        }
        if problems.is_empty() {
            say!("{}: ok", path.display());
            return Ok(std::process::ExitCode::SUCCESS);
        }
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
        return Ok(std::process::ExitCode::FAILURE);
    }
    if args.print_config {
        if args.config.is_some() {
            print!("{}", load_config(&args)?.to_redacted_toml());
        } else {
            print!("{REFERENCE_TOML}");
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let config = load_config(&args)?;
    match &args.command {
        Some(Command::Backup { .. } | Command::Restore { .. })
            if config.store.backend == bedside_server::store::StoreBackend::Postgres =>
        {
            bail!(
                "backup and restore copy the SQLite store; with [store] backend = \"postgres\" \
                 use the database's own tools (pg_dump, pg_restore)"
            );
        }
        Some(Command::Backup { dest }) => {
            bedside_server::store::backup_file(&config.data_dir(), dest)?;
            say!(
                "backed up {} to {} (it holds the server's secrets: keep it private)",
                config.data_dir().join("bedside.db").display(),
                dest.display()
            );
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Some(Command::Restore { src }) => {
            let dir = config.data_dir();
            bedside_server::filemodes::prepare_data_dir(&dir).map_err(anyhow::Error::msg)?;
            let _lock = lock_data_dir(&dir)?;
            bedside_server::store::restore_file(src, &dir)?;
            say!("restored {} into {}", src.display(), dir.display());
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Some(Command::Admin(_)) | None => {}
    }
    bedside_server::logging::init(config.log_format);
    raise_open_files_limit();
    let data_dir = config.data_dir();
    bedside_server::filemodes::prepare_data_dir(&data_dir).map_err(anyhow::Error::msg)?;
    let _lock = lock_data_dir(&data_dir)?;
    let shutdown = shutdown_signal();
    if args.only_turn {
        run_only_turn(config, shutdown).await?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let server = Server::bind(config)
        .await
        .context("starting bedside-server")?;
    if server.generated_admin_key() {
        // Never on the log stream (journald and log files keep it): shown once to a person at
        // a terminal, otherwise only where it is kept.
        let path = server.data_dir().join("admin-api-key");
        if std::io::stdout().is_terminal() {
            say!(
                "Administration key (kept in {}): {}",
                path.display(),
                server.admin_api_key()
            );
        } else {
            say!(
                "Administration key generated; read it from {} (readable by this user only)",
                path.display()
            );
        }
    }
    say!(
        "bedside-server listening on {} (signaling at {})",
        server.base_url(),
        server.ws_url()
    );
    if let Some(relay) = server.turn() {
        say!(
            "STUN/TURN relay on UDP {:?}, TCP {:?}, TLS {:?}",
            relay.udp_addrs(),
            relay.tcp_addrs(),
            relay.tls_addrs()
        );
    }
    server.serve(shutdown).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// `--only-turn`: the relay, and /healthz, /readyz and /metrics on `listen`.
async fn run_only_turn(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let store = bedside_server::store::Store::from_config(&config).await?;
    let (relay, _) = bedside_server::start_turn(&config, &store).await?;
    let readiness = std::sync::Arc::new(bedside_server::health::Readiness::new(
        store,
        relay.udp_addrs().first().copied(),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    say!(
        "bedside-server relay only: STUN/TURN on UDP {:?}, TCP {:?}, TLS {:?}",
        relay.udp_addrs(),
        relay.tcp_addrs(),
        relay.tls_addrs()
    );
    say!(
        "health and metrics on http://{} (/healthz, /readyz, /metrics)",
        listener.local_addr()?
    );
    let app = bedside_server::health::turn_router(readiness.clone(), relay.metrics());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown.await;
    tracing::info!("shutting down");
    readiness
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop_tx.send(());
    let _ = http.await;
    relay.shutdown();
    relay.join().await;
    Ok(())
}

/// Holds an exclusive lock on `<data-dir>/bedside.lock` for the life of the process: two
/// servers on one store, or a restore under a running server, are refused.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("bedside.lock");
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another bedside-server uses {} (stop it first)",
                dir.display()
            );
        }
    }
    Ok(file)
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

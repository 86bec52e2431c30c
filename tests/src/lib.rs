//! Helpers shared by the end-to-end suites in `tests/tests/` and the bench commands: a real
//! server on a loopback port with its own data directory, and a signaling client that waits for
//! what a test expects.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bedside_client_core::signaling::{Incoming, SignalingConnection};
use bedside_protocol::{ClientMessage, JoinAuth, PROTOCOL_VERSION, ServerMessage};
use bedside_server::api::CreatedConsultation;
use bedside_server::{Config, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod bench;
pub mod fleet;
pub mod netns;
pub mod ops;
pub mod postgres;
pub mod scenarios;

/// How long a test waits for any one expected message.
pub const STEP: Duration = Duration::from_secs(5);

/// Whether this is a CI run (`CI=true`): a suite that cannot run then fails (see [`skip`]).
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A suite cannot run here for want of a tool or a privilege (`reason`). Locally it skips,
/// saying why; under `CI=true` it fails, so that CI cannot pass on a suite that never ran.
pub fn skip(reason: &str) {
    assert!(!on_ci(), "CI=true, and this suite cannot run: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// A server running on 127.0.0.1 with a temporary data directory.
pub struct TestServer {
    pub base_url: String,
    pub ws_url: String,
    pub admin_key: String,
    pub config: Config,
    pub data_dir: tempfile::TempDir,
    /// The in-process SFU, when the config enables it.
    pub sfu: Option<bedside_sfu::SfuHandle>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), bedside_server::ServerError>>>,
    http: reqwest::Client,
}

/// A configuration for tests: port 0, fixed secrets, no relay (see [`with_turn`]).
pub fn test_config() -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_api_key: "test-admin-key-0123456789".into(),
        token_secret: "test-token-secret".into(),
        ..Config::default()
    };
    config.turn.enabled = false;
    // Group calls stay a mesh unless a test asks for the SFU (see [`with_sfu`]).
    config.sfu.enabled = false;
    // Every test client comes from 127.0.0.1: the per-source connection cap would count them
    // as one source (tests/tests/hardening.rs checks the cap with a config of its own).
    config.limits.max_connections_per_source = 100_000;
    config
}

/// `config` with the bundled relay on free loopback ports. Loopback peers are allowed, which is
/// for tests only: every participant here is on 127.0.0.1.
pub fn with_turn(mut config: Config) -> Config {
    config.turn.enabled = true;
    config.turn.relay.listen_udp = vec!["127.0.0.1:0".parse().unwrap()];
    config.turn.relay.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
    config.turn.relay.allow_loopback_peers = true;
    config
}

/// `config` with the SFU on a free loopback port.
pub fn with_sfu(mut config: Config) -> Config {
    config.sfu.enabled = true;
    config.sfu.listen = "127.0.0.1:0".into();
    config
}

impl TestServer {
    pub async fn start() -> Result<Self> {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: Config) -> Result<Self> {
        let data_dir = tempfile::tempdir()?;
        Self::start_in(config, data_dir).await
    }

    /// Starts on an existing data directory (to test a restart).
    pub async fn start_in(mut config: Config, data_dir: tempfile::TempDir) -> Result<Self> {
        config.data_dir = data_dir.path().to_owned();
        let server = Server::bind(config.clone()).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let base_url = server.base_url();
        let ws_url = server.ws_url().to_owned();
        let admin_key = server.admin_api_key().to_owned();
        let sfu = server.sfu().cloned();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Ok(TestServer {
            base_url,
            ws_url,
            admin_key,
            config,
            data_dir,
            sfu,
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::new(),
        })
    }

    /// Asks for a graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .context("server did not stop within 10 s")???;
        }
        Ok(())
    }

    /// Stops the server gracefully and starts it again on the same address and store, as an
    /// administrator's restart would.
    pub async fn restart(self) -> Result<TestServer> {
        let addr: std::net::SocketAddr = self
            .base_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()?;
        let mut config = self.config.clone();
        config.listen = addr;
        let dir = self.stop_keep_data().await?;
        TestServer::start_in(config, dir).await
    }

    /// Stops the server and gives back its data directory.
    pub async fn stop_keep_data(mut self) -> Result<tempfile::TempDir> {
        self.shutdown().await?;
        let dir = tempfile::tempdir()?;
        Ok(std::mem::replace(&mut self.data_dir, dir))
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base_url)
    }

    pub async fn create_consultation(&self) -> Result<CreatedConsultation> {
        let resp = self
            .http
            .post(self.api("/consultations"))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!(
                "create consultation: {} {}",
                resp.status(),
                resp.text().await?
            );
        }
        Ok(resp.json().await?)
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await?
            .text()
            .await?)
    }

    pub async fn connect(&self) -> Result<Client> {
        Client::connect(&self.ws_url).await
    }

    /// A doctor joined and admitted in `c`, its first waiting-room snapshot read.
    pub async fn doctor(&self, c: &CreatedConsultation) -> Result<Client> {
        let mut doctor = self.connect().await?;
        doctor.join_token(&c.doctor_token).await?;
        doctor.expect_type("admitted").await?;
        doctor.expect_type("waiting_room").await?;
        Ok(doctor)
    }

    /// A patient who joined with the invite code and is in the waiting room.
    pub async fn waiting_patient(&self, c: &CreatedConsultation, name: &str) -> Result<Client> {
        let mut patient = self.connect().await?;
        patient.join_invite(&c.invite_code, Some(name)).await?;
        patient.expect_type("waiting").await?;
        Ok(patient)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A signaling client that remembers who it is.
pub struct Client {
    pub conn: SignalingConnection,
    pub participant_id: Option<bedside_protocol::ParticipantId>,
    pub resume_token: Option<String>,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Client {
            conn: SignalingConnection::connect(url, None).await?,
            participant_id: None,
            resume_token: None,
        })
    }

    pub async fn send(&mut self, msg: ClientMessage) -> Result<()> {
        Ok(self.conn.send(&msg).await?)
    }

    /// Sends `join` without waiting for the answer.
    pub async fn send_join(&mut self, auth: JoinAuth) -> Result<()> {
        self.send(ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth,
            display_name: None,
        })
        .await
    }

    /// Sends `join` with a token and waits for `joined`.
    pub async fn join_token(&mut self, token: &str) -> Result<ServerMessage> {
        self.send(ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth: JoinAuth::Token {
                token: token.into(),
            },
            display_name: None,
        })
        .await?;
        self.expect_joined().await
    }

    pub async fn join_invite(&mut self, code: &str, name: Option<&str>) -> Result<ServerMessage> {
        self.send(ClientMessage::Join {
            protocol_version: PROTOCOL_VERSION,
            auth: JoinAuth::InviteCode { code: code.into() },
            display_name: name.map(str::to_owned),
        })
        .await?;
        self.expect_joined().await
    }

    async fn expect_joined(&mut self) -> Result<ServerMessage> {
        let msg = self.next().await?;
        match &msg {
            ServerMessage::Joined {
                participant_id,
                resume_token,
                ..
            } => {
                self.participant_id = Some(participant_id.clone());
                self.resume_token = Some(resume_token.clone());
                Ok(msg)
            }
            other => bail!("expected joined, got {other:?}"),
        }
    }

    /// The next message (a close is an error here).
    pub async fn next(&mut self) -> Result<ServerMessage> {
        match self.conn.recv_timeout(STEP).await? {
            Incoming::Message(m) => Ok(m),
            Incoming::Closed { code, reason } => bail!("closed {code} {reason}"),
        }
    }

    /// Skips messages until one of `ty` arrives (pings and waiting-room updates are skipped).
    pub async fn expect_type(&mut self, ty: &str) -> Result<ServerMessage> {
        loop {
            let msg = self
                .next()
                .await
                .with_context(|| format!("waiting for {ty}"))?;
            if msg.type_name() == ty {
                return Ok(msg);
            }
        }
    }

    /// The next message must be an error with this code.
    pub async fn expect_error(&mut self, code: bedside_protocol::ErrorCode) -> Result<()> {
        match self.expect_type("error").await? {
            ServerMessage::Error { code: got, .. } if got == code => Ok(()),
            other => bail!("expected error {code}, got {other:?}"),
        }
    }

    /// Waits for the server to close the connection; returns the close code.
    pub async fn expect_close(&mut self) -> Result<u16> {
        loop {
            match self.conn.recv_timeout(STEP).await? {
                Incoming::Closed { code, .. } => return Ok(code),
                Incoming::Message(_) => continue,
            }
        }
    }

    /// Checks that nothing arrives for `quiet` (apart from ignorable updates).
    pub async fn expect_silence(&mut self, quiet: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.conn.recv_timeout(left).await {
                Err(bedside_client_core::signaling::SignalingError::Timeout) => return Ok(()),
                Ok(Incoming::Message(ServerMessage::WaitingRoom { .. })) => continue,
                Ok(other) => bail!("expected silence, got {other:?}"),
                Err(e) => bail!("expected silence, got {e}"),
            }
        }
    }

    pub fn id(&self) -> bedside_protocol::ParticipantId {
        self.participant_id.clone().expect("joined")
    }
}

/// Raises this process's soft open-files limit to the hard one; returns the new limit.
pub fn raise_fd_limit() -> u64 {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    Ok(stat_cpu_time(&format!("/proc/{pid}/stat"))?.1)
}

/// CPU time (user + system) each thread of a process has used so far, by thread name (threads
/// of one name, such as a runtime's workers, summed), from `/proc/<pid>/task/*/stat`. A thread
/// that has ended is not counted.
pub fn thread_cpu_times(pid: u32) -> Result<std::collections::BTreeMap<String, Duration>> {
    let mut threads = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("stat");
        // A thread may end between the listing and the read.
        if let Ok((name, cpu)) = stat_cpu_time(&path.to_string_lossy()) {
            *threads.entry(name).or_default() += cpu;
        }
    }
    Ok(threads)
}

/// The command (thread) name and user + system CPU time in a `/proc` stat file.
fn stat_cpu_time(path: &str) -> Result<(String, Duration)> {
    let stat = std::fs::read_to_string(path)?;
    // The fields after the command name (which may hold spaces) start after the last ')'.
    let (head, tail) = stat.rsplit_once(')').context("malformed /proc stat")?;
    let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok((name, Duration::from_micros(ticks * 1_000_000 / hz.max(1))))
}

/// A `bedside-server` process (a bench's), started from `binary` with `config`; it is killed
/// when dropped. Returns the child and its base URL, read from its "listening on" line.
pub async fn spawn_server_process(
    binary: &std::path::Path,
    config: &std::path::Path,
) -> Result<(tokio::process::Child, String)> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut server = tokio::process::Command::new(binary)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (build it in release first)", binary.display()))?;
    let mut lines = BufReader::new(server.stdout.take().expect("piped")).lines();
    let base = loop {
        let line = lines.next_line().await?.context("the server exited")?;
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    // Keep reading, so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((server, base))
}

/// Log output captured in memory (a `tracing_subscriber` writer), for tests that read what the
/// server logged.
#[derive(Clone, Default)]
pub struct CapturedLogs(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

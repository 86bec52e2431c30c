//! The fleet lab (`tests/tests/fleet.rs`, `cargo xtask bench-fleet`): a real `redis-server`, a
//! real `haproxy` and `bedside-server` nodes in processes of their own (so one can be killed
//! with SIGKILL or stopped with SIGTERM), all on loopback ports in a temporary directory that
//! the lab made, and the region's durable store on a real PostgreSQL (`crate::postgres`).
//! Nothing here assumes a running service.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bedside_server::api::CreatedConsultation;
use tokio::process::{Child, Command};

/// The administration key and token secret every node of the lab shares (a region's nodes
/// must share the token secret).
pub const ADMIN_KEY: &str = "fleet-test-admin-key-0123";
const TOKEN_SECRET: &str = "fleet-test-token-secret";

/// Where a lab tool is, or why the suite cannot run.
pub fn tools() -> std::result::Result<(), String> {
    for tool in ["redis-server", "haproxy"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
            || Path::new("/usr/sbin").join(tool).is_file();
        if !found {
            return Err(format!(
                "{tool} is not installed (Debian's redis-server and haproxy; `cargo xtask test` installs them)"
            ));
        }
    }
    if let Some(reason) = crate::postgres::unavailable() {
        return Err(reason);
    }
    Ok(())
}

/// A loopback port nothing listens on now (the OS picks it; the tool binds it right after).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16, within: Duration) -> Result<()> {
    let until = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > until {
            bail!("nothing listens on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Writes `cfg` to `path` and runs HAProxy on it in the foreground (killed when dropped), once
/// it listens on every one of `ports`.
pub async fn run_haproxy(path: &std::path::Path, cfg: &str, ports: &[u16]) -> Result<Child> {
    std::fs::write(path, cfg)?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting haproxy")?;
    for port in ports {
        wait_for_port(*port, Duration::from_secs(5)).await?;
    }
    Ok(child)
}

/// A `redis-server` on a loopback port, with no persistence (a restart comes back empty, the
/// hardest case for the nodes' reconciliation).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub async fn start(dir: &Path) -> Result<Self> {
        let mut redis = Redis {
            port: free_port()?,
            dir: dir.to_owned(),
            child: None,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--maxclients", "10000"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(5)).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills Redis (SIGKILL: everything it held is gone).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again, empty, on the same port.
    pub async fn start_again(&mut self) -> Result<()> {
        self.spawn().await
    }
}

/// One `bedside-server` node (the server library in `server-under-test`).
pub struct Node {
    pub name: String,
    pub base_url: String,
    pub port: u16,
    child: Option<Child>,
    pub data_dir: PathBuf,
}

/// What a lab node is configured with beyond the defaults.
#[derive(Clone)]
pub struct NodeOptions {
    pub rejoin_window_secs: u64,
    pub region: String,
    /// The region's PostgreSQL store (empty: the node's own SQLite).
    pub postgres_url: String,
    /// The signaling port (0: one the OS picks), for a region map that must name it first.
    pub listen_port: u16,
    /// Run the bundled relay on this loopback UDP port (0: no relay), with this secret.
    pub turn_udp_port: u16,
    pub turn_secret: String,
    /// More TOML at the end of the node's file (`[cluster.regions.<name>]` tables, `[alerts]`).
    pub extra_toml: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            rejoin_window_secs: 60,
            region: "default".into(),
            postgres_url: String::new(),
            listen_port: 0,
            turn_udp_port: 0,
            turn_secret: String::new(),
            extra_toml: String::new(),
        }
    }
}

/// A loopback UDP port nothing uses now (for a relay the lab starts right after).
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    pub async fn start(
        binary: &Path,
        dir: &Path,
        name: &str,
        redis: &Redis,
        options: &NodeOptions,
    ) -> Result<Self> {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir)?;
        let config = data_dir.join("node.toml");
        let store = if options.postgres_url.is_empty() {
            String::new()
        } else {
            format!(
                "[store]\nbackend = \"postgres\"\npostgres-url = \"{}\"\npostgres-pool-size = 4\n",
                options.postgres_url
            )
        };
        let turn = if options.turn_udp_port == 0 {
            "[turn]\nenabled = false\n".to_owned()
        } else {
            format!(
                "[turn]\nenabled = true\n[turn.relay]\nlisten-udp = [\"127.0.0.1:{}\"]\n\
                 listen-tcp = []\nallow-loopback-peers = true\nauth-secret = \"{}\"\n",
                options.turn_udp_port, options.turn_secret
            )
        };
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{}\"\ndata-dir = \"{}\"\nadmin-api-key = \"{ADMIN_KEY}\"\n\
                 token-secret = \"{TOKEN_SECRET}\"\nrejoin-window-secs = {}\n\
                 {turn}[limits]\nmax-connections-per-source = 100000\n\
                 [cluster]\nredis-url = \"{}\"\nnode-id = \"{name}\"\nregion = \"{}\"\n{store}{}",
                options.listen_port,
                data_dir.display(),
                options.rejoin_window_secs,
                redis.url(),
                options.region,
                options.extra_toml,
            ),
        )?;
        let (child, base_url) = crate::spawn_server_process(binary, &config).await?;
        let port = base_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("the node's port")?;
        Ok(Node {
            name: name.to_owned(),
            base_url,
            port,
            child: Some(child),
            data_dir,
        })
    }

    pub fn ws_url(&self) -> String {
        format!("{}/ws", self.base_url.replacen("http", "ws", 1))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// `kill -9`.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit (at most `within`).
    pub async fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = child.id().context("no pid")?;
        // SAFETY: kill(2) on the pid of a child this lab started and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        Ok(tokio::time::timeout(within, child.wait()).await??)
    }

    pub async fn create_consultation(&self) -> Result<CreatedConsultation> {
        let res = reqwest::Client::new()
            .post(format!("{}/api/v1/consultations", self.base_url))
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({}))
            .send()
            .await?
            .error_for_status()?;
        Ok(res.json().await?)
    }

    /// A join token for `role` in consultation `id`.
    pub async fn token(&self, id: &str, role: &str) -> Result<String> {
        let res = reqwest::Client::new()
            .post(format!(
                "{}/api/v1/consultations/{id}/tokens",
                self.base_url
            ))
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({ "role": role }))
            .send()
            .await?
            .error_for_status()?;
        let body: serde_json::Value = res.json().await?;
        body["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in the answer")
    }

    /// The event names of a consultation's audit log, in its order.
    pub async fn audit(&self, id: &str) -> Result<Vec<String>> {
        let log: Vec<serde_json::Value> = reqwest::Client::new()
            .get(format!("{}/api/v1/consultations/{id}/audit", self.base_url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(log
            .iter()
            .filter_map(|e| e["event"].as_str().map(str::to_owned))
            .collect())
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::Client::new()
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The value of one sample line of `/metrics` (0 if absent).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics().await?, name))
    }

    /// `/readyz`: (ready, body).
    pub async fn ready(&self) -> Result<(bool, String)> {
        let res = reqwest::Client::new()
            .get(format!("{}/readyz", self.base_url))
            .send()
            .await?;
        let ok = res.status().is_success();
        Ok((ok, res.text().await?))
    }
}

/// The value of the sample `name` (with its labels, as written) in Prometheus text; 0 if absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// `haproxy` in TCP mode with one frontend per node: each sends to its node first and to the
/// others when it is down (`backup` servers, health-checked on `/healthz` every 200 ms, with
/// redispatch on a refused connection), so a test places each participant on a node and still
/// sees it fail over through the load balancer.
pub struct Haproxy {
    /// One listening port per node, in the nodes' order.
    pub ports: Vec<u16>,
    child: Child,
}

impl Haproxy {
    pub async fn start(dir: &Path, nodes: &[&Node]) -> Result<Self> {
        let mut cfg = String::from(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 1s\n  \
             timeout client 120s\n  timeout server 120s\n  retries 3\n  option redispatch\n",
        );
        let mut ports = Vec::new();
        for (i, primary) in nodes.iter().enumerate() {
            let port = free_port()?;
            ports.push(port);
            cfg.push_str(&format!(
                "frontend to_{i}\n  bind 127.0.0.1:{port}\n  default_backend be_{i}\n\
                 backend be_{i}\n  option httpchk GET /healthz\n"
            ));
            for node in nodes {
                let backup = if node.name == primary.name {
                    ""
                } else {
                    " backup"
                };
                cfg.push_str(&format!(
                    "  server {} 127.0.0.1:{} check inter 200 fall 1 rise 2{backup}\n",
                    node.name, node.port
                ));
            }
        }
        let child = run_haproxy(&dir.join("haproxy.cfg"), &cfg, &ports).await?;
        Ok(Haproxy { ports, child })
    }

    /// The signaling URL of frontend `i` (node `i` first).
    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://127.0.0.1:{}/ws", self.ports[i])
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let until = Instant::now() + within;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

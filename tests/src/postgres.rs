//! A real PostgreSQL server for the store suites (`tests/postgres.rs`): Debian's `initdb` and
//! `postgres` (package `postgresql`, 15) from `/usr/lib/postgresql/15/bin`, a cluster in a
//! temporary directory, listening on a free loopback port only (its Unix socket in the same
//! directory). PostgreSQL refuses to run as root, so as root the cluster belongs to, and the
//! server runs as, the `postgres` user; otherwise as whoever runs the tests. It is stopped by
//! PID (SIGINT, PostgreSQL's fast shutdown) when dropped, and may be stopped and started again
//! on the same port and data to simulate an outage.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where Debian puts PostgreSQL 15's server binaries.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Why PostgreSQL cannot run here, if it cannot (for [`crate::skip`]).
pub fn unavailable() -> Option<String> {
    for tool in ["initdb", "postgres"] {
        if !Path::new(BIN_DIR).join(tool).exists() {
            return Some(format!(
                "{BIN_DIR}/{tool} is missing (apt-get install postgresql)"
            ));
        }
    }
    if is_root() && account("postgres").is_none() {
        return Some("running as root and there is no postgres user to run PostgreSQL as".into());
    }
    None
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of a user, from `/etc/passwd`.
fn account(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// A PostgreSQL cluster of our own on 127.0.0.1.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    /// `initdb` in a new temporary directory, then starts the server.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let owner = if is_root() {
            Some(account("postgres").context("no postgres user")?)
        } else {
            None
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let mut pg = Postgres {
            port: 0,
            dir,
            owner,
            child: None,
        };
        let out = pg
            .command("initdb")
            .args(["-D", "data", "-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"])
            .stdout(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // A port the OS says is free; if another test takes it first, the start fails and we try
        // another.
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(Path::new(BIN_DIR).join(tool));
        cmd.current_dir(self.dir.path()).env_remove("PGDATA");
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid).env("HOME", self.dir.path());
        }
        cmd
    }

    /// The cluster's directory (its log is `postgres.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for the database `db` as the superuser (trust authentication on loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again) on its port and data; returns once it accepts connections.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.dir.path().join("postgres.log"), Some(uid), Some(gid))?;
        }
        let socket_dir = self.dir.path().to_owned();
        let child = self
            .command("postgres")
            .args(["-D", "data", "-p", &self.port.to_string()])
            .arg("-k")
            .arg(&socket_dir)
            // Loopback only; durability is not what these tests are about, speed is.
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=60"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                self.child = None;
                bail!(
                    "postgres exited at start ({status}); see {}",
                    self.log_path().display()
                );
            }
            if self.ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Whether the server answers (`pg_isready`, or a TCP connect where that is missing).
    fn ready(&self) -> bool {
        let isready = Path::new(BIN_DIR).join("pg_isready");
        if isready.exists() {
            return Command::new(isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
        }
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// The postmaster's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server by its PID (fast shutdown: clients are disconnected) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("postgres did not stop within 15 s; killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Creates a database (one per test, so tests on one cluster stay apart).
    pub async fn create_database(&self, name: &str) -> Result<String> {
        let (client, conn) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(self.url(name))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

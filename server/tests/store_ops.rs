//! The store as an administrator runs it for years: schema migrations from the first release,
//! file modes, backups of a running server restored into a working one, retention.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bedside_protocol::ConsultationId;
use bedside_server::store::{Store, StoreError, schema_version};
use bedside_server::{Config, Server, ServerError};

const V0_STORE: &str = include_str!("fixtures/store-v0.sql");

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A data directory holding the first release's store, as that release left it (0755/0644).
fn v0_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bedside.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(V0_STORE).unwrap();
    drop(conn);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

#[tokio::test]
async fn a_store_from_the_first_release_is_migrated_and_keeps_its_data() {
    let dir = v0_store();
    let store = Store::open(dir.path()).unwrap();
    let (version, indexes) = store
        .call(|c| {
            let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let i: Vec<String> = c
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok((v, i))
        })
        .await
        .unwrap();
    assert_eq!(version, schema_version());
    assert!(indexes.contains(&"audit_by_time".to_owned()), "{indexes:?}");
    assert!(indexes.contains(&"consultations_by_end".to_owned()));
    // Everything the first release wrote is still there and means the same.
    assert_eq!(
        store
            .setting_or_init("token_secret", || "new".into())
            .await
            .unwrap(),
        "v0-token-secret-0123456789abcdef"
    );
    assert_eq!(
        store.redeem_invite([1; 32], 1_800_000_000).await.unwrap(),
        Some(ConsultationId("c-open".into()))
    );
    let log = store
        .audit_log(ConsultationId("c-open".into()))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        store
            .seats(ConsultationId("c-open".into()))
            .await
            .unwrap()
            .len(),
        1
    );
    // The 0644 file the first release made is tightened.
    assert_eq!(mode(&dir.path().join("bedside.db")), 0o600);
    drop(store);
    // Opening again is a no-op.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.consultations_since(0).await.unwrap().len(), 2);
}

#[test]
fn a_store_newer_than_the_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("bedside.db")).unwrap();
    conn.execute_batch(V0_STORE).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    match Store::open(dir.path()) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a store from a newer release was opened"),
    }
}

#[tokio::test]
async fn retention_prunes_old_audit_and_ended_consultations_only() {
    let dir = v0_store();
    let store = Store::open(dir.path()).unwrap();
    // Ten days after the open consultation's events.
    let now = 1_700_000_000 + 10 * 86_400;
    let kept = store.prune(0, now).await.unwrap();
    assert_eq!(kept.audit_rows, 0, "retention 0 keeps the audit log");
    assert_eq!(kept.consultations, 0);
    assert_eq!(store.consultations_since(0).await.unwrap().len(), 2);

    let pruned = store.prune(30, now).await.unwrap();
    assert_eq!(pruned.consultations, 1, "{pruned:?}");
    assert_eq!(pruned.audit_rows, 1, "{pruned:?}");
    let left = store.consultations_since(0).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id.0, "c-open");
    assert_eq!(
        store
            .audit_log(ConsultationId("c-open".into()))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        store
            .audit_log(ConsultationId("c-ended".into()))
            .await
            .unwrap()
            .is_empty()
    );
    // An invite past its expiry goes whatever the retention.
    let pruned = store.prune(0, 4_000_000_001).await.unwrap();
    assert_eq!(pruned.invites, 1);
}

fn local_config(dir: &Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    config.turn.enabled = false;
    config
}

#[tokio::test]
async fn data_files_are_readable_by_their_owner_only() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let server = Server::bind(local_config(&dir)).await.unwrap();
    // A write, so that the write-ahead log and its index exist.
    server
        .state()
        .store
        .setting_or_init("probe", || "x".into())
        .await
        .unwrap();
    assert_eq!(mode(&dir), 0o700);
    for f in [
        "bedside.db",
        "bedside.db-wal",
        "bedside.db-shm",
        "admin-api-key",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
}

#[tokio::test]
async fn a_data_dir_others_can_enter_is_refused_once_it_holds_secrets() {
    let parent = tempfile::tempdir().unwrap();
    // Empty and 0755: made private before the first secret is written.
    let dir = parent.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Server::bind(local_config(&dir)).await.unwrap());
    assert_eq!(mode(&dir), 0o700);
    // Holding secrets and opened to others: refused, with what to run.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    match Server::bind(local_config(&dir)).await {
        Err(ServerError::DataDir(m)) => assert!(m.contains("chmod 700"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started on a world-readable data directory holding secrets"),
    }
    // Group access alone is the administrator's choice.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    drop(Server::bind(local_config(&dir)).await.unwrap());
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bedside-server"))
}

/// The real binary on free ports with its data in `dir`; returns it and its HTTP address.
fn start_server(dir: &Path) -> (Running, String) {
    let config = dir.with_extension("toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[turn.relay]\nlisten-udp = [\"127.0.0.1:0\"]\n\
         listen-tcp = [\"127.0.0.1:0\"]\n",
    )
    .unwrap();
    let mut child = bin()
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = (&mut lines)
        .map_while(Result::ok)
        .find(|l| l.contains("listening on"))
        .expect("the server said where it listens");
    // Keep reading what it says next.
    std::thread::spawn(move || lines.for_each(drop));
    (Running(Some(child)), common::http_addr_in(&listening))
}

/// `bedside-server SUBCOMMAND FILE --data-dir DIR`: (success, stderr).
fn subcommand(name: &str, file: &Path, dir: &Path) -> (bool, String) {
    let out = bin()
        .arg(name)
        .arg(file)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server process, stopped with SIGTERM when dropped (also when a test fails).
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

fn stop(mut server: Running) {
    let mut child = server.0.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

fn admin_key(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_owned()
}

mod common;
use common::http;

#[test]
fn a_backup_of_a_running_server_restores_into_a_working_one() {
    let parent = tempfile::tempdir().unwrap();
    let a = parent.path().join("a");
    let (server, addr) = start_server(&a);
    let key = admin_key(&a);
    let (status, body) = http(&addr, "POST", "/api/v1/consultations", Some(&key));
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cid = created["consultation_id"].as_str().unwrap().to_owned();
    // Audit events are written in batches (20 ms); reading the log writes what is pending.
    let audit = format!("/api/v1/consultations/{cid}/audit");
    let (_, body) = http(&addr, "GET", &audit, Some(&key));
    assert!(body.contains("created"), "{body}");

    // While it runs (and holds its lock).
    let backup = parent.path().join("clinic.backup");
    let out = subcommand("backup", &backup, &a);
    assert!(out.0, "{}", out.1);
    assert_eq!(mode(&backup), 0o600, "a backup holds the secrets");
    // A second backup to the same name is refused, the first kept.
    let again = subcommand("backup", &backup, &a);
    assert!(!again.0);
    // A restore under the running server is refused.
    let out = subcommand("restore", &backup, &a);
    assert!(!out.0);
    assert!(out.1.contains("another bedside-server"), "{}", out.1);
    stop(server);

    // Into a fresh machine's data directory.
    let b = parent.path().join("b");
    let out = subcommand("restore", &backup, &b);
    assert!(out.0, "{}", out.1);
    assert_eq!(mode(&b.join("bedside.db")), 0o600);
    let (server, addr) = start_server(&b);
    let key = admin_key(&b);
    let (status, body) = http(
        &addr,
        "GET",
        &format!("/api/v1/consultations/{cid}"),
        Some(&key),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        &addr,
        "GET",
        &format!("/api/v1/consultations/{cid}/audit"),
        Some(&key),
    );
    assert_eq!(status, 200);
    assert!(body.contains("created"), "{body}");
    let (status, body) = http(&addr, "GET", "/readyz", None);
    assert_eq!(status, 200, "{body}");
    stop(server);
    // The token secret came with it: tokens issued before the backup verify after the restore.
    let secret = |dir: &Path| -> String {
        rusqlite::Connection::open(dir.join("bedside.db"))
            .unwrap()
            .query_row(
                "SELECT value FROM settings WHERE key = 'token_secret'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(secret(&a), secret(&b));

    // Not a store: refused, nothing replaced.
    let junk = parent.path().join("junk");
    std::fs::write(&junk, "not a database").unwrap();
    let out = subcommand("restore", &junk, &b);
    assert!(!out.0);
    assert!(out.1.contains("not a bedside-server store"), "{}", out.1);
}

#[tokio::test]
async fn readiness_names_what_is_not_ready() {
    use bedside_server::health::Readiness;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(
        Readiness::new(store.clone(), None)
            .not_ready()
            .await
            .is_empty()
    );
    // A relay address nothing answers on (a port just released).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = Readiness::new(store.clone(), Some(silent));
    assert_eq!(r.not_ready().await, vec!["relay"]);
    r.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(r.not_ready().await, vec!["draining", "relay"]);
    let response = r.response().await;
    assert_eq!(response.status(), 503);
}

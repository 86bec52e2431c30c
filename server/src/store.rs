//! The store: consultations, invite codes, seats, generated secrets, doctor credentials and
//! the audit log. Nothing of the media, the chat, names, addresses or tokens is ever written:
//! invite codes and doctor credentials are kept as SHA-256 hashes and the audit log holds ids
//! and roles only.
//!
//! [`Store`] is one interface over two backends, chosen by `[store] backend`: [`Sqlite`] (the
//! default, one file in the data directory, for a single clinic) and [`postgres::Postgres`]
//! (a database shared by a fleet's nodes; its own module doc says how it behaves under
//! concurrency and through an outage). Both apply versioned migrations at start.
//!
//! SQLite: one worker thread owns the connection. [`Sqlite::call`] sends it a closure over a
//! channel and awaits the answer, so no async task blocks on the disk, no lock is contended and
//! no thread is created per query. Audit events are queued on the same channel without waiting
//! and written in batches, one transaction per burst (a storm of joins costs one commit per
//! batch, not one per join); the worker writes a batch after at most `AUDIT_BATCH_DELAY`, at
//! `AUDIT_BATCH_MAX` events, or before any query. Seats (ids, role, admission: never a name) are
//! persisted the same way, so a consultation survives a server restart.

pub mod postgres;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bedside_protocol::{ConsultationId, ParticipantId, Role};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: cannot create {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("store: the worker stopped")]
    Gone,
    #[error(
        "store: {path} has schema version {found}, newer than this server knows ({known}); \
         run the release that wrote it, or restore a backup"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("store: {0} is not a bedside-server store")]
    NotAStore(String),
    #[error("store (PostgreSQL): {0}")]
    Postgres(String),
    #[error("store: the database did not answer in time")]
    Unavailable,
    #[error("store: {0}")]
    Config(String),
    #[error("store: {0} works on the SQLite store only")]
    SqliteOnly(&'static str),
}

/// What happened, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    Created,
    InviteIssued,
    TokenIssued,
    Joined,
    Admitted,
    Denied,
    Disconnected,
    Resumed,
    Left,
    TimedOut,
    Ended,
    InviteRevoked,
}

impl AuditKind {
    fn as_str(self) -> &'static str {
        match self {
            AuditKind::Created => "created",
            AuditKind::InviteIssued => "invite_issued",
            AuditKind::TokenIssued => "token_issued",
            AuditKind::Joined => "joined",
            AuditKind::Admitted => "admitted",
            AuditKind::Denied => "denied",
            AuditKind::Disconnected => "disconnected",
            AuditKind::Resumed => "resumed",
            AuditKind::Left => "left",
            AuditKind::TimedOut => "timed_out",
            AuditKind::Ended => "ended",
            AuditKind::InviteRevoked => "invite_revoked",
        }
    }
}

/// One line of the audit log: who (by id and role), what, when. Never a name or an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    pub at_ms: u64,
    pub consultation_id: ConsultationId,
    pub participant_id: Option<ParticipantId>,
    pub role: Option<Role>,
    pub event: AuditKind,
    /// Who caused it, when that is someone else (the doctor who admitted, say).
    pub actor_id: Option<ParticipantId>,
}

impl AuditEvent {
    pub fn new(cid: &ConsultationId, event: AuditKind) -> Self {
        AuditEvent {
            at_ms: now_ms(),
            consultation_id: cid.clone(),
            participant_id: None,
            role: None,
            event,
            actor_id: None,
        }
    }

    pub fn participant(mut self, pid: &ParticipantId, role: Role) -> Self {
        self.participant_id = Some(pid.clone());
        self.role = Some(role);
        self
    }

    pub fn actor(mut self, pid: &ParticipantId) -> Self {
        self.actor_id = Some(pid.clone());
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsultationRow {
    pub id: ConsultationId,
    pub created_at: u64,
    pub ended_at: Option<u64>,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Cmd {
    Call(Job),
    Audit(AuditEvent),
    Seat(SeatWrite),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A change to the persisted seats (see [`Store::seat_taken`]).
#[derive(Debug, Clone)]
enum SeatWrite {
    Taken {
        pid: ParticipantId,
        cid: ConsultationId,
        role: Role,
        admitted: bool,
        token: Option<JoinTokenId>,
    },
    Admitted(ParticipantId),
    /// The seat's newest resume token (its SHA-256).
    Resume(ParticipantId, [u8; 32]),
    /// A join token whose holder left: it seats no one until it expires.
    TokenSpent(JoinTokenId),
    Released(ParticipantId),
    AllReleased(ConsultationId),
}

/// A seat as persisted: enough to give it back after a restart, and nothing about the person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeatRow {
    pub participant_id: ParticipantId,
    pub role: Role,
    pub admitted: bool,
    /// SHA-256 of the newest resume token handed out for the seat.
    pub resume_hash: Option<[u8; 32]>,
    /// The join token a doctor or clinician took the seat with.
    pub token: Option<JoinTokenId>,
}

/// A join token's id (`sub`) and expiry (Unix seconds): what binds a doctor's or clinician's
/// token to the one seat it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinTokenId {
    pub id: String,
    pub expires_at: u64,
}

/// `[store]`: where the durable data lives (see `config.reference.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// The PostgreSQL database (a secret: it may hold a password).
    pub postgres_url: String,
    pub postgres_url_file: PathBuf,
    pub postgres_pool_size: usize,
    /// Audit events and seat changes kept in memory while the database is unreachable.
    pub outage_buffer: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreBackend {
    /// One file in the data directory, for a single clinic.
    #[default]
    Sqlite,
    /// A database shared by a fleet's nodes.
    Postgres,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            postgres_url: String::new(),
            postgres_url_file: PathBuf::new(),
            postgres_pool_size: 16,
            outage_buffer: 100_000,
        }
    }
}

/// The store's health for `/metrics` and `/readyz`: prometheus-client handles, whose clones
/// (in the metrics registry) share the values.
#[derive(Clone, Debug, Default)]
pub struct StoreHealth {
    /// 1 while the database answers.
    pub up: Gauge,
    /// Audit events and seat changes waiting in memory.
    pub buffered: Gauge,
    /// Writes dropped because the outage buffer was full.
    pub dropped: Counter,
}

/// A doctor credential as stored: never the secret (see `credentials.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRow {
    pub id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
}

/// The store: SQLite in the data directory (the default, one clinic) or PostgreSQL shared by
/// a fleet's nodes (`[store] backend = "postgres"`). One interface; the rest of the server
/// does not know which. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Sqlite),
    Postgres(postgres::Postgres),
}

/// Calls the same method on whichever backend this store has.
macro_rules! on_backend {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

impl Store {
    /// Opens (or creates) the SQLite store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Store {
            backend: Backend::Sqlite(Sqlite::open(dir)?),
        })
    }

    /// The store `config` asks for: SQLite in the data directory, or the PostgreSQL database
    /// of `store.postgres-url` (migrated before this returns).
    pub async fn from_config(config: &crate::Config) -> Result<Self, StoreError> {
        match config.store.backend {
            StoreBackend::Sqlite => Self::open(&config.data_dir()),
            StoreBackend::Postgres => {
                let url = &config.store.postgres_url;
                if url.is_empty() {
                    return Err(StoreError::Config(
                        "backend = \"postgres\" needs store.postgres-url (or \
                         store.postgres-url-file, or BEDSIDE_POSTGRES_URL)"
                            .into(),
                    ));
                }
                Ok(Store {
                    backend: Backend::Postgres(
                        postgres::Postgres::connect(url, &config.store).await?,
                    ),
                })
            }
        }
    }

    /// "sqlite" or "postgres".
    pub fn backend(&self) -> StoreBackend {
        match self.backend {
            Backend::Sqlite(_) => StoreBackend::Sqlite,
            Backend::Postgres(_) => StoreBackend::Postgres,
        }
    }

    /// Runs `f` on the SQLite connection, on the store's own thread (tests and tools; the
    /// server itself only uses the methods below).
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.call(f).await,
            Backend::Postgres(_) => Err(StoreError::SqliteOnly("Store::call")),
        }
    }

    /// Up, buffered and dropped writes, for `/metrics`.
    pub fn health(&self) -> &StoreHealth {
        on_backend!(self, b => b.health())
    }

    /// Records an audit event without waiting for the disk or the database.
    pub fn audit(&self, event: AuditEvent) {
        on_backend!(self, b => b.audit(event))
    }

    /// Persists a new seat, so that it survives a server restart (ids and role only).
    pub fn seat_taken(
        &self,
        cid: &ConsultationId,
        pid: &ParticipantId,
        role: Role,
        admitted: bool,
        token: Option<JoinTokenId>,
    ) {
        self.seat(SeatWrite::Taken {
            pid: pid.clone(),
            cid: cid.clone(),
            role,
            admitted,
            token,
        });
    }

    pub fn seat_admitted(&self, pid: &ParticipantId) {
        self.seat(SeatWrite::Admitted(pid.clone()));
    }

    pub fn seat_released(&self, pid: &ParticipantId) {
        self.seat(SeatWrite::Released(pid.clone()));
    }

    pub fn seats_released(&self, cid: &ConsultationId) {
        self.seat(SeatWrite::AllReleased(cid.clone()));
    }

    fn seat(&self, write: SeatWrite) {
        on_backend!(self, b => b.seat(write))
    }

    /// The persisted seats of a consultation (after every pending write).
    pub async fn seats(&self, cid: ConsultationId) -> Result<Vec<SeatRow>, StoreError> {
        on_backend!(self, b => b.seats(cid).await)
    }

    /// Waits until every audit event sent so far is written. On PostgreSQL, for a bounded time
    /// (see [`postgres::Postgres::flush_audit`]).
    pub async fn flush_audit(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.flush_audit().await)
    }

    /// A setting, created with `make` the first time it is asked for (by any node).
    pub async fn setting_or_init(
        &self,
        key: &'static str,
        make: impl FnOnce() -> String + Send + 'static,
    ) -> Result<String, StoreError> {
        on_backend!(self, b => b.setting_or_init(key, make).await)
    }

    pub async fn create_consultation(
        &self,
        id: ConsultationId,
        invite_hash: [u8; 32],
        invite_expires_at: u64,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.create_consultation(id, invite_hash, invite_expires_at).await)
    }

    pub async fn add_invite(
        &self,
        id: ConsultationId,
        invite_hash: [u8; 32],
        expires_at: u64,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.add_invite(id, invite_hash, expires_at).await)
    }

    pub async fn consultation(
        &self,
        id: ConsultationId,
    ) -> Result<Option<ConsultationRow>, StoreError> {
        on_backend!(self, b => b.consultation(id).await)
    }

    /// Consultations created since `since_unix`, newest first.
    pub async fn consultations_since(
        &self,
        since_unix: u64,
    ) -> Result<Vec<ConsultationRow>, StoreError> {
        on_backend!(self, b => b.consultations_since(since_unix).await)
    }

    /// The open consultation an unexpired invite code leads to.
    pub async fn redeem_invite(
        &self,
        hash: [u8; 32],
        now_unix: u64,
    ) -> Result<Option<ConsultationId>, StoreError> {
        on_backend!(self, b => b.redeem_invite(hash, now_unix).await)
    }

    /// Voids every invite code of a consultation; returns how many there were.
    pub async fn revoke_invites(&self, id: ConsultationId) -> Result<usize, StoreError> {
        on_backend!(self, b => b.revoke_invites(id).await)
    }

    /// Marks a consultation ended and voids its invites. False if it was unknown or ended.
    pub async fn end_consultation(&self, id: ConsultationId) -> Result<bool, StoreError> {
        on_backend!(self, b => b.end_consultation(id).await)
    }

    /// Answers when the store can be queried (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.ping().await)
    }

    /// The daily prune (see [`Sqlite::prune`]).
    pub async fn prune(&self, audit_retention_days: u32, now: u64) -> Result<Pruned, StoreError> {
        on_backend!(self, b => b.prune(audit_retention_days, now).await)
    }

    /// The audit log of one consultation, oldest first (after writing what is pending).
    pub async fn audit_log(&self, id: ConsultationId) -> Result<Vec<AuditEvent>, StoreError> {
        on_backend!(self, b => b.audit_log(id).await)
    }

    /// Keeps a new doctor credential (its SHA-256 only).
    pub async fn insert_credential(
        &self,
        row: CredentialRow,
        hash: [u8; 32],
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.insert_credential(row, hash).await)
    }

    /// Every doctor credential, newest first.
    pub async fn credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        on_backend!(self, b => b.credentials().await)
    }

    /// Revokes a credential (kept revoked at its first revocation). False if unknown.
    pub async fn revoke_credential(&self, id: String, now: u64) -> Result<bool, StoreError> {
        on_backend!(self, b => b.revoke_credential(id, now).await)
    }
}

/// How long an audit event may wait for company before it is written.
const AUDIT_BATCH_DELAY: Duration = Duration::from_millis(20);
/// The most audit events written in one transaction.
const AUDIT_BATCH_MAX: usize = 1024;

/// The SQLite backend (the default): a handle cheap to clone.
#[derive(Clone)]
pub struct Sqlite {
    tx: mpsc::Sender<Cmd>,
    /// A second connection for the point reads on the join path (see [`Sqlite::read`]).
    reader: std::sync::Arc<std::sync::Mutex<Connection>>,
    health: StoreHealth,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The schema's history: `MIGRATIONS[n]` takes a store from `user_version` n to n + 1.
/// Append only; never edit a released step. Version 0 is the first release's store (the tables
/// of step 1, created with `IF NOT EXISTS`, and `user_version` 0), so step 1 is a no-op there.
/// `tests/store_ops.rs` upgrades a store made with the first release's schema.
pub const MIGRATIONS: &[&str] = &[
    SCHEMA,
    // 2: the daily prune finds old audit rows and ended consultations by index.
    "CREATE INDEX IF NOT EXISTS audit_by_time ON audit(at_ms);
     CREATE INDEX IF NOT EXISTS consultations_by_end ON consultations(ended_at);",
    // 3: a seat's newest resume token (its hash) and the join token it was taken with survive a
    // restart; join tokens whose holder left are spent until they expire; doctor credentials
    // have an audit log of their own (credentials.rs).
    "ALTER TABLE seats ADD COLUMN resume_hash BLOB;
     ALTER TABLE seats ADD COLUMN token_id TEXT;
     ALTER TABLE seats ADD COLUMN token_expires_at INTEGER;
     CREATE TABLE IF NOT EXISTS spent_join_tokens (
         token_id TEXT PRIMARY KEY,
         expires_at INTEGER NOT NULL
     );
     CREATE TABLE IF NOT EXISTS credential_audit (
         id INTEGER PRIMARY KEY,
         at_ms INTEGER NOT NULL,
         credential_id TEXT NOT NULL,
         event TEXT NOT NULL,
         consultation_id TEXT
     );
     CREATE INDEX IF NOT EXISTS credential_audit_by_id ON credential_audit(credential_id, id);",
];

/// The schema version this server writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the store at `path` to [`schema_version`], one transaction per step.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > schema_version() {
        return Err(StoreError::TooNew {
            path: path.display().to_string(),
            found,
            known: schema_version(),
        });
    }
    // A first-release store (version 0) already has the tables; a new file has none.
    let existed: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'settings'",
        [],
        |r| r.get(0),
    )?;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", step as i64 + 1)?;
        tx.commit()?;
        if existed {
            tracing::info!(version = step + 1, "store schema migrated");
        }
    }
    Ok(())
}

/// The first release's schema (version 0); kept for the migration from it.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consultations (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    ended_at INTEGER
);
CREATE TABLE IF NOT EXISTS invites (
    code_hash BLOB PRIMARY KEY,
    consultation_id TEXT NOT NULL REFERENCES consultations(id),
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS invites_by_consultation ON invites(consultation_id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    consultation_id TEXT NOT NULL,
    participant_id TEXT,
    role TEXT,
    event TEXT NOT NULL,
    actor_id TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_consultation ON audit(consultation_id, id);
CREATE TABLE IF NOT EXISTS seats (
    participant_id TEXT PRIMARY KEY,
    consultation_id TEXT NOT NULL,
    role TEXT NOT NULL,
    admitted INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS seats_by_consultation ON seats(consultation_id);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS doctor_credentials (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
";

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Sqlite {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        };
        crate::filemodes::create_private_dir(dir).map_err(dir_err)?;
        let path = dir.join("bedside.db");
        // Created 0600 before SQLite opens it: SQLite gives `-wal` and `-shm` the same mode.
        crate::filemodes::create_private_file(&path).map_err(dir_err)?;
        let mut conn = open_conn(&path)?;
        migrate(&mut conn, &path)?;
        // A store from a release that made them 0644 is tightened.
        for f in ["bedside.db", "bedside.db-wal", "bedside.db-shm"] {
            crate::filemodes::make_private(&dir.join(f)).map_err(dir_err)?;
        }
        let reader = open_conn(&path)?;
        reader.pragma_update(None, "query_only", true)?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("bedside-store".into())
            .spawn(move || worker(conn, rx))
            .expect("spawn the store worker");
        let health = StoreHealth::default();
        health.up.set(1);
        Ok(Sqlite {
            tx,
            reader: std::sync::Arc::new(std::sync::Mutex::new(reader)),
            health,
        })
    }

    /// Runs a point read inline on the read connection. Only for indexed single-row lookups on
    /// the join path, which take microseconds: a round trip through the worker thread would
    /// serialize every join of a storm behind one queue (measured with `cargo xtask
    /// bench-signaling`: p50 join→admitted 250-270 ms in a 5,000-join storm that way, 60-110 ms
    /// inline).
    fn read<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// Runs `f` on the store's connection, on the store's own thread.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = done.send(f(conn));
        });
        self.tx.send(Cmd::Call(job)).map_err(|_| StoreError::Gone)?;
        answer
            .await
            .map_err(|_| StoreError::Gone)?
            .map_err(StoreError::from)
    }

    /// Records an audit event without waiting for the disk.
    pub fn audit(&self, event: AuditEvent) {
        // If the worker is gone the server is shutting down; there is no one to tell.
        let _ = self.tx.send(Cmd::Audit(event));
    }

    /// Persists a seat change (ids and role only) without waiting for the disk.
    fn seat(&self, write: SeatWrite) {
        let _ = self.tx.send(Cmd::Seat(write));
    }

    /// The persisted seats of a consultation (after every pending write).
    pub async fn seats(&self, cid: ConsultationId) -> Result<Vec<SeatRow>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT participant_id, role, admitted, resume_hash, token_id, token_expires_at
                 FROM seats WHERE consultation_id = ?1",
            )?;
            stmt.query_map([cid.0], |r| {
                let role: String = r.get(1)?;
                let hash: Option<Vec<u8>> = r.get(3)?;
                let token: Option<String> = r.get(4)?;
                Ok(SeatRow {
                    participant_id: ParticipantId(r.get(0)?),
                    role: parse_role(&role).unwrap_or(Role::Patient),
                    admitted: r.get(2)?,
                    resume_hash: hash.and_then(|h| h.try_into().ok()),
                    token: token.map(|id| JoinTokenId {
                        id,
                        expires_at: r.get::<_, Option<u64>>(5).ok().flatten().unwrap_or(0),
                    }),
                })
            })?
            .collect()
        })
        .await
    }

    /// Waits until every audit event sent so far is written.
    pub async fn flush_audit(&self) -> Result<(), StoreError> {
        let (done, written) = tokio::sync::oneshot::channel();
        self.tx
            .send(Cmd::Flush(done))
            .map_err(|_| StoreError::Gone)?;
        written.await.map_err(|_| StoreError::Gone)
    }

    /// A setting, created with `make` the first time it is asked for.
    pub async fn setting_or_init(
        &self,
        key: &'static str,
        make: impl FnOnce() -> String + Send + 'static,
    ) -> Result<String, StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let found: Option<String> = tx
                .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                    r.get(0)
                })
                .optional()?;
            let value = match found {
                Some(v) => v,
                None => {
                    let v = make();
                    tx.execute(
                        "INSERT INTO settings(key, value) VALUES (?1, ?2)",
                        params![key, v],
                    )?;
                    v
                }
            };
            tx.commit()?;
            Ok(value)
        })
        .await
    }

    pub async fn create_consultation(
        &self,
        id: ConsultationId,
        invite_hash: [u8; 32],
        invite_expires_at: u64,
    ) -> Result<(), StoreError> {
        let now = now_ms() / 1000;
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.prepare_cached("INSERT INTO consultations(id, created_at) VALUES (?1, ?2)")?
                .execute(params![id.0, now])?;
            tx.prepare_cached(
                "INSERT INTO invites(code_hash, consultation_id, expires_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![&invite_hash[..], id.0, invite_expires_at])?;
            tx.commit()
        })
        .await
    }

    pub async fn add_invite(
        &self,
        id: ConsultationId,
        invite_hash: [u8; 32],
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO invites(code_hash, consultation_id, expires_at) VALUES (?1, ?2, ?3)",
                params![&invite_hash[..], id.0, expires_at],
            )
            .map(drop)
        })
        .await
    }

    pub async fn consultation(
        &self,
        id: ConsultationId,
    ) -> Result<Option<ConsultationRow>, StoreError> {
        self.read(move |c| {
            c.prepare_cached("SELECT id, created_at, ended_at FROM consultations WHERE id = ?1")?
                .query_row([id.0], row_to_consultation)
                .optional()
        })
    }

    /// Consultations created since `since_unix`, newest first.
    pub async fn consultations_since(
        &self,
        since_unix: u64,
    ) -> Result<Vec<ConsultationRow>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, created_at, ended_at FROM consultations
                 WHERE created_at >= ?1 ORDER BY created_at DESC, rowid DESC LIMIT 1000",
            )?;
            stmt.query_map([since_unix], row_to_consultation)?.collect()
        })
        .await
    }

    /// The open consultation an unexpired invite code leads to.
    pub async fn redeem_invite(
        &self,
        hash: [u8; 32],
        now_unix: u64,
    ) -> Result<Option<ConsultationId>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT i.consultation_id FROM invites i JOIN consultations c ON c.id = i.consultation_id
                 WHERE i.code_hash = ?1 AND i.expires_at > ?2 AND c.ended_at IS NULL",
            )?
            .query_row(params![&hash[..], now_unix], |r| Ok(ConsultationId(r.get(0)?)))
            .optional()
        })
    }

    /// Voids every invite code of a consultation; returns how many there were.
    pub async fn revoke_invites(&self, id: ConsultationId) -> Result<usize, StoreError> {
        self.call(move |c| c.execute("DELETE FROM invites WHERE consultation_id = ?1", [&id.0]))
            .await
    }

    /// Marks a consultation ended and voids its invites. False if it was unknown or ended.
    pub async fn end_consultation(&self, id: ConsultationId) -> Result<bool, StoreError> {
        let now = now_ms() / 1000;
        self.call(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE consultations SET ended_at = ?2 WHERE id = ?1 AND ended_at IS NULL",
                params![id.0, now],
            )?;
            tx.execute("DELETE FROM invites WHERE consultation_id = ?1", [&id.0])?;
            tx.execute("DELETE FROM seats WHERE consultation_id = ?1", [&id.0])?;
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }

    /// Answers when the worker runs and the database file is readable (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(|c| c.query_row("SELECT count(*) FROM settings", [], |_| Ok(())))
            .await
    }

    /// The daily prune: expired invites and the seats of ended consultations always; with a
    /// retention of `audit_retention_days` (0: keep everything), audit rows older than that and
    /// the consultations that ended before then.
    pub async fn prune(&self, audit_retention_days: u32, now: u64) -> Result<Pruned, StoreError> {
        self.flush_audit().await?;
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM spent_join_tokens WHERE expires_at <= ?1",
                [now],
            )?;
            let mut pruned = Pruned {
                invites: tx.execute("DELETE FROM invites WHERE expires_at <= ?1", [now])?,
                seats: tx.execute(
                    "DELETE FROM seats WHERE consultation_id IN
                     (SELECT id FROM consultations WHERE ended_at IS NOT NULL)",
                    [],
                )?,
                ..Pruned::default()
            };
            if audit_retention_days > 0 {
                let cutoff = now.saturating_sub(u64::from(audit_retention_days) * 86_400);
                pruned.audit_rows =
                    tx.execute("DELETE FROM audit WHERE at_ms < ?1", [cutoff * 1000])?;
                tx.execute(
                    "DELETE FROM invites WHERE consultation_id IN
                     (SELECT id FROM consultations WHERE ended_at < ?1)",
                    [cutoff],
                )?;
                pruned.consultations =
                    tx.execute("DELETE FROM consultations WHERE ended_at < ?1", [cutoff])?;
            }
            tx.commit()?;
            Ok(pruned)
        })
        .await
    }

    /// The audit log of one consultation, oldest first (after writing what is pending).
    pub async fn audit_log(&self, id: ConsultationId) -> Result<Vec<AuditEvent>, StoreError> {
        self.flush_audit().await?;
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, consultation_id, participant_id, role, event, actor_id
                 FROM audit WHERE consultation_id = ?1 ORDER BY id",
            )?;
            stmt.query_map([id.0], |r| {
                let role: Option<String> = r.get(3)?;
                let event: String = r.get(4)?;
                Ok(AuditEvent {
                    at_ms: r.get(0)?,
                    consultation_id: ConsultationId(r.get(1)?),
                    participant_id: r.get::<_, Option<String>>(2)?.map(ParticipantId),
                    role: role.as_deref().and_then(parse_role),
                    event: parse_kind(&event).unwrap_or(AuditKind::Created),
                    actor_id: r.get::<_, Option<String>>(5)?.map(ParticipantId),
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn insert_credential(
        &self,
        row: CredentialRow,
        hash: [u8; 32],
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.prepare_cached(
                "INSERT INTO doctor_credentials(id, secret_hash, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![row.id, &hash[..], row.created_at, row.expires_at])
            .map(drop)
        })
        .await
    }

    pub async fn credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        self.call(|c| {
            let mut q = c.prepare_cached(
                "SELECT id, created_at, expires_at, revoked_at FROM doctor_credentials \
                 ORDER BY created_at DESC, id",
            )?;
            q.query_map([], |r| {
                Ok(CredentialRow {
                    id: r.get(0)?,
                    created_at: r.get(1)?,
                    expires_at: r.get(2)?,
                    revoked_at: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn revoke_credential(&self, id: String, now: u64) -> Result<bool, StoreError> {
        self.call(move |c| {
            c.prepare_cached(
                "UPDATE doctor_credentials SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            )?
            .execute(params![id, now])
            .map(|n| n > 0)
        })
        .await
    }

    async fn valid_credential(
        &self,
        hash: [u8; 32],
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        self.call(move |c| {
            c.prepare_cached(
                "SELECT id FROM doctor_credentials \
                 WHERE secret_hash = ?1 AND revoked_at IS NULL AND expires_at > ?2",
            )?
            .query_row(params![&hash[..], now], |r| r.get::<_, String>(0))
            .optional()
        })
        .await
    }

    /// Always up: the file is local, and a failed write is logged, not retried.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }
}

/// Resume and join token bindings (the hardening of tokens): kept in a block of their own.
impl Store {
    /// The newest resume token handed out for a seat (its SHA-256), so that after a restart only
    /// that one resumes the seat.
    pub fn seat_resume_token(&self, pid: &ParticipantId, hash: [u8; 32]) {
        self.seat(SeatWrite::Resume(pid.clone(), hash));
    }

    /// A join token whose holder left: spent until it expires, across restarts.
    pub fn join_token_spent(&self, token: JoinTokenId) {
        self.seat(SeatWrite::TokenSpent(token));
    }

    /// Whether a join token was spent (its holder left), as far as the store knows.
    pub async fn is_join_token_spent(&self, id: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sqlite(b) => b.is_join_token_spent(id),
            Backend::Postgres(b) => b.is_join_token_spent(id).await,
        }
    }

    /// The credential with this hash if it is known, unexpired and unrevoked: its id.
    pub async fn valid_credential(
        &self,
        hash: [u8; 32],
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        on_backend!(self, b => b.valid_credential(hash, now).await)
    }

    /// Appends one line to a doctor credential's own audit log.
    pub async fn credential_event(
        &self,
        id: String,
        event: &'static str,
        cid: Option<String>,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.credential_event(id, event, cid).await)
    }

    /// A doctor credential's audit log, oldest first.
    pub async fn credential_audit(&self, id: String) -> Result<Vec<CredentialEvent>, StoreError> {
        on_backend!(self, b => b.credential_audit(id).await)
    }
}

/// One line of a doctor credential's audit log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CredentialEvent {
    pub at_ms: u64,
    pub event: String,
    pub consultation_id: Option<String>,
}

impl Sqlite {
    fn is_join_token_spent(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM spent_join_tokens WHERE token_id = ?1")?
                .query_row([id], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    async fn credential_event(
        &self,
        id: String,
        event: &'static str,
        cid: Option<String>,
    ) -> Result<(), StoreError> {
        let at = now_ms();
        self.call(move |c| {
            c.prepare_cached(
                "INSERT INTO credential_audit(at_ms, credential_id, event, consultation_id) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![at, id, event, cid])
            .map(drop)
        })
        .await
    }

    async fn credential_audit(&self, id: String) -> Result<Vec<CredentialEvent>, StoreError> {
        self.call(move |c| {
            let mut q = c.prepare_cached(
                "SELECT at_ms, event, consultation_id FROM credential_audit \
                 WHERE credential_id = ?1 ORDER BY id",
            )?;
            q.query_map([id], |r| {
                Ok(CredentialEvent {
                    at_ms: r.get(0)?,
                    event: r.get(1)?,
                    consultation_id: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
    }
}

/// What one prune deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub invites: usize,
    pub seats: usize,
    pub audit_rows: usize,
    pub consultations: usize,
}

/// How many pages a backup step copies before it lets the server write again.
const BACKUP_PAGES_PER_STEP: std::ffi::c_int = 256;

/// Copies the store in `data_dir` to `dest` (a new file, mode 0600) with SQLite's online backup
/// API: consistent even while the server runs and writes, which a file copy of a WAL database
/// is not. The copy holds the token and relay secrets.
pub fn backup_file(data_dir: &Path, dest: &Path) -> Result<(), StoreError> {
    let src_path = data_dir.join("bedside.db");
    if !src_path.exists() {
        return Err(StoreError::NotAStore(src_path.display().to_string()));
    }
    let dest_err = |source| StoreError::Dir {
        path: dest.display().to_string(),
        source,
    };
    if dest.exists() {
        return Err(dest_err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the backup file exists; choose a new name",
        )));
    }
    crate::filemodes::create_private_file(dest).map_err(dest_err)?;
    let result = (|| -> Result<(), StoreError> {
        let src =
            Connection::open_with_flags(&src_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        src.busy_timeout(Duration::from_secs(5))?;
        let mut dst = Connection::open(dest)?;
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
        backup.run_to_completion(BACKUP_PAGES_PER_STEP, Duration::from_millis(5), None)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

/// Replaces the store in `data_dir` with the backup at `src`, after checking it is a sound
/// bedside store no newer than this server. The server must be stopped (the binary holds the
/// data directory's lock while it runs, and `restore` takes it).
pub fn restore_file(src: &Path, data_dir: &Path) -> Result<(), StoreError> {
    let not_store = || StoreError::NotAStore(src.display().to_string());
    {
        let backup = Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|_| not_store())?;
        let ok: String = backup
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|_| not_store())?;
        let has_settings: bool = backup
            .query_row(
                "SELECT count(*) = 1 FROM sqlite_master WHERE type = 'table' AND name = 'settings'",
                [],
                |r| r.get(0),
            )
            .map_err(|_| not_store())?;
        if ok != "ok" || !has_settings {
            return Err(not_store());
        }
        let version: i64 = backup.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > schema_version() {
            return Err(StoreError::TooNew {
                path: src.display().to_string(),
                found: version,
                known: schema_version(),
            });
        }
    }
    let dir_err = |source| StoreError::Dir {
        path: data_dir.display().to_string(),
        source,
    };
    crate::filemodes::create_private_dir(data_dir).map_err(dir_err)?;
    let path = data_dir.join("bedside.db");
    crate::filemodes::create_private_file(&path).map_err(dir_err)?;
    let mut conn = open_conn(&path)?;
    conn.restore(
        rusqlite::MAIN_DB,
        src,
        None::<fn(rusqlite::backup::Progress)>,
    )?;
    migrate(&mut conn, &path)?;
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
    Ok(())
}

fn row_to_consultation(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConsultationRow> {
    Ok(ConsultationRow {
        id: ConsultationId(r.get(0)?),
        created_at: r.get(1)?,
        ended_at: r.get(2)?,
    })
}

fn parse_role(s: &str) -> Option<Role> {
    [Role::Doctor, Role::Clinician, Role::Patient]
        .into_iter()
        .find(|r| r.as_str() == s)
}

fn parse_kind(s: &str) -> Option<AuditKind> {
    use AuditKind::*;
    [
        Created,
        InviteIssued,
        TokenIssued,
        Joined,
        Admitted,
        Denied,
        Disconnected,
        Resumed,
        Left,
        TimedOut,
        Ended,
        InviteRevoked,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

fn worker(mut conn: Connection, rx: mpsc::Receiver<Cmd>) {
    let mut pending: Vec<AuditEvent> = Vec::new();
    let mut seats: Vec<SeatWrite> = Vec::new();
    let mut flushes = Vec::new();
    // When the oldest unwritten audit event arrived.
    let mut oldest: Option<Instant> = None;
    loop {
        let cmd = match oldest {
            None => match rx.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => break,
            },
            Some(since) => {
                let left = AUDIT_BATCH_DELAY.saturating_sub(since.elapsed());
                match rx.recv_timeout(left) {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        match cmd {
            Some(Cmd::Call(job)) => {
                // A query sees every write queued before it.
                write_batch(&mut conn, &mut pending, &mut seats);
                oldest = None;
                job(&mut conn)
            }
            Some(Cmd::Audit(event)) => {
                oldest.get_or_insert_with(Instant::now);
                pending.push(event);
            }
            Some(Cmd::Seat(write)) => {
                oldest.get_or_insert_with(Instant::now);
                seats.push(write);
            }
            Some(Cmd::Flush(done)) => flushes.push(done),
            None => {}
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= AUDIT_BATCH_DELAY)
            || pending.len() + seats.len() >= AUDIT_BATCH_MAX
            || !flushes.is_empty();
        if due {
            write_batch(&mut conn, &mut pending, &mut seats);
            oldest = None;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
    write_batch(&mut conn, &mut pending, &mut seats);
}

/// Writes queued audit events and seat changes in one transaction.
fn write_batch(conn: &mut Connection, pending: &mut Vec<AuditEvent>, seats: &mut Vec<SeatWrite>) {
    if pending.is_empty() && seats.is_empty() {
        return;
    }
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        for write in seats.iter() {
            match write {
                SeatWrite::Taken {
                    pid,
                    cid,
                    role,
                    admitted,
                    token,
                } => tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO seats(participant_id, consultation_id, role, admitted,
                         token_id, token_expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        pid.0,
                        cid.0,
                        role.as_str(),
                        admitted,
                        token.as_ref().map(|t| &t.id),
                        token.as_ref().map(|t| t.expires_at),
                    ])?,
                SeatWrite::Resume(pid, hash) => tx
                    .prepare_cached("UPDATE seats SET resume_hash = ?2 WHERE participant_id = ?1")?
                    .execute(params![pid.0, &hash[..]])?,
                SeatWrite::TokenSpent(t) => tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO spent_join_tokens(token_id, expires_at) VALUES (?1, ?2)",
                    )?
                    .execute(params![t.id, t.expires_at])?,
                SeatWrite::Admitted(pid) => tx
                    .prepare_cached("UPDATE seats SET admitted = 1 WHERE participant_id = ?1")?
                    .execute([&pid.0])?,
                SeatWrite::Released(pid) => tx
                    .prepare_cached("DELETE FROM seats WHERE participant_id = ?1")?
                    .execute([&pid.0])?,
                SeatWrite::AllReleased(cid) => tx
                    .prepare_cached("DELETE FROM seats WHERE consultation_id = ?1")?
                    .execute([&cid.0])?,
            };
        }
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO audit(at_ms, consultation_id, participant_id, role, event, actor_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in pending.iter() {
                stmt.execute(params![
                    e.at_ms,
                    e.consultation_id.0,
                    e.participant_id.as_ref().map(|p| &p.0),
                    e.role.map(Role::as_str),
                    e.event.as_str(),
                    e.actor_id.as_ref().map(|p| &p.0),
                ])?;
            }
        }
        tx.commit()
    })();
    if let Err(e) = result {
        tracing::error!(error = %e, lost = pending.len() + seats.len(), "store write failed");
    }
    pending.clear();
    seats.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn consultations_invites_and_audit_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cid = ConsultationId("c-1".into());
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .create_consultation(cid.clone(), [1; 32], u64::MAX / 2)
                .await
                .unwrap();
            store.audit(AuditEvent::new(&cid, AuditKind::Created));
            store.audit(
                AuditEvent::new(&cid, AuditKind::Joined)
                    .participant(&ParticipantId("p-1".into()), Role::Doctor),
            );
            store.flush_audit().await.unwrap();
            let secret = store.setting_or_init("k", || "v1".into()).await.unwrap();
            assert_eq!(secret, "v1");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.setting_or_init("k", || "v2".into()).await.unwrap(),
            "v1"
        );
        assert_eq!(
            store.redeem_invite([1; 32], 10).await.unwrap(),
            Some(cid.clone())
        );
        assert_eq!(store.redeem_invite([2; 32], 10).await.unwrap(), None);
        let log = store.audit_log(cid.clone()).await.unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[1].event, AuditKind::Joined);
        assert_eq!(log[1].role, Some(Role::Doctor));
        assert!(store.end_consultation(cid.clone()).await.unwrap());
        assert!(!store.end_consultation(cid.clone()).await.unwrap());
        assert_eq!(store.redeem_invite([1; 32], 10).await.unwrap(), None);
    }

    #[tokio::test]
    async fn expired_invites_do_not_redeem() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cid = ConsultationId("c-2".into());
        store.create_consultation(cid, [9; 32], 1000).await.unwrap();
        assert!(store.redeem_invite([9; 32], 999).await.unwrap().is_some());
        assert!(store.redeem_invite([9; 32], 1000).await.unwrap().is_none());
    }
}

//! The PostgreSQL backend, for a fleet: every node of a region shares one database for the
//! durable data (consultations, invite hashes, seats as persisted, settings such as the token
//! secret, doctor credentials and the audit log). `tokio-postgres` through a `deadpool-postgres`
//! pool; no thread of its own.
//!
//! - **Point reads and admin calls** (a consultation, an invite, a credential, creating or
//!   ending a consultation) take a pooled connection and run under [`QUERY_TIMEOUT`]; while
//!   the database is unreachable they fail fast (the join is answered "try again").
//! - **Audit events and seat changes** never wait for the database. They go to one writer task
//!   over a channel; it keeps them in arrival order in a bounded in-memory queue
//!   ([`StoreConfig::outage_buffer`] writes) and writes them in batches, one transaction a
//!   batch, after at most [`BATCH_DELAY`] or at [`BATCH_MAX`]. When a batch fails the writer
//!   marks the store down (`bedside_store_up` 0, one log line, `/readyz` not ready), keeps the
//!   queue, and tries again with backoff ([`RETRY_MIN`] doubling to [`RETRY_MAX`]); when a batch
//!   goes through it logs how many buffered writes it wrote. Past the bound, new writes are
//!   dropped and counted (`bedside_store_dropped_writes_total`, one error log line per outage):
//!   the calls go on, and the log says the audit has a gap. Idle, it checks the database every
//!   [`PROBE_INTERVAL`], so an outage shows even when nothing is written.
//! - **Exactly once.** A batch whose commit succeeded but whose answer was lost is written
//!   again; each audit row carries `(writer, seq)` (a random id of this process and the
//!   write's number in it) under a unique constraint, and the insert skips rows already there.
//!   Seat changes are idempotent (upsert, update, delete).
//! - **Order.** `audit_log` orders by `at_ms` (the wall clock of the node that saw the event,
//!   in milliseconds) and then by the table's identity column. Events buffered through an
//!   outage keep their time and so land where they happened, not where they were written; the
//!   order across nodes is as good as their clocks (NTP keeps them within milliseconds, and
//!   causally related events on two nodes are at least a network round trip apart).
//! - **Migrations**: `bedside_schema_migrations` lists the applied versions; a node applies the
//!   missing ones at start, each in a transaction, under a session advisory lock so that nodes
//!   starting together do not race. A database newer than this server is refused.

use std::collections::VecDeque;
use std::time::Duration;

use bedside_protocol::{ConsultationId, ParticipantId, Role};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use super::{
    AuditEvent, ConsultationRow, CredentialRow, JoinTokenId, Pruned, SeatRow, SeatWrite,
    StoreConfig, StoreError, StoreHealth, now_ms, parse_kind, parse_role,
};

/// How long a query on the request path may take before it is answered with an error.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write may wait for company before it is written.
pub const BATCH_DELAY: Duration = Duration::from_millis(20);
/// The most writes in one transaction.
pub const BATCH_MAX: usize = 1024;
/// The first retry after a failed batch, doubling up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(250);
pub const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often an idle writer checks that the database answers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long [`Postgres::flush_audit`] waits for the writes before it lets the caller go on
/// (they stay queued).
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// The session advisory lock taken while migrating ("bedside" in ASCII, one 64-bit key).
const MIGRATION_LOCK: i64 = 0x0062_6564_7369_6465;

/// The schema's history: `MIGRATIONS[n]` is version n + 1. Append only; never edit a released
/// step.
pub const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE consultations (
    id TEXT PRIMARY KEY,
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    created_at BIGINT NOT NULL,
    ended_at BIGINT
);
CREATE INDEX consultations_by_created ON consultations(created_at);
CREATE INDEX consultations_by_end ON consultations(ended_at);
CREATE TABLE invites (
    code_hash BYTEA PRIMARY KEY,
    consultation_id TEXT NOT NULL REFERENCES consultations(id),
    expires_at BIGINT NOT NULL
);
CREATE INDEX invites_by_consultation ON invites(consultation_id);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    consultation_id TEXT NOT NULL,
    participant_id TEXT,
    role TEXT,
    event TEXT NOT NULL,
    actor_id TEXT,
    writer BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    UNIQUE (writer, seq)
);
CREATE INDEX audit_by_consultation ON audit(consultation_id, at_ms, id);
CREATE INDEX audit_by_time ON audit(at_ms);
CREATE TABLE seats (
    participant_id TEXT PRIMARY KEY,
    consultation_id TEXT NOT NULL,
    role TEXT NOT NULL,
    admitted BOOLEAN NOT NULL
);
CREATE INDEX seats_by_consultation ON seats(consultation_id);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE doctor_credentials (
    id TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
",
    // 2: a seat's newest resume token (its hash) and the join token it was taken with survive a
    // restart; join tokens whose holder left are spent until they expire; doctor credentials
    // have an audit log of their own (credentials.rs). The same step as SQLite's third.
    "
ALTER TABLE seats ADD COLUMN resume_hash BYTEA;
ALTER TABLE seats ADD COLUMN token_id TEXT;
ALTER TABLE seats ADD COLUMN token_expires_at BIGINT;
CREATE TABLE spent_join_tokens (
    token_id TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE TABLE credential_audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    credential_id TEXT NOT NULL,
    event TEXT NOT NULL,
    consultation_id TEXT
);
CREATE INDEX credential_audit_by_id ON credential_audit(credential_id, id);
",
];

/// The schema version this server writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

fn pg(e: impl std::fmt::Display) -> StoreError {
    StoreError::Postgres(e.to_string())
}

/// Runs `f` under [`QUERY_TIMEOUT`].
async fn timed<R>(f: impl Future<Output = Result<R, StoreError>>) -> Result<R, StoreError> {
    tokio::time::timeout(QUERY_TIMEOUT, f)
        .await
        .map_err(|_| StoreError::Unavailable)?
}

enum Cmd {
    Write(Write),
    /// Answered once every write sent before it is committed.
    Flush(oneshot::Sender<()>),
}

enum Write {
    Audit(AuditEvent),
    Seat(SeatWrite),
}

/// The PostgreSQL store: a pool and the writer task's queue. Cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    tx: mpsc::UnboundedSender<Cmd>,
    health: StoreHealth,
}

/// Applies the missing migrations (see the module doc). Returns the versions it applied.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i64>, StoreError> {
    client
        .query_one("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS bedside_schema_migrations (
                     version BIGINT PRIMARY KEY,
                     applied_at_ms BIGINT NOT NULL
                 )",
            )
            .await
            .map_err(pg)?;
        let found: i64 = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM bedside_schema_migrations",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        if found > schema_version() {
            return Err(StoreError::TooNew {
                path: "the PostgreSQL database".into(),
                found,
                known: schema_version(),
            });
        }
        let mut applied = Vec::new();
        for (step, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = step as i64 + 1;
            let tx = client.transaction().await.map_err(pg)?;
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO bedside_schema_migrations(version, applied_at_ms) VALUES ($1, $2)",
                &[&version, &(now_ms() as i64)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(version, "store schema migrated (PostgreSQL)");
            applied.push(version);
        }
        Ok(applied)
    }
    .await;
    let _ = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

impl Postgres {
    /// Connects to the database at `url` (a `postgresql://` URL or a `key=value` string),
    /// migrates it, and starts the writer task. The URL is never logged: it may hold a password.
    pub async fn connect(url: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        let mut pg_config: tokio_postgres::Config = url
            .parse()
            .map_err(|_| StoreError::Config("store.postgres-url is not a PostgreSQL URL".into()))?;
        pg_config
            .connect_timeout(QUERY_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .application_name("bedside-server");
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.postgres_pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(QUERY_TIMEOUT))
            .recycle_timeout(Some(QUERY_TIMEOUT))
            .build()
            .map_err(pg)?;
        {
            let mut client = pool.get().await.map_err(|e| {
                StoreError::Postgres(format!("cannot reach the database at start: {e}"))
            })?;
            migrate(&mut client).await?;
        }
        let health = StoreHealth::default();
        health.up.set(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            pool: pool.clone(),
            health: health.clone(),
            cap: config.outage_buffer.max(1),
            id: rand::random::<i64>(),
            queue: VecDeque::new(),
            next_seq: 0,
            waiters: Vec::new(),
            up: true,
            dropped_in_outage: 0,
        };
        tokio::spawn(writer.run(rx));
        Ok(Postgres { pool, tx, health })
    }

    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| {
            tracing::debug!(error = %e, "no database connection");
            StoreError::Unavailable
        })
    }

    fn send(&self, write: Write) {
        // If the writer is gone the server is shutting down; there is no one to tell.
        let _ = self.tx.send(Cmd::Write(write));
    }

    pub fn audit(&self, event: AuditEvent) {
        self.send(Write::Audit(event));
    }

    pub(super) fn seat(&self, write: SeatWrite) {
        self.send(Write::Seat(write));
    }

    /// Waits until every write sent so far is committed, for at most [`FLUSH_WAIT`] (not at all
    /// while the database is known to be down). Past that the writes stay queued and will be
    /// written when the database answers; the caller goes on (see ARCHITECTURE.md: during an
    /// outage an admission is told before it is committed).
    pub async fn flush_audit(&self) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(done))
            .map_err(|_| StoreError::Gone)?;
        if self.health.up.get() == 0 {
            return Ok(());
        }
        match tokio::time::timeout(FLUSH_WAIT, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Gone),
            Err(_) => {
                tracing::warn!("store slow or unreachable: writes kept in memory until it answers");
                Ok(())
            }
        }
    }

    pub async fn seats(&self, cid: ConsultationId) -> Result<Vec<SeatRow>, StoreError> {
        self.flush_audit().await?;
        timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT participant_id, role, admitted, resume_hash, token_id, token_expires_at
                     FROM seats WHERE consultation_id = $1",
                )
                .await
                .map_err(pg)?;
            let rows = client.query(&stmt, &[&cid.0]).await.map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| SeatRow {
                    participant_id: ParticipantId(r.get(0)),
                    role: parse_role(r.get(1)).unwrap_or(Role::Patient),
                    admitted: r.get(2),
                    resume_hash: r
                        .get::<_, Option<Vec<u8>>>(3)
                        .and_then(|h| h.try_into().ok()),
                    token: r.get::<_, Option<String>>(4).map(|id| JoinTokenId {
                        id,
                        expires_at: r.get::<_, Option<i64>>(5).unwrap_or(0) as u64,
                    }),
                })
                .collect())
        })
        .await
    }

    /// Safe when several nodes ask at once: the first insert wins and every node reads it.
    pub async fn setting_or_init(
        &self,
        key: &'static str,
        make: impl FnOnce() -> String + Send + 'static,
    ) -> Result<String, StoreError> {
        let value = make();
        timed(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO settings(key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&key, &value],
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_one("SELECT value FROM settings WHERE key = $1", &[&key])
                .await
                .map_err(pg)?;
            Ok(row.get(0))
        })
        .await
    }

    pub async fn create_consultation(
        &self,
        id: ConsultationId,
        invite_hash: [u8; 32],
        invite_expires_at: u64,
    ) -> Result<(), StoreError> {
        let now = (now_ms() / 1000) as i64;
        timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(
                "INSERT INTO consultations(id, created_at) VALUES ($1, $2)",
                &[&id.0, &now],
            )
            .await
            .map_err(pg)?;
            tx.execute(
                "INSERT INTO invites(code_hash, consultation_id, expires_at) VALUES ($1, $2, $3)",
                &[&&invite_hash[..], &id.0, &(invite_expires_at as i64)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
        .await
    }

    pub async fn add_invite(
        &self,
        id: ConsultationId,
        invite_hash: [u8; 32],
        expires_at: u64,
    ) -> Result<(), StoreError> {
        timed(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO invites(code_hash, consultation_id, expires_at) VALUES ($1, $2, $3)",
                    &[&&invite_hash[..], &id.0, &(expires_at as i64)],
                )
                .await
                .map_err(pg)
                .map(drop)
        })
        .await
    }

    pub async fn consultation(
        &self,
        id: ConsultationId,
    ) -> Result<Option<ConsultationRow>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT id, created_at, ended_at FROM consultations WHERE id = $1")
                .await
                .map_err(pg)?;
            let row = client.query_opt(&stmt, &[&id.0]).await.map_err(pg)?;
            Ok(row.as_ref().map(consultation_row))
        })
        .await
    }

    pub async fn consultations_since(
        &self,
        since_unix: u64,
    ) -> Result<Vec<ConsultationRow>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT id, created_at, ended_at FROM consultations
                     WHERE created_at >= $1 ORDER BY created_at DESC, seq DESC LIMIT 1000",
                    &[&(since_unix as i64)],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(consultation_row).collect())
        })
        .await
    }

    pub async fn redeem_invite(
        &self,
        hash: [u8; 32],
        now_unix: u64,
    ) -> Result<Option<ConsultationId>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT i.consultation_id FROM invites i
                     JOIN consultations c ON c.id = i.consultation_id
                     WHERE i.code_hash = $1 AND i.expires_at > $2 AND c.ended_at IS NULL",
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_opt(&stmt, &[&&hash[..], &(now_unix as i64)])
                .await
                .map_err(pg)?;
            Ok(row.map(|r| ConsultationId(r.get(0))))
        })
        .await
    }

    pub async fn revoke_invites(&self, id: ConsultationId) -> Result<usize, StoreError> {
        timed(async {
            let client = self.client().await?;
            let n = client
                .execute("DELETE FROM invites WHERE consultation_id = $1", &[&id.0])
                .await
                .map_err(pg)?;
            Ok(n as usize)
        })
        .await
    }

    /// One transaction; when two nodes end the same consultation at once, the row lock lets one
    /// of them see it open.
    pub async fn end_consultation(&self, id: ConsultationId) -> Result<bool, StoreError> {
        let now = (now_ms() / 1000) as i64;
        timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            let n = tx
                .execute(
                    "UPDATE consultations SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL",
                    &[&id.0, &now],
                )
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM invites WHERE consultation_id = $1", &[&id.0])
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM seats WHERE consultation_id = $1", &[&id.0])
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        timed(async {
            let client = self.client().await?;
            client
                .query_one("SELECT 1", &[])
                .await
                .map_err(pg)
                .map(drop)
        })
        .await
    }

    pub async fn prune(&self, audit_retention_days: u32, now: u64) -> Result<Pruned, StoreError> {
        self.flush_audit().await?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "DELETE FROM spent_join_tokens WHERE expires_at <= $1",
            &[&(now as i64)],
        )
        .await
        .map_err(pg)?;
        let mut pruned = Pruned {
            invites: tx
                .execute(
                    "DELETE FROM invites WHERE expires_at <= $1",
                    &[&(now as i64)],
                )
                .await
                .map_err(pg)? as usize,
            seats: tx
                .execute(
                    "DELETE FROM seats WHERE consultation_id IN
                     (SELECT id FROM consultations WHERE ended_at IS NOT NULL)",
                    &[],
                )
                .await
                .map_err(pg)? as usize,
            ..Pruned::default()
        };
        if audit_retention_days > 0 {
            let cutoff = now.saturating_sub(u64::from(audit_retention_days) * 86_400) as i64;
            pruned.audit_rows = tx
                .execute("DELETE FROM audit WHERE at_ms < $1", &[&(cutoff * 1000)])
                .await
                .map_err(pg)? as usize;
            tx.execute(
                "DELETE FROM invites WHERE consultation_id IN
                 (SELECT id FROM consultations WHERE ended_at < $1)",
                &[&cutoff],
            )
            .await
            .map_err(pg)?;
            pruned.consultations = tx
                .execute("DELETE FROM consultations WHERE ended_at < $1", &[&cutoff])
                .await
                .map_err(pg)? as usize;
        }
        tx.commit().await.map_err(pg)?;
        Ok(pruned)
    }

    /// The audit log of one consultation in the order things happened (see the module doc).
    pub async fn audit_log(&self, id: ConsultationId) -> Result<Vec<AuditEvent>, StoreError> {
        self.flush_audit().await?;
        timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT at_ms, consultation_id, participant_id, role, event, actor_id
                     FROM audit WHERE consultation_id = $1 ORDER BY at_ms, id",
                    &[&id.0],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| AuditEvent {
                    at_ms: r.get::<_, i64>(0) as u64,
                    consultation_id: ConsultationId(r.get(1)),
                    participant_id: r.get::<_, Option<String>>(2).map(ParticipantId),
                    role: r.get::<_, Option<&str>>(3).and_then(parse_role),
                    event: parse_kind(r.get(4)).unwrap_or(super::AuditKind::Created),
                    actor_id: r.get::<_, Option<String>>(5).map(ParticipantId),
                })
                .collect())
        })
        .await
    }

    pub async fn insert_credential(
        &self,
        row: CredentialRow,
        hash: [u8; 32],
    ) -> Result<(), StoreError> {
        timed(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO doctor_credentials(id, secret_hash, created_at, expires_at)
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &row.id,
                        &&hash[..],
                        &(row.created_at as i64),
                        &(row.expires_at as i64),
                    ],
                )
                .await
                .map_err(pg)
                .map(drop)
        })
        .await
    }

    pub async fn credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT id, created_at, expires_at, revoked_at FROM doctor_credentials
                     ORDER BY created_at DESC, id",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| CredentialRow {
                    id: r.get(0),
                    created_at: r.get::<_, i64>(1) as u64,
                    expires_at: r.get::<_, i64>(2) as u64,
                    revoked_at: r.get::<_, Option<i64>>(3).map(|t| t as u64),
                })
                .collect())
        })
        .await
    }

    pub async fn revoke_credential(&self, id: String, now: u64) -> Result<bool, StoreError> {
        timed(async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE doctor_credentials SET revoked_at = COALESCE(revoked_at, $2)
                     WHERE id = $1",
                    &[&id, &(now as i64)],
                )
                .await
                .map_err(pg)?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn valid_credential(
        &self,
        hash: [u8; 32],
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id FROM doctor_credentials
                     WHERE secret_hash = $1 AND revoked_at IS NULL AND expires_at > $2",
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_opt(&stmt, &[&&hash[..], &(now as i64)])
                .await
                .map_err(pg)?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    pub async fn is_join_token_spent(&self, id: &str) -> Result<bool, StoreError> {
        timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT 1 FROM spent_join_tokens WHERE token_id = $1")
                .await
                .map_err(pg)?;
            Ok(client.query_opt(&stmt, &[&id]).await.map_err(pg)?.is_some())
        })
        .await
    }

    pub async fn credential_event(
        &self,
        id: String,
        event: &'static str,
        cid: Option<String>,
    ) -> Result<(), StoreError> {
        let at = now_ms() as i64;
        timed(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO credential_audit(at_ms, credential_id, event, consultation_id)
                     VALUES ($1, $2, $3, $4)",
                    &[&at, &id, &event, &cid],
                )
                .await
                .map_err(pg)
                .map(drop)
        })
        .await
    }

    pub async fn credential_audit(
        &self,
        id: String,
    ) -> Result<Vec<super::CredentialEvent>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT at_ms, event, consultation_id FROM credential_audit
                     WHERE credential_id = $1 ORDER BY id",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| super::CredentialEvent {
                    at_ms: r.get::<_, i64>(0) as u64,
                    event: r.get(1),
                    consultation_id: r.get(2),
                })
                .collect())
        })
        .await
    }
}

fn consultation_row(r: &tokio_postgres::Row) -> ConsultationRow {
    ConsultationRow {
        id: ConsultationId(r.get(0)),
        created_at: r.get::<_, i64>(1) as u64,
        ended_at: r.get::<_, Option<i64>>(2).map(|t| t as u64),
    }
}

/// A queued write and its number in this process.
struct Queued {
    seq: i64,
    write: Write,
}

/// The writer task (see the module doc).
struct Writer {
    pool: Pool,
    health: StoreHealth,
    cap: usize,
    /// This process's id in the audit rows' `(writer, seq)`.
    id: i64,
    queue: VecDeque<Queued>,
    next_seq: i64,
    /// Flushes waiting for every write numbered below theirs.
    waiters: Vec<(i64, oneshot::Sender<()>)>,
    up: bool,
    dropped_in_outage: u64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        // When the oldest unwritten write arrived; when to try again after a failure.
        let mut oldest: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = RETRY_MIN;
        let mut last_contact = Instant::now();
        loop {
            let deadline = match (retry_at, oldest) {
                (Some(at), _) => at,
                (None, Some(since)) => since + BATCH_DELAY,
                (None, None) => last_contact + PROBE_INTERVAL,
            };
            let mut closed = false;
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(cmd)) => {
                    self.take(cmd, &mut oldest);
                    // Whatever else is waiting joins this batch.
                    while let Ok(cmd) = rx.try_recv() {
                        self.take(cmd, &mut oldest);
                    }
                }
                Ok(None) => closed = true,
                Err(_) => {}
            }
            let now = Instant::now();
            let may_try = retry_at.is_none_or(|at| now >= at);
            let due = !self.queue.is_empty()
                && may_try
                && (closed
                    || oldest.is_some_and(|t| now >= t + BATCH_DELAY)
                    || self.queue.len() >= BATCH_MAX
                    || !self.waiters.is_empty());
            if due {
                let ok = self.write_batch().await;
                last_contact = Instant::now();
                if ok {
                    retry_at = None;
                    backoff = RETRY_MIN;
                    oldest = (!self.queue.is_empty()).then(Instant::now);
                } else {
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            } else if self.queue.is_empty() && now >= last_contact + PROBE_INTERVAL {
                let ok = self.probe().await;
                last_contact = Instant::now();
                self.set_up(ok, 0);
            }
            self.answer_waiters();
            self.health.buffered.set(self.queue.len() as i64);
            if closed {
                if !self.queue.is_empty() {
                    tracing::error!(
                        lost = self.queue.len(),
                        "store unreachable at shutdown: buffered audit events and seat changes lost"
                    );
                }
                break;
            }
        }
    }

    fn take(&mut self, cmd: Cmd, oldest: &mut Option<Instant>) {
        match cmd {
            Cmd::Write(write) => {
                if self.queue.len() >= self.cap {
                    self.health.dropped.inc();
                    if self.dropped_in_outage == 0 {
                        tracing::error!(
                            bound = self.cap,
                            "store outage buffer full: audit events and seat changes are being \
                             dropped until the database answers"
                        );
                    }
                    self.dropped_in_outage += 1;
                    return;
                }
                oldest.get_or_insert_with(Instant::now);
                self.queue.push_back(Queued {
                    seq: self.next_seq,
                    write,
                });
                self.next_seq += 1;
            }
            Cmd::Flush(done) => self.waiters.push((self.next_seq, done)),
        }
    }

    /// Answers the flushes whose writes are all committed (or that nobody awaits any more).
    fn answer_waiters(&mut self) {
        let written = self.queue.front().map_or(self.next_seq, |q| q.seq);
        // A flush whose caller gave up (timed out) is dropped.
        self.waiters.retain(|(_, done)| !done.is_closed());
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(target, _)| *target <= written);
        self.waiters = waiting;
        for (_, done) in ready {
            let _ = done.send(());
        }
    }

    fn set_up(&mut self, up: bool, written: usize) {
        if up && !self.up {
            tracing::info!(
                written,
                dropped = self.dropped_in_outage,
                "store reachable again; buffered writes written"
            );
            self.dropped_in_outage = 0;
        } else if !up && self.up {
            tracing::warn!(
                buffered = self.queue.len(),
                "store unreachable: live calls go on; audit events and seat changes are kept in \
                 memory until it answers"
            );
        }
        self.up = up;
        self.health.up.set(i64::from(up));
    }

    async fn probe(&self) -> bool {
        let check = async {
            let client = self.pool.get().await.ok()?;
            client.query_one("SELECT 1", &[]).await.ok()
        };
        matches!(
            tokio::time::timeout(QUERY_TIMEOUT, check).await,
            Ok(Some(_))
        )
    }

    /// Writes up to [`BATCH_MAX`] queued writes in one transaction; true if it committed.
    async fn write_batch(&mut self) -> bool {
        let n = self.queue.len().min(BATCH_MAX);
        let result = tokio::time::timeout(
            QUERY_TIMEOUT * 2,
            write_all(&self.pool, self.id, self.queue.range(..n)),
        )
        .await
        .unwrap_or(Err(Failure::Transient("timed out".into())));
        match result {
            Ok(()) => {
                let was_down = !self.up;
                self.queue.drain(..n);
                // In an outage's aftermath the backlog goes out batch by batch; the "back" line
                // comes once, with the first.
                self.set_up(true, if was_down { n } else { 0 });
                true
            }
            Err(Failure::Rejected(e)) => {
                // Never expected (ids are ours, statements idempotent); logged and counted.
                tracing::error!(error = %e, lost = n, "store write refused by the database");
                self.queue.drain(..n);
                self.health.dropped.inc_by(n as u64);
                self.set_up(true, 0);
                true
            }
            Err(Failure::Transient(e)) => {
                if self.up {
                    tracing::debug!(error = %e, "store write failed");
                }
                self.set_up(false, 0);
                false
            }
        }
    }
}

/// Why a batch was not written.
enum Failure {
    /// The database could not be reached or gave up on the transaction: try again.
    Transient(String),
    /// The database refused the data (a data, integrity or schema error): trying again would
    /// block every later write behind it.
    Rejected(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        let class = e.code().map(|c| &c.code()[..2]);
        if matches!(class, Some("22" | "23" | "42")) {
            Failure::Rejected(e.to_string())
        } else {
            Failure::Transient(e.to_string())
        }
    }
}

async fn write_all<'a>(
    pool: &Pool,
    writer: i64,
    batch: impl Iterator<Item = &'a Queued>,
) -> Result<(), Failure> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| Failure::Transient(e.to_string()))?;
    let tx = client.transaction().await?;
    let mut at_ms = Vec::new();
    let mut cid = Vec::new();
    let mut pid: Vec<Option<&str>> = Vec::new();
    let mut role: Vec<Option<&str>> = Vec::new();
    let mut event = Vec::new();
    let mut actor: Vec<Option<&str>> = Vec::new();
    let mut seq = Vec::new();
    for q in batch {
        match &q.write {
            Write::Audit(e) => {
                at_ms.push(e.at_ms as i64);
                cid.push(e.consultation_id.0.as_str());
                pid.push(e.participant_id.as_ref().map(|p| p.0.as_str()));
                role.push(e.role.map(Role::as_str));
                event.push(e.event.as_str());
                actor.push(e.actor_id.as_ref().map(|p| p.0.as_str()));
                seq.push(q.seq);
            }
            Write::Seat(SeatWrite::Taken {
                pid,
                cid,
                role,
                admitted,
                token,
            }) => {
                let stmt = tx
                    .prepare_cached(
                        "INSERT INTO seats(participant_id, consultation_id, role, admitted,
                                           token_id, token_expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (participant_id) DO UPDATE SET
                           consultation_id = EXCLUDED.consultation_id,
                           role = EXCLUDED.role, admitted = EXCLUDED.admitted,
                           token_id = EXCLUDED.token_id,
                           token_expires_at = EXCLUDED.token_expires_at,
                           resume_hash = NULL",
                    )
                    .await?;
                let (token_id, token_exp) = match token {
                    Some(t) => (Some(t.id.as_str()), Some(t.expires_at as i64)),
                    None => (None, None),
                };
                tx.execute(
                    &stmt,
                    &[
                        &pid.0,
                        &cid.0,
                        &role.as_str(),
                        admitted,
                        &token_id,
                        &token_exp,
                    ],
                )
                .await?;
            }
            Write::Seat(SeatWrite::Resume(pid, hash)) => {
                let stmt = tx
                    .prepare_cached("UPDATE seats SET resume_hash = $2 WHERE participant_id = $1")
                    .await?;
                tx.execute(&stmt, &[&pid.0, &&hash[..]]).await?;
            }
            Write::Seat(SeatWrite::TokenSpent(t)) => {
                let stmt = tx
                    .prepare_cached(
                        "INSERT INTO spent_join_tokens(token_id, expires_at) VALUES ($1, $2)
                         ON CONFLICT (token_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                    )
                    .await?;
                tx.execute(&stmt, &[&t.id, &(t.expires_at as i64)]).await?;
            }
            Write::Seat(SeatWrite::Admitted(pid)) => {
                let stmt = tx
                    .prepare_cached("UPDATE seats SET admitted = true WHERE participant_id = $1")
                    .await?;
                tx.execute(&stmt, &[&pid.0]).await?;
            }
            Write::Seat(SeatWrite::Released(pid)) => {
                let stmt = tx
                    .prepare_cached("DELETE FROM seats WHERE participant_id = $1")
                    .await?;
                tx.execute(&stmt, &[&pid.0]).await?;
            }
            Write::Seat(SeatWrite::AllReleased(cid)) => {
                let stmt = tx
                    .prepare_cached("DELETE FROM seats WHERE consultation_id = $1")
                    .await?;
                tx.execute(&stmt, &[&cid.0]).await?;
            }
        }
    }
    if !seq.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO audit(at_ms, consultation_id, participant_id, role, event, actor_id,
                                   writer, seq)
                 SELECT a, c, p, r, e, x, $7, s
                 FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $8::bigint[]) WITH ORDINALITY AS t(a, c, p, r, e, x, s, o)
                 ORDER BY o
                 ON CONFLICT (writer, seq) DO NOTHING",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&at_ms, &cid, &pid, &role, &event, &actor, &writer, &seq],
        )
        .await?;
    }
    Ok(tx.commit().await?)
}

//! The embedded store: SQLite (bundled) for consultations, invite codes, generated secrets and
//! the audit log. Nothing of the media, the chat, names, addresses or tokens is ever written:
//! invite codes are kept as SHA-256 hashes and the audit log holds ids and roles only.
//!
//! Reads and writes run on tokio's blocking pool ([`Store::call`]); audit events go through a
//! channel to one writer thread that batches them into transactions, so a storm of joins costs
//! one fsync-free commit per batch, not one per join.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use bedside_protocol::{ConsultationId, ParticipantId, Role};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

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

enum AuditCmd {
    Event(AuditEvent),
    Flush(mpsc::Sender<()>),
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    audit_tx: mpsc::Sender<AuditCmd>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
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

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("bedside.db");
        let conn = open_conn(&path)?;
        conn.execute_batch(SCHEMA)?;
        let writer = open_conn(&path)?;
        let (audit_tx, audit_rx) = mpsc::channel();
        thread::Builder::new()
            .name("bedside-audit".into())
            .spawn(move || audit_writer(writer, audit_rx))
            .expect("spawn audit writer");
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            audit_tx,
        })
    }

    /// Runs `f` on the store's connection on the blocking pool.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|_| StoreError::Gone)?
        .map_err(StoreError::from)
    }

    /// Records an audit event without waiting for the disk.
    pub fn audit(&self, event: AuditEvent) {
        // If the writer is gone the server is shutting down; there is no one to tell.
        let _ = self.audit_tx.send(AuditCmd::Event(event));
    }

    /// Waits until every audit event sent so far is written.
    pub async fn flush_audit(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel();
        self.audit_tx
            .send(AuditCmd::Flush(tx))
            .map_err(|_| StoreError::Gone)?;
        tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(|_| StoreError::Gone)?
            .map_err(|_| StoreError::Gone)
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
            tx.execute(
                "INSERT INTO consultations(id, created_at) VALUES (?1, ?2)",
                params![id.0, now],
            )?;
            tx.execute(
                "INSERT INTO invites(code_hash, consultation_id, expires_at) VALUES (?1, ?2, ?3)",
                params![&invite_hash[..], id.0, invite_expires_at],
            )?;
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
        self.call(move |c| {
            c.query_row(
                "SELECT id, created_at, ended_at FROM consultations WHERE id = ?1",
                [id.0],
                row_to_consultation,
            )
            .optional()
        })
        .await
    }

    /// Consultations created since `since_unix`, newest first.
    pub async fn consultations_since(
        &self,
        since_unix: u64,
    ) -> Result<Vec<ConsultationRow>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, created_at, ended_at FROM consultations
                 WHERE created_at >= ?1 ORDER BY created_at DESC, id LIMIT 1000",
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
        self.call(move |c| {
            c.query_row(
                "SELECT i.consultation_id FROM invites i JOIN consultations c ON c.id = i.consultation_id
                 WHERE i.code_hash = ?1 AND i.expires_at > ?2 AND c.ended_at IS NULL",
                params![&hash[..], now_unix],
                |r| Ok(ConsultationId(r.get(0)?)),
            )
            .optional()
        })
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
            tx.commit()?;
            Ok(n == 1)
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
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

fn audit_writer(mut conn: Connection, rx: mpsc::Receiver<AuditCmd>) {
    // Block for the first command, then take whatever else is already queued into the same
    // transaction.
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO audit(at_ms, consultation_id, participant_id, role, event, actor_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for cmd in batch {
                    match cmd {
                        AuditCmd::Event(e) => {
                            stmt.execute(params![
                                e.at_ms,
                                e.consultation_id.0,
                                e.participant_id.map(|p| p.0),
                                e.role.map(Role::as_str),
                                e.event.as_str(),
                                e.actor_id.map(|p| p.0),
                            ])?;
                        }
                        AuditCmd::Flush(done) => flushes.push(done),
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "audit log write failed");
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
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

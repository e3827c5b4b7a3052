//! The agent's audit log: every mutating request, with the identity that made it (the client
//! certificate's name, kind and role) and how it ended, refused ones included.
//!
//! `tern_pki::AuditLayer` wraps the whole router (outside the role checks, so a viewer's
//! refused migration is recorded) and hands each record to [`StoreAudit`], which keeps it in
//! the agent's SQLite database (`audit` table, same 0600 file in the 0700 runtime directory)
//! and, when the request acted on a migration, also appends an `audit: …` note to that
//! migration's events, so `tern migration show` says who started, aborted or throttled it.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use tern_engine::{MigrationEvent, MigrationEventKind};
use tern_pki::{AuditOutcome, AuditRecord, AuditSink};

use crate::AgentError;
use crate::store::{Store, now_ms};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    identity TEXT,
    kind TEXT,
    role TEXT,
    serial TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL
)";

/// How many records `GET /v1/audit` returns at most.
pub const MAX_AUDIT_RECORDS: u32 = 10_000;

/// One stored audit record with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increasing sequence number.
    pub seq: u64,
    /// The record.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub record: AuditRecord,
}

/// The agent store as an [`AuditSink`].
#[derive(Clone)]
pub struct StoreAudit {
    store: Store,
}

fn text<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

fn parse<T: serde::de::DeserializeOwned>(s: Option<String>) -> Option<T> {
    s.and_then(|s| serde_json::from_value(serde_json::Value::String(s)).ok())
}

/// What a request acted on when its handler did not say: the VM or migration in its path.
fn target_from_path(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["v1", "migrations", id, ..] if *id != "plan" => Some(format!("migration {id}")),
        ["v1", "vms", name, ..] => Some(format!("vm {name}")),
        ["v1", "incoming", vm, ..] => Some(format!("incoming vm {vm}")),
        _ => None,
    }
}

impl StoreAudit {
    /// The audit log in `store` (its table is created if missing).
    pub fn open(store: Store) -> Result<Self, AgentError> {
        store
            .run_blocking(|c| c.execute_batch(SCHEMA))
            .map_err(|e| {
                AgentError::Internal(format!("database: creating the audit table: {e}"))
            })?;
        Ok(Self { store })
    }

    /// The newest `limit` records, oldest first.
    pub async fn list(&self, limit: u32) -> Result<Vec<AuditEntry>, AgentError> {
        let limit = limit.min(MAX_AUDIT_RECORDS);
        self.store
            .run(move |c| {
                read(c, limit).map_err(|e| {
                    AgentError::Internal(format!("database: reading the audit log: {e}"))
                })
            })
            .await
    }
}

fn read(c: &Connection, limit: u32) -> rusqlite::Result<Vec<AuditEntry>> {
    let mut st = c.prepare(
        "SELECT seq, at, identity, kind, role, serial, method, path, target, outcome, status \
         FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
    )?;
    let rows = st.query_map(params![limit], |r| {
        Ok(AuditEntry {
            seq: r.get::<_, i64>(0)? as u64,
            record: AuditRecord {
                at: r.get(1)?,
                identity: r.get(2)?,
                kind: parse(r.get(3)?),
                role: parse(r.get(4)?),
                serial: r.get(5)?,
                method: r.get(6)?,
                path: r.get(7)?,
                target: r.get(8)?,
                outcome: parse(r.get(9)?).unwrap_or(AuditOutcome::Failed),
                status: r.get::<_, i64>(10)? as u16,
            },
        })
    })?;
    rows.collect()
}

/// The migration note for `r`, e.g. `audit: user "alice" (role operator) POST
/// /v1/migrations/web-1/abort → 403 refused`.
fn migration_note(r: &AuditRecord) -> String {
    let who = match (&r.identity, r.kind, r.role) {
        (Some(name), Some(kind), Some(role)) => format!("{kind} {name:?} (role {role})"),
        (Some(name), _, _) => format!("{name:?}"),
        _ => "an unidentified caller".to_string(),
    };
    format!(
        "audit: {who} {} {} → {} {}",
        r.method,
        r.path,
        r.status,
        text(&r.outcome).unwrap_or_default()
    )
}

impl AuditSink for StoreAudit {
    fn record(&self, mut r: AuditRecord) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if r.target.is_none() {
            r.target = target_from_path(&r.path);
        }
        tracing::info!(
            identity = ?r.identity, role = ?r.role, method = %r.method, path = %r.path,
            target = ?r.target, status = r.status, "audit"
        );
        let note = migration_note(&r);
        self.store.run_blocking(|c| -> rusqlite::Result<()> {
            c.execute(
                "INSERT INTO audit (at, identity, kind, role, serial, method, path, target, \
                 outcome, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    r.at,
                    r.identity,
                    r.kind.as_ref().and_then(text),
                    r.role.as_ref().and_then(text),
                    r.serial,
                    r.method,
                    r.path,
                    r.target,
                    text(&r.outcome),
                    r.status
                ],
            )?;
            let Some(id) = r
                .target
                .as_deref()
                .and_then(|t| t.strip_prefix("migration "))
            else {
                return Ok(());
            };
            let created: Option<i64> = c
                .query_row(
                    "SELECT created_ms FROM migrations WHERE id = ?1",
                    params![id],
                    |row| row.get(0),
                )
                .ok();
            if let Some(created) = created {
                let ev = MigrationEvent {
                    at_ms: now_ms().saturating_sub(created as u64),
                    kind: MigrationEventKind::Note { text: note },
                };
                if let Ok(json) = serde_json::to_string(&ev) {
                    c.execute(
                        "INSERT INTO events (migration_id, wall_ms, event) VALUES (?1, ?2, ?3)",
                        params![id, now_ms() as i64, json],
                    )?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_pki::{CertKind, Role};

    fn record(name: &str, role: Role, path: &str, status: u16) -> AuditRecord {
        AuditRecord {
            at: "2026-12-02T08:00:00Z".into(),
            identity: Some(name.into()),
            kind: Some(CertKind::User),
            role: Some(role),
            serial: Some("0a".into()),
            method: "POST".into(),
            path: path.into(),
            target: None,
            outcome: AuditOutcome::from_status(status),
            status,
        }
    }

    #[tokio::test]
    async fn records_are_kept_in_order_with_identity_and_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db")).unwrap();
        let audit = StoreAudit::open(store).unwrap();
        audit
            .record(record("alice", Role::Operator, "/v1/migrations", 200))
            .unwrap();
        audit
            .record(record(
                "bob",
                Role::Viewer,
                "/v1/migrations/web-1/abort",
                403,
            ))
            .unwrap();
        let all = audit.list(100).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].record.identity.as_deref(), Some("alice"));
        assert_eq!(all[0].record.role, Some(Role::Operator));
        assert_eq!(all[0].record.outcome, AuditOutcome::Succeeded);
        assert_eq!(all[1].record.target.as_deref(), Some("migration web-1"));
        assert_eq!(all[1].record.outcome, AuditOutcome::Refused);
        assert!(all[0].seq < all[1].seq);
        let last = audit.list(1).await.unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].record.identity.as_deref(), Some("bob"));
    }

    #[test]
    fn targets_come_from_the_path_when_the_handler_names_none() {
        assert_eq!(
            target_from_path("/v1/migrations/m-1/abort").as_deref(),
            Some("migration m-1")
        );
        assert_eq!(target_from_path("/v1/migrations/plan"), None);
        assert_eq!(target_from_path("/v1/vms/web").as_deref(), Some("vm web"));
        assert_eq!(target_from_path("/v1/migrations"), None);
        let note = migration_note(&record("bob", Role::Viewer, "/v1/migrations/m/abort", 403));
        assert_eq!(
            note,
            "audit: user \"bob\" (role viewer) POST /v1/migrations/m/abort → 403 refused"
        );
    }
}

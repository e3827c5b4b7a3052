//! The agent's durable state: SQLite at `<runtime_dir>/agent.db`.
//!
//! What must survive an agent restart is kept here: the VMs this host owns (spec, role, QEMU
//! PID and runtime directory, so a restarted agent re-attaches instead of losing them), every
//! migration it ran or runs (state, report) and every event of each migration with its
//! wall-clock timestamp. Nova keeps the same facts in its `migrations` table and instance
//! actions/events; KubeVirt keeps them in the `VirtualMachineInstanceMigration` status.
//!
//! rusqlite is blocking: every call runs on tokio's blocking pool (`spawn_blocking`) behind
//! one mutex-guarded connection, which is simple and correct at an agent's write rate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tern_engine::{MigrationEvent, MigrationReport, MigrationState};
use tern_policy::{MigrationContext, PolicyName};
use tern_qemu::VmSpec;

use crate::AgentError;
use crate::host::VmRole;

/// Milliseconds since the Unix epoch (wall clock, for operators).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A VM as persisted: enough to re-attach to its QEMU after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredVm {
    /// The spec it was started from.
    pub spec: VmSpec,
    /// Running guest or incoming side of a migration.
    pub role: VmRole,
    /// QEMU's PID.
    pub pid: u32,
    /// Runtime directory (sockets, serial log).
    pub runtime_dir: PathBuf,
}

/// One migration as persisted and as reported by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationRecord {
    /// Migration identifier.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Source host name.
    pub source: String,
    /// Destination host name.
    pub destination: String,
    /// The destination agent's base URL.
    pub destination_url: String,
    /// Why the VM moves.
    pub context: MigrationContext,
    /// The policy.
    pub policy: PolicyName,
    /// Current state (`pending`, `precopy`, `postcopy`, `completed`, … as the engine names
    /// them).
    #[schema(value_type = String, example = "precopy")]
    pub state: MigrationState,
    /// When it was accepted (ms since the epoch).
    pub created_ms: u64,
    /// Last change (ms since the epoch).
    pub updated_ms: u64,
    /// When it reached a terminal state.
    pub finished_ms: Option<u64>,
    /// Error text, if it failed.
    pub error: Option<String>,
    /// The engine's report, once terminal.
    #[schema(value_type = Option<Object>)]
    pub report: Option<MigrationReport>,
    /// Link rate between the hosts (bytes/s), when known (shaped lab links).
    #[serde(default)]
    pub link_bytes_per_s: Option<u64>,
    /// The URI the destination listens on (`tcp:198.18.0.2:49152`). Post-copy recovery
    /// listens there again (`migrate-recover`), so an agent that adopts the migration after a
    /// restart needs it. `None` for migrations recorded by older agents.
    #[serde(default)]
    pub stream_uri: Option<String>,
    /// Whether the stream is TLS (both hosts' `migration_tls = "required"`), decided before
    /// it starts.
    #[serde(default)]
    pub stream_encrypted: bool,
}

/// An event with the wall-clock time it was recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Position in the migration's log (1-based), for incremental reads.
    pub seq: u64,
    /// Wall-clock time (ms since the epoch).
    pub wall_ms: u64,
    /// The event (its `at_ms` counts from the migration's start).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub event: MigrationEvent,
}

/// The agent's database.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn db_err(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("agent database: {what}: {e}"))
}

fn json_err(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("agent database: {what} holds invalid JSON: {e}"))
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    role TEXT NOT NULL,
    pid INTEGER NOT NULL,
    runtime_dir TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    destination_url TEXT NOT NULL,
    context TEXT NOT NULL,
    policy TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    error TEXT,
    report TEXT,
    link_bytes_per_s INTEGER,
    stream_uri TEXT,
    stream_encrypted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT NOT NULL,
    wall_ms INTEGER NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_migration ON events(migration_id, seq);
"#;

fn state_str(s: MigrationState) -> String {
    s.to_string()
}

fn parse_state(s: &str) -> Result<MigrationState, AgentError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| json_err("migrations.state", e))
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, AgentError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| db_err(&format!("creating {}", dir.display()), e))?;
        }
        let conn =
            Connection::open(path).map_err(|e| db_err(&format!("open {}", path.display()), e))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
            .map_err(|e| db_err("pragma", e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| db_err("schema", e))?;
        // Databases written before `stream_uri` existed get the column (NULL for old rows).
        if conn
            .prepare("SELECT stream_uri FROM migrations LIMIT 0")
            .is_err()
        {
            conn.execute_batch("ALTER TABLE migrations ADD COLUMN stream_uri TEXT")
                .map_err(|e| db_err("adding migrations.stream_uri", e))?;
        }
        if conn
            .prepare("SELECT stream_encrypted FROM migrations LIMIT 0")
            .is_err()
        {
            conn.execute_batch(
                "ALTER TABLE migrations ADD COLUMN stream_encrypted INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(|e| db_err("adding migrations.stream_encrypted", e))?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    /// Runs `f` on the connection on the calling thread: for short writes that must happen
    /// before a response leaves (the audit record of a request).
    pub(crate) fn run_blocking<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&c)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&c)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("database task failed: {e}")))?
    }

    /// Records (or replaces) a VM.
    pub async fn put_vm(&self, vm: StoredVm) -> Result<(), AgentError> {
        let spec = serde_json::to_string(&vm.spec).map_err(|e| json_err("spec", e))?;
        let role = serde_json::to_value(vm.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.run(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO vms (name, spec, role, pid, runtime_dir, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    vm.spec.name,
                    spec,
                    role,
                    vm.pid,
                    vm.runtime_dir.display().to_string(),
                    now_ms() as i64
                ],
            )
            .map_err(|e| db_err("insert vm", e))?;
            Ok(())
        })
        .await
    }

    /// Forgets a VM (stopped, or migrated away).
    pub async fn delete_vm(&self, name: &str) -> Result<(), AgentError> {
        let name = name.to_string();
        self.run(move |c| {
            c.execute("DELETE FROM vms WHERE name = ?1", params![name])
                .map_err(|e| db_err("delete vm", e))?;
            Ok(())
        })
        .await
    }

    /// Every persisted VM.
    pub async fn vms(&self) -> Result<Vec<StoredVm>, AgentError> {
        self.run(|c| {
            let mut st = c
                .prepare("SELECT spec, role, pid, runtime_dir FROM vms ORDER BY name")
                .map_err(|e| db_err("select vms", e))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(|e| db_err("select vms", e))?;
            let mut out = Vec::new();
            for row in rows {
                let (spec, role, pid, dir) = row.map_err(|e| db_err("read vm", e))?;
                out.push(StoredVm {
                    spec: serde_json::from_str(&spec).map_err(|e| json_err("vms.spec", e))?,
                    role: serde_json::from_value(serde_json::Value::String(role))
                        .map_err(|e| json_err("vms.role", e))?,
                    pid: u32::try_from(pid).unwrap_or(0),
                    runtime_dir: PathBuf::from(dir),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Records a new migration.
    pub async fn insert_migration(&self, m: MigrationRecord) -> Result<(), AgentError> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO migrations (id, vm, source, destination, destination_url, context, \
                 policy, state, created_ms, updated_ms, finished_ms, error, report, \
                 link_bytes_per_s, stream_uri, stream_encrypted) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, NULL, NULL, ?11, ?12, ?13)",
                params![
                    m.id,
                    m.vm,
                    m.source,
                    m.destination,
                    m.destination_url,
                    m.context.as_str(),
                    m.policy.as_str(),
                    state_str(m.state),
                    m.created_ms as i64,
                    m.updated_ms as i64,
                    m.link_bytes_per_s.map(|v| v as i64),
                    m.stream_uri,
                    m.stream_encrypted
                ],
            )
            .map_err(|e| db_err("insert migration", e))?;
            Ok(())
        })
        .await
    }

    /// Moves a migration to `state` (as the engine reports it). It stays "unfinished" (and is
    /// looked at again after a restart) until [`Store::finish`]: the bookkeeping after a
    /// terminal state (stopping the source, promoting the destination) must also be done.
    pub async fn set_state(&self, id: &str, state: MigrationState) -> Result<(), AgentError> {
        let id = id.to_string();
        self.run(move |c| {
            c.execute(
                "UPDATE migrations SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, state_str(state), now_ms() as i64],
            )
            .map_err(|e| db_err("update migration", e))?;
            Ok(())
        })
        .await
    }

    /// Marks a migration finished in `state` (terminal), with its report if there is one.
    pub async fn finish(
        &self,
        id: &str,
        state: MigrationState,
        error: Option<String>,
        report: Option<&MigrationReport>,
    ) -> Result<(), AgentError> {
        let report = match report {
            Some(r) => Some(serde_json::to_string(r).map_err(|e| json_err("report", e))?),
            None => None,
        };
        let id = id.to_string();
        self.run(move |c| {
            let now = now_ms() as i64;
            c.execute(
                "UPDATE migrations SET state = ?2, updated_ms = ?3, finished_ms = ?3, \
                 error = COALESCE(?4, error), report = COALESCE(?5, report) WHERE id = ?1",
                params![id, state_str(state), now, error, report],
            )
            .map_err(|e| db_err("finish migration", e))?;
            Ok(())
        })
        .await
    }

    /// Appends an event to a migration's log.
    pub async fn append_event(&self, id: &str, ev: &MigrationEvent) -> Result<(), AgentError> {
        let text = serde_json::to_string(ev).map_err(|e| json_err("event", e))?;
        let id = id.to_string();
        self.run(move |c| {
            c.execute(
                "INSERT INTO events (migration_id, wall_ms, event) VALUES (?1, ?2, ?3)",
                params![id, now_ms() as i64, text],
            )
            .map_err(|e| db_err("insert event", e))?;
            Ok(())
        })
        .await
    }

    /// A migration's events with a sequence number above `after` (0 = all), in order.
    pub async fn events(&self, id: &str, after: u64) -> Result<Vec<StoredEvent>, AgentError> {
        let id = id.to_string();
        self.run(move |c| {
            let mut st = c
                .prepare(
                    "SELECT seq, wall_ms, event FROM events WHERE migration_id = ?1 AND seq > ?2 \
                     ORDER BY seq",
                )
                .map_err(|e| db_err("select events", e))?;
            let rows = st
                .query_map(params![id, after as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(|e| db_err("select events", e))?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, wall, text) = row.map_err(|e| db_err("read event", e))?;
                out.push(StoredEvent {
                    seq: seq as u64,
                    wall_ms: wall as u64,
                    event: serde_json::from_str(&text).map_err(|e| json_err("events.event", e))?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// One migration, or `None`.
    pub async fn migration(&self, id: &str) -> Result<Option<MigrationRecord>, AgentError> {
        let id = id.to_string();
        let mut v = self
            .run(move |c| select_migrations(c, Some(&id), false))
            .await?;
        Ok(v.pop())
    }

    /// Every migration, newest first.
    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        self.run(|c| select_migrations(c, None, false)).await
    }

    /// Migrations not in a terminal state (to resume or clean up after a restart).
    pub async fn unfinished_migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        self.run(|c| select_migrations(c, None, true)).await
    }
}

fn select_migrations(
    c: &Connection,
    id: Option<&str>,
    unfinished: bool,
) -> Result<Vec<MigrationRecord>, AgentError> {
    let sql = format!(
        "SELECT id, vm, source, destination, destination_url, context, policy, state, \
         created_ms, updated_ms, finished_ms, error, report, link_bytes_per_s, stream_uri, \
         stream_encrypted FROM migrations {} \
         ORDER BY created_ms DESC, id DESC",
        match (id.is_some(), unfinished) {
            (true, _) => "WHERE id = ?1",
            (false, true) => "WHERE finished_ms IS NULL",
            (false, false) => "",
        }
    );
    let mut st = c
        .prepare(&sql)
        .map_err(|e| db_err("select migrations", e))?;
    type Row = (
        String,
        String,
        String,
        String,
        String,
        String,
        String,
        String,
        i64,
        i64,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        bool,
    );
    let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Row> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
            r.get(10)?,
            r.get(11)?,
            r.get(12)?,
            r.get(13)?,
            r.get(14)?,
            r.get(15)?,
        ))
    };
    let rows: Vec<Row> = match id {
        Some(id) => st
            .query_row(params![id], map)
            .optional()
            .map_err(|e| db_err("select migration", e))?
            .into_iter()
            .collect(),
        None => st
            .query_map([], map)
            .map_err(|e| db_err("select migrations", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| db_err("read migration", e))?,
    };
    rows.into_iter()
        .map(|r| {
            Ok(MigrationRecord {
                id: r.0,
                vm: r.1,
                source: r.2,
                destination: r.3,
                destination_url: r.4,
                context: r.5.parse().map_err(|e| json_err("migrations.context", e))?,
                policy: r.6.parse().map_err(|e| json_err("migrations.policy", e))?,
                state: parse_state(&r.7)?,
                created_ms: r.8 as u64,
                updated_ms: r.9 as u64,
                finished_ms: r.10.map(|v| v as u64),
                error: r.11,
                report: match r.12 {
                    Some(t) => Some(serde_json::from_str(&t).map_err(|e| json_err("report", e))?),
                    None => None,
                },
                link_bytes_per_s: r.13.map(|v| v as u64),
                stream_uri: r.14,
                stream_encrypted: r.15,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_engine::MigrationEventKind;

    fn record(id: &str, created: u64) -> MigrationRecord {
        MigrationRecord {
            id: id.into(),
            vm: "web".into(),
            source: "h1".into(),
            destination: "h2".into(),
            destination_url: "http://127.0.0.1:7702".into(),
            context: MigrationContext::Manual,
            policy: PolicyName::Tern,
            state: MigrationState::Pending,
            created_ms: created,
            updated_ms: created,
            finished_ms: None,
            error: None,
            report: None,
            link_bytes_per_s: Some(25_000_000),
            stream_uri: Some("tcp:198.18.0.2:49152".into()),
            stream_encrypted: true,
        }
    }

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            memory_mib: 256,
            vcpus: 1,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0".into(),
            accelerator: tern_qemu::Accelerator::Tcg,
            devices: Default::default(),
            migration: Default::default(),
        }
    }

    #[tokio::test]
    async fn vms_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let s = Store::open(&path).unwrap();
            for (n, pid) in [("a", 10), ("b", 11)] {
                s.put_vm(StoredVm {
                    spec: spec(n),
                    role: VmRole::Running,
                    pid,
                    runtime_dir: dir.path().join(n),
                })
                .await
                .unwrap();
            }
            s.put_vm(StoredVm {
                spec: spec("b"),
                role: VmRole::Incoming,
                pid: 12,
                runtime_dir: dir.path().join("b"),
            })
            .await
            .unwrap();
            s.delete_vm("a").await.unwrap();
        }
        let s = Store::open(&path).unwrap();
        let vms = s.vms().await.unwrap();
        assert_eq!(vms.len(), 1, "a was deleted, b replaced: {vms:?}");
        assert_eq!(vms[0].spec.name, "b");
        assert_eq!(vms[0].role, VmRole::Incoming);
        assert_eq!(vms[0].pid, 12);
    }

    #[tokio::test]
    async fn the_stream_uri_is_kept_and_old_databases_gain_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            // A database from before `stream_uri`.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&SCHEMA.replace(",\n    stream_uri TEXT", ""))
                .unwrap();
            assert!(c.prepare("SELECT stream_uri FROM migrations").is_err());
        }
        let s = Store::open(&path).unwrap();
        s.insert_migration(record("m1", 100)).await.unwrap();
        let m = s.migration("m1").await.unwrap().unwrap();
        assert_eq!(m.stream_uri.as_deref(), Some("tcp:198.18.0.2:49152"));
    }

    #[tokio::test]
    async fn migrations_and_events_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.db")).unwrap();
        s.insert_migration(record("m1", 100)).await.unwrap();
        s.insert_migration(record("m2", 200)).await.unwrap();
        for (i, to) in [MigrationState::Preparing, MigrationState::Precopy]
            .into_iter()
            .enumerate()
        {
            s.append_event(
                "m1",
                &MigrationEvent {
                    at_ms: i as u64 * 10,
                    kind: MigrationEventKind::State {
                        from: MigrationState::Pending,
                        to,
                        reason: format!("step {i}"),
                    },
                },
            )
            .await
            .unwrap();
        }
        s.set_state("m1", MigrationState::Precopy).await.unwrap();
        assert!(
            s.migration("m1")
                .await
                .unwrap()
                .unwrap()
                .finished_ms
                .is_none()
        );
        let ev = s.events("m1", 0).await.unwrap();
        assert_eq!(ev.len(), 2);
        assert!(ev[0].seq < ev[1].seq);
        let later = s.events("m1", ev[0].seq).await.unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].event.at_ms, 10);
        assert!(s.events("m2", 0).await.unwrap().is_empty());

        let unfinished: Vec<String> = s
            .unfinished_migrations()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(unfinished, vec!["m2", "m1"], "newest first");
        s.finish("m1", MigrationState::Failed, Some("boom".into()), None)
            .await
            .unwrap();
        let m1 = s.migration("m1").await.unwrap().unwrap();
        assert_eq!(m1.state, MigrationState::Failed);
        assert!(m1.finished_ms.is_some());
        assert_eq!(m1.error.as_deref(), Some("boom"));
        assert_eq!(s.unfinished_migrations().await.unwrap().len(), 1);
        assert!(s.migration("nope").await.unwrap().is_none());
        assert_eq!(s.migrations().await.unwrap().len(), 2);
    }
}

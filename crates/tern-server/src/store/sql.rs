//! [`ControllerStore`] on sqlx's `Any` driver: one set of queries for SQLite and PostgreSQL.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::schema::STEPS;
use super::{AuditEntry, ControllerStore, LeaseRecord, StoreError};
use crate::model::{
    EvacuationRecord, HostPatch, HostRecord, HostState, MigrationEvent, MigrationRecord, VmRecord,
    enum_str, parse_enum,
};
use crate::model::{Heartbeat, new_id};

/// The controller's store on SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    location: String,
}

const HOST_COLS: &str =
    "name, facts, admin_state, post_copy, max_outbound, max_inbound, last_heartbeat_ms";
const MIGRATION_COLS: &str = "id, vm, source, destination, context, state, attempts, evacuation_id, \
     plan_index, reason, idempotency_key, agent_migration_id, error, created_ms, started_ms, \
     ended_ms, next_attempt_ms, updated_ms, switched_to_postcopy";
const EVACUATION_COLS: &str = "id, host, state, deadline_ms, plan, predicted_makespan_s, \
     actual_makespan_s, created_ms, ended_ms, error, updated_ms";

fn redact(url: &str) -> String {
    // postgres://user:secret@host/db → postgres://user:…@host/db
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:…{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// VMs per multi-row insert of a heartbeat (7 parameters each: far below SQLite's 32,766 and
/// PostgreSQL's 65,535 bound parameters).
const VMS_PER_INSERT: usize = 500;

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqlStore {
    /// Opens (creating if needed) the SQLite database at `path`: its directory is made 0700
    /// and the file 0600 before SQLite touches it.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let location = path.display().to_string();
        let io = |what: &str, source| StoreError::Io {
            location: location.clone(),
            what: what.to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| io("making its directory 0700", e))?;
            }
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("creating the file", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("making the file 0600", e))?;
        Self::connect_inner(
            &format!("sqlite://{}?mode=rwc", path.display()),
            location,
            1,
        )
        .await
    }

    /// Connects to `url` (`sqlite://…` or `postgres://…`) and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let max = if url.starts_with("sqlite:") { 1 } else { 8 };
        Self::connect_inner(url, redact(url), max).await
    }

    /// Same, with a pool of at most `max_connections` (the lease's own connection: its
    /// renewals must not wait behind API requests when the controller is saturated).
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_inner(url, redact(url), max_connections.max(1)).await
    }

    async fn connect_inner(url: &str, location: String, max: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .connect(url)
            .await
            .map_err(|source| StoreError::Database {
                location: location.clone(),
                what: "connecting".into(),
                source,
            })?;
        let store = Self { pool, location };
        store.migrate().await?;
        Ok(store)
    }

    /// The database's location (path, or URL without password).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Rows per table (sizing reports; issue 12's fleet simulation).
    pub async fn row_counts(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        for table in [
            "hosts",
            "vms",
            "migrations",
            "migration_events",
            "evacuations",
            "leases",
            "audit",
        ] {
            let row = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
                .fetch_one(&self.pool)
                .await
                .map_err(self.err("counting rows"))?;
            let n: i64 = row
                .try_get("n")
                .map_err(|e| self.corrupt(format!("count of {table}: {e}")))?;
            out.insert(table.to_string(), n);
        }
        Ok(out)
    }

    /// Closes the pool (the file is released).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        let what = what.to_string();
        move |source| StoreError::Database {
            location: self.location.clone(),
            what,
            source,
        }
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(what.to_string(), self.location.clone())
    }

    /// Applies the schema steps this database has not seen yet.
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&self.pool)
            .await
            .map_err(self.err("creating schema_version"))?;
        let current: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_version")
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>("v"))
            .map_err(self.err("reading schema_version"))?;
        let current = current.unwrap_or(0);
        let known = STEPS.len() as i64;
        if current > known {
            return Err(StoreError::SchemaTooNew {
                location: self.location.clone(),
                found: current,
                known,
            });
        }
        for (n, step) in STEPS.iter().enumerate().skip(current as usize) {
            let mut tx = self.pool.begin().await.map_err(self.err("begin"))?;
            for stmt in *step {
                sqlx::query(stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(self.err(&format!("schema step {}", n + 1)))?;
            }
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind((n + 1) as i64)
                .execute(&mut *tx)
                .await
                .map_err(self.err("recording schema_version"))?;
            tx.commit().await.map_err(self.err("commit schema"))?;
        }
        Ok(())
    }

    fn host_row(&self, r: &AnyRow) -> Result<HostRecord, StoreError> {
        let g = |e: sqlx::Error| self.corrupt(format!("hosts row: {e}"));
        let facts: String = r.try_get("facts").map_err(g)?;
        let state: String = r.try_get("admin_state").map_err(g)?;
        let post_copy: Option<String> = r.try_get("post_copy").map_err(g)?;
        Ok(HostRecord {
            name: r.try_get("name").map_err(g)?,
            state: parse_enum(&state)
                .ok_or_else(|| self.corrupt(format!("hosts.admin_state {state:?}")))?,
            facts: serde_json::from_str(&facts)
                .map_err(|e| self.corrupt(format!("hosts.facts: {e}")))?,
            post_copy: post_copy.as_deref().and_then(parse_enum),
            max_outbound: r
                .try_get::<Option<i64>, _>("max_outbound")
                .map_err(g)?
                .map(|v| v as u32),
            max_inbound: r
                .try_get::<Option<i64>, _>("max_inbound")
                .map_err(g)?
                .map(|v| v as u32),
            last_heartbeat_ms: r.try_get::<i64, _>("last_heartbeat_ms").map_err(g)? as u64,
        })
    }

    fn migration_row(&self, r: &AnyRow) -> Result<MigrationRecord, StoreError> {
        let g = |e: sqlx::Error| self.corrupt(format!("migrations row: {e}"));
        let context: String = r.try_get("context").map_err(g)?;
        let state: String = r.try_get("state").map_err(g)?;
        Ok(MigrationRecord {
            id: r.try_get("id").map_err(g)?,
            vm: r.try_get("vm").map_err(g)?,
            source: r.try_get("source").map_err(g)?,
            destination: r.try_get("destination").map_err(g)?,
            context: parse_enum(&context)
                .ok_or_else(|| self.corrupt(format!("migrations.context {context:?}")))?,
            state: parse_enum(&state)
                .ok_or_else(|| self.corrupt(format!("migrations.state {state:?}")))?,
            attempts: r.try_get::<i64, _>("attempts").map_err(g)? as u32,
            evacuation_id: r.try_get("evacuation_id").map_err(g)?,
            plan_index: r
                .try_get::<Option<i64>, _>("plan_index")
                .map_err(g)?
                .map(|v| v as u32),
            reason: r.try_get("reason").map_err(g)?,
            idempotency_key: r.try_get("idempotency_key").map_err(g)?,
            agent_migration_id: r.try_get("agent_migration_id").map_err(g)?,
            error: r.try_get("error").map_err(g)?,
            created_ms: r.try_get::<i64, _>("created_ms").map_err(g)? as u64,
            started_ms: opt_u64(r.try_get("started_ms").map_err(g)?),
            ended_ms: opt_u64(r.try_get("ended_ms").map_err(g)?),
            next_attempt_ms: opt_u64(r.try_get("next_attempt_ms").map_err(g)?),
            updated_ms: r.try_get::<i64, _>("updated_ms").map_err(g)? as u64,
            switched_to_postcopy: r.try_get::<i64, _>("switched_to_postcopy").map_err(g)? != 0,
        })
    }

    fn evacuation_row(&self, r: &AnyRow) -> Result<EvacuationRecord, StoreError> {
        let g = |e: sqlx::Error| self.corrupt(format!("evacuations row: {e}"));
        let state: String = r.try_get("state").map_err(g)?;
        let plan: String = r.try_get("plan").map_err(g)?;
        Ok(EvacuationRecord {
            id: r.try_get("id").map_err(g)?,
            host: r.try_get("host").map_err(g)?,
            state: parse_enum(&state)
                .ok_or_else(|| self.corrupt(format!("evacuations.state {state:?}")))?,
            deadline_ms: r.try_get::<i64, _>("deadline_ms").map_err(g)? as u64,
            plan: serde_json::from_str(&plan)
                .map_err(|e| self.corrupt(format!("evacuations.plan: {e}")))?,
            predicted_makespan_s: r.try_get("predicted_makespan_s").map_err(g)?,
            actual_makespan_s: r.try_get("actual_makespan_s").map_err(g)?,
            created_ms: r.try_get::<i64, _>("created_ms").map_err(g)? as u64,
            ended_ms: opt_u64(r.try_get("ended_ms").map_err(g)?),
            error: r.try_get("error").map_err(g)?,
            updated_ms: r.try_get::<i64, _>("updated_ms").map_err(g)? as u64,
        })
    }
}

#[async_trait]
impl ControllerStore for SqlStore {
    async fn record_heartbeat(&self, hb: &Heartbeat, now_ms: u64) -> Result<(), StoreError> {
        let facts = serde_json::to_string(&hb.facts).map_err(|e| self.corrupt(e))?;
        let mut tx = self.pool.begin().await.map_err(self.err("begin"))?;
        sqlx::query(
            "INSERT INTO hosts (name, facts, admin_state, last_heartbeat_ms, registered_ms) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (name) DO UPDATE SET facts = $2, last_heartbeat_ms = $4",
        )
        .bind(&hb.host)
        .bind(&facts)
        .bind(HostState::Up.as_str())
        .bind(i(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(self.err("recording a heartbeat"))?;
        sqlx::query("DELETE FROM vms WHERE host = $1")
            .bind(&hb.host)
            .execute(&mut *tx)
            .await
            .map_err(self.err("replacing VMs"))?;
        // One multi-row statement per chunk (not one per VM): a heartbeat is 3 round trips
        // whatever the number of VMs, which is what lets a controller hold 10,000 hosts.
        for chunk in hb.vms.chunks(VMS_PER_INSERT) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|k| {
                    let b = k * 7;
                    format!(
                        "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5,
                        b + 6,
                        b + 7
                    )
                })
                .collect();
            let q = format!(
                "INSERT INTO vms (name, host, memory_mib, sla_class, post_copy_allowed, \
                 dirty_bytes_per_s, updated_ms) VALUES {} \
                 ON CONFLICT (name) DO UPDATE SET host = excluded.host, \
                 memory_mib = excluded.memory_mib, sla_class = excluded.sla_class, \
                 post_copy_allowed = excluded.post_copy_allowed, \
                 dirty_bytes_per_s = excluded.dirty_bytes_per_s, updated_ms = excluded.updated_ms",
                rows.join(", ")
            );
            let mut query = sqlx::query(&q);
            for vm in chunk {
                query = query
                    .bind(&vm.name)
                    .bind(&hb.host)
                    .bind(i(vm.memory_mib))
                    .bind(&vm.sla_class)
                    .bind(i64::from(vm.post_copy_allowed))
                    .bind(vm.dirty_bytes_per_s.map(i))
                    .bind(i(now_ms));
            }
            query
                .execute(&mut *tx)
                .await
                .map_err(self.err("recording VMs"))?;
        }
        tx.commit().await.map_err(self.err("commit heartbeat"))
    }

    async fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        let q = format!("SELECT {HOST_COLS} FROM hosts WHERE name = $1");
        let row = sqlx::query(&q)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err("reading a host"))?;
        row.map(|r| self.host_row(&r)).transpose()
    }

    async fn hosts_page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<HostRecord>, StoreError> {
        let q = format!("SELECT {HOST_COLS} FROM hosts WHERE name > $1 ORDER BY name LIMIT $2");
        let rows = sqlx::query(&q)
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("listing hosts"))?;
        rows.iter().map(|r| self.host_row(r)).collect()
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let q = format!("SELECT {HOST_COLS} FROM hosts ORDER BY name");
        let rows = sqlx::query(&q)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("listing hosts"))?;
        rows.iter().map(|r| self.host_row(r)).collect()
    }

    async fn patch_host(
        &self,
        name: &str,
        patch: &HostPatch,
    ) -> Result<Option<HostRecord>, StoreError> {
        let Some(mut h) = self.host(name).await? else {
            return Ok(None);
        };
        if let Some(p) = patch.post_copy {
            h.post_copy = Some(p);
        }
        if patch.max_outbound.is_some() {
            h.max_outbound = patch.max_outbound;
        }
        if patch.max_inbound.is_some() {
            h.max_inbound = patch.max_inbound;
        }
        if let Some(d) = patch.drain {
            h.state = if d {
                HostState::Draining
            } else {
                HostState::Up
            };
        }
        sqlx::query(
            "UPDATE hosts SET admin_state = $2, post_copy = $3, max_outbound = $4, \
             max_inbound = $5 WHERE name = $1",
        )
        .bind(name)
        .bind(h.state.as_str())
        .bind(h.post_copy.as_ref().map(enum_str))
        .bind(h.max_outbound.map(i64::from))
        .bind(h.max_inbound.map(i64::from))
        .execute(&self.pool)
        .await
        .map_err(self.err("updating a host"))?;
        Ok(Some(h))
    }

    async fn vms(&self, host: Option<&str>) -> Result<Vec<VmRecord>, StoreError> {
        let rows = match host {
            Some(h) => sqlx::query(
                "SELECT name, host, memory_mib, sla_class, post_copy_allowed, dirty_bytes_per_s \
                 FROM vms WHERE host = $1 ORDER BY name",
            )
            .bind(h)
            .fetch_all(&self.pool)
            .await,
            None => sqlx::query(
                "SELECT name, host, memory_mib, sla_class, post_copy_allowed, dirty_bytes_per_s \
                 FROM vms ORDER BY name",
            )
            .fetch_all(&self.pool)
            .await,
        }
        .map_err(self.err("listing VMs"))?;
        rows.iter()
            .map(|r| {
                let g = |e: sqlx::Error| self.corrupt(format!("vms row: {e}"));
                Ok(VmRecord {
                    name: r.try_get("name").map_err(g)?,
                    host: r.try_get("host").map_err(g)?,
                    memory_mib: r.try_get::<i64, _>("memory_mib").map_err(g)? as u64,
                    sla_class: r.try_get("sla_class").map_err(g)?,
                    post_copy_allowed: r.try_get::<i64, _>("post_copy_allowed").map_err(g)? != 0,
                    dirty_bytes_per_s: opt_u64(r.try_get("dirty_bytes_per_s").map_err(g)?),
                })
            })
            .collect()
    }

    async fn put_migration(&self, m: &MigrationRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(self.err("begin"))?;
        sqlx::query("DELETE FROM migrations WHERE id = $1")
            .bind(&m.id)
            .execute(&mut *tx)
            .await
            .map_err(self.err("replacing a migration"))?;
        let q = format!(
            "INSERT INTO migrations ({MIGRATION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
        );
        sqlx::query(&q)
            .bind(&m.id)
            .bind(&m.vm)
            .bind(&m.source)
            .bind(&m.destination)
            .bind(m.context.as_str())
            .bind(m.state.as_str())
            .bind(i64::from(m.attempts))
            .bind(m.evacuation_id.clone())
            .bind(m.plan_index.map(i64::from))
            .bind(&m.reason)
            .bind(m.idempotency_key.clone())
            .bind(m.agent_migration_id.clone())
            .bind(m.error.clone())
            .bind(i(m.created_ms))
            .bind(m.started_ms.map(i))
            .bind(m.ended_ms.map(i))
            .bind(m.next_attempt_ms.map(i))
            .bind(i(m.updated_ms))
            .bind(i64::from(m.switched_to_postcopy))
            .execute(&mut *tx)
            .await
            .map_err(self.err("writing a migration"))?;
        tx.commit().await.map_err(self.err("commit migration"))
    }

    async fn migration(&self, id: &str) -> Result<Option<MigrationRecord>, StoreError> {
        let q = format!("SELECT {MIGRATION_COLS} FROM migrations WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err("reading a migration"))?;
        row.map(|r| self.migration_row(&r)).transpose()
    }

    async fn migrations(
        &self,
        evacuation_id: Option<&str>,
    ) -> Result<Vec<MigrationRecord>, StoreError> {
        let rows = match evacuation_id {
            Some(e) => {
                let q = format!(
                    "SELECT {MIGRATION_COLS} FROM migrations WHERE evacuation_id = $1 \
                     ORDER BY plan_index, id"
                );
                sqlx::query(&q).bind(e).fetch_all(&self.pool).await
            }
            None => {
                let q =
                    format!("SELECT {MIGRATION_COLS} FROM migrations ORDER BY created_ms DESC, id");
                sqlx::query(&q).fetch_all(&self.pool).await
            }
        }
        .map_err(self.err("listing migrations"))?;
        rows.iter().map(|r| self.migration_row(r)).collect()
    }

    async fn add_event(
        &self,
        migration_id: &str,
        kind: &str,
        detail: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(self.err("begin"))?;
        let last: Option<i64> =
            sqlx::query("SELECT MAX(seq) AS s FROM migration_events WHERE migration_id = $1")
                .bind(migration_id)
                .fetch_one(&mut *tx)
                .await
                .and_then(|r| r.try_get::<Option<i64>, _>("s"))
                .map_err(self.err("numbering an event"))?;
        let seq = last.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO migration_events (migration_id, seq, wall_ms, kind, detail) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(migration_id)
        .bind(seq)
        .bind(i(now_ms))
        .bind(kind)
        .bind(detail)
        .execute(&mut *tx)
        .await
        .map_err(self.err("appending an event"))?;
        tx.commit().await.map_err(self.err("commit event"))?;
        Ok(seq as u64)
    }

    async fn events(&self, migration_id: &str) -> Result<Vec<MigrationEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, wall_ms, kind, detail FROM migration_events WHERE migration_id = $1 \
             ORDER BY seq",
        )
        .bind(migration_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading events"))?;
        rows.iter()
            .map(|r| {
                let g = |e: sqlx::Error| self.corrupt(format!("migration_events row: {e}"));
                Ok(MigrationEvent {
                    seq: r.try_get::<i64, _>("seq").map_err(g)? as u64,
                    wall_ms: r.try_get::<i64, _>("wall_ms").map_err(g)? as u64,
                    kind: r.try_get("kind").map_err(g)?,
                    detail: r.try_get("detail").map_err(g)?,
                })
            })
            .collect()
    }

    async fn put_evacuation(&self, e: &EvacuationRecord) -> Result<(), StoreError> {
        let plan = serde_json::to_string(&e.plan).map_err(|x| self.corrupt(x))?;
        let mut tx = self.pool.begin().await.map_err(self.err("begin"))?;
        sqlx::query("DELETE FROM evacuations WHERE id = $1")
            .bind(&e.id)
            .execute(&mut *tx)
            .await
            .map_err(self.err("replacing an evacuation"))?;
        let q = format!(
            "INSERT INTO evacuations ({EVACUATION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             $8, $9, $10, $11)"
        );
        sqlx::query(&q)
            .bind(&e.id)
            .bind(&e.host)
            .bind(enum_str(&e.state))
            .bind(i(e.deadline_ms))
            .bind(plan)
            .bind(e.predicted_makespan_s)
            .bind(e.actual_makespan_s)
            .bind(i(e.created_ms))
            .bind(e.ended_ms.map(i))
            .bind(e.error.clone())
            .bind(i(e.updated_ms))
            .execute(&mut *tx)
            .await
            .map_err(self.err("writing an evacuation"))?;
        tx.commit().await.map_err(self.err("commit evacuation"))
    }

    async fn evacuation(&self, id: &str) -> Result<Option<EvacuationRecord>, StoreError> {
        let q = format!("SELECT {EVACUATION_COLS} FROM evacuations WHERE id = $1");
        let row = sqlx::query(&q)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err("reading an evacuation"))?;
        row.map(|r| self.evacuation_row(&r)).transpose()
    }

    async fn evacuations(&self) -> Result<Vec<EvacuationRecord>, StoreError> {
        let q = format!("SELECT {EVACUATION_COLS} FROM evacuations ORDER BY created_ms DESC, id");
        let rows = sqlx::query(&q)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("listing evacuations"))?;
        rows.iter().map(|r| self.evacuation_row(r)).collect()
    }

    async fn audit(&self, entry: &AuditEntry, now_ms: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (id, at_ms, actor, method, path, status) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(new_id("audit"))
        .bind(i(now_ms))
        .bind(&entry.actor)
        .bind(&entry.method)
        .bind(&entry.path)
        .bind(i64::from(entry.status))
        .execute(&self.pool)
        .await
        .map_err(self.err("writing the audit log"))?;
        Ok(())
    }

    async fn audit_log(&self, limit: u32) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, actor, method, path, status FROM audit ORDER BY at_ms DESC, id \
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("reading the audit log"))?;
        let mut out = rows
            .iter()
            .map(|r| {
                let g = |e: sqlx::Error| self.corrupt(format!("audit row: {e}"));
                Ok((
                    r.try_get::<i64, _>("at_ms").map_err(g)? as u64,
                    AuditEntry {
                        actor: r.try_get("actor").map_err(g)?,
                        method: r.try_get("method").map_err(g)?,
                        path: r.try_get("path").map_err(g)?,
                        status: r.try_get::<i64, _>("status").map_err(g)? as u16,
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        leader: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(self.err("begin"))?;
        let row = sqlx::query("SELECT leader, epoch, expires_ms FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.err("reading a lease"))?;
        let expires = i(now_ms.saturating_add(ttl_ms));
        let epoch = match row {
            None => {
                sqlx::query(
                    "INSERT INTO leases (name, leader, epoch, expires_ms) VALUES ($1, $2, 1, $3)",
                )
                .bind(name)
                .bind(leader)
                .bind(expires)
                .execute(&mut *tx)
                .await
                .map_err(self.err("taking a lease"))?;
                1
            }
            Some(r) => {
                let g = |e: sqlx::Error| self.corrupt(format!("leases row: {e}"));
                let holder: String = r.try_get("leader").map_err(g)?;
                let epoch: i64 = r.try_get("epoch").map_err(g)?;
                let until: i64 = r.try_get("expires_ms").map_err(g)?;
                let epoch = if holder == leader {
                    epoch
                } else if until <= i(now_ms) {
                    epoch + 1
                } else {
                    return Ok(None);
                };
                // Only the row we read is replaced: a concurrent taker changes `epoch` first.
                let done = sqlx::query(
                    "UPDATE leases SET leader = $2, epoch = $3, expires_ms = $4 \
                     WHERE name = $1 AND leader = $5 AND expires_ms = $6",
                )
                .bind(name)
                .bind(leader)
                .bind(epoch)
                .bind(expires)
                .bind(&holder)
                .bind(until)
                .execute(&mut *tx)
                .await
                .map_err(self.err("renewing a lease"))?;
                if done.rows_affected() == 0 {
                    return Ok(None);
                }
                epoch
            }
        };
        tx.commit().await.map_err(self.err("commit lease"))?;
        Ok(Some(epoch as u64))
    }

    async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let row = sqlx::query("SELECT leader, epoch, expires_ms FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err("reading a lease"))?;
        let g = |e: sqlx::Error| self.corrupt(format!("leases row: {e}"));
        row.map(|r| {
            Ok(LeaseRecord {
                leader: r.try_get("leader").map_err(g)?,
                epoch: r.try_get::<i64, _>("epoch").map_err(g)? as u64,
                expires_ms: r.try_get::<i64, _>("expires_ms").map_err(g)? as u64,
            })
        })
        .transpose()
    }
}

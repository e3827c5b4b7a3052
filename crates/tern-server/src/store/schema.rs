//! Versioned schema migrations, written in SQL both SQLite and PostgreSQL accept: `TEXT`,
//! `BIGINT`, `DOUBLE PRECISION`, composite primary keys, no autoincrement (ids are made by the
//! controller), no SQLite-only syntax. Booleans are `BIGINT` 0/1 (sqlx's `Any` driver maps
//! them the same way on both).
//!
//! Each step runs once, in order; `schema_version` holds the last applied step. A database
//! newer than this binary is refused instead of being written with an older schema.

/// Schema steps; index + 1 is the version a step brings the database to.
pub const STEPS: &[&[&str]] = &[&[
    "CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        facts TEXT NOT NULL,
        admin_state TEXT NOT NULL,
        post_copy TEXT,
        max_outbound BIGINT,
        max_inbound BIGINT,
        last_heartbeat_ms BIGINT NOT NULL,
        registered_ms BIGINT NOT NULL
    )",
    "CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        memory_mib BIGINT NOT NULL,
        sla_class TEXT NOT NULL,
        post_copy_allowed BIGINT NOT NULL,
        dirty_bytes_per_s BIGINT,
        updated_ms BIGINT NOT NULL
    )",
    "CREATE INDEX vms_by_host ON vms (host, name)",
    "CREATE TABLE migrations (
        id TEXT PRIMARY KEY,
        vm TEXT NOT NULL,
        source TEXT NOT NULL,
        destination TEXT NOT NULL,
        context TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        evacuation_id TEXT,
        plan_index BIGINT,
        reason TEXT NOT NULL,
        idempotency_key TEXT,
        agent_migration_id TEXT,
        error TEXT,
        created_ms BIGINT NOT NULL,
        started_ms BIGINT,
        ended_ms BIGINT,
        next_attempt_ms BIGINT,
        updated_ms BIGINT NOT NULL,
        switched_to_postcopy BIGINT NOT NULL
    )",
    "CREATE INDEX migrations_by_evacuation ON migrations (evacuation_id, plan_index)",
    "CREATE TABLE migration_events (
        migration_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        wall_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        PRIMARY KEY (migration_id, seq)
    )",
    "CREATE TABLE evacuations (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        state TEXT NOT NULL,
        deadline_ms BIGINT NOT NULL,
        plan TEXT NOT NULL,
        predicted_makespan_s DOUBLE PRECISION NOT NULL,
        actual_makespan_s DOUBLE PRECISION,
        created_ms BIGINT NOT NULL,
        ended_ms BIGINT,
        error TEXT,
        updated_ms BIGINT NOT NULL
    )",
    "CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        leader TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    )",
    "CREATE TABLE audit (
        id TEXT PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status BIGINT NOT NULL
    )",
]];

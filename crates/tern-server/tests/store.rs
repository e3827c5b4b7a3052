//! The store suite: one set of assertions run on SQLite (always) and on PostgreSQL.
//!
//! The PostgreSQL case exists only when `TERN_TEST_PG_URL` (e.g.
//! `postgres://tern@127.0.0.1:5432/tern`) is set when the tests are built (see `build.rs`):
//! without it the case is not compiled in, so it can never pass by skipping. It runs in a
//! fresh schema of that database, dropped afterwards.

use tern_server::model::{
    EvacuationPlan, EvacuationRecord, EvacuationState, Heartbeat, HostFacts, HostPatch, HostState,
    MigrationContext, MigrationRecord, MigrationState, PlanTrigger, PlannedMigration,
    PostCopySetting, VmReport,
};
use tern_server::store::{AuditEntry, ControllerStore, SqlStore, StoreError};

fn hb(host: &str, vms: &[&str]) -> Heartbeat {
    Heartbeat {
        host: host.into(),
        facts: HostFacts {
            memory_mib: 4096,
            free_memory_mib: 2048,
            qemu_version: "10.0.0".into(),
            migration_capabilities: vec!["postcopy-ram".into()],
            permit_post_copy: true,
            link_bytes_per_s: Some(125_000_000),
            max_outbound: 2,
            max_inbound: 2,
            outbound_migrations: 0,
            inbound_migrations: 0,
        },
        vms: vms
            .iter()
            .map(|n| VmReport {
                name: (*n).into(),
                memory_mib: 256,
                sla_class: "gold".into(),
                post_copy_allowed: false,
                dirty_bytes_per_s: Some(42),
            })
            .collect(),
    }
}

fn migration(id: &str, evac: Option<&str>, index: u32, created: u64) -> MigrationRecord {
    MigrationRecord {
        id: id.into(),
        vm: format!("vm-{id}"),
        source: "h1".into(),
        destination: "h2".into(),
        context: MigrationContext::Evacuate,
        state: MigrationState::Planned,
        attempts: 0,
        evacuation_id: evac.map(str::to_string),
        plan_index: evac.map(|_| index),
        reason: "room".into(),
        idempotency_key: None,
        agent_migration_id: None,
        error: None,
        created_ms: created,
        started_ms: None,
        ended_ms: None,
        next_attempt_ms: None,
        updated_ms: created,
        switched_to_postcopy: false,
    }
}

async fn suite(s: &SqlStore) {
    // Hosts and VMs.
    s.record_heartbeat(&hb("h2", &["b"]), 1000).await.unwrap();
    s.record_heartbeat(&hb("h1", &["a", "c"]), 1000)
        .await
        .unwrap();
    s.record_heartbeat(&hb("h3", &[]), 1000).await.unwrap();
    let page = s.hosts_page(None, 2).await.unwrap();
    let names: Vec<_> = page.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["h1", "h2"]);
    let page = s.hosts_page(Some("h2"), 2).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].name, "h3");
    let h = s.host("h1").await.unwrap().unwrap();
    assert_eq!(h.state, HostState::Up);
    assert_eq!(h.facts.link_bytes_per_s, Some(125_000_000));
    assert_eq!(h.last_heartbeat_ms, 1000);
    assert!(s.host("nope").await.unwrap().is_none());
    let patched = s
        .patch_host(
            "h1",
            &HostPatch {
                post_copy: Some(PostCopySetting::Deny),
                max_outbound: Some(1),
                max_inbound: None,
                drain: Some(true),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(patched.state, HostState::Draining);
    // A heartbeat updates facts but keeps the operator's settings.
    s.record_heartbeat(&hb("h1", &["a"]), 2000).await.unwrap();
    let h = s.host("h1").await.unwrap().unwrap();
    assert_eq!(
        (h.state, h.post_copy, h.max_outbound, h.last_heartbeat_ms),
        (
            HostState::Draining,
            Some(PostCopySetting::Deny),
            Some(1),
            2000
        )
    );
    assert!(
        s.patch_host("nope", &HostPatch::default())
            .await
            .unwrap()
            .is_none()
    );
    // VMs follow heartbeats: `c` left h1 and now shows up on h3.
    s.record_heartbeat(&hb("h3", &["c"]), 2000).await.unwrap();
    let vms = s.vms(None).await.unwrap();
    let placed: Vec<_> = vms
        .iter()
        .map(|v| (v.name.as_str(), v.host.as_str()))
        .collect();
    assert_eq!(placed, [("a", "h1"), ("b", "h2"), ("c", "h3")]);
    assert!(!vms[0].post_copy_allowed);
    assert_eq!(vms[0].dirty_bytes_per_s, Some(42));
    assert_eq!(s.vms(Some("h2")).await.unwrap().len(), 1);

    // Migrations and their append-only history.
    for (id, idx, t) in [("m2", 1, 20), ("m1", 0, 10), ("m3", 0, 30)] {
        let evac = (id != "m3").then_some("e1");
        s.put_migration(&migration(id, evac, idx, t)).await.unwrap();
    }
    let mut m1 = s.migration("m1").await.unwrap().unwrap();
    assert_eq!(m1, migration("m1", Some("e1"), 0, 10));
    m1.state = MigrationState::Running;
    m1.attempts = 2;
    m1.idempotency_key = Some("m1-a2".into());
    m1.switched_to_postcopy = true;
    m1.started_ms = Some(11);
    s.put_migration(&m1).await.unwrap();
    assert_eq!(s.migration("m1").await.unwrap().unwrap(), m1);
    let ids: Vec<_> = s
        .migrations(Some("e1"))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["m1", "m2"], "plan order");
    let ids: Vec<_> = s
        .migrations(None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["m3", "m2", "m1"], "newest first");
    assert_eq!(s.add_event("m1", "state", "planned", 5).await.unwrap(), 1);
    assert_eq!(s.add_event("m2", "state", "planned", 6).await.unwrap(), 1);
    assert_eq!(s.add_event("m1", "attempt", "a1 → h2", 7).await.unwrap(), 2);
    let ev = s.events("m1").await.unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(
        (ev[1].seq, ev[1].wall_ms, ev[1].kind.as_str()),
        (2, 7, "attempt")
    );
    assert_eq!(ev[1].detail, "a1 → h2");

    // Evacuations keep their plan and predictions.
    let plan = EvacuationPlan {
        host: "h1".into(),
        planner: "serial".into(),
        migrations: vec![PlannedMigration {
            vm: "a".into(),
            destination: "h2".into(),
            reason: "room".into(),
            start_s: 0.0,
            duration_s: 2.5,
            end_s: 2.5,
            trigger: PlanTrigger::AfterMigrationOf { vm: "b".into() },
            reasons: vec!["room".into()],
            ..PlannedMigration::default()
        }],
        concurrency: 1,
        predicted_makespan_s: 2.5,
        deadline_s: 600,
        fits_deadline: true,
        lower_bound_s: 2.0,
        deadline_verdict: "met".into(),
        suggestions: vec!["none".into()],
        ..EvacuationPlan::default()
    };
    let mut e = EvacuationRecord {
        id: "e1".into(),
        host: "h1".into(),
        state: EvacuationState::Running,
        deadline_ms: 600_000,
        plan,
        predicted_makespan_s: 2.5,
        actual_makespan_s: None,
        created_ms: 100,
        ended_ms: None,
        error: None,
        updated_ms: 100,
    };
    s.put_evacuation(&e).await.unwrap();
    e.state = EvacuationState::Completed;
    e.actual_makespan_s = Some(3.25);
    e.ended_ms = Some(3350);
    s.put_evacuation(&e).await.unwrap();
    assert_eq!(s.evacuation("e1").await.unwrap().unwrap(), e);
    assert_eq!(s.evacuations().await.unwrap().len(), 1);
    assert!(s.evacuation("e9").await.unwrap().is_none());

    // Audit log.
    for (i, m) in ["POST", "PATCH"].iter().enumerate() {
        let entry = AuditEntry {
            actor: "token@127.0.0.1:1".into(),
            method: (*m).into(),
            path: "/v1/hosts/h1".into(),
            status: 200,
        };
        s.audit(&entry, 10 + i as u64).await.unwrap();
    }
    let log = s.audit_log(10).await.unwrap();
    let methods: Vec<_> = log.iter().map(|(_, e)| e.method.as_str()).collect();
    assert_eq!(methods, ["POST", "PATCH"]);

    // Leases (issue 12): one holder at a time, a new epoch on every change of leader.
    assert_eq!(
        s.acquire_lease("leader", "a", 1000, 500).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        s.acquire_lease("leader", "b", 1200, 500).await.unwrap(),
        None
    );
    assert_eq!(
        s.acquire_lease("leader", "a", 1400, 500).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        s.acquire_lease("leader", "b", 2000, 500).await.unwrap(),
        Some(2)
    );
    assert_eq!(
        s.acquire_lease("leader", "a", 2100, 500).await.unwrap(),
        None
    );
    // Who holds it, for a standby's refusal naming the leader.
    let l = s.lease("leader").await.unwrap().unwrap();
    assert_eq!((l.leader.as_str(), l.epoch, l.expires_ms), ("b", 2, 2500));
    assert!(s.lease("other").await.unwrap().is_none());
}

#[tokio::test]
async fn store_suite_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db/controller.db");
    let s = SqlStore::open_sqlite(&path).await.unwrap();
    suite(&s).await;
    s.close().await;
    // Reopening applies no step twice and keeps everything.
    let s = SqlStore::open_sqlite(&path).await.unwrap();
    assert_eq!(s.hosts().await.unwrap().len(), 3);
    sqlx::query("INSERT INTO schema_version (version) VALUES (99)")
        .execute(
            &sqlx::AnyPool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    s.close().await;
    match SqlStore::open_sqlite(&path).await {
        Err(e @ StoreError::SchemaTooNew { found: 99, .. }) => {
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[tokio::test]
async fn database_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let path = blocker.join("controller.db");
    let e = SqlStore::open_sqlite(&path)
        .await
        .err()
        .expect("cannot open under a file");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[cfg(tern_test_pg)]
#[tokio::test]
async fn store_suite_on_postgres() {
    let base = std::env::var("TERN_TEST_PG_URL").expect("TERN_TEST_PG_URL was set at build time");
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&base)
        .await
        .expect("connect to TERN_TEST_PG_URL");
    let schema = format!("tern_test_{:016x}", rand::random::<u64>());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let result = async move {
        let s = SqlStore::connect(&url).await.unwrap();
        suite(&s).await;
        s.close().await;
        let s = SqlStore::connect(&url).await.unwrap();
        assert_eq!(s.hosts().await.unwrap().len(), 3, "reopened");
        s.close().await;
    };
    let outcome = tokio::spawn(result).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

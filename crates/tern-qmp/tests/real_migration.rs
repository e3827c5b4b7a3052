//! A real (tiny) live migration between two QEMU processes over a unix socket, driven only
//! through this crate: capabilities on both sides, `migrate-incoming`, `migrate`, events,
//! `wait_for_migration_status`, and `query-migrate` statistics from a real QEMU.
//!
//! The guest is just firmware (no kernel): 64 MiB of RAM under TCG, so it finishes in well
//! under a second and needs no guest image.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tern_qmp::{
    MigrationCapability as Cap, MigrationCapabilityStatus, MigrationParameters, MigrationStatus,
    QmpClient, QmpEventKind, RunState,
};

const QEMU: &str = "qemu-system-x86_64";

/// Kills the child by PID on drop (also on panic).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn_vm(dir: &Path, name: &str, incoming: bool) -> KillOnDrop {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!(
        "unix:{},server=on,wait=off",
        dir.join(format!("{name}.qmp")).display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    KillOnDrop(cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot start {QEMU}: {e}; this test needs QEMU ≥ 9.0 installed")
    }))
}

#[tokio::test]
async fn precopy_migration_between_two_real_qemus() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _src_proc = spawn_vm(dir.path(), "src", false);
    let _dst_proc = spawn_vm(dir.path(), "dst", true);
    let wait = Duration::from_secs(10);
    let (src, mut src_events) = QmpClient::connect_with_retry(dir.path().join("src.qmp"), wait)
        .await
        .expect("source QMP");
    let (dst, _dst_events) = QmpClient::connect_with_retry(dir.path().join("dst.qmp"), wait)
        .await
        .expect("destination QMP");

    assert_eq!(
        dst.query_status().await.unwrap().status,
        RunState::InMigrate
    );
    let caps = [MigrationCapabilityStatus::new(Cap::Events, true)];
    src.migrate_set_capabilities(&caps).await.unwrap();
    dst.migrate_set_capabilities(&caps).await.unwrap();
    src.migrate_set_parameters(&MigrationParameters {
        max_bandwidth: Some(10 << 30),
        ..Default::default()
    })
    .await
    .unwrap();

    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.migrate_incoming(&uri).await.unwrap();
    src.migrate(&uri).await.unwrap();

    let end = src
        .wait_for_migration_status(MigrationStatus::is_terminal, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end, MigrationStatus::Completed);
    let dst_end = dst
        .wait_for_migration_status(MigrationStatus::is_terminal, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(dst_end, MigrationStatus::Completed);

    let info = src.query_migrate().await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Completed));
    let ram = info.ram.clone().expect("ram statistics after completion");
    // Guest RAM plus ROMs and device RAM blocks.
    assert!(ram.total.unwrap_or(0) >= 64 << 20, "{ram:?}");
    assert_eq!(ram.page_size, Some(4096), "{ram:?}");
    assert!(ram.transferred.unwrap_or(0) > 0, "{ram:?}");
    assert_eq!(ram.remaining, Some(0), "{ram:?}");
    assert!(ram.dirty_sync_count.unwrap_or(0) >= 1, "{ram:?}");
    assert!(
        info.total_time.is_some() && info.downtime.is_some(),
        "{info:?}"
    );

    assert_eq!(
        src.query_status().await.unwrap().status,
        RunState::Postmigrate
    );
    // The destination resumes on its own once the migration completes (no -S).
    let mut dst_state = dst.query_status().await.unwrap().status;
    for _ in 0..100 {
        if dst_state == RunState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        dst_state = dst.query_status().await.unwrap().status;
    }
    assert_eq!(dst_state, RunState::Running);

    // The source emitted MIGRATION events ending in completed, and at least one pass.
    // (The wait may have been answered by polling, so the last event can still be in flight.)
    let mut statuses = Vec::new();
    let mut passes = 0;
    while statuses.last() != Some(&MigrationStatus::Completed) {
        let ev = tokio::time::timeout(Duration::from_secs(5), src_events.recv())
            .await
            .unwrap_or_else(|_| panic!("no 'completed' MIGRATION event; saw {statuses:?}"))
            .unwrap();
        match ev.kind {
            QmpEventKind::Migration { status } => statuses.push(status),
            QmpEventKind::MigrationPass { .. } => passes += 1,
            _ => {}
        }
    }
    assert_eq!(
        statuses.first(),
        Some(&MigrationStatus::Setup),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last(),
        Some(&MigrationStatus::Completed),
        "{statuses:?}"
    );
    assert!(statuses.contains(&MigrationStatus::Active), "{statuses:?}");
    assert!(passes >= 1, "no MIGRATION_PASS event");

    src.quit().await.unwrap();
    dst.quit().await.unwrap();
}

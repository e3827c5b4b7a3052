//! Talks to a real QEMU (`qemu-system-x86_64 -machine none`): handshake, queries, capability
//! and parameter round trips, error replies, events and `quit`.
//!
//! CI always has QEMU (≥ 9.0, see docs/platform notes); a missing binary fails with a clear
//! message instead of silently skipping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_qmp::{
    MigrationCapability as Cap, MigrationCapabilityStatus, MigrationParameters, MigrationStatus,
    QmpClient, QmpError, QmpEventKind, RunState, ShutdownCause,
};

const QEMU: &str = "qemu-system-x86_64";

/// Owns the QEMU child; kills it by PID on drop, including when a test panics.
struct QemuGuard {
    child: Child,
    stderr_path: PathBuf,
}

impl QemuGuard {
    fn spawn(dir: &Path) -> QemuGuard {
        let socket = dir.join("qmp.sock");
        let stderr_path = dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file in temp dir");
        let child = Command::new(QEMU)
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {QEMU}: {e}. This test needs QEMU ≥ 9.0 \
                     (Debian: apt-get install -t bookworm-backports qemu-system-x86)"
                )
            });
        QemuGuard { child, stderr_path }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits up to `timeout` for QEMU to exit on its own; returns its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to this child's PID (never by name).
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn real_qemu_migration_subset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut qemu = QemuGuard::spawn(dir.path());

    let (qmp, mut events) =
        match QmpClient::connect_with_retry(dir.path().join("qmp.sock"), Duration::from_secs(10))
            .await
        {
            Ok(c) => c,
            Err(e) => panic!(
                "connect to QEMU's QMP failed: {e}; QEMU stderr: {}",
                qemu.stderr()
            ),
        };

    // Version: from the greeting and from query-version, identical, and ≥ 9.
    let version = qmp.query_version().await.unwrap();
    assert_eq!(&version, qmp.qemu_version());
    assert!(
        version.at_least(9, 0),
        "QEMU {version} is too old: ≥ 9.0 is required (TCG dirty-bitmap fix)"
    );

    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Running, "{status:?}");
    assert!(status.running);

    // Accepted as typed (no NIC: nothing to send, but the arguments must be valid).
    qmp.announce_self(&tern_qmp::AnnounceParameters::default())
        .await
        .unwrap();
    assert!(qmp.query_block_jobs().await.unwrap().is_empty());

    let commands = qmp.supported_commands().await.unwrap();
    for name in [
        "migrate",
        "migrate-incoming",
        "migrate-pause",
        "migrate-recover",
        "migrate-start-postcopy",
        "migrate_cancel",
        "calc-dirty-rate",
        "query-dirty-rate",
        // Storage migration and the network announcement (block.rs, announce.rs).
        "nbd-server-start",
        "nbd-server-stop",
        "block-export-add",
        "block-export-del",
        "query-block-exports",
        "blockdev-add",
        "blockdev-del",
        "blockdev-mirror",
        "query-block-jobs",
        "block-job-cancel",
        "job-complete",
        "job-dismiss",
        "announce-self",
    ] {
        assert!(
            commands.contains(name),
            "{name} missing from query-commands"
        );
    }

    // Out-of-band execution is negotiated with a real QEMU, and the recovery commands go
    // out of band: QEMU answers `migrate-pause` outside post-copy with its own refusal.
    assert!(
        qmp.oob_enabled(),
        "QEMU offered {:?}",
        qmp.greeting().capabilities
    );
    match qmp.migrate_pause().await {
        Err(QmpError::Command { desc, .. }) => {
            assert!(desc.contains("postcopy-active"), "{desc}")
        }
        other => panic!("migrate-pause outside post-copy: {other:?}"),
    }

    // Capabilities are detected, not assumed.
    let supported = qmp.supported_capabilities().await.unwrap();
    for cap in [
        Cap::PostcopyRam,
        Cap::Events,
        Cap::Multifd,
        Cap::AutoConverge,
    ] {
        assert!(supported.contains(&cap), "{cap} missing from {supported:?}");
    }
    qmp.migrate_set_capabilities(&[
        MigrationCapabilityStatus::new(Cap::Events, true),
        MigrationCapabilityStatus::new(Cap::PostcopyRam, true),
        MigrationCapabilityStatus::new(Cap::AutoConverge, false),
    ])
    .await
    .unwrap();
    let enabled = qmp.enabled_capabilities().await.unwrap();
    assert!(enabled.contains(&Cap::Events), "{enabled:?}");
    assert!(enabled.contains(&Cap::PostcopyRam), "{enabled:?}");
    assert!(!enabled.contains(&Cap::AutoConverge), "{enabled:?}");

    // Parameters: set a few, read back all.
    let before = qmp.query_migrate_parameters().await.unwrap();
    assert!(before.downtime_limit.is_some(), "{before:?}");
    let wanted = MigrationParameters {
        downtime_limit: Some(123),
        max_bandwidth: Some(10 << 30),
        max_postcopy_bandwidth: Some(20 << 20),
        multifd_channels: Some(4),
        cpu_throttle_initial: Some(30),
        cpu_throttle_increment: Some(15),
        ..Default::default()
    };
    qmp.migrate_set_parameters(&wanted).await.unwrap();
    let after = qmp.query_migrate_parameters().await.unwrap();
    assert_eq!(after.downtime_limit, Some(123));
    assert_eq!(after.max_bandwidth, Some(10 << 30));
    assert_eq!(after.max_postcopy_bandwidth, Some(20 << 20));
    assert_eq!(after.multifd_channels, Some(4));
    assert_eq!(after.cpu_throttle_initial, Some(30));
    assert_eq!(after.cpu_throttle_increment, Some(15));
    assert_eq!(
        after.max_cpu_throttle, before.max_cpu_throttle,
        "unset fields must not change"
    );

    // An invalid value is refused with QEMU's class and description.
    let err = qmp
        .migrate_set_parameters(&MigrationParameters {
            max_cpu_throttle: Some(200),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { command, class, .. }
            if command == "migrate-set-parameters" && class == "GenericError"),
        "{err:?}"
    );
    let err = qmp
        .execute_raw("no-such-command", serde_json::Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.command_class(), Some("CommandNotFound"), "{err:?}");

    // No migration yet.
    let info = qmp.query_migrate().await.unwrap();
    assert_eq!(info.status_or_none(), MigrationStatus::None);

    // Stop/cont produce events.
    qmp.stop().await.unwrap();
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Paused);
    qmp.cont().await.unwrap();
    let mut saw = Vec::new();
    while saw.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("STOP/RESUME events within 5 s")
            .unwrap();
        saw.push(ev.kind);
    }
    assert_eq!(saw, vec![QmpEventKind::Stop, QmpEventKind::Resume]);

    // quit: QEMU says SHUTDOWN (host-qmp-quit) and exits.
    qmp.quit().await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("SHUTDOWN event within 5 s")
        .unwrap();
    assert_eq!(
        ev.kind,
        QmpEventKind::Shutdown {
            guest: Some(false),
            reason: Some(ShutdownCause::HostQmpQuit)
        }
    );
    let exit = qemu.wait_exit(Duration::from_secs(10));
    assert!(
        matches!(exit, Some(s) if s.success()),
        "QEMU did not exit cleanly after quit: {exit:?}; stderr: {}",
        qemu.stderr()
    );
    // The connection is now closed: later commands say so.
    let err = tokio::time::timeout(Duration::from_secs(5), qmp.query_status())
        .await
        .expect("closed connection reported promptly")
        .unwrap_err();
    assert!(err.is_closed(), "{err:?}");
}

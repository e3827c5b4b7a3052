//! A guest serving UDP echo on a virtio-net NIC is live-migrated between two QEMUs whose
//! taps sit on one bridge (a one-host stand-in for a tenant network spanning two hosts),
//! while `UdpProbe` sends a request every 5 ms from the bridge's address. The client must
//! get answers from the destination afterwards (QEMU's self-announcement moves the MAC to
//! the new port), and the report gives the network blackout next to the heartbeat one.
//!
//! Everything lives in a throwaway network namespace (removed by its guard); both QEMUs are
//! `VmProcess`es killed by PID on drop.

mod common;

use std::time::{Duration, Instant};

use common::{Netns, image, net_lines};
use tern_guest::{
    GuestImageSpec, HostSerialLog, PageRate, UdpProbe, WorkloadParams, WritePattern,
    analyze_migration,
};
use tern_qemu::{
    Accelerator, LaunchMode, NicSpec, QemuBinary, VmDevices, VmLaunch, VmMigrationSettings,
    VmProcess, VmSpec,
};
use tern_qmp::{MigrationParameters, MigrationStatus, QmpClient};

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_client_follows_the_guest_to_the_destination() {
    let img = image(&GuestImageSpec::default());
    let ns = Netns::add(format!("tern-vmmig-{}", std::process::id()));
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let params = WorkloadParams {
        working_set_mib: 4,
        rate: PageRate::PerSecond(1000),
        pattern: WritePattern::Sequential,
        verify: true,
    };
    // Same VM name on both ends: same derived MAC. Only the host tap differs.
    let spec = |tap: &str| VmSpec {
        name: "net-mig".into(),
        memory_mib: params.recommended_memory_mib(),
        vcpus: 1,
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        cmdline: format!("{} tern_ip=10.78.0.2/24", img.cmdline(&params)),
        accelerator: Accelerator::Tcg,
        migration: VmMigrationSettings::default(),
        devices: VmDevices {
            nics: vec![NicSpec::on_tap(tap)],
            ..Default::default()
        },
    };
    let bin = QemuBinary::locate().expect("QEMU ≥ 9");
    let launch = |spec: VmSpec, mode, sub: &str| VmLaunch {
        spec,
        mode,
        runtime_dir: dir.path().join(sub),
        netns: Some(ns.0.clone()),
    };
    let src_vm = VmProcess::spawn(&bin, &launch(spec("tnsrc0"), LaunchMode::Boot, "s"))
        .expect("source QEMU");
    ns.ip(&["link", "set", "tnsrc0", "master", "br0", "up"]);
    wait_until("NETREADY", Duration::from_secs(120), || {
        net_lines(&HostSerialLog::read(src_vm.serial_log()).unwrap_or_default()).0
    });

    let probe = UdpProbe::start(
        "10.78.0.2:7777".parse().unwrap(),
        Duration::from_millis(5),
        Some(&ns.0),
    )
    .expect("probe");
    wait_until("echoes from the source", Duration::from_secs(60), || {
        probe.replies() >= 50
    });

    let dst_vm = VmProcess::spawn(&bin, &launch(spec("tndst0"), LaunchMode::Incoming, "d"))
        .expect("destination QEMU");
    ns.ip(&["link", "set", "tndst0", "master", "br0", "up"]);
    let (src, _) = QmpClient::connect_with_retry(src_vm.qmp_socket(), Duration::from_secs(10))
        .await
        .unwrap();
    let (dst, _) = QmpClient::connect_with_retry(dst_vm.qmp_socket(), Duration::from_secs(10))
        .await
        .unwrap();
    // Both QEMUs are in the namespace: the stream goes over its loopback (a fresh
    // namespace: every port is free).
    let uri = "tcp:127.0.0.1:4444";
    dst.migrate_incoming(uri).await.unwrap();
    src.migrate_set_parameters(&MigrationParameters {
        max_bandwidth: Some(10 << 30),
        downtime_limit: Some(500),
        ..Default::default()
    })
    .await
    .unwrap();
    src.migrate(uri).await.unwrap();
    let status = src
        .wait_for_migration_status(|s| s.is_terminal(), Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(
        status,
        MigrationStatus::Completed,
        "{:?}",
        src.query_migrate().await
    );
    src.quit().await.unwrap();

    // The client's requests now reach the destination: 100 more echoes, counted there.
    let before = probe.replies();
    wait_until(
        "echoes from the destination",
        Duration::from_secs(60),
        || probe.replies() >= before + 100,
    );
    let report = probe.stop(Duration::from_millis(200));
    wait_until(
        "NETSTATUS on the destination",
        Duration::from_secs(10),
        || net_lines(&HostSerialLog::read(dst_vm.serial_log()).unwrap_or_default()).1 > 0,
    );
    let verdict = analyze_migration(
        &HostSerialLog::read(src_vm.serial_log()).unwrap(),
        &HostSerialLog::read(dst_vm.serial_log()).unwrap(),
    );
    eprintln!(
        "[net-migration] heartbeat blackout {:?} ms, network blackout {:.1} ms, \
         lost requests {} of {}",
        verdict.blackout_ms, report.net_blackout_ms, report.net_lost_requests, report.sent
    );
    assert!(verdict.is_intact(), "{verdict:?}");
    // The switchover shows as a gap in the echoes (the source is gone, so every echo
    // after it came from the destination).
    assert!(report.net_blackout_ms > 0.0, "{report:?}");
    assert!(report.last_reply_ns > report.blackout_end_ns, "{report:?}");
}

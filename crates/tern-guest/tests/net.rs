//! Boots the real guest image (TCG) with a virtio-net NIC on a tap device inside a
//! throwaway network namespace and probes its UDP echo service from the host side of the
//! tap with `UdpProbe`: the guest must answer, and the probe's report must say so.
//!
//! The namespace is removed by its guard and the QEMU (a `tern_qemu::VmProcess`) killed by
//! PID on every path; the tap disappears with QEMU.

mod common;

use std::time::{Duration, Instant};

use common::{Netns, image, net_lines};
use tern_guest::{GuestImageSpec, HostSerialLog, PageRate, UdpProbe, WorkloadParams, WritePattern};
use tern_qemu::{
    Accelerator, LaunchMode, NicSpec, QemuBinary, VmDevices, VmLaunch, VmMigrationSettings,
    VmProcess, VmSpec,
};

#[test]
fn guest_answers_udp_on_its_virtio_nic() {
    let img = image(&GuestImageSpec::default());
    let ns = Netns::add(format!("tern-vmnet-{}", std::process::id()));
    let dir = tempfile::tempdir().unwrap();
    let params = WorkloadParams {
        working_set_mib: 4,
        rate: PageRate::PerSecond(1000),
        pattern: WritePattern::Sequential,
        verify: true,
    };
    let spec = VmSpec {
        name: "net-test".into(),
        memory_mib: params.recommended_memory_mib(),
        vcpus: 1,
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        cmdline: format!("{} tern_ip=10.77.0.2/24", img.cmdline(&params)),
        accelerator: Accelerator::Tcg,
        migration: VmMigrationSettings::default(),
        devices: VmDevices {
            nics: vec![NicSpec::on_tap("tnvm0")],
            ..Default::default()
        },
    };
    let bin = QemuBinary::locate().expect("QEMU ≥ 9");
    let vm = VmProcess::spawn(
        &bin,
        &VmLaunch {
            spec,
            mode: LaunchMode::Boot,
            runtime_dir: dir.path().join("vm"),
            netns: Some(ns.0.clone()),
        },
    )
    .expect("QEMU with a NIC");
    // VmProcess returns once QEMU created the tap in the namespace: the host end of the
    // tenant "network".
    assert!(
        ns.ip_ok(&["link", "show", "tnvm0"]),
        "spawn returned before the tap existed"
    );
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "tnvm0"]);
    ns.ip(&["link", "set", "tnvm0", "up"]);

    let deadline = Instant::now() + Duration::from_secs(120);
    while !net_lines(&HostSerialLog::read(vm.serial_log()).unwrap_or_default()).0 {
        assert!(
            Instant::now() < deadline,
            "no NETREADY; serial log:\n{}",
            std::fs::read_to_string(vm.serial_log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let target = "10.77.0.2:7777".parse().unwrap();
    let probe = UdpProbe::start(target, Duration::from_millis(5), Some(&ns.0)).expect("probe");
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.replies() < 100 {
        assert!(
            Instant::now() < deadline,
            "only {} echoes: {:?}",
            probe.replies(),
            probe.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = probe.stop(Duration::from_millis(200));
    eprintln!(
        "[net] sent {} received {} lost {} longest echo gap {:.1} ms",
        report.sent, report.received, report.net_lost_requests, report.net_blackout_ms
    );
    assert!(report.received >= 100, "{report:?}");
    assert!(report.first_reply_ns.is_some());

    // The guest counts what it answered (NETSTATUS once a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while net_lines(&HostSerialLog::read(vm.serial_log()).unwrap_or_default()).1 < 100 {
        assert!(
            Instant::now() < deadline,
            "NETSTATUS never counted the requests"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(vm);
}

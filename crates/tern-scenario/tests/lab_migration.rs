//! Real guests, real lab hosts, real migrations: the foundation's acceptance tests.
//!
//! Each test brings up its own lab (unique name), boots a TCG (or KVM) guest running
//! `tern-load`, and checks the guest's own integrity verdict. Run as root, one at a time
//! (`--test-threads=1`): two emulated guests on two cores would starve each other.

use std::sync::OnceLock;
use std::time::Duration;

use tern_agent::{HostIdentity, HostMigrationConfig, HostRuntime, MigrationOrder};
use tern_engine::MigrationEventKind;
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_lab::{Lab, LabSpec, LinkRate};
use tern_policy::{MigrationContext, SlaCatalog};
use tern_qemu::{QemuBinary, QemuError, VmMigrationSettings, VmSpec};
use tern_scenario::{LabEnvironment, MigrationSummary, ScenarioSpec, run_scenario};

fn env() -> &'static LabEnvironment {
    static ENV: OnceLock<LabEnvironment> = OnceLock::new();
    ENV.get_or_init(|| {
        LabEnvironment::prepare(|s| eprintln!("setup: {s}"))
            .expect("lab environment (run as root after ./x setup)")
    })
}

fn rate(s: &str) -> LinkRate {
    s.parse().expect("valid rate")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run(spec: ScenarioSpec) -> MigrationSummary {
    let s = runtime()
        .block_on(run_scenario(env(), &spec, None))
        .expect("scenario ran");
    eprintln!(
        "{}: outcome={} postcopy={} total={:.1}s blackout={:?}ms bytes={} corrupt={} ctl={} continuous={} passes_after={} actions={:?}",
        spec.lab_name,
        s.outcome,
        s.switched_to_postcopy,
        s.total_time_s,
        s.blackout_ms,
        s.bytes_sent,
        s.corrupt_pages,
        s.control_mismatches,
        s.heartbeat_continuous,
        s.verify_passes_after,
        s.actions
    );
    s
}

fn no_lab_left(name: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&format!("tern-{name}-")),
        "lab {name} left namespaces behind:\n{text}"
    );
}

#[test]
fn guest_boots_in_a_lab_host_and_verifies_memory() {
    let env = env();
    let lab = Lab::up_guarded(&LabSpec {
        name: "t-boot".into(),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = tempfile::tempdir().expect("tempdir");
    let h1 = lab.host("h1").expect("h1");
    let host = HostRuntime::new(
        HostIdentity {
            name: "h1".into(),
            netns: Some(h1.netns().to_string()),
            migration_address: h1.address().into(),
            memory_mib: 1024,
        },
        HostMigrationConfig::default(),
        env.qemu.clone(),
        dir.path().join("h1"),
    );
    let rt = runtime();
    let spec = VmSpec {
        name: "boot".into(),
        memory_mib: 192,
        vcpus: 1,
        kernel: env.image.kernel.clone(),
        initrd: env.image.initrd.clone(),
        cmdline: env.image.cmdline(&WorkloadParams {
            working_set_mib: 16,
            ..WorkloadParams::default()
        }),
        accelerator: env.accelerator.accelerator,
        devices: Default::default(),
        migration: VmMigrationSettings::default(),
    };
    let info = rt.block_on(host.create_vm(spec)).expect("boot");
    rt.block_on(tern_scenario::wait_guest_ready(
        &info.serial_log,
        2,
        Duration::from_secs(90),
    ))
    .expect("two verify passes");
    let log = tern_guest::HostSerialLog::read(&info.serial_log).expect("serial log");
    let health = tern_guest::analyze_boot(&log);
    rt.block_on(host.stop_all());
    assert!(health.verify_passes >= 2, "{health:?}");
    assert_eq!(health.corrupt_pages, 0);
    assert_eq!(health.control_mismatches, 0);
    assert!(health.sequence_anomalies.is_empty(), "{health:?}");
    drop(lab);
    no_lab_left("t-boot");
}

#[test]
fn idle_guest_precopy_completes_between_lab_hosts() {
    let s = run(ScenarioSpec {
        lab_name: "t-idle".into(),
        link_rate: Some(rate("1gbit")),
        memory_mib: 192,
        workload: WorkloadParams {
            working_set_mib: 16,
            rate: PageRate::PerSecond(50),
            pattern: WritePattern::Sequential,
            verify: true,
        },
        ..ScenarioSpec::default()
    });
    assert_eq!(s.outcome, "completed");
    assert!(
        !s.switched_to_postcopy,
        "an idle guest converges in pre-copy"
    );
    assert_eq!(s.guest_location.as_deref(), Some("h2"));
    assert_eq!(s.source_final_run_state.as_deref(), Some("postmigrate"));
    assert!(!s.source_running);
    assert_eq!(s.corrupt_pages, 0);
    assert_eq!(s.control_mismatches, 0);
    assert!(s.heartbeat_continuous, "heartbeats continue on h2");
    assert!(
        s.verify_passes_after >= 1,
        "the verifier keeps running on h2"
    );
    assert!(s.blackout_ms.is_some());
    no_lab_left("t-idle");
}

#[test]
fn dirtier_than_the_link_switches_to_postcopy_and_completes() {
    let s = run(ScenarioSpec {
        lab_name: "t-postcopy".into(),
        link_rate: Some(rate("100mbit")),
        memory_mib: 192,
        workload: WorkloadParams {
            working_set_mib: 48,
            rate: PageRate::Max,
            pattern: WritePattern::Sequential,
            verify: true,
        },
        context: MigrationContext::Evacuate,
        ..ScenarioSpec::default()
    });
    assert_eq!(s.outcome, "completed", "{:?}", s.error);
    assert!(s.switched_to_postcopy, "actions: {:?}", s.actions);
    let through_postcopy = s.events.iter().any(|e| {
        matches!(&e.kind, MigrationEventKind::State { to, .. } if *to == tern_engine::MigrationState::Postcopy)
    });
    assert!(through_postcopy, "status passed through postcopy-active");
    assert!(s.integrity_ok(), "{s:?}");
    assert_eq!(s.corrupt_pages, 0);
    assert_eq!(s.guest_location.as_deref(), Some("h2"));
    no_lab_left("t-postcopy");
}

#[test]
fn cancel_during_precopy_keeps_the_guest_on_the_source() {
    let s = run(ScenarioSpec {
        lab_name: "t-cancel".into(),
        link_rate: Some(rate("50mbit")),
        memory_mib: 192,
        workload: WorkloadParams {
            working_set_mib: 48,
            rate: PageRate::Max,
            pattern: WritePattern::Sequential,
            verify: true,
        },
        // A long budget: the policy must not finish the migration before the abort.
        context: MigrationContext::Manual,
        deadline_ms: Some(600_000),
        abort_after: Some(Duration::from_secs(3)),
        ..ScenarioSpec::default()
    });
    assert_eq!(
        s.outcome, "aborted",
        "{:?} {:?}",
        s.error, s.operator_results
    );
    assert!(s.source_running, "the guest keeps running on h1");
    assert_eq!(s.guest_location.as_deref(), Some("h1"));
    assert!(!s.destination_vm_present, "h2's QEMU is gone");
    assert!(!s.switched_to_postcopy);
    assert_eq!(s.corrupt_pages, 0);
    assert_eq!(s.control_mismatches, 0);
    assert!(
        s.heartbeat_continuous,
        "the source's heartbeats never stopped"
    );
    no_lab_left("t-cancel");
}

#[test]
fn bad_input_is_refused_before_anything_starts() {
    let env = env();
    // QEMU not installed (or not where we are told): a clear error with the install hint.
    let e = QemuBinary::at(std::path::Path::new("/nonexistent/qemu-system-x86_64")).unwrap_err();
    assert!(matches!(e, QemuError::QemuMissing(_)));
    assert!(e.to_string().contains("install-prereqs"), "{e}");

    let lab = Lab::up_guarded(&LabSpec {
        name: "t-badinput".into(),
        ..LabSpec::default()
    })
    .expect("lab up");
    // Unknown host: the error lists the valid ones.
    let e = lab.host("h9").unwrap_err().to_string();
    assert!(e.contains("h9") && e.contains("h1"), "{e}");

    let dir = tempfile::tempdir().expect("tempdir");
    let host = |name: &str, mem: u64| {
        let h = lab.host(name).expect("host");
        HostRuntime::new(
            HostIdentity {
                name: name.into(),
                netns: Some(h.netns().to_string()),
                migration_address: h.address().into(),
                memory_mib: mem,
            },
            HostMigrationConfig::default(),
            env.qemu.clone(),
            dir.path().join(name),
        )
    };
    let h1 = host("h1", 1024);
    let h2 = host("h2", 128);
    let rt = runtime();
    let good = VmSpec {
        name: "vm".into(),
        memory_mib: 192,
        vcpus: 1,
        kernel: env.image.kernel.clone(),
        initrd: env.image.initrd.clone(),
        cmdline: env.image.cmdline(&WorkloadParams {
            working_set_mib: 8,
            ..WorkloadParams::default()
        }),
        accelerator: env.accelerator.accelerator,
        devices: Default::default(),
        migration: VmMigrationSettings::default(),
    };
    let mut zero = good.clone();
    zero.memory_mib = 0;
    let e = rt.block_on(h1.create_vm(zero)).unwrap_err().to_string();
    assert!(e.contains("memory 0 MiB"), "{e}");
    let mut huge = good.clone();
    huge.memory_mib = 4096;
    let e = rt.block_on(h1.create_vm(huge)).unwrap_err().to_string();
    assert!(e.contains("4096 MiB") && e.contains("1024 MiB"), "{e}");
    let mut nokernel = good.clone();
    nokernel.kernel = dir.path().join("no-such-kernel");
    let e = rt.block_on(h1.create_vm(nokernel)).unwrap_err().to_string();
    assert!(e.contains("no-such-kernel"), "{e}");
    assert!(h1.list_names().is_empty(), "nothing was started");

    // A real guest, then migrations that must be refused.
    rt.block_on(h1.create_vm(good)).expect("boot");
    let catalog = SlaCatalog::builtin();
    let order = MigrationOrder {
        vm: "vm".into(),
        context: MigrationContext::Manual,
        policy: tern_policy::PolicyName::Tern,
        link_bytes_per_s: None,
        deadline_ms: None,
        probe_seconds: 0,
    };
    let e = tern_agent::migration::check_order(&h1, &h1, &order, &catalog)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already runs on host h1"), "{e}");
    let e = tern_agent::migration::check_order(&h1, &h2, &order, &catalog)
        .unwrap_err()
        .to_string();
    assert!(e.contains("192 MiB") && e.contains("128 MiB"), "{e}");
    let unknown = MigrationOrder {
        vm: "nope".into(),
        ..order.clone()
    };
    let e = tern_agent::migration::check_order(&h1, &h2, &unknown, &catalog)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"nope\"") && e.contains("vm"), "{e}");
    // Policy names are parsed once at the edge; an unknown one never reaches admission.
    let e = "magic"
        .parse::<tern_policy::PolicyName>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("magic") && e.contains("nova"), "{e}");
    assert!(
        h2.list_names().is_empty(),
        "no destination QEMU was started"
    );
    rt.block_on(h1.stop_all());
    drop(lab);
    no_lab_left("t-badinput");
}

//! Boots a guest from a kernel and initrd and prints its host-timestamped serial log.
//! `cargo run -p tern-qemu --example boot -- KERNEL INITRD "CMDLINE" SECONDS`
use std::time::Duration;
use tern_qemu::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: boot KERNEL INITRD CMDLINE SECONDS".into());
    }
    let bin = QemuBinary::locate()?;
    let dir = tempfile::tempdir()?;
    let spec = VmSpec {
        name: "boot-example".into(),
        memory_mib: 256,
        vcpus: 1,
        kernel: a[1].clone().into(),
        initrd: a[2].clone().into(),
        cmdline: a[3].clone(),
        accelerator: Accelerator::Tcg,
        devices: Default::default(),
        migration: VmMigrationSettings::default(),
    };
    let start = host_monotonic_ns();
    let mut vm = VmProcess::spawn(
        &bin,
        &VmLaunch {
            spec,
            mode: LaunchMode::Boot,
            runtime_dir: dir.path().to_path_buf(),
            netns: None,
        },
    )?;
    std::thread::sleep(Duration::from_secs(a[4].parse()?));
    vm.kill();
    let log = std::fs::read_to_string(vm.serial_log())?;
    for l in log.lines().take(5) {
        println!("{l}");
    }
    let first_hb = log
        .lines()
        .find(|l| l.contains(" L HB "))
        .and_then(|l| l.split(' ').next()?.parse::<u64>().ok());
    println!(
        "lines={} first_hb_after_ms={:?}",
        log.lines().count(),
        first_hb.map(|t| (t - start) / 1_000_000)
    );
    Ok(())
}

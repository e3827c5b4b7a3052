//! Boots the real guest image (TCG) with a small virtio-blk data disk and the data-disk
//! workload: blocks are written and verified with no `CORRUPT`; then a block is overwritten
//! from the host behind the guest's back (what a storage migration that lost a write
//! would leave), and the guest must report it.
//!
//! The disk is attached with the `-blockdev` + `virtio-blk-pci` arguments of
//! `tern_qemu::DiskSpec`, the ones tern starts VMs with.

mod common;

use std::ffi::OsString;
use std::io::{Seek, SeekFrom, Write};

use common::{BOOT_TIMEOUT, RunningGuest, image};
use tern_guest::{
    DiskWorkload, GuestImageSpec, PageRate, WorkloadParams, WritePattern, analyze_boot,
};
use tern_qemu::{DiskFormat, DiskSpec};

const DISK_BLOCKS: u64 = 2048; // 8 MiB

#[test]
fn data_disk_blocks_are_written_and_verified_and_a_stale_block_is_caught() {
    let img = image(&GuestImageSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("data.raw");
    std::fs::File::create(&disk_path)
        .and_then(|f| f.set_len(DISK_BLOCKS * 4096))
        .unwrap();
    let disk = DiskSpec::new("data", &disk_path, DiskFormat::Raw);
    disk.validate().unwrap();
    let mut extra: Vec<OsString> = Vec::new();
    for node in disk.blockdev_json() {
        extra.push("-blockdev".into());
        extra.push(node.into());
    }
    extra.push("-device".into());
    extra.push(disk.device_arg(None).into());

    let params = WorkloadParams {
        working_set_mib: 4,
        rate: PageRate::PerSecond(1000),
        pattern: WritePattern::Sequential,
        verify: true,
    };
    let workload = DiskWorkload {
        device: "/dev/vda".into(),
        rate: PageRate::PerSecond(200),
        verify_rate: 2000,
    };
    workload.validate().unwrap();
    let cmdline = format!("{} {}", img.cmdline(&params), workload.kernel_args());
    let mut guest = RunningGuest::boot(&img, &cmdline, params.recommended_memory_mib(), &extra);

    // Two complete passes over the disk (≈ 2 s at 2000 reads/s) with writes going on.
    let ok = guest.wait_for(BOOT_TIMEOUT, |log| {
        let h = analyze_boot(log);
        h.disk_verify_passes >= 2 && h.last_disk_status.is_some_and(|s| s.writes > 0)
    });
    let h = analyze_boot(&guest.log());
    assert!(ok, "no 2 disk verify passes\n{}", guest.diagnostics());
    assert_eq!(
        h.disk_ready.as_ref().map(|d| d.blocks),
        Some(DISK_BLOCKS),
        "{}",
        guest.diagnostics()
    );
    assert_eq!(h.disk_corrupt_blocks, 0, "{}", guest.diagnostics());
    assert_eq!(h.disk_io_errors, 0, "{}", guest.diagnostics());
    assert!(h.is_healthy(), "{h:?}\n{}", guest.diagnostics());
    let writes_before = h.last_disk_status.map_or(0, |s| s.writes);
    eprintln!(
        "[disk] {} blocks, {} passes, {} block writes, max heartbeat gap {:.1} ms",
        DISK_BLOCKS, h.disk_verify_passes, writes_before, h.max_gap_ms
    );

    // Roll a block back behind the guest's back: zero it in the image file. QEMU uses the
    // host page cache (cache=writeback), which this write goes through too.
    let stale = 1500u64;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_path)
        .unwrap();
    f.seek(SeekFrom::Start(stale * 4096)).unwrap();
    f.write_all(&[0u8; 4096]).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let caught = guest.wait_for(BOOT_TIMEOUT, |log| {
        analyze_boot(log).disk_corrupt_blocks >= 1
    });
    let h = analyze_boot(&guest.log());
    assert!(
        caught,
        "the stale block was not reported\n{}",
        guest.diagnostics()
    );
    assert!(
        guest
            .text()
            .contains(&format!("CORRUPT block={stale} expected=")),
        "{}",
        guest.diagnostics()
    );
    assert!(!h.is_healthy());
    assert_eq!(
        h.corrupt_pages, 0,
        "a disk fault must not count as a page fault"
    );
}

//! Boots the real guest image under QEMU (TCG) and checks what it prints.
//!
//! Needs qemu-system-x86_64, busybox-static, gcc and apt (scripts/install-prereqs.sh).
//! The image is built into the tern cache (`$TERN_CACHE_DIR` or `/var/cache/tern`), so only
//! the first run downloads the kernel. Every QEMU is killed by PID when its guard drops,
//! including when an assertion panics.

mod common;

use std::time::{Duration, Instant};

use common::{BOOT_TIMEOUT, RunningGuest, image, status_points};
use tern_guest::{
    GuestHealth, GuestImageSpec, HostSerialLog, PageRate, WorkloadParams, WritePattern,
    analyze_boot,
};

fn last_status_passes(log: &HostSerialLog) -> u64 {
    analyze_boot(log).verify_passes
}

fn report(name: &str, guest: &RunningGuest, h: &GuestHealth) {
    let log = guest.log();
    let pts = status_points(&log);
    let boot_ms = h
        .first_heartbeat_ns
        .map(|t| (t - guest.started_ns) as f64 / 1e6);
    let (pass_ms, wps) = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) if b.1 > a.1 => (
            Some((b.0 - a.0) as f64 / 1e6 / (b.1 - a.1) as f64),
            (b.2 - a.2) as f64 / ((b.0 - a.0) as f64 / 1e9),
        ),
        _ => (None, 0.0),
    };
    eprintln!(
        "[{name}] first heartbeat {boot_ms:?} ms after QEMU start; heartbeats {}; passes {}; \
         verify pass {pass_ms:?} ms; page writes/s {wps:.0}; max heartbeat gap {:.1} ms",
        h.heartbeats, h.verify_passes, h.max_gap_ms
    );
}

#[test]
fn workload_boots_and_verifies_cleanly_at_max_rate() {
    let img = image(&GuestImageSpec::default());
    let params = WorkloadParams {
        working_set_mib: 16,
        rate: PageRate::Max,
        pattern: WritePattern::Sequential,
        verify: true,
    };
    let mut guest = RunningGuest::boot(&img, &img.cmdline(&params), 256, &[]);
    // STATUS comes once a second; ask for two of them so the rate figure spans a second.
    let ok = guest.wait_for(BOOT_TIMEOUT, |log| {
        last_status_passes(log) >= 2 && status_points(log).len() >= 2
    });
    let h = analyze_boot(&guest.log());
    report("max/seq", &guest, &h);
    assert!(
        ok,
        "no 2 verify passes within {BOOT_TIMEOUT:?}\n{}",
        guest.diagnostics()
    );

    let ready = h
        .ready
        .unwrap_or_else(|| panic!("no READY line\n{}", guest.diagnostics()));
    assert_eq!(
        (ready.ws_mib, ready.pages, ready.rate, ready.pattern),
        (16, 4096, PageRate::Max, WritePattern::Sequential)
    );
    assert_eq!(h.first_seq, Some(1));
    assert!(h.verify_passes >= 2);
    assert_eq!(h.corrupt_pages, 0, "{}", guest.diagnostics());
    assert_eq!(h.control_mismatches, 0, "{}", guest.diagnostics());
    assert!(
        h.sequence_anomalies.is_empty(),
        "{:?}",
        h.sequence_anomalies
    );
    assert!(h.is_healthy());
    // Writes really happen: the last STATUS reports some.
    assert!(h.last_status.is_some_and(|s| s.writes > 0 && s.wps > 0));
}

#[test]
fn rate_limit_and_random_pattern_are_honoured() {
    let img = image(&GuestImageSpec::default());
    let params = WorkloadParams {
        working_set_mib: 8,
        rate: PageRate::PerSecond(20_000),
        pattern: WritePattern::Random,
        verify: true,
    };
    // The recommended size must be enough: an OOM kill would end the workload.
    let mut guest = RunningGuest::boot(
        &img,
        &img.cmdline(&params),
        params.recommended_memory_mib(),
        &[],
    );
    let ok = guest.wait_for(BOOT_TIMEOUT, |log| status_points(log).len() >= 3);
    let h = analyze_boot(&guest.log());
    report("20000/random", &guest, &h);
    assert!(
        ok,
        "no 3 STATUS lines within {BOOT_TIMEOUT:?}\n{}",
        guest.diagnostics()
    );
    let ready = h
        .ready
        .unwrap_or_else(|| panic!("no READY\n{}", guest.diagnostics()));
    assert_eq!(
        (ready.rate, ready.pattern),
        (PageRate::PerSecond(20_000), WritePattern::Random)
    );
    // Full seconds after the first: the token budget must hold the rate within 10 %
    // (the vCPU can do ~1 M/s, so a broken limiter would show ~50× too many).
    let pts = status_points(&guest.log());
    for &(_, _, _, wps) in &pts[1..] {
        assert!(
            (18_000..=22_000).contains(&wps),
            "wps {wps} not within 10 % of 20000: {pts:?}"
        );
    }
    assert_eq!(h.corrupt_pages, 0);
    assert_eq!(h.control_mismatches, 0);
}

/// `bursty`: 2 s of writes at the rate, then 2 s of none. STATUS comes once a second, so
/// over 8 s some seconds must show (almost) no writes and others the full rate.
#[test]
fn bursty_pattern_alternates_writing_and_idle() {
    let img = image(&GuestImageSpec::default());
    let params = WorkloadParams {
        working_set_mib: 8,
        rate: PageRate::PerSecond(10_000),
        pattern: WritePattern::Bursty,
        verify: true,
    };
    let mut guest = RunningGuest::boot(
        &img,
        &img.cmdline(&params),
        params.recommended_memory_mib(),
        &[],
    );
    let ok = guest.wait_for(BOOT_TIMEOUT, |log| status_points(log).len() >= 9);
    let h = analyze_boot(&guest.log());
    report("10000/bursty", &guest, &h);
    assert!(
        ok,
        "no 9 STATUS lines within {BOOT_TIMEOUT:?}\n{}",
        guest.diagnostics()
    );
    let ready = h
        .ready
        .unwrap_or_else(|| panic!("no READY\n{}", guest.diagnostics()));
    assert_eq!(ready.pattern, WritePattern::Bursty);
    let pts = status_points(&guest.log());
    let wps: Vec<u64> = pts[1..].iter().map(|p| p.3).collect();
    // A STATUS second can straddle a burst edge; whole burst seconds hold the rate, whole
    // idle seconds show no writes at all.
    assert!(wps.contains(&0), "no idle second in {wps:?}");
    assert!(
        wps.iter().any(|&w| (9_000..=11_000).contains(&w)),
        "no second at the burst rate in {wps:?}"
    );
    let total: u64 = wps.iter().sum();
    let mean = total as f64 / wps.len() as f64;
    assert!(
        (3_500.0..=6_500.0).contains(&mean),
        "mean {mean:.0} writes/s is not about half the rate: {wps:?}"
    );
    assert_eq!(h.corrupt_pages, 0);
    assert_eq!(h.control_mismatches, 0);
}

#[test]
fn injected_stale_page_and_stack_counter_are_detected() {
    // tern_inject=stale makes the workload do to itself what a lost dirty page does:
    // one page and the stack twin counter roll back. Both checkers must report it,
    // exactly once, at max rate in seq mode (the case where the writer would otherwise
    // repair a stale page before the verifier sees it).
    let img = image(&GuestImageSpec::default());
    let params = WorkloadParams {
        working_set_mib: 8,
        ..WorkloadParams::default()
    };
    let cmdline = format!("{} tern_inject=stale", img.cmdline(&params));
    let mut guest = RunningGuest::boot(&img, &cmdline, params.recommended_memory_mib(), &[]);
    // Injection is 2 s after READY; wait for a STATUS after it that reports it.
    let ok = guest.wait_for(BOOT_TIMEOUT, |log| {
        analyze_boot(log)
            .last_status
            .is_some_and(|s| s.corrupt >= 1 && s.ctl_mismatch >= 1)
    });
    let h = analyze_boot(&guest.log());
    assert!(ok, "injected faults not reported\n{}", guest.diagnostics());
    assert_eq!(h.corrupt_pages, 1, "{}", guest.diagnostics());
    assert_eq!(h.control_mismatches, 1, "{}", guest.diagnostics());
    assert!(!h.is_healthy());
    let text = guest.text();
    assert_eq!(text.matches(" L CORRUPT page=").count(), 1, "{text}");
    assert_eq!(text.matches(" L CTLMISMATCH stack=").count(), 1, "{text}");
}

#[test]
fn custom_command_and_extra_files_run_then_the_guest_powers_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let extra = dir.path().join("hello.txt");
    std::fs::write(&extra, "tern extra file content\n").expect("write extra file");
    let spec = GuestImageSpec {
        extra_files: vec![(extra.clone(), "/etc/tern/hello.txt".into())],
        command: Some("echo CUSTOM-START; cat /etc/tern/hello.txt; echo CUSTOM-END".into()),
        kernel: None,
    };
    let img = image(&spec);
    assert_ne!(img.id, image(&GuestImageSpec::default()).id);
    let mut guest = RunningGuest::boot(&img, &img.cmdline(&WorkloadParams::default()), 192, &[]);
    let ok = guest.wait_for(BOOT_TIMEOUT, |log| {
        log.lines
            .iter()
            .any(|l| l.text.starts_with("tern-init: command exited"))
    });
    assert!(ok, "custom command did not finish\n{}", guest.diagnostics());
    let text = guest.text();
    let start = text.find("CUSTOM-START").expect("CUSTOM-START printed");
    let content = text
        .find("tern extra file content")
        .expect("extra file printed");
    let end = text.find("CUSTOM-END").expect("CUSTOM-END printed");
    assert!(start < content && content < end);
    assert!(
        !text.contains("READY"),
        "tern-load ran instead of the command"
    );
    // poweroff -f makes QEMU exit on its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exited = false;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = guest.child.try_wait() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        exited,
        "QEMU still running after poweroff\n{}",
        guest.diagnostics()
    );
}

#[test]
fn second_build_is_served_from_the_cache() {
    let spec = GuestImageSpec::default();
    let first = image(&spec);
    let t = Instant::now();
    let second = image(&spec);
    assert_eq!(first, second);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "cached build took {:?}",
        t.elapsed()
    );
}

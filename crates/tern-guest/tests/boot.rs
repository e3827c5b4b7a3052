//! Boots the real guest image under QEMU (TCG) and checks what it prints.
//!
//! Needs qemu-system-x86_64, busybox-static, gcc and apt (scripts/install-prereqs.sh).
//! The image is built into the tern cache (`$TERN_CACHE_DIR` or `/var/cache/tern`), so only
//! the first run downloads the kernel. Every QEMU is killed by PID when its guard drops,
//! including when an assertion panics.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_guest::{
    GuestHealth, GuestImage, GuestImageSpec, GuestLine, HostSerialLog, PageRate, WorkloadParams,
    WritePattern, analyze_boot, build, default_cache_dir, parse_guest_line,
};

/// Boot under load from parallel tests and other work on 2 cores: 5–15 s measured.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; CLOCK_MONOTONIC exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn image(spec: &GuestImageSpec) -> GuestImage {
    build(spec, &default_cache_dir(), |m| eprintln!("[image] {m}"))
        .unwrap_or_else(|e| panic!("building the guest image failed: {e}"))
}

/// A QEMU process whose serial console (stdio) is recorded in the host serial-log format.
/// Dropping it kills QEMU by PID and reaps it.
struct RunningGuest {
    child: Child,
    started_ns: u64,
    log: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl RunningGuest {
    fn boot(image: &GuestImage, cmdline: &str, memory_mib: u64) -> Self {
        let started_ns = mono_ns();
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-nodefaults", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot", "-m"])
            .arg(memory_mib.to_string())
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(cmdline)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start qemu-system-x86_64 (install-prereqs.sh): {e}")
            });
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let log = log.clone();
            readers.push(std::thread::spawn(move || record(out, &log)));
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            readers.push(std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                if let Ok(mut e) = stderr.lock() {
                    e.push_str(&s);
                }
            }));
        }
        RunningGuest {
            child,
            started_ns,
            log,
            stderr,
            readers,
        }
    }

    fn log(&self) -> HostSerialLog {
        HostSerialLog::parse(&self.log.lock().map(|l| l.clone()).unwrap_or_default())
    }

    fn text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Polls the log until `done` holds, QEMU exits, or `timeout` passes.
    fn wait_for(&mut self, timeout: Duration, done: impl Fn(&HostSerialLog) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.log()) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                // Give the reader a moment to drain the pipe, then decide.
                std::thread::sleep(Duration::from_millis(200));
                return done(&self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn diagnostics(&self) -> String {
        let text = self.text();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        format!(
            "--- serial log (last 30 lines) ---\n{}\n--- qemu stderr ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
        )
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// The serial recorder of these tests: the same format `tern-qemu` writes.
fn record(out: impl Read, log: &Mutex<String>) {
    let mut reader = BufReader::new(out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let complete = buf.ends_with(b"\n");
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim_end_matches(['\n', '\r']);
                let kind = if complete { 'L' } else { 'P' };
                if let Ok(mut l) = log.lock() {
                    l.push_str(&format!("{} {kind} {text}\n", mono_ns()));
                }
            }
        }
    }
}

fn last_status_passes(log: &HostSerialLog) -> u64 {
    analyze_boot(log).verify_passes
}

/// The first and last STATUS lines' (host ns, passes, writes).
fn status_points(log: &HostSerialLog) -> Vec<(u64, u64, u64, u64)> {
    log.lines
        .iter()
        .filter_map(|l| match parse_guest_line(&l.text) {
            GuestLine::Status(s) => Some((l.mono_ns, s.passes, s.writes, s.wps)),
            _ => None,
        })
        .collect()
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
    let mut guest = RunningGuest::boot(&img, &img.cmdline(&params), 256);
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
    let mut guest = RunningGuest::boot(&img, &img.cmdline(&params), 192);
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
    let mut guest = RunningGuest::boot(&img, &img.cmdline(&WorkloadParams::default()), 192);
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

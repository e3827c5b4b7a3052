//! Helpers shared by the QEMU integration tests: building the image and running a guest
//! whose serial console is recorded in the host serial-log format.

#![allow(dead_code)] // each test binary uses a different subset

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_guest::{
    GuestImage, GuestImageSpec, GuestLine, HostSerialLog, build, default_cache_dir,
    parse_guest_line,
};

/// Boot under load from parallel tests and other work on 2 cores: 5–15 s measured.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; CLOCK_MONOTONIC exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn image(spec: &GuestImageSpec) -> GuestImage {
    build(spec, &default_cache_dir(), |m| eprintln!("[image] {m}"))
        .unwrap_or_else(|e| panic!("building the guest image failed: {e}"))
}

/// A QEMU process whose serial console (stdio) is recorded in the host serial-log format.
/// Dropping it kills QEMU by PID and reaps it.
pub struct RunningGuest {
    pub child: Child,
    pub started_ns: u64,
    log: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl RunningGuest {
    /// Starts QEMU (TCG) on `image`; `extra` are added QEMU arguments (QMP, -incoming).
    pub fn boot(image: &GuestImage, cmdline: &str, memory_mib: u64, extra: &[OsString]) -> Self {
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
            .args(extra)
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

    pub fn log(&self) -> HostSerialLog {
        HostSerialLog::parse(&self.log.lock().map(|l| l.clone()).unwrap_or_default())
    }

    pub fn text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Polls the log until `done` holds, QEMU exits, or `timeout` passes.
    pub fn wait_for(&mut self, timeout: Duration, done: impl Fn(&HostSerialLog) -> bool) -> bool {
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

    pub fn diagnostics(&self) -> String {
        let text = self.text();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        format!(
            "--- serial log (last 30 lines) ---\n{}\n--- qemu stderr ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
        )
    }
}

impl RunningGuest {
    /// Kills QEMU and waits until its serial output is fully recorded (a trailing line
    /// without newline becomes a `P` fragment, as in `tern-qemu`'s recorder).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        self.stop();
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

/// The first and last STATUS lines' (host ns, passes, writes).
pub fn status_points(log: &HostSerialLog) -> Vec<(u64, u64, u64, u64)> {
    log.lines
        .iter()
        .filter_map(|l| match parse_guest_line(&l.text) {
            GuestLine::Status(s) => Some((l.mono_ns, s.passes, s.writes, s.wps)),
            _ => None,
        })
        .collect()
}

/// A throwaway network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn add(name: String) -> Netns {
        let st = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "ip netns add {name} failed (root needed)"
        );
        Netns(name)
    }

    pub fn ip_ok(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "ip -n {} {args:?} failed",
            self.0
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn net_lines(log: &HostSerialLog) -> (bool, u64) {
    let mut ready = false;
    let mut rx = 0;
    for l in &log.lines {
        match parse_guest_line(&l.text) {
            GuestLine::NetReady { port: 7777 } => ready = true,
            GuestLine::NetStatus { rx: n, .. } => rx = n,
            _ => {}
        }
    }
    (ready, rx)
}

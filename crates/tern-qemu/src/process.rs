//! A supervised QEMU process.
//!
//! [`VmProcess`] owns one QEMU child: it starts it (optionally inside a lab host's network
//! namespace), records its serial console, and kills it by PID when dropped — on every path,
//! panics included — unless it was explicitly [`detach`](VmProcess::detach)ed (an agent
//! handing its guests over to its own restarted self must not take them down).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::QemuError;
use crate::binary::QemuBinary;
use crate::serial::SerialRecorder;
use crate::spec::{LaunchMode, VmSockets, VmSpec};
use crate::tls::MigrationTls;

/// How long QEMU may take to create its QMP socket before the start counts as failed.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to start a QEMU process.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    /// The guest to start.
    pub spec: VmSpec,
    /// Boot, or wait for an incoming migration.
    pub mode: LaunchMode,
    /// Directory for the sockets, the serial log and QEMU's own stderr log; created if
    /// missing. Kept short: unix socket paths are limited to 107 bytes.
    pub runtime_dir: PathBuf,
    /// Network namespace to run QEMU in (a lab host), or `None` for the current one.
    pub netns: Option<String>,
}

/// A running QEMU process and its files.
#[derive(Debug)]
pub struct VmProcess {
    child: Option<Child>,
    pid: u32,
    runtime_dir: PathBuf,
    sockets: VmSockets,
    serial_log: PathBuf,
    stderr_log: PathBuf,
    recorder: Option<SerialRecorder>,
    /// Re-attached by PID: not our child, so it is signalled and watched through `/proc`.
    adopted: bool,
}

impl VmProcess {
    /// Starts QEMU and waits until its QMP socket exists.
    ///
    /// If QEMU exits during start-up, the error carries the end of its stderr (QEMU explains
    /// bad arguments there).
    pub fn spawn(binary: &QemuBinary, launch: &VmLaunch) -> Result<Self, QemuError> {
        Self::spawn_with_tls(binary, launch, None)
    }

    /// [`VmProcess::spawn`] with the migration TLS objects of [`MigrationTls`] (the client
    /// credentials always; in [`LaunchMode::Incoming`] also the server credentials and the
    /// `authz-simple` object pinning the one source host).
    pub fn spawn_with_tls(
        binary: &QemuBinary,
        launch: &VmLaunch,
        tls: Option<&MigrationTls>,
    ) -> Result<Self, QemuError> {
        launch.spec.validate()?;
        // 0700: sockets, console log and QEMU's stderr are the guest's business only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&launch.runtime_dir)
            .map_err(|e| QemuError::Io {
                context: format!("creating {}", launch.runtime_dir.display()),
                source: e,
            })?;
        let sockets = VmSockets::in_dir(&launch.runtime_dir);
        VmSpec::check_socket_paths(&sockets)?;
        for s in [&sockets.qmp, &sockets.serial] {
            let _ = std::fs::remove_file(s);
        }
        let serial_log = launch.runtime_dir.join("serial.log");
        let stderr_log = launch.runtime_dir.join("qemu.log");
        let stderr = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&stderr_log)
            .map_err(|e| QemuError::Io {
                context: format!("creating {}", stderr_log.display()),
                source: e,
            })?;
        let args = launch.spec.to_args_with_tls(&sockets, launch.mode, tls)?;
        let mut cmd = match &launch.netns {
            Some(ns) => {
                // `ip netns exec` enters the namespace and execs QEMU in place, so the PID we
                // get back is QEMU's own.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary.path);
                c
            }
            None => Command::new(&binary.path),
        };
        // Its own process group: a Ctrl-C (SIGINT to the terminal's foreground group) aimed
        // at the agent must not take the guests down with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        tracing::debug!(?args, netns = ?launch.netns, "starting QEMU");
        let child = cmd.spawn().map_err(|e| QemuError::Io {
            context: format!("starting {}", binary.path.display()),
            source: e,
        })?;
        let pid = child.id();
        let mut vm = Self {
            child: Some(child),
            pid,
            runtime_dir: launch.runtime_dir.clone(),
            sockets,
            serial_log: serial_log.clone(),
            stderr_log,
            recorder: None,
            adopted: false,
        };
        // Attach the console at once: a socket chardev with wait=off drops what nobody reads.
        vm.recorder = Some(
            SerialRecorder::start(&vm.sockets.serial, &serial_log, SOCKET_TIMEOUT).map_err(
                |e| QemuError::Io {
                    context: "starting the serial recorder".into(),
                    source: e,
                },
            )?,
        );
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !vm.sockets.qmp.exists() {
            if let Some(status) = vm.try_wait() {
                return Err(QemuError::StartFailed {
                    status: status.to_string(),
                    stderr: vm.stderr_tail(),
                });
            }
            if Instant::now() > deadline {
                return Err(QemuError::StartFailed {
                    status: "no QMP socket after 10 s".into(),
                    stderr: vm.stderr_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // QEMU creates its QMP socket (an early backend) before its tap devices (late
        // backends): wait for the taps too, so the caller can attach them to a bridge as
        // soon as this returns.
        for nic in &launch.spec.devices.nics {
            while !pid_has_interface(pid, &nic.tap) {
                if let Some(status) = vm.try_wait() {
                    return Err(QemuError::StartFailed {
                        status: status.to_string(),
                        stderr: vm.stderr_tail(),
                    });
                }
                if Instant::now() > deadline {
                    return Err(QemuError::StartFailed {
                        status: format!("tap {} not created after 10 s", nic.tap),
                        stderr: vm.stderr_tail(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(vm)
    }

    /// Re-attaches to a QEMU started earlier (by a previous incarnation of the agent) from its
    /// PID and runtime directory, and restarts the serial recorder (appending to the log).
    ///
    /// An agent restart must not take its guests down (KubeVirt's virt-handler and Nova's
    /// nova-compute both leave running domains alone when they restart); the successor finds
    /// them again here. The process is not our child: liveness is read from `/proc/<pid>` and
    /// it is killed with `kill(2)`. Refuses a PID that is gone, a zombie, or whose command line
    /// does not name this runtime directory's QMP socket (the PID was reused).
    pub fn adopt(pid: u32, runtime_dir: &Path) -> Result<Self, QemuError> {
        let sockets = VmSockets::in_dir(runtime_dir);
        if !pid_alive(pid) {
            return Err(QemuError::StartFailed {
                status: format!("QEMU PID {pid} is no longer running"),
                stderr: String::new(),
            });
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let qmp = sockets.qmp.display().to_string();
        if !cmdline.contains(&qmp) {
            return Err(QemuError::StartFailed {
                status: format!(
                    "PID {pid} is not the QEMU of {} (its command line does not name {qmp})",
                    runtime_dir.display()
                ),
                stderr: String::new(),
            });
        }
        let serial_log = runtime_dir.join("serial.log");
        let recorder = SerialRecorder::start(&sockets.serial, &serial_log, Duration::from_secs(2))
            .map_err(|e| QemuError::Io {
                context: "restarting the serial recorder".into(),
                source: e,
            })?;
        Ok(Self {
            child: None,
            pid,
            runtime_dir: runtime_dir.to_path_buf(),
            sockets,
            serial_log,
            stderr_log: runtime_dir.join("qemu.log"),
            recorder: Some(recorder),
            adopted: true,
        })
    }

    /// Whether this process was re-attached by PID rather than started by us.
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// The process ID of QEMU.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The QMP socket path.
    pub fn qmp_socket(&self) -> &Path {
        &self.sockets.qmp
    }

    /// The timestamped serial log (format in `docs/CONVENTIONS.md`).
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// The runtime directory holding sockets and logs.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The last lines QEMU wrote to stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Returns the exit status if QEMU has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.adopted {
            // Not our child: there is no status to reap; report "exited" as a success code.
            return (!pid_alive(self.pid)).then(|| {
                use std::os::unix::process::ExitStatusExt;
                ExitStatus::from_raw(0)
            });
        }
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        if self.adopted {
            return pid_alive(self.pid);
        }
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Waits up to `timeout` for QEMU to exit by itself (after `quit`, or a completed
    /// migration's source being told to quit).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                self.finish_recording();
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU with SIGKILL and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if self.adopted {
            if pid_alive(self.pid)
                && let Ok(raw) = i32::try_from(self.pid)
            {
                // SAFETY: kill(2) with a positive PID we verified belongs to this QEMU.
                unsafe {
                    libc::kill(raw, libc::SIGKILL);
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid_alive(self.pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.adopted = false;
            self.finish_recording();
            return;
        }
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.finish_recording();
    }

    /// Stops the serial recorder, flushing a trailing fragment.
    pub fn finish_recording(&mut self) {
        if let Some(mut r) = self.recorder.take() {
            r.stop();
        }
    }

    /// Leaves QEMU running when this handle is dropped and returns its PID. Used when the
    /// owner (an agent) hands the guest over to a successor that re-attaches by PID.
    pub fn detach(mut self) -> u32 {
        self.finish_recording();
        // Dropping a std Child neither kills nor waits; the successor (or init) reaps it.
        drop(self.child.take());
        self.adopted = false;
        self.pid
    }
}

/// Whether the network namespace of process `pid` has an interface named `ifname`
/// (`/proc/<pid>/net/dev` lists the interfaces of the process's own namespace).
fn pid_has_interface(pid: u32, ifname: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/dev")).is_ok_and(|t| {
        t.lines()
            .filter_map(|l| l.split_once(':'))
            .any(|(name, _)| name.trim() == ifname)
    })
}

/// Whether `pid` runs (exists and is not a zombie), read from `/proc`.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_of_a_process_namespace_are_found_by_exact_name() {
        let me = std::process::id();
        assert!(pid_has_interface(me, "lo"));
        assert!(!pid_has_interface(me, "l"));
        assert!(!pid_has_interface(me, "no-such-if0"));
        assert!(!pid_has_interface(u32::MAX, "lo"));
    }
}

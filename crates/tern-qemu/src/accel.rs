//! Choosing KVM or TCG by probing, not assuming.
//!
//! `/dev/kvm` existing is not enough: on KVM-PVM hosts (the machines tern is developed on)
//! it opens, QEMU starts, and the guest kernel never reaches user space. The only honest test
//! is the one tern cares about: does a guest reach its first heartbeat under KVM? If not,
//! TCG runs everything (pre-copy, post-copy, recovery) ~100× slower. The verdict is cached
//! because the probe costs a boot timeout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::QemuError;
use crate::binary::QemuBinary;
use crate::process::{VmLaunch, VmProcess};
use crate::spec::{Accelerator, LaunchMode, VmSpec};

/// The outcome of an accelerator probe, as cached on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorVerdict {
    /// The accelerator to use.
    pub accelerator: Accelerator,
    /// Why, in words an operator understands.
    pub reason: String,
    /// What the verdict depends on (QEMU version and kernel); a different key re-probes.
    pub key: String,
}

/// Decides the accelerator for guests booted from `template`'s kernel and initrd.
///
/// - `$TERN_ACCEL=kvm|tcg` forces a choice (for operators who know better);
/// - a cached verdict at `cache_file` with the same key is reused;
/// - no usable `/dev/kvm` means TCG without booting anything;
/// - otherwise a KVM guest is booted and must print a line accepted by `is_ready` within
///   `timeout`.
pub fn probe_accelerator(
    binary: &QemuBinary,
    template: &VmSpec,
    runtime_dir: &Path,
    cache_file: Option<&Path>,
    timeout: Duration,
    is_ready: impl Fn(&str) -> bool,
) -> Result<AcceleratorVerdict, QemuError> {
    let key = format!(
        "qemu={} kernel={}",
        binary.version,
        template.kernel.display()
    );
    if let Ok(forced) = std::env::var("TERN_ACCEL") {
        let accelerator: Accelerator = forced.parse()?;
        return Ok(AcceleratorVerdict {
            accelerator,
            reason: format!("forced by TERN_ACCEL={forced}"),
            key,
        });
    }
    if let Some(cached) = cache_file.and_then(read_cache)
        && cached.key == key
    {
        return Ok(cached);
    }
    let verdict = if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        AcceleratorVerdict {
            accelerator: Accelerator::Tcg,
            reason: "/dev/kvm is not available: using TCG (software emulation, much slower)".into(),
            key,
        }
    } else {
        let mut spec = template.clone();
        spec.accelerator = Accelerator::Kvm;
        spec.name = "accel-probe".into();
        let launch = VmLaunch {
            spec,
            mode: LaunchMode::Boot,
            runtime_dir: runtime_dir.to_path_buf(),
            netns: None,
        };
        let ready = match VmProcess::spawn(binary, &launch) {
            Ok(mut vm) => {
                let r = wait_for_line(&mut vm, timeout, &is_ready);
                vm.kill();
                r
            }
            Err(e) => {
                tracing::info!(error = %e, "KVM guest failed to start");
                false
            }
        };
        if ready {
            AcceleratorVerdict {
                accelerator: Accelerator::Kvm,
                reason: "a KVM guest reached its workload: using KVM".into(),
                key,
            }
        } else {
            AcceleratorVerdict {
                accelerator: Accelerator::Tcg,
                reason: format!(
                    "/dev/kvm exists but a KVM guest did not reach its workload within {} s \
                     (e.g. KVM-PVM, which cannot run a guest's user space): using TCG",
                    timeout.as_secs()
                ),
                key,
            }
        }
    };
    if let Some(path) = cache_file {
        write_cache(path, &verdict);
    }
    Ok(verdict)
}

fn wait_for_line(vm: &mut VmProcess, timeout: Duration, is_ready: &impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !vm.is_running() {
            return false;
        }
        if let Ok(text) = std::fs::read_to_string(vm.serial_log())
            && text
                .lines()
                .filter_map(|l| l.splitn(3, ' ').nth(2))
                .any(is_ready)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn read_cache(path: &Path) -> Option<AcceleratorVerdict> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_cache(path: &Path, verdict: &AcceleratorVerdict) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(text) = serde_json::to_string_pretty(verdict) {
        let tmp: PathBuf = path.with_extension("tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

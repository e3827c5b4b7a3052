//! CPU time a QEMU process spends outside its vCPUs (`/proc/PID/stat` and `/proc/PID/task`).
//!
//! What a migration costs the host — the migration thread, multifd channels, TLS encryption,
//! the main loop handling the stream — is QEMU's CPU time minus its vCPU threads' (named
//! `CPU N/TCG` or `CPU N/KVM` by QEMU, `qemu_vcpu_thread_*` in `system/cpus.c`). The process
//! total includes threads that already exited (the migration thread ends with the
//! migration), so it is read from the process, the vCPUs from their threads.

use std::path::Path;

/// CPU time of one QEMU process so far, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QemuCpu {
    /// User + system time of the whole process, exited threads included.
    pub total_ms: u64,
    /// User + system time of its vCPU threads.
    pub vcpu_ms: u64,
}

impl QemuCpu {
    /// CPU outside the vCPUs between `earlier` and `self` (0 if the counters went back).
    pub fn non_vcpu_ms_since(&self, earlier: &QemuCpu) -> u64 {
        let total = self.total_ms.saturating_sub(earlier.total_ms);
        let vcpu = self.vcpu_ms.saturating_sub(earlier.vcpu_ms);
        total.saturating_sub(vcpu)
    }
}

/// `utime + stime` in clock ticks from the text of a `stat` file (fields 14 and 15; the
/// command name, field 2, may contain spaces and parentheses, so fields are counted from the
/// last `)`).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_to_ms(ticks: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    ticks * 1000 / hz
}

/// Reads the CPU time of QEMU process `pid`; `None` when it is gone or unreadable.
pub fn qemu_cpu(pid: u32) -> Option<QemuCpu> {
    let dir = Path::new("/proc").join(pid.to_string());
    let total = stat_ticks(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let mut vcpu = 0;
    for task in std::fs::read_dir(dir.join("task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            vcpu += stat_ticks(&stat).unwrap_or(0);
        }
    }
    Some(QemuCpu {
        total_ms: ticks_to_ms(total),
        vcpu_ms: ticks_to_ms(vcpu),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (CPU 0/TCG) S 1 2 3 4 5 6 7 8 9 10 250 40 0 0 20 0 4 0 100 0";
        assert_eq!(stat_ticks(stat), Some(290));
        assert_eq!(stat_ticks("garbage"), None);
        let later = QemuCpu {
            total_ms: 5000,
            vcpu_ms: 3000,
        };
        let earlier = QemuCpu {
            total_ms: 1000,
            vcpu_ms: 800,
        };
        assert_eq!(later.non_vcpu_ms_since(&earlier), 1800);
        assert_eq!(earlier.non_vcpu_ms_since(&later), 0);
    }

    #[test]
    fn this_process_has_cpu_time_and_no_vcpu() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let me = qemu_cpu(std::process::id()).expect("own /proc entry");
        assert_eq!(me.vcpu_ms, 0);
        assert!(qemu_cpu(u32::MAX).is_none());
    }
}

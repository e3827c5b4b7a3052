//! Workload parameters: what `tern-load` is asked to do, and how they reach it.
//!
//! They travel on the kernel command line because the guest has no other channel at boot
//! (no network, no disk). Their names use underscores (`tern_ws_mib`), never dots: the
//! kernel takes dotted parameters as module options and does not pass them to init.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How fast the guest dirties memory, in page writes per second.
///
/// The dirty rate is the one number that decides whether pre-copy converges, so scenarios
/// set it explicitly; `Max` is "as fast as the vCPU can", the worst case for pre-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageRate {
    /// A fixed budget of page writes per second (refilled every 10 ms in the guest).
    PerSecond(u64),
    /// No limit: the guest writes pages as fast as it can.
    Max,
}

/// Which page `tern-load` writes next.
///
/// Sequential writes sweep the working set (every page dirtied once per sweep, the
/// friendliest case for dirty tracking); random writes hit pages unevenly, like a
/// database buffer pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WritePattern {
    /// Pages 0, 1, 2, … and around again.
    Sequential,
    /// Uniformly random pages (xorshift64 in the guest).
    Random,
    /// Sequential pages at the given rate for 2 s, then no writes for 2 s, repeated: the
    /// dirty rate swings between passes, as a guest with periodic batch work does. A policy
    /// that judges convergence from one pass sees a converging guest in the idle half.
    Bursty,
}

/// A workload parameter given as text could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// The rate was neither `max` nor a positive integer.
    #[error(
        "invalid page rate {0:?}: expected `max` or a positive number of page writes per second, e.g. `1000`"
    )]
    Rate(String),
    /// The pattern was none of `seq`, `random`, `bursty`.
    #[error("invalid write pattern {0:?}: expected `seq` (or `sequential`), `random` or `bursty`")]
    Pattern(String),
}

impl FromStr for PageRate {
    type Err = ParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("max") {
            return Ok(PageRate::Max);
        }
        match t.parse::<u64>() {
            Ok(n) if n > 0 => Ok(PageRate::PerSecond(n)),
            _ => Err(ParamError::Rate(s.to_string())),
        }
    }
}

impl fmt::Display for PageRate {
    /// The form `tern-load` reads and prints in `READY`: a number, or `max`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageRate::PerSecond(n) => write!(f, "{n}"),
            PageRate::Max => f.write_str("max"),
        }
    }
}

impl FromStr for WritePattern {
    type Err = ParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "seq" | "sequential" => Ok(WritePattern::Sequential),
            "random" | "rand" => Ok(WritePattern::Random),
            "bursty" => Ok(WritePattern::Bursty),
            _ => Err(ParamError::Pattern(s.to_string())),
        }
    }
}

impl fmt::Display for WritePattern {
    /// The form `tern-load` reads and prints in `READY`: `seq`, `random` or `bursty`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WritePattern::Sequential => "seq",
            WritePattern::Random => "random",
            WritePattern::Bursty => "bursty",
        })
    }
}

/// Everything `tern-load` is told at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadParams {
    /// Working set in MiB: every page of it is touched at start and verified continuously.
    pub working_set_mib: u32,
    /// Page writes per second.
    pub rate: PageRate,
    /// Which page is written next.
    pub pattern: WritePattern,
    /// Run the continuous verifier. Off only to measure the raw dirty rate; a migration
    /// test without it checks control state and heartbeats, not data pages.
    pub verify: bool,
}

impl Default for WorkloadParams {
    /// The defaults `tern-load` itself uses when a parameter is absent.
    fn default() -> Self {
        Self {
            working_set_mib: 64,
            rate: PageRate::Max,
            pattern: WritePattern::Sequential,
            verify: true,
        }
    }
}

impl WorkloadParams {
    /// The kernel command-line parameters that carry these settings to `tern-load`.
    pub fn kernel_args(&self) -> String {
        format!(
            "tern_ws_mib={} tern_rate={} tern_pattern={} tern_verify={}",
            self.working_set_mib,
            self.rate,
            self.pattern,
            u8::from(self.verify)
        )
    }

    /// Guest memory (MiB) that comfortably holds the working set: the set itself, its
    /// shadow generations (8 bytes per 4 KiB page), and 160 MiB for the kernel (Debian's
    /// reserves ~57 MiB for its image and early allocations), the unpacked initramfs,
    /// slab and page tables. Measured: a 512 MiB working set is OOM-killed at `-m 609`
    /// and runs at `-m 640`; 160 MiB keeps a margin over that.
    pub fn recommended_memory_mib(&self) -> u64 {
        let ws = u64::from(self.working_set_mib);
        ws + ws.div_ceil(512) + 160
    }
}

/// The data-disk workload of `tern-load` (`tern_disk=…`): generation-stamped 4 KiB blocks
/// written at `rate` and verified continuously, the disk counterpart of the page workload.
/// Kept apart from [`WorkloadParams`] so diskless guests are described as before; its
/// [`kernel_args`](Self::kernel_args) are appended to the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWorkload {
    /// The guest block device, e.g. `/dev/vda` (the first virtio-blk disk).
    pub device: String,
    /// Block writes per second.
    pub rate: PageRate,
    /// Block reads per second by the verifier: a full pass takes `blocks / verify_rate`
    /// seconds.
    pub verify_rate: u64,
}

impl DiskWorkload {
    /// The first virtio-blk disk, 100 block writes/s, 1000 verifying reads/s.
    pub fn on(device: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            rate: PageRate::PerSecond(100),
            verify_rate: 1000,
        }
    }

    /// Checks the device path and the verify rate, naming the bad value.
    pub fn validate(&self) -> Result<(), String> {
        let d = &self.device;
        if !d.starts_with("/dev/") || d.len() <= 5 || d.chars().any(|c| c.is_whitespace()) {
            return Err(format!(
                "disk device {d:?} is invalid: expected a guest block device such as /dev/vda"
            ));
        }
        if self.verify_rate == 0 {
            return Err(
                "disk verify rate 0 is invalid: use at least 1 block read per second".into(),
            );
        }
        Ok(())
    }

    /// `tern_disk=… tern_disk_rate=… tern_disk_verify_rate=…`.
    pub fn kernel_args(&self) -> String {
        format!(
            "tern_disk={} tern_disk_rate={} tern_disk_verify_rate={}",
            self.device, self.rate, self.verify_rate
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_parses_max_and_numbers() {
        assert_eq!("max".parse::<PageRate>(), Ok(PageRate::Max));
        assert_eq!("MAX".parse::<PageRate>(), Ok(PageRate::Max));
        assert_eq!("1000".parse::<PageRate>(), Ok(PageRate::PerSecond(1000)));
        assert_eq!(" 7 ".parse::<PageRate>(), Ok(PageRate::PerSecond(7)));
    }

    #[test]
    fn rate_rejects_zero_negative_and_words_naming_the_value() {
        for bad in ["0", "-5", "fast", "", "1.5"] {
            let err = bad.parse::<PageRate>().unwrap_err();
            assert_eq!(err, ParamError::Rate(bad.to_string()));
            assert!(err.to_string().contains("max"), "{err}");
        }
    }

    #[test]
    fn pattern_parses_and_rejects() {
        assert_eq!("seq".parse(), Ok(WritePattern::Sequential));
        assert_eq!("sequential".parse(), Ok(WritePattern::Sequential));
        assert_eq!("random".parse(), Ok(WritePattern::Random));
        let err = "zigzag".parse::<WritePattern>().unwrap_err();
        assert!(err.to_string().contains("\"zigzag\""), "{err}");
        assert!(err.to_string().contains("random"), "{err}");
    }

    #[test]
    fn display_round_trips() {
        for r in [PageRate::Max, PageRate::PerSecond(12345)] {
            assert_eq!(r.to_string().parse::<PageRate>(), Ok(r));
        }
        for p in [
            WritePattern::Sequential,
            WritePattern::Random,
            WritePattern::Bursty,
        ] {
            assert_eq!(p.to_string().parse::<WritePattern>(), Ok(p));
        }
    }

    #[test]
    fn kernel_args_use_underscores_only() {
        let p = WorkloadParams {
            working_set_mib: 16,
            rate: PageRate::PerSecond(5000),
            pattern: WritePattern::Random,
            verify: false,
        };
        let args = p.kernel_args();
        assert_eq!(
            args,
            "tern_ws_mib=16 tern_rate=5000 tern_pattern=random tern_verify=0"
        );
        assert!(!args.contains('.'));
    }

    #[test]
    fn disk_workload_args_and_validation() {
        let d = DiskWorkload::on("/dev/vda");
        assert!(d.validate().is_ok());
        assert_eq!(
            d.kernel_args(),
            "tern_disk=/dev/vda tern_disk_rate=100 tern_disk_verify_rate=1000"
        );
        let e = DiskWorkload::on("vda").validate().unwrap_err();
        assert!(e.contains("\"vda\"") && e.contains("/dev/vda"), "{e}");
        let mut d = DiskWorkload::on("/dev/vdb");
        d.verify_rate = 0;
        assert!(d.validate().unwrap_err().contains("verify rate 0"));
    }

    #[test]
    fn recommended_memory_grows_with_working_set() {
        let small = WorkloadParams {
            working_set_mib: 16,
            ..Default::default()
        };
        let big = WorkloadParams {
            working_set_mib: 512,
            ..Default::default()
        };
        assert!(small.recommended_memory_mib() >= 16 + 160);
        // 640 MiB was measured to be the least that runs a 512 MiB working set.
        assert!(big.recommended_memory_mib() >= 640);
        assert_eq!(big.recommended_memory_mib(), 512 + 1 + 160);
    }
}

//! Output formats and the `check` command.

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::Failure;

/// How a read command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// `-o text|json`, shared by every read command.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Prints a value as pretty JSON.
pub fn print_json(v: &impl Serialize) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Fails with exit code 3 unless running as root.
pub fn require_root(what: &str) -> Result<(), Failure> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::environment(anyhow::anyhow!(
            "{what} needs root (network namespaces, tc, QEMU in lab hosts): run it as root"
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct CheckReport {
    qemu_path: String,
    qemu_version: String,
    root: bool,
    kvm_device: bool,
    netem_available: bool,
}

/// `tern check`: is this machine ready?
pub fn check(o: OutputArgs) -> Result<(), Failure> {
    let qemu = tern_qemu::QemuBinary::locate().map_err(Failure::environment)?;
    // SAFETY: as above.
    let root = unsafe { libc::geteuid() } == 0;
    let report = CheckReport {
        qemu_path: qemu.path.display().to_string(),
        qemu_version: qemu.version.to_string(),
        root,
        kvm_device: std::path::Path::new("/dev/kvm").exists(),
        netem_available: root && tern_lab::netem_available(),
    };
    match o.output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => {
            println!("QEMU        {} ({})", report.qemu_version, report.qemu_path);
            println!(
                "root        {}",
                if root {
                    "yes"
                } else {
                    "no (lab and demo need root)"
                }
            );
            println!(
                "/dev/kvm    {}",
                if report.kvm_device {
                    "present (whether it runs guests is probed by `tern demo`)"
                } else {
                    "absent: guests run under TCG"
                }
            );
            println!(
                "netem       {}",
                if report.netem_available {
                    "available (link delay can be emulated)"
                } else {
                    "not available (no link delay emulation; rate limits and cuts still work)"
                }
            );
        }
    }
    Ok(())
}

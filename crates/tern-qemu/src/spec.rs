//! The typed description of a VM and its translation to a QEMU command line.
//!
//! A [`VmSpec`] is the only input needed to start a guest, on the source or, with
//! [`LaunchMode::Incoming`], as the receiving end of a migration. Both ends of a migration
//! must be started from the *same* spec: QEMU's migration stream carries device state, not
//! the device model, so memory size, vCPU count, machine type and devices must match exactly
//! (QEMU fails the incoming side with "Unknown ramblock" or a section mismatch otherwise).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::QemuError;
use crate::devices::VmDevices;

/// Which accelerator runs the guest's vCPUs.
///
/// tern prefers KVM and falls back to TCG where KVM cannot run a guest's user space (the
/// KVM-PVM hosts tern is developed on, see `platform.md`): the choice is made by probing,
/// never by assuming (see [`crate::accel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's Tiny Code Generator: full emulation, slow but runs everywhere.
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

impl FromStr for Accelerator {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Accelerator::Kvm),
            "tcg" => Ok(Accelerator::Tcg),
            other => Err(QemuError::InvalidSpec(format!(
                "unknown accelerator {other:?}: valid values are \"kvm\" and \"tcg\""
            ))),
        }
    }
}

/// Whether the VM's owner allows post-copy for it.
///
/// The seed design: "admins may want to ensure post-copy is not used for some VMs" (e.g. a
/// VM whose loss on a network failure is worse than a long pre-copy). tern never exposes
/// post-copy as a user-level switch; this is the admin's veto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PostCopyPermission {
    /// tern may switch to post-copy when its policy decides so.
    #[default]
    Allowed,
    /// tern never switches this VM to post-copy.
    Forbidden,
}

impl FromStr for PostCopyPermission {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allowed" => Ok(Self::Allowed),
            "forbidden" => Ok(Self::Forbidden),
            other => Err(QemuError::InvalidSpec(format!(
                "unknown post-copy setting {other:?}: valid values are \"allowed\" and \"forbidden\""
            ))),
        }
    }
}

impl fmt::Display for PostCopyPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allowed => "allowed",
            Self::Forbidden => "forbidden",
        })
    }
}

/// Per-VM migration settings an admin attaches to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrationSettings {
    /// The admin's post-copy veto for this VM.
    #[serde(default)]
    pub post_copy: PostCopyPermission,
    /// Longest blackout the VM tolerates, in milliseconds; `None` means the SLA class decides.
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Name of the SLA class (defined in the SLA catalog) the VM belongs to.
    #[serde(default = "default_sla_class")]
    pub sla_class: String,
}

fn default_sla_class() -> String {
    "standard".to_string()
}

impl Default for VmMigrationSettings {
    fn default() -> Self {
        Self {
            post_copy: PostCopyPermission::Allowed,
            max_downtime_ms: None,
            sla_class: default_sla_class(),
        }
    }
}

/// Everything needed to start one guest. Unknown fields are refused (a misspelt setting
/// must not silently fall back to its default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Operator-facing name; lowercase letters, digits and '-' (it becomes part of paths).
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Kernel image booted directly with `-kernel`.
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    /// Initramfs passed with `-initrd`.
    #[schema(value_type = String)]
    pub initrd: PathBuf,
    /// Kernel command line (`-append`).
    pub cmdline: String,
    /// Accelerator; both ends of a migration must use the same one.
    pub accelerator: Accelerator,
    /// Admin settings that constrain how tern may migrate this VM.
    #[serde(default)]
    pub migration: VmMigrationSettings,
    /// Disks, NICs and the boot source (none, none, the kernel above by default).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub devices: VmDevices,
}

/// How QEMU is started from a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchMode {
    /// Boot the guest.
    Boot,
    /// Start paused, waiting for an incoming migration stream. QEMU is started with
    /// `-incoming defer` so that capabilities can be set over QMP *before* `migrate-incoming`
    /// (QEMU requires `postcopy-ram` etc. on both sides before the stream starts).
    Incoming,
}

/// Paths of the control sockets of one QEMU process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSockets {
    /// QMP control socket.
    pub qmp: PathBuf,
    /// The guest's first serial port (ttyS0), as a unix socket tern reads and timestamps.
    pub serial: PathBuf,
}

impl VmSockets {
    /// The conventional socket paths inside a VM's runtime directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            qmp: dir.join("qmp.sock"),
            serial: dir.join("serial.sock"),
        }
    }
}

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes including the NUL).
const MAX_UNIX_PATH: usize = 107;

impl VmSpec {
    /// Checks the spec for values QEMU would reject or that would make a migration fail
    /// later, naming the bad value and what would be valid.
    pub fn validate(&self) -> Result<(), QemuError> {
        if self.name.is_empty()
            || self.name.len() > 40
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(QemuError::InvalidSpec(format!(
                "VM name {:?} is invalid: use 1-40 characters from a-z, 0-9 and '-'",
                self.name
            )));
        }
        if self.memory_mib == 0 {
            return Err(QemuError::InvalidSpec(
                "memory 0 MiB is invalid: a guest needs at least 64 MiB".to_string(),
            ));
        }
        if self.memory_mib < 64 {
            return Err(QemuError::InvalidSpec(format!(
                "memory {} MiB is too small: a guest needs at least 64 MiB",
                self.memory_mib
            )));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(QemuError::InvalidSpec(format!(
                "{} vCPUs is invalid: use 1 to 64",
                self.vcpus
            )));
        }
        let kernel_files: &[(&str, &PathBuf)] = if self.devices.boots_kernel() {
            &[("kernel", &self.kernel), ("initrd", &self.initrd)]
        } else {
            &[]
        };
        for (what, path) in kernel_files {
            if !path.is_file() {
                return Err(QemuError::InvalidSpec(format!(
                    "{what} {} does not exist: build the guest image with `tern guest build`",
                    path.display()
                )));
            }
        }
        if self.cmdline.contains('\n') {
            return Err(QemuError::InvalidSpec(
                "kernel command line must be a single line".to_string(),
            ));
        }
        self.devices.validate(&self.name)
    }

    /// The QEMU arguments (without the program name) for this spec.
    ///
    /// Deliberate choices:
    /// - `-nodefaults -no-user-config`: no implicit NIC, VGA or floppy that would have to
    ///   match on the destination and that nothing uses;
    /// - the serial port is a unix socket server (`wait=off`) so that a reader can attach,
    ///   detach and re-attach (an agent restart must not kill the guest's console);
    /// - the machine type is pinned (`pc-q35-9.0`, the oldest tern supports) so that two QEMU
    ///   versions on two hosts still produce a compatible migration stream.
    pub fn to_args(&self, sockets: &VmSockets, mode: LaunchMode) -> Vec<String> {
        let mut args = vec![
            "-name".to_string(),
            format!("{},process=tern-{}", self.name, self.name),
            "-machine".to_string(),
            "pc-q35-9.0".to_string(),
            "-accel".to_string(),
            self.accelerator.to_string(),
            "-m".to_string(),
            format!("{}M", self.memory_mib),
            "-smp".to_string(),
            self.vcpus.to_string(),
            "-nodefaults".to_string(),
            "-no-user-config".to_string(),
            "-display".to_string(),
            "none".to_string(),
        ];
        if self.devices.boots_kernel() {
            args.extend([
                "-kernel".to_string(),
                self.kernel.display().to_string(),
                "-initrd".to_string(),
                self.initrd.display().to_string(),
                "-append".to_string(),
                self.cmdline.clone(),
            ]);
        }
        args.extend([
            "-chardev".to_string(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off",
                sockets.serial.display()
            ),
            "-serial".to_string(),
            "chardev:serial0".to_string(),
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", sockets.qmp.display()),
        ]);
        args.extend(self.devices.to_args(&self.name));
        if mode == LaunchMode::Incoming {
            args.push("-incoming".to_string());
            args.push("defer".to_string());
        }
        args
    }

    /// Checks that socket paths fit the kernel's limit for unix socket addresses.
    pub fn check_socket_paths(sockets: &VmSockets) -> Result<(), QemuError> {
        for p in [&sockets.qmp, &sockets.serial] {
            if p.as_os_str().len() > MAX_UNIX_PATH {
                return Err(QemuError::InvalidSpec(format!(
                    "socket path {} is longer than {MAX_UNIX_PATH} bytes: use a shorter runtime directory",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        VmSpec {
            name: "vm-1".into(),
            memory_mib: 256,
            vcpus: 1,
            kernel,
            initrd,
            cmdline: "console=ttyS0 tern_ws_mib=16".into(),
            accelerator: Accelerator::Tcg,
            migration: VmMigrationSettings::default(),
            devices: VmDevices::default(),
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn boot_args_carry_every_spec_field() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let socks = VmSockets::in_dir(Path::new("/run/x"));
        let args = s.to_args(&socks, LaunchMode::Boot);
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert_eq!(value_after(&args, "-smp"), ["1"]);
        assert_eq!(value_after(&args, "-accel"), ["tcg"]);
        assert_eq!(
            value_after(&args, "-append"),
            ["console=ttyS0 tern_ws_mib=16"]
        );
        assert_eq!(
            value_after(&args, "-qmp"),
            ["unix:/run/x/qmp.sock,server=on,wait=off"]
        );
        assert!(value_after(&args, "-chardev")[0].contains("path=/run/x/serial.sock"));
        assert!(!args.iter().any(|a| a == "-incoming"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
    }

    #[test]
    fn incoming_args_defer_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let socks = VmSockets::in_dir(Path::new("/run/x"));
        let boot = s.to_args(&socks, LaunchMode::Boot);
        let inc = s.to_args(&socks, LaunchMode::Incoming);
        assert_eq!(value_after(&inc, "-incoming"), ["defer"]);
        // Everything else is identical: both ends must describe the same machine.
        assert_eq!(&inc[..boot.len()], &boot[..]);
    }

    #[test]
    fn kvm_spec_selects_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.accelerator = Accelerator::Kvm;
        let args = s.to_args(&VmSockets::in_dir(dir.path()), LaunchMode::Boot);
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
    }

    #[test]
    fn validation_names_the_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.memory_mib = 0;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("memory 0 MiB"), "{e}");

        let mut s = spec(dir.path());
        s.name = "Bad Name".into();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("\"Bad Name\""), "{e}");

        let mut s = spec(dir.path());
        s.kernel = dir.path().join("missing-kernel");
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("missing-kernel") && e.contains("tern guest build"),
            "{e}"
        );

        let mut s = spec(dir.path());
        s.vcpus = 0;
        assert!(s.validate().unwrap_err().to_string().contains("0 vCPUs"));

        assert!(spec(dir.path()).validate().is_ok());
    }

    #[test]
    fn parses_settings_with_clear_errors() {
        assert_eq!("kvm".parse::<Accelerator>().unwrap(), Accelerator::Kvm);
        let e = "xen".parse::<Accelerator>().unwrap_err().to_string();
        assert!(e.contains("\"xen\"") && e.contains("tcg"), "{e}");
        assert_eq!(
            "forbidden".parse::<PostCopyPermission>().unwrap(),
            PostCopyPermission::Forbidden
        );
        assert!(
            "maybe"
                .parse::<PostCopyPermission>()
                .unwrap_err()
                .to_string()
                .contains("allowed")
        );
    }

    #[test]
    fn disks_and_nics_follow_the_sockets_and_disk_boot_drops_the_kernel() {
        use crate::devices::BootSource;
        use crate::disk::{DiskFormat, DiskSpec};
        use crate::net::{MacAddress, NicSpec};
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.raw");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let mut s = spec(dir.path());
        s.devices
            .disks
            .push(DiskSpec::new("root", &img, DiskFormat::Raw));
        s.devices.nics.push(NicSpec::on_tap("tap-vm1"));
        s.validate().unwrap();
        let socks = VmSockets::in_dir(Path::new("/run/x"));
        let args = s.to_args(&socks, LaunchMode::Boot);
        assert_eq!(value_after(&args, "-blockdev").len(), 2);
        assert_eq!(
            value_after(&args, "-netdev"),
            ["tap,id=net0,ifname=tap-vm1,script=no,downscript=no"]
        );
        let mac = MacAddress::for_vm("vm-1", 0).to_string();
        assert!(value_after(&args, "-device")[1].contains(&mac));
        assert_eq!(value_after(&args, "-kernel").len(), 1);

        s.devices.boot = BootSource::Disk {
            disk: "root".into(),
        };
        s.kernel = dir.path().join("no-kernel");
        s.validate().unwrap();
        let args = s.to_args(&socks, LaunchMode::Boot);
        assert!(value_after(&args, "-kernel").is_empty());
        assert!(value_after(&args, "-append").is_empty());
        assert!(value_after(&args, "-device")[0].ends_with("bootindex=1"));
        let inc = s.to_args(&socks, LaunchMode::Incoming);
        assert_eq!(&inc[..args.len()], &args[..]);

        s.devices.disks[0].path = dir.path().join("missing.raw");
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("missing.raw") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn spec_without_devices_deserializes_to_kernel_boot() {
        let json = r#"{"name":"a","memory_mib":64,"vcpus":1,"kernel":"/k","initrd":"/i",
            "cmdline":"","accelerator":"tcg"}"#;
        let s: VmSpec = serde_json::from_str(json).unwrap();
        assert!(s.devices.disks.is_empty() && s.devices.boots_kernel());
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(120)));
        let e = VmSpec::check_socket_paths(&VmSockets::in_dir(&long)).unwrap_err();
        assert!(e.to_string().contains("longer than"));
    }
}

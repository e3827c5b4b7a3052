//! The devices of a VM beyond CPU and memory: disks, NICs and what it boots from.
//!
//! Kept apart from [`crate::spec`] so that a VM description without devices (every VM tern
//! ran before disks existed) deserializes unchanged: [`VmDevices`] defaults to "no disks,
//! no NICs, boot the spec's kernel + initramfs".

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::QemuError;
use crate::disk::DiskSpec;
use crate::net::NicSpec;

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "from")]
pub enum BootSource {
    /// The spec's `kernel`, `initrd` and `cmdline` (`-kernel`/`-initrd`/`-append`): no
    /// firmware boot, fast under TCG.
    #[default]
    Kernel,
    /// The firmware (SeaBIOS) boots the disk with this id (`bootindex=1`); the spec's
    /// kernel fields are ignored.
    Disk {
        /// The [`DiskSpec::id`] to boot.
        disk: String,
    },
}

/// Disks, NICs and the boot source of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmDevices {
    /// Disks, in guest order (`/dev/vda`, `/dev/vdb`, … in a Linux guest).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs, in guest order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// What the guest boots.
    #[serde(default)]
    pub boot: BootSource,
}

impl VmDevices {
    /// Whether the guest boots the spec's kernel (and so needs it to exist).
    pub fn boots_kernel(&self) -> bool {
        self.boot == BootSource::Kernel
    }

    /// The images the guest may write: a host must refuse a second VM that would open one
    /// of them read-write too (QEMU's image locking refuses it on one host, but not across
    /// hosts on shared storage).
    pub fn writable_images(&self) -> impl Iterator<Item = &std::path::Path> {
        self.disks
            .iter()
            .filter(|d| d.writable)
            .map(|d| d.path.as_path())
    }

    /// The disk with this id.
    pub fn disk(&self, id: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// Checks every disk and NIC, unique ids/taps/MACs, and that a boot disk exists.
    pub fn validate(&self, vm_name: &str) -> Result<(), QemuError> {
        let mut ids = BTreeSet::new();
        let mut paths = BTreeSet::new();
        for d in &self.disks {
            d.validate()?;
            if !ids.insert(d.id.as_str()) {
                return Err(QemuError::InvalidSpec(format!(
                    "disk id {:?} is used twice: every disk of a VM needs its own id",
                    d.id
                )));
            }
            if d.writable && !paths.insert(d.path.clone()) {
                return Err(QemuError::InvalidSpec(format!(
                    "image {} is attached twice read-write: QEMU would corrupt it \
                     (attach it once, or read-only)",
                    d.path.display()
                )));
            }
        }
        let mut taps = BTreeSet::new();
        let mut macs = BTreeSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            n.validate()?;
            if !taps.insert(n.tap.as_str()) {
                return Err(QemuError::InvalidSpec(format!(
                    "tap {:?} is used by two NICs: each NIC needs its own tap",
                    n.tap
                )));
            }
            let mac = n.mac_for(vm_name, i as u32);
            if !macs.insert(mac.0) {
                return Err(QemuError::InvalidSpec(format!(
                    "MAC address {mac} is used by two NICs of VM {vm_name:?}"
                )));
            }
        }
        if let BootSource::Disk { disk } = &self.boot
            && self.disk(disk).is_none()
        {
            let known: Vec<&str> = self.disks.iter().map(|d| d.id.as_str()).collect();
            return Err(QemuError::InvalidSpec(format!(
                "boot disk {disk:?} is not one of the VM's disks (disks: {known:?})"
            )));
        }
        Ok(())
    }

    /// The `-blockdev`, `-netdev` and `-device` arguments, in a fixed order: both ends of a
    /// migration must create devices in the same order so PCI slots match.
    pub fn to_args(&self, vm_name: &str) -> Vec<String> {
        let mut args = Vec::new();
        for d in &self.disks {
            for node in d.blockdev_json() {
                args.push("-blockdev".to_string());
                args.push(node);
            }
            let boot = match &self.boot {
                BootSource::Disk { disk } if *disk == d.id => Some(1),
                _ => None,
            };
            args.push("-device".to_string());
            args.push(d.device_arg(boot));
        }
        for (i, n) in self.nics.iter().enumerate() {
            let [netdev, device] = n.args(vm_name, i as u32);
            args.extend(["-netdev".to_string(), netdev, "-device".to_string(), device]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskFormat;

    fn raw(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        p
    }

    #[test]
    fn duplicate_ids_taps_and_writers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = raw(dir.path(), "a.raw");
        let b = raw(dir.path(), "b.raw");
        let mut dev = VmDevices {
            disks: vec![
                DiskSpec::new("a", &a, DiskFormat::Raw),
                DiskSpec::new("a", &b, DiskFormat::Raw),
            ],
            ..Default::default()
        };
        assert!(
            dev.validate("vm")
                .unwrap_err()
                .to_string()
                .contains("\"a\" is used twice")
        );
        dev.disks[1].id = "b".into();
        dev.disks[1].path = a.clone();
        let e = dev.validate("vm").unwrap_err().to_string();
        assert!(e.contains("attached twice read-write"), "{e}");
        dev.disks[1].writable = false;
        assert!(dev.validate("vm").is_ok());
        assert_eq!(dev.writable_images().collect::<Vec<_>>(), [a.as_path()]);

        dev.nics = vec![NicSpec::on_tap("t0"), NicSpec::on_tap("t0")];
        assert!(
            dev.validate("vm")
                .unwrap_err()
                .to_string()
                .contains("\"t0\"")
        );
        dev.nics[1].tap = "t1".into();
        assert!(dev.validate("vm").is_ok());

        dev.boot = BootSource::Disk { disk: "c".into() };
        let e = dev.validate("vm").unwrap_err().to_string();
        assert!(e.contains("\"c\"") && e.contains("\"a\""), "{e}");
    }

    #[test]
    fn args_list_disks_then_nics_with_boot_index_on_the_boot_disk() {
        let dev = VmDevices {
            disks: vec![
                DiskSpec::new("root", "/i/r.qcow2", DiskFormat::Qcow2),
                DiskSpec::new("data", "/i/d.raw", DiskFormat::Raw),
            ],
            nics: vec![NicSpec::on_tap("tap-x")],
            boot: BootSource::Disk {
                disk: "root".into(),
            },
        };
        let args = dev.to_args("x");
        let flags: Vec<&str> = args.iter().step_by(2).map(String::as_str).collect();
        assert_eq!(
            flags,
            [
                "-blockdev",
                "-blockdev",
                "-device",
                "-blockdev",
                "-blockdev",
                "-device",
                "-netdev",
                "-device"
            ]
        );
        assert!(args[5].contains("drive=tern-root") && args[5].ends_with("bootindex=1"));
        assert!(!args[11].contains("bootindex"));
        assert!(args[15].starts_with("virtio-net-pci"));
    }
}

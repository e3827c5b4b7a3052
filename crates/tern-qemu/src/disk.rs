//! Disk images of a VM: typed description → `-blockdev` nodes + `virtio-blk-pci` devices.
//!
//! Why `-blockdev` and not `-drive`: storage migration addresses block nodes by name
//! (`blockdev-mirror device=<node>`, `block-export-add node-name=<node>`), and only
//! `-blockdev` gives every layer a name tern chooses. libvirt switched to the same scheme
//! for the same reason (`qemuBuildDiskSourceCommandLine` in `src/qemu/qemu_command.c`,
//! "blockdev" capability since QEMU 4.2). Each disk is two nodes:
//!
//! - `tern-<id>-file`: the protocol node (`driver=file`, the host file);
//! - `tern-<id>`: the format node (`raw` or `qcow2`) on top of it, which the guest device
//!   uses and which a mirror copies. [`DiskSpec::node_name`] is the name to address.
//!
//! The options are passed as JSON (`-blockdev {"driver":…}`), QEMU's own structured form,
//! so a path with a comma needs no keyval escaping.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::QemuError;

/// Image format of a disk (the format node's `driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain image: byte `n` of the file is byte `n` of the disk.
    Raw,
    /// QEMU's copy-on-write format (sparse, snapshots, backing files).
    Qcow2,
}

impl DiskFormat {
    /// QEMU's driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskFormat {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(QemuError::InvalidSpec(format!(
                "unknown disk format {other:?}: valid values are \"raw\" and \"qcow2\""
            ))),
        }
    }
}

/// Host page-cache behaviour of a disk, as QEMU's `-drive cache=` shorthands.
///
/// `-blockdev` has no `cache=` shorthand; each mode is the pair (`cache.direct`,
/// `cache.no-flush`) on the nodes plus the device's `write-cache`. The table is QEMU's
/// (`qemu-options.hx`, "cache" under `-drive`) and libvirt's
/// (`qemuDomainDiskCachemodeFlags` in `src/qemu/qemu_domain.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Host page cache, guest sees a volatile write cache and must flush. QEMU's default;
    /// works on every file system (tmpfs has no `O_DIRECT`).
    #[default]
    Writeback,
    /// `O_DIRECT`, guest-visible write cache: what production hosts use (no double caching,
    /// and a migration never reads stale host-cache data on shared storage).
    None,
    /// Host page cache, every write reaches the file before it completes.
    Writethrough,
    /// `O_DIRECT` and every write completes only once stable.
    Directsync,
    /// Flushes ignored: fastest, loses data on a host crash. Tests only.
    Unsafe,
}

impl CacheMode {
    /// The name used in `-drive cache=` and in tern's configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// `(cache.direct, cache.no-flush, device write-cache)`.
    fn flags(self) -> (bool, bool, bool) {
        match self {
            CacheMode::Writeback => (false, false, true),
            CacheMode::None => (true, false, true),
            CacheMode::Writethrough => (false, false, false),
            CacheMode::Directsync => (true, false, false),
            CacheMode::Unsafe => (false, true, true),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheMode {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            "writethrough" => Ok(CacheMode::Writethrough),
            "directsync" => Ok(CacheMode::Directsync),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(QemuError::InvalidSpec(format!(
                "unknown cache mode {other:?}: valid values are \"writeback\", \"none\", \
                 \"writethrough\", \"directsync\" and \"unsafe\""
            ))),
        }
    }
}

fn default_true() -> bool {
    true
}

/// One disk image attached to the guest as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Short identifier, unique within the VM (`data`, `root`, …): lowercase letters,
    /// digits and '-', at most 20 characters. Node and device names derive from it, and it
    /// must be the same on both ends of a migration (QEMU matches device state by id).
    pub id: String,
    /// The image file on the host.
    pub path: PathBuf,
    /// Its format; must match the file (QEMU opens a qcow2 file as `raw` without complaint
    /// and the guest then sees qcow2 metadata as data).
    pub format: DiskFormat,
    /// Host cache mode.
    #[serde(default)]
    pub cache: CacheMode,
    /// Whether the guest may write. A read-only image may be shared by several VMs.
    #[serde(default = "default_true")]
    pub writable: bool,
    /// Serial number shown to the guest (`/sys/block/vdX/serial`), so the guest can find a
    /// disk by name rather than by probe order. Defaults to the id.
    #[serde(default)]
    pub serial: Option<String>,
}

impl DiskSpec {
    /// A writable disk with the default cache mode.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        Self {
            id: id.into(),
            path: path.into(),
            format,
            cache: CacheMode::default(),
            writable: true,
            serial: None,
        }
    }

    /// The format node's name: what `blockdev-mirror device=`, `block-export-add
    /// node-name=` and `query-block-jobs` refer to.
    pub fn node_name(&self) -> String {
        format!("tern-{}", self.id)
    }

    /// The protocol (file) node's name.
    pub fn file_node_name(&self) -> String {
        format!("tern-{}-file", self.id)
    }

    /// The guest device's QOM id (`/machine/peripheral/<id>`).
    pub fn device_id(&self) -> String {
        format!("disk-{}", self.id)
    }

    /// Checks the id, that the file exists and that its format is the one declared.
    pub fn validate(&self) -> Result<(), QemuError> {
        if self.id.is_empty()
            || self.id.len() > 20
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(QemuError::InvalidSpec(format!(
                "disk id {:?} is invalid: use 1-20 characters from a-z, 0-9 and '-'",
                self.id
            )));
        }
        if !self.path.is_file() {
            return Err(QemuError::InvalidSpec(format!(
                "disk {:?}: image {} does not exist (create it with `qemu-img create -f {} …`)",
                self.id,
                self.path.display(),
                self.format
            )));
        }
        let is_qcow2 = file_is_qcow2(&self.path).map_err(|e| QemuError::Io {
            context: format!("reading disk image {}", self.path.display()),
            source: e,
        })?;
        match (self.format, is_qcow2) {
            (DiskFormat::Raw, true) => Err(QemuError::InvalidSpec(format!(
                "disk {:?}: {} is a qcow2 image but the format says raw: use format \"qcow2\"",
                self.id,
                self.path.display()
            ))),
            (DiskFormat::Qcow2, false) => Err(QemuError::InvalidSpec(format!(
                "disk {:?}: {} is not a qcow2 image (no QFI magic): use format \"raw\"",
                self.id,
                self.path.display()
            ))),
            _ => Ok(()),
        }
    }

    /// The JSON `-blockdev` options of the protocol node and the format node, in order.
    pub fn blockdev_json(&self) -> [String; 2] {
        let (direct, no_flush, _) = self.cache.flags();
        let read_only = !self.writable;
        let cache = json!({ "direct": direct, "no-flush": no_flush });
        let file = json!({
            "driver": "file",
            "node-name": self.file_node_name(),
            "filename": self.path.display().to_string(),
            "cache": cache,
            "read-only": read_only,
        });
        let format = json!({
            "driver": self.format.as_str(),
            "node-name": self.node_name(),
            "file": self.file_node_name(),
            "cache": cache,
            "read-only": read_only,
        });
        [file.to_string(), format.to_string()]
    }

    /// The `-device virtio-blk-pci,…` value; `bootindex` when the guest boots from it.
    pub fn device_arg(&self, bootindex: Option<u32>) -> String {
        let (_, _, write_cache) = self.cache.flags();
        let serial = self.serial.as_deref().unwrap_or(&self.id);
        let mut arg = format!(
            "virtio-blk-pci,id={},drive={},serial={},write-cache={}",
            self.device_id(),
            self.node_name(),
            serial,
            if write_cache { "on" } else { "off" }
        );
        if let Some(i) = bootindex {
            arg.push_str(&format!(",bootindex={i}"));
        }
        arg
    }
}

/// Whether the file starts with qcow2's magic `QFI\xfb` (QEMU's `block/qcow2.h`,
/// `QCOW_MAGIC`).
fn file_is_qcow2(path: &std::path::Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let mut got = 0;
    while got < magic.len() {
        let n = f.read(&mut magic[got..])?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(magic == *b"QFI\xfb")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn formats_and_cache_modes_parse_with_clear_errors() {
        assert_eq!("qcow2".parse::<DiskFormat>().unwrap(), DiskFormat::Qcow2);
        let e = "vmdk".parse::<DiskFormat>().unwrap_err().to_string();
        assert!(e.contains("\"vmdk\"") && e.contains("qcow2"), "{e}");
        assert_eq!("none".parse::<CacheMode>().unwrap(), CacheMode::None);
        let e = "fast".parse::<CacheMode>().unwrap_err().to_string();
        assert!(e.contains("\"fast\"") && e.contains("directsync"), "{e}");
    }

    #[test]
    fn blockdev_nodes_are_named_and_carry_cache_flags() {
        let mut d = DiskSpec::new("data", "/img/a,b.raw", DiskFormat::Raw);
        d.cache = CacheMode::None;
        let [file, fmt] = d.blockdev_json();
        let file: Value = serde_json::from_str(&file).unwrap();
        let fmt: Value = serde_json::from_str(&fmt).unwrap();
        assert_eq!(file["driver"], "file");
        assert_eq!(file["node-name"], "tern-data-file");
        assert_eq!(file["filename"], "/img/a,b.raw");
        assert_eq!(file["cache"]["direct"], true);
        assert_eq!(fmt["driver"], "raw");
        assert_eq!(fmt["node-name"], d.node_name());
        assert_eq!(fmt["file"], "tern-data-file");
        assert_eq!(fmt["read-only"], false);
        assert!(d.device_arg(None).contains("drive=tern-data,"));
        assert!(d.device_arg(None).contains("write-cache=on"));
        assert!(d.device_arg(Some(1)).ends_with(",bootindex=1"));
    }

    #[test]
    fn read_only_and_writethrough_reach_nodes_and_device() {
        let mut d = DiskSpec::new("root", "/img/r.qcow2", DiskFormat::Qcow2);
        d.writable = false;
        d.cache = CacheMode::Writethrough;
        let [file, fmt] = d.blockdev_json();
        let file: Value = serde_json::from_str(&file).unwrap();
        let fmt: Value = serde_json::from_str(&fmt).unwrap();
        assert_eq!(file["read-only"], true);
        assert_eq!(fmt["read-only"], true);
        assert_eq!(fmt["driver"], "qcow2");
        assert!(d.device_arg(None).contains("write-cache=off"));
    }

    #[test]
    fn validation_checks_id_path_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let q = dir.path().join("d.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.resize(512, 0);
        std::fs::write(&q, header).unwrap();

        assert!(
            DiskSpec::new("data", &raw, DiskFormat::Raw)
                .validate()
                .is_ok()
        );
        assert!(
            DiskSpec::new("data", &q, DiskFormat::Qcow2)
                .validate()
                .is_ok()
        );
        let e = DiskSpec::new("data", &q, DiskFormat::Raw)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a qcow2 image"), "{e}");
        let e = DiskSpec::new("data", &raw, DiskFormat::Qcow2)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a qcow2 image"), "{e}");
        let e = DiskSpec::new("data", dir.path().join("none"), DiskFormat::Raw)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = DiskSpec::new("Data_1", &raw, DiskFormat::Raw)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"Data_1\""), "{e}");
    }
}

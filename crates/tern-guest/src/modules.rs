//! The virtio driver modules the guest needs for disks and NICs.
//!
//! Debian's stock kernel has the serial console, initrd and devtmpfs built in but virtio
//! as modules (`platform.md`), so a guest with a `virtio-blk` data disk or a `virtio-net`
//! NIC needs `virtio_blk.ko` / `virtio_net.ko` and their dependencies in its initramfs.
//! They come out of the same kernel package the kernel came from (the `.deb` kept in the
//! kernel cache), unpacked once with `dpkg -x` into `<kernel cache entry>/modules/`.
//! `/init` loads them with busybox `insmod` only when the command line asks for a disk or
//! a network (`tern_disk=`, `tern_ip=`), so diskless guests boot as fast as before.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::image::GuestError;

/// The modules wanted (a module missing from the package is built in and skipped). They are
/// loaded in dependency order, read from each module's own `depends=` field
/// ([`load_order`]), since it differs between kernel versions (in 6.1 `virtio` needs
/// `virtio_ring`, in older kernels the reverse).
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// A module file for the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelModule {
    /// Its name, e.g. `virtio_blk`.
    pub name: String,
    /// The `.ko` contents.
    pub data: Vec<u8>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The virtio modules of the Debian kernel cached in `kernel_dir` (the directory holding
/// its `vmlinuz` and `.deb`), in [`VIRTIO_MODULES`] order. Unpacks them on first use.
/// Without a `.deb` (a kernel cached by an older tern) there are no modules: an empty list.
pub fn debian_virtio_modules(kernel_dir: &Path) -> Result<Vec<KernelModule>, GuestError> {
    let cached = kernel_dir.join("modules");
    if !cached.is_dir() {
        let Some(deb) = find_deb(kernel_dir)? else {
            return Ok(Vec::new());
        };
        unpack_modules(&deb, kernel_dir, &cached)?;
    }
    let mut out = Vec::new();
    for name in VIRTIO_MODULES {
        let path = cached.join(format!("{name}.ko"));
        if path.is_file() {
            out.push(KernelModule {
                name: (*name).to_string(),
                data: fs::read(&path).map_err(io_err(&path))?,
            });
        }
    }
    Ok(load_order(out))
}

/// The `depends=` entry of a module's `.modinfo` section: the modules it needs loaded
/// first (comma-separated, possibly empty).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut i = 0;
    while let Some(pos) = ko[i..].windows(KEY.len()).position(|w| w == KEY) {
        let start = i + pos;
        if start == 0 || ko[start - 1] == 0 {
            let value = &ko[start + KEY.len()..];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return String::from_utf8_lossy(&value[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect();
        }
        i = start + 1;
    }
    Vec::new()
}

/// Orders modules so that each comes after those of its dependencies that are in the list
/// (the others are built into the kernel). Stable: independent modules keep their order.
pub fn load_order(mut modules: Vec<KernelModule>) -> Vec<KernelModule> {
    let mut ordered: Vec<KernelModule> = Vec::with_capacity(modules.len());
    while !modules.is_empty() {
        let ready = modules.iter().position(|m| {
            module_depends(&m.data).iter().all(|d| {
                ordered.iter().any(|o| o.name == *d) || !modules.iter().any(|x| x.name == *d)
            })
        });
        // A dependency cycle cannot load anyway; keep the rest in the given order.
        let i = ready.unwrap_or(0);
        ordered.push(modules.remove(i));
    }
    ordered
}

fn find_deb(dir: &Path) -> Result<Option<PathBuf>, GuestError> {
    Ok(fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb")))
}

/// `dpkg -x` into a temporary directory next to `dest`, copy the wanted `.ko` files into a
/// staging directory and rename it to `dest` (a concurrent builder sees all or nothing).
fn unpack_modules(deb: &Path, kernel_dir: &Path, dest: &Path) -> Result<(), GuestError> {
    let tmp = tempfile::Builder::new()
        .prefix(".modules-")
        .tempdir_in(kernel_dir)
        .map_err(io_err(kernel_dir))?;
    let root = tmp.path().join("root");
    let out = Command::new("dpkg")
        .arg("-x")
        .arg(deb)
        .arg(&root)
        .output()
        .map_err(|e| GuestError::Missing {
            what: format!("dpkg ({e})"),
            hint: "tern unpacks the kernel package with dpkg -x; run on Debian".into(),
        })?;
    if !out.status.success() {
        return Err(GuestError::Command {
            command: format!("dpkg -x {} {}", deb.display(), root.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let stage = tmp.path().join("modules");
    fs::create_dir(&stage).map_err(io_err(&stage))?;
    let mut found = Vec::new();
    find_modules(&root.join("lib/modules"), &mut found);
    if found.is_empty() {
        // Debian's usrmerge moved modules below /usr/lib.
        find_modules(&root.join("usr/lib/modules"), &mut found);
    }
    for path in found {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::copy(&path, stage.join(&name)).map_err(io_err(&path))?;
    }
    if fs::rename(&stage, dest).is_err() && !dest.is_dir() {
        return Err(GuestError::Io {
            path: dest.to_path_buf(),
            source: std::io::Error::other("could not move the unpacked modules into the cache"),
        });
    }
    Ok(())
}

/// Every `<name>.ko` below `dir` whose name is in [`VIRTIO_MODULES`].
fn find_modules(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            find_modules(&p, found);
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
            && VIRTIO_MODULES.contains(&stem)
        {
            found.push(p);
        }
    }
}

/// The `/init` lines that load `modules` (already in load order) from `/lib/modules`,
/// only for guests whose command line asks for a disk or a network.
pub fn init_lines(modules: &[KernelModule]) -> String {
    if modules.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    format!(
        "if grep -qE 'tern_disk=|tern_ip=' /proc/cmdline; then\n  \
         for m in {}; do\n    \
         insmod /lib/modules/$m.ko || echo \"tern-init: insmod $m failed\"\n  \
         done\n\
         fi\n",
        names.join(" ")
    )
}

/// The `/init` lines that give `eth0` the static address of `tern_ip=A.B.C.D/N` (busybox
/// `ip`), for the echo service of `tern-load`. No DHCP: the lab's tenant network has no
/// server, and a fixed address is what a client probes.
pub fn network_init_lines() -> &'static str {
    "for w in $(cat /proc/cmdline); do\n  \
     case \"$w\" in tern_ip=*)\n    \
     ip link set lo up\n    \
     ip link set eth0 up && ip addr add \"${w#tern_ip=}\" dev eth0 \
     || echo \"tern-init: cannot configure eth0 with $w\";;\n  \
     esac\n\
     done\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, depends: &str) -> KernelModule {
        let mut data = b"\x7fELF junk\0license=GPL\0".to_vec();
        data.extend_from_slice(format!("depends={depends}\0name={name}\0").as_bytes());
        KernelModule {
            name: name.into(),
            data,
        }
    }

    #[test]
    fn depends_field_is_read_from_modinfo() {
        assert_eq!(
            module_depends(&module("virtio_pci", "virtio_ring,virtio").data),
            ["virtio_ring", "virtio"]
        );
        assert!(module_depends(&module("virtio_ring", "").data).is_empty());
        assert!(module_depends(b"no modinfo here").is_empty());
        // "xdepends=" inside another string is not the field.
        assert!(module_depends(b"\0xdepends=a\0").is_empty());
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let mods = vec![
            module("virtio_blk", "virtio,virtio_ring"),
            module("virtio", "virtio_ring"),
            module("virtio_ring", ""),
            module("virtio_net", "virtio_ring,virtio,net_failover"),
            module("net_failover", "failover"),
            module("failover", ""),
            module("virtio_pci", "virtio_ring,built_in_one,virtio"),
        ];
        let order: Vec<String> = load_order(mods).into_iter().map(|m| m.name).collect();
        let pos = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_blk"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert_eq!(order.len(), 7);
    }

    #[test]
    fn init_lines_load_only_for_disk_or_network_guests() {
        let l = init_lines(&[module("virtio_ring", ""), module("virtio_blk", "")]);
        assert!(l.contains("tern_disk=|tern_ip="));
        assert!(l.contains("for m in virtio_ring virtio_blk;"));
        assert!(l.contains("insmod /lib/modules/$m.ko"));
        assert!(init_lines(&[]).is_empty());
    }

    #[test]
    fn network_lines_configure_eth0_from_the_command_line() {
        let l = network_init_lines();
        assert!(l.contains("tern_ip=*)"));
        assert!(l.contains("ip addr add \"${w#tern_ip=}\" dev eth0"));
    }

    #[test]
    fn a_kernel_without_its_package_has_no_modules() {
        let dir = tempfile::tempdir().unwrap();
        assert!(debian_virtio_modules(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn cached_modules_are_read_in_load_order() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("modules");
        fs::create_dir(&m).unwrap();
        fs::write(m.join("virtio_blk.ko"), module("virtio_blk", "virtio").data).unwrap();
        fs::write(m.join("virtio.ko"), module("virtio", "").data).unwrap();
        let mods = debian_virtio_modules(dir.path()).unwrap();
        let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["virtio", "virtio_blk"]);
    }
}

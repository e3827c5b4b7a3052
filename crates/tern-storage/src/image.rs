//! Disk images on a host: what an image is (`qemu-img info`), creating the destination's
//! empty copy (`qemu-img create`), and whether a host has room for it.
//!
//! Storage migration copies into an image that must already exist on the destination with
//! the source's virtual size and format (libvirt pre-creates it the same way,
//! `qemuMigrationDstPrecreateStorage` in `src/qemu/qemu_migration.c`). Checking free space
//! before anything starts turns "the mirror failed at 93 % with ENOSPC" into a refusal
//! that names the numbers.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use tern_qemu::DiskFormat;

/// Errors about images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `qemu-img` could not be run or failed.
    #[error("`{command}` failed: {stderr}")]
    QemuImg {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// Its output was not understood.
    #[error("cannot read `qemu-img info` of {path}: {reason}")]
    Info {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The image's format is not the one declared.
    #[error("image {path} is {found}, not {declared}: declare format {found:?}")]
    FormatMismatch {
        /// The image.
        path: PathBuf,
        /// What the VM description says.
        declared: String,
        /// What `qemu-img` found.
        found: String,
    },
    /// Not enough space for a copy.
    #[error(
        "{dir} has {available} bytes free but the copy of {what} needs {needed} bytes: \
         free space there or choose another host"
    )]
    NoSpace {
        /// The directory.
        dir: PathBuf,
        /// What was to be copied.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Format (`raw`, `qcow2`, …).
    pub format: String,
    /// Size the guest sees, bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    #[serde(default)]
    pub actual_size: u64,
}

fn qemu_img(args: &[&str]) -> Result<Vec<u8>, ImageError> {
    let command = format!("qemu-img {}", args.join(" "));
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| ImageError::QemuImg {
            command: command.clone(),
            stderr: format!("{e} (install qemu-utils)"),
        })?;
    if !out.status.success() {
        return Err(ImageError::QemuImg {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// `qemu-img info` of an image (`-U`: readable while a QEMU holds its lock).
pub fn image_info(path: &Path) -> Result<ImageInfo, ImageError> {
    let p = path.display().to_string();
    let out = qemu_img(&["info", "-U", "--output=json", &p])?;
    serde_json::from_slice(&out).map_err(|e| ImageError::Info {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Checks that the image at `path` has the declared format (a qcow2 opened as raw shows
/// its metadata to the guest as data; a raw opened as qcow2 fails to open).
pub fn check_format(path: &Path, declared: DiskFormat) -> Result<ImageInfo, ImageError> {
    let info = image_info(path)?;
    if info.format != declared.as_str() {
        return Err(ImageError::FormatMismatch {
            path: path.to_path_buf(),
            declared: declared.to_string(),
            found: info.format.clone(),
        });
    }
    Ok(info)
}

/// Creates an empty image (sparse raw, or qcow2 without preallocation) of `virtual_size`
/// bytes: the destination of a storage migration.
pub fn create_image(path: &Path, format: DiskFormat, virtual_size: u64) -> Result<(), ImageError> {
    let p = path.display().to_string();
    let size = virtual_size.to_string();
    qemu_img(&["create", "-q", "-f", format.as_str(), &p, &size]).map(|_| ())
}

/// Bytes available to an unprivileged writer in the file system holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64, ImageError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| ImageError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other("path contains a NUL byte"),
    })?;
    // SAFETY: statvfs(3) fills the struct we pass for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(ImageError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Refuses a copy of `needed` bytes (the source's virtual size: a mirror writes every
/// allocated area, and a fully written disk needs all of it) into `dir` when it does not
/// fit.
pub fn check_free_space(dir: &Path, what: &str, needed: u64) -> Result<(), ImageError> {
    let available = free_space(dir)?;
    if available < needed {
        return Err(ImageError::NoSpace {
            dir: dir.to_path_buf(),
            what: what.to_string(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_images_report_their_format_and_size() {
        let dir = tempfile::tempdir().unwrap();
        for format in [DiskFormat::Raw, DiskFormat::Qcow2] {
            let p = dir.path().join(format!("d.{format}"));
            create_image(&p, format, 3 << 20).unwrap();
            let info = check_format(&p, format).unwrap();
            assert_eq!(info.virtual_size, 3 << 20);
        }
        let e = check_format(&dir.path().join("d.qcow2"), DiskFormat::Raw).unwrap_err();
        assert!(e.to_string().contains("is qcow2, not raw"), "{e}");
        let e = image_info(&dir.path().join("missing.raw")).unwrap_err();
        assert!(e.to_string().contains("missing.raw"), "{e}");
    }

    #[test]
    fn free_space_check_names_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
        check_free_space(dir.path(), "disk data", 1).unwrap();
        let e = check_free_space(dir.path(), "disk data", u64::MAX).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("disk data") && msg.contains(&u64::MAX.to_string()),
            "{msg}"
        );
    }
}

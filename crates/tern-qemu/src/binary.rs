//! Finding the QEMU binary and refusing versions that cannot be trusted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::QemuError;

/// The oldest QEMU tern accepts.
///
/// QEMU 7.2 (Debian 12's) loses dirty pages when a TCG guest writes memory during
/// migration: the destination resumed with a stale stack page in 3 of 4 heavy runs here
/// (fixed upstream in 9.0 by "physmem: Fix migration dirty bitmap coherency with TCG memory
/// access"). A migration manager that silently corrupts guests is worse than none, so older
/// versions are refused with instructions rather than used.
pub const MIN_QEMU: (u32, u32) = (9, 0);

/// Name of the emulator tern runs.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// A QEMU version as printed by `--version` or reported in the QMP greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses the first line of `qemu-system-x86_64 --version`
    /// (`QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)`).
    pub fn parse_version_output(text: &str) -> Option<Self> {
        let rest = text.lines().next()?.split("version ").nth(1)?;
        let token = rest.split_whitespace().next()?;
        let mut parts = token.split('.').map(|p| {
            p.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse::<u32>()
        });
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let micro = parts.next().and_then(|p| p.ok()).unwrap_or(0);
        Some(Self {
            major,
            minor,
            micro,
        })
    }

    /// Whether this version is new enough for tern (see [`MIN_QEMU`]).
    pub fn is_supported(&self) -> bool {
        (self.major, self.minor) >= MIN_QEMU
    }
}

/// A located, version-checked QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    /// Absolute path of the emulator.
    pub path: PathBuf,
    /// Its version.
    pub version: QemuVersion,
}

const INSTALL_HINT: &str = "run `scripts/install-prereqs.sh` (on Debian 12 it installs \
qemu-system-x86 from bookworm-backports: `apt-get install -t bookworm-backports qemu-system-x86`)";

impl QemuBinary {
    /// Finds `qemu-system-x86_64` on `PATH` (or at `$TERN_QEMU`) and checks its version.
    pub fn locate() -> Result<Self, QemuError> {
        let path = match std::env::var_os("TERN_QEMU") {
            Some(p) => PathBuf::from(p),
            None => find_on_path(QEMU_PROGRAM).ok_or_else(|| {
                QemuError::QemuMissing(format!("{QEMU_PROGRAM} is not installed: {INSTALL_HINT}"))
            })?,
        };
        Self::at(&path)
    }

    /// Checks the QEMU binary at `path`.
    pub fn at(path: &Path) -> Result<Self, QemuError> {
        let out = Command::new(path).arg("--version").output().map_err(|e| {
            QemuError::QemuMissing(format!(
                "cannot run {}: {e}; {INSTALL_HINT}",
                path.display()
            ))
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = QemuVersion::parse_version_output(&text).ok_or_else(|| {
            QemuError::QemuMissing(format!(
                "{} --version printed {:?}, which is not a QEMU version line",
                path.display(),
                text.lines().next().unwrap_or("")
            ))
        })?;
        if !version.is_supported() {
            return Err(QemuError::QemuTooOld(format!(
                "QEMU {version} at {} is too old: tern needs QEMU >= {}.{} because older \
                 versions lose dirty pages under TCG during migration; {INSTALL_HINT}",
                path.display(),
                MIN_QEMU.0,
                MIN_QEMU.1
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
        })
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_backports_version() {
        let v = QemuVersion::parse_version_output(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright",
        )
        .unwrap();
        assert_eq!(
            v,
            QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            }
        );
        assert!(v.is_supported());
    }

    #[test]
    fn refuses_bookworm_qemu() {
        let v = QemuVersion::parse_version_output(
            "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)",
        )
        .unwrap();
        assert!(!v.is_supported());
        let v9 = QemuVersion::parse_version_output("QEMU emulator version 9.0.0").unwrap();
        assert!(v9.is_supported());
    }

    #[test]
    fn garbage_is_not_a_version() {
        assert!(QemuVersion::parse_version_output("hello").is_none());
        assert!(QemuVersion::parse_version_output("").is_none());
        assert!(QemuVersion::parse_version_output("QEMU emulator version x.y").is_none());
    }

    #[test]
    fn missing_binary_says_what_to_install() {
        let e = QemuBinary::at(Path::new("/nonexistent/qemu-system-x86_64")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("install-prereqs"), "{msg}");
    }

    #[test]
    fn old_binary_is_refused_with_instructions() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu-old");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7)'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = QemuBinary::at(&fake).unwrap_err();
        assert!(matches!(e, QemuError::QemuTooOld(_)));
        assert!(e.to_string().contains("7.2.15"));
        assert!(e.to_string().contains("bookworm-backports"));
    }
}

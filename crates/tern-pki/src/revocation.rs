//! The deny list: revoked certificate serials, reloaded by servers when the file changes.
//!
//! A plain text file rather than a CRL: it is written by `tern pki revoke` on the CA host and
//! copied (or shared) to every server; each server checks the file's mtime and size at every
//! handshake and re-reads it when they change, so a revocation takes effect at the next
//! connection without restarting anything.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::PkiError;

/// Normalizes a serial as printed by tern, openssl (`AB:CD:..`) or with a `0x` prefix to
/// lowercase hex without leading zero bytes.
pub fn normalize_serial(s: &str) -> Result<String, PkiError> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidSerial(s.to_string()));
    }
    let hex = hex.to_ascii_lowercase();
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let mut t = hex.as_str();
    while t.len() > 2 && t.starts_with("00") {
        t = &t[2..];
    }
    Ok(t.to_string())
}

/// Reads a deny list; a missing file is an empty list. Lines: a serial, blank, or `#` comment.
pub(crate) fn read_deny_list(path: &Path) -> Result<HashSet<String>, PkiError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(PkiError::io("reading deny list", path)(e)),
    };
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let serial = normalize_serial(line).map_err(|_| PkiError::Parse {
            what: "deny list",
            path: path.to_path_buf(),
            reason: format!("line {}: {line:?} is not a hexadecimal serial", i + 1),
        })?;
        out.insert(serial);
    }
    Ok(out)
}

pub(crate) fn append_to_deny_list(path: &Path, serial: &str) -> Result<(), PkiError> {
    if read_deny_list(path)?.contains(serial) {
        return Ok(());
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(PkiError::io("opening deny list", path))?;
    writeln!(f, "{serial}")
        .and_then(|()| f.sync_all())
        .map_err(PkiError::io("writing deny list", path))
}

#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    serials: HashSet<String>,
    error: Option<String>,
}

/// A deny list file watched by mtime and size at each check.
///
/// Fails closed: if the file exists but cannot be read or parsed, every certificate is
/// refused (with the reason logged) until it is fixed — an attacker who corrupts the list
/// must not thereby un-revoke a stolen certificate.
#[derive(Debug)]
pub struct DenyList {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl DenyList {
    /// Watches `path` (which may not exist yet: then nothing is revoked).
    pub fn new(path: impl Into<PathBuf>) -> DenyList {
        DenyList {
            path: path.into(),
            loaded: Mutex::new(Loaded::default()),
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(())` if `serial` (normalized hex) may be accepted, `Err(reason)` if not.
    pub fn check(&self, serial: &str) -> Result<(), String> {
        let mut loaded = match self.loaded.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let stamp = fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp != loaded.stamp || (stamp.is_none() && loaded.error.is_some()) {
            match read_deny_list(&self.path) {
                Ok(serials) => {
                    loaded.serials = serials;
                    loaded.error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "deny list unusable: refusing every certificate");
                    loaded.error = Some(e.to_string());
                }
            }
            loaded.stamp = stamp;
        }
        if let Some(e) = &loaded.error {
            return Err(format!("deny list unusable ({e})"));
        }
        if loaded.serials.contains(serial) {
            return Err(format!("certificate serial {serial} is revoked"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_normalize_from_every_common_form() {
        assert_eq!(normalize_serial("AB:cd:01").unwrap(), "abcd01");
        assert_eq!(normalize_serial("0x00ab").unwrap(), "ab");
        assert_eq!(normalize_serial("abc").unwrap(), "0abc");
        let e = normalize_serial("xyz").unwrap_err().to_string();
        assert!(e.contains("\"xyz\"") && e.contains("hexadecimal"), "{e}");
    }

    #[test]
    fn deny_list_is_reloaded_when_the_file_changes_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.txt");
        let list = DenyList::new(&path);
        assert!(list.check("ab").is_ok(), "missing file revokes nothing");
        append_to_deny_list(&path, "ab").unwrap();
        assert!(list.check("ab").unwrap_err().contains("revoked"));
        assert!(list.check("cd").is_ok());
        fs::write(&path, "ab\nnot-a-serial\n").unwrap();
        assert!(list.check("cd").unwrap_err().contains("line 2"));
        fs::write(&path, "# none\n").unwrap();
        assert!(list.check("ab").is_ok());
    }
}

//! File layout of a PKI directory and the private-file helpers.
//!
//! ```text
//! DIR/                         0700
//!   ca-cert.pem                the installation CA (public; copy it to every host)
//!   ca-key.pem                 0600, the CA's key: only `tern pki` reads it
//!   revoked.txt                deny list: one serial (hex) per line, `#` comments
//!   issued/KIND/NAME/          0700
//!     SERIAL-cert.pem          every certificate issued for NAME (rotation keeps the old)
//!     SERIAL-key.pem           0600
//!     cert.pem, key.pem        the newest one, where servers and clients look by default
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::PkiError;

/// Where `tern pki` keeps the installation's PKI unless told otherwise.
pub const DEFAULT_PKI_DIR: &str = "/etc/tern/pki";

pub(crate) const CA_CERT: &str = "ca-cert.pem";
pub(crate) const CA_KEY: &str = "ca-key.pem";
pub(crate) const DENY_LIST: &str = "revoked.txt";
pub(crate) const ISSUED: &str = "issued";

/// The files one TLS endpoint needs: the CA to verify peers against, its own certificate and
/// key, and the deny list to refuse revoked peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The installation CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This endpoint's certificate (PEM).
    pub cert: PathBuf,
    /// This endpoint's private key (PEM, PKCS#8); must not be readable by others.
    pub key: PathBuf,
    /// The deny list of revoked serials; `None` accepts every unexpired certificate of the CA
    /// (only for tests and labs: revocation then has no effect).
    pub deny_list: Option<PathBuf>,
}

impl TlsFiles {
    /// The current certificate of `kind`/`name` in a PKI directory made by [`crate::Pki`]
    /// (`kind` is `"host"` or `"user"`).
    pub fn in_pki_dir(dir: &Path, kind: &str, name: &str) -> TlsFiles {
        let d = dir.join(ISSUED).join(kind).join(name);
        TlsFiles {
            ca_cert: dir.join(CA_CERT),
            cert: d.join("cert.pem"),
            key: d.join("key.pem"),
            deny_list: Some(dir.join(DENY_LIST)),
        }
    }
}

/// Creates `dir` (and parents) and makes `dir` itself 0700: it holds private keys.
pub(crate) fn private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(PkiError::io("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(PkiError::io("setting mode 0700 on", dir))
}

/// Writes a file readable only by its owner. The mode is set at creation (no window in which
/// a key is world-readable) and again afterwards in case the file existed.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(PkiError::io("creating", &tmp))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(PkiError::io("writing", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .map_err(PkiError::io("setting mode 0600 on", &tmp))?;
    fs::rename(&tmp, path).map_err(PkiError::io("renaming into place", path))
}

/// Reads a text file, naming it on error.
pub(crate) fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(PkiError::io("reading", path))
}

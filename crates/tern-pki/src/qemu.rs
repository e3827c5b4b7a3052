//! QEMU's x509 credentials directory for encrypted migration streams.
//!
//! QEMU's `tls-creds-x509` object reads fixed file names from one directory
//! (docs/system/tls.rst): `ca-cert.pem`, and `server-cert.pem`/`server-key.pem` for
//! `endpoint=server` (the destination) or `client-cert.pem`/`client-key.pem` for
//! `endpoint=client` (the source). A host is either end of some migration, and its host
//! certificate is valid for both TLS server and client use, so both pairs are the same
//! certificate. With `verify-peer=on` each side checks the other against the CA; the
//! destination's `tls-authz` then pins *which* host may send (`CN=<source host>`).

use std::path::Path;

use crate::PkiError;
use crate::files::{TlsFiles, private_dir, read_text, write_private};

/// The files written into a QEMU credentials directory.
pub const QEMU_CREDS_FILES: [&str; 5] = [
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
];

/// Writes a QEMU credentials directory (0700, files 0600) for the host whose certificate is
/// in `files`. QEMU runs as root and reads them at `-object tls-creds-x509` creation;
/// nothing else needs them.
pub fn write_qemu_creds(files: &TlsFiles, dir: &Path) -> Result<(), PkiError> {
    let ca = read_text(&files.ca_cert)?;
    let cert = read_text(&files.cert)?;
    let key = read_text(&files.key)?;
    private_dir(dir)?;
    for (name, contents) in [
        ("ca-cert.pem", &ca),
        ("server-cert.pem", &cert),
        ("server-key.pem", &key),
        ("client-cert.pem", &cert),
        ("client-key.pem", &key),
    ] {
        write_private(&dir.join(name), contents.as_bytes())?;
    }
    Ok(())
}

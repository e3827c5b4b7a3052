//! QEMU arguments for an encrypted, authenticated migration stream.
//!
//! QEMU encrypts the migration channel (and post-copy recovery and return paths, which are
//! opened with the same parameters) with its `tls-creds-x509` object; the migration
//! parameters `tls-creds`, `tls-hostname` and `tls-authz` select it (qapi/migration.json).
//! The credentials come from tern's PKI (`tern_pki::write_qemu_creds`): one directory per
//! host with the CA and the host certificate, made for both ends.
//!
//! Every tern QEMU gets the *client* object (any VM may later migrate out); a QEMU started
//! for an incoming migration also gets the *server* object with `verify-peer=on` (the source
//! must present a certificate of the same CA) and an `authz-simple` object naming the one
//! source host allowed to send (`CN=<host>`, the DN of tern host certificates). The creds
//! are fixed at launch, which is why they are not part of [`VmSpec`]: the spec describes the
//! guest and must be identical on both ends, while TLS objects differ per end and per host.
//!
//! Enable the `return-path` capability on both ends with TLS (post-copy implies it). With
//! TLS 1.3 the source finishes its handshake before the destination has judged the source's
//! certificate; a destination that then refuses the source (`tls-authz`) leaves a small
//! stream's source reporting `completed` while the destination is still in `setup`
//! (seen with QEMU 10.0 and `-machine none`, see `tests/migration_tls.rs`). With the return
//! path the source completes only when the destination confirms.

use std::path::PathBuf;

use serde::Serialize;

use crate::QemuError;
use crate::spec::{LaunchMode, VmSockets, VmSpec};

/// QOM id of the `tls-creds-x509` object a source uses (`endpoint=client`).
pub const TLS_CREDS_OUT_ID: &str = "tern-tls-out";
/// QOM id of the `tls-creds-x509` object a destination uses (`endpoint=server`).
pub const TLS_CREDS_IN_ID: &str = "tern-tls-in";
/// QOM id of the destination's `authz-simple` object.
pub const TLS_AUTHZ_ID: &str = "tern-tls-authz";

/// GnuTLS priority string for both TLS objects: TLS 1.3 without AES, i.e.
/// CHACHA20-POLY1305.
///
/// Why: with AES-GCM, TLS 1.3 re-keys after 2^24 records (~64 GB); GnuTLS re-keying is not
/// thread-safe while the return path reads the same session, and QEMU crashes on the source
/// in long migrations (QEMU issue 1937; Daniel Berrangé's qemu-devel workaround series of
/// July 2025, the problem libvirt 11.6 warns about). ChaCha20-Poly1305 needs no re-key within
/// any realistic migration. The series' QEMU-side workaround is not in every QEMU tern
/// accepts (≥ 9.0), and excluding AES is the fix that works with running QEMUs; it costs
/// some CPU per byte on hosts with AES-NI.
pub const GNUTLS_PRIORITY: &str = "NORMAL:-AES-256-GCM:-AES-128-GCM:-AES-128-CCM";

/// TLS for a QEMU's migration streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MigrationTls {
    /// Directory with `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
    /// `client-cert.pem`, `client-key.pem` (0700/0600).
    pub creds_dir: PathBuf,
    /// For an incoming QEMU: the host name of the only source allowed to send (its host
    /// certificate's CN). Required in [`LaunchMode::Incoming`].
    pub accept_from: Option<String>,
}

/// The TLS fields of `migrate-set-parameters`, named as QEMU names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsMigrationParameters {
    /// The `tls-creds-x509` object id.
    pub tls_creds: String,
    /// Source only: the name the destination's certificate must carry (QEMU otherwise uses
    /// the host part of the URI; tern host certificates carry both name and addresses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Destination only: the `authz-simple` object that pins the source's identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

/// QEMU option values use ',' as separator; a literal comma is written ",,".
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn check_host_name(name: &str) -> Result<(), QemuError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(QemuError::InvalidSpec(format!(
            "TLS peer host name {name:?} is invalid: use 1-63 characters from a-z, 0-9, '-' and '.'"
        )))
    }
}

impl MigrationTls {
    /// The `-object` arguments for a QEMU started in `mode`.
    pub fn to_args(&self, mode: LaunchMode) -> Result<Vec<String>, QemuError> {
        let dir = opt_escape(&self.creds_dir.display().to_string());
        let mut args = vec![
            "-object".to_string(),
            format!(
                "tls-creds-x509,id={TLS_CREDS_OUT_ID},dir={dir},endpoint=client,verify-peer=on,priority={GNUTLS_PRIORITY}"
            ),
        ];
        if mode == LaunchMode::Incoming {
            let Some(peer) = &self.accept_from else {
                return Err(QemuError::InvalidSpec(
                    "an incoming QEMU with migration TLS needs accept_from (the source host name): without it any host of the CA could send"
                        .to_string(),
                ));
            };
            check_host_name(peer)?;
            args.extend([
                "-object".to_string(),
                format!(
                    "tls-creds-x509,id={TLS_CREDS_IN_ID},dir={dir},endpoint=server,verify-peer=on,priority={GNUTLS_PRIORITY}"
                ),
                "-object".to_string(),
                format!(
                    "authz-simple,id={TLS_AUTHZ_ID},identity=CN={}",
                    opt_escape(peer)
                ),
            ]);
        }
        Ok(args)
    }

    /// Parameters for the source QEMU, sending to `destination_host` (its certificate
    /// name).
    pub fn source_parameters(destination_host: &str) -> TlsMigrationParameters {
        TlsMigrationParameters {
            tls_creds: TLS_CREDS_OUT_ID.to_string(),
            tls_hostname: Some(destination_host.to_string()),
            tls_authz: None,
        }
    }

    /// Parameters for the destination QEMU (started with this `MigrationTls` in
    /// [`LaunchMode::Incoming`]).
    pub fn destination_parameters() -> TlsMigrationParameters {
        TlsMigrationParameters {
            tls_creds: TLS_CREDS_IN_ID.to_string(),
            tls_hostname: None,
            tls_authz: Some(TLS_AUTHZ_ID.to_string()),
        }
    }
}

impl VmSpec {
    /// [`VmSpec::to_args`] plus the migration TLS objects, if any.
    pub fn to_args_with_tls(
        &self,
        sockets: &VmSockets,
        mode: LaunchMode,
        tls: Option<&MigrationTls>,
    ) -> Result<Vec<String>, QemuError> {
        let mut args = self.to_args(sockets, mode);
        if let Some(tls) = tls {
            args.extend(tls.to_args(mode)?);
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(args: &[String]) -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == "-object")
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn source_gets_client_creds_destination_gets_server_creds_and_authz() {
        let tls = MigrationTls {
            creds_dir: "/etc/tern/qemu-tls".into(),
            accept_from: Some("h1".into()),
        };
        let boot = tls.to_args(LaunchMode::Boot).unwrap();
        assert_eq!(
            objects(&boot),
            [format!(
                "tls-creds-x509,id=tern-tls-out,dir=/etc/tern/qemu-tls,endpoint=client,verify-peer=on,priority={GNUTLS_PRIORITY}"
            )]
        );
        let inc = tls.to_args(LaunchMode::Incoming).unwrap();
        assert_eq!(
            objects(&inc)[1..],
            [
                format!(
                    "tls-creds-x509,id=tern-tls-in,dir=/etc/tern/qemu-tls,endpoint=server,verify-peer=on,priority={GNUTLS_PRIORITY}"
                ),
                "authz-simple,id=tern-tls-authz,identity=CN=h1".to_string(),
            ]
        );
    }

    #[test]
    fn incoming_without_a_pinned_source_is_refused_and_commas_are_escaped() {
        let tls = MigrationTls {
            creds_dir: "/tmp/a,b".into(),
            accept_from: None,
        };
        let e = tls.to_args(LaunchMode::Incoming).unwrap_err().to_string();
        assert!(e.contains("accept_from"), "{e}");
        assert!(tls.to_args(LaunchMode::Boot).unwrap()[1].contains("dir=/tmp/a,,b,"));
        let bad = MigrationTls {
            accept_from: Some("h1,O=evil".into()),
            ..tls
        };
        let e = bad.to_args(LaunchMode::Incoming).unwrap_err().to_string();
        assert!(e.contains("\"h1,O=evil\""), "{e}");
    }

    #[test]
    fn parameters_use_qemu_names() {
        let src = serde_json::to_value(MigrationTls::source_parameters("h2")).unwrap();
        assert_eq!(
            src,
            serde_json::json!({"tls-creds": "tern-tls-out", "tls-hostname": "h2"})
        );
        let dst = serde_json::to_value(MigrationTls::destination_parameters()).unwrap();
        assert_eq!(
            dst,
            serde_json::json!({"tls-creds": "tern-tls-in", "tls-authz": "tern-tls-authz"})
        );
    }
}

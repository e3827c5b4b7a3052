//! The installation CA: creation, issuing host and user certificates, listing, revocation.

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PkiError;
use crate::files::{CA_CERT, CA_KEY, DENY_LIST, ISSUED, private_dir, read_text, write_private};
use crate::identity::{CertKind, Identity, KIND_URI, ROLE_URI, Role, identity_of};
use crate::revocation::{append_to_deny_list, normalize_serial, read_deny_list};

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First moment of validity.
    pub not_before: SystemTime,
    /// Last moment of validity; after it every tern server refuses the certificate.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from five minutes ago (tolerates clocks slightly behind ours) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(300),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// What `tern pki list` shows about one issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// Who the certificate identifies.
    pub identity: Identity,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Whether it has expired now.
    pub expired: bool,
    /// Whether its serial is on the deny list.
    pub revoked: bool,
    /// The certificate file.
    pub path: PathBuf,
}

/// A freshly issued certificate and where its files were written.
pub struct IssuedCert {
    /// Who it identifies (serial included).
    pub identity: Identity,
    /// The certificate file (this serial).
    pub cert_path: PathBuf,
    /// The private key file (0600).
    pub key_path: PathBuf,
    /// The certificate, PEM.
    pub cert_pem: String,
}

impl fmt::Debug for IssuedCert {
    /// No key material here by construction; the paths are enough to find it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// One installation's CA, opened from its directory.
pub struct Pki {
    dir: PathBuf,
    ca_cert_pem: String,
    ca_key: KeyPair,
}

impl fmt::Debug for Pki {
    /// Prints the directory only: the CA key must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Name of the CA, visible in `openssl x509 -text` and QEMU's error messages; a random
/// suffix makes every installation's CA distinct, so that a certificate of another tern
/// installation is reported as "unknown issuer" rather than matched by name and then
/// failing its signature check.
const CA_COMMON_NAME: &str = "tern installation CA";

impl Pki {
    /// Creates a new CA (ECDSA P-256, valid 10 years) in `dir` (made 0700; key 0600).
    /// Refuses if a CA already exists there.
    pub fn init(dir: &Path) -> Result<Pki, PkiError> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return Err(PkiError::AlreadyInitialized(dir.to_path_buf()));
        }
        private_dir(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let id: [u8; 4] = rand::random();
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {id}"));
        dn.push(DnType::OrganizationName, "tern");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let validity = Validity::days(3650);
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
        write_public(&dir.join(CA_CERT), cert.pem().as_bytes())?;
        tracing::info!(dir = %dir.display(), "created tern CA");
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_cert_pem: cert.pem(),
            ca_key: key,
        })
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::NotInitialized(dir.to_path_buf()));
        }
        let ca_cert_pem = read_text(&cert_path)?;
        let ca_key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|e| PkiError::Parse {
            what: "CA private key",
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        // Fail now, naming the file, rather than at the first issue.
        Issuer::from_ca_cert_pem(&ca_cert_pem, &ca_key).map_err(|e| PkiError::Parse {
            what: "CA certificate",
            path: cert_path,
            reason: e.to_string(),
        })?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_cert_pem,
            ca_key,
        })
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate file (to copy to every host and user).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The deny list that servers using this PKI directory reload.
    pub fn deny_list_path(&self) -> PathBuf {
        self.dir.join(DENY_LIST)
    }

    /// Issues a host (agent) certificate: usable as TLS server and client, SANs = the host
    /// name as DNS name plus `ips` (peers may connect by address).
    pub fn issue_host(
        &self,
        name: &str,
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        self.issue(CertKind::Host, name, Role::Host, ips, validity)
    }

    /// Issues a user certificate carrying `role` (`Viewer`, `Operator` or `Admin`).
    pub fn issue_user(
        &self,
        name: &str,
        role: Role,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        if role == Role::Host {
            return Err(PkiError::UnknownRole("host".to_string()));
        }
        self.issue(CertKind::User, name, role, &[], validity)
    }

    fn issue(
        &self,
        kind: CertKind,
        name: &str,
        role: Role,
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        check_name(kind, name)?;
        if validity.not_after <= validity.not_before {
            return Err(PkiError::InvalidValidity);
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // The DN is the CN alone: QEMU's `authz-simple` matches the peer's whole DN string,
        // and `CN=NAME` is the form an operator can predict.
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let mut sans = vec![
            SanType::URI(format!("{KIND_URI}{}", kind.as_str()).try_into()?),
            SanType::URI(format!("{ROLE_URI}{}", role.as_str()).try_into()?),
        ];
        if kind == CertKind::Host {
            sans.push(SanType::DnsName(name.to_string().try_into()?));
            sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        // QEMU (GnuTLS) insists on both bits for its server and client certificates.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match kind {
            CertKind::Host => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            CertKind::User => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.ca_key)?;
        let cert = params.signed_by(&key, &issuer)?;
        let identity = Identity::from_cert_der(cert.der())?;

        let d = self.dir.join(ISSUED).join(kind.as_str()).join(name);
        private_dir(&self.dir.join(ISSUED))?;
        private_dir(&self.dir.join(ISSUED).join(kind.as_str()))?;
        private_dir(&d)?;
        let cert_path = d.join(format!("{}-cert.pem", identity.serial));
        let key_path = d.join(format!("{}-key.pem", identity.serial));
        let key_pem = key.serialize_pem();
        write_private(&key_path, key_pem.as_bytes())?;
        write_public(&cert_path, cert.pem().as_bytes())?;
        // The newest becomes current; the previous one stays valid until it expires
        // (rotation without a flag day).
        write_private(&d.join("key.pem"), key_pem.as_bytes())?;
        write_public(&d.join("cert.pem"), cert.pem().as_bytes())?;
        tracing::info!(%identity, serial = %identity.serial, "issued certificate");
        Ok(IssuedCert {
            identity,
            cert_path,
            key_path,
            cert_pem: cert.pem(),
        })
    }

    /// Every certificate issued from this directory (all serials, current or not), sorted
    /// by kind, name and expiry.
    pub fn list(&self) -> Result<Vec<CertInfo>, PkiError> {
        let revoked = read_deny_list(&self.deny_list_path())?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut out = Vec::new();
        for kind in ["host", "user"] {
            let kdir = self.dir.join(ISSUED).join(kind);
            let Ok(names) = fs::read_dir(&kdir) else {
                continue;
            };
            for name in names {
                let name = name.map_err(PkiError::io("listing", &kdir))?;
                let ndir = name.path();
                let files = fs::read_dir(&ndir).map_err(PkiError::io("listing", &ndir))?;
                for f in files {
                    let path = f.map_err(PkiError::io("listing", &ndir))?.path();
                    let is_serial_cert = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with("-cert.pem"));
                    if !is_serial_cert {
                        continue;
                    }
                    let der = pem_cert_der(&path)?;
                    let (_, cert) =
                        X509Certificate::from_der(&der).map_err(|e| PkiError::Parse {
                            what: "certificate",
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    let identity = identity_of(&cert)?;
                    let not_after_unix = cert.validity().not_after.timestamp();
                    out.push(CertInfo {
                        revoked: revoked.contains(&identity.serial),
                        identity,
                        not_after_unix,
                        expired: not_after_unix < now,
                        path,
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            (a.identity.kind.as_str(), &a.identity.name, a.not_after_unix).cmp(&(
                b.identity.kind.as_str(),
                &b.identity.name,
                b.not_after_unix,
            ))
        });
        Ok(out)
    }

    /// Puts a serial on the deny list (idempotent). Servers reading the list refuse the
    /// certificate at their next handshake, without a restart. Returns the normalized serial.
    pub fn revoke(&self, serial: &str) -> Result<String, PkiError> {
        let serial = normalize_serial(serial)?;
        append_to_deny_list(&self.deny_list_path(), &serial)?;
        tracing::info!(%serial, "revoked certificate");
        Ok(serial)
    }

    /// Revokes the certificate in a PEM file (e.g. a lost laptop's `cert.pem`).
    pub fn revoke_cert_file(&self, path: &Path) -> Result<String, PkiError> {
        let der = pem_cert_der(path)?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| PkiError::Parse {
            what: "certificate",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.revoke(&crate::identity::hex_serial(cert.raw_serial()))
    }
}

/// Host and user names become file names and certificate names: keep them boring.
fn check_name(kind: CertKind, name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            what: kind.as_str(),
            name: name.to_string(),
        })
    }
}

/// 16 random bytes (RFC 5280 allows up to 20), top bit cleared so the integer is positive
/// and first byte non-zero so the hex form has no leading zeros to normalize.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x10;
    SerialNumber::from_slice(&bytes)
}

/// Certificates are public, but the directory they live in is 0700 anyway; 0644 lets a user
/// hand their certificate to a tool running under another account.
fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    write_private(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .map_err(PkiError::io("setting mode 0644 on", path))
}

/// The first certificate of a PEM file, DER.
pub(crate) fn pem_cert_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    let text = read_text(path)?;
    let mut reader = text.as_bytes();
    match rustls_pemfile::certs(&mut reader).next() {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(PkiError::Parse {
            what: "certificate",
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        None => Err(PkiError::Parse {
            what: "certificate",
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_with_the_rule_in_the_error() {
        assert!(check_name(CertKind::Host, "h1").is_ok());
        assert!(check_name(CertKind::Host, "node-1.example").is_ok());
        for bad in ["", "H1", "../x", "a/b", "-x", "a..b"] {
            let e = check_name(CertKind::User, bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("a-z"), "{e}");
        }
    }
}

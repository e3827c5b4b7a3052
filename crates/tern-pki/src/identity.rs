//! Who a peer is, read from its certificate.
//!
//! The identity travels in the certificate itself, as subject-alternative-name URIs
//! (`tern:kind:user`, `tern:role:operator`) next to the common name: the server needs no user
//! database, and a role can only change by issuing a new certificate (and revoking the old).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PkiError;

/// URI prefix of the SAN that names the certificate's kind.
pub(crate) const KIND_URI: &str = "tern:kind:";
/// URI prefix of the SAN that names the certificate's role.
pub(crate) const ROLE_URI: &str = "tern:role:";

/// What a certificate's holder may do.
///
/// Users are ordered `Viewer < Operator < Admin` (viewer reads; operator migrates, aborts,
/// force-completes, sets bandwidth, evacuates; admin changes host settings and creates or
/// stops VMs). `Host` is the role of agents: it is *not* on that ladder (an agent must not be
/// able to create VMs on another host), so it compares equal only to itself and
/// [`Role::allows`] grants it reads and the host-only routes (incoming migrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only access.
    Viewer,
    /// Migration control.
    Operator,
    /// Everything.
    Admin,
    /// A tern agent (host certificate): peer-to-peer calls such as incoming migrations.
    Host,
}

impl Role {
    /// The user roles, in increasing order of power.
    pub const USER_ROLES: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The name used in certificates, errors and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Host => "host",
        }
    }

    /// Whether a holder of `self` may use a route that needs `needed`.
    ///
    /// Host-only routes need `Host` exactly; hosts may also read (`Viewer`) so that a
    /// source agent can follow the destination's state. Users follow the ladder.
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Host, Role::Host | Role::Viewer) => true,
            (Role::Host, _) | (_, Role::Host) => false,
            (have, needed) => have >= needed,
        }
    }

    fn rank(self) -> Option<u8> {
        match self {
            Role::Viewer => Some(0),
            Role::Operator => Some(1),
            Role::Admin => Some(2),
            Role::Host => None,
        }
    }
}

impl PartialOrd for Role {
    /// Users compare on the ladder; `Host` is comparable only to itself.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        if self == other {
            return Some(Ordering::Equal);
        }
        Some(self.rank()?.cmp(&other.rank()?))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;
    /// Parses a *user* role: `host` is not accepted here because host certificates are
    /// issued with `tern pki issue host`, never as a user role.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(PkiError::UnknownRole(other.to_string())),
        }
    }
}

/// Whether a certificate belongs to a machine (agent) or a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    /// A tern agent on a host.
    Host,
    /// A person or a script acting for one.
    User,
}

impl CertKind {
    /// The name used in certificates and paths.
    pub fn as_str(self) -> &'static str {
        match self {
            CertKind::Host => "host",
            CertKind::User => "user",
        }
    }
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of a request, taken from its verified client certificate.
///
/// Put into every request's extensions by [`crate::serve_mtls`]; handlers take it as an axum
/// extractor (401 when absent, e.g. a router served without TLS by mistake).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The certificate's common name (host or user name).
    pub name: String,
    /// Host or user.
    pub kind: CertKind,
    /// What the holder may do (`Host` for host certificates).
    pub role: Role,
    /// The certificate's serial number (lowercase hex): audit records name the exact
    /// certificate, which matters when the same name has a rotated and an old certificate.
    pub serial: String,
    /// End of the certificate's validity, seconds since the Unix epoch: a keep-alive
    /// connection opened before expiry must not outlive the certificate.
    pub not_after_unix: i64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} (role {})", self.kind, self.name, self.role)
    }
}

impl Identity {
    /// The identity given to every request on a lab API served *without* TLS (plain HTTP on
    /// loopback, `tern lab up --agents`): an admin named `lab-plain-http`, so audit records
    /// and 403 messages say plainly that no certificate was involved. Insert it with
    /// `router.layer(axum::Extension(Identity::lab_without_tls()))`; never outside a lab.
    pub fn lab_without_tls() -> Identity {
        Identity {
            name: "lab-plain-http".to_string(),
            kind: CertKind::User,
            role: Role::Admin,
            serial: "none".to_string(),
            not_after_unix: i64::MAX,
        }
    }

    /// Whether the certificate has expired at `now`.
    pub fn expired_at(&self, now: std::time::SystemTime) -> bool {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        now > self.not_after_unix
    }

    /// Reads the tern identity from a DER certificate. The certificate must already be
    /// verified against the installation CA: this only parses.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, PkiError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| PkiError::NotTernIdentity(format!("not an X.509 certificate: {e}")))?;
        identity_of(&cert)
    }
}

pub(crate) fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, PkiError> {
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::NotTernIdentity("no common name".to_string()))?
        .to_string();
    let mut kind = None;
    let mut role = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::URI(uri) = gn {
                if let Some(k) = uri.strip_prefix(KIND_URI) {
                    kind = Some(match k {
                        "host" => CertKind::Host,
                        "user" => CertKind::User,
                        other => {
                            return Err(PkiError::NotTernIdentity(format!(
                                "unknown kind {other:?} (expected host or user)"
                            )));
                        }
                    });
                } else if let Some(r) = uri.strip_prefix(ROLE_URI) {
                    role = Some(match r {
                        "host" => Role::Host,
                        other => other.parse()?,
                    });
                }
            }
        }
    }
    let kind = kind.ok_or_else(|| {
        PkiError::NotTernIdentity(format!("{name:?} has no {KIND_URI}host|user name"))
    })?;
    let role =
        role.ok_or_else(|| PkiError::NotTernIdentity(format!("{name:?} has no {ROLE_URI} name")))?;
    // A host certificate with a user role (or the reverse) was not made by `tern pki`.
    if (kind == CertKind::Host) != (role == Role::Host) {
        return Err(PkiError::NotTernIdentity(format!(
            "{name:?}: kind {kind} does not match role {role}"
        )));
    }
    Ok(Identity {
        name,
        kind,
        role,
        serial: hex_serial(cert.raw_serial()),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// Lowercase hex of a serial's bytes, without leading zero bytes (the DER encoding may add
/// one to keep the integer positive).
pub(crate) fn hex_serial(raw: &[u8]) -> String {
    let trimmed: &[u8] = {
        let mut s = raw;
        while s.len() > 1 && s[0] == 0 {
            s = &s[1..];
        }
        s
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_roles_are_ordered_and_host_is_apart() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!(Role::Host.partial_cmp(&Role::Admin), None);
        assert!(Role::Admin.allows(Role::Operator));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(Role::Host.allows(Role::Host) && Role::Host.allows(Role::Viewer));
        assert!(!Role::Host.allows(Role::Operator));
        assert!(!Role::Admin.allows(Role::Host));
    }

    #[test]
    fn unknown_role_lists_the_valid_ones() {
        let e = "root".parse::<Role>().unwrap_err().to_string();
        assert!(
            e.contains("\"root\"") && e.contains("viewer|operator|admin"),
            "{e}"
        );
        assert!("host".parse::<Role>().is_err());
    }

    #[test]
    fn serial_hex_drops_the_sign_byte() {
        assert_eq!(hex_serial(&[0x00, 0x8a, 0x01]), "8a01");
        assert_eq!(hex_serial(&[0x00]), "00");
    }
}

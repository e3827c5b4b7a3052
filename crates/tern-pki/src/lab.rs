//! A throw-away PKI for a lab: one CA, a host certificate and a QEMU creds directory per lab
//! host, and an admin user certificate for the CLI. `tern demo --tls` and `tern lab up`
//! with TLS need exactly this, in one call.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::PkiError;
use crate::ca::{Pki, Validity};
use crate::files::TlsFiles;
use crate::identity::Role;
use crate::qemu::write_qemu_creds;

/// One lab host's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabHostTls {
    /// Host name (certificate CN and DNS SAN).
    pub name: String,
    /// The agent's certificate files (server and client).
    pub files: TlsFiles,
    /// The QEMU `tls-creds-x509` directory for this host's QEMUs.
    pub qemu_creds_dir: PathBuf,
}

/// Everything a TLS lab needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPki {
    /// The PKI directory (CA and issued certificates).
    pub dir: PathBuf,
    /// Per host, in the order given.
    pub hosts: Vec<LabHostTls>,
    /// An admin user (`lab-admin`) for the CLI.
    pub admin: TlsFiles,
}

/// Creates a CA in `dir/pki` and, for each `(name, addresses)`, a host certificate (valid 7
/// days: labs are short-lived) and a QEMU creds directory `dir/qemu-NAME`.
pub fn provision_lab(dir: &Path, hosts: &[(&str, Vec<IpAddr>)]) -> Result<LabPki, PkiError> {
    let pki_dir = dir.join("pki");
    let pki = Pki::init(&pki_dir)?;
    let mut out = Vec::new();
    for (name, ips) in hosts {
        pki.issue_host(name, ips, Validity::days(7))?;
        let files = TlsFiles::in_pki_dir(&pki_dir, "host", name);
        let qemu_creds_dir = dir.join(format!("qemu-{name}"));
        write_qemu_creds(&files, &qemu_creds_dir)?;
        out.push(LabHostTls {
            name: name.to_string(),
            files,
            qemu_creds_dir,
        });
    }
    pki.issue_user("lab-admin", Role::Admin, Validity::days(7))?;
    Ok(LabPki {
        admin: TlsFiles::in_pki_dir(&pki_dir, "user", "lab-admin"),
        dir: pki_dir,
        hosts: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_has_a_host_certificate_and_qemu_creds_per_host_and_an_admin() {
        let tmp = tempfile::tempdir().unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let lab = provision_lab(tmp.path(), &[("h1", vec![ip]), ("h2", vec![])]).unwrap();
        assert_eq!(lab.hosts.len(), 2);
        for h in &lab.hosts {
            assert!(crate::server_config(&h.files).is_ok());
            assert!(h.qemu_creds_dir.join("server-key.pem").is_file());
        }
        assert!(crate::client_config(&lab.admin).is_ok());
        let pki = Pki::open(&lab.dir).unwrap();
        let roles: Vec<Role> = pki
            .list()
            .unwrap()
            .iter()
            .map(|c| c.identity.role)
            .collect();
        assert_eq!(roles, [Role::Host, Role::Host, Role::Admin]);
    }
}

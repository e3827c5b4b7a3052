//! tern's own PKI and the mutual-TLS plumbing every tern API uses.
//!
//! One tern installation has one certificate authority ([`Pki::init`]). It issues
//! *host* certificates (agents: TLS server and client at once, since agents call each other)
//! and *user* certificates carrying a [`Role`]. Who is calling, and what they may do, is read
//! from the peer's certificate only ([`Identity::from_cert_der`]): there are no passwords or
//! tokens that could be replayed from a log.
//!
//! Why our own CA rather than the system's: a tern API must accept exactly the certificates
//! this installation issued, not any certificate a public CA signed for some name.
//!
//! Wiring an axum API with mTLS is three calls:
//! ```no_run
//! # async fn f(router: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
//! let files = tern_pki::TlsFiles::in_pki_dir("/etc/tern/pki".as_ref(), "host", "h1");
//! let config = tern_pki::server_config(&files)?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:7070").await?;
//! tern_pki::serve_mtls(listener, router, config).await?;
//! # Ok(()) }
//! ```
//! Handlers then take an [`Identity`] extractor; [`RequireRole`] guards routes (403 JSON
//! naming who, their role and the role needed) and [`AuditLayer`] records every mutating
//! request through an [`AuditSink`].

mod audit;
mod authz;
mod ca;
mod files;
mod identity;
mod lab;
mod qemu;
mod revocation;
mod serve;
mod tls;

pub use audit::{
    AuditLayer, AuditOutcome, AuditRecord, AuditService, AuditSink, AuditTarget, MemoryAuditSink,
};
pub use authz::{AuthzError, RequireRole, RequireRoleService, authorize};
pub use ca::{CertInfo, IssuedCert, Pki, Validity};
pub use files::{DEFAULT_PKI_DIR, TlsFiles};
pub use identity::{CertKind, Identity, Role};
pub use lab::{LabHostTls, LabPki, provision_lab};
pub use qemu::{QEMU_CREDS_FILES, write_qemu_creds};
pub use revocation::{DenyList, normalize_serial};
pub use serve::{serve_mtls, serve_mtls_until};
pub use tls::{ServerTls, client_config, reqwest_client_builder, server_config};

use std::path::PathBuf;

/// Errors of the PKI: files, certificate generation and parsing, bad names or roles.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file operation failed; `path` says which file.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What tern was doing.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `init` found an existing CA: overwriting it would invalidate every issued certificate.
    #[error(
        "a CA already exists in {}: refusing to overwrite it (every certificate it issued would stop working); use another --dir or remove it deliberately",
        .0.display()
    )]
    AlreadyInitialized(PathBuf),
    /// No CA in the directory.
    #[error("no tern CA in {}: run `tern pki init --dir {}` first", .0.display(), .0.display())]
    NotInitialized(PathBuf),
    /// A name that cannot be a certificate name.
    #[error(
        "invalid {what} name {name:?}: use 1-63 characters from a-z, 0-9, '-' and '.', starting with a letter or digit"
    )]
    InvalidName {
        /// "host" or "user".
        what: &'static str,
        /// The bad name.
        name: String,
    },
    /// An unknown role.
    #[error("unknown role {0:?}: valid roles are viewer|operator|admin")]
    UnknownRole(String),
    /// A serial number that is not hexadecimal.
    #[error(
        "invalid serial number {0:?}: expected hexadecimal digits (colons allowed), as printed by `tern pki list`"
    )]
    InvalidSerial(String),
    /// A validity period that ends before it starts.
    #[error("invalid validity: not_after must be later than not_before")]
    InvalidValidity,
    /// rcgen refused to build a certificate or key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate or key file could not be parsed.
    #[error("cannot parse {what} {}: {reason}", path.display())]
    Parse {
        /// "certificate", "private key", ...
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate that carries no tern identity (not issued by `tern pki`).
    #[error("certificate is not a tern identity: {0}")]
    NotTernIdentity(String),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl PkiError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> PkiError {
        let path = path.into();
        move |source| PkiError::Io {
            context,
            path,
            source,
        }
    }
}

//! rustls configurations for tern endpoints: only the installation CA is trusted, client
//! certificates are mandatory on servers, and revoked serials are refused on both sides.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::PkiError;
use crate::files::{TlsFiles, read_text};
use crate::identity::Identity;
use crate::revocation::DenyList;

/// The ring provider, explicitly: tern does not depend on a process-wide default provider
/// being installed (and does not build aws-lc).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let text = read_text(path)?;
    let certs = rustls_pemfile::certs(&mut text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Parse {
            what: "certificate",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Parse {
            what: "certificate",
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".to_string(),
        });
    }
    Ok(certs)
}

/// Loads a private key, refusing one that others can read (like ssh does): a key that has
/// been world-readable must be considered leaked.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let meta = std::fs::metadata(path).map_err(PkiError::io("reading", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::Parse {
            what: "private key",
            path: path.to_path_buf(),
            reason: format!(
                "mode {mode:04o} lets other users read it: run `chmod 600 {}` (and consider it leaked)",
                path.display()
            ),
        });
    }
    let text = read_text(path)?;
    match rustls_pemfile::private_key(&mut text.as_bytes()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(PkiError::Parse {
            what: "private key",
            path: path.to_path_buf(),
            reason: "no PRIVATE KEY block".to_string(),
        }),
        Err(e) => Err(PkiError::Parse {
            what: "private key",
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| PkiError::Parse {
            what: "CA certificate",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn tls_err(e: impl fmt::Display) -> PkiError {
    PkiError::Tls(e.to_string())
}

/// After the CA check passed: refuse revoked serials and certificates without a tern
/// identity (so every accepted connection has an [`Identity`]).
fn check_peer(
    end_entity: &CertificateDer<'_>,
    deny: Option<&DenyList>,
) -> Result<(), rustls::Error> {
    let identity = Identity::from_cert_der(end_entity).map_err(|e| {
        tracing::warn!(error = %e, "refused a certificate of our CA without a tern identity");
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    })?;
    if let Some(deny) = deny
        && let Err(reason) = deny.check(&identity.serial)
    {
        tracing::warn!(%identity, %reason, "refused certificate");
        return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(())
}

/// Client-certificate verifier: webpki against the installation CA (chain, validity
/// period, client-auth usage), then the deny list.
#[derive(Debug)]
struct TernClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    deny: Option<Arc<DenyList>>,
}

impl ClientCertVerifier for TernClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, self.deny.as_deref())?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server-certificate verifier: webpki against the installation CA (chain, validity, name),
/// then the deny list — a revoked agent certificate must not be able to impersonate a
/// destination either.
#[derive(Debug)]
struct TernServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    deny: Option<DenyList>,
}

impl ServerCertVerifier for TernServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_peer(end_entity, self.deny.as_ref())?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What [`crate::serve_mtls`] needs: the rustls configuration and the deny list it was
/// built with, so that requests on an already-open connection are re-checked (a revoked
/// client must not keep using a keep-alive connection opened before the revocation).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The rustls server configuration (usable with any rustls acceptor).
    pub config: Arc<ServerConfig>,
    /// The deny list the handshake verifier consults.
    pub deny_list: Option<Arc<DenyList>>,
}

/// A server configuration for a tern API: presents `files.cert`, *requires* a client
/// certificate signed by `files.ca_cert`, unexpired, not on `files.deny_list`, carrying a
/// tern identity. Anything else fails the handshake, before a single HTTP byte is read.
pub fn server_config(files: &TlsFiles) -> Result<ServerTls, PkiError> {
    let roots = load_roots(&files.ca_cert)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(tls_err)?;
    let deny_list = files.deny_list.as_ref().map(|p| Arc::new(DenyList::new(p)));
    let verifier = TernClientVerifier {
        inner,
        deny: deny_list.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(tls_err)?;
    // No session resumption: a resumed session skips the client-certificate check, so a
    // certificate revoked (or expired) after its first connection could come back through
    // a cached session. Full handshakes cost little at tern's request rates.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(ServerTls {
        config: Arc::new(config),
        deny_list,
    })
}

fn client_config_value(files: &TlsFiles) -> Result<ClientConfig, PkiError> {
    let roots = load_roots(&files.ca_cert)?;
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(tls_err)?;
    let verifier = TernServerVerifier {
        inner,
        deny: files.deny_list.as_ref().map(DenyList::new),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(tls_err)?;
    // The servers speak HTTP/1.1 only (see `serve_mtls`).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration: presents `files.cert` and accepts only servers with a
/// certificate of the installation CA for the name or address connected to.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, PkiError> {
    Ok(Arc::new(client_config_value(files)?))
}

/// A `reqwest` client builder with this identity and only the installation CA as root, for
/// the CLI and agent-to-agent calls. Set timeouts on the builder, then `build()`.
pub fn reqwest_client_builder(files: &TlsFiles) -> Result<reqwest::ClientBuilder, PkiError> {
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(client_config_value(files)?)
        .https_only(true))
}

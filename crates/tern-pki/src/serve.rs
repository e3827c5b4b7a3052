//! Serving any axum `Router` over mutual TLS, with the caller's [`Identity`] in every
//! request's extensions.
//!
//! `axum::serve` only takes plain TCP listeners; the TLS handshake (and with it the client
//! certificate check) happens here, per connection, before hyper sees a byte. A peer that
//! fails the handshake never reaches a handler.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::identity::Identity;
use crate::revocation::DenyList;
use crate::tls::ServerTls;

/// A peer that has not finished its handshake by then is dropped (slow-loris protection: a
/// handshake costs us a task and a socket).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` with mTLS until the future is dropped.
///
/// Each request carries the peer's [`Identity`] and `ConnectInfo<SocketAddr>` as request
/// extensions. Refused handshakes (no certificate, another CA, expired, revoked) are logged
/// at debug level with the peer address and reason and cost nothing else. Every request is
/// checked against the deny list and the certificate's expiry again: a certificate revoked
/// or expired while its keep-alive connection is open gets 401 and the connection is closed.
///
/// Connections already accepted run on their own tasks and end with their peers.
pub async fn serve_mtls(
    listener: TcpListener,
    router: Router,
    tls: ServerTls,
) -> std::io::Result<()> {
    serve_mtls_until(listener, router, tls, std::future::pending()).await
}

/// [`serve_mtls`] that stops accepting when `shutdown` completes.
pub async fn serve_mtls_until(
    listener: TcpListener,
    router: Router,
    tls: ServerTls,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.config);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return Ok(()),
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Per-connection errors (ECONNABORTED, EMFILE) must not stop the server;
                // back off a little so that EMFILE does not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(
            acceptor.clone(),
            router.clone(),
            tls.deny_list.clone(),
            tcp,
            peer,
        ));
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    router: Router,
    deny_list: Option<Arc<DenyList>>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // The verifier already refused certificates without a tern identity; this cannot fail
    // for a completed handshake, but if it does the connection is dropped, not served.
    let identity = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Identity::from_cert_der(c))
    {
        Some(Ok(i)) => i,
        Some(Err(e)) => {
            tracing::warn!(%peer, error = %e, "peer certificate has no tern identity");
            return;
        }
        None => {
            tracing::warn!(%peer, "handshake completed without a client certificate");
            return;
        }
    };
    tracing::debug!(%peer, %identity, "mTLS connection");
    let service = hyper::service::service_fn(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            let refused = if identity.expired_at(std::time::SystemTime::now()) {
                Some(format!(
                    "certificate serial {} has expired",
                    identity.serial
                ))
            } else {
                deny_list
                    .as_ref()
                    .and_then(|d| d.check(&identity.serial).err())
            };
            req.extensions_mut().insert(identity.clone());
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                if let Some(reason) = refused {
                    tracing::warn!(%peer, %reason, "request on a connection whose certificate is now refused");
                    let mut r = (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({ "error": reason })),
                    )
                        .into_response();
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return Ok(r);
                }
                router.oneshot(req.map(axum::body::Body::new)).await
            }
        },
    );
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

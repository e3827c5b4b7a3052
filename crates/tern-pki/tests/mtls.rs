//! mTLS end to end: real rustls on real TCP sockets on 127.0.0.1, certificates from a real
//! `Pki`, an axum router served by `serve_mtls`. No root needed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use rustls::pki_types::ServerName;
use tern_pki::{
    AuditLayer, AuditOutcome, AuditTarget, CertKind, Identity, IssuedCert, MemoryAuditSink, Pki,
    RequireRole, Role, TlsFiles, Validity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A server task on 127.0.0.1 that is aborted when the test ends, on every path.
struct Server {
    addr: SocketAddr,
    handled: Arc<AtomicUsize>,
    audit: Arc<MemoryAuditSink>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn whoami(State(handled): State<Arc<AtomicUsize>>, identity: Identity) -> Json<Identity> {
    handled.fetch_add(1, Ordering::SeqCst);
    Json(identity)
}

async fn migrate(State(handled): State<Arc<AtomicUsize>>, identity: Identity) -> impl IntoResponse {
    handled.fetch_add(1, Ordering::SeqCst);
    let mut r = Json(serde_json::json!({ "started_by": identity.name })).into_response();
    r.extensions_mut().insert(AuditTarget("vm web".to_string()));
    r
}

async fn incoming(State(handled): State<Arc<AtomicUsize>>) -> &'static str {
    handled.fetch_add(1, Ordering::SeqCst);
    "ok"
}

/// The shape of an agent's route table: reads for viewers, mutations for operators,
/// destination-only routes for hosts; audit outermost.
fn router(handled: Arc<AtomicUsize>, audit: Arc<MemoryAuditSink>) -> Router {
    let reads = Router::new()
        .route("/whoami", get(whoami))
        .route_layer(RequireRole::new(Role::Viewer));
    let mutations = Router::new()
        .route("/v1/migrations", post(migrate))
        .route_layer(RequireRole::new(Role::Operator));
    let host_only = Router::new()
        .route("/v1/incoming", post(incoming))
        .route_layer(RequireRole::host());
    reads
        .merge(mutations)
        .merge(host_only)
        .with_state(handled)
        .layer(AuditLayer::new(audit))
}

async fn start(pki_dir: &Path) -> Server {
    let config = tern_pki::server_config(&TlsFiles::in_pki_dir(pki_dir, "host", "h1")).unwrap();
    let listener = tokio::net::TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let audit = Arc::new(MemoryAuditSink::default());
    let app = router(handled.clone(), audit.clone());
    let task = tokio::spawn(tern_pki::serve_mtls(listener, app, config));
    Server {
        addr,
        handled,
        audit,
        task,
    }
}

fn setup() -> (tempfile::TempDir, Pki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki")).unwrap();
    pki.issue_host("h1", &[LOCALHOST], Validity::days(30))
        .unwrap();
    (dir, pki)
}

/// The files of one specific issued certificate (not necessarily the current one).
fn files_of(pki: &Pki, cert: &IssuedCert) -> TlsFiles {
    TlsFiles {
        ca_cert: pki.ca_cert_path(),
        cert: cert.cert_path.clone(),
        key: cert.key_path.clone(),
        deny_list: Some(pki.deny_list_path()),
    }
}

/// A fresh client (fresh connection pool: every call is a new handshake).
fn client(files: &TlsFiles) -> reqwest::Client {
    tern_pki::reqwest_client_builder(files)
        .unwrap()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn url(s: &Server, path: &str) -> String {
    format!("https://{}{path}", s.addr)
}

/// Speaks TLS with `config` and sends one request; returns the HTTP response text or the
/// error, so that tests can assert the exact alert the server sent.
async fn raw_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(ServerName::IpAddress(LOCALHOST.into()), tcp)
        .await
        .map_err(|e| format!("{e:?}"))?;
    tls.write_all(b"GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out)
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn expired() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(2 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    }
}

#[tokio::test]
async fn valid_user_and_host_certificates_are_accepted_with_their_identity() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let alice = pki
        .issue_user("alice", Role::Operator, Validity::days(1))
        .unwrap();
    let r = client(&files_of(&pki, &alice))
        .get(url(&server, "/whoami"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Identity = r.json().await.unwrap();
    assert_eq!(seen.name, "alice");
    assert_eq!(seen.kind, CertKind::User);
    assert_eq!(seen.role, Role::Operator);
    assert_eq!(seen.serial, alice.identity.serial);

    let h2 = pki
        .issue_host("h2", &[LOCALHOST], Validity::days(1))
        .unwrap();
    let c = client(&files_of(&pki, &h2));
    let seen: Identity = c
        .get(url(&server, "/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (seen.name.as_str(), seen.kind, seen.role),
        ("h2", CertKind::Host, Role::Host)
    );
    // Destination-only route: a host may, an admin user may not.
    assert_eq!(
        c.post(url(&server, "/v1/incoming"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let admin = pki
        .issue_user("root-ops", Role::Admin, Validity::days(1))
        .unwrap();
    let r = client(&files_of(&pki, &admin))
        .post(url(&server, "/v1/incoming"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(server.handled.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn handshake_without_client_certificate_is_refused() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca_cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let e = raw_request(server.addr, Arc::new(config))
        .await
        .unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_both_ways() {
    let (d, pki) = setup();
    let server = start(pki.dir()).await;
    let other = Pki::init(&d.path().join("other")).unwrap();
    let mallory = other
        .issue_user("alice", Role::Admin, Validity::days(1))
        .unwrap();
    let config = tern_pki::client_config(&files_of(&other, &mallory)).unwrap();
    // Our client refuses their server first (it does not know their CA) ...
    let e = raw_request(server.addr, config).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // ... and their client, trusting our CA for the server, is refused by the server.
    let theirs_trusting_us = TlsFiles {
        ca_cert: pki.ca_cert_path(),
        cert: mallory.cert_path.clone(),
        key: mallory.key_path.clone(),
        deny_list: None,
    };
    let e = raw_request(
        server.addr,
        tern_pki::client_config(&theirs_trusting_us).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("UnknownCA") || e.contains("BadCertificate"),
        "{e}"
    );
    assert!(
        client(&theirs_trusting_us)
            .get(url(&server, "/whoami"))
            .send()
            .await
            .is_err()
    );
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let old = pki.issue_user("bob", Role::Admin, expired()).unwrap();
    let e = raw_request(
        server.addr,
        tern_pki::client_config(&files_of(&pki, &old)).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(e.contains("CertificateExpired"), "{e}");
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
    let listed = pki.list().unwrap();
    assert!(
        listed
            .iter()
            .any(|c| c.identity.serial == old.identity.serial && c.expired)
    );
}

#[tokio::test]
async fn revocation_takes_effect_without_restart_and_rotation_keeps_both_valid() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let first = pki
        .issue_user("carol", Role::Viewer, Validity::days(1))
        .unwrap();
    let second = pki
        .issue_user("carol", Role::Viewer, Validity::days(2))
        .unwrap();
    assert_ne!(first.identity.serial, second.identity.serial);
    // Rotation: both certificates work until one expires or is revoked.
    for c in [&first, &second] {
        let r = client(&files_of(&pki, c))
            .get(url(&server, "/whoami"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The current files are the newest certificate.
    let current = TlsFiles::in_pki_dir(pki.dir(), "user", "carol");
    let seen: Identity = client(&current)
        .get(url(&server, "/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen.serial, second.identity.serial);

    // Revoke the old one by its file; the running server refuses it at the next handshake.
    let serial = pki.revoke_cert_file(&first.cert_path).unwrap();
    assert_eq!(serial, first.identity.serial);
    let e = raw_request(
        server.addr,
        tern_pki::client_config(&files_of(&pki, &first)).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(e.contains("CertificateRevoked"), "{e}");
    let r = client(&files_of(&pki, &second))
        .get(url(&server, "/whoami"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed = pki.list().unwrap();
    let revoked: Vec<_> = listed
        .iter()
        .filter(|c| c.revoked)
        .map(|c| c.identity.serial.clone())
        .collect();
    assert_eq!(revoked, std::slice::from_ref(&first.identity.serial));
}

#[tokio::test]
async fn viewer_gets_403_on_a_mutating_route_operator_200_and_both_are_audited() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let viewer = pki
        .issue_user("vera", Role::Viewer, Validity::days(1))
        .unwrap();
    let operator = pki
        .issue_user("otto", Role::Operator, Validity::days(1))
        .unwrap();

    let r = client(&files_of(&pki, &viewer))
        .post(url(&server, "/v1/migrations"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("\"vera\"")
            && msg.contains("role viewer")
            && msg.contains("needs role operator"),
        "{msg}"
    );
    assert_eq!(
        server.handled.load(Ordering::SeqCst),
        0,
        "the refused call reached the handler"
    );

    let c = client(&files_of(&pki, &operator));
    let r = c.post(url(&server, "/v1/migrations")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.handled.load(Ordering::SeqCst), 1);
    // Reads are not audited.
    assert_eq!(
        c.get(url(&server, "/whoami"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let records = server.audit.records();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].identity.as_deref(), Some("vera"));
    assert_eq!(records[0].role, Some(Role::Viewer));
    assert_eq!(records[0].outcome, AuditOutcome::Refused);
    assert_eq!(records[0].status, 403);
    assert_eq!(records[1].identity.as_deref(), Some("otto"));
    assert_eq!(
        records[1].serial.as_deref(),
        Some(operator.identity.serial.as_str())
    );
    assert_eq!(
        (records[1].method.as_str(), records[1].path.as_str()),
        ("POST", "/v1/migrations")
    );
    assert_eq!(records[1].target.as_deref(), Some("vm web"));
    assert_eq!(records[1].outcome, AuditOutcome::Succeeded);
}

#[test]
fn keys_are_0600_in_0700_directories_and_open_keys_are_refused() {
    let (_d, pki) = setup();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(pki.dir()), 0o700);
    assert_eq!(mode(&pki.dir().join("ca-key.pem")), 0o600);
    let u = pki
        .issue_user("dan", Role::Viewer, Validity::days(1))
        .unwrap();
    assert_eq!(mode(&u.key_path), 0o600);
    assert_eq!(mode(u.key_path.parent().unwrap()), 0o700);
    assert_eq!(mode(&pki.dir().join("issued")), 0o700);
    let current = TlsFiles::in_pki_dir(pki.dir(), "user", "dan");
    assert_eq!(mode(&current.key), 0o600);

    let creds = pki.dir().join("qemu-h1");
    tern_pki::write_qemu_creds(&TlsFiles::in_pki_dir(pki.dir(), "host", "h1"), &creds).unwrap();
    assert_eq!(mode(&creds), 0o700);
    for f in tern_pki::QEMU_CREDS_FILES {
        assert_eq!(mode(&creds.join(f)), 0o600, "{f}");
    }

    std::fs::set_permissions(&current.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = tern_pki::client_config(&current).unwrap_err().to_string();
    assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");

    // Debug output never carries key material.
    let dbg = format!("{pki:?} {u:?}");
    assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
}

#[test]
fn init_refuses_to_overwrite_and_bad_input_names_what_is_valid() {
    let (_d, pki) = setup();
    let e = Pki::init(pki.dir()).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = pki
        .issue_user("Alice Smith", Role::Viewer, Validity::days(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"Alice Smith\"") && e.contains("a-z"), "{e}");
    let e = pki.revoke("not-hex").unwrap_err().to_string();
    assert!(
        e.contains("\"not-hex\"") && e.contains("hexadecimal"),
        "{e}"
    );
    let e = Pki::open(&pki.dir().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tern pki init"), "{e}");
    let reopened = Pki::open(pki.dir()).unwrap();
    assert!(reopened.issue_host("h3", &[], Validity::days(1)).is_ok());
}

#[tokio::test]
async fn agent_to_agent_by_host_name_verifies_the_name() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    pki.issue_host("h2", &[], Validity::days(1)).unwrap();
    let h2 = TlsFiles::in_pki_dir(pki.dir(), "host", "h2");
    // h1's certificate carries the DNS name h1: reaching it as h1 works ...
    let c = tern_pki::reqwest_client_builder(&h2)
        .unwrap()
        .resolve("h1", server.addr)
        .build()
        .unwrap();
    let r = c
        .post(format!("https://h1:{}/v1/incoming", server.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // ... but a peer that expected h3 and reached h1 refuses it (no host can pose as another).
    let c = tern_pki::reqwest_client_builder(&h2)
        .unwrap()
        .resolve("h3", server.addr)
        .build()
        .unwrap();
    let e = c
        .post(format!("https://h3:{}/v1/incoming", server.addr.port()))
        .send()
        .await
        .unwrap_err();
    let chain = format!("{e:?}");
    assert!(chain.contains("NotValidForName"), "{chain}");
    assert_eq!(server.handled.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn router_without_identity_answers_401_and_lab_identity_is_explicit() {
    use tower::ServiceExt;
    let handled = Arc::new(AtomicUsize::new(0));
    let audit = Arc::new(MemoryAuditSink::default());
    let app = router(handled.clone(), audit.clone());
    let req = || {
        axum::http::Request::post("/v1/migrations")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let r = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(r.status(), 401);
    let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("certificate"), "{v}");
    assert_eq!(handled.load(Ordering::SeqCst), 0);

    let lab = app.layer(axum::Extension(Identity::lab_without_tls()));
    assert_eq!(lab.oneshot(req()).await.unwrap().status(), 200);
    let records = audit.records();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].identity, None);
    assert_eq!(records[1].identity.as_deref(), Some("lab-plain-http"));
}

#[tokio::test]
async fn revocation_also_stops_an_open_keep_alive_connection() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let erin = pki
        .issue_user("erin", Role::Operator, Validity::days(1))
        .unwrap();
    // One client: its pool keeps the connection open between requests.
    let c = client(&files_of(&pki, &erin));
    assert_eq!(
        c.get(url(&server, "/whoami"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    pki.revoke(&erin.identity.serial).unwrap();
    let r = c.post(url(&server, "/v1/migrations")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    assert_eq!(
        server.handled.load(Ordering::SeqCst),
        1,
        "the revoked call reached a handler"
    );
    // The next attempt needs a new handshake, which is refused.
    assert!(c.get(url(&server, "/whoami")).send().await.is_err());
}

#[tokio::test]
async fn a_certificate_expiring_on_an_open_connection_is_refused_from_then_on() {
    let (_d, pki) = setup();
    let server = start(pki.dir()).await;
    let now = SystemTime::now();
    let short = Validity {
        not_before: now - Duration::from_secs(60),
        not_after: now + Duration::from_secs(2),
    };
    let fay = pki.issue_user("fay", Role::Operator, short).unwrap();
    let c = client(&files_of(&pki, &fay));
    assert_eq!(
        c.get(url(&server, "/whoami"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Wait for the clock, not for a fixed time: until the certificate has expired.
    while !fay.identity.expired_at(SystemTime::now()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c.post(url(&server, "/v1/migrations")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    assert_eq!(server.handled.load(Ordering::SeqCst), 1);
}

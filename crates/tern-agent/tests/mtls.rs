//! The agent API over mutual TLS with roles (issue 10, item 2): a real agent (no VMs) served
//! by `tern_agent::http::serve` on 127.0.0.1 with a `[tls]` section, certificates made by
//! tern-pki in a temporary directory, and real rustls clients. Every refusal must leave the
//! agent unchanged (no migration recorded).
//!
//! Needs QEMU (an agent refuses to start without it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use tern_agent::{Agent, AgentConfig, AgentOptions};
use tern_pki::{IssuedCert, Pki, Role, TlsFiles, Validity};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// An agent served with mTLS; stopped when dropped (also on a failed assertion).
struct TlsAgent {
    addr: SocketAddr,
    pki: Pki,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), tern_agent::AgentError>>>,
}

impl Drop for TlsAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl TlsAgent {
    async fn start() -> Self {
        if let Err(e) = tern_qemu::QemuBinary::locate() {
            panic!("this test needs QEMU (an agent refuses to start without it): {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki")).unwrap();
        pki.issue_host("t1", &[LOCALHOST], Validity::days(1))
            .unwrap();
        let cfg = AgentConfig::from_toml(
            &format!(
                "host = \"t1\"\nlisten = \"127.0.0.1:0\"\nmigration_address = \"127.0.0.1\"\n\
                 memory_mib = 512\nruntime_dir = \"{}\"\n[tls]\npki_dir = \"{}\"\n",
                dir.path().join("rt").display(),
                pki.dir().display()
            ),
            "test",
        )
        .unwrap();
        let agent = Agent::start(cfg, AgentOptions::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tern_agent::http::serve(agent, listener, async {
            let _ = stop_rx.await;
        }));
        Self {
            addr,
            pki,
            dir,
            stop: Some(stop_tx),
            server: Some(server),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn files(&self, cert: &IssuedCert) -> TlsFiles {
        TlsFiles {
            ca_cert: self.pki.ca_cert_path(),
            cert: cert.cert_path.clone(),
            key: cert.key_path.clone(),
            deny_list: None,
        }
    }

    fn user(&self, name: &str, role: Role) -> reqwest::Client {
        let cert = self.pki.issue_user(name, role, Validity::days(1)).unwrap();
        client(&self.files(&cert))
    }

    fn host(&self, name: &str) -> reqwest::Client {
        let cert = self
            .pki
            .issue_host(name, &[LOCALHOST], Validity::days(1))
            .unwrap();
        client(&self.files(&cert))
    }

    /// The migrations the agent has recorded, read as an admin.
    async fn migrations(&self) -> Vec<Value> {
        let admin = self.user("audit-reader", Role::Admin);
        let resp = admin.get(self.url("/v1/migrations")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Vec<Value>>().await.unwrap()
    }
}

fn client(files: &TlsFiles) -> reqwest::Client {
    tern_pki::reqwest_client_builder(files)
        .unwrap()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_certificate_is_refused_in_the_handshake() {
    let a = TlsAgent::start().await;
    let ca = reqwest::Certificate::from_pem(a.pki.ca_cert_pem().as_bytes()).unwrap();
    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let e = anonymous
        .get(a.url("/v1/vms"))
        .send()
        .await
        .expect_err("a client without a certificate must not get an answer");
    assert!(e.status().is_none(), "no HTTP status may come back: {e:?}");
    // The same request with a certificate of the CA is answered (the refusal is the
    // missing certificate, not an unreachable server).
    let r = a
        .user("vera", Role::Viewer)
        .get(a.url("/v1/vms"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port gets nothing either.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = plain.get(format!("http://{}/v1/vms", a.addr)).send().await;
    assert!(r.is_err() || r.unwrap().status() != 200);
    let _keep = &a.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let a = TlsAgent::start().await;
    let other = Pki::init(&a.dir.path().join("other")).unwrap();
    let mallory = other
        .issue_user("mallory", Role::Admin, Validity::days(1))
        .unwrap();
    // Mallory trusts our CA for the server, but her certificate is signed by hers.
    let files = TlsFiles {
        ca_cert: a.pki.ca_cert_path(),
        cert: mallory.cert_path.clone(),
        key: mallory.key_path.clone(),
        deny_list: None,
    };
    let e = client(&files)
        .post(a.url("/v1/migrations"))
        .json(&json!({"vm": "web", "to_host": "t2"}))
        .send()
        .await
        .expect_err("a foreign CA's certificate must be refused");
    assert!(e.status().is_none(), "{e:?}");
    assert!(a.migrations().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reads_but_cannot_migrate_and_an_operator_reaches_abort() {
    let a = TlsAgent::start().await;
    let viewer = a.user("vera", Role::Viewer);
    let r = viewer.get(a.url("/v1/vms")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = viewer
        .post(a.url("/v1/migrations"))
        .json(&json!({"vm": "web", "to_host": "t2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("vera") && text.contains("viewer") && text.contains("operator"),
        "the refusal names who, their role and the role needed: {text}"
    );
    assert!(
        a.migrations().await.is_empty(),
        "a refused call started something"
    );
    let r = viewer
        .post(a.url("/v1/migrations/nope/abort"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let operator = a.user("otto", Role::Operator);
    let r = operator
        .post(a.url("/v1/migrations/nope/abort"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the operator reaches the handler");
    assert!(r.text().await.unwrap().contains("nope"));
    // VM creation needs an admin.
    let r = operator
        .post(a.url("/v1/vms"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_routes_take_host_certificates_only() {
    let a = TlsAgent::start().await;
    let admin = a.user("ada", Role::Admin);
    for path in ["/v1/incoming/nope/status", "/v1/incoming/nope/facts"] {
        let r = admin.get(a.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains("ada") && text.contains("host"), "{text}");
    }
    let r = admin
        .post(a.url("/v1/incoming/nope/promote"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let peer = a.host("t2");
    let r = peer
        .get(a.url("/v1/incoming/nope/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a host certificate reaches the handler");
    // A host may read, but not act as an operator.
    let r = peer.get(a.url("/v1/vms")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = peer
        .post(a.url("/v1/migrations/nope/abort"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// The issue's first exploit: an agent configured to listen on every address without TLS.
#[test]
fn a_non_loopback_listen_without_tls_is_refused_at_start() {
    let e = AgentConfig::from_toml(
        "host = \"t1\"\nlisten = \"0.0.0.0:7701\"\nmigration_address = \"127.0.0.1\"\n\
         memory_mib = 512\n",
        "agent.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("0.0.0.0:7701") && e.contains("[tls]"), "{e}");
}

/// Agent-to-agent: with `[tls]`, an `https://` peer is called with this host's certificate,
/// which the peer's host-only routes accept; without `[tls]` an `https://` peer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_agent_is_called_with_the_host_certificate() {
    let a = TlsAgent::start().await;
    let cert = a
        .pki
        .issue_host("t2", &[LOCALHOST], Validity::days(1))
        .unwrap();
    let files = a.files(&cert);
    let peer = tern_agent::remote::AgentClient::for_peer(&a.url(""), Some(&files)).unwrap();
    let facts = peer.host().await.unwrap();
    assert_eq!(facts.host, "t1");
    let e = peer.delete_incoming("nope").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "host-only route reached: {e}");

    let e = tern_agent::remote::AgentClient::for_peer(&a.url(""), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("https://") && e.contains("[tls]"), "{e}");
    let e = AgentConfig::from_toml(
        "host = \"t1\"\nlisten = \"127.0.0.1:7701\"\nmigration_address = \"127.0.0.1\"\n\
         memory_mib = 512\n[peers]\nt2 = \"https://127.0.0.1:7702\"\n",
        "agent.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("t2") && e.contains("[tls]"), "{e}");
}

/// Issue 10, item 5: every mutating request is in the agent's audit log with the name and
/// role of the certificate that made it, refused ones included; reads are not recorded; the
/// log itself is for admins. A refused call changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_requests_are_audited_with_the_callers_name_and_refusals_change_nothing() {
    let a = TlsAgent::start().await;
    let viewer = a.user("vera", Role::Viewer);
    let operator = a.user("olga", Role::Operator);
    let admin = a.user("ada", Role::Admin);
    let body = json!({"vm": "web", "to_host": "t2"});
    let r = viewer
        .post(a.url("/v1/migrations"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The operator may migrate; this host has no VM `web`, so the agent refuses it (404).
    let r = operator
        .post(a.url("/v1/migrations"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    let r = operator
        .post(a.url("/v1/migrations/web-1/abort"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A read is not an action.
    let r = viewer.get(a.url("/v1/vms")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Only admins read the log.
    let r = viewer.get(a.url("/v1/audit")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(a.migrations().await.is_empty(), "refusals changed nothing");

    let r = admin.get(a.url("/v1/audit?limit=50")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let log: Vec<Value> = r.json().await.unwrap();
    let entries: Vec<(String, String, String, String, u64)> = log
        .iter()
        .map(|e| {
            (
                e["identity"].as_str().unwrap_or("").to_string(),
                e["role"].as_str().unwrap_or("").to_string(),
                format!(
                    "{} {}",
                    e["method"].as_str().unwrap_or(""),
                    e["path"].as_str().unwrap_or("")
                ),
                e["outcome"].as_str().unwrap_or("").to_string(),
                e["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let expect = |who: &str, role: &str, req: &str, outcome: &str, status: u64| {
        assert!(
            entries.contains(&(who.into(), role.into(), req.into(), outcome.into(), status)),
            "{who} {req} {status} missing from the audit log: {log:#?}"
        );
    };
    expect("vera", "viewer", "POST /v1/migrations", "refused", 403);
    expect("olga", "operator", "POST /v1/migrations", "refused", 404);
    expect(
        "olga",
        "operator",
        "POST /v1/migrations/web-1/abort",
        "refused",
        404,
    );
    assert!(
        log.iter().all(|e| e["method"] != "GET"),
        "reads are not audited: {log:#?}"
    );
    let abort = log
        .iter()
        .find(|e| e["path"] == "/v1/migrations/web-1/abort")
        .unwrap();
    assert_eq!(abort["target"], "migration web-1");
    assert!(abort["serial"].as_str().is_some_and(|s| !s.is_empty()));
}

/// `migration_tls = "required"` (the default with `[tls]`) needs the host certificate for
/// QEMU: an agent whose certificate was never issued refuses to start, and says how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_migration_tls_without_a_host_certificate_refuses_to_start() {
    if let Err(e) = tern_qemu::QemuBinary::locate() {
        panic!("this test needs QEMU (an agent refuses to start without it): {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki")).unwrap();
    let cfg = AgentConfig::from_toml(
        &format!(
            "host = \"t9\"\nlisten = \"127.0.0.1:0\"\nmigration_address = \"127.0.0.1\"\n\
             memory_mib = 512\nruntime_dir = \"{}\"\n[tls]\npki_dir = \"{}\"\n",
            dir.path().join("rt").display(),
            pki.dir().display()
        ),
        "test",
    )
    .unwrap();
    let e = match Agent::start(cfg, AgentOptions::default()).await {
        Ok(_) => panic!("an agent without its host certificate must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("migration_tls = \"required\"")
            && e.contains("tern pki issue host t9")
            && e.contains("migration_tls = \"off\""),
        "{e}"
    );
}

//! The controller over mutual TLS on 127.0.0.1: real rustls, certificates of a `tern pki` CA
//! in a temp dir, roles per route, identity in the audit log.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use common::{FakeAgent, heartbeat_body};
use serde_json::{Value, json};
use tern_pki::{Pki, Role, TlsFiles, Validity};
use tern_server::config::TlsSection;
use tern_server::{RunningServer, ServerConfig, ServerError};

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

struct TlsHarness {
    dir: tempfile::TempDir,
    pki: Pki,
    server: RunningServer,
    agent: FakeAgent,
}

impl TlsHarness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki")).unwrap();
        pki.issue_host("controller", &[LOCALHOST], Validity::days(1))
            .unwrap();
        for h in ["h1", "h2"] {
            pki.issue_host(h, &[LOCALHOST], Validity::days(1)).unwrap();
        }
        for (name, role) in [
            ("vera", Role::Viewer),
            ("otto", Role::Operator),
            ("ada", Role::Admin),
        ] {
            pki.issue_user(name, role, Validity::days(1)).unwrap();
        }
        let agent = FakeAgent::start().await;
        let agents: BTreeMap<String, String> = ["h1", "h2"]
            .iter()
            .map(|h| (h.to_string(), agent.url.clone()))
            .collect();
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            database: dir.path().join("state/controller.db").display().to_string(),
            token_file: dir.path().join("state/controller.token"),
            heartbeat_timeout_s: 30,
            runner_tick_ms: 50,
            agents,
            tls: Some(TlsSection {
                pki_dir: Some(dir.path().join("pki")),
                name: None,
                cert: None,
                key: None,
                ca: None,
                deny_list: None,
                agent_client_user: None,
            }),
            ha: Default::default(),
        };
        let server = RunningServer::start(config).await.unwrap();
        assert!(server.url().starts_with("https://"));
        assert!(server.token.is_none(), "no token with mutual TLS");
        assert!(
            !dir.path().join("state/controller.token").exists(),
            "no token file is created with mutual TLS"
        );
        Self {
            dir,
            pki,
            server,
            agent,
        }
    }

    fn files(&self, kind: &str, name: &str) -> TlsFiles {
        TlsFiles::in_pki_dir(&self.dir.path().join("pki"), kind, name)
    }

    /// A fresh client (its own connection pool: every client does its own handshake).
    fn client(&self, kind: &str, name: &str) -> reqwest::Client {
        client_of(&self.files(kind, name))
    }

    async fn call(
        &self,
        who: &reqwest::Client,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = who.request(m, format!("{}{path}", self.server.url()));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn ok(
        &self,
        who: &reqwest::Client,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(who, method, path, body).await.unwrap()
    }
}

fn client_of(files: &TlsFiles) -> reqwest::Client {
    tern_pki::reqwest_client_builder(files)
        .unwrap()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_of_the_ca_are_refused_in_the_handshake() {
    let h = TlsHarness::start().await;
    let url = format!("{}/v1/hosts", h.server.url());

    // No client certificate at all (the client trusts anything, so only the server refuses).
    let anonymous = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(anonymous.get(&url).send().await.is_err());

    // A certificate of another CA, presented by a client that trusts our CA.
    let other = Pki::init(&h.dir.path().join("other-pki")).unwrap();
    let mallory = other
        .issue_user("mallory", Role::Admin, Validity::days(1))
        .unwrap();
    let foreign = TlsFiles {
        ca_cert: h.pki.ca_cert_path(),
        cert: mallory.cert_path.clone(),
        key: mallory.key_path.clone(),
        deny_list: None,
    };
    assert!(client_of(&foreign).get(&url).send().await.is_err());

    // Plain HTTP is not served either.
    let plain = url.replacen("https://", "http://", 1);
    let plain_client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(plain_client.get(&plain).send().await.is_err());

    // The installation's own viewer gets in.
    let (s, v) = h
        .ok(&h.client("user", "vera"), "GET", "/v1/hosts", None)
        .await;
    assert_eq!(s, 200, "{v}");

    // A revoked user is refused from the next handshake on.
    let ada = h.client("user", "ada");
    assert_eq!(h.ok(&ada, "GET", "/v1/hosts", None).await.0, 200);
    h.pki
        .revoke_cert_file(&h.files("user", "ada").cert)
        .unwrap();
    assert!(
        h.call(&h.client("user", "ada"), "GET", "/v1/hosts", None)
            .await
            .is_err()
    );
    // Nothing that got through the handshakes above was a mutation.
    let log = h.server.controller.store.audit_log(100).await.unwrap();
    assert!(log.is_empty(), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_each_certificate_may_do_and_the_audit_names_who() {
    let h = TlsHarness::start().await;
    let (h1, h2) = (h.client("host", "h1"), h.client("host", "h2"));
    let vera = h.client("user", "vera");
    let otto = h.client("user", "otto");
    let ada = h.client("user", "ada");

    // Hosts heartbeat as themselves, not as another host, and may do nothing else.
    let (s, v) = h
        .ok(
            &h1,
            "POST",
            "/v1/agents/heartbeat",
            Some(heartbeat_body("h1", 4096, "10.0.0", &[("a", 256)])),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = h
        .ok(
            &h2,
            "POST",
            "/v1/agents/heartbeat",
            Some(heartbeat_body("h2", 4096, "10.0.0", &[])),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = h
        .ok(
            &h1,
            "POST",
            "/v1/agents/heartbeat",
            Some(heartbeat_body("h2", 4096, "10.0.0", &[("x", 64)])),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("\"h1\"") && e.contains("\"h2\""), "{e}");
    let (s, v) = h
        .ok(
            &h1,
            "POST",
            "/v1/migrations",
            Some(json!({"vm": "a", "to": "h2"})),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(
        h.ok(
            &h1,
            "POST",
            "/v1/hosts/h2/evacuate",
            Some(json!({"dry_run": true}))
        )
        .await
        .0,
        403
    );
    assert_eq!(h.ok(&h1, "GET", "/v1/hosts", None).await.0, 403);
    // Users cannot pretend to be agents.
    let (s, v) = h
        .ok(
            &ada,
            "POST",
            "/v1/agents/heartbeat",
            Some(heartbeat_body("h1", 4096, "10.0.0", &[])),
        )
        .await;
    assert_eq!(s, 403, "{v}");

    // The viewer reads everything and changes nothing.
    let (s, hosts) = h.ok(&vera, "GET", "/v1/hosts", None).await;
    assert_eq!(s, 200, "{hosts}");
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 2);
    for path in [
        "/v1/vms",
        "/v1/migrations",
        "/v1/evacuations",
        "/metrics",
        "/openapi.json",
    ] {
        assert_eq!(h.ok(&vera, "GET", path, None).await.0, 200, "{path}");
    }
    let before = (
        h.ok(&vera, "GET", "/v1/migrations", None).await.1,
        h.ok(&vera, "GET", "/v1/evacuations", None).await.1,
        h.ok(&vera, "GET", "/v1/hosts/h1", None).await.1,
    );
    let (s, v) = h
        .ok(
            &vera,
            "POST",
            "/v1/migrations",
            Some(json!({"vm": "a", "to": "h2"})),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("vera") && e.contains("viewer") && e.contains("operator"),
        "{e}"
    );
    let (s, v) = h
        .ok(&vera, "POST", "/v1/hosts/h1/evacuate", Some(json!({})))
        .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(
        h.ok(
            &vera,
            "PATCH",
            "/v1/hosts/h1",
            Some(json!({"max_inbound": 1}))
        )
        .await
        .0,
        403
    );
    let after = (
        h.ok(&vera, "GET", "/v1/migrations", None).await.1,
        h.ok(&vera, "GET", "/v1/evacuations", None).await.1,
        h.ok(&vera, "GET", "/v1/hosts/h1", None).await.1,
    );
    assert_eq!(before.0, after.0, "a refused migration changed nothing");
    assert_eq!(before.1, after.1, "a refused evacuation changed nothing");
    assert_eq!(before.2["max_inbound"], after.2["max_inbound"]);
    assert_eq!(h.agent.starts().len(), 0);

    // The operator plans an evacuation and migrates; host settings are the admin's.
    let (s, v) = h
        .ok(
            &otto,
            "POST",
            "/v1/hosts/h1/evacuate",
            Some(json!({"dry_run": true})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["dry_run"], true);
    let (s, v) = h
        .ok(
            &otto,
            "POST",
            "/v1/migrations",
            Some(json!({"vm": "a", "to": "h2"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = h
        .ok(
            &otto,
            "PATCH",
            "/v1/hosts/h1",
            Some(json!({"max_inbound": 1})),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("admin"), "{v}");
    let (s, v) = h
        .ok(
            &ada,
            "PATCH",
            "/v1/hosts/h1",
            Some(json!({"max_inbound": 1})),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    // The audit log names each certificate and its role, refused calls included; accepted
    // heartbeats are reports, not recorded.
    let log = h.server.controller.store.audit_log(100).await.unwrap();
    let find = |who: &str, method: &str, path: &str, status: u16| {
        log.iter().any(|(_, e)| {
            e.actor.starts_with(&format!("{who}@127.0.0.1"))
                && e.method == method
                && e.path == path
                && e.status == status
        })
    };
    assert!(find("otto", "POST", "/v1/migrations", 200), "{log:?}");
    assert!(
        find("otto", "POST", "/v1/hosts/h1/evacuate", 200),
        "{log:?}"
    );
    assert!(find("otto", "PATCH", "/v1/hosts/h1", 403), "{log:?}");
    assert!(find("ada", "PATCH", "/v1/hosts/h1", 200), "{log:?}");
    assert!(find("vera", "POST", "/v1/migrations", 403), "{log:?}");
    assert!(
        find("vera", "POST", "/v1/hosts/h1/evacuate", 403),
        "{log:?}"
    );
    assert!(find("h1", "POST", "/v1/agents/heartbeat", 403), "{log:?}");
    let otto_entry = log
        .iter()
        .find(|(_, e)| e.actor.starts_with("otto@") && e.path == "/v1/migrations")
        .unwrap();
    assert!(
        otto_entry.1.actor.contains("role operator"),
        "{otto_entry:?}"
    );
    assert!(
        !log.iter()
            .any(|(_, e)| e.path == "/v1/agents/heartbeat" && e.status == 200),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_only_a_loopback_address_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        database: dir.path().join("controller.db").display().to_string(),
        token_file: dir.path().join("controller.token"),
        ..ServerConfig::default()
    };
    let e = match RunningServer::start(config).await {
        Err(e) => e,
        Ok(_) => panic!("started on 0.0.0.0 without TLS"),
    };
    assert!(matches!(e, ServerError::Tls(_)), "{e}");
    let m = e.to_string();
    assert!(m.contains("0.0.0.0:0") && m.contains("[tls]"), "{m}");
    assert!(!dir.path().join("controller.token").exists());
    assert!(
        !dir.path().join("controller.db").exists(),
        "nothing is created before the refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_heartbeat_over_mutual_tls_as_their_own_host_only() {
    use tern_agent::daemon::heartbeat::{Heartbeat, HeartbeatError, HeartbeatSender, LinkState};
    let h = TlsHarness::start().await;
    let body = |host: &str| -> Heartbeat {
        let mut v = heartbeat_body(host, 4096, "10.0.2", &[("web", 512)]);
        v["facts"]["outbound_migrations"] = json!(0);
        v["facts"]["inbound_migrations"] = json!(0);
        serde_json::from_value(v).expect("the controller's heartbeat JSON is the agent's")
    };
    let mut h1 = HeartbeatSender::over_mtls(&h.server.url(), &h.files("host", "h1")).unwrap();
    assert_eq!(h1.tick(&body("h1")).await, LinkState::Up);
    let ada = h.client("user", "ada");
    let (s, host) = h.ok(&ada, "GET", "/v1/hosts/h1", None).await;
    assert_eq!(s, 200, "{host}");
    assert_eq!(host["state"], "up");
    let (_, vms) = h.ok(&ada, "GET", "/v1/vms?host=h1", None).await;
    assert_eq!(vms[0]["name"], "web");

    // h2's certificate cannot speak for h1.
    let h2 = HeartbeatSender::over_mtls(&h.server.url(), &h.files("host", "h2")).unwrap();
    match h2.send(&body("h1")).await {
        Err(HeartbeatError::Refused { status, body, .. }) => {
            assert_eq!(status, 403, "{body}");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // An https:// controller without the agent's [tls] files is refused before any call.
    let config = tern_agent::ControllerConfig {
        url: h.server.url(),
        token_file: None,
        interval_s: 5,
    };
    let e = HeartbeatSender::from_config(&config, None).unwrap_err();
    assert!(e.to_string().contains("[tls]"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_calls_https_agents_with_its_operator_certificate() {
    use tern_agent::daemon::heartbeat::{Heartbeat, HeartbeatSender, LinkState};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki")).unwrap();
    for h in ["controller", "h1", "h2"] {
        pki.issue_host(h, &[LOCALHOST], Validity::days(1)).unwrap();
    }
    pki.issue_user("controller", Role::Operator, Validity::days(1))
        .unwrap();
    pki.issue_user("otto", Role::Operator, Validity::days(1))
        .unwrap();
    let files = |kind: &str, name: &str| TlsFiles::in_pki_dir(&dir.path().join("pki"), kind, name);
    let agent = FakeAgent::start_mtls(&files("host", "h1")).await;
    let agents: BTreeMap<String, String> = ["h1", "h2"]
        .iter()
        .map(|h| (h.to_string(), agent.url.clone()))
        .collect();
    let section = |user: Option<&str>| TlsSection {
        pki_dir: Some(dir.path().join("pki")),
        name: None,
        cert: None,
        key: None,
        ca: None,
        deny_list: None,
        agent_client_user: user.map(str::to_string),
    };
    let config = |user: Option<&str>| ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: dir.path().join("state/controller.db").display().to_string(),
        token_file: dir.path().join("state/controller.token"),
        heartbeat_timeout_s: 30,
        runner_tick_ms: 50,
        agents: agents.clone(),
        tls: Some(section(user)),
        ha: Default::default(),
    };
    // https:// agents without a client certificate: refused at start, naming the fix.
    let e = RunningServer::start(config(None))
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("agent_client_user"), "{e}");

    let server = RunningServer::start(config(Some("controller")))
        .await
        .unwrap();
    let body = |host: &str| -> Heartbeat {
        let mut v = heartbeat_body(
            host,
            4096,
            "10.0.2",
            if host == "h1" { &[("web", 512)] } else { &[] },
        );
        v["facts"]["outbound_migrations"] = json!(0);
        v["facts"]["inbound_migrations"] = json!(0);
        serde_json::from_value(v).unwrap()
    };
    for h in ["h1", "h2"] {
        let mut s = HeartbeatSender::over_mtls(&server.url(), &files("host", h)).unwrap();
        assert_eq!(s.tick(&body(h)).await, LinkState::Up);
    }
    let otto = client_of(&files("user", "otto"));
    let resp = otto
        .post(format!("{}/v1/migrations", server.url()))
        .json(&json!({"vm": "web", "to": "h2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
    let t = std::time::Instant::now();
    while agent.starts().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent was never called"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(agent.starts()[0].vm, "web", "started over mutual TLS");
}

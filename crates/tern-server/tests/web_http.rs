//! The web view's HTTP contract and the operator commands it uses, over real HTTP on
//! 127.0.0.1 against a real controller (SQLite file) and the fake agent: per-role lab tokens,
//! the login cookie, pages refused without credentials, security headers, and abort /
//! force-complete / bandwidth reaching the agent with the roles the CLI gets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(15);

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn call_as(
    h: &Harness,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = h
        .http
        .request(m, format!("{}{path}", h.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_mode_has_a_private_token_per_role_and_each_gets_its_role() {
    let h = Harness::start(2, 30).await;
    let tokens = h.server.as_ref().unwrap().lab_tokens.clone().unwrap();
    assert_eq!(tokens.admin, h.token);
    assert!(tokens.viewer != tokens.operator && tokens.viewer != tokens.admin);
    for suffix in ["", ".viewer", ".operator"] {
        let path = format!("{}{suffix}", h.config.token_file.display());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{path}");
    }
    let (s, _) = call_as(&h, &tokens.viewer, "GET", "/v1/hosts", None).await;
    assert_eq!(s, 200);
    let (s, v) = call_as(&h, &tokens.viewer, "POST", "/v1/migrations/m1/abort", None).await;
    assert_eq!(s, 403, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("token-viewer") && e.contains("operator"), "{e}");
    // The operator passes the role check and meets the controller's own answer.
    let (s, v) = call_as(
        &h,
        &tokens.operator,
        "POST",
        "/v1/migrations/m1/abort",
        None,
    )
    .await;
    assert_eq!(s, 404, "{v}");
    // Only the admin token stands for the lab agents.
    let hb = common::heartbeat_body("h1", 1024, "10.0.0", &[]);
    let (s, _) = call_as(
        &h,
        &tokens.operator,
        "POST",
        "/v1/agents/heartbeat",
        Some(hb.clone()),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = call_as(&h, &tokens.admin, "POST", "/v1/agents/heartbeat", Some(hb)).await;
    assert_eq!(s, 200);
    // The refused call is audited with who made it.
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT actor, status FROM audit")
        .fetch_all(
            &sqlx::SqlitePool::connect(&format!("sqlite://{}", h.config.database))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        rows.iter()
            .any(|(a, s)| a.starts_with("token-viewer@") && *s == 403),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_login_sets_a_strict_httponly_cookie_that_opens_the_page() {
    let h = Harness::start(1, 30).await;
    let tokens = h.server.as_ref().unwrap().lab_tokens.clone().unwrap();
    let http = no_redirects();
    // Without credentials a page says how to log in; the API keeps its JSON 401.
    let r = http.get(format!("{}/", h.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("/ui/login?token=TOKEN"));
    let r = http
        .get(format!("{}/v1/hosts", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    // A wrong token is refused and sets nothing.
    let r = http
        .get(format!("{}/ui/login?token=nope", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // The right one: a cookie scripts cannot read and other sites cannot send.
    let r = http
        .get(format!("{}/ui/login?token={}", h.url, tokens.viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("tern_token={};", tokens.viewer)),
        "{cookie}"
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = http
        .get(format!("{}/", h.url))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let page = r.text().await.unwrap();
    assert!(page.contains("token-viewer") && page.contains(r#"data-role="viewer""#));
    assert!(
        page.contains(r#"<script src="/ui/app.js""#)
            && !page.contains("http://")
            && !page.contains("https://")
    );
    // The cookie works for the API too (the page's buttons), with the viewer's role.
    let r = http
        .post(format!("{}/v1/migrations/x/abort", h.url))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Script and style are served from the binary; an unknown view is named.
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = http
            .get(format!("{}{path}", h.url))
            .header("cookie", &pair)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
    }
    let r = http
        .get(format!("{}/ui/fragment/secrets", h.url))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e = r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        e.contains("\"secrets\"") && e.contains("hosts, migrations and evacuations"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_reach_the_agent_are_recorded_and_refused_by_role_and_state() {
    let h = Harness::start(2, 30).await;
    let tokens = h.server.as_ref().unwrap().lab_tokens.clone().unwrap();
    h.agent.state.hold.store(true, Ordering::SeqCst);
    h.heartbeat("h1", 1024, &[("a", 512)]).await;
    h.heartbeat("h2", 4096, &[]).await;
    let (s, v) = h
        .post("/v1/migrations", json!({"vm": "a", "to": "h2"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["migration"]["id"].as_str().unwrap().to_string();
    wait_for("running", T, || async {
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        (v["migration"]["state"] == "running").then_some(())
    })
    .await;
    let path = |cmd: &str| format!("/v1/migrations/{id}/{cmd}");
    // Viewers look only.
    for cmd in ["abort", "force-complete", "bandwidth"] {
        let (s, _) = call_as(
            &h,
            &tokens.viewer,
            "POST",
            &path(cmd),
            Some(json!({"bytes_per_s": 1_000_000})),
        )
        .await;
        assert_eq!(s, 403, "{cmd}");
    }
    // A bad cap is named with the valid range, before any agent call.
    let (s, v) = call_as(
        &h,
        &tokens.operator,
        "POST",
        &path("bandwidth"),
        Some(json!({"bytes_per_s": 5})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("bytes_per_s=5"),
        "{v}"
    );
    let (s, v) = call_as(
        &h,
        &tokens.operator,
        "POST",
        &path("bandwidth"),
        Some(json!({"bytes_per_s": 50_000_000})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        h.agent
            .state
            .commands
            .lock()
            .unwrap()
            .iter()
            .any(|(_, c)| c == "bandwidth 50000000")
    );
    // The progress the agent reports is in the migration's view.
    wait_for("progress", T, || async {
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        v["progress"]["remaining_bytes"].as_u64()
    })
    .await;
    let (s, v) = call_as(&h, &tokens.operator, "POST", &path("force-complete"), None).await;
    assert_eq!(s, 200, "{v}");
    let done = wait_for("completed", T, || async {
        let (_, v) = h.get(&format!("/v1/migrations/{id}")).await;
        (v["migration"]["state"] == "completed").then_some(v)
    })
    .await;
    assert!(
        done.get("progress").is_none(),
        "progress is forgotten once it ends: {done}"
    );
    let history = done["events"].to_string();
    assert!(
        history.contains("bandwidth 50000000 B/s requested by token-operator"),
        "{history}"
    );
    assert!(
        history.contains("force-complete requested by token-operator"),
        "{history}"
    );
    // The agent's decisions are in the history once each, with their reasons, as they came.
    let decisions: Vec<String> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "decision")
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    assert!(!decisions.is_empty(), "{history}");
    assert!(
        decisions[0].starts_with("[agent-1 #1] continue: pass 1: remaining 256 MiB"),
        "{decisions:?}"
    );
    let mut unique = decisions.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        decisions.len(),
        "each decision once: {decisions:?}"
    );
    // Nothing to steer once it ended.
    let (s, v) = call_as(&h, &tokens.operator, "POST", &path("abort"), None).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("completed"), "{v}");
}

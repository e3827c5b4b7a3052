//! Test harness: a real controller on 127.0.0.1 with a real SQLite file, and a fake agent
//! (axum on loopback) answering the agent routes the controller calls.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tern_server::{RunningServer, ServerConfig};

/// One migration the fake agent was asked to run.
#[derive(Debug, Clone)]
pub struct FakeMigration {
    pub id: String,
    pub vm: String,
    pub destination: String,
    pub state: String,
    pub created_ms: u64,
    pub polls: u32,
    pub key: Option<String>,
    pub fail: bool,
}

/// What the fake agent does.
#[derive(Default)]
pub struct FakeAgentState {
    pub migrations: Mutex<Vec<FakeMigration>>,
    /// Keep every migration in `precopy` while set.
    pub hold: AtomicBool,
    /// The next N started migrations fail (before the switch) on their first poll.
    pub fail_next: AtomicU32,
    /// Refuse every start (the agent answers 503).
    pub refuse: AtomicBool,
    /// Operator commands received: (agent migration id, command), e.g. `force-complete`,
    /// `bandwidth 50000000`.
    pub commands: Mutex<Vec<(String, String)>>,
}

/// A fake agent server; stopped when dropped.
pub struct FakeAgent {
    pub url: String,
    pub state: Arc<FakeAgentState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_ms() -> u64 {
    tern_server::model::now_ms()
}

async fn start_migration(
    State(st): State<Arc<FakeAgentState>>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if st.refuse.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "destination agent unreachable"})),
        );
    }
    let mut ms = st.migrations.lock().unwrap();
    let fail = st
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let m = FakeMigration {
        id: format!("agent-{}", ms.len() + 1),
        vm: req["vm"].as_str().unwrap_or_default().to_string(),
        destination: req["to_host"].as_str().unwrap_or_default().to_string(),
        state: "precopy".into(),
        created_ms: now_ms(),
        polls: 0,
        key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        fail,
    };
    ms.push(m.clone());
    (StatusCode::OK, Json(view(&m)))
}

fn view(m: &FakeMigration) -> Value {
    // Progress as a real agent reports it while it runs: remaining bytes shrink each poll.
    let total: u64 = 512 << 20;
    let progress = (m.state == "precopy").then(|| {
        let remaining = total >> m.polls.min(20);
        json!({"qemu_status": "active", "remaining_bytes": remaining,
            "transferred_bytes": total - remaining, "total_bytes": total,
            "dirty_bytes_per_s": 2_000_000u64, "throughput_bytes_per_s": 100_000_000u64,
            "pass": m.polls, "elapsed_ms": now_ms() - m.created_ms, "eta_ms": 1500u64})
    });
    // The policy's decisions as a real agent logs them: one per poll, with its reason (the
    // whole log on every read, as the agent's GET does).
    let events: Vec<Value> = (1..=m.polls.min(5))
        .map(|i| {
            json!({"seq": i, "wall_ms": m.created_ms + u64::from(i) * 50,
            "at_ms": u64::from(i) * 50, "event": "decision", "action": "continue",
            "reason": format!("pass {i}: remaining {} MiB shrinking", 512u64 >> i)})
        })
        .collect();
    json!({"id": m.id, "vm": m.vm, "source": "x", "destination": m.destination,
        "state": m.state, "created_ms": m.created_ms, "progress": progress, "events": events,
        "error": if m.state == "failed" { Some("network down") } else { None }})
}

async fn show_migration(
    State(st): State<Arc<FakeAgentState>>,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    let mut ms = st.migrations.lock().unwrap();
    let Some(m) = ms.iter_mut().find(|m| m.id == id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such migration"})),
        );
    };
    m.polls += 1;
    if m.state == "precopy" {
        if m.fail {
            m.state = "failed".into();
        } else if !st.hold.load(Ordering::SeqCst) && m.polls >= 2 {
            m.state = "completed".into();
        }
    }
    (StatusCode::OK, Json(view(m)))
}

async fn list_migrations(State(st): State<Arc<FakeAgentState>>) -> Json<Value> {
    let ms = st.migrations.lock().unwrap();
    Json(Value::Array(ms.iter().map(view).collect()))
}

async fn abort(
    State(st): State<Arc<FakeAgentState>>,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    let mut ms = st.migrations.lock().unwrap();
    match ms.iter_mut().find(|m| m.id == id) {
        Some(m) => {
            m.state = "aborted".into();
            (
                StatusCode::OK,
                Json(json!({"command": {"command": "abort"}, "result": "cancelled"})),
            )
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such migration"})),
        ),
    }
}

/// `force-complete` finishes a running migration (as a switch to post-copy would);
/// `bandwidth` is recorded.
async fn command(
    State(st): State<Arc<FakeAgentState>>,
    Path((id, cmd)): Path<(String, String)>,
    body: Option<Json<Value>>,
) -> (StatusCode, Json<Value>) {
    let mut ms = st.migrations.lock().unwrap();
    let Some(m) = ms.iter_mut().find(|m| m.id == id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such migration"})),
        );
    };
    if m.state != "precopy" {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("the migration already ended ({})", m.state)})),
        );
    }
    let recorded = match cmd.as_str() {
        "force-complete" => {
            m.state = "completed".into();
            cmd.clone()
        }
        "bandwidth" => format!(
            "bandwidth {}",
            body.map(|Json(b)| b["bytes_per_s"].clone())
                .unwrap_or_default()
        ),
        _ => return (StatusCode::NOT_FOUND, Json(json!({"error": "no route"}))),
    };
    st.commands.lock().unwrap().push((id, recorded));
    (
        StatusCode::OK,
        Json(json!({"command": {"command": cmd}, "result": "done"})),
    )
}

fn fake_router(state: Arc<FakeAgentState>) -> Router {
    Router::new()
        .route("/v1/migrations", post(start_migration).get(list_migrations))
        .route("/v1/migrations/{id}", get(show_migration))
        .route("/v1/migrations/{id}/abort", post(abort))
        .route("/v1/migrations/{id}/{command}", post(command))
        .with_state(state)
}

impl FakeAgent {
    /// The fake agent served with mutual TLS (`files`: its host certificate and the CA):
    /// only clients with a certificate of the CA get through the handshake.
    #[allow(dead_code)]
    pub async fn start_mtls(files: &tern_pki::TlsFiles) -> Self {
        let state = Arc::new(FakeAgentState::default());
        let app = fake_router(state.clone());
        let tls = tern_pki::server_config(files).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = tern_pki::serve_mtls(listener, app, tls).await;
        });
        Self { url, state, task }
    }

    pub async fn start() -> Self {
        let state = Arc::new(FakeAgentState::default());
        let app = fake_router(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    pub fn starts(&self) -> Vec<FakeMigration> {
        self.state.migrations.lock().unwrap().clone()
    }
}

/// A controller, its files, a fake agent serving every host, and an HTTP client.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub agent: FakeAgent,
    pub config: ServerConfig,
    pub server: Option<RunningServer>,
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
}

impl Harness {
    /// Hosts `h1`..=`h{hosts}` all answered by one fake agent; heartbeat timeout in seconds.
    pub async fn start(hosts: u32, heartbeat_timeout_s: u64) -> Self {
        Self::start_on(hosts, heartbeat_timeout_s, None).await
    }

    /// Same, on `database` (a URL) instead of a SQLite file in the temp dir.
    pub async fn start_on(hosts: u32, heartbeat_timeout_s: u64, database: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agent = FakeAgent::start().await;
        let agents: BTreeMap<String, String> = (1..=hosts)
            .map(|i| (format!("h{i}"), agent.url.clone()))
            .collect();
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            database: database
                .unwrap_or_else(|| dir.path().join("state/controller.db").display().to_string()),
            token_file: dir.path().join("state/controller.token"),
            heartbeat_timeout_s,
            runner_tick_ms: 50,
            agents,
            tls: None,
            ha: Default::default(),
        };
        let server = RunningServer::start(config.clone()).await.unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            url: server.url(),
            token: server.token.clone().unwrap(),
            server: Some(server),
            dir,
            agent,
            config,
            http,
        }
    }

    /// Stops the controller (as a shutdown would) and starts it again on the same files.
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        self.start_again().await;
    }

    /// Stops the controller.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// Starts the controller on the same files (after [`Self::stop`]).
    pub async fn start_again(&mut self) {
        let server = RunningServer::start(self.config.clone()).await.unwrap();
        self.url = server.url();
        self.token = server.token.clone().unwrap_or_default();
        self.server = Some(server);
    }

    pub fn controller(&self) -> &tern_server::Controller {
        &self.server.as_ref().unwrap().controller
    }

    /// `method path` with the token and an optional JSON body: (status, JSON).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body)).await
    }

    /// A heartbeat of `host` with `free` MiB free and `vms` (name, MiB).
    pub async fn heartbeat(&self, host: &str, free: u64, vms: &[(&str, u64)]) -> (u16, Value) {
        self.post(
            "/v1/agents/heartbeat",
            heartbeat_body(host, free, "10.0.0", vms),
        )
        .await
    }
}

pub fn heartbeat_body(host: &str, free: u64, qemu: &str, vms: &[(&str, u64)]) -> Value {
    json!({
        "host": host,
        "facts": {
            "memory_mib": 8192, "free_memory_mib": free, "qemu_version": qemu,
            "migration_capabilities": ["postcopy-ram", "multifd"],
            "permit_post_copy": true, "link_bytes_per_s": 125_000_000u64,
            "max_outbound": 2, "max_inbound": 2
        },
        "vms": vms.iter().map(|(n, m)| json!({"name": n, "memory_mib": m, "sla_class": "silver",
            "post_copy_allowed": true, "dirty_bytes_per_s": 1_000_000})).collect::<Vec<_>>()
    })
}

/// Polls `f` every 25 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

//! Several controllers on one real PostgreSQL (issue 12): two `tern server` processes elect a
//! leader through the lease row; the leader is SIGKILLed mid-evacuation and the standby takes
//! over and finishes it without starting any migration twice; a leader cut from PostgreSQL
//! stops acting before its lease can be taken over, and an agent refuses a command carrying
//! its old fencing epoch.
//!
//! PostgreSQL is a throwaway cluster made by `scripts/pg-test-server.sh` (initdb in a temp
//! directory, loopback, needs root and Debian's postgresql, both provided in CI by
//! `scripts/install-prereqs.sh`). The agents are fakes at this level (one axum server on
//! loopback answering every host, behind the real agent's fencing layer); a real-lab version
//! comes with the evacuation demo. Every process is killed by PID on every path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tern_agent::fencing::{FENCING_HEADER, FencingLedger, enforce};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const TTL_MS: u64 = 3000;
const RENEW_MS: u64 = 500;
const MARGIN_MS: u64 = 1000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway PostgreSQL cluster; stopped and removed when dropped.
struct Postgres {
    dir: PathBuf,
    url: String,
    port: u16,
}

fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server.sh")
}

impl Postgres {
    fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tern-ha-pg.{}.{port}", std::process::id()));
        let out = Command::new("bash")
            .arg(pg_script())
            .args(["start"])
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .unwrap();
        let pg = Self {
            dir,
            url: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            port,
        };
        assert!(
            out.status.success() && pg.url.starts_with("postgres://"),
            "PostgreSQL did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(pg_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// One migration the fake agent was asked to start.
#[derive(Debug, Clone)]
struct Start {
    id: String,
    vm: String,
    destination: String,
    epoch: Option<u64>,
    at: Instant,
    created_ms: u64,
}

#[derive(Default)]
struct AgentState {
    starts: Mutex<Vec<Start>>,
}

const MIGRATION_S: f64 = 2.0;

fn view(s: &Start) -> Value {
    let state = if s.at.elapsed().as_secs_f64() >= MIGRATION_S {
        "completed"
    } else {
        "precopy"
    };
    json!({"id": s.id, "vm": s.vm, "destination": s.destination, "state": state,
           "created_ms": s.created_ms})
}

async fn start_migration(
    State(st): State<Arc<AgentState>>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> Json<Value> {
    let mut starts = st.starts.lock().unwrap();
    let s = Start {
        id: format!("agent-{}", starts.len() + 1),
        vm: req["vm"].as_str().unwrap_or_default().to_string(),
        destination: req["to_host"].as_str().unwrap_or_default().to_string(),
        epoch: headers
            .get(FENCING_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        at: Instant::now(),
        created_ms: tern_server::model::now_ms(),
    };
    starts.push(s.clone());
    Json(view(&s))
}

async fn list(State(st): State<Arc<AgentState>>) -> Json<Value> {
    Json(Value::Array(
        st.starts.lock().unwrap().iter().map(view).collect(),
    ))
}

async fn show(
    State(st): State<Arc<AgentState>>,
    UrlPath(id): UrlPath<String>,
) -> (StatusCode, Json<Value>) {
    match st.starts.lock().unwrap().iter().find(|s| s.id == id) {
        Some(s) => (StatusCode::OK, Json(view(s))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("unknown migration {id}")})),
        ),
    }
}

/// A fake agent for every host, behind the real agent's fencing layer.
struct FakeAgent {
    url: String,
    state: Arc<AgentState>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAgent {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ledger = FencingLedger::open(&dir.path().join("fencing-epoch")).unwrap();
        let state = Arc::new(AgentState::default());
        let app = Router::new()
            .route("/v1/migrations", post(start_migration).get(list))
            .route("/v1/migrations/{id}", get(show))
            .layer(axum::middleware::from_fn_with_state(ledger, enforce))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            state,
            task,
            _dir: dir,
        }
    }

    fn starts(&self) -> Vec<Start> {
        self.state.starts.lock().unwrap().clone()
    }
}

/// A TCP relay to PostgreSQL that can be cut (bytes are then dropped, connections stay open:
/// the database is silent, as behind a dropped route).
struct CuttableLink {
    port: u16,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl CuttableLink {
    async fn start(upstream_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                relays.spawn(relay(cr, sw, c.clone()));
                relays.spawn(relay(sr, cw, c.clone()));
            }
        });
        Self { port, cut, task }
    }
}

/// A `tern server` process; killed (SIGKILL) when dropped.
struct Controller {
    child: Option<Child>,
    url: String,
    token: String,
    id: String,
    _dir: tempfile::TempDir,
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];

impl Controller {
    async fn start(id: &str, database: &str, agent_url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let token_file = dir.path().join("state/token");
        let config = dir.path().join("server.toml");
        let agents: String = HOSTS
            .iter()
            .map(|h| format!("{h} = \"{agent_url}\"\n"))
            .collect();
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndatabase = \"{database}\"\ntoken_file = \"{}\"\n\
                 heartbeat_timeout_s = 60\nrunner_tick_ms = 200\n\
                 [ha]\nid = \"{id}\"\nlease_ttl_ms = {TTL_MS}\nlease_renew_ms = {RENEW_MS}\n\
                 lease_margin_ms = {MARGIN_MS}\n[agents]\n{agents}",
                token_file.display()
            ),
        )
        .unwrap();
        let child = Command::new(TERN)
            .args(["server", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut c = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            id: id.to_string(),
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&token_file) {
                c.token = t.trim().to_string();
                if c.get("/v1/leader").await.0 == 200 {
                    return c;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "controller {id} did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut req = http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn role(&self) -> String {
        let (_, v) = self.get("/v1/leader").await;
        v["role"].as_str().unwrap_or("?").to_string()
    }

    async fn epoch(&self) -> Option<u64> {
        self.get("/v1/leader").await.1["epoch"].as_u64()
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn heartbeat(host: &str, vms: &[String]) -> Value {
    json!({
        "host": host,
        "facts": {
            "memory_mib": 16384, "free_memory_mib": 16384 - 512 * vms.len() as u64,
            "qemu_version": "10.0.2",
            "migration_capabilities": ["postcopy-ram", "multifd"],
            "permit_post_copy": true, "link_bytes_per_s": 125_000_000u64,
            "max_outbound": 2, "max_inbound": 2
        },
        "vms": vms.iter().map(|n| json!({"name": n, "memory_mib": 512, "sla_class": "silver",
            "post_copy_allowed": true, "dirty_bytes_per_s": 1_000_000})).collect::<Vec<_>>()
    })
}

/// Sends every host's heartbeat to `to` (a standby accepts them too); VMs are where the fake
/// agent's completed migrations put them.
async fn heartbeats(to: &Controller, agent: &FakeAgent, initial: &BTreeMap<String, String>) {
    let mut place = initial.clone();
    for s in agent.starts() {
        if view(&s)["state"] == "completed" {
            place.insert(s.vm.clone(), s.destination.clone());
        }
    }
    for h in HOSTS {
        let vms: Vec<String> = place
            .iter()
            .filter(|(_, host)| host.as_str() == h)
            .map(|(v, _)| v.clone())
            .collect();
        let (status, body) = to.post("/v1/agents/heartbeat", heartbeat(h, &vms)).await;
        assert_eq!(status, 200, "heartbeat of {h} to {}: {body}", to.id);
    }
}

fn initial_vms(n: usize) -> BTreeMap<String, String> {
    (1..=n)
        .map(|i| (format!("vm{i}"), "h1".to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_finishes_an_evacuation_whose_leader_was_killed_and_starts_nothing_twice() {
    let pg = Postgres::start();
    let agent = FakeAgent::start().await;
    let mut c1 = Controller::start("c1", &pg.url, &agent.url).await;
    wait_until("c1 to lead", Duration::from_secs(10), || async {
        c1.role().await == "leader"
    })
    .await;
    let c2 = Controller::start("c2", &pg.url, &agent.url).await;
    let (_, status) = c2.get("/v1/leader").await;
    assert_eq!(status["role"], "standby", "{status}");
    assert!(
        status["leader"].as_str().unwrap_or("").starts_with("c1 "),
        "{status}"
    );
    let epoch1 = c1.epoch().await.unwrap();

    let vms = initial_vms(6);
    heartbeats(&c2, &agent, &vms).await;
    // A standby refuses writes and names the leader.
    let (code, refused) = c2.post("/v1/hosts/h1/evacuate", json!({})).await;
    assert_eq!(code, 503, "{refused}");
    let msg = refused["error"].as_str().unwrap_or_default();
    assert!(msg.contains("standby") && msg.contains(&c1.url), "{msg}");
    let (code, evac) = c1.post("/v1/hosts/h1/evacuate", json!({})).await;
    assert_eq!(code, 200, "{evac}");
    let id = evac["id"].as_str().unwrap().to_string();

    // Mid-evacuation: the leader started some migrations, not all.
    wait_until(
        "the leader to start migrations",
        Duration::from_secs(20),
        || async { !agent.starts().is_empty() },
    )
    .await;
    c1.kill();
    let killed = Instant::now();
    let started_by_c1 = agent.starts().len();
    assert!(
        started_by_c1 < vms.len(),
        "killed too late: {started_by_c1} started"
    );

    let mut took_over = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        heartbeats(&c2, &agent, &vms).await;
        if took_over.is_none() && c2.role().await == "leader" {
            took_over = Some(killed.elapsed());
        }
        let (_, v) = c2.get(&format!("/v1/evacuations/{id}")).await;
        if v["evacuation"]["state"] == "completed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "evacuation did not complete: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took_over = took_over.expect("c2 never led");
    eprintln!(
        "takeover: {:.2} s after SIGKILL (lease ttl {:.1} s, renewal every {:.1} s)",
        took_over.as_secs_f64(),
        TTL_MS as f64 / 1000.0,
        RENEW_MS as f64 / 1000.0
    );
    // ≤ 5 s after the lease expired; it expired at most `ttl` after the kill.
    assert!(
        took_over <= Duration::from_millis(TTL_MS + 5000),
        "takeover took {took_over:?}"
    );

    // Exactly once: one agent start per VM, and the history shows one attempt each.
    let starts = agent.starts();
    let mut per_vm: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &starts {
        *per_vm.entry(s.vm.as_str()).or_default() += 1;
    }
    assert_eq!(per_vm.len(), vms.len(), "{starts:?}");
    assert!(
        per_vm.values().all(|&n| n == 1),
        "a VM started twice: {per_vm:?}"
    );
    let epoch2 = c2.epoch().await.unwrap();
    assert!(epoch2 > epoch1, "new leader epoch {epoch2} after {epoch1}");
    // Both leaders started some, each with its own epoch; nothing with the old epoch
    // once the new leader led.
    let by = |e: u64| starts.iter().filter(|s| s.epoch == Some(e)).count();
    assert!(by(epoch1) >= 1 && by(epoch2) >= 1, "{starts:?}");
    assert_eq!(by(epoch1) + by(epoch2), starts.len(), "{starts:?}");
    assert!(
        starts
            .iter()
            .filter(|s| s.epoch == Some(epoch1))
            .all(|s| s.at <= killed + Duration::from_millis(100)),
        "the killed leader's epoch after its death: {starts:?}"
    );
    let (_, v) = c2.get(&format!("/v1/evacuations/{id}")).await;
    for m in v["migrations"].as_array().unwrap() {
        assert_eq!(m["state"], "completed", "{m}");
        let (_, mv) = c2
            .get(&format!("/v1/migrations/{}", m["id"].as_str().unwrap()))
            .await;
        let starts: Vec<&Value> = mv["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["kind"] == "attempt" && e["detail"].as_str().unwrap_or("").starts_with("attempt ")
            })
            .collect();
        assert_eq!(starts.len(), 1, "one start per migration: {mv}");
        assert_eq!(mv["migration"]["attempts"], 1, "{mv}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_postgres_stops_before_its_lease_is_taken_and_its_epoch_is_refused() {
    let pg = Postgres::start();
    let link = CuttableLink::start(pg.port).await;
    let agent = FakeAgent::start().await;
    let via_link = pg
        .url
        .replace(&format!(":{}/", pg.port), &format!(":{}/", link.port));
    let c1 = Controller::start("c1", &via_link, &agent.url).await;
    wait_until("c1 to lead", Duration::from_secs(10), || async {
        c1.role().await == "leader"
    })
    .await;
    let c2 = Controller::start("c2", &pg.url, &agent.url).await;
    let epoch1 = c1.epoch().await.unwrap();
    heartbeats(&c2, &agent, &initial_vms(2)).await;

    link.cut.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    let mut c1_stopped = None;
    let mut c2_leads = None;
    while c1_stopped.is_none() || c2_leads.is_none() {
        if c1_stopped.is_none() && c1.role().await != "leader" {
            c1_stopped = Some(cut.elapsed());
        }
        if c2_leads.is_none() && c2.role().await == "leader" {
            c2_leads = Some(cut.elapsed());
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "no change of leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (stopped, leads) = (c1_stopped.unwrap(), c2_leads.unwrap());
    eprintln!(
        "cut from PostgreSQL: c1 stopped acting after {:.2} s, c2 led after {:.2} s",
        stopped.as_secs_f64(),
        leads.as_secs_f64()
    );
    assert!(stopped < leads, "c1 still acted when c2 took over");
    assert!(
        stopped <= Duration::from_millis(TTL_MS - MARGIN_MS + 200),
        "{stopped:?}"
    );
    // The cut leader refuses writes at once (it does not wait on the silent database).
    let (code, body) = c1.post("/v1/hosts/h1/evacuate", json!({})).await;
    assert_eq!(code, 503, "{body}");

    // The new leader acts with a newer epoch; the agent then refuses the old one.
    let (code, evac) = c2.post("/v1/hosts/h1/evacuate", json!({})).await;
    assert_eq!(code, 200, "{evac}");
    wait_until(
        "c2 to start a migration",
        Duration::from_secs(20),
        || async { !agent.starts().is_empty() },
    )
    .await;
    let epoch2 = c2.epoch().await.unwrap();
    assert!(agent.starts().iter().all(|s| s.epoch == Some(epoch2)));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http
        .post(format!("{}/v1/migrations", agent.url))
        .header(FENCING_HEADER, epoch1.to_string())
        .json(&json!({"vm": "vm2", "to_host": "h3", "context": "evacuate"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(&format!("epoch {epoch1} is older than epoch {epoch2}")),
        "{text}"
    );
    assert!(
        agent.starts().iter().all(|s| s.epoch == Some(epoch2)),
        "the refused command ran"
    );
}

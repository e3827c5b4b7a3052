//! `tern fleet-sim`: the controller at fleet scale (issue 12), with controller-level simulated
//! hosts. A real controller (API, runner, store on SQLite or PostgreSQL) runs in this process;
//! N simulated hosts register and heartbeat through its HTTP API with M VMs between them, and
//! its agent calls are answered by [`SimAgents`], whose migrations take a modelled time
//! (memory over the host's link rate). It reports what an operator sizing a controller asks:
//! heartbeats per second held, paginated list latency, `host evacuate --dry-run` of a 100-VM
//! host, planning the drain of many hosts at once, a real evacuation with modelled migrations,
//! the process's memory and the database's row counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};
use tern_server::agent_client::{AgentApi, AgentCallError, AgentMigration, AgentStartRequest};
use tern_server::{RunningServer, ServerConfig};

use crate::Failure;
use crate::output::{OutputArgs, OutputFormat, print_json};

/// `tern fleet-sim` options.
#[derive(Debug, Args)]
pub struct FleetSimArgs {
    /// Simulated hosts.
    #[arg(long, default_value_t = 100)]
    hosts: u32,
    /// VMs in the whole fleet (the first host gets `--evacuate-vms` of them).
    #[arg(long, default_value_t = 1000)]
    vms: u32,
    /// The controller's database: a postgres:// URL (several controllers' backend), or
    /// omitted for SQLite in a temporary directory.
    #[arg(long)]
    database: Option<String>,
    /// How long heartbeats are driven at full speed (s).
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Heartbeats in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// VMs on the host evacuated with --dry-run.
    #[arg(long, default_value_t = 100)]
    evacuate_vms: u32,
    /// Hosts whose drain is planned at once (default: 100, at most a tenth of the fleet).
    #[arg(long)]
    drain_hosts: Option<u32>,
    /// The agents' interval between heartbeats the fleet must sustain (s).
    #[arg(long, default_value_t = 5)]
    heartbeat_interval_s: u64,
    #[command(flatten)]
    output: OutputArgs,
}

/// Agents whose migrations take `memory / link rate` (no QEMU, no network): enough for the
/// controller's runner, which only starts and watches.
pub struct SimAgents {
    link_bytes_per_s: u64,
    memory_of: BTreeMap<String, u64>,
    migrations: Mutex<Vec<(AgentMigration, Instant, Duration, String)>>,
    started: AtomicU64,
}

impl SimAgents {
    fn new(link_bytes_per_s: u64, memory_of: BTreeMap<String, u64>) -> Self {
        Self {
            link_bytes_per_s,
            memory_of,
            migrations: Mutex::default(),
            started: AtomicU64::new(0),
        }
    }

    fn current(&self, source: &str) -> Vec<AgentMigration> {
        let now = Instant::now();
        let ms = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        ms.iter()
            .filter(|(_, _, _, s)| s == source)
            .map(|(m, at, d, _)| {
                let mut m = m.clone();
                m.state = if now.duration_since(*at) >= *d {
                    "completed".into()
                } else {
                    "precopy".into()
                };
                m
            })
            .collect()
    }
}

#[async_trait]
impl AgentApi for SimAgents {
    async fn start_migration(
        &self,
        source: &str,
        _key: &str,
        req: &AgentStartRequest,
    ) -> Result<AgentMigration, AgentCallError> {
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let mib = self.memory_of.get(&req.vm).copied().unwrap_or(1024);
        let secs = (mib as f64 * 1048576.0) / self.link_bytes_per_s.max(1) as f64;
        let m = AgentMigration {
            id: format!("sim-{n}"),
            vm: req.vm.clone(),
            destination: req.to_host.clone(),
            state: "precopy".into(),
            created_ms: tern_server::model::now_ms(),
            error: None,
            progress: None,
            events: Vec::new(),
        };
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((
                m.clone(),
                Instant::now(),
                Duration::from_secs_f64(secs),
                source.to_string(),
            ));
        Ok(m)
    }

    async fn migration(&self, host: &str, id: &str) -> Result<AgentMigration, AgentCallError> {
        self.current(host)
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| AgentCallError::Refused {
                host: host.into(),
                status: 404,
                message: format!("unknown migration {id}"),
            })
    }

    async fn migrations(&self, host: &str) -> Result<Vec<AgentMigration>, AgentCallError> {
        Ok(self.current(host))
    }

    async fn abort(&self, _host: &str, _id: &str) -> Result<(), AgentCallError> {
        Ok(())
    }
}

/// Latency figures of a set of calls (ms).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Calls measured.
    pub calls: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

fn latency(mut v: Vec<f64>) -> Latency {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Latency {
        calls: v.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: v.last().copied().unwrap_or(0.0),
    }
}

/// What `tern fleet-sim` reports.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Hosts simulated.
    pub hosts: u32,
    /// VMs simulated.
    pub vms: u32,
    /// `sqlite` or `postgresql`.
    pub database: String,
    /// Time to register every host (first heartbeats), s.
    pub register_s: f64,
    /// Heartbeats accepted per second while driven at full speed.
    pub heartbeats_per_s: f64,
    /// What the fleet needs: hosts / interval.
    pub heartbeats_needed_per_s: f64,
    /// Whether the controller keeps up with the fleet's heartbeats.
    pub heartbeats_held: bool,
    /// Heartbeat call latency.
    pub heartbeat_latency: Latency,
    /// `GET /v1/hosts?limit=1000` pages, walked to the end.
    pub host_page_latency: Latency,
    /// Walking every page, s.
    pub host_list_walk_s: f64,
    /// `GET /v1/vms?host=…` of the evacuated host.
    pub vms_of_host_ms: f64,
    /// `POST /v1/hosts/{h}/evacuate {dry_run}` of the host with `evacuate_vms` VMs.
    pub evacuate_dry_run_ms: f64,
    /// VMs in that plan.
    pub evacuate_dry_run_vms: usize,
    /// Planning the drain of `drain_hosts` hosts at once (fleet load + plan), ms.
    pub drain_plan_ms: f64,
    /// Hosts in that drain and VMs placed.
    pub drain_hosts: u32,
    /// VMs placed by that plan.
    pub drain_vms: usize,
    /// A real evacuation of a small host with modelled migrations: VMs, predicted and actual
    /// makespan (s), migrations started by the runner.
    pub evacuation: Value,
    /// Resident memory of this process (controller + simulator), MiB.
    pub process_rss_mib: f64,
    /// Rows per table.
    pub row_counts: BTreeMap<String, i64>,
}

fn host_name(i: u32) -> String {
    format!("h{i:05}")
}

/// The VMs of each host: the first gets `evacuate_vms`, the rest share the remainder.
fn layout(hosts: u32, vms: u32, evacuate_vms: u32) -> Vec<Vec<(String, u64)>> {
    let mut out = vec![Vec::new(); hosts as usize];
    let first = evacuate_vms.min(vms);
    let mut n = 0u32;
    for _ in 0..first {
        n += 1;
        out[0].push((format!("vm{n:06}"), 512));
    }
    let others = hosts.saturating_sub(1).max(1);
    let mut i = 0u32;
    while n < vms {
        n += 1;
        let h = if hosts > 1 { 1 + (i % others) } else { 0 };
        out[h as usize].push((format!("vm{n:06}"), 1024));
        i += 1;
    }
    out
}

fn heartbeat(host: &str, vms: &[(String, u64)]) -> Value {
    let used: u64 = vms.iter().map(|(_, m)| m).sum();
    let total = 262_144u64;
    json!({
        "host": host,
        "facts": {
            "memory_mib": total, "free_memory_mib": total.saturating_sub(used),
            "qemu_version": "10.0.2",
            "migration_capabilities": ["postcopy-ram", "multifd"],
            "permit_post_copy": true, "link_bytes_per_s": 1_250_000_000u64,
            "max_outbound": 4, "max_inbound": 4
        },
        "vms": vms.iter().map(|(n, m)| json!({"name": n, "memory_mib": m, "sla_class": "silver",
            "post_copy_allowed": true, "dirty_bytes_per_s": 10_000_000})).collect::<Vec<_>>()
    })
}

struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| path.to_string())?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            return Err(anyhow!("{path}: {status}: {text}"));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// Sends `bodies` as heartbeats with `concurrency` in flight, until `until` (or once each when
/// `None`); returns (accepted, latencies in ms).
async fn drive_heartbeats(
    api: &Arc<Api>,
    bodies: &Arc<Vec<Value>>,
    concurrency: usize,
    until: Option<Instant>,
) -> anyhow::Result<(u64, Vec<f64>)> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (api, bodies, next) = (api.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                match until {
                    None if i >= bodies.len() => break,
                    Some(t) if Instant::now() >= t => break,
                    _ => {}
                }
                let body = &bodies[i % bodies.len()];
                let t0 = Instant::now();
                api.call(reqwest::Method::POST, "/v1/agents/heartbeat", Some(body))
                    .await?;
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as u64, all))
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs the simulation.
pub async fn run(mut a: FleetSimArgs) -> Result<(), Failure> {
    let drain = a.drain_hosts.unwrap_or((a.hosts / 10).clamp(1, 100));
    a.drain_hosts = Some(drain);
    if a.hosts < 3 || a.vms < a.evacuate_vms || drain + 2 > a.hosts {
        return Err(Failure::input(anyhow!(
            "--hosts {} --vms {} --evacuate-vms {} --drain-hosts {}: give at least 3 hosts, \
             at least as many VMs as --evacuate-vms, and at most hosts − 2 drained hosts",
            a.hosts,
            a.vms,
            a.evacuate_vms,
            drain
        )));
    }
    let report = simulate(&a).await.map_err(Failure::failed)?;
    match a.output.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

async fn simulate(a: &FleetSimArgs) -> anyhow::Result<FleetReport> {
    let dir = tempfile::tempdir()?;
    let layout = layout(a.hosts, a.vms, a.evacuate_vms);
    let names: Vec<String> = (1..=a.hosts).map(host_name).collect();
    let memory_of: BTreeMap<String, u64> = layout.iter().flatten().cloned().collect();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        database: a
            .database
            .clone()
            .unwrap_or_else(|| dir.path().join("state/controller.db").display().to_string()),
        token_file: dir.path().join("state/token"),
        heartbeat_timeout_s: 3600,
        agents: names
            .iter()
            .map(|n| (n.clone(), "http://127.0.0.1:9".to_string()))
            .collect(),
        ..ServerConfig::default()
    };
    let shared = config.is_shared_database();
    let agents = Arc::new(SimAgents::new(1_250_000_000, memory_of));
    let server = RunningServer::start_with_agents(config, agents.clone()).await?;
    let api = Arc::new(Api {
        http: reqwest::Client::builder().no_proxy().build()?,
        url: server.url(),
        token: server.token.clone().unwrap_or_default(),
    });
    let bodies: Arc<Vec<Value>> = Arc::new(
        names
            .iter()
            .zip(&layout)
            .map(|(n, vms)| heartbeat(n, vms))
            .collect(),
    );
    let t = Instant::now();
    drive_heartbeats(&api, &bodies, a.concurrency, None).await?;
    let register_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (n, lat) = drive_heartbeats(
        &api,
        &bodies,
        a.concurrency,
        Some(t + Duration::from_secs(a.heartbeat_seconds)),
    )
    .await?;
    let heartbeats_per_s = n as f64 / t.elapsed().as_secs_f64();
    let needed = f64::from(a.hosts) / a.heartbeat_interval_s.max(1) as f64;

    let mut pages = Vec::new();
    let walk = Instant::now();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(t) => format!("/v1/hosts?limit=1000&after={t}"),
            None => "/v1/hosts?limit=1000".to_string(),
        };
        let t0 = Instant::now();
        let page = api.call(reqwest::Method::GET, &path, None).await?;
        pages.push(t0.elapsed().as_secs_f64() * 1000.0);
        match page["next_page"].as_str() {
            Some(t) => after = Some(t.to_string()),
            None => break,
        }
    }
    let host_list_walk_s = walk.elapsed().as_secs_f64();

    let first = &names[0];
    let t0 = Instant::now();
    api.call(reqwest::Method::GET, &format!("/v1/vms?host={first}"), None)
        .await?;
    let vms_of_host_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let t0 = Instant::now();
    let dry = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/hosts/{first}/evacuate"),
            Some(&json!({"dry_run": true})),
        )
        .await?;
    let evacuate_dry_run_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let evacuate_dry_run_vms = dry["plan"]["migrations"].as_array().map_or(0, Vec::len);

    let t0 = Instant::now();
    let drain_hosts = a.drain_hosts.unwrap_or(1);
    let drain: Vec<String> = names[1..=drain_hosts as usize].to_vec();
    let drain_vms = plan_drain(&server, &drain).await?;
    let drain_plan_ms = t0.elapsed().as_secs_f64() * 1000.0;

    let evacuation = run_evacuation(&api, &names[a.hosts as usize - 1], &agents).await?;
    let process_rss_mib = rss_mib();
    let row_counts = server.row_counts().await?;
    server.stop().await;
    Ok(FleetReport {
        hosts: a.hosts,
        vms: a.vms,
        database: if shared { "postgresql" } else { "sqlite" }.into(),
        register_s,
        heartbeats_per_s,
        heartbeats_needed_per_s: needed,
        heartbeats_held: heartbeats_per_s >= needed,
        heartbeat_latency: latency(lat),
        host_page_latency: latency(pages),
        host_list_walk_s,
        vms_of_host_ms,
        evacuate_dry_run_ms,
        evacuate_dry_run_vms,
        drain_plan_ms,
        drain_hosts,
        drain_vms,
        evacuation,
        process_rss_mib,
        row_counts,
    })
}

/// Plans emptying `hosts` at once with the controller's planner on the stored fleet.
async fn plan_drain(server: &RunningServer, hosts: &[String]) -> anyhow::Result<usize> {
    let ctl = &server.controller;
    let fleet = ctl.fleet().await?;
    let first = fleet
        .hosts
        .get(&hosts[0])
        .ok_or_else(|| anyhow!("host {} not registered", hosts[0]))?;
    let mut vms = Vec::new();
    for h in hosts {
        vms.extend(ctl.store.vms(Some(h)).await?);
    }
    let mut req = tern_server::planner::request(tern_server::planner::PlanInput {
        fleet: &fleet,
        host: first,
        vms: &vms,
        deadline_s: 3600,
    })?;
    req.hosts_to_empty = hosts.to_vec();
    let plan = tern_planner::plan_evacuation(&req).map_err(|e| anyhow!("drain plan: {e}"))?;
    if !plan.unplaceable.is_empty() {
        return Err(anyhow!(
            "drain of {} hosts: {} VMs without a destination",
            hosts.len(),
            plan.unplaceable.len()
        ));
    }
    Ok(plan.migrations.len())
}

/// Evacuates `host` for real: the runner starts every step on [`SimAgents`], whose
/// migrations take memory / link rate; waits for the end.
async fn run_evacuation(api: &Api, host: &str, agents: &SimAgents) -> anyhow::Result<Value> {
    let before = agents.started.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let r = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/hosts/{host}/evacuate"),
            Some(&json!({"dry_run": false})),
        )
        .await?;
    let id = r["id"]
        .as_str()
        .ok_or_else(|| anyhow!("evacuation of {host} has no id: {r}"))?
        .to_string();
    let predicted = r["plan"]["predicted_makespan_s"].as_f64().unwrap_or(0.0);
    let steps = r["plan"]["migrations"].as_array().map_or(0, Vec::len);
    let state = loop {
        let v = api
            .call(reqwest::Method::GET, &format!("/v1/evacuations/{id}"), None)
            .await?;
        let s = v["evacuation"]["state"].as_str().unwrap_or("").to_string();
        if matches!(s.as_str(), "completed" | "failed" | "cancelled") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            break format!("still {s} after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Ok(json!({
        "host": host,
        "vms": steps,
        "state": state,
        "predicted_makespan_s": predicted,
        "actual_s": t0.elapsed().as_secs_f64(),
        "migrations_started": agents.started.load(Ordering::SeqCst) - before,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_puts_the_evacuated_host_first_and_every_vm_once() {
        let l = layout(5, 30, 10);
        assert_eq!(l[0].len(), 10);
        assert_eq!(l.iter().map(Vec::len).sum::<usize>(), 30);
        let mut names: Vec<&String> = l.iter().flatten().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 30);
        assert!(l[1..].iter().all(|v| v.len() == 5));
    }
}

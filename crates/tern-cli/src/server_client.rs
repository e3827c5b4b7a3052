//! The CLI's client of the cluster controller (`tern server`): `tern host list` (with
//! `--server` or `TERN_SERVER`), `host show|set|evacuate` (`--watch` follows the controller's
//! event stream), `migrate VM [--to HOST]`.
//!
//! Requests and answers are the controller's own types (`tern_server`), so both sides agree
//! by construction. A controller with mutual TLS (`https://`) is called with a certificate of
//! the installation CA: `--cert/--key/--ca`, or `--pki-dir` (`TERN_PKI_DIR`) and `--user`
//! (`TERN_USER`). A loopback lab controller (`http://`) takes the bearer token from
//! `TERN_TOKEN` or the controller's token file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_server::controller::{HostPage, MigrationCreated, MigrationRequest, MigrationView};
use tern_server::evacuation::{DeadlineSpec, EvacuateRequest, EvacuateResponse, EvacuationView};
use tern_server::model::{HostPatch, HostRecord, PostCopySetting, now_ms};

use crate::Failure;
use crate::client::ClusterError;
use crate::output::{OutputArgs, OutputFormat, print_json};

/// Which controller to talk to.
#[derive(Debug, Clone, Args)]
pub struct ServerTarget {
    /// Controller URL (https://HOST:PORT, or http://127.0.0.1:PORT in the lab mode); default
    /// $TERN_SERVER. Without either, commands that can talk to agents directly do so.
    #[arg(long)]
    pub server: Option<String>,
    /// The controller's token file, for a loopback lab controller without TLS (the token
    /// itself may be given as $TERN_TOKEN).
    #[arg(long, default_value = "/var/lib/tern/controller.token")]
    pub token_file: PathBuf,
    /// Your certificate (PEM) for a controller with mutual TLS (with --key and --ca).
    #[arg(long, requires_all = ["key", "ca"], conflicts_with = "pki_dir")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The installation CA certificate the controller's certificate must be issued by.
    #[arg(long, requires = "cert")]
    pub ca: Option<PathBuf>,
    /// A `tern pki` directory holding your user certificate (see --user); default
    /// $TERN_PKI_DIR.
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Your user name in --pki-dir; default $TERN_USER.
    #[arg(long)]
    pub user: Option<String>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl ServerTarget {
    /// The controller URL from `--server` or `TERN_SERVER`.
    pub fn url(&self) -> Option<String> {
        self.server
            .clone()
            .or_else(|| std::env::var("TERN_SERVER").ok())
            .filter(|s| !s.is_empty())
    }

    /// A client of the controller; fails when none is given.
    pub fn connect(&self) -> Result<ControllerClient, ClusterError> {
        let url = self.url().ok_or_else(|| {
            ClusterError::BadInput(
                "no controller given: pass --server http://HOST:PORT or set TERN_SERVER".into(),
            )
        })?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClusterError::BadInput(format!(
                "--server {url:?} is not a URL: give https://HOST:PORT (mutual TLS) or \
                 http://127.0.0.1:PORT (lab mode)"
            )));
        }
        let base = url.trim_end_matches('/').to_string();
        if let Some(files) = self.tls_files()? {
            if !url.starts_with("https://") {
                return Err(ClusterError::BadInput(format!(
                    "a certificate was given but --server {url:?} is not https://: a controller \
                     with mutual TLS is reached at https://HOST:PORT"
                )));
            }
            let build = |b: Result<reqwest::ClientBuilder, tern_pki::PkiError>| {
                b.map_err(|e| ClusterError::BadInput(format!("client certificate: {e}")))
            };
            let http = build(tern_pki::reqwest_client_builder(&files))?
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| ClusterError::Failed(e.to_string()))?;
            // The event stream is long-lived: no overall timeout, only for connecting.
            let stream = build(tern_pki::reqwest_client_builder(&files))?
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| ClusterError::Failed(e.to_string()))?;
            return Ok(ControllerClient {
                base,
                token: None,
                http,
                stream,
            });
        }
        if url.starts_with("https://") {
            return Err(ClusterError::BadInput(format!(
                "--server {url:?} uses mutual TLS: give your certificate with --pki-dir DIR \
                 --user NAME (or TERN_PKI_DIR, TERN_USER), or --cert, --key and --ca"
            )));
        }
        let token = match std::env::var("TERN_TOKEN").ok().filter(|t| !t.is_empty()) {
            Some(t) => t,
            None => std::fs::read_to_string(&self.token_file)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    ClusterError::BadInput(format!(
                        "cannot read the controller token {}: {e} (pass --token-file or set \
                         TERN_TOKEN)",
                        self.token_file.display()
                    ))
                })?,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClusterError::Failed(e.to_string()))?;
        let stream = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClusterError::Failed(e.to_string()))?;
        Ok(ControllerClient {
            base,
            token: Some(token),
            http,
            stream,
        })
    }

    /// The client certificate files, from `--cert/--key/--ca` or `--pki-dir` + `--user`
    /// (or `TERN_PKI_DIR` + `TERN_USER`); `None` when no certificate was given.
    fn tls_files(&self) -> Result<Option<tern_pki::TlsFiles>, ClusterError> {
        if let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) {
            return Ok(Some(tern_pki::TlsFiles {
                ca_cert: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                deny_list: None,
            }));
        }
        let dir = self
            .pki_dir
            .clone()
            .or_else(|| env_nonempty("TERN_PKI_DIR").map(PathBuf::from));
        let user = self.user.clone().or_else(|| env_nonempty("TERN_USER"));
        match (dir, user) {
            (Some(dir), Some(user)) => {
                let mut files = tern_pki::TlsFiles::in_pki_dir(&dir, "user", &user);
                // The deny list is the server's business; a client only checks the CA.
                files.deny_list = None;
                if !files.cert.exists() {
                    return Err(ClusterError::BadInput(format!(
                        "no certificate for user {user:?} in {} (expected {}): issue one with \
                         `tern pki --dir {} issue user {user} --role ROLE` or give --user NAME",
                        dir.display(),
                        files.cert.display(),
                        dir.display()
                    )));
                }
                Ok(Some(files))
            }
            (Some(dir), None) => Err(ClusterError::BadInput(format!(
                "--pki-dir {} given without a user: pass --user NAME or set TERN_USER",
                dir.display()
            ))),
            (None, Some(user)) if self.pki_dir.is_some() || self.user.is_some() => {
                Err(ClusterError::BadInput(format!(
                    "--user {user} given without a PKI directory: pass --pki-dir DIR or set \
                     TERN_PKI_DIR"
                )))
            }
            _ => Ok(None),
        }
    }
}

/// A client of the controller's API.
pub struct ControllerClient {
    base: String,
    /// The bearer token (lab mode); `None` with mutual TLS.
    token: Option<String>,
    http: reqwest::Client,
    /// For the long-lived event stream: no overall timeout.
    stream: reqwest::Client,
}

impl ControllerClient {
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<T, ClusterError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            ClusterError::Unreachable(format!("controller {} unreachable: {e}", self.base))
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClusterError::Unreachable(format!("controller {}: {e}", self.base)))?;
        if status >= 400 {
            let msg = serde_json::from_str::<tern_server::api::ErrorBody>(&text)
                .map(|b| match b.details {
                    Some(d) => format!("{}\n{}", b.error, d),
                    None => b.error,
                })
                .unwrap_or(text);
            return Err(match status {
                400 | 401 | 403 | 404 | 409 | 422 => ClusterError::BadInput(msg),
                503 => ClusterError::Unreachable(msg),
                _ => ClusterError::Failed(msg),
            });
        }
        serde_json::from_str(&text).map_err(|e| {
            ClusterError::Failed(format!(
                "controller answered something unreadable ({e}): {text}"
            ))
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClusterError> {
        self.call(reqwest::Method::GET, path, None::<&()>).await
    }

    /// The server-sent event stream (`/v1/events`), or `None` when it cannot be opened.
    pub async fn events(&self) -> Option<reqwest::Response> {
        let mut req = self.stream.get(format!("{}/v1/events", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.ok()?;
        resp.status().is_success().then_some(resp)
    }

    /// Every host, following the pages.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(t) => format!("/v1/hosts?limit=500&after={t}"),
                None => "/v1/hosts?limit=500".to_string(),
            };
            let page: HostPage = self.get(&path).await?;
            out.extend(page.hosts);
            match page.next_page {
                Some(t) => after = Some(t),
                None => return Ok(out),
            }
        }
    }
}

fn host_line(h: &HostRecord) -> String {
    let age = now_ms().saturating_sub(h.last_heartbeat_ms) / 1000;
    format!(
        "{:<12} {:<11} {:>6}/{:<6} MiB free  QEMU {:<8} post-copy {:<9} out/in max {}/{}  heartbeat {age} s ago",
        h.name,
        h.state.as_str(),
        h.facts.free_memory_mib,
        h.facts.memory_mib,
        h.facts.qemu_version,
        if h.post_copy_permitted() {
            "permitted"
        } else {
            "denied"
        },
        h.outbound_limit(),
        h.inbound_limit(),
    )
}

/// `tern host list --server URL`.
pub async fn list_hosts(target: &ServerTarget, out: &OutputArgs) -> Result<(), Failure> {
    let hosts = target.connect()?.hosts().await?;
    match out.output {
        OutputFormat::Json => print_json(&hosts)?,
        OutputFormat::Text => {
            for h in &hosts {
                println!("{}", host_line(h));
            }
        }
    }
    Ok(())
}

/// `tern host show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Host name.
    host: String,
    #[command(flatten)]
    server: ServerTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern host show HOST`.
pub async fn show_host(a: ShowArgs) -> Result<(), Failure> {
    let h: HostRecord = a
        .server
        .connect()?
        .get(&format!("/v1/hosts/{}", a.host))
        .await?;
    match a.out.output {
        OutputFormat::Json => print_json(&h)?,
        OutputFormat::Text => {
            println!("{}", host_line(&h));
            println!(
                "capabilities: {}",
                h.facts.migration_capabilities.join(", ")
            );
        }
    }
    Ok(())
}

/// `--post-copy permit|deny`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PostCopyArg {
    /// Post-copy may be used where the agent and the VM allow it.
    Permit,
    /// Never switch to post-copy on migrations touching this host.
    Deny,
}

/// `tern host set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// Host name.
    host: String,
    /// Permit or deny post-copy on migrations from and to the host.
    #[arg(long, value_enum)]
    post_copy: Option<PostCopyArg>,
    /// Concurrent outgoing migrations (≥ 1).
    #[arg(long)]
    max_outbound: Option<u32>,
    /// Concurrent incoming migrations (≥ 1).
    #[arg(long)]
    max_inbound: Option<u32>,
    /// Mark the host draining (nothing is placed on it).
    #[arg(long, conflicts_with = "undrain")]
    drain: bool,
    /// Put a drained host back into service.
    #[arg(long)]
    undrain: bool,
    #[command(flatten)]
    server: ServerTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern host set HOST …`.
pub async fn set_host(a: SetArgs) -> Result<(), Failure> {
    let patch = HostPatch {
        post_copy: a.post_copy.map(|p| match p {
            PostCopyArg::Permit => PostCopySetting::Permit,
            PostCopyArg::Deny => PostCopySetting::Deny,
        }),
        max_outbound: a.max_outbound,
        max_inbound: a.max_inbound,
        drain: (a.drain || a.undrain).then_some(a.drain),
    };
    let h: HostRecord = a
        .server
        .connect()?
        .call(
            reqwest::Method::PATCH,
            &format!("/v1/hosts/{}", a.host),
            Some(&patch),
        )
        .await?;
    match a.out.output {
        OutputFormat::Json => print_json(&h)?,
        OutputFormat::Text => println!("{}", host_line(&h)),
    }
    Ok(())
}

/// `tern host evacuate`.
#[derive(Debug, Args)]
pub struct EvacuateArgs {
    /// The host to empty.
    host: String,
    /// When every VM must have left: 30m, 2h, 90s or seconds.
    #[arg(long, default_value = "1h")]
    deadline: String,
    /// Print the plan only; nothing changes.
    #[arg(long)]
    dry_run: bool,
    /// Follow the evacuation until it ends (exit 1 unless it completed).
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    server: ServerTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern host evacuate HOST [--deadline D] [--dry-run] [--watch]`.
pub async fn evacuate(a: EvacuateArgs) -> Result<(), Failure> {
    let c = a.server.connect()?;
    let req = EvacuateRequest {
        deadline: Some(DeadlineSpec::Text(a.deadline.clone())),
        dry_run: a.dry_run,
    };
    let r: EvacuateResponse = c
        .call(
            reqwest::Method::POST,
            &format!("/v1/hosts/{}/evacuate", a.host),
            Some(&req),
        )
        .await?;
    if a.out.output == OutputFormat::Json && !a.watch {
        return print_json(&r);
    }
    if a.out.output == OutputFormat::Text {
        let p = &r.plan;
        println!(
            "{} evacuation of {} ({} planner): {} VM(s), predicted {:.1} s, deadline {} s{}",
            if r.dry_run { "planned" } else { "started" },
            p.host,
            p.planner,
            p.migrations.len(),
            p.predicted_makespan_s,
            p.deadline_s,
            if p.fits_deadline { "" } else { " — AT RISK" }
        );
        for m in &p.migrations {
            println!(
                "  {:<16} → {:<10} start {:>7.1} s  takes {:>7.1} s  ({})",
                m.vm, m.destination, m.start_s, m.duration_s, m.reason
            );
        }
        if let Some(id) = &r.id {
            println!("evacuation {id}");
        }
    }
    match (&r.id, a.watch) {
        (Some(id), true) => watch(&c, id, a.out.output).await,
        _ => Ok(()),
    }
}

async fn watch(c: &ControllerClient, id: &str, out: OutputFormat) -> Result<(), Failure> {
    let mut last = String::new();
    let mut events = c.events().await;
    loop {
        let v: EvacuationView = c.get(&format!("/v1/evacuations/{id}")).await?;
        let line = v
            .migrations
            .iter()
            .map(|m| format!("{}→{} {}", m.vm, m.destination, m.state.as_str()))
            .collect::<Vec<_>>()
            .join("  ");
        if line != last && out == OutputFormat::Text {
            println!("{line}");
            last = line;
        }
        if v.evacuation.state.is_terminal() {
            if out == OutputFormat::Json {
                print_json(&v)?;
            } else {
                println!(
                    "evacuation {id} {}: actual {:.1} s vs predicted {:.1} s{}",
                    tern_server::model::enum_str(&v.evacuation.state),
                    v.evacuation.actual_makespan_s.unwrap_or(0.0),
                    v.evacuation.predicted_makespan_s,
                    v.evacuation
                        .error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            return if v.evacuation.state == tern_server::model::EvacuationState::Completed {
                Ok(())
            } else {
                Err(Failure::failed(anyhow::anyhow!(
                    "evacuation {id} did not complete"
                )))
            };
        }
        wait_for_change(c, &mut events, id, out).await;
    }
}

/// Waits for the next state change: an event on `/v1/events` (evacuation events for `id` are
/// printed: the deadline-at-risk warning arrives this way), or 5 s. Without the stream
/// (refused or closed) it falls back to polling every second.
async fn wait_for_change(
    c: &ControllerClient,
    events: &mut Option<reqwest::Response>,
    id: &str,
    out: OutputFormat,
) {
    let Some(stream) = events.as_mut() else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        *events = c.events().await;
        return;
    };
    match tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await {
        Err(_) => {}
        Ok(Ok(Some(chunk))) => {
            for line in String::from_utf8_lossy(&chunk).lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let Ok(ev) = serde_json::from_str::<serde_json::Value>(data.trim()) else {
                    continue;
                };
                if ev["kind"] == "evacuation" && ev["id"] == id && out == OutputFormat::Text {
                    println!(
                        "evacuation {}: {}",
                        ev["state"].as_str().unwrap_or("?"),
                        ev["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Ok(_) => *events = None,
    }
}

/// `tern migrate VM [--to HOST] --server URL`: the controller records the migration and
/// starts it through the source agent; without `--to` it chooses and says why.
pub async fn migrate(
    target: &ServerTarget,
    vm: &str,
    to: Option<&str>,
    context: &str,
    follow: bool,
    out: &OutputArgs,
) -> Result<(), Failure> {
    let c = target.connect()?;
    let context = tern_server::model::parse_enum(context).ok_or_else(|| {
        Failure::input(anyhow::anyhow!(
            "context {context:?} is invalid: give evacuate, maintenance, balance or manual"
        ))
    })?;
    let req = MigrationRequest {
        vm: vm.to_string(),
        to: to.map(str::to_string),
        context,
    };
    let r: MigrationCreated = c
        .call(reqwest::Method::POST, "/v1/migrations", Some(&req))
        .await?;
    match out.output {
        OutputFormat::Json if !follow => return print_json(&r),
        OutputFormat::Json => {}
        OutputFormat::Text => println!(
            "migration {}: {} from {} to {} — {}",
            r.migration.id, r.migration.vm, r.migration.source, r.migration.destination, r.reason
        ),
    }
    if !follow {
        return Ok(());
    }
    let mut seen = 0;
    loop {
        let v: MigrationView = c.get(&format!("/v1/migrations/{}", r.migration.id)).await?;
        if out.output == OutputFormat::Text {
            for e in v.events.iter().filter(|e| e.seq > seen) {
                println!("  [{}] {}", e.kind, e.detail);
            }
        }
        seen = v.events.last().map_or(seen, |e| e.seq);
        if v.migration.state.is_terminal() {
            if out.output == OutputFormat::Json {
                print_json(&v)?;
            }
            return if v.migration.state == tern_server::model::MigrationState::Completed {
                Ok(())
            } else {
                Err(Failure::failed(anyhow::anyhow!(
                    "migration {} ended {}",
                    v.migration.id,
                    v.migration.state.as_str()
                )))
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

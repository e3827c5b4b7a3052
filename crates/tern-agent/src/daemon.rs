//! The long-running agent of one host (`tern agent`): its VMs, the migrations it runs as
//! source, and what it does after a restart.
//!
//! A migration is run by the *source* agent, next to the source QEMU: it asks the destination
//! agent for an incoming QEMU, drives [`MigrationRunner`] with a [`RemoteDestination`], records
//! every event in SQLite, and on the terminal state tells the destination to promote
//! (completed) or delete (failed/aborted) the incoming VM, and stops its own QEMU on
//! completion. Invariant: the guest runs on exactly one host, before, during and after.
//!
//! QEMU processes outlive the agent (they are not killed when it exits, unless asked). After
//! a restart the agent re-attaches to them and hands every unfinished migration to
//! [`MigrationRunner::adopt`], which asks QEMU where it is and continues under the same rules
//! as a fresh run (the URI recovery needs is in the store):
//! - pre-copy (or not started): the source still holds the only running guest, so the
//!   migration is cancelled, the guest resumed if it was paused, the destination's incoming
//!   QEMU removed, and the migration recorded `failed` — the same outcome Nova gives a
//!   migration whose compute service restarted (`_cleanup_incomplete_migrations`), without
//!   its risk of a guest on neither host;
//! - post-copy, paused or recovering: the destination runs the guest and only the source has
//!   the missing pages, so cancelling is impossible; the runner supervises it, including
//!   `migrate-pause` and recovery after a network cut, until QEMU reports `completed`;
//! - completed: only the bookkeeping (quit the source, promote the destination) is left.
//!
//! A migration whose destination agent does not answer is `unknown` (never `lost`: its QEMU
//! may run the guest) and is adopted again at the next start. The report of an adopted
//! migration joins the events persisted before the restart with the adopting runner's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_engine::{
    AdoptedMigration, MigrationEvent, MigrationEventKind, MigrationProgress, MigrationReport,
    MigrationRunner, MigrationSetup, MigrationState, OperatorCommand, OperatorRequest, TakenAction,
};
use tern_policy::SlaCatalog;
use tern_qemu::QemuBinary;
use tern_qmp::MigrationCapability;

/// A set of QEMU migration capabilities.
type Capabilities = std::collections::BTreeSet<MigrationCapability>;
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot, watch};

use crate::api::{HostFacts, IncomingRequest, StartMigrationRequest};
use crate::config::AgentConfig;
use crate::host::{HostIdentity, HostRuntime, VmInfo, VmRole};
use crate::remote::{AgentClient, ClientError, RemoteDestination};
use crate::store::{MigrationRecord, Store, StoredEvent, StoredVm, now_ms};
use crate::{AgentError, api::MigrationView, bounds, edge, files};

mod admit;
mod destination;
mod dirty_rate;
pub mod heartbeat;
mod reconcile;

use admit::Admitted;

/// How the agent behaves beyond its configuration file.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentOptions {
    /// Stop every VM when the agent exits (tests); by default QEMUs keep running and a
    /// restarted agent re-attaches to them.
    pub stop_vms_on_exit: bool,
}

/// How long a migration left `unknown` waits before it is adopted again.
const UNKNOWN_READOPT_DELAY: Duration = Duration::from_secs(30);

struct ActiveMigration {
    vm: String,
    control: Option<mpsc::Sender<OperatorRequest>>,
    progress: Option<watch::Receiver<MigrationProgress>>,
    /// Why operator commands are refused when there is no control channel (a migration
    /// resumed after a restart).
    no_control_reason: String,
}

struct Inner {
    config: AgentConfig,
    options: AgentOptions,
    host: HostRuntime,
    store: Store,
    /// Every mutating API request, with who made it.
    audit: crate::audit::StoreAudit,
    catalog: SlaCatalog,
    active: Mutex<BTreeMap<String, ActiveMigration>>,
    /// The host QEMU binary's migration capabilities and commands, probed once.
    capabilities: AsyncMutex<Option<QemuProbe>>,
    /// Serialises migration admission so two requests for one VM cannot both pass the checks.
    admission: AsyncMutex<()>,
    /// This agent's exclusive hold on its runtime directory (and database).
    _lock: files::RuntimeLock,
    /// The newest controller-leader epoch seen (issue 12, [`crate::fencing`]).
    fencing: Arc<crate::fencing::FencingLedger>,
}

/// One host's agent. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

fn client_err(e: ClientError) -> AgentError {
    match e {
        ClientError::Api { status, message } => match status {
            404 => AgentError::NotFound(message),
            409 => AgentError::Conflict(message),
            422 => AgentError::InsufficientMemory(message),
            400 => AgentError::Invalid(message),
            _ => AgentError::Unavailable(message),
        },
        other => AgentError::Unavailable(other.to_string()),
    }
}

fn state_event(
    at_ms: u64,
    from: MigrationState,
    to: MigrationState,
    reason: &str,
) -> MigrationEvent {
    MigrationEvent {
        at_ms,
        kind: MigrationEventKind::State {
            from,
            to,
            reason: reason.to_string(),
        },
    }
}

fn note(at_ms: u64, text: impl Into<String>) -> MigrationEvent {
    MigrationEvent {
        at_ms,
        kind: MigrationEventKind::Note { text: text.into() },
    }
}

/// Writes QEMU's migration TLS credentials (`<runtime_dir>/qemu-tls`, 0700, files 0600) from
/// the host certificate in `[tls]` when the host's `migration_tls` is `required`; refuses to
/// start, naming the file, when they cannot be read: a host that must encrypt its streams
/// never falls back to plain text.
fn migration_tls_creds(config: &AgentConfig) -> Result<Option<std::path::PathBuf>, AgentError> {
    if config.migration_tls_mode() == crate::config::MigrationTlsMode::Off {
        tracing::warn!(
            host = %config.host,
            "migration_tls = off: migration streams of this host are NOT encrypted (lab only)"
        );
        return Ok(None);
    }
    let Some(tls) = &config.tls else {
        return Err(AgentError::Config(format!(
            "migration_tls = \"required\" on host {} but there is no [tls] section with the \
             host's certificate; add one or set migration_tls = \"off\" for a lab",
            config.host
        )));
    };
    let files = tls.files(&config.host)?;
    let dir = config.runtime_dir.join("qemu-tls");
    tern_pki::write_qemu_creds(&files, &dir).map_err(|e| {
        AgentError::Config(format!(
            "migration_tls = \"required\" on host {} but QEMU's TLS credentials cannot be \
             made from [tls] ({e}); issue the host certificate (`tern pki issue host {}`) or \
             set migration_tls = \"off\" for a lab",
            config.host, config.host
        ))
    })?;
    tracing::info!(host = %config.host, dir = %dir.display(), "migration streams are encrypted (TLS)");
    Ok(Some(dir))
}

impl Agent {
    /// A client of the peer agent at `url`: with this host's certificate for an `https://`
    /// peer (see [`AgentClient::for_peer`]).
    pub(crate) fn peer_client(&self, url: &str) -> Result<AgentClient, AgentError> {
        let config = &self.inner.config;
        let files = match &config.tls {
            Some(tls) => Some(tls.files(&config.host)?),
            None => None,
        };
        AgentClient::for_peer(url, files.as_ref())
    }

    /// [`Self::peer_client`] where a failure cannot be returned (settling after the fact):
    /// the error is logged and the plain client's calls then fail as unreachable.
    fn peer_client_or_plain(&self, url: &str) -> AgentClient {
        self.peer_client(url).unwrap_or_else(|e| {
            tracing::error!(error = %e, %url, "no client for the peer agent");
            AgentClient::new(url)
        })
    }

    /// Opens the agent's database, re-attaches to the QEMUs it lists and settles unfinished
    /// migrations (in background tasks). Must be called inside a tokio runtime.
    pub async fn start(config: AgentConfig, options: AgentOptions) -> Result<Self, AgentError> {
        // Read the controller's token first: a bad [controller] section stops the start
        // before anything is opened.
        let heartbeat = match &config.controller {
            Some(c) => Some((
                heartbeat::HeartbeatSender::from_config(
                    c,
                    config
                        .tls
                        .as_ref()
                        .map(|t| t.files(&config.host))
                        .transpose()?
                        .as_ref(),
                )
                .map_err(|e| AgentError::Config(e.to_string()))?,
                Duration::from_secs(c.interval_s),
            )),
            None => None,
        };
        let qemu = QemuBinary::locate()?;
        files::private_dir(&config.runtime_dir)?;
        let lock = files::lock_runtime_dir(&config.runtime_dir)?;
        let db = config.runtime_dir.join("agent.db");
        files::private_file(&db)?;
        let store = Store::open(&db)?;
        let audit = crate::audit::StoreAudit::open(store.clone())?;
        let fencing =
            crate::fencing::FencingLedger::open(&config.runtime_dir.join("fencing-epoch"))
                .map_err(|e| AgentError::Config(e.to_string()))?;
        let host = HostRuntime::new(
            HostIdentity {
                name: config.host.clone(),
                netns: config.netns.clone(),
                migration_address: config.migration_address,
                memory_mib: config.memory_mib,
            },
            config.migration.clone(),
            qemu,
            config.runtime_dir.join("vms"),
        );
        let host = match migration_tls_creds(&config)? {
            Some(dir) => host.with_migration_tls(dir),
            None => host,
        };
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                options,
                host,
                store,
                audit,
                catalog: SlaCatalog::builtin(),
                active: Mutex::new(BTreeMap::new()),
                capabilities: AsyncMutex::new(None),
                admission: AsyncMutex::new(()),
                _lock: lock,
                fencing,
            }),
        };
        agent.readopt().await?;
        agent.resume_unfinished().await?;
        if let Some((sender, interval)) = heartbeat {
            tokio::spawn(heartbeat::run(
                Arc::downgrade(&agent.inner),
                sender,
                interval,
            ));
        }
        Ok(agent)
    }

    /// The newest controller-leader epoch this agent accepted (see [`crate::fencing`]).
    pub fn fencing(&self) -> Arc<crate::fencing::FencingLedger> {
        self.inner.fencing.clone()
    }

    /// The agent's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    /// The host's VMs.
    pub fn host(&self) -> &HostRuntime {
        &self.inner.host
    }

    /// The audit log of the agent's API.
    pub fn audit(&self) -> &crate::audit::StoreAudit {
        &self.inner.audit
    }

    /// The agent's database.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// What happens to the VMs when the agent exits: detached (default) or stopped.
    pub async fn shutdown(&self) {
        if self.inner.options.stop_vms_on_exit {
            self.inner.host.stop_all().await;
        } else {
            let pids = self.inner.host.detach_all();
            tracing::info!(?pids, "agent exiting; QEMU processes keep running");
        }
    }

    async fn readopt(&self) -> Result<(), AgentError> {
        for vm in self.inner.store.vms().await? {
            let name = vm.spec.name.clone();
            match self
                .inner
                .host
                .adopt_vm(vm.spec, vm.role, vm.pid, vm.runtime_dir)
                .await
            {
                Ok(_) => {
                    tracing::info!(vm = %name, pid = vm.pid, "re-attached to QEMU");
                    if vm.role == VmRole::Incoming {
                        // Keep the inbound count right until the migration is settled: by the
                        // source agent, or by this agent from the source's record.
                        let _ = self.inner.host.begin_inbound(&name);
                        self.reconcile_incoming_later(name.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %name, pid = vm.pid, error = %e, "QEMU is gone; forgetting the VM");
                    self.inner.store.delete_vm(&name).await?;
                }
            }
        }
        Ok(())
    }

    async fn persist_vm(&self, name: &str) -> Result<(), AgentError> {
        let h = &self.inner.host;
        self.inner
            .store
            .put_vm(StoredVm {
                spec: h.spec(name)?,
                role: h.role(name)?,
                pid: h.pid(name)?,
                runtime_dir: h.runtime_dir_of(name)?,
            })
            .await
    }

    // ---- host and VMs -------------------------------------------------------------------

    /// Host facts (`GET /v1/host`).
    pub async fn facts(&self) -> HostFacts {
        let h = &self.inner.host;
        let probe = self.capabilities().await;
        let accel = std::fs::read_to_string(&self.inner.config.accelerator_cache)
            .ok()
            .and_then(|t| serde_json::from_str::<tern_qemu::AcceleratorVerdict>(&t).ok())
            .map(|v| v.accelerator.to_string())
            .unwrap_or_else(|| "unknown".to_string());
        let (outbound, inbound) = {
            let active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
            let out = active.len() as u32;
            let vms: Vec<VmRole> = h.names().iter().filter_map(|n| h.role(n).ok()).collect();
            (
                out,
                vms.iter().filter(|r| **r == VmRole::Incoming).count() as u32,
            )
        };
        HostFacts {
            host: self.inner.config.host.clone(),
            migration_address: self.inner.config.migration_address,
            netns: self.inner.config.netns.clone(),
            memory_mib: self.inner.config.memory_mib,
            committed_memory_mib: h.committed_memory_mib(),
            free_memory_mib: h.free_memory_mib(),
            machine_available_mib: mem_available_mib(),
            qemu_version: h.qemu().version.to_string(),
            qemu_path: h.qemu().path.display().to_string(),
            migration_capabilities: probe.capabilities,
            qemu_commands: probe.commands,
            accelerator: accel,
            kvm_device: std::path::Path::new("/dev/kvm").exists(),
            migration: self.inner.config.migration.clone(),
            outbound_migrations: outbound,
            inbound_migrations: inbound,
        }
    }

    async fn capabilities(&self) -> QemuProbe {
        let mut cached = self.inner.capabilities.lock().await;
        if let Some(c) = cached.as_ref() {
            return c.clone();
        }
        match probe_capabilities(self.inner.host.qemu(), &self.inner.config.runtime_dir).await {
            Ok(c) => {
                *cached = Some(c.clone());
                c
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not probe QEMU's migration capabilities");
                QemuProbe::default()
            }
        }
    }

    /// Boots a VM (`POST /v1/vms`).
    pub async fn create_vm(&self, spec: tern_qemu::VmSpec) -> Result<VmInfo, AgentError> {
        let spec = self.checked_spec(spec)?;
        let name = spec.name.clone();
        let info = self.inner.host.create_vm(spec).await?;
        if let Err(e) = self.persist_vm(&name).await {
            let _ = self.inner.host.kill_vm(&name).await;
            return Err(e);
        }
        Ok(info)
    }

    /// Stops a VM (`DELETE /v1/vms/{name}`); refused while it migrates.
    pub async fn stop_vm(&self, name: &str) -> Result<(), AgentError> {
        let role = self.inner.host.role(name)?;
        if let Some(id) = self.migration_of(name) {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} is migrating (migration {id}): abort the migration first"
            )));
        }
        if role == VmRole::Incoming {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} is the incoming side of a migration: it is removed by the source \
                 agent (or `DELETE /v1/incoming/{name}`)"
            )));
        }
        self.inner.host.stop_vm(name).await?;
        self.inner.store.delete_vm(name).await
    }

    /// A client's VM spec, checked before anything starts: images inside the configured
    /// image directories, a known SLA class, valid sizes.
    fn checked_spec(&self, spec: tern_qemu::VmSpec) -> Result<tern_qemu::VmSpec, AgentError> {
        let spec = edge::confine_images(spec, &self.inner.config.image_dirs)?;
        edge::check_sla_class(&spec, &self.inner.catalog)?;
        bounds::check_memory_mib(spec.memory_mib)?;
        spec.validate()?;
        Ok(spec)
    }

    fn migration_of(&self, vm: &str) -> Option<String> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, m)| m.vm == vm)
            .map(|(id, _)| id.clone())
    }

    /// Starts a migration of one of this host's VMs (`POST /v1/migrations`). Every check runs
    /// before anything is started; on any error nothing has changed.
    pub async fn start_migration(
        &self,
        req: StartMigrationRequest,
    ) -> Result<MigrationRecord, AgentError> {
        let _admission = self.inner.admission.lock().await;
        let h = &self.inner.host;
        let me = self.inner.config.host.clone();
        let Admitted {
            spec,
            url,
            dest,
            facts: _,
            order,
            input,
        } = self.admit(&req).await?;
        let policy = order.policy.build();
        let source_qmp = h.qmp(&req.vm)?;
        h.begin_outbound(&req.vm)?;
        let created = now_ms();
        let id = format!("{}-{created:x}", req.vm);
        let incoming = match dest
            .prepare_incoming(&IncomingRequest {
                spec: spec.clone(),
                migration_id: Some(id.clone()),
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                h.end_migration(&req.vm);
                return Err(client_err(e));
            }
        };
        if incoming.stream_encrypted != h.migration_tls() {
            let _ = dest.delete_incoming(&req.vm).await;
            h.end_migration(&req.vm);
            let mode = |on: bool| if on { "required" } else { "off" };
            return Err(AgentError::Conflict(format!(
                "host {me} has migration_tls = {} but host {} has migration_tls = {}: a stream \
                 is encrypted at both ends or at neither; set the same mode on both hosts",
                mode(h.migration_tls()),
                req.to_host,
                mode(incoming.stream_encrypted)
            )));
        }
        let record = MigrationRecord {
            id: id.clone(),
            vm: req.vm.clone(),
            source: me.clone(),
            destination: req.to_host.clone(),
            destination_url: url.clone(),
            context: req.context,
            policy: req.policy,
            state: MigrationState::Pending,
            created_ms: created,
            updated_ms: created,
            finished_ms: None,
            error: None,
            report: None,
            link_bytes_per_s: order.link_bytes_per_s,
            stream_uri: Some(incoming.uri.clone()),
            stream_encrypted: h.migration_tls(),
        };
        if let Err(e) = self.inner.store.insert_migration(record.clone()).await {
            let _ = dest.delete_incoming(&req.vm).await;
            h.end_migration(&req.vm);
            return Err(e);
        }
        let _ = self
            .inner
            .store
            .append_event(
                &id,
                &note(
                    0,
                    format!(
                        "accepted: {} from {me} to {} (context {}, policy {}); destination QEMU \
                         ready, stream to {}",
                        req.vm, req.to_host, req.context, req.policy, incoming.uri
                    ),
                ),
            )
            .await;
        let mut setup = MigrationSetup::new(id.clone(), incoming.uri.clone(), input);
        setup.tls = h.source_stream_tls(&req.to_host);
        setup.recovery_window =
            Duration::from_secs(self.inner.config.migration.postcopy_recovery_window_s);
        let runner = MigrationRunner::new(
            source_qmp,
            Box::new(RemoteDestination::with_client(
                self.peer_client_or_plain(&url),
                &req.vm,
            )),
            policy,
            setup,
        );
        if let Err(why) = self.drive(&record, runner, None) {
            self.conclude(&record, MigrationState::Failed, Some(why.clone()))
                .await;
            return Err(AgentError::Internal(why));
        }
        Ok(record)
    }

    /// Runs `runner` (fresh, or adopting a migration when `adopted` is set) on a thread of its
    /// own, persists its events as they come, registers it for operator commands and
    /// progress, and settles the migration when it ends. Fails only if the thread cannot be
    /// started (nothing has been done then).
    fn drive(
        &self,
        record: &MigrationRecord,
        runner: MigrationRunner,
        adopted: Option<AdoptedMigration>,
    ) -> Result<(), String> {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let runner = runner.with_event_sink(ev_tx);
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let id = record.id.clone();
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                ActiveMigration {
                    vm: record.vm.clone(),
                    control: Some(ctl_tx),
                    progress: Some(runner.progress()),
                    no_control_reason: String::new(),
                },
            );
        let persister = self.spawn_persister(id.clone(), ev_rx);
        let agent = self.clone();
        let rec = record.clone();
        // The runner's future is not `Send` (it borrows its policy across awaits), so it runs
        // on a thread of its own with a current-thread runtime; QMP and HTTP clients work
        // across runtimes.
        let (done_tx, done_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("migration-{}", rec.vm))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let report = rt.block_on(async move {
                            match adopted {
                                Some(a) => runner.adopt(a, ctl_rx).await,
                                None => runner.run(ctl_rx).await,
                            }
                        });
                        let _ = done_tx.send(Ok(report));
                    }
                    Err(e) => {
                        let _ =
                            done_tx.send(Err(format!("cannot start the migration runtime: {e}")));
                    }
                }
            });
        if let Err(e) = thread {
            self.release(record);
            return Err(format!("cannot start the migration thread: {e}"));
        }
        tokio::spawn(async move {
            let report = done_rx.await;
            let _ = persister.await;
            let why = match report {
                Ok(Ok(report)) => {
                    let report = if adopted.is_some() {
                        agent.with_history(&rec, report).await
                    } else {
                        report
                    };
                    agent.finish_migration(&rec, report).await;
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => "the migration thread ended without a report".to_string(),
            };
            if adopted.is_some() {
                // Where the guest is was not established: leave the migration unfinished
                // for the next start to adopt, and both QEMUs in place.
                agent
                    .event(
                        &rec,
                        note(Self::since(&rec), format!("adoption failed: {why}")),
                    )
                    .await;
                agent.release(&rec);
            } else {
                agent
                    .conclude(&rec, MigrationState::Failed, Some(why))
                    .await;
            }
        });
        Ok(())
    }

    fn spawn_persister(
        &self,
        id: String,
        mut rx: mpsc::UnboundedReceiver<MigrationEvent>,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Err(e) = store.append_event(&id, &ev).await {
                    tracing::error!(migration = %id, error = %e, "cannot persist event");
                }
                if let MigrationEventKind::State { to, .. } = ev.kind
                    && let Err(e) = store.set_state(&id, to).await
                {
                    tracing::error!(migration = %id, error = %e, "cannot persist state");
                }
            }
        })
    }

    async fn event(&self, rec: &MigrationRecord, ev: MigrationEvent) {
        if let Err(e) = self.inner.store.append_event(&rec.id, &ev).await {
            tracing::error!(migration = %rec.id, error = %e, "cannot persist event");
        }
    }

    fn since(rec: &MigrationRecord) -> u64 {
        now_ms().saturating_sub(rec.created_ms)
    }

    /// Bookkeeping after the engine reached a terminal state: the guest must end up on
    /// exactly one host.
    async fn finish_migration(&self, rec: &MigrationRecord, report: MigrationReport) {
        self.settle(rec, report.state).await;
        if report.state == MigrationState::Unknown {
            // Not an end: adopted again later (and at the next start), asking both sides.
            let _ = self.inner.store.set_state(&rec.id, report.state).await;
            self.release(rec);
            self.adopt_again_later(rec);
            return;
        }
        if let Err(e) = self
            .inner
            .store
            .finish(&rec.id, report.state, report.error.clone(), Some(&report))
            .await
        {
            tracing::error!(migration = %rec.id, error = %e, "cannot persist the report");
        }
        self.release(rec);
    }

    /// Completed: stop the source QEMU and promote the destination's. Failed/aborted: remove
    /// the destination's. Lost: leave both for the operator.
    async fn settle(&self, rec: &MigrationRecord, state: MigrationState) {
        let dest = self.peer_client_or_plain(&rec.destination_url);
        match state {
            MigrationState::Completed => {
                let mut promoted = Err(ClientError::Api {
                    status: 0,
                    message: String::new(),
                });
                for _ in 0..10 {
                    promoted = dest.promote_incoming(&rec.vm).await;
                    if promoted.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let text = match promoted {
                    Ok(_) => format!("destination {} promoted the guest", rec.destination),
                    Err(e) => format!(
                        "destination {} did not confirm the promotion: {e}",
                        rec.destination
                    ),
                };
                self.event(rec, note(Self::since(rec), text)).await;
                match self.inner.host.stop_vm(&rec.vm).await {
                    Ok(()) => {
                        let _ = self.inner.store.delete_vm(&rec.vm).await;
                        self.event(
                            rec,
                            note(
                                Self::since(rec),
                                "source QEMU quit; the guest runs only on the destination",
                            ),
                        )
                        .await;
                    }
                    Err(e) => {
                        self.event(
                            rec,
                            note(Self::since(rec), format!("stopping the source QEMU: {e}")),
                        )
                        .await
                    }
                }
            }
            MigrationState::Lost => {
                self.event(
                    rec,
                    note(
                        Self::since(rec),
                        "guest state lost after the switch: both QEMUs are kept for the operator",
                    ),
                )
                .await;
            }
            MigrationState::Stranded | MigrationState::Unknown => {
                // The guest's state is split between the QEMUs (stranded) or where it runs is
                // not known (unknown): removing either QEMU could lose it or, after a restart
                // elsewhere, run it twice.
                self.event(
                    rec,
                    note(
                        Self::since(rec),
                        format!("migration {state}: both QEMUs are kept for the operator"),
                    ),
                )
                .await;
            }
            _ => {
                let text = match dest.delete_incoming(&rec.vm).await {
                    Ok(_) => format!(
                        "destination {} removed its incoming QEMU; the guest stays on {}",
                        rec.destination, rec.source
                    ),
                    Err(e) if e.status() == Some(404) => format!(
                        "destination {} has no incoming QEMU left; the guest stays on {}",
                        rec.destination, rec.source
                    ),
                    Err(e) => format!(
                        "removing the destination's incoming QEMU failed ({e}); the guest stays on {}",
                        rec.source
                    ),
                };
                self.event(rec, note(Self::since(rec), text)).await;
            }
        }
    }

    async fn resume_unfinished(&self) -> Result<(), AgentError> {
        for rec in self.inner.store.unfinished_migrations().await? {
            if rec.source != self.inner.config.host {
                continue;
            }
            self.adopt_unfinished(rec);
        }
        Ok(())
    }

    /// Hands an unfinished migration to an adopting runner (in the background).
    fn adopt_unfinished(&self, rec: MigrationRecord) {
        {
            let _ = self.inner.host.begin_outbound(&rec.vm);
            self.inner
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    rec.id.clone(),
                    ActiveMigration {
                        vm: rec.vm.clone(),
                        control: None,
                        progress: None,
                        no_control_reason: format!(
                            "migration {} is being settled after an agent restart (it was {})",
                            rec.id, rec.state
                        ),
                    },
                );
        }
        let agent = self.clone();
        tokio::spawn(async move { agent.recover(rec).await });
    }

    /// A migration left `unknown` (the destination agent did not answer) is adopted again
    /// after a while, so it ends `completed` once the destination answers, without waiting
    /// for this agent to restart.
    fn adopt_again_later(&self, rec: &MigrationRecord) {
        let agent = self.clone();
        let id = rec.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(UNKNOWN_READOPT_DELAY).await;
            if let Ok(Some(rec)) = agent.inner.store.migration(&id).await
                && rec.finished_ms.is_none()
                && agent.migration_of(&rec.vm).is_none()
            {
                agent.adopt_unfinished(rec);
            }
        });
    }

    async fn transition(
        &self,
        rec: &MigrationRecord,
        from: MigrationState,
        to: MigrationState,
        why: &str,
    ) {
        if from != to {
            self.event(rec, state_event(Self::since(rec), from, to, why))
                .await;
        }
        let _ = self.inner.store.set_state(&rec.id, to).await;
    }

    async fn conclude(&self, rec: &MigrationRecord, state: MigrationState, error: Option<String>) {
        self.settle(rec, state).await;
        let _ = self.inner.store.finish(&rec.id, state, error, None).await;
        self.release(rec);
    }

    /// The migration no longer holds its VM or a slot among the active ones.
    fn release(&self, rec: &MigrationRecord) {
        self.inner.host.end_migration(&rec.vm);
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.id);
    }

    /// Settles a migration found unfinished after a restart (see the module docs): the
    /// runner adopts it at its current phase (pre-copy: cancel, the guest stays on the
    /// source; post-copy, paused or recovering: supervised, including recovery, to the end).
    async fn recover(&self, rec: MigrationRecord) {
        let from = rec.state;
        self.event(
            &rec,
            note(
                Self::since(&rec),
                format!("agent restarted; the migration was {from}: adopting it"),
            ),
        )
        .await;
        let Ok(qmp) = self.inner.host.qmp(&rec.vm) else {
            self.settle_without_source(&rec).await;
            return;
        };
        let policy = rec.policy.build();
        let Ok(input) = self.adoption_input(&rec) else {
            let why = "cannot rebuild the migration's policy or limits; left for the operator";
            self.event(&rec, note(Self::since(&rec), why)).await;
            self.release(&rec);
            return;
        };
        let uri = rec.stream_uri.clone().unwrap_or_default();
        if uri.is_empty() {
            self.event(
                &rec,
                note(
                    Self::since(&rec),
                    "the migration's stream URI was not recorded (older agent): post-copy \
                     recovery is impossible for it",
                ),
            )
            .await;
        }
        let mut setup = MigrationSetup::new(rec.id.clone(), uri, input);
        setup.tls = self.inner.host.source_stream_tls(&rec.destination);
        setup.recovery_window =
            Duration::from_secs(self.inner.config.migration.postcopy_recovery_window_s);
        let runner = MigrationRunner::new(
            qmp,
            Box::new(RemoteDestination::with_client(
                self.peer_client_or_plain(&rec.destination_url),
                &rec.vm,
            )),
            policy,
            setup,
        );
        let adopted = AdoptedMigration {
            state: from,
            elapsed_ms: Self::since(&rec),
            recoveries: self.recoveries_recorded(&rec).await,
        };
        if let Err(why) = self.drive(&rec, runner, Some(adopted)) {
            self.event(&rec, note(Self::since(&rec), why)).await;
        }
    }

    /// The plan input the adopting runner is given. It does not plan (the migration runs
    /// already); the input only has to be valid.
    fn adoption_input(&self, rec: &MigrationRecord) -> Result<tern_policy::PlanInput, AgentError> {
        let spec = self.inner.host.spec(&rec.vm)?;
        let sla = self
            .inner
            .catalog
            .get(&spec.migration.sla_class)
            .or_else(|_| self.inner.catalog.get("standard"))
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .clone();
        let context = rec.context;
        Ok(tern_policy::PlanInput::new(
            context,
            sla,
            tern_policy::VmLimits::new(spec.memory_mib * 1024 * 1024),
            tern_policy::QemuFeatures::qemu_10_tcg(),
        ))
    }

    /// Post-copy recoveries already recorded for `rec` (before the restart).
    async fn recoveries_recorded(&self, rec: &MigrationRecord) -> u32 {
        let events = self
            .inner
            .store
            .events(&rec.id, 0)
            .await
            .unwrap_or_default();
        events
            .iter()
            .filter(|e| {
                matches!(
                    e.event.kind,
                    MigrationEventKind::State {
                        from: MigrationState::Recovering,
                        to: MigrationState::Postcopy,
                        ..
                    }
                )
            })
            .count() as u32
    }

    /// The source QEMU is gone: the guest is wherever the destination says. An unreachable
    /// destination agent says nothing: the migration is `unknown` and adopted again at the
    /// next start.
    async fn settle_without_source(&self, rec: &MigrationRecord) {
        let from = rec.state;
        let dest = self.peer_client_or_plain(&rec.destination_url);
        match dest.show_vm(&rec.vm).await {
            Ok(i) if i.run_state.is_running() => {
                self.transition(
                    rec,
                    from,
                    MigrationState::Completed,
                    "agent restarted; the source QEMU is gone and the destination runs the guest",
                )
                .await;
                self.conclude(rec, MigrationState::Completed, None).await;
            }
            Err(e @ ClientError::Unreachable { .. }) => {
                let why = format!(
                    "agent restarted; the source QEMU is gone and the destination agent does \
                     not answer ({e}): where the guest runs is not known"
                );
                self.transition(rec, from, MigrationState::Unknown, &why)
                    .await;
                self.release(rec);
                self.adopt_again_later(rec);
            }
            _ => {
                let why = "agent restarted; the source QEMU is gone and the destination does not run the guest";
                self.transition(rec, from, MigrationState::Lost, why).await;
                self.conclude(rec, MigrationState::Lost, Some(why.into()))
                    .await;
            }
        }
    }

    /// The report of a migration adopted after a restart: the adopting runner's report,
    /// with the events and actions persisted before the restart (the runner that made them
    /// died with the old process) so the report covers the whole migration.
    async fn with_history(
        &self,
        rec: &MigrationRecord,
        mut report: MigrationReport,
    ) -> MigrationReport {
        let events: Vec<MigrationEvent> = self
            .inner
            .store
            .events(&rec.id, 0)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.event)
            .collect();
        let mut actions = Vec::new();
        for e in &events {
            match &e.kind {
                MigrationEventKind::State { to, .. } => {
                    report.switched_to_postcopy |= *to == MigrationState::Postcopy;
                }
                MigrationEventKind::Decision { action, reason } => {
                    // Supervisor decisions (`postcopy-…`) name no policy action.
                    if let Some(taken) = TakenAction::from_text(e.at_ms, action, reason.clone())
                        && taken.action != tern_policy::ActionKind::Continue
                    {
                        report.paused_guest |= taken.action == tern_policy::ActionKind::PauseGuest;
                        actions.push(taken);
                    }
                }
                _ => {}
            }
        }
        if !events.is_empty() {
            report.events = events;
            report.actions = actions;
        }
        if report.post_copy_verdict.is_empty() {
            report.post_copy_verdict = "unknown after the agent restart".into();
        }
        report
    }

    // ---- reads and operator commands ----------------------------------------------------

    /// A migration with live progress and events after `after`.
    pub async fn migration(&self, id: &str, after: u64) -> Result<MigrationView, AgentError> {
        let record = self.inner.store.migration(id).await?.ok_or_else(|| {
            AgentError::NotFound(format!(
                "no migration {id:?} on host {} (list them with GET /v1/migrations)",
                self.inner.config.host
            ))
        })?;
        let progress = self
            .inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|m| m.progress.as_ref().map(|p| p.borrow().clone()));
        let events: Vec<StoredEvent> = self.inner.store.events(id, after).await?;
        Ok(MigrationView {
            record,
            progress,
            events,
        })
    }

    /// Every migration this agent ran as source, newest first.
    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        self.inner.store.migrations().await
    }

    /// Sends an operator command to a running migration and returns its answer; a refusal
    /// (e.g. abort after the switch to post-copy) is a `Conflict` naming the reason.
    pub async fn operator(&self, id: &str, command: OperatorCommand) -> Result<String, AgentError> {
        let control = {
            let active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
            active
                .get(id)
                .map(|m| (m.control.clone(), m.no_control_reason.clone()))
        };
        let (control, why) = match control {
            Some(c) => c,
            None => {
                let rec = self.inner.store.migration(id).await?.ok_or_else(|| {
                    AgentError::NotFound(format!(
                        "no migration {id:?} on host {}",
                        self.inner.config.host
                    ))
                })?;
                return Err(AgentError::Conflict(format!(
                    "migration {id} already ended ({})",
                    rec.state
                )));
            }
        };
        let Some(control) = control else {
            return Err(AgentError::Conflict(why));
        };
        let (tx, rx) = oneshot::channel();
        control
            .send(OperatorRequest { command, reply: tx })
            .await
            .map_err(|_| AgentError::Conflict(format!("migration {id} already ended")))?;
        match rx.await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(s)) => Err(AgentError::Conflict(s)),
            Err(_) => Err(AgentError::Conflict(format!(
                "migration {id} already ended"
            ))),
        }
    }
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// What the host's QEMU binary supports for migrations.
#[derive(Debug, Clone, Default)]
struct QemuProbe {
    /// `query-migrate-capabilities`.
    capabilities: Capabilities,
    /// `query-commands` names.
    commands: Vec<String>,
}

/// Asks a throwaway QEMU (`-machine none`) which migration capabilities and commands it
/// supports.
async fn probe_capabilities(
    qemu: &QemuBinary,
    runtime_dir: &std::path::Path,
) -> Result<QemuProbe, AgentError> {
    let sock = runtime_dir.join("caps-probe.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = tokio::process::Command::new(&qemu.path)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            AgentError::Internal(format!("starting QEMU for the capability probe: {e}"))
        })?;
    let result = async {
        let (qmp, _ev) =
            tern_qmp::QmpClient::connect_with_retry(&sock, Duration::from_secs(5)).await?;
        let caps = qmp.supported_capabilities().await?;
        let commands = tern_engine::endpoint::command_names(&qmp).await;
        let _ = qmp.quit().await;
        Ok::<_, AgentError>(QemuProbe {
            capabilities: caps,
            commands: commands.into_iter().collect(),
        })
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&sock);
    result
}

//! The VMs of one host: the part of an agent that owns QEMU processes.
//!
//! A [`HostRuntime`] starts guests from a [`VmSpec`], starts receiving QEMUs for incoming
//! migrations, hands out QMP clients, and stops guests. It refuses what would fail half-way
//! (a VM larger than the host's free memory, a duplicate name) before starting anything.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_qemu::{LaunchMode, QemuBinary, VmLaunch, VmProcess, VmSpec};
use tern_qmp::{QmpClient, RunState};

use crate::AgentError;
use crate::config::HostMigrationConfig;

/// Who a host is: its name, where its QEMUs run, and where migration streams reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// Operator-facing host name (`h1`).
    pub name: String,
    /// Network namespace QEMU runs in (a lab host), or `None` for the agent's own.
    pub netns: Option<String>,
    /// Address incoming migration streams are received on.
    pub migration_address: IpAddr,
    /// Memory this host offers to guests, in MiB.
    pub memory_mib: u64,
}

/// What role a QEMU process plays on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmRole {
    /// A guest that runs here.
    Running,
    /// A paused QEMU waiting for an incoming migration stream.
    Incoming,
}

/// A guest as reported to operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInfo {
    /// The spec it was started from.
    pub spec: VmSpec,
    /// Its role on this host.
    pub role: VmRole,
    /// QEMU's PID.
    pub pid: u32,
    /// QEMU's run state (`running`, `paused`, `postmigrate`, `inmigrate`, …), or what the
    /// agent knows when QEMU cannot say (`exited`, `unreachable`).
    #[schema(value_type = String, example = "running")]
    pub run_state: VmRunState,
    /// The host-timestamped serial log.
    #[schema(value_type = String)]
    pub serial_log: PathBuf,
}

/// A VM's run state as the agent reports it. JSON: the bare name (`"running"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VmRunState {
    /// QEMU could not be asked.
    Agent(ProcessState),
    /// What QEMU's `query-status` says.
    Qemu(RunState),
}

/// Why QEMU could not be asked for its run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// Not asked yet (a VM being started).
    Starting,
    /// The QEMU process has exited.
    Exited,
    /// QEMU runs but does not answer on QMP.
    Unreachable,
}

impl VmRunState {
    /// Whether the guest's vCPUs run.
    pub fn is_running(&self) -> bool {
        matches!(self, Self::Qemu(RunState::Running))
    }
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent(ProcessState::Starting) => f.write_str("starting"),
            Self::Agent(ProcessState::Exited) => f.write_str("exited"),
            Self::Agent(ProcessState::Unreachable) => f.write_str("unreachable"),
            Self::Qemu(s) => f.write_str(s.as_str()),
        }
    }
}

struct ManagedVm {
    spec: VmSpec,
    role: VmRole,
    process: VmProcess,
    qmp: QmpClient,
}

/// The QEMU processes of one host.
#[derive(Clone)]
pub struct HostRuntime {
    identity: HostIdentity,
    settings: HostMigrationConfig,
    qemu: QemuBinary,
    migrating: Arc<Mutex<BTreeMap<String, u16>>>,
    runtime_root: PathBuf,
    vms: Arc<Mutex<BTreeMap<String, ManagedVm>>>,
    /// QEMU's TLS credentials directory when this host's migration streams are encrypted.
    migration_tls: Option<PathBuf>,
}

/// How long a fresh QEMU may take to answer on QMP.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl HostRuntime {
    /// A host with no VMs yet; runtime files go under `runtime_root/<vm>`.
    pub fn new(
        identity: HostIdentity,
        settings: HostMigrationConfig,
        qemu: QemuBinary,
        runtime_root: PathBuf,
    ) -> Self {
        Self {
            identity,
            settings,
            qemu,
            migrating: Arc::new(Mutex::new(BTreeMap::new())),
            runtime_root,
            vms: Arc::new(Mutex::new(BTreeMap::new())),
            migration_tls: None,
        }
    }

    /// Encrypts this host's migration streams with the QEMU credentials in `creds_dir`
    /// (`tern_pki::write_qemu_creds`): every QEMU started from now on gets the client
    /// credentials (it may migrate out), every incoming one also the server credentials,
    /// `tls-creds` and a `tls-authz` that accepts only the migration's source host.
    pub fn with_migration_tls(mut self, creds_dir: PathBuf) -> Self {
        self.migration_tls = Some(creds_dir);
        self
    }

    /// Whether migration streams into and out of this host are encrypted.
    pub fn migration_tls(&self) -> bool {
        self.migration_tls.is_some()
    }

    /// The source half of an encrypted stream from this host to `destination` (its host
    /// name, which its certificate carries), or `None` when this host's streams are plain.
    pub fn source_stream_tls(&self, destination: &str) -> Option<tern_engine::SourceStreamTls> {
        self.migration_tls
            .as_ref()
            .map(|_| tern_engine::SourceStreamTls {
                creds_id: tern_qemu::tls::TLS_CREDS_OUT_ID.to_string(),
                destination_host: destination.to_string(),
            })
    }

    /// This host's identity.
    pub fn identity(&self) -> &HostIdentity {
        &self.identity
    }

    /// This host's migration settings.
    pub fn settings(&self) -> &HostMigrationConfig {
        &self.settings
    }

    /// Marks `vm` as migrating out of this host and reserves nothing else; fails if it is
    /// already migrating or the host's outbound limit is reached.
    pub fn begin_outbound(&self, vm: &str) -> Result<(), AgentError> {
        let mut m = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(vm) {
            return Err(AgentError::Conflict(format!(
                "VM {vm:?} is already migrating from host {}",
                self.identity.name
            )));
        }
        let outbound = m.values().filter(|p| **p == 0).count() as u32;
        if outbound >= self.settings.max_outbound {
            return Err(AgentError::Conflict(format!(
                "host {} already runs {outbound} outgoing migrations (max_outbound = {})",
                self.identity.name, self.settings.max_outbound
            )));
        }
        m.insert(vm.to_string(), 0);
        Ok(())
    }

    /// Reserves a port for an incoming migration of `vm`; fails when the inbound limit is
    /// reached or the port range is exhausted.
    pub fn begin_inbound(&self, vm: &str) -> Result<u16, AgentError> {
        let mut m = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
        let inbound: Vec<u16> = m.values().copied().filter(|p| *p != 0).collect();
        if inbound.len() as u32 >= self.settings.max_inbound {
            return Err(AgentError::Conflict(format!(
                "host {} already receives {} migrations (max_inbound = {})",
                self.identity.name,
                inbound.len(),
                self.settings.max_inbound
            )));
        }
        let port = (self.settings.port_min..=self.settings.port_max)
            .find(|p| !inbound.contains(p))
            .ok_or_else(|| {
                AgentError::Conflict(format!(
                    "no free migration port in {}..={} on host {}",
                    self.settings.port_min, self.settings.port_max, self.identity.name
                ))
            })?;
        m.insert(format!("in:{vm}"), port);
        Ok(port)
    }

    /// The port reserved for incoming VM `vm`, if any.
    pub fn inbound_port(&self, vm: &str) -> Option<u16> {
        self.migrating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("in:{vm}"))
            .copied()
    }

    /// Releases what `begin_outbound`/`begin_inbound` reserved for `vm`.
    pub fn end_migration(&self, vm: &str) {
        let mut m = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(vm);
        m.remove(&format!("in:{vm}"));
    }

    /// Whether `vm` is migrating out of this host.
    pub fn is_migrating(&self, vm: &str) -> bool {
        self.migrating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(vm)
    }

    /// The QEMU binary this host runs.
    pub fn qemu(&self) -> &QemuBinary {
        &self.qemu
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ManagedVm>> {
        // A panic while holding the lock leaves the map itself consistent (entries are
        // inserted and removed whole), so a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Memory promised to the guests on this host, in MiB.
    pub fn committed_memory_mib(&self) -> u64 {
        self.lock().values().map(|v| v.spec.memory_mib).sum()
    }

    /// Memory still free for guests, in MiB.
    pub fn free_memory_mib(&self) -> u64 {
        self.identity
            .memory_mib
            .saturating_sub(self.committed_memory_mib())
    }

    fn check_admission(&self, spec: &VmSpec) -> Result<(), AgentError> {
        spec.validate()?;
        if self.lock().contains_key(&spec.name) {
            return Err(AgentError::Conflict(format!(
                "a VM named {:?} already exists on host {}",
                spec.name, self.identity.name
            )));
        }
        let free = self.free_memory_mib();
        if spec.memory_mib > free {
            return Err(AgentError::InsufficientMemory(format!(
                "VM {:?} needs {} MiB but host {} has {} MiB free (of {} MiB)",
                spec.name, spec.memory_mib, self.identity.name, free, self.identity.memory_mib
            )));
        }
        Ok(())
    }

    /// Boots a guest on this host.
    pub async fn create_vm(&self, spec: VmSpec) -> Result<VmInfo, AgentError> {
        self.start(spec, VmRole::Running).await
    }

    /// Starts a paused QEMU that will receive `spec`'s guest by migration from host
    /// `source_host`. The caller sets capabilities over the returned QMP client and then
    /// calls `migrate-incoming`.
    ///
    /// With migration TLS the destination's TLS parameters are set here, from this host's
    /// configuration, never by the caller: `tls-creds` (server credentials, peer verified
    /// against the CA) and `tls-authz` (only `CN=<source_host>` may send).
    pub async fn prepare_incoming(
        &self,
        spec: VmSpec,
        source_host: &str,
    ) -> Result<QmpClient, AgentError> {
        let name = spec.name.clone();
        self.start_with(spec, VmRole::Incoming, Some(source_host))
            .await?;
        let qmp = self.qmp(&name)?;
        if self.migration_tls.is_some() {
            let p = tern_qemu::MigrationTls::destination_parameters();
            let params = tern_qmp::MigrationParameters {
                tls_creds: Some(p.tls_creds),
                tls_authz: p.tls_authz,
                ..Default::default()
            };
            if let Err(e) = qmp.migrate_set_parameters(&params).await {
                let _ = self.kill_vm(&name).await;
                return Err(e.into());
            }
        }
        Ok(qmp)
    }

    async fn start(&self, spec: VmSpec, role: VmRole) -> Result<VmInfo, AgentError> {
        self.start_with(spec, role, None).await
    }

    async fn start_with(
        &self,
        spec: VmSpec,
        role: VmRole,
        source_host: Option<&str>,
    ) -> Result<VmInfo, AgentError> {
        self.check_admission(&spec)?;
        let runtime_dir = self.runtime_root.join(&spec.name);
        // A leftover directory from an earlier run only holds stale sockets and logs.
        let _ = std::fs::remove_dir_all(&runtime_dir);
        let launch = VmLaunch {
            spec: spec.clone(),
            mode: match role {
                VmRole::Running => LaunchMode::Boot,
                VmRole::Incoming => LaunchMode::Incoming,
            },
            runtime_dir,
            netns: self.identity.netns.clone(),
        };
        let tls = self
            .migration_tls
            .as_ref()
            .map(|dir| tern_qemu::MigrationTls {
                creds_dir: dir.clone(),
                accept_from: source_host.map(str::to_string),
            });
        let qemu = self.qemu.clone();
        let process = tokio::task::spawn_blocking(move || {
            VmProcess::spawn_with_tls(&qemu, &launch, tls.as_ref())
        })
        .await
        .map_err(|e| AgentError::Internal(format!("QEMU start task failed: {e}")))??;
        let (qmp, _events) =
            QmpClient::connect_with_retry(process.qmp_socket(), QMP_CONNECT_TIMEOUT).await?;
        let info = VmInfo {
            spec: spec.clone(),
            role,
            pid: process.pid(),
            run_state: VmRunState::Agent(ProcessState::Starting),
            serial_log: process.serial_log().to_path_buf(),
        };
        let mut vms = self.lock();
        if vms.contains_key(&spec.name) {
            // Lost a race with a concurrent create of the same name; ours is dropped (killed).
            return Err(AgentError::Conflict(format!(
                "a VM named {:?} already exists on host {}",
                spec.name, self.identity.name
            )));
        }
        vms.insert(
            spec.name.clone(),
            ManagedVm {
                spec,
                role,
                process,
                qmp,
            },
        );
        Ok(info)
    }

    /// Re-attaches to a QEMU a previous incarnation of this agent started (see
    /// [`VmProcess::adopt`]): checks the PID, connects to its QMP socket and restarts the
    /// serial recorder. Refuses a VM whose QEMU is gone or does not answer.
    pub async fn adopt_vm(
        &self,
        spec: VmSpec,
        role: VmRole,
        pid: u32,
        runtime_dir: PathBuf,
    ) -> Result<VmInfo, AgentError> {
        if self.has_vm(&spec.name) {
            return Err(AgentError::Conflict(format!(
                "a VM named {:?} already exists on host {}",
                spec.name, self.identity.name
            )));
        }
        let dir = runtime_dir.clone();
        let process = tokio::task::spawn_blocking(move || VmProcess::adopt(pid, &dir))
            .await
            .map_err(|e| AgentError::Internal(format!("adopt task failed: {e}")))??;
        let (qmp, _events) =
            match QmpClient::connect_with_retry(process.qmp_socket(), Duration::from_secs(3)).await
            {
                Ok(c) => c,
                Err(e) => {
                    // Not ours to kill: a QEMU we cannot talk to is left for the operator.
                    process.detach();
                    return Err(e.into());
                }
            };
        let info = VmInfo {
            spec: spec.clone(),
            role,
            pid,
            run_state: VmRunState::Agent(ProcessState::Starting),
            serial_log: process.serial_log().to_path_buf(),
        };
        self.lock().insert(
            spec.name.clone(),
            ManagedVm {
                spec,
                role,
                process,
                qmp,
            },
        );
        Ok(info)
    }

    /// The runtime directory of a VM (sockets, serial log).
    pub fn runtime_dir_of(&self, name: &str) -> Result<PathBuf, AgentError> {
        self.with_vm(name, |v| v.process.runtime_dir().to_path_buf())
    }

    /// If the VM's QEMU has exited, how (exit code or signal) and the end of its stderr: what
    /// an operator (and a post-mortem) needs when a migration is lost because a QEMU died.
    /// `None` while it runs or for an unknown VM.
    pub fn exit_report(&self, name: &str) -> Option<String> {
        self.with_vm(name, |v| {
            let pid = v.process.pid();
            v.process.try_wait().map(|status| {
                let tail = v.process.stderr_tail();
                let tail = tail.trim();
                format!(
                    "QEMU of {name} (pid {pid}) exited: {status}; its stderr {}",
                    if tail.is_empty() {
                        "is empty".to_string()
                    } else {
                        format!("ends: {}", tail.replace('\n', " | "))
                    }
                )
            })
        })
        .ok()
        .flatten()
    }

    /// The role of a VM on this host.
    pub fn role(&self, name: &str) -> Result<VmRole, AgentError> {
        self.with_vm(name, |v| v.role)
    }

    /// Lets every QEMU keep running after this agent exits (a restart re-attaches to them).
    pub fn detach_all(&self) -> Vec<u32> {
        let vms = std::mem::take(&mut *self.lock());
        vms.into_values().map(|v| v.process.detach()).collect()
    }

    /// The QMP client of a VM on this host.
    pub fn qmp(&self, name: &str) -> Result<QmpClient, AgentError> {
        self.with_vm(name, |v| v.qmp.clone())
    }

    /// The spec a VM on this host was started from.
    pub fn spec(&self, name: &str) -> Result<VmSpec, AgentError> {
        self.with_vm(name, |v| v.spec.clone())
    }

    /// Marks an incoming VM as the running guest (after its migration completed).
    pub fn promote_incoming(&self, name: &str) -> Result<(), AgentError> {
        self.with_vm(name, |v| v.role = VmRole::Running)
    }

    /// Runs `f` on a VM under the lock, or says which VMs exist when `name` does not.
    fn with_vm<T>(&self, name: &str, f: impl FnOnce(&mut ManagedVm) -> T) -> Result<T, AgentError> {
        let mut vms = self.lock();
        match vms.get_mut(name) {
            Some(vm) => Ok(f(vm)),
            None => Err(self.unknown_vm(name, vms.keys())),
        }
    }

    fn take_vm(&self, name: &str) -> Result<ManagedVm, AgentError> {
        let mut vms = self.lock();
        match vms.remove(name) {
            Some(vm) => Ok(vm),
            None => Err(self.unknown_vm(name, vms.keys())),
        }
    }

    fn unknown_vm<'a>(&self, name: &str, known: impl Iterator<Item = &'a String>) -> AgentError {
        let known: Vec<&str> = known.map(String::as_str).collect();
        AgentError::NotFound(format!(
            "no VM named {name:?} on host {} (VMs here: {})",
            self.identity.name,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    }

    /// Names of the VMs on this host.
    pub fn list_names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The names of the VMs on this host.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Whether a VM with this name exists here.
    pub fn has_vm(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Describes one VM, asking QEMU for its run state.
    pub async fn show(&self, name: &str) -> Result<VmInfo, AgentError> {
        let (mut info, qmp) = self.with_vm(name, |vm| {
            (
                VmInfo {
                    spec: vm.spec.clone(),
                    role: vm.role,
                    pid: vm.process.pid(),
                    run_state: VmRunState::Agent(if vm.process.is_running() {
                        ProcessState::Starting
                    } else {
                        ProcessState::Exited
                    }),
                    serial_log: vm.process.serial_log().to_path_buf(),
                },
                vm.qmp.clone(),
            )
        })?;
        if info.run_state == VmRunState::Agent(ProcessState::Starting) {
            info.run_state = match qmp.query_status().await {
                Ok(s) => VmRunState::Qemu(s.status),
                Err(_) => VmRunState::Agent(ProcessState::Unreachable),
            };
        }
        Ok(info)
    }

    /// Describes every VM on this host.
    pub async fn list(&self) -> Vec<VmInfo> {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut out = Vec::new();
        for n in names {
            if let Ok(i) = self.show(&n).await {
                out.push(i);
            }
        }
        out
    }

    /// Stops a VM: asks QEMU to quit, then kills it if it does not exit within 5 s.
    pub async fn stop_vm(&self, name: &str) -> Result<(), AgentError> {
        let vm = self.take_vm(name)?;
        let ManagedVm {
            qmp, mut process, ..
        } = vm;
        let _ = tokio::time::timeout(Duration::from_secs(2), qmp.quit()).await;
        tokio::task::spawn_blocking(move || {
            if process.wait_exit(Duration::from_secs(5)).is_none() {
                process.kill();
            }
            // The runtime directory (serial log, QEMU's stderr) is kept for post-mortems and
            // for measuring a finished migration; the next VM of that name replaces it.
        })
        .await
        .map_err(|e| AgentError::Internal(format!("stop task failed: {e}")))?;
        Ok(())
    }

    /// Kills a VM's QEMU at once (a failed incoming side, or tests).
    pub async fn kill_vm(&self, name: &str) -> Result<(), AgentError> {
        let vm = self.take_vm(name)?;
        let mut process = vm.process;
        tokio::task::spawn_blocking(move || process.kill())
            .await
            .map_err(|e| AgentError::Internal(format!("kill task failed: {e}")))?;
        Ok(())
    }

    /// The PID of a VM's QEMU (for fault injection and re-attachment).
    pub fn pid(&self, name: &str) -> Result<u32, AgentError> {
        self.with_vm(name, |v| v.process.pid())
    }

    /// Stops every VM (agent shutdown, tests).
    pub async fn stop_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for n in names {
            let _ = self.kill_vm(&n).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_keep_their_json_names() {
        for (text, state) in [
            ("running", VmRunState::Qemu(RunState::Running)),
            ("postmigrate", VmRunState::Qemu(RunState::Postmigrate)),
            ("exited", VmRunState::Agent(ProcessState::Exited)),
            ("unreachable", VmRunState::Agent(ProcessState::Unreachable)),
        ] {
            let json = format!("\"{text}\"");
            assert_eq!(serde_json::to_string(&state).unwrap(), json);
            assert_eq!(serde_json::from_str::<VmRunState>(&json).unwrap(), state);
            assert_eq!(state.to_string(), text);
        }
        assert!(VmRunState::Qemu(RunState::Running).is_running());
        assert!(!VmRunState::Qemu(RunState::Paused).is_running());
        assert!(!VmRunState::Agent(ProcessState::Exited).is_running());
    }
}

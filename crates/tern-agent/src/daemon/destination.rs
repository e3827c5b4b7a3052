//! The destination side of the agent: incoming QEMUs, the URI they listen on (chosen here,
//! never by a client), and the routes that act on them only while they are incoming.

use tern_qmp::RunState;

use super::Agent;
use crate::AgentError;
use crate::api::{IncomingReply, IncomingRequest};
use crate::host::{VmInfo, VmRole};

impl Agent {
    /// Starts an incoming QEMU for a migration (`POST /v1/incoming`). The spec is checked as
    /// a new VM's is (images inside this host's image directories, known SLA class).
    /// `source_host` is the name on the caller's host certificate (`None` for a caller
    /// without one, a plain-HTTP lab): with migration TLS the destination QEMU accepts a
    /// stream only from that host.
    pub async fn prepare_incoming(
        &self,
        req: IncomingRequest,
        source_host: Option<&str>,
    ) -> Result<IncomingReply, AgentError> {
        let spec = self.checked_spec(req.spec)?;
        let name = spec.name.clone();
        let h = &self.inner.host;
        let tls = h.migration_tls();
        let source_host = match source_host {
            Some(s) => s.to_string(),
            None if tls => {
                return Err(AgentError::Invalid(format!(
                    "host {} requires encrypted migration streams and accepts an incoming \
                     migration only from a host certificate of the installation's CA, which \
                     names the source",
                    self.inner.config.host
                )));
            }
            // Plain streams: the name only labels the log.
            None => "unauthenticated".to_string(),
        };
        if h.has_vm(&name) {
            return Err(AgentError::Conflict(format!(
                "host {} already has a VM named {name:?}",
                self.inner.config.host
            )));
        }
        let port = h.begin_inbound(&name)?;
        if let Err(e) = h.prepare_incoming(spec, &source_host).await {
            h.end_migration(&name);
            return Err(e);
        }
        if let Err(e) = self.persist_vm(&name).await {
            let _ = h.kill_vm(&name).await;
            h.end_migration(&name);
            return Err(e);
        }
        tracing::info!(vm = %name, port, migration = ?req.migration_id, tls, from = %source_host, "incoming QEMU ready");
        Ok(IncomingReply {
            uri: self.incoming_uri(&name)?,
            port,
            stream_encrypted: tls,
        })
    }

    /// The URI incoming VM `vm` receives its stream (and post-copy recovery) on: this host's
    /// `migration_address` and the port reserved for it.
    pub fn incoming_uri(&self, vm: &str) -> Result<String, AgentError> {
        self.incoming(vm)?;
        let port = self.inner.host.inbound_port(vm).ok_or_else(|| {
            AgentError::Conflict(format!(
                "incoming VM {vm:?} has no migration port reserved on host {}",
                self.inner.config.host
            ))
        })?;
        Ok(format!(
            "tcp:{}:{port}",
            self.inner.config.migration_address
        ))
    }

    /// Refuses `vm` unless it is an incoming VM of this host: destination-only routes never
    /// act on a guest that runs here.
    fn incoming(&self, vm: &str) -> Result<(), AgentError> {
        match self.inner.host.role(vm)? {
            VmRole::Incoming => Ok(()),
            VmRole::Running => Err(AgentError::Conflict(format!(
                "VM {vm:?} runs on host {}: it is not an incoming migration, and only incoming \
                 VMs are served under /v1/incoming (use /v1/vms/{vm})",
                self.inner.config.host
            ))),
        }
    }

    /// The QMP client of an incoming VM; refuses a VM that runs here.
    pub fn incoming_qmp(&self, vm: &str) -> Result<tern_qmp::QmpClient, AgentError> {
        self.incoming(vm)?;
        self.inner.host.qmp(vm)
    }

    /// Turns an incoming VM into this host's running guest after its migration completed;
    /// resumes it if it arrived paused. Refuses a VM that already runs here.
    pub async fn promote_incoming(&self, vm: &str) -> Result<VmInfo, AgentError> {
        let h = &self.inner.host;
        let qmp = self.incoming_qmp(vm)?;
        let st = qmp.query_status().await?;
        if !st.running {
            if matches!(st.status, RunState::InMigrate) {
                return Err(AgentError::Conflict(format!(
                    "VM {vm:?} is still receiving its migration (inmigrate): it cannot be promoted yet"
                )));
            }
            qmp.cont().await?;
        }
        h.promote_incoming(vm)?;
        h.end_migration(vm);
        self.persist_vm(vm).await?;
        h.show(vm).await
    }

    /// Removes an incoming VM whose migration failed. Refuses a VM that runs here.
    pub async fn delete_incoming(&self, vm: &str) -> Result<(), AgentError> {
        let h = &self.inner.host;
        if h.role(vm)? != VmRole::Incoming {
            return Err(AgentError::Conflict(format!(
                "VM {vm:?} runs on host {}: it is not an incoming migration; refusing to delete it",
                self.inner.config.host
            )));
        }
        h.kill_vm(vm).await?;
        h.end_migration(vm);
        self.inner.store.delete_vm(vm).await
    }
}

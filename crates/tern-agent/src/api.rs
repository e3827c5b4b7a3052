//! The agent's HTTP/JSON API types, shared by the server ([`crate::http`]) and the client
//! ([`crate::remote`]) so both sides agree by construction.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tern_engine::{MigrationProgress, OperatorCommand};
use tern_policy::{MigrationContext, PolicyName};
use tern_qemu::VmSpec;
use tern_qmp::MigrationCapability;

use crate::config::HostMigrationConfig;
use crate::store::{MigrationRecord, StoredEvent};

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the bad value and what would be valid.
    pub error: String,
}

/// What a host offers and supports (`GET /v1/host`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostFacts {
    /// Host name.
    pub host: String,
    /// Where incoming migration streams arrive.
    #[schema(value_type = String)]
    pub migration_address: IpAddr,
    /// Network namespace QEMU runs in (lab hosts).
    pub netns: Option<String>,
    /// Memory offered to guests (MiB).
    pub memory_mib: u64,
    /// Memory promised to guests on this host (MiB).
    pub committed_memory_mib: u64,
    /// Memory still free for guests (MiB).
    pub free_memory_mib: u64,
    /// The machine's available memory (`MemAvailable`, MiB).
    pub machine_available_mib: u64,
    /// QEMU version.
    pub qemu_version: String,
    /// QEMU binary path.
    pub qemu_path: String,
    /// Migration capabilities this QEMU supports (`query-migrate-capabilities`).
    #[schema(value_type = Vec<String>)]
    pub migration_capabilities: BTreeSet<MigrationCapability>,
    /// QMP commands this QEMU has (`query-commands`): post-copy recovery needs
    /// `migrate-recover` on the destination, so a dry-run asks for it here.
    #[serde(default)]
    pub qemu_commands: Vec<String>,
    /// The accelerator guests use here (from the cached probe; `unknown` before any probe).
    pub accelerator: String,
    /// Whether `/dev/kvm` exists.
    pub kvm_device: bool,
    /// Migration limits and permissions.
    pub migration: HostMigrationConfig,
    /// Migrations currently leaving this host.
    pub outbound_migrations: u32,
    /// Migrations currently arriving.
    pub inbound_migrations: u32,
}

/// `POST /v1/incoming`: start a paused QEMU that will receive `spec`'s guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The same spec the source runs (both ends must match exactly).
    pub spec: VmSpec,
    /// The migration this is for (recorded for diagnosis).
    #[serde(default)]
    pub migration_id: Option<String>,
}

/// The answer to [`IncomingRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingReply {
    /// QEMU URI the source must stream to (`tcp:198.18.0.2:49152`), built by the destination
    /// agent from its own `migration_address` and a port it reserved.
    pub uri: String,
    /// The reserved port.
    pub port: u16,
    /// Whether the destination QEMU expects a TLS stream (its host's `migration_tls`). The
    /// source refuses to start when its own mode differs: the handshake would fail anyway.
    #[serde(default)]
    pub stream_encrypted: bool,
}

/// The body of `POST /v1/incoming/{vm}/start` and `/recover`: nothing. The destination agent
/// listens on the URI it chose when it prepared the incoming QEMU; a client-supplied URI
/// (`exec:…`, `unix:…`, `fd:…`) would let it run commands or open files as QEMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

/// `POST /v1/migrations`: move a VM of this host to another host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartMigrationRequest {
    /// The VM.
    pub vm: String,
    /// Destination host name, one of the agent's configured `[peers]` (never a URL: the
    /// agent connects only to peers from its configuration).
    pub to_host: String,
    /// Why the VM moves.
    #[serde(default = "manual")]
    pub context: MigrationContext,
    /// The policy (`tern` or a baseline).
    #[serde(default)]
    pub policy: PolicyName,
    /// Deadline for must-finish contexts, in seconds.
    #[serde(default)]
    pub deadline_s: Option<u64>,
    /// Link rate between the hosts in bytes/s, when known.
    #[serde(default)]
    pub link_bytes_per_s: Option<u64>,
}

fn manual() -> MigrationContext {
    MigrationContext::Manual
}

/// `POST /v1/migrations/plan`: what the policy would do for a migration request: the fields
/// of [`StartMigrationRequest`] and `probe_s`. (Spelt out rather than `flatten`ed: serde
/// cannot refuse unknown fields through `flatten`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// See [`StartMigrationRequest::vm`].
    pub vm: String,
    /// See [`StartMigrationRequest::to_host`].
    pub to_host: String,
    /// See [`StartMigrationRequest::context`].
    #[serde(default = "manual")]
    pub context: MigrationContext,
    /// See [`StartMigrationRequest::policy`].
    #[serde(default)]
    pub policy: PolicyName,
    /// See [`StartMigrationRequest::deadline_s`].
    #[serde(default)]
    pub deadline_s: Option<u64>,
    /// See [`StartMigrationRequest::link_bytes_per_s`].
    #[serde(default)]
    pub link_bytes_per_s: Option<u64>,
    /// Seconds of `calc-dirty-rate` probing of the guest first (0 = none, at most 10).
    #[serde(default)]
    pub probe_s: u64,
}

impl PlanRequest {
    /// The plan request for `request`, probing the guest's dirty rate for `probe_s` seconds.
    pub fn new(request: StartMigrationRequest, probe_s: u64) -> Self {
        Self {
            vm: request.vm,
            to_host: request.to_host,
            context: request.context,
            policy: request.policy,
            deadline_s: request.deadline_s,
            link_bytes_per_s: request.link_bytes_per_s,
            probe_s,
        }
    }

    /// The migration request it plans, and the probe's length.
    pub fn split(self) -> (StartMigrationRequest, u64) {
        (
            StartMigrationRequest {
                vm: self.vm,
                to_host: self.to_host,
                context: self.context,
                policy: self.policy,
                deadline_s: self.deadline_s,
                link_bytes_per_s: self.link_bytes_per_s,
            },
            self.probe_s,
        )
    }
}

/// A migration with its live progress and events (`GET /v1/migrations/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationView {
    /// The persisted record.
    #[serde(flatten)]
    pub record: MigrationRecord,
    /// Live progress while it runs (the engine's `MigrationProgress`).
    #[schema(value_type = Option<Object>)]
    pub progress: Option<MigrationProgress>,
    /// Events (all, or those after `?after=`).
    pub events: Vec<StoredEvent>,
}

/// `POST /v1/migrations/{id}/bandwidth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BandwidthRequest {
    /// New cap in bytes per second (1000 to 50000000000: 8 kbit/s to 400 gbit/s).
    pub bytes_per_s: u64,
}

/// The answer to an operator command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperatorReply {
    /// The command (`{"command": "abort"}`, …).
    #[schema(value_type = Object)]
    pub command: OperatorCommand,
    /// What was done.
    pub result: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Host name.
    pub host: String,
    /// The agent's PID.
    pub pid: u32,
}

//! The agent's HTTP/JSON API types, shared by the server ([`crate::http`]) and the client
//! ([`crate::remote`]) so both sides agree by construction.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tern_engine::{MigrationProgress, OperatorCommand};
use tern_policy::MigrationContext;
use tern_qemu::VmSpec;

use crate::config::HostMigrationConfig;
use crate::store::{MigrationRecord, StoredEvent};

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, naming the bad value and what would be valid.
    pub error: String,
}

/// What a host offers and supports (`GET /v1/host`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Host name.
    pub host: String,
    /// Where incoming migration streams arrive.
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
    pub migration_capabilities: Vec<String>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingRequest {
    /// The same spec the source runs (both ends must match exactly).
    pub spec: VmSpec,
    /// The migration this is for (recorded for diagnosis).
    #[serde(default)]
    pub migration_id: Option<String>,
}

/// The answer to [`IncomingRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingReply {
    /// QEMU URI the source must stream to (`tcp:198.18.0.2:49152`).
    pub uri: String,
    /// The reserved port.
    pub port: u16,
}

/// A QEMU URI (`migrate-incoming`, `migrate-recover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UriBody {
    /// The URI.
    pub uri: String,
}

/// `POST /v1/migrations`: move a VM of this host to another host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartMigrationRequest {
    /// The VM.
    pub vm: String,
    /// Destination host name.
    pub to_host: String,
    /// The destination agent's URL; found from `[peers]` or the lab when absent.
    #[serde(default)]
    pub to_agent_url: Option<String>,
    /// Why the VM moves.
    #[serde(default = "manual")]
    pub context: MigrationContext,
    /// Policy name (`tern` or a baseline).
    #[serde(default = "default_policy")]
    pub policy: String,
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

fn default_policy() -> String {
    tern_policy::DEFAULT_POLICY.to_string()
}

/// `POST /v1/migrations/plan`: what the policy would do for a migration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The migration that would be started.
    #[serde(flatten)]
    pub request: StartMigrationRequest,
    /// Seconds of `calc-dirty-rate` probing of the guest first (0 = none, at most 10).
    #[serde(default)]
    pub probe_s: u64,
}

/// A migration with its live progress and events (`GET /v1/migrations/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    /// The persisted record.
    #[serde(flatten)]
    pub record: MigrationRecord,
    /// Live progress while it runs.
    pub progress: Option<MigrationProgress>,
    /// Events (all, or those after `?after=`).
    pub events: Vec<StoredEvent>,
}

/// `POST /v1/migrations/{id}/bandwidth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthRequest {
    /// New cap in bytes per second.
    pub bytes_per_s: u64,
}

/// The answer to an operator command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorReply {
    /// The command.
    pub command: OperatorCommand,
    /// What was done.
    pub result: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Host name.
    pub host: String,
    /// The agent's PID.
    pub pid: u32,
}

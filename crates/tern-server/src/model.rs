//! The controller's typed values: what the store keeps and the API speaks.
//!
//! Strings become these types once, at the edge (JSON bodies, query strings, database rows);
//! everything inside the controller works on the enums.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a host takes part in placement.
///
/// `unreachable` is not stored: it is derived from the age of the last heartbeat, so a host
/// comes back by itself as soon as its agent reports again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Heartbeating and accepting guests.
    Up,
    /// Being emptied (or set aside by an operator): nothing is placed on it.
    Draining,
    /// No heartbeat within the timeout; its migrations are shown `unknown`.
    Unreachable,
}

impl HostState {
    /// The name used in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Unreachable => "unreachable",
        }
    }
}

/// An operator's post-copy setting for a host. The agent's own permission still applies:
/// `permit` here cannot override an agent configured to deny post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PostCopySetting {
    /// Post-copy may be used where the agent and the VM allow it.
    Permit,
    /// Never switch to post-copy on migrations from or to this host.
    Deny,
}

/// Why a VM moves (the same four contexts the agents and the policy know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationContext {
    /// The host must be emptied: the migration must finish.
    Evacuate,
    /// Planned maintenance: must finish.
    Maintenance,
    /// Load balancing: may give up.
    Balance,
    /// Operator's request.
    Manual,
}

impl MigrationContext {
    /// Contexts in which a migration that failed before the switch is retried until the
    /// deadline (the seed: an evacuation "absolutely must always complete in finite time").
    pub fn must_finish(self) -> bool {
        matches!(self, Self::Evacuate | Self::Maintenance)
    }

    /// The name used in the database and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Evacuate => "evacuate",
            Self::Maintenance => "maintenance",
            Self::Balance => "balance",
            Self::Manual => "manual",
        }
    }
}

/// A controller-side migration's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Planned (by an evacuation) or waiting for a retry; nothing asked of an agent yet.
    Planned,
    /// The attempt's idempotency key is recorded and the source agent is being asked.
    Starting,
    /// The source agent runs it.
    Running,
    /// The guest runs on the destination.
    Completed,
    /// Failed before the switch: the guest stays on its source.
    Failed,
    /// Aborted by an operator or cancelled with its evacuation.
    Aborted,
    /// Failed after the switch (reported by the agent as `lost`/`stranded`).
    Lost,
    /// The source host is unreachable: nobody knows until its agent reports again.
    Unknown,
}

impl MigrationState {
    /// Whether nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Aborted | Self::Lost
        )
    }

    /// Every state, for metrics.
    pub const ALL: [Self; 8] = [
        Self::Planned,
        Self::Starting,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Aborted,
        Self::Lost,
        Self::Unknown,
    ];

    /// The name used in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
            Self::Lost => "lost",
            Self::Unknown => "unknown",
        }
    }
}

/// An evacuation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EvacuationState {
    /// Migrations are being started and watched.
    Running,
    /// No new migration starts; running ones go on.
    Paused,
    /// Every VM left the host.
    Completed,
    /// The deadline passed with VMs left, or a VM cannot go anywhere.
    Failed,
    /// Cancelled by an operator: running migrations were aborted (before the switch) or finished.
    Cancelled,
}

impl EvacuationState {
    /// Whether nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Parses a stored enum value through its serde name.
pub fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// The serde name of an enum value.
pub fn enum_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What an agent reports about its host in every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    /// Memory offered to guests (MiB).
    pub memory_mib: u64,
    /// Memory still free for guests (MiB).
    pub free_memory_mib: u64,
    /// QEMU version (`10.0.2`).
    pub qemu_version: String,
    /// Migration capabilities this QEMU supports (`query-migrate-capabilities`).
    #[serde(default)]
    pub migration_capabilities: Vec<String>,
    /// Whether the agent's configuration permits post-copy on this host.
    pub permit_post_copy: bool,
    /// Migration link rate in bytes/s, when known.
    #[serde(default)]
    pub link_bytes_per_s: Option<u64>,
    /// The agent's own limit of concurrent outgoing migrations.
    pub max_outbound: u32,
    /// The agent's own limit of concurrent incoming migrations.
    pub max_inbound: u32,
    /// Migrations leaving the host now.
    #[serde(default)]
    pub outbound_migrations: u32,
    /// Migrations arriving now.
    #[serde(default)]
    pub inbound_migrations: u32,
}

/// A VM as its host's agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    /// VM name (unique in the fleet).
    pub name: String,
    /// Guest memory (MiB).
    pub memory_mib: u64,
    /// SLA class (`gold`, `silver`, `bronze`, …).
    #[serde(default = "default_sla")]
    pub sla_class: String,
    /// Whether the VM may be migrated with post-copy (no VFIO device, owner permits).
    #[serde(default = "yes")]
    pub post_copy_allowed: bool,
    /// The last measured dirty rate (bytes/s), when the agent has one.
    #[serde(default)]
    pub dirty_bytes_per_s: Option<u64>,
}

fn default_sla() -> String {
    "silver".into()
}

fn yes() -> bool {
    true
}

/// `POST /v1/agents/heartbeat`: an agent registers (first call) and reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Host name (must be one of the configured `[agents]`).
    pub host: String,
    /// Host facts.
    pub facts: HostFacts,
    /// The guests running on the host: not the incoming halves of migrations (a VM is
    /// reported by the host it runs on; the controller takes a VM absent from its host's
    /// report as gone from it).
    #[serde(default)]
    pub vms: Vec<VmReport>,
}

/// Operator settings of a host (`PATCH /v1/hosts/{name}`); absent fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostPatch {
    /// Permit or deny post-copy on migrations from and to the host.
    #[serde(default)]
    pub post_copy: Option<PostCopySetting>,
    /// Concurrent outgoing migrations the controller starts (≥ 1).
    #[serde(default)]
    pub max_outbound: Option<u32>,
    /// Concurrent incoming migrations the controller starts (≥ 1).
    #[serde(default)]
    pub max_inbound: Option<u32>,
    /// `true`: mark draining (nothing placed on it); `false`: back to `up`.
    #[serde(default)]
    pub drain: Option<bool>,
}

/// A host as the controller knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostRecord {
    /// Host name.
    pub name: String,
    /// Up, draining or unreachable (from the heartbeat age).
    pub state: HostState,
    /// The facts of the last heartbeat.
    pub facts: HostFacts,
    /// Operator post-copy setting (none: the agent's permission alone decides).
    pub post_copy: Option<PostCopySetting>,
    /// Operator limit of outgoing migrations (none: the agent's).
    pub max_outbound: Option<u32>,
    /// Operator limit of incoming migrations (none: the agent's).
    pub max_inbound: Option<u32>,
    /// Last heartbeat (ms since the epoch).
    pub last_heartbeat_ms: u64,
}

impl HostRecord {
    /// Whether post-copy may be used on migrations touching this host.
    pub fn post_copy_permitted(&self) -> bool {
        self.facts.permit_post_copy && self.post_copy != Some(PostCopySetting::Deny)
    }

    /// The outgoing limit in force (the smaller of the agent's and the operator's).
    pub fn outbound_limit(&self) -> u32 {
        self.max_outbound
            .map_or(self.facts.max_outbound, |m| m.min(self.facts.max_outbound))
            .max(1)
    }

    /// The incoming limit in force.
    pub fn inbound_limit(&self) -> u32 {
        self.max_inbound
            .map_or(self.facts.max_inbound, |m| m.min(self.facts.max_inbound))
            .max(1)
    }
}

/// A VM as the controller knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    /// VM name.
    pub name: String,
    /// The host it runs on (per the last heartbeat).
    pub host: String,
    /// Guest memory (MiB).
    pub memory_mib: u64,
    /// SLA class.
    pub sla_class: String,
    /// Whether post-copy is allowed for it.
    pub post_copy_allowed: bool,
    /// Last dirty rate (bytes/s).
    pub dirty_bytes_per_s: Option<u64>,
}

/// A migration as the controller records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationRecord {
    /// Controller migration id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Source host.
    pub source: String,
    /// Destination host.
    pub destination: String,
    /// Why it moves.
    pub context: MigrationContext,
    /// Current state.
    pub state: MigrationState,
    /// Attempts made so far (each one an agent migration).
    pub attempts: u32,
    /// The evacuation it belongs to.
    pub evacuation_id: Option<String>,
    /// Position in the evacuation's plan.
    pub plan_index: Option<u32>,
    /// Why this destination was chosen.
    pub reason: String,
    /// The current attempt's key, recorded before the agent is called.
    pub idempotency_key: Option<String>,
    /// The source agent's migration id of the current attempt.
    pub agent_migration_id: Option<String>,
    /// Last error.
    pub error: Option<String>,
    /// Accepted (ms since the epoch).
    pub created_ms: u64,
    /// First attempt started.
    pub started_ms: Option<u64>,
    /// Terminal state reached.
    pub ended_ms: Option<u64>,
    /// Earliest time of the next attempt (retry backoff).
    pub next_attempt_ms: Option<u64>,
    /// Last change.
    pub updated_ms: u64,
    /// Whether the agent reported a switch to post-copy (counted once).
    pub switched_to_postcopy: bool,
}

/// One entry of a migration's append-only history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationEvent {
    /// Position in the migration's history (1-based).
    pub seq: u64,
    /// Wall-clock time (ms since the epoch).
    pub wall_ms: u64,
    /// What kind of event (`state`, `attempt`, `replan`, `retry`, `note`).
    pub kind: String,
    /// What happened, for operators.
    pub detail: String,
}

/// When a planned migration starts (the planner's trigger).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PlanTrigger {
    /// As soon as the per-host limits allow.
    #[default]
    Now,
    /// It was already running when the plan was made.
    AlreadyRunning,
    /// When this VM's migration has ended.
    AfterMigrationOf {
        /// The VM whose migration releases this one.
        vm: String,
    },
    /// At this time, seconds after the plan was made (a retry's backoff).
    AtTime {
        /// Seconds from plan time.
        at_s: f64,
    },
}

/// One VM's line of an evacuation plan.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct PlannedMigration {
    /// The VM.
    pub vm: String,
    /// Its destination.
    pub destination: String,
    /// Why this destination.
    pub reason: String,
    /// Predicted start, seconds after the evacuation starts.
    pub start_s: f64,
    /// Predicted duration (s).
    pub duration_s: f64,
    /// Predicted end, seconds after the plan was made.
    #[serde(default)]
    pub end_s: f64,
    /// When it starts.
    #[serde(default)]
    pub trigger: PlanTrigger,
    /// Whether the planner predicts it needs post-copy to converge.
    #[serde(default)]
    pub needs_post_copy: bool,
    /// Whether post-copy is permitted end to end (VM, SLA, both hosts).
    #[serde(default)]
    pub post_copy_permitted: bool,
    /// Bytes the planner predicts will be sent.
    #[serde(default)]
    pub predicted_bytes: u64,
    /// Every reason behind this line, for operators.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// An evacuation plan: order, destinations and predictions.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct EvacuationPlan {
    /// The host being emptied.
    pub host: String,
    /// Which planner made it.
    pub planner: String,
    /// Migrations in start order.
    pub migrations: Vec<PlannedMigration>,
    /// Migrations the runner may keep in flight at once.
    pub concurrency: u32,
    /// Predicted makespan (s).
    pub predicted_makespan_s: f64,
    /// Deadline given (s from the start).
    pub deadline_s: u64,
    /// Whether the prediction fits the deadline.
    pub fits_deadline: bool,
    /// Lower bound of any schedule's makespan (s): bytes to move over the sources' egress.
    #[serde(default)]
    pub lower_bound_s: f64,
    /// The planner's deadline verdict: `met`, `at-risk` or `no-deadline`.
    #[serde(default)]
    pub deadline_verdict: String,
    /// Seconds to spare (met, positive) or predicted past the deadline (at risk, negative).
    #[serde(default)]
    pub deadline_slack_s: Option<f64>,
    /// What would shorten the evacuation (when the deadline is at risk), for operators.
    #[serde(default)]
    pub suggestions: Vec<String>,
    /// What changed since the previous plan (re-plans only), for operators.
    #[serde(default)]
    pub deviations: Vec<String>,
    /// When the plan was made (ms since the epoch); triggers' times count from it.
    #[serde(default)]
    pub made_ms: u64,
    /// The planner's own plan, complete (tern-planner's `EvacuationPlan`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub detail: Option<serde_json::Value>,
    /// The request the plan was made from (tern-planner's `EvacuationRequest`), kept for
    /// re-planning.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub request: Option<serde_json::Value>,
}

/// An evacuation as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvacuationRecord {
    /// Evacuation id.
    pub id: String,
    /// The host being emptied.
    pub host: String,
    /// State.
    pub state: EvacuationState,
    /// Deadline (ms since the epoch).
    pub deadline_ms: u64,
    /// The current plan.
    pub plan: EvacuationPlan,
    /// Predicted makespan (s) of the plan it started with.
    pub predicted_makespan_s: f64,
    /// Actual makespan (s), once finished.
    pub actual_makespan_s: Option<f64>,
    /// Started (ms since the epoch).
    pub created_ms: u64,
    /// Finished.
    pub ended_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Last change.
    pub updated_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random identifier (`prefix-` + 16 hex digits).
pub fn new_id(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}-{n:016x}")
}

//! What the planner is told: the fleet, the VMs to move, why, by when, and what is already
//! under way. Plain data (serde), built by the controller from agent heartbeats.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use tern_policy::{MigrationContext, SlaClass};

/// QMP capability name of post-copy. A destination without it cannot take a post-copy stream.
pub const POSTCOPY_RAM: &str = "postcopy-ram";

/// Dirty rate assumed for a VM the agent has not measured yet (bytes/s): 32 MiB/s, a busy
/// general-purpose guest. KubeVirt VEP-246 observes dirty rates during migration 2–3× the
/// pre-migration baseline, so an unmeasured guest is not assumed idle.
pub const DEFAULT_DIRTY_BYTES_PER_S: u64 = 32 << 20;

/// Switchover (device state) time subtracted from the SLA downtime before judging convergence,
/// as `tern_policy::PlanInput::switchover_overhead_ms` does (50 ms).
pub const SWITCHOVER_OVERHEAD_MS: u64 = 50;

/// A QEMU version. Migration is supported to the same or a newer QEMU (the machine type of the
/// source must exist on the destination), never to an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Micro.
    pub micro: u16,
}

impl QemuVersion {
    /// `major.minor.micro`.
    pub const fn new(major: u16, minor: u16, micro: u16) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One host of the fleet as its agent last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Host name (unique in the fleet).
    pub name: String,
    /// Memory available to guests, bytes.
    pub total_memory_bytes: u64,
    /// Memory free for new guests now, bytes. Must *not* already count incoming migrations
    /// listed in [`EvacuationRequest::in_flight`]: the planner reserves those itself.
    pub free_memory_bytes: u64,
    /// QEMU version on the host (see [`QemuVersion`] for the compatibility rule).
    pub qemu_version: QemuVersion,
    /// QMP migration capabilities and other features the host's QEMU offers
    /// (`postcopy-ram`, `multifd`, `dirty-limit`, CPU flags the VMs need, …): QEMU's own names.
    pub features: BTreeSet<String>,
    /// The host permits post-copy (Nova's per-compute `live_migration_permit_post_copy`).
    pub permit_post_copy: bool,
    /// Outgoing migrations at once (Nova `max_concurrent_live_migrations`, default 1;
    /// KubeVirt `ParallelOutboundMigrationsPerNode`, default 2). At least 1 for a source.
    pub max_outbound: u32,
    /// Incoming migrations at once (0: takes none).
    pub max_inbound: u32,
    /// Migration bandwidth leaving the host, bytes/s (NIC or configured cap).
    pub egress_bytes_per_s: u64,
    /// Migration bandwidth entering the host, bytes/s.
    pub ingress_bytes_per_s: u64,
    /// Being drained: nothing may be placed on it.
    pub draining: bool,
    /// The agent answers heartbeats. Unreachable hosts are never destinations.
    pub reachable: bool,
}

/// One VM to move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmFacts {
    /// VM name (unique in the request).
    pub name: String,
    /// Host it runs on now (one of [`EvacuationRequest::hosts_to_empty`]).
    pub host: String,
    /// Guest RAM, bytes. Every page is assumed non-zero (upper bound; zero pages cost little).
    pub memory_bytes: u64,
    /// Observed dirty rate (distinct bytes dirtied per second of QEMU sync period), if measured.
    /// `None`: [`DEFAULT_DIRTY_BYTES_PER_S`] is assumed and the plan says so.
    pub dirty_bytes_per_s: Option<u64>,
    /// Writable working set, bytes (caps how much one pass can dirty). `None`: the whole RAM.
    pub working_set_bytes: Option<u64>,
    /// The VM's SLA class.
    pub sla: SlaClass,
    /// The VM may use post-copy (false with VFIO devices, vpmem, …).
    pub post_copy_allowed: bool,
    /// Features the destination must offer (QEMU capability or CPU flag names).
    pub required_features: BTreeSet<String>,
}

impl VmFacts {
    /// The dirty rate the model uses, and whether it was assumed.
    pub fn dirty_rate(&self) -> (f64, bool) {
        match self.dirty_bytes_per_s {
            Some(d) => (d as f64, false),
            None => (DEFAULT_DIRTY_BYTES_PER_S as f64, true),
        }
    }

    /// Working set the model uses, bytes (at least one page, at most RAM).
    pub fn working_set(&self) -> f64 {
        let ram = self.memory_bytes.max(4096);
        self.working_set_bytes.unwrap_or(ram).clamp(4096, ram) as f64
    }
}

/// A migration already running when the plan is (re)made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlightMigration {
    /// The VM (also listed in [`EvacuationRequest::vms`]).
    pub vm: String,
    /// Where it is going.
    pub destination: String,
    /// Bytes still to send in the current pass (`query-migrate` `ram.remaining`).
    pub remaining_bytes: u64,
    /// Seconds since it started.
    pub elapsed_s: f64,
    /// Already switched to post-copy (it will only send what remains).
    pub in_post_copy: bool,
}

/// A VM whose earlier attempt failed before the switch (guest still on its source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryState {
    /// The VM.
    pub vm: String,
    /// Attempts so far (≥ 1).
    pub attempts: u32,
    /// Destination of the last attempt.
    pub last_destination: String,
    /// Not before this many seconds from now (backoff).
    pub not_before_s: f64,
}

/// Planner settings with documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerSettings {
    /// Throughput one migration stream reaches at most, bytes/s (QEMU's single migration thread
    /// without multifd tops out around 1–2 GB/s). `None`: only the links limit it. This is what
    /// makes running two migrations on a fast link faster than one.
    pub stream_cap_bytes_per_s: Option<u64>,
    /// Retry backoff base, seconds: attempt n waits `base × 2^(n−1)` (capped at 300 s).
    pub retry_backoff_base_s: f64,
    /// After this many failures on one destination, retries go elsewhere (default 2: one retry
    /// where it failed, for a transient drop; then another host).
    pub retries_per_destination: u32,
    /// Start higher SLA priority classes first (`SlaClass::priority`), ordering within a class
    /// for the makespan. Off by default: it can only lengthen the makespan, but an operator may
    /// want latency-critical guests off a failing host before batch ones.
    #[serde(default)]
    pub sla_priority_first: bool,
}

impl Default for PlannerSettings {
    fn default() -> Self {
        PlannerSettings {
            stream_cap_bytes_per_s: None,
            retry_backoff_base_s: 5.0,
            retries_per_destination: 2,
            sla_priority_first: false,
        }
    }
}

/// Everything the planner needs: one call of [`crate::plan_evacuation`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvacuationRequest {
    /// Why (evacuate and maintenance must finish; balance may skip VMs to honour their SLA;
    /// manual is treated like balance).
    pub context: MigrationContext,
    /// The whole fleet, sources included.
    pub hosts: Vec<HostFacts>,
    /// Hosts to empty (usually one; a rolling drain may name many).
    pub hosts_to_empty: Vec<String>,
    /// The VMs on those hosts still to move, in the operator's listing order.
    pub vms: Vec<VmFacts>,
    /// Must be finished this many seconds from now, if bounded.
    pub deadline_s: Option<f64>,
    /// Migrations already running (re-planning mid-way).
    pub in_flight: Vec<InFlightMigration>,
    /// VMs whose earlier attempt failed and that must wait before retrying.
    pub retries: Vec<RetryState>,
    /// Settings.
    pub settings: PlannerSettings,
}

impl EvacuationRequest {
    /// A request with no deadline, nothing in flight and default settings.
    pub fn new(
        context: MigrationContext,
        hosts: Vec<HostFacts>,
        hosts_to_empty: Vec<String>,
        vms: Vec<VmFacts>,
    ) -> Self {
        EvacuationRequest {
            context,
            hosts,
            hosts_to_empty,
            vms,
            deadline_s: None,
            in_flight: Vec::new(),
            retries: Vec::new(),
            settings: PlannerSettings::default(),
        }
    }
}

/// A request the planner cannot work on at all (as opposed to a VM it cannot place, which is
/// reported in the plan). Each names the bad value and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A host to empty is not in the fleet.
    #[error("host to empty {0:?} is not in the fleet; known hosts are listed by `tern host list`")]
    UnknownHost(String),
    /// A VM claims to run on a host that is not being emptied.
    #[error("VM {vm:?} runs on {host:?}, which is not one of the hosts to empty ({to_empty})")]
    VmNotOnEmptiedHost {
        /// The VM.
        vm: String,
        /// Its host.
        host: String,
        /// The hosts to empty, comma-separated.
        to_empty: String,
    },
    /// Two VMs or two hosts share a name.
    #[error("duplicate {kind} name {name:?}; names must be unique")]
    Duplicate {
        /// `VM` or `host`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A source host cannot send anything.
    #[error(
        "host {host:?} to empty has max_outbound 0 or egress 0 bytes/s; valid: max_outbound ≥ 1 and egress > 0"
    )]
    SourceCannotSend {
        /// The host.
        host: String,
    },
    /// The deadline is not a positive number of seconds.
    #[error("deadline {0} s is invalid; valid: a positive number of seconds")]
    BadDeadline(String),
    /// An in-flight migration names an unknown VM or host.
    #[error("in-flight migration of {vm:?} to {destination:?}: unknown VM or destination host")]
    UnknownInFlight {
        /// The VM.
        vm: String,
        /// The destination.
        destination: String,
    },
}

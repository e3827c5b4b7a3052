//! The one admission path of a migration: from the order and plain facts of both hosts to
//! the policy's [`PlanInput`], or a refusal naming the bad value and what would be valid.
//!
//! Pure: no I/O, no clock. The in-process runs ([`crate::migration::migrate`], used by
//! `tern-scenario`), the agent's API (`POST /v1/migrations`, `/v1/migrations/plan`) and,
//! through the API, the CLI all gather the facts their own way and call [`admit`]; nothing is
//! started before it returned `Ok`.

use tern_policy::{
    HostLimits, PlanInput, PostCopyPermission as PolicyPostCopy, QemuFeatures, SlaCatalog, VmLimits,
};
use tern_qemu::{PostCopyPermission, VmSpec};

use crate::AgentError;
use crate::bounds;
use crate::config::HostMigrationConfig;
use crate::host::VmRole;
use crate::migration::MigrationOrder;

/// What the source host knows about the VM to move.
#[derive(Debug, Clone, Copy)]
pub struct SourceVm<'a> {
    /// Its spec.
    pub spec: &'a VmSpec,
    /// Its role on the source host (only a running guest can leave).
    pub role: VmRole,
    /// Whether it is already migrating (and which migration, when known).
    pub migrating: Option<&'a str>,
}

/// Plain facts about one end of the migration.
#[derive(Debug, Clone, Copy)]
pub struct HostSide<'a> {
    /// Host name.
    pub name: &'a str,
    /// Memory offered to guests (MiB).
    pub memory_mib: u64,
    /// Memory still free for guests (MiB).
    pub free_memory_mib: u64,
    /// Its migration settings (post-copy permission, bandwidth cap).
    pub migration: &'a HostMigrationConfig,
    /// Whether a VM with the migrating VM's name already exists there.
    pub has_vm_named: bool,
    /// Whether the host can catch missing-page faults (`userfaultfd`): post-copy's safety
    /// gate on the destination.
    pub userfaultfd: bool,
}

/// Checks `order` against both hosts and builds the policy's input. QEMU features are left
/// "none": the engine detects them from the running QEMUs (and dry-run from both sides'
/// capability lists).
pub fn admit(
    order: &MigrationOrder,
    vm: SourceVm<'_>,
    source: HostSide<'_>,
    destination: HostSide<'_>,
    catalog: &SlaCatalog,
) -> Result<PlanInput, AgentError> {
    let name = &order.vm;
    if vm.role != VmRole::Running {
        return Err(AgentError::Conflict(format!(
            "VM {name:?} on host {} is the incoming side of a migration, not a running guest",
            source.name
        )));
    }
    if source.name == destination.name {
        return Err(AgentError::Invalid(format!(
            "VM {name:?} already runs on host {}: choose a different destination host",
            source.name
        )));
    }
    if let Some(id) = vm.migrating {
        return Err(AgentError::Conflict(format!(
            "VM {name:?} is already migrating (migration {id})"
        )));
    }
    if destination.has_vm_named {
        return Err(AgentError::Conflict(format!(
            "host {} already has a VM named {name:?}",
            destination.name
        )));
    }
    if vm.spec.memory_mib > destination.free_memory_mib {
        return Err(AgentError::InsufficientMemory(format!(
            "VM {name:?} needs {} MiB but destination host {} has {} MiB free (of {} MiB)",
            vm.spec.memory_mib,
            destination.name,
            destination.free_memory_mib,
            destination.memory_mib
        )));
    }
    if let Some(ms) = order.deadline_ms {
        bounds::check_deadline_ms(ms)?;
    }
    if let Some(rate) = order.link_bytes_per_s {
        bounds::check_bandwidth("link rate", rate)?;
    }
    let sla = catalog
        .get(&vm.spec.migration.sla_class)
        .map_err(|e| AgentError::Invalid(e.to_string()))?
        .clone();
    let limits = |h: &HostMigrationConfig| HostLimits {
        permit_post_copy: h.permit_post_copy,
        bandwidth_cap_bytes_per_s: h.bandwidth_cap_bytes_per_s(),
        ..HostLimits::default()
    };
    let mut input = PlanInput::new(order.context, sla, vm_limits(vm.spec), no_features());
    input.source = limits(source.migration);
    input.destination = limits(destination.migration);
    // Safety gate: the destination must be able to catch missing-page faults.
    input.destination.permit_post_copy &= destination.userfaultfd;
    input.link_bytes_per_s = order.link_bytes_per_s;
    input.deadline_ms = order.deadline_ms;
    Ok(input)
}

/// The policy an order names, built (a [`PolicyName`] is always valid).
pub fn policy_of(order: &MigrationOrder) -> Box<dyn tern_policy::MigrationPolicy> {
    order.policy.build()
}

fn vm_limits(spec: &VmSpec) -> VmLimits {
    VmLimits {
        post_copy: match spec.migration.post_copy {
            PostCopyPermission::Allowed => PolicyPostCopy::Allowed,
            PostCopyPermission::Forbidden => PolicyPostCopy::Forbidden,
        },
        max_downtime_ms: spec.migration.max_downtime_ms,
        ram_bytes: spec.memory_mib * 1024 * 1024,
        vcpus: spec.vcpus,
    }
}

fn no_features() -> QemuFeatures {
    QemuFeatures {
        postcopy_ram: false,
        postcopy_preempt: false,
        postcopy_recovery: false,
        auto_converge: false,
        dirty_limit: false,
        multifd: false,
        multifd_with_postcopy: false,
        xbzrle: false,
        calc_dirty_rate: false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tern_policy::{MigrationContext, PolicyName};
    use tern_qemu::{Accelerator, VmMigrationSettings};

    use super::*;

    fn spec(mem: u64, sla: &str) -> VmSpec {
        VmSpec {
            name: "web".into(),
            memory_mib: mem,
            vcpus: 1,
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            cmdline: String::new(),
            accelerator: Accelerator::Tcg,
            migration: VmMigrationSettings {
                sla_class: sla.into(),
                ..VmMigrationSettings::default()
            },
            devices: Default::default(),
        }
    }

    fn order() -> MigrationOrder {
        MigrationOrder {
            vm: "web".into(),
            context: MigrationContext::Evacuate,
            policy: PolicyName::Tern,
            link_bytes_per_s: Some(25_000_000),
            deadline_ms: Some(60_000),
            probe_seconds: 0,
        }
    }

    fn host<'a>(name: &'a str, cfg: &'a HostMigrationConfig) -> HostSide<'a> {
        HostSide {
            name,
            memory_mib: 1024,
            free_memory_mib: 1024,
            migration: cfg,
            has_vm_named: false,
            userfaultfd: true,
        }
    }

    fn vm(spec: &VmSpec) -> SourceVm<'_> {
        SourceVm {
            spec,
            role: VmRole::Running,
            migrating: None,
        }
    }

    fn refusal(
        order: &MigrationOrder,
        vm: SourceVm<'_>,
        src: HostSide<'_>,
        dst: HostSide<'_>,
    ) -> (u16, String) {
        let e = admit(order, vm, src, dst, &SlaCatalog::builtin()).unwrap_err();
        (crate::http::status_of(&e).as_u16(), e.to_string())
    }

    #[test]
    fn a_valid_order_becomes_the_policy_input() {
        let cfg = HostMigrationConfig::default();
        let s = spec(256, &VmMigrationSettings::default().sla_class);
        let input = admit(
            &order(),
            vm(&s),
            host("h1", &cfg),
            host("h2", &cfg),
            &SlaCatalog::builtin(),
        )
        .unwrap();
        assert_eq!(input.context, MigrationContext::Evacuate);
        assert_eq!(input.vm.ram_bytes, 256 << 20);
        assert_eq!(input.link_bytes_per_s, Some(25_000_000));
        assert_eq!(input.deadline_ms, Some(60_000));
        assert!(input.destination.permit_post_copy);
    }

    #[test]
    fn every_refusal_names_the_bad_value_and_what_is_valid() {
        let cfg = HostMigrationConfig::default();
        let sla = VmMigrationSettings::default().sla_class;
        let s = spec(256, &sla);
        let (code, e) = refusal(&order(), vm(&s), host("h1", &cfg), host("h1", &cfg));
        assert_eq!(code, 400);
        assert!(
            e.contains("h1") && e.contains("different destination"),
            "{e}"
        );

        let busy = SourceVm {
            migrating: Some("web-1"),
            ..vm(&s)
        };
        let (code, e) = refusal(&order(), busy, host("h1", &cfg), host("h2", &cfg));
        assert_eq!(code, 409);
        assert!(e.contains("web-1"), "{e}");

        let incoming = SourceVm {
            role: VmRole::Incoming,
            ..vm(&s)
        };
        assert_eq!(
            refusal(&order(), incoming, host("h1", &cfg), host("h2", &cfg)).0,
            409
        );

        let taken = HostSide {
            has_vm_named: true,
            ..host("h2", &cfg)
        };
        assert_eq!(refusal(&order(), vm(&s), host("h1", &cfg), taken).0, 409);

        let big = spec(4096, &sla);
        let (code, e) = refusal(&order(), vm(&big), host("h1", &cfg), host("h2", &cfg));
        assert_eq!(code, 422);
        assert!(e.contains("4096 MiB") && e.contains("1024 MiB free"), "{e}");

        let zero = MigrationOrder {
            deadline_ms: Some(0),
            ..order()
        };
        let (code, e) = refusal(&zero, vm(&s), host("h1", &cfg), host("h2", &cfg));
        assert_eq!(code, 400);
        assert!(e.contains("deadline") && e.contains("> 0"), "{e}");

        let slow = MigrationOrder {
            link_bytes_per_s: Some(1),
            ..order()
        };
        let (code, e) = refusal(&slow, vm(&s), host("h1", &cfg), host("h2", &cfg));
        assert_eq!(code, 400);
        assert!(e.contains("1 B/s") && e.contains("8 kbit/s"), "{e}");

        let gold = spec(256, "platinum-plus");
        let (code, e) = refusal(&order(), vm(&gold), host("h1", &cfg), host("h2", &cfg));
        assert_eq!(code, 400);
        assert!(e.contains("platinum-plus"), "{e}");
    }

    #[test]
    fn post_copy_needs_userfaultfd_and_both_hosts_permission() {
        let cfg = HostMigrationConfig::default();
        let deny = HostMigrationConfig {
            permit_post_copy: false,
            ..HostMigrationConfig::default()
        };
        let s = spec(256, &VmMigrationSettings::default().sla_class);
        let cat = SlaCatalog::builtin();
        let no_uffd = HostSide {
            userfaultfd: false,
            ..host("h2", &cfg)
        };
        let i = admit(&order(), vm(&s), host("h1", &cfg), no_uffd, &cat).unwrap();
        assert!(!i.destination.permit_post_copy);
        let i = admit(&order(), vm(&s), host("h1", &deny), host("h2", &cfg), &cat).unwrap();
        assert!(!i.source.permit_post_copy && i.destination.permit_post_copy);
    }
}

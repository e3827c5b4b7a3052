//! Where a VM may go, and why (pure: no I/O, no clock).
//!
//! A destination must be `up` (not draining, heartbeating), hold the VM's memory after what
//! is already promised to migrations in flight, run a QEMU at least as new as the source's
//! (a guest cannot move to an older QEMU: its machine type and device state may not exist
//! there), and have an inbound slot free. Among those, hosts where post-copy works end to
//! end are preferred for VMs that allow it (the must-finish guarantee rests on it), then the
//! least loaded, then the one with most free memory. Nova's scheduler filters and weighs the
//! same way (RAM filter, compute capabilities filter, weighers); the reason is kept so the
//! operator sees why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{HostRecord, HostState, VmRecord};

/// The fleet as placement sees it: hosts with their effective state, and what migrations in
/// flight already promise each host.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    /// Hosts by name (state already `unreachable` where the heartbeat is stale).
    pub hosts: BTreeMap<String, HostRecord>,
    /// Memory promised to incoming migrations not finished yet, by destination (MiB).
    pub reserved_mib: BTreeMap<String, u64>,
    /// Incoming migrations in flight, by destination.
    pub inbound: BTreeMap<String, u32>,
}

/// Why one host cannot take a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rejection {
    /// The host.
    pub host: String,
    /// Why not.
    pub why: String,
}

/// A chosen destination and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Choice {
    /// The destination host.
    pub host: String,
    /// Why it was chosen, for operators.
    pub reason: String,
}

/// A QEMU version as a comparable tuple (`10.0.2` → (10, 0, 2)); unparsable parts are 0.
pub fn qemu_version(v: &str) -> (u32, u32, u32) {
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

impl Fleet {
    /// Memory still free on `host` after what in-flight migrations promise.
    pub fn free_mib(&self, host: &HostRecord) -> u64 {
        host.facts
            .free_memory_mib
            .saturating_sub(self.reserved_mib.get(&host.name).copied().unwrap_or(0))
    }

    /// Incoming migrations on `host`: the agent's count or ours, whichever is larger.
    pub fn inbound_load(&self, host: &HostRecord) -> u32 {
        host.facts
            .inbound_migrations
            .max(self.inbound.get(&host.name).copied().unwrap_or(0))
    }

    /// Promises `vm`'s memory and an inbound slot on `host` (used while planning).
    pub fn reserve(&mut self, host: &str, memory_mib: u64) {
        *self.reserved_mib.entry(host.to_string()).or_default() += memory_mib;
        *self.inbound.entry(host.to_string()).or_default() += 1;
    }

    /// Why `dest` cannot take `vm` from `source`, or `None` when it can.
    pub fn reject(
        &self,
        vm: &VmRecord,
        source: &HostRecord,
        dest: &HostRecord,
        count_inbound: bool,
    ) -> Option<String> {
        if dest.name == source.name {
            return Some("it is the VM's own host".into());
        }
        match dest.state {
            HostState::Up => {}
            HostState::Draining => return Some("draining: nothing is placed on it".into()),
            HostState::Unreachable => {
                return Some("unreachable: no heartbeat within the timeout".into());
            }
        }
        let free = self.free_mib(dest);
        if free < vm.memory_mib {
            return Some(format!(
                "{free} MiB free, the VM needs {} MiB",
                vm.memory_mib
            ));
        }
        if qemu_version(&dest.facts.qemu_version) < qemu_version(&source.facts.qemu_version) {
            return Some(format!(
                "QEMU {} is older than the source's {} (a guest cannot move to an older QEMU)",
                dest.facts.qemu_version, source.facts.qemu_version
            ));
        }
        let load = self.inbound_load(dest);
        if count_inbound && load >= dest.inbound_limit() {
            return Some(format!(
                "inbound limit reached ({load} of {})",
                dest.inbound_limit()
            ));
        }
        None
    }

    /// Whether post-copy could be used for `vm` from `source` to `dest`.
    pub fn post_copy_end_to_end(vm: &VmRecord, source: &HostRecord, dest: &HostRecord) -> bool {
        let cap = |h: &HostRecord| {
            h.facts
                .migration_capabilities
                .iter()
                .any(|c| c == "postcopy-ram")
        };
        vm.post_copy_allowed
            && source.post_copy_permitted()
            && dest.post_copy_permitted()
            && cap(source)
            && cap(dest)
    }

    /// The best destination for `vm` (on `source`), skipping `exclude`; or every host's
    /// reason for refusing it.
    pub fn choose(
        &self,
        vm: &VmRecord,
        source: &HostRecord,
        exclude: &[&str],
    ) -> Result<Choice, Vec<Rejection>> {
        let mut rejected = Vec::new();
        let mut best: Option<(&HostRecord, (bool, i64, u64))> = None;
        let mut candidates = 0;
        for dest in self.hosts.values() {
            if dest.name == source.name {
                continue;
            }
            if exclude.contains(&dest.name.as_str()) {
                rejected.push(Rejection {
                    host: dest.name.clone(),
                    why: "excluded (it was the destination of a failed attempt)".into(),
                });
                continue;
            }
            if let Some(why) = self.reject(vm, source, dest, true) {
                rejected.push(Rejection {
                    host: dest.name.clone(),
                    why,
                });
                continue;
            }
            candidates += 1;
            let score = (
                Self::post_copy_end_to_end(vm, source, dest),
                -i64::from(self.inbound_load(dest)),
                self.free_mib(dest),
            );
            if best.as_ref().is_none_or(|(_, s)| score > *s) {
                best = Some((dest, score));
            }
        }
        let Some((dest, (pc, _, free))) = best else {
            if rejected.is_empty() {
                rejected.push(Rejection {
                    host: "-".into(),
                    why: "no other host has registered".into(),
                });
            }
            return Err(rejected);
        };
        let post_copy = if pc {
            "post-copy possible end to end".to_string()
        } else if !vm.post_copy_allowed {
            "the VM forbids post-copy".to_string()
        } else {
            "post-copy not possible (host setting or QEMU capability)".to_string()
        };
        Ok(Choice {
            host: dest.name.clone(),
            reason: format!(
                "{}: {free} MiB free (VM needs {}), {post_copy}, QEMU {} (source {}), \
                 {} of {} inbound slots used; best of {candidates} candidate(s)",
                dest.name,
                vm.memory_mib,
                dest.facts.qemu_version,
                source.facts.qemu_version,
                self.inbound_load(dest),
                dest.inbound_limit()
            ),
        })
    }
}

/// Formats per-host rejections on one line.
pub fn describe(rejections: &[Rejection]) -> String {
    rejections
        .iter()
        .map(|r| format!("{}: {}", r.host, r.why))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::HostFacts;

    pub fn host(name: &str, free: u64, qemu: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            state: HostState::Up,
            facts: HostFacts {
                memory_mib: free,
                free_memory_mib: free,
                qemu_version: qemu.into(),
                migration_capabilities: vec!["postcopy-ram".into()],
                permit_post_copy: true,
                link_bytes_per_s: Some(125_000_000),
                max_outbound: 2,
                max_inbound: 2,
                outbound_migrations: 0,
                inbound_migrations: 0,
            },
            post_copy: None,
            max_outbound: None,
            max_inbound: None,
            last_heartbeat_ms: 0,
        }
    }

    pub fn vm(name: &str, host: &str, mem: u64) -> VmRecord {
        VmRecord {
            name: name.into(),
            host: host.into(),
            memory_mib: mem,
            sla_class: "silver".into(),
            post_copy_allowed: true,
            dirty_bytes_per_s: None,
        }
    }

    fn fleet(hosts: Vec<HostRecord>) -> Fleet {
        Fleet {
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
            ..Fleet::default()
        }
    }

    #[test]
    fn chooses_the_host_with_room_and_says_why() {
        let f = fleet(vec![
            host("h1", 4096, "10.0.0"),
            host("h2", 256, "10.0.0"),
            host("h3", 2048, "10.0.0"),
        ]);
        let c = f.choose(&vm("a", "h1", 512), &f.hosts["h1"], &[]).unwrap();
        assert_eq!(c.host, "h3");
        assert!(c.reason.contains("2048 MiB free"), "{}", c.reason);
    }

    #[test]
    fn refuses_older_qemu_draining_and_full_hosts_with_reasons() {
        let mut d = host("h3", 4096, "10.0.0");
        d.state = HostState::Draining;
        let f = fleet(vec![
            host("h1", 4096, "10.0.0"),
            host("h2", 4096, "9.2.0"),
            d,
            host("h4", 100, "10.0.0"),
        ]);
        let e = f
            .choose(&vm("a", "h1", 512), &f.hosts["h1"], &[])
            .unwrap_err();
        let text = describe(&e);
        assert!(text.contains("h2: QEMU 9.2.0 is older"), "{text}");
        assert!(text.contains("h3: draining"), "{text}");
        assert!(
            text.contains("h4: 100 MiB free, the VM needs 512"),
            "{text}"
        );
    }

    #[test]
    fn prefers_post_copy_capable_destinations() {
        let mut deny = host("h2", 8192, "10.0.0");
        deny.post_copy = Some(crate::model::PostCopySetting::Deny);
        let f = fleet(vec![
            host("h1", 1, "10.0.0"),
            deny,
            host("h3", 1024, "10.0.0"),
        ]);
        let c = f.choose(&vm("a", "h1", 512), &f.hosts["h1"], &[]).unwrap();
        assert_eq!(c.host, "h3");
        assert!(c.reason.contains("post-copy possible"), "{}", c.reason);
    }

    #[test]
    fn reservations_count_against_memory_and_inbound_slots() {
        let mut f = fleet(vec![host("h1", 1, "10.0.0"), host("h2", 1024, "10.0.0")]);
        f.reserve("h2", 600);
        let e = f
            .choose(&vm("a", "h1", 512), &f.hosts["h1"], &[])
            .unwrap_err();
        assert!(describe(&e).contains("424 MiB free"), "{e:?}");
        f.reserved_mib.clear();
        f.inbound.insert("h2".into(), 2);
        let e = f
            .choose(&vm("a", "h1", 512), &f.hosts["h1"], &[])
            .unwrap_err();
        assert!(
            describe(&e).contains("inbound limit reached (2 of 2)"),
            "{e:?}"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(qemu_version("10.0.0") > qemu_version("9.2.1"));
        assert_eq!(qemu_version("v9.1"), (9, 1, 0));
    }
}

//! Seeded fleets for tests, the comparison and the benchmark. Deterministic: a seed is a case.
//!
//! Mix chosen to look like a virtualisation fleet: 10 Gbit/s links with some 25 Gbit/s hosts;
//! a migration stream capped at 1–1.5 GB/s in half the cases (QEMU's migration thread without
//! multifd); guests of 1–64 GiB, mostly small; dirty rates from idle to faster than the link
//! (a few), working sets 10–100 % of RAM; SLA classes standard/batch/latency-critical; a few
//! hosts denying post-copy, running an older QEMU or lacking a CPU feature some VMs need.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tern_policy::{MigrationContext, SlaCatalog};

use crate::facts::{
    EvacuationRequest, HostFacts, POSTCOPY_RAM, PlannerSettings, QemuVersion, VmFacts,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// A CPU feature some generated VMs require and some hosts lack.
pub const CPU_FEATURE: &str = "avx512f";

/// Shape of a generated fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetShape {
    /// Hosts in the fleet.
    pub hosts: usize,
    /// Hosts to empty (the first ones).
    pub sources: usize,
    /// VMs per host to empty.
    pub vms_per_source: usize,
}

/// The comparison's case for `seed`: 3–50 hosts, one host to empty with 5–100 VMs.
pub fn comparison_case(seed: u64) -> EvacuationRequest {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let hosts = rng.gen_range(3..=50);
    let vms = rng.gen_range(5..=100);
    fleet(
        seed,
        FleetShape {
            hosts,
            sources: 1,
            vms_per_source: vms,
        },
    )
}

/// A fleet of `shape` from `seed`, context evacuate, no deadline.
pub fn fleet(seed: u64, shape: FleetShape) -> EvacuationRequest {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7465_726e);
    let catalog = SlaCatalog::builtin();
    let class = |name: &str| {
        catalog
            .get(name)
            .cloned()
            .unwrap_or_else(|_| tern_policy::SlaClass::new(name, 300, 50, true, 50))
    };
    let stream_cap = match rng.gen_range(0..4) {
        0 => Some(1_000_000_000),
        1 => Some(1_500_000_000),
        _ => None,
    };
    let sources = shape.sources.clamp(1, shape.hosts.saturating_sub(1).max(1));
    let n_vms = sources * shape.vms_per_source;
    let mut vms = Vec::with_capacity(n_vms);
    let mut vm_mem_total = 0u64;
    for s in 0..sources {
        for i in 0..shape.vms_per_source {
            let memory = match rng.gen_range(0..100) {
                0..=29 => 2 * GIB,
                30..=54 => 4 * GIB,
                55..=74 => 8 * GIB,
                75..=89 => 16 * GIB,
                90..=96 => 32 * GIB,
                _ => 64 * GIB,
            };
            let dirty = match rng.gen_range(0..100) {
                0..=34 => rng.gen_range(0..4 * MIB),
                35..=74 => rng.gen_range(10 * MIB..150 * MIB),
                75..=92 => rng.gen_range(150 * MIB..600 * MIB),
                _ => rng.gen_range(600 * MIB..2000 * MIB),
            };
            let ws_pct = rng.gen_range(10..=100u64);
            let sla = match rng.gen_range(0..100) {
                0..=59 => class("standard"),
                60..=84 => class("batch"),
                _ => class("latency-critical"),
            };
            let mut required = BTreeSet::new();
            if rng.gen_range(0..10) == 0 {
                required.insert(CPU_FEATURE.to_string());
            }
            vm_mem_total += memory;
            vms.push(VmFacts {
                name: format!("vm{s:03}-{i:03}"),
                host: host_name(s),
                memory_bytes: memory,
                dirty_bytes_per_s: if rng.gen_range(0..10) == 0 {
                    None
                } else {
                    Some(dirty)
                },
                working_set_bytes: Some(memory / 100 * ws_pct),
                sla,
                post_copy_allowed: rng.gen_range(0..10) != 0,
                required_features: required,
            });
        }
    }
    let n_dest = shape.hosts - sources;
    let share = vm_mem_total / n_dest.max(1) as u64;
    let mut hosts = Vec::with_capacity(shape.hosts);
    for h in 0..shape.hosts {
        let is_source = h < sources;
        let fast = rng.gen_range(0..5) == 0;
        let link = if fast { 3_125_000_000 } else { 1_250_000_000 };
        let total = 1024 * GIB;
        let free = if is_source {
            0
        } else {
            (share as f64 * rng.gen_range(1.3..3.0)) as u64 + 64 * GIB
        }
        .min(total);
        let mut features: BTreeSet<String> = [POSTCOPY_RAM, "multifd", "auto-converge"]
            .into_iter()
            .map(String::from)
            .collect();
        if is_source || h == sources || rng.gen_range(0..5) != 0 {
            features.insert(CPU_FEATURE.to_string());
        }
        hosts.push(HostFacts {
            name: host_name(h),
            total_memory_bytes: total,
            free_memory_bytes: free,
            // Host 1 (after the sources) is always a compatible destination, so every case has
            // work to compare.
            qemu_version: if !is_source && h != sources && rng.gen_range(0..8) == 0 {
                QemuVersion::new(9, 2, 0)
            } else {
                QemuVersion::new(10, 0, 0)
            },
            features,
            permit_post_copy: is_source || rng.gen_range(0..7) != 0,
            max_outbound: if is_source { rng.gen_range(2..=8) } else { 2 },
            max_inbound: rng.gen_range(1..=4),
            egress_bytes_per_s: link,
            ingress_bytes_per_s: link,
            draining: false,
            reachable: true,
        });
    }
    let mut req = EvacuationRequest::new(
        MigrationContext::Evacuate,
        hosts,
        (0..sources).map(host_name).collect(),
        vms,
    );
    req.settings = PlannerSettings {
        stream_cap_bytes_per_s: stream_cap,
        ..PlannerSettings::default()
    };
    req
}

fn host_name(i: usize) -> String {
    format!("h{i:05}")
}

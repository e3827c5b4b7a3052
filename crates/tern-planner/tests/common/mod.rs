//! Small fleets for tests.
#![allow(dead_code)]

use std::collections::BTreeSet;

use tern_planner::*;
use tern_policy::{MigrationContext, SlaCatalog};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

pub fn host(name: &str, free_gib: u64, link: u64) -> HostFacts {
    HostFacts {
        name: name.into(),
        total_memory_bytes: 512 * GIB,
        free_memory_bytes: free_gib * GIB,
        qemu_version: QemuVersion::new(10, 0, 0),
        features: [POSTCOPY_RAM, "multifd"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>(),
        permit_post_copy: true,
        max_outbound: 4,
        max_inbound: 2,
        egress_bytes_per_s: link,
        ingress_bytes_per_s: link,
        draining: false,
        reachable: true,
    }
}

pub fn vm(name: &str, host: &str, gib: u64, dirty: u64, class: &str) -> VmFacts {
    VmFacts {
        name: name.into(),
        host: host.into(),
        memory_bytes: gib * GIB,
        dirty_bytes_per_s: Some(dirty),
        working_set_bytes: None,
        sla: SlaCatalog::builtin().get(class).unwrap().clone(),
        post_copy_allowed: true,
        required_features: BTreeSet::new(),
    }
}

/// h0 (to empty) with `vms`, and destinations h1..=h{dests}.
pub fn request(context: MigrationContext, dests: usize, vms: Vec<VmFacts>) -> EvacuationRequest {
    let mut hosts = vec![host("h0", 0, 1_250_000_000)];
    for i in 1..=dests {
        hosts.push(host(&format!("h{i}"), 128, 1_250_000_000));
    }
    EvacuationRequest::new(context, hosts, vec!["h0".into()], vms)
}

/// Asserts every invariant of a plan for `req`; used by the property tests and the scenarios.
pub fn check_invariants(req: &EvacuationRequest, plan: &EvacuationPlan) {
    // Every VM exactly once: placed or unplaceable.
    let mut seen: Vec<&str> = plan
        .migrations
        .iter()
        .map(|m| m.vm.as_str())
        .chain(plan.unplaceable.iter().map(|u| u.vm.as_str()))
        .collect();
    seen.sort_unstable();
    let mut expected: Vec<&str> = req.vms.iter().map(|v| v.name.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected, "every VM exactly once");
    // Unplaceable VMs list every other host with a reason.
    for u in &plan.unplaceable {
        assert_eq!(u.refusals.len(), req.hosts.len() - 1, "{u:?}");
    }
    // Capacity, compatibility.
    let host = |n: &str| req.hosts.iter().find(|h| h.name == n).unwrap();
    let mut placed: std::collections::BTreeMap<&str, u64> = Default::default();
    for m in &plan.migrations {
        let v = req.vms.iter().find(|v| v.name == m.vm).unwrap();
        let d = host(&m.destination);
        let s = host(&m.source);
        assert!(!req.hosts_to_empty.contains(&m.destination), "{m:?}");
        assert!(d.reachable && !d.draining && d.max_inbound > 0, "{m:?}");
        assert!(d.qemu_version >= s.qemu_version, "{m:?}");
        assert!(v.required_features.iter().all(|f| d.features.contains(f)));
        *placed.entry(d.name.as_str()).or_default() += v.memory_bytes;
        assert!(m.predicted_end_s >= m.predicted_start_s, "{m:?}");
    }
    for (h, bytes) in placed {
        assert!(bytes <= host(h).free_memory_bytes, "{h} over capacity");
    }
    // Concurrency at every instant: sweep the intervals (ends before starts at equal times).
    let mut events: Vec<(f64, i32, &str, &str)> = Vec::new();
    for m in &plan.migrations {
        events.push((m.predicted_start_s, 1, &m.source, &m.destination));
        events.push((m.predicted_end_s, -1, &m.source, &m.destination));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut out: std::collections::BTreeMap<&str, i32> = Default::default();
    let mut inn: std::collections::BTreeMap<&str, i32> = Default::default();
    let mut total = 0i32;
    for (_, delta, s, d) in events {
        *out.entry(s).or_default() += delta;
        *inn.entry(d).or_default() += delta;
        assert!(
            out[s] <= host(s).max_outbound as i32,
            "outbound limit of {s}"
        );
        assert!(inn[d] <= host(d).max_inbound as i32, "inbound limit of {d}");
        total += delta;
        let cap = i64::from(plan.concurrency.per_source_cap);
        assert!(i64::from(out[s]) <= cap, "scheduler's per-source cap");
        if let Some(c) = plan.concurrency.cluster_cap {
            assert!(i64::from(total) <= i64::from(c), "cluster cap");
        }
    }
    // Makespan ≥ lower bound.
    assert!(
        plan.predicted_makespan_s >= plan.lower_bound.any_schedule_s * (1.0 - 1e-9),
        "makespan {} below bound {}",
        plan.predicted_makespan_s,
        plan.lower_bound.any_schedule_s
    );
}

//! Debug aid: `cargo run --release -p tern-sim --example trace -- <policy> <seed> <n> [id|violations]`
//! prints each selected scenario and the policy's decisions.

use tern_sim::{SimConfig, generate_scenarios, simulate_with};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let policy = args.first().map_or("tern", String::as_str).to_string();
    let seed = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let n = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let which = args.get(3).cloned().unwrap_or_else(|| "violations".into());
    if let Err(e) = tern_policy::policy_by_name(&policy) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    for sc in generate_scenarios(n, seed) {
        if which != "violations" && which != "all" && which != sc.id.to_string() {
            continue;
        }
        let mut make = || {
            tern_policy::policy_by_name(&policy)
                .unwrap_or_else(|_| Box::new(tern_policy::baselines::QemuDefaultPolicy))
        };
        let (o, trace) = simulate_with(&sc, &mut make, SimConfig::default(), true);
        if which == "violations" && o.sla_violation.is_none() {
            continue;
        }
        println!(
            "---- scenario {} {} sla={} ram={}MiB wws={}MiB rate={:?} link={:.0}Mbit outages={:?} pc_perm={}/{}/{:?} pcram={} rec={} deadline={:?}",
            sc.id,
            sc.context,
            sc.sla.name,
            sc.ram_bytes >> 20,
            sc.wws_bytes >> 20,
            sc.dirty_phases
                .iter()
                .map(|p| (p.from_ms, p.pages_per_s as u64))
                .collect::<Vec<_>>(),
            sc.link_bytes_per_s as f64 * 8e-6,
            sc.outages,
            sc.source.permit_post_copy,
            sc.destination.permit_post_copy,
            sc.vm_post_copy,
            sc.features.postcopy_ram,
            sc.features.postcopy_recovery,
            sc.deadline_ms
        );
        println!(
            "outcome {:?} total={}ms down={:?} thr={}ms max_thr={} pc={}ms passes={} bytes/ram={:.2} violation={:?}",
            o.result,
            o.total_ms,
            o.downtime_ms,
            o.throttled_ms,
            o.max_throttle_pct,
            o.postcopy_ms,
            o.passes,
            o.bytes_sent as f64 / o.ram_bytes as f64,
            o.sla_violation
        );
        for t in trace
            .iter()
            .filter(|t| t.decision.action != tern_policy::Action::Continue || which != "violations")
            .take(40)
        {
            println!(
                "  {:>8} {:?}: {}",
                t.at_ms, t.decision.action, t.decision.reason
            );
        }
    }
}

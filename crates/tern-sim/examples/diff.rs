//! Debug aid: `cargo run --release -p tern-sim --example diff -- <baseline> <context> [seed] [n]`
//! lists scenarios where tern's outcome is worse than the baseline's.

use std::cmp::Ordering;

use tern_sim::{compare_outcomes, generate_scenarios, simulate};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args.first().cloned().unwrap_or_else(|| "nova-2016".into());
    let ctx = args.get(1).cloned().unwrap_or_else(|| "balance".into());
    let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
    if let Err(e) = tern_policy::policy_by_name(&base) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let mut shown = 0;
    for sc in generate_scenarios(n, seed) {
        if sc.context.to_string() != ctx {
            continue;
        }
        let (Ok(t), Ok(b)) = (simulate(&sc, "tern"), simulate(&sc, &base)) else {
            continue;
        };
        if compare_outcomes(&t, &b) == Ordering::Greater && shown < 25 {
            shown += 1;
            println!(
                "#{} sla={} ram={}MiB wws={}MiB rate={:.0} link={:.0}Mbit pc={}/{}/{:?}/{} rec={} out={}",
                sc.id,
                sc.sla.name,
                sc.ram_bytes >> 20,
                sc.wws_bytes >> 20,
                sc.dirty_phases[0].pages_per_s,
                sc.link_bytes_per_s as f64 * 8e-6,
                sc.source.permit_post_copy,
                sc.destination.permit_post_copy,
                sc.vm_post_copy,
                sc.features.postcopy_ram,
                sc.features.postcopy_recovery,
                sc.outages.len()
            );
            for o in [&t, &b] {
                println!(
                    "   {:<16} {:?} total={:.1}s down={:?} pc={:.1}s thr={:.1}s viol={:?}",
                    o.policy,
                    o.result,
                    o.total_ms as f64 / 1000.0,
                    o.downtime_ms,
                    o.postcopy_ms as f64 / 1000.0,
                    o.throttled_ms as f64 / 1000.0,
                    o.sla_violation
                );
            }
        }
    }
}

//! Prints one comparison case and tern's plan: `cargo run --release -p tern-planner --example case SEED`.
use tern_planner::cases::comparison_case;
use tern_planner::plan_evacuation;
fn main() {
    let seed: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let req = comparison_case(seed);
    println!("stream cap {:?}", req.settings.stream_cap_bytes_per_s);
    for h in req.hosts.iter().take(6) {
        println!(
            "{} free {} GiB out {} in {} link {} pc {} qemu {}",
            h.name,
            h.free_memory_bytes >> 30,
            h.max_outbound,
            h.max_inbound,
            h.egress_bytes_per_s,
            h.permit_post_copy,
            h.qemu_version
        );
    }
    let plan = plan_evacuation(&req).expect("valid case");
    println!(
        "makespan {:.0} s, bound {:?}, order {:?}, placement {:?}, {:?}",
        plan.predicted_makespan_s, plan.lower_bound, plan.order, plan.placement, plan.concurrency
    );
    for m in &plan.migrations {
        let v = req.vms.iter().find(|v| v.name == m.vm).expect("planned VM");
        println!(
            "{} {} GiB dirty {:?} MiB/s → {} {:.0}–{:.0} s rate {} MB/s {:?}",
            m.vm,
            v.memory_bytes >> 30,
            v.dirty_bytes_per_s.map(|d| d >> 20),
            m.destination,
            m.predicted_start_s,
            m.predicted_end_s,
            m.predicted_rate_bytes_per_s / 1_000_000,
            m.ending
        );
    }
}

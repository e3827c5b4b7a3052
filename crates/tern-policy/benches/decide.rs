//! Cost of one per-pass decision of each policy (`cargo bench -p tern-policy`).
//!
//! Each iteration clones a policy that has already seen 8 pass boundaries of a non-converging
//! guest (so the convergence model has a full fit window) and feeds it the next boundary.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group};
use tern_policy::*;

const MIB: u64 = 1 << 20;

fn setup(name: &str) -> (Box<dyn MigrationPolicy>, MigrationPlan, Observation) {
    let sla = SlaCatalog::builtin()
        .get("standard")
        .cloned()
        .unwrap_or_else(|_| SlaClass::new("standard", 300, 50, true, 50));
    let mut input = PlanInput::new(
        MigrationContext::Evacuate,
        sla,
        VmLimits::new(1 << 30),
        QemuFeatures::qemu_10_tcg(),
    );
    input.destination.permit_post_copy = false; // keep deciding instead of switching
    input.link_bytes_per_s = Some(12_500_000);
    input.probe = Some(DirtyRateProbe {
        period_ms: 1000,
        dirty_bytes_per_s: 64 * MIB,
    });
    let mut p =
        unguarded_policy_by_name(name).unwrap_or_else(|_| Box::new(baselines::QemuDefaultPolicy));
    let plan = p.plan(&input);
    let sample = |i: u64| IterationSample {
        at_ms: 86_000 + i * 5_400,
        pass: i + 2,
        transferred_bytes: (1 << 30) + i * 64 * MIB,
        remaining_bytes: 64 * MIB - (i % 3) * MIB,
        total_bytes: 1 << 30,
        dirty_pages_rate: 3_000,
        page_size: 4096,
        throughput_bytes_per_s: 12_500_000,
        expected_downtime_ms: Some(5_000),
        throttle_pct: None,
        phase: Phase::Precopy,
    };
    for i in 0..8 {
        p.decide(&plan, &Observation::PassCompleted(sample(i)));
    }
    (p, plan, Observation::PassCompleted(sample(8)))
}

fn bench_tern(c: &mut Criterion) {
    let (p, plan, obs) = setup("tern");
    let tern = TernPolicyBox(p);
    c.bench_function("tern decide (pass boundary)", |b| {
        b.iter_batched(
            || tern.fresh(),
            |mut p| black_box(p.decide(&plan, &obs)),
            BatchSize::SmallInput,
        )
    });
}

/// Re-runs `setup` for a fresh copy (policies are not `Clone` behind `dyn`).
struct TernPolicyBox(Box<dyn MigrationPolicy>);
impl TernPolicyBox {
    fn fresh(&self) -> Box<dyn MigrationPolicy> {
        setup(self.0.name()).0
    }
}

criterion_group!(benches, bench_tern);

fn main() {
    benches();
    // A plain per-policy summary in µs (setup excluded).
    println!("\nper-pass decide cost (µs, mean of 2000 fresh policies each):");
    for name in POLICY_NAMES {
        let mut total = 0.0;
        let n = 2000;
        for _ in 0..n {
            let (mut p, plan, obs) = setup(name);
            let t = Instant::now();
            black_box(p.decide(&plan, &obs));
            total += t.elapsed().as_secs_f64();
        }
        println!("  {name:<31} {:>8.2} µs", total / f64::from(n) * 1e6);
    }
    Criterion::default().configure_from_args().final_summary();
}

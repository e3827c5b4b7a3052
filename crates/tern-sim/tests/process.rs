//! Properties of the page-granular write process and of the simulator built on it.

use proptest::prelude::*;
use tern_policy::MigrationContext;
use tern_sim::memory::{Bitmap, GuestMemory, PAGE_HEADER_BYTES, ZERO_PAGE_BYTES};
use tern_sim::{
    Burst, LabPattern, LabPhysics, LabWorkload, PageRange, SimResult, Workload, WorkloadPhase,
    WritePattern, WriteStream, generate_scenarios, scenario_from_lab, simulate,
};

const MIB: u64 = 1 << 20;

/// A workload over `pages` pages: 1–3 phases of 1–3 streams each (sequential or random, any
/// range inside RAM, 0–200 k page writes/s), maybe bursty, some resident data.
fn arb_workload(pages: u64) -> impl Strategy<Value = Workload> {
    let stream = (0..pages, 1..pages, any::<bool>(), 0.0f64..200_000.0).prop_map(
        move |(first, len, seq, rate)| WriteStream {
            range: PageRange {
                first,
                pages: len.min(pages - first),
            },
            pattern: if seq {
                WritePattern::Sequential
            } else {
                WritePattern::Random
            },
            pages_per_s: rate,
        },
    );
    let phase = proptest::collection::vec(stream, 1..4);
    (
        proptest::collection::vec(phase, 1..4),
        0..pages,
        proptest::option::of((100u64..5_000, 100u64..5_000)),
        any::<u64>(),
    )
        .prop_map(|(phases, resident, burst, seed)| Workload {
            resident: vec![PageRange {
                first: 0,
                pages: resident,
            }],
            phases: phases
                .into_iter()
                .enumerate()
                .map(|(i, streams)| WorkloadPhase {
                    from_ms: i as u64 * 3_000,
                    streams,
                })
                .collect(),
            burst: burst.map(|(on_ms, off_ms)| Burst { on_ms, off_ms }),
            seed,
        })
}

fn working_set(w: &Workload, pages: u64) -> Bitmap {
    let mut b = Bitmap::new(pages);
    for p in &w.phases {
        for s in &p.streams {
            b.set_range(s.range.first, s.range.end());
        }
    }
    b
}

fn lab(ws_mib: u64, rate: f64, memory_mib: u64) -> LabWorkload {
    LabWorkload {
        memory_mib,
        working_set_mib: ws_mib,
        dirty_pages_per_s: Some(rate),
        pattern: LabPattern::Seq,
        link: "300mbit".into(),
        context: MigrationContext::Evacuate,
        post_copy: true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The dirty set at any moment, and every pass after the first, lies inside the pages the
    /// streams write: writes never leak outside the working set, and a pass is never larger.
    #[test]
    fn dirty_set_never_exceeds_the_working_set(
        w in arb_workload(20_000),
        steps in proptest::collection::vec((0.001f64..2.0, 0.0f64..1.0, any::<bool>()), 1..20),
    ) {
        let pages = 20_000;
        let ws = working_set(&w, pages);
        let ws_pages = w.working_set_pages();
        prop_assert_eq!(ws.count(), ws_pages);
        let mut m = GuestMemory::new(&w, pages);
        m.sync(None);
        let mut t = 0.0;
        for (dt, scale, sync) in steps {
            m.accrue(t, dt, scale);
            t += dt;
            prop_assert!(m.dirty_pages() <= ws_pages);
            prop_assert!(m.log_within(&ws));
            if sync {
                let found = m.sync(Some(1000));
                prop_assert!(found.pages <= ws_pages);
                prop_assert!(found.cached_pages <= found.data_pages);
                prop_assert!(found.data_pages <= found.pages);
            }
        }
    }

    /// The same workload and seed give the same dirty sets, step for step.
    #[test]
    fn the_process_is_deterministic_per_seed(w in arb_workload(5_000), dt in 0.01f64..3.0) {
        let run = |w: &Workload| {
            let mut m = GuestMemory::new(w, 5_000);
            (0..5).map(|i| { m.accrue(i as f64 * dt, dt, 1.0); m.sync(None).pages }).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(&w), run(&w));
    }

    /// Whole simulations are deterministic per seed, and a completed migration sent at least
    /// every page that held data at the start (each goes whole at least once; XBZRLE only
    /// shortens re-sends).
    #[test]
    fn simulations_are_deterministic_and_send_all_data(seed in any::<u64>()) {
        for sc in generate_scenarios(2, seed) {
            for policy in ["tern", "qemu-default", "nova-2016"] {
                let a = simulate(&sc, policy).unwrap();
                let b = simulate(&sc, policy).unwrap();
                prop_assert_eq!(&a, &b);
                if a.result == SimResult::Completed && a.retries == 0 {
                    let w = sc.effective_workload();
                    let data = w.resident_pages() * sc.page_size;
                    prop_assert!(a.bytes_sent >= data,
                        "{} sent {} < {} bytes of data", policy, a.bytes_sent, data);
                }
            }
        }
    }

    /// A guest that writes nothing converges in one pass under any policy: `dirty-sync-count`
    /// 3 as in the lab's idle runs (the setup sync, the sync after pass 1 that finds nothing,
    /// the final sync of stop-and-copy), and nothing is sent twice.
    #[test]
    fn a_workload_that_writes_nothing_converges_in_one_pass(
        ram_mib in 64u64..4096, resident in 0.0f64..1.0,
    ) {
        let mut l = lab(0, 0.0, ram_mib);
        l.working_set_mib = 0;
        let phys = LabPhysics { resident_mib: ram_mib as f64 * resident, ..LabPhysics::default() };
        let sc = scenario_from_lab(&l, &phys).unwrap();
        for policy in tern_policy::POLICY_NAMES {
            let o = simulate(&sc, policy).unwrap();
            prop_assert_eq!(o.result, SimResult::Completed, "{}", policy);
            prop_assert!(!o.used_postcopy, "{}", policy);
            prop_assert!(o.passes <= 3, "{}: {} passes", policy, o.passes);
            let data = sc.effective_workload().resident_pages();
            let first_pass = data as f64 * (4096.0 + PAGE_HEADER_BYTES)
                + (sc.pages() - data) as f64 * ZERO_PAGE_BYTES;
            prop_assert!((o.bytes_sent as f64 - first_pass).abs() <= 1.0,
                "{}: {} vs {}", policy, o.bytes_sent, first_pass);
        }
    }

    /// Zero (never-touched) pages cost a marker each, not a page: growing the guest's empty
    /// memory adds 9 bytes per page to what is sent (plus, for a writing guest, what it dirties
    /// while the markers go out and the larger bitmap syncs).
    #[test]
    fn zero_pages_cost_no_bandwidth(extra_mib in 1u64..8192, rate in 0.0f64..2000.0) {
        for rate in [0.0, rate] {
        let small = scenario_from_lab(&lab(32, rate, 192), &LabPhysics::default()).unwrap();
        let slack = if rate == 0.0 { 1.0 } else { 0.05 * 192.0 * MIB as f64 };
        let big = scenario_from_lab(&lab(32, rate, 192 + extra_mib), &LabPhysics::default()).unwrap();
        let (a, b) = (simulate(&small, "qemu-default").unwrap(), simulate(&big, "qemu-default").unwrap());
        prop_assert_eq!(a.result, SimResult::Completed);
        prop_assert_eq!(b.result, SimResult::Completed);
        let extra_pages = extra_mib * MIB / 4096;
        let diff = b.bytes_sent as f64 - a.bytes_sent as f64;
        prop_assert!(diff <= extra_pages as f64 * ZERO_PAGE_BYTES + slack,
            "{} MiB more empty RAM cost {} bytes at {} writes/s", extra_mib, diff, rate);
        if rate == 0.0 {
            prop_assert!((diff - extra_pages as f64 * ZERO_PAGE_BYTES).abs() <= 1.0);
        }
        }
    }
}

/// A sequential writer dirties exactly what it swept since the last sync; a random one the
/// same number of writes lands on fewer distinct pages. Neither follows `W − (W − D)e^{−rt/W}`.
#[test]
fn sweep_and_random_writers_differ_as_in_the_lab() {
    let ws = PageRange {
        first: 0,
        pages: 10_000,
    };
    let seq = Workload::single(vec![ws], ws, WritePattern::Sequential, 5_000.0, 1);
    let rnd = Workload::single(vec![ws], ws, WritePattern::Random, 5_000.0, 1);
    let (mut a, mut b) = (
        GuestMemory::new(&seq, 10_000),
        GuestMemory::new(&rnd, 10_000),
    );
    a.sync(None);
    b.sync(None);
    a.accrue(0.0, 1.0, 1.0);
    b.accrue(0.0, 1.0, 1.0);
    assert_eq!(a.sync(None).pages, 5_000);
    let r = b.sync(None).pages;
    // 5000 random writes over 10 000 pages: ≈ 3935 distinct.
    assert!((3_700..4_150).contains(&r), "{r}");
    // Two seconds: the sweep covers everything, random writes still miss ≈ 37 %.
    a.accrue(1.0, 2.0, 1.0);
    b.accrue(1.0, 2.0, 1.0);
    assert_eq!(a.sync(None).pages, 10_000);
    assert!(b.sync(None).pages < 6_600);
}

/// A 16 GiB guest with a 4 GiB working set under a hot/cold random writer simulates quickly
/// (bitmaps of 4 M pages; writes laid in per sync, not per write).
#[test]
fn a_16_gib_guest_simulates() {
    let mut sc = scenario_from_lab(&lab(4096, 200_000.0, 16384), &LabPhysics::default()).unwrap();
    let w = sc.workload.as_mut().unwrap();
    let ws = w.phases[0].streams[0].range;
    w.phases[0].streams = vec![
        WriteStream {
            range: PageRange {
                first: ws.first,
                pages: ws.pages / 10,
            },
            pattern: WritePattern::Random,
            pages_per_s: 180_000.0,
        },
        WriteStream {
            range: PageRange {
                first: ws.first + ws.pages / 10,
                pages: ws.pages - ws.pages / 10,
            },
            pattern: WritePattern::Random,
            pages_per_s: 20_000.0,
        },
    ];
    sc.link_bytes_per_s = 1_250_000_000;
    let o = simulate(&sc, "tern").unwrap();
    assert!(o.completed(), "{o:?}");
    assert!(o.bytes_sent >= (55 * MIB + 4096 * MIB));
}

//! Scenarios: one VM, one link, one reason to move. Serializable so the lab can record a real run
//! as a scenario and replay it here for the sim-vs-real comparison.

use crate::memory::dirty_pages_in;
use crate::workload::{Burst, PageRange, Workload, WorkloadPhase, WritePattern, WriteStream};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tern_policy::{
    DirtyRateProbe, HostLimits, MigrationContext, PlanInput, PostCopyPermission, QemuFeatures,
    SlaCatalog, SlaClass, VmLimits,
};

const MIB: u64 = 1 << 20;

/// The guest's raw page-write rate from `from_ms` on (until the next phase).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyPhase {
    /// Start of the phase, ms since migration start.
    pub from_ms: u64,
    /// Page writes per second spread randomly over the writable working set (what `tern-load`'s
    /// `rate=` sets; several writes to one page count once in the dirty bitmap).
    pub pages_per_s: f64,
}

/// How a link outage behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutageKind {
    /// Packets are dropped (`tc` 100 % drop): TCP stalls and resumes; pre-copy waits; in post-copy
    /// the guest blocks on missing pages until the link returns.
    Blackhole,
    /// The link goes down (veth down): the migration socket errors. Pre-copy fails and the engine
    /// retries from scratch when the link is back; post-copy enters `postcopy-paused` and either
    /// recovers (if the plan armed recovery) or the VM is lost (what every public manager does).
    LinkDown,
}

/// A link outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// Start, ms since migration start.
    pub start_ms: u64,
    /// Duration, ms.
    pub duration_ms: u64,
    /// Behaviour.
    pub kind: OutageKind,
}

/// One migration to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Index within its generated set (or a lab run id).
    pub id: u64,
    /// Why the VM moves.
    pub context: MigrationContext,
    /// The VM's SLA class.
    pub sla: SlaClass,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// Fraction of RAM that is non-zero (zero pages cost almost nothing to send).
    pub nonzero_fraction: f64,
    /// Writable working set, bytes.
    pub wws_bytes: u64,
    /// Raw write rate over time (first phase should start at 0).
    pub dirty_phases: Vec<DirtyPhase>,
    /// Guest page size.
    pub page_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Link rate, bytes/s.
    pub link_bytes_per_s: u64,
    /// Link outages.
    pub outages: Vec<Outage>,
    /// Real device-state/switchover time added to every blackout, ms.
    pub switchover_overhead_ms: u64,
    /// The overhead the planner is told (`PlanInput::switchover_overhead_ms`).
    pub assumed_overhead_ms: u64,
    /// Source host limits.
    pub source: HostLimits,
    /// Destination host limits.
    pub destination: HostLimits,
    /// VM post-copy permission.
    pub vm_post_copy: PostCopyPermission,
    /// QEMU features both ends have.
    pub features: QemuFeatures,
    /// Deadline given to the planner, ms after start.
    pub deadline_ms: Option<u64>,
    /// Fraction of bytes XBZRLE saves on re-sent pages when enabled (0 for random writers).
    pub xbzrle_saving: f64,
    /// Relative error of the pre-flight probe (−0.15 = reads 15 % low).
    pub probe_error: f64,
    /// The guest's write process, page by page. When absent (scenarios recorded before it
    /// existed) it is derived from `nonzero_fraction`, `wws_bytes` and `dirty_phases`: uniform
    /// random writes over the working set ([`Scenario::effective_workload`]). When present,
    /// those three fields only describe it (for tables and debug output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
}

impl Scenario {
    /// The raw write rate (pages/s) at `t_ms`.
    pub fn pages_per_s_at(&self, t_ms: f64) -> f64 {
        self.dirty_phases
            .iter()
            .rev()
            .find(|p| p.from_ms as f64 <= t_ms)
            .or(self.dirty_phases.first())
            .map_or(0.0, |p| p.pages_per_s)
    }

    /// The hosts' migration bandwidth cap (the lower of the two), bytes/s.
    pub fn host_bandwidth_cap(&self) -> Option<u64> {
        match (
            self.source.bandwidth_cap_bytes_per_s,
            self.destination.bandwidth_cap_bytes_per_s,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.ram_bytes / self.page_size.max(1)
    }

    /// The write process the simulator runs: `workload`, or for a scenario without one,
    /// uniform random writes over the first `wws_bytes` of RAM at the `dirty_phases` rates with
    /// the first `nonzero_fraction` of RAM (at least the working set) holding data.
    pub fn effective_workload(&self) -> Workload {
        if let Some(w) = &self.workload {
            return w.clone();
        }
        let pages = self.pages();
        let ws = (self.wws_bytes / self.page_size.max(1)).min(pages);
        let resident = ((pages as f64 * self.nonzero_fraction.clamp(0.0, 1.0)) as u64).max(ws);
        Workload {
            resident: vec![PageRange {
                first: 0,
                pages: resident,
            }],
            phases: self
                .dirty_phases
                .iter()
                .map(|p| WorkloadPhase {
                    from_ms: p.from_ms,
                    streams: vec![WriteStream {
                        range: PageRange {
                            first: 0,
                            pages: ws,
                        },
                        pattern: WritePattern::Random,
                        pages_per_s: p.pages_per_s,
                    }],
                })
                .collect(),
            burst: None,
            seed: self.id,
        }
    }

    /// Distinct bytes the guest dirties in its first `secs` seconds, unthrottled (from the
    /// write process, sampled page by page).
    pub fn dirtied_bytes(&self, secs: f64) -> f64 {
        dirty_pages_in(&self.effective_workload(), self.pages(), secs) as f64
            * self.page_size as f64
    }

    /// What `calc-dirty-rate` with a 1 s period would report before the migration.
    pub fn probe(&self) -> Option<DirtyRateProbe> {
        self.features.calc_dirty_rate.then(|| DirtyRateProbe {
            period_ms: 1000,
            dirty_bytes_per_s: (self.dirtied_bytes(1.0) * (1.0 + self.probe_error)).max(0.0) as u64,
        })
    }

    /// The plan input an engine would build for this scenario.
    pub fn plan_input(&self) -> PlanInput {
        PlanInput {
            context: self.context,
            sla: self.sla.clone(),
            source: self.source.clone(),
            destination: self.destination.clone(),
            vm: VmLimits {
                post_copy: self.vm_post_copy,
                max_downtime_ms: None,
                ram_bytes: self.ram_bytes,
                vcpus: self.vcpus,
            },
            features: self.features,
            link_bytes_per_s: Some(self.link_bytes_per_s),
            probe: self.probe(),
            started_at_ms: 0,
            deadline_ms: self.deadline_ms,
            switchover_overhead_ms: self.assumed_overhead_ms,
        }
    }
}

fn log_uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    (rng.gen_range(lo.ln()..hi.ln())).exp()
}

/// `n` scenarios from `seed`, the same for every policy. Covers the lab's range (guests of
/// 128 MiB–4 GiB, working sets 16–512 MiB, write rates from idle to ~1 M pages/s, links of
/// 50 Mbit/s–1 Gbit/s), all four contexts and the built-in SLA classes, outages in a quarter of
/// the scenarios, and the permission/feature mixes of real fleets.
pub fn generate_scenarios(n: usize, seed: u64) -> Vec<Scenario> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let catalog = SlaCatalog::builtin();
    let classes: Vec<SlaClass> = catalog.classes().cloned().collect();
    (0..n as u64)
        .map(|id| generate_one(&mut rng, id, &classes))
        .collect()
}

fn generate_one(rng: &mut ChaCha8Rng, id: u64, classes: &[SlaClass]) -> Scenario {
    let context = MigrationContext::ALL[(id % 4) as usize];
    let sla = classes[rng.gen_range(0..classes.len())].clone();
    let ram_mib = [128u64, 256, 512, 1024, 1024, 2048, 4096][rng.gen_range(0..7)];
    let ram_bytes = ram_mib * MIB;
    let wws_mib = log_uniform(rng, 16.0, 512.0).min(ram_mib as f64 * 0.8);
    let wws_bytes = (wws_mib * MIB as f64) as u64;
    let base_rate = if rng.gen_bool(0.15) {
        rng.gen_range(0.0..100.0)
    } else {
        log_uniform(rng, 100.0, 1_000_000.0)
    };
    let mut dirty_phases = vec![DirtyPhase {
        from_ms: 0,
        pages_per_s: base_rate,
    }];
    if rng.gen_bool(0.3) {
        dirty_phases.push(DirtyPhase {
            from_ms: rng.gen_range(5_000..120_000),
            pages_per_s: base_rate * log_uniform(rng, 0.05, 3.0),
        });
    }
    let link_bytes_per_s = (log_uniform(rng, 50e6, 1e9) / 8.0) as u64;
    let mut outages = vec![];
    if rng.gen_bool(0.25) {
        let count = rng.gen_range(1..=2);
        let mut start = 0;
        for _ in 0..count {
            start += rng.gen_range(2_000..120_000);
            let duration_ms = rng.gen_range(1_000..20_000);
            outages.push(Outage {
                start_ms: start,
                duration_ms,
                kind: if rng.gen_bool(0.3) {
                    OutageKind::LinkDown
                } else {
                    OutageKind::Blackhole
                },
            });
            start += duration_ms;
        }
    }
    let host = |rng: &mut ChaCha8Rng| HostLimits {
        permit_post_copy: rng.gen_bool(0.85),
        permit_throttle: rng.gen_bool(0.95),
        bandwidth_cap_bytes_per_s: rng
            .gen_bool(0.1)
            .then(|| (link_bytes_per_s as f64 * rng.gen_range(0.5..0.9)) as u64),
    };
    let source = host(rng);
    let destination = host(rng);
    let vm_post_copy = if rng.gen_bool(0.85) {
        PostCopyPermission::Allowed
    } else {
        PostCopyPermission::Forbidden
    };
    let features = QemuFeatures {
        postcopy_ram: rng.gen_bool(0.95),
        postcopy_preempt: rng.gen_bool(0.7),
        postcopy_recovery: rng.gen_bool(0.7),
        auto_converge: rng.gen_bool(0.95),
        dirty_limit: rng.gen_bool(0.15),
        multifd: rng.gen_bool(0.8),
        multifd_with_postcopy: rng.gen_bool(0.3),
        xbzrle: rng.gen_bool(0.9),
        calc_dirty_rate: rng.gen_bool(0.8),
    };
    let first_pass_ms = ram_bytes * 1000 / link_bytes_per_s.max(1);
    let deadline_ms = match context {
        MigrationContext::Maintenance => Some(
            (first_pass_ms as f64 * rng.gen_range(2.0..6.0)) as u64
                + rng.gen_range(30_000..300_000),
        ),
        MigrationContext::Evacuate if rng.gen_bool(0.3) => {
            Some((first_pass_ms as f64 * rng.gen_range(2.0..4.0)) as u64 + 30_000)
        }
        _ => None,
    };
    let assumed_overhead_ms = 50;
    let nonzero_fraction = rng.gen_range(0.3..1.0);
    let workload = draw_workload(
        rng,
        id,
        ram_bytes / 4096,
        (wws_bytes / 4096).max(1),
        (ram_bytes as f64 / 4096.0 * nonzero_fraction) as u64,
        &dirty_phases,
    );
    let wws_bytes = workload.working_set_pages() * 4096;
    Scenario {
        id,
        context,
        sla,
        ram_bytes,
        nonzero_fraction,
        wws_bytes,
        dirty_phases,
        page_size: 4096,
        vcpus: rng.gen_range(1..=4),
        link_bytes_per_s,
        outages,
        switchover_overhead_ms: rng.gen_range(15..=assumed_overhead_ms),
        assumed_overhead_ms,
        source,
        destination,
        vm_post_copy,
        features,
        deadline_ms,
        xbzrle_saving: rng.gen_range(0.0..0.3),
        probe_error: rng.gen_range(-0.15..0.15),
        workload: Some(workload),
    }
}

/// A write process of one of the shapes real guests show, with the total rates of
/// `phases`: one sequential sweep (a scan, `tern-load seq`), uniform random writes
/// (`tern-load random`), a hot/cold split (a small hot set taking most writes over a larger
/// cold one), or bursts (on/off). A second phase may move the working set to fresh, never
/// touched pages (a new allocation: zero pages become data).
fn draw_workload(
    rng: &mut ChaCha8Rng,
    id: u64,
    ram_pages: u64,
    ws_pages: u64,
    nonzero_pages: u64,
    phases: &[DirtyPhase],
) -> Workload {
    let ws_pages = ws_pages.min(ram_pages).max(1);
    let resident_end = nonzero_pages.clamp(ws_pages, ram_pages);
    let ws_first = resident_end - ws_pages;
    let shape = rng.gen_range(0..4u8);
    let streams_at = |rng: &mut ChaCha8Rng, first: u64, rate: f64| -> Vec<WriteStream> {
        let range = PageRange {
            first,
            pages: ws_pages,
        };
        match shape {
            0 => vec![WriteStream {
                range,
                pattern: WritePattern::Sequential,
                pages_per_s: rate,
            }],
            2 if ws_pages >= 8 => {
                let hot = ((ws_pages as f64 * rng.gen_range(0.05..0.25)) as u64).max(1);
                let share = rng.gen_range(0.7..0.95);
                vec![
                    WriteStream {
                        range: PageRange { first, pages: hot },
                        pattern: WritePattern::Random,
                        pages_per_s: rate * share,
                    },
                    WriteStream {
                        range: PageRange {
                            first: first + hot,
                            pages: ws_pages - hot,
                        },
                        pattern: if rng.gen_bool(0.5) {
                            WritePattern::Random
                        } else {
                            WritePattern::Sequential
                        },
                        pages_per_s: rate * (1.0 - share),
                    },
                ]
            }
            _ => vec![WriteStream {
                range,
                pattern: if rng.gen_bool(0.5) {
                    WritePattern::Random
                } else {
                    WritePattern::Sequential
                },
                pages_per_s: rate,
            }],
        }
    };
    let mut out = Vec::with_capacity(phases.len());
    let mut first = ws_first;
    for (i, p) in phases.iter().enumerate() {
        if i > 0 && rng.gen_bool(0.5) && resident_end + ws_pages <= ram_pages {
            // The workload moves to memory it allocates now.
            first = resident_end;
        }
        out.push(WorkloadPhase {
            from_ms: p.from_ms,
            streams: streams_at(rng, first, p.pages_per_s),
        });
    }
    let burst = (shape == 3).then(|| Burst {
        on_ms: rng.gen_range(500..5_000),
        off_ms: rng.gen_range(500..5_000),
    });
    Workload {
        resident: vec![PageRange {
            first: 0,
            pages: resident_end,
        }],
        phases: out,
        burst,
        seed: id ^ rng.r#gen::<u64>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_covers_contexts() {
        let a = generate_scenarios(200, 7);
        let b = generate_scenarios(200, 7);
        assert_eq!(a, b);
        assert_ne!(a, generate_scenarios(200, 8));
        for c in MigrationContext::ALL {
            assert_eq!(a.iter().filter(|s| s.context == c).count(), 50);
        }
        assert!(a.iter().all(|s| s.wws_bytes <= s.ram_bytes));
        assert!(a.iter().any(|s| !s.outages.is_empty()));
        let json = serde_json::to_string(&a[0]).unwrap();
        let back: Scenario = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a[0]);
    }

    #[test]
    fn dirtying_saturates_at_the_working_set() {
        for s in generate_scenarios(20, 3) {
            let w = s.wws_bytes as f64;
            assert!(s.dirtied_bytes(1.0) <= w);
        }
        let mut s = generate_scenarios(1, 1).remove(0);
        s.workload = None;
        s.dirty_phases = vec![DirtyPhase {
            from_ms: 0,
            pages_per_s: 1e7,
        }];
        assert_eq!(s.dirtied_bytes(10.0), s.wws_bytes as f64);
        s.dirty_phases[0].pages_per_s = 0.0;
        assert_eq!(s.dirtied_bytes(10.0), 0.0);
    }

    #[test]
    fn generator_draws_every_workload_shape() {
        let a = generate_scenarios(400, 5);
        let ws: Vec<&Workload> = a.iter().filter_map(|s| s.workload.as_ref()).collect();
        assert_eq!(ws.len(), 400);
        assert!(ws.iter().any(|w| w.burst.is_some()));
        assert!(ws.iter().any(|w| w.phases[0].streams.len() == 2));
        assert!(
            ws.iter()
                .any(|w| w.phases[0].streams[0].pattern == WritePattern::Sequential)
        );
        assert!(
            ws.iter()
                .any(|w| w.phases[0].streams[0].pattern == WritePattern::Random)
        );
        assert!(ws.iter().any(|w| w.phases.len() == 2));
        for (s, w) in a.iter().zip(&ws) {
            for p in &w.phases {
                for st in &p.streams {
                    assert!(st.range.end() <= s.pages());
                }
            }
        }
    }
}

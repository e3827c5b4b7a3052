//! The request turned into indexed data, and destination choice: which hosts may take a VM
//! (with a typed reason for every refusal) and how VMs are assigned to them.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::{ConvergenceRule, DurationPrediction, PredictedEnding, predict_duration};
use crate::facts::{EvacuationRequest, POSTCOPY_RAM, QemuVersion, RequestError};

/// Why a host cannot take a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Refusal {
    /// The host is itself being emptied.
    BeingEmptied,
    /// The host is draining (maintenance): nothing may be placed on it.
    Draining,
    /// The host's agent does not answer.
    Unreachable,
    /// The host takes no incoming migration (`max_inbound` 0).
    TakesNoInbound,
    /// The destination runs an older QEMU than the source (migration goes to same or newer).
    OlderQemu {
        /// Destination version.
        destination: QemuVersion,
        /// Source version.
        source: QemuVersion,
    },
    /// The destination lacks features the VM requires.
    MissingFeatures {
        /// The missing names.
        missing: Vec<String>,
    },
    /// Not enough free memory even when empty of other placements.
    NotEnoughMemory {
        /// Free bytes on the host.
        free_bytes: u64,
        /// Bytes the VM needs.
        needed_bytes: u64,
    },
    /// Enough memory in general, but not after the VMs already placed there by this plan.
    FullAfterPlacements {
        /// Free bytes left after this plan's other placements.
        free_after_bytes: u64,
        /// Bytes the VM needs.
        needed_bytes: u64,
    },
    /// Balance context: the VM cannot converge within its SLA going there (no post-copy on
    /// this pair, throttle not enough), so the move would break the SLA.
    WouldBreakSla,
    /// The last attempt to this host failed and retries must go elsewhere.
    FailedBefore {
        /// Attempts so far.
        attempts: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BeingEmptied => write!(f, "is being emptied"),
            Refusal::Draining => write!(f, "is draining"),
            Refusal::Unreachable => write!(f, "is unreachable"),
            Refusal::TakesNoInbound => write!(f, "takes no incoming migration (max_inbound 0)"),
            Refusal::OlderQemu {
                destination,
                source,
            } => write!(
                f,
                "runs QEMU {destination}, older than the source's {source}"
            ),
            Refusal::MissingFeatures { missing } => {
                write!(f, "lacks required features: {}", missing.join(", "))
            }
            Refusal::NotEnoughMemory {
                free_bytes,
                needed_bytes,
            } => write!(
                f,
                "has {} MiB free, the VM needs {} MiB",
                free_bytes >> 20,
                needed_bytes >> 20
            ),
            Refusal::FullAfterPlacements {
                free_after_bytes,
                needed_bytes,
            } => write!(
                f,
                "has {} MiB left after this plan's other placements, the VM needs {} MiB",
                free_after_bytes >> 20,
                needed_bytes >> 20
            ),
            Refusal::WouldBreakSla => write!(
                f,
                "cannot take the VM within its SLA (no post-copy on this pair, throttle not enough)"
            ),
            Refusal::FailedBefore { attempts } => {
                write!(
                    f,
                    "failed {attempts} attempt(s) already; retrying elsewhere"
                )
            }
        }
    }
}

/// One VM in indexed form.
#[derive(Debug, Clone)]
pub(crate) struct VmEntry {
    pub src: usize,
    pub memory: u64,
    /// Rule on a pair without / with post-copy.
    pub rule: [ConvergenceRule; 2],
    /// Prediction alone on the source link without / with post-copy.
    pub alone: [DurationPrediction; 2],
    pub not_before_s: f64,
    /// Destination to avoid (failed before).
    pub avoid: Option<(usize, u32)>,
    pub dirty_assumed: bool,
}

impl VmEntry {
    /// Whether the VM may need post-copy to converge within its SLA (alone on its link).
    pub fn needs_post_copy(&self) -> bool {
        !matches!(self.alone[0].ending, PredictedEnding::Converges { .. })
    }
}

/// A migration already running, in indexed form.
#[derive(Debug, Clone)]
pub(crate) struct InFlightEntry {
    pub vm: usize,
    pub dst: usize,
    pub remaining: f64,
    pub elapsed_s: f64,
    pub in_post_copy: bool,
}

/// The request in indexed form.
#[derive(Debug, Clone)]
pub(crate) struct Problem<'a> {
    pub req: &'a EvacuationRequest,
    pub egress: Vec<f64>,
    pub ingress: Vec<f64>,
    pub is_source: Vec<bool>,
    pub vms: Vec<VmEntry>,
    pub in_flight: Vec<InFlightEntry>,
    pub stream_cap: f64,
    /// Per host: permits post-copy and has `postcopy-ram`.
    pub host_post_copy: Vec<bool>,
    /// Per VM: index of its required-feature set among the distinct sets.
    pub feature_class: Vec<usize>,
}

impl<'a> Problem<'a> {
    pub fn new(req: &'a EvacuationRequest) -> Result<Self, RequestError> {
        let mut host_idx: HashMap<&str, usize> = HashMap::new();
        for (i, h) in req.hosts.iter().enumerate() {
            if host_idx.insert(h.name.as_str(), i).is_some() {
                return Err(RequestError::Duplicate {
                    kind: "host",
                    name: h.name.clone(),
                });
            }
        }
        if let Some(d) = req.deadline_s
            && !(d.is_finite() && d > 0.0)
        {
            return Err(RequestError::BadDeadline(d.to_string()));
        }
        let mut is_source = vec![false; req.hosts.len()];
        for name in &req.hosts_to_empty {
            let i = *host_idx
                .get(name.as_str())
                .ok_or_else(|| RequestError::UnknownHost(name.clone()))?;
            let h = &req.hosts[i];
            if h.max_outbound == 0 || h.egress_bytes_per_s == 0 {
                return Err(RequestError::SourceCannotSend { host: name.clone() });
            }
            is_source[i] = true;
        }
        let stream_cap = req
            .settings
            .stream_cap_bytes_per_s
            .map_or(f64::INFINITY, |c| c.max(1) as f64);
        let mut seen_vm: HashMap<&str, usize> = HashMap::new();
        let mut vms = Vec::with_capacity(req.vms.len());
        for (i, v) in req.vms.iter().enumerate() {
            if seen_vm.insert(v.name.as_str(), i).is_some() {
                return Err(RequestError::Duplicate {
                    kind: "VM",
                    name: v.name.clone(),
                });
            }
            let src = match host_idx.get(v.host.as_str()) {
                Some(&s) if is_source[s] => s,
                _ => {
                    return Err(RequestError::VmNotOnEmptiedHost {
                        vm: v.name.clone(),
                        host: v.host.clone(),
                        to_empty: req.hosts_to_empty.join(", "),
                    });
                }
            };
            let rule = [
                ConvergenceRule::new(v, req.context, false),
                ConvergenceRule::new(v, req.context, true),
            ];
            let bw = (req.hosts[src].egress_bytes_per_s as f64).min(stream_cap);
            let alone = [
                predict_duration(&rule[0], bw),
                predict_duration(&rule[1], bw),
            ];
            let retry = req.retries.iter().find(|r| r.vm == v.name);
            let avoid = retry.and_then(|r| {
                let d = *host_idx.get(r.last_destination.as_str())?;
                (r.attempts >= req.settings.retries_per_destination).then_some((d, r.attempts))
            });
            vms.push(VmEntry {
                src,
                memory: v.memory_bytes,
                rule,
                alone,
                not_before_s: retry.map_or(0.0, |r| r.not_before_s.max(0.0)),
                avoid,
                dirty_assumed: v.dirty_bytes_per_s.is_none(),
            });
        }
        let mut in_flight = Vec::new();
        for f in &req.in_flight {
            let (Some(&vm), Some(&dst)) = (
                seen_vm.get(f.vm.as_str()),
                host_idx.get(f.destination.as_str()),
            ) else {
                return Err(RequestError::UnknownInFlight {
                    vm: f.vm.clone(),
                    destination: f.destination.clone(),
                });
            };
            in_flight.push(InFlightEntry {
                vm,
                dst,
                remaining: f.remaining_bytes as f64,
                elapsed_s: f.elapsed_s,
                in_post_copy: f.in_post_copy,
            });
        }
        let mut classes: HashMap<&std::collections::BTreeSet<String>, usize> = HashMap::new();
        let feature_class = req
            .vms
            .iter()
            .map(|v| {
                let n = classes.len();
                *classes.entry(&v.required_features).or_insert(n)
            })
            .collect();
        Ok(Problem {
            req,
            host_post_copy: req
                .hosts
                .iter()
                .map(|h| h.permit_post_copy && h.features.contains(POSTCOPY_RAM))
                .collect(),
            feature_class,
            egress: req
                .hosts
                .iter()
                .map(|h| h.egress_bytes_per_s as f64)
                .collect(),
            ingress: req
                .hosts
                .iter()
                .map(|h| h.ingress_bytes_per_s as f64)
                .collect(),
            is_source,
            vms,
            in_flight,
            stream_cap,
        })
    }

    /// Both hosts permit post-copy and both QEMUs have `postcopy-ram`.
    pub fn pair_post_copy(&self, src: usize, dst: usize) -> bool {
        self.host_post_copy[src] && self.host_post_copy[dst]
    }

    /// Static refusal of `dst` for VM `v` (ignoring this plan's other placements).
    pub fn refusal(&self, v: usize, dst: usize) -> Option<Refusal> {
        self.refusal_except_memory(v, dst).or_else(|| {
            let (free, needed) = (self.req.hosts[dst].free_memory_bytes, self.vms[v].memory);
            (free < needed).then_some(Refusal::NotEnoughMemory {
                free_bytes: free,
                needed_bytes: needed,
            })
        })
    }

    /// [`Problem::refusal`] without the memory check: the same for every VM of a
    /// [`Problem::compat_key`], so candidate lists are computed once per key.
    fn refusal_except_memory(&self, v: usize, dst: usize) -> Option<Refusal> {
        let vm = &self.vms[v];
        let facts = &self.req.vms[v];
        let h = &self.req.hosts[dst];
        let src = &self.req.hosts[vm.src];
        if self.is_source[dst] {
            return Some(Refusal::BeingEmptied);
        }
        if !h.reachable {
            return Some(Refusal::Unreachable);
        }
        if h.draining {
            return Some(Refusal::Draining);
        }
        if h.max_inbound == 0 || h.ingress_bytes_per_s == 0 {
            return Some(Refusal::TakesNoInbound);
        }
        if h.qemu_version < src.qemu_version {
            return Some(Refusal::OlderQemu {
                destination: h.qemu_version,
                source: src.qemu_version,
            });
        }
        let missing: Vec<String> = facts
            .required_features
            .iter()
            .filter(|f| !h.features.contains(*f))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Some(Refusal::MissingFeatures { missing });
        }
        if let Some((d, attempts)) = vm.avoid
            && d == dst
        {
            return Some(Refusal::FailedBefore { attempts });
        }
        if !self.req.context.must_finish() {
            let pc = self.pair_post_copy(vm.src, dst);
            if self.vms[v].alone[usize::from(pc)].ending == PredictedEnding::GivesUp {
                return Some(Refusal::WouldBreakSla);
            }
        }
        None
    }

    /// What [`Problem::refusal_except_memory`] depends on besides the host.
    fn compat_key(&self, v: usize) -> CompatKey {
        let vm = &self.vms[v];
        let optional = !self.req.context.must_finish();
        CompatKey {
            src: vm.src,
            features: self.feature_class[v],
            avoid: vm.avoid,
            gives_up: [
                optional && vm.alone[0].ending == PredictedEnding::GivesUp,
                optional && vm.alone[1].ending == PredictedEnding::GivesUp,
            ],
        }
    }

    /// Hosts that pass every check but memory for VM `v`, cached per [`CompatKey`].
    pub(crate) fn candidates<'c>(
        &self,
        v: usize,
        open: &[usize],
        cache: &'c mut HashMap<CompatKey, Vec<usize>>,
    ) -> &'c [usize] {
        cache.entry(self.compat_key(v)).or_insert_with(|| {
            open.iter()
                .copied()
                .filter(|&d| self.refusal_except_memory(v, d).is_none())
                .collect()
        })
    }

    /// Rule for VM `v` going to `dst`.
    pub fn rule(&self, v: usize, dst: usize) -> &ConvergenceRule {
        &self.vms[v].rule[usize::from(self.pair_post_copy(self.vms[v].src, dst))]
    }

    /// The most a destination can receive: its ingress, or its inbound slots × the stream cap.
    pub fn dest_rate(&self, dst: usize) -> f64 {
        let h = &self.req.hosts[dst];
        self.ingress[dst]
            .min(f64::from(h.max_inbound) * self.stream_cap)
            .max(1.0)
    }

    /// The fastest a single migration from `src` to `dst` can go.
    pub fn best_bw(&self, src: usize, dst: usize) -> f64 {
        self.egress[src].min(self.ingress[dst]).min(self.stream_cap)
    }
}

/// Everything but the host that decides whether a host may take a VM (memory aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CompatKey {
    src: usize,
    features: usize,
    avoid: Option<(usize, u32)>,
    gives_up: [bool; 2],
}

/// How destinations are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementRule {
    /// tern: largest VMs first; post-copy-capable destinations for VMs that may need post-copy;
    /// then the destination that finishes its assigned bytes earliest at the rate it can take
    /// (ingress, or inbound slots × stream cap: balances the per-destination bound, Glikson et
    /// al.'s machine load), then most memory left.
    BalancedIngress,
    /// Nova's RAM weigher / Kubernetes least-allocated: in listing order, the destination with
    /// the most free memory.
    MostFreeMemory,
}

/// Assignment result: a destination per VM, and for each unassigned VM the refusal of every host.
pub(crate) struct Assignment {
    pub dest: Vec<Option<usize>>,
    /// Reserved bytes per host after the assignment (in-flight arrivals included).
    pub reserved: Vec<u64>,
}

/// Assigns destinations. VMs already in flight keep theirs; `skip[v]` VMs are not assigned.
pub(crate) fn assign(p: &Problem, rule: PlacementRule, skip: &[bool]) -> Assignment {
    let nh = p.req.hosts.len();
    let mut dest: Vec<Option<usize>> = vec![None; p.vms.len()];
    let mut reserved = vec![0u64; nh];
    let mut load = vec![0.0f64; nh];
    for f in &p.in_flight {
        dest[f.vm] = Some(f.dst);
        reserved[f.dst] += p.vms[f.vm].memory;
        load[f.dst] += f.remaining / p.dest_rate(f.dst);
    }
    let mut order: Vec<usize> = (0..p.vms.len())
        .filter(|&v| dest[v].is_none() && !skip[v])
        .collect();
    if rule == PlacementRule::BalancedIngress {
        order.sort_by(|&a, &b| p.vms[b].memory.cmp(&p.vms[a].memory).then(a.cmp(&b)));
    }
    // Static candidates per source are the same for most VMs; compute the fleet's possible
    // destinations once (cheap filters) and check the VM-specific ones per VM.
    let open: Vec<usize> = (0..nh)
        .filter(|&d| {
            let h = &p.req.hosts[d];
            !p.is_source[d] && h.reachable && !h.draining && h.max_inbound > 0
        })
        .collect();
    let mut cache = HashMap::new();
    for v in order {
        let vm = &p.vms[v];
        let wants_pc = rule == PlacementRule::BalancedIngress && vm.needs_post_copy();
        let mut best: Option<(usize, (bool, f64, u64))> = None;
        for &d in p.candidates(v, &open, &mut cache) {
            let h = &p.req.hosts[d];
            if reserved[d] + vm.memory > h.free_memory_bytes {
                continue;
            }
            let key = match rule {
                PlacementRule::BalancedIngress => {
                    let pc = p.pair_post_copy(vm.src, d);
                    let bytes = vm.alone[usize::from(pc)].bytes;
                    (
                        wants_pc && !pc,
                        load[d] + bytes / p.dest_rate(d),
                        u64::MAX - (h.free_memory_bytes - reserved[d]),
                    )
                }
                PlacementRule::MostFreeMemory => {
                    (false, 0.0, u64::MAX - (h.free_memory_bytes - reserved[d]))
                }
            };
            let better = match &best {
                None => true,
                Some((_, k)) => (key.0, key.1, key.2)
                    .partial_cmp(&(k.0, k.1, k.2))
                    .is_some_and(|o| o.is_lt()),
            };
            if better {
                best = Some((d, key));
            }
        }
        if let Some((d, _)) = best {
            let pc = p.pair_post_copy(vm.src, d);
            dest[v] = Some(d);
            reserved[d] += vm.memory;
            load[d] += vm.alone[usize::from(pc)].bytes / p.dest_rate(d);
        }
    }
    Assignment { dest, reserved }
}

/// Every host's refusal of VM `v` given the other placements (`reserved`), for the report of a VM
/// with no destination. Hosts that would have been fine are reported as full after placements.
pub(crate) fn refusals_for(p: &Problem, v: usize, reserved: &[u64]) -> Vec<(usize, Refusal)> {
    (0..p.req.hosts.len())
        .filter(|&d| d != p.vms[v].src)
        .map(|d| {
            let r = p
                .refusal(v, d)
                .unwrap_or_else(|| Refusal::FullAfterPlacements {
                    free_after_bytes: p.req.hosts[d].free_memory_bytes.saturating_sub(reserved[d]),
                    needed_bytes: p.vms[v].memory,
                });
            (d, r)
        })
        .collect()
}

//! How concurrent migrations share links: max-min fair allocation (progressive filling).
//!
//! Each migration is a TCP flow from its source's egress to its destination's ingress, capped by
//! what one migration stream can push. Concurrent flows on a link share it; TCP converges to
//! roughly max-min fairness, which progressive filling computes: raise every unfrozen flow's
//! rate together until a link saturates or a flow hits its cap, freeze those, repeat.

/// One flow: source host index, destination host index, per-stream cap (bytes/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flow {
    /// Source host index.
    pub src: usize,
    /// Destination host index.
    pub dst: usize,
    /// Per-stream cap, bytes/s (`f64::INFINITY` when none).
    pub cap: f64,
}

/// Max-min fair rates for `flows`, given per-host egress and ingress (bytes/s, indexed by host).
/// Deterministic: depends only on the inputs, in their order.
pub fn max_min_rates(flows: &[Flow], egress: &[f64], ingress: &[f64]) -> Vec<f64> {
    let n = flows.len();
    let mut rates = vec![0.0; n];
    if n == 0 {
        return rates;
    }
    // Local resources: one per distinct source egress and destination ingress, in first-seen
    // order (no hash iteration, so the float sums are reproducible).
    let mut res_cap: Vec<f64> = Vec::new();
    let mut res_of_flow: Vec<(usize, usize)> = Vec::with_capacity(n);
    let mut seen: Vec<(bool, usize, usize)> = Vec::new(); // (is_egress, host, resource)
    let mut lookup = |is_egress: bool, host: usize, cap: f64, res_cap: &mut Vec<f64>| -> usize {
        if let Some(&(_, _, r)) = seen.iter().find(|(e, h, _)| *e == is_egress && *h == host) {
            return r;
        }
        res_cap.push(cap.max(0.0));
        seen.push((is_egress, host, res_cap.len() - 1));
        res_cap.len() - 1
    };
    for f in flows {
        let a = lookup(true, f.src, egress[f.src], &mut res_cap);
        let b = lookup(false, f.dst, ingress[f.dst], &mut res_cap);
        res_of_flow.push((a, b));
    }
    let mut frozen = vec![false; n];
    let mut users = vec![0usize; res_cap.len()];
    for &(a, b) in &res_of_flow {
        users[a] += 1;
        users[b] += 1;
    }
    let mut level = 0.0;
    let mut active = n;
    while active > 0 {
        let mut delta = f64::INFINITY;
        for (r, &cap) in res_cap.iter().enumerate() {
            if users[r] > 0 {
                delta = delta.min(cap / users[r] as f64);
            }
        }
        for (i, f) in flows.iter().enumerate() {
            if !frozen[i] {
                delta = delta.min(f.cap - level);
            }
        }
        let delta = delta.max(0.0);
        level += delta;
        for (i, &(a, b)) in res_of_flow.iter().enumerate() {
            if !frozen[i] {
                rates[i] = level;
                res_cap[a] -= delta;
                res_cap[b] -= delta;
            }
        }
        // Freeze flows on saturated resources or at their cap.
        let eps = 1e-9 * level.max(1.0);
        let mut froze_any = false;
        for (i, f) in flows.iter().enumerate() {
            if frozen[i] {
                continue;
            }
            let (a, b) = res_of_flow[i];
            if res_cap[a] <= eps || res_cap[b] <= eps || f.cap - level <= eps {
                frozen[i] = true;
                froze_any = true;
                active -= 1;
                users[a] -= 1;
                users[b] -= 1;
            }
        }
        if !froze_any {
            break; // numerically stuck; rates are already at the common level
        }
    }
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_flows_split_a_source_and_a_capped_flow_leaves_room() {
        let eg = [10.0, 0.0, 0.0];
        let ing = [0.0, 100.0, 3.0];
        let r = max_min_rates(
            &[
                Flow {
                    src: 0,
                    dst: 1,
                    cap: f64::INFINITY,
                },
                Flow {
                    src: 0,
                    dst: 2,
                    cap: f64::INFINITY,
                },
            ],
            &eg,
            &ing,
        );
        assert!(
            (r[1] - 3.0).abs() < 1e-9 && (r[0] - 7.0).abs() < 1e-9,
            "{r:?}"
        );
        let r = max_min_rates(
            &[Flow {
                src: 0,
                dst: 1,
                cap: 4.0,
            }],
            &eg,
            &ing,
        );
        assert_eq!(r, vec![4.0]);
    }
}

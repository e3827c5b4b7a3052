//! The web view's two drawings, as inline SVG (no script library, no CDN): an evacuation's
//! plan as a timeline (predicted bars, the real bars over them, the deadline, the predicted
//! makespan) and a migration's remaining bytes over time. Pure: the time `now_ms` is given.
//!
//! Running bars and the "now" line carry `data-start-ms` / `data-running` so `app.js` can grow
//! them between events from the page's own clock (no request), with the scale on the `<svg>`
//! (`data-t0-ms`, `data-x0`, `data-px-per-s`).

use std::fmt::Write;

use super::format::{clock, duration, esc};
use crate::evacuation::EvacuationView;
use crate::model::{MigrationRecord, MigrationState};

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 150.0;
const ROW_H: f64 = 26.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 24.0;
const RIGHT: f64 = 40.0;
/// A deadline more than this many times the work's length is drawn off scale.
const DEADLINE_ON_SCALE: f64 = 4.0;

/// Where a plan's times count from: when the current plan was made (the runner's `plan_t0`).
fn plan_t0(v: &EvacuationView) -> u64 {
    match v.evacuation.plan.made_ms {
        0 => v.evacuation.created_ms,
        t => t,
    }
}

/// A round tick step (s) giving about 8 ticks over `span_s`.
pub fn tick_step(span_s: f64) -> f64 {
    let raw = (span_s / 8.0).max(1.0);
    [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
    ]
    .into_iter()
    .find(|s| *s >= raw)
    .unwrap_or(7200.0)
}

/// The latest attempt of each VM of the evacuation (retries are later records of the same VM).
fn latest_by_vm<'a>(v: &'a EvacuationView, vm: &str) -> Option<&'a MigrationRecord> {
    v.migrations
        .iter()
        .filter(|m| m.vm == vm)
        .max_by_key(|m| m.created_ms)
}

/// The plan of `v` as a timeline at `now_ms`.
pub fn evacuation_timeline(v: &EvacuationView, now_ms: u64) -> String {
    let e = &v.evacuation;
    let origin = e.created_ms;
    let t0 = plan_t0(v);
    let rel = |ms: u64| ms.saturating_sub(origin) as f64 / 1000.0;
    let plan_off = rel(t0);
    let rows = &e.plan.migrations;
    let deadline_s = rel(e.deadline_ms);
    let makespan_s = plan_off + e.plan.predicted_makespan_s;
    let mut work = makespan_s.max(1.0);
    for p in rows {
        work = work.max(plan_off + p.end_s.max(p.start_s + p.duration_s));
    }
    let end_ms = e.ended_ms.unwrap_or(now_ms);
    work = work.max(rel(end_ms));
    // A deadline far beyond the work would squash every bar: it is then drawn off scale, as
    // an arrow at the right edge saying how far it is.
    let deadline_on_scale = deadline_s <= work * DEADLINE_ON_SCALE;
    // While it runs, room for the bars to grow (app.js) until the next event redraws it.
    let headroom = if e.state.is_terminal() { 1.04 } else { 1.25 };
    let span = if deadline_on_scale {
        work.max(deadline_s)
    } else {
        work
    } * headroom;
    let px_per_s = (WIDTH - LABEL_W - RIGHT) / span;
    let x = |s: f64| LABEL_W + s.max(0.0) * px_per_s;
    let height = TOP + ROW_H * rows.len().max(1) as f64 + BOTTOM;
    let running = !e.state.is_terminal();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="evacuation plan of {host}" data-t0-ms="{origin}" data-x0="{LABEL_W}" data-px-per-s="{px_per_s:.6}">"#,
        host = esc(&e.host)
    );
    let step = tick_step(span);
    let mut t = 0.0;
    while t <= span {
        let _ = write!(
            out,
            r#"<line class="tick" x1="{x:.1}" x2="{x:.1}" y1="{y1}" y2="{y2:.1}"/><text class="axis" x="{x:.1}" y="{ty:.1}">{label}</text>"#,
            x = x(t),
            y1 = TOP - 4.0,
            y2 = height - BOTTOM,
            ty = height - 8.0,
            label = duration(t)
        );
        t += step;
    }
    for (i, p) in rows.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let vm = esc(&p.vm);
        let start = plan_off + p.start_s;
        let end = plan_off + p.end_s.max(p.start_s + p.duration_s);
        let _ = write!(
            out,
            r#"<text class="label" x="4" y="{ty:.1}">{vm} → {dest}</text><rect class="pred" data-vm="{vm}" x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}"><title>{vm}: predicted {a} to {b} on {dest}{pc}</title></rect>"#,
            ty = y + ROW_H * 0.65,
            dest = esc(&p.destination),
            x = x(start),
            y = y + 3.0,
            w = ((end - start) * px_per_s).max(2.0),
            h = ROW_H - 6.0,
            a = duration(start),
            b = duration(end),
            pc = if p.needs_post_copy { ", post-copy" } else { "" },
        );
        if let Some(m) = latest_by_vm(v, &p.vm).filter(|m| m.started_ms.is_some()) {
            out.push_str(&real_bar(m, y, rel, x, px_per_s, now_ms));
        }
    }
    let (top, bot) = (TOP - 6.0, height - BOTTOM);
    if deadline_on_scale {
        let _ = write!(
            out,
            r#"<line class="deadline" x1="{d:.1}" x2="{d:.1}" y1="{top}" y2="{bot:.1}"/><text class="deadline-label" text-anchor="end" x="{lx:.1}" y="14">deadline {dc}</text>"#,
            d = x(deadline_s),
            lx = x(deadline_s) - 3.0,
            dc = clock(e.deadline_ms),
        );
    } else {
        let _ = write!(
            out,
            r#"<text class="deadline-label deadline-off-scale" text-anchor="end" x="{lx:.1}" y="14">deadline {dc}, at {at} →</text>"#,
            lx = WIDTH - 2.0,
            dc = clock(e.deadline_ms),
            at = duration(deadline_s),
        );
    }
    let _ = write!(
        out,
        r#"<line class="makespan" x1="{m:.1}" x2="{m:.1}" y1="{top}" y2="{bot:.1}"/><text class="makespan-label" text-anchor="{anchor}" x="{lx:.1}" y="{my}">predicted end at {ms}</text>"#,
        m = x(makespan_s),
        anchor = if x(makespan_s) > WIDTH * 0.7 {
            "end"
        } else {
            "start"
        },
        lx = if x(makespan_s) > WIDTH * 0.7 {
            x(makespan_s) - 3.0
        } else {
            x(makespan_s) + 3.0
        },
        my = TOP - 12.0,
        ms = duration(makespan_s),
    );
    let now_x = x(rel(end_ms));
    let _ = write!(
        out,
        r#"<line class="now" x1="{now_x:.1}" x2="{now_x:.1}" y1="{top}" y2="{bot:.1}"{data}/></svg>"#,
        top = TOP - 6.0,
        bot = height - BOTTOM,
        data = if running { r#" data-running="1""# } else { "" },
    );
    out
}

/// One real bar: from the first start of the VM's migration to its end (or now, growing).
fn real_bar(
    m: &MigrationRecord,
    row_y: f64,
    rel: impl Fn(u64) -> f64,
    x: impl Fn(f64) -> f64,
    px_per_s: f64,
    now_ms: u64,
) -> String {
    let started = m.started_ms.unwrap_or(now_ms);
    let ended = m.ended_ms.filter(|_| m.state.is_terminal());
    let end_ms = ended.unwrap_or(now_ms.max(started));
    let w = ((end_ms - started) as f64 / 1000.0 * px_per_s).max(2.0);
    let running = if ended.is_none() {
        format!(r#" data-running="1" data-start-ms="{started}""#)
    } else {
        String::new()
    };
    format!(
        r#"<rect class="real state-{st}" data-vm="{vm}" data-state="{st}"{running} x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}"><title>{vm}: {st}, attempt {att}, {d}</title></rect>"#,
        st = m.state.as_str(),
        vm = esc(&m.vm),
        x = x(rel(started)),
        y = row_y + 8.0,
        h = ROW_H - 16.0,
        att = m.attempts,
        d = duration((end_ms - started) as f64 / 1000.0),
    )
}

/// One sample of a migration's progress, for the remaining-bytes chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemainingSample {
    /// Wall-clock time (ms since the epoch).
    pub wall_ms: u64,
    /// Bytes still to send.
    pub remaining_bytes: u64,
}

/// Remaining bytes over time as a small line chart (`None` without two samples).
pub fn remaining_chart(samples: &[RemainingSample], state: MigrationState) -> Option<String> {
    let (first, last) = (samples.first()?, samples.last()?);
    if samples.len() < 2 {
        return None;
    }
    let (w, h, pad) = (320.0, 90.0, 4.0);
    let span_ms = (last.wall_ms.saturating_sub(first.wall_ms)).max(1) as f64;
    let max = samples
        .iter()
        .map(|s| s.remaining_bytes)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let points: Vec<String> = samples
        .iter()
        .map(|s| {
            let px = pad + (s.wall_ms - first.wall_ms) as f64 / span_ms * (w - 2.0 * pad);
            let py = pad + (1.0 - s.remaining_bytes as f64 / max) * (h - 2.0 * pad);
            format!("{px:.1},{py:.1}")
        })
        .collect();
    Some(format!(
        r#"<svg class="chart state-{st}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="remaining bytes over time"><polyline class="remaining" points="{pts}"/><text class="axis" x="{pad}" y="12">{max}</text><text class="axis" x="{pad}" y="{by}">{span}</text></svg>"#,
        st = state.as_str(),
        pts = points.join(" "),
        max = super::format::bytes(max as u64),
        by = h - pad,
        span = duration(span_ms / 1000.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round_and_about_eight_per_span() {
        assert_eq!(tick_step(4.0), 1.0);
        assert_eq!(tick_step(60.0), 10.0);
        assert_eq!(tick_step(1800.0), 300.0);
        assert_eq!(tick_step(1e9), 7200.0);
    }

    #[test]
    fn the_chart_needs_two_samples_and_scales_to_the_highest() {
        let s = |t, r| RemainingSample {
            wall_ms: t,
            remaining_bytes: r,
        };
        assert!(remaining_chart(&[s(0, 10)], MigrationState::Running).is_none());
        let svg = remaining_chart(
            &[s(1000, 100), s(2000, 50), s(3000, 0)],
            MigrationState::Running,
        )
        .unwrap();
        assert!(
            svg.contains(r#"points="4.0,4.0 160.0,45.0 316.0,86.0""#),
            "{svg}"
        );
    }
}

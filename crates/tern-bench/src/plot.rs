//! SVG plots of a result (the `plotters` crate, SVG backend only: no system fonts needed).
//!
//! Per scenario: remaining bytes over time per policy, blackout per policy, total time per
//! policy against the physical bound RAM ÷ link rate.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::metrics::OutcomeClass;
use crate::results::{BenchResult, RunRecord, ScenarioResult, Spread};

/// A plot could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: PathBuf,
    /// The backend's message.
    pub message: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(0xd6, 0x27, 0x28), // tern: red, drawn last and thicker
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The run of an arm whose total time is the median (the representative series).
fn representative<'a>(s: &'a ScenarioResult, label: &str) -> Option<&'a RunRecord> {
    let mut runs: Vec<&RunRecord> = s
        .runs
        .iter()
        .filter(|r| {
            r.arm == label && r.metrics.outcome != OutcomeClass::Error && !r.series.is_empty()
        })
        .collect();
    runs.sort_by(|a, b| a.metrics.total_time_s.total_cmp(&b.metrics.total_time_s));
    runs.get(runs.len().saturating_sub(1) / 2).copied()
}

/// One line of the remaining-bytes plot: palette index, legend, (seconds, MiB) points.
struct Line {
    index: usize,
    name: String,
    points: Vec<(f64, f64)>,
}

/// Remaining MiB over time, one line per arm (its median-time run).
pub fn remaining_plot(s: &ScenarioResult, path: &Path) -> Result<(), PlotError> {
    let lines: Vec<Line> = s
        .scenario
        .arms
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let r = representative(s, &a.label)?;
            let pts = r
                .series
                .iter()
                .map(|p| (p.t_ms as f64 / 1000.0, p.remaining as f64 / 1048576.0))
                .collect();
            Some(Line {
                index: i,
                name: format!("{} ({})", a.label, r.metrics.outcome.label()),
                points: pts,
            })
        })
        .collect();
    let xmax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: remaining bytes over time (median run per policy)",
                s.scenario.name
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax * 1.02, 0f64..ymax)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since migrate")
        .y_desc("MiB remaining")
        .draw()
        .map_err(|e| err(path, e))?;
    // Draw tern last so it is on top.
    let mut order: Vec<&Line> = lines.iter().collect();
    order.sort_by_key(|l| if l.index == 0 { usize::MAX } else { l.index });
    for Line {
        index: i,
        name,
        points: pts,
    } in order
    {
        let c = color(*i);
        let width = if *i == 0 { 3 } else { 1 };
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(width)))
            .map_err(|e| err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// Horizontal bars (median) with min–max whiskers, one per arm, and an optional reference
/// line (the physical bound).
fn bar_plot(
    path: &Path,
    title: &str,
    unit: &str,
    rows: &[(String, Option<Spread>)],
    reference: Option<(f64, &str)>,
) -> Result<(), PlotError> {
    let n = rows.len().max(1);
    let xmax = rows
        .iter()
        .filter_map(|r| r.1.map(|s| s.max))
        .chain(reference.map(|r| r.0))
        .fold(1e-9, f64::max)
        * 1.1;
    let height = 120 + 40 * n as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..xmax, (0..n).into_segmented())
        .map_err(|e| err(path, e))?;
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc(unit)
        .draw()
        .map_err(|e| err(path, e))?;
    for (i, (_, spread)) in rows.iter().enumerate() {
        let Some(sp) = spread else { continue };
        let c = color(i);
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (sp.median, SegmentValue::Exact(i + 1)),
            ],
            c.mix(0.75).filled(),
        );
        bar.set_margin(8, 8, 0, 0);
        chart
            .draw_series(std::iter::once(bar))
            .map_err(|e| err(path, e))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (sp.min, SegmentValue::CenterOf(i)),
                    (sp.max, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| err(path, e))?;
    }
    if let Some((x, label)) = reference {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| err(path, e))?
            .label(label.to_string())
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(path, e))?;
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// Blackout per arm.
pub fn blackout_plot(s: &ScenarioResult, path: &Path) -> Result<(), PlotError> {
    let rows: Vec<(String, Option<Spread>)> = s
        .arms
        .iter()
        .map(|a| (a.arm.label.clone(), a.blackout_ms))
        .collect();
    bar_plot(
        path,
        &format!(
            "{}: blackout (largest host-timestamped heartbeat gap), median and min–max",
            s.scenario.name
        ),
        "ms",
        &rows,
        None,
    )
}

/// Total time per arm against the bound.
pub fn time_plot(s: &ScenarioResult, path: &Path) -> Result<(), PlotError> {
    let rows: Vec<(String, Option<Spread>)> = s
        .arms
        .iter()
        .map(|a| {
            (
                format!("{} ({})", a.arm.label, a.outcome_text()),
                a.total_time_s,
            )
        })
        .collect();
    bar_plot(
        path,
        &format!(
            "{}: total time vs the physical bound RAM ÷ link",
            s.scenario.name
        ),
        "seconds",
        &rows,
        Some((s.bound_s, "bound: RAM ÷ link rate")),
    )
}

/// Draws every plot of a result into `dir`; returns the files written (relative names).
pub fn draw_all(r: &BenchResult, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let mut out = Vec::new();
    for s in &r.scenarios {
        if s.runs.is_empty() {
            continue;
        }
        for (suffix, f) in [
            (
                "remaining",
                remaining_plot as fn(&ScenarioResult, &Path) -> Result<(), PlotError>,
            ),
            ("blackout", blackout_plot),
            ("time", time_plot),
        ] {
            let p = dir.join(format!("{}-{suffix}.svg", s.scenario.name));
            f(s, &p)?;
            out.push(p);
        }
    }
    Ok(out)
}

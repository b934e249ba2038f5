//! The bench's charts (plotters, SVG): a bar chart of the table's total times, and per
//! guest the rounds of every row over time, throughput above and pages left below.

use super::RunResult;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// Fonts plotters can lay text out with (ab_glyph needs one registered); the first found.
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let Some(bytes) = FONTS.iter().find_map(|path| std::fs::read(path).ok()) else { return false };
        // plotters keeps the font for the process's life.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    });
    anyhow::ensure!(ok, "no font found for the charts (looked for {})", FONTS.join(", "));
    Ok(())
}

/// Writes the charts; returns how many files.
pub fn write(dir: &Path, link: &str, results: &[RunResult]) -> Result<usize> {
    register_font()?;
    bars(&dir.join("total-time.svg"), link, results)?;
    let mut files = 1;
    let mut guests: Vec<&str> = results.iter().map(|r| r.guest.as_str()).collect();
    guests.dedup();
    for guest in guests {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.guest == guest).collect();
        rounds(&dir.join(format!("rounds-{guest}.svg")), link, guest, &runs)?;
        files += 1;
    }
    Ok(files)
}

fn plot_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {err:?}")
}

/// Total time per row, one bar per guest.
fn bars(path: &Path, link: &str, results: &[RunResult]) -> Result<()> {
    let mut rows: Vec<&str> = Vec::new();
    let mut guests: Vec<&str> = Vec::new();
    for r in results {
        if !rows.contains(&r.row.as_str()) {
            rows.push(&r.row);
        }
        if !guests.contains(&r.guest.as_str()) {
            guests.push(&r.guest);
        }
    }
    let top = results.iter().map(|r| r.total_time_ms).max().unwrap_or(1) as f64 / 1000.0 * 1.1;
    let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Total migration time, link {link}"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..rows.len() as f64, 0.0..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < rows.len() {
                rows[i].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("seconds")
        .draw()
        .map_err(plot_error)?;
    let width = 0.8 / guests.len().max(1) as f64;
    for (g, guest) in guests.iter().enumerate() {
        let color = Palette99::pick(g).to_rgba();
        let bars = rows.iter().enumerate().filter_map(|(i, row)| {
            let run = results.iter().find(|r| r.guest == *guest && r.row == *row)?;
            let left = i as f64 + 0.1 + g as f64 * width;
            Some(Rectangle::new([(left, 0.0), (left + width, run.total_time_ms as f64 / 1000.0)], color.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(plot_error)?
            .label(format!("{guest} guest"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// (seconds since the start, value) at the end of each round.
fn series(run: &RunResult, value: &str) -> Vec<(f64, f64)> {
    let mut elapsed = 0.0;
    run.rounds
        .as_array()
        .map(|rounds| {
            rounds
                .iter()
                .map(|round| {
                    elapsed += round["duration-ms"].as_f64().unwrap_or(0.0) / 1000.0;
                    (elapsed, round[value].as_f64().unwrap_or(0.0))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Each row's rounds over time: throughput, and the pages left to send after each round.
fn rounds(path: &Path, link: &str, guest: &str, runs: &[&RunResult]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (upper, lower) = root.split_vertically(400);
    for (area, value, label) in
        [(&upper, "mbps", "throughput per round, Mbit/s"), (&lower, "dirty-pages-after", "pages left after the round")]
    {
        let all: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| series(r, value)).collect();
        let right = all.iter().flatten().map(|p| p.0).fold(0.1, f64::max) * 1.05;
        let top = all.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{guest} guest, link {link}: {label}"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..right, 0.0..top)
            .map_err(plot_error)?;
        chart.configure_mesh().x_desc("seconds").draw().map_err(plot_error)?;
        for (i, (run, points)) in runs.iter().zip(&all).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3))
                .map_err(plot_error)?
                .label(run.row.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

//! The bench's report as one HTML page (`report.html`): the table of runs, the model of
//! faster links and the charts inline, so that the page opens anywhere on its own (a
//! browser, a CI artefact, a mail).

use super::RunResult;
use anyhow::{Context, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Writes `dir/report.html` from the runs, the model's text tables and the SVG charts
/// already written to `dir`; returns its path.
pub fn write(dir: &Path, link: &str, results: &[RunResult], model: &str) -> Result<PathBuf> {
    let mut page = String::new();
    page += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
    let _ = writeln!(page, "<title>vmigrate bench over {}</title>", escape(link));
    page += "<style>body { font-family: sans-serif; margin: 2em; background: #fff; color: #111; }\n\
             table { border-collapse: collapse; } th, td { border: 1px solid #999; padding: 0.3em 0.7em; }\n\
             td.n { text-align: right; } th { background: #dde6f0; } pre { background: #f4f4f4; padding: 1em; }\n\
             figure { margin: 1em 0; }</style>\n</head>\n<body>\n";
    let _ = writeln!(page, "<h1>vmigrate bench over {}</h1>", escape(link));
    page += &runs_table(results);
    page += "<h2>What faster links would take</h2>\n<pre>";
    page += &escape(model);
    page += "</pre>\n<h2>Charts</h2>\n";
    for chart in charts(dir)? {
        let svg = std::fs::read_to_string(&chart).with_context(|| format!("reading {}", chart.display()))?;
        let name = chart.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = writeln!(page, "<figure>{svg}<figcaption>{}</figcaption></figure>", escape(&name));
    }
    page += "</body>\n</html>\n";
    let path = dir.join("report.html");
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The runs as an HTML table, with the text table's columns.
fn runs_table(results: &[RunResult]) -> String {
    let mut out = String::from("<table id=\"runs\">\n<tr>");
    for heading in ["guest", "row", "total s", "downtime ms", "transferred MiB", "CPU src", "CPU dst", "vs plain"] {
        let _ = write!(out, "<th>{heading}</th>");
    }
    out += "</tr>\n";
    for result in results {
        let versus = super::versus_plain(result, results);
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{:.2}</td><td class=\"n\">{}</td><td class=\"n\">{:.0}</td>\
             <td class=\"n\">{:.0}%</td><td class=\"n\">{:.0}%</td><td class=\"n\">{}</td></tr>",
            escape(&result.guest),
            escape(&result.row),
            result.total_time_ms as f64 / 1000.0,
            result.downtime_ms,
            result.transferred_bytes as f64 / (1 << 20) as f64,
            result.cpu_percent(result.source_cpu_seconds),
            result.cpu_percent(result.destination_cpu_seconds),
            versus
        );
    }
    out + "</table>\n"
}

/// The SVG charts in `dir`, by name.
fn charts(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut charts: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "svg"))
        .collect();
    charts.sort();
    Ok(charts)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

//! Percentiles and the one table the bench prints.

use std::fmt::Write;
use std::time::Duration;

/// Nearest-rank percentile (`p` in 0..=100) of `values`; NaN when there are none.
/// With 20 samples the 99th percentile is the largest one: no interpolation flatters it.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds with a precision that suits the size.
pub fn ms(value: f64) -> String {
    if value.is_nan() {
        "–".into()
    } else if value.abs() < 10.0 {
        format!("{value:.2} ms")
    } else if value.abs() < 1000.0 {
        format!("{value:.1} ms")
    } else {
        format!("{:.2} s", value / 1e3)
    }
}

pub fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

pub fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
}

/// Row groups, by the measurement's prefix.
const GROUPS: [&str; 4] = ["sidecar:", "detection:", "aggregator:", "churn:"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// No target: context for the rows that have one.
    Info,
}

pub struct Row {
    pub measurement: String,
    pub median: String,
    pub p99: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// A row with a target; `met` decides the verdict.
    pub fn target(
        &mut self,
        measurement: impl Into<String>,
        median: impl Into<String>,
        p99: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) {
        self.push(Row {
            measurement: measurement.into(),
            median: median.into(),
            p99: p99.into(),
            target: target.into(),
            verdict: if met { Verdict::Met } else { Verdict::Missed },
        });
    }

    /// A row without a target.
    pub fn info(
        &mut self,
        measurement: impl Into<String>,
        median: impl Into<String>,
        p99: impl Into<String>,
    ) {
        self.push(Row {
            measurement: measurement.into(),
            median: median.into(),
            p99: p99.into(),
            target: "–".into(),
            verdict: Verdict::Info,
        });
    }

    fn push(&mut self, row: Row) {
        // Printed as it comes too, so a long run shows progress and a failed run its results so far.
        eprintln!(
            "bench: {} | {} | {} | {} | {}",
            row.measurement,
            row.median,
            row.p99,
            row.target,
            verdict_text(row.verdict)
        );
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn missed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Missed)
            .count()
    }

    /// A Markdown table, so that docs/performance.md can hold it as printed. Rows are grouped
    /// by component in the order of [`GROUPS`], each group in the order measured.
    pub fn render(&self) -> String {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| {
            GROUPS
                .iter()
                .position(|g| r.measurement.starts_with(g))
                .unwrap_or(GROUPS.len())
        });
        let cells: Vec<Vec<&str>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.measurement.as_str(),
                    r.median.as_str(),
                    r.p99.as_str(),
                    r.target.as_str(),
                    verdict_text(r.verdict),
                ]
            })
            .collect();
        markdown(&["measurement", "median", "p99", "target", "met"], &cells)
    }
}

/// The peer comparison: one row per measurement and number of guests, a column per side.
#[derive(Default)]
pub struct SideBySide {
    rows: Vec<[String; 4]>,
}

impl SideBySide {
    pub const HEADER: [&str; 4] = [
        "measurement",
        "guests",
        "prometheus-libvirt-exporter",
        "node-aggregator + sidecars",
    ];

    pub fn row(
        &mut self,
        measurement: impl Into<String>,
        guests: impl Into<String>,
        exporter: impl Into<String>,
        ours: impl Into<String>,
    ) {
        let row = [
            measurement.into(),
            guests.into(),
            exporter.into(),
            ours.into(),
        ];
        eprintln!("bench: {}", row.join(" | "));
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// A Markdown table: each measurement's rows together (by number of guests), the
    /// measurements in the order first measured.
    pub fn render(&self) -> String {
        let first_seen = |measurement: &str| {
            self.rows
                .iter()
                .position(|row| row[0] == measurement)
                .unwrap_or(0)
        };
        let mut rows: Vec<&[String; 4]> = self.rows.iter().collect();
        rows.sort_by_key(|row| first_seen(&row[0]));
        let cells: Vec<Vec<&str>> = rows
            .iter()
            .map(|row| row.iter().map(String::as_str).collect())
            .collect();
        markdown(&Self::HEADER, &cells)
    }
}

/// `header` and `rows` as a Markdown table with aligned columns.
fn markdown(header: &[&str], rows: &[Vec<&str>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        out.push('|');
        for (cell, width) in row.iter().zip(&widths) {
            let pad = width - cell.chars().count();
            let _ = write!(out, " {cell}{} |", " ".repeat(pad));
        }
        out.push('\n');
    };
    line(&mut out, header);
    out.push('|');
    for width in &widths {
        let _ = write!(out, "{}|", "-".repeat(width + 2));
    }
    out.push('\n');
    for row in rows {
        line(&mut out, row);
    }
    out
}

fn verdict_text(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Met => "yes",
        Verdict::Missed => "**NO**",
        Verdict::Info => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_by_side_keeps_each_measurements_rows_together() {
        let mut table = SideBySide::default();
        for guests in ["10", "30"] {
            table.row("latency", guests, "a", "b");
            table.row("memory", guests, "c", "d");
        }
        let rendered = table.render();
        let firsts: Vec<&str> = rendered
            .lines()
            .skip(2)
            .map(|line| line.split('|').nth(1).unwrap_or("").trim())
            .collect();
        assert_eq!(firsts, ["latency", "latency", "memory", "memory"]);
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}

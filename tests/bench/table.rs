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

    pub fn missed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Missed)
            .count()
    }

    /// A Markdown table, so that docs/performance.md can hold it as printed. Rows are grouped
    /// by component in the order of [`GROUPS`], each group in the order measured.
    pub fn render(&self) -> String {
        let header = ["measurement", "median", "p99", "target", "met"];
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| {
            GROUPS
                .iter()
                .position(|g| r.measurement.starts_with(g))
                .unwrap_or(GROUPS.len())
        });
        let cells: Vec<[&str; 5]> = rows
            .iter()
            .map(|r| {
                [
                    r.measurement.as_str(),
                    r.median.as_str(),
                    r.p99.as_str(),
                    r.target.as_str(),
                    verdict_text(r.verdict),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, row: [&str; 5]| {
            out.push('|');
            for (cell, width) in row.iter().zip(widths) {
                let pad = width - cell.chars().count();
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            }
            out.push('\n');
        };
        line(&mut out, header);
        out.push('|');
        for width in widths {
            let _ = write!(out, "{}|", "-".repeat(width + 2));
        }
        out.push('\n');
        for row in cells {
            line(&mut out, row);
        }
        out
    }
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
    fn nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}

//! The Prometheus text format (version 0.0.4), as much of it as the aggregator writes:
//! family headers and samples, escaped where the format asks for it.

use std::fmt::{Display, Write};

/// The media type of an exposition in this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `# TYPE` of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// The `# HELP` and `# TYPE` lines that open a family.
pub fn family(out: &mut String, name: &str, kind: Kind, help: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        // HELP text escapes only these two; a double quote stays as it is.
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind.as_str());
    out.push('\n');
}

/// One sample line: `name{label="value",…} value`, without braces when there are no labels.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (position, (label, label_value)) in labels.iter().enumerate() {
            if position > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            push_label_value(out, label_value);
            out.push('"');
        }
        out.push('}');
    }
    // Writing into a String cannot fail.
    let _ = writeln!(out, " {value}");
}

/// A family of one unlabelled gauge.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl Display) {
    family(out, name, Kind::Gauge, help);
    sample(out, name, &[], value);
}

/// Appends a label value escaped for the text format.
fn push_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(labels: &[(&str, &str)]) -> String {
        let mut out = String::new();
        sample(&mut out, "m", labels, 1);
        out
    }

    #[test]
    fn label_values_escape_backslash_double_quote_and_newline() {
        assert_eq!(line(&[("v", r"a\b")]), "m{v=\"a\\\\b\"} 1\n");
        assert_eq!(line(&[("v", r#"say "hi""#)]), "m{v=\"say \\\"hi\\\"\"} 1\n");
        assert_eq!(line(&[("v", "two\nlines")]), "m{v=\"two\\nlines\"} 1\n");
        assert_eq!(
            line(&[("v", "plain 'text' {}")]),
            "m{v=\"plain 'text' {}\"} 1\n"
        );
    }

    #[test]
    fn labels_are_separated_by_commas_and_omitted_when_none() {
        assert_eq!(line(&[("a", "1"), ("b", "2")]), "m{a=\"1\",b=\"2\"} 1\n");
        assert_eq!(line(&[]), "m 1\n");
    }

    #[test]
    fn a_family_of_counters() {
        let mut out = String::new();
        family(
            &mut out,
            "requests_total",
            Kind::Counter,
            "Requests \"served\", by path\\method.\nSee the docs.",
        );
        sample(&mut out, "requests_total", &[("path", "/metrics")], 3u64);
        sample(&mut out, "requests_total", &[("path", "/healthz")], 0u64);
        assert_eq!(
            out,
            "# HELP requests_total Requests \"served\", by path\\\\method.\\nSee the docs.\n\
             # TYPE requests_total counter\n\
             requests_total{path=\"/metrics\"} 3\n\
             requests_total{path=\"/healthz\"} 0\n"
        );
    }

    #[test]
    fn a_gauge() {
        let mut out = String::new();
        gauge(&mut out, "open", "Open now.", 2usize);
        assert_eq!(out, "# HELP open Open now.\n# TYPE open gauge\nopen 2\n");
    }
}

//! Replays saved fuzz inputs through the fuzz targets' own checks
//! (`tests/fuzz/src/checks.rs`), without libFuzzer: every crash `make fuzz` ever found
//! (`tests/fuzz/regressions/<target>/`) and the committed seed corpus
//! (`tests/fuzz/corpus/<target>/`). A README in a directory is not an input.

use std::io::Write;
use std::path::{Path, PathBuf};

#[path = "fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("reading a directory entry").path())
        .filter(|path| path.is_file() && path.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for kind in ["regressions", "corpus"] {
        let files = inputs(kind, target);
        for file in &files {
            let data =
                std::fs::read(file).unwrap_or_else(|err| panic!("{}: {err}", file.display()));
            // A panic names the input that caused it.
            eprintln!("replaying {}", file.display());
            check(&data);
        }
        // Straight to stderr, past the test harness's capture: `cargo test` shows the count.
        let _ = writeln!(
            std::io::stderr(),
            "fuzz_regressions: {target}: replayed {} input(s) from tests/fuzz/{kind}/{target}/",
            files.len()
        );
    }
}

#[test]
fn classify_domain_xml() {
    replay("classify_domain_xml", checks::classify_domain_xml);
}

#[test]
fn vmi_json() {
    replay("vmi_json", checks::vmi_json);
}

#[test]
fn report_validator() {
    replay("report_validator", checks::report_validator);
}

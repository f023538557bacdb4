//! The fuzz targets' bodies. `tests/fuzz_regressions.rs` includes `checks.rs` by path and
//! replays every saved crash input through the same functions, without libFuzzer.

pub mod checks;

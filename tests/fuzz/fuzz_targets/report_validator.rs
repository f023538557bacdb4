#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvhm_fuzz::checks::report_validator(data));

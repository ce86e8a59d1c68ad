#![no_main]
//! See `adi_fuzz::request_target`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::request_target(data));

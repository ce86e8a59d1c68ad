#![no_main]
//! See `adi_fuzz::proxy_head`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::proxy_head(data));

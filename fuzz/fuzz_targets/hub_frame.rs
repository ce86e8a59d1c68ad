#![no_main]
//! See `adi_fuzz::hub_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::hub_frame(data));

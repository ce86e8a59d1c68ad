#![no_main]
//! See `adi_fuzz::device_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::device_frame(data));

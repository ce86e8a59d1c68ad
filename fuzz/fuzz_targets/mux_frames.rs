#![no_main]
//! See `adi_fuzz::mux_frames`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::mux_frames(data));

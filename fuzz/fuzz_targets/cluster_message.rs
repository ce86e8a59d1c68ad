#![no_main]
//! See `adi_fuzz::cluster_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::cluster_message(data));

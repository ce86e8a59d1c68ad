#![no_main]
//! See `adi_fuzz::plugin_manifest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::plugin_manifest(data));

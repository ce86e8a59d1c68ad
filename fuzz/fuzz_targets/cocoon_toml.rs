#![no_main]
//! See `adi_fuzz::cocoon_toml`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::cocoon_toml(data));

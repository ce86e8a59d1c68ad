#![no_main]
//! See `adi_fuzz::openai_models`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::openai_models(data));

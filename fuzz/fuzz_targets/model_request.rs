#![no_main]
//! See `adi_fuzz::model_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::model_request(data));

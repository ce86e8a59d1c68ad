#![no_main]
//! See `adi_fuzz::client_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| adi_fuzz::client_message(data));

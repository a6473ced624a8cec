#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tbot::testing::fuzz::template(data));

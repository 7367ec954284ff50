#![no_main]
//! See `callvault::fuzzing::rtp` (the body lives in the library so a stable test runs this
//! target over its corpus).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| callvault::fuzzing::rtp(data));

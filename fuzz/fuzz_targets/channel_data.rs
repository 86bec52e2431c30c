#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bedside_turn::fuzz_channel_data(data));

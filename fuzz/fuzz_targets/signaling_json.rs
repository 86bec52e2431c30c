#![no_main]
// Signaling frames (JSON text) as a client or the server would send them: decoding never
// panics and what decodes round-trips. Seeds: protocol/tests/fixtures and protocol/tests/corpus.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bedside_protocol::fuzz_signaling(data));

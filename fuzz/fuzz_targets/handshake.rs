//! The handshake: the preamble, the source's Hello and the destination's answer, from any
//! bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::handshake::{accept_preamble, decode_reason, Hello, HelloAck, PREAMBLE_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some(preamble) = data.get(..PREAMBLE_BYTES) {
        let _ = accept_preamble(preamble.try_into().expect("length checked"));
    }
    if let Ok(hello) = Hello::decode(data) {
        // Whatever decodes must describe a layout the destination can size before it
        // allocates, and survive a round trip.
        let _ = hello.total_bytes();
        assert_eq!(Hello::decode(&hello.encode()).ok(), Some(hello));
    }
    let _ = HelloAck::decode(data);
    let _ = decode_reason(data);
});

//! The frame parser: any bytes, cut anywhere, give frames or an error, never a panic, and
//! never an allocation past the header's length cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::frame::{FrameDecoder, FrameHeader, HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.get(..HEADER_BYTES) {
        let header: &[u8; HEADER_BYTES] = header.try_into().expect("length checked");
        if let Ok(parsed) = FrameHeader::parse(header) {
            let _ = parsed.check(header, &data[HEADER_BYTES..]);
        }
    }
    // The first byte chooses where the stream is cut, as reads from a socket cut it.
    let cut = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut decoder = FrameDecoder::new();
    for piece in data.chunks(cut) {
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});

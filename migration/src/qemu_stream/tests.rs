use super::*;
use proptest::prelude::*;

/// Builds streams the way QEMU 7.2 writes them (the parts this reader follows).
#[derive(Default)]
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }
    fn be16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn name(&mut self, name: &str) -> &mut Self {
        self.u8(name.len() as u8);
        self.bytes.extend_from_slice(name.as_bytes());
        self
    }
    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }
    fn footer(&mut self, section: u32) -> &mut Self {
        self.u8(0x7e).be32(section)
    }
}

fn page(fill: u8) -> Vec<u8> {
    (0..PAGE_BYTES).map(|i| fill ^ (i as u8)).collect()
}

/// A main stream: configuration (with a capabilities subsection), RAM's start with two
/// blocks, a part with pages, a zero page, an XBZRLE record and a command, RAM's end
/// with one more page, then device state. Returns it and the pages in it.
fn main_stream(complete: bool) -> (Vec<u8>, Vec<(PageKey, Vec<u8>)>) {
    let mut w = Writer::default();
    w.raw(b"QEVM").be32(3);
    w.u8(0x07).be32(13).raw(b"pc-i440fx-7.2");
    w.u8(0x05).name("configuration/capabilities").be32(1).be32(2).name("x-ignore-shared").name("validate-uuid");
    w.u8(0x01).be32(2).name("ram").be32(0).be32(4);
    w.be64((0x8000_0000 + 0x4_0000) | 0x04).name("pc.ram").be64(0x8000_0000).name("pc.bios").be64(0x4_0000);
    w.be64(0x10).footer(2);
    w.u8(0x08).be16(3).be16(4).raw(&[9, 9, 9, 9]);
    let mut pages = Vec::new();
    w.u8(0x02).be32(2);
    w.be64(0x1000 | 0x08).name("pc.ram").raw(&page(1));
    pages.push((PageKey { block: 0, offset: 0x1000 }, page(1)));
    w.be64(0x2000 | 0x08 | 0x20).raw(&page(2));
    pages.push((PageKey { block: 0, offset: 0x2000 }, page(2)));
    w.be64(0x3000 | 0x02 | 0x20).u8(0);
    w.be64(0x4000 | 0x40 | 0x20).u8(1).be16(5).raw(&[1, 2, 3, 4, 5]);
    w.be64(0x08).name("pc.bios").raw(&page(3));
    pages.push((PageKey { block: 1, offset: 0 }, page(3)));
    w.be64(0x10).footer(2);
    if complete {
        w.u8(0x03).be32(2);
        // QEMU keeps its last block across sections: this record continues pc.bios.
        w.be64(0x5000 | 0x08 | 0x20).raw(&page(4));
        pages.push((PageKey { block: 1, offset: 0x5000 }, page(4)));
        w.be64(0x10).footer(2);
        w.u8(0x04).be32(3).name("timer").be32(0).be32(2).raw(&[0xde, 0xad, 0xbe, 0xef]).footer(3);
        w.u8(0x00);
    }
    (w.bytes, pages)
}

/// A multifd stream: the init packet, a sync packet whose next_packet_size is stale (as
/// 7.2 writes them), and a packet of two pages.
fn multifd_stream() -> (Vec<u8>, Vec<(PageKey, Vec<u8>)>) {
    let mut w = Writer::default();
    w.be32(0x1122_3344).be32(1).raw(&[0; 16]).u8(1).raw(&[0; 39]);
    let packet = |w: &mut Writer, flags: u32, offsets: &[u64], next: u32, number: u64, block: &str| {
        w.be32(0x1122_3344).be32(1).be32(flags).be32(128).be32(offsets.len() as u32).be32(next).be64(number);
        w.raw(&[0; 32]);
        let mut name = [0u8; 256];
        name[..block.len()].copy_from_slice(block.as_bytes());
        w.raw(&name);
        for i in 0..128 {
            w.be64(offsets.get(i).copied().unwrap_or(0));
        }
    };
    packet(&mut w, 1, &[], 524_288, 1, "");
    packet(&mut w, 0, &[0x7000, 0x9000], 8192, 2, "pc.ram");
    w.raw(&page(7)).raw(&page(9));
    let pages = vec![(PageKey { block: 0, offset: 0x7000 }, page(7)), (PageKey { block: 0, offset: 0x9000 }, page(9))];
    (w.bytes, pages)
}

/// The pages a reader found: each page's key and bytes.
type Found = Vec<(PageKey, Vec<u8>)>;

/// Feeds `stream` in pieces of `step` bytes; returns the reader, the pieces' bytes put
/// back together, and the pages found.
fn read(stream: &[u8], step: usize) -> (StreamReader, Vec<u8>, Found) {
    let mut reader = StreamReader::default();
    let mut joined = Vec::new();
    let mut pages: Vec<(PageKey, Vec<u8>)> = Vec::new();
    for chunk in stream.chunks(step.max(1)) {
        reader.feed(chunk, &mut |piece| match piece {
            Piece::Other(bytes) => joined.extend_from_slice(bytes),
            Piece::Page { key, bytes } => {
                joined.extend_from_slice(bytes);
                match pages.last_mut() {
                    Some((last, contents)) if *last == key && contents.len() < PAGE_BYTES => {
                        contents.extend_from_slice(bytes)
                    }
                    _ => pages.push((key, bytes.to_vec())),
                }
            }
        });
    }
    (reader, joined, pages)
}

#[test]
fn a_main_stream_yields_its_pages_in_any_pieces() {
    let (stream, expected) = main_stream(true);
    for step in [1, 2, 3, 7, 100, 4095, 4096, 4097, stream.len()] {
        let (reader, joined, pages) = read(&stream, step);
        assert_eq!(joined, stream, "step {step}: the pieces are the stream");
        assert_eq!(pages, expected, "step {step}");
        assert_eq!(reader.kind(), Kind::Main);
        assert_eq!(reader.progress(), Progress::Completing, "step {step}");
        assert_eq!(reader.pages(), 4);
        assert_eq!(reader.gave_up(), Some("device state, which has no framing to follow"));
        assert_eq!(reader.block_name(1), Some(&b"pc.bios"[..]));
    }
}

#[test]
fn a_stream_cut_before_rams_end_has_not_completed() {
    let (stream, _) = main_stream(false);
    let (reader, _, pages) = read(&stream, 1000);
    assert_eq!(pages.len(), 3);
    assert_eq!(reader.progress(), Progress::Iterating);
    assert!(reader.at_boundary(), "it ended between sections");
    let (reader, _, _) = read(&stream[..stream.len() - 3], 1000);
    assert!(!reader.at_boundary(), "it ended inside a footer");
}

#[test]
fn a_multifd_stream_yields_its_pages() {
    let (stream, expected) = multifd_stream();
    for step in [1, 5, 64, 1344, 4096, stream.len()] {
        let (reader, joined, pages) = read(&stream, step);
        assert_eq!(joined, stream);
        assert_eq!(pages, expected, "step {step}");
        assert_eq!(reader.kind(), Kind::Multifd);
        assert!(reader.at_boundary());
        assert_eq!(reader.gave_up(), None);
    }
}

#[test]
fn a_foreign_stream_passes_whole() {
    let stream = b"GET / HTTP/1.1\\r\\nHost: example\\r\\n\\r\\n".repeat(10);
    let (reader, joined, pages) = read(&stream, 3);
    assert_eq!(joined, stream);
    assert!(pages.is_empty());
    assert_eq!(reader.kind(), Kind::Foreign);
}

proptest! {
    #[test]
    fn any_bytes_pass_through_unchanged(stream in proptest::collection::vec(any::<u8>(), 0..20_000), step in 1usize..5000) {
        let (_, joined, _) = read(&stream, step);
        prop_assert_eq!(joined, stream);
    }

    #[test]
    fn damaged_qemu_streams_pass_through_unchanged(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), step in 1usize..5000) {
        let (mut stream, _) = main_stream(true);
        let len = stream.len();
        for (at, value) in flips {
            stream[at % len] = value;
        }
        let (_, joined, _) = read(&stream, step);
        prop_assert_eq!(joined, stream);
    }
}

/// A completed main stream as QEMU 7.2 ends it: the device state, the end-of-file
/// marker, and the machine's description.
fn ended_stream() -> (Vec<u8>, usize) {
    let (mut stream, _) = main_stream(true);
    let marker = stream.len() - 1;
    let json = br#"{"page_size": 4096, "devices": [{"name": "timer"}]}"#;
    stream.push(0x06);
    stream.extend_from_slice(&(json.len() as u32).to_be_bytes());
    stream.extend_from_slice(json);
    (stream, marker)
}

#[test]
fn the_end_marker_is_found_in_every_tail_that_holds_it() {
    let (stream, marker) = ended_stream();
    let mut reader = StreamReader::default();
    reader.feed(&stream[..marker], &mut |_| {});
    assert_eq!(reader.progress(), Progress::Completing, "the device state comes after RAM's end");
    // Whatever part of the device state is still held, and however much of the
    // description has arrived, the marker is where holding back starts.
    for start in [marker - 12, marker - 5, marker] {
        for end in marker + 1..=stream.len() {
            let tail = &stream[start..end];
            let found = end_marker_candidate(tail).map(|at| start + at);
            assert!(found.is_some_and(|at| at <= marker), "tail {start}..{end}: {found:?}");
        }
    }
    // Before the marker arrives, device state that ends in other bytes holds nothing back.
    assert_eq!(end_marker_candidate(&stream[marker - 4..marker]), None);
}

#[test]
fn a_zero_in_device_state_is_let_go_once_more_bytes_show_it_is_not_the_marker() {
    let state = [0x10, 0x00, 0x42, 0x43, 0x44];
    assert_eq!(end_marker_candidate(&state[..2]), Some(1), "could be the marker, for now");
    assert_eq!(end_marker_candidate(&state), None, "0x42 cannot follow the marker");
    // A 0x00 0x06 whose announced description is shorter than what followed.
    let fake = [0x00, 0x06, 0, 0, 0, 2, b'{', b'}', b'x'];
    assert_eq!(end_marker_candidate(&fake), None);
    // Or followed by another 0x00 past its length field.
    let fake = [0x00, 0x06, 0, 0, 0, 9, b'{', 0x00];
    assert_eq!(end_marker_candidate(&fake), Some(7), "only the last zero may still be it");
}

proptest! {
    #[test]
    fn the_marker_is_never_released_early(state in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..400) {
        // Device state of any bytes, then the marker and a description.
        let mut stream = state.clone();
        let marker = stream.len();
        stream.push(0x00);
        stream.push(0x06);
        stream.extend_from_slice(&2u32.to_be_bytes());
        stream.extend_from_slice(b"{}");
        let end = (marker + 1 + cut % 7).min(stream.len());
        let found = end_marker_candidate(&stream[..end]);
        prop_assert!(found.is_some_and(|at| at <= marker), "{:?}", found);
    }
}

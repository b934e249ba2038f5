//! Where a main stream's end-of-file marker may be, in the bytes the reader cannot frame.

/// QEMU's end-of-file section byte (QEMU_VM_EOF, savevm.c): the destination QEMU finishes
/// loading, and starts the guest, when it reads it. What may follow is the machine's
/// description, QEMU_VM_VMDESCRIPTION: 0x06, a be32 length, and that much JSON, which QEMU
/// does not need.
const END_OF_FILE: u8 = 0x00;
const VM_DESCRIPTION: u8 = 0x06;

/// Where QEMU's end-of-file marker may start in `tail`, bytes of a main stream's last,
/// opaque part (its device state, after `Progress::Completing`): the first 0x00 that
/// what follows it could belong to the marker (nothing, or 0x06, a be32 length and no
/// more JSON than it announces, which has no NUL: QEMU escapes control characters).
/// A 0x00 inside device state may look like one until more bytes arrive; the real marker
/// always does, so holding back from here holds it back.
pub fn end_marker_candidate(tail: &[u8]) -> Option<usize> {
    tail.iter().enumerate().filter(|&(_, &byte)| byte == END_OF_FILE).map(|(at, _)| at).find(|&at| {
        let rest = &tail[at + 1..];
        match rest.split_first() {
            None => true,
            Some((&VM_DESCRIPTION, after)) if after.len() < 4 => true,
            Some((&VM_DESCRIPTION, after)) => {
                let length = u32::from_be_bytes([after[0], after[1], after[2], after[3]]) as usize;
                let json = &after[4..];
                json.len() <= length && !json.contains(&END_OF_FILE)
            }
            Some(_) => false,
        }
    })
}

/// Whether `tail` (as for [`end_marker_candidate`]) may end exactly where QEMU's stream
/// ends: with the marker alone, or with the marker and the whole machine description it
/// announces. The source relay then has the stream's digest checked at once (QEMU may keep
/// its socket open until the destination has loaded, with the return path).
pub fn ends_at_end_marker(tail: &[u8]) -> bool {
    end_marker_candidate(tail).is_some_and(|at| {
        let rest = &tail[at + 1..];
        match rest.split_first() {
            None => true,
            Some((_, after)) if after.len() < 4 => false,
            Some((_, after)) => {
                u32::from_be_bytes([after[0], after[1], after[2], after[3]]) as usize == after.len() - 4
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_may_end_at_the_marker_or_after_the_whole_description() {
        let json = br#"{"devices": []}"#;
        let mut ending = vec![0x7e, 0x00, 0x06];
        ending.extend((json.len() as u32).to_be_bytes());
        ending.extend(json);
        assert!(ends_at_end_marker(&ending));
        assert!(ends_at_end_marker(&[0x7e, 0, 0, 0, 3, 0x00]), "the marker alone (no description)");
        for cut in 3..ending.len() {
            assert!(!ends_at_end_marker(&ending[..cut]), "cut at {cut}: the description is not whole");
        }
        assert!(!ends_at_end_marker(&[0x00, 0x05, 1, 2]), "not a description after the 0x00");
    }

    #[test]
    fn a_byte_ruled_out_stays_ruled_out() {
        // Device state full of zeros and 0x06s, then the marker and a description: at
        // every cut, keeping only the bytes from the first candidate on (as the source
        // relay does between reads) gives the same verdict as searching everything.
        let json = br#"{"devices": [1, 2, 3]}"#;
        let mut stream: Vec<u8> = (0..3000u32).map(|i| [0x00, 0x06, 0x7e, 0x01, 0x00][(i % 5) as usize]).collect();
        stream.extend([0x00, 0x06]);
        stream.extend((json.len() as u32).to_be_bytes());
        stream.extend(json);
        let mut kept = Vec::new();
        for (i, &byte) in stream.iter().enumerate() {
            kept.push(byte);
            match end_marker_candidate(&kept) {
                Some(at) => drop(kept.drain(..at)),
                None => kept.clear(),
            }
            assert_eq!(ends_at_end_marker(&kept), ends_at_end_marker(&stream[..=i]), "at byte {i}");
        }
        assert!(ends_at_end_marker(&kept));
    }
}

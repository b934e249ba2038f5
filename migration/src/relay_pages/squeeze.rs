//! The second step of building a page-aware chunk (`relay_pages.rs`): any worker
//! compresses a chunk's raw pages, and the long runs of other bytes, into the frame that
//! goes on the wire.

use super::{tag, take, HEADER_BYTES, KEY_BYTES, OTHER_SQUEEZE_MIN, RECORDS};
use crate::codec::{Codec, PageCompressor};
use crate::frame::{le_u16, FrameBuf};
use crate::relay::RelayError;
use crate::PAGE_SIZE_BYTES;

/// Compresses the RAW page items of `chunk` (a page-aware chunk built by a
/// `deferring_compression` encoder) with `compressor` and the long runs of other bytes
/// with lz4, writing the result, which names the compressor's codec, as the payload of
/// `out` (a frame begun, left unsealed): the compressors write into it in place. Returns
/// how many pages it compressed. Everything else is copied as it is. A pure function of
/// the chunk: any worker may squeeze any chunk.
///
/// With zstd (shuffled or not) the chunk's pages are compressed together, as one block
/// (`BLOCK`, each page then a `BLOCKED` item in its place): zstd's matches and entropy
/// tables pay off across pages. lz4 goes page by page.
pub fn squeeze(chunk: &[u8], compressor: &mut PageCompressor, out: &mut FrameBuf) -> Result<usize, RelayError> {
    if chunk.len() < HEADER_BYTES || chunk[0] != RECORDS {
        return Err(RelayError::Malformed("squeeze: not a page chunk".into()));
    }
    let (none, level) = Codec::None.to_wire();
    if chunk[5..HEADER_BYTES] != [none, level] {
        return Err(RelayError::Malformed("squeeze: the chunk was compressed already".into()));
    }
    if in_blocks(compressor.codec()) {
        if let Some(packed) = squeeze_as_one_block(chunk, compressor, out)? {
            return Ok(packed);
        }
    }
    begin(chunk, compressor.codec(), out);
    let mut rest = &chunk[HEADER_BYTES..];
    let mut packed_pages = 0;
    while !rest.is_empty() {
        let item = next_item(&mut rest)?;
        if other_squeezed(&item, out) {
            continue;
        }
        let flags = item.tag & tag::UNCACHED;
        let at = out.len();
        if item.tag & !tag::UNCACHED == tag::RAW && compressor.codec() != Codec::None {
            out.extend_from_slice(&[tag::PACKED | flags]);
            out.extend_from_slice(item.fields);
            out.extend_from_slice(&[0, 0]);
            if let Some(len) = out.fill_in_place(compressor.room(), |room| compressor.compress_into(item.data, room)) {
                let length_at = at + 1 + item.fields.len();
                out.written_mut()[length_at..length_at + 2].copy_from_slice(&(len as u16).to_le_bytes());
                packed_pages += 1;
                continue;
            }
            out.truncate(at);
        }
        // Everything else goes as it is.
        out.extend_from_slice(&[item.tag]);
        out.extend_from_slice(item.fields);
        out.extend_from_slice(item.data);
    }
    Ok(packed_pages)
}

/// Whether `squeeze` with `codec` would copy `chunk` as it is: no codec for its pages, and
/// no run of other bytes long enough to compress (a chunk that does not parse is not).
pub fn squeeze_keeps(chunk: &[u8], codec: Codec) -> bool {
    if codec != Codec::None || chunk.len() < HEADER_BYTES || chunk[0] != RECORDS {
        return false;
    }
    let (none, level) = Codec::None.to_wire();
    if chunk[5..HEADER_BYTES] != [none, level] {
        return false;
    }
    let mut rest = &chunk[HEADER_BYTES..];
    while !rest.is_empty() {
        match next_item(&mut rest) {
            Ok(item) if item.tag == tag::OTHER && item.data.len() >= OTHER_SQUEEZE_MIN => return false,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Whether `codec` compresses a chunk's pages as one block.
pub fn in_blocks(codec: Codec) -> bool {
    matches!(codec.unfiltered(), Codec::Zstd { .. })
}

/// What `squeeze` would make of `pages` with `compressor`, in bytes (for measuring codecs
/// on them as they would be sent): one block, or page by page.
pub fn squeezed_len(pages: &[&[u8]], compressor: &mut PageCompressor) -> usize {
    let raw = pages.len() * PAGE_SIZE_BYTES;
    if in_blocks(compressor.codec()) && !pages.is_empty() {
        let block = pages.concat();
        let mut room = vec![0; raw - 1];
        return compressor.block().compress_into(&block, &mut room).unwrap_or(raw);
    }
    pages
        .iter()
        .map(|page| match compressor.compress(page) {
            crate::codec::Compressed::Packed { len } => len,
            crate::codec::Compressed::Raw => PAGE_SIZE_BYTES,
        })
        .sum()
}

/// The chunk's header, naming `codec`, at the start of `out`.
fn begin(chunk: &[u8], codec: Codec, out: &mut FrameBuf) {
    out.begin();
    out.extend_from_slice(&chunk[..5]);
    let (codec, level) = codec.to_wire();
    out.extend_from_slice(&[codec, level]);
}

/// `chunk`'s raw pages as one block, then its items with each raw page replaced by a
/// `BLOCKED` item; None (and `out` to begin again) where there are no raw pages or the
/// block does not shrink.
fn squeeze_as_one_block(
    chunk: &[u8],
    compressor: &mut PageCompressor,
    out: &mut FrameBuf,
) -> Result<Option<usize>, RelayError> {
    let pages = raw_pages(chunk)?;
    if pages.is_empty() {
        return Ok(None);
    }
    let block = pages.concat();
    begin(chunk, compressor.codec(), out);
    let at = out.len();
    out.extend_from_slice(&[tag::BLOCK]);
    out.extend_from_slice(&(pages.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let Some(len) = out.fill_in_place(block.len() - 1, |room| compressor.block().compress_into(&block, room)) else {
        return Ok(None);
    };
    out.written_mut()[at + 3..at + 7].copy_from_slice(&(len as u32).to_le_bytes());
    let mut rest = &chunk[HEADER_BYTES..];
    while !rest.is_empty() {
        let item = next_item(&mut rest)?;
        if other_squeezed(&item, out) {
            continue;
        }
        if item.tag & !tag::UNCACHED == tag::RAW {
            out.extend_from_slice(&[tag::BLOCKED | (item.tag & tag::UNCACHED)]);
            out.extend_from_slice(item.fields);
            continue;
        }
        out.extend_from_slice(&[item.tag]);
        out.extend_from_slice(item.fields);
        out.extend_from_slice(item.data);
    }
    Ok(Some(pages.len()))
}

/// A long run of other bytes, lz4-compressed into `out` where that shrinks it; false
/// (nothing written) for any other item.
fn other_squeezed(item: &Item<'_>, out: &mut FrameBuf) -> bool {
    let len = item.data.len();
    if item.tag != tag::OTHER || len < OTHER_SQUEEZE_MIN {
        return false;
    }
    let at = out.len();
    out.extend_from_slice(&[tag::OTHER_LZ4, 0, 0, 0, 0]);
    let room = lz4_flex::block::get_maximum_output_size(len);
    let packed = out.fill_in_place(room, |room| {
        lz4_flex::block::compress_into(item.data, room).ok().filter(|&packed| packed < len)
    });
    match packed {
        Some(packed) => {
            let header = &mut out.written_mut()[at + 1..at + 5];
            header[..2].copy_from_slice(&(len as u16).to_le_bytes());
            header[2..].copy_from_slice(&(packed as u16).to_le_bytes());
            true
        }
        None => {
            out.truncate(at);
            false
        }
    }
}

/// The RAW pages of a page-aware chunk (what `squeeze` would compress), for measuring
/// codecs on them.
pub fn raw_pages(chunk: &[u8]) -> Result<Vec<&[u8]>, RelayError> {
    if chunk.len() < HEADER_BYTES || chunk[0] != RECORDS {
        return Err(RelayError::Malformed("not a page chunk".into()));
    }
    let mut rest = &chunk[HEADER_BYTES..];
    let mut pages = Vec::new();
    while !rest.is_empty() {
        let item = next_item(&mut rest)?;
        if item.tag & !tag::UNCACHED == tag::RAW {
            pages.push(item.data);
        }
    }
    Ok(pages)
}

/// One item of a chunk as it stands: its tag (with its flag), its fixed fields (key,
/// lengths) and its data.
struct Item<'a> {
    tag: u8,
    fields: &'a [u8],
    data: &'a [u8],
}

/// The next item of a chunk being read, every length checked against what is left.
fn next_item<'a>(rest: &mut &'a [u8]) -> Result<Item<'a>, RelayError> {
    let tag = take(rest, 1)?[0];
    let base = match tag & !tag::UNCACHED {
        base @ (tag::RAW | tag::PACKED | tag::ZERO | tag::BLOCKED) => base,
        _ => tag,
    };
    let (fields, data_len) = match base {
        tag::OTHER => {
            let fields = take(rest, 2)?;
            (fields, usize::from(le_u16(fields)))
        }
        tag::OTHER_LZ4 => {
            let fields = take(rest, 4)?;
            (fields, usize::from(le_u16(&fields[2..])))
        }
        tag::RAW => (take(rest, KEY_BYTES)?, PAGE_SIZE_BYTES),
        tag::PACKED | tag::XBZRLE => {
            let fields = take(rest, KEY_BYTES + 2)?;
            (fields, usize::from(le_u16(&fields[KEY_BYTES..])))
        }
        tag::ZERO | tag::UNCHANGED | tag::BLOCKED => (take(rest, KEY_BYTES)?, 0),
        tag::DUPLICATE => (take(rest, 2 * KEY_BYTES)?, 0),
        tag::BLOCK => {
            let fields = take(rest, 6)?;
            (fields, super::le_u32(&fields[2..]) as usize)
        }
        other => return Err(RelayError::Malformed(format!("page chunk: unknown item {other}"))),
    };
    Ok(Item { tag, fields, data: take(rest, data_len)? })
}

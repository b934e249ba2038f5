//! Reading QEMU 7.2's migration streams as they pass: where the guest pages are, and how
//! far the migration got. No IO, fed bytes in pieces of any size.
//!
//! Two kinds of stream (QEMU's migration/savevm.c, ram.c and multifd.c):
//!
//! ```text
//! main:     "QEVM" be32 3 | sections...
//!   0x07 configuration:  be32 len, machine name [, 0x05 subsections: target-page-bits,
//!                        capabilities, uuid]
//!   0x01 start / 0x04 full: be32 section_id, u8 len, idstr, be32 instance, be32 version
//!   0x02 part / 0x03 end:   be32 section_id
//!        ...the section's data, then 0x7e footer: be32 section_id
//!   0x08 command: be16 cmd, be16 len, data     0x00 end of file    0x06 be32 len, JSON
//!   RAM data (sections of "ram"): records until EOS
//!        be64 offset|flags [u8 len, block name unless CONTINUE]
//!        ZERO 0x02: u8 fill   PAGE 0x08: 4096 bytes   XBZRLE 0x40: u8 0x01, be16 len, data
//!        COMPRESS_PAGE 0x100: be32 len, data   MEM_SIZE 0x04 (setup): per block u8 len,
//!        name, be64 length (the offset field holds the total)   EOS 0x10: end of data
//! multifd:  init: be32 0x11223344, be32 1, uuid[16], u8 id, 39 bytes unused
//!           packets: be32 magic, be32 version, be32 flags, be32 pages_alloc,
//!           be32 normal_pages, be32 next_packet_size, be64 packet_num, 32 bytes unused,
//!           char ramblock[256], be64 offset[pages_alloc], then the pages: normal_pages x
//!           4096 bytes when uncompressed (next_packet_size is stale in 7.2's sync packets),
//!           else next_packet_size bytes
//! ```
//!
//! The device state (full sections) has no framing a reader can follow without QEMU's own
//! device descriptions, and neither do iterative sections other than RAM's: from the first
//! one on, the rest of the stream is passed on as opaque bytes. By then every page of the
//! main stream has gone by: QEMU sends device state only after RAM's final (end) section.

/// Bytes of a guest page (x86's target page).
pub const PAGE_BYTES: usize = 4096;

const MAIN_MAGIC: &[u8; 8] = b"QEVM\0\0\0\x03";
const MULTIFD_MAGIC: u32 = 0x1122_3344;
const MULTIFD_INIT_BYTES: usize = 64;
/// The fixed part of a multifd packet header, before the page offsets.
const MULTIFD_HEADER_BYTES: usize = 320;
/// Pages one multifd packet may name: QEMU 7.2 uses 128 (512 KiB packets); a bound far
/// above it keeps a hostile stream from making us buffer much.
const MULTIFD_MAX_PAGES: usize = 4096;
const MULTIFD_COMPRESSION_MASK: u32 = 0xe;

mod end_marker;
mod records;
pub use end_marker::{end_marker_candidate, ends_at_end_marker};
use records::{ram_flag, section};

/// Whether `bytes`, a stream's first, start a QEMU migration stream (main or multifd).
pub fn starts_a_qemu_stream(bytes: &[u8]) -> bool {
    bytes.starts_with(b"QEVM") || bytes.starts_with(&MULTIFD_MAGIC.to_be_bytes())
}

/// Which guest page a payload is: the RAM block's index in the order this stream named
/// blocks, and the offset in the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub block: u16,
    pub offset: u64,
}

/// One piece of the stream, in order: bytes that are not page contents, or the next
/// bytes of one page's contents (a page may arrive over several feeds).
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Other(&'a [u8]),
    Page { key: PageKey, bytes: &'a [u8] },
}

/// How far a main stream got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Before RAM's final section: the migration cannot have completed.
    Iterating,
    /// RAM's final section has passed (QEMU sends it with the guest stopped, just before
    /// the device state): the stream carries a completing migration.
    Completing,
}

/// What the reader makes of its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not yet known (fewer than 4 bytes seen).
    Unknown,
    Main,
    Multifd,
    /// Neither: everything is passed on as is.
    Foreign,
}

/// What the reader waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first bytes: which kind of stream.
    Magic,
    SectionType,
    /// Configuration: be32 length, then that many bytes of name.
    ConfigurationLength,
    /// u8 length, then the name and a be32 version.
    SubsectionName,
    SubsectionBody,
    /// The capability strings of the capabilities subsection still to come: u8 length,
    /// then the string.
    Capability {
        left: u32,
    },
    /// be32 section id; for start sections also u8 length, id string, be32 instance and
    /// be32 version.
    SectionHeader {
        kind: u8,
    },
    SectionIdString,
    SectionVersions,
    Footer,
    CommandHeader,
    RamRecord,
    /// u8 length, then the name.
    RamBlockName {
        flags: u64,
        offset: u64,
    },
    /// u8 length, then the name and its be64 length; `left` bytes of RAM to account for.
    MemSizeBlock {
        left: u64,
    },
    RamZeroFill,
    XbzrleHeader,
    CompressedLength,
    /// Bytes to pass on as they are.
    Skip {
        left: u64,
        then: Then,
    },
    /// Page contents to come.
    Page {
        key: PageKey,
        left: usize,
        then: Then,
    },
    MultifdInit,
    MultifdHeader,
    MultifdOffsets {
        flags: u32,
        normal: usize,
        next: u32,
    },
    /// Everything from here on is opaque.
    Opaque,
}

/// Where to go after a skip or a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    RamRecord,
    SectionType,
    MultifdPages { index: usize },
    MultifdHeader,
}

/// Reads one stream (main or multifd) as it passes.
pub struct StreamReader {
    state: State,
    kind: Kind,
    /// A field being gathered across feeds, and how long it must get.
    field: Vec<u8>,
    want: usize,
    /// Block names in the order this stream first named them.
    blocks: Vec<Vec<u8>>,
    /// The block of the last RAM record (for CONTINUE records).
    current_block: Option<u16>,
    ram_section: Option<u32>,
    section: u32,
    section_kind: u8,
    subsection: Vec<u8>,
    multifd_block: u16,
    multifd_offsets: Vec<u64>,
    /// The field being gathered grows on (its first bytes said how long it is).
    keep_field: bool,
    progress: Progress,
    pages: u64,
    /// Pages of multifd packets QEMU compressed itself, passed whole without being read.
    compressed_pages: u64,
    /// Why the reader stopped following the stream, if it did.
    gave_up: Option<&'static str>,
}

impl Default for StreamReader {
    fn default() -> Self {
        StreamReader {
            state: State::Magic,
            kind: Kind::Unknown,
            field: Vec::with_capacity(300),
            want: 4,
            blocks: Vec::new(),
            current_block: None,
            ram_section: None,
            section: 0,
            section_kind: 0,
            subsection: Vec::new(),
            multifd_block: 0,
            multifd_offsets: Vec::new(),
            keep_field: false,
            progress: Progress::Iterating,
            pages: 0,
            compressed_pages: 0,
            gave_up: None,
        }
    }
}

impl StreamReader {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Pages whose contents the reader has found so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages the stream carried so far: those found, and those in multifd packets QEMU
    /// compressed itself (passed whole, their contents unread).
    pub fn pages_carried(&self) -> u64 {
        self.pages + self.compressed_pages
    }

    /// Why the reader stopped following the stream (the rest passes as opaque bytes).
    pub fn gave_up(&self) -> Option<&'static str> {
        self.gave_up
    }

    /// The name of block `index`, as the stream wrote it.
    pub fn block_name(&self, index: u16) -> Option<&[u8]> {
        self.blocks.get(usize::from(index)).map(Vec::as_slice)
    }

    /// Whether the reader is between records: a stream that ends here ended cleanly at
    /// QEMU's level (for a multifd stream: at a packet boundary).
    pub fn at_boundary(&self) -> bool {
        self.field.is_empty()
            && matches!(self.state, State::SectionType | State::MultifdHeader | State::Opaque | State::Magic)
    }

    /// Reads `data`, handing each piece to `out` in order; the pieces together are exactly
    /// `data`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut impl FnMut(Piece)) {
        while !data.is_empty() {
            let used = self.step(data, out);
            data = &data[used..];
        }
    }

    /// Consumes some of `data` (at least one byte) in the current state.
    fn step(&mut self, data: &[u8], out: &mut impl FnMut(Piece)) -> usize {
        match self.state {
            State::Opaque => {
                out(Piece::Other(data));
                data.len()
            }
            State::Skip { left, then } => {
                let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                out(Piece::Other(&data[..n]));
                let left = left - n as u64;
                self.state = if left == 0 { self.resume(then) } else { State::Skip { left, then } };
                n
            }
            State::Page { key, left, then } => {
                let n = data.len().min(left);
                out(Piece::Page { key, bytes: &data[..n] });
                if left == n {
                    self.pages += 1;
                    self.state = self.resume(then);
                } else {
                    self.state = State::Page { key, left: left - n, then };
                }
                n
            }
            _ => {
                // A field: gather `want` bytes, then act on it.
                let n = data.len().min(self.want - self.field.len());
                self.field.extend_from_slice(&data[..n]);
                out(Piece::Other(&data[..n]));
                if self.field.len() == self.want {
                    let field = std::mem::take(&mut self.field);
                    self.on_field(&field);
                    self.field = field;
                    if !std::mem::take(&mut self.keep_field) {
                        self.field.clear();
                    }
                }
                n
            }
        }
    }

    fn resume(&mut self, then: Then) -> State {
        match then {
            Then::RamRecord => self.expect(State::RamRecord, 8),
            Then::SectionType => self.expect(State::SectionType, 1),
            Then::MultifdHeader => self.expect(State::MultifdHeader, MULTIFD_HEADER_BYTES),
            Then::MultifdPages { index } => self.multifd_page(index),
        }
    }

    fn expect(&mut self, state: State, bytes: usize) -> State {
        self.want = bytes;
        state
    }

    /// Stays in `state`, gathering the field so far on to `total` bytes.
    fn grow_to(&mut self, state: State, total: usize) -> State {
        self.want = total;
        self.keep_field = true;
        state
    }

    /// Passes `left` bytes on as they are, then goes on with `then`.
    fn skip(&mut self, left: u64, then: Then) -> State {
        if left == 0 {
            self.resume(then)
        } else {
            State::Skip { left, then }
        }
    }

    fn give_up(&mut self, why: &'static str) -> State {
        self.gave_up.get_or_insert(why);
        State::Opaque
    }

    fn block_index(&mut self, name: &[u8]) -> u16 {
        match self.blocks.iter().position(|known| known == name) {
            Some(index) => index as u16,
            None => {
                self.blocks.push(name.to_vec());
                (self.blocks.len() - 1) as u16
            }
        }
    }

    /// Acts on a complete field; sets the next state (and its field length).
    fn on_field(&mut self, field: &[u8]) {
        self.state = match self.state {
            State::Magic => self.on_magic(field),
            State::SectionType => self.on_section_type(field[0]),
            State::ConfigurationLength => self.skip(u64::from(be32(field)), Then::SectionType),
            State::SubsectionName if field.len() == 1 => {
                self.grow_to(State::SubsectionName, 1 + usize::from(field[0]) + 4)
            }
            State::SubsectionName => self.on_subsection_name(&field[1..field.len() - 4]),
            State::SubsectionBody => self.on_subsection_body(field),
            State::Capability { left } if field.len() == 1 && field[0] > 0 => {
                self.grow_to(State::Capability { left }, 1 + usize::from(field[0]))
            }
            State::Capability { left } => self.next_capability(left - 1),
            State::SectionHeader { kind } => self.on_section_header(kind, field),
            State::SectionIdString => self.on_section_name(field),
            State::SectionVersions => {
                self.ram_section = Some(self.section);
                self.expect(State::RamRecord, 8)
            }
            State::Footer => {
                if field[0] != section::FOOTER || be32(&field[1..]) != self.section {
                    self.give_up("a section without its footer")
                } else {
                    if self.section_kind == section::END && Some(self.section) == self.ram_section {
                        self.progress = Progress::Completing;
                    }
                    self.expect(State::SectionType, 1)
                }
            }
            State::CommandHeader => self.skip(u64::from(be16(&field[2..4])), Then::SectionType),
            State::RamRecord => self.on_ram_record(be64(field)),
            State::RamBlockName { flags, offset } if field.len() == 1 => {
                if field[0] == 0 {
                    self.give_up("a RAM record naming an empty block")
                } else {
                    self.grow_to(State::RamBlockName { flags, offset }, 1 + usize::from(field[0]))
                }
            }
            State::RamBlockName { flags, offset } => {
                let block = self.block_index(&field[1..]);
                self.current_block = Some(block);
                self.ram_payload(flags, offset, block)
            }
            State::MemSizeBlock { left } if field.len() == 1 => {
                self.grow_to(State::MemSizeBlock { left }, 1 + usize::from(field[0]) + 8)
            }
            State::MemSizeBlock { left } => {
                let name_end = field.len() - 8;
                self.block_index(&field[1..name_end]);
                let length = be64(&field[name_end..]);
                if length > left {
                    self.give_up("RAM block lengths over the declared total")
                } else if length == left {
                    self.expect(State::RamRecord, 8)
                } else {
                    self.expect(State::MemSizeBlock { left: left - length }, 1)
                }
            }
            State::RamZeroFill => self.expect(State::RamRecord, 8),
            State::XbzrleHeader => self.skip(u64::from(be16(&field[1..3])), Then::RamRecord),
            State::CompressedLength => self.skip(u64::from(be32(field)), Then::RamRecord),
            State::MultifdInit => {
                if be32(&field[..4]) != MULTIFD_MAGIC {
                    self.give_up("a multifd stream without its magic")
                } else {
                    self.expect(State::MultifdHeader, MULTIFD_HEADER_BYTES)
                }
            }
            State::MultifdHeader => self.on_multifd_header(field),
            State::MultifdOffsets { flags, normal, next } => {
                self.multifd_offsets.clear();
                self.multifd_offsets.extend(field.chunks_exact(8).take(normal).map(be64));
                if flags & MULTIFD_COMPRESSION_MASK != 0 {
                    // QEMU compressed these pages itself: they pass whole.
                    self.compressed_pages += normal as u64;
                    self.skip(u64::from(next), Then::MultifdHeader)
                } else {
                    self.multifd_page(0)
                }
            }
            State::Skip { .. } | State::Page { .. } | State::Opaque => unreachable!("not a field state"),
        };
    }

    fn on_magic(&mut self, field: &[u8]) -> State {
        if field.len() == 4 {
            if be32(field) == MULTIFD_MAGIC {
                self.kind = Kind::Multifd;
                return self.grow_to(State::MultifdInit, MULTIFD_INIT_BYTES);
            }
            return self.grow_to(State::Magic, MAIN_MAGIC.len());
        }
        if field == MAIN_MAGIC {
            self.kind = Kind::Main;
            self.expect(State::SectionType, 1)
        } else {
            self.kind = Kind::Foreign;
            self.give_up("not a QEMU 7.2 migration stream")
        }
    }

    fn on_section_type(&mut self, kind: u8) -> State {
        match kind {
            section::CONFIGURATION => self.expect(State::ConfigurationLength, 4),
            section::SUBSECTION => self.expect(State::SubsectionName, 1),
            section::FULL => self.give_up("device state, which has no framing to follow"),
            section::START | section::PART | section::END => self.expect(State::SectionHeader { kind }, 4),
            section::COMMAND => self.expect(State::CommandHeader, 4),
            _ => self.give_up("a section type this reader does not know"),
        }
    }

    fn on_section_header(&mut self, kind: u8, field: &[u8]) -> State {
        self.section = be32(&field[..4]);
        self.section_kind = kind;
        if kind != section::START {
            // RAM records may continue the block of the previous section's last record
            // (QEMU keeps its last sent block across sections).
            return if Some(self.section) == self.ram_section {
                self.expect(State::RamRecord, 8)
            } else {
                self.give_up("an iterative section other than RAM's")
            };
        }
        if field.len() == 4 {
            // Then the id string's length.
            return self.grow_to(State::SectionHeader { kind }, 5);
        }
        match usize::from(field[4]) {
            0 => self.give_up("a section with an empty name"),
            length => self.expect(State::SectionIdString, length),
        }
    }

    /// The configuration's subsections (savevm.c): their bodies have fixed layouts.
    fn on_subsection_name(&mut self, name: &[u8]) -> State {
        self.subsection = name.to_vec();
        match name {
            b"configuration/target-page-bits" | b"configuration/capabilities" => self.expect(State::SubsectionBody, 4),
            b"configuration/uuid" => self.expect(State::SubsectionBody, 16),
            _ => self.give_up("a configuration subsection this reader does not know"),
        }
    }

    fn on_subsection_body(&mut self, field: &[u8]) -> State {
        if self.subsection.as_slice() == b"configuration/capabilities" {
            self.next_capability(be32(field))
        } else {
            self.expect(State::SectionType, 1)
        }
    }

    /// `left` capability strings still to read.
    fn next_capability(&mut self, left: u32) -> State {
        if left == 0 {
            self.expect(State::SectionType, 1)
        } else {
            self.expect(State::Capability { left }, 1)
        }
    }

    fn on_section_name(&mut self, name: &[u8]) -> State {
        if name == b"ram" && self.ram_section.is_none() {
            self.expect(State::SectionVersions, 8)
        } else {
            self.give_up("an iterative section other than RAM's")
        }
    }

    fn on_ram_record(&mut self, word: u64) -> State {
        let flags = word & ram_flag::MASK;
        let offset = word & !ram_flag::MASK;
        if flags & ram_flag::MEM_SIZE != 0 {
            return if offset == 0 {
                self.expect(State::RamRecord, 8)
            } else {
                self.expect(State::MemSizeBlock { left: offset }, 1)
            };
        }
        if flags & ram_flag::EOS != 0 {
            return self.expect(State::Footer, 5);
        }
        if flags & ram_flag::CONTINUE == 0 {
            return self.expect(State::RamBlockName { flags, offset }, 1);
        }
        match self.current_block {
            Some(block) => self.ram_payload(flags, offset, block),
            None => self.give_up("a RAM record continuing no block"),
        }
    }

    fn ram_payload(&mut self, flags: u64, offset: u64, block: u16) -> State {
        match flags & !ram_flag::CONTINUE {
            ram_flag::ZERO => self.expect(State::RamZeroFill, 1),
            ram_flag::PAGE => State::Page { key: PageKey { block, offset }, left: PAGE_BYTES, then: Then::RamRecord },
            ram_flag::XBZRLE => self.expect(State::XbzrleHeader, 3),
            ram_flag::COMPRESS_PAGE => self.expect(State::CompressedLength, 4),
            _ => self.give_up("a RAM record this reader does not know"),
        }
    }

    fn on_multifd_header(&mut self, field: &[u8]) -> State {
        if be32(&field[..4]) != MULTIFD_MAGIC {
            return self.give_up("a multifd packet without its magic");
        }
        let flags = be32(&field[8..12]);
        let pages = be32(&field[12..16]) as usize;
        let normal = be32(&field[16..20]) as usize;
        let next = be32(&field[20..24]);
        if pages > MULTIFD_MAX_PAGES || normal > pages {
            return self.give_up("a multifd packet of implausible size");
        }
        let name = &field[64..MULTIFD_HEADER_BYTES];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        self.multifd_block = if name.is_empty() { 0 } else { self.block_index(name) };
        if pages == 0 {
            return self.expect(State::MultifdHeader, MULTIFD_HEADER_BYTES);
        }
        self.expect(State::MultifdOffsets { flags, normal, next }, pages * 8)
    }

    fn multifd_page(&mut self, index: usize) -> State {
        match self.multifd_offsets.get(index) {
            Some(&offset) => State::Page {
                key: PageKey { block: self.multifd_block, offset },
                left: PAGE_BYTES,
                then: Then::MultifdPages { index: index + 1 },
            },
            None => self.expect(State::MultifdHeader, MULTIFD_HEADER_BYTES),
        }
    }
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap_or_default())
}

fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests;

//! The tags of QEMU 7.2's main stream: section types (savevm.c) and RAM record flags
//! (ram.c).

pub(super) mod section {
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

pub(super) mod ram_flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Flags live in the low bits of the page-aligned offset.
    pub const MASK: u64 = 0xfff;
}

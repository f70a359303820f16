//! x86-64 instruction knowledge shared by the author's toolchain and the engine. Pure: bytes in,
//! bytes out.
//!
//! - [`analyze_site`]: is it safe to put a 5-byte `jmp rel32` over these bytes? The displaced
//!   bytes must decode to whole instructions, a `call` may only be the last of them (otherwise a
//!   return address could point into the middle of the new jump), and no displaced branch may
//!   target the inside of the window.
//! - [`find_interior_branches`]: direct branches anywhere in the module's code that land inside
//!   the window (after its first byte) — those would execute the jump's tail.
//! - [`link_patchlet`]: lays out one patchlet's trampoline at a known address: the displaced
//!   instructions relocated with iced-x86's `BlockEncoder`, the patch code with its relocations
//!   applied, the jump back, and import thunks.
//! - [`disassemble`]: Intel-syntax listing for `stitch inspect` and plans.
//!
//! Invariant: everything [`link_patchlet`] emits lies inside the buffer it returns, and every
//! 32-bit displacement it writes is range-checked (an out-of-range target is an error, never a
//! silently truncated jump).
#![forbid(unsafe_code)]

mod link;
mod site;

pub use link::{LinkContext, LinkedPatchlet, link_patchlet};
pub use site::{Site, analyze_site, find_interior_branches};

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

/// Length of the jump written over each site.
pub const JMP_REL32_LEN: usize = 5;
/// Fill for the bytes of a site after the jump: `int3`, so a stray jump into them traps
/// loudly instead of running garbage.
pub const SITE_PAD: u8 = 0xcc;

/// Why a site or a link was refused. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X86Error {
    #[error("{addr:#x}: bytes {bytes} do not decode to a valid instruction")]
    InvalidInstruction { addr: u64, bytes: String },
    #[error(
        "site {at:#x}..{end:#x} splits an instruction: the instruction at {insn_addr:#x} ({insn}) ends at {insn_end:#x}, past the end of `original`"
    )]
    SiteSplitsInstruction {
        at: u64,
        end: u64,
        insn_addr: u64,
        insn: String,
        insn_end: u64,
    },
    #[error(
        "{addr:#x}: `{insn}` is a call but not the last displaced instruction; its return address would land inside the new jump"
    )]
    CallNotLast { addr: u64, insn: String },
    #[error("{addr:#x}: `{insn}` branches to {target:#x}, inside the site {at:#x}..{end:#x}")]
    BranchIntoSite {
        addr: u64,
        insn: String,
        target: u64,
        at: u64,
        end: u64,
    },
    #[error("{what}: target {target:#x} is out of rel32 range from {from:#x}")]
    OutOfRange {
        what: String,
        from: u64,
        target: u64,
    },
    #[error("relocating the displaced instructions to {addr:#x} failed: {reason}")]
    Relocation { addr: u64, reason: String },
    #[error("relocation #{index} refers to import #{import}, which was not resolved")]
    UnresolvedImport { index: usize, import: u16 },
}

impl X86Error {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            X86Error::InvalidInstruction { .. } => "site.invalid_instruction",
            X86Error::SiteSplitsInstruction { .. } => "site.splits_instruction",
            X86Error::CallNotLast { .. } => "site.call_not_last",
            X86Error::BranchIntoSite { .. } => "site.branch_into_site",
            X86Error::OutOfRange { .. } => "link.out_of_range",
            X86Error::Relocation { .. } => "link.relocation_failed",
            X86Error::UnresolvedImport { .. } => "link.unresolved_import",
        }
    }
}

/// One line of a disassembly listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub addr: u64,
    pub bytes: Vec<u8>,
    pub text: String,
}

/// Decodes `code` as if it were at `ip`, in Intel syntax. Undecodable bytes appear as
/// `(bad)` lines of one byte so the listing always covers every byte.
pub fn disassemble(code: &[u8], ip: u64) -> Vec<Line> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut formatter = formatter();
    let mut out = Vec::new();
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        let pos = decoder.position();
        decoder.decode_out(&mut insn);
        let len = insn.len();
        let text = if insn.is_invalid() {
            "(bad)".to_string()
        } else {
            let mut s = String::new();
            formatter.format(&insn, &mut s);
            s
        };
        out.push(Line {
            addr: insn.ip(),
            bytes: code[pos..pos + len.max(1)].to_vec(),
            text,
        });
        if insn.is_invalid() && len == 0 {
            // iced reports invalid instructions with length >= 1; keep the loop finite anyway.
            break;
        }
    }
    out
}

/// objdump-like Intel syntax: `mov eax, [0x555555551106]`, `jmp 0x401007`.
fn formatter() -> IntelFormatter {
    let mut f = IntelFormatter::new();
    let o = f.options_mut();
    o.set_space_after_operand_separator(true);
    o.set_hex_prefix("0x");
    o.set_hex_suffix("");
    o.set_uppercase_hex(false);
    o.set_branch_leading_zeros(false);
    o.set_leading_zeros(false);
    o.set_small_hex_numbers_in_decimal(false);
    f
}

/// The first instructions of `code` (at `ip`) that together cover at least `min_len` bytes:
/// the smallest whole-instruction site that can hold a jump. Fewer lines when `code` ends
/// first.
pub fn whole_instructions(code: &[u8], ip: u64, min_len: usize) -> Vec<Line> {
    let mut covered = 0;
    disassemble(code, ip)
        .into_iter()
        .take_while(|l| {
            let take = covered < min_len;
            covered += l.bytes.len();
            take
        })
        .collect()
}

pub(crate) fn format_insn(insn: &Instruction) -> String {
    let mut s = String::new();
    formatter().format(insn, &mut s);
    s
}

/// `jmp rel32` from `from` to `to`, or `None` when `to` is out of range.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    let rel = rel32(from + 5, to)?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// The displacement `to - next` if it fits in an i32.
pub fn rel32(next: u64, to: u64) -> Option<i32> {
    i32::try_from(to.wrapping_sub(next) as i64).ok()
}

/// The bytes written over a site: `jmp rel32` to the trampoline, then `int3` padding.
pub fn site_bytes(at: u64, len: usize, trampoline: u64) -> Option<Vec<u8>> {
    let mut b = jmp_rel32(at, trampoline)?.to_vec();
    b.resize(len.max(JMP_REL32_LEN), SITE_PAD);
    Some(b)
}

/// Runs the decoder and the block encoder once on a few representative instructions, so that
/// iced-x86's tables, built on first use, are built now rather than inside the first
/// [`link_patchlet`] — for a caller that links under a deadline (the load-time hook links while
/// a thread is held: the first hold after a start paid ~0.8 ms for them). Idempotent, cheap
/// after the first call.
pub fn warm_up() {
    // mov rax,[rip+0x10]; call rel32; lea rcx,[rip-0x20]; jne rel8; endbr64
    const CODE: [u8; 25] = [
        0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0xe8, 0, 1, 0, 0, 0x48, 0x8d, 0x0d, 0xe0, 0xff, 0xff,
        0xff, 0x75, 0x02, 0xf3, 0x0f, 0x1e, 0xfa,
    ];
    let mut decoder = Decoder::with_ip(64, &CODE, 0x40_1000, DecoderOptions::NONE);
    let insns: Vec<Instruction> = decoder.iter().collect();
    let block = iced_x86::InstructionBlock::new(&insns, 0x7f00_0000_0000);
    let _ = iced_x86::BlockEncoder::encode(64, block, iced_x86::BlockEncoderOptions::NONE);
}

//! ELF identity and process-layout parsing for Stitch, from bytes only.
//!
//! What this crate answers: *which* binary is this ([`sha256`], [`ElfFile::build_id`]),
//! *where* is a symbol or code range in it ([`ElfFile::symbol`], [`ElfFile::bytes_at`],
//! [`ElfFile::executable_ranges`]), and *where did the process put it*
//! ([`maps::parse`], [`maps::Module::load_bias`]).
//!
//! Invariants the rest of Stitch relies on:
//! - Pure: no file or process I/O. Callers read `/proc/PID/maps` and the ELF
//!   files themselves, so the same code serves live processes, tests and fuzzing.
//! - No panics on any input (fuzzed via [`fuzz`]); malformed input is a typed
//!   error whose [`ElfError::code`] / [`maps::MapsError::code`] is a stable
//!   snake_case string safe to match on and log.
//! - Only 64-bit little-endian ELF executables and shared objects are accepted;
//!   the x86_64 check is separate ([`ElfFile::require_x86_64`]) so tools can
//!   still describe foreign binaries.
//! - Every [`LoadSegment`]'s file range lies inside the parsed buffer, so any
//!   range [`ElfFile::bytes_at`] accepts is real file content, never zero-fill.
//! - Addresses are ELF virtual addresses unless a function says "runtime";
//!   runtime = load bias + vaddr (wrapping, see [`maps::Module::load_bias`]).
#![forbid(unsafe_code)]

mod elf;
pub mod fuzz;
pub mod maps;

pub use elf::{
    ElfError, ElfFile, ElfKind, LoadSegment, Machine, Symbol, SymbolBinding, SymbolInfo, SymbolKind,
};

/// SHA-256 of `data`: the content identity of a binary, independent of its
/// build-id (which may be absent or reused across rebuilds).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            hex::encode(super::sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

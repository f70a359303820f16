//! Hard bounds on every size in a bundle. The decoder checks each before allocating.
//!
//! They are generous for a micropatch (a few instructions) and small enough that a hostile
//! bundle cannot make an agent allocate much.

/// Largest encoded bundle accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 4 << 20;
/// Most signatures on one bundle.
pub const MAX_SIGNATURES: usize = 16;
/// Most patchlets in one patch.
pub const MAX_PATCHLETS: usize = 64;
/// Fewest bytes a patchlet may replace: a `jmp rel32` is 5 bytes.
pub const MIN_ORIGINAL: usize = 5;
/// Most bytes a patchlet may replace.
pub const MAX_ORIGINAL: usize = 64;
/// Largest assembled code of one patchlet, in bytes.
pub const MAX_CODE: usize = 16 << 10;
/// Most relocations in one patchlet.
pub const MAX_RELOCS: usize = 1024;
/// Most imports (functions of other modules) in one patch.
pub const MAX_IMPORTS: usize = 64;
/// Most CVE ids on one patch.
pub const MAX_CVES: usize = 64;
/// Longest short text (ids, names, versions, titles), in bytes.
pub const MAX_SHORT_TEXT: usize = 256;
/// Longest long text (description, assembly source), in bytes.
pub const MAX_LONG_TEXT: usize = 64 << 10;
/// Longest GNU build-id, in bytes (SHA-1 is 20, some linkers use up to 32).
pub const MAX_BUILD_ID: usize = 64;

//! ELF files come from disk and from other processes' mappings: parsing and every query on
//! them must never panic (the checks live in `stitch_elf::fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stitch_elf::fuzz::elf(data));

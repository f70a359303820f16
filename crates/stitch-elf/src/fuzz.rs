//! Fuzzing entry points: pure functions over arbitrary bytes that drive the whole
//! public surface and assert the crate's invariants. Meant to be called from a
//! `cargo fuzz` / AFL target (e.g. `fuzz_target!(|d: &[u8]| stitch_elf::fuzz::elf(d))`)
//! and from this crate's proptests. Any panic they raise is a bug.

use crate::ElfFile;
use crate::maps;

/// Parses `data` as ELF and, if accepted, exercises every query.
pub fn elf(data: &[u8]) {
    let Ok(file) = ElfFile::parse(data) else {
        return;
    };
    let _ = (
        file.build_id_hex(),
        file.machine(),
        file.kind(),
        file.require_x86_64(),
    );
    for seg in file.load_segments() {
        let whole = usize::try_from(seg.filesz).unwrap_or(usize::MAX);
        // parse() promises every PT_LOAD's file content is in the buffer.
        assert!(
            seg.filesz == 0 || file.bytes_at(seg.vaddr, whole).is_ok(),
            "PT_LOAD file content not readable: {seg:?}"
        );
        let _ = file.is_executable_range(seg.vaddr, seg.memsz);
        let _ = file.bytes_at(seg.vaddr.wrapping_add(seg.filesz), 1);
        let _ = file.symbol_containing(seg.vaddr);
    }
    for (vaddr, len) in file.executable_ranges() {
        assert!(
            file.is_executable_range(vaddr, len),
            "range {vaddr:#x}+{len:#x} not executable"
        );
        let readable = usize::try_from(len).is_ok_and(|len| file.bytes_at(vaddr, len).is_ok());
        assert!(readable, "range {vaddr:#x}+{len:#x} not readable");
    }
    for info in file.symbols().take(256) {
        let name = &info.symbol.name;
        let _ = (file.symbol(name), file.exported_symbol(name));
        if let Some(version) = &info.version {
            let _ = file.symbol(&format!("{name}@{version}"));
            let _ = file.symbol(&format!("{name}@@{version}"));
        }
        if let Some((sym, offset)) = file.symbol_containing(info.symbol.vaddr) {
            assert!(
                offset < sym.size.max(1),
                "{sym:?} does not contain offset {offset:#x}"
            );
        }
    }
}

/// Parses `data` as `/proc/PID/maps` and checks grouping invariants.
pub fn maps(data: &[u8]) {
    let Ok(entries) = maps::parse(data) else {
        return;
    };
    for e in &entries {
        assert!(e.start < e.end);
        let _ = e.map_files_name();
    }
    let files = entries
        .iter()
        .filter(|e| matches!(e.path, maps::MapPath::File { .. }));
    let grouped: usize = maps::modules(&entries)
        .iter()
        .map(|m| m.mappings.len())
        .sum();
    assert_eq!(
        files.count(),
        grouped,
        "every file mapping belongs to exactly one module"
    );
}

/// Relates an arbitrary ELF to arbitrary maps: load bias and runtime lookups.
pub fn elf_and_maps(elf_data: &[u8], maps_data: &[u8]) {
    let (Ok(file), Ok(entries)) = (ElfFile::parse(elf_data), maps::parse(maps_data)) else {
        return;
    };
    for module in maps::modules(&entries) {
        let _ = module.load_bias(&file);
        for (vaddr, len) in file.executable_ranges().into_iter().take(16) {
            let _ = module.runtime_exec_addr(&file, vaddr, len);
        }
    }
}

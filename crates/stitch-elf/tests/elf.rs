//! Integration tests against real toolchain output: C fixtures compiled with gcc
//! at test time, checked against binutils (`readelf`, `nm`, `objdump`) and
//! against this very process's `/proc/self/maps`.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use proptest::prelude::*;
use stitch_elf::maps::{self, MapEntry, MapPath, Module};
use stitch_elf::{ElfError, ElfFile, ElfKind, Machine, SymbolKind};

const PROGRAM_C: &str = r#"
#include <stdio.h>
int global_counter = 5;                 /* .data: file-backed, not executable */
char big_bss[65536];                    /* .bss: memory-only, no file bytes */
__attribute__((noinline, noclone)) static int helper_local(int x) {
    return x * 3 + global_counter + big_bss[x & 0xff];
}
__attribute__((noinline, noclone)) int stitch_target(int x) { return helper_local(x) + 1; }
int main(int argc, char **argv) { (void)argv; printf("%d\n", stitch_target(argc)); return 0; }
"#;

const LIBRARY_C: &str = r#"
int lib_value = 7;
int lib_add(int a, int b) { return a + b + lib_value; }
/* Two versions of one symbol, as glibc does for memcpy. */
__asm__(".symver lib_old_impl, lib_versioned@VERS_1");
__asm__(".symver lib_new_impl, lib_versioned@@VERS_2");
int lib_old_impl(void) { return 1; }
int lib_new_impl(void) { return 2; }
/* Only a non-default version: what an ABI-compat-only symbol looks like. */
__asm__(".symver lib_compat_impl, lib_compat@VERS_1");
int lib_compat_impl(void) { return 3; }
__attribute__((visibility("hidden"))) int lib_hidden(int x) { return x * 5; }
int lib_call_hidden(int x) { return lib_hidden(x) + 1; }
"#;

const LIBRARY_MAP: &str = "
VERS_1 { global: lib_add; lib_value; lib_call_hidden; lib_versioned; lib_compat; local: *; };
VERS_2 { global: lib_versioned; } VERS_1;
";

/// A compiled fixture, held in memory: the compile directory is deleted as soon
/// as all fixtures are built, so nothing leaks into /tmp.
struct Fixture {
    name: &'static str,
    bytes: Vec<u8>,
}

impl Fixture {
    fn elf(&self) -> ElfFile<'_> {
        ElfFile::parse(&self.bytes).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Runs a binutils tool on a temporary copy of the fixture.
    fn tool(&self, program: &str, args: &[&str]) -> String {
        let copy = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(copy.path(), &self.bytes).unwrap();
        run(Command::new(program).args(args).arg(copy.path()))
    }

    fn sym_vaddr(&self, name: &str) -> u64 {
        self.elf()
            .symbol(name)
            .unwrap_or_else(|| panic!("{}: no {name}", self.name))
            .vaddr
    }
}

struct Fixtures {
    pie: Fixture,
    no_pie: Fixture,
    static_exe: Fixture,
    shared: Fixture,
    no_build_id: Fixture,
    object: Fixture,
}

impl Fixtures {
    /// The linked fixtures (those `ElfFile` accepts).
    fn linked(&self) -> [&Fixture; 5] {
        [
            &self.pie,
            &self.no_pie,
            &self.static_exe,
            &self.shared,
            &self.no_build_id,
        ]
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (prog, lib, map) = (
            src("prog.c", PROGRAM_C),
            src("lib.c", LIBRARY_C),
            src("lib.map", LIBRARY_MAP),
        );
        let build = |name: &'static str, source: &Path, flags: &[&str]| {
            let out = dir.path().join(name);
            run(Command::new("gcc")
                .args(["-O1", "-o"])
                .arg(&out)
                .args(flags)
                .arg(source));
            Fixture {
                name,
                bytes: std::fs::read(&out).unwrap(),
            }
        };
        let version_script = format!("-Wl,--version-script={}", map.display());
        Fixtures {
            pie: build("pie", &prog, &["-fPIE", "-pie", "-Wl,--build-id=sha1"]),
            no_pie: build(
                "no_pie",
                &prog,
                &["-fno-pie", "-no-pie", "-Wl,--build-id=sha1"],
            ),
            static_exe: build("static", &prog, &["-static", "-Wl,--build-id=sha1"]),
            shared: build(
                "shared",
                &lib,
                &["-shared", "-fPIC", "-Wl,--build-id=sha1", &version_script],
            ),
            no_build_id: build("no_build_id", &prog, &["-Wl,--build-id=none"]),
            object: build("object.o", &prog, &["-c"]),
        }
    })
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn kinds_and_machine_match_link_mode() {
    let f = fixtures();
    assert_eq!(f.pie.elf().kind(), ElfKind::SharedObject);
    assert_eq!(f.shared.elf().kind(), ElfKind::SharedObject);
    assert_eq!(f.no_pie.elf().kind(), ElfKind::Executable);
    assert_eq!(f.static_exe.elf().kind(), ElfKind::Executable);
    for fx in f.linked() {
        assert_eq!(fx.elf().machine(), Machine::X86_64, "{}", fx.name);
        fx.elf().require_x86_64().unwrap();
    }
}

/// The load-time hook watches the mappings of libraries only: a PIE executable taken for a
/// library would cost every exec of it a kernel round trip per read and mapping.
#[test]
fn pie_executables_are_not_libraries_but_shared_objects_and_libc_are() {
    let f = fixtures();
    assert!(f.shared.elf().is_library());
    assert!(!f.pie.elf().is_library(), "PIE: interpreter, no soname");
    assert!(!f.no_pie.elf().is_library());
    assert!(!f.static_exe.elf().is_library());
    let (path, bytes) = system_libc();
    let libc = ElfFile::parse(&bytes).unwrap();
    assert!(
        libc.is_library(),
        "{}: has PT_INTERP and DT_SONAME",
        path.display()
    );
    assert!(!libc.is_interpreter());
    assert!(!f.shared.elf().is_interpreter(), "no entry point");
    assert!(!f.pie.elf().is_interpreter());
    assert!(!f.static_exe.elf().is_interpreter());
    let ld = std::fs::read("/lib64/ld-linux-x86-64.so.2").unwrap();
    assert!(
        ElfFile::parse(&ld).unwrap().is_interpreter(),
        "the dynamic loader"
    );
}

#[test]
fn relocatable_object_is_rejected() {
    let err = ElfFile::parse(&fixtures().object.bytes).unwrap_err();
    assert_eq!(err.code(), "elf.unsupported_type", "{err}");
}

#[test]
fn build_id_matches_readelf() {
    for fx in fixtures().linked() {
        let expected = fx
            .tool("readelf", &["-n"])
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned));
        assert_eq!(fx.elf().build_id_hex(), expected, "{}", fx.name);
        if fx.name != "no_build_id" {
            assert_eq!(fx.elf().build_id().unwrap().len(), 20, "sha1 build-id");
        }
    }
    assert_eq!(fixtures().no_build_id.elf().build_id(), None);
}

/// Clears e_shoff/e_shnum/e_shstrndx: what `sstrip`-style tools leave behind.
fn without_section_headers(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[0x28..0x30].fill(0);
    b[0x3c..0x40].fill(0);
    b
}

#[test]
fn build_id_found_without_section_headers() {
    let pie = &fixtures().pie;
    let stripped = without_section_headers(&pie.bytes);
    let elf = ElfFile::parse(&stripped).unwrap();
    assert_eq!(elf.build_id(), pie.elf().build_id());
    assert!(elf.build_id().is_some());
    // No sections: no symbols, and code ranges fall back to executable PT_LOADs.
    assert_eq!(elf.symbol("stitch_target"), None);
    let segs: Vec<_> = elf
        .load_segments()
        .iter()
        .filter(|s| s.executable)
        .map(|s| (s.vaddr, s.filesz))
        .collect();
    assert_eq!(elf.executable_ranges(), segs);
    assert!(!segs.is_empty());
}

#[test]
fn truncated_elf_is_rejected_not_panicking() {
    for fx in fixtures().linked() {
        let len = fx.bytes.len();
        // Section headers sit at the end of gcc output, so every proper prefix
        // loses part of them (or of the headers/segments) and must be an error.
        let cuts = (0..len)
            .step_by(len / 211 + 1)
            .chain([1, 4, 16, 63, 64, 65, len - 1]);
        for cut in cuts {
            let err = ElfFile::parse(&fx.bytes[..cut])
                .err()
                .unwrap_or_else(|| panic!("{} truncated to {cut} bytes was accepted", fx.name));
            assert!(
                matches!(err.code(), "elf.malformed" | "elf.not_elf"),
                "{err}"
            );
        }
    }
}

#[test]
fn misaligned_buffer_parses() {
    let pie = &fixtures().pie;
    let mut shifted = vec![0u8; 1];
    shifted.extend_from_slice(&pie.bytes);
    let elf = ElfFile::parse(&shifted[1..]).unwrap();
    assert_eq!(elf.build_id(), pie.elf().build_id());
    assert_eq!(
        elf.symbol("stitch_target"),
        pie.elf().symbol("stitch_target")
    );
}

/// `nm -S` output as name -> (address, size), for names nm shows once.
fn nm(fx: &Fixture, dynamic: bool) -> HashMap<String, (u64, u64)> {
    let args: &[&str] = if dynamic {
        &["-D", "-S", "--defined-only"]
    } else {
        &["-S", "--defined-only"]
    };
    let mut out = HashMap::new();
    for line in fx.tool("nm", args).lines() {
        if let [addr, size, _kind, name] = line.split_whitespace().collect::<Vec<_>>()[..] {
            out.insert(name.to_owned(), (hex(addr), hex(size)));
        }
    }
    out
}

#[test]
fn fixture_symbols_match_nm() {
    let f = fixtures();
    for fx in [&f.pie, &f.no_pie, &f.static_exe] {
        let (elf, nm) = (fx.elf(), nm(fx, false));
        for name in ["main", "stitch_target", "helper_local", "global_counter"] {
            let sym = elf
                .symbol(name)
                .unwrap_or_else(|| panic!("{}: {name}", fx.name));
            assert_eq!((sym.vaddr, sym.size), nm[name], "{}: {name}", fx.name);
            assert_eq!(sym.is_function, name != "global_counter");
        }
    }
    let (elf, dynamic) = (f.shared.elf(), nm(&f.shared, true));
    for name in [
        "lib_add@@VERS_1",
        "lib_value@@VERS_1",
        "lib_versioned@@VERS_2",
        "lib_versioned@VERS_1",
    ] {
        let sym = elf
            .exported_symbol(name)
            .unwrap_or_else(|| panic!("{name}"));
        assert_eq!((sym.vaddr, sym.size), dynamic[name], "{name}");
    }
}

/// Every defined symbol `readelf -sW` lists: table (".symtab"/".dynsym"),
/// name as readelf prints it (dynsym names carry @/@@VERSION), value, size,
/// type, binding, visibility.
struct ReadelfSym {
    table: String,
    name: String,
    value: u64,
    size: u64,
    kind: String,
    bind: String,
    vis: String,
}

fn readelf_symbols(text: &str) -> Vec<ReadelfSym> {
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Symbol table '") {
            table = rest.split('\'').next().unwrap().to_owned();
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [num, value, size, kind, bind, vis, ndx, name, ..] = f[..] else {
            continue;
        };
        if !num.ends_with(':') || matches!(ndx, "UND" | "ABS" | "COM") {
            continue;
        }
        if !matches!(kind, "FUNC" | "OBJECT" | "NOTYPE" | "IFUNC") {
            continue;
        }
        let size = if size.starts_with("0x") {
            hex(size)
        } else {
            size.parse().unwrap()
        };
        out.push(ReadelfSym {
            table: table.clone(),
            name: name.to_owned(),
            value: hex(value),
            size,
            kind: kind.to_owned(),
            bind: bind.to_owned(),
            vis: vis.to_owned(),
        });
    }
    out
}

/// Cross-checks every unambiguous defined symbol against readelf.
fn assert_symbols_match_readelf(label: &str, bytes: &[u8], readelf: &str) {
    let elf = ElfFile::parse(bytes).unwrap();
    let syms = readelf_symbols(readelf);
    let base = |n: &str| n.split('@').next().unwrap().to_owned();
    let (mut base_count, mut name_count) = (HashMap::new(), HashMap::new());
    for s in &syms {
        *base_count
            .entry((s.table.clone(), base(&s.name)))
            .or_insert(0) += 1;
        *name_count
            .entry((s.table.clone(), s.name.clone()))
            .or_insert(0) += 1;
    }
    let mut checked = 0;
    for s in &syms {
        let found = if s.table == ".symtab" {
            // A plain name is only unambiguous if its base is unique in the table.
            if base_count[&(s.table.clone(), base(&s.name))] > 1 {
                continue;
            }
            elf.symbol(&s.name)
        } else {
            if name_count[&(s.table.clone(), s.name.clone())] > 1
                || s.bind == "LOCAL"
                || !matches!(s.vis.as_str(), "DEFAULT" | "PROTECTED")
            {
                continue;
            }
            // symbol() would prefer a same-named .symtab entry; exported_symbol
            // looks at .dynsym only, which is what readelf listed here.
            elf.exported_symbol(&s.name)
        };
        let found = found.unwrap_or_else(|| panic!("{label}: {} {} not found", s.table, s.name));
        assert_eq!(
            (found.vaddr, found.size),
            (s.value, s.size),
            "{label}: {} {}",
            s.table,
            s.name
        );
        assert_eq!(found.is_function, s.kind == "FUNC", "{label}: {}", s.name);
        checked += 1;
    }
    assert!(checked > 0, "{label}: nothing checked");
}

#[test]
fn all_symbols_match_readelf() {
    for fx in fixtures().linked() {
        assert_symbols_match_readelf(fx.name, &fx.bytes, &fx.tool("readelf", &["-sW"]));
    }
    let (path, bytes) = system_libc();
    let listing = run(Command::new("readelf").arg("-sW").arg(&path));
    assert_symbols_match_readelf("libc", &bytes, &listing);
}

#[test]
fn versioned_symbol_lookup_honours_default_version() {
    let fx = &fixtures().shared;
    let elf = fx.elf();
    let (old, new) = (fx.sym_vaddr("lib_old_impl"), fx.sym_vaddr("lib_new_impl"));
    assert_ne!(old, new);
    // A plain name binds to the default (@@) version, like the dynamic linker.
    assert_eq!(elf.exported_symbol("lib_versioned").unwrap().vaddr, new);
    assert_eq!(elf.symbol("lib_versioned").unwrap().vaddr, new);
    assert_eq!(elf.symbol("lib_versioned@@VERS_2").unwrap().vaddr, new);
    assert_eq!(elf.symbol("lib_versioned@VERS_2").unwrap().vaddr, new);
    assert_eq!(elf.symbol("lib_versioned@VERS_1").unwrap().vaddr, old);
    assert_eq!(
        elf.exported_symbol("lib_versioned@VERS_1").unwrap().vaddr,
        old
    );
    // VERS_1 exists but is not the default version.
    assert_eq!(elf.symbol("lib_versioned@@VERS_1"), None);
    assert_eq!(elf.symbol("lib_versioned@VERS_3"), None);
    // Only a non-default version exists: a plain name binds to it, as dlsym does.
    let compat = fx.sym_vaddr("lib_compat_impl");
    assert_eq!(elf.exported_symbol("lib_compat").unwrap().vaddr, compat);
    assert_eq!(elf.exported_symbol("lib_compat@@VERS_1"), None);
    let info = elf.symbol_info("lib_versioned@VERS_1").unwrap();
    assert_eq!(
        (info.version.as_deref(), info.default_version),
        (Some("VERS_1"), false)
    );
}

#[test]
fn local_and_hidden_symbols_are_not_exported() {
    let elf = fixtures().shared.elf();
    for name in ["lib_old_impl", "lib_hidden"] {
        assert!(elf.symbol(name).is_some(), "{name} is in .symtab");
        assert_eq!(elf.exported_symbol(name), None, "{name}");
    }
    assert!(elf.exported_symbol("lib_add").is_some());
}

fn system_libc() -> (PathBuf, Vec<u8>) {
    let module = own_modules()
        .into_iter()
        .find(is_libc)
        .expect("test process maps libc");
    let bytes = std::fs::read(&module.path).unwrap();
    (module.path, bytes)
}

fn is_libc(m: &Module) -> bool {
    let name = m.path.file_name().unwrap_or_default().to_string_lossy();
    name.starts_with("libc.so") || name.starts_with("libc-")
}

#[test]
fn libc_ifunc_memcpy_prefers_default_version() {
    let (_, bytes) = system_libc();
    let elf = ElfFile::parse(&bytes).unwrap();
    let default = elf
        .symbol("memcpy@@GLIBC_2.14")
        .expect("x86_64 glibc has memcpy@@GLIBC_2.14");
    assert_eq!(elf.exported_symbol("memcpy"), Some(default.clone()));
    assert_ne!(
        elf.symbol("memcpy@GLIBC_2.2.5").unwrap().vaddr,
        default.vaddr
    );
    // memcpy is an IFUNC: its address is the resolver, not code to patch.
    assert_eq!(elf.symbol_info("memcpy").unwrap().kind, SymbolKind::Ifunc);
    assert!(!default.is_function);
}

/// Instruction bytes `objdump -d` prints for `[start, start+len)`.
fn objdump_bytes(fx: &Fixture, start: u64, len: u64) -> Vec<u8> {
    let text = fx.tool(
        "objdump",
        &[
            "-d",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={:#x}", start + len),
        ],
    );
    let mut bytes = Vec::new();
    for line in text.lines() {
        // "  40161f:\te8 f1 ff ff ff       \tcall ..." (long instructions continue
        // on lines without the mnemonic column).
        let Some((addr, rest)) = line.split_once(":\t") else {
            continue;
        };
        if u64::from_str_radix(addr.trim(), 16).is_err() {
            continue;
        }
        let hex_col = rest.split('\t').next().unwrap();
        bytes.extend(
            hex_col
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap()),
        );
    }
    bytes
}

#[test]
fn bytes_at_matches_objdump() {
    let f = fixtures();
    for (fx, name) in [
        (&f.pie, "stitch_target"),
        (&f.no_pie, "stitch_target"),
        (&f.static_exe, "stitch_target"),
        (&f.shared, "lib_add"),
    ] {
        let sym = fx.elf().symbol(name).unwrap();
        let ours = fx.elf().bytes_at(sym.vaddr, sym.size as usize).unwrap();
        assert_eq!(
            ours,
            objdump_bytes(fx, sym.vaddr, sym.size),
            "{}: {name}",
            fx.name
        );
    }
}

#[test]
fn bss_and_unmapped_ranges_are_not_readable() {
    let fx = &fixtures().pie;
    let elf = fx.elf();
    let bss = elf.symbol("big_bss").unwrap();
    let err = elf.bytes_at(bss.vaddr + 100, 4).unwrap_err();
    assert_eq!(
        err,
        ElfError::VaddrNotMapped {
            vaddr: bss.vaddr + 100,
            len: 4
        }
    );
    assert_eq!(err.code(), "elf.vaddr_not_mapped");
    assert!(elf.bytes_at(u64::MAX - 1, 4).is_err(), "overflowing range");
    assert!(
        elf.bytes_at(0x7fff_0000_0000, 1).is_err(),
        "far outside any segment"
    );
    // A range running off the end of a segment's file content.
    let seg = elf.load_segments()[0];
    assert!(elf.bytes_at(seg.vaddr + seg.filesz - 2, 4).is_err());
    assert_eq!(
        elf.bytes_at(seg.vaddr + seg.filesz - 2, 2).unwrap().len(),
        2
    );
}

#[test]
fn data_is_not_an_executable_range_but_code_is() {
    let f = fixtures();
    for fx in [&f.pie, &f.no_pie, &f.static_exe] {
        let elf = fx.elf();
        let (code, data) = (
            elf.symbol("stitch_target").unwrap(),
            elf.symbol("global_counter").unwrap(),
        );
        assert!(
            elf.is_executable_range(code.vaddr, code.size),
            "{}",
            fx.name
        );
        assert!(
            !elf.is_executable_range(data.vaddr, data.size),
            "{}",
            fx.name
        );
        assert!(!elf.is_executable_range(code.vaddr, 0), "empty range");
        assert!(
            !elf.is_executable_range(code.vaddr, u64::MAX),
            "overflowing range"
        );
    }
}

#[test]
fn executable_ranges_are_exec_sections_per_readelf() {
    for fx in fixtures().linked() {
        let mut expected = Vec::new();
        for line in fx.tool("readelf", &["-SW"]).lines() {
            let Some((_, rest)) = line.split_once(']') else {
                continue;
            };
            // name type addr off size es flags lk inf al (flags may be absent)
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() == 10 && f[6].contains('A') && f[6].contains('X') && f[1] != "NOBITS" {
                let size = hex(f[4]);
                if size > 0 {
                    expected.push((hex(f[2]), size));
                }
            }
        }
        expected.sort_unstable();
        let elf = fx.elf();
        assert_eq!(elf.executable_ranges(), expected, "{}", fx.name);
        for (vaddr, len) in expected {
            assert!(elf.is_executable_range(vaddr, len));
            elf.bytes_at(vaddr, len as usize).unwrap();
        }
    }
}

#[test]
fn symbol_containing_names_function_and_offset() {
    let f = fixtures();
    for fx in [&f.pie, &f.no_pie, &f.static_exe] {
        let elf = fx.elf();
        for name in ["stitch_target", "helper_local", "main"] {
            let sym = elf.symbol(name).unwrap();
            assert_eq!(
                elf.symbol_containing(sym.vaddr),
                Some((sym.clone(), 0)),
                "{}",
                fx.name
            );
            let last = sym.size - 1;
            assert_eq!(
                elf.symbol_containing(sym.vaddr + last),
                Some((sym.clone(), last))
            );
        }
        assert_eq!(elf.symbol_containing(0), None, "{}: address 0", fx.name);
    }
}

// ---- load bias: synthetic maps ------------------------------------------------

const PAGE: u64 = 4096;

/// The mappings the kernel / ld.so make for `elf` at `bias`: one per PT_LOAD
/// (file-backed part), a PROT_NONE gap filler at a meaningless offset between
/// segments as glibc's ld.so leaves it, and an anonymous .bss tail.
fn loader_maps(elf: &ElfFile<'_>, bias: u64, path: &str) -> Vec<MapEntry> {
    let mut text = String::new();
    let mut prev_end = None;
    for seg in elf.load_segments() {
        let start = bias + (seg.vaddr & !(PAGE - 1));
        let file_end = (bias + seg.vaddr + seg.filesz).next_multiple_of(PAGE);
        if let Some(prev) = prev_end.filter(|&p| p < start) {
            text += &format!("{prev:x}-{start:x} ---p 00123000 fe:01 4242 {path}\n");
        }
        let perms = format!(
            "{}{}{}p",
            if seg.readable { 'r' } else { '-' },
            if seg.writable { 'w' } else { '-' },
            if seg.executable { 'x' } else { '-' }
        );
        let offset = seg.offset & !(PAGE - 1);
        text += &format!("{start:x}-{file_end:x} {perms} {offset:08x} fe:01 4242     {path}\n");
        let mem_end = (bias + seg.vaddr + seg.memsz).next_multiple_of(PAGE);
        if mem_end > file_end {
            text += &format!("{file_end:x}-{mem_end:x} rw-p 00000000 00:00 0\n");
        }
        prev_end = Some(mem_end);
    }
    maps::parse(text.as_bytes()).unwrap()
}

fn only_module(entries: &[MapEntry]) -> Module {
    let mut mods = maps::modules(entries);
    assert_eq!(mods.len(), 1);
    mods.remove(0)
}

#[test]
fn load_bias_ignores_prot_none_gap_mappings() {
    let f = fixtures();
    for (fx, bias) in [
        (&f.pie, 0x5555_5555_4000),
        (&f.shared, 0x7f12_3456_0000),
        (&f.no_pie, 0),
    ] {
        let elf = fx.elf();
        let module = only_module(&loader_maps(&elf, bias, "/x/fixture"));
        assert_eq!(module.load_bias(&elf), Ok(bias), "{}", fx.name);
    }
}

#[test]
fn load_bias_tolerates_symbolizer_view_of_same_file() {
    // Backtrace symbolizers and debuggers mmap the binary read-only at offset 0;
    // top-down mmap puts that view *below* a library, so it must not win the
    // "lowest offset, lowest address" anchor.
    let elf = fixtures().shared.elf();
    let bias = 0x7f12_3456_0000;
    let mut entries = loader_maps(&elf, bias, "/x/lib.so");
    let file_len = (fixtures().shared.bytes.len() as u64).next_multiple_of(PAGE);
    let view = format!(
        "7f00_0000_0000-{:x} r--p 00000000 fe:01 4242 /x/lib.so\n",
        0x7f00_0000_0000 + file_len
    );
    entries.extend(maps::parse(view.replace('_', "").as_bytes()).unwrap());
    let module = only_module(&entries);
    assert_eq!(module.load_bias(&elf), Ok(bias));
    let f = elf.symbol("lib_add").unwrap();
    assert_eq!(
        module.runtime_exec_addr(&elf, f.vaddr, f.size),
        Some(bias + f.vaddr)
    );
    // A stray *executable* view is not tolerated: that would be code we cannot place.
    let stray_exec = format!(
        "7e00_0000_0000-{:x} r-xp 00000000 fe:01 4242 /x/lib.so\n",
        0x7e00_0000_0000 + file_len
    );
    entries.extend(maps::parse(stray_exec.replace('_', "").as_bytes()).unwrap());
    assert_eq!(
        only_module(&entries).load_bias(&elf).unwrap_err().code(),
        "elf.bias_inconsistent"
    );
}

#[test]
fn load_bias_detects_wrong_elf_or_moved_mapping() {
    let f = fixtures();
    // ET_EXEC must be loaded at its link address.
    let elf = f.no_pie.elf();
    let module = only_module(&loader_maps(&elf, 0x10_0000, "/x/no_pie"));
    assert_eq!(
        module.load_bias(&elf).unwrap_err().code(),
        "elf.bias_inconsistent"
    );
    // One segment mapped a page away from where the others imply.
    let elf = f.pie.elf();
    let mut entries = loader_maps(&elf, 0x5555_5555_4000, "/x/pie");
    let exec = entries.iter_mut().find(|e| e.exec).unwrap();
    exec.start += PAGE;
    exec.end += PAGE;
    let err = only_module(&entries).load_bias(&elf).unwrap_err();
    assert!(
        matches!(err, ElfError::BiasInconsistent { start, .. } if start == exec_start(&entries))
    );
    // Offsets that no PT_LOAD of this ELF covers: a different file.
    let mut entries = loader_maps(&elf, 0x5555_5555_4000, "/x/pie");
    entries.iter_mut().for_each(|e| e.offset += 0x1000_0000);
    assert_eq!(
        only_module(&entries).load_bias(&elf).unwrap_err().code(),
        "elf.offset_not_loaded"
    );
}

fn exec_start(entries: &[MapEntry]) -> u64 {
    entries.iter().find(|e| e.exec).unwrap().start
}

#[test]
fn module_with_only_inaccessible_mappings_has_no_bias() {
    let entries = maps::parse(b"1000-2000 ---p 00000000 fe:01 9 /x/lib.so\n").unwrap();
    let elf = fixtures().pie.elf();
    assert_eq!(
        only_module(&entries).load_bias(&elf),
        Err(ElfError::ModuleEmpty)
    );
}

#[test]
fn runtime_exec_addr_requires_exec_mapping_now() {
    let elf = fixtures().pie.elf();
    let bias = 0x5555_5555_4000;
    let target = elf.symbol("stitch_target").unwrap();
    let mut entries = loader_maps(&elf, bias, "/x/pie");
    let module = only_module(&entries);
    assert_eq!(
        module.runtime_exec_addr(&elf, target.vaddr, target.size),
        Some(bias + target.vaddr)
    );
    // Data is never an executable address, even though it is mapped.
    let data = elf.symbol("global_counter").unwrap();
    assert_eq!(module.runtime_exec_addr(&elf, data.vaddr, data.size), None);
    // The code pages are currently writable, not executable (mid-patch).
    entries
        .iter_mut()
        .filter(|e| e.exec)
        .for_each(|e| (e.exec, e.write) = (false, true));
    let module = only_module(&entries);
    assert_eq!(module.load_bias(&elf), Ok(bias));
    assert_eq!(
        module.runtime_exec_addr(&elf, target.vaddr, target.size),
        None
    );
}

#[test]
fn runtime_exec_addr_spans_mprotect_split_mappings() {
    let elf = fixtures().static_exe.elf();
    let text = *elf.executable_ranges().iter().max_by_key(|r| r.1).unwrap();
    let mut entries = loader_maps(&elf, 0, "/x/static");
    // Split the code mapping in two at a page inside .text, as an mprotect of
    // part of it would.
    let i = entries.iter().position(|e| e.exec).unwrap();
    let mid = (text.0 + text.1 / 2) & !(PAGE - 1);
    let mut tail = entries[i].clone();
    tail.offset += mid - tail.start;
    tail.start = mid;
    entries[i].end = mid;
    entries.insert(i + 1, tail);
    assert_eq!(
        only_module(&entries).runtime_exec_addr(&elf, text.0, text.1),
        Some(text.0)
    );
    entries[i + 1].exec = false;
    assert_eq!(
        only_module(&entries).runtime_exec_addr(&elf, text.0, text.1),
        None
    );
    // Right permissions but the wrong file offset: not this code.
    entries[i + 1].exec = true;
    entries[i + 1].offset += PAGE;
    assert_eq!(
        only_module(&entries).runtime_exec_addr(&elf, text.0, text.1),
        None
    );
}

// ---- load bias: this process ----------------------------------------------------

fn own_modules() -> Vec<Module> {
    let entries = maps::parse(&std::fs::read("/proc/self/maps").unwrap()).unwrap();
    maps::modules(&entries)
}

fn read_own_memory(addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open("/proc/self/mem")
        .unwrap()
        .read_exact_at(&mut buf, addr)
        .unwrap();
    buf
}

#[test]
fn libc_load_bias_matches_proc_self_maps() {
    let module = own_modules().into_iter().find(is_libc).unwrap();
    let bytes = std::fs::read(&module.path).unwrap();
    let elf = ElfFile::parse(&bytes).unwrap();
    assert_eq!(elf.kind(), ElfKind::SharedObject);
    let bias = module.load_bias(&elf).unwrap();
    let first = elf.load_segments()[0];
    let lowest = module.mappings.iter().map(|m| m.start).min().unwrap();
    assert_eq!(bias + (first.vaddr & !(PAGE - 1)), lowest);
    // The ELF header really is at the first segment's runtime address...
    assert_eq!(
        read_own_memory(bias + first.vaddr - first.offset, 64),
        bytes[..64]
    );
    // ...and an exported function's code is where bias + vaddr says.
    let getpid = elf.exported_symbol("getpid").unwrap();
    assert!(getpid.is_function);
    let len = getpid.size.min(16);
    assert_eq!(
        read_own_memory(bias + getpid.vaddr, len as usize),
        elf.bytes_at(getpid.vaddr, len as usize).unwrap()
    );
    assert_eq!(
        module.runtime_exec_addr(&elf, getpid.vaddr, len),
        Some(bias + getpid.vaddr)
    );
}

#[inline(never)]
fn marker_function() -> u32 {
    std::hint::black_box(42)
}

#[test]
fn own_executable_bias_locates_own_function() {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let module = own_modules().into_iter().find(|m| m.path == exe).unwrap();
    let bytes = std::fs::read(&exe).unwrap();
    let elf = ElfFile::parse(&bytes).unwrap();
    let bias = module.load_bias(&elf).unwrap();
    let runtime = marker_function as fn() -> u32 as usize as u64;
    let (sym, offset) = elf.symbol_containing(runtime - bias).unwrap();
    assert!(sym.name.contains("marker_function"), "{sym:?}");
    assert_eq!(offset, 0);
    assert_eq!(
        module.runtime_exec_addr(&elf, sym.vaddr, sym.size),
        Some(runtime)
    );
    assert_eq!(marker_function(), 42);
}

#[test]
fn own_maps_parse_and_name_map_files() {
    let entries = maps::parse(&std::fs::read("/proc/self/maps").unwrap()).unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.path == MapPath::Special("[stack]".into()))
    );
    // Every name we derive exists in /proc/self/map_files (for file mappings;
    // entries can come and go as other test threads allocate, so sample files).
    let names: Vec<String> = std::fs::read_dir("/proc/self/map_files")
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    for e in entries
        .iter()
        .filter(|e| matches!(&e.path, MapPath::File { path, .. } if *path == exe))
    {
        assert!(
            names.contains(&e.map_files_name()),
            "{}",
            e.map_files_name()
        );
    }
}

// ---- never panic ------------------------------------------------------------------

/// Renders an entry the way the kernel does (`show_vma_header_prefix` + pad).
fn kernel_line(e: &MapEntry) -> Vec<u8> {
    let mut line = format!(
        "{:08x}-{:08x} {}{}{}{} {:08x} {:02x}:{:02x} {} ",
        e.start,
        e.end,
        if e.read { 'r' } else { '-' },
        if e.write { 'w' } else { '-' },
        if e.exec { 'x' } else { '-' },
        if e.shared { 's' } else { 'p' },
        e.offset,
        e.dev_major,
        e.dev_minor,
        e.inode
    )
    .into_bytes();
    let name: Vec<u8> = match &e.path {
        MapPath::Anonymous => Vec::new(),
        MapPath::Special(s) => s.clone().into_bytes(),
        MapPath::File { path, deleted } => {
            use std::os::unix::ffi::OsStrExt as _;
            let mut p = path.as_os_str().as_bytes().to_vec();
            if *deleted {
                p.extend_from_slice(b" (deleted)");
            }
            p
        }
    };
    if !name.is_empty() {
        line.resize(line.len().max(73), b' ');
        line.extend(name);
    }
    line.push(b'\n');
    line
}

fn arb_entry() -> impl Strategy<Value = MapEntry> {
    use std::os::unix::ffi::OsStringExt as _;
    let file = (
        // Any bytes but NUL, newline and backslash (which the kernel would
        // escape), starting with '/': spaces and non-UTF-8 included.
        prop::collection::vec(
            any::<u8>().prop_filter("", |b| !matches!(b, 0 | b'\n' | b'\\')),
            0..40,
        ),
        any::<bool>(),
    )
        .prop_filter("a name ending in \" (deleted)\" is ambiguous", |(p, _)| {
            !p.ends_with(b" (deleted)")
        })
        .prop_map(|(mut p, deleted)| {
            p.insert(0, b'/');
            MapPath::File {
                path: PathBuf::from(std::ffi::OsString::from_vec(p)),
                deleted,
            }
        });
    let path = prop_oneof![
        Just(MapPath::Anonymous),
        "\\[[a-z_:0-9]{1,20}\\]".prop_map(MapPath::Special),
        file,
    ];
    (
        any::<u64>(),
        1..u64::MAX,
        any::<[bool; 4]>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        path,
    )
        .prop_map(
            |(
                start,
                len,
                [read, write, exec, shared],
                offset,
                dev_major,
                dev_minor,
                inode,
                path,
            )| {
                let start = start.min(u64::MAX - len);
                MapEntry {
                    start,
                    end: start + len,
                    read,
                    write,
                    exec,
                    shared,
                    offset,
                    dev_major,
                    dev_minor,
                    inode,
                    path,
                }
            },
        )
}

proptest! {
    #[test]
    fn maps_parse_never_panics_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        stitch_elf::fuzz::maps(&data);
    }

    #[test]
    fn maps_parse_never_panics_on_near_valid_lines(
        data in "([0-9a-f]{1,16}-[0-9a-f]{1,16} [rwxps-]{4} [0-9a-f]{1,16} [0-9a-f]{1,4}:[0-9a-f]{1,4} [0-9]{1,20} *(/[ -~]{0,20}|\\[[a-z:]{0,10}\\])?\n){0,4}"
    ) {
        stitch_elf::fuzz::maps(data.as_bytes());
    }

    #[test]
    fn kernel_formatted_maps_round_trip(entries in prop::collection::vec(arb_entry(), 0..8)) {
        let text: Vec<u8> = entries.iter().flat_map(kernel_line).collect();
        prop_assert_eq!(maps::parse(&text).unwrap(), entries);
    }

    #[test]
    fn elf_parse_never_panics_on_arbitrary_bytes(
        magic in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        // Half the inputs get a valid 64-bit LE ident so parsing goes deeper.
        let mut data = if magic { b"\x7fELF\x02\x01\x01".to_vec() } else { Vec::new() };
        data.extend(tail);
        stitch_elf::fuzz::elf(&data);
    }

    #[test]
    fn elf_parse_never_panics_on_mutated_fixture(
        mutations in prop::collection::vec((prop_oneof![0..1024usize, any::<usize>()], any::<u8>()), 1..8),
        strip_sections in any::<bool>(),
    ) {
        let fx = &fixtures().pie;
        let mut data = if strip_sections { without_section_headers(&fx.bytes) } else { fx.bytes.clone() };
        let len = data.len();
        for (at, value) in mutations {
            data[at % len] = value;
        }
        stitch_elf::fuzz::elf(&data);
        // Also against maps naming it, to reach the bias code with odd segments.
        let elf = fx.elf();
        let text: Vec<u8> = loader_maps(&elf, 0x5555_5555_4000, "/x/pie").iter().flat_map(kernel_line).collect();
        stitch_elf::fuzz::elf_and_maps(&data, &text);
    }
}

/// The load-time hook plans with `parse_layout` (no symbol tables: libc's cost ~95 us under
/// a hold). The hazard: a layout that differs from the full parse — another bias, build-id,
/// code range or library/interpreter verdict would patch or refuse the wrong bytes.
#[test]
fn layout_parse_of_libc_and_of_a_pie_agrees_with_the_full_parse() {
    let (_, libc) = system_libc();
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    for bytes in [&libc, &exe] {
        let full = ElfFile::parse(bytes).unwrap();
        let layout = ElfFile::parse_layout(bytes).unwrap();
        assert_eq!(layout.load_segments(), full.load_segments());
        assert_eq!(layout.build_id(), full.build_id());
        assert!(layout.build_id().is_some());
        assert_eq!(layout.kind(), full.kind());
        assert_eq!(layout.machine(), full.machine());
        assert_eq!(layout.is_library(), full.is_library());
        assert_eq!(layout.is_interpreter(), full.is_interpreter());
        assert_eq!(layout.executable_ranges(), full.executable_ranges());
        assert!(!full.executable_ranges().is_empty());
    }
}

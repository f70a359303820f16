//! `stitch build` against real ELF files compiled here from C, one test per rejection.

use std::path::{Path, PathBuf};
use std::process::Command;

use stitch_build::{Assembler, BuildError, ScaffoldSpec, build, hex_spaced, scaffold};
use stitch_elf::ElfFile;
use stitch_format::{Displaced, Ecosystem, RelocKind, RelocTarget};

const LIB_C: &str = r#"
#include <stdlib.h>
#include <string.h>
int limit = 64;
__attribute__((noinline)) int helper(int x) { return x * 3; }
int check_len(int n) {
    int r = n + 1;
    if (n > 1000) r = helper(n);
    return r;
}
int calls_first(int n) { return helper(n) + 1; }
int loop_back(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += i;
    return s;
}
void *dup(const char *s) { return strdup(s); }
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    lib: PathBuf,
    bytes: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("demo.c");
    std::fs::write(&c, LIB_C).unwrap();
    let lib = dir.path().join("libdemo.so.1");
    let st = Command::new("gcc")
        .args([
            "-O0",
            "-fno-omit-frame-pointer",
            "-fcf-protection=none",
            "-shared",
            "-fPIC",
        ])
        .arg("-Wl,--build-id=sha1")
        .arg("-o")
        .arg(&lib)
        .arg(&c)
        .status()
        .expect("gcc must be installed to run these tests");
    assert!(st.success());
    let bytes = std::fs::read(&lib).unwrap();
    Fixture {
        _dir: dir,
        lib,
        bytes,
    }
}

impl Fixture {
    fn elf(&self) -> ElfFile<'_> {
        ElfFile::parse(&self.bytes).unwrap()
    }
    fn sym(&self, name: &str) -> u64 {
        self.elf().symbol(name).unwrap().vaddr
    }
    /// Whole instructions at `addr` covering at least `min` bytes.
    fn whole_insns(&self, addr: u64, min: usize) -> Vec<u8> {
        let code = self.elf().bytes_at(addr, 32).unwrap().to_vec();
        let mut out = Vec::new();
        for l in stitch_x86::disassemble(&code, addr) {
            out.extend(l.bytes);
            if out.len() >= min {
                break;
            }
        }
        out
    }
    fn toml(&self, patchlets: &str) -> String {
        let elf = self.elf();
        format!(
            r#"
id = "ST-2026-0001"
revision = 1
title = "Demo"
description = "test"
cve = ["CVE-2026-0001"]
severity = "high"
tier = "free"
author = "Test <t@example>"

[target]
module = "libdemo.so.1"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "libdemo1", version = "1.0" }}

[[import]]
name = "libc_abort"
module = "libc.so.6"
symbol = "abort"

{patchlets}
"#,
            hex::encode(stitch_elf::sha256(&self.bytes)),
            hex::encode(elf.build_id().unwrap()),
        )
    }
    fn build(&self, patchlets: &str) -> Result<stitch_format::Bundle, BuildError> {
        build(
            &self.toml(patchlets),
            Path::new("."),
            &self.bytes,
            &Assembler::default(),
        )
    }
    fn entry_patchlet(&self, func: &str, code: &str) -> String {
        let at = self.sym(func);
        format!(
            "[[patchlet]]\nname = \"p\"\nat = \"{func}\"\noriginal = \"{}\"\ndisplaced = \"before\"\ncode = '''\n{code}\n'''\n",
            hex_spaced(&self.whole_insns(at, 5))
        )
    }
}

fn code(r: Result<stitch_format::Bundle, BuildError>) -> &'static str {
    let e = r.expect_err("must be rejected");
    eprintln!("{e}");
    e.code()
}

#[test]
fn valid_patch_resolves_builtins_imports_and_module_symbols() {
    let f = fixture();
    let b = f
        .build(&f.entry_patchlet(
            "check_len",
            "cmp edi, 1000\n jle __stitch_resume\n stitch_hit\n call helper\n call libc_abort\n mov rax, [rip + limit]\n jmp __stitch_mod + 0x10",
        ))
        .unwrap();
    let p = &b.patch.patchlets[0];
    assert_eq!(p.at, f.sym("check_len"));
    assert_eq!(p.displaced, Displaced::Before);
    assert_eq!(p.resume, p.at + p.original.len() as u64);
    let targets: Vec<RelocTarget> = p.relocs.iter().map(|r| r.target).collect();
    assert!(targets.contains(&RelocTarget::Continue));
    assert!(targets.contains(&RelocTarget::HitCounter));
    assert!(targets.contains(&RelocTarget::Module(f.sym("helper"))));
    assert!(targets.contains(&RelocTarget::Import(0)));
    assert!(targets.contains(&RelocTarget::Module(f.sym("limit"))));
    assert!(targets.contains(&RelocTarget::Module(0)));
    assert!(p.relocs.iter().all(|r| r.kind == RelocKind::Pc32));
    assert_eq!(b.patch.imports[0].symbol, "abort");
}

#[test]
fn hash_mismatch_is_rejected() {
    let f = fixture();
    let mut bytes = f.bytes.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let r = build(
        &f.toml(&f.entry_patchlet("check_len", "nop")),
        Path::new("."),
        &bytes,
        &Assembler::default(),
    );
    assert_eq!(code(r), "build.hash_mismatch");
}

#[test]
fn buildid_mismatch_is_rejected() {
    let f = fixture();
    let real = hex::encode(f.elf().build_id().unwrap());
    let toml = f
        .toml(&f.entry_patchlet("check_len", "nop"))
        .replace(&real, &"00".repeat(20));
    let r = build(&toml, Path::new("."), &f.bytes, &Assembler::default());
    assert_eq!(code(r), "build.buildid_mismatch");
}

#[test]
fn original_bytes_mismatch_names_patchlet_address_and_bytes() {
    let f = fixture();
    let at = f.sym("check_len");
    let r = f.build(&format!(
        "[[patchlet]]\nname = \"p\"\nat = {at}\noriginal = \"90 90 90 90 90\"\ndisplaced = \"drop\"\ncode = \"nop\"\n"
    ));
    let e = r.unwrap_err();
    assert_eq!(e.code(), "build.original_mismatch");
    let msg = e.to_string();
    assert!(
        msg.contains("patchlet p") && msg.contains(&format!("{at:#x}")),
        "{msg}"
    );
    assert!(msg.contains("expected 90 90 90 90 90"), "{msg}");
}

#[test]
fn site_splits_instruction_is_rejected() {
    let f = fixture();
    let at = f.sym("check_len");
    let whole = f.whole_insns(at, 5);
    // Ask for one byte more than whole instructions: the next instruction is cut.
    let cut = f.elf().bytes_at(at, whole.len() + 1).unwrap().to_vec();
    let r = f.build(&format!(
        "[[patchlet]]\nname = \"p\"\nat = {at}\noriginal = \"{}\"\ndisplaced = \"drop\"\ncode = \"nop\"\n",
        hex_spaced(&cut)
    ));
    assert_eq!(code(r), "site.splits_instruction");
}

#[test]
fn call_not_last_is_rejected() {
    let f = fixture();
    // calls_first: find the call to helper and take it plus the next instruction.
    let start = f.sym("calls_first");
    let code_bytes = f.elf().bytes_at(start, 40).unwrap().to_vec();
    let lines = stitch_x86::disassemble(&code_bytes, start);
    let i = lines
        .iter()
        .position(|l| l.text.starts_with("call"))
        .unwrap();
    let mut bytes = lines[i].bytes.clone();
    bytes.extend(&lines[i + 1].bytes);
    let r = f.build(&format!(
        "[[patchlet]]\nname = \"p\"\nat = {}\noriginal = \"{}\"\ndisplaced = \"drop\"\ncode = \"nop\"\n",
        lines[i].addr,
        hex_spaced(&bytes)
    ));
    assert_eq!(code(r), "site.call_not_last");
}

#[test]
fn interior_branch_target_is_rejected() {
    let f = fixture();
    // loop_back has a backward branch to the loop head; a site starting just before the
    // loop head and covering it is entered from the middle.
    let start = f.sym("loop_back");
    let code_bytes = f.elf().bytes_at(start, 64).unwrap().to_vec();
    let lines = stitch_x86::disassemble(&code_bytes, start);
    let targets: Vec<u64> = lines
        .iter()
        .filter(|l| l.text.starts_with('j'))
        .filter_map(|l| u64::from_str_radix(l.text.split("0x").nth(1)?, 16).ok())
        .collect();
    // Find a window of whole instructions >= 5 bytes that strictly contains a branch target.
    for w in 0..lines.len() {
        let at = lines[w].addr;
        let mut bytes = Vec::new();
        for l in &lines[w..] {
            bytes.extend(&l.bytes);
            let end = at + bytes.len() as u64;
            if bytes.len() >= 5 {
                if targets.iter().any(|&t| t > at && t < end) {
                    if lines[w..]
                        .iter()
                        .take_while(|l| l.addr < end)
                        .any(|l| l.text.starts_with("call"))
                    {
                        break;
                    }
                    let r = f.build(&format!(
                        "[[patchlet]]\nname = \"p\"\nat = {at}\noriginal = \"{}\"\ndisplaced = \"drop\"\ncode = \"nop\"\n",
                        hex_spaced(&bytes)
                    ));
                    let c = code(r);
                    assert!(
                        c == "build.interior_branch" || c == "site.branch_into_site",
                        "{c}"
                    );
                    return;
                }
                break;
            }
        }
    }
    panic!("fixture has no loop head to test against");
}

#[test]
fn unknown_symbol_is_rejected() {
    let f = fixture();
    assert_eq!(
        code(f.build(&f.entry_patchlet("check_len", "call no_such_function"))),
        "build.unknown_symbol"
    );
    assert_eq!(
        code(f.build(&f.entry_patchlet("check_len", "jmp __stitch_typo"))),
        "build.unknown_symbol"
    );
}

#[test]
fn assembly_error_names_patchlet_and_code_line() {
    let f = fixture();
    let e = f
        .build(&f.entry_patchlet("check_len", "nop\nmov eax, [rip + ]"))
        .unwrap_err();
    assert_eq!(e.code(), "build.assembly_failed");
    assert!(e.to_string().contains("code line 2"), "{e}");
}

#[test]
fn data_section_in_patch_code_is_rejected() {
    let f = fixture();
    assert_eq!(
        code(f.build(&f.entry_patchlet("check_len", ".data\n.quad 1\n.text\nnop"))),
        "build.unsupported_section"
    );
}

#[test]
fn absolute_32bit_relocation_is_rejected() {
    let f = fixture();
    assert_eq!(
        code(f.build(&f.entry_patchlet("check_len", "mov eax, offset helper"))),
        "build.unsupported_relocation"
    );
}

#[test]
fn site_outside_executable_code_is_rejected() {
    let f = fixture();
    let at = f.sym("limit");
    let r = f.build(&format!(
        "[[patchlet]]\nname = \"p\"\nat = {at}\noriginal = \"40 00 00 00 00\"\ndisplaced = \"drop\"\ncode = \"nop\"\n"
    ));
    assert_eq!(code(r), "build.site_not_executable");
}

#[test]
fn unknown_field_in_source_is_rejected() {
    let f = fixture();
    let toml = f
        .toml(&f.entry_patchlet("check_len", "nop"))
        .replace("tier = ", "teir = \"x\"\ntier = ");
    let r = build(&toml, Path::new("."), &f.bytes, &Assembler::default());
    assert_eq!(code(r), "build.source_invalid");
}

#[test]
fn missing_assembler_is_a_clear_error() {
    let f = fixture();
    let r = build(
        &f.toml(&f.entry_patchlet("check_len", "nop")),
        Path::new("."),
        &f.bytes,
        &Assembler::new("/nonexistent/as"),
    );
    assert_eq!(code(r), "build.assembler_missing");
    let _ = &f.lib;
}

fn spec<'a>(location: &'a str, displaced: Displaced, cves: &'a [String]) -> ScaffoldSpec<'a> {
    ScaffoldSpec {
        id: "ST-2026-0100",
        module: "libdemo.so.1",
        location,
        min_len: 5,
        displaced,
        package: (Ecosystem::Deb, "libdemo1", "1.0"),
        cves,
        author: "Tester \"T\" <t@example>",
        patchlet: "entry",
    }
}

#[test]
fn scaffold_builds_as_written_for_every_displaced_mode_with_the_file_s_identity() {
    // A skeleton that does not build, or builds against other bytes than the author saw,
    // would teach the author to edit hashes and bytes by hand: exactly what must not happen.
    let f = fixture();
    let cves = vec!["CVE-2026-0100".to_string()];
    for mode in [Displaced::Before, Displaced::After, Displaced::Drop] {
        for location in ["check_len", "check_len+0x4"] {
            let s = scaffold(&f.bytes, &spec(location, mode, &cves)).expect("scaffold");
            assert!(s.original.len() >= 5);
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(&s.code_file), &s.asm).unwrap();
            let b = build(&s.toml, dir.path(), &f.bytes, &Assembler::default())
                .unwrap_or_else(|e| panic!("{location} {mode:?}: {e}\n{}", s.toml));
            let p = &b.patch;
            assert_eq!(p.target.sha256, stitch_elf::sha256(&f.bytes));
            assert_eq!(p.patchlets[0].at, s.at);
            assert_eq!(p.patchlets[0].original, s.original);
            assert_eq!(p.patchlets[0].displaced, mode);
            assert_eq!(p.cves, cves);
            assert_eq!(p.author, "Tester \"T\" <t@example>");
            assert!(
                p.title.starts_with("TODO"),
                "the author must write the title"
            );
        }
    }
    let drop = scaffold(&f.bytes, &spec("check_len", Displaced::Drop, &cves)).unwrap();
    assert!(
        drop.asm.contains("SKIPS"),
        "an empty drop patchlet is not harmless"
    );
}

#[test]
fn scaffold_refuses_a_site_that_stitch_build_would_refuse() {
    let f = fixture();
    let e = scaffold(&f.bytes, &spec("no_such_function", Displaced::Before, &[])).unwrap_err();
    assert_eq!(e.code(), "build.bad_address", "{e}");
    // loop_back's back edge lands on the loop head: a site starting just before it would be
    // entered in the middle, so some start in the function must be refused for that reason.
    let start = f.sym("loop_back");
    let code_bytes = f.elf().bytes_at(start, 64).unwrap().to_vec();
    let codes: Vec<&str> = stitch_x86::disassemble(&code_bytes, start)
        .iter()
        .filter_map(|l| {
            let at = format!("{:#x}", l.addr);
            scaffold(&f.bytes, &spec(&at, Displaced::Before, &[]))
                .err()
                .map(|e| e.code())
        })
        .collect();
    assert!(codes.contains(&"build.interior_branch"), "{codes:?}");
    let mut bad = spec("check_len", Displaced::Before, &[]);
    bad.patchlet = "../evil";
    assert_eq!(
        scaffold(&f.bytes, &bad).unwrap_err().code(),
        "build.source_invalid"
    );
}

#[test]
fn before_mode_whose_displaced_code_ends_in_jmp_is_rejected_as_unreachable() {
    // With displaced = "before" the patch code runs after the displaced instructions; if
    // those end in an unconditional jump, the patch silently does nothing.
    let f = fixture();
    let elf = f.elf();
    let (start, len) = elf.executable_ranges()[0];
    let code_bytes = elf.bytes_at(start, len as usize).unwrap().to_vec();
    let lines = stitch_x86::disassemble(&code_bytes, start);
    // The first run of whole instructions of >= 5 bytes that ends in a jmp or ret.
    let (at, bytes) = (0..lines.len())
        .find_map(|w| {
            let mut bytes = Vec::new();
            for l in &lines[w..] {
                bytes.extend(&l.bytes);
                if l.text.starts_with("call") {
                    return None;
                }
                if bytes.len() >= 5 {
                    let last = l.text.as_str();
                    return (last.starts_with("jmp") || last == "ret")
                        .then(|| (lines[w].addr, bytes));
                }
            }
            None
        })
        .expect("a jmp or ret site in the fixture");
    let patchlet = |mode: &str| {
        format!(
            "[[patchlet]]\nname = \"p\"\nat = {at}\noriginal = \"{}\"\ndisplaced = \"{mode}\"\ncode = \"nop\"\n",
            hex_spaced(&bytes)
        )
    };
    match f.build(&patchlet("before")) {
        Err(e) => assert_eq!(e.code(), "build.code_unreachable", "{e}"),
        // Only acceptable if the same site is refused for another reason in every mode.
        Ok(_) => panic!("a before-patchlet after {at:#x} can never run"),
    }
    let after = f.build(&patchlet("after"));
    assert!(
        !matches!(&after, Err(e) if e.code() == "build.code_unreachable"),
        "after-mode code runs first: {after:?}"
    );
}

//! The engine on real processes, one test per hazard.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use stitch_engine::{Engine, EngineError};
use stitch_format::{Bundle, SecretKey, TrustedKeys, VerifiedBundle};
use stitch_sys::Pid;

/// Target: reads numbers on stdin, answers compute(n) on stdout, forever.
const TARGET_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
__attribute__((noinline)) int other(int x) { return x * 2; }
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        int n = atoi(line);
        printf("%d %d\n", compute(n), other(n));
    }
    return 0;
}
"#;

fn can_trace() -> bool {
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        return true;
    }
    // Outside CI, skip (with a reason) where ptrace of children is not allowed.
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    if scope.trim() == "3" {
        eprintln!("SKIP: ptrace disabled (yama ptrace_scope=3)");
        return false;
    }
    true
}

struct Target {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    bytes: Vec<u8>,
}

fn compile(src: &str, flags: &[&str]) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("t.c");
    std::fs::write(&c, src).unwrap();
    let exe = dir.path().join("target");
    let st = Command::new("gcc")
        .args([
            "-O0",
            "-fno-omit-frame-pointer",
            "-fcf-protection=none",
            "-Wl,--build-id=sha1",
            "-pthread",
        ])
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .status()
        .expect("gcc");
    assert!(st.success());
    let bytes = std::fs::read(&exe).unwrap();
    Target {
        _dir: dir,
        exe,
        bytes,
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    fn start(exe: &Path) -> Running {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut r = Running {
            child,
            stdin,
            stdout,
        };
        // Make sure it is up (and its libraries mapped) before anyone patches it.
        assert!(!r.ask(1).is_empty(), "target answers");
        r
    }
    fn pid(&self) -> Pid {
        Pid(self.child.id() as i32)
    }
    fn ask(&mut self, n: i32) -> String {
        writeln!(self.stdin, "{n}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key() -> SecretKey {
    SecretKey::from_seed([5; 32])
}

fn trusted() -> TrustedKeys {
    let mut t = TrustedKeys::new();
    t.insert(key().public());
    t
}

/// Builds and signs a patch for `func` in `target` with the given code and displacement.
fn patch(target: &Target, id: &str, func: &str, displaced: &str, code: &str) -> VerifiedBundle {
    let elf = stitch_elf::ElfFile::parse(&target.bytes).unwrap();
    let at = elf.symbol(func).unwrap().vaddr;
    let mut original = Vec::new();
    for l in stitch_x86::disassemble(elf.bytes_at(at, 16).unwrap(), at) {
        original.extend(l.bytes);
        if original.len() >= 5 {
            break;
        }
    }
    let toml = format!(
        r#"id = "{id}"
revision = 1
title = "test"
severity = "low"
tier = "free"
author = "tests"
[target]
module = "target"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "t", version = "1" }}
[[patchlet]]
name = "p"
at = "{func}"
original = "{}"
displaced = "{displaced}"
code = '''
{code}
'''
"#,
        hex::encode(stitch_elf::sha256(&target.bytes)),
        hex::encode(elf.build_id().unwrap()),
        stitch_build::hex_spaced(&original),
    );
    let mut b =
        stitch_build::build(&toml, Path::new("."), &target.bytes, &Default::default()).unwrap();
    b.sign(&key()).unwrap();
    Bundle::decode_verified(&b.encode(), &trusted()).unwrap()
}

const RETURN_1000: &str = "stitch_hit\nmov eax, 1000\nret";

#[test]
fn apply_changes_behaviour_and_revert_restores_it_single_thread() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0001", "compute", "drop", RETURN_1000);

    let report = engine.apply(r.pid(), &b).unwrap();
    assert!(report.region_created);
    assert_eq!(r.ask(5), "1000 10");
    assert_eq!(r.ask(7), "1000 14");

    let listed = engine.list(r.pid()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].record.id, "ST-2026-0001");
    assert_eq!(
        listed[0].record.hits, 2,
        "two calls through the patch counted"
    );

    let rev = engine.revert(r.pid(), "ST-2026-0001").unwrap();
    assert_eq!(rev.hits, 2);
    assert_eq!(r.ask(5), "6 10");
    // The file on disk never changed.
    assert_eq!(std::fs::read(&t.exe).unwrap(), t.bytes);
}

#[test]
fn applying_twice_is_refused_already_applied() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0002", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &b).unwrap();
    let e = engine.apply(r.pid(), &b).unwrap_err();
    assert_eq!(e.code(), "engine.already_applied", "{e}");
    assert_eq!(r.ask(1), "1000 2");
}

#[test]
fn two_patches_on_one_module_reverted_in_either_order() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let engine = Engine::new();
    let a = patch(&t, "ST-2026-0003", "compute", "drop", RETURN_1000);
    let b = patch(&t, "ST-2026-0004", "other", "drop", "mov eax, 7\nret");
    for order in [
        ["ST-2026-0003", "ST-2026-0004"],
        ["ST-2026-0004", "ST-2026-0003"],
    ] {
        let mut r = Running::start(&t.exe);
        let ra = engine.apply(r.pid(), &a).unwrap();
        let rb = engine.apply(r.pid(), &b).unwrap();
        assert!(
            ra.region_created && !rb.region_created,
            "one region per module, reused"
        );
        assert_eq!(r.ask(3), "1000 7");
        engine.revert(r.pid(), order[0]).unwrap();
        let expect_mid = if order[0] == "ST-2026-0003" {
            "4 7"
        } else {
            "1000 6"
        };
        assert_eq!(r.ask(3), expect_mid);
        let last = engine.revert(r.pid(), order[1]).unwrap();
        assert_eq!(r.ask(3), "4 6");
        assert!(last.region_freed, "region unmapped once no patch is left");
    }
}

#[test]
fn displaced_before_runs_relocated_original_first() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    // The displaced prologue (push rbp; mov rbp, rsp; ...) runs first; the code then only
    // counts and falls through to the original function: behaviour unchanged, hits counted.
    let b = patch(&t, "ST-2026-0005", "compute", "before", "stitch_hit");
    engine.apply(r.pid(), &b).unwrap();
    assert_eq!(r.ask(41), "42 82");
    assert_eq!(engine.list(r.pid()).unwrap()[0].record.hits, 1);
}

#[test]
fn unexpected_bytes_in_memory_are_refused_and_nothing_changes() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let good = patch(&t, "ST-2026-0006", "compute", "drop", RETURN_1000);
    // Somebody else (another tool) changed the function in memory first.
    engine.apply(r.pid(), &good).unwrap();
    let other = patch(&t, "ST-2026-0007", "compute", "drop", "mov eax, 5\nret");
    let e = engine.apply(r.pid(), &other).unwrap_err();
    assert_eq!(e.code(), "engine.unexpected_bytes", "{e}");
    assert_eq!(r.ask(1), "1000 2");
}

#[test]
fn wrong_module_is_refused_module_not_mapped() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let other = compile(&TARGET_C.replace("x * 2", "x * 3"), &[]);
    let mut r = Running::start(&other.exe);
    let b = patch(&t, "ST-2026-0008", "compute", "drop", RETURN_1000);
    let e = Engine::new().apply(r.pid(), &b).unwrap_err();
    assert!(matches!(e, EngineError::ModuleNotMapped { .. }), "{e}");
    assert_eq!(r.ask(1), "2 3");
}

#[test]
fn non_pie_executable_is_patched() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &["-no-pie"]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    engine
        .apply(
            r.pid(),
            &patch(&t, "ST-2026-0009", "compute", "drop", RETURN_1000),
        )
        .unwrap();
    assert_eq!(r.ask(2), "1000 4");
}

#[test]
fn static_executable_is_patched() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &["-static"]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    engine
        .apply(
            r.pid(),
            &patch(&t, "ST-2026-0010", "compute", "drop", RETURN_1000),
        )
        .unwrap();
    assert_eq!(r.ask(2), "1000 4");
    engine.revert(r.pid(), "ST-2026-0010").unwrap();
    assert_eq!(r.ask(2), "3 4");
}

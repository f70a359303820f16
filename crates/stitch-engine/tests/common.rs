//! Helpers shared by the engine's tests: compile C fixtures, build and sign patches against
//! them, run targets that answer on stdin/stdout, and decide whether privileged tests run.

#![allow(dead_code, reason = "each test module uses a different subset")]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use stitch_format::{Bundle, SecretKey, TrustedKeys, VerifiedBundle};
use stitch_sys::Pid;

pub(crate) fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v == "true")
}

/// Skips (prints why, returns false) outside CI; fails in CI.
pub(crate) fn skip(reason: &str) -> bool {
    assert!(!in_ci(), "CI=true and this test cannot run: {reason}");
    eprintln!("SKIP: {reason}");
    false
}

/// Whether this process may ptrace its children.
pub(crate) fn can_trace() -> bool {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    if scope.trim() == "3" {
        return skip("ptrace disabled (yama ptrace_scope=3)");
    }
    true
}

/// Whether we are root (mount namespaces, chroot, tracing processes we did not start).
pub(crate) fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

pub(crate) fn need_root(what: &str) -> bool {
    if !can_trace() {
        return false;
    }
    if !is_root() {
        return skip(&format!("{what} needs root"));
    }
    true
}

pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) struct Target {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) exe: PathBuf,
    pub(crate) bytes: Vec<u8>,
}

/// Compiles `src` with gcc (frame pointers, no CET, a build-id) plus `flags`.
pub(crate) fn compile(src: &str, flags: &[&str]) -> Target {
    compile_named(src, flags, "target")
}

pub(crate) fn compile_named(src: &str, flags: &[&str], name: &str) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("t.c");
    std::fs::write(&c, src).unwrap();
    let exe = dir.path().join(name);
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
        .arg("-ldl")
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc failed");
    let bytes = std::fs::read(&exe).unwrap();
    Target { dir, exe, bytes }
}

pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: BufReader<ChildStdout>,
}

impl Running {
    pub(crate) fn start(exe: &Path) -> Running {
        Self::start_args(exe, &[])
    }
    pub(crate) fn start_args(exe: &Path, args: &[&str]) -> Running {
        let mut c = Command::new(exe);
        c.args(args);
        Self::spawn(c)
    }
    /// Spawns `cmd` with piped stdin/stdout and waits for its first answer.
    pub(crate) fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
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
        // Up, with its libraries mapped, before anyone patches it.
        assert!(!r.ask_str("1").is_empty(), "target answers");
        r
    }
    pub(crate) fn pid(&self) -> Pid {
        Pid(self.child.id() as i32)
    }
    pub(crate) fn ask(&mut self, n: i32) -> String {
        self.ask_str(&n.to_string())
    }
    pub(crate) fn ask_str(&mut self, line: &str) -> String {
        // One write(2) per line: `writeln!` may write the text and the newline separately,
        // and a target woken between the two reads a short line (which the restart tests
        // would take for a restart bug).
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        out.trim().to_string()
    }
    /// Numbers of a space-separated answer.
    pub(crate) fn ask_nums(&mut self, line: &str) -> Vec<i64> {
        let a = self.ask_str(line);
        a.split_whitespace()
            .map(|x| x.parse().unwrap_or_else(|_| panic!("bad answer {a:?}")))
            .collect()
    }
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn key() -> SecretKey {
    SecretKey::from_seed([5; 32])
}

pub(crate) fn trusted() -> TrustedKeys {
    let mut t = TrustedKeys::new();
    t.insert(key().public());
    t
}

/// The `at`/`original` of a site at `func`'s entry: whole instructions, at least 5 bytes.
pub(crate) fn entry_site(bytes: &[u8], func: &str) -> (u64, Vec<u8>) {
    let elf = stitch_elf::ElfFile::parse(bytes).unwrap();
    let at = elf
        .symbol(func)
        .unwrap_or_else(|| panic!("no {func}"))
        .vaddr;
    let mut original = Vec::new();
    for l in stitch_x86::disassemble(elf.bytes_at(at, 16).unwrap(), at) {
        original.extend(l.bytes);
        if original.len() >= 5 {
            break;
        }
    }
    (at, original)
}

/// Builds and signs a patch for `func` of module `bytes` (file name `module`).
pub(crate) fn patch_module(
    bytes: &[u8],
    module: &str,
    id: &str,
    func: &str,
    displaced: &str,
    code: &str,
) -> VerifiedBundle {
    patch_module_with(bytes, module, id, func, displaced, code, "")
}

/// [`patch_module`] with more TOML before the patchlet (`[[import]]` tables).
pub(crate) fn patch_module_with(
    bytes: &[u8],
    module: &str,
    id: &str,
    func: &str,
    displaced: &str,
    code: &str,
    extra: &str,
) -> VerifiedBundle {
    let elf = stitch_elf::ElfFile::parse(bytes).unwrap();
    let (_, original) = entry_site(bytes, func);
    let toml = format!(
        r#"id = "{id}"
revision = 1
title = "test"
severity = "low"
tier = "free"
author = "tests"
[target]
module = "{module}"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "t", version = "1" }}
{extra}
[[patchlet]]
name = "p"
at = "{func}"
original = "{}"
displaced = "{displaced}"
code = '''
{code}
'''
"#,
        hex::encode(stitch_elf::sha256(bytes)),
        hex::encode(elf.build_id().unwrap()),
        stitch_build::hex_spaced(&original),
    );
    let mut b = stitch_build::build(&toml, Path::new("."), bytes, &Default::default()).unwrap();
    b.sign(&key()).unwrap();
    Bundle::decode_verified(&b.encode(), &trusted()).unwrap()
}

/// Builds and signs a patch for `func` in the executable `target`.
pub(crate) fn patch(
    target: &Target,
    id: &str,
    func: &str,
    displaced: &str,
    code: &str,
) -> VerifiedBundle {
    patch_module(&target.bytes, "target", id, func, displaced, code)
}

/// Writes a signed bundle and its trusted key next to each other; returns (bundle, key file).
pub(crate) fn write_bundle(dir: &Path, b: &VerifiedBundle) -> (PathBuf, PathBuf) {
    let bundle = dir.join("patch.stitch");
    std::fs::write(&bundle, b.bundle().encode()).unwrap();
    let keys = dir.join("trusted.pub");
    std::fs::write(&keys, format!("{}\n", key().public().to_line())).unwrap();
    (bundle, keys)
}

/// Polls `f` until it returns Some, at most `max`.
pub(crate) fn wait_for<T>(max: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + max;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// State letter of a process (`R`, `S`, `T`, `t`, `Z`, ...).
pub(crate) fn proc_state(pid: Pid) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .unwrap_or('?')
}

pub(crate) const RETURN_1000: &str = "stitch_hit\nmov eax, 1000\nret";

/// compute(x) = x + 1; the spin patch makes it x + 1000.
pub(crate) const PLUS_1000: &str = "stitch_hit\nlea eax, [rdi + 1000]\nret";

//! The load-time hook on real programs, one test per hazard. They need root (fanotify
//! permission events, ptrace of processes we did not start): outside CI they skip with the
//! reason; with `CI=true` a missing privilege or tool fails them.
//!
//! The hook runs as its own process (`stitch-hookd`), as it will in the agent: a tracer must
//! not share a thread group with code that waits for the traced programs (a `waitpid` from
//! any thread of the tracer's process can consume the tracee's ptrace stops).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use stitch_format::SecretKey;

/// Hooks started with this hold libraries at their open and follow them syscall by syscall:
/// the path a file gets where the filesystem refuses `FAN_PRE_ACCESS` (tmpfs, overlayfs, ...)
/// and the only one in which a thread that merely opened a target is held (the hazards
/// tested with it need a hold that lasts).
const OPEN_HOLDS: &str = "--no-watch-mappings";

/// One hook at a time: holds compete for the same two cores, and timing matters.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The usual start of a test: can it run here (see [`can_run`]), then the hook to itself
/// and a fresh fixture directory.
fn setup(tools: &[&str]) -> Option<(MutexGuard<'static, ()>, Fixture)> {
    if !can_run(tools) {
        return None;
    }
    let s = serial();
    Some((s, Fixture::new()))
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v == "true")
}

/// Skips (or, in CI, fails) when the test cannot run here.
fn can_run(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // Effective uid 0, from /proc/self/status.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !root {
        missing.push("root (fanotify permission events need CAP_SYS_ADMIN)".to_string());
    }
    for t in tools.iter().chain(&["gcc"]) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(format!("the `{t}` command"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        !in_ci(),
        "CI=true but this test cannot run: needs {missing:?}"
    );
    eprintln!("SKIP: needs {}", missing.join(", "));
    false
}

const LIB_C: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int stitch_value(void) { return VALUE; }
__attribute__((constructor)) static void ctor(void) {
    printf("ctor %d\n", stitch_value());
    fflush(stdout);
}
int lib_value(void) { return stitch_value(); }
"#;

const MAIN_DYN_C: &str = r#"
#include <stdio.h>
int lib_value(void);
int main(void) { printf("main %d\n", lib_value()); return 0; }
"#;

const EXE_C: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int stitch_value(void) { return 1; }
__attribute__((constructor)) static void ctor(void) {
    printf("ctor %d\n", stitch_value());
    fflush(stdout);
}
int main(void) { printf("main %d\n", stitch_value()); return 0; }
"#;

/// Four threads; a worker thread dlopens the library while the others run.
const DLOPEN_MT_C: &str = r#"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static const char *lib;
static volatile int done;
static void *spin(void *a) { (void)a; while (!done) usleep(100); return 0; }
static void *loader(void *a) {
    (void)a;
    void *h = dlopen(lib, RTLD_NOW);
    if (!h) { printf("dlopen failed: %s\n", dlerror()); return 0; }
    int (*f)(void) = (int (*)(void))dlsym(h, "lib_value");
    printf("dlopen %d\n", f());
    fflush(stdout);
    return 0;
}
int main(int argc, char **argv) {
    (void)argc;
    lib = argv[1];
    pthread_t s[3], l;
    for (int i = 0; i < 3; i++) pthread_create(&s[i], 0, spin, 0);
    pthread_create(&l, 0, loader, 0);
    pthread_join(l, 0);
    done = 1;
    for (int i = 0; i < 3; i++) pthread_join(s[i], 0);
    return 0;
}
"#;

/// Reads one page of the file at an offset (argv[2]) and prints it in hex.
const PREAD_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    (void)argc;
    int fd = open(argv[1], O_RDONLY);
    unsigned char b[4096];
    if (pread(fd, b, sizeof b, atol(argv[2])) != sizeof b) return 1;
    for (int i = 0; i < 4096; i++) printf("%02x", b[i]);
    printf("\n");
    return 0;
}
"#;

/// Opens the library itself (a hold that lasts while it sleeps), closes it, then dlopens it
/// and answers lines from the terminal.
const SLOW_OPEN_C: &str = r#"
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    long ms = argc > 2 ? atol(argv[2]) : 0;
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    printf("opened\n");
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1) {}
    close(fd);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    int (*f)(void) = (int (*)(void))dlsym(h, "lib_value");
    printf("value %d\n", f());
    printf("type a line\n");
    char line[128];
    if (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        printf("got %s value %d\n", line, f());
    }
    return 0;
}
"#;

struct Fixture {
    dir: tempfile::TempDir,
    keys: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// A fixture whose files live in a new directory under `parent` (its filesystem matters:
    /// mapping events exist on some only).
    fn new_in(parent: &Path) -> Self {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let keys = dir.path().join("trusted.keys");
        std::fs::write(&keys, format!("{}\n", key().public().to_line())).unwrap();
        Self { dir, keys }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Compiles `src` to `out` (inside the fixture dir unless absolute).
    fn gcc(&self, src: &str, out: &str, flags: &[&str]) -> PathBuf {
        let c = self.path(&format!("{out}.c"));
        std::fs::write(&c, src).unwrap();
        let exe = self.path(out);
        let st = Command::new("gcc")
            .args(["-O0", "-fcf-protection=none", "-Wl,--build-id=sha1"])
            .args(flags.iter().filter(|f| !f.starts_with("-l")))
            .arg("-o")
            .arg(&exe)
            .arg(&c)
            .args(flags.iter().filter(|f| f.starts_with("-l")))
            .arg(format!("-L{}", self.dir.path().display()))
            .arg(format!("-Wl,-rpath,{}", self.dir.path().display()))
            .status()
            .expect("gcc");
        assert!(st.success(), "gcc {out}");
        exe
    }

    fn lib(&self, value: i32) -> PathBuf {
        self.gcc(
            LIB_C,
            "libtarget.so",
            &["-shared", "-fPIC", &format!("-DVALUE={value}")],
        )
    }

    /// A signed bundle that makes `stitch_value` in `target` return 1000.
    fn bundle(&self, target: &Path, id: &str) -> PathBuf {
        let bytes = std::fs::read(target).unwrap();
        let elf = stitch_elf::ElfFile::parse(&bytes).unwrap();
        let at = elf.symbol("stitch_value").unwrap().vaddr;
        let mut original = Vec::new();
        for l in stitch_x86::disassemble(elf.bytes_at(at, 16).unwrap(), at) {
            original.extend(l.bytes);
            if original.len() >= 5 {
                break;
            }
        }
        let module = target.file_name().unwrap().to_string_lossy();
        let toml = format!(
            r#"id = "{id}"
revision = 1
title = "load-time test"
severity = "low"
tier = "free"
author = "tests"
[target]
module = "{module}"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "t", version = "1" }}
[[patchlet]]
name = "p"
at = "stitch_value"
original = "{}"
displaced = "drop"
code = '''
stitch_hit
mov eax, 1000
ret
'''
"#,
            hex::encode(stitch_elf::sha256(&bytes)),
            hex::encode(elf.build_id().unwrap()),
            stitch_build::hex_spaced(&original),
        );
        let mut b = stitch_build::build(&toml, Path::new("."), &bytes, &Default::default())
            .expect("build bundle");
        b.sign(&key()).unwrap();
        let out = self.path(&format!("{id}.bundle"));
        std::fs::write(&out, b.encode()).unwrap();
        out
    }
}

fn key() -> SecretKey {
    SecretKey::from_seed([7; 32])
}

/// A running `stitch-hookd` and its event lines.
struct Hookd {
    child: Child,
    /// Its standard input, with `--control-stdin`.
    control: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<serde_json::Value>,
}

impl Hookd {
    fn start(fx: &Fixture, bundles: &[&Path], extra: &[&str]) -> Hookd {
        Self::start_with_env(fx, bundles, extra, &[])
    }

    fn start_with_env(
        fx: &Fixture,
        bundles: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Hookd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stitch-hookd"))
            .envs(env.iter().copied())
            .arg("--trusted-keys")
            .arg(&fx.keys)
            .arg("--no-standard-dirs")
            .arg("--dir")
            .arg(fx.dir.path())
            .args(extra)
            .args(bundles)
            .stdout(Stdio::piped())
            .stdin(if extra.contains(&"--control-stdin") {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("start stitch-hookd");
        let out = BufReader::new(child.stdout.take().unwrap());
        let control = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut h = Hookd {
            child,
            control,
            lines: rx,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match h.lines.recv_timeout(left) {
                Ok(l) if l == "ready" => break,
                Ok(l) => h.seen.push(serde_json::from_str(&l).unwrap()),
                Err(e) => panic!("stitch-hookd did not get ready: {e:?}"),
            }
        }
        h
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends one command line (needs `--control-stdin`).
    fn command(&mut self, line: &str) {
        use std::io::Write as _;
        let w = self.control.as_mut().expect("started with --control-stdin");
        writeln!(w, "{line}").unwrap();
        w.flush().unwrap();
    }

    /// Waits for one exact output line (not an event), collecting events meanwhile.
    fn wait_line(&mut self, want: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == want => return true,
                Ok(l) => {
                    if let Ok(v) = serde_json::from_str(&l) {
                        self.seen.push(v);
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Collects events until one matches `want` (or the timeout).
    fn wait_for(
        &mut self,
        timeout: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        if let Some(v) = self.seen.iter().find(|v| want(v)) {
            return Some(v.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                    self.seen.push(v.clone());
                    if want(&v) {
                        return Some(v);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Every event seen so far plus whatever arrives within `settle`.
    fn drain(&mut self, settle: Duration) -> Vec<serde_json::Value> {
        while let Ok(l) = self.lines.recv_timeout(settle) {
            self.seen.push(serde_json::from_str(&l).unwrap());
        }
        self.seen.clone()
    }
}

impl Drop for Hookd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event_is(v: &serde_json::Value, kind: &str, pid: u32) -> bool {
    v["event"] == kind && v["pid"] == pid
}

/// Runs a program to completion (bounded), returns (stdout, success).
fn run(cmd: &mut Command) -> (String, bool, u32) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let out = wait_bounded(child, Duration::from_secs(20));
    (out.0, out.1, pid)
}

fn wait_bounded(mut child: Child, limit: Duration) -> (String, bool) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut s = Vec::new();
            std::io::Read::read_to_end(child.stdout.as_mut().unwrap(), &mut s).unwrap();
            return (String::from_utf8_lossy(&s).into_owned(), st.success());
        }
        if Instant::now() > deadline {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", child.id()));
            let _ = child.kill();
            panic!("program hung: {state:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn executable_execed_after_the_hook_started_is_patched_before_its_constructor() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let exe = fx.gcc(EXE_C, "exe", &[]);
    let b = fx.bundle(&exe, "ST-2026-9001");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    // The second exec's plan comes from AT_PHDR on the new stack (the file's bytes are cached
    // by the first), checked under the stop against the maps.
    for round in 0..2 {
        let (out, ok, pid) = run(&mut Command::new(&exe));
        assert!(ok, "round {round}");
        assert_eq!(out, "ctor 1000\nmain 1000\n", "round {round}");
        let ev = h
            .wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
            .expect("patched event");
        assert_eq!(ev["kind"], "exec");
        assert_eq!(ev["patch"], "ST-2026-9001");
    }
}

/// A target executable used as a `#!` interpreter is opened by the exec of the *script*,
/// inside the kernel's exec, while it holds `cred_guard_mutex` — which `PTRACE_SEIZE` waits
/// for. The hazard: a hold that seizes it waits for the exec, which waits for the hold; the
/// script never started (before the seize bound, for ever). Now the open is allowed after a
/// few milliseconds (`SeizeBlocked`) and the interpreter is live-patched once the exec is
/// done; the same executable run directly is still patched at exec.
#[test]
fn target_run_as_a_script_interpreter_does_not_hang_the_script() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let exe = fx.gcc(EXE_C, "exe", &[]);
    let b = fx.bundle(&exe, "ST-2026-9033");
    let script = fx.path("script");
    std::fs::write(&script, format!("#!{}\n", exe.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let t0 = Instant::now();
    let (out, ok, pid) = run(&mut Command::new(&script));
    let took = t0.elapsed();
    assert!(ok, "{out}");
    assert!(out.ends_with('\n') && out.contains("main "), "{out}");
    eprintln!("script with a held interpreter: {took:?}");
    // Well under the 100 ms queue bound: the seize bound (3 ms) let it go.
    assert!(
        took < Duration::from_millis(80),
        "the script waited {took:?}"
    );
    let missed = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "missed", pid))
        .expect("reported as a miss");
    assert_eq!(missed["reason"], "SeizeBlocked", "{missed}");
    // Run directly, it is held at its exec as before.
    let (out, ok, pid) = run(&mut Command::new(&exe));
    assert!(ok);
    assert_eq!(out, "ctor 1000\nmain 1000\n");
    assert!(
        h.wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
            .is_some()
    );
}

#[test]
fn statically_linked_executable_is_patched_at_exec() {
    if !can_run(&[]) {
        return;
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        assert!(!in_ci(), "CI=true but libc6-dev's libc.a is missing");
        eprintln!("SKIP: no static libc (libc6-dev)");
        return;
    }
    let _s = serial();
    let fx = Fixture::new();
    let exe = fx.gcc(EXE_C, "exe_static", &["-static"]);
    let b = fx.bundle(&exe, "ST-2026-9002");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    // Twice: the second exec plans from AT_PHDR (see the test above).
    for round in 0..2 {
        let (out, ok, pid) = run(&mut Command::new(&exe));
        assert!(ok, "round {round}");
        assert_eq!(out, "ctor 1000\nmain 1000\n", "round {round}");
        assert!(
            h.wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
                .is_some(),
            "round {round}"
        );
    }
}

#[test]
fn library_linked_at_start_up_is_patched_before_its_constructor() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let main = fx.gcc(MAIN_DYN_C, "main_dyn", &["-ltarget"]);
    let b = fx.bundle(&lib, "ST-2026-9003");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let (out, ok, pid) = run(&mut Command::new(&main));
    assert!(ok);
    assert_eq!(out, "ctor 1000\nmain 1000\n");
    let ev = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
        .expect("patched event");
    assert_eq!(ev["kind"], "library");
}

#[test]
fn library_dlopened_from_a_worker_thread_of_a_multithreaded_process_is_patched() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(DLOPEN_MT_C, "dlopen_mt", &["-pthread", "-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9004");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib));
    assert!(ok);
    assert_eq!(out, "ctor 1000\ndlopen 1000\n");
    assert!(
        h.wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
            .is_some()
    );
}

#[test]
fn program_in_another_mount_namespace_is_patched() {
    let Some((_s, fx)) = setup(&["unshare", "mount"]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(DLOPEN_MT_C, "dlopen_mt", &["-pthread", "-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9005");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    // The library directory is seen under another path, in a private mount namespace.
    let other = tempfile::tempdir().unwrap();
    let script = format!(
        "mount --bind {} {} && exec {} {}/libtarget.so",
        fx.dir.path().display(),
        other.path().display(),
        prog.display(),
        other.path().display()
    );
    let (out, ok, _) = run(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert!(ok, "{out}");
    assert_eq!(out, "ctor 1000\ndlopen 1000\n");
    assert!(
        h.wait_for(Duration::from_secs(5), |v| v["event"] == "patched")
            .is_some()
    );
}

#[test]
fn file_merely_read_is_neither_hung_nor_patched() {
    let Some((_s, fx)) = setup(&["cat", "sha256sum"]) else {
        return;
    };
    let lib = fx.lib(1);
    let b = fx.bundle(&lib, "ST-2026-9006");
    let mut h = Hookd::start(&fx, &[&b], &[OPEN_HOLDS]);
    let t0 = Instant::now();
    let (_, ok, cat_pid) = run(Command::new("cat").arg(&lib));
    assert!(ok);
    let (sum, ok, sum_pid) = run(Command::new("sha256sum").arg(&lib));
    assert!(ok);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "reads were slowed down"
    );
    let expect = hex::encode(stitch_elf::sha256(&std::fs::read(&lib).unwrap()));
    assert!(sum.starts_with(&expect), "file unchanged");
    let events = h.drain(Duration::from_millis(300));
    for pid in [cat_pid, sum_pid] {
        assert!(!events.iter().any(|v| event_is(v, "patched", pid)));
        assert!(
            events.iter().any(|v| event_is(v, "skipped", pid)),
            "pid {pid}: {events:?}"
        );
    }
}

/// Whether the kernel reports mappings of `file` (`FAN_PRE_ACCESS`: Linux 6.14+, on
/// filesystems that allow it). Where it does not, the hook holds libraries at their open.
fn mapping_events_available(file: &Path) -> bool {
    let Ok(group) = stitch_sys::PermissionGroup::new() else {
        return false;
    };
    let f = std::fs::File::open(file).unwrap();
    group
        .mark_inode(std::os::fd::AsFd::as_fd(&f), stitch_sys::FAN_PRE_ACCESS)
        .is_ok()
}

/// Skips (fails in CI, whose machine has them) without mapping events for `file`.
fn needs_mapping_events(file: &Path) -> bool {
    if mapping_events_available(file) {
        return true;
    }
    assert!(
        !in_ci(),
        "CI=true but FAN_PRE_ACCESS is refused for {}",
        file.display()
    );
    eprintln!("SKIP: needs FAN_PRE_ACCESS (Linux 6.14+, ext4/xfs/btrfs)");
    false
}

/// The first executable `PT_LOAD` of an ELF file.
fn code_segment(path: &Path) -> stitch_elf::LoadSegment {
    let bytes = std::fs::read(path).unwrap();
    stitch_elf::ElfFile::parse_layout(&bytes)
        .unwrap()
        .load_segments()
        .iter()
        .find(|s| s.executable)
        .copied()
        .unwrap()
}

/// [`setup`] for a test of mapping holds: also the fixture's target library, and `None`
/// (skipped, or failed in CI) where the kernel or its filesystem reports no mappings.
fn setup_mapping(tools: &[&str]) -> Option<(MutexGuard<'static, ()>, Fixture, PathBuf)> {
    let (s, fx) = setup(tools)?;
    let lib = fx.lib(1);
    needs_mapping_events(&lib).then_some((s, fx, lib))
}

/// Where the kernel reports mappings, opening a target holds nothing — a program keeping it
/// open is not traced meanwhile — and a load is held once, right after the `mmap` of its code:
/// no syscall followed, patched before its constructor.
#[test]
fn library_is_held_at_its_code_mapping_not_at_its_open() {
    let Some((_s, fx, lib)) = setup_mapping(&[]) else {
        return;
    };
    let prog = fx.gcc(SLOW_OPEN_C, "slow_open", &["-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9030");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let marked = h.seen.iter().find(|v| v["event"] == "marked").unwrap();
    assert_eq!(marked["held_at"], "mapping", "{marked}");
    let mut child = Command::new(&prog)
        .arg(&lib)
        .arg("400")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "opened\n");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(tracer_of(pid as i32), 0, "an open alone is not held");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        rest.starts_with("ctor 1000\nvalue 1000\n"),
        "patched before its constructor: {rest}"
    );
    let ev = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
        .expect("patched event");
    assert_eq!(ev["kind"], "library");
    assert_eq!(ev["syscalls"], 0, "held at the mapping, nothing followed");
}

/// Where the kernel reports mappings, reads are answered without a hold — except one that
/// starts exactly where the code does, which is stopped once after it and let go untouched
/// (a read, not a mapping): the reader gets the file's bytes, nothing is patched.
#[test]
fn read_of_the_code_offset_is_let_go_untouched_and_other_reads_are_not_held() {
    let Some((_s, fx, lib)) = setup_mapping(&["cat", "sha256sum"]) else {
        return;
    };
    let bytes = std::fs::read(&lib).unwrap();
    let code = code_segment(&lib).offset & !0xfff;
    let prog = fx.gcc(PREAD_C, "pread_at", &[]);
    let b = fx.bundle(&lib, "ST-2026-9031");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib).arg(code.to_string()));
    assert!(ok, "{out}");
    let want: String = bytes[code as usize..code as usize + 4096]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(out.trim(), want, "the file's own bytes");
    let (_, ok, cat_pid) = run(Command::new("cat").arg(&lib));
    assert!(ok);
    let (sum, ok, sum_pid) = run(Command::new("sha256sum").arg(&lib));
    assert!(ok);
    assert!(sum.starts_with(&hex::encode(stitch_elf::sha256(&bytes))));
    let events = h.drain(Duration::from_millis(300));
    let skipped = events
        .iter()
        .find(|v| event_is(v, "skipped", pid))
        .unwrap_or_else(|| panic!("the read at the code offset: {events:?}"));
    assert_eq!(skipped["reason"], "NotMappedExecutable");
    for p in [pid, cat_pid, sum_pid] {
        assert!(!events.iter().any(|v| event_is(v, "patched", p)));
    }
    for p in [cat_pid, sum_pid] {
        assert!(
            !events.iter().any(|v| v["pid"] == p),
            "whole-file reads start elsewhere: never held ({events:?})"
        );
    }
}

/// A library linked with its code at file offset 0 (`-z noseparate-code`, what toolchains
/// before binutils 2.31 made — most libraries of an old distribution) is mapped by ld.so's
/// first `mmap`, which covers the whole span: that is the one held. The loader's header read
/// starts at the same offset; it must not be held too (a second stop per load, reported
/// as skipped).
#[test]
fn library_with_its_code_at_offset_zero_is_held_once_at_its_first_mapping() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let src =
        format!("{LIB_C}\nvoid stitch_padding(void) {{ __asm__(\".fill 12288, 1, 0x90\"); }}\n");
    let lib = fx.gcc(
        &src,
        "libtarget.so",
        &["-shared", "-fPIC", "-DVALUE=1", "-Wl,-z,noseparate-code"],
    );
    let code = code_segment(&lib);
    assert_eq!(code.offset, 0, "code at offset 0: {code:?}");
    assert!(
        code.filesz > 8192,
        "more than the header read covers: {code:?}"
    );
    if !needs_mapping_events(&lib) {
        return;
    }
    let prog = fx.gcc(DLOPEN_MT_C, "dlopen_mt", &["-pthread", "-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9034");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib));
    assert!(ok);
    assert_eq!(out, "ctor 1000\ndlopen 1000\n");
    let events = h.drain(Duration::from_millis(300));
    let mine: Vec<_> = events.iter().filter(|v| v["pid"] == pid).collect();
    assert_eq!(mine.len(), 1, "one hold, patched: {mine:?}");
    assert_eq!(mine[0]["event"], "patched");
    assert_eq!(mine[0]["syscalls"], 0);
}

/// The hook SIGKILLed at each step of a load-time commit in a mapping hold (the engine's kill
/// points: the hold is over in well under a millisecond, too short to hit from outside). The
/// program must run on — no stray SIGTRAP, no hang — with its library either patched or not
/// at all: its constructor and its caller see the same value.
#[test]
fn hook_killed_at_each_step_of_a_mapping_hold_leaves_the_program_whole() {
    let Some((_s, fx, lib)) = setup_mapping(&[]) else {
        return;
    };
    let prog = fx.gcc(DLOPEN_MT_C, "dlopen_mt", &["-pthread", "-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9035");
    let mut killed = Vec::new();
    for step in stitch_engine::KILL_POINTS
        .iter()
        .filter(|s| !s.starts_with("revert"))
    {
        let mut h = Hookd::start_with_env(
            &fx,
            &[&b],
            &["--no-live-patch"],
            &[(stitch_engine::KILL_AT_ENV, step)],
        );
        let (out, ok, _) = run(Command::new(&prog).arg(&lib));
        assert!(ok, "{step}: the program failed: {out:?}");
        assert!(
            out == "ctor 1\ndlopen 1\n" || out == "ctor 1000\ndlopen 1000\n",
            "{step}: half patched: {out:?}"
        );
        // Killed there, or the step is not on a load-time commit's path (then it patched).
        let deadline = Instant::now() + Duration::from_secs(3);
        let status = loop {
            if let Some(st) = h.child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match status {
            Some(st) => {
                assert_eq!(
                    std::os::unix::process::ExitStatusExt::signal(&st),
                    Some(9),
                    "{step}: the hook died otherwise: {st:?}"
                );
                killed.push(*step);
            }
            None => assert_eq!(out, "ctor 1000\ndlopen 1000\n", "{step} not reached"),
        }
    }
    // The commit's own steps, at least: the region mapped, trampolines, sites, marked.
    for step in [
        "region_mapped",
        "trampolines_written",
        "sites_written",
        "marked_applied",
    ] {
        assert!(killed.contains(&step), "{step} never reached: {killed:?}");
    }
}

/// A filesystem without mapping events (tmpfs here) gets the open hold: the load is still
/// patched before its constructor, followed syscall by syscall from the open.
#[test]
fn library_on_a_filesystem_without_mapping_events_is_held_at_its_open() {
    if !can_run(&[]) {
        return;
    }
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        assert!(!in_ci(), "CI=true but there is no /dev/shm");
        eprintln!("SKIP: needs a tmpfs at /dev/shm");
        return;
    }
    let _s = serial();
    let fx = Fixture::new_in(shm);
    let lib = fx.lib(1);
    assert!(
        !mapping_events_available(&lib),
        "tmpfs was expected to refuse FAN_PRE_ACCESS; pick another filesystem for this test"
    );
    let prog = fx.gcc(DLOPEN_MT_C, "dlopen_mt", &["-pthread", "-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9032");
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let marked = h.seen.iter().find(|v| v["event"] == "marked").unwrap();
    assert_eq!(marked["held_at"], "open", "{marked}");
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib));
    assert!(ok);
    assert_eq!(out, "ctor 1000\ndlopen 1000\n");
    let ev = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
        .expect("patched event");
    assert!(
        ev["syscalls"].as_u64().unwrap_or(0) > 0,
        "followed from the open: {ev}"
    );
}

/// A package manager writing a marked file is not a load: let go at once, nothing patched,
/// the write goes through.
#[test]
fn file_opened_for_writing_is_let_go_and_reported_as_skipped() {
    let Some((_s, fx)) = setup(&["sh"]) else {
        return;
    };
    let lib = fx.lib(1);
    let b = fx.bundle(&lib, "ST-2026-9019");
    let mut h = Hookd::start(&fx, &[&b], &[OPEN_HOLDS]);
    let before = std::fs::read(&lib).unwrap();
    // `>>` opens O_WRONLY|O_APPEND; nothing is written.
    let (_, ok, pid) = run(Command::new("sh")
        .arg("-c")
        .arg(format!(": >> {}", lib.display())));
    assert!(ok);
    assert_eq!(std::fs::read(&lib).unwrap(), before);
    let ev = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "skipped", pid))
        .expect("skipped event");
    assert_eq!(ev["reason"], "OpenedForWriting", "{ev}");
    assert!(
        !h.drain(Duration::from_millis(100))
            .iter()
            .any(|v| event_is(v, "patched", pid))
    );
}

#[test]
fn target_under_strace_is_allowed_and_reported() {
    let Some((_s, fx)) = setup(&["strace"]) else {
        return;
    };
    let lib = fx.lib(1);
    let main = fx.gcc(MAIN_DYN_C, "main_dyn", &["-ltarget"]);
    let b = fx.bundle(&lib, "ST-2026-9007");
    let mut h = Hookd::start(&fx, &[&b], &["--no-live-patch"]);
    let (out, ok, _) = run(Command::new("strace")
        .args(["-f", "-o", "/dev/null"])
        .arg(&main));
    assert!(ok);
    assert_eq!(out, "ctor 1\nmain 1\n", "runs unpatched");
    let ev = h
        .wait_for(Duration::from_secs(5), |v| v["event"] == "missed")
        .expect("miss reported");
    assert!(
        ev["reason"].as_str().unwrap().contains("AlreadyTraced"),
        "{ev}"
    );
}

#[test]
fn file_replaced_by_another_build_then_vulnerable_build_restored_marks_follow() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let vulnerable = std::fs::read(&lib).unwrap();
    let main = fx.gcc(MAIN_DYN_C, "main_dyn", &["-ltarget"]);
    let b = fx.bundle(&lib, "ST-2026-9008");
    // Build the "fixed" library elsewhere, then rename it over the target (as dpkg does).
    let fixed_dir = Fixture::new();
    let fixed = fixed_dir.lib(2);
    let mut h = Hookd::start(&fx, &[&b], &[]);
    let swap = |bytes: &[u8]| {
        let tmp = fx.path("libtarget.so.dpkg-new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &lib).unwrap();
    };
    swap(&std::fs::read(&fixed).unwrap());
    assert!(
        h.wait_for(Duration::from_secs(5), |v| v["event"] == "unmarked")
            .is_some(),
        "old inode unmarked"
    );
    let (out, ok, pid) = run(&mut Command::new(&main));
    assert!(ok);
    assert_eq!(out, "ctor 2\nmain 2\n", "fixed build runs as is");
    let events = h.drain(Duration::from_millis(200));
    assert!(!events.iter().any(|v| event_is(v, "patched", pid)));
    let marks_before = events.iter().filter(|v| v["event"] == "marked").count();

    swap(&vulnerable);
    assert!(
        h.wait_for(Duration::from_secs(5), |v| { v["event"] == "marked" })
            .is_some()
    );
    let again =
        |h: &mut Hookd| h.seen.iter().filter(|v| v["event"] == "marked").count() > marks_before;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !again(&mut h) && Instant::now() < deadline {
        h.drain(Duration::from_millis(50));
    }
    assert!(again(&mut h), "restored vulnerable build marked again");
    let (out, ok, pid) = run(&mut Command::new(&main));
    assert!(ok);
    assert_eq!(out, "ctor 1000\nmain 1000\n");
    assert!(
        h.wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
            .is_some()
    );
}

#[test]
fn hook_killed_during_a_hold_lets_the_program_run_unpatched_without_hanging() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(SLOW_OPEN_C, "slow_open", &["-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9009");
    // An open hold: it lasts while the program sleeps with the file open (a mapping hold is
    // over in well under a millisecond).
    let h = Hookd::start(&fx, &[&b], &[OPEN_HOLDS, "--hold-timeout-ms", "10000"]);
    let child = Command::new(&prog)
        .arg(&lib)
        .arg("800")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the hook holds it (TracerPid is the hook), then SIGKILL the hook.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let traced = st
            .lines()
            .find(|l| l.starts_with("TracerPid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) != Some("0"));
        if traced {
            break;
        }
        assert!(Instant::now() < deadline, "the hook never held the program");
        std::thread::sleep(Duration::from_millis(2));
    }
    let hook_pid = h.pid();
    let _ = Command::new("kill")
        .args(["-KILL", &hook_pid.to_string()])
        .status();
    let (out, ok) = wait_bounded(child, Duration::from_secs(10));
    assert!(ok);
    assert!(out.contains("value 1\n"), "runs unpatched: {out}");
}

/// Opens the library by hand, keeps it open for `argv[2]` ms (the hold follows it), then
/// maps the whole file executable from that descriptor — the mapping a hold waits for.
const OPEN_SLEEP_MAP_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    long ms = atol(argv[2]);
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 2;
    struct stat st;
    fstat(fd, &st);
    printf("opened\n");
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1) {}
    void *p = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return 3;
    printf("mapped\n");
    return 0;
}
"#;

/// The hazard behind the stop order: a hold still running when the hook is stopped reaches
/// its commit, and the engine then opens the marked file (its first read of the module's ELF
/// headers) — a permission event only the hook's reader can answer. If the reader were
/// stopped before the workers, that open would wait forever, `Hook::stop` would hang, and the
/// held program would stay stopped.
#[test]
fn hook_stopped_during_a_hold_still_lets_the_held_program_finish() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(OPEN_SLEEP_MAP_C, "open_sleep_map", &[]);
    let b = fx.bundle(&lib, "ST-2026-9013");
    let mut h = Hookd::start(
        &fx,
        &[&b],
        &[OPEN_HOLDS, "--control-stdin", "--hold-timeout-ms", "10000"],
    );
    let child = Command::new(&prog)
        .arg(&lib)
        .arg("600")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while tgid_of(tracer_of(pid)) != h.pid() {
        assert!(Instant::now() < deadline, "the hook never held the program");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Stop while the hold waits for the mapping (the program sleeps ~600 ms).
    let t0 = Instant::now();
    h.command("stop");
    let (out, ok) = wait_bounded(child, Duration::from_secs(10));
    assert!(ok, "{out}");
    assert_eq!(out, "opened\nmapped\n");
    assert!(
        h.wait_line("stopped", Duration::from_secs(10)),
        "Hook::stop returned"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t0.elapsed()
    );
    assert_eq!(tracer_of(pid), 0);
    // The hold did reach its commit after the stop was asked for (so the engine's own open of
    // the marked file was answered), and reported it.
    assert!(
        h.seen
            .iter()
            .any(|v| v["pid"] == pid && (v["event"] == "patched" || v["event"] == "missed")),
        "{:?}",
        h.seen
    );
}

/// `voluntary_ctxt_switches + nonvoluntary_ctxt_switches` of every thread of `pid`.
fn context_switches(pid: i32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let n: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.push((format!("{}:{name}", t.file_name().to_string_lossy()), n));
    }
    out.sort();
    out
}

/// An idle agent must cost nothing: no thread of an idle hook wakes up on a timer (it used to
/// poll a stop flag every 100 ms per thread).
#[test]
fn idle_hook_threads_never_wake_up() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let b = fx.bundle(&lib, "ST-2026-9014");
    let h = Hookd::start(&fx, &[&b], &[]);
    std::thread::sleep(Duration::from_millis(300));
    let before = context_switches(h.pid());
    std::thread::sleep(Duration::from_millis(1500));
    let after = context_switches(h.pid());
    assert_eq!(before.len(), after.len(), "{before:?} {after:?}");
    let woke: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0.clone(), b.1 - a.1))
        .collect();
    assert!(woke.is_empty(), "threads woke up while idle: {woke:?}");
}

/// A second target library (`libtwo.so`, value 2) and a program linked against it.
fn second_target(fx: &Fixture) -> (PathBuf, PathBuf) {
    let lib = fx.gcc(LIB_C, "libtwo.so", &["-shared", "-fPIC", "-DVALUE=2"]);
    let main = fx.gcc(MAIN_DYN_C, "main_two", &["-ltwo"]);
    (lib, main)
}

fn bundles_cmd(h: &mut Hookd, bundles: &[&Path]) -> serde_json::Value {
    let paths: Vec<String> = bundles.iter().map(|b| b.display().to_string()).collect();
    h.command(&format!("bundles {}", paths.join(" ")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = h
            .lines
            .recv_timeout(left)
            .expect("an answer to the bundles command");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        h.seen.push(v.clone());
        if v["event"] == "bundles" {
            assert!(v["error"].is_null(), "{v}");
            return v;
        }
    }
}

#[test]
fn bundles_changed_on_a_running_hook_mark_new_targets_and_unmark_dropped_ones() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib_a = fx.lib(1);
    let main_a = fx.gcc(MAIN_DYN_C, "main_dyn", &["-ltarget"]);
    let (lib_b, main_b) = second_target(&fx);
    let a = fx.bundle(&lib_a, "ST-2026-9015");
    let b = fx.bundle(&lib_b, "ST-2026-9016");
    let mut h = Hookd::start(&fx, &[&a], &["--control-stdin", "--no-live-patch"]);
    let out_of = |main: &Path| run(&mut Command::new(main)).0;
    assert_eq!(out_of(&main_a), "ctor 1000\nmain 1000\n");
    assert_eq!(out_of(&main_b), "ctor 2\nmain 2\n", "B not hooked yet");

    let u = bundles_cmd(&mut h, &[&a, &b]);
    assert_eq!(
        (
            u["marked"].as_u64(),
            u["unmarked"].as_u64(),
            u["kept"].as_u64()
        ),
        (Some(1), Some(0), Some(1)),
        "{u}"
    );
    assert_eq!(
        out_of(&main_b),
        "ctor 1000\nmain 1000\n",
        "B patched at load"
    );
    assert_eq!(out_of(&main_a), "ctor 1000\nmain 1000\n", "A still patched");

    let u = bundles_cmd(&mut h, &[&b]);
    assert_eq!(
        (
            u["marked"].as_u64(),
            u["unmarked"].as_u64(),
            u["kept"].as_u64()
        ),
        (Some(0), Some(1), Some(1)),
        "{u}"
    );
    assert_eq!(
        out_of(&main_a),
        "ctor 1\nmain 1\n",
        "A dropped: not patched"
    );
    assert_eq!(out_of(&main_b), "ctor 1000\nmain 1000\n");

    let u = bundles_cmd(&mut h, &[]);
    assert_eq!(u["unmarked"].as_u64(), Some(1), "{u}");
    assert_eq!(out_of(&main_b), "ctor 2\nmain 2\n", "no bundle left");
    let events = h.drain(Duration::from_millis(100));
    let unmarked: Vec<_> = events
        .iter()
        .filter(|v| v["event"] == "unmarked")
        .map(|v| v["path"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        unmarked,
        [lib_a.display().to_string(), lib_b.display().to_string()]
    );
}

/// The hazard of changing bundles by restarting the hook (or by unmarking and marking again):
/// a load of a target that stays hooked, in that moment, runs unpatched.
#[test]
fn unchanged_target_stays_held_while_bundles_change() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib_a = fx.lib(1);
    let main_a = fx.gcc(MAIN_DYN_C, "main_dyn", &["-ltarget"]);
    let (lib_b, _) = second_target(&fx);
    let a = fx.bundle(&lib_a, "ST-2026-9017");
    let b = fx.bundle(&lib_b, "ST-2026-9018");
    let mut h = Hookd::start(&fx, &[&a], &["--control-stdin", "--no-live-patch"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runner = {
        let (stop, main_a) = (stop.clone(), main_a.clone());
        std::thread::spawn(move || {
            let mut outs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                outs.push(run(&mut Command::new(&main_a)).0);
            }
            outs
        })
    };
    for i in 0..20 {
        let set: &[&Path] = if i % 2 == 0 { &[&a, &b] } else { &[&a] };
        let u = bundles_cmd(&mut h, set);
        assert_eq!(u["kept"].as_u64(), Some(1), "{u}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let outs = runner.join().unwrap();
    assert!(outs.len() >= 5, "only {} runs", outs.len());
    for o in &outs {
        assert_eq!(o, "ctor 1000\nmain 1000\n", "a load of A went unpatched");
    }
    let events = h.drain(Duration::from_millis(100));
    let a_path = lib_a.display().to_string();
    assert!(
        !events
            .iter()
            .any(|v| v["event"] == "unmarked" && v["path"] == a_path.as_str()),
        "A was unmarked on the way"
    );
    assert!(!events.iter().any(|v| v["event"] == "missed"), "{events:?}");
}

/// A tracer arms a hardware breakpoint (DR0 = `f`, DR7 = local enable) on a child that calls
/// `f` every 20 ms, then (mode 0) exits while tracing it, (1) detaches, or (2) clears DR7 and
/// detaches. Prints how the child ended.
const DEBUGREG_C: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>
__attribute__((noinline)) void f(void) { __asm__ volatile(""); }
int main(int argc, char **argv) {
    int mode = atoi(argv[1]);
    pid_t child = fork();
    if (child == 0) {
        for (int i = 0; i < 25; i++) { usleep(20000); f(); }
        _exit(0);
    }
    pid_t tracer = fork();
    if (tracer == 0) {
        if (ptrace(PTRACE_SEIZE, child, 0, 0) < 0) _exit(1);
        ptrace(PTRACE_INTERRUPT, child, 0, 0);
        int st;
        waitpid(child, &st, __WALL);
        if (ptrace(PTRACE_POKEUSER, child, offsetof(struct user, u_debugreg[0]), (void *)f) < 0
            || ptrace(PTRACE_POKEUSER, child, offsetof(struct user, u_debugreg[7]), (void *)1) < 0)
            _exit(2);
        if (mode == 2) ptrace(PTRACE_POKEUSER, child, offsetof(struct user, u_debugreg[7]), 0);
        if (mode >= 1) ptrace(PTRACE_DETACH, child, 0, 0);
        else ptrace(PTRACE_CONT, child, 0, 0);
        _exit(0);
    }
    int st;
    waitpid(tracer, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("tracer failed\n"); return 1; }
    waitpid(child, &st, 0);
    if (WIFSIGNALED(st)) printf("killed %d\n", WTERMSIG(st));
    else printf("exited %d\n", WEXITSTATUS(st));
    return 0;
}
"#;

/// Why holds step syscalls instead of arming a hardware breakpoint on ld.so's
/// `_dl_debug_state` (2-3 stops instead of ~10): the thread would have to *run* with DR7
/// armed to reach the breakpoint, and if the hook died then (SIGKILL, OOM, crash), neither the
/// tracer's exit nor a detach clears the debug registers — the breakpoint fires untraced, the
/// SIGTRAP kills the program. Fail open would become fail dead. Only clearing DR7 under a
/// ptrace-stop disarms it, and a dead hook cannot do that. If this test ever fails, the kernel
/// started clearing debug registers on detach and the breakpoint can be reconsidered.
#[test]
fn debug_registers_survive_tracer_exit_and_detach_so_holds_never_arm_them() {
    if !can_run(&[]) {
        return;
    }
    let fx = Fixture::new();
    let prog = fx.gcc(DEBUGREG_C, "debugreg", &[]);
    let ended = |mode: &str| run(Command::new(&prog).arg(mode)).0;
    assert_eq!(
        ended("0"),
        "killed 5\n",
        "tracer exited with DR7 armed: SIGTRAP kills"
    );
    assert_eq!(
        ended("1"),
        "killed 5\n",
        "detached with DR7 armed: SIGTRAP kills"
    );
    assert_eq!(
        ended("2"),
        "exited 0\n",
        "DR7 cleared under the stop, then detached"
    );
}

/// The hazard of returning from a bundle change while a hold that started with a removed
/// bundle is still running: the caller (the agent disabling a patch) would believe it is no
/// longer applied anywhere, and then the hold applies it. `set_bundles` returns only after
/// that hold ended.
#[test]
fn bundles_change_returns_only_after_holds_with_removed_bundles_ended() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(OPEN_SLEEP_MAP_C, "open_sleep_map", &[]);
    let b = fx.bundle(&lib, "ST-2026-9020");
    let mut h = Hookd::start(
        &fx,
        &[&b],
        &[
            OPEN_HOLDS,
            "--control-stdin",
            "--no-live-patch",
            "--hold-timeout-ms",
            "10000",
        ],
    );
    let child = Command::new(&prog)
        .arg(&lib)
        .arg("600")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while tgid_of(tracer_of(pid)) != h.pid() {
        assert!(Instant::now() < deadline, "the hook never held the program");
        std::thread::sleep(Duration::from_millis(2));
    }
    let t0 = Instant::now();
    let u = bundles_cmd(&mut h, &[]);
    let waited = t0.elapsed();
    assert_eq!(u["unmarked"].as_u64(), Some(1), "{u}");
    let (out, ok) = wait_bounded(child, Duration::from_secs(10));
    assert!(ok && out == "opened\nmapped\n", "{out}");
    // The program sleeps 600 ms inside the hold: an answer much sooner means the change did
    // not wait for it.
    assert!(
        waited >= Duration::from_millis(300),
        "set_bundles returned after {waited:?}, while the hold was still running"
    );
    let outcome = h.wait_for(Duration::from_secs(5), |v| {
        v["pid"] == pid
            && (v["event"] == "patched" || v["event"] == "missed" || v["event"] == "skipped")
    });
    assert!(outcome.is_some(), "the hold's outcome: {:?}", h.seen);
}

/// A thread keeps another target (`argv[2]`) open for 150 ms while the main thread dlopens the
/// first one (`argv[1]`): two holds in one process at once.
const SIBLING_HOLD_C: &str = r#"
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
static const char *other;
static volatile int opened;
static void *reader(void *a) {
    (void)a;
    int fd = open(other, O_RDONLY | O_CLOEXEC);
    opened = 1;
    struct timespec ts = { 0, 150 * 1000000L };
    while (nanosleep(&ts, &ts) == -1) {}
    char b[64];
    if (read(fd, b, sizeof b) < 0) return 0;
    close(fd);
    return 0;
}
int main(int argc, char **argv) {
    (void)argc;
    setvbuf(stdout, NULL, _IOLBF, 0);
    other = argv[2];
    pthread_t t;
    pthread_create(&t, 0, reader, 0);
    while (!opened) usleep(1000);
    usleep(20000);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    int (*f)(void) = (int (*)(void))dlsym(h, "lib_value");
    printf("dlopen %d\n", f());
    pthread_join(t, 0);
    return 0;
}
"#;

/// Two threads of one process held at once by two workers: the dlopen's commit must stop the
/// other thread, which the other worker traces (one tracer per thread). It used to fail, the
/// library ran unpatched and the load was reported as a miss; now the commit waits for the
/// sibling's hold to end.
#[test]
fn library_dlopened_while_a_sibling_thread_holds_another_target_open_is_patched() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib_a = fx.lib(1);
    let (lib_b, _) = second_target(&fx);
    let prog = fx.gcc(SIBLING_HOLD_C, "sibling_hold", &["-pthread", "-ldl"]);
    let a = fx.bundle(&lib_a, "ST-2026-9021");
    let b = fx.bundle(&lib_b, "ST-2026-9022");
    let mut h = Hookd::start(
        &fx,
        &[&a, &b],
        &[OPEN_HOLDS, "--no-live-patch", "--hold-timeout-ms", "2000"],
    );
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib_a).arg(&lib_b));
    assert!(ok, "{out}");
    assert_eq!(
        out, "ctor 1000\ndlopen 1000\n",
        "patched before its constructor"
    );
    let patched = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
        .expect("patched event");
    assert_eq!(patched["patch"], "ST-2026-9021");
    let skipped = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "skipped", pid))
        .expect("the sibling's read reported");
    assert_eq!(skipped["reason"], "NotMappedExecutable", "{skipped}");
    assert!(
        !h.drain(Duration::from_millis(100))
            .iter()
            .any(|v| event_is(v, "missed", pid)),
        "{:?}",
        h.seen
    );
}

/// As `SIBLING_HOLD_C`, but the thread then maps its target executable itself (a loader other
/// than ld.so): two loads held at once in one process.
const SIBLING_LOAD_C: &str = r#"
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
static const char *other;
static volatile int opened;
static void *loader(void *a) {
    (void)a;
    int fd = open(other, O_RDONLY | O_CLOEXEC);
    struct stat st;
    fstat(fd, &st);
    opened = 1;
    struct timespec ts = { 0, 150 * 1000000L };
    while (nanosleep(&ts, &ts) == -1) {}
    void *p = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    printf("mapped %d\n", p != MAP_FAILED);
    return 0;
}
int main(int argc, char **argv) {
    (void)argc;
    setvbuf(stdout, NULL, _IOLBF, 0);
    other = argv[2];
    pthread_t t;
    pthread_create(&t, 0, loader, 0);
    while (!opened) usleep(1000);
    usleep(20000);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    pthread_join(t, 0);
    int (*f)(void) = (int (*)(void))dlsym(h, "lib_value");
    printf("dlopen %d\n", f());
    return 0;
}
"#;

/// Two loads held at once in one process, each waiting to stop the process for its commit:
/// if both waited for the other's hold to end, both would run into the hold bound and both
/// loads would go unpatched. The second to get there gives way (`OtherThreadHeld`, its
/// load is live-patched later), the first commits.
#[test]
fn two_threads_loading_two_targets_at_once_do_not_wait_for_each_other() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib_a = fx.lib(1);
    let (lib_b, _) = second_target(&fx);
    let prog = fx.gcc(SIBLING_LOAD_C, "sibling_load", &["-pthread", "-ldl"]);
    let a = fx.bundle(&lib_a, "ST-2026-9023");
    let b = fx.bundle(&lib_b, "ST-2026-9024");
    let mut h = Hookd::start(
        &fx,
        &[&a, &b],
        &[OPEN_HOLDS, "--no-live-patch", "--hold-timeout-ms", "5000"],
    );
    let t0 = Instant::now();
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib_a).arg(&lib_b));
    let took = t0.elapsed();
    assert!(ok, "{out}");
    assert!(
        took < Duration::from_secs(2),
        "the holds waited for each other: {took:?}"
    );
    assert!(
        out.ends_with("dlopen 1000\n"),
        "the dlopen was patched: {out}"
    );
    assert!(
        h.wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid)
            && v["patch"] == "ST-2026-9023")
            .is_some()
    );
    let missed = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "missed", pid))
        .expect("the other load reported");
    assert_eq!(missed["reason"], "OtherThreadHeld", "{missed}");
}

/// A lane's reader and workers live on the lane's CPU; an exec hold moves its worker to the
/// CPU the exec ended on for its commit, when that is another. The hazard: a worker left off
/// its lane after the hold (its lane's library holds would then wake another CPU at every
/// stop), or any other thread of the hook confined to one CPU.
#[test]
fn hold_workers_get_their_cpu_affinity_back_after_a_hold() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let main = fx.gcc(MAIN_DYN_C, "main_dyn", &["-ltarget"]);
    let b = fx.bundle(&lib, "ST-2026-9025");
    let exe = fx.gcc(EXE_C, "exe", &[]);
    let e = fx.bundle(&exe, "ST-2026-9026");
    let mut h = Hookd::start(&fx, &[&b, &e], &[]);
    let hook_pid = h.pid();
    let allowed = |tid: &str| {
        std::fs::read_to_string(format!("/proc/{hook_pid}/task/{tid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let whole = allowed(&hook_pid.to_string());
    for i in 0..6 {
        // Library holds and exec holds (pinned for their commit) alternate.
        let prog = if i % 2 == 0 { &main } else { &exe };
        let (out, ok, pid) = run(&mut Command::new(prog));
        assert!(ok && out == "ctor 1000\nmain 1000\n", "{out}");
        assert!(
            h.wait_for(Duration::from_secs(5), |v| event_is(v, "patched", pid))
                .is_some()
        );
    }
    for t in std::fs::read_dir(format!("/proc/{}/task", h.pid()))
        .unwrap()
        .flatten()
    {
        let tid = t.file_name().to_string_lossy().into_owned();
        // Readers and workers are pinned for life to their lane's CPU (a worker's is in its
        // name, stitch-hold-LANE-I; a reader's is cut off the 15-byte comm); nothing else is.
        let comm = std::fs::read_to_string(format!("/proc/{hook_pid}/task/{tid}/comm"))
            .unwrap_or_default();
        let name = comm.trim();
        if name.starts_with("stitch-fanotify") {
            assert!(!allowed(&tid).contains([',', '-']), "a reader on one CPU");
        } else if let Some(rest) = name.strip_prefix("stitch-hold-") {
            let lane = rest.split('-').next().unwrap_or("");
            assert_eq!(allowed(&tid), lane, "worker {name} off its lane");
        } else {
            assert_eq!(allowed(&tid), whole, "thread {name} ({tid}) left pinned");
        }
    }
}

/// A configured directory that does not exist when the hook starts (a container root created
/// later) is walked and watched by a rescan: a target copied into it afterwards is marked. The
/// hazard: a rescan whose new watches were dropped right away (it used a throwaway inotify
/// instance), so later copies went unmarked.
#[test]
fn directory_created_after_start_is_watched_after_a_rescan() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let b = fx.bundle(&lib, "ST-2026-9027");
    let other = tempfile::tempdir().unwrap();
    let later = other.path().join("later");
    let later_arg = later.display().to_string();
    let mut h = Hookd::start(&fx, &[&b], &["--control-stdin", "--dir", &later_arg]);
    std::fs::create_dir(&later).unwrap();
    h.command("rescan");
    assert!(
        h.wait_for(Duration::from_secs(10), |v| v["event"] == "rescanned")
            .is_some()
    );
    let copy = later.join("libtarget-copy.so");
    std::fs::copy(&lib, &copy).unwrap();
    let copy_path = copy.display().to_string();
    assert!(
        h.wait_for(Duration::from_secs(5), |v| v["event"] == "marked"
            && v["path"] == copy_path.as_str())
            .is_some(),
        "copy not marked: {:?}",
        h.seen
    );
}

/// dlopen, call, dlclose, dlopen again (mapped again, usually at the same address).
const DLOPEN_TWICE_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
    (void)argc;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < 2; i++) {
        void *h = dlopen(argv[1], RTLD_NOW);
        if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
        int (*f)(void) = (int (*)(void))dlsym(h, "lib_value");
        printf("load %d: %d\n", i, f());
        dlclose(h);
    }
    return 0;
}
"#;

/// A library unloaded and loaded again in the same process: the second load must be patched
/// before its constructor too. The hazard: the engine's record of the first patch lives on in
/// its region after the unload and could make the second load look already patched (it would
/// run unpatched, reported as a miss).
#[test]
fn library_dlclosed_and_dlopened_again_is_patched_again() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(DLOPEN_TWICE_C, "dlopen_twice", &["-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9028");
    let mut h = Hookd::start(&fx, &[&b], &["--no-live-patch"]);
    let (out, ok, pid) = run(Command::new(&prog).arg(&lib));
    assert!(ok, "{out}");
    assert_eq!(out, "ctor 1000\nload 0: 1000\nctor 1000\nload 1: 1000\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    let patched = |h: &Hookd| {
        h.seen
            .iter()
            .filter(|v| event_is(v, "patched", pid))
            .count()
    };
    while patched(&h) < 2 && Instant::now() < deadline {
        h.drain(Duration::from_millis(50));
    }
    assert_eq!(patched(&h), 2, "{:?}", h.seen);
    assert!(!h.seen.iter().any(|v| event_is(v, "missed", pid)));
}

/// The newest process whose `comm` is `name`.
fn pid_of(name: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .max()
}

/// The process of a thread.
fn tgid_of(tid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `TracerPid` of a process (a thread id; 0: none).
fn tracer_of(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs in a real bash inside tmux.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start() -> Tmux {
        let session = format!("stitch-hook-{}", std::process::id());
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "40"])
            .args(["bash", "--norc", "--noprofile", "-i"])
            .env("PS1", "$ ")
            .status()
            .unwrap();
        assert!(st.success());
        Tmux { session }
    }
    fn keys(&self, keys: &[&str]) {
        let st = Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .unwrap();
        assert!(st.success());
    }
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn wait_screen(&self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if s.contains(what) {
                return s;
            }
            assert!(Instant::now() < deadline, "waiting for {what:?} on:\n{s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

/// `jobs` prints nothing: the shell saw no stop and has no job left.
fn assert_jobs_empty(t: &Tmux) {
    t.keys(&["jobs; echo END$((40+2))", "Enter"]);
    let s = t.wait_screen("END42", Duration::from_secs(5));
    let after = s.rsplit("echo END$((40+2))").next().unwrap_or("");
    assert!(
        after.trim_start().starts_with("END42"),
        "jobs not empty:\n{s}"
    );
}

#[test]
fn interactive_program_in_tmux_keeps_job_control_and_terminal_input() {
    let Some((_s, fx)) = setup(&["tmux", "bash"]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(SLOW_OPEN_C, "slow_open", &["-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9010");
    let mut h = Hookd::start(&fx, &[&b], &["--hold-timeout-ms", "10000"]);
    let t = Tmux::start();
    t.keys(&[&format!("{} {} 0", prog.display(), lib.display()), "Enter"]);
    t.wait_screen("type a line", Duration::from_secs(10));
    t.keys(&["hello", "Enter"]);
    let s = t.wait_screen("got hello value 1000", Duration::from_secs(10));
    assert!(!s.contains("Stopped"), "{s}");
    assert_jobs_empty(&t);
    assert!(
        h.wait_for(Duration::from_secs(5), |v| v["event"] == "patched")
            .is_some()
    );
}

#[test]
fn ctrl_z_during_a_hold_keeps_job_control_right() {
    let Some((_s, fx)) = setup(&["tmux", "bash"]) else {
        return;
    };
    let lib = fx.lib(1);
    let prog = fx.gcc(SLOW_OPEN_C, "slow_open", &["-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9011");
    let mut h = Hookd::start(&fx, &[&b], &[OPEN_HOLDS, "--hold-timeout-ms", "20000"]);
    let t = Tmux::start();
    // The program holds the library open for 1.5 s: the hook follows it the whole time.
    t.keys(&[
        &format!("{} {} 1500", prog.display(), lib.display()),
        "Enter",
    ]);
    t.wait_screen("opened", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let pid = pid_of("slow_open").expect("program running");
    assert_eq!(
        tgid_of(tracer_of(pid)),
        h.pid(),
        "the hook holds it when Ctrl-Z is pressed"
    );
    t.keys(&["C-z"]);
    let s = t.wait_screen("Stopped", Duration::from_secs(5));
    assert!(!s.contains("type a line"), "stopped for real:\n{s}");
    t.keys(&["jobs; echo END$((40+1))", "Enter"]);
    let s = t.wait_screen("END41", Duration::from_secs(5));
    let after = s.rsplit("echo END$((40+1))").next().unwrap_or("");
    assert!(after.contains("Stopped"), "jobs shows it stopped:\n{s}");
    // Still stopped a while later (the hold did not let it run).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!t.screen().contains("type a line"));
    t.keys(&["fg", "Enter"]);
    t.wait_screen("type a line", Duration::from_secs(10));
    t.keys(&["hi", "Enter"]);
    t.wait_screen("got hi value 1000", Duration::from_secs(10));
    assert_jobs_empty(&t);
    assert!(
        h.wait_for(Duration::from_secs(5), |v| v["event"] == "patched")
            .is_some()
    );
}

/// `State:` letter of a process (`R`, `S`, `D`, `T`, `t`, ...).
fn state_of(pid: i32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .unwrap_or('?')
}

/// Ctrl-Z pressed while a library is held at its code mapping — a hold of a few hundred
/// microseconds, stretched to 1.5 s by `STITCH_TEST_HOLD_PAUSE` at each of its two phases:
/// the thread still blocked in the kernel on its unanswered event (the signal waits there:
/// the wait is killable only), and the thread in our stop right after its `mmap` (the signal
/// waits for our resume). The hazards: the stop swallowed (the shell never sees `Stopped`),
/// the program run on while the shell believes it stopped, a stop reported twice, or the
/// hold given up (library unpatched) because a signal came in between.
#[test]
fn ctrl_z_during_a_mapping_hold_stops_the_job_once_and_the_library_is_patched() {
    let Some((_s, fx, lib)) = setup_mapping(&["tmux", "bash"]) else {
        return;
    };
    let prog = fx.gcc(SLOW_OPEN_C, "slow_open", &["-ldl"]);
    let b = fx.bundle(&lib, "ST-2026-9040");
    for (n, point) in ["before_seize", "stopped"].into_iter().enumerate() {
        let pause = format!("{point}:1500");
        let mut h = Hookd::start_with_env(
            &fx,
            &[&b],
            &["--hold-timeout-ms", "20000"],
            &[("STITCH_TEST_HOLD_PAUSE", &pause)],
        );
        let t = Tmux::start();
        t.keys(&[&format!("{} {} 0", prog.display(), lib.display()), "Enter"]);
        t.wait_screen("opened", Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
        let pid = pid_of("slow_open").expect("program running");
        // Inside the hold: blocked in the kernel on the event (`D`, no tracer yet), or in our
        // stop (`t`, traced by the hook).
        if point == "before_seize" {
            assert_eq!(state_of(pid), 'D', "{point}: blocked on its event");
            assert_eq!(tracer_of(pid), 0, "{point}: not seized yet");
        } else {
            assert_eq!(state_of(pid), 't', "{point}: in our stop");
            assert_eq!(
                tgid_of(tracer_of(pid)),
                h.pid(),
                "{point}: held by the hook"
            );
        }
        t.keys(&["C-z"]);
        // The hold ends (patched), then the stop takes effect: the shell sees it once.
        let ev = h
            .wait_for(Duration::from_secs(10), |v| {
                event_is(v, "patched", pid.cast_unsigned())
            })
            .unwrap_or_else(|| panic!("{point}: the library was patched despite the Ctrl-Z"));
        assert_eq!(ev["syscalls"], 0, "{point}: held at the mapping");
        let s = t.wait_screen("Stopped", Duration::from_secs(5));
        assert!(
            !s.contains("value"),
            "{point}: stopped before it ran on:\n{s}"
        );
        assert_eq!(s.matches("Stopped").count(), 1, "{point}: one stop:\n{s}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(state_of(pid), 'T', "{point}: a plain job-control stop");
        assert_eq!(tracer_of(pid), 0, "{point}: let go");
        let marker = format!("END{}", 50 + n);
        t.keys(&[&format!("jobs; echo END$((50+{n}))"), "Enter"]);
        let s = t.wait_screen(&marker, Duration::from_secs(5));
        let after = s
            .rsplit(&format!("echo END$((50+{n}))"))
            .next()
            .unwrap_or("");
        assert!(
            after.contains("Stopped"),
            "{point}: jobs shows it stopped:\n{s}"
        );
        assert!(!t.screen().contains("value"), "{point}: still stopped");
        t.keys(&["fg", "Enter"]);
        t.wait_screen("type a line", Duration::from_secs(10));
        let s = t.screen();
        assert!(
            s.contains("ctor 1000") && s.contains("value 1000"),
            "{point}: {s}"
        );
        t.keys(&["hi", "Enter"]);
        t.wait_screen("got hi value 1000", Duration::from_secs(10));
        assert_jobs_empty(&t);
        drop(t);
        drop(h);
    }
}

/// Sleeps before `main` prints, so a live patch right after the exec is visible.
const EXE_SLOW_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) int stitch_value(void) { return 1; }
int main(void) {
    usleep(500 * 1000);
    printf("main %d\n", stitch_value());
    return 0;
}
"#;

#[test]
fn exec_without_exec_holds_as_on_kernels_before_6_8_is_allowed_unheld_then_live_patched() {
    let Some((_s, fx)) = setup(&[]) else {
        return;
    };
    let exe = fx.gcc(EXE_SLOW_C, "exe_slow", &[]);
    let b = fx.bundle(&exe, "ST-2026-9012");
    // The fallback the hook takes by itself on kernels < 6.8 (exec open under
    // cred_guard_mutex): never seize an exec'ing thread.
    let mut h = Hookd::start(&fx, &[&b], &["--no-exec-holds"]);
    let (out, ok, pid) = run(&mut Command::new(&exe));
    assert!(ok);
    assert_eq!(out, "main 1000\n", "live-patched right after the exec");
    let miss = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "missed", pid))
        .expect("miss reported");
    assert!(miss["reason"].as_str().unwrap().contains("ExecNotHeld"));
    let live = h
        .wait_for(Duration::from_secs(5), |v| event_is(v, "live_patched", pid))
        .expect("live patch reported");
    assert_eq!(live["ok"], true, "{live}");
}

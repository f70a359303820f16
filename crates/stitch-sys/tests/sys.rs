//! Hazard tests for stitch-sys: real processes compiled from `tests/c/*.c` at test time, and
//! the fake tracer. Tests that need gcc or ptrace permission print `SKIP <test>: <why>` and
//! return when those are missing — except with `CI=true`, where they fail instead.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use stitch_sys::procfs;
use stitch_sys::{
    CallKind, FakeProcess, FakeRegion, FakeThread, FakeThreadState, FakeTracer, Perms, Pid,
    Placement, StopKind, SysError, TaskState, Tid, stop_all, stop_all_with,
};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether the test may run; prints the skip reason (or fails under CI=true).
fn may_run(test: &str, env: &Result<(), String>) -> bool {
    match env {
        Ok(()) => true,
        Err(why) if in_ci() => panic!("{test}: CI=true forbids skipping: {why}"),
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            false
        }
    }
}

/// gcc present and ptrace permitted (probed once on a `sleep` child).
fn real_env() -> &'static Result<(), String> {
    static ENV: OnceLock<Result<(), String>> = OnceLock::new();
    ENV.get_or_init(|| {
        match Command::new("gcc").arg("--version").output() {
            Ok(o) if o.status.success() => {}
            _ => return Err("gcc is not installed".into()),
        }
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .map_err(|e| format!("cannot spawn sleep: {e}"))?;
        let pid = Pid(child.id() as i32);
        // Stopping it mid-exec would (correctly) report sys.execed: wait for the exec.
        let end = Instant::now() + Duration::from_secs(5);
        while !procfs::process_state(pid).is_ok_and(|s| s.comm == "sleep") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        let probe =
            stop_all(pid, Instant::now() + Duration::from_secs(2)).and_then(|sp| sp.resume());
        let _ = child.kill();
        let _ = child.wait();
        match probe {
            Ok(()) => Ok(()),
            Err(e) if e.code() == "sys.permission_denied" => Err(format!(
                "no ptrace permission (need root or CAP_SYS_PTRACE): {e}"
            )),
            Err(e) => Err(format!("ptrace probe failed: {e} ({})", e.code())),
        }
    })
}

macro_rules! need_real {
    ($name:expr) => {
        if !may_run($name, real_env()) {
            return;
        }
    };
}

/// Compiles `tests/c/NAME.c` once per test run into the target's temp dir.
fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stitch-sys-c");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let status = Command::new("gcc")
        .args(["-O1", "-g0", "-pthread", "-Wall", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed for {}", src.display());
    std::fs::rename(&tmp, &out).expect("rename binary");
    built.insert(name.into(), out.clone());
    out
}

/// A spawned target whose stdout lines arrive on a channel; killed on drop.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    also_kill: Vec<Pid>,
}

impl Target {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn target");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            also_kill: Vec::new(),
        }
    }

    fn run(name: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(binary(name));
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Waits for a line matching `pred`.
    fn expect(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "timed out waiting for {what}; output so far: {:?}",
                    self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("target exited before {what}; output: {:?}", self.seen)
                }
            }
        }
    }

    /// Reads `pid=N` then `ready`.
    fn ready(&mut self) -> Pid {
        let line = self.expect("pid=", Duration::from_secs(10), |l| l.starts_with("pid="));
        let pid = Pid(line[4..].trim().parse().expect("pid"));
        self.expect("ready", Duration::from_secs(10), |l| l == "ready");
        pid
    }

    fn write_stdin(&mut self, data: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(data).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for pid in &self.also_kill {
            kill(*pid, "KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kill(pid: Pid, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.0.to_string())
        .status();
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// (tid, state, TracerPid) of every thread.
fn thread_states(pid: Pid) -> Vec<(Tid, TaskState, i32)> {
    procfs::list_threads(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| {
            procfs::task_info(pid, t)
                .ok()
                .map(|i| (t, i.state, i.tracer_pid))
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After release: no thread traced or in a tracing stop.
fn assert_released(pid: Pid) {
    wait_until("every thread is released", Duration::from_secs(2), || {
        thread_states(pid)
            .iter()
            .all(|&(_, st, tracer)| tracer == 0 && st != TaskState::TracingStop)
    });
}

fn cpu_ticks(pid: Pid) -> u64 {
    procfs::process_state(pid)
        .map(|s| s.utime + s.stime)
        .unwrap_or(0)
}

fn sig_blocked(pid: Pid, tid: Tid) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
    procfs::parse_status(&text)
        .expect("parse status")
        .sig_blocked
}

const PROT_RX: i32 = libc::PROT_READ | libc::PROT_EXEC;

// ---------------------------------------------------------------------------------------------
// Real processes
// ---------------------------------------------------------------------------------------------

#[test]
fn single_thread_is_held_stepped_run_briefly_and_released() {
    need_real!("single_thread_is_held_stepped_run_briefly_and_released");
    let mut t = Target::run("spin", &["0"]);
    let pid = t.ready();
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    assert_eq!(sp.tids(), vec![pid.leader()]);
    let regs = sp.thread(pid.leader()).expect("leader").regs;
    let maps = sp.mappings().expect("maps");
    assert!(
        maps.iter().any(|m| m.perms.exec && m.contains(regs.rip)),
        "rip {:#x} not in an executable mapping",
        regs.rip
    );
    assert_eq!(thread_states(pid)[0].1, TaskState::TracingStop);
    // Held: the CPU time must not move.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(cpu_ticks(pid), before, "a held process consumed CPU");

    let stepped = sp.single_step(pid.leader()).expect("single step");
    assert_ne!(stepped.rip, regs.rip, "single step did not move rip");
    let ran = sp
        .run_thread_briefly(pid.leader(), Duration::from_millis(5))
        .expect("run briefly");
    assert!(ran.is_some());
    assert_eq!(
        thread_states(pid)[0].1,
        TaskState::TracingStop,
        "not held again after the brief run"
    );
    sp.resume().expect("resume");
    assert_released(pid);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        cpu_ticks(pid) > before,
        "the process does not run after resume"
    );
}

#[test]
fn sixty_four_spinning_threads_are_all_held_then_all_released() {
    need_real!("sixty_four_spinning_threads_are_all_held_then_all_released");
    let mut t = Target::run("spin", &["63"]);
    let pid = t.ready();
    let sp = stop_all(pid, deadline(10)).expect("stop_all");
    assert_eq!(sp.tids().len(), 64, "not every thread is held");
    let me = stitch_sys::gettid();
    let states = thread_states(pid);
    assert_eq!(states.len(), 64);
    for (tid, st, tracer) in states {
        assert_eq!(st, TaskState::TracingStop, "thread {tid} not stopped");
        assert_eq!(tracer, me, "thread {tid} not traced by us");
    }
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(cpu_ticks(pid), before, "a held thread consumed CPU");
    sp.resume().expect("resume");
    assert_released(pid);
}

#[test]
fn blocked_read_nanosleep_and_futex_complete_correctly_after_remote_syscalls() {
    need_real!("blocked_read_nanosleep_and_futex_complete_correctly_after_remote_syscalls");
    let mut t = Target::run("blocked", &[]);
    let pid = t.ready();
    std::thread::sleep(Duration::from_millis(100)); // let every thread block
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    let threads: Vec<_> = sp.threads().cloned().collect();
    assert_eq!(threads.len(), 4);
    let nr = |t: &stitch_sys::StoppedThread| t.regs.in_syscall();
    assert!(
        threads
            .iter()
            .any(|t| nr(t) == Some(libc::SYS_read) && t.regs.restart_pending().is_some()),
        "{threads:#?}"
    );
    assert!(
        threads.iter().any(|t| matches!(
            nr(t),
            Some(libc::SYS_nanosleep | libc::SYS_clock_nanosleep)
        ) && t.regs.restart_pending()
            == Some(stitch_sys::SyscallRestart::RestartBlock)),
        "{threads:#?}"
    );
    assert!(
        threads.iter().any(|t| nr(t) == Some(libc::SYS_futex)),
        "{threads:#?}"
    );
    // Inject an mmap + munmap into *each* blocked thread: the hard case for restart handling.
    for th in &threads {
        let mask_before = sig_blocked(pid, th.tid);
        let addr = sp
            .remote_syscall_in(
                th.tid,
                libc::SYS_mmap,
                &[
                    0,
                    4096,
                    libc::PROT_READ as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                    u64::MAX,
                    0,
                ],
            )
            .expect("remote mmap");
        assert!(addr > 0, "mmap in thread {} returned {addr}", th.tid);
        let r = sp
            .remote_syscall_in(th.tid, libc::SYS_munmap, &[addr.cast_unsigned(), 4096])
            .expect("remote munmap");
        assert_eq!(r, 0);
        assert_eq!(
            sp.refresh_regs(th.tid).expect("regs"),
            th.regs,
            "registers of {} not restored",
            th.tid
        );
        assert_eq!(
            sig_blocked(pid, th.tid),
            mask_before,
            "signal mask of {} not restored",
            th.tid
        );
    }
    // Keep it held a while: the sleeper's deadline keeps running meanwhile.
    std::thread::sleep(Duration::from_millis(200));
    sp.resume().expect("resume");
    assert_released(pid);
    std::thread::sleep(Duration::from_millis(100));
    t.write_stdin(b"hello\n");
    t.expect("read:hello", Duration::from_secs(5), |l| l == "read:hello");
    let slept = t.expect("slept:", Duration::from_secs(5), |l| {
        l.starts_with("slept:")
    });
    t.expect("done", Duration::from_secs(5), |l| l == "done");
    assert!(t.seen.iter().any(|l| l == "futex:woken"), "{:?}", t.seen);
    assert!(
        !t.seen.iter().any(|l| l.contains("error")),
        "a syscall failed: {:?}",
        t.seen
    );
    // "slept:MS r=0 errno=0": the full 1.5 s, no EINTR.
    let ms: u64 = slept["slept:".len()..]
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("ms");
    assert!(slept.ends_with("r=0 errno=0"), "{slept}");
    assert!(
        (1490..4000).contains(&ms),
        "nanosleep slept {ms} ms instead of about 1500"
    );
}

#[test]
fn timer_signal_firing_during_the_stop_is_delivered_with_eintr_semantics() {
    need_real!("timer_signal_firing_during_the_stop_is_delivered_with_eintr_semantics");
    let mut t = Target::run("alarm", &[]);
    let pid = t.ready();
    std::thread::sleep(Duration::from_millis(50));
    let mask_before = sig_blocked(pid, pid.leader());
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    // SIGALRM keeps firing (2 ms) while held; it stays pending.
    std::thread::sleep(Duration::from_millis(100));
    let tid = pid.leader();
    let before = sp.thread(tid).expect("main").regs;
    let addr = sp
        .remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
        .expect("remote mmap");
    sp.remote_munmap(addr, 4096).expect("remote munmap");
    assert_eq!(sp.refresh_regs(tid).expect("regs"), before);
    assert_eq!(sig_blocked(pid, tid), mask_before, "signal mask changed");
    sp.resume().expect("resume");
    assert_released(pid);
    std::thread::sleep(Duration::from_millis(100));
    t.write_stdin(b"x");
    let line = t.expect("got=x", Duration::from_secs(5), |l| {
        l.starts_with("got=") || l.starts_with("unexpected")
    });
    assert!(line.starts_with("got=x"), "{line}");
    let field = |k: &str| -> i64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .expect(k)
    };
    let (eintr, ticks) = (field("eintr="), field("ticks="));
    assert!(
        ticks > 5 && eintr > 0 && eintr <= ticks,
        "eintr={eintr} ticks={ticks}"
    );
}

#[test]
fn already_traced_by_a_traceme_parent_is_refused_and_left_running() {
    need_real!("already_traced_by_a_traceme_parent_is_refused_and_left_running");
    let mut t = Target::run("traceme", &[]);
    let pid = t.ready();
    t.also_kill.push(pid);
    let err = stop_all(pid, deadline(5)).expect_err("must refuse");
    assert_eq!(err.code(), "sys.already_traced", "{err}");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        cpu_ticks(pid) > before,
        "the refused process no longer runs"
    );
    assert!(
        thread_states(pid)
            .iter()
            .all(|&(_, st, tracer)| st != TaskState::TracingStop && tracer != stitch_sys::gettid())
    );
}

#[test]
fn already_traced_by_strace_is_refused_and_left_running() {
    let have_strace = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_strace {
        // Optional tool; the TRACEME test covers the hazard without it.
        eprintln!(
            "SKIP already_traced_by_strace_is_refused_and_left_running: strace is not installed"
        );
        return;
    }
    need_real!("already_traced_by_strace_is_refused_and_left_running");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null"])
        .arg(binary("spin"))
        .arg("2");
    let mut t = Target::spawn(cmd);
    let pid = t.ready();
    t.also_kill.push(pid);
    let err = stop_all(pid, deadline(5)).expect_err("must refuse");
    assert_eq!(err.code(), "sys.already_traced", "{err}");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        cpu_ticks(pid) > before,
        "the refused process no longer runs"
    );
}

#[test]
fn zombie_is_refused() {
    need_real!("zombie_is_refused");
    let mut t = Target::run("zombie", &[]);
    let pid = t.ready();
    wait_until("child is a zombie", Duration::from_secs(5), || {
        procfs::process_state(pid).is_ok_and(|s| s.state == TaskState::Zombie)
    });
    let err = stop_all(pid, deadline(5)).expect_err("must refuse");
    assert_eq!(err.code(), "sys.zombie", "{err}");
    assert!(!stitch_sys::process_alive(pid));
}

#[test]
fn kernel_thread_kthreadd_is_refused() {
    need_real!("kernel_thread_kthreadd_is_refused");
    let pid = Pid(2);
    match procfs::process_state(pid) {
        Ok(s) if s.comm == "kthreadd" => {}
        other => {
            eprintln!(
                "SKIP kernel_thread_kthreadd_is_refused: pid 2 is not kthreadd here ({other:?})"
            );
            return;
        }
    }
    let err = stop_all(pid, deadline(5)).expect_err("must refuse");
    assert_eq!(err.code(), "sys.kernel_thread", "{err}");
}

#[test]
fn missing_process_is_refused() {
    // Needs no privilege: nothing exists to be touched.
    let pid = (4_000_000..4_194_304)
        .map(Pid)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let err = stop_all(pid, deadline(1)).expect_err("must refuse");
    assert_eq!(err.code(), "sys.no_such_process", "{err}");
}

#[test]
fn sigstopped_process_stays_stopped_after_stop_and_resume() {
    need_real!("sigstopped_process_stays_stopped_after_stop_and_resume");
    let mut t = Target::run("spin", &["1"]);
    let pid = t.ready();
    kill(pid, "STOP");
    wait_until("group stop", Duration::from_secs(5), || {
        thread_states(pid)
            .iter()
            .all(|&(_, st, _)| st == TaskState::Stopped)
    });
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    assert!(sp.is_group_stopped());
    assert!(
        sp.threads()
            .all(|t| matches!(t.stop, StopKind::GroupStopped(libc::SIGSTOP)))
    );
    // Our own syscalls are fine; running the target's own code is not.
    let a = sp
        .remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
        .expect("remote mmap");
    sp.remote_munmap(a, 4096).expect("remote munmap");
    let err = sp
        .run_thread_briefly(pid.leader(), Duration::from_millis(1))
        .expect_err("must refuse");
    assert_eq!(err.code(), "sys.group_stopped");
    let err = sp.single_step(pid.leader()).expect_err("must refuse");
    assert_eq!(err.code(), "sys.group_stopped");
    sp.resume().expect("resume");
    wait_until("untraced", Duration::from_secs(2), || {
        thread_states(pid).iter().all(|&(_, _, tr)| tr == 0)
    });
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(200));
    let states = thread_states(pid);
    assert!(
        states.iter().all(|&(_, st, _)| st == TaskState::Stopped),
        "no longer stopped: {states:?}"
    );
    assert_eq!(cpu_ticks(pid), before, "a SIGSTOPped process ran");
    kill(pid, "CONT");
    wait_until("running again", Duration::from_secs(2), || {
        cpu_ticks(pid) > before
    });
}

#[test]
fn remote_mmap_near_the_module_is_reachable_named_and_noreplace() {
    need_real!("remote_mmap_near_the_module_is_reachable_named_and_noreplace");
    let bin = binary("spin");
    let mut t = Target::run("spin", &["1"]);
    let pid = t.ready();
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    let canon = std::fs::canonicalize(&bin).expect("canonicalize");
    let maps = sp.mappings().expect("maps");
    let text = maps
        .iter()
        .find(|m| m.perms.exec && Path::new(&m.name) == canon)
        .unwrap_or_else(|| panic!("no text mapping of {} in {maps:#?}", canon.display()))
        .clone();
    let reach = (1u64 << 31) - (1 << 24);
    let addr = sp
        .remote_mmap_near(text.start, 8192, PROT_RX, reach)
        .expect("mmap near");
    assert!(
        addr.abs_diff(text.start) < reach && (addr + 8192).abs_diff(text.end) < reach,
        "{addr:#x} too far from {:#x}",
        text.start
    );
    let named = sp
        .remote_prctl_set_vma_anon_name(addr, 8192, "stitch-test-tramp")
        .expect("prctl");
    assert_eq!(
        sp.read_vec(addr, 32).expect("read back"),
        vec![0; 32],
        "the name was not wiped from the region"
    );
    let err = sp
        .remote_mmap(Placement::Exact(addr), 4096, PROT_RX)
        .expect_err("MAP_FIXED_NOREPLACE must refuse");
    assert_eq!(err.remote_errno(), Some(libc::EEXIST), "{err}");
    let other = sp
        .remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
        .expect("mmap");
    sp.remote_munmap(other, 4096).expect("munmap");
    sp.resume().expect("resume");
    let maps = procfs::read_maps(pid).expect("maps");
    let m = maps
        .iter()
        .find(|m| m.start == addr)
        .expect("mapping gone after resume");
    assert_eq!((m.end - m.start, m.perms), (8192, Perms::RX));
    assert!(
        !maps.iter().any(|m| m.start == other),
        "munmap did not unmap"
    );
    if named {
        assert_eq!(m.name, "[anon:stitch-test-tramp]");
    } else {
        // This machine's kernel is built without CONFIG_ANON_VMA_NAME: prctl says EINVAL.
        eprintln!(
            "NOTE remote_mmap_near...: kernel refused PR_SET_VMA_ANON_NAME (no CONFIG_ANON_VMA_NAME); mapping is plain anonymous"
        );
        assert_eq!(m.name, "");
    }
    assert!(stitch_sys::process_alive(pid));
}

#[test]
fn write_to_rx_text_is_seen_by_the_target_and_the_file_is_unchanged() {
    need_real!("write_to_rx_text_is_seen_by_the_target_and_the_file_is_unchanged");
    let bin = binary("patchme");
    let on_disk = std::fs::read(&bin).expect("read binary");
    let mut t = Target::run("patchme", &[]);
    let pid = t.ready();
    let fn_line = t
        .seen
        .iter()
        .find(|l| l.starts_with("fn="))
        .expect("fn= line")
        .clone();
    let func = u64::from_str_radix(fn_line.trim_start_matches("fn=0x"), 16).expect("fn address");
    t.expect("value=41", Duration::from_secs(5), |l| l == "value=41");
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    let orig = sp.read_vec(func, 6).expect("read");
    assert_eq!(
        orig,
        [0xb8, 0x29, 0, 0, 0, 0xc3],
        "unexpected code for get_value (mov eax,41; ret)"
    );
    let m = sp
        .mappings()
        .expect("maps")
        .into_iter()
        .find(|m| m.contains(func))
        .expect("mapping");
    assert!(m.perms.exec && !m.perms.write, "text is not r-x: {m:?}");
    // No thread may be about to execute the bytes we replace: let it move on first.
    for _ in 0..100 {
        let inside: Vec<Tid> = sp
            .threads()
            .filter(|t| (func..func + 6).contains(&t.regs.resume_ip()))
            .map(|t| t.tid)
            .collect();
        if inside.is_empty() {
            break;
        }
        for tid in inside {
            sp.run_thread_briefly(tid, Duration::from_micros(200))
                .expect("run briefly");
        }
    }
    sp.write_verified(func, &[0xb8, 0x2a, 0, 0, 0, 0xc3])
        .expect("write r-x text");
    sp.resume().expect("resume");
    t.expect("value=42", Duration::from_secs(5), |l| l == "value=42");
    // Readable from outside without stopping.
    let mut b = [0u8; 2];
    stitch_sys::read_proc_mem(pid, func, &mut b).expect("read_proc_mem");
    assert_eq!(b, [0xb8, 0x2a]);
    assert_eq!(
        std::fs::read(&bin).expect("read binary"),
        on_disk,
        "the file on disk changed"
    );
}

#[test]
fn pokedata_fallback_writes_rx_text_with_exact_edges() {
    need_real!("pokedata_fallback_writes_rx_text_with_exact_edges");
    let mut t = Target::run("patchme", &[]);
    let pid = t.ready();
    let fn_line = t
        .seen
        .iter()
        .find(|l| l.starts_with("fn="))
        .expect("fn=")
        .clone();
    let func = u64::from_str_radix(fn_line.trim_start_matches("fn=0x"), 16).expect("fn address");
    t.expect("value=41", Duration::from_secs(5), |l| l == "value=41");
    let tracer = stitch_sys::PtraceTracer::new().without_proc_mem_writes();
    let mut sp = stop_all_with(tracer, pid, deadline(5)).expect("stop_all");
    // Bytes around the immediate, so the write starts and ends mid-word.
    let around = sp.read_vec(func - 16, 40).expect("read");
    sp.write_verified(func + 1, &[0x2b]).expect("poke one byte");
    let after = sp.read_vec(func - 16, 40).expect("read");
    let mut expected = around.clone();
    expected[17] = 0x2b;
    assert_eq!(after, expected, "POKEDATA changed bytes next to the write");
    // Unreadable (PROT_NONE) memory: process_vm_readv fails, the /proc/PID/mem read still works.
    let none = sp
        .remote_mmap(Placement::Anywhere, 4096, libc::PROT_NONE)
        .expect("mmap");
    assert_eq!(
        sp.read_vec(none + 100, 8).expect("read PROT_NONE"),
        vec![0; 8]
    );
    sp.write_verified(none + 4093, &[1, 2, 3])
        .expect("poke at the end of a page");
    sp.remote_munmap(none, 4096).expect("munmap");
    sp.resume().expect("resume");
    t.expect("value=43", Duration::from_secs(5), |l| l == "value=43");
}

#[test]
fn unstoppable_vfork_thread_is_reported_and_released_when_the_tracer_thread_exits() {
    need_real!("unstoppable_vfork_thread_is_reported_and_released_when_the_tracer_thread_exits");
    let mut t = Target::run("vforker", &[]);
    let pid = t.ready();
    t.expect("vforking", Duration::from_secs(5), |l| l == "vforking");
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    let result = stitch_sys::run_on_tracer_thread(move || {
        stop_all(pid, Instant::now() + Duration::from_millis(300)).and_then(|sp| sp.resume())
    });
    // The tracer blocks in waitpid meanwhile; its timer must end the wait at the deadline.
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "deadline overrun: {:?}",
        t0.elapsed()
    );
    let err = result.expect_err("a thread in vfork cannot stop");
    assert_eq!(err.code(), "sys.thread_did_not_stop", "{err}");
    match &err {
        SysError::ThreadDidNotStop { left_seized, .. } => assert!(!left_seized.is_empty(), "{err}"),
        other => panic!("{other}"),
    }
    // The tracer thread is gone, so the kernel let go of everything; the vfork completes.
    t.expect("vfork-done", Duration::from_secs(5), |l| l == "vfork-done");
    assert_released(pid);
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(100));
    assert!(cpu_ticks(pid) > before, "the process does not run");
}

#[test]
fn remote_syscalls_leave_a_sigtrap_handler_mask_or_ignore_exactly_as_they_were() {
    need_real!("remote_syscalls_leave_a_sigtrap_handler_mask_or_ignore_exactly_as_they_were");
    // A remote syscall single-steps the `syscall` instruction: the step's SIGTRAP is forced,
    // and a forced signal that finds SIGTRAP blocked or ignored resets its handler. Neither
    // may show: the handler never runs, and disposition and mask stay as the target set them
    // (an ignoring target gets the two-stop way).
    for (mode, disposition, blocked) in [
        ("handler", "handler", 0),
        ("blocked", "handler", 1),
        ("ignored", "ignored", 0),
    ] {
        let mut t = Target::run("trapper", &[mode]);
        let pid = t.ready();
        // The main thread is now blocked in read(): the remote syscalls interrupt it.
        std::thread::sleep(Duration::from_millis(20));
        let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
        for _ in 0..3 {
            let a = sp
                .remote_mmap(Placement::Anywhere, 0x2000, libc::PROT_READ)
                .expect("mmap");
            sp.remote_munmap(a, 0x2000).expect("munmap");
        }
        sp.resume().expect("resume");
        t.write_stdin(b"report\n");
        let want = format!("disposition={disposition} blocked={blocked} hits=0");
        t.expect(&want, Duration::from_secs(5), |l| l == want);
    }
}

#[test]
fn tracer_dying_after_remote_syscalls_leaves_no_sigtrap_behind() {
    need_real!("tracer_dying_after_remote_syscalls_leaves_no_sigtrap_behind");
    // A stepped remote syscall leaves its thread in the step's signal-delivery-stop; a
    // tracer that dies there makes the kernel deliver that SIGTRAP. Outside a batch and at
    // the end of one, the thread is parked again first.
    let mut t = Target::run("trapper", &["handler"]);
    let pid = t.ready();
    std::thread::sleep(Duration::from_millis(20));
    stitch_sys::run_on_tracer_thread(move || {
        let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
        let a = sp
            .remote_mmap(Placement::Anywhere, 0x2000, libc::PROT_READ)
            .expect("mmap");
        sp.remote_batch(|sp| {
            sp.remote_mprotect(a, 0x1000, libc::PROT_NONE)?;
            sp.remote_munmap(a, 0x2000)
        })
        .expect("batch");
        // No detach: the tracer thread exits with every thread still held.
        std::mem::forget(sp);
    });
    t.write_stdin(b"report\n");
    let want = "disposition=handler blocked=0 hits=0";
    t.expect(want, Duration::from_secs(5), |l| l == want);
}

#[test]
fn ppoll_with_a_temporary_mask_keeps_the_threads_own_mask_after_remote_syscalls() {
    need_real!("ppoll_with_a_temporary_mask_keeps_the_threads_own_mask_after_remote_syscalls");
    // Resuming a thread stopped inside ppoll(sigmask) for a remote syscall makes the kernel
    // put its own mask back (restore_saved_sigmask); restoring the temporary mask read at
    // the start on top would leave the thread with it after the restarted ppoll returns.
    let mut t = Target::run("ppoller", &[]);
    let pid = t.ready();
    std::thread::sleep(Duration::from_millis(50));
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    let a = sp
        .remote_mmap(Placement::Anywhere, 0x1000, libc::PROT_READ)
        .expect("mmap");
    sp.remote_munmap(a, 0x1000).expect("munmap");
    sp.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(20));
    t.write_stdin(b"go\n");
    let want = "ppoll=1 errno=0 usr2-blocked=1";
    t.expect(want, Duration::from_secs(5), |l| l == want);
}

#[test]
fn thread_count_by_stat_equals_the_task_listing() {
    need_real!("thread_count_by_stat_equals_the_task_listing");
    // stop_all takes an equal count for "no thread we do not hold": it must be exact.
    let mut t = Target::run("spin", &["63"]);
    let pid = t.ready();
    assert_eq!(procfs::list_threads(pid).expect("list").len(), 64);
    assert_eq!(procfs::thread_count(pid).expect("count"), 64);
    let sp = stop_all(pid, deadline(10)).expect("stop_all");
    assert_eq!(sp.tids().len(), 64);
    sp.resume().expect("resume");
    let mut one = Target::run("spin", &[]);
    let pid = one.ready();
    assert_eq!(procfs::thread_count(pid).expect("count"), 1);
}

#[test]
#[allow(
    unsafe_code,
    reason = "blocks one signal in the test's own tracer thread (pthread_sigmask)"
)]
fn tracer_thread_blocking_the_wake_signal_still_honours_the_stop_deadline() {
    need_real!("tracer_thread_blocking_the_wake_signal_still_honours_the_stop_deadline");
    let mut t = Target::run("vforker", &[]);
    let pid = t.ready();
    t.expect("vforking", Duration::from_secs(5), |l| l == "vforking");
    std::thread::sleep(Duration::from_millis(50));
    let (result, took) = stitch_sys::run_on_tracer_thread(move || {
        // SAFETY: sigset_t is plain data; all-zero is valid and sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: initialises `set`, a live local.
        unsafe { libc::sigemptyset(&raw mut set) };
        // SAFETY: `set` is initialised; SIGRTMAX - 3 is the signal the tracer's blocking wait
        // is interrupted with.
        unsafe { libc::sigaddset(&raw mut set, libc::SIGRTMAX() - 3) };
        // SAFETY: reads `set`; the old mask is not asked for.
        let blocked =
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        assert_eq!(blocked, 0);
        let t0 = Instant::now();
        let r =
            stop_all(pid, Instant::now() + Duration::from_millis(300)).and_then(|sp| sp.resume());
        (r, t0.elapsed())
    });
    // A blocking wait that the timer could not interrupt would never return.
    let err = result.expect_err("a thread in vfork cannot stop");
    assert_eq!(err.code(), "sys.thread_did_not_stop", "{err}");
    assert!(took < Duration::from_secs(2), "deadline overrun: {took:?}");
    t.expect("vfork-done", Duration::from_secs(5), |l| l == "vfork-done");
    assert_released(pid);
}

/// Not a test by itself: the body of `unprivileged_tracer_gets_permission_denied`, run in a copy
/// of this binary as user `nobody`. Does nothing unless that test asked for it.
#[test]
fn unprivileged_probe_helper() {
    let Ok(pid) = std::env::var("STITCH_SYS_PROBE_PID") else {
        return;
    };
    let pid = Pid(pid.parse().expect("pid"));
    match stop_all(pid, deadline(2)) {
        Ok(sp) => {
            drop(sp);
            println!("PROBE_CODE=ok");
        }
        Err(e) => println!("PROBE_CODE={}", e.code()),
    }
}

#[test]
fn unprivileged_tracer_gets_permission_denied_and_changes_nothing() {
    need_real!("unprivileged_tracer_gets_permission_denied_and_changes_nothing");
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let mut t = Target::run("spin", &["1"]);
    let pid = t.ready();
    // A copy anyone may execute, wherever the checkout lives.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let exe = dir.path().join("sys-probe");
    std::fs::copy(std::env::current_exe().expect("current exe"), &exe).expect("copy test binary");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod exe");
    let out = Command::new(&exe)
        .args([
            "--exact",
            "unprivileged_probe_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STITCH_SYS_PROBE_PID", pid.0.to_string())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run the probe as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let code = stdout
        .lines()
        .find_map(|l| l.split("PROBE_CODE=").nth(1))
        .map(str::trim)
        .unwrap_or_else(|| {
            panic!(
                "probe printed no code: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(code, "sys.permission_denied");
    assert!(
        thread_states(pid)
            .iter()
            .all(|&(_, st, tracer)| tracer == 0 && st != TaskState::TracingStop)
    );
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(100));
    assert!(cpu_ticks(pid) > before, "the target no longer runs");
}

#[test]
fn seccomp_filter_that_would_kill_is_evaluated_and_the_syscall_refused() {
    need_real!("seccomp_filter_that_would_kill_is_evaluated_and_the_syscall_refused");
    let mut t = Target::run("seccomp", &[]);
    let pid = t.ready();
    let mut sp = stop_all(pid, deadline(5)).expect("stop_all");
    // Allowed by the filter: runs.
    let a = sp
        .remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
        .expect("mmap is allowed");
    // SECCOMP_RET_KILL_PROCESS for mprotect: refused before anything runs.
    let err = sp
        .remote_mprotect(a, 4096, PROT_RX)
        .expect_err("would kill the target");
    assert_eq!(err.code(), "sys.seccomp_forbids", "{err}");
    // SECCOMP_RET_ERRNO is harmless: executed, fails with EPERM.
    let err = sp
        .remote_mmap(Placement::Exact(0x5100_0000), 4096, libc::PROT_READ)
        .expect_err("EPERM");
    assert_eq!(err.remote_errno(), Some(libc::EPERM), "{err}");
    sp.remote_munmap(a, 4096).expect("munmap is allowed");
    sp.resume().expect("resume");
    assert_released(pid);
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        stitch_sys::process_alive(pid) && cpu_ticks(pid) > before,
        "the target died or stopped"
    );
}

#[test]
fn read_proc_mem_and_liveness_work_without_stopping() {
    need_real!("read_proc_mem_and_liveness_work_without_stopping");
    let mut t = Target::run("patchme", &[]);
    let pid = t.ready();
    let fn_line = t
        .seen
        .iter()
        .find(|l| l.starts_with("fn="))
        .expect("fn=")
        .clone();
    let func = u64::from_str_radix(fn_line.trim_start_matches("fn=0x"), 16).expect("fn address");
    let mut b = [0u8; 6];
    stitch_sys::read_proc_mem(pid, func, &mut b).expect("read");
    assert_eq!(b, [0xb8, 0x29, 0, 0, 0, 0xc3]);
    assert!(
        stitch_sys::read_proc_mem(pid, 8, &mut b).is_err(),
        "reading page 0 must fail"
    );
    let fd = stitch_sys::PidFd::open(pid).expect("pidfd");
    assert!(stitch_sys::process_alive(pid));
    assert!(!fd.has_exited().expect("poll"));
    assert_eq!(stitch_sys::tracer_pid(pid).expect("tracer"), None);
    drop(t);
    wait_until("pidfd reports exit", Duration::from_secs(2), || {
        fd.has_exited().unwrap_or(false)
    });
    assert!(!stitch_sys::process_alive(pid));
}

#[test]
fn realtime_priority_is_entered_and_restored() {
    // The calling test thread's policy is restored by the guard; EPERM would just mean "no RT".
    let before = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
    {
        let g = stitch_sys::RealtimeGuard::enter();
        if g.active() {
            let during = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
            let policy: u32 = during
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(38))
                .and_then(|p| p.parse().ok())
                .expect("policy");
            assert_eq!(policy, libc::SCHED_FIFO as u32);
        } else {
            eprintln!(
                "NOTE realtime_priority_is_entered_and_restored: SCHED_FIFO not permitted here"
            );
        }
    }
    let after = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
    let policy: u32 = after
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().nth(38))
        .and_then(|p| p.parse().ok())
        .expect("policy");
    assert_eq!(
        policy,
        libc::SCHED_OTHER as u32,
        "policy not restored ({before})"
    );
}

// ---------------------------------------------------------------------------------------------
// Fake tracer: the protocol without a kernel
// ---------------------------------------------------------------------------------------------

const PID: Pid = Pid(100);

fn fake(extra_threads: usize) -> FakeTracer {
    let mut f = FakeTracer::new();
    f.add_process(PID, FakeProcess::typical(PID, extra_threads));
    f
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

#[test]
fn fake_stop_all_holds_every_thread_and_resume_releases_them() {
    let mut f = fake(3);
    let sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert_eq!(sp.tids(), vec![Tid(100), Tid(101), Tid(102), Tid(103)]);
    assert!(
        sp.threads()
            .all(|t| t.stop == StopKind::Interrupted && t.regs.rip >= 0x40_0000)
    );
    sp.resume().expect("resume");
    assert!(f.all_released(PID));
    assert_eq!(f.count(CallKind::Seize), 4);
    assert_eq!(f.count(CallKind::Detach), 4);
}

#[test]
fn fake_dropping_the_token_releases_every_thread() {
    let mut f = fake(2);
    {
        let _sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    }
    assert!(f.all_released(PID));
}

#[test]
fn fake_thread_created_during_the_stop_is_adopted() {
    let mut f = fake(1);
    let p = f.process_mut(PID).expect("process");
    // The first listing misses thread 150 (cloned meanwhile); the re-read finds it.
    p.appear_on_list.push_back(Vec::new());
    p.appear_on_list
        .push_back(vec![(Tid(150), FakeThread::at(0x40_0400))]);
    let sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert!(sp.tids().contains(&Tid(150)), "{:?}", sp.tids());
    drop(sp);
    assert!(f.all_released(PID));
    assert!(
        f.count(CallKind::ListThreads) >= 3,
        "the list must be re-read until stable"
    );
}

#[test]
fn fake_threads_exiting_during_the_stop_are_skipped() {
    let mut f = fake(3);
    let p = f.process_mut(PID).expect("process");
    p.threads.get_mut(&Tid(101)).expect("t").exits_before_seize = true;
    p.threads.get_mut(&Tid(102)).expect("t").exits_before_stop = true;
    let sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert_eq!(sp.tids(), vec![Tid(100), Tid(103)]);
    drop(sp);
    assert!(f.all_released(PID));
}

#[test]
fn fake_refusals_change_nothing() {
    type Setup = Box<dyn Fn(&mut FakeProcess)>;
    let cases: Vec<(&str, Setup)> = vec![
        (
            "sys.zombie",
            Box::new(|p| {
                p.state = TaskState::Zombie;
                p.threads
                    .values_mut()
                    .for_each(|t| t.state = FakeThreadState::Exited);
            }),
        ),
        (
            "sys.kernel_thread",
            Box::new(|p| p.flags |= stitch_sys::PF_KTHREAD),
        ),
        ("sys.kernel_thread", Box::new(|p| p.vsize = 0)),
        (
            "sys.already_traced",
            Box::new(|p| p.threads.get_mut(&Tid(100)).expect("t").traced_by = 4242),
        ),
        (
            "sys.already_traced",
            Box::new(|p| p.threads.get_mut(&Tid(102)).expect("t").traced_by = 4242),
        ),
        ("sys.permission_denied", Box::new(|p| p.deny_ptrace = true)),
    ];
    for (code, setup) in cases {
        let mut f = fake(2);
        setup(f.process_mut(PID).expect("process"));
        let err = stop_all_with(&mut f, PID, soon()).expect_err(code);
        assert_eq!(err.code(), code, "{err}");
        assert!(f.all_released(PID), "{code}: a thread was left held");
        assert_eq!(
            f.count(CallKind::WriteMemory)
                + f.count(CallKind::SetRegs)
                + f.count(CallKind::Syscall),
            0
        );
    }
    let mut f = fake(0);
    let err = stop_all_with(&mut f, Pid(7), soon()).expect_err("missing");
    assert_eq!(err.code(), "sys.no_such_process");
}

#[test]
fn fake_zombie_leader_with_live_threads_is_not_a_zombie_process() {
    let mut f = fake(2);
    let p = f.process_mut(PID).expect("process");
    p.state = TaskState::Zombie;
    p.threads.get_mut(&Tid(100)).expect("leader").state = FakeThreadState::Exited;
    let sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert_eq!(sp.tids(), vec![Tid(101), Tid(102)]);
    assert_eq!(sp.syscall_thread().expect("thread"), Tid(101));
}

#[test]
fn fake_thread_that_never_stops_is_reported_as_left_seized() {
    let mut f = fake(2);
    f.process_mut(PID)
        .expect("process")
        .threads
        .get_mut(&Tid(102))
        .expect("t")
        .never_stops = true;
    let err = stop_all_with(&mut f, PID, soon()).expect_err("cannot stop");
    match &err {
        SysError::ThreadDidNotStop {
            tid, left_seized, ..
        } => {
            assert_eq!(*tid, Tid(102));
            assert_eq!(left_seized, &vec![Tid(102)]);
        }
        other => panic!("{other}"),
    }
    // Everything that did stop was detached.
    assert_eq!(
        f.thread_state(PID, Tid(100)),
        Some(FakeThreadState::Running)
    );
    assert_eq!(
        f.thread_state(PID, Tid(101)),
        Some(FakeThreadState::Running)
    );
}

#[test]
fn fake_remote_mmap_exact_is_noreplace_and_anon_name_is_read_from_target_memory() {
    let mut f = fake(1);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    let regs_before: Vec<_> = sp.threads().map(|t| t.regs).collect();
    let a = sp
        .remote_mmap_near(0x40_0000, 4096, PROT_RX, 1 << 31)
        .expect("near");
    assert!(a.abs_diff(0x40_0000) < 1 << 31);
    let err = sp
        .remote_mmap(Placement::Exact(a), 4096, PROT_RX)
        .expect_err("taken");
    assert_eq!(err.remote_errno(), Some(libc::EEXIST));
    let err = sp
        .remote_mmap(Placement::Exact(0x40_0000), 4096, PROT_RX)
        .expect_err("text is there");
    assert_eq!(err.remote_errno(), Some(libc::EEXIST));
    assert!(
        sp.remote_prctl_set_vma_anon_name(a, 4096, "stitch-tramp")
            .expect("name")
    );
    assert!(
        sp.remote_prctl_set_vma_anon_name(a, 4096, "bad[name")
            .is_err()
    );
    sp.remote_mprotect(a, 4096, libc::PROT_READ)
        .expect("mprotect");
    let maps = sp.mappings().expect("maps");
    let m = maps.iter().find(|m| m.start == a).expect("mapped");
    assert_eq!(
        (m.name.as_str(), m.perms),
        ("[anon:stitch-tramp]", Perms::R)
    );
    assert_eq!(
        sp.read_vec(a, 16).expect("read"),
        vec![0; 16],
        "name bytes not restored"
    );
    let tids = sp.tids();
    for tid in &tids {
        sp.refresh_regs(*tid).expect("regs");
    }
    assert_eq!(
        sp.threads().map(|t| t.regs).collect::<Vec<_>>(),
        regs_before
    );
    sp.remote_munmap(a, 4096).expect("munmap");
    assert!(!sp.mappings().expect("maps").iter().any(|m| m.start == a));
    // The kernel without CONFIG_ANON_VMA_NAME.
    drop(sp);
    f.process_mut(PID).expect("p").anon_names = false;
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    let a = sp
        .remote_mmap(Placement::Hint(0x1000_0000), 4096, PROT_RX)
        .expect("hint");
    assert_eq!(a, 0x1000_0000);
    assert!(
        !sp.remote_prctl_set_vma_anon_name(a, 4096, "stitch-tramp")
            .expect("EINVAL is Ok(false)")
    );
}

#[test]
fn fake_group_stopped_process_never_runs_its_own_code() {
    let mut f = fake(1);
    f.process_mut(PID).expect("p").group_stop = Some(libc::SIGSTOP);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert!(sp.is_group_stopped());
    assert_eq!(
        sp.run_thread_briefly(Tid(100), Duration::from_millis(1))
            .expect_err("refuse")
            .code(),
        "sys.group_stopped"
    );
    assert_eq!(
        sp.single_step(Tid(101)).expect_err("refuse").code(),
        "sys.group_stopped"
    );
    sp.remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
        .expect("our own syscalls are fine");
    drop(sp);
    assert_eq!(
        f.count(CallKind::RunBriefly) + f.count(CallKind::SingleStep),
        0
    );
}

#[test]
fn fake_sigtrap_ignored_process_is_not_single_stepped() {
    let mut f = fake(0);
    f.process_mut(PID).expect("p").sig_ignored = 1 << (libc::SIGTRAP - 1);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert_eq!(
        sp.single_step(Tid(100)).expect_err("refuse").code(),
        "sys.sigtrap_ignored"
    );
}

#[test]
fn fake_seccomp_forbidden_syscall_is_refused_not_executed() {
    let mut f = fake(0);
    f.process_mut(PID)
        .expect("p")
        .seccomp_kills
        .push(libc::SYS_mmap);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    let err = sp
        .remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
        .expect_err("refuse");
    assert_eq!(err.code(), "sys.seccomp_forbids");
    assert_eq!(sp.mappings().expect("maps").len(), 3, "nothing was mapped");
}

#[test]
fn fake_memory_outside_mappings_fails_and_rx_text_is_writable() {
    let mut f = fake(0);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    assert_eq!(
        sp.write(0x10, &[1]).expect_err("unmapped").code(),
        "sys.mem_io"
    );
    assert_eq!(
        sp.read_vec(0x40_3ffe, 4)
            .expect_err("runs off the end")
            .code(),
        "sys.mem_io"
    );
    sp.write_verified(0x40_0010, &[0xe9, 1, 2, 3, 4])
        .expect("r-x text, like /proc/PID/mem");
    drop(sp);
    assert_eq!(f.memory(PID, 0x40_0010, 5), Some(vec![0xe9, 1, 2, 3, 4]));
    // Without a token there is no write at all; the tracer itself wants a held thread.
    use stitch_sys::Tracer;
    let err = f
        .write_memory(PID, Tid(100), 0x40_0010, &[0x90])
        .expect_err("not held");
    assert_eq!(err.code(), "sys.ptrace");
}

#[test]
fn fake_run_briefly_moves_the_thread_and_adopts_threads_it_created() {
    let mut f = fake(0);
    let p = f.process_mut(PID).expect("p");
    p.threads
        .get_mut(&Tid(100))
        .expect("t")
        .rip_after_run
        .push_back(0x40_0800);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    // The brief run clones a thread: it shows up at the next listing and must be held too.
    let regs = sp
        .run_thread_briefly(Tid(100), Duration::from_millis(1))
        .expect("run")
        .expect("alive");
    assert_eq!(regs.rip, 0x40_0800);
    assert_eq!(sp.thread(Tid(100)).expect("t").regs.rip, 0x40_0800);
    let stepped = sp.single_step(Tid(100)).expect("step");
    assert_eq!(stepped.rip, 0x40_0801);
    drop(sp);
    let mut f = fake(0);
    let p = f.process_mut(PID).expect("p");
    p.appear_on_list.push_back(Vec::new()); // stop_all: first listing
    p.appear_on_list.push_back(Vec::new()); // stop_all: re-read
    p.appear_on_list
        .push_back(vec![(Tid(777), FakeThread::at(0x40_0900))]); // after the run
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    sp.run_thread_briefly(Tid(100), Duration::from_millis(1))
        .expect("run");
    assert!(
        sp.tids().contains(&Tid(777)),
        "a thread created by the brief run is not held"
    );
    drop(sp);
    assert!(f.all_released(PID));
}

#[test]
fn fake_failed_adoption_after_a_brief_run_releases_everything() {
    let mut f = fake(1);
    let sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    let lists = sp.tracer().count(CallKind::ListThreads);
    drop(sp);
    let mut f = fake(1);
    f.fail_nth(CallKind::ListThreads, lists + 1);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    sp.run_thread_briefly(Tid(100), Duration::from_millis(1))
        .expect_err("listing fails");
    assert_eq!(
        sp.write(0x40_0010, &[0x90])
            .expect_err("token is dead")
            .code(),
        "sys.released"
    );
    drop(sp);
    assert!(f.all_released(PID));
    assert_eq!(
        f.memory(PID, 0x40_0010, 1),
        Some(vec![0x90]),
        "text unchanged (nop)"
    );
}

/// The apply protocol the engine runs, in miniature.
const SITE: u64 = 0x40_0010;
const JMP: [u8; 5] = [0xe9, 0xeb, 0xff, 0xff, 0x0f];

fn miniature_apply(f: &mut FakeTracer) -> Result<(), SysError> {
    let mut sp = stop_all_with(f, PID, soon())?;
    let tramp = sp.remote_mmap_near(SITE, 4096, PROT_RX, 1 << 31)?;
    sp.write_verified(tramp, &[0xc3])?;
    sp.remote_prctl_set_vma_anon_name(tramp, 4096, "stitch")?;
    for tid in sp.tids() {
        if (SITE..SITE + 5).contains(&sp.thread(tid).map_or(0, |t| t.regs.resume_ip())) {
            sp.run_thread_briefly(tid, Duration::from_millis(1))?;
        }
    }
    sp.write_verified(SITE, &JMP)?;
    sp.resume()
}

#[test]
fn fake_failure_injected_at_every_step_leaves_nothing_stopped_or_half_written() {
    let setup = || {
        let mut f = fake(2);
        // One thread sits right on the site, so the protocol must run it briefly.
        let t = f
            .process_mut(PID)
            .expect("p")
            .threads
            .get_mut(&Tid(101))
            .expect("t");
        t.regs.rip = SITE + 1;
        t.rip_after_run.push_back(0x40_0900);
        f
    };
    let mut clean = setup();
    miniature_apply(&mut clean).expect("clean run");
    assert_eq!(clean.memory(PID, SITE, 5), Some(JMP.to_vec()));
    let counts: Vec<(CallKind, usize)> = CallKind::ALL
        .iter()
        .map(|&k| (k, clean.count(k)))
        .filter(|&(_, n)| n > 0)
        .collect();
    assert!(
        counts.len() >= 9,
        "the protocol should exercise most kinds: {counts:?}"
    );
    let mut injected = 0;
    for (kind, n) in counts {
        for nth in 1..=n {
            let mut f = setup();
            f.fail_nth(kind, nth);
            let result = miniature_apply(&mut f);
            injected += 1;
            assert!(
                f.all_released(PID),
                "{kind:?} #{nth}: a thread was left seized or stopped ({result:?})"
            );
            let site = f.memory(PID, SITE, 5).expect("site");
            assert!(
                site == JMP || site == vec![0x90; 5],
                "{kind:?} #{nth}: half-written site {site:02x?}"
            );
            if result.is_ok() {
                assert_eq!(
                    site, JMP,
                    "{kind:?} #{nth}: reported success without the patch"
                );
            }
        }
    }
    assert!(injected > 20, "only {injected} injection points");
}

#[test]
fn fake_injected_error_can_be_chosen_by_the_caller() {
    let mut f = fake(0);
    f.fail_nth_with(CallKind::Seize, 1, |c| SysError::ThreadGone {
        pid: c.pid,
        tid: c.tid.unwrap_or(Tid(0)),
    });
    // The only thread "vanished": the process is gone.
    let err = stop_all_with(&mut f, PID, soon()).expect_err("gone");
    assert_eq!(err.code(), "sys.no_such_process");
    assert!(
        f.calls()
            .iter()
            .any(|c| c.kind == CallKind::Seize && c.injected)
    );
}

#[test]
fn fake_regions_are_split_and_merged_by_mprotect_and_munmap() {
    let mut f = FakeTracer::new();
    let mut p = FakeProcess::typical(PID, 0);
    p.add_region(FakeRegion {
        start: 0x2000_0000,
        perms: Perms::RW,
        name: String::new(),
        bytes: vec![7; 4 * 4096],
    });
    f.add_process(PID, p);
    let mut sp = stop_all_with(&mut f, PID, soon()).expect("stop_all");
    sp.remote_mprotect(0x2000_1000, 4096, libc::PROT_READ)
        .expect("mprotect middle");
    sp.remote_munmap(0x2000_2000, 4096).expect("munmap middle");
    let maps: Vec<_> = sp
        .mappings()
        .expect("maps")
        .into_iter()
        .filter(|m| m.start >= 0x2000_0000 && m.start < 0x3000_0000)
        .collect();
    let shape: Vec<_> = maps.iter().map(|m| (m.start, m.end, m.perms)).collect();
    assert_eq!(
        shape,
        vec![
            (0x2000_0000, 0x2000_1000, Perms::RW),
            (0x2000_1000, 0x2000_2000, Perms::R),
            (0x2000_3000, 0x2000_4000, Perms::RW)
        ]
    );
    assert_eq!(sp.read_vec(0x2000_3000, 2).expect("bytes kept"), vec![7, 7]);
    assert_eq!(
        sp.remote_mprotect(0x2000_2000, 4096, libc::PROT_READ)
            .expect_err("hole")
            .remote_errno(),
        Some(libc::ENOMEM)
    );
}

#[test]
fn fake_exec_while_stopping_is_retried_on_the_new_program() {
    let mut f = fake(1);
    f.fail_nth_with(CallKind::WaitStop, 1, |c| SysError::Execed {
        pid: c.pid,
        tid: c.tid.unwrap_or(Tid(0)),
    });
    let sp = stop_all_with(&mut f, PID, soon()).expect("retried after the exec");
    assert_eq!(sp.tids(), vec![Tid(100), Tid(101)]);
    drop(sp);
    assert!(f.all_released(PID));
    // Persistent exec storms give up with the typed error.
    let mut f = fake(0);
    // Each attempt waits once (exec reported) and once more while cleaning up (stopped, detached).
    for n in [1, 3, 5, 7, 9] {
        f.fail_nth_with(CallKind::WaitStop, n, |c| SysError::Execed {
            pid: c.pid,
            tid: c.tid.unwrap_or(Tid(0)),
        });
    }
    assert_eq!(
        stop_all_with(&mut f, PID, soon())
            .expect_err("gives up")
            .code(),
        "sys.execed"
    );
    assert!(f.all_released(PID));
}

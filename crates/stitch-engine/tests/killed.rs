//! The patcher killed with SIGKILL at every step of an apply (and of a revert) leaves the
//! target alive and either fully patched or untouched, and a later run settles the record.
//!
//! The patcher is this test binary run again as a child (`helper_patcher_process`), with
//! `STITCH_TEST_KILL_AT=<step>` making it SIGKILL itself at that step — the same engine
//! code path `stitch apply` runs.

use std::path::Path;
use std::process::Command;

use stitch_engine::region::RecordState;
use stitch_engine::{Engine, KILL_AT_ENV, KILL_POINTS};
use stitch_format::{Bundle, TrustedKeys};
use stitch_sys::Pid;

use crate::common::*;
use crate::threads::SPIN_C;

const HELPER: &str = "STITCH_TEST_HELPER";

/// Not a test on its own: the patcher process of the tests below. Inert unless
/// `STITCH_TEST_HELPER=apply|revert` is set.
#[test]
fn helper_patcher_process() {
    let Ok(op) = std::env::var(HELPER) else {
        return;
    };
    let pid = Pid(std::env::var("STITCH_TEST_PID").unwrap().parse().unwrap());
    let engine = Engine::new();
    match op.as_str() {
        "apply" => {
            let text = std::fs::read_to_string(std::env::var("STITCH_TEST_KEYS").unwrap()).unwrap();
            let trusted = TrustedKeys::from_text(&text).unwrap();
            let bytes = std::fs::read(std::env::var("STITCH_TEST_BUNDLE").unwrap()).unwrap();
            let b = Bundle::decode_verified(&bytes, &trusted).unwrap();
            engine.apply(pid, &b).unwrap();
        }
        "revert" => {
            engine.revert(pid, "ST-2026-0400").unwrap();
        }
        other => panic!("unknown helper op {other}"),
    }
}

fn run_helper(
    op: &str,
    step: &str,
    pid: Pid,
    bundle: &Path,
    keys: &Path,
) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed::helper_patcher_process",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(HELPER, op)
        .env(KILL_AT_ENV, step)
        .env("STITCH_TEST_PID", pid.0.to_string())
        .env("STITCH_TEST_BUNDLE", bundle)
        .env("STITCH_TEST_KEYS", keys)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
}

/// Region-shaped mappings in `pid`: 8 KiB read-write anonymous memory right before 56 KiB
/// read-execute anonymous memory — with a Stitch header or without one (a region a patcher
/// mapped and died before it said what it is). Nothing else in the target looks like that.
fn stitch_regions(pid: Pid) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let anon: Vec<(u64, u64, String)> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (start, end) = f.first()?.split_once('-')?;
            (f.get(4) == Some(&"0") && f.len() <= 6).then_some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
                (*f.get(1)?).to_string(),
            ))
        })
        .collect();
    anon.windows(2)
        .filter(|w| {
            let (s0, e0, p0) = &w[0];
            let (s1, e1, p1) = &w[1];
            p0 == "rw-p" && e0 - s0 == 8 << 10 && s1 == e0 && p1 == "r-xp" && e1 - s1 == 56 << 10
        })
        .count()
}

fn killed_by_sigkill(st: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    st.signal() == Some(9)
}

#[test]
fn patcher_killed_at_each_step_leaves_target_alive_and_all_or_nothing() {
    // The helper traces a process it did not start: needs root (or ptrace_scope 0).
    if !need_root("tracing a sibling process") {
        return;
    }
    let t = compile(SPIN_C, &[]);
    let b = patch(&t, "ST-2026-0400", "compute", "drop", PLUS_1000);
    let (bundle, keys) = write_bundle(t.dir.path(), &b);
    let engine = Engine::new();
    for &step in KILL_POINTS {
        let reverting = step.starts_with("revert");
        // Eight threads spinning through the function, plus the answering main thread.
        let mut r = Running::start_args(&t.exe, &["8"]);
        if reverting {
            engine.apply(r.pid(), &b).unwrap();
        }
        let st = run_helper(
            if reverting { "revert" } else { "apply" },
            step,
            r.pid(),
            &bundle,
            &keys,
        );
        assert!(
            killed_by_sigkill(st),
            "{step}: the patcher died of SIGKILL ({st:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(r.alive(), "{step}: target alive");
        let answer = r.ask(5);
        let v = r.ask_nums("s");
        assert_eq!(v[2], 0, "{step}: no bad answer from any thread");
        let patched = match answer.as_str() {
            "1005" => true,
            "6" => false,
            other => panic!("{step}: answer {other}"),
        };
        let expect_patched = matches!(step, "sites_written" | "marked_applied");
        assert_eq!(patched, expect_patched, "{step}: patched?");
        // The record tells the same story once settled; the next run can always proceed.
        let live: Vec<_> = engine
            .list(r.pid())
            .unwrap()
            .into_iter()
            .filter(|a| a.record.state != RecordState::Reverted)
            .collect();
        if patched {
            assert_eq!(live.len(), 1, "{step}: the record of the landed patch");
            engine.revert(r.pid(), "ST-2026-0400").unwrap();
            assert_eq!(r.ask(5), "6", "{step}: reverted afterwards");
        } else {
            // Untouched (maybe a record left `applying` over original bytes): applying
            // again settles it and works.
            engine
                .apply(r.pid(), &b)
                .unwrap_or_else(|e| panic!("{step}: re-apply: [{}] {e}", e.code()));
            assert_eq!(r.ask(5), "1005", "{step}: applied afterwards");
        }
        let v = r.ask_nums("s");
        assert_eq!(v[2], 0, "{step}: no bad answer afterwards");
        // A region mapped by the killed patcher carries its header from the start, so the
        // next run found and used it: one region, nothing leaked.
        assert_eq!(stitch_regions(r.pid()), 1, "{step}: one Stitch region");
        eprintln!("{step}: ok (patched: {patched})");
    }
}

//! Clean refusals: nothing changed, the target keeps running.

use std::process::Command;
use std::time::Duration;

use stitch_engine::Engine;
use stitch_sys::Pid;

use crate::TARGET_C;
use crate::common::*;

/// The first child of `parent` (from /proc/PID/task/*/children).
fn child_of(parent: u32) -> Option<Pid> {
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
    for t in tasks.flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        if let Some(k) = kids.split_whitespace().next() {
            return k.parse().ok().map(Pid);
        }
    }
    None
}

#[test]
fn process_already_under_ptrace_is_refused_already_traced_and_keeps_running() {
    if !can_trace() {
        return;
    }
    if !have("strace") {
        skip("strace is not installed");
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null", "--"]).arg(&t.exe);
    let mut r = Running::spawn(cmd);
    let target = wait_for(Duration::from_secs(5), || child_of(r.child.id())).expect("traced child");
    let b = patch(&t, "ST-2026-0300", "compute", "drop", RETURN_1000);
    let e = Engine::new().apply(target, &b).unwrap_err();
    assert_eq!(e.code(), "sys.already_traced", "{e}");
    assert_eq!(r.ask(2), "3 4", "still running, unpatched, under strace");
    assert!(Engine::new().list(target).unwrap().is_empty());
}

#[test]
fn process_exiting_during_apply_gives_a_clean_error_or_a_patch() {
    if !can_trace() {
        return;
    }
    // Targets that exit on their own after a short random time, patched in a loop: every
    // outcome is a patch or an error with a code; never a hang or a panic.
    let t = compile(
        r#"
#include <stdlib.h>
#include <unistd.h>
#include <pthread.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
static void *spin(void *a) { volatile int s = 0; for (;;) s += compute(s); return a; }
int main(int argc, char **argv) {
    pthread_t t; for (int i = 0; i < 4; i++) pthread_create(&t, 0, spin, 0);
    usleep(atoi(argv[1]));
    exit(0);
}
"#,
        &[],
    );
    let b = patch(
        &t,
        "ST-2026-0301",
        "compute",
        "drop",
        "lea eax, [rdi + 1]\nret",
    );
    let engine = Engine::new();
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..30u64 {
        // Most live 0.5-4.5 ms and exit mid-apply; every fifth lives 200 ms, so some
        // applies must succeed however slow the host is (on a loaded host the short ones can
        // all end before their program is even mapped).
        let life_us = if i % 5 == 0 {
            200_000
        } else {
            (i * 997) % 4000 + 500
        };
        let mut child = Command::new(&t.exe)
            .arg(life_us.to_string())
            .spawn()
            .unwrap();
        let pid = Pid(child.id() as i32);
        for _ in 0..20 {
            let k = match engine.apply(pid, &b) {
                Ok(_) => engine
                    .revert(pid, "ST-2026-0301")
                    .map_or_else(|e| e.code().to_string(), |_| "ok".into()),
                Err(e) => e.code().to_string(),
            };
            *outcomes.entry(k).or_default() += 1;
        }
        let st = child.wait().unwrap();
        assert!(st.success(), "target {i} exited normally: {st:?}");
    }
    eprintln!("{outcomes:?}");
    assert!(outcomes.contains_key("ok"));
}

//! The engine on real processes (and against the fake tracer), one test per hazard.
//!
//! One test binary; modules by theme. Tests that need root or ptrace print a skip reason
//! outside CI and fail with CI=true.

mod common;
mod fake_protocol;
mod killed;
mod known;
mod modules;
mod redis;
mod refusals;
mod threads;

use common::*;
use stitch_engine::{Engine, EngineError};

/// Target: reads numbers on stdin, answers compute(n) on stdout, forever.
pub(crate) const TARGET_C: &str = r#"
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
    let mut engine = Engine::new();
    engine.options.keep_idle_regions = false;
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
fn revert_keeps_an_empty_region_that_the_next_apply_reuses() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    assert!(engine.options.keep_idle_regions, "the default");
    let a = patch(&t, "ST-2026-0003", "compute", "drop", RETURN_1000);
    let first = engine.apply(r.pid(), &a).unwrap();
    assert!(first.region_created);
    let rev = engine.revert(r.pid(), "ST-2026-0003").unwrap();
    assert!(!rev.region_freed, "kept for the next apply");
    assert_eq!(r.ask(3), "4 6");
    let listed = engine.list(r.pid()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].record.state,
        stitch_engine::region::RecordState::Reverted
    );
    for _ in 0..3 {
        let again = engine.apply(r.pid(), &a).unwrap();
        assert!(!again.region_created, "the kept region is reused");
        assert_eq!(again.plan.region.addr(), first.plan.region.addr());
        assert_eq!(r.ask(3), "1000 6");
        engine.revert(r.pid(), "ST-2026-0003").unwrap();
        assert_eq!(r.ask(3), "4 6");
    }
    let listed = engine.list(r.pid()).unwrap();
    assert_eq!(
        listed.len(),
        1,
        "started afresh each time, records do not pile up"
    );
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

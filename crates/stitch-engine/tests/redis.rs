//! A real server nobody here wrote: Debian's redis-server under redis-benchmark, with a
//! harmless patchlet (it only counts hits) at the entry of `processCommand`, applied and
//! reverted up to 1,000 times (as many as fit in about 60 s): zero failed requests, zero
//! crashes, the hit count moving.
//!
//! Slow and needs the Debian package, so it is `#[ignore]`d; CI runs it with
//! `cargo test -p stitch-engine --test engine -- --ignored --exact redis::redis_server_under_benchmark_survives_apply_revert_cycles`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stitch_engine::Engine;
use stitch_sys::Pid;

use crate::common::*;

const SERVER: &str = "/usr/bin/redis-server";

fn ensure_redis() -> bool {
    if std::path::Path::new(SERVER).exists() && have("redis-benchmark") {
        return true;
    }
    if in_ci() && is_root() {
        let ok = Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "installing redis-server in CI");
        return true;
    }
    skip("redis-server / redis-benchmark not installed (apt-get install redis-server redis-tools)")
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[ignore = "slow (about a minute) and needs Debian's redis-server; run by CI with --ignored"]
fn redis_server_under_benchmark_survives_apply_revert_cycles() {
    if !can_trace() || !ensure_redis() {
        return;
    }
    let bytes = std::fs::read(SERVER).unwrap();
    let b = patch_module(
        &bytes,
        "redis-server",
        "ST-2026-0600",
        "processCommand",
        "before",
        "stitch_hit",
    );
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut server = Command::new(SERVER)
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = Pid(server.id() as i32);
    assert!(
        wait_for(Duration::from_secs(5), || (cli(port, &["PING"]) == "PONG")
            .then_some(()))
        .is_some(),
        "redis answers"
    );
    // Load: redis-benchmark in a loop until the cycles are done; every run must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new("redis-benchmark")
                    .args([
                        "-p",
                        &port.to_string(),
                        "-t",
                        "set,get,incr,lpush",
                        "-n",
                        "20000",
                        "-c",
                        "8",
                        "-q",
                    ])
                    .output()
                    .unwrap();
                runs.push((
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).to_string()
                        + &String::from_utf8_lossy(&out.stderr),
                ));
            }
            runs
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let engine = Engine::new();
    let t0 = Instant::now();
    let mut cycles = 0u32;
    let mut hits_total = 0u64;
    let mut cycles_with_hits = 0u32;
    while cycles < 1000 && t0.elapsed() < Duration::from_secs(60) {
        engine
            .apply(pid, &b)
            .unwrap_or_else(|e| panic!("apply #{cycles}: [{}] {e}", e.code()));
        std::thread::sleep(Duration::from_millis(2));
        let rev = engine
            .revert(pid, "ST-2026-0600")
            .unwrap_or_else(|e| panic!("revert #{cycles}: [{}] {e}", e.code()));
        hits_total += rev.hits;
        cycles_with_hits += u32::from(rev.hits > 0);
        cycles += 1;
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let runs = load.join().unwrap();
    assert!(
        matches!(server.try_wait(), Ok(None)),
        "redis-server still running"
    );
    let info = cli(port, &["INFO", "stats"]);
    let errors: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("total_error_replies") || l.starts_with("rejected_connections"))
        .collect();
    eprintln!(
        "redis: {cycles} apply/revert cycles in {:.1} s, {} benchmark runs, {hits_total} hits ({cycles_with_hits} cycles with hits); {errors:?}",
        elapsed.as_secs_f64(),
        runs.len()
    );
    for (ok, out) in &runs {
        assert!(ok, "a benchmark run failed: {out}");
        assert!(
            !out.to_lowercase().contains("error"),
            "benchmark reported an error: {out}"
        );
    }
    for l in errors {
        assert!(l.ends_with(":0"), "{l}");
    }
    assert_eq!(cli(port, &["SET", "k", "v"]), "OK");
    assert_eq!(cli(port, &["GET", "k"]), "v");
    assert!(cycles >= 100, "{cycles} cycles");
    assert!(
        hits_total > 0 && cycles_with_hits > cycles / 2,
        "the hit count moves"
    );
    let _ = server.kill();
    let _ = server.wait();
}

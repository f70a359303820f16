//! Engine benchmarks (a plain binary, `harness = false`). Needs ptrace rights (root) and gcc;
//! gdb and Python's `frida` for the side-by-side comparison (skipped when missing).
//!
//! ```sh
//! cargo bench -p stitch-engine --bench apply            # all
//! cargo bench -p stitch-engine --bench apply -- pause   # one section: pause | call | tools | all-procs
//! ```
//!
//! Prints one Markdown table per section, ready for docs/benchmarks.md.

#![allow(clippy::print_stdout, reason = "a benchmark report")]

#[path = "../tests/common.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stitch_engine::Engine;

const SPIN_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
static void *spin(void *a) { volatile int s = 0; for (;;) s += compute(s); return a; }
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < n - 1; i++) { pthread_t t; pthread_create(&t, 0, spin, 0); }
    char line[64];
    while (fgets(line, sizeof line, stdin)) printf("%d\n", compute(atoi(line)));
    return 0;
}
"#;

/// "n" calls compute through a function pointer n times and prints ns per call.
const CALL_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
__attribute__((noinline)) int after(int x) { return x * 7 + 3; }
int (*volatile fp)(int) = compute;
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        long n = atol(line);
        if (n < 1000) { printf("%d\n", compute((int)n) + 0 * after((int)n)); continue; }
        struct timespec a, b; int s = 0;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++) s += fp((int)i);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.3f %d\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n, s);
    }
    return 0;
}
"#;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn pause_section() {
    println!("\n### Apply wall time and stop-the-world pause (release build)\n");
    println!(
        "| threads | region | runs | apply p50 | apply p99 | pause p50 | pause p99 | stop-all p50 | held p50 | runs with a site retry | revert p50 |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let t = compile(SPIN_C, &["-O2"]);
    let b = patch(&t, "ST-2026-0900", "compute", "before", "stitch_hit");
    // Per case: the p50 of each phase of the pause (ApplyReport::phases).
    let mut breakdown: Vec<(String, Vec<(&'static str, f64)>)> = Vec::new();
    for (threads, runs) in [(1usize, 300usize), (8, 200), (64, 100)] {
        let mut r = Running::start_args(&t.exe, &[&threads.to_string()]);
        // "created": every revert unmaps the emptied region, so every apply maps one (the
        // first apply to a module in a process); "kept": the default, the region emptied by
        // a revert is kept and reused.
        for keep in [false, true] {
            let mut engine = Engine::new();
            engine.options.keep_idle_regions = keep;
            let (mut apply, mut pause, mut stop, mut held, mut revert) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut retried = 0usize;
            let mut phases: Vec<(&'static str, Vec<f64>)> = Vec::new();
            // Runs of the other case: a revert that could not unmap the region (a thread was
            // still in a trampoline) makes the next "created" apply reuse it.
            let mut other = 0usize;
            for i in 0..=runs {
                let t0 = Instant::now();
                let rep = engine.apply(r.pid(), &b).expect("apply");
                let wall = us(t0.elapsed());
                let t1 = Instant::now();
                let rev = engine.revert(r.pid(), "ST-2026-0900").expect("revert");
                let rev_wall = us(t1.elapsed());
                if keep && i == 0 {
                    continue; // the kept region's first apply maps it
                }
                assert!(
                    !keep || !rev.region_freed,
                    "a kept region is never unmapped"
                );
                if rep.region_created == keep {
                    other += 1;
                    continue;
                }
                apply.push(wall);
                if rep.site_retries > 0 {
                    retried += 1;
                }
                stop.push(us(rep.stopping));
                held.push(us(rep.pause));
                for &(name, d) in &rep.phases {
                    match phases.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, v)) => v.push(us(d)),
                        None => phases.push((name, vec![us(d)])),
                    }
                }
                pause.push(us(rep.stopping + rep.pause));
                revert.push(rev_wall);
            }
            breakdown.push((
                format!("{threads} | {}", if keep { "kept" } else { "created" }),
                phases.iter_mut().map(|(n, v)| (*n, pct(v, 0.5))).collect(),
            ));
            if other > 0 {
                eprintln!(
                    "{threads} threads, keep {keep}: {other} runs of the other case left out"
                );
            }
            println!(
                "| {threads} | {} | {} | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {retried} | {:.0} us |",
                if keep { "kept" } else { "created" },
                apply.len(),
                pct(&mut apply, 0.5),
                pct(&mut apply, 0.99),
                pct(&mut pause, 0.5),
                pct(&mut pause, 0.99),
                pct(&mut stop, 0.5),
                pct(&mut held, 0.5),
                pct(&mut revert, 0.5),
            );
        }
        assert_eq!(r.ask(1), "2");
    }
    if let Some((_, first)) = breakdown.first() {
        let names: Vec<&str> = first.iter().map(|(n, _)| *n).collect();
        println!("\nWhere the pause goes (p50 of each phase, us):\n");
        println!("| threads | region | {} | sum |", names.join(" | "));
        println!("|---:|---|{}---:|", "---:|".repeat(names.len()));
        for (case, p) in &breakdown {
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    p.iter()
                        .find(|(m, _)| m == n)
                        .map_or("-".into(), |(_, v)| format!("{v:.0}"))
                })
                .collect();
            let sum: f64 = p.iter().map(|(_, v)| v).sum();
            println!("| {case} | {} | {sum:.0} |", cells.join(" | "));
        }
    }
    println!(
        "\napply = plan + stop + commit + release, as `stitch apply --pid` runs it; pause = from the first seize until every thread is released (stop-all + held); region created = the apply maps the region (a module's first patch in a process), kept = it reuses the one a revert emptied."
    );
}

fn call_section() {
    println!("\n### Cost of a call through a patched site\n");
    let t = compile(CALL_C, &["-O2", "-fno-omit-frame-pointer"]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let n = 50_000_000;
    let measure = |r: &mut Running| -> f64 {
        let mut v: Vec<f64> = (0..5)
            .map(|_| {
                let a = r.ask_str(&n.to_string());
                a.split_whitespace().next().unwrap().parse::<f64>().unwrap()
            })
            .collect();
        pct(&mut v, 0.5)
    };
    let base = measure(&mut r);
    let before = patch(&t, "ST-2026-0901", "compute", "before", "stitch_hit");
    engine.apply(r.pid(), &before).unwrap();
    let hit = measure(&mut r);
    engine.revert(r.pid(), "ST-2026-0901").unwrap();
    let nohit = patch(&t, "ST-2026-0902", "compute", "before", "nop");
    engine.apply(r.pid(), &nohit).unwrap();
    let plain = measure(&mut r);
    engine.revert(r.pid(), "ST-2026-0902").unwrap();
    println!("| call of `compute` (indirect, -O2) | ns per call | ratio |");
    println!("|---|---:|---:|");
    println!("| unpatched | {base:.2} | 1.00 |");
    println!(
        "| patched, `displaced = \"before\"`, code `nop` (jump + trampoline + jump back) | {plain:.2} | {:.2} |",
        plain / base
    );
    println!(
        "| patched, `displaced = \"before\"`, code `stitch_hit` (+ one `lock inc`) | {hit:.2} | {:.2} |",
        hit / base
    );
    println!("\nMedian of 5 runs of {n} calls each, measured inside the target.");
}

fn tools_section() {
    println!("\n### Side by side: the same function in the same program\n");
    let t = compile(SPIN_C, &["-O2"]);
    let (at, original) = entry_site(&t.bytes, "compute");
    let mut r = Running::start_args(&t.exe, &["1"]);
    let pid = r.pid();
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0903", "compute", "before", "stitch_hit");
    let runs = 20;
    let mut ours = Vec::new();
    let mut site = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let rep = engine.apply(pid, &b).unwrap();
        ours.push(us(t0.elapsed()));
        site = rep.plan.sites[0].addr;
        engine.revert(pid, "ST-2026-0903").unwrap();
    }
    let _ = at;
    let stitch = pct(&mut ours, 0.5);
    println!("| tool | what | runs | p50 wall | ratio to Stitch |");
    println!("|---|---|---:|---:|---:|");
    println!(
        "| Stitch (engine, release) | plan + stop + verify + region + trampoline + jump + release | {runs} | {stitch:.0} us | 1 |"
    );
    if have("gdb") {
        let bytes: Vec<String> = original.iter().map(|b| format!("{b:#04x}")).collect();
        let set = format!(
            "set {{unsigned char[{}]}}{site:#x} = {{{}}}",
            original.len(),
            bytes.join(",")
        );
        let mut v = Vec::new();
        for _ in 0..runs.min(10) {
            let t0 = Instant::now();
            let st = Command::new("gdb")
                .args(["-nx", "-p", &pid.0.to_string(), "-batch", "-ex", &set])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            v.push(us(t0.elapsed()));
        }
        let g = pct(&mut v, 0.5);
        println!(
            "| gdb -p PID -batch | attach, write the {} site bytes, detach | {} | {:.0} us | {:.0}x |",
            original.len(),
            v.len(),
            g,
            g / stitch
        );
    }
    let frida_ok = Command::new("python3")
        .args(["-c", "import frida"])
        .status()
        .is_ok_and(|s| s.success());
    if frida_ok {
        let script = format!(
            r#"
import frida, time, sys
pid = {pid}
ts = []
for i in range(10):
    t0 = time.perf_counter()
    s = frida.attach(pid)
    sc = s.create_script("""
const addr = ptr('{site:#x}');
Interceptor.attach(addr, {{ onEnter() {{}} }});
send('ok');
""")
    done = []
    sc.on('message', lambda m, d: done.append(m))
    sc.load()
    while not done: time.sleep(0.0005)
    ts.append(time.perf_counter() - t0)
    sc.unload(); s.detach()
ts.sort()
print(ts[len(ts)//2] * 1e6, len(ts))
"#
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some((p50, n)) = text.trim().split_once(' ') {
            let p50: f64 = p50.parse().unwrap();
            println!(
                "| Frida {} (Python), Interceptor.attach | attach (inject agent), hook the same address, script loaded | {n} | {p50:.0} us | {:.0}x |",
                frida_version(),
                p50 / stitch
            );
        } else {
            println!(
                "| Frida | failed: {} | | | |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
    }
    assert_eq!(r.ask(1), "2");
}

fn frida_version() -> String {
    Command::new("python3")
        .args(["-c", "import frida; print(frida.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn all_procs_section() {
    println!("\n### `stitch apply --all` over 1,000 processes\n");
    let cli = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/stitch");
    if !cli.exists() {
        println!("(skipped: build the CLI first: cargo build --release -p stitch-cli)");
        return;
    }
    let t = compile(
        "#include <unistd.h>\n__attribute__((noinline)) int compute(int x) { return x + 1; }\n__attribute__((noinline)) int after(int x) { return x * 7; }\nint main(int c, char **v) { (void)v; if (c > 5) return compute(c) + after(c); for (;;) pause(); }\n",
        &["-O2", "-fno-omit-frame-pointer"],
    );
    let b = patch(&t, "ST-2026-0904", "compute", "before", "stitch_hit");
    let (bundle, keys) = write_bundle(t.dir.path(), &b);
    let n = 1000;
    let mut kids: Vec<std::process::Child> = (0..n)
        .map(|_| Command::new(&t.exe).spawn().unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let out = Command::new(&cli)
        .args(["apply", "--all"])
        .arg(&bundle)
        .arg("--trusted-keys")
        .arg(&keys)
        .arg("--json")
        .output()
        .unwrap();
    let wall = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text.matches("\"ok\": true").count();
    let t1 = Instant::now();
    let rev = Command::new(&cli)
        .args(["revert", "ST-2026-0904", "--all", "--json"])
        .output()
        .unwrap();
    let rev_wall = t1.elapsed();
    let reverted = String::from_utf8_lossy(&rev.stdout)
        .matches("\"ok\": true")
        .count();
    for k in &mut kids {
        let _ = k.kill();
    }
    for k in &mut kids {
        let _ = k.wait();
    }
    println!(
        "| processes | patched | `apply --all` wall | per process | reverted | `revert --all` wall |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {ok} | {:.3} s | {:.0} us | {reverted} | {:.3} s |",
        wall.as_secs_f64(),
        us(wall) / n as f64,
        rev_wall.as_secs_f64()
    );
}

fn main() {
    let what: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| what.is_empty() || what.iter().any(|w| w == s);
    if !is_root() {
        println!("needs root (ptrace of processes, as the engine runs in production)");
        return;
    }
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: {} vCPU, kernel {uname}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("pause") {
        pause_section();
    }
    if want("call") {
        call_section();
    }
    if want("tools") {
        tools_section();
    }
    if want("all-procs") {
        all_procs_section();
    }
}

//! Measures the stop-the-world pause: wall time of `stop_all` + `resume` (and with one remote
//! mmap/munmap pair inside the window) on a target whose threads all spin, for 1, 8 and 64
//! threads, with and without SCHED_FIFO for the tracer thread.
//!
//! `cargo run --release -p stitch-sys --example stop_pause [ITERATIONS]` (needs gcc and root).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stitch_sys::{Pid, Placement, RealtimeGuard, stop_all};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("spin");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/spin.c");
    let ok = Command::new("gcc")
        .args(["-O1", "-pthread", "-o"])
        .arg(&bin)
        .arg(src)
        .status();
    assert!(ok.is_ok_and(|s| s.success()), "gcc failed");

    println!(
        "threads  fifo   window                      min    p50    p90    max  (us, {iterations} runs)"
    );
    for threads in [1usize, 8, 64] {
        let mut child = Command::new(&bin)
            .arg((threads - 1).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut pid = Pid(0);
        for line in lines.by_ref() {
            let line = line.expect("line");
            if let Some(p) = line.strip_prefix("pid=") {
                pid = Pid(p.parse().expect("pid"));
            }
            if line == "ready" {
                break;
            }
        }
        for fifo in [false, true] {
            for with_mmap in [false, true] {
                let mut samples = Vec::with_capacity(iterations);
                for _ in 0..iterations {
                    std::thread::sleep(Duration::from_millis(20));
                    let guard = fifo.then(RealtimeGuard::enter);
                    if let Some(g) = &guard {
                        assert!(g.active(), "SCHED_FIFO not permitted");
                    }
                    let t0 = Instant::now();
                    let mut sp =
                        stop_all(pid, Instant::now() + Duration::from_secs(5)).expect("stop_all");
                    assert_eq!(sp.tids().len(), threads);
                    if with_mmap {
                        let a = sp
                            .remote_mmap(Placement::Anywhere, 4096, libc::PROT_READ)
                            .expect("mmap");
                        sp.remote_munmap(a, 4096).expect("munmap");
                    }
                    sp.resume().expect("resume");
                    samples.push(t0.elapsed());
                    drop(guard);
                }
                samples.sort();
                println!(
                    "{threads:>7}  {:<5}  {:<24} {:>6} {:>6} {:>6} {:>6}",
                    if fifo { "yes" } else { "no" },
                    if with_mmap {
                        "stop+mmap+munmap+resume"
                    } else {
                        "stop+resume"
                    },
                    us(samples[0]),
                    us(percentile(&samples, 0.5)),
                    us(percentile(&samples, 0.9)),
                    us(samples[samples.len() - 1]),
                );
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

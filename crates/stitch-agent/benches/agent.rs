//! Agent benchmarks (release, root): `cargo bench -p stitch-agent --bench agent`.
//!
//! - start-up: `stitchd` started with a patch in its store while 1,000 processes run
//!   (a) 10 of them targets, (b) all 1,000 targets, (c) restart with all 1,000 already
//!   patched (rediscovery only); ready = start-up pass done, control socket serving.
//! - publish-to-applied: time from the upload on the server to the patch being live in a
//!   running process (long-poll path).
//! - idle: CPU and RSS of an enrolled agent holding patches, over `STITCH_BENCH_IDLE_S`
//!   (default 60) seconds.
//!
//! `STITCH_BENCH_PROCS` overrides 1,000, `STITCH_BENCH_ONLY=startup|latency|quiet` runs one
//! part; the agent inherits `STITCH_*` overrides (e.g. `STITCH_HOOK=0`). Results go to stdout;
//! docs/benchmarks.md records them.

#[path = "../tests/harness.rs"]
mod harness;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use stitch_agent::AgentAction;
use stitch_agent::store::{InstalledPatch, Store};

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Sleepers(Vec<Child>);
impl Drop for Sleepers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn sleepers(n: usize) -> Sleepers {
    Sleepers(
        (0..n)
            .map(|_| {
                Command::new("sleep")
                    .arg("3600")
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("sleep")
            })
            .collect(),
    )
}

fn seed_store(dir: &std::path::Path, bundle: &[u8]) {
    let mut keys = stitch_format::TrustedKeys::new();
    keys.insert(vendor_key().public());
    let (store, _) = Store::open(dir).unwrap();
    let ca = hex::encode(sha2_digest(bundle));
    let vb = store.put_bundle(&ca, bundle, &keys).unwrap();
    store
        .upsert_patch(&InstalledPatch {
            patch_id: vb.patch().id.clone(),
            revision: vb.patch().revision,
            content_address: ca,
            server_enabled: true,
            local_enabled: true,
            crash_disabled: None,
            title: vb.patch().title.clone(),
            installed_at: 0,
        })
        .unwrap();
}

fn sha2_digest(b: &[u8]) -> [u8; 32] {
    stitch_elf::sha256(b)
}

fn start_and_time(agent: &mut Agent) -> (Duration, serde_json::Value) {
    let t0 = Instant::now();
    agent.start();
    let wall = t0.elapsed();
    (wall, agent.ask(AgentAction::Status))
}

fn bench_startup(n: usize) {
    let target = compile(&unique_tag("bench-startup"));
    let bundle = patch_bundle(
        &target,
        "ST-2026-0901",
        "stitch_hit\nmov eax, 1000\nret",
        &vendor_key(),
    );

    // (a) n processes, 10 of them targets.
    {
        let _others = sleepers(n - 10);
        let mut runs: Vec<Running> = (0..10).map(|_| Running::start(&target.exe)).collect();
        let home = tempfile::tempdir().unwrap();
        let mut agent = Agent::configure(
            home.path(),
            &AgentOpts {
                realistic: true,
                ..Default::default()
            },
        );
        seed_store(&agent.dir, &bundle);
        let (wall, s) = start_and_time(&mut agent);
        assert_eq!(s["processes_patched"], 10);
        assert!(runs.iter_mut().all(Running::patched));
        println!(
            "startup[{n} processes, 10 targets]: ready_after_ms={} (agent-measured), socket answering after {:?}, full scan {} ms over {} processes",
            s["ready_after_ms"],
            wall,
            s["metrics"]["last_scan_ms"],
            s["metrics"]["last_scan_processes"]
        );
    }
    // (b) n targets, all to patch; (c) restart: all already patched.
    {
        let mut runs: Vec<Running> = (0..n).map(|_| Running::start(&target.exe)).collect();
        let home = tempfile::tempdir().unwrap();
        let mut agent = Agent::configure(
            home.path(),
            &AgentOpts {
                realistic: true,
                ..Default::default()
            },
        );
        seed_store(&agent.dir, &bundle);
        let (wall, s) = start_and_time(&mut agent);
        assert_eq!(s["processes_patched"], n as u64);
        println!(
            "startup[{n} targets, all patched at start]: ready_after_ms={}, socket answering after {:?}",
            s["ready_after_ms"], wall
        );
        agent.kill();
        let (wall, s) = start_and_time(&mut agent);
        assert_eq!(s["processes_patched"], n as u64);
        assert_eq!(s["metrics"]["applied"], 0);
        println!(
            "startup[{n} targets, restart, rediscovery only]: ready_after_ms={}, socket answering after {:?}",
            s["ready_after_ms"], wall
        );
        assert!(runs.iter_mut().take(5).all(Running::patched));
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = &s[s.rfind(')').map_or(0, |i| i + 1)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn bench_latency_and_idle(samples: usize, idle: Duration) {
    let server = Server::start_with(false, Duration::from_secs(60));
    let home = tempfile::tempdir().unwrap();
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            realistic: true,
            ..Default::default()
        },
    );
    agent.start();
    wait_until("inventory", Duration::from_secs(30), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    // Let the first long-poll settle.
    std::thread::sleep(Duration::from_secs(1));
    let mut lat = Vec::new();
    let mut keep = Vec::new();
    for i in 0..samples {
        let t = compile(&unique_tag("bench-latency"));
        let mut run = Running::start(&t.exe);
        let bundle = patch_bundle(
            &t,
            &format!("ST-2026-09{:02}", 10 + i),
            "stitch_hit\nmov eax, 1000\nret",
            &vendor_key(),
        );
        let t0 = server.publish(bundle);
        wait_until("applied", Duration::from_secs(30), || {
            run.patched().then_some(())
        });
        lat.push(t0.elapsed());
        keep.push((t, run));
        std::thread::sleep(Duration::from_millis(500));
    }
    lat.sort();
    println!(
        "publish-to-applied ({samples} patches, long-poll): min {:?}, median {:?}, max {:?}",
        lat[0],
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    let pid = agent.child.as_ref().map(|c| c.id()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let m0 = agent.ask(AgentAction::Status)["metrics"].clone();
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(idle);
    let (c1, dt) = (cpu_ticks(pid), t0.elapsed());
    let m1 = agent.ask(AgentAction::Status)["metrics"].clone();
    let d = |k: &str| m1[k].as_u64().unwrap_or(0) - m0[k].as_u64().unwrap_or(0);
    println!(
        "  during the idle window the host produced {} exec/fork/crash events for the agent ({:.0}/s) and {} exec checks",
        d("proc_events"),
        d("proc_events") as f64 / dt.as_secs_f64(),
        d("exec_checks")
    );
    let clk = 100.0; // USER_HZ on Linux x86_64
    let pct = (c1 - c0) as f64 / clk / dt.as_secs_f64() * 100.0;
    println!(
        "idle over {:?} (enrolled, {} patches applied in {} processes, long-poll open): CPU {:.3}% ({} ticks), RSS {} KiB",
        dt,
        samples,
        samples,
        pct,
        c1 - c0,
        rss_kb(pid)
    );
}

/// The agent alone, without process events: long-poll, hit counters, heartbeats.
fn bench_idle_quiet(idle: Duration) {
    let server = Server::start_with(false, Duration::from_secs(60));
    let home = tempfile::tempdir().unwrap();
    let target = compile(&unique_tag("bench-quiet"));
    let mut run = Running::start(&target.exe);
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            realistic: true,
            ..Default::default()
        },
    );
    // Process events off: what the agent costs by itself.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    let cfg = cfg.replace("[scan]\n", "[scan]\nproc_connector = false\n");
    std::fs::write(&agent.config, cfg).unwrap();
    agent.start();
    wait_until("inventory", Duration::from_secs(30), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    server.publish(patch_bundle(
        &target,
        "ST-2026-0990",
        "stitch_hit\nmov eax, 1000\nret",
        &vendor_key(),
    ));
    wait_until("applied", Duration::from_secs(30), || {
        run.patched().then_some(())
    });
    let pid = agent.child.as_ref().map(|c| c.id()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(idle);
    let (c1, dt) = (cpu_ticks(pid), t0.elapsed());
    println!(
        "idle over {:?} without process events (enrolled, 1 patch applied, long-poll open): CPU {:.3}% ({} ticks), RSS {} KiB",
        dt,
        (c1 - c0) as f64 / 100.0 / dt.as_secs_f64() * 100.0,
        c1 - c0,
        rss_kb(pid)
    );
}

fn main() {
    if !can_run() {
        return;
    }
    let n = env_num("STITCH_BENCH_PROCS", 1000) as usize;
    let idle = Duration::from_secs(env_num("STITCH_BENCH_IDLE_S", 60));
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // STITCH_BENCH_ONLY=startup|latency|quiet runs one part.
    let only = std::env::var("STITCH_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    if run("startup") {
        bench_startup(n);
    }
    if run("latency") {
        bench_latency_and_idle(5, idle);
    }
    if run("quiet") {
        bench_idle_quiet(idle);
    }
}

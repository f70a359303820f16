//! `stitch-loadgen`: simulates N agents heartbeating against a running stitch-server.
//!
//! Each simulated agent enrolls, then heartbeats like the real agent: host facts, a few
//! patch states and a ~1500-package inventory drawn from `--images` distinct machine images
//! (a fleet is mostly a handful of images). It sends the inventory's hash and uploads the list
//! only when the server answers `inventory_required`. A fraction of heartbeats change a patch
//! state (`--state-churn`), which exercises the state write path.
//!
//! Reports heartbeats/s and latency percentiles of the measured phase.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use stitch_server::model::InstalledPackage;

#[derive(Parser, Debug)]
#[command(about = "Simulate N Stitch agents heartbeating against a server")]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8440")]
    url: String,
    /// Enrollment token (from `stitch-server --bootstrap-org ...`).
    #[arg(long, env = "STITCH_ENROLLMENT_TOKEN")]
    enrollment_token: String,
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured heartbeats per agent (after one unmeasured warm-up heartbeat each).
    #[arg(long, default_value_t = 0)]
    rounds: usize,
    /// Measure for this many seconds instead of `rounds` (agents heartbeat round-robin).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Packages per inventory.
    #[arg(long, default_value_t = 1500)]
    packages: usize,
    /// Distinct machine images (inventories) in the fleet.
    #[arg(long, default_value_t = 50)]
    images: usize,
    /// Fraction of heartbeats that report a changed patch state.
    #[arg(long, default_value_t = 0.01)]
    state_churn: f64,
}

struct Agent {
    cred: String,
    hostname: String,
    image: usize,
}

fn inventory(image: usize, n: usize) -> (Vec<InstalledPackage>, String) {
    let mut v: Vec<InstalledPackage> = (0..n)
        .map(|i| InstalledPackage {
            ecosystem: "deb".into(),
            name: format!("pkg-{i:04}-lib{}", i % 97),
            // Images differ in a few versions, like patch levels of one distribution.
            version: if i % 50 == image % 50 {
                format!("1.{i}.{image}-1")
            } else {
                format!("1.{i}.0-1")
            },
        })
        .collect();
    v.sort();
    let h = stitch_server::api::packages_hash(&v);
    (v, h)
}

fn body(a: &Agent, hash: &str, packages: Option<&[InstalledPackage]>, tick: u64) -> Value {
    let state = if tick.is_multiple_of(2) {
        "applied"
    } else {
        "pending"
    };
    let mut b = json!({
        "hostname": a.hostname,
        "os": { "id": "debian", "version_id": "12", "pretty_name": "Debian GNU/Linux 12 (bookworm)" },
        "kernel": "6.1.0-18-amd64",
        "ip_addresses": ["10.1.2.3", "fd00::3"],
        "agent_version": "0.1.0",
        "agent_enabled": true,
        "packages_hash": hash,
        "patches": [
            { "patch_id": "ST-2026-0001", "revision": 1, "state": "applied", "processes": 4 },
            { "patch_id": "ST-2026-0002", "revision": 2, "state": state, "processes": 1 },
            { "patch_id": "ST-2026-0003", "revision": 1, "state": "failed", "processes": 0, "error_code": "engine.unexpected_bytes" },
        ],
    });
    if let Some(p) = packages {
        b["packages"] = serde_json::to_value(p).unwrap_or(Value::Null);
    }
    b
}

async fn heartbeat(
    http: &reqwest::Client,
    url: &str,
    a: &Agent,
    inv: &[(Vec<InstalledPackage>, String)],
    tick: u64,
) -> anyhow::Result<()> {
    let (pk, hash) = &inv[a.image];
    let r = http
        .post(format!("{url}/api/v1/agent/heartbeat"))
        .bearer_auth(&a.cred)
        .json(&body(a, hash, None, tick))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "heartbeat: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let v: Value = r.json().await?;
    if v["inventory_required"] == true {
        let r = http
            .post(format!("{url}/api/v1/agent/heartbeat"))
            .bearer_auth(&a.cred)
            .json(&body(a, hash, Some(pk), tick))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "heartbeat with inventory: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let inv: Arc<Vec<_>> = Arc::new(
        (0..args.images.max(1))
            .map(|i| inventory(i, args.packages))
            .collect(),
    );

    // Enroll.
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (http, url, next, token, n, images) = (
            http.clone(),
            url.clone(),
            next.clone(),
            args.enrollment_token.clone(),
            args.agents,
            args.images.max(1),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let hostname = format!("sim-{i:06}");
                let r = http
                    .post(format!("{url}/api/v1/enroll"))
                    .json(&json!({ "enrollment_token": token, "hostname": hostname }))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!(
                        "enroll: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                }
                let v: Value = r.json().await?;
                let cred = v["credential"]
                    .as_str()
                    .context("no credential")?
                    .to_string();
                out.push(Agent {
                    cred,
                    hostname,
                    image: i % images,
                });
            }
            Ok(out)
        }));
    }
    let mut agents = Vec::with_capacity(args.agents);
    for t in tasks {
        agents.extend(t.await??);
    }
    let enroll_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "enrolled {} agents in {enroll_s:.1}s ({:.0}/s)",
        agents.len(),
        agents.len() as f64 / enroll_s
    );
    let agents = Arc::new(agents);

    // Warm-up: one heartbeat each (first inventory per image is uploaded here).
    let t1 = Instant::now();
    run_phase(
        &http,
        &url,
        &agents,
        &inv,
        args.concurrency,
        agents.len() as u64,
        None,
        0.0,
    )
    .await?;
    let warm_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "warm-up: {} first heartbeats in {warm_s:.1}s ({:.0}/s)",
        agents.len(),
        agents.len() as f64 / warm_s
    );

    // Measured phase.
    let total = if args.rounds > 0 {
        (args.rounds * agents.len()) as u64
    } else {
        u64::MAX
    };
    let deadline = (args.rounds == 0).then(|| Instant::now() + Duration::from_secs(args.seconds));
    let t2 = Instant::now();
    let mut lat = run_phase(
        &http,
        &url,
        &agents,
        &inv,
        args.concurrency,
        total,
        deadline,
        args.state_churn,
    )
    .await?;
    let secs = t2.elapsed().as_secs_f64();
    lat.sort_unstable();
    let n = lat.len();
    println!(
        "{}",
        json!({
            "agents": agents.len(),
            "concurrency": args.concurrency,
            "packages_per_agent": args.packages,
            "images": args.images,
            "heartbeats": n,
            "seconds": (secs * 100.0).round() / 100.0,
            "heartbeats_per_s": (n as f64 / secs).round(),
            "p50_ms": pct(&lat, 0.50),
            "p99_ms": pct(&lat, 0.99),
            "max_ms": pct(&lat, 1.0),
            "enroll_per_s": (agents.len() as f64 / enroll_s).round(),
        })
    );
    Ok(())
}

/// Heartbeats agents round-robin until `total` heartbeats or `deadline`; returns latencies (µs).
#[allow(clippy::too_many_arguments, reason = "a benchmark phase's knobs")]
async fn run_phase(
    http: &reqwest::Client,
    url: &str,
    agents: &Arc<Vec<Agent>>,
    inv: &Arc<Vec<(Vec<InstalledPackage>, String)>>,
    concurrency: usize,
    total: u64,
    deadline: Option<Instant>,
    churn: f64,
) -> anyhow::Result<Vec<u64>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (http, url, agents, inv, next) = (
            http.clone(),
            url.to_string(),
            agents.clone(),
            inv.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let churn_every = if churn > 0.0 {
                (1.0 / churn).round() as u64
            } else {
                u64::MAX
            };
            let mut k = w as u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let a = &agents[(i % agents.len() as u64) as usize];
                k += 1;
                let tick = if k.is_multiple_of(churn_every) { k } else { 0 };
                let s = Instant::now();
                heartbeat(&http, &url, a, &inv, tick).await?;
                lat.push(s.elapsed().as_micros() as u64);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

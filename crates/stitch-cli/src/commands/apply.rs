//! `stitch apply`, `stitch revert`, `stitch ps`: the engine on the command line.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use stitch_engine::fanout::{jobs, par_map};
use stitch_engine::{AppliedPatch, Engine, EngineError, Plan};
use stitch_format::{Bundle, TrustedKeys, VerifiedBundle};
use stitch_sys::Pid;

use super::read;

fn load_verified(bundle: &Path, trusted_keys: &Path) -> anyhow::Result<VerifiedBundle> {
    let text = String::from_utf8(read(trusted_keys)?).context("trusted keys file is not text")?;
    let trusted = TrustedKeys::from_text(&text)
        .with_context(|| format!("reading trusted keys {}", trusted_keys.display()))?;
    Bundle::decode_verified(&read(bundle)?, &trusted)
        .with_context(|| format!("verifying {}", bundle.display()))
}

/// Every numeric entry of /proc except ourselves.
fn all_pids() -> Vec<Pid> {
    let me = std::process::id() as i32;
    let mut v: Vec<Pid> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != me)
        .map(Pid)
        .collect();
    v.sort();
    v
}

fn comm(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A one-line progress indicator on stderr when it is a terminal.
struct Progress {
    tty: bool,
    total: usize,
}

impl Progress {
    fn tick(&self, done: usize, what: &str) {
        if self.tty {
            let width = 30;
            let filled = (done * width).checked_div(self.total).unwrap_or(width);
            eprint!(
                "\r[{}{}] {done}/{} {what:<30.30}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
            let _ = std::io::stderr().flush();
        }
    }
    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn print_plan(plan: &Plan) {
    println!(
        "plan for pid {} ({}): {} r{}",
        plan.pid,
        comm(plan.pid),
        plan.patch_id,
        plan.revision
    );
    println!(
        "  module  {}  bias {:#x}  sha256 {}",
        plan.module_path,
        plan.module_bias,
        hex::encode(plan.module_sha256)
    );
    let (kind, addr) = match plan.region {
        stitch_engine::RegionPlan::Existing { addr } => ("existing", addr),
        stitch_engine::RegionPlan::New { addr } => ("new, proposed", addr),
    };
    println!(
        "  region  {addr:#x} ({kind}); record at +{:#x}, trampolines from +{:#x}",
        plan.record_offset, plan.tramp_offset
    );
    for s in &plan.sites {
        println!(
            "  site {:?} at {:#x}: {} -> {}",
            s.patchlet,
            s.addr,
            stitch_build::hex_spaced(&s.original),
            stitch_build::hex_spaced(&s.new_bytes)
        );
        println!(
            "    trampoline at {:#x} ({} bytes):",
            s.tramp_addr,
            s.trampoline.len()
        );
        for l in stitch_x86::disassemble(&s.trampoline, s.tramp_addr) {
            println!(
                "      {:#x}  {:<24} {}",
                l.addr,
                stitch_build::hex_spaced(&l.bytes),
                l.text
            );
        }
    }
}

struct Row {
    pid: Pid,
    comm: String,
    outcome: Result<String, (String, String)>,
}

fn print_rows(rows: &[Row], json: bool) -> anyhow::Result<()> {
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| match &r.outcome {
                Ok(d) => serde_json::json!({"pid": r.pid.0, "comm": r.comm, "ok": true, "detail": d}),
                Err((code, msg)) => serde_json::json!({"pid": r.pid.0, "comm": r.comm, "ok": false, "code": code, "message": msg}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:>8}  {:<16} {:<8} detail", "PID", "COMMAND", "RESULT");
    for r in rows {
        match &r.outcome {
            Ok(d) => println!("{:>8}  {:<16} {:<8} {d}", r.pid, r.comm, "ok"),
            Err((code, msg)) => println!(
                "{:>8}  {:<16} {:<8} [{code}] {msg}",
                r.pid, r.comm, "FAILED"
            ),
        }
    }
    let ok = rows.iter().filter(|r| r.outcome.is_ok()).count();
    println!("{ok} ok, {} failed", rows.len() - ok);
    Ok(())
}

pub(crate) fn apply(
    bundle: &Path,
    pids: &[i32],
    all: bool,
    trusted_keys: &Path,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let verified = load_verified(bundle, trusted_keys)?;
    let engine = Engine::new();
    let started = Instant::now();
    let targets: Vec<Pid> = if all {
        all_pids()
    } else {
        pids.iter().map(|&p| Pid(p)).collect()
    };
    let progress = Progress {
        tty: all && !json && std::io::stderr().is_terminal(),
        total: targets.len(),
    };
    // One process: plan, then (unless a dry run) apply. `None`: not a target (with --all).
    let one = |&pid: &Pid| -> Option<(Row, Option<Plan>)> {
        let name = comm(pid);
        let plan = match engine.plan(pid, &verified) {
            Ok(p) => p,
            // With --all, processes that do not map the module are simply not targets.
            Err(EngineError::ModuleNotMapped { .. } | EngineError::Io { .. }) if all => {
                return None;
            }
            Err(EngineError::Sys(ref e)) if all && e.is_gone() => return None,
            Err(e) => {
                let row = Row {
                    pid,
                    comm: name,
                    outcome: Err((e.code().into(), e.to_string())),
                };
                return Some((row, None));
            }
        };
        if dry_run {
            let row = Row {
                pid,
                comm: name,
                outcome: Ok("planned (dry run)".into()),
            };
            return Some((row, Some(plan)));
        }
        let outcome = engine
            .apply_plan(&plan, &verified)
            .map(|r| {
                format!(
                    "{} site(s), {} thread(s) paused {:.0} us{}",
                    r.plan.sites.len(),
                    r.threads,
                    r.pause.as_secs_f64() * 1e6,
                    if r.region_created { ", new region" } else { "" }
                )
            })
            .map_err(|e| (e.code().to_string(), e.to_string()));
        let row = Row {
            pid,
            comm: name,
            outcome,
        };
        Some((row, None))
    };
    let done = par_map(&targets, jobs(targets.len()), one, |i| {
        progress.tick(i, "");
    });
    progress.finish();
    let mut rows = Vec::new();
    for (row, plan) in done.into_iter().flatten() {
        if let Some(plan) = plan
            && !json
        {
            print_plan(&plan);
        }
        rows.push(row);
    }
    print_rows(&rows, json)?;
    if !json {
        println!("{:.3} s", started.elapsed().as_secs_f64());
    }
    let failed = rows.iter().filter(|r| r.outcome.is_err()).count();
    if failed > 0 {
        anyhow::bail!("{failed} process(es) not patched");
    }
    if rows.is_empty() {
        anyhow::bail!("no process maps the target module");
    }
    Ok(())
}

pub(crate) fn revert(id: &str, pids: &[i32], all: bool, json: bool) -> anyhow::Result<()> {
    let engine = Engine::new();
    let targets: Vec<Pid> = if all {
        all_pids()
    } else {
        pids.iter().map(|&p| Pid(p)).collect()
    };
    let jobs = jobs(targets.len());
    let one = |&pid: &Pid| -> Option<Row> {
        // With --all, only processes that carry the patch (read without stopping them).
        if all
            && !engine.list(pid).is_ok_and(|v| {
                v.iter().any(|a| {
                    a.record.id == id
                        && a.record.state != stitch_engine::region::RecordState::Reverted
                })
            })
        {
            return None;
        }
        let outcome = engine
            .revert(pid, id)
            .map(|r| {
                format!(
                    "r{} reverted, {} hit(s), paused {:.0} us{}",
                    r.revision,
                    r.hits,
                    r.pause.as_secs_f64() * 1e6,
                    if r.region_freed { ", region freed" } else { "" }
                )
            })
            .map_err(|e| (e.code().to_string(), e.to_string()));
        Some(Row {
            pid,
            comm: comm(pid),
            outcome,
        })
    };
    let rows: Vec<Row> = par_map(&targets, jobs, one, |_| {})
        .into_iter()
        .flatten()
        .collect();
    print_rows(&rows, json)?;
    let failed = rows.iter().filter(|r| r.outcome.is_err()).count();
    if failed > 0 {
        anyhow::bail!("{failed} process(es) not reverted");
    }
    Ok(())
}

pub(crate) fn ps(json: bool) -> anyhow::Result<()> {
    let engine = Engine::new();
    let mut found: Vec<(String, AppliedPatch)> = Vec::new();
    for pid in all_pids() {
        if let Ok(list) = engine.list(pid) {
            let name = comm(pid);
            found.extend(list.into_iter().map(|a| (name.clone(), a)));
        }
    }
    if json {
        let v: Vec<serde_json::Value> = found
            .iter()
            .map(|(name, a)| {
                serde_json::json!({
                    "pid": a.pid.0,
                    "comm": name,
                    "patch": a.record.id,
                    "revision": a.record.revision,
                    "state": a.record.state.as_str(),
                    "hits": a.record.hits,
                    "module_sha256": hex::encode(a.module_sha256),
                    "region": format!("{:#x}", a.region),
                    "sites": a.record.sites.iter().map(|s| format!("{:#x}", s.addr)).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:>8}  {:<16} {:<16} {:>4} {:<9} {:>8}  region",
        "PID", "COMMAND", "PATCH", "REV", "STATE", "HITS"
    );
    for (name, a) in &found {
        println!(
            "{:>8}  {:<16} {:<16} {:>4} {:<9} {:>8}  {:#x}",
            a.pid,
            name,
            a.record.id,
            a.record.revision,
            a.record.state.as_str(),
            a.record.hits,
            a.region
        );
    }
    if found.is_empty() {
        println!("(no process carries a Stitch patch)");
    }
    Ok(())
}

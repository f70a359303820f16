//! `stitch-hookd`: the load-time hook on its own, for tests and manual use.
//!
//! ```text
//! stitch-hookd --trusted-keys keys.txt [--dir DIR]... [--no-standard-dirs] BUNDLE...
//! ```
//! Prints `ready` once every target found is marked, then one JSON line per event.
//!
//! With `--control-stdin` it reads commands, one per line, from standard input:
//! `stop` stops the hook (`Hook::stop`), prints `stopped` and exits; end of input does the same.
//! `rescan` walks the directories again (`Hook::rescan`) and prints `{"event":"rescanned"}`.
//! `bundles [BUNDLE]...` replaces the hooked bundles (`Hook::set_bundles`) and prints
//! `{"event":"bundles","marked":N,"unmarked":N,"kept":N}` (or `{"event":"bundles","error":..}`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use stitch_format::{Bundle, TrustedKeys, VerifiedBundle};
use stitch_hook::{ExecHolds, Hook, HookConfig, HookEvent, LoadKind};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Patch target modules as they are loaded (fanotify + ptrace hold)"
)]
struct Args {
    /// Trusted public keys (one per line).
    #[arg(long)]
    trusted_keys: PathBuf,
    /// Another directory to scan and watch (recursively, see --depth).
    #[arg(long = "dir")]
    dirs: Vec<PathBuf>,
    /// Recursion depth for --dir.
    #[arg(long, default_value_t = 3)]
    depth: usize,
    /// Do not scan the standard lib/bin directories.
    #[arg(long)]
    no_standard_dirs: bool,
    /// Bound of one hold, in milliseconds.
    #[arg(long, default_value_t = 250)]
    hold_timeout_ms: u64,
    /// Never hold an exec (the fallback for kernels before 6.8).
    #[arg(long)]
    no_exec_holds: bool,
    /// Hold libraries at their open and follow each syscall to the executable mapping, even
    /// where the kernel could report the mapping itself (`FAN_PRE_ACCESS`).
    #[arg(long)]
    no_watch_mappings: bool,
    /// Do not live-patch after a miss.
    #[arg(long)]
    no_live_patch: bool,
    /// Do not raise the event reader to SCHED_FIFO.
    #[arg(long)]
    no_realtime: bool,
    /// Also run holds at SCHED_FIFO (measured slower with the current tracer; see docs).
    #[arg(long)]
    realtime_holds: bool,
    /// Read commands from standard input (`stop`, `rescan`, `bundles [BUNDLE]...`); stop at
    /// end of input.
    #[arg(long)]
    control_stdin: bool,
    /// Signed bundles.
    #[arg(required = true)]
    bundles: Vec<PathBuf>,
}

fn json(e: &HookEvent) -> serde_json::Value {
    use serde_json::json;
    match e {
        HookEvent::Marked {
            path,
            dev,
            ino,
            patches,
            held_at,
        } => json!({
            "event": "marked", "path": path, "dev": dev, "ino": ino, "patches": patches,
            "held_at": held_at.as_str(),
        }),
        HookEvent::Unmarked { path, dev, ino } => {
            json!({"event": "unmarked", "path": path, "dev": dev, "ino": ino})
        }
        HookEvent::Patched {
            pid,
            patch,
            module,
            kind,
            latency,
            syscalls,
        } => json!({
            "event": "patched", "pid": pid.0, "patch": patch, "module": module,
            "kind": if *kind == LoadKind::Exec { "exec" } else { "library" },
            "latency_us": latency.as_micros() as u64, "syscalls": syscalls,
        }),
        HookEvent::Missed {
            pid,
            module,
            patches,
            reason,
        } => json!({
            "event": "missed", "pid": pid.0, "module": module, "patches": patches,
            "reason": format!("{reason:?}"),
        }),
        HookEvent::LivePatched { pid, patch, result } => json!({
            "event": "live_patched", "pid": pid.0, "patch": patch,
            "ok": result.is_ok(), "error": result.as_ref().err(),
        }),
        HookEvent::Skipped {
            pid,
            module,
            reason,
        } => json!({
            "event": "skipped", "pid": pid.0, "module": module, "reason": format!("{reason:?}"),
        }),
    }
}

/// Reads and verifies signed bundles.
fn load(trusted: &TrustedKeys, paths: &[PathBuf]) -> anyhow::Result<Vec<VerifiedBundle>> {
    let mut bundles = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        bundles.push(
            Bundle::decode_verified(&bytes, trusted)
                .with_context(|| format!("verifying {}", p.display()))?,
        );
    }
    Ok(bundles)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        let code = e
            .downcast_ref::<stitch_hook::HookError>()
            .map_or("hook", stitch_hook::HookError::code);
        eprintln!("error[{code}]: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.trusted_keys)
        .with_context(|| format!("reading {}", args.trusted_keys.display()))?;
    let trusted = TrustedKeys::from_text(&text).context("parsing trusted keys")?;
    let bundles = load(&trusted, &args.bundles)?;
    let config = HookConfig {
        standard_dirs: !args.no_standard_dirs,
        dirs: args.dirs,
        depth: args.depth,
        hold_timeout: Duration::from_millis(args.hold_timeout_ms),
        exec_holds: if args.no_exec_holds {
            ExecHolds::Never
        } else {
            ExecHolds::Auto
        },
        live_patch_misses: !args.no_live_patch,
        watch_mappings: !args.no_watch_mappings,
        realtime: !args.no_realtime,
        realtime_holds: args.realtime_holds,
        ..HookConfig::default()
    };
    let (hook, events) = Hook::start(bundles, config)?;
    // Marks made during start are already queued; "ready" follows them.
    while let Ok(e) = events.try_recv() {
        println!("{}", json(&e));
    }
    println!("ready");
    // Ends when the hook is gone (its event sender dropped).
    let printer = std::thread::spawn(move || {
        for e in events {
            println!("{}", json(&e));
        }
    });
    if !args.control_stdin {
        let _ = printer.join();
        drop(hook);
        return Ok(());
    }
    let mut hook = Some(hook);
    for line in std::io::stdin().lines() {
        let line = line.context("reading standard input")?;
        match line.trim() {
            "stop" => break,
            "" => {}
            "rescan" => {
                if let Some(h) = hook.as_ref() {
                    h.rescan();
                }
                println!("{}", serde_json::json!({"event": "rescanned"}));
            }
            cmd if cmd == "bundles" || cmd.starts_with("bundles ") => {
                let paths: Vec<PathBuf> =
                    cmd.split_whitespace().skip(1).map(PathBuf::from).collect();
                let line = match (load(&trusted, &paths), hook.as_ref()) {
                    (Ok(b), Some(h)) => {
                        let u = h.set_bundles(b);
                        serde_json::json!({"event": "bundles", "marked": u.marked, "unmarked": u.unmarked, "kept": u.kept})
                    }
                    (Err(e), _) => {
                        serde_json::json!({"event": "bundles", "error": format!("{e:#}")})
                    }
                    (_, None) => serde_json::json!({"event": "bundles", "error": "stopped"}),
                };
                println!("{line}");
            }
            other => eprintln!("stitch-hookd: unknown command {other:?}"),
        }
    }
    if let Some(h) = hook.take() {
        h.stop();
    }
    let _ = printer.join();
    println!("stopped");
    Ok(())
}

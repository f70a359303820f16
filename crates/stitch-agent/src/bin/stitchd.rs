//! `stitchd`: the Stitch host agent. See `docs/agent.md`.
//!
//! Reads /etc/stitch/agent.toml (or `--config`), applies every enabled patch to every running
//! process that maps its target, then serves the control socket and syncs with the server
//! until SIGTERM/SIGINT. Logs go to stderr (journald): text by default, JSON lines with
//! `--log-format json`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The Stitch host agent.
#[derive(Debug, Parser)]
#[command(name = "stitchd", version, about)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = stitch_agent::config::DEFAULT_CONFIG, env = "STITCH_CONFIG")]
    config: PathBuf,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Check the configuration and the store, print the result, and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Package removal (run by the .deb's prerm once the service is stopped): revert every
    /// patch in every running process and report `agent_uninstalled` to the server, waiting at
    /// most --wait-s for it (queued in the state directory if the server cannot be reached).
    Uninstall {
        /// Longest wait for the server, in seconds.
        #[arg(long, default_value_t = 10)]
        wait_s: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STITCH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => b.with_ansi(false).init(),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = stitch_agent::Config::load(&args.config, &env)
        .map_err(|e| anyhow::anyhow!("error[{}]: {e}", e.code()))?;
    if let Some(Command::Uninstall { wait_s, json }) = args.command {
        let r = stitch_agent::daemon::uninstall(cfg, std::time::Duration::from_secs(wait_s))
            .map_err(|e| anyhow::anyhow!("error[{}]: {e}", e.code()))
            .context("stitchd uninstall failed")?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "reverted {} patch application(s) in running processes",
                r.reverted
            );
            if !r.unverified.is_empty() {
                println!(
                    "stored bundle(s) that do not verify, reverted from the processes' records: {}",
                    r.unverified.join(", ")
                );
            }
            for f in &r.failed {
                println!(
                    "NOT reverted: {} in pid {}: [{}] {}",
                    f.patch_id, f.pid, f.code, f.message
                );
            }
            match &r.delivery_error {
                None => println!("agent_uninstalled delivered to the server"),
                Some(e) => println!(
                    "agent_uninstalled queued ({} event(s) in the outbox, sent if the agent is installed again): {e}",
                    r.outbox
                ),
            }
        }
        if !r.failed.is_empty() {
            anyhow::bail!(
                "error[agent.revert_incomplete]: {} patch application(s) could not be reverted; they stay in those processes until they exit",
                r.failed.len()
            );
        }
        return Ok(());
    }
    if args.check {
        let keys = cfg
            .trusted()
            .map_err(|e| anyhow::anyhow!("error[{}]: {e}", e.code()))?;
        let (store, report) = stitch_agent::store::Store::open(&cfg.state_dir)
            .map_err(|e| anyhow::anyhow!("error[{}]: {e}", e.code()))?;
        println!(
            "config ok: {} trusted key(s), server {}, state {}",
            keys.len(),
            cfg.server_url.as_deref().unwrap_or("(none: offline)"),
            store.dir().display()
        );
        if let Some(r) = report.rebuilt_from {
            println!("store was rebuilt (old database moved to {})", r.display());
        }
        // With these trusted keys, which installed patches would not be applied any more
        // (e.g. before removing a key): they stay revertible, but say so now.
        let bad = store
            .unverifiable(&keys)
            .map_err(|e| anyhow::anyhow!("error[{}]: {e}", e.code()))?;
        for (row, e) in &bad {
            println!(
                "patch {} r{}: stored bundle does not verify [{}]: {e}",
                row.patch_id,
                row.revision,
                e.code()
            );
        }
        if !bad.is_empty() {
            anyhow::bail!(
                "error[agent.bundles_unverified]: {} installed patch(es) would never be applied with these trusted keys (still reverted by disable, removal and uninstall)",
                bad.len()
            );
        }
        return Ok(());
    }
    let agent = stitch_agent::daemon::start(cfg)
        .map_err(|e| anyhow::anyhow!("error[{}]: {e}", e.code()))
        .context("stitchd cannot start")?;
    // SIGTERM/SIGINT: stop the controller, which records `agent_stopped` and leaves every
    // patch in place (a restarted agent rediscovers them).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    let tx = agent.tx.clone();
    std::thread::Builder::new()
        .name("stitchd-signal".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping");
                let _ = tx.send(stitch_agent::Input::Shutdown);
            }
        })
        .context("cannot start the signal thread")?;
    if !agent.wait() {
        // Exiting closes the fanotify group: the kernel releases whatever a wedged hold kept.
        anyhow::bail!(
            "error[agent.hook_wedged]: the load-time hook could not be stopped; exiting to release held processes"
        );
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    init_logging(args.log_format);
    if let Err(e) = run(args) {
        eprintln!("{e:#}");
        std::process::exit(1);
    }
}

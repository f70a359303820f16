//! `stitch agent status|patches|events|enable|disable|sync`: talks to the local `stitchd`
//! over its control socket (one JSON request line, one JSON answer line; root only). The
//! protocol is documented in `docs/agent.md`; this file only renders the answers.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;
use stitch_protocol::control::{AgentAction, exchange};

/// Arguments of `stitch agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The agent's control socket.
    #[arg(
        long,
        global = true,
        env = "STITCH_SOCKET",
        default_value = "/run/stitch/stitchd.sock"
    )]
    socket: PathBuf,
    /// Machine-readable output (the agent's JSON answer).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Whether the agent is enabled, its server connection, counts.
    Status,
    /// Installed patches: state, where applied, blocked exploit attempts.
    Patches,
    /// Recent events (newest first), delivered or waiting in the outbox.
    Events {
        #[arg(long, default_value_t = 30)]
        limit: usize,
    },
    /// Enable the agent, or one patch (also clears a crash-protection disable).
    Enable { patch: Option<String> },
    /// Disable the agent (reverts every patch live), or one patch.
    Disable { patch: Option<String> },
    /// Heartbeat, deliver events and fetch the manifest now.
    Sync,
}

fn request(socket: &Path, action: &AgentAction) -> anyhow::Result<Value> {
    let s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to the agent at {} (is stitchd running, and are you root?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(130)))?;
    let v = exchange(&s, action)?;
    Ok(v)
}

pub(crate) fn run(a: AgentArgs) -> anyhow::Result<()> {
    let action = match &a.command {
        AgentCommand::Status => AgentAction::Status,
        AgentCommand::Patches => AgentAction::Patches,
        AgentCommand::Events { limit } => AgentAction::Events { limit: *limit },
        AgentCommand::Enable { patch } => AgentAction::Enable {
            patch: patch.clone(),
        },
        AgentCommand::Disable { patch } => AgentAction::Disable {
            patch: patch.clone(),
        },
        AgentCommand::Sync => AgentAction::Sync,
    };
    let v = request(&a.socket, &action)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match a.command {
        AgentCommand::Status | AgentCommand::Sync => print_status(&v),
        AgentCommand::Patches => print_patches(&v),
        AgentCommand::Events { .. } => print_events(&v),
        AgentCommand::Enable { patch: None } | AgentCommand::Disable { patch: None } => {
            print_status(&v)
        }
        AgentCommand::Enable { patch: Some(_) } | AgentCommand::Disable { patch: Some(_) } => {
            print_patches(&v)
        }
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_status(v: &Value) {
    let enabled = if v["agent_enabled"] == true {
        "enabled"
    } else {
        "DISABLED"
    };
    println!(
        "agent:        stitchd {} ({enabled})",
        s(&v["agent_version"])
    );
    println!(
        "server:       {} — {}{}",
        s(&v["server_url"]),
        s(&v["server"]["state"]),
        v["server"]["agent_id"]
            .as_str()
            .map(|id| format!(", agent id {id}"))
            .unwrap_or_default()
    );
    if let Some(e) = v["server"]["last_error"].as_str() {
        println!("last error:   {e}");
    }
    println!(
        "patches:      {} installed, {} enabled, {} process(es) patched",
        s(&v["patches_installed"]),
        s(&v["patches_enabled"]),
        s(&v["processes_patched"])
    );
    println!(
        "outbox:       {} event(s) not yet delivered",
        s(&v["outbox"])
    );
    print!("store:        {}", s(&v["store"]["dir"]));
    match v["store"]["error"].as_str() {
        Some(e) => println!(" — ERROR: {e}"),
        None => println!(),
    }
    println!("new processes: {}", s(&v["new_processes"]));
    println!("load-time:    {}", s(&v["load_time_hook"]));
    let m = &v["metrics"];
    println!(
        "counters:     {} applied, {} reverted, {} exploit attempt(s) blocked, {} crash(es) seen",
        s(&m["applied"]),
        s(&m["reverted"]),
        s(&m["exploit_attempts_blocked"]),
        s(&m["crashes_seen"])
    );
}

fn print_patches(v: &Value) {
    let list = v["patches"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no patches installed");
        return;
    }
    println!(
        "{:<16} {:>4} {:<9} {:>6} {:>6}  TITLE",
        "PATCH", "REV", "STATE", "PROCS", "HITS"
    );
    for p in &list {
        let procs = p["processes"].as_array().cloned().unwrap_or_default();
        let hits: u64 = procs.iter().filter_map(|x| x["hits"].as_u64()).sum();
        println!(
            "{:<16} {:>4} {:<9} {:>6} {:>6}  {}",
            s(&p["patch_id"]),
            s(&p["revision"]),
            s(&p["state"]),
            procs.len(),
            hits,
            s(&p["title"])
        );
        if let Some(r) = p["crash_disabled"].as_str() {
            println!("    disabled by crash protection: {r}");
        }
        if p["server_enabled"] == false {
            println!("    disabled by the server's policy");
        }
        if p["local_enabled"] == false {
            println!(
                "    disabled locally (stitch agent enable {})",
                s(&p["patch_id"])
            );
        }
        if let Some(code) = p["error"]["code"].as_str() {
            println!("    last error [{code}]: {}", s(&p["error"]["message"]));
        }
        for x in &procs {
            println!("    pid {:<8} {}", s(&x["pid"]), s(&x["exe"]));
        }
    }
}

fn print_events(v: &Value) {
    for e in v["events"].as_array().cloned().unwrap_or_default() {
        let when = utc(e["occurred_at"].as_i64().unwrap_or(0));
        let state = if e["delivered"] == true {
            "sent  "
        } else {
            "queued"
        };
        println!("{when}  {state}  {}", s(&e["description"]));
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix seconds (civil-from-days, no time zone database).
fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_700_000_000), "2023-11-14 22:13:20");
    }
}

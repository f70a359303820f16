//! `stitch agent status|patches|events|enable|disable|sync`, human-readable and `--json`,
//! against a real `stitchd` (its own process, on a temporary control socket) enrolled with a
//! real server on loopback, patching a real process. Needs root (the agent traces processes it
//! did not start): outside CI it skips with a printed reason, with `CI=true` it fails.

#[path = "../../stitch-agent/tests/harness.rs"]
mod harness;

use std::process::Output;
use std::time::Duration;

use harness::*;
use serde_json::Value;

/// `stitch agent --socket SOCKET ARGS...`.
fn stitch(agent: &Agent, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("agent")
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .output()
        .expect("run stitch")
}

fn human(agent: &Agent, args: &[&str]) -> String {
    let o = stitch(agent, args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "stitch agent {args:?}: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn json(agent: &Agent, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = human(agent, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} --json: {e}\n{out}"))
}

#[test]
fn agent_commands_show_the_real_agent_state_and_their_changes_take_effect_live() {
    if !can_run() {
        return;
    }
    let id = "ST-2026-0120";
    let mut w = world("cli-agent", id, RETURN_1000, 3);
    let pid = w.run.pid();

    // status
    let s = json(&w.agent, &["status"]);
    assert_eq!(s["agent_enabled"], true, "{s}");
    assert_eq!(s["server"]["state"], "online", "{s}");
    assert_eq!(s["patches_installed"], 1, "{s}");
    assert_eq!(s["processes_patched"], 1, "{s}");
    let out = human(&w.agent, &["status"]);
    assert!(out.contains("(enabled)"), "{out}");
    assert!(out.contains("— online, agent id "), "{out}");
    assert!(
        out.contains("1 installed, 1 enabled, 1 process(es) patched"),
        "{out}"
    );
    assert!(out.contains("new processes:"), "{out}");

    // patches
    let p = json(&w.agent, &["patches"]);
    assert_eq!(p["patches"][0]["patch_id"], id, "{p}");
    assert_eq!(p["patches"][0]["state"], "applied", "{p}");
    assert_eq!(p["patches"][0]["processes"][0]["pid"], pid, "{p}");
    let out = human(&w.agent, &["patches"]);
    let row = out.lines().find(|l| l.starts_with(id)).unwrap_or_default();
    assert!(
        row.contains("applied") && row.contains("test patch"),
        "{out}"
    );
    assert!(out.contains(&format!("pid {pid}")), "{out}");

    // events (newest first, limited)
    let e = json(&w.agent, &["events", "--limit", "2"]);
    assert_eq!(e["events"].as_array().map(Vec::len), Some(2), "{e}");
    let e = json(&w.agent, &["events", "--limit", "100"]);
    let kinds: Vec<&str> = e["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["event"]["kind"].as_str())
        .collect();
    for k in [
        "agent_installed",
        "agent_started",
        "patch_installed",
        "patch_applied",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let out = human(&w.agent, &["events", "--limit", "100"]);
    assert!(
        out.contains(&format!("{id} r1 applied to 1 process(es)")),
        "{out}"
    );
    assert!(out.contains("agent installed"), "{out}");

    // disable / enable one patch: reverted and re-applied live
    let out = human(&w.agent, &["disable", id]);
    assert!(!w.run.patched(), "disable reverts live");
    let row = out.lines().find(|l| l.starts_with(id)).unwrap_or_default();
    assert!(row.contains("disabled"), "{out}");
    assert!(
        out.contains(&format!("disabled locally (stitch agent enable {id})")),
        "{out}"
    );
    let p = json(&w.agent, &["enable", id]);
    assert_eq!(p["patches"][0]["state"], "applied", "{p}");
    assert!(w.run.patched(), "enable re-applies live");

    // disable / enable the whole agent
    let out = human(&w.agent, &["disable"]);
    assert!(out.contains("(DISABLED)"), "{out}");
    assert!(!w.run.patched());
    let s = json(&w.agent, &["enable"]);
    assert_eq!(s["agent_enabled"], true, "{s}");
    assert!(w.run.patched());

    // sync: heartbeat, events and manifest now; the outbox drains
    let out = human(&w.agent, &["sync"]);
    assert!(out.contains("outbox:"), "{out}");
    let s = w
        .agent
        .until("the outbox to drain", Duration::from_secs(20), || {
            let s = json(&w.agent, &["sync"]);
            (s["outbox"] == 0).then_some(s)
        });
    assert_eq!(s["server"]["state"], "online", "{s}");
    let kinds = w.server.event_kinds();
    assert!(kinds.iter().any(|k| k == "agent_disabled"), "{kinds:?}");

    // refusals: an unknown patch, no agent on the socket
    let o = stitch(&w.agent, &["disable", "ST-NOPE"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("agent.unknown_patch"), "{err}");
    w.agent.stop();
    let o = stitch(&w.agent, &["status"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot connect to the agent"), "{err}");
}

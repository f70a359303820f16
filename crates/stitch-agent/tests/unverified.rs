//! A stored bundle that no longer verifies (damaged or truncated file, signing key no longer
//! trusted, row lost): the patch must never be applied again, must be reported, and must still
//! come out of every process that carries it — on disable, server policy, and uninstall —
//! since the engine reverts from the record in the process, not from the bundle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use stitch_agent::AgentAction;

use crate::harness::*;

/// The one stored bundle file of an agent.
fn stored_bundle(agent: &Agent) -> PathBuf {
    std::fs::read_dir(agent.dir.join("bundles"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "stitch"))
        .expect("a stored bundle")
}

/// Flips the last byte of a file (a bit rot or a torn write).
fn damage(p: &Path) {
    let mut bytes = std::fs::read(p).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(p, bytes).unwrap();
}

/// Replaces the vendor key in the agent's trusted keys (the agent must be stopped).
fn rotate_key(agent: &Agent) {
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    let rotated = cfg.replace(
        &vendor_key().public().to_line(),
        &rogue_key().public().to_line(),
    );
    assert_ne!(cfg, rotated);
    std::fs::write(&agent.config, rotated).unwrap();
}

/// `stitchd uninstall --json` with the agent's config.
fn uninstall(agent: &Agent) -> (bool, Value, String) {
    let o = agent
        .command(&stitchd())
        .args(["uninstall", "--wait-s", "2", "--json"])
        .output()
        .unwrap();
    let out: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (
        o.status.success(),
        out,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn uninstall_reverts_a_patch_whose_stored_bundle_was_corrupted() {
    if !can_run() {
        return;
    }
    let mut w = world("unv-uninstall", "ST-2026-0131", RETURN_1000, 3);
    let mut second = Running::start(&w.target.exe);
    w.agent.until(
        "the second process patched",
        Duration::from_secs(10),
        || second.patched().then_some(()),
    );
    w.agent.stop();
    w.server.down();
    damage(&stored_bundle(&w.agent));
    let (ok, r, err) = uninstall(&w.agent);
    assert!(ok, "{r} {err}");
    assert_eq!(r["reverted"], 2, "{r}");
    assert_eq!(r["unverified"][0], "ST-2026-0131", "{r}");
    assert_eq!(r["failed"].as_array().map(Vec::len), Some(0), "{r}");
    assert!(!w.run.patched() && !second.patched(), "reverted live");
    assert!(carried(w.run.pid()).is_empty() && carried(second.pid()).is_empty());
}

#[test]
fn uninstall_reverts_an_unverifiable_patch_even_with_the_state_database_lost() {
    if !can_run() {
        return;
    }
    // Nothing left of where the patch was applied (the `applied` table is gone) and its
    // bundle is damaged: the row comes back from manifest.json, the carriers from the Stitch
    // regions of the processes.
    let mut w = world("unv-lostdb", "ST-2026-0132", RETURN_1000, 3);
    w.agent.stop();
    w.server.down();
    damage(&stored_bundle(&w.agent));
    for f in ["state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(w.agent.dir.join(f));
    }
    std::fs::write(w.agent.dir.join("state.db"), b"not a database").unwrap();
    let (ok, r, err) = uninstall(&w.agent);
    assert!(ok, "{r} {err}");
    assert_eq!(r["reverted"], 1, "{r}");
    assert_eq!(r["unverified"][0], "ST-2026-0132", "{r}");
    assert!(!w.run.patched());
    assert!(carried(w.run.pid()).is_empty());
}

#[test]
fn a_bundle_that_no_longer_verifies_is_never_applied_but_reported() {
    if !can_run() {
        return;
    }
    let server = Server::start(false);
    let target = compile(&unique_tag("unv-key"));
    let mut old = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    // The load-time hook watches the target's directory: it must not apply it either.
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            hook_dir: Some(target.dir.path()),
            ..Default::default()
        },
    );
    agent.start();
    wait_until("inventory", Duration::from_secs(20), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    let id = "ST-2026-0133";
    server.publish(patch_bundle(&target, id, RETURN_1000, &vendor_key()));
    agent.until("the patch applied", Duration::from_secs(20), || {
        old.patched().then_some(())
    });
    // The vendor key is rotated out of the agent's trusted keys while it is stopped.
    agent.stop();
    let check = |agent: &Agent| agent.command(&stitchd()).arg("--check").output().unwrap();
    assert!(check(&agent).status.success());
    rotate_key(&agent);
    // `stitchd --check` says what the rotation does, before the agent runs with it.
    let o = check(&agent);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(id) && out.contains("bundle.untrusted_key"),
        "{out}"
    );
    assert!(err.contains("agent.bundles_unverified"), "{err}");
    agent.start();

    // Reported, with the bundle's code, locally...
    let p = agent.patch(id).expect("still known");
    assert_eq!(p["state"], "unverified", "{p}");
    assert_eq!(p["bundle_verified"], false, "{p}");
    assert_eq!(p["unverified"]["code"], "bundle.untrusted_key", "{p}");
    assert_eq!(p["error"]["code"], "bundle.untrusted_key", "{p}");
    assert_eq!(
        p["processes"][0]["pid"],
        old.pid(),
        "where it was, it stays: {p}"
    );
    let s = agent.ask(AgentAction::Status);
    assert_eq!(s["patches_unverified"][0]["patch_id"], id, "{s}");
    assert!(
        s["store"]["error"].as_str().is_some_and(|e| e.contains(id)),
        "stitch agent status shows it: {s}"
    );
    assert!(old.patched());
    // ... and to the server: a patch_failed event and the heartbeat's state.
    wait_until(
        "patch_failed bundle.untrusted_key on the server",
        Duration::from_secs(20),
        || {
            let c = server.computer()?;
            let ev = c["events"].as_array()?.iter().any(|e| {
                e["kind"] == "patch_failed" && e.to_string().contains("bundle.untrusted_key")
            });
            let st = c["patch_states"].as_array()?.iter().any(|s| {
                s["patch_id"] == id
                    && s["state"] == "failed"
                    && s["error_code"] == "bundle.untrusted_key"
            });
            (ev && st).then_some(())
        },
    );

    // Never applied: not to a new process (load-time hook, exec check), not by a full scan.
    let s = agent.ask(AgentAction::Status);
    assert!(
        s["load_time_hook"]
            .as_str()
            .is_some_and(|h| !h.starts_with("active")),
        "the hook has nothing to apply: {s}"
    );
    let mut new = Running::start(&target.exe);
    assert_eq!(new.first, "start 5", "not patched at load time");
    std::thread::sleep(Duration::from_millis(2500));
    agent.ask(AgentAction::Sync);
    assert!(!new.patched(), "a new process gets no unverifiable patch");
    assert!(carried(new.pid()).is_empty());
    // Not even when enabled explicitly.
    agent.ask(AgentAction::Enable {
        patch: Some(id.into()),
    });
    assert!(!new.patched());
    assert!(old.patched());

    // But it can be taken out: a local disable reverts it where it is.
    agent.ask(AgentAction::Disable {
        patch: Some(id.into()),
    });
    assert!(
        !old.patched(),
        "disable reverts a patch whose bundle does not verify"
    );
    assert!(carried(old.pid()).is_empty());
    assert_eq!(agent.patch(id).unwrap()["state"], "disabled");
    assert!(agent.has_event("patch_reverted"));
    // Enabling it again applies nothing: the bundle still does not verify.
    agent.ask(AgentAction::Enable {
        patch: Some(id.into()),
    });
    assert!(!old.patched() && !new.patched());
    agent.stop();
}

#[test]
fn server_disable_reverts_a_patch_whose_stored_bundle_no_longer_verifies() {
    if !can_run() {
        return;
    }
    let mut w = world("unv-server", "ST-2026-0134", RETURN_1000, 3);
    w.agent.stop();
    rotate_key(&w.agent);
    w.agent.start();
    assert!(w.run.patched(), "kept where it was");
    assert_eq!(
        w.agent.patch("ST-2026-0134").unwrap()["state"],
        "unverified"
    );
    // The server revokes it (policy off): the agent obeys without a bundle it can verify.
    w.server.policy("ST-2026-0134", false);
    w.agent.until(
        "the patch reverted on the server's word",
        Duration::from_secs(30),
        || (!w.run.patched()).then_some(()),
    );
    assert!(carried(w.run.pid()).is_empty());
    assert_eq!(w.agent.patch("ST-2026-0134").unwrap()["state"], "disabled");
    // Enabled again: still not applied, the bundle does not verify.
    w.server.policy("ST-2026-0134", true);
    w.agent
        .until("the server's enable seen", Duration::from_secs(30), || {
            w.agent
                .patch("ST-2026-0134")
                .filter(|p| p["state"] == "unverified")
        });
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!w.run.patched());
}

#[test]
fn a_damaged_stored_bundle_is_downloaded_again_and_applied_again() {
    if !can_run() {
        return;
    }
    let mut w = world("unv-heal", "ST-2026-0135", RETURN_1000, 3);
    w.agent.stop();
    damage(&stored_bundle(&w.agent));
    drop(std::mem::replace(&mut w.run, Running::start(&w.target.exe)));
    w.agent.start();
    // The damaged file is deleted at start; the server serves it again, it verifies.
    w.agent.until(
        "the patch applied from a fresh download",
        Duration::from_secs(30),
        || w.run.patched().then_some(()),
    );
    let p = w.agent.patch("ST-2026-0135").unwrap();
    assert_eq!(p["bundle_verified"], true, "{p}");
    assert_eq!(p["state"], "applied", "{p}");
}

#[test]
fn a_patch_an_older_agent_forgot_is_adopted_from_where_it_applied_it_and_can_be_reverted() {
    if !can_run() {
        return;
    }
    // Agents before this rule dropped the row (and the file) of a bundle that stopped
    // verifying, leaving the patch in processes nobody could take it out of.
    let mut w = world("unv-orphan", "ST-2026-0136", RETURN_1000, 3);
    w.agent.stop();
    w.server.down();
    std::fs::remove_file(stored_bundle(&w.agent)).unwrap();
    let db = rusqlite::Connection::open(w.agent.dir.join("state.db")).unwrap();
    db.execute("DELETE FROM patches", []).unwrap();
    drop(db);
    w.agent.start();
    let p = w.agent.patch("ST-2026-0136").expect("adopted");
    assert_eq!(p["state"], "unverified", "{p}");
    assert_eq!(p["unverified"]["code"], "agent.bundle_missing", "{p}");
    assert_eq!(p["processes"][0]["pid"], w.run.pid(), "{p}");
    assert!(w.run.patched(), "enabled in manifest.json: left in place");
    w.agent.ask(AgentAction::Disable {
        patch: Some("ST-2026-0136".into()),
    });
    assert!(!w.run.patched(), "and it can be taken out");
    assert!(carried(w.run.pid()).is_empty());
}

#[test]
fn uninstall_lists_a_process_that_refused_the_revert_and_a_second_uninstall_finishes_the_job() {
    if !can_run() {
        return;
    }
    let mut w = world("unv-refused", "ST-2026-0137", RETURN_1000, 3);
    let mut held = Running::start(&w.target.exe);
    w.agent.until(
        "the second process patched",
        Duration::from_secs(10),
        || held.patched().then_some(()),
    );
    w.agent.stop();
    w.server.down();
    damage(&stored_bundle(&w.agent));
    // Another tracer holds one process (a debugger would): it refuses to be stopped.
    let stop = stitch_sys::stop_all(
        stitch_sys::Pid(held.pid()),
        std::time::Instant::now() + Duration::from_secs(5),
    )
    .unwrap();
    let o = w
        .agent
        .command(&stitchd())
        .args(["uninstall", "--wait-s", "1", "--json"])
        .output()
        .unwrap();
    drop(stop);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{r}");
    assert!(err.contains("agent.revert_incomplete"), "{err}");
    assert_eq!(r["reverted"], 1, "{r}");
    assert_eq!(r["failed"][0]["pid"], held.pid(), "{r}");
    assert_eq!(r["failed"][0]["patch_id"], "ST-2026-0137", "{r}");
    assert_eq!(r["failed"][0]["code"], "sys.already_traced", "{r}");
    assert!(!w.run.patched());
    assert!(held.patched(), "untouched, and still known to the agent");
    // Nothing was forgotten: once the other tracer is gone, uninstall again finishes.
    let (ok, r, err) = uninstall(&w.agent);
    assert!(ok, "{r} {err}");
    assert_eq!(r["reverted"], 1, "{r}");
    assert!(!held.patched());
    assert!(carried(held.pid()).is_empty());
}

//! `stitchd` as a real process against a real server on loopback, patching real processes.
//! One binary; each test is named after the hazard it covers. These need root (the agent
//! traces processes it did not start): outside CI they skip with a printed reason, with
//! `CI=true` they fail instead.

mod harness;
mod tls;
mod unverified;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{Value, json};
use stitch_agent::AgentAction;

// ------------------------------------------------------------------------------ tests

#[test]
fn enrolled_agent_receives_published_patch_applies_it_and_reports_state_and_exploit_attempts() {
    if !can_run() {
        return;
    }
    let mut w = world("e2e", "ST-2026-0101", RETURN_1000, 3);
    assert_eq!(carried(w.run.pid()), vec!["ST-2026-0101".to_string()]);
    let p = w.agent.patch("ST-2026-0101").unwrap();
    assert_eq!(p["state"], "applied");
    assert_eq!(p["processes"][0]["pid"], w.run.pid());
    assert_eq!(p["relevant"], true);
    // Calls through the patch are counted and reported as blocked exploit attempts.
    w.run.ask(7);
    wait_until(
        "exploit_blocked on the server",
        Duration::from_secs(20),
        || {
            w.server
                .event_kinds()
                .iter()
                .any(|k| k == "exploit_blocked")
                .then_some(())
        },
    );
    let c = wait_until(
        "applied state on the server",
        Duration::from_secs(20),
        || {
            w.server.computer().filter(|c| {
                c["patch_states"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|s| s["state"] == "applied" && s["processes"] == 1)
                })
            })
        },
    );
    assert_eq!(c["computer"]["agent_enabled"], true);
    let kinds = w.server.event_kinds();
    for k in ["agent_started", "patch_installed", "patch_applied"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    // Status is coherent.
    let s = w.agent.ask(AgentAction::Status);
    assert_eq!(s["server"]["state"], "online");
    assert_eq!(s["processes_patched"], 1);
    assert!(s["ready_after_ms"].as_u64().is_some());
    // A newly started process gets the patch too (exec event or periodic scan).
    let mut second = Running::start(&w.target.exe);
    wait_until(
        "the new process to be patched",
        Duration::from_secs(10),
        || second.patched().then_some(()),
    );
}

#[test]
fn local_disable_reverts_live_and_enable_reapplies_patch_and_agent() {
    if !can_run() {
        return;
    }
    let mut w = world("policy", "ST-2026-0102", RETURN_1000, 3);
    w.agent.ask(AgentAction::Disable {
        patch: Some("ST-2026-0102".into()),
    });
    assert!(!w.run.patched(), "disable reverts in the running process");
    assert_eq!(w.agent.patch("ST-2026-0102").unwrap()["state"], "disabled");
    w.agent.ask(AgentAction::Enable {
        patch: Some("ST-2026-0102".into()),
    });
    assert!(w.run.patched(), "enable applies again");
    w.agent.ask(AgentAction::Disable { patch: None });
    assert!(!w.run.patched(), "agent disable reverts everything");
    assert_eq!(w.agent.ask(AgentAction::Status)["agent_enabled"], false);
    w.agent.ask(AgentAction::Enable { patch: None });
    assert!(w.run.patched());
    assert!(w.agent.has_event("agent_disabled") && w.agent.has_event("patch_reverted"));
    let err = w
        .agent
        .try_ask(&AgentAction::Disable {
            patch: Some("ST-NOPE".into()),
        })
        .unwrap_err();
    assert!(err.to_string().contains("agent.unknown_patch"), "{err}");
}

#[test]
fn server_down_agent_keeps_working_and_outbox_is_delivered_when_server_returns() {
    if !can_run() {
        return;
    }
    let mut w = world("offline", "ST-2026-0103", RETURN_1000, 3);
    w.server.down();
    // Work while offline: a local disable/enable produces events that wait in the outbox.
    w.agent.ask(AgentAction::Disable {
        patch: Some("ST-2026-0103".into()),
    });
    assert!(!w.run.patched());
    w.agent.ask(AgentAction::Enable {
        patch: Some("ST-2026-0103".into()),
    });
    assert!(w.run.patched(), "patching works without the server");
    let s = wait_until(
        "the agent to notice the server is gone",
        Duration::from_secs(20),
        || {
            let s = w.agent.ask(AgentAction::Status);
            (s["server"]["state"] == "offline" && s["outbox"].as_u64() > Some(0)).then_some(s)
        },
    );
    assert!(s["server"]["last_error"].as_str().is_some());
    w.server.up();
    wait_until("the outbox to drain", Duration::from_secs(30), || {
        (w.agent.ask(AgentAction::Status)["outbox"] == 0).then_some(())
    });
    let kinds = w.server.event_kinds();
    assert!(kinds.iter().any(|k| k == "patch_reverted"), "{kinds:?}");
    assert!(w.run.patched());
}

#[test]
fn agent_killed_and_restarted_rediscovers_patches_and_applies_nothing_twice() {
    if !can_run() {
        return;
    }
    let mut w = world("restart", "ST-2026-0104", RETURN_1000, 3);
    w.agent.kill();
    assert!(w.run.patched(), "a killed agent leaves patches in place");
    w.agent.start();
    let s = w.agent.ask(AgentAction::Status);
    assert_eq!(s["processes_patched"], 1, "rediscovered from the process");
    assert_eq!(s["metrics"]["applied"], 0, "nothing applied again");
    assert_eq!(carried(w.run.pid()), vec!["ST-2026-0104".to_string()]);
    assert!(w.run.patched());
    // And it is still in control: disable reverts the rediscovered patch.
    w.agent.ask(AgentAction::Disable {
        patch: Some("ST-2026-0104".into()),
    });
    assert!(!w.run.patched());
}

#[test]
fn reboot_simulated_state_kept_processes_restarted_patches_reapplied_offline() {
    if !can_run() {
        return;
    }
    let mut w = world("reboot", "ST-2026-0105", RETURN_1000, 3);
    w.agent.stop();
    w.server.down();
    drop(std::mem::replace(&mut w.run, Running::start(&w.target.exe)));
    assert!(!w.run.patched(), "a fresh process starts unpatched");
    w.agent.start();
    assert!(
        w.run.patched(),
        "re-applied from the local store before ready, server down"
    );
    assert_ne!(
        w.agent.ask(AgentAction::Status)["server"]["state"],
        "online"
    );
}

#[test]
fn corrupt_state_database_is_rebuilt_from_bundles_and_patches_reapplied() {
    if !can_run() {
        return;
    }
    let mut w = world("corrupt", "ST-2026-0106", RETURN_1000, 3);
    w.agent.ask(AgentAction::Disable {
        patch: Some("ST-2026-0106".into()),
    });
    w.agent.ask(AgentAction::Enable {
        patch: Some("ST-2026-0106".into()),
    });
    w.agent.stop();
    w.server.down();
    for f in ["state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(w.agent.dir.join(f));
    }
    std::fs::write(
        w.agent.dir.join("state.db"),
        b"this is not an SQLite database at all, half-written",
    )
    .unwrap();
    drop(std::mem::replace(&mut w.run, Running::start(&w.target.exe)));
    w.agent.start();
    assert!(w.run.patched(), "rebuilt from the bundles and re-applied");
    let ev = w.agent.events();
    assert!(
        ev.iter().any(|e| e["description"]
            .as_str()
            .is_some_and(|d| d.contains("rebuilt"))),
        "{ev:?}"
    );
    assert!(std::fs::read_dir(&w.agent.dir).unwrap().flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("state.db.corrupt-")
    }));
    // A damaged bundle file is caught too (deleted, not applied).
    w.agent.stop();
    let b = std::fs::read_dir(w.agent.dir.join("bundles"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&b).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&b, bytes).unwrap();
    drop(std::mem::replace(&mut w.run, Running::start(&w.target.exe)));
    w.agent.start();
    assert!(!w.run.patched(), "a damaged bundle is never applied");
    assert!(!b.exists());
}

#[test]
fn bad_bundle_from_server_is_rejected_and_reported() {
    if !can_run() {
        return;
    }
    // The server trusts a key the agent does not: what it serves must still be refused.
    let server = Server::start(true);
    let target = compile(&unique_tag("badbundle"));
    let mut run = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            ..Default::default()
        },
    );
    agent.start();
    wait_until("inventory", Duration::from_secs(20), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    server.publish(patch_bundle(
        &target,
        "ST-2026-0107",
        RETURN_1000,
        &rogue_key(),
    ));
    let e = wait_until(
        "patch_failed on the server",
        Duration::from_secs(20),
        || {
            let c = server.computer()?;
            c["events"]
                .as_array()?
                .iter()
                .find(|e| e["kind"] == "patch_failed")
                .cloned()
        },
    );
    assert!(e.to_string().contains("bundle."), "{e}");
    assert!(!run.patched());
    assert!(agent.patch("ST-2026-0107").is_none(), "never installed");
    assert!(
        std::fs::read_dir(agent.dir.join("bundles"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn crash_protection_threshold_disables_patch_and_reverts_everywhere() {
    if !can_run() {
        return;
    }
    // The patch makes compute() execute ud2: every call crashes the process with SIGILL.
    let server = Server::start(false);
    let target = compile(&unique_tag("crash"));
    let home = tempfile::tempdir().unwrap();
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            crash_threshold: 2,
            ..Default::default()
        },
    );
    let mut bystander = Running::start(&target.exe);
    let mut victims: Vec<Running> = (0..2).map(|_| Running::start(&target.exe)).collect();
    agent.start();
    wait_until("inventory", Duration::from_secs(20), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    server.publish(patch_bundle(&target, "ST-2026-0108", CRASH, &vendor_key()));
    wait_until("all three patched", Duration::from_secs(20), || {
        [bystander.pid(), victims[0].pid(), victims[1].pid()]
            .iter()
            .all(|p| carried(*p).len() == 1)
            .then_some(())
    });
    for v in &mut victims {
        v.ask(1); // dies of SIGILL
        let _ = v.child.wait();
    }
    let p = agent.until("crash protection to trip", Duration::from_secs(20), || {
        agent
            .patch("ST-2026-0108")
            .filter(|p| p["crash_disabled"].is_string())
    });
    assert_eq!(p["state"], "disabled");
    assert!(
        carried(bystander.pid()).is_empty(),
        "reverted in the surviving process"
    );
    assert_eq!(bystander.ask(5), "6 10");
    wait_until("the reason on the server", Duration::from_secs(20), || {
        let c = server.computer()?;
        let ev = c["events"].as_array()?;
        let crashed = ev
            .iter()
            .filter(|e| e["kind"] == "patched_process_crashed")
            .count();
        let tripped = ev
            .iter()
            .any(|e| e.to_string().contains("agent.crash_protection"));
        (crashed >= 2 && tripped).then_some(())
    });
    // A new process is not patched, also after an agent restart.
    agent.stop();
    agent.start();
    let mut fresh = Running::start(&target.exe);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fresh.ask(5), "6 10");
}

#[test]
fn replaced_target_file_is_not_patched_and_old_build_coming_back_is() {
    if !can_run() {
        return;
    }
    let w = world("replace", "ST-2026-0109", RETURN_1000, 3);
    let path = w.target.exe.clone();
    let original = w.target.bytes.clone();
    // Vendor update: a different build replaces the file (rename over it, as dpkg does).
    let newer = compile(&unique_tag("replace-new"));
    let tmp = w.target.dir.path().join("target.new");
    std::fs::copy(&newer.exe, &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut updated = Running::start(&path);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(updated.ask(5), "6 10", "new build: hash differs, no patch");
    assert!(carried(updated.pid()).is_empty());
    // The vulnerable build comes back.
    std::fs::write(&tmp, &original).unwrap();
    let mut perm = std::fs::metadata(&tmp).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&tmp, perm).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut back = Running::start(&path);
    wait_until(
        "the old build to be patched again",
        Duration::from_secs(10),
        || back.patched().then_some(()),
    );
    drop(w);
}

/// A CONNECT proxy that requires `Proxy-Authorization: Basic agent:s3cret` and counts tunnels.
fn connect_proxy() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let t2 = tunnels.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let t = t2.clone();
            std::thread::spawn(move || proxy_one(c, &t));
        }
    });
    (format!("http://{addr}"), tunnels)
}

fn proxy_one(mut c: TcpStream, tunnels: &AtomicUsize) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b).unwrap_or(0) == 0 {
            return;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.lines();
    let req = lines.next().unwrap_or("");
    let mut parts = req.split_whitespace();
    if parts.next() != Some("CONNECT") {
        let _ = c.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n");
        return;
    }
    let target = parts.next().unwrap_or("").to_string();
    use base64::Engine as _;
    let want = format!(
        "basic {}",
        base64::engine::general_purpose::STANDARD.encode("agent:s3cret")
    );
    let authed = lines.any(|l| {
        l.to_ascii_lowercase().starts_with("proxy-authorization:")
            && l.split_once(':')
                .is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case(&want))
    });
    if !authed {
        let _ = c.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let Ok(up) = TcpStream::connect(&target) else {
        let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    tunnels.fetch_add(1, Ordering::Relaxed);
    let _ = c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    let (mut a, mut b2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
    let mut c2 = c;
    let mut up2 = up;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b2, &mut c2);
    let _ = c2.shutdown(std::net::Shutdown::Write);
}

#[test]
fn proxy_in_between_with_authentication_carries_all_agent_traffic() {
    if !can_run() {
        return;
    }
    let (proxy, tunnels) = connect_proxy();
    let server = Server::start(false);
    let target = compile(&unique_tag("proxy"));
    let mut run = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            proxy: Some(&proxy),
            ..Default::default()
        },
    );
    agent.start();
    wait_until("inventory via the proxy", Duration::from_secs(20), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    server.publish(patch_bundle(
        &target,
        "ST-2026-0110",
        RETURN_1000,
        &vendor_key(),
    ));
    wait_until("the patch via the proxy", Duration::from_secs(20), || {
        run.patched().then_some(())
    });
    assert!(
        tunnels.load(Ordering::Relaxed) > 0,
        "traffic went through the proxy"
    );
}

#[test]
fn full_disk_state_dir_agent_keeps_patching_from_memory() {
    if !can_run() {
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(!in_ci(), "CI=true but tmpfs cannot be mounted");
        eprintln!("SKIPPED: cannot mount a tmpfs");
        return;
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.path().to_path_buf());
    let server = Server::start(false);
    let target = compile(&unique_tag("full"));
    let mut run = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    let state = mnt.path().join("state");
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            state_dir: Some(&state),
            ..Default::default()
        },
    );
    agent.start();
    wait_until("inventory", Duration::from_secs(20), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    // Fill the disk.
    let filler = mnt.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    server.publish(patch_bundle(
        &target,
        "ST-2026-0111",
        RETURN_1000,
        &vendor_key(),
    ));
    wait_until(
        "the patch applied despite the full disk",
        Duration::from_secs(20),
        || run.patched().then_some(()),
    );
    let s = agent.ask(AgentAction::Status);
    assert!(
        s["store"]["error"].is_string(),
        "the store error is visible: {s}"
    );
    // Space comes back: the store catches up (bundle written).
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    wait_until(
        "the bundle to be persisted",
        Duration::from_secs(20),
        || {
            agent
                .patch("ST-2026-0111")
                .filter(|p| p["persisted"] == true)
        },
    );
    agent.stop();
}

#[test]
fn control_socket_is_root_only_and_refuses_garbage() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let mut agent = Agent::configure(home.path(), &AgentOpts::default());
    agent.start();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&agent.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    s.write_all(b"{\"action\":\"format_disk\"}\n").unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "control.bad_request");
    // As another user (nobody), the connection is refused by credentials.
    let bin = env!("CARGO_BIN_EXE_stitchd");
    let _ = bin;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c"])
        .arg(format!(
            "import socket;s=socket.socket(socket.AF_UNIX);s.connect({:?});s.sendall(b'{{\"action\":\"status\"}}\\n');print(s.recv(4096))",
            agent.socket.display().to_string()
        ))
        .output();
    if let Ok(o) = out {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            text.contains("Permission denied") || text.contains("control.forbidden"),
            "non-root got in: {text}"
        );
    }
    let _ = json!({});
}

#[test]
fn server_policy_disable_reverts_live_and_enable_reapplies_within_seconds() {
    if !can_run() {
        return;
    }
    let mut w = world("srvpolicy", "ST-2026-0112", RETURN_1000, 3);
    let t0 = Instant::now();
    w.server.policy("ST-2026-0112", false);
    w.agent.until(
        "the server's disable to revert the patch",
        Duration::from_secs(15),
        || (!w.run.patched()).then_some(()),
    );
    let p = w.agent.patch("ST-2026-0112").unwrap();
    assert_eq!(p["server_enabled"], false);
    assert_eq!(p["state"], "disabled");
    // A local enable cannot override the server's decision.
    w.agent.ask(AgentAction::Enable {
        patch: Some("ST-2026-0112".into()),
    });
    assert!(!w.run.patched());
    w.server.policy("ST-2026-0112", true);
    w.agent.until(
        "the server's enable to re-apply",
        Duration::from_secs(15),
        || w.run.patched().then_some(()),
    );
    eprintln!("server disable+enable round trip: {:?}", t0.elapsed());
}

#[test]
fn sigterm_stops_cleanly_reports_agent_stopped_and_leaves_patches_in_place() {
    if !can_run() {
        return;
    }
    let mut w = world("sigterm", "ST-2026-0113", RETURN_1000, 3);
    w.agent.stop();
    assert!(w.run.patched(), "stopping the agent does not revert");
    wait_until(
        "agent_stopped on the server",
        Duration::from_secs(10),
        || {
            w.server
                .event_kinds()
                .iter()
                .any(|k| k == "agent_stopped")
                .then_some(())
        },
    );
}

#[test]
fn load_time_hook_patches_a_new_process_before_its_first_call() {
    if !can_run() {
        return;
    }
    let server = Server::start(false);
    let target = compile(&unique_tag("hook"));
    let mut old = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
            hook_dir: Some(target.dir.path()),
            ..Default::default()
        },
    );
    agent.start();
    agent.until("inventory", Duration::from_secs(20), || {
        server
            .computer()
            .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
    });
    server.publish(patch_bundle(
        &target,
        "ST-2026-0114",
        RETURN_1000,
        &vendor_key(),
    ));
    agent.until(
        "the running process patched live",
        Duration::from_secs(20),
        || old.patched().then_some(()),
    );
    let s = agent.until(
        "the hook to mark the target",
        Duration::from_secs(20),
        || {
            let s = agent.ask(AgentAction::Status);
            s["load_time_hook"]
                .as_str()
                .is_some_and(|h| h.starts_with("active"))
                .then_some(s)
        },
    );
    assert!(
        s["load_time_hook"].as_str().unwrap().contains("1 target"),
        "{s}"
    );
    // main() calls compute(4) before reading anything: patched at exec, it prints 1000.
    let mut fresh_ones = Vec::new();
    for _ in 0..3 {
        let mut fresh = Running::start(&target.exe);
        assert_eq!(
            fresh.first,
            "start 1000",
            "patched before its first instruction\n{}",
            agent.log_text()
        );
        assert!(fresh.patched());
        fresh_ones.push(fresh);
    }
    let s = agent.until(
        "the agent to know the new carriers",
        Duration::from_secs(10),
        || {
            let s = agent.ask(AgentAction::Status);
            (s["metrics"]["load_time_applied"].as_u64() >= Some(3)).then_some(s)
        },
    );
    assert!(s["processes_patched"].as_u64() >= Some(4), "{s}");
    // Disabling the patch stops the hook from applying it, and reverts live.
    agent.ask(AgentAction::Disable {
        patch: Some("ST-2026-0114".into()),
    });
    assert!(!old.patched());
    assert!(
        fresh_ones.iter_mut().all(|f| !f.patched()),
        "load-time carriers reverted too"
    );
    // The hook keeps running with no bundles (Hook::set_bundles returned after any hold
    // with the old ones finished): a new process is not patched.
    let s = agent.ask(AgentAction::Status);
    assert!(
        s["load_time_hook"]
            .as_str()
            .is_some_and(|h| h.starts_with("idle")),
        "{s}"
    );
    let fresh = Running::start(&target.exe);
    assert_eq!(fresh.first, "start 5");
    // Enabled again: the same hook takes the bundle back, the next process is patched at exec.
    agent.ask(AgentAction::Enable {
        patch: Some("ST-2026-0114".into()),
    });
    let s = agent.ask(AgentAction::Status);
    assert!(
        s["load_time_hook"]
            .as_str()
            .is_some_and(|h| h.starts_with("active: 1 target")),
        "{s}"
    );
    let again = Running::start(&target.exe);
    assert_eq!(again.first, "start 1000", "{}", agent.log_text());
    assert_eq!(
        agent.log_text().matches("load-time hook started").count(),
        1,
        "one hook for the agent's life, bundles changed in place"
    );
}

/// How many events of `kind` the server holds for the (only) computer.
fn server_count(server: &Server, kind: &str) -> usize {
    server.event_kinds().iter().filter(|k| *k == kind).count()
}

fn prerm() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/debian/prerm"
    ))
}

#[test]
fn agent_installed_is_reported_once_per_installation_not_on_restarts() {
    if !can_run() {
        return;
    }
    let mut w = world("installed", "ST-2026-0115", RETURN_1000, 3);
    wait_until(
        "agent_installed on the server",
        Duration::from_secs(20),
        || (server_count(&w.server, "agent_installed") > 0).then_some(()),
    );
    // Restarted cleanly, and killed: still one installation.
    w.agent.stop();
    w.agent.start();
    w.agent.kill();
    w.agent.start();
    wait_until(
        "three agent_started on the server",
        Duration::from_secs(20),
        || (server_count(&w.server, "agent_started") >= 3).then_some(()),
    );
    wait_until("the outbox to drain", Duration::from_secs(20), || {
        (w.agent.ask(AgentAction::Status)["outbox"] == 0).then_some(())
    });
    assert_eq!(server_count(&w.server, "agent_installed"), 1);
    let local = w
        .agent
        .events()
        .iter()
        .filter(|e| e["event"]["kind"] == "agent_installed")
        .count();
    assert_eq!(local, 1, "recorded once in the local log too");
}

#[test]
fn package_removal_reverts_every_patch_and_reports_agent_uninstalled_but_upgrade_does_not() {
    if !can_run() {
        return;
    }
    let mut w = world("uninstall", "ST-2026-0116", RETURN_1000, 3);
    let mut second = Running::start(&w.target.exe);
    w.agent.until(
        "the second process patched",
        Duration::from_secs(10),
        || second.patched().then_some(()),
    );
    // While stitchd runs, uninstall refuses: the agent would re-apply what it reverts.
    let o = w
        .agent
        .command(&stitchd())
        .arg("uninstall")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("agent.running"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(w.run.patched());
    // The package manager stops the service first (#DEBHELPER#); that leaves patches in place.
    w.agent.stop();
    assert!(w.run.patched() && second.patched());
    // An upgrade runs prerm with `upgrade`: nothing is reverted, nothing reported.
    let o = w
        .agent
        .command(Path::new("sh"))
        .arg(prerm())
        .args(["upgrade", "0.1.0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(w.run.patched() && second.patched(), "upgrade keeps patches");
    // Removal: every patch out of every process, agent_uninstalled delivered.
    let t0 = Instant::now();
    let o = w
        .agent
        .command(Path::new("sh"))
        .arg(prerm())
        .arg("remove")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("reverted 2 patch application(s)"), "{out}");
    assert!(out.contains("agent_uninstalled delivered"), "{out}");
    assert!(!w.run.patched() && !second.patched(), "reverted live");
    assert!(carried(w.run.pid()).is_empty());
    assert_eq!(server_count(&w.server, "agent_uninstalled"), 1);
    eprintln!("prerm remove took {:?}", t0.elapsed());
    // Installed again on the kept state directory: a new installation, patches back.
    w.agent.start();
    wait_until(
        "a second agent_installed on the server",
        Duration::from_secs(20),
        || (server_count(&w.server, "agent_installed") == 2).then_some(()),
    );
    assert!(w.run.patched());
}

#[test]
fn uninstall_with_server_down_reverts_within_its_bound_and_queues_agent_uninstalled() {
    if !can_run() {
        return;
    }
    let mut w = world("uninstall-offline", "ST-2026-0117", RETURN_1000, 3);
    w.agent.stop();
    w.server.down();
    let t0 = Instant::now();
    let o = w
        .agent
        .command(&stitchd())
        .args(["uninstall", "--wait-s", "2", "--json"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(o.status.success(), "{o:?}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["reverted"], 1, "{r}");
    assert_eq!(r["delivered"], false, "{r}");
    assert!(r["outbox"].as_u64() >= Some(1), "{r}");
    assert!(r["delivery_error"].as_str().is_some(), "{r}");
    assert!(took < Duration::from_secs(6), "bounded wait: {took:?}");
    assert!(!w.run.patched());
    // The queued event is delivered when the agent runs again on this state directory.
    w.server.up();
    w.agent.start();
    wait_until(
        "agent_uninstalled delivered late",
        Duration::from_secs(30),
        || (server_count(&w.server, "agent_uninstalled") == 1).then_some(()),
    );
}

#[test]
fn quiet_patch_backs_off_hit_counter_reads_yet_a_later_exploit_is_reported_within_the_cap() {
    if !can_run() {
        return;
    }
    let mut w = world("hits-backoff", "ST-2026-0118", RETURN_1000, 3);
    let blocked = |a: &Agent| {
        a.events()
            .iter()
            .filter(|e| e["event"]["kind"] == "exploit_blocked")
            .count()
    };
    // The calls that showed the patch applied were hits: let them be reported first.
    w.agent
        .until("the setup's hits reported", Duration::from_secs(10), || {
            (blocked(&w.agent) > 0).then_some(())
        });
    // Production-like: read every 1 s after a hit, doubling up to 4 s while nothing is hit.
    w.agent.stop();
    let cfg = std::fs::read_to_string(&w.agent.config).unwrap();
    std::fs::write(
        &w.agent.config,
        cfg.replace("hits_max_interval_s = 1", "hits_max_interval_s = 4"),
    )
    .unwrap();
    w.agent.start();
    let reads = |a: &Agent| {
        a.ask(AgentAction::Status)["metrics"]["hit_reads"]
            .as_u64()
            .unwrap()
    };
    let r0 = reads(&w.agent);
    std::thread::sleep(Duration::from_secs(10));
    let quiet = reads(&w.agent) - r0;
    // Without backoff 10 reads; with it 1 s, 2 s, 4 s, 4 s: 3 or 4.
    assert!(
        (2..=5).contains(&quiet),
        "{quiet} reads in 10 quiet seconds"
    );
    let before = blocked(&w.agent);
    let t0 = Instant::now();
    assert!(
        w.run.patched(),
        "a call through the patch: one blocked attempt"
    );
    w.agent.until(
        "exploit_blocked after the quiet spell",
        Duration::from_secs(8),
        || (blocked(&w.agent) > before).then_some(()),
    );
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
}

//! `stitchd` as a real process against a real server on loopback, patching real processes.
//! One binary; each test is named after the hazard it covers. These need root (the agent
//! traces processes it did not start): outside CI they skip with a printed reason, with
//! `CI=true` they fail instead.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stitch_agent::AgentAction;
use stitch_format::SecretKey;

// ------------------------------------------------------------------------------ harness

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Root is needed: the agent ptraces processes that are not its children.
fn can_run() -> bool {
    let root = rustix_uid() == 0;
    let gcc = Command::new("gcc").arg("--version").output().is_ok();
    let dpkg = libc6_version().is_some();
    let reason = if !root {
        "needs root (the agent traces processes it did not start)"
    } else if !gcc {
        "needs gcc to build the target program"
    } else if !dpkg {
        "needs dpkg-query and libc6 (the test patch targets an installed package)"
    } else {
        return true;
    };
    assert!(!in_ci(), "CI=true but this test cannot run: {reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

fn rustix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn libc6_version() -> Option<String> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libc6"])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !v.is_empty()).then_some(v)
}

fn vendor_key() -> SecretKey {
    SecretKey::from_seed([42; 32])
}
fn rogue_key() -> SecretKey {
    SecretKey::from_seed([13; 32])
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// Target: reads numbers on stdin, answers compute(n) other(n). Each build carries a unique
/// tag, so agents of tests running in parallel never match each other's targets.
fn target_c(tag: &str) -> String {
    format!(
        r#"
#include <stdio.h>
#include <stdlib.h>
const char *stitch_test_tag = "{tag}";
__attribute__((noinline)) int compute(int x) {{ return x + 1; }}
__attribute__((noinline)) int other(int x) {{ return x * 2; }}
int main(void) {{
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {{
        int n = atoi(line);
        printf("%d %d\n", compute(n), other(n));
    }}
    return 0;
}}
"#
    )
}

struct Target {
    dir: tempfile::TempDir,
    exe: PathBuf,
    bytes: Vec<u8>,
}

fn compile(tag: &str) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("t.c");
    std::fs::write(&c, target_c(tag)).unwrap();
    let exe = dir.path().join("target");
    let st = Command::new("gcc")
        .args([
            "-O0",
            "-fno-omit-frame-pointer",
            "-fcf-protection=none",
            "-Wl,--build-id=sha1",
        ])
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .status()
        .expect("gcc");
    assert!(st.success());
    let bytes = std::fs::read(&exe).unwrap();
    Target { dir, exe, bytes }
}

fn unique_tag(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    fn start(exe: &Path) -> Running {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut r = Running {
            child,
            stdin,
            stdout,
        };
        assert!(!r.ask(1).is_empty());
        r
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn ask(&mut self, n: i32) -> String {
        let _ = writeln!(self.stdin, "{n}");
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line.trim().to_string()
    }
    fn patched(&mut self) -> bool {
        self.ask(5) == "1000 10"
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A signed bundle for `func` in `target`, as the test vendor (or `key`) would publish it.
fn patch_bundle(t: &Target, id: &str, code: &str, key: &SecretKey) -> Vec<u8> {
    let elf = stitch_elf::ElfFile::parse(&t.bytes).unwrap();
    let at = elf.symbol("compute").unwrap().vaddr;
    let mut original = Vec::new();
    for l in stitch_x86::disassemble(elf.bytes_at(at, 16).unwrap(), at) {
        original.extend(l.bytes);
        if original.len() >= 5 {
            break;
        }
    }
    let toml = format!(
        r#"id = "{id}"
revision = 1
title = "test patch"
severity = "high"
tier = "free"
author = "tests"
[target]
module = "target"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "libc6", version = "{}" }}
[[patchlet]]
name = "p"
at = "compute"
original = "{}"
displaced = "drop"
code = '''
{code}
'''
"#,
        hex::encode(stitch_elf::sha256(&t.bytes)),
        hex::encode(elf.build_id().unwrap()),
        libc6_version().unwrap(),
        stitch_build::hex_spaced(&original),
    );
    let mut b = stitch_build::build(&toml, Path::new("."), &t.bytes, &Default::default()).unwrap();
    b.sign(key).unwrap();
    b.encode()
}

const RETURN_1000: &str = "stitch_hit\nmov eax, 1000\nret";
const CRASH: &str = "ud2";

/// A real server in-process (its own Tokio runtime), restartable on the same port and data.
struct Server {
    rt: tokio::runtime::Runtime,
    handle: Option<stitch_server::ServerHandle>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    api: String,
    enroll: String,
    http: reqwest::Client,
    trust_rogue: bool,
}

impl Server {
    fn start(trust_rogue: bool) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = Server {
            rt,
            handle: None,
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            api: String::new(),
            enroll: String::new(),
            http: reqwest::Client::new(),
            trust_rogue,
        };
        s.up();
        let store = s.handle.as_ref().unwrap().store.clone();
        let out =
            s.rt.block_on(stitch_server::bootstrap(
                &store,
                &stitch_server::BootstrapSpec {
                    org: "acme".into(),
                    plan: stitch_server::model::Plan::Paid,
                    admin: Some(("admin".into(), "password-admin".into())),
                },
            ))
            .unwrap();
        s.api = out.api_token;
        s.enroll = out.enrollment_token;
        s
    }

    fn up(&mut self) {
        let mut c = stitch_server::Config::new(self.dir.path().to_path_buf());
        c.listen = self.addr;
        c.long_poll_max = Duration::from_secs(5);
        c.trusted_keys.insert(vendor_key().public());
        if self.trust_rogue {
            c.trusted_keys.insert(rogue_key().public());
        }
        let h = self
            .rt
            .block_on(stitch_server::run(c))
            .expect("server starts");
        self.addr = h.addr;
        self.handle = Some(h);
    }

    fn down(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn publish(&self, bytes: Vec<u8>) -> Instant {
        let t = Instant::now();
        let r = self.rt.block_on(async {
            self.http
                .post(format!("{}/api/v1/catalog/bundles", self.url()))
                .bearer_auth(&self.api)
                .header("content-type", "application/octet-stream")
                .body(bytes)
                .send()
                .await
                .unwrap()
        });
        assert!(r.status().is_success(), "upload: {}", r.status());
        t
    }

    fn get(&self, path: &str) -> Value {
        self.rt.block_on(async {
            let r = self
                .http
                .get(format!("{}{path}", self.url()))
                .bearer_auth(&self.api)
                .send()
                .await
                .unwrap();
            r.json().await.unwrap()
        })
    }

    fn put(&self, path: &str, body: &Value) {
        let r = self.rt.block_on(async {
            self.http
                .put(format!("{}{path}", self.url()))
                .bearer_auth(&self.api)
                .json(body)
                .send()
                .await
                .unwrap()
        });
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }

    /// Sets the default group's policy for a patch.
    fn policy(&self, patch: &str, enabled: bool) {
        let g = self.get("/api/v1/groups");
        let gid = g["groups"][0]["id"].as_i64().unwrap();
        self.put(
            &format!("/api/v1/groups/{gid}/policies/{patch}"),
            &json!({ "enabled": enabled }),
        );
    }

    fn computer(&self) -> Option<Value> {
        let list = self.get("/api/v1/computers");
        let id = list["computers"][0]["id"].as_str()?.to_string();
        Some(self.get(&format!("/api/v1/computers/{id}")))
    }

    fn event_kinds(&self) -> Vec<String> {
        self.computer()
            .map(|c| {
                c["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["kind"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.down();
    }
}

/// A `stitchd` process.
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

struct AgentOpts<'a> {
    server: Option<&'a str>,
    enroll: Option<&'a str>,
    proxy: Option<&'a str>,
    crash_threshold: u32,
    state_dir: Option<&'a Path>,
}

impl Default for AgentOpts<'_> {
    fn default() -> Self {
        AgentOpts {
            server: None,
            enroll: None,
            proxy: None,
            crash_threshold: 3,
            state_dir: None,
        }
    }
}

impl Agent {
    fn configure(dir: &Path, o: &AgentOpts<'_>) -> Agent {
        let state = o
            .state_dir
            .map_or_else(|| dir.join("state"), Path::to_path_buf);
        let mut cfg = format!(
            "state_dir = {:?}\nsocket_path = {:?}\ntrusted_keys = [{:?}]\n",
            state,
            dir.join("stitchd.sock"),
            vendor_key().public().to_line()
        );
        if let Some(s) = o.server {
            cfg += &format!("server_url = {s:?}\n");
        }
        if let Some(t) = o.enroll {
            cfg += &format!("enrollment_token = {t:?}\n");
        }
        cfg += "[scan]\ninterval_s = 2\nhits_interval_s = 1\n";
        cfg += &format!(
            "[crash]\nthreshold = {}\nwindow_s = 600\n",
            o.crash_threshold
        );
        cfg += "[sync]\nlong_poll_s = 5\nfallback_s = 30\nheartbeat_s = 2\nbackoff_initial_ms = 100\nbackoff_max_s = 1\nrequest_timeout_s = 10\n";
        if let Some(p) = o.proxy {
            cfg += &format!("[proxy]\nurl = {p:?}\nusername = \"agent\"\npassword = \"s3cret\"\n");
        }
        let config = dir.join("agent.toml");
        std::fs::write(&config, cfg).unwrap();
        Agent {
            child: None,
            dir: state,
            config,
            socket: dir.join("stitchd.sock"),
            log: dir.join("stitchd.log"),
        }
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stitchd"))
            .arg("--config")
            .arg(&self.config)
            .env("STITCH_LOG", "stitch_agent=debug,info")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until("the control socket", Duration::from_secs(20), || {
            self.try_ask(&AgentAction::Status).ok()
        });
    }

    fn try_ask(&self, a: &AgentAction) -> Result<Value, stitch_agent::AgentError> {
        stitch_agent::control::request(&self.socket, a)
    }

    fn ask(&self, a: AgentAction) -> Value {
        self.try_ask(&a)
            .unwrap_or_else(|e| panic!("{a:?}: {e}\n--- log ---\n{}", self.log_text()))
    }

    /// [`wait_until`], printing the agent's log on timeout.
    fn until<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n--- agent log ---\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn patch(&self, id: &str) -> Option<Value> {
        let v = self.ask(AgentAction::Patches);
        v["patches"]
            .as_array()?
            .iter()
            .find(|p| p["patch_id"] == id)
            .cloned()
    }

    fn events(&self) -> Vec<Value> {
        self.ask(AgentAction::Events { limit: 500 })["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn has_event(&self, kind: &str) -> bool {
        self.events().iter().any(|e| e["event"]["kind"] == kind)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn carried(pid: i32) -> Vec<String> {
    stitch_engine::Engine::new()
        .list(stitch_sys::Pid(pid))
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.record.state == stitch_engine::region::RecordState::Applied)
        .map(|a| a.record.id)
        .collect()
}

/// A server, a target program, a running target process and an enrolled agent that has
/// applied `id` to it.
struct World {
    server: Server,
    target: Target,
    run: Running,
    agent: Agent,
    _home: tempfile::TempDir,
}

fn world(name: &str, id: &str, code: &str, threshold: u32) -> World {
    let server = Server::start(false);
    let target = compile(&unique_tag(name));
    let mut run = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    let url = server.url();
    let mut agent = Agent::configure(
        home.path(),
        &AgentOpts {
            server: Some(&url),
            enroll: Some(&server.enroll),
            crash_threshold: threshold,
            ..Default::default()
        },
    );
    agent.start();
    wait_until(
        "the agent to report its inventory",
        Duration::from_secs(20),
        || {
            server
                .computer()
                .filter(|c| c["packages"].as_array().is_some_and(|p| !p.is_empty()))
        },
    );
    server.publish(patch_bundle(&target, id, code, &vendor_key()));
    wait_until("the patch to be applied", Duration::from_secs(20), || {
        run.patched().then_some(())
    });
    World {
        server,
        target,
        run,
        agent,
        _home: home,
    }
}

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
    let url = server.url();
    let mut agent = Agent::configure(
        home.path(),
        &AgentOpts {
            server: Some(&url),
            enroll: Some(&server.enroll),
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
    let url = server.url();
    let mut agent = Agent::configure(
        home.path(),
        &AgentOpts {
            server: Some(&url),
            enroll: Some(&server.enroll),
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
    let url = server.url();
    let mut agent = Agent::configure(
        home.path(),
        &AgentOpts {
            server: Some(&url),
            enroll: Some(&server.enroll),
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
    let url = server.url();
    let state = mnt.path().join("state");
    let mut agent = Agent::configure(
        home.path(),
        &AgentOpts {
            server: Some(&url),
            enroll: Some(&server.enroll),
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
    w.agent.until("the server's disable to revert the patch", Duration::from_secs(15), || {
        (!w.run.patched()).then_some(())
    });
    let p = w.agent.patch("ST-2026-0112").unwrap();
    assert_eq!(p["server_enabled"], false);
    assert_eq!(p["state"], "disabled");
    // A local enable cannot override the server's decision.
    w.agent.ask(AgentAction::Enable { patch: Some("ST-2026-0112".into()) });
    assert!(!w.run.patched());
    w.server.policy("ST-2026-0112", true);
    w.agent.until("the server's enable to re-apply", Duration::from_secs(15), || {
        w.run.patched().then_some(())
    });
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
    wait_until("agent_stopped on the server", Duration::from_secs(10), || {
        w.server.event_kinds().iter().any(|k| k == "agent_stopped").then_some(())
    });
}

//! Shared by the integration tests and the benchmarks: a real server in-process, target
//! programs compiled with gcc, patches built with stitch-build, `stitchd` as a child process.
#![allow(dead_code, reason = "the benchmarks use a subset")]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stitch_agent::AgentAction;
use stitch_format::SecretKey;

pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Root is needed: the agent ptraces processes that are not its children.
pub(crate) fn can_run() -> bool {
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

pub(crate) fn rustix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

pub(crate) fn libc6_version() -> Option<String> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libc6"])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !v.is_empty()).then_some(v)
}

/// The `stitchd` binary: Cargo builds it for the agent's own tests and benchmarks; other
/// crates' tests (the CLI's) have it built here, once, with the same cargo and target dir.
pub(crate) fn stitchd() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_stitchd") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
            let o = Command::new(cargo)
                .args(["build", "-p", "stitch-agent", "--bin", "stitchd"])
                .args([
                    "--message-format",
                    "json-render-diagnostics",
                    "--manifest-path",
                ])
                .arg(manifest)
                .stderr(Stdio::inherit())
                .output()
                .expect("cargo build stitchd");
            assert!(
                o.status.success(),
                "cargo build -p stitch-agent --bin stitchd failed"
            );
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find_map(|m| {
                    (m["target"]["name"] == "stitchd")
                        .then(|| m["executable"].as_str().map(PathBuf::from))
                        .flatten()
                })
                .expect("cargo reported no stitchd executable")
        })
        .clone()
}

pub(crate) fn vendor_key() -> SecretKey {
    SecretKey::from_seed([42; 32])
}
pub(crate) fn rogue_key() -> SecretKey {
    SecretKey::from_seed([13; 32])
}

pub(crate) fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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

pub(crate) static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// Target: reads numbers on stdin, answers compute(n) other(n). Each build carries a unique
/// tag, so agents of tests running in parallel never match each other's targets.
pub(crate) fn target_c(tag: &str) -> String {
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
    printf("start %d\n", compute(4));
    while (fgets(line, sizeof line, stdin)) {{
        int n = atoi(line);
        printf("%d %d\n", compute(n), other(n));
    }}
    return 0;
}}
"#
    )
}

pub(crate) struct Target {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) exe: PathBuf,
    pub(crate) bytes: Vec<u8>,
}

pub(crate) fn compile(tag: &str) -> Target {
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

pub(crate) fn unique_tag(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: BufReader<ChildStdout>,
    /// The first line: `start compute(4)`, printed before reading anything.
    pub(crate) first: String,
}

impl Running {
    pub(crate) fn start(exe: &Path) -> Running {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut r = Running {
            child,
            stdin,
            stdout,
            first: String::new(),
        };
        let _ = r.stdout.read_line(&mut r.first);
        r.first = r.first.trim().to_string();
        assert!(!r.ask(1).is_empty());
        r
    }
    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub(crate) fn ask(&mut self, n: i32) -> String {
        let _ = writeln!(self.stdin, "{n}");
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line.trim().to_string()
    }
    pub(crate) fn patched(&mut self) -> bool {
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
pub(crate) fn patch_bundle(t: &Target, id: &str, code: &str, key: &SecretKey) -> Vec<u8> {
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

pub(crate) const RETURN_1000: &str = "stitch_hit\nmov eax, 1000\nret";
pub(crate) const CRASH: &str = "ud2";

/// A real server in-process (its own Tokio runtime), restartable on the same port and data.
pub(crate) struct Server {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) handle: Option<stitch_server::ServerHandle>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) addr: SocketAddr,
    pub(crate) api: String,
    pub(crate) enroll: String,
    pub(crate) http: reqwest::Client,
    pub(crate) trust_rogue: bool,
    pub(crate) long_poll: Duration,
}

impl Server {
    pub(crate) fn start(trust_rogue: bool) -> Server {
        Self::start_with(trust_rogue, Duration::from_secs(5))
    }

    pub(crate) fn start_with(trust_rogue: bool, long_poll: Duration) -> Server {
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
            long_poll,
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

    pub(crate) fn up(&mut self) {
        let mut c = stitch_server::Config::new(self.dir.path().to_path_buf());
        c.listen = self.addr;
        c.long_poll_max = self.long_poll;
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

    pub(crate) fn down(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An agent configured in `home` to enroll with this server; `opts` says the rest.
    pub(crate) fn agent(&self, home: &Path, opts: AgentOpts<'_>) -> Agent {
        let url = self.url();
        Agent::configure(
            home,
            &AgentOpts {
                server: Some(&url),
                enroll: Some(&self.enroll),
                ..opts
            },
        )
    }

    pub(crate) fn publish(&self, bytes: Vec<u8>) -> Instant {
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

    pub(crate) fn get(&self, path: &str) -> Value {
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

    pub(crate) fn put(&self, path: &str, body: &Value) {
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
    pub(crate) fn policy(&self, patch: &str, enabled: bool) {
        let g = self.get("/api/v1/groups");
        let gid = g["groups"][0]["id"].as_i64().unwrap();
        self.put(
            &format!("/api/v1/groups/{gid}/policies/{patch}"),
            &json!({ "enabled": enabled }),
        );
    }

    pub(crate) fn computer(&self) -> Option<Value> {
        let list = self.get("/api/v1/computers");
        let id = list["computers"][0]["id"].as_str()?.to_string();
        Some(self.get(&format!("/api/v1/computers/{id}")))
    }

    pub(crate) fn event_kinds(&self) -> Vec<String> {
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
pub(crate) struct Agent {
    pub(crate) child: Option<Child>,
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) log: PathBuf,
}

pub(crate) struct AgentOpts<'a> {
    pub(crate) server: Option<&'a str>,
    pub(crate) enroll: Option<&'a str>,
    pub(crate) proxy: Option<&'a str>,
    pub(crate) crash_threshold: u32,
    pub(crate) state_dir: Option<&'a Path>,
    /// Production intervals (scan 300 s, hits 10 s, long-poll 55 s) instead of the tests'
    /// short ones.
    pub(crate) realistic: bool,
    /// Run the load-time hook on this directory only (None: hook off, unless `realistic`).
    pub(crate) hook_dir: Option<&'a Path>,
}

impl Default for AgentOpts<'_> {
    fn default() -> Self {
        AgentOpts {
            server: None,
            enroll: None,
            proxy: None,
            crash_threshold: 3,
            state_dir: None,
            realistic: false,
            hook_dir: None,
        }
    }
}

impl Agent {
    pub(crate) fn configure(dir: &Path, o: &AgentOpts<'_>) -> Agent {
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
        cfg += if o.realistic {
            "[scan]\ninterval_s = 300\nhits_interval_s = 10\n"
        } else {
            "[scan]\ninterval_s = 2\nhits_interval_s = 1\nhits_max_interval_s = 1\n"
        };
        cfg += &format!(
            "[crash]\nthreshold = {}\nwindow_s = 600\n",
            o.crash_threshold
        );
        cfg += if o.realistic {
            "[sync]\nlong_poll_s = 55\n"
        } else {
            "[sync]\nlong_poll_s = 5\nfallback_s = 30\nheartbeat_s = 2\nbackoff_initial_ms = 100\nbackoff_max_s = 1\nrequest_timeout_s = 10\n"
        };
        match (o.hook_dir, o.realistic) {
            (Some(d), _) => cfg += &format!("[hook]\nstandard_dirs = false\ndirs = [{d:?}]\n"),
            (None, true) => {}
            (None, false) => cfg += "[hook]\nenabled = false\n",
        }
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

    /// `stitchd` (or whatever `program` finds `stitchd` on PATH, like a maintainer script)
    /// with this agent's config in `STITCH_CONFIG`, without proxy variables.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let bin = stitchd();
        let bin_dir = bin.parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new(program);
        c.env("STITCH_CONFIG", &self.config)
            .env("PATH", path)
            .env("STITCH_LOG", "stitch_agent=debug,info");
        for v in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            c.env_remove(v);
        }
        c
    }

    pub(crate) fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(stitchd())
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

    pub(crate) fn try_ask(&self, a: &AgentAction) -> Result<Value, stitch_agent::AgentError> {
        stitch_agent::control::request(&self.socket, a)
    }

    pub(crate) fn ask(&self, a: AgentAction) -> Value {
        self.try_ask(&a)
            .unwrap_or_else(|e| panic!("{a:?}: {e}\n--- log ---\n{}", self.log_text()))
    }

    /// [`wait_until`], printing the agent's log on timeout.
    pub(crate) fn until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
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

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub(crate) fn stop(&mut self) {
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

    pub(crate) fn patch(&self, id: &str) -> Option<Value> {
        let v = self.ask(AgentAction::Patches);
        v["patches"]
            .as_array()?
            .iter()
            .find(|p| p["patch_id"] == id)
            .cloned()
    }

    pub(crate) fn events(&self) -> Vec<Value> {
        self.ask(AgentAction::Events { limit: 500 })["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn has_event(&self, kind: &str) -> bool {
        self.events().iter().any(|e| e["event"]["kind"] == kind)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn carried(pid: i32) -> Vec<String> {
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
pub(crate) struct World {
    pub(crate) server: Server,
    pub(crate) target: Target,
    pub(crate) run: Running,
    pub(crate) agent: Agent,
    pub(crate) _home: tempfile::TempDir,
}

pub(crate) fn world(name: &str, id: &str, code: &str, threshold: u32) -> World {
    let server = Server::start(false);
    let target = compile(&unique_tag(name));
    let mut run = Running::start(&target.exe);
    let home = tempfile::tempdir().unwrap();
    let mut agent = server.agent(
        home.path(),
        AgentOpts {
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

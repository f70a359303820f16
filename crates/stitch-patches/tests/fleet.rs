//! The real system the patches go through: a `stitch-server` (SQLite in the test's temporary
//! directory, a bootstrapped organisation, the test's throwaway vendor key trusted) and a
//! `stitchd` enrolled to it (its load-time hook watching the test's `site-packages`).
//!
//! A patch reaches a process only the way it reaches one in production: `stitch publish` to
//! the server, then the agent's manifest long-poll, download, signature check and apply —
//! live to the processes already running, or at load time through the hook for those started
//! later. The tests only observe: `stitch ps --json` (the engine's records in each process),
//! `stitch agent status|patches --json` (the control socket), the agent's log, and the
//! server's view of the computer (`GET /api/v1/computers/{id}`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `stitch`, `stitch-server` and `stitchd`.
pub(crate) struct Bins {
    pub(crate) stitch: PathBuf,
    pub(crate) server: PathBuf,
    pub(crate) agent: PathBuf,
}

/// `$STITCH_BIN_DIR`, or the workspace's debug binaries (built here when needed).
pub(crate) fn binaries(root: &Path) -> Result<Bins, String> {
    let dir = match std::env::var_os("STITCH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = Command::new(cargo)
                .args([
                    "build",
                    "-q",
                    "-p",
                    "stitch-cli",
                    "-p",
                    "stitch-server",
                    "-p",
                    "stitch-agent",
                ])
                .current_dir(root)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(
                    "`cargo build -p stitch-cli -p stitch-server -p stitch-agent` failed".into(),
                );
            }
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), PathBuf::from)
                .join("debug")
        }
    };
    let bins = Bins {
        stitch: dir.join("stitch"),
        server: dir.join("stitch-server"),
        agent: dir.join("stitchd"),
    };
    for b in [&bins.stitch, &bins.server, &bins.agent] {
        if !b.exists() {
            return Err(format!("{} not found", b.display()));
        }
    }
    Ok(bins)
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Polls `f` every 100 ms until it returns something, or panics after `timeout`.
pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A server, an agent enrolled to it, and the vendor key the server and agent trust.
pub(crate) struct Fleet {
    dir: PathBuf,
    children: Vec<Child>,
    stitch: PathBuf,
    url: String,
    api_token: String,
    socket: PathBuf,
    /// The computer id the server gave the agent.
    pub(crate) computer: String,
    /// The throwaway vendor signing key (`stitch keygen`), and its public half.
    pub(crate) vendor_key: PathBuf,
    pub(crate) vendor_pub: PathBuf,
}

impl Fleet {
    /// Starts both in `dir` (a throwaway key is made first: the server must trust it at
    /// start); the hook also watches `hook_dirs`. Returns once the agent has enrolled and
    /// reported to the server.
    pub(crate) fn start(bins: &Bins, dir: &Path, hook_dirs: &[&Path]) -> Fleet {
        let dir = dir.join("fleet");
        std::fs::create_dir_all(dir.join("agent")).unwrap();
        let vendor_key = dir.join("vendor.key");
        let out = Command::new(&bins.stitch)
            .arg("keygen")
            .arg("--out")
            .arg(&vendor_key)
            .arg("--force")
            .output()
            .unwrap();
        assert!(out.status.success(), "stitch keygen: {out:?}");
        let vendor_pub = dir.join("vendor.key.pub");
        let mut fleet = Fleet {
            dir: dir.clone(),
            children: Vec::new(),
            stitch: bins.stitch.clone(),
            url: format!("http://127.0.0.1:{}", free_port()),
            api_token: String::new(),
            socket: dir.join("agent/stitchd.sock"),
            computer: String::new(),
            vendor_key,
            vendor_pub,
        };
        let server = Command::new(&bins.server)
            .arg("--listen")
            .arg(fleet.url.trim_start_matches("http://"))
            .arg("--data-dir")
            .arg(dir.join("server"))
            .arg("--trusted-keys")
            .arg(&fleet.vendor_pub)
            .args(["--bootstrap-org", "patches", "--bootstrap-out"])
            .arg(dir.join("creds.env"))
            .args(["--long-poll-s", "20", "--heartbeat-s", "5"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .expect("start stitch-server");
        fleet.children.push(server);
        let health = format!("{}/healthz", fleet.url);
        wait_for("stitch-server to listen", Duration::from_secs(30), || {
            http()
                .get(&health)
                .call()
                .ok()
                .filter(|r| r.status().is_success())
        });
        let creds: HashMap<String, String> = std::fs::read_to_string(dir.join("creds.env"))
            .expect("bootstrap credentials")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().into(), v.trim().trim_matches(['\'', '"']).into()))
            .collect();
        fleet.api_token = creds["STITCH_API_TOKEN"].clone();

        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        let config = format!(
            "server_url = \"{url}\"\n\
             enrollment_token = \"{enroll}\"\n\
             state_dir = {state}\n\
             socket_path = {socket}\n\
             trusted_keys_file = {keys}\n\
             [scan]\n\
             interval_s = 300\n\
             hits_interval_s = 1\n\
             [hook]\n\
             enabled = true\n\
             dirs = [{dirs}]\n\
             depth = 3\n\
             [sync]\n\
             long_poll_s = 20\n\
             heartbeat_s = 5\n",
            url = fleet.url,
            enroll = creds["STITCH_ENROLLMENT_TOKEN"],
            state = quoted(&dir.join("agent")),
            socket = quoted(&fleet.socket),
            keys = quoted(&fleet.vendor_pub),
            dirs = hook_dirs
                .iter()
                .map(|d| quoted(d))
                .collect::<Vec<_>>()
                .join(", "),
        );
        std::fs::write(dir.join("agent.toml"), config).unwrap();
        let agent = Command::new(&bins.agent)
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .expect("start stitchd");
        fleet.children.push(agent);
        let computer = wait_for(
            "stitchd to enroll and report",
            Duration::from_secs(30),
            || {
                let v = fleet.api("/api/v1/computers")?;
                let c = v["computers"].as_array()?.first()?.clone();
                c["last_seen"].as_i64().map(|_| c)
            },
        );
        fleet.computer = computer["id"].as_str().unwrap().to_string();
        println!(
            "fleet: stitch-server {} (SQLite in {}), stitchd enrolled as computer {}",
            fleet.url,
            dir.join("server").display(),
            fleet.computer
        );
        fleet
    }

    /// GET with the API token; `None` unless a JSON 2xx answer.
    pub(crate) fn api(&self, path: &str) -> Option<Value> {
        let mut r = http()
            .get(&format!("{}{path}", self.url))
            .header("Authorization", &format!("Bearer {}", self.api_token))
            .call()
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()
    }

    /// `stitch publish` of a signed bundle to the server's catalog.
    pub(crate) fn publish(&self, bundle: &Path) -> Instant {
        let out = Command::new(&self.stitch)
            .arg("publish")
            .arg("--server")
            .arg(&self.url)
            .arg("--token")
            .arg(&self.api_token)
            .arg(bundle)
            .output()
            .unwrap();
        assert!(out.status.success(), "stitch publish: {out:?}");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        Instant::now()
    }

    /// `stitch agent ACTION --json` through the agent's control socket.
    pub(crate) fn agent(&self, action: &str) -> Option<Value> {
        let text = output(
            Command::new(&self.stitch)
                .args(["agent", action, "--json", "--socket"])
                .arg(&self.socket),
        )?;
        serde_json::from_str(&text).ok()
    }

    /// The agent's row for `patch_id` in `stitch agent patches --json`.
    pub(crate) fn agent_patch(&self, patch_id: &str) -> Option<Value> {
        let v = self.agent("patches")?;
        let rows = v
            .as_array()
            .or_else(|| v["patches"].as_array())?
            .iter()
            .find(|p| p["patch_id"] == patch_id)?
            .clone();
        Some(rows)
    }

    /// Waits until the agent has installed and enabled `patch_id` and its load-time hook
    /// runs with at least one target file marked; returns the hook's state line.
    pub(crate) fn wait_installed(&self, patch_id: &str) -> String {
        wait_for(
            "the agent to install the patch and mark its target",
            Duration::from_secs(60),
            || {
                let p = self.agent_patch(patch_id)?;
                (p["enabled"] == true).then_some(())?;
                let status = self.agent("status")?;
                let hook = status["load_time_hook"].as_str()?.to_string();
                let marked: u32 = hook
                    .strip_prefix("active: ")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                (marked >= 1).then_some(hook)
            },
        )
    }

    /// The agent's JSON log lines (`--log-format json`, fields flattened) whose message is
    /// `message`.
    pub(crate) fn agent_log(&self, message: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("agent.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"] == message)
            .collect()
    }

    /// Waits for an event of `kind` (and `pred`) in the server's view of this computer.
    pub(crate) fn wait_server_event(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/api/v1/computers/{}", self.computer);
        wait_for(
            &format!("the server to receive a {kind} event"),
            Duration::from_secs(30),
            || {
                self.api(&path)?["events"]
                    .as_array()?
                    .iter()
                    .find(|e| e["kind"] == kind && pred(e))
                    .cloned()
            },
        )
    }
}

/// `stitch ps --json` row of `patch_id` applied in `pid`, if any.
pub(crate) fn applied(stitch: &Path, pid: u32, patch_id: &str) -> Option<Value> {
    let text = output(Command::new(stitch).args(["ps", "--json"]))?;
    let rows: Value = serde_json::from_str(&text).ok()?;
    rows.as_array()?
        .iter()
        .find(|r| r["pid"] == pid && r["patch"] == patch_id && r["state"] == "applied")
        .cloned()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for log in ["agent.log", "server.log"] {
                let path = self.dir.join(log);
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- last lines of {}:", path.display());
                for l in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

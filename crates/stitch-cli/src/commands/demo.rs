//! `stitch demo`: the whole system on this machine, in one command.
//!
//! 1. a fleet server (`stitch-server`, SQLite in a temporary directory) and an agent
//!    (`stitchd`) enrolled to it;
//! 2. a long-running service linked against a vulnerable library (examples/hello), and an
//!    exploit that abuses it (a 33-byte name makes anyone an administrator);
//! 3. the micropatch built with the system assembler, signed, and published to the server;
//! 4. the agent receives it and patches the *running* service within seconds;
//! 5. the same exploit is blocked and counted, ordinary requests still work, and the service's
//!    files on disk are byte-identical;
//! 6. the dashboard shows the computer, the patch and the blocked attempt.
//!
//! The server and agent are the sibling binaries of this `stitch` (`scripts/demo` builds
//! them). Every child is killed when the demo ends, however it ends.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rand_core::{OsRng, RngCore as _};
use stitch_format::{Bundle, SecretKey, TrustedKeys};
use stitch_sys::Pid;

const LIB_C: &str = include_str!("../../../../examples/hello/hello.c");
const SERVER_C: &str = include_str!("../../../../examples/hello/server.c");
const PATCH_TEMPLATE: &str = include_str!("../../../../examples/hello/patch.toml.in");
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "stitch-demo";

/// Children that die with the demo.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the stitch executable")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}; build it first: cargo build --release -p stitch-cli -p stitch-server -p stitch-agent (or run scripts/demo)",
            name,
            me.display()
        );
    }
    Ok(p)
}

fn free_addr(preferred: &str) -> String {
    if std::net::TcpListener::bind(preferred).is_ok() {
        return preferred.to_string();
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback");
    l.local_addr().expect("bound").to_string()
}

fn get_json(url: &str, token: &str) -> anyhow::Result<serde_json::Value> {
    let mut r = super::http_agent(Duration::from_secs(10))
        .get(url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("GET {url}"))?;
    let text = r.body_mut().read_to_string().unwrap_or_default();
    serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON"))
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {:?} waiting for {what}", timeout);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request to the service on a fresh connection.
fn ask(port: u16, name: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("service unreachable")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "{name}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let reply = line.trim().to_string();
    let shown: String = name.chars().take(36).collect();
    println!("    {shown:<38} -> {reply}");
    Ok(reply)
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    Ok(hex::encode(stitch_elf::sha256(&std::fs::read(p)?)))
}

fn gcc(args: &[&str], cwd: &Path) -> anyhow::Result<()> {
    let st = Command::new("gcc")
        .args(args)
        .current_dir(cwd)
        .status()
        .context("gcc is needed to compile the demo service (apt-get install gcc)")?;
    if !st.success() {
        bail!("gcc {} failed", args.join(" "));
    }
    Ok(())
}

/// The patch source for the compiled library: its identity and the bytes at copy_name.
fn patch_source(lib: &[u8]) -> anyhow::Result<String> {
    let elf = stitch_elf::ElfFile::parse(lib)?;
    let at = elf
        .symbol("copy_name")
        .context("copy_name not in libhello")?
        .vaddr;
    let original: Vec<u8> = stitch_x86::whole_instructions(elf.bytes_at(at, 32)?, at, 5)
        .into_iter()
        .flat_map(|l| l.bytes)
        .collect();
    Ok(PATCH_TEMPLATE
        .replace("@SHA256@", &hex::encode(stitch_elf::sha256(lib)))
        .replace(
            "@BUILD_ID@",
            &hex::encode(elf.build_id().context("no build-id")?),
        )
        .replace("@ORIGINAL@", &stitch_build::hex_spaced(&original)))
}

fn read_env_file(p: &Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    Ok(std::fs::read_to_string(p)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches('\'').trim_matches('"').to_string(),
            )
        })
        .collect())
}

pub(crate) fn run(exit: bool, listen: &str) -> anyhow::Result<()> {
    // SAFETY-free root check: geteuid through /proc (no libc call in this crate).
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        eprintln!(
            "stitch demo patches a running process: that needs root (ptrace of a process that is\n\
             not our child, /proc/PID/map_files, fanotify for load-time patching). Nothing was changed.\n\
             Run it as root:  sudo {} demo",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "stitch".into())
        );
        std::process::exit(2);
    }
    let server_bin = sibling("stitch-server")?;
    let agent_bin = sibling("stitchd")?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let dir = tempfile::Builder::new().prefix("stitch-demo.").tempdir()?;
    let result = run_in(dir.path(), exit, listen, &server_bin, &agent_bin, &stop);
    if result.is_err() {
        // Keep the evidence: the logs say why.
        let kept = dir.keep();
        for log in ["agent.log", "server.log"] {
            let text = std::fs::read_to_string(kept.join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("--- last lines of {}:", kept.join(log).display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    result
}

fn run_in(
    d: &Path,
    exit: bool,
    listen: &str,
    server_bin: &Path,
    agent_bin: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut children = Children::default();
    let t_start = Instant::now();

    // 1. Server and agent.
    step(
        1,
        "start the fleet server (SQLite in a temporary directory) and an agent enrolled to it",
    );
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let vendor = SecretKey::from_seed(seed);
    std::fs::write(
        d.join("vendor.pub"),
        format!("{}\n", vendor.public().to_line()),
    )?;
    let addr = free_addr(listen);
    let url = format!("http://{addr}");
    let server = Command::new(server_bin)
        .args(["--listen", &addr, "--data-dir"])
        .arg(d.join("server"))
        .arg("--trusted-keys")
        .arg(d.join("vendor.pub"))
        .args([
            "--bootstrap-org",
            "demo",
            "--bootstrap-admin",
            &format!("{ADMIN_USER}:{ADMIN_PASSWORD}"),
        ])
        .arg("--bootstrap-out")
        .arg(d.join("creds.env"))
        .args(["--long-poll-s", "20", "--heartbeat-s", "5"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("server.log"))?)
        .spawn()
        .context("starting stitch-server")?;
    children.0.push(("stitch-server".into(), server));
    wait_for("the server", Duration::from_secs(20), || {
        super::http_agent(Duration::from_secs(10))
            .get(&format!("{url}/healthz"))
            .call()
            .ok()
            .filter(|r| r.status().is_success())
    })?;
    let creds = read_env_file(&d.join("creds.env"))?;
    let enroll = creds
        .get("STITCH_ENROLLMENT_TOKEN")
        .context("no enrollment token")?
        .clone();
    let api = creds
        .get("STITCH_API_TOKEN")
        .context("no API token")?
        .clone();
    println!(
        "    server   {url}  (dashboard, API; log {})",
        d.join("server.log").display()
    );

    let agent_dir = d.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let config = format!(
        r#"server_url = "{url}"
enrollment_token = "{enroll}"
state_dir = "{state}"
socket_path = "{state}/stitchd.sock"
trusted_keys_file = "{keys}"
[scan]
interval_s = 5
hits_interval_s = 1
[sync]
long_poll_s = 20
heartbeat_s = 5
"#,
        state = agent_dir.display(),
        keys = d.join("vendor.pub").display()
    );
    std::fs::write(d.join("agent.toml"), config)?;
    let agent = Command::new(agent_bin)
        .arg("--config")
        .arg(d.join("agent.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("agent.log"))?)
        .spawn()
        .context("starting stitchd")?;
    children.0.push(("stitchd".into(), agent));
    let computer = wait_for(
        "the agent to enroll and report",
        Duration::from_secs(30),
        || {
            let v = get_json(&format!("{url}/api/v1/computers"), &api).ok()?;
            let c = v["computers"].as_array()?.first()?.clone();
            c["last_seen"].as_i64().map(|_| c)
        },
    )?;
    let computer_id = computer["id"].as_str().unwrap_or_default().to_string();
    println!(
        "    agent    enrolled as {} ({}, {}), log {}",
        computer["hostname"].as_str().unwrap_or("?"),
        computer["os_name"].as_str().unwrap_or("?"),
        computer_id,
        d.join("agent.log").display()
    );

    // 2. The vulnerable service.
    step(
        2,
        "start a vulnerable service: hello-server, linked against libhello (copy_name trusts the caller's length)",
    );
    std::fs::write(d.join("hello.c"), LIB_C)?;
    std::fs::write(d.join("server.c"), SERVER_C)?;
    gcc(
        &[
            "-O2",
            "-fcf-protection=none",
            "-shared",
            "-fPIC",
            "-Wl,--build-id=sha1",
            "-Wl,-soname,libhello.so.1",
            "-o",
            "libhello.so.1",
            "hello.c",
        ],
        d,
    )?;
    gcc(
        &[
            "-O2",
            "-Wl,--build-id=sha1",
            "-Wl,-rpath,$ORIGIN",
            "-o",
            "hello-server",
            "server.c",
            "./libhello.so.1",
        ],
        d,
    )?;
    let hashes_before = (
        sha256_file(&d.join("libhello.so.1"))?,
        sha256_file(&d.join("hello-server"))?,
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let svc = Command::new(d.join("hello-server"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting hello-server")?;
    let svc_pid = Pid(svc.id() as i32);
    children.0.push(("hello-server".into(), svc));
    wait_for("the service", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    println!("    hello-server pid {svc_pid} on 127.0.0.1:{port}");
    ask(port, "alice")?;

    step(
        3,
        "exploit it: a 33-byte name overflows into the session's is_admin flag",
    );
    let exploit = format!("{}!", "A".repeat(32));
    let abused = ask(port, &exploit)?;
    if !abused.contains("administrator") {
        bail!("the exploit did not work against the unpatched service: {abused}");
    }
    println!("    => anyone can become administrator");

    // 3. Build, sign, publish.
    step(
        4,
        "write the micropatch, build it with the system assembler, sign it, publish it",
    );
    let lib = std::fs::read(d.join("libhello.so.1"))?;
    let source = patch_source(&lib)?;
    std::fs::write(d.join("patch.toml"), &source)?;
    let mut bundle = stitch_build::build(&source, d, &lib, &stitch_build::Assembler::default())
        .context("building the demo patch")?;
    bundle.sign(&vendor)?;
    let mut trusted = TrustedKeys::new();
    trusted.insert(vendor.public());
    let verified = Bundle::decode_verified(&bundle.encode(), &trusted)?;
    let p = verified.patch();
    println!(
        "    {} r{}: {} ({} patchlet, signed by {})",
        p.id,
        p.revision,
        p.title,
        p.patchlets.len(),
        verified.signed_by()[0]
    );
    let t_publish = Instant::now();
    super::publish::upload(&bundle.encode(), &url, &api, None)?;
    println!("    published to {url}");

    // 4. The agent applies it to the running service.
    step(
        5,
        "the agent receives the patch and applies it to the running service",
    );
    let engine = stitch_engine::Engine::new();
    let applied = wait_for(
        "the agent to apply the patch",
        Duration::from_secs(60),
        || {
            engine.list(svc_pid).ok()?.into_iter().find(|a| {
                a.record.id == p.id && a.record.state == stitch_engine::region::RecordState::Applied
            })
        },
    )?;
    println!(
        "    applied in pid {svc_pid} {:.1} s after publishing (region {:#x}, site {:#x})",
        t_publish.elapsed().as_secs_f64(),
        applied.region,
        applied.record.sites.first().map_or(0, |s| s.addr)
    );

    step(
        6,
        "the same service, still running: ordinary requests work, the exploit is blocked",
    );
    ask(port, "alice")?;
    let blocked = ask(port, &exploit)?;
    ask(port, "bob")?;
    if !blocked.starts_with("rejected") {
        bail!("the exploit was not blocked: {blocked}");
    }
    let hits = engine
        .list(svc_pid)?
        .into_iter()
        .find(|a| a.record.id == p.id)
        .map_or(0, |a| a.record.hits);
    println!("    exploit attempts counted in the process: {hits}");
    let hashes_after = (
        sha256_file(&d.join("libhello.so.1"))?,
        sha256_file(&d.join("hello-server"))?,
    );
    println!(
        "    libhello.so.1 sha256 {}  {}",
        hashes_after.0,
        if hashes_after.0 == hashes_before.0 {
            "unchanged"
        } else {
            "CHANGED"
        }
    );
    println!(
        "    hello-server  sha256 {}  {}",
        hashes_after.1,
        if hashes_after.1 == hashes_before.1 {
            "unchanged"
        } else {
            "CHANGED"
        }
    );
    if hashes_after != hashes_before {
        bail!("a file on disk changed");
    }

    step(
        7,
        "the server sees it: the computer, the patch applied, the blocked attempt",
    );
    let seen = wait_for(
        "the agent to report the blocked attempt",
        Duration::from_secs(30),
        || {
            let v = get_json(&format!("{url}/api/v1/computers/{computer_id}"), &api).ok()?;
            let ev = v["events"]
                .as_array()?
                .iter()
                .find(|e| e["kind"] == "exploit_blocked")?
                .clone();
            Some(ev)
        },
    );
    match seen {
        Ok(ev) => println!("    event exploit_blocked: {}", ev["data"]),
        Err(e) => println!("    (not reported yet: {e})"),
    }
    println!(
        "\n    Dashboard: {url}/   log in as {ADMIN_USER} / {ADMIN_PASSWORD}\n    Computer:  {url}/computers/{computer_id}\n    Work dir:  {} (removed when the demo ends)\n    Total demo time {:.1} s",
        d.display(),
        t_start.elapsed().as_secs_f64()
    );
    if exit {
        return Ok(());
    }
    println!("\nThe server, the agent and the service keep running. Press Ctrl-C to stop them.");
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping");
    Ok(())
}

//! The patch library (`patches/<CVE>/`), each patch against the real, unmodified package it
//! targets, applied through the real system: install the exact version from PyPI, show the
//! vulnerable behaviour on a live long-running service, build the patch and sign it with a
//! throwaway vendor key, publish it to a real `stitch-server` that trusts that key, and let
//! a real `stitchd` enrolled to that server apply it (see `fleet.rs`); then show the
//! vulnerable behaviour gone, ordinary requests still answered, and the file on disk
//! unchanged.
//!
//! - live: CVE-2024-28219 and CVE-2026-44660 — the service is already running when the
//!   patch is published; the agent patches it in memory;
//! - load time: CVE-2025-48379 — the patch is published and installed first (the agent's
//!   hook marks the target file), then a new service starts and its `import` of the module
//!   is patched before the module runs; CVE-2024-28219 ends the same way (a service started
//!   after its live phase is patched at load time).
//!
//! Needs root (ptrace, fanotify), CPython 3.11 with pip, and the PyPI index. Without them
//! each test skips with a printed reason, except with `CI=true`, where it fails.

mod fleet;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleet::{Bins, Fleet};
use serde_json::Value;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------
// Prerequisites

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skip with a printed reason, or fail in CI.
fn skip<T>(reason: &str) -> Option<T> {
    assert!(!in_ci(), "CI=true but this test cannot run: {reason}");
    eprintln!("SKIP: {reason}");
    None
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

struct Env {
    bins: Bins,
    python: String,
    root: PathBuf,
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

fn prerequisites() -> Option<Env> {
    if !is_root() {
        return skip(
            "the agent patches other processes (ptrace) and holds loads (fanotify); run as root",
        );
    }
    let Some(python) = stitch_testkit::cpython_311_with_pip() else {
        return skip("CPython 3.11 with pip not found (apt-get install python3.11 python3-pip)");
    };
    let root = repo_root();
    let bins = match fleet::binaries(&root) {
        Ok(bins) => bins,
        Err(reason) => return skip(&reason),
    };
    Some(Env { bins, python, root })
}

/// `pip install --target` of one exact version, binary wheels only (byte-identical).
fn pip_install(env: &Env, spec: &str, dir: &Path) -> Option<()> {
    match stitch_testkit::pip_install_exact(&env.python, spec, dir) {
        Ok(()) => Some(()),
        Err(why) => skip(&why),
    }
}

// ---------------------------------------------------------------------------------------
// Files and the patch

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read target")))
}

/// The `sha256 = "..."` pinned in patch.toml.
fn pinned_sha256(patch_toml: &Path) -> String {
    let text = std::fs::read_to_string(patch_toml).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("sha256"))
        .expect("sha256 in patch.toml");
    line.split('"').nth(1).unwrap().to_string()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `stitch build` against the installed file, then sign with the fleet's throwaway vendor
/// key (the one the server and the agent trust) and verify.
fn build_and_sign(env: &Env, fleet: &Fleet, cve: &str, target: &Path, work: &Path) -> PathBuf {
    let dir = env.root.join("patches").join(cve);
    let bundle = work.join(format!("{cve}.stitch"));
    let stitch = &env.bins.stitch;
    print!(
        "{}",
        run(Command::new(stitch)
            .arg("build")
            .arg(dir.join("patch.toml"))
            .arg("--target")
            .arg(target)
            .arg("-o")
            .arg(&bundle))
    );
    print!(
        "{}",
        run(Command::new(stitch)
            .arg("sign")
            .arg(&bundle)
            .arg("--key")
            .arg(&fleet.vendor_key))
    );
    print!(
        "{}",
        run(Command::new(stitch)
            .arg("verify")
            .arg(&bundle)
            .arg("--trusted-keys")
            .arg(&fleet.vendor_pub))
    );
    bundle
}

/// Live: publish while `pid` runs, and wait until the agent has patched it (the engine's
/// record `applied` in that process, as `stitch ps --json` reads it).
fn publish_and_wait_live(env: &Env, fleet: &Fleet, bundle: &Path, pid: u32, patch_id: &str) {
    let published = fleet.publish(bundle);
    let row = fleet::wait_for(
        "the agent to apply the patch to the running service",
        Duration::from_secs(60),
        || fleet::applied(&env.bins.stitch, pid, patch_id),
    );
    println!(
        "  stitchd applied {patch_id} live in pid {pid} {:.1} s after publishing (stitch ps: {row})",
        published.elapsed().as_secs_f64()
    );
    let ev = fleet.wait_server_event("patch_applied", |e| {
        e["data"]["patch_id"] == patch_id && e["data"]["processes"].as_i64() >= Some(1)
    });
    println!(
        "  server: computer {} event patch_applied {}",
        fleet.computer, ev["data"]
    );
}

/// Blocked attempts counted by `patch_id` in `pid` (from `stitch ps --json`).
fn hits(env: &Env, pid: u32, patch_id: &str) -> u64 {
    fleet::applied(&env.bins.stitch, pid, patch_id)
        .unwrap_or_else(|| panic!("{patch_id} is not applied in {pid}"))["hits"]
        .as_u64()
        .unwrap()
}

/// The agent reported the blocked attempts in `pid` to the server.
fn server_saw_blocked(fleet: &Fleet, pid: u32, patch_id: &str) {
    let ev = fleet.wait_server_event("exploit_blocked", |e| {
        e["data"]["pid"] == pid && e["data"]["patch_id"] == patch_id
    });
    println!(
        "  server: computer {} event exploit_blocked {}",
        fleet.computer, ev["data"]
    );
}

/// Load time: starts a service after the agent installed `patch_id` (its hook marking
/// `target`), and shows it patched before any request: the engine's record is in the new
/// process (0 hits) as soon as it prints `listening` — its imports, which dlopen `target`,
/// are done by then — and the agent logged `patched at load time` for that pid and file.
fn start_after_install(
    env: &Env,
    fleet: &Fleet,
    cve: &str,
    site: &Path,
    patch_id: &str,
    target: &Path,
) -> Service {
    let service = Service::start(env, cve, site);
    let pid = service.pid();
    let row = fleet::applied(&env.bins.stitch, pid, patch_id)
        .expect("the new service was not patched by the time it listened");
    println!("  right after start, before any request (stitch ps): {row}");
    assert_eq!(row["hits"], 0);
    let loaded = fleet::wait_for(
        "the agent log to show the load-time patch",
        Duration::from_secs(10),
        || {
            fleet
                .agent_log("patched at load time")
                .into_iter()
                .find(|f| f["pid"] == pid && f["patch_id"] == patch_id)
        },
    );
    println!("  agent log: patched at load time {loaded}");
    assert_eq!(
        loaded["module"].as_str().map(Path::new),
        Some(target),
        "{loaded}"
    );
    service
}

// ---------------------------------------------------------------------------------------
// The live service and its requests

/// `patches/<CVE>/service.py PORT`, with the installed package on PYTHONPATH.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start(env: &Env, cve: &str, site_packages: &Path) -> Service {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(&env.python)
            .arg("-u")
            .arg(env.root.join("patches").join(cve).join("service.py"))
            .arg(port.to_string())
            .env("PYTHONPATH", site_packages)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start service");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening", "service did not start");
        println!("service pid {} listening on 127.0.0.1:{port}", child.id());
        Service { child, port }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One request; `None` when the connection closed without a reply (the process died).
    fn ask(&self, request: &str) -> Option<Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(request.as_bytes()).ok()?;
        s.write_all(b"\n").ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        let reply = reply.trim();
        (!reply.is_empty()).then(|| serde_json::from_str(reply).expect("JSON reply"))
    }

    fn exited(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request line from `patches/<CVE>/trigger.py KIND` (`normal` or `exploit`).
fn request(env: &Env, cve: &str, kind: &str) -> String {
    let trigger = env.root.join("patches").join(cve).join("trigger.py");
    run(Command::new(&env.python).arg(trigger).arg(kind))
        .trim()
        .to_string()
}

fn show(what: &str, reply: &Option<Value>) {
    match reply {
        Some(v) => println!("  {what:<28} -> {v}"),
        None => println!("  {what:<28} -> (connection closed, no reply)"),
    }
}

// ---------------------------------------------------------------------------------------
// The patches

/// Pillow 10.2.0 `_imagingcms`: strcpy of a mode string into an 8-byte field.
/// Vulnerable: one request with a 23-character output mode kills the service (SIGSEGV).
/// Patched live through the agent (published while the service runs): the same request is
/// rejected by the service's own mode check and counted; ordinary conversions still answer.
/// A service started afterwards is patched at load time and rejects its first exploit.
#[test]
fn cve_2024_28219_pillow_imagingcms_mode_overflow() {
    const CVE: &str = "CVE-2024-28219";
    const PATCH: &str = "ST-2026-0101";
    let Some(env) = prerequisites() else { return };
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site-packages");
    if pip_install(&env, "pillow==10.2.0", &site).is_none() {
        return;
    }
    let target = site.join("PIL/_imagingcms.cpython-311-x86_64-linux-gnu.so");
    let before = sha256_file(&target);
    assert_eq!(
        before,
        pinned_sha256(&env.root.join("patches").join(CVE).join("patch.toml")),
        "not the pinned build"
    );
    let (normal, exploit) = (request(&env, CVE, "normal"), request(&env, CVE, "exploit"));
    let fleet = Fleet::start(&env.bins, work.path(), &[&site]);

    println!("== unpatched service: an ordinary conversion, then the exploit");
    let mut victim = Service::start(&env, CVE, &site);
    let reply = victim.ask(&normal);
    show("normal (L -> L)", &reply);
    assert_eq!(reply.unwrap()["pixel"], 77);
    let reply = victim.ask(&exploit);
    show("exploit (23-char mode)", &reply);
    let status = victim
        .exited(Duration::from_secs(10))
        .expect("the unpatched service survived the exploit");
    println!("  unpatched service died: {status:?}");
    assert_eq!(
        status.signal(),
        Some(11),
        "expected SIGSEGV, got {status:?}"
    );

    println!("== a running service; the patch is published to the server while it runs");
    let bundle = build_and_sign(&env, &fleet, CVE, &target, work.path());
    let mut service = Service::start(&env, CVE, &site);
    show("normal, before the patch", &service.ask(&normal));
    publish_and_wait_live(&env, &fleet, &bundle, service.pid(), PATCH);
    for _ in 0..2 {
        let reply = service.ask(&exploit);
        show("exploit, patched", &reply);
        let reply = reply.expect("the patched service must answer the exploit");
        assert_eq!(reply["ok"], false);
        assert!(
            reply["error"]
                .as_str()
                .unwrap()
                .contains("unsupported output mode"),
            "{reply}"
        );
    }
    let reply = service.ask(&normal);
    show("normal, patched", &reply);
    assert_eq!(reply.unwrap()["pixel"], 77);
    assert!(
        service.exited(Duration::from_millis(200)).is_none(),
        "patched service died"
    );
    let hits = hits(&env, service.pid(), PATCH);
    println!("  blocked attempts counted: {hits}");
    assert_eq!(hits, 2);
    server_saw_blocked(&fleet, service.pid(), PATCH);

    println!("== and a service started now, with the patch installed, is patched at load time");
    let mut late = start_after_install(&env, &fleet, CVE, &site, PATCH, &target);
    let reply = late.ask(&exploit);
    show("exploit, first request", &reply);
    assert_eq!(reply.expect("the late service must answer")["ok"], false);
    assert!(late.exited(Duration::from_millis(200)).is_none());
    let late_hits = crate::hits(&env, late.pid(), PATCH);
    println!(
        "  blocked attempts counted in pid {}: {late_hits}",
        late.pid()
    );
    assert_eq!(late_hits, 1);

    let after = sha256_file(&target);
    println!(
        "== {} sha256 {after} (unchanged)",
        target.file_name().unwrap().to_string_lossy()
    );
    assert_eq!(before, after);
}

/// ujson 5.12.0 `dump()`: the encoded string leaks whenever the file's write() raises.
/// Vulnerable: each failing 4 MiB export grows the service by ~4 MiB. Patched live through
/// the agent (the same process, published while it runs): the same requests no longer grow
/// it; ordinary exports still work.
#[test]
fn cve_2026_44660_ujson_dump_leaks_payload_on_write_error() {
    const CVE: &str = "CVE-2026-44660";
    const PATCH: &str = "ST-2026-0102";
    const MIB: i64 = 1024; // rss is in KiB
    let Some(env) = prerequisites() else { return };
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site-packages");
    if pip_install(&env, "ujson==5.12.0", &site).is_none() {
        return;
    }
    let target = site.join("ujson.cpython-311-x86_64-linux-gnu.so");
    let before = sha256_file(&target);
    assert_eq!(
        before,
        pinned_sha256(&env.root.join("patches").join(CVE).join("patch.toml")),
        "not the pinned build"
    );
    let (normal, exploit) = (request(&env, CVE, "normal"), request(&env, CVE, "exploit"));
    let fleet = Fleet::start(&env.bins, work.path(), &[&site]);
    let bundle = build_and_sign(&env, &fleet, CVE, &target, work.path());

    let mut service = Service::start(&env, CVE, &site);
    let rss = |reply: &Option<Value>| {
        reply.as_ref().expect("service answered")["rss_kib"]
            .as_i64()
            .unwrap()
    };
    // Growth of the service over three failing exports, after one to warm the allocator.
    let growth = |label: &str| {
        let first = service.ask(&exploit);
        show(label, &first);
        let mut last = first.clone();
        for _ in 0..3 {
            last = service.ask(&exploit);
            show(label, &last);
            assert_eq!(last.as_ref().unwrap()["ok"], false);
        }
        rss(&last) - rss(&first)
    };

    println!("== unpatched: ordinary export, then failing 4 MiB exports");
    let reply = service.ask(&normal);
    show("normal export", &reply);
    assert_eq!(reply.unwrap()["ok"], true);
    let leaked = growth("failing export, unpatched");
    println!("  grew by {leaked} KiB over 3 failing exports");
    assert!(
        leaked >= 3 * 3 * MIB,
        "expected the 4 MiB payloads to leak, grew {leaked} KiB"
    );

    println!("== the same process; the patch is published to the server while it runs");
    publish_and_wait_live(&env, &fleet, &bundle, service.pid(), PATCH);
    let grown = growth("failing export, patched");
    println!("  grew by {grown} KiB over 3 failing exports");
    assert!(
        grown < MIB,
        "still leaking after the patch: grew {grown} KiB"
    );
    let reply = service.ask(&normal);
    show("normal export, patched", &reply);
    assert_eq!(reply.unwrap()["bytes"], 12291);
    assert!(service.exited(Duration::from_millis(200)).is_none());
    let hits = hits(&env, service.pid(), PATCH);
    println!("  leaks prevented (hits): {hits}");
    assert_eq!(hits, 4);
    server_saw_blocked(&fleet, service.pid(), PATCH);

    let after = sha256_file(&target);
    println!(
        "== {} sha256 {after} (unchanged)",
        target.file_name().unwrap().to_string_lossy()
    );
    assert_eq!(before, after);
}

/// Pillow 11.2.1 BCn (DDS) encoder: blocks are written past the 64 KiB encoder buffer.
/// Vulnerable: a 1024x1024 DXT5 texture (1 MiB encoded) kills the service (SIGSEGV).
/// Patched at load time: the patch is published and installed by the agent first (its hook
/// marks the `.so`), then a new service starts; its `import` of `PIL._imaging` is patched
/// before any request, and the first exploit request is answered with the correct 1 MiB
/// file, encoded in buffer-sized chunks (one counted stop per chunk); small textures are
/// unchanged.
#[test]
fn cve_2025_48379_pillow_bcn_encoder_buffer_overflow() {
    const CVE: &str = "CVE-2025-48379";
    const PATCH: &str = "ST-2026-0103";
    let Some(env) = prerequisites() else { return };
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site-packages");
    if pip_install(&env, "pillow==11.2.1", &site).is_none() {
        return;
    }
    let target = site.join("PIL/_imaging.cpython-311-x86_64-linux-gnu.so");
    let before = sha256_file(&target);
    assert_eq!(
        before,
        pinned_sha256(&env.root.join("patches").join(CVE).join("patch.toml")),
        "not the pinned build"
    );
    let (normal, exploit) = (request(&env, CVE, "normal"), request(&env, CVE, "exploit"));
    let expected_pixel = serde_json::json!([8, 20, 24, 255]); // (10, 20, 30) in RGB565
    let fleet = Fleet::start(&env.bins, work.path(), &[&site]);

    println!("== unpatched service: a small texture, then a 1024x1024 DXT5 one");
    let mut victim = Service::start(&env, CVE, &site);
    let reply = victim.ask(&normal);
    show("normal (64x64)", &reply);
    assert_eq!(reply.unwrap()["bytes"], 4224);
    let reply = victim.ask(&exploit);
    show("exploit (1024x1024)", &reply);
    let status = victim
        .exited(Duration::from_secs(10))
        .expect("the unpatched service survived the exploit");
    println!("  unpatched service died: {status:?}");
    assert!(
        status.signal().is_some(),
        "expected a crash, got {status:?}"
    );

    println!("== the patch is published and installed before the service starts");
    let bundle = build_and_sign(&env, &fleet, CVE, &target, work.path());
    let published = fleet.publish(&bundle);
    let hook = fleet.wait_installed(PATCH);
    println!(
        "  stitchd installed {PATCH} {:.1} s after publishing; load-time hook: {hook}",
        published.elapsed().as_secs_f64()
    );
    let marks: Vec<Value> = fleet
        .agent_log("load-time hook started")
        .into_iter()
        .filter(|f| f["marked"].as_u64() >= Some(1))
        .collect();
    println!(
        "  agent log: load-time hook started {}",
        marks.last().expect("hook started")
    );
    let agent_row = fleet.agent_patch(PATCH).unwrap();
    assert_eq!(
        agent_row["processes"],
        serde_json::json!([]),
        "no process maps it yet"
    );

    println!("== a new service, started after the patch was installed");
    let mut service = start_after_install(&env, &fleet, CVE, &site, PATCH, &target);
    let pid = service.pid();

    let reply = service.ask(&exploit);
    show("exploit, first request", &reply);
    let reply = reply.expect("the patched service must answer");
    assert_eq!(reply["bytes"], 1024 * 1024 + 128, "{reply}");
    assert_eq!(reply["pixel"], expected_pixel);
    let reply = service.ask(&normal);
    show("normal, patched", &reply);
    let reply = reply.unwrap();
    assert_eq!(
        (reply["bytes"].clone(), reply["pixel"].clone()),
        (serde_json::json!(4224), expected_pixel)
    );
    assert!(
        service.exited(Duration::from_millis(200)).is_none(),
        "patched service died"
    );
    let hits = hits(&env, pid, PATCH);
    println!("  buffer-end stops counted: {hits}");
    assert_eq!(hits, 16, "1 MiB in 64 KiB buffers");

    // What the agent reported: the process applied at load time, and the blocked attempts.
    let ev = fleet.wait_server_event("patch_applied", |e| {
        e["data"]["patch_id"] == PATCH && e["data"]["processes"].as_i64() >= Some(1)
    });
    println!(
        "  server: computer {} event patch_applied {}",
        fleet.computer, ev["data"]
    );
    server_saw_blocked(&fleet, pid, PATCH);

    let after = sha256_file(&target);
    println!(
        "== {} sha256 {after} (unchanged)",
        target.file_name().unwrap().to_string_lossy()
    );
    assert_eq!(before, after);
}

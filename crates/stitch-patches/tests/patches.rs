//! The patch library (`patches/<CVE>/`), each patch against the real, unmodified package it
//! targets: install the exact version from PyPI, show the vulnerable behaviour on a live
//! long-running service, build and sign the patch (throwaway key), apply it, show the
//! vulnerable behaviour gone and ordinary requests still answered, and the file on disk
//! unchanged.
//!
//! Needs root (ptrace), CPython 3.11 with pip, and the PyPI index. Without them each test
//! skips with a printed reason, except with `CI=true`, where it fails.
//!
//! Applying goes through one function, [`apply_live`]: today `stitch apply --pid`; when
//! the agent lands, that function publishes the bundle to the agent instead and waits
//! for `stitch ps` to show the patch applied — the tests themselves do not change.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
    stitch: PathBuf,
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

/// The wheels are cp311: find a CPython 3.11 with pip.
fn find_python() -> Option<String> {
    let candidates = [
        std::env::var("STITCH_PYTHON").unwrap_or_default(),
        "python3.11".into(),
        "python3".into(),
    ];
    candidates.into_iter().filter(|c| !c.is_empty()).find(|c| {
        Command::new(c)
            .args([
                "-c",
                "import sys, pip; assert sys.version_info[:2] == (3, 11)",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn stitch_binary(root: &Path) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("STITCH_BIN") {
        return Some(bin.into());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "-q", "-p", "stitch-cli"])
        .current_dir(root)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return skip("`cargo build -p stitch-cli` failed");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Some(target.join("debug/stitch"))
}

fn prerequisites() -> Option<Env> {
    if !is_root() {
        return skip("patching another process needs root (ptrace); run as root");
    }
    let Some(python) = find_python() else {
        return skip("CPython 3.11 with pip not found (apt-get install python3.11 python3-pip)");
    };
    let root = repo_root();
    let stitch = stitch_binary(&root)?;
    Some(Env {
        stitch,
        python,
        root,
    })
}

/// `pip install --target` of one exact version, binary wheels only (byte-identical).
fn pip_install(env: &Env, spec: &str, dir: &Path) -> Option<()> {
    let out = Command::new(&env.python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(dir)
        .arg(spec)
        .output()
        .expect("run pip");
    if !out.status.success() {
        return skip(&format!(
            "pip install {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Some(())
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

struct Signed {
    bundle: PathBuf,
    public_key: PathBuf,
}

/// `stitch build` against the installed file, then sign with a throwaway key made here.
fn build_and_sign(env: &Env, cve: &str, target: &Path, work: &Path) -> Signed {
    let dir = env.root.join("patches").join(cve);
    let bundle = work.join(format!("{cve}.stitch"));
    let key = work.join("throwaway.key");
    print!(
        "{}",
        run(Command::new(&env.stitch)
            .arg("build")
            .arg(dir.join("patch.toml"))
            .arg("--target")
            .arg(target)
            .arg("-o")
            .arg(&bundle))
    );
    run(Command::new(&env.stitch)
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .arg("--force"));
    print!(
        "{}",
        run(Command::new(&env.stitch)
            .arg("sign")
            .arg(&bundle)
            .arg("--key")
            .arg(&key))
    );
    let public_key = work.join("throwaway.key.pub");
    print!(
        "{}",
        run(Command::new(&env.stitch)
            .arg("verify")
            .arg(&bundle)
            .arg("--trusted-keys")
            .arg(&public_key))
    );
    Signed { bundle, public_key }
}

/// The one place a patch reaches a process. Today: `stitch apply --pid`, live.
/// Through the agent: hand `patch.bundle` to stitchd (trusting `patch.public_key`) and
/// poll `stitch ps --json` until `pid` shows the patch `applied`.
fn apply_live(env: &Env, patch: &Signed, pid: u32) {
    print!(
        "{}",
        run(Command::new(&env.stitch)
            .arg("apply")
            .arg("--pid")
            .arg(pid.to_string())
            .arg(&patch.bundle)
            .arg("--trusted-keys")
            .arg(&patch.public_key))
    );
}

/// Blocked attempts counted by `patch_id` in `pid` (from `stitch ps --json`).
fn hits(env: &Env, pid: u32, patch_id: &str) -> u64 {
    let out = Command::new(&env.stitch)
        .args(["ps", "--json"])
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout).expect("stitch ps --json");
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == pid && r["patch"] == patch_id && r["state"] == "applied")
        .unwrap_or_else(|| panic!("{patch_id} is not applied in {pid}: {rows}"))["hits"]
        .as_u64()
        .unwrap()
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
/// Patched (live): the same request is rejected by the service's own mode check and
/// counted; ordinary conversions still answer.
#[test]
fn cve_2024_28219_pillow_imagingcms_mode_overflow() {
    const CVE: &str = "CVE-2024-28219";
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

    println!("== a running service, patched live");
    let patch = build_and_sign(&env, CVE, &target, work.path());
    let mut service = Service::start(&env, CVE, &site);
    show("normal, before the patch", &service.ask(&normal));
    apply_live(&env, &patch, service.pid());
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
    let hits = hits(&env, service.pid(), "ST-2026-0101");
    println!("  blocked attempts counted: {hits}");
    assert_eq!(hits, 2);

    let after = sha256_file(&target);
    println!(
        "== {} sha256 {after} (unchanged)",
        target.file_name().unwrap().to_string_lossy()
    );
    assert_eq!(before, after);
}

/// ujson 5.12.0 `dump()`: the encoded string leaks whenever the file's write() raises.
/// Vulnerable: each failing 4 MiB export grows the service by ~4 MiB. Patched live (the
/// same process): the same requests no longer grow it; ordinary exports still work.
#[test]
fn cve_2026_44660_ujson_dump_leaks_payload_on_write_error() {
    const CVE: &str = "CVE-2026-44660";
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
    let patch = build_and_sign(&env, CVE, &target, work.path());

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

    println!("== the same process, patched live");
    apply_live(&env, &patch, service.pid());
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
    let hits = hits(&env, service.pid(), "ST-2026-0102");
    println!("  leaks prevented (hits): {hits}");
    assert_eq!(hits, 4);

    let after = sha256_file(&target);
    println!(
        "== {} sha256 {after} (unchanged)",
        target.file_name().unwrap().to_string_lossy()
    );
    assert_eq!(before, after);
}

/// Pillow 11.2.1 BCn (DDS) encoder: blocks are written past the 64 KiB encoder buffer.
/// Vulnerable: a 1024x1024 DXT5 texture (1 MiB encoded) kills the service (SIGSEGV).
/// Patched (live): the same request is answered with the correct 1 MiB file, encoded
/// in buffer-sized chunks (one counted stop per chunk); small textures are unchanged.
#[test]
fn cve_2025_48379_pillow_bcn_encoder_buffer_overflow() {
    const CVE: &str = "CVE-2025-48379";
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

    println!("== a running service, patched live");
    let patch = build_and_sign(&env, CVE, &target, work.path());
    let mut service = Service::start(&env, CVE, &site);
    show("normal, before the patch", &service.ask(&normal));
    apply_live(&env, &patch, service.pid());
    let reply = service.ask(&exploit);
    show("exploit, patched", &reply);
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
    let hits = hits(&env, service.pid(), "ST-2026-0103");
    println!("  buffer-end stops counted: {hits}");
    assert_eq!(hits, 16, "1 MiB in 64 KiB buffers");

    let after = sha256_file(&target);
    println!(
        "== {} sha256 {after} (unchanged)",
        target.file_name().unwrap().to_string_lossy()
    );
    assert_eq!(before, after);
}

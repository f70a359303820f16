//! The `stitch` binary end to end: build -> keygen -> sign -> verify -> inspect, on a real
//! shared library compiled here, plus the rejections a user sees on the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use proptest::prelude::*;

const LIB_C: &str = r#"
int check_len(int n) {
    int r = n + 1;
    if (n > 1000) r = -1;
    return r;
}
"#;

fn stitch(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stitch"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stitch failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "stitch should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(code: &str, displaced: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("demo.c"), LIB_C).unwrap();
        let st = Command::new("gcc")
            .args([
                "-O0",
                "-fcf-protection=none",
                "-shared",
                "-fPIC",
                "-Wl,--build-id=sha1",
            ])
            .args(["-o", "libdemo.so.1", "demo.c"])
            .current_dir(d)
            .status()
            .expect("gcc is required");
        assert!(st.success());
        let bytes = std::fs::read(d.join("libdemo.so.1")).unwrap();
        let elf = stitch_elf::ElfFile::parse(&bytes).unwrap();
        let at = elf.symbol("check_len").unwrap().vaddr;
        let code_bytes = elf.bytes_at(at, 16).unwrap();
        let mut original = Vec::new();
        for l in stitch_x86::disassemble(code_bytes, at) {
            original.extend(l.bytes);
            if original.len() >= 5 {
                break;
            }
        }
        let toml = format!(
            r#"id = "ST-2026-0042"
revision = 2
title = "Reject oversized lengths in check_len"
description = "Example patch used by the CLI tests."
cve = ["CVE-2026-4242"]
severity = "critical"
tier = "pro"
author = "Stitch tests"

[target]
module = "libdemo.so.1"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "libdemo1", version = "1.0-1" }}

[[patchlet]]
name = "entry"
at = "check_len"
original = "{}"
displaced = "{displaced}"
code_file = "entry.s"
"#,
            hex::encode(stitch_elf::sha256(&bytes)),
            hex::encode(elf.build_id().unwrap()),
            stitch_build::hex_spaced(&original)
        );
        std::fs::write(d.join("patch.toml"), toml).unwrap();
        std::fs::write(d.join("entry.s"), code).unwrap();
        Setup { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn run(&self, args: &[&str]) -> Output {
        stitch(self.path(), args)
    }
    fn built_and_keys(&self) {
        ok(&self.run(&[
            "build",
            "patch.toml",
            "--target",
            "libdemo.so.1",
            "-o",
            "p.stitch",
        ]));
        ok(&self.run(&["keygen", "--out", "author.key"]));
    }
}

#[test]
fn build_sign_verify_inspect_round_trip() {
    let s = Setup::new(
        "cmp edi, 1000\njle __stitch_resume\nstitch_hit\nmov eax, -1\nret\n",
        "before",
    );
    s.built_and_keys();
    // Unsigned: verify refuses with the stable code.
    std::fs::copy(
        s.path().join("author.key.pub"),
        s.path().join("trusted.pub"),
    )
    .unwrap();
    let e = err(&s.run(&["verify", "p.stitch", "--trusted-keys", "trusted.pub"]));
    assert!(e.contains("error[bundle.missing_signature]"), "{e}");

    let out = ok(&s.run(&["sign", "p.stitch", "--key", "author.key"]));
    assert!(out.contains("1 signature"), "{out}");
    let out = ok(&s.run(&["verify", "p.stitch", "--trusted-keys", "trusted.pub"]));
    assert!(out.starts_with("OK: ST-2026-0042 r2"), "{out}");

    let text = ok(&s.run(&["inspect", "p.stitch"]));
    for needle in [
        "ST-2026-0042 r2",
        "CVE-2026-4242",
        "libdemo.so.1 (deb libdemo1 1.0-1, x86_64)",
        "push rbp",
        "cmp edi, 0x3e8",
        "continue (fall-through to resume)",
        "hit counter",
    ] {
        assert!(text.contains(needle), "inspect lacks {needle:?}:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&s.run(&["inspect", "p.stitch", "--json"]))).unwrap();
    assert_eq!(json["id"], "ST-2026-0042");
    assert_eq!(json["patchlets"][0]["displaced"], "before");
    assert_eq!(json["signatures"].as_array().unwrap().len(), 1);
}

#[test]
fn site_output_and_patch_at_agree_on_symbol_offset_and_hex_addresses() {
    // An author pastes `stitch site`'s answer into the patch; both must read a location the
    // same way, or the patch goes to a different address than the one that was checked.
    let s = Setup::new("    ret\n", "before");
    let bytes = std::fs::read(s.path().join("libdemo.so.1")).unwrap();
    let elf = stitch_elf::ElfFile::parse(&bytes).unwrap();
    let entry = elf.symbol("check_len").unwrap().vaddr;
    let code = elf.bytes_at(entry, 16).unwrap();
    let first_len = stitch_x86::disassemble(code, entry)[0].bytes.len() as u64;
    let want = format!("at       = {:#x}", entry + first_len);
    for location in [
        format!("check_len+{first_len}"),
        format!("check_len+{first_len:#x}"),
        format!("{:#x}", entry + first_len),
    ] {
        let out = ok(&s.run(&["site", "--target", "libdemo.so.1", &location]));
        assert!(out.contains(&want), "{location}: {out}");
    }
    let e = err(&s.run(&["site", "--target", "libdemo.so.1", "no_such_fn+4"]));
    assert!(e.contains("\"no_such_fn\" not found"), "{e}");
    let e = err(&s.run(&["site", "--target", "libdemo.so.1", "check_len+zz"]));
    assert!(e.contains("offset \"zz\" is not a number"), "{e}");
}

#[test]
fn new_writes_a_patch_that_builds_and_never_overwrites_an_authors_files() {
    let s = Setup::new("    ret\n", "before");
    let new = |dir: &str, extra: &[&str]| {
        let mut args = vec![
            "new",
            "--target",
            "libdemo.so.1",
            "check_len",
            "--id",
            "ST-2026-0077",
            "--cve",
            "CVE-2026-7777",
            "-o",
            dir,
        ];
        args.extend_from_slice(extra);
        s.run(&args)
    };
    // The fixture is no package's file: the author must say which package it belongs to.
    let e = err(&new("fresh", &[]));
    assert!(e.contains("--package"), "{e}");
    assert!(!s.path().join("fresh/patch.toml").exists());
    let out = ok(&new(
        "fresh",
        &["--package", "deb:libdemo1:1.0-1", "--author", "A <a@b>"],
    ));
    assert!(out.contains("wrote"), "{out}");
    ok(&s.run(&[
        "build",
        "fresh/patch.toml",
        "--target",
        "libdemo.so.1",
        "-o",
        "fresh.stitch",
    ]));
    let shown = ok(&s.run(&["inspect", "fresh.stitch", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["id"], "ST-2026-0077", "{shown}");
    // The author edits the .s file; a second `new` must not destroy that work.
    std::fs::write(s.path().join("fresh/entry.s"), "stitch_hit\n").unwrap();
    let e = err(&new("fresh", &["--package", "deb:libdemo1:1.0-1"]));
    assert!(e.contains("cli.file_exists"), "{e}");
    assert_eq!(
        std::fs::read_to_string(s.path().join("fresh/entry.s")).unwrap(),
        "stitch_hit\n"
    );
}

#[test]
fn new_names_the_wheel_that_installed_a_module_as_patches_and_inventories_do() {
    // A module under site-packages belongs to the distribution whose RECORD lists it; its
    // METADATA says `Pillow`, but patches and the agent's inventory say `pillow`.
    let s = Setup::new("    ret\n", "before");
    let site = s.path().join("site-packages");
    std::fs::create_dir_all(site.join("PIL")).unwrap();
    std::fs::create_dir_all(site.join("Pillow-10.2.0.dist-info")).unwrap();
    std::fs::copy(s.path().join("libdemo.so.1"), site.join("PIL/libdemo.so.1")).unwrap();
    std::fs::write(
        site.join("Pillow-10.2.0.dist-info/RECORD"),
        "PIL/__init__.py,sha256=x,1\nPIL/libdemo.so.1,sha256=y,2\n",
    )
    .unwrap();
    std::fs::write(
        site.join("Pillow-10.2.0.dist-info/METADATA"),
        "Metadata-Version: 2.1\nName: Pillow\nVersion: 10.2.0\n",
    )
    .unwrap();
    ok(&s.run(&[
        "new",
        "--target",
        "site-packages/PIL/libdemo.so.1",
        "check_len",
        "--id",
        "ST-2026-0079",
        "-o",
        "wheel",
    ]));
    let toml = std::fs::read_to_string(s.path().join("wheel/patch.toml")).unwrap();
    assert!(
        toml.contains("ecosystem = \"pypi\", name = \"pillow\", version = \"10.2.0\""),
        "{toml}"
    );
}

#[test]
fn new_names_the_debian_package_that_ships_a_system_library() {
    // dpkg lists /lib/... on merged-/usr Debian while the file resolves to /usr/lib/...
    let lib = std::path::Path::new("/lib/x86_64-linux-gnu/libz.so.1");
    if !lib.exists()
        || std::process::Command::new("dpkg-query")
            .arg("--version")
            .output()
            .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs on Debian with zlib1g"
        );
        eprintln!("skip: not a Debian system with zlib1g");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ok(&stitch(
        dir.path(),
        &[
            "new",
            "--target",
            lib.to_str().unwrap(),
            "crc32",
            "--id",
            "ST-2026-0078",
            "--displaced",
            "after",
        ],
    ));
    let toml = std::fs::read_to_string(dir.path().join("patch.toml")).unwrap();
    assert!(
        toml.contains("ecosystem = \"deb\", name = \"zlib1g\""),
        "{toml}"
    );
}

#[test]
fn wrong_key_is_rejected_on_the_command_line() {
    let s = Setup::new("nop\n", "before");
    s.built_and_keys();
    ok(&s.run(&["keygen", "--out", "other.key"]));
    ok(&s.run(&["sign", "p.stitch", "--key", "other.key"]));
    let e = err(&s.run(&["verify", "p.stitch", "--trusted-keys", "author.key.pub"]));
    assert!(e.contains("error[bundle.untrusted_key]"), "{e}");
    let o = s.run(&[
        "verify",
        "p.stitch",
        "--trusted-keys",
        "author.key.pub",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["code"], "bundle.untrusted_key");
    assert!(!o.status.success());
}

#[test]
fn tampered_bundle_is_rejected_bad_signature() {
    let s = Setup::new("nop\n", "after");
    s.built_and_keys();
    ok(&s.run(&["sign", "p.stitch", "--key", "author.key"]));
    let p: PathBuf = s.path().join("p.stitch");
    let mut bytes = std::fs::read(&p).unwrap();
    let i = bytes.windows(6).position(|w| w == b"Reject").unwrap();
    bytes[i] = b'r';
    std::fs::write(&p, bytes).unwrap();
    let e = err(&s.run(&["verify", "p.stitch", "--trusted-keys", "author.key.pub"]));
    assert!(e.contains("error[bundle.bad_signature]"), "{e}");
}

#[test]
fn build_error_names_patchlet_and_code() {
    let s = Setup::new("call nowhere\n", "before");
    let e = err(&s.run(&["build", "patch.toml", "--target", "libdemo.so.1"]));
    assert!(
        e.contains("error[build.unknown_symbol]") && e.contains("patchlet entry"),
        "{e}"
    );
}

#[test]
fn keygen_refuses_to_overwrite_and_protects_the_secret() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = Setup::new("nop\n", "before");
    ok(&s.run(&["keygen", "--out", "k"]));
    let mode = std::fs::metadata(s.path().join("k"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let e = err(&s.run(&["keygen", "--out", "k"]));
    assert!(e.contains("error[cli.file_exists]"), "{e}");
}

#[test]
fn completions_and_man_pages_are_generated() {
    let s = Setup::new("nop\n", "before");
    let bash = ok(&s.run(&["completions", "bash"]));
    assert!(bash.contains("stitch") && bash.contains("inspect"));
    ok(&s.run(&["man", "--out", "man"]));
    let page = std::fs::read_to_string(s.path().join("man/stitch-build.1")).unwrap();
    assert!(page.contains(".TH"), "{page}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]
    /// Whatever (valid) code and displacement mode an author picks, build -> sign -> verify
    /// -> inspect agrees on the bytes.
    #[test]
    fn build_sign_verify_inspect_agree(nops in 0usize..40, hit in any::<bool>(), mode in 0usize..3) {
        let mut code = "nop\n".repeat(nops);
        if hit { code.push_str("stitch_hit\n"); }
        let s = Setup::new(&code, ["before", "after", "drop"][mode]);
        s.built_and_keys();
        ok(&s.run(&["sign", "p.stitch", "--key", "author.key"]));
        ok(&s.run(&["verify", "p.stitch", "--trusted-keys", "author.key.pub"]));
        let json: serde_json::Value =
            serde_json::from_str(&ok(&s.run(&["inspect", "p.stitch", "--json"]))).unwrap();
        let code_hex = json["patchlets"][0]["code"].as_str().unwrap().to_string();
        let expected_len = nops + if hit { 8 } else { 0 };
        prop_assert_eq!(code_hex.len(), expected_len * 2);
        prop_assert_eq!(json["patchlets"][0]["relocations"].as_array().unwrap().len(), usize::from(hit));
    }
}

/// The README's main command, end to end: server, agent, live service, exploit, patch
/// published and applied by the agent, exploit blocked and reported to the server.
#[test]
fn demo_exploit_is_blocked_after_the_agent_applies_the_published_patch() {
    let me = std::path::PathBuf::from(env!("CARGO_BIN_EXE_stitch"));
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let siblings = ["stitch-server", "stitchd"]
        .iter()
        .all(|b| me.with_file_name(b).exists());
    if !(root && siblings) {
        let why = if root {
            "stitch-server/stitchd not built next to stitch"
        } else {
            "not root"
        };
        assert!(!ci, "demo test cannot run in CI: {why}");
        eprintln!("SKIP: demo test: {why}");
        return;
    }
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = Command::new(&me)
        .args(["demo", "--exit", "--listen", &listen])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("welcome, administrator"),
        "exploit worked before: {text}"
    );
    assert!(
        text.contains("rejected: name too long"),
        "exploit blocked after: {text}"
    );
    assert!(
        text.contains("event exploit_blocked"),
        "reported to the server: {text}"
    );
    assert_eq!(
        text.matches("unchanged").count(),
        2,
        "files on disk unchanged: {text}"
    );
}

#[test]
fn publish_to_an_https_server_trusts_its_private_ca_only_when_told() {
    let me = PathBuf::from(env!("CARGO_BIN_EXE_stitch"));
    let server_bin = me.with_file_name("stitch-server");
    if !server_bin.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "cargo test --workspace builds stitch-server next to stitch"
        );
        eprintln!("SKIP: stitch-server not built next to stitch");
        return;
    }
    let s = Setup::new("    nop\n", "before");
    s.built_and_keys();
    ok(&s.run(&["sign", "p.stitch", "--key", "author.key"]));
    let d = s.path();
    // A private CA and a server certificate it signed, as an operator's PKI would issue.
    let pki = stitch_testkit::private_ca(d, "srv");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(
        Command::new(&server_bin)
            .current_dir(d)
            .args(["--listen", &listen, "--data-dir", "srv-data"])
            .args(["--trusted-keys", "author.key.pub", "--tls-cert"])
            .arg(&pki.cert)
            .arg("--tls-key")
            .arg(&pki.key)
            .args(["--bootstrap-org", "acme"])
            .args(["--bootstrap-out", "creds.env"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(d.join("creds.env").exists() && std::net::TcpStream::connect(&listen).is_ok()) {
        assert!(
            std::time::Instant::now() < deadline,
            "stitch-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let creds = std::fs::read_to_string(d.join("creds.env")).unwrap();
    let token = creds
        .lines()
        .find_map(|l| l.strip_prefix("STITCH_API_TOKEN="))
        .expect("api token")
        .trim_matches('\'')
        .to_string();
    let url = format!("https://{listen}");
    let e = err(&s.run(&["publish", "p.stitch", "--server", &url, "--token", &token]));
    assert!(
        e.contains("cli.server_unreachable"),
        "untrusted certificate: {e}"
    );
    let out = ok(&s.run(&[
        "publish",
        "p.stitch",
        "--server",
        &url,
        "--token",
        &token,
        "--ca-file",
        "ca.pem",
    ]));
    assert!(out.starts_with("published ST-2026-0042"), "{out}");
}

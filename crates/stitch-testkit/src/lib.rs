//! Fixtures more than one test suite needs, so each is written once. A dev-dependency only:
//! no Stitch crate may depend on it for its library or binaries (`.ci/check-deps`).
//!
//! Fixtures are real things made by real tools (a CA made by `openssl`), never mocks.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A private certificate authority and one server certificate it signed, as PEM files.
#[derive(Debug, Clone)]
pub struct PrivateCa {
    /// The CA certificate: what a client must trust (`ca_file`, `--ca-file`).
    pub ca: PathBuf,
    /// The server's certificate (leaf, `CA:FALSE`, SAN `IP:127.0.0.1`, `DNS:localhost`).
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is required (apt-get install openssl; scripts/test installs it)");
    assert!(st.success(), "openssl {args:?} failed");
}

/// Makes a P-256 CA in `dir` (once: `ca.pem`, `ca-key.pem`) and a server certificate it signs
/// for 127.0.0.1 / localhost (`{name}.pem`, `{name}-key.pem`), valid two days. webpki refuses
/// a self-signed CA certificate used as the server's own, so the two are always separate, as
/// in an operator's internal PKI.
///
/// # Panics
/// When `openssl` is missing or fails.
pub fn private_ca(dir: &Path, name: &str) -> PrivateCa {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    if !dir.join("ca.pem").exists() {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-days", "2", "-subj", "/CN=stitch test CA"]);
        a.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
        openssl(dir, &a);
    }
    let (key, csr, cert) = (
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-subj", "/CN=localhost", "-keyout", &key, "-out", &csr]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            &cert,
        ],
    );
    PrivateCa {
        ca: dir.join("ca.pem"),
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// A CPython 3.11 with pip, for the suites that run the exact cp311 wheels the patch library
/// targets: `$STITCH_PYTHON` if set, else `python3.11`, else `python3` — the first that is
/// 3.11 and imports pip. `None` when there is none (callers say why they skip).
#[must_use]
pub fn cpython_311_with_pip() -> Option<String> {
    [
        std::env::var("STITCH_PYTHON").unwrap_or_default(),
        "python3.11".into(),
        "python3".into(),
    ]
    .into_iter()
    .filter(|c| !c.is_empty())
    .find(|c| {
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

/// `pip install --target dir` of one exact version (`spec`, e.g. `ujson==5.12.0`), binary
/// wheels only, no dependencies: the byte-identical files a patch was built for.
///
/// # Errors
/// pip's message when the install fails (no index reachable, no such wheel).
pub fn pip_install_exact(python: &str, spec: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(dir)
        .arg(spec)
        .output()
        .map_err(|e| format!("running {python} -m pip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "pip install {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

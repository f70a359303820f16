pub(crate) mod agent;
mod apply;
mod build;
mod demo;
mod docs;
mod inspect;
mod keys;
mod new;
mod publish;
mod site;
mod verify;

use std::path::Path;

use anyhow::Context as _;

use crate::cli::{Cli, Command};

/// Errors the CLI itself raises (files, arguments), with stable codes.
#[derive(Debug)]
pub(crate) enum CliError {
    /// A file that should not be overwritten exists.
    Exists(String),
    /// The server answered with an error: (HTTP status, its error code, its message).
    ServerRefused(u16, String, String),
    /// The server could not be reached.
    ServerUnreachable(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Exists(p) => write!(f, "{p} exists (use --force to overwrite)"),
            CliError::ServerRefused(status, code, msg) => {
                write!(f, "server refused ({status}): [{code}] {msg}")
            }
            CliError::ServerUnreachable(url) => write!(f, "cannot reach {url}"),
        }
    }
}
impl std::error::Error for CliError {}

impl CliError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            CliError::Exists(_) => "cli.file_exists",
            CliError::ServerRefused(..) => "cli.server_refused",
            CliError::ServerUnreachable(_) => "cli.server_unreachable",
        }
    }
}

pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build {
            patch,
            target,
            output,
        } => build::run(&patch, &target, output.as_deref()),
        Command::Keygen { out, force } => keys::keygen(&out, force),
        Command::Sign {
            bundle,
            key,
            output,
        } => keys::sign(&bundle, &key, output.as_deref()),
        Command::Verify {
            bundle,
            trusted_keys,
            json,
        } => verify::run(&bundle, &trusted_keys, json),
        Command::Publish {
            bundle,
            server,
            token,
            ca_file,
        } => publish::run(&bundle, &server, &token, ca_file.as_deref()),
        Command::Inspect { bundle, json } => inspect::run(&bundle, json),
        Command::Site {
            target,
            location,
            len,
        } => site::run(&target, &location, len),
        Command::New {
            target,
            location,
            id,
            cves,
            displaced,
            len,
            package,
            author,
            patchlet,
            out,
        } => new::run(&new::Args {
            target: &target,
            location: &location,
            id: &id,
            cves: &cves,
            displaced: &displaced,
            len,
            package: package.as_deref(),
            author: author.as_deref(),
            patchlet: &patchlet,
            out: &out,
        }),
        Command::Apply {
            bundle,
            pids,
            all,
            trusted_keys,
            dry_run,
            json,
        } => apply::apply(&bundle, &pids, all, &trusted_keys, dry_run, json),
        Command::Revert {
            id,
            pids,
            all,
            json,
        } => apply::revert(&id, &pids, all, json),
        Command::Ps { json } => apply::ps(json),
        Command::Demo { exit, listen } => demo::run(exit, &listen),
        Command::Agent(a) => agent::run(a),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man { out } => docs::man(&out),
    }
}

/// Reads a whole file, saying which one failed.
/// An HTTP client for talking to a Stitch server: statuses come back as responses (the
/// server's JSON error body carries the stable code to show), and nothing waits forever.
pub(crate) fn http_agent(timeout: std::time::Duration) -> ureq::Agent {
    http_config(timeout).build().into()
}

fn http_config(
    timeout: std::time::Duration,
) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
}

/// [`http_agent`] that trusts only the CA certificates in `ca_file` (PEM) when given.
pub(crate) fn http_agent_with_ca(
    timeout: std::time::Duration,
    ca_file: Option<&Path>,
) -> anyhow::Result<ureq::Agent> {
    let Some(ca_file) = ca_file else {
        return Ok(http_agent(timeout));
    };
    let pem = read(ca_file)?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        anyhow::bail!("{}: no PEM certificate in it", ca_file.display());
    }
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build();
    Ok(http_config(timeout).tls_config(tls).build().into())
}

pub(crate) fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes through a temporary file in the same directory and renames it over `path`, so a
/// crash or full disk never leaves a half-written bundle or key behind.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

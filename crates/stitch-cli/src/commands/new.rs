//! `stitch new`: the first files of a patch, from the real target file (see
//! `stitch_build::scaffold`). Finds the package that ships the file when it can, so the
//! author does not guess a version string.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use stitch_format::{Displaced, Ecosystem};

use super::{CliError, read};

pub(crate) struct Args<'a> {
    pub target: &'a Path,
    pub location: &'a str,
    pub id: &'a str,
    pub cves: &'a [String],
    pub displaced: &'a str,
    pub len: usize,
    pub package: Option<&'a str>,
    pub author: Option<&'a str>,
    pub patchlet: &'a str,
    pub out: &'a Path,
}

pub(crate) fn run(a: &Args<'_>) -> anyhow::Result<()> {
    let displaced = Displaced::from_name(a.displaced)
        .with_context(|| format!("--displaced {:?}: use before, after or drop", a.displaced))?;
    let bytes = read(a.target)?;
    let (eco, name, version) = match a.package {
        Some(p) => parse_package(p)?,
        None => find_package(a.target)?,
    };
    let module = a
        .target
        .file_name()
        .and_then(|n| n.to_str())
        .context("the target path has no file name")?;
    let author = match a.author {
        Some(s) => s.to_string(),
        None => std::env::var("USER").unwrap_or_else(|_| "TODO: author".into()),
    };
    let s = stitch_build::scaffold(
        &bytes,
        &stitch_build::ScaffoldSpec {
            id: a.id,
            module,
            location: a.location,
            min_len: a.len,
            displaced,
            package: (eco, &name, &version),
            cves: a.cves,
            author: &author,
            patchlet: a.patchlet,
        },
    )
    .map_err(|e| {
        let code = e.code();
        anyhow::Error::new(e).context(format!("[{code}] no patch written"))
    })?;
    std::fs::create_dir_all(a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let toml_path = a.out.join("patch.toml");
    let asm_path = a.out.join(&s.code_file);
    // Check both before writing either, so a refusal leaves nothing half-written.
    for p in [&toml_path, &asm_path] {
        if p.exists() {
            return Err(CliError::Exists(p.display().to_string()).into());
        }
    }
    write_new(&toml_path, &s.toml)?;
    write_new(&asm_path, &s.asm)?;
    println!("wrote {} and {}", toml_path.display(), asm_path.display());
    println!(
        "site {:#x}: {} ({} package {name} {version})",
        s.at,
        stitch_build::hex_spaced(&s.original),
        eco.as_str()
    );
    println!(
        "next: write the fix in {}, fill in the TODOs, then\n  stitch build {} --target {} -o patch.stitch",
        asm_path.display(),
        toml_path.display(),
        a.target.display()
    );
    Ok(())
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::Error::new(CliError::Exists(path.display().to_string()))
            } else {
                anyhow::Error::new(e).context(format!("creating {}", path.display()))
            }
        })?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn parse_package(s: &str) -> anyhow::Result<(Ecosystem, String, String)> {
    let mut it = s.splitn(3, ':');
    let (Some(eco), Some(name), Some(version)) = (it.next(), it.next(), it.next()) else {
        bail!("--package {s:?}: expected ECOSYSTEM:NAME:VERSION, e.g. deb:libexpat1:2.5.0-1");
    };
    let eco = Ecosystem::from_name(eco)
        .with_context(|| format!("--package {s:?}: ecosystem is deb, rpm, pypi, npm or apk"))?;
    if name.is_empty() || version.is_empty() {
        bail!("--package {s:?}: name and version must not be empty");
    }
    Ok((eco, name.to_string(), version.to_string()))
}

/// The package that ships `target`: dpkg's database first, then the RECORD of a Python
/// wheel installed around it.
fn find_package(target: &Path) -> anyhow::Result<(Ecosystem, String, String)> {
    let path =
        std::fs::canonicalize(target).with_context(|| format!("resolving {}", target.display()))?;
    // dpkg records the path the package shipped; on merged-/usr systems (Debian 12) that is
    // often /lib/... while the file resolves to /usr/lib/..., so ask for each spelling.
    let mut spellings = vec![target.to_path_buf(), path.clone()];
    if let Ok(rest) = path.strip_prefix("/usr") {
        spellings.push(Path::new("/").join(rest));
    }
    if let Some(p) = spellings.iter().find_map(|p| dpkg_owner(p)) {
        return Ok(p);
    }
    if let Some(p) = wheel_owner(&path) {
        return Ok(p);
    }
    bail!(
        "no installed package ships {} (dpkg, Python wheels); say which with --package ECOSYSTEM:NAME:VERSION",
        path.display()
    )
}

fn dpkg_owner(path: &Path) -> Option<(Ecosystem, String, String)> {
    let out = Command::new("dpkg-query")
        .arg("-S")
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // "libexpat1:amd64: /usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10"
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .next()?
        .rsplit_once(": ")?
        .0
        .split(", ")
        .next()?
        .to_string();
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}"])
        .arg(&pkg)
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        return None;
    }
    let name = pkg.split(':').next()?.to_string();
    Some((Ecosystem::Deb, name, version))
}

/// Walks up from `path` to a directory holding `*.dist-info`s (site-packages) and returns the
/// distribution whose RECORD lists the file.
fn wheel_owner(path: &Path) -> Option<(Ecosystem, String, String)> {
    for root in path.ancestors().skip(1) {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let infos: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "dist-info"))
            .collect();
        if infos.is_empty() {
            continue;
        }
        let rel = path.strip_prefix(root).ok()?.to_str()?.to_string();
        for info in infos {
            let Ok(record) = std::fs::read_to_string(info.join("RECORD")) else {
                continue;
            };
            if !record
                .lines()
                .any(|l| l.split(',').next() == Some(rel.as_str()))
            {
                continue;
            }
            let meta = std::fs::read_to_string(info.join("METADATA")).ok()?;
            let field = |k: &str| {
                meta.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            // Under the name patches and the agent's inventory use (`pillow`, not `Pillow`).
            let name = stitch_format::normalize_pypi_name(&field("Name:")?);
            return Some((Ecosystem::Pypi, name, field("Version:")?));
        }
        return None;
    }
    None
}

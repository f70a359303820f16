//! What the agent tells the server about its host: hostname, os-release, kernel, IP
//! addresses, installed packages (dpkg-query or rpm, plus Python distributions in the system's
//! site-packages) and the state of every patch.

use std::collections::BTreeSet;
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Package {
    pub ecosystem: String,
    pub name: String,
    pub version: String,
}

/// `os` of the heartbeat (from /etc/os-release).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    pub id: String,
    pub version_id: String,
    pub pretty_name: String,
}

/// State of one patch on this host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PatchState {
    pub patch_id: String,
    pub revision: i64,
    /// `applied`, `failed`, `disabled` or `pending`.
    pub state: String,
    pub processes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

/// The heartbeat body (`POST /api/v1/agent/heartbeat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heartbeat {
    pub hostname: String,
    pub os: OsInfo,
    pub kernel: String,
    pub ip_addresses: Vec<String>,
    pub agent_version: String,
    pub agent_enabled: bool,
    pub packages_hash: String,
    /// Sent only when the server asks for it (`inventory_required`) or the set changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<Package>>,
    pub patches: Vec<PatchState>,
}

/// The kernel's hostname.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The running kernel release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parses os-release text.
pub fn parse_os_release(text: &str) -> OsInfo {
    let mut o = OsInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => o.id = v,
            "VERSION_ID" => o.version_id = v,
            "PRETTY_NAME" => o.pretty_name = v,
            _ => {}
        }
    }
    o
}

/// /etc/os-release (or /usr/lib/os-release).
pub fn os_release() -> OsInfo {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    parse_os_release(&text)
}

/// Local (non-loopback) IPv4 addresses from `/proc/net/fib_trie`.
pub fn parse_fib_trie(text: &str) -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut last: Option<&str> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(ip) = t.strip_prefix("|-- ").or_else(|| t.strip_prefix("+-- ")) {
            last = Some(ip.split('/').next().unwrap_or(ip));
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && let Ok(a) = ip.parse::<std::net::Ipv4Addr>()
            && !a.is_loopback()
        {
            out.insert(a.to_string());
        }
    }
    out.into_iter().collect()
}

/// IPv6 addresses from `/proc/net/if_inet6` (loopback excluded).
pub fn parse_if_inet6(text: &str) -> Vec<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(hexaddr) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(bytes) = hex::decode(hexaddr) else {
            continue;
        };
        let Ok(arr) = <[u8; 16]>::try_from(bytes.as_slice()) else {
            continue;
        };
        let a = std::net::Ipv6Addr::from(arr);
        if !a.is_loopback() {
            out.insert(a.to_string());
        }
    }
    out.into_iter().collect()
}

/// The host's IP addresses (at most 64, as the server accepts).
pub fn ip_addresses() -> Vec<String> {
    let mut v = parse_fib_trie(&std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default());
    v.extend(parse_if_inet6(
        &std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default(),
    ));
    v.truncate(64);
    v
}

/// Parses `dpkg-query -W -f '${db:Status-Abbrev}\t${Package}\t${Version}\n'` output: only
/// installed (`ii`) packages.
pub fn parse_dpkg(text: &str) -> Vec<Package> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let status = f.next()?;
            let name = f.next()?;
            let version = f.next()?;
            (status.starts_with("ii") && !name.is_empty() && !version.is_empty()).then(|| Package {
                ecosystem: "deb".into(),
                name: name.to_string(),
                version: version.to_string(),
            })
        })
        .collect()
}

/// Directories where system-wide Python distributions live: `/usr/lib/python3/dist-packages`
/// and `{/usr,/usr/local}/{lib,lib64}/python3.*/{site,dist}-packages`.
pub fn python_site_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs = vec![std::path::PathBuf::from("/usr/lib/python3/dist-packages")];
    for base in [
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/usr/local/lib64",
    ] {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for sub in ["site-packages", "dist-packages"] {
                    dirs.push(e.path().join(sub));
                }
            }
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.sort();
    dirs.dedup();
    dirs
}

/// `Pillow-10.2.0.dist-info` -> (`pillow`, `10.2.0`). The directory name is the wheel spec's
/// `{name}-{version}.dist-info`, where neither part contains `-` (the name's `-` became `_`);
/// egg-info and malformed names yield `None`.
pub fn parse_dist_info(dir_name: &str) -> Option<Package> {
    let stem = dir_name.strip_suffix(".dist-info")?;
    let (name, version) = stem.split_once('-')?;
    if name.is_empty() || version.is_empty() || version.contains('-') {
        return None;
    }
    Some(Package {
        ecosystem: "pypi".into(),
        name: stitch_format::normalize_pypi_name(name),
        version: version.to_string(),
    })
}

/// Python distributions installed in `dirs` (one `readdir` each, no file is opened).
pub fn python_packages_in(dirs: &[std::path::PathBuf]) -> Vec<Package> {
    let mut v = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        v.extend(
            entries
                .filter_map(Result::ok)
                .filter_map(|e| parse_dist_info(&e.file_name().to_string_lossy())),
        );
    }
    v
}

/// Installed packages from dpkg, else rpm, plus system-wide Python distributions (patches
/// for wheels name `pypi` packages); sorted and deduplicated. Empty when nothing works.
pub fn packages() -> Vec<Package> {
    let dpkg = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\n"])
        .output();
    let mut v = match dpkg {
        Ok(o) if o.status.success() => parse_dpkg(&String::from_utf8_lossy(&o.stdout)),
        _ => match Command::new("rpm")
            .args(["-qa", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n"])
            .output()
        {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| {
                    let (n, v) = l.split_once('\t')?;
                    Some(Package {
                        ecosystem: "rpm".into(),
                        name: n.into(),
                        version: v.into(),
                    })
                })
                .collect(),
            _ => Vec::new(),
        },
    };
    v.extend(python_packages_in(&python_site_dirs()));
    v.sort();
    v.dedup();
    v
}

/// The canonical hash the server computes over a sorted, deduplicated package list.
pub fn packages_hash(sorted: &[Package]) -> String {
    let mut h = Sha256::new();
    for p in sorted {
        h.update(p.ecosystem.as_bytes());
        h.update(b"\t");
        h.update(p.name.as_bytes());
        h.update(b"\t");
        h.update(p.version.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_distributions_are_reported_under_the_names_patches_use() {
        // A patch for Pillow names `pillow`; reporting `Pillow` would make it never relevant.
        let p = parse_dist_info("Pillow-10.2.0.dist-info").expect("parsed");
        assert_eq!(
            (p.ecosystem.as_str(), p.name.as_str(), p.version.as_str()),
            ("pypi", "pillow", "10.2.0")
        );
        assert_eq!(
            parse_dist_info("ujson-5.12.0.dist-info").map(|p| p.name),
            Some("ujson".into())
        );
        for bad in [
            "foo.egg-info",
            "-1.0.dist-info",
            "foo-.dist-info",
            "foo-1-2.dist-info",
            "foo",
        ] {
            assert_eq!(parse_dist_info(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().expect("tmp");
        for d in [
            "Pillow-10.2.0.dist-info",
            "PIL",
            "ujson-5.12.0.dist-info",
            "old.egg-info",
        ] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let mut got = python_packages_in(&[dir.path().to_path_buf(), dir.path().join("missing")]);
        got.sort();
        let names: Vec<_> = got
            .iter()
            .map(|p| format!("{} {}", p.name, p.version))
            .collect();
        assert_eq!(names, ["pillow 10.2.0", "ujson 5.12.0"]);
    }

    #[test]
    fn parsers_take_what_matters() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
        );
        assert_eq!(os.id, "debian");
        assert_eq!(os.version_id, "12");
        assert!(os.pretty_name.starts_with("Debian"));
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.2.15\n        /32 host LOCAL\n     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 10.0.2.255\n        /32 link BROADCAST\n";
        assert_eq!(parse_fib_trie(fib), vec!["10.0.2.15".to_string()]);
        let v6 = "00000000000000000000000000000001 01 80 10 80       lo\nfe800000000000000000000000000001 02 40 20 80     eth0\n";
        assert_eq!(parse_if_inet6(v6), vec!["fe80::1".to_string()]);
        let d = parse_dpkg("ii \tbash\t5.2.15-2+b2\nrc \told\t1.0\nii \tlibc6\t2.36-9\n");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "bash");
        assert_eq!(packages_hash(&[]).len(), 64);
    }
}

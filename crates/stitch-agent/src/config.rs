//! `/etc/stitch/agent.toml`, with environment variables overriding the file.
//!
//! Every field has a default, so an empty file (or none) gives an agent that works offline
//! with whatever its store holds. Environment overrides (`STITCH_*`) win over the file; the
//! standard `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` variables are used when the
//! file names no proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use stitch_format::TrustedKeys;

use crate::error::{AgentError, Result};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/stitch/agent.toml";

/// The agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL of the Stitch server (`https://stitch.example.com`); none: offline only.
    pub server_url: Option<String>,
    /// One-time enrollment token (`ste_...`), used only until the agent has an identity.
    pub enrollment_token: Option<String>,
    /// Local store: bundles, state database, identity.
    pub state_dir: PathBuf,
    /// Local control socket.
    pub socket_path: PathBuf,
    /// Vendor public keys (`ed25519:...` lines) whose bundle signatures are accepted.
    pub trusted_keys: Vec<String>,
    /// A file of vendor public keys, one per line (added to `trusted_keys`).
    pub trusted_keys_file: Option<PathBuf>,
    /// Pin the server's manifest-signing key instead of trusting the one learnt at enrollment.
    pub server_key: Option<String>,
    /// PEM file of CA certificates to trust for the server instead of the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// Hostname to report (default: the kernel's).
    pub hostname: Option<String>,
    pub proxy: ProxyConfig,
    pub scan: ScanConfig,
    pub crash: CrashConfig,
    pub sync: SyncConfig,
    pub hook: HookConfig,
}

/// Load-time patching (`stitch-hook`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookConfig {
    /// Hold loads of target modules and patch them before they run (needs CAP_SYS_ADMIN).
    pub enabled: bool,
    /// Watch the standard bin and lib directories.
    pub standard_dirs: bool,
    /// More directories where target modules live (searched recursively to `depth`).
    pub dirs: Vec<PathBuf>,
    pub depth: usize,
    /// Hold a library at the `mmap` of its code where the kernel reports mappings (Linux
    /// 6.14+, ext4/xfs/btrfs); `false`: at its open, following each syscall to that mapping
    /// (docs/load-time.md, section 2).
    pub watch_mappings: bool,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            standard_dirs: true,
            dirs: Vec::new(),
            depth: 3,
            watch_mappings: true,
        }
    }
}

/// HTTP(S) proxy. `url` may carry credentials (`http://user:pass@proxy:3128`); `username`
/// and `password` override them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Hosts that bypass the proxy (comma-separated, `NO_PROXY` syntax).
    pub no_proxy: Option<String>,
}

/// Finding processes to patch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// Full rescan of every process (catches libraries loaded with dlopen, and processes
    /// missed while the proc connector was unavailable).
    pub interval_s: u64,
    /// How often hit counters of patched processes are read (exploit-attempt events) right
    /// after a hit; while nothing is hit the interval doubles up to `hits_max_interval_s`.
    pub hits_interval_s: u64,
    pub hits_max_interval_s: u64,
    /// Use the netlink proc connector for exec/fork/exit events (needs CAP_NET_ADMIN).
    pub proc_connector: bool,
}

/// Crash protection: a patch whose processes die of SIGSEGV/SIGBUS/SIGILL/SIGABRT this many
/// times within the window is disabled on this host and reverted everywhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashConfig {
    pub threshold: u32,
    pub window_s: u64,
}

/// Talking to the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Longest long-poll to ask for (the server may cap it lower).
    pub long_poll_s: u64,
    /// Full manifest fetch even when long-polls keep returning "no change".
    pub fallback_s: u64,
    /// Heartbeat interval until the server says otherwise.
    pub heartbeat_s: u64,
    /// First retry delay after a failure; doubles up to `backoff_max_s`, with jitter.
    pub backoff_initial_ms: u64,
    pub backoff_max_s: u64,
    /// Timeout of one ordinary request.
    pub request_timeout_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_url: None,
            enrollment_token: None,
            state_dir: PathBuf::from("/var/lib/stitch"),
            socket_path: PathBuf::from("/run/stitch/stitchd.sock"),
            trusted_keys: Vec::new(),
            trusted_keys_file: None,
            server_key: None,
            ca_file: None,
            hostname: None,
            proxy: ProxyConfig::default(),
            scan: ScanConfig::default(),
            crash: CrashConfig::default(),
            sync: SyncConfig::default(),
            hook: HookConfig::default(),
        }
    }
}

impl Default for ScanConfig {
    fn default() -> Self {
        Self {
            interval_s: 300,
            hits_interval_s: 10,
            hits_max_interval_s: 120,
            proc_connector: true,
        }
    }
}

impl Default for CrashConfig {
    fn default() -> Self {
        Self {
            threshold: 3,
            window_s: 600,
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            long_poll_s: 55,
            fallback_s: 300,
            heartbeat_s: 300,
            backoff_initial_ms: 500,
            backoff_max_s: 300,
            request_timeout_s: 30,
        }
    }
}

impl Config {
    /// Reads `path` (a missing file gives the defaults), then applies `STITCH_*` overrides
    /// from `env`.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let mut cfg = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|e| AgentError::Config {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(AgentError::io("read", path)(e)),
        };
        cfg.apply_env(env).map_err(|reason| AgentError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Applies the `STITCH_*` environment overrides.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        let num = |name: &str| -> Result<Option<u64>, String> {
            env(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{name}={v:?} is not a number"))
                })
                .transpose()
        };
        if let Some(v) = env("STITCH_SERVER_URL") {
            self.server_url = Some(v).filter(|s| !s.is_empty());
        }
        if let Some(v) = env("STITCH_ENROLLMENT_TOKEN") {
            self.enrollment_token = Some(v).filter(|s| !s.is_empty());
        }
        if let Some(v) = env("STITCH_STATE_DIR") {
            self.state_dir = v.into();
        }
        if let Some(v) = env("STITCH_SOCKET") {
            self.socket_path = v.into();
        }
        if let Some(v) = env("STITCH_TRUSTED_KEYS_FILE") {
            self.trusted_keys_file = Some(v.into());
        }
        if let Some(v) = env("STITCH_SERVER_KEY") {
            self.server_key = Some(v);
        }
        if let Some(v) = env("STITCH_CA_FILE") {
            self.ca_file = Some(v.into());
        }
        if let Some(v) = env("STITCH_HOSTNAME") {
            self.hostname = Some(v);
        }
        if let Some(v) = env("STITCH_PROXY") {
            self.proxy.url = Some(v).filter(|s| !s.is_empty());
        }
        if let Some(v) = env("STITCH_PROXY_USERNAME") {
            self.proxy.username = Some(v);
        }
        if let Some(v) = env("STITCH_PROXY_PASSWORD") {
            self.proxy.password = Some(v);
        }
        if let Some(v) = num("STITCH_SCAN_INTERVAL_S")? {
            self.scan.interval_s = v;
        }
        if let Some(v) = num("STITCH_HITS_INTERVAL_S")? {
            self.scan.hits_interval_s = v;
        }
        if let Some(v) = num("STITCH_HITS_MAX_INTERVAL_S")? {
            self.scan.hits_max_interval_s = v;
        }
        if let Some(v) = env("STITCH_PROC_CONNECTOR") {
            self.scan.proc_connector = !matches!(v.as_str(), "0" | "false" | "no");
        }
        if let Some(v) = num("STITCH_CRASH_THRESHOLD")? {
            self.crash.threshold = v as u32;
        }
        if let Some(v) = num("STITCH_CRASH_WINDOW_S")? {
            self.crash.window_s = v;
        }
        if let Some(v) = env("STITCH_HOOK") {
            self.hook.enabled = !matches!(v.as_str(), "0" | "false" | "no");
        }
        if let Some(v) = num("STITCH_LONG_POLL_S")? {
            self.sync.long_poll_s = v;
        }
        if let Some(v) = num("STITCH_FALLBACK_S")? {
            self.sync.fallback_s = v;
        }
        if let Some(v) = num("STITCH_HEARTBEAT_S")? {
            self.sync.heartbeat_s = v;
        }
        if let Some(v) = num("STITCH_BACKOFF_MAX_S")? {
            self.sync.backoff_max_s = v;
        }
        Ok(())
    }

    /// The trusted vendor keys from `trusted_keys` and `trusted_keys_file`.
    pub fn trusted(&self) -> Result<TrustedKeys> {
        let mut text = self.trusted_keys.join("\n");
        if let Some(p) = &self.trusted_keys_file {
            let file = std::fs::read_to_string(p).map_err(AgentError::io("read", p))?;
            text.push('\n');
            text.push_str(&file);
        }
        TrustedKeys::from_text(&text).map_err(|e| AgentError::Config {
            path: self.trusted_keys_file.clone().unwrap_or_default(),
            reason: format!("trusted keys: {e}"),
        })
    }

    pub(crate) fn scan_interval(&self) -> Duration {
        Duration::from_secs(self.scan.interval_s.max(1))
    }
    pub(crate) fn hits_interval(&self) -> Duration {
        Duration::from_secs(self.scan.hits_interval_s.max(1))
    }
    pub(crate) fn hits_max_interval(&self) -> Duration {
        Duration::from_secs(self.scan.hits_max_interval_s).max(self.hits_interval())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_default_config_parses_to_the_defaults() {
        let c: Config = toml::from_str(include_str!("../packaging/agent.toml")).unwrap();
        let d = Config::default();
        assert_eq!(c.state_dir, d.state_dir);
        assert_eq!(c.socket_path, d.socket_path);
        assert_eq!(c.crash.threshold, d.crash.threshold);
        assert_eq!(c.sync.long_poll_s, d.sync.long_poll_s);
        assert_eq!(c.hook.watch_mappings, d.hook.watch_mappings);
        assert!(c.server_url.is_none() && c.trusted_keys.is_empty());
    }

    #[test]
    fn env_overrides_file_and_bad_numbers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "server_url = \"https://a\"\n[crash]\nthreshold = 5\n[proxy]\nurl = \"http://p:3128\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "STITCH_SERVER_URL" => Some("https://b".to_string()),
            "STITCH_CRASH_WINDOW_S" => Some("60".to_string()),
            _ => None,
        };
        let c = Config::load(&p, &env).unwrap();
        assert_eq!(c.server_url.as_deref(), Some("https://b"));
        assert_eq!(c.crash.threshold, 5);
        assert_eq!(c.crash.window_s, 60);
        assert_eq!(c.proxy.url.as_deref(), Some("http://p:3128"));
        let bad = |k: &str| (k == "STITCH_CRASH_THRESHOLD").then(|| "x".to_string());
        assert_eq!(Config::load(&p, &bad).unwrap_err().code(), "agent.config");
        std::fs::write(&p, "nonsense = 1\n").unwrap();
        assert_eq!(
            Config::load(&p, &|_| None).unwrap_err().code(),
            "agent.config"
        );
        let missing = Config::load(&dir.path().join("none.toml"), &|_| None).unwrap();
        assert_eq!(missing.state_dir, PathBuf::from("/var/lib/stitch"));
    }
}

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// In-memory micropatching for Linux: build, sign, verify and inspect micropatches.
#[derive(Debug, Parser)]
#[command(name = "stitch", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Assemble a patch source against its real target file into an unsigned bundle.
    Build {
        /// The patch source (TOML).
        patch: PathBuf,
        /// The exact target module file the patch is for.
        #[arg(long)]
        target: PathBuf,
        /// Output bundle [default: <id>-r<revision>.stitch in the current directory].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Generate an Ed25519 signing key (KEY, mode 0600) and its public key (KEY.pub).
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Add a signature to a bundle.
    Sign {
        bundle: PathBuf,
        /// Secret key file from `stitch keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Output [default: sign in place].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Verify a bundle's format and signatures against trusted public keys.
    Verify {
        bundle: PathBuf,
        /// File of trusted public keys (one per line).
        #[arg(long)]
        trusted_keys: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Upload a signed bundle to a Stitch server's catalog.
    Publish {
        bundle: PathBuf,
        /// Server URL, e.g. https://stitch.example.com.
        #[arg(long, env = "STITCH_SERVER")]
        server: String,
        /// API token with the admin role (`stk_...`).
        #[arg(long, env = "STITCH_API_TOKEN", hide_env_values = true)]
        token: String,
        /// PEM file of the CA that signed the server's certificate (a private PKI); the
        /// built-in Mozilla roots otherwise.
        #[arg(long, env = "STITCH_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Show a bundle: metadata, target identity, each patchlet disassembled.
    Inspect {
        bundle: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the instructions at a candidate site and the `at`/`original` lines for patch.toml.
    Site {
        /// The target module file.
        #[arg(long)]
        target: PathBuf,
        /// `symbol`, `symbol+offset` or a module-relative address (0x...).
        location: String,
        /// Minimum number of bytes to displace (whole instructions are taken).
        #[arg(long, default_value_t = 5)]
        len: usize,
    },
    /// Start a patch: write patch.toml (identity and site bytes from the real file) and the
    /// patchlet's .s file, ready for `stitch build`.
    New {
        /// The target module file.
        #[arg(long)]
        target: PathBuf,
        /// Where the first patchlet goes: `symbol`, `symbol+offset` or `0x...`.
        location: String,
        /// Patch id, e.g. ST-2026-0042.
        #[arg(long)]
        id: String,
        /// CVE the patch closes (repeatable).
        #[arg(long = "cve")]
        cves: Vec<String>,
        /// What happens to the displaced instructions: before, after or drop.
        #[arg(long, default_value = "before")]
        displaced: String,
        /// Minimum number of bytes to displace (whole instructions are taken).
        #[arg(long, default_value_t = 5)]
        len: usize,
        /// ECOSYSTEM:NAME:VERSION of the package that ships the file (deb, rpm, pypi, npm,
        /// apk). Found with dpkg or from a Python wheel's RECORD when not given.
        #[arg(long)]
        package: Option<String>,
        /// Author line (default: $USER).
        #[arg(long)]
        author: Option<String>,
        /// Name of the first patchlet (and of its .s file).
        #[arg(long, default_value = "entry")]
        patchlet: String,
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long, short = 'o', default_value = ".")]
        out: PathBuf,
    },
    /// Apply a signed patch to running processes.
    Apply {
        /// The signed bundle.
        bundle: PathBuf,
        /// Process to patch (repeatable).
        #[arg(long = "pid", required_unless_present = "all", conflicts_with = "all")]
        pids: Vec<i32>,
        /// Every process that maps the target module.
        #[arg(long)]
        all: bool,
        /// Trusted public keys.
        #[arg(long, default_value = "/etc/stitch/trusted-keys")]
        trusted_keys: PathBuf,
        /// Print the plan (sites, bytes, trampolines) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Take a patch out of running processes.
    Revert {
        /// Patch id, e.g. ST-2026-0001.
        id: String,
        /// Process (repeatable).
        #[arg(long = "pid", required_unless_present = "all", conflicts_with = "all")]
        pids: Vec<i32>,
        /// Every process that carries the patch.
        #[arg(long)]
        all: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Which processes carry which patches, with hit counts (read without stopping them).
    Ps {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The whole system on this machine: server, agent, a vulnerable service, an exploit, a
    /// patch published and applied live, the exploit blocked and counted.
    Demo {
        /// Stop everything and exit at the end instead of serving the dashboard until Ctrl-C.
        #[arg(long)]
        exit: bool,
        /// Address of the demo server (dashboard and API).
        #[arg(long, default_value = "127.0.0.1:8440")]
        listen: String,
    },
    /// Control the local agent (stitchd): status, patches, events, enable, disable, sync.
    Agent(crate::commands::agent::AgentArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for stitch and every subcommand into a directory.
    Man {
        #[arg(long)]
        out: PathBuf,
    },
}

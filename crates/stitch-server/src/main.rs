//! The `stitch-server` binary: parses flags, optionally bootstraps an organisation, serves.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use stitch_format::TrustedKeys;
use stitch_server::model::Plan;
use stitch_server::{BootstrapSpec, Config};

/// Stitch patch server: catalog, fleet, signed manifests and dashboard.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "STITCH_LISTEN", default_value = "127.0.0.1:8440")]
    listen: SocketAddr,
    /// Data directory: SQLite database and server key.
    #[arg(
        long,
        env = "STITCH_DATA_DIR",
        default_value = "/var/lib/stitch-server"
    )]
    data_dir: PathBuf,
    /// Use PostgreSQL (postgres://...) instead of the embedded SQLite.
    #[arg(long, env = "STITCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Trusted vendor public keys (one `stitch-ed25519-public-v1:` line each).
    #[arg(long, env = "STITCH_TRUSTED_KEYS")]
    trusted_keys: Option<PathBuf>,
    /// Manifest-signing key file (default DATA_DIR/server.key; replicas must share one).
    #[arg(long, env = "STITCH_SERVER_KEY")]
    server_key: Option<PathBuf>,
    /// Seconds a signed manifest stays valid.
    #[arg(long, default_value_t = 86_400)]
    manifest_ttl_s: u64,
    /// Longest long-poll, seconds.
    #[arg(long, default_value_t = 60)]
    long_poll_s: u64,
    /// Heartbeat interval asked of agents, seconds.
    #[arg(long, default_value_t = 300)]
    heartbeat_s: u64,
    /// Mark session cookies Secure (behind an HTTPS proxy; implied by --tls-cert).
    #[arg(long)]
    secure_cookies: bool,
    /// Serve HTTPS with this PEM certificate chain (leaf first).
    #[arg(long, env = "STITCH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "STITCH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Create (or reuse) this organisation and mint an enrollment token and an API token.
    #[arg(long)]
    bootstrap_org: Option<String>,
    /// Owner account for the bootstrap organisation, USER:PASSWORD.
    #[arg(long, requires = "bootstrap_org")]
    bootstrap_admin: Option<String>,
    /// Plan of a newly bootstrapped organisation.
    #[arg(long, default_value = "paid", value_parser = ["free", "paid"])]
    bootstrap_plan: String,
    /// Also write the bootstrap credentials as shell `KEY=value` lines to this file (mode 0600).
    #[arg(long, requires = "bootstrap_org")]
    bootstrap_out: Option<PathBuf>,
    /// Exit after bootstrapping instead of serving.
    #[arg(long, requires = "bootstrap_org")]
    bootstrap_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = Config::new(args.data_dir.clone());
    config.listen = args.listen;
    config.database_url = args.database_url.clone();
    config.server_key_file = args.server_key.clone();
    config.manifest_ttl = Duration::from_secs(args.manifest_ttl_s);
    config.long_poll_max = Duration::from_secs(args.long_poll_s);
    config.heartbeat_interval = Duration::from_secs(args.heartbeat_s);
    config.online_window = Duration::from_secs(args.heartbeat_s * 3);
    config.secure_cookies = args.secure_cookies;
    config.tls = args.tls_cert.clone().zip(args.tls_key.clone());
    if let Some(path) = &args.trusted_keys {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading trusted keys {}", path.display()))?;
        config.trusted_keys = TrustedKeys::from_text(&text)
            .with_context(|| format!("parsing trusted keys {}", path.display()))?;
    }
    if config.trusted_keys.is_empty() {
        tracing::warn!("no trusted vendor keys configured: every bundle upload will be refused");
    }

    let store = stitch_server::open_store(&config).await?;
    if let Some(org) = &args.bootstrap_org {
        let admin = match &args.bootstrap_admin {
            Some(s) => match s.split_once(':') {
                Some((u, p)) => Some((u.to_string(), p.to_string())),
                None => bail!("--bootstrap-admin expects USER:PASSWORD"),
            },
            None => None,
        };
        let plan = Plan::from_name(&args.bootstrap_plan).unwrap_or(Plan::Paid);
        let out = stitch_server::bootstrap(
            &store,
            &BootstrapSpec {
                org: org.clone(),
                plan,
                admin,
            },
        )
        .await?;
        let text = format!(
            "STITCH_ORG_ID={}\nSTITCH_ENROLLMENT_TOKEN={}\nSTITCH_API_TOKEN={}\n",
            out.org_id, out.enrollment_token, out.api_token
        );
        print!("{text}");
        if let Some(path) = &args.bootstrap_out {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("writing {}", path.display()))?;
            f.write_all(text.as_bytes())?;
        }
        if args.bootstrap_only {
            return Ok(());
        }
    }
    let server = stitch_server::run_with_store(config, store).await?;
    println!("stitch-server listening on {}", server.url());
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}

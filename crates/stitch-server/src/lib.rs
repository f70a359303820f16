//! `stitch-server`: the patch catalog, fleet management, signed per-agent manifests and the
//! web dashboard.
//!
//! Start it from Rust with [`run`], which binds, spawns the server on the current Tokio
//! runtime and returns a [`ServerHandle`] that knows the bound address:
//!
//! ```no_run
//! # async fn demo() -> Result<(), stitch_server::StartError> {
//! let mut config = stitch_server::Config::new("/tmp/stitch-demo".into());
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! let server = stitch_server::run(config).await?;
//! let out = stitch_server::bootstrap(&server.store, &stitch_server::BootstrapSpec {
//!     org: "demo".into(), plan: stitch_server::model::Plan::Paid,
//!     admin: Some(("admin".into(), "password".into())),
//! }).await?;
//! println!("{} {}", server.url(), out.enrollment_token);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Invariants:
//! - **Tenant isolation.** Every query that reads or changes tenant data takes the caller's
//!   `org_id` from its credential and filters by it; ids in URLs are never trusted alone.
//! - **Nothing changes on bad input.** Validation happens before any write, and multi-row
//!   writes are single transactions. Errors are `{"error":{"code","message"}}` with stable codes.
//! - **The server never holds a vendor signing key.** It verifies bundles against configured
//!   vendor public keys, and signs only manifests, with its own key.
//! - **Stateless replicas.** With PostgreSQL, all state is in the database (and the shared
//!   server-key file); long-polls are woken across replicas by LISTEN/NOTIFY.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod dashboard;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stitch_format::{SecretKey, TrustedKeys};
use tokio::sync::oneshot;

use crate::model::{Plan, Role};
use crate::store::Store;

/// How often queued `last_seen` updates are written.
pub const SEEN_FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind; port 0 picks a free port (see [`ServerHandle::addr`]).
    pub listen: SocketAddr,
    /// Holds `stitch.db` (SQLite) and `server.key` unless overridden.
    pub data_dir: PathBuf,
    /// `postgres://...` to use PostgreSQL instead of the embedded SQLite.
    pub database_url: Option<String>,
    /// Server manifest-signing key file; default `<data_dir>/server.key`, created if absent.
    /// Replicas on one database must share it.
    pub server_key_file: Option<PathBuf>,
    /// Vendor public keys whose bundle signatures are accepted.
    pub trusted_keys: TrustedKeys,
    /// How long a signed manifest stays valid.
    pub manifest_ttl: Duration,
    /// Longest long-poll the server holds open.
    pub long_poll_max: Duration,
    /// Interval the server asks agents to heartbeat at.
    pub heartbeat_interval: Duration,
    /// An agent seen within this window counts as online.
    pub online_window: Duration,
    /// Mark session cookies `Secure` (set when served over HTTPS; implied by `tls`).
    pub secure_cookies: bool,
    /// Serve HTTPS with this PEM certificate chain and PEM private key; plain HTTP if `None`
    /// (then put a TLS-terminating proxy in front).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Config {
    /// Defaults with the given data directory, listening on 127.0.0.1:8440.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8440)),
            data_dir,
            database_url: None,
            server_key_file: None,
            trusted_keys: TrustedKeys::new(),
            manifest_ttl: Duration::from_secs(24 * 3600),
            long_poll_max: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(300),
            online_window: Duration::from_secs(900),
            secure_cookies: false,
            tls: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("server key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: stitch_format::FormatError,
    },
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds.
pub struct Inner {
    pub store: Store,
    pub config: Config,
    pub server_key: SecretKey,
    pub metrics: metrics::Metrics,
    /// `last_seen` of heartbeats that changed nothing else, written in batches.
    pending_seen: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// Failed dashboard sign-ins per user name.
    pub login_throttle: auth::LoginThrottle,
}

impl Inner {
    /// Queues `last_seen = now` for an agent (write-behind, see [`Inner::flush_seen`]).
    pub fn seen_later(&self, agent_id: &str, now: i64) {
        let mut m = self.pending_seen.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(agent_id.to_string(), now);
    }

    /// Writes queued `last_seen` values in one transaction.
    pub async fn flush_seen(&self) {
        let batch: Vec<(String, i64)> = {
            let mut m = self.pending_seen.lock().unwrap_or_else(|e| e.into_inner());
            m.drain().collect()
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_agents(&batch).await {
            tracing::warn!(error = %e, agents = batch.len(), "writing last_seen failed; retrying");
            let mut m = self.pending_seen.lock().unwrap_or_else(|e| e.into_inner());
            for (id, ts) in batch {
                let v = m.entry(id).or_insert(ts);
                *v = (*v).max(ts);
            }
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the server key, creating it (mode 0600) on first start.
pub fn load_or_create_server_key(path: &Path) -> Result<SecretKey, StartError> {
    match std::fs::read_to_string(path) {
        Ok(text) => SecretKey::from_line(&text).map_err(|source| StartError::Key {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::from_seed(auth::random_seed());
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err(path))?;
            f.write_all(format!("{}\n", key.to_line()).as_bytes())
                .map_err(io_err(path))?;
            Ok(key)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Opens the configured storage.
pub async fn open_store(config: &Config) -> Result<Store, StartError> {
    match &config.database_url {
        Some(url) => Ok(Store::open_postgres(url).await?),
        None => {
            std::fs::create_dir_all(&config.data_dir).map_err(io_err(&config.data_dir))?;
            Ok(Store::open_sqlite(&config.data_dir.join("stitch.db")).await?)
        }
    }
}

/// A running server.
pub struct ServerHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The server's storage, for in-process administration (e.g. [`bootstrap`]).
    pub store: Store,
    /// The manifest-signing public key agents should pin.
    pub server_public_key: stitch_format::PublicKey,
    /// Whether it serves HTTPS.
    pub tls: bool,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ServerHandle {
    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
    /// Waits until the server stops on its own (it only does on an I/O error).
    pub async fn wait(mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Starts the server on the current Tokio runtime and returns once it is listening.
pub async fn run(config: Config) -> Result<ServerHandle, StartError> {
    let store = open_store(&config).await?;
    run_with_store(config, store).await
}

/// Like [`run`] with an already opened store.
pub async fn run_with_store(mut config: Config, store: Store) -> Result<ServerHandle, StartError> {
    // Certificate problems are start-up errors, before anything listens.
    let acceptor = match &config.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    config.secure_cookies |= acceptor.is_some();
    let key_path = config
        .server_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("server.key"));
    if let Some(dir) = key_path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let server_key = load_or_create_server_key(&key_path)?;
    let server_public_key = server_key.public();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(io_err(Path::new("listen")))?;
    let addr = listener.local_addr().map_err(io_err(Path::new("listen")))?;
    let state = AppState(Arc::new(Inner {
        store: store.clone(),
        config,
        server_key,
        metrics: metrics::Metrics::default(),
        pending_seen: Default::default(),
        login_throttle: Default::default(),
    }));
    let app = api::router(state.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let flusher = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEEN_FLUSH_INTERVAL);
            loop {
                tick.tick().await;
                state.flush_seen().await;
            }
        })
    };
    let tls = acceptor.is_some();
    let task = tokio::spawn(async move {
        let r = match acceptor {
            Some(acceptor) => tls::serve(listener, acceptor, app, rx).await,
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
            }
        };
        flusher.abort();
        state.flush_seen().await;
        r
    });
    tracing::info!(%addr, tls, backend = store.backend_name(), "stitch-server listening");
    Ok(ServerHandle {
        addr,
        store,
        server_public_key,
        tls,
        shutdown: Some(tx),
        task,
    })
}

/// What [`bootstrap`] sets up.
#[derive(Debug, Clone)]
pub struct BootstrapSpec {
    /// Organisation name (reused if it exists).
    pub org: String,
    /// Plan for a newly created organisation.
    pub plan: Plan,
    /// Owner account to create (username, password); skipped if the username exists.
    pub admin: Option<(String, String)>,
}

/// Fresh credentials minted by [`bootstrap`].
#[derive(Debug, Clone)]
pub struct BootstrapOutput {
    pub org_id: i64,
    /// Enrolls agents into the org's default group.
    pub enrollment_token: String,
    /// Admin-role API token (catalog uploads, policies).
    pub api_token: String,
}

/// Creates (or reuses) an organisation and an owner, and mints an enrollment token and an
/// admin API token. Non-interactive, for demo scripts and tests.
pub async fn bootstrap(store: &Store, spec: &BootstrapSpec) -> Result<BootstrapOutput, StartError> {
    let now = now();
    let org_id = match store.org_by_name(&spec.org).await? {
        Some(o) => o.id,
        None => store.create_org(&spec.org, spec.plan, now).await?,
    };
    if let Some((user, pass)) = &spec.admin {
        if user.is_empty() || pass.len() < 8 {
            return Err(StartError::Bootstrap(
                "admin needs a user name and a password of at least 8 characters".into(),
            ));
        }
        store
            .create_user(org_id, user, &auth::hash_password(pass), Role::Owner, now)
            .await?;
    }
    let group = store.default_group(org_id).await?;
    let enrollment_token = auth::new_token(auth::ENROLL_TOKEN_PREFIX);
    store
        .create_enrollment_token(
            org_id,
            group.id,
            "bootstrap",
            &auth::token_hash(&enrollment_token),
            &enrollment_token[..12],
            now,
        )
        .await?;
    let api_token = auth::new_token(auth::API_TOKEN_PREFIX);
    store
        .create_api_token(
            org_id,
            "bootstrap",
            Role::Admin,
            &auth::token_hash(&api_token),
            now,
        )
        .await?;
    Ok(BootstrapOutput {
        org_id,
        enrollment_token,
        api_token,
    })
}

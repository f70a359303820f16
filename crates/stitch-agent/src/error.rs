//! The agent's error type: every variant carries its context and a stable [`code`](AgentError::code)
//! that is reported to the server (`patch_failed{code}`) and printed by `stitch agent`.

use std::path::PathBuf;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the local disk is full: {what}")]
    DiskFull { what: String },
    #[error("bundle {content_address}: {source}")]
    Bundle {
        content_address: String,
        #[source]
        source: stitch_format::FormatError,
    },
    #[error("bundle {content_address}: the downloaded bytes hash to {found}")]
    ContentAddressMismatch {
        content_address: String,
        found: String,
    },
    #[error("bundle {content_address}: not in the local store ({path})")]
    BundleMissing {
        content_address: String,
        path: PathBuf,
    },
    #[error("manifest refused: {reason}")]
    Manifest { code: &'static str, reason: String },
    #[error("server {url}: HTTP {status} {code}: {message}")]
    Server {
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("not enrolled: {reason}")]
    NotEnrolled { reason: String },
    #[error(transparent)]
    Engine(#[from] stitch_engine::EngineError),
    #[error("no installed patch {id}")]
    UnknownPatch { id: String },
    #[error("control socket: {reason}")]
    Control { code: &'static str, reason: String },
}

impl AgentError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Config { .. } => "agent.config",
            AgentError::Io { .. } => "agent.io",
            AgentError::Db { .. } => "agent.store_db",
            AgentError::DiskFull { .. } => "agent.disk_full",
            AgentError::Bundle { source, .. } => source.code(),
            AgentError::ContentAddressMismatch { .. } => "agent.content_address_mismatch",
            AgentError::BundleMissing { .. } => "agent.bundle_missing",
            AgentError::Manifest { code, .. } => code,
            AgentError::Server { .. } => "agent.server_error",
            AgentError::Network { .. } => "agent.network",
            AgentError::NotEnrolled { .. } => "agent.not_enrolled",
            AgentError::Engine(e) => e.code(),
            AgentError::UnknownPatch { .. } => "agent.unknown_patch",
            AgentError::Control { code, .. } => code,
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| {
            if source.raw_os_error() == Some(28) {
                AgentError::DiskFull {
                    what: format!("{op} {}", path.display()),
                }
            } else {
                AgentError::Io { op, path, source }
            }
        }
    }

    pub(crate) fn db(path: impl Into<PathBuf>) -> impl FnOnce(rusqlite::Error) -> Self {
        let path = path.into();
        move |source| {
            if let rusqlite::Error::SqliteFailure(e, _) = &source
                && e.code == rusqlite::ErrorCode::DiskFull
            {
                return AgentError::DiskFull {
                    what: format!("state database {}", path.display()),
                };
            }
            AgentError::Db { path, source }
        }
    }
}

/// Result with [`AgentError`].
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

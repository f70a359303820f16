//! Errors of the hook, each with a stable code.

/// Why the hook could not start.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Nothing to hook.
    #[error("no bundles given")]
    NoBundles,
    /// A syscall failed (fanotify needs CAP_SYS_ADMIN; inotify limits).
    #[error(transparent)]
    Sys(#[from] stitch_sys::SysError),
    /// A thread could not be started.
    #[error("spawning a hook thread")]
    Spawn(#[source] std::io::Error),
}

impl HookError {
    /// Stable code for reports.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            HookError::NoBundles => "hook.no_bundles",
            HookError::Sys(e) => e.code(),
            HookError::Spawn(_) => "hook.spawn",
        }
    }
}

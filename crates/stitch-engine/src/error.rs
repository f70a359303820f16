use stitch_sys::SysError;

/// Why the engine refused or failed. Every variant has a stable [`code`](Self::code); in
/// every case the target process was left running and unchanged (or, after a partial write,
/// restored).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("process {pid} does not map the target module (sha256 {sha256})")]
    ModuleNotMapped { pid: i32, sha256: String },
    #[error(
        "module {path} in process {pid} is not the target: build-id {found}, patch expects {expected}"
    )]
    BuildIdMismatch {
        pid: i32,
        path: String,
        expected: String,
        found: String,
    },
    #[error("module {path} in process {pid}: {reason}")]
    ModuleLayout {
        pid: i32,
        path: String,
        reason: String,
    },
    #[error(
        "process {pid}: unexpected bytes at {addr:#x} (patchlet {patchlet}): expected {expected}, found {found}"
    )]
    UnexpectedBytes {
        pid: i32,
        patchlet: String,
        addr: u64,
        expected: String,
        found: String,
    },
    #[error("process {pid} already carries {id} r{revision}")]
    AlreadyApplied { pid: i32, id: String, revision: u32 },
    #[error("process {pid} does not carry patch {id}")]
    NotApplied { pid: i32, id: String },
    #[error(
        "process {pid}: thread {tid} stayed inside a site ({ip:#x} in {site:#x}..{end:#x}{}) after {tries} tries",
        if *on_stack { ", a saved context or return address on its stack" } else { "" }
    )]
    ThreadInSite {
        pid: i32,
        tid: i32,
        ip: u64,
        site: u64,
        end: u64,
        /// Found as a word on the thread's stack rather than its instruction pointer.
        on_stack: bool,
        tries: u32,
    },
    #[error("process {pid}: import {module}!{symbol} is not loaded")]
    ImportNotFound {
        pid: i32,
        module: String,
        symbol: String,
    },
    #[error("process {pid}: no free address range within +-2 GiB of the module at {near:#x}")]
    NoFreeRange { pid: i32, near: u64 },
    #[error("linking patchlet {patchlet}: {source}")]
    Link {
        patchlet: String,
        source: stitch_x86::X86Error,
    },
    #[error("Stitch region is corrupt: {reason}")]
    RegionCorrupt { reason: String },
    #[error("Stitch region has layout version {found}, this build reads version 1")]
    RegionVersion { found: u32 },
    #[error("Stitch region of the module is full: {reason}")]
    RegionFull { reason: String },
    #[error("process {pid}: site {addr:#x} was changed by someone else; refusing to touch it")]
    SiteModified { pid: i32, addr: u64 },
    #[error("patch id {id:?} is longer than the {max} bytes a region record holds")]
    IdTooLong { id: String, max: usize },
}

impl EngineError {
    /// Stable machine-readable code (for `stitch-sys` errors, theirs).
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Sys(e) => e.code(),
            EngineError::Io { .. } => "engine.io",
            EngineError::ModuleNotMapped { .. } => "engine.module_not_mapped",
            EngineError::BuildIdMismatch { .. } => "engine.buildid_mismatch",
            EngineError::ModuleLayout { .. } => "engine.module_layout",
            EngineError::UnexpectedBytes { .. } => "engine.unexpected_bytes",
            EngineError::AlreadyApplied { .. } => "engine.already_applied",
            EngineError::NotApplied { .. } => "engine.not_applied",
            EngineError::ThreadInSite { .. } => "engine.thread_in_site",
            EngineError::ImportNotFound { .. } => "engine.import_not_found",
            EngineError::NoFreeRange { .. } => "engine.no_free_range",
            EngineError::Link { .. } => "engine.link_failed",
            EngineError::RegionCorrupt { .. } => "engine.region_corrupt",
            EngineError::RegionVersion { .. } => "engine.region_version",
            EngineError::RegionFull { .. } => "engine.region_full",
            EngineError::SiteModified { .. } => "engine.site_modified",
            EngineError::IdTooLong { .. } => "engine.id_too_long",
        }
    }
}

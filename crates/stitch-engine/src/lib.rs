//! The engine: put a verified micropatch into a live x86-64 process and take it out again,
//! without stopping its service and with no chance of crashing it.
//!
//! Flow: [`Engine::plan`] finds the target module in the process (by the SHA-256 of the
//! *mapped inode*, read through `/proc/PID/map_files`), checks identity, resolves imports and
//! lays out trampolines — plain data that `stitch apply --dry-run` prints. [`Engine::apply`]
//! then stops every thread, re-verifies everything in memory, writes trampolines and the
//! patch record into the module's Stitch region, waits until no thread is about to execute
//! a byte being replaced, writes every site jump (one write when the sites are close), reads
//! them back, marks the record applied and lets the process go. [`Engine::revert`] is the
//! mirror image. [`Engine::list`] reads what a process carries, and the hit counters, without
//! stopping it.
//!
//! Invariants:
//! - Nothing is written to a process unless every thread is held (a `StoppedProcess` token
//!   from `stitch-sys`), the module identity and the exact original bytes at every site
//!   were checked in memory, and no thread will resume inside replaced bytes.
//! - All patchlets of a patch land, or none does: a failure after the first site write
//!   restores every site written so far before returning.
//! - The target is never killed; every refusal is an [`EngineError`] with a stable code.
//! - This crate has no `unsafe`; all syscalls go through `stitch-sys`.
#![forbid(unsafe_code)]

mod apply;
mod error;
mod identify;
mod plan;
pub mod region;

pub use apply::{AppliedPatch, ApplyReport, RevertReport};
pub use error::EngineError;
pub use identify::{DigestCache, FileKey, MappedModule};
pub use plan::{Plan, PlannedSite, RegionPlan};

use std::time::Duration;

/// Tunables of the stop-the-world window.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long stopping every thread may take.
    pub stop_timeout: Duration,
    /// How many times a thread found inside a site is allowed to run on before giving up.
    pub max_site_retries: u32,
    /// How long such a thread runs each time.
    pub site_retry_run: Duration,
    /// Raise the patcher to SCHED_FIFO during the window (shorter pauses on a busy host).
    pub realtime: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stop_timeout: Duration::from_secs(2),
            max_site_retries: 20,
            site_retry_run: Duration::from_micros(500),
            realtime: true,
        }
    }
}

/// The engine: options plus a cache of module digests shared by every process it looks at.
#[derive(Debug, Default)]
pub struct Engine {
    pub options: Options,
    pub digests: DigestCache,
}

impl Engine {
    /// An engine with default options.
    pub fn new() -> Self {
        Self::default()
    }
}

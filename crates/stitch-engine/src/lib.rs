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
pub mod fanout;
mod identify;
mod plan;
pub mod region;

pub use apply::{AppliedPatch, ApplyReport, RevertReport};
pub use error::EngineError;
pub use identify::{DigestCache, FileKey, KnownMapping, MappedModule, may_hold_region};
pub use plan::{Plan, PlannedSite, RegionPlan};

use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Test hook: when this environment variable names one of [`KILL_POINTS`], the process that
/// runs the engine sends itself SIGKILL at that step of an apply or revert. Compiled in
/// always, inert unless set; it exists so tests can prove that a patcher killed at any step
/// leaves its target alive and either fully patched or untouched.
pub const KILL_AT_ENV: &str = "STITCH_TEST_KILL_AT";

/// The steps [`KILL_AT_ENV`] can name, in the order an apply (then a revert) reaches them.
pub const KILL_POINTS: &[&str] = &[
    "stopped",
    "threads_clear",
    "region_mapped",
    "trampolines_written",
    "record_written",
    "sites_written",
    "marked_applied",
    "revert_sites_restored",
];

/// SIGKILLs this process if [`KILL_AT_ENV`] names `step` (read once).
pub(crate) fn kill_point(step: &'static str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(KILL_AT_ENV).ok());
    if at.as_deref() == Some(step) {
        tracing::warn!(step, "{KILL_AT_ENV}: killing this process");
        let me = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &me])
            .status();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Tunables of the stop-the-world window.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long stopping every thread may take.
    pub stop_timeout: Duration,
    /// How many times, within one stop, a thread found inside a site is allowed to run on
    /// before the stop is given up.
    pub max_site_retries: u32,
    /// How many stops an apply or revert may take when a thread stays inside a site: between
    /// two, the process runs freely for a few milliseconds (a thread whose signal handler is
    /// re-entered faster than a tracer can hand signals over only gets out untraced).
    pub max_stops: u32,
    /// How long such a thread runs the first time; each retry doubles it, up to 16 times.
    pub site_retry_run: Duration,
    /// Raise the patcher to SCHED_FIFO during the window (shorter pauses on a busy host).
    pub realtime: bool,
    /// Keep a region whose last patch was reverted mapped (empty, all records `reverted`)
    /// so the next apply to that module reuses it instead of mapping a new one: one
    /// injected syscall less per revert and two or three less per apply. The freeing rule
    /// is unchanged — a region is only ever unmapped when nothing uses it — and a kept
    /// region is started afresh by the next apply once nothing uses it. `false`: unmap it
    /// at revert when nothing uses it (as before).
    pub keep_idle_regions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stop_timeout: Duration::from_secs(2),
            max_site_retries: 10,
            max_stops: 5,
            site_retry_run: Duration::from_micros(500),
            realtime: true,
            keep_idle_regions: true,
        }
    }
}

/// The engine: options plus a cache of module digests shared by every process it looks at.
#[derive(Debug, Default)]
pub struct Engine {
    pub options: Options,
    pub digests: DigestCache,
    /// Set once the kernel refused `PR_SET_VMA_ANON_NAME` (no `CONFIG_ANON_VMA_NAME`): the
    /// engine stops asking, saving one injected syscall per region it maps.
    anon_name_unsupported: AtomicBool,
    /// The buffer stack scans read into, kept between stops.
    scratch: apply::Scratch,
}

impl Engine {
    /// An engine with default options.
    pub fn new() -> Self {
        Self::default()
    }
}

//! # stitch-hook — load-time patching
//!
//! Every new process and every newly loaded library that is a patch target is patched before
//! its first instruction runs, and nobody notices.
//!
//! ## Mechanism (details and measurements: `docs/load-time.md`)
//! 1. **Find the targets on disk.** Walk the directories that hold targets (standard lib/bin
//!    directories plus configured ones); files of a target's exact size are hashed; an inode
//!    whose SHA-256 is a target gets a fanotify inode mark (group `FAN_CLASS_PRE_CONTENT |
//!    FAN_REPORT_TID`): a library, where the kernel and filesystem allow it, for
//!    `FAN_PRE_ACCESS | FAN_OPEN_EXEC_PERM` (its reads and mappings); anything else for
//!    `FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM`. The mark is put through the descriptor that was
//!    hashed, so it lands on exactly that inode.
//! 2. **Follow the files.** inotify on those directories: a file that appears (created, moved
//!    in, rewritten) with a target hash is marked; a marked inode whose path now names another
//!    file, or whose content changed, is unmarked.
//! 3. **Hold.** A thread raising an event on a marked file blocks in the kernel until we
//!    answer. One reader per CPU answers at once what needs no hold; otherwise a worker on the
//!    same CPU `PTRACE_SEIZE`s + `PTRACE_INTERRUPT`s the thread, answers `FAN_ALLOW`, and:
//!    - a library's `mmap` of its code (`FAN_PRE_ACCESS` at an executable segment's offset):
//!      the thread stops once, right after that `mmap`; every thread of the process is
//!      stopped, the engine commits, all are let go — before the dynamic loader ran a single
//!      relocation or constructor of the module;
//!    - a library's open (where mapping events are refused): syscall stops until the exit of
//!      the `mmap(PROT_EXEC)` of that descriptor, then the same commit;
//!    - an executable (`FAN_OPEN_EXEC_PERM`): `PTRACE_EVENT_EXEC`, commit, let go.
//!
//!    A group stop (Ctrl-Z) during the hold is kept with `PTRACE_LISTEN`, so the shell's job
//!    control sees exactly what it would see without us.
//! 4. **Fail open.** Every hold is bounded; events that wait too long are allowed unheld. If the
//!    hook dies, the kernel answers pending events with `FAN_ALLOW` and detaches every tracee.
//!    A miss is reported ([`HookEvent::Missed`]) with its reason, and optionally live-patched at
//!    once with the engine ([`HookConfig::live_patch_misses`]).
//!
//! ## Never deadlocking ourselves
//! A marked file opened by the hook's own process raises a permission event too, and only we
//! can answer it. So: (a) the *reader* threads answer every event whose thread belongs to our
//! own process at once, before anything else, and does no file I/O of its own on marked files;
//! (b) every other open of a marked file by us (hashing, the engine reading
//! `/proc/PID/map_files`) happens on other threads, which the reader answers; (c) if the reader
//! thread ever stops, the group's descriptor is closed and the kernel allows everything.
//! Further: duplicate events (an exec raises `FAN_OPEN_EXEC_PERM` then `FAN_OPEN_PERM`; a held
//! thread opening the file again) are answered at once for threads we already hold; kernels
//! before 6.8 open an executable for exec under `cred_guard_mutex`, which `PTRACE_SEIZE` also
//! takes — there exec opens are allowed unheld and the process is live-patched right after
//! (see [`ExecHolds`]).
//!
//! This crate has no `unsafe`; all syscalls go through `stitch-sys`.
#![forbid(unsafe_code)]

mod error;
mod hold;
mod kernel;
mod proc;
mod targets;
mod watch;

pub use error::HookError;
pub use kernel::{KernelVersion, exec_holds_are_safe};
pub use targets::{BundleUpdate, STANDARD_DIRS};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use stitch_format::VerifiedBundle;
use stitch_sys::Pid;

/// Test hook: `STITCH_TEST_HOLD_PAUSE=<point>:<ms>` makes every hold wait that long at that
/// point, so a test can act (press Ctrl-Z, kill the hook) inside a hold that otherwise lasts
/// a few hundred microseconds. Points: `before_seize` (any hold: the thread still blocked in
/// the kernel, its event unanswered) and `stopped` (a mapping hold: the thread in our stop
/// right after its `mmap`, before the commit). Read once at [`Hook::start`]; inert unless set.
pub const HOLD_PAUSE_ENV: &str = "STITCH_TEST_HOLD_PAUSE";

/// Where a hold pauses under [`HOLD_PAUSE_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PausePoint {
    BeforeSeize,
    Stopped,
}

/// Parses [`HOLD_PAUSE_ENV`]'s value (`None` for anything malformed: a typo must not pause
/// holds somewhere unexpected).
pub(crate) fn parse_hold_pause(v: &str) -> Option<(PausePoint, Duration)> {
    let (point, ms) = v.split_once(':')?;
    let point = match point {
        "before_seize" => PausePoint::BeforeSeize,
        "stopped" => PausePoint::Stopped,
        _ => return None,
    };
    Some((point, Duration::from_millis(ms.parse().ok()?)))
}

/// At most this many CPU lanes (reader + workers pinned to one CPU); a host with more CPUs
/// has events raised on the others picked up by a lane's reader across CPUs.
const MAX_LANES: usize = 16;

/// Whether executables are held at exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecHolds {
    /// Hold on kernels >= 6.8 (exec opens outside `cred_guard_mutex`), else fall back.
    #[default]
    Auto,
    /// Never hold an exec: allow it and live-patch right after (the < 6.8 fallback).
    Never,
}

/// Tunables of the hook.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Scan and watch [`STANDARD_DIRS`] (non-recursively).
    pub standard_dirs: bool,
    /// More directories to scan and watch, recursively down to `depth`.
    pub dirs: Vec<PathBuf>,
    /// Recursion depth for `dirs` (0: only files directly inside).
    pub depth: usize,
    /// How long one hold may take, from the event to letting go.
    pub hold_timeout: Duration,
    /// How long an event may wait for a free worker before it is allowed unheld.
    pub queue_timeout: Duration,
    /// At most this many syscalls are followed in one hold.
    pub max_syscalls: u32,
    /// Hold workers per CPU lane (each CPU's reader hands its holds to its own workers).
    pub workers: usize,
    /// SCHED_FIFO for the reader thread (events are picked up at once on a busy host).
    pub realtime: bool,
    /// SCHED_FIFO for workers during holds too. Off by default: measured slower
    /// (`docs/load-time.md`, section 5): a FIFO worker takes its CPU back the moment each
    /// wait for a ptrace stop ends, and under load the target then waits behind other work.
    pub realtime_holds: bool,
    /// Exec holds policy.
    pub exec_holds: ExecHolds,
    /// Live-patch a process right after a miss (with the engine), and report the outcome.
    pub live_patch_misses: bool,
    /// Hold a library at its executable `mmap` rather than at its open: the kernel reports
    /// the mapping itself (`FAN_PRE_ACCESS`, Linux 6.14+, on filesystems that allow it), so
    /// the thread is stopped once, right after that `mmap`, instead of at every syscall from
    /// the open on. Per file, where the mark is refused, the open hold is used. Only with
    /// exec holds (a thread in exec must never be seized at a mapping).
    pub watch_mappings: bool,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            standard_dirs: true,
            dirs: Vec::new(),
            depth: 3,
            hold_timeout: Duration::from_millis(250),
            queue_timeout: Duration::from_millis(100),
            max_syscalls: 4096,
            // Two: an open hold may last as long as a thread keeps a target open (a sibling
            // reading it), and a load on the same CPU meanwhile needs a worker of its own.
            workers: 2,
            realtime: true,
            realtime_holds: false,
            exec_holds: ExecHolds::Auto,
            live_patch_misses: true,
            watch_mappings: true,
        }
    }
}

/// How the module came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadKind {
    /// An executable, at exec.
    Exec,
    /// A library (start-up link or dlopen), at its executable mapping.
    Library,
}

/// Why a load went unpatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissReason {
    /// Another tracer (a debugger, strace) holds the thread.
    AlreadyTraced { tracer: i32 },
    /// `PTRACE_SEIZE` failed otherwise.
    SeizeFailed(String),
    /// The hold took longer than [`HookConfig::hold_timeout`].
    HoldTimeout,
    /// An exec opened the file as an interpreter (a `#!` script's, or a program's ELF
    /// interpreter) while holding `cred_guard_mutex`, which seizing its thread waits for: the
    /// open was allowed unheld after a few milliseconds, and the process is live-patched
    /// once its exec is done.
    SeizeBlocked,
    /// The event waited longer than [`HookConfig::queue_timeout`] for a worker.
    QueueTimeout,
    /// More than [`HookConfig::max_syscalls`] syscalls without a patchable mapping.
    TooManySyscalls,
    /// The process stayed group-stopped (Ctrl-Z) past the hold bound; let go still stopped.
    GroupStopped,
    /// An exec on a kernel where holding it could deadlock (< 6.8), or exec holds disabled.
    ExecNotHeld,
    /// Another thread of the process was being held for another load that was itself
    /// waiting for this hold to end: this one gave way (its load goes on unpatched).
    OtherThreadHeld,
    /// The engine refused or failed (stable code and message).
    Engine { code: String, message: String },
    /// Following the thread failed.
    Trace(String),
}

/// Why a load of a marked file needed no patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Opened for writing: not a load.
    OpenedForWriting,
    /// Closed (or never mapped executable): read, not loaded (`cat`, `sha256sum`, backups).
    NotMappedExecutable,
    /// The open failed.
    OpenFailed,
    /// The thread or process exited during the hold.
    Exited,
    /// The bundles changed ([`Hook::set_bundles`]) between the event and the hold: none of
    /// this file's bundles is hooked any more.
    NoLongerTarget,
    /// The exec failed or the thread exec'd something else.
    ExecElsewhere,
}

/// Where loads of a marked file are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldAt {
    /// Right after the `mmap` of its code (a library, where mapping events exist).
    Mapping,
    /// At its open (or exec), followed to the mapping.
    Open,
}

impl HeldAt {
    /// Lowercase name for output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mapping => "mapping",
            Self::Open => "open",
        }
    }
}

/// What the hook did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEvent {
    /// An inode got a mark (at start or when a file with a target hash appeared).
    Marked {
        path: PathBuf,
        dev: u64,
        ino: u64,
        patches: Vec<String>,
        /// Where a load of it is held: at the `mmap` of its code (`FAN_PRE_ACCESS`), or at
        /// its open (executables, and filesystems without mapping events).
        held_at: HeldAt,
    },
    /// A mark was removed (file replaced or changed).
    Unmarked { path: PathBuf, dev: u64, ino: u64 },
    /// A module was patched before it ran.
    Patched {
        pid: Pid,
        patch: String,
        module: PathBuf,
        kind: LoadKind,
        /// From reading the event to letting the process go.
        latency: Duration,
        /// Syscalls followed.
        syscalls: u32,
    },
    /// A load went unpatched.
    Missed {
        pid: Pid,
        module: PathBuf,
        patches: Vec<String>,
        reason: MissReason,
    },
    /// After a miss: the live patch with the engine (`Ok`: applied; `Err`: engine code+message).
    LivePatched {
        pid: Pid,
        patch: String,
        result: Result<(), String>,
    },
    /// A marked file was opened but not loaded.
    Skipped {
        pid: Pid,
        module: PathBuf,
        reason: SkipReason,
    },
}

/// The running hook. Dropping it (or [`Hook::stop`]) stops every thread; pending events are
/// allowed by the kernel when the group closes.
///
/// Idle, its threads sleep without timeout (the reader and the directory watch in `poll`, the
/// workers on their queue): no periodic wakeup.
pub struct Hook {
    /// Wakes the directory watcher on stop.
    stop: Arc<stitch_sys::Waker>,
    /// Each lane's queue, once per worker of the lane (to hand each a [`hold::Work::Stop`]).
    jobs: Vec<Arc<hold::JobQueue>>,
    /// Workers and the directory watcher.
    threads: Vec<JoinHandle<()>>,
    /// Stops the fanotify reader — only after every worker has finished: a worker in the
    /// middle of a hold may still open a marked file (the engine reading map_files), and
    /// the reader is the only one who answers that permission event.
    reader_stop: Arc<stitch_sys::Waker>,
    readers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// The directory watch (shared with its thread, for [`Hook::rescan`]).
    watch: Option<Arc<watch::Watch>>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// State shared by the threads.
pub(crate) struct Shared {
    pub(crate) config: HookConfig,
    /// The CPUs the hook's process may run on (empty when unknown): an exec hold's worker
    /// may move to any of them.
    pub(crate) cpus: Vec<usize>,
    /// [`HOLD_PAUSE_ENV`], if set.
    pub(crate) test_pause: Option<(PausePoint, Duration)>,
    pub(crate) group: stitch_sys::PermissionGroup,
    pub(crate) targets: targets::Targets,
    pub(crate) engine: stitch_engine::Engine,
    pub(crate) events: Mutex<Sender<HookEvent>>,
    /// Threads (tids) currently held by a worker: their further events are allowed at once.
    pub(crate) held: Mutex<std::collections::HashSet<i32>>,
    /// Threads whose exec open the reader allowed because their seize blocked
    /// (`MissReason::SeizeBlocked`): the rest of that exec (the interpreter's other open
    /// event, the kernel's reads and mappings) raises events a seize would block on too, so
    /// they are answered at once until the blocked seize returns — the exec is over then.
    pub(crate) exec_blocked: Mutex<std::collections::HashSet<i32>>,
    pub(crate) exec_holds: bool,
    /// Set when the hook stops: no new hold starts, every new event is allowed at once.
    pub(crate) stopping: AtomicBool,
    /// Read-held by a worker for a whole hold; [`Hook::set_bundles`] takes it for writing once
    /// to wait for the holds that started with the old bundles.
    pub(crate) bundle_gate: RwLock<()>,
    /// Holds in progress per process (see `hold::wait_for_siblings`).
    pub(crate) pid_holds: Mutex<std::collections::HashMap<Pid, hold::PidHolds>>,
    pub(crate) pid_holds_cv: std::sync::Condvar,
}

impl Shared {
    pub(crate) fn emit(&self, e: HookEvent) {
        tracing::debug!(event = ?e, "hook");
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send(e);
        }
    }
}

impl Hook {
    /// Starts the hook for `bundles`: creates the fanotify group, starts the reader, the hold
    /// workers and the directory watcher, then scans and marks. Returns once the initial scan is
    /// done and every target found is marked; events arrive on the returned receiver.
    ///
    /// # Errors
    /// [`HookError::NoBundles`], [`HookError::Sys`] (no privilege for fanotify, ...).
    pub fn start(
        bundles: Vec<VerifiedBundle>,
        config: HookConfig,
    ) -> Result<(Hook, Receiver<HookEvent>), HookError> {
        if bundles.is_empty() {
            return Err(HookError::NoBundles);
        }
        // Built now, not inside the first hold (which linked trampolines with them: the first
        // load of a target after a start took ~1.3 ms instead of ~0.4).
        stitch_x86::warm_up();
        let group = stitch_sys::PermissionGroup::new()?;
        let exec_holds = match config.exec_holds {
            ExecHolds::Never => false,
            ExecHolds::Auto => exec_holds_are_safe(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let mut engine = stitch_engine::Engine::new();
        engine.options.stop_timeout = config.hold_timeout.min(Duration::from_millis(100));
        engine.options.realtime = config.realtime_holds;
        // The CPUs this process may run on (empty when unknown): one lane each, up to
        // MAX_LANES (below).
        let cpus = stitch_sys::allowed_cpus().unwrap_or_default();
        let shared = Arc::new(Shared {
            cpus: cpus.clone(),
            test_pause: std::env::var(HOLD_PAUSE_ENV)
                .ok()
                .and_then(|v| parse_hold_pause(&v)),
            targets: targets::Targets::new(bundles, exec_holds, config.watch_mappings),
            config,
            group,
            engine,
            events: Mutex::new(tx),
            held: Mutex::new(std::collections::HashSet::new()),
            exec_blocked: Mutex::new(std::collections::HashSet::new()),
            exec_holds,
            stopping: AtomicBool::new(false),
            bundle_gate: RwLock::new(()),
            pid_holds: Mutex::new(std::collections::HashMap::new()),
            pid_holds_cv: std::sync::Condvar::new(),
        });
        let stop = Arc::new(stitch_sys::Waker::new()?);
        let reader_stop = Arc::new(stitch_sys::Waker::new()?);
        let workers = shared.config.workers.max(1);
        // One lane per CPU (up to MAX_LANES): a reader and its workers pinned to that CPU.
        // Every reader is woken by an event; the one on the CPU of the thread that raised it
        // runs first (that thread just blocked) and takes it, so the answer and the hold's
        // stops stay on that CPU — a wakeup across CPUs costs ~15-30 us in a VM.
        let lanes: Vec<Option<usize>> = if cpus.is_empty() {
            vec![None]
        } else {
            cpus.into_iter().take(MAX_LANES).map(Some).collect()
        };
        // From here on, every thread spawned is stopped again by `hook`'s Drop if a later
        // step fails.
        let mut hook = Hook {
            stop: stop.clone(),
            jobs: Vec::new(),
            threads: Vec::new(),
            reader_stop: reader_stop.clone(),
            readers: Vec::new(),
            shared: shared.clone(),
            watch: None,
        };
        for cpu in lanes {
            let lane = cpu.map_or_else(|| "any".to_string(), |c| c.to_string());
            let queue = Arc::new(hold::JobQueue::default());
            for i in 0..workers {
                let (s, q) = (shared.clone(), queue.clone());
                hook.threads.push(
                    std::thread::Builder::new()
                        .name(format!("stitch-hold-{lane}-{i}"))
                        .spawn(move || hold::worker(&s, &q, cpu))
                        .map_err(HookError::Spawn)?,
                );
                hook.jobs.push(queue.clone());
            }
            let (s, st) = (shared.clone(), reader_stop.clone());
            hook.readers.push(
                std::thread::Builder::new()
                    .name(format!("stitch-fanotify-{lane}"))
                    .spawn(move || hold::reader(&s, &queue, &st, cpu))
                    .map_err(HookError::Spawn)?,
            );
        }
        // The reader runs: from here on our own opens of marked files are answered.
        let watcher = stitch_sys::DirWatch::new()?;
        let dirs = shared.targets.scan_all(&shared, &watcher);
        preload_import_modules(&shared);
        let watch = Arc::new(watch::Watch {
            watcher,
            dirs: Mutex::new(dirs),
        });
        hook.watch = Some(watch.clone());
        {
            let (s, st) = (shared.clone(), stop);
            hook.threads.push(
                std::thread::Builder::new()
                    .name("stitch-dirwatch".into())
                    .spawn(move || watch::run(&s, &watch, &st))
                    .map_err(HookError::Spawn)?,
            );
        }
        Ok((hook, rx))
    }

    /// Paths and patch ids of the inodes marked right now.
    #[must_use]
    pub fn marked(&self) -> Vec<(PathBuf, Vec<String>)> {
        self.shared.targets.marked()
    }

    /// Changes the bundles of the running hook, without restarting it and without a moment in
    /// which a target that stays one is unmarked:
    /// - inodes no bundle targets any more are unmarked ([`HookEvent::Unmarked`]);
    /// - inodes that stay targets keep their mark (no event), with their new bundle list;
    /// - the directories are walked for files of the new targets (only files of a new
    ///   target's size that are not marked yet are hashed) and those found are marked
    ///   ([`HookEvent::Marked`]).
    ///
    /// Returns once that is done *and* every hold that started with the old bundles has
    /// finished (bounded by [`HookConfig::hold_timeout`]): from then on no removed bundle is
    /// applied at load time. A bundle that stays (same id, revision and target) is the same
    /// bundle for holds in flight. An empty list is allowed: the hook then marks nothing and
    /// costs nothing until bundles are set again.
    pub fn set_bundles(&self, bundles: Vec<VerifiedBundle>) -> BundleUpdate {
        let update = self.shared.targets.set_bundles(&self.shared, bundles);
        preload_import_modules(&self.shared);
        drop(self.shared.bundle_gate.write());
        tracing::debug!(?update, "bundles changed");
        update
    }

    /// Re-walks every directory (what a start does), marking new targets; a configured
    /// directory that did not exist at start (or any directory found now) is watched from
    /// here on.
    pub fn rescan(&self) {
        if let Some(w) = &self.watch {
            w.rescan(&self.shared);
        }
    }

    /// Stops every thread and closes the group (the kernel allows whatever is pending).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Workers first, while the reader still answers every permission event (including
        // the ones a worker's own hold raises); then the reader, which allows whatever is
        // still queued on its way out. A worker in a hold finishes it (bounded by
        // `hold_timeout`); idle ones take their `Stop` at once.
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.stop.wake();
        for jobs in self.jobs.drain(..) {
            let _ = jobs.push(hold::Work::Stop);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.reader_stop.wake();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Hands the engine the bytes of every module a bundle imports from, as this process maps
/// it (`/proc/self/map_files`: exactly that inode; on the host that is the file most
/// processes map, a container's own copy is another file and is read at its first hold).
/// Without this the first hold of such a patch after a start read the library — libc, 2 MB —
/// while the program waited (the Pillow patch's p99, ~2.4 ms). A module we do not map is
/// skipped. Runs once the readers answer: a module that is itself a target raises an event
/// on our own open.
fn preload_import_modules(shared: &Shared) {
    let imports = shared.targets.imports();
    if imports.is_empty() {
        return;
    }
    let mut names: Vec<&str> = imports.iter().map(|(m, _)| m.as_str()).collect();
    names.dedup();
    let Ok(maps) = std::fs::read("/proc/self/maps") else {
        return;
    };
    let Ok(entries) = stitch_elf::maps::parse(&maps) else {
        return;
    };
    for name in names {
        let found = entries.iter().find(|e| {
            matches!(&e.path, stitch_elf::maps::MapPath::File { path, deleted: false }
                if path.file_name().is_some_and(|n| n.to_string_lossy() == name))
        });
        let Some(e) = found else { continue };
        let via = format!("/proc/self/map_files/{:x}-{:x}", e.start, e.end);
        match shared.engine.digests.load_file(std::path::Path::new(&via)) {
            // Its exported symbols are looked up here too (libc ~95 us), not in a hold.
            Ok((key, bytes)) => {
                for (_, symbol) in imports.iter().filter(|(m, _)| m == name) {
                    let _ = shared.engine.digests.exported_symbol(key, &bytes, symbol);
                }
            }
            Err(e) => tracing::debug!(module = %name, error = %e, "not preloaded"),
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_pause_knob_parses_only_its_exact_form() {
        assert_eq!(
            parse_hold_pause("stopped:1500"),
            Some((PausePoint::Stopped, Duration::from_millis(1500)))
        );
        assert_eq!(
            parse_hold_pause("before_seize:0"),
            Some((PausePoint::BeforeSeize, Duration::ZERO))
        );
        for bad in [
            "",
            "stopped",
            "stopped:",
            "stopped:x",
            "after:10",
            ":10",
            "stopped:-1",
        ] {
            assert_eq!(parse_hold_pause(bad), None, "{bad:?}");
        }
    }
}

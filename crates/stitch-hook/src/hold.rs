//! The event path: the reader thread (answers what needs no hold, queues the rest) and the
//! hold workers (seize, allow, follow, commit, let go).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use stitch_engine::EngineError;
use stitch_format::VerifiedBundle;
use stitch_sys::{
    HoldStop, PermEvent, Pid, RealtimeGuard, StopKind, SysError, ThreadHold, Tid, Waker,
};

use crate::proc::{blocked_syscall, is_exec, is_own_thread, opened_for_writing, tgid_of};
use crate::{HookEvent, LoadKind, MissReason, Shared, SkipReason};

const SYS_MMAP: u64 = 9;
const SYS_CLOSE: u64 = 3;
const SYS_EXIT: u64 = 60;
const SYS_EXIT_GROUP: u64 = 231;
const PROT_EXEC: u64 = 4;

/// An event waiting for its answer. Whoever takes `event` answers it (exactly once).
struct PendingState {
    event: Option<PermEvent>,
    /// When a worker took the job: the reader's queue bound no longer applies, the hold
    /// bound does (see [`Waiting::bound`]).
    picked: Option<Instant>,
    /// Since when its worker is inside `PTRACE_SEIZE` for an exec open (cleared when the
    /// seize returns): see [`EXEC_SEIZE_BOUND`].
    seizing: Option<Instant>,
    /// The event's descriptor, kept after the answer: the file the thread opened, `fstat`ed
    /// at the `mmap` of it for the engine's key (no open, no event).
    file: Option<std::os::fd::OwnedFd>,
}

pub(crate) struct Pending(Mutex<PendingState>);

impl Pending {
    fn new(event: PermEvent) -> Arc<Self> {
        Arc::new(Self(Mutex::new(PendingState {
            event: Some(event),
            picked: None,
            seizing: None,
            file: None,
        })))
    }

    /// Answers `FAN_ALLOW` if nobody did yet. True if this call answered.
    fn allow(&self, shared: &Shared) -> bool {
        let Ok(mut st) = self.0.lock() else {
            return false;
        };
        match st.event.take() {
            Some(ev) => {
                allow_event(shared, &ev);
                st.file = Some(ev.file);
                true
            }
            None => false,
        }
    }

    /// The engine's key of the file the held thread opened, as of now (`fstat` of the
    /// event's descriptor).
    fn file_key(&self) -> Option<stitch_engine::FileKey> {
        let st = self.0.lock().ok()?;
        let fd = st.file.as_ref()?;
        let s = stitch_sys::fd_stat(std::os::fd::AsFd::as_fd(fd)).ok()?;
        Some(stitch_engine::FileKey {
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            ctime: s.ctime,
            ctime_nsec: s.ctime_nsec,
        })
    }
}

fn allow_event(shared: &Shared, ev: &PermEvent) {
    tracing::trace!(tid = ev.tid.0, mask = ev.mask, range = ?ev.range, "allow");
    if let Err(e) = shared.group.respond(ev, true) {
        tracing::warn!(tid = ev.tid.0, error = %e, "fanotify answer failed");
    }
}

/// What an event held a thread in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// The open of a library (or of an executable without exec holds): follow it syscall
    /// by syscall to the executable mapping.
    Open,
    /// The open of an executable for exec (`FAN_OPEN_EXEC_PERM`): to `PTRACE_EVENT_EXEC`.
    Exec,
    /// A read or mapping starting where a library's executable segment starts
    /// (`FAN_PRE_ACCESS`): one stop, right after that syscall.
    Mapping,
}

/// One event for a marked file, for a worker.
pub(crate) struct Job {
    pending: Arc<Pending>,
    tid: Tid,
    kind: JobKind,
    path: PathBuf,
    bundles: Vec<Arc<VerifiedBundle>>,
    received: Instant,
    /// The CPU of the reader that took the event (the thread that raised it ran there).
    cpu: Option<usize>,
}

struct Waiting {
    pending: Arc<Pending>,
    /// Allowed unheld if no worker took it by then ([`crate::HookConfig::queue_timeout`]).
    deadline: Instant,
    /// Allowed if still unanswered by then although a worker took it
    /// ([`crate::HookConfig::hold_timeout`]): a seize that blocks — a thread inside an exec
    /// holds `cred_guard_mutex`, which `PTRACE_SEIZE` takes — must not hold the load forever.
    hold_deadline: Instant,
    /// An exec open: its worker may spend at most [`EXEC_SEIZE_BOUND`] inside the seize.
    exec: bool,
    tid: Tid,
    path: PathBuf,
    patches: Vec<String>,
}

/// What a worker is handed: a job, or the order to finish.
pub(crate) enum Work {
    Job(Job),
    Stop,
}

/// A lane's queue of jobs for its workers. A push wakes one idle worker and nobody else (a
/// `Mutex<Receiver>` shared by the workers woke the next waiting worker on every job, only
/// for it to block again — a wakeup on the lane's CPU inside the hold).
#[derive(Default)]
pub(crate) struct JobQueue {
    work: Mutex<VecDeque<Work>>,
    ready: Condvar,
}

impl JobQueue {
    /// Queues `work` for one worker. `Err` gives it back when the queue is unusable (a worker
    /// panicked holding its lock): the caller answers the job itself.
    pub(crate) fn push(&self, work: Work) -> Result<(), Work> {
        match self.work.lock() {
            Ok(mut q) => {
                q.push_back(work);
                drop(q);
                self.ready.notify_one();
                Ok(())
            }
            Err(_) => Err(work),
        }
    }

    /// Blocks (no timeout: an idle worker has no periodic wakeup) for the next work; `Stop`
    /// when the queue is unusable.
    fn pop(&self) -> Work {
        let Ok(mut q) = self.work.lock() else {
            return Work::Stop;
        };
        loop {
            if let Some(w) = q.pop_front() {
                return w;
            }
            q = match self.ready.wait(q) {
                Ok(g) => g,
                Err(_) => return Work::Stop,
            };
        }
    }
}

/// The reader: never opens a file, never blocks on anything but the group (and `stop`).
/// Sleeps in `poll` with no timeout while nothing waits for a worker: an idle hook has no
/// periodic wakeup. Returns when `stop` is woken, answering what is still queued.
///
/// Runs pinned to `cpu` (its lane) if given, handing jobs to that lane's workers.
pub(crate) fn reader(shared: &Shared, jobs: &JobQueue, stop: &Waker, cpu: Option<usize>) {
    let _pin = cpu.and_then(|c| stitch_sys::CpuPin::to(c).ok());
    let _rt = shared.config.realtime.then(RealtimeGuard::enter);
    let mut waiting: Vec<Waiting> = Vec::new();
    loop {
        expire_waiting(shared, &mut waiting);
        // Wake for the next queue bound only; nothing waiting: sleep until an event or stop.
        let now = Instant::now();
        let timeout = waiting
            .iter()
            .map(|w| w.next_deadline(now).saturating_duration_since(now))
            .min();
        let (events, woken) = match shared.group.read_events_until(stop, timeout) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "reading fanotify failed");
                std::thread::sleep(Duration::from_millis(10));
                (Vec::new(), stop.is_woken())
            }
        };
        for ev in events {
            let received = Instant::now();
            let tid = ev.tid;
            // Our own opens (hashing, the engine reading map_files) and threads a worker
            // already holds (an exec's second event) are answered at once; so is everything
            // once the hook is stopping (no new hold starts).
            if shared.stopping.load(Ordering::SeqCst)
                || is_own_thread(tid)
                || shared.held.lock().is_ok_and(|h| h.contains(&tid.0))
                || shared.exec_blocked.lock().is_ok_and(|h| h.contains(&tid.0))
            {
                allow_event(shared, &ev);
                continue;
            }
            let target = stitch_sys::fd_inode(std::os::fd::AsFd::as_fd(&ev.file))
                .ok()
                .and_then(|key| shared.targets.lookup(key));
            let Some(target) = target else {
                allow_event(shared, &ev);
                continue;
            };
            let kind = if ev.is_pre_access() {
                // A read or a mapping: held only where a loader maps the code (`cat`,
                // `sha256sum` and the loader's own header read go on at once).
                match ev.range {
                    Some(range) if target.code_maps.iter().any(|c| c.may_map(range)) => {
                        JobKind::Mapping
                    }
                    _ => {
                        allow_event(shared, &ev);
                        continue;
                    }
                }
            } else if ev.is_exec() {
                JobKind::Exec
            } else if !target.code_maps.is_empty() {
                // Its executable mapping raises its own event: the open needs no hold.
                allow_event(shared, &ev);
                continue;
            } else {
                JobKind::Open
            };
            let (path, bundles) = (target.path.clone(), target.bundles.clone());
            let pending = Pending::new(ev);
            waiting.push(Waiting {
                pending: pending.clone(),
                deadline: received + shared.config.queue_timeout,
                hold_deadline: received + shared.config.hold_timeout,
                exec: kind == JobKind::Exec,
                tid,
                path: path.clone(),
                patches: bundles.iter().map(|b| b.patch().id.clone()).collect(),
            });
            let job = Job {
                pending: pending.clone(),
                tid,
                kind,
                path,
                bundles,
                received,
                cpu,
            };
            if jobs.push(Work::Job(job)).is_err() {
                pending.allow(shared);
            }
        }
        if woken {
            break;
        }
    }
    // Leaving: answer whatever is still ours (closing the group would, too).
    for w in waiting {
        w.pending.allow(shared);
    }
}

/// How long a worker may be inside `PTRACE_SEIZE` for an exec open (~5 us normally; time
/// before the call — a worker preempted on a busy host — does not count). An exec that opens
/// a marked file as an *interpreter* — a `#!` script's, or the ELF interpreter of the
/// program — does so holding `cred_guard_mutex`, which `PTRACE_SEIZE` waits for: the seize
/// cannot finish before the event is answered. Nothing tells those opens from a direct exec
/// beforehand without taking that mutex too (`/proc/TID/syscall` does), so the reader answers
/// them after this bound.
const EXEC_SEIZE_BOUND: Duration = Duration::from_millis(3);

impl Waiting {
    /// The bound that applies now, and what passing it is reported as.
    fn bound(&self, st: &PendingState) -> (Instant, MissReason) {
        match (st.picked, st.seizing) {
            (Some(_), Some(at)) => (
                (at + EXEC_SEIZE_BOUND).min(self.hold_deadline),
                MissReason::SeizeBlocked,
            ),
            (Some(_), None) => (self.hold_deadline, MissReason::HoldTimeout),
            (None, _) => (self.deadline, MissReason::QueueTimeout),
        }
    }

    /// When the reader must look at it again. An exec open not yet past its seize is looked
    /// at every [`EXEC_SEIZE_BOUND`]: its worker enters the seize without waking the reader.
    fn next_deadline(&self, now: Instant) -> Instant {
        let Ok(st) = self.pending.0.lock() else {
            return now;
        };
        let (bound, _) = self.bound(&st);
        if self.exec && st.event.is_some() {
            bound.min(now + EXEC_SEIZE_BOUND)
        } else {
            bound
        }
    }
}

/// Drops the entries that were answered; answers (and reports) those that waited past their
/// queue bound for a worker, or past the hold bound in a worker that has not answered yet.
fn expire_waiting(shared: &Shared, waiting: &mut Vec<Waiting>) {
    let now = Instant::now();
    waiting.retain(|w| {
        let Ok(mut st) = w.pending.0.lock() else {
            return false;
        };
        if st.event.is_none() {
            return false;
        }
        let (bound, reason) = w.bound(&st);
        if now < bound {
            return true;
        }
        if let Some(ev) = st.event.take() {
            if matches!(reason, MissReason::SeizeBlocked)
                && let Ok(mut b) = shared.exec_blocked.lock()
            {
                // Before the answer: the exec's next event must find it.
                b.insert(w.tid.0);
            }
            allow_event(shared, &ev);
            shared.emit(HookEvent::Missed {
                pid: tgid_of(w.tid).unwrap_or(Pid(w.tid.0)),
                module: w.path.clone(),
                patches: w.patches.clone(),
                reason,
            });
        }
        false
    });
}

/// A hold worker: blocks on its lane's queue (no periodic wakeup) until [`Work::Stop`].
///
/// Pinned to its lane's CPU (`cpu`) for life: a library hold's stops then hand that CPU back
/// and forth with the held thread (it raised the event there). Pinning per job instead cost a
/// migration inside every hold (~25-45 us here: the worker had last run elsewhere).
pub(crate) fn worker(shared: &Shared, jobs: &JobQueue, cpu: Option<usize>) {
    let _home = cpu.and_then(|c| stitch_sys::CpuPin::to(c).ok());
    loop {
        let mut job = match jobs.pop() {
            Work::Job(j) => j,
            Work::Stop => return,
        };
        if shared.stopping.load(Ordering::SeqCst) {
            // Stopping: no new hold.
            job.pending.allow(shared);
            continue;
        }
        // A bundle change waits for every hold under this gate, and a job queued before the
        // change keeps only the bundles still hooked: once `Hook::set_bundles` returned, no
        // removed bundle is applied any more.
        let _gate = shared.bundle_gate.read();
        job.bundles = shared.targets.current(&job.bundles);
        if job.bundles.is_empty() {
            if job.pending.allow(shared) {
                shared.emit(HookEvent::Skipped {
                    pid: tgid_of(job.tid).unwrap_or(Pid(job.tid.0)),
                    module: job.path.clone(),
                    reason: SkipReason::NoLongerTarget,
                });
            }
            continue;
        }
        {
            let Ok(mut st) = job.pending.0.lock() else {
                continue;
            };
            if st.event.is_none() {
                continue; // the reader's queue bound answered it already
            }
            st.picked = Some(Instant::now());
        }
        handle(shared, &job, Instant::now());
    }
}

/// Thread ids recorded in `Shared::held` (their further events are answered at once). They
/// must be released *before* the thread is let go: otherwise its next open of a target, right
/// after we detach, would be answered as a duplicate and go unheld.
pub(crate) struct HeldTids<'a> {
    shared: &'a Shared,
    tids: Vec<i32>,
}

impl<'a> HeldTids<'a> {
    fn record(shared: &'a Shared, tids: Vec<i32>) -> Self {
        if let Ok(mut h) = shared.held.lock() {
            h.extend(tids.iter().copied());
        }
        Self { shared, tids }
    }

    fn release(&mut self) {
        if let Ok(mut h) = self.shared.held.lock() {
            for t in self.tids.drain(..) {
                h.remove(&t);
            }
        }
    }
}

impl Drop for HeldTids<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Holds in progress in one process, and how many of them wait for the others to end.
#[derive(Debug, Default)]
pub(crate) struct PidHolds {
    active: usize,
    waiting: usize,
}

/// Counts a hold in its process while it lives. Dropped only after the hold's thread was let
/// go (declared before the hold), so a sibling hold waiting for it can then seize that thread.
struct PidHoldGuard<'a> {
    shared: &'a Shared,
    pid: Pid,
}

impl<'a> PidHoldGuard<'a> {
    fn enter(shared: &'a Shared, pid: Pid) -> Self {
        if let Ok(mut m) = shared.pid_holds.lock() {
            m.entry(pid).or_default().active += 1;
        }
        Self { shared, pid }
    }
}

impl Drop for PidHoldGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.pid_holds.lock()
            && let Some(h) = m.get_mut(&self.pid)
        {
            h.active = h.active.saturating_sub(1);
            if h.active == 0 && h.waiting == 0 {
                m.remove(&self.pid);
            }
        }
        self.shared.pid_holds_cv.notify_all();
    }
}

/// Before stopping the whole process for a commit. A sibling thread held by another worker
/// cannot be stopped by us (ptrace allows one tracer per thread): the stop would fail and let
/// our thread go on unpatched. So wait, bounded by `deadline`, until those holds ended (a
/// sibling merely reading a target ends its hold when it closes the file; two dlopens cannot
/// overlap, ld.so serialises them). If a sibling's holder already waits for *us*, give up
/// instead: two holds waiting for each other would both run into their bound.
fn wait_for_siblings(shared: &Shared, pid: Pid, deadline: Instant) -> Result<(), MissReason> {
    let Ok(mut m) = shared.pid_holds.lock() else {
        return Ok(());
    };
    let others = |m: &std::collections::HashMap<Pid, PidHolds>| {
        m.get(&pid).map_or(0, |h| h.active.saturating_sub(1))
    };
    if others(&m) == 0 {
        return Ok(());
    }
    if m.get(&pid).is_some_and(|h| h.waiting > 0) {
        return Err(MissReason::OtherThreadHeld);
    }
    if let Some(h) = m.get_mut(&pid) {
        h.waiting += 1;
    }
    let t0 = Instant::now();
    while others(&m) > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        m = match shared.pid_holds_cv.wait_timeout(m, left) {
            Ok((g, _)) => g,
            Err(_) => return Ok(()),
        };
    }
    if let Some(h) = m.get_mut(&pid) {
        h.waiting -= 1;
    }
    tracing::debug!(
        pid = pid.0,
        waited_us = t0.elapsed().as_micros() as u64,
        "waited for a sibling thread's hold"
    );
    Ok(())
}

/// A held thread whose tids are released before it is detached (field order: `held` drops
/// first, then `hold` detaches).
struct Tracked<'a> {
    held: HeldTids<'a>,
    hold: ThreadHold,
}

impl std::ops::Deref for Tracked<'_> {
    type Target = ThreadHold;
    fn deref(&self) -> &ThreadHold {
        &self.hold
    }
}

impl std::ops::DerefMut for Tracked<'_> {
    fn deref_mut(&mut self) -> &mut ThreadHold {
        &mut self.hold
    }
}

/// What a hold ended with.
enum Outcome {
    Patched {
        patches: Vec<String>,
        syscalls: u32,
        /// When the process was let go (right before the first detach).
        released: Instant,
    },
    Missed(MissReason),
    Skipped(SkipReason),
}

fn engine_miss(e: &EngineError) -> MissReason {
    MissReason::Engine {
        code: e.code().to_string(),
        message: e.to_string(),
    }
}

fn handle(shared: &Shared, job: &Job, picked: Instant) {
    let tid = job.tid;
    let patches: Vec<String> = job.bundles.iter().map(|b| b.patch().id.clone()).collect();
    let Some(pid) = tgid_of(tid) else {
        job.pending.allow(shared);
        return;
    };
    let (exec, writing) = if job.kind == JobKind::Exec {
        (true, false)
    } else if job.kind == JobKind::Mapping || shared.exec_holds {
        // An exec raises FAN_OPEN_EXEC_PERM first, so this is no exec; opened for writing is
        // seen at the first stop, from the registers (no read of /proc/TID/syscall here).
        (false, false)
    } else {
        // Without exec holds an exec raises FAN_OPEN_PERM only, and seizing it could
        // deadlock (kernels < 6.8): look before seizing.
        blocked_syscall(tid).map_or((false, false), |(nr, args)| {
            (is_exec(nr), opened_for_writing(nr, &args))
        })
    };
    if writing {
        job.pending.allow(shared);
        shared.emit(HookEvent::Skipped {
            pid,
            module: job.path.clone(),
            reason: SkipReason::OpenedForWriting,
        });
        return;
    }
    if exec && !shared.exec_holds {
        job.pending.allow(shared);
        miss(shared, job, pid, &patches, MissReason::ExecNotHeld);
        return;
    }
    // A library hold hands the CPU back and forth with its thread at each ptrace stop; with
    // the worker on the CPU the thread runs on, each stop is a switch on that CPU instead of
    // a wakeup of another CPU — idle (slow to wake in a VM) or busy (a wait for its time
    // slice). The worker already runs on its lane's CPU, where the event was raised (see
    // `worker`).
    let _rt = shared.config.realtime_holds.then(RealtimeGuard::enter);
    pause_at(shared, crate::PausePoint::BeforeSeize);
    let checked = Instant::now();
    let seizing = |at: Option<Instant>| {
        if exec && let Ok(mut st) = job.pending.0.lock() {
            st.seizing = at;
        }
    };
    seizing(Some(Instant::now()));
    let seized = ThreadHold::seize(pid, tid);
    seizing(None);
    let hold = match seized {
        Ok(h) => h,
        Err(e) => {
            if !job.pending.allow(shared) {
                // Answered (and reported) by the reader at the seize bound.
                unblock_exec(shared, tid);
                return;
            }
            let reason = match e {
                SysError::AlreadyTraced { tracer, .. } => MissReason::AlreadyTraced { tracer },
                other => MissReason::SeizeFailed(other.to_string()),
            };
            miss(shared, job, pid, &patches, reason);
            return;
        }
    };
    // After an exec the thread carries the pid as its tid.
    let tids = if exec {
        vec![tid.0, pid.0]
    } else {
        vec![tid.0]
    };
    // Declared before the hold: dropped after it let the thread go.
    let in_process = PidHoldGuard::enter(shared, pid);
    let hold = Tracked {
        held: HeldTids::record(shared, tids),
        hold,
    };
    if !job.pending.allow(shared) {
        // The reader answered it at its bound (reported there): the seize blocked — an exec
        // opening the file as an interpreter holds `cred_guard_mutex` — and returned once the
        // exec was done. The thread has moved on: let it go, and patch the process now that
        // its exec is over.
        unblock_exec(shared, tid);
        drop(hold);
        drop(in_process);
        if job.kind == JobKind::Exec && shared.config.live_patch_misses {
            live_patch(shared, pid, &job.bundles);
        }
        return;
    }
    let allowed = Instant::now();
    // No lane CPU (no affinity known): pin to where the thread last ran, after the answer so
    // the move overlaps the end of its syscall.
    let pin = if exec || job.cpu.is_some() {
        None
    } else {
        stitch_sys::last_cpu_of(tid).and_then(|c| stitch_sys::CpuPin::to(c).ok())
    };
    tracing::debug!(
        pid = pid.0,
        queued_and_seized_us = (allowed - job.received).as_micros() as u64,
        queued_us = (picked - job.received).as_micros() as u64,
        proc_reads_us = (checked - picked).as_micros() as u64,
        seize_and_allow_us = (allowed - checked).as_micros() as u64,
        "held"
    );
    let deadline = job.received + shared.config.hold_timeout;
    // An exec found among opens (no exec holds) was let go above: `exec` is the Exec kind.
    let outcome = match job.kind {
        JobKind::Exec => follow_exec(shared, hold, job, deadline),
        JobKind::Mapping => follow_mapping(shared, hold, job, deadline),
        JobKind::Open => follow_library(shared, hold, job, deadline),
    };
    // The thread is let go: a sibling's hold waiting for ours may go on, and reporting (or a
    // live patch after a miss) needs neither the pinned CPU nor the count.
    drop(pin);
    drop(in_process);
    match outcome {
        Outcome::Patched {
            patches,
            syscalls,
            released,
        } => {
            // The hold ends when the process is let go: what the worker does after the
            // detach (it may be preempted by the very thread it woke) is not the target's wait.
            let latency = released.saturating_duration_since(job.received);
            for patch in patches {
                shared.emit(HookEvent::Patched {
                    pid,
                    patch,
                    module: job.path.clone(),
                    kind: if exec {
                        LoadKind::Exec
                    } else {
                        LoadKind::Library
                    },
                    latency,
                    syscalls,
                });
            }
        }
        Outcome::Missed(reason) => miss(shared, job, pid, &patches, reason),
        Outcome::Skipped(reason) => shared.emit(HookEvent::Skipped {
            pid,
            module: job.path.clone(),
            reason,
        }),
    }
}

/// Waits at `point` if [`crate::HOLD_PAUSE_ENV`] asks for it (tests only).
fn pause_at(shared: &Shared, point: crate::PausePoint) {
    if let Some((at, how_long)) = shared.test_pause
        && at == point
    {
        tracing::warn!(
            ?point,
            ?how_long,
            "{}: pausing the hold",
            crate::HOLD_PAUSE_ENV
        );
        std::thread::sleep(how_long);
    }
}

/// The seize of `tid` returned after the reader allowed its event at the seize bound: its
/// exec is over, its events are held again.
fn unblock_exec(shared: &Shared, tid: Tid) {
    if let Ok(mut b) = shared.exec_blocked.lock() {
        b.remove(&tid.0);
    }
}

/// Reports a miss and, if configured and useful, live-patches the process right away.
fn miss(shared: &Shared, job: &Job, pid: Pid, patches: &[String], reason: MissReason) {
    let retry = shared.config.live_patch_misses
        && !matches!(
            reason,
            MissReason::AlreadyTraced { .. }
                | MissReason::GroupStopped
                | MissReason::OtherThreadHeld
        );
    shared.emit(HookEvent::Missed {
        pid,
        module: job.path.clone(),
        patches: patches.to_vec(),
        reason,
    });
    if retry {
        live_patch(shared, pid, &job.bundles);
    }
}

/// Live patch with the engine, waiting a little for the module to be mapped (an exec allowed
/// unheld is still in progress; a library may not be mapped executable yet).
fn live_patch(shared: &Shared, pid: Pid, bundles: &[Arc<VerifiedBundle>]) {
    for b in bundles {
        let id = b.patch().id.clone();
        let mut result = Err(String::from("not tried"));
        for _ in 0..40 {
            match shared.engine.apply(pid, b) {
                Ok(_) => {
                    result = Ok(());
                    break;
                }
                Err(
                    e @ (EngineError::ModuleNotMapped { .. } | EngineError::ModuleLayout { .. }),
                ) => {
                    result = Err(format!("{}: {e}", e.code()));
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    result = Err(format!("{}: {e}", e.code()));
                    break;
                }
            }
        }
        shared.emit(HookEvent::LivePatched {
            pid,
            patch: id,
            result,
        });
    }
}

/// Whether a plan failure means "not mapped (executable) yet": keep following.
fn not_yet(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::ModuleNotMapped { .. } | EngineError::ModuleLayout { .. }
    )
}

enum Commit<'a> {
    Done(Outcome),
    NotYet(EngineError, Tracked<'a>),
}

/// At a stop where the module may be fully mapped: plan every bundle (reads `/proc` only), then
/// stop the whole process from the held thread, commit, let go.
fn try_commit<'a>(
    shared: &Shared,
    mut hold: Tracked<'a>,
    // Its bundles and when its event was read.
    job: &Job,
    // What the hook saw mapped, and plans already made from it (one per bundle, in order).
    known: Option<(
        &stitch_engine::KnownMapping,
        Option<Vec<stitch_engine::Plan>>,
    )>,
    deadline: Instant,
    syscalls: u32,
    // The thread already sits in a `PTRACE_EVENT_STOP` (no park needed).
    parked: Option<StopKind>,
) -> Commit<'a> {
    let (bundles, received) = (&job.bundles[..], job.received);
    let pid = hold.pid();
    // Planned after the wait: a sibling that ran meanwhile may have changed the mappings.
    if let Err(reason) = wait_for_siblings(shared, pid, deadline) {
        return Commit::Done(Outcome::Missed(reason));
    }
    let t_plan = Instant::now();
    let (known, premade) = match known {
        Some((k, p)) => (Some(k), p),
        None => (None, None),
    };
    let mut plans = Vec::new();
    if let Some(p) = premade {
        // Planned by the caller, one per bundle, in order.
        plans.extend(bundles.iter().zip(p));
    }
    for b in bundles.iter().skip(plans.len()) {
        // With the mapping seen at the `mmap`'s exit: no maps read, no map_files stat here
        // (`commit_known` checks it under the stop).
        let planned = match known {
            Some(k) => shared.engine.plan_mapped(pid, b, k),
            None => shared.engine.plan(pid, b),
        };
        match planned {
            Ok(p) => plans.push((b, p)),
            Err(e) if not_yet(&e) => return Commit::NotYet(e, hold),
            Err(e) => return Commit::Done(Outcome::Missed(engine_miss(&e))),
        }
    }
    let t_stop = Instant::now();
    let stop = match parked.map_or_else(|| hold.park(deadline), Ok) {
        Ok(s) => s,
        Err(e) => return Commit::Done(Outcome::Missed(MissReason::Trace(e.to_string()))),
    };
    let Tracked { mut held, hold } = hold;
    let mut sp = match hold.into_stopped_process(stop, deadline) {
        Ok(sp) => sp,
        Err(e) => return Commit::Done(Outcome::Missed(MissReason::Trace(e.to_string()))),
    };
    let t_commit = Instant::now();
    let mut patched = Vec::new();
    let mut failed = None;
    for (b, plan) in &plans {
        let committed = match known {
            // Refused before anything is written when the maps under the stop contradict
            // what the hook saw (another inode there, another bias): plan again the full way
            // (reads `/proc` only; nothing can map or unmap while every thread is held).
            Some(k) => match shared.engine.commit_known(&mut sp, plan, b.patch(), k) {
                Err(
                    e @ (EngineError::ModuleNotMapped { .. } | EngineError::ModuleLayout { .. }),
                ) => {
                    tracing::debug!(pid = pid.0, error = %e, "known mapping not confirmed; full plan");
                    shared
                        .engine
                        .plan(pid, b)
                        .and_then(|p| shared.engine.commit(&mut sp, &p, b.patch()))
                }
                other => other,
            },
            None => shared.engine.commit(&mut sp, plan, b.patch()),
        };
        match committed {
            Ok(report) => {
                tracing::debug!(pid = pid.0, phases = ?report.phases, "load-time commit phases");
                patched.push(b.patch().id.clone());
            }
            Err(e) => {
                tracing::warn!(pid = pid.0, patch_id = %b.patch().id, error = %e, "load-time commit failed");
                failed.get_or_insert(e);
            }
        }
    }
    held.release();
    let t_resume = Instant::now();
    if let Err(e) = sp.resume() {
        tracing::warn!(pid = pid.0, error = %e, "letting go after a load-time patch");
    }
    tracing::debug!(
        pid = pid.0,
        kind = ?job.kind,
        syscalls,
        to_plan_us = t_plan.saturating_duration_since(received).as_micros() as u64,
        plan_us = (t_stop - t_plan).as_micros() as u64,
        stop_us = (t_commit - t_stop).as_micros() as u64,
        commit_us = (t_resume - t_commit).as_micros() as u64,
        resume_us = t_resume.elapsed().as_micros() as u64,
        "load-time commit"
    );
    Commit::Done(match failed {
        Some(e) => Outcome::Missed(engine_miss(&e)),
        None => Outcome::Patched {
            patches: patched,
            syscalls,
            released: t_resume,
        },
    })
}

/// Follows a thread that opened a target library until the `mmap(PROT_EXEC)` of that
/// descriptor maps every site, then commits. Lets go untouched on close, exec, exit, or the
/// bounds.
fn follow_library(shared: &Shared, mut hold: Tracked<'_>, job: &Job, deadline: Instant) -> Outcome {
    let mut fd: Option<u64> = None;
    let mut entry: Option<(u64, [u64; 6])> = None;
    let mut syscalls = 0u32;
    let mut last_err: Option<EngineError> = None;
    let give_up = |last: Option<EngineError>, why: SkipReason| match last {
        Some(e) => Outcome::Missed(engine_miss(&e)),
        None => Outcome::Skipped(why),
    };
    loop {
        let stop = match hold.wait(deadline) {
            Ok(s) => s,
            Err(e) => return trace_failed(&e),
        };
        let resumed = match stop {
            HoldStop::Parked(StopKind::Interrupted) => {
                if fd.is_none() {
                    match hold.regs() {
                        // The open's own arguments are still in their registers.
                        Ok(r)
                            if opened_for_writing(
                                r.orig_rax.cast_signed(),
                                &[r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9],
                            ) =>
                        {
                            return Outcome::Skipped(SkipReason::OpenedForWriting);
                        }
                        Ok(r) if (r.rax as i64) >= 0 => fd = Some(r.rax),
                        Ok(_) => return Outcome::Skipped(SkipReason::OpenFailed),
                        Err(e) => return Outcome::Missed(MissReason::Trace(e.to_string())),
                    }
                }
                hold.step_syscall(0)
            }
            // Ctrl-Z: stay stopped, as the shell expects; we hear of SIGCONT.
            HoldStop::Parked(StopKind::GroupStopped(_)) => hold.listen(),
            HoldStop::SyscallEntry { nr, args } => {
                syscalls += 1;
                if syscalls > shared.config.max_syscalls {
                    return Outcome::Missed(MissReason::TooManySyscalls);
                }
                if nr == SYS_CLOSE && Some(args[0]) == fd {
                    return give_up(last_err, SkipReason::NotMappedExecutable);
                }
                if nr == SYS_EXIT || nr == SYS_EXIT_GROUP {
                    return Outcome::Skipped(SkipReason::Exited);
                }
                entry = Some((nr, args));
                hold.step_syscall(0)
            }
            HoldStop::SyscallExit { rval, is_error } => {
                let mapped_exec = match entry.take() {
                    Some((SYS_MMAP, a))
                        if !is_error && Some(a[4]) == fd && a[2] & PROT_EXEC != 0 =>
                    {
                        Some(a)
                    }
                    _ => None,
                };
                if let Some(a) = mapped_exec {
                    let known = just_mapped(job, rval.cast_unsigned(), a[1], a[5]);
                    match try_commit(
                        shared,
                        hold,
                        job,
                        known.as_ref().map(|k| (k, None)),
                        deadline,
                        syscalls,
                        None,
                    ) {
                        Commit::Done(o) => return o,
                        Commit::NotYet(e, h) => {
                            last_err = Some(e);
                            hold = h;
                        }
                    }
                }
                hold.step_syscall(0)
            }
            HoldStop::Exec => return Outcome::Skipped(SkipReason::ExecElsewhere),
            HoldStop::Signal(sig) => hold.step_syscall(sig),
            HoldStop::Exited => return Outcome::Skipped(SkipReason::Exited),
            HoldStop::Timeout => return Outcome::Missed(MissReason::HoldTimeout),
        };
        if let Err(e) = resumed {
            return trace_failed(&e);
        }
    }
}

/// What an `mmap` of the held file just mapped (its result, length and offset), for the
/// engine's plan without a maps read: the file the thread opened (the event's descriptor,
/// `fstat`ed now), where. `None` if that `fstat` failed (the full plan then).
fn just_mapped(
    job: &Job,
    start: u64,
    len: u64,
    offset: u64,
) -> Option<stitch_engine::KnownMapping> {
    job.pending
        .file_key()
        .map(|key| stitch_engine::KnownMapping {
            path: job.path.clone(),
            key,
            exec_start: start,
            exec_end: start.saturating_add(len.div_ceil(4096) * 4096),
            exec_offset: offset,
        })
}

/// How a failed ptrace request ends a hold: the thread (or process) is gone, or following it
/// failed.
fn trace_failed(e: &SysError) -> Outcome {
    if e.is_gone() {
        Outcome::Skipped(SkipReason::Exited)
    } else {
        Outcome::Missed(MissReason::Trace(e.to_string()))
    }
}

/// Follows a thread held in a read or `mmap` of a target library that starts where one of
/// its executable segments starts (`FAN_PRE_ACCESS`). The interrupt stop comes right after
/// that syscall returns, before one more instruction of the thread: if it was the
/// `mmap(PROT_EXEC)`, the code is mapped and nothing of it has run — commit there (the plan
/// from what was just mapped, checked under the stop by `commit_known`). A read (`cat` at
/// that offset) or a mapping that does not cover the sites is let go untouched; a library
/// whose sites lie in another executable segment is held again at that segment's `mmap`.
fn follow_mapping(shared: &Shared, mut hold: Tracked<'_>, job: &Job, deadline: Instant) -> Outcome {
    loop {
        let stop = match hold.wait(deadline) {
            Ok(s) => s,
            Err(e) => return trace_failed(&e),
        };
        let resumed = match stop {
            HoldStop::Parked(StopKind::Interrupted) => {
                let r = match hold.regs() {
                    Ok(r) => r,
                    Err(e) => return Outcome::Missed(MissReason::Trace(e.to_string())),
                };
                // Registers at the return of the syscall the event came from: its number,
                // arguments (length, prot, offset) and result are all still there.
                let mapped = r.orig_rax == SYS_MMAP
                    && r.rdx & PROT_EXEC != 0
                    && !(-4095..0).contains(&r.rax.cast_signed());
                if !mapped {
                    return Outcome::Skipped(SkipReason::NotMappedExecutable);
                }
                let known = just_mapped(job, r.rax, r.rsi, r.r9);
                pause_at(shared, crate::PausePoint::Stopped);
                return match try_commit(
                    shared,
                    hold,
                    job,
                    known.as_ref().map(|k| (k, None)),
                    deadline,
                    0,
                    Some(StopKind::Interrupted),
                ) {
                    Commit::Done(o) => o,
                    // Sites elsewhere: another segment's mapping raises its own event.
                    Commit::NotYet(..) => Outcome::Skipped(SkipReason::NotMappedExecutable),
                };
            }
            // Ctrl-Z: stay stopped, as the shell expects; our interrupt stop follows SIGCONT.
            HoldStop::Parked(StopKind::GroupStopped(_)) => hold.listen(),
            HoldStop::Signal(sig) => hold.resume(sig),
            HoldStop::SyscallEntry { .. } | HoldStop::SyscallExit { .. } => hold.resume(0),
            HoldStop::Exec => return Outcome::Skipped(SkipReason::ExecElsewhere),
            HoldStop::Exited => return Outcome::Skipped(SkipReason::Exited),
            HoldStop::Timeout => return Outcome::Missed(MissReason::HoldTimeout),
        };
        if let Err(e) = resumed {
            return trace_failed(&e);
        }
    }
}

/// Follows a thread that opened a target executable for exec to `PTRACE_EVENT_EXEC`, commits.
fn follow_exec(shared: &Shared, mut hold: Tracked<'_>, job: &Job, deadline: Instant) -> Outcome {
    let bundles = &job.bundles[..];
    loop {
        let stop = match hold.wait(deadline) {
            Ok(s) => s,
            Err(e) => return trace_failed(&e),
        };
        let resumed = match stop {
            HoldStop::Exec => {
                // The commit's stops on one CPU: the exec may have ended on another CPU than
                // the one it began on (the kernel balances at exec; our answer to its second
                // event can move it). Staying put saved the move (a migration, ~30 us here)
                // on an idle host, but with every CPU busy each stop across CPUs waited for a
                // time slice: exec hold p50 16 ms staying, 3.8-4.3 ms moved (`--busy`); idle,
                // moving only when the CPUs differ costs no measurable time (342-360 against
                // 356-367 us). The worker returns to its lane after.
                let _move = stitch_sys::last_cpu_of(hold.tid())
                    .filter(|&c| stitch_sys::current_cpu() != Some(c) && shared.cpus.contains(&c))
                    .and_then(|c| stitch_sys::CpuPin::to_set(&[c]).ok());
                // The executable's text, from where the kernel put its program headers and
                // the file the exec opened: the plan then reads no maps (checked under the
                // stop by `commit_known`). Only when every bundle's sites fit one segment and
                // the file's bytes are cached (after its first hold); else the full plan.
                let pid = hold.pid();
                let phdr = hold
                    .regs()
                    .ok()
                    .and_then(|r| crate::proc::at_phdr_after_exec(pid, r.rsp));
                let premade = match (job.pending.file_key(), phdr) {
                    (Some(key), Some(phdr)) => {
                        let each: Option<Vec<_>> = bundles
                            .iter()
                            .map(|b| {
                                shared
                                    .engine
                                    .plan_from_phdr(pid, b, &job.path, key, phdr)
                                    .ok()
                                    .flatten()
                            })
                            .collect();
                        // One known mapping for the commit: every bundle's sites in it.
                        each.filter(|e| e.windows(2).all(|w| w[0].0 == w[1].0))
                            .and_then(|e| {
                                let known = e.first()?.0.clone();
                                Some((known, e.into_iter().map(|(_, p)| p).collect()))
                            })
                    }
                    _ => None,
                };
                let known = premade.as_ref().map(|(k, _)| k.clone());
                let plans = premade.map(|(_, p)| p);
                return match try_commit(
                    shared,
                    hold,
                    job,
                    known.as_ref().map(|k| (k, plans)),
                    deadline,
                    0,
                    None,
                ) {
                    Commit::Done(o) => o,
                    Commit::NotYet(e, _) => Outcome::Missed(engine_miss(&e)),
                };
            }
            // Our interrupt before any exec event: the exec failed (the thread is back in
            // its old program).
            HoldStop::Parked(StopKind::Interrupted) => {
                return Outcome::Skipped(SkipReason::ExecElsewhere);
            }
            HoldStop::Parked(StopKind::GroupStopped(_)) => hold.listen(),
            HoldStop::SyscallEntry { .. } | HoldStop::SyscallExit { .. } => hold.resume(0),
            HoldStop::Signal(sig) => hold.resume(sig),
            HoldStop::Exited => return Outcome::Skipped(SkipReason::Exited),
            HoldStop::Timeout => return Outcome::Missed(MissReason::HoldTimeout),
        };
        if let Err(e) = resumed {
            return trace_failed(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker blocked on an empty lane queue gets the next push, and every push is popped
    /// once. The hazard: work (a held thread's event, or the order to stop) pushed while the
    /// worker sleeps and never handed to it — the hook would hang at shutdown, or a thread
    /// would wait for its bound.
    #[test]
    fn lane_queue_wakes_a_sleeping_worker_and_leaves_nothing_behind() {
        let q = Arc::new(JobQueue::default());
        let q2 = q.clone();
        let sleeper = std::thread::spawn(move || matches!(q2.pop(), Work::Stop));
        std::thread::sleep(Duration::from_millis(50));
        assert!(q.push(Work::Stop).is_ok());
        assert!(sleeper.join().unwrap(), "the sleeping worker got it");
        for _ in 0..3 {
            assert!(q.push(Work::Stop).is_ok());
        }
        for _ in 0..3 {
            assert!(matches!(q.pop(), Work::Stop));
        }
        assert!(q.work.lock().unwrap().is_empty(), "nothing left behind");
    }
}

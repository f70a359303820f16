//! Stop-the-world: [`stop_all`] and the [`StoppedProcess`] token that every write needs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::error::{Result, SysError};
use crate::ptrace::PtraceTracer;
use crate::tracer::{MapAnswer, RemoteSyscall, Tracer};
use crate::types::{MapQuery, Mapping, PF_KTHREAD, Perms, Pid, Regs, StopKind, Tid};

/// `PR_SET_VMA`.
pub const PR_SET_VMA: u64 = 0x5356_4d41;
/// `PR_SET_VMA_ANON_NAME`.
pub const PR_SET_VMA_ANON_NAME: u64 = 0;
const PAGE: u64 = 4096;
/// Lowest address we ever propose (the usual `vm.mmap_min_addr` is 4096..65536).
const LOW_ADDR: u64 = 0x1_0000;
/// One past the highest user address with 4-level paging.
const HIGH_ADDR: u64 = 0x7fff_ffff_f000;
/// The kernel keeps `stack_guard_gap` (256 pages) free below a grows-down stack.
const STACK_GUARD: u64 = 256 * PAGE;

/// One held thread and its registers as of the last time it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedThread {
    /// Thread id.
    pub tid: Tid,
    /// Registers. Use [`Regs::resume_ip`] for "where will it execute next".
    pub regs: Regs,
    /// How it is stopped.
    pub stop: StopKind,
}

/// Where the time of a stop went (wall time in each part of [`stop_all`], summed over the
/// rounds of re-reading the thread list; threads adopted after a brief run add to it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopTimings {
    /// Reading `/proc/PID/task`.
    pub listing: Duration,
    /// `PTRACE_SEIZE` + `PTRACE_INTERRUPT` of every thread.
    pub seize: Duration,
    /// Waiting until each seized thread reports its stop.
    pub wait: Duration,
    /// Reading each held thread's registers.
    pub regs: Duration,
    /// Listings of the thread list (at least two: the last one finds no new thread).
    pub rounds: u32,
}

/// Where [`StoppedProcess::remote_mmap`] may put a mapping. There is deliberately no way to ask
/// for `MAP_FIXED`, which would silently replace whatever is mapped there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Wherever the kernel likes.
    Anywhere,
    /// A hint; the kernel may choose elsewhere.
    Hint(u64),
    /// Exactly there, or fail with EEXIST (`MAP_FIXED_NOREPLACE`).
    Exact(u64),
}

/// Stops every thread of `pid` with the real kernel tracer. See [`stop_all_with`].
///
/// # Errors
/// As [`stop_all_with`].
pub fn stop_all(pid: Pid, deadline: Instant) -> Result<StoppedProcess<PtraceTracer>> {
    stop_all_with(PtraceTracer::new(), pid, deadline)
}

/// Stops every thread of `pid` (seize + interrupt, then re-read the thread list until no new
/// thread appears) and returns the token that proves it.
///
/// Refused, with nothing changed: [`SysError::NoSuchProcess`], [`SysError::Zombie`],
/// [`SysError::KernelThread`], [`SysError::AlreadyTraced`]. On any error after the first seize,
/// every thread seized so far is detached before returning (see
/// [`SysError::ThreadDidNotStop`] for the one case the kernel does not let us undo at once).
///
/// # Errors
/// The refusals above, [`SysError::PermissionDenied`], [`SysError::ThreadDidNotStop`], and
/// tracer errors.
pub fn stop_all_with<T: Tracer>(
    mut tracer: T,
    pid: Pid,
    deadline: Instant,
) -> Result<StoppedProcess<T>> {
    // A process caught inside execve reports PTRACE_EVENT_EXEC; nothing was planned against it
    // yet, so start over on the new program (a few times, within the deadline).
    let mut attempts = 0;
    loop {
        attempts += 1;
        match stop_once(&mut tracer, pid, deadline) {
            Err(SysError::Execed { .. }) if attempts < 4 && Instant::now() < deadline => {
                tracing::debug!(pid = pid.0, "process exec'd while being stopped; retrying");
            }
            Err(e) => return Err(e),
            Ok(parts) => return Ok(parts.into_process(tracer)),
        }
    }
}

/// What one successful stop produced, before it is bound to the tracer.
struct Held {
    pid: Pid,
    held: BTreeMap<Tid, StoppedThread>,
    gone: BTreeSet<Tid>,
    timings: StopTimings,
}

impl Held {
    fn into_process<T: Tracer>(self, tracer: T) -> StoppedProcess<T> {
        StoppedProcess {
            tracer,
            pid: self.pid,
            held: self.held,
            pending: BTreeSet::new(),
            gone: self.gone,
            gadget: None,
            maps: None,
            exec_maps: None,
            procmap_query: true,
            op_timeout: Duration::from_secs(2),
            released: false,
            left_seized: Vec::new(),
            timings: self.timings,
            unsettled: BTreeSet::new(),
            batch_depth: 0,
        }
    }
}

fn stop_once<T: Tracer>(tracer: &mut T, pid: Pid, deadline: Instant) -> Result<Held> {
    preflight(tracer, pid)?;
    let mut sp = StoppedProcess {
        tracer,
        pid,
        held: BTreeMap::new(),
        pending: BTreeSet::new(),
        gone: BTreeSet::new(),
        gadget: None,
        maps: None,
        exec_maps: None,
        procmap_query: true,
        op_timeout: Duration::from_secs(2),
        released: false,
        left_seized: Vec::new(),
        timings: StopTimings::default(),
        unsettled: BTreeSet::new(),
        batch_depth: 0,
    };
    let started = Instant::now();
    match sp.adopt_new_threads(deadline) {
        Ok(()) if sp.held.is_empty() => {
            sp.released = true;
            Err(SysError::NoSuchProcess { pid })
        }
        Ok(()) => {
            // Hand the held threads over without running Drop (which would detach them).
            sp.released = true;
            Ok(Held {
                pid,
                held: std::mem::take(&mut sp.held),
                gone: std::mem::take(&mut sp.gone),
                timings: sp.timings,
            })
        }
        Err(e) => {
            if let Err(cleanup) = sp.release_all() {
                tracing::warn!(pid = pid.0, error = %cleanup, "cleanup after a failed stop_all");
            }
            Err(match e {
                SysError::ThreadDidNotStop { pid, tid, .. } => SysError::ThreadDidNotStop {
                    pid,
                    tid,
                    waited: started.elapsed(),
                    left_seized: std::mem::take(&mut sp.left_seized),
                },
                other => other,
            })
        }
    }
}

fn preflight<T: Tracer>(tracer: &mut T, pid: Pid) -> Result<()> {
    let leader = tracer.task_info(pid, pid.leader()).map_err(|e| match e {
        SysError::ThreadGone { .. } => SysError::NoSuchProcess { pid },
        other => other,
    })?;
    if leader.flags & PF_KTHREAD != 0 {
        return Err(SysError::KernelThread { pid });
    }
    if leader.is_exiting() {
        // A leader that called pthread_exit is a zombie while its process lives on.
        let others_alive = tracer
            .list_threads(pid)
            .unwrap_or_default()
            .into_iter()
            .any(|tid| {
                tid != pid.leader() && tracer.task_info(pid, tid).is_ok_and(|i| !i.is_exiting())
            });
        if !others_alive {
            return Err(SysError::Zombie {
                pid,
                state: leader.state.as_char(),
            });
        }
    } else if leader.is_kernel_thread() {
        return Err(SysError::KernelThread { pid });
    }
    if leader.tracer_pid != 0 {
        return Err(SysError::AlreadyTraced {
            pid,
            tid: pid.leader(),
            tracer: leader.tracer_pid,
        });
    }
    Ok(())
}

/// Proof that every thread of a process is held by us. Memory writes and remote syscalls exist
/// only as methods of this type, so they cannot happen while a thread of the target runs.
///
/// Dropping it (or [`StoppedProcess::resume`]) detaches every thread. If an operation fails in a
/// way that could leave a thread running (new threads could not be adopted after a brief run,
/// the program exec'd), the process is let go at once and later calls return
/// [`SysError::Released`].
///
/// With [`PtraceTracer`] it is not `Send`: it must be used and dropped on the thread that made it.
#[derive(Debug)]
pub struct StoppedProcess<T: Tracer = PtraceTracer> {
    tracer: T,
    pid: Pid,
    held: BTreeMap<Tid, StoppedThread>,
    /// Seized, not yet seen stopped.
    pending: BTreeSet<Tid>,
    /// Seen in the task list, then gone.
    gone: BTreeSet<Tid>,
    gadget: Option<u64>,
    /// The mappings as last read: valid until a thread runs or a remote syscall is made
    /// (nothing else can change them while every thread is held).
    maps: Option<Vec<Mapping>>,
    /// The executable mappings (anonymous ones named), as [`StoppedProcess::exec_mappings`]
    /// found them; valid as long as `maps` would be.
    exec_maps: Option<Vec<Mapping>>,
    /// Single mappings can be queried (`PROCMAP_QUERY`); false once the tracer said it cannot.
    procmap_query: bool,
    op_timeout: Duration,
    released: bool,
    left_seized: Vec<Tid>,
    timings: StopTimings,
    /// Threads a remote syscall may have left outside a `PTRACE_EVENT_STOP`.
    unsettled: BTreeSet<Tid>,
    /// Depth of [`StoppedProcess::remote_batch`] calls.
    batch_depth: u32,
}

impl<T: Tracer> StoppedProcess<T> {
    /// Where the time of stopping every thread went.
    #[must_use]
    pub fn stop_timings(&self) -> StopTimings {
        self.timings
    }

    /// The process.
    #[must_use]
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The held threads, by tid.
    pub fn threads(&self) -> impl Iterator<Item = &StoppedThread> {
        self.held.values()
    }

    /// One held thread.
    #[must_use]
    pub fn thread(&self, tid: Tid) -> Option<&StoppedThread> {
        self.held.get(&tid)
    }

    /// The held thread ids.
    #[must_use]
    pub fn tids(&self) -> Vec<Tid> {
        self.held.keys().copied().collect()
    }

    /// Whether the process is job-control stopped (it stays stopped after we let go).
    #[must_use]
    pub fn is_group_stopped(&self) -> bool {
        self.held.values().any(|t| t.stop.is_group_stop())
    }

    /// The tracer (e.g. to inspect a fake's call log).
    pub fn tracer(&self) -> &T {
        &self.tracer
    }

    /// How long each single operation (a step, a remote syscall) may take. Default 2 s.
    pub fn set_op_timeout(&mut self, timeout: Duration) {
        self.op_timeout = timeout;
    }

    /// The thread remote syscalls run in by default: the leader if held, else the lowest tid.
    ///
    /// # Errors
    /// [`SysError::Released`], or [`SysError::NoSuchProcess`] if no thread is left.
    pub fn syscall_thread(&self) -> Result<Tid> {
        self.live()?;
        if self.held.contains_key(&self.pid.leader()) {
            return Ok(self.pid.leader());
        }
        self.held
            .keys()
            .next()
            .copied()
            .ok_or(SysError::NoSuchProcess { pid: self.pid })
    }

    fn live(&self) -> Result<()> {
        if self.released {
            Err(SysError::Released { pid: self.pid })
        } else {
            Ok(())
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.op_timeout
    }

    fn held_thread(&self, tid: Tid) -> Result<&StoppedThread> {
        self.live()?;
        self.held
            .get(&tid)
            .ok_or(SysError::ThreadGone { pid: self.pid, tid })
    }

    /// Seizes every thread not yet held until a fresh listing shows no new one. Held threads
    /// cannot create threads, so once every thread of a listing is held, a thread count equal
    /// to the number held ([`Tracer::thread_count`], one `stat`) proves there is no other and
    /// stands in for the confirming listing.
    fn adopt_new_threads(&mut self, deadline: Instant) -> Result<()> {
        let pid = self.pid;
        let mut must_list = self.held.is_empty();
        loop {
            if !must_list && self.pending.is_empty() {
                let t = Instant::now();
                let count = self.tracer.thread_count(pid);
                self.timings.listing += t.elapsed();
                if count? == Some(self.held.len()) {
                    return Ok(());
                }
            }
            must_list = false;
            let t = Instant::now();
            let listed = self.tracer.list_threads(pid);
            self.timings.listing += t.elapsed();
            self.timings.rounds += 1;
            let new: Vec<Tid> = listed?
                .into_iter()
                .filter(|t| {
                    !self.held.contains_key(t)
                        && !self.gone.contains(t)
                        && !self.pending.contains(t)
                })
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            // Seize all first, then wait: the threads stop in parallel.
            let t = Instant::now();
            for tid in new {
                match self.tracer.seize(pid, tid) {
                    Ok(()) => {
                        self.pending.insert(tid);
                    }
                    Err(e) if e.is_gone() => {
                        self.gone.insert(tid);
                    }
                    Err(e @ SysError::PermissionDenied { .. }) => self.classify_eperm(tid, e)?,
                    Err(e) => return Err(e),
                }
            }
            self.timings.seize += t.elapsed();
            while let Some(tid) = self.pending.first().copied() {
                let t = Instant::now();
                let waited = self.tracer.wait_stop(pid, tid, deadline);
                self.timings.wait += t.elapsed();
                match waited {
                    Ok(stop) => {
                        self.pending.remove(&tid);
                        // Held from here on (detachable), even if reading registers fails.
                        self.held.insert(
                            tid,
                            StoppedThread {
                                tid,
                                regs: Regs::default(),
                                stop,
                            },
                        );
                        let t = Instant::now();
                        let regs = self.tracer.get_regs(pid, tid);
                        self.timings.regs += t.elapsed();
                        match regs {
                            Ok(regs) => {
                                if let Some(t) = self.held.get_mut(&tid) {
                                    t.regs = regs;
                                }
                            }
                            Err(e) if e.is_gone() => {
                                self.held.remove(&tid);
                                self.gone.insert(tid);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) if e.is_gone() => {
                        self.pending.remove(&tid);
                        self.gone.insert(tid);
                    }
                    Err(e @ SysError::ThreadDidNotStop { .. }) => {
                        // An exited thread (e.g. a zombie leader) never reports a stop.
                        match self.tracer.task_info(pid, tid) {
                            Ok(info) if !info.state.is_exited() => return Err(e),
                            Err(other) if !other.is_gone() => return Err(e),
                            _ => {
                                self.pending.remove(&tid);
                                self.gone.insert(tid);
                            }
                        }
                    }
                    // The thread stays in `pending`: cleanup finds it gone (the real tracer
                    // detaches an exec'd thread at once) or stopped, and detaches it.
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// EPERM from seize: another tracer, an exited thread, or really no privilege.
    fn classify_eperm(&mut self, tid: Tid, e: SysError) -> Result<()> {
        match self.tracer.task_info(self.pid, tid) {
            Err(g) if g.is_gone() => {
                self.gone.insert(tid);
                Ok(())
            }
            Ok(info) if info.state.is_exited() => {
                self.gone.insert(tid);
                Ok(())
            }
            Ok(info) if info.tracer_pid != 0 => Err(SysError::AlreadyTraced {
                pid: self.pid,
                tid,
                tracer: info.tracer_pid,
            }),
            _ => Err(e),
        }
    }

    /// Detaches everything; returns the first error but always tries every thread.
    fn release_all(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let pid = self.pid;
        let mut first_err = None;
        // A seized thread can only be detached once stopped: give stragglers a short grace.
        let grace = Instant::now() + Duration::from_millis(250);
        for tid in std::mem::take(&mut self.pending) {
            let waited = match self.tracer.wait_stop(pid, tid, grace) {
                Err(e) if !e.is_gone() && !matches!(e, SysError::Execed { .. }) => {
                    self.tracer.wait_stop(pid, tid, grace)
                }
                other => other,
            };
            match waited {
                Ok(_) => {
                    if let Err(e) = self
                        .tracer
                        .detach(pid, tid)
                        .or_else(|_| self.tracer.detach(pid, tid))
                    {
                        first_err.get_or_insert(e);
                    }
                }
                Err(e) if e.is_gone() || matches!(e, SysError::Execed { .. }) => {}
                Err(e) => {
                    tracing::warn!(pid = pid.0, tid = tid.0, error = %e, "seized thread never stopped; it is released when the tracing thread exits");
                    self.left_seized.push(tid);
                }
            }
        }
        for tid in std::mem::take(&mut self.held).into_keys() {
            // One retry: a thread left stopped is the worst outcome, worth a second syscall.
            if let Err(e) = self
                .tracer
                .detach(pid, tid)
                .or_else(|_| self.tracer.detach(pid, tid))
            {
                tracing::warn!(pid = pid.0, tid = tid.0, error = %e, "detach failed");
                first_err.get_or_insert(e);
            }
        }
        self.tracer.release_process(pid);
        first_err.map_or(Ok(()), Err)
    }

    /// Lets the process go: detaches every thread. A group-stopped process stays stopped.
    ///
    /// # Errors
    /// The first detach error (every thread is still attempted).
    pub fn resume(mut self) -> Result<()> {
        self.release_all()
    }

    /// Re-reads the registers of a held thread.
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], tracer errors.
    pub fn refresh_regs(&mut self, tid: Tid) -> Result<Regs> {
        self.held_thread(tid)?;
        let regs = self.tracer.get_regs(self.pid, tid)?;
        if let Some(t) = self.held.get_mut(&tid) {
            t.regs = regs;
        }
        Ok(regs)
    }

    /// The process's mappings (stable while held: no thread can map or unmap).
    ///
    /// # Errors
    /// Tracer errors.
    pub fn mappings(&mut self) -> Result<Vec<Mapping>> {
        self.live()?;
        if let Some(m) = &self.maps {
            return Ok(m.clone());
        }
        let m = self.tracer.mappings(self.pid)?;
        self.maps = Some(m.clone());
        Ok(m)
    }

    fn forget_maps(&mut self) {
        self.maps = None;
        self.exec_maps = None;
    }

    /// One mapping (see [`MapQuery`]), current as of now: from the maps already read under
    /// this stop if there are any, else asked of the kernel alone (`PROCMAP_QUERY`, about
    /// half a microsecond, where reading `/proc/PID/maps` whole costs tens), else — a kernel
    /// before 6.11 — from one full read, kept as [`StoppedProcess::mappings`] keeps it. The
    /// three give the same answer ([`MapQuery::answer`]); no thread can map or unmap while
    /// every thread is held.
    ///
    /// # Errors
    /// [`SysError::Released`], tracer errors.
    pub fn query_mapping(&mut self, addr: u64, query: MapQuery) -> Result<Option<Mapping>> {
        self.live()?;
        if self.maps.is_none() && self.procmap_query {
            match self.tracer.query_mapping(self.pid, addr, &query)? {
                MapAnswer::Found(m) => return Ok(Some(m)),
                MapAnswer::NoneThere => return Ok(None),
                MapAnswer::Unsupported => self.procmap_query = false,
            }
        }
        let maps = match &self.maps {
            Some(m) => m,
            None => {
                let m = self.tracer.mappings(self.pid)?;
                self.maps.insert(m)
            }
        };
        Ok(query.answer(maps, addr).cloned())
    }

    /// The mappings that answer `query` (with `or_next` implied) and start below `end`, from
    /// `start` upwards: one query each (see [`StoppedProcess::query_mapping`]).
    ///
    /// # Errors
    /// As [`StoppedProcess::query_mapping`].
    pub fn mappings_in(&mut self, start: u64, end: u64, query: MapQuery) -> Result<Vec<Mapping>> {
        let query = MapQuery {
            or_next: true,
            ..query
        };
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            match self.query_mapping(at, query)? {
                Some(m) if m.start < end => {
                    at = m.end;
                    out.push(m);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// The process's `start_brk` and `startstack` ([`Tracer::heap_and_stack`]): with them,
    /// the `[heap]` and `[stack]` mappings are found with a query or two instead of by name
    /// among all the others.
    ///
    /// # Errors
    /// [`SysError::Released`], tracer errors.
    pub fn heap_and_stack(&mut self) -> Result<Option<(u64, u64)>> {
        self.live()?;
        self.tracer.heap_and_stack(self.pid)
    }

    /// Every executable mapping, by address; anonymous ones (`[vdso]`, a Stitch region's
    /// trampolines, JIT code) with their names, files' names only if the maps were read
    /// whole (else empty: ask [`StoppedProcess::query_mapping`] for one). One query per executable mapping (plus one
    /// per anonymous one) — far fewer than the lines of `/proc/PID/maps` — kept until a
    /// thread runs or a remote syscall is made.
    ///
    /// # Errors
    /// As [`StoppedProcess::query_mapping`].
    pub fn exec_mappings(&mut self) -> Result<Vec<Mapping>> {
        self.live()?;
        if let Some(m) = &self.exec_maps {
            return Ok(m.clone());
        }
        let exec = MapQuery::COVERING_OR_NEXT.requiring(Perms {
            exec: true,
            ..Perms::default()
        });
        let mut out = self.mappings_in(0, u64::MAX, exec)?;
        for m in out.iter_mut().filter(|m| m.inode == 0 && m.name.is_empty()) {
            if let Some(named) = self.query_mapping(m.start, MapQuery::COVERING.named())? {
                m.name = named.name;
            }
        }
        self.exec_maps = Some(out.clone());
        Ok(out)
    }

    /// Reads target memory.
    ///
    /// # Errors
    /// [`SysError::MemIo`].
    pub fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.live()?;
        self.tracer.read_memory(self.pid, addr, buf)
    }

    /// Reads `len` bytes of target memory.
    ///
    /// # Errors
    /// [`SysError::MemIo`].
    pub fn read_vec(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    /// Reads several ranges of target memory into consecutive parts of `out` (one batched
    /// syscall with the kernel tracer; `out` must hold their total length); one result per
    /// range. A caller that reuses `out` saves the page faults of fresh memory (on this VM,
    /// fresh buffers doubled the time of reading 64 thread stacks).
    ///
    /// # Errors
    /// [`SysError::Released`]; per range, [`SysError::MemIo`] (or
    /// [`SysError::InvalidArgument`] when `out` is too small).
    pub fn read_many(
        &mut self,
        ranges: &[(u64, usize)],
        out: &mut [u8],
    ) -> Result<Vec<Result<()>>> {
        self.live()?;
        Ok(self.tracer.read_memory_many(self.pid, ranges, out))
    }

    /// Writes target memory (read-only text included). No thread runs while this happens.
    ///
    /// # Errors
    /// [`SysError::MemIo`].
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let via = self.syscall_thread()?;
        self.tracer.write_memory(self.pid, via, addr, data)
    }

    /// Writes, then reads back and compares.
    ///
    /// # Errors
    /// [`SysError::VerifyMismatch`] or the write/read error.
    pub fn write_verified(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        self.write(addr, data)?;
        let back = self.read_vec(addr, data.len())?;
        if back != data {
            return Err(SysError::VerifyMismatch {
                pid: self.pid,
                addr,
                len: data.len(),
            });
        }
        Ok(())
    }

    fn refuse_if_group_stopped(&self, op: &'static str, tid: Tid) -> Result<()> {
        if self.held_thread(tid)?.stop.is_group_stop() {
            return Err(SysError::GroupStopped {
                op,
                pid: self.pid,
                tid,
            });
        }
        Ok(())
    }

    /// After target code ran, new threads may exist: adopt them or let everything go.
    fn readopt_or_release(&mut self) -> Result<()> {
        let deadline = self.deadline();
        if let Err(e) = self.adopt_new_threads(deadline) {
            let _ = self.release_all();
            return Err(e);
        }
        Ok(())
    }

    fn after_run(&mut self, tid: Tid, r: Result<StopKind>) -> Result<Option<Regs>> {
        // The thread ran its own code: it may have mapped or unmapped memory.
        self.forget_maps();
        match r {
            Ok(stop) => {
                let regs = self.tracer.get_regs(self.pid, tid);
                let regs = match regs {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = self.release_all();
                        return Err(e);
                    }
                };
                if let Some(t) = self.held.get_mut(&tid) {
                    t.regs = regs;
                    t.stop = stop;
                }
                self.readopt_or_release()?;
                Ok(Some(regs))
            }
            Err(e) if e.is_gone() => {
                self.held.remove(&tid);
                self.gone.insert(tid);
                self.readopt_or_release()?;
                if self.held.is_empty() {
                    self.released = true;
                    return Err(SysError::NoSuchProcess { pid: self.pid });
                }
                Ok(None)
            }
            Err(e) => {
                // The thread may be running: the all-stopped guarantee is void.
                let _ = self.release_all();
                Err(e)
            }
        }
    }

    /// Executes one instruction of `tid` and returns its new registers.
    ///
    /// Refused for a group-stopped process (it must not run its own code) and for a process that
    /// ignores SIGTRAP (the forced step trap would reset that disposition).
    ///
    /// # Errors
    /// [`SysError::GroupStopped`], [`SysError::SigtrapIgnored`], [`SysError::ThreadGone`] (the
    /// instruction exited the thread), tracer errors (after which the process is released).
    pub fn single_step(&mut self, tid: Tid) -> Result<Regs> {
        self.refuse_if_group_stopped("single step", tid)?;
        let info = self.tracer.task_info(self.pid, tid)?;
        if info.sig_ignored & (1 << (libc::SIGTRAP - 1)) != 0 {
            return Err(SysError::SigtrapIgnored { pid: self.pid, tid });
        }
        let deadline = self.deadline();
        let r = self.tracer.single_step(self.pid, tid, deadline);
        self.after_run(tid, r)?
            .ok_or(SysError::ThreadGone { pid: self.pid, tid })
    }

    /// Lets `tid` run its own code for about `run_for`, then holds it again. For a thread whose
    /// next instruction lies inside bytes about to be replaced: let it move on, then check again.
    /// Returns `None` if the thread exited meanwhile. Threads it created are held too.
    ///
    /// # Errors
    /// [`SysError::GroupStopped`], [`SysError::Execed`], tracer errors (after which the process
    /// is released).
    pub fn run_thread_briefly(&mut self, tid: Tid, run_for: Duration) -> Result<Option<Regs>> {
        self.refuse_if_group_stopped("run thread briefly", tid)?;
        let deadline = self.deadline() + run_for;
        let r = self.tracer.run_briefly(self.pid, tid, run_for, deadline);
        self.after_run(tid, r)
    }

    /// Finds (and caches) a `syscall` instruction in an executable mapping, `[vdso]` first.
    /// We never write one: if we die mid-way, no code of the target has been changed by us.
    fn gadget(&mut self) -> Result<u64> {
        if let Some(g) = self.gadget {
            // The caller may have patched over it since.
            let mut b = [0u8; 2];
            if self.tracer.read_memory(self.pid, g, &mut b).is_ok() && b == [0x0f, 0x05] {
                return Ok(g);
            }
            self.gadget = None;
        }
        let mut maps: Vec<Mapping> = self
            .exec_mappings()?
            .into_iter()
            .filter(|m| m.perms.exec && m.perms.read)
            .collect();
        maps.sort_by_key(|m| (m.name != "[vdso]", m.start));
        const CHUNK: u64 = 64 * 1024;
        for m in maps {
            let mut at = m.start;
            while at + 1 < m.end {
                let len = (m.end - at).min(CHUNK);
                let mut buf = vec![0u8; len as usize];
                if self.tracer.read_memory(self.pid, at, &mut buf).is_err() {
                    break;
                }
                if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
                    let g = at + i as u64;
                    self.gadget = Some(g);
                    return Ok(g);
                }
                // Overlap one byte so a pair split across chunks is found.
                at += len.saturating_sub(1).max(1);
            }
        }
        Err(SysError::NoSyscallGadget { pid: self.pid })
    }

    /// Executes syscall `nr` in the default [`StoppedProcess::syscall_thread`]; returns the raw
    /// kernel result (`-errno` on failure).
    ///
    /// # Errors
    /// See [`StoppedProcess::remote_syscall_in`].
    pub fn remote_syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let tid = self.syscall_thread()?;
        self.remote_syscall_in(tid, nr, args)
    }

    /// Executes syscall `nr` in held thread `tid` by pointing its RIP at an existing `syscall`
    /// instruction; registers, signal mask and an interrupted blocking syscall are restored
    /// exactly. Returns the raw kernel result (`-errno` on failure).
    ///
    /// # Errors
    /// [`SysError::InvalidArgument`] (more than 6 args), [`SysError::NoSyscallGadget`],
    /// [`SysError::SeccompForbids`], tracer errors.
    pub fn remote_syscall_in(&mut self, tid: Tid, nr: i64, args: &[u64]) -> Result<i64> {
        self.held_thread(tid)?;
        if args.len() > 6 {
            return Err(SysError::InvalidArgument(format!(
                "{} syscall arguments",
                args.len()
            )));
        }
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        let gadget = self.gadget()?;
        let call = RemoteSyscall {
            gadget,
            nr,
            args: a,
        };
        let deadline = self.deadline();
        // Whatever the call does (mmap, munmap, mprotect...), the maps read so far are stale.
        self.forget_maps();
        match self.tracer.syscall(self.pid, tid, &call, deadline) {
            Err(e) if e.is_gone() => {
                self.held.remove(&tid);
                self.gone.insert(tid);
                Err(e)
            }
            // Refused before anything ran: the thread is untouched and still held.
            Err(e @ (SysError::SeccompForbids { .. } | SysError::InvalidArgument(_))) => Err(e),
            Err(e) => {
                // The thread may not be parked any more: the all-held guarantee is void.
                let _ = self.release_all();
                Err(e)
            }
            Ok(r) => {
                self.unsettled.insert(tid);
                if self.batch_depth == 0 {
                    self.settle()?;
                }
                Ok(r)
            }
        }
    }

    /// Runs `f` (a sequence of remote syscalls) and settles the threads they ran in only at
    /// the end: with the kernel tracer each call then costs one stop (the single step over
    /// the `syscall` instruction) plus one stop for the whole sequence, instead of two per
    /// call. Inside `f`, a thread that made a remote syscall sits in the step's
    /// signal-delivery-stop: were the tracer killed then, the kernel would deliver that
    /// SIGTRAP to the thread (see [`Tracer::settle`]) — the same residual window as a kill
    /// during one remote syscall, stretched over the sequence. Keep `f` short.
    ///
    /// # Errors
    /// `f`'s error, else a settle error (after which the process is released).
    pub fn remote_batch<R, E: From<SysError>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        self.batch_depth += 1;
        let r = f(self);
        self.batch_depth -= 1;
        let settled = if self.batch_depth == 0 {
            self.settle()
        } else {
            Ok(())
        };
        let r = r?;
        settled?;
        Ok(r)
    }

    /// Parks every thread a remote syscall left in another stop (see [`Tracer::settle`]).
    fn settle(&mut self) -> Result<()> {
        if self.released {
            self.unsettled.clear();
            return Ok(());
        }
        let deadline = self.deadline();
        for tid in std::mem::take(&mut self.unsettled) {
            match self.tracer.settle(self.pid, tid, deadline) {
                Ok(()) => {}
                Err(e) if e.is_gone() => {
                    self.held.remove(&tid);
                    self.gone.insert(tid);
                }
                Err(e) => {
                    let _ = self.release_all();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn checked(&self, tid: Tid, nr: i64, ret: i64) -> Result<i64> {
        if (-4095..0).contains(&ret) {
            return Err(SysError::RemoteSyscallFailed {
                pid: self.pid,
                tid,
                nr,
                errno: i32::try_from(-ret).unwrap_or(libc::EINVAL),
            });
        }
        Ok(ret)
    }

    /// `mmap` of private anonymous memory in the target.
    ///
    /// # Errors
    /// [`SysError::RemoteSyscallFailed`] (EEXIST when an [`Placement::Exact`] range is taken).
    pub fn remote_mmap(&mut self, placement: Placement, len: u64, prot: i32) -> Result<u64> {
        if len == 0 {
            return Err(SysError::InvalidArgument("mmap of 0 bytes".into()));
        }
        let base = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let (addr, flags) = match placement {
            Placement::Anywhere => (0, base),
            Placement::Hint(a) => (a, base),
            Placement::Exact(a) => (a, base | libc::MAP_FIXED_NOREPLACE),
        };
        let tid = self.syscall_thread()?;
        let nr = libc::SYS_mmap;
        let args = [addr, len, prot as u64, flags as u64, u64::MAX, 0];
        let got = self.remote_syscall_in(tid, nr, &args)?;
        let got = self.checked(tid, nr, got)?.cast_unsigned();
        if let Placement::Exact(want) = placement
            && got != want
        {
            // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
            let _ = self.remote_munmap(got, len);
            return Err(SysError::RemoteSyscallFailed {
                pid: self.pid,
                tid,
                nr,
                errno: libc::EEXIST,
            });
        }
        Ok(got)
    }

    /// Maps `len` bytes within `max_distance` of `near` (every byte of the new mapping), trying
    /// the closest free gaps first — for trampolines that must be reachable with rel32 jumps.
    ///
    /// # Errors
    /// [`SysError::RemoteSyscallFailed`] with ENOMEM when no gap fits.
    pub fn remote_mmap_near(
        &mut self,
        near: u64,
        len: u64,
        prot: i32,
        max_distance: u64,
    ) -> Result<u64> {
        let maps = self.mappings()?;
        let tid = self.syscall_thread()?;
        for candidate in free_gaps_near(&maps, near, len, max_distance)
            .into_iter()
            .take(16)
        {
            match self.remote_mmap(Placement::Exact(candidate), len, prot) {
                Ok(a) => return Ok(a),
                Err(e)
                    if matches!(
                        e.remote_errno(),
                        Some(libc::EEXIST | libc::ENOMEM | libc::EPERM)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Err(SysError::RemoteSyscallFailed {
            pid: self.pid,
            tid,
            nr: libc::SYS_mmap,
            errno: libc::ENOMEM,
        })
    }

    /// `munmap` in the target.
    ///
    /// # Errors
    /// [`SysError::RemoteSyscallFailed`].
    pub fn remote_munmap(&mut self, addr: u64, len: u64) -> Result<()> {
        let tid = self.syscall_thread()?;
        let r = self.remote_syscall_in(tid, libc::SYS_munmap, &[addr, len])?;
        self.checked(tid, libc::SYS_munmap, r).map(drop)
    }

    /// `mprotect` in the target.
    ///
    /// # Errors
    /// [`SysError::RemoteSyscallFailed`].
    pub fn remote_mprotect(&mut self, addr: u64, len: u64, prot: i32) -> Result<()> {
        let tid = self.syscall_thread()?;
        let r = self.remote_syscall_in(tid, libc::SYS_mprotect, &[addr, len, prot as u64])?;
        self.checked(tid, libc::SYS_mprotect, r).map(drop)
    }

    /// Names an anonymous mapping (`[anon:NAME]` in `/proc/PID/maps`) so an operator can see
    /// what we mapped. The name is written at the start of the region itself (which must be
    /// readable by the target), passed to `prctl`, and the region's bytes are put back.
    /// `Ok(false)`: the kernel refused with EINVAL (built without `CONFIG_ANON_VMA_NAME`).
    ///
    /// # Errors
    /// [`SysError::InvalidArgument`] for a name the kernel would refuse (over 79 bytes, or
    /// characters outside printable ASCII, or any of `` \ ` $ [ ] ``); remote syscall errors.
    pub fn remote_prctl_set_vma_anon_name(
        &mut self,
        addr: u64,
        len: u64,
        name: &str,
    ) -> Result<bool> {
        validate_anon_name(name)?;
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        if len < bytes.len() as u64 {
            return Err(SysError::InvalidArgument(
                "region smaller than the name".into(),
            ));
        }
        let tid = self.syscall_thread()?;
        let saved = self.read_vec(addr, bytes.len())?;
        self.write(addr, &bytes)?;
        let nr = libc::SYS_prctl;
        let r = self.remote_syscall_in(
            tid,
            nr,
            &[PR_SET_VMA, PR_SET_VMA_ANON_NAME, addr, len, addr],
        );
        let restored = self.write(addr, &saved);
        let r = r?;
        restored?;
        if r == -i64::from(libc::EINVAL) {
            return Ok(false);
        }
        self.checked(tid, nr, r)?;
        Ok(true)
    }
}

impl<T: Tracer> StoppedProcess<T> {
    /// Builds the token from one thread the caller already holds in a `PTRACE_EVENT_STOP`
    /// (`stop`), seized by `tracer`'s thread (the load-time hook's [`crate::ThreadHold`]), then
    /// seizes and stops every other thread as [`stop_all_with`] does. On error every thread,
    /// `tid` included, has been let go.
    ///
    /// # Errors
    /// As [`stop_all_with`] (minus the already-traced check for `tid`, which we trace).
    pub fn from_held_thread(
        mut tracer: T,
        pid: Pid,
        tid: Tid,
        stop: StopKind,
        deadline: Instant,
    ) -> Result<Self> {
        let regs = match tracer.get_regs(pid, tid) {
            Ok(r) => r,
            Err(e) => {
                let _ = tracer.detach(pid, tid);
                return Err(e);
            }
        };
        let mut held = BTreeMap::new();
        held.insert(tid, StoppedThread { tid, regs, stop });
        let mut sp = Held {
            pid,
            held,
            gone: BTreeSet::new(),
            timings: StopTimings::default(),
        }
        .into_process(tracer);
        if let Err(e) = sp.adopt_new_threads(deadline) {
            let _ = sp.release_all();
            return Err(e);
        }
        Ok(sp)
    }
}

impl<T: Tracer> Drop for StoppedProcess<T> {
    fn drop(&mut self) {
        if let Err(e) = self.release_all() {
            tracing::warn!(pid = self.pid.0, error = %e, "releasing a stopped process");
        }
    }
}

/// Checks an anonymous VMA name the way the kernel does.
///
/// # Errors
/// [`SysError::InvalidArgument`].
pub fn validate_anon_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 79 {
        return Err(SysError::InvalidArgument(format!(
            "anon VMA name length {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .bytes()
        .find(|&c| !(0x20..=0x7e).contains(&c) || b"\\`$[]".contains(&c))
    {
        return Err(SysError::InvalidArgument(format!(
            "anon VMA name character {:?}",
            c as char
        )));
    }
    Ok(())
}

/// Start addresses for a `len`-byte mapping in the free gaps of `maps`, every byte within
/// `max_distance` of `near`, closest first. Keeps a page free next to existing mappings and the
/// kernel's guard gap below `[stack]`.
#[must_use]
pub fn free_gaps_near(maps: &[Mapping], near: u64, len: u64, max_distance: u64) -> Vec<u64> {
    let len = len.div_ceil(PAGE) * PAGE;
    if len == 0 {
        return Vec::new();
    }
    let mut sorted: Vec<&Mapping> = maps.iter().filter(|m| m.start < HIGH_ADDR).collect();
    sorted.sort_by_key(|m| m.start);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut prev_end = LOW_ADDR;
    let mut first = true;
    let mut consider = |gap_lo: u64, gap_hi: u64| {
        let lo = gap_lo.div_ceil(PAGE) * PAGE;
        let Some(hi) = gap_hi.checked_sub(len) else {
            return;
        };
        let hi = hi / PAGE * PAGE;
        if hi < lo {
            return;
        }
        let cand = (near / PAGE * PAGE).clamp(lo, hi);
        let dist = near.abs_diff(cand).max(near.abs_diff(cand + len));
        if dist <= max_distance {
            out.push((dist, cand));
        }
    };
    for m in sorted.iter().copied().chain(std::iter::once(&Mapping {
        start: HIGH_ADDR,
        end: HIGH_ADDR,
        perms: crate::types::Perms::default(),
        offset: 0,
        dev: (0, 0),
        inode: 0,
        name: String::new(),
    })) {
        let below = if m.name == "[stack]" {
            STACK_GUARD + PAGE
        } else if m.start == HIGH_ADDR {
            0
        } else {
            PAGE
        };
        let lo = if first { prev_end } else { prev_end + PAGE };
        first = false;
        if let Some(hi) = m.start.checked_sub(below)
            && hi > lo
        {
            consider(lo, hi);
        }
        prev_end = prev_end.max(m.end);
    }
    out.sort_unstable();
    out.into_iter().map(|(_, a)| a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, name: &str) -> Mapping {
        Mapping {
            start,
            end,
            perms: Perms::RX,
            offset: 0,
            dev: (0, 0),
            inode: 0,
            name: name.into(),
        }
    }

    fn fake_stopped(procmap_query: bool) -> StoppedProcess<crate::FakeTracer> {
        let pid = Pid(4242);
        let mut p = crate::FakeProcess::typical(pid, 0);
        p.procmap_query = procmap_query;
        p.add_region(crate::FakeRegion {
            start: 0x7fff_f000_0000,
            perms: Perms::RX,
            name: "[vdso]".into(),
            bytes: vec![0x0f, 0x05, 0x90, 0x90],
        });
        let mut f = crate::FakeTracer::new();
        f.add_process(pid, p);
        stop_all_with(f, pid, Instant::now() + Duration::from_secs(1)).expect("stopped")
    }

    /// Hazard: an answer kept past a remote syscall (the `mmap` of a region) would hide what
    /// it mapped. Queries after it see the new mapping, with and without `PROCMAP_QUERY`; the
    /// fallback reads the maps once per stretch in which nothing can change them.
    #[test]
    fn map_queries_after_a_remote_mmap_see_the_new_mapping() {
        use crate::tracer::CallKind;
        for procmap_query in [true, false] {
            let mut sp = fake_stopped(procmap_query);
            let exec = sp.exec_mappings().expect("exec");
            assert_eq!(exec.len(), 2, "{exec:?}");
            assert_eq!(exec[1].name, "[vdso]");
            let at = 0x5000_0000;
            assert_eq!(sp.query_mapping(at, MapQuery::COVERING).expect("q"), None);
            let got = sp
                .remote_mmap(Placement::Exact(at), 0x1_0000, libc::PROT_READ)
                .expect("mmap");
            assert_eq!(got, at);
            let m = sp
                .query_mapping(at + 0x8000, MapQuery::COVERING)
                .expect("q")
                .expect("the new mapping");
            assert_eq!((m.start, m.end), (at, at + 0x1_0000));
            let next = sp
                .query_mapping(at + 0x1_0000, MapQuery::COVERING_OR_NEXT)
                .expect("q")
                .expect("the stack above");
            assert!(next.start > at, "{next:?}");
            let reads = sp.tracer().count(CallKind::Mappings);
            // Without the kernel's query: one read before the mmap, one after.
            assert_eq!(reads, if procmap_query { 0 } else { 2 }, "{procmap_query}");
            sp.resume().expect("resume");
        }
    }

    #[test]
    fn gaps_closest_first_and_within_distance() {
        let maps = vec![
            map(0x40_0000, 0x50_0000, "/bin/x"),
            map(0x60_0000, 0x70_0000, "/lib/y"),
            map(0x7fff_0000_0000, 0x7fff_0002_0000, "[stack]"),
        ];
        let c = free_gaps_near(&maps, 0x4a_0000, 0x1000, 0x20_0000);
        // Right after /bin/x (one guard page), then right before it.
        assert_eq!(c.first().copied(), Some(0x50_1000));
        assert!(c.contains(&(0x40_0000 - 0x2000)));
        for a in &c {
            assert!(a.abs_diff(0x4a_0000) <= 0x20_0000);
            for m in &maps {
                assert!(
                    a + 0x1000 <= m.start || *a >= m.end,
                    "{a:#x} overlaps {m:?}"
                );
            }
        }
    }

    #[test]
    fn gaps_respect_stack_guard_and_size() {
        let maps = vec![map(0x7fff_0000_0000, 0x7fff_0002_0000, "[stack]")];
        let c = free_gaps_near(&maps, 0x7fff_0000_0000, 0x1000, 1 << 31);
        assert!(!c.is_empty());
        assert!(
            c.iter()
                .all(|&a| a + 0x1000 <= 0x7fff_0000_0000 - STACK_GUARD || a > 0x7fff_0002_0000)
        );
        // Too far: nothing.
        let maps = vec![map(0x1_0000, HIGH_ADDR, "/huge")];
        assert!(free_gaps_near(&maps, 0x40_0000, 0x1000, 1 << 31).is_empty());
        assert!(free_gaps_near(&[], 0x40_0000, 0, 1 << 31).is_empty());
    }

    #[test]
    fn anon_names() {
        assert!(validate_anon_name("stitch-tramp 1").is_ok());
        assert!(validate_anon_name("").is_err());
        assert!(validate_anon_name(&"x".repeat(80)).is_err());
        assert!(validate_anon_name("a[b").is_err());
        assert!(validate_anon_name("a$b").is_err());
        assert!(validate_anon_name("a\nb").is_err());
        assert!(validate_anon_name("é").is_err());
    }

    #[test]
    fn regs_resume_ip() {
        let mut r = Regs {
            rip: 0x1002,
            orig_rax: 0,
            rax: (-512i64).cast_unsigned(),
            ..Regs::default()
        };
        assert_eq!(r.resume_ip(), 0x1000);
        r.rax = (-516i64).cast_unsigned();
        assert_eq!(
            r.restart_pending(),
            Some(crate::types::SyscallRestart::RestartBlock)
        );
        r.orig_rax = u64::MAX;
        assert_eq!(r.resume_ip(), 0x1002);
        r.orig_rax = 0;
        r.rax = 5;
        assert_eq!(r.resume_ip(), 0x1002);
    }
}

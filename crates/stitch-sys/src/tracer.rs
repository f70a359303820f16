//! The OS boundary as a trait, so the stop/patch/revert protocol runs unchanged against the
//! kernel ([`crate::PtraceTracer`]) or an in-memory model ([`crate::FakeTracer`]).
//!
//! Every method states its precondition on the thread's state; both implementations enforce the
//! same preconditions (the fake returns the same errors the kernel would), so a protocol that
//! passes against the fake does not rely on anything the kernel would refuse.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::types::{MapQuery, Mapping, Pid, Regs, StopKind, TaskInfo, Tid};

/// A syscall to execute in a stopped thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSyscall {
    /// Address of an existing `syscall` instruction (0f 05) in an executable mapping.
    pub gadget: u64,
    /// Syscall number.
    pub nr: i64,
    /// Arguments (rdi, rsi, rdx, r10, r8, r9).
    pub args: [u64; 6],
}

/// What [`Tracer::query_mapping`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapAnswer {
    /// The mapping the query asked for.
    Found(Mapping),
    /// No mapping answers the query (`ENOENT`).
    NoneThere,
    /// This kernel cannot answer single queries (no `PROCMAP_QUERY`: before 6.11, `ENOTTY`
    /// or `EINVAL`): read the whole list ([`Tracer::mappings`]) instead.
    Unsupported,
}

/// The kinds of [`Tracer`] calls, for the fake's call log and failure injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CallKind {
    /// [`Tracer::task_info`]
    TaskInfo,
    /// [`Tracer::list_threads`]
    ListThreads,
    /// [`Tracer::mappings`]
    Mappings,
    /// [`Tracer::query_mapping`]
    QueryMapping,
    /// [`Tracer::seize`]
    Seize,
    /// [`Tracer::wait_stop`]
    WaitStop,
    /// [`Tracer::get_regs`]
    GetRegs,
    /// [`Tracer::set_regs`]
    SetRegs,
    /// [`Tracer::read_memory`]
    ReadMemory,
    /// [`Tracer::write_memory`]
    WriteMemory,
    /// [`Tracer::single_step`]
    SingleStep,
    /// [`Tracer::run_briefly`]
    RunBriefly,
    /// [`Tracer::syscall`]
    Syscall,
    /// [`Tracer::detach`]
    Detach,
}

impl CallKind {
    /// Every kind, for tests that inject a failure at every step.
    pub const ALL: [Self; 14] = [
        Self::TaskInfo,
        Self::ListThreads,
        Self::Mappings,
        Self::QueryMapping,
        Self::Seize,
        Self::WaitStop,
        Self::GetRegs,
        Self::SetRegs,
        Self::ReadMemory,
        Self::WriteMemory,
        Self::SingleStep,
        Self::RunBriefly,
        Self::Syscall,
        Self::Detach,
    ];
}

/// The OS operations the stop-the-world protocol is built from.
///
/// Thread states: *running* (not ours), *seized* (ours, stop requested, maybe still running),
/// *held* (ours and stopped in a `PTRACE_EVENT_STOP`, i.e. parked inside the kernel's signal
/// code, where restoring registers lets the kernel's own syscall-restart logic run).
/// Every operation that executes target code returns the thread to *held*.
pub trait Tracer {
    /// Facts about one task from `/proc` (state, flags, tracer, ignored signals, seccomp mode).
    /// Needs nothing. Gone: [`crate::SysError::ThreadGone`] (or `NoSuchProcess` for the leader).
    fn task_info(&mut self, pid: Pid, tid: Tid) -> Result<TaskInfo>;

    /// The process's current threads. Needs nothing.
    fn list_threads(&mut self, pid: Pid) -> Result<Vec<Tid>>;

    /// How many threads the process has right now (what [`Tracer::list_threads`] would
    /// count), if that can be had more cheaply than a listing; `None` otherwise. Used to
    /// confirm "no thread we do not hold" once every listed thread is held: they can create
    /// no thread, so an equal count proves it. Needs nothing.
    fn thread_count(&mut self, _pid: Pid) -> Result<Option<usize>> {
        Ok(None)
    }

    /// The process's mappings. Needs nothing.
    fn mappings(&mut self, pid: Pid) -> Result<Vec<Mapping>>;

    /// One mapping of the process, as `PROCMAP_QUERY` on its `/proc/PID/maps` answers it
    /// (see [`MapQuery`]; [`MapQuery::answer`] gives the same answer from a full list). Needs
    /// nothing; the answer is current (a caller that holds every thread knows it stays so).
    /// The default: [`MapAnswer::Unsupported`].
    fn query_mapping(&mut self, _pid: Pid, _addr: u64, _query: &MapQuery) -> Result<MapAnswer> {
        Ok(MapAnswer::Unsupported)
    }

    /// The process's `start_brk` and `startstack`, if known: the kernel names `[heap]` every
    /// anonymous mapping with `start <= brk` and `end >= start_brk`, and `[stack]` the one
    /// holding `startstack`. Needs nothing. Default: `None`.
    fn heap_and_stack(&mut self, _pid: Pid) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }

    /// Running → seized: `PTRACE_SEIZE` (no `PTRACE_O_EXITKILL`, ever) then `PTRACE_INTERRUPT`.
    /// EPERM comes back as `PermissionDenied`; the caller decides whether it means "already
    /// traced" by looking at `TracerPid`.
    fn seize(&mut self, pid: Pid, tid: Tid) -> Result<()>;

    /// Seized → held, waiting at most until `deadline`. Signals that arrive meanwhile are
    /// delivered to the target as if we were not there. `Execed`: the thread exec'd and has
    /// already been let go. `ThreadDidNotStop`: still seized (see that error's docs).
    fn wait_stop(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind>;

    /// Reads the registers of a held thread.
    fn get_regs(&mut self, pid: Pid, tid: Tid) -> Result<Regs>;

    /// Writes the registers of a held thread.
    fn set_regs(&mut self, pid: Pid, tid: Tid, regs: &Regs) -> Result<()>;

    /// Reads target memory; all of `buf` or an error.
    fn read_memory(&mut self, pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()>;

    /// Reads several ranges into consecutive parts of `out` (range `i` right after range
    /// `i - 1`; `out` must hold their total length); one result per range, each as
    /// [`Tracer::read_memory`] would give it. The default reads them one by one; the kernel
    /// tracer batches them.
    fn read_memory_many(
        &mut self,
        pid: Pid,
        ranges: &[(u64, usize)],
        out: &mut [u8],
    ) -> Vec<Result<()>> {
        let mut rest = out;
        ranges
            .iter()
            .map(|&(addr, len)| {
                let n = len.min(rest.len());
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                if part.len() < len {
                    return Err(crate::SysError::InvalidArgument(
                        "read_memory_many: output buffer too small".into(),
                    ));
                }
                self.read_memory(pid, addr, part)
            })
            .collect()
    }

    /// Writes target memory, also read-only text; all of `data` or an error. `via` is a held
    /// thread (the `PTRACE_POKEDATA` fallback needs one).
    fn write_memory(&mut self, pid: Pid, via: Tid, addr: u64, data: &[u8]) -> Result<()>;

    /// Held → executes one instruction → held.
    fn single_step(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind>;

    /// Held → runs its own code for about `run_for` → held (signals delivered normally).
    fn run_briefly(
        &mut self,
        pid: Pid,
        tid: Tid,
        run_for: Duration,
        deadline: Instant,
    ) -> Result<StopKind>;

    /// Held → executes `call` at `call.gadget` → held, with registers, signal mask and any
    /// interrupted syscall exactly as before. Returns the raw kernel result (`-errno` on failure).
    fn syscall(
        &mut self,
        pid: Pid,
        tid: Tid,
        call: &RemoteSyscall,
        deadline: Instant,
    ) -> Result<i64>;

    /// After one or more [`Tracer::syscall`]s in `tid`: back to a `PTRACE_EVENT_STOP`. The
    /// kernel tracer runs remote syscalls in one stop each by single-stepping, which leaves
    /// the thread in the step's signal-delivery-stop — fine for the next remote syscall, a
    /// run or a detach (each resumes with signal 0, discarding the trap), but were the tracer
    /// to die there, the kernel would deliver that SIGTRAP. Call this once a sequence of
    /// remote syscalls is done. No-op for a thread already parked.
    fn settle(&mut self, _pid: Pid, _tid: Tid, _deadline: Instant) -> Result<()> {
        Ok(())
    }

    /// Held → running and no longer ours. A thread that is already gone is not an error.
    fn detach(&mut self, pid: Pid, tid: Tid) -> Result<()>;

    /// Called once when the caller is done with `pid` (drop cached file descriptors).
    fn release_process(&mut self, _pid: Pid) {}
}

impl<T: Tracer + ?Sized> Tracer for &mut T {
    fn task_info(&mut self, pid: Pid, tid: Tid) -> Result<TaskInfo> {
        (**self).task_info(pid, tid)
    }
    fn list_threads(&mut self, pid: Pid) -> Result<Vec<Tid>> {
        (**self).list_threads(pid)
    }
    fn thread_count(&mut self, pid: Pid) -> Result<Option<usize>> {
        (**self).thread_count(pid)
    }
    fn mappings(&mut self, pid: Pid) -> Result<Vec<Mapping>> {
        (**self).mappings(pid)
    }
    fn query_mapping(&mut self, pid: Pid, addr: u64, query: &MapQuery) -> Result<MapAnswer> {
        (**self).query_mapping(pid, addr, query)
    }
    fn heap_and_stack(&mut self, pid: Pid) -> Result<Option<(u64, u64)>> {
        (**self).heap_and_stack(pid)
    }
    fn seize(&mut self, pid: Pid, tid: Tid) -> Result<()> {
        (**self).seize(pid, tid)
    }
    fn wait_stop(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind> {
        (**self).wait_stop(pid, tid, deadline)
    }
    fn get_regs(&mut self, pid: Pid, tid: Tid) -> Result<Regs> {
        (**self).get_regs(pid, tid)
    }
    fn set_regs(&mut self, pid: Pid, tid: Tid, regs: &Regs) -> Result<()> {
        (**self).set_regs(pid, tid, regs)
    }
    fn read_memory(&mut self, pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_memory(pid, addr, buf)
    }
    fn read_memory_many(
        &mut self,
        pid: Pid,
        ranges: &[(u64, usize)],
        out: &mut [u8],
    ) -> Vec<Result<()>> {
        (**self).read_memory_many(pid, ranges, out)
    }
    fn write_memory(&mut self, pid: Pid, via: Tid, addr: u64, data: &[u8]) -> Result<()> {
        (**self).write_memory(pid, via, addr, data)
    }
    fn single_step(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind> {
        (**self).single_step(pid, tid, deadline)
    }
    fn run_briefly(
        &mut self,
        pid: Pid,
        tid: Tid,
        run_for: Duration,
        deadline: Instant,
    ) -> Result<StopKind> {
        (**self).run_briefly(pid, tid, run_for, deadline)
    }
    fn syscall(
        &mut self,
        pid: Pid,
        tid: Tid,
        call: &RemoteSyscall,
        deadline: Instant,
    ) -> Result<i64> {
        (**self).syscall(pid, tid, call, deadline)
    }
    fn settle(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<()> {
        (**self).settle(pid, tid, deadline)
    }
    fn detach(&mut self, pid: Pid, tid: Tid) -> Result<()> {
        (**self).detach(pid, tid)
    }
    fn release_process(&mut self, pid: Pid) {
        (**self).release_process(pid);
    }
}

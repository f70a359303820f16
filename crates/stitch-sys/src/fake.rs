//! [`FakeTracer`]: an in-memory model of a few processes, for testing protocols built on
//! [`Tracer`] without a kernel.
//!
//! It is *honest*: it enforces the kernel's preconditions (registers only of held threads,
//! detach only of held threads, memory only where something is mapped, a remote syscall only at
//! a real `0f 05` in an executable region, an anon name read from target memory) and returns the
//! same error variants the real tracer returns. Failure injection ("fail the Nth call of kind K")
//! makes the call fail *without effect*, so a test can inject a failure at every step of a
//! protocol and check that nothing is left stopped or half-written.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use crate::error::{Result, SysError};
use crate::stop::{PR_SET_VMA, PR_SET_VMA_ANON_NAME};
use crate::tracer::{CallKind, MapAnswer, RemoteSyscall, Tracer};
use crate::types::{MapQuery, Mapping, Perms, Pid, Regs, StopKind, TaskInfo, TaskState, Tid};

/// The thread id the fake reports as `TracerPid` for threads it holds.
pub const FAKE_TRACER_TID: i32 = 999_999;

/// State of a fake thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeThreadState {
    /// Not ours.
    Running,
    /// Seized, stop requested.
    Seized,
    /// Held.
    Stopped,
    /// Exited.
    Exited,
}

/// One fake thread.
#[derive(Debug, Clone)]
pub struct FakeThread {
    /// Registers.
    pub regs: Regs,
    /// State.
    pub state: FakeThreadState,
    /// `TracerPid` of another tracer (0 = none).
    pub traced_by: i32,
    /// Exits between the task listing and our seize (seize fails with "gone").
    pub exits_before_seize: bool,
    /// Exits after being seized, before stopping.
    pub exits_before_stop: bool,
    /// Never reaches a stop (uninterruptible sleep).
    pub never_stops: bool,
    /// Exits during a brief run.
    pub exits_on_run: bool,
    /// RIPs taken by successive brief runs (default: unchanged).
    pub rip_after_run: VecDeque<u64>,
    /// RIPs taken by successive single steps (default: `rip + 1`).
    pub rip_after_step: VecDeque<u64>,
}

impl FakeThread {
    /// A running thread at `rip`.
    #[must_use]
    pub fn at(rip: u64) -> Self {
        Self {
            regs: Regs {
                rip,
                rsp: 0x7ffd_0000_8000,
                orig_rax: u64::MAX,
                ..Regs::default()
            },
            state: FakeThreadState::Running,
            traced_by: 0,
            exits_before_seize: false,
            exits_before_stop: false,
            never_stops: false,
            exits_on_run: false,
            rip_after_run: VecDeque::new(),
            rip_after_step: VecDeque::new(),
        }
    }
}

/// One fake mapping with its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct FakeRegion {
    /// Start address (page aligned).
    pub start: u64,
    /// Protection.
    pub perms: Perms,
    /// Name as in `/proc/PID/maps`.
    pub name: String,
    /// Contents (length = size).
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for FakeRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FakeRegion({:#x}..{:#x} {:?} {:?})",
            self.start,
            self.end(),
            self.perms,
            self.name
        )
    }
}

impl FakeRegion {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// One fake process.
#[derive(Debug, Clone)]
pub struct FakeProcess {
    /// Leader state.
    pub state: TaskState,
    /// `PF_*` flags.
    pub flags: u64,
    /// Virtual size (0 = kernel thread).
    pub vsize: u64,
    /// Ignored signals.
    pub sig_ignored: u64,
    /// Seize fails with EPERM although nobody traces it (no privilege).
    pub deny_ptrace: bool,
    /// Job-control stopped with this signal.
    pub group_stop: Option<i32>,
    /// Syscalls the seccomp policy would kill for.
    pub seccomp_kills: Vec<i64>,
    /// Whether `PR_SET_VMA_ANON_NAME` works (`CONFIG_ANON_VMA_NAME`).
    pub anon_names: bool,
    /// Whether single mappings can be queried (`PROCMAP_QUERY`, Linux 6.11+); else
    /// [`Tracer::query_mapping`] answers [`MapAnswer::Unsupported`].
    pub procmap_query: bool,
    /// Mappings, sorted, non-overlapping.
    pub regions: Vec<FakeRegion>,
    /// Threads.
    pub threads: BTreeMap<Tid, FakeThread>,
    /// Threads that appear at successive `list_threads` calls (a clone racing with the stop).
    pub appear_on_list: VecDeque<Vec<(Tid, FakeThread)>>,
}

impl FakeProcess {
    /// A plausible process: leader `pid` plus `extra_threads` more, an `r-xp` text region at
    /// 0x400000 (4 pages, `0f 05` at 0x400100, `nop`s elsewhere), a data page and a stack.
    #[must_use]
    pub fn typical(pid: Pid, extra_threads: usize) -> Self {
        let mut text = vec![0x90u8; 4 * 4096];
        text[0x100] = 0x0f;
        text[0x101] = 0x05;
        let mut p = Self {
            state: TaskState::Sleeping,
            flags: 0x40_0000,
            vsize: 8 << 20,
            sig_ignored: 0,
            deny_ptrace: false,
            group_stop: None,
            seccomp_kills: Vec::new(),
            anon_names: true,
            procmap_query: true,
            regions: Vec::new(),
            threads: BTreeMap::new(),
            appear_on_list: VecDeque::new(),
        };
        p.add_region(FakeRegion {
            start: 0x40_0000,
            perms: Perms::RX,
            name: "/usr/bin/fake".into(),
            bytes: text,
        });
        p.add_region(FakeRegion {
            start: 0x60_0000,
            perms: Perms::RW,
            name: "/usr/bin/fake".into(),
            bytes: vec![0; 4096],
        });
        p.add_region(FakeRegion {
            start: 0x7ffd_0000_0000,
            perms: Perms::RW,
            name: "[stack]".into(),
            bytes: vec![0; 0x1_0000],
        });
        p.threads.insert(pid.leader(), FakeThread::at(0x40_0200));
        for i in 0..extra_threads {
            let tid = Tid(pid.0 + 1 + i32::try_from(i).unwrap_or(0));
            p.threads
                .insert(tid, FakeThread::at(0x40_0300 + 16 * i as u64));
        }
        p
    }

    /// The mappings as `/proc/PID/maps` lists them.
    fn maps(&self) -> Vec<Mapping> {
        self.regions
            .iter()
            .map(|r| Mapping {
                start: r.start,
                end: r.end(),
                perms: r.perms,
                offset: 0,
                dev: (0, 0),
                inode: 0,
                name: r.name.clone(),
            })
            .collect()
    }

    /// Adds a region (keeps them sorted).
    pub fn add_region(&mut self, r: FakeRegion) {
        self.regions.push(r);
        self.regions.sort_by_key(|r| r.start);
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.regions
            .iter()
            .any(|r| r.start < end && start < r.end())
    }

    /// Splits regions so that `addr` is a boundary.
    fn split_at(&mut self, addr: u64) {
        if let Some(i) = self
            .regions
            .iter()
            .position(|r| r.start < addr && addr < r.end())
        {
            let r = &mut self.regions[i];
            let tail = r.bytes.split_off((addr - r.start) as usize);
            let new = FakeRegion {
                start: addr,
                perms: r.perms,
                name: r.name.clone(),
                bytes: tail,
            };
            self.regions.insert(i + 1, new);
        }
    }

    /// Whether [start, end) is entirely mapped.
    fn fully_mapped(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for r in &self.regions {
            if r.start <= at && at < r.end() {
                at = r.end();
                if at >= end {
                    return true;
                }
            }
        }
        start >= end
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let end = addr + buf.len() as u64;
        if !self.fully_mapped(addr, end) {
            return false;
        }
        for r in &self.regions {
            let lo = r.start.max(addr);
            let hi = r.end().min(end);
            if lo < hi {
                buf[(lo - addr) as usize..(hi - addr) as usize]
                    .copy_from_slice(&r.bytes[(lo - r.start) as usize..(hi - r.start) as usize]);
            }
        }
        true
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        let end = addr + data.len() as u64;
        if !self.fully_mapped(addr, end) {
            return false;
        }
        for r in &mut self.regions {
            let lo = r.start.max(addr);
            let hi = r.end().min(end);
            if lo < hi {
                let rs = r.start;
                r.bytes[(lo - rs) as usize..(hi - rs) as usize]
                    .copy_from_slice(&data[(lo - addr) as usize..(hi - addr) as usize]);
            }
        }
        true
    }

    fn mmap(&mut self, addr: u64, len: u64, prot: i32, flags: i32) -> i64 {
        const PAGE: u64 = 4096;
        if len == 0 || !addr.is_multiple_of(PAGE) {
            return -i64::from(libc::EINVAL);
        }
        let len = len.div_ceil(PAGE) * PAGE;
        let start = if flags & libc::MAP_FIXED_NOREPLACE != 0 {
            if self.overlaps(addr, addr + len) {
                return -i64::from(libc::EEXIST);
            }
            addr
        } else if flags & libc::MAP_FIXED != 0 {
            // Not reachable through StoppedProcess; modelled for completeness.
            self.unmap(addr, len);
            addr
        } else if addr != 0 && !self.overlaps(addr, addr + len) {
            addr
        } else {
            // Top-down from below the stack, like the kernel's default layout.
            let mut top = 0x7f00_0000_0000u64;
            loop {
                let s = top - len;
                if !self.overlaps(s, top) {
                    break s;
                }
                top = self
                    .regions
                    .iter()
                    .filter(|r| r.start < top)
                    .map(|r| r.start)
                    .max()
                    .unwrap_or(top - len);
            }
        };
        self.add_region(FakeRegion {
            start,
            perms: Perms::from_prot(prot),
            name: String::new(),
            bytes: vec![0; len as usize],
        });
        start.cast_signed()
    }

    fn unmap(&mut self, addr: u64, len: u64) {
        let end = addr + len;
        self.split_at(addr);
        self.split_at(end);
        self.regions.retain(|r| r.end() <= addr || r.start >= end);
    }

    fn mprotect(&mut self, addr: u64, len: u64, prot: i32) -> i64 {
        let end = addr + len.div_ceil(4096) * 4096;
        if !self.fully_mapped(addr, end) {
            return -i64::from(libc::ENOMEM);
        }
        self.split_at(addr);
        self.split_at(end);
        for r in &mut self.regions {
            if r.start >= addr && r.end() <= end {
                let shared = r.perms.shared;
                r.perms = Perms {
                    shared,
                    ..Perms::from_prot(prot)
                };
            }
        }
        0
    }

    fn set_anon_name(&mut self, addr: u64, len: u64, name_ptr: u64) -> i64 {
        if !self.anon_names {
            return -i64::from(libc::EINVAL);
        }
        let mut name = Vec::new();
        for i in 0..80u64 {
            let mut b = [0u8];
            if !self.read(name_ptr + i, &mut b) {
                return -i64::from(libc::EFAULT);
            }
            if b[0] == 0 {
                break;
            }
            name.push(b[0]);
        }
        let Ok(name) = String::from_utf8(name) else {
            return -i64::from(libc::EINVAL);
        };
        if crate::stop::validate_anon_name(&name).is_err() {
            return -i64::from(libc::EINVAL);
        }
        let end = addr + len;
        if !self.fully_mapped(addr, end) {
            return -i64::from(libc::ENOMEM);
        }
        if self.regions.iter().any(|r| {
            r.start < end && addr < r.end() && !(r.name.is_empty() || r.name.starts_with("[anon:"))
        }) {
            return -i64::from(libc::EBADF);
        }
        self.split_at(addr);
        self.split_at(end);
        for r in &mut self.regions {
            if r.start >= addr && r.end() <= end {
                r.name = format!("[anon:{name}]");
            }
        }
        0
    }
}

/// One logged call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Kind.
    pub kind: CallKind,
    /// 1-based index among calls of this kind.
    pub nth: usize,
    /// Process.
    pub pid: Pid,
    /// Thread, where the call names one.
    pub tid: Option<Tid>,
    /// Address and length for memory calls.
    pub mem: Option<(u64, usize)>,
    /// Syscall number for remote syscalls.
    pub nr: Option<i64>,
    /// Whether it failed by injection.
    pub injected: bool,
}

type ErrorFn = Box<dyn Fn(&Call) -> SysError + Send>;

struct Fault {
    kind: CallKind,
    nth: usize,
    make: Option<ErrorFn>,
}

/// The in-memory tracer.
#[derive(Default)]
pub struct FakeTracer {
    procs: BTreeMap<Pid, FakeProcess>,
    log: Vec<Call>,
    counts: BTreeMap<CallKind, usize>,
    faults: Vec<Fault>,
}

impl std::fmt::Debug for FakeTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeTracer")
            .field("procs", &self.procs)
            .field("log", &self.log.len())
            .finish()
    }
}

fn os(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

impl FakeTracer {
    /// An empty world.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a process.
    pub fn add_process(&mut self, pid: Pid, p: FakeProcess) {
        self.procs.insert(pid, p);
    }

    /// A process, to inspect or modify.
    pub fn process(&self, pid: Pid) -> Option<&FakeProcess> {
        self.procs.get(&pid)
    }

    /// A process, mutably.
    pub fn process_mut(&mut self, pid: Pid) -> Option<&mut FakeProcess> {
        self.procs.get_mut(&pid)
    }

    /// Makes the `nth` (1-based) call of `kind` fail, without effect, with a realistic error.
    pub fn fail_nth(&mut self, kind: CallKind, nth: usize) {
        self.faults.push(Fault {
            kind,
            nth,
            make: None,
        });
    }

    /// Makes the `nth` call of `kind` fail with the error `make` builds.
    pub fn fail_nth_with(
        &mut self,
        kind: CallKind,
        nth: usize,
        make: impl Fn(&Call) -> SysError + Send + 'static,
    ) {
        self.faults.push(Fault {
            kind,
            nth,
            make: Some(Box::new(make)),
        });
    }

    /// Removes all injected failures.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Every call so far.
    #[must_use]
    pub fn calls(&self) -> &[Call] {
        &self.log
    }

    /// How many calls of `kind` so far.
    #[must_use]
    pub fn count(&self, kind: CallKind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// Forgets the log and counters (injected faults stay).
    pub fn reset_log(&mut self) {
        self.log.clear();
        self.counts.clear();
    }

    /// A thread's state.
    #[must_use]
    pub fn thread_state(&self, pid: Pid, tid: Tid) -> Option<FakeThreadState> {
        self.procs.get(&pid)?.threads.get(&tid).map(|t| t.state)
    }

    /// True when no thread of `pid` is seized or held by us.
    #[must_use]
    pub fn all_released(&self, pid: Pid) -> bool {
        self.procs.get(&pid).is_none_or(|p| {
            p.threads
                .values()
                .all(|t| matches!(t.state, FakeThreadState::Running | FakeThreadState::Exited))
        })
    }

    /// Bytes of target memory (None where unmapped).
    #[must_use]
    pub fn memory(&self, pid: Pid, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0; len];
        self.procs.get(&pid)?.read(addr, &mut v).then_some(v)
    }

    fn default_error(call: &Call) -> SysError {
        let pid = call.pid;
        let tid = call.tid.unwrap_or(pid.leader());
        match call.kind {
            CallKind::TaskInfo
            | CallKind::ListThreads
            | CallKind::Mappings
            | CallKind::QueryMapping => SysError::Proc {
                path: format!("/proc/{pid}"),
                source: os(libc::EIO),
            },
            CallKind::ReadMemory | CallKind::WriteMemory => {
                let (addr, len) = call.mem.unwrap_or((0, 0));
                SysError::MemIo {
                    op: "injected",
                    pid,
                    addr,
                    len,
                    source: os(libc::EIO),
                }
            }
            CallKind::WaitStop => SysError::ThreadDidNotStop {
                pid,
                tid,
                waited: Duration::ZERO,
                left_seized: Vec::new(),
            },
            _ => SysError::Ptrace {
                op: "injected",
                pid,
                tid,
                source: os(libc::EIO),
            },
        }
    }

    /// Logs the call and returns the injected error, if any.
    fn enter(
        &mut self,
        kind: CallKind,
        pid: Pid,
        tid: Option<Tid>,
        mem: Option<(u64, usize)>,
        nr: Option<i64>,
    ) -> Result<()> {
        let nth = {
            let c = self.counts.entry(kind).or_insert(0);
            *c += 1;
            *c
        };
        let mut call = Call {
            kind,
            nth,
            pid,
            tid,
            mem,
            nr,
            injected: false,
        };
        if let Some(f) = self.faults.iter().find(|f| f.kind == kind && f.nth == nth) {
            call.injected = true;
            let err = f
                .make
                .as_ref()
                .map_or_else(|| Self::default_error(&call), |m| m(&call));
            self.log.push(call);
            return Err(err);
        }
        self.log.push(call);
        Ok(())
    }

    fn proc_mut(&mut self, pid: Pid) -> Result<&mut FakeProcess> {
        self.procs
            .get_mut(&pid)
            .ok_or(SysError::NoSuchProcess { pid })
    }

    fn thread_mut(&mut self, pid: Pid, tid: Tid) -> Result<&mut FakeThread> {
        let p = self.proc_mut(pid)?;
        match p.threads.get_mut(&tid) {
            Some(t) if t.state != FakeThreadState::Exited => Ok(t),
            _ => Err(SysError::ThreadGone { pid, tid }),
        }
    }

    /// The kernel's answer to a ptrace request on a thread that is not held: ESRCH.
    fn held_mut(&mut self, op: &'static str, pid: Pid, tid: Tid) -> Result<&mut FakeThread> {
        let t = self.thread_mut(pid, tid)?;
        if t.state != FakeThreadState::Stopped {
            return Err(SysError::Ptrace {
                op,
                pid,
                tid,
                source: os(libc::ESRCH),
            });
        }
        Ok(t)
    }

    fn stop_kind(&self, pid: Pid) -> StopKind {
        self.procs
            .get(&pid)
            .and_then(|p| p.group_stop)
            .map_or(StopKind::Interrupted, StopKind::GroupStopped)
    }
}

impl Tracer for FakeTracer {
    fn task_info(&mut self, pid: Pid, tid: Tid) -> Result<TaskInfo> {
        self.enter(CallKind::TaskInfo, pid, Some(tid), None, None)?;
        let p = self
            .procs
            .get(&pid)
            .ok_or(SysError::NoSuchProcess { pid })?;
        let gone = if tid == pid.leader() {
            SysError::NoSuchProcess { pid }
        } else {
            SysError::ThreadGone { pid, tid }
        };
        let t = p.threads.get(&tid).ok_or(gone)?;
        let state = match t.state {
            FakeThreadState::Exited => TaskState::Zombie,
            FakeThreadState::Stopped => TaskState::TracingStop,
            _ if tid == pid.leader() => p.state,
            _ => TaskState::Sleeping,
        };
        let tracer_pid = match t.state {
            FakeThreadState::Seized | FakeThreadState::Stopped => FAKE_TRACER_TID,
            _ => t.traced_by,
        };
        Ok(TaskInfo {
            state,
            flags: p.flags,
            vsize: p.vsize,
            tracer_pid,
            sig_ignored: p.sig_ignored,
            seccomp: 0,
        })
    }

    fn list_threads(&mut self, pid: Pid) -> Result<Vec<Tid>> {
        self.enter(CallKind::ListThreads, pid, None, None, None)?;
        let p = self.proc_mut(pid)?;
        if let Some(new) = p.appear_on_list.pop_front() {
            p.threads.extend(new);
        }
        Ok(p.threads
            .iter()
            .filter(|(_, t)| t.state != FakeThreadState::Exited)
            .map(|(&tid, _)| tid)
            .collect())
    }

    /// Counted as a [`CallKind::ListThreads`] call. Threads not yet on the list (but already
    /// created) count, as a zombie leader does for the kernel.
    fn thread_count(&mut self, pid: Pid) -> Result<Option<usize>> {
        self.enter(CallKind::ListThreads, pid, None, None, None)?;
        let p = self.proc_mut(pid)?;
        let live = p
            .threads
            .iter()
            .filter(|&(&tid, t)| t.state != FakeThreadState::Exited || tid == pid.leader())
            .count();
        Ok(Some(
            live + p.appear_on_list.iter().map(Vec::len).sum::<usize>(),
        ))
    }

    fn mappings(&mut self, pid: Pid) -> Result<Vec<Mapping>> {
        self.enter(CallKind::Mappings, pid, None, None, None)?;
        let p = self.proc_mut(pid)?;
        Ok(p.maps())
    }

    /// The starts of the regions named `[heap]` and `[stack]` (0 without one). Logged as a
    /// [`CallKind::TaskInfo`] call (a `stat` read).
    fn heap_and_stack(&mut self, pid: Pid) -> Result<Option<(u64, u64)>> {
        self.enter(CallKind::TaskInfo, pid, None, None, None)?;
        let p = self.proc_mut(pid)?;
        let start = |name: &str| {
            p.regions
                .iter()
                .find(|r| r.name == name)
                .map_or(0, |r| r.start)
        };
        Ok(Some((start("[heap]"), start("[stack]"))))
    }

    /// Logged as [`CallKind::QueryMapping`] (an unsupported answer too: the kernel is asked).
    fn query_mapping(&mut self, pid: Pid, addr: u64, query: &MapQuery) -> Result<MapAnswer> {
        self.enter(CallKind::QueryMapping, pid, None, Some((addr, 0)), None)?;
        let p = self.proc_mut(pid)?;
        if !p.procmap_query {
            return Ok(MapAnswer::Unsupported);
        }
        let maps = p.maps();
        Ok(match query.answer(&maps, addr) {
            Some(m) => MapAnswer::Found(Mapping {
                name: if query.name {
                    m.name.clone()
                } else {
                    String::new()
                },
                ..m.clone()
            }),
            None => MapAnswer::NoneThere,
        })
    }

    fn seize(&mut self, pid: Pid, tid: Tid) -> Result<()> {
        self.enter(CallKind::Seize, pid, Some(tid), None, None)?;
        let deny = self.proc_mut(pid)?.deny_ptrace;
        let t = self.thread_mut(pid, tid)?;
        if t.exits_before_seize {
            t.state = FakeThreadState::Exited;
            return Err(SysError::ThreadGone { pid, tid });
        }
        if t.state != FakeThreadState::Running || t.traced_by != 0 || deny {
            return Err(SysError::PermissionDenied {
                op: "ptrace seize",
                pid,
                tid,
                source: os(libc::EPERM),
            });
        }
        t.state = FakeThreadState::Seized;
        Ok(())
    }

    fn wait_stop(&mut self, pid: Pid, tid: Tid, _deadline: Instant) -> Result<StopKind> {
        self.enter(CallKind::WaitStop, pid, Some(tid), None, None)?;
        let kind = self.stop_kind(pid);
        let t = self.thread_mut(pid, tid)?;
        match t.state {
            FakeThreadState::Seized if t.exits_before_stop => {
                t.state = FakeThreadState::Exited;
                Err(SysError::ThreadGone { pid, tid })
            }
            FakeThreadState::Seized if t.never_stops => Err(SysError::ThreadDidNotStop {
                pid,
                tid,
                waited: Duration::ZERO,
                left_seized: Vec::new(),
            }),
            FakeThreadState::Seized | FakeThreadState::Stopped => {
                t.state = FakeThreadState::Stopped;
                Ok(kind)
            }
            _ => Err(SysError::Ptrace {
                op: "waitpid",
                pid,
                tid,
                source: os(libc::ECHILD),
            }),
        }
    }

    fn get_regs(&mut self, pid: Pid, tid: Tid) -> Result<Regs> {
        self.enter(CallKind::GetRegs, pid, Some(tid), None, None)?;
        Ok(self.held_mut("ptrace getregs", pid, tid)?.regs)
    }

    fn set_regs(&mut self, pid: Pid, tid: Tid, regs: &Regs) -> Result<()> {
        self.enter(CallKind::SetRegs, pid, Some(tid), None, None)?;
        self.held_mut("ptrace setregs", pid, tid)?.regs = *regs;
        Ok(())
    }

    fn read_memory(&mut self, pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.enter(
            CallKind::ReadMemory,
            pid,
            None,
            Some((addr, buf.len())),
            None,
        )?;
        let len = buf.len();
        if self.proc_mut(pid)?.read(addr, buf) {
            Ok(())
        } else {
            Err(SysError::MemIo {
                op: "read /proc/PID/mem",
                pid,
                addr,
                len,
                source: os(libc::EIO),
            })
        }
    }

    fn write_memory(&mut self, pid: Pid, via: Tid, addr: u64, data: &[u8]) -> Result<()> {
        self.enter(
            CallKind::WriteMemory,
            pid,
            Some(via),
            Some((addr, data.len())),
            None,
        )?;
        self.held_mut("write memory", pid, via)?;
        if self.proc_mut(pid)?.write(addr, data) {
            Ok(())
        } else {
            Err(SysError::MemIo {
                op: "write /proc/PID/mem",
                pid,
                addr,
                len: data.len(),
                source: os(libc::EIO),
            })
        }
    }

    fn single_step(&mut self, pid: Pid, tid: Tid, _deadline: Instant) -> Result<StopKind> {
        self.enter(CallKind::SingleStep, pid, Some(tid), None, None)?;
        let kind = self.stop_kind(pid);
        let t = self.held_mut("single step", pid, tid)?;
        t.regs.rip = t.rip_after_step.pop_front().unwrap_or(t.regs.rip + 1);
        t.regs.orig_rax = u64::MAX;
        Ok(kind)
    }

    fn run_briefly(
        &mut self,
        pid: Pid,
        tid: Tid,
        _run_for: Duration,
        _deadline: Instant,
    ) -> Result<StopKind> {
        self.enter(CallKind::RunBriefly, pid, Some(tid), None, None)?;
        let kind = self.stop_kind(pid);
        let t = self.held_mut("run briefly", pid, tid)?;
        if t.exits_on_run {
            t.state = FakeThreadState::Exited;
            return Err(SysError::ThreadGone { pid, tid });
        }
        if let Some(rip) = t.rip_after_run.pop_front() {
            t.regs.rip = rip;
            t.regs.orig_rax = u64::MAX;
        }
        Ok(kind)
    }

    fn syscall(
        &mut self,
        pid: Pid,
        tid: Tid,
        call: &RemoteSyscall,
        _deadline: Instant,
    ) -> Result<i64> {
        self.enter(CallKind::Syscall, pid, Some(tid), None, Some(call.nr))?;
        self.held_mut("remote syscall", pid, tid)?;
        let p = self.proc_mut(pid)?;
        let mut insn = [0u8; 2];
        let in_exec = p
            .regions
            .iter()
            .any(|r| r.perms.exec && r.start <= call.gadget && call.gadget + 2 <= r.end());
        if !in_exec || !p.read(call.gadget, &mut insn) || insn != [0x0f, 0x05] {
            return Err(SysError::UnexpectedStop {
                op: "remote syscall",
                pid,
                tid,
                what: format!("no syscall instruction at {:#x}", call.gadget),
            });
        }
        if p.seccomp_kills.contains(&call.nr) {
            return Err(SysError::SeccompForbids {
                pid,
                tid,
                nr: call.nr,
                why: "KillProcess".into(),
            });
        }
        let [a0, a1, a2, a3, a4, _] = call.args;
        let prot = i32::try_from(a2).unwrap_or(-1);
        Ok(match call.nr {
            libc::SYS_mmap => p.mmap(a0, a1, prot, i32::try_from(a3).unwrap_or(0)),
            libc::SYS_munmap => {
                if !a0.is_multiple_of(4096) || a1 == 0 {
                    -i64::from(libc::EINVAL)
                } else {
                    p.unmap(a0, a1.div_ceil(4096) * 4096);
                    0
                }
            }
            libc::SYS_mprotect => p.mprotect(a0, a1, prot),
            libc::SYS_prctl if a0 == PR_SET_VMA && a1 == PR_SET_VMA_ANON_NAME => {
                p.set_anon_name(a2, a3, a4)
            }
            libc::SYS_getpid => i64::from(pid.0),
            libc::SYS_gettid => i64::from(tid.0),
            _ => -i64::from(libc::ENOSYS),
        })
    }

    fn detach(&mut self, pid: Pid, tid: Tid) -> Result<()> {
        self.enter(CallKind::Detach, pid, Some(tid), None, None)?;
        let t = match self.thread_mut(pid, tid) {
            Ok(t) => t,
            // Already gone: nothing to release (as with the real tracer).
            Err(e) if e.is_gone() => return Ok(()),
            Err(e) => return Err(e),
        };
        if t.state != FakeThreadState::Stopped {
            return Err(SysError::Ptrace {
                op: "ptrace detach",
                pid,
                tid,
                source: os(libc::ESRCH),
            });
        }
        t.state = FakeThreadState::Running;
        Ok(())
    }
}

//! Plain data shared by the real tracer, the fake and the engine.

use std::fmt;

/// A process id (thread-group id). Distinct from [`Tid`] so the two cannot be swapped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pid(pub i32);

/// A thread id (the kernel's task id; the leader's equals the [`Pid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tid(pub i32);

impl Pid {
    /// The thread id of this process's leader thread.
    #[must_use]
    pub fn leader(self) -> Tid {
        Tid(self.0)
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `-ERESTARTSYS`: the kernel restarts the syscall when no handler runs (or the handler has
/// `SA_RESTART`).
pub const ERESTARTSYS: i64 = -512;
/// `-ERESTARTNOINTR`: always restarted.
pub const ERESTARTNOINTR: i64 = -513;
/// `-ERESTARTNOHAND`: restarted unless a handler runs.
pub const ERESTARTNOHAND: i64 = -514;
/// `-ERESTART_RESTARTBLOCK`: restarted through `restart_syscall(2)` (nanosleep, poll, futex with
/// timeout...).
pub const ERESTART_RESTARTBLOCK: i64 = -516;

/// The general-purpose registers of one thread: x86_64 `struct user_regs_struct`, field for field,
/// as plain data (no libc type leaks into the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(
    missing_docs,
    reason = "field names are the kernel's user_regs_struct names"
)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// The syscall number the thread was in (-1 when it was not stopped in a syscall).
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// How the kernel will restart a syscall that a stop interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallRestart {
    /// `rax = orig_rax; rip -= 2` (ERESTARTSYS / ERESTARTNOINTR / ERESTARTNOHAND).
    Same,
    /// `rax = __NR_restart_syscall; rip -= 2` (ERESTART_RESTARTBLOCK, e.g. nanosleep).
    RestartBlock,
}

impl Regs {
    /// The syscall the thread was stopped in, if any (`orig_rax >= 0`).
    #[must_use]
    pub fn in_syscall(&self) -> Option<i64> {
        let nr = self.orig_rax.cast_signed();
        (nr >= 0).then_some(nr)
    }

    /// Whether the kernel will rewind this thread onto its `syscall` instruction when it resumes
    /// (it was interrupted in a blocking syscall that returns a restart code).
    #[must_use]
    pub fn restart_pending(&self) -> Option<SyscallRestart> {
        self.in_syscall()?;
        match self.rax.cast_signed() {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => Some(SyscallRestart::Same),
            ERESTART_RESTARTBLOCK => Some(SyscallRestart::RestartBlock),
            _ => None,
        }
    }

    /// The address the thread will actually execute next when resumed: `rip`, or `rip - 2` (the
    /// `syscall` instruction) when a syscall restart is pending. The engine's "is a thread inside
    /// the bytes being replaced" check must use this, not `rip`: a thread parked in `read()` shows
    /// `rip` after the `syscall` instruction but re-executes the instruction itself.
    #[must_use]
    pub fn resume_ip(&self) -> u64 {
        if self.restart_pending().is_some() {
            self.rip.wrapping_sub(2)
        } else {
            self.rip
        }
    }
}

/// The scheduler state letter of a task (`/proc/PID/stat` field 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// `R`
    Running,
    /// `S`
    Sleeping,
    /// `D`
    DiskSleep,
    /// `T` (group-stopped, e.g. SIGSTOP)
    Stopped,
    /// `t` (ptrace-stopped)
    TracingStop,
    /// `Z`
    Zombie,
    /// `X`
    Dead,
    /// `I` (idle kernel thread)
    Idle,
    /// Anything else (`P`, `W`, `K`, ... on other kernels).
    Other(char),
}

impl TaskState {
    /// Parses the one-letter state.
    #[must_use]
    pub fn from_char(c: char) -> Self {
        match c {
            'R' => Self::Running,
            'S' => Self::Sleeping,
            'D' => Self::DiskSleep,
            'T' => Self::Stopped,
            't' => Self::TracingStop,
            'Z' => Self::Zombie,
            'X' | 'x' => Self::Dead,
            'I' => Self::Idle,
            other => Self::Other(other),
        }
    }

    /// The letter as shown in `/proc`.
    #[must_use]
    pub fn as_char(self) -> char {
        match self {
            Self::Running => 'R',
            Self::Sleeping => 'S',
            Self::DiskSleep => 'D',
            Self::Stopped => 'T',
            Self::TracingStop => 't',
            Self::Zombie => 'Z',
            Self::Dead => 'X',
            Self::Idle => 'I',
            Self::Other(c) => c,
        }
    }

    /// Zombie or dead: the task has exited.
    #[must_use]
    pub fn is_exited(self) -> bool {
        matches!(self, Self::Zombie | Self::Dead)
    }
}

/// `PF_EXITING` in `/proc/PID/stat` field 9.
pub const PF_EXITING: u64 = 0x0000_0004;
/// `PF_KTHREAD` in `/proc/PID/stat` field 9.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// What the preflight checks need to know about one task, from `/proc/PID/task/TID/{stat,status}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Scheduler state.
    pub state: TaskState,
    /// `PF_*` flags (stat field 9).
    pub flags: u64,
    /// Virtual memory size in bytes (stat field 23); 0 for kernel threads (no mm).
    pub vsize: u64,
    /// `TracerPid:` (0 when not traced). Note: the kernel reports the tracer *thread's* id.
    pub tracer_pid: i32,
    /// `SigIgn:` signals the process ignores (bit `n-1` for signal `n`).
    pub sig_ignored: u64,
    /// `Seccomp:` 0 = off, 1 = strict, 2 = filter.
    pub seccomp: u8,
}

impl TaskInfo {
    /// True for kernel threads: `PF_KTHREAD`, or no address space at all.
    #[must_use]
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0 || (self.vsize == 0 && !self.state.is_exited())
    }

    /// Zombie, dead, or already on its way out (`PF_EXITING`).
    #[must_use]
    pub fn is_exiting(&self) -> bool {
        self.state.is_exited() || self.flags & PF_EXITING != 0
    }
}

/// Memory protection of a mapping, as in `/proc/PID/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms {
    /// `r`
    pub read: bool,
    /// `w`
    pub write: bool,
    /// `x`
    pub exec: bool,
    /// `s` (shared) rather than `p` (private)
    pub shared: bool,
}

impl Perms {
    /// `r-x`, private.
    pub const RX: Self = Self {
        read: true,
        write: false,
        exec: true,
        shared: false,
    };
    /// `rw-`, private.
    pub const RW: Self = Self {
        read: true,
        write: true,
        exec: false,
        shared: false,
    };
    /// `r--`, private.
    pub const R: Self = Self {
        read: true,
        write: false,
        exec: false,
        shared: false,
    };

    /// The `PROT_*` bits.
    #[must_use]
    pub fn prot(self) -> i32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p
    }

    /// From `PROT_*` bits (private).
    #[must_use]
    pub fn from_prot(prot: i32) -> Self {
        Self {
            read: prot & libc::PROT_READ != 0,
            write: prot & libc::PROT_WRITE != 0,
            exec: prot & libc::PROT_EXEC != 0,
            shared: false,
        }
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Protection.
    pub perms: Perms,
    /// File offset.
    pub offset: u64,
    /// `major:minor` of the backing device.
    pub dev: (u32, u32),
    /// Inode of the backing file (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo-name (`[vdso]`, `[anon:NAME]`, ...); empty for plain anonymous memory.
    pub name: String,
}

impl Mapping {
    /// Whether `addr` lies inside.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range (never produced by the kernel).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// A question about the mapping at an address, as `PROCMAP_QUERY` (Linux 6.11+) asks it of an
/// open `/proc/PID/maps`: the mapping covering `addr`, or (`or_next`) the first one above it,
/// skipping mappings that lack a permission `require`s. See
/// [`crate::StoppedProcess::query_mapping`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapQuery {
    /// Also accept the first matching mapping that starts above `addr`.
    pub or_next: bool,
    /// Only mappings with every permission set here (`shared`: `MAP_SHARED`).
    pub require: Perms,
    /// Fill in [`Mapping::name`] (a file's path costs a path walk). Without it the name is
    /// empty whatever the mapping is: do not look at it.
    pub name: bool,
}

impl MapQuery {
    /// The mapping covering an address.
    pub const COVERING: Self = Self {
        or_next: false,
        require: Perms {
            read: false,
            write: false,
            exec: false,
            shared: false,
        },
        name: false,
    };

    /// The mapping covering an address, or else the first above it.
    pub const COVERING_OR_NEXT: Self = Self {
        or_next: true,
        ..Self::COVERING
    };

    /// The same question, asking for the name too.
    #[must_use]
    pub fn named(self) -> Self {
        Self { name: true, ..self }
    }

    /// Only mappings with (at least) these permissions.
    #[must_use]
    pub fn requiring(self, require: Perms) -> Self {
        Self { require, ..self }
    }

    /// Whether `m` has every permission the query requires.
    #[must_use]
    pub fn accepts(&self, m: &Mapping) -> bool {
        let r = self.require;
        (!r.read || m.perms.read)
            && (!r.write || m.perms.write)
            && (!r.exec || m.perms.exec)
            && (!r.shared || m.perms.shared)
    }

    /// The answer from a full list of mappings (sorted by address, as `/proc/PID/maps` lists
    /// them): exactly what the kernel's `PROCMAP_QUERY` answers — the first mapping ending
    /// above `addr` that has the required permissions, if it covers `addr` or `or_next` is set.
    #[must_use]
    pub fn answer<'m>(&self, maps: &'m [Mapping], addr: u64) -> Option<&'m Mapping> {
        // Sorted and disjoint: the mappings ending above `addr` are a suffix.
        let first = maps.partition_point(|m| m.end <= addr);
        maps[first..]
            .iter()
            .find(|m| self.accepts(m))
            .filter(|m| self.or_next || m.start <= addr)
    }
}

/// How a thread is stopped while we hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Our `PTRACE_INTERRUPT` trap (`PTRACE_EVENT_STOP` with SIGTRAP).
    Interrupted,
    /// The process is group-stopped (SIGSTOP/SIGTSTP/SIGTTIN/SIGTTOU): it must stay stopped after
    /// we let go, so we never let its threads execute their own code.
    GroupStopped(i32),
}

impl StopKind {
    /// Whether the process was group-stopped (job-control stop) at this stop.
    #[must_use]
    pub fn is_group_stop(self) -> bool {
        matches!(self, Self::GroupStopped(_))
    }
}

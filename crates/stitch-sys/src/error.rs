//! The one error type of the crate, with stable machine-readable codes.

use std::io;
use std::time::Duration;

use crate::types::{Pid, Tid};

/// Everything that can go wrong at the OS boundary. Every variant carries enough context (which
/// operation, which process/thread, the OS error) to be reported without further wrapping, and
/// [`SysError::code`] gives a stable code for logs, metrics and the engine's decisions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SysError {
    /// The process does not exist (or exited before we looked).
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// Process.
        pid: Pid,
    },
    /// The process is a zombie or exiting: there is nothing to patch.
    #[error("process {pid} is a zombie or exiting (state {state})")]
    Zombie {
        /// Process.
        pid: Pid,
        /// Its state letter.
        state: char,
    },
    /// A kernel thread has no user address space.
    #[error("process {pid} is a kernel thread")]
    KernelThread {
        /// Process.
        pid: Pid,
    },
    /// Another tracer (debugger, strace, the load-time hook) holds a thread: we never take it away.
    #[error("thread {tid} of process {pid} is already traced by {tracer}")]
    AlreadyTraced {
        /// Process.
        pid: Pid,
        /// The traced thread.
        tid: Tid,
        /// `TracerPid` (a thread id).
        tracer: i32,
    },
    /// We lack the privilege (not root / no CAP_SYS_PTRACE / Yama / LSM).
    #[error("{op} on process {pid} thread {tid}: permission denied")]
    PermissionDenied {
        /// Operation.
        op: &'static str,
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A seized thread did not reach a stop before the deadline (e.g. uninterruptible sleep, a
    /// parent waiting for its vfork child). `left_seized` lists threads we could not detach: the
    /// kernel releases them when the tracing thread exits (see [`crate::run_on_tracer_thread`]).
    #[error(
        "thread {tid} of process {pid} did not stop within {waited:?} (left seized: {left_seized:?})"
    )]
    ThreadDidNotStop {
        /// Process.
        pid: Pid,
        /// The thread that did not stop.
        tid: Tid,
        /// How long we waited.
        waited: Duration,
        /// Threads still seized but not stopped after cleanup.
        left_seized: Vec<Tid>,
    },
    /// The thread exited (or was never there) while we worked on it.
    #[error("thread {tid} of process {pid} is gone")]
    ThreadGone {
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
    },
    /// A thread of the process called execve while we held it: its memory is not the one the
    /// caller planned for.
    #[error("process {pid} executed a new program (thread {tid}) while held")]
    Execed {
        /// Process.
        pid: Pid,
        /// Thread that reported the exec.
        tid: Tid,
    },
    /// The operation would make a job-control-stopped process run its own code.
    #[error("{op}: process {pid} is group-stopped (thread {tid}); it must not run")]
    GroupStopped {
        /// Operation.
        op: &'static str,
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
    },
    /// A remote syscall ran and the kernel returned an error.
    #[error("remote syscall {nr} in process {pid} thread {tid} failed: errno {errno} ({})", io::Error::from_raw_os_error(*errno))]
    RemoteSyscallFailed {
        /// Process.
        pid: Pid,
        /// Thread that executed it.
        tid: Tid,
        /// Syscall number.
        nr: i64,
        /// Positive errno.
        errno: i32,
    },
    /// No `syscall` instruction (0f 05) in any executable mapping we can read.
    #[error("no syscall instruction found in the executable mappings of process {pid}")]
    NoSyscallGadget {
        /// Process.
        pid: Pid,
    },
    /// The thread's seccomp policy would not let the syscall run harmlessly (kill, trap, notify,
    /// strict mode, or a filter we could not read): running it could kill the target.
    #[error("seccomp of process {pid} thread {tid} forbids syscall {nr}: {why}")]
    SeccompForbids {
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
        /// Syscall number.
        nr: i64,
        /// Verdict or reason.
        why: String,
    },
    /// Single-stepping raises a forced SIGTRAP; with SIGTRAP ignored the kernel would reset the
    /// process's disposition to SIG_DFL, a lasting change we refuse to make.
    #[error(
        "process {pid} ignores SIGTRAP; single-stepping thread {tid} would reset its disposition"
    )]
    SigtrapIgnored {
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
    },
    /// A ptrace request or wait failed.
    #[error("{op} on process {pid} thread {tid}")]
    Ptrace {
        /// Operation.
        op: &'static str,
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The thread stopped in a way the protocol did not expect.
    #[error("{op}: unexpected stop of process {pid} thread {tid} ({what})")]
    UnexpectedStop {
        /// Operation.
        op: &'static str,
        /// Process.
        pid: Pid,
        /// Thread.
        tid: Tid,
        /// Description of the stop.
        what: String,
    },
    /// Reading or writing the target's memory failed (also: a short transfer).
    #[error("{op} of {len} bytes at {addr:#x} in process {pid}")]
    MemIo {
        /// Operation.
        op: &'static str,
        /// Process.
        pid: Pid,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Bytes read back after a write differ from the bytes written.
    #[error("verify after write at {addr:#x} ({len} bytes) in process {pid}: memory differs")]
    VerifyMismatch {
        /// Process.
        pid: Pid,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
    },
    /// Reading `/proc` failed for another reason than the process being gone.
    #[error("reading {path}")]
    Proc {
        /// File.
        path: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The process was already let go (explicitly, or after an error that could have left a
    /// thread running): stop it again before touching it.
    #[error("process {pid} is no longer held")]
    Released {
        /// Process.
        pid: Pid,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("parsing {what}: {detail}")]
    Parse {
        /// Which file.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The caller passed something unusable (e.g. an anon VMA name with forbidden characters).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Another system call (sched_setscheduler, pidfd_open, ...) failed.
    #[error("{op}")]
    Os {
        /// Operation.
        op: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

impl SysError {
    /// A stable code, e.g. `"sys.already_traced"`. Codes never change meaning; new ones may appear.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoSuchProcess { .. } => "sys.no_such_process",
            Self::Zombie { .. } => "sys.zombie",
            Self::KernelThread { .. } => "sys.kernel_thread",
            Self::AlreadyTraced { .. } => "sys.already_traced",
            Self::PermissionDenied { .. } => "sys.permission_denied",
            Self::ThreadDidNotStop { .. } => "sys.thread_did_not_stop",
            Self::ThreadGone { .. } => "sys.thread_gone",
            Self::Execed { .. } => "sys.execed",
            Self::GroupStopped { .. } => "sys.group_stopped",
            Self::RemoteSyscallFailed { .. } => "sys.remote_syscall_failed",
            Self::NoSyscallGadget { .. } => "sys.no_syscall_gadget",
            Self::SeccompForbids { .. } => "sys.seccomp_forbids",
            Self::SigtrapIgnored { .. } => "sys.sigtrap_ignored",
            Self::Ptrace { .. } => "sys.ptrace",
            Self::UnexpectedStop { .. } => "sys.unexpected_stop",
            Self::MemIo { .. } => "sys.mem_io",
            Self::VerifyMismatch { .. } => "sys.verify_mismatch",
            Self::Released { .. } => "sys.released",
            Self::Proc { .. } => "sys.procfs",
            Self::Parse { .. } => "sys.parse",
            Self::InvalidArgument(_) => "sys.invalid_argument",
            Self::Os { .. } => "sys.os",
        }
    }

    /// True when the error only says a thread (or the whole process) went away.
    #[must_use]
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::ThreadGone { .. } | Self::NoSuchProcess { .. })
    }

    /// The errno of a failed remote syscall, if that is what this is.
    #[must_use]
    pub fn remote_errno(&self) -> Option<i32> {
        match self {
            Self::RemoteSyscallFailed { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Shorthand.
pub type Result<T, E = SysError> = std::result::Result<T, E>;

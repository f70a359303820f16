//! # stitch-sys — the OS boundary of Stitch
//!
//! The only crate of Stitch with `unsafe` and raw syscalls: ptrace, `/proc/PID/mem`, remote
//! syscalls, scheduling priority, pidfds. Everything above it (the engine, the agent) is safe
//! Rust written against the [`Tracer`] trait and the [`StoppedProcess`] token.
//!
//! ## Pieces
//! - [`Tracer`]: the OS operations as a trait, with [`PtraceTracer`] (the kernel) and
//!   [`FakeTracer`] (an in-memory model that enforces the same preconditions and can fail the
//!   Nth call of any kind), so the apply/revert protocol is unit-testable step by step.
//! - [`stop_all`] / [`stop_all_with`]: stop every thread of a process, or refuse with a distinct
//!   error and change nothing (no such process, zombie, kernel thread, already traced, no
//!   privilege).
//! - [`StoppedProcess`]: proof that every thread is held. Memory writes and remote syscalls are
//!   only available through it. Dropping it lets every thread go.
//! - Pure parsers for `/proc` ([`procfs`]) and a seccomp filter evaluator ([`seccomp`]).
//! - Helpers that need no stop: [`read_proc_mem`], [`process_alive`], [`PidFd`],
//!   [`set_realtime_priority`] / [`RealtimeGuard`], [`run_on_tracer_thread`].
//!
//! ## Invariants
//! 1. **Every thread held before any write.** A [`StoppedProcess`] exists only once every thread
//!    in `/proc/PID/task` is in a ptrace-stop, and the list was re-read until no new thread
//!    appeared. After a thread ran ([`StoppedProcess::run_thread_briefly`],
//!    [`StoppedProcess::single_step`]) threads it created are adopted before returning; if that
//!    fails, the process is released and the token is dead ([`SysError::Released`]).
//! 2. **A target is never killed by us.** We never set `PTRACE_O_EXITKILL`, never send a fatal
//!    signal, refuse a remote syscall that the target's seccomp policy would punish
//!    ([`SysError::SeccompForbids`]), and refuse to single-step a process that ignores SIGTRAP
//!    (the forced trap would reset that disposition).
//! 3. **Nothing is left stopped.** Every error path detaches what it seized; `Drop` detaches.
//!    A group-stopped (SIGSTOP/Ctrl-Z) process is detached back into its group stop and is never
//!    made to run its own code ([`SysError::GroupStopped`]).
//! 4. **The target sees its own signals.** A signal that arrives while we are stopping a thread
//!    or letting it run is delivered as if we were not there; a remote syscall runs with all
//!    signals blocked (but SIGTRAP, when it is single-stepped: see [`Tracer::settle`]) and the
//!    thread's own mask is restored afterwards.
//! 5. **Interrupted syscalls resume correctly.** Registers are only ever restored while the
//!    thread sits inside the kernel's signal path (a `PTRACE_EVENT_STOP`, or the
//!    signal-delivery-stop of the step over a `syscall` instruction): when it resumes, the
//!    kernel applies its usual restart logic to the thread's *own* `orig_rax`/`rax`, so a
//!    `read()` keeps waiting for its data, `nanosleep` sleeps its full time
//!    (`restart_syscall`), and a `SA_RESTART`-less handler still sees EINTR.
//!
//! ## Why a SIGKILL of the agent is safe
//! - The kernel detaches every tracee when its tracer thread exits — including by SIGKILL — and
//!   we never use `PTRACE_O_EXITKILL`: held threads simply continue; a group-stopped process
//!   goes back into its stop.
//! - We never write code to run our own: a remote syscall points RIP at a `syscall`
//!   instruction that already exists in an executable mapping (`[vdso]` first). So a SIGKILL at
//!   any moment leaves no foreign instruction behind. The only code changes are the ones the
//!   engine asks [`StoppedProcess::write`] for, each an intended final state.
//! - Residual window, stated honestly: during one remote syscall (a handful of ptrace calls,
//!   microseconds) the executing thread's registers and signal mask are borrowed. If the agent
//!   dies exactly then, that one thread resumes after the borrowed `syscall` with borrowed
//!   registers. Every ptrace-based injector has this window; we keep it as short as possible.
//!   Within a [`StoppedProcess::remote_batch`] (the few calls that map a region) a thread sits
//!   between two calls in the step's signal-delivery-stop: a dying tracer there makes the
//!   kernel deliver it that SIGTRAP. Outside a batch, and at its end, the thread is parked again.
//! - A seized thread that never stops (uninterruptible sleep, a vfork parent) cannot be detached
//!   until it stops; it is released when the tracing thread exits. Run stop windows through
//!   [`run_on_tracer_thread`] and this holds even without a SIGKILL.
//!
//! ## Threading
//! ptrace ties tracees to the *thread* that seized them. [`PtraceTracer`] and therefore
//! `StoppedProcess<PtraceTracer>` are not `Send`.
//!
//! ## Measured (this machine kind: 2 vCPU, kernel 6.18)
//! `cargo run --release -p stitch-sys --example stop_pause`: a target whose threads all spin;
//! wall time of `stop_all` + `resume`, 40 runs, machine otherwise lightly loaded, in µs:
//!
//! | threads | SCHED_FIFO | p50 | p90 | max | + remote mmap+munmap, p50 |
//! |--------:|:----------:|----:|----:|----:|--------------------------:|
//! | 1       | no         | 170 | 222 | 276 | 464                       |
//! | 1       | yes        | 168 | 204 | 238 | 458                       |
//! | 8       | no         | 4026| 8015|16006| 4027                      |
//! | 8       | yes        | 385 | 481 | 581 | 722                       |
//! | 64      | no         |36070|60096|72963| 54577                     |
//! | 64      | yes        | 1358| 5494|23864| 4530                      |
//!
//! Without real-time priority the tracer waits for CPU behind the spinning threads it is
//! stopping: use [`RealtimeGuard`] for the stop window. On a heavily loaded machine (load 9-50)
//! the FIFO p50 stayed at 0.7 / 0.9 / 3.7 ms for 1 / 8 / 64 threads; the tail grows because the
//! *target's* threads must get a CPU to reach their stop.

#![allow(
    unsafe_code,
    reason = "stitch-sys is the one crate that talks to the kernel directly: ptrace, waitpid, process_vm_readv, sched_setscheduler, pidfd_open"
)]

mod affinity;
mod error;
mod fake;
mod fanotify;
mod hold;
pub mod procfs;
mod ptrace;
pub mod seccomp;
mod stop;
mod tracer;
mod types;
mod util;

pub use affinity::{CpuPin, allowed_cpus, current_cpu, last_cpu_of};
pub use error::{Result, SysError};
pub use fake::{
    Call, FAKE_TRACER_TID, FakeProcess, FakeRegion, FakeThread, FakeThreadState, FakeTracer,
};
pub use fanotify::{
    DIR_WATCH_MASK, DirEvent, DirWatch, FAN_HOLD_MASK, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM,
    FAN_PRE_ACCESS, FileStat, PermEvent, PermissionGroup, Waker, fd_inode, fd_stat,
};
pub use hold::{HoldStop, ThreadHold};
pub use procfs::{ProcStat, process_state, tracer_pid};
pub use ptrace::PtraceTracer;
pub use stop::{
    PR_SET_VMA, PR_SET_VMA_ANON_NAME, Placement, StopTimings, StoppedProcess, StoppedThread,
    free_gaps_near, stop_all, stop_all_with, validate_anon_name,
};
pub use tracer::{CallKind, MapAnswer, RemoteSyscall, Tracer};
pub use types::{
    ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, MapQuery, Mapping,
    PF_EXITING, PF_KTHREAD, Perms, Pid, Regs, StopKind, SyscallRestart, TaskInfo, TaskState, Tid,
};
pub use util::{
    PidFd, RealtimeGuard, STOP_WINDOW_RT_PRIORITY, SchedState, gettid, is_own_thread,
    process_alive, read_proc_mem, read_vm_partial, run_on_tracer_thread, set_realtime_priority,
};

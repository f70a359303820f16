//! [`ThreadHold`]: one thread of another process under ptrace, followed syscall by syscall —
//! what the load-time hook needs between "this thread opens a target file" and "the file is
//! mapped executable".
//!
//! Protocol (see `docs/load-time.md` of the project):
//! 1. [`ThreadHold::seize`] while the thread is blocked in its fanotify permission event:
//!    `PTRACE_SEIZE` (TRACESYSGOOD | TRACEEXEC, never EXITKILL) + `PTRACE_INTERRUPT`. The
//!    interrupt is taken when the open returns, before any user instruction.
//! 2. The caller answers the fanotify event; [`ThreadHold::wait`] reports the stops that follow:
//!    our interrupt ([`HoldStop::Parked`]), syscall entry/exit with `PTRACE_GET_SYSCALL_INFO`
//!    decoded, `PTRACE_EVENT_EXEC`, signals, exit.
//! 3. [`ThreadHold::step_syscall`] resumes to the next syscall stop, delivering the signal the
//!    thread was stopped for. A group stop (Ctrl-Z) is kept with [`ThreadHold::listen`], so the
//!    process stays stopped for its shell exactly as without us.
//! 4. [`ThreadHold::into_stopped_process`] turns the hold into a [`StoppedProcess`] (every other
//!    thread seized too) for the engine; or [`ThreadHold::detach`] lets go.
//!
//! Not `Send`: ptrace ties the tracee to the thread that seized it.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::error::{Result, SysError};
use crate::ptrace::{PtraceTracer, raw};
use crate::stop::StoppedProcess;
use crate::types::{Pid, Regs, StopKind, Tid};

const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_EVENT_EXEC: i32 = 4;
const SEIZE_OPTIONS: usize = (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACEEXEC) as usize;
const OP_ENTRY: u8 = 1;
const OP_EXIT: u8 = 2;

/// Where a held thread stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStop {
    /// `PTRACE_EVENT_STOP`: our interrupt, or a group stop (Ctrl-Z).
    Parked(StopKind),
    /// Syscall entry.
    SyscallEntry {
        /// Syscall number.
        nr: u64,
        /// Arguments.
        args: [u64; 6],
    },
    /// Syscall exit.
    SyscallExit {
        /// Return value (`-errno` when `is_error`).
        rval: i64,
        /// Whether it failed.
        is_error: bool,
    },
    /// `PTRACE_EVENT_EXEC`: the thread executed a new program (its tid is now the pid).
    Exec,
    /// Signal-delivery-stop: resume with this signal to deliver it.
    Signal(i32),
    /// The thread exited or was killed.
    Exited,
    /// The deadline passed with no stop.
    Timeout,
}

/// One thread held under ptrace. Dropping it detaches (best effort).
#[derive(Debug)]
pub struct ThreadHold {
    pid: Pid,
    tid: Tid,
    attached: bool,
    _bound_to_thread: PhantomData<*const ()>,
}

fn ptrace_err(op: &'static str, pid: Pid, tid: Tid, e: std::io::Error) -> SysError {
    match e.raw_os_error() {
        Some(libc::ESRCH) => SysError::ThreadGone { pid, tid },
        Some(libc::EPERM) => SysError::PermissionDenied {
            op,
            pid,
            tid,
            source: e,
        },
        _ => SysError::Ptrace {
            op,
            pid,
            tid,
            source: e,
        },
    }
}

fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// `PTRACE_GET_SYSCALL_INFO` of a thread in a syscall stop.
fn syscall_info(tid: i32) -> std::io::Result<libc::ptrace_syscall_info> {
    // SAFETY: ptrace_syscall_info is plain integers (a union of integer structs); all-zero is a
    // valid value.
    let mut info: libc::ptrace_syscall_info = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::ptrace_syscall_info>();
    // SAFETY: GET_SYSCALL_INFO writes at most `addr` (= size) bytes into `data`, which points to
    // `info`, a live local of exactly that size.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GET_SYSCALL_INFO,
            tid,
            size as *mut libc::c_void,
            &raw mut info,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

impl ThreadHold {
    /// Seizes thread `tid` of process `pid` and asks it to stop at its next chance.
    /// `EPERM` is [`SysError::AlreadyTraced`] when `/proc` shows a tracer.
    ///
    /// # Errors
    /// [`SysError::AlreadyTraced`], [`SysError::PermissionDenied`], [`SysError::ThreadGone`].
    pub fn seize(pid: Pid, tid: Tid) -> Result<Self> {
        if let Err(e) = raw::ptrace_int(libc::PTRACE_SEIZE, tid.0, 0, SEIZE_OPTIONS) {
            if e.raw_os_error() == Some(libc::EPERM)
                && let Ok(info) = crate::procfs::task_info(pid, tid)
                && info.tracer_pid != 0
            {
                return Err(SysError::AlreadyTraced {
                    pid,
                    tid,
                    tracer: info.tracer_pid,
                });
            }
            return Err(ptrace_err("ptrace seize", pid, tid, e));
        }
        let hold = Self {
            pid,
            tid,
            attached: true,
            _bound_to_thread: PhantomData,
        };
        hold.interrupt()?;
        Ok(hold)
    }

    /// The process.
    #[must_use]
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The held thread (after an exec: the process's pid).
    #[must_use]
    pub fn tid(&self) -> Tid {
        self.tid
    }

    fn req(&self, op: &'static str, req: libc::c_uint, data: usize) -> Result<()> {
        raw::ptrace_int(req, self.tid.0, 0, data)
            .map(drop)
            .map_err(|e| ptrace_err(op, self.pid, self.tid, e))
    }

    /// `PTRACE_INTERRUPT`: stop at the next chance (works while running or blocked).
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], [`SysError::Ptrace`].
    pub fn interrupt(&self) -> Result<()> {
        self.req("ptrace interrupt", libc::PTRACE_INTERRUPT, 0)
    }

    /// Resumes to the next syscall entry or exit, delivering `sig` (0: none).
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], [`SysError::Ptrace`].
    pub fn step_syscall(&mut self, sig: i32) -> Result<()> {
        self.req("ptrace syscall", libc::PTRACE_SYSCALL, sig as usize)
    }

    /// Resumes without syscall stops, delivering `sig` (0: none).
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], [`SysError::Ptrace`].
    pub fn resume(&mut self, sig: i32) -> Result<()> {
        self.req("ptrace cont", libc::PTRACE_CONT, sig as usize)
    }

    /// From a group stop: `PTRACE_LISTEN` — the thread stays stopped (as its shell expects) and
    /// reports a new stop when it is continued (SIGCONT) or a signal arrives.
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], [`SysError::Ptrace`].
    pub fn listen(&mut self) -> Result<()> {
        self.req("ptrace listen", libc::PTRACE_LISTEN, 0)
    }

    /// The registers (thread must be in a ptrace-stop).
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], [`SysError::Ptrace`].
    pub fn regs(&self) -> Result<Regs> {
        raw::get_regs(self.tid.0).map_err(|e| ptrace_err("ptrace getregs", self.pid, self.tid, e))
    }

    /// Waits for the next stop until `deadline` (polling without hogging a CPU the thread may
    /// need; see `wait_status` in `ptrace.rs`).
    ///
    /// # Errors
    /// [`SysError::Ptrace`] (waitpid or `PTRACE_GET_SYSCALL_INFO` failed).
    pub fn wait(&mut self, deadline: Instant) -> Result<HoldStop> {
        match crate::ptrace::wait_status(self.tid.0, deadline) {
            Ok(Some(status)) => self.decode(status),
            Ok(None) => Ok(HoldStop::Timeout),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                // A non-leader thread that exec'd now carries the pid as its tid.
                if self.tid != self.pid.leader()
                    && let Ok(Some(status)) = raw::wait_nohang(self.pid.0)
                {
                    self.tid = self.pid.leader();
                    return self.decode(status);
                }
                self.attached = false;
                Ok(HoldStop::Exited)
            }
            Err(e) => Err(ptrace_err("waitpid", self.pid, self.tid, e)),
        }
    }

    fn decode(&mut self, status: i32) -> Result<HoldStop> {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.attached = false;
            return Ok(HoldStop::Exited);
        }
        let sig = libc::WSTOPSIG(status);
        Ok(match status >> 16 {
            0 if sig == (libc::SIGTRAP | 0x80) => {
                let info = syscall_info(self.tid.0)
                    .map_err(|e| ptrace_err("ptrace get_syscall_info", self.pid, self.tid, e))?;
                match info.op {
                    OP_ENTRY => {
                        // SAFETY: op == ENTRY means the kernel filled the `entry` member.
                        let entry = unsafe { info.u.entry };
                        HoldStop::SyscallEntry {
                            nr: entry.nr,
                            args: entry.args,
                        }
                    }
                    OP_EXIT => {
                        // SAFETY: op == EXIT means the kernel filled the `exit` member.
                        let exit = unsafe { info.u.exit };
                        HoldStop::SyscallExit {
                            rval: exit.sval,
                            is_error: exit.is_error != 0,
                        }
                    }
                    other => {
                        return Err(SysError::UnexpectedStop {
                            op: "hold wait",
                            pid: self.pid,
                            tid: self.tid,
                            what: format!("syscall info op {other}"),
                        });
                    }
                }
            }
            0 => HoldStop::Signal(sig),
            PTRACE_EVENT_STOP if is_stop_signal(sig) => {
                HoldStop::Parked(StopKind::GroupStopped(sig))
            }
            PTRACE_EVENT_STOP => HoldStop::Parked(StopKind::Interrupted),
            PTRACE_EVENT_EXEC => HoldStop::Exec,
            ev => {
                return Err(SysError::UnexpectedStop {
                    op: "hold wait",
                    pid: self.pid,
                    tid: self.tid,
                    what: format!("ptrace event {ev}"),
                });
            }
        })
    }

    /// From any ptrace-stop to a `PTRACE_EVENT_STOP` without running a user instruction: the
    /// interrupt trap is taken in the kernel's return-to-user path. Signals that show up are
    /// delivered (a stop signal leaves the thread group-stopped: [`StopKind::GroupStopped`]).
    ///
    /// # Errors
    /// [`SysError::ThreadGone`], [`SysError::ThreadDidNotStop`], ptrace errors.
    pub fn park(&mut self, deadline: Instant) -> Result<StopKind> {
        self.interrupt()?;
        self.resume(0)?;
        loop {
            match self.wait(deadline)? {
                HoldStop::Parked(kind) => return Ok(kind),
                HoldStop::Signal(sig) => self.resume(sig)?,
                HoldStop::SyscallEntry { .. } | HoldStop::SyscallExit { .. } | HoldStop::Exec => {
                    self.resume(0)?;
                }
                HoldStop::Exited => {
                    return Err(SysError::ThreadGone {
                        pid: self.pid,
                        tid: self.tid,
                    });
                }
                HoldStop::Timeout => {
                    return Err(SysError::ThreadDidNotStop {
                        pid: self.pid,
                        tid: self.tid,
                        waited: Duration::ZERO,
                        left_seized: vec![self.tid],
                    });
                }
            }
        }
    }

    /// Turns a hold whose thread sits in a `PTRACE_EVENT_STOP` (`stop`, as returned by
    /// [`ThreadHold::park`] or [`ThreadHold::wait`]) into a [`StoppedProcess`]: every other
    /// thread of the process is seized and stopped too. Must run on the thread that seized.
    /// On error every thread (this one included) has been let go.
    ///
    /// # Errors
    /// As [`crate::stop_all`].
    pub fn into_stopped_process(
        mut self,
        stop: StopKind,
        deadline: Instant,
    ) -> Result<StoppedProcess<PtraceTracer>> {
        self.attached = false;
        StoppedProcess::from_held_thread(PtraceTracer::new(), self.pid, self.tid, stop, deadline)
    }

    /// Lets the thread go (it must be in a ptrace-stop; a running one is stopped first). A
    /// group-stopped thread stays stopped.
    ///
    /// # Errors
    /// Ptrace errors other than "gone".
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        match raw::ptrace_int(libc::PTRACE_DETACH, self.tid.0, 0, 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                // Running (or gone): stop it first, then detach.
                if raw::ptrace_int(libc::PTRACE_INTERRUPT, self.tid.0, 0, 0).is_err() {
                    let _ = raw::wait_nohang(self.tid.0);
                    return Ok(());
                }
                self.attached = true;
                let deadline = Instant::now() + Duration::from_millis(200);
                match self.wait(deadline)? {
                    HoldStop::Exited => Ok(()),
                    HoldStop::Timeout => {
                        self.attached = false;
                        Err(SysError::ThreadDidNotStop {
                            pid: self.pid,
                            tid: self.tid,
                            waited: Duration::from_millis(200),
                            left_seized: vec![self.tid],
                        })
                    }
                    stop => {
                        // Detach delivers the signal it was stopped for, if any.
                        let sig = if let HoldStop::Signal(sig) = stop {
                            sig
                        } else {
                            0
                        };
                        self.attached = false;
                        self.req("ptrace detach", libc::PTRACE_DETACH, sig as usize)
                    }
                }
            }
            Err(e) => Err(ptrace_err("ptrace detach", self.pid, self.tid, e)),
        }
    }

    /// Detaches delivering `sig` (from a signal-delivery-stop).
    ///
    /// # Errors
    /// Ptrace errors.
    pub fn detach_with_signal(mut self, sig: i32) -> Result<()> {
        self.attached = false;
        self.req("ptrace detach", libc::PTRACE_DETACH, sig as usize)
    }
}

impl Drop for ThreadHold {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            tracing::warn!(pid = self.pid.0, tid = self.tid.0, error = %e, "detach of a held thread failed; released when the tracing thread exits");
        }
    }
}

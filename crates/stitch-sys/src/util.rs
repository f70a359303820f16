//! Small helpers that do not need a stopped process.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::error::{Result, SysError};
use crate::procfs;
use crate::ptrace::raw;
use crate::types::{Pid, Tid};

/// The SCHED_FIFO priority used for stop windows: above every normal thread, below the kernel's
/// own per-CPU RT threads (which use 99) and typical audio/IRQ threads (50+).
pub const STOP_WINDOW_RT_PRIORITY: i32 = 10;

/// A thread's scheduling policy and priority, to put back after a stop window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedState {
    policy: i32,
    priority: i32,
}

fn get_sched() -> io::Result<SchedState> {
    // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: writes one sched_param to `param`, a live local.
    if unsafe { libc::sched_getparam(0, &raw mut param) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(SchedState {
        policy,
        priority: param.sched_priority,
    })
}

fn set_sched(s: SchedState) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: s.priority,
    };
    // SAFETY: reads one sched_param from `param`, a live local; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, s.policy, &raw const param) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the *calling thread* to SCHED_FIFO (`true`) or back to SCHED_OTHER (`false`).
/// Returns whether the thread now runs at real-time priority: `Ok(false)` when we lack the
/// privilege (EPERM), which only makes stop windows longer, never unsafe.
///
/// Why: stopped threads are released only when we get the CPU back; on a busy machine a normal
/// priority tracer measured 10.9-31.8 ms pauses instead of 0.1-1 ms.
///
/// # Errors
/// [`SysError::Os`] for errors other than EPERM.
pub fn set_realtime_priority(enable: bool) -> Result<bool> {
    let target = if enable {
        SchedState {
            policy: libc::SCHED_FIFO,
            priority: STOP_WINDOW_RT_PRIORITY,
        }
    } else {
        SchedState {
            policy: libc::SCHED_OTHER,
            priority: 0,
        }
    };
    match set_sched(target) {
        Ok(()) => Ok(enable),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(false),
        Err(source) => Err(SysError::Os {
            op: "sched_setscheduler",
            source,
        }),
    }
}

/// Real-time priority for the calling thread for as long as the guard lives; the previous policy
/// is restored on drop. Not `Send`: scheduling policy belongs to the thread.
#[derive(Debug)]
pub struct RealtimeGuard {
    previous: Option<SchedState>,
    active: bool,
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl RealtimeGuard {
    /// Enters SCHED_FIFO if permitted (see [`set_realtime_priority`]).
    #[must_use]
    pub fn enter() -> Self {
        let previous = get_sched().ok();
        let active = previous.is_some() && matches!(set_realtime_priority(true), Ok(true));
        Self {
            previous,
            active,
            _thread_bound: std::marker::PhantomData,
        }
    }

    /// Whether the thread actually got real-time priority.
    #[must_use]
    pub fn active(&self) -> bool {
        self.active
    }
}

impl Drop for RealtimeGuard {
    fn drop(&mut self) {
        if self.active
            && let Some(prev) = self.previous
            && let Err(e) = set_sched(prev)
        {
            tracing::warn!(error = %e, "could not restore the scheduling policy");
        }
    }
}

/// Reads another process's memory without stopping it (e.g. hit counters of an applied patch).
/// Tries `process_vm_readv`, then `/proc/PID/mem`. The bytes may be torn if the target writes
/// them concurrently; read naturally aligned words for counters.
///
/// # Errors
/// [`SysError::NoSuchProcess`] or [`SysError::MemIo`].
pub fn read_proc_mem(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    if matches!(raw::vm_read(pid.0, addr, buf), Ok(n) if n == buf.len()) {
        return Ok(());
    }
    let len = buf.len();
    let file = File::open(format!("/proc/{pid}/mem")).map_err(|e| {
        if procfs::is_gone_error(&e) {
            SysError::NoSuchProcess { pid }
        } else {
            SysError::MemIo {
                op: "open /proc/PID/mem",
                pid,
                addr,
                len,
                source: e,
            }
        }
    })?;
    file.read_exact_at(buf, addr).map_err(|e| SysError::MemIo {
        op: "read /proc/PID/mem",
        pid,
        addr,
        len,
        source: e,
    })
}

/// One `process_vm_readv` of up to `buf.len()` bytes at `addr` in another process; returns how
/// many bytes it read (it stops at the first page it cannot read). No `/proc` access.
///
/// # Errors
/// [`SysError::MemIo`] when nothing could be read.
pub fn read_vm_partial(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<usize> {
    raw::vm_read(pid.0, addr, buf).map_err(|e| SysError::MemIo {
        op: "process_vm_readv",
        pid,
        addr,
        len: buf.len(),
        source: e,
    })
}

/// Whether the process exists and has not exited (zombies count as exited), using `kill(pid, 0)`
/// and `/proc/PID/stat`. Subject to pid reuse; hold a [`PidFd`] for a race-free answer.
#[must_use]
pub fn process_alive(pid: Pid) -> bool {
    if pid.0 <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the existence/permission check.
    let r = unsafe { libc::kill(pid.0, 0) };
    if r == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    procfs::process_state(pid).is_ok_and(|s| !s.state.is_exited())
}

/// A pidfd: a handle on one process that cannot be confused with a later process reusing the pid.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: Pid,
}

impl PidFd {
    /// `pidfd_open(pid, 0)` (Linux 5.3+).
    ///
    /// # Errors
    /// [`SysError::NoSuchProcess`] or [`SysError::Os`].
    pub fn open(pid: Pid) -> Result<Self> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_open,
                libc::c_long::from(pid.0),
                0 as libc::c_long,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ESRCH) {
                SysError::NoSuchProcess { pid }
            } else {
                SysError::Os {
                    op: "pidfd_open",
                    source: e,
                }
            });
        }
        let raw_fd = i32::try_from(r).map_err(|_| SysError::Os {
            op: "pidfd_open",
            source: io::Error::from_raw_os_error(libc::EBADF),
        })?;
        // SAFETY: `raw_fd` was just returned by pidfd_open, is open, and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw_fd) };
        Ok(Self { fd, pid })
    }

    /// The pid this handle refers to.
    #[must_use]
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether the process has exited (a pidfd polls readable once the process is a zombie).
    ///
    /// # Errors
    /// [`SysError::Os`] if poll fails.
    pub fn has_exited(&self) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: polls one pollfd, `pfd`, a live local; timeout 0 never blocks.
            let r = unsafe { libc::poll(&raw mut pfd, 1, 0) };
            if r >= 0 {
                return Ok(r > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(SysError::Os {
                    op: "poll pidfd",
                    source: e,
                });
            }
        }
    }
}

/// Whether `tid` is a thread of the calling process: `tgkill(getpid(), tid, 0)` succeeds
/// exactly then (one syscall; a path lookup in `/proc/self/task` costs several times more,
/// on a path that answers every permission event).
#[must_use]
pub fn is_own_thread(tid: Tid) -> bool {
    // Our pid, once per process (glibc does not cache getpid; a fork makes a new one).
    static PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
    static FORK_HOOK: std::sync::Once = std::sync::Once::new();
    FORK_HOOK.call_once(|| {
        extern "C" fn forget_pid() {
            PID.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: registers a child-side fork handler that only stores to an atomic; no
        // prepare/parent handlers.
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    let mut pid = PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid == 0 {
        // SAFETY: getpid takes no arguments and touches no memory.
        pid = unsafe { libc::getpid() };
        PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: tgkill with signal 0 only checks that `tid` is a thread of thread group `pid`
    // (and permission); no signal is sent, no memory of ours is touched.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid.0, 0) == 0 }
}

/// The calling thread's id.
#[must_use]
pub fn gettid() -> i32 {
    raw::gettid()
}

/// Runs `f` on a fresh, short-lived thread and returns its result.
///
/// Why: ptrace binds tracees to the tracing *thread*, and the kernel detaches every tracee of a
/// thread when that thread exits. Running each stop window on its own thread makes that a
/// guarantee: even a thread we could not detach (seized while in uninterruptible sleep, see
/// [`SysError::ThreadDidNotStop`]) is released when `f` returns — it is never left stopped.
///
/// # Panics
/// Re-raises a panic of `f`.
pub fn run_on_tracer_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("stitch-ptrace".into())
            .spawn_scoped(scope, f)
            .unwrap_or_else(|e| panic!("cannot spawn the tracer thread: {e}"));
        match handle.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook's reader answers its own process's events at once by this test; a foreign
    /// thread taken for ours would be let go unheld (unpatched), one of ours taken for a
    /// foreign one would be seized (a deadlock).
    #[test]
    fn own_threads_are_recognised_and_other_processes_threads_are_not() {
        assert!(is_own_thread(Tid(gettid())));
        let other = std::thread::spawn(gettid).join().unwrap();
        // Exited: no longer a thread of ours.
        assert!(!is_own_thread(Tid(other)));
        let t = std::thread::spawn(|| {
            let tid = gettid();
            std::thread::sleep(std::time::Duration::from_millis(200));
            tid
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let live = procfs_task_ids();
        assert!(live.iter().all(|&t| is_own_thread(Tid(t))));
        let _ = t.join();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(!is_own_thread(Tid(pid)), "a child process's thread");
        let _ = child.kill();
        let _ = child.wait();
        assert!(!is_own_thread(Tid(1)), "init");
        // A forked child has its own pid: the cached one must not carry over.
        // SAFETY: the child only calls async-signal-safe functions (gettid, tgkill via
        // is_own_thread's syscall; its pid cache was reset by the atfork handler) and _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let ok = is_own_thread(Tid(gettid()));
            // SAFETY: _exit ends the child at once, running no destructors of the parent's state.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing its status into a live local.
        assert_eq!(unsafe { libc::waitpid(child, &raw mut status, 0) }, child);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "a forked child recognises its own thread"
        );
    }

    fn procfs_task_ids() -> Vec<i32> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }
}

//! [`PtraceTracer`]: the [`Tracer`] for the real kernel. All raw syscalls of the crate live in
//! [`raw`] (and [`crate::util`]), each behind a small safe wrapper.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Result, SysError};
use crate::procfs;
use crate::seccomp::{self, AUDIT_ARCH_X86_64, BpfInsn, SeccompData};
use crate::tracer::{MapAnswer, RemoteSyscall, Tracer};
use crate::types::{MapQuery, Mapping, Perms, Pid, Regs, StopKind, TaskInfo, Tid};

/// Thin safe wrappers over the raw calls. Each `unsafe` block's invariant is local: the pointers
/// passed are to live, correctly sized Rust values owned by the wrapper's frame.
pub(crate) mod raw {
    use std::io;

    use libc::{c_int, c_long, c_uint, c_void};

    use crate::types::Regs;

    /// `PTRACE_SECCOMP_GET_FILTER` (not in libc for glibc targets).
    pub(crate) const PTRACE_SECCOMP_GET_FILTER: c_uint = 0x420c;

    fn check(ret: c_long) -> io::Result<c_long> {
        if ret == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// A ptrace request whose `addr` and `data` are plain integers (no pointers).
    pub(crate) fn ptrace_int(
        req: c_uint,
        tid: i32,
        addr: usize,
        data: usize,
    ) -> io::Result<c_long> {
        // SAFETY: for the requests used with this wrapper (SEIZE, INTERRUPT, CONT, SYSCALL,
        // SINGLESTEP, DETACH, POKEDATA) the kernel treats addr/data as integers (an address in
        // the *tracee*, options, or a signal number); no memory of ours is read or written.
        check(unsafe { libc::ptrace(req, tid, addr as *mut c_void, data as *mut c_void) })
    }

    /// `PTRACE_PEEKDATA`: one word of tracee memory.
    pub(crate) fn peek(tid: i32, addr: u64) -> io::Result<u64> {
        // SAFETY: __errno_location has no preconditions; it returns this thread's errno slot.
        let errno = unsafe { libc::__errno_location() };
        // SAFETY: that slot is valid and thread-local for the thread's whole life. PEEKDATA
        // returns the word itself, so -1 is ambiguous and errno must be cleared first.
        unsafe { *errno = 0 };
        // SAFETY: PEEKDATA reads tracee memory at `addr` (tracee address space, not ours) and
        // returns it; `data` is ignored.
        let v = unsafe {
            libc::ptrace(
                libc::PTRACE_PEEKDATA,
                tid,
                addr as *mut c_void,
                std::ptr::null_mut::<c_void>(),
            )
        };
        if v == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(e);
            }
        }
        Ok(v as u64)
    }

    pub(crate) fn get_regs(tid: i32) -> io::Result<Regs> {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: GETREGS writes exactly one user_regs_struct to `data`, which points to `r`,
        // a live local of that type.
        check(unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGS,
                tid,
                std::ptr::null_mut::<c_void>(),
                &raw mut r,
            )
        })?;
        Ok(Regs {
            r15: r.r15,
            r14: r.r14,
            r13: r.r13,
            r12: r.r12,
            rbp: r.rbp,
            rbx: r.rbx,
            r11: r.r11,
            r10: r.r10,
            r9: r.r9,
            r8: r.r8,
            rax: r.rax,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            orig_rax: r.orig_rax,
            rip: r.rip,
            cs: r.cs,
            eflags: r.eflags,
            rsp: r.rsp,
            ss: r.ss,
            fs_base: r.fs_base,
            gs_base: r.gs_base,
            ds: r.ds,
            es: r.es,
            fs: r.fs,
            gs: r.gs,
        })
    }

    pub(crate) fn set_regs(tid: i32, g: &Regs) -> io::Result<()> {
        let r = libc::user_regs_struct {
            r15: g.r15,
            r14: g.r14,
            r13: g.r13,
            r12: g.r12,
            rbp: g.rbp,
            rbx: g.rbx,
            r11: g.r11,
            r10: g.r10,
            r9: g.r9,
            r8: g.r8,
            rax: g.rax,
            rcx: g.rcx,
            rdx: g.rdx,
            rsi: g.rsi,
            rdi: g.rdi,
            orig_rax: g.orig_rax,
            rip: g.rip,
            cs: g.cs,
            eflags: g.eflags,
            rsp: g.rsp,
            ss: g.ss,
            fs_base: g.fs_base,
            gs_base: g.gs_base,
            ds: g.ds,
            es: g.es,
            fs: g.fs,
            gs: g.gs,
        };
        // SAFETY: SETREGS reads one user_regs_struct from `data`, which points to `r`, a live
        // local of that type; the kernel validates segment/flag values itself.
        check(unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGS,
                tid,
                std::ptr::null_mut::<c_void>(),
                &raw const r,
            )
        })
        .map(drop)
    }

    pub(crate) fn get_sigmask(tid: i32) -> io::Result<u64> {
        let mut mask: u64 = 0;
        // SAFETY: GETSIGMASK writes `addr` (= 8) bytes, the kernel sigset size, to `data`, which
        // points to the live u64 `mask`.
        check(unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGMASK,
                tid,
                8usize as *mut c_void,
                &raw mut mask,
            )
        })?;
        Ok(mask)
    }

    pub(crate) fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
        // SAFETY: SETSIGMASK reads `addr` (= 8) bytes from `data`, which points to the live u64
        // `mask`; the kernel itself drops SIGKILL/SIGSTOP from the set.
        check(unsafe {
            libc::ptrace(
                libc::PTRACE_SETSIGMASK,
                tid,
                8usize as *mut c_void,
                &raw const mask,
            )
        })
        .map(drop)
    }

    /// `si_code` of the signal a thread is stopped for.
    pub(crate) fn siginfo_code(tid: i32) -> io::Result<c_int> {
        // SAFETY: siginfo_t is plain data; all-zero is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: GETSIGINFO writes one siginfo_t to `data`, which points to the live `info`.
        check(unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGINFO,
                tid,
                std::ptr::null_mut::<c_void>(),
                &raw mut info,
            )
        })?;
        Ok(info.si_code)
    }

    /// One seccomp filter of a stopped tracee (`index` 0 = most recent). `Ok(None)` past the last.
    pub(crate) fn seccomp_filter(
        tid: i32,
        index: usize,
    ) -> io::Result<Option<Vec<libc::sock_filter>>> {
        // SAFETY: with data = NULL the kernel only returns the instruction count; nothing is
        // written to our memory.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut c_void,
                std::ptr::null_mut::<c_void>(),
            )
        };
        if n == -1 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        let count = usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut buf = vec![
            libc::sock_filter {
                code: 0,
                jt: 0,
                jf: 0,
                k: 0
            };
            count
        ];
        // SAFETY: the kernel writes `count` sock_filter entries (the count it just reported for
        // this index; filters are immutable once attached) into `buf`, which has exactly that many.
        let m = check(unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut c_void,
                buf.as_mut_ptr(),
            )
        })?;
        buf.truncate(usize::try_from(m).unwrap_or(0).min(count));
        Ok(Some(buf))
    }

    /// `waitpid(tid, __WALL | WNOHANG)`: `Ok(None)` when nothing happened yet.
    pub(crate) fn wait_nohang(tid: i32) -> io::Result<Option<c_int>> {
        let mut status: c_int = 0;
        // SAFETY: waitpid writes one int to `status`, a live local.
        let r = unsafe { libc::waitpid(tid, &raw mut status, libc::__WALL | libc::WNOHANG) };
        match r {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(None),
            _ => Ok(Some(status)),
        }
    }

    /// Whether the calling thread runs under a real-time policy (`SCHED_FIFO`/`SCHED_RR`).
    pub(crate) fn is_realtime() -> bool {
        // SAFETY: sched_getscheduler takes an integer (0: the calling thread).
        let p = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
        p == libc::SCHED_FIFO || p == libc::SCHED_RR
    }

    /// The calling thread's timer slack in nanoseconds (`PR_GET_TIMERSLACK`).
    pub(crate) fn timer_slack() -> io::Result<u64> {
        // SAFETY: PR_GET_TIMERSLACK takes no pointer; the slack is the return value.
        let r = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(u64::try_from(r).unwrap_or(0))
        }
    }

    /// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`; affects its own timers only).
    pub(crate) fn set_timer_slack(ns: u64) -> io::Result<()> {
        // SAFETY: PR_SET_TIMERSLACK takes an integer.
        let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `struct procmap_query` (include/uapi/linux/fs.h, Linux 6.11+; not in libc).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(crate) struct ProcmapQuery {
        pub(crate) size: u64,
        pub(crate) query_flags: u64,
        pub(crate) query_addr: u64,
        pub(crate) vma_start: u64,
        pub(crate) vma_end: u64,
        pub(crate) vma_flags: u64,
        pub(crate) vma_page_size: u64,
        pub(crate) vma_offset: u64,
        pub(crate) inode: u64,
        pub(crate) dev_major: u32,
        pub(crate) dev_minor: u32,
        pub(crate) vma_name_size: u32,
        pub(crate) build_id_size: u32,
        pub(crate) vma_name_addr: u64,
        pub(crate) build_id_addr: u64,
    }

    /// `PROCMAP_QUERY_*` flags: permission filters (and, in `vma_flags`, the answer).
    pub(crate) const PROCMAP_QUERY_VMA_READABLE: u64 = 0x01;
    pub(crate) const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;
    pub(crate) const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
    pub(crate) const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;
    pub(crate) const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

    /// `_IOWR('f', 17, struct procmap_query)`.
    pub(crate) const PROCMAP_QUERY: u64 = (3 << 30)
        | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16)
        | ((b'f' as u64) << 8)
        | 17;

    /// `ioctl(PROCMAP_QUERY)` on an open `/proc/PID/maps`; the name (if asked for) goes into
    /// `name`, whose length bounds it.
    pub(crate) fn procmap_query(
        fd: c_int,
        q: &mut ProcmapQuery,
        name: Option<&mut [u8]>,
    ) -> io::Result<()> {
        q.size = std::mem::size_of::<ProcmapQuery>() as u64;
        q.build_id_size = 0;
        q.build_id_addr = 0;
        match name {
            Some(buf) => {
                q.vma_name_size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                q.vma_name_addr = buf.as_mut_ptr() as u64;
            }
            None => {
                q.vma_name_size = 0;
                q.vma_name_addr = 0;
            }
        }
        // SAFETY: `q` is a live, exclusively borrowed `struct procmap_query` of the size written
        // in its `size` field, which the kernel reads and writes back in place; the only
        // pointer in it is `vma_name_addr`, either 0 (with size 0) or `name`'s buffer (live and
        // exclusively borrowed for this call, `vma_name_size` bytes), where the kernel writes
        // at most that many bytes; no build id is asked for (size and address 0).
        let r = unsafe { libc::ioctl(fd, PROCMAP_QUERY as libc::c_ulong, std::ptr::from_mut(q)) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `process_vm_readv` of one range; returns bytes read.
    pub(crate) fn vm_read(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf` (live, exclusively borrowed, exactly iov_len bytes);
        // `remote` is an address in the *other* process, which the kernel checks itself.
        let n =
            unsafe { libc::process_vm_readv(pid, &raw const local, 1, &raw const remote, 1, 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n.cast_unsigned())
        }
    }

    /// One `process_vm_readv` of up to `IOV_MAX` ranges into consecutive parts of `out`;
    /// returns the bytes read in all (the kernel stops at the first range it cannot read in
    /// full).
    pub(crate) fn vm_read_many(
        pid: i32,
        ranges: &[(u64, usize)],
        out: &mut [u8],
    ) -> io::Result<usize> {
        let total: usize = ranges.iter().map(|&(_, len)| len).sum();
        if total > out.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut rest = &mut out[..total];
        let local: Vec<libc::iovec> = ranges
            .iter()
            .map(|&(_, len)| {
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                libc::iovec {
                    iov_base: part.as_mut_ptr().cast(),
                    iov_len: part.len(),
                }
            })
            .collect();
        let remote: Vec<libc::iovec> = ranges
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut c_void,
                iov_len: len,
            })
            .collect();
        let n_local = libc::c_ulong::try_from(local.len()).unwrap_or(0);
        let n_remote = libc::c_ulong::try_from(remote.len()).unwrap_or(0);
        // SAFETY: the `local` iovecs describe disjoint parts of `out` (exclusively borrowed for
        // this call, exactly iov_len bytes each) and both arrays outlive the call;
        // `remote` holds addresses in the *other* process, which the kernel checks itself.
        let n = unsafe {
            libc::process_vm_readv(pid, local.as_ptr(), n_local, remote.as_ptr(), n_remote, 0)
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n.cast_unsigned())
        }
    }

    pub(crate) fn tgkill(pid: i32, tid: i32, sig: c_int) -> io::Result<()> {
        // SAFETY: tgkill takes only integers.
        let r = unsafe { libc::tgkill(pid, tid, sig) };
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub(crate) fn gettid() -> i32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    /// `waitpid(tid, __WALL)`, blocking: the status, or an error (EINTR when a signal handler
    /// ran meanwhile).
    pub(crate) fn wait_blocking(tid: i32) -> io::Result<c_int> {
        let mut status: c_int = 0;
        // SAFETY: waitpid writes one int to `status`, a live local.
        let r = unsafe { libc::waitpid(tid, &raw mut status, libc::__WALL) };
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(status)
        }
    }

    /// The wake signal's handler: does nothing; its only effect is that a blocking `waitpid`
    /// returns EINTR (it is installed without `SA_RESTART`).
    extern "C" fn on_wake(_: c_int) {}

    /// Installs [`on_wake`] for `sig` if `sig` has its default disposition (nobody else uses
    /// it). Returns whether our handler is installed.
    pub(crate) fn install_wake_handler(sig: c_int) -> bool {
        // SAFETY: sigaction is plain data; all-zero is a valid value (SIG_DFL, empty mask).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: with a null `act`, sigaction only writes the current disposition to `old`,
        // a live local.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &raw mut old) } != 0 {
            return false;
        }
        if old.sa_sigaction != libc::SIG_DFL {
            return false;
        }
        // SAFETY: as above, all-zero is valid: empty mask, no flags (so no SA_RESTART).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_wake as extern "C" fn(c_int) as usize;
        // SAFETY: reads `act`, a live local; the handler is an empty `extern "C"` function,
        // trivially async-signal-safe, that lives as long as the program.
        unsafe { libc::sigaction(sig, &raw const act, std::ptr::null_mut()) == 0 }
    }

    /// Whether `sig` is blocked in the calling thread.
    pub(crate) fn signal_blocked(sig: c_int) -> io::Result<bool> {
        // SAFETY: sigset_t is plain data; all-zero is valid.
        let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: with a null `set`, pthread_sigmask only writes the calling thread's mask to
        // `cur`, a live local.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &raw mut cur) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: reads `cur`, initialised by the call above.
        Ok(unsafe { libc::sigismember(&raw const cur, sig) } == 1)
    }

    /// A POSIX timer that sends a signal to the thread that created it.
    #[derive(Debug)]
    pub(crate) struct ThreadTimer(libc::timer_t);

    impl ThreadTimer {
        /// A disarmed `CLOCK_MONOTONIC` timer delivering `sig` to the calling thread
        /// (`SIGEV_THREAD_ID`).
        pub(crate) fn new(sig: c_int) -> io::Result<Self> {
            // SAFETY: sigevent is plain data; all-zero is valid.
            let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = sig;
            sev.sigev_notify_thread_id = gettid();
            let mut id: libc::timer_t = std::ptr::null_mut();
            // SAFETY: reads `sev` and writes the new timer's id to `id`, both live locals.
            let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &raw mut sev, &raw mut id) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self(id))
        }

        /// Fires after `first`, then every `every` until disarmed (zero `first`: disarm).
        pub(crate) fn set(
            &self,
            first: std::time::Duration,
            every: std::time::Duration,
        ) -> io::Result<()> {
            let ts = |d: std::time::Duration| libc::timespec {
                tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(d.subsec_nanos().cast_signed()),
            };
            let spec = libc::itimerspec {
                it_interval: ts(every),
                it_value: ts(first),
            };
            // SAFETY: `self.0` is a live timer created by timer_create and deleted only in
            // Drop; `spec` is a live local read by the call; the old value is not asked for.
            let r =
                unsafe { libc::timer_settime(self.0, 0, &raw const spec, std::ptr::null_mut()) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }

    impl Drop for ThreadTimer {
        fn drop(&mut self) {
            // SAFETY: `self.0` was created by timer_create and is deleted exactly once, here.
            unsafe { libc::timer_delete(self.0) };
        }
    }
}

const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_EVENT_EXEC: i32 = 4;
/// Options for every seize. Deliberately without `PTRACE_O_EXITKILL`: if we die, the target
/// must live on. TRACESYSGOOD tells syscall stops from SIGTRAP; TRACEEXEC makes an exec during a
/// brief run visible instead of silently changing the address space under us.
const SEIZE_OPTIONS: usize = (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACEEXEC) as usize;
const TF_FLAG: u64 = 0x100;

fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// A decoded `waitpid` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Exited or killed (or already reaped).
    Gone,
    /// `PTRACE_EVENT_STOP`: interrupt or group stop.
    Parked(StopKind),
    /// `PTRACE_EVENT_EXEC`.
    Exec,
    /// Syscall entry or exit stop.
    Syscall,
    /// Signal-delivery-stop.
    Signal(i32),
    /// Another ptrace event (we enable none, so this means something unexpected).
    Other(i32),
    /// Deadline passed.
    Timeout,
}

impl Event {
    /// The error of an event that ends a wait on `tid` with no result: gone, exec'd (callers
    /// that must detach first match `Exec` themselves), deadline passed, or an unexpected
    /// ptrace event. Waits go on from the other events; given one, this names it as
    /// unexpected rather than panic.
    fn into_error(self, op: &'static str, pid: Pid, tid: Tid) -> SysError {
        let unexpected = |what: String| SysError::UnexpectedStop { op, pid, tid, what };
        match self {
            Event::Gone => SysError::ThreadGone { pid, tid },
            Event::Exec => SysError::Execed { pid, tid },
            Event::Timeout => SysError::ThreadDidNotStop {
                pid,
                tid,
                waited: Duration::ZERO,
                left_seized: Vec::new(),
            },
            Event::Other(what) => unexpected(format!("status event {what}")),
            Event::Parked(kind) => unexpected(format!("event stop {kind:?}")),
            Event::Syscall => unexpected("syscall stop".into()),
            Event::Signal(sig) => unexpected(format!("signal {sig}")),
        }
    }
}

fn decode(status: i32) -> Event {
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Event::Gone;
    }
    if !libc::WIFSTOPPED(status) {
        return Event::Other(status);
    }
    let sig = libc::WSTOPSIG(status);
    match status >> 16 {
        0 if sig == (libc::SIGTRAP | 0x80) => Event::Syscall,
        0 => Event::Signal(sig),
        PTRACE_EVENT_STOP if is_stop_signal(sig) => Event::Parked(StopKind::GroupStopped(sig)),
        PTRACE_EVENT_STOP => Event::Parked(StopKind::Interrupted),
        PTRACE_EVENT_EXEC => Event::Exec,
        ev => Event::Other(ev),
    }
}

/// Lowers the calling thread's timer slack to 1 us while it lives (a normal-priority thread
/// has 50 us by default, which would turn every few-microsecond nap into one of 50 us).
struct TightSlack(Option<u64>);

impl TightSlack {
    fn new() -> Self {
        match raw::timer_slack() {
            Ok(old) if old > 1_000 && raw::set_timer_slack(1_000).is_ok() => Self(Some(old)),
            _ => Self(None),
        }
    }
}

impl Drop for TightSlack {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            let _ = raw::set_timer_slack(old);
        }
    }
}

/// The signal that interrupts a blocking wait at its deadline: the highest real-time signal
/// but three (61 with glibc). The engine installs an empty handler for it (without
/// `SA_RESTART`) the first time it waits, and only if the signal has its default disposition:
/// a program that uses that signal itself keeps it, and the engine polls instead.
pub(crate) fn wake_signal() -> Option<libc::c_int> {
    static SIG: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *SIG.get_or_init(|| {
        let sig = libc::SIGRTMAX() - 3;
        raw::install_wake_handler(sig).then_some(sig)
    })
}

thread_local! {
    /// This thread's wake timer: `None` until first needed, `Some(None)` when it cannot have
    /// one (the thread then polls).
    static WAKE_TIMER: RefCell<Option<Option<raw::ThreadTimer>>> = const { RefCell::new(None) };
}

enum Blocked {
    Status(libc::c_int),
    /// The timer fired (at the deadline, or a 1 ms re-fire): look again.
    Interrupted,
    /// No wake signal, the signal is blocked in this thread, or no timer: poll instead.
    Unavailable,
}

/// One blocking `waitpid(tid, __WALL)`, interrupted at `deadline` by this thread's wake timer
/// (which then re-fires every millisecond, in case it fired before the wait began, until it
/// is disarmed). A blocked tracer is woken by the kernel the moment the tracee stops, instead
/// of noticing on its next poll: on two vCPUs that halved the time to stop 64 threads.
fn wait_blocking_until(tid: i32, deadline: Instant) -> io::Result<Blocked> {
    let Some(sig) = wake_signal() else {
        return Ok(Blocked::Unavailable);
    };
    // A blocked wake signal would never interrupt the wait.
    if raw::signal_blocked(sig).unwrap_or(true) {
        return Ok(Blocked::Unavailable);
    }
    WAKE_TIMER.with(|slot| {
        let mut slot = slot.borrow_mut();
        let timer = slot.get_or_insert_with(|| raw::ThreadTimer::new(sig).ok());
        let Some(t) = timer.as_ref() else {
            return Ok(Blocked::Unavailable);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Blocked::Interrupted);
        }
        if t.set(left, Duration::from_millis(1)).is_err() {
            return Ok(Blocked::Unavailable);
        }
        let r = raw::wait_blocking(tid);
        if t.set(Duration::ZERO, Duration::ZERO).is_err() {
            // A timer left firing would interrupt this thread's other syscalls: delete it
            // (and poll from now on).
            *timer = None;
        }
        match r {
            Ok(status) => Ok(Blocked::Status(status)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(Blocked::Interrupted),
            Err(e) => Err(e),
        }
    })
}

/// `waitpid(tid, __WALL)` until `deadline`: `Ok(None)` on timeout. Linux has no timed
/// waitpid: after a short poll (a stop on the other CPU usually lands within it) this blocks
/// in `waitpid`, with a per-thread timer that interrupts it at the deadline (see
/// [`wake_signal`]). Where that is not possible it polls with `WNOHANG` — without ever
/// spinning a CPU the tracee may need: a normal-priority caller yields for the first 20 us,
/// then naps; a real-time caller busy-polls for 5 us only, then naps, since `sched_yield`
/// under `SCHED_FIFO` never lets a normal-priority tracee run on that CPU. Naps start at
/// 2 us (timer slack lowered to 1 us meanwhile) and double up to 50 us, up to 1 ms after
/// 10 ms.
pub(crate) fn wait_status(tid: i32, deadline: Instant) -> io::Result<Option<libc::c_int>> {
    let started = Instant::now();
    // Yield (normal priority) or busy-poll (real-time) this long before blocking or napping.
    let mut spin: Option<(Duration, bool)> = None;
    let mut slack: Option<TightSlack> = None;
    let mut nap = Duration::from_micros(2);
    let mut can_block = true;
    loop {
        match raw::wait_nohang(tid) {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let waited = now - started;
        let (spin_for, yielding) = *spin.get_or_insert_with(|| {
            if raw::is_realtime() {
                (Duration::from_micros(5), false)
            } else {
                (Duration::from_micros(20), true)
            }
        });
        if waited < spin_for {
            // A stop on the other CPU usually lands within this.
            if yielding {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        if can_block {
            match wait_blocking_until(tid, deadline)? {
                Blocked::Status(status) => return Ok(Some(status)),
                Blocked::Interrupted => continue,
                Blocked::Unavailable => can_block = false,
            }
        }
        slack.get_or_insert_with(TightSlack::new);
        std::thread::sleep(nap.min(deadline - now));
        let cap = if waited < Duration::from_millis(10) {
            Duration::from_micros(50)
        } else {
            Duration::from_millis(1)
        };
        nap = (nap * 2).min(cap);
    }
}

/// The real tracer. Not `Send`: Linux ties a tracee to the *thread* that seized it, so every
/// request must come from that thread (see [`crate::run_on_tracer_thread`]).
#[derive(Debug)]
pub struct PtraceTracer {
    mem: HashMap<Pid, File>,
    /// An open `/proc/PID/maps` per process, for `PROCMAP_QUERY` (dropped with `mem`).
    maps: HashMap<Pid, File>,
    /// This kernel refused `PROCMAP_QUERY` (before 6.11): do not ask again.
    no_procmap_query: bool,
    /// Seccomp filters per held thread (`None`: no filter). Only the thread itself (or a sibling,
    /// with TSYNC) can add a filter, and all of them are held: valid until `release_process`
    /// or until a thread of the process runs its own code (a brief run, a step).
    filters: HashMap<(Pid, Tid), Option<Vec<Vec<BpfInsn>>>>,
    /// Each held thread's ignored signals (`SigIgn`), read with its seccomp mode; valid as
    /// long as `filters`.
    ignored: HashMap<(Pid, Tid), u64>,
    /// Threads a stepped remote syscall left in the step's signal-delivery-stop (not yet
    /// settled back into a `PTRACE_EVENT_STOP`, see [`Tracer::settle`]).
    stepped: std::collections::HashSet<(Pid, Tid)>,
    /// For each thread in `stepped`: its own registers and signal mask, as restored after
    /// that remote syscall. Nothing changes them while it stays in that stop, so the next
    /// remote syscall of a batch need not read them again (two ptrace calls); dropped with
    /// the thread's `stepped` entry and by `set_regs`.
    own: HashMap<(Pid, Tid), (Regs, u64)>,
    /// Whether to try `/proc/PID/mem` for writes (else only PTRACE_POKEDATA).
    proc_mem_writes: bool,
    _bound_to_thread: PhantomData<*const ()>,
}

impl Default for PtraceTracer {
    fn default() -> Self {
        Self::new()
    }
}

impl PtraceTracer {
    /// A tracer bound to the calling thread.
    #[must_use]
    pub fn new() -> Self {
        Self {
            mem: HashMap::new(),
            maps: HashMap::new(),
            no_procmap_query: false,
            filters: HashMap::new(),
            ignored: HashMap::new(),
            stepped: std::collections::HashSet::new(),
            own: HashMap::new(),
            proc_mem_writes: true,
            _bound_to_thread: PhantomData,
        }
    }

    /// Never asks for single mappings (`PROCMAP_QUERY`): reads `/proc/PID/maps` whole, as on
    /// kernels before 6.11 (for tests of that path).
    #[must_use]
    pub fn without_procmap_query(mut self) -> Self {
        self.no_procmap_query = true;
        self
    }

    /// Writes only through `PTRACE_POKEDATA`, as on kernels booted with
    /// `proc_mem.force_override=never` (where `/proc/PID/mem` refuses to write read-only text).
    #[must_use]
    pub fn without_proc_mem_writes(mut self) -> Self {
        self.proc_mem_writes = false;
        self
    }

    fn err(op: &'static str, pid: Pid, tid: Tid, e: io::Error) -> SysError {
        match e.raw_os_error() {
            Some(libc::ESRCH) if !thread_exists(pid, tid) => SysError::ThreadGone { pid, tid },
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

    fn req(
        op: &'static str,
        pid: Pid,
        tid: Tid,
        req: libc::c_uint,
        addr: usize,
        data: usize,
    ) -> Result<()> {
        raw::ptrace_int(req, tid.0, addr, data)
            .map(drop)
            .map_err(|e| Self::err(op, pid, tid, e))
    }

    /// Waits for the next event of `tid` (see [`wait_status`]). Never blocks past `deadline`.
    fn next_event(pid: Pid, tid: Tid, deadline: Instant) -> Result<Event> {
        match wait_status(tid.0, deadline) {
            Ok(Some(status)) => Ok(decode(status)),
            Ok(None) => Ok(Event::Timeout),
            // Not (or no longer) our tracee: it exited and was reaped.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(Event::Gone),
            Err(e) => Err(SysError::Ptrace {
                op: "waitpid",
                pid,
                tid,
                source: e,
            }),
        }
    }

    /// Waits until `tid` sits in a `PTRACE_EVENT_STOP`, delivering any signal that shows up
    /// first (so the target sees exactly the signals it would have seen without us).
    fn wait_event_stop(
        op: &'static str,
        pid: Pid,
        tid: Tid,
        deadline: Instant,
    ) -> Result<StopKind> {
        loop {
            match Self::next_event(pid, tid, deadline)? {
                Event::Parked(kind) => return Ok(kind),
                Event::Signal(sig) => Self::req(op, pid, tid, libc::PTRACE_CONT, 0, sig as usize)?,
                Event::Exec => {
                    // The address space is new: let this thread go and tell the caller.
                    let _ = raw::ptrace_int(libc::PTRACE_DETACH, tid.0, 0, 0);
                    return Err(SysError::Execed { pid, tid });
                }
                // A syscall stop can only be a leftover of an interrupted remote syscall: go on.
                Event::Syscall => Self::req(op, pid, tid, libc::PTRACE_CONT, 0, 0)?,
                ev @ (Event::Gone | Event::Timeout | Event::Other(_)) => {
                    return Err(ev.into_error(op, pid, tid));
                }
            }
        }
    }

    /// From any ptrace-stop, back to a `PTRACE_EVENT_STOP` without running user code: the
    /// pending interrupt trap is taken in the kernel's signal path before returning to user mode.
    fn park(op: &'static str, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind> {
        Self::req(op, pid, tid, libc::PTRACE_INTERRUPT, 0, 0)?;
        Self::req(op, pid, tid, libc::PTRACE_CONT, 0, 0)?;
        Self::wait_event_stop(op, pid, tid, deadline)
    }

    fn mem_file(&mut self, pid: Pid) -> io::Result<&File> {
        match self.mem.entry(pid) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => Ok(v.insert(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(format!("/proc/{pid}/mem"))?,
            )),
        }
    }

    fn poke_range(pid: Pid, via: Tid, addr: u64, data: &[u8]) -> Result<()> {
        let io_err = |e: io::Error| SysError::MemIo {
            op: "ptrace pokedata",
            pid,
            addr,
            len: data.len(),
            source: e,
        };
        let end = addr + data.len() as u64;
        let mut word = addr & !7;
        while word < end {
            // Aligned words never straddle a page, so an edge word never touches an unmapped page.
            let lo = word.max(addr);
            let hi = (word + 8).min(end);
            let mut bytes = if lo == word && hi == word + 8 {
                [0u8; 8]
            } else {
                raw::peek(via.0, word).map_err(io_err)?.to_le_bytes()
            };
            let from = (lo - addr) as usize;
            let to = (hi - addr) as usize;
            bytes[(lo - word) as usize..(hi - word) as usize].copy_from_slice(&data[from..to]);
            raw::ptrace_int(
                libc::PTRACE_POKEDATA,
                via.0,
                word as usize,
                u64::from_le_bytes(bytes) as usize,
            )
            .map_err(io_err)?;
            word += 8;
        }
        Ok(())
    }

    /// Drops what was cached about `pid`'s threads (seccomp filters, ignored signals): after a
    /// thread ran its own code, it may have changed either.
    fn forget_thread_facts(&mut self, pid: Pid) {
        self.filters.retain(|&(p, _), _| p != pid);
        self.ignored.retain(|&(p, _), _| p != pid);
    }

    fn seccomp_filters(
        &mut self,
        pid: Pid,
        tid: Tid,
        nr: i64,
    ) -> Result<Option<&Vec<Vec<BpfInsn>>>> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.filters.entry((pid, tid)) {
            let forbid = |why: String| SysError::SeccompForbids { pid, tid, nr, why };
            // `status` alone: the seccomp mode and SigIgn are all this needs.
            let info = procfs::task_status(pid, tid)?;
            self.ignored.insert((pid, tid), info.sig_ignored);
            let loaded = match info.seccomp {
                0 => None,
                1 => return Err(forbid("strict mode".into())),
                _ => {
                    let mut filters = Vec::new();
                    for index in 0.. {
                        match raw::seccomp_filter(tid.0, index) {
                            Ok(Some(f)) => filters.push(
                                f.iter()
                                    .map(|i| BpfInsn {
                                        code: i.code,
                                        jt: i.jt,
                                        jf: i.jf,
                                        k: i.k,
                                    })
                                    .collect(),
                            ),
                            Ok(None) => break,
                            Err(e) => return Err(forbid(format!("cannot read the filter: {e}"))),
                        }
                    }
                    Some(filters)
                }
            };
            slot.insert(loaded);
        }
        Ok(self.filters.get(&(pid, tid)).and_then(Option::as_ref))
    }

    fn seccomp_check(&mut self, pid: Pid, tid: Tid, call: &RemoteSyscall) -> Result<()> {
        let forbid = |why: String| SysError::SeccompForbids {
            pid,
            tid,
            nr: call.nr,
            why,
        };
        let Some(filters) = self.seccomp_filters(pid, tid, call.nr)? else {
            return Ok(());
        };
        let data = SeccompData {
            nr: i32::try_from(call.nr).map_err(|_| forbid("syscall number out of range".into()))?,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: call.gadget + 2,
            args: call.args,
        };
        match seccomp::evaluate(filters, &data) {
            Ok(v) if v.is_harmless() => Ok(()),
            Ok(v) => Err(forbid(format!("{v:?}"))),
            Err(e) => Err(forbid(format!("cannot evaluate the filter: {e}"))),
        }
    }

    /// The body of a remote syscall, after registers and mask are replaced. Leaves the thread
    /// parked (or reports why it could not).
    ///
    /// Two stops: `PTRACE_SYSCALL` to the syscall-entry stop (where we check it is our call),
    /// then `PTRACE_INTERRUPT` + `PTRACE_CONT`: the syscall runs to completion and the pending
    /// interrupt traps the thread in a `PTRACE_EVENT_STOP` on its way back to user mode,
    /// before it executes one instruction — where the result is in `rax` and the registers
    /// can be restored (the stop the three-stop way reaches with an extra exit stop and park).
    /// The pending interrupt makes `signal_pending()` true inside the syscall, so a call that
    /// waits interruptibly may come back with a restart code: `fast` is then not usable and
    /// the caller runs it again with `fast == false` (exit stop, then park).
    fn run_hijacked(
        pid: Pid,
        tid: Tid,
        call: &RemoteSyscall,
        deadline: Instant,
        deferred: &mut Vec<i32>,
        fast: bool,
    ) -> Result<i64> {
        const OP: &str = "remote syscall";
        Self::req(OP, pid, tid, libc::PTRACE_SYSCALL, 0, 0)?;
        let mut entered = false;
        let result = loop {
            let resume = if fast && entered {
                libc::PTRACE_CONT
            } else {
                libc::PTRACE_SYSCALL
            };
            match Self::next_event(pid, tid, deadline)? {
                Event::Syscall if !entered => {
                    let r = raw::get_regs(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?;
                    if r.orig_rax != call.nr.cast_unsigned() || r.rip != call.gadget + 2 {
                        return Err(SysError::UnexpectedStop {
                            op: OP,
                            pid,
                            tid,
                            what: format!(
                                "entered syscall {} at {:#x}",
                                r.orig_rax.cast_signed(),
                                r.rip
                            ),
                        });
                    }
                    entered = true;
                    if fast {
                        Self::req(OP, pid, tid, libc::PTRACE_INTERRUPT, 0, 0)?;
                        Self::req(OP, pid, tid, libc::PTRACE_CONT, 0, 0)?;
                    } else {
                        Self::req(OP, pid, tid, libc::PTRACE_SYSCALL, 0, 0)?;
                    }
                }
                // The fast way: the syscall is done and the thread is back in an event stop.
                Event::Parked(_) if fast && entered => {
                    let r = raw::get_regs(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?;
                    return Ok(r.rax.cast_signed());
                }
                Event::Syscall if fast => Self::req(OP, pid, tid, resume, 0, 0)?,
                Event::Syscall => {
                    let r = raw::get_regs(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?;
                    break r.rax.cast_signed();
                }
                // Only SIGKILL/SIGSTOP (unblockable) or a forced signal can get here: hold it back
                // and queue it again once the thread's own state is restored.
                Event::Signal(sig) => {
                    deferred.push(sig);
                    Self::req(OP, pid, tid, resume, 0, 0)?;
                }
                Event::Parked(_) => Self::req(OP, pid, tid, resume, 0, 0)?,
                ev @ (Event::Gone | Event::Exec | Event::Timeout | Event::Other(_)) => {
                    return Err(ev.into_error(OP, pid, tid));
                }
            }
        };
        // Back to an event stop: registers restored there are seen by the kernel's restart logic.
        Self::park(OP, pid, tid, deadline)?;
        Ok(result)
    }
}

impl PtraceTracer {
    /// The body of a remote syscall in one stop, after registers and mask are replaced:
    /// `PTRACE_SINGLESTEP` over the `syscall` instruction. The kernel reports the step at
    /// syscall exit with a forced SIGTRAP (`TRAP_BRKPT`): the thread stops in a
    /// signal-delivery-stop inside `get_signal`, after the call, before one more instruction,
    /// with the result in `rax` — the same place in the kernel's signal path as a
    /// `PTRACE_EVENT_STOP`, so registers restored there are seen by the restart logic; the
    /// trap is discarded when the thread is resumed (signal 0). No interrupt is pending
    /// during the call, so a call that waits is not cut short with a restart code (unlike the
    /// two-stop way).
    fn run_stepped(
        pid: Pid,
        tid: Tid,
        call: &RemoteSyscall,
        deadline: Instant,
        deferred: &mut Vec<i32>,
    ) -> Result<i64> {
        const OP: &str = "remote syscall";
        Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, 0)?;
        loop {
            match Self::next_event(pid, tid, deadline)? {
                Event::Signal(libc::SIGTRAP)
                    if raw::siginfo_code(tid.0).map_err(|e| Self::err(OP, pid, tid, e))? > 0 =>
                {
                    let r = raw::get_regs(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?;
                    if r.orig_rax != call.nr.cast_unsigned() || r.rip != call.gadget + 2 {
                        return Err(SysError::UnexpectedStop {
                            op: OP,
                            pid,
                            tid,
                            what: format!(
                                "stepped to {:#x} after syscall {}",
                                r.rip,
                                r.orig_rax.cast_signed()
                            ),
                        });
                    }
                    return Ok(r.rax.cast_signed());
                }
                // Only SIGKILL/SIGSTOP (unblockable), a forced signal or a SIGTRAP someone sent
                // can get here: hold it back and queue it again once the thread's own state is
                // restored.
                Event::Signal(sig) => {
                    deferred.push(sig);
                    Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, 0)?;
                }
                Event::Parked(_) | Event::Syscall => {
                    Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, 0)?;
                }
                ev @ (Event::Gone | Event::Exec | Event::Timeout | Event::Other(_)) => {
                    return Err(ev.into_error(OP, pid, tid));
                }
            }
        }
    }
}

/// Return values that mean "interrupted, to be restarted" (`-ERESTARTSYS`,
/// `-ERESTARTNOINTR`, `-ERESTARTNOHAND`, `-ERESTART_RESTARTBLOCK`) or `-EINTR`: a syscall run
/// the fast way that returns one of these is run again the slow way.
fn interrupted_return(r: i64) -> bool {
    matches!(r, -512 | -513 | -514 | -516) || r == -i64::from(libc::EINTR)
}

fn thread_exists(pid: Pid, tid: Tid) -> bool {
    match procfs::task_info(pid, tid) {
        Ok(info) => !info.state.is_exited(),
        Err(_) => false,
    }
}

impl Tracer for PtraceTracer {
    fn task_info(&mut self, pid: Pid, tid: Tid) -> Result<TaskInfo> {
        procfs::task_info(pid, tid)
    }

    fn list_threads(&mut self, pid: Pid) -> Result<Vec<Tid>> {
        procfs::list_threads(pid)
    }

    fn thread_count(&mut self, pid: Pid) -> Result<Option<usize>> {
        procfs::thread_count(pid).map(Some)
    }

    fn mappings(&mut self, pid: Pid) -> Result<Vec<Mapping>> {
        procfs::read_maps(pid)
    }

    fn heap_and_stack(&mut self, pid: Pid) -> Result<Option<(u64, u64)>> {
        procfs::heap_and_stack(pid)
    }

    fn query_mapping(&mut self, pid: Pid, addr: u64, query: &MapQuery) -> Result<MapAnswer> {
        use std::os::fd::AsRawFd;
        if self.no_procmap_query {
            return Ok(MapAnswer::Unsupported);
        }
        let path = || format!("/proc/{pid}/maps");
        let fd = match self.maps.entry(pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut().as_raw_fd(),
            std::collections::hash_map::Entry::Vacant(v) => match File::open(path()) {
                Ok(f) => v.insert(f).as_raw_fd(),
                Err(e) if procfs::is_gone_error(&e) => {
                    return Err(SysError::NoSuchProcess { pid });
                }
                Err(source) => {
                    return Err(SysError::Proc {
                        path: path(),
                        source,
                    });
                }
            },
        };
        let r = query.require;
        let mut flags = 0;
        for (on, bit) in [
            (query.or_next, raw::PROCMAP_QUERY_COVERING_OR_NEXT_VMA),
            (r.read, raw::PROCMAP_QUERY_VMA_READABLE),
            (r.write, raw::PROCMAP_QUERY_VMA_WRITABLE),
            (r.exec, raw::PROCMAP_QUERY_VMA_EXECUTABLE),
            (r.shared, raw::PROCMAP_QUERY_VMA_SHARED),
        ] {
            if on {
                flags |= bit;
            }
        }
        let mut q = raw::ProcmapQuery {
            query_flags: flags,
            query_addr: addr,
            ..raw::ProcmapQuery::default()
        };
        // PATH_MAX: the kernel refuses longer names with ENAMETOOLONG (answered below by the
        // full read, like an old kernel).
        let mut name_buf = if query.name {
            vec![0u8; 4096]
        } else {
            Vec::new()
        };
        let asked = query.name.then_some(&mut name_buf[..]);
        match raw::procmap_query(fd, &mut q, asked) {
            Ok(()) => {}
            Err(e) => {
                return match e.raw_os_error() {
                    Some(libc::ENOENT) => Ok(MapAnswer::NoneThere),
                    Some(libc::ENOTTY | libc::EINVAL) => {
                        tracing::debug!(pid = pid.0, error = %e, "no PROCMAP_QUERY; reading the maps whole");
                        self.no_procmap_query = true;
                        Ok(MapAnswer::Unsupported)
                    }
                    Some(libc::ENAMETOOLONG) => Ok(MapAnswer::Unsupported),
                    Some(libc::ESRCH) => Err(SysError::NoSuchProcess { pid }),
                    _ => Err(SysError::Proc {
                        path: path(),
                        source: e,
                    }),
                };
            }
        }
        let name = if query.name && q.vma_name_size > 0 {
            // The size counts the terminating NUL.
            let len = (q.vma_name_size as usize - 1).min(name_buf.len());
            String::from_utf8_lossy(&name_buf[..len]).into_owned()
        } else {
            String::new()
        };
        Ok(MapAnswer::Found(Mapping {
            start: q.vma_start,
            end: q.vma_end,
            perms: Perms {
                read: q.vma_flags & raw::PROCMAP_QUERY_VMA_READABLE != 0,
                write: q.vma_flags & raw::PROCMAP_QUERY_VMA_WRITABLE != 0,
                exec: q.vma_flags & raw::PROCMAP_QUERY_VMA_EXECUTABLE != 0,
                shared: q.vma_flags & raw::PROCMAP_QUERY_VMA_SHARED != 0,
            },
            offset: q.vma_offset,
            dev: (q.dev_major, q.dev_minor),
            inode: q.inode,
            name,
        }))
    }

    fn seize(&mut self, pid: Pid, tid: Tid) -> Result<()> {
        raw::ptrace_int(libc::PTRACE_SEIZE, tid.0, 0, SEIZE_OPTIONS).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ESRCH) => SysError::ThreadGone { pid, tid },
                Some(libc::EPERM) => SysError::PermissionDenied {
                    op: "ptrace seize",
                    pid,
                    tid,
                    source: e,
                },
                _ => SysError::Ptrace {
                    op: "ptrace seize",
                    pid,
                    tid,
                    source: e,
                },
            }
        })?;
        raw::ptrace_int(libc::PTRACE_INTERRUPT, tid.0, 0, 0)
            .map(drop)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ESRCH) => SysError::ThreadGone { pid, tid },
                _ => SysError::Ptrace {
                    op: "ptrace interrupt",
                    pid,
                    tid,
                    source: e,
                },
            })
    }

    fn wait_stop(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind> {
        Self::wait_event_stop("wait for stop", pid, tid, deadline)
    }

    fn get_regs(&mut self, pid: Pid, tid: Tid) -> Result<Regs> {
        raw::get_regs(tid.0).map_err(|e| Self::err("ptrace getregs", pid, tid, e))
    }

    fn set_regs(&mut self, pid: Pid, tid: Tid, regs: &Regs) -> Result<()> {
        self.own.remove(&(pid, tid));
        raw::set_regs(tid.0, regs).map_err(|e| Self::err("ptrace setregs", pid, tid, e))
    }

    fn read_memory(&mut self, pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // process_vm_readv is one syscall with no fd; it fails on pages without PROT_READ, where
        // /proc/PID/mem (FOLL_FORCE) still reads.
        if matches!(raw::vm_read(pid.0, addr, buf), Ok(n) if n == buf.len()) {
            return Ok(());
        }
        let len = buf.len();
        let file = self.mem_file(pid).map_err(|e| SysError::MemIo {
            op: "open /proc/PID/mem",
            pid,
            addr,
            len,
            source: e,
        })?;
        file.read_exact_at(buf, addr).map_err(|e| SysError::MemIo {
            op: "read /proc/PID/mem",
            pid,
            addr,
            len,
            source: e,
        })
    }

    fn read_memory_many(
        &mut self,
        pid: Pid,
        ranges: &[(u64, usize)],
        out: &mut [u8],
    ) -> Vec<Result<()>> {
        const IOV_MAX: usize = 1024;
        let total: usize = ranges.iter().map(|&(_, len)| len).sum();
        if total > out.len() {
            return ranges
                .iter()
                .map(|_| {
                    Err(SysError::InvalidArgument(
                        "read_memory_many: output buffer too small".into(),
                    ))
                })
                .collect();
        }
        let mut results = Vec::with_capacity(ranges.len());
        let mut rest = &mut out[..total];
        for chunk in ranges.chunks(IOV_MAX) {
            let chunk_len: usize = chunk.iter().map(|&(_, len)| len).sum();
            let (buf, tail) = std::mem::take(&mut rest).split_at_mut(chunk_len);
            rest = tail;
            let mut done = raw::vm_read_many(pid.0, chunk, buf).unwrap_or(0);
            let mut at = 0;
            for &(addr, len) in chunk {
                let part = &mut buf[at..at + len];
                at += len;
                if done >= len {
                    done -= len;
                    results.push(Ok(()));
                } else {
                    // Not read in full by the batch (and nothing after it was): one by one,
                    // with the /proc/PID/mem fallback.
                    done = 0;
                    results.push(self.read_memory(pid, addr, part));
                }
            }
        }
        results
    }

    fn write_memory(&mut self, pid: Pid, via: Tid, addr: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        // /proc/PID/mem writes through read-only text (the kernel breaks COW into a private
        // copy; the file on disk is untouched). process_vm_writev cannot. Kernels booted with
        // proc_mem.force_override=never refuse; PTRACE_POKEDATA is then the fallback.
        let first = if self.proc_mem_writes {
            match self.mem_file(pid) {
                Ok(f) => f.write_all_at(data, addr),
                Err(e) => Err(e),
            }
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        };
        match first {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(pid = pid.0, addr, error = %e, "/proc/PID/mem write failed, falling back to POKEDATA");
                Self::poke_range(pid, via, addr, data)
            }
        }
    }

    fn single_step(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<StopKind> {
        const OP: &str = "single step";
        self.forget_thread_facts(pid);
        self.stepped.remove(&(pid, tid));
        self.own.remove(&(pid, tid));
        // The step's SIGTRAP is *forced*: were SIGTRAP blocked, the kernel would unblock it and
        // reset the handler to SIG_DFL. Unblock it ourselves for the step, re-block afterwards.
        let mask = raw::get_sigmask(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?;
        let trap = sigbit(libc::SIGTRAP);
        if mask & trap != 0 {
            raw::set_sigmask(tid.0, mask & !trap).map_err(|e| Self::err(OP, pid, tid, e))?;
        }
        let stepped = (|| -> Result<()> {
            Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, 0)?;
            let mut interrupted = false;
            let mut wait_until = deadline;
            loop {
                match Self::next_event(pid, tid, wait_until)? {
                    Event::Signal(libc::SIGTRAP)
                        if raw::siginfo_code(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?
                            > 0 =>
                    {
                        return Ok(());
                    }
                    // A signal that arrived first: deliver it (the kernel then reports the step
                    // on entry to the handler).
                    Event::Signal(sig) => {
                        Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, sig as usize)?
                    }
                    Event::Parked(_) if interrupted => return Ok(()),
                    Event::Parked(_) => Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, 0)?,
                    Event::Syscall => Self::req(OP, pid, tid, libc::PTRACE_SINGLESTEP, 0, 0)?,
                    Event::Exec => {
                        let _ = raw::ptrace_int(libc::PTRACE_DETACH, tid.0, 0, 0);
                        return Err(SysError::Execed { pid, tid });
                    }
                    // The instruction was a blocking syscall: interrupt it (it will restart).
                    Event::Timeout if !interrupted => {
                        interrupted = true;
                        Self::req(OP, pid, tid, libc::PTRACE_INTERRUPT, 0, 0)?;
                        wait_until = Instant::now() + Duration::from_millis(500);
                    }
                    ev @ (Event::Gone | Event::Timeout | Event::Other(_)) => {
                        return Err(ev.into_error(OP, pid, tid));
                    }
                }
            }
        })();
        let parked = stepped.and_then(|()| {
            Self::park(
                OP,
                pid,
                tid,
                deadline.max(Instant::now() + Duration::from_millis(500)),
            )
        });
        if mask & trap != 0 {
            // Re-add only our bit: if a handler was entered, the kernel changed the mask for it.
            if let Ok(now) = raw::get_sigmask(tid.0) {
                let _ = raw::set_sigmask(tid.0, now | trap);
            }
        }
        parked
    }

    fn run_briefly(
        &mut self,
        pid: Pid,
        tid: Tid,
        run_for: Duration,
        deadline: Instant,
    ) -> Result<StopKind> {
        const OP: &str = "run briefly";
        self.forget_thread_facts(pid);
        self.stepped.remove(&(pid, tid));
        self.own.remove(&(pid, tid));
        Self::req(OP, pid, tid, libc::PTRACE_CONT, 0, 0)?;
        // Hand each signal over the moment it stops the thread instead of sleeping through the
        // window: a thread parked in a signal-delivery-stop makes no progress, and one whose
        // handler always finds the next signal pending on return (a fast itimer) would sit at
        // the same interrupted instruction after every brief run.
        let until = Instant::now() + run_for;
        loop {
            match Self::next_event(pid, tid, until)? {
                Event::Timeout => break,
                Event::Signal(sig) => Self::req(OP, pid, tid, libc::PTRACE_CONT, 0, sig as usize)?,
                Event::Syscall => Self::req(OP, pid, tid, libc::PTRACE_CONT, 0, 0)?,
                // A job-control stop arrived meanwhile: the thread is parked already.
                Event::Parked(kind) => return Ok(kind),
                Event::Exec => {
                    let _ = raw::ptrace_int(libc::PTRACE_DETACH, tid.0, 0, 0);
                    return Err(SysError::Execed { pid, tid });
                }
                ev @ (Event::Gone | Event::Other(_)) => {
                    return Err(ev.into_error(OP, pid, tid));
                }
            }
        }
        match raw::ptrace_int(libc::PTRACE_INTERRUPT, tid.0, 0, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                // Exited meanwhile; reap our notification of it.
                let _ = Self::next_event(pid, tid, Instant::now() + Duration::from_millis(100));
                return Err(SysError::ThreadGone { pid, tid });
            }
            Err(e) => {
                return Err(SysError::Ptrace {
                    op: OP,
                    pid,
                    tid,
                    source: e,
                });
            }
        }
        Self::wait_event_stop(OP, pid, tid, deadline)
    }

    fn syscall(
        &mut self,
        pid: Pid,
        tid: Tid,
        call: &RemoteSyscall,
        deadline: Instant,
    ) -> Result<i64> {
        const OP: &str = "remote syscall";
        self.seccomp_check(pid, tid, call)?;
        // One stop instead of two: single-step the `syscall` instruction. The step's SIGTRAP
        // is forced, which would reset an *ignored* SIGTRAP's disposition: such a thread gets
        // the two-stop way.
        let trap = sigbit(libc::SIGTRAP);
        let stepped = self
            .ignored
            .get(&(pid, tid))
            .is_some_and(|ignored| ignored & trap == 0);
        // Its own registers and mask: as restored after the previous call of a batch (the
        // thread has sat in that step's stop since), else read now.
        let (saved, saved_mask) = match self.own.remove(&(pid, tid)) {
            Some(own) if stepped && self.stepped.contains(&(pid, tid)) => own,
            _ => (
                raw::get_regs(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?,
                raw::get_sigmask(tid.0).map_err(|e| Self::err(OP, pid, tid, e))?,
            ),
        };
        // Block every signal while the registers are not the thread's own: no handler may run on
        // our borrowed context. SIGKILL/SIGSTOP stay unblockable; they are handled in the loop.
        // When stepping, SIGTRAP stays unblocked: a forced SIGTRAP that finds it blocked would
        // unblock it and reset its handler; unblocked, the step's trap stops the thread for us
        // (signal-delivery-stop) and is discarded when it resumes — no handler runs.
        let hijack_mask = if stepped { !trap } else { !0 };
        raw::set_sigmask(tid.0, hijack_mask).map_err(|e| Self::err(OP, pid, tid, e))?;
        let [a0, a1, a2, a3, a4, a5] = call.args;
        let hijack = Regs {
            rip: call.gadget,
            rax: call.nr.cast_unsigned(),
            // -1: "not in a syscall", so resuming from this stop does not apply the restart
            // logic of an interrupted syscall to our borrowed registers.
            orig_rax: u64::MAX,
            rdi: a0,
            rsi: a1,
            rdx: a2,
            r10: a3,
            r8: a4,
            r9: a5,
            eflags: saved.eflags & !TF_FLAG,
            ..saved
        };
        let mut deferred = Vec::new();
        let run = |fast: bool, deferred: &mut Vec<i32>| {
            raw::set_regs(tid.0, &hijack)
                .map_err(|e| Self::err(OP, pid, tid, e))
                .and_then(|()| Self::run_hijacked(pid, tid, call, deadline, deferred, fast))
        };
        let result = if stepped {
            raw::set_regs(tid.0, &hijack)
                .map_err(|e| Self::err(OP, pid, tid, e))
                .and_then(|()| Self::run_stepped(pid, tid, call, deadline, &mut deferred))
        } else {
            run(true, &mut deferred)
        };
        let result = match result {
            Ok(r) if !stepped && interrupted_return(r) => {
                tracing::debug!(
                    pid = pid.0,
                    tid = tid.0,
                    nr = call.nr,
                    r,
                    "remote syscall interrupted by the pending trap; running it again with an exit stop"
                );
                run(false, &mut deferred)
            }
            other => other,
        };
        if result.is_err() {
            // Try to get back to a parked stop so the restore below can work.
            let _ = Self::park(OP, pid, tid, Instant::now() + Duration::from_millis(200));
        } else if stepped {
            // Left in the step's signal-delivery-stop: further remote syscalls go on from
            // there; `settle` parks it (one stop for a whole sequence of calls).
            self.stepped.insert((pid, tid));
        }
        // Restore inside the kernel's signal path (a PTRACE_EVENT_STOP, or the step's
        // signal-delivery-stop; both are inside get_signal): when the thread resumes, the
        // kernel sees the original orig_rax/rax (e.g. read() -> -ERESTARTSYS, nanosleep ->
        // -ERESTART_RESTARTBLOCK) and restarts the interrupted syscall exactly as if we had
        // never been there.
        let restored = raw::set_regs(tid.0, &saved)
            .and_then(|()| raw::set_sigmask(tid.0, saved_mask))
            .map_err(|e| Self::err("restore after remote syscall", pid, tid, e));
        for sig in deferred {
            // Queue it again; it is delivered when the thread next runs with its own state.
            let _ = raw::tgkill(pid.0, tid.0, sig);
        }
        let value = result?;
        restored?;
        if stepped {
            self.own.insert((pid, tid), (saved, saved_mask));
        }
        Ok(value)
    }

    fn settle(&mut self, pid: Pid, tid: Tid, deadline: Instant) -> Result<()> {
        self.own.remove(&(pid, tid));
        if self.stepped.remove(&(pid, tid)) {
            // Resumed with signal 0, the step's SIGTRAP is discarded; the pending interrupt
            // stops the thread again inside get_signal, before it runs one instruction.
            Self::park("settle after a remote syscall", pid, tid, deadline)?;
        }
        Ok(())
    }

    fn detach(&mut self, pid: Pid, tid: Tid) -> Result<()> {
        // From the step's signal-delivery-stop a detach with signal 0 discards the SIGTRAP.
        self.stepped.remove(&(pid, tid));
        self.own.remove(&(pid, tid));
        match raw::ptrace_int(libc::PTRACE_DETACH, tid.0, 0, 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                if !thread_exists(pid, tid) {
                    // Exited: reap the notification so it does not linger as our child event.
                    let _ = raw::wait_nohang(tid.0);
                    return Ok(());
                }
                // Not in a ptrace-stop (should not happen): stop it, then detach.
                let _ = raw::ptrace_int(libc::PTRACE_INTERRUPT, tid.0, 0, 0);
                match Self::wait_event_stop(
                    "detach",
                    pid,
                    tid,
                    Instant::now() + Duration::from_millis(200),
                ) {
                    Ok(_) => Self::req("ptrace detach", pid, tid, libc::PTRACE_DETACH, 0, 0),
                    Err(e) if e.is_gone() => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(SysError::Ptrace {
                op: "ptrace detach",
                pid,
                tid,
                source: e,
            }),
        }
    }

    fn release_process(&mut self, pid: Pid) {
        self.mem.remove(&pid);
        self.maps.remove(&pid);
        self.stepped.retain(|&(p, _)| p != pid);
        self.own.retain(|&(p, _), _| p != pid);
        self.forget_thread_facts(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop::stop_all_with;

    /// A `sleep` child that has exec'd, or `None` (printed) where it cannot be traced.
    fn sleeper() -> Option<(std::process::Child, Pid)> {
        let child = std::process::Command::new("sleep").arg("30").spawn().ok()?;
        let pid = Pid(i32::try_from(child.id()).ok()?);
        let end = Instant::now() + Duration::from_secs(5);
        while !procfs::process_state(pid).is_ok_and(|s| s.comm == "sleep") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Past the exec, ld.so still maps libraries: wait until it sleeps and its maps stay.
        let mut last = String::new();
        while Instant::now() < end {
            let now = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            let asleep =
                procfs::process_state(pid).is_ok_and(|s| s.state == crate::TaskState::Sleeping);
            if asleep && now == last {
                break;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(10));
        }
        Some((child, pid))
    }

    fn stop(pid: Pid, tracer: PtraceTracer) -> Option<crate::StoppedProcess<PtraceTracer>> {
        match stop_all_with(tracer, pid, Instant::now() + Duration::from_secs(2)) {
            Ok(sp) => Some(sp),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIP: cannot stop a child: {e}");
                None
            }
            Err(e) => panic!("cannot stop a child: {e}"),
        }
    }

    fn exec_only() -> MapQuery {
        MapQuery::COVERING_OR_NEXT.requiring(Perms {
            exec: true,
            ..Perms::default()
        })
    }

    /// Every answer `PROCMAP_QUERY` gives (covering, next, permission filters, names) is the
    /// one the maps file gives ([`MapQuery::answer`], the fallback of kernels before 6.11) —
    /// the engine's checks under the stop rest on either.
    #[test]
    fn procmap_query_answers_exactly_what_the_maps_file_lists() {
        let Some((mut child, pid)) = sleeper() else {
            return;
        };
        let Some(mut sp) = stop(pid, PtraceTracer::new()) else {
            return;
        };
        let maps: Vec<Mapping> = procfs::read_maps(pid)
            .unwrap()
            .into_iter()
            .filter(|m| m.name != "[vsyscall]") // the gate area: listed, never a VMA
            .collect();
        // Needs no stop; the stop keeps the answers still.
        let mut direct = PtraceTracer::new();
        if direct
            .query_mapping(pid, 0, &MapQuery::COVERING_OR_NEXT)
            .unwrap()
            == MapAnswer::Unsupported
        {
            eprintln!("SKIP: no PROCMAP_QUERY on this kernel");
            return;
        }
        let queries = [
            MapQuery::COVERING,
            MapQuery::COVERING.named(),
            MapQuery::COVERING_OR_NEXT,
            exec_only().named(),
            MapQuery::COVERING_OR_NEXT.requiring(Perms::RW),
        ];
        let mut addrs = vec![0, 0x1000];
        for m in &maps {
            addrs.extend([m.start, m.end - 1, m.end, m.start.saturating_sub(1)]);
        }
        for q in queries {
            for &a in &addrs {
                let got = match direct.query_mapping(pid, a, &q).unwrap() {
                    MapAnswer::Found(m) => Some(m),
                    MapAnswer::NoneThere => None,
                    MapAnswer::Unsupported => panic!("unsupported after a supported query"),
                };
                let want = q.answer(&maps, a).map(|m| Mapping {
                    name: if q.name {
                        m.name.clone()
                    } else {
                        String::new()
                    },
                    ..m.clone()
                });
                assert_eq!(got, want, "{q:?} at {a:#x}");
            }
        }
        // Through the token: the executable mappings, anonymous ones named (`[vdso]`).
        let exec = sp.exec_mappings().unwrap();
        let want: Vec<&Mapping> = maps.iter().filter(|m| m.perms.exec).collect();
        assert_eq!(exec.len(), want.len(), "{exec:?}");
        for (g, w) in exec.iter().zip(want) {
            assert_eq!((g.start, g.end, g.inode), (w.start, w.end, w.inode));
            if g.inode == 0 {
                assert_eq!(g.name, w.name);
            }
        }
        assert!(exec.iter().any(|m| m.name == "[vdso]"), "{exec:?}");
        sp.resume().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Hazard: the next call of a batch takes the thread's own registers and mask from the
    /// previous one's restore instead of reading them; a stale copy would resume the thread
    /// (here inside `nanosleep`) with another context. Between calls and after the batch the
    /// thread holds exactly what it held when stopped.
    #[test]
    fn a_batch_of_remote_syscalls_restores_registers_and_mask_after_each_call() {
        let Some((mut child, pid)) = sleeper() else {
            return;
        };
        std::thread::sleep(Duration::from_millis(20));
        let Some(mut sp) = stop(pid, PtraceTracer::new()) else {
            return;
        };
        let tid = pid.leader();
        let regs = sp.thread(tid).expect("held").regs;
        let mask = raw::get_sigmask(tid.0).expect("mask");
        let exact = || {
            (
                raw::get_regs(tid.0).expect("regs"),
                raw::get_sigmask(tid.0).expect("mask"),
            )
        };
        sp.remote_batch(|sp| {
            let a = sp.remote_mmap(crate::Placement::Anywhere, 0x2000, libc::PROT_READ)?;
            assert_eq!(exact(), (regs, mask), "after the first call");
            sp.remote_mprotect(a, 0x1000, libc::PROT_NONE)?;
            assert_eq!(exact(), (regs, mask), "after the second call");
            sp.remote_munmap(a, 0x2000)
        })
        .expect("batch");
        assert_eq!(exact(), (regs, mask), "after the batch");
        // Outside a batch the copy is not used (the thread was parked in between).
        let a = sp
            .remote_mmap(crate::Placement::Anywhere, 0x1000, libc::PROT_READ)
            .expect("mmap");
        sp.remote_munmap(a, 0x1000).expect("munmap");
        assert_eq!(exact(), (regs, mask), "after single calls");
        sp.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            procfs::process_state(pid).expect("alive").state,
            crate::TaskState::Sleeping,
            "still in its sleep"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A kernel without `PROCMAP_QUERY` (before 6.11): the token answers every query from one
    /// read of the maps, the same answers.
    #[test]
    fn without_procmap_query_the_maps_are_read_once_and_answer_the_same() {
        let Some((mut child, pid)) = sleeper() else {
            return;
        };
        let Some(mut with) = stop(pid, PtraceTracer::new()) else {
            return;
        };
        let maps = with.mappings().unwrap();
        let mut answers = Vec::new();
        for m in &maps {
            for q in [MapQuery::COVERING.named(), exec_only().named()] {
                answers.push(with.query_mapping(m.start, q).unwrap());
            }
        }
        with.resume().unwrap();
        let Some(mut without) = stop(pid, PtraceTracer::new().without_procmap_query()) else {
            return;
        };
        let mut again = Vec::new();
        for m in &maps {
            for q in [MapQuery::COVERING.named(), exec_only().named()] {
                again.push(without.query_mapping(m.start, q).unwrap());
            }
        }
        assert_eq!(answers, again);
        without.resume().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

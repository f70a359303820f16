//! CPU affinity of the calling thread, for short tracer windows: a tracer that runs on the CPU
//! its tracee last ran on hands the CPU back and forth at each ptrace stop instead of waking
//! another (possibly idle) CPU every time.

use std::io;

use crate::error::{Result, SysError};
use crate::types::Tid;

/// The CPU `tid` last ran on (`processor`, field 39 of `/proc/TID/stat`).
#[must_use]
pub fn last_cpu_of(tid: Tid) -> Option<usize> {
    let s = std::fs::read_to_string(format!("/proc/{}/stat", tid.0)).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(36)?.parse().ok()
}

fn cpu_isset(cpu: usize, set: &libc::cpu_set_t) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `cpu` is below CPU_SETSIZE, so the bit lies inside `set`, a live reference.
    unsafe { libc::CPU_ISSET(cpu, set) }
}

fn get_affinity() -> Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `set`, a
    // live local of exactly that size; pid 0 is the calling thread.
    let r =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) };
    if r < 0 {
        return Err(SysError::Os {
            op: "sched_getaffinity",
            source: io::Error::last_os_error(),
        });
    }
    Ok(set)
}

fn set_affinity(set: &libc::cpu_set_t) -> Result<()> {
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from `set`, a live
    // reference of exactly that size; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if r < 0 {
        return Err(SysError::Os {
            op: "sched_setaffinity",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The CPUs the calling thread may run on, in ascending order.
///
/// # Errors
/// [`SysError::Os`].
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = get_affinity()?;
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| cpu_isset(c, &set))
        .collect())
}

/// The calling thread runs on one CPU while this lives; its previous affinity is restored on
/// drop. Not `Send`: affinity belongs to the thread.
#[derive(Debug)]
pub struct CpuPin {
    previous: libc::cpu_set_t,
    _bound_to_thread: std::marker::PhantomData<*const ()>,
}

impl CpuPin {
    /// Pins the calling thread to `cpu` if that CPU is in its current affinity.
    ///
    /// # Errors
    /// [`SysError::Os`]; [`SysError::InvalidArgument`] for a CPU outside the current set.
    pub fn to(cpu: usize) -> Result<Self> {
        let previous = get_affinity()?;
        if !cpu_isset(cpu, &previous) {
            return Err(SysError::InvalidArgument(format!("cpu {cpu} not allowed")));
        }
        // SAFETY: all-zero is an empty cpu_set_t.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit lies inside `one`.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        set_affinity(&one)?;
        Ok(Self {
            previous,
            _bound_to_thread: std::marker::PhantomData,
        })
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        if let Err(e) = set_affinity(&self.previous) {
            tracing::warn!(error = %e, "restoring CPU affinity");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_thread_runs_on_its_cpu_and_gets_its_affinity_back() {
        let before = get_affinity().unwrap();
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| cpu_isset(c, &before))
            .unwrap();
        {
            let _pin = CpuPin::to(cpu).unwrap();
            // SAFETY: sched_getcpu takes no arguments.
            let now = unsafe { libc::sched_getcpu() };
            assert_eq!(now, cpu as i32);
            let tid = Tid(crate::gettid());
            assert_eq!(last_cpu_of(tid), Some(cpu));
        }
        let after = get_affinity().unwrap();
        // SAFETY: compares two live cpu_set_t values.
        assert!(unsafe { libc::CPU_EQUAL(&before, &after) });
        assert!(CpuPin::to(libc::CPU_SETSIZE as usize).is_err());
        let cpus = allowed_cpus().unwrap();
        assert!(cpus.contains(&cpu));
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }
}

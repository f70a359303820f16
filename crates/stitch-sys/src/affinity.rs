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

/// The CPU the calling thread runs on right now (`None` if the kernel cannot say).
#[must_use]
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
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
        Self::set(&[cpu], previous)
    }

    /// Lets the calling thread run on exactly `cpus` while this lives — for a thread pinned
    /// for life that must run elsewhere for a while (a hold worker moving to the CPU of the
    /// thread it holds; `cpus` from what the process may use, [`allowed_cpus`] before any
    /// pin: [`CpuPin::to`] only accepts CPUs of the current, pinned set). The previous
    /// affinity is restored on drop.
    ///
    /// # Errors
    /// [`SysError::InvalidArgument`] for an empty set or a CPU past `CPU_SETSIZE`;
    /// [`SysError::Os`] when the kernel refuses the set (none of it allowed by the cpuset).
    pub fn to_set(cpus: &[usize]) -> Result<Self> {
        if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
            return Err(SysError::InvalidArgument(format!("cpu set {cpus:?}")));
        }
        Self::set(cpus, get_affinity()?)
    }

    /// Every CPU in `cpus` must be below `CPU_SETSIZE` (both callers check).
    fn set(cpus: &[usize], previous: libc::cpu_set_t) -> Result<Self> {
        // SAFETY: all-zero is an empty cpu_set_t.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            // SAFETY: `cpu` is below CPU_SETSIZE (the callers check it), so the bit lies
            // inside `set`.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        set_affinity(&set)?;
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

    /// A worker pinned for life to its lane moves to the CPU of the thread it holds for a
    /// while. The hazard: `to` refuses any CPU outside the current (one-CPU) set, or the
    /// worker does not come back to its lane.
    #[test]
    fn thread_pinned_for_life_moves_to_another_cpu_and_comes_back() {
        let cpus = allowed_cpus().unwrap();
        let (home, other) = (cpus[0], *cpus.last().unwrap());
        let _home = CpuPin::to(home).unwrap();
        if other != home {
            assert!(CpuPin::to(other).is_err(), "outside the pinned set");
        }
        {
            let _moved = CpuPin::to_set(&[other]).unwrap();
            assert_eq!(current_cpu(), Some(other));
            assert_eq!(allowed_cpus().unwrap(), vec![other]);
        }
        assert_eq!(current_cpu(), Some(home));
        assert_eq!(allowed_cpus().unwrap(), vec![home]);
        {
            let _free = CpuPin::to_set(&cpus).unwrap();
            assert_eq!(allowed_cpus().unwrap(), cpus);
        }
        assert!(CpuPin::to_set(&[]).is_err());
        assert!(CpuPin::to_set(&[libc::CPU_SETSIZE as usize]).is_err());
        assert_eq!(allowed_cpus().unwrap(), vec![home]);
    }
}

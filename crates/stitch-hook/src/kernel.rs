//! Kernel version facts the hook depends on.

/// `major.minor` of the running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl KernelVersion {
    /// Parses a release string such as `6.18.44-fc-v595` or `5.15.0-91-generic`.
    #[must_use]
    pub fn parse(release: &str) -> Option<Self> {
        let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(Self { major, minor })
    }

    /// The running kernel (`/proc/sys/kernel/osrelease`).
    #[must_use]
    pub fn running() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
    }
}

/// Since Linux 6.8 `execve` opens the executable *before* taking `cred_guard_mutex`; earlier
/// kernels open it with the mutex held, and `PTRACE_SEIZE` of that thread would wait for the
/// same mutex while the thread waits for our answer: a deadlock until the hold bound. So exec
/// holds only on >= 6.8 (unknown version: no).
#[must_use]
pub fn exec_holds_are_safe() -> bool {
    KernelVersion::running().is_some_and(|v| v >= KernelVersion { major: 6, minor: 8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_6_8_do_not_hold_execs() {
        let v = |s| KernelVersion::parse(s).unwrap();
        let safe = KernelVersion { major: 6, minor: 8 };
        assert!(v("6.18.44-fc-v595") >= safe);
        assert!(v("6.8.0") >= safe);
        assert!(v("6.7.12-arch1") < safe);
        assert!(v("5.15.0-91-generic") < safe);
        assert!(v("4.19.0") < safe);
        assert_eq!(KernelVersion::parse("garbage"), None);
    }
}

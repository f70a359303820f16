//! Small `/proc` readers for the event path (pure parsers + one read each).

use stitch_sys::{Pid, Tid};

/// The process a thread belongs to. A thread-group leader (the usual opener: every exec,
/// every start-up link, a dlopen from the main thread) is recognised with one
/// `pidfd_open(tid)`, which the kernel accepts for leaders only (~5 us); other threads cost a
/// read of `/proc/TID/status` (`Tgid:`, ~30 us: the kernel generates the whole file).
pub(crate) fn tgid_of(tid: Tid) -> Option<Pid> {
    if stitch_sys::PidFd::open(Pid(tid.0)).is_ok() {
        return Some(Pid(tid.0));
    }
    let s = std::fs::read_to_string(format!("/proc/{}/status", tid.0)).ok()?;
    parse_tgid(&s)
}

pub(crate) fn parse_tgid(status: &str) -> Option<Pid> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .map(Pid)
}

/// Whether `tid` is a thread of this very process (one syscall).
pub(crate) fn is_own_thread(tid: Tid) -> bool {
    stitch_sys::is_own_thread(tid)
}

/// The syscall a blocked thread is in: number and arguments (`/proc/TID/syscall`).
pub(crate) fn blocked_syscall(tid: Tid) -> Option<(i64, [u64; 6])> {
    let s = std::fs::read_to_string(format!("/proc/{}/syscall", tid.0)).ok()?;
    parse_syscall(&s)
}

pub(crate) fn parse_syscall(s: &str) -> Option<(i64, [u64; 6])> {
    let mut it = s.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

pub(crate) const SYS_OPEN: i64 = 2;
pub(crate) const SYS_EXECVE: i64 = 59;
pub(crate) const SYS_OPENAT: i64 = 257;
pub(crate) const SYS_EXECVEAT: i64 = 322;

/// From the blocked open's flags: opened for writing (not a load).
pub(crate) fn opened_for_writing(nr: i64, args: &[u64; 6]) -> bool {
    let flags = match nr {
        SYS_OPEN => args[1],
        SYS_OPENAT => args[2],
        _ => return false,
    };
    (flags & 0b11) != 0 // O_WRONLY or O_RDWR
}

/// Whether the blocked syscall is an exec.
pub(crate) fn is_exec(nr: i64) -> bool {
    nr == SYS_EXECVE || nr == SYS_EXECVEAT
}

/// `AT_PHDR` of a program right after its exec (at `PTRACE_EVENT_EXEC`, its stack pointer
/// `rsp` points at `argc`, then `argv`, `envp` and the auxiliary vector): one
/// `process_vm_readv` of the top of its stack. (`/proc/PID/auxv` costs ~55 us here, the first
/// `/proc` access after an exec.) `None` if the vector is not within the bytes read.
pub(crate) fn at_phdr_after_exec(pid: Pid, rsp: u64) -> Option<u64> {
    // Pointers only (the strings lie above them): 4 KiB holds ~500 of them; else 64 KiB.
    [4 << 10, 64 << 10]
        .into_iter()
        .find_map(|len| at_phdr_in(pid, rsp, len))
}

fn at_phdr_in(pid: Pid, rsp: u64, len: usize) -> Option<u64> {
    let mut buf = vec![0u8; len];
    let n = stitch_sys::read_vm_partial(pid, rsp, &mut buf).ok()?;
    buf.truncate(n);
    let words: Vec<u64> = buf
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
        .collect();
    let argc = usize::try_from(*words.first()?).ok()?;
    // argc, argv[0..argc], NULL, envp..., NULL, auxv.
    let mut i = argc.checked_add(2)?;
    if *words.get(i - 1)? != 0 {
        return None;
    }
    while *words.get(i)? != 0 {
        i += 1;
    }
    let auxv = words.get(i + 1..)?;
    let bytes: Vec<u8> = auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    parse_at_phdr(&bytes)
}

pub(crate) fn parse_at_phdr(auxv: &[u8]) -> Option<u64> {
    const AT_NULL: u64 = 0;
    const AT_PHDR: u64 = 3;
    for pair in auxv.chunks_exact(16) {
        let k = u64::from_ne_bytes(pair[..8].try_into().ok()?);
        let v = u64::from_ne_bytes(pair[8..].try_into().ok()?);
        match k {
            AT_PHDR => return Some(v),
            AT_NULL => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_syscall_line_of_a_blocked_openat_parses() {
        let (nr, a) = parse_syscall(
            "257 0xffffff9c 0x7ffd6e1c2f50 0x80000 0x0 0x0 0x0 0x7ffd6e1c2e08 0x7f1b2c3d4e5f\n",
        )
        .unwrap();
        assert_eq!(nr, SYS_OPENAT);
        assert_eq!(a[2], 0x80000);
        assert!(!opened_for_writing(nr, &a));
        assert!(opened_for_writing(SYS_OPENAT, &[0, 0, 0o1101, 0, 0, 0]));
        assert_eq!(parse_syscall("running\n"), None);
    }

    #[test]
    fn tgid_is_read_from_status() {
        assert_eq!(
            parse_tgid("Name:\tx\nTgid:\t4242\nPid:\t4243\n"),
            Some(Pid(4242))
        );
        assert_eq!(parse_tgid("Name:\tx\n"), None);
    }

    #[test]
    fn at_phdr_is_read_from_auxv_pairs_up_to_at_null() {
        let mut v = Vec::new();
        for (k, val) in [(6u64, 4096u64), (3, 0x5555_0000_0040), (0, 0)] {
            v.extend_from_slice(&k.to_ne_bytes());
            v.extend_from_slice(&val.to_ne_bytes());
        }
        assert_eq!(parse_at_phdr(&v), Some(0x5555_0000_0040));
        assert_eq!(parse_at_phdr(&v[32..]), None);
    }

    #[test]
    fn at_phdr_after_exec_walks_argv_and_envp_of_a_real_stack() {
        // A stack laid out as the kernel does at exec, in our own memory.
        let mut words: Vec<u64> = vec![2, 0x1000, 0x1008, 0, 0x2000, 0x2008, 0x2010, 0];
        words.extend([6, 4096, 3, 0x5555_0000_0040, 0, 0]);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let me = Pid(i32::try_from(std::process::id()).unwrap());
        let at = bytes.as_ptr() as u64;
        assert_eq!(at_phdr_after_exec(me, at), Some(0x5555_0000_0040));
    }
}

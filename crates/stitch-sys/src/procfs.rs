//! `/proc` parsing (pure functions over `&str`) and the few readers built on them.
//!
//! The parsers never trust the text: `comm` can contain spaces, parentheses and newlines, fields
//! can be missing on exotic kernels, and a process can vanish between two reads.

use std::io;

use crate::error::{Result, SysError};
use crate::types::{Mapping, Perms, Pid, TaskInfo, TaskState, Tid};

/// The fields of `/proc/PID/stat` that this crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 1.
    pub pid: i32,
    /// Field 2, without the parentheses (may contain anything but NUL).
    pub comm: String,
    /// Field 3.
    pub state: TaskState,
    /// Field 4.
    pub ppid: i32,
    /// Field 9 (`PF_*`).
    pub flags: u64,
    /// Field 14, clock ticks in user mode.
    pub utime: u64,
    /// Field 15, clock ticks in kernel mode.
    pub stime: u64,
    /// Field 20.
    pub num_threads: i64,
    /// Field 23, bytes.
    pub vsize: u64,
}

fn parse_err(what: &'static str, detail: impl Into<String>) -> SysError {
    SysError::Parse {
        what,
        detail: detail.into(),
    }
}

/// Parses `/proc/PID/stat` (or `/proc/PID/task/TID/stat`).
///
/// `comm` is delimited by the first `(` and the *last* `)`, which is the only robust rule: a
/// process can name itself `a) R 1 (b`.
///
/// # Errors
/// [`SysError::Parse`] when the text does not have that shape.
pub fn parse_stat(text: &str) -> Result<ProcStat> {
    const WHAT: &str = "/proc/PID/stat";
    let open = text.find('(').ok_or_else(|| parse_err(WHAT, "no '('"))?;
    let close = text.rfind(')').ok_or_else(|| parse_err(WHAT, "no ')'"))?;
    if close < open {
        return Err(parse_err(WHAT, "')' before '('"));
    }
    let pid = text[..open]
        .trim()
        .parse::<i32>()
        .map_err(|e| parse_err(WHAT, format!("pid: {e}")))?;
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    // rest[0] is field 3.
    let field = |n: usize| -> Result<&str> {
        rest.get(n - 3)
            .copied()
            .ok_or_else(|| parse_err(WHAT, format!("missing field {n}")))
    };
    let num = |n: usize| -> Result<u64> {
        field(n)?
            .parse::<u64>()
            .map_err(|e| parse_err(WHAT, format!("field {n}: {e}")))
    };
    let state_s = field(3)?;
    let mut chars = state_s.chars();
    let state = match (chars.next(), chars.next()) {
        (Some(c), None) => TaskState::from_char(c),
        _ => return Err(parse_err(WHAT, format!("state {state_s:?}"))),
    };
    let ppid = field(4)?
        .parse::<i32>()
        .map_err(|e| parse_err(WHAT, format!("ppid: {e}")))?;
    let num_threads = field(20)?
        .parse::<i64>()
        .map_err(|e| parse_err(WHAT, format!("num_threads: {e}")))?;
    Ok(ProcStat {
        pid,
        comm,
        state,
        ppid,
        flags: num(9)?,
        utime: num(14)?,
        stime: num(15)?,
        num_threads,
        vsize: num(23)?,
    })
}

/// The fields of `/proc/PID/status` that this crate uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// `TracerPid:` (0 = not traced).
    pub tracer_pid: i32,
    /// `SigIgn:`.
    pub sig_ignored: u64,
    /// `SigBlk:` (per thread).
    pub sig_blocked: u64,
    /// `Seccomp:` (0 when the line is absent).
    pub seccomp: u8,
}

/// Parses `/proc/PID/status`. Only `TracerPid` is required; the rest default to 0.
///
/// # Errors
/// [`SysError::Parse`] when `TracerPid` is missing or a known field is malformed.
pub fn parse_status(text: &str) -> Result<ProcStatus> {
    const WHAT: &str = "/proc/PID/status";
    let mut out = ProcStatus::default();
    let mut saw_tracer = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let hex = |v: &str| {
            u64::from_str_radix(v, 16).map_err(|e| parse_err(WHAT, format!("{key}: {e}")))
        };
        match key {
            "TracerPid" => {
                out.tracer_pid = value
                    .parse()
                    .map_err(|e| parse_err(WHAT, format!("TracerPid: {e}")))?;
                saw_tracer = true;
            }
            "SigIgn" => out.sig_ignored = hex(value)?,
            "SigBlk" => out.sig_blocked = hex(value)?,
            "Seccomp" => {
                out.seccomp = value
                    .parse()
                    .map_err(|e| parse_err(WHAT, format!("Seccomp: {e}")))?;
            }
            _ => {}
        }
    }
    if !saw_tracer {
        return Err(parse_err(WHAT, "no TracerPid line"));
    }
    Ok(out)
}

/// Parses one line of `/proc/PID/maps`.
///
/// # Errors
/// [`SysError::Parse`] when the line is malformed.
pub fn parse_maps_line(line: &str) -> Result<Mapping> {
    const WHAT: &str = "/proc/PID/maps";
    let bad = |d: &str| parse_err(WHAT, format!("{d} in {line:?}"));
    // Five space-separated fields, then optional padding and a name that may contain spaces.
    let mut rest = line;
    let mut next = || -> Option<&str> {
        let s = rest.trim_start_matches(' ');
        let end = s.find(' ').unwrap_or(s.len());
        let (tok, tail) = s.split_at(end);
        rest = tail;
        (!tok.is_empty()).then_some(tok)
    };
    let range = next().ok_or_else(|| bad("no range"))?;
    let perms = next().ok_or_else(|| bad("no perms"))?;
    let offset = next().ok_or_else(|| bad("no offset"))?;
    let dev = next().ok_or_else(|| bad("no dev"))?;
    let inode = next().ok_or_else(|| bad("no inode"))?;
    let name = rest.trim_start_matches(' ').to_owned();

    let (s, e) = range.split_once('-').ok_or_else(|| bad("range"))?;
    let start = u64::from_str_radix(s, 16).map_err(|_| bad("start"))?;
    let end = u64::from_str_radix(e, 16).map_err(|_| bad("end"))?;
    if end < start {
        return Err(bad("end < start"));
    }
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad("perms"));
    }
    let perms = Perms {
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
    };
    let offset = u64::from_str_radix(offset, 16).map_err(|_| bad("offset"))?;
    let (ma, mi) = dev.split_once(':').ok_or_else(|| bad("dev"))?;
    let dev = (
        u32::from_str_radix(ma, 16).map_err(|_| bad("dev major"))?,
        u32::from_str_radix(mi, 16).map_err(|_| bad("dev minor"))?,
    );
    let inode = inode.parse::<u64>().map_err(|_| bad("inode"))?;
    Ok(Mapping {
        start,
        end,
        perms,
        offset,
        dev,
        inode,
        name,
    })
}

/// Parses a whole `/proc/PID/maps`.
///
/// # Errors
/// [`SysError::Parse`] on the first malformed line.
pub fn parse_maps(text: &str) -> Result<Vec<Mapping>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_maps_line)
        .collect()
}

/// Parses the names of `/proc/PID/task` entries into thread ids (ignores anything non-numeric).
#[must_use]
pub fn parse_task_dir<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Tid> {
    let mut tids: Vec<Tid> = names
        .into_iter()
        .filter_map(|n| n.parse::<i32>().ok())
        .filter(|&t| t > 0)
        .map(Tid)
        .collect();
    tids.sort_unstable();
    tids.dedup();
    tids
}

/// Whether an I/O error on a `/proc/PID/...` file means the task is gone.
pub(crate) fn is_gone_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn gone(pid: Pid, tid: Tid) -> SysError {
    if pid.0 == tid.0 {
        SysError::NoSuchProcess { pid }
    } else {
        SysError::ThreadGone { pid, tid }
    }
}

/// Reads a whole `/proc` text file with as few `read` calls as it takes (usually two: the
/// text, then the end): `fs::read_to_string` first `statx`es it (size 0 for `/proc`), then
/// reads 32, 32, 64, 128... bytes — nine calls for a 1.4 KiB `status`, each of which makes a
/// `/proc/PID/maps` walk the mappings again. `status` read this way: ~15 us against ~19 us.
fn read_proc_text(path: &str, first: usize) -> io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; first.max(64)];
    let mut n = 0;
    loop {
        if n == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn read_task_file(pid: Pid, tid: Tid, file: &str) -> Result<String> {
    let path = if pid.0 == tid.0 {
        format!("/proc/{pid}/{file}")
    } else {
        format!("/proc/{pid}/task/{tid}/{file}")
    };
    // A `status` is ~1.4 KiB, a `maps` line ~100 bytes (most processes: under 16 KiB).
    let first = if file == "maps" { 16 << 10 } else { 4 << 10 };
    read_proc_text(&path, first).map_err(|source| {
        if is_gone_error(&source) {
            gone(pid, tid)
        } else {
            SysError::Proc { path, source }
        }
    })
}

/// Reads `/proc/PID/stat` without stopping anything.
///
/// # Errors
/// [`SysError::NoSuchProcess`] when it does not exist; [`SysError::Proc`]/[`SysError::Parse`].
pub fn process_state(pid: Pid) -> Result<ProcStat> {
    parse_stat(&read_task_file(pid, pid.leader(), "stat")?)
}

/// Reads `TracerPid` of the process's leader: `None` when not traced.
///
/// # Errors
/// As [`process_state`].
pub fn tracer_pid(pid: Pid) -> Result<Option<i32>> {
    let st = parse_status(&read_task_file(pid, pid.leader(), "status")?)?;
    Ok((st.tracer_pid != 0).then_some(st.tracer_pid))
}

/// Reads `/proc/PID/task/TID/{stat,status}` into a [`TaskInfo`].
///
/// # Errors
/// [`SysError::NoSuchProcess`]/[`SysError::ThreadGone`] when gone; parse/IO errors otherwise.
pub fn task_info(pid: Pid, tid: Tid) -> Result<TaskInfo> {
    let stat = parse_stat(&read_task_file(pid, tid, "stat")?)?;
    let status = parse_status(&read_task_file(pid, tid, "status")?)?;
    Ok(TaskInfo {
        state: stat.state,
        flags: stat.flags,
        vsize: stat.vsize,
        tracer_pid: status.tracer_pid,
        sig_ignored: status.sig_ignored,
        seccomp: status.seccomp,
    })
}

/// Reads `/proc/PID/task/TID/status` only (signal dispositions, seccomp mode): what a remote
/// syscall needs to know about its thread, without the `stat` read [`task_info`] adds (~12 us
/// under a load-time hold's stop).
///
/// # Errors
/// As [`task_info`].
pub fn task_status(pid: Pid, tid: Tid) -> Result<ProcStatus> {
    parse_status(&read_task_file(pid, tid, "status")?)
}

/// `start_brk` and `startstack` (fields 47 and 28 of `/proc/PID/stat`; 47 since Linux 3.5;
/// `brk` itself is not there): the kernel names `[heap]` every anonymous mapping with
/// `start <= brk` and `end >= start_brk`, and `[stack]` the one holding `startstack`. `None`
/// when a field is missing (an older kernel) or hidden (no ptrace access: 0).
///
/// # Errors
/// [`SysError::Parse`] when the text does not have the shape of a `stat` line.
pub fn parse_heap_and_stack(stat: &str) -> Result<Option<(u64, u64)>> {
    let close = stat
        .rfind(')')
        .ok_or_else(|| parse_err("/proc/PID/stat", "no ')'"))?;
    let rest: Vec<&str> = stat[close + 1..].split_ascii_whitespace().collect();
    // rest[0] is field 3.
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Ok(match (field(47), field(28)) {
        (Some(brk), Some(stack)) if brk != 0 && stack != 0 => Some((brk, stack)),
        _ => None,
    })
}

/// Reads the process's `start_brk` and `startstack` (see [`parse_heap_and_stack`]).
///
/// # Errors
/// As [`process_state`].
pub fn heap_and_stack(pid: Pid) -> Result<Option<(u64, u64)>> {
    parse_heap_and_stack(&read_task_file(pid, pid.leader(), "stat")?)
}

/// Lists `/proc/PID/task`.
///
/// # Errors
/// [`SysError::NoSuchProcess`] when the process is gone.
pub fn list_threads(pid: Pid) -> Result<Vec<Tid>> {
    let path = format!("/proc/{pid}/task");
    let map = |source: io::Error| {
        if is_gone_error(&source) {
            SysError::NoSuchProcess { pid }
        } else {
            SysError::Proc {
                path: path.clone(),
                source,
            }
        }
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&path).map_err(map)? {
        let entry = entry.map_err(map)?;
        if let Some(n) = entry.file_name().to_str() {
            names.push(n.to_owned());
        }
    }
    Ok(parse_task_dir(names.iter().map(String::as_str)))
}

/// How many threads the process has, from one `stat` of `/proc/PID/task`: the kernel reports
/// that directory's link count as 2 plus the thread group's thread count
/// (`proc_task_getattr`), which is exactly the number of entries a listing would show. About
/// 3 us where listing 64 threads takes 30-40 us.
///
/// # Errors
/// [`SysError::NoSuchProcess`] when the process is gone.
pub fn thread_count(pid: Pid) -> Result<usize> {
    use std::os::unix::fs::MetadataExt as _;
    let path = format!("/proc/{pid}/task");
    let md = std::fs::metadata(&path).map_err(|source| {
        if is_gone_error(&source) {
            SysError::NoSuchProcess { pid }
        } else {
            SysError::Proc { path, source }
        }
    })?;
    Ok(usize::try_from(md.nlink().saturating_sub(2)).unwrap_or(0))
}

/// Reads and parses `/proc/PID/maps`.
///
/// # Errors
/// [`SysError::NoSuchProcess`] when gone; parse/IO errors otherwise.
pub fn read_maps(pid: Pid) -> Result<Vec<Mapping>> {
    parse_maps(&read_task_file(pid, pid.leader(), "maps")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_text_read_whole_whatever_its_first_buffer() {
        let want = std::fs::read_to_string("/proc/self/maps").unwrap();
        for first in [0, 64, 100, 16 << 10] {
            let got = read_proc_text("/proc/self/maps", first).unwrap();
            // The maps of this very process may differ by a mapping the read itself made:
            // compare the line structure only, and a stable file exactly.
            assert_eq!(got.lines().next(), want.lines().next(), "{first}");
            assert!(got.ends_with('\n'), "{first}");
        }
        let cmdline = std::fs::read("/proc/self/cmdline").unwrap();
        let got = read_proc_text("/proc/self/cmdline", 7).unwrap();
        assert_eq!(got.as_bytes(), &cmdline[..]);
        assert!(read_proc_text("/proc/self/no-such-file", 64).is_err());
    }

    #[test]
    fn heap_and_stack_fields() {
        // Fields 1..52 of a line: startstack (28) 4000, start_brk (47), then arg_start (48).
        let line = "7 (a b) S 1 7 7 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 5 1000 100 \
            18446744073709551615 1 1 4000 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 1 2 1440866304 \
            1441001472 3 4 5 6 0";
        assert_eq!(
            parse_heap_and_stack(line).unwrap(),
            Some((1_440_866_304, 4000))
        );
        // Hidden (no access: zeros) or an older kernel (fewer fields).
        assert_eq!(parse_heap_and_stack(STAT_SELF).unwrap(), None);
        assert!(parse_heap_and_stack("no paren").is_err());
        // This process: its `[heap]` starts there (or nothing is mapped there yet), its
        // `[stack]` holds the other.
        let (brk, stack) =
            parse_heap_and_stack(&std::fs::read_to_string("/proc/self/stat").unwrap())
                .unwrap()
                .expect("own fields");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let range = |l: &str| {
            let (a, b) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            )
        };
        if let Some(heap) = maps.lines().find(|l| l.ends_with("[heap]")) {
            assert_eq!(range(heap).0, brk, "{heap}");
        }
        let s = range(maps.lines().find(|l| l.ends_with("[stack]")).unwrap());
        assert!(s.0 <= stack && stack <= s.1, "{s:x?} {stack:#x}");
    }

    const STAT_SELF: &str = "4242 (cat) R 100 4242 100 34816 4242 4194304 90 0 0 0 1 2 0 0 20 0 1 0 \
        1234 8421376 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_plain() {
        let s = parse_stat(STAT_SELF).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "cat");
        assert_eq!(s.state, TaskState::Running);
        assert_eq!(s.ppid, 100);
        assert_eq!(s.flags, 4_194_304);
        assert_eq!(s.utime, 1);
        assert_eq!(s.stime, 2);
        assert_eq!(s.num_threads, 1);
        assert_eq!(s.vsize, 8_421_376);
    }

    #[test]
    fn stat_comm_with_spaces_and_parens() {
        let text = STAT_SELF.replace("(cat)", "(a) Z 1 (b c)");
        let s = parse_stat(&text).unwrap();
        assert_eq!(s.comm, "a) Z 1 (b c");
        assert_eq!(s.state, TaskState::Running);
        assert_eq!(s.ppid, 100);
    }

    #[test]
    fn stat_comm_with_newline() {
        let text = STAT_SELF.replace("(cat)", "(x\ny)");
        assert_eq!(parse_stat(&text).unwrap().comm, "x\ny");
    }

    #[test]
    fn stat_kthreadd() {
        let text = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 24 0 0 \
            18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let s = parse_stat(text).unwrap();
        assert_ne!(s.flags & crate::types::PF_KTHREAD, 0);
        assert_eq!(s.vsize, 0);
    }

    #[test]
    fn stat_zombie_and_truncated() {
        let z = STAT_SELF.replace(") R ", ") Z ");
        assert_eq!(parse_stat(&z).unwrap().state, TaskState::Zombie);
        assert!(parse_stat("12 (x) R 1 2").is_err());
        assert!(parse_stat("12 x R").is_err());
        assert!(parse_stat(") 12 (").is_err());
        assert!(parse_stat("").is_err());
        let two_letter = STAT_SELF.replace(") R ", ") RR ");
        assert!(parse_stat(&two_letter).is_err());
    }

    #[test]
    fn status_fields() {
        let text = "Name:\tcat\nState:\tR (running)\nTracerPid:\t77\nSigBlk:\t0000000000010000\n\
            SigIgn:\t0000000000000004\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        let s = parse_status(text).unwrap();
        assert_eq!(s.tracer_pid, 77);
        assert_eq!(s.sig_blocked, 0x10000);
        assert_eq!(s.sig_ignored, 4);
        assert_eq!(s.seccomp, 2);
        assert!(parse_status("Name:\tx\n").is_err());
        assert!(parse_status("TracerPid:\tx\n").is_err());
    }

    #[test]
    fn maps_lines() {
        let text = "55d4c3a00000-55d4c3a02000 r-xp 00001000 08:01 1234                       /usr/bin/my prog (deleted)\n\
            7ffd1e9f0000-7ffd1e9f2000 r-xp 00000000 00:00 0                          [vdso]\n\
            7f0000000000-7f0000001000 rw-s 00000000 00:05 99\n";
        let m = parse_maps(text).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start, 0x55d4_c3a0_0000);
        assert_eq!(m[0].end, 0x55d4_c3a0_2000);
        assert_eq!(m[0].perms, Perms::RX);
        assert_eq!(m[0].offset, 0x1000);
        assert_eq!(m[0].dev, (8, 1));
        assert_eq!(m[0].inode, 1234);
        assert_eq!(m[0].name, "/usr/bin/my prog (deleted)");
        assert_eq!(m[1].name, "[vdso]");
        assert!(m[2].perms.shared && m[2].perms.write);
        assert_eq!(m[2].name, "");
        assert!(parse_maps_line("zz-10 r-xp 0 0:0 0").is_err());
        assert!(parse_maps_line("20-10 r-xp 0 0:0 0").is_err());
        assert!(parse_maps_line("10-20 r-x 0 0:0 0").is_err());
        assert!(parse_maps_line("10-20 r-xp 0").is_err());
    }

    #[test]
    fn task_dir_names() {
        assert_eq!(
            parse_task_dir(["12", "3", "x", "-1", "12", "0"]),
            vec![Tid(3), Tid(12)]
        );
    }
}

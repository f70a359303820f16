//! fanotify permission events and inotify directory watches, for the load-time hook.
//!
//! - [`PermissionGroup`]: a fanotify group of class `FAN_CLASS_PRE_CONTENT` with `FAN_REPORT_TID`
//!   (events name the opening *thread*, which is the one to seize; the class is the one
//!   `FAN_PRE_ACCESS` needs, Linux 6.14+, and is accepted by every kernel with fanotify for the
//!   open events). Inode marks only, added and
//!   removed through an open file descriptor of the very inode that was hashed, so a file
//!   replaced between hashing and marking cannot get a mark it does not deserve.
//! - [`PermEvent`]: one event; it owns the event's file descriptor (opened by the kernel with
//!   `FMODE_NONOTIFY`, so reading through it raises no event). Answer it with
//!   [`PermissionGroup::respond`] *before* dropping it: the answer names the descriptor number.
//! - [`DirWatch`]: inotify on directories (created, moved-in, written-and-closed files).
//!
//! Fail-open facts this relies on (kernel behaviour, not ours): when the group's file descriptor
//! is closed — including because the process was killed — every pending permission event is
//! answered `FAN_ALLOW` by the kernel.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Result, SysError};
use crate::types::Tid;

fn os_err(op: &'static str) -> SysError {
    SysError::Os {
        op,
        source: io::Error::last_os_error(),
    }
}

/// `FAN_OPEN_PERM`: every open of the marked inode.
pub const FAN_OPEN_PERM: u64 = libc::FAN_OPEN_PERM;
/// `FAN_OPEN_EXEC_PERM`: the open of the marked inode for exec (Linux 5.0+).
pub const FAN_OPEN_EXEC_PERM: u64 = libc::FAN_OPEN_EXEC_PERM;
/// The fanotify events the hook holds: every open, and the open of an executable for exec.
pub const FAN_HOLD_MASK: u64 = FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM;
/// `FAN_PRE_ACCESS` (Linux 6.14+, not in libc yet): before a `read`, `write` or `mmap` of a
/// range of the marked inode — the `mmap` included, page faults not — with the range in an
/// info record. Only for filesystems that allow it (ext4, xfs, btrfs...): elsewhere the mark
/// is refused (`EINVAL`/`EOPNOTSUPP`) and the caller marks without it.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_EVENT_INFO_TYPE_RANGE`: the info record of a `FAN_PRE_ACCESS` event.
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;

/// Waits until `fd` is readable or `timeout` passes. `Ok(false)` on timeout.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `pfd` is one live, initialised pollfd and we pass nfds = 1.
        let r = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(SysError::Os {
                op: "poll",
                source: e,
            });
        }
    }
}

/// Waits until `fd` is readable, `waker` was woken, or `timeout` passes (`None`: no timeout).
/// Returns `(readable, woken)`; both false on timeout.
fn wait_readable_or_woken(
    fd: BorrowedFd<'_>,
    waker: &Waker,
    timeout: Option<Duration>,
) -> Result<(bool, bool)> {
    let mut pfds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: waker.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.map_or(-1, |t| {
        // Round up: a deadline 0.4 ms away must not turn into a busy loop of 0 ms polls.
        let ms = t.as_micros().div_ceil(1000);
        i32::try_from(ms).unwrap_or(i32::MAX)
    });
    loop {
        // SAFETY: `pfds` is an array of two live, initialised pollfds and we pass nfds = 2.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        if r >= 0 {
            return Ok((pfds[0].revents != 0, pfds[1].revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(SysError::Os {
                op: "poll",
                source: e,
            });
        }
    }
}

/// A wake-up for threads blocked in [`PermissionGroup::read_events_until`] or
/// [`DirWatch::read_events_until`] (an `eventfd`). Level-triggered and one-way: once woken it
/// stays woken (the counter is never read back), so every waiter sees it, now and later —
/// which is what a stop request needs. Waiting costs no periodic wakeup.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new, not yet woken, waker.
    ///
    /// # Errors
    /// [`SysError::Os`] (descriptor limits).
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd takes an initial value and a flag word and touches no memory of ours.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(os_err("eventfd"));
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Wakes every waiter, now and in the future.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: we write exactly the 8 bytes of `one`, a live local u64. A full counter
        // (EAGAIN, after 2^64-2 wakes) still leaves it readable, i.e. woken.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Whether [`Waker::wake`] was called.
    #[must_use]
    pub fn is_woken(&self) -> bool {
        wait_readable(self.fd.as_fd(), Duration::ZERO).unwrap_or(false)
    }
}

/// Reads into `buf`; `Ok(0)` when nothing is ready (the descriptors are non-blocking).
fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8], op: &'static str) -> Result<usize> {
    loop {
        // SAFETY: `buf` is a live, exclusively borrowed buffer of exactly `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n.cast_unsigned());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => return Ok(0),
            _ => return Err(SysError::Os { op, source: e }),
        }
    }
}

/// One fanotify permission event.
#[derive(Debug)]
pub struct PermEvent {
    /// `FAN_OPEN_PERM` and/or `FAN_OPEN_EXEC_PERM` (plus any other bits the kernel set).
    pub mask: u64,
    /// The opening thread (`FAN_REPORT_TID`).
    pub tid: Tid,
    /// The file being opened, as the kernel opened it for us (no event for reads through it).
    pub file: OwnedFd,
    /// `FAN_PRE_ACCESS`: the file range about to be read or mapped, `(offset, count)` in
    /// bytes as the kernel reports it (a read's range is page-rounded).
    pub range: Option<(u64, u64)>,
}

impl PermEvent {
    /// Whether this is the exec variant (`FAN_OPEN_EXEC_PERM`).
    #[must_use]
    pub fn is_exec(&self) -> bool {
        self.mask & libc::FAN_OPEN_EXEC_PERM != 0
    }

    /// Whether this is a `FAN_PRE_ACCESS` event (a read or mapping of a range, not an open).
    #[must_use]
    pub fn is_pre_access(&self) -> bool {
        self.mask & FAN_PRE_ACCESS != 0
    }
}

/// A fanotify group for permission events (`FAN_CLASS_PRE_CONTENT | FAN_REPORT_TID`),
/// non-blocking.
#[derive(Debug)]
pub struct PermissionGroup {
    fd: OwnedFd,
}

impl PermissionGroup {
    /// Creates the group. Needs `CAP_SYS_ADMIN`.
    ///
    /// # Errors
    /// [`SysError::Os`] (`EPERM` without privilege, `EINVAL` on kernels without
    /// `FAN_REPORT_TID`, i.e. before 4.20).
    pub fn new() -> Result<Self> {
        let flags = libc::FAN_CLASS_PRE_CONTENT
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_TID;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint;
        // SAFETY: fanotify_init takes two integer flag words and touches no memory of ours.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(os_err("fanotify_init"));
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn mark(
        &self,
        flags: libc::c_uint,
        mask: u64,
        file: BorrowedFd<'_>,
        op: &'static str,
    ) -> Result<()> {
        // SAFETY: a NULL pathname makes the kernel mark the object `file` refers to; no memory
        // of ours is read. `file` is a live descriptor borrowed for the call.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(os_err(op));
        }
        Ok(())
    }

    /// Puts an inode mark for `mask` on the inode `file` refers to (an ordinary open
    /// descriptor: `O_PATH` descriptors are refused by the kernel).
    ///
    /// # Errors
    /// [`SysError::Os`].
    pub fn mark_inode(&self, file: BorrowedFd<'_>, mask: u64) -> Result<()> {
        self.mark(
            libc::FAN_MARK_ADD | libc::FAN_MARK_INODE,
            mask,
            file,
            "fanotify_mark add",
        )
    }

    /// Removes the inode mark for `mask` from the inode `file` refers to. No mark: `ENOENT`.
    ///
    /// # Errors
    /// [`SysError::Os`].
    pub fn unmark_inode(&self, file: BorrowedFd<'_>, mask: u64) -> Result<()> {
        self.mark(
            libc::FAN_MARK_REMOVE | libc::FAN_MARK_INODE,
            mask,
            file,
            "fanotify_mark remove",
        )
    }

    /// Waits up to `timeout` for events and returns those ready (possibly none).
    ///
    /// # Errors
    /// [`SysError::Os`]; [`SysError::Parse`] for a malformed event (never seen in practice).
    pub fn read_events(&self, timeout: Duration) -> Result<Vec<PermEvent>> {
        if !wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let mut buf = [0u8; 4096];
        let n = read_some(self.fd.as_fd(), &mut buf, "read fanotify")?;
        parse_events(&buf[..n])
    }

    /// Waits until events are ready, `waker` is woken, or `timeout` passes (`None`: no
    /// timeout — an idle group costs no wakeup at all). Returns the events ready (possibly
    /// none) and whether `waker` is woken; when both are, the events are returned too (they
    /// must still be answered).
    ///
    /// # Errors
    /// [`SysError::Os`]; [`SysError::Parse`] for a malformed event (never seen in practice).
    pub fn read_events_until(
        &self,
        waker: &Waker,
        timeout: Option<Duration>,
    ) -> Result<(Vec<PermEvent>, bool)> {
        let (readable, woken) = wait_readable_or_woken(self.fd.as_fd(), waker, timeout)?;
        if !readable {
            return Ok((Vec::new(), woken));
        }
        let mut buf = [0u8; 4096];
        let n = read_some(self.fd.as_fd(), &mut buf, "read fanotify")?;
        Ok((parse_events(&buf[..n])?, woken))
    }

    /// Answers a permission event: `allow` lets the open proceed, otherwise it fails with EPERM.
    /// Answering an event twice (or one the kernel already answered) returns `ENOENT`.
    ///
    /// # Errors
    /// [`SysError::Os`].
    pub fn respond(&self, event: &PermEvent, allow: bool) -> Result<()> {
        let resp = libc::fanotify_response {
            fd: event.file.as_raw_fd(),
            response: if allow {
                libc::FAN_ALLOW
            } else {
                libc::FAN_DENY
            },
        };
        let len = std::mem::size_of::<libc::fanotify_response>();
        // SAFETY: we write exactly one fanotify_response from `resp`, a live local of that type.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const resp).cast(), len) };
        if n < 0 {
            return Err(os_err("write fanotify response"));
        }
        Ok(())
    }
}

impl AsFd for PermissionGroup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn parse_events(mut buf: &[u8]) -> Result<Vec<PermEvent>> {
    const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
    let bad = |d: &str| SysError::Parse {
        what: "fanotify event",
        detail: d.to_string(),
    };
    let mut out = Vec::new();
    // Take ownership of every descriptor first, so none leaks if a later event is malformed.
    let mut err = None;
    while buf.len() >= META {
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let event_len = u32_at(0) as usize;
        let vers = buf[4];
        let mut m8 = [0u8; 8];
        m8.copy_from_slice(&buf[8..16]);
        let mask = u64::from_ne_bytes(m8);
        let fd = u32_at(16).cast_signed();
        let pid = u32_at(20).cast_signed();
        if event_len < META || event_len > buf.len() {
            err.get_or_insert_with(|| bad("length out of range"));
            break;
        }
        if fd >= 0 {
            // SAFETY: the kernel installed `fd` in our table for this event and hands its
            // ownership to the reader; nothing else refers to it.
            let file = unsafe { OwnedFd::from_raw_fd(fd) };
            if vers == libc::FANOTIFY_METADATA_VERSION {
                let meta_len = usize::from(u16::from_ne_bytes([buf[6], buf[7]])).max(META);
                out.push(PermEvent {
                    mask,
                    tid: Tid(pid),
                    file,
                    range: range_info(&buf[meta_len.min(event_len)..event_len]),
                });
            } else {
                err.get_or_insert_with(|| bad("metadata version"));
            }
        } else {
            // FAN_Q_OVERFLOW carries no descriptor and needs no answer.
            tracing::warn!(mask, "fanotify event without descriptor (queue overflow?)");
        }
        buf = &buf[event_len..];
    }
    match err {
        Some(e) if out.is_empty() => Err(e),
        _ => Ok(out),
    }
}

/// The `FAN_EVENT_INFO_TYPE_RANGE` record among an event's info records, if any: `(offset,
/// count)`. Records are `{u8 type, u8 pad, u16 len}` headers; a malformed length ends the walk.
fn range_info(mut info: &[u8]) -> Option<(u64, u64)> {
    while info.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([info[2], info[3]]));
        if len < 4 || len > info.len() {
            return None;
        }
        if info[0] == FAN_EVENT_INFO_TYPE_RANGE && len >= 24 {
            let u64_at = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&info[o..o + 8]);
                u64::from_ne_bytes(b)
            };
            return Some((u64_at(8), u64_at(16)));
        }
        info = &info[len..];
    }
    None
}

/// `st_dev`/`st_ino` of the file behind a descriptor (no open, no event).
///
/// # Errors
/// [`SysError::Os`].
pub fn fd_inode(fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    fd_stat(fd).map(|s| (s.dev, s.ino))
}

/// What `fstat` says about the file behind a descriptor: enough to tell whether its contents
/// may have changed (the key the engine caches digests by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

/// `fstat` of a descriptor (no open, no event).
///
/// # Errors
/// [`SysError::Os`].
pub fn fd_stat(fd: BorrowedFd<'_>) -> Result<FileStat> {
    // SAFETY: `stat` is plain integers; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `stat` into `st`, a live local of that type.
    if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } < 0 {
        return Err(os_err("fstat"));
    }
    Ok(FileStat {
        dev: st.st_dev,
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        ctime: st.st_ctime,
        ctime_nsec: st.st_ctime_nsec,
    })
}

/// One inotify event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEvent {
    /// Watch descriptor (which directory).
    pub wd: i32,
    /// `IN_*` bits.
    pub mask: u32,
    /// File name inside the directory (empty for events on the directory itself).
    pub name: OsString,
}

/// inotify watching directories for files that appear or change: `IN_CREATE | IN_MOVED_TO |
/// IN_CLOSE_WRITE` (plus `IN_DELETE_SELF | IN_MOVE_SELF` on the directory).
#[derive(Debug)]
pub struct DirWatch {
    fd: OwnedFd,
}

/// The events [`DirWatch::watch`] asks for.
pub const DIR_WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

impl DirWatch {
    /// A non-blocking inotify instance.
    ///
    /// # Errors
    /// [`SysError::Os`].
    pub fn new() -> Result<Self> {
        // SAFETY: inotify_init1 takes one integer flag word.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(os_err("inotify_init1"));
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Watches directory `dir`; returns its watch descriptor (the same one if already watched).
    ///
    /// # Errors
    /// [`SysError::Os`], [`SysError::InvalidArgument`] for a path with a NUL byte.
    pub fn watch(&self, dir: &Path) -> Result<i32> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| SysError::InvalidArgument(format!("{}: NUL in path", dir.display())))?;
        // SAFETY: `c` is a live NUL-terminated string for the duration of the call.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), DIR_WATCH_MASK) };
        if wd < 0 {
            return Err(os_err("inotify_add_watch"));
        }
        Ok(wd)
    }

    /// Waits up to `timeout` and returns the events ready (possibly none).
    ///
    /// # Errors
    /// [`SysError::Os`].
    pub fn read_events(&self, timeout: Duration) -> Result<Vec<DirEvent>> {
        if !wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let mut buf = [0u8; 8192];
        let n = read_some(self.fd.as_fd(), &mut buf, "read inotify")?;
        Ok(parse_dir_events(&buf[..n]))
    }
}

impl DirWatch {
    /// Waits until events are ready, `waker` is woken, or `timeout` passes (`None`: no
    /// timeout). Returns the events ready (possibly none) and whether `waker` is woken.
    ///
    /// # Errors
    /// [`SysError::Os`].
    pub fn read_events_until(
        &self,
        waker: &Waker,
        timeout: Option<Duration>,
    ) -> Result<(Vec<DirEvent>, bool)> {
        let (readable, woken) = wait_readable_or_woken(self.fd.as_fd(), waker, timeout)?;
        if !readable {
            return Ok((Vec::new(), woken));
        }
        let mut buf = [0u8; 8192];
        let n = read_some(self.fd.as_fd(), &mut buf, "read inotify")?;
        Ok((parse_dir_events(&buf[..n]), woken))
    }
}

fn parse_dir_events(mut buf: &[u8]) -> Vec<DirEvent> {
    const HDR: usize = 16;
    let mut out = Vec::new();
    while buf.len() >= HDR {
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let wd = u32_at(0).cast_signed();
        let mask = u32_at(4);
        let len = u32_at(12) as usize;
        if HDR + len > buf.len() {
            break;
        }
        let raw = &buf[HDR..HDR + len];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        out.push(DirEvent {
            wd,
            mask,
            name: OsStr::from_bytes(&raw[..end]).to_os_string(),
        });
        buf = &buf[HDR + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_events_parse_with_padding() {
        let mut b = Vec::new();
        for (wd, mask, name) in [
            (1i32, libc::IN_CREATE, "libx.so"),
            (2, libc::IN_MOVED_TO, ""),
        ] {
            let mut n = name.as_bytes().to_vec();
            if !n.is_empty() {
                n.resize(16, 0);
            }
            b.extend(wd.to_ne_bytes());
            b.extend(mask.to_ne_bytes());
            b.extend(0u32.to_ne_bytes());
            b.extend((n.len() as u32).to_ne_bytes());
            b.extend(n);
        }
        let ev = parse_dir_events(&b);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].name, "libx.so");
        assert_eq!(ev[1].wd, 2);
        assert!(ev[1].name.is_empty());
    }

    #[test]
    fn woken_waker_wakes_every_waiter_at_once_and_stays_woken() {
        let w = Waker::new().unwrap();
        let d = DirWatch::new().unwrap();
        let t0 = std::time::Instant::now();
        let (ev, woken) = d
            .read_events_until(&w, Some(Duration::from_millis(30)))
            .unwrap();
        assert!(ev.is_empty() && !woken, "not woken yet: a timeout");
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(!w.is_woken());
        w.wake();
        for _ in 0..2 {
            let t0 = std::time::Instant::now();
            let (_, woken) = d.read_events_until(&w, None).unwrap();
            assert!(woken);
            assert!(t0.elapsed() < Duration::from_millis(100));
        }
        assert!(w.is_woken());
    }

    #[test]
    fn pre_access_range_record_is_found_among_info_records_and_bad_lengths_end_the_walk() {
        let mut info = Vec::new();
        // An unrelated record first (type 2, 8 bytes), then the range record.
        info.extend([2u8, 0, 8, 0, 0, 0, 0, 0]);
        info.extend([FAN_EVENT_INFO_TYPE_RANGE, 0, 24, 0, 0, 0, 0, 0]);
        info.extend(0x1000u64.to_ne_bytes());
        info.extend(0x2000u64.to_ne_bytes());
        assert_eq!(range_info(&info), Some((0x1000, 0x2000)));
        assert_eq!(range_info(&info[..20]), None, "truncated record");
        assert_eq!(range_info(&[6, 0, 0, 0]), None, "zero length must not loop");
        assert_eq!(range_info(&[]), None);
    }

    #[test]
    fn truncated_fanotify_buffer_is_refused_not_misread() {
        let mut b = vec![0u8; 24];
        b[0..4].copy_from_slice(&100u32.to_ne_bytes());
        b[4] = libc::FANOTIFY_METADATA_VERSION;
        b[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(parse_events(&b).is_err());
    }
}

//! Process events from the kernel's netlink proc connector: exec (a new program to look at),
//! fork (a child inherits its parent's patched memory) and exit with the killing signal
//! (crash protection). Needs CAP_NET_ADMIN.
//!
//! The socket comes from `netlink-sys` (a safe API); this module has no `unsafe` and parses
//! the messages with plain byte arithmetic ([`parse`] is pure and unit-tested).

/// What the proc connector reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// `pid` (a thread-group leader) replaced its program.
    Exec { pid: i32 },
    /// A new process (not a thread) was forked.
    Fork { parent: i32, child: i32 },
    /// A process (its leader thread) exited. `signal` is the signal that killed it, if one did.
    Exit {
        pid: i32,
        code: i32,
        signal: Option<i32>,
    },
}

const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_DONE: u16 = 3;

const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn i32_at(b: &[u8], o: usize) -> Option<i32> {
    u32_at(b, o).map(|v| v as i32)
}

/// Parses one datagram (possibly several netlink messages) into events.
pub fn parse(buf: &[u8]) -> Vec<ProcEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let Some(len) = u32_at(buf, off).map(|l| l as usize) else {
            break;
        };
        if len < NLMSG_HDR || off + len > buf.len() {
            break;
        }
        let msg = &buf[off..off + len];
        if u16_at(msg, 4) == Some(NLMSG_DONE)
            && let Some(ev) = parse_cn(&msg[NLMSG_HDR..])
        {
            out.push(ev);
        }
        off += (len + 3) & !3;
    }
    out
}

fn parse_cn(cn: &[u8]) -> Option<ProcEvent> {
    if u32_at(cn, 0)? != CN_IDX_PROC || u32_at(cn, 4)? != CN_VAL_PROC {
        return None;
    }
    let data_len = u16_at(cn, 16)? as usize;
    let ev = cn.get(CN_MSG_HDR..CN_MSG_HDR + data_len)?;
    // struct proc_event: what u32, cpu u32, timestamp_ns u64, then the union at 16.
    let what = u32_at(ev, 0)?;
    let d = 16;
    match what {
        PROC_EVENT_EXEC => {
            let pid = i32_at(ev, d)?;
            let tgid = i32_at(ev, d + 4)?;
            (pid == tgid).then_some(ProcEvent::Exec { pid: tgid })
        }
        PROC_EVENT_FORK => {
            let parent = i32_at(ev, d + 4)?;
            let child_pid = i32_at(ev, d + 8)?;
            let child_tgid = i32_at(ev, d + 12)?;
            (child_pid == child_tgid).then_some(ProcEvent::Fork {
                parent,
                child: child_tgid,
            })
        }
        PROC_EVENT_EXIT => {
            let pid = i32_at(ev, d)?;
            let tgid = i32_at(ev, d + 4)?;
            let code = i32_at(ev, d + 8)?;
            if pid != tgid {
                return None;
            }
            // exit_code is a wait status: the low 7 bits are the terminating signal.
            let sig = code & 0x7f;
            Some(ProcEvent::Exit {
                pid,
                code,
                signal: (sig != 0 && sig != 0x7f).then_some(sig),
            })
        }
        _ => None,
    }
}

/// Kernel-side event filter (Linux >= 6.6, `struct proc_input`): exec and fork, and only exits
/// with a non-zero status (crashes among them), so ordinary exits never wake the agent.
pub const EVENTS_WANTED: u32 = PROC_EVENT_EXEC | PROC_EVENT_FORK | PROC_EVENT_NONZERO_EXIT;
const PROC_EVENT_NONZERO_EXIT: u32 = 0x2000_0000;
const PROC_CN_MCAST_IGNORE: u32 = 2;

/// The subscribe message (`PROC_CN_MCAST_LISTEN`, or `IGNORE`), with the kernel-side filter
/// when `event_type` is given.
pub fn control_message(listen: bool, event_type: Option<u32>) -> Vec<u8> {
    let data_len = if event_type.is_some() { 8 } else { 4 };
    let total = NLMSG_HDR + CN_MSG_HDR + data_len;
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&(total as u32).to_ne_bytes());
    b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&std::process::id().to_ne_bytes());
    b.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    b.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&(data_len as u16).to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    let op = if listen {
        PROC_CN_MCAST_LISTEN
    } else {
        PROC_CN_MCAST_IGNORE
    };
    b.extend_from_slice(&op.to_ne_bytes());
    if let Some(t) = event_type {
        b.extend_from_slice(&t.to_ne_bytes());
    }
    b
}

/// The plain subscribe message (every event).
pub fn listen_message() -> Vec<u8> {
    control_message(true, None)
}

/// Whether the running kernel filters proc connector events per listener (6.6+).
fn kernel_filters() -> bool {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = r
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (maj, min) >= (6, 6)
}

/// A subscribed proc-connector socket.
pub struct ProcConnector {
    sock: std::sync::Arc<netlink_sys::Socket>,
}

impl ProcConnector {
    /// Opens and subscribes (fails without CAP_NET_ADMIN). The subscription is then managed
    /// through `filter` ([`ProcFilter::update`]).
    pub fn open(filter: &ProcFilter) -> std::io::Result<ProcConnector> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_CONNECTOR)?;
        sock.bind(&netlink_sys::SocketAddr::new(0, CN_IDX_PROC))?;
        // A burst of exits must not be dropped: ask for a large receive buffer.
        let _ = sock.set_rx_buf_sz(4 << 20);
        let sock = std::sync::Arc::new(sock);
        let filters = kernel_filters();
        sock.send_to(
            &control_message(true, filters.then_some(EVENTS_WANTED)),
            &netlink_sys::SocketAddr::new(0, 0),
            0,
        )?;
        if let Ok(mut c) = filter.control.lock() {
            *c = Some((sock.clone(), filters, true));
        }
        Ok(ProcConnector { sock })
    }

    /// Blocks for the next datagram.
    pub fn recv(&self, buf: &mut Vec<u8>) -> std::io::Result<Vec<ProcEvent>> {
        buf.clear();
        buf.reserve(8192);
        self.sock.recv(buf, 0)?;
        Ok(parse(buf))
    }

    /// Reads events until `deliver` returns false. Everything already queued in the socket is
    /// read at once and only the events `filter` wants are delivered, as one batch: on a busy
    /// build host (thousands of exec/exit events a second) the controller wakes only for what
    /// concerns it. ENOBUFS (the kernel dropped events because we were slow) is reported as
    /// `overflow` so the caller can rescan.
    pub fn run(
        self,
        filter: &ProcFilter,
        deliver: impl Fn(Vec<ProcEvent>) -> bool,
        overflow: impl Fn(),
    ) {
        const MSG_DONTWAIT: i32 = 0x40;
        let mut buf = Vec::with_capacity(8192);
        loop {
            let mut batch = Vec::new();
            let mut flags = 0;
            loop {
                buf.clear();
                buf.reserve(8192);
                match self.sock.recv(&mut buf, flags) {
                    Ok(_) => batch.extend(parse(&buf).into_iter().filter(|e| filter.wants(e))),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.raw_os_error() == Some(105) => overflow(),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "proc connector failed; falling back to periodic scans");
                        return;
                    }
                }
                flags = MSG_DONTWAIT;
                if batch.len() >= 4096 {
                    break;
                }
            }
            if !batch.is_empty() {
                if !deliver(batch) {
                    return;
                }
                // Let the next events gather in the socket (4 MiB) for a moment: a busy host
                // execs hundreds of times a second, and waking the controller for each costs
                // more than the checks (two context switches per event). Only after events:
                // with nothing happening this thread sleeps in recv.
                std::thread::sleep(COALESCE);
            }
        }
    }
}

/// How long the reader lets events gather after delivering some (see [`ProcConnector::run`]).
pub const COALESCE: std::time::Duration = std::time::Duration::from_millis(50);

/// Which events the controller wants, kept up to date by the controller.
#[derive(Default)]
pub struct ProcFilter {
    /// Processes carrying patches (their exit, fork and exec matter).
    carriers: std::sync::RwLock<std::collections::HashSet<i32>>,
    /// Some patch is enabled: every exec is a process to look at.
    want_exec: std::sync::atomic::AtomicBool,
    /// The socket, whether the kernel filters per listener, and whether we listen now.
    #[allow(clippy::type_complexity, reason = "private plumbing")]
    control: std::sync::Mutex<Option<(std::sync::Arc<netlink_sys::Socket>, bool, bool)>>,
}

impl ProcFilter {
    /// Replaces the carrier set and the exec interest.
    pub fn update(&self, carriers: impl Iterator<Item = i32>, want_exec: bool) {
        if let Ok(mut c) = self.carriers.write() {
            c.clear();
            c.extend(carriers);
        }
        let carriers = self.carriers.read().map(|c| !c.is_empty()).unwrap_or(true);
        self.want_exec
            .store(want_exec, std::sync::atomic::Ordering::Relaxed);
        // Nothing to watch: ask the kernel to stop sending (an idle agent then costs nothing
        // however busy the host); subscribe again as soon as something matters.
        let listen = want_exec || carriers;
        if let Ok(mut c) = self.control.lock()
            && let Some((sock, filters, listening)) = c.as_mut()
            && *listening != listen
        {
            let msg = control_message(listen, filters.then_some(EVENTS_WANTED));
            match sock.send_to(&msg, &netlink_sys::SocketAddr::new(0, 0), 0) {
                Ok(_) => *listening = listen,
                Err(e) => tracing::warn!(error = %e, "proc connector subscription change failed"),
            }
        }
    }

    /// Watches one more process (before it is patched, so its exit is never filtered out).
    pub fn add(&self, pid: i32) {
        if let Ok(mut c) = self.carriers.write() {
            c.insert(pid);
        }
    }

    /// Whether `e` concerns the controller.
    pub fn wants(&self, e: &ProcEvent) -> bool {
        let carrier = |p: i32| self.carriers.read().map(|c| c.contains(&p)).unwrap_or(true);
        match *e {
            ProcEvent::Exec { pid } => {
                self.want_exec.load(std::sync::atomic::Ordering::Relaxed) || carrier(pid)
            }
            ProcEvent::Fork { parent, .. } => carrier(parent),
            ProcEvent::Exit { pid, .. } => carrier(pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(what: u32, data: &[i32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&0u32.to_ne_bytes());
        ev.extend_from_slice(&0u64.to_ne_bytes());
        for d in data {
            ev.extend_from_slice(&d.to_ne_bytes());
        }
        let mut cn = Vec::new();
        cn.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        cn.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        cn.extend_from_slice(&[0; 8]);
        cn.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
        cn.extend_from_slice(&0u16.to_ne_bytes());
        cn.extend_from_slice(&ev);
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + cn.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&cn);
        m
    }

    #[test]
    fn exec_fork_exit_are_parsed_and_threads_ignored() {
        assert_eq!(
            parse(&msg(PROC_EVENT_EXEC, &[10, 10])),
            vec![ProcEvent::Exec { pid: 10 }]
        );
        assert!(parse(&msg(PROC_EVENT_EXEC, &[11, 10])).is_empty());
        assert_eq!(
            parse(&msg(PROC_EVENT_FORK, &[1, 1, 20, 20])),
            vec![ProcEvent::Fork {
                parent: 1,
                child: 20
            }]
        );
        assert!(parse(&msg(PROC_EVENT_FORK, &[1, 1, 21, 20])).is_empty());
        assert_eq!(
            parse(&msg(PROC_EVENT_EXIT, &[30, 30, 11 | 0x80, 11, 1, 1])),
            vec![ProcEvent::Exit {
                pid: 30,
                code: 0x8b,
                signal: Some(11)
            }]
        );
        assert_eq!(
            parse(&msg(PROC_EVENT_EXIT, &[30, 30, 1 << 8, 17, 1, 1])),
            vec![ProcEvent::Exit {
                pid: 30,
                code: 256,
                signal: None
            }]
        );
        let mut two = msg(PROC_EVENT_EXEC, &[1, 1]);
        two.extend(msg(PROC_EVENT_EXEC, &[2, 2]));
        assert_eq!(parse(&two).len(), 2);
        assert!(parse(&two[..7]).is_empty());
        assert_eq!(listen_message().len(), 40);
        assert_eq!(control_message(true, Some(EVENTS_WANTED)).len(), 44);
    }

    #[test]
    fn filter_passes_only_what_concerns_carriers_and_execs_when_wanted() {
        let f = ProcFilter::default();
        f.update([7].into_iter(), false);
        assert!(f.wants(&ProcEvent::Exit {
            pid: 7,
            code: 11,
            signal: Some(11)
        }));
        assert!(!f.wants(&ProcEvent::Exit {
            pid: 8,
            code: 0,
            signal: None
        }));
        assert!(f.wants(&ProcEvent::Fork {
            parent: 7,
            child: 9
        }));
        assert!(!f.wants(&ProcEvent::Fork {
            parent: 8,
            child: 9
        }));
        assert!(f.wants(&ProcEvent::Exec { pid: 7 }));
        assert!(!f.wants(&ProcEvent::Exec { pid: 8 }));
        f.update(std::iter::empty(), true);
        assert!(f.wants(&ProcEvent::Exec { pid: 8 }));
    }
}

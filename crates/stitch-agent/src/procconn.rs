//! Process events from the kernel's netlink proc connector: exec (a new program to look at),
//! fork (a child inherits its parent's patched memory) and exit with the killing signal
//! (crash protection). Needs CAP_NET_ADMIN.
//!
//! The socket comes from `netlink-sys` (a safe API); this module has no `unsafe` and parses
//! the messages with plain byte arithmetic ([`parse`] is pure and unit-tested).

use std::sync::mpsc::Sender;

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

/// The subscribe message (`PROC_CN_MCAST_LISTEN`).
pub fn listen_message() -> Vec<u8> {
    let total = NLMSG_HDR + CN_MSG_HDR + 4;
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
    b.extend_from_slice(&4u16.to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    b
}

/// A subscribed proc-connector socket.
pub struct ProcConnector {
    sock: netlink_sys::Socket,
}

impl ProcConnector {
    /// Opens and subscribes (fails without CAP_NET_ADMIN).
    pub fn open() -> std::io::Result<ProcConnector> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_CONNECTOR)?;
        sock.bind(&netlink_sys::SocketAddr::new(0, CN_IDX_PROC))?;
        // A burst of exits must not be dropped: ask for a large receive buffer.
        let _ = sock.set_rx_buf_sz(4 << 20);
        sock.send_to(&listen_message(), &netlink_sys::SocketAddr::new(0, 0), 0)?;
        Ok(ProcConnector { sock })
    }

    /// Blocks for the next datagram.
    pub fn recv(&self, buf: &mut Vec<u8>) -> std::io::Result<Vec<ProcEvent>> {
        buf.clear();
        buf.reserve(8192);
        self.sock.recv(buf, 0)?;
        Ok(parse(buf))
    }

    /// Forwards events to `tx` until the receiver is gone. ENOBUFS (the kernel dropped events
    /// because we were slow) is reported as `overflow` so the caller can rescan.
    pub fn run(self, tx: Sender<ProcEvent>, overflow: impl Fn()) {
        let mut buf = Vec::with_capacity(8192);
        loop {
            match self.recv(&mut buf) {
                Ok(events) => {
                    for e in events {
                        if tx.send(e).is_err() {
                            return;
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(105) => overflow(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "proc connector failed; falling back to periodic scans");
                    return;
                }
            }
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
    }
}

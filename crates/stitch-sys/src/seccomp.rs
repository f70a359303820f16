//! Evaluating a thread's seccomp filters for one syscall *before* we inject it.
//!
//! A target under a seccomp filter (most systemd services, sandboxes) may kill itself, get a
//! SIGSYS, or ask a user-space supervisor when it makes a syscall its policy forbids. A remote
//! `mmap` must never do that to it, so before injecting we fetch its classic-BPF filters
//! (`PTRACE_SECCOMP_GET_FILTER`) and run them here on the exact `seccomp_data` the kernel will see.
//! This is a small, pure interpreter of the instruction subset that seccomp accepts.

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant.
    pub k: u32,
}

/// `struct seccomp_data`: what a filter sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeccompData {
    /// Syscall number.
    pub nr: i32,
    /// Audit architecture.
    pub arch: u32,
    /// Address right after the `syscall` instruction.
    pub instruction_pointer: u64,
    /// Arguments.
    pub args: [u64; 6],
}

impl SeccompData {
    fn word(&self, off: u32) -> Option<u32> {
        // The kernel only accepts aligned 32-bit loads inside the 64-byte struct.
        if !off.is_multiple_of(4) || off >= 64 {
            return None;
        }
        let q = |v: u64| -> u32 {
            if off.is_multiple_of(8) {
                v as u32
            } else {
                (v >> 32) as u32
            }
        };
        Some(match off {
            0 => self.nr.cast_unsigned(),
            4 => self.arch,
            8 | 12 => q(self.instruction_pointer),
            _ => q(self.args[((off - 16) / 8) as usize]),
        })
    }
}

/// What the filters decided, reduced to what matters for an injected syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `ALLOW` or `LOG`: the syscall runs.
    Allow,
    /// `ERRNO(n)`: fails harmlessly with that errno.
    Errno(u16),
    /// `TRACE` without a seccomp tracer: fails harmlessly with ENOSYS.
    Trace,
    /// `TRAP`: SIGSYS to the thread. Refused.
    Trap,
    /// `USER_NOTIF`: a supervisor process would see our call. Refused.
    UserNotif,
    /// `KILL_THREAD`. Refused.
    KillThread,
    /// `KILL_PROCESS`. Refused.
    KillProcess,
}

impl Verdict {
    /// Whether injecting the syscall is harmless for the target.
    #[must_use]
    pub fn is_harmless(self) -> bool {
        matches!(self, Self::Allow | Self::Errno(_) | Self::Trace)
    }
}

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ACTION_FULL: u32 = 0xffff_0000;

/// Runs one filter. `Err` for anything the kernel would not have accepted or that we do not model.
///
/// # Errors
/// A description of the unsupported instruction or out-of-range access.
pub fn run_filter(prog: &[BpfInsn], data: &SeccompData) -> Result<u32, String> {
    let mut a: u32 = 0;
    let mut x: u32 = 0;
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    // Classic BPF only jumps forward, so the program ends within prog.len() steps.
    for _ in 0..=prog.len() {
        let insn = *prog
            .get(pc)
            .ok_or_else(|| format!("fell off the program at {pc}"))?;
        pc += 1;
        let k = insn.k;
        let src = if insn.code & 0x08 != 0 { x } else { k };
        match insn.code & 0x07 {
            // LD
            0x00 => match insn.code {
                0x20 => a = data.word(k).ok_or_else(|| format!("bad load offset {k}"))?,
                0x80 => a = 64,
                0x00 => a = k,
                0x60 => a = *mem.get(k as usize).ok_or("bad mem index")?,
                c => return Err(format!("unsupported LD {c:#x}")),
            },
            // LDX
            0x01 => match insn.code {
                0x81 => x = 64,
                0x01 => x = k,
                0x61 => x = *mem.get(k as usize).ok_or("bad mem index")?,
                c => return Err(format!("unsupported LDX {c:#x}")),
            },
            0x02 => *mem.get_mut(k as usize).ok_or("bad mem index")? = a,
            0x03 => *mem.get_mut(k as usize).ok_or("bad mem index")? = x,
            // ALU
            0x04 => {
                a = match insn.code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 => a.checked_div(src).ok_or("division by zero")?,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a.checked_rem(src).ok_or("modulo by zero")?,
                    0xa0 => a ^ src,
                    c => return Err(format!("unsupported ALU {c:#x}")),
                }
            }
            // JMP
            0x05 => {
                let off = match insn.code & 0xf0 {
                    0x00 => k as usize,
                    op => {
                        let cond = match op {
                            0x10 => a == src,
                            0x20 => a > src,
                            0x30 => a >= src,
                            0x40 => a & src != 0,
                            c => return Err(format!("unsupported JMP {c:#x}")),
                        };
                        usize::from(if cond { insn.jt } else { insn.jf })
                    }
                };
                pc = pc.checked_add(off).ok_or("jump overflow")?;
            }
            // RET
            0x06 => {
                return match insn.code & 0x18 {
                    0x00 => Ok(k),
                    0x10 => Ok(a),
                    c => Err(format!("unsupported RET {c:#x}")),
                };
            }
            // MISC
            _ => match insn.code & 0xf8 {
                0x00 => x = a,
                0x80 => a = x,
                c => return Err(format!("unsupported MISC {c:#x}")),
            },
        }
    }
    Err("program did not return".into())
}

/// Runs every filter the way the kernel does (the most restrictive action wins; actions compare
/// as signed 32-bit values, so `KILL_PROCESS` = 0x80000000 is the most restrictive).
///
/// # Errors
/// As [`run_filter`].
pub fn evaluate(filters: &[Vec<BpfInsn>], data: &SeccompData) -> Result<Verdict, String> {
    let mut ret = RET_ALLOW;
    for f in filters {
        let cur = run_filter(f, data)?;
        if ((cur & RET_ACTION_FULL).cast_signed()) < ((ret & RET_ACTION_FULL).cast_signed()) {
            ret = cur;
        }
    }
    Ok(match ret & RET_ACTION_FULL {
        RET_KILL_PROCESS => Verdict::KillProcess,
        RET_KILL_THREAD => Verdict::KillThread,
        RET_TRAP => Verdict::Trap,
        RET_ERRNO => Verdict::Errno((ret & 0xffff) as u16),
        RET_USER_NOTIF => Verdict::UserNotif,
        RET_TRACE => Verdict::Trace,
        RET_LOG | RET_ALLOW => Verdict::Allow,
        // Unknown actions are treated by the kernel as KILL_PROCESS.
        _ => Verdict::KillProcess,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(code: u16, k: u32) -> BpfInsn {
        BpfInsn {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }
    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> BpfInsn {
        BpfInsn { code, jt, jf, k }
    }

    fn data(nr: i32) -> SeccompData {
        SeccompData {
            nr,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: 0x7fff_0000_1234,
            args: [1, 2, 3, 4, 5, 0x1_0000_0007],
        }
    }

    /// A typical systemd-style filter: check arch, kill on mmap (9), errno on 10, allow the rest.
    fn filter() -> Vec<BpfInsn> {
        vec![
            stmt(0x20, 4),                       // ld arch
            jump(0x15, AUDIT_ARCH_X86_64, 1, 0), // jeq arch
            stmt(0x06, RET_KILL_PROCESS),        // ret kill
            stmt(0x20, 0),                       // ld nr
            jump(0x15, 9, 0, 1),                 // jeq 9
            stmt(0x06, RET_KILL_THREAD),         // ret kill thread
            jump(0x15, 10, 0, 1),                // jeq 10
            stmt(0x06, RET_ERRNO | 1),           // ret errno(EPERM)
            stmt(0x06, RET_ALLOW),               // ret allow
        ]
    }

    #[test]
    fn typical_filter_verdicts() {
        let f = vec![filter()];
        assert_eq!(evaluate(&f, &data(9)).unwrap(), Verdict::KillThread);
        assert_eq!(evaluate(&f, &data(10)).unwrap(), Verdict::Errno(1));
        assert_eq!(evaluate(&f, &data(11)).unwrap(), Verdict::Allow);
        let mut d = data(11);
        d.arch = 0x4000_0003;
        assert_eq!(evaluate(&f, &d).unwrap(), Verdict::KillProcess);
        assert!(!Verdict::KillProcess.is_harmless());
        assert!(Verdict::Errno(1).is_harmless());
    }

    #[test]
    fn most_restrictive_filter_wins() {
        let allow_all = vec![stmt(0x06, RET_ALLOW)];
        let log_all = vec![stmt(0x06, RET_LOG)];
        let notif = vec![stmt(0x06, RET_USER_NOTIF)];
        let kill_proc = vec![stmt(0x06, RET_KILL_PROCESS)];
        let d = data(0);
        assert_eq!(
            evaluate(&[allow_all.clone(), log_all.clone()], &d).unwrap(),
            Verdict::Allow
        );
        assert_eq!(
            evaluate(&[notif.clone(), allow_all.clone()], &d).unwrap(),
            Verdict::UserNotif
        );
        assert_eq!(
            evaluate(&[notif, kill_proc], &d).unwrap(),
            Verdict::KillProcess
        );
        assert_eq!(evaluate(&[], &d).unwrap(), Verdict::Allow);
    }

    #[test]
    fn args_ip_alu_mem_and_misc() {
        // A = args[5] high word; A += 1; M[3] = A; X = M[3]; A = X; ret A
        let prog = vec![
            stmt(0x20, 16 + 5 * 8 + 4),
            stmt(0x04, 1),
            stmt(0x02, 3),
            stmt(0x61, 3),
            stmt(0x87, 0),
            stmt(0x16, 0),
        ];
        assert_eq!(run_filter(&prog, &data(0)).unwrap(), 2);
        // Low word of the instruction pointer, AND/JSET.
        let prog = vec![
            stmt(0x20, 8),
            jump(0x45, 0x1234, 0, 1),
            stmt(0x06, 7),
            stmt(0x06, 8),
        ];
        assert_eq!(run_filter(&prog, &data(0)).unwrap(), 7);
        // ld len; jgt/jge with X.
        let prog = vec![
            stmt(0x80, 0),
            stmt(0x01, 63),
            jump(0x2d, 0, 0, 1),
            stmt(0x06, 1),
            stmt(0x06, 2),
        ];
        assert_eq!(run_filter(&prog, &data(0)).unwrap(), 1);
    }

    #[test]
    fn malformed_programs_are_errors() {
        assert!(run_filter(&[stmt(0x20, 3), stmt(0x06, 0)], &data(0)).is_err()); // unaligned
        assert!(run_filter(&[stmt(0x20, 64), stmt(0x06, 0)], &data(0)).is_err()); // out of range
        assert!(run_filter(&[stmt(0x00, 1)], &data(0)).is_err()); // no return
        assert!(run_filter(&[stmt(0x34, 0), stmt(0x06, 0)], &data(0)).is_err()); // div by 0
        assert!(run_filter(&[stmt(0x28, 0), stmt(0x06, 0)], &data(0)).is_err()); // ld half
        assert!(run_filter(&[jump(0x05, 10, 0, 0)], &data(0)).is_err()); // jump out
        assert!(run_filter(&[], &data(0)).is_err());
    }
}

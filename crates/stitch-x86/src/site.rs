use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, OpKind};

use crate::{X86Error, format_insn};

/// A checked site: the instructions a jump will displace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub at: u64,
    pub end: u64,
    /// The displaced instructions, decoded at their original addresses.
    pub instructions: Vec<Instruction>,
}

impl Site {
    /// The last displaced instruction, formatted, when execution never continues past it
    /// (`jmp`, `ret`, `ud2`, ...): code placed after the displaced instructions
    /// (`displaced = "before"`) would then never run. `None` when it falls through.
    pub fn ends_without_fall_through(&self) -> Option<String> {
        let last = self.instructions.last()?;
        match last.flow_control() {
            FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
            | FlowControl::Exception
            | FlowControl::Interrupt => Some(format_insn(last)),
            _ => None,
        }
    }
}

fn branch_target(insn: &Instruction) -> Option<u64> {
    match insn.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Some(insn.near_branch_target())
        }
        _ => None,
    }
}

/// Decodes `original` at `at` and checks it can be displaced by a 5-byte jump.
pub fn analyze_site(at: u64, original: &[u8]) -> Result<Site, X86Error> {
    let end = at + original.len() as u64;
    let mut decoder = Decoder::with_ip(64, original, at, DecoderOptions::NONE);
    let mut instructions = Vec::new();
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        let pos = decoder.position();
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            // Either garbage, or an instruction cut off by the end of `original`.
            let rest = &original[pos..];
            let mut probe = rest.to_vec();
            probe.extend_from_slice(&[0u8; 15]);
            let mut d = Decoder::with_ip(64, &probe, insn.ip(), DecoderOptions::NONE);
            let full = d.decode();
            if !full.is_invalid() && full.len() > rest.len() {
                return Err(X86Error::SiteSplitsInstruction {
                    at,
                    end,
                    insn_addr: full.ip(),
                    insn: format_insn(&full),
                    insn_end: full.next_ip(),
                });
            }
            return Err(X86Error::InvalidInstruction {
                addr: insn.ip(),
                bytes: hex_bytes(&rest[..rest.len().min(15)]),
            });
        }
        instructions.push(insn);
    }
    let last = instructions.len() - 1;
    for (i, insn) in instructions.iter().enumerate() {
        let is_call = matches!(
            insn.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        );
        if is_call && i != last {
            return Err(X86Error::CallNotLast {
                addr: insn.ip(),
                insn: format_insn(insn),
            });
        }
        if let Some(target) = branch_target(insn)
            && target > at
            && target < end
        {
            return Err(X86Error::BranchIntoSite {
                addr: insn.ip(),
                insn: format_insn(insn),
                target,
                at,
                end,
            });
        }
    }
    Ok(Site {
        at,
        end,
        instructions,
    })
}

/// Linear sweep of `code` (at `ip`) for direct branches whose target is strictly inside
/// `(at, end)`: executing the jump's tail would crash. Returns `(branch address, target)`.
///
/// A linear sweep can desynchronise on data embedded in code; compilers for x86-64 keep jump
/// tables in `.rodata`, so on ordinary code this finds real branches. Indirect branches
/// (jump tables, function pointers) are not visible here; sites are chosen so no such target
/// lies inside them (see docs/writing-a-patch.md).
pub fn find_interior_branches(code: &[u8], ip: u64, at: u64, end: u64) -> Vec<(u64, u64)> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    let mut hits = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            continue;
        }
        // Instructions inside the site itself are checked by analyze_site.
        if insn.ip() >= at && insn.ip() < end {
            continue;
        }
        if let Some(t) = branch_target(&insn)
            && t > at
            && t < end
        {
            hits.push((insn.ip(), t));
        }
    }
    hits
}

pub(crate) fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_instructions_pass() {
        // push rbp; mov rbp, rsp; sub rsp, 0x10
        let s = analyze_site(0x1000, &[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10]).unwrap();
        assert_eq!(s.instructions.len(), 3);
    }

    #[test]
    fn site_splitting_an_instruction_is_rejected() {
        // push rbp; mov rbp, rsp; sub rsp, 0x10 — cut one byte short.
        let e = analyze_site(0x1000, &[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec]).unwrap_err();
        assert_eq!(e.code(), "site.splits_instruction", "{e}");
    }

    #[test]
    fn call_not_last_is_rejected() {
        // call rel32; nop
        let e = analyze_site(0x1000, &[0xe8, 0, 0, 0, 0, 0x90]).unwrap_err();
        assert_eq!(e.code(), "site.call_not_last");
        // nop; call rel32 is fine
        analyze_site(0x1000, &[0x90, 0xe8, 0, 0, 0, 0]).unwrap();
    }

    #[test]
    fn branch_into_site_is_rejected() {
        // jmp short +1 (to 0x1003, inside); nop; nop; nop
        let e = analyze_site(0x1000, &[0xeb, 0x01, 0x90, 0x90, 0x90]).unwrap_err();
        assert_eq!(e.code(), "site.branch_into_site");
    }

    #[test]
    fn invalid_bytes_are_rejected() {
        let e = analyze_site(0x1000, &[0x06, 0x06, 0x06, 0x06, 0x06]).unwrap_err();
        assert_eq!(e.code(), "site.invalid_instruction");
    }

    #[test]
    fn whole_instructions_never_split_and_cover_the_minimum() {
        // push rbp (1); mov rbp, rsp (3); sub rsp, 0x10 (4)
        let code = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10];
        let lens = |min| -> Vec<usize> {
            crate::whole_instructions(&code, 0x1000, min)
                .iter()
                .map(|l| l.bytes.len())
                .collect()
        };
        assert_eq!(lens(5), vec![1, 3, 4]);
        assert_eq!(lens(4), vec![1, 3]);
        assert_eq!(lens(1), vec![1]);
    }

    #[test]
    fn interior_branch_elsewhere_is_found() {
        // 0x1000: nop x5 (site 0x1000..0x1005); 0x1005: jmp short to 0x1002
        let code = [0x90, 0x90, 0x90, 0x90, 0x90, 0xeb, 0xfb];
        assert_eq!(
            find_interior_branches(&code, 0x1000, 0x1000, 0x1005),
            vec![(0x1005, 0x1002)]
        );
    }
}

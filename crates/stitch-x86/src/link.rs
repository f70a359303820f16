use iced_x86::{BlockEncoder, BlockEncoderOptions, InstructionBlock};
use stitch_format::{Displaced, Patchlet, RelocKind, RelocTarget};

use crate::{X86Error, analyze_site, jmp_rel32, rel32, site_bytes};

/// Everything the engine knows about the process when it links one patchlet.
#[derive(Debug, Clone)]
pub struct LinkContext<'a> {
    /// Load bias of the target module: runtime address = bias + module-relative address.
    pub bias: u64,
    /// Where the first byte of this patchlet's trampoline will live.
    pub addr: u64,
    /// Runtime addresses of the patch's imports, by index (`None`: not resolvable here).
    pub imports: &'a [Option<u64>],
    /// Runtime address of the patch's 8-byte hit counter.
    pub hit_counter: u64,
}

/// A patchlet laid out at a fixed address, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedPatchlet {
    /// Runtime address of the trampoline (== its entry point).
    pub addr: u64,
    /// Trampoline bytes, to be written at `addr`.
    pub trampoline: Vec<u8>,
    /// Runtime address of the site.
    pub site: u64,
    /// Bytes that replace `original` at the site: `jmp rel32` to `addr`, then `int3`s.
    pub site_bytes: Vec<u8>,
}

const JMP_ABS64: [u8; 6] = [0xff, 0x25, 0, 0, 0, 0]; // jmp qword ptr [rip+0]; .quad target

fn relocate(site: &crate::Site, rip: u64) -> Result<Vec<u8>, X86Error> {
    let block = InstructionBlock::new(&site.instructions, rip);
    BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
        .map(|r| r.code_buffer)
        .map_err(|e| X86Error::Relocation {
            addr: rip,
            reason: e.to_string(),
        })
}

/// Lays out `p`'s trampoline at `ctx.addr`:
///
/// ```text
/// [displaced instructions, relocated]     if displaced = "before"
/// code:      patch code, relocations applied
/// continue:  [displaced instructions, relocated]   if displaced = "after"
///            jmp resume                   (rel32, or jmp [rip+0] + 8-byte address)
/// (8-aligned) import thunks: jmp [rip+0] + 8-byte address, one per import used
///            8-byte slots for GOT-style references to non-imports
/// ```
pub fn link_patchlet(p: &Patchlet, ctx: &LinkContext<'_>) -> Result<LinkedPatchlet, X86Error> {
    let site = analyze_site(p.at, &p.original)?;
    let site_addr = ctx.bias.wrapping_add(p.at);
    // Re-decode at the runtime address so relative operands resolve to runtime targets.
    let runtime_site = analyze_site(site_addr, &p.original)?;
    debug_assert_eq!(site.instructions.len(), runtime_site.instructions.len());

    let mut out: Vec<u8> = Vec::with_capacity(p.code.len() + 64);
    if p.displaced == Displaced::Before {
        out.extend(relocate(&runtime_site, ctx.addr)?);
    }
    let code_off = out.len();
    let code_addr = ctx.addr + code_off as u64;
    out.extend_from_slice(&p.code);
    let continue_addr = ctx.addr + out.len() as u64;
    if p.displaced == Displaced::After {
        out.extend(relocate(&runtime_site, continue_addr)?);
    }
    let resume = ctx.bias.wrapping_add(p.resume);
    let here = ctx.addr + out.len() as u64;
    match jmp_rel32(here, resume) {
        Some(j) => out.extend_from_slice(&j),
        None => {
            out.extend_from_slice(&JMP_ABS64);
            out.extend_from_slice(&resume.to_le_bytes());
        }
    }
    while !out.len().is_multiple_of(8) {
        out.push(crate::SITE_PAD);
    }

    // Thunks and slots, created on first use.
    let mut import_thunks: Vec<(u16, u64)> = Vec::new();
    let mut slots: Vec<(u64, u64)> = Vec::new(); // (value, slot address)
    for (index, r) in p.relocs.iter().enumerate() {
        let place = code_addr + u64::from(r.offset);
        let what = || format!("patchlet {} relocation #{index} ({:?})", p.name, r.target);
        // S for direct references and the address a GOT-style reference loads from.
        let (direct, slot_value) = match r.target {
            RelocTarget::Module(v) => {
                let a = ctx.bias.wrapping_add(v);
                (a, a)
            }
            RelocTarget::Import(i) => {
                let thunk = import_thunk(&mut out, &mut import_thunks, ctx, index, i)?;
                let real = ctx.imports[usize::from(i)].unwrap_or_default();
                // A call or jmp goes through the thunk (always in range); data and GOT
                // references use the real address.
                (thunk, real)
            }
            RelocTarget::Continue => (continue_addr, continue_addr),
            RelocTarget::HitCounter => (ctx.hit_counter, ctx.hit_counter),
            RelocTarget::Code => (code_addr, code_addr),
        };
        let field = code_off + r.offset as usize;
        match r.kind {
            RelocKind::Pc32 => {
                let v = direct.wrapping_add(r.addend as u64);
                let rel = rel32(place, v).ok_or_else(|| X86Error::OutOfRange {
                    what: what(),
                    from: place,
                    target: v,
                })?;
                out[field..field + 4].copy_from_slice(&rel.to_le_bytes());
            }
            RelocKind::Abs64 => {
                let v = match r.target {
                    RelocTarget::Import(_) => slot_value,
                    _ => direct,
                }
                .wrapping_add(r.addend as u64);
                out[field..field + 8].copy_from_slice(&v.to_le_bytes());
            }
            RelocKind::GotPc32 => {
                let slot = if let RelocTarget::Import(i) = r.target {
                    // The thunk's 8-byte address doubles as the GOT slot.
                    import_thunk(&mut out, &mut import_thunks, ctx, index, i)?
                        + JMP_ABS64.len() as u64
                } else if let Some(&(_, s)) = slots.iter().find(|(v, _)| *v == slot_value) {
                    s
                } else {
                    while !out.len().is_multiple_of(8) {
                        out.push(crate::SITE_PAD);
                    }
                    let s = ctx.addr + out.len() as u64;
                    out.extend_from_slice(&slot_value.to_le_bytes());
                    slots.push((slot_value, s));
                    s
                };
                let v = slot.wrapping_add(r.addend as u64);
                let rel = rel32(place, v).ok_or_else(|| X86Error::OutOfRange {
                    what: what(),
                    from: place,
                    target: v,
                })?;
                out[field..field + 4].copy_from_slice(&rel.to_le_bytes());
            }
        }
    }

    let site_bytes =
        site_bytes(site_addr, p.original.len(), ctx.addr).ok_or_else(|| X86Error::OutOfRange {
            what: format!("jump from site of patchlet {}", p.name),
            from: site_addr,
            target: ctx.addr,
        })?;
    Ok(LinkedPatchlet {
        addr: ctx.addr,
        trampoline: out,
        site: site_addr,
        site_bytes,
    })
}

/// The thunk for import `i`, emitted at the end of `out` on first use.
fn import_thunk(
    out: &mut Vec<u8>,
    thunks: &mut Vec<(u16, u64)>,
    ctx: &LinkContext<'_>,
    index: usize,
    i: u16,
) -> Result<u64, X86Error> {
    if let Some(&(_, a)) = thunks.iter().find(|(k, _)| *k == i) {
        return Ok(a);
    }
    let target = ctx
        .imports
        .get(usize::from(i))
        .copied()
        .flatten()
        .ok_or(X86Error::UnresolvedImport { index, import: i })?;
    // Align the 8-byte address inside the thunk.
    while !(out.len() + JMP_ABS64.len()).is_multiple_of(8) {
        out.push(crate::SITE_PAD);
    }
    let thunk = ctx.addr + out.len() as u64;
    out.extend_from_slice(&JMP_ABS64);
    out.extend_from_slice(&target.to_le_bytes());
    thunks.push((i, thunk));
    Ok(thunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disassemble;
    use stitch_format::Reloc;

    fn patchlet(displaced: Displaced) -> Patchlet {
        Patchlet {
            name: "t".into(),
            at: 0x1000,
            // mov eax, [rip+0x100]; nop
            original: vec![0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0x90],
            displaced,
            resume: 0x1007,
            // lock inc qword ptr [rip+X]; call X
            code: vec![0xf0, 0x48, 0xff, 0x05, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0],
            relocs: vec![
                Reloc {
                    offset: 4,
                    kind: RelocKind::Pc32,
                    target: RelocTarget::HitCounter,
                    addend: -4,
                },
                Reloc {
                    offset: 9,
                    kind: RelocKind::Pc32,
                    target: RelocTarget::Import(0),
                    addend: -4,
                },
            ],
            source: String::new(),
        }
    }

    fn text(l: &LinkedPatchlet) -> Vec<String> {
        disassemble(&l.trampoline, l.addr)
            .into_iter()
            .map(|l| l.text)
            .collect()
    }

    #[test]
    fn displaced_rip_relative_operand_keeps_its_target() {
        let bias = 0x5555_5555_0000;
        let ctx = LinkContext {
            bias,
            addr: bias + 0x10_0000,
            imports: &[Some(0x7fff_0000_1000)],
            hit_counter: bias + 0x10_0ff8,
        };
        let l = link_patchlet(&patchlet(Displaced::Before), &ctx).unwrap();
        let t = text(&l);
        // Original reads [bias+0x1006+0x100]; relocated must read the same absolute address.
        assert_eq!(t[0], format!("mov eax, [0x{:x}]", bias + 0x1106));
        assert_eq!(
            t[2],
            format!("lock inc qword ptr [0x{:x}]", ctx.hit_counter)
        );
        assert!(
            t.iter().any(|s| s == &format!("jmp 0x{:x}", bias + 0x1007)),
            "{t:?}"
        );
        // The call goes through a thunk inside the trampoline that jumps to the import.
        assert!(
            l.trampoline
                .windows(8)
                .any(|w| w == 0x7fff_0000_1000u64.to_le_bytes())
        );
        assert_eq!(l.site_bytes[0], 0xe9);
        assert_eq!(&l.site_bytes[5..], &[0xcc, 0xcc]);
    }

    #[test]
    fn resume_out_of_rel32_range_uses_absolute_jump() {
        let ctx = LinkContext {
            bias: 0x40_0000,
            addr: 0x40_0000 + 0x1_0000,
            imports: &[Some(0x7f00_0000_0000)],
            hit_counter: 0x40_0000 + 0x1_0ff8,
        };
        let l = link_patchlet(&patchlet(Displaced::After), &ctx).unwrap();
        assert!(text(&l).iter().any(|s| s.starts_with("jmp 0x40")));
    }

    #[test]
    fn unresolved_import_is_an_error_not_a_zero_address() {
        let ctx = LinkContext {
            bias: 0,
            addr: 0x2000,
            imports: &[None],
            hit_counter: 0x3000,
        };
        let e = link_patchlet(&patchlet(Displaced::Drop), &ctx).unwrap_err();
        assert_eq!(e.code(), "link.unresolved_import");
    }

    #[test]
    fn trampoline_too_far_from_site_is_refused() {
        let ctx = LinkContext {
            bias: 0x40_0000,
            addr: 0x7f00_0000_0000,
            imports: &[Some(0x7f00_0000_1000)],
            hit_counter: 0x7f00_0000_2000,
        };
        let e = link_patchlet(&patchlet(Displaced::Drop), &ctx).unwrap_err();
        assert_eq!(e.code(), "link.out_of_range");
    }
}

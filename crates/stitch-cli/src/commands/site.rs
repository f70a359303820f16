//! `stitch site`: the author's first step — what is at this address, and is it a valid site?

use std::path::Path;

use anyhow::{Context as _, bail};
use stitch_elf::ElfFile;

use super::read;

pub(crate) fn run(target: &Path, location: &str, min_len: usize) -> anyhow::Result<()> {
    let bytes = read(target)?;
    let elf = ElfFile::parse(&bytes).with_context(|| format!("parsing {}", target.display()))?;
    let at = stitch_build::resolve_location(&elf, location).map_err(anyhow::Error::msg)?;
    if !elf.is_executable_range(at, min_len as u64) {
        bail!(
            "{at:#x} is not inside executable code of {}",
            target.display()
        );
    }
    // Show a little more than the site so the author sees the context.
    let avail = (0..=64usize)
        .rev()
        .find(|&n| elf.bytes_at(at, n).is_ok())
        .unwrap_or(0);
    let code = elf.bytes_at(at, avail)?;
    let lines = stitch_x86::disassemble(code, at);
    let site = stitch_x86::whole_instructions(code, at, min_len);
    let n_site = site.len();
    let original: Vec<u8> = site.into_iter().flat_map(|l| l.bytes).collect();
    let where_ = elf
        .symbol_containing(at)
        .map(|(s, off)| format!(" ({}+{off:#x})", s.name))
        .unwrap_or_default();
    println!("{}{where_}", target.display());
    for (i, l) in lines.iter().take(n_site + 4).enumerate() {
        let mark = if i < n_site { ">" } else { " " };
        println!(
            "{mark} {:#8x}  {:<24} {}",
            l.addr,
            stitch_build::hex_spaced(&l.bytes),
            l.text
        );
    }
    println!();
    println!("sha256   = \"{}\"", hex::encode(stitch_elf::sha256(&bytes)));
    if let Some(id) = elf.build_id() {
        println!("build_id = \"{}\"", hex::encode(id));
    }
    println!("at       = {at:#x}");
    println!("original = \"{}\"", stitch_build::hex_spaced(&original));
    match stitch_x86::analyze_site(at, &original) {
        Err(e) => println!("\nnot a valid site: {e} [{}]", e.code()),
        Ok(_) => {
            let end = at + original.len() as u64;
            let mut interior = Vec::new();
            for (start, len) in elf.executable_ranges() {
                if let Ok(c) = elf.bytes_at(start, len as usize) {
                    interior.extend(stitch_x86::find_interior_branches(c, start, at, end));
                }
            }
            match interior.first() {
                Some((from, to)) => println!(
                    "\nnot a valid site: the instruction at {from:#x} branches to {to:#x}, inside the site"
                ),
                None => println!(
                    "\nvalid site: whole instructions, no call before the last, no branch into it"
                ),
            }
        }
    }
    Ok(())
}

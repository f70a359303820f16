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
    // The same checks `stitch build` makes; "after" makes no claim about reachability, which
    // is reported on its own below.
    match stitch_build::check_site(
        &elf,
        location,
        at,
        &original,
        stitch_format::Displaced::After,
    ) {
        Err(e) => println!("\nnot a valid site: {e} [{}]", e.code()),
        Ok(site) => {
            println!(
                "\nvalid site: whole instructions, no call before the last, no branch into it"
            );
            if let Some(insn) = site.ends_without_fall_through() {
                println!(
                    "note: it ends in `{insn}`, which never falls through: use displaced = \"after\" or \"drop\""
                );
            }
        }
    }
    Ok(())
}

//! `stitch new`: the first `patch.toml` of a patch, written from the real target file, so the
//! parts an author must not get wrong by hand — hash, build-id, the site's exact original
//! bytes, whole instructions — come from the file and are checked like `stitch build` checks
//! them. What only the author can know (title, description, severity, the code) is left for
//! the author, marked with `TODO` so that it is not shipped unread.

use stitch_elf::{ElfFile, Machine};
use stitch_format::{Displaced, Ecosystem};

use crate::{BuildError, check_site, hex_spaced, invalid, resolve_location};

/// What `stitch new` is asked for.
#[derive(Debug, Clone)]
pub struct ScaffoldSpec<'a> {
    /// Patch id, e.g. `ST-2026-0042`.
    pub id: &'a str,
    /// The module's file name as processes map it (e.g. `libexpat.so.1`).
    pub module: &'a str,
    /// Where the first patchlet goes: `symbol`, `symbol+off` or `0x...`.
    pub location: &'a str,
    /// Minimum bytes to displace; whole instructions are taken (at least 5).
    pub min_len: usize,
    pub displaced: Displaced,
    pub package: (Ecosystem, &'a str, &'a str),
    pub cves: &'a [String],
    pub author: &'a str,
    /// Name of the patchlet and of its assembly file (`<name>.s`).
    pub patchlet: &'a str,
}

/// The files of a new patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaffold {
    /// `patch.toml`.
    pub toml: String,
    /// The patchlet's assembly file, named [`Scaffold::code_file`].
    pub asm: String,
    pub code_file: String,
    /// The site's address and bytes, for the caller to show.
    pub at: u64,
    pub original: Vec<u8>,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Writes the skeleton of a one-patchlet patch for `target` (the module's bytes).
///
/// # Errors
/// What `stitch build` would say about the same site: not ELF, not x86-64, a bad location,
/// not executable, a site that splits an instruction or is branched into.
pub fn scaffold(target: &[u8], spec: &ScaffoldSpec<'_>) -> Result<Scaffold, BuildError> {
    let elf = ElfFile::parse(target)?;
    if let Machine::Other(m) = elf.machine() {
        return Err(BuildError::NotX86_64(m));
    }
    if spec.patchlet.is_empty()
        || !spec
            .patchlet
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(format!(
            "patchlet name {:?}: use letters, digits, '_' or '-' (it names the .s file)",
            spec.patchlet
        )));
    }
    let at = resolve_location(&elf, spec.location).map_err(|reason| BuildError::BadAddress {
        patchlet: spec.patchlet.to_string(),
        reason,
    })?;
    let min_len = spec.min_len.max(stitch_format::limits::MIN_ORIGINAL);
    // Up to 15 bytes per instruction: enough for `min_len` plus the instruction that crosses it.
    let avail = (0..=min_len + 15)
        .rev()
        .find(|&n| elf.bytes_at(at, n).is_ok())
        .unwrap_or(0);
    let code = elf.bytes_at(at, avail)?;
    let original: Vec<u8> = stitch_x86::whole_instructions(code, at, min_len)
        .into_iter()
        .flat_map(|l| l.bytes)
        .collect();
    check_site(&elf, spec.patchlet, at, &original, spec.displaced)?;

    let listing: String = stitch_x86::disassemble(&original, at)
        .iter()
        .map(|l| format!("#   {:#x}  {}\n", l.addr, l.text))
        .collect();
    let where_ = elf
        .symbol_containing(at)
        .map(|(s, off)| match off {
            0 => s.name.clone(),
            _ => format!("{}+{off:#x}", s.name),
        })
        .unwrap_or_else(|| format!("{at:#x}"));
    let (what_runs, until) = match spec.displaced {
        Displaced::Before => (
            "The displaced instructions below run first, then this code.",
            "Until then this patchlet changes nothing.",
        ),
        Displaced::After => (
            "This code runs first; falling off its end runs the displaced instructions below.",
            "Until then this patchlet changes nothing.",
        ),
        Displaced::Drop => (
            "The displaced instructions below never run: this code replaces them.",
            "As it stands, empty, it SKIPS them: do not ship it so.",
        ),
    };
    let code_file = format!("{}.s", spec.patchlet);
    let asm = format!(
        "# {id} patchlet {name} at {where_} ({at:#x}) of {module}.\n\
         # {what_runs}\n\
         # Displaced:\n{listing}\
         # Intel syntax. Builtins: stitch_hit (count a blocked attempt), __stitch_resume,\n\
         # __stitch_mod+OFFSET, target symbols, [[import]]s. See docs/writing-a-patch.md.\n\
         # TODO: the fix. {until}\n",
        id = spec.id,
        name = spec.patchlet,
        module = spec.module,
    );
    let title = match spec.cves.first() {
        Some(cve) => format!("TODO: what {cve} is and what this patch changes"),
        None => "TODO: one line on what this patch fixes".to_string(),
    };
    let cves = spec
        .cves
        .iter()
        .map(|c| quoted(c))
        .collect::<Vec<_>>()
        .join(", ");
    let build_id = match elf.build_id() {
        Some(b) => format!("build_id = \"{}\"\n", hex::encode(b)),
        None => String::new(),
    };
    let toml = format!(
        "# Written by `stitch new` from the target file; `stitch build` checks every line again.\n\
         id = {id}\n\
         revision = 1\n\
         title = {title}\n\
         description = \"\"\"\n\
         TODO: the upstream fix this mirrors (commit, PR or release), and why the machine code\n\
         added here has the same effect on every path.\n\
         \"\"\"\n\
         cve = [{cves}]\n\
         severity = \"high\"   # low | medium | high | critical\n\
         tier = \"free\"       # free | pro\n\
         author = {author}\n\
         \n\
         [target]\n\
         module = {module}\n\
         sha256 = \"{sha}\"\n\
         {build_id}\
         arch = \"x86_64\"\n\
         package = {{ ecosystem = \"{eco}\", name = {pkg}, version = {ver} }}\n\
         \n\
         [[patchlet]]\n\
         name = {name}\n\
         at = {at_expr}   # {at:#x}\n\
         original = \"{original}\"\n\
         displaced = \"{displaced}\"   # before | after | drop\n\
         code_file = {code_file_q}\n",
        id = quoted(spec.id),
        title = quoted(&title),
        author = quoted(spec.author),
        module = quoted(spec.module),
        sha = hex::encode(stitch_elf::sha256(target)),
        eco = spec.package.0.as_str(),
        pkg = quoted(spec.package.1),
        ver = quoted(spec.package.2),
        name = quoted(spec.patchlet),
        at_expr = quoted(&where_),
        original = hex_spaced(&original),
        displaced = spec.displaced.as_str(),
        code_file_q = quoted(&code_file),
    );
    Ok(Scaffold {
        toml,
        asm,
        code_file,
        at,
        original,
    })
}

//! Running the system assembler and reading its object file.

use std::process::Command;

use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionKind, SymbolKind,
};
use stitch_elf::ElfFile;
use stitch_format::{Import, Reloc, RelocKind, RelocTarget};

use crate::BuildError;

/// Prepended to every patchlet's assembly. Documented in docs/patch-format.md.
///
/// `stitch_hit` counts one exploit attempt: a single locked increment of the patch's counter
/// in the process's Stitch region (no syscall). It changes the arithmetic flags.
pub const PRELUDE: &str = "\
.intel_syntax noprefix
.text
.macro stitch_hit
    lock inc qword ptr [rip + __stitch_hit]
.endm
";

const BUILTIN_MODULE: &str = "__stitch_mod";
const BUILTIN_CONTINUE: &str = "__stitch_resume";
const BUILTIN_HIT: &str = "__stitch_hit";

/// The system assembler. `$STITCH_AS` overrides the program (default `as`).
#[derive(Debug, Clone)]
pub struct Assembler {
    program: String,
}

impl Default for Assembler {
    fn default() -> Self {
        Self {
            program: std::env::var("STITCH_AS").unwrap_or_else(|_| "as".into()),
        }
    }
}

/// What one patchlet assembled to.
#[derive(Debug)]
pub(crate) struct Assembled {
    pub text: Vec<u8>,
    relocs: Vec<RawReloc>,
}

#[derive(Debug)]
struct RawReloc {
    offset: u64,
    r_type: u32,
    symbol: String,
    /// Some(value) when the symbol is defined inside this patchlet's own .text.
    local_value: Option<u64>,
    addend: i64,
}

impl Assembler {
    /// An assembler run as `program`.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
        }
    }

    pub(crate) fn assemble(&self, patchlet: &str, source: &str) -> Result<Assembled, BuildError> {
        let dir = tempfile::tempdir().map_err(|source| BuildError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let s_path = dir.path().join("patchlet.s");
        let o_path = dir.path().join("patchlet.o");
        let full = format!("{PRELUDE}{source}\n");
        std::fs::write(&s_path, full).map_err(|source| BuildError::Io {
            path: s_path.clone(),
            source,
        })?;
        let out = Command::new(&self.program)
            .arg("--64")
            .arg("-o")
            .arg(&o_path)
            .arg(&s_path)
            .output()
            .map_err(|source| BuildError::AssemblerMissing {
                program: self.program.clone(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("Warning") {
            return Err(BuildError::AssemblyFailed {
                patchlet: patchlet.to_string(),
                messages: rewrite_messages(&stderr, &s_path.to_string_lossy()),
            });
        }
        let data = std::fs::read(&o_path).map_err(|source| BuildError::Io {
            path: o_path.clone(),
            source,
        })?;
        read_object(patchlet, &data)
    }
}

/// `as` names our temporary file and counts the prelude; say "line N of the code" instead.
fn rewrite_messages(stderr: &str, s_path: &str) -> String {
    let prelude_lines = PRELUDE.lines().count();
    stderr
        .lines()
        .filter(|l| !l.ends_with("Assembler messages:"))
        .map(|l| {
            let Some(rest) = l.strip_prefix(s_path).and_then(|r| r.strip_prefix(':')) else {
                return l.to_string();
            };
            match rest.split_once(':') {
                Some((n, msg)) => match n.parse::<usize>() {
                    Ok(n) if n > prelude_lines => {
                        format!("  code line {}:{msg}", n - prelude_lines)
                    }
                    _ => format!("  (prelude):{msg}"),
                },
                None => format!("  {rest}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn read_object(patchlet: &str, data: &[u8]) -> Result<Assembled, BuildError> {
    let bad = |reason: String| BuildError::ObjectInvalid {
        patchlet: patchlet.to_string(),
        reason,
    };
    let obj = object::File::parse(data).map_err(|e| bad(format!("object file: {e}")))?;
    let mut text: Option<(Vec<u8>, object::SectionIndex)> = None;
    for section in obj.sections() {
        let name = section.name().unwrap_or("?").to_string();
        let has_content = section.size() > 0;
        match section.kind() {
            SectionKind::Text if name == ".text" => {
                let bytes = section.data().map_err(|e| bad(e.to_string()))?.to_vec();
                text = Some((bytes, section.index()));
            }
            SectionKind::Data
            | SectionKind::ReadOnlyData
            | SectionKind::ReadOnlyString
            | SectionKind::UninitializedData
            | SectionKind::Text
            | SectionKind::Tls
            | SectionKind::UninitializedTls
                if has_content =>
            {
                return Err(BuildError::UnsupportedSection {
                    patchlet: patchlet.to_string(),
                    section: name,
                });
            }
            _ => {}
        }
    }
    let (text, text_index) = match text {
        Some((bytes, index)) => (bytes, Some(index)),
        None => (Vec::new(), None),
    };
    let mut relocs = Vec::new();
    if let Some(section) = obj.sections().find(|s| Some(s.index()) == text_index) {
        for (offset, r) in section.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                return Err(bad("non-ELF relocation".into()));
            };
            let RelocationTarget::Symbol(idx) = r.target() else {
                return Err(bad(format!("relocation at {offset:#x} has no symbol")));
            };
            let sym = obj
                .symbol_by_index(idx)
                .map_err(|e| bad(format!("relocation symbol: {e}")))?;
            let in_text = sym.section_index().is_some() && sym.section_index() == text_index;
            let symbol = if sym.kind() == SymbolKind::Section {
                ".text".to_string()
            } else {
                sym.name().unwrap_or("?").to_string()
            };
            relocs.push(RawReloc {
                offset,
                r_type,
                symbol,
                local_value: in_text.then(|| sym.address()),
                addend: r.addend(),
            });
        }
    }
    Ok(Assembled { text, relocs })
}

/// Maps each relocation to a [`Reloc`]: builtins, the patchlet's own labels, imports, and
/// symbols of the target module (resolved now, against the real file).
pub(crate) fn resolve_relocations(
    patchlet: &str,
    a: &Assembled,
    elf: &ElfFile<'_>,
    imports: &[Import],
) -> Result<Vec<Reloc>, BuildError> {
    let mut out = Vec::with_capacity(a.relocs.len());
    for r in &a.relocs {
        let unsupported = || BuildError::UnsupportedRelocation {
            patchlet: patchlet.to_string(),
            r_type: r.r_type,
            symbol: r.symbol.clone(),
            offset: r.offset,
        };
        let kind = match r.r_type {
            object::elf::R_X86_64_PC32 | object::elf::R_X86_64_PLT32 => RelocKind::Pc32,
            object::elf::R_X86_64_64 => RelocKind::Abs64,
            object::elf::R_X86_64_GOTPCREL
            | object::elf::R_X86_64_GOTPCRELX
            | object::elf::R_X86_64_REX_GOTPCRELX => RelocKind::GotPc32,
            _ => return Err(unsupported()),
        };
        let mut addend = r.addend;
        let target = if let Some(value) = r.local_value {
            addend = addend.wrapping_add(value as i64);
            RelocTarget::Code
        } else {
            match r.symbol.as_str() {
                BUILTIN_MODULE => RelocTarget::Module(0),
                BUILTIN_CONTINUE => RelocTarget::Continue,
                BUILTIN_HIT => RelocTarget::HitCounter,
                s if s.starts_with("__stitch_") => {
                    return Err(BuildError::UnknownSymbol {
                        patchlet: patchlet.to_string(),
                        symbol: s.to_string(),
                    });
                }
                s => {
                    let import = imports.iter().position(|i| i.name == s);
                    let module_sym = elf.symbol(s);
                    match (import, module_sym) {
                        (Some(_), Some(_)) => {
                            return Err(BuildError::AmbiguousSymbol {
                                patchlet: patchlet.to_string(),
                                symbol: s.to_string(),
                            });
                        }
                        (Some(i), None) => RelocTarget::Import(i as u16),
                        (None, Some(sym)) => RelocTarget::Module(sym.vaddr),
                        (None, None) => {
                            return Err(BuildError::UnknownSymbol {
                                patchlet: patchlet.to_string(),
                                symbol: s.to_string(),
                            });
                        }
                    }
                }
            }
        };
        if kind == RelocKind::GotPc32 && matches!(target, RelocTarget::Code) {
            return Err(unsupported());
        }
        out.push(Reloc {
            offset: u32::try_from(r.offset).map_err(|_| unsupported())?,
            kind,
            target,
            addend,
        });
    }
    Ok(out)
}

//! The author's toolchain: turns a patch source (`patch.toml` + Intel-syntax assembly) into a
//! checked, unsigned [`Bundle`], against the real target file.
//!
//! Each patchlet is assembled by the system assembler (`as` from binutils; `$STITCH_AS`
//! overrides the path) — Stitch contains no assembler of its own. The object file's `.text`
//! and relocations are read with the `object` crate; every symbol the code references is
//! resolved here (target-module symbols, builtins) or recorded for the engine (imports).
//!
//! Invariant: a bundle returned by [`build`] was checked against the exact target file:
//! SHA-256 and build-id match, every site holds its `original` bytes in executable code, the
//! site is whole instructions with a `call` only last, no direct branch lands inside a site,
//! and the patch satisfies the format's limits. Every error names the patchlet and address.

#![forbid(unsafe_code)]

mod assemble;
mod scaffold;
pub mod source;

use std::path::{Path, PathBuf};

use stitch_elf::{ElfFile, Machine};
use stitch_format::{
    Arch, Bundle, Displaced, Ecosystem, FormatError, Import, Package, Patch, Patchlet, Severity,
    Target, Tier,
};

pub use assemble::{Assembler, PRELUDE};
pub use scaffold::{Scaffold, ScaffoldSpec, scaffold};
use source::{Address, PatchSource, PatchletSource};

/// Why a build failed. Every variant has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("patch source is invalid: {reason}")]
    SourceInvalid { reason: String },
    #[error("target file is not a usable ELF module: {0}")]
    TargetNotElf(#[from] stitch_elf::ElfError),
    #[error("target is not x86-64 (ELF machine {0})")]
    NotX86_64(u16),
    #[error("target SHA-256 mismatch: patch expects {expected}, file is {found}")]
    HashMismatch { expected: String, found: String },
    #[error("target build-id mismatch: patch expects {expected}, file has {found}")]
    BuildIdMismatch { expected: String, found: String },
    #[error("patchlet {patchlet}: {reason}")]
    BadAddress { patchlet: String, reason: String },
    #[error("patchlet {patchlet}: {addr:#x}..+{len} is not inside executable code of the target")]
    SiteNotExecutable {
        patchlet: String,
        addr: u64,
        len: usize,
    },
    #[error(
        "patchlet {patchlet}: original bytes mismatch at {addr:#x}: expected {expected}, found {found}"
    )]
    OriginalMismatch {
        patchlet: String,
        addr: u64,
        expected: String,
        found: String,
    },
    #[error("patchlet {patchlet}: {source}")]
    Site {
        patchlet: String,
        source: stitch_x86::X86Error,
    },
    #[error(
        "patchlet {patchlet}: the instruction at {from:#x} branches to {target:#x}, inside the site {at:#x}..{end:#x}; choose a site no branch lands in"
    )]
    InteriorBranch {
        patchlet: String,
        from: u64,
        target: u64,
        at: u64,
        end: u64,
    },
    #[error(
        "patchlet {patchlet}: displaced = \"before\" runs the displaced instructions first, but the last one ({insn}) never falls through, so the patch code would never run; use \"after\" or \"drop\", or another site"
    )]
    CodeUnreachable { patchlet: String, insn: String },
    #[error("cannot run the assembler {program:?}: {source} (install binutils)")]
    AssemblerMissing {
        program: String,
        source: std::io::Error,
    },
    #[error("patchlet {patchlet}: assembly failed:\n{messages}")]
    AssemblyFailed { patchlet: String, messages: String },
    #[error("patchlet {patchlet}: {reason}")]
    ObjectInvalid { patchlet: String, reason: String },
    #[error(
        "patchlet {patchlet}: section {section} has content; patch code and data must live in .text"
    )]
    UnsupportedSection { patchlet: String, section: String },
    #[error(
        "patchlet {patchlet}: relocation type {r_type} against {symbol:?} at code offset {offset:#x} is not supported (use RIP-relative addressing)"
    )]
    UnsupportedRelocation {
        patchlet: String,
        r_type: u32,
        symbol: String,
        offset: u64,
    },
    #[error(
        "patchlet {patchlet}: unknown symbol {symbol:?}: not a builtin, not an [[import]], and not defined in the target's .symtab or .dynsym"
    )]
    UnknownSymbol { patchlet: String, symbol: String },
    #[error(
        "patchlet {patchlet}: {symbol:?} is both an [[import]] and a symbol of the target; rename the import"
    )]
    AmbiguousSymbol { patchlet: String, symbol: String },
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl BuildError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            BuildError::Io { .. } => "build.io",
            BuildError::SourceInvalid { .. } => "build.source_invalid",
            BuildError::TargetNotElf(e) => e.code(),
            BuildError::NotX86_64(_) => "build.not_x86_64",
            BuildError::HashMismatch { .. } => "build.hash_mismatch",
            BuildError::BuildIdMismatch { .. } => "build.buildid_mismatch",
            BuildError::BadAddress { .. } => "build.bad_address",
            BuildError::SiteNotExecutable { .. } => "build.site_not_executable",
            BuildError::OriginalMismatch { .. } => "build.original_mismatch",
            BuildError::Site { source, .. } => source.code(),
            BuildError::InteriorBranch { .. } => "build.interior_branch",
            BuildError::CodeUnreachable { .. } => "build.code_unreachable",
            BuildError::AssemblerMissing { .. } => "build.assembler_missing",
            BuildError::AssemblyFailed { .. } => "build.assembly_failed",
            BuildError::ObjectInvalid { .. } => "build.object_invalid",
            BuildError::UnsupportedSection { .. } => "build.unsupported_section",
            BuildError::UnsupportedRelocation { .. } => "build.unsupported_relocation",
            BuildError::UnknownSymbol { .. } => "build.unknown_symbol",
            BuildError::AmbiguousSymbol { .. } => "build.ambiguous_symbol",
            BuildError::Format(e) => e.code(),
        }
    }
}

fn invalid(reason: impl Into<String>) -> BuildError {
    BuildError::SourceInvalid {
        reason: reason.into(),
    }
}

fn parse_enum<T>(
    field: &str,
    value: &str,
    f: fn(&str) -> Option<T>,
    all: &[&str],
) -> Result<T, BuildError> {
    f(value).ok_or_else(|| {
        invalid(format!(
            "{field} = {value:?}: expected one of {}",
            all.join(", ")
        ))
    })
}

fn parse_hex(field: &str, s: &str) -> Result<Vec<u8>, BuildError> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(&compact).map_err(|e| invalid(format!("{field}: {s:?} is not hex bytes ({e})")))
}

/// Builds the patch in `patch_toml` against the target file `target`.
pub fn build_files(
    patch_toml: &Path,
    target: &Path,
    asm: &Assembler,
) -> Result<Bundle, BuildError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| BuildError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let text = String::from_utf8(read(patch_toml)?)
        .map_err(|_| invalid(format!("{} is not UTF-8", patch_toml.display())))?;
    let dir = patch_toml.parent().unwrap_or(Path::new("."));
    build(&text, dir, &read(target)?, asm)
}

/// Builds a patch source against the target module's bytes. `source_dir` resolves
/// `code_file` paths.
pub fn build(
    source_text: &str,
    source_dir: &Path,
    target: &[u8],
    asm: &Assembler,
) -> Result<Bundle, BuildError> {
    let src: PatchSource = toml::from_str(source_text).map_err(|e| invalid(e.to_string()))?;

    // Identity first: nothing else is meaningful against the wrong file.
    let expected_sha = parse_hex("target.sha256", &src.target.sha256)?;
    let found_sha = stitch_elf::sha256(target);
    if expected_sha != found_sha {
        return Err(BuildError::HashMismatch {
            expected: hex::encode(&expected_sha),
            found: hex::encode(found_sha),
        });
    }
    let elf = ElfFile::parse(target)?;
    if let Machine::Other(m) = elf.machine() {
        return Err(BuildError::NotX86_64(m));
    }
    let file_build_id = elf.build_id().map(<[u8]>::to_vec);
    let build_id = match (&src.target.build_id, &file_build_id) {
        (Some(want), found) => {
            let want = parse_hex("target.build_id", want)?;
            if found.as_ref() != Some(&want) {
                return Err(BuildError::BuildIdMismatch {
                    expected: hex::encode(&want),
                    found: found.as_ref().map_or("none".into(), hex::encode),
                });
            }
            Some(want)
        }
        (None, Some(found)) => {
            return Err(BuildError::BuildIdMismatch {
                expected: "none (build_id missing from patch.toml)".into(),
                found: hex::encode(found),
            });
        }
        (None, None) => None,
    };

    let imports: Vec<Import> = src
        .imports
        .iter()
        .map(|i| Import {
            name: i.name.clone(),
            module: i.module.clone(),
            symbol: i.symbol.clone().unwrap_or_else(|| i.name.clone()),
        })
        .collect();

    let mut patchlets = Vec::with_capacity(src.patchlets.len());
    for p in &src.patchlets {
        patchlets.push(build_patchlet(p, source_dir, &elf, &imports, asm)?);
    }

    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&found_sha);
    let patch = Patch {
        id: src.id,
        revision: src.revision,
        title: src.title,
        description: src.description,
        cves: src.cve,
        severity: parse_enum(
            "severity",
            &src.severity,
            Severity::from_name,
            &["low", "medium", "high", "critical"],
        )?,
        tier: parse_enum("tier", &src.tier, Tier::from_name, &["free", "pro"])?,
        author: src.author,
        target: Target {
            module: src.target.module,
            sha256,
            size: target.len() as u64,
            build_id,
            arch: parse_enum(
                "target.arch",
                &src.target.arch,
                Arch::from_name,
                &["x86_64"],
            )?,
            package: Package {
                ecosystem: parse_enum(
                    "target.package.ecosystem",
                    &src.target.package.ecosystem,
                    Ecosystem::from_name,
                    &["deb", "rpm", "pypi", "npm", "apk"],
                )?,
                name: src.target.package.name,
                version: src.target.package.version,
            },
        },
        imports,
        patchlets,
    };
    Ok(Bundle::new(patch)?)
}

/// Resolves a site location written as `0x1139`, `parse_header`, `parse_header+0x1c` or
/// `parse_header+28` to a virtual address of `elf`. The patch source's `at` and `stitch site`
/// both use this, so an author can paste one into the other. The error says what is wrong
/// with the text; callers add where it came from.
pub fn resolve_location(elf: &ElfFile<'_>, location: &str) -> Result<u64, String> {
    let location = location.trim();
    if let Some(h) = location.strip_prefix("0x") {
        return u64::from_str_radix(h, 16)
            .map_err(|_| format!("{location:?} is not a hex address"));
    }
    let (name, off) = match location.split_once('+') {
        Some((n, o)) => (n.trim(), o.trim()),
        None => (location, "0"),
    };
    let off = if let Some(h) = off.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        off.parse()
    }
    .map_err(|_| format!("{location:?}: offset {off:?} is not a number"))?;
    let sym = elf
        .symbol(name)
        .ok_or_else(|| format!("{location:?}: symbol {name:?} not found in .symtab or .dynsym"))?;
    Ok(sym.vaddr + off)
}

fn resolve_address(elf: &ElfFile<'_>, patchlet: &str, a: &Address) -> Result<u64, BuildError> {
    match a {
        Address::Number(n) => Ok(*n),
        Address::Expr(e) => resolve_location(elf, e).map_err(|reason| BuildError::BadAddress {
            patchlet: patchlet.to_string(),
            reason,
        }),
    }
}

fn build_patchlet(
    p: &PatchletSource,
    source_dir: &Path,
    elf: &ElfFile<'_>,
    imports: &[Import],
    asm: &Assembler,
) -> Result<Patchlet, BuildError> {
    let name = p.name.clone();
    let at = resolve_address(elf, &name, &p.at)?;
    let original = parse_hex(&format!("patchlet {name}: original"), &p.original)?;
    let displaced = parse_enum(
        &format!("patchlet {name}: displaced"),
        &p.displaced,
        Displaced::from_name,
        &["before", "after", "drop"],
    )?;
    let end = check_site(elf, &name, at, &original, displaced)?.end;
    let resume = match &p.resume {
        Some(r) => resolve_address(elf, &name, r)?,
        None => end,
    };
    if !elf.is_executable_range(resume, 1) {
        return Err(BuildError::BadAddress {
            patchlet: name,
            reason: format!("resume {resume:#x} is not in executable code of the target"),
        });
    }

    let source = match (&p.code, &p.code_file) {
        (Some(c), None) => c.clone(),
        (None, Some(f)) => {
            let path = source_dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| BuildError::Io { path, source })?
        }
        _ => {
            return Err(invalid(format!(
                "patchlet {name}: give exactly one of `code` and `code_file`"
            )));
        }
    };
    let assembled = asm.assemble(&name, &source)?;
    let relocs = assemble::resolve_relocations(&name, &assembled, elf, imports)?;
    Ok(Patchlet {
        name,
        at,
        original,
        displaced,
        resume,
        code: assembled.text,
        relocs,
        source,
    })
}

/// The checks a site must pass, against the target file: room for the jump, executable
/// code, exactly the `original` bytes, whole instructions with no call before the last, and
/// no direct branch anywhere in the module landing inside it, and — for `Before` — patch code
/// that can be reached at all. `stitch build`, `stitch site` and `stitch new` all decide
/// validity here.
pub fn check_site(
    elf: &ElfFile<'_>,
    name: &str,
    at: u64,
    original: &[u8],
    displaced: Displaced,
) -> Result<stitch_x86::Site, BuildError> {
    if original.len() < stitch_format::limits::MIN_ORIGINAL {
        return Err(BuildError::Format(FormatError::Malformed {
            field: "patchlets.original",
            reason: format!(
                "patchlet {name}: needs at least {} bytes for the jump, has {}",
                stitch_format::limits::MIN_ORIGINAL,
                original.len()
            ),
        }));
    }
    if !elf.is_executable_range(at, original.len() as u64) {
        return Err(BuildError::SiteNotExecutable {
            patchlet: name.to_string(),
            addr: at,
            len: original.len(),
        });
    }
    let found = elf.bytes_at(at, original.len())?;
    if found != original {
        return Err(BuildError::OriginalMismatch {
            patchlet: name.to_string(),
            addr: at,
            expected: hex_spaced(original),
            found: hex_spaced(found),
        });
    }
    let end = at + original.len() as u64;
    let site = stitch_x86::analyze_site(at, original).map_err(|source| BuildError::Site {
        patchlet: name.to_string(),
        source,
    })?;
    if displaced == Displaced::Before
        && let Some(insn) = site.ends_without_fall_through()
    {
        return Err(BuildError::CodeUnreachable {
            patchlet: name.to_string(),
            insn,
        });
    }
    for (start, len) in elf.executable_ranges() {
        let Ok(code) = elf.bytes_at(start, len as usize) else {
            continue;
        };
        if let Some(&(from, target)) =
            stitch_x86::find_interior_branches(code, start, at, end).first()
        {
            return Err(BuildError::InteriorBranch {
                patchlet: name.to_string(),
                from,
                target,
                at,
                end,
            });
        }
    }
    Ok(site)
}

/// `48 8b 45 f8`.
pub fn hex_spaced(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

//! The patch model: what a bundle says, field by field.
//!
//! Addresses are *module-relative virtual addresses*: the ELF `p_vaddr` space of the target
//! file, exactly as `objdump -d` and `readelf -s` print them. At run time the engine adds the
//! module's load bias (0 for a non-PIE executable).

use crate::error::FormatError;
use crate::limits::*;

/// Severity of the vulnerability a patch closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

/// Commercial tier: which plans receive the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Every organisation, including the free plan.
    Free,
    /// Paid plans only.
    Pro,
}

/// Instruction set of the target module. Only x86-64 exists today; the tag keeps room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
}

/// Packaging ecosystem of the package that ships the target module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ecosystem {
    Deb,
    Rpm,
    Pypi,
    Npm,
    Apk,
}

/// What happens to the instructions the 5-byte jump displaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Displaced {
    /// They run first (relocated), then the patch code.
    Before,
    /// The patch code runs first, then they run (relocated) on the fall-through path.
    After,
    /// They never run: the patch code replaces them.
    Drop,
}

/// Width and meaning of one relocation in patch code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelocKind {
    /// 32-bit PC-relative: value = S + A - P (from R_X86_64_PC32 / PLT32).
    Pc32,
    /// 64-bit absolute: value = S + A (from R_X86_64_64).
    Abs64,
    /// 32-bit PC-relative to an 8-byte slot that holds S: value = slot + A - P
    /// (from R_X86_64_GOTPCREL*; the engine provides the slot next to the code).
    GotPc32,
}

impl RelocKind {
    /// Bytes the relocation writes.
    pub fn width(self) -> usize {
        match self {
            RelocKind::Pc32 | RelocKind::GotPc32 => 4,
            RelocKind::Abs64 => 8,
        }
    }
}

/// What a relocation points at (the `S` of the formula).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelocTarget {
    /// A module-relative virtual address in the target module (symbols are resolved to this
    /// at build time against the real file).
    Module(u64),
    /// The n-th entry of [`Patch::imports`], resolved in the process at apply time.
    Import(u16),
    /// The end of this patchlet's code: the fall-through path, which runs the displaced
    /// instructions when [`Displaced::After`] and then jumps to `resume`.
    Continue,
    /// This patch's 8-byte hit counter in the process's Stitch region.
    HitCounter,
    /// The start of this patchlet's own code (for absolute references to its own labels).
    Code,
}

/// One fix-up the engine applies to patch code once the trampoline address is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reloc {
    /// Offset into [`Patchlet::code`] of the field to write.
    pub offset: u32,
    pub kind: RelocKind,
    pub target: RelocTarget,
    pub addend: i64,
}

/// A function of another module loaded in the process (e.g. libc's `abort`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Import {
    /// The name the assembly uses for it.
    pub name: String,
    /// File name (usually the soname) of the module that exports it, e.g. `libc.so.6`.
    pub module: String,
    /// The exported dynamic symbol, e.g. `abort`.
    pub symbol: String,
}

/// Package that ships the target module, so an agent can tell which installed application
/// a patch belongs to and whether it is relevant on a host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Package {
    pub ecosystem: Ecosystem,
    pub name: String,
    pub version: String,
}

/// A PyPI distribution's name in its normalised form (PEP 503: lower case, runs of `-`, `_`
/// and `.` as one `-`). Patches, `stitch new` and the agent's inventory all name `pypi`
/// packages this way (`pillow`, not `Pillow`), so the server can match them exactly.
pub fn normalize_pypi_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// The one exact module a patch applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// File name of the module (no directory): `libxml2.so.2.9.14`, `redis-server`.
    pub module: String,
    /// SHA-256 of the whole file: the primary identity.
    pub sha256: [u8; 32],
    /// Size of the file in bytes: lets an agent skip hashing files that cannot match.
    pub size: u64,
    /// GNU build-id (NT_GNU_BUILD_ID), when the file has one.
    pub build_id: Option<Vec<u8>>,
    pub arch: Arch,
    pub package: Package,
}

/// One site: the bytes replaced by a 5-byte jump and the code that runs instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Patchlet {
    /// Unique within the patch; used in messages and revert records.
    pub name: String,
    /// Module-relative virtual address of the first replaced byte.
    pub at: u64,
    /// The exact bytes expected at `at`: whole instructions, at least [`MIN_ORIGINAL`].
    pub original: Vec<u8>,
    /// Whether and where the replaced instructions run.
    pub displaced: Displaced,
    /// Module-relative virtual address where execution continues after the fall-through.
    pub resume: u64,
    /// Assembled patch code (position independent up to `relocs`).
    pub code: Vec<u8>,
    /// Fix-ups the engine applies to `code` at apply time.
    pub relocs: Vec<Reloc>,
    /// The assembly the code was built from, kept so a reviewer of the bundle can read it.
    pub source: String,
}

impl Patchlet {
    /// Module-relative address just past the replaced bytes.
    pub fn end(&self) -> u64 {
        self.at + self.original.len() as u64
    }
}

/// A micropatch: identity, target and sites.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Patch {
    /// Stable identifier, e.g. `ST-2026-0001`.
    pub id: String,
    /// Monotonic revision of this id; a higher revision supersedes a lower one.
    pub revision: u32,
    pub title: String,
    pub description: String,
    /// CVE ids, e.g. `CVE-2024-12345`.
    pub cves: Vec<String>,
    pub severity: Severity,
    pub tier: Tier,
    pub author: String,
    pub target: Target,
    pub imports: Vec<Import>,
    pub patchlets: Vec<Patchlet>,
}

fn malformed(field: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Malformed {
        field,
        reason: reason.into(),
    }
}

fn check_len(field: &'static str, len: usize, min: usize, max: usize) -> Result<(), FormatError> {
    if len > max {
        return Err(FormatError::LimitExceeded {
            field,
            limit: max as u64,
            found: len as u64,
        });
    }
    if len < min {
        return Err(malformed(
            field,
            format!("needs at least {min} bytes, has {len}"),
        ));
    }
    Ok(())
}

fn check_short(field: &'static str, s: &str) -> Result<(), FormatError> {
    check_len(field, s.len(), 1, MAX_SHORT_TEXT)?;
    if s.chars().any(char::is_control) {
        return Err(malformed(field, "contains a control character"));
    }
    Ok(())
}

/// `ST-2026-0001`: letters, a dash, a four-digit year, a dash, at least four digits.
fn is_patch_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && parts[0].bytes().all(|b| b.is_ascii_uppercase())
        && parts[1].len() == 4
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && parts[2].len() >= 4
        && parts[2].len() <= 12
        && parts[2].bytes().all(|b| b.is_ascii_digit())
}

/// `CVE-2024-12345`.
fn is_cve(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 3
        && parts[0] == "CVE"
        && parts[1].len() == 4
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && (4..=12).contains(&parts[2].len())
        && parts[2].bytes().all(|b| b.is_ascii_digit())
}

/// Module file names and symbol names: printable, no path separators, no whitespace.
fn check_name(field: &'static str, s: &str) -> Result<(), FormatError> {
    check_short(field, s)?;
    if s.contains('/') || s.contains(char::is_whitespace) || s == "." || s == ".." {
        return Err(malformed(field, format!("{s:?} is not a plain name")));
    }
    Ok(())
}

impl Patch {
    /// Checks every field against the format's rules and [`limits`](crate::limits).
    ///
    /// Encoding never needs this to succeed, but [`Bundle::new`](crate::Bundle::new) and the
    /// decoder call it, so no bundle with invalid fields is built or accepted.
    pub fn validate(&self) -> Result<(), FormatError> {
        check_short("id", &self.id)?;
        if !is_patch_id(&self.id) {
            return Err(malformed(
                "id",
                format!("{:?} is not of the form ST-2026-0001", self.id),
            ));
        }
        if self.revision == 0 {
            return Err(malformed("revision", "revisions start at 1"));
        }
        check_short("title", &self.title)?;
        check_len("description", self.description.len(), 0, MAX_LONG_TEXT)?;
        check_len("cves", self.cves.len(), 0, MAX_CVES)?;
        for cve in &self.cves {
            if !is_cve(cve) {
                return Err(malformed("cves", format!("{cve:?} is not a CVE id")));
            }
        }
        check_short("author", &self.author)?;
        check_name("target.module", &self.target.module)?;
        if self.target.size == 0 {
            return Err(malformed("target.size", "a module file is never empty"));
        }
        if let Some(id) = &self.target.build_id {
            check_len("target.build_id", id.len(), 1, MAX_BUILD_ID)?;
        }
        check_short("target.package.name", &self.target.package.name)?;
        check_short("target.package.version", &self.target.package.version)?;

        check_len("imports", self.imports.len(), 0, MAX_IMPORTS)?;
        for (i, imp) in self.imports.iter().enumerate() {
            check_name("imports.name", &imp.name)?;
            check_name("imports.module", &imp.module)?;
            check_name("imports.symbol", &imp.symbol)?;
            if self.imports[..i].iter().any(|o| o.name == imp.name) {
                return Err(malformed(
                    "imports.name",
                    format!("{:?} declared twice", imp.name),
                ));
            }
        }

        check_len("patchlets", self.patchlets.len(), 1, MAX_PATCHLETS)?;
        for (i, p) in self.patchlets.iter().enumerate() {
            self.validate_patchlet(p)?;
            for other in &self.patchlets[..i] {
                if other.name == p.name {
                    return Err(malformed(
                        "patchlets.name",
                        format!("{:?} used twice", p.name),
                    ));
                }
                if p.at < other.end() && other.at < p.end() {
                    return Err(malformed(
                        "patchlets.at",
                        format!("patchlets {:?} and {:?} overlap", other.name, p.name),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_patchlet(&self, p: &Patchlet) -> Result<(), FormatError> {
        check_name("patchlets.name", &p.name)?;
        check_len(
            "patchlets.original",
            p.original.len(),
            MIN_ORIGINAL,
            MAX_ORIGINAL,
        )?;
        if p.at.checked_add(p.original.len() as u64).is_none() {
            return Err(malformed("patchlets.at", "site wraps the address space"));
        }
        check_len("patchlets.code", p.code.len(), 0, MAX_CODE)?;
        check_len("patchlets.relocs", p.relocs.len(), 0, MAX_RELOCS)?;
        check_len("patchlets.source", p.source.len(), 0, MAX_LONG_TEXT)?;
        let mut covered: Vec<(usize, usize)> = Vec::with_capacity(p.relocs.len());
        for r in &p.relocs {
            let start = r.offset as usize;
            let end = start + r.kind.width();
            if end > p.code.len() {
                return Err(malformed(
                    "patchlets.relocs",
                    format!(
                        "{}: relocation at code offset {start:#x} runs past the code ({} bytes)",
                        p.name,
                        p.code.len()
                    ),
                ));
            }
            if covered.iter().any(|&(s, e)| start < e && s < end) {
                return Err(malformed(
                    "patchlets.relocs",
                    format!("{}: relocations overlap at code offset {start:#x}", p.name),
                ));
            }
            covered.push((start, end));
            if let RelocTarget::Import(i) = r.target
                && usize::from(i) >= self.imports.len()
            {
                return Err(malformed(
                    "patchlets.relocs",
                    format!("{}: import #{i} does not exist", p.name),
                ));
            }
        }
        Ok(())
    }

    /// Canonical encoding of the patch (the bundle body that signatures cover).
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode_patch(self)
    }
}

macro_rules! name_table {
    ($ty:ty { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in tag order.
            pub const ALL: &'static [$ty] = &[$(<$ty>::$variant),+];
            /// The lowercase name used in patch sources, JSON and the UI.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),+ }
            }
            /// Parses the lowercase name.
            pub fn from_name(s: &str) -> Option<Self> {
                match s { $($name => Some(<$ty>::$variant),)+ _ => None }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

name_table!(Severity { Low = "low", Medium = "medium", High = "high", Critical = "critical" });
name_table!(Tier { Free = "free", Pro = "pro" });
name_table!(Arch { X86_64 = "x86_64" });
name_table!(Ecosystem { Deb = "deb", Rpm = "rpm", Pypi = "pypi", Npm = "npm", Apk = "apk" });
name_table!(Displaced { Before = "before", After = "after", Drop = "drop" });

//! ELF parsing: header checks, PT_LOADs, build-id, symbols, code ranges.
//!
//! Everything is decoded once in [`ElfFile::parse`] so that a file is either
//! rejected up front or every later query is infallible apart from "not found".

use std::cmp::Reverse;
use std::fmt;

use object::LittleEndian;
use object::elf as abi;
use object::read::elf::{
    FileHeader as _, NoteIterator, ProgramHeader as _, SectionHeader as _, SectionTable, Sym as _,
    SymbolTable, VersionTable,
};

type Header = abi::FileHeader64<LittleEndian>;
const LE: LittleEndian = LittleEndian;
/// `e_ident` indices (object only exposes the ident as a struct).
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;

/// Errors from ELF parsing and from relating an ELF file to a process's mappings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ElfError {
    #[error("not an ELF file (bad magic)")]
    NotElf,
    #[error("unsupported ELF class {class}: only 64-bit ELF is supported")]
    Not64Bit { class: u8 },
    #[error("unsupported ELF data encoding {encoding}: only little-endian is supported")]
    NotLittleEndian { encoding: u8 },
    #[error("unsupported ELF type {e_type:#x}: only ET_EXEC and ET_DYN can be patched")]
    UnsupportedType { e_type: u16 },
    #[error("malformed ELF: {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("ELF machine {machine} is not x86_64")]
    NotX86_64 { machine: u16 },
    #[error("vaddr range {vaddr:#x}+{len:#x} is not file-backed by a single PT_LOAD")]
    VaddrNotMapped { vaddr: u64, len: usize },
    #[error("module has no private mappings to compute a load bias from")]
    ModuleEmpty,
    #[error("mapping at {start:#x} maps file offset {offset:#x}, which no PT_LOAD covers")]
    OffsetNotLoaded { start: u64, offset: u64 },
    #[error("mapping at {start:#x} (file offset {offset:#x}) contradicts load bias {bias:#x}")]
    BiasInconsistent { start: u64, offset: u64, bias: u64 },
}

impl ElfError {
    /// Stable machine-readable code; never changes once published.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotElf => "elf.not_elf",
            Self::Not64Bit { .. } => "elf.not_64bit",
            Self::NotLittleEndian { .. } => "elf.not_little_endian",
            Self::UnsupportedType { .. } => "elf.unsupported_type",
            Self::Malformed { .. } => "elf.malformed",
            Self::NotX86_64 { .. } => "elf.not_x86_64",
            Self::VaddrNotMapped { .. } => "elf.vaddr_not_mapped",
            Self::ModuleEmpty => "elf.module_empty",
            Self::OffsetNotLoaded { .. } => "elf.offset_not_loaded",
            Self::BiasInconsistent { .. } => "elf.bias_inconsistent",
        }
    }
}

/// Maps an `object` error into [`ElfError::Malformed`], naming the structure.
fn malformed(what: &'static str) -> impl FnOnce(object::read::Error) -> ElfError {
    move |e| ElfError::Malformed {
        what,
        detail: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Machine {
    X86_64,
    /// Raw `e_machine`.
    Other(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElfKind {
    /// `ET_EXEC`: loaded at its link-time addresses (load bias 0).
    Executable,
    /// `ET_DYN`: a PIE or a shared library, loaded at a bias chosen at runtime.
    SharedObject,
}

/// One `PT_LOAD` program header. `[vaddr, vaddr+filesz)` comes from the file at
/// `offset`; `[vaddr+filesz, vaddr+memsz)` is zero-fill (.bss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
}

/// A defined symbol. `name` is as stored in its table: `.dynsym` names are bare
/// (the version is in [`SymbolInfo::version`]); `.symtab` names may carry a
/// `@VER`/`@@VER` suffix, as GNU ld writes them.
///
/// `is_function` is true for `STT_FUNC` only. An `STT_GNU_IFUNC` symbol's address
/// is its *resolver*, not the implementation callers end up running, so treating
/// it as "the function" would patch code that never runs again; see
/// [`SymbolInfo::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub vaddr: u64,
    pub size: u64,
    pub is_function: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SymbolKind {
    Function,
    /// `STT_GNU_IFUNC`: the address is the resolver.
    Ifunc,
    Object,
    /// `STT_NOTYPE`: typically an assembler label.
    NoType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SymbolBinding {
    Local,
    /// Includes `STB_GNU_UNIQUE`, which binds like a global.
    Global,
    Weak,
}

/// Everything known about a defined symbol, for callers that need more than [`Symbol`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolInfo {
    pub symbol: Symbol,
    pub kind: SymbolKind,
    pub binding: SymbolBinding,
    /// Symbol version (e.g. `GLIBC_2.14`), if any.
    pub version: Option<String>,
    /// Unversioned, or the default (`@@`) version: what an unversioned reference binds to.
    pub default_version: bool,
    /// From `.dynsym` rather than `.symtab`.
    pub dynamic: bool,
}

/// A parsed 64-bit little-endian ELF executable or shared object. Cheap queries
/// over data decoded once at parse time; borrows the caller's bytes.
#[derive(Clone)]
pub struct ElfFile<'a> {
    data: &'a [u8],
    machine: Machine,
    kind: ElfKind,
    segments: Vec<LoadSegment>,
    build_id: Option<&'a [u8]>,
    /// `Some` iff the file has section headers: then code ranges come from
    /// sections, which exclude the ELF header and read-only data that a
    /// non-`-z separate-code` link puts in the executable PT_LOAD.
    exec_sections: Option<Vec<(u64, u64)>>,
    /// `.symtab` entries, then `.dynsym` entries from `dynsym_start` on.
    syms: Vec<SymEntry<'a>>,
    dynsym_start: usize,
    /// Indices into `syms`, sorted by address, for [`ElfFile::symbol_containing`].
    by_addr: Vec<usize>,
    /// Largest symbol size: bounds the backwards scan in `symbol_containing`.
    max_size: u64,
    /// Has a `PT_INTERP` (an executable asking for a dynamic loader).
    interp: bool,
    /// Its dynamic section names it (`DT_SONAME`): a shared library.
    soname: bool,
    /// `e_entry`.
    entry: u64,
    /// False for [`ElfFile::parse_layout`]: no symbol table was read.
    symbols_read: bool,
}

#[derive(Debug, Clone)]
struct SymEntry<'a> {
    name: &'a [u8],
    /// `name` without any version suffix: what lookups compare against.
    base: &'a [u8],
    version: Option<&'a [u8]>,
    default_version: bool,
    vaddr: u64,
    size: u64,
    kind: SymbolKind,
    binding: SymbolBinding,
    /// In `.dynsym`, global/weak, default/protected visibility: importable by other modules.
    exported: bool,
    dynamic: bool,
}

impl SymEntry<'_> {
    fn symbol(&self) -> Symbol {
        Symbol {
            name: String::from_utf8_lossy(self.name).into_owned(),
            vaddr: self.vaddr,
            size: self.size,
            is_function: self.kind == SymbolKind::Function,
        }
    }

    fn info(&self) -> SymbolInfo {
        SymbolInfo {
            symbol: self.symbol(),
            kind: self.kind,
            binding: self.binding,
            version: self
                .version
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            default_version: self.default_version,
            dynamic: self.dynamic,
        }
    }

    /// Lower is preferred when several symbols share a name: a global definition
    /// is the one the linker resolved references to; locals may be duplicated.
    fn binding_rank(&self) -> u8 {
        match self.binding {
            SymbolBinding::Global => 0,
            SymbolBinding::Weak => 1,
            SymbolBinding::Local => 2,
        }
    }
}

impl fmt::Debug for ElfFile<'_> {
    // Hand-written so that logging an ElfFile doesn't dump the whole binary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElfFile")
            .field("len", &self.data.len())
            .field("machine", &self.machine)
            .field("kind", &self.kind)
            .field("build_id", &self.build_id.map(hex::encode))
            .field("segments", &self.segments)
            .field("symbols", &self.syms.len())
            .finish()
    }
}

impl<'a> ElfFile<'a> {
    /// Parses and validates `data`. Accepts 64-bit little-endian `ET_EXEC`/`ET_DYN`
    /// of any machine. Rejects (rather than half-parses) truncated or inconsistent
    /// files: a PT_LOAD extending past the end of `data`, an unreadable section,
    /// symbol, version or note table are all [`ElfError::Malformed`].
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        Self::parse_with(data, true)
    }

    /// Like [`Self::parse`] but reads no symbol table, for callers that need the layout
    /// only — load segments, build-id, kind, entry, code ranges: the load-time hook plans
    /// under a hold, where collecting and sorting libc's symbols cost ~95 us of it (layout
    /// alone: a few us). Symbol tables are not validated either. The symbol lookups
    /// ([`Self::symbol`], [`Self::symbol_info`], [`Self::exported_symbol`],
    /// [`Self::symbols`], [`Self::symbol_containing`]) find nothing on it; debug builds
    /// assert they are not called.
    ///
    /// # Errors
    /// As [`Self::parse`], except for symbol and version tables.
    pub fn parse_layout(data: &'a [u8]) -> Result<Self, ElfError> {
        Self::parse_with(data, false)
    }

    fn parse_with(data: &'a [u8], read_symbols: bool) -> Result<Self, ElfError> {
        check_ident(data)?;
        let header = Header::parse(data).map_err(malformed("file header"))?;
        let kind = match header.e_type(LE) {
            abi::ET_EXEC => ElfKind::Executable,
            abi::ET_DYN => ElfKind::SharedObject,
            e_type => return Err(ElfError::UnsupportedType { e_type }),
        };
        let machine = match header.e_machine(LE) {
            abi::EM_X86_64 => Machine::X86_64,
            m => Machine::Other(m),
        };

        let phdrs = header
            .program_headers(LE, data)
            .map_err(malformed("program headers"))?;
        let mut segments = Vec::new();
        for ph in phdrs.iter().filter(|ph| ph.p_type(LE) == abi::PT_LOAD) {
            segments.push(load_segment(ph, data.len())?);
        }
        let interp = phdrs.iter().any(|ph| ph.p_type(LE) == abi::PT_INTERP);
        let mut soname = false;
        for ph in phdrs.iter() {
            if let Some(dynamic) = ph.dynamic(LE, data).map_err(malformed("PT_DYNAMIC"))? {
                soname |= dynamic
                    .iter()
                    .any(|d| d.d_tag.get(LE) == u64::from(abi::DT_SONAME));
            }
        }

        let sections = header
            .sections(LE, data)
            .map_err(malformed("section headers"))?;
        let build_id = find_build_id(phdrs, &sections, data)?;

        let exec_sections = (!sections.is_empty()).then(|| {
            let mut ranges: Vec<(u64, u64)> = sections
                .iter()
                .filter(|sh| {
                    let flags = sh.sh_flags(LE);
                    flags & u64::from(abi::SHF_ALLOC) != 0
                        && flags & u64::from(abi::SHF_EXECINSTR) != 0
                        && sh.sh_type(LE) != abi::SHT_NOBITS
                })
                .map(|sh| (sh.sh_addr(LE), sh.sh_size(LE)))
                // Section headers are not what the loader uses; keep only ranges
                // that really are executable file content, so every range
                // handed out can be read with `bytes_at` and patched.
                .filter(|&(addr, size)| {
                    size > 0 && segment_for(&segments, addr, size, true, true).is_some()
                })
                .collect();
            ranges.sort_unstable();
            ranges
        });

        let (syms, dynsym_start, by_addr, max_size) = if read_symbols {
            let symtab = sections
                .symbols(LE, data, abi::SHT_SYMTAB)
                .map_err(malformed(".symtab"))?;
            let dynsym = sections
                .symbols(LE, data, abi::SHT_DYNSYM)
                .map_err(malformed(".dynsym"))?;
            let versions = sections
                .versions(LE, data)
                .map_err(malformed("symbol versions"))?;
            let mut syms = collect_symbols(&symtab, None)?;
            let dynsym_start = syms.len();
            syms.extend(collect_symbols(&dynsym, Some(versions.as_ref()))?);

            let mut by_addr: Vec<usize> = (0..syms.len()).collect();
            by_addr.sort_by_key(|&i| syms[i].vaddr);
            let max_size = syms.iter().map(|s| s.size).max().unwrap_or(0);
            (syms, dynsym_start, by_addr, max_size)
        } else {
            (Vec::new(), 0, Vec::new(), 0)
        };

        Ok(Self {
            data,
            machine,
            kind,
            segments,
            build_id,
            exec_sections,
            syms,
            dynsym_start,
            by_addr,
            max_size,
            interp,
            soname,
            entry: header.e_entry(LE),
            symbols_read: read_symbols,
        })
    }

    /// Symbol lookups on a [`Self::parse_layout`] file are a caller's bug: it would find
    /// nothing and take that for an answer.
    fn symbols_wanted(&self) {
        debug_assert!(
            self.symbols_read,
            "symbol lookup on an ElfFile from parse_layout (use parse)"
        );
    }

    /// The bytes this file was parsed from.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// `NT_GNU_BUILD_ID` descriptor: from a `PT_NOTE` first (present even when
    /// section headers are stripped), else from an `SHT_NOTE` section. An empty
    /// descriptor counts as absent, since it cannot identify anything.
    pub fn build_id(&self) -> Option<&'a [u8]> {
        self.build_id
    }

    /// [`Self::build_id`] as lowercase hex, the form `readelf -n` and `file` print.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.map(hex::encode)
    }

    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// Errors with [`ElfError::NotX86_64`] unless this is an x86_64 binary.
    pub fn require_x86_64(&self) -> Result<(), ElfError> {
        match self.machine {
            Machine::X86_64 => Ok(()),
            Machine::Other(machine) => Err(ElfError::NotX86_64 { machine }),
        }
    }

    pub fn kind(&self) -> ElfKind {
        self.kind
    }

    /// Whether this file looks like a dynamic loader (`ld.so`): `ET_DYN`, no `PT_INTERP`, an
    /// entry point and a `DT_SONAME` (a static PIE executable has the first three, not the
    /// soname). The kernel opens and maps such a file *inside* the exec of every program
    /// naming it as `PT_INTERP`.
    pub fn is_interpreter(&self) -> bool {
        self.kind == ElfKind::SharedObject && !self.interp && self.entry != 0 && self.soname
    }

    /// Whether this file is loaded as a library rather than exec'd: `ET_DYN` without
    /// `PT_INTERP` (a plain shared object, or a dynamic loader), or with a `DT_SONAME` (a
    /// library that can also run, like `libc.so.6`). A PIE executable (interpreter, no
    /// soname) is not.
    pub fn is_library(&self) -> bool {
        self.kind == ElfKind::SharedObject && (!self.interp || self.soname)
    }

    /// `PT_LOAD` segments in program-header order.
    pub fn load_segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// File offset of `[vaddr, vaddr+len)` if a single PT_LOAD backs all of it
    /// with file content (`len == 0` asks about the single address `vaddr`).
    pub fn vaddr_to_offset(&self, vaddr: u64, len: u64) -> Option<u64> {
        let seg = segment_for(&self.segments, vaddr, len.max(1), true, false)?;
        Some(seg.offset + (vaddr - seg.vaddr))
    }

    /// The file bytes of `[vaddr, vaddr+len)`. Fails unless one PT_LOAD covers the
    /// whole range with file content: zero-fill (.bss) has no bytes to compare or
    /// patch, and a range straddling segments may straddle different mappings.
    pub fn bytes_at(&self, vaddr: u64, len: usize) -> Result<&'a [u8], ElfError> {
        let not_mapped = ElfError::VaddrNotMapped { vaddr, len };
        let offset = u64::try_from(len)
            .ok()
            .and_then(|len64| self.vaddr_to_offset(vaddr, len64))
            .and_then(|off| usize::try_from(off).ok())
            .ok_or_else(|| not_mapped.clone())?;
        // `get`, not indexing: parse() guarantees the range is in bounds, but a
        // bug there must surface as an error, never a panic.
        offset
            .checked_add(len)
            .and_then(|end| self.data.get(offset..end))
            .ok_or(not_mapped)
    }

    /// Whether `[vaddr, vaddr+len)` lies entirely inside one executable PT_LOAD
    /// (its in-memory extent). An empty range is never executable.
    pub fn is_executable_range(&self, vaddr: u64, len: u64) -> bool {
        len > 0 && segment_for(&self.segments, vaddr, len, false, true).is_some()
    }

    /// Looks `name` up among defined symbols, `.symtab` first, then `.dynsym`.
    ///
    /// `name@VER` matches version `VER` (default or not); `name@@VER` only the
    /// default version `VER`. A plain `name` matches an unversioned or
    /// default-version symbol, or failing that a sole non-default version (what
    /// glibc's `dlsym` does). Among equal matches, global beats weak beats local.
    /// Symbols need section headers: a fully stripped file has none to find.
    pub fn symbol(&self, name: &str) -> Option<Symbol> {
        self.symbol_info(name).map(|info| info.symbol)
    }

    /// Like [`Self::symbol`] but with kind, binding and version.
    pub fn symbol_info(&self, name: &str) -> Option<SymbolInfo> {
        self.symbols_wanted();
        let (symtab, dynsym) = self.syms.split_at(self.dynsym_start);
        lookup(symtab, name, false)
            .or_else(|| lookup(dynsym, name, false))
            .map(SymEntry::info)
    }

    /// A symbol another module can bind to at runtime: defined in `.dynsym`,
    /// global or weak, default or protected visibility. Version rules as in
    /// [`Self::symbol`], so a plain name gets the default version.
    pub fn exported_symbol(&self, name: &str) -> Option<Symbol> {
        self.symbols_wanted();
        lookup(&self.syms[self.dynsym_start..], name, true).map(SymEntry::symbol)
    }

    /// Every defined symbol (`.symtab` then `.dynsym`), for listings and indexing.
    pub fn symbols(&self) -> impl Iterator<Item = SymbolInfo> + '_ {
        self.symbols_wanted();
        self.syms.iter().map(SymEntry::info)
    }

    /// The symbol `vaddr` falls in, and the offset into it. Prefers, in order: a
    /// sized symbol over a zero-size label at exactly `vaddr`, a function, the
    /// innermost (highest start), global over local, `.symtab` over `.dynsym`.
    pub fn symbol_containing(&self, vaddr: u64) -> Option<(Symbol, u64)> {
        self.symbols_wanted();
        let end = self
            .by_addr
            .partition_point(|&i| self.syms[i].vaddr <= vaddr);
        let mut best: Option<(_, usize)> = None;
        for &i in self.by_addr[..end].iter().rev() {
            let s = &self.syms[i];
            let delta = vaddr - s.vaddr; // partition_point guarantees s.vaddr <= vaddr
            if delta > self.max_size {
                break; // every earlier symbol starts even further away
            }
            let contains = if s.size == 0 {
                delta == 0
            } else {
                delta < s.size
            };
            if !contains {
                continue;
            }
            let key = (
                s.size != 0,
                s.kind == SymbolKind::Function,
                s.vaddr,
                Reverse(s.binding_rank()),
                !s.dynamic,
                Reverse(i),
            );
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, i));
            }
        }
        best.map(|(_, i)| (self.syms[i].symbol(), vaddr - self.syms[i].vaddr))
    }

    /// `(vaddr, len)` ranges of code to scan, sorted: executable allocated
    /// sections (`.init`, `.plt`, `.text`, ...) that lie in an executable PT_LOAD
    /// when section headers exist, else the file-backed part of each executable
    /// PT_LOAD. Every range is readable with [`Self::bytes_at`].
    pub fn executable_ranges(&self) -> Vec<(u64, u64)> {
        match &self.exec_sections {
            Some(ranges) => ranges.clone(),
            None => {
                let mut ranges: Vec<(u64, u64)> = self
                    .segments
                    .iter()
                    .filter(|s| s.executable && s.filesz > 0)
                    .map(|s| (s.vaddr, s.filesz))
                    .collect();
                ranges.sort_unstable();
                ranges
            }
        }
    }
}

/// Classifies the `e_ident` bytes ourselves so that the common "wrong kind of
/// file" cases get a precise error instead of object's generic one.
fn check_ident(data: &[u8]) -> Result<(), ElfError> {
    if !data.starts_with(&abi::ELFMAG) {
        return Err(ElfError::NotElf);
    }
    match data.get(EI_CLASS) {
        Some(&abi::ELFCLASS64) => {}
        Some(&class) => return Err(ElfError::Not64Bit { class }),
        None => return Err(truncated_header()),
    }
    match data.get(EI_DATA) {
        Some(&abi::ELFDATA2LSB) => Ok(()),
        Some(&encoding) => Err(ElfError::NotLittleEndian { encoding }),
        None => Err(truncated_header()),
    }
}

fn truncated_header() -> ElfError {
    ElfError::Malformed {
        what: "file header",
        detail: "truncated e_ident".into(),
    }
}

/// Converts and validates one PT_LOAD so later arithmetic cannot overflow and
/// every file range is inside `data`.
fn load_segment(
    ph: &abi::ProgramHeader64<LittleEndian>,
    data_len: usize,
) -> Result<LoadSegment, ElfError> {
    let seg = LoadSegment {
        vaddr: ph.p_vaddr(LE),
        memsz: ph.p_memsz(LE),
        offset: ph.p_offset(LE),
        filesz: ph.p_filesz(LE),
        readable: ph.p_flags(LE) & abi::PF_R != 0,
        writable: ph.p_flags(LE) & abi::PF_W != 0,
        executable: ph.p_flags(LE) & abi::PF_X != 0,
    };
    let bad = |detail: String| {
        Err(ElfError::Malformed {
            what: "PT_LOAD",
            detail,
        })
    };
    if seg.filesz > seg.memsz {
        return bad(format!(
            "p_filesz {:#x} > p_memsz {:#x}",
            seg.filesz, seg.memsz
        ));
    }
    if seg.vaddr.checked_add(seg.memsz).is_none() {
        return bad(format!(
            "p_vaddr {:#x} + p_memsz {:#x} overflows",
            seg.vaddr, seg.memsz
        ));
    }
    let in_file = seg
        .offset
        .checked_add(seg.filesz)
        .is_some_and(|end| end <= data_len as u64);
    if !in_file {
        return bad(format!(
            "file range {:#x}+{:#x} extends past end of file ({:#x} bytes): truncated?",
            seg.offset, seg.filesz, data_len
        ));
    }
    Ok(seg)
}

/// First segment containing all of `[vaddr, vaddr+len)` (`len > 0`), measured
/// against its file-backed size if `file_backed`, else its memory size.
fn segment_for(
    segments: &[LoadSegment],
    vaddr: u64,
    len: u64,
    file_backed: bool,
    executable: bool,
) -> Option<&LoadSegment> {
    let end = vaddr.checked_add(len)?;
    segments.iter().find(|s| {
        let size = if file_backed { s.filesz } else { s.memsz };
        // No overflow: load_segment checked vaddr + memsz, and filesz <= memsz.
        (!executable || s.executable) && vaddr >= s.vaddr && end <= s.vaddr + size
    })
}

fn find_build_id<'a>(
    phdrs: &'a [abi::ProgramHeader64<LittleEndian>],
    sections: &SectionTable<'a, Header>,
    data: &'a [u8],
) -> Result<Option<&'a [u8]>, ElfError> {
    for ph in phdrs {
        if let Some(notes) = ph.notes(LE, data).map_err(malformed("PT_NOTE"))?
            && let Some(id) = build_id_in(notes)?
        {
            return Ok(Some(id));
        }
    }
    for sh in sections.iter() {
        if let Some(notes) = sh.notes(LE, data).map_err(malformed("SHT_NOTE section"))?
            && let Some(id) = build_id_in(notes)?
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

fn build_id_in<'a>(mut notes: NoteIterator<'a, Header>) -> Result<Option<&'a [u8]>, ElfError> {
    while let Some(note) = notes.next().map_err(malformed("note"))? {
        if note.name() == abi::ELF_NOTE_GNU
            && note.n_type(LE) == abi::NT_GNU_BUILD_ID
            && !note.desc().is_empty()
        {
            return Ok(Some(note.desc()));
        }
    }
    Ok(None)
}

/// Defined, addressable symbols of one table. `versions` is `Some` for
/// `.dynsym` (inner `None`: no `.gnu.version`, so everything is unversioned);
/// `.symtab` names carry their version inline instead.
fn collect_symbols<'a>(
    table: &SymbolTable<'a, Header>,
    versions: Option<Option<&VersionTable<'a, Header>>>,
) -> Result<Vec<SymEntry<'a>>, ElfError> {
    let dynamic = versions.is_some();
    let mut out = Vec::new();
    for (index, sym) in table.enumerate() {
        let shndx = sym.st_shndx(LE);
        // Undefined symbols are imports; SHN_ABS/SHN_COMMON values are not
        // addresses in this file's image (SHN_XINDEX is a real section).
        if shndx == abi::SHN_UNDEF || (shndx >= abi::SHN_LORESERVE && shndx != abi::SHN_XINDEX) {
            continue;
        }
        let kind = match sym.st_type() {
            abi::STT_FUNC => SymbolKind::Function,
            abi::STT_GNU_IFUNC => SymbolKind::Ifunc,
            abi::STT_OBJECT => SymbolKind::Object,
            abi::STT_NOTYPE => SymbolKind::NoType,
            // STT_TLS values are TLS-block offsets; SECTION/FILE are not symbols
            // anyone names.
            _ => continue,
        };
        let binding = match sym.st_bind() {
            abi::STB_LOCAL => SymbolBinding::Local,
            abi::STB_GLOBAL | abi::STB_GNU_UNIQUE => SymbolBinding::Global,
            abi::STB_WEAK => SymbolBinding::Weak,
            _ => continue,
        };
        let name = table
            .symbol_name(LE, sym)
            .map_err(malformed("symbol name"))?;
        if name.is_empty() {
            continue;
        }
        let (base, version, default_version) = match versions {
            None => split_version(name),
            Some(None) => (name, None, true),
            Some(Some(table)) => {
                let vi = table.version_index(LE, index);
                let version = table
                    .version(vi)
                    .map_err(malformed("symbol version index"))?;
                (name, version.map(|v| v.name()), !vi.is_hidden())
            }
        };
        out.push(SymEntry {
            name,
            base,
            version,
            default_version,
            vaddr: sym.st_value(LE),
            size: sym.st_size(LE),
            kind,
            binding,
            exported: dynamic
                && binding != SymbolBinding::Local
                && matches!(sym.st_visibility(), abi::STV_DEFAULT | abi::STV_PROTECTED),
            dynamic,
        });
    }
    Ok(out)
}

/// Splits `name@VER` / `name@@VER` into (base, version, is_default). Used for
/// `.symtab` names and for callers' queries alike.
fn split_version(name: &[u8]) -> (&[u8], Option<&[u8]>, bool) {
    match name.iter().position(|&b| b == b'@') {
        None => (name, None, true),
        Some(at) => match &name[at + 1..] {
            [b'@', version @ ..] => (&name[..at], Some(version), true),
            version => (&name[..at], Some(version), false),
        },
    }
}

fn lookup<'s, 'a>(
    table: &'s [SymEntry<'a>],
    query: &str,
    exported_only: bool,
) -> Option<&'s SymEntry<'a>> {
    let (base, version, need_default) = split_version(query.as_bytes());
    let named = || {
        table
            .iter()
            .filter(move |s| s.base == base && (!exported_only || s.exported))
    };
    // min_by_key keeps the first of equals, so table order breaks ties.
    let best = |wanted: &dyn Fn(&SymEntry<'a>) -> bool| {
        named()
            .filter(|s| wanted(s))
            .min_by_key(|s| s.binding_rank())
    };
    match version {
        Some(v) => best(&|s| s.version == Some(v) && (s.default_version || !need_default)),
        None => best(&|s| s.default_version).or_else(|| {
            // Only non-default versions exist: like glibc, bind one only if unambiguous.
            let mut all = named();
            let only = all.next()?;
            all.next().is_none().then_some(only)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header: magic, class, data, version; the rest zero.
    fn ident(class: u8, data: u8) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&abi::ELFMAG);
        h[EI_CLASS] = class;
        h[EI_DATA] = data;
        h[6] = abi::EV_CURRENT;
        h
    }

    #[test]
    fn non_elf_is_rejected_with_not_elf() {
        for data in [&b""[..], b"\x7fEL", b"#!/bin/sh\n", b"MZ\x90\x00"] {
            assert_eq!(ElfFile::parse(data).unwrap_err().code(), "elf.not_elf");
        }
    }

    #[test]
    fn elf32_is_rejected_as_not_64bit() {
        let err = ElfFile::parse(&ident(abi::ELFCLASS32, abi::ELFDATA2LSB)).unwrap_err();
        assert_eq!(
            err,
            ElfError::Not64Bit {
                class: abi::ELFCLASS32
            }
        );
        assert_eq!(err.code(), "elf.not_64bit");
    }

    #[test]
    fn big_endian_is_rejected() {
        let err = ElfFile::parse(&ident(abi::ELFCLASS64, abi::ELFDATA2MSB)).unwrap_err();
        assert_eq!(err.code(), "elf.not_little_endian");
    }

    #[test]
    fn header_only_truncation_is_malformed() {
        let h = ident(abi::ELFCLASS64, abi::ELFDATA2LSB);
        assert_eq!(ElfFile::parse(&h[..5]).unwrap_err().code(), "elf.malformed");
        assert_eq!(
            ElfFile::parse(&h[..40]).unwrap_err().code(),
            "elf.malformed"
        );
    }

    #[test]
    fn relocatable_type_is_rejected() {
        let mut h = ident(abi::ELFCLASS64, abi::ELFDATA2LSB);
        h[16] = abi::ET_REL as u8;
        assert_eq!(
            ElfFile::parse(&h).unwrap_err(),
            ElfError::UnsupportedType {
                e_type: abi::ET_REL
            }
        );
    }

    #[test]
    fn empty_exec_without_headers_parses_to_nothing() {
        // No program or section headers at all: valid, just useless.
        let mut h = ident(abi::ELFCLASS64, abi::ELFDATA2LSB);
        h[16] = abi::ET_EXEC as u8;
        h[18] = abi::EM_X86_64 as u8;
        let f = ElfFile::parse(&h).unwrap();
        assert_eq!(f.kind(), ElfKind::Executable);
        assert_eq!(f.machine(), Machine::X86_64);
        assert!(f.load_segments().is_empty() && f.executable_ranges().is_empty());
        assert_eq!(f.build_id(), None);
        assert_eq!(f.symbol("main"), None);
        assert_eq!(f.symbol_containing(0), None);
        assert_eq!(f.bytes_at(0, 0).unwrap_err().code(), "elf.vaddr_not_mapped");
    }

    #[test]
    fn foreign_machine_parses_but_fails_require_x86_64() {
        let mut h = ident(abi::ELFCLASS64, abi::ELFDATA2LSB);
        h[16] = abi::ET_DYN as u8;
        h[18] = abi::EM_AARCH64 as u8;
        let f = ElfFile::parse(&h).unwrap();
        assert_eq!(f.machine(), Machine::Other(abi::EM_AARCH64));
        assert_eq!(f.require_x86_64().unwrap_err().code(), "elf.not_x86_64");
    }

    #[test]
    fn versioned_names_split_into_base_version_default() {
        assert_eq!(split_version(b"memcpy"), (&b"memcpy"[..], None, true));
        assert_eq!(
            split_version(b"memcpy@@GLIBC_2.14"),
            (&b"memcpy"[..], Some(&b"GLIBC_2.14"[..]), true)
        );
        assert_eq!(
            split_version(b"memcpy@GLIBC_2.2.5"),
            (&b"memcpy"[..], Some(&b"GLIBC_2.2.5"[..]), false)
        );
    }
}

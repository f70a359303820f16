//! Planning: everything about an apply that can be decided without stopping the process.
//! A [`Plan`] is plain data — printed by `stitch apply --dry-run`, compared in tests.

use stitch_elf::ElfFile;
use stitch_format::{Patch, VerifiedBundle};
use stitch_sys::Pid;
use stitch_x86::{LinkContext, link_patchlet};

use stitch_elf::maps::{MapEntry, MapPath, Module};

use crate::identify::{
    FileKey, KnownMapping, MappedModule, dev_split, file_name, maybe_region, read_maps,
    stat_mapped_range,
};
use crate::region::{self, PatchRecord, RegionHeader};
use crate::{Engine, EngineError};

/// Where the trampolines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionPlan {
    /// The module already has a Stitch region at this address (reused).
    Existing { addr: u64 },
    /// A new region, proposed at `addr` (the first free range near the module; apply falls
    /// back to the next one if it is taken by then).
    New { addr: u64 },
}

impl RegionPlan {
    /// The region address the plan was linked for.
    pub fn addr(&self) -> u64 {
        match self {
            RegionPlan::Existing { addr } | RegionPlan::New { addr } => *addr,
        }
    }
}

/// One site as it will be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSite {
    pub patchlet: String,
    /// Runtime address of the site.
    pub addr: u64,
    /// Bytes that must be there now.
    pub original: Vec<u8>,
    /// Bytes that will be written there (jump + int3 padding).
    pub new_bytes: Vec<u8>,
    /// Runtime address of this patchlet's trampoline.
    pub tramp_addr: u64,
    /// Trampoline bytes.
    pub trampoline: Vec<u8>,
}

/// Everything `apply` will do to one process, decided in advance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub pid: Pid,
    pub patch_id: String,
    pub revision: u32,
    pub patch_digest: [u8; 32],
    pub module_path: String,
    pub module_sha256: [u8; 32],
    pub module_bias: u64,
    pub module_start: u64,
    pub module_end: u64,
    pub region: RegionPlan,
    /// Offset in the region where the patch record goes.
    pub record_offset: u64,
    /// Offset in the region where the first trampoline goes.
    pub tramp_offset: u64,
    /// Resolved import addresses, by import index.
    pub imports: Vec<u64>,
    pub sites: Vec<PlannedSite>,
    /// The record as it will be written (state `Applying`, then `Applied`).
    pub record: PatchRecord,
}

/// 2 GiB minus room for the region itself and the module's size: every byte of a region must
/// be reachable with rel32 from every site and vice versa.
pub(crate) const REACH: u64 = (1 << 31) - (1 << 20);

impl Engine {
    /// Finds the target module in `pid` and plans the apply. Reads `/proc` only; the process
    /// keeps running.
    pub fn plan(&self, pid: Pid, bundle: &VerifiedBundle) -> Result<Plan, EngineError> {
        let patch = bundle.patch();
        let entries = read_maps(pid)?;
        let module = self.find_target(pid, &entries, patch)?;
        let bytes = self.digests.module_bytes(pid, &module.module)?;
        // Layout only (segments, build-id, code ranges): the target's symbols are not needed
        // to plan, and collecting them cost ~95 us for libc.
        let elf = ElfFile::parse_layout(&bytes[..]).map_err(|e| EngineError::ModuleLayout {
            pid: pid.0,
            path: module.path.display().to_string(),
            reason: e.to_string(),
        })?;
        check_build_id(pid, &module.path, &elf, patch)?;
        let bias = module
            .module
            .load_bias(&elf)
            .map_err(|e| EngineError::ModuleLayout {
                pid: pid.0,
                path: module.path.display().to_string(),
                reason: e.to_string(),
            })?;
        // Every site must be mapped executable right now (a library mid-load is not yet).
        check_sites_mapped(pid, &module.module, &elf, patch)?;
        let imports = self.resolve_imports(pid, &entries, patch)?;
        let span = ModuleSpan {
            path: module.path.display().to_string(),
            sha256: module.sha256,
            bias,
            start: module.start,
            end: module.end,
        };
        let existing = find_region(pid, &entries, &span)?;
        let (region_plan, header) = match existing {
            Some((addr, header)) => (RegionPlan::Existing { addr }, header),
            None => {
                let addr = propose_region(&entries, &span).ok_or(EngineError::NoFreeRange {
                    pid: pid.0,
                    near: module.start,
                })?;
                (
                    RegionPlan::New { addr },
                    RegionHeader::new(module.sha256, bias),
                )
            }
        };
        if patch.id.len() > region::MAX_ID {
            return Err(EngineError::IdTooLong {
                id: patch.id.clone(),
                max: region::MAX_ID,
            });
        }
        if let Some(r) = header.records.iter().find(|r| {
            r.id == patch.id
                && crate::apply::state_in_effect(pid, r) != region::RecordState::Reverted
        }) {
            // A record whose sites do not carry its jumps (a patcher killed mid-apply or
            // mid-revert; a library unloaded and loaded again at the same address, whose
            // fresh copy has the original bytes) is settled under the stop by `commit`;
            // here, only a patch that is in place refuses.
            return Err(EngineError::AlreadyApplied {
                pid: pid.0,
                id: r.id.clone(),
                revision: r.revision,
            });
        }
        let digest = bundle.bundle().patch_digest();
        match link_plan(
            pid,
            patch,
            digest,
            &span,
            region_plan,
            &header,
            imports.clone(),
        ) {
            // The region is full (of reverted patches, typically): `commit` decides under the
            // stop whether it can be started afresh or a second region is needed.
            Err(EngineError::RegionFull { .. }) => {
                let addr = propose_region(&entries, &span).ok_or(EngineError::NoFreeRange {
                    pid: pid.0,
                    near: module.start,
                })?;
                link_plan(
                    pid,
                    patch,
                    digest,
                    &span,
                    RegionPlan::New { addr },
                    &RegionHeader::new(module.sha256, bias),
                    imports,
                )
            }
            other => other,
        }
    }

    /// [`Engine::plan`] for a module whose mapping the caller watched being made (the
    /// load-time hook, at the exit of the `mmap(PROT_EXEC)` of the file the process opened;
    /// see [`KnownMapping`]): no read of `/proc/PID/maps`, no `stat` of `map_files`. The
    /// module's digest comes from the cache by the caller's key; build-id, bias and "every
    /// site mapped executable" are decided from the ELF and that executable mapping. The
    /// region is only a proposal (just below the module): existing regions, their records and
    /// free ranges are looked at under the stop by [`Engine::commit_known`], which also checks
    /// the mapping, the inode and the bias against the maps read there. A patch with imports
    /// finds the modules it imports from by asking for the executable mappings one by one
    /// (the maps read whole on a kernel without `PROCMAP_QUERY`); the target itself is still
    /// the known mapping. A key whose digest or bytes are not at hand takes the full
    /// [`Engine::plan`].
    pub fn plan_mapped(
        &self,
        pid: Pid,
        bundle: &VerifiedBundle,
        known: &KnownMapping,
    ) -> Result<Plan, EngineError> {
        let patch = bundle.patch();
        let Some(sha256) = self.digests.digest_for_key(&known.key) else {
            return self.plan(pid, bundle);
        };
        if sha256 != patch.target.sha256 || known.key.size != patch.target.size {
            return Err(EngineError::ModuleNotMapped {
                pid: pid.0,
                sha256: hex::encode(patch.target.sha256),
            });
        }
        let range = (known.exec_start, known.exec_end);
        let Some(bytes) = self
            .digests
            .bytes_for_key(pid, &known.key, range, &known.path)?
        else {
            return self.plan(pid, bundle);
        };
        let elf = ElfFile::parse_layout(&bytes[..]).map_err(|e| EngineError::ModuleLayout {
            pid: pid.0,
            path: known.path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.plan_known_elf(pid, bundle, known, sha256, &elf)
    }

    /// [`Engine::plan_mapped`] once the file's ELF is parsed.
    fn plan_known_elf(
        &self,
        pid: Pid,
        bundle: &VerifiedBundle,
        known: &KnownMapping,
        sha256: [u8; 32],
        elf: &ElfFile<'_>,
    ) -> Result<Plan, EngineError> {
        let patch = bundle.patch();
        let shown = known.path.display().to_string();
        let layout = |reason: String| EngineError::ModuleLayout {
            pid: pid.0,
            path: shown.clone(),
            reason,
        };
        check_build_id(pid, &known.path, elf, patch)?;
        let module = known_module(known);
        let bias = module.load_bias(elf).map_err(|e| layout(e.to_string()))?;
        check_sites_mapped(pid, &module, elf, patch)?;
        let imports = if patch.imports.is_empty() {
            Vec::new()
        } else if let Some(found) = self.resolve_imports_asking(pid, patch)? {
            found
        } else {
            self.resolve_imports(pid, &read_maps(pid)?, patch)?
        };
        let (start, end) = elf_span(elf, bias).ok_or_else(|| layout("no PT_LOAD".into()))?;
        if patch.id.len() > region::MAX_ID {
            return Err(EngineError::IdTooLong {
                id: patch.id.clone(),
                max: region::MAX_ID,
            });
        }
        let span = ModuleSpan {
            path: shown.clone(),
            sha256,
            bias,
            start,
            end,
        };
        let addr = start
            .checked_sub(region::REGION_SIZE)
            .ok_or(EngineError::NoFreeRange {
                pid: pid.0,
                near: start,
            })?;
        link_plan(
            pid,
            patch,
            bundle.bundle().patch_digest(),
            &span,
            RegionPlan::New { addr },
            &RegionHeader::new(sha256, bias),
            imports,
        )
    }

    /// For an executable just exec'd (the load-time hook at `PTRACE_EVENT_EXEC`):
    /// [`Engine::plan_mapped`] for its executable segment holding the patch's sites, found from
    /// the address its program headers are mapped at (`AT_PHDR` of the new program) and the
    /// file the exec opened (`key`) — one ELF parse, no `/proc` read. `Ok(None)` — take
    /// [`Engine::plan`] — when the patch has imports, the file's digest or bytes are not in
    /// the cache, or the sites are not all in one executable `PT_LOAD`. Nothing here is
    /// trusted: [`Engine::commit_known`] checks the mapping, inode and file offsets against
    /// the maps under the stop.
    pub fn plan_from_phdr(
        &self,
        pid: Pid,
        bundle: &VerifiedBundle,
        path: &std::path::Path,
        key: FileKey,
        at_phdr: u64,
    ) -> Result<Option<(KnownMapping, Plan)>, EngineError> {
        const PAGE: u64 = 4096;
        let patch = bundle.patch();
        if !patch.imports.is_empty() {
            return Ok(None);
        }
        let Some(sha256) = self.digests.digest_for_key(&key) else {
            return Ok(None);
        };
        if sha256 != patch.target.sha256 || key.size != patch.target.size {
            return Err(EngineError::ModuleNotMapped {
                pid: pid.0,
                sha256: hex::encode(patch.target.sha256),
            });
        }
        let Some(bytes) = self.digests.cached_bytes_of(&key) else {
            return Ok(None);
        };
        let Ok(elf) = ElfFile::parse_layout(&bytes[..]) else {
            return Ok(None);
        };
        let Some(phoff) = bytes
            .get(0x20..0x28)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
        else {
            return Ok(None);
        };
        let segs = elf.load_segments();
        let Some(holding) = segs
            .iter()
            .find(|s| s.offset <= phoff && phoff < s.offset.saturating_add(s.filesz))
        else {
            return Ok(None);
        };
        let phdr_vaddr = holding
            .vaddr
            .wrapping_sub(holding.offset)
            .wrapping_add(phoff);
        let bias = at_phdr.wrapping_sub(phdr_vaddr);
        let Some(first) = patch.patchlets.first() else {
            return Ok(None);
        };
        let Some(seg) = segs.iter().find(|s| {
            s.executable && s.vaddr <= first.at && first.at < s.vaddr.saturating_add(s.filesz)
        }) else {
            return Ok(None);
        };
        let inside = |at: u64, len: u64| {
            at >= seg.vaddr && at.saturating_add(len) <= seg.vaddr.saturating_add(seg.filesz)
        };
        if !patch
            .patchlets
            .iter()
            .all(|p| inside(p.at, p.original.len() as u64))
        {
            return Ok(None);
        }
        let lo = seg.vaddr & !(PAGE - 1);
        let hi = seg.vaddr.saturating_add(seg.filesz).div_ceil(PAGE) * PAGE;
        let known = KnownMapping {
            path: path.to_path_buf(),
            key,
            exec_start: bias.wrapping_add(lo),
            exec_end: bias.wrapping_add(hi),
            exec_offset: seg.offset & !(PAGE - 1),
        };
        let plan = self.plan_known_elf(pid, bundle, &known, sha256, &elf)?;
        Ok(Some((known, plan)))
    }

    /// The module of `pid` whose mapped inode has the patch's SHA-256.
    fn find_target(
        &self,
        pid: Pid,
        entries: &[stitch_elf::maps::MapEntry],
        patch: &Patch,
    ) -> Result<MappedModule, EngineError> {
        // Only files of the target's exact size are hashed (once per inode, cached), so a
        // renamed copy (a container image, a vendored library) is still found.
        let all = self
            .digests
            .modules(pid, entries, Some(patch.target.size))?;
        all.into_iter()
            .find(|m| m.sha256 == patch.target.sha256)
            .ok_or_else(|| EngineError::ModuleNotMapped {
                pid: pid.0,
                sha256: hex::encode(patch.target.sha256),
            })
    }

    /// [`Engine::resolve_imports`] without reading `/proc/PID/maps` whole: the executable
    /// mappings are asked for one by one (`PROCMAP_QUERY`, Linux 6.11+), with their names,
    /// until each import's module is found — in a CPython process ~25 queries instead of
    /// ~105 lines (~120-215 us read whole). `Ok(None)`: this kernel cannot answer single
    /// queries (the caller reads the maps).
    fn resolve_imports_asking(
        &self,
        pid: Pid,
        patch: &Patch,
    ) -> Result<Option<Vec<u64>>, EngineError> {
        use stitch_sys::{MapAnswer, MapQuery, Perms, Tracer as _};
        let mut tracer = stitch_sys::PtraceTracer::new();
        let query = MapQuery {
            or_next: true,
            require: Perms {
                exec: true,
                ..Perms::default()
            },
            name: true,
        };
        // Executable file mappings seen so far, in address order, and where to ask next.
        let mut seen: Vec<stitch_sys::Mapping> = Vec::new();
        let mut next = 0u64;
        let mut out = Vec::with_capacity(patch.imports.len());
        for imp in &patch.imports {
            let not_found = || EngineError::ImportNotFound {
                pid: pid.0,
                module: imp.module.clone(),
                symbol: imp.symbol.clone(),
            };
            let named = |m: &stitch_sys::Mapping| {
                m.inode != 0 && file_name(std::path::Path::new(&m.name)) == imp.module
            };
            let m = match seen.iter().find(|m| named(m)) {
                Some(m) => m.clone(),
                None => loop {
                    match tracer.query_mapping(pid, next, &query)? {
                        MapAnswer::Found(m) => {
                            next = m.end;
                            seen.push(m.clone());
                            if named(&m) {
                                break m;
                            }
                        }
                        MapAnswer::NoneThere => return Err(not_found()),
                        MapAnswer::Unsupported => return Ok(None),
                    }
                },
            };
            let path = std::path::PathBuf::from(&m.name);
            let key = stat_mapped_range(pid, m.start, m.end, &path, m.inode)?;
            let Some(bytes) = self
                .digests
                .bytes_for_key(pid, &key, (m.start, m.end), &path)?
            else {
                // Changed between the stat and the open: the full way decides.
                return Ok(None);
            };
            let module = known_module(&KnownMapping {
                path,
                key,
                exec_start: m.start,
                exec_end: m.end,
                exec_offset: m.offset,
            });
            out.push(self.import_address(pid, imp, key, &bytes, &module)?);
        }
        Ok(Some(out))
    }

    /// Where `imp` lives in `pid`: its symbol as `bytes` (the file with `key`) exports it,
    /// moved by the load bias of `module` (that file as `pid` maps it).
    fn import_address(
        &self,
        pid: Pid,
        imp: &stitch_format::Import,
        key: FileKey,
        bytes: &[u8],
        module: &Module,
    ) -> Result<u64, EngineError> {
        let not_found = || EngineError::ImportNotFound {
            pid: pid.0,
            module: imp.module.clone(),
            symbol: imp.symbol.clone(),
        };
        let vaddr = self
            .digests
            .exported_symbol(key, bytes, &imp.symbol)
            .ok_or_else(not_found)?;
        let elf = ElfFile::parse_layout(bytes).map_err(|_| not_found())?;
        let bias = module.load_bias(&elf).map_err(|_| not_found())?;
        Ok(bias.wrapping_add(vaddr))
    }

    fn resolve_imports(
        &self,
        pid: Pid,
        entries: &[stitch_elf::maps::MapEntry],
        patch: &Patch,
    ) -> Result<Vec<u64>, EngineError> {
        let mut out = Vec::with_capacity(patch.imports.len());
        if patch.imports.is_empty() {
            return Ok(out);
        }
        let modules = stitch_elf::maps::modules(entries);
        for imp in &patch.imports {
            let not_found = || EngineError::ImportNotFound {
                pid: pid.0,
                module: imp.module.clone(),
                symbol: imp.symbol.clone(),
            };
            let m = modules
                .iter()
                .find(|m| file_name(&m.path) == imp.module)
                .ok_or_else(not_found)?;
            let (key, bytes) = self.digests.module_bytes_keyed(pid, m)?;
            out.push(self.import_address(pid, imp, key, &bytes, m)?);
        }
        Ok(out)
    }
}

/// The build-id the patch was made for is the module's.
fn check_build_id(
    pid: Pid,
    path: &std::path::Path,
    elf: &ElfFile<'_>,
    patch: &Patch,
) -> Result<(), EngineError> {
    let found_bid = elf.build_id().map(<[u8]>::to_vec);
    if found_bid != patch.target.build_id {
        return Err(EngineError::BuildIdMismatch {
            pid: pid.0,
            path: path.display().to_string(),
            expected: patch
                .target
                .build_id
                .as_ref()
                .map_or("none".into(), hex::encode),
            found: found_bid.as_ref().map_or("none".into(), hex::encode),
        });
    }
    Ok(())
}

/// Every site of the patch is mapped executable, from the right file offset, in `module`.
pub(crate) fn check_sites_mapped(
    pid: Pid,
    module: &Module,
    elf: &ElfFile<'_>,
    patch: &Patch,
) -> Result<(), EngineError> {
    for p in &patch.patchlets {
        if module
            .runtime_exec_addr(elf, p.at, p.original.len() as u64)
            .is_none()
        {
            return Err(EngineError::ModuleLayout {
                pid: pid.0,
                path: module.path.display().to_string(),
                reason: format!(
                    "site {:#x} of patchlet {} is not mapped executable",
                    p.at, p.name
                ),
            });
        }
    }
    Ok(())
}

/// The module as far as one known executable mapping of it shows it.
fn known_module(known: &KnownMapping) -> Module {
    let (dev_major, dev_minor) = dev_split(known.key.dev);
    Module {
        path: known.path.clone(),
        deleted: false,
        dev_major,
        dev_minor,
        inode: known.key.ino,
        mappings: vec![MapEntry {
            start: known.exec_start,
            end: known.exec_end,
            read: true,
            write: false,
            exec: true,
            shared: false,
            offset: known.exec_offset,
            dev_major,
            dev_minor,
            inode: known.key.ino,
            path: MapPath::File {
                path: known.path.clone(),
                deleted: false,
            },
        }],
    }
}

/// Lowest and one-past-highest runtime address of the module's PT_LOAD segments (pages).
fn elf_span(elf: &ElfFile<'_>, bias: u64) -> Option<(u64, u64)> {
    const PAGE: u64 = 4096;
    let segs = elf.load_segments();
    let lo = segs.iter().map(|s| s.vaddr & !(PAGE - 1)).min()?;
    let hi = segs
        .iter()
        .map(|s| s.vaddr.saturating_add(s.memsz).div_ceil(PAGE) * PAGE)
        .max()?;
    Some((bias.wrapping_add(lo), bias.wrapping_add(hi)))
}

/// The module's existing region, if any: a region-shaped mapping within reach whose header
/// names this module's digest and bias.
pub(crate) fn find_region(
    pid: Pid,
    entries: &[stitch_elf::maps::MapEntry],
    module: &ModuleSpan,
) -> Result<Option<(u64, RegionHeader)>, EngineError> {
    for e in entries.iter().filter(|e| maybe_region(e)) {
        if e.start.abs_diff(module.start) > REACH {
            continue;
        }
        let mut data = vec![0u8; region::TRAMPOLINE_START as usize];
        if stitch_sys::read_proc_mem(pid, e.start, &mut data).is_err()
            || !RegionHeader::looks_like_region(&data)
        {
            continue;
        }
        let header = RegionHeader::decode(&data)?;
        if header.module_sha256 == module.sha256 && header.module_bias == module.bias {
            return Ok(Some((e.start, header)));
        }
    }
    Ok(None)
}

/// Where the target module sits in the process: what linking and region placement need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleSpan {
    pub(crate) path: String,
    pub(crate) sha256: [u8; 32],
    pub(crate) bias: u64,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl ModuleSpan {
    pub(crate) fn of_plan(plan: &Plan) -> Self {
        Self {
            path: plan.module_path.clone(),
            sha256: plan.module_sha256,
            bias: plan.module_bias,
            start: plan.module_start,
            end: plan.module_end,
        }
    }
}

/// A free, page-aligned range for a new region within reach of the whole module. Avoids the
/// 64 MiB above `[heap]` so the program's `brk` can still grow.
pub(crate) fn propose_region(
    entries: &[stitch_elf::maps::MapEntry],
    module: &ModuleSpan,
) -> Option<u64> {
    let maps: Vec<stitch_sys::Mapping> = entries.iter().map(to_sys_mapping).collect();
    candidates(&maps, module).into_iter().next()
}

/// Free ranges for a new region, closest to the module first.
pub(crate) fn candidates(maps: &[stitch_sys::Mapping], module: &ModuleSpan) -> Vec<u64> {
    let heap_guard = maps
        .iter()
        .find(|m| m.name == "[heap]")
        .map(|m| (m.start, m.end + (64 << 20)));
    let reach = REACH - (module.end - module.start);
    stitch_sys::free_gaps_near(maps, module.start, region::REGION_SIZE, reach)
        .into_iter()
        .filter(|&a| {
            let end = a + region::REGION_SIZE;
            end.abs_diff(module.start) < REACH
                && a.abs_diff(module.end) < REACH
                && !heap_guard.is_some_and(|(lo, hi)| a < hi && end > lo)
        })
        .collect()
}

fn to_sys_mapping(e: &stitch_elf::maps::MapEntry) -> stitch_sys::Mapping {
    stitch_sys::Mapping {
        start: e.start,
        end: e.end,
        perms: stitch_sys::Perms {
            read: e.read,
            write: e.write,
            exec: e.exec,
            shared: e.shared,
        },
        offset: e.offset,
        dev: (e.dev_major, e.dev_minor),
        inode: e.inode,
        name: match &e.path {
            stitch_elf::maps::MapPath::Anonymous => String::new(),
            stitch_elf::maps::MapPath::Special(s) => s.clone(),
            stitch_elf::maps::MapPath::File { path, .. } => path.display().to_string(),
        },
    }
}

/// Lays out record and trampolines in the region at `region.addr()`.
pub(crate) fn link_plan(
    pid: Pid,
    patch: &Patch,
    patch_digest: [u8; 32],
    module: &ModuleSpan,
    region_plan: RegionPlan,
    header: &RegionHeader,
    imports: Vec<u64>,
) -> Result<Plan, EngineError> {
    let base = region_plan.addr();
    let bias = module.bias;
    let record_offset = u64::from(header.records_next);
    let record_len = PatchRecord::encoded_len(patch.patchlets.len()) as u64;
    if record_offset + record_len > region::TRAMPOLINE_START {
        return Err(EngineError::RegionFull {
            reason: "no room for another patch record".into(),
        });
    }
    let hit_counter = base + record_offset + region::HITS_OFFSET;
    let import_addrs: Vec<Option<u64>> = imports.iter().map(|&a| Some(a)).collect();
    let tramp_offset = u64::from(header.tramp_next);
    let mut off = tramp_offset;
    let mut sites = Vec::with_capacity(patch.patchlets.len());
    for p in &patch.patchlets {
        let ctx = LinkContext {
            bias,
            addr: base + off,
            imports: &import_addrs,
            hit_counter,
        };
        let linked = link_patchlet(p, &ctx).map_err(|source| EngineError::Link {
            patchlet: p.name.clone(),
            source,
        })?;
        let len = linked.trampoline.len() as u64;
        if off + len > region::REGION_SIZE {
            return Err(EngineError::RegionFull {
                reason: "no room for the trampolines".into(),
            });
        }
        sites.push(PlannedSite {
            patchlet: p.name.clone(),
            addr: linked.site,
            original: p.original.clone(),
            new_bytes: linked.site_bytes,
            tramp_addr: linked.addr,
            trampoline: linked.trampoline,
        });
        // 16-byte aligned trampolines.
        off = (off + len).div_ceil(16) * 16;
    }
    let record = PatchRecord {
        offset: record_offset,
        state: region::RecordState::Applying,
        id: patch.id.clone(),
        revision: patch.revision,
        patch_digest,
        hits: 0,
        tramp_offset: tramp_offset as u32,
        tramp_len: (off - tramp_offset) as u32,
        sites: sites
            .iter()
            .map(|s| region::SiteRecord {
                addr: s.addr,
                tramp: s.tramp_addr,
                original: s.original.clone(),
            })
            .collect(),
    };
    Ok(Plan {
        pid,
        patch_id: patch.id.clone(),
        revision: patch.revision,
        patch_digest,
        module_path: module.path.clone(),
        module_sha256: module.sha256,
        module_bias: bias,
        module_start: module.start,
        module_end: module.end,
        region: region_plan,
        record_offset,
        tramp_offset,
        imports,
        sites,
        record,
    })
}

//! Committing a plan to a stopped process, reverting, and reading what a process carries.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use stitch_format::{Patch, VerifiedBundle};
use stitch_sys::{MapQuery, Mapping, Pid, Placement, RealtimeGuard, StoppedProcess, Tid, Tracer};

use crate::identify::{maybe_region, maybe_region_sys, read_maps};
use crate::plan::{ModuleSpan, Plan, RegionPlan, candidates, link_plan};
use crate::region::{self, PatchRecord, RecordState, RegionHeader};
use crate::{Engine, EngineError, kill_point};

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The plan as committed (re-linked under the stop if the process changed meanwhile).
    pub plan: Plan,
    /// Whether a new Stitch region was mapped.
    pub region_created: bool,
    /// Threads held during the window.
    pub threads: usize,
    /// Times a thread had to be let run on because it sat inside a site (or its stack held
    /// an address strictly inside one: an interrupted context, a return address).
    pub site_retries: u32,
    /// How long it took to stop every thread (the first thread seized waits this long).
    pub stopping: Duration,
    /// From "every thread held" until every thread was let go again.
    pub pause: Duration,
    /// Where the stop-the-world pause went, in order: the parts of stopping every thread
    /// (`stop.*`, from [`stitch_sys::StopTimings`]), then the held window step by step, then
    /// `release`. Names are stable: `stop.listing`, `stop.seize`, `stop.wait`, `stop.regs`,
    /// `maps`, `identity`, `records`, `verify`, `threads`, `region`, `writes`, `release`.
    pub phases: Vec<(&'static str, Duration)>,
}

impl ApplyReport {
    /// The time spent in phase `name` (see [`ApplyReport::phases`]), zero if absent.
    pub fn phase(&self, name: &str) -> Duration {
        self.phases
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .sum()
    }
}

/// Laps of the held window, for [`ApplyReport::phases`].
struct Laps {
    last: Instant,
    out: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            out: Vec::new(),
        }
    }

    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.out.push((name, now - self.last));
        self.last = now;
    }
}

fn stop_phases(t: stitch_sys::StopTimings) -> [(&'static str, Duration); 4] {
    [
        ("stop.listing", t.listing),
        ("stop.seize", t.seize),
        ("stop.wait", t.wait),
        ("stop.regs", t.regs),
    ]
}

/// What a revert did.
#[derive(Debug, Clone)]
pub struct RevertReport {
    pub pid: Pid,
    pub id: String,
    pub revision: u32,
    pub hits: u64,
    /// Whether the region was unmapped (no patch left, no thread or stack referring to it).
    pub region_freed: bool,
    pub pause: Duration,
}

/// A patch found in a process by [`Engine::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedPatch {
    pub pid: Pid,
    pub region: u64,
    pub module_sha256: [u8; 32],
    /// The record, with `state` as it is in effect (see [`Engine::list`]): `applied`
    /// only when the sites carry its jumps.
    pub record: PatchRecord,
    /// The region's record says `applied` (or `applying`) but no site carries its jump: the
    /// library was unloaded and loaded again (the region outlives it), or a patcher was
    /// killed mid-apply. Listed as `reverted`; the next apply settles it and applies again.
    pub stale: bool,
}

const PROT_RW: i32 = libc_prot::READ | libc_prot::WRITE;
const PROT_RX: i32 = libc_prot::READ | libc_prot::EXEC;

/// PROT_* values (Linux, all architectures).
mod libc_prot {
    pub(super) const READ: i32 = 1;
    pub(super) const WRITE: i32 = 2;
    pub(super) const EXEC: i32 = 4;
}

/// Sites closer together than this are written with one `/proc/PID/mem` write (read, modify,
/// write back), so even if the patcher is killed mid-apply the process has all jumps or none.
const ONE_WRITE_SPAN: u64 = 64 << 10;

impl Engine {
    /// Plans and applies `bundle` to `pid` with the real kernel tracer.
    pub fn apply(&self, pid: Pid, bundle: &VerifiedBundle) -> Result<ApplyReport, EngineError> {
        let plan = self.plan(pid, bundle)?;
        self.apply_plan(&plan, bundle)
    }

    /// Applies a plan made earlier: stops the process, re-identifies the module under the
    /// stop (the mapped inode's digest), then [`Engine::commit`]s.
    pub fn apply_plan(
        &self,
        plan: &Plan,
        bundle: &VerifiedBundle,
    ) -> Result<ApplyReport, EngineError> {
        let pid = plan.pid;
        let _rt = self.options.realtime.then(RealtimeGuard::enter);
        let mut stops = 0;
        loop {
            stops += 1;
            let t_stop = Instant::now();
            let deadline = t_stop + self.options.stop_timeout;
            let mut sp = stitch_sys::stop_all(pid, deadline)?;
            let t0 = Instant::now();
            let stopping = t0 - t_stop;
            kill_point("stopped");
            let mut laps = Laps::new();
            laps.out.extend(stop_phases(sp.stop_timings()));
            // The mapping at the module's start, asked for alone (no thread can map or unmap
            // while every thread is held); the commit asks for the others it needs.
            let result = sp
                .query_mapping(plan.module_start, MapQuery::COVERING.named())
                .map_err(EngineError::from)
                .and_then(|at_start| {
                    laps.lap("maps");
                    self.same_module(plan, at_start.as_ref())?;
                    laps.lap("identity");
                    self.commit_mapped(&mut sp, plan, bundle.patch(), &mut laps)
                });
            let released = sp.resume();
            let pause = t0.elapsed();
            laps.lap("release");
            match result {
                // Nothing was written: let the process run freely, then stop it again.
                Err(EngineError::ThreadInSite { .. }) if stops < self.options.max_stops => {
                    tracing::debug!(pid = pid.0, stops, "a thread stays inside a site; retrying");
                    std::thread::sleep(Duration::from_millis(2 * u64::from(stops)));
                    continue;
                }
                Err(e) => return Err(e),
                Ok(mut report) => {
                    released?;
                    report.pause = pause;
                    report.stopping = stopping;
                    report.phases = laps.out;
                    tracing::info!(pid = pid.0, patch_id = %report.plan.patch_id, ?pause, threads = report.threads, "applied");
                    return Ok(report);
                }
            }
        }
    }

    /// Under the stop: the module the plan was made for is still mapped at the same place and
    /// is still the same file (only the mapping at the module's start is opened, through
    /// `/proc/PID/map_files`; its digest is cached by device, inode, size and ctime).
    fn same_module(&self, plan: &Plan, at_start: Option<&Mapping>) -> Result<(), EngineError> {
        let gone = || EngineError::ModuleNotMapped {
            pid: plan.pid.0,
            sha256: hex::encode(plan.module_sha256),
        };
        let m = at_start
            .filter(|m| m.start == plan.module_start && m.inode != 0)
            .ok_or_else(gone)?;
        let path = m.name.strip_suffix(" (deleted)").unwrap_or(&m.name);
        if self.digests.mapping_has_digest(
            plan.pid,
            m.start,
            m.end,
            std::path::Path::new(path),
            m.inode,
            &plan.module_sha256,
        )? {
            Ok(())
        } else {
            Err(gone())
        }
    }

    /// The commit on a process whose threads are all held, with any [`Tracer`] (the kernel's
    /// or the fake). Finds or maps the module's region, settles records left `Applying` by a
    /// killed patcher, re-links `plan` for the region as it is now, re-checks the original
    /// bytes, writes trampolines and the record, waits until no thread (and no stack word)
    /// is strictly inside a site, writes every jump at once and marks the record applied.
    /// On error nothing is left patched (a region mapped by this call is unmapped again).
    ///
    /// The module's identity is the caller's to check (see [`Engine::apply_plan`]).
    pub fn commit<T: Tracer>(
        &self,
        sp: &mut StoppedProcess<T>,
        plan: &Plan,
        patch: &Patch,
    ) -> Result<ApplyReport, EngineError> {
        let mut laps = Laps::new();
        self.commit_mapped(sp, plan, patch, &mut laps)
    }

    /// [`Engine::commit`] for a plan made by [`Engine::plan_mapped`] from what the caller saw
    /// being mapped. Under this stop, from the mappings at those addresses (single
    /// `PROCMAP_QUERY`s where the kernel has them, else one read of the maps): the mapping
    /// at `known.exec_start` is the caller's file (its device and inode; if the maps name
    /// another — an overlay reports the backing file — its `map_files` entry is identified by
    /// digest as [`Engine::apply_plan`] does), every mapping of that inode taken together
    /// gives the plan's bias (the full consistency check [`Engine::plan`] makes), every site
    /// is mapped executable from the right file offset, and the cached digest is the plan's.
    /// Then exactly [`Engine::commit`].
    pub fn commit_known<T: Tracer>(
        &self,
        sp: &mut StoppedProcess<T>,
        plan: &Plan,
        patch: &Patch,
        known: &crate::KnownMapping,
    ) -> Result<ApplyReport, EngineError> {
        let mut laps = Laps::new();
        self.known_still_mapped(sp, plan, patch, known)?;
        laps.lap("maps");
        self.commit_mapped(sp, plan, patch, &mut laps)
    }

    fn known_still_mapped<T: Tracer>(
        &self,
        sp: &mut StoppedProcess<T>,
        plan: &Plan,
        patch: &Patch,
        known: &crate::KnownMapping,
    ) -> Result<(), EngineError> {
        let pid = sp.pid();
        let gone = || EngineError::ModuleNotMapped {
            pid: pid.0,
            sha256: hex::encode(plan.module_sha256),
        };
        let exec = sp
            .query_mapping(known.exec_start, MapQuery::COVERING)?
            .filter(|m| m.inode != 0)
            .ok_or_else(gone)?;
        let same_file = exec.inode == known.key.ino
            && exec.dev == crate::identify::dev_split(known.key.dev)
            && self.digests.digest_for_key(&known.key) == Some(plan.module_sha256);
        // The path only names the file in errors, and in the `map_files` check of a mapping
        // that is not the caller's file by key: asked for only then (a path walk).
        let named = if same_file {
            exec.clone()
        } else {
            sp.query_mapping(known.exec_start, MapQuery::COVERING.named())?
                .filter(|m| m.start == exec.start && m.inode == exec.inode)
                .ok_or_else(gone)?
        };
        let path = named.name.strip_suffix(" (deleted)").unwrap_or(&named.name);
        let path = std::path::Path::new(path);
        if !same_file
            && !self.digests.mapping_has_digest(
                pid,
                exec.start,
                exec.end,
                path,
                exec.inode,
                &plan.module_sha256,
            )?
        {
            return Err(gone());
        }
        // The file offset the plan assumed at every site (`plan_mapped` placed each one in
        // the known mapping, from the ELF): the mapping under the stop must map exactly that
        // byte of this inode there, executable and private — the layout `Module::load_bias`
        // and `runtime_exec_addr` check for `plan`, at the sites, without parsing the ELF
        // again under the stop.
        let shown = if path.as_os_str().is_empty() {
            format!("inode {} on {}:{}", exec.inode, exec.dev.0, exec.dev.1)
        } else {
            path.display().to_string()
        };
        let layout = |reason: String| EngineError::ModuleLayout {
            pid: pid.0,
            path: shown.clone(),
            reason,
        };
        let file_offset = |addr: u64| {
            known
                .exec_offset
                .checked_add(addr.checked_sub(known.exec_start)?)
        };
        let ours = |m: &Mapping| m.inode == exec.inode && m.dev == exec.dev;
        let spans = std::iter::once((known.exec_start, 1u64)).chain(
            patch
                .patchlets
                .iter()
                .map(|p| (plan.module_bias.wrapping_add(p.at), p.original.len() as u64)),
        );
        for (addr, len) in spans {
            let mut cursor = addr;
            let end = addr.saturating_add(len);
            while cursor < end {
                // Usually the mapping at `exec_start` itself (asked for above).
                let m = if exec.contains(cursor) {
                    exec.clone()
                } else {
                    sp.query_mapping(cursor, MapQuery::COVERING)?
                        .filter(ours)
                        .ok_or_else(|| layout(format!("{cursor:#x} is not mapped from the file")))?
                };
                let mapped = m.offset.checked_add(cursor - m.start);
                if !m.perms.exec
                    || m.perms.shared
                    || mapped.is_none()
                    || mapped != file_offset(cursor)
                {
                    return Err(layout(format!(
                        "{cursor:#x} does not map the planned file offset executable"
                    )));
                }
                cursor = m.end;
            }
        }
        Ok(())
    }

    /// [`Engine::commit`], once the module is known to be the plan's under this stop. Asks
    /// for the mappings it needs one by one ([`StoppedProcess::query_mapping`]: the module's
    /// regions, each thread's stack, the new region's place), or uses the maps a caller
    /// already read under this stop.
    fn commit_mapped<T: Tracer>(
        &self,
        sp: &mut StoppedProcess<T>,
        plan: &Plan,
        patch: &Patch,
        laps: &mut Laps,
    ) -> Result<ApplyReport, EngineError> {
        let t0 = Instant::now();
        let pid = sp.pid();
        let span = ModuleSpan::of_plan(plan);
        let mut existing = find_regions_held(sp, &span)?;
        for (addr, header) in &mut existing {
            settle_records(sp, *addr, header)?;
            if let Some(r) = header
                .records
                .iter()
                .find(|r| r.id == plan.patch_id && r.state != RecordState::Reverted)
            {
                return Err(EngineError::AlreadyApplied {
                    pid: pid.0,
                    id: r.id.clone(),
                    revision: r.revision,
                });
            }
        }
        laps.lap("records");
        // 1. Exact original bytes at every site, in memory.
        let sites: Vec<(String, u64, &[u8])> = patch
            .patchlets
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    span.bias.wrapping_add(p.at),
                    &p.original[..],
                )
            })
            .collect();
        for (name, addr, original) in &sites {
            let found = sp.read_vec(*addr, original.len())?;
            if found != *original {
                return Err(EngineError::UnexpectedBytes {
                    pid: pid.0,
                    patchlet: name.clone(),
                    addr: *addr,
                    expected: hex_spaced(original),
                    found: hex_spaced(&found),
                });
            }
        }
        // 2. No thread may resume inside bytes about to be replaced, nor return into them
        //    from a signal frame or a call. Threads may run here (bounded), which can also
        //    end the stop: nothing has been written yet, so that leaves the process as it
        //    was. Nothing runs from here on.
        let ranges: Vec<(u64, u64)> = sites
            .iter()
            .map(|(_, a, o)| (*a, *a + o.len() as u64))
            .collect();
        laps.lap("verify");
        let (site_retries, stacks) = wait_out_of(sp, &ranges, self)?;
        laps.lap("threads");
        kill_point("threads_clear");
        // 3. The region. A region whose patches are all reverted and that nothing executes
        //    in or refers to any more is started afresh (or unmapped, if another is used):
        //    trampolines and records of reverted patches would otherwise pile up. Then the
        //    first region with room; else a new one within reach.
        let mut usable: Vec<(u64, RegionHeader)> = Vec::new();
        let mut fresh_one = false;
        for (addr, header) in existing {
            let idle = !header.records.is_empty()
                && header
                    .records
                    .iter()
                    .all(|r| r.state == RecordState::Reverted)
                && region_unused(sp, &stacks, addr);
            if !idle {
                usable.push((addr, header));
            } else if !fresh_one {
                fresh_one = true;
                // Empty it now, before anything is written into it: the new record goes where
                // the old (reverted) ones were, and must not be counted by the old header if
                // a later step fails (an `applying` record over original bytes).
                let fresh = RegionHeader::new(span.sha256, span.bias);
                if let Err(e) = sp.write_verified(addr, &fresh.encode_fixed()) {
                    let _ = sp.write(addr, &header.encode_fixed());
                    return Err(e.into());
                }
                usable.insert(0, (addr, fresh));
            } else {
                let _ = sp.remote_munmap(addr, region::REGION_SIZE);
            }
        }
        let link = |addr: u64, header: &RegionHeader, created: bool| {
            let region_plan = if created {
                RegionPlan::New { addr }
            } else {
                RegionPlan::Existing { addr }
            };
            link_plan(
                pid,
                patch,
                plan.patch_digest,
                &span,
                region_plan,
                header,
                plan.imports.clone(),
            )
        };
        let mut chosen = None;
        for (addr, header) in usable {
            match link(addr, &header, false) {
                Ok(linked) => {
                    chosen = Some((linked, header));
                    break;
                }
                Err(EngineError::RegionFull { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let created = chosen.is_none();
        let (fresh, header) = match chosen {
            Some(c) => c,
            None => {
                let proposed = plan.region.addr();
                let asked = region_by_asking(sp, &span, proposed)?;
                let first = match asked {
                    Some(a) => vec![a],
                    None => region_candidates(&sp.mappings()?, &span, proposed),
                };
                let header = RegionHeader::new(span.sha256, span.bias);
                // One stop per injected syscall, plus one for the sequence.
                let addr = sp.remote_batch(|sp| {
                    match create_region(sp, &first, &header, self)? {
                        Ok(a) => Ok(a),
                        // One address found by asking was tried (the maps were not read
                        // whole) and refused: the free ranges near the module, from the
                        // maps now.
                        Err(refused) if asked.is_some() => {
                            let rest: Vec<u64> =
                                region_candidates(&sp.mappings()?, &span, proposed)
                                    .into_iter()
                                    .filter(|a| !first.contains(a))
                                    .collect();
                            if rest.is_empty() {
                                return Err(refused);
                            }
                            create_region(sp, &rest, &header, self)?
                        }
                        Err(e) => Err(e),
                    }
                })?;
                kill_point("region_mapped");
                match link(addr, &header, true) {
                    Ok(linked) => (linked, header),
                    Err(e) => {
                        let _ = sp.remote_munmap(addr, region::REGION_SIZE);
                        return Err(e);
                    }
                }
            }
        };
        laps.lap("region");
        let region_addr = fresh.region.addr();
        // The exact bytes verified at step 1 are still there if no thread has run since
        // (injected syscalls only mapped and protected the region).
        let verified: Vec<(u64, &[u8])> = sites.iter().map(|(_, a, o)| (*a, *o)).collect();
        let unchanged = (site_retries == 0).then_some(&verified[..]);
        let result = commit_linked(sp, &fresh, &header, unchanged).map(|()| fresh);
        laps.lap("writes");
        if result.is_err() && created {
            // Nothing points into a region we just made: give it back.
            let _ = sp.remote_munmap(region_addr, region::REGION_SIZE);
        }
        let fresh = result?;
        Ok(ApplyReport {
            plan: fresh,
            region_created: created,
            threads: sp.tids().len(),
            site_retries,
            stopping: Duration::ZERO,
            pause: t0.elapsed(),
            phases: laps.out.clone(),
        })
    }

    /// Reverts patch `id` in `pid`.
    pub fn revert(&self, pid: Pid, id: &str) -> Result<RevertReport, EngineError> {
        let _rt = self.options.realtime.then(RealtimeGuard::enter);
        let mut stops = 0;
        loop {
            stops += 1;
            let deadline = Instant::now() + self.options.stop_timeout;
            let mut sp = stitch_sys::stop_all(pid, deadline)?;
            let t0 = Instant::now();
            let result = self.revert_held(&mut sp, id);
            let released = sp.resume();
            let pause = t0.elapsed();
            match result {
                Err(EngineError::ThreadInSite { .. }) if stops < self.options.max_stops => {
                    std::thread::sleep(Duration::from_millis(2 * u64::from(stops)));
                    continue;
                }
                Err(e) => return Err(e),
                Ok(mut report) => {
                    released?;
                    report.pause = pause;
                    tracing::info!(
                        pid = pid.0,
                        patch_id = id,
                        ?pause,
                        region_freed = report.region_freed,
                        "reverted"
                    );
                    return Ok(report);
                }
            }
        }
    }

    /// The revert on a process whose threads are all held, with any [`Tracer`]: checks that
    /// every site holds our jump (or still the original), waits until no thread is strictly
    /// inside a site, restores every site at once, marks the record reverted and unmaps the
    /// region if no patch is left in it and no thread executes in or refers to it.
    pub fn revert_held<T: Tracer>(
        &self,
        sp: &mut StoppedProcess<T>,
        id: &str,
    ) -> Result<RevertReport, EngineError> {
        let t0 = Instant::now();
        let pid = sp.pid();
        let (revision, hits, region_freed) = revert_stopped(sp, id, self)?;
        Ok(RevertReport {
            pid,
            id: id.to_string(),
            revision,
            hits,
            region_freed,
            pause: t0.elapsed(),
        })
    }

    /// Every patch record in every Stitch region of `pid`, read without stopping it.
    pub fn list(&self, pid: Pid) -> Result<Vec<AppliedPatch>, EngineError> {
        let entries = read_maps(pid)?;
        let mut out = Vec::new();
        for e in entries.iter().filter(|e| maybe_region(e)) {
            let mut data = vec![0u8; region::TRAMPOLINE_START as usize];
            if stitch_sys::read_proc_mem(pid, e.start, &mut data).is_err()
                || !RegionHeader::looks_like_region(&data)
            {
                continue;
            }
            let h = RegionHeader::decode(&data)?;
            for mut record in h.records {
                let written = record.state;
                record.state = state_in_effect(pid, &record);
                out.push(AppliedPatch {
                    pid,
                    region: e.start,
                    module_sha256: h.module_sha256,
                    stale: written != RecordState::Reverted
                        && record.state == RecordState::Reverted,
                    record,
                });
            }
        }
        Ok(out)
    }
}

/// The state a record has in effect, read without stopping (advisory; an apply or revert
/// decides under the stop): a record not `reverted` is `applied` when any of its sites
/// carries its jump (all do, unless a patcher died mid-write), else `reverted` — a stale
/// record, e.g. over a library unloaded and loaded again at the same address, whose fresh
/// copy has the original bytes while the region (anonymous memory) kept the record.
pub(crate) fn state_in_effect(pid: Pid, r: &PatchRecord) -> RecordState {
    if r.state == RecordState::Reverted {
        return RecordState::Reverted;
    }
    let carries_jump = r.sites.iter().any(|s| {
        let mut now = vec![0u8; s.original.len()];
        stitch_sys::read_proc_mem(pid, s.addr, &mut now).is_ok()
            && stitch_x86::site_bytes(s.addr, s.original.len(), s.tramp) == Some(now)
    });
    if carries_jump {
        RecordState::Applied
    } else {
        RecordState::Reverted
    }
}

/// The module's existing regions, read through the held process. Usually one; more when a
/// region filled up while a thread still used trampolines of reverted patches in it.
///
/// A region is found from its trampolines: an anonymous executable mapping (a process has a
/// few executable mappings, where `/proc/PID/maps` lists hundreds of lines) right after an
/// 8 KiB read-write anonymous one (header and records) that carries the magic. Every region
/// the engine leaves behind has that shape (the header is written only after the
/// `mprotect`, in the same batch); one whose trampolines the target itself made
/// non-executable is not used (a new region is made instead; the sites' bytes decide
/// whether a patch is in place either way).
fn find_regions_held<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    module: &ModuleSpan,
) -> Result<Vec<(u64, RegionHeader)>, EngineError> {
    Ok(regions_held(sp, |start| {
        start.abs_diff(module.start) <= crate::plan::REACH
    })?
    .into_iter()
    .filter(|(_, h)| h.module_sha256 == module.sha256 && h.module_bias == module.bias)
    .collect())
}

/// Every Stitch region of the held process that starts where `near` allows, by address,
/// found from its trampolines as [`find_regions_held`] describes.
fn regions_held<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    near: impl Fn(u64) -> bool,
) -> Result<Vec<(u64, RegionHeader)>, EngineError> {
    let mut out = Vec::new();
    let tramp_parts: Vec<u64> = sp
        .exec_mappings()?
        .into_iter()
        .filter(|x| x.inode == 0 && !x.perms.shared && x.start >= region::TRAMPOLINE_START)
        .map(|x| x.start)
        .filter(|&t| near(t - region::TRAMPOLINE_START))
        .collect();
    for t in tramp_parts {
        let Some(m) = sp.query_mapping(t - 1, MapQuery::COVERING.named())? else {
            continue;
        };
        if m.end != t || !maybe_region_sys(&m) {
            continue;
        }
        let Ok(data) = sp.read_vec(m.start, region::TRAMPOLINE_START as usize) else {
            continue;
        };
        if !RegionHeader::looks_like_region(&data) {
            continue;
        }
        out.push((m.start, RegionHeader::decode(&data)?));
    }
    Ok(out)
}

/// A record whose state disagrees with its sites (a patcher killed between writing the
/// sites and recording it, or a failed state write) is settled by looking at the sites:
/// all original -> `Reverted`, all our jumps -> `Applied`. Mixed sites cannot be produced
/// by the engine (they are written at once) and are left alone.
fn settle_records<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    base: u64,
    header: &mut RegionHeader,
) -> Result<(), EngineError> {
    for r in header
        .records
        .iter_mut()
        .filter(|r| r.state != RecordState::Reverted)
    {
        let mut original = 0;
        let mut ours = 0;
        for s in &r.sites {
            let now = sp.read_vec(s.addr, s.original.len())?;
            if now == s.original {
                original += 1;
            } else if stitch_x86::site_bytes(s.addr, s.original.len(), s.tramp) == Some(now) {
                ours += 1;
            }
        }
        let state = if original == r.sites.len() {
            RecordState::Reverted
        } else if ours == r.sites.len() {
            RecordState::Applied
        } else {
            continue;
        };
        if state == r.state {
            continue;
        }
        tracing::info!(pid = sp.pid().0, patch_id = %r.id, state = state.as_str(), "settled a record whose state disagreed with its sites");
        sp.write_verified(base + r.offset + 16, &(state as u32).to_le_bytes())?;
        r.state = state;
    }
    Ok(())
}

/// Maps a new region at the first free candidate, names it, makes the trampoline part
/// executable and writes its (empty) `header` — at once, so that a patcher killed after this
/// leaves a region the next apply to the module finds by its magic and uses, not 64 KiB
/// nobody will ever reclaim. Returns its address, or (inner error) why no candidate could be
/// mapped — each was refused by the kernel, nothing was changed — so the caller may try
/// others.
fn create_region<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    candidates: &[u64],
    header: &RegionHeader,
    engine: &Engine,
) -> Result<Result<u64, EngineError>, EngineError> {
    let mut last = None;
    for &addr in candidates.iter().take(16) {
        match sp.remote_mmap(Placement::Exact(addr), region::REGION_SIZE, PROT_RW) {
            Ok(a) => {
                // The name is cosmetic (`[anon:stitch]` in maps; regions are found by their
                // magic either way): a kernel without CONFIG_ANON_VMA_NAME refuses it with
                // EINVAL, and is not asked again by this engine.
                if !engine.anon_name_unsupported.load(Ordering::Relaxed) {
                    match sp.remote_prctl_set_vma_anon_name(
                        a,
                        region::REGION_SIZE,
                        region::ANON_NAME,
                    ) {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::debug!("PR_SET_VMA_ANON_NAME unsupported; not asked again");
                            engine.anon_name_unsupported.store(true, Ordering::Relaxed);
                        }
                        Err(e) => tracing::debug!(error = %e, "naming the region failed"),
                    }
                }
                let prot = sp.remote_mprotect(
                    a + region::TRAMPOLINE_START,
                    region::REGION_SIZE - region::TRAMPOLINE_START,
                    PROT_RX,
                );
                if let Err(e) = prot.map_err(EngineError::from).and_then(|()| {
                    sp.write_verified(a, &header.encode_fixed())
                        .map_err(EngineError::from)
                }) {
                    let _ = sp.remote_munmap(a, region::REGION_SIZE);
                    return Err(e);
                }
                return Ok(Ok(a));
            }
            Err(e) if e.remote_errno().is_some() => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(match last {
        Some(e) => Err(e.into()),
        None => Err(EngineError::NoFreeRange {
            pid: sp.pid().0,
            near: candidates.first().copied().unwrap_or(0),
        }),
    })
}

/// How many mappings [`free_by_asking`] asks about for one address before it gives up.
const PROPOSAL_QUERIES: usize = 64;

/// Guard rules for an address tried by [`free_by_asking`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guards {
    /// The plan's proposal, as [`region_candidates`] accepts it: nothing mapped there and not
    /// within 64 MiB above `[heap]` (it may touch the module just above it).
    Proposal,
    /// A free range as `stitch_sys::free_gaps_near` picks them: also a free page on both
    /// sides and the kernel's stack guard gap below `[stack]`.
    Gap,
}

/// What [`free_by_asking`] found at one address.
enum Asked {
    Free,
    /// Taken: a try below must end below `.0` (less its guard page), a try above may start
    /// at `.1` (guards included).
    Taken(u64, u64),
    /// Too many mappings to look at one by one.
    TooMany,
}

/// Where `[heap]` and `[stack]` are, for [`free_by_asking`].
struct HeapAndStack {
    heaps: Vec<(u64, u64)>,
    stack: Option<(u64, u64)>,
}

/// Whether `c` is free for a region under `guards`, from the mappings between 64 MiB below it
/// (room for a `[heap]` to grow) and its end plus the stack guard gap, naming the anonymous
/// ones — usually one or two queries; or, with `[heap]` and `[stack]` known (`known`), from
/// the mappings right around it only.
fn free_by_asking<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    c: u64,
    guards: Guards,
    known: Option<&HeapAndStack>,
    max_queries: usize,
) -> Result<Asked, EngineError> {
    const PAGE: u64 = 4096;
    const STACK_GUARD: u64 = 256 * PAGE;
    let end = c.saturating_add(region::REGION_SIZE);
    let (lo_pad, hi_pad) = match guards {
        Guards::Proposal => (0, 0),
        Guards::Gap => (PAGE, PAGE),
    };
    let stack_reach = match (guards, known) {
        (Guards::Proposal, _) | (_, Some(_)) => 0,
        (Guards::Gap, None) => STACK_GUARD + PAGE,
    };
    let limit = end + hi_pad + stack_reach;
    // (lowest start, highest next-try) of what is in the way.
    let mut blocker: Option<(u64, u64)> = None;
    let mut block = |low: u64, high: u64| {
        blocker = Some(blocker.map_or((low, high), |(l, h)| (l.min(low), h.max(high))));
    };
    let mut at = match known {
        Some(k) => {
            for &(start, heap_end) in &k.heaps {
                if start < end && c < heap_end.saturating_add(HEAP_GUARD) {
                    block(start, heap_end.saturating_add(HEAP_GUARD));
                }
            }
            // `free_gaps_near` ends a gap `STACK_GUARD + PAGE` below `[stack]`.
            if let Some((start, stack_end)) = k.stack
                && guards == Guards::Gap
                && end.saturating_add(STACK_GUARD + PAGE) > start
                && c < stack_end.saturating_add(PAGE)
            {
                block(
                    start.saturating_sub(STACK_GUARD + PAGE),
                    stack_end.saturating_add(PAGE),
                );
            }
            c.saturating_sub(lo_pad)
        }
        None => c.saturating_sub(HEAP_GUARD),
    };
    for _ in 0..max_queries {
        let m = match sp.query_mapping(at, MapQuery::COVERING_OR_NEXT)? {
            Some(m) if m.start < limit => m,
            // Nothing more up to the limit: the range was seen whole.
            _ => return Ok(blocker.map_or(Asked::Free, |(l, h)| Asked::Taken(l, h))),
        };
        if m.start < end + hi_pad && c.saturating_sub(lo_pad) < m.end {
            block(m.start, m.end.saturating_add(PAGE));
        } else if m.inode == 0 {
            // Only anonymous mappings can be `[heap]` or `[stack]`: their names then.
            let heap_near =
                known.is_none() && m.start < end && c < m.end.saturating_add(HEAP_GUARD);
            let stack_near = m.start >= end && stack_reach > 0;
            if heap_near || stack_near {
                let name = sp
                    .query_mapping(m.start, MapQuery::COVERING.named())?
                    .map(|n| n.name)
                    .unwrap_or_default();
                match name.as_str() {
                    "[heap]" if heap_near => block(m.start, m.end.saturating_add(HEAP_GUARD)),
                    // Below a stack, a try must leave its guard gap free too.
                    "[stack]" if stack_near => block(
                        m.start.saturating_sub(STACK_GUARD + PAGE),
                        m.end.saturating_add(PAGE),
                    ),
                    _ => {}
                }
            }
        }
        at = m.end;
        if at >= limit {
            break;
        }
    }
    if at < limit && blocker.is_none() {
        // The query bound, with the range not seen whole.
        return Ok(Asked::TooMany);
    }
    Ok(blocker.map_or(Asked::Free, |(l, h)| Asked::Taken(l, h)))
}

/// Where to map a new region, found by asking for single mappings: the plan's proposal if
/// [`region_candidates`] would take it (just below the module: usually free when the kernel
/// placed the module top-down); if a mapping is in its way, the range right below that
/// mapping (no `/proc` read: a dlopen'ed module often has the loader's allocations just
/// below it); else the first free range right above the module or, walking down, right
/// below what is in the way — each checked with the guards
/// `stitch_sys::free_gaps_near` keeps. `None`: nothing found that way in a few tries (the
/// caller reads the maps whole and takes the nearest free range).
fn region_by_asking<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    span: &ModuleSpan,
    proposed: u64,
) -> Result<Option<u64>, EngineError> {
    const PAGE: u64 = 4096;
    const LOW_ADDR: u64 = 0x1_0000;
    let size = region::REGION_SIZE;
    let in_reach = |c: u64| {
        c.is_multiple_of(PAGE)
            && c >= LOW_ADDR
            && c.saturating_add(size).abs_diff(span.start) < crate::plan::REACH
            && c.abs_diff(span.end) < crate::plan::REACH
    };
    // The proposal: taken if anything is mapped there (one query); else free unless a
    // `[heap]` lies within 64 MiB below it — looked for among the few mappings there, or
    // (more than a few: a crowded neighbourhood) with the heap's place asked for below.
    let mut proposal_open = false;
    if in_reach(proposed) {
        let end = proposed + size;
        let in_the_way = sp
            .query_mapping(proposed, MapQuery::COVERING_OR_NEXT)?
            .filter(|m| m.start < end);
        match in_the_way {
            None => match free_by_asking(sp, proposed, Guards::Proposal, None, 8)? {
                Asked::Free => return Ok(Some(proposed)),
                Asked::Taken(..) => {}
                Asked::TooMany => proposal_open = true,
            },
            // Taken by something mapped right below the module (a dlopen: the loader's own
            // allocations often sit there): the range right below that, guards included,
            // before reading where `[heap]` and `[stack]` are (~30 us saved when it is free).
            Some(m) => {
                let below = m.start.saturating_sub(size + PAGE) & !(PAGE - 1);
                if in_reach(below)
                    && matches!(
                        free_by_asking(sp, below, Guards::Gap, None, 8)?,
                        Asked::Free
                    )
                {
                    return Ok(Some(below));
                }
            }
        }
    }
    // `[heap]` (from `start_brk`: the anonymous mappings named so from there) and `[stack]`
    // (the mapping holding `startstack`), so that each further try looks only at the
    // mappings right around it.
    let Some((start_brk, start_stack)) = sp.heap_and_stack()? else {
        return Ok(None);
    };
    let stack = sp
        .query_mapping(start_stack, MapQuery::COVERING)?
        .filter(|m| m.inode == 0)
        .map(|m| (m.start, m.end));
    let mut heaps = Vec::new();
    let mut at = start_brk;
    while heaps.len() < 8 {
        match sp.query_mapping(at, MapQuery::COVERING_OR_NEXT)? {
            Some(m) if m.inode == 0 => {
                let named = sp.query_mapping(m.start, MapQuery::COVERING.named())?;
                if named.is_none_or(|n| n.name != "[heap]") {
                    break;
                }
                heaps.push((m.start, m.end));
                at = m.end;
            }
            _ => break,
        }
    }
    let known = HeapAndStack { heaps, stack };
    if proposal_open
        && matches!(
            free_by_asking(
                sp,
                proposed,
                Guards::Proposal,
                Some(&known),
                PROPOSAL_QUERIES
            )?,
            Asked::Free
        )
    {
        return Ok(Some(proposed));
    }
    // The nearest free range above the module and the nearest below it, as
    // `free_gaps_near` places them (the lowest address of a gap above, the highest fitting
    // one of a gap below), walking over what is in the way; the nearer one wins (below on a
    // tie), so the walk down stops once it is farther than what was found above.
    let dist = |c: u64| span.start.abs_diff(c).max(span.start.abs_diff(c + size));
    let mut above = None;
    let mut c = span.end.div_ceil(PAGE) * PAGE + PAGE;
    for _ in 0..8 {
        if !in_reach(c) {
            break;
        }
        match free_by_asking(sp, c, Guards::Gap, Some(&known), PROPOSAL_QUERIES)? {
            Asked::Free => {
                above = Some(c);
                break;
            }
            Asked::Taken(_, high) => c = high.div_ceil(PAGE) * PAGE,
            Asked::TooMany => return Ok(None),
        }
    }
    let mut below = None;
    let mut c = span.start.checked_sub(PAGE + size).map(|c| c / PAGE * PAGE);
    for _ in 0..8 {
        let Some(at) = c.filter(|&a| in_reach(a)) else {
            break;
        };
        if above.is_some_and(|a| dist(at) > dist(a)) {
            break;
        }
        match free_by_asking(sp, at, Guards::Gap, Some(&known), PROPOSAL_QUERIES)? {
            Asked::Free => {
                below = Some(at);
                break;
            }
            Asked::Taken(low, _) => c = low.checked_sub(PAGE + size).map(|c| c / PAGE * PAGE),
            Asked::TooMany => return Ok(None),
        }
    }
    Ok(match (below, above) {
        (Some(b), Some(a)) => Some(if dist(a) < dist(b) { a } else { b }),
        (b, a) => b.or(a),
    })
}

/// Room left above `[heap]` for it to grow (no region is placed there).
const HEAP_GUARD: u64 = 64 << 20;

/// Where to try a new region, in order: the plan's proposal if the maps read under this stop
/// show it free and within reach (a proposal already taken would cost an injected `mmap` that
/// fails with EEXIST), then the free ranges nearest the module.
pub(crate) fn region_candidates(maps: &[Mapping], span: &ModuleSpan, proposed: u64) -> Vec<u64> {
    let free = candidates(maps, span);
    let end = proposed.saturating_add(region::REGION_SIZE);
    let clear = proposed.is_multiple_of(4096)
        && !maps.iter().any(|m| m.start < end && proposed < m.end)
        && end.abs_diff(span.start) < crate::plan::REACH
        && proposed.abs_diff(span.end) < crate::plan::REACH
        && !maps
            .iter()
            .any(|m| m.name == "[heap]" && proposed < m.end + HEAP_GUARD && end > m.start);
    let mut out = Vec::with_capacity(free.len() + 1);
    if clear {
        out.push(proposed);
    }
    out.extend(free.into_iter().filter(|&a| a != proposed));
    out
}

fn hex_spaced(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a thread must run on before sites can be written.
#[derive(Debug, Clone, Copy)]
struct Blocker {
    tid: Tid,
    /// The offending address: the thread's next instruction, or a word on its stack.
    ip: u64,
    site: u64,
    end: u64,
    on_stack: bool,
}

/// How far above its stack pointer a thread's stack is scanned.
const STACK_SCAN_MAX: u64 = 8 << 20;

/// Each held thread's live stack: from its stack pointer to the end of the mapping that
/// holds it (at most [`STACK_SCAN_MAX`]). A signal handler on an alternate stack has its
/// interrupted context there, so that is where it is found.
/// The mapping of each stack is asked for once (threads on one stack share the answer).
fn live_stacks<T: Tracer>(sp: &mut StoppedProcess<T>) -> Result<Vec<(Tid, u64, u64)>, EngineError> {
    let rsps: Vec<(Tid, u64)> = sp.threads().map(|t| (t.tid, t.regs.rsp & !7)).collect();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut out = Vec::with_capacity(rsps.len());
    for (tid, rsp) in rsps {
        let end = match seen.iter().find(|&&(s, e)| s <= rsp && rsp < e) {
            Some(&(_, e)) => Some(e),
            None => sp.query_mapping(rsp, MapQuery::COVERING)?.map(|m| {
                seen.push((m.start, m.end));
                m.end
            }),
        };
        if let Some(end) = end {
            out.push((tid, rsp, end.min(rsp + STACK_SCAN_MAX)));
        }
    }
    Ok(out)
}

/// A buffer for stack scans, kept by the engine between stops: reading 64 thread stacks into
/// fresh memory costs a page fault per page inside the pause (it doubled the scan's time).
/// At most [`SCRATCH_KEEP`] bytes are kept.
#[derive(Default)]
pub(crate) struct Scratch(std::sync::Mutex<Vec<u8>>);

const SCRATCH_KEEP: usize = 8 << 20;

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "Scratch({len} bytes)")
    }
}

impl Scratch {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn put(&self, v: Vec<u8>) {
        if v.len() <= SCRATCH_KEEP
            && let Ok(mut kept) = self.0.lock()
            && kept.len() < v.len()
        {
            *kept = v;
        }
    }
}

/// The live stacks of every held thread (see [`live_stacks`]), read in one batch into the
/// engine's scratch buffer (given back when the scan is dropped).
struct StackScan<'e> {
    pool: &'e Scratch,
    buf: Vec<u8>,
    /// Thread, offset and length of its stack in `buf`.
    threads: Vec<(Tid, usize, usize)>,
}

impl Drop for StackScan<'_> {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

impl<'e> StackScan<'e> {
    fn read<T: Tracer>(sp: &mut StoppedProcess<T>, pool: &'e Scratch) -> Result<Self, EngineError> {
        let stacks = live_stacks(sp)?;
        let ranges: Vec<(u64, usize)> = stacks
            .iter()
            .map(|&(_, lo, hi)| (lo, (hi - lo) as usize))
            .collect();
        let total: usize = ranges.iter().map(|&(_, len)| len).sum();
        let mut scan = Self {
            pool,
            buf: pool.take(),
            threads: Vec::with_capacity(stacks.len()),
        };
        if scan.buf.len() < total {
            scan.buf.resize(total, 0);
        }
        let results = sp.read_many(&ranges, &mut scan.buf[..total])?;
        let mut at = 0;
        for ((tid, _, _), (r, &(_, len))) in
            stacks.into_iter().zip(results.into_iter().zip(&ranges))
        {
            // A live stack that cannot be read cannot be shown clear of sites: refuse (nothing
            // has been written when stacks are scanned).
            r?;
            scan.threads.push((tid, at, len));
            at += len;
        }
        Ok(scan)
    }

    /// The first 8-byte word on the readable stacks that lies in `lo..hi` and satisfies
    /// `hit`, with its thread. One compare per word for the (nearly all) words outside
    /// `lo..hi`: a 64-thread scan is some 36,000 words.
    fn find_word(&self, lo: u64, hi: u64, hit: impl Fn(u64) -> bool) -> Option<(Tid, u64)> {
        let span = hi.saturating_sub(lo);
        for &(tid, at, len) in &self.threads {
            for w in self.buf[at..at + len].chunks_exact(8) {
                let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if v.wrapping_sub(lo) < span && hit(v) {
                    return Some((tid, v));
                }
            }
        }
        None
    }
}

/// The first thread that would resume strictly inside one of `ranges`, or whose live stack
/// holds a word strictly inside one (a signal frame's saved RIP, a return address): when that
/// frame is resumed it would land in the middle of the new jump. A thread may sit at a
/// site's first byte: it then executes the new jump, or the restored original. With no
/// blocker, also returns the stack scan it made (valid until a thread runs again).
fn find_blocker<'e, T: Tracer>(
    sp: &mut StoppedProcess<T>,
    ranges: &[(u64, u64)],
    pool: &'e Scratch,
) -> Result<Result<StackScan<'e>, Blocker>, EngineError> {
    let inside = |a: u64| ranges.iter().find(|&&(s, e)| a > s && a < e).copied();
    let by_ip = sp.threads().find_map(|t| {
        let ip = t.regs.resume_ip();
        inside(ip).map(|(site, end)| Blocker {
            tid: t.tid,
            ip,
            site,
            end,
            on_stack: false,
        })
    });
    if let Some(b) = by_ip {
        return Ok(Err(b));
    }
    let scan = StackScan::read(sp, pool)?;
    let lo = ranges.iter().map(|&(s, _)| s + 1).min().unwrap_or(0);
    let hi = ranges.iter().map(|&(_, e)| e).max().unwrap_or(0);
    let on_stack = scan
        .find_word(lo, hi, |v| inside(v).is_some())
        .and_then(|(tid, v)| {
            inside(v).map(|(site, end)| Blocker {
                tid,
                ip: v,
                site,
                end,
                on_stack: true,
            })
        });
    Ok(on_stack.map_or(Ok(scan), Err))
}

/// Lets threads found inside `ranges` (by instruction pointer or stack) run on until none
/// is, bounded. Returns the tries and the last stack scan (taken after the last run, so it
/// is what the stacks hold until a thread runs again).
fn wait_out_of<'e, T: Tracer>(
    sp: &mut StoppedProcess<T>,
    ranges: &[(u64, u64)],
    engine: &'e Engine,
) -> Result<(u32, StackScan<'e>), EngineError> {
    let mut tries = 0;
    loop {
        let b = match find_blocker(sp, ranges, &engine.scratch)? {
            Ok(scan) => return Ok((tries, scan)),
            Err(b) => b,
        };
        if tries >= engine.options.max_site_retries {
            return Err(EngineError::ThreadInSite {
                pid: sp.pid().0,
                tid: b.tid.0,
                ip: b.ip,
                site: b.site,
                end: b.end,
                on_stack: b.on_stack,
                tries,
            });
        }
        tries += 1;
        // Doubling windows (capped at 16x): on a loaded host a thread just let go may not
        // get a CPU within the first window at all.
        let run = engine.options.site_retry_run * (1u32 << (tries - 1).min(4));
        sp.run_thread_briefly(b.tid, run)?;
    }
}

/// One site write: where, what goes there, and what must be there right before.
struct SiteWrite {
    addr: u64,
    new: Vec<u8>,
    expect: Vec<u8>,
}

/// Writes every site: as one read-modify-write when they lie within [`ONE_WRITE_SPAN`], else
/// one by one restoring the written ones on failure. Each site must still hold `expect` (a
/// thread let run meanwhile could have changed code). Verifies by reading back.
fn write_sites<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    writes: &[SiteWrite],
) -> Result<(), EngineError> {
    let lo = writes.iter().map(|w| w.addr).min().unwrap_or(0);
    let hi = writes
        .iter()
        .map(|w| w.addr + w.new.len() as u64)
        .max()
        .unwrap_or(0);
    let pid = sp.pid().0;
    let modified = |addr| EngineError::SiteModified { pid, addr };
    if hi - lo <= ONE_WRITE_SPAN {
        let before = sp.read_vec(lo, (hi - lo) as usize)?;
        let mut span = before.clone();
        for w in writes {
            let o = (w.addr - lo) as usize;
            if span[o..o + w.expect.len()] != w.expect[..] {
                return Err(modified(w.addr));
            }
            span[o..o + w.new.len()].copy_from_slice(&w.new);
        }
        if let Err(e) = sp.write_verified(lo, &span) {
            // The write may have landed (only the read-back failed): put the span back.
            let _ = sp.write(lo, &before);
            return Err(e.into());
        }
        return Ok(());
    }
    for w in writes {
        if sp.read_vec(w.addr, w.expect.len())? != w.expect {
            return Err(modified(w.addr));
        }
    }
    for (i, w) in writes.iter().enumerate() {
        if let Err(e) = sp.write_verified(w.addr, &w.new) {
            for u in writes[..=i].iter().rev() {
                let _ = sp.write(u.addr, &u.expect);
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// The writes of a commit, on a stopped process whose threads are clear of every site,
/// against a plan linked for the region as it is. Every failure path undoes what was
/// written (the caller unmaps a region it created).
///
/// `unchanged`: site bytes read under this stop since which no thread has run (they are
/// what the sites hold now), if any.
fn commit_linked<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    plan: &Plan,
    header: &RegionHeader,
    unchanged: Option<&[(u64, &[u8])]>,
) -> Result<(), EngineError> {
    let base = plan.region.addr();
    let record_addr = base + plan.record_offset;
    // Trampolines, then the record (state Applying), then the header that counts it.
    // None of this is reachable until a site jumps to it, so it is read back once, all of it
    // in one batched read, before the first site is written (fewer `/proc/PID/mem` round
    // trips: a read-back per write cost ~2.5 us each).
    for s in &plan.sites {
        sp.write(s.tramp_addr, &s.trampoline)?;
    }
    kill_point("trampolines_written");
    let mut record = plan.record.clone();
    record.state = RecordState::Applying;
    let record_bytes = record.encode();
    let mut h = header.clone();
    h.records.push(record.clone());
    h.records_next =
        (plan.record_offset as usize + PatchRecord::encoded_len(plan.sites.len())) as u32;
    h.tramp_next = plan.tramp_offset as u32 + record.tramp_len;
    let header_bytes = h.encode_fixed();
    // Record and header: one write when the record directly follows the header (the first
    // record of a region), the record first otherwise.
    let contiguous = record_addr == base + header_bytes.len() as u64;
    let written = if contiguous {
        let mut both = header_bytes.clone();
        both.extend_from_slice(&record_bytes);
        sp.write(base, &both)
    } else {
        sp.write(record_addr, &record_bytes)
            .and_then(|()| sp.write(base, &header_bytes))
    };
    let mut ranges: Vec<(u64, usize)> = plan
        .sites
        .iter()
        .map(|s| (s.tramp_addr, s.trampoline.len()))
        .collect();
    ranges.push((record_addr, record_bytes.len()));
    ranges.push((base, header_bytes.len()));
    let expected: Vec<u8> = plan
        .sites
        .iter()
        .flat_map(|s| s.trampoline.iter().copied())
        .chain(record_bytes.iter().copied())
        .chain(header_bytes.iter().copied())
        .collect();
    let verified = written.and_then(|()| {
        let mut back = vec![0u8; expected.len()];
        let results = sp.read_many(&ranges, &mut back)?;
        for r in results {
            r?;
        }
        if back == expected {
            Ok(())
        } else {
            Err(stitch_sys::SysError::VerifyMismatch {
                pid: sp.pid(),
                addr: base,
                len: expected.len(),
            })
        }
    });
    if let Err(e) = verified {
        // The old header may be (half) overwritten: put it back (best effort).
        let _ = sp.write(base, &header.encode_fixed());
        return Err(e.into());
    }
    kill_point("record_written");

    // The jumps: all or none.
    let writes: Vec<SiteWrite> = plan
        .sites
        .iter()
        .map(|s| SiteWrite {
            addr: s.addr,
            new: s.new_bytes.clone(),
            expect: s.original.clone(),
        })
        .collect();
    let state_at = record_addr + 16;
    if let Some(r) = jumps_and_state_in_one_span(sp, &writes, state_at, unchanged) {
        return r.inspect_err(|_| mark(sp, record_addr, RecordState::Reverted));
    }
    if let Err(e) = write_sites(sp, &writes) {
        mark(sp, record_addr, RecordState::Reverted);
        return Err(e);
    }
    kill_point("sites_written");
    // Recorded as applied, or undone: the record must tell the truth.
    if let Err(e) = sp.write_verified(state_at, &(RecordState::Applied as u32).to_le_bytes()) {
        let undo: Vec<SiteWrite> = writes
            .into_iter()
            .map(|w| SiteWrite {
                addr: w.addr,
                new: w.expect,
                expect: w.new,
            })
            .collect();
        let _ = write_sites(sp, &undo);
        mark(sp, record_addr, RecordState::Reverted);
        return Err(e.into());
    }
    kill_point("marked_applied");
    Ok(())
}

/// The commit's last step when the sites lie within [`ONE_WRITE_SPAN`] (else `None`): every
/// jump in one read-modify-write of the span (all or none, as [`write_sites`]), then the
/// record's state `applied`, then **one** batched read-back of both. The span is not read
/// first when it is exactly one site whose bytes were verified under this stop with no
/// thread run since (`unchanged`). Any failure puts the span's old bytes back (the caller
/// marks the record `reverted`): the process is left exactly original. A patcher killed
/// between the writes leaves jumps with an `applying` record, settled by the next apply.
fn jumps_and_state_in_one_span<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    writes: &[SiteWrite],
    state_at: u64,
    unchanged: Option<&[(u64, &[u8])]>,
) -> Option<Result<(), EngineError>> {
    let lo = writes.iter().map(|w| w.addr).min()?;
    let hi = writes.iter().map(|w| w.addr + w.new.len() as u64).max()?;
    if hi - lo > ONE_WRITE_SPAN {
        return None;
    }
    let pid = sp.pid().0;
    Some((|| {
        let known = match (writes, unchanged) {
            ([w], Some(verified))
                if w.new.len() == w.expect.len()
                    && verified
                        .iter()
                        .any(|&(a, b)| a == w.addr && b == &w.expect[..]) =>
            {
                Some(w.expect.clone())
            }
            _ => None,
        };
        let before = match known {
            Some(b) => b,
            None => sp.read_vec(lo, (hi - lo) as usize)?,
        };
        let mut span = before.clone();
        for w in writes {
            let o = (w.addr - lo) as usize;
            if span[o..o + w.expect.len()] != w.expect[..] {
                return Err(EngineError::SiteModified { pid, addr: w.addr });
            }
            span[o..o + w.new.len()].copy_from_slice(&w.new);
        }
        let undo = |sp: &mut StoppedProcess<T>, e: EngineError| {
            // The write may have landed (only a later step failed): put the span back.
            let _ = sp.write(lo, &before);
            Err(e)
        };
        if let Err(e) = sp.write(lo, &span) {
            return undo(sp, e.into());
        }
        kill_point("sites_written");
        let state = (RecordState::Applied as u32).to_le_bytes();
        if let Err(e) = sp.write(state_at, &state) {
            return undo(sp, e.into());
        }
        let mut back = vec![0u8; span.len() + state.len()];
        let read = sp.read_many(&[(lo, span.len()), (state_at, state.len())], &mut back);
        let results = match read {
            Ok(r) => r,
            Err(e) => return undo(sp, e.into()),
        };
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return undo(sp, e.into());
        }
        if back[..span.len()] != span[..] || back[span.len()..] != state[..] {
            let (addr, len) = if back[..span.len()] != span[..] {
                (lo, span.len())
            } else {
                (state_at, state.len())
            };
            return undo(
                sp,
                stitch_sys::SysError::VerifyMismatch {
                    pid: sp.pid(),
                    addr,
                    len,
                }
                .into(),
            );
        }
        kill_point("marked_applied");
        Ok(())
    })())
}

/// Best effort: records a state (used on the failure paths, where the original error is what
/// the caller must see).
fn mark<T: Tracer>(sp: &mut StoppedProcess<T>, record_addr: u64, state: RecordState) {
    let _ = sp.write(record_addr + 16, &(state as u32).to_le_bytes());
}

fn revert_stopped<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    id: &str,
    engine: &Engine,
) -> Result<(u32, u64, bool), EngineError> {
    let pid = sp.pid();
    let mut found = None;
    for (start, h) in regions_held(sp, |_| true)? {
        if let Some(r) = h
            .records
            .iter()
            .find(|r| r.id == id && r.state != RecordState::Reverted)
        {
            found = Some((start, h.clone(), r.clone()));
            break;
        }
    }
    let (base, header, record) = found.ok_or_else(|| EngineError::NotApplied {
        pid: pid.0,
        id: id.to_string(),
    })?;
    // Each site must hold our jump (or, after a crash mid-apply, still the original).
    let mut writes = Vec::new();
    for s in &record.sites {
        let now = sp.read_vec(s.addr, s.original.len())?;
        let ours = stitch_x86::site_bytes(s.addr, s.original.len(), s.tramp).unwrap_or_default();
        if now == s.original {
            continue;
        }
        if now != ours {
            return Err(EngineError::SiteModified {
                pid: pid.0,
                addr: s.addr,
            });
        }
        writes.push(SiteWrite {
            addr: s.addr,
            new: s.original.clone(),
            expect: ours,
        });
    }
    let ranges: Vec<(u64, u64)> = record
        .sites
        .iter()
        .map(|s| (s.addr, s.addr + s.original.len() as u64))
        .collect();
    // No thread runs from here on: the scan stays valid for the freeing check below.
    let (_, stacks) = wait_out_of(sp, &ranges, engine)?;
    let hits = sp.read_vec(base + record.offset + region::HITS_OFFSET, 8)?;
    let hits = u64::from_le_bytes(hits.try_into().unwrap_or([0; 8]));
    if !writes.is_empty() {
        write_sites(sp, &writes)?;
    }
    kill_point("revert_sites_restored");
    let state_at = base + record.offset + 16;
    if let Err(e) = sp.write_verified(state_at, &(RecordState::Reverted as u32).to_le_bytes()) {
        // The record must tell the truth: put the jumps back.
        let redo: Vec<SiteWrite> = writes
            .into_iter()
            .map(|w| SiteWrite {
                addr: w.addr,
                new: w.expect,
                expect: w.new,
            })
            .collect();
        if !redo.is_empty() {
            let _ = write_sites(sp, &redo);
        }
        mark(sp, base + record.offset, record.state);
        return Err(e.into());
    }
    let others_live = header
        .records
        .iter()
        .any(|r| r.offset != record.offset && r.state != RecordState::Reverted);
    // An empty region is kept for the next apply to this module when the engine is set to
    // (it is started afresh then, once nothing uses it); else freed if nothing uses it.
    let freed = !others_live
        && !engine.options.keep_idle_regions
        && try_free_region(sp, &stacks, base).unwrap_or(false);
    Ok((record.revision, hits, freed))
}

/// Unmaps the region if nothing uses it (see [`region_unused`]).
fn try_free_region<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    stacks: &StackScan<'_>,
    base: u64,
) -> Result<bool, EngineError> {
    if !region_unused(sp, stacks, base) {
        return Ok(false);
    }
    sp.remote_munmap(base, region::REGION_SIZE)?;
    Ok(true)
}

/// True when no thread executes in the region and no register and no word on any thread's
/// live stack points into it (a return address into a trampoline, e.g. from a relocated
/// `call`, or a signal frame interrupted there). `stacks` must have been read since any
/// thread last ran (a scan exists only when every live stack could be read).
fn region_unused<T: Tracer>(sp: &StoppedProcess<T>, stacks: &StackScan<'_>, base: u64) -> bool {
    let end = base + region::REGION_SIZE;
    let inside = |a: u64| a >= base && a < end;
    let in_regs = sp.threads().any(|t| {
        let r = &t.regs;
        [
            r.rip,
            r.resume_ip(),
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
        ]
        .into_iter()
        .any(inside)
    });
    !in_regs && stacks.find_word(base, end, |_| true).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_values_match_linux() {
        assert_eq!(PROT_RW, 3);
        assert_eq!(PROT_RX, 5);
    }
}

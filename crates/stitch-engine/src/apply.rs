//! Committing a plan to a stopped process, reverting, and reading what a process carries.

use std::time::{Duration, Instant};

use stitch_format::VerifiedBundle;
use stitch_sys::{Pid, Placement, RealtimeGuard, StoppedProcess, Tracer};

use crate::identify::{maybe_region, read_maps};
use crate::plan::{Plan, RegionPlan, candidates, find_region, link_plan};
use crate::region::{self, PatchRecord, RecordState, RegionHeader};
use crate::{Engine, EngineError};

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The plan as committed (re-linked under the stop if the process changed meanwhile).
    pub plan: Plan,
    /// Whether a new Stitch region was mapped.
    pub region_created: bool,
    /// Threads held during the window.
    pub threads: usize,
    /// Times a thread had to be let run on because it sat inside a site.
    pub site_retries: u32,
    /// How long the process's threads were stopped.
    pub pause: Duration,
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
    pub record: PatchRecord,
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

    /// Applies a plan made earlier: stops the process, re-checks everything against the
    /// process as it is now, re-links if the region moved, then commits.
    pub fn apply_plan(
        &self,
        plan: &Plan,
        bundle: &VerifiedBundle,
    ) -> Result<ApplyReport, EngineError> {
        let pid = plan.pid;
        let _rt = self.options.realtime.then(RealtimeGuard::enter);
        let deadline = Instant::now() + self.options.stop_timeout;
        let mut sp = stitch_sys::stop_all(pid, deadline)?;
        let t0 = Instant::now();
        let result = self.commit_fresh(&mut sp, plan, bundle);
        let pause = t0.elapsed();
        let threads = sp.tids().len();
        let released = sp.resume();
        let (plan, region_created, site_retries) = result?;
        released?;
        tracing::info!(pid = pid.0, patch_id = %plan.patch_id, ?pause, threads, "applied");
        Ok(ApplyReport {
            plan,
            region_created,
            threads,
            site_retries,
            pause,
        })
    }

    fn commit_fresh<T: Tracer>(
        &self,
        sp: &mut StoppedProcess<T>,
        plan: &Plan,
        bundle: &VerifiedBundle,
    ) -> Result<(Plan, bool, u32), EngineError> {
        let pid = plan.pid;
        // The process may have changed between plan and stop: re-read its layout now that
        // nothing in it can move.
        let entries = read_maps(pid)?;
        let modules = self.digests.modules(pid, &entries, None)?;
        let module = modules
            .into_iter()
            .find(|m| m.sha256 == plan.module_sha256 && m.start == plan.module_start)
            .ok_or_else(|| EngineError::ModuleNotMapped {
                pid: pid.0,
                sha256: hex::encode(plan.module_sha256),
            })?;
        let (region_addr, header, created) =
            match find_region(pid, &entries, &module, plan.module_bias)? {
                Some((addr, header)) => (addr, header, false),
                None => {
                    let mut tried = vec![plan.region.addr()];
                    tried.extend(candidates(&entries, &module));
                    let addr = create_region(sp, &tried)?;
                    (
                        addr,
                        RegionHeader::new(module.sha256, plan.module_bias),
                        true,
                    )
                }
            };
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
        let region_plan = if created {
            RegionPlan::New { addr: region_addr }
        } else {
            RegionPlan::Existing { addr: region_addr }
        };
        let fresh = link_plan(
            pid,
            bundle.patch(),
            plan.patch_digest,
            &module,
            plan.module_bias,
            region_plan,
            &header,
            plan.imports.clone(),
        )?;
        let result = commit(sp, &fresh, &header, self);
        if result.is_err() && created {
            // Nothing points into a region we just made: give it back.
            let _ = sp.remote_munmap(region_addr, region::REGION_SIZE);
        }
        let retries = result?;
        Ok((fresh, created, retries))
    }

    /// Reverts patch `id` in `pid`.
    pub fn revert(&self, pid: Pid, id: &str) -> Result<RevertReport, EngineError> {
        let _rt = self.options.realtime.then(RealtimeGuard::enter);
        let deadline = Instant::now() + self.options.stop_timeout;
        let mut sp = stitch_sys::stop_all(pid, deadline)?;
        let t0 = Instant::now();
        let result = revert_stopped(&mut sp, id, self);
        let pause = t0.elapsed();
        let released = sp.resume();
        let (revision, hits, region_freed) = result?;
        released?;
        tracing::info!(pid = pid.0, patch_id = id, ?pause, region_freed, "reverted");
        Ok(RevertReport {
            pid,
            id: id.to_string(),
            revision,
            hits,
            region_freed,
            pause,
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
            for record in h.records {
                out.push(AppliedPatch {
                    pid,
                    region: e.start,
                    module_sha256: h.module_sha256,
                    record,
                });
            }
        }
        Ok(out)
    }
}

/// Maps a new region at the first free candidate, names it, and makes the trampoline part
/// executable. Returns its address.
fn create_region<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    candidates: &[u64],
) -> Result<u64, EngineError> {
    let mut last = None;
    for &addr in candidates.iter().take(16) {
        match sp.remote_mmap(Placement::Exact(addr), region::REGION_SIZE, PROT_RW) {
            Ok(a) => {
                let named =
                    sp.remote_prctl_set_vma_anon_name(a, region::REGION_SIZE, region::ANON_NAME);
                if let Err(e) = named {
                    tracing::debug!(error = %e, "naming the region failed");
                }
                let prot = sp.remote_mprotect(
                    a + region::TRAMPOLINE_START,
                    region::REGION_SIZE - region::TRAMPOLINE_START,
                    PROT_RX,
                );
                if let Err(e) = prot {
                    let _ = sp.remote_munmap(a, region::REGION_SIZE);
                    return Err(e.into());
                }
                return Ok(a);
            }
            Err(e) if e.remote_errno().is_some() => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    match last {
        Some(e) => Err(e.into()),
        None => Err(EngineError::NoFreeRange {
            pid: sp.pid().0,
            near: candidates.first().copied().unwrap_or(0),
        }),
    }
}

fn hex_spaced(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A thread that would resume strictly inside one of `ranges` (it may sit at a site's first
/// byte: it will then execute the new jump, or the restored original).
fn thread_inside<T: Tracer>(
    sp: &StoppedProcess<T>,
    ranges: &[(u64, u64)],
) -> Option<(stitch_sys::Tid, u64, u64, u64)> {
    sp.threads().find_map(|t| {
        let ip = t.regs.resume_ip();
        ranges
            .iter()
            .find(|&&(a, e)| ip > a && ip < e)
            .map(|&(a, e)| (t.tid, ip, a, e))
    })
}

/// Lets threads found inside `ranges` run on until none is, bounded.
fn wait_out_of<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    ranges: &[(u64, u64)],
    engine: &Engine,
) -> Result<u32, EngineError> {
    let mut tries = 0;
    while let Some((tid, ip, site, end)) = thread_inside(sp, ranges) {
        if tries >= engine.options.max_site_retries {
            return Err(EngineError::ThreadInSite {
                pid: sp.pid().0,
                tid: tid.0,
                ip,
                site,
                end,
                tries,
            });
        }
        tries += 1;
        sp.run_thread_briefly(tid, engine.options.site_retry_run)?;
    }
    Ok(tries)
}

/// Writes `(addr, bytes)` pairs: as one read-modify-write when they lie within
/// [`ONE_WRITE_SPAN`], else one by one restoring the written ones on failure. Verifies by
/// reading back.
fn write_sites<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    writes: &[(u64, Vec<u8>)],
    undo: &[(u64, Vec<u8>)],
) -> Result<(), EngineError> {
    let lo = writes.iter().map(|w| w.0).min().unwrap_or(0);
    let hi = writes
        .iter()
        .map(|w| w.0 + w.1.len() as u64)
        .max()
        .unwrap_or(0);
    if hi - lo <= ONE_WRITE_SPAN {
        let mut span = sp.read_vec(lo, (hi - lo) as usize)?;
        for (a, b) in writes {
            let o = (a - lo) as usize;
            span[o..o + b.len()].copy_from_slice(b);
        }
        sp.write_verified(lo, &span)?;
        return Ok(());
    }
    for (i, (a, b)) in writes.iter().enumerate() {
        if let Err(e) = sp.write_verified(*a, b) {
            for (ua, ub) in undo[..=i].iter().rev() {
                let _ = sp.write(*ua, ub);
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// The commit itself, on a stopped process, against a plan linked for the region as it is.
/// Returns how many times a thread had to be let run on.
pub(crate) fn commit<T: Tracer>(
    sp: &mut StoppedProcess<T>,
    plan: &Plan,
    header: &RegionHeader,
    engine: &Engine,
) -> Result<u32, EngineError> {
    let pid = plan.pid;
    // 1. Exact original bytes at every site, in memory.
    for s in &plan.sites {
        let found = sp.read_vec(s.addr, s.original.len())?;
        if found != s.original {
            return Err(EngineError::UnexpectedBytes {
                pid: pid.0,
                patchlet: s.patchlet.clone(),
                addr: s.addr,
                expected: hex_spaced(&s.original),
                found: hex_spaced(&found),
            });
        }
    }
    let base = plan.region.addr();
    // 2. Trampolines, then the record (state Applying), then the header that counts it.
    //    None of this is reachable until a site jumps to it.
    for s in &plan.sites {
        sp.write_verified(s.tramp_addr, &s.trampoline)?;
    }
    let mut record = plan.record.clone();
    record.state = RecordState::Applying;
    sp.write_verified(base + plan.record_offset, &record.encode())?;
    let mut h = header.clone();
    h.records.push(record.clone());
    h.records_next =
        (plan.record_offset as usize + PatchRecord::encoded_len(plan.sites.len())) as u32;
    h.tramp_next = plan.tramp_offset as u32 + record.tramp_len;
    sp.write_verified(base, &h.encode_fixed())?;

    // 3. No thread may resume inside bytes about to be replaced.
    let ranges: Vec<(u64, u64)> = plan
        .sites
        .iter()
        .map(|s| (s.addr, s.addr + s.original.len() as u64))
        .collect();
    let retries = match wait_out_of(sp, &ranges, engine) {
        Ok(n) => n,
        Err(e) => {
            mark(sp, base + plan.record_offset, RecordState::Reverted);
            return Err(e);
        }
    };

    // 4. The jumps: all or none.
    let writes: Vec<(u64, Vec<u8>)> = plan
        .sites
        .iter()
        .map(|s| (s.addr, s.new_bytes.clone()))
        .collect();
    let undo: Vec<(u64, Vec<u8>)> = plan
        .sites
        .iter()
        .map(|s| (s.addr, s.original.clone()))
        .collect();
    if let Err(e) = write_sites(sp, &writes, &undo) {
        mark(sp, base + plan.record_offset, RecordState::Reverted);
        return Err(e);
    }
    // 5. Done.
    record.state = RecordState::Applied;
    let state_at = base + plan.record_offset + 16;
    sp.write_verified(state_at, &(RecordState::Applied as u32).to_le_bytes())?;
    Ok(retries)
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
    let entries = read_maps(pid)?;
    let mut found = None;
    for e in entries.iter().filter(|e| maybe_region(e)) {
        let data = sp.read_vec(e.start, region::TRAMPOLINE_START as usize)?;
        if !RegionHeader::looks_like_region(&data) {
            continue;
        }
        let h = RegionHeader::decode(&data)?;
        if let Some(r) = h
            .records
            .iter()
            .find(|r| r.id == id && r.state != RecordState::Reverted)
        {
            found = Some((e.start, h.clone(), r.clone()));
            break;
        }
    }
    let (base, header, record) = found.ok_or_else(|| EngineError::NotApplied {
        pid: pid.0,
        id: id.to_string(),
    })?;
    // Each site must hold our jump (or, after a crash mid-apply, still the original).
    let mut writes = Vec::new();
    let mut undo = Vec::new();
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
        writes.push((s.addr, s.original.clone()));
        undo.push((s.addr, ours));
    }
    let ranges: Vec<(u64, u64)> = record
        .sites
        .iter()
        .map(|s| (s.addr, s.addr + s.original.len() as u64))
        .collect();
    wait_out_of(sp, &ranges, engine)?;
    if !writes.is_empty() {
        write_sites(sp, &writes, &undo)?;
    }
    let hits = sp.read_vec(base + record.offset + region::HITS_OFFSET, 8)?;
    let hits = u64::from_le_bytes(hits.try_into().unwrap_or([0; 8]));
    sp.write_verified(
        base + record.offset + 16,
        &(RecordState::Reverted as u32).to_le_bytes(),
    )?;
    let others_live = header
        .records
        .iter()
        .any(|r| r.offset != record.offset && r.state != RecordState::Reverted);
    let freed = !others_live && try_free_region(sp, base)?;
    Ok((record.revision, hits, freed))
}

/// Unmaps the region if no thread executes in it and no word on any thread's stack points
/// into it (a return address into a trampoline, e.g. from a relocated `call`).
fn try_free_region<T: Tracer>(sp: &mut StoppedProcess<T>, base: u64) -> Result<bool, EngineError> {
    let end = base + region::REGION_SIZE;
    let inside = |a: u64| a >= base && a < end;
    if sp
        .threads()
        .any(|t| inside(t.regs.rip) || inside(t.regs.resume_ip()))
    {
        return Ok(false);
    }
    let maps = sp.mappings()?;
    let stacks: Vec<(u64, u64)> = sp
        .threads()
        .filter_map(|t| {
            let rsp = t.regs.rsp;
            maps.iter()
                .find(|m| m.contains(rsp))
                .map(|m| (rsp & !7, m.end.min((rsp & !7) + (8 << 20))))
        })
        .collect();
    for (lo, hi) in stacks {
        let words = sp.read_vec(lo, (hi - lo) as usize)?;
        if words
            .chunks_exact(8)
            .any(|w| inside(u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))))
        {
            return Ok(false);
        }
    }
    // Also registers: a callee-saved register could hold a trampoline address.
    if sp.threads().any(|t| {
        let r = &t.regs;
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15,
        ]
        .into_iter()
        .any(inside)
    }) {
        return Ok(false);
    }
    sp.remote_munmap(base, region::REGION_SIZE)?;
    Ok(true)
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

//! The apply/revert protocol against `FakeTracer`, with a failure injected at every call of
//! every kind: afterwards the process is exactly original or exactly fully patched (never
//! in between), and no thread is left held. Needs no privilege.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use stitch_engine::region::{self, PatchRecord, RecordState, RegionHeader};
use stitch_engine::{Engine, Plan, RegionPlan};
use stitch_format::Patch;
use stitch_sys::{
    CallKind, FakeProcess, FakeRegion, FakeThread, FakeTracer, Perms, Pid, Tid, stop_all_with,
};

use crate::TARGET_C;
use crate::common::*;

const PID: Pid = Pid(4242);
const STACK: u64 = 0x7ffd_0000_0000;

struct Fixture {
    bytes: Vec<u8>,
    patch: Patch,
    site: u64,
    original: Vec<u8>,
}

fn fixture() -> Fixture {
    // Non-PIE: the module's addresses are its link-time addresses (bias 0).
    let t = compile(TARGET_C, &["-no-pie"]);
    let b = patch(&t, "ST-2026-0500", "compute", "drop", RETURN_1000);
    let (site, original) = entry_site(&t.bytes, "compute");
    Fixture {
        bytes: t.bytes.clone(),
        patch: b.patch().clone(),
        site,
        original,
    }
}

/// A fake process mapping the module's segments, a vdso with a `syscall` instruction, and
/// a stack; a leader away from the site, a thread inside the site that moves out when let
/// run, and a thread that is cloned while the stop is under way.
fn world(f: &Fixture) -> FakeTracer {
    let elf = stitch_elf::ElfFile::parse(&f.bytes).unwrap();
    let mut p = FakeProcess::typical(PID, 0);
    p.regions.clear();
    for s in elf.load_segments() {
        let start = s.vaddr & !0xfff;
        let end = (s.vaddr + s.memsz).div_ceil(0x1000) * 0x1000;
        let mut bytes = vec![0u8; (end - start) as usize];
        let in_page = (s.vaddr - start) as usize;
        let file = &f.bytes[s.offset as usize..(s.offset + s.filesz) as usize];
        bytes[in_page..in_page + file.len()].copy_from_slice(file);
        p.add_region(FakeRegion {
            start,
            perms: Perms {
                read: s.readable,
                write: s.writable,
                exec: s.executable,
                shared: false,
            },
            name: "/fake/target".into(),
            bytes,
        });
    }
    let mut vdso = vec![0xccu8; 0x1000];
    vdso[0x10] = 0x0f;
    vdso[0x11] = 0x05;
    p.add_region(FakeRegion {
        start: 0x7fff_f7fc_0000,
        perms: Perms::RX,
        name: "[vdso]".into(),
        bytes: vdso,
    });
    p.add_region(FakeRegion {
        start: STACK,
        perms: Perms::RW,
        name: "[stack]".into(),
        bytes: vec![0; 0x1_0000],
    });
    p.threads.clear();
    p.threads
        .insert(PID.leader(), FakeThread::at(f.site + 0x40));
    let mut inside = FakeThread::at(f.site + 1);
    inside.rip_after_run = VecDeque::from([f.site + 2, f.site + 0x30]);
    inside.regs.rsp = STACK + 0xc000;
    p.threads.insert(Tid(PID.0 + 1), inside);
    let mut late = FakeThread::at(f.site + 0x50);
    late.regs.rsp = STACK + 0x8000;
    p.appear_on_list.push_back(Vec::new());
    p.appear_on_list.push_back(vec![(Tid(PID.0 + 2), late)]);
    let mut fake = FakeTracer::new();
    fake.add_process(PID, p);
    fake
}

fn plan_for(f: &Fixture) -> Plan {
    let p = &f.patch;
    Plan {
        pid: PID,
        patch_id: p.id.clone(),
        revision: p.revision,
        patch_digest: [7; 32],
        module_path: "/fake/target".into(),
        module_sha256: p.target.sha256,
        module_bias: 0,
        module_start: 0x40_0000,
        module_end: 0x40_5000,
        region: RegionPlan::New { addr: 0x1000_0000 },
        record_offset: 0,
        tramp_offset: 0,
        imports: Vec::new(),
        sites: Vec::new(),
        record: PatchRecord {
            offset: 0,
            state: RecordState::Applying,
            id: p.id.clone(),
            revision: p.revision,
            patch_digest: [7; 32],
            hits: 0,
            tramp_offset: 0,
            tramp_len: 0,
            sites: Vec::new(),
        },
    }
}

/// Regions of the fake process that carry a Stitch header: (address, header).
fn regions(fake: &FakeTracer) -> Vec<(u64, RegionHeader)> {
    fake.process(PID)
        .unwrap()
        .regions
        .iter()
        .filter(|r| RegionHeader::looks_like_region(&r.bytes))
        .map(|r| (r.start, RegionHeader::decode(&r.bytes).unwrap()))
        .collect()
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Original,
    Patched,
}

/// Exactly original, or exactly fully patched; panics on anything in between.
fn outcome(f: &Fixture, fake: &FakeTracer, ctx: &str) -> Outcome {
    assert!(fake.all_released(PID), "{ctx}: a thread is left held");
    let site = fake.memory(PID, f.site, f.original.len()).unwrap();
    let live: Vec<(u64, PatchRecord)> = regions(fake)
        .into_iter()
        .flat_map(|(a, h)| h.records.into_iter().map(move |r| (a, r)))
        .filter(|(_, r)| r.state != RecordState::Reverted)
        .collect();
    if site == f.original {
        assert!(
            live.is_empty(),
            "{ctx}: original bytes but a live record {live:?}"
        );
        return Outcome::Original;
    }
    assert_eq!(live.len(), 1, "{ctx}: site changed, records {live:?}");
    let (base, r) = &live[0];
    assert_eq!(r.state, RecordState::Applied, "{ctx}");
    let s = &r.sites[0];
    assert_eq!(
        Some(site),
        stitch_x86::site_bytes(f.site, f.original.len(), s.tramp),
        "{ctx}: the site holds exactly our jump"
    );
    assert!(s.tramp >= base + region::TRAMPOLINE_START && s.tramp < base + region::REGION_SIZE);
    let tramp = fake.memory(PID, s.tramp, 16).unwrap();
    assert!(
        tramp.iter().any(|&b| b != 0),
        "{ctx}: the trampoline is written"
    );
    let rx =
        fake.process(PID).unwrap().regions.iter().any(|g| {
            g.start <= s.tramp && s.tramp < g.start + g.bytes.len() as u64 && g.perms.exec
        });
    assert!(rx, "{ctx}: the trampoline is executable");
    Outcome::Patched
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

/// Stop + commit + release against `fake`.
fn apply(engine: &Engine, fake: &mut FakeTracer, f: &Fixture) -> Result<(), String> {
    let mut sp = stop_all_with(&mut *fake, PID, deadline()).map_err(|e| e.code().to_string())?;
    let r = engine.commit(&mut sp, &plan_for(f), &f.patch);
    let released = sp.resume();
    r.map_err(|e| e.code().to_string())?;
    released.map_err(|e| e.code().to_string())
}

fn revert(engine: &Engine, fake: &mut FakeTracer, id: &str) -> Result<(), String> {
    let mut sp = stop_all_with(&mut *fake, PID, deadline()).map_err(|e| e.code().to_string())?;
    let r = engine.revert_held(&mut sp, id);
    let released = sp.resume();
    r.map_err(|e| e.code().to_string())?;
    released.map_err(|e| e.code().to_string())
}

/// Frees an empty region at revert when nothing uses it (the freeing rule under test in most
/// of these tests); [`keeping_engine`] keeps it for reuse (the default).
fn fast_engine() -> Engine {
    let mut e = Engine::new();
    e.options.realtime = false;
    e.options.site_retry_run = Duration::ZERO;
    e.options.keep_idle_regions = false;
    e
}

fn keeping_engine() -> Engine {
    let mut e = fast_engine();
    e.options.keep_idle_regions = true;
    e
}

#[test]
fn fake_kept_idle_region_is_reused_and_started_afresh() {
    let f = fixture();
    let engine = keeping_engine();
    let mut fake = world(&f);
    apply(&engine, &mut fake, &f).unwrap();
    let (base, _) = regions(&fake).pop().unwrap();
    revert(&engine, &mut fake, &f.patch.id).unwrap();
    assert_eq!(outcome(&f, &fake, "revert"), Outcome::Original);
    let rs = regions(&fake);
    assert_eq!(rs.len(), 1, "the empty region is kept");
    assert!(
        rs[0]
            .1
            .records
            .iter()
            .all(|r| r.state == RecordState::Reverted),
        "kept, holding only reverted records"
    );
    fake.reset_log();
    apply(&engine, &mut fake, &f).unwrap();
    assert_eq!(
        fake.count(CallKind::Syscall),
        0,
        "no region mapped: the kept one is reused"
    );
    let rs = regions(&fake);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].0, base, "same region");
    assert_eq!(rs[0].1.records.len(), 1, "started afresh: nothing used it");
    assert_eq!(outcome(&f, &fake, "re-apply"), Outcome::Patched);
}

#[test]
fn fake_failure_at_every_call_of_apply_over_a_kept_region_leaves_original_or_fully_patched() {
    let f = fixture();
    let engine = keeping_engine();
    let kept_world = || {
        let mut fake = world(&f);
        apply(&engine, &mut fake, &f).unwrap();
        revert(&engine, &mut fake, &f.patch.id).unwrap();
        fake.reset_log();
        fake
    };
    let mut clean = kept_world();
    apply(&engine, &mut clean, &f).unwrap();
    let mut runs = 0;
    for kind in CallKind::ALL {
        for nth in 1..=clean.count(kind) + 1 {
            let mut fake = kept_world();
            fake.fail_nth(kind, nth);
            let ctx = format!("apply over a kept region, {kind:?} #{nth} fails");
            let r = apply(&engine, &mut fake, &f);
            let o = outcome(&f, &fake, &ctx);
            match (&r, o) {
                (Ok(()), Outcome::Patched) | (Err(_), Outcome::Original) => {}
                (Err(code), Outcome::Patched) if kind == CallKind::Detach => {
                    eprintln!("{ctx}: {code} after the patch landed");
                }
                _ => panic!("{ctx}: result {r:?} but memory {o:?}"),
            }
            fake.clear_faults();
            if o == Outcome::Original {
                apply(&engine, &mut fake, &f).unwrap_or_else(|e| panic!("{ctx}: retry: {e}"));
            }
            assert_eq!(outcome(&f, &fake, &ctx), Outcome::Patched);
            // A kept region that could not be read under the stop is passed over (a second
            // one is mapped); the next apply after a revert reclaims the idle extra one.
            revert(&engine, &mut fake, &f.patch.id).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            apply(&engine, &mut fake, &f).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(regions(&fake).len(), 1, "{ctx}: one region again");
            runs += 1;
        }
    }
    eprintln!("{runs} injected failures");
    assert!(runs > 30);
}

#[test]
fn fake_apply_and_revert_without_failures() {
    let f = fixture();
    let engine = fast_engine();
    let mut fake = world(&f);
    apply(&engine, &mut fake, &f).unwrap();
    assert_eq!(outcome(&f, &fake, "clean apply"), Outcome::Patched);
    assert!(
        fake.count(CallKind::RunBriefly) >= 2,
        "the thread inside the site was let run"
    );
    revert(&engine, &mut fake, &f.patch.id).unwrap();
    assert_eq!(outcome(&f, &fake, "clean revert"), Outcome::Original);
    assert!(
        regions(&fake).is_empty(),
        "region unmapped after the last revert"
    );
}

#[test]
fn fake_failure_at_every_call_of_apply_leaves_original_or_fully_patched() {
    failure_at_every_call_of_apply(true);
}

/// As above on a kernel before 6.11: every mapping the commit needs comes from one read of
/// the maps per stretch in which nothing can change them.
#[test]
fn fake_failure_at_every_call_of_apply_without_procmap_query_leaves_original_or_fully_patched() {
    failure_at_every_call_of_apply(false);
}

fn failure_at_every_call_of_apply(procmap_query: bool) {
    let f = fixture();
    let engine = fast_engine();
    let world = |f: &Fixture| {
        let mut fake = world(f);
        fake.process_mut(PID).unwrap().procmap_query = procmap_query;
        fake
    };
    let mut clean = world(&f);
    apply(&engine, &mut clean, &f).unwrap();
    if procmap_query {
        assert_eq!(
            clean.count(CallKind::Mappings),
            0,
            "no full read of the maps"
        );
    } else {
        assert!(clean.count(CallKind::Mappings) > 0);
    }
    let mut runs = 0;
    let mut patched = 0;
    for kind in CallKind::ALL {
        for nth in 1..=clean.count(kind) + 1 {
            let mut fake = world(&f);
            fake.fail_nth(kind, nth);
            let ctx = format!("apply, {kind:?} #{nth} fails");
            let r = apply(&engine, &mut fake, &f);
            let o = outcome(&f, &fake, &ctx);
            match (&r, o) {
                (Ok(()), Outcome::Patched) => patched += 1,
                (Err(_), Outcome::Original) => {}
                // The release after a complete commit may fail on a detach; the patch is in.
                (Err(code), Outcome::Patched) if kind == CallKind::Detach => {
                    eprintln!("{ctx}: {code} after the patch landed");
                    patched += 1;
                }
                _ => panic!("{ctx}: result {r:?} but memory {o:?}"),
            }
            // Whatever happened, the next clean attempt reaches the patched state.
            fake.clear_faults();
            if o == Outcome::Original {
                apply(&engine, &mut fake, &f).unwrap_or_else(|e| panic!("{ctx}: retry: {e}"));
            }
            assert_eq!(outcome(&f, &fake, &ctx), Outcome::Patched);
            runs += 1;
        }
    }
    eprintln!("{runs} injected failures, {patched} still patched");
    assert!(runs > 50);
}

#[test]
fn fake_failure_at_every_call_of_revert_leaves_patched_or_original() {
    let f = fixture();
    let engine = fast_engine();
    let patched_world = || {
        let mut fake = world(&f);
        apply(&engine, &mut fake, &f).unwrap();
        fake.reset_log();
        fake
    };
    let mut clean = patched_world();
    revert(&engine, &mut clean, &f.patch.id).unwrap();
    let mut runs = 0;
    for kind in CallKind::ALL {
        for nth in 1..=clean.count(kind) + 1 {
            let mut fake = patched_world();
            fake.fail_nth(kind, nth);
            let ctx = format!("revert, {kind:?} #{nth} fails");
            let r = revert(&engine, &mut fake, &f.patch.id);
            let o = outcome(&f, &fake, &ctx);
            match (&r, o) {
                (Ok(()), Outcome::Original) | (Err(_), Outcome::Patched) => {}
                (Err(code), Outcome::Original) if kind == CallKind::Detach => {
                    eprintln!("{ctx}: {code} after the revert landed");
                }
                _ => panic!("{ctx}: result {r:?} but memory {o:?}"),
            }
            fake.clear_faults();
            if o == Outcome::Patched {
                revert(&engine, &mut fake, &f.patch.id)
                    .unwrap_or_else(|e| panic!("{ctx}: retry: {e}"));
            }
            assert_eq!(outcome(&f, &fake, &ctx), Outcome::Original);
            // And it can be applied again.
            apply(&engine, &mut fake, &f).unwrap_or_else(|e| panic!("{ctx}: re-apply: {e}"));
            runs += 1;
        }
    }
    eprintln!("{runs} injected failures");
    assert!(runs > 30);
}

#[test]
fn fake_saved_context_inside_a_site_on_a_stack_is_waited_out_then_refused() {
    // A thread in a signal handler whose interrupted context (on its stack) has RIP inside
    // the site: writing the jump would make sigreturn land mid-instruction.
    let f = fixture();
    let engine = fast_engine();
    let mut fake = world(&f);
    let p = fake.process_mut(PID).unwrap();
    let stack = p.regions.iter_mut().find(|r| r.name == "[stack]").unwrap();
    let word = (f.site + 2).to_le_bytes();
    stack.bytes[0xc100..0xc108].copy_from_slice(&word);
    let e = apply(&engine, &mut fake, &f).unwrap_err();
    assert_eq!(e, "engine.thread_in_site");
    assert_eq!(outcome(&f, &fake, "saved context"), Outcome::Original);
    // Once the handler returned (the frame is gone), the apply goes through.
    let p = fake.process_mut(PID).unwrap();
    let stack = p.regions.iter_mut().find(|r| r.name == "[stack]").unwrap();
    stack.bytes[0xc100..0xc108].fill(0);
    apply(&engine, &mut fake, &f).unwrap();
    assert_eq!(outcome(&f, &fake, "after the handler"), Outcome::Patched);
}

#[test]
fn fake_revert_while_a_thread_executes_the_trampoline_keeps_the_region() {
    let f = fixture();
    let engine = fast_engine();
    let mut fake = world(&f);
    apply(&engine, &mut fake, &f).unwrap();
    let (base, h) = regions(&fake).pop().unwrap();
    let tramp = h.records[0].sites[0].tramp;
    // A thread is inside the trampoline; another has a return address into it on its stack.
    let p = fake.process_mut(PID).unwrap();
    p.threads.get_mut(&PID.leader()).unwrap().regs.rip = tramp + 3;
    revert(&engine, &mut fake, &f.patch.id).unwrap();
    assert_eq!(
        fake.memory(PID, f.site, f.original.len()).unwrap(),
        f.original,
        "the site is restored"
    );
    assert_eq!(
        regions(&fake).len(),
        1,
        "the region stays: a thread executes in it"
    );
    assert!(fake.memory(PID, tramp, 8).unwrap().iter().any(|&b| b != 0));
    // Next apply reuses the region (its records are all reverted) and appends.
    fake.process_mut(PID)
        .unwrap()
        .threads
        .get_mut(&PID.leader())
        .unwrap()
        .regs
        .rip = f.site + 0x40;
    let p = fake.process_mut(PID).unwrap();
    let stack = p.regions.iter_mut().find(|r| r.name == "[stack]").unwrap();
    stack.bytes[0xc100..0xc108].copy_from_slice(&(tramp + 9).to_le_bytes());
    apply(&engine, &mut fake, &f).unwrap();
    let rs = regions(&fake);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].0, base, "same region reused");
    assert_eq!(rs[0].1.records.len(), 2);
    revert(&engine, &mut fake, &f.patch.id).unwrap();
    assert_eq!(
        regions(&fake).len(),
        1,
        "a return address into it on a stack keeps it"
    );
}

#[test]
fn fake_live_stack_that_cannot_be_read_is_refused_with_nothing_written() {
    // A stack that cannot be read cannot be shown free of a saved RIP inside a site: the
    // apply must stop there, not treat the stack as clear.
    let f = fixture();
    let engine = fast_engine();
    let mut clean = world(&f);
    apply(&engine, &mut clean, &f).unwrap();
    let stack_read = clean
        .calls()
        .iter()
        .find(|c| c.kind == CallKind::ReadMemory && c.mem.is_some_and(|(a, _)| a == STACK + 0xc000))
        .map(|c| c.nth)
        .expect("the thread's stack is read");
    let mut fake = world(&f);
    fake.fail_nth(CallKind::ReadMemory, stack_read);
    let e = apply(&engine, &mut fake, &f).unwrap_err();
    assert_eq!(e, "sys.mem_io", "{e}");
    assert_eq!(outcome(&f, &fake, "unreadable stack"), Outcome::Original);
}

/// Hazard: a region placed from single mappings (no full read of the maps) must keep the
/// rules the full read applies — not within 64 MiB above `[heap]`, not inside the stack
/// guard gap below `[stack]`, a free page on both sides. The proposal (just below the
/// module) lies above a heap, the range right above the module is within a stack's guard
/// gap: the region goes right below the heap. Same place with the maps read whole.
#[test]
fn fake_region_placed_by_asking_keeps_clear_of_heap_and_stack_guards() {
    let f = fixture();
    let engine = fast_engine();
    for procmap_query in [true, false] {
        let mut fake = world(&f);
        let p = fake.process_mut(PID).unwrap();
        p.procmap_query = procmap_query;
        p.add_region(FakeRegion {
            start: 0x30_0000,
            perms: Perms::RW,
            name: "[heap]".into(),
            bytes: vec![0; 0x1_0000],
        });
        p.add_region(FakeRegion {
            start: 0x42_0000,
            perms: Perms::RW,
            name: "[stack]".into(),
            bytes: vec![0; 0x1000],
        });
        let mut plan = plan_for(&f);
        plan.region = RegionPlan::New {
            addr: 0x40_0000 - region::REGION_SIZE,
        };
        let mut sp = stop_all_with(&mut fake, PID, deadline()).unwrap();
        let r = engine.commit(&mut sp, &plan, &f.patch);
        sp.resume().unwrap();
        let report = r.unwrap();
        assert!(report.region_created);
        assert_eq!(
            report.plan.region.addr(),
            0x30_0000 - 0x1000 - region::REGION_SIZE,
            "procmap_query {procmap_query}"
        );
        assert_eq!(outcome(&f, &fake, "placed by asking"), Outcome::Patched);
        if procmap_query {
            assert_eq!(
                fake.count(CallKind::Mappings),
                0,
                "no full read of the maps"
            );
        }
    }
}

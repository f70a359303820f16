//! `Engine::plan_mapped` / `Engine::commit_known`: the load-time hook's plan from what it saw
//! being mapped (no maps read, no map_files stat before the stop), checked under the stop.

use std::time::{Duration, Instant};

use stitch_engine::{Engine, FileKey, KnownMapping, RegionPlan};
use stitch_sys::Pid;

use crate::TARGET_C;
use crate::common::*;

/// The executable mapping of `path` in `pid`: (start, end, file offset).
fn exec_mapping(pid: Pid, path: &std::path::Path) -> (u64, u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let want = path.display().to_string();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[5] == want && f[1].contains('x') {
            let (a, b) = f[0].split_once('-').unwrap();
            return (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
                u64::from_str_radix(f[2], 16).unwrap(),
            );
        }
    }
    panic!("no executable mapping of {want} in {pid}");
}

fn file_key(path: &std::path::Path) -> FileKey {
    FileKey::of(&std::fs::metadata(path).unwrap())
}

/// An engine that knows the target's digest (as the hook does for every file it marks) and
/// what the hook would know at the `mmap`'s exit.
fn known_of(t: &Target, pid: Pid, engine: &Engine) -> KnownMapping {
    let key = file_key(&t.exe);
    engine.digests.remember(key, stitch_elf::sha256(&t.bytes));
    let (exec_start, exec_end, exec_offset) = exec_mapping(pid, &t.exe);
    KnownMapping {
        path: t.exe.clone(),
        key,
        exec_start,
        exec_end,
        exec_offset,
    }
}

#[test]
fn plan_from_a_known_mapping_is_checked_under_the_stop_and_applies() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0501", "compute", "drop", RETURN_1000);
    let known = known_of(&t, r.pid(), &engine);
    let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
    // Same decisions as the full plan, which reads the maps.
    let full = engine.plan(r.pid(), &b).unwrap();
    assert_eq!(plan.module_bias, full.module_bias);
    assert_eq!(plan.module_sha256, full.module_sha256);
    assert_eq!(
        plan.sites.iter().map(|s| s.addr).collect::<Vec<_>>(),
        full.sites.iter().map(|s| s.addr).collect::<Vec<_>>()
    );
    assert_eq!(plan.module_start, full.module_start);
    let mut sp = stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
    let report = engine.commit_known(&mut sp, &plan, b.patch(), &known);
    sp.resume().unwrap();
    let report = report.unwrap();
    assert!(report.region_created);
    assert_eq!(r.ask(5), "1000 10");
}

/// A patch that calls another module's function (an `[[import]]`) planned from the known
/// mapping: the hazard is a thunk to the wrong address (the import resolved against another
/// module or bias than the full plan finds), which the patched code would jump through.
#[test]
fn plan_from_a_known_mapping_resolves_imports_as_the_full_plan_does() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    // compute(x) = getpid(), then x + 1000 (rsp is 16-aligned at the call after the push).
    let b = patch_module_with(
        &t.bytes,
        "target",
        "ST-2026-0506",
        "compute",
        "drop",
        "stitch_hit\npush rdi\ncall libc_getpid\npop rdi\nlea eax, [rdi + 1000]\nret",
        "[[import]]\nname = \"libc_getpid\"\nmodule = \"libc.so.6\"\nsymbol = \"getpid\"",
    );
    let known = known_of(&t, r.pid(), &engine);
    let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
    let full = engine.plan(r.pid(), &b).unwrap();
    assert_eq!(plan.imports.len(), 1);
    assert_eq!(
        plan.imports, full.imports,
        "same import address as the full plan"
    );
    // Planned again: the symbol comes from the engine's cache by the file's key.
    assert_eq!(
        engine.plan_mapped(r.pid(), &b, &known).unwrap().imports,
        plan.imports
    );
    let mut sp = stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
    let report = engine.commit_known(&mut sp, &plan, b.patch(), &known);
    sp.resume().unwrap();
    report.unwrap();
    assert_eq!(
        r.ask(5),
        "1005 10",
        "the patched code called getpid and went on"
    );
}

#[test]
fn known_mapping_that_is_not_the_planned_file_is_refused_under_the_stop() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0502", "compute", "drop", RETURN_1000);
    let known = known_of(&t, r.pid(), &engine);
    let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
    // By the stop, the address the hook saw mapped holds another file (libc's text here):
    // the maps read under the stop show another inode, whose digest is not the plan's.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
    let libc_exec = maps
        .lines()
        .find(|l| l.contains("libc.so") && l.split_whitespace().nth(1).unwrap().contains('x'))
        .expect("libc mapped executable");
    let start = u64::from_str_radix(libc_exec.split('-').next().unwrap(), 16).unwrap();
    let elsewhere = KnownMapping {
        exec_start: start,
        ..known.clone()
    };
    let mut sp = stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
    let e = engine.commit_known(&mut sp, &plan, b.patch(), &elsewhere);
    sp.resume().unwrap();
    let e = e.unwrap_err();
    assert_eq!(e.code(), "engine.module_not_mapped", "{e}");
    assert_eq!(r.ask(5), "6 10", "nothing was written");
}

#[test]
fn region_proposal_already_taken_falls_back_to_a_free_range() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0503", "compute", "drop", RETURN_1000);
    let known = known_of(&t, r.pid(), &engine);
    let mut plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
    // The proposal names memory that is in use by the stop (here: the module itself).
    let taken = plan.module_start;
    plan.region = RegionPlan::New { addr: taken };
    let mut sp = stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
    let report = engine.commit_known(&mut sp, &plan, b.patch(), &known);
    sp.resume().unwrap();
    let report = report.unwrap();
    assert!(report.region_created);
    assert_ne!(report.plan.region.addr(), taken);
    assert_eq!(r.ask(5), "1000 10");
    // The module's first page is still the module's.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.starts_with(&format!("{taken:x}-")) && l.contains(&*t.exe.to_string_lossy())),
        "{maps}"
    );
}

/// Something mapped right below the module (as the loader's own allocations often are under
/// a dlopen'ed library) takes the proposal: the region goes right below that mapping with a
/// free page between, found without reading where `[heap]` and `[stack]` are. The hazard:
/// a region that touches or overlaps the mapping in the way.
#[test]
fn region_proposal_taken_by_a_mapping_below_the_module_goes_below_that_mapping() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0507", "compute", "drop", RETURN_1000);
    let known = known_of(&t, r.pid(), &engine);
    let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
    let RegionPlan::New { addr: proposed } = plan.region else {
        panic!("a new region is proposed");
    };
    let mut sp = stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
    // Two pages in the middle of the proposed range, in the target.
    let obstacle = sp
        .remote_mmap(
            stitch_sys::Placement::Exact(proposed + 0x8000),
            0x2000,
            3, // PROT_READ | PROT_WRITE
        )
        .unwrap();
    assert_eq!(obstacle, proposed + 0x8000);
    let report = engine.commit_known(&mut sp, &plan, b.patch(), &known);
    sp.resume().unwrap();
    let report = report.unwrap();
    assert!(report.region_created);
    let region = report.plan.region.addr();
    assert_eq!(
        region,
        obstacle - 0x1000 - stitch_engine::region::REGION_SIZE,
        "right below the obstacle, one free page between"
    );
    assert_eq!(r.ask(5), "1000 10");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
    let page_between = format!("{:x}-", region + stitch_engine::region::REGION_SIZE);
    assert!(
        !maps.lines().any(|l| l.starts_with(&page_between)),
        "the page between is free:\n{maps}"
    );
}

fn at_phdr(pid: Pid) -> u64 {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap();
    auxv.chunks_exact(16)
        .find(|p| u64::from_ne_bytes(p[..8].try_into().unwrap()) == 3)
        .map(|p| u64::from_ne_bytes(p[8..].try_into().unwrap()))
        .expect("AT_PHDR")
}

#[test]
fn known_mapping_from_at_phdr_is_the_executable_text_pie_and_non_pie() {
    if !can_trace() {
        return;
    }
    for flags in [&[][..], &["-no-pie"][..]] {
        let t = compile(TARGET_C, flags);
        let mut r = Running::start(&t.exe);
        let engine = Engine::new();
        let b = patch(&t, "ST-2026-0504", "compute", "drop", RETURN_1000);
        let key = file_key(&t.exe);
        engine.digests.remember(key, stitch_elf::sha256(&t.bytes));
        // The file's bytes not cached yet: no plan this way.
        assert!(
            engine
                .plan_from_phdr(r.pid(), &b, &t.exe, key, at_phdr(r.pid()))
                .unwrap()
                .is_none()
        );
        engine.plan(r.pid(), &b).unwrap(); // caches the file's bytes by its key
        let (known, plan) = engine
            .plan_from_phdr(r.pid(), &b, &t.exe, key, at_phdr(r.pid()))
            .unwrap()
            .expect("planned from AT_PHDR");
        let (start, end, offset) = exec_mapping(r.pid(), &t.exe);
        assert_eq!(
            (known.exec_start, known.exec_end, known.exec_offset),
            (start, end, offset),
            "{flags:?}"
        );
        assert_eq!(plan, engine.plan_mapped(r.pid(), &b, &known).unwrap());
        let mut sp =
            stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
        let report = engine.commit_known(&mut sp, &plan, b.patch(), &known);
        sp.resume().unwrap();
        report.unwrap();
        assert_eq!(r.ask(5), "1000 10", "{flags:?}");
    }
}

#[test]
fn known_mapping_whose_file_offsets_disagree_with_the_maps_is_refused_under_the_stop() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0505", "compute", "drop", RETURN_1000);
    let known = known_of(&t, r.pid(), &engine);
    let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
    // The right file at the right address, but not the layout the plan assumed (a page off):
    // the sites would not hold the bytes the plan was linked for.
    let shifted = KnownMapping {
        exec_offset: known.exec_offset + 0x1000,
        ..known.clone()
    };
    let mut sp = stitch_sys::stop_all(r.pid(), Instant::now() + Duration::from_secs(2)).unwrap();
    let e = engine.commit_known(&mut sp, &plan, b.patch(), &shifted);
    sp.resume().unwrap();
    let e = e.unwrap_err();
    assert_eq!(e.code(), "engine.module_layout", "{e}");
    assert_eq!(r.ask(5), "6 10", "nothing was written");
}

/// Stops `pid` with the kernel tracer, asking for single mappings (`PROCMAP_QUERY`) or, as
/// on kernels before 6.11, reading the maps whole.
fn stop(pid: Pid, procmap_query: bool) -> stitch_sys::StoppedProcess {
    let tracer = if procmap_query {
        stitch_sys::PtraceTracer::new()
    } else {
        stitch_sys::PtraceTracer::new().without_procmap_query()
    };
    stitch_sys::stop_all_with(tracer, pid, Instant::now() + Duration::from_secs(2)).unwrap()
}

#[test]
fn known_mapping_is_checked_the_same_with_and_without_procmap_query() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    for procmap_query in [true, false] {
        let mut r = Running::start(&t.exe);
        let engine = Engine::new();
        let b = patch(&t, "ST-2026-0506", "compute", "drop", RETURN_1000);
        let known = known_of(&t, r.pid(), &engine);
        let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
        // Another file's text at the address, then the right file a page off: refused.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
        let libc_exec = maps
            .lines()
            .find(|l| l.contains("libc.so") && l.split_whitespace().nth(1).unwrap().contains('x'))
            .expect("libc mapped executable");
        let libc_start = u64::from_str_radix(libc_exec.split('-').next().unwrap(), 16).unwrap();
        for (wrong, code) in [
            (
                KnownMapping {
                    exec_start: libc_start,
                    ..known.clone()
                },
                "engine.module_not_mapped",
            ),
            (
                KnownMapping {
                    exec_offset: known.exec_offset + 0x1000,
                    ..known.clone()
                },
                "engine.module_layout",
            ),
        ] {
            let mut sp = stop(r.pid(), procmap_query);
            let e = engine.commit_known(&mut sp, &plan, b.patch(), &wrong);
            sp.resume().unwrap();
            assert_eq!(e.unwrap_err().code(), code, "procmap_query {procmap_query}");
        }
        assert_eq!(r.ask(5), "6 10", "nothing was written");
        let mut sp = stop(r.pid(), procmap_query);
        let report = engine.commit_known(&mut sp, &plan, b.patch(), &known);
        sp.resume().unwrap();
        assert!(report.unwrap().region_created);
        assert_eq!(r.ask(5), "1000 10", "procmap_query {procmap_query}");
        // A second patch finds the region by its trampolines and uses it.
        let b2 = patch(&t, "ST-2026-0507", "other", "drop", RETURN_1000);
        let plan2 = engine.plan_mapped(r.pid(), &b2, &known).unwrap();
        let mut sp = stop(r.pid(), procmap_query);
        let report = engine.commit_known(&mut sp, &plan2, b2.patch(), &known);
        sp.resume().unwrap();
        assert!(
            !report.unwrap().region_created,
            "procmap_query {procmap_query}"
        );
        assert_eq!(r.ask(5), "1000 1000");
    }
}

#[test]
fn mapping_replaced_between_plan_and_commit_is_refused_under_the_stop() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    for procmap_query in [true, false] {
        let r = Running::start(&t.exe);
        let engine = Engine::new();
        let b = patch(&t, "ST-2026-0508", "compute", "drop", RETURN_1000);
        let known = known_of(&t, r.pid(), &engine);
        let plan = engine.plan_mapped(r.pid(), &b, &known).unwrap();
        let mut sp = stop(r.pid(), procmap_query);
        // The file's text is gone by the stop and anonymous memory is mapped where it was
        // (a dlclose, then an unrelated mmap at the freed address) — the maps read or asked
        // for before this point are stale.
        let len = known.exec_end - known.exec_start;
        sp.remote_munmap(known.exec_start, len).unwrap();
        sp.remote_mmap(
            stitch_sys::Placement::Exact(known.exec_start),
            len,
            libc_prot_rx(),
        )
        .unwrap();
        let e = engine.commit_known(&mut sp, &plan, b.patch(), &known);
        let maps = sp.mappings().unwrap();
        sp.resume().unwrap();
        assert_eq!(
            e.unwrap_err().code(),
            "engine.module_not_mapped",
            "procmap_query {procmap_query}"
        );
        // Nothing was mapped for a region (its trampolines would be anonymous R-X memory).
        assert!(
            !maps.iter().any(|m| m.perms.exec
                && m.inode == 0
                && m.start != known.exec_start
                && m.name != "[vdso]"
                && m.name != "[vsyscall]"),
            "{maps:?}"
        );
        drop(r); // its code is gone: killed
    }
}

fn libc_prot_rx() -> i32 {
    1 | 4 // PROT_READ | PROT_EXEC
}

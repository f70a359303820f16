//! Which module: dlopen'ed libraries, endbr64 entries, other mount namespaces and chroots,
//! files replaced or deleted after they were mapped.

use std::process::Command;

use stitch_engine::region::RecordState;
use stitch_engine::{Engine, EngineError};

use crate::TARGET_C;
use crate::common::*;

const LIB_C: &str = r#"
__attribute__((noinline)) int lib_compute(int x) { return x + 1; }
"#;

/// "l" dlopens argv[1]; a number prints lib_compute(n) (-1 before the load).
const DLOPEN_MAIN_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    char line[64];
    int (*f)(int) = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'l') {
            void *h = dlopen(argv[1], RTLD_NOW);
            f = h ? (int (*)(int))dlsym(h, "lib_compute") : 0;
            printf("loaded %d\n", f != 0);
        } else {
            printf("%d\n", f ? f(atoi(line)) : -1);
        }
    }
    return 0;
}
"#;

#[test]
fn patched_function_in_a_dlopened_library() {
    if !can_trace() {
        return;
    }
    let lib = compile_named(LIB_C, &["-shared", "-fPIC"], "libt.so");
    let main = compile(DLOPEN_MAIN_C, &[]);
    let mut r = Running::start_args(&main.exe, &[lib.exe.to_str().unwrap()]);
    let b = patch_module(
        &lib.bytes,
        "libt.so",
        "ST-2026-0200",
        "lib_compute",
        "drop",
        RETURN_1000,
    );
    let engine = Engine::new();
    let e = engine.apply(r.pid(), &b).unwrap_err();
    assert!(
        matches!(e, EngineError::ModuleNotMapped { .. }),
        "not loaded yet: {e}"
    );
    assert_eq!(r.ask_str("l"), "loaded 1");
    assert_eq!(r.ask(3), "4");
    let rep = engine.apply(r.pid(), &b).unwrap();
    assert!(rep.plan.module_path.ends_with("libt.so"));
    assert_eq!(r.ask(3), "1000");
    engine.revert(r.pid(), "ST-2026-0200").unwrap();
    assert_eq!(r.ask(3), "4");
}

/// compute is also called through a function pointer (an indirect call lands on endbr64).
const ENDBR_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
int (*volatile fp)(int) = compute;
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        int n = atoi(line);
        printf("%d %d\n", compute(n), fp(n));
    }
    return 0;
}
"#;

#[test]
fn site_at_function_entry_starting_with_endbr64() {
    if !can_trace() {
        return;
    }
    let t = compile(ENDBR_C, &["-fcf-protection=full"]);
    let (_, original) = entry_site(&t.bytes, "compute");
    assert_eq!(
        &original[..4],
        &[0xf3, 0x0f, 0x1e, 0xfa],
        "compute starts with endbr64"
    );
    let engine = Engine::new();
    let mut r = Running::start(&t.exe);
    // The displaced endbr64 (and the push after it) run first, relocated; then our code.
    let before = patch(&t, "ST-2026-0201", "compute", "before", "stitch_hit");
    engine.apply(r.pid(), &before).unwrap();
    assert_eq!(r.ask(4), "5 5");
    assert_eq!(engine.list(r.pid()).unwrap()[0].record.hits, 2);
    engine.revert(r.pid(), "ST-2026-0201").unwrap();
    let drop = patch(&t, "ST-2026-0202", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &drop).unwrap();
    assert_eq!(r.ask(4), "1000 1000");
    engine.revert(r.pid(), "ST-2026-0202").unwrap();
    assert_eq!(r.ask(4), "5 5");
}

#[test]
fn process_in_another_mount_namespace_is_identified_through_map_files() {
    if !need_root("a mount namespace") || !have("unshare") {
        return;
    }
    let t = compile(TARGET_C, &[]);
    // An empty directory here; inside the target's namespace a tmpfs holding the binary.
    let mnt = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -t tmpfs tmpfs "$1" && cp "$2" "$1/target" && exec "$1/target""#)
        .arg("sh")
        .arg(mnt.path())
        .arg(&t.exe);
    let mut r = Running::spawn(cmd);
    let inside = mnt.path().join("target");
    assert!(
        !inside.exists(),
        "the path the target runs from does not exist here"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
    assert!(maps.contains(inside.to_str().unwrap()), "{maps}");
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0203", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &b).unwrap();
    assert_eq!(r.ask(2), "1000 4");
    engine.revert(r.pid(), "ST-2026-0203").unwrap();
    assert_eq!(r.ask(2), "3 4");
}

#[test]
fn process_in_a_chroot_is_identified_through_map_files() {
    if !need_root("chroot") || !have("chroot") {
        return;
    }
    let t = compile(TARGET_C, &["-static"]);
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(&t.exe, root.path().join("target")).unwrap();
    let mut cmd = Command::new("chroot");
    cmd.arg(root.path()).arg("/target");
    let mut r = Running::spawn(cmd);
    // Its root is the directory; /target means nothing here.
    let its_root = std::fs::read_link(format!("/proc/{}/root", r.pid())).unwrap();
    assert_eq!(its_root, root.path().canonicalize().unwrap());
    assert!(!std::path::Path::new("/target").exists());
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0204", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &b).unwrap();
    assert_eq!(r.ask(2), "1000 4");
    engine.revert(r.pid(), "ST-2026-0204").unwrap();
    assert_eq!(r.ask(2), "3 4");
}

#[test]
fn file_replaced_on_disk_after_mapping_is_identified_by_the_mapped_inode() {
    if !can_trace() {
        return;
    }
    let old = compile(TARGET_C, &[]);
    let new = compile(&TARGET_C.replace("x * 2", "x * 3"), &[]);
    let mut r = Running::start(&old.exe);
    // A package upgrade: the new build is renamed over the path the process runs from.
    let staged = old.dir.path().join("target.new");
    std::fs::copy(&new.exe, &staged).unwrap();
    std::fs::rename(&staged, &old.exe).unwrap();
    assert_eq!(std::fs::read(&old.exe).unwrap(), new.bytes);
    let engine = Engine::new();
    // A patch for the file now on disk does not match what the process runs...
    let for_new = patch(&new, "ST-2026-0205", "compute", "drop", RETURN_1000);
    let e = engine.apply(r.pid(), &for_new).unwrap_err();
    assert!(matches!(e, EngineError::ModuleNotMapped { .. }), "{e}");
    // ... a patch for the mapped (old) build does.
    let for_old = patch(&old, "ST-2026-0206", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &for_old).unwrap();
    assert_eq!(r.ask(2), "1000 4");
    engine.revert(r.pid(), "ST-2026-0206").unwrap();
    assert_eq!(r.ask(2), "3 4");
}

#[test]
fn deleted_file_is_identified_by_the_mapped_inode() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    std::fs::remove_file(&t.exe).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
    assert!(maps.contains("(deleted)"), "{maps}");
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0207", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &b).unwrap();
    assert_eq!(r.ask(2), "1000 4");
    engine.revert(r.pid(), "ST-2026-0207").unwrap();
    assert_eq!(r.ask(2), "3 4");
}

#[test]
fn file_on_disk_is_byte_identical_after_apply_and_revert() {
    if !can_trace() {
        return;
    }
    let t = compile(TARGET_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0208", "compute", "drop", RETURN_1000);
    engine.apply(r.pid(), &b).unwrap();
    assert_eq!(std::fs::read(&t.exe).unwrap(), t.bytes, "after apply");
    assert_eq!(r.ask(1), "1000 2");
    engine.revert(r.pid(), "ST-2026-0208").unwrap();
    assert_eq!(std::fs::read(&t.exe).unwrap(), t.bytes, "after revert");
    // A second process started from the file now runs the original.
    let mut fresh = Running::start(&t.exe);
    assert_eq!(fresh.ask(1), "2 2");
}

/// "l" dlopens argv[1] and prints where it was loaded; "c" dlcloses it; a number prints
/// lib_compute(n) (-1 while not loaded).
const RELOAD_MAIN_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    char line[64];
    void *h = 0;
    int (*f)(int) = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'l') {
            h = dlopen(argv[1], RTLD_NOW);
            f = h ? (int (*)(int))dlsym(h, "lib_compute") : 0;
            struct link_map *m = 0;
            if (h) dlinfo(h, RTLD_DI_LINKMAP, &m);
            printf("loaded %lx\n", m ? (unsigned long)m->l_addr : 0UL);
        } else if (line[0] == 'c') {
            int r = h ? dlclose(h) : -1;
            h = 0;
            f = 0;
            printf("closed %d\n", r);
        } else {
            printf("%d\n", f ? f(atoi(line)) : -1);
        }
    }
    return 0;
}
"#;

#[test]
fn library_unloaded_and_reloaded_at_the_same_address_is_patched_again() {
    if !can_trace() {
        return;
    }
    // The region (anonymous, kept) outlives the library: its record says "applied" while
    // the reloaded library's site holds the original bytes again. That record is stale:
    // the patch is not in place, is not listed as applied, and applies again.
    let lib = compile_named(LIB_C, &["-shared", "-fPIC"], "libreload.so");
    let main = compile(RELOAD_MAIN_C, &[]);
    let mut r = Running::start_args(&main.exe, &[lib.exe.to_str().unwrap()]);
    let b = patch_module(
        &lib.bytes,
        "libreload.so",
        "ST-2026-0210",
        "lib_compute",
        "drop",
        RETURN_1000,
    );
    let engine = Engine::new();
    let first = r.ask_str("l");
    assert_ne!(first, "loaded 0");
    engine.apply(r.pid(), &b).unwrap();
    assert_eq!(r.ask(3), "1000");
    let applied = |engine: &Engine, r: &Running| {
        engine
            .list(r.pid())
            .unwrap()
            .into_iter()
            .filter(|a| a.record.id == "ST-2026-0210" && a.record.state == RecordState::Applied)
            .count()
    };
    assert_eq!(applied(&engine, &r), 1);
    // Unload and load again until the library lands where it was (it usually does at once).
    let mut same = false;
    for _ in 0..20 {
        assert_eq!(r.ask_str("c"), "closed 0");
        assert_eq!(r.ask(3), "-1", "unloaded");
        if r.ask_str("l") == first {
            same = true;
            break;
        }
    }
    assert!(same, "the library was never reloaded at {first}");
    assert_eq!(r.ask(3), "4", "a fresh copy of the library: original code");
    assert_eq!(
        applied(&engine, &r),
        0,
        "a stale record is not listed as applied"
    );
    let listed = engine.list(r.pid()).unwrap();
    assert!(
        listed
            .iter()
            .any(|a| a.record.id == "ST-2026-0210" && a.stale),
        "and is reported stale: {listed:?}"
    );
    let rep = engine
        .apply(r.pid(), &b)
        .unwrap_or_else(|e| panic!("re-apply over a stale record: [{}] {e}", e.code()));
    assert!(!rep.region_created, "the module's region is reused");
    assert_eq!(r.ask(3), "1000");
    assert_eq!(applied(&engine, &r), 1);
    let rev = engine.revert(r.pid(), "ST-2026-0210").unwrap();
    assert_eq!(rev.revision, b.patch().revision);
    assert_eq!(r.ask(3), "4");
    assert_eq!(applied(&engine, &r), 0);
}

//! Load-time hook benchmark (a program, not a timed test). Needs root and gcc.
//!
//! ```sh
//! cargo bench -p stitch-hook --bench load_time            # idle machine
//! cargo bench -p stitch-hook --bench load_time -- --busy  # plus one busy loop per core
//! cargo bench -p stitch-hook --bench load_time -- --realtime-holds  # holds at SCHED_FIFO
//! cargo bench -p stitch-hook --bench load_time -- --programs-on-one-cpu  # see below
//! ```
//! `--programs-on-one-cpu` runs the measured programs (not the hook) on the first CPU: no
//! program moves between CPUs, so the difference to a normal run is what the hook's answers
//! cost by moving a woken program to another (idle, slow to wake in a VM) CPU.
//!
//! `--python-imports` adds real targets: the exact wheels two patches of `patches/` were
//! made for (ujson 5.12.0, Pillow 10.2.0), `pip install`ed into the fixture directory, their
//! bundles built from `patches/CVE-*/patch.toml` against them; each run is a fresh CPython
//! 3.11 timing `import ujson` / `from PIL import _imagingcms` around the import, and
//! `import _decimal` (a standard extension module, not a target). Needs CPython 3.11 with pip
//! and the PyPI index (`STITCH_PYTHON` names the interpreter); without them it says why and
//! measures the rest.
//! Measures, in the same run and interleaved (no hook, hook, no hook, hook, ... `--rounds=8`):
//! exec of a target and a non-target executable, a program linked at start-up against a
//! target and a non-target library, and dlopen of a target and a non-target library (timed
//! inside the process around `dlopen`). Prints medians, ratios hook/no-hook, the latency the
//! hook adds to a load (p50 and p99 of the runs with the hook, minus the no-hook median: what
//! a program feels, including the events answered without a hold), and the hook's own hold
//! latencies (event read to let-go) as p50/p99 per kind.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stitch_format::SecretKey;

const LIB_C: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int stitch_value(void) { return VALUE; }
int lib_value(void) { return stitch_value(); }
"#;

const EXE_C: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int stitch_value(void) { return VALUE; }
int main(void) { return stitch_value() == 7; }
"#;

const MAIN_DYN_C: &str = r#"
int lib_value(void);
int main(void) { return lib_value() == 7; }
"#;

const DLOPEN_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>
int main(int argc, char **argv) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    void *h = dlopen(argv[1], RTLD_NOW);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (!h) return 1;
    printf("%ld\n", (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec));
    return 0;
}
"#;

struct Fx {
    dir: PathBuf,
}

impl Fx {
    fn path(&self, n: &str) -> PathBuf {
        self.dir.as_path().join(n)
    }
    fn gcc(&self, src: &str, out: &str, flags: &[&str]) -> PathBuf {
        let c = self.path(&format!("{out}.c"));
        std::fs::write(&c, src).unwrap();
        let exe = self.path(out);
        let st = Command::new("gcc")
            .args(["-O0", "-fcf-protection=none", "-Wl,--build-id=sha1"])
            .args(flags.iter().filter(|f| !f.starts_with("-l")))
            .arg("-o")
            .arg(&exe)
            .arg(&c)
            .arg(format!("-L{}", self.dir.as_path().display()))
            .arg(format!("-Wl,-rpath,{}", self.dir.as_path().display()))
            .args(flags.iter().filter(|f| f.starts_with("-l")))
            .status()
            .unwrap();
        assert!(st.success(), "gcc {out}");
        exe
    }
    fn bundle(&self, target: &Path, id: &str) -> PathBuf {
        let bytes = std::fs::read(target).unwrap();
        let elf = stitch_elf::ElfFile::parse(&bytes).unwrap();
        let at = elf.symbol("stitch_value").unwrap().vaddr;
        let mut original = Vec::new();
        for l in stitch_x86::disassemble(elf.bytes_at(at, 16).unwrap(), at) {
            original.extend(l.bytes);
            if original.len() >= 5 {
                break;
            }
        }
        let toml = format!(
            r#"id = "{id}"
revision = 1
title = "bench"
severity = "low"
tier = "free"
author = "bench"
[target]
module = "{}"
sha256 = "{}"
build_id = "{}"
arch = "x86_64"
package = {{ ecosystem = "deb", name = "t", version = "1" }}
[[patchlet]]
name = "p"
at = "stitch_value"
original = "{}"
displaced = "drop"
code = '''
stitch_hit
mov eax, 1000
ret
'''
"#,
            target.file_name().unwrap().to_string_lossy(),
            hex::encode(stitch_elf::sha256(&bytes)),
            hex::encode(elf.build_id().unwrap()),
            stitch_build::hex_spaced(&original),
        );
        let mut b =
            stitch_build::build(&toml, Path::new("."), &bytes, &Default::default()).unwrap();
        b.sign(&SecretKey::from_seed([9; 32])).unwrap();
        let out = self.path(&format!("{id}.bundle"));
        std::fs::write(&out, b.encode()).unwrap();
        out
    }
}

/// Wall time of running `cmd` to completion, its stdout and pid.
fn time_run(cmd: &Path, args: &[&Path]) -> (Duration, String, i64) {
    let t0 = Instant::now();
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = i64::from(child.id());
    let out = child.wait_with_output().unwrap();
    (
        t0.elapsed(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        pid,
    )
}

/// One real target: a module of a pip-installed wheel and the library patch made for it.
struct PythonTarget {
    case: &'static str,
    /// What the timed statement imports.
    import: &'static str,
    /// `pip install` spec and the module's path below site-packages.
    spec: &'static str,
    module: &'static str,
    /// The patch's directory under `patches/`.
    cve: &'static str,
}

const PYTHON_TARGETS: [PythonTarget; 2] = [
    PythonTarget {
        case: "python import ujson (target)",
        import: "import ujson",
        spec: "ujson==5.12.0",
        module: "ujson.cpython-311-x86_64-linux-gnu.so",
        cve: "CVE-2026-44660",
    },
    PythonTarget {
        case: "python import PIL._imagingcms (target)",
        import: "from PIL import _imagingcms",
        spec: "pillow==10.2.0",
        module: "PIL/_imagingcms.cpython-311-x86_64-linux-gnu.so",
        cve: "CVE-2024-28219",
    },
];
const PYTHON_NON_TARGET: (&str, &str) = ("python import _decimal (non-target)", "import _decimal");

/// Installs the wheels into `site` and builds (signed with the bench key) the bundles of
/// their patches. `Err`: why this part is skipped.
fn python_targets(python: &str, site: &Path, out: &Path) -> Result<Vec<PathBuf>, String> {
    let patches = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../patches");
    let mut bundles = Vec::new();
    for t in &PYTHON_TARGETS {
        stitch_testkit::pip_install_exact(python, t.spec, site)?;
        let target = site.join(t.module);
        let mut b = stitch_build::build_files(
            &patches.join(t.cve).join("patch.toml"),
            &target,
            &Default::default(),
        )
        .map_err(|e| format!("building {}: {e}", t.cve))?;
        b.sign(&SecretKey::from_seed([9; 32])).unwrap();
        let path = out.join(format!("{}.bundle", t.cve));
        std::fs::write(&path, b.encode()).unwrap();
        bundles.push(path);
    }
    Ok(bundles)
}

/// Runs a fresh interpreter that times `stmt` (ns, printed) with `site` on its path.
fn time_python_import(python: &str, site: &Path, stmt: &str) -> (Option<f64>, i64) {
    let code = format!(
        "import sys, time; sys.path.insert(0, {:?}); t = time.perf_counter_ns(); {stmt}; \
         print(time.perf_counter_ns() - t)",
        site.display().to_string()
    );
    let (_, out, pid) = time_run(Path::new(python), &[Path::new("-c"), Path::new(&code)]);
    (out.trim().parse::<f64>().ok().map(|ns| ns / 1e3), pid)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default)]
struct Samples {
    /// (case, hook on) -> microseconds
    data: std::collections::BTreeMap<(&'static str, bool), Vec<f64>>,
}

impl Samples {
    fn add(&mut self, case: &'static str, hook: bool, us: f64) {
        self.data.entry((case, hook)).or_default().push(us);
    }
}

struct Hookd {
    child: Child,
    latencies: Arc<Mutex<Vec<(i64, f64)>>>,
}

fn start_hook(fx: &Fx, keys: &Path, bundles: &[PathBuf], extra: &[&str]) -> Hookd {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stitch-hookd"))
        .args(extra)
        .arg("--trusted-keys")
        .arg(keys)
        .arg("--no-standard-dirs")
        .arg("--dir")
        .arg(fx.dir.as_path())
        .arg("--no-live-patch")
        .args(bundles)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l2 = latencies.clone();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = tx.send(());
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["event"] == "patched" {
                l2.lock().unwrap().push((
                    v["pid"].as_i64().unwrap_or(0),
                    v["latency_us"].as_f64().unwrap_or(f64::NAN),
                ));
            } else if v["event"] == "missed" {
                eprintln!("MISS: {line}");
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("hook ready");
    Hookd { child, latencies }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --benches` would run us as a test: do nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let busy = args.iter().any(|a| a == "--busy");
    let python_imports = args.iter().any(|a| a == "--python-imports");
    // The programs (not the hook) on the first CPU: no program migrates between CPUs, so
    // what remains is what the hook costs where the thread runs.
    let programs_on_one_cpu = args.iter().any(|a| a == "--programs-on-one-cpu");
    // Passed on to stitch-hookd (e.g. --realtime-holds).
    let hookd_args: Vec<&str> = args
        .iter()
        .filter(|a| *a == "--realtime-holds" || *a == "--no-watch-mappings")
        .map(String::as_str)
        .collect();
    let n: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("--n="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rounds: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("--rounds="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let td = tempfile::tempdir().unwrap();
    let (dir, _guard) = if args.iter().any(|a| a == "--keep") {
        // Keep the fixtures (bundles, keys, programs) for manual runs of stitch-hookd.
        let p = td.keep();
        eprintln!("fixtures kept in {}", p.display());
        (p, None)
    } else {
        (td.path().to_path_buf(), Some(td))
    };
    let fx = Fx { dir };
    let keys = fx.path("trusted.keys");
    std::fs::write(
        &keys,
        format!("{}\n", SecretKey::from_seed([9; 32]).public().to_line()),
    )
    .unwrap();
    let lib_t = fx.gcc(LIB_C, "libtarget.so", &["-shared", "-fPIC", "-DVALUE=1"]);
    let lib_o = fx.gcc(LIB_C, "libother.so", &["-shared", "-fPIC", "-DVALUE=2"]);
    let exe_t = fx.gcc(EXE_C, "exe_target", &["-DVALUE=1"]);
    let exe_o = fx.gcc(EXE_C, "exe_other", &["-DVALUE=2"]);
    let dyn_t = fx.gcc(MAIN_DYN_C, "dyn_target", &["-ltarget"]);
    let dyn_o = fx.gcc(MAIN_DYN_C, "dyn_other", &["-lother"]);
    let dl = fx.gcc(DLOPEN_C, "dlopener", &["-ldl"]);
    let mut bundles = vec![
        fx.bundle(&lib_t, "ST-2026-9101"),
        fx.bundle(&exe_t, "ST-2026-9102"),
    ];
    // Real targets (`--python-imports`): skipped with the reason when not possible here.
    let python = python_imports.then(|| {
        let py = stitch_testkit::cpython_311_with_pip()
            .ok_or("CPython 3.11 with pip not found (STITCH_PYTHON)")?;
        let site = fx.path("site");
        let more = python_targets(&py, &site, &fx.dir)?;
        bundles.extend(more);
        Ok::<_, String>((py, site))
    });
    let python = match python {
        Some(Ok(p)) => Some(p),
        Some(Err(why)) => {
            println!("SKIP --python-imports: {why}");
            None
        }
        None => None,
    };
    let mut hogs = Vec::new();
    if busy {
        for _ in 0..2 {
            hogs.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .unwrap(),
            );
        }
    }
    let mut s = Samples::default();
    let mut holds: Vec<(i64, f64)> = Vec::new();
    // pid -> case, for the runs with the hook on.
    let mut case_of: std::collections::HashMap<i64, &'static str> = Default::default();
    for round in 0..rounds {
        let hook_on = round % 2 == 1;
        let hook = hook_on.then(|| start_hook(&fx, &keys, &bundles, &hookd_args));
        // After the hook started (it keeps every CPU); the programs inherit this thread's.
        let _pin = programs_on_one_cpu
            .then(|| stitch_sys::allowed_cpus().ok()?.first().copied())
            .flatten()
            .and_then(|c| stitch_sys::CpuPin::to(c).ok());
        // Non-target cases first, in their own loop: a hold that just ended still has work
        // on the hook's side (reporting) that would land on the next run.
        for targets in [false, true] {
            std::thread::sleep(Duration::from_millis(20));
            for _ in 0..n {
                for (case, exe, is_target) in [
                    ("exec target", &exe_t, true),
                    ("exec non-target", &exe_o, false),
                    ("start-up link target", &dyn_t, true),
                    ("start-up link non-target", &dyn_o, false),
                ] {
                    if is_target != targets {
                        continue;
                    }
                    let (t, _, pid) = time_run(exe, &[]);
                    s.add(case, hook_on, t.as_secs_f64() * 1e6);
                    case_of.insert(pid, case);
                }
                let (case, lib) = if targets {
                    ("dlopen target", &lib_t)
                } else {
                    ("dlopen non-target", &lib_o)
                };
                let (_, out, pid) = time_run(&dl, &[lib.as_path()]);
                case_of.insert(pid, case);
                if let Ok(ns) = out.trim().parse::<f64>() {
                    s.add(case, hook_on, ns / 1e3);
                }
                if let Some((py, site)) = &python {
                    let imports: Vec<(&'static str, &str)> = if targets {
                        PYTHON_TARGETS.iter().map(|t| (t.case, t.import)).collect()
                    } else {
                        vec![PYTHON_NON_TARGET]
                    };
                    for (case, stmt) in imports {
                        let (us, pid) = time_python_import(py, site, stmt);
                        case_of.insert(pid, case);
                        if let Some(us) = us {
                            s.add(case, hook_on, us);
                        }
                    }
                }
            }
        }
        if let Some(mut h) = hook {
            let _ = h.child.kill();
            let _ = h.child.wait();
            std::thread::sleep(Duration::from_millis(50));
            holds.extend(h.latencies.lock().unwrap().drain(..));
        }
    }
    for mut h in hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    println!(
        "## load-time hook benchmark ({} iterations x {} rounds per case{})",
        n,
        rounds / 2,
        if busy { ", both cores busy" } else { "" }
    );
    println!();
    println!(
        "| case | no hook, median (us) | hook, median (us) | ratio | added p50 (us) | added p99 (us) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let cases = [
        "exec non-target",
        "exec target",
        "start-up link non-target",
        "start-up link target",
        "dlopen non-target",
        "dlopen target",
        PYTHON_NON_TARGET.0,
        PYTHON_TARGETS[0].case,
        PYTHON_TARGETS[1].case,
    ];
    for c in cases {
        let mut off = s.data.get(&(c, false)).cloned().unwrap_or_default();
        let mut on = s.data.get(&(c, true)).cloned().unwrap_or_default();
        if off.is_empty() || on.is_empty() {
            continue;
        }
        let (a, b) = (median(&mut off), median(&mut on));
        // What a load costs more with the hook: its run minus the no-hook median.
        let p99 = pct(&mut on, 0.99);
        println!(
            "| {c} | {a:.0} | {b:.0} | {:.3} | {:.0} | {:.0} |",
            b / a,
            b - a,
            p99 - a
        );
    }
    println!();
    println!("Hold time (event read to let-go, reported by the hook):");
    println!();
    println!("| kind | holds | p50 (us) | p99 (us) | max (us) |");
    println!("|---|---:|---:|---:|---:|");
    for (label, case) in [
        ("exec", "exec target"),
        ("start-up link", "start-up link target"),
        ("dlopen", "dlopen target"),
        ("python import ujson", PYTHON_TARGETS[0].case),
        ("python import PIL._imagingcms", PYTHON_TARGETS[1].case),
    ] {
        let mut v: Vec<f64> = holds
            .iter()
            .filter(|(pid, _)| case_of.get(pid) == Some(&case))
            .map(|(_, l)| *l)
            .collect();
        let count = v.len();
        if count == 0 && case.starts_with("python") {
            continue;
        }
        println!(
            "| {label} | {count} | {:.0} | {:.0} | {:.0} |",
            pct(&mut v, 0.5),
            pct(&mut v, 0.99),
            pct(&mut v, 1.0)
        );
    }
}

//! Threads: spinning inside the patched function, blocked in syscalls, interrupted by
//! signal handlers, group-stopped; and many apply/revert cycles with every answer checked.

use std::time::{Duration, Instant};

use stitch_engine::Engine;

use crate::common::*;

/// argv[1] threads call compute(x) in a tight loop and check every answer: x + 1
/// (original) or x + 1000 (patched); anything else is counted as bad. The signal variant
/// (argv[2] = interval in us) also calls compute from a SIGALRM handler fired by setitimer.
/// stdin: "s" prints "orig patched bad handler_calls"; a number prints compute(n).
pub(crate) const SPIN_C: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
struct ctr { volatile long orig, patched, bad; char pad[40]; };
static struct ctr c[130];
static volatile long handler_calls;
static void check(struct ctr *k, int x, int r) {
    if (r == x + 1) k->orig++; else if (r == x + 1000) k->patched++; else k->bad++;
}
static void *spin(void *arg) {
    long i = (long)arg;
    struct ctr *k = &c[i];
    unsigned x = (unsigned)i * 7919u;
    for (;;) { x = x * 1103515245u + 12345u; int v = (int)(x & 0xffff); check(k, v, compute(v)); }
    return 0;
}
static void on_alarm(int sig) {
    (void)sig;
    /* Spend a while in the handler, calling the patched function: a signal frame whose
       saved RIP may lie inside the site is on the stack meanwhile. */
    for (int i = 0; i < 200; i++) check(&c[129], i, compute(i));
    handler_calls++;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    int us = argc > 2 ? atoi(argv[2]) : 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (us > 0) {
        struct sigaction sa; memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm; sa.sa_flags = SA_RESTART;
        sigaction(SIGALRM, &sa, 0);
        struct itimerval it = { { 0, us }, { 0, us } };
        setitimer(ITIMER_REAL, &it, 0);
    }
    for (long i = 0; i < n; i++) { pthread_t t; pthread_create(&t, 0, spin, (void *)i); }
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 's') {
            long o = 0, p = 0, b = 0;
            for (int i = 0; i < 130; i++) { o += c[i].orig; p += c[i].patched; b += c[i].bad; }
            printf("%ld %ld %ld %ld\n", o, p, b, handler_calls);
        } else {
            int v = atoi(line);
            printf("%d\n", compute(v));
        }
    }
    return 0;
}
"#;

/// (orig, patched, bad, handler calls)
fn stats(r: &mut Running) -> (i64, i64, i64, i64) {
    let v = r.ask_nums("s");
    (v[0], v[1], v[2], v[3])
}

/// Applies and reverts `cycles` times; after each step the answers must switch and no bad
/// answer may ever appear. Returns the number of site retries seen.
fn cycle(
    r: &mut Running,
    b: &stitch_format::VerifiedBundle,
    cycles: usize,
    settle: Duration,
) -> u32 {
    let engine = Engine::new();
    let mut retries = 0;
    for i in 0..cycles {
        let rep = engine
            .apply(r.pid(), b)
            .unwrap_or_else(|e| panic!("apply #{i}: [{}] {e}", e.code()));
        retries += rep.site_retries;
        assert_eq!(r.ask(5), "1005", "patched after apply #{i}");
        let (_, p0, bad, _) = stats(r);
        assert_eq!(bad, 0, "bad answers after apply #{i}");
        std::thread::sleep(settle);
        let (_, p1, _, _) = stats(r);
        assert!(
            settle.is_zero() || p1 > p0,
            "spinning threads go through the patch"
        );
        engine
            .revert(r.pid(), "ST-2026-0100")
            .unwrap_or_else(|e| panic!("revert #{i}: [{}] {e}", e.code()));
        assert_eq!(r.ask(5), "6", "original after revert #{i}");
        let (o0, _, bad, _) = stats(r);
        assert_eq!(bad, 0, "bad answers after revert #{i}");
        std::thread::sleep(settle);
        let (o1, _, _, _) = stats(r);
        assert!(
            settle.is_zero() || o1 > o0,
            "spinning threads run the original again"
        );
    }
    assert!(r.alive());
    retries
}

#[test]
fn sixty_four_threads_spinning_inside_the_patched_function() {
    if !can_trace() {
        return;
    }
    let t = compile(SPIN_C, &[]);
    let mut r = Running::start_args(&t.exe, &["64"]);
    let b = patch(&t, "ST-2026-0100", "compute", "drop", PLUS_1000);
    cycle(&mut r, &b, 10, Duration::from_millis(30));
    let (o, p, bad, _) = stats(&mut r);
    assert_eq!(bad, 0);
    assert!(o > 0 && p > 0, "{o} {p}");
}

#[test]
fn thousand_apply_revert_cycles_on_a_busy_multithreaded_process() {
    if !can_trace() {
        return;
    }
    let t = compile(SPIN_C, &[]);
    let mut r = Running::start_args(&t.exe, &["8"]);
    let b = patch(&t, "ST-2026-0100", "compute", "drop", PLUS_1000);
    let t0 = Instant::now();
    let retries = cycle(&mut r, &b, 1000, Duration::ZERO);
    let (o, p, bad, _) = stats(&mut r);
    eprintln!(
        "1000 cycles in {:.1} s, {retries} site retries, {o} original and {p} patched answers, {bad} bad",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(bad, 0);
    assert!(o > 0 && p > 0);
}

#[test]
fn signal_handlers_firing_at_high_rate_during_apply() {
    if !can_trace() {
        return;
    }
    let t = compile(SPIN_C, &[]);
    // Two spinning threads and a 100 us itimer whose handler calls the patched function.
    let mut r = Running::start_args(&t.exe, &["2", "100"]);
    let b = patch(&t, "ST-2026-0100", "compute", "drop", PLUS_1000);
    let engine = Engine::new();
    let (_, _, _, h0) = stats(&mut r);
    let (mut applied, mut refused) = (0, 0);
    for i in 0..200 {
        match engine.apply(r.pid(), &b) {
            Ok(_) => {
                applied += 1;
                assert_eq!(r.ask(5), "1005", "patched after apply #{i}");
                engine
                    .revert(r.pid(), "ST-2026-0100")
                    .unwrap_or_else(|e| panic!("revert #{i}: [{}] {e}", e.code()));
            }
            // On a saturated host the program itself can livelock: the handler takes longer
            // than the timer period, so the interrupted frame (saved RIP inside the site)
            // never resumes. Refusing is the correct answer; nothing may have changed.
            Err(e) if e.code() == "engine.thread_in_site" => {
                refused += 1;
                assert!(
                    engine
                        .list(r.pid())
                        .unwrap()
                        .iter()
                        .all(|a| a.record.state == stitch_engine::region::RecordState::Reverted)
                );
            }
            Err(e) => panic!("apply #{i}: [{}] {e}", e.code()),
        }
        assert_eq!(r.ask(5), "6", "original after cycle #{i}");
        assert_eq!(stats(&mut r).2, 0, "no bad answer after cycle #{i}");
    }
    let (o, p, bad, h1) = stats(&mut r);
    eprintln!(
        "{applied} applied, {refused} refused (thread_in_site); {} handler runs",
        h1 - h0
    );
    assert_eq!(bad, 0);
    assert!(o > 0 && p > 0);
    assert!(applied >= 100, "most cycles apply: {applied} of 200");
    assert!(h1 - h0 > 100, "the handler kept firing: {}", h1 - h0);
}

/// Main thread blocked in read(stdin); one thread in nanosleep (checks it never sleeps less
/// than asked and never sees EINTR), one in FUTEX_WAIT without timeout and one with a
/// timeout (check they return only when woken / timed out, never EINTR).
const BLOCKED_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
__attribute__((noinline)) int compute(int x) { return x + 1; }
static volatile long sleeps, short_sleeps, eintr, futex_spurious, futex_woken, futex_timeouts;
static int word;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static void *sleeper(void *a) {
    (void)a;
    for (;;) {
        struct timespec req = { 0, 200 * 1000 * 1000 };
        double t0 = now();
        if (nanosleep(&req, 0) != 0) eintr++;
        if (now() - t0 < 0.2) short_sleeps++;
        sleeps++;
    }
    return 0;
}
static void *waiter(void *a) {
    (void)a;
    for (;;) {
        long r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
        /* EAGAIN with the word set is a wake too: the waker stored 1 and woke while this
         * thread was between two waits (e.g. not yet back in the kernel after a stop, on a
         * loaded host), so the (restarted) wait saw the new value. */
        int set = __atomic_load_n(&word, __ATOMIC_SEQ_CST) == 1;
        if ((r == 0 || errno == EAGAIN) && set) { futex_woken++; word = 0; }
        else if (r != 0 && errno == EINTR) eintr++;
        else if (r != 0 && errno == EAGAIN) {}
        else futex_spurious++;
    }
    return 0;
}
static int never;
static void *timed(void *a) {
    (void)a;
    for (;;) {
        struct timespec to = { 0, 300 * 1000 * 1000 };
        double t0 = now();
        long r = syscall(SYS_futex, &never, FUTEX_WAIT_PRIVATE, 0, &to, 0, 0);
        if (r != 0 && errno == ETIMEDOUT) { futex_timeouts++; if (now() - t0 < 0.3) short_sleeps++; }
        else if (r != 0 && errno == EINTR) eintr++;
        else futex_spurious++;
    }
    return 0;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, 0, sleeper, 0);
    pthread_create(&t, 0, waiter, 0);
    pthread_create(&t, 0, timed, 0);
    char line[64];
    for (;;) {
        /* read(2) directly: a restart bug would show as a short or failed read. */
        ssize_t n = read(0, line, sizeof line - 1);
        if (n == 0) return 0;
        if (n < 0) { printf("read failed errno %d\n", errno); continue; }
        line[n] = 0;
        if (line[0] == 's') {
            printf("%ld %ld %ld %ld %ld %ld\n", sleeps, short_sleeps, eintr, futex_spurious, futex_woken, futex_timeouts);
        } else if (line[0] == 'w') {
            __atomic_store_n(&word, 1, __ATOMIC_SEQ_CST);
            syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
            printf("woke\n");
        } else {
            printf("%d\n", compute(atoi(line)));
        }
    }
}
"#;

#[test]
fn threads_blocked_in_read_nanosleep_and_futex_restart_their_syscalls() {
    if !can_trace() {
        return;
    }
    let t = compile(BLOCKED_C, &[]);
    let mut r = Running::start(&t.exe);
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0101", "compute", "drop", PLUS_1000);
    let t0 = Instant::now();
    // Apply and revert many times while every thread is blocked in the kernel.
    for i in 0..40 {
        engine.apply(r.pid(), &b).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        engine.revert(r.pid(), "ST-2026-0101").unwrap();
        std::thread::sleep(Duration::from_millis(10));
        if i == 20 {
            // The main thread's read(2) returns exactly our line, patched or not.
            assert_eq!(r.ask(1), "2");
        }
    }
    engine.apply(r.pid(), &b).unwrap();
    // read(2) in the main thread was interrupted ~80 times: it still returns whole lines.
    assert_eq!(r.ask(41), "1041");
    let woke = r.ask_str("w");
    assert_eq!(woke, "woke", "the main thread read exactly our line");
    std::thread::sleep(Duration::from_millis(50));
    let v = r.ask_nums("s");
    let elapsed = t0.elapsed().as_secs_f64();
    let (sleeps, short, eintr, spurious, woken, timeouts) = (v[0], v[1], v[2], v[3], v[4], v[5]);
    eprintln!("{elapsed:.2} s: {sleeps} sleeps, {timeouts} futex timeouts, {woken} wakes");
    assert_eq!(eintr, 0, "no syscall saw EINTR");
    assert_eq!(short, 0, "no sleep or timed wait was cut short");
    assert_eq!(
        spurious, 0,
        "no futex wait returned without a wake or a timeout"
    );
    assert_eq!(
        woken, 1,
        "the futex waiter returned exactly once, when woken"
    );
    // Sleeps restarted with their remaining time: never more sleeps than the time allows.
    assert!(
        sleeps as f64 <= elapsed / 0.2 + 1.0,
        "{sleeps} sleeps in {elapsed:.2} s"
    );
    assert!(
        timeouts as f64 <= elapsed / 0.3 + 1.0,
        "{timeouts} timeouts in {elapsed:.2} s"
    );
    assert!(sleeps >= 2, "the sleeper made progress");
}

#[test]
fn group_stopped_target_is_patched_and_stays_stopped() {
    if !can_trace() {
        return;
    }
    let t = compile(SPIN_C, &[]);
    let mut r = Running::start_args(&t.exe, &["4"]);
    let pid = r.pid();
    let kill = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid.0.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    kill("-STOP");
    assert!(
        wait_for(Duration::from_secs(2), || (proc_state(pid) == 'T')
            .then_some(()))
        .is_some()
    );
    let engine = Engine::new();
    let b = patch(&t, "ST-2026-0100", "compute", "drop", PLUS_1000);
    match engine.apply(pid, &b) {
        Ok(_) => {
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                proc_state(pid),
                'T',
                "still job-control stopped after the apply"
            );
            kill("-CONT");
            assert_eq!(r.ask(5), "1005");
            let (_, _, bad, _) = stats(&mut r);
            assert_eq!(bad, 0);
        }
        Err(e) => {
            // A spinning thread sat inside the site and a stopped process must not run:
            // a clean refusal, and the process is untouched and still stopped.
            assert_eq!(e.code(), "sys.group_stopped", "{e}");
            assert_eq!(proc_state(pid), 'T');
            kill("-CONT");
            assert_eq!(r.ask(5), "6");
        }
    }
}

//! Fan-out of engine operations over many processes: one engine stop per tracer thread at a
//! time, each on its own thread (a tracee belongs to the thread that seized it, and every
//! engine call seizes and releases its process before returning). Used by `stitch apply
//! --all` / `revert --all` and by the agent's scans.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Environment variable overriding [`jobs`].
pub const JOBS_ENV: &str = "STITCH_APPLY_JOBS";

/// How many tracer threads to use for `n_items` processes: the number of CPUs, at most 4
/// ([`JOBS_ENV`] overrides it, 1-64), never more than there are items.
pub fn jobs(n_items: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    std::env::var(JOBS_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| cpus.min(4))
        .clamp(1, 64)
        .min(n_items.max(1))
}

/// `f` over `items` on `jobs` threads (each item on exactly one), results in item order.
/// `tick` is called on the caller's thread with the number of items done so far as items
/// complete. With `jobs <= 1` everything runs on the caller's thread.
pub fn par_map<I: Sync, R: Send>(
    items: &[I],
    jobs: usize,
    f: impl Fn(&I) -> R + Sync,
    mut tick: impl FnMut(usize),
) -> Vec<R> {
    if jobs <= 1 || items.len() <= 1 {
        return items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                tick(i);
                f(x)
            })
            .collect();
    }
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, R)>();
    let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(items.len()) {
            let tx = tx.clone();
            let (next, f) = (&next, &f);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if tx.send((i, f(item))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (done, (i, r)) in rx.iter().enumerate() {
            tick(done);
            out[i] = Some(r);
        }
    });
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_and_results_keep_item_order() {
        let items: Vec<u32> = (0..257).collect();
        let calls = AtomicUsize::new(0);
        let mut ticks = 0;
        let out = par_map(
            &items,
            4,
            |x| {
                calls.fetch_add(1, Ordering::Relaxed);
                x * 2
            },
            |_| ticks += 1,
        );
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(calls.load(Ordering::Relaxed), items.len());
        assert_eq!(ticks, items.len());
        assert_eq!(par_map(&[] as &[u32], 4, |x| *x, |_| {}), Vec::<u32>::new());
        assert_eq!(jobs(0), 1);
        assert!(jobs(1000) >= 1 && jobs(1000) <= 64);
    }
}

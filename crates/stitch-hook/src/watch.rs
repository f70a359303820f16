//! The directory watch: files that appear or change in a watched directory are looked at again.

use std::sync::Mutex;
use std::time::Duration;

use crate::Shared;
use crate::targets::WatchedDirs;

/// inotify bits (Linux ABI, all architectures).
const IN_ISDIR: u32 = 0x4000_0000;
const IN_IGNORED: u32 = 0x0000_8000;
const IN_Q_OVERFLOW: u32 = 0x0000_4000;

/// The directory watch, shared by its thread and [`crate::Hook::rescan`] (inotify watches can
/// be added from any thread; the map from watch descriptor to directory is behind a lock).
pub(crate) struct Watch {
    pub(crate) watcher: stitch_sys::DirWatch,
    pub(crate) dirs: Mutex<WatchedDirs>,
}

impl Watch {
    fn dir_of(&self, wd: i32) -> Option<(std::path::PathBuf, usize)> {
        self.dirs.lock().ok()?.get(&wd).cloned()
    }

    /// Walks every root again (what a start does): marks new targets and watches directories
    /// that did not exist (or were not reachable) before.
    pub(crate) fn rescan(&self, shared: &Shared) {
        let found = shared.targets.scan_all(shared, &self.watcher);
        if let Ok(mut d) = self.dirs.lock() {
            d.extend(found);
        }
    }
}

pub(crate) fn run(shared: &Shared, watch: &Watch, stop: &stitch_sys::Waker) {
    loop {
        // No timeout: an idle watch sleeps until a directory changes or `stop` is woken.
        let events = match watch.watcher.read_events_until(stop, None) {
            Ok((_, true)) => return,
            Ok((e, false)) => e,
            Err(e) => {
                tracing::warn!(error = %e, "directory watch failed; rescanning later");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        for ev in events {
            if ev.mask & IN_Q_OVERFLOW != 0 {
                // Events were lost: look at everything again.
                watch.rescan(shared);
                continue;
            }
            if ev.mask & IN_IGNORED != 0 {
                if let Ok(mut d) = watch.dirs.lock() {
                    d.remove(&ev.wd);
                }
                continue;
            }
            let Some((dir, depth)) = watch.dir_of(ev.wd) else {
                continue;
            };
            if ev.name.is_empty() {
                continue;
            }
            let path = dir.join(&ev.name);
            if ev.mask & IN_ISDIR != 0 {
                if depth > 0
                    && let Ok(wd) = watch.watcher.watch(&path)
                {
                    // A directory moved in arrives with its files already inside.
                    for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                        if entry.file_type().is_ok_and(|t| t.is_file()) {
                            shared.targets.consider(shared, &entry.path());
                        }
                    }
                    if let Ok(mut d) = watch.dirs.lock() {
                        d.insert(wd, (path, depth - 1));
                    }
                }
                continue;
            }
            shared.targets.consider(shared, &path);
        }
    }
}

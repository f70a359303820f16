//! Which files on this host are targets, and their fanotify marks.
//!
//! A file is a target when its size equals some bundle's `target.size` and its SHA-256 equals
//! that bundle's `target.sha256`. The mark goes on through the very descriptor that was hashed,
//! and that descriptor is kept for as long as the mark lives, so the mark can be removed again
//! after the path was pointed at another file (a package upgrade renames a new inode over the
//! old one). Cost of keeping it: the old file's blocks stay allocated until we unmark it, which
//! we do as soon as the directory watch sees the replacement.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};
use stitch_format::VerifiedBundle;

use crate::{HookEvent, Shared};

/// Directories scanned (non-recursively) and watched by default: where distributions put
/// executables and libraries.
pub const STANDARD_DIRS: &[&str] = &[
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
    "/usr/libexec",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/lib/x86_64-linux-gnu",
];

/// A marked inode.
#[derive(Debug)]
pub(crate) struct MarkedFile {
    /// The descriptor that was hashed and marked (kept to unmark the same inode later).
    file: File,
    /// The SHA-256 it had when marked (bundles are matched against it on a bundle change).
    digest: [u8; 32],
    /// What an event on it needs (shared: the reader looks it up for every event).
    target: Arc<Target>,
}

/// A marked file as an event finds it.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) path: PathBuf,
    pub(crate) bundles: Vec<Arc<VerifiedBundle>>,
    /// Marked for `FAN_PRE_ACCESS`: where a loader's `mmap(PROT_EXEC)` of each executable
    /// `PT_LOAD` falls in the file. Empty: held at its open.
    pub(crate) code_maps: Arc<[CodeMapping]>,
}

/// The file range a loader maps for one executable `PT_LOAD`: from its page-aligned offset,
/// at least its page-rounded file extent (ld.so maps exactly that; with the code at offset 0
/// its first `mmap` covers the whole span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodeMapping {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl CodeMapping {
    /// Whether a read or mapping of `(offset, count)` (a `FAN_PRE_ACCESS` range) may be the
    /// loader mapping this code: it starts where the code starts and covers all of it. A
    /// loader's header read (one page from offset 0) does not, unless the code fits in it.
    pub(crate) fn may_map(&self, (offset, count): (u64, u64)) -> bool {
        offset == self.offset && count >= self.len
    }
}

/// Watched directories by inotify watch descriptor: path and how much deeper to go.
pub(crate) type WatchedDirs = HashMap<i32, (PathBuf, usize)>;

/// What [`Targets::identify`] found: `(dev, ino)`, the hashed descriptor, the bundles whose
/// target it is, the engine's key for the file with its SHA-256, and where its code is mapped
/// from if it is a library (see [`Target::code_maps`]).
type Identified = (
    (u64, u64),
    File,
    Vec<Arc<VerifiedBundle>>,
    // Key, digest and the bytes hashed (keyed as of before hashing).
    (stitch_engine::FileKey, [u8; 32], Arc<Vec<u8>>),
    Vec<CodeMapping>,
);

/// The bundles, indexed by target size.
#[derive(Default)]
struct Table {
    bundles: Vec<Arc<VerifiedBundle>>,
    by_size: HashMap<u64, Vec<usize>>,
}

impl Table {
    fn new(bundles: Vec<Arc<VerifiedBundle>>) -> Self {
        let mut by_size: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, b) in bundles.iter().enumerate() {
            by_size.entry(b.patch().target.size).or_default().push(i);
        }
        Self { bundles, by_size }
    }

    fn candidates(&self, size: u64) -> Vec<Arc<VerifiedBundle>> {
        self.by_size
            .get(&size)
            .map(|v| v.iter().map(|&i| self.bundles[i].clone()).collect())
            .unwrap_or_default()
    }

    fn matching(&self, size: u64, digest: &[u8; 32]) -> Vec<Arc<VerifiedBundle>> {
        self.candidates(size)
            .into_iter()
            .filter(|b| b.patch().target.sha256 == *digest)
            .collect()
    }
}

/// What [`crate::Hook::set_bundles`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BundleUpdate {
    /// Inodes newly marked (a new target found on disk).
    pub marked: usize,
    /// Inodes unmarked (no bundle targets them any more).
    pub unmarked: usize,
    /// Inodes that stayed marked throughout (their bundle list may have changed).
    pub kept: usize,
}

pub(crate) struct Targets {
    table: Mutex<Table>,
    /// Held by every look at a path ([`Targets::consider`]) and by a bundle change, so a
    /// file hashed against the old bundles is never marked after the change.
    updating: Mutex<()>,
    marks: Mutex<HashMap<(u64, u64), MarkedFile>>,
    by_path: Mutex<HashMap<PathBuf, (u64, u64)>>,
    mask: u64,
    /// Put `FAN_PRE_ACCESS` marks on libraries ([`crate::HookConfig::watch_mappings`]).
    watch_mappings: bool,
}

/// Where a loader maps the code of a library from (see [`CodeMapping`]); empty for anything
/// else.
fn library_code_maps(elf: &stitch_elf::ElfFile<'_>) -> Vec<CodeMapping> {
    if !elf.is_library() {
        return Vec::new();
    }
    let mut out: Vec<CodeMapping> = elf
        .load_segments()
        .iter()
        .filter(|s| s.executable)
        .map(|s| {
            let in_page = s.offset & 0xfff;
            CodeMapping {
                offset: s.offset - in_page,
                len: (in_page + s.filesz).div_ceil(4096) * 4096,
            }
        })
        .collect();
    out.sort_unstable_by_key(|c| c.offset);
    out.dedup();
    out
}

impl Targets {
    pub(crate) fn new(
        bundles: Vec<VerifiedBundle>,
        exec_holds: bool,
        watch_mappings: bool,
    ) -> Self {
        let bundles: Vec<Arc<VerifiedBundle>> = bundles.into_iter().map(Arc::new).collect();
        Self {
            table: Mutex::new(Table::new(bundles)),
            updating: Mutex::new(()),
            marks: Mutex::new(HashMap::new()),
            by_path: Mutex::new(HashMap::new()),
            // Without exec holds, FAN_OPEN_PERM still fires for an exec's open; the worker
            // recognises it and allows it unheld.
            mask: if exec_holds {
                stitch_sys::FAN_HOLD_MASK
            } else {
                stitch_sys::FAN_HOLD_MASK & !stitch_sys::FAN_OPEN_EXEC_PERM
            },
            // A thread in exec is never held at a mapping (it may hold `cred_guard_mutex`,
            // which `PTRACE_SEIZE` takes): that needs every exec of a target held first.
            watch_mappings: watch_mappings && exec_holds,
        }
    }

    /// The events a mark asks for: an open-held file every open (and the exec open), a file
    /// held at its mapping its reads and mappings instead of its opens (its open needs no
    /// hold; each event costs the opening thread a round trip through our reader).
    fn mark_mask(&self, mappings: bool) -> u64 {
        if mappings {
            (self.mask & !stitch_sys::FAN_OPEN_PERM) | stitch_sys::FAN_PRE_ACCESS
        } else {
            self.mask
        }
    }

    /// The marked inode `(dev, ino)`.
    pub(crate) fn lookup(&self, key: (u64, u64)) -> Option<Arc<Target>> {
        let marks = self.marks.lock().ok()?;
        marks.get(&key).map(|m| m.target.clone())
    }

    pub(crate) fn marked(&self) -> Vec<(PathBuf, Vec<String>)> {
        let Ok(marks) = self.marks.lock() else {
            return Vec::new();
        };
        marks
            .values()
            .map(|m| {
                (
                    m.target.path.clone(),
                    m.target
                        .bundles
                        .iter()
                        .map(|b| b.patch().id.clone())
                        .collect(),
                )
            })
            .collect()
    }

    /// What the current bundles import: (module file name, symbol), each once.
    pub(crate) fn imports(&self) -> Vec<(String, String)> {
        let Ok(t) = self.table.lock() else {
            return Vec::new();
        };
        let mut all: Vec<(String, String)> = t
            .bundles
            .iter()
            .flat_map(|b| {
                b.patch()
                    .imports
                    .iter()
                    .map(|i| (i.module.clone(), i.symbol.clone()))
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Those of `bundles` that are still hooked (the same bundle, not only the same id): a
    /// job queued before a bundle change must not apply a bundle removed since.
    pub(crate) fn current(&self, bundles: &[Arc<VerifiedBundle>]) -> Vec<Arc<VerifiedBundle>> {
        let Ok(t) = self.table.lock() else {
            return Vec::new();
        };
        bundles
            .iter()
            .filter(|b| t.bundles.iter().any(|c| Arc::ptr_eq(c, b)))
            .cloned()
            .collect()
    }

    /// Replaces the bundles: marks that stay targets are kept (never removed, not even for a
    /// moment) with their new bundle list, marks no bundle targets any more are removed, and
    /// the directories are walked for files of the new targets' sizes that are not marked yet.
    pub(crate) fn set_bundles(
        &self,
        shared: &Shared,
        bundles: Vec<VerifiedBundle>,
    ) -> BundleUpdate {
        let _updating = self.updating.lock();
        let mut update = BundleUpdate::default();
        // Keep the Arc of a bundle that stays (same id, revision and target): a hold already
        // queued with it stays valid.
        let old = self
            .table
            .lock()
            .map(|t| t.bundles.clone())
            .unwrap_or_default();
        let same = |a: &VerifiedBundle, b: &VerifiedBundle| {
            let (a, b) = (a.patch(), b.patch());
            a.id == b.id
                && a.revision == b.revision
                && a.target.sha256 == b.target.sha256
                && a.target.size == b.target.size
        };
        let mut new_sizes = std::collections::HashSet::new();
        let bundles: Vec<Arc<VerifiedBundle>> = bundles
            .into_iter()
            .map(|b| match old.iter().find(|o| same(o, &b)) {
                Some(o) => o.clone(),
                None => {
                    if !old.iter().any(|o| {
                        o.patch().target.sha256 == b.patch().target.sha256
                            && o.patch().target.size == b.patch().target.size
                    }) {
                        new_sizes.insert(b.patch().target.size);
                    }
                    Arc::new(b)
                }
            })
            .collect();
        let table = Table::new(bundles);
        let mut gone = Vec::new();
        if let Ok(mut marks) = self.marks.lock() {
            for (key, m) in marks.iter_mut() {
                let size = m.file.metadata().map_or(0, |md| md.len());
                let now = table.matching(size, &m.digest);
                if now.is_empty() {
                    gone.push(*key);
                } else {
                    m.target = Arc::new(Target {
                        path: m.target.path.clone(),
                        bundles: now,
                        code_maps: m.target.code_maps.clone(),
                    });
                    update.kept += 1;
                }
            }
        }
        if let Ok(mut t) = self.table.lock() {
            *t = table;
        }
        for key in gone {
            self.unmark(shared, key);
            update.unmarked += 1;
        }
        if !new_sizes.is_empty() {
            let before = self.marks.lock().map_or(0, |m| m.len());
            self.walk(shared, |md| {
                new_sizes.contains(&md.len())
                    && !self
                        .marks
                        .lock()
                        .is_ok_and(|m| m.contains_key(&(md.dev(), md.ino())))
            });
            let after = self.marks.lock().map_or(0, |m| m.len());
            update.marked = after.saturating_sub(before);
        }
        update
    }

    /// Walks every root (no watches added) and looks at each file `want` selects.
    fn walk(&self, shared: &Shared, want: impl Fn(&std::fs::Metadata) -> bool) {
        let mut stack = Self::roots(shared);
        while let Some((dir, depth)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in rd.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() && depth > 0 {
                    stack.push((entry.path(), depth - 1));
                } else if ft.is_file() && entry.metadata().is_ok_and(|md| want(&md)) {
                    self.consider_locked(shared, &entry.path());
                }
            }
        }
    }

    /// The directories to scan: standard ones (depth 0) and configured ones.
    fn roots(shared: &Shared) -> Vec<(PathBuf, usize)> {
        let mut out: Vec<(PathBuf, usize)> = Vec::new();
        let mut add = |p: &Path, depth: usize| {
            if let Ok(c) = std::fs::canonicalize(p)
                && c.is_dir()
            {
                match out.iter_mut().find(|(q, _)| *q == c) {
                    Some((_, d)) => *d = (*d).max(depth),
                    None => out.push((c, depth)),
                }
            }
        };
        if shared.config.standard_dirs {
            for d in STANDARD_DIRS {
                add(Path::new(d), 0);
            }
        }
        for d in &shared.config.dirs {
            add(d, shared.config.depth);
        }
        out
    }

    /// Walks every root, watches each directory, marks every target found.
    pub(crate) fn scan_all(&self, shared: &Shared, watcher: &stitch_sys::DirWatch) -> WatchedDirs {
        let mut watched = WatchedDirs::new();
        let mut stack = Self::roots(shared);
        while let Some((dir, depth)) = stack.pop() {
            match watcher.watch(&dir) {
                Ok(wd) => {
                    watched.insert(wd, (dir.clone(), depth));
                }
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch"),
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in rd.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() && depth > 0 {
                    stack.push((entry.path(), depth - 1));
                } else if ft.is_file() {
                    self.consider(shared, &entry.path());
                }
            }
        }
        watched
    }

    /// Looks at one path (new, moved in, rewritten, or found by a scan): marks it if it is a
    /// target, unmarks what it named before if that was another inode or is no longer one.
    pub(crate) fn consider(&self, shared: &Shared, path: &Path) {
        let _updating = self.updating.lock();
        self.consider_locked(shared, path);
    }

    /// [`Targets::consider`] with `updating` held by the caller.
    fn consider_locked(&self, shared: &Shared, path: &Path) {
        let before = self.by_path.lock().ok().and_then(|m| m.get(path).copied());
        let now = self.identify(path);
        match (&now, before) {
            (Some((key, ..)), Some(old)) if *key != old => self.unmark(shared, old),
            (None, Some(old)) => self.unmark(shared, old),
            _ => {}
        }
        let Some((key, file, bundles, (file_key, digest, bytes), code_maps)) = now else {
            // Same inode, content no longer a target (rewritten in place)?
            if let Some(k) = self.key_of_path(path) {
                self.unmark(shared, k);
            }
            return;
        };
        // The engine's plan at load time identifies the module by this digest and parses
        // these bytes: it need not read the file again, not even at the first load after a
        // start (that first exec hold read and parsed it under the hold: ~0.85 ms, the p99).
        shared
            .engine
            .digests
            .remember_with_bytes(file_key, digest, bytes);
        let already = self.marks.lock().is_ok_and(|m| m.contains_key(&key));
        if already {
            if let Ok(mut p) = self.by_path.lock() {
                p.insert(path.to_path_buf(), key);
            }
            return;
        }
        // A library is held at its executable mapping where the kernel and the filesystem
        // report mappings (`FAN_PRE_ACCESS`); elsewhere at its open, followed syscall by
        // syscall to that mapping.
        // (`code_maps` is empty unless mapping holds are on and the file is a library.)
        let pre = !code_maps.is_empty()
            && shared
                .group
                .mark_inode(file.as_fd(), self.mark_mask(true))
                .inspect_err(|e| {
                    tracing::debug!(path = %path.display(), error = %e, "no FAN_PRE_ACCESS mark: held at the open");
                })
                .is_ok();
        if !pre && let Err(e) = shared.group.mark_inode(file.as_fd(), self.mask) {
            tracing::warn!(path = %path.display(), error = %e, "cannot mark");
            return;
        }
        let code_maps: Arc<[CodeMapping]> = if pre {
            Arc::from(code_maps)
        } else {
            Arc::from(Vec::new())
        };
        let patches = bundles.iter().map(|b| b.patch().id.clone()).collect();
        if let Ok(mut m) = self.marks.lock() {
            m.insert(
                key,
                MarkedFile {
                    file,
                    digest,
                    target: Arc::new(Target {
                        path: path.to_path_buf(),
                        bundles,
                        code_maps,
                    }),
                },
            );
        }
        if let Ok(mut p) = self.by_path.lock() {
            p.insert(path.to_path_buf(), key);
        }
        shared.emit(HookEvent::Marked {
            path: path.to_path_buf(),
            dev: key.0,
            ino: key.1,
            patches,
            held_at: if pre {
                crate::HeldAt::Mapping
            } else {
                crate::HeldAt::Open
            },
        });
    }

    fn key_of_path(&self, path: &Path) -> Option<(u64, u64)> {
        let md = std::fs::symlink_metadata(path).ok()?;
        let key = (md.dev(), md.ino());
        self.marks.lock().ok()?.contains_key(&key).then_some(key)
    }

    /// `(dev, ino)`, the open file, the bundles whose target it is, and the file's engine key
    /// (as of before hashing) with its digest; `None` if it is no target.
    fn identify(&self, path: &Path) -> Option<Identified> {
        let md = std::fs::symlink_metadata(path).ok()?;
        if !md.file_type().is_file() {
            return None;
        }
        if self
            .table
            .lock()
            .map_or(true, |t| t.candidates(md.len()).is_empty())
        {
            return None;
        }
        // Opening a marked inode raises an event from our own process: the reader answers it.
        let mut f = File::open(path).ok()?;
        let fmd = f.metadata().ok()?;
        // Keyed as of before hashing: a file changed while hashed has another key.
        let key = stitch_engine::FileKey::of(&fmd);
        let mut data = Vec::with_capacity(usize::try_from(fmd.len()).unwrap_or(0));
        f.read_to_end(&mut data).ok()?;
        let digest: [u8; 32] = Sha256::digest(&data).into();
        // The table as of now (a bundle change waits for `updating`, which our caller holds).
        let bundles = self.table.lock().ok()?.matching(fmd.len(), &digest);
        if bundles.is_empty() {
            return None;
        }
        // Layout only: whether it is a loader or a library, and where its code is.
        let elf = stitch_elf::ElfFile::parse_layout(&data).ok();
        if elf
            .as_ref()
            .is_some_and(stitch_elf::ElfFile::is_interpreter)
        {
            // Opened and mapped by the kernel inside the exec of every program naming it as
            // its interpreter, holding `cred_guard_mutex`: any event on it would come from a
            // thread that cannot be seized, and cost every exec on the host. Not marked; the
            // processes are live-patched after their exec.
            tracing::info!(path = %path.display(), "a dynamic loader: not held at load time");
            return None;
        }
        let code_maps = match &elf {
            Some(elf) if self.watch_mappings => library_code_maps(elf),
            _ => Vec::new(),
        };
        Some((
            (fmd.dev(), fmd.ino()),
            f,
            bundles,
            (key, digest, Arc::new(data)),
            code_maps,
        ))
    }

    fn unmark(&self, shared: &Shared, key: (u64, u64)) {
        let Some(m) = self.marks.lock().ok().and_then(|mut m| m.remove(&key)) else {
            return;
        };
        let mask = self.mark_mask(!m.target.code_maps.is_empty());
        if let Err(e) = shared.group.unmark_inode(m.file.as_fd(), mask) {
            tracing::warn!(path = %m.target.path.display(), error = %e, "cannot unmark");
        }
        if let Ok(mut p) = self.by_path.lock() {
            p.retain(|_, k| *k != key);
        }
        shared.emit(HookEvent::Unmarked {
            path: m.target.path.clone(),
            dev: key.0,
            ino: key.1,
        });
    }
}

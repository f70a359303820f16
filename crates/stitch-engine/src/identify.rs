//! Which module in a process is the patch's target — by the SHA-256 of the *mapped inode*.
//!
//! The file is opened through `/proc/PID/map_files/START-END`, which names the inode the
//! process actually mapped: a file replaced on disk after the process mapped it, a
//! `(deleted)` file, a process in another mount namespace or a chroot are all identified
//! correctly. Without the privilege map_files needs, `/proc/PID/root/PATH` is used and the
//! inode is checked against the mapping. Digests are cached by (device, inode, size, ctime)
//! so each file is hashed once however many processes map it.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stitch_elf::maps::{self, MapPath, Module};
use stitch_sys::Pid;

use crate::EngineError;

/// Identity of a file's contents as far as the kernel can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl FileKey {
    /// The key of the file `md` describes (`stat`/`fstat` of it).
    #[must_use]
    pub fn of(md: &std::fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

/// SHA-256 of files, by [`FileKey`]; plus the bytes of the few files read last (so a plan
/// does not read a module it just hashed, or an import library, again).
#[derive(Debug, Default)]
pub struct DigestCache {
    map: Mutex<HashMap<FileKey, [u8; 32]>>,
    bytes: Mutex<VecDeque<(FileKey, Arc<Vec<u8>>)>>,
    /// Exported symbols looked up in a file, by its key: a patch's imports (`strncpy` in
    /// `libc.so.6`) are found once per file instead of collecting the file's symbols for
    /// every plan (~95 us for libc).
    symbols: Mutex<HashMap<(FileKey, String), Option<u64>>>,
}

/// How many files' bytes [`DigestCache`] keeps, and how many bytes in all.
const BYTES_CACHE_FILES: usize = 16;
const BYTES_CACHE_TOTAL: usize = 64 << 20;

impl DigestCache {
    /// Number of files hashed so far.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
    /// True when nothing was hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, k: &FileKey) -> Option<[u8; 32]> {
        self.map.lock().ok()?.get(k).copied()
    }
    fn put(&self, k: FileKey, d: [u8; 32]) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(k, d);
        }
    }

    /// Records that the file with `key` has the SHA-256 `sha256`, for a caller that hashed it
    /// itself (the load-time hook hashes every target it marks): the engine then does not
    /// read and hash it again. Take `key` from `fstat` of the descriptor that was hashed,
    /// *before* hashing (as the engine does): a file changed meanwhile gets a new ctime,
    /// hence another key, and is hashed again when the engine looks at it.
    pub fn remember(&self, key: FileKey, sha256: [u8; 32]) {
        self.put(key, sha256);
    }

    /// [`DigestCache::remember`], and keeps `bytes` (what was hashed) among the few files
    /// whose bytes are cached, so a plan for that file parses them instead of reading the
    /// file (the hook's first hold of a target otherwise read it under the hold). Same rule
    /// for `key`: from `fstat` before reading. Files over a quarter of the byte budget are
    /// not kept (their digest is).
    pub fn remember_with_bytes(&self, key: FileKey, sha256: [u8; 32], bytes: Arc<Vec<u8>>) {
        self.put(key, sha256);
        self.put_bytes(key, bytes);
    }

    /// The bytes of the file at `path` and its key (`fstat` before reading), from the cache
    /// when that key is there, else read and kept among the few files whose bytes are cached
    /// — without a digest: for a file a plan reads but need not identify, the library a
    /// patch imports from, which the load-time hook loads at start from its own mapping of
    /// it (the same inode most processes map) so that no hold reads it.
    ///
    /// # Errors
    /// [`EngineError::Io`] when the file cannot be opened or read.
    pub fn load_file(&self, path: &Path) -> Result<(FileKey, Arc<Vec<u8>>), EngineError> {
        let shown = path.display().to_string();
        let mut f = File::open(path).map_err(io_err(&shown))?;
        let key = key_of(&f, &shown)?;
        if let Some(b) = self.cached_bytes(&key) {
            return Ok((key, b));
        }
        let mut v = Vec::with_capacity(usize::try_from(key.size).unwrap_or(0));
        f.read_to_end(&mut v).map_err(io_err(&shown))?;
        let b = Arc::new(v);
        self.put_bytes(key, Arc::clone(&b));
        Ok((key, b))
    }

    fn cached_bytes(&self, k: &FileKey) -> Option<Arc<Vec<u8>>> {
        let q = self.bytes.lock().ok()?;
        q.iter()
            .find(|(key, _)| key == k)
            .map(|(_, b)| Arc::clone(b))
    }

    fn put_bytes(&self, k: FileKey, b: Arc<Vec<u8>>) {
        if b.len() > BYTES_CACHE_TOTAL / 4 {
            return;
        }
        if let Ok(mut q) = self.bytes.lock() {
            q.retain(|(key, _)| *key != k);
            q.push_back((k, b));
            while q.len() > BYTES_CACHE_FILES
                || q.iter().map(|(_, b)| b.len()).sum::<usize>() > BYTES_CACHE_TOTAL
            {
                q.pop_front();
            }
        }
    }

    /// The bytes of the file behind a module's mapping (as the process sees it), from the
    /// cache when the file's key is unchanged.
    pub(crate) fn module_bytes(&self, pid: Pid, m: &Module) -> Result<Arc<Vec<u8>>, EngineError> {
        self.module_bytes_keyed(pid, m).map(|(_, b)| b)
    }

    /// [`DigestCache::module_bytes`] and the key they were read under.
    pub(crate) fn module_bytes_keyed(
        &self,
        pid: Pid,
        m: &Module,
    ) -> Result<(FileKey, Arc<Vec<u8>>), EngineError> {
        let first = first_mapping(pid, m)?;
        let key = stat_mapped_range(pid, first.start, first.end, &m.path, m.inode)?;
        if let Some(b) = self.cached_bytes(&key) {
            return Ok((key, b));
        }
        let mut f = open_mapped(pid, m)?;
        let shown = m.path.display().to_string();
        let key = key_of(&f, &shown)?;
        let mut v = Vec::with_capacity(key.size as usize);
        f.read_to_end(&mut v).map_err(io_err(&shown))?;
        let b = Arc::new(v);
        self.put_bytes(key, Arc::clone(&b));
        Ok((key, b))
    }

    /// The module-relative address of `name` as `bytes` (the file with `key`) exports it,
    /// looked up once per file and symbol. `None`: not exported there, or not an ELF file.
    pub fn exported_symbol(&self, key: FileKey, bytes: &[u8], name: &str) -> Option<u64> {
        let k = (key, name.to_string());
        if let Some(found) = self.symbols.lock().ok().and_then(|m| m.get(&k).copied()) {
            return found;
        }
        let found = stitch_elf::ElfFile::parse(bytes)
            .ok()
            .and_then(|elf| elf.exported_symbol(name))
            .map(|sym| sym.vaddr);
        if let Ok(mut m) = self.symbols.lock() {
            // A long-running agent sees files come and go: bound the cache (a miss only
            // costs one parse).
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert(k, found);
        }
        found
    }

    /// The digest of the file mapped at `start..end` whose `stat` gave `key`: from the cache,
    /// else opened, keyed again by `fstat` of that descriptor (before reading) and hashed.
    fn digest_of(
        &self,
        pid: Pid,
        (start, end): (u64, u64),
        path: &Path,
        inode: u64,
        key: FileKey,
    ) -> Result<(FileKey, [u8; 32]), EngineError> {
        if let Some(d) = self.get(&key) {
            return Ok((key, d));
        }
        let mut f = open_mapped_range(pid, start, end, path, inode)?;
        let shown = path.display().to_string();
        let key = key_of(&f, &shown)?;
        let mut bytes = Vec::with_capacity(key.size as usize);
        f.read_to_end(&mut bytes).map_err(io_err(&shown))?;
        let d = stitch_elf::sha256(&bytes);
        self.put(key, d);
        self.put_bytes(key, Arc::new(bytes));
        Ok((key, d))
    }

    /// The bytes cached for `key`, if any (no I/O).
    pub(crate) fn cached_bytes_of(&self, key: &FileKey) -> Option<Arc<Vec<u8>>> {
        self.cached_bytes(key)
    }

    /// The digest remembered for `key`, if any (no I/O).
    pub(crate) fn digest_for_key(&self, key: &FileKey) -> Option<[u8; 32]> {
        self.get(key)
    }

    /// The bytes of the file with `key`, mapped by `pid` at `start..end`: from the cache, else
    /// read through that mapping's `map_files` entry — and only if the descriptor opened there
    /// still has `key` (else `None`: the caller takes the slow path).
    pub(crate) fn bytes_for_key(
        &self,
        pid: Pid,
        key: &FileKey,
        (start, end): (u64, u64),
        path: &Path,
    ) -> Result<Option<Arc<Vec<u8>>>, EngineError> {
        if let Some(b) = self.cached_bytes(key) {
            return Ok(Some(b));
        }
        let mut f = open_mapped_range(pid, start, end, path, key.ino)?;
        let shown = path.display().to_string();
        if key_of(&f, &shown)? != *key {
            return Ok(None);
        }
        let mut v = Vec::with_capacity(key.size as usize);
        f.read_to_end(&mut v).map_err(io_err(&shown))?;
        let b = Arc::new(v);
        self.put_bytes(*key, Arc::clone(&b));
        Ok(Some(b))
    }

    /// Under a stop: whether the file mapped at `start..end` (a module's lowest mapping, as
    /// `/proc/PID/maps` lists it) has the SHA-256 `sha256`. Looks only at that mapping's
    /// `map_files` entry (a `stat`; opened and hashed only if its key is not cached).
    pub(crate) fn mapping_has_digest(
        &self,
        pid: Pid,
        start: u64,
        end: u64,
        path: &Path,
        inode: u64,
        sha256: &[u8; 32],
    ) -> Result<bool, EngineError> {
        let key = stat_mapped_range(pid, start, end, path, inode)?;
        let (_, d) = self.digest_of(pid, (start, end), path, inode, key)?;
        Ok(&d == sha256)
    }
}

fn first_mapping(pid: Pid, m: &Module) -> Result<&maps::MapEntry, EngineError> {
    m.mappings.first().ok_or_else(|| EngineError::ModuleLayout {
        pid: pid.0,
        path: m.path.display().to_string(),
        reason: "no mappings".into(),
    })
}

/// The key of the file mapped at `start..end`, by `stat` of its `/proc/PID/map_files` entry
/// (the mapped inode, like an open, but no open: nothing to close, and no fanotify
/// permission event on a marked file). Without the privilege map_files needs, through an
/// open as [`open_mapped`] does it.
pub(crate) fn stat_mapped_range(
    pid: Pid,
    start: u64,
    end: u64,
    path: &Path,
    inode: u64,
) -> Result<FileKey, EngineError> {
    let via_map_files = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    match std::fs::metadata(&via_map_files) {
        Ok(md) => Ok(FileKey::of(&md)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let f = open_mapped_range(pid, start, end, path, inode)?;
            key_of(&f, &path.display().to_string())
        }
        Err(e) => Err(io_err(&via_map_files)(e)),
    }
}

/// What a caller that watched a module being mapped knows about it — the load-time hook, at
/// the exit of the `mmap(PROT_EXEC)` of the descriptor the process opened the file with.
/// [`crate::Engine::plan_mapped`] plans from it without reading `/proc/PID/maps` or `stat`ing
/// `map_files`; [`crate::Engine::commit_known`] checks it against the maps under the stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownMapping {
    /// The file's path (for messages and the plan).
    pub path: PathBuf,
    /// `fstat` of the file the process opened (the hook keeps the permission event's
    /// descriptor), taken at the `mmap`'s exit. Its digest must be in the [`DigestCache`]
    /// (the hook `remember`s every file it marks); otherwise the plan takes the slow path.
    pub key: FileKey,
    /// The executable mapping just made: the `mmap`'s result, one past its end (page
    /// rounded) and its file offset.
    pub exec_start: u64,
    pub exec_end: u64,
    pub exec_offset: u64,
}

/// `major:minor` of an `st_dev` as `/proc/PID/maps` prints it (glibc's `gnu_dev_major`,
/// `gnu_dev_minor`).
pub(crate) fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// A module mapped in a process, identified.
#[derive(Debug, Clone)]
pub struct MappedModule {
    pub path: PathBuf,
    pub deleted: bool,
    pub key: FileKey,
    pub sha256: [u8; 32],
    /// Lowest mapped address of the module.
    pub start: u64,
    /// One past its highest mapped address.
    pub end: u64,
    /// The maps entries of this module.
    pub module: Module,
}

pub(crate) fn io_err(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.as_ref().display().to_string();
    move |source| EngineError::Io { path, source }
}

/// The parsed `/proc/PID/maps`.
pub(crate) fn read_maps(pid: Pid) -> Result<Vec<maps::MapEntry>, EngineError> {
    let path = format!("/proc/{pid}/maps");
    let bytes = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EngineError::Sys(stitch_sys::SysError::NoSuchProcess { pid })
        } else {
            io_err(&path)(e)
        }
    })?;
    maps::parse(&bytes).map_err(|e| EngineError::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })
}

/// Opens the file behind a module's mapping, as the process sees it.
pub(crate) fn open_mapped(pid: Pid, m: &Module) -> Result<File, EngineError> {
    let first = first_mapping(pid, m)?;
    open_mapped_range(pid, first.start, first.end, &m.path, m.inode)
}

/// Opens the file mapped at `start..end` (one `/proc/PID/maps` entry of the module `path`,
/// inode `inode`).
fn open_mapped_range(
    pid: Pid,
    start: u64,
    end: u64,
    path: &Path,
    inode: u64,
) -> Result<File, EngineError> {
    let via_map_files = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    match File::open(&via_map_files) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // map_files needs CAP_SYS_ADMIN; fall back to the path in the process's root and
            // make sure it is the same inode that is mapped.
            let rel = path.strip_prefix("/").unwrap_or(path);
            let p = Path::new(&format!("/proc/{pid}/root")).join(rel);
            let f = File::open(&p).map_err(io_err(&p))?;
            let md = f.metadata().map_err(io_err(&p))?;
            if md.ino() != inode {
                return Err(EngineError::ModuleLayout {
                    pid: pid.0,
                    path: path.display().to_string(),
                    reason: "file on disk is not the mapped inode (replaced?) and map_files is not readable without CAP_SYS_ADMIN".into(),
                });
            }
            Ok(f)
        }
        Err(e) => Err(io_err(&via_map_files)(e)),
    }
}

fn key_of(f: &File, path: &str) -> Result<FileKey, EngineError> {
    let md = f.metadata().map_err(io_err(path))?;
    Ok(FileKey::of(&md))
}

impl DigestCache {
    /// Identifies every file-backed module of `pid` whose size equals `size_hint` when given
    /// (a cheap pre-filter: only files of the target's exact size are hashed).
    pub fn modules(
        &self,
        pid: Pid,
        entries: &[maps::MapEntry],
        size_hint: Option<u64>,
    ) -> Result<Vec<MappedModule>, EngineError> {
        self.modules_where(pid, entries, size_hint, |_| true)
    }

    fn modules_where(
        &self,
        pid: Pid,
        entries: &[maps::MapEntry],
        size_hint: Option<u64>,
        wanted: impl Fn(&Module) -> bool,
    ) -> Result<Vec<MappedModule>, EngineError> {
        let mut out = Vec::new();
        for module in maps::modules(entries) {
            if module.inode == 0 || !wanted(&module) {
                continue;
            }
            let Ok(first) = first_mapping(pid, &module) else {
                continue;
            };
            let range = (first.start, first.end);
            let Ok(key) = stat_mapped_range(pid, range.0, range.1, &module.path, module.inode)
            else {
                continue;
            };
            if size_hint.is_some_and(|s| s != key.size) {
                continue;
            }
            let (key, sha256) = self.digest_of(pid, range, &module.path, module.inode, key)?;
            let start = module.mappings.iter().map(|m| m.start).min().unwrap_or(0);
            let end = module.mappings.iter().map(|m| m.end).max().unwrap_or(0);
            out.push(MappedModule {
                path: module.path.clone(),
                deleted: module.deleted,
                key,
                sha256,
                start,
                end,
                module,
            });
        }
        Ok(out)
    }
}

/// File name of a mapped path (what imports and `target.module` name).
pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// [`maybe_region`] for a mapping as `stitch-sys` reports it (under the stop).
pub(crate) fn maybe_region_sys(m: &stitch_sys::Mapping) -> bool {
    let named = m.name.is_empty() || m.name == format!("[anon:{}]", crate::region::ANON_NAME);
    m.end - m.start == crate::region::TRAMPOLINE_START
        && named
        && m.inode == 0
        && m.perms.read
        && m.perms.write
        && !m.perms.exec
        && !m.perms.shared
}

/// Whether a process's maps may hold a Stitch region: a data part ([`maybe_region`]) directly
/// followed by its read-execute trampoline part (the rest of `REGION_SIZE`, anonymous or
/// `[anon:stitch]`, private). A lone 8 KiB anonymous read-write mapping is common (a fifth of
/// the processes of a small host); the pair is not. For sweeps that look for carriers without
/// knowing their module (the agent's, for a patch whose bundle no longer verifies); the
/// region's magic confirms ([`crate::Engine::list`]).
pub fn may_hold_region(entries: &[maps::MapEntry]) -> bool {
    entries.windows(2).any(|w| {
        let (data, code) = (&w[0], &w[1]);
        maybe_region(data)
            && region_anon(code)
            && code.start == data.end
            && code.end - code.start == crate::region::REGION_SIZE - crate::region::TRAMPOLINE_START
            && code.exec
            && !code.write
            && !code.shared
    })
}

/// True when the maps entry may be the data part of a Stitch region: the read-write first
/// `TRAMPOLINE_START` bytes, named `[anon:stitch]` (or unnamed where the kernel cannot name
/// mappings). The caller confirms by reading the magic.
pub(crate) fn maybe_region(e: &maps::MapEntry) -> bool {
    let size_ok = e.end - e.start == crate::region::TRAMPOLINE_START;
    region_anon(e) && size_ok && e.read && e.write && !e.exec && !e.shared
}

/// Anonymous, or named `[anon:stitch]`: how either part of a region shows in the maps.
fn region_anon(e: &maps::MapEntry) -> bool {
    match &e.path {
        MapPath::Special(s) => s == &format!("[anon:{}]", crate::region::ANON_NAME),
        MapPath::Anonymous => true,
        MapPath::File { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stitch_region_is_recognised_from_maps_and_a_lone_8k_mapping_is_not() {
        let region = b"7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n7f0000002000-7f0000010000 r-xp 00000000 00:00 0 \n";
        let named = b"7f0000000000-7f0000002000 rw-p 00000000 00:00 0 [anon:stitch]\n7f0000002000-7f0000010000 r-xp 00000000 00:00 0 [anon:stitch]\n";
        let lone = b"7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n7f0000003000-7f0000011000 r-xp 00000000 00:00 0 \n";
        let file = b"7f0000000000-7f0000002000 rw-p 00000000 08:01 42 /lib/x.so\n7f0000002000-7f0000010000 r-xp 00000000 00:00 0 \n";
        let parse = |b: &[u8]| maps::parse(b).unwrap();
        assert!(may_hold_region(&parse(region)));
        assert!(may_hold_region(&parse(named)));
        assert!(!may_hold_region(&parse(lone)));
        assert!(!may_hold_region(&parse(file)));
    }

    /// The hook hands over what it hashed when it marks a target; the hazard was the first
    /// load after a start reading and parsing the file under the hold (~0.85 ms, the p99).
    #[test]
    fn bytes_remembered_with_a_digest_are_served_without_io_and_huge_files_keep_only_the_digest() {
        let cache = DigestCache::default();
        let key = |ino| FileKey {
            dev: 1,
            ino,
            size: 4,
            ctime: 2,
            ctime_nsec: 3,
        };
        cache.remember_with_bytes(key(7), [9; 32], Arc::new(b"\x7fELF".to_vec()));
        assert_eq!(cache.digest_for_key(&key(7)), Some([9; 32]));
        assert_eq!(
            cache.cached_bytes_of(&key(7)).as_deref().map(Vec::as_slice),
            Some(&b"\x7fELF"[..])
        );
        // Another key (the file changed: new ctime) is not served these bytes.
        assert!(cache.cached_bytes_of(&key(8)).is_none());
        let huge = Arc::new(vec![0u8; BYTES_CACHE_TOTAL / 4 + 1]);
        cache.remember_with_bytes(key(9), [1; 32], huge);
        assert_eq!(cache.digest_for_key(&key(9)), Some([1; 32]));
        assert!(cache.cached_bytes_of(&key(9)).is_none());
        assert!(
            cache.cached_bytes_of(&key(7)).is_some(),
            "not evicted by it"
        );
    }
}

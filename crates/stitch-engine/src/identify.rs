//! Which module in a process is the patch's target — by the SHA-256 of the *mapped inode*.
//!
//! The file is opened through `/proc/PID/map_files/START-END`, which names the inode the
//! process actually mapped: a file replaced on disk after the process mapped it, a
//! `(deleted)` file, a process in another mount namespace or a chroot are all identified
//! correctly. Without the privilege map_files needs, `/proc/PID/root/PATH` is used and the
//! inode is checked against the mapping. Digests are cached by (device, inode, size, ctime)
//! so each file is hashed once however many processes map it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// SHA-256 of files, by [`FileKey`].
#[derive(Debug, Default)]
pub struct DigestCache {
    map: Mutex<HashMap<FileKey, [u8; 32]>>,
}

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
    let first = m
        .mappings
        .first()
        .ok_or_else(|| EngineError::ModuleLayout {
            pid: pid.0,
            path: m.path.display().to_string(),
            reason: "no mappings".into(),
        })?;
    let via_map_files = format!("/proc/{pid}/map_files/{}", first.map_files_name());
    match File::open(&via_map_files) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // map_files needs CAP_SYS_ADMIN; fall back to the path in the process's root and
            // make sure it is the same inode that is mapped.
            let rel = m.path.strip_prefix("/").unwrap_or(&m.path);
            let p = Path::new(&format!("/proc/{pid}/root")).join(rel);
            let f = File::open(&p).map_err(io_err(&p))?;
            let md = f.metadata().map_err(io_err(&p))?;
            if md.ino() != m.inode {
                return Err(EngineError::ModuleLayout {
                    pid: pid.0,
                    path: m.path.display().to_string(),
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
    Ok(FileKey {
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        ctime: md.ctime(),
        ctime_nsec: md.ctime_nsec(),
    })
}

/// Reads the whole mapped file.
pub(crate) fn read_mapped(pid: Pid, m: &Module) -> Result<Vec<u8>, EngineError> {
    let mut f = open_mapped(pid, m)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(io_err(m.path.display().to_string()))?;
    Ok(v)
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

    /// The module of `pid` whose lowest mapping starts at `start`, identified (only that file
    /// is opened and, if not cached, hashed).
    pub(crate) fn module_at(
        &self,
        pid: Pid,
        entries: &[maps::MapEntry],
        start: u64,
    ) -> Result<Option<MappedModule>, EngineError> {
        Ok(self
            .modules_where(pid, entries, None, |m| {
                m.mappings.iter().map(|e| e.start).min() == Some(start)
            })?
            .into_iter()
            .next())
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
            let Ok(mut f) = open_mapped(pid, &module) else {
                continue;
            };
            let shown = module.path.display().to_string();
            let key = key_of(&f, &shown)?;
            if size_hint.is_some_and(|s| s != key.size) {
                continue;
            }
            let sha256 = match self.get(&key) {
                Some(d) => d,
                None => {
                    let mut bytes = Vec::with_capacity(key.size as usize);
                    f.read_to_end(&mut bytes).map_err(io_err(&shown))?;
                    let d = stitch_elf::sha256(&bytes);
                    self.put(key, d);
                    d
                }
            };
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

/// True when the maps entry may be the data part of a Stitch region: the read-write first
/// `TRAMPOLINE_START` bytes, named `[anon:stitch]` (or unnamed where the kernel cannot name
/// mappings). The caller confirms by reading the magic.
pub(crate) fn maybe_region(e: &maps::MapEntry) -> bool {
    let size_ok = e.end - e.start == crate::region::TRAMPOLINE_START;
    let anon = match &e.path {
        MapPath::Special(s) => s == &format!("[anon:{}]", crate::region::ANON_NAME),
        MapPath::Anonymous => true,
        MapPath::File { .. } => false,
    };
    anon && size_ok && e.read && e.write && !e.exec && !e.shared
}

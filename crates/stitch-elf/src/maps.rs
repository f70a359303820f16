//! `/proc/PID/maps` parsing, grouping into modules, and load-bias computation.
//!
//! Line format (fs/proc/task_mmu.c): `start-end perms offset major:minor inode`,
//! one space each, then, if the mapping has a name, space padding and the name
//! up to the newline. The kernel escapes only `\n` in names (as `\012`), so a
//! path may contain spaces and arbitrary non-UTF-8 bytes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;

use crate::{ElfError, ElfFile, ElfKind, LoadSegment};

/// x86_64 base page size: the granularity at which the kernel and ld.so map
/// segments (regardless of a segment's larger `p_align`).
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapsError {
    #[error("maps line {line}: {reason}: {text:?}")]
    MalformedLine {
        /// 1-based.
        line: usize,
        reason: &'static str,
        /// The offending line, lossily decoded and cut to a sane length for logs.
        text: String,
    },
}

impl MapsError {
    /// Stable machine-readable code; never changes once published.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedLine { .. } => "maps.malformed_line",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (MAP_SHARED) rather than `p` (private, copy-on-write).
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub path: MapPath,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapPath {
    /// No name: anonymous memory (e.g. .bss beyond the file, malloc arenas).
    Anonymous,
    /// A file mapping. `path` is what the kernel printed, minus the
    /// `" (deleted)"` suffix; if `deleted`, it may now name a different file (or
    /// none), so open the mapping via `/proc/PID/map_files/` instead.
    File { path: PathBuf, deleted: bool },
    /// Any other name: `[heap]`, `[stack]`, `[vdso]`, `[vvar]`, `[vsyscall]`,
    /// `[anon:name]`, `[anon_shmem:name]`, `anon_inode:...`. Lossily decoded.
    Special(String),
}

impl MapEntry {
    /// This mapping's file name in `/proc/PID/map_files/` (kernel `"%lx-%lx"`:
    /// lowercase hex, no padding).
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Parses a whole `/proc/PID/maps` file. Fails on the first malformed line
/// rather than skipping it: a half-understood address space is not safe to patch.
pub fn parse(bytes: &[u8]) -> Result<Vec<MapEntry>, MapsError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| MapsError::MalformedLine {
                line: i + 1,
                reason,
                text: String::from_utf8_lossy(&line[..line.len().min(256)]).into_owned(),
            })
        })
        .collect()
}

fn parse_line(line: &[u8]) -> Result<MapEntry, &'static str> {
    let mut rest = line;
    let range = next_field(&mut rest).ok_or("empty line")?;
    let perms = next_field(&mut rest).ok_or("missing permissions")?;
    let offset = next_field(&mut rest).ok_or("missing offset")?;
    let dev = next_field(&mut rest).ok_or("missing device")?;
    let inode = next_field(&mut rest).ok_or("missing inode")?;

    let (start, end) = split_once(range, b'-').ok_or("bad address range")?;
    let start = parse_hex(start).ok_or("bad start address")?;
    let end = parse_hex(end).ok_or("bad end address")?;
    if start >= end {
        return Err("start address not below end address");
    }
    let (read, write, exec, shared) = match *perms {
        [
            r @ (b'r' | b'-'),
            w @ (b'w' | b'-'),
            x @ (b'x' | b'-'),
            s @ (b's' | b'p'),
        ] => (r == b'r', w == b'w', x == b'x', s == b's'),
        _ => return Err("bad permissions"),
    };
    let offset = parse_hex(offset).ok_or("bad offset")?;
    let (major, minor) = split_once(dev, b':').ok_or("bad device")?;
    let dev_major = parse_hex(major)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or("bad device major")?;
    let dev_minor = parse_hex(minor)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or("bad device minor")?;
    let inode = parse_dec(inode).ok_or("bad inode")?;

    // Whatever follows the padding is the name, verbatim to the end of line:
    // trailing spaces are part of a file name, not formatting.
    let name_start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let path = classify(&rest[name_start..]);
    Ok(MapEntry {
        start,
        end,
        read,
        write,
        exec,
        shared,
        offset,
        dev_major,
        dev_minor,
        inode,
        path,
    })
}

/// Takes the next single-space-separated field (the last field may end the line).
fn next_field<'l>(rest: &mut &'l [u8]) -> Option<&'l [u8]> {
    if rest.is_empty() {
        return None;
    }
    let (field, tail) = split_once(rest, b' ').unwrap_or((rest, &[]));
    *rest = tail;
    Some(field)
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = s.iter().position(|&b| b == sep)?;
    Some((&s[..at], &s[at + 1..]))
}

/// Strict hex: unlike `from_str_radix`, rejects empty input and a leading `+`.
fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(16)?;
        acc.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn classify(name: &[u8]) -> MapPath {
    match name.first() {
        None => MapPath::Anonymous,
        // Only real paths are absolute; everything else the kernel prints
        // (`[heap]`, `anon_inode:...`) is a label.
        Some(b'/') => {
            let (path, deleted) = match name.strip_suffix(b" (deleted)") {
                Some(path) => (path, true),
                None => (name, false),
            };
            MapPath::File {
                path: PathBuf::from(OsString::from_vec(unescape_newlines(path))),
                deleted,
            }
        }
        Some(_) => MapPath::Special(String::from_utf8_lossy(name).into_owned()),
    }
}

/// Undoes the kernel's `\n` -> `\012` escaping. The kernel does not escape
/// backslashes, so a name literally containing `\012` is indistinguishable and
/// also decodes to a newline; `/proc/PID/map_files/` is the unambiguous handle.
fn unescape_newlines(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(tail) = rest.strip_prefix(b"\\012") {
            out.push(b'\n');
            rest = tail;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// All mappings of one file, identified by (device, inode) rather than path:
/// a library replaced on disk keeps its old inode (and gains " (deleted)"), so
/// old and new copies stay distinct modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Path of the lowest-addressed mapping.
    pub path: PathBuf,
    /// Any mapping was marked " (deleted)".
    pub deleted: bool,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Sorted by address.
    pub mappings: Vec<MapEntry>,
}

/// Groups file-backed mappings into modules, ordered by lowest address. Every
/// mapped file becomes a module (data files too); callers pick the ELF ones.
pub fn modules(entries: &[MapEntry]) -> Vec<Module> {
    let mut sorted: Vec<&MapEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.start);
    let mut index: HashMap<(u32, u32, u64), usize> = HashMap::new();
    let mut out: Vec<Module> = Vec::new();
    for entry in sorted {
        let MapPath::File { path, deleted } = &entry.path else {
            continue;
        };
        let key = (entry.dev_major, entry.dev_minor, entry.inode);
        let i = *index.entry(key).or_insert_with(|| {
            out.push(Module {
                path: path.clone(),
                deleted: false,
                dev_major: entry.dev_major,
                dev_minor: entry.dev_minor,
                inode: entry.inode,
                mappings: Vec::new(),
            });
            out.len() - 1
        });
        out[i].deleted |= deleted;
        out[i].mappings.push(entry.clone());
    }
    out
}

impl Module {
    /// Runtime load bias: runtime address = `bias.wrapping_add(vaddr)` (wrapping,
    /// because a prelinked library loaded below its link address has a "negative"
    /// bias). 0 for `ET_EXEC`.
    ///
    /// Anchored on the private mapping with the lowest file offset (where the
    /// loader put the segment holding the ELF header) and the PT_LOAD containing
    /// that offset. Several mappings can tie: symbolizers (Rust's backtrace,
    /// debuggers) mmap the file read-only at offset 0 too. So each tie is tried,
    /// and the bias explaining the most mappings wins, lowest address first.
    ///
    /// Consistency required, else [`ElfError::BiasInconsistent`]: the bias is
    /// page-aligned, 0 for `ET_EXEC`, and explains *every* executable private
    /// mapping (those are what gets patched; an unexplained one means the ELF is
    /// not the mapped file or the layout moved). Non-executable strays are
    /// tolerated, as are `---p` (ld.so fills gaps between segments with PROT_NONE
    /// views of the file at meaningless offsets) and shared mappings (never made
    /// by the loader). This is no identity check: compare build-ids or hashes.
    pub fn load_bias(&self, elf: &ElfFile<'_>) -> Result<u64, ElfError> {
        let relevant: Vec<&MapEntry> = self
            .mappings
            .iter()
            .filter(|m| !m.shared && (m.read || m.write || m.exec))
            .collect();
        let lowest = relevant
            .iter()
            .map(|m| m.offset)
            .min()
            .ok_or(ElfError::ModuleEmpty)?;
        let explains = |bias: u64, m: &MapEntry| {
            elf.load_segments().iter().any(|s| {
                maps_offset(s, m.offset) && m.start == bias.wrapping_add(vaddr_of(s, m.offset))
            })
        };
        let mut best: Option<(usize, u64)> = None;
        let mut first_err = None;
        // `relevant` is in address order, and only a strictly better score
        // replaces `best`: ties go to the lowest address.
        for anchor in relevant.iter().filter(|m| m.offset == lowest) {
            // Two PT_LOADs can share a file page, so an offset may fit several.
            for seg in elf
                .load_segments()
                .iter()
                .filter(|s| maps_offset(s, anchor.offset))
            {
                let bias = anchor.start.wrapping_sub(vaddr_of(seg, anchor.offset));
                let inconsistent = |m: &MapEntry| ElfError::BiasInconsistent {
                    start: m.start,
                    offset: m.offset,
                    bias,
                };
                if bias % PAGE_SIZE != 0 || (elf.kind() == ElfKind::Executable && bias != 0) {
                    first_err.get_or_insert(inconsistent(anchor));
                } else if let Some(m) = relevant.iter().find(|m| m.exec && !explains(bias, m)) {
                    first_err.get_or_insert(inconsistent(m));
                } else {
                    let score = relevant.iter().filter(|m| explains(bias, m)).count();
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, bias));
                    }
                }
            }
        }
        match (best, first_err) {
            (Some((_, bias)), _) => Ok(bias),
            (None, Some(err)) => Err(err),
            (None, None) => Err(ElfError::OffsetNotLoaded {
                start: relevant
                    .iter()
                    .find(|m| m.offset == lowest)
                    .map_or(0, |m| m.start),
                offset: lowest,
            }),
        }
    }

    /// Runtime address of `[vaddr, vaddr+len)` if the ELF marks it executable and
    /// it is mapped executable right now, from the right file offset (so not a
    /// stale or foreign view). Spans several adjacent mappings if an mprotect
    /// split the segment. `None` otherwise, including when the bias is unknown.
    pub fn runtime_exec_addr(&self, elf: &ElfFile<'_>, vaddr: u64, len: u64) -> Option<u64> {
        if !elf.is_executable_range(vaddr, len) {
            return None;
        }
        let file_offset = elf.vaddr_to_offset(vaddr, len)?;
        let start = self.load_bias(elf).ok()?.wrapping_add(vaddr);
        let end = start.checked_add(len)?;
        let mut cursor = start;
        while cursor < end {
            let m = self.mappings.iter().find(|m| m.contains(cursor))?;
            let mapped_offset = m.offset.checked_add(cursor - m.start)?;
            if !m.exec || m.shared || mapped_offset != file_offset + (cursor - start) {
                return None;
            }
            cursor = m.end;
        }
        Some(start)
    }
}

/// Whether a mapping starting at file `offset` can belong to `seg`: the loader
/// maps from the page containing `p_offset` up to the end of the file content.
fn maps_offset(seg: &LoadSegment, offset: u64) -> bool {
    seg.filesz > 0 && offset >= seg.offset & !(PAGE_SIZE - 1) && offset < seg.offset + seg.filesz
}

/// ELF vaddr that file `offset` is loaded at within `seg` (may precede
/// `seg.vaddr` by the in-page offset). Wrapping: crafted files may put
/// `p_vaddr` below `p_offset`.
fn vaddr_of(seg: &LoadSegment, offset: u64) -> u64 {
    seg.vaddr.wrapping_sub(seg.offset).wrapping_add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt as _;

    fn one(line: &str) -> MapEntry {
        let mut v = parse(line.as_bytes()).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn file(path: &str, deleted: bool) -> MapPath {
        MapPath::File {
            path: PathBuf::from(path),
            deleted,
        }
    }

    #[test]
    fn typical_library_line_parses_all_fields() {
        let e = one(
            "7fcc5bb27000-7fcc5bc7d000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6\n",
        );
        assert_eq!(
            e,
            MapEntry {
                start: 0x7fcc5bb27000,
                end: 0x7fcc5bc7d000,
                read: true,
                write: false,
                exec: true,
                shared: false,
                offset: 0x26000,
                dev_major: 0xfe,
                dev_minor: 0,
                inode: 326279,
                path: file("/usr/lib/x86_64-linux-gnu/libc.so.6", false),
            }
        );
        assert_eq!(e.map_files_name(), "7fcc5bb27000-7fcc5bc7d000");
    }

    #[test]
    fn vdso_and_other_brackets_are_special() {
        for name in [
            "[vdso]",
            "[vvar]",
            "[heap]",
            "[stack]",
            "[vsyscall]",
            "[anon_shmem:x]",
        ] {
            let e = one(&format!(
                "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  {name}"
            ));
            assert_eq!(e.path, MapPath::Special(name.into()));
        }
    }

    #[test]
    fn anon_name_is_special() {
        let e = one("7f0000000000-7f0000001000 rw-p 00000000 00:00 0      [anon:stitch]");
        assert_eq!(e.path, MapPath::Special("[anon:stitch]".into()));
    }

    #[test]
    fn anonymous_with_and_without_trailing_space() {
        // The kernel prints a space after the inode even with no name; tools that
        // copy maps often strip it.
        for line in [
            "7f00-7f01 rw-p 00000000 00:00 0 ",
            "7f00-7f01 rw-p 00000000 00:00 0",
        ] {
            assert_eq!(one(line).path, MapPath::Anonymous);
        }
    }

    #[test]
    fn deleted_file_is_marked_deleted() {
        let e = one("55d0-55d1 r-xp 00001000 08:01 42     /opt/app/bin/server (deleted)");
        assert_eq!(e.path, file("/opt/app/bin/server", true));
        let e = one("55d0-55d1 rw-s 00000000 00:01 7      /memfd:jit (deleted)");
        assert_eq!(e.path, file("/memfd:jit", true));
        assert!(e.shared);
    }

    #[test]
    fn path_with_spaces_parses() {
        let e = one("1000-2000 r--p 00000000 08:01 9   /home/u/My Apps/lib foo.so");
        assert_eq!(e.path, file("/home/u/My Apps/lib foo.so", false));
        // Trailing spaces belong to the name.
        let e = one("1000-2000 r--p 00000000 08:01 9   /tmp/x  ");
        assert_eq!(e.path, file("/tmp/x  ", false));
    }

    #[test]
    fn non_utf8_path_is_preserved_bytewise() {
        let e = parse(b"1000-2000 r--p 00000000 08:01 9   /tmp/\xff\xfe.so\n")
            .unwrap()
            .remove(0);
        let MapPath::File { path, .. } = e.path else {
            panic!("not a file: {:?}", e.path)
        };
        assert_eq!(path.as_os_str().as_bytes(), b"/tmp/\xff\xfe.so");
    }

    #[test]
    fn escaped_newline_in_path_is_decoded() {
        let e = one("1000-2000 r--p 00000000 08:01 9   /tmp/a\\012b");
        assert_eq!(e.path, file("/tmp/a\nb", false));
    }

    #[test]
    fn wide_device_numbers_and_64bit_addresses_parse() {
        let e = one(
            "ffffffffff600000-ffffffffff601000 r--p 7fffffffffff0000 103:1a 18446744073709551615 /x",
        );
        assert_eq!((e.dev_major, e.dev_minor), (0x103, 0x1a));
        assert_eq!(e.inode, u64::MAX);
        assert_eq!(e.offset, 0x7fffffffffff0000);
        assert_eq!(e.map_files_name(), "ffffffffff600000-ffffffffff601000");
    }

    #[test]
    fn empty_input_is_no_entries() {
        assert_eq!(parse(b"").unwrap(), vec![]);
    }

    #[test]
    fn malformed_lines_are_rejected_with_line_number() {
        let good = "1000-2000 r--p 00000000 08:01 9 /a\n";
        for (bad, reason) in [
            ("", "empty line"),
            ("1000-2000", "missing permissions"),
            ("1000-2000 r--p 00000000 08:01", "missing inode"),
            ("10002000 r--p 00000000 08:01 9", "bad address range"),
            ("+1000-2000 r--p 00000000 08:01 9", "bad start address"),
            (
                "2000-1000 r--p 00000000 08:01 9",
                "start address not below end address",
            ),
            ("1000-2000 rwxq 00000000 08:01 9", "bad permissions"),
            ("1000-2000 r--p 0000zz00 08:01 9", "bad offset"),
            ("1000-2000 r--p 00000000 0801 9", "bad device"),
            ("1000-2000 r--p 00000000 123456789:01 9", "bad device major"),
            ("1000-2000 r--p 00000000 08:01 -9", "bad inode"),
            ("1000-2000  r--p 00000000 08:01 9", "bad permissions"),
            (
                "10000000000000000-20000000000000000 r--p 0 0:0 0",
                "bad start address",
            ),
        ] {
            let input = format!("{good}{bad}\n{good}");
            let err = parse(input.as_bytes()).unwrap_err();
            assert_eq!(err.code(), "maps.malformed_line");
            let MapsError::MalformedLine {
                line, reason: got, ..
            } = &err;
            assert_eq!((*line, *got), (2, reason), "input {bad:?}: {err}");
        }
    }

    fn map(start: u64, end: u64, perms: &str, offset: u64, inode: u64, path: &str) -> MapEntry {
        let mut e = one(&format!(
            "{start:x}-{end:x} {perms} {offset:08x} fe:00 {inode} {path}"
        ));
        e.path = file(path, false);
        e
    }

    #[test]
    fn modules_group_by_inode_not_path() {
        let entries = vec![
            map(0x3000, 0x4000, "r-xp", 0x1000, 7, "/lib/a.so"),
            map(0x1000, 0x2000, "r--p", 0, 7, "/lib/a.so"),
            map(0x5000, 0x6000, "r--p", 0, 8, "/lib/a.so"), // replaced on disk
            one("7000-8000 rw-p 00000000 00:00 0"),
        ];
        let mods = modules(&entries);
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].inode, 7);
        assert_eq!(
            mods[0].mappings.iter().map(|m| m.start).collect::<Vec<_>>(),
            [0x1000, 0x3000]
        );
        assert_eq!(mods[1].inode, 8);
    }
}

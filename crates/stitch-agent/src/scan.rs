//! Cheap facts about processes from `/proc`, for finding the ones to patch.

use std::collections::HashMap;

use stitch_elf::maps::{self, MapEntry, MapPath};

/// Every process id in /proc (threads are not listed there).
pub fn pids() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != me)
        .collect()
}

/// Start time of a process (clock ticks since boot; field 22 of `/proc/PID/stat`): with the
/// pid, identifies one process across pid reuse.
pub fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&text)
}

/// Field 22 of a stat line.
pub fn parse_start_time(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The executable path of a process (what the kernel shows).
pub fn exe(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| format!("[{}]", s.trim()))
                .unwrap_or_default()
        })
}

/// The parsed maps of a process (None: gone, kernel thread, or unreadable).
pub fn maps(pid: i32) -> Option<Vec<MapEntry>> {
    let bytes = std::fs::read(format!("/proc/{pid}/maps")).ok()?;
    if bytes.is_empty() {
        return None;
    }
    maps::parse(&bytes).ok()
}

/// Sizes of mapped files by (device, inode), filled lazily for one scan pass so every file
/// is `stat`ed once however many processes map it.
#[derive(Debug, Default)]
pub struct SizeCache {
    sizes: HashMap<(u32, u32, u64), Option<u64>>,
}

impl SizeCache {
    /// Sizes of the file-backed modules `pid` maps (each file once).
    pub fn module_sizes(&mut self, pid: i32, entries: &[MapEntry]) -> Vec<u64> {
        let mut out = Vec::new();
        for e in entries {
            if e.inode == 0 || !matches!(e.path, MapPath::File { .. }) {
                continue;
            }
            let key = (e.dev_major, e.dev_minor, e.inode);
            let size = *self.sizes.entry(key).or_insert_with(|| {
                std::fs::metadata(format!("/proc/{pid}/map_files/{}", e.map_files_name()))
                    .ok()
                    .or_else(|| match &e.path {
                        MapPath::File { path, .. } => {
                            let rel = path.strip_prefix("/").unwrap_or(path);
                            std::fs::metadata(
                                std::path::Path::new(&format!("/proc/{pid}/root")).join(rel),
                            )
                            .ok()
                        }
                        _ => None,
                    })
                    .map(|m| m.len())
            });
            if let Some(s) = size
                && !out.contains(&s)
            {
                out.push(s);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_comm() {
        let line =
            "42 (a) R 1 (b) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(parse_start_time(line), Some(123456));
        assert!(start_time(std::process::id() as i32).is_some());
        assert!(!pids().is_empty());
    }
}

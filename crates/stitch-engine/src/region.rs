//! The Stitch region: one anonymous mapping per patched module per process, holding a header
//! that says which patches the process carries (so a restarted agent or `stitch ps` can find
//! out without any file), the per-patch hit counters, and the trampolines.
//!
//! ```text
//! offset 0      header (128 bytes)                        RW
//!        128    patch records, appended                   RW
//!        8192   trampolines, bump-allocated               R-X
//!        65536  end
//! ```
//!
//! Pure layout code: encoding and decoding from bytes. All integers little-endian.

use crate::EngineError;

/// Size of one region.
pub const REGION_SIZE: u64 = 64 << 10;
/// Start of the trampoline area; everything before it is read-write data.
pub const TRAMPOLINE_START: u64 = 8 << 10;
/// Name given to the mapping with `PR_SET_VMA_ANON_NAME` (shows as `[anon:stitch]`).
pub const ANON_NAME: &str = "stitch";
/// First bytes of a region.
pub const MAGIC: [u8; 8] = *b"STITCHRG";
/// Layout version of the header and records.
pub const VERSION: u32 = 1;

const HEADER_LEN: usize = 128;
const RECORD_MAGIC: [u8; 4] = *b"PREC";
const RECORD_FIXED: usize = 120;
const SITE_LEN: usize = 88;
/// Longest patch id a record can hold.
pub const MAX_ID: usize = 47;

/// Offset of a record's hit counter from the record start (8-aligned for `lock inc`).
pub const HITS_OFFSET: u64 = 8;

/// Lifecycle of a patch in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Trampolines written, site jumps being written. Seen after a crash of the patcher: the
    /// sites tell whether the patch landed.
    Applying = 1,
    /// Every site jumps to its trampoline.
    Applied = 2,
    /// Original bytes restored; the trampoline stays until it is provably unused.
    Reverted = 3,
}

impl RecordState {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Applying),
            2 => Some(Self::Applied),
            3 => Some(Self::Reverted),
            _ => None,
        }
    }
    /// Lowercase name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applying => "applying",
            Self::Applied => "applied",
            Self::Reverted => "reverted",
        }
    }
}

/// One replaced site: where, and the bytes to put back on revert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecord {
    /// Runtime address.
    pub addr: u64,
    /// Runtime address of the trampoline the site jumps to.
    pub tramp: u64,
    /// Bytes that were there before.
    pub original: Vec<u8>,
}

/// One patch carried by the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchRecord {
    /// Offset of the record inside the region.
    pub offset: u64,
    pub state: RecordState,
    pub id: String,
    pub revision: u32,
    pub patch_digest: [u8; 32],
    /// Exploit attempts counted by `stitch_hit`.
    pub hits: u64,
    /// Trampoline range (region offsets).
    pub tramp_offset: u32,
    pub tramp_len: u32,
    pub sites: Vec<SiteRecord>,
}

impl PatchRecord {
    /// Encoded size of a record with `n_sites` sites.
    pub fn encoded_len(n_sites: usize) -> usize {
        RECORD_FIXED + n_sites * SITE_LEN
    }

    /// Encodes the record (its `offset` field is not stored).
    pub fn encode(&self) -> Vec<u8> {
        let len = Self::encoded_len(self.sites.len());
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.hits.to_le_bytes());
        b[16..20].copy_from_slice(&(self.state as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.revision.to_le_bytes());
        b[24..56].copy_from_slice(&self.patch_digest);
        let id = self.id.as_bytes();
        let n = id.len().min(MAX_ID);
        b[56] = n as u8;
        b[57..57 + n].copy_from_slice(&id[..n]);
        b[104..108].copy_from_slice(&self.tramp_offset.to_le_bytes());
        b[108..112].copy_from_slice(&self.tramp_len.to_le_bytes());
        b[112..116].copy_from_slice(&(self.sites.len() as u32).to_le_bytes());
        for (i, s) in self.sites.iter().enumerate() {
            let o = RECORD_FIXED + i * SITE_LEN;
            b[o..o + 8].copy_from_slice(&s.addr.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&s.tramp.to_le_bytes());
            b[o + 16] = s.original.len() as u8;
            b[o + 17..o + 17 + s.original.len()].copy_from_slice(&s.original);
        }
        b
    }
}

/// The decoded header of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionHeader {
    pub module_sha256: [u8; 32],
    pub module_bias: u64,
    /// Next free trampoline offset.
    pub tramp_next: u32,
    /// Next free record offset.
    pub records_next: u32,
    pub records: Vec<PatchRecord>,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl RegionHeader {
    /// A fresh header for a region serving the module with this identity.
    pub fn new(module_sha256: [u8; 32], module_bias: u64) -> Self {
        Self {
            module_sha256,
            module_bias,
            tramp_next: TRAMPOLINE_START as u32,
            records_next: HEADER_LEN as u32,
            records: Vec::new(),
        }
    }

    /// The fixed 128-byte header (records are written separately, at their offsets).
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(TRAMPOLINE_START as u32).to_le_bytes());
        b[16..24].copy_from_slice(&REGION_SIZE.to_le_bytes());
        b[24..56].copy_from_slice(&self.module_sha256);
        b[56..64].copy_from_slice(&self.module_bias.to_le_bytes());
        b[64..68].copy_from_slice(&self.tramp_next.to_le_bytes());
        b[68..72].copy_from_slice(&(self.records.len() as u32).to_le_bytes());
        b[72..76].copy_from_slice(&self.records_next.to_le_bytes());
        b
    }

    /// Whether `data` (the first bytes of a mapping) starts like a region.
    pub fn looks_like_region(data: &[u8]) -> bool {
        data.len() >= 12 && data[0..8] == MAGIC
    }

    /// Decodes the data part of a region (`TRAMPOLINE_START` bytes). Bounded: every offset is
    /// checked, so a corrupted or foreign mapping is an error, not a panic.
    pub fn decode(data: &[u8]) -> Result<Self, EngineError> {
        let bad = |reason: &str| EngineError::RegionCorrupt {
            reason: reason.to_string(),
        };
        if data.len() < TRAMPOLINE_START as usize {
            return Err(bad("short read"));
        }
        if data[0..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let version = u32_at(data, 8);
        if version != VERSION {
            return Err(EngineError::RegionVersion { found: version });
        }
        let mut module_sha256 = [0u8; 32];
        module_sha256.copy_from_slice(&data[24..56]);
        let module_bias = u64_at(data, 56);
        let tramp_next = u32_at(data, 64);
        let count = u32_at(data, 68) as usize;
        let records_next = u32_at(data, 72);
        if !(TRAMPOLINE_START..=REGION_SIZE).contains(&u64::from(tramp_next))
            || !(HEADER_LEN as u64..=TRAMPOLINE_START).contains(&u64::from(records_next))
        {
            return Err(bad("offsets out of range"));
        }
        let mut records = Vec::with_capacity(count.min(64));
        let mut o = HEADER_LEN;
        for _ in 0..count {
            if o + RECORD_FIXED > records_next as usize || data[o..o + 4] != RECORD_MAGIC {
                return Err(bad("record out of place"));
            }
            let len = u32_at(data, o + 4) as usize;
            let n_sites = u32_at(data, o + 112) as usize;
            if len != PatchRecord::encoded_len(n_sites) || o + len > records_next as usize {
                return Err(bad("record length"));
            }
            let state = RecordState::from_u32(u32_at(data, o + 16)).ok_or_else(|| bad("state"))?;
            let id_len = usize::from(data[o + 56]).min(MAX_ID);
            let id = String::from_utf8_lossy(&data[o + 57..o + 57 + id_len]).into_owned();
            let mut patch_digest = [0u8; 32];
            patch_digest.copy_from_slice(&data[o + 24..o + 56]);
            let mut sites = Vec::with_capacity(n_sites);
            for i in 0..n_sites {
                let s = o + RECORD_FIXED + i * SITE_LEN;
                let n = usize::from(data[s + 16]);
                if n > SITE_LEN - 17 {
                    return Err(bad("site length"));
                }
                sites.push(SiteRecord {
                    addr: u64_at(data, s),
                    tramp: u64_at(data, s + 8),
                    original: data[s + 17..s + 17 + n].to_vec(),
                });
            }
            records.push(PatchRecord {
                offset: o as u64,
                state,
                id,
                revision: u32_at(data, o + 20),
                patch_digest,
                hits: u64_at(data, o + 8),
                tramp_offset: u32_at(data, o + 104),
                tramp_len: u32_at(data, o + 108),
                sites,
            });
            o += len;
        }
        Ok(Self {
            module_sha256,
            module_bias,
            tramp_next,
            records_next,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: RecordState) -> PatchRecord {
        PatchRecord {
            offset: 0,
            state,
            id: "ST-2026-0001".into(),
            revision: 2,
            patch_digest: [9; 32],
            hits: 41,
            tramp_offset: 8192,
            tramp_len: 100,
            sites: vec![SiteRecord {
                addr: 0x5555_0000_1139,
                tramp: 0x5554_ffff_2000,
                original: vec![0x55, 0x48, 0x89, 0xe5, 0x90],
            }],
        }
    }

    #[test]
    fn header_and_records_round_trip() {
        let mut h = RegionHeader::new([7; 32], 0x5555_0000_0000);
        let mut data = vec![0u8; TRAMPOLINE_START as usize];
        for st in [RecordState::Applied, RecordState::Reverted] {
            let mut r = record(st);
            r.offset = u64::from(h.records_next);
            let enc = r.encode();
            data[h.records_next as usize..h.records_next as usize + enc.len()]
                .copy_from_slice(&enc);
            h.records_next += enc.len() as u32;
            h.records.push(r);
        }
        data[..HEADER_LEN].copy_from_slice(&h.encode_fixed());
        assert_eq!(RegionHeader::decode(&data).unwrap(), h);
    }

    #[test]
    fn corrupt_region_is_an_error_not_a_panic() {
        let h = RegionHeader::new([7; 32], 0);
        let mut data = vec![0u8; TRAMPOLINE_START as usize];
        data[..HEADER_LEN].copy_from_slice(&h.encode_fixed());
        data[68] = 200; // claims 200 records that are not there
        assert_eq!(
            RegionHeader::decode(&data).unwrap_err().code(),
            "engine.region_corrupt"
        );
        assert!(RegionHeader::decode(&data[..100]).is_err());
    }
}

//! Canonical binary encoding of bundles (layout: `docs/bundle-format.md`).
//!
//! Fixed field order, little-endian integers, `u32` length prefixes, one-byte enum tags.
//! There are no maps, floats or optional padding, so each value has exactly one encoding;
//! the decoder additionally rejects unknown tags, booleans other than 0/1, non-UTF-8 text and
//! trailing bytes. Every length is checked against [`crate::limits`] *before* allocation.

use crate::error::FormatError;
use crate::keys::KeyId;
use crate::limits::*;
use crate::model::*;
use crate::{Bundle, Signature};

/// First eight bytes of every bundle.
pub const BUNDLE_MAGIC: [u8; 8] = *b"STITCHB\0";
/// The bundle format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;
/// Prefix of the message every signature covers, so a bundle signature can never be
/// confused with a signature over anything else made with the same key.
pub const SIGNATURE_DOMAIN: &[u8] = b"stitch-bundle-signature\0";

/// magic + version + body length.
const HEADER_LEN: usize = 8 + 2 + 4;
const SIGNATURE_LEN: usize = 8 + 64;

pub(crate) fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 2 + body.len());
    m.extend_from_slice(SIGNATURE_DOMAIN);
    m.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    m.extend_from_slice(body);
    m
}

pub(crate) fn encode_bundle(b: &Bundle) -> Vec<u8> {
    let body = encode_patch(&b.patch);
    let mut out =
        Vec::with_capacity(HEADER_LEN + body.len() + 1 + SIGNATURE_LEN * b.signatures.len());
    out.extend_from_slice(&BUNDLE_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.push(b.signatures.len() as u8);
    for s in &b.signatures {
        out.extend_from_slice(&s.key_id.0);
        out.extend_from_slice(&s.signature);
    }
    out
}

pub(crate) fn decode_bundle(bytes: &[u8]) -> Result<Bundle, FormatError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(FormatError::Oversize {
            limit: MAX_BUNDLE_BYTES as u64,
            found: bytes.len() as u64,
        });
    }
    let mut r = Reader { buf: bytes, pos: 0 };
    let magic = r.take(8, "magic")?;
    if magic != BUNDLE_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = r.u16("version")?;
    if version != FORMAT_VERSION {
        return Err(FormatError::UnknownVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_len = r.u32("body_len")? as usize;
    let body = r.take(body_len, "body")?;
    let patch = decode_patch(body)?;

    let count = r.u8("signature_count")? as usize;
    if count > MAX_SIGNATURES {
        return Err(FormatError::LimitExceeded {
            field: "signatures",
            limit: MAX_SIGNATURES as u64,
            found: count as u64,
        });
    }
    let mut signatures: Vec<Signature> = Vec::with_capacity(count);
    for _ in 0..count {
        let key_id = KeyId(r.array::<8>("signature.key_id")?);
        let signature = r.array::<64>("signature.value")?;
        if signatures.iter().any(|s| s.key_id == key_id) {
            return Err(FormatError::DuplicateSignature { key_id });
        }
        signatures.push(Signature { key_id, signature });
    }
    r.finish()?;
    Ok(Bundle { patch, signatures })
}

pub(crate) fn encode_patch(p: &Patch) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256));
    w.str(&p.id);
    w.u32(p.revision);
    w.str(&p.title);
    w.str(&p.description);
    w.u32(p.cves.len() as u32);
    for c in &p.cves {
        w.str(c);
    }
    w.u8(p.severity as u8);
    w.u8(p.tier as u8);
    w.str(&p.author);

    let t = &p.target;
    w.str(&t.module);
    w.raw(&t.sha256);
    w.u64(t.size);
    match &t.build_id {
        None => w.u8(0),
        Some(id) => {
            w.u8(1);
            w.bytes(id);
        }
    }
    w.u8(t.arch as u8);
    w.u8(t.package.ecosystem as u8);
    w.str(&t.package.name);
    w.str(&t.package.version);

    w.u32(p.imports.len() as u32);
    for i in &p.imports {
        w.str(&i.name);
        w.str(&i.module);
        w.str(&i.symbol);
    }

    w.u32(p.patchlets.len() as u32);
    for pl in &p.patchlets {
        w.str(&pl.name);
        w.u64(pl.at);
        w.bytes(&pl.original);
        w.u8(pl.displaced as u8);
        w.u64(pl.resume);
        w.bytes(&pl.code);
        w.u32(pl.relocs.len() as u32);
        for r in &pl.relocs {
            w.u32(r.offset);
            w.u8(r.kind as u8);
            match r.target {
                RelocTarget::Module(a) => {
                    w.u8(0);
                    w.u64(a);
                }
                RelocTarget::Import(i) => {
                    w.u8(1);
                    w.u16(i);
                }
                RelocTarget::Continue => w.u8(2),
                RelocTarget::HitCounter => w.u8(3),
                RelocTarget::Code => w.u8(4),
            }
            w.u64(r.addend as u64);
        }
        w.str(&pl.source);
    }
    w.0
}

pub(crate) fn decode_patch(body: &[u8]) -> Result<Patch, FormatError> {
    let mut r = Reader { buf: body, pos: 0 };
    let id = r.str("id", MAX_SHORT_TEXT)?;
    let revision = r.u32("revision")?;
    let title = r.str("title", MAX_SHORT_TEXT)?;
    let description = r.str("description", MAX_LONG_TEXT)?;
    let n = r.count("cves", MAX_CVES)?;
    let mut cves = Vec::with_capacity(n);
    for _ in 0..n {
        cves.push(r.str("cves", MAX_SHORT_TEXT)?);
    }
    let severity = r.tag("severity", Severity::ALL)?;
    let tier = r.tag("tier", Tier::ALL)?;
    let author = r.str("author", MAX_SHORT_TEXT)?;

    let module = r.str("target.module", MAX_SHORT_TEXT)?;
    let sha256 = r.array::<32>("target.sha256")?;
    let size = r.u64("target.size")?;
    let build_id = match r.u8("target.build_id")? {
        0 => None,
        1 => Some(r.bytes("target.build_id", MAX_BUILD_ID)?),
        t => return Err(bad_tag("target.build_id", t)),
    };
    let arch = r.tag("target.arch", Arch::ALL)?;
    let ecosystem = r.tag("target.package.ecosystem", Ecosystem::ALL)?;
    let pkg_name = r.str("target.package.name", MAX_SHORT_TEXT)?;
    let pkg_version = r.str("target.package.version", MAX_SHORT_TEXT)?;

    let n = r.count("imports", MAX_IMPORTS)?;
    let mut imports = Vec::with_capacity(n);
    for _ in 0..n {
        imports.push(Import {
            name: r.str("imports.name", MAX_SHORT_TEXT)?,
            module: r.str("imports.module", MAX_SHORT_TEXT)?,
            symbol: r.str("imports.symbol", MAX_SHORT_TEXT)?,
        });
    }

    let n = r.count("patchlets", MAX_PATCHLETS)?;
    let mut patchlets = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str("patchlets.name", MAX_SHORT_TEXT)?;
        let at = r.u64("patchlets.at")?;
        let original = r.bytes("patchlets.original", MAX_ORIGINAL)?;
        let displaced = r.tag("patchlets.displaced", Displaced::ALL)?;
        let resume = r.u64("patchlets.resume")?;
        let code = r.bytes("patchlets.code", MAX_CODE)?;
        let nr = r.count("patchlets.relocs", MAX_RELOCS)?;
        let mut relocs = Vec::with_capacity(nr);
        for _ in 0..nr {
            let offset = r.u32("relocs.offset")?;
            let kind = r.tag(
                "relocs.kind",
                &[RelocKind::Pc32, RelocKind::Abs64, RelocKind::GotPc32],
            )?;
            let target = match r.u8("relocs.target")? {
                0 => RelocTarget::Module(r.u64("relocs.target")?),
                1 => RelocTarget::Import(r.u16("relocs.target")?),
                2 => RelocTarget::Continue,
                3 => RelocTarget::HitCounter,
                4 => RelocTarget::Code,
                t => return Err(bad_tag("relocs.target", t)),
            };
            let addend = r.u64("relocs.addend")? as i64;
            relocs.push(Reloc {
                offset,
                kind,
                target,
                addend,
            });
        }
        let source = r.str("patchlets.source", MAX_LONG_TEXT)?;
        patchlets.push(Patchlet {
            name,
            at,
            original,
            displaced,
            resume,
            code,
            relocs,
            source,
        });
    }
    r.finish()?;

    let patch = Patch {
        id,
        revision,
        title,
        description,
        cves,
        severity,
        tier,
        author,
        target: Target {
            module,
            sha256,
            size,
            build_id,
            arch,
            package: Package {
                ecosystem,
                name: pkg_name,
                version: pkg_version,
            },
        },
        imports,
        patchlets,
    };
    patch.validate()?;
    Ok(patch)
}

fn bad_tag(field: &'static str, tag: u8) -> FormatError {
    FormatError::Malformed {
        field,
        reason: format!("unknown tag {tag}"),
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(FormatError::Truncated {
                field,
                offset: self.pos as u64,
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// A `u32` count or length, checked against `max` before anything is allocated.
    fn count(&mut self, field: &'static str, max: usize) -> Result<usize, FormatError> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(FormatError::LimitExceeded {
                field,
                limit: max as u64,
                found: n as u64,
            });
        }
        Ok(n)
    }
    fn bytes(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, FormatError> {
        let n = self.count(field, max)?;
        Ok(self.take(n, field)?.to_vec())
    }
    fn str(&mut self, field: &'static str, max: usize) -> Result<String, FormatError> {
        String::from_utf8(self.bytes(field, max)?).map_err(|_| FormatError::Malformed {
            field,
            reason: "not UTF-8".into(),
        })
    }
    fn tag<T: Copy>(&mut self, field: &'static str, all: &[T]) -> Result<T, FormatError> {
        let t = self.u8(field)?;
        all.get(usize::from(t))
            .copied()
            .ok_or_else(|| bad_tag(field, t))
    }
    fn finish(&self) -> Result<(), FormatError> {
        if self.pos != self.buf.len() {
            return Err(FormatError::TrailingBytes {
                count: (self.buf.len() - self.pos) as u64,
            });
        }
        Ok(())
    }
}

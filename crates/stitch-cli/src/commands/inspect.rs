use std::path::Path;

use anyhow::Context as _;
use stitch_format::{Bundle, Displaced, Patch, Patchlet, Reloc, RelocKind, RelocTarget};

use super::read;

pub(crate) fn run(path: &Path, json: bool) -> anyhow::Result<()> {
    let bundle = Bundle::decode(&read(path)?)
        .with_context(|| format!("reading bundle {}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(&bundle))?);
    } else {
        print!("{}", to_text(&bundle));
    }
    Ok(())
}

fn describe_target(p: &Patch, t: RelocTarget) -> String {
    match t {
        RelocTarget::Module(0) => "module base".into(),
        RelocTarget::Module(a) => format!("module {a:#x}"),
        RelocTarget::Import(i) => p
            .imports
            .get(usize::from(i))
            .map_or(format!("import #{i}"), |imp| {
                format!("{}!{}", imp.module, imp.symbol)
            }),
        RelocTarget::Continue => "continue (fall-through to resume)".into(),
        RelocTarget::HitCounter => "hit counter".into(),
        RelocTarget::Code => "own code".into(),
    }
}

fn describe_reloc(p: &Patch, r: &Reloc) -> String {
    let kind = match r.kind {
        RelocKind::Pc32 => "pc32",
        RelocKind::Abs64 => "abs64",
        RelocKind::GotPc32 => "got-pc32",
    };
    let addend = if r.addend < 0 {
        format!("- {:#x}", r.addend.unsigned_abs())
    } else {
        format!("+ {:#x}", r.addend)
    };
    format!("{kind} -> {} {addend}", describe_target(p, r.target))
}

fn hex(b: &[u8]) -> String {
    stitch_build::hex_spaced(b)
}

fn displaced_note(d: Displaced) -> &'static str {
    match d {
        Displaced::Before => "run first, relocated, then the code",
        Displaced::After => "run after the code, relocated, on the fall-through path",
        Displaced::Drop => "never run: the code replaces them",
    }
}

fn to_text(b: &Bundle) -> String {
    use std::fmt::Write as _;
    let p = &b.patch;
    let t = &p.target;
    let mut s = String::new();
    let _ = writeln!(s, "{} r{}  {}", p.id, p.revision, p.title);
    let _ = writeln!(
        s,
        "  severity {} · tier {} · {}",
        p.severity,
        p.tier,
        if p.cves.is_empty() {
            "no CVE".into()
        } else {
            p.cves.join(", ")
        }
    );
    let _ = writeln!(s, "  author   {}", p.author);
    let _ = writeln!(
        s,
        "  target   {} ({} {} {}, {})",
        t.module, t.package.ecosystem, t.package.name, t.package.version, t.arch
    );
    let _ = writeln!(
        s,
        "           sha256   {} ({} bytes)",
        hex::encode(t.sha256),
        t.size
    );
    let _ = writeln!(
        s,
        "           build-id {}",
        t.build_id.as_ref().map_or("(none)".into(), hex::encode)
    );
    let _ = writeln!(
        s,
        "  signatures: {} (unverified here; run `stitch verify`)",
        if b.signatures.is_empty() {
            "none".to_string()
        } else {
            b.signatures
                .iter()
                .map(|s| s.key_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(s, "  patch digest    {}", hex::encode(b.patch_digest()));
    let _ = writeln!(s, "  content address {}", hex::encode(b.content_address()));
    if !p.description.is_empty() {
        let _ = writeln!(s, "\n  {}", p.description.trim().replace('\n', "\n  "));
    }
    if !p.imports.is_empty() {
        let _ = writeln!(s, "\nimports:");
        for i in &p.imports {
            let _ = writeln!(s, "  {} = {}!{}", i.name, i.module, i.symbol);
        }
    }
    for pl in &p.patchlets {
        write_patchlet(&mut s, p, pl);
    }
    s
}

fn write_patchlet(s: &mut String, p: &Patch, pl: &Patchlet) {
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "\npatchlet {:?} at {:#x}: replaces {} bytes with a jump; resume at {:#x}",
        pl.name,
        pl.at,
        pl.original.len(),
        pl.resume
    );
    let _ = writeln!(
        s,
        "  displaced instructions ({}):",
        displaced_note(pl.displaced)
    );
    for l in stitch_x86::disassemble(&pl.original, pl.at) {
        let _ = writeln!(s, "    {:#8x}  {:<24} {}", l.addr, hex(&l.bytes), l.text);
    }
    let _ = writeln!(
        s,
        "  code ({} bytes; targets of relocated fields are shown after ';'):",
        pl.code.len()
    );
    for l in stitch_x86::disassemble(&pl.code, 0) {
        let end = l.addr + l.bytes.len() as u64;
        let notes: Vec<String> = pl
            .relocs
            .iter()
            .filter(|r| u64::from(r.offset) >= l.addr && u64::from(r.offset) < end)
            .map(|r| describe_reloc(p, r))
            .collect();
        let text = if notes.is_empty() {
            l.text
        } else {
            format!("{:<32} ; {}", l.text, notes.join("; "))
        };
        let _ = writeln!(s, "    +{:<#7x} {:<24} {}", l.addr, hex(&l.bytes), text);
    }
}

fn to_json(b: &Bundle) -> serde_json::Value {
    let p = &b.patch;
    let t = &p.target;
    serde_json::json!({
        "format_version": stitch_format::FORMAT_VERSION,
        "id": p.id,
        "revision": p.revision,
        "title": p.title,
        "description": p.description,
        "cves": p.cves,
        "severity": p.severity.as_str(),
        "tier": p.tier.as_str(),
        "author": p.author,
        "target": {
            "module": t.module,
            "sha256": hex::encode(t.sha256),
            "size": t.size,
            "build_id": t.build_id.as_ref().map(hex::encode),
            "arch": t.arch.as_str(),
            "package": {
                "ecosystem": t.package.ecosystem.as_str(),
                "name": t.package.name,
                "version": t.package.version,
            },
        },
        "imports": p.imports.iter().map(|i| serde_json::json!({
            "name": i.name, "module": i.module, "symbol": i.symbol,
        })).collect::<Vec<_>>(),
        "signatures": b.signatures.iter().map(|s| s.key_id.to_string()).collect::<Vec<_>>(),
        "patch_digest": hex::encode(b.patch_digest()),
        "content_address": hex::encode(b.content_address()),
        "patchlets": p.patchlets.iter().map(|pl| serde_json::json!({
            "name": pl.name,
            "at": pl.at,
            "original": hex::encode(&pl.original),
            "original_disassembly": stitch_x86::disassemble(&pl.original, pl.at)
                .into_iter().map(|l| serde_json::json!({"addr": l.addr, "bytes": hex::encode(&l.bytes), "text": l.text}))
                .collect::<Vec<_>>(),
            "displaced": pl.displaced.as_str(),
            "resume": pl.resume,
            "code": hex::encode(&pl.code),
            "code_disassembly": stitch_x86::disassemble(&pl.code, 0)
                .into_iter().map(|l| serde_json::json!({"offset": l.addr, "bytes": hex::encode(&l.bytes), "text": l.text}))
                .collect::<Vec<_>>(),
            "relocations": pl.relocs.iter().map(|r| serde_json::json!({
                "offset": r.offset,
                "kind": match r.kind { RelocKind::Pc32 => "pc32", RelocKind::Abs64 => "abs64", RelocKind::GotPc32 => "got_pc32" },
                "target": describe_target(p, r.target),
                "addend": r.addend,
            })).collect::<Vec<_>>(),
            "source": pl.source,
        })).collect::<Vec<_>>(),
    })
}

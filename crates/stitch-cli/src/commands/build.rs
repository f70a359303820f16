use std::path::{Path, PathBuf};

use anyhow::Context as _;
use stitch_build::{Assembler, build_files};

pub(crate) fn run(patch: &Path, target: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let bundle = build_files(patch, target, &Assembler::default())
        .with_context(|| format!("building {} against {}", patch.display(), target.display()))?;
    let p = &bundle.patch;
    let out = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{}-r{}.stitch", p.id, p.revision)));
    super::write_atomic(&out, &bundle.encode(), 0o644)?;
    println!(
        "built {} r{} ({} patchlet{}) for {} sha256:{} -> {} (unsigned)",
        p.id,
        p.revision,
        p.patchlets.len(),
        if p.patchlets.len() == 1 { "" } else { "s" },
        p.target.module,
        hex::encode(p.target.sha256),
        out.display()
    );
    Ok(())
}

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::cli::Cli;

pub(crate) fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "stitch", &mut std::io::stdout());
    Ok(())
}

/// One page for `stitch` and one per subcommand (`stitch-build.1`, ...).
pub(crate) fn man(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![(String::from("stitch"), cmd.clone())];
    for sub in cmd.get_subcommands() {
        let name = format!("stitch-{}", sub.get_name());
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(leaked)));
    }
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        let path = out.join(format!("{name}.1"));
        super::write_atomic(&path, &buf, 0o644)?;
        println!("{}", path.display());
    }
    Ok(())
}

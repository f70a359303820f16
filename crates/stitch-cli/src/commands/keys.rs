use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand_core::{OsRng, RngCore as _};
use stitch_format::{Bundle, SecretKey};

use super::{CliError, read, write_atomic};

fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

pub(crate) fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    let public = pub_path(out);
    for p in [out, public.as_path()] {
        if p.exists() && !force {
            return Err(CliError::Exists(p.display().to_string()).into());
        }
    }
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let key = SecretKey::from_seed(seed);
    write_atomic(out, format!("{}\n", key.to_line()).as_bytes(), 0o600)?;
    write_atomic(
        &public,
        format!("{}\n", key.public().to_line()).as_bytes(),
        0o644,
    )?;
    println!(
        "key id {}\nsecret key: {} (keep it offline)\npublic key: {}",
        key.public().key_id(),
        out.display(),
        public.display()
    );
    Ok(())
}

pub(crate) fn load_secret(path: &Path) -> anyhow::Result<SecretKey> {
    let text = String::from_utf8(read(path)?).context("key file is not text")?;
    SecretKey::from_line(&text).with_context(|| format!("reading key {}", path.display()))
}

pub(crate) fn sign(bundle_path: &Path, key: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let key = load_secret(key)?;
    let mut bundle = Bundle::decode(&read(bundle_path)?)
        .with_context(|| format!("reading bundle {}", bundle_path.display()))?;
    bundle.sign(&key)?;
    let out = output.unwrap_or(bundle_path);
    write_atomic(out, &bundle.encode(), 0o644)?;
    println!(
        "signed {} r{} with key {} ({} signature{}) -> {}",
        bundle.patch.id,
        bundle.patch.revision,
        stitch_format::Signer::key_id(&key),
        bundle.signatures.len(),
        if bundle.signatures.len() == 1 {
            ""
        } else {
            "s"
        },
        out.display()
    );
    Ok(())
}

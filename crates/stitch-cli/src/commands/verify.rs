use std::path::Path;

use anyhow::Context as _;
use stitch_format::{Bundle, TrustedKeys};

use super::read;

pub(crate) fn run(bundle: &Path, trusted_keys: &Path, json: bool) -> anyhow::Result<()> {
    let text = String::from_utf8(read(trusted_keys)?).context("trusted keys file is not text")?;
    let trusted = TrustedKeys::from_text(&text)
        .with_context(|| format!("reading trusted keys {}", trusted_keys.display()))?;
    let bytes = read(bundle)?;
    let result = Bundle::decode_verified(&bytes, &trusted);
    if json {
        let v = match &result {
            Ok(v) => serde_json::json!({
                "ok": true,
                "id": v.patch().id,
                "revision": v.patch().revision,
                "signed_by": v.signed_by().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                "content_address": hex::encode(v.bundle().content_address()),
            }),
            Err(e) => {
                serde_json::json!({ "ok": false, "code": e.code(), "message": e.to_string() })
            }
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        if let Err(e) = result {
            // The JSON already says why; the exit status still reports failure.
            return Err(anyhow::Error::new(e).context(format!("verifying {}", bundle.display())));
        }
        return Ok(());
    }
    let v = result.with_context(|| format!("verifying {}", bundle.display()))?;
    println!(
        "OK: {} r{} signed by {}",
        v.patch().id,
        v.patch().revision,
        v.signed_by()
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

//! `stitch publish`: upload a signed bundle to the server's catalog.

use std::path::Path;

use anyhow::Context as _;
use stitch_format::Bundle;

use super::{CliError, read};

/// Uploads `bundle`; returns the server's JSON answer.
pub(crate) fn upload(
    bundle: &[u8],
    server: &str,
    token: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}/api/v1/catalog/bundles", server.trim_end_matches('/'));
    let mut resp = super::http_agent_with_ca(std::time::Duration::from_secs(30), ca_file)?
        .post(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/octet-stream")
        .send(bundle)
        .map_err(|e| anyhow::Error::new(e).context(CliError::ServerUnreachable(url.clone())))?;
    let status = resp.status();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let body: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({}));
    if !status.is_success() {
        let code = body["error"]["code"].as_str().unwrap_or("?");
        let msg = body["error"]["message"].as_str().unwrap_or("");
        return Err(CliError::ServerRefused(status.as_u16(), code.into(), msg.into()).into());
    }
    Ok(body)
}

pub(crate) fn run(
    bundle: &Path,
    server: &str,
    token: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<()> {
    let bytes = read(bundle)?;
    // Refuse to upload something that is not even a bundle; the server checks signatures.
    let b = Bundle::decode(&bytes).with_context(|| format!("reading {}", bundle.display()))?;
    let answer = upload(&bytes, server, token, ca_file)?;
    let created = answer["created"].as_bool().unwrap_or(false);
    println!(
        "{} {} r{} ({}), content address {}",
        if created {
            "published"
        } else {
            "already published:"
        },
        b.patch.id,
        b.patch.revision,
        b.patch.title,
        hex::encode(b.content_address())
    );
    Ok(())
}

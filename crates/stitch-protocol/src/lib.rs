//! What the server, the agent and the CLI must agree on byte for byte. Pure: no I/O of its
//! own, no clock (the caller passes `now` and its connected streams).
//!
//! - The signed per-agent manifest (this module's root): the server signs it, the agent must
//!   verify it exactly like [`verify`] before trusting a byte of it.
//! - [`event`]: the agent's events (`POST /api/v1/agent/events`), recorded and sent by the
//!   agent, parsed strictly by the server.
//! - [`control`]: the agent's local control socket, between `stitchd` and `stitch agent`
//!   (no socket code here: one round trip over a stream the caller connected).
//!
//! ## Wire form (`docs/protocol.md` § Manifest)
//! ```json
//! { "format": "stitch-manifest-v1", "key_id": "<16 hex>",
//!   "payload": "<base64 of the payload JSON bytes>", "signature": "<128 hex>" }
//! ```
//! The signature is Ed25519 over `b"stitch-manifest-v1\0"` followed by the *exact* payload
//! bytes (base64-decoded). The agent verifies those bytes first and only then parses them as
//! JSON, so no JSON canonicalisation is involved: what was signed is what is parsed.
//! The payload carries `agent_id`, a per-agent `version` that only grows, `issued_at` and
//! `expires_at`: an agent rejects a manifest for another agent, one whose version is lower
//! than the last it accepted (rollback), and treats a feed whose last manifest expired as
//! frozen.

#![forbid(unsafe_code)]

pub mod control;
pub mod event;

pub use event::{Event, EventBatch, EventBody, EventError, EventsAccepted, MAX_EVENTS};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use stitch_format::{SecretKey, Signer};

/// Domain separator prefixed to the payload before signing; also the envelope's `format`.
pub const MANIFEST_DOMAIN: &str = "stitch-manifest-v1";

/// One patch an agent should hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub patch_id: String,
    pub revision: i64,
    /// SHA-256 (hex) of the bundle: download from `/api/v1/bundles/{content_address}`.
    pub content_address: String,
    /// False: hold the bundle but do not apply it (revert it if applied).
    pub enabled: bool,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub severity: String,
    #[serde(default)]
    pub module: String,
    #[serde(default)]
    pub target_sha256: String,
}

/// The signed payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPayload {
    pub agent_id: String,
    pub org_id: i64,
    /// Grows by one each time the entries change for this agent; never decreases.
    pub version: i64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; past this the agent must treat the feed as frozen.
    pub expires_at: i64,
    pub patches: Vec<ManifestEntry>,
}

/// The envelope sent to agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    pub format: String,
    pub key_id: String,
    pub payload: String,
    pub signature: String,
}

/// Signs `payload` with the server key.
pub fn sign(key: &SecretKey, payload: &ManifestPayload) -> SignedManifest {
    let bytes = serde_json::to_vec(payload).unwrap_or_default();
    let mut message = Vec::with_capacity(MANIFEST_DOMAIN.len() + 1 + bytes.len());
    message.extend_from_slice(MANIFEST_DOMAIN.as_bytes());
    message.push(0);
    message.extend_from_slice(&bytes);
    // SecretKey's signer cannot fail; an empty signature would be refused by every agent.
    let signature = key.sign(&message).map(hex::encode).unwrap_or_default();
    SignedManifest {
        format: MANIFEST_DOMAIN.to_string(),
        key_id: key.key_id().to_string(),
        payload: base64::engine::general_purpose::STANDARD.encode(&bytes),
        signature,
    }
}

/// Why a manifest was refused by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("unknown manifest format {0:?}")]
    Format(String),
    #[error("manifest is not encoded as documented: {0}")]
    Encoding(String),
    #[error("manifest signature does not verify with the pinned server key")]
    BadSignature,
    #[error("manifest is for agent {found}, not {expected}")]
    WrongAgent { expected: String, found: String },
    #[error("manifest version {found} is older than the last accepted {last}: rollback")]
    Rollback { last: i64, found: i64 },
    #[error("manifest expired at {expires_at} (now {now}): the feed is frozen")]
    Expired { expires_at: i64, now: i64 },
}

impl ManifestError {
    /// Stable machine-readable code (reported by the agent).
    pub fn code(&self) -> &'static str {
        match self {
            ManifestError::Format(_) => "manifest.format",
            ManifestError::Encoding(_) => "manifest.encoding",
            ManifestError::BadSignature => "manifest.bad_signature",
            ManifestError::WrongAgent { .. } => "manifest.wrong_agent",
            ManifestError::Rollback { .. } => "manifest.rollback",
            ManifestError::Expired { .. } => "manifest.expired",
        }
    }
}

/// Verification as an agent must do it (documented in `docs/protocol.md`): signature over the
/// exact payload bytes first, then agent id, rollback and expiry.
pub fn verify(
    m: &SignedManifest,
    server_key: &stitch_format::PublicKey,
    agent_id: &str,
    last_version: i64,
    now: i64,
) -> Result<ManifestPayload, ManifestError> {
    if m.format != MANIFEST_DOMAIN {
        return Err(ManifestError::Format(m.format.clone()));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&m.payload)
        .map_err(|e| ManifestError::Encoding(e.to_string()))?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&m.signature, &mut sig)
        .map_err(|e| ManifestError::Encoding(e.to_string()))?;
    let mut message = MANIFEST_DOMAIN.as_bytes().to_vec();
    message.push(0);
    message.extend_from_slice(&bytes);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&server_key.to_bytes())
        .map_err(|_| ManifestError::BadSignature)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    vk.verify_strict(&message, &sig)
        .map_err(|_| ManifestError::BadSignature)?;
    let payload: ManifestPayload =
        serde_json::from_slice(&bytes).map_err(|e| ManifestError::Encoding(e.to_string()))?;
    if payload.agent_id != agent_id {
        return Err(ManifestError::WrongAgent {
            expected: agent_id.to_string(),
            found: payload.agent_id,
        });
    }
    if payload.version < last_version {
        return Err(ManifestError::Rollback {
            last: last_version,
            found: payload.version,
        });
    }
    if payload.expires_at <= now {
        return Err(ManifestError::Expired {
            expires_at: payload.expires_at,
            now,
        });
    }
    Ok(payload)
}

use crate::keys::KeyId;

/// Why a bundle, key or patch was rejected. Every variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bundle is {found} bytes, more than the {limit}-byte limit")]
    Oversize { limit: u64, found: u64 },
    #[error("bundle is truncated: {field} runs past the end (at byte {offset})")]
    Truncated { field: &'static str, offset: u64 },
    #[error("not a Stitch bundle (bad magic bytes)")]
    BadMagic,
    #[error(
        "bundle format version {found} is not supported (this build reads version {supported})"
    )]
    UnknownVersion { found: u16, supported: u16 },
    #[error("{field}: {found} exceeds the limit of {limit}")]
    LimitExceeded {
        field: &'static str,
        limit: u64,
        found: u64,
    },
    #[error("malformed field {field}: {reason}")]
    Malformed { field: &'static str, reason: String },
    #[error("{count} unexpected bytes after the end of the bundle")]
    TrailingBytes { count: u64 },
    #[error("bundle carries no signature")]
    MissingSignature,
    #[error("no signature is by a trusted key (signed by {})", fmt_ids(key_ids))]
    UntrustedKey { key_ids: Vec<KeyId> },
    #[error(
        "signature by trusted key {key_id} does not verify: the bundle was altered or the signature is forged"
    )]
    BadSignature { key_id: KeyId },
    #[error("two signatures by key {key_id}")]
    DuplicateSignature { key_id: KeyId },
    #[error("malformed key: {reason}")]
    MalformedKey { reason: String },
    #[error("signing failed: {reason}")]
    SigningFailed { reason: String },
}

fn fmt_ids(ids: &[KeyId]) -> String {
    ids.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FormatError {
    /// Stable machine-readable code, reported by the agent and the server. Never reused.
    pub fn code(&self) -> &'static str {
        match self {
            FormatError::Oversize { .. } => "bundle.oversize",
            FormatError::Truncated { .. } => "bundle.truncated",
            FormatError::BadMagic => "bundle.bad_magic",
            FormatError::UnknownVersion { .. } => "bundle.unknown_version",
            FormatError::LimitExceeded { .. } => "bundle.limit_exceeded",
            FormatError::Malformed { .. } => "bundle.malformed",
            FormatError::TrailingBytes { .. } => "bundle.trailing_bytes",
            FormatError::MissingSignature => "bundle.missing_signature",
            FormatError::UntrustedKey { .. } => "bundle.untrusted_key",
            FormatError::BadSignature { .. } => "bundle.bad_signature",
            FormatError::DuplicateSignature { .. } => "bundle.duplicate_signature",
            FormatError::MalformedKey { .. } => "key.malformed",
            FormatError::SigningFailed { .. } => "key.signing_failed",
        }
    }
}

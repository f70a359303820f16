//! Ed25519 keys, key ids, and the text files they live in.
//!
//! Key files are one line of text so they can be pasted into a config:
//! `stitch-ed25519-secret-v1:<64 hex>` and `stitch-ed25519-public-v1:<64 hex>`, optionally
//! followed by a space and a comment. A trusted-keys file holds public-key lines; `#` starts
//! a comment line. Signing sits behind the [`Signer`] trait so an HSM or KMS signer can live in
//! its own crate without touching verification.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature as DalekSignature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::FormatError;

const SECRET_PREFIX: &str = "stitch-ed25519-secret-v1:";
const PUBLIC_PREFIX: &str = "stitch-ed25519-public-v1:";

/// First 8 bytes of SHA-256 over the 32-byte public key; printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Something that can sign a bundle's message. Implemented by [`SecretKey`]; an HSM or a
/// cloud KMS would implement it elsewhere.
pub trait Signer {
    /// Id of the public key that verifies this signer's signatures.
    fn key_id(&self) -> KeyId;
    /// Ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], FormatError>;
}

/// An Ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PublicKey {
    /// From the raw 32 bytes; rejects points that are not valid keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, FormatError> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_| FormatError::MalformedKey {
                reason: "not a valid Ed25519 public key".into(),
            })
    }
    /// Raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    /// This key's id.
    pub fn key_id(&self) -> KeyId {
        let d = Sha256::digest(self.0.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
    /// The one-line text form.
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", hex::encode(self.to_bytes()))
    }
    /// Parses the one-line text form (a trailing comment after a space is ignored).
    pub fn from_line(line: &str) -> Result<Self, FormatError> {
        let bytes = parse_line(line, PUBLIC_PREFIX)?;
        Self::from_bytes(&bytes)
    }
    /// Strict verification (rejects small-order keys and non-canonical signatures).
    pub(crate) fn verify(&self, message: &[u8], sig: &[u8; 64]) -> Result<(), ()> {
        let sig = DalekSignature::from_bytes(sig);
        self.0.verify_strict(message, &sig).map_err(|_| ())
    }
}

/// An Ed25519 signing key. Lives on the author's offline machine, never on a server.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.public().key_id())
    }
}

impl SecretKey {
    /// A new key from 32 bytes of secure randomness supplied by the caller.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&seed))
    }
    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
    /// The one-line text form. Handle with care: this is the secret.
    pub fn to_line(&self) -> String {
        format!("{SECRET_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }
    /// Parses the one-line text form.
    pub fn from_line(line: &str) -> Result<Self, FormatError> {
        Ok(Self::from_seed(parse_line(line, SECRET_PREFIX)?))
    }
}

impl Signer for SecretKey {
    fn key_id(&self) -> KeyId {
        self.public().key_id()
    }
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], FormatError> {
        Ok(self.0.sign(message).to_bytes())
    }
}

fn parse_line(line: &str, prefix: &str) -> Result<[u8; 32], FormatError> {
    let line = line.trim();
    let first = line.split_whitespace().next().unwrap_or("");
    let hex_part = first
        .strip_prefix(prefix)
        .ok_or_else(|| FormatError::MalformedKey {
            reason: format!("expected a line starting with {prefix:?}"),
        })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|e| FormatError::MalformedKey {
        reason: format!("key is not 64 hex digits: {e}"),
    })?;
    Ok(out)
}

/// The set of public keys whose signatures an agent or server accepts.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl TrustedKeys {
    /// An empty set (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a key.
    pub fn insert(&mut self, key: PublicKey) {
        self.keys.insert(key.key_id(), key);
    }
    /// Parses a trusted-keys file: one public-key line per key, `#` comments, blank lines.
    /// Any malformed line rejects the whole file (a typo must not silently drop a key).
    pub fn from_text(text: &str) -> Result<Self, FormatError> {
        let mut t = Self::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = PublicKey::from_line(line).map_err(|e| FormatError::MalformedKey {
                reason: format!("line {}: {e}", n + 1),
            })?;
            t.insert(key);
        }
        Ok(t)
    }
    /// The key with this id, if trusted.
    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }
    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// All trusted keys, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }
}

//! The Stitch patch model and its signed, canonical wire form (a *bundle*).
//!
//! This crate is pure: no I/O, no clock, no randomness except what a caller passes in.
//! Everything that travels between the author's machine, the server and the agent is a
//! [`Bundle`]: one [`Patch`] encoded canonically plus zero or more Ed25519 signatures.
//!
//! Invariants this crate keeps:
//! - **One value, one encoding.** [`Patch::encode`] is deterministic and [`Bundle::decode`]
//!   accepts exactly the bytes the encoder can produce (no trailing bytes, no alternative
//!   encodings of the same value), so a signature covers one unambiguous meaning.
//! - **Every read is bounded.** Every length and count is checked against [`limits`] before
//!   anything is allocated; truncated or oversize input is an error, never a panic.
//! - **Verification is explicit.** A decoded bundle is untrusted until
//!   [`Bundle::verify`] returns a [`VerifiedBundle`]; only that type exposes the patch to
//!   code that changes a process.
//! - **Errors are stable.** Every [`FormatError`] has a [`code`](FormatError::code) that the
//!   agent and server report; codes never change meaning.
//!
//! The byte layout is documented in `docs/bundle-format.md`.
#![forbid(unsafe_code)]

mod codec;
mod error;
mod keys;
pub mod limits;
mod model;

pub use codec::{BUNDLE_MAGIC, FORMAT_VERSION, SIGNATURE_DOMAIN};
pub use error::FormatError;
pub use keys::{KeyId, PublicKey, SecretKey, Signer, TrustedKeys};
pub use model::*;

use sha2::{Digest, Sha256};

/// One signature over a bundle's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Which key made it (see [`KeyId`]).
    pub key_id: KeyId,
    /// The Ed25519 signature over [`Bundle::signed_message`].
    pub signature: [u8; 64],
}

/// A patch plus the signatures over its canonical encoding. Untrusted until verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The patch this bundle carries.
    pub patch: Patch,
    /// Signatures over the canonical body; an author's `stitch build` output has none.
    pub signatures: Vec<Signature>,
}

/// A bundle whose signatures were checked against a set of trusted keys.
///
/// The only way to obtain one is [`Bundle::verify`]; code that patches processes takes this
/// type, so an unverified patch cannot reach a process by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle {
    bundle: Bundle,
    signed_by: Vec<KeyId>,
}

impl VerifiedBundle {
    /// The verified patch.
    pub fn patch(&self) -> &Patch {
        &self.bundle.patch
    }
    /// The trusted keys whose valid signatures this bundle carries.
    pub fn signed_by(&self) -> &[KeyId] {
        &self.signed_by
    }
    /// The underlying bundle (for re-encoding, storage).
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
    /// Gives the bundle back, dropping the proof of verification.
    pub fn into_bundle(self) -> Bundle {
        self.bundle
    }
}

impl Bundle {
    /// An unsigned bundle for `patch`, after checking the patch's fields.
    pub fn new(patch: Patch) -> Result<Self, FormatError> {
        patch.validate()?;
        Ok(Self {
            patch,
            signatures: Vec::new(),
        })
    }

    /// The bundle's bytes (the `.stitch` file).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_bundle(self)
    }

    /// Parses bundle bytes, checking layout, limits and field validity — not signatures.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        codec::decode_bundle(bytes)
    }

    /// Decodes and verifies in one step: the usual entry point for an agent or server.
    pub fn decode_verified(
        bytes: &[u8],
        trusted: &TrustedKeys,
    ) -> Result<VerifiedBundle, FormatError> {
        Self::decode(bytes)?.verify(trusted)
    }

    /// The exact bytes every signature covers: a domain separator, the format version and
    /// the canonical body.
    pub fn signed_message(&self) -> Vec<u8> {
        codec::signed_message(&self.patch.encode())
    }

    /// SHA-256 of the canonical patch body: identifies the patch content whatever
    /// signatures it carries.
    pub fn patch_digest(&self) -> [u8; 32] {
        Sha256::digest(self.patch.encode()).into()
    }

    /// SHA-256 of the whole encoded bundle: its content address for storage and download.
    pub fn content_address(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }

    /// Adds a signature made with `signer`. Signing twice with one key is refused.
    pub fn sign(&mut self, signer: &dyn Signer) -> Result<(), FormatError> {
        let key_id = signer.key_id();
        if self.signatures.iter().any(|s| s.key_id == key_id) {
            return Err(FormatError::DuplicateSignature { key_id });
        }
        if self.signatures.len() >= limits::MAX_SIGNATURES {
            return Err(FormatError::LimitExceeded {
                field: "signatures",
                limit: limits::MAX_SIGNATURES as u64,
                found: self.signatures.len() as u64 + 1,
            });
        }
        let signature = signer.sign(&self.signed_message())?;
        self.signatures.push(Signature { key_id, signature });
        Ok(())
    }

    /// Checks the signatures against `trusted`.
    ///
    /// Policy: at least one signature by a trusted key, and every signature by a trusted key
    /// must be valid (a bad signature from a key we trust means tampering, so one good
    /// signature beside it does not rescue the bundle). Signatures by keys we do not know
    /// are ignored; if they are all there is, the bundle is rejected as untrusted.
    pub fn verify(self, trusted: &TrustedKeys) -> Result<VerifiedBundle, FormatError> {
        if self.signatures.is_empty() {
            return Err(FormatError::MissingSignature);
        }
        let message = self.signed_message();
        let mut signed_by = Vec::new();
        for sig in &self.signatures {
            let Some(key) = trusted.get(&sig.key_id) else {
                continue;
            };
            key.verify(&message, &sig.signature)
                .map_err(|()| FormatError::BadSignature { key_id: sig.key_id })?;
            signed_by.push(sig.key_id);
        }
        if signed_by.is_empty() {
            return Err(FormatError::UntrustedKey {
                key_ids: self.signatures.iter().map(|s| s.key_id).collect(),
            });
        }
        Ok(VerifiedBundle {
            bundle: self,
            signed_by,
        })
    }
}

//! Per-agent manifests: which patches an agent should hold and which are enabled, decided by
//! a pure policy function, then signed with the server's Ed25519 key.
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

use sha2::{Digest, Sha256};
pub use stitch_protocol::{
    MANIFEST_DOMAIN, ManifestEntry, ManifestError, ManifestPayload, SignedManifest, sign, verify,
};

use crate::model::{Candidate, Group, Mode, Plan};

/// Decides the entries from the org's plan, the agent's group and the relevant patches.
///
/// - Free plan: only `free`-tier patches; no rings or approvals (one default group); a patch
///   may still be disabled.
/// - Paid plan: a patch reaches a group once its rollout ring is at least the group's ring;
///   in `approval` mode (the policy's, else the group's default) only once approved.
pub fn select(plan: Plan, group: &Group, candidates: &[Candidate]) -> Vec<ManifestEntry> {
    let mut out = Vec::new();
    for c in candidates {
        if plan == Plan::Free && c.tier != "free" {
            continue;
        }
        if plan == Plan::Paid {
            if group.ring > c.rollout_ring {
                continue;
            }
            let mode = c
                .policy_mode
                .as_deref()
                .and_then(Mode::from_name)
                .unwrap_or(group.default_mode);
            if mode == Mode::Approval && !c.approved {
                continue;
            }
        }
        out.push(ManifestEntry {
            patch_id: c.patch_id.clone(),
            revision: c.revision,
            content_address: c.content_address.clone(),
            enabled: c.policy_enabled.unwrap_or(true),
            title: c.title.clone(),
            severity: c.severity.clone(),
            module: c.module.clone(),
            target_sha256: c.target_sha256.clone(),
        });
    }
    out.sort_by(|a, b| a.patch_id.cmp(&b.patch_id));
    out
}

/// Hash of the entries: the manifest version moves exactly when this does.
pub fn entries_hash(entries: &[ManifestEntry]) -> String {
    let bytes = serde_json::to_vec(entries).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use stitch_format::SecretKey;

    fn cand(id: &str, tier: &str) -> Candidate {
        Candidate {
            patch_id: id.into(),
            revision: 1,
            content_address: "ab".into(),
            title: "t".into(),
            severity: "high".into(),
            tier: tier.into(),
            module: "m".into(),
            target_sha256: "00".into(),
            policy_enabled: None,
            policy_mode: None,
            approved: false,
            rollout_ring: 0,
        }
    }

    fn group(ring: i64, mode: Mode) -> Group {
        Group {
            id: 1,
            org_id: 1,
            name: "g".into(),
            ring,
            is_default: true,
            default_mode: mode,
        }
    }

    #[test]
    fn free_plan_gets_only_free_tier() {
        let c = [cand("ST-2026-0001", "free"), cand("ST-2026-0002", "pro")];
        let e = select(Plan::Free, &group(0, Mode::Automatic), &c);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].patch_id, "ST-2026-0001");
        assert_eq!(select(Plan::Paid, &group(0, Mode::Automatic), &c).len(), 2);
    }

    #[test]
    fn later_ring_waits_for_promotion_and_approval_mode_waits_for_approval() {
        let mut c = cand("ST-2026-0001", "pro");
        assert!(
            select(
                Plan::Paid,
                &group(1, Mode::Automatic),
                std::slice::from_ref(&c)
            )
            .is_empty()
        );
        c.rollout_ring = 1;
        assert_eq!(
            select(
                Plan::Paid,
                &group(1, Mode::Automatic),
                std::slice::from_ref(&c)
            )
            .len(),
            1
        );
        assert!(
            select(
                Plan::Paid,
                &group(1, Mode::Approval),
                std::slice::from_ref(&c)
            )
            .is_empty()
        );
        c.approved = true;
        assert_eq!(
            select(
                Plan::Paid,
                &group(1, Mode::Approval),
                std::slice::from_ref(&c)
            )
            .len(),
            1
        );
    }

    #[test]
    fn signed_manifest_verifies_and_tampering_rollback_expiry_are_refused() {
        let key = SecretKey::from_seed([7; 32]);
        let payload = ManifestPayload {
            agent_id: "a".into(),
            org_id: 1,
            version: 3,
            issued_at: 100,
            expires_at: 200,
            patches: vec![],
        };
        let m = sign(&key, &payload);
        assert_eq!(verify(&m, &key.public(), "a", 3, 150), Ok(payload.clone()));
        assert!(matches!(
            verify(&m, &key.public(), "a", 4, 150),
            Err(ManifestError::Rollback { .. })
        ));
        assert!(matches!(
            verify(&m, &key.public(), "a", 0, 200),
            Err(ManifestError::Expired { .. })
        ));
        assert!(matches!(
            verify(&m, &key.public(), "b", 0, 150),
            Err(ManifestError::WrongAgent { .. })
        ));
        let mut forged = payload;
        forged.version = 99;
        let mut t = m.clone();
        t.payload = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&forged).unwrap_or_default());
        assert_eq!(
            verify(&t, &key.public(), "a", 0, 150),
            Err(ManifestError::BadSignature)
        );
    }
}

//! Secrets and who is calling: token generation and hashing, password hashes, and the
//! extractors that turn an `Authorization` header into an agent or a management principal.
//!
//! Tokens are 32 random bytes in hex behind a type prefix (`stk_` API token, `ste_`
//! enrollment token, `sta_<agent id>_` agent credential). Only their SHA-256 is stored, so a
//! database leak does not leak working credentials; comparisons are constant-time.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;
use crate::model::{AgentAuth, Principal};

/// Prefix of API tokens.
pub const API_TOKEN_PREFIX: &str = "stk_";
/// Prefix of enrollment tokens.
pub const ENROLL_TOKEN_PREFIX: &str = "ste_";
/// Prefix of agent credentials.
pub const AGENT_CRED_PREFIX: &str = "sta_";

/// `n` random bytes from the OS, hex-encoded.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// 32 random bytes from the OS.
pub fn random_seed() -> [u8; 32] {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b
}

/// SHA-256 of a token, hex: what the database stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new token with `prefix`.
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(32))
}

/// A new agent id (16 random bytes, hex) and its credential.
pub fn new_agent_credential(agent_id: &str) -> String {
    format!("{AGENT_CRED_PREFIX}{agent_id}_{}", random_hex(32))
}

/// Argon2id hash (PHC string) of a password.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

/// Checks `password` against a PHC hash.
pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    match PasswordHash::new(phc) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Constant-time equality of two hex hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("auth.missing", "missing Authorization: Bearer header")
    })?;
    let value = value.to_str().map_err(|_| {
        ApiError::unauthorized("auth.malformed", "Authorization header is not text")
    })?;
    value.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
        ApiError::unauthorized("auth.malformed", "expected Authorization: Bearer <token>")
    })
}

/// Splits an agent credential into (agent id, whole credential).
pub fn parse_agent_credential(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(AGENT_CRED_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok_id = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let ok_secret = secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit());
    (ok_id && ok_secret).then_some(id)
}

/// An authenticated agent (from `Authorization: Bearer sta_<id>_<secret>`).
pub struct AgentCaller(pub AgentAuth);

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let id = parse_agent_credential(token).ok_or_else(|| {
            ApiError::unauthorized(
                "auth.malformed",
                "not an agent credential (sta_<id>_<secret>)",
            )
        })?;
        let agent = state.store.agent_auth(id).await?.ok_or_else(|| {
            ApiError::unauthorized("agent.unknown", "no agent with this id; enroll again")
        })?;
        if !hashes_equal(&agent.credential_hash, &token_hash(token)) {
            return Err(ApiError::unauthorized(
                "auth.invalid_credential",
                "agent credential is wrong or was replaced by a newer one",
            ));
        }
        if agent.revoked {
            return Err(ApiError::forbidden(
                "agent.revoked",
                "this agent was revoked by an administrator",
            ));
        }
        Ok(AgentCaller(agent))
    }
}

/// A management caller authenticated by an API token (`Authorization: Bearer stk_...`).
pub struct ApiCaller(pub Principal);

impl ApiCaller {
    /// Refuses read-only callers.
    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.0.role.can_write() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "auth.read_only",
                "this token's role (auditor) is read-only",
            ))
        }
    }
}

impl FromRequestParts<AppState> for ApiCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if !token.starts_with(API_TOKEN_PREFIX) {
            return Err(ApiError::unauthorized(
                "auth.malformed",
                "not an API token (stk_...)",
            ));
        }
        let p = state
            .store
            .api_token(&token_hash(token))
            .await?
            .ok_or_else(|| {
                ApiError::unauthorized("auth.invalid_token", "API token is unknown or revoked")
            })?;
        Ok(ApiCaller(p))
    }
}

/// Failed dashboard sign-ins per user name: after [`LoginThrottle::MAX_FAILURES`] failures
/// within [`LoginThrottle::WINDOW`] seconds, that name is refused for
/// [`LoginThrottle::LOCK`] seconds, whatever the password, before any password hash is
/// computed (so guessing costs the server no argon2 time either). Unknown names are counted
/// like known ones, so the answer tells nothing about which names exist. Kept in memory per
/// server process: a restart or another replica starts counting afresh, which bounds a
/// guesser to `MAX_FAILURES` per window per replica.
#[derive(Default)]
pub struct LoginThrottle {
    names: std::sync::Mutex<std::collections::HashMap<String, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    since: i64,
    locked_until: i64,
}

impl LoginThrottle {
    pub const MAX_FAILURES: u32 = 10;
    pub const WINDOW: i64 = 15 * 60;
    pub const LOCK: i64 = 5 * 60;
    /// Most names remembered; beyond it, stale entries are dropped first.
    const MAX_NAMES: usize = 100_000;

    fn key(username: &str) -> String {
        username.trim().to_lowercase()
    }

    /// Seconds until `username` may try again, if it is locked at `now`.
    pub fn locked(&self, username: &str, now: i64) -> Option<i64> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names
            .get(&Self::key(username))
            .filter(|f| f.locked_until > now)
            .map(|f| f.locked_until - now)
    }

    /// Counts a failed sign-in; locks the name when it reaches the limit within the window.
    pub fn failed(&self, username: &str, now: i64) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() >= Self::MAX_NAMES {
            names.retain(|_, f| f.since + Self::WINDOW > now || f.locked_until > now);
            if names.len() >= Self::MAX_NAMES {
                // Still full of live entries: forget the oldest half rather than grow.
                let mut since: Vec<i64> = names.values().map(|f| f.since).collect();
                since.sort_unstable();
                let cut = since[since.len() / 2];
                names.retain(|_, f| f.since > cut);
            }
        }
        let f = names.entry(Self::key(username)).or_insert(Failures {
            count: 0,
            since: now,
            locked_until: 0,
        });
        if now - f.since >= Self::WINDOW {
            *f = Failures {
                count: 0,
                since: now,
                locked_until: f.locked_until,
            };
        }
        f.count += 1;
        if f.count >= Self::MAX_FAILURES {
            f.locked_until = now + Self::LOCK;
            f.count = 0;
            f.since = now;
        }
    }

    /// A successful sign-in clears the name's failures.
    pub fn succeeded(&self, username: &str) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.remove(&Self::key(username));
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::LoginThrottle;

    #[test]
    fn guessing_past_the_limit_locks_the_name_for_a_while_then_lets_it_try_again() {
        let t = LoginThrottle::default();
        for i in 0..LoginThrottle::MAX_FAILURES - 1 {
            t.failed("Alice", 1000 + i64::from(i));
            assert_eq!(t.locked("alice", 1000 + i64::from(i)), None);
        }
        t.failed("alice ", 1100);
        assert_eq!(t.locked("ALICE", 1100), Some(LoginThrottle::LOCK));
        assert_eq!(t.locked("bob", 1100), None, "other names are not affected");
        assert_eq!(t.locked("alice", 1100 + LoginThrottle::LOCK), None);
    }

    #[test]
    fn slow_guessing_spread_over_windows_never_locks_and_success_resets() {
        let t = LoginThrottle::default();
        for i in 0..3 * LoginThrottle::MAX_FAILURES {
            let now = i64::from(i) * (LoginThrottle::WINDOW / 5);
            t.failed("carol", now);
            assert_eq!(t.locked("carol", now), None, "failure {i}");
        }
        for i in 0..LoginThrottle::MAX_FAILURES - 1 {
            t.failed("dave", i64::from(i));
        }
        t.succeeded("dave");
        t.failed("dave", 20);
        assert_eq!(t.locked("dave", 20), None);
    }
}

//! The server side of the agent: an HTTP client for the agent API (`/api/v1`), manifest
//! verification, and exponential backoff with jitter.
//!
//! Transport: `ureq` over rustls (built-in Mozilla roots, or the CA file from the config),
//! through an HTTP(S) CONNECT proxy from the config (with credentials) or from the standard
//! `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` variables. The transport is not trusted
//! for content: manifests are Ed25519-signed by the server key pinned at enrollment, bundles by
//! a vendor key the agent trusts, and both are checked before use.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use stitch_format::PublicKey;

use crate::config::Config;
use crate::error::{AgentError, Result};

pub use stitch_protocol::{
    MANIFEST_DOMAIN, ManifestEntry, ManifestError, ManifestPayload, SignedManifest,
};

/// Largest response accepted (bundles are at most a few MiB).
const MAX_BODY: u64 = 32 << 20;

/// Verifies the signature over the exact payload bytes, then the agent id, rollback and
/// expiry. Codes: `manifest.format`, `manifest.encoding`, `manifest.bad_signature`,
/// `manifest.wrong_agent`, `manifest.rollback`, `manifest.expired`.
pub fn verify_manifest(
    m: &SignedManifest,
    server_key: &PublicKey,
    agent_id: &str,
    last_version: i64,
    now: i64,
) -> Result<ManifestPayload> {
    stitch_protocol::verify(m, server_key, agent_id, last_version, now).map_err(|e| {
        AgentError::Manifest {
            code: e.code(),
            reason: e.to_string(),
        }
    })
}

/// Answer to enrollment.
#[derive(Debug, Clone, Deserialize)]
pub struct EnrollResponse {
    pub agent_id: String,
    pub credential: String,
    pub server_key: String,
    #[serde(default)]
    pub heartbeat_interval_s: u64,
    #[serde(default)]
    pub long_poll_timeout_s: u64,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, Deserialize)]
pub struct HeartbeatResponse {
    pub inventory_required: bool,
    pub next_heartbeat_s: u64,
}

/// The agent API client.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: ApiErrorInner,
}
#[derive(Deserialize)]
struct ApiErrorInner {
    code: String,
    message: String,
}

impl Client {
    /// A client for `base` (`https://host[:port]`) with the proxy and TLS settings of `cfg`.
    pub fn new(cfg: &Config, base: &str) -> Result<Client> {
        let config_err = |reason: String| AgentError::Config {
            path: crate::config::DEFAULT_CONFIG.into(),
            reason,
        };
        let mut b = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(format!("stitchd/{}", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(cfg.sync.request_timeout_s.max(1))));
        if let Some(url) = &cfg.proxy.url {
            let p = ureq::Proxy::new(url).map_err(|e| config_err(format!("proxy {url}: {e}")))?;
            let mut pb = ureq::Proxy::builder(p.protocol())
                .host(p.host())
                .port(p.port());
            let user = cfg.proxy.username.as_deref().or(p.username());
            let pass = cfg.proxy.password.as_deref().or(p.password());
            if let Some(u) = user {
                pb = pb.username(u);
            }
            if let Some(pw) = pass {
                pb = pb.password(pw);
            }
            if let Some(np) = &cfg.proxy.no_proxy {
                pb = pb.no_proxy(np);
            }
            let proxy = pb
                .build()
                .map_err(|e| config_err(format!("proxy {url}: {e}")))?;
            b = b.proxy(Some(proxy));
        }
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(AgentError::io("read", ca))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
                    certs.push(c);
                }
            }
            if certs.is_empty() {
                return Err(config_err(format!(
                    "ca_file {}: no PEM certificate in it",
                    ca.display()
                )));
            }
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                .build();
            b = b.tls_config(tls);
        }
        Ok(Client {
            agent: b.build().new_agent(),
            base: base.trim_end_matches('/').to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish(
        &self,
        url: &str,
        r: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Vec<u8>)> {
        let mut resp = r.map_err(|e| AgentError::Network {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| AgentError::Network {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        if status >= 400 {
            let (code, message) = match serde_json::from_slice::<ApiErrorBody>(&body) {
                Ok(b) => (b.error.code, b.error.message),
                Err(_) => (
                    "http".into(),
                    String::from_utf8_lossy(&body).chars().take(200).collect(),
                ),
            };
            return Err(AgentError::Server {
                url: url.to_string(),
                status,
                code,
                message,
            });
        }
        Ok((status, body))
    }

    fn post_json<T: Serialize>(&self, path: &str, cred: Option<&str>, body: &T) -> Result<Vec<u8>> {
        let url = self.url(path);
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let mut req = self
            .agent
            .post(&url)
            .header("content-type", "application/json");
        if let Some(c) = cred {
            req = req.header("authorization", format!("Bearer {c}"));
        }
        self.finish(&url, req.send(&bytes[..])).map(|(_, b)| b)
    }

    fn get(&self, path: &str, cred: &str, timeout: Option<Duration>) -> Result<(u16, Vec<u8>)> {
        let url = self.url(path);
        let mut req = self
            .agent
            .get(&url)
            .header("authorization", format!("Bearer {cred}"));
        if let Some(t) = timeout {
            req = req.config().timeout_global(Some(t)).build();
        }
        self.finish(&url, req.call())
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, path: &str, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| AgentError::Network {
            url: self.url(path),
            reason: format!("unexpected response: {e}"),
        })
    }

    /// `POST /api/v1/enroll`.
    pub fn enroll(&self, token: &str, hostname: &str) -> Result<EnrollResponse> {
        let path = "/api/v1/enroll";
        let body = self.post_json(
            path,
            None,
            &serde_json::json!({ "enrollment_token": token, "hostname": hostname }),
        )?;
        self.parse(path, &body)
    }

    /// `POST /api/v1/agent/heartbeat`.
    pub fn heartbeat(
        &self,
        cred: &str,
        hb: &crate::inventory::Heartbeat,
    ) -> Result<HeartbeatResponse> {
        let path = "/api/v1/agent/heartbeat";
        let body = self.post_json(path, Some(cred), hb)?;
        self.parse(path, &body)
    }

    /// `POST /api/v1/agent/events` (idempotent by event id).
    pub fn events(
        &self,
        cred: &str,
        events: &[stitch_protocol::Event],
    ) -> Result<stitch_protocol::EventsAccepted> {
        let path = "/api/v1/agent/events";
        let body = self.post_json(
            path,
            Some(cred),
            &stitch_protocol::EventBatch {
                events: events.to_vec(),
            },
        )?;
        self.parse(path, &body)
    }

    /// `GET /api/v1/agent/manifest`.
    pub fn manifest(&self, cred: &str) -> Result<SignedManifest> {
        let path = "/api/v1/agent/manifest";
        let (_, body) = self.get(path, cred, None)?;
        self.parse(path, &body)
    }

    /// `GET /api/v1/agent/manifest/poll`: `None` when nothing changed within `wait`.
    pub fn poll(&self, cred: &str, version: i64, wait: Duration) -> Result<Option<SignedManifest>> {
        let path = format!(
            "/api/v1/agent/manifest/poll?version={version}&timeout_s={}",
            wait.as_secs()
        );
        let (status, body) = self.get(&path, cred, Some(wait + Duration::from_secs(15)))?;
        if status == 204 {
            return Ok(None);
        }
        self.parse(&path, &body).map(Some)
    }

    /// `GET /api/v1/bundles/{content_address}` (the caller checks hash and signature).
    pub fn bundle(&self, cred: &str, ca: &str) -> Result<Vec<u8>> {
        if !crate::store::is_hex64(ca) {
            return Err(AgentError::ContentAddressMismatch {
                content_address: ca.into(),
                found: "not a content address".into(),
            });
        }
        let (_, body) = self.get(&format!("/api/v1/bundles/{ca}"), cred, None)?;
        Ok(body)
    }
}

/// Exponential backoff with full jitter: `next()` is a random delay in
/// `[d/2, d]` where `d` doubles from `initial` up to `max`; `reset()` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id()).rotate_left(32);
        Backoff {
            initial,
            max,
            current: initial,
            seed: seed | 1,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64*: jitter needs no cryptographic randomness.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        let r = self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        let span = (d - half).as_millis() as u64;
        half + Duration::from_millis(if span == 0 { 0 } else { r % (span + 1) })
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn manifest_signature_rollback_expiry_and_agent_are_checked() {
        // The envelope is built by hand from the documented wire form, not with the shared
        // signer: a cross-check that the protocol crate verifies what docs/protocol.md says.
        use base64::Engine as _;
        use stitch_format::{SecretKey, Signer as _};
        let key = SecretKey::from_seed([9; 32]);
        let payload = ManifestPayload {
            agent_id: "a".into(),
            org_id: 1,
            version: 3,
            issued_at: 100,
            expires_at: 200,
            patches: vec![],
        };
        let bytes = serde_json::to_vec(&payload).unwrap();
        let mut msg = MANIFEST_DOMAIN.as_bytes().to_vec();
        msg.push(0);
        msg.extend_from_slice(&bytes);
        let m = SignedManifest {
            format: MANIFEST_DOMAIN.into(),
            key_id: key.key_id().to_string(),
            payload: base64::engine::general_purpose::STANDARD.encode(&bytes),
            signature: hex::encode(key.sign(&msg).unwrap()),
        };
        let pk = key.public();
        assert_eq!(verify_manifest(&m, &pk, "a", 3, 150).unwrap(), payload);
        let code = |r: Result<ManifestPayload>| r.unwrap_err().code();
        assert_eq!(
            code(verify_manifest(&m, &pk, "a", 4, 150)),
            "manifest.rollback"
        );
        assert_eq!(
            code(verify_manifest(&m, &pk, "a", 0, 200)),
            "manifest.expired"
        );
        assert_eq!(
            code(verify_manifest(&m, &pk, "b", 0, 150)),
            "manifest.wrong_agent"
        );
        let other = SecretKey::from_seed([8; 32]).public();
        assert_eq!(
            code(verify_manifest(&m, &other, "a", 0, 150)),
            "manifest.bad_signature"
        );
        let mut t = m.clone();
        t.payload = base64::engine::general_purpose::STANDARD.encode(b"{}");
        assert_eq!(
            code(verify_manifest(&t, &pk, "a", 0, 150)),
            "manifest.bad_signature"
        );
    }
}

//! Events the agent reports: the server's `POST /api/v1/agent/events` kinds, plus a few that
//! stay local (shown by `stitch agent events`, never sent: the server refuses unknown kinds).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    AgentInstalled,
    AgentStarted,
    AgentStopped,
    AgentEnabled,
    AgentDisabled,
    AgentUninstalled,
    PatchInstalled {
        patch_id: String,
        revision: i64,
    },
    PatchApplied {
        patch_id: String,
        revision: i64,
        processes: i64,
    },
    PatchReverted {
        patch_id: String,
        revision: i64,
    },
    PatchFailed {
        patch_id: String,
        revision: i64,
        code: String,
        message: String,
    },
    ExploitBlocked {
        patch_id: String,
        pid: i64,
        exe: String,
        count: i64,
    },
    PatchedProcessCrashed {
        patch_id: String,
        pid: i64,
        exe: String,
        signal: i64,
    },
    /// Local only: something an operator on the host should see.
    Local {
        message: String,
    },
}

impl EventBody {
    /// Whether the server knows this kind.
    pub fn deliverable(&self) -> bool {
        !matches!(self, EventBody::Local { .. })
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            EventBody::AgentInstalled => "agent installed".into(),
            EventBody::AgentStarted => "agent started".into(),
            EventBody::AgentStopped => "agent stopped".into(),
            EventBody::AgentEnabled => "agent enabled".into(),
            EventBody::AgentDisabled => "agent disabled".into(),
            EventBody::AgentUninstalled => "agent uninstalled".into(),
            EventBody::PatchInstalled { patch_id, revision } => {
                format!("{patch_id} r{revision} installed")
            }
            EventBody::PatchApplied {
                patch_id,
                revision,
                processes,
            } => format!("{patch_id} r{revision} applied to {processes} process(es)"),
            EventBody::PatchReverted { patch_id, revision } => {
                format!("{patch_id} r{revision} reverted")
            }
            EventBody::PatchFailed {
                patch_id,
                revision,
                code,
                message,
            } => format!("{patch_id} r{revision} failed [{code}]: {message}"),
            EventBody::ExploitBlocked {
                patch_id,
                pid,
                exe,
                count,
            } => format!("{patch_id} blocked {count} exploit attempt(s) in {exe} (pid {pid})"),
            EventBody::PatchedProcessCrashed {
                patch_id,
                pid,
                exe,
                signal,
            } => format!("{exe} (pid {pid}) carrying {patch_id} died of signal {signal}"),
            EventBody::Local { message } => message.clone(),
        }
    }
}

/// An event with its idempotency id and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event; the server ignores an id it has seen (safe re-delivery).
    pub id: String,
    /// Unix seconds.
    pub occurred_at: i64,
    #[serde(flatten)]
    pub body: EventBody,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn boot_nonce() -> &'static str {
    static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NONCE.get_or_init(|| {
        use std::io::Read as _;
        let mut b = [0u8; 8];
        let ok = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .is_ok();
        if !ok {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            b = (t ^ u64::from(std::process::id())).to_le_bytes();
        }
        hex::encode(b)
    })
}

impl Event {
    /// A new event happening now, with a fresh id.
    pub fn now(body: EventBody) -> Event {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let occurred_at = crate::now_unix();
        Event {
            id: format!("{}-{occurred_at:x}-{seq}", boot_nonce()),
            occurred_at,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_flat_with_kind() {
        let e = Event::now(EventBody::PatchFailed {
            patch_id: "ST-1".into(),
            revision: 2,
            code: "engine.unexpected_bytes".into(),
            message: "m".into(),
        });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "patch_failed");
        assert_eq!(v["code"], "engine.unexpected_bytes");
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()));
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert_ne!(
            Event::now(EventBody::AgentStarted).id,
            Event::now(EventBody::AgentStarted).id
        );
    }
}

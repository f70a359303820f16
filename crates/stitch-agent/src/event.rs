//! The agent's event log: the server's event kinds ([`stitch_protocol::EventBody`], one
//! definition shared with the server), plus local notes that stay on the host (shown by
//! `stitch agent events`, never sent: the server refuses unknown kinds).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use stitch_protocol::EventBody;

/// A local note: `{"kind": "local", "message": ...}` in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LocalNote {
    Local { message: String },
}

/// What an entry of the log says: a server event or a local note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entry {
    Server(EventBody),
    Local(LocalNote),
}

impl Entry {
    /// A note for the local log only.
    pub fn local(message: impl Into<String>) -> Entry {
        Entry::Local(LocalNote::Local {
            message: message.into(),
        })
    }

    /// The server event, when this entry is one (and must be delivered).
    pub fn deliverable(&self) -> Option<&EventBody> {
        match self {
            Entry::Server(b) => Some(b),
            Entry::Local(_) => None,
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            Entry::Server(b) => b.describe(),
            Entry::Local(LocalNote::Local { message }) => message.clone(),
        }
    }
}

impl From<EventBody> for Entry {
    fn from(b: EventBody) -> Entry {
        Entry::Server(b)
    }
}

/// An entry with its idempotency id and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unique per event; the server ignores an id it has seen (safe re-delivery).
    pub id: String,
    /// Unix seconds.
    pub occurred_at: i64,
    #[serde(flatten)]
    pub body: Entry,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// 8 random bytes as hex (from `/dev/urandom`; time and pid if it cannot be read).
pub(crate) fn random_hex() -> String {
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
}

fn boot_nonce() -> &'static str {
    static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NONCE.get_or_init(random_hex)
}

impl Event {
    /// A new entry happening now, with a fresh id.
    pub fn now(body: impl Into<Entry>) -> Event {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let occurred_at = crate::now_unix();
        Event {
            id: format!("{}-{occurred_at:x}-{seq}", boot_nonce()),
            occurred_at,
            body: body.into(),
        }
    }

    /// The wire event to send, or None for a local note.
    pub fn wire(&self) -> Option<stitch_protocol::Event> {
        self.body.deliverable().map(|body| stitch_protocol::Event {
            id: self.id.clone(),
            occurred_at: self.occurred_at,
            body: body.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_keep_the_wire_form_and_local_notes_are_never_sent() {
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
        // What is logged is exactly what the server parses.
        assert_eq!(serde_json::to_value(e.wire().unwrap()).unwrap(), v);
        let back = stitch_protocol::Event::from_value(v).unwrap();
        assert_eq!(Entry::Server(back.body), e.body);
        // The store keeps bodies as JSON: both kinds read back.
        for entry in [
            Entry::local("store rebuilt"),
            EventBody::AgentInstalled {}.into(),
        ] {
            let s = serde_json::to_string(&entry).unwrap();
            assert_eq!(serde_json::from_str::<Entry>(&s).unwrap(), entry);
        }
        assert_eq!(
            serde_json::to_value(Entry::local("x")).unwrap(),
            serde_json::json!({"kind": "local", "message": "x"})
        );
        assert!(Event::now(Entry::local("x")).wire().is_none());
        assert_ne!(
            Event::now(EventBody::AgentStarted {}).id,
            Event::now(EventBody::AgentStarted {}).id
        );
    }
}

//! Agent events: the body of `POST /api/v1/agent/events` (`docs/protocol.md` § Events), shared
//! by the agent (which records and sends them) and the server (which accepts them).
//!
//! ## Wire form
//! ```json
//! { "events": [ { "id": "7d9f…", "occurred_at": 1790000000, "kind": "patch_applied",
//!                 "patch_id": "ST-2026-0001", "revision": 1, "processes": 3 } ] }
//! ```
//! One flat object per event: the envelope (`id`, `occurred_at`) and the kind's fields side by
//! side. Parsing is strict ([`Event::from_value`]): an unknown kind or an unknown field is
//! refused, so a typo never turns into a silently dropped field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most events in one batch (`400 request.invalid_field` above it).
pub const MAX_EVENTS: usize = 1_000;

/// What happened on the agent, by kind. The optional fields of the wire form default when
/// absent and are always sent by the agent. Kinds without fields are empty struct variants
/// (`AgentStarted {}`): serde ignores unknown fields next to a unit variant's tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventBody {
    /// Once per installation (first start of the agent with a fresh state directory).
    AgentInstalled {},
    AgentStarted {},
    AgentStopped {},
    AgentEnabled {},
    AgentDisabled {},
    /// The package is being removed (`stitchd uninstall`, from the package's `prerm`).
    AgentUninstalled {},
    PatchInstalled {
        patch_id: String,
        revision: i64,
    },
    PatchApplied {
        patch_id: String,
        revision: i64,
        #[serde(default)]
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
        #[serde(default)]
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
        #[serde(default)]
        pid: i64,
        #[serde(default)]
        exe: String,
        signal: i64,
    },
}

impl EventBody {
    /// The patch the event is about, if any.
    pub fn patch_id(&self) -> Option<&str> {
        match self {
            EventBody::PatchInstalled { patch_id, .. }
            | EventBody::PatchApplied { patch_id, .. }
            | EventBody::PatchReverted { patch_id, .. }
            | EventBody::PatchFailed { patch_id, .. }
            | EventBody::ExploitBlocked { patch_id, .. }
            | EventBody::PatchedProcessCrashed { patch_id, .. } => Some(patch_id),
            EventBody::AgentInstalled {}
            | EventBody::AgentStarted {}
            | EventBody::AgentStopped {}
            | EventBody::AgentEnabled {}
            | EventBody::AgentDisabled {}
            | EventBody::AgentUninstalled {} => None,
        }
    }

    /// The wire `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::AgentInstalled {} => "agent_installed",
            EventBody::AgentStarted {} => "agent_started",
            EventBody::AgentStopped {} => "agent_stopped",
            EventBody::AgentEnabled {} => "agent_enabled",
            EventBody::AgentDisabled {} => "agent_disabled",
            EventBody::AgentUninstalled {} => "agent_uninstalled",
            EventBody::PatchInstalled { .. } => "patch_installed",
            EventBody::PatchApplied { .. } => "patch_applied",
            EventBody::PatchReverted { .. } => "patch_reverted",
            EventBody::PatchFailed { .. } => "patch_failed",
            EventBody::ExploitBlocked { .. } => "exploit_blocked",
            EventBody::PatchedProcessCrashed { .. } => "patched_process_crashed",
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            EventBody::AgentInstalled {} => "agent installed".into(),
            EventBody::AgentStarted {} => "agent started".into(),
            EventBody::AgentStopped {} => "agent stopped".into(),
            EventBody::AgentEnabled {} => "agent enabled".into(),
            EventBody::AgentDisabled {} => "agent disabled".into(),
            EventBody::AgentUninstalled {} => "agent uninstalled".into(),
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
        }
    }
}

/// One event: its idempotency id, when, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unique per event and agent; the server stores each `(agent, id)` once (safe re-delivery).
    pub id: String,
    /// Unix seconds.
    pub occurred_at: i64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// Why an event was refused by [`Event::from_value`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("missing string field `id`")]
    MissingId,
    #[error("missing integer field `occurred_at` (unix seconds)")]
    MissingOccurredAt,
    #[error("{0}")]
    Body(String),
}

impl EventError {
    /// Stable machine-readable code (the server answers `400` with it).
    pub fn code(&self) -> &'static str {
        "events.invalid"
    }
}

impl Event {
    /// Strict parse of one wire event: the envelope fields are taken out first, then the rest
    /// must be exactly one [`EventBody`] (serde's `flatten` cannot deny unknown fields, so this
    /// is done by hand). [`Event`]'s `Deserialize` goes through here.
    pub fn from_value(raw: Value) -> Result<Event, EventError> {
        let Value::Object(mut o) = raw else {
            return Err(EventError::NotAnObject);
        };
        let id = match o.remove("id") {
            Some(Value::String(s)) => s,
            _ => return Err(EventError::MissingId),
        };
        let occurred_at = o
            .remove("occurred_at")
            .and_then(|v| v.as_i64())
            .ok_or(EventError::MissingOccurredAt)?;
        let body = serde_json::from_value(Value::Object(o))
            .map_err(|e| EventError::Body(e.to_string()))?;
        Ok(Event {
            id,
            occurred_at,
            body,
        })
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Event, D::Error> {
        Event::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The body of `POST /api/v1/agent/events`. The server reads it as `EventBatch<Value>` to
/// refuse events one by one with their index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBatch<E = Event> {
    pub events: Vec<E>,
}

/// `200 OK` to an event batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsAccepted {
    /// Events stored now.
    pub accepted: u64,
    /// Events whose id the server had already stored (re-delivery).
    pub duplicates: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_form_is_flat_with_kind_and_round_trips() {
        let e = Event {
            id: "e-1".into(),
            occurred_at: 5,
            body: EventBody::PatchFailed {
                patch_id: "ST-1".into(),
                revision: 2,
                code: "engine.unexpected_bytes".into(),
                message: "m".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            json!({"id": "e-1", "occurred_at": 5, "kind": "patch_failed", "patch_id": "ST-1",
                   "revision": 2, "code": "engine.unexpected_bytes", "message": "m"})
        );
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
        assert_eq!(e.body.kind(), "patch_failed");
        let unit = serde_json::to_value(Event {
            id: "e-2".into(),
            occurred_at: 6,
            body: EventBody::AgentInstalled {},
        })
        .unwrap();
        assert_eq!(
            unit,
            json!({"id": "e-2", "occurred_at": 6, "kind": "agent_installed"})
        );
    }

    #[test]
    fn unknown_kind_or_field_is_refused_and_optional_fields_default() {
        let parse = |v: Value| Event::from_value(v);
        assert!(matches!(
            parse(json!({"id": "a", "occurred_at": 1, "kind": "teleported"})),
            Err(EventError::Body(_))
        ));
        assert!(matches!(
            parse(json!({"id": "a", "occurred_at": 1, "kind": "agent_started", "extra": 1})),
            Err(EventError::Body(_))
        ));
        assert_eq!(
            parse(json!({"occurred_at": 1, "kind": "agent_started"})),
            Err(EventError::MissingId)
        );
        assert_eq!(
            parse(json!({"id": "a", "kind": "agent_started"})),
            Err(EventError::MissingOccurredAt)
        );
        assert_eq!(parse(json!([1])), Err(EventError::NotAnObject));
        let e = parse(
            json!({"id": "a", "occurred_at": 1, "kind": "patched_process_crashed",
                             "patch_id": "ST-1", "signal": 11}),
        )
        .unwrap();
        assert_eq!(
            e.body,
            EventBody::PatchedProcessCrashed {
                patch_id: "ST-1".into(),
                pid: 0,
                exe: String::new(),
                signal: 11
            }
        );
        assert_eq!(e.body.patch_id(), Some("ST-1"));
        // A batch with an unknown top-level field is refused as a whole.
        assert!(serde_json::from_value::<EventBatch>(json!({"events": [], "x": 1})).is_err());
    }
}

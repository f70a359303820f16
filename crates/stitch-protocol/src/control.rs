//! The agent's local control protocol (`/run/stitch/stitchd.sock`), spoken by `stitchd` and
//! by `stitch agent`: one JSON request line, one JSON answer line.
//!
//! ```text
//! -> {"action":"disable","patch":"ST-2026-0001"}
//! <- {"ok":true,"result":{...}}      or      {"ok":false,"error":{"code":"...","message":"..."}}
//! ```
//!
//! No socket here: [`exchange`] runs one round trip over any stream the caller connected.

use std::io::{BufRead as _, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Longest request line an agent reads.
pub const MAX_REQUEST: u64 = 64 << 10;

/// A request to the agent, whatever transport it came over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum AgentAction {
    /// Agent state: enabled, server connection, counts.
    Status,
    /// Every installed patch with where it is applied.
    Patches,
    /// The most recent events.
    Events {
        #[serde(default = "default_limit")]
        limit: usize,
    },
    /// Enable the agent (no patch) or one patch.
    Enable {
        #[serde(default)]
        patch: Option<String>,
    },
    /// Disable the agent (reverting every patch) or one patch.
    Disable {
        #[serde(default)]
        patch: Option<String>,
    },
    /// Heartbeat, deliver events and fetch the manifest now.
    Sync,
}

fn default_limit() -> usize {
    50
}

/// Why a round trip gave no result.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's answer is not the control protocol: {0}")]
    BadAnswer(String),
    #[error("the agent refused: [{code}] {message}")]
    Refused { code: String, message: String },
}

impl ControlError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::Io { .. } => "control.io",
            ControlError::BadAnswer(_) => "control.bad_answer",
            ControlError::Refused { .. } => "control.refused",
        }
    }
}

/// The answer line (with its `\n`) for a result or an error `(code, message)`.
pub fn encode_reply(r: Result<Value, (String, String)>) -> Vec<u8> {
    let v = match r {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err((code, message)) => {
            json!({ "ok": false, "error": { "code": code, "message": message } })
        }
    };
    let mut bytes = serde_json::to_vec(&v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// The result carried by an answer line, or the agent's error.
pub fn decode_reply(line: &str) -> Result<Value, ControlError> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    match v["ok"].as_bool() {
        Some(true) => Ok(v["result"].clone()),
        Some(false) => Err(ControlError::Refused {
            code: v["error"]["code"].as_str().unwrap_or("?").to_string(),
            message: v["error"]["message"].as_str().unwrap_or("").to_string(),
        }),
        None => Err(ControlError::BadAnswer("no \"ok\" field".into())),
    }
}

/// One round trip on a connected stream: writes `action` as a line, reads the answer line.
/// Timeouts are the stream's (set them before calling).
pub fn exchange<S: Read + Write>(
    mut stream: S,
    action: &AgentAction,
) -> Result<Value, ControlError> {
    let mut line =
        serde_json::to_vec(action).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|source| ControlError::Io {
        op: "write",
        source,
    })?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|source| ControlError::Io { op: "read", source })?;
    decode_reply(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly_and_replies_round_trip() {
        let a: AgentAction =
            serde_json::from_str(r#"{"action":"disable","patch":"ST-1"}"#).unwrap();
        assert_eq!(
            a,
            AgentAction::Disable {
                patch: Some("ST-1".into())
            }
        );
        let a: AgentAction = serde_json::from_str(r#"{"action":"events"}"#).unwrap();
        assert_eq!(a, AgentAction::Events { limit: 50 });
        assert!(serde_json::from_str::<AgentAction>(r#"{"action":"rm -rf"}"#).is_err());
        let ok = encode_reply(Ok(json!({"enabled": true})));
        assert_eq!(
            decode_reply(std::str::from_utf8(&ok).unwrap()).unwrap()["enabled"],
            true
        );
        let err = encode_reply(Err(("agent.unknown_patch".into(), "no such patch".into())));
        match decode_reply(std::str::from_utf8(&err).unwrap()) {
            Err(ControlError::Refused { code, .. }) => assert_eq!(code, "agent.unknown_patch"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_reply("garbage").unwrap_err().code(),
            "control.bad_answer"
        );
        assert_eq!(decode_reply("{}").unwrap_err().code(), "control.bad_answer");
    }

    #[test]
    fn exchange_writes_one_line_and_reads_one_answer() {
        struct Duplex {
            out: Vec<u8>,
            input: std::io::Cursor<Vec<u8>>,
        }
        impl Read for Duplex {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.input.read(b)
            }
        }
        impl Write for Duplex {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.out.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut d = Duplex {
            out: Vec::new(),
            input: std::io::Cursor::new(encode_reply(Ok(json!(1)))),
        };
        assert_eq!(exchange(&mut d, &AgentAction::Sync).unwrap(), json!(1));
        assert_eq!(d.out, b"{\"action\":\"sync\"}\n");
    }
}

//! The local control socket (`/run/stitch/stitchd.sock`): one JSON request line, one JSON
//! answer line. Only root (or the agent's own user) may connect: the socket file is mode 0600
//! in a 0700 directory, and the peer's credentials (`SO_PEERCRED`) are checked on every
//! connection.
//!
//! ```text
//! -> {"action":"disable","patch":"ST-2026-0001"}
//! <- {"ok":true,"result":{...}}      or      {"ok":false,"error":{"code":"...","message":"..."}}
//! ```

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use serde_json::{Value, json};

use crate::controller::{AgentAction, Input};
use crate::error::{AgentError, Result};

/// Longest request line.
const MAX_REQUEST: u64 = 64 << 10;

/// Binds the socket (replacing a stale one).
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(AgentError::io("create", dir))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io("remove", path)(e)),
    }
    let l = UnixListener::bind(path).map_err(AgentError::io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io("chmod", path))?;
    Ok(l)
}

/// Whether a peer with this uid may control the agent.
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

fn answer(r: std::result::Result<Value, (String, String)>) -> Value {
    match r {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err((code, message)) => {
            json!({ "ok": false, "error": { "code": code, "message": message } })
        }
    }
}

fn serve_one(stream: UnixStream, tx: &Sender<Input>) {
    let own = rustix::process::geteuid().as_raw();
    let peer = rustix::net::sockopt::socket_peercred(&stream).map(|c| c.uid.as_raw());
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let reply = match peer {
        Ok(uid) if peer_allowed(uid, own) => {
            let mut line = String::new();
            let mut r = BufReader::new(stream.take(MAX_REQUEST));
            match r.read_line(&mut line) {
                Ok(_) => match serde_json::from_str::<AgentAction>(&line) {
                    Ok(action) => {
                        let (rtx, rrx) = channel();
                        if tx.send(Input::Action(action, rtx)).is_err() {
                            answer(Err((
                                "control.stopping".into(),
                                "the agent is stopping".into(),
                            )))
                        } else {
                            match rrx.recv_timeout(Duration::from_secs(120)) {
                                Ok(r) => answer(r),
                                Err(_) => answer(Err((
                                    "control.timeout".into(),
                                    "the agent did not answer in time".into(),
                                ))),
                            }
                        }
                    }
                    Err(e) => answer(Err(("control.bad_request".into(), e.to_string()))),
                },
                Err(e) => answer(Err(("control.bad_request".into(), e.to_string()))),
            }
        }
        Ok(uid) => {
            tracing::warn!(uid, "control socket: refused a peer that is not root");
            answer(Err((
                "control.forbidden".into(),
                format!("uid {uid} may not control the agent (root only)"),
            )))
        }
        Err(e) => answer(Err(("control.peer".into(), e.to_string()))),
    };
    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
    bytes.push(b'\n');
    let _ = w.write_all(&bytes);
}

/// Accepts connections forever, one thread per connection (they are rare and short).
pub fn serve(listener: UnixListener, tx: Sender<Input>) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let tx = tx.clone();
                let _ = std::thread::Builder::new()
                    .name("stitchd-ctl".into())
                    .spawn(move || serve_one(s, &tx));
            }
            Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
        }
    }
}

/// Client side: sends `action`, returns the result or the agent's error.
pub fn request(path: &Path, action: &AgentAction) -> Result<Value> {
    let mut s = UnixStream::connect(path).map_err(AgentError::io("connect", path))?;
    s.set_read_timeout(Some(Duration::from_secs(130)))
        .map_err(AgentError::io("connect", path))?;
    let mut line = serde_json::to_vec(action).unwrap_or_default();
    line.push(b'\n');
    s.write_all(&line).map_err(AgentError::io("write", path))?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .map_err(AgentError::io("read", path))?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| AgentError::Control {
        code: "control.bad_answer",
        reason: e.to_string(),
    })?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        Err(AgentError::Control {
            code: "control.refused",
            reason: format!(
                "[{}] {}",
                v["error"]["code"].as_str().unwrap_or("?"),
                v["error"]["message"].as_str().unwrap_or("?")
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_self_may_connect_and_actions_parse() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
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
    }
}

//! The local control socket (`/run/stitch/stitchd.sock`), serving the protocol of
//! `stitch_protocol::control` (one JSON request line, one JSON answer line). Only root (or the
//! agent's own user) may connect: the socket file is mode 0600 in a 0700 directory, and the
//! peer's credentials (`SO_PEERCRED`) are checked on every connection.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use serde_json::Value;
use stitch_protocol::control::{MAX_REQUEST, encode_reply};

use crate::controller::{AgentAction, Input};
use crate::error::{AgentError, Result};

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

fn answer(r: std::result::Result<Value, (String, String)>) -> Vec<u8> {
    encode_reply(r)
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
    let _ = w.write_all(&reply);
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
    let s = UnixStream::connect(path).map_err(AgentError::io("connect", path))?;
    s.set_read_timeout(Some(Duration::from_secs(130)))
        .map_err(AgentError::io("connect", path))?;
    stitch_protocol::control::exchange(&s, action).map_err(|e| AgentError::Control {
        code: e.code(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_self_may_connect() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
    }
}

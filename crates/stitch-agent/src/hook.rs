//! Load-time patching through `stitch-hook`: fanotify permission events + a ptrace hold patch a
//! target module as it is mapped, before one instruction of it runs.
//!
//! The controller keeps one [`stitch_hook::Hook`] running for the set of patches that are
//! enabled right now, and restarts it when that set changes (a patch installed, enabled,
//! disabled, crash-disabled; the agent disabled). Hook events come back as
//! [`Input::Hook`](crate::controller::Input::Hook): a patched load registers the process as a
//! carrier (so disable, hit counters and crash protection cover it), a miss is live-patched.
//!
//! Without the hook (no CAP_SYS_ADMIN, fanotify unavailable, `[hook] enabled = false`) the agent
//! falls back to exec events from the proc connector and periodic scans: a new process then
//! runs its first ~50 ms unpatched, and a library loaded with `dlopen` long after exec stays
//! unpatched until the next scan. `stitch agent status` says which mode is active.

use std::sync::mpsc::Sender;

use stitch_format::VerifiedBundle;

use crate::config::Config;
use crate::controller::Input;

/// The hook as the controller holds it.
#[derive(Default)]
pub(crate) struct LoadTime {
    hook: Option<stitch_hook::Hook>,
    /// (patch id, revision) of the bundles the running hook was started with.
    hooked: Vec<(String, u32)>,
    /// For `stitch agent status`.
    pub(crate) state: String,
    pub(crate) marked: usize,
    /// Stopping the hook hung: a hold worker is blocked on a permission event nobody answers
    /// any more, and a process may be held with it. Only closing the fanotify group (our
    /// process exiting) releases it: the daemon exits and systemd restarts it.
    pub(crate) wedged: bool,
}

/// Stops a hook, waiting at most 3 s. False when it did not stop in time (see `wedged`).
fn stop_bounded(h: stitch_hook::Hook) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("stitchd-hookstop".into())
        .spawn(move || {
            h.stop();
            let _ = tx.send(());
        });
    if spawned.is_err() {
        return false;
    }
    rx.recv_timeout(std::time::Duration::from_secs(3)).is_ok()
}

impl LoadTime {
    /// Stops the hook at agent shutdown (bounded, see `wedged`).
    pub(crate) fn shutdown(&mut self) {
        if let Some(h) = self.hook.take()
            && !stop_bounded(h)
        {
            self.wedged = true;
        }
    }

    /// Whether a hook is running (exec events then need no live-patch check).
    pub(crate) fn active(&self) -> bool {
        self.hook.is_some()
    }

    /// Whether `set` (sorted (id, revision) of the enabled patches) differs from what runs.
    pub(crate) fn needs_refresh(&self, cfg: &Config, set: &[(String, u32)]) -> bool {
        if self.wedged {
            return false;
        }
        if !cfg.hook.enabled {
            return self.state.is_empty() || self.hook.is_some();
        }
        set != self.hooked.as_slice()
            || (self.hook.is_none() && !set.is_empty() && self.state.is_empty())
    }

    /// Makes the running hook match `bundles` (restarting it if the set changed).
    pub(crate) fn refresh(
        &mut self,
        cfg: &Config,
        bundles: Vec<VerifiedBundle>,
        tx: Option<&Sender<Input>>,
    ) {
        if !cfg.hook.enabled {
            self.state = "disabled in the configuration ([hook] enabled = false)".into();
            return;
        }
        let mut set: Vec<(String, u32)> = bundles
            .iter()
            .map(|b| (b.patch().id.clone(), b.patch().revision))
            .collect();
        set.sort();
        if set == self.hooked && (self.hook.is_some() || set.is_empty()) {
            return;
        }
        if let Some(h) = self.hook.take()
            && !stop_bounded(h)
        {
            self.wedged = true;
            self.state = "wedged: stopping stitch-hook did not finish (a hold is blocked); the agent restarts to release it".into();
            return;
        }
        self.hooked = set;
        self.marked = 0;
        if bundles.is_empty() {
            self.state = "idle (no enabled patch)".into();
            return;
        }
        let Some(tx) = tx else {
            self.state = "not started".into();
            return;
        };
        let hc = stitch_hook::HookConfig {
            standard_dirs: cfg.hook.standard_dirs,
            dirs: cfg.hook.dirs.clone(),
            depth: cfg.hook.depth,
            ..Default::default()
        };
        match stitch_hook::Hook::start(bundles, hc) {
            Ok((hook, rx)) => {
                self.marked = hook.marked().len();
                self.state = format!("active: {} target file(s) marked", self.marked);
                tracing::info!(
                    marked = self.marked,
                    patches = self.hooked.len(),
                    "load-time hook started"
                );
                let tx = tx.clone();
                let _ = std::thread::Builder::new()
                    .name("stitchd-hookfwd".into())
                    .spawn(move || {
                        for e in rx {
                            if tx.send(Input::Hook(e)).is_err() {
                                return;
                            }
                        }
                    });
                self.hook = Some(hook);
            }
            Err(e) => {
                tracing::warn!(code = e.code(), error = %e, "load-time hook unavailable; new processes are patched after exec");
                self.state = format!(
                    "unavailable [{}] {e}: new processes are patched shortly after exec",
                    e.code()
                );
            }
        }
    }
}

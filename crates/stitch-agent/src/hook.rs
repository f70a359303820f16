//! Load-time patching through `stitch-hook`: fanotify permission events + a ptrace hold patch a
//! target module as it is mapped, before one instruction of it runs.
//!
//! The controller starts one [`stitch_hook::Hook`] when the first patch is enabled and keeps it
//! running: when the set of enabled patches changes (a patch installed, enabled, disabled,
//! crash-disabled; the agent disabled) it hands the hook the new set with
//! [`stitch_hook::Hook::set_bundles`] — targets that stay keep their marks throughout, no
//! restart, no re-walk of everything; an empty set leaves the hook idle (no marks, no wakeups).
//! Hook events come back as [`Input::Hook`](crate::controller::Input::Hook): a patched load
//! registers the process as a carrier (so disable, hit counters and crash protection cover it),
//! a miss is live-patched.
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
    /// (patch id, revision) of the bundles the hook holds now (or failed to start with).
    hooked: Vec<(String, u32)>,
    /// Why there is no hook: disabled in the configuration, or it could not start.
    unavailable: Option<String>,
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

    /// Whether a hook is patching loads now (exec events then need no early live-patch check).
    pub(crate) fn active(&self) -> bool {
        self.hook.is_some() && !self.hooked.is_empty()
    }

    /// For `stitch agent status`.
    pub(crate) fn state(&self) -> String {
        if self.wedged {
            return "wedged: stopping stitch-hook did not finish (a hold is blocked); the agent restarts to release it".into();
        }
        if let Some(why) = &self.unavailable {
            return why.clone();
        }
        match &self.hook {
            Some(h) if !self.hooked.is_empty() => {
                format!("active: {} target file(s) marked", h.marked().len())
            }
            _ => "idle (no enabled patch)".into(),
        }
    }

    /// Whether `set` (sorted (id, revision) of the enabled patches) differs from what the hook
    /// holds (or, with the hook off in the configuration, whether that is not reported yet).
    pub(crate) fn needs_refresh(&self, cfg: &Config, set: &[(String, u32)]) -> bool {
        if self.wedged {
            return false;
        }
        if !cfg.hook.enabled {
            return self.unavailable.is_none();
        }
        set != self.hooked.as_slice()
    }

    /// Makes the hook hold exactly `bundles`: starts it for the first non-empty set, then
    /// changes its bundles in place. A hook that could not start is tried again when the set
    /// changes.
    pub(crate) fn refresh(
        &mut self,
        cfg: &Config,
        bundles: Vec<VerifiedBundle>,
        tx: Option<&Sender<Input>>,
    ) {
        if !cfg.hook.enabled {
            self.unavailable =
                Some("disabled in the configuration ([hook] enabled = false)".into());
            return;
        }
        let mut set: Vec<(String, u32)> = bundles
            .iter()
            .map(|b| (b.patch().id.clone(), b.patch().revision))
            .collect();
        set.sort();
        if set == self.hooked {
            return;
        }
        self.hooked = set;
        if let Some(h) = &self.hook {
            let u = h.set_bundles(bundles);
            tracing::info!(
                patches = self.hooked.len(),
                marked = u.marked,
                unmarked = u.unmarked,
                kept = u.kept,
                "load-time hook bundles changed"
            );
            return;
        }
        if bundles.is_empty() {
            return;
        }
        let Some(tx) = tx else {
            return;
        };
        let hc = stitch_hook::HookConfig {
            standard_dirs: cfg.hook.standard_dirs,
            dirs: cfg.hook.dirs.clone(),
            depth: cfg.hook.depth,
            watch_mappings: cfg.hook.watch_mappings,
            ..Default::default()
        };
        match stitch_hook::Hook::start(bundles, hc) {
            Ok((hook, rx)) => {
                self.unavailable = None;
                tracing::info!(
                    marked = hook.marked().len(),
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
                self.unavailable = Some(format!(
                    "unavailable [{}] {e}: new processes are patched shortly after exec",
                    e.code()
                ));
            }
        }
    }
}

//! Wiring: the threads of `stitchd` and how they talk.
//!
//! ```text
//!  control socket ─┐
//!  proc connector ─┤  mpsc<Input>   ┌────────────┐   engine (ptrace)
//!  sync (poll)    ─┼──────────────► │ controller │ ─────────────────► processes
//!  reporter       ─┘                └────────────┘ ── store (SQLite, bundles)
//! ```
//!
//! The controller thread owns all state and does every ptrace operation; the other threads
//! only produce [`Input`]s. Network threads never block patching: with the server gone the
//! agent keeps and re-applies what it has.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use stitch_format::PublicKey;

use crate::config::Config;
use crate::controller::{Controller, HeartbeatParts, Input, SyncStatus};
use crate::error::{AgentError, Result};
use crate::inventory::{self, Heartbeat};
use crate::store::{Identity, Store};
use crate::sync::{Backoff, Client, ManifestEntry, verify_manifest};

/// A running agent.
pub struct Agent {
    pub tx: Sender<Input>,
    pub ready_after: Duration,
    thread: Option<std::thread::JoinHandle<bool>>,
    wake: Wake,
    /// Only when a server is configured.
    outbox: Option<Store>,
}

impl Agent {
    /// Asks the controller to stop and waits for it.
    pub fn shutdown(self) -> bool {
        let _ = self.tx.send(Input::Shutdown);
        self.wait()
    }

    /// Waits until the controller stops, then gives the reporter a moment to deliver the
    /// last events (`agent_stopped`); whatever is left stays in the outbox for next time.
    /// Returns false when the agent stopped because it must be restarted (a wedged hook).
    pub fn wait(mut self) -> bool {
        let clean = match self.thread.take() {
            Some(t) => t.join().unwrap_or(false),
            None => true,
        };
        self.wake.wake();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2)
            && self
                .outbox
                .as_ref()
                .is_some_and(|s| s.outbox_len().unwrap_or(0) > 0)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        clean
    }
}

/// Wakes the reporter.
#[derive(Clone, Default)]
struct Wake(Arc<(Mutex<bool>, Condvar)>);

impl Wake {
    fn wake(&self) {
        let (m, c) = &*self.0;
        if let Ok(mut g) = m.lock() {
            *g = true;
            c.notify_all();
        }
    }
    fn wait(&self, d: Duration) {
        let (m, c) = &*self.0;
        let Ok(g) = m.lock() else { return };
        if let Ok((mut g, _)) = c.wait_timeout_while(g, d, |woken| !*woken) {
            *g = false;
        }
    }
}

/// Starts the agent: opens the store, runs the start-up pass (every enabled patch into every
/// running process that maps its target), then starts the control socket, the proc
/// connector and the server sync. Returns once the start-up pass is done.
pub fn start(cfg: Config) -> Result<Agent> {
    let t0 = Instant::now();
    let keys = cfg.trusted()?;
    if keys.is_empty() {
        tracing::warn!("no trusted vendor keys configured: every bundle will be refused");
    }
    let (store, report) = Store::open(&cfg.state_dir)?;
    let reporter_store = store.reopen()?;
    let outbox = if cfg.server_url.is_some() {
        store.reopen().ok()
    } else {
        None
    };
    let (tx, rx) = channel::<Input>();
    let mut ctl = Controller::new(cfg.clone(), store, keys.clone());
    if let Some(from) = &report.rebuilt_from {
        ctl.event(crate::event::Entry::local(format!(
            "state database was unusable ({}); moved to {} and rebuilt from the bundles",
            report.reason.clone().unwrap_or_default(),
            from.display()
        )));
    }
    for ca in &report.bad_bundles {
        ctl.event(crate::event::Entry::local(format!(
            "bundle {ca} was damaged on disk and deleted; it will be downloaded again"
        )));
    }
    let wake = Wake::default();
    {
        let w = wake.clone();
        ctl.on_outbox(Box::new(move || w.wake()));
    }

    // Process events: the proc connector when we may use it.
    let mut proc_connector = false;
    if cfg.scan.proc_connector {
        let filter = Arc::new(crate::procconn::ProcFilter::default());
        match crate::procconn::ProcConnector::open(&filter) {
            Ok(pc) => {
                proc_connector = true;
                ctl.set_proc_filter(filter.clone());
                let tx2 = tx.clone();
                let tx3 = tx.clone();
                spawn("stitchd-proc", move || {
                    pc.run(
                        &filter,
                        |batch| tx2.send(Input::Proc(batch)).is_ok(),
                        || {
                            tracing::warn!("proc connector overflowed (events lost); rescanning");
                            let _ = tx3.send(Input::Rescan);
                        },
                    )
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "proc connector unavailable (needs CAP_NET_ADMIN); new processes are found by periodic scans and crash protection is off")
            }
        }
    }
    ctl.set_proc_connector(proc_connector);
    ctl.set_input(tx.clone());

    // Start-up pass, before anything else is served.
    ctl.note_installation(report.fresh);
    ctl.startup();
    let ready_after = t0.elapsed();
    tracing::info!(ready_ms = ready_after.as_millis() as u64, "stitchd ready");

    // Control socket.
    match crate::control::bind(&cfg.socket_path) {
        Ok(l) => {
            let tx2 = tx.clone();
            spawn("stitchd-ctl", move || crate::control::serve(l, tx2));
        }
        Err(e) => tracing::error!(code = e.code(), error = %e, "control socket unavailable"),
    }

    // Server sync.
    if let Some(url) = cfg.server_url.clone() {
        let sync_now = Wake::default();
        let force_hb = Arc::new(AtomicBool::new(false));
        {
            let s = sync_now.clone();
            let w = wake.clone();
            let f = force_hb.clone();
            ctl.on_sync_now(Box::new(move || {
                f.store(true, Ordering::Relaxed);
                s.wake();
                w.wake();
            }));
        }
        let cfg2 = cfg.clone();
        let tx2 = tx.clone();
        let w = wake.clone();
        spawn("stitchd-sync", move || {
            sync_main(cfg2, url, reporter_store, tx2, w, sync_now, force_hb)
        });
    }

    let thread = std::thread::Builder::new()
        .name("stitchd-controller".into())
        .spawn(move || controller_loop(ctl, rx))
        .map_err(AgentError::io("spawn", "controller"))?;
    Ok(Agent {
        tx,
        ready_after,
        thread: Some(thread),
        wake,
        outbox,
    })
}

/// What `stitchd uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UninstallReport {
    /// (process, patch) pairs reverted.
    pub reverted: u64,
    /// (process, patch) pairs that could not be reverted (the process refused: traced by a
    /// debugger, a thread that stays in a site...). Also reported as `patch_failed`.
    pub failed: Vec<crate::controller::RevertFailure>,
    /// Patches whose stored bundle does not verify: reverted from the records in the
    /// processes all the same.
    pub unverified: Vec<String>,
    /// `agent_uninstalled` reached the server (else it waits in the outbox).
    pub delivered: bool,
    /// Events still in the outbox.
    pub outbox: u64,
    /// Why delivery did not happen, if it did not.
    pub delivery_error: Option<String>,
}

/// Package removal (`stitchd uninstall`, run by the package's `prerm` after the service is
/// stopped): reverts every patch of this agent in every running process, records
/// `agent_uninstalled`, and delivers the outbox to the server within `wait`. Offline (or
/// past `wait`) the event stays queued: it is sent if the agent is installed again on this
/// state directory (a purge deletes it). Refuses while `stitchd` runs (it would re-apply).
pub fn uninstall(cfg: Config, wait: Duration) -> Result<UninstallReport> {
    if crate::control::request(&cfg.socket_path, &crate::AgentAction::Status).is_ok() {
        return Err(AgentError::Control {
            code: "agent.running",
            reason: format!(
                "stitchd answers on {}: stop it first (systemctl stop stitchd), it would re-apply what uninstall reverts",
                cfg.socket_path.display()
            ),
        });
    }
    let keys = cfg.trusted()?;
    let (store, _) = Store::open(&cfg.state_dir)?;
    let outbox = store.reopen()?;
    let mut ctl = Controller::new(cfg.clone(), store, keys);
    let outcome = ctl.uninstall();
    if let Some(e) = ctl.store_error() {
        tracing::warn!(error = %e, "the state store failed; agent_uninstalled may not be queued");
    }
    let t0 = Instant::now();
    let delivery_error = match (cfg.server_url.as_deref(), outbox.identity()) {
        (Some(url), Some(id)) => {
            let mut c = cfg.clone();
            // Each request within the wait.
            c.sync.request_timeout_s = wait.as_secs().max(1);
            let mut backoff = Backoff::new(
                Duration::from_millis(cfg.sync.backoff_initial_ms.max(1)),
                Duration::from_secs(1),
            );
            loop {
                let r = Client::new(&c, url)
                    .and_then(|cl| deliver_outbox(&cl, &outbox, &id.credential));
                let Err(e) = r else { break None };
                tracing::warn!(code = e.code(), error = %e, "cannot deliver agent_uninstalled yet");
                let d = backoff.next_delay();
                if t0.elapsed() + d >= wait {
                    break Some(format!("[{}] {e}", e.code()));
                }
                std::thread::sleep(d);
            }
        }
        (None, _) => Some("no server_url configured".into()),
        (Some(_), None) => Some("never enrolled".into()),
    };
    let left = outbox.outbox_len().unwrap_or(0) + ctl.unsaved() as u64;
    Ok(UninstallReport {
        reverted: outcome.reverted,
        failed: outcome.failed,
        unverified: outcome.unverified,
        delivered: delivery_error.is_none() && left == 0,
        outbox: left,
        delivery_error,
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        tracing::error!(thread = name, error = %e, "cannot start thread");
    }
}

fn controller_loop(mut ctl: Controller, rx: Receiver<Input>) -> bool {
    loop {
        match rx.recv_timeout(ctl.next_deadline()) {
            Ok(i) => {
                if !ctl.input(i) {
                    return !ctl.wedged;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return true,
        }
        ctl.tick();
    }
}

fn status(
    tx: &Sender<Input>,
    state: &str,
    id: Option<&Identity>,
    err: Option<&AgentError>,
    contact: bool,
) {
    let _ = tx.send(Input::Sync(SyncStatus {
        state: state.into(),
        agent_id: id.map(|i| i.agent_id.clone()),
        last_contact: contact.then(crate::now_unix),
        last_error: err.map(|e| format!("[{}] {e}", e.code())),
        manifest_version: None,
    }));
}

/// Enrolls (once), then runs the reporter on its own thread and the manifest poller here.
fn sync_main(
    cfg: Config,
    url: String,
    store: Store,
    tx: Sender<Input>,
    wake: Wake,
    sync_now: Wake,
    force_hb: Arc<AtomicBool>,
) {
    let client = match Client::new(&cfg, &url) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(code = e.code(), error = %e, "cannot configure the server connection; working offline");
            status(&tx, "offline", None, Some(&e), false);
            return;
        }
    };
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.sync.backoff_initial_ms.max(1)),
        Duration::from_secs(cfg.sync.backoff_max_s.max(1)),
    );
    let identity = loop {
        if let Some(id) = store.identity() {
            break id;
        }
        let Some(token) = cfg.enrollment_token.clone() else {
            let e = AgentError::NotEnrolled {
                reason: "no identity and no enrollment_token in the config".into(),
            };
            tracing::warn!(error = %e, "working offline");
            status(&tx, "offline", None, Some(&e), false);
            return;
        };
        status(&tx, "enrolling", None, None, false);
        let hostname = cfg.hostname.clone().unwrap_or_else(inventory::hostname);
        match client.enroll(&token, &hostname) {
            Ok(r) => {
                let id = Identity {
                    agent_id: r.agent_id,
                    credential: r.credential,
                    server_key: cfg.server_key.clone().unwrap_or(r.server_key),
                    server_url: url.clone(),
                };
                if let Err(e) = store.set_identity(&id) {
                    tracing::error!(error = %e, "cannot save the identity; retrying");
                    std::thread::sleep(backoff.next_delay());
                    continue;
                }
                tracing::info!(agent_id = %id.agent_id, "enrolled");
                break id;
            }
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!(code = e.code(), error = %e, retry_ms = d.as_millis() as u64, "enrollment failed");
                status(&tx, "offline", None, Some(&e), false);
                if matches!(
                    &e,
                    AgentError::Server {
                        status: 401 | 403,
                        ..
                    }
                ) {
                    std::thread::sleep(Duration::from_secs(cfg.sync.backoff_max_s.max(1)));
                } else {
                    std::thread::sleep(d);
                }
            }
        }
    };
    backoff.reset();
    let server_key = match PublicKey::from_line(&identity.server_key) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "stored server key is unusable; working offline");
            return;
        }
    };
    {
        let (c, s, t, id, w) = (client.clone(), store, tx.clone(), identity.clone(), wake);
        let cfg2 = cfg.clone();
        spawn("stitchd-report", move || {
            reporter(cfg2, c, s, t, id, w, force_hb)
        });
    }
    poller(&cfg, &client, &tx, &identity, &server_key, &sync_now);
}

fn is_revoked(e: &AgentError) -> bool {
    matches!(e, AgentError::Server { code, .. } if code == "agent.revoked" || code == "agent.unknown")
}

/// Reports a failed exchange with the server: `revoked` when the server no longer knows this
/// agent, `offline` otherwise, with the error.
fn status_failed(tx: &Sender<Input>, id: &Identity, e: &AgentError) {
    let state = if is_revoked(e) { "revoked" } else { "offline" };
    status(tx, state, Some(id), Some(e), false);
}

/// Long-polls the manifest; downloads and checks bundles; hands both to the controller.
fn poller(
    cfg: &Config,
    client: &Client,
    tx: &Sender<Input>,
    id: &Identity,
    key: &PublicKey,
    sync_now: &Wake,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.sync.backoff_initial_ms.max(1)),
        Duration::from_secs(cfg.sync.backoff_max_s.max(1)),
    );
    let stored_dir = cfg.state_dir.join("bundles");
    let mut version = crate::store::stored_manifest_version(&cfg.state_dir);
    let mut last_full: Option<Instant> = None;
    let keys = cfg.trusted().unwrap_or_default();
    loop {
        let full = last_full
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(cfg.sync.fallback_s.max(1)));
        let r = if full {
            client.manifest(&id.credential).map(Some)
        } else {
            client.poll(
                &id.credential,
                version,
                Duration::from_secs(cfg.sync.long_poll_s.max(1)),
            )
        };
        let signed = match r {
            Ok(m) => {
                backoff.reset();
                if full {
                    last_full = Some(Instant::now());
                }
                status(tx, "online", Some(id), None, true);
                m
            }
            Err(e) => {
                let revoked = is_revoked(&e);
                let d = if revoked {
                    Duration::from_secs(cfg.sync.backoff_max_s.max(1))
                } else {
                    backoff.next_delay()
                };
                tracing::warn!(code = e.code(), error = %e, retry_ms = d.as_millis() as u64, "manifest fetch failed; keeping what we have");
                status_failed(tx, id, &e);
                last_full = None;
                sync_now.wait(d);
                continue;
            }
        };
        let Some(signed) = signed else { continue };
        let payload = match verify_manifest(&signed, key, &id.agent_id, version, crate::now_unix())
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(code = e.code(), error = %e, "manifest refused");
                status(tx, "online", Some(id), Some(&e), true);
                sync_now.wait(backoff.next_delay());
                continue;
            }
        };
        let mut bundles = Vec::new();
        let mut incomplete = false;
        for entry in &payload.patches {
            if stored_dir
                .join(format!("{}.stitch", entry.content_address))
                .is_file()
            {
                continue;
            }
            match client.bundle(&id.credential, &entry.content_address) {
                Ok(bytes) => {
                    match crate::store::verify_bundle(&entry.content_address, &bytes, &keys) {
                        Ok(_) => bundles.push((entry.content_address.clone(), bytes)),
                        Err(e) => reject(tx, entry, &e),
                    }
                }
                Err(e) => {
                    tracing::warn!(patch_id = %entry.patch_id, code = e.code(), error = %e, "bundle download failed");
                    if matches!(
                        e,
                        AgentError::Server {
                            status: 400..=499,
                            ..
                        }
                    ) {
                        reject(tx, entry, &e);
                    } else {
                        incomplete = true;
                    }
                }
            }
        }
        if incomplete {
            // Try again soon rather than accept a manifest we cannot act on.
            last_full = None;
            sync_now.wait(backoff.next_delay());
            continue;
        }
        version = payload.version;
        if tx.send(Input::Manifest { payload, bundles }).is_err() {
            return;
        }
    }
}

fn reject(tx: &Sender<Input>, entry: &ManifestEntry, e: &AgentError) {
    tracing::error!(patch_id = %entry.patch_id, code = e.code(), error = %e, "bundle from the server refused");
    let _ = tx.send(Input::BundleRejected {
        entry: entry.clone(),
        code: e.code().into(),
        message: e.to_string(),
    });
}

/// Sends the outbox until it is empty (events the server refuses for good are dropped).
/// An error means delivery failed; what was not acknowledged stays in the outbox.
fn deliver_outbox(client: &Client, store: &Store, cred: &str) -> Result<()> {
    loop {
        let batch = match store.outbox(500) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                return Ok(());
            }
        };
        if batch.is_empty() {
            return Ok(());
        }
        let events: Vec<_> = batch.iter().filter_map(|s| s.event.wire()).collect();
        match client.events(cred, &events) {
            Ok(_) => {
                let seqs: Vec<i64> = batch.iter().map(|s| s.seq).collect();
                if let Err(e) = store.mark_delivered(&seqs) {
                    tracing::warn!(error = %e, "cannot mark events delivered (they will be sent again; the server ignores duplicates)");
                    return Ok(());
                }
                tracing::debug!(n = seqs.len(), "events delivered");
            }
            Err(AgentError::Server {
                status: 400 | 413 | 422,
                code,
                message,
                ..
            }) => {
                // The server refuses these events for good: a poison batch must not block
                // every later event (and the heartbeats behind them). Send one by one and
                // drop only the ones it refuses.
                tracing::error!(%code, %message, "server refused an event batch; isolating the bad events");
                for s in &batch {
                    let one: Vec<_> = s.event.wire().into_iter().collect();
                    match client.events(cred, &one) {
                        Ok(_)
                        | Err(AgentError::Server {
                            status: 400 | 413 | 422,
                            ..
                        }) => {
                            let _ = store.mark_delivered(&[s.seq]);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Heartbeats and event delivery.
fn reporter(
    cfg: Config,
    client: Client,
    store: Store,
    tx: Sender<Input>,
    id: Identity,
    wake: Wake,
    force_hb: Arc<AtomicBool>,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.sync.backoff_initial_ms.max(1)),
        Duration::from_secs(cfg.sync.backoff_max_s.max(1)),
    );
    let mut interval = Duration::from_secs(cfg.sync.heartbeat_s.max(1));
    let mut next_hb = Instant::now();
    let mut packages: Option<(Instant, Vec<inventory::Package>, String)> = None;
    let mut send_packages = true;
    let mut failing = false;
    loop {
        let mut ok = true;
        // Events first: they are what the dashboard shows.
        if let Err(e) = deliver_outbox(&client, &store, &id.credential) {
            tracing::warn!(code = e.code(), error = %e, "event delivery failed; kept in the outbox");
            status_failed(&tx, &id, &e);
            ok = false;
        }
        if ok && Instant::now() >= next_hb {
            let refresh = packages
                .as_ref()
                .is_none_or(|(t, _, _)| t.elapsed() >= interval);
            if refresh {
                let list = inventory::packages();
                let hash = inventory::packages_hash(&list);
                if packages.as_ref().is_none_or(|(_, _, h)| *h != hash) {
                    send_packages = true;
                    let _ = tx.send(Input::Packages(list.clone()));
                }
                packages = Some((Instant::now(), list, hash));
            }
            let (rtx, rrx) = channel::<HeartbeatParts>();
            let parts = tx
                .send(Input::Heartbeat(rtx))
                .ok()
                .and_then(|_| rrx.recv_timeout(Duration::from_secs(60)).ok());
            if let (Some(parts), Some((_, list, hash))) = (parts, packages.as_ref()) {
                let mut hb = Heartbeat {
                    hostname: cfg.hostname.clone().unwrap_or_else(inventory::hostname),
                    os: inventory::os_release(),
                    kernel: inventory::kernel(),
                    ip_addresses: inventory::ip_addresses(),
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    agent_enabled: parts.agent_enabled,
                    packages_hash: hash.clone(),
                    packages: send_packages.then(|| list.clone()),
                    patches: parts.patches,
                };
                let mut r = client.heartbeat(&id.credential, &hb);
                if let Ok(resp) = &r
                    && resp.inventory_required
                    && hb.packages.is_none()
                {
                    hb.packages = Some(list.clone());
                    r = client.heartbeat(&id.credential, &hb);
                }
                match r {
                    Ok(resp) => {
                        send_packages = false;
                        if resp.next_heartbeat_s > 0 {
                            interval = Duration::from_secs(
                                resp.next_heartbeat_s.min(cfg.sync.heartbeat_s.max(1)),
                            );
                        }
                        next_hb = Instant::now() + interval;
                        status(&tx, "online", Some(&id), None, true);
                    }
                    Err(e) => {
                        tracing::warn!(code = e.code(), error = %e, "heartbeat failed");
                        status_failed(&tx, &id, &e);
                        ok = false;
                    }
                }
            }
        }
        let wait = if ok {
            if failing {
                backoff.reset();
                failing = false;
            }
            next_hb.saturating_duration_since(Instant::now())
        } else {
            failing = true;
            backoff.next_delay()
        };
        wake.wait(wait.max(Duration::from_millis(50)));
        if force_hb.swap(false, Ordering::Relaxed) {
            next_hb = Instant::now();
        }
    }
}

//! The controller: the one owner of the agent's state. Every request — from the control
//! socket, the server sync, the proc connector, timers — arrives as an [`Input`]; the
//! controller knows nothing of transports.
//!
//! Invariants:
//! - A patch is in a process only if the agent is enabled, the server's manifest enables it,
//!   it was not disabled locally or by crash protection, and its bundle verified against the
//!   trusted keys when it was loaded for this pass (disk bytes re-checked every pass).
//! - A patch whose stored bundle no longer verifies (damaged or missing file, signing key no
//!   longer trusted) is never applied — not at start-up, not by the load-time hook, not live —
//!   and is reported (`patch_failed` with the bundle's code, state `unverified`). It stays
//!   known (its row is kept), so it is still reverted from the processes carrying it — found
//!   from their Stitch regions, no bundle needed — when it is disabled, leaves the manifest,
//!   or the agent is uninstalled.
//! - Nothing is applied twice: each candidate process is listed first ([`Engine::list`]
//!   reads its Stitch region), which is also how a restarted agent rediscovers its patches.
//! - Disabling (a patch or the agent) reverts in every process carrying it, live.
//! - A failing store (full disk, I/O error) never stops patching: state is kept in memory
//!   and written when the store works again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use stitch_engine::{Engine, EngineError};
use stitch_format::{Bundle, TrustedKeys, VerifiedBundle};
use stitch_sys::Pid;

use crate::config::Config;
use crate::error::AgentError;
use crate::event::{Entry, Event, EventBody};
use crate::inventory::{Package, PatchState};
use crate::procconn::ProcEvent;
use crate::scan::{self, SizeCache};
use crate::store::{AppliedRow, InstalledPatch, LocalPolicy, Store, StoredManifest};
use crate::sync::{ManifestEntry, ManifestPayload};

/// A request to the agent, whatever transport it came over (the control protocol's type).
pub use stitch_protocol::control::AgentAction;

/// Answer to an action: JSON, or an error with a stable code.
pub type Reply = std::result::Result<Value, (String, String)>;

/// How the server connection is doing (reported by the sync threads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// `not_configured`, `enrolling`, `online`, `offline`, `revoked`.
    pub state: String,
    pub agent_id: Option<String>,
    pub last_contact: Option<i64>,
    pub last_error: Option<String>,
    pub manifest_version: Option<i64>,
}

/// What the reporter needs for a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatParts {
    pub agent_enabled: bool,
    pub patches: Vec<PatchState>,
}

/// Everything the controller is told.
pub enum Input {
    Action(AgentAction, Sender<Reply>),
    /// Process events (a batch, already filtered by [`crate::procconn::ProcFilter`]).
    Proc(Vec<ProcEvent>),
    /// The proc connector lost events: rescan everything.
    Rescan,
    /// A verified manifest and the bundles downloaded for it (content address, bytes).
    Manifest {
        payload: ManifestPayload,
        bundles: Vec<(String, Vec<u8>)>,
    },
    /// A bundle the server served was refused.
    BundleRejected {
        entry: ManifestEntry,
        code: String,
        message: String,
    },
    Sync(SyncStatus),
    /// The installed packages (from the reporter's inventory).
    Packages(Vec<Package>),
    Heartbeat(Sender<HeartbeatParts>),
    /// What the load-time hook did.
    Hook(stitch_hook::HookEvent),
    Shutdown,
}

/// Where a patch is: a process carrying our patches.
#[derive(Debug, Clone)]
struct Carrier {
    start_time: u64,
    exe: String,
    /// patch id -> (revision, hits already reported)
    patches: BTreeMap<String, (u32, u64)>,
}

/// An installed patch with its bundle.
struct Slot {
    row: InstalledPatch,
    /// None: the stored bundle did not verify when the store was loaded ([`Slot::unverified`]
    /// says why). Such a patch is never applied; it is still ours to revert (the engine
    /// reverts from the record in the process's region).
    bundle: Option<VerifiedBundle>,
    /// The bundle is on disk (else only in memory: the disk was full when it arrived).
    persisted: bool,
    /// Last failure: code, message.
    error: Option<(String, String)>,
    /// Why the stored bundle does not verify: code, message.
    unverified: Option<(String, String)>,
}

/// Counters the agent keeps about itself.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    pub applied: u64,
    pub reverted: u64,
    pub failures: BTreeMap<String, u64>,
    pub load_time_applied: u64,
    /// Process events received (after filtering) and processes checked after an exec.
    pub proc_events: u64,
    pub exec_checks: u64,
    pub exploit_attempts_blocked: u64,
    /// Reads of the hit counters (one per timer firing, over every carrier).
    pub hit_reads: u64,
    pub crashes_seen: u64,
    pub scans: u64,
    pub last_scan_ms: u64,
    pub last_scan_processes: u64,
}

/// State of one scan pass. Bundles and stored rows are loaded only when a process that
/// may carry a target is found, so the many exec events of a busy host stay cheap.
#[derive(Default)]
struct Pass {
    /// Bundles re-verified for this pass (loaded on first need).
    bundles: Option<BTreeMap<String, VerifiedBundle>>,
    /// Hits already reported, from the store: (pid, start time, patch) -> hits.
    rows: Option<HashMap<(i32, u64, String), u64>>,
    /// Rows to write at the end (one transaction).
    dirty: Vec<AppliedRow>,
    /// Processes each patch was newly applied to.
    applied: BTreeMap<String, i64>,
    /// Processes each patch was reverted in.
    reverted: BTreeMap<String, i64>,
}

/// The controller.
pub struct Controller {
    cfg: Config,
    store: Store,
    keys: TrustedKeys,
    engine: Engine,
    slots: BTreeMap<String, Slot>,
    policy: LocalPolicy,
    carriers: HashMap<i32, Carrier>,
    /// Carriers found gone by a scan before their exit event arrived (a busy host queues
    /// events): kept for a while so a late exit event is still attributed (crash protection).
    departed: HashMap<i32, (Instant, Carrier)>,
    /// (pid, patch, code) already reported, so a process that refuses a patch is not
    /// reported on every scan.
    reported: HashSet<(i32, String, String)>,
    crashes: HashMap<String, Vec<Instant>>,
    pending: Vec<(Instant, i32)>,
    unsaved: Vec<Event>,
    store_error: Option<String>,
    sync: SyncStatus,
    packages: Option<HashSet<(String, String, String)>>,
    metrics: Metrics,
    started: Instant,
    ready_after: Option<Duration>,
    proc_connector: bool,
    last_scan: Instant,
    last_hits: Instant,
    /// Time between hit-counter reads: `hits_interval` after a hit, doubling while none.
    hits_every: Duration,
    sizes: SizeCache,
    outbox_wake: Option<Box<dyn Fn() + Send>>,
    sync_now: Option<Box<dyn Fn() + Send>>,
    /// For the load-time hook's event forwarder.
    input_tx: Option<Sender<Input>>,
    proc_filter: Option<std::sync::Arc<crate::procconn::ProcFilter>>,
    load_time: crate::hook::LoadTime,
    /// Processes patched at load time since the last `patch_applied` event, by patch.
    hook_applied: BTreeMap<String, i64>,
    last_hook_flush: Instant,
    /// The agent must exit (see [`crate::hook`]'s `wedged`).
    pub wedged: bool,
    /// `stitchd uninstall`: nothing is desired any more.
    uninstalling: bool,
    /// What could not be reverted during `stitchd uninstall`.
    revert_failures: Vec<RevertFailure>,
}

/// A process that kept a patch `stitchd uninstall` had to revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevertFailure {
    pub patch_id: String,
    pub pid: i32,
    pub code: String,
    pub message: String,
}

/// What [`Controller::uninstall`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UninstallOutcome {
    /// (process, patch) pairs reverted.
    pub reverted: u64,
    /// (process, patch) pairs that could not be reverted.
    pub failed: Vec<RevertFailure>,
    /// Patches whose stored bundle does not verify (reverted from the records in the
    /// processes all the same).
    pub unverified: Vec<String>,
}

impl Controller {
    /// Loads the store into memory (re-verifying every bundle); applies nothing yet.
    pub fn new(cfg: Config, store: Store, keys: TrustedKeys) -> Controller {
        let policy = store.policy();
        let mut c = Controller {
            cfg,
            store,
            keys,
            engine: Engine::new(),
            slots: BTreeMap::new(),
            policy,
            carriers: HashMap::new(),
            departed: HashMap::new(),
            reported: HashSet::new(),
            crashes: HashMap::new(),
            pending: Vec::new(),
            unsaved: Vec::new(),
            store_error: None,
            sync: SyncStatus {
                state: "not_configured".into(),
                ..Default::default()
            },
            packages: None,
            metrics: Metrics::default(),
            started: Instant::now(),
            ready_after: None,
            proc_connector: false,
            last_scan: Instant::now(),
            last_hits: Instant::now(),
            hits_every: Duration::ZERO,
            sizes: SizeCache::default(),
            outbox_wake: None,
            sync_now: None,
            input_tx: None,
            proc_filter: None,
            load_time: crate::hook::LoadTime::default(),
            hook_applied: BTreeMap::new(),
            last_hook_flush: Instant::now(),
            wedged: false,
            uninstalling: false,
            revert_failures: Vec::new(),
        };
        let rows = match c.store.patches() {
            Ok(r) => r,
            Err(e) => {
                c.store_failed(&e);
                Vec::new()
            }
        };
        let orphans = c.orphans(&rows);
        for row in rows.into_iter().chain(orphans) {
            let loaded = c
                .store
                .load_verified(&row.content_address, &c.keys)
                .and_then(|b| {
                    if b.patch().id == row.patch_id {
                        Ok(b)
                    } else {
                        Err(AgentError::Manifest {
                            code: "agent.manifest_mismatch",
                            reason: format!(
                                "stored bundle holds {}, its row says {}",
                                b.patch().id,
                                row.patch_id
                            ),
                        })
                    }
                });
            match loaded {
                Ok(bundle) => {
                    c.slots.insert(
                        row.patch_id.clone(),
                        Slot {
                            row,
                            bundle: Some(bundle),
                            persisted: true,
                            error: None,
                            unverified: None,
                        },
                    );
                }
                Err(e) => c.keep_unverified(row, &e),
            }
        }
        c
    }

    /// Patches this agent put into running processes (the `applied` table) that have no row:
    /// an agent before this one dropped the row of a patch whose stored bundle stopped
    /// verifying, and the patch stayed in its processes. They are ours again — enabled as the
    /// stored manifest says (not listed there: reverted) — so they can be taken out.
    fn orphans(&self, rows: &[InstalledPatch]) -> Vec<InstalledPatch> {
        let applied = self.store.applied().unwrap_or_default();
        let manifest = self.store.manifest();
        let mut out: BTreeMap<String, InstalledPatch> = BTreeMap::new();
        for a in applied {
            if rows.iter().any(|r| r.patch_id == a.patch_id) || out.contains_key(&a.patch_id) {
                continue;
            }
            // Only where that process still runs (rows of processes that exited while no
            // agent ran stay behind).
            if scan::start_time(a.pid) != Some(a.start_time) {
                continue;
            }
            let entry = manifest
                .as_ref()
                .and_then(|m| m.entries.iter().find(|e| e.patch_id == a.patch_id));
            tracing::warn!(patch_id = %a.patch_id, pid = a.pid, "patch applied by this agent has no row; adopting it so it can be reverted");
            out.insert(
                a.patch_id.clone(),
                InstalledPatch {
                    patch_id: a.patch_id.clone(),
                    revision: a.revision,
                    content_address: entry.map(|e| e.content_address.clone()).unwrap_or_default(),
                    server_enabled: match (&manifest, entry) {
                        (_, Some(e)) => e.enabled,
                        (None, None) => true,
                        (Some(_), None) => false,
                    },
                    local_enabled: !self.policy.patches_disabled.contains(&a.patch_id),
                    crash_disabled: self.policy.crash_disabled.get(&a.patch_id).cloned(),
                    title: entry.map(|e| e.title.clone()).unwrap_or_default(),
                    installed_at: crate::now_unix(),
                },
            );
        }
        out.into_values().collect()
    }

    /// A patch whose stored bundle does not verify: reported, never applied, kept known (row
    /// and slot) so it can still be reverted wherever it is. A newly downloaded bundle that
    /// verifies replaces it.
    fn keep_unverified(&mut self, row: InstalledPatch, e: &AgentError) {
        let code = e.code().to_string();
        let message = format!(
            "stored bundle does not verify; the patch is not applied (where it is applied it stays until disabled, removed or uninstalled, which revert it): {e}"
        );
        tracing::warn!(patch_id = %row.patch_id, %code, error = %e, "stored bundle refused; never applied, still revertible");
        *self.metrics.failures.entry(code.clone()).or_default() += 1;
        // Reported once: the manifest naming the same bundle does not report it again.
        self.reported.insert((
            0,
            format!("{}@{}", row.patch_id, row.content_address),
            code.clone(),
        ));
        self.event(EventBody::PatchFailed {
            patch_id: row.patch_id.clone(),
            revision: row.revision.into(),
            code: code.clone(),
            message: message.clone(),
        });
        self.slots.insert(
            row.patch_id.clone(),
            Slot {
                row,
                bundle: None,
                persisted: true,
                error: Some((code.clone(), message.clone())),
                unverified: Some((code, message)),
            },
        );
    }

    /// Called after each event that should reach the server soon.
    pub fn on_outbox(&mut self, f: Box<dyn Fn() + Send>) {
        self.outbox_wake = Some(f);
    }

    /// Called for `stitch agent sync`.
    pub fn on_sync_now(&mut self, f: Box<dyn Fn() + Send>) {
        self.sync_now = Some(f);
    }

    /// The proc connector's filter, kept in line with the carriers after every input.
    pub fn set_proc_filter(&mut self, f: std::sync::Arc<crate::procconn::ProcFilter>) {
        self.proc_filter = Some(f);
    }

    fn sync_filter(&self) {
        if let Some(f) = &self.proc_filter {
            let want_exec = self.agent_enabled()
                && self
                    .slots
                    .values()
                    .any(|s| s.row.enabled() && s.bundle.is_some());
            f.update(
                self.carriers.keys().chain(self.departed.keys()).copied(),
                want_exec,
            );
        }
    }

    /// Where the load-time hook's events are sent (enables the hook).
    pub fn set_input(&mut self, tx: Sender<Input>) {
        self.input_tx = Some(tx);
    }

    /// Starts the load-time hook, or changes its bundles, so it covers exactly the enabled
    /// patches.
    pub fn refresh_hook(&mut self) {
        let set: Vec<(String, u32)> = self
            .slots
            .iter()
            .filter(|(id, _)| self.desired(id))
            .map(|(id, s)| (id.clone(), s.row.revision))
            .collect();
        if !self.load_time.needs_refresh(&self.cfg, &set) {
            return;
        }
        let bundles: Vec<VerifiedBundle> = self
            .slots
            .iter()
            .filter(|(id, _)| self.desired(id))
            .filter_map(|(_, s)| s.bundle.clone())
            .collect();
        self.load_time
            .refresh(&self.cfg, bundles, self.input_tx.as_ref());
    }

    fn on_hook(&mut self, e: stitch_hook::HookEvent) {
        use stitch_hook::HookEvent as H;
        match e {
            H::Patched {
                pid,
                patch,
                module,
                latency,
                ..
            } => {
                tracing::info!(pid = pid.0, patch_id = %patch, module = %module.display(), latency_us = latency.as_micros() as u64, "patched at load time");
                self.metrics.load_time_applied += 1;
                self.add_carrier(pid.0, &patch);
                *self.hook_applied.entry(patch).or_default() += 1;
            }
            H::LivePatched { pid, patch, result } => match result {
                Ok(()) => {
                    self.metrics.applied += 1;
                    self.add_carrier(pid.0, &patch);
                    *self.hook_applied.entry(patch).or_default() += 1;
                }
                Err(msg) => {
                    let rev = self.slots.get(&patch).map_or(0, |s| s.row.revision);
                    self.fail_raw(
                        &patch,
                        rev,
                        Some(pid.0),
                        "hook.live_patch_failed".into(),
                        msg,
                    );
                }
            },
            H::Missed {
                pid,
                module,
                patches,
                reason,
            } => {
                tracing::warn!(pid = pid.0, module = %module.display(), ?patches, ?reason, "load-time hook missed a load; live-patching");
                if let stitch_hook::MissReason::Engine { code, message } = reason {
                    for p in patches {
                        let rev = self.slots.get(&p).map_or(0, |s| s.row.revision);
                        self.fail_raw(&p, rev, Some(pid.0), code.clone(), message.clone());
                    }
                } else {
                    self.pending
                        .push((Instant::now() + Duration::from_millis(200), pid.0));
                }
            }
            // `stitch agent status` asks the hook what is marked.
            H::Marked { .. } | H::Unmarked { .. } | H::Skipped { .. } => {}
        }
    }

    fn add_carrier(&mut self, pid: i32, patch: &str) {
        if let Some(f) = &self.proc_filter {
            f.add(pid);
        }
        let revision = self.slots.get(patch).map_or(0, |s| s.row.revision);
        let start_time = scan::start_time(pid).unwrap_or(0);
        let c = self.carriers.entry(pid).or_insert_with(|| Carrier {
            start_time,
            exe: scan::exe(pid),
            patches: BTreeMap::new(),
        });
        c.patches.insert(patch.to_string(), (revision, 0));
        let row = AppliedRow {
            pid,
            start_time,
            patch_id: patch.to_string(),
            revision,
            exe: c.exe.clone(),
            hits_reported: 0,
            applied_at: crate::now_unix(),
        };
        if let Err(e) = self.store.set_applied(&row) {
            self.store_failed(&e);
        }
    }

    /// Whether exec/exit events come from the proc connector.
    pub fn set_proc_connector(&mut self, on: bool) {
        self.proc_connector = on;
    }

    /// The engine (benchmarks read its digest cache).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn agent_enabled(&self) -> bool {
        !self.policy.agent_disabled
    }

    /// The patch may stay in processes (policy: agent, server, local, crash protection); where
    /// it must not, it is reverted.
    fn wanted(&self, id: &str) -> bool {
        !self.uninstalling
            && self.agent_enabled()
            && self.slots.get(id).is_some_and(|s| s.row.enabled())
    }

    /// The patch is applied where its target runs: wanted, and its bundle verified.
    fn desired(&self, id: &str) -> bool {
        self.wanted(id) && self.slots.get(id).is_some_and(|s| s.bundle.is_some())
    }

    /// Some patch must be looked for in every process that may hold a Stitch region, not only
    /// in those mapping a target: one whose bundle (hence target) is unknown, or all of them
    /// at uninstall.
    fn sweep_regions(&self) -> bool {
        self.uninstalling || self.slots.values().any(|s| s.bundle.is_none())
    }

    // ------------------------------------------------------------------ events & store

    fn store_failed(&mut self, e: &AgentError) {
        if self.store_error.as_deref() != Some(&e.to_string()) {
            tracing::error!(code = e.code(), error = %e, "local store write failed; keeping state in memory");
        }
        self.store_error = Some(e.to_string());
    }

    fn store_ok(&mut self) {
        if self.store_error.take().is_some() {
            tracing::info!("local store writable again");
        }
    }

    /// Records an event (outbox for the server, and the local log).
    pub fn event(&mut self, body: impl Into<Entry>) {
        let body = body.into();
        tracing::info!(event = %body.describe(), "event");
        self.unsaved.push(Event::now(body));
        self.flush_unsaved();
    }

    fn flush_unsaved(&mut self) {
        let mut wake = false;
        while let Some(e) = self.unsaved.first().cloned() {
            let deliver = e.body.deliverable().is_some();
            match self.store.push_event(&e, deliver) {
                Ok(()) => {
                    wake |= deliver;
                    self.unsaved.remove(0);
                    self.store_ok();
                }
                Err(err) => {
                    self.store_failed(&err);
                    // Keep at most a bounded backlog in memory.
                    if self.unsaved.len() > 10_000 {
                        self.unsaved.remove(0);
                    }
                    break;
                }
            }
        }
        if wake && let Some(f) = &self.outbox_wake {
            f();
        }
    }

    fn persist_slots(&mut self) {
        let mut errs = Vec::new();
        for s in self.slots.values_mut() {
            if !s.persisted
                && let Some(b) = &s.bundle
            {
                let bytes = b.bundle().encode();
                match self
                    .store
                    .put_bundle(&s.row.content_address, &bytes, &self.keys)
                {
                    Ok(_) => s.persisted = true,
                    Err(e) => {
                        errs.push(e);
                        continue;
                    }
                }
            }
            if let Err(e) = self.store.upsert_patch(&s.row) {
                errs.push(e);
            }
        }
        match errs.into_iter().next() {
            Some(e) => self.store_failed(&e),
            None => self.store_ok(),
        }
    }

    fn save_policy(&mut self) {
        match self.store.set_policy(&self.policy) {
            Ok(()) => self.store_ok(),
            Err(e) => self.store_failed(&e),
        }
    }

    // ------------------------------------------------------------------ installation

    /// Records `agent_installed` once per installation: on the first start with a fresh state
    /// directory (`fresh`), or the first start after `stitchd uninstall`. `installation.json`
    /// is written before the event and marked after it, and the event's id derives from the
    /// installation's, so a crash in between re-records the same event (the store and the
    /// server keep one). A store from before `installation.json` existed is an earlier
    /// installation: nothing is recorded for it.
    pub fn note_installation(&mut self, fresh: bool) {
        let previous = self.store.installation();
        let mut inst = match previous {
            Some(i) if i.uninstalled_at.is_none() => i,
            previous => {
                let i = crate::store::Installation {
                    id: crate::event::random_hex(),
                    installed_at: crate::now_unix(),
                    announced: previous.is_none() && !fresh,
                    uninstalled_at: None,
                };
                if let Err(e) = self.store.set_installation(&i) {
                    self.store_failed(&e);
                }
                i
            }
        };
        if inst.announced {
            return;
        }
        tracing::info!(installation = %inst.id, "new installation");
        self.unsaved.push(Event {
            id: format!("installed-{}", inst.id),
            occurred_at: inst.installed_at,
            body: EventBody::AgentInstalled {}.into(),
        });
        self.flush_unsaved();
        if self.unsaved.is_empty() {
            inst.announced = true;
            if let Err(e) = self.store.set_installation(&inst) {
                self.store_failed(&e);
            }
        }
    }

    /// Package removal: takes every patch of this agent out of every running process (no
    /// process is left carrying code whose agent is gone), marks the installation uninstalled
    /// and records `agent_uninstalled`. The agent must not be running (it would re-apply).
    /// Every process that may hold a Stitch region is looked at, so a patch whose stored
    /// bundle does not verify (target unknown) is reverted too, from its record there.
    pub fn uninstall(&mut self) -> UninstallOutcome {
        let before = self.metrics.reverted;
        self.uninstalling = true;
        self.revert_failures.clear();
        self.scan_all();
        let outcome = UninstallOutcome {
            reverted: self.metrics.reverted - before,
            failed: std::mem::take(&mut self.revert_failures),
            unverified: self
                .slots
                .iter()
                .filter(|(_, s)| s.bundle.is_none())
                .map(|(id, _)| id.clone())
                .collect(),
        };
        let now = crate::now_unix();
        let inst = self
            .store
            .installation()
            .unwrap_or_else(|| crate::store::Installation {
                id: crate::event::random_hex(),
                installed_at: now,
                announced: true,
                uninstalled_at: None,
            });
        let inst = crate::store::Installation {
            uninstalled_at: Some(now),
            ..inst
        };
        if let Err(e) = self.store.set_installation(&inst) {
            self.store_failed(&e);
        }
        self.event(EventBody::AgentUninstalled {});
        outcome
    }

    /// The state store's last write error, if writes fail now.
    pub fn store_error(&self) -> Option<&str> {
        self.store_error.as_deref()
    }

    /// Events recorded but not yet in the store (it failed).
    pub fn unsaved(&self) -> usize {
        self.unsaved.len()
    }

    // ------------------------------------------------------------------ start-up

    /// Applies every enabled patch to every running process that maps its target, and
    /// rediscovers what is already applied. Returns how long it took.
    pub fn startup(&mut self) -> Duration {
        let t0 = Instant::now();
        self.event(EventBody::AgentStarted {});
        self.scan_all();
        // Then the load-time hook, so processes started from now on are patched as they load.
        self.refresh_hook();
        self.sync_filter();
        let d = t0.elapsed();
        self.ready_after = Some(self.started.elapsed());
        tracing::info!(
            elapsed_ms = d.as_millis() as u64,
            processes = self.carriers.len(),
            patches = self.slots.len(),
            "start-up pass done"
        );
        d
    }

    // ------------------------------------------------------------------ scanning

    fn target_sizes(&self) -> HashSet<u64> {
        self.slots
            .values()
            .filter_map(|s| s.bundle.as_ref())
            .map(|b| b.patch().target.size)
            .collect()
    }

    /// Bundles re-verified for this pass: id -> bundle. A bundle that no longer verifies is
    /// reported and left out.
    fn pass_bundles(&mut self) -> BTreeMap<String, VerifiedBundle> {
        let mut out = BTreeMap::new();
        let mut failed = Vec::new();
        for (id, s) in &self.slots {
            // Never verified since the store was loaded: never applied.
            let Some(bundle) = &s.bundle else { continue };
            let r = if s.persisted {
                self.store.load_verified(&s.row.content_address, &self.keys)
            } else {
                Bundle::decode_verified(&bundle.bundle().encode(), &self.keys).map_err(|source| {
                    AgentError::Bundle {
                        content_address: s.row.content_address.clone(),
                        source,
                    }
                })
            };
            match r {
                Ok(b) => {
                    out.insert(id.clone(), b);
                }
                Err(e) => failed.push((id.clone(), s.row.revision, e)),
            }
        }
        for (id, rev, e) in failed {
            self.fail(&id, rev, None, &e);
            if let Some(s) = self.slots.get_mut(&id) {
                // Damaged on disk: fall back to the copy verified when it was loaded, and
                // write that back.
                s.persisted = false;
            }
        }
        out
    }

    /// Every process on the host.
    pub fn scan_all(&mut self) {
        let t0 = Instant::now();
        // Subscribe to process events before patching anything, so no exit is missed.
        self.sync_filter();
        let sizes = self.target_sizes();
        let pids = scan::pids();
        let n = pids.len();
        if !sizes.is_empty() || !self.carriers.is_empty() || self.sweep_regions() {
            // A full scan also refreshes what we know about file sizes.
            self.sizes = SizeCache::default();
            let candidates: Vec<Candidate> = pids
                .into_iter()
                .filter_map(|pid| self.candidate(pid, &sizes))
                .collect();
            let mut pass = Pass::default();
            self.visit_all(candidates, &mut pass);
            self.finish_pass(pass);
        }
        self.last_scan = Instant::now();
        self.metrics.scans += 1;
        self.metrics.last_scan_ms = t0.elapsed().as_millis() as u64;
        self.metrics.last_scan_processes = n as u64;
        // Forget carriers that are gone (an exit event may have been missed).
        let gone: Vec<i32> = self
            .carriers
            .keys()
            .copied()
            .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        for p in gone {
            self.depart(p);
        }
    }

    /// Some processes (due exec checks): one pass over all of them.
    fn check_some(&mut self, pids: &[i32]) {
        self.sync_filter();
        let sizes = self.target_sizes();
        if sizes.is_empty() {
            return;
        }
        let mut pass = Pass::default();
        let candidates: Vec<Candidate> = pids
            .iter()
            .filter_map(|&pid| self.candidate(pid, &sizes))
            .collect();
        self.visit_all(candidates, &mut pass);
        self.finish_pass(pass);
    }

    fn finish_pass(&mut self, pass: Pass) {
        if !pass.dirty.is_empty() {
            match self.store.set_applied_many(&pass.dirty) {
                Ok(()) => self.store_ok(),
                Err(e) => self.store_failed(&e),
            }
        }
        for id in pass.reverted.into_keys() {
            let revision = self.slots.get(&id).map_or(0, |s| s.row.revision);
            self.event(EventBody::PatchReverted {
                patch_id: id,
                revision: revision.into(),
            });
        }
        for (id, processes) in pass.applied {
            let revision = self.slots.get(&id).map_or(0, |s| s.row.revision);
            self.event(EventBody::PatchApplied {
                patch_id: id,
                revision: revision.into(),
                processes,
            });
        }
    }

    /// Whether `pid` must be looked at: it maps a file of a target's size, or carries our
    /// patches. Reads `/proc/PID/maps` (and `stat`s new inodes); no ptrace.
    fn candidate(&mut self, pid: i32, sizes: &HashSet<u64>) -> Option<Candidate> {
        let entries = scan::maps(pid)?;
        let mapped = self.sizes.module_sizes(pid, &entries);
        let hit = mapped.iter().any(|s| sizes.contains(s));
        let look = hit
            || self.carriers.contains_key(&pid)
            || (self.sweep_regions() && stitch_engine::may_hold_region(&entries));
        look.then_some(Candidate { pid, mapped })
    }

    /// Brings the candidates in line — rediscovers, applies what is missing, reverts what
    /// must not be there — on tracer threads in parallel ([`stitch_engine::fanout`], as
    /// `stitch apply --all`: one engine stop per thread at a time), then records what they
    /// did on this thread.
    fn visit_all(&mut self, candidates: Vec<Candidate>, pass: &mut Pass) {
        if candidates.is_empty() {
            return;
        }
        let views: Vec<SlotView> = self
            .slots
            .iter()
            .map(|(id, s)| SlotView {
                id: id.clone(),
                revision: s.row.revision,
                target_size: s.bundle.as_ref().map(|b| b.patch().target.size),
                wanted: self.wanted(id),
                desired: self.desired(id),
            })
            .collect();
        let may_apply = candidates.iter().any(|c| {
            views
                .iter()
                .any(|v| v.desired && v.target_size.is_some_and(|size| c.mapped.contains(&size)))
        });
        if may_apply && pass.bundles.is_none() {
            pass.bundles = Some(self.pass_bundles());
        }
        let empty = BTreeMap::new();
        let bundles = pass.bundles.as_ref().unwrap_or(&empty);
        let (engine, filter) = (&self.engine, self.proc_filter.as_deref());
        let visits = stitch_engine::fanout::par_map(
            &candidates,
            stitch_engine::fanout::jobs(candidates.len()),
            |c| visit(engine, filter, c, &views, bundles),
            |_| {},
        );
        for v in visits {
            self.record_visit(v, pass);
        }
    }

    /// What a tracer thread did in one process, recorded in the carriers, the store, the
    /// metrics and the events.
    fn record_visit(&mut self, v: Visit, pass: &mut Pass) {
        let Visit {
            pid,
            start_time,
            carried,
            reverted,
            applied,
            failed,
        } = v;
        let Some(carried) = carried else { return };
        let known = self
            .carriers
            .get(&pid)
            .filter(|c| c.start_time == start_time)
            .cloned();
        let exe = known
            .as_ref()
            .map(|c| c.exe.clone())
            .unwrap_or_else(|| scan::exe(pid));
        let mut carrier = Carrier {
            start_time,
            exe: exe.clone(),
            patches: BTreeMap::new(),
        };
        for (id, (rev, hits)) in &carried {
            // Hits already reported: from memory, else from the store (agent restart), else
            // all of them are new to us but not new attempts: count from now.
            let reported = known
                .as_ref()
                .and_then(|c| c.patches.get(id).map(|x| x.1))
                .or_else(|| {
                    pass.rows
                        .get_or_insert_with(|| {
                            self.store
                                .applied()
                                .unwrap_or_default()
                                .into_iter()
                                .map(|r| ((r.pid, r.start_time, r.patch_id), r.hits_reported))
                                .collect()
                        })
                        .get(&(pid, start_time, id.clone()))
                        .copied()
                })
                .unwrap_or(*hits);
            carrier
                .patches
                .insert(id.clone(), (*rev, reported.min(*hits)));
        }
        for id in reverted {
            self.metrics.reverted += 1;
            *pass.reverted.entry(id.clone()).or_default() += 1;
            carrier.patches.remove(&id);
            let _ = self.store.clear_applied(pid, Some(&id));
        }
        for (id, revision, new) in applied {
            carrier.patches.insert(id.clone(), (revision, 0));
            if new {
                self.metrics.applied += 1;
                *pass.applied.entry(id.clone()).or_default() += 1;
                if let Some(s) = self.slots.get_mut(&id) {
                    s.error = None;
                }
            }
        }
        for (id, revision, e) in failed {
            self.fail(&id, revision, Some(pid), &AgentError::Engine(e));
        }
        for (id, (rev, hits)) in &carrier.patches {
            let before = known.as_ref().and_then(|c| c.patches.get(id)).copied();
            if before != Some((*rev, *hits)) {
                pass.dirty.push(AppliedRow {
                    pid,
                    start_time,
                    patch_id: id.clone(),
                    revision: *rev,
                    exe: exe.clone(),
                    hits_reported: *hits,
                    applied_at: crate::now_unix(),
                });
            }
        }
        if carrier.patches.is_empty() {
            self.carriers.remove(&pid);
        } else {
            self.carriers.insert(pid, carrier);
        }
    }

    /// A carrier whose process is gone (seen by a scan, not by an exit event).
    fn depart(&mut self, pid: i32) {
        if let Some(c) = self.carriers.remove(&pid) {
            self.departed.insert(pid, (Instant::now(), c));
        }
        let _ = self.store.clear_applied(pid, None);
        let cutoff = Duration::from_secs(120);
        self.departed.retain(|_, (t, _)| t.elapsed() < cutoff);
    }

    fn fail(&mut self, id: &str, revision: u32, pid: Option<i32>, e: &AgentError) {
        self.fail_raw(id, revision, pid, e.code().to_string(), e.to_string());
    }

    fn fail_raw(
        &mut self,
        id: &str,
        revision: u32,
        pid: Option<i32>,
        code: String,
        message: String,
    ) {
        if code == "sys.already_traced" && self.load_time.active() {
            // Most likely held by the load-time hook right now; the hook reports its outcome.
            tracing::debug!(
                patch_id = id,
                ?pid,
                "process is traced (load-time hold?); skipped"
            );
            return;
        }
        *self.metrics.failures.entry(code.clone()).or_default() += 1;
        if let Some(s) = self.slots.get_mut(id) {
            s.error = Some((code.clone(), message.clone()));
        }
        if let (true, Some(pid)) = (self.uninstalling, pid) {
            self.revert_failures.push(RevertFailure {
                patch_id: id.to_string(),
                pid,
                code: code.clone(),
                message: message.clone(),
            });
        }
        let key = (pid.unwrap_or(0), id.to_string(), code.clone());
        if pid.is_some() && !self.reported.insert(key) {
            tracing::debug!(patch_id = id, ?pid, %code, "failure already reported");
            return;
        }
        tracing::warn!(patch_id = id, ?pid, %code, error = %message, "patch failed");
        self.event(EventBody::PatchFailed {
            patch_id: id.to_string(),
            revision: revision.into(),
            code,
            message,
        });
    }

    /// Reverts `id` in every process carrying it.
    fn revert_everywhere(&mut self, id: &str) -> usize {
        let revision = self.slots.get(id).map_or(0, |s| s.row.revision);
        let pids: Vec<i32> = self
            .carriers
            .iter()
            .filter(|(_, c)| c.patches.contains_key(id))
            .map(|(p, _)| *p)
            .collect();
        let mut n = 0;
        for pid in pids {
            match self.engine.revert(Pid(pid), id) {
                Ok(_) => {
                    n += 1;
                    self.metrics.reverted += 1;
                }
                Err(EngineError::NotApplied { .. }) => {}
                Err(EngineError::Sys(stitch_sys::SysError::NoSuchProcess { .. })) => {}
                Err(e) => {
                    self.fail(id, revision, Some(pid), &AgentError::Engine(e));
                    continue;
                }
            }
            if let Some(c) = self.carriers.get_mut(&pid) {
                c.patches.remove(id);
                if c.patches.is_empty() {
                    self.carriers.remove(&pid);
                }
            }
            let _ = self.store.clear_applied(pid, Some(id));
        }
        if n > 0 {
            self.event(EventBody::PatchReverted {
                patch_id: id.to_string(),
                revision: revision.into(),
            });
        }
        n
    }

    /// Reverts `id` (no longer wanted) in every process carrying it: the carriers known, and
    /// when its bundle does not verify — its target, hence which processes map it, unknown —
    /// every process that may hold a Stitch region (the engine reverts from the record there).
    fn take_out(&mut self, id: &str) {
        self.revert_everywhere(id);
        if self.slots.get(id).is_some_and(|s| s.bundle.is_none()) {
            self.scan_all();
        }
    }

    /// Reverts every patch that must not be applied, everywhere.
    fn revert_undesired(&mut self) {
        let mut ids: Vec<String> = self
            .carriers
            .values()
            .flat_map(|c| c.patches.keys().cloned())
            .collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            if !self.wanted(&id) {
                self.revert_everywhere(&id);
            }
        }
    }

    // ------------------------------------------------------------------ hit counters

    /// Reads the hit counters of every patched process; new hits become
    /// `exploit_blocked` events.
    pub fn poll_hits(&mut self) {
        self.last_hits = Instant::now();
        self.metrics.hit_reads += 1;
        let blocked_before = self.metrics.exploit_attempts_blocked;
        let pids: Vec<i32> = self.carriers.keys().copied().collect();
        for pid in pids {
            let listed = match self.engine.list(Pid(pid)) {
                Ok(l) => l,
                Err(_) => {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        self.depart(pid);
                    }
                    continue;
                }
            };
            let Some(c) = self.carriers.get(&pid).cloned() else {
                continue;
            };
            let mut updated = c.clone();
            for a in listed {
                let Some((rev, reported)) = c.patches.get(&a.record.id).copied() else {
                    continue;
                };
                if a.record.hits > reported {
                    let count = a.record.hits - reported;
                    self.metrics.exploit_attempts_blocked += count;
                    tracing::warn!(pid, patch_id = %a.record.id, exe = %c.exe, count, "exploit attempt blocked");
                    self.event(EventBody::ExploitBlocked {
                        patch_id: a.record.id.clone(),
                        pid: pid.into(),
                        exe: c.exe.clone(),
                        count: count as i64,
                    });
                    updated
                        .patches
                        .insert(a.record.id.clone(), (rev, a.record.hits));
                    let r = self.store.set_applied(&AppliedRow {
                        pid,
                        start_time: c.start_time,
                        patch_id: a.record.id.clone(),
                        revision: rev,
                        exe: c.exe.clone(),
                        hits_reported: a.record.hits,
                        applied_at: crate::now_unix(),
                    });
                    if let Err(e) = r {
                        self.store_failed(&e);
                    }
                }
            }
            self.carriers.insert(pid, updated);
        }
        // Nothing hit: read less often (an idle host wakes the agent rarely); a hit: often.
        self.hits_every = if self.metrics.exploit_attempts_blocked > blocked_before {
            self.cfg.hits_interval()
        } else {
            (self.hits_every() * 2).min(self.cfg.hits_max_interval())
        };
    }

    fn hits_every(&self) -> Duration {
        self.hits_every.max(self.cfg.hits_interval())
    }

    // ------------------------------------------------------------------ process events

    fn on_proc(&mut self, e: ProcEvent) {
        match e {
            ProcEvent::Exec { pid } => {
                // The old image (and its patches) is gone. Events come in batches, so the
                // load-time hook may already have patched the new image (and registered it):
                // keep what the process carries now.
                if let Some(mut c) = self.carriers.remove(&pid) {
                    let now: HashSet<String> = self
                        .engine
                        .list(Pid(pid))
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|a| a.record.state == stitch_engine::region::RecordState::Applied)
                        .map(|a| a.record.id)
                        .collect();
                    c.patches.retain(|id, _| now.contains(id));
                    let _ = self.store.clear_applied(pid, None);
                    if !c.patches.is_empty() {
                        let rows: Vec<AppliedRow> = c
                            .patches
                            .iter()
                            .map(|(id, (revision, hits))| AppliedRow {
                                pid,
                                start_time: c.start_time,
                                patch_id: id.clone(),
                                revision: *revision,
                                exe: c.exe.clone(),
                                hits_reported: *hits,
                                applied_at: crate::now_unix(),
                            })
                            .collect();
                        if let Err(e) = self.store.set_applied_many(&rows) {
                            self.store_failed(&e);
                        }
                        self.carriers.insert(pid, c);
                    }
                }
                if self.agent_enabled() && self.slots.values().any(|s| s.row.enabled()) {
                    // The loader maps libraries right after exec: look a little later, and
                    // again once start-up code has run (load-time hook gap, see docs/agent.md).
                    let now = Instant::now();
                    // With the load-time hook, targets in watched directories are patched
                    // before they run; look once after any hold is over, for the rest.
                    let delays: &[u64] = if self.load_time.active() {
                        &[1000]
                    } else {
                        &[50, 1000]
                    };
                    for &d in delays {
                        self.pending.push((self.tick_after(now, d), pid));
                    }
                }
            }
            ProcEvent::Fork { parent, child } => {
                if let Some(c) = self.carriers.get(&parent).cloned() {
                    let mut c = c;
                    c.start_time = scan::start_time(child).unwrap_or(0);
                    for v in c.patches.values_mut() {
                        v.1 = 0;
                    }
                    self.carriers.insert(child, c);
                    // The child's hit counters are copies: count from what it has now.
                    self.pending
                        .push((Instant::now() + Duration::from_millis(50), child));
                }
            }
            ProcEvent::Exit { pid, signal, .. } => {
                let Some(c) = self
                    .carriers
                    .remove(&pid)
                    .or_else(|| self.departed.remove(&pid).map(|x| x.1))
                else {
                    return;
                };
                let _ = self.store.clear_applied(pid, None);
                let Some(sig) = signal else { return };
                if ![11, 7, 4, 6].contains(&sig) {
                    return;
                }
                self.metrics.crashes_seen += 1;
                for id in c.patches.keys() {
                    self.on_crash(id, pid, &c.exe, sig);
                }
            }
        }
    }

    fn on_crash(&mut self, id: &str, pid: i32, exe: &str, signal: i32) {
        self.event(EventBody::PatchedProcessCrashed {
            patch_id: id.to_string(),
            pid: pid.into(),
            exe: exe.to_string(),
            signal: signal.into(),
        });
        let window = Duration::from_secs(self.cfg.crash.window_s.max(1));
        let now = Instant::now();
        let list = self.crashes.entry(id.to_string()).or_default();
        list.retain(|t| now.duration_since(*t) < window);
        list.push(now);
        let count = list.len() as u32;
        if count < self.cfg.crash.threshold.max(1) || !self.slots.contains_key(id) {
            return;
        }
        let reason = format!(
            "{count} processes carrying the patch crashed (last: {exe} pid {pid}, signal {signal}) within {}s",
            window.as_secs()
        );
        tracing::error!(patch_id = id, %reason, "crash protection: disabling the patch on this host");
        self.policy
            .crash_disabled
            .insert(id.to_string(), reason.clone());
        self.save_policy();
        let revision = if let Some(s) = self.slots.get_mut(id) {
            s.row.crash_disabled = Some(reason.clone());
            s.row.revision
        } else {
            0
        };
        self.persist_slots();
        self.crashes.remove(id);
        self.take_out(id);
        self.event(EventBody::PatchFailed {
            patch_id: id.to_string(),
            revision: revision.into(),
            code: "agent.crash_protection".into(),
            message: reason,
        });
    }

    fn run_pending(&mut self) {
        let now = Instant::now();
        let mut due: Vec<i32> = self
            .pending
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, p)| *p)
            .collect();
        if due.is_empty() {
            return;
        }
        self.pending.retain(|(t, _)| *t > now);
        due.sort_unstable();
        due.dedup();
        self.metrics.exec_checks += due.len() as u64;
        self.check_some(&due);
    }

    /// `ms` after `now`, rounded up to the agent's 100 ms tick: the checks of processes
    /// started close together are done in one wakeup and one pass (a busy host execs hundreds
    /// of times a second).
    fn tick_after(&self, now: Instant, ms: u64) -> Instant {
        let at = now.duration_since(self.started) + Duration::from_millis(ms);
        let ticks = at.as_millis().div_ceil(100) as u64;
        self.started + Duration::from_millis(ticks * 100)
    }

    // ------------------------------------------------------------------ manifest

    fn on_manifest(&mut self, payload: ManifestPayload, bundles: Vec<(String, Vec<u8>)>) {
        let mut by_ca: HashMap<String, Vec<u8>> = bundles.into_iter().collect();
        let mut wanted = HashSet::new();
        let mut need_scan = false;
        for entry in &payload.patches {
            wanted.insert(entry.patch_id.clone());
            // (A slot whose bundle does not verify is loaded again: downloaded anew, or a key
            // trusted again.)
            let same = self.slots.get(&entry.patch_id).is_some_and(|s| {
                s.row.content_address == entry.content_address && s.bundle.is_some()
            });
            if same {
                let was = self.desired(&entry.patch_id);
                if let Some(s) = self.slots.get_mut(&entry.patch_id)
                    && s.row.server_enabled != entry.enabled
                {
                    s.row.server_enabled = entry.enabled;
                    tracing::info!(patch_id = %entry.patch_id, enabled = entry.enabled, "server policy changed");
                }
                need_scan |= !was && self.desired(&entry.patch_id);
                continue;
            }
            // New patch or new revision.
            if !by_ca.contains_key(&entry.content_address)
                && !self.store.has_bundle(&entry.content_address)
            {
                // Refused at download (already reported) or not fetched yet: keep what we
                // have for this patch, if anything (the server's policy applies to it).
                if let Some(s) = self.slots.get_mut(&entry.patch_id) {
                    s.row.server_enabled = entry.enabled;
                }
                continue;
            }
            let loaded = match by_ca.remove(&entry.content_address) {
                Some(bytes) => {
                    match self
                        .store
                        .put_bundle(&entry.content_address, &bytes, &self.keys)
                    {
                        Ok(vb) => Ok((vb, true)),
                        Err(e @ (AgentError::DiskFull { .. } | AgentError::Io { .. })) => {
                            self.store_failed(&e);
                            crate::store::verify_bundle(&entry.content_address, &bytes, &self.keys)
                                .map(|vb| (vb, false))
                        }
                        Err(e) => Err(e),
                    }
                }
                None => self
                    .store
                    .load_verified(&entry.content_address, &self.keys)
                    .map(|vb| (vb, true)),
            };
            let (bundle, persisted) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    self.fail_entry(entry, e.code(), &e.to_string());
                    if let Some(s) = self.slots.get_mut(&entry.patch_id) {
                        s.row.server_enabled = entry.enabled;
                    }
                    continue;
                }
            };
            let p = bundle.patch();
            if p.id != entry.patch_id || i64::from(p.revision) != entry.revision {
                self.fail_entry(
                    entry,
                    "agent.manifest_mismatch",
                    &format!(
                        "bundle holds {} r{}, manifest says {} r{}",
                        p.id, p.revision, entry.patch_id, entry.revision
                    ),
                );
                continue;
            }
            if self
                .slots
                .get(&entry.patch_id)
                .is_some_and(|s| s.row.content_address != entry.content_address)
            {
                // A new revision replaces the old one: take the old one out first.
                self.revert_everywhere(&entry.patch_id);
            }
            let row = InstalledPatch {
                patch_id: entry.patch_id.clone(),
                revision: p.revision,
                content_address: entry.content_address.clone(),
                server_enabled: entry.enabled,
                local_enabled: !self.policy.patches_disabled.contains(&entry.patch_id),
                crash_disabled: self.policy.crash_disabled.get(&entry.patch_id).cloned(),
                title: p.title.clone(),
                installed_at: crate::now_unix(),
            };
            self.event(EventBody::PatchInstalled {
                patch_id: row.patch_id.clone(),
                revision: row.revision.into(),
            });
            self.slots.insert(
                entry.patch_id.clone(),
                Slot {
                    row,
                    bundle: Some(bundle),
                    persisted,
                    error: None,
                    unverified: None,
                },
            );
            need_scan = true;
        }
        // Patches the server no longer lists for this host are uninstalled.
        let gone: Vec<String> = self
            .slots
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!(patch_id = %id, "no longer in the manifest; uninstalling");
            if let Some(s) = self.slots.get_mut(&id) {
                s.row.server_enabled = false;
            }
            self.take_out(&id);
            if !self.processes_of(&id).is_empty() {
                // A process refused the revert (reported): keep the patch known, disabled, so
                // the next manifest (or disable, uninstall) tries again; nothing is left
                // behind that the agent no longer knows.
                tracing::warn!(patch_id = %id, "still in processes; kept until reverted everywhere");
                continue;
            }
            self.slots.remove(&id);
            if let Err(e) = self.store.remove_patch(&id) {
                self.store_failed(&e);
            }
            self.event(Entry::local(format!(
                "{id} uninstalled (no longer in the server's manifest)"
            )));
        }
        self.persist_slots();
        let stored = StoredManifest {
            version: payload.version,
            expires_at: payload.expires_at,
            entries: payload.patches.clone(),
        };
        if let Err(e) = self.store.set_manifest(&stored) {
            self.store_failed(&e);
        }
        self.sync.manifest_version = Some(payload.version);
        self.revert_undesired();
        if need_scan {
            self.scan_all();
        }
    }

    fn fail_entry(&mut self, entry: &ManifestEntry, code: &str, message: &str) {
        tracing::warn!(patch_id = %entry.patch_id, code, message, "bundle refused");
        *self.metrics.failures.entry(code.to_string()).or_default() += 1;
        let key = (
            0,
            format!("{}@{}", entry.patch_id, entry.content_address),
            code.to_string(),
        );
        if self.reported.insert(key) {
            self.event(EventBody::PatchFailed {
                patch_id: entry.patch_id.clone(),
                revision: entry.revision,
                code: code.to_string(),
                message: message.to_string(),
            });
        }
    }

    // ------------------------------------------------------------------ actions

    /// Handles one action.
    pub fn handle(&mut self, a: AgentAction) -> Reply {
        match a {
            AgentAction::Status => Ok(self.status()),
            AgentAction::Patches => Ok(json!({ "patches": self.patches_json() })),
            AgentAction::Events { limit } => {
                let ev = self
                    .store
                    .recent_events(limit.min(10_000))
                    .map_err(|e| (e.code().to_string(), e.to_string()))?;
                let mut out: Vec<Value> = self
                    .unsaved
                    .iter()
                    .rev()
                    .map(|e| json!({ "id": e.id, "occurred_at": e.occurred_at, "delivered": false, "description": e.body.describe(), "event": e }))
                    .collect();
                out.extend(ev.iter().map(|s| {
                    json!({ "id": s.event.id, "occurred_at": s.event.occurred_at, "delivered": s.delivered || s.event.body.deliverable().is_none(), "description": s.event.body.describe(), "event": s.event })
                }));
                out.truncate(limit);
                Ok(json!({ "events": out }))
            }
            AgentAction::Enable { patch: None } => {
                if self.policy.agent_disabled {
                    self.policy.agent_disabled = false;
                    self.save_policy();
                    self.event(EventBody::AgentEnabled {});
                    self.scan_all();
                }
                Ok(self.status())
            }
            AgentAction::Disable { patch: None } => {
                if !self.policy.agent_disabled {
                    self.policy.agent_disabled = true;
                    self.save_policy();
                    self.revert_undesired();
                    if self.sweep_regions() {
                        // Patches whose bundle does not verify, in processes not known yet.
                        self.scan_all();
                    }
                    self.event(EventBody::AgentDisabled {});
                }
                Ok(self.status())
            }
            AgentAction::Enable { patch: Some(id) } => {
                let Some(s) = self.slots.get_mut(&id) else {
                    return Err(unknown(&id));
                };
                s.row.local_enabled = true;
                // An explicit enable also clears a crash-protection disable.
                s.row.crash_disabled = None;
                self.policy.patches_disabled.remove(&id);
                self.policy.crash_disabled.remove(&id);
                self.crashes.remove(&id);
                self.save_policy();
                self.persist_slots();
                self.scan_all();
                Ok(json!({ "patches": self.patches_json() }))
            }
            AgentAction::Disable { patch: Some(id) } => {
                let Some(s) = self.slots.get_mut(&id) else {
                    return Err(unknown(&id));
                };
                s.row.local_enabled = false;
                self.policy.patches_disabled.insert(id.clone());
                self.save_policy();
                self.persist_slots();
                self.take_out(&id);
                Ok(json!({ "patches": self.patches_json() }))
            }
            AgentAction::Sync => {
                self.persist_slots();
                self.flush_unsaved();
                if let Some(f) = &self.sync_now {
                    f();
                }
                self.scan_all();
                Ok(self.status())
            }
        }
    }

    fn processes_of(&self, id: &str) -> Vec<(i32, &Carrier)> {
        let mut v: Vec<(i32, &Carrier)> = self
            .carriers
            .iter()
            .filter(|(_, c)| c.patches.contains_key(id))
            .map(|(p, c)| (*p, c))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    fn relevant(&self, s: &Slot) -> Option<bool> {
        let pk = &s.bundle.as_ref()?.patch().target.package;
        self.packages.as_ref().map(|set| {
            set.contains(&(
                pk.ecosystem.as_str().to_string(),
                pk.name.clone(),
                pk.version.clone(),
            ))
        })
    }

    fn state_of(&self, id: &str, s: &Slot) -> (&'static str, i64) {
        let n = self.processes_of(id).len() as i64;
        let st = if !self.wanted(id) {
            "disabled"
        } else if s.unverified.is_some() {
            // Never applied; possibly still in processes (listed), from before.
            "unverified"
        } else if n > 0 {
            "applied"
        } else if s.error.is_some() {
            "failed"
        } else {
            "pending"
        };
        (st, n)
    }

    fn patches_json(&self) -> Vec<Value> {
        self.slots
            .iter()
            .map(|(id, s)| {
                let (state, _) = self.state_of(id, s);
                let t = s.bundle.as_ref().map(|b| &b.patch().target);
                let procs: Vec<Value> = self
                    .processes_of(id)
                    .iter()
                    .map(|(pid, c)| json!({ "pid": pid, "exe": c.exe, "hits": c.patches.get(id).map_or(0, |x| x.1) }))
                    .collect();
                json!({
                    "patch_id": id,
                    "revision": s.row.revision,
                    "title": s.row.title,
                    "state": state,
                    "enabled": self.wanted(id),
                    "server_enabled": s.row.server_enabled,
                    "local_enabled": s.row.local_enabled,
                    "crash_disabled": s.row.crash_disabled,
                    "content_address": s.row.content_address,
                    "persisted": s.persisted,
                    "module": t.map(|t| &t.module),
                    "target_sha256": t.map(|t| hex::encode(t.sha256)),
                    "package": t.map(|t| json!({ "ecosystem": t.package.ecosystem.as_str(), "name": t.package.name, "version": t.package.version })),
                    "relevant": self.relevant(s),
                    "processes": procs,
                    "bundle_verified": s.bundle.is_some(),
                    "unverified": s.unverified.as_ref().map(|(c, m)| json!({ "code": c, "message": m })),
                    "error": s.error.as_ref().map(|(c, m)| json!({ "code": c, "message": m })),
                })
            })
            .collect()
    }

    fn status(&self) -> Value {
        let unverified: Vec<Value> = self
            .slots
            .iter()
            .filter_map(|(id, s)| {
                let (code, message) = s.unverified.as_ref()?;
                Some(json!({ "patch_id": id, "code": code, "message": message, "processes": self.processes_of(id).len() }))
            })
            .collect();
        // `stitch agent status` prints the store's error: a write error, else the bundles that
        // no longer verify.
        let store_error = self.store_error.clone().or_else(|| {
            (!unverified.is_empty()).then(|| {
                let list: Vec<String> = unverified
                    .iter()
                    .map(|u| format!("{} [{}]", u["patch_id"].as_str().unwrap_or(""), u["code"].as_str().unwrap_or("")))
                    .collect();
                format!(
                    "{} stored bundle(s) do not verify, never applied (disable, removal or uninstall still reverts them): {}",
                    list.len(),
                    list.join(", ")
                )
            })
        });
        json!({
            "agent_version": env!("CARGO_PKG_VERSION"),
            "agent_enabled": self.agent_enabled(),
            "server_url": self.cfg.server_url,
            "server": self.sync,
            "patches_installed": self.slots.len(),
            "patches_enabled": self.slots.keys().filter(|id| self.wanted(id)).count(),
            "patches_unverified": unverified,
            "processes_patched": self.carriers.len(),
            "outbox": self.store.outbox_len().unwrap_or(0) + self.unsaved.len() as u64,
            "store": { "dir": self.store.dir(), "error": store_error, "write_error": self.store_error },
            "ready_after_ms": self.ready_after.map(|d| d.as_millis() as u64),
            "uptime_s": self.started.elapsed().as_secs(),
            "new_processes": if self.proc_connector { "proc connector exec events + periodic scan" } else { "periodic scan only (proc connector unavailable)" },
            "load_time_hook": self.load_time.state(),
            "metrics": self.metrics,
        })
    }

    fn heartbeat_parts(&self) -> HeartbeatParts {
        let patches = self
            .slots
            .iter()
            .map(|(id, s)| {
                let (state, n) = self.state_of(id, s);
                // The server knows applied|failed|disabled|pending: a bundle that does not
                // verify is a failure with its code.
                let (state, error) = match state {
                    "unverified" => ("failed", s.unverified.as_ref()),
                    "failed" => ("failed", s.error.as_ref()),
                    other => (other, None),
                };
                PatchState {
                    patch_id: id.clone(),
                    revision: s.row.revision.into(),
                    state: state.into(),
                    processes: n,
                    error_code: error.map(|e| e.0.clone()),
                }
            })
            .collect();
        HeartbeatParts {
            agent_enabled: self.agent_enabled(),
            patches,
        }
    }

    // ------------------------------------------------------------------ the loop

    /// Time until the next timer-driven work.
    pub fn next_deadline(&self) -> Duration {
        let now = Instant::now();
        let mut next = self.last_scan + self.cfg.scan_interval();
        if !self.carriers.is_empty() {
            next = next.min(self.last_hits + self.hits_every());
        }
        if let Some(p) = self.pending.iter().map(|x| x.0).min() {
            next = next.min(p);
        }
        if !self.hook_applied.is_empty() {
            next = next.min(self.last_hook_flush + Duration::from_secs(10));
        }
        next.saturating_duration_since(now)
    }

    /// Runs timer-driven work that is due.
    pub fn tick(&mut self) {
        self.tick_inner();
        self.sync_filter();
    }

    fn tick_inner(&mut self) {
        let now = Instant::now();
        self.run_pending();
        if !self.carriers.is_empty() && now >= self.last_hits + self.hits_every() {
            self.poll_hits();
        }
        if !self.hook_applied.is_empty()
            && now.duration_since(self.last_hook_flush) >= Duration::from_secs(10)
        {
            self.last_hook_flush = now;
            let applied = std::mem::take(&mut self.hook_applied);
            let pass = Pass {
                applied,
                ..Default::default()
            };
            self.finish_pass(pass);
        }
        if now >= self.last_scan + self.cfg.scan_interval() {
            self.scan_all();
        }
        if !self.unsaved.is_empty() || self.slots.values().any(|s| !s.persisted) {
            self.persist_slots();
            self.flush_unsaved();
        }
    }

    /// Handles one input; false on shutdown.
    pub fn input(&mut self, i: Input) -> bool {
        match i {
            Input::Action(a, reply) => {
                let r = self.handle(a);
                let _ = reply.send(r);
            }
            Input::Proc(batch) => {
                self.metrics.proc_events += batch.len() as u64;
                for e in batch {
                    self.on_proc(e);
                }
            }
            Input::Rescan => self.scan_all(),
            Input::Manifest { payload, bundles } => self.on_manifest(payload, bundles),
            Input::BundleRejected {
                entry,
                code,
                message,
            } => self.fail_entry(&entry, &code, &message),
            Input::Sync(s) => {
                let version = self.sync.manifest_version;
                self.sync = s;
                if self.sync.manifest_version.is_none() {
                    self.sync.manifest_version = version;
                }
            }
            Input::Packages(p) => {
                self.packages = Some(
                    p.into_iter()
                        .map(|p| (p.ecosystem, p.name, p.version))
                        .collect(),
                );
            }
            Input::Heartbeat(reply) => {
                let _ = reply.send(self.heartbeat_parts());
            }
            Input::Hook(e) => self.on_hook(e),
            Input::Shutdown => {
                self.event(EventBody::AgentStopped {});
                self.load_time.shutdown();
                self.wedged = self.load_time.wedged;
                return false;
            }
        }
        self.refresh_hook();
        self.sync_filter();
        if self.load_time.wedged {
            tracing::error!(
                "stitch-hook could not be stopped (a hold is blocked); exiting so the kernel releases every held process (systemd restarts the agent, which rediscovers its patches)"
            );
            self.event(Entry::local(
                "load-time hook wedged while stopping; agent exits to release held processes",
            ));
            self.wedged = true;
            return false;
        }
        true
    }
}

/// A process to visit (see [`Controller::candidate`]).
struct Candidate {
    pid: i32,
    /// Sizes of the file-backed modules it maps.
    mapped: Vec<u64>,
}

/// What a tracer thread needs to know of an installed patch.
struct SlotView {
    id: String,
    revision: u32,
    /// None: the bundle did not verify (the target is unknown; never applied).
    target_size: Option<u64>,
    /// May stay in processes ([`Controller::wanted`]); reverted where it must not be.
    wanted: bool,
    /// Applied where its target runs ([`Controller::desired`]).
    desired: bool,
}

/// What a tracer thread did in one process ([`visit`]).
struct Visit {
    pid: i32,
    start_time: u64,
    /// Our patches it carried when listed: id -> (revision, hits). None: it could not be
    /// listed (gone, or not ours to trace) and nothing was done.
    carried: Option<BTreeMap<String, (u32, u64)>>,
    /// Reverted now.
    reverted: Vec<String>,
    /// (id, revision, applied now — false: the engine found it already there).
    applied: Vec<(String, u32, bool)>,
    failed: Vec<(String, u32, EngineError)>,
}

/// One process, on a tracer thread: lists what it carries (rediscovery; this is also why
/// nothing is applied twice), reverts what must not be there (undesired, or another
/// revision), applies each desired patch whose target size it maps. Touches no controller
/// state: [`Controller::record_visit`] records the outcome.
fn visit(
    engine: &Engine,
    filter: Option<&crate::procconn::ProcFilter>,
    c: &Candidate,
    slots: &[SlotView],
    bundles: &BTreeMap<String, VerifiedBundle>,
) -> Visit {
    let pid = c.pid;
    let mut v = Visit {
        pid,
        start_time: 0,
        carried: None,
        reverted: Vec::new(),
        applied: Vec::new(),
        failed: Vec::new(),
    };
    let listed = match engine.list(Pid(pid)) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot list patches of process");
            return v;
        }
    };
    v.start_time = scan::start_time(pid).unwrap_or(0);
    // Patches not installed here (applied by hand with `stitch apply`) are left alone.
    let carried: BTreeMap<String, (u32, u64)> = listed
        .iter()
        .filter(|a| a.record.state == stitch_engine::region::RecordState::Applied)
        .filter(|a| slots.iter().any(|s| s.id == a.record.id))
        .map(|a| (a.record.id.clone(), (a.record.revision, a.record.hits)))
        .collect();
    let mut has: HashSet<&str> = carried.keys().map(String::as_str).collect();
    for s in slots {
        // Reverted where it must not be, or to make room for another revision that will be
        // applied; a patch whose bundle no longer verifies stays where it is until then
        // (taking it out would leave the process unprotected with nothing to replace it).
        if let Some((r, _)) = carried.get(&s.id)
            && (!s.wanted || (s.desired && *r != s.revision))
        {
            match engine.revert(Pid(pid), &s.id) {
                Ok(rep) => {
                    tracing::info!(pid, patch_id = %s.id, hits = rep.hits, "reverted");
                    has.remove(s.id.as_str());
                    v.reverted.push(s.id.clone());
                }
                Err(e) => {
                    v.failed.push((s.id.clone(), s.revision, e));
                    continue;
                }
            }
        }
        let maps_target = s.target_size.is_some_and(|size| c.mapped.contains(&size));
        if !s.desired || has.contains(s.id.as_str()) || !maps_target {
            continue;
        }
        let Some(bundle) = bundles.get(&s.id) else {
            continue;
        };
        if let Some(f) = filter {
            f.add(pid);
        }
        match engine.apply(Pid(pid), bundle) {
            Ok(rep) => {
                tracing::info!(pid, patch_id = %s.id, pause_us = rep.pause.as_micros() as u64, "applied");
                v.applied.push((s.id.clone(), s.revision, true));
            }
            // Same size, different file (a replaced or other build): not a target.
            Err(EngineError::ModuleNotMapped { .. }) => {}
            Err(EngineError::AlreadyApplied { .. }) => {
                v.applied.push((s.id.clone(), s.revision, false));
            }
            Err(e) => v.failed.push((s.id.clone(), s.revision, e)),
        }
    }
    v.carried = Some(carried);
    v
}

fn unknown(id: &str) -> (String, String) {
    let e = AgentError::UnknownPatch { id: id.into() };
    (e.code().into(), e.to_string())
}

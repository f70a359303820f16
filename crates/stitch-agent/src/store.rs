//! The local store under the state directory (default `/var/lib/stitch`):
//!
//! ```text
//! bundles/<content address>.stitch   signed bundles, immutable, named by SHA-256 of their bytes
//! manifest.json                      the last manifest accepted from the server (payload)
//! policy.json                        local decisions: agent on/off, patches disabled here
//! identity.json  (0600)              agent id, credential, pinned server key
//! installation.json                  this installation's id; agent_installed recorded or not
//! state.db       (0600)              SQLite: installed patches, where applied, event outbox
//! ```
//!
//! Invariants:
//! - Every file is written through a temporary file in the same directory, `fsync`ed and
//!   renamed over the old one (then the directory is `fsync`ed): after a power loss a file is
//!   either the old or the new version, never half of one. SQLite runs in WAL mode with
//!   `synchronous=FULL`.
//! - The database is an index that can be lost: bundles, `manifest.json` and `policy.json` are
//!   enough to rebuild it. A database that fails to open or fails `PRAGMA quick_check` is moved
//!   aside and rebuilt ([`Store::open`] reports it in [`OpenReport`]); a patch of
//!   `manifest.json` whose bundle is gone keeps a row. A bundle whose bytes no longer hash to
//!   its name is deleted (it is downloaded again); its patch's row is kept (the controller
//!   never applies it, and still reverts it).
//! - A bundle is verified against the trusted keys when it is stored *and* each time it is
//!   loaded for an apply ([`Store::load_verified`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use stitch_format::{Bundle, TrustedKeys, VerifiedBundle};

use crate::error::{AgentError, Result};
use crate::event::{Entry, Event};

/// One installed patch as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledPatch {
    pub patch_id: String,
    pub revision: u32,
    pub content_address: String,
    /// The server's manifest says enabled (approved and not disabled by policy).
    pub server_enabled: bool,
    /// Not disabled locally with `stitch agent disable PATCH`.
    pub local_enabled: bool,
    /// Why crash protection disabled it on this host, if it did.
    pub crash_disabled: Option<String>,
    pub title: String,
    pub installed_at: i64,
}

impl InstalledPatch {
    /// Whether the patch should be in running processes (the agent itself being enabled is
    /// checked separately).
    pub fn enabled(&self) -> bool {
        self.server_enabled && self.local_enabled && self.crash_disabled.is_none()
    }
}

/// Local decisions, mirrored in `policy.json` so a lost database does not lose them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPolicy {
    pub agent_disabled: bool,
    pub patches_disabled: BTreeSet<String>,
    pub crash_disabled: BTreeMap<String, String>,
}

/// What the agent learnt at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub agent_id: String,
    pub credential: String,
    /// The server's manifest key (`ed25519:...`), pinned at enrollment.
    pub server_key: String,
    pub server_url: String,
}

/// This installation of the agent (`installation.json`): `agent_installed` is recorded once per
/// installation, `agent_uninstalled` when the package is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installation {
    /// Random; the `agent_installed` event's id derives from it (re-recording is idempotent).
    pub id: String,
    pub installed_at: i64,
    /// `agent_installed` is in the outbox (or was never due: a store from before this file).
    pub announced: bool,
    /// `stitchd uninstall` ran: the next start is a new installation.
    #[serde(default)]
    pub uninstalled_at: Option<i64>,
}

/// The last accepted manifest, as kept in `manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredManifest {
    pub version: i64,
    pub expires_at: i64,
    pub entries: Vec<crate::sync::ManifestEntry>,
}

/// A row of the `applied` table: where a patch is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRow {
    pub pid: i32,
    pub start_time: u64,
    pub patch_id: String,
    pub revision: u32,
    pub exe: String,
    pub hits_reported: u64,
    pub applied_at: i64,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub delivered: bool,
    #[serde(flatten)]
    pub event: Event,
}

/// What [`Store::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The database was unusable, moved aside to this path, and rebuilt.
    pub rebuilt_from: Option<PathBuf>,
    /// Why it was unusable.
    pub reason: Option<String>,
    /// Bundle files deleted because their bytes no longer match their name.
    pub bad_bundles: Vec<String>,
    /// The state directory held no database and no identity: a first start.
    pub fresh: bool,
}

/// The local store.
pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patches(
  patch_id TEXT PRIMARY KEY,
  revision INTEGER NOT NULL,
  content_address TEXT NOT NULL,
  server_enabled INTEGER NOT NULL,
  local_enabled INTEGER NOT NULL DEFAULT 1,
  crash_disabled TEXT,
  title TEXT NOT NULL DEFAULT '',
  installed_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied(
  pid INTEGER NOT NULL,
  start_time INTEGER NOT NULL,
  patch_id TEXT NOT NULL,
  revision INTEGER NOT NULL,
  exe TEXT NOT NULL,
  hits_reported INTEGER NOT NULL,
  applied_at INTEGER NOT NULL,
  PRIMARY KEY(pid, start_time, patch_id));
CREATE TABLE IF NOT EXISTS events(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  occurred_at INTEGER NOT NULL,
  body TEXT NOT NULL,
  deliver INTEGER NOT NULL,
  delivered INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS events_outbox ON events(delivered, deliver, seq);
";

/// Delivered events kept for `stitch agent events`.
const KEEP_DELIVERED: i64 = 1000;

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(AgentError::io("write", path))
}

fn now() -> i64 {
    crate::now_unix()
}

impl Store {
    /// Opens (creating) the store in `dir`; an unusable database is moved aside and rebuilt
    /// from bundles, `manifest.json` and `policy.json`.
    pub fn open(dir: &Path) -> Result<(Store, OpenReport)> {
        for d in [dir.to_path_buf(), dir.join("bundles")] {
            std::fs::create_dir_all(&d).map_err(AgentError::io("create", &d))?;
        }
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let db_path = dir.join("state.db");
        let mut report = OpenReport {
            fresh: !db_path.exists() && !dir.join("identity.json").exists(),
            ..Default::default()
        };
        let conn = match Self::open_db(&db_path) {
            Ok(c) => c,
            Err(reason) => {
                let aside = dir.join(format!("state.db.corrupt-{}", now()));
                tracing::warn!(path = %db_path.display(), %reason, aside = %aside.display(), "state database unusable; rebuilding from bundles");
                let _ = std::fs::rename(&db_path, &aside);
                for ext in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(dir.join(format!("state.db{ext}")));
                }
                report.rebuilt_from = Some(aside);
                report.reason = Some(reason);
                Self::open_db(&db_path).map_err(|reason| AgentError::Config {
                    path: db_path.clone(),
                    reason: format!("cannot create a fresh state database: {reason}"),
                })?
            }
        };
        let mut store = Store {
            dir: dir.to_path_buf(),
            db_path,
            conn,
        };
        report.bad_bundles = store.check_bundles();
        if report.rebuilt_from.is_some() {
            store.rebuild()?;
        }
        Ok((store, report))
    }

    fn open_db(path: &Path) -> std::result::Result<Connection, String> {
        let fresh = !path.exists();
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        if fresh {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        if check != "ok" {
            return Err(format!("quick_check: {check}"));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| e.to_string())?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| e.to_string())?;
        conn.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
        // The schema must be ours (a database from something else, or a damaged one).
        conn.query_row(
            "SELECT count(*) FROM patches JOIN applied ON 0 JOIN events ON 0",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| format!("schema: {e}"))?;
        Ok(conn)
    }

    /// A second connection to the same database (for the reporter thread).
    pub fn reopen(&self) -> Result<Store> {
        let conn = Self::open_db(&self.db_path).map_err(|reason| AgentError::Config {
            path: self.db_path.clone(),
            reason,
        })?;
        Ok(Store {
            dir: self.dir.clone(),
            db_path: self.db_path.clone(),
            conn,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db<T>(&self, r: rusqlite::Result<T>) -> Result<T> {
        r.map_err(AgentError::db(&self.db_path))
    }

    // ------------------------------------------------------------------ bundles

    fn bundle_path(&self, ca: &str) -> PathBuf {
        self.dir.join("bundles").join(format!("{ca}.stitch"))
    }

    /// True when the bundle with this content address is stored.
    pub fn has_bundle(&self, ca: &str) -> bool {
        is_hex64(ca) && self.bundle_path(ca).is_file()
    }

    /// Checks `bytes` (hash = `ca`, signature by a trusted key) and stores them.
    pub fn put_bundle(&self, ca: &str, bytes: &[u8], keys: &TrustedKeys) -> Result<VerifiedBundle> {
        let vb = verify_bundle(ca, bytes, keys)?;
        if !self.has_bundle(ca) {
            write_atomic(&self.bundle_path(ca), bytes, 0o644)?;
        }
        Ok(vb)
    }

    /// Reads and verifies a stored bundle again (done before every apply pass).
    pub fn load_verified(&self, ca: &str, keys: &TrustedKeys) -> Result<VerifiedBundle> {
        if !is_hex64(ca) {
            return Err(AgentError::ContentAddressMismatch {
                content_address: ca.into(),
                found: "not a content address".into(),
            });
        }
        let p = self.bundle_path(ca);
        let bytes = std::fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AgentError::BundleMissing {
                    content_address: ca.into(),
                    path: p.clone(),
                }
            } else {
                AgentError::io("read", &p)(e)
            }
        })?;
        let r = verify_bundle(ca, &bytes, keys);
        if matches!(r, Err(AgentError::ContentAddressMismatch { .. })) {
            tracing::warn!(path = %p.display(), "stored bundle is damaged; deleting it");
            let _ = std::fs::remove_file(&p);
        }
        r
    }

    /// Installed patches whose stored bundle does not verify with `keys` (missing, damaged,
    /// or signed by a key not in `keys`), with why; nothing is changed (`stitchd --check`,
    /// e.g. before a key rotation).
    pub fn unverifiable(&self, keys: &TrustedKeys) -> Result<Vec<(InstalledPatch, AgentError)>> {
        let mut out = Vec::new();
        for row in self.patches()? {
            let ca = &row.content_address;
            let p = self.bundle_path(ca);
            let r = match std::fs::read(&p) {
                Ok(bytes) if is_hex64(ca) => verify_bundle(ca, &bytes, keys).map(|_| ()),
                Err(e) if e.kind() != std::io::ErrorKind::NotFound && is_hex64(ca) => {
                    Err(AgentError::io("read", &p)(e))
                }
                _ => Err(AgentError::BundleMissing {
                    content_address: ca.clone(),
                    path: p,
                }),
            };
            if let Err(e) = r {
                out.push((row, e));
            }
        }
        Ok(out)
    }

    fn check_bundles(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir.join("bundles")) else {
            return bad;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A temporary file from a write that never finished.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(ca) = name.strip_suffix(".stitch") else {
                continue;
            };
            let ok = std::fs::read(e.path())
                .map(|b| hex::encode(Sha256::digest(&b)) == ca)
                .unwrap_or(false);
            if !ok {
                tracing::warn!(bundle = %name, "stored bundle does not match its content address; deleting");
                let _ = std::fs::remove_file(e.path());
                bad.push(ca.to_string());
            }
        }
        bad
    }

    fn remove_bundle(&self, ca: &str) {
        if is_hex64(ca) {
            let _ = std::fs::remove_file(self.bundle_path(ca));
        }
    }

    /// Rebuilds the patch table from the bundles directory, `manifest.json` and `policy.json`.
    fn rebuild(&mut self) -> Result<()> {
        let manifest = self.manifest().unwrap_or_default();
        let policy = self.policy();
        let by_ca: BTreeMap<&str, &crate::sync::ManifestEntry> = manifest
            .entries
            .iter()
            .map(|e| (e.content_address.as_str(), e))
            .collect();
        let rd = std::fs::read_dir(self.dir.join("bundles"))
            .map_err(AgentError::io("read", self.dir.join("bundles")))?;
        let mut newest: BTreeMap<String, InstalledPatch> = BTreeMap::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(ca) = name.strip_suffix(".stitch") else {
                continue;
            };
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            let Ok(b) = Bundle::decode(&bytes) else {
                continue;
            };
            let p = &b.patch;
            let entry = by_ca.get(ca);
            let row = InstalledPatch {
                patch_id: p.id.clone(),
                revision: p.revision,
                content_address: ca.to_string(),
                // Not in the last manifest: it was held before; keep it enabled as it was
                // downloaded for this host (the next manifest corrects it).
                server_enabled: entry.is_none_or(|e| e.enabled),
                local_enabled: !policy.patches_disabled.contains(&p.id),
                crash_disabled: policy.crash_disabled.get(&p.id).cloned(),
                title: p.title.clone(),
                installed_at: now(),
            };
            let keep = newest
                .get(&p.id)
                .is_none_or(|old| old.revision < row.revision);
            if keep {
                newest.insert(p.id.clone(), row);
            }
        }
        // A patch of the manifest whose bundle is gone or unreadable is still this host's (it
        // may be in running processes): its row keeps it known, so it is reverted wherever it
        // must not be; it is never applied until its bundle is downloaded again and verifies.
        for e in &manifest.entries {
            if newest.contains_key(&e.patch_id) {
                continue;
            }
            newest.insert(
                e.patch_id.clone(),
                InstalledPatch {
                    patch_id: e.patch_id.clone(),
                    revision: u32::try_from(e.revision).unwrap_or(0),
                    content_address: e.content_address.clone(),
                    server_enabled: e.enabled,
                    local_enabled: !policy.patches_disabled.contains(&e.patch_id),
                    crash_disabled: policy.crash_disabled.get(&e.patch_id).cloned(),
                    title: e.title.clone(),
                    installed_at: now(),
                },
            );
        }
        for row in newest.values() {
            self.upsert_patch(row)?;
        }
        tracing::info!(
            patches = newest.len(),
            "state database rebuilt from bundles"
        );
        Ok(())
    }

    // ------------------------------------------------------------------ patches

    /// Every installed patch, by id.
    pub fn patches(&self) -> Result<Vec<InstalledPatch>> {
        let mut st = self.db(self.conn.prepare(
            "SELECT patch_id, revision, content_address, server_enabled, local_enabled, crash_disabled, title, installed_at FROM patches ORDER BY patch_id",
        ))?;
        let rows = st.query_map([], |r| {
            Ok(InstalledPatch {
                patch_id: r.get(0)?,
                revision: r.get(1)?,
                content_address: r.get(2)?,
                server_enabled: r.get(3)?,
                local_enabled: r.get(4)?,
                crash_disabled: r.get(5)?,
                title: r.get(6)?,
                installed_at: r.get(7)?,
            })
        });
        let rows = self.db(rows)?;
        self.db(rows.collect())
    }

    /// Inserts or replaces a patch row.
    pub fn upsert_patch(&self, p: &InstalledPatch) -> Result<()> {
        self.db(self.conn.execute(
            "INSERT INTO patches(patch_id, revision, content_address, server_enabled, local_enabled, crash_disabled, title, installed_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(patch_id) DO UPDATE SET revision = ?2, content_address = ?3, \
             server_enabled = ?4, local_enabled = ?5, crash_disabled = ?6, title = ?7",
            params![p.patch_id, p.revision, p.content_address, p.server_enabled, p.local_enabled, p.crash_disabled, p.title, p.installed_at],
        ))?;
        Ok(())
    }

    /// Removes a patch row and its bundle.
    pub fn remove_patch(&self, id: &str) -> Result<()> {
        let ca: Option<String> = self.db(self
            .conn
            .query_row(
                "SELECT content_address FROM patches WHERE patch_id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional())?;
        self.db(self
            .conn
            .execute("DELETE FROM patches WHERE patch_id = ?1", [id]))?;
        if let Some(ca) = ca {
            self.remove_bundle(&ca);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ files

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Option<T> {
        let p = self.dir.join(name);
        let bytes = std::fs::read(&p).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "unreadable; ignoring");
                None
            }
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, v: &T, mode: u32) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
        write_atomic(&self.dir.join(name), &bytes, mode)
    }

    /// Local policy (`policy.json`).
    pub fn policy(&self) -> LocalPolicy {
        self.read_json("policy.json").unwrap_or_default()
    }

    /// Saves the local policy.
    pub fn set_policy(&self, p: &LocalPolicy) -> Result<()> {
        self.write_json("policy.json", p, 0o600)
    }

    /// The last accepted manifest.
    pub fn manifest(&self) -> Option<StoredManifest> {
        self.read_json("manifest.json")
    }

    /// Saves the last accepted manifest.
    pub fn set_manifest(&self, m: &StoredManifest) -> Result<()> {
        self.write_json("manifest.json", m, 0o600)
    }

    /// The enrollment identity.
    pub fn identity(&self) -> Option<Identity> {
        self.read_json("identity.json")
    }

    /// Saves the enrollment identity (mode 0600: it holds the credential).
    pub fn set_identity(&self, id: &Identity) -> Result<()> {
        self.write_json("identity.json", id, 0o600)
    }

    /// This installation, if recorded.
    pub fn installation(&self) -> Option<Installation> {
        self.read_json("installation.json")
    }

    /// Saves this installation's record.
    pub fn set_installation(&self, i: &Installation) -> Result<()> {
        self.write_json("installation.json", i, 0o600)
    }

    // ------------------------------------------------------------------ applied

    /// Every known (process, patch) pair.
    pub fn applied(&self) -> Result<Vec<AppliedRow>> {
        let mut st = self.db(self.conn.prepare(
            "SELECT pid, start_time, patch_id, revision, exe, hits_reported, applied_at FROM applied ORDER BY patch_id, pid",
        ))?;
        let rows = st.query_map([], |r| {
            Ok(AppliedRow {
                pid: r.get(0)?,
                start_time: r.get::<_, i64>(1)? as u64,
                patch_id: r.get(2)?,
                revision: r.get(3)?,
                exe: r.get(4)?,
                hits_reported: r.get::<_, i64>(5)? as u64,
                applied_at: r.get(6)?,
            })
        });
        let rows = self.db(rows)?;
        self.db(rows.collect())
    }

    /// Records that `patch` is in the process (or updates its reported hit count).
    pub fn set_applied(&self, row: &AppliedRow) -> Result<()> {
        self.db(self.conn.execute(
            "INSERT INTO applied(pid, start_time, patch_id, revision, exe, hits_reported, applied_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT(pid, start_time, patch_id) DO UPDATE SET revision = ?4, hits_reported = ?6",
            params![row.pid, row.start_time as i64, row.patch_id, row.revision, row.exe, row.hits_reported as i64, row.applied_at],
        ))?;
        Ok(())
    }

    /// [`Store::set_applied`] for many rows in one transaction.
    pub fn set_applied_many(&self, rows: &[AppliedRow]) -> Result<()> {
        let tx = self.db(self.conn.unchecked_transaction())?;
        for row in rows {
            self.set_applied(row)?;
        }
        self.db(tx.commit())
    }

    /// Forgets one (process, patch) pair, or every patch of a process when `patch` is None.
    pub fn clear_applied(&self, pid: i32, patch: Option<&str>) -> Result<()> {
        match patch {
            Some(p) => self.db(self.conn.execute(
                "DELETE FROM applied WHERE pid = ?1 AND patch_id = ?2",
                params![pid, p],
            ))?,
            None => self.db(self
                .conn
                .execute("DELETE FROM applied WHERE pid = ?1", [pid]))?,
        };
        Ok(())
    }

    // ------------------------------------------------------------------ events

    /// Appends an event; `deliver` false keeps it local (kinds the server does not know).
    pub fn push_event(&self, e: &Event, deliver: bool) -> Result<()> {
        let body = serde_json::to_string(&e.body).unwrap_or_default();
        self.db(self.conn.execute(
            "INSERT OR IGNORE INTO events(id, occurred_at, body, deliver) VALUES (?1, ?2, ?3, ?4)",
            params![e.id, e.occurred_at, body, deliver],
        ))?;
        Ok(())
    }

    /// Up to `n` undelivered events, oldest first.
    pub fn outbox(&self, n: usize) -> Result<Vec<StoredEvent>> {
        self.events_where(
            "WHERE delivered = 0 AND deliver = 1 ORDER BY seq ASC LIMIT ?1",
            n,
        )
    }

    /// Number of undelivered events.
    pub fn outbox_len(&self) -> Result<u64> {
        self.db(self.conn.query_row(
            "SELECT count(*) FROM events WHERE delivered = 0 AND deliver = 1",
            [],
            |r| r.get::<_, i64>(0),
        ))
        .map(|n| n as u64)
    }

    /// The last `n` events, newest first.
    pub fn recent_events(&self, n: usize) -> Result<Vec<StoredEvent>> {
        self.events_where("ORDER BY seq DESC LIMIT ?1", n)
    }

    fn events_where(&self, clause: &str, n: usize) -> Result<Vec<StoredEvent>> {
        let sql = format!("SELECT seq, id, occurred_at, body, delivered FROM events {clause}");
        let mut st = self.db(self.conn.prepare(&sql))?;
        let rows = st.query_map([n as i64], |r| {
            let body: String = r.get(3)?;
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, body, r.get(4)?))
        });
        let rows: Vec<(i64, String, i64, String, bool)> = self.db(self.db(rows)?.collect())?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, id, occurred_at, body, delivered)| {
                let body: Entry = serde_json::from_str(&body).ok()?;
                Some(StoredEvent {
                    seq,
                    delivered,
                    event: Event {
                        id,
                        occurred_at,
                        body,
                    },
                })
            })
            .collect())
    }

    /// Marks events delivered (the server acknowledged them) and prunes old delivered ones.
    pub fn mark_delivered(&self, seqs: &[i64]) -> Result<()> {
        let tx = self.db(self.conn.unchecked_transaction())?;
        for s in seqs {
            self.db(tx.execute("UPDATE events SET delivered = 1 WHERE seq = ?1", [s]))?;
        }
        self.db(tx.execute(
            "DELETE FROM events WHERE (delivered = 1 OR deliver = 0) AND seq < (SELECT max(seq) FROM events) - ?1",
            [KEEP_DELIVERED],
        ))?;
        self.db(tx.commit())
    }
}

/// Version of the manifest kept in `dir/manifest.json` (0 when none).
pub fn stored_manifest_version(dir: &Path) -> i64 {
    std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<StoredManifest>(&b).ok())
        .map_or(0, |m| m.version)
}

/// Hash check then signature check.
pub fn verify_bundle(ca: &str, bytes: &[u8], keys: &TrustedKeys) -> Result<VerifiedBundle> {
    let found = hex::encode(Sha256::digest(bytes));
    if found != ca {
        return Err(AgentError::ContentAddressMismatch {
            content_address: ca.to_string(),
            found,
        });
    }
    Bundle::decode_verified(bytes, keys).map_err(|source| AgentError::Bundle {
        content_address: ca.to_string(),
        source,
    })
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuilt_database_keeps_a_manifest_patch_whose_bundle_is_gone_and_check_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(report.fresh);
        let entry: crate::sync::ManifestEntry = serde_json::from_value(serde_json::json!({
            "patch_id": "ST-1", "revision": 3, "content_address": "ab".repeat(32),
            "enabled": true, "title": "t",
        }))
        .unwrap();
        store
            .set_manifest(&StoredManifest {
                version: 1,
                expires_at: i64::MAX,
                entries: vec![entry],
            })
            .unwrap();
        drop(store);
        for f in ["state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        std::fs::write(dir.path().join("state.db"), b"not a database").unwrap();
        let (store, report) = Store::open(dir.path()).unwrap();
        assert!(report.rebuilt_from.is_some());
        let rows = store.patches().unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].patch_id.as_str(), rows[0].revision), ("ST-1", 3));
        assert!(rows[0].enabled());
        let bad = store.unverifiable(&TrustedKeys::new()).unwrap();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].1.code(), "agent.bundle_missing");
        let e = store
            .load_verified(&rows[0].content_address, &TrustedKeys::new())
            .unwrap_err();
        assert_eq!(e.code(), "agent.bundle_missing");
    }
}

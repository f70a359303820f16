//! Storage: one interface ([`Store`]), two backends (embedded SQLite, PostgreSQL).
//!
//! Every query is written once, in the SQL dialect both engines accept (`$1` placeholders,
//! `ON CONFLICT`, `RETURNING`, `IS DISTINCT FROM`), and the [`rd!`]/[`wr!`] macros compile the
//! same source text against each driver. So the two backends cannot drift apart: a query that
//! only one of them understands fails the shared test suite, which runs against both.
//!
//! SQLite keeps one writer connection (SQLite serialises writers anyway, and one connection
//! avoids busy-wait back-off) beside a pool of readers (WAL mode). PostgreSQL uses one pool.
//!
//! Change notification: every change that can alter some agent's manifest calls
//! [`Store::notify_org`]. Locally that wakes long-polls through a `watch` channel per org; on
//! PostgreSQL it also sends `NOTIFY`, and a listener task on every replica re-broadcasts it
//! locally, so a long-poll on replica B wakes for a policy change made through replica A.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Row, SqlitePool};
use tokio::sync::watch;

use crate::model::*;

/// Storage error (the detail is logged; clients see `server.internal`).
pub type DbResult<T> = Result<T, sqlx::Error>;

const PG_CHANNEL: &str = "stitch_changes";

#[derive(Clone)]
enum Backend {
    Sqlite { read: SqlitePool, write: SqlitePool },
    Postgres(PgPool),
}

/// Runs `$body` with `$p` bound to a pool that may read.
macro_rules! rd {
    ($self:expr, $p:ident => $body:expr) => {
        match &$self.backend {
            Backend::Sqlite { read: $p, .. } => $body,
            Backend::Postgres($p) => $body,
        }
    };
}

/// Runs `$body` with `$p` bound to a pool that may write.
macro_rules! wr {
    ($self:expr, $p:ident => $body:expr) => {
        match &$self.backend {
            Backend::Sqlite { write: $p, .. } => $body,
            Backend::Postgres($p) => $body,
        }
    };
}

/// Wakes long-polls of one organisation on this process.
#[derive(Default)]
struct Notifier {
    orgs: Mutex<HashMap<i64, watch::Sender<u64>>>,
}

impl Notifier {
    fn subscribe(&self, org_id: i64) -> watch::Receiver<u64> {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        orgs.entry(org_id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
    fn wake(&self, org_id: i64) {
        let orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = orgs.get(&org_id) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// The server's storage. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    notifier: Arc<Notifier>,
}

fn schema(pg: bool) -> String {
    let s = include_str!("schema.sql");
    if pg {
        s.replace("{ID}", "BIGSERIAL PRIMARY KEY")
            .replace("{INT}", "BIGINT")
            .replace("{BLOB}", "BYTEA")
    } else {
        s.replace("{ID}", "INTEGER PRIMARY KEY")
            .replace("{INT}", "INTEGER")
            .replace("{BLOB}", "BLOB")
    }
}

fn json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

fn bad_column(col: &str, v: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("column {col}: unexpected value {v:?}").into())
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`.
    pub async fn open_sqlite(path: &std::path::Path) -> DbResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        sqlx::raw_sql(&schema(false)).execute(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts.read_only(true))
            .await?;
        Ok(Self {
            backend: Backend::Sqlite { read, write },
            notifier: Arc::default(),
        })
    }

    /// Connects to PostgreSQL at `url`, creates the schema if needed and starts the
    /// LISTEN task that wakes this replica's long-polls.
    pub async fn open_postgres(url: &str) -> DbResult<Self> {
        let opts = sqlx::postgres::PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(opts)
            .await?;
        {
            // Replicas may start together: serialise schema creation.
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(727274)")
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql(&schema(true)).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        let store = Self {
            backend: Backend::Postgres(pool.clone()),
            notifier: Arc::default(),
        };
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(PG_CHANNEL).await?;
        let notifier = store.notifier.clone();
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(n) => {
                        if let Ok(org) = n.payload().parse::<i64>() {
                            notifier.wake(org);
                        }
                    }
                    Err(e) => {
                        // PgListener reconnects by itself on the next recv; a missed
                        // notification only delays a long-poll until its timeout.
                        tracing::warn!(error = %e, "postgres LISTEN failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(store)
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// A cheap round trip, for /readyz.
    pub async fn ping(&self) -> DbResult<()> {
        rd!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))
    }

    /// Subscribes to change notifications for `org_id` (subscribe first, then read state).
    pub fn subscribe(&self, org_id: i64) -> watch::Receiver<u64> {
        self.notifier.subscribe(org_id)
    }

    /// Tells every replica that something in `org_id` that can change a manifest changed.
    pub async fn notify_org(&self, org_id: i64) -> DbResult<()> {
        match &self.backend {
            Backend::Sqlite { .. } => self.notifier.wake(org_id),
            Backend::Postgres(p) => {
                // The local listener delivers it here too; wake directly as well in case
                // the listener connection is between reconnects.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(PG_CHANNEL)
                    .bind(org_id.to_string())
                    .execute(p)
                    .await?;
                self.notifier.wake(org_id);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- orgs, people, tokens

    /// Creates an organisation with its default group; returns its id.
    pub async fn create_org(&self, name: &str, plan: Plan, now: i64) -> DbResult<i64> {
        wr!(self, p => {
            let mut tx = p.begin().await?;
            let id: i64 = sqlx::query("INSERT INTO orgs (name, plan, created_at) VALUES ($1, $2, $3) RETURNING id")
                .bind(name).bind(plan.as_str()).bind(now)
                .fetch_one(&mut *tx).await?.try_get("id")?;
            sqlx::query("INSERT INTO computer_groups (org_id, name, ring, is_default, default_mode, created_at) VALUES ($1, 'default', 0, TRUE, 'automatic', $2)")
                .bind(id).bind(now).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The organisation named `name`.
    pub async fn org_by_name(&self, name: &str) -> DbResult<Option<Org>> {
        let row = rd!(self, p => sqlx::query("SELECT id, name, plan FROM orgs WHERE name = $1").bind(name).fetch_optional(p).await?.map(|r| org_from(&r)).transpose())?;
        Ok(row)
    }

    /// The organisation with id `id`.
    pub async fn org(&self, id: i64) -> DbResult<Option<Org>> {
        rd!(self, p => sqlx::query("SELECT id, name, plan FROM orgs WHERE id = $1").bind(id).fetch_optional(p).await?.map(|r| org_from(&r)).transpose())
    }

    /// Changes an organisation's plan (operator action, not exposed to org admins).
    pub async fn set_plan(&self, org_id: i64, plan: Plan) -> DbResult<()> {
        wr!(self, p => sqlx::query("UPDATE orgs SET plan = $1 WHERE id = $2").bind(plan.as_str()).bind(org_id).execute(p).await.map(|_| ()))?;
        self.notify_org(org_id).await
    }

    /// Adds a user; `Ok(None)` if the username is taken.
    pub async fn create_user(
        &self,
        org_id: i64,
        username: &str,
        password_hash: &str,
        role: Role,
        now: i64,
    ) -> DbResult<Option<i64>> {
        wr!(self, p => {
            let r = sqlx::query("INSERT INTO users (org_id, username, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (username) DO NOTHING RETURNING id")
                .bind(org_id).bind(username).bind(password_hash).bind(role.as_str()).bind(now)
                .fetch_optional(p).await?;
            r.map(|r| r.try_get("id")).transpose()
        })
    }

    /// The user called `username`.
    pub async fn user_by_name(&self, username: &str) -> DbResult<Option<User>> {
        rd!(self, p => sqlx::query("SELECT id, org_id, username, password_hash, role FROM users WHERE username = $1")
            .bind(username).fetch_optional(p).await?.map(|r| user_from(&r)).transpose())
    }

    /// The people of an org, by name.
    pub async fn users(&self, org_id: i64) -> DbResult<Vec<UserSummary>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT id, username, role, created_at FROM users WHERE org_id = $1 ORDER BY username")
                .bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| {
                let role: String = r.try_get("role")?;
                Ok(UserSummary {
                    id: r.try_get("id")?,
                    username: r.try_get("username")?,
                    role: Role::from_name(&role).ok_or_else(|| bad_column("role", &role))?,
                    created_at: r.try_get("created_at")?,
                })
            }).collect()
        })
    }

    /// Removes a user of an org and ends their sessions, in one transaction. `false` if the
    /// org has no such user.
    pub async fn delete_user(&self, org_id: i64, user_id: i64) -> DbResult<bool> {
        wr!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query("DELETE FROM sessions WHERE user_id IN (SELECT id FROM users WHERE id = $1 AND org_id = $2)")
                .bind(user_id).bind(org_id).execute(&mut *tx).await?;
            let n = sqlx::query("DELETE FROM users WHERE id = $1 AND org_id = $2")
                .bind(user_id).bind(org_id).execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    /// Stores a dashboard session (and drops sessions that expired over a week ago).
    pub async fn create_session(
        &self,
        token_hash: &str,
        user_id: i64,
        csrf: &str,
        expires_at: i64,
    ) -> DbResult<()> {
        let now = expires_at - 7 * 24 * 3600;
        wr!(self, p => sqlx::query("DELETE FROM sessions WHERE expires_at < $1").bind(now).execute(p).await.map(|_| ()))?;
        wr!(self, p => sqlx::query("INSERT INTO sessions (token_hash, user_id, csrf, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(token_hash).bind(user_id).bind(csrf).bind(expires_at).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// The live session with this token hash: its user and CSRF token.
    pub async fn session(&self, token_hash: &str, now: i64) -> DbResult<Option<(User, String)>> {
        rd!(self, p => {
            let r = sqlx::query("SELECT u.id, u.org_id, u.username, u.password_hash, u.role, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1 AND s.expires_at > $2")
                .bind(token_hash).bind(now).fetch_optional(p).await?;
            match r {
                Some(r) => Ok(Some((user_from(&r)?, r.try_get("csrf")?))),
                None => Ok(None),
            }
        })
    }

    /// Ends a session.
    pub async fn delete_session(&self, token_hash: &str) -> DbResult<()> {
        wr!(self, p => sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(token_hash).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Stores an API token (hash only).
    pub async fn create_api_token(
        &self,
        org_id: i64,
        name: &str,
        role: Role,
        token_hash: &str,
        now: i64,
    ) -> DbResult<i64> {
        wr!(self, p => sqlx::query("INSERT INTO api_tokens (org_id, name, role, token_hash, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id")
            .bind(org_id).bind(name).bind(role.as_str()).bind(token_hash).bind(now)
            .fetch_one(p).await?.try_get("id"))
    }

    /// The principal of a live API token.
    pub async fn api_token(&self, token_hash: &str) -> DbResult<Option<Principal>> {
        rd!(self, p => {
            let r = sqlx::query("SELECT org_id, role FROM api_tokens WHERE token_hash = $1 AND revoked = FALSE")
                .bind(token_hash).fetch_optional(p).await?;
            r.map(|r| principal_from(&r)).transpose()
        })
    }

    /// The API tokens of an org (never the secrets: only hashes are stored).
    pub async fn api_tokens(&self, org_id: i64) -> DbResult<Vec<ApiTokenSummary>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT id, name, role, created_at, revoked FROM api_tokens WHERE org_id = $1 ORDER BY id")
                .bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| {
                let role: String = r.try_get("role")?;
                Ok(ApiTokenSummary {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    role: Role::from_name(&role).ok_or_else(|| bad_column("role", &role))?,
                    created_at: r.try_get("created_at")?,
                    revoked: r.try_get("revoked")?,
                })
            }).collect()
        })
    }

    /// Revokes an API token of an org; `false` if the org has no such token.
    pub async fn revoke_api_token(&self, org_id: i64, id: i64) -> DbResult<bool> {
        wr!(self, p => Ok(sqlx::query("UPDATE api_tokens SET revoked = TRUE WHERE id = $1 AND org_id = $2")
            .bind(id).bind(org_id).execute(p).await?.rows_affected() == 1))
    }

    /// Stores an enrollment token for a group of the org.
    pub async fn create_enrollment_token(
        &self,
        org_id: i64,
        group_id: i64,
        name: &str,
        token_hash: &str,
        hint: &str,
        now: i64,
    ) -> DbResult<i64> {
        wr!(self, p => sqlx::query("INSERT INTO enrollment_tokens (org_id, group_id, name, token_hash, hint, created_at) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id")
            .bind(org_id).bind(group_id).bind(name).bind(token_hash).bind(hint).bind(now)
            .fetch_one(p).await?.try_get("id"))
    }

    /// Enrollment tokens of an org.
    pub async fn enrollment_tokens(&self, org_id: i64) -> DbResult<Vec<EnrollmentToken>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT t.id, t.group_id, g.name AS group_name, t.name, t.hint, t.created_at, t.revoked, t.uses FROM enrollment_tokens t JOIN computer_groups g ON g.id = t.group_id WHERE t.org_id = $1 ORDER BY t.id")
                .bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| Ok(EnrollmentToken {
                id: r.try_get("id")?, group_id: r.try_get("group_id")?, group_name: r.try_get("group_name")?,
                name: r.try_get("name")?, hint: r.try_get("hint")?, created_at: r.try_get("created_at")?,
                revoked: r.try_get("revoked")?, uses: r.try_get("uses")?,
            })).collect()
        })
    }

    /// Revokes an enrollment token of `org_id`; false if no such token in that org.
    pub async fn revoke_enrollment_token(&self, org_id: i64, id: i64) -> DbResult<bool> {
        wr!(self, p => Ok(sqlx::query("UPDATE enrollment_tokens SET revoked = TRUE WHERE id = $1 AND org_id = $2")
            .bind(id).bind(org_id).execute(p).await?.rows_affected() == 1))
    }

    /// Enrolls an agent with a live enrollment token: `(org_id, group_id)` or `None` if the
    /// token is unknown or revoked. The agent row and the use count change together.
    pub async fn enroll_agent(
        &self,
        enrollment_hash: &str,
        agent_id: &str,
        credential_hash: &str,
        hostname: &str,
        now: i64,
    ) -> DbResult<Option<(i64, i64)>> {
        wr!(self, p => {
            let mut tx = p.begin().await?;
            let r = sqlx::query("UPDATE enrollment_tokens SET uses = uses + 1 WHERE token_hash = $1 AND revoked = FALSE RETURNING org_id, group_id")
                .bind(enrollment_hash).fetch_optional(&mut *tx).await?;
            let Some(r) = r else { return Ok(None) };
            let org_id: i64 = r.try_get("org_id")?;
            let group_id: i64 = r.try_get("group_id")?;
            sqlx::query("INSERT INTO agents (id, org_id, group_id, credential_hash, enrolled_at, hostname) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(agent_id).bind(org_id).bind(group_id).bind(credential_hash).bind(now).bind(hostname)
                .execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(Some((org_id, group_id)))
        })
    }

    // ---------------------------------------------------------------- agents

    /// Authentication record of an agent.
    pub async fn agent_auth(&self, agent_id: &str) -> DbResult<Option<AgentAuth>> {
        rd!(self, p => {
            let r = sqlx::query("SELECT id, org_id, group_id, credential_hash, revoked, facts_hash, package_set, states_hash FROM agents WHERE id = $1")
                .bind(agent_id).fetch_optional(p).await?;
            r.map(|r| Ok(AgentAuth {
                id: r.try_get("id")?, org_id: r.try_get("org_id")?, group_id: r.try_get("group_id")?,
                credential_hash: r.try_get("credential_hash")?, revoked: r.try_get("revoked")?,
                facts_hash: r.try_get("facts_hash")?, package_set: r.try_get("package_set")?, states_hash: r.try_get("states_hash")?,
            })).transpose()
        })
    }

    /// Replaces an agent's credential (the old one stops working at once).
    pub async fn rotate_credential(&self, agent_id: &str, credential_hash: &str) -> DbResult<()> {
        wr!(self, p => sqlx::query("UPDATE agents SET credential_hash = $1 WHERE id = $2").bind(credential_hash).bind(agent_id).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Revokes a computer of `org_id`; false if the org has no such computer.
    pub async fn revoke_agent(&self, org_id: i64, agent_id: &str) -> DbResult<bool> {
        wr!(self, p => Ok(sqlx::query("UPDATE agents SET revoked = TRUE WHERE id = $1 AND org_id = $2")
            .bind(agent_id).bind(org_id).execute(p).await?.rows_affected() == 1))
    }

    /// Moves a computer of `org_id` into a group of the same org; false if either is not the org's.
    pub async fn move_agent(&self, org_id: i64, agent_id: &str, group_id: i64) -> DbResult<bool> {
        let moved = wr!(self, p => sqlx::query("UPDATE agents SET group_id = $1 WHERE id = $2 AND org_id = $3 AND EXISTS (SELECT 1 FROM computer_groups g WHERE g.id = $1 AND g.org_id = $3)")
            .bind(group_id).bind(agent_id).bind(org_id).execute(p).await?.rows_affected() == 1);
        if moved {
            self.notify_org(org_id).await?;
        }
        Ok(moved)
    }

    /// Does `org_id` already hold the package set with this hash?
    pub async fn has_package_set(&self, org_id: i64, hash: &str) -> DbResult<bool> {
        rd!(self, p => Ok(sqlx::query("SELECT 1 AS one FROM package_sets WHERE org_id = $1 AND hash = $2")
            .bind(org_id).bind(hash).fetch_optional(p).await?.is_some()))
    }

    /// Records one heartbeat. Only what changed is written: `facts` when their hash moved,
    /// the package set when it is new to the org (sets are shared by every computer of the
    /// org with the same inventory), patch states when their hash moved.
    pub async fn record_heartbeat(
        &self,
        agent_id: &str,
        org_id: i64,
        hb: &HeartbeatWrite<'_>,
    ) -> DbResult<()> {
        wr!(self, p => {
            let mut tx = p.begin().await?;
            if let Some((hash, pkgs)) = &hb.new_package_set {
                let inserted = sqlx::query("INSERT INTO package_sets (org_id, hash, count) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                    .bind(org_id).bind(*hash).bind(pkgs.len() as i64).execute(&mut *tx).await?.rows_affected();
                if inserted == 1 {
                    for chunk in pkgs.chunks(200) {
                        let mut q = String::from("INSERT INTO package_set_members (org_id, set_hash, ecosystem, name, version) VALUES ");
                        for i in 0..chunk.len() {
                            if i > 0 { q.push(','); }
                            let b = i * 3 + 3;
                            q.push_str(&format!("($1, $2, ${}, ${}, ${})", b, b + 1, b + 2));
                        }
                        q.push_str(" ON CONFLICT DO NOTHING");
                        let mut qq = sqlx::query(&q).bind(org_id).bind(*hash);
                        for pkg in chunk {
                            qq = qq.bind(&pkg.ecosystem).bind(&pkg.name).bind(&pkg.version);
                        }
                        qq.execute(&mut *tx).await?;
                    }
                }
            }
            if let Some((_, states)) = &hb.states {
                sqlx::query("DELETE FROM agent_patch_states WHERE agent_id = $1").bind(agent_id).execute(&mut *tx).await?;
                if !states.is_empty() {
                    let mut q = String::from("INSERT INTO agent_patch_states (agent_id, patch_id, revision, state, processes, error_code, updated_at) VALUES ");
                    for i in 0..states.len() {
                        if i > 0 { q.push(','); }
                        let b = i * 5 + 3;
                        q.push_str(&format!("($1, ${}, ${}, ${}, ${}, ${}, $2)", b, b + 1, b + 2, b + 3, b + 4));
                    }
                    let mut qq = sqlx::query(&q).bind(agent_id).bind(hb.now);
                    for st in *states {
                        qq = qq.bind(&st.patch_id).bind(st.revision).bind(&st.state).bind(st.processes).bind(&st.error_code);
                    }
                    qq.execute(&mut *tx).await?;
                }
            }
            // One UPDATE for everything else; NULL parameters keep the current value.
            let (facts_hash, facts) = match &hb.facts {
                Some((h, f)) => (Some(*h), Some(*f)),
                None => (None, None),
            };
            sqlx::query("UPDATE agents SET last_seen = $1, \
                facts_hash = COALESCE($2, facts_hash), hostname = COALESCE($3, hostname), os_id = COALESCE($4, os_id), \
                os_name = COALESCE($5, os_name), os_version_id = COALESCE($6, os_version_id), kernel = COALESCE($7, kernel), \
                ips = COALESCE($8, ips), agent_version = COALESCE($9, agent_version), agent_enabled = COALESCE($10, agent_enabled), \
                states_hash = COALESCE($11, states_hash), package_set = COALESCE($12, package_set) WHERE id = $13")
                .bind(hb.now).bind(facts_hash).bind(facts.map(|f| f.hostname.as_str())).bind(facts.map(|f| f.os_id.as_str()))
                .bind(facts.map(|f| f.os_name.as_str())).bind(facts.map(|f| f.os_version_id.as_str())).bind(facts.map(|f| f.kernel.as_str()))
                .bind(facts.map(|f| serde_json::to_string(&f.ips).unwrap_or_default())).bind(facts.map(|f| f.agent_version.as_str()))
                .bind(facts.map(|f| f.agent_enabled)).bind(hb.states.as_ref().map(|(h, _)| *h)).bind(hb.package_set)
                .bind(agent_id).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Sets `last_seen` of many agents at once (the write-behind path of unchanged
    /// heartbeats): one statement per chunk of 500 agents with the same timestamp.
    pub async fn touch_agents(&self, seen: &[(String, i64)]) -> DbResult<()> {
        let mut by_ts: std::collections::BTreeMap<i64, Vec<&str>> =
            std::collections::BTreeMap::new();
        for (id, ts) in seen {
            by_ts.entry(*ts).or_default().push(id);
        }
        wr!(self, p => {
            let mut tx = p.begin().await?;
            for (ts, ids) in &by_ts {
                for chunk in ids.chunks(500) {
                    let mut q = String::from("UPDATE agents SET last_seen = $1 WHERE (last_seen IS NULL OR last_seen < $1) AND id IN (");
                    for i in 0..chunk.len() {
                        if i > 0 { q.push(','); }
                        q.push_str(&format!("${}", i + 2));
                    }
                    q.push(')');
                    let mut qq = sqlx::query(&q).bind(*ts);
                    for id in chunk {
                        qq = qq.bind(*id);
                    }
                    qq.execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// One page of an org's computers, with patch counts, filtered by a search (host name, IP,
    /// OS, id) and a state (`show`), plus the number matching the search.
    pub async fn computers(&self, org_id: i64, q: &ComputerQuery) -> DbResult<ComputerPage> {
        let like = format!("%{}%", q.search.trim().to_lowercase());
        let show = q.show.as_str();
        // One more than asked tells whether a next page exists without a second query.
        let limit = q.limit.clamp(1, ComputerQuery::MAX_LIMIT);
        let (after_name, after_id) = ComputerQuery::parse_cursor(&q.after);
        rd!(self, p => {
            // A bare id: its computer's current host name (none for an unknown id: no rows).
            let after_name = match after_name {
                None if !after_id.is_empty() => sqlx::query_scalar("SELECT hostname FROM agents WHERE id = $1 AND org_id = $2")
                    .bind(after_id).bind(org_id).fetch_optional(p).await?,
                n => n,
            };
            let rows = sqlx::query(&COMPUTERS_PAGE_SQL)
                .bind(org_id).bind(&like).bind(after_id).bind(show).bind(q.online_since).bind(limit + 1)
                .bind(after_name)
                .fetch_all(p).await?;
            let total: i64 = sqlx::query_scalar(COMPUTERS_COUNT_SQL)
                .bind(org_id).bind(&like).fetch_one(p).await?;
            let mut computers = rows.iter().map(computer_from).collect::<DbResult<Vec<_>>>()?;
            let next = if computers.len() as i64 > limit {
                computers.truncate(limit as usize);
                computers.last().map(|c| ComputerQuery::cursor(&c.hostname, &c.id))
            } else {
                None
            };
            Ok(ComputerPage { computers, next, total })
        })
    }

    /// How many computers of an org match both the search and the `show` filter of `q` (all
    /// pages of [`Store::computers`] together; its `total` is before `show`). With `missing`
    /// this computes the missing patches of every computer that matches the search.
    pub async fn count_computers(&self, org_id: i64, q: &ComputerQuery) -> DbResult<i64> {
        let like = format!("%{}%", q.search.trim().to_lowercase());
        rd!(self, p => {
            Ok(sqlx::query_scalar(&COMPUTERS_SHOWN_COUNT_SQL)
                .bind(org_id).bind(&like).bind(q.show.as_str()).bind(q.online_since)
                .fetch_one(p).await?)
        })
    }

    /// One computer of an org.
    pub async fn computer(&self, org_id: i64, agent_id: &str) -> DbResult<Option<ComputerRow>> {
        let q = COMPUTERS_SQL.replace("ORDER BY", "AND a.id = $3 ORDER BY");
        rd!(self, p => {
            let r = sqlx::query(&q).bind(org_id).bind("%").bind(agent_id).fetch_optional(p).await?;
            r.as_ref().map(computer_from).transpose()
        })
    }

    /// Installed packages of a computer with, for each, the catalog patch that targets it and
    /// the patch state reported by the computer. Caller must have checked the org.
    pub async fn computer_packages(
        &self,
        org_id: i64,
        agent_id: &str,
    ) -> DbResult<Vec<PackageWithPatch>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT m.ecosystem, m.name, m.version, pt.patch_id, pt.title, pt.severity, s.state, s.error_code, s.processes \
                FROM agents a JOIN package_set_members m ON m.org_id = a.org_id AND m.set_hash = a.package_set \
                LEFT JOIN patches pt ON pt.org_id = a.org_id AND pt.superseded = FALSE AND pt.ecosystem = m.ecosystem AND pt.package_name = m.name AND pt.package_version = m.version \
                LEFT JOIN agent_patch_states s ON s.agent_id = a.id AND s.patch_id = pt.patch_id \
                WHERE a.id = $1 AND a.org_id = $2 ORDER BY (pt.patch_id IS NULL), m.name, m.version")
                .bind(agent_id).bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| Ok(PackageWithPatch {
                package: InstalledPackage { ecosystem: r.try_get("ecosystem")?, name: r.try_get("name")?, version: r.try_get("version")? },
                patch_id: r.try_get("patch_id")?, patch_title: r.try_get("title")?, severity: r.try_get("severity")?,
                state: r.try_get("state")?, error_code: r.try_get("error_code")?, processes: r.try_get("processes")?,
            })).collect()
        })
    }

    /// Patch states a computer reported. Caller must have checked the org.
    pub async fn computer_states(&self, org_id: i64, agent_id: &str) -> DbResult<Vec<PatchState>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT s.patch_id, s.revision, s.state, s.processes, s.error_code FROM agent_patch_states s JOIN agents a ON a.id = s.agent_id WHERE s.agent_id = $1 AND a.org_id = $2 ORDER BY s.patch_id")
                .bind(agent_id).bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| Ok(PatchState { patch_id: r.try_get("patch_id")?, revision: r.try_get("revision")?, state: r.try_get("state")?, processes: r.try_get("processes")?, error_code: r.try_get("error_code")? })).collect()
        })
    }

    // ---------------------------------------------------------------- events

    /// Stores a batch of events; duplicates (same agent, same client event id) are skipped.
    /// Returns how many were new.
    pub async fn insert_events(
        &self,
        org_id: i64,
        agent_id: &str,
        events: &[NewEvent],
        now: i64,
    ) -> DbResult<u64> {
        wr!(self, p => {
            let mut tx = p.begin().await?;
            let mut n = 0;
            for e in events {
                n += sqlx::query("INSERT INTO events (org_id, agent_id, client_event_id, kind, patch_id, data, occurred_at, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (agent_id, client_event_id) DO NOTHING")
                    .bind(org_id).bind(agent_id).bind(&e.client_event_id).bind(&e.kind).bind(&e.patch_id)
                    .bind(e.data.to_string()).bind(e.occurred_at).bind(now)
                    .execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Latest events of a computer of `org_id`, newest first; `kind` filters when given.
    pub async fn events(
        &self,
        org_id: i64,
        agent_id: &str,
        kind: Option<&str>,
        limit: i64,
    ) -> DbResult<Vec<EventRow>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT id, agent_id, client_event_id, kind, patch_id, data, occurred_at, received_at FROM events WHERE org_id = $1 AND agent_id = $2 AND ($3 = '' OR kind = $3) ORDER BY id DESC LIMIT $4")
                .bind(org_id).bind(agent_id).bind(kind.unwrap_or("")).bind(limit).fetch_all(p).await?;
            rows.iter().map(|r| {
                let data: String = r.try_get("data")?;
                Ok(EventRow { id: r.try_get("id")?, agent_id: r.try_get("agent_id")?, client_event_id: r.try_get("client_event_id")?,
                    kind: r.try_get("kind")?, patch_id: r.try_get("patch_id")?, data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                    occurred_at: r.try_get("occurred_at")?, received_at: r.try_get("received_at")? })
            }).collect()
        })
    }

    // ---------------------------------------------------------------- catalog

    /// Adds a verified bundle to an org's catalog.
    pub async fn insert_patch(
        &self,
        org_id: i64,
        p_: &CatalogPatch,
        bytes: &[u8],
    ) -> DbResult<InsertPatch> {
        let result = wr!(self, p => {
            let mut tx = p.begin().await?;
            let existing = sqlx::query("SELECT content_address FROM patches WHERE org_id = $1 AND patch_id = $2 AND revision = $3")
                .bind(org_id).bind(&p_.patch_id).bind(p_.revision).fetch_optional(&mut *tx).await?;
            if let Some(r) = existing {
                let ca: String = r.try_get("content_address")?;
                return Ok(if ca == p_.content_address { InsertPatch::AlreadyPresent } else { InsertPatch::RevisionConflict });
            }
            sqlx::query("INSERT INTO bundle_blobs (content_address, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(&p_.content_address).bind(bytes).execute(&mut *tx).await?;
            let newer: i64 = sqlx::query("SELECT COUNT(*) AS n FROM patches WHERE org_id = $1 AND patch_id = $2 AND revision > $3")
                .bind(org_id).bind(&p_.patch_id).bind(p_.revision).fetch_one(&mut *tx).await?.try_get("n")?;
            sqlx::query("UPDATE patches SET superseded = TRUE WHERE org_id = $1 AND patch_id = $2 AND revision < $3")
                .bind(org_id).bind(&p_.patch_id).bind(p_.revision).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO patches (org_id, patch_id, revision, content_address, title, description, cves, severity, tier, author, module, target_sha256, build_id, arch, ecosystem, package_name, package_version, signed_by, uploaded_at, superseded) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20)")
                .bind(org_id).bind(&p_.patch_id).bind(p_.revision).bind(&p_.content_address).bind(&p_.title).bind(&p_.description)
                .bind(serde_json::to_string(&p_.cves).unwrap_or_default()).bind(&p_.severity).bind(&p_.tier).bind(&p_.author)
                .bind(&p_.module).bind(&p_.target_sha256).bind(&p_.build_id).bind(&p_.arch).bind(&p_.ecosystem)
                .bind(&p_.package_name).bind(&p_.package_version).bind(serde_json::to_string(&p_.signed_by).unwrap_or_default())
                .bind(p_.uploaded_at).bind(newer > 0)
                .execute(&mut *tx).await?;
            sqlx::query("INSERT INTO rollouts (org_id, patch_id, ring, updated_at) VALUES ($1, $2, 0, $3) ON CONFLICT DO NOTHING")
                .bind(org_id).bind(&p_.patch_id).bind(p_.uploaded_at).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(InsertPatch::Created)
        })?;
        if result == InsertPatch::Created {
            self.notify_org(org_id).await?;
        }
        Ok(result)
    }

    /// Current (not superseded) patches of an org with fleet counts.
    pub async fn patches(&self, org_id: i64) -> DbResult<Vec<PatchSummary>> {
        rd!(self, p => {
            let rows = sqlx::query(&format!("SELECT {PATCH_COLS}, \
                (SELECT COUNT(*) FROM agents a JOIN package_set_members m ON m.org_id = a.org_id AND m.set_hash = a.package_set WHERE a.org_id = pt.org_id AND a.revoked = FALSE AND m.ecosystem = pt.ecosystem AND m.name = pt.package_name AND m.version = pt.package_version) AS affected, \
                (SELECT COUNT(*) FROM agent_patch_states s JOIN agents a ON a.id = s.agent_id WHERE a.org_id = pt.org_id AND a.revoked = FALSE AND s.patch_id = pt.patch_id AND s.state = 'applied') AS applied, \
                COALESCE((SELECT r.ring FROM rollouts r WHERE r.org_id = pt.org_id AND r.patch_id = pt.patch_id), 0) AS rollout_ring \
                FROM patches pt WHERE pt.org_id = $1 AND pt.superseded = FALSE ORDER BY pt.patch_id"))
                .bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| Ok(PatchSummary { patch: catalog_from(r)?, computers_affected: r.try_get("affected")?, computers_applied: r.try_get("applied")?, rollout_ring: r.try_get("rollout_ring")? })).collect()
        })
    }

    /// Current revision of one patch in an org's catalog.
    pub async fn patch(&self, org_id: i64, patch_id: &str) -> DbResult<Option<CatalogPatch>> {
        rd!(self, p => {
            let r = sqlx::query(&format!("SELECT {PATCH_COLS} FROM patches pt WHERE pt.org_id = $1 AND pt.patch_id = $2 AND pt.superseded = FALSE"))
                .bind(org_id).bind(patch_id).fetch_optional(p).await?;
            r.as_ref().map(catalog_from).transpose()
        })
    }

    /// Bundle bytes by content address, only if `org_id`'s catalog holds that bundle.
    pub async fn bundle(&self, org_id: i64, content_address: &str) -> DbResult<Option<Vec<u8>>> {
        rd!(self, p => {
            let r = sqlx::query("SELECT b.bytes FROM bundle_blobs b WHERE b.content_address = $1 AND EXISTS (SELECT 1 FROM patches pt WHERE pt.org_id = $2 AND pt.content_address = $1)")
                .bind(content_address).bind(org_id).fetch_optional(p).await?;
            r.map(|r| r.try_get("bytes")).transpose()
        })
    }

    // ---------------------------------------------------------------- groups, policies, manifests

    /// Groups of an org.
    pub async fn groups(&self, org_id: i64) -> DbResult<Vec<Group>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT id, org_id, name, ring, is_default, default_mode FROM computer_groups WHERE org_id = $1 ORDER BY ring, name")
                .bind(org_id).fetch_all(p).await?;
            rows.iter().map(group_from).collect()
        })
    }

    /// One group of an org.
    pub async fn group(&self, org_id: i64, group_id: i64) -> DbResult<Option<Group>> {
        rd!(self, p => {
            let r = sqlx::query("SELECT id, org_id, name, ring, is_default, default_mode FROM computer_groups WHERE org_id = $1 AND id = $2")
                .bind(org_id).bind(group_id).fetch_optional(p).await?;
            r.as_ref().map(group_from).transpose()
        })
    }

    /// The org's default group.
    pub async fn default_group(&self, org_id: i64) -> DbResult<Group> {
        rd!(self, p => {
            let r = sqlx::query("SELECT id, org_id, name, ring, is_default, default_mode FROM computer_groups WHERE org_id = $1 AND is_default = TRUE")
                .bind(org_id).fetch_one(p).await?;
            group_from(&r)
        })
    }

    /// Creates a group; `None` if the name is taken in the org.
    pub async fn create_group(
        &self,
        org_id: i64,
        name: &str,
        ring: i64,
        mode: Mode,
        now: i64,
    ) -> DbResult<Option<i64>> {
        wr!(self, p => {
            let r = sqlx::query("INSERT INTO computer_groups (org_id, name, ring, is_default, default_mode, created_at) VALUES ($1, $2, $3, FALSE, $4, $5) ON CONFLICT (org_id, name) DO NOTHING RETURNING id")
                .bind(org_id).bind(name).bind(ring).bind(mode.as_str()).bind(now).fetch_optional(p).await?;
            r.map(|r| r.try_get("id")).transpose()
        })
    }

    /// Sets a group's ring and default mode; false if not the org's group.
    pub async fn update_group(
        &self,
        org_id: i64,
        group_id: i64,
        ring: i64,
        mode: Mode,
    ) -> DbResult<bool> {
        let ok = wr!(self, p => sqlx::query("UPDATE computer_groups SET ring = $1, default_mode = $2 WHERE id = $3 AND org_id = $4")
            .bind(ring).bind(mode.as_str()).bind(group_id).bind(org_id).execute(p).await?.rows_affected() == 1);
        if ok {
            self.notify_org(org_id).await?;
        }
        Ok(ok)
    }

    /// Policies of an org.
    pub async fn policies(&self, org_id: i64) -> DbResult<Vec<PolicyRow>> {
        rd!(self, p => {
            let rows = sqlx::query("SELECT group_id, patch_id, enabled, mode, approved FROM policies WHERE org_id = $1 ORDER BY group_id, patch_id")
                .bind(org_id).fetch_all(p).await?;
            rows.iter().map(|r| {
                let mode: String = r.try_get("mode")?;
                Ok(PolicyRow { group_id: r.try_get("group_id")?, patch_id: r.try_get("patch_id")?, enabled: r.try_get("enabled")?,
                    mode: Mode::from_name(&mode).ok_or_else(|| bad_column("mode", &mode))?, approved: r.try_get("approved")? })
            }).collect()
        })
    }

    /// Upserts the policy of one patch in one group of the org. `approved` of `None` keeps
    /// the current approval. False if the group is not the org's.
    #[allow(
        clippy::too_many_arguments,
        reason = "one row's columns; a struct would only rename them"
    )]
    pub async fn set_policy(
        &self,
        org_id: i64,
        group_id: i64,
        patch_id: &str,
        enabled: Option<bool>,
        mode: Option<Mode>,
        approved: Option<bool>,
        now: i64,
    ) -> DbResult<bool> {
        let ok = wr!(self, p => {
            let mut tx = p.begin().await?;
            let g = sqlx::query("SELECT default_mode FROM computer_groups WHERE id = $1 AND org_id = $2")
                .bind(group_id).bind(org_id).fetch_optional(&mut *tx).await?;
            let Some(g) = g else { return Ok(false) };
            let default_mode: String = g.try_get("default_mode")?;
            let cur = sqlx::query("SELECT enabled, mode, approved FROM policies WHERE group_id = $1 AND patch_id = $2")
                .bind(group_id).bind(patch_id).fetch_optional(&mut *tx).await?;
            let (mut e, mut m, mut a) = match cur {
                Some(r) => (r.try_get::<bool, _>("enabled")?, r.try_get::<String, _>("mode")?, r.try_get::<bool, _>("approved")?),
                None => (true, default_mode, false),
            };
            if let Some(x) = enabled { e = x; }
            if let Some(x) = mode { m = x.as_str().to_string(); }
            if let Some(x) = approved { a = x; }
            sqlx::query("INSERT INTO policies (org_id, group_id, patch_id, enabled, mode, approved, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (group_id, patch_id) DO UPDATE SET enabled = excluded.enabled, mode = excluded.mode, approved = excluded.approved, updated_at = excluded.updated_at")
                .bind(org_id).bind(group_id).bind(patch_id).bind(e).bind(&m).bind(a).bind(now).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(true)
        })?;
        if ok {
            self.notify_org(org_id).await?;
        }
        Ok(ok)
    }

    /// Promotes a patch's rollout to `ring`; false if the org has no such patch.
    pub async fn set_rollout(
        &self,
        org_id: i64,
        patch_id: &str,
        ring: i64,
        now: i64,
    ) -> DbResult<bool> {
        let ok = wr!(self, p => sqlx::query("UPDATE rollouts SET ring = $1, updated_at = $2 WHERE org_id = $3 AND patch_id = $4")
            .bind(ring).bind(now).bind(org_id).bind(patch_id).execute(p).await?.rows_affected() == 1);
        if ok {
            self.notify_org(org_id).await?;
        }
        Ok(ok)
    }

    /// Everything a manifest is computed from: the agent's org plan, its group, and every
    /// current catalog patch of the org. Installed packages do not filter the manifest: an
    /// agent matches modules by SHA-256, and a target file may come from no package the
    /// agent can list (a pip wheel, a container image, a vendored copy). Package relevance
    /// is for the dashboard's counts only.
    pub async fn manifest_inputs(
        &self,
        agent: &AgentAuth,
    ) -> DbResult<(Plan, Group, Vec<Candidate>)> {
        rd!(self, p => {
            let r = sqlx::query("SELECT o.plan FROM agents a JOIN orgs o ON o.id = a.org_id WHERE a.id = $1")
                .bind(&agent.id).fetch_one(p).await?;
            let plan: String = r.try_get("plan")?;
            let plan = Plan::from_name(&plan).ok_or_else(|| bad_column("plan", &plan))?;
            let g = sqlx::query("SELECT id, org_id, name, ring, is_default, default_mode FROM computer_groups WHERE id = $1")
                .bind(agent.group_id).fetch_one(p).await?;
            let group = group_from(&g)?;
            let rows = sqlx::query("SELECT pt.patch_id, pt.revision, pt.content_address, pt.title, pt.severity, pt.tier, pt.module, pt.target_sha256, \
                pol.enabled AS pol_enabled, pol.mode AS pol_mode, pol.approved AS pol_approved, COALESCE(r.ring, 0) AS rollout_ring \
                FROM patches pt \
                LEFT JOIN policies pol ON pol.group_id = $2 AND pol.patch_id = pt.patch_id \
                LEFT JOIN rollouts r ON r.org_id = pt.org_id AND r.patch_id = pt.patch_id \
                WHERE pt.org_id = $1 AND pt.superseded = FALSE ORDER BY pt.patch_id")
                .bind(agent.org_id).bind(agent.group_id).fetch_all(p).await?;
            let cands = rows.iter().map(|r| Ok(Candidate {
                patch_id: r.try_get("patch_id")?, revision: r.try_get("revision")?, content_address: r.try_get("content_address")?,
                title: r.try_get("title")?, severity: r.try_get("severity")?, tier: r.try_get("tier")?, module: r.try_get("module")?,
                target_sha256: r.try_get("target_sha256")?, policy_enabled: r.try_get("pol_enabled")?, policy_mode: r.try_get("pol_mode")?,
                approved: r.try_get::<Option<bool>, _>("pol_approved")?.unwrap_or(false), rollout_ring: r.try_get("rollout_ring")?,
            })).collect::<DbResult<Vec<_>>>()?;
            Ok((plan, group, cands))
        })
    }

    /// Records the hash of the manifest content an agent should have and returns its version:
    /// unchanged if the hash is the same, else one more than before (never decreases, and
    /// safe when replicas race: the increment is one conditional UPDATE).
    pub async fn manifest_version(&self, agent_id: &str, content_hash: &str) -> DbResult<i64> {
        let (hash, version): (Option<String>, i64) = rd!(self, p => {
            let r = sqlx::query("SELECT manifest_hash, manifest_version FROM agents WHERE id = $1").bind(agent_id).fetch_one(p).await?;
            (r.try_get("manifest_hash")?, r.try_get("manifest_version")?)
        });
        if hash.as_deref() == Some(content_hash) {
            return Ok(version);
        }
        wr!(self, p => {
            sqlx::query("UPDATE agents SET manifest_version = manifest_version + 1, manifest_hash = $1 WHERE id = $2 AND manifest_hash IS DISTINCT FROM $1")
                .bind(content_hash).bind(agent_id).execute(p).await?;
            sqlx::query("SELECT manifest_version FROM agents WHERE id = $1").bind(agent_id).fetch_one(p).await?.try_get("manifest_version")
        })
    }

    /// Counts for /metrics: agents seen since `since`, and all agents.
    pub async fn agent_counts(&self, since: i64) -> DbResult<(i64, i64)> {
        rd!(self, p => {
            let r = sqlx::query("SELECT COUNT(*) AS total, COUNT(CASE WHEN last_seen >= $1 THEN 1 END) AS online FROM agents WHERE revoked = FALSE")
                .bind(since).fetch_one(p).await?;
            Ok((r.try_get("online")?, r.try_get("total")?))
        })
    }
}

/// Result of adding a bundle to a catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertPatch {
    /// New in this org's catalog.
    Created,
    /// The very same bundle was already there (idempotent re-upload).
    AlreadyPresent,
    /// The org already has this patch id and revision with different content.
    RevisionConflict,
}

/// What one heartbeat writes (each part only when it changed).
#[derive(Debug, Default)]
pub struct HeartbeatWrite<'a> {
    pub now: i64,
    pub facts: Option<(&'a str, &'a HostFacts)>,
    /// A package set to store for the org (it is new): hash and sorted, deduplicated list.
    pub new_package_set: Option<(&'a str, &'a [InstalledPackage])>,
    /// Point the agent at this package set.
    pub package_set: Option<&'a str>,
    pub states: Option<(&'a str, &'a [PatchState])>,
}

/// An event to store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub client_event_id: String,
    pub kind: String,
    pub patch_id: Option<String>,
    pub data: serde_json::Value,
    pub occurred_at: i64,
}

/// An installed package and the patch for it, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageWithPatch {
    pub package: InstalledPackage,
    pub patch_id: Option<String>,
    pub patch_title: Option<String>,
    pub severity: Option<String>,
    pub state: Option<String>,
    pub error_code: Option<String>,
    pub processes: Option<i64>,
}

use serde::Serialize;

const PATCH_COLS: &str = "pt.patch_id, pt.revision, pt.content_address, pt.title, pt.description, pt.cves, pt.severity, pt.tier, pt.author, pt.module, pt.target_sha256, pt.build_id, pt.arch, pt.ecosystem, pt.package_name, pt.package_version, pt.signed_by, pt.uploaded_at";

const COMPUTERS_SQL: &str = "SELECT a.id, a.group_id, g.name AS group_name, a.hostname, a.os_name, a.kernel, a.ips, a.agent_version, a.agent_enabled, a.revoked, a.enrolled_at, a.last_seen, \
    (SELECT COUNT(*) FROM agent_patch_states s WHERE s.agent_id = a.id AND s.state = 'applied') AS applied, \
    (SELECT COUNT(*) FROM patches pt JOIN package_set_members m ON m.org_id = pt.org_id AND m.set_hash = a.package_set AND m.ecosystem = pt.ecosystem AND m.name = pt.package_name AND m.version = pt.package_version \
       WHERE pt.org_id = a.org_id AND pt.superseded = FALSE AND NOT EXISTS (SELECT 1 FROM agent_patch_states s WHERE s.agent_id = a.id AND s.patch_id = pt.patch_id AND s.state = 'applied')) AS missing \
    FROM agents a JOIN computer_groups g ON g.id = a.group_id \
    WHERE a.org_id = $1 AND (LOWER(a.hostname) LIKE $2 OR LOWER(a.ips) LIKE $2 OR LOWER(a.os_name) LIKE $2 OR a.id LIKE $2) \
    ORDER BY a.hostname, a.id";

/// The `show` filter over a row `c` of `COMPUTERS_SQL`: `show` and `since` (the start of the
/// online window) are the numbers of their placeholders.
fn show_filter(show: u8, since: u8) -> String {
    format!(
        "(${show} = '' \
           OR (${show} = 'online' AND c.revoked = FALSE AND c.last_seen >= ${since}) \
           OR (${show} = 'offline' AND (c.revoked = TRUE OR c.last_seen IS NULL OR c.last_seen < ${since})) \
           OR (${show} = 'missing' AND c.missing > 0))"
    )
}

/// A page of `COMPUTERS_SQL` in (hostname, id) order: $7 and $3 are the host name and id of
/// the last computer of the previous page as it was shown (id '' for the first page), $4 the
/// `show` filter, $5 the start of the online window, $6 the row limit. Keyset, not OFFSET, so
/// page 1,000 of 100,000 costs what page 1 costs.
static COMPUTERS_PAGE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT * FROM ({}) c WHERE \
         ($3 = '' OR (c.hostname, c.id) > ($7, $3)) \
         AND {} ORDER BY c.hostname, c.id LIMIT $6",
        COMPUTERS_SQL.trim_end_matches(" ORDER BY a.hostname, a.id"),
        show_filter(4, 5)
    )
});

/// How many computers of an org match a search ($2) and a `show` filter ($3, with $4 the
/// start of the online window): the list the pages of `COMPUTERS_PAGE_SQL` add up to.
static COMPUTERS_SHOWN_COUNT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT COUNT(*) FROM ({}) c WHERE {}",
        COMPUTERS_SQL.trim_end_matches(" ORDER BY a.hostname, a.id"),
        show_filter(3, 4)
    )
});

/// How many computers of an org match a search, for "N computers" above a page.
const COMPUTERS_COUNT_SQL: &str = "SELECT COUNT(*) FROM agents a WHERE a.org_id = $1 AND (LOWER(a.hostname) LIKE $2 OR LOWER(a.ips) LIKE $2 OR LOWER(a.os_name) LIKE $2 OR a.id LIKE $2)";

fn org_from<R: Row>(r: &R) -> DbResult<Org>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let plan: String = r.try_get("plan")?;
    Ok(Org {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        plan: Plan::from_name(&plan).ok_or_else(|| bad_column("plan", &plan))?,
    })
}

fn user_from<R: Row>(r: &R) -> DbResult<User>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let role: String = r.try_get("role")?;
    Ok(User {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        username: r.try_get("username")?,
        password_hash: r.try_get("password_hash")?,
        role: Role::from_name(&role).ok_or_else(|| bad_column("role", &role))?,
    })
}

fn principal_from<R: Row>(r: &R) -> DbResult<Principal>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let role: String = r.try_get("role")?;
    Ok(Principal {
        org_id: r.try_get("org_id")?,
        role: Role::from_name(&role).ok_or_else(|| bad_column("role", &role))?,
    })
}

fn group_from<R: Row>(r: &R) -> DbResult<Group>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let mode: String = r.try_get("default_mode")?;
    Ok(Group {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        name: r.try_get("name")?,
        ring: r.try_get("ring")?,
        is_default: r.try_get("is_default")?,
        default_mode: Mode::from_name(&mode).ok_or_else(|| bad_column("default_mode", &mode))?,
    })
}

fn computer_from<R: Row>(r: &R) -> DbResult<ComputerRow>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let ips: String = r.try_get("ips")?;
    Ok(ComputerRow {
        id: r.try_get("id")?,
        group_id: r.try_get("group_id")?,
        group_name: r.try_get("group_name")?,
        hostname: r.try_get("hostname")?,
        os_name: r.try_get("os_name")?,
        kernel: r.try_get("kernel")?,
        ips: json_list(&ips),
        agent_version: r.try_get("agent_version")?,
        agent_enabled: r.try_get("agent_enabled")?,
        revoked: r.try_get("revoked")?,
        enrolled_at: r.try_get("enrolled_at")?,
        last_seen: r.try_get("last_seen")?,
        patches_applied: r.try_get("applied")?,
        relevant_missing: r.try_get("missing")?,
    })
}

fn catalog_from<R: Row>(r: &R) -> DbResult<CatalogPatch>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let cves: String = r.try_get("cves")?;
    let signed_by: String = r.try_get("signed_by")?;
    Ok(CatalogPatch {
        patch_id: r.try_get("patch_id")?,
        revision: r.try_get("revision")?,
        content_address: r.try_get("content_address")?,
        title: r.try_get("title")?,
        description: r.try_get("description")?,
        cves: json_list(&cves),
        severity: r.try_get("severity")?,
        tier: r.try_get("tier")?,
        author: r.try_get("author")?,
        module: r.try_get("module")?,
        target_sha256: r.try_get("target_sha256")?,
        build_id: r.try_get("build_id")?,
        arch: r.try_get("arch")?,
        ecosystem: r.try_get("ecosystem")?,
        package_name: r.try_get("package_name")?,
        package_version: r.try_get("package_version")?,
        signed_by: json_list(&signed_by),
        uploaded_at: r.try_get("uploaded_at")?,
    })
}

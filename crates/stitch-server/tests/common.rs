//! Shared harness: a real server on loopback per test, against SQLite or PostgreSQL.

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use stitch_format::*;
use stitch_server::model::Plan;
use stitch_server::{BootstrapSpec, Config, ServerHandle};

/// Which storage a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// True when running in CI, where skipping is a failure.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips (returns None) or, in CI, fails.
pub(crate) fn skip(reason: &str) -> Option<std::convert::Infallible> {
    assert!(!in_ci(), "CI=true but this test cannot run: {reason}");
    eprintln!("SKIPPED: {reason}");
    None
}

/// The vendor key tests sign bundles with (trusted by the test server).
pub(crate) fn vendor_key() -> SecretKey {
    SecretKey::from_seed([42; 32])
}

/// A key the server does not trust.
pub(crate) fn rogue_key() -> SecretKey {
    SecretKey::from_seed([13; 32])
}

pub(crate) struct TestServer {
    pub(crate) server: Option<ServerHandle>,
    pub(crate) url: String,
    pub(crate) http: Client,
    #[allow(dead_code, reason = "kept for test diagnostics")]
    pub(crate) backend: Backend,
    _dir: tempfile::TempDir,
}

/// A fresh PostgreSQL schema on STITCH_TEST_DATABASE_URL; returns a URL that uses it.
pub(crate) async fn pg_schema_url() -> Option<String> {
    let Ok(base) = std::env::var("STITCH_TEST_DATABASE_URL") else {
        skip("STITCH_TEST_DATABASE_URL is not set (source .ci/server-deps.sh)")?;
        return None;
    };
    let now = stitch_server::now();
    let schema = format!("t_{now}_{}", stitch_server::auth::random_hex(8));
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {base}: {e}"));
    // Schemas of earlier runs: without this the test cluster grows by a few hundred schemas
    // per run, and PostgreSQL's start-up after an unclean stop (which fsyncs every file)
    // outlasts the CI start timeout. A schema is named with its creation time and dropped
    // once it is older than any test run (30 min); unparsable `t_` names are older formats.
    let old: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 't\\_%'")
            .fetch_all(&mut conn)
            .await
            .expect("list schemas");
    for name in old {
        let parts: Vec<&str> = name.split('_').collect();
        let created = match parts.as_slice() {
            ["t", t, _] => t.parse::<i64>().unwrap_or(0),
            _ => 0,
        };
        if created < now - 1800 {
            // Another test process may be dropping the same schema: ignore a lost race.
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(&mut conn)
                .await;
        }
    }
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

impl TestServer {
    pub(crate) async fn start(backend: Backend) -> Option<TestServer> {
        let url = match backend {
            Backend::Postgres => Some(pg_schema_url().await?),
            Backend::Sqlite => None,
        };
        Some(Self::start_on(url, None).await)
    }

    /// A server on `database_url` (None: SQLite in a fresh directory), optionally sharing
    /// another replica's server key file.
    pub(crate) async fn start_on(
        database_url: Option<String>,
        server_key: Option<std::path::PathBuf>,
    ) -> TestServer {
        let backend = if database_url.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path().to_path_buf());
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.long_poll_max = Duration::from_secs(5);
        config.trusted_keys.insert(vendor_key().public());
        config.database_url = database_url;
        config.server_key_file = server_key;
        let server = stitch_server::run(config).await.expect("server starts");
        let url = server.url();
        TestServer {
            server: Some(server),
            url,
            http: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            backend,
            _dir: dir,
        }
    }

    /// The directory holding this server's data (and `server.key`).
    pub(crate) fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub(crate) fn store(&self) -> &stitch_server::store::Store {
        &self.server.as_ref().expect("running").store
    }

    /// A new organisation with an owner `<name>-admin` / `password-<name>`.
    pub(crate) async fn org(&self, name: &str, plan: Plan) -> Org {
        let out = stitch_server::bootstrap(
            self.store(),
            &BootstrapSpec {
                org: name.into(),
                plan,
                admin: Some((format!("{name}-admin"), format!("password-{name}"))),
            },
        )
        .await
        .expect("bootstrap");
        Org {
            id: out.org_id,
            api: out.api_token,
            enroll: out.enrollment_token,
        }
    }

    pub(crate) fn u(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub(crate) async fn get(&self, token: &str, path: &str) -> Response {
        self.http
            .get(self.u(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET")
    }

    pub(crate) async fn post(&self, token: &str, path: &str, body: &Value) -> Response {
        self.http
            .post(self.u(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    pub(crate) async fn put(&self, token: &str, path: &str, body: &Value) -> Response {
        self.http
            .put(self.u(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("PUT")
    }

    pub(crate) async fn delete(&self, token: &str, path: &str) -> Response {
        self.http
            .delete(self.u(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("DELETE")
    }

    pub(crate) async fn upload(&self, token: &str, bytes: Vec<u8>) -> Response {
        self.http
            .post(self.u("/api/v1/catalog/bundles"))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .expect("upload")
    }

    /// Enrolls an agent and sends a heartbeat with the given packages.
    pub(crate) async fn agent(
        &self,
        org: &Org,
        hostname: &str,
        packages: &[(&str, &str)],
    ) -> Agent {
        let r = self
            .post(
                "",
                "/api/v1/enroll",
                &json!({ "enrollment_token": org.enroll, "hostname": hostname }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.expect("json");
        let agent = Agent {
            id: v["agent_id"].as_str().expect("id").to_string(),
            cred: v["credential"].as_str().expect("cred").to_string(),
            server_key: PublicKey::from_line(v["server_key"].as_str().expect("key"))
                .expect("key line"),
        };
        let r = self
            .post(
                &agent.cred,
                "/api/v1/agent/heartbeat",
                &heartbeat(hostname, packages, &[]),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{}",
            r.text().await.unwrap_or_default()
        );
        agent
    }

    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

pub(crate) struct Org {
    pub(crate) id: i64,
    pub(crate) api: String,
    pub(crate) enroll: String,
}

pub(crate) struct Agent {
    pub(crate) id: String,
    pub(crate) cred: String,
    pub(crate) server_key: PublicKey,
}

/// A heartbeat body with `packages` as (name, version) debs and `states` as (patch, state).
pub(crate) fn heartbeat(
    hostname: &str,
    packages: &[(&str, &str)],
    states: &[(&str, &str)],
) -> Value {
    json!({
        "hostname": hostname,
        "os": { "id": "debian", "version_id": "12", "pretty_name": "Debian GNU/Linux 12 (bookworm)" },
        "kernel": "6.1.0-18-amd64",
        "ip_addresses": ["10.0.0.7", "fe80::1"],
        "agent_version": "0.1.0",
        "agent_enabled": true,
        "packages": packages.iter().map(|(n, v)| json!({"ecosystem": "deb", "name": n, "version": v})).collect::<Vec<_>>(),
        "patches": states.iter().map(|(p, s)| json!({"patch_id": p, "revision": 1, "state": s, "processes": 2})).collect::<Vec<_>>(),
    })
}

/// A valid patch targeting deb `pkg` `version`.
pub(crate) fn patch(id: &str, revision: u32, tier: Tier, pkg: &str, version: &str) -> Patch {
    Patch {
        id: id.into(),
        revision,
        title: format!("Fix for {pkg}"),
        description: "Rejects a length larger than the buffer.".into(),
        cves: vec!["CVE-2026-12345".into()],
        severity: Severity::High,
        tier,
        author: "Stitch Security".into(),
        target: Target {
            module: format!("lib{pkg}.so.1"),
            sha256: [7; 32],
            size: 4096,
            build_id: Some(vec![0xab; 20]),
            arch: Arch::X86_64,
            package: Package {
                ecosystem: Ecosystem::Deb,
                name: pkg.into(),
                version: version.into(),
            },
        },
        imports: vec![],
        patchlets: vec![Patchlet {
            name: "check-len".into(),
            at: 0x1139,
            original: vec![0x55, 0x48, 0x89, 0xe5, 0x90],
            displaced: Displaced::Before,
            resume: 0x113e,
            code: vec![0x90, 0xc3],
            relocs: vec![],
            source: "nop\nret\n".into(),
        }],
    }
}

/// The encoded bundle of `p`, signed by `key`.
pub(crate) fn signed_bundle(p: Patch, key: &SecretKey) -> Vec<u8> {
    let mut b = Bundle::new(p).expect("valid patch");
    b.sign(key).expect("sign");
    b.encode()
}

/// Asserts an error response with `status` and `code`.
pub(crate) async fn assert_error(r: Response, status: StatusCode, code: &str) {
    let got = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(got, status, "body: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(v["error"]["code"], code, "body: {text}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "body: {text}"
    );
}

/// Defines `mod $name { sqlite, postgres }` running the same async body on both backends.
#[macro_export]
macro_rules! both {
    ($name:ident, |$t:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports, reason = "not every test uses every helper")]
            use super::*;
            async fn run($t: $crate::common::TestServer) $body
            #[tokio::test]
            async fn sqlite() {
                let t = $crate::common::TestServer::start($crate::common::Backend::Sqlite).await.expect("sqlite");
                run(t).await;
            }
            #[tokio::test]
            async fn postgres() {
                let Some(t) = $crate::common::TestServer::start($crate::common::Backend::Postgres).await else { return };
                run(t).await;
            }
        }
    };
}

//! Dashboard tests: a real headless Chromium driven through chromedriver's WebDriver HTTP
//! API (a small client below), plus CSRF and role checks over plain HTTP.
//! Skipped with a printed reason when Chromium is missing; in CI (CI=true) that fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use stitch_format::Tier;
use stitch_server::model::Plan;

use crate::common::*;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Browser {
    async fn start() -> Option<Browser> {
        let chromium =
            std::env::var("STITCH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let driver_bin =
            std::env::var("STITCH_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        if !std::path::Path::new(&chromium).exists() || !std::path::Path::new(&driver_bin).exists()
        {
            skip(&format!(
                "{chromium} or {driver_bin} not installed (apt-get install chromium chromium-driver; see .ci/server-deps.sh)"
            ))?;
        }
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not become ready");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"
            ] }
        } } });
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("session")
            .json()
            .await
            .expect("json");
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        let b = Browser {
            driver,
            base,
            session,
            http,
        };
        b.cmd(
            reqwest::Method::POST,
            "/timeouts",
            Some(json!({ "implicit": 5000 })),
        )
        .await;
        Some(b)
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{}", self.base, self.session, path);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("json");
        assert!(v["value"].get("error").is_none(), "webdriver {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let url = format!("{}/session/{}/element", self.base, self.session);
        let body = json!({ "using": "css selector", "value": css });
        let v: Value = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("json");
        if let Some(id) = v["value"][ELEMENT].as_str() {
            return id.to_string();
        }
        let src = self.cmd(reqwest::Method::GET, "/source", None).await;
        panic!(
            "no element {css:?} at {}: {v}\n{}",
            self.url().await,
            src.as_str().unwrap_or("")
        );
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits (up to 5 s) until the current URL's path is `path` (a click that submits a form
    /// may return before the navigation finished).
    async fn wait_path(&self, path: &str) {
        let mut at = String::new();
        for _ in 0..50 {
            at = self.url().await;
            let p = at
                .split_once("://")
                .map(|(_, r)| r)
                .and_then(|r| r.find('/').map(|i| &r[i..]))
                .unwrap_or("");
            if p.split('?').next() == Some(path) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("expected to reach {path}, still at {at}");
    }

    /// Runs `script` in the page and returns its result.
    async fn script(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Clicks `css` and waits (up to 5 s) until the browser left the current URL and the
    /// new page has loaded.
    async fn click_to_new_page(&self, css: &str) {
        let before = self.url().await;
        self.click(css).await;
        self.wait_new_page(&before).await;
    }

    async fn wait_new_page(&self, before: &str) {
        for _ in 0..50 {
            if self.url().await != before
                && self.script("return document.readyState").await == "complete"
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("still at {before}");
    }

    /// The browser's Back button (waits for the page to load).
    async fn back(&self) {
        self.cmd(reqwest::Method::POST, "/back", Some(json!({})))
            .await;
    }

    /// The browser's Forward button (waits for the page to load).
    async fn forward(&self) {
        self.cmd(reqwest::Method::POST, "/forward", Some(json!({})))
            .await;
    }

    async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn screenshot(&self, name: &str) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("png"))
            .expect("base64");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }

    async fn close(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

async fn manifest_len(t: &TestServer, a: &Agent) -> usize {
    let m: stitch_server::manifest::SignedManifest = t
        .get(&a.cred, "/api/v1/agent/manifest")
        .await
        .json()
        .await
        .expect("json");
    stitch_server::manifest::verify(&m, &a.server_key, &a.id, 0, stitch_server::now())
        .expect("verify")
        .patches
        .len()
}

/// A fleet to look at: a paid org, one patch, a production group that needs approval, one
/// computer in it that blocked an exploit.
async fn fleet(t: &TestServer) -> (Org, Agent, i64) {
    let org = t.org("acme", Plan::Paid).await;
    assert_eq!(
        t.upload(
            &org.api,
            signed_bundle(
                patch("ST-2026-0001", 1, Tier::Pro, "libdemo1", "1.0-1"),
                &vendor_key()
            )
        )
        .await
        .status(),
        StatusCode::CREATED
    );
    let g: Value = t
        .post(
            &org.api,
            "/api/v1/groups",
            &json!({"name": "production", "ring": 0, "default_mode": "approval"}),
        )
        .await
        .json()
        .await
        .expect("json");
    let gid = g["id"].as_i64().expect("group id");
    let a = t
        .agent(
            &org,
            "web-prod-1",
            &[("libdemo1", "1.0-1"), ("bash", "5.2")],
        )
        .await;
    assert_eq!(
        t.put(
            &org.api,
            &format!("/api/v1/computers/{}/group", a.id),
            &json!({"group_id": gid})
        )
        .await
        .status(),
        StatusCode::OK
    );
    let ev = json!({"events": [{"id": "x1", "occurred_at": 1_790_000_000, "kind": "exploit_blocked", "patch_id": "ST-2026-0001", "pid": 4242, "exe": "/usr/sbin/demo-daemon", "count": 3}]});
    assert_eq!(
        t.post(&a.cred, "/api/v1/agent/events", &ev).await.status(),
        StatusCode::OK
    );
    (org, a, gid)
}

#[tokio::test]
async fn admin_logs_in_sees_computer_and_approves_patch_in_chromium() {
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let (org, agent, gid) = fleet(&t).await;
    let Some(b) = Browser::start().await else {
        return;
    };
    assert_eq!(
        manifest_len(&t, &agent).await,
        0,
        "approval required before delivery"
    );

    // Wrong password first.
    b.goto(&t.u("/computers")).await;
    b.wait_path("/login").await;
    b.type_into("#username", "acme-admin").await;
    b.type_into("#password", "wrong-password").await;
    b.click("#login").await;
    b.wait_path("/login").await;
    assert!(
        b.text(".flash.error")
            .await
            .contains("Wrong user name or password")
    );
    b.type_into("#username", "acme-admin").await;
    b.type_into("#password", "password-acme").await;
    b.screenshot("dashboard-login").await;
    b.click("#login").await;
    b.wait_path("/computers").await;
    let table = b.text("#computers").await;
    assert!(table.contains("web-prod-1"), "{table}");
    assert!(table.contains("Debian GNU/Linux 12"), "{table}");
    b.screenshot("dashboard-computers").await;

    b.click(&format!("tr[data-id='{}'] a", agent.id)).await;
    b.wait_path(&format!("/computers/{}", agent.id)).await;
    assert_eq!(b.text("#hostname").await, "web-prod-1");
    let blocked = b.text("#blocked").await;
    assert!(
        blocked.contains("/usr/sbin/demo-daemon") && blocked.contains("ST-2026-0001"),
        "{blocked}"
    );
    assert!(b.text("#patched").await.contains("libdemo1"));
    b.screenshot("dashboard-computer").await;

    b.goto(&t.u("/groups")).await;
    let row = format!("#group-{gid} tr[data-patch='ST-2026-0001']");
    let status = b.text(&format!("{row} td.status")).await;
    assert!(status.contains("awaiting approval"), "{status}");
    b.click(&format!("{row} button.approve")).await;
    assert!(b.text(".flash.ok").await.contains("approved"));
    let status = b.text(&format!("{row} td.status")).await;
    assert!(status.contains("delivered"), "{status}");
    b.screenshot("dashboard-groups-approved").await;
    assert_eq!(
        manifest_len(&t, &agent).await,
        1,
        "approval reached the agent's manifest"
    );

    b.goto(&t.u("/patches")).await;
    assert!(b.text("#patches").await.contains("CVE-2026-12345"));
    b.goto(&t.u("/enrollment")).await;
    b.type_into("input[name=name]", "web servers").await;
    b.click("section.card button.primary").await;
    let token = b.text("#new-token").await;
    assert!(token.starts_with("ste_"), "{token}");
    b.screenshot("dashboard-enrollment").await;
    let r = t
        .post("", "/api/v1/enroll", &json!({"enrollment_token": token}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // Team & tokens: the owner adds a colleague and mints an API token that works at once.
    b.click("nav a[href='/team']").await;
    b.wait_path("/team").await;
    b.type_into("#add-user input[name=username]", "carol").await;
    b.type_into("#add-user input[name=password]", "a long enough password")
        .await;
    b.click("#add-user button.primary").await;
    b.wait_path("/team").await;
    assert!(b.text(".flash.ok").await.contains("carol added"));
    assert!(b.text("#users").await.contains("carol"));
    b.type_into("#add-api-token input[name=name]", "CI publisher")
        .await;
    b.click("#add-api-token button.primary").await;
    let api = b.text("#new-api-token").await;
    assert!(api.starts_with("stk_"), "{api}");
    assert!(b.text("#api-tokens").await.contains("CI publisher"));
    b.screenshot("dashboard-team").await;
    assert_eq!(
        t.get(&api, "/api/v1/computers").await.status(),
        StatusCode::OK
    );
    let _ = org;
    b.close().await;
    t.stop().await;
}

/// Logs in over plain HTTP; returns (session cookie, csrf token of the groups page).
async fn http_login(t: &TestServer, user: &str, pass: &str) -> (String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http.get(t.u("/login")).send().await.expect("login page");
    let set = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    let login_csrf = set
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_string())
        .expect("csrf");
    let r = http
        .post(t.u("/login"))
        .header("cookie", format!("stitch_login_csrf={login_csrf}"))
        .form(&[
            ("username", user),
            ("password", pass),
            ("csrf", &login_csrf),
        ])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let session = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("stitch_session="))
        .and_then(|v| v.split(';').next())
        .expect("session cookie")
        .to_string();
    let page = http
        .get(t.u("/groups"))
        .header("cookie", &session)
        .send()
        .await
        .expect("groups")
        .text()
        .await
        .expect("text");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("csrf in page")
        .to_string();
    (session, csrf)
}

#[tokio::test]
async fn dashboard_form_without_csrf_token_is_refused_and_nothing_changes() {
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let (org, agent, gid) = fleet(&t).await;
    let (session, csrf) = http_login(&t, "acme-admin", "password-acme").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = t.u(&format!("/groups/{gid}/approvals/ST-2026-0001"));
    let r = http
        .post(&url)
        .header("cookie", &session)
        .form(&[("csrf", "forged")])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(&url)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("post");
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "no session: redirected to log-in"
    );
    let m: stitch_server::manifest::SignedManifest = t
        .get(&agent.cred, "/api/v1/agent/manifest")
        .await
        .json()
        .await
        .expect("json");
    let p =
        stitch_server::manifest::verify(&m, &agent.server_key, &agent.id, 0, stitch_server::now())
            .expect("verify");
    assert!(p.patches.is_empty(), "nothing was approved");
    // With the right token it works.
    let r = http
        .post(&url)
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap_or("")
            .contains("msg=")
    );
    let _ = org;
    t.stop().await;
}

#[tokio::test]
async fn auditor_cannot_approve_from_dashboard_and_other_org_user_sees_nothing() {
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let (org, agent, gid) = fleet(&t).await;
    let hash = stitch_server::auth::hash_password("auditor-password");
    t.store()
        .create_user(
            org.id,
            "auditor",
            &hash,
            stitch_server::model::Role::Auditor,
            0,
        )
        .await
        .expect("user");
    let (session, csrf) = http_login(&t, "auditor", "auditor-password").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http
        .post(t.u(&format!("/groups/{gid}/approvals/ST-2026-0001")))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("post");
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap_or("")
            .contains("auth.read_only")
    );
    let page = http
        .get(t.u("/groups"))
        .header("cookie", &session)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(
        !page.contains("button class=\"primary small approve\""),
        "auditor sees no approve button"
    );

    let _other = t.org("globex", Plan::Paid).await;
    let (other_session, _) = http_login(&t, "globex-admin", "password-globex").await;
    let r = http
        .get(t.u(&format!("/computers/{}", agent.id)))
        .header("cookie", &other_session)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let page = http
        .get(t.u("/computers"))
        .header("cookie", &other_session)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(!page.contains("web-prod-1"));
    let page = http
        .get(t.u("/patches"))
        .header("cookie", &other_session)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(!page.contains("ST-2026-0001"));
    t.stop().await;
}

#[tokio::test]
async fn computers_page_of_a_large_fleet_is_paged_and_the_next_link_reaches_the_rest() {
    // 100,000 computers on one page would be a page nobody can load; the dashboard shows
    // 100 at a time and links to the next page with the same search.
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let org = t.org("acme", Plan::Paid).await;
    for i in 0..105 {
        t.agent(&org, &format!("host-{i:03}"), &[("bash", "5.2")])
            .await;
    }
    let (session, _) = http_login(&t, "acme-admin", "password-acme").await;
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let session = session.clone();
        let url = t.u(&path);
        async move {
            http.get(url)
                .header("cookie", session)
                .send()
                .await
                .expect("get")
                .text()
                .await
                .expect("text")
        }
    };
    let rows = |page: &str| page.matches("<tr data-id=").count();
    let first = get("/computers?q=host".to_string()).await;
    assert_eq!(rows(&first), 100);
    assert!(first.contains("105 computers"), "count shown");
    assert!(first.contains("host-099") && !first.contains("host-100"));
    let next = first
        .split("id=\"next-page\" href=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("next page link")
        .replace("&amp;", "&");
    assert!(next.contains("q=host"), "the search is kept: {next}");
    let second = get(next).await;
    assert_eq!(rows(&second), 5);
    assert!(second.contains("host-100") && second.contains("host-104"));
    assert!(
        !second.contains("id=\"next-page\""),
        "last page has no next link"
    );
    assert!(second.contains("id=\"first-page\""));
    t.stop().await;
}

/// Enrolls `hostname` through the agents' API and sends its first heartbeat, like
/// `TestServer::agent` but with owned arguments so that many enrollments can run at once.
/// Returns (agent id, credential).
async fn enroll_owned(
    http: reqwest::Client,
    base: String,
    token: String,
    hostname: String,
    packages: Vec<(&'static str, &'static str)>,
) -> (String, String) {
    let r = http
        .post(format!("{base}/api/v1/enroll"))
        .json(&json!({ "enrollment_token": token, "hostname": hostname }))
        .send()
        .await
        .expect("enroll");
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    let id = v["agent_id"].as_str().expect("id").to_string();
    let cred = v["credential"].as_str().expect("cred").to_string();
    let r = http
        .post(format!("{base}/api/v1/agent/heartbeat"))
        .bearer_auth(&cred)
        .json(&heartbeat(&hostname, &packages, &[]))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(r.status(), StatusCode::OK);
    (id, cred)
}

/// The rows the Computers page shows, in order, as (host name, id).
async fn shown_computers(b: &Browser) -> Vec<(String, String)> {
    let v = b
        .script(
            "return Array.from(document.querySelectorAll('#computers tbody tr'))\
             .map(tr => [tr.querySelector('td a').textContent, tr.getAttribute('data-id')])",
        )
        .await;
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().expect("text").to_string();
            (s(0), s(1))
        })
        .collect()
}

/// Whether the page has an element with this id (without the implicit wait).
async fn has_id(b: &Browser, id: &str) -> bool {
    b.script(&format!("return document.getElementById('{id}') !== null"))
        .await
        == true
}

#[tokio::test]
async fn computers_pages_in_chromium_show_each_computer_once_back_and_forth_filtered_and_after_a_rename()
 {
    // Three pages of 100: the browser walks forward and back through them, and through a
    // search and a state filter that span two pages. Keyset pagination must neither skip nor
    // repeat a computer: two computers share a host name exactly at each page boundary (the
    // tie-break on id), and the last computer of a page is renamed by its agent before the
    // next page is asked for (the cursor must not move with it).
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let org = t.org("acme", Plan::Paid).await;
    assert_eq!(
        t.upload(
            &org.api,
            signed_bundle(
                patch("ST-2026-0001", 1, Tier::Pro, "libdemo1", "1.0-1"),
                &vendor_key()
            )
        )
        .await
        .status(),
        StatusCode::CREATED
    );
    // host-000 … host-228, plus a second host-099 and a second host-196. Computers with the
    // vulnerable libdemo1 (even numbers and both extra ones) miss the patch.
    let mut hosts: Vec<(String, bool)> = (0..229)
        .map(|i| (format!("host-{i:03}"), i % 2 == 0))
        .collect();
    hosts.push(("host-099".into(), true));
    hosts.push(("host-196".into(), true));
    let enroll_all = async {
        let mut set = tokio::task::JoinSet::new();
        let mut done = Vec::new();
        for (name, vulnerable) in &hosts {
            let mut packages = vec![("bash", "5.2")];
            if *vulnerable {
                packages.push(("libdemo1", "1.0-1"));
            }
            let (name, vulnerable) = (name.clone(), *vulnerable);
            let enroll = enroll_owned(
                t.http.clone(),
                t.url.clone(),
                org.enroll.clone(),
                name.clone(),
                packages,
            );
            set.spawn(async move { (name, vulnerable, enroll.await) });
            if set.len() >= 8 {
                done.push(set.join_next().await.expect("task").expect("enrolled"));
            }
        }
        while let Some(r) = set.join_next().await {
            done.push(r.expect("enrolled"));
        }
        done
    };
    let (browser, enrolled) = tokio::join!(Browser::start(), enroll_all);
    let Some(b) = browser else {
        return;
    };
    // What the pages must show, in (host name, id) order.
    let mut all: Vec<(String, String)> = enrolled
        .iter()
        .map(|(name, _, (id, _))| (name.clone(), id.clone()))
        .collect();
    all.sort();
    let mut missing: Vec<(String, String)> = enrolled
        .iter()
        .filter(|(_, vulnerable, _)| *vulnerable)
        .map(|(name, _, (id, _))| (name.clone(), id.clone()))
        .collect();
    missing.sort();
    let search: Vec<(String, String)> = all
        .iter()
        .filter(|(name, _)| name.contains("host-1"))
        .cloned()
        .collect();
    assert_eq!((all.len(), missing.len(), search.len()), (231, 117, 101));
    // A shared host name straddles the first page boundary of the whole and the filtered list.
    assert_eq!(all[99].0, "host-099");
    assert_eq!(all[100].0, "host-099");
    assert_eq!(missing[99].0, "host-196");
    assert_eq!(missing[100].0, "host-196");

    b.goto(&t.u("/computers")).await;
    b.wait_path("/login").await;
    b.type_into("#username", "acme-admin").await;
    b.type_into("#password", "password-acme").await;
    b.click("#login").await;
    b.wait_path("/computers").await;

    // Forward through the three pages.
    let page1 = shown_computers(&b).await;
    assert_eq!(page1, all[..100], "page 1");
    assert_eq!(
        b.text("span.count").await,
        "231 computers · 100 on this page"
    );
    assert!(!has_id(&b, "first-page").await);
    b.click_to_new_page("#next-page").await;
    let page2 = shown_computers(&b).await;
    assert_eq!(page2, all[100..200], "page 2");
    assert_eq!(
        b.text("span.count").await,
        "231 computers · 100 on this page"
    );
    b.click_to_new_page("#next-page").await;
    let page3 = shown_computers(&b).await;
    assert_eq!(page3, all[200..], "page 3");
    assert_eq!(
        b.text("span.count").await,
        "231 computers · 31 on this page"
    );
    assert!(
        !has_id(&b, "next-page").await,
        "the last page has no next link"
    );
    b.screenshot("dashboard-computers-page-3").await;

    // Back and forward again with the browser's buttons, then the first-page link.
    b.back().await;
    assert_eq!(shown_computers(&b).await, page2, "back to page 2");
    b.back().await;
    assert_eq!(shown_computers(&b).await, page1, "back to page 1");
    b.forward().await;
    assert_eq!(shown_computers(&b).await, page2, "forward to page 2");
    b.click_to_new_page("#next-page").await;
    assert_eq!(shown_computers(&b).await, page3, "page 3 again");
    b.click_to_new_page("#first-page").await;
    assert_eq!(shown_computers(&b).await, page1, "first page link");

    // The state filter, chosen in the form, is kept by the page links.
    b.click("select[name=show] option[value=missing]").await;
    b.click_to_new_page("form.filters button[type=submit]")
        .await;
    let filtered1 = shown_computers(&b).await;
    assert_eq!(filtered1, missing[..100], "missing patches, page 1");
    assert_eq!(
        b.text("span.count").await,
        "117 computers · 100 on this page"
    );
    b.click_to_new_page("#next-page").await;
    assert_eq!(
        shown_computers(&b).await,
        missing[100..],
        "missing patches, page 2"
    );
    assert_eq!(
        b.text("span.count").await,
        "117 computers · 17 on this page"
    );
    assert_eq!(
        b.script("return document.querySelector('select[name=show]').value")
            .await,
        "missing",
        "page 2 still shows the filter it applies"
    );
    assert!(!has_id(&b, "next-page").await);
    b.screenshot("dashboard-computers-missing-page-2").await;
    b.back().await;
    assert_eq!(
        shown_computers(&b).await,
        filtered1,
        "back to filtered page 1"
    );

    // A search, with the state filter back at All, across its two pages.
    b.click("select[name=show] option[value='']").await;
    b.type_into("#search", "host-1").await;
    b.click_to_new_page("form.filters button[type=submit]")
        .await;
    assert_eq!(shown_computers(&b).await, search[..100], "search, page 1");
    assert_eq!(
        b.text("span.count").await,
        "101 computers · 100 on this page"
    );
    b.click_to_new_page("#next-page").await;
    assert_eq!(shown_computers(&b).await, search[100..], "search, page 2");
    assert_eq!(b.text("span.count").await, "101 computers · 1 on this page");
    assert_eq!(
        b.script("return document.getElementById('search').value")
            .await,
        "host-1"
    );

    // The last computer of page 1 is renamed (its agent reports a new host name) while the
    // user reads page 1: the next page is still the rest of the list after it.
    b.goto(&t.u("/computers")).await;
    assert_eq!(shown_computers(&b).await, page1);
    let (_, cursor) = page1.last().expect("a row").clone();
    let (_, vulnerable, (_, cred)) = enrolled
        .iter()
        .find(|(_, _, (id, _))| *id == cursor)
        .expect("cursor computer");
    let mut packages = vec![("bash", "5.2")];
    if *vulnerable {
        packages.push(("libdemo1", "1.0-1"));
    }
    let r = t
        .post(
            cred,
            "/api/v1/agent/heartbeat",
            &heartbeat("host-050x", &packages, &[]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    b.click_to_new_page("#next-page").await;
    assert_eq!(
        shown_computers(&b).await,
        page2,
        "page 2 after the cursor computer was renamed"
    );
    b.close().await;
    t.stop().await;
}

#[tokio::test]
async fn removed_user_is_signed_out_at_once_and_only_an_owner_sees_the_team_forms() {
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let _org = t.org("acme", Plan::Paid).await;
    let (owner, csrf) = http_login(&t, "acme-admin", "password-acme").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http
        .post(t.u("/team/users"))
        .header("cookie", &owner)
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", "bob"),
            ("password", "correct horse battery"),
            ("role", "auditor"),
        ])
        .send()
        .await
        .expect("add user");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (bob, _) = http_login(&t, "bob", "correct horse battery").await;
    let page = |cookie: String| {
        let http = http.clone();
        let url = t.u("/team");
        async move {
            http.get(url)
                .header("cookie", cookie)
                .send()
                .await
                .expect("get")
        }
    };
    let bob_view = page(bob.clone()).await.text().await.expect("text");
    assert!(bob_view.contains("bob") && !bob_view.contains("id=\"add-user\""));
    let owner_view = page(owner.clone()).await.text().await.expect("text");
    assert!(owner_view.contains("id=\"add-user\"") && owner_view.contains("id=\"add-api-token\""));
    let bob_id = owner_view
        .split("action=\"/team/users/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .expect("remove form for bob")
        .to_string();
    let r = http
        .post(t.u(&format!("/team/users/{bob_id}/remove")))
        .header("cookie", &owner)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = page(bob).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "bob's session ended");
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap_or("")
            .starts_with("/login")
    );
    t.stop().await;
}

/// One sign-in attempt; returns where the server redirects to.
async fn try_login(t: &TestServer, user: &str, pass: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http.get(t.u("/login")).send().await.expect("login page");
    let csrf = r.headers()["set-cookie"]
        .to_str()
        .ok()
        .and_then(|c| c.split(';').next())
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_string())
        .expect("csrf cookie");
    let r = http
        .post(t.u("/login"))
        .header("cookie", format!("stitch_login_csrf={csrf}"))
        .form(&[("username", user), ("password", pass), ("csrf", &csrf)])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    r.headers()["location"].to_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn password_guessing_locks_the_user_name_even_for_the_right_password() {
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let _org = t.org("acme", Plan::Paid).await;
    for _ in 0..stitch_server::auth::LoginThrottle::MAX_FAILURES {
        let to = try_login(&t, "acme-admin", "guess").await;
        assert!(to.starts_with("/login?err=Wrong"), "{to}");
    }
    let to = try_login(&t, "acme-admin", "password-acme").await;
    assert!(to.starts_with("/login?err=Too%20many"), "{to}");
    // A name that does not exist is treated the same, so lockouts reveal no names.
    for _ in 0..stitch_server::auth::LoginThrottle::MAX_FAILURES {
        try_login(&t, "nobody", "guess").await;
    }
    assert!(
        try_login(&t, "nobody", "guess")
            .await
            .starts_with("/login?err=Too%20many")
    );
    t.stop().await;
}

//! The web dashboard: server-rendered HTML (maud), one small vendored CSS and JS file
//! embedded in the binary, no CDN.
//!
//! Log-in creates a session (random token in an `HttpOnly; SameSite=Strict` cookie, only
//! its hash stored). Every state-changing form carries the session's CSRF token, checked in
//! constant time; the log-in form itself uses a double-submit cookie. Auditors see every
//! page but every form is refused for them (and hidden).

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use crate::AppState;
use crate::auth::{self, hashes_equal};
use crate::error::ApiError;
use crate::model::*;
use crate::ops;

const SESSION_COOKIE: &str = "stitch_session";
const LOGIN_CSRF_COOKIE: &str = "stitch_login_csrf";
const SESSION_TTL: i64 = 12 * 3600;
const CSS: &str = include_str!("../assets/app.css");
const JS: &str = include_str!("../assets/app.js");

/// Dashboard routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/computers") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/computers", get(computers))
        .route("/computers/{id}", get(computer))
        .route("/patches", get(patches))
        .route("/patches/{id}/promote", post(promote))
        .route("/groups", get(groups).post(create_group))
        .route("/groups/{id}", post(update_group))
        .route("/groups/{id}/policies/{patch}", post(set_policy))
        .route("/groups/{id}/approvals/{patch}", post(approve))
        .route("/enrollment", get(enrollment).post(create_token))
        .route("/enrollment/{id}/revoke", post(revoke_token))
        .route("/team", get(team))
        .route("/team/users", post(add_user))
        .route("/team/users/{id}/remove", post(remove_user))
        .route("/team/tokens", post(add_api_token))
        .route("/team/tokens/{id}/revoke", post(revoke_api_token))
        .route(
            "/static/app.css",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css"),
                        (header::CACHE_CONTROL, "public, max-age=3600"),
                    ],
                    CSS,
                )
            }),
        )
        .route(
            "/static/app.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript"),
                        (header::CACHE_CONTROL, "public, max-age=3600"),
                    ],
                    JS,
                )
            }),
        )
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age: i64) -> String {
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// A logged-in dashboard user.
pub struct Session {
    user: User,
    csrf: String,
    org: Org,
}

impl Session {
    fn principal(&self) -> Principal {
        Principal {
            org_id: self.user.org_id,
            role: self.user.role,
        }
    }
    /// The refusal to send when the form's CSRF token is not this session's.
    fn csrf_failure(&self, token: &str) -> Option<Response> {
        if hashes_equal(&self.csrf, token) {
            return None;
        }
        let msg = "CSRF token missing or wrong; reload the page";
        Some((StatusCode::FORBIDDEN, msg).into_response())
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_login = || Redirect::to("/login").into_response();
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login());
        };
        let found = state
            .store
            .session(&auth::token_hash(&token), crate::now())
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        let Some((user, csrf)) = found else {
            return Err(to_login());
        };
        let org = state
            .store
            .org(user.org_id)
            .await
            .map_err(|e| ApiError::from(e).into_response())?
            .ok_or_else(to_login)?;
        Ok(Session { user, csrf, org })
    }
}

// ------------------------------------------------------------------------------ rendering

fn page(title: &str, s: Option<&Session>, active: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Stitch" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { span.logo { "◆" } " Stitch" }
                    @if let Some(s) = s {
                        nav {
                            @for (href, label) in [("/computers", "Computers"), ("/patches", "Patches"), ("/groups", "Groups & policies"), ("/enrollment", "Enrollment"), ("/team", "Team & tokens")] {
                                a href=(href) class=(if active == href { "active" } else { "" }) { (label) }
                            }
                        }
                        div.who {
                            span { (s.org.name) " · " (s.user.username) " (" (s.user.role.as_str()) ")" }
                            span.plan { (s.org.plan.as_str()) " plan" }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn html_response(m: Markup) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        m.into_string(),
    )
        .into_response()
}

fn error_page(s: &Session, e: &ApiError) -> Response {
    let body = html! {
        div.flash.error { strong { (e.code) } ": " (e.message) }
        p { a href="javascript:history.back()" { "Back" } }
    };
    (e.status, html_response(page("Error", Some(s), "", body))).into_response()
}

/// `2026-11-24 10:22 UTC`.
pub fn fmt_time(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

fn ago(ts: Option<i64>, now: i64) -> String {
    match ts {
        None => "never".into(),
        Some(t) => {
            let d = (now - t).max(0);
            match d {
                0..60 => "just now".into(),
                60..3600 => format!("{} min ago", d / 60),
                3600..86_400 => format!("{} h ago", d / 3600),
                _ => format!("{} days ago", d / 86_400),
            }
        }
    }
}

fn severity_badge(s: &str) -> Markup {
    html! { span class=(format!("badge sev-{s}")) { (s) } }
}

fn state_badge(s: &str) -> Markup {
    html! { span class=(format!("badge st-{s}")) { (s) } }
}

// ------------------------------------------------------------------------------ log-in

#[derive(Deserialize, Default)]
struct Msg {
    #[serde(default)]
    msg: String,
    #[serde(default)]
    err: String,
}

fn flash(q: &Msg) -> Markup {
    html! {
        @if !q.msg.is_empty() { div.flash.ok role="status" { (q.msg) } }
        @if !q.err.is_empty() { div.flash.error role="alert" { (q.err) } }
    }
}

async fn login_page(State(state): State<AppState>, Query(q): Query<Msg>) -> Response {
    let csrf = auth::random_hex(16);
    let body = html! {
        section.login {
            h1 { "Sign in" }
            (flash(&q))
            form method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label { "User name" input #username name="username" autocomplete="username" required autofocus; }
                label { "Password" input #password name="password" type="password" autocomplete="current-password" required; }
                button.primary #login type="submit" { "Sign in" }
            }
        }
    };
    let mut r = html_response(page("Sign in", None, "", body));
    if let Ok(v) = set_cookie(&state, LOGIN_CSRF_COOKIE, &csrf, 3600).parse() {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    csrf: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let bad = |m: &str| Redirect::to(&format!("/login?err={}", urlencode(m))).into_response();
    let Ok(Form(f)) = form else {
        return bad("Fill in user name and password");
    };
    let cookie_csrf = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if cookie_csrf.is_empty() || !hashes_equal(&cookie_csrf, &f.csrf) {
        return bad("Your sign-in form expired; try again");
    }
    let now = crate::now();
    if let Some(wait) = state.login_throttle.locked(&f.username, now) {
        return bad(&format!(
            "Too many failed sign-ins for this user name; try again in {} minute(s)",
            (wait + 59) / 60
        ));
    }
    let user = match state.store.user_by_name(&f.username).await {
        Ok(u) => u,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // Verify against a dummy hash when the user does not exist, so timing does not tell.
    let ok = match &user {
        Some(u) => auth::verify_password(&f.password, &u.password_hash),
        None => {
            let _ = auth::verify_password(
                &f.password,
                "$argon2id$v=19$m=19456,t=2,p=1$c3RpdGNoc3RpdGNo$0000000000000000000000000000000000000000000",
            );
            false
        }
    };
    let Some(user) = user.filter(|_| ok) else {
        state.login_throttle.failed(&f.username, now);
        return bad("Wrong user name or password");
    };
    state.login_throttle.succeeded(&f.username);
    let token = auth::random_hex(32);
    let csrf = auth::random_hex(32);
    if let Err(e) = state
        .store
        .create_session(
            &auth::token_hash(&token),
            user.id,
            &csrf,
            crate::now() + SESSION_TTL,
        )
        .await
    {
        return ApiError::from(e).into_response();
    }
    let mut r = Redirect::to("/computers").into_response();
    if let Ok(v) = set_cookie(&state, SESSION_COOKIE, &token, SESSION_TTL).parse() {
        r.headers_mut().append(SET_COOKIE, v);
    }
    if let Ok(v) = set_cookie(&state, LOGIN_CSRF_COOKIE, "", 0).parse() {
        r.headers_mut().append(SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    s: Session,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        let _ = state.store.delete_session(&auth::token_hash(&token)).await;
    }
    let mut r = Redirect::to("/login?msg=Signed%20out").into_response();
    if let Ok(v) = set_cookie(&state, SESSION_COOKIE, "", 0).parse() {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ------------------------------------------------------------------------------ computers

#[derive(Deserialize)]
struct ComputerFilter {
    #[serde(default)]
    q: String,
    #[serde(default)]
    show: String,
    /// `next` of the previous page (keyset cursor: host name and id of its last computer).
    #[serde(default)]
    after: String,
}

async fn computers(
    State(state): State<AppState>,
    s: Session,
    Query(f): Query<ComputerFilter>,
) -> Response {
    let now = crate::now();
    let window = state.config.online_window.as_secs() as i64;
    let query = ComputerQuery {
        search: f.q.trim().to_string(),
        show: f.show.clone(),
        after: f.after.clone(),
        online_since: now - window,
        limit: ComputerQuery::DEFAULT_LIMIT,
    };
    let page_rows = match state.store.computers(s.user.org_id, &query).await {
        Ok(r) => r,
        Err(e) => return error_page(&s, &e.into()),
    };
    // The count above the list is of the list the pages add up to: with a state filter, of
    // the computers it keeps, not of every computer the search matches.
    let total = if query.show.is_empty() {
        page_rows.total
    } else {
        match state.store.count_computers(s.user.org_id, &query).await {
            Ok(n) => n,
            Err(e) => return error_page(&s, &e.into()),
        }
    };
    let online = |c: &ComputerRow| c.last_seen.is_some_and(|t| t >= now - window) && !c.revoked;
    let rows: Vec<&ComputerRow> = page_rows.computers.iter().collect();
    // Page links keep the search and the filter; `after` is the keyset cursor.
    let href = |after: &str| {
        let qs = serde_urlencoded::to_string([
            ("q", f.q.as_str()),
            ("show", f.show.as_str()),
            ("after", after),
        ])
        .unwrap_or_default();
        format!("/computers?{qs}")
    };
    let next_href = page_rows.next.as_deref().map(href);
    let body = html! {
        div.head {
            h1 { "Computers" }
            span.count { (total) " computers · " (rows.len()) " on this page" }
        }
        form.filters method="get" action="/computers" {
            input #search type="search" name="q" value=(f.q) placeholder="Search host name, IP, OS…" data-filter="#computers";
            select name="show" {
                @for (v, l) in [("", "All"), ("online", "Online"), ("offline", "Offline"), ("missing", "Missing patches")] {
                    option value=(v) selected[f.show == v] { (l) }
                }
            }
            button type="submit" { "Filter" }
        }
        @if rows.is_empty() {
            p.empty { "No computers yet. Create an " a href="/enrollment" { "enrollment token" } " and install the agent." }
        } @else {
            table #computers {
                thead { tr { th { "Name" } th { "OS" } th { "IP" } th { "Agent" } th { "Status" } th { "Last seen" } th.num { "Applied" } th.num { "Missing" } th { "Group" } } }
                tbody {
                    @for c in &rows {
                        tr data-id=(c.id) {
                            td { a href=(format!("/computers/{}", c.id)) { (if c.hostname.is_empty() { &c.id } else { &c.hostname }) } }
                            td { (c.os_name) }
                            td.mono { (c.ips.join(", ")) }
                            td.mono { (c.agent_version) }
                            td {
                                @if c.revoked { span.badge.st-failed { "revoked" } }
                                @else if !online(c) { span.badge.off { "offline" } }
                                @else if c.agent_enabled { span.badge.on { "on" } }
                                @else { span.badge.st-disabled { "agent off" } }
                            }
                            td title=(c.last_seen.map(fmt_time).unwrap_or_default()) { (ago(c.last_seen, now)) }
                            td.num { (c.patches_applied) }
                            td.num { @if c.relevant_missing > 0 { span.badge.sev-high { (c.relevant_missing) } } @else { "0" } }
                            td { (c.group_name) }
                        }
                    }
                }
            }
        }
        @if !f.after.is_empty() || next_href.is_some() {
            nav.pager {
                @if !f.after.is_empty() { a #first-page href=(href("")) { "← First page" } }
                @if let Some(h) = &next_href { a #next-page href=(h) { "Next page →" } }
            }
        }
    };
    html_response(page("Computers", Some(&s), "/computers", body))
}

async fn computer(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> Response {
    let org = s.user.org_id;
    let c = match state.store.computer(org, &id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return error_page(
                &s,
                &ApiError::not_found("computer.unknown", "no such computer"),
            );
        }
        Err(e) => return error_page(&s, &e.into()),
    };
    let (packages, events, blocked, patch_states) = match tokio::try_join!(
        state.store.computer_packages(org, &id),
        state.store.events(org, &id, None, 100),
        state.store.events(org, &id, Some("exploit_blocked"), 100),
        state.store.computer_states(org, &id),
    ) {
        Ok(x) => x,
        Err(e) => return error_page(&s, &e.into()),
    };
    let now = crate::now();
    let patched: Vec<_> = packages.iter().filter(|p| p.patch_id.is_some()).collect();
    let body = html! {
        p.crumbs { a href="/computers" { "Computers" } " / " }
        div.head { h1 #hostname { (c.hostname) } span.mono.count { (c.id) } }
        dl.facts {
            dt { "OS" } dd { (c.os_name) }
            dt { "Kernel" } dd.mono { (c.kernel) }
            dt { "IP addresses" } dd.mono { (c.ips.join(", ")) }
            dt { "Agent" } dd { (c.agent_version) " · " (if c.agent_enabled { "enabled" } else { "disabled" }) }
            dt { "Group" } dd { (c.group_name) }
            dt { "Last seen" } dd { (ago(c.last_seen, now)) }
            dt { "Enrolled" } dd { (fmt_time(c.enrolled_at)) }
        }
        h2 { "Applications with patches" }
        @if patched.is_empty() { p.empty { "No installed application has a patch in your catalog." } }
        @else {
            table #patched {
                thead { tr { th { "Package" } th { "Version" } th { "Patch" } th { "Severity" } th { "State" } th.num { "Processes" } } }
                tbody { @for p in &patched {
                    tr {
                        td { (p.package.name) } td.mono { (p.package.version) }
                        td { (p.patch_id.as_deref().unwrap_or("")) " " span.muted { (p.patch_title.as_deref().unwrap_or("")) } }
                        td { (severity_badge(p.severity.as_deref().unwrap_or(""))) }
                        td { (state_badge(p.state.as_deref().unwrap_or("missing"))) @if let Some(code) = &p.error_code { " " code { (code) } } }
                        td.num { (p.processes.unwrap_or(0)) }
                    }
                } }
            }
        }
        h2 { "Patches on this computer" }
        @if patch_states.is_empty() { p.empty { "The agent reports no patch here yet." } }
        @else {
            table #patch-states {
                thead { tr { th { "Patch" } th.num { "Revision" } th { "State" } th.num { "Processes" } } }
                tbody { @for st in &patch_states {
                    tr { td { (st.patch_id) } td.num { (st.revision) }
                         td { (state_badge(&st.state)) @if let Some(code) = &st.error_code { " " code { (code) } } }
                         td.num { (st.processes) } }
                } }
            }
        }
        h2 { "Exploit attempts blocked" }
        @if blocked.is_empty() { p.empty { "None recorded." } }
        @else {
            table #blocked {
                thead { tr { th { "When" } th { "Patch" } th { "Process" } th.num { "Count" } } }
                tbody { @for e in &blocked {
                    tr { td { (fmt_time(e.occurred_at)) } td { (e.patch_id.as_deref().unwrap_or("")) }
                         td.mono { (e.data["exe"].as_str().unwrap_or("")) " (pid " (e.data["pid"]) ")" } td.num { (e.data["count"]) } }
                } }
            }
        }
        h2 { "Events" }
        @if events.is_empty() { p.empty { "No events yet." } }
        @else {
            table #events {
                thead { tr { th { "When" } th { "Event" } th { "Patch" } th { "Details" } } }
                tbody { @for e in &events {
                    tr { td { (fmt_time(e.occurred_at)) } td { (e.kind.replace('_', " ")) } td { (e.patch_id.as_deref().unwrap_or("")) }
                         td.mono.small { (event_details(&e.data)) } }
                } }
            }
        }
        details {
            summary { "All installed packages (" (packages.len()) ")" }
            input type="search" placeholder="Filter packages…" data-filter="#packages";
            table #packages {
                thead { tr { th { "Ecosystem" } th { "Name" } th { "Version" } } }
                tbody { @for p in &packages { tr { td { (p.package.ecosystem) } td { (p.package.name) } td.mono { (p.package.version) } } } }
            }
        }
    };
    html_response(page(&c.hostname, Some(&s), "/computers", body))
}

fn event_details(v: &serde_json::Value) -> String {
    let Some(o) = v.as_object() else {
        return String::new();
    };
    o.iter()
        .filter(|(k, _)| *k != "kind" && *k != "patch_id")
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ------------------------------------------------------------------------------ patches

async fn patches(State(state): State<AppState>, s: Session, Query(q): Query<Msg>) -> Response {
    let list = match state.store.patches(s.user.org_id).await {
        Ok(l) => l,
        Err(e) => return error_page(&s, &e.into()),
    };
    let paid = s.org.plan == Plan::Paid;
    let write = s.user.role.can_write();
    let body = html! {
        div.head { h1 { "Patches" } span.count { (list.len()) " in catalog" } }
        (flash(&q))
        @if list.is_empty() { p.empty { "The catalog is empty. Upload signed bundles with " code { "POST /api/v1/catalog/bundles" } "." } }
        @else {
            input type="search" placeholder="Filter patches…" data-filter="#patches";
            table #patches {
                thead { tr { th { "Patch" } th { "CVE" } th { "Severity" } th { "Tier" } th { "Target" } th.num { "Affected" } th.num { "Applied" } @if paid { th { "Rollout" } } } }
                tbody { @for p in &list {
                    tr data-patch=(p.patch.patch_id) {
                        td { strong { (p.patch.patch_id) } " r" (p.patch.revision) br; span.muted { (p.patch.title) } }
                        td { @for c in &p.patch.cves { span.mono { (c) } " " } }
                        td { (severity_badge(&p.patch.severity)) }
                        td { (p.patch.tier) }
                        td.small { (p.patch.package_name) " " span.mono { (p.patch.package_version) } br; span.muted.mono { (p.patch.module) } }
                        td.num { (p.computers_affected) }
                        td.num { (p.computers_applied) }
                        @if paid { td {
                            "ring ≤ " (p.rollout_ring)
                            @if write {
                                form.inline method="post" action=(format!("/patches/{}/promote", p.patch.patch_id)) {
                                    input type="hidden" name="csrf" value=(s.csrf);
                                    input type="hidden" name="ring" value=(p.rollout_ring + 1);
                                    button.small type="submit" { "Promote to ring " (p.rollout_ring + 1) }
                                }
                            }
                        } }
                    }
                } }
            }
        }
    };
    html_response(page("Patches", Some(&s), "/patches", body))
}

#[derive(Deserialize)]
struct RingForm {
    csrf: String,
    ring: i64,
}

fn done(to: &str, r: Result<(), ApiError>, ok: &str) -> Response {
    match r {
        Ok(()) => Redirect::to(&format!("{to}?msg={}", urlencode(ok))).into_response(),
        Err(e) => Redirect::to(&format!(
            "{to}?err={}",
            urlencode(&format!("{}: {}", e.code, e.message))
        ))
        .into_response(),
    }
}

async fn promote(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<RingForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::promote(&state, s.principal(), &id, f.ring).await;
    done("/patches", r, &format!("{id} promoted to ring {}", f.ring))
}

// ------------------------------------------------------------------------------ groups

async fn groups(State(state): State<AppState>, s: Session, Query(q): Query<Msg>) -> Response {
    let org = s.user.org_id;
    let (groups, policies, patches) = match tokio::try_join!(
        state.store.groups(org),
        state.store.policies(org),
        state.store.patches(org)
    ) {
        Ok(x) => x,
        Err(e) => return error_page(&s, &e.into()),
    };
    let paid = s.org.plan == Plan::Paid;
    let write = s.user.role.can_write();
    let body = html! {
        div.head { h1 { "Groups & policies" } }
        (flash(&q))
        @if !paid { p.note { "The free plan has one default group and receives free-tier patches automatically. Groups, rollout rings and approvals come with a paid plan." } }
        @for g in &groups {
            section.group id=(format!("group-{}", g.id)) {
                h2 { (g.name) " " span.muted { "ring " (g.ring) " · " (g.default_mode.as_str()) } }
                @if write && paid {
                    form.inline method="post" action=(format!("/groups/{}", g.id)) {
                        input type="hidden" name="csrf" value=(s.csrf);
                        label { "Ring " input type="number" name="ring" min="0" max="100" value=(g.ring); }
                        label { "New patches "
                            select name="default_mode" {
                                option value="automatic" selected[g.default_mode == Mode::Automatic] { "automatic" }
                                option value="approval" selected[g.default_mode == Mode::Approval] { "need approval" }
                            }
                        }
                        button.small type="submit" { "Save" }
                    }
                }
                @if patches.is_empty() { p.empty { "No patches in the catalog." } }
                @else {
                    table.policies {
                        thead { tr { th { "Patch" } th { "Severity" } th { "Mode" } th { "Status in this group" } @if write { th { "Actions" } } } }
                        tbody { @for p in &patches {
                            @let pol = policies.iter().find(|x| x.group_id == g.id && x.patch_id == p.patch.patch_id);
                            @let enabled = pol.is_none_or(|x| x.enabled);
                            @let mode = pol.map(|x| x.mode).unwrap_or(g.default_mode);
                            @let approved = pol.is_some_and(|x| x.approved);
                            @let tier_ok = paid || p.patch.tier == "free";
                            @let reached = !paid || g.ring <= p.rollout_ring;
                            tr data-patch=(p.patch.patch_id) {
                                td { strong { (p.patch.patch_id) } " " span.muted { (p.patch.title) } }
                                td { (severity_badge(&p.patch.severity)) }
                                td { (if paid { mode.as_str() } else { "automatic" }) }
                                td.status {
                                    @if !tier_ok { span.badge.off { "needs paid plan" } }
                                    @else if !enabled { span.badge.st-disabled { "disabled" } }
                                    @else if !reached { span.badge.st-pending { "waiting for ring " (g.ring) } }
                                    @else if paid && mode == Mode::Approval && !approved { span.badge.st-pending { "awaiting approval" } }
                                    @else { span.badge.on { "delivered" } }
                                }
                                @if write { td.actions {
                                    @if paid && mode == Mode::Approval && !approved {
                                        form.inline method="post" action=(format!("/groups/{}/approvals/{}", g.id, p.patch.patch_id)) {
                                            input type="hidden" name="csrf" value=(s.csrf);
                                            button.primary.small.approve type="submit" { "Approve" }
                                        }
                                    }
                                    @if paid || g.is_default {
                                        form.inline method="post" action=(format!("/groups/{}/policies/{}", g.id, p.patch.patch_id)) {
                                            input type="hidden" name="csrf" value=(s.csrf);
                                            input type="hidden" name="enabled" value=(if enabled { "false" } else { "true" });
                                            button.small type="submit" { (if enabled { "Disable" } else { "Enable" }) }
                                        }
                                    }
                                    @if paid {
                                        form.inline method="post" action=(format!("/groups/{}/policies/{}", g.id, p.patch.patch_id)) {
                                            input type="hidden" name="csrf" value=(s.csrf);
                                            input type="hidden" name="mode" value=(if mode == Mode::Approval { "automatic" } else { "approval" });
                                            button.small.link type="submit" { (if mode == Mode::Approval { "Make automatic" } else { "Require approval" }) }
                                        }
                                    }
                                } }
                            }
                        } }
                    }
                }
            }
        }
        @if write && paid {
            section.card {
                h2 { "New group" }
                form method="post" action="/groups" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label { "Name " input name="name" required maxlength="100"; }
                    label { "Ring " input type="number" name="ring" min="0" max="100" value="1"; }
                    label { "New patches "
                        select name="default_mode" { option value="automatic" { "automatic" } option value="approval" { "need approval" } }
                    }
                    button.primary type="submit" { "Create group" }
                }
                p.muted.small { "Ring 0 is the canary ring: new patches reach it first. Promote a patch on the Patches page to reach later rings." }
            }
        }
    };
    html_response(page("Groups", Some(&s), "/groups", body))
}

#[derive(Deserialize)]
struct GroupForm {
    csrf: String,
    #[serde(default)]
    name: String,
    ring: i64,
    default_mode: Mode,
}

async fn create_group(
    State(state): State<AppState>,
    s: Session,
    Form(f): Form<GroupForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::create_group(&state, s.principal(), &f.name, f.ring, f.default_mode)
        .await
        .map(|_| ());
    done("/groups", r, &format!("Group {} created", f.name))
}

async fn update_group(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<i64>,
    Form(f): Form<GroupForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::update_group(&state, s.principal(), id, f.ring, f.default_mode)
        .await
        .map(|_| ());
    done("/groups", r, "Group saved")
}

#[derive(Deserialize)]
struct PolicyForm {
    csrf: String,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    mode: Option<Mode>,
}

async fn set_policy(
    State(state): State<AppState>,
    s: Session,
    Path((id, patch)): Path<(i64, String)>,
    Form(f): Form<PolicyForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::set_policy(&state, s.principal(), id, &patch, f.enabled, f.mode).await;
    done("/groups", r, &format!("Policy for {patch} saved"))
}

async fn approve(
    State(state): State<AppState>,
    s: Session,
    Path((id, patch)): Path<(i64, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::approve(&state, s.principal(), id, &patch).await;
    done("/groups", r, &format!("{patch} approved"))
}

// ------------------------------------------------------------------------------ enrollment

async fn enrollment(State(state): State<AppState>, s: Session, Query(q): Query<Msg>) -> Response {
    let org = s.user.org_id;
    let (tokens, groups) =
        match tokio::try_join!(state.store.enrollment_tokens(org), state.store.groups(org)) {
            Ok(x) => x,
            Err(e) => return error_page(&s, &e.into()),
        };
    enrollment_page(&s, &q, &tokens, &groups, None)
}

fn enrollment_page(
    s: &Session,
    q: &Msg,
    tokens: &[EnrollmentToken],
    groups: &[Group],
    fresh: Option<&str>,
) -> Response {
    let write = s.user.role.can_write();
    let paid = s.org.plan == Plan::Paid;
    let body = html! {
        div.head { h1 { "Enrollment tokens" } }
        (flash(q))
        @if let Some(t) = fresh {
            div.flash.ok {
                p { "New token — copy it now, it is not shown again:" }
                code #new-token.token { (t) }
                p.small { "Install: " code { "stitchd enroll --server <URL> --token " (t) } }
            }
        }
        table #tokens {
            thead { tr { th { "Name" } th { "Group" } th { "Token" } th { "Created" } th.num { "Enrolled" } th { "Status" } @if write { th {} } } }
            tbody { @for t in tokens {
                tr {
                    td { (t.name) } td { (t.group_name) } td.mono { (t.hint) "…" } td { (fmt_time(t.created_at)) } td.num { (t.uses) }
                    td { @if t.revoked { span.badge.off { "revoked" } } @else { span.badge.on { "active" } } }
                    @if write { td { @if !t.revoked {
                        form.inline method="post" action=(format!("/enrollment/{}/revoke", t.id)) {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button.small.danger type="submit" { "Revoke" }
                        }
                    } } }
                }
            } }
        }
        @if write {
            section.card {
                h2 { "New enrollment token" }
                form method="post" action="/enrollment" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label { "Name " input name="name" required maxlength="100" placeholder="e.g. web servers"; }
                    label { "Group "
                        select name="group_id" { @for g in groups { @if paid || g.is_default { option value=(g.id) { (g.name) } } } }
                    }
                    button.primary type="submit" { "Create token" }
                }
            }
        }
    };
    html_response(page("Enrollment", Some(s), "/enrollment", body))
}

#[derive(Deserialize)]
struct TokenForm {
    csrf: String,
    name: String,
    group_id: i64,
}

async fn create_token(
    State(state): State<AppState>,
    s: Session,
    Form(f): Form<TokenForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    match ops::create_enrollment_token(&state, s.principal(), Some(f.group_id), &f.name).await {
        Ok((_, token)) => {
            let org = s.user.org_id;
            match tokio::try_join!(state.store.enrollment_tokens(org), state.store.groups(org)) {
                Ok((tokens, groups)) => {
                    enrollment_page(&s, &Msg::default(), &tokens, &groups, Some(&token))
                }
                Err(e) => error_page(&s, &e.into()),
            }
        }
        Err(e) => done("/enrollment", Err(e), ""),
    }
}

async fn revoke_token(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::revoke_enrollment_token(&state, s.principal(), id).await;
    done("/enrollment", r, "Token revoked")
}

// ------------------------------------------------------------------------------ team

async fn team(State(state): State<AppState>, s: Session, Query(q): Query<Msg>) -> Response {
    team_response(&state, &s, &q, None).await
}

async fn team_response(
    state: &AppState,
    s: &Session,
    q: &Msg,
    fresh_token: Option<&str>,
) -> Response {
    let org = s.user.org_id;
    let (users, tokens) =
        match tokio::try_join!(state.store.users(org), state.store.api_tokens(org)) {
            Ok(x) => x,
            Err(e) => return error_page(s, &e.into()),
        };
    let owner = s.user.role == Role::Owner;
    let roles = [Role::Auditor, Role::Admin, Role::Owner];
    let body = html! {
        div.head { h1 { "Team & API tokens" } }
        (flash(q))
        @if let Some(t) = fresh_token {
            div.flash.ok {
                p { "New API token — copy it now, it is not shown again:" }
                code #new-api-token.token { (t) }
                p.small { "Use: " code { "Authorization: Bearer " (t) } " or " code { "stitch publish --token " (t) } }
            }
        }
        @if !owner { p.muted { "Only an owner can add or remove people and API tokens." } }
        h2 { "People" }
        table #users {
            thead { tr { th { "User" } th { "Role" } th { "Added" } @if owner { th {} } } }
            tbody { @for u in &users {
                tr {
                    td { (u.username) @if u.id == s.user.id { span.muted { " (you)" } } }
                    td { (u.role.as_str()) } td { (fmt_time(u.created_at)) }
                    @if owner { td { @if u.id != s.user.id {
                        form.inline method="post" action=(format!("/team/users/{}/remove", u.id)) {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button.small.danger type="submit" { "Remove" }
                        }
                    } } }
                }
            } }
        }
        @if owner {
            section.card {
                h2 { "Add a person" }
                form #add-user method="post" action="/team/users" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label { "User name " input name="username" required maxlength="64" autocomplete="off"; }
                    label { "Password " input name="password" type="password" required minlength=(ops::MIN_PASSWORD_LEN) autocomplete="new-password"; }
                    label { "Role " select name="role" { @for r in roles { option value=(r.as_str()) { (r.as_str()) } } } }
                    button.primary type="submit" { "Add" }
                }
            }
        }
        h2 { "API tokens" }
        table #api-tokens {
            thead { tr { th { "Name" } th { "Role" } th { "Created" } th { "Status" } @if owner { th {} } } }
            tbody { @for t in &tokens {
                tr {
                    td { (t.name) } td { (t.role.as_str()) } td { (fmt_time(t.created_at)) }
                    td { @if t.revoked { span.badge.off { "revoked" } } @else { span.badge.on { "active" } } }
                    @if owner { td { @if !t.revoked {
                        form.inline method="post" action=(format!("/team/tokens/{}/revoke", t.id)) {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button.small.danger type="submit" { "Revoke" }
                        }
                    } } }
                }
            } }
        }
        @if owner {
            section.card {
                h2 { "New API token" }
                form #add-api-token method="post" action="/team/tokens" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label { "Name " input name="name" required maxlength="100" placeholder="e.g. CI publisher"; }
                    label { "Role " select name="role" { @for r in roles { option value=(r.as_str()) selected[r == Role::Admin] { (r.as_str()) } } } }
                    button.primary type="submit" { "Create token" }
                }
            }
        }
    };
    html_response(page("Team", Some(s), "/team", body))
}

#[derive(Deserialize)]
struct UserForm {
    csrf: String,
    username: String,
    password: String,
    role: Role,
}

async fn add_user(State(state): State<AppState>, s: Session, Form(f): Form<UserForm>) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::create_user(&state, s.principal(), &f.username, &f.password, f.role).await;
    done(
        "/team",
        r.map(|_| ()),
        &format!("{} added", f.username.trim()),
    )
}

async fn remove_user(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::remove_user(&state, s.principal(), Some(s.user.id), id).await;
    done("/team", r, "User removed")
}

#[derive(Deserialize)]
struct ApiTokenForm {
    csrf: String,
    name: String,
    role: Role,
}

async fn add_api_token(
    State(state): State<AppState>,
    s: Session,
    Form(f): Form<ApiTokenForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    match ops::create_api_token(&state, s.principal(), &f.name, f.role).await {
        Ok((_, token)) => team_response(&state, &s, &Msg::default(), Some(&token)).await,
        Err(e) => done("/team", Err(e), ""),
    }
}

async fn revoke_api_token(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = s.csrf_failure(&f.csrf) {
        return r;
    }
    let r = ops::revoke_api_token(&state, s.principal(), id).await;
    done("/team", r, "API token revoked")
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_dates() {
        assert_eq!(super::fmt_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::fmt_time(1_700_000_000), "2023-11-14 22:13 UTC");
    }
}

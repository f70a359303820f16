//! HTTP routes: the agent API, the management API, health, metrics and the OpenAPI file.
//! The dashboard's routes live in [`crate::dashboard`].

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use stitch_protocol::{Event, EventBatch, EventsAccepted};

use crate::AppState;
use crate::auth::{self, AgentCaller, ApiCaller};
use crate::error::{ApiError, ApiResult};
use crate::manifest::{self, ManifestPayload, SignedManifest};
use crate::model::*;
use crate::ops;
use crate::store::{HeartbeatWrite, NewEvent};

/// Largest JSON body an agent may send (a heartbeat with a big inventory).
pub const MAX_AGENT_BODY: usize = 4 << 20;
/// Largest management JSON body.
pub const MAX_JSON_BODY: usize = 64 << 10;
/// Largest bundle upload.
pub const MAX_BUNDLE_UPLOAD: usize = stitch_format::limits::MAX_BUNDLE_BYTES;
/// Most packages in one inventory.
pub const MAX_PACKAGES: usize = 50_000;
/// Most patch states in one heartbeat.
pub const MAX_PATCH_STATES: usize = 2_000;
/// Most events in one batch.
pub use stitch_protocol::MAX_EVENTS;

const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// JSON body extractor whose rejections are API errors with stable codes.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::bad_request(
                "request.malformed_json",
                e.body_text(),
            )),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::bad_request(
                "request.invalid_fields",
                e.body_text(),
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request.content_type",
                "expected Content-Type: application/json",
            )),
            Err(e) => Err(body_error(e.status(), e.body_text())),
        }
    }
}

fn body_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "request.too_large",
            "request body is larger than this endpoint accepts",
        )
    } else {
        ApiError::new(status, "request.body", text)
    }
}

/// Raw body bytes whose rejections are API errors.
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBytes)
            .map_err(|e| body_error(e.status(), e.body_text()))
    }
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .metrics
        .observe(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    use axum::extract::DefaultBodyLimit;
    let agent = Router::new()
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/agent/heartbeat", post(heartbeat))
        .route("/api/v1/agent/events", post(events))
        .route("/api/v1/agent/manifest", get(get_manifest))
        .route("/api/v1/agent/manifest/poll", get(poll_manifest))
        .route("/api/v1/agent/credential", post(rotate_credential))
        .route("/api/v1/bundles/{content_address}", get(download_bundle))
        .layer(DefaultBodyLimit::max(MAX_AGENT_BODY));
    let upload = Router::new()
        .route("/api/v1/catalog/bundles", post(upload_bundle))
        .layer(DefaultBodyLimit::max(MAX_BUNDLE_UPLOAD));
    let mgmt = Router::new()
        .route("/api/v1/org", get(get_org))
        .route("/api/v1/catalog/patches", get(list_patches))
        .route("/api/v1/catalog/patches/{patch_id}", get(get_patch))
        .route("/api/v1/catalog/patches/{patch_id}/promote", post(promote))
        .route("/api/v1/computers", get(list_computers))
        .route("/api/v1/computers/{id}", get(get_computer))
        .route("/api/v1/computers/{id}/revoke", post(revoke_computer))
        .route("/api/v1/computers/{id}/group", put(move_computer))
        .route("/api/v1/groups", get(list_groups).post(create_group))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{id}", delete(remove_user))
        .route(
            "/api/v1/api-tokens",
            get(list_api_tokens).post(create_api_token),
        )
        .route("/api/v1/api-tokens/{id}/revoke", post(revoke_api_token))
        .route("/api/v1/groups/{id}", put(update_group))
        .route("/api/v1/groups/{id}/policies/{patch_id}", put(set_policy))
        .route("/api/v1/groups/{id}/approvals/{patch_id}", post(approve))
        .route(
            "/api/v1/enrollment-tokens",
            get(list_enrollment_tokens).post(create_enrollment_token),
        )
        .route(
            "/api/v1/enrollment-tokens/{id}",
            axum::routing::delete(revoke_enrollment_token),
        )
        .route("/api/v1/server-key", get(server_key))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY));
    let misc = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.yaml", get(openapi))
        .route("/api/v1/openapi.yaml", get(openapi));
    Router::new()
        .merge(agent)
        .merge(upload)
        .merge(mgmt)
        .merge(misc)
        .merge(crate::dashboard::routes())
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn fallback() -> ApiError {
    ApiError::not_found("request.not_found", "no such endpoint")
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readyz: database not reachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database not reachable\n").into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    let since = crate::now() - s.config.online_window.as_secs() as i64;
    let (online, total) = s.store.agent_counts(since).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(online, total),
    )
        .into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

async fn server_key(State(s): State<AppState>) -> Json<Value> {
    let k = s.server_key.public();
    Json(json!({ "key_id": k.key_id().to_string(), "public_key": k.to_line() }))
}

// ------------------------------------------------------------------------------ validation

fn check_text(field: &str, s: &str, max: usize) -> ApiResult<()> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            format!("{field}: at most {max} bytes, no control characters"),
        ));
    }
    Ok(())
}

fn check_required(field: &str, s: &str, max: usize) -> ApiResult<()> {
    check_text(field, s, max)?;
    if s.is_empty() {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            format!("{field} must not be empty"),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------ agent API

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollReq {
    enrollment_token: String,
    #[serde(default)]
    hostname: String,
}

#[derive(Serialize)]
struct EnrollResp {
    agent_id: String,
    credential: String,
    server_key: String,
    server_key_id: String,
    heartbeat_interval_s: u64,
    long_poll_timeout_s: u64,
}

async fn enroll(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<EnrollReq>,
) -> ApiResult<Response> {
    check_text("hostname", &req.hostname, 255)?;
    if !req.enrollment_token.starts_with(auth::ENROLL_TOKEN_PREFIX) {
        return Err(ApiError::unauthorized(
            "enroll.invalid_token",
            "not an enrollment token (ste_...)",
        ));
    }
    let agent_id = auth::random_hex(16);
    let credential = auth::new_agent_credential(&agent_id);
    let enrolled = s
        .store
        .enroll_agent(
            &auth::token_hash(&req.enrollment_token),
            &agent_id,
            &auth::token_hash(&credential),
            &req.hostname,
            crate::now(),
        )
        .await?;
    if enrolled.is_none() {
        return Err(ApiError::unauthorized(
            "enroll.invalid_token",
            "enrollment token is unknown or revoked",
        ));
    }
    let k = s.server_key.public();
    Ok((
        StatusCode::CREATED,
        Json(EnrollResp {
            agent_id,
            credential,
            server_key: k.to_line(),
            server_key_id: k.key_id().to_string(),
            heartbeat_interval_s: s.config.heartbeat_interval.as_secs(),
            long_poll_timeout_s: s.config.long_poll_max.as_secs(),
        }),
    )
        .into_response())
}

async fn rotate_credential(
    State(s): State<AppState>,
    AgentCaller(a): AgentCaller,
) -> ApiResult<Json<Value>> {
    let credential = auth::new_agent_credential(&a.id);
    s.store
        .rotate_credential(&a.id, &auth::token_hash(&credential))
        .await?;
    Ok(Json(json!({ "agent_id": a.id, "credential": credential })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OsInfo {
    #[serde(default)]
    id: String,
    #[serde(default)]
    version_id: String,
    #[serde(default)]
    pretty_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatReq {
    hostname: String,
    #[serde(default)]
    os: OsInfo,
    #[serde(default)]
    kernel: String,
    #[serde(default)]
    ip_addresses: Vec<String>,
    agent_version: String,
    agent_enabled: bool,
    #[serde(default)]
    packages_hash: Option<String>,
    #[serde(default)]
    packages: Option<Vec<InstalledPackage>>,
    #[serde(default)]
    patches: Vec<PatchState>,
}

#[derive(Serialize)]
struct HeartbeatResp {
    /// The server does not know this agent's package list: send `packages` next time.
    inventory_required: bool,
    next_heartbeat_s: u64,
    server_time: i64,
}

/// Canonical hash of a package list (see docs/protocol.md): sort and deduplicate by
/// (ecosystem, name, version), then SHA-256 over `ecosystem \t name \t version \n` lines.
pub fn packages_hash(sorted: &[InstalledPackage]) -> String {
    let mut h = Sha256::new();
    for p in sorted {
        h.update(p.ecosystem.as_bytes());
        h.update(b"\t");
        h.update(p.name.as_bytes());
        h.update(b"\t");
        h.update(p.version.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

fn json_hash<T: Serialize>(v: &T) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(v).unwrap_or_default()))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

async fn heartbeat(
    State(s): State<AppState>,
    AgentCaller(a): AgentCaller,
    ApiJson(req): ApiJson<HeartbeatReq>,
) -> ApiResult<Json<HeartbeatResp>> {
    // Validate everything before writing anything.
    check_required("hostname", &req.hostname, 255)?;
    check_text("os.id", &req.os.id, 64)?;
    check_text("os.version_id", &req.os.version_id, 64)?;
    check_text("os.pretty_name", &req.os.pretty_name, 255)?;
    check_text("kernel", &req.kernel, 255)?;
    check_required("agent_version", &req.agent_version, 64)?;
    if req.ip_addresses.len() > 64 {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            "at most 64 ip_addresses",
        ));
    }
    for ip in &req.ip_addresses {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(ApiError::bad_request(
                "request.invalid_field",
                format!("ip_addresses: {ip:?} is not an IP address"),
            ));
        }
    }
    if req.patches.len() > MAX_PATCH_STATES {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            format!("at most {MAX_PATCH_STATES} patch states"),
        ));
    }
    let mut seen = BTreeSet::new();
    for p in &req.patches {
        check_required("patches.patch_id", &p.patch_id, 64)?;
        if !PATCH_STATES.contains(&p.state.as_str()) {
            return Err(ApiError::bad_request(
                "heartbeat.invalid_state",
                format!(
                    "patches.state {:?}: expected one of {}",
                    p.state,
                    PATCH_STATES.join(", ")
                ),
            ));
        }
        if let Some(c) = &p.error_code {
            check_text("patches.error_code", c, 64)?;
        }
        if !seen.insert(&p.patch_id) {
            return Err(ApiError::bad_request(
                "request.invalid_field",
                format!("patch {} reported twice", p.patch_id),
            ));
        }
    }
    if let Some(h) = &req.packages_hash
        && !is_hex64(h)
    {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            "packages_hash must be 64 lowercase hex digits",
        ));
    }
    let packages = match req.packages {
        Some(mut pk) => {
            if pk.len() > MAX_PACKAGES {
                return Err(ApiError::bad_request(
                    "request.invalid_field",
                    format!("at most {MAX_PACKAGES} packages"),
                ));
            }
            for p in &pk {
                check_required("packages.ecosystem", &p.ecosystem, 32)?;
                check_required("packages.name", &p.name, 256)?;
                check_required("packages.version", &p.version, 256)?;
            }
            pk.sort();
            pk.dedup();
            let h = packages_hash(&pk);
            if let Some(claimed) = &req.packages_hash
                && *claimed != h
            {
                return Err(ApiError::bad_request(
                    "heartbeat.packages_hash_mismatch",
                    format!(
                        "packages_hash {claimed} does not match the packages sent (server computed {h})"
                    ),
                ));
            }
            Some((h, pk))
        }
        None => None,
    };

    let now = crate::now();
    let facts = HostFacts {
        hostname: req.hostname,
        os_id: req.os.id,
        os_name: req.os.pretty_name,
        os_version_id: req.os.version_id,
        kernel: req.kernel,
        ips: req.ip_addresses,
        agent_version: req.agent_version,
        agent_enabled: req.agent_enabled,
    };
    let facts_hash = json_hash(&facts);
    let mut states = req.patches;
    states.sort();
    let states_hash = json_hash(&states);
    let (old_facts, old_set, old_states) = (
        a.facts_hash.clone(),
        a.package_set.clone(),
        a.states_hash.clone(),
    );

    let mut write = HeartbeatWrite {
        now,
        ..Default::default()
    };
    if old_facts.as_deref() != Some(facts_hash.as_str()) {
        write.facts = Some((&facts_hash, &facts));
    }
    if old_states.as_deref() != Some(states_hash.as_str()) {
        write.states = Some((&states_hash, &states));
    }
    let mut inventory_required = false;
    let mut set_changed = false;
    match (&packages, &req.packages_hash) {
        (Some((h, pk)), _) => {
            if old_set.as_deref() != Some(h.as_str()) {
                set_changed = true;
                write.package_set = Some(h);
                if !s.store.has_package_set(a.org_id, h).await? {
                    write.new_package_set = Some((h, pk));
                    s.metrics.inventory_writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (None, Some(h)) => {
            if old_set.as_deref() != Some(h.as_str()) {
                if s.store.has_package_set(a.org_id, h).await? {
                    set_changed = true;
                    write.package_set = Some(h);
                } else {
                    inventory_required = true;
                }
            }
        }
        (None, None) => inventory_required = old_set.is_none(),
    }
    if write.facts.is_none() && write.states.is_none() && write.package_set.is_none() {
        // Nothing but "still alive": batched, written within a fraction of a second.
        s.seen_later(&a.id, now);
    } else {
        s.store.record_heartbeat(&a.id, a.org_id, &write).await?;
    }
    if set_changed {
        s.store.notify_org(a.org_id).await?;
    }
    s.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
    Ok(Json(HeartbeatResp {
        inventory_required,
        next_heartbeat_s: s.config.heartbeat_interval.as_secs(),
        server_time: now,
    }))
}

async fn events(
    State(s): State<AppState>,
    AgentCaller(a): AgentCaller,
    ApiJson(req): ApiJson<EventBatch<Value>>,
) -> ApiResult<Json<EventsAccepted>> {
    if req.events.len() > MAX_EVENTS {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            format!("at most {MAX_EVENTS} events per batch"),
        ));
    }
    let mut batch = Vec::with_capacity(req.events.len());
    let mut ids = BTreeSet::new();
    for (i, raw) in req.events.into_iter().enumerate() {
        let e = Event::from_value(raw)
            .map_err(|err| ApiError::bad_request(err.code(), format!("events[{i}]: {err}")))?;
        check_required("events.id", &e.id, 128)?;
        if let Some(p) = e.body.patch_id() {
            check_required("events.patch_id", p, 64)?;
        }
        if !ids.insert(e.id.clone()) {
            return Err(ApiError::bad_request(
                "events.duplicate_id",
                format!("event id {:?} appears twice in the batch", e.id),
            ));
        }
        let data = serde_json::to_value(&e.body).unwrap_or(Value::Null);
        batch.push(NewEvent {
            client_event_id: e.id,
            kind: e.body.kind().to_string(),
            patch_id: e.body.patch_id().map(str::to_string),
            data,
            occurred_at: e.occurred_at,
        });
    }
    let accepted = s
        .store
        .insert_events(a.org_id, &a.id, &batch, crate::now())
        .await?;
    s.metrics.events.fetch_add(accepted, Ordering::Relaxed);
    Ok(Json(EventsAccepted {
        accepted,
        duplicates: batch.len() as u64 - accepted,
    }))
}

/// The current manifest payload for an agent (version bumped if its content changed).
pub async fn current_manifest(s: &AppState, a: &AgentAuth) -> ApiResult<ManifestPayload> {
    let (plan, group, cands) = s.store.manifest_inputs(a).await?;
    let entries = manifest::select(plan, &group, &cands);
    let version = s
        .store
        .manifest_version(&a.id, &manifest::entries_hash(&entries))
        .await?;
    let now = crate::now();
    Ok(ManifestPayload {
        agent_id: a.id.clone(),
        org_id: a.org_id,
        version,
        issued_at: now,
        expires_at: now + s.config.manifest_ttl.as_secs() as i64,
        patches: entries,
    })
}

fn signed(s: &AppState, payload: &ManifestPayload) -> Json<SignedManifest> {
    s.metrics.manifests_signed.fetch_add(1, Ordering::Relaxed);
    Json(manifest::sign(&s.server_key, payload))
}

async fn get_manifest(
    State(s): State<AppState>,
    AgentCaller(a): AgentCaller,
) -> ApiResult<Json<SignedManifest>> {
    let m = current_manifest(&s, &a).await?;
    Ok(signed(&s, &m))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollQuery {
    version: i64,
    #[serde(default)]
    timeout_s: Option<u64>,
}

async fn poll_manifest(
    State(s): State<AppState>,
    AgentCaller(a): AgentCaller,
    q: Result<Query<PollQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad_request("request.invalid_query", e.body_text()))?;
    let timeout = q
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(s.config.long_poll_max)
        .min(s.config.long_poll_max);
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribe before reading, so a change between the read and the wait is not lost.
    let mut rx = s.store.subscribe(a.org_id);
    loop {
        rx.borrow_and_update();
        let m = current_manifest(&s, &a).await?;
        if m.version != q.version {
            return Ok(signed(&s, &m).into_response());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

async fn download_bundle(
    State(s): State<AppState>,
    AgentCaller(a): AgentCaller,
    Path(ca): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    bundle_response(&s, a.org_id, &ca, &headers).await
}

/// Serves a bundle of `org_id`'s catalog, immutable and cacheable.
pub async fn bundle_response(
    s: &AppState,
    org_id: i64,
    ca: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    if !is_hex64(ca) {
        return Err(ApiError::bad_request(
            "bundle.invalid_address",
            "content address must be 64 lowercase hex digits",
        ));
    }
    let etag = format!("\"{ca}\"");
    let cache = HeaderValue::from_static("public, max-age=31536000, immutable");
    let bytes = s.store.bundle(org_id, ca).await?.ok_or_else(|| {
        ApiError::not_found(
            "bundle.unknown",
            "no bundle with this content address in your catalog",
        )
    })?;
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag),
                (
                    header::CACHE_CONTROL,
                    cache.to_str().unwrap_or_default().to_string(),
                ),
            ],
        )
            .into_response());
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/vnd.stitch.bundle".to_string(),
            ),
            (header::ETAG, etag),
            (
                header::CACHE_CONTROL,
                cache.to_str().unwrap_or_default().to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

// ------------------------------------------------------------------------------ management API

async fn get_org(State(s): State<AppState>, ApiCaller(p): ApiCaller) -> ApiResult<Json<Value>> {
    let org = s
        .store
        .org(p.org_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org.unknown", "organisation not found"))?;
    Ok(Json(
        json!({ "id": org.id, "name": org.name, "plan": org.plan, "role": p.role }),
    ))
}

async fn upload_bundle(
    State(s): State<AppState>,
    caller: ApiCaller,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    caller.require_write()?;
    let (entry, created) = ops::upload_bundle(&s, caller.0, &body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "created": created, "patch": entry }))).into_response())
}

async fn list_patches(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "patches": s.store.patches(p.org_id).await? })))
}

async fn get_patch(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<CatalogPatch>> {
    s.store
        .patch(p.org_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("patch.unknown", "no such patch in your catalog"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteReq {
    ring: i64,
}

async fn promote(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<String>,
    ApiJson(r): ApiJson<PromoteReq>,
) -> ApiResult<Json<Value>> {
    ops::promote(&s, p, &id, r.ring).await?;
    Ok(Json(json!({ "patch_id": id, "ring": r.ring })))
}

#[derive(Deserialize)]
struct ComputerListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    show: String,
    #[serde(default)]
    after: String,
    limit: Option<i64>,
}

async fn list_computers(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Query(q): Query<ComputerListQuery>,
) -> ApiResult<Json<ComputerPage>> {
    if !["", "online", "offline", "missing"].contains(&q.show.as_str()) {
        return Err(ApiError::bad_request(
            "request.invalid_query",
            format!("show must be online, offline or missing, not {:?}", q.show),
        ));
    }
    let query = ComputerQuery {
        search: q.q,
        show: q.show,
        after: q.after,
        online_since: crate::now() - s.config.online_window.as_secs() as i64,
        limit: q.limit.unwrap_or(ComputerQuery::DEFAULT_LIMIT),
    };
    Ok(Json(s.store.computers(p.org_id, &query).await?))
}

async fn get_computer(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = s
        .store
        .computer(p.org_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("computer.unknown", "no such computer"))?;
    let packages = s.store.computer_packages(p.org_id, &id).await?;
    let states = s.store.computer_states(p.org_id, &id).await?;
    let events = s.store.events(p.org_id, &id, None, 100).await?;
    Ok(Json(
        json!({ "computer": c, "patch_states": states, "packages": packages, "events": events }),
    ))
}

async fn revoke_computer(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    ops::revoke_computer(&s, p, &id).await?;
    Ok(Json(json!({ "id": id, "revoked": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveReq {
    group_id: i64,
}

async fn move_computer(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<String>,
    ApiJson(r): ApiJson<MoveReq>,
) -> ApiResult<Json<Value>> {
    ops::move_computer(&s, p, &id, r.group_id).await?;
    Ok(Json(json!({ "id": id, "group_id": r.group_id })))
}

async fn list_users(State(s): State<AppState>, ApiCaller(p): ApiCaller) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "users": s.store.users(p.org_id).await? })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserReq {
    username: String,
    password: String,
    role: Role,
}

async fn create_user(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    ApiJson(r): ApiJson<UserReq>,
) -> ApiResult<Response> {
    let id = ops::create_user(&s, p, &r.username, &r.password, r.role).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
}

async fn remove_user(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    // An API token acts for no user, so there is no "yourself"; the last owner is still kept.
    ops::remove_user(&s, p, None, id).await?;
    Ok(Json(json!({ "id": id, "removed": true })))
}

async fn list_api_tokens(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "api_tokens": s.store.api_tokens(p.org_id).await? }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiTokenReq {
    name: String,
    role: Role,
}

async fn create_api_token(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    ApiJson(r): ApiJson<ApiTokenReq>,
) -> ApiResult<Response> {
    let (id, token) = ops::create_api_token(&s, p, &r.name, r.role).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "token": token })),
    )
        .into_response())
}

async fn revoke_api_token(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    ops::revoke_api_token(&s, p, id).await?;
    Ok(Json(json!({ "id": id, "revoked": true })))
}

async fn list_groups(State(s): State<AppState>, ApiCaller(p): ApiCaller) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "groups": s.store.groups(p.org_id).await?, "policies": s.store.policies(p.org_id).await? }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupReq {
    name: String,
    #[serde(default)]
    ring: i64,
    #[serde(default = "automatic")]
    default_mode: Mode,
}

fn automatic() -> Mode {
    Mode::Automatic
}

async fn create_group(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    ApiJson(r): ApiJson<GroupReq>,
) -> ApiResult<Response> {
    let g = ops::create_group(&s, p, &r.name, r.ring, r.default_mode).await?;
    Ok((StatusCode::CREATED, Json(g)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupUpdate {
    ring: i64,
    default_mode: Mode,
}

async fn update_group(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<i64>,
    ApiJson(r): ApiJson<GroupUpdate>,
) -> ApiResult<Json<Group>> {
    Ok(Json(
        ops::update_group(&s, p, id, r.ring, r.default_mode).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyReq {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    mode: Option<Mode>,
}

async fn set_policy(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path((id, patch_id)): Path<(i64, String)>,
    ApiJson(r): ApiJson<PolicyReq>,
) -> ApiResult<Json<Value>> {
    ops::set_policy(&s, p, id, &patch_id, r.enabled, r.mode).await?;
    Ok(Json(json!({ "group_id": id, "patch_id": patch_id })))
}

async fn approve(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path((id, patch_id)): Path<(i64, String)>,
) -> ApiResult<Json<Value>> {
    ops::approve(&s, p, id, &patch_id).await?;
    Ok(Json(
        json!({ "group_id": id, "patch_id": patch_id, "approved": true }),
    ))
}

async fn list_enrollment_tokens(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "enrollment_tokens": s.store.enrollment_tokens(p.org_id).await? }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenReq {
    name: String,
    #[serde(default)]
    group_id: Option<i64>,
}

async fn create_enrollment_token(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    ApiJson(r): ApiJson<TokenReq>,
) -> ApiResult<Response> {
    let (id, token) = ops::create_enrollment_token(&s, p, r.group_id, &r.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "token": token })),
    )
        .into_response())
}

async fn revoke_enrollment_token(
    State(s): State<AppState>,
    ApiCaller(p): ApiCaller,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    ops::revoke_enrollment_token(&s, p, id).await?;
    Ok(Json(json!({ "id": id, "revoked": true })))
}

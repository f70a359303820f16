//! Management actions, shared by the JSON API and the dashboard's forms.
//!
//! Each takes the caller's [`Principal`] (its org and role come from its credential, never
//! from the request), checks role and plan, validates, then writes. Transport code only
//! decodes input and renders the result.

use stitch_format::{Bundle, TrustedKeys};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::store::InsertPatch;

fn require_write(p: Principal) -> ApiResult<()> {
    if p.role.can_write() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "auth.read_only",
            "your role (auditor) is read-only",
        ))
    }
}

fn require_owner(p: Principal) -> ApiResult<()> {
    if p.role == Role::Owner {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "auth.owner_only",
            "only an owner manages people and API tokens",
        ))
    }
}

async fn require_paid(state: &AppState, p: Principal, what: &str) -> ApiResult<()> {
    let org = state
        .store
        .org(p.org_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org.unknown", "organisation not found"))?;
    if org.plan == Plan::Paid {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "plan.feature_unavailable",
            format!("{what} needs a paid plan"),
        ))
    }
}

fn check_name(field: &str, s: &str) -> ApiResult<()> {
    if s.trim().is_empty() || s.len() > 100 || s.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            format!("{field} must be 1-100 printable characters"),
        ));
    }
    Ok(())
}

/// Extracts catalog metadata from a verified bundle.
pub fn catalog_entry(bytes: &[u8], trusted: &TrustedKeys, now: i64) -> ApiResult<CatalogPatch> {
    let verified = Bundle::decode_verified(bytes, trusted).map_err(|e| {
        let status = axum::http::StatusCode::UNPROCESSABLE_ENTITY;
        ApiError::new(status, e.code(), e.to_string())
    })?;
    let p = verified.patch();
    Ok(CatalogPatch {
        patch_id: p.id.clone(),
        revision: i64::from(p.revision),
        content_address: hex::encode(verified.bundle().content_address()),
        title: p.title.clone(),
        description: p.description.clone(),
        cves: p.cves.clone(),
        severity: p.severity.as_str().to_string(),
        tier: p.tier.as_str().to_string(),
        author: p.author.clone(),
        module: p.target.module.clone(),
        target_sha256: hex::encode(p.target.sha256),
        build_id: p.target.build_id.as_ref().map(hex::encode),
        arch: p.target.arch.as_str().to_string(),
        ecosystem: p.target.package.ecosystem.as_str().to_string(),
        package_name: p.target.package.name.clone(),
        package_version: p.target.package.version.clone(),
        signed_by: verified.signed_by().iter().map(|k| k.to_string()).collect(),
        uploaded_at: now,
    })
}

/// Verifies and stores a bundle. Returns the entry and whether it was new.
pub async fn upload_bundle(
    state: &AppState,
    p: Principal,
    bytes: &[u8],
) -> ApiResult<(CatalogPatch, bool)> {
    require_write(p)?;
    let entry = match catalog_entry(bytes, &state.config.trusted_keys, crate::now()) {
        Ok(e) => e,
        Err(e) => {
            state
                .metrics
                .bundles_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(e);
        }
    };
    match state.store.insert_patch(p.org_id, &entry, bytes).await? {
        InsertPatch::Created => {
            state
                .metrics
                .bundles_uploaded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((entry, true))
        }
        InsertPatch::AlreadyPresent => Ok((entry, false)),
        InsertPatch::RevisionConflict => Err(ApiError::conflict(
            "catalog.revision_conflict",
            format!(
                "{} revision {} is already in the catalog with different content; publish a new revision",
                entry.patch_id, entry.revision
            ),
        )),
    }
}

/// Creates a group (paid plans).
pub async fn create_group(
    state: &AppState,
    p: Principal,
    name: &str,
    ring: i64,
    mode: Mode,
) -> ApiResult<Group> {
    require_write(p)?;
    require_paid(state, p, "creating groups").await?;
    check_name("name", name)?;
    if !(0..=100).contains(&ring) {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            "ring must be 0-100",
        ));
    }
    let id = state
        .store
        .create_group(p.org_id, name.trim(), ring, mode, crate::now())
        .await?
        .ok_or_else(|| ApiError::conflict("group.name_taken", "a group with this name exists"))?;
    get_group(state, p, id).await
}

/// A group of the caller's org.
pub async fn get_group(state: &AppState, p: Principal, id: i64) -> ApiResult<Group> {
    state
        .store
        .group(p.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("group.unknown", "no such group"))
}

/// Changes a group's ring and default mode (paid plans).
pub async fn update_group(
    state: &AppState,
    p: Principal,
    id: i64,
    ring: i64,
    mode: Mode,
) -> ApiResult<Group> {
    require_write(p)?;
    require_paid(state, p, "rings and approvals").await?;
    if !(0..=100).contains(&ring) {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            "ring must be 0-100",
        ));
    }
    if !state.store.update_group(p.org_id, id, ring, mode).await? {
        return Err(ApiError::not_found("group.unknown", "no such group"));
    }
    get_group(state, p, id).await
}

async fn require_patch(state: &AppState, p: Principal, patch_id: &str) -> ApiResult<CatalogPatch> {
    state
        .store
        .patch(p.org_id, patch_id)
        .await?
        .ok_or_else(|| ApiError::not_found("patch.unknown", "no such patch in your catalog"))
}

/// Sets enabled and/or mode of a patch in a group. Free plans may only enable/disable in
/// the default group.
pub async fn set_policy(
    state: &AppState,
    p: Principal,
    group_id: i64,
    patch_id: &str,
    enabled: Option<bool>,
    mode: Option<Mode>,
) -> ApiResult<()> {
    require_write(p)?;
    let group = get_group(state, p, group_id).await?;
    require_patch(state, p, patch_id).await?;
    if mode == Some(Mode::Approval) {
        require_paid(state, p, "approval-required patches").await?;
    }
    if !group.is_default {
        require_paid(state, p, "policies for groups").await?;
    }
    if !state
        .store
        .set_policy(
            p.org_id,
            group_id,
            patch_id,
            enabled,
            mode,
            None,
            crate::now(),
        )
        .await?
    {
        return Err(ApiError::not_found("group.unknown", "no such group"));
    }
    Ok(())
}

/// Approves a patch for a group (paid plans).
pub async fn approve(
    state: &AppState,
    p: Principal,
    group_id: i64,
    patch_id: &str,
) -> ApiResult<()> {
    require_write(p)?;
    require_paid(state, p, "approvals").await?;
    get_group(state, p, group_id).await?;
    require_patch(state, p, patch_id).await?;
    if !state
        .store
        .set_policy(
            p.org_id,
            group_id,
            patch_id,
            None,
            None,
            Some(true),
            crate::now(),
        )
        .await?
    {
        return Err(ApiError::not_found("group.unknown", "no such group"));
    }
    Ok(())
}

/// Promotes a patch's rollout to `ring` (paid plans).
pub async fn promote(state: &AppState, p: Principal, patch_id: &str, ring: i64) -> ApiResult<()> {
    require_write(p)?;
    require_paid(state, p, "rollout rings").await?;
    require_patch(state, p, patch_id).await?;
    if !(0..=100).contains(&ring) {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            "ring must be 0-100",
        ));
    }
    if !state
        .store
        .set_rollout(p.org_id, patch_id, ring, crate::now())
        .await?
    {
        return Err(ApiError::not_found(
            "patch.unknown",
            "no such patch in your catalog",
        ));
    }
    Ok(())
}

/// Mints an enrollment token for a group; returns (id, token). The token is shown once.
pub async fn create_enrollment_token(
    state: &AppState,
    p: Principal,
    group_id: Option<i64>,
    name: &str,
) -> ApiResult<(i64, String)> {
    require_write(p)?;
    check_name("name", name)?;
    let group = match group_id {
        Some(id) => get_group(state, p, id).await?,
        None => state.store.default_group(p.org_id).await?,
    };
    if !group.is_default {
        require_paid(state, p, "enrolling into groups").await?;
    }
    let token = crate::auth::new_token(crate::auth::ENROLL_TOKEN_PREFIX);
    let id = state
        .store
        .create_enrollment_token(
            p.org_id,
            group.id,
            name.trim(),
            &crate::auth::token_hash(&token),
            &token[..12],
            crate::now(),
        )
        .await?;
    Ok((id, token))
}

/// Revokes an enrollment token.
pub async fn revoke_enrollment_token(state: &AppState, p: Principal, id: i64) -> ApiResult<()> {
    require_write(p)?;
    if !state.store.revoke_enrollment_token(p.org_id, id).await? {
        return Err(ApiError::not_found(
            "enrollment_token.unknown",
            "no such enrollment token",
        ));
    }
    Ok(())
}

/// Shortest password a new user may get; the dashboard is reachable over the network.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Adds a person to the caller's org (owners only).
pub async fn create_user(
    state: &AppState,
    p: Principal,
    username: &str,
    password: &str,
    role: Role,
) -> ApiResult<i64> {
    require_owner(p)?;
    let username = username.trim();
    if username.is_empty()
        || username.len() > 64
        || !username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
    {
        return Err(ApiError::bad_request(
            "request.invalid_field",
            "username must be 1-64 characters of letters, digits, '.', '_', '@' or '-'",
        ));
    }
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(ApiError::bad_request(
            "user.weak_password",
            format!("the password must have at least {MIN_PASSWORD_LEN} characters"),
        ));
    }
    let hash = crate::auth::hash_password(password);
    state
        .store
        .create_user(p.org_id, username, &hash, role, crate::now())
        .await?
        .ok_or_else(|| ApiError::conflict("user.taken", format!("{username:?} is taken")))
}

/// Removes a person from the caller's org and ends their sessions (owners only). An owner
/// cannot remove themself, and nobody can remove an org's last owner.
pub async fn remove_user(
    state: &AppState,
    p: Principal,
    acting_user: Option<i64>,
    user_id: i64,
) -> ApiResult<()> {
    require_owner(p)?;
    if acting_user == Some(user_id) {
        return Err(ApiError::bad_request(
            "user.self_removal",
            "you cannot remove yourself; another owner can",
        ));
    }
    let users = state.store.users(p.org_id).await?;
    let target = users
        .iter()
        .find(|u| u.id == user_id)
        .ok_or_else(|| ApiError::not_found("user.unknown", "no such user"))?;
    let owners = users.iter().filter(|u| u.role == Role::Owner).count();
    if target.role == Role::Owner && owners == 1 {
        return Err(ApiError::bad_request(
            "user.last_owner",
            "an organisation keeps at least one owner",
        ));
    }
    if !state.store.delete_user(p.org_id, user_id).await? {
        return Err(ApiError::not_found("user.unknown", "no such user"));
    }
    Ok(())
}

/// Creates an API token for the caller's org (owners only); the secret is returned once.
pub async fn create_api_token(
    state: &AppState,
    p: Principal,
    name: &str,
    role: Role,
) -> ApiResult<(i64, String)> {
    require_owner(p)?;
    check_name("name", name)?;
    let token = crate::auth::new_token(crate::auth::API_TOKEN_PREFIX);
    let id = state
        .store
        .create_api_token(
            p.org_id,
            name.trim(),
            role,
            &crate::auth::token_hash(&token),
            crate::now(),
        )
        .await?;
    Ok((id, token))
}

/// Revokes an API token of the caller's org (owners only); it stops working at once.
pub async fn revoke_api_token(state: &AppState, p: Principal, id: i64) -> ApiResult<()> {
    require_owner(p)?;
    if !state.store.revoke_api_token(p.org_id, id).await? {
        return Err(ApiError::not_found(
            "api_token.unknown",
            "no such API token",
        ));
    }
    Ok(())
}

/// Revokes a computer's credential for good.
pub async fn revoke_computer(state: &AppState, p: Principal, agent_id: &str) -> ApiResult<()> {
    require_write(p)?;
    if !state.store.revoke_agent(p.org_id, agent_id).await? {
        return Err(ApiError::not_found("computer.unknown", "no such computer"));
    }
    Ok(())
}

/// Moves a computer into a group (paid plans).
pub async fn move_computer(
    state: &AppState,
    p: Principal,
    agent_id: &str,
    group_id: i64,
) -> ApiResult<()> {
    require_write(p)?;
    require_paid(state, p, "groups").await?;
    if !state.store.move_agent(p.org_id, agent_id, group_id).await? {
        return Err(ApiError::not_found(
            "computer.unknown",
            "no such computer or group",
        ));
    }
    Ok(())
}

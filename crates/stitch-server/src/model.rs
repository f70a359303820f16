//! Plain data the server passes between storage, policy and transport. No I/O here.

use serde::{Deserialize, Serialize};

/// What a person or token may do inside its organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including people and tokens.
    Owner,
    /// Catalog uploads, groups, policies, approvals, enrollment tokens.
    Admin,
    /// Read-only.
    Auditor,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
    /// Parses the stored name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
    /// May this role change anything?
    pub fn can_write(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// Commercial plan of an organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// Free-tier patches only; one default group, everything automatic.
    Free,
    /// All patches; groups, rings and approvals.
    Paid,
}

impl Plan {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Paid => "paid",
        }
    }
    /// Parses the stored name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "free" => Some(Plan::Free),
            "paid" => Some(Plan::Paid),
            _ => None,
        }
    }
}

/// How a patch reaches a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// As soon as the patch's rollout reaches the group's ring.
    Automatic,
    /// Only after an admin approves it for the group.
    Approval,
}

impl Mode {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Automatic => "automatic",
            Mode::Approval => "approval",
        }
    }
    /// Parses the stored name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "automatic" => Some(Mode::Automatic),
            "approval" => Some(Mode::Approval),
            _ => None,
        }
    }
}

/// An organisation (tenant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Org {
    pub id: i64,
    pub name: String,
    pub plan: Plan,
}

/// A person who logs in to the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub org_id: i64,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
}

/// A user as the Team page and the API show it (no password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserSummary {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub created_at: i64,
}

/// An API token as listed (the secret is shown once, at creation, and never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiTokenSummary {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    pub revoked: bool,
}

/// Who is calling the management API: a user session or an API token, always inside one org.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub org_id: i64,
    pub role: Role,
}

/// A group of computers with its rollout ring and default mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub id: i64,
    pub org_id: i64,
    pub name: String,
    /// 0 is the canary ring; a patch reaches ring N after N promotions.
    pub ring: i64,
    pub is_default: bool,
    pub default_mode: Mode,
}

/// An enrollment token as listed (the secret itself is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnrollmentToken {
    pub id: i64,
    pub group_id: i64,
    pub group_name: String,
    pub name: String,
    /// First characters of the token, to recognise it.
    pub hint: String,
    pub created_at: i64,
    pub revoked: bool,
    pub uses: i64,
}

/// What the agent authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAuth {
    pub id: String,
    pub org_id: i64,
    pub group_id: i64,
    pub credential_hash: String,
    pub revoked: bool,
    /// What the heartbeat path compares against (read with the credential in one query).
    pub facts_hash: Option<String>,
    pub package_set: Option<String>,
    pub states_hash: Option<String>,
}

/// One installed package as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstalledPackage {
    pub ecosystem: String,
    pub name: String,
    pub version: String,
}

/// State of one patch on one computer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PatchState {
    pub patch_id: String,
    pub revision: i64,
    /// `applied`, `failed`, `disabled` or `pending`.
    pub state: String,
    /// Processes the patch is applied in.
    #[serde(default)]
    pub processes: i64,
    /// Stable error code when `state` is `failed`.
    #[serde(default)]
    pub error_code: Option<String>,
}

/// Allowed patch states.
pub const PATCH_STATES: &[&str] = &["applied", "failed", "disabled", "pending"];

/// Host facts from a heartbeat (everything but packages and patch states).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    pub os_id: String,
    pub os_name: String,
    pub os_version_id: String,
    pub kernel: String,
    pub ips: Vec<String>,
    pub agent_version: String,
    pub agent_enabled: bool,
}

/// A computer as the dashboard and the management API list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComputerRow {
    pub id: String,
    pub group_id: i64,
    pub group_name: String,
    pub hostname: String,
    pub os_name: String,
    pub kernel: String,
    pub ips: Vec<String>,
    pub agent_version: String,
    pub agent_enabled: bool,
    pub revoked: bool,
    pub enrolled_at: i64,
    pub last_seen: Option<i64>,
    pub patches_applied: i64,
    pub relevant_missing: i64,
}

/// What a list of computers asks for: a search, a state filter and one page.
#[derive(Debug, Clone, Default)]
pub struct ComputerQuery {
    /// Substring of host name, IP, OS name or agent id (case-insensitive); empty for all.
    pub search: String,
    /// `""` (all), `online`, `offline` or `missing` (relevant patches not applied).
    pub show: String,
    /// `next` of the previous page (see [`ComputerQuery::cursor`]); empty for the first page.
    pub after: String,
    /// Computers last seen at or after this time (unix seconds) count as online.
    pub online_since: i64,
    /// Page size, clamped to 1..=MAX_LIMIT.
    pub limit: i64,
}

impl ComputerQuery {
    pub const MAX_LIMIT: i64 = 1000;
    pub const DEFAULT_LIMIT: i64 = 100;

    /// The keyset cursor of the page that ends with computer `id` named `hostname`: the id,
    /// a dot and the host name in hex (URL-safe; opaque to clients). It carries the host name,
    /// not only the id, so that the computer being renamed while someone pages does not move
    /// the cursor (the next page would skip or repeat every computer between its two names).
    pub fn cursor(hostname: &str, id: &str) -> String {
        format!("{id}.{}", hex::encode(hostname))
    }

    /// The (host name, id) of an `after` cursor. A bare id (a cursor of an older server, or
    /// one that does not decode) has no host name: the caller looks it up.
    pub fn parse_cursor(after: &str) -> (Option<String>, &str) {
        if let Some((id, name)) = after.split_once('.')
            && let Some(name) = hex::decode(name)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        {
            return (Some(name), id);
        }
        (None, after)
    }
}

/// One page of computers in (host name, id) order.
#[derive(Debug, Clone, Serialize)]
pub struct ComputerPage {
    pub computers: Vec<ComputerRow>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
    /// Computers matching the search (before the `show` filter), across all pages.
    pub total: i64,
}

/// Patch metadata in the catalog (extracted from a verified bundle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogPatch {
    pub patch_id: String,
    pub revision: i64,
    pub content_address: String,
    pub title: String,
    pub description: String,
    pub cves: Vec<String>,
    pub severity: String,
    pub tier: String,
    pub author: String,
    pub module: String,
    pub target_sha256: String,
    pub build_id: Option<String>,
    pub arch: String,
    pub ecosystem: String,
    pub package_name: String,
    pub package_version: String,
    pub signed_by: Vec<String>,
    pub uploaded_at: i64,
}

/// A catalog patch with fleet counts, for the patches page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatchSummary {
    #[serde(flatten)]
    pub patch: CatalogPatch,
    /// Computers that have the target package installed.
    pub computers_affected: i64,
    /// Computers that report the patch applied.
    pub computers_applied: i64,
    /// Highest ring the rollout has been promoted to.
    pub rollout_ring: i64,
}

/// One patch candidate for an agent's manifest, before policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub patch_id: String,
    pub revision: i64,
    pub content_address: String,
    pub title: String,
    pub severity: String,
    pub tier: String,
    pub module: String,
    pub target_sha256: String,
    pub policy_enabled: Option<bool>,
    pub policy_mode: Option<String>,
    pub approved: bool,
    pub rollout_ring: i64,
}

/// A stored agent event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub agent_id: String,
    pub client_event_id: String,
    pub kind: String,
    pub patch_id: Option<String>,
    pub data: serde_json::Value,
    pub occurred_at: i64,
    pub received_at: i64,
}

/// A policy row for the groups page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRow {
    pub group_id: i64,
    pub patch_id: String,
    pub enabled: bool,
    pub mode: Mode,
    pub approved: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_cursor_round_trips_any_host_name_and_a_bare_id_has_none() {
        for name in ["web-1", "", "a.b&c=d é", "0123abcd"] {
            let c = ComputerQuery::cursor(name, "00ff");
            assert!(
                c.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.'),
                "URL-safe: {c}"
            );
            assert_eq!(
                ComputerQuery::parse_cursor(&c),
                (Some(name.to_string()), "00ff")
            );
        }
        assert_eq!(ComputerQuery::parse_cursor("00ff"), (None, "00ff"));
        assert_eq!(ComputerQuery::parse_cursor("00ff.zz"), (None, "00ff.zz"));
        assert_eq!(ComputerQuery::parse_cursor(""), (None, ""));
    }
}

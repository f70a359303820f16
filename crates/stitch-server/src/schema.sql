-- Stitch server schema. Written once for both engines: {ID}, {INT} and {BLOB} are replaced
-- by the engine's types (store.rs). Every statement is idempotent so start-up can run it.
CREATE TABLE IF NOT EXISTS orgs (
    id {ID},
    name TEXT NOT NULL UNIQUE,
    plan TEXT NOT NULL,
    created_at {INT} NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id {ID},
    org_id {INT} NOT NULL REFERENCES orgs(id),
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at {INT} NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id {INT} NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    expires_at {INT} NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id {ID},
    org_id {INT} NOT NULL REFERENCES orgs(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at {INT} NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE IF NOT EXISTS computer_groups (
    id {ID},
    org_id {INT} NOT NULL REFERENCES orgs(id),
    name TEXT NOT NULL,
    ring {INT} NOT NULL DEFAULT 0,
    is_default BOOLEAN NOT NULL DEFAULT FALSE,
    default_mode TEXT NOT NULL DEFAULT 'automatic',
    created_at {INT} NOT NULL,
    UNIQUE (org_id, name)
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    id {ID},
    org_id {INT} NOT NULL REFERENCES orgs(id),
    group_id {INT} NOT NULL REFERENCES computer_groups(id),
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    created_at {INT} NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE,
    uses {INT} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    org_id {INT} NOT NULL REFERENCES orgs(id),
    group_id {INT} NOT NULL REFERENCES computer_groups(id),
    credential_hash TEXT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE,
    enrolled_at {INT} NOT NULL,
    last_seen {INT},
    hostname TEXT NOT NULL DEFAULT '',
    os_id TEXT NOT NULL DEFAULT '',
    os_name TEXT NOT NULL DEFAULT '',
    os_version_id TEXT NOT NULL DEFAULT '',
    kernel TEXT NOT NULL DEFAULT '',
    ips TEXT NOT NULL DEFAULT '[]',
    agent_version TEXT NOT NULL DEFAULT '',
    agent_enabled BOOLEAN NOT NULL DEFAULT TRUE,
    facts_hash TEXT,
    package_set TEXT,
    states_hash TEXT,
    manifest_hash TEXT,
    manifest_version {INT} NOT NULL DEFAULT 0
);
-- (org_id, hostname, id) is the order computer lists are paged in (keyset pagination).
DROP INDEX IF EXISTS agents_org;
CREATE INDEX IF NOT EXISTS agents_org_page ON agents (org_id, hostname, id);
-- Inventories are stored once per distinct package list per org (content-addressed by the
-- hash of the canonical list); computers point at their set.
CREATE TABLE IF NOT EXISTS package_sets (
    org_id {INT} NOT NULL,
    hash TEXT NOT NULL,
    count {INT} NOT NULL,
    PRIMARY KEY (org_id, hash)
);
CREATE TABLE IF NOT EXISTS package_set_members (
    org_id {INT} NOT NULL,
    set_hash TEXT NOT NULL,
    ecosystem TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (org_id, set_hash, ecosystem, name, version)
);
CREATE INDEX IF NOT EXISTS package_set_members_pkg ON package_set_members (org_id, ecosystem, name, version);
CREATE TABLE IF NOT EXISTS agent_patch_states (
    agent_id TEXT NOT NULL,
    patch_id TEXT NOT NULL,
    revision {INT} NOT NULL,
    state TEXT NOT NULL,
    processes {INT} NOT NULL DEFAULT 0,
    error_code TEXT,
    updated_at {INT} NOT NULL,
    PRIMARY KEY (agent_id, patch_id)
);
CREATE INDEX IF NOT EXISTS agent_patch_states_patch ON agent_patch_states (patch_id, state);
CREATE TABLE IF NOT EXISTS events (
    id {ID},
    org_id {INT} NOT NULL,
    agent_id TEXT NOT NULL,
    client_event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    patch_id TEXT,
    data TEXT NOT NULL,
    occurred_at {INT} NOT NULL,
    received_at {INT} NOT NULL,
    UNIQUE (agent_id, client_event_id)
);
CREATE INDEX IF NOT EXISTS events_org_agent ON events (org_id, agent_id, id);
CREATE TABLE IF NOT EXISTS bundle_blobs (
    content_address TEXT PRIMARY KEY,
    bytes {BLOB} NOT NULL
);
CREATE TABLE IF NOT EXISTS patches (
    org_id {INT} NOT NULL REFERENCES orgs(id),
    patch_id TEXT NOT NULL,
    revision {INT} NOT NULL,
    content_address TEXT NOT NULL,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    cves TEXT NOT NULL,
    severity TEXT NOT NULL,
    tier TEXT NOT NULL,
    author TEXT NOT NULL,
    module TEXT NOT NULL,
    target_sha256 TEXT NOT NULL,
    build_id TEXT,
    arch TEXT NOT NULL,
    ecosystem TEXT NOT NULL,
    package_name TEXT NOT NULL,
    package_version TEXT NOT NULL,
    signed_by TEXT NOT NULL,
    uploaded_at {INT} NOT NULL,
    superseded BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (org_id, patch_id, revision)
);
CREATE INDEX IF NOT EXISTS patches_pkg ON patches (org_id, ecosystem, package_name, package_version);
CREATE INDEX IF NOT EXISTS patches_ca ON patches (content_address, org_id);
CREATE TABLE IF NOT EXISTS policies (
    org_id {INT} NOT NULL,
    group_id {INT} NOT NULL REFERENCES computer_groups(id),
    patch_id TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    mode TEXT NOT NULL,
    approved BOOLEAN NOT NULL,
    updated_at {INT} NOT NULL,
    PRIMARY KEY (group_id, patch_id)
);
CREATE TABLE IF NOT EXISTS rollouts (
    org_id {INT} NOT NULL,
    patch_id TEXT NOT NULL,
    ring {INT} NOT NULL,
    updated_at {INT} NOT NULL,
    PRIMARY KEY (org_id, patch_id)
);

//! # stitch-agent — `stitchd`, the Stitch host agent
//!
//! Keeps micropatches in the memory of running processes, through server outages, reboots
//! and its own restarts, and never harms the host.
//!
//! - [`config`]: `/etc/stitch/agent.toml` + `STITCH_*` environment overrides.
//! - [`store`]: the local store (`/var/lib/stitch`): verified bundles, `state.db` (SQLite:
//!   installed patches, where applied, event outbox), atomic writes, rebuild on corruption.
//! - [`controller`]: the one owner of state; every request is an [`Input`] / [`AgentAction`],
//!   whatever transport it came from. Applies with `stitch-engine`.
//! - [`sync`]: the agent API client (enroll, heartbeat, events, signed manifest, long-poll,
//!   content-addressed bundles), manifest verification, backoff with jitter.
//! - [`inventory`]: host facts and installed packages for heartbeats.
//! - [`procconn`]: exec/fork/exit events from the netlink proc connector.
//! - [`control`]: the root-only Unix control socket behind `stitch agent ...`.
//! - [`hook`]: load-time patching with `stitch-hook` (patch before the module runs).
//! - [`daemon`]: the threads and how they are wired.
//!
//! Invariants: see [`controller`] (what may be in a process) and [`store`] (what survives a
//! crash). This crate has no `unsafe`; it emits `tracing` events and never installs a
//! subscriber (the `stitchd` binary does).
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod controller;
pub mod daemon;
pub mod error;
pub mod event;
pub mod hook;
pub mod inventory;
pub mod procconn;
pub mod scan;
pub mod store;
pub mod sync;

pub use config::Config;
pub use controller::{AgentAction, Controller, Input};
pub use error::AgentError;

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

//! The patch source file (`patch.toml`), as written by an author. See docs/patch-format.md.

use std::path::PathBuf;

use serde::Deserialize;

/// `at` and `resume` accept a number (`0x1139`) or a symbol expression (`"parse_header+0x1c"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Address {
    Number(u64),
    Expr(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchSource {
    pub id: String,
    pub revision: u32,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub cve: Vec<String>,
    pub severity: String,
    pub tier: String,
    pub author: String,
    pub target: TargetSource,
    #[serde(default, rename = "import")]
    pub imports: Vec<ImportSource>,
    #[serde(rename = "patchlet")]
    pub patchlets: Vec<PatchletSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSource {
    pub module: String,
    pub sha256: String,
    pub build_id: Option<String>,
    pub arch: String,
    pub package: PackageSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSource {
    pub ecosystem: String,
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSource {
    /// Name used in the assembly.
    pub name: String,
    /// Module file name that exports it (e.g. `libc.so.6`).
    pub module: String,
    /// Exported symbol; defaults to `name`.
    pub symbol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchletSource {
    pub name: String,
    pub at: Address,
    /// Hex bytes, spaces allowed: `"48 8b 45 f8 48 01 d0"`.
    pub original: String,
    /// `before`, `after` or `drop`. Required: a reviewer must see what happens to the
    /// instructions the jump displaces.
    pub displaced: String,
    pub resume: Option<Address>,
    /// Inline Intel-syntax assembly ...
    pub code: Option<String>,
    /// ... or a file next to patch.toml holding it.
    pub code_file: Option<PathBuf>,
}

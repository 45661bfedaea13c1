//! The `files.*` operations of the API (`files.fs`, `files.ls`,
//! `files.get`): their requests, their answers, and the calls they make on
//! a [`super::Disk`] of a stored backup.
//!
//! # Invariants
//!
//! - A request names a store, a backup and a volume; nothing outside the
//!   store is opened, and the backup is only read.
//! - The field names and answers are the ones of `docs/schema.json`.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::extract::GetSummary;
use super::{filesystems, get, list, EntryInfo, FsInfo};
use crate::catalog::Store;
use crate::error::Result;
use crate::progress::Control;

/// The request of `files.fs`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FsReq {
    /// The store directory.
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// The volume's name.
    volume: String,
}

/// The request of `files.ls`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LsReq {
    /// The store directory.
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// The volume's name.
    volume: String,
    /// The filesystem's `index` (from `files.fs`); optional when one is
    /// read natively.
    #[serde(default)]
    fs: Option<u32>,
    /// The directory (or file); default `/`.
    #[serde(default)]
    path: Option<String>,
}

/// The request of `files.get`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetReq {
    /// The store directory.
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// The volume's name.
    volume: String,
    /// The filesystem's `index`; optional when one is read natively.
    #[serde(default)]
    fs: Option<u32>,
    /// The file or directory to extract.
    path: String,
    /// Where to put it (must not exist).
    to: PathBuf,
}

/// The answer of `files.fs`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FilesystemsAnswer {
    /// The filesystems found.
    pub filesystems: Vec<FsInfo>,
}

/// The answer of `files.ls`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct EntriesAnswer {
    /// The entries, sorted by name.
    pub entries: Vec<EntryInfo>,
}

/// `files.fs`.
pub(crate) fn fs_op(r: &FsReq, ctl: &Control) -> Result<FilesystemsAnswer> {
    Ok(FilesystemsAnswer { filesystems: filesystems(&Store::open(&r.store)?, &r.backup, &r.volume, ctl)? })
}

/// `files.ls`.
pub(crate) fn ls_op(r: &LsReq, ctl: &Control) -> Result<EntriesAnswer> {
    let path = r.path.as_deref().unwrap_or("/");
    Ok(EntriesAnswer { entries: list(&Store::open(&r.store)?, &r.backup, &r.volume, r.fs, path, ctl)? })
}

/// `files.get`.
pub(crate) fn get_op(r: &GetReq, ctl: &Control) -> Result<GetSummary> {
    get(&Store::open(&r.store)?, &r.backup, &r.volume, r.fs, &r.path, &r.to, ctl)
}

//! The `files.*` operations of the API (`files.fs`, `files.ls`,
//! `files.get`): their requests, their answers, and the calls they make on
//! a [`super::Disk`] of a backup.
//!
//! # Invariants
//!
//! - A request names its backup in exactly one of two ways: `store`,
//!   `backup` and `volume` (knib's catalog; nothing outside the store is
//!   opened), or `backup_path` (a backup file with its chain, as
//!   CloudStack's agent names it; see [`super::Disk::open_backup_file`]).
//!   The backup is only read.
//! - The field names and answers are the ones of `docs/schema.json`.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::extract::GetSummary;
use super::{Disk, EntryInfo, FsInfo, FsRef};
use crate::catalog::Store;
use crate::error::{KnibError, Result};
use crate::progress::Control;
use crate::wire::{absolute, store_or_vault};

/// Which backup's volume a request reads: its fields, as every `files.*`
/// request has them.
struct Source<'a> {
    op: &'static str,
    store: &'a Option<PathBuf>,
    backup: &'a Option<String>,
    volume: &'a Option<String>,
    backup_path: &'a Option<PathBuf>,
}

impl Source<'_> {
    /// The disk the fields name; InvalidInput naming the fields when both
    /// forms or neither are given, or one of `store`, `backup`, `volume`
    /// is missing.
    fn open(&self, ctl: &Control) -> Result<Disk> {
        let catalog =
            [("store", self.store.is_some()), ("backup", self.backup.is_some()), ("volume", self.volume.is_some())];
        let given: Vec<&str> = catalog.iter().filter(|(_, g)| *g).map(|(n, _)| *n).collect();
        let refuse = |what: String| Err(KnibError::invalid(format!("request of {}: {what}", self.op)));
        match (self.backup_path, given.is_empty()) {
            (Some(path), true) => Disk::open_backup_file(path, ctl),
            (Some(_), false) => refuse(format!(
                "give either `backup_path` or `store`, `backup` and `volume`, not both (`backup_path` and `{}` given)",
                given.join("`, `")
            )),
            (None, true) => refuse("give `backup_path`, or `store`, `backup` and `volume`: none was given".into()),
            (None, false) => match (self.store, self.backup, self.volume) {
                (Some(store), Some(backup), Some(volume)) => {
                    store_or_vault(self.op, "store", store)?;
                    match store.to_str() {
                        Some(s) if crate::vault::is_vault(s) => Disk::open_vault(s, backup, volume, ctl),
                        _ => Disk::open_backup(&Store::open(store)?, backup, volume, ctl),
                    }
                }
                _ => {
                    let missing: Vec<&str> = catalog.iter().filter(|(_, g)| !*g).map(|(n, _)| *n).collect();
                    refuse(format!(
                        "`store`, `backup` and `volume` go together: missing field `{}` (or give `backup_path` alone)",
                        missing.join("`, `")
                    ))
                }
            },
        }
    }
}

/// The request of `files.fs`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FsReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`) (with
    /// `backup` and `volume`; or `backup_path`).
    #[serde(default)]
    store: Option<PathBuf>,
    /// The backup's id.
    #[serde(default)]
    backup: Option<String>,
    /// The volume's name.
    #[serde(default)]
    volume: Option<String>,
    /// The absolute path of a backup's qcow2 file (its chain follows the
    /// backing pointers), instead of `store`, `backup` and `volume`.
    #[serde(default)]
    backup_path: Option<PathBuf>,
}

/// The request of `files.ls`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LsReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`) (with
    /// `backup` and `volume`; or `backup_path`).
    #[serde(default)]
    store: Option<PathBuf>,
    /// The backup's id.
    #[serde(default)]
    backup: Option<String>,
    /// The volume's name.
    #[serde(default)]
    volume: Option<String>,
    /// The absolute path of a backup's qcow2 file (its chain follows the
    /// backing pointers), instead of `store`, `backup` and `volume`.
    #[serde(default)]
    backup_path: Option<PathBuf>,
    /// The filesystem's `index` or `device` (from `files.fs`); optional
    /// when one is read natively.
    #[serde(default)]
    fs: Option<FsRef>,
    /// The directory (or file); default `/`.
    #[serde(default)]
    path: Option<String>,
}

/// The request of `files.get`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`) (with
    /// `backup` and `volume`; or `backup_path`).
    #[serde(default)]
    store: Option<PathBuf>,
    /// The backup's id.
    #[serde(default)]
    backup: Option<String>,
    /// The volume's name.
    #[serde(default)]
    volume: Option<String>,
    /// The absolute path of a backup's qcow2 file (its chain follows the
    /// backing pointers), instead of `store`, `backup` and `volume`.
    #[serde(default)]
    backup_path: Option<PathBuf>,
    /// The filesystem's `index` or `device`; optional when one is read
    /// natively.
    #[serde(default)]
    fs: Option<FsRef>,
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

macro_rules! source {
    ($op:literal, $r:expr) => {
        Source { op: $op, store: &$r.store, backup: &$r.backup, volume: &$r.volume, backup_path: &$r.backup_path }
    };
}

/// `files.fs`.
pub(crate) fn fs_op(r: &FsReq, ctl: &Control) -> Result<FilesystemsAnswer> {
    Ok(FilesystemsAnswer { filesystems: source!("files.fs", r).open(ctl)?.filesystems() })
}

/// `files.ls`.
pub(crate) fn ls_op(r: &LsReq, ctl: &Control) -> Result<EntriesAnswer> {
    let path = r.path.as_deref().unwrap_or("/");
    Ok(EntriesAnswer { entries: source!("files.ls", r).open(ctl)?.list_in(r.fs.as_ref(), path, ctl)? })
}

/// `files.get`.
pub(crate) fn get_op(r: &GetReq, ctl: &Control) -> Result<GetSummary> {
    absolute("files.get", "to", &r.to)?;
    source!("files.get", r).open(ctl)?.get_in(r.fs.as_ref(), &r.path, &r.to, ctl)
}

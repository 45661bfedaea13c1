//! The group operations (`group.*`): one backup of each of several VMs at a
//! common instant, recorded as a group ([`crate::catalog::group`]).

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent;
use crate::catalog::group::{
    GroupRecord, MemberSpec, OnFailure, RestoredMember, SkippedMember, DEFAULT_FREEZE_TIMEOUT_SECS,
};
use crate::catalog::{DeleteOutcome, Store, DEFAULT_CHAIN_SIZE};
use crate::error::Result;
use crate::progress::Control;
use crate::qemu_img::{CompressionLibrary, ImageFormat};
#[cfg(not(feature = "libvirt"))]
use crate::wire::no_libvirt;
use crate::wire::{absolute, check_goes_with_compress, store_dir};

fn default_chain() -> i64 {
    DEFAULT_CHAIN_SIZE
}
fn default_freeze_timeout() -> u64 {
    DEFAULT_FREEZE_TIMEOUT_SECS
}

/// The request of `group.backup`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) struct GroupBackupReq {
    /// The store directory (made when missing).
    store: PathBuf,
    /// The VMs, at least two: each a `domain`, or a `vm` with `disks`.
    members: Vec<MemberSpec>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    connect: Option<String>,
    /// Freeze every running guest that has a guest agent channel for the
    /// snapshots (all at once).
    #[serde(default)]
    quiesce: bool,
    /// The bound on freezing and snapshotting while guests are frozen, in
    /// seconds (1 or more, default 30): past it every guest is thawed and
    /// the group fails. A group with no guest frozen is not bounded by it.
    #[serde(default = "default_freeze_timeout")]
    freeze_timeout_secs: u64,
    /// `"keep"` (default: publish the members that succeeded) or
    /// `"rollback"` (publish none unless all succeed).
    #[serde(default)]
    on_failure: OnFailure,
    /// Members copied at once after the thaw (1 or more; default: the
    /// store's `group.max_concurrent_copies`, 4).
    #[serde(default)]
    max_parallel: Option<usize>,
    /// Start new chains.
    #[serde(default)]
    full: bool,
    /// Backups per chain (default 8).
    #[serde(default = "default_chain")]
    chain_size: i64,
    /// Compress as copied: "zstd" or "zlib".
    #[serde(default)]
    compress: Option<CompressionLibrary>,
    /// With `compress`: read each compressed file back before the backup
    /// is kept; one that does not hold what was copied into it fails the
    /// backup as an internal error (nothing kept). The store's
    /// `compression.check_output` turns it on whatever is asked, for
    /// backups into the store. A file copied by qemu-img is compared with
    /// its source by guest bytes; one whose source knib's reader does not
    /// read is not read back (a warning is logged). Refused without
    /// `compress`.
    #[serde(default)]
    check_output: bool,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// A store (`group.list`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreReq {
    /// The store directory.
    store: PathBuf,
}

/// A group backup (`group.show`, `group.delete`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupRef {
    /// The store directory.
    store: PathBuf,
    /// The group backup's id.
    group: String,
}

/// The request of `group.restore`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupRestoreReq {
    /// The store directory.
    store: PathBuf,
    /// The group backup's id.
    group: String,
    /// The directory the volumes go to, as `<to>/<vm>/<volume>.<format>`.
    to: PathBuf,
    /// Their format (flattened copies).
    #[serde(default)]
    format: ImageFormat,
    /// qcow2 overlays over the backups instead of copies.
    #[serde(default)]
    quick: bool,
    /// Skip checking the chains' hashes as they are read (copies only: a
    /// quick restore reads nothing whole, and its files always pass
    /// `qemu-img check` first).
    #[serde(default)]
    no_verify: bool,
    /// Restore a partial group's members that have a backup (without it, a
    /// group with members that have none is refused, naming them).
    #[serde(default)]
    partial: bool,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// The request of `group.recover`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) struct GroupRecoverReq {
    /// The store directory.
    store: PathBuf,
    /// The libvirt URI.
    #[serde(default)]
    connect: Option<String>,
}

/// The answer of `group.restore`.
#[derive(Serialize, JsonSchema)]
pub struct GroupRestoreAnswer {
    /// Every volume written.
    pub volumes: Vec<RestoredMember>,
    /// The members left out of a partial restore (they have no backup).
    pub skipped: Vec<SkippedMember>,
}

/// The answer of `group.delete`.
#[derive(Serialize, JsonSchema)]
pub struct GroupDeleteAnswer {
    /// Each member backup's deletion.
    pub members: Vec<DeleteOutcome>,
}

pub(crate) fn backup(op: &str, r: GroupBackupReq, ctl: &Control) -> Result<GroupRecord> {
    store_dir(op, &r.store)?;
    check_goes_with_compress(op, r.check_output, r.compress.is_some())?;
    #[cfg(feature = "libvirt")]
    {
        let ctl = &agent::budget(ctl, r.timeout_secs);
        let opts = crate::catalog::group::GroupOptions {
            backup: crate::catalog::BackupOptions {
                full: r.full,
                isolated: false,
                chain_size: r.chain_size,
                compress: r.compress,
                check_output: r.check_output,
                method: None,
                group: None,
            },
            quiesce: r.quiesce,
            freeze_timeout: Duration::from_secs(r.freeze_timeout_secs),
            on_failure: r.on_failure,
            connect: r.connect,
            max_parallel: r.max_parallel,
        };
        opts.check()?;
        let store = Store::create(&r.store)?;
        let record = store.backup_group(&r.members, &opts, ctl)?;
        // `sync.auto`: each member's sync job, queued; the group backup is
        // not failed by a problem here.
        for m in record.members.iter().filter(|m| m.backup.is_some()) {
            match store.queue_sync_after_backup(&m.vm) {
                Ok(Some(j)) => log::info!("group backup {}: queued sync job {} of {}", record.id, j.id, m.vm),
                Ok(None) => {}
                Err(e) => log::warn!("group backup {}: the sync job of {} was not queued: {e}", record.id, m.vm),
            }
        }
        Ok(record)
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = (r, ctl, Duration::ZERO);
        Err(no_libvirt(op))
    }
}

pub(crate) fn list(r: StoreReq) -> Result<Vec<GroupRecord>> {
    store_dir("group.list", &r.store)?;
    Store::open(&r.store)?.groups()
}

pub(crate) fn show(r: GroupRef) -> Result<GroupRecord> {
    store_dir("group.show", &r.store)?;
    Store::open(&r.store)?.group(&r.group)
}

pub(crate) fn restore(r: GroupRestoreReq, ctl: &Control) -> Result<GroupRestoreAnswer> {
    store_dir("group.restore", &r.store)?;
    absolute("group.restore", "to", &r.to)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    let (volumes, skipped) =
        Store::open(&r.store)?.restore_group(&r.group, &r.to, r.format, r.quick, !r.no_verify, r.partial, ctl)?;
    Ok(GroupRestoreAnswer { volumes, skipped })
}

pub(crate) fn delete(r: GroupRef) -> Result<GroupDeleteAnswer> {
    store_dir("group.delete", &r.store)?;
    Ok(GroupDeleteAnswer { members: Store::open(&r.store)?.delete_group(&r.group)? })
}

pub(crate) fn recover(op: &str, r: GroupRecoverReq, ctl: &Control) -> Result<Vec<GroupRecord>> {
    store_dir(op, &r.store)?;
    #[cfg(feature = "libvirt")]
    {
        Store::open(&r.store)?.recover_groups(r.connect.as_deref(), ctl)
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = (r, ctl);
        Err(no_libvirt(op))
    }
}

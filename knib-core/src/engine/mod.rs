//! The engine: the operations of CloudStack's KVM agent, path-based and
//! stateless. The caller says which files are where; the engine does the
//! work and reports what it did. It keeps no records (the catalog does, for
//! standalone users).
//!
//! # Plain disk files (stopped VMs)
//!
//! A volume is a qcow2 file at a path the user chose, and that path stays
//! the disk's active file after every backup. On primary storage a volume is
//! in one of two shapes:
//!
//! - alone: `P` (before its first backup, or after an end-of-chain backup);
//! - `B <- P`: `B` is the knib base, named `<P's file name>.knib-base` in
//!   the same directory, and `P` holds every write since the last backup.
//!
//! The chain there never grows beyond base + one delta. A backup:
//!
//! 1. copies to the store under a temporary name: `P`'s top layer only
//!    (incremental, with the parent backup as backing file) or the flattened
//!    chain (full, isolated); the file is then fsynced and renamed;
//! 2. merges: `P` is committed into `B` and emptied (incremental or full on
//!    `B <- P`); a volume that was alone gets a base by linking `P` as `B`
//!    and renaming an empty overlay on `B` over `P`;
//! 3. at the end of a chain, `B` is renamed over `P`, so the next backup is
//!    a full one.
//!
//! Every intermediate state holds every guest write, and a state left by a
//! crash ([`take::repair_volume`]) is finished at the next backup. Data is
//! published on the store before primary is merged, so a crash between the
//! two makes the next incremental copy a superset, never miss a write.

#[cfg(feature = "libvirt")]
pub mod bitmap;
#[cfg(feature = "libvirt")]
pub mod bitmap_copy;
#[cfg(feature = "libvirt")]
pub mod bitmap_stopped;
pub mod compress;
#[cfg(feature = "libvirt")]
pub mod live;
pub mod merge;
pub mod method;
pub mod native;
pub mod restore;
pub mod stopped;
pub mod take;
#[cfg(feature = "libvirt")]
pub mod validate;
pub mod verify;

/// The hashing of files lives below the qcow2 code ([`crate::hash`]); the
/// engine hands it on under its old path.
pub use crate::hash::{self, hash_files};
pub use compress::{compress, compress_verified, finalize, CompressOptions, CompressedFile};
pub use merge::merge_delta;
pub use method::BackupMethod;
pub use native::DataPath;
pub use restore::{
    backup_chain_files, create_overlay, require_clean_metadata, require_quick_restorable, restore, restore_verified,
    RestoreRequest,
};
pub use take::{
    take_backup, take_backup_with, BackupKind, TakeBackupAnswer, TakeBackupRequest, VolumeBackup, VolumeResult,
};
pub use verify::ExpectedHash;

/// Refuse (InvalidInput) a backup of `kind` whose merge would remove an
/// old delta (`[disk, old delta]` of each disk that has one) while it
/// holds internal snapshots (`virsh snapshot-create-as` without
/// `--disk-only` puts them in the file the disk runs on): they would be
/// removed with it, and libvirt would still list them. An isolated backup
/// merges nothing. Read from each file's qcow2 header; a file that is not a
/// regular qcow2 file is left for the steps that read it to report.
pub(crate) fn refuse_dropping_internal_snapshots<'a>(
    kind: BackupKind,
    old_deltas: impl IntoIterator<Item = (&'a str, &'a std::path::Path)>,
) -> crate::error::Result<()> {
    if kind == BackupKind::Isolated {
        return Ok(());
    }
    for (disk, file) in old_deltas {
        let Some(h) = crate::qcow2::header_of_regular_file(file, false) else { continue };
        if h.nb_snapshots > 0 {
            return Err(crate::error::KnibError::invalid(format!(
                "disk {disk}: {} holds {} internal snapshot(s) (`qemu-img snapshot -l` lists them): this backup would merge that file into its base and remove it, and the snapshots with it; delete them (virsh snapshot-delete) or revert to them first",
                file.display(),
                h.nb_snapshots
            )));
        }
    }
    Ok(())
}

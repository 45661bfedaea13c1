//! Discarding an interrupted domain backup that `recover` cannot finish or
//! undo (`knib recover --discard`): its domain is gone, its disks were
//! flattened, detached or replaced since, or its journal is damaged. Every
//! backup of the VM is refused while the journal is there.
//!
//! # Invariants
//!
//! - Only the store changes, under the VM's lock: nothing of the domain or
//!   of its disks is read or written (the domain may be gone, and knib does
//!   not guess which of its files hold what). The answer says what may be
//!   left on them for the operator.
//! - The journal is not removed but set aside, as it was, under a name the
//!   store's listing and sweeps skip
//!   (`vms/<vm>/.discarded-<unix ms>.<journal name>`): what the interrupted
//!   backup was doing stays on record. An entry at the journal's name that
//!   is not a regular file is removed as an entry (a link is never
//!   followed).
//! - A backup that was published stays: it is whole. An unpublished one's
//!   partial files (`.<id>.part`) are removed by the VM lock's sweep.
//! - A bitmap backup's work directory is removed, unless it holds its
//!   `frozen-by-knib` marker: the guest may still be frozen, and the answer
//!   says so.
//! - The next backup decides from the disks, as always (see
//!   [`super::head`]): full when their deltas or bitmaps do not say what
//!   they follow.
//! - A compression interrupted while it replaced a published backup's
//!   files, which every lock finishes, stops every operation on the VM
//!   when it cannot be finished: its `manifest.next.json` is not the
//!   backup's, a `.comp` file is not one knib wrote, a file whose `.comp`
//!   is gone is not that copy, or the backup's `manifest.json` cannot be
//!   read (then only the next manifest is set aside), but not a newer
//!   knib's (a newer schema). It is set aside (method
//!   "compression": the next manifest kept as
//!   `vms/<vm>/.discarded-<unix ms>.<id>.manifest.next.json`, the `.comp`
//!   files still there removed); a file it had already replaced is named
//!   in the answer, and keeps in the backup's manifest the hash and size a
//!   next manifest of knib's gives it (under a damaged one it no longer
//!   matches the backup's manifest).
//! - A knib built without libvirt cannot read the journals (their plans
//!   are libvirt's): it sets them aside unread, and leaves a bitmap
//!   backup's work directory, whose name it cannot know, as it is.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Store;
use crate::error::{KnibError, Result};
use crate::fsio;

/// One interrupted backup's journal, set aside (`recover` with `discard`).
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct DiscardedJournal {
    /// "snapshot" or "bitmap": the method of the interrupted backup;
    /// "compression": a compression of a published backup, interrupted
    /// while it replaced the backup's files, that cannot be finished (its
    /// `manifest.next.json` is kept in `kept_as`).
    pub method: String,
    /// Where the journal is kept now (null: it was not a regular file, and
    /// its entry was removed).
    pub kept_as: Option<PathBuf>,
    /// The interrupted backup's id, when the journal could be read.
    pub backup_id: Option<String>,
    /// The step it had reached, when the journal could be read.
    pub step: Option<String>,
    /// Whether it had been published in this store (it then stays); null
    /// when that cannot be told (the journal unreadable, or the backup
    /// written to a vault).
    pub published: Option<bool>,
    /// Why the journal could not be read, when it could not; for a
    /// compression, why it cannot be finished.
    pub unreadable: Option<String>,
    /// What may be left outside the store, for the operator to look at;
    /// for a compression, the backup's files it may have replaced, and
    /// those it did not although their `.comp` files are gone.
    pub left: Vec<String>,
}

/// What [`Store::discard_interrupted`] did.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct DiscardOutcome {
    /// The VM.
    pub vm: String,
    /// The journals set aside (none: no backup of the VM was interrupted).
    pub discarded: Vec<DiscardedJournal>,
}

/// The journals of a VM's interrupted backups: (file name, method).
const JOURNALS: [(&str, &str); 2] = [("journal.json", "snapshot"), ("bitmap-journal.json", "bitmap")];

impl Store {
    /// Set aside the journal of an interrupted backup of `vm` that
    /// `recover` cannot finish or undo, so that its backups run again, and
    /// each interrupted compression of its backups that cannot be
    /// finished; nothing outside the store is touched (see the module's
    /// invariants).
    /// A VM the store has no directory for is not found; one without a
    /// journal has nothing discarded.
    pub fn discard_interrupted(&self, vm: &str) -> Result<DiscardOutcome> {
        crate::names::validate("VM name", vm)?;
        let dir = self.vm_dir(vm);
        if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Err(KnibError::not_found(format!(
                "the store has no VM {vm} ({} is not a directory)",
                dir.display()
            )));
        }
        // Under the lock, whose sweep removes an unpublished backup's
        // partial files; the compressions it cannot finish are set aside
        // first, then the others finished, as every lock does.
        let _lock = self.lock_vm_unfinished(vm, &format!("discard of the interrupted backup of {vm}"))?;
        let mut discarded = self.set_aside_unfinishable_compressions(vm)?;
        self.finish_compressions(vm)?;
        for (name, method) in JOURNALS {
            let path = dir.join(name);
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            let mut d = DiscardedJournal {
                method: method.to_string(),
                kept_as: None,
                backup_id: None,
                step: None,
                published: None,
                unreadable: None,
                left: Vec::new(),
            };
            let read = if method == "snapshot" {
                self.read_live_journal(vm, &mut d)
            } else {
                self.read_bitmap_journal(vm, &mut d)
            };
            if let Err(e) = read {
                d.unreadable = Some(e.message);
            }
            d.kept_as = set_aside(&path, &meta, &dir, name)?;
            log::warn!(
                "the interrupted {method} backup {} of {vm} is discarded: its journal {} is {}",
                d.backup_id.as_deref().unwrap_or("(journal unreadable)"),
                path.display(),
                d.kept_as.as_ref().map(|p| format!("kept as {}", p.display())).unwrap_or_else(|| "removed".into())
            );
            discarded.push(d);
        }
        Ok(DiscardOutcome { vm: vm.to_string(), discarded })
    }
}

/// Set the entry at `path` (whose own metadata is `meta`) aside, as it
/// was, under a name the store's listing and sweeps skip,
/// `<dir>/.discarded-<unix ms>.<name>`: a regular file is renamed there,
/// never over anything (its new path is returned); anything else (a
/// directory, a link: never followed) is removed as an entry (`None`).
/// Durable either way.
pub(super) fn set_aside(path: &Path, meta: &fs::Metadata, dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    if meta.is_file() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_millis())
            .unwrap_or_default();
        let to = dir.join(format!(".discarded-{now}.{name}"));
        // (Its new directory is synced by the rename; the old one here,
        // when it is another.)
        fsio::rename_noreplace(path, &to)?;
        if fsio::parent_dir(path) != dir {
            fsio::sync_dir(fsio::parent_dir(path))?;
        }
        Ok(Some(to))
    } else {
        fsio::remove_entry(path)?;
        fsio::sync_dir(fsio::parent_dir(path))?;
        Ok(None)
    }
}

#[cfg(feature = "libvirt")]
impl Store {
    /// What a snapshot-method journal says, into `d`.
    fn read_live_journal(&self, vm: &str, d: &mut DiscardedJournal) -> Result<()> {
        let Some(j) = self.load_journal(vm)? else { return Ok(()) };
        crate::names::validate("backup id", &j.plan.backup_id)?;
        d.backup_id = Some(j.plan.backup_id.clone());
        d.step = Some(j.step.as_str().to_string());
        for disk in &j.plan.disks {
            d.left.push(format!(
                "disk {} may still run on {} or {} (see the README, recover: commit a knib-delta file into the file right below it)",
                disk.target,
                disk.new_delta.display(),
                disk.old_delta.as_ref().unwrap_or(&disk.base).display()
            ));
        }
        self.published(vm, &j.plan.backup_id, j.vault.as_deref(), d);
        Ok(())
    }

    /// Whether backup `id` was published in this store, into `d` (asked
    /// last: an error here takes nothing from what `d` already says).
    fn published(&self, vm: &str, id: &str, vault: Option<&str>, d: &mut DiscardedJournal) {
        if let Some(v) = vault {
            d.left.push(format!("vault {v} may hold objects of backup {id} (knib sync reports them)"));
            return;
        }
        match super::journal_check::published_in_store(&self.root, vm, id) {
            Ok(p) => d.published = Some(p),
            Err(e) => d.left.push(format!("whether backup {id} was published cannot be told: {e}")),
        }
    }

    /// What a bitmap journal says, into `d`; its work directory removed
    /// unless the guest may be frozen.
    fn read_bitmap_journal(&self, vm: &str, d: &mut DiscardedJournal) -> Result<()> {
        let Some(j) = self.load_bitmap_journal(vm)? else { return Ok(()) };
        let id = j.plan.backup_id.clone();
        crate::names::validate("backup id", &id)?;
        d.backup_id = Some(id.clone());
        d.step = Some(j.step.as_str().to_string());
        if !j.plan.stopped {
            d.left.push(format!(
                "libvirt may still run this backup's job on the domain (virsh domjobinfo {vm}; virsh domjobabort {vm} ends it)"
            ));
        }
        if let Some(c) = &j.plan.checkpoint {
            d.left.push(format!("the domain may keep checkpoint {c} of this backup (virsh checkpoint-list {vm})"));
        }
        // The work directory knib names for this backup, whatever the
        // journal says (it is untrusted).
        let rel = std::path::Path::new("vms").join(vm).join(format!(".{id}.nbd"));
        let work = self.root.join(&rel);
        match fs::symlink_metadata(&work) {
            Ok(m) if m.is_dir() && fs::symlink_metadata(work.join("frozen-by-knib")).is_ok() => {
                d.left.push(format!(
                    "the guest's filesystems may still be frozen by this backup: thaw them (virsh domfsthaw {vm}); {} stays, its marker on record",
                    work.display()
                ));
            }
            Ok(_) => fsio::remove_entry(&work)?,
            Err(_) => {}
        }
        self.published(vm, &id, j.vault.as_deref(), d);
        Ok(())
    }
}

#[cfg(not(feature = "libvirt"))]
impl Store {
    fn read_live_journal(&self, _vm: &str, _d: &mut DiscardedJournal) -> Result<()> {
        Err(KnibError::invalid("this knib is built without libvirt: its journal is not read"))
    }

    fn read_bitmap_journal(&self, _vm: &str, _d: &mut DiscardedJournal) -> Result<()> {
        Err(KnibError::invalid("this knib is built without libvirt: its journal is not read"))
    }
}

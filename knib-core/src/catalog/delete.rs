//! Deleting a backup from the store.
//!
//! # Invariants
//!
//! - A backup with children is never removed from disk: it is marked
//!   removed, and expunged when its last child goes.
//! - Deleting the head makes the next backup a full one.
//! - A delete takes the VM's lock and is refused while a job of the backup
//!   runs. A backup a quick-restored disk still reads (see `pins`) is
//!   never removed from disk: deleting it is refused when it would be (it
//!   has no children), and a removed ancestor such a disk reads is kept.
//! - The deleted backup's libvirt checkpoint (`knib-<id>`, left by a
//!   backup by bitmap that was its chain's head) is deleted with it, when
//!   a domain of the VM's name has it on the local hypervisor
//!   (`qemu:///system`): no bitmap is left behind for a backup that is gone.
//!   The next backup of the VM is then full.

use std::fs;

use serde::{Deserialize, Serialize};

use super::confine::Want;
use super::{confine, Manifest, Store};
use crate::error::{KnibError, Result};
use crate::fsio;

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeleteOutcome {
    /// Backups whose files were removed.
    pub expunged: Vec<String>,
    /// Backups kept on disk, marked removed, because later backups need them.
    pub marked_removed: Vec<String>,
}

impl Store {
    /// Delete backup `id` without breaking any chain: a backup that later
    /// backups depend on is marked removed and kept; one that none depends
    /// on is expunged, and so are removed ancestors left without children.
    pub fn delete(&self, id: &str) -> Result<DeleteOutcome> {
        let m = self.show(id)?;
        let _lock = self.lock_vm(&m.vm, &format!("delete of {id}"))?;
        self.refuse_while_validated(id)?;
        let (all, unreadable) = self.scan_backups(&m.vm)?;
        let mut m = all
            .iter()
            .find(|x| x.id == id && !x.removed)
            .cloned()
            .ok_or_else(|| KnibError::not_found(format!("backup {id} does not exist")))?;
        let vm = m.vm.clone();
        let mut outcome = DeleteOutcome { expunged: Vec::new(), marked_removed: Vec::new() };
        let mut state = self.load_state(&m.vm)?;
        let children = |x: &str, gone: &[String]| {
            all.iter().filter(|c| c.parent.as_deref() == Some(x) && !gone.contains(&c.id)).count()
        };
        if !unreadable.is_empty() {
            log::warn!(
                "VM {}: the manifests of {} cannot be read; they may depend on backup {id}, so it is kept on disk",
                m.vm,
                unreadable.join(", ")
            );
        }
        if children(&m.id, &outcome.expunged) > 0 || !unreadable.is_empty() {
            m.removed = true;
            m.save(&self.backup_dir(&m).join("manifest.json"))?;
            outcome.marked_removed.push(m.id.clone());
        } else {
            // Never a file a quick-restored disk still reads.
            self.refuse_while_pinned(&m)?;
            let mut cur = Some(m);
            while let Some(x) = cur.take() {
                self.expunge(&x)?;
                if state.head.as_deref() == Some(x.id.as_str()) {
                    state.head = None;
                    self.save_state(&x.vm, &state)?;
                }
                outcome.expunged.push(x.id.clone());
                if let Some(p) = &x.parent {
                    if let Some(pm) = all.iter().find(|a| &a.id == p) {
                        if pm.removed
                            && children(&pm.id, &outcome.expunged) == 0
                            && unreadable.is_empty()
                            && self.live_pins(pm)?.is_empty()
                        {
                            cur = Some(pm.clone());
                        }
                    }
                }
            }
        }
        drop_checkpoint(&vm, id);
        Ok(outcome)
    }

    fn expunge(&self, m: &Manifest) -> Result<()> {
        let dir = self.backup_dir(m);
        confine::check(&self.root, &Self::vm_rel(&m.vm).join(&m.id), Want::Dir, "backup directory")?;
        let trash = self.vm_dir(&m.vm).join(format!(".{}.deleting", m.id));
        fs::rename(&dir, &trash).map_err(|e| KnibError::io("cannot remove", &dir, e))?;
        fsio::sync_dir(&self.vm_dir(&m.vm))?;
        fs::remove_dir_all(&trash).map_err(|e| KnibError::io("cannot remove", &trash, e))
    }
}

/// Delete checkpoint `knib-<id>` of domain `vm`, when there is such a
/// domain and it has one; a failure is logged (the backup is deleted
/// either way, and the next bitmap backup, full, deletes a stale
/// checkpoint itself).
#[cfg(feature = "libvirt")]
fn drop_checkpoint(vm: &str, id: &str) {
    use crate::libvirt::backup::{checkpoint_name, checkpoints};
    let name = checkpoint_name(id);
    let Ok(dom) = crate::libvirt::domain(None, vm) else { return };
    let has = match checkpoints(&dom) {
        Ok(c) => c.contains(&name),
        Err(e) => {
            log::warn!("delete of backup {id}: cannot list the checkpoints of domain {vm}: {e}");
            return;
        }
    };
    if !has {
        return;
    }
    match crate::engine::bitmap::delete_checkpoint(&dom, &name) {
        Ok(_) => log::info!("delete of backup {id}: deleted checkpoint {name} of domain {vm}"),
        Err(e) => log::warn!(
            "delete of backup {id}: checkpoint {name} of domain {vm} is left ({e}); the next backup of {vm} is full and deletes it"
        ),
    }
}

#[cfg(not(feature = "libvirt"))]
fn drop_checkpoint(_vm: &str, _id: &str) {}

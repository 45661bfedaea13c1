//! Deleting a backup from the store.
//!
//! # Invariants
//!
//! - A backup with children is never removed from disk: it is marked
//!   removed, and expunged when nothing needs it any more: no backup that
//!   is not removed descends from it, and no quick restore reads it. Each
//!   delete expunges every removed backup of the VM that nothing needs
//!   (children before parents), so one left by an interrupted delete or
//!   kept for a manifest that could not be read then goes too.
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

use std::collections::{HashMap, HashSet};
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
    /// Backups kept on disk, marked removed (see `kept_because`).
    pub marked_removed: Vec<String>,
    /// Why the backup asked for was kept, marked removed, instead of
    /// expunged, and what lets its files go: the later backups that read
    /// it (by id), or the backups of the VM whose manifests cannot be read
    /// (they may). `None` when it was expunged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_because: Option<String>,
}

/// Whether backup `x`'s chain, among the backups of its VM (`by_id`),
/// reads backup `id` (an ancestor of it); a chain that loops reads none.
pub(crate) fn chain_reads(by_id: &HashMap<&str, &Manifest>, x: &Manifest, id: &str) -> bool {
    let mut cur = x.parent.as_deref();
    for _ in 0..by_id.len() {
        match cur {
            Some(p) if p == id => return true,
            Some(p) => cur = by_id.get(p).and_then(|q| q.parent.as_deref()),
            None => return false,
        }
    }
    false
}

/// `one` or `many`, as `n` is 1 or not: the words of a sentence about
/// `n` backups.
pub(crate) fn one_or_many<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

impl DeleteOutcome {
    /// Nothing done yet.
    pub(crate) fn new() -> Self {
        DeleteOutcome { expunged: Vec::new(), marked_removed: Vec::new(), kept_because: None }
    }

    /// The backup was kept because backups whose manifests cannot be read
    /// (`unreadable`, of VM `vm`) may depend on it; `where_` names the
    /// store or vault, `then` what lets its files or objects go.
    pub(crate) fn kept_for_unreadable(&mut self, vm: &str, unreadable: &[String], where_: &str, then: &str) {
        self.kept_because = Some(format!(
            "the manifests of {} {} of VM {vm} in {where_} cannot be read (`knib verify` reports them): they may depend on it; {then}",
            one_or_many(unreadable.len(), "backup", "backups"),
            unreadable.join(", ")
        ));
    }

    /// The backup was kept because the backups `later` read it; `what`
    /// is what it keeps ("files", "objects").
    pub(crate) fn kept_for_later(&mut self, later: &[&str], what: &str) {
        self.kept_because = Some(format!(
            "{} {} {} on it: its {what} stay until {} deleted",
            one_or_many(later.len(), "backup", "backups"),
            later.join(", "),
            one_or_many(later.len(), "depends", "depend"),
            one_or_many(later.len(), "it is", "they are")
        ));
    }
}

impl Store {
    /// Delete backup `id` without breaking any chain: a backup that later
    /// backups depend on is marked removed and kept; one that none depends
    /// on is expunged, and so are removed ancestors left without children.
    pub fn delete(&self, id: &str) -> Result<DeleteOutcome> {
        let m = self.show(id)?;
        let _lock = self.lock_vm(&m.vm, &format!("delete of {id}"))?;
        self.refuse_while_validated(id)?;
        crate::crashpoint::pause_point(&format!("delete of {id}: no validation of it runs"));
        let (all, unreadable) = self.scan_backups(&m.vm)?;
        let mut m = all
            .iter()
            .find(|x| x.id == id && !x.removed)
            .cloned()
            .ok_or_else(|| KnibError::not_found(format!("backup {id} does not exist")))?;
        let vm = m.vm.clone();
        let mut outcome = DeleteOutcome::new();
        let mut state = self.load_state(&m.vm)?;
        if !unreadable.is_empty() {
            log::warn!(
                "VM {}: the manifests of {} cannot be read; they may depend on backup {id}, so it is kept on disk",
                m.vm,
                unreadable.join(", ")
            );
            m.removed = true;
            m.save(&self.backup_dir(&m).join("manifest.json"))?;
            outcome.marked_removed.push(m.id.clone());
            let then = format!("its files stay until they are mended or removed, and a later delete of a backup of {vm} then expunges it (unless later backups read it)");
            outcome.kept_for_unreadable(&vm, &unreadable, &format!("store {}", self.root.display()), &then);
            drop_checkpoint(&vm, id);
            return Ok(outcome);
        }
        // What must stay on disk: every backup not removed (the one being
        // deleted counts as removed now) and every ancestor of one; then
        // every removed backup a quick restore still reads, and its
        // ancestors. The rest of the removed backups, this one included
        // when nothing needs it, are expunged, children before parents.
        let by_id: HashMap<&str, &Manifest> = all.iter().map(|x| (x.id.as_str(), x)).collect();
        let removed = |x: &Manifest| x.removed || x.id == m.id;
        let mut needed: HashSet<String> = HashSet::new();
        let keep = |start: &Manifest, needed: &mut HashSet<String>| {
            let mut cur = Some(start);
            while let Some(x) = cur {
                if !needed.insert(x.id.clone()) {
                    break;
                }
                cur = x.parent.as_deref().and_then(|p| by_id.get(p).copied());
            }
        };
        for x in all.iter().filter(|x| !removed(x)) {
            keep(x, &mut needed);
        }
        let reads_it = |x: &Manifest| chain_reads(&by_id, x, &m.id);
        let needed_by_later = needed.contains(&m.id);
        if !needed_by_later {
            // Never a file a quick-restored disk still reads.
            self.refuse_while_pinned(&m)?;
        }
        let unneeded: Vec<&Manifest> =
            all.iter().filter(|x| x.removed && x.id != m.id && !needed.contains(&x.id)).collect();
        // The removed backups a quick restore reads that read this one.
        let mut pinned_readers: Vec<&str> = Vec::new();
        for x in unneeded {
            if !self.live_pins(x)?.is_empty() {
                keep(x, &mut needed);
                if reads_it(x) {
                    pinned_readers.push(&x.id);
                }
            }
        }
        if needed.contains(&m.id) {
            m.removed = true;
            m.save(&self.backup_dir(&m).join("manifest.json"))?;
            outcome.marked_removed.push(m.id.clone());
            if needed_by_later {
                // The backups not removed whose chains read it.
                let later: Vec<&str> =
                    all.iter().filter(|x| !removed(x) && reads_it(x)).map(|x| x.id.as_str()).collect();
                outcome.kept_for_later(&later, "files");
            } else {
                // Only removed backups read it, which quick restores read
                // (before, such a delete did nothing: the backup stayed
                // listed, and the answer was empty).
                outcome.kept_because = Some(format!(
                    "{} {}, deleted, {} on it and {} read by a quick restore: its files stay until that quick restore no longer reads {} (consolidated or removed) and a later delete of a backup of {vm} expunges it",
                    one_or_many(pinned_readers.len(), "backup", "backups"),
                    pinned_readers.join(", "),
                    one_or_many(pinned_readers.len(), "depends", "depend"),
                    one_or_many(pinned_readers.len(), "is", "are"),
                    one_or_many(pinned_readers.len(), "it", "them"),
                ));
            }
        }
        let depth = |x: &Manifest| {
            let mut d = 0usize;
            let mut cur = x.parent.as_deref().and_then(|p| by_id.get(p).copied());
            while let Some(p) = cur {
                d += 1;
                if d > all.len() {
                    break;
                }
                cur = p.parent.as_deref().and_then(|q| by_id.get(q).copied());
            }
            d
        };
        let mut gone: Vec<&Manifest> = all.iter().filter(|x| removed(x) && !needed.contains(&x.id)).collect();
        gone.sort_by_key(|x| std::cmp::Reverse(depth(x)));
        for x in gone {
            self.expunge(x)?;
            if state.head.as_deref() == Some(x.id.as_str()) {
                state.head = None;
                self.save_state(&x.vm, &state)?;
            }
            outcome.expunged.push(x.id.clone());
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

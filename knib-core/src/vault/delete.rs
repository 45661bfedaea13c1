//! Deleting a backup from a vault, chain-safe as in a store directory: a
//! backup that later backups depend on is marked removed (its manifest
//! rewritten) and kept; one that none depends on is expunged (its manifest
//! first, so it is never seen half-deleted, then its objects), and so are
//! removed ancestors left without children.

use object_store::PutMode;

use super::Vault;
use crate::catalog::{DeleteOutcome, Manifest};
use crate::error::{KnibError, Result};

impl Vault {
    /// Delete backup `id` from the vault without breaking any chain.
    pub fn delete(&self, id: &str) -> Result<DeleteOutcome> {
        let m = self.show(id)?;
        let (all, unreadable) = self.scan_backups(&m.vm)?;
        let mut m = all
            .iter()
            .find(|x| x.id == id && !x.removed)
            .cloned()
            .ok_or_else(|| KnibError::not_found(format!("backup {id} does not exist")))?;
        let mut outcome = DeleteOutcome::new();
        let children = |x: &str, gone: &[String]| {
            all.iter().filter(|c| c.parent.as_deref() == Some(x) && !gone.contains(&c.id)).count()
        };
        if !unreadable.is_empty() {
            log::warn!(
                "vault {}: the manifests of {} cannot be read; they may depend on backup {id}, so it is kept",
                self.location(),
                unreadable.join(", ")
            );
        }
        if children(&m.id, &outcome.expunged) > 0 || !unreadable.is_empty() {
            m.removed = true;
            let text = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
            self.put_small(&Self::manifest_rel(&m), text, PutMode::Overwrite, "manifest")?;
            outcome.marked_removed.push(m.id.clone());
            if unreadable.is_empty() {
                // The backups not removed whose chains read it, else its
                // children (removed, kept while quick restores read them).
                let by_id: std::collections::HashMap<&str, &Manifest> =
                    all.iter().map(|x| (x.id.as_str(), x)).collect();
                let later: Vec<&str> = all
                    .iter()
                    .filter(|x| !x.removed && crate::catalog::chain_reads(&by_id, x, &m.id))
                    .map(|x| x.id.as_str())
                    .collect();
                if later.is_empty() {
                    let served: Vec<&str> = all
                        .iter()
                        .filter(|c| c.parent.as_deref() == Some(m.id.as_str()))
                        .map(|c| c.id.as_str())
                        .collect();
                    use crate::catalog::delete::one_or_many;
                    outcome.kept_because = Some(format!(
                        "{} {}, deleted, kept while a quick restore from the vault reads {}, {} on it: the vault's deletes do not come back to removed backups, so its objects stay until removed with an S3 client once that quick restore is consolidated",
                        one_or_many(served.len(), "backup", "backups"),
                        served.join(", "),
                        one_or_many(served.len(), "it", "them"),
                        one_or_many(served.len(), "depends", "depend"),
                    ));
                } else {
                    outcome.kept_for_later(&later, "objects");
                }
            } else {
                // No later delete comes back to it but the cascade of a
                // delete of a backup that reads it.
                let then = "its objects stay, marked removed, until a delete of a backup that reads it reaches it (if none does, they stay: once those manifests are mended, remove its objects with an S3 client)";
                outcome.kept_for_unreadable(&m.vm, &unreadable, &format!("vault {}", self.location()), then);
            }
            return Ok(outcome);
        }
        // No backup depends on it, unless one is being sent now: its parent
        // is not known until its manifest is written, so a delete waits.
        let known: Vec<String> = all.iter().map(|x| x.id.clone()).chain(unreadable.iter().cloned()).collect();
        if let Some(what) = self.unfinished_upload(&m.vm, &known)? {
            return Err(KnibError::busy(format!(
                "backup {id} is not deleted from vault {}: an upload of {}'s backups is unfinished ({what}); a sync or direct backup of {} is running, or one was interrupted: delete again when it ends, or after the next sync of {}, which removes interrupted uploads",
                self.location(),
                m.vm,
                m.vm,
                m.vm
            )));
        }
        let mut cur = Some(m);
        let mut first = true;
        while let Some(x) = cur.take() {
            // A backup a quick restore serves from the vault is kept: asked
            // for, the delete is busy; reached by the cascade, it stays
            // marked removed.
            if let Err(e) = self.expunge_unless_served(&x) {
                if first || e.kind != crate::ErrorKind::Busy {
                    return Err(e);
                }
                log::warn!("vault {}: {e}; it stays marked removed", self.location());
                break;
            }
            first = false;
            outcome.expunged.push(x.id.clone());
            if let Some(p) = &x.parent {
                if let Some(pm) = all.iter().find(|a| &a.id == p) {
                    if pm.removed && children(&pm.id, &outcome.expunged) == 0 {
                        cur = Some(pm.clone());
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Remove backup `m` unless a quick restore serves it (busy, naming
    /// the domains; see [`super::serving`]): the records are looked for
    /// before its manifest is removed and again after (the manifest is put
    /// back when one appeared meanwhile), then its objects are removed.
    fn expunge_unless_served(&self, m: &Manifest) -> Result<()> {
        let busy = |served: Vec<String>| {
            KnibError::busy(format!(
                "backup {} of vault {} is not deleted: a quick restore runs on it ({}); consolidate the domain first (`knib consolidate --domain DOMAIN` on its host)",
                m.id,
                self.location(),
                served.join(", ")
            ))
        };
        let served = self.served_to(&m.id)?;
        if !served.is_empty() {
            return Err(busy(served));
        }
        let rel = Self::manifest_rel(m);
        let text = self.get_small(&rel, super::MAX_MANIFEST, "manifest")?;
        self.delete_key(&rel)?;
        crate::crashpoint::pause_point(&format!("delete of {} from the vault: manifest removed", m.id));
        let served = self.served_to(&m.id)?;
        if !served.is_empty() {
            if let Some(text) = text {
                self.put_small(&rel, text, PutMode::Overwrite, "manifest")?;
            }
            return Err(busy(served));
        }
        for v in &m.volumes {
            self.delete_key(&Self::volume_rel(m, &v.file))?;
        }
        Ok(())
    }
}

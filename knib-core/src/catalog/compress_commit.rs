//! How a compression replaces a backup's files and its manifest so that a
//! crash at any point leaves a backup that reads, restores and verifies.
//!
//! A compression writes `<file>.comp` beside each file of the backup, each
//! made durable; then, under the VM's lock:
//!
//! 1. the manifest it will have afterwards (new hashes, sizes and
//!    `compression`) is written beside the manifest as
//!    [`NEXT_MANIFEST`] (atomically, durably);
//! 2. each `<file>.comp` is renamed over its file (each durable);
//! 3. [`NEXT_MANIFEST`] is renamed over `manifest.json`.
//!
//! Between 1 and 3 the files and `manifest.json` disagree for the volumes
//! already renamed. So while [`NEXT_MANIFEST`] exists:
//!
//! - a reader sees each volume as its file is: the next manifest's hash and
//!   size once its `.comp` is gone (renamed over it), the old ones while it
//!   is there; `compression` once every file is renamed
//!   ([`Store::pending_view`]);
//! - whoever takes the VM's lock next finishes steps 2 and 3 first
//!   ([`Store::finish_compressions`]), before anything else can remove a
//!   `.comp` file or save the manifest.
//!
//! A `.comp` file is removed by knib only when no [`NEXT_MANIFEST`] names
//! it (a compression that failed or was killed before step 1), so "`.comp`
//! gone" always means "renamed over its file". [`NEXT_MANIFEST`] is read
//! as hostile input: it must be the same backup as `manifest.json` (id,
//! VM, parent, volumes, their files and backing pointers, ...) except for
//! hashes, sizes and `compression`, else it is `corrupt`, naming it.

use std::path::PathBuf;

use super::{confine, Manifest, Store};
use crate::engine::compress::comp_path;
use crate::error::{KnibError, Result};
use crate::fsio;

/// The manifest a compression in progress will leave, beside
/// `manifest.json`.
pub const NEXT_MANIFEST: &str = "manifest.next.json";

impl Store {
    /// The next manifest of backup `m` (read as it is on disk), if a
    /// compression left one; checked to be the same backup.
    fn next_manifest(&self, m: &Manifest) -> Result<Option<Manifest>> {
        let rel = Self::vm_rel(&m.vm).join(&m.id).join(NEXT_MANIFEST);
        let path = self.root.join(&rel);
        let Some(text) = confine::read(&self.root, &rel, "manifest")? else { return Ok(None) };
        let next = Manifest::parse(&text, &path)?;
        // The same backup but for what a compression changes.
        let mut same = next.clone();
        same.compression = m.compression.clone();
        for (s, v) in same.volumes.iter_mut().zip(&m.volumes) {
            s.hash = v.hash.clone();
            s.size = v.size;
        }
        if same != *m || next.compression.is_none() {
            return Err(KnibError::corrupt(format!(
                "{} is not the manifest {} has after its compression: it differs in more than hashes, sizes and `compression`",
                path.display(),
                self.backup_dir(m).join("manifest.json").display()
            )));
        }
        Ok(Some(next))
    }

    /// The `.comp` file of volume file `file` of backup `m`, if it is there
    /// (a regular file of one name; anything else under its name is
    /// `corrupt`: a hard link renamed over the file would make the backup
    /// the file the link's other name belongs to).
    fn comp_of(&self, m: &Manifest, file: &str) -> Result<Option<PathBuf>> {
        let comp = comp_path(&self.backup_dir(m).join(file));
        match std::fs::symlink_metadata(&comp) {
            Ok(md) => match fsio::not_own_file(&md) {
                None => Ok(Some(comp)),
                Some(why) => Err(KnibError::corrupt(format!("{} {why}", comp.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KnibError::io("cannot stat", &comp, e)),
        }
    }

    /// Backup `m` as its files are, when a compression of it was
    /// interrupted between writing its next manifest and renaming it over
    /// `manifest.json` (see the module's doc); `m` itself otherwise.
    pub(super) fn pending_view(&self, m: Manifest) -> Result<Manifest> {
        let Some(next) = self.next_manifest(&m)? else { return Ok(m) };
        let mut view = m;
        let mut all = true;
        for (v, n) in view.volumes.iter_mut().zip(&next.volumes) {
            if self.comp_of(&next, &n.file)?.is_some() {
                all = false;
            } else {
                v.hash = n.hash.clone();
                v.size = n.size;
            }
        }
        if all {
            view.compression = next.compression;
        }
        Ok(view)
    }

    /// Finish every compression of `vm`'s backups that a crash interrupted
    /// after writing its next manifest: the `.comp` files left renamed over
    /// their files, then the next manifest over `manifest.json`. Under the
    /// VM's lock.
    pub(super) fn finish_compressions(&self, vm: &str) -> Result<()> {
        let dir = self.vm_dir(vm);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(KnibError::io("cannot list", &dir, e)),
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let pending = e.file_type().is_ok_and(|t| t.is_dir())
                && crate::names::validate("backup id", &id).is_ok()
                && e.path().join(NEXT_MANIFEST).symlink_metadata().is_ok();
            if !pending {
                continue;
            }
            let m = self.read_manifest(vm, &id)?;
            let Some(next) = self.next_manifest(&m)? else { continue };
            log::warn!("backup {id}: finishing its compression, interrupted after {NEXT_MANIFEST} was written");
            self.commit_compression(&next)?;
        }
        Ok(())
    }

    /// Steps 2 and 3 of the module's doc: each `.comp` file still there
    /// renamed over its file, then [`NEXT_MANIFEST`] over `manifest.json`.
    fn commit_compression(&self, next: &Manifest) -> Result<()> {
        let dir = self.backup_dir(next);
        for v in &next.volumes {
            if let Some(comp) = self.comp_of(next, &v.file)? {
                fsio::commit_rename(&comp, &dir.join(&v.file))?;
            }
        }
        fsio::commit_rename(&dir.join(NEXT_MANIFEST), &dir.join("manifest.json"))
    }

    /// Replace backup `next`'s files by their `.comp` files (all written and
    /// durable) and its manifest by `next`, as the module's doc says. When
    /// [`NEXT_MANIFEST`] cannot be written (a full file system), no next
    /// manifest names the `.comp` files and they are removed: the backup
    /// is left as it was, with nothing beside it.
    pub(super) fn publish_compression(&self, next: &Manifest) -> Result<()> {
        let dir = self.backup_dir(next);
        if let Err(e) = next.save(&dir.join(NEXT_MANIFEST)) {
            let absent = std::fs::symlink_metadata(dir.join(NEXT_MANIFEST))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
            if absent {
                for v in &next.volumes {
                    if let Err(r) = fsio::remove_if_exists(&comp_path(&dir.join(&v.file))) {
                        log::warn!("cannot remove a compressed file of backup {}: {r}", next.id);
                    }
                }
            }
            return Err(e);
        }
        self.commit_compression(next)
    }

    /// Remove the `.comp` files of backup `m` (and the temporaries of a
    /// compression killed while writing them): a compression job's, before
    /// it runs again or once it will not. Under the VM's lock, which
    /// finishes first any compression whose next manifest names them.
    pub(crate) fn remove_comp_files(&self, m: &Manifest) -> Result<()> {
        for v in &m.volumes {
            let comp = comp_path(&self.backup_dir(m).join(&v.file));
            fsio::remove_if_exists(&comp)?;
            fsio::remove_if_exists(&fsio::temp_path(&comp))?;
        }
        Ok(())
    }
}

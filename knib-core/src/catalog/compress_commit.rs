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
//!   size once its `.comp` is gone (renamed over it: the file must then be
//!   a file of one name of that size, else the backup is `corrupt`), the
//!   old ones while it is there; `compression` once every file is renamed
//!   ([`Store::pending_view`]);
//! - whoever takes the VM's lock next finishes steps 2 and 3 first
//!   ([`Store::finish_compressions`]), before anything else can remove a
//!   `.comp` file or save the manifest; but `recover --discard`, which
//!   first sets aside a compression that cannot be finished (its next
//!   manifest not the backup's, a `.comp` not knib's file or not the
//!   copy knib wrote (read whole first: [`Store::checked_comp`]), a file whose
//!   `.comp` is gone not that copy, the backup's manifest unreadable:
//!   [`Store::set_aside_unfinishable_compressions`]).
//!
//! A `.comp` file is removed by knib only when no [`NEXT_MANIFEST`] names
//! it (a compression that failed or was killed before step 1, or one a
//! discard set aside), so for knib "`.comp` gone" means "renamed over its
//! file"; what else removed it is told by the file's size (a file that is
//! not that copy is `corrupt`). [`NEXT_MANIFEST`] is read
//! as hostile input: it must be the same backup as `manifest.json` (id,
//! VM, parent, volumes, their files and backing pointers, ...) except for
//! hashes, sizes and `compression`, else it is `corrupt`, naming it.

use std::path::PathBuf;

use super::manifest::{newer_schema, VolumeEntry, MANIFEST_SCHEMA, NEXT_MANIFEST};
use super::{confine, discard, DiscardedJournal, Manifest, Store};
use crate::engine::compress::comp_path;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;

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

    /// The `.comp` file of volume `v` of backup `next` (its next manifest),
    /// if it is there: a regular file of one name, of the size `next` gives
    /// it; anything else under its name is `corrupt` (a hard link renamed
    /// over the file would make the backup the file the link's other name
    /// belongs to; a file cut short would be recorded under the copy's
    /// hash). When it is gone,
    /// it was renamed over the volume's file, which must then be that copy
    /// as far as can be told without reading it: a regular file of one
    /// name, of the size `next` gives it; anything else (a `.comp` removed
    /// by something other than knib, the file missing, a link swapped in
    /// at the rename) is `corrupt`.
    fn comp_of(&self, next: &Manifest, v: &VolumeEntry) -> Result<Option<Comp>> {
        use std::os::unix::fs::MetadataExt;
        let file = self.backup_dir(next).join(&v.file);
        let comp = comp_path(&file);
        match std::fs::symlink_metadata(&comp) {
            Ok(md) => match fsio::not_own_file(&md) {
                None if md.len() == v.size => Ok(Some(Comp { path: comp, at: (md.dev(), md.ino()) })),
                None => Err(KnibError::corrupt(format!(
                    "{} has {} bytes, not the {} of the compressed copy knib wrote (as the compression's next manifest says)",
                    comp.display(),
                    md.len(),
                    v.size
                ))),
                Some(why) => Err(KnibError::corrupt(format!("{} {why}", comp.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match not_compressed_copy(&file, v.size)? {
                None => Ok(None),
                Some(what) => Err(KnibError::corrupt(format!(
                    "{} has no compressed copy ({}) beside it, yet it is not that copy: {what}",
                    file.display(),
                    comp.display()
                ))),
            },
            Err(e) => Err(KnibError::io("cannot stat", &comp, e)),
        }
    }

    /// [`Store::comp_of`], and a `.comp` file there read whole: its bytes
    /// must hash to what `next` records for it (when it records a hash),
    /// else it is `corrupt` (damaged since it was written, or not the copy
    /// knib wrote) and is never renamed over the backup's file. Read before
    /// a compression a crash interrupted is finished, or set aside: the
    /// file was left for a time no process of knib's watched.
    fn checked_comp(&self, next: &Manifest, v: &VolumeEntry) -> Result<Option<Comp>> {
        let comp = self.comp_of(next, v)?;
        if let (Some(c), Some(want)) = (&comp, &v.hash) {
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
            // A copy whose bytes cannot be read (a bad sector) or that is
            // no longer a file (a link swapped in) cannot be renamed over
            // the file either: the compression cannot be finished, and a
            // discard sets it aside, keeping the file (an I/O error would
            // stop the VM with no way out). Other errors of the system
            // (no memory, too many files open) say nothing of the copy:
            // they stay I/O errors, and the compression is finished later.
            let unreadable = |e: KnibError| {
                KnibError::corrupt(format!("{} cannot be read to check it: {}", c.path.display(), e.message))
            };
            let of_the_file = |e: std::io::Error| {
                let of_it = matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::ELOOP | libc::ENXIO | libc::EISDIR | libc::ENODEV | libc::EOVERFLOW)
                );
                let e = KnibError::io("cannot open", &c.path, e);
                if of_it {
                    unreadable(e)
                } else {
                    e
                }
            };
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&c.path)
                .map_err(of_the_file)?;
            let md = f.metadata().map_err(|e| KnibError::io("cannot stat", &c.path, e))?;
            if (md.dev(), md.ino()) != c.at {
                return Err(KnibError::corrupt(format!(
                    "{} was replaced while knib looked at it: it is not the compressed copy knib wrote",
                    c.path.display()
                )));
            }
            // Not read again before its rename: its pages are dropped.
            // (A read of a regular file fails for its bytes: EIO.)
            let got = crate::hash::hash_written_file(&f, &c.path, &crate::progress::Control::new()).map_err(|e| {
                if e.kind == ErrorKind::Io {
                    unreadable(e)
                } else {
                    e
                }
            })?;
            if got != *want {
                return Err(KnibError::corrupt(format!(
                    "{} is not the compressed copy knib wrote: its bytes hash to {got}, not to {want} (as the compression's next manifest says)",
                    c.path.display()
                )));
            }
        }
        Ok(comp)
    }

    /// Backup `m` as its files are, when a compression of it was
    /// interrupted between writing its next manifest and renaming it over
    /// `manifest.json` (see the module's doc); `m` itself otherwise.
    pub(super) fn pending_view(&self, m: Manifest) -> Result<Manifest> {
        let id = m.id.clone();
        let hint = |e| self.hint_or_newer(e, &m.vm, &id);
        let Some(next) = self.next_manifest(&m).map_err(hint)? else { return Ok(m) };
        let mut view = m;
        let mut all = true;
        for (v, n) in view.volumes.iter_mut().zip(&next.volumes) {
            if self.comp_of(&next, n).map_err(|e| self.hint_or_newer(e, &next.vm, &id))?.is_some() {
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

    /// The ids of `vm`'s backups that have a [`NEXT_MANIFEST`] beside
    /// their manifest: a compression interrupted while it replaced their
    /// files.
    fn pending_compressions(&self, vm: &str) -> Result<Vec<String>> {
        let dir = self.vm_dir(vm);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(KnibError::io("cannot list", &dir, e)),
        };
        let mut ids = Vec::new();
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let pending = e.file_type().is_ok_and(|t| t.is_dir())
                && crate::names::validate("backup id", &id).is_ok()
                && e.path().join(NEXT_MANIFEST).symlink_metadata().is_ok();
            if pending {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Finish every compression of `vm`'s backups that a crash interrupted
    /// after writing its next manifest: the `.comp` files left renamed over
    /// their files, then the next manifest over `manifest.json`. Under the
    /// VM's lock.
    pub(super) fn finish_compressions(&self, vm: &str) -> Result<()> {
        for id in self.pending_compressions(vm)? {
            // What makes it unfinishable (what a discard sets aside) is
            // looked at first, and its error says the way out (or that a
            // newer knib's compression is left to it).
            let hint = |e| self.hint_or_newer(e, vm, &id);
            let m = self.read_manifest(vm, &id).map_err(unreadable_manifest).map_err(hint)?;
            let Some(next) = self.next_manifest(&m).map_err(hint)? else { continue };
            let comps = next.volumes.iter().map(|v| self.checked_comp(&next, v)).collect::<Result<Vec<_>>>();
            let comps = comps.map_err(hint)?;
            log::warn!("backup {id}: finishing its compression, interrupted after {NEXT_MANIFEST} was written");
            self.commit_compression(&next, comps)?;
        }
        Ok(())
    }

    /// When backup `id` of `vm`'s `manifest.json` or [`NEXT_MANIFEST`] has
    /// a schema newer than this knib's (a store shared with a newer knib):
    /// the error that says so. Such a compression is neither finished nor
    /// set aside by this knib: the newer one finishes it.
    fn written_by_newer_knib(&self, vm: &str, id: &str) -> Option<KnibError> {
        for name in ["manifest.json", NEXT_MANIFEST] {
            let rel = Self::vm_rel(vm).join(id).join(name);
            let Ok(Some(text)) = confine::read(&self.root, &rel, "manifest") else { continue };
            if let Some(schema) = newer_schema(&text) {
                let next = self.root.join(Self::vm_rel(vm)).join(id).join(NEXT_MANIFEST);
                // The way out by hand, and what it leaves.
                let after = if name == NEXT_MANIFEST {
                    "the compression is then given up: its `.comp` files stay beside the backup's files, and a file it already replaced no longer matches the backup's manifest (`knib verify` reports it)"
                } else {
                    "the VM's other backups can then be worked on; this backup stays unreadable to this knib (`knib verify` of every backup reports it, and deletes of the VM's backups keep their files, marked removed) until its manifest is mended or its directory removed by hand"
                };
                return Some(KnibError::corrupt(format!(
                    "{} has schema {schema}, newer than this knib's ({}): the interrupted compression of backup {id} was a newer knib's; run that knib (any operation on VM {vm}) to finish it. If no newer knib wrote it (the file is damaged), move {} into {} under a name that starts with `.discarded-` (which knib skips): {after}",
                    self.root.join(&rel).display(),
                    MANIFEST_SCHEMA,
                    next.display(),
                    self.vm_dir(vm).display()
                )));
            }
        }
        None
    }

    /// [`discard_hint`] of `e`, unless the compression is a newer knib's:
    /// then the error that says so.
    fn hint_or_newer(&self, e: KnibError, vm: &str, id: &str) -> KnibError {
        self.written_by_newer_knib(vm, id).unwrap_or_else(|| discard_hint(e, vm, id))
    }

    /// Set aside every interrupted compression of `vm` that
    /// [`Store::finish_compressions`] refuses (its [`NEXT_MANIFEST`] is not
    /// the backup's, a `.comp` file is not one knib wrote, a file whose
    /// `.comp` is gone is not that copy, or the backup's `manifest.json`
    /// cannot be read: its files and `.comp` files are then left as they
    /// are), which stops every operation on
    /// the VM: `recover --discard`, under the VM's lock. The next manifest
    /// is kept, as it was, as
    /// `vms/<vm>/.discarded-<unix ms>.<id>.manifest.next.json` (an entry
    /// that is not a regular file is removed as an entry); the `.comp`
    /// files still there (their files not yet replaced) are removed. A
    /// file already replaced by its compressed copy keeps, in the backup's
    /// manifest, the hash and size a next manifest of knib's gives it;
    /// under a damaged one that hash cannot be told, and the answer says
    /// the file no longer matches `manifest.json` (`knib verify` reports
    /// it).
    pub(super) fn set_aside_unfinishable_compressions(&self, vm: &str) -> Result<Vec<DiscardedJournal>> {
        let mut out = Vec::new();
        for id in self.pending_compressions(vm)? {
            let dir = self.vm_dir(vm).join(&id);
            // A backup's manifest that cannot be read (or is missing) makes
            // its compression unfinishable too; its files, and the `.comp`
            // files beside them, are then left as they are.
            let m = match self.read_manifest(vm, &id).map_err(unreadable_manifest) {
                Ok(m) => Ok(m),
                Err(e) if matches!(e.kind, ErrorKind::Corrupt | ErrorKind::InvalidInput) => Err(e),
                Err(e) => return Err(e),
            };
            // Whether the next manifest is knib's (only then does a `.comp`
            // gone mean its file was replaced), and what each of its
            // volumes' `.comp` looks like: `Ok(None)` is a file replaced
            // by its copy (see `comp_of`).
            let mut knibs_next: Option<Manifest> = None;
            let mut looks: Vec<Result<Option<Comp>>> = Vec::new();
            let finishable = match &m {
                Err(e) => Err(e.clone()),
                Ok(m) => match self.next_manifest(m) {
                    Ok(None) => continue,
                    Ok(Some(next)) => {
                        looks = next.volumes.iter().map(|v| self.checked_comp(&next, v)).collect();
                        knibs_next = Some(next);
                        looks.iter().find_map(|l| l.as_ref().err()).map_or(Ok(()), |e| Err(e.clone()))
                    }
                    Err(e) => Err(e),
                },
            };
            // What the files say, not what reading them met (an I/O
            // error of the system may pass: the compression is then
            // finished later; one reading a `.comp`'s bytes says that the
            // copy cannot be read, see `checked_comp`).
            let why = match finishable {
                Ok(()) => continue,
                Err(e) if matches!(e.kind, ErrorKind::Corrupt | ErrorKind::InvalidInput) => e.message,
                Err(e) => return Err(e),
            };
            // A newer knib's compression is never given up by this one.
            if let Some(newer) = self.written_by_newer_knib(vm, &id) {
                return Err(newer);
            }
            let m = m.ok();
            let next = dir.join(NEXT_MANIFEST);
            let mut d = DiscardedJournal {
                method: "compression".into(),
                kept_as: None,
                backup_id: Some(id.clone()),
                step: None,
                published: Some(true),
                unreadable: Some(why),
                left: Vec::new(),
            };
            if m.is_none() {
                d.left.push(format!(
                    "{} cannot be read: whether the compression had already replaced files of the backup cannot be told; its files and the `.comp` files beside them are left as they are, and the next manifest, kept, describes the compressed copies (`knib verify` of every backup reports the backup; until its manifest is mended or its directory removed by hand, deletes of the VM's backups keep their files, marked removed)",
                    dir.join("manifest.json").display()
                ));
            }
            // The files the compression already replaced keep the hash and
            // size its next manifest (knib's) gives them, in the backup's
            // manifest, before that next manifest goes: the backup, and the
            // backups whose chains read it, still verify. A crash after it
            // finds the same next manifest, as the same backup.
            let replaced: Vec<bool> = looks.iter().map(|l| matches!(l, Ok(None))).collect();
            if let (Some(kn), Some(m)) = (&knibs_next, &m) {
                let mut view = m.clone();
                for ((v, n), _) in view.volumes.iter_mut().zip(&kn.volumes).zip(&replaced).filter(|(_, r)| **r) {
                    v.hash = n.hash.clone();
                    v.size = n.size;
                }
                if view != *m {
                    view.save(&dir.join("manifest.json"))?;
                }
            }
            // The next manifest first: a crash after it leaves `.comp`
            // files that no next manifest names, which a compression of
            // the backup removes; before it, this runs again.
            let meta = std::fs::symlink_metadata(&next).map_err(|e| KnibError::io("cannot stat", &next, e))?;
            d.kept_as = discard::set_aside(&next, &meta, &self.vm_dir(vm), &format!("{id}.{NEXT_MANIFEST}"))?;
            for (i, v) in m.iter().flat_map(|m| &m.volumes).enumerate() {
                let n = knibs_next.as_ref().and_then(|k| k.volumes.get(i));
                let file = dir.join(&v.file);
                let comp = comp_path(&file);
                match std::fs::symlink_metadata(&comp) {
                    Ok(md) => {
                        if let Some(what) = fsio::not_own_file(&md) {
                            d.left.push(format!(
                                "{} {what}, not a file knib wrote: it is removed (never followed), and whether {} was already replaced by its compressed copy cannot be told (`knib verify {id}` says whether it matches its manifest)",
                                comp.display(),
                                file.display()
                            ));
                        }
                        fsio::remove_entry(&comp)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => d.left.push(match n {
                        Some(_) if replaced.get(i) == Some(&true) => format!(
                            "{} was already replaced by its compressed copy: the backup's manifest now records that copy's hash and size (the backup is not recorded as compressed: `knib compress --store STORE {id}` compresses it whole)",
                            file.display()
                        ),
                        Some(n) => format!(
                            "{} has no compressed copy beside it, yet it is not that copy: {}; the backup's manifest keeps what it recorded (`knib verify {id}` says whether the file matches it; the copy's hash, in the next manifest set aside, is {})",
                            file.display(),
                            not_compressed_copy(&file, n.size)?.unwrap_or_else(|| "it changed meanwhile".into()),
                            n.hash.as_deref().unwrap_or("not recorded")
                        ),
                        None => format!(
                            "{} has no compressed copy beside it: if the compression had replaced it, it no longer matches its manifest (`knib verify {id}` says)",
                            file.display()
                        ),
                    }),
                    Err(e) => return Err(KnibError::io("cannot stat", &comp, e)),
                }
                // A compression's temporary, whatever it is (never followed).
                fsio::remove_entry(&fsio::temp_path(&comp))?;
            }
            fsio::sync_dir(&dir)?;
            log::warn!(
                "the interrupted compression of backup {id} of {vm} is discarded ({}): {NEXT_MANIFEST} is {}",
                d.unreadable.as_deref().unwrap_or_default(),
                d.kept_as.as_ref().map(|p| format!("kept as {}", p.display())).unwrap_or_else(|| "removed".into())
            );
            out.push(d);
        }
        Ok(out)
    }

    /// Steps 2 and 3 of the module's doc: each `.comp` file still there
    /// (`comps`, as looked at, one per volume of `next`) renamed over its
    /// file, then [`NEXT_MANIFEST`] over `manifest.json`.
    fn commit_compression(&self, next: &Manifest, comps: Vec<Option<Comp>>) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.backup_dir(next);
        for (v, comp) in next.volumes.iter().zip(comps) {
            let Some(comp) = comp else { continue };
            // The file looked at is the one renamed: an entry swapped in
            // since (a hard link to a file elsewhere) is not taken for the
            // backup's file.
            let file = dir.join(&v.file);
            fsio::commit_rename(&comp.path, &file)?;
            let md = std::fs::symlink_metadata(&file).map_err(|e| KnibError::io("cannot stat", &file, e))?;
            if (md.dev(), md.ino()) != comp.at || fsio::not_own_file(&md).is_some() {
                return Err(KnibError::corrupt(format!(
                    "{} was replaced while knib renamed it over {}: that file is not the compressed copy knib wrote (`knib verify` reports it)",
                    comp.path.display(),
                    file.display()
                )));
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
        // Just written by this compression, which hashed each through the
        // handle it wrote it by (and, with `compression.check_output`,
        // read its data back against the backup's).
        let comps = next.volumes.iter().map(|v| self.comp_of(next, v)).collect::<Result<Vec<_>>>()?;
        self.commit_compression(next, comps)
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

/// A `.comp` file as [`Store::comp_of`] looked at it: its path, and which
/// file it was (device, inode).
struct Comp {
    path: PathBuf,
    at: (u64, u64),
}

/// `e`, met reading a backup's `manifest.json` beside a next manifest: a
/// missing one is as damaged as one that does not parse (the backup was
/// published with it; only something other than knib removed it).
fn unreadable_manifest(e: KnibError) -> KnibError {
    if e.kind == ErrorKind::NotFound {
        KnibError::corrupt(e.message)
    } else {
        e
    }
}

/// Why `file`, whose `.comp` file is gone (renamed over it), is not that
/// compressed copy of `size` bytes as far as its metadata tells: `None`
/// when it is a regular file of one name (as knib's copy is) of that
/// size.
fn not_compressed_copy(file: &std::path::Path, size: u64) -> Result<Option<String>> {
    match std::fs::symlink_metadata(file) {
        Ok(md) => Ok(match fsio::not_own_file(&md) {
            Some(why) => Some(format!("it {why}")),
            None if md.len() != size => {
                Some(format!("it has {} bytes, the copy {size} (as the compression's next manifest says)", md.len()))
            }
            None => None,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some("it is missing".into())),
        Err(e) => Err(KnibError::io("cannot stat", file, e)),
    }
}

/// `e`, met finishing the interrupted compression of backup `id` of VM
/// `vm` (or reading the backup as its files are), with the way out when
/// it is `corrupt`: the compression cannot be finished.
fn discard_hint(mut e: KnibError, vm: &str, id: &str) -> KnibError {
    if matches!(e.kind, ErrorKind::Corrupt | ErrorKind::InvalidInput) {
        e.message.push_str(&format!(
            "; the interrupted compression of backup {id} cannot be finished: `knib recover --discard` (`knib recover --store STORE --domain {vm} --discard`, or `recover` with `discard`) sets it aside"
        ));
    }
    e
}

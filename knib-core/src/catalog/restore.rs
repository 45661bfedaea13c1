//! Restoring a stored backup: to a new file (flattened, converted), or as a
//! quick-restore overlay on the backup; and compressing a stored backup.
//!
//! # Invariants
//!
//! - The backup is only ever read: a restore writes its target under a
//!   temporary name and verifies what it read against the hashes the
//!   manifest records. It takes no lock; one that fails after a
//!   compression or a delete replaced files of its chain meanwhile is run
//!   again on the manifests as they are then, so such a race is never
//!   reported as a corrupt backup; a failure on an unchanged chain stands.
//! - A compression replaces the backup's files only after the compressed
//!   copies are verified, under the VM's lock; a backup being validated is
//!   refused.

use std::path::{Path, PathBuf};

use super::{settings, CompressionInfo, Manifest, Store};
use crate::engine::{self, CompressOptions};
use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;
use crate::qemu_img::ImageFormat;

/// How many times [`Store::restore_with`] runs a restore whose chain
/// changed while it ran.
const RESTORE_ATTEMPTS: u32 = 3;

impl Store {
    /// Restore volume `volume` of backup `id` to `to`, checking every file
    /// of its chain against its recorded hash ([`Store::restore_with`]).
    pub fn restore(&self, id: &str, volume: &str, to: &Path, format: ImageFormat, ctl: &Control) -> Result<()> {
        self.restore_with(id, volume, to, format, true, ctl)
    }

    /// Restore volume `volume` of backup `id` to `to`. With `verify`, each
    /// file of the chain that has a recorded hash is checked as it is read
    /// (see [`engine::restore_verified`]): a mismatch is a `corrupt` error
    /// naming the file, and nothing is left at `to`. Without, the files are
    /// copied as they are (to get out what can be got from a damaged
    /// backup).
    ///
    /// A restore takes no lock: a compression or a delete of the VM's
    /// backups may replace files of the chain (and their recorded hashes)
    /// between the manifest's read and the files'. A restore that fails is
    /// therefore run again, from the manifests as they are then, when the
    /// chain's files or hashes changed meanwhile (three runs at most); a
    /// failure on an unchanged chain stands.
    pub fn restore_with(
        &self,
        id: &str,
        volume: &str,
        to: &Path,
        format: ImageFormat,
        verify: bool,
        ctl: &Control,
    ) -> Result<()> {
        let data_path = settings::Settings::load(&self.root)?.data_path;
        let mut plan = self.restore_plan(id, volume, verify)?;
        let mut attempt = 1;
        loop {
            crate::crashpoint::pause_point(&format!("restore of backup {id}: manifest read"));
            let r = engine::restore_verified(
                &self.qemu_img,
                &engine::RestoreRequest {
                    backup_file: plan.0.last().expect("a chain has at least one file").clone(),
                    dest: to.to_path_buf(),
                    format,
                    overwrite: false,
                    data_path,
                },
                &plan.1,
                ctl,
            );
            let e = match r {
                Err(e) if e.kind != ErrorKind::Cancelled && attempt < RESTORE_ATTEMPTS => e,
                r => return r,
            };
            match self.restore_plan(id, volume, verify) {
                Ok(now) if now != plan => {
                    log::warn!(
                        "restore of backup {id} ({volume}): {e}; the chain's files changed meanwhile (a compression or a delete of the VM's backups), so it is run again"
                    );
                    plan = now;
                    attempt += 1;
                }
                _ => return Err(e),
            }
        }
    }

    /// The files of backup `id`'s chain for `volume` (root first) and, with
    /// `verify`, the hashes they must have, as the manifests say now.
    fn restore_plan(&self, id: &str, volume: &str, verify: bool) -> Result<(Vec<PathBuf>, Vec<engine::ExpectedHash>)> {
        let m = self.show(id)?;
        let files = self.chain_files(&m, volume)?;
        let expected = if verify { self.expected_hashes(&m, volume, &files)? } else { Vec::new() };
        Ok((files, expected))
    }

    /// The recorded hashes of the files of `m`'s chain for `volume`
    /// (`files`, root first, as [`Store::chain_files`] gives them); files
    /// without one are left out (logged).
    fn expected_hashes(&self, m: &Manifest, volume: &str, files: &[PathBuf]) -> Result<Vec<engine::ExpectedHash>> {
        let mut out = Vec::new();
        for (b, f) in self.chain(m)?.iter().zip(files) {
            match &b.volume(volume)?.hash {
                Some(h) => out.push(engine::ExpectedHash { path: f.clone(), hash: h.clone() }),
                None => log::info!("backup {}: {} has no recorded hash; it is read unchecked", b.id, f.display()),
            }
        }
        Ok(out)
    }

    /// Create a quick-restore overlay of volume `volume` of backup `id` at
    /// `to`, once every file of its chain passed `qemu-img check`
    /// ([`engine::require_quick_restorable`]), and record it (`pins`): the
    /// backup cannot be deleted while the overlay reads it.
    pub fn quick_restore_overlay(&self, id: &str, volume: &str, to: &Path, ctl: &Control) -> Result<()> {
        // Under the backup's VM lock until the overlay is recorded: a delete
        // in between would remove the files the new overlay reads.
        let vm = self.show(id)?.vm;
        let _lock = self.lock_vm(&vm, &format!("quick restore of backup {id}"))?;
        let m = self.show(id)?;
        let files = self.chain_files(&m, volume)?;
        engine::require_quick_restorable(&self.qemu_img, &files, ctl)
            .map_err(|e| e.context(format!("quick restore of backup {id}")))?;
        // Recorded before it is made, so that no delete removes what the
        // overlay reads, even after a crash between the two (a record whose
        // overlay is not there is stale, dropped by the next delete).
        self.pin(&m, volume, to).map_err(|e| e.context(format!("quick restore of backup {id}")))?;
        engine::create_overlay(&self.qemu_img, files.last().expect("non-empty chain"), to, ctl)
    }

    /// A "busy" error when a validation job of backup `id` is running (it
    /// reads the files that a compression or a delete would replace).
    pub(super) fn refuse_while_validated(&self, id: &str) -> Result<()> {
        match self.running_validation(id)? {
            Some(j) => {
                let pid = j.owner.as_ref().map(|o| o.pid).unwrap_or_default();
                Err(KnibError::busy(format!(
                    "backup {id} is busy: validation job {} (pid {pid}) is running; try again when it ends",
                    j.id
                )))
            }
            None => Ok(()),
        }
    }

    /// Compress backup `id` (and finalize it). A backup already compressed
    /// is left as it is.
    ///
    /// Each file is checked against its recorded hash as it is read
    /// ([`engine::compress_verified`]); a file that does not match fails the
    /// compression with a `corrupt` error naming it, and the backup is left
    /// as it was. A file without a recorded hash is checked with
    /// `qemu-img check` first (its metadata only: its data cannot be
    /// checked), and its compressed file gets no hash (the next verify
    /// records one); a checked file's compressed file gets its own.
    pub fn compress(&self, id: &str, opts: &CompressOptions, ctl: &Control) -> Result<Manifest> {
        let m = self.show(id)?;
        let _lock = self.lock_vm(&m.vm, &format!("compression of {id}"))?;
        self.refuse_while_validated(id)?;
        let mut m = self.show(id)?;
        if m.compression.is_some() {
            return Ok(m);
        }
        let files: Vec<PathBuf> = m.volumes.iter().map(|v| self.backup_dir(&m).join(&v.file)).collect();
        for v in &m.volumes {
            self.chain_files(&m, &v.name)?;
        }
        let expected: Vec<Option<String>> = m.volumes.iter().map(|v| v.hash.clone()).collect();
        for (f, _) in files.iter().zip(&expected).filter(|(_, h)| h.is_none()) {
            log::info!("{} has no recorded hash: its data cannot be checked, only its metadata", f.display());
            engine::require_clean_metadata(&self.qemu_img, f, ctl)?;
        }
        let set = settings::Settings::load(&self.root)?;
        // The store's setting turns the read-back on for every caller.
        let opts = &CompressOptions {
            data_path: set.data_path,
            check_output: opts.check_output || set.compression.check_output,
            ..opts.clone()
        };
        let done = engine::compress_verified(&self.qemu_img, &files, &expected, opts, ctl)?;
        let original: u64 = done.iter().map(|c| c.original_size).sum();
        let size: u64 = done.iter().map(|c| c.compressed_size).sum();
        for (v, c) in m.volumes.iter_mut().zip(&done) {
            v.size = c.compressed_size;
            v.hash = c.hash.clone();
        }
        m.compression = Some(CompressionInfo {
            library: done.first().map(|c| c.library).unwrap_or(opts.library),
            original_size: original,
            size,
        });
        // The files and the manifest replaced so that a crash at any point
        // leaves a backup that reads as its files are.
        self.publish_compression(&m)?;
        Ok(m)
    }
}

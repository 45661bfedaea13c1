//! Restoring a backup: flattening its chain into one image, or creating a
//! quick-restore overlay whose backing file is the backup.
//!
//! [`restore_verified`] also checks each file of the chain that has a
//! recorded hash ([`crate::engine::verify`]): on the native data path from
//! the bytes the copy reads (no second read of the data), on the qemu-img
//! data path in a separate read before the copy. A mismatch is a `corrupt`
//! error naming the file, and nothing is left at the destination.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::native::{self, DataPath, NativeCopy};
use crate::engine::verify::{self, ExpectedHash};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qcow2::{SourceMode, TargetFormat};
use crate::qemu_img::{Convert, ImageFormat, QemuImg};

/// A request to restore one volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The backup file of the volume (the top of its chain on the store).
    pub backup_file: PathBuf,
    /// Where the restored image goes.
    pub dest: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Replace `dest` if it exists (it is replaced only once the new image
    /// is complete).
    pub overwrite: bool,
    /// Native data path (default) or qemu-img.
    #[serde(default)]
    pub data_path: DataPath,
}

/// The files of the chain of `backup_file`, the file first, checked to be
/// a backup's: regular files holding qcow2, each backing pointer too. A
/// backup file is read from a store or a share others can write: a
/// backing pointer to a raw file or a device would restore (or boot, or
/// quick-restore) a host file or disk as the guest's. Errors: InvalidInput
/// naming the file, and those of [`crate::qcow2::Chain::open_files_only`].
pub fn backup_chain_files(backup_file: &Path) -> Result<Vec<PathBuf>> {
    let chain = crate::qcow2::Chain::open_files_only(backup_file)
        .map_err(|e| e.context(format_args!("backup file {}", backup_file.display())))?;
    let mut files = vec![backup_file.to_path_buf()];
    files.extend(chain.backing().iter().filter_map(|l| l.path().map(Path::to_path_buf)));
    Ok(files)
}

/// Check that the chain of `backup_file` is a backup's (see
/// [`backup_chain_files`]).
fn backup_chain_only(backup_file: &Path) -> Result<()> {
    backup_chain_files(backup_file).map(drop)
}

fn check_dest(dest: &Path, overwrite: bool) -> Result<()> {
    // A link counts as an entry even when it leads nowhere.
    if std::fs::symlink_metadata(dest).is_ok() && !overwrite {
        return Err(KnibError::invalid(format!("{} already exists; it is not overwritten", dest.display())));
    }
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(KnibError::not_found(format!("directory {} does not exist", dir.display())));
    }
    Ok(())
}

/// Restore a backup, flattened, to `dest`: written under a temporary name
/// of its own ([`fsio::TempFile`]) and renamed when complete, so `dest`
/// never holds half an image; without `overwrite`, an entry that appeared
/// at `dest` meanwhile is not replaced. No hash is checked (see
/// [`restore_verified`]).
pub fn restore(q: &QemuImg, req: &RestoreRequest, ctl: &Control) -> Result<()> {
    restore_verified(q, req, &[], ctl)
}

/// [`restore`], checking each file of `expected` (files of the backup's
/// chain, with their recorded hashes) as it is read; a file that does not
/// match, or that the chain does not lead to, fails the restore with a
/// `corrupt` error naming it, before `dest` is touched.
pub fn restore_verified(q: &QemuImg, req: &RestoreRequest, expected: &[ExpectedHash], ctl: &Control) -> Result<()> {
    restore_held(q, req, expected, ctl).map(drop)
}

/// [`restore_verified`], and the file made at `req.dest` (a descriptor of
/// its own: the caller can tell later that the name still leads to it).
pub(crate) fn restore_held(
    q: &QemuImg,
    req: &RestoreRequest,
    expected: &[ExpectedHash],
    ctl: &Control,
) -> Result<std::fs::File> {
    if !req.backup_file.exists() {
        return Err(KnibError::not_found(format!("backup file {} does not exist", req.backup_file.display())));
    }
    check_dest(&req.dest, req.overwrite)?;
    backup_chain_only(&req.backup_file)?;
    if req.data_path == DataPath::Native {
        // The chain is opened (every file must be there) before anything is
        // written; the space check comes from the plan.
        let what = format!("restore to {}", req.dest.display());
        let tmp = fsio::TempFile::beside(&req.dest)?;
        let c = NativeCopy {
            source: &req.backup_file,
            dest: tmp.path(),
            // Written through the file it created, never reopened by name.
            dest_file: tmp.file(),
            mode: SourceMode::Chain,
            format: match req.format {
                ImageFormat::Qcow2 => TargetFormat::Qcow2,
                ImageFormat::Raw => TargetFormat::Raw,
            },
            backing: None,
            compress: None,
            hash: false,
            check: false,
            threads: 0,
            rate_limit_mbps: 0,
            what: &what,
        };
        let r = if expected.is_empty() {
            native::copy(&c, ctl).map(|_| ())
        } else {
            native::copy_hashing_sources(&c, ctl)
                .and_then(|rep| verify::check_source_hashes(&rep.source_hashes, expected))
                .map_err(|e| verify::explain_failure(e, expected, ctl))
        };
        r?;
        return tmp.commit_held(&req.dest, req.overwrite);
    }
    // Every file of the chain must be there before anything is written.
    let chain = q.info_chain(&req.backup_file, ctl).map_err(|e| verify::explain_failure(e, expected, ctl))?;
    // qemu-img reads the files itself: their hashes take a read of their
    // own, and each must be one the chain leads to, as on the native path.
    let files: Vec<PathBuf> = chain.iter().map(|i| PathBuf::from(&i.filename)).collect();
    verify::verify_chain_files(&files, expected, ctl)?;
    let dir = req.dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let m = q.measure(&req.backup_file, req.format, ctl)?;
    let needed = if req.format == ImageFormat::Raw { 0 } else { m.required };
    fsio::require_space(dir, needed, &format!("restore to {}", req.dest.display()))?;
    let tmp = fsio::TempFile::beside(&req.dest)?;
    // Written through the file it created, never by name.
    q.convert_into(
        &Convert { source: req.backup_file.clone(), dest_format: req.format, ..Default::default() },
        tmp.file(),
        tmp.path(),
        ctl,
    )?;
    tmp.commit_held(&req.dest, req.overwrite)
}

/// Fail with a `corrupt` error naming `file` when `qemu-img check` finds
/// corruptions or errors in it (its metadata: leaks lose nothing).
pub fn require_clean_metadata(q: &QemuImg, file: &Path, ctl: &Control) -> Result<()> {
    let r = q.check(file, ctl)?;
    if r.corruptions > 0 || r.check_errors > 0 {
        return Err(KnibError::corrupt(format!(
            "backup file {} is damaged: qemu-img check found {} corruptions, {} leaks, {} errors",
            file.display(),
            r.corruptions,
            r.leaks,
            r.check_errors
        )));
    }
    Ok(())
}

/// Fail unless every file of `files` (the chain a quick restore will run a
/// VM on) passes `qemu-img check`. A quick restore runs the VM before
/// anything reads the files whole, so their data cannot be held against
/// their hashes first (`verify` does that), but damaged metadata is found
/// for the cost of reading the tables, and no VM is run on it.
pub fn require_quick_restorable(q: &QemuImg, files: &[PathBuf], ctl: &Control) -> Result<()> {
    for f in files {
        require_clean_metadata(q, f, ctl).map_err(|mut e| {
            if e.kind == ErrorKind::Corrupt {
                e.message.push_str(
                    "; no VM was run on it (verify says more; a plain restore without verification gets out what can be)",
                );
            }
            e
        })?;
    }
    Ok(())
}

/// Create a quick-restore overlay at `dest`: an empty qcow2 whose backing
/// file is the backup (by absolute path, as the store is elsewhere). A VM
/// can start on it at once; consolidation later pulls the data in.
/// An entry that appeared at `dest` meanwhile is not replaced.
pub fn create_overlay(q: &QemuImg, backup_file: &Path, dest: &Path, ctl: &Control) -> Result<()> {
    create_overlay_held(q, backup_file, dest, ctl).map(drop)
}

/// [`create_overlay`], and the file made at `dest` (a descriptor of its
/// own: the caller can tell later that the name still leads to it).
pub(crate) fn create_overlay_held(
    q: &QemuImg,
    backup_file: &Path,
    dest: &Path,
    ctl: &Control,
) -> Result<std::fs::File> {
    check_dest(dest, false)?;
    let tmp = fsio::TempFile::beside(dest)?;
    write_overlay(q, backup_file, &tmp, ctl)?;
    tmp.commit_held(dest, false)
}

/// Write into `tmp` the overlay [`create_overlay`] makes (the caller
/// renames it into place).
pub(crate) fn write_overlay(q: &QemuImg, backup_file: &Path, tmp: &fsio::TempFile, ctl: &Control) -> Result<()> {
    let abs = backup_file.canonicalize().map_err(|e| KnibError::io("backup file", backup_file, e))?;
    backup_chain_only(&abs)?;
    q.info_chain(&abs, ctl)?;
    let abs_s = abs.to_str().ok_or_else(|| KnibError::invalid(format!("path {} is not UTF-8", abs.display())))?;
    // Written through the file it created, never by name.
    q.create_overlay(&fsio::by_fd(tmp.file()), abs_s, "qcow2", None, ctl)
}

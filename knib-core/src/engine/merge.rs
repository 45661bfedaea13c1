//! Merging a delta of a stopped VM's disk into its backing file.

use std::path::Path;

use crate::error::{KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qemu_img::QemuImg;

/// Merge `delta` into its backing file, then point `child` (the image that
/// used `delta` as its backing file, if any) at that backing file, and
/// remove `delta`. This is how a disk-only VM snapshot is deleted while the
/// VM is stopped. Reads through `child` give the same bytes before and after.
pub fn merge_delta(q: &QemuImg, delta: &Path, child: Option<&Path>, ctl: &Control) -> Result<()> {
    merge_delta_repointing(q, delta, child, &[], ctl)
}

/// [`merge_delta`], and `others` (other images using `delta` as their
/// backing file: branches of a snapshot tree) pointed at its backing file
/// too, before `delta` is removed.
pub(crate) fn merge_delta_repointing(
    q: &QemuImg,
    delta: &Path,
    child: Option<&Path>,
    others: &[std::path::PathBuf],
    ctl: &Control,
) -> Result<()> {
    let info = q.info(delta, ctl)?;
    let backing = info
        .backing_filename
        .clone()
        .ok_or_else(|| KnibError::invalid(format!("{} has no backing file to merge into", delta.display())))?;
    let backing_format = info.backing_filename_format.clone().unwrap_or_else(|| "qcow2".into());
    if let Some(c) = child {
        let ci = q.info(c, ctl)?;
        let points_at_delta = ci
            .full_backing_filename
            .as_deref()
            .map(|b| Path::new(b).canonicalize().ok() == delta.canonicalize().ok())
            .unwrap_or(false);
        if !points_at_delta {
            return Err(KnibError::invalid(format!(
                "{} does not use {} as its backing file",
                c.display(),
                delta.display()
            )));
        }
    }
    q.commit(delta, true, ctl)?;
    if let Some(c) = child {
        // The child's pointer is written relative to the child when the
        // delta's pointer was relative to the delta and both share a directory.
        let full = info
            .full_backing_filename
            .clone()
            .ok_or_else(|| KnibError::internal("qemu-img gave no full backing file name"))?;
        let pointer =
            if Path::new(&backing).is_relative() && delta.parent() == c.parent() { backing.clone() } else { full };
        q.rebase_unsafe(c, &pointer, &backing_format, ctl)?;
    }
    if !others.is_empty() {
        let full = info.full_backing_filename.clone().map(std::path::PathBuf::from);
        let full = full.ok_or_else(|| KnibError::internal("qemu-img gave no full backing file name"))?;
        repoint(q, others, &full, &backing_format, ctl)?;
    }
    fsio::remove_if_exists(delta)
}

/// Point each of `others` at `below` (by its absolute name): the other
/// branches of a snapshot tree whose backing file, merged into `below`,
/// is removed next. Done before the removal, so that a crash or a failure
/// between the two never leaves them on a file that is gone.
pub(crate) fn repoint(
    q: &QemuImg,
    others: &[std::path::PathBuf],
    below: &Path,
    format: &str,
    ctl: &Control,
) -> Result<()> {
    for g in others {
        crate::crashpoint::durable_step(&format!("re-point {} at {}", g.display(), below.display()));
        q.rebase_unsafe(g, &below.to_string_lossy(), format, ctl)?;
    }
    Ok(())
}

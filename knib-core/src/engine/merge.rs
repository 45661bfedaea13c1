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
    fsio::remove_if_exists(delta)
}

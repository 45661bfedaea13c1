//! Emptying a qcow2 image after a merge: the image replaced by an empty one
//! of the same shape; and telling whether an image holds any data of its
//! own ([`super::Qcow2Image::holds_data`]).
//!
//! # Invariants
//!
//! - The new image keeps the virtual size, cluster size, compression type,
//!   backing pointer and format, the lazy refcounts bit, owner and mode.
//! - It is written under a temporary name in the same directory, fsynced,
//!   renamed over the image, and the directory fsynced: the image is the
//!   old one or the empty one, never a mix.
//! - An image with what an empty one would drop (internal snapshots,
//!   bitmaps, auto-clear or unknown compatible features) is refused before
//!   anything is written.

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::writer::{BackingRef, ImageSpec, Layout};
use crate::error::{KnibError, Result};

/// The bytes of an empty qcow2 image of `spec` (header, L1 table,
/// refcount table and block, no data): what [`empty_image`] writes, and a
/// backup job's scratch file (`libvirt::backup::make_scratch`).
pub fn empty_image_bytes(spec: ImageSpec) -> Result<Vec<u8>> {
    let (head, mut body, _) = Layout::new(spec, Vec::new(), None)?.finish()?;
    body[..head.len()].copy_from_slice(&head);
    Ok(body)
}

/// What of the top's, if anything, [`empty_image`] would not keep:
/// internal snapshots, bitmaps and other auto-clear features, compatible
/// features other than lazy refcounts.
pub(super) fn keeps_what_emptying_drops(h: &super::Header) -> Option<String> {
    if h.nb_snapshots != 0 {
        Some(format!("has {} internal snapshots", h.nb_snapshots))
    } else if h.autoclear_features != 0 || h.bitmaps.is_some() {
        Some(format!("has bitmaps or other auto-clear features ({:#x})", h.autoclear_features))
    } else if h.compatible_features & !COMPAT_LAZY_REFCOUNTS != 0 {
        Some(format!("has unknown compatible features ({:#x})", h.compatible_features))
    } else {
        None
    }
}

/// Compatible feature bit 0: lazy refcounts.
const COMPAT_LAZY_REFCOUNTS: u64 = 1;

/// Replace the qcow2 image at `path` (whose header is `header`) with an
/// empty one of the same shape: virtual size, cluster size, compression
/// type, backing pointer and backing format, the lazy refcounts feature,
/// owner and mode. Written under a temporary name in the same directory
/// ([`crate::fsio::TempFile`]), fsynced, renamed over `path`, and the
/// directory fsynced; on an error the temporary file is removed.
///
/// Errors ([`crate::ErrorKind::InvalidInput`], nothing written): the image has
/// what an empty image of this shape would drop: internal snapshots,
/// bitmaps or other auto-clear features, unknown compatible features.
pub fn empty_image(path: &Path, header: &super::Header) -> Result<()> {
    if let Some(why) = keeps_what_emptying_drops(header) {
        return Err(KnibError::invalid(format!(
            "{} {why}, which an emptied image would lose: it is not emptied",
            path.display()
        )));
    }
    let spec = ImageSpec {
        virtual_size: header.size,
        cluster_bits: header.cluster_bits,
        backing: header
            .backing_file
            .clone()
            .map(|name| BackingRef { name, format: header.backing_format.clone().unwrap_or_else(|| "qcow2".into()) }),
        compression: header.compression_type,
    };
    let mut body = empty_image_bytes(spec)?;
    // Compatible features (v3 header bytes 80..88): lazy refcounts is kept.
    body[80..88].copy_from_slice(&(header.compatible_features & COMPAT_LAZY_REFCOUNTS).to_be_bytes());
    let meta = std::fs::metadata(path).map_err(|e| KnibError::io("cannot stat", path, e))?;
    // A fresh name beside the image, created exclusively and never through
    // a link: the image's directory may be a primary storage pool, where a
    // fixed name (`.<image>.part`, before) could be a link planted to
    // another file, truncated and then renamed over the image.
    let tmp = crate::fsio::TempFile::beside(path)?;
    let f = tmp.file();
    let at = tmp.path();
    f.write_all_at(&body, 0).map_err(|e| KnibError::io("cannot write", at, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| KnibError::io("cannot set the mode of", at, e))?;
    std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| KnibError::io("cannot set the owner of", at, e))?;
    // fsync of the file and of the directory after the rename.
    tmp.commit(path, true)
}

impl super::Qcow2Image {
    /// Whether some guest cluster gets data from this image alone (stored,
    /// compressed or not; zero and unallocated clusters hold none). Only
    /// the L2 tables there are are read.
    pub fn holds_data(&mut self) -> Result<bool> {
        Ok(self.first_stored_cluster(&mut |_, _| Ok(true))?.is_some())
    }

    /// Whether some guest cluster of this image alone reads as anything but
    /// zeros: a compressed cluster counts as data, an uncompressed one is
    /// read and looked at (a preallocated image maps every cluster, each
    /// reading as zeros). The first such cluster's index, if any; `ctl`
    /// can stop the scan.
    pub fn first_nonzero_cluster(&mut self, ctl: &crate::progress::Control) -> Result<Option<u64>> {
        let mut buf = vec![0u8; self.cluster_size() as usize];
        let mut seen = 0u64;
        self.first_stored_cluster(&mut |img, state| {
            seen += 1;
            if seen.is_multiple_of(4096) {
                ctl.check(&format!("reading {}", img.name()))?;
            }
            match state {
                super::ClusterState::Data { host_offset } => {
                    img.read_host(host_offset, &mut buf)?;
                    Ok(buf.iter().any(|&b| b != 0))
                }
                _ => Ok(true),
            }
        })
    }

    /// The first guest cluster stored in this image alone (compressed or
    /// not) for which `hit` says yes; only the L2 tables there are are
    /// read. The L1 entries covering the virtual size only: a shrunk image
    /// keeps a longer table (`l1_size`), whose tail maps nothing the guest
    /// sees.
    fn first_stored_cluster(
        &mut self,
        hit: &mut dyn FnMut(&mut Self, super::ClusterState) -> Result<bool>,
    ) -> Result<Option<u64>> {
        // Only the clusters whose L2 entry is not 0: ranges without a
        // table, and entries of 0, store nothing.
        let total = self.guest_clusters();
        let mut index = self.next_mapped_cluster(0)?;
        while index < total {
            let state = self.cluster_state(index)?;
            let stored = matches!(state, super::ClusterState::Data { .. } | super::ClusterState::Compressed { .. });
            if stored && hit(self, state)? {
                return Ok(Some(index));
            }
            index = self.next_mapped_cluster(index + 1)?;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    fn run(program: &str, args: &[&str]) {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// An image shrunk by QEMU keeps its longer L1 table: whether it holds
    /// data is read from the entries covering its size (an empty volume
    /// was refused before: "no L1 entry").
    #[test]
    fn a_shrunk_image_keeps_a_longer_l1_table() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("shrunk.qcow2");
        let p = f.to_str().unwrap();
        run("qemu-img", &["create", "-q", "-f", "qcow2", p, "10G"]);
        run("qemu-img", &["resize", "-q", "-f", "qcow2", "--shrink", p, "1G"]);
        let mut img = crate::qcow2::Qcow2Image::open(&f).unwrap();
        assert!(img.header().l1_size as u64 > img.guest_clusters().div_ceil(img.header().l2_entries()));
        assert!(!img.holds_data().unwrap());
        drop(img);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 7 1000M 64k", p]);
        let mut img = crate::qcow2::Qcow2Image::open(&f).unwrap();
        assert!(img.holds_data().unwrap());
    }
}

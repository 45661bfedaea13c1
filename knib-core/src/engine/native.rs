//! The choice between the native qcow2 data path ([`crate::qcow2::copy_image`])
//! and `qemu-img convert` for the engine's copies, compressions and
//! restores.
//!
//! Native is the default. qemu-img is used when the setting says so
//! ([`DataPath::QemuImg`], store setting `knib.data.path`), and for qcow2
//! version 2 sources of a backup copy or a compression (the native writer
//! writes version 3; qemu-img keeps them version 2, compressed with zlib).
//! Encrypted images and images with an external data file are refused by
//! the native path with an invalid-input error naming the feature (set
//! `knib.data.path` to `qemu-img` to handle them there).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qcow2::{
    copy_image, BackingRef, Commit, CompressionType, CopyOptions, CopyReport, Qcow2Image, SourceMode, TargetFormat,
};
use crate::qemu_img::{CompressionLibrary, QemuImg};

/// Which code moves the bytes of copies, compressions and restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// knib's own qcow2 reader and writer: one pass, hash in the same pass,
    /// compression on every core.
    #[default]
    Native,
    /// `qemu-img convert` (and a separate read for hashes).
    QemuImg,
}

impl DataPath {
    /// "native" or "qemu-img".
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Native => "native",
            DataPath::QemuImg => "qemu-img",
        }
    }
}

impl std::str::FromStr for DataPath {
    type Err = KnibError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(DataPath::Native),
            "qemu-img" => Ok(DataPath::QemuImg),
            _ => Err(KnibError::invalid(format!("unknown data path {s:?}: use native or qemu-img"))),
        }
    }
}

impl From<CompressionLibrary> for CompressionType {
    fn from(l: CompressionLibrary) -> Self {
        match l {
            CompressionLibrary::Zstd => CompressionType::Zstd,
            CompressionLibrary::Zlib => CompressionType::Zlib,
        }
    }
}

/// Whether the qcow2 image at `path` is version 2 (read from its header).
pub fn is_qcow2_v2(path: &Path) -> Result<bool> {
    Ok(Qcow2Image::open(path)?.header().version == 2)
}

/// One native copy as the engine makes them.
#[derive(Debug, Clone)]
pub struct NativeCopy<'a> {
    /// The source image.
    pub source: &'a Path,
    /// The file written (fsynced; the caller renames it into place).
    pub dest: &'a Path,
    /// Its own clusters (with `backing`) or the flattened chain.
    pub mode: SourceMode,
    /// Raw or qcow2.
    pub format: TargetFormat,
    /// The backing pointer written (a qcow2 file).
    pub backing: Option<String>,
    /// Compress the clusters.
    pub compress: Option<CompressionLibrary>,
    /// Compute the output's hash.
    pub hash: bool,
    /// Compression threads (0 = one per core).
    pub threads: usize,
    /// Read rate limit in MB/s (0 = none).
    pub rate_limit_mbps: u64,
    /// Names the work in a no-space error.
    pub what: &'a str,
}

/// Run a native copy, refusing it (before anything is written) when the
/// destination's file system has less room than the output can take.
pub fn copy(c: &NativeCopy<'_>, ctl: &Control) -> Result<CopyReport> {
    copy_with(c, false, ctl)
}

/// [`copy`], hashing every source file (the top and, for a flattened copy,
/// its backing files) from the bytes the copy reads:
/// [`CopyReport::source_hashes`], for [`crate::engine::verify`].
pub fn copy_hashing_sources(c: &NativeCopy<'_>, ctl: &Control) -> Result<CopyReport> {
    copy_with(c, true, ctl)
}

fn copy_with(c: &NativeCopy<'_>, hash_source: bool, ctl: &Control) -> Result<CopyReport> {
    let dir = c.dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let opts = CopyOptions {
        mode: c.mode,
        format: c.format,
        backing: c.backing.clone().map(|name| BackingRef { name, format: "qcow2".into() }),
        compression: c.compress.map(CompressionType::from),
        cluster_bits: None,
        hash: c.hash,
        hash_source,
        threads: c.threads,
        rate_limit_mbps: c.rate_limit_mbps,
        sync: true,
        direct_io: true,
    };
    copy_image(c.source, c.dest, &opts, ctl, &mut |bound| {
        // A raw output is sparse: its data is all that needs room.
        fsio::require_space(dir, bound, c.what)
    })
}

/// Merge the qcow2 image `top` into its backing file and leave it empty (a
/// stopped disk's delta after its backup): natively ([`Commit`]) on the
/// native data path when it handles the two files, otherwise with
/// `qemu-img commit`, which the native merge falls back to (logged) for
/// what it does not handle (a version 2 or raw base, internal snapshots,
/// bitmaps, other cluster or virtual sizes, features its reader refuses).
pub fn commit(q: &QemuImg, top: &Path, path: DataPath, ctl: &Control) -> Result<()> {
    merge(q, top, path, true, ctl)
}

/// [`commit`] without emptying `top` (the caller removes it, or points its
/// child at the backing file).
pub fn commit_keep(q: &QemuImg, top: &Path, path: DataPath, ctl: &Control) -> Result<()> {
    merge(q, top, path, false, ctl)
}

fn merge(q: &QemuImg, top: &Path, path: DataPath, empty: bool, ctl: &Control) -> Result<()> {
    if path == DataPath::Native {
        if let Some(mut c) = prepare_merge(top)? {
            let r = c.run(ctl)?;
            log::debug!("merged {} into {}: {r:?}", top.display(), c.base_path().display());
            return if empty { c.empty_top() } else { Ok(()) };
        }
    }
    q.commit(top, !empty, ctl)
}

/// The native merge of `top` into its backing file, checked and ready to
/// run; `None` (the reason logged) when it does not apply and
/// `qemu-img commit` must do it. Errors: the files cannot be read, are
/// corrupt, or are in use.
pub fn prepare_merge(top: &Path) -> Result<Option<Commit>> {
    let why = match Commit::prepare(top) {
        Ok(Ok(c)) => return Ok(Some(c)),
        Ok(Err(why)) => why,
        Err(e) if e.kind == crate::ErrorKind::InvalidInput => e.to_string(),
        Err(e) => return Err(e),
    };
    log::info!("merging {} with qemu-img commit: {why}", top.display());
    Ok(None)
}

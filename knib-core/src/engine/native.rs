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
    copy_image_to, BackingRef, Commit, CompressionType, CopyOptions, CopyReport, Qcow2Image, SourceMode, TargetFormat,
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
    /// `qemu-img convert` (and a read of the file written for its hash).
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

/// How a backup copy reads its source: the flattened chain (a full
/// backup, no parent), its own clusters (an incremental), or those of the
/// `above` layers of VM snapshots over its delta too.
pub fn backup_mode(has_parent: bool, above: usize) -> SourceMode {
    match (has_parent, above) {
        (false, _) => SourceMode::Chain,
        (true, 0) => SourceMode::Top,
        (true, n) => SourceMode::Above(n),
    }
}

/// Why the native data path does not read `source` for a copy in `mode`
/// (the file alone for [`SourceMode::Top`], else its backing chain too),
/// or `None` when it does: a qcow2 version 2 file (the native writer writes
/// version 3; qemu-img keeps it version 2), or what its reader refuses as
/// invalid input, named (extended L2 entries, a layer it cannot follow,
/// ...), which `qemu-img convert` reads as QEMU does. A damaged image (a
/// corrupt-data error) or one that cannot be read is an error here: it is
/// not handed to qemu-img to be copied as it happens to read it.
pub fn native_refusal(source: &Path, mode: SourceMode) -> Result<Option<String>> {
    let opened = match mode {
        SourceMode::Top => Qcow2Image::open(source).map(|img| img.header().version),
        _ => crate::qcow2::Chain::open(source).map(|chain| chain.top().header().version),
    };
    match opened {
        Ok(version) if version >= 3 => Ok(None),
        Ok(_) => Ok(Some(format!("{} is a qcow2 version 2 image", source.display()))),
        Err(e) if e.kind == crate::ErrorKind::InvalidInput => Ok(Some(e.message)),
        Err(e) => Err(e),
    }
}

/// Why a copy of `source` in `mode` on `data_path` is not made by the
/// native data path ([`native_refusal`], or the data path itself), logged;
/// `None` when it is.
pub fn not_native(data_path: DataPath, source: &Path, mode: SourceMode) -> Result<Option<String>> {
    let why = match data_path {
        DataPath::Native => native_refusal(source, mode)?,
        DataPath::QemuImg => Some("the data path (knib.data.path) is qemu-img".to_string()),
    };
    if let Some(why) = &why {
        log::info!("{}: not copied by knib's own data path: {why}", source.display());
    }
    Ok(why)
}

/// Read back the backup file qemu-img wrote, `file` (named `tmp`), from `source` (its
/// own clusters over `parent`, a backup's file named as the copy names
/// it, or with no parent its whole chain flattened): with `check` (a
/// compressed file of a backup asked to read its files back), its guest
/// bytes are compared with the source's
/// ([`crate::qcow2::check_guest_copy`]; one that differs is an
/// [`crate::ErrorKind::Internal`] error). A source knib's own reader does
/// not take or finds damaged (invalid input or corrupt: qemu-img read it)
/// is not compared, with a warning naming `what`, and the backup is kept
/// as qemu-img wrote it, as without `check`. Returns the
/// file's hash, read through the handle compared.
pub(crate) fn read_back_qemu_img_copy(
    source: &Path,
    file: &std::fs::File,
    tmp: &Path,
    parent: Option<&str>,
    check: bool,
    what: &str,
    ctl: &Control,
) -> Result<String> {
    if check {
        // A source chain knib's reader does not take, or finds damaged
        // where qemu-img read it, is left as qemu-img copied it; any other
        // error (of the host) fails the backup, as it would during the
        // comparison.
        match crate::qcow2::Chain::open(source) {
            Err(e) if matches!(e.kind, crate::ErrorKind::InvalidInput | crate::ErrorKind::Corrupt) => log::warn!(
                "{what}: its compressed file, copied by qemu-img, is not read back: knib's reader does not read its source ({e})"
            ),
            Err(e) => return Err(e),
            Ok(chain) => {
                crate::crashpoint::pause_point(&format!("comparison of {} with its source", tmp.display()));
                let copied = parent.map_or(crate::qcow2::Copied::Whole, crate::qcow2::Copied::TopOver);
                crate::qcow2::check_guest_copy(chain, file, tmp, copied, ctl)?;
            }
        }
    }
    crate::hash::hash_written_file(file, tmp, ctl)
}

/// One native copy as the engine makes them.
#[derive(Debug, Clone)]
pub struct NativeCopy<'a> {
    /// The source image.
    pub source: &'a Path,
    /// The name of the file written, a temporary of knib's own (fsynced;
    /// the caller renames it into place).
    pub dest: &'a Path,
    /// `dest` already open (created by the caller following no link, a
    /// compression's locked too; emptied by the copy): the copy writes
    /// through this handle and never opens the name, and the caller checks
    /// that the name still leads to it before renaming it.
    pub dest_file: &'a std::fs::File,
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
    /// Read a qcow2 output back and compare it with what was copied into
    /// it ([`CopyOptions::check_output`]).
    pub check: bool,
    /// Compression threads (0 = one per core, at most 16).
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
        check_output: c.check,
        hash_source,
        threads: c.threads,
        rate_limit_mbps: c.rate_limit_mbps,
        sync: true,
        write_mode: crate::qcow2::WriteMode::default(),
    };
    // Every native copy writes a temporary file of knib's own, the one
    // the caller created (and renames into place).
    copy_image_to(c.source, c.dest, crate::qcow2::Output::Opened(c.dest_file), &opts, ctl, &mut |bound| {
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
        if let Some(mut c) = prepare_merge(q, top, ctl)? {
            let r = c.run(ctl)?;
            log::debug!("merged {} into {}: {r:?}", top.display(), c.base_path().display());
            return if empty { c.empty_top() } else { Ok(()) };
        }
    } else {
        repair_dirty(q, top, ctl)?;
    }
    q.commit(top, !empty, ctl)
}

/// The native merge of `top` into its backing file, checked and ready to
/// run; `None` (the reason logged) when it does not apply and
/// `qemu-img commit` must do it. Either file marked dirty is repaired first
/// ([`repair_dirty`]), so neither the native merge nor `qemu-img commit`
/// ever allocates by stale refcounts. The native merge guards the backing
/// file it writes into itself; `top`, which it reads and then empties, is
/// checked by `qemu-img check` as `qemu-img commit` has it checked
/// ([`QemuImg::require_no_corruption`]): a data entry pointing at one of
/// its tables, or two sharing a cluster, read well and were merged as guest
/// data, and emptying the top removed the evidence. Leaked clusters of the
/// backing file are reclaimed first (`qemu-img check -r leaks`, logged as a
/// warning; guest-visible contents do not change). Errors: the files
/// cannot be read, are corrupt (named in the message), or are in use.
pub fn prepare_merge(q: &QemuImg, top: &Path, ctl: &Control) -> Result<Option<Commit>> {
    repair_dirty(q, top, ctl)?;
    // Prepared once, or twice when the base's leaks were reclaimed first.
    let mut reclaimed = false;
    let why = loop {
        let c = match Commit::prepare(top) {
            Ok(Ok(c)) => c,
            Ok(Err(why)) => break why,
            Err(e) if e.kind == crate::ErrorKind::InvalidInput => break e.to_string(),
            Err(e) => return Err(e),
        };
        if !reclaimed {
            q.require_no_corruption(top, ctl)?;
        }
        if c.base_leaks() == 0 || reclaimed {
            return Ok(Some(c));
        }
        // Leaked clusters (a merge killed between its refcount and table
        // writes leaves some) are reclaimed before the merge: left, they
        // stay in the base, and a disk's base becomes the disk at the end
        // of a chain, where `qemu-img check` reports them.
        let (base, leaks) = (c.base_path().to_path_buf(), c.base_leaks());
        drop(c);
        log::warn!(
            "{} has {leaks} leaked clusters (a merge into it was interrupted): reclaiming them with \
             qemu-img check -r leaks before the merge",
            base.display()
        );
        // Leaks harm no data: a reclaim that fails (the file busy, or QEMU
        // finding more than leaks) leaves them, and the merge goes on (its
        // own checks run again).
        match q.repair_leaks(&base, ctl) {
            Ok(r) => log::info!("{}: leaked clusters reclaimed ({r:?})", base.display()),
            Err(e) if matches!(e.kind, crate::ErrorKind::Cancelled | crate::ErrorKind::Timeout) => return Err(e),
            Err(e) => log::warn!("{}: its leaked clusters stay ({e}); merging all the same", base.display()),
        }
        reclaimed = true;
    };
    log::info!("merging {} with qemu-img commit: {why}", top.display());
    Ok(None)
}

/// Whether the qcow2 file at `path` has the dirty bit (incompatible
/// feature bit 0) set, read from its header alone (version 3 only; a file
/// that is not qcow2 is not dirty).
fn dirty_bit(path: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| KnibError::io("cannot open", path, e))?;
    let mut h = [0u8; 80];
    let n = f.read_at(&mut h, 0).map_err(|e| KnibError::io("cannot read", path, e))?;
    Ok(n == 80
        && h[..4] == crate::qcow2::MAGIC
        && h[4..8] == 3u32.to_be_bytes()
        && u64::from_be_bytes(h[72..80].try_into().expect("8 bytes")) & crate::qcow2::INCOMPAT_DIRTY != 0)
}

/// Rebuild the refcounts of `top` and of its backing file when they are
/// marked dirty (lazy refcounts, and a writer that was killed or a host
/// that crashed): their refcounts are stale, so an allocation trusting
/// them could land on live data. The repair is QEMU's own
/// (`qemu-img check -r all`, what QEMU does when it opens a dirty image
/// for writing; `qemu-img commit` does not do it for the backing file it
/// writes into), logged as a warning. Guest-visible contents do not change.
pub fn repair_dirty(q: &QemuImg, top: &Path, ctl: &Control) -> Result<()> {
    let base = match crate::qcow2::Chain::open(top) {
        Ok(chain) => match chain.backing().first() {
            Some(crate::qcow2::Layer::Qcow2(b)) => b.path().map(Path::to_path_buf),
            _ => None,
        },
        // A feature the native reader does not handle: the chain as QEMU
        // reads it (a corrupt image is refused as it is).
        Err(e) if e.kind == crate::ErrorKind::InvalidInput => {
            let chain = q.info_chain(top, ctl)?;
            chain.get(1).filter(|i| i.format == "qcow2").map(|i| std::path::PathBuf::from(&i.filename))
        }
        Err(e) => return Err(e),
    };
    let files: Vec<(std::path::PathBuf, bool)> =
        std::iter::once(top.to_path_buf()).chain(base).map(|f| dirty_bit(&f).map(|d| (f, d))).collect::<Result<_>>()?;
    if !files.iter().any(|(_, dirty)| *dirty) {
        return Ok(());
    }
    // The files that are not dirty are checked before a dirty one is
    // rewritten: a merge refused for their damage afterwards would have
    // repaired the other for nothing.
    for (file, _) in files.iter().filter(|(_, dirty)| !dirty) {
        q.require_no_corruption(file, ctl)?;
    }
    for (file, _) in files.into_iter().filter(|(_, dirty)| *dirty) {
        log::warn!(
            "{} is marked dirty (not closed cleanly, its refcounts are stale): rebuilding them with \
             qemu-img check -r all before the merge",
            file.display()
        );
        let r = q.repair(&file, ctl).map_err(|e| e.context(format!("repair of the dirty image {}", file.display())))?;
        log::info!("{}: refcounts rebuilt ({r:?})", file.display());
        if dirty_bit(&file)? {
            return Err(KnibError::corrupt(format!(
                "{} is still marked dirty after qemu-img check -r all: it is not merged into",
                file.display()
            )));
        }
    }
    Ok(())
}

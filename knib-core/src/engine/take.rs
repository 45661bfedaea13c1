//! Taking a backup of plain qcow2 disk files (a stopped VM). See the module
//! documentation of [`crate::engine`] for the shapes on primary storage.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::native::{self, DataPath, NativeCopy};
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qcow2::{BackingRef, Commit, CompressionType, CopyOptions, TargetFormat};
use crate::qemu_img::{CompressionLibrary, Convert, ImageFormat, QemuImg};

/// What kind of backup to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// The whole disk; starts a chain.
    Full,
    /// Only the writes since the parent backup.
    Incremental,
    /// The whole disk, outside any chain; primary storage is left as it was.
    Isolated,
}

impl BackupKind {
    /// "full", "incremental" or "isolated".
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
            BackupKind::Isolated => "isolated",
        }
    }
}

/// One volume to back up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeBackup {
    /// The volume's name (used in messages).
    pub name: String,
    /// The disk's active qcow2 file on primary storage.
    pub disk: PathBuf,
    /// Where the backup file goes on the store.
    pub dest: PathBuf,
    /// For an incremental backup: the parent backup's file, as the backing
    /// pointer to write (relative to `dest`'s directory).
    pub parent: Option<String>,
}

/// A request to back up the volumes of one (stopped) VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TakeBackupRequest {
    /// The volumes, all backed up together.
    pub volumes: Vec<VolumeBackup>,
    /// Full, incremental or isolated.
    pub kind: BackupKind,
    /// Collapse primary back to one file afterwards, so the next backup is
    /// full.
    pub end_of_chain: bool,
    /// Native data path (default) or qemu-img.
    #[serde(default)]
    pub data_path: DataPath,
    /// Compress the backup files as they are copied (one pass): zstd or
    /// zlib (zlib for qcow2 version 2 disks whatever is asked).
    #[serde(default)]
    pub compress: Option<CompressionLibrary>,
    /// With `compress`: read each compressed file back through its own
    /// tables before it is kept, and fail (`internal`, nothing kept) if it
    /// does not hold what was copied into it (knib's own data path: see
    /// [`crate::qcow2::CopyOptions::check_output`]; qemu-img's: compared
    /// with the disk, see `read_back_qemu_img_copy`).
    #[serde(default)]
    pub check_output: bool,
}

/// What happened to one volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeResult {
    /// The volume's name.
    pub name: String,
    /// The file the volume now runs on (for plain files, the path given).
    pub active_file: PathBuf,
    /// The backup file written on the store.
    pub dest: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The disk's guest-visible size.
    pub virtual_size: u64,
    /// xxh3-128 of the backup file, computed as it was written (native data
    /// path) or read back from the file qemu-img wrote: what
    /// [`crate::hash::hash_files`] of the file gives. `None` only in
    /// answers written before knib recorded it on every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The library the file was compressed with as it was copied, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionLibrary>,
    /// Guest data bytes copied into the file (native data path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
}

/// The answer of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TakeBackupAnswer {
    /// One entry per volume, in request order.
    pub volumes: Vec<VolumeResult>,
}

/// The knib base file of a disk: `<file name>.knib-base` beside it.
pub fn base_path(disk: &Path) -> PathBuf {
    let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    disk.with_file_name(format!("{name}.knib-base"))
}

/// The record, beside a disk, of which backup its delta follows:
/// `<file name>.knib-since`. The catalog writes it (see
/// [`write_since_marker`]) after a backup is published and before the
/// disk's delta is emptied or created for it, so the delta always holds
/// every write since the backup it names (or more).
pub fn since_marker_path(disk: &Path) -> PathBuf {
    let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    disk.with_file_name(format!("{name}.knib-since"))
}

/// The content of a `.knib-since` marker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceMarker {
    schema: u32,
    /// The backup the disk's delta follows.
    backup: String,
}

/// Record that the delta of `disk` follows backup `id` (atomically, made
/// durable).
pub fn write_since_marker(disk: &Path, id: &str) -> Result<()> {
    let m = SinceMarker { schema: 1, backup: id.to_string() };
    fsio::write_atomic(&since_marker_path(disk), &serde_json::to_vec(&m).expect("a marker serializes"))
}

/// The most bytes a `.knib-since` marker holds (knib writes about 60).
pub const MAX_MARKER_BYTES: u64 = 4096;

/// The backup the delta of `disk` follows, as its marker says: `None` when
/// there is no marker. The marker is untrusted: an id that is not a valid
/// backup id, or a file that does not parse, is a `corrupt` error.
///
/// It is read as hostile: opened without following a link and without
/// waiting (a FIFO), only when it is a regular file, and only its first
/// [`MAX_MARKER_BYTES`] (a marker linked to `/dev/zero`, or of a gigabyte,
/// took that much memory, and a FIFO hung the backup with its VM locked).
pub fn read_since_marker(disk: &Path) -> Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let p = since_marker_path(disk);
    let f = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(KnibError::corrupt(format!("{} is a symbolic link, not a marker knib wrote", p.display())))
        }
        Err(e) => return Err(KnibError::io("cannot open", &p, e)),
    };
    if !f.metadata().map_err(|e| KnibError::io("cannot stat", &p, e))?.is_file() {
        return Err(KnibError::corrupt(format!("{} is not a regular file, not a marker knib wrote", p.display())));
    }
    let mut text = Vec::new();
    f.take(MAX_MARKER_BYTES + 1).read_to_end(&mut text).map_err(|e| KnibError::io("cannot read", &p, e))?;
    if text.len() as u64 > MAX_MARKER_BYTES {
        return Err(KnibError::corrupt(format!(
            "{} is larger than {MAX_MARKER_BYTES} bytes, not a marker knib wrote",
            p.display()
        )));
    }
    let m: SinceMarker =
        serde_json::from_slice(&text).map_err(|e| KnibError::corrupt(format!("{} is corrupted: {e}", p.display())))?;
    if m.schema != 1 || crate::names::validate("backup id", &m.backup).is_err() {
        return Err(KnibError::corrupt(format!("{} does not name a backup", p.display())));
    }
    Ok(Some(m.backup))
}

/// Remove the `.knib-since` marker of `disk`, if any.
pub fn remove_since_marker(disk: &Path) -> Result<()> {
    fsio::remove_if_exists(&since_marker_path(disk))
}

/// The overlay being put in place of a disk that gets its base.
fn new_overlay_path(disk: &Path) -> PathBuf {
    let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    disk.with_file_name(format!("{name}.knib-new"))
}

/// Finish or undo what a crash interrupted on a disk getting its base:
/// when `P` is missing but its base and the new overlay exist (a crash of an
/// older knib, or one on a file system without hard links, which renamed
/// `P` to the base), the overlay is renamed to `P`, or, when the entry
/// under the overlay's name is not the file knib made (a link: it would
/// become the disk), that entry is removed and the base renamed back to
/// `P`; when the base is a second name of `P` itself (a crash between
/// linking the base and putting the overlay in place), that name is removed
/// (guest writes since the crash went into `P`: finishing would hide them
/// below an overlay the next incremental starts from). Returns whether
/// anything was done.
pub fn repair_volume(disk: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let base = base_path(disk);
    let new = new_overlay_path(disk);
    if let (Ok(d), Ok(b)) = (fs::metadata(disk), fs::metadata(&base)) {
        if (d.dev(), d.ino()) == (b.dev(), b.ino()) {
            log::warn!("undoing an interrupted base creation of {}: removing {}", disk.display(), base.display());
            fsio::remove_if_exists(&base)?;
            fsio::sync_dir(base.parent().unwrap_or(Path::new(".")))?;
            fsio::remove_if_exists(&new)?;
            return Ok(true);
        }
    }
    let new_meta = fs::symlink_metadata(&new).ok();
    if !disk.exists() && base.exists() && new_meta.is_some() {
        // Only the overlay knib made takes the disk's name: anything else
        // there (a link put under the name) is removed, never followed,
        // and the base takes its name back.
        if let Some(what) = new_meta.as_ref().and_then(fsio::not_own_file) {
            log::warn!(
                "undoing an interrupted base creation of {}: {} {what}, not the overlay knib made; it is removed",
                disk.display(),
                new.display()
            );
            // The base first: a crash after it leaves the entry for the
            // last branch below.
            fsio::rename_noreplace(&base, disk)?;
            fsio::remove_if_exists(&new)?;
            return Ok(true);
        }
        log::warn!("finishing an interrupted base creation of {}", disk.display());
        fsio::commit_rename(&new, disk)?;
        return Ok(true);
    }
    if disk.exists() && new_meta.is_some() {
        fsio::remove_if_exists(&new)?;
    }
    Ok(false)
}

/// Whether `disk`, missing beside its base (a base creation interrupted
/// where the disk was renamed to its base), runs on that base once
/// [`repair_volume`] has run: only when the overlay knib made is there to
/// take the disk's name; anything else under the overlay's name is
/// removed and the base takes the name back.
pub fn on_base_once_repaired(disk: &Path) -> bool {
    fs::symlink_metadata(new_overlay_path(disk)).is_ok_and(|m| fsio::not_own_file(&m).is_none())
}

/// How a disk looks on primary storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// The disk's guest-visible size.
    pub virtual_size: u64,
    /// Whether the disk's file is qcow2 version 2 (compat 0.10).
    pub qcow2_v2: bool,
    /// Whether the disk runs on its knib base (`B <- P`).
    pub on_knib_base: bool,
}

/// Inspect a disk: it must exist (a regular file or a block device), be qcow2, and be neither encrypted nor
/// using an external data file; its backing chain must open. Read by the
/// native qcow2 reader; what it refuses (a raw file, encryption, an
/// external data file, a corrupt table) is asked of `qemu-img info
/// --backing-chain`, whose answer names the problem or shows that QEMU
/// reads the disk.
pub fn inspect_disk(q: &QemuImg, name: &str, disk: &Path, ctl: &Control) -> Result<DiskState> {
    crate::fsio::require_file(disk, &format!("disk {name}: "), true).map_err(|mut e| {
        // A disk renamed to its base for a moment (a file system without
        // hard links) by a knib killed before the base took its name back.
        let base = base_path(disk);
        if e.kind == crate::ErrorKind::NotFound && fs::symlink_metadata(&base).is_ok_and(|m| m.is_file()) {
            e.message.push_str(&format!(
                "; {} is there, and holds the disk's data if a backup was killed while it put an overlay in the disk's place on a file system without hard links: rename it back to {} (if nothing else removed the disk)",
                base.display(),
                disk.display()
            ));
        }
        e
    })?;
    let backing = match crate::qcow2::Chain::open(disk) {
        Ok(chain) => {
            let h = chain.top().header();
            Ok((h.size, h.version == 2, h.backing_file.clone()))
        }
        Err(e) if matches!(e.kind, crate::ErrorKind::InvalidInput | crate::ErrorKind::Corrupt) => Err(e),
        Err(e) => return Err(e.context(format!("disk {name}"))),
    };
    let (virtual_size, qcow2_v2, backing_file) = match backing {
        Ok(found) => found,
        Err(native) => {
            log::debug!("disk {name}: asking qemu-img, the native reader refused it: {native}");
            inspect_with_qemu_img(q, name, disk, ctl)?
        }
    };
    let base = base_path(disk);
    let base_name = base.file_name().map(|n| n.to_string_lossy().into_owned());
    let on_knib_base = backing_file
        .as_deref()
        .map(|b| Path::new(b).file_name().map(|n| n.to_string_lossy().into_owned()) == base_name)
        .unwrap_or(false);
    Ok(DiskState { virtual_size, qcow2_v2, on_knib_base })
}

/// [`inspect_disk`] through `qemu-img info --backing-chain`: (virtual size,
/// version 2, backing file name).
fn inspect_with_qemu_img(q: &QemuImg, name: &str, disk: &Path, ctl: &Control) -> Result<(u64, bool, Option<String>)> {
    let chain = q.info_chain(disk, ctl).map_err(|e| e.context(format!("disk {name}")))?;
    let top = chain.first().ok_or_else(|| KnibError::internal("qemu-img info gave an empty chain"))?;
    if top.format != "qcow2" {
        return Err(KnibError::invalid(format!("disk {name}: {} is {}, not qcow2", disk.display(), top.format)));
    }
    if top.encrypted == Some(true) {
        return Err(KnibError::invalid(format!("disk {name}: {} is encrypted", disk.display())));
    }
    if top.format_specific.as_ref().and_then(|f| f.data.data_file.as_ref()).is_some() {
        return Err(KnibError::invalid(format!("disk {name}: {} uses an external data file", disk.display())));
    }
    Ok((top.virtual_size, top.is_qcow2_v2(), top.backing_filename.clone()))
}

/// Take a backup of plain disk files. All volumes are copied first; if any
/// copy fails, everything written to the store is deleted and primary is
/// untouched. Only then is primary merged. No catalog records this backup,
/// so a `.knib-since` marker beside a disk (see [`since_marker_path`]) is
/// removed before the disk's delta is emptied: a catalog backup of the disk
/// afterwards cannot tell what the delta follows and takes a full backup.
/// A disk (or its knib base, or the overlay that replaces it) that a
/// process holds QEMU's image locks on, a VM running on it, is refused as
/// busy before anything is written ([`crate::lock::ensure_unused`]).
pub fn take_backup(q: &QemuImg, req: &TakeBackupRequest, ctl: &Control) -> Result<TakeBackupAnswer> {
    take_backup_with(q, req, ctl, &mut |_| {
        if req.kind != BackupKind::Isolated {
            for v in &req.volumes {
                remove_since_marker(&v.disk)?;
            }
        }
        Ok(())
    })
}

/// [`take_backup`], calling `publish` once every volume is copied and
/// durable on the store, before primary is merged. The catalog writes its
/// manifest there, so a crash can never merge writes that no published
/// backup holds. When `publish` fails, the copies are deleted and primary is
/// left as it was.
pub fn take_backup_with(
    q: &QemuImg,
    req: &TakeBackupRequest,
    ctl: &Control,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<TakeBackupAnswer> {
    take_backup_to(q, req, ctl, None, publish)
}

/// One volume's single-pass copy written elsewhere than a store file (a
/// vault's upload): given the volume and the options of the native copy
/// to run (mode, backing pointer, compression), it runs the copy from
/// `VolumeBackup::disk` and says what it wrote. On error it leaves
/// nothing of the volume visible.
pub type CopyTo<'a> = dyn FnMut(&VolumeBackup, &CopyOptions, &Control) -> Result<CopiedTo> + 'a;

/// What a [`CopyTo`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedTo {
    /// The length of the volume's file.
    pub size: u64,
    /// Its xxh3-128.
    pub hash: String,
    /// Guest data bytes read from the disk.
    pub bytes_read: u64,
}

/// [`take_backup_with`] with every volume's copy made by `copy_to`
/// instead of into `VolumeBackup::dest` (which only names it): the
/// native data path, qcow2 version 3 disks only. `publish` is called once
/// every volume is written, before primary is merged, as for
/// [`take_backup_with`].
pub fn take_backup_direct(
    q: &QemuImg,
    req: &TakeBackupRequest,
    ctl: &Control,
    copy_to: &mut CopyTo<'_>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<TakeBackupAnswer> {
    take_backup_to(q, req, ctl, Some(copy_to), publish)
}

fn take_backup_to(
    q: &QemuImg,
    req: &TakeBackupRequest,
    ctl: &Control,
    copy_to: Option<&mut CopyTo<'_>>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<TakeBackupAnswer> {
    if req.volumes.is_empty() {
        return Err(KnibError::invalid("a backup needs at least one volume"));
    }
    // One knib operation at a time on a disk's files, whatever store or VM
    // name it backs them up into: two backups of one disk making its base
    // at once each took the other's base for their own, and the disk's
    // data lost its last name. Held until the backup ends.
    let files: Vec<[PathBuf; 3]> =
        req.volumes.iter().map(|v| [v.disk.clone(), base_path(&v.disk), new_overlay_path(&v.disk)]).collect();
    let named: Vec<&Path> = files.iter().flatten().map(PathBuf::as_path).collect();
    let _held =
        crate::lock::hold_for_one_operation(&named, "the backup of a disk").map_err(|e| e.with_vm_consistent(true))?;
    // A disk a QEMU holds open (a VM running on it) would be copied torn,
    // then turned into a base under the writer's feet: refused before
    // anything is written, even a repair.
    for v in &req.volumes {
        let (base, new) = (base_path(&v.disk), new_overlay_path(&v.disk));
        crate::lock::ensure_unused(&[&v.disk, &base, &new], &format!("the backup of volume {}", v.name)).map_err(
            |mut e| {
                e.message.push_str(
                    " (a running VM is backed up through its libvirt domain, knib backup --domain, not its disk files)",
                );
                e.with_vm_consistent(true)
            },
        )?;
    }
    for v in &req.volumes {
        repair_volume(&v.disk)?;
    }
    let mut states = Vec::new();
    for v in &req.volumes {
        let st = inspect_disk(q, &v.name, &v.disk, ctl)?;
        if req.kind == BackupKind::Incremental {
            if v.parent.is_none() {
                return Err(KnibError::invalid(format!("volume {}: an incremental backup needs a parent", v.name)));
            }
            if !st.on_knib_base {
                return Err(KnibError::invalid(format!(
                    "volume {}: {} has no knib base, so no delta since a backup: take a full backup",
                    v.name,
                    v.disk.display()
                )));
            }
        }
        if copy_to.is_some() {
            let mode = native::backup_mode(req.kind == BackupKind::Incremental, 0);
            let why = native::not_native(req.data_path, &v.disk, mode)
                .map_err(|e| e.context(format!("volume {}", v.name)))?;
            if let Some(why) = why {
                return Err(KnibError::invalid(format!(
                    "volume {}: a backup written straight to a vault needs knib's own data path, which does not copy {}: {why}; take it into the store and sync it",
                    v.name,
                    v.disk.display()
                )));
            }
        }
        if copy_to.is_none() && v.dest.exists() {
            return Err(KnibError::invalid(format!("volume {}: {} already exists", v.name, v.dest.display())));
        }
        states.push(st);
    }

    // A disk that nothing merges meanwhile (not on its knib base, or an
    // isolated backup) is held as a QEMU reader until the backup ends: a VM
    // started on it during the copy tore the copy, and one started before
    // its base is made wrote into what became the base, writes no backup
    // holds. (A disk on its base is held by the merge's own writer locks.)
    let read_only: Vec<PathBuf> = req
        .volumes
        .iter()
        .zip(&states)
        .filter(|(_, st)| !st.on_knib_base || req.kind == BackupKind::Isolated)
        .flat_map(|(v, st)| {
            let base = st.on_knib_base.then(|| base_path(&v.disk));
            std::iter::once(v.disk.clone()).chain(base)
        })
        .collect();
    let read_only: Vec<&Path> = read_only.iter().map(PathBuf::as_path).collect();
    let _reading = crate::lock::hold_for_reading(&read_only, "the backup").map_err(|e| e.with_vm_consistent(true))?;

    // 1. Copy every volume to a temporary name on the store. On the native
    // data path, a disk on its knib base has its delta merged into the base
    // meanwhile, on another thread (the delta is emptied only once the
    // backup is published; until then it overrides the base, so reads of the
    // disk are the same whether the merge is done, half done or failed).
    let premerge = req.kind != BackupKind::Isolated
        && req.data_path == DataPath::Native
        && states.iter().any(|st| st.on_knib_base);
    // A disk on its base that `qemu-img commit` merges after publishing
    // (the qemu-img data path) is held as a QEMU reader from before its copy
    // until just before that commit: a VM started on it meanwhile tore the
    // copy, or wrote what the commit then folded into the base, in no
    // backup. (On the native data path the merger thread holds them.)
    let held_until_commit = req
        .volumes
        .iter()
        .zip(&states)
        .map(|(v, st)| match st.on_knib_base && req.kind != BackupKind::Isolated && !premerge {
            true => hold_disk_and_base(&v.disk).map_err(|e| e.with_vm_consistent(true)),
            false => Ok(Vec::new()),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut written: Vec<PathBuf> = Vec::new();
    let (copy, merged) = std::thread::scope(|scope| {
        let (prepared_tx, prepared_rx) = std::sync::mpsc::channel::<Option<KnibError>>();
        let merger = premerge.then(|| {
            let mctl = Control::new().with_deadline(ctl.deadline).with_cancel(ctl.cancel.clone());
            let states = &states;
            scope.spawn(move || merge_into_bases(q, req, states, &mctl, prepared_tx))
        });
        // The copy begins once the merge holds its locks on every disk it
        // merges: a VM started on one before would tear the copy (and the
        // merge, refused as busy after publishing, left a torn backup
        // published). A disk found in use refuses the backup before
        // anything is copied, and so does a merger that ended (panicked)
        // before it said so.
        let busy = match merger {
            Some(_) => prepared_rx
                .recv()
                .unwrap_or_else(|_| Some(KnibError::internal("the merge thread ended before it had locked the disks"))),
            None => None,
        };
        let copy = match (busy, copy_to) {
            (Some(e), _) => Err(e),
            (None, Some(to)) => copy_volumes_to(req, &states, ctl, to, publish),
            (None, None) => copy_volumes(q, req, &states, ctl, &mut written, publish),
        };
        let merged = match merger {
            Some(h) => h.join().unwrap_or_else(|_| {
                req.volumes
                    .iter()
                    .map(|_| Early::Failed { error: KnibError::internal("the merge thread panicked"), _held: None })
                    .collect()
            }),
            None => req.volumes.iter().map(|_| Early::NotTried).collect(),
        };
        (copy, merged)
    });
    let results = match copy {
        Ok(r) => r,
        Err(e) => {
            for (i, tmp) in written.iter().enumerate() {
                let _ = fsio::remove_if_exists(tmp);
                let _ = fsio::remove_if_exists(&req.volumes[i].dest);
            }
            return Err(e.with_vm_consistent(true));
        }
    };

    // 2. and 3. Merge primary (not for an isolated backup). The backup is
    // published: a failure here leaves every write in the disk's delta, and
    // the next backup copies it again.
    if req.kind != BackupKind::Isolated {
        for (((v, st), early), held) in req.volumes.iter().zip(&states).zip(merged).zip(held_until_commit) {
            drop(held);
            // Past the time budget, which bounds the copy: the backup is published.
            merge_after_backup(q, v, st, req.end_of_chain, req.data_path, early, &Control::new())
                .map_err(|e| {
                    e.context(format!(
                        "the backup is stored, but merging volume {} afterwards failed (its writes stay in {} and the next backup copies them again)",
                        v.name,
                        v.disk.display()
                    ))
                    .with_vm_consistent(true)
                })?;
        }
    }
    Ok(TakeBackupAnswer { volumes: results })
}

/// Step 1 of [`take_backup_with`]: copy every volume to its temporary name
/// (recorded in `written`), rename them into place and publish.
fn copy_volumes(
    q: &QemuImg,
    req: &TakeBackupRequest,
    states: &[DiskState],
    ctl: &Control,
    written: &mut Vec<PathBuf>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<Vec<VolumeResult>> {
    let mut hashes: Vec<(Option<String>, Option<CompressionLibrary>, Option<u64>)> = Vec::new();
    // Each copy's temporary as created: written through this, never by
    // name, and the name checked to lead to it before the rename.
    let mut created: Vec<std::fs::File> = Vec::new();
    // Only compressed files are read back.
    let check = req.check_output && req.compress.is_some();
    for (v, st) in req.volumes.iter().zip(states) {
        let tmp = fsio::temp_path(&v.dest);
        written.push(tmp.clone());
        let backing = if req.kind == BackupKind::Incremental { v.parent.clone() } else { None };
        let mode = native::backup_mode(backing.is_some(), 0);
        let refusal = native::not_native(req.data_path, &v.disk, mode)
            .map_err(|e| e.context(format!("copy of volume {}", v.name)))?;
        let what = format!("backup of volume {}", v.name);
        crate::crashpoint::durable_step(&format!("copy of volume {}", v.name));
        let file = fsio::create_own_temp(&tmp).map_err(|e| e.context(format!("copy of volume {}", v.name)))?;
        created.push(file);
        let file = created.last().expect("pushed above");
        if refusal.is_none() {
            let c = NativeCopy {
                source: &v.disk,
                dest: &tmp,
                dest_file: file,
                mode,
                format: TargetFormat::Qcow2,
                backing,
                compress: req.compress,
                hash: true,
                check,
                threads: 0,
                rate_limit_mbps: 0,
                what: &what,
            };
            let r = native::copy(&c, ctl).map_err(|e| e.context(format!("copy of volume {}", v.name)))?;
            hashes.push((r.hash, req.compress, Some(r.bytes_read)));
            continue;
        }
        let c = QemuImgCopy {
            source: &v.disk,
            tmp: &tmp,
            file,
            parent: backing.as_deref(),
            v2: st.qcow2_v2,
            compress: req.compress,
            check,
            force_share: false,
            what: &what,
        };
        let (hash, compression) = c.run(q, ctl).map_err(|e| e.context(format!("copy of volume {}", v.name)))?;
        hashes.push((Some(hash), compression, None));
    }
    // Each file's size is its own, not whatever its name leads to later.
    let mut sizes = Vec::new();
    for ((v, tmp), file) in req.volumes.iter().zip(written.iter()).zip(&created) {
        fsio::commit_own_temp(tmp, file, &v.dest, true)?;
        sizes.push(file.metadata().map_err(|e| KnibError::io("cannot stat", &v.dest, e))?.len());
    }
    drop(created);
    let mut results = Vec::new();
    for (((v, st), (hash, compression, data_bytes)), size) in req.volumes.iter().zip(states).zip(&hashes).zip(sizes) {
        results.push(VolumeResult {
            name: v.name.clone(),
            active_file: v.disk.clone(),
            dest: v.dest.clone(),
            size,
            virtual_size: st.virtual_size,
            hash: hash.clone(),
            compression: *compression,
            data_bytes: *data_bytes,
        });
    }
    ctl.check("publishing the backup")?;
    publish(&results)?;
    Ok(results)
}

/// A backup's copy of one volume by qemu-img, the data path knib's own
/// does not take: `source` (its own clusters over backup `parent`, or the
/// whole chain) into `file`, the temporary `tmp` the caller created
/// ([`fsio::create_own_temp`]), after the space it needs is found free (the
/// source's allocated bytes for an incremental, `qemu-img measure`'s for a
/// full copy). Its hash is read back from the file written, as the native
/// copy records it (a backup is never without one), and with `check` the
/// file is compared with `source` ([`native::read_back_qemu_img_copy`]).
///
/// qemu-img writes `file`, never the name `tmp` ([`QemuImg::convert_into`]);
/// the caller renames it into place ([`fsio::commit_own_temp`]).
pub(crate) struct QemuImgCopy<'a> {
    pub source: &'a Path,
    pub tmp: &'a Path,
    pub file: &'a std::fs::File,
    pub parent: Option<&'a str>,
    /// The source is a qcow2 version 2 image: its copy is one too,
    /// compressed with zlib (version 2 has no zstd).
    pub v2: bool,
    pub compress: Option<CompressionLibrary>,
    pub check: bool,
    /// Read `source` whatever holds it (`qemu-img convert -U`).
    pub force_share: bool,
    /// "backup of volume X", for errors and the space check.
    pub what: &'a str,
}

impl QemuImgCopy<'_> {
    /// Make the copy; its hash and how it is compressed.
    pub(crate) fn run(&self, q: &QemuImg, ctl: &Control) -> Result<(String, Option<CompressionLibrary>)> {
        let needed = if self.parent.is_some() {
            fsio::allocated_bytes(self.source)?
        } else {
            q.measure(self.source, ImageFormat::Qcow2, ctl)?.required
        };
        fsio::require_space(fsio::parent_dir(self.tmp), needed, self.what)?;
        let compress = self.compress.map(|c| if self.v2 { CompressionLibrary::Zlib } else { c });
        crate::crashpoint::pause_point(&format!("qemu-img copy to {}", self.tmp.display()));
        q.convert_into(
            &Convert {
                source: self.source.to_path_buf(),
                backing: self.parent.map(str::to_string),
                compat_v2: self.v2,
                force_share: self.force_share,
                compress,
                ..Default::default()
            },
            self.file,
            self.tmp,
            ctl,
        )?;
        let hash =
            native::read_back_qemu_img_copy(self.source, self.file, self.tmp, self.parent, self.check, self.what, ctl)?;
        Ok((hash, compress))
    }
}

/// Step 1 of [`take_backup_direct`]: every volume's copy made by `copy_to`,
/// then publish.
fn copy_volumes_to(
    req: &TakeBackupRequest,
    states: &[DiskState],
    ctl: &Control,
    copy_to: &mut CopyTo<'_>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<Vec<VolumeResult>> {
    let mut results = Vec::new();
    for (v, st) in req.volumes.iter().zip(states) {
        let backing = if req.kind == BackupKind::Incremental { v.parent.clone() } else { None };
        let opts = CopyOptions {
            mode: native::backup_mode(backing.is_some(), 0),
            format: TargetFormat::Qcow2,
            backing: backing.map(|name| BackingRef { name, format: "qcow2".into() }),
            compression: req.compress.map(CompressionType::from),
            hash: true,
            sync: false,
            write_mode: crate::qcow2::WriteMode::Buffered,
            ..Default::default()
        };
        let c = copy_to(v, &opts, ctl).map_err(|e| e.context(format!("copy of volume {}", v.name)))?;
        results.push(VolumeResult {
            name: v.name.clone(),
            active_file: v.disk.clone(),
            dest: v.dest.clone(),
            size: c.size,
            virtual_size: st.virtual_size,
            hash: Some(c.hash),
            compression: req.compress,
            data_bytes: Some(c.bytes_read),
        });
    }
    ctl.check("publishing the backup")?;
    publish(&results)?;
    Ok(results)
}

/// What became of a volume's merge started during the copy. Each keeps
/// what holds the disk against writers (a VM started on it) until the
/// merge after publishing: the copy must not be torn, nor the disk written
/// before its delta is folded into the base.
enum Early {
    /// Not started (not on its base, or the qemu-img data path).
    NotTried,
    /// The native merge does not apply: `qemu-img commit` after publishing,
    /// the disk and its base held as a QEMU reader's until then.
    QemuImg(Vec<std::fs::File>),
    /// Done (its locks held, the delta still full).
    Merged(Box<Commit>),
    /// Failed, preparing or running: the disk stays held (by the failed
    /// merge's own locks, or as a reader's) until the backup ends.
    Failed { error: KnibError, _held: Option<Box<dyn Send>> },
}

/// The disk `disk` and its knib base, held as a QEMU reader holds them
/// ([`crate::lock::hold_for_reading`]) for as long as the files returned
/// stay open.
fn hold_disk_and_base(disk: &Path) -> Result<Vec<std::fs::File>> {
    let base = base_path(disk);
    crate::lock::hold_for_reading(&[disk, &base], "the backup")
}

/// Merge the delta of every disk on its base into the base, on the
/// merger thread: first every merge is prepared (its files locked as a
/// QEMU writer's), and every disk whose merge is not prepared (`qemu-img
/// commit` does it, or its preparation failed) held as a QEMU reader's;
/// then `prepared` is told so, with the first disk found in use or that
/// could not be held (then nothing is merged: the backup is refused); then
/// the merges run, beside the copy.
fn merge_into_bases(
    q: &QemuImg,
    req: &TakeBackupRequest,
    states: &[DiskState],
    ctl: &Control,
    prepared: std::sync::mpsc::Sender<Option<KnibError>>,
) -> Vec<Early> {
    let ready: Vec<Option<Result<Option<Commit>>>> = req
        .volumes
        .iter()
        .zip(states)
        .map(|(v, st)| st.on_knib_base.then(|| native::prepare_merge(q, &v.disk, ctl)))
        .collect();
    let busy =
        ready.iter().flatten().find_map(|r| r.as_ref().err().filter(|e| e.kind == crate::ErrorKind::Busy).cloned());
    let mut early = Vec::new();
    let mut refused = busy;
    for (v, r) in req.volumes.iter().zip(ready) {
        if refused.is_some() {
            break;
        }
        early.push(match r {
            None => Early::NotTried,
            Some(Ok(Some(c))) => Early::Merged(Box::new(c)),
            // Not prepared: `qemu-img commit` merges it, or it failed.
            Some(other) => match hold_disk_and_base(&v.disk) {
                Ok(files) => match other {
                    Ok(_) => Early::QemuImg(files),
                    Err(error) => Early::Failed { error, _held: Some(Box::new(files)) },
                },
                Err(e) => {
                    refused = Some(e.context(format!("volume {}", v.name)));
                    break;
                }
            },
        });
    }
    let stop = refused.is_some();
    let _ = prepared.send(refused);
    if stop {
        return req.volumes.iter().map(|_| Early::NotTried).collect();
    }
    req.volumes
        .iter()
        .zip(early)
        .map(|(v, e)| match e {
            Early::Merged(mut c) => {
                // A panic (a bug) of the merge leaves its locks held until
                // the backup ends, as a failure does: unwinding through
                // here would drop them while the copy still runs.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.run(ctl)));
                match run {
                    Ok(Ok(r)) => {
                        log::debug!("volume {}: merged into its base while copying: {r:?}", v.name);
                        Early::Merged(c)
                    }
                    Ok(Err(error)) => Early::Failed { error, _held: Some(c) },
                    Err(_) => Early::Failed {
                        error: KnibError::internal(format!("the merge of volume {} panicked", v.name)),
                        _held: Some(c),
                    },
                }
            }
            other => other,
        })
        .collect()
}

fn merge_after_backup(
    q: &QemuImg,
    v: &VolumeBackup,
    st: &DiskState,
    end_of_chain: bool,
    data_path: DataPath,
    early: Early,
    ctl: &Control,
) -> Result<()> {
    let base = base_path(&v.disk);
    if st.on_knib_base {
        // B <- P: fold P's writes into B; P stays, emptied.
        // The merge's own locks, when it still holds them.
        let merge: Option<Box<Commit>> = match early {
            // Merged while the backup was copied: only the emptying is left.
            Early::Merged(c) => {
                if !end_of_chain {
                    crate::crashpoint::durable_step(&format!("emptying {}", v.disk.display()));
                    c.empty_top()?;
                }
                Some(c)
            }
            Early::Failed { error, .. } => return Err(error),
            Early::QemuImg(held) => {
                drop(held);
                crate::crashpoint::durable_step(&format!("qemu-img commit of {}", v.disk.display()));
                q.commit(&v.disk, false, ctl)?;
                None
            }
            Early::NotTried => {
                crate::crashpoint::durable_step(&format!("commit of {}", v.disk.display()));
                native::commit(q, &v.disk, data_path, ctl)?;
                None
            }
        };
        if end_of_chain {
            // The disk stays held until its base replaces it (by the
            // merge's locks, or a reader's taken again once `qemu-img
            // commit` let go): a VM started on it in between wrote into
            // the file the rename then dropped. One started already is
            // refused here: the disk stays on its base, which holds it all.
            let _reading = match merge {
                Some(_) => None,
                None => Some(hold_disk_and_base(&v.disk)?),
            };
            fsio::commit_rename(&base, &v.disk)?;
        }
        drop(merge);
    } else if !end_of_chain {
        // P alone: P becomes the base, an empty overlay takes its name.
        let new = new_overlay_path(&v.disk);
        let base_name = base.file_name().expect("base has a file name").to_string_lossy().into_owned();
        if base.exists() {
            return Err(KnibError::invalid(format!(
                "volume {}: {} exists but {} does not run on it; move it away",
                v.name,
                base.display(),
                v.disk.display()
            )));
        }
        crate::crashpoint::durable_step(&format!("creation of {}", new.display()));
        // Made by knib following no link (whatever had the name goes
        // first), written by qemu-img through knib's descriptor, and left
        // in the disk's place only when it is the overlay: a link put
        // under its name would have become the VM's disk.
        let file = fsio::create_own_temp(&new)?;
        crate::crashpoint::pause_point(&format!("created {}", new.display()));
        q.create_overlay(&fsio::by_fd(&file), &base_name, "qcow2", Some(st.virtual_size), ctl)?;
        // `P` is never missing: the base is first a second name of `P`, then
        // the overlay replaces `P` in one rename ([`repair_volume`] undoes
        // the link after a crash). A file system without hard links gets a
        // rename, and a crash there leaves `P` missing until the next backup
        // (the overlay is durable first). Neither ever replaces an entry
        // at the base's name: one that appeared meanwhile fails the step.
        file.sync_all().map_err(|e| KnibError::io("cannot sync", &new, e))?;
        fsio::sync_dir(fsio::parent_dir(&new))?;
        crate::crashpoint::durable_step(&format!("link of {} as {}", v.disk.display(), base.display()));
        let mut renamed = false;
        match fs::hard_link(&v.disk, &base) {
            Ok(()) => {}
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK | libc::ENOSYS)) =>
            {
                log::debug!("cannot link {} as {} ({e}): renaming it", v.disk.display(), base.display());
                fsio::rename_noreplace(&v.disk, &base)?;
                renamed = true;
            }
            Err(e) => {
                let _ = fsio::remove_if_exists(&new);
                return Err(KnibError::io(&format!("cannot link {} as", v.disk.display()), &base, e));
            }
        }
        // An exchange: what is at the disk's name is put back when the
        // name `new` no longer led to the overlay. Where the disk was
        // renamed to its base (no hard links), the base takes its name
        // back: the disk is never left missing.
        if let Err(mut e) = fsio::commit_own_temp(&new, &file, &v.disk, true) {
            // (A failure past the rename, its directory's sync, left the
            // overlay in place: nothing to take back.)
            if renamed && fsio::require_same_file(&v.disk, &file).is_err() {
                match fsio::rename_noreplace(&base, &v.disk) {
                    Ok(()) => e.message.push_str(&format!("; {} is back in place", v.disk.display())),
                    Err(r) => e.message.push_str(&format!(
                        "; the disk's data is at {}, which could not take its name back: {r}",
                        base.display()
                    )),
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

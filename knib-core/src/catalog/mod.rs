//! The catalog: backup chains for standalone users (no CloudStack management
//! server), kept in a store directory.
//!
//! # Store layout and invariants
//!
//! ```text
//! STORE/vms/<vm>/.lock               fcntl record lock: one operation per VM at a time
//! STORE/vms/<vm>/state.json          the chain head as last recorded (a
//!                                    cache: see "chain head" below)
//! STORE/vms/<vm>/<id>/manifest.json  one manifest per backup (schema 1)
//! STORE/vms/<vm>/<id>/<volume>.qcow2 one file per volume
//! STORE/vms/<vm>/<id>/manifest.next.json  a compression being published
//!                                    (see `compress_commit`)
//! STORE/groups/<id>.json             a group backup's record (see `group`)
//! ```
//!
//! - A backup file's backing pointer is `../<parent id>/<volume>.qcow2`,
//!   relative to the file: the store can be moved or mounted elsewhere.
//! - A backup is written in `vms/<vm>/.<id>.part/` and becomes visible by one
//!   rename of that directory, after its files and manifest are fsynced.
//!   Leftover `.part` directories of a crash are removed by the next
//!   operation on the VM.
//! - Primary storage is merged only after the backup is published, so every
//!   write primary has merged is in a published backup.
//! - The chain head (the parent of the next incremental backup) is derived
//!   from what primary storage says each disk's delta follows (a domain's
//!   delta file carries the backup id in its name; a plain disk has a
//!   `<disk>.knib-since` marker, written after publishing and before its
//!   delta is emptied) and from the published manifests, never from
//!   `state.json` alone: a crash between publishing and recording a backup
//!   cannot make the next incremental skip its writes. When knib cannot tell
//!   what a delta follows, the backup is full and its manifest says why
//!   (`full_reason`). See the `head` module.
//! - A backup with children is never removed from disk: deleting it marks
//!   it removed, and it is expunged when its last child goes. Deleting the
//!   head makes the next backup a full one.
//! - Caller names (VM, volume, backup id) are checked by [`crate::names`].
//! - Everything read back from the store is untrusted (`confine`): the
//!   store's directories and files are opened without following any link
//!   below the root; manifests, `state.json`, journals, job files and
//!   `knib.json` refuse unknown and repeated keys; every name in them is a
//!   plain name; a manifest must sit at `vms/<its vm>/<its id>/`; and a
//!   backup file's qcow2 backing pointer must be exactly the
//!   `../<parent>/<file>` its manifest and its parent's say before any
//!   chain is read through it. A stray entry (a directory without a
//!   manifest, `lost+found`, a manifest that does not parse) is skipped
//!   with a warning by `list` and `delete`; `show` of it says `corrupt`.

mod backup;
#[cfg(feature = "libvirt")]
mod bitmap;
mod compress_commit;
pub(crate) mod confine;
pub(crate) mod delete;
mod discard;
pub mod group;
pub(crate) mod head;
pub mod jobs;
#[cfg(feature = "libvirt")]
pub mod journal_check;
#[cfg(feature = "libvirt")]
pub mod live;
#[cfg(feature = "libvirt")]
pub use live::disks_not_restored;
#[cfg(feature = "libvirt")]
pub(crate) use live::quick_restore_targets;
pub mod lock;
pub mod manifest;
mod pins;
mod restore;
pub mod settings;
mod store_file;
pub mod validate;
mod verify;
mod vm_settings;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use confine::Want;

use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::names;
use crate::qemu_img::QemuImg;

pub(crate) use backup::{check_disks, compressed_as_copied, refuse_check_direct, volume_entries};
pub use backup::{BackupOptions, DiskSpec};
#[cfg(feature = "libvirt")]
pub use bitmap::BitmapJournal;
pub(crate) use delete::chain_reads;
pub use delete::DeleteOutcome;
pub use discard::{DiscardOutcome, DiscardedJournal};
pub use lock::VmLock;
pub use manifest::{CompressionInfo, Manifest, VolumeEntry, MANIFEST_SCHEMA};
pub use verify::VerifyReport;
pub use vm_settings::{VmSettings, VM_SETTINGS_FILE};

/// The default number of backups per chain (`backup.chain.size`).
pub const DEFAULT_CHAIN_SIZE: i64 = 8;

/// Per-VM state: which backup primary's deltas are relative to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    schema: u32,
    head: Option<String>,
}

/// A store directory of backups.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    qemu_img: QemuImg,
}

/// Make a backup id: UTC time to the millisecond, then four hex digits
/// against collisions: a number drawn once per process (from its pid and
/// the time), plus a count of the ids it made. So the ids one process
/// makes in one millisecond (a group's members) differ, whatever the
/// clock's resolution (before, two could be equal on a coarse clock, and
/// one id then named two VMs' backups); two processes' differ but by a
/// chance of one in 65,536.
pub(crate) fn new_backup_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNT: AtomicU32 = AtomicU32::new(0);
    static BASE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let now = std::time::SystemTime::now();
    let base = *BASE.get_or_init(|| {
        let nanos = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        nanos ^ std::process::id().wrapping_mul(2654435761)
    });
    let t = manifest::rfc3339(now);
    let stamp: String = t.chars().filter(|c| c.is_ascii_digit()).collect();
    let salt = base.wrapping_add(COUNT.fetch_add(1, Ordering::Relaxed)) & 0xffff;
    format!("{}-{}-{salt:04x}", &stamp[..8], &stamp[8..17])
}

/// Whether a store location names a vault (`s3://...`) rather than a
/// directory.
pub fn is_vault(location: &str) -> bool {
    location.starts_with("s3://")
}

/// The operations a vault takes, as the errors that refuse one say.
pub const VAULT_TAKES: &str = "sync, list, show, restore (quick restore by the CLI), verify, delete and files";

/// A store path that names something other than a directory.
fn not_a_directory(root: &Path) -> KnibError {
    KnibError::invalid(format!("store {} is not a directory", root.display()))
}

/// `e`, an error met in the store at `root`, unless `root` names something
/// other than a directory (a file, a FIFO, a device): then that is the
/// error, said plainly as invalid input.
fn or_not_a_directory(root: &Path, e: KnibError) -> KnibError {
    match fs::metadata(root) {
        Ok(m) if !m.is_dir() => not_a_directory(root),
        _ => e,
    }
}

/// A vault (`s3://...`) where a store directory is needed: said plainly.
fn refuse_vault(root: &Path) -> Result<()> {
    match root.to_str() {
        Some(s) if is_vault(s) => Err(KnibError::invalid(format!(
            "{s} is a vault: backups are taken, compressed and hashed in a store directory; a vault takes {VAULT_TAKES}"
        ))),
        _ => Ok(()),
    }
}

/// The store's root as an absolute path without `.` or `..`: the paths a
/// backup records (its journal's) are checked to be absolute and plain,
/// and must not depend on the directory a later `recover` runs in (a
/// backup killed in a store given as `st` could not be recovered). A plain
/// absolute path is kept as given; another is resolved through the file
/// system (its parent's, when it does not exist yet), or by its
/// components when neither exists.
fn absolute_root(root: PathBuf) -> Result<PathBuf> {
    use std::path::Component;
    let plain =
        |p: &Path| p.is_absolute() && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if plain(&root) {
        return Ok(root);
    }
    if let Ok(c) = fs::canonicalize(&root) {
        return Ok(c);
    }
    if let (Some(parent), Some(name)) = (root.parent(), root.file_name()) {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        if let Ok(c) = fs::canonicalize(parent) {
            return Ok(c.join(name));
        }
    }
    let abs = std::path::absolute(&root).map_err(|e| KnibError::io("cannot resolve the store path", &root, e))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

impl Store {
    /// A store at `root` that need not exist yet: nothing is made on disk
    /// here. Its directories are made when a backup has passed every check
    /// and takes its VM's lock ([`Store::lock_vm`]), so a refused command
    /// leaves no trace.
    pub fn create(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        refuse_vault(&root)?;
        Ok(Store { root: absolute_root(root)?, qemu_img: QemuImg::new() })
    }

    /// Open an existing store: a directory holding what knib writes there
    /// (its `vms`, `jobs` or `groups` directory, or its settings file).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        refuse_vault(&root)?;
        let root = absolute_root(root)?;
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(not_a_directory(&root)),
            Err(_) => return Err(KnibError::not_found(format!("store {} does not exist", root.display()))),
        }
        if !["vms", "jobs", "groups", settings::SETTINGS_FILE].iter().any(|n| root.join(n).exists()) {
            return Err(KnibError::not_found(format!(
                "{} is not a knib store (it holds no vms/, jobs/, groups/ or {})",
                root.display(),
                settings::SETTINGS_FILE
            )));
        }
        Ok(Store { root, qemu_img: QemuImg::new() })
    }

    /// Make the store's directory if need be, then its directory `rel`
    /// (see [`confine::ensure_dir`]; `what` names it in errors). A store
    /// path that is not a directory is InvalidInput, named.
    pub(crate) fn ensure_dir(&self, rel: &Path, what: &str) -> Result<()> {
        fs::create_dir_all(&self.root)
            .map_err(|e| or_not_a_directory(&self.root, KnibError::io("cannot create store", &self.root, e)))?;
        confine::ensure_dir(&self.root, rel, what)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The qemu-img runner used.
    pub fn qemu_img(&self) -> &QemuImg {
        &self.qemu_img
    }

    /// The directory of `vm` (`vms/<vm>/`, made by [`Store::lock_vm`]),
    /// where an operation that holds the VM's lock keeps its work in
    /// progress: a backup's `.<id>.part/`, a direct backup's spool files.
    pub(crate) fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    /// `vm_dir` relative to the root, for [`confine`].
    fn vm_rel(vm: &str) -> PathBuf {
        Path::new("vms").join(vm)
    }

    /// The manifest of backup `id` of `vm` as its files are: while a
    /// compression of it is being published (or was, when a crash stopped
    /// it), each volume as its file is ([`compress_commit`]).
    fn load_manifest(&self, vm: &str, id: &str) -> Result<Manifest> {
        let m = self.read_manifest(vm, id)?;
        match self.pending_view(m) {
            // A reader without the lock may look at the files after the
            // compression was finished and a later operation changed them:
            // its next manifest gone, the backup is read again.
            Err(e)
                if matches!(e.kind, ErrorKind::Corrupt | ErrorKind::InvalidInput)
                    && fs::symlink_metadata(self.vm_dir(vm).join(id).join(manifest::NEXT_MANIFEST)).is_err() =>
            {
                self.pending_view(self.read_manifest(vm, id)?)
            }
            r => r,
        }
    }

    /// The manifest of backup `id` of `vm`, read without following links;
    /// it must name that VM and id (else someone moved it there).
    fn read_manifest(&self, vm: &str, id: &str) -> Result<Manifest> {
        names::validate("backup id", id)?;
        let rel = Self::vm_rel(vm).join(id).join("manifest.json");
        let path = self.root.join(&rel);
        let text = confine::read(&self.root, &rel, "manifest")?
            .ok_or_else(|| KnibError::not_found(format!("manifest {} does not exist", path.display())))?;
        let m = Manifest::parse(&text, &path)?;
        if m.vm != vm || m.id != id {
            return Err(KnibError::corrupt(format!(
                "manifest {} is the manifest of backup {} of VM {}, not of {id} of {vm}",
                path.display(),
                m.id,
                m.vm
            )));
        }
        Ok(m)
    }

    /// The directory of a backup.
    pub fn backup_dir(&self, m: &Manifest) -> PathBuf {
        self.vm_dir(&m.vm).join(&m.id)
    }

    /// The file of volume `volume` of backup `m`.
    pub fn volume_file(&self, m: &Manifest, volume: &str) -> Result<PathBuf> {
        Ok(self.backup_dir(m).join(&m.volume(volume)?.file))
    }

    /// Take the lock of `vm` for `operation`; fails at once with "busy".
    /// Taken, it first removes what crashes left half-written and finishes
    /// every compression interrupted while it replaced a backup's files.
    pub fn lock_vm(&self, vm: &str, operation: &str) -> Result<VmLock> {
        let lock = self.lock_vm_unfinished(vm, operation)?;
        self.finish_compressions(vm)?;
        Ok(lock)
    }

    /// [`Store::lock_vm`] but for the interrupted compressions, which are
    /// left as they are: for `recover --discard`, which sets aside those
    /// that cannot be finished. What crashes left half-written is removed.
    pub(crate) fn lock_vm_unfinished(&self, vm: &str, operation: &str) -> Result<VmLock> {
        names::validate("VM name", vm)?;
        let dir = self.vm_dir(vm);
        self.ensure_dir(&Self::vm_rel(vm), "VM directory")?;
        let lock = VmLock::acquire(&dir.join(".lock"), vm, operation)?;
        self.sweep_partials(vm)?;
        Ok(lock)
    }

    /// Remove what a crash left half-written (under the VM's lock).
    fn sweep_partials(&self, vm: &str) -> Result<()> {
        let dir = self.vm_dir(vm);
        for e in fs::read_dir(&dir).map_err(|e| KnibError::io("cannot list", &dir, e))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && (n.ends_with(".part") || n.ends_with(".deleting")) {
                log::warn!("removing {} left by an interrupted operation", e.path().display());
                let p = e.path();
                crate::crashpoint::durable_step(&format!("removal of {}", p.display()));
                // A link is removed itself, never what it points to.
                fsio::remove_entry(&p)?;
            }
        }
        Ok(())
    }

    fn load_state(&self, vm: &str) -> Result<VmState> {
        let p = self.vm_dir(vm).join("state.json");
        let Some(t) = confine::read(&self.root, &Self::vm_rel(vm).join("state.json"), "state file")? else {
            return Ok(VmState { schema: 1, head: None });
        };
        let st: VmState = crate::json::from_slice(&t)
            .map_err(|e| KnibError::corrupt(format!("state file {} is corrupted: {e}", p.display())))?;
        if let Some(h) = &st.head {
            names::validate("backup id", h)
                .map_err(|e| KnibError::corrupt(format!("state file {}: field `head`: {}", p.display(), e.message)))?;
        }
        Ok(st)
    }

    fn save_state(&self, vm: &str, st: &VmState) -> Result<()> {
        let p = self.vm_dir(vm).join("state.json");
        fsio::write_atomic(&p, &serde_json::to_vec_pretty(st).expect("state serializes"))
    }

    /// Every VM with a directory in the store.
    pub fn vms(&self) -> Result<Vec<String>> {
        let dir = self.root.join("vms");
        let mut out = Vec::new();
        if !dir.is_dir() {
            return Ok(out);
        }
        for e in fs::read_dir(&dir).map_err(|e| KnibError::io("cannot list", &dir, e))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let real_dir = e.file_type().is_ok_and(|t| t.is_dir());
            match names::validate("VM name", &n) {
                Ok(()) if real_dir => out.push(n),
                Ok(()) => log::warn!("skipping {}: not a directory (a VM's entry must be one)", e.path().display()),
                Err(_) => log::warn!("skipping {}: not a VM of this store", e.path().display()),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every backup of `vm` (removed ones too), oldest first. Stray entries
    /// are skipped with a warning (see [`Store::scan_backups`]).
    pub fn manifests(&self, vm: &str) -> Result<Vec<Manifest>> {
        Ok(self.scan_backups(vm)?.0)
    }

    /// Every backup of `vm`, oldest first, and the names of the entries
    /// that look like backups but whose manifest cannot be read or is
    /// missing while the directory holds files (they may be backups: a
    /// delete must not take their parent away). Other stray entries (an
    /// empty directory, `lost+found`, a file or a link where a backup
    /// directory would be) are skipped; each skip is logged as a warning.
    pub fn scan_backups(&self, vm: &str) -> Result<(Vec<Manifest>, Vec<String>)> {
        names::validate("VM name", vm)?;
        let dir = self.vm_dir(vm);
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        match confine::check(&self.root, &Self::vm_rel(vm), Want::Dir, "VM directory") {
            Err(e) if e.kind == ErrorKind::NotFound => return Ok((out, unreadable)),
            r => r?,
        }
        for e in fs::read_dir(&dir).map_err(|e| KnibError::io("cannot list", &dir, e))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let real_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if n.starts_with('.') || (!real_dir && matches!(n.as_str(), "state.json" | "journal.json")) {
                continue;
            }
            if !real_dir || names::validate("backup id", &n).is_err() {
                log::warn!("skipping {}: not a backup of this store", e.path().display());
                continue;
            }
            match self.load_manifest(vm, &n) {
                Ok(m) => out.push(m),
                // An empty one is no backup; one that holds files may be
                // (its manifest lost): a delete must not take its parent.
                Err(err) if err.kind == ErrorKind::NotFound => match fs::read_dir(e.path())
                    .map(|mut d| d.next().is_none())
                {
                    Ok(true) => {
                        log::warn!("skipping {}: an empty directory without a manifest", e.path().display());
                    }
                    // Gone meanwhile (a delete renamed it away).
                    Err(x) if matches!(x.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {}
                    // Holding files, or not to be looked into: may be one.
                    Ok(false) => {
                        log::warn!("skipping {}: {err}; it holds files, and may be a backup", e.path().display());
                        unreadable.push(n);
                    }
                    Err(x) => {
                        log::warn!(
                            "skipping {}: {err}; it cannot be listed ({x}), and may be a backup",
                            e.path().display()
                        );
                        unreadable.push(n);
                    }
                },
                Err(err) => {
                    log::warn!("skipping {}: {err}", e.path().display());
                    unreadable.push(n);
                }
            }
        }
        out.sort_by(|a, b| (a.created.as_str(), a.id.as_str()).cmp(&(b.created.as_str(), b.id.as_str())));
        Ok((out, unreadable))
    }

    /// Backups of one VM, or of all, oldest first; removed backups are left
    /// out.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<Manifest>> {
        let vms = match vm {
            Some(v) => vec![v.to_string()],
            None => self.vms()?,
        };
        let mut out = Vec::new();
        for v in vms {
            out.extend(self.manifests(&v)?.into_iter().filter(|m| !m.removed));
        }
        Ok(out)
    }

    /// The manifest of backup `id` (removed backups included). An id is
    /// one backup's: found under two VMs (somebody copied a backup under
    /// another VM's name, perhaps to be restored or deleted in its place),
    /// it is a `corrupt` error naming them, never the first one found.
    pub fn find(&self, id: &str) -> Result<Manifest> {
        names::validate("backup id", id)?;
        let mut found: Option<Manifest> = None;
        for vm in self.vms()? {
            match self.load_manifest(&vm, id) {
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
                Ok(m) => {
                    if let Some(first) = &found {
                        return Err(KnibError::corrupt(format!(
                            "backup {id} is in store {} under two VMs, {} and {vm}: an id names one backup, so one of them was copied there; remove the copy",
                            self.root.display(),
                            first.vm
                        )));
                    }
                    found = Some(m);
                }
            }
        }
        found
            .ok_or_else(|| KnibError::not_found(format!("backup {id} does not exist in store {}", self.root.display())))
    }

    /// The manifest of a backup that was not deleted.
    pub fn show(&self, id: &str) -> Result<Manifest> {
        let m = self.find(id)?;
        if m.removed {
            return Err(KnibError::not_found(format!(
                "backup {id} was deleted (its files stay until the backups that depend on it are deleted)"
            )));
        }
        Ok(m)
    }

    /// The chain of `m`, root first, ending with `m`.
    pub fn chain(&self, m: &Manifest) -> Result<Vec<Manifest>> {
        let mut chain = vec![m.clone()];
        let mut cur = m.clone();
        while let Some(p) = cur.parent.clone() {
            if chain.iter().any(|c| c.id == p) {
                return Err(KnibError::corrupt(format!("backup {} has a parent loop (through {p})", m.id)));
            }
            let pm =
                self.load_manifest(&m.vm, &p).map_err(|e| e.context(format!("parent {p} of backup {}", cur.id)))?;
            chain.push(pm.clone());
            cur = pm;
        }
        chain.reverse();
        Ok(chain)
    }

    /// A new backup id ([`new_backup_id`]) that no VM of this store has
    /// yet, as a backup or one being written (an id names one backup:
    /// [`Store::find`] refuses one found under two VMs). It does not close
    /// the race of two hosts sharing the store that draw the same id in
    /// the same millisecond (one chance in 65,536) and both find it free:
    /// each creates its backup later.
    pub(crate) fn fresh_backup_id(&self) -> Result<String> {
        self.fresh_backup_id_from(new_backup_id)
    }

    /// [`Store::fresh_backup_id`], the ids drawn from `next`.
    fn fresh_backup_id_from(&self, mut next: impl FnMut() -> String) -> Result<String> {
        let vms = self.vms()?;
        let mut id = next();
        while vms.iter().any(|vm| {
            let dir = self.vm_dir(vm);
            dir.join(&id).symlink_metadata().is_ok() || dir.join(format!(".{id}.part")).symlink_metadata().is_ok()
        }) {
            log::info!("backup id {id} is taken in store {} already; drawing another", self.root.display());
            id = next();
        }
        Ok(id)
    }

    /// Open `path`, a file of this store as [`Store::chain_files`] names
    /// it, for reading as the chain's check did: no link below the root, a
    /// regular file (a FIFO is refused at once). A file swapped for a link
    /// since the check is refused, not followed out of the store.
    pub(crate) fn open_file(&self, path: &Path, what: &str) -> Result<fs::File> {
        let rel = path.strip_prefix(&self.root).map_err(|_| {
            KnibError::internal(format!("{what} {} is not in store {}", path.display(), self.root.display()))
        })?;
        confine::open(&self.root, rel, Want::File, what)
    }

    /// Files of volume `volume` of `m`'s chain, root first; each must exist
    /// as a regular file of the store (no link on the way), and its qcow2
    /// backing pointer must be exactly what the manifests say
    /// (`../<parent>/<parent's file>`, none for the root), so that a reader
    /// following the pointers stays inside the chain.
    pub fn chain_files(&self, m: &Manifest, volume: &str) -> Result<Vec<PathBuf>> {
        // The backup asked for names the volume (else the error would name
        // the first backup of its chain).
        m.volume(volume)?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut below: Option<(String, String)> = None;
        for b in self.chain(m)? {
            let v = b.volume(volume)?;
            let rel = Self::vm_rel(&b.vm).join(&b.id).join(&v.file);
            let f = self.root.join(&rel);
            let file = confine::open(&self.root, &rel, Want::File, "backup file").map_err(|e| {
                if e.kind == ErrorKind::NotFound {
                    KnibError::not_found(format!(
                        "backup {}: file {} of volume {volume} is missing from the store",
                        b.id,
                        f.display()
                    ))
                } else {
                    e
                }
            })?;
            let want = below.as_ref().map(|(id, file)| format!("../{id}/{file}"));
            if v.backing != want {
                return Err(KnibError::corrupt(format!(
                    "manifest of backup {}: volume {volume} has backing {:?}, but its parent's file is {:?}",
                    b.id, v.backing, want
                )));
            }
            store_file::require_qcow2_magic(
                &file,
                &f,
                &format!("backup {}: file {} of volume {volume}", b.id, f.display()),
            )?;
            let header = backing_pointer(&file, &f)?;
            if header != want {
                return Err(KnibError::corrupt(format!(
                    "backup file {}: its qcow2 backing pointer is {header:?}, the manifest says {want:?}; \
                     knib reads no chain the manifests do not describe",
                    f.display()
                )));
            }
            below = Some((b.id.clone(), v.file.clone()));
            files.push(f);
        }
        Ok(files)
    }
}

/// The backing file name in the qcow2 header of `file` (opened, confined,
/// as `path`), read with knib's own header parser.
fn backing_pointer(file: &fs::File, path: &Path) -> Result<Option<String>> {
    let h = crate::qcow2::read_header(file, path).map_err(|e| {
        if e.kind == ErrorKind::Io {
            return e;
        }
        // A file of the store that knib cannot read as its own is damaged.
        KnibError::corrupt(format!("backup file {}: {}", path.display(), e.message))
    })?;
    Ok(h.backing_file)
}

#[cfg(test)]
mod id_tests {
    /// The ids one process makes in a row differ (20,000 of them, most in
    /// the same milliseconds; the old salt, the clock's nanoseconds, gave
    /// equal ones about every 65 µs), and each is a plain name.
    #[test]
    fn ids_made_in_a_row_differ() {
        let ids: Vec<String> = (0..20_000).map(|_| super::new_backup_id()).collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            crate::names::validate("backup id", id).unwrap();
        }
    }

    /// A new backup's id is none a VM of the store has, as a backup or as
    /// one being written (another host may have drawn it).
    #[test]
    fn a_fresh_id_is_not_taken_by_any_vm() {
        let d = tempfile::tempdir().unwrap();
        let store = super::Store::create(d.path()).unwrap();
        std::fs::create_dir_all(store.vm_dir("vm0").join("20260101-000000000-0001")).unwrap();
        std::fs::create_dir_all(store.vm_dir("vm1").join(".20260101-000000000-0002.part")).unwrap();
        let mut drawn = ["20260101-000000000-0001", "20260101-000000000-0002", "20260101-000000000-0003"].into_iter();
        let id = store.fresh_backup_id_from(|| drawn.next().unwrap().to_string()).unwrap();
        assert_eq!(id, "20260101-000000000-0003");
    }
}

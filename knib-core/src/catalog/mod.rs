//! The catalog: backup chains for standalone users (no CloudStack management
//! server), kept in a store directory.
//!
//! # Store layout and invariants
//!
//! ```text
//! STORE/vms/<vm>/.lock               flock: one operation per VM at a time
//! STORE/vms/<vm>/state.json          the chain head as last recorded (a
//!                                    cache: see "chain head" below)
//! STORE/vms/<vm>/<id>/manifest.json  one manifest per backup (schema 1)
//! STORE/vms/<vm>/<id>/<volume>.qcow2 one file per volume
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
//! - Everything read back from the store is untrusted ([`confine`]): the
//!   store's directories and files are opened without following any link
//!   below the root; manifests, `state.json`, journals, job files and
//!   `knib.json` refuse unknown and repeated keys; every name in them is a
//!   plain name; a manifest must sit at `vms/<its vm>/<its id>/`; and a
//!   backup file's qcow2 backing pointer must be exactly the
//!   `../<parent>/<file>` its manifest and its parent's say before any
//!   chain is read through it. A stray entry (a directory without a
//!   manifest, `lost+found`, a manifest that does not parse) is skipped
//!   with a warning by `list` and `delete`; `show` of it says `corrupt`.

pub(crate) mod confine;
mod head;
pub mod jobs;
#[cfg(feature = "libvirt")]
pub mod journal_check;
#[cfg(feature = "libvirt")]
pub mod live;
pub mod lock;
pub mod manifest;
pub mod settings;
mod store_file;
pub mod validate;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use confine::Want;

use crate::engine::{self, BackupKind, CompressOptions, TakeBackupRequest, VolumeBackup};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::names;
use crate::progress::Control;
use crate::qemu_img::{CompressionLibrary, ImageFormat, QemuImg};

pub use lock::VmLock;
pub use manifest::{CompressionInfo, Manifest, VolumeEntry, MANIFEST_SCHEMA};

/// The default number of backups per chain (`backup.chain.size`).
pub const DEFAULT_CHAIN_SIZE: i64 = 8;

/// How to take a backup through the catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupOptions {
    /// Take a full backup even when an incremental one is possible.
    pub full: bool,
    /// Take an isolated backup: full, outside any chain, primary untouched.
    pub isolated: bool,
    /// Backups per chain: 1 = always full, less than 1 = unlimited.
    pub chain_size: i64,
    /// Compress the backup's files as they are copied (one pass over the
    /// data, instead of a copy now and a compression job later).
    pub compress: Option<CompressionLibrary>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions { full: false, isolated: false, chain_size: DEFAULT_CHAIN_SIZE, compress: None }
    }
}

/// A disk of a VM to back up.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The volume's name in the backup.
    pub name: String,
    /// The disk's qcow2 file.
    pub path: PathBuf,
}

/// The compression record of a backup whose files were compressed as they
/// were copied: the original size is the guest data copied (or the file
/// size where the copy did not count it).
pub(crate) fn compressed_as_copied(vols: &[engine::VolumeResult]) -> Option<CompressionInfo> {
    let library = vols.iter().find_map(|v| v.compression)?;
    Some(CompressionInfo {
        library,
        original_size: vols.iter().map(|v| v.data_bytes.unwrap_or(v.size)).sum(),
        size: vols.iter().map(|v| v.size).sum(),
    })
}

/// Per-VM state: which backup primary's deltas are relative to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    schema: u32,
    head: Option<String>,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeleteOutcome {
    /// Backups whose files were removed.
    pub expunged: Vec<String>,
    /// Backups kept on disk, marked removed, because later backups need them.
    pub marked_removed: Vec<String>,
}

/// The result of verifying one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VerifyReport {
    /// The backup.
    pub id: String,
    /// Whether every check passed.
    pub ok: bool,
    /// What failed, one line each.
    pub problems: Vec<String>,
    /// Files checked.
    pub files_checked: usize,
    /// The xxh3-128 of the backup's chain (files root first), per volume.
    pub chain_hashes: BTreeMap<String, String>,
}

/// A store directory of backups.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    qemu_img: QemuImg,
}

/// Make a backup id: UTC time, then a few hex digits against collisions.
pub(crate) fn new_backup_id() -> String {
    let now = std::time::SystemTime::now();
    let t = manifest::rfc3339(now);
    let stamp: String = t.chars().filter(|c| c.is_ascii_digit()).collect();
    let nanos = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let salt = (nanos ^ std::process::id().wrapping_mul(2654435761)) & 0xffff;
    format!("{}-{}-{salt:04x}", &stamp[..8], &stamp[8..17])
}

impl Store {
    /// A store at `root` that need not exist yet: nothing is made on disk
    /// here. Its directories are made when a backup has passed every check
    /// and takes its VM's lock ([`Store::lock_vm`]), so a refused command
    /// leaves no trace.
    pub fn create(root: impl Into<PathBuf>) -> Result<Store> {
        Ok(Store { root: root.into(), qemu_img: QemuImg::new() })
    }

    /// Open an existing store.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        if !root.is_dir() {
            return Err(KnibError::not_found(format!("store {} does not exist", root.display())));
        }
        Ok(Store { root, qemu_img: QemuImg::new() })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The qemu-img runner used.
    pub fn qemu_img(&self) -> &QemuImg {
        &self.qemu_img
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    /// `vm_dir` relative to the root, for [`confine`].
    fn vm_rel(vm: &str) -> PathBuf {
        Path::new("vms").join(vm)
    }

    /// The manifest of backup `id` of `vm`, read without following links;
    /// it must name that VM and id (else someone moved it there).
    fn load_manifest(&self, vm: &str, id: &str) -> Result<Manifest> {
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
    pub fn lock_vm(&self, vm: &str, operation: &str) -> Result<VmLock> {
        names::validate("VM name", vm)?;
        let dir = self.vm_dir(vm);
        fs::create_dir_all(&self.root).map_err(|e| KnibError::io("cannot create store", &self.root, e))?;
        confine::ensure_dir(&self.root, &Self::vm_rel(vm), "VM directory")?;
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
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&p).map_err(|e| KnibError::io("cannot remove", &p, e))?;
                } else {
                    fsio::remove_if_exists(&p)?;
                }
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
            names::validate("backup id", h).map_err(|e| {
                KnibError::corrupt(format!("state file {}: field `head`: {}", p.display(), e.message))
            })?;
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
    /// that look like backups but whose manifest cannot be read (they may
    /// be backups: a delete must not take their parent away). Other stray
    /// entries (a directory without a manifest, `lost+found`, a file or a
    /// link where a backup directory would be) are skipped; each skip is
    /// logged as a warning.
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
                Err(err) if err.kind == ErrorKind::NotFound => {
                    log::warn!("skipping {}: a directory without a manifest", e.path().display());
                }
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

    /// The manifest of backup `id` (removed backups included).
    pub fn find(&self, id: &str) -> Result<Manifest> {
        names::validate("backup id", id)?;
        for vm in self.vms()? {
            match self.load_manifest(&vm, id) {
                Err(e) if e.kind == ErrorKind::NotFound => {}
                r => return r,
            }
        }
        Err(KnibError::not_found(format!("backup {id} does not exist in store {}", self.root.display())))
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
            let pm = self.load_manifest(&m.vm, &p).map_err(|e| e.context(format!("parent {p} of backup {}", cur.id)))?;
            chain.push(pm.clone());
            cur = pm;
        }
        chain.reverse();
        Ok(chain)
    }

    /// Files of volume `volume` of `m`'s chain, root first; each must exist
    /// as a regular file of the store (no link on the way), and its qcow2
    /// backing pointer must be exactly what the manifests say
    /// (`../<parent>/<parent's file>`, none for the root), so that a reader
    /// following the pointers stays inside the chain.
    pub fn chain_files(&self, m: &Manifest, volume: &str) -> Result<Vec<PathBuf>> {
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
            store_file::require_qcow2_magic(&f, &format!("backup {}: file {} of volume {volume}", b.id, f.display()))?;
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

    /// Take a backup of `vm`'s disks (plain qcow2 files of a stopped VM).
    /// Full or incremental is decided from the chain and `opts`.
    pub fn backup(&self, vm: &str, disks: &[DiskSpec], opts: &BackupOptions, ctl: &Control) -> Result<Manifest> {
        names::validate("VM name", vm)?;
        if disks.is_empty() {
            return Err(KnibError::invalid("a backup needs at least one --disk NAME=PATH"));
        }
        for (i, d) in disks.iter().enumerate() {
            names::validate("volume name", &d.name)?;
            if disks[..i].iter().any(|o| o.name == d.name) {
                return Err(KnibError::invalid(format!("volume name {:?} is given twice", d.name)));
            }
        }
        let q = &self.qemu_img;
        // Check every disk before anything is written to the store. A disk
        // whose file is missing beside its base was interrupted while it got
        // that base; the engine finishes that, and it then runs on the base.
        let mut on_base = Vec::new();
        for d in disks {
            if d.path.exists() {
                let st = engine::take::inspect_disk(q, &d.name, &d.path, ctl)?;
                on_base.push((d.name.clone(), d.path.clone(), st.on_knib_base));
            } else if engine::take::base_path(&d.path).exists() {
                on_base.push((d.name.clone(), d.path.clone(), true));
            } else {
                return Err(KnibError::not_found(format!("disk {}: {} does not exist", d.name, d.path.display())));
            }
        }
        let _lock = self.lock_vm(vm, &format!("backup of {vm}"))?;

        let sources: Vec<(String, PathBuf)> = disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
        let follows = head::follows_of_plain_disks(&on_base);
        let head::Decision { kind, parent, position, end_of_chain, full_reason } =
            self.decide(vm, &sources, opts, &follows)?;

        let id = new_backup_id();
        let part = self.vm_dir(vm).join(format!(".{id}.part"));
        crate::crashpoint::durable_step(&format!("creation of {}", part.display()));
        fs::create_dir(&part).map_err(|e| KnibError::io("cannot create", &part, e))?;
        let req = TakeBackupRequest {
            volumes: disks
                .iter()
                .map(|d| VolumeBackup {
                    name: d.name.clone(),
                    disk: d.path.clone(),
                    dest: part.join(format!("{}.qcow2", d.name)),
                    parent: parent.as_ref().map(|p| format!("../{}/{}.qcow2", p.id, d.name)),
                })
                .collect(),
            kind,
            end_of_chain,
            data_path: settings::Settings::load(&self.root)?.data_path,
            compress: opts.compress,
        };
        let mut manifest = Manifest::new(&id, vm, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        manifest.full_reason = full_reason;
        let final_dir = self.vm_dir(vm).join(&id);
        let result = engine::take::take_backup_with(q, &req, ctl, &mut |vols| {
            manifest.volumes = vols
                .iter()
                .map(|v| VolumeEntry {
                    name: v.name.clone(),
                    file: format!("{}.qcow2", v.name),
                    virtual_size: v.virtual_size,
                    size: v.size,
                    source: disks
                        .iter()
                        .find(|d| d.name == v.name)
                        .map(|d| d.path.display().to_string())
                        .unwrap_or_default(),
                    backing: parent.as_ref().map(|p| format!("../{}/{}.qcow2", p.id, v.name)),
                    hash: v.hash.clone(),
                })
                .collect();
            manifest.compression = compressed_as_copied(vols);
            self.publish(&manifest, &part)?;
            // Before any delta is emptied or created for this backup, record
            // beside each disk that its delta follows it (see `head`).
            if kind != BackupKind::Isolated {
                for d in disks {
                    engine::take::write_since_marker(&d.path, &id)?;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            if !final_dir.exists() {
                let _ = fs::remove_dir_all(&part);
            }
            return Err(e);
        }
        Ok(manifest)
    }

    /// Make a backup written in `part` visible: its manifest is written,
    /// the directory renamed to the backup's id and made durable, and (for
    /// a backup of a chain) the VM's head moved to it.
    fn publish(&self, m: &Manifest, part: &Path) -> Result<()> {
        m.save(&part.join("manifest.json"))?;
        let final_dir = self.backup_dir(m);
        crate::crashpoint::durable_step(&format!("publishing {}", final_dir.display()));
        fs::rename(part, &final_dir).map_err(|e| KnibError::io("cannot publish", &final_dir, e))?;
        fsio::sync_dir(&self.vm_dir(&m.vm))?;
        if m.kind != BackupKind::Isolated {
            self.save_state(&m.vm, &VmState { schema: 1, head: Some(m.id.clone()) })?;
        }
        Ok(())
    }

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
    pub fn restore_with(
        &self,
        id: &str,
        volume: &str,
        to: &Path,
        format: ImageFormat,
        verify: bool,
        ctl: &Control,
    ) -> Result<()> {
        let m = self.show(id)?;
        let files = self.chain_files(&m, volume)?;
        let top = files.last().expect("a chain has at least one file").clone();
        let expected = if verify { self.expected_hashes(&m, volume, &files)? } else { Vec::new() };
        engine::restore_verified(
            &self.qemu_img,
            &engine::RestoreRequest {
                backup_file: top,
                dest: to.to_path_buf(),
                format,
                overwrite: false,
                data_path: settings::Settings::load(&self.root)?.data_path,
            },
            &expected,
            ctl,
        )
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
    /// `to`.
    pub fn quick_restore_overlay(&self, id: &str, volume: &str, to: &Path, ctl: &Control) -> Result<()> {
        let m = self.show(id)?;
        let files = self.chain_files(&m, volume)?;
        engine::create_overlay(&self.qemu_img, files.last().expect("non-empty chain"), to, ctl)
    }

    /// A "busy" error when a validation job of backup `id` is running (it
    /// reads the files that a compression or a delete would replace).
    fn refuse_while_validated(&self, id: &str) -> Result<()> {
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
            let r = self.qemu_img.check(f, ctl)?;
            if r.corruptions > 0 || r.check_errors > 0 {
                return Err(KnibError::corrupt(format!(
                    "backup file {} is damaged: qemu-img check found {} corruptions, {} leaks, {} errors",
                    f.display(),
                    r.corruptions,
                    r.leaks,
                    r.check_errors
                )));
            }
        }
        let opts = &CompressOptions { data_path: settings::Settings::load(&self.root)?.data_path, ..opts.clone() };
        let done = engine::compress_verified(&self.qemu_img, &files, &expected, opts, ctl)?;
        engine::finalize(&files, true)?;
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
        m.save(&self.backup_dir(&m).join("manifest.json"))?;
        Ok(m)
    }

    /// Verify one backup, or every backup of the store: `qemu-img check` of
    /// its files, backing pointers and sizes as the manifest says, the whole
    /// chain present, and each file's hash (recorded when the backup was
    /// written or at the first clean verify, compared afterwards).
    pub fn verify(&self, id: Option<&str>, ctl: &Control) -> Result<Vec<VerifyReport>> {
        let targets = match id {
            Some(id) => vec![self.show(id)?],
            None => self.list(None)?,
        };
        let mut out = Vec::new();
        for m in targets {
            out.push(self.verify_one(&m, ctl)?);
        }
        Ok(out)
    }

    /// Verify one backup. The checks run without the VM's lock (a backup
    /// of the VM may go on meanwhile); when they find a problem, they are
    /// run again under the lock, on the manifest as it is then, so that a
    /// compression that replaced a file between the manifest's read and the
    /// file's (its manifest is saved after its files, under the lock) is
    /// never reported as a changed hash. Hashes are recorded under the lock.
    fn verify_one(&self, m: &Manifest, ctl: &Control) -> Result<VerifyReport> {
        let (report, new_hashes) = self.check_backup(m, ctl)?;
        if report.ok && new_hashes.is_empty() {
            return Ok(report);
        }
        let _lock = self.wait_for_vm(&m.vm, &format!("verify of {}", m.id), ctl)?;
        let (report, new_hashes, m) = if report.ok {
            (report, new_hashes, m.clone())
        } else {
            match self.find(&m.id) {
                Ok(fresh) if !fresh.removed => {
                    let (r, h) = self.check_backup(&fresh, ctl)?;
                    (r, h, fresh)
                }
                // Deleted meanwhile: what was found stands.
                _ => return Ok(report),
            }
        };
        if report.ok && !new_hashes.is_empty() {
            let mut fresh = self.find(&m.id)?;
            if fresh.compression == m.compression {
                for (name, h) in new_hashes {
                    if let Some(v) = fresh.volumes.iter_mut().find(|v| v.name == name) {
                        v.hash = Some(h);
                    }
                }
                fresh.save(&self.backup_dir(&fresh).join("manifest.json"))?;
            }
        }
        Ok(report)
    }

    /// Take the lock of `vm`, waiting (up to ten minutes, as `ctl` allows)
    /// while another operation holds it.
    fn wait_for_vm(&self, vm: &str, operation: &str, ctl: &Control) -> Result<VmLock> {
        let start = std::time::Instant::now();
        loop {
            match self.lock_vm(vm, operation) {
                Err(e) if e.kind == ErrorKind::Busy && start.elapsed() < std::time::Duration::from_secs(600) => {
                    ctl.check(operation)?;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    /// The checks of [`Store::verify`] on `m` as read, and the hashes to
    /// record (volumes without one).
    fn check_backup(&self, m: &Manifest, ctl: &Control) -> Result<(VerifyReport, Vec<(String, String)>)> {
        let q = &self.qemu_img;
        let mut problems = Vec::new();
        let mut files_checked = 0;
        let mut chain_hashes = BTreeMap::new();
        let mut new_hashes = Vec::new();
        for v in &m.volumes {
            let file = self.backup_dir(m).join(&v.file);
            let files = match self.chain_files(m, &v.name) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(e.message);
                    continue;
                }
            };
            match q.check(&file, ctl) {
                Ok(r) if r.is_clean() => {}
                Ok(r) => problems.push(format!(
                    "{}: qemu-img check found {} corruptions, {} leaks, {} errors",
                    file.display(),
                    r.corruptions,
                    r.leaks,
                    r.check_errors
                )),
                Err(e) if e.kind == ErrorKind::Cancelled || e.kind == ErrorKind::Timeout => return Err(e),
                Err(e) => problems.push(e.message),
            }
            files_checked += 1;
            match q.info(&file, ctl) {
                Ok(info) => {
                    if info.backing_filename != v.backing {
                        problems.push(format!(
                            "{}: backing file is {:?}, the manifest says {:?}",
                            file.display(),
                            info.backing_filename,
                            v.backing
                        ));
                    }
                    if info.virtual_size != v.virtual_size {
                        problems.push(format!(
                            "{}: virtual size is {}, the manifest says {}",
                            file.display(),
                            info.virtual_size,
                            v.virtual_size
                        ));
                    }
                }
                Err(e) => problems.push(e.message),
            }
            let (chain_hash, file_hashes) = crate::hash::hash_chain(&files, ctl)?;
            let own = file_hashes.last().cloned().expect("a chain has a file");
            match &v.hash {
                Some(h) if *h != own => problems.push(format!(
                    "{}: hash {own} differs from the recorded {h}: the file changed since it was verified",
                    file.display()
                )),
                Some(_) => {}
                None => new_hashes.push((v.name.clone(), own)),
            }
            chain_hashes.insert(v.name.clone(), chain_hash);
        }
        let report = VerifyReport { id: m.id.clone(), ok: problems.is_empty(), problems, files_checked, chain_hashes };
        Ok((report, new_hashes))
    }

    /// Delete backup `id` without breaking any chain: a backup that later
    /// backups depend on is marked removed and kept; one that none depends
    /// on is expunged, and so are removed ancestors left without children.
    pub fn delete(&self, id: &str) -> Result<DeleteOutcome> {
        let m = self.show(id)?;
        let _lock = self.lock_vm(&m.vm, &format!("delete of {id}"))?;
        self.refuse_while_validated(id)?;
        let (all, unreadable) = self.scan_backups(&m.vm)?;
        let mut m = all
            .iter()
            .find(|x| x.id == id && !x.removed)
            .cloned()
            .ok_or_else(|| KnibError::not_found(format!("backup {id} does not exist")))?;
        let mut outcome = DeleteOutcome { expunged: Vec::new(), marked_removed: Vec::new() };
        let mut state = self.load_state(&m.vm)?;
        let children = |x: &str, gone: &[String]| {
            all.iter().filter(|c| c.parent.as_deref() == Some(x) && !gone.contains(&c.id)).count()
        };
        if !unreadable.is_empty() {
            log::warn!(
                "VM {}: the manifests of {} cannot be read; they may depend on backup {id}, so it is kept on disk",
                m.vm,
                unreadable.join(", ")
            );
        }
        if children(&m.id, &outcome.expunged) > 0 || !unreadable.is_empty() {
            m.removed = true;
            m.save(&self.backup_dir(&m).join("manifest.json"))?;
            outcome.marked_removed.push(m.id.clone());
        } else {
            let mut cur = Some(m);
            while let Some(x) = cur.take() {
                self.expunge(&x)?;
                if state.head.as_deref() == Some(x.id.as_str()) {
                    state.head = None;
                    self.save_state(&x.vm, &state)?;
                }
                outcome.expunged.push(x.id.clone());
                if let Some(p) = &x.parent {
                    if let Some(pm) = all.iter().find(|a| &a.id == p) {
                        if pm.removed && children(&pm.id, &outcome.expunged) == 0 && unreadable.is_empty() {
                            cur = Some(pm.clone());
                        }
                    }
                }
            }
        }
        Ok(outcome)
    }

    fn expunge(&self, m: &Manifest) -> Result<()> {
        let dir = self.backup_dir(m);
        confine::check(&self.root, &Self::vm_rel(&m.vm).join(&m.id), Want::Dir, "backup directory")?;
        let trash = self.vm_dir(&m.vm).join(format!(".{}.deleting", m.id));
        fs::rename(&dir, &trash).map_err(|e| KnibError::io("cannot remove", &dir, e))?;
        fsio::sync_dir(&self.vm_dir(&m.vm))?;
        fs::remove_dir_all(&trash).map_err(|e| KnibError::io("cannot remove", &trash, e))
    }
}

/// The backing file name in the qcow2 header of `file` (opened, confined,
/// as `path`), read with knib's own header parser.
fn backing_pointer(file: &fs::File, path: &Path) -> Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?.len();
    let mut start = [0u8; 24];
    let n = file.read_at(&mut start, 0).map_err(|e| KnibError::io("cannot read", path, e))?;
    let mut prefix = vec![0u8; crate::qcow2::header_prefix_len(&start[..n], len)];
    file.read_exact_at(&mut prefix, 0).map_err(|e| KnibError::io("cannot read", path, e))?;
    let h = crate::qcow2::Header::parse(&path.display().to_string(), &prefix, len).map_err(|e| {
        // A file of the store that knib cannot read as its own is damaged.
        KnibError::corrupt(format!("backup file {}: {}", path.display(), e.message))
    })?;
    Ok(h.backing_file)
}

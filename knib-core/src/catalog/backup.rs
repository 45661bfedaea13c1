//! Taking a backup into the store: the disks of a stopped VM copied by the
//! engine into a hidden `.part` directory, published by one rename.
//!
//! # Invariants
//!
//! - A backup is written in `vms/<vm>/.<id>.part/` and becomes visible by
//!   one rename of that directory, after its files and manifest are
//!   fsynced; nothing half-written is ever listed.
//! - Primary storage is merged only after the backup is published.
//! - The parent of an incremental backup is the chain head as derived from
//!   primary storage and the published manifests (see the `head` module),
//!   never from `state.json` alone.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{head, settings, CompressionInfo, Manifest, Store, VmState, VolumeEntry, DEFAULT_CHAIN_SIZE};
use crate::engine::{self, BackupKind, TakeBackupRequest, VolumeBackup};
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::names;
use crate::progress::Control;
use crate::qemu_img::CompressionLibrary;

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
    /// With `compress`: read each compressed file back through its own
    /// tables before the backup is kept, and fail (`internal`, nothing
    /// kept) if one does not hold what was copied into it; the store's
    /// `compression.check_output` turns it on for every backup. Into the
    /// store (not a vault's direct upload); a file copied by qemu-img is
    /// compared with its source by guest bytes.
    /// Refused (invalid input) without `compress`.
    #[serde(default)]
    pub check_output: bool,
    /// The backup method of a libvirt domain's backup; `None`: the VM's
    /// setting ([`super::VmSettings::backup_method`]).
    #[serde(default)]
    pub method: Option<crate::engine::BackupMethod>,
    /// The group backup this backup is a member of, recorded in its
    /// manifest ([`super::Manifest::group`]); set by group backups only.
    #[serde(default)]
    pub group: Option<String>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            full: false,
            isolated: false,
            chain_size: DEFAULT_CHAIN_SIZE,
            compress: None,
            check_output: false,
            method: None,
            group: None,
        }
    }
}

impl BackupOptions {
    /// Refuse [`BackupOptions::check_output`] without
    /// [`BackupOptions::compress`] for `what` (a backup, a group backup):
    /// the read-back reads compressed files.
    pub(crate) fn refuse_check_uncompressed(&self, what: &str) -> Result<()> {
        if self.check_output && self.compress.is_none() {
            return Err(KnibError::invalid(format!(
                "{what}: check_output goes with compress (it reads the compressed files back)"
            )));
        }
        Ok(())
    }
}

/// Refuse [`BackupOptions::check_output`] for `what`, a backup sent straight
/// to a vault: its files are uploaded as they are written, and no local
/// file is left to read back (the vault's own hashes check the upload).
pub(crate) fn refuse_check_direct(opts: &BackupOptions, what: &str) -> Result<()> {
    if opts.check_output {
        return Err(KnibError::invalid(format!(
            "{what}: check_output reads back the compressed files a backup writes into the store; a backup sent straight to a vault writes none (take it into the store, then send it)"
        )));
    }
    Ok(())
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

/// Check a plain-disk backup's VM name and disks before anything is
/// written: (volume name, disk path, whether it runs on its knib base).
pub(crate) fn check_disks(
    q: &crate::qemu_img::QemuImg,
    vm: &str,
    disks: &[DiskSpec],
    ctl: &Control,
) -> Result<Vec<(String, PathBuf, bool)>> {
    names::validate("VM name", vm)?;
    if disks.is_empty() {
        return Err(KnibError::invalid("a backup needs at least one --disk NAME=PATH"));
    }
    for (i, d) in disks.iter().enumerate() {
        names::validate("volume name", &d.name)?;
        if disks[..i].iter().any(|o| o.name == d.name) {
            return Err(KnibError::invalid(format!("volume name {:?} is given twice", d.name)));
        }
        // One file under two names (the same path, a link, or a hard link
        // to it) would be copied twice and then merged twice.
        if let Some(o) = disks[..i].iter().find(|o| one_file(&o.path, &d.path)) {
            return Err(KnibError::invalid(format!(
                "volumes {} ({}) and {} ({}) are the same file",
                o.name,
                o.path.display(),
                d.name,
                d.path.display()
            )));
        }
    }
    // Check every disk before anything is written to the store. A disk
    // whose file is missing beside its base was interrupted while it got
    // that base: with knib's overlay there, the engine finishes that, and
    // the disk then runs on the base; with anything else under the
    // overlay's name, it undoes it, and the disk is its base again, on no
    // base of knib's; with nothing there, the engine's look at the disk
    // fails, naming the base.
    let mut on_base = Vec::new();
    for d in disks {
        if d.path.exists() {
            let st = engine::take::inspect_disk(q, &d.name, &d.path, ctl)?;
            // A base beside a disk that does not run on it (the disk was
            // replaced, say re-copied from a template): found here, not
            // after the copy is published, when the merge cannot make the
            // base (each retry added a full backup). A second name of the
            // disk itself is what a crash leaves; the backup undoes it.
            let base = engine::take::base_path(&d.path);
            if !st.on_knib_base && std::fs::symlink_metadata(&base).is_ok() && !one_file(&base, &d.path) {
                return Err(KnibError::invalid(format!(
                    "disk {}: {} exists but {} does not run on it (was the disk replaced?): move it away; nothing was written",
                    d.name,
                    base.display(),
                    d.path.display()
                )));
            }
            on_base.push((d.name.clone(), d.path.clone(), st.on_knib_base));
        } else if engine::take::base_path(&d.path).exists() {
            on_base.push((d.name.clone(), d.path.clone(), engine::take::on_base_once_repaired(&d.path)));
        } else {
            return Err(KnibError::not_found(format!("disk {}: {} does not exist", d.name, d.path.display())));
        }
    }
    Ok(on_base)
}

/// Whether `a` and `b` name one file (one path, links to it, or hard
/// links: the same device and inode).
pub(crate) fn one_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    crate::fsio::same_file(a, b)
        || matches!((std::fs::metadata(a), std::fs::metadata(b)), (Ok(x), Ok(y)) if (x.dev(), x.ino()) == (y.dev(), y.ino()))
}

/// The manifest's entries of a plain-disk backup's volumes as copied.
pub(crate) fn volume_entries(
    vols: &[engine::VolumeResult],
    disks: &[DiskSpec],
    parent: Option<&Manifest>,
) -> Vec<VolumeEntry> {
    vols.iter()
        .map(|v| VolumeEntry {
            name: v.name.clone(),
            file: format!("{}.qcow2", v.name),
            virtual_size: v.virtual_size,
            size: v.size,
            source: disks.iter().find(|d| d.name == v.name).map(|d| d.path.display().to_string()).unwrap_or_default(),
            backing: parent.map(|p| super::manifest::parent_file_ref(p, &v.name)),
            hash: v.hash.clone(),
        })
        .collect()
}

/// Whether a backup taken with `opts` reads its compressed files back
/// ([`BackupOptions::check_output`], or the store's
/// `compression.check_output` in `settings`): only when it compresses them
/// into the store. `direct`: the backup goes straight to a vault, which
/// `check_output` refuses ([`refuse_check_direct`]), as it refuses a
/// backup without `compress`.
pub(super) fn check_compressed(
    settings: &settings::Settings,
    opts: &BackupOptions,
    direct: bool,
    what: &str,
) -> Result<bool> {
    opts.refuse_check_uncompressed(what)?;
    if direct {
        refuse_check_direct(opts, what)?;
        if opts.compress.is_some() && settings.compression.check_output {
            log::warn!(
                "{what}: its compressed files go straight to a vault and are not read back (compression.check_output covers the files a backup writes into the store)"
            );
        }
        return Ok(false);
    }
    Ok(opts.compress.is_some() && (opts.check_output || settings.compression.check_output))
}

impl Store {
    /// Take a backup of `vm`'s disks (plain qcow2 files of a stopped VM).
    /// Full or incremental is decided from the chain and `opts`.
    pub fn backup(&self, vm: &str, disks: &[DiskSpec], opts: &BackupOptions, ctl: &Control) -> Result<Manifest> {
        self.backup_with(vm, disks, opts, None, &mut || Ok(()), ctl)
    }

    /// [`Store::backup`] with the backup's id chosen by the caller (`None`:
    /// a new one) and `before_publish` called once the copies are written,
    /// before the backup is published (a group backup holds its members
    /// there); its error undoes the backup.
    pub(crate) fn backup_with(
        &self,
        vm: &str,
        disks: &[DiskSpec],
        opts: &BackupOptions,
        id: Option<&str>,
        before_publish: &mut dyn FnMut() -> Result<()>,
        ctl: &Control,
    ) -> Result<Manifest> {
        let q = &self.qemu_img;
        let settings = settings::Settings::load(&self.root)?;
        let check_output = check_compressed(&settings, opts, false, &format!("backup of {vm}"))?;
        let on_base = check_disks(q, vm, disks, ctl)?;
        let _lock = self.lock_vm(vm, &format!("backup of {vm}"))?;

        let sources: Vec<(String, PathBuf)> = disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
        let follows = head::follows_of_plain_disks(&on_base);
        let head::Decision { kind, parent, position, end_of_chain, full_reason } =
            self.decide(vm, &sources, opts, &follows)?;

        let id = match id {
            Some(id) => {
                names::validate("backup id", id)?;
                id.to_string()
            }
            None => self.fresh_backup_id()?,
        };
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
                    parent: parent.as_ref().map(|p| super::manifest::parent_file_ref(p, &d.name)),
                })
                .collect(),
            kind,
            end_of_chain,
            data_path: settings.data_path,
            compress: opts.compress,
            check_output,
        };
        let mut manifest = Manifest::new(&id, vm, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        manifest.full_reason = full_reason;
        manifest.group = opts.group.clone();
        let final_dir = self.vm_dir(vm).join(&id);
        let result = engine::take::take_backup_with(q, &req, ctl, &mut |vols| {
            manifest.volumes = volume_entries(vols, disks, parent.as_ref());
            manifest.compression = compressed_as_copied(vols);
            before_publish()?;
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
    pub(super) fn publish(&self, m: &Manifest, part: &Path) -> Result<()> {
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
}

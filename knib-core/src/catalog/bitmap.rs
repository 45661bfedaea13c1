//! Bitmap backups of libvirt domains through the catalog (see
//! [`crate::engine::bitmap`]): the journal of each backup
//! (`vms/<vm>/bitmap-journal.json`, written before every step), its
//! recovery, and which backup the domain's dirty bitmaps follow.
//!
//! The store format is the same as for the snapshot method: each volume's
//! file is a qcow2 whose backing file is the parent backup's file, so
//! restore, verify, compress, delete and file restore work unchanged, and
//! a chain may hold backups of both methods (a change of method starts a
//! new chain: the other method's state on the domain, a delta or a
//! checkpoint, does not follow the last backup).

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::head::Follows;
use super::live::DomainBackupTarget;
use super::manifest::{Manifest, VolumeEntry};
use super::{BackupOptions, Store};
use crate::engine::bitmap::{self, BitmapDisk, BitmapPlan, BitmapStep};
use crate::engine::bitmap_stopped;
use crate::engine::BackupKind;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::libvirt::backup::checkpoint_name;
use crate::libvirt::Vm;
use crate::progress::Control;

/// The journal of a bitmap backup in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapJournal {
    /// Schema version (1).
    pub schema: u32,
    /// The step about to be taken, or being taken.
    pub step: BitmapStep,
    /// The whole plan.
    pub plan: BitmapPlan,
    /// The vault the backup is written to, when it goes straight there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<String>,
}

impl Store {
    fn bitmap_journal_path(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("bitmap-journal.json")
    }

    /// The private directory of a bitmap backup's NBD socket and scratch
    /// files: absolute, since libvirt takes absolute socket paths only.
    fn bitmap_work_dir(&self, vm: &str, id: &str) -> Result<PathBuf> {
        let d = self.vm_dir(vm).join(format!(".{id}.nbd"));
        std::path::absolute(&d).map_err(|e| KnibError::io("cannot make an absolute path of", &d, e))
    }

    pub(crate) fn load_bitmap_journal(&self, vm: &str) -> Result<Option<BitmapJournal>> {
        self.load_vm_journal(vm, "bitmap-journal.json")
    }

    fn record_bitmap(&self, vm: &str, plan: &BitmapPlan, step: BitmapStep, vault: Option<&str>) -> Result<()> {
        let j = BitmapJournal { schema: 1, step, plan: plan.clone(), vault: vault.map(str::to_string) };
        fsio::write_atomic(&self.bitmap_journal_path(vm), &serde_json::to_vec_pretty(&j).expect("journal serializes"))?;
        log::info!("bitmap backup {} of {vm}: {}", plan.backup_id, step.as_str());
        if std::env::var(super::live::FAULT_ENV).ok().as_deref() == Some(step.as_str()) {
            // SAFETY: kill(2) on our own pid; the test asked for this crash.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        Ok(())
    }

    /// [`Store::refuse_interrupted`] before the domain is even inspected
    /// (an interrupted backup may have left its disks on knib's deltas,
    /// which inspecting refuses with a less useful error), under the VM's
    /// lock, taken and let go here ("busy" while that backup still runs).
    /// A VM without a directory in the store has no journal: nothing is
    /// made for it here.
    pub(crate) fn refuse_interrupted_first(&self, vm: &str, what: &str) -> Result<()> {
        crate::names::validate("VM name", vm)?;
        if !self.vm_dir(vm).is_dir() {
            return Ok(());
        }
        let _lock = self.lock_vm(vm, what)?;
        self.refuse_interrupted(vm)
    }

    /// The error of a domain whose backup (by either method) was
    /// interrupted: nothing else is done to it before `knib recover`.
    pub(crate) fn refuse_interrupted(&self, vm: &str) -> Result<()> {
        let interrupted = match (self.load_bitmap_journal(vm)?, self.load_journal(vm)?) {
            (Some(j), _) => Some((format!("bitmap backup {}", j.plan.backup_id), j.step.as_str())),
            (None, Some(j)) => Some((format!("backup {}", j.plan.backup_id), j.step.as_str())),
            (None, None) => None,
        };
        match interrupted {
            Some((what, step)) => Err(KnibError::new(
                ErrorKind::VmInconsistent,
                format!(
                    "{what} of domain {vm} was interrupted at its {step} step; run `knib recover` first \
                     (`knib recover --discard` when it cannot finish or undo it)"
                ),
            )),
            None => Ok(()),
        }
    }

    /// Back up every disk of a libvirt domain by dirty bitmap: a running
    /// one by checkpoints and a backup job ([`crate::engine::bitmap`]), a
    /// stopped one by persistent bitmaps in its disks' files
    /// ([`crate::engine::bitmap_stopped`]). The VM's name in the store is the
    /// domain's name; volumes are the disk targets.
    pub fn backup_domain_bitmap(
        &self,
        vm: &Vm,
        opts: &BackupOptions,
        quiesce: bool,
        ctl: &Control,
    ) -> Result<Manifest> {
        self.backup_domain_bitmap_to(vm, opts, quiesce, None, ctl)
    }

    /// [`Store::backup_domain_bitmap`] into the store, or, with `target`,
    /// straight into a vault: the chain it continues is then the vault's,
    /// its files go only there, and its journal names the vault.
    pub fn backup_domain_bitmap_to(
        &self,
        vm: &Vm,
        opts: &BackupOptions,
        quiesce: bool,
        target: Option<&dyn DomainBackupTarget>,
        ctl: &Control,
    ) -> Result<Manifest> {
        let name = vm.name().to_string();
        crate::names::validate("VM name", &name)?;
        let settings = super::settings::Settings::load(&self.root)?;
        let check_output =
            super::backup::check_compressed(&settings, opts, target.is_some(), &format!("backup of {name}"))?;
        self.refuse_interrupted_first(&name, &format!("backup of {name}"))?;
        let running = vm.is_running()?;
        let disks = if running { bitmap::inspect(vm)? } else { bitmap_stopped::inspect(vm)? };
        let _lock = self.lock_vm(&name, &format!("backup of {name}"))?;
        self.refuse_interrupted(&name)?;
        let probe: Vec<BitmapDisk> = disks
            .iter()
            .map(|d| BitmapDisk {
                target: d.target.clone(),
                file: d.file.clone(),
                dest: PathBuf::new(),
                parent: None,
                format: d.format.clone(),
            })
            .collect();
        let q = &self.qemu_img;
        let (tracked, can_carry) = if running {
            bitmap::refuse_running_job(vm, "run `knib recover` if it is one of knib's")?;
            // A raw disk carries a bitmap of knib's own, in QEMU's memory.
            (bitmap::tracked_since(vm, &disks)?, true)
        } else {
            (bitmap_stopped::tracked_since(q, &probe, ctl)?, bitmap_stopped::cannot_carry(q, &probe, ctl)?.is_none())
        };
        let sources: Vec<(String, PathBuf)> = disks.iter().map(|d| (d.target.clone(), d.file.clone())).collect();
        let follows: Vec<(String, Follows)> = disks
            .iter()
            .map(|d| {
                let f = match &tracked {
                    Ok(id) => Follows::Backup(id.clone()),
                    Err(why) => Follows::Untracked(why.clone()),
                };
                (d.target.clone(), f)
            })
            .collect();
        if let Some(t) = target {
            t.prepare(&name)?;
        }
        let super::head::Decision { kind, parent, position, end_of_chain, full_reason } = match target {
            None => self.decide(&name, &sources, opts, &follows)?,
            Some(t) => self.decide_in_target(t, &name, &sources, opts, &follows)?,
        };
        let id = self.fresh_backup_id()?;
        let part = self.vm_dir(&name).join(format!(".{id}.part"));
        let plan = BitmapPlan {
            backup_id: id.clone(),
            kind,
            end_of_chain,
            quiesce,
            disks: probe
                .into_iter()
                .map(|d| BitmapDisk {
                    dest: match target {
                        None => part.join(format!("{}.qcow2", d.target)),
                        Some(t) => t.dest(&name, &id, &d.target),
                    },
                    parent: parent.as_ref().map(|p| super::manifest::parent_file_ref(p, &d.target)),
                    ..d
                })
                .collect(),
            work_dir: self.bitmap_work_dir(&name, &id)?,
            since: match (kind, &tracked) {
                (BackupKind::Incremental, Ok(t)) => Some(checkpoint_name(t)),
                _ => None,
            },
            checkpoint: (kind != BackupKind::Isolated && !end_of_chain && can_carry).then(|| checkpoint_name(&id)),
            compress: opts.compress,
            check_output,
            stopped: !running,
        };
        if kind == BackupKind::Incremental && plan.since.is_none() {
            return Err(KnibError::internal("an incremental bitmap backup without a checkpoint to follow"));
        }
        if let Some(why) = &full_reason {
            log::warn!("bitmap backup {id} of {name} is full: {why}");
        }
        if target.is_none() {
            crate::crashpoint::durable_step(&format!("creation of {}", part.display()));
            fs::create_dir(&part).map_err(|e| KnibError::io("cannot create", &part, e))?;
        }
        let mut m = Manifest::new(&id, &name, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        m.full_reason = full_reason;
        let final_dir = self.vm_dir(&name).join(&id);
        let vault = target.map(|t| t.location());
        let mut journal = |step| self.record_bitmap(&name, &plan, step, vault.as_deref());
        let mut publish = |vols: &[crate::engine::take::VolumeResult]| {
            m.volumes = vols
                .iter()
                .map(|v| VolumeEntry {
                    name: v.name.clone(),
                    file: format!("{}.qcow2", v.name),
                    virtual_size: v.virtual_size,
                    size: v.size,
                    source: v.active_file.display().to_string(),
                    backing: plan.disks.iter().find(|d| d.target == v.name).and_then(|d| d.parent.clone()),
                    hash: v.hash.clone(),
                })
                .collect();
            m.compression = super::compressed_as_copied(vols);
            match target {
                None => self.publish(&m, &part),
                Some(t) => t.publish(&m),
            }
        };
        let mut copy = |d: &BitmapDisk,
                        socket: &std::path::Path,
                        export: &str,
                        bitmap: Option<&str>,
                        compress: Option<crate::qcow2::CompressionType>,
                        c: &Control| {
            let t = target.ok_or_else(|| KnibError::internal("a direct copy without a target"))?;
            t.copy_export(&name, &id, d, socket, export, bitmap, compress, c)
        };
        let copy_to: Option<&mut bitmap::ExportCopyTo<'_>> = if target.is_some() { Some(&mut copy) } else { None };
        let result = if running {
            bitmap::take(vm, &plan, ctl, &mut journal, copy_to, &mut publish)
        } else {
            bitmap_stopped::take(q, Some(vm), &plan, ctl, &mut journal, copy_to, &mut publish)
        };
        match result {
            Ok(_) => {
                fsio::remove_durable(&self.bitmap_journal_path(&name))?;
                Ok(m)
            }
            Err(e) => {
                super::live::discard_unpublished(target, &part, &final_dir, &name, &id);
                if e.vm_consistent == Some(true) {
                    let _ = fsio::remove_durable(&self.bitmap_journal_path(&name));
                }
                Err(e)
            }
        }
    }

    /// Finish or undo an interrupted bitmap backup of `vm`, if there is
    /// one (called by [`Store::recover_domain`] under the VM's lock).
    pub(crate) fn recover_bitmap(
        &self,
        vm: &Vm,
        target: Option<&dyn DomainBackupTarget>,
    ) -> Result<Option<super::live::RecoverOutcome>> {
        let name = vm.name().to_string();
        let Some(j) = self.load_bitmap_journal(&name)? else { return Ok(None) };
        // The journal is untrusted: the work directory must be the one knib
        // names for this backup, the checkpoint knib's for it.
        let want_dir = self.bitmap_work_dir(&name, &j.plan.backup_id)?;
        crate::names::validate("backup id", &j.plan.backup_id)?;
        if j.plan.work_dir != want_dir {
            return Err(KnibError::corrupt(format!(
                "journal of {name}: the work directory {} is not {}",
                j.plan.work_dir.display(),
                want_dir.display()
            )));
        }
        if let Some(c) = &j.plan.checkpoint {
            if *c != checkpoint_name(&j.plan.backup_id) {
                return Err(KnibError::corrupt(format!("journal of {name}: checkpoint {c} is not this backup's")));
            }
        }
        // The checkpoint followed is one of knib's, of another backup: the
        // recovery turns its bitmaps back on and merges into them (a
        // hostile journal named another tool's bitmap).
        if let Some(s) = &j.plan.since {
            let knibs = crate::libvirt::backup::checkpoint_backup_id(s)
                .filter(|id| crate::names::validate("backup id", id).is_ok() && *id != j.plan.backup_id);
            if knibs.is_none() {
                return Err(KnibError::corrupt(format!(
                    "journal of {name}: the checkpoint followed, {s:?}, is not one of knib's (knib-<backup id>) of another backup; nothing was changed"
                )));
            }
        }
        let in_vault = super::live::journal_target(
            j.vault.as_deref(),
            target,
            &format!("bitmap backup {} of domain {name}", j.plan.backup_id),
        )?;
        if let Some(t) = in_vault {
            for d in &j.plan.disks {
                if d.dest != t.dest(&name, &j.plan.backup_id, &d.target) {
                    return Err(KnibError::corrupt(format!(
                        "journal of {name}: {} is not the vault's file of disk {} of this backup",
                        d.dest.display(),
                        d.target
                    )));
                }
            }
        }
        let published = match in_vault {
            None => super::journal_check::published_in_store(&self.root, &name, &j.plan.backup_id)?,
            Some(t) => t.has(&name, &j.plan.backup_id)?,
        };
        let actions = if j.plan.stopped {
            // The files whose bitmaps recovery edits are the domain's own
            // disks, never ones the journal names.
            let disks = vm.disks()?;
            for d in &j.plan.disks {
                if !disks.iter().any(|x| x.target == d.target && x.file == d.file && x.format == d.format) {
                    return Err(KnibError::corrupt(format!(
                        "journal of {name}: disk {} ({}) is not a disk of domain {name}",
                        d.target,
                        d.file.display()
                    )));
                }
            }
            bitmap_stopped::recover(&self.qemu_img, Some(vm), &j.plan, published, &Control::new())?
        } else {
            bitmap::recover(vm, &j.plan, published)?
        };
        if let (Some(t), false) = (in_vault, published) {
            t.discard(&name, &j.plan.backup_id)?;
        }
        if published && j.plan.kind != BackupKind::Isolated && in_vault.is_none() {
            let st = self.load_state(&name).unwrap_or_default();
            if st.head.as_deref() != Some(j.plan.backup_id.as_str()) {
                self.save_state(&name, &super::VmState { schema: 1, head: Some(j.plan.backup_id.clone()) })?;
            }
        }
        fsio::remove_durable(&self.bitmap_journal_path(&name))?;
        Ok(Some(super::live::RecoverOutcome {
            backup_id: Some(j.plan.backup_id),
            step: None,
            published,
            report: crate::engine::live::RecoverReport { actions, chains: Vec::new() },
        }))
    }
}

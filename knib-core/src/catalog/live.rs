//! Backups of libvirt domains through the catalog: the journal of each
//! backup (`vms/<vm>/journal.json`, written before every step), recovery
//! after an interrupted backup, quick restore and consolidation.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::head::Follows;
use super::manifest::{Manifest, VolumeEntry};
use super::{BackupOptions, Store};
use crate::engine::live::{self, DiskPlan, LivePlan, LiveStep, RecoverReport};
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::libvirt::Vm;
use crate::progress::Control;

/// The journal of a backup in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// Schema version (1).
    pub schema: u32,
    /// The step about to be taken, or being taken.
    pub step: LiveStep,
    /// The whole plan.
    pub plan: LivePlan,
    /// The vault the backup is written to, when it goes straight there
    /// (`s3://BUCKET/PREFIX`): recovery then asks the vault whether it was
    /// published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<String>,
}

/// The target an interrupted backup's journal names (`vault`), which must
/// be `target`; refused, saying which vault, when it is not given.
pub(super) fn journal_target<'a>(
    vault: Option<&str>,
    target: Option<&'a dyn DomainBackupTarget>,
    what: &str,
) -> Result<Option<&'a dyn DomainBackupTarget>> {
    match (vault, target) {
        (None, _) => Ok(None),
        (Some(loc), Some(t)) if loc == t.location() => Ok(Some(t)),
        (Some(loc), _) => Err(KnibError::invalid(format!(
            "{what} was being written to vault {loc}: recover it with that vault (knib recover --vault {loc})"
        ))),
    }
}

/// Remove what a failed, unpublished backup `id` wrote: its part
/// directory in the store, or its objects in `target`.
pub(super) fn discard_unpublished(
    target: Option<&dyn DomainBackupTarget>,
    part: &std::path::Path,
    final_dir: &std::path::Path,
    vm: &str,
    id: &str,
) {
    match target {
        None if !final_dir.exists() => {
            let _ = fs::remove_dir_all(part);
        }
        Some(t) if !t.has(vm, id).unwrap_or(true) => {
            if let Err(d) = t.discard(vm, id) {
                log::warn!("{d}");
            }
        }
        _ => {}
    }
}

/// Where a domain's backup goes, when not into the store: a vault, as
/// [`crate::vault`] implements it (the catalog does not depend on it).
pub trait DomainBackupTarget {
    /// The vault's location, `s3://BUCKET/PREFIX` (no credentials).
    fn location(&self) -> String;
    /// The target's backups of `vm`, for choosing full or incremental.
    fn manifests(&self, vm: &str) -> Result<Vec<Manifest>>;
    /// Refuse to continue the chain whose head is `head` unless it is whole
    /// in the target.
    fn check_chain(&self, head: &Manifest) -> Result<()>;
    /// What `dest` names for volume `volume` of backup `id` of `vm`.
    fn dest(&self, vm: &str, id: &str, volume: &str) -> PathBuf;
    /// Prepare for a backup of `vm`: finish what an interrupted one left.
    fn prepare(&self, vm: &str) -> Result<()>;
    /// Copy `v` as [`crate::engine::take::CopyTo`] does, into backup `id`.
    fn copy(
        &self,
        vm: &str,
        id: &str,
        v: &crate::engine::take::VolumeBackup,
        opts: &crate::qcow2::CopyOptions,
        ctl: &Control,
    ) -> Result<crate::engine::take::CopiedTo>;
    /// Copy a bitmap backup's export of disk `d` (socket, export, dirty
    /// bitmap, compression) into backup `id`, as
    /// [`crate::engine::bitmap::ExportCopyTo`] does.
    #[allow(clippy::too_many_arguments)]
    fn copy_export(
        &self,
        vm: &str,
        id: &str,
        d: &crate::engine::bitmap::BitmapDisk,
        socket: &std::path::Path,
        export: &str,
        bitmap: Option<&str>,
        compress: Option<crate::qcow2::CompressionType>,
        ctl: &Control,
    ) -> Result<(crate::engine::take::CopiedTo, u64)>;
    /// Make backup `m` visible.
    fn publish(&self, m: &Manifest) -> Result<()>;
    /// Whether backup `id` of `vm` is visible.
    fn has(&self, vm: &str, id: &str) -> Result<bool>;
    /// Remove what an unpublished backup `id` of `vm` wrote.
    fn discard(&self, vm: &str, id: &str) -> Result<()>;
}

/// The environment variable that makes knib kill itself (SIGKILL) right
/// after recording a step in the journal: for crash tests only.
pub const FAULT_ENV: &str = "KNIB_FAULT_AT";

/// What `recover` found and did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoverOutcome {
    /// The interrupted backup, if a journal was found.
    pub backup_id: Option<String>,
    /// The step it had reached.
    pub step: Option<LiveStep>,
    /// Whether it had reached the store (it is then kept and finished).
    pub published: bool,
    /// What was done.
    pub report: RecoverReport,
}

impl Store {
    fn journal_path(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("journal.json")
    }

    pub(super) fn load_journal(&self, vm: &str) -> Result<Option<Journal>> {
        self.load_vm_journal(vm, "journal.json")
    }

    /// The journal `name` of VM `vm` (read confined to the store), if any;
    /// one that does not parse is corrupt.
    pub(super) fn load_vm_journal<T: serde::de::DeserializeOwned>(&self, vm: &str, name: &str) -> Result<Option<T>> {
        let rel = std::path::Path::new("vms").join(vm).join(name);
        match super::confine::read(&self.root, &rel, "journal")? {
            Some(t) => crate::json::from_slice(&t).map(Some).map_err(|e| {
                KnibError::corrupt(format!(
                    "journal {} is corrupted: {e} (`knib recover --discard` sets it aside)",
                    self.vm_dir(vm).join(name).display()
                ))
            }),
            None => Ok(None),
        }
    }

    fn record(&self, vm: &str, plan: &LivePlan, step: LiveStep, vault: Option<&str>) -> Result<()> {
        let j = Journal { schema: 1, step, plan: plan.clone(), vault: vault.map(str::to_string) };
        fsio::write_atomic(&self.journal_path(vm), &serde_json::to_vec_pretty(&j).expect("journal serializes"))?;
        log::info!("backup {} of {vm}: {}", plan.backup_id, step.as_str());
        if std::env::var(FAULT_ENV).ok().as_deref() == Some(step.as_str()) {
            // SAFETY: kill(2) on our own pid; the test asked for this crash.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        Ok(())
    }

    /// Back up every disk of a libvirt domain, running or stopped. The VM's
    /// name in the store is the domain's name; volumes are the disk targets.
    pub fn backup_domain(&self, vm: &Vm, opts: &BackupOptions, quiesce: bool, ctl: &Control) -> Result<Manifest> {
        self.backup_domain_with(vm, opts, quiesce, None, &mut |_| Ok(()), ctl)
    }

    /// [`Store::backup_domain`] with the backup's id chosen by the caller
    /// (`None`: a new one) and `hook` called after each step is recorded in
    /// the journal and before it is taken (a group backup holds its members
    /// there). An error of `hook` before the snapshot leaves the domain as
    /// it was; one before the publication undoes the snapshot.
    pub(crate) fn backup_domain_with(
        &self,
        vm: &Vm,
        opts: &BackupOptions,
        quiesce: bool,
        id: Option<&str>,
        hook: &mut dyn FnMut(LiveStep) -> Result<()>,
        ctl: &Control,
    ) -> Result<Manifest> {
        let name = vm.name().to_string();
        crate::names::validate("VM name", &name)?;
        let method = match opts.method {
            Some(m) => m,
            None => self.vm_settings(&name)?.backup_method,
        };
        if method == crate::engine::BackupMethod::Bitmap {
            if id.is_some() {
                log::warn!("backup of {name}: a group backup takes its members by the snapshot method");
            } else {
                return self.backup_domain_bitmap(vm, opts, quiesce, ctl);
            }
        }
        self.backup_domain_to(vm, opts, quiesce, id, None, hook, ctl)
    }

    /// A backup of a domain by the snapshot method into the store, or,
    /// with `target`, straight into a vault: the chain it continues is
    /// then the vault's, its files go only there, and the journal (in the
    /// store, under the VM's lock) names the vault for recovery.
    #[allow(clippy::too_many_arguments)]
    pub fn backup_domain_to(
        &self,
        vm: &Vm,
        opts: &BackupOptions,
        quiesce: bool,
        id: Option<&str>,
        target: Option<&dyn DomainBackupTarget>,
        hook: &mut dyn FnMut(LiveStep) -> Result<()>,
        ctl: &Control,
    ) -> Result<Manifest> {
        let name = vm.name().to_string();
        crate::names::validate("VM name", &name)?;
        let settings = super::settings::Settings::load(&self.root)?;
        let check_output =
            super::backup::check_compressed(&settings, opts, target.is_some(), &format!("backup of {name}"))?;
        self.refuse_interrupted_first(&name, &format!("backup of {name}"))?;
        let q = self.qemu_img.clone();
        // The first backup of the VM in this store, refused for the
        // domain's shape (a raw disk, no disk), leaves nothing behind: no
        // VM directory, no lock file. Its shape is read before the lock
        // too (and again under it, below).
        if !self.vm_dir(&name).exists() {
            live::inspect(&q, vm, ctl)?;
        }
        crate::crashpoint::pause_point(&format!("locking VM {name} for a backup"));
        let _lock = self.lock_vm(&name, &format!("backup of {name}"))?;
        self.refuse_interrupted(&name)?;
        // The disks' chains are read under the lock: read before it, a
        // backup of this VM that ran in between (adding its delta) would be
        // missed, and this one would copy the chain without that delta.
        let shapes = live::inspect(&q, vm, ctl)?;
        if let Some(t) = target {
            t.prepare(&name)?;
        }
        let sources: Vec<(String, PathBuf)> = shapes.iter().map(|s| (s.info.target.clone(), s.base.clone())).collect();
        let follows: Vec<(String, Follows)> = shapes
            .iter()
            .map(|s| {
                let f = match &s.delta {
                    None => Follows::NoDelta,
                    Some(d) => match live::delta_backup_id(&s.base, d) {
                        Some(id) => Follows::Backup(id),
                        None => Follows::Unknown(format!("{} is not named after a backup", d.display())),
                    },
                };
                (s.info.target.clone(), f)
            })
            .collect();
        let super::head::Decision { kind, parent, position, end_of_chain, full_reason } = match target {
            None => self.decide(&name, &sources, opts, &follows)?,
            Some(t) => self.decide_in_target(t, &name, &sources, opts, &follows)?,
        };
        let id = match id {
            Some(id) => {
                crate::names::validate("backup id", id)?;
                id.to_string()
            }
            None => self.fresh_backup_id()?,
        };
        let part = self.vm_dir(&name).join(format!(".{id}.part"));
        let plan = LivePlan {
            backup_id: id.clone(),
            kind,
            end_of_chain,
            quiesce,
            running: vm.is_running()?,
            disks: shapes
                .iter()
                .map(|s| DiskPlan {
                    target: s.info.target.clone(),
                    base: s.base.clone(),
                    old_delta: s.delta.clone(),
                    new_delta: live::delta_path(&s.base, &id),
                    dest: match target {
                        None => part.join(format!("{}.qcow2", s.info.target)),
                        Some(t) => t.dest(&name, &id, &s.info.target),
                    },
                    parent: parent.as_ref().map(|p| super::manifest::parent_file_ref(p, &s.info.target)),
                    virtual_size: s.virtual_size,
                    snapshots: Vec::new(),
                    grand_children: Vec::new(),
                })
                .collect(),
            data_path: settings.data_path,
            compress: opts.compress,
            check_output,
        };
        // Checkpoints of earlier bitmap backups do not follow what this
        // method does to the disks: they go (the next bitmap backup is full),
        // once the settings are read and the backup decided (a failure there
        // costs no bitmap backup its base).
        for c in crate::engine::bitmap::prune_stale_checkpoints(vm)? {
            log::info!("backup of {name}: deleted checkpoint {c} of an earlier bitmap backup (snapshot method now)");
        }
        if target.is_none() {
            crate::crashpoint::durable_step(&format!("creation of {}", part.display()));
            fs::create_dir(&part).map_err(|e| KnibError::io("cannot create", &part, e))?;
        }
        let mut m = Manifest::new(&id, &name, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        m.full_reason = full_reason;
        m.group = opts.group.clone();
        let final_dir = self.vm_dir(&name).join(&id);
        let vault = target.map(|t| t.location());
        let mut journal = |step| {
            self.record(&name, &plan, step, vault.as_deref())?;
            hook(step).map_err(|e| if step == LiveStep::Snapshot { e.with_vm_consistent(true) } else { e })
        };
        let mut publish = |vols: &[crate::engine::take::VolumeResult]| {
            m.volumes = vols
                .iter()
                .zip(&plan.disks)
                .map(|(v, d)| VolumeEntry {
                    name: v.name.clone(),
                    file: format!("{}.qcow2", v.name),
                    virtual_size: v.virtual_size,
                    size: v.size,
                    source: d.base.display().to_string(),
                    backing: d.parent.clone(),
                    hash: v.hash.clone(),
                })
                .collect();
            m.compression = super::compressed_as_copied(vols);
            match target {
                None => self.publish(&m, &part),
                Some(t) => t.publish(&m),
            }
        };
        let result = match target {
            None => live::take(&q, vm, &plan, ctl, &mut journal, &mut publish),
            Some(t) => {
                let mut copy = |v: &crate::engine::take::VolumeBackup, o: &crate::qcow2::CopyOptions, c: &Control| {
                    t.copy(&name, &id, v, o, c)
                };
                live::take_to(&q, vm, &plan, ctl, &mut journal, Some(&mut copy), &mut publish)
            }
        };
        match result {
            Ok(_) => {
                fsio::remove_durable(&self.journal_path(&name))?;
                Ok(m)
            }
            Err(e) => {
                discard_unpublished(target, &part, &final_dir, &name, &id);
                if e.vm_consistent == Some(true) {
                    let _ = fsio::remove_durable(&self.journal_path(&name));
                }
                Err(e)
            }
        }
    }

    /// Full or incremental for a backup into `t`, from `t`'s chain; refused
    /// when the disks follow a backup that is in the store but not in `t`.
    pub(super) fn decide_in_target(
        &self,
        t: &dyn DomainBackupTarget,
        name: &str,
        sources: &[(String, PathBuf)],
        opts: &BackupOptions,
        follows: &[(String, Follows)],
    ) -> Result<super::head::Decision> {
        let plain = !opts.isolated && !opts.full && opts.chain_size != 1;
        let all = if plain { t.manifests(name)? } else { Vec::new() };
        if plain {
            let local = self.manifests(name)?;
            for (disk, f) in follows {
                if let Follows::Backup(id) = f {
                    if !all.iter().any(|m| &m.id == id) && local.iter().any(|m| &m.id == id && !m.removed) {
                        return Err(KnibError::invalid(format!(
                            "backup of {name} to vault {}: the delta of disk {disk} follows backup {id}, which is in store {} but not in the vault: send it first (knib sync), or take a full backup (--full)",
                            t.location(),
                            self.root.display()
                        )));
                    }
                }
            }
        }
        let place = format!("vault {}", t.location());
        super::head::decide_among(name, &all, &place, sources, opts, follows, &|_, _| {}, &|h| t.check_chain(h))
    }

    /// The vault an interrupted backup of `vm` was being written to, if
    /// its journal names one (recovery needs it: [`Store::recover_domain_in`]).
    pub fn interrupted_vault(&self, vm: &str) -> Result<Option<String>> {
        Ok(self.load_journal(vm)?.and_then(|j| j.vault))
    }

    /// Finish or undo an interrupted backup of a domain, so it runs on
    /// `base` or `base <- one delta` with every write kept, and the store
    /// holds no partial backup.
    pub fn recover_domain(&self, vm: &Vm, ctl: &Control) -> Result<RecoverOutcome> {
        self.recover_domain_in(vm, None, ctl)
    }

    /// [`Store::recover_domain`] of a backup that was being written to
    /// `target` (the vault its journal names: [`Store::interrupted_vault`]);
    /// an unpublished one's objects are removed from it.
    pub fn recover_domain_in(
        &self,
        vm: &Vm,
        target: Option<&dyn DomainBackupTarget>,
        ctl: &Control,
    ) -> Result<RecoverOutcome> {
        let name = vm.name().to_string();
        let _lock = self.lock_vm(&name, &format!("recovery of {name}"))?;
        if let Some(out) = self.recover_bitmap(vm, target)? {
            return Ok(out);
        }
        let Some(j) = self.load_journal(&name)? else {
            // No journal: check the chains all the same.
            live::inspect(&self.qemu_img, vm, ctl)?;
            return Ok(RecoverOutcome {
                backup_id: None,
                step: None,
                published: false,
                report: RecoverReport::default(),
            });
        };
        // The journal is untrusted: its paths must be the domain's own disks
        // and the deltas knib names for them before anything is touched.
        let running = vm.is_running()?;
        let mut chains = Vec::new();
        for d in vm.disks()? {
            let chain = live::chain_of(&self.qemu_img, running, &d, ctl)?;
            chains.push((d.target.clone(), chain));
        }
        let id = j.plan.backup_id.clone();
        let in_vault = journal_target(j.vault.as_deref(), target, &format!("backup {id} of domain {name}"))?;
        let dest_of = |t: &dyn DomainBackupTarget, volume: &str| t.dest(&name, &id, volume);
        let vault_dest = in_vault.map(|t| move |v: &str| dest_of(t, v));
        super::journal_check::check_plan(
            &j.plan,
            &self.journal_path(&name),
            &name,
            &chains,
            vault_dest.as_ref().map(|f| f as &dyn Fn(&str) -> PathBuf),
        )?;
        let published = match in_vault {
            None => super::journal_check::published_in_store(&self.root, &name, &id)?,
            Some(t) => t.has(&name, &id)?,
        };
        let report = live::recover(&self.qemu_img, vm, &j.plan, published, ctl)?;
        // Only the vault the journal names holds this backup's unfinished
        // objects: a journal of a backup into the store never discards
        // anything of `target` (a published backup there may share its id).
        if let (Some(t), false) = (in_vault, published) {
            t.discard(&name, &j.plan.backup_id)?;
        }
        // The disks now follow the published backup: the state says so too
        // (a crash may have come between publishing and recording it).
        if published && j.plan.kind != crate::engine::BackupKind::Isolated && j.vault.is_none() {
            let st = self.load_state(&name).unwrap_or_default();
            if st.head.as_deref() != Some(j.plan.backup_id.as_str()) {
                log::warn!(
                    "state of {name} named {} as the chain head; backup {} was published: the state is repaired",
                    st.head.as_deref().unwrap_or("no backup"),
                    j.plan.backup_id
                );
                self.save_state(&name, &super::VmState { schema: 1, head: Some(j.plan.backup_id.clone()) })?;
            }
        }
        fsio::remove_durable(&self.journal_path(&name))?;
        Ok(RecoverOutcome { backup_id: Some(j.plan.backup_id), step: Some(j.step), published, report })
    }

    /// Quick restore: the stopped domain `vm` is pointed at new qcow2
    /// overlays whose backing files are backup `id`'s files, one per disk
    /// target named in the backup, and started at once. The overlays are
    /// created beside the disks' current files as
    /// `<target>-restored-<id>.qcow2`; the old files are left untouched.
    /// Every file of each chain must pass `qemu-img check` first, or nothing
    /// is changed. Returns each target and its overlay.
    pub fn quick_restore_domain(&self, id: &str, vm: &Vm, ctl: &Control) -> Result<Vec<(String, PathBuf)>> {
        let m = self.show(id)?;
        // The domain's lock, as its backups take it, and none of them
        // interrupted: a backup that believes the domain stopped would put
        // its disks back on their old files, dropping what the guest wrote
        // to the overlays.
        let name = vm.name().to_string();
        crate::names::validate("VM name", &name)?;
        let _lock = self.lock_vm(&name, &format!("quick restore of backup {id}"))?;
        // And the backup's VM's, when it is another: no delete of the
        // backup runs until its overlays are recorded.
        let _backup_lock = if m.vm != name {
            Some(self.lock_vm(&m.vm, &format!("quick restore of backup {id} to {name}"))?)
        } else {
            None
        };
        let m = self.show(id)?;
        self.refuse_interrupted(&name)?;
        let targets = quick_restore_targets(&m, vm)?;
        let mut plan = Vec::new();
        for (target, _, overlay) in &targets {
            let mut files = self.chain_files(&m, target)?;
            crate::engine::require_quick_restorable(&self.qemu_img, &files, ctl)
                .map_err(|e| e.context(format!("quick restore of backup {id}")))?;
            let top = files.pop().expect("non-empty chain");
            plan.push((target.clone(), top, overlay.clone()));
        }
        let mut made = Vec::new();
        // Set when the domain may still name the overlays: they are kept.
        let mut named = false;
        let r = (|| -> Result<()> {
            for (target, top, overlay) in &plan {
                // Recorded before it is made, so that no delete removes
                // what it reads, even after a crash between the two.
                self.pin(&m, target, overlay)?;
                crate::engine::create_overlay(&self.qemu_img, top, overlay, ctl)?;
                made.push(overlay.clone());
            }
            let sources: Vec<(String, PathBuf)> = plan.iter().map(|(t, _, o)| (t.clone(), o.clone())).collect();
            let old = vm.set_disk_sources_qcow2(&sources)?;
            if let Err(e) = vm.start() {
                if let Err(u) = vm.put_back_definition(&old) {
                    // The domain names the overlays: removing them would
                    // leave it on files that are gone.
                    named = true;
                    return Err(e.context(format!(
                        "the domain could not be put back on its old files either ({u}): it still names the overlays {}, which are kept",
                        made.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                    )));
                }
                return Err(e);
            }
            Ok(())
        })();
        if let Err(e) = r {
            if !named {
                for f in &made {
                    let _ = fsio::remove_if_exists(f);
                }
            }
            return Err(e);
        }
        Ok(plan.into_iter().map(|(t, _, o)| (t, o)).collect())
    }
}

/// The disks a quick restore of backup `m` onto the stopped domain `vm`
/// replaces: each volume's target, the file its disk runs on now, and its
/// overlay `<target>-restored-<id>.qcow2` beside that file. Refused when
/// the domain runs or lacks one of the backup's disks.
pub(crate) fn quick_restore_targets(m: &Manifest, vm: &Vm) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    if vm.is_running()? {
        return Err(KnibError::invalid(format!(
            "domain {} is running: shut it down before restoring onto it",
            vm.name()
        )));
    }
    let disks = vm.disks()?;
    let mut out = Vec::new();
    for v in &m.volumes {
        let d = disks.iter().find(|d| d.target == v.name).ok_or_else(|| {
            KnibError::not_found(format!("domain {} has no disk {} (backup {} has it)", vm.name(), v.name, m.id))
        })?;
        let overlay = crate::fsio::parent_dir(&d.file).join(format!("{}-restored-{}.qcow2", v.name, m.id));
        out.push((v.name.clone(), d.file.clone(), overlay));
    }
    let restored: Vec<&str> = m.volumes.iter().map(|v| v.name.as_str()).collect();
    for (target, file) in writable_disks_besides(&disks, &restored) {
        log::warn!(
            "quick restore of backup {} onto domain {}: disk {target} is not in the backup (added after it was taken?): it stays on {}, as it is now",
            m.id,
            vm.name(),
            file.display()
        );
    }
    Ok(out)
}

/// The disks of domain `vm` that a quick restore onto it left as they
/// were, the backup not having them (a disk added after it was taken):
/// `[target, file]` of each writable file disk whose target is none of
/// `restored`'s (a quick restore's answer). Read-only disks (an installer
/// image) are not listed. Asked once the domain runs on its overlays: a
/// domain whose disks cannot be read now gets none listed and a warning,
/// not an error that would make the restore done look failed.
pub fn disks_not_restored(vm: &Vm, restored: &[(String, PathBuf)]) -> Vec<(String, PathBuf)> {
    let targets: Vec<&str> = restored.iter().map(|(t, _)| t.as_str()).collect();
    match vm.disks() {
        Ok(disks) => writable_disks_besides(&disks, &targets),
        Err(e) => {
            log::warn!(
                "after the quick restore of domain {}: {e}: the disks it left as they were are not listed",
                vm.name()
            );
            Vec::new()
        }
    }
}

fn writable_disks_besides(disks: &[crate::libvirt::xml::DiskInfo], targets: &[&str]) -> Vec<(String, PathBuf)> {
    disks
        .iter()
        .filter(|d| !d.read_only && !targets.contains(&d.target.as_str()))
        .map(|d| (d.target.clone(), d.file.clone()))
        .collect()
}

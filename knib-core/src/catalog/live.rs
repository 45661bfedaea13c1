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
use crate::error::{ErrorKind, KnibError, Result};
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
                KnibError::corrupt(format!("journal {} is corrupted: {e}", self.vm_dir(vm).join(name).display()))
            }),
            None => Ok(None),
        }
    }

    fn record(&self, vm: &str, plan: &LivePlan, step: LiveStep) -> Result<()> {
        let j = Journal { schema: 1, step, plan: plan.clone() };
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
        let q = self.qemu_img.clone();
        let shapes = live::inspect(&q, vm, ctl)?;
        let _lock = self.lock_vm(&name, &format!("backup of {name}"))?;
        self.refuse_interrupted_bitmap(&name)?;
        // Checkpoints of earlier bitmap backups do not follow what this
        // method does to the disks: they go (the next bitmap backup is full).
        for c in crate::engine::bitmap::prune_stale_checkpoints(vm)? {
            log::info!("backup of {name}: deleted checkpoint {c} of an earlier bitmap backup (snapshot method now)");
        }
        if let Some(j) = self.load_journal(&name)? {
            return Err(KnibError::new(
                ErrorKind::VmInconsistent,
                format!(
                    "backup {} of domain {name} was interrupted at its {} step; run `knib recover` first",
                    j.plan.backup_id,
                    j.step.as_str()
                ),
            ));
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
        let super::head::Decision { kind, parent, position, end_of_chain, full_reason } =
            self.decide(&name, &sources, opts, &follows)?;
        let id = match id {
            Some(id) => {
                crate::names::validate("backup id", id)?;
                id.to_string()
            }
            None => super::new_backup_id(),
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
                    dest: part.join(format!("{}.qcow2", s.info.target)),
                    parent: parent.as_ref().map(|p| super::manifest::parent_file_ref(p, &s.info.target)),
                    virtual_size: s.virtual_size,
                    snapshots: Vec::new(),
                })
                .collect(),
            data_path: super::settings::Settings::load(&self.root)?.data_path,
            compress: opts.compress,
        };
        crate::crashpoint::durable_step(&format!("creation of {}", part.display()));
        fs::create_dir(&part).map_err(|e| KnibError::io("cannot create", &part, e))?;
        let mut m = Manifest::new(&id, &name, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        m.full_reason = full_reason;
        let final_dir = self.vm_dir(&name).join(&id);
        let result = live::take(
            &q,
            vm,
            &plan,
            ctl,
            &mut |step| {
                self.record(&name, &plan, step)?;
                hook(step).map_err(|e| if step == LiveStep::Snapshot { e.with_vm_consistent(true) } else { e })
            },
            &mut |vols| {
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
                self.publish(&m, &part)
            },
        );
        match result {
            Ok(_) => {
                fsio::remove_if_exists(&self.journal_path(&name))?;
                Ok(m)
            }
            Err(e) => {
                if !final_dir.exists() {
                    let _ = fs::remove_dir_all(&part);
                }
                if e.vm_consistent == Some(true) {
                    let _ = fsio::remove_if_exists(&self.journal_path(&name));
                }
                Err(e)
            }
        }
    }

    /// Finish or undo an interrupted backup of a domain, so it runs on
    /// `base` or `base <- one delta` with every write kept, and the store
    /// holds no partial backup.
    pub fn recover_domain(&self, vm: &Vm, ctl: &Control) -> Result<RecoverOutcome> {
        let name = vm.name().to_string();
        let _lock = self.lock_vm(&name, &format!("recovery of {name}"))?;
        if let Some(out) = self.recover_bitmap(vm)? {
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
        super::journal_check::check_plan(&j.plan, &self.journal_path(&name), &name, &chains)?;
        let published = self.vm_dir(&name).join(&j.plan.backup_id).join("manifest.json").exists();
        let report = live::recover(&self.qemu_img, vm, &j.plan, published, ctl)?;
        // The disks now follow the published backup: the state says so too
        // (a crash may have come between publishing and recording it).
        if published && j.plan.kind != crate::engine::BackupKind::Isolated {
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
        fsio::remove_if_exists(&self.journal_path(&name))?;
        Ok(RecoverOutcome { backup_id: Some(j.plan.backup_id), step: Some(j.step), published, report })
    }

    /// Quick restore: the stopped domain `vm` is pointed at new qcow2
    /// overlays whose backing files are backup `id`'s files, one per disk
    /// target named in the backup, and started at once. The overlays are
    /// created beside the disks' current files as
    /// `<target>-restored-<id>.qcow2`; the old files are left untouched.
    /// Returns each target and its overlay.
    pub fn quick_restore_domain(&self, id: &str, vm: &Vm, ctl: &Control) -> Result<Vec<(String, PathBuf)>> {
        let m = self.show(id)?;
        let targets = quick_restore_targets(&m, vm)?;
        let mut plan = Vec::new();
        for (target, _, overlay) in &targets {
            let top = self.chain_files(&m, target)?.pop().expect("non-empty chain");
            plan.push((target.clone(), top, overlay.clone()));
        }
        let mut made = Vec::new();
        let r = (|| -> Result<()> {
            for (_, top, overlay) in &plan {
                crate::engine::create_overlay(&self.qemu_img, top, overlay, ctl)?;
                made.push(overlay.clone());
            }
            let sources: Vec<(String, PathBuf)> = plan.iter().map(|(t, _, o)| (t.clone(), o.clone())).collect();
            let old: Vec<(String, PathBuf)> = targets.iter().map(|(t, f, _)| (t.clone(), f.clone())).collect();
            vm.set_disk_sources(&sources)?;
            if let Err(e) = vm.start() {
                let _ = vm.set_disk_sources(&old);
                return Err(e);
            }
            Ok(())
        })();
        if let Err(e) = r {
            for f in &made {
                let _ = fsio::remove_if_exists(f);
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
    Ok(out)
}

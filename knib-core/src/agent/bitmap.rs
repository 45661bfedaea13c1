//! `agent.take_backup` and `agent.cleanup_vm_backup` with `method:
//! "bitmap"`: the CloudStack agent's backups of a running domain by
//! libvirt checkpoints and a pull-mode backup job
//! ([`crate::engine::bitmap`]), in the agent's store layout (the files
//! the request names). The disks' chains are left as they are.
//!
//! # The checkpoint of a backup
//!
//! A backup's checkpoint is `knib-<id>`, `<id>` the file name of its first
//! volume's `delta_path_on_store` (CloudStack names each backup file by a
//! uuid of its own). An incremental backup follows the checkpoint of its
//! parent, found by the file name of a volume's `parent_backup_path`, never
//! by "the newest checkpoint": a checkpoint left by a backup the management
//! server never recorded is not followed.
//!
//! When the parent's checkpoint cannot be followed (it is gone, a bitmap
//! is missing, inconsistent or not recording, a disk is raw) the backup
//! still writes an exact incremental of its parent: every cluster is
//! copied over it (zero clusters as zeros), and the answer's
//! `full_reason` says why it is as large as a full backup.
//!
//! # Cleanup
//!
//! `agent.cleanup_vm_backup` with `method: "bitmap"` ends a backup job left
//! running, deletes the failed backup's checkpoint (its bitmap is merged
//! into the one before it, so the parent's checkpoint still covers every
//! write) and its NBD work directory, and removes its store files
//! (`discard`); with `complete` and every store file present, the backup
//! is kept and the older checkpoints are deleted as after a backup.

use super::*;
use crate::engine::bitmap::{self as engine_bitmap, BitmapDisk, BitmapPlan};
use crate::engine::take::BackupKind;
use crate::libvirt::backup::checkpoint_name;
use crate::libvirt::{disk_on, domain, DiskInfo, Vm};
use crate::qcow2::relative_pointer;

/// The backup id a store file stands for: its file name.
fn id_of(op: &str, what: &str, file: &Path) -> Result<String> {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    crate::names::validate("backup id", &name).map_err(|e| {
        KnibError::invalid(format!(
            "request of {op}: the file name of {what} ({}) names the backup's checkpoint with method `bitmap`, and {e}",
            file.display()
        ))
    })?;
    Ok(name)
}

/// The plan of a bitmap backup from the request, and why an incremental
/// one copies every cluster, if it does.
fn plan(op: &str, vm: &Vm, r: &TakeReq) -> Result<(BitmapPlan, Option<String>)> {
    non_empty(op, "volumes", &r.volumes)?;
    if r.running == Some(false) {
        return Err(KnibError::invalid(format!(
            "request of {op}: method `bitmap` backs up a running domain, and field `running` is false"
        )));
    }
    let kind = super::stopped::kind_of(op, r)?;
    let disks: Vec<DiskInfo> = engine_bitmap::inspect(vm)?;
    let mut planned: Vec<BitmapDisk> = Vec::new();
    let mut chosen: Vec<DiskInfo> = Vec::new();
    for (i, v) in r.volumes.iter().enumerate() {
        let field = |f: &str| format!("volumes[{i}].{f}");
        super::check_volume(op, i, v, false)?;
        if v.merge.is_some() || !v.vm_snapshot_delta_paths.is_empty() {
            return Err(KnibError::invalid(format!(
                "request of {op}: volume {}: method `bitmap` merges nothing: `merge` and `vm_snapshot_delta_paths` must be absent",
                v.uuid
            )));
        }
        if v.delta_path_on_store.exists() {
            return Err(KnibError::invalid(format!(
                "volume {}: {} already exists on the store",
                v.uuid,
                v.delta_path_on_store.display()
            )));
        }
        let disk = disk_on(vm, &disks, &v.path)?;
        if chosen.iter().any(|d| d.target == disk.target) {
            return Err(KnibError::invalid(format!(
                "request of {op}: two volumes are the same disk {} (volume {})",
                disk.target, v.uuid
            )));
        }
        let dest_dir = crate::fsio::parent_dir(&v.delta_path_on_store);
        let parent = match &v.parent_backup_path {
            Some(p) => {
                absolute(op, &field("parent_backup_path"), p)?;
                if !p.is_file() {
                    return Err(KnibError::not_found(format!(
                        "volume {}: the parent backup {} does not exist",
                        v.uuid,
                        p.display()
                    )));
                }
                Some(relative_pointer(dest_dir, p))
            }
            None => None,
        };
        chosen.push(disk.clone());
        planned.push(BitmapDisk {
            target: disk.target.clone(),
            file: disk.file.clone(),
            dest: v.delta_path_on_store.clone(),
            parent,
        });
    }
    let id = id_of(op, "volumes[0].delta_path_on_store", &r.volumes[0].delta_path_on_store)?;
    // The parent's checkpoint, and whether every disk's bitmap follows it.
    let mut full_reason = None;
    let since = if kind == BackupKind::Incremental {
        let mut parents = Vec::new();
        for (i, v) in r.volumes.iter().enumerate() {
            if let Some(p) = &v.parent_backup_path {
                parents.push(id_of(op, &format!("volumes[{i}].parent_backup_path"), p)?);
            }
        }
        let have = crate::libvirt::backup::checkpoints(vm)?;
        match parents.iter().find(|p| have.contains(&checkpoint_name(p))) {
            None => {
                full_reason = Some(format!(
                    "domain {} has no checkpoint of the parent backup ({}): the parent was not taken by method bitmap, or its checkpoint was removed",
                    vm.name(),
                    parents.iter().map(|p| checkpoint_name(p)).collect::<Vec<_>>().join(" or ")
                ));
                None
            }
            Some(p) => match engine_bitmap::tracks(vm, &chosen, p)? {
                Ok(()) => Some(checkpoint_name(p)),
                Err(why) => {
                    full_reason = Some(why);
                    None
                }
            },
        }
    } else {
        None
    };
    if let Some(why) = &full_reason {
        log::warn!("{op}: domain {}: {why}; every cluster is copied over the parent backup", vm.name());
    }
    let end_of_chain = r.end_of_chain && kind != BackupKind::Isolated;
    let raw = chosen.iter().any(|d| d.format != "qcow2");
    let checkpoint = (kind != BackupKind::Isolated && !end_of_chain && !raw).then(|| checkpoint_name(&id));
    // Beside the first volume's file: QEMU reaches it (it runs the disk
    // there) and writes the export's scratch files in it.
    let work_dir = crate::fsio::parent_dir(&chosen[0].file).join(format!(".knib-{id}.nbd"));
    let plan = BitmapPlan {
        backup_id: id,
        kind,
        end_of_chain,
        quiesce: r.quiesce,
        disks: planned,
        work_dir,
        since,
        checkpoint,
        compress: None,
    };
    Ok((plan, full_reason))
}

/// `agent.take_backup` with method `bitmap`.
pub(crate) fn take_backup(op: &str, r: &TakeReq, ctl: &Control) -> Result<TakeBackupAnswer> {
    // Until the backup job starts, nothing has changed.
    let consistent = |e: KnibError| if e.vm_consistent.is_none() { e.with_vm_consistent(true) } else { e };
    let vm = domain(r.connect.as_deref(), r.domain.as_deref().unwrap_or_default()).map_err(consistent)?;
    engine_bitmap::refuse_running_job(&vm).map_err(consistent)?;
    let (plan, full_reason) = plan(op, &vm, r).map_err(consistent)?;
    for d in &plan.disks {
        let dir = crate::fsio::parent_dir(&d.dest);
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| consistent(KnibError::io("cannot create", dir, e)))?;
        }
    }
    log::info!(
        "{op}: {} backup of domain {} by bitmap ({} volumes{})",
        plan.kind.as_str(),
        vm.name(),
        plan.disks.len(),
        plan.since.as_deref().map(|s| format!(", changes since {s}")).unwrap_or_default()
    );
    let results = engine_bitmap::take(&vm, &plan, ctl, &mut |_| Ok(()), &mut |_| Ok(()))?;
    let mut answer = TakeBackupAnswer::of(plan.kind.as_str(), &r.volumes, &results, true);
    answer.full_reason = full_reason;
    Ok(answer)
}

/// `agent.cleanup_vm_backup` with method `bitmap`.
pub(crate) fn cleanup_vm_backup(op: &str, r: &TakeReq, mode: CleanupMode) -> Result<CleanupVmBackupAnswer> {
    let vm = domain(r.connect.as_deref(), r.domain.as_deref().unwrap_or_default())?;
    non_empty(op, "volumes", &r.volumes)?;
    let id = id_of(op, "volumes[0].delta_path_on_store", &r.volumes[0].delta_path_on_store)?;
    let disks = vm.disks()?;
    let mut planned = Vec::new();
    for (i, v) in r.volumes.iter().enumerate() {
        absolute(op, &format!("volumes[{i}].path"), &v.path)?;
        absolute(op, &format!("volumes[{i}].delta_path_on_store"), &v.delta_path_on_store)?;
        let disk = disk_on(&vm, &disks, &v.path)?;
        planned.push(BitmapDisk {
            target: disk.target.clone(),
            file: disk.file.clone(),
            dest: v.delta_path_on_store.clone(),
            parent: None,
        });
    }
    let published = planned.iter().all(|d| d.dest.is_file());
    let finish = published && mode == CleanupMode::Complete;
    let kind = super::stopped::kind_of(op, r)?;
    let plan = BitmapPlan {
        backup_id: id.clone(),
        kind,
        end_of_chain: r.end_of_chain && kind != BackupKind::Isolated,
        quiesce: false,
        work_dir: crate::fsio::parent_dir(&planned[0].file).join(format!(".knib-{id}.nbd")),
        since: None,
        // None after an isolated backup or one that ends its chain.
        checkpoint: (kind != BackupKind::Isolated && !r.end_of_chain).then(|| checkpoint_name(&id)),
        disks: planned,
        compress: None,
    };
    let store_files: Vec<(&str, &Path)> = plan.disks.iter().map(|d| (d.target.as_str(), d.dest.as_path())).collect();
    let (mut actions, removed_from_store) = clean_store(&store_files, published, finish)?;
    let done = engine_bitmap::recover(&vm, &plan, finish).map_err(|e| {
        e.context(format!("cleanup of the bitmap backup of domain {}", vm.name())).with_vm_consistent(false)
    })?;
    actions.extend(done);
    for a in &actions {
        log::info!("{op}: domain {}: {a}", vm.name());
    }
    let volumes = r
        .volumes
        .iter()
        .zip(&plan.disks)
        .map(|(v, d)| VolumeState {
            uuid: Some(v.uuid.clone()),
            target: Some(d.target.clone()),
            path: Some(d.file.clone()),
        })
        .collect();
    Ok(CleanupVmBackupAnswer {
        mode: mode.as_str().to_string(),
        published,
        vm_consistent: true,
        volumes,
        actions,
        removed_from_store,
        vm_running: vm.is_running()?,
    })
}

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
//! is missing, inconsistent or not recording, a raw disk's bitmap was lost
//! with a VM restart, a stopped VM's raw disk cannot store one) the backup
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
use crate::engine::bitmap_stopped as engine_stopped;
use crate::engine::take::BackupKind;
use crate::libvirt::backup::checkpoint_name;
use crate::libvirt::{disk_on, domain, DiskInfo, Vm};
use crate::qcow2::relative_pointer;
use crate::qemu_img::QemuImg;

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

/// The disks of the VM: a running domain's (`Some(true)`), a stopped
/// domain's, or (no domain) the volumes' files, named `vol0`, `vol1`, ...
/// in the request's order, in the format `qemu-img info` reads.
fn vm_disks(op: &str, vm: Option<&Vm>, r: &TakeReq, q: &QemuImg, ctl: &Control) -> Result<(Vec<DiskInfo>, bool)> {
    match vm {
        Some(vm) if vm.is_running()? => Ok((engine_bitmap::inspect(vm)?, true)),
        Some(vm) => Ok((engine_stopped::inspect(vm)?, false)),
        None => {
            let mut disks = Vec::new();
            for (i, v) in r.volumes.iter().enumerate() {
                absolute(op, &format!("volumes[{i}].path"), &v.path)?;
                // As the snapshot method has it: the chain the copy reads.
                let format = super::volume_chain(op, &v.uuid, &v.path, q, ctl)?.swap_remove(0).format;
                if format != "qcow2" && format != "raw" {
                    return Err(KnibError::invalid(format!(
                        "volume {}: {} is a {format} image: knib backs up qcow2 and raw disks",
                        v.uuid,
                        v.path.display()
                    )));
                }
                disks.push(DiskInfo {
                    target: format!("vol{i}"),
                    bus: None,
                    file: v.path.clone(),
                    format,
                    backing_chain: Vec::new(),
                    alias: None,
                    read_only: false,
                });
            }
            Ok((disks, false))
        }
    }
}

/// The disk of `disks` volume `path` is.
fn disk_of<'d>(vm: Option<&Vm>, disks: &'d [DiskInfo], path: &Path) -> Result<&'d DiskInfo> {
    match vm {
        Some(vm) => disk_on(vm, disks, path),
        None => disks
            .iter()
            .find(|d| d.file == path)
            .ok_or_else(|| KnibError::internal(format!("no disk for {}", path.display()))),
    }
}

/// The plan of a bitmap backup from the request, and why an incremental
/// one copies every cluster, if it does.
fn plan(op: &str, vm: Option<&Vm>, r: &TakeReq, q: &QemuImg, ctl: &Control) -> Result<(BitmapPlan, Option<String>)> {
    non_empty(op, "volumes", &r.volumes)?;
    let kind = super::kind_of(op, r, false)?;
    let (disks, running) = vm_disks(op, vm, r, q, ctl)?;
    let who = vm.map(|v| format!("domain {}", v.name())).unwrap_or_else(|| "the VM".into());
    if r.running == Some(false) && running {
        return Err(KnibError::invalid(format!("request of {op}: field `running` is false, and {who} is running")));
    }
    let mut planned: Vec<BitmapDisk> = Vec::new();
    let mut chosen: Vec<DiskInfo> = Vec::new();
    super::check_volumes(op, &r.volumes, false)?;
    for (i, v) in r.volumes.iter().enumerate() {
        let field = |f: &str| format!("volumes[{i}].{f}");
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
        let disk = disk_of(vm, &disks, &v.path)?;
        if chosen.iter().any(|d| d.target == disk.target) {
            return Err(KnibError::invalid(format!(
                "request of {op}: two volumes are the same disk {} (volume {})",
                disk.target, v.uuid
            )));
        }
        let dest_dir = crate::fsio::parent_dir(&v.delta_path_on_store);
        let parent = match &v.parent_backup_path {
            Some(p) => {
                super::check_parent_backup(op, &field("parent_backup_path"), &v.uuid, p)?;
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
            format: disk.format.clone(),
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
        let followed = match vm {
            Some(vm) if running => {
                let have = crate::libvirt::backup::checkpoints(vm)?;
                match parents.iter().find(|p| have.contains(&checkpoint_name(p))) {
                    None => Err(format!(
                        "domain {} has no checkpoint of the parent backup ({}): the parent was not taken by method bitmap, or its checkpoint was removed",
                        vm.name(),
                        parents.iter().map(|p| checkpoint_name(p)).collect::<Vec<_>>().join(" or ")
                    )),
                    Some(p) => engine_bitmap::tracks(vm, &chosen, p)?.map(|()| p.clone()),
                }
            }
            _ => match parents.first() {
                None => Err("the request names no parent backup".to_string()),
                Some(p) => engine_stopped::tracks(q, &planned, p, ctl)?.map(|()| p.clone()),
            },
        };
        match followed {
            Ok(p) => Some(checkpoint_name(&p)),
            Err(why) => {
                full_reason = Some(why);
                None
            }
        }
    } else {
        None
    };
    if let Some(why) = &full_reason {
        log::warn!("{op}: {who}: {why}; every cluster is copied over the parent backup");
    }
    let end_of_chain = r.end_of_chain && kind != BackupKind::Isolated;
    // A running domain's raw disk carries a bitmap of knib's own, in QEMU's
    // memory; a stopped VM's must be a qcow2 (v3) file to carry one.
    let can_carry = running || engine_stopped::cannot_carry(q, &planned, ctl)?.is_none();
    let checkpoint = (kind != BackupKind::Isolated && !end_of_chain && can_carry).then(|| checkpoint_name(&id));
    // Beside the first volume's file: QEMU reaches it (it runs the disk
    // there) and writes the export's scratch files in it.
    let work_dir = crate::fsio::parent_dir(&chosen[0].file).join(format!(".knib-{id}.nbd"));
    let plan = BitmapPlan {
        backup_id: id,
        kind,
        end_of_chain,
        quiesce: r.quiesce && running,
        disks: planned,
        work_dir,
        since,
        checkpoint,
        compress: None,
        check_output: false,
        stopped: !running,
    };
    Ok((plan, full_reason))
}

/// The libvirt domain of the request, if it names one.
fn domain_of(r: &TakeReq) -> Result<Option<Vm>> {
    r.domain.as_deref().map(|d| domain(r.connect.as_deref(), d)).transpose()
}

/// `agent.take_backup` with method `bitmap`: a running domain by a backup
/// job, a stopped one or a VM without a domain by persistent bitmaps.
pub(crate) fn take_backup(op: &str, r: &TakeReq, ctl: &Control) -> Result<TakeBackupAnswer> {
    // Until the exports start, nothing has changed.
    let consistent = |e: KnibError| if e.vm_consistent.is_none() { e.with_vm_consistent(true) } else { e };
    let q = QemuImg::new();
    let vm = domain_of(r).map_err(consistent)?;
    if let Some(vm) = &vm {
        let remedy =
            "if it is the job of a backup knib took and did not end, send agent.cleanup_vm_backup for that backup";
        engine_bitmap::refuse_running_job(vm, remedy).map_err(consistent)?;
    }
    if vm.is_none() {
        let files: Vec<&Path> = r.volumes.iter().map(|v| v.path.as_path()).collect();
        crate::lock::ensure_unused(&files, &format!("{op} of a VM without a domain")).map_err(consistent)?;
    }
    let (plan, full_reason) = plan(op, vm.as_ref(), r, &q, ctl).map_err(consistent)?;
    for d in &plan.disks {
        let dir = crate::fsio::parent_dir(&d.dest);
        if !dir.is_dir() {
            crate::fsio::create_dir_all_durable(dir).map_err(consistent)?;
        }
    }
    log::info!(
        "{op}: {} backup of {} by bitmap ({} volumes{})",
        plan.kind.as_str(),
        vm.as_ref().map(|v| format!("domain {}", v.name())).unwrap_or_else(|| "a VM without a domain".into()),
        plan.disks.len(),
        plan.since.as_deref().map(|s| format!(", changes since {s}")).unwrap_or_default()
    );
    let results = if plan.stopped {
        engine_stopped::take(&q, vm.as_ref(), &plan, ctl, &mut |_| Ok(()), None, &mut |_| Ok(()))?
    } else {
        let vm = vm.as_ref().ok_or_else(|| KnibError::internal("a running VM without a domain"))?;
        engine_bitmap::take(vm, &plan, ctl, &mut |_| Ok(()), None, &mut |_| Ok(()))?
    };
    let mut answer = TakeBackupAnswer::of(plan.kind.as_str(), &r.volumes, &results, vm.is_some());
    answer.full_reason = full_reason;
    Ok(answer)
}

/// `agent.cleanup_vm_backup` with method `bitmap`.
pub(crate) fn cleanup_vm_backup(
    op: &str,
    r: &TakeReq,
    mode: CleanupMode,
    ctl: &Control,
) -> Result<CleanupVmBackupAnswer> {
    let vm = domain_of(r)?;
    non_empty(op, "volumes", &r.volumes)?;
    let id = id_of(op, "volumes[0].delta_path_on_store", &r.volumes[0].delta_path_on_store)?;
    let q = QemuImg::new();
    let (disks, running) = vm_disks(op, vm.as_ref(), r, &q, ctl)?;
    let mut planned = Vec::new();
    // As a backup's: the backup file the cleanup may remove is never a
    // file of a volume nor one of a parent backup's chain (a request
    // naming a disk as `delta_path_on_store` had the disk removed).
    super::check_volumes(op, &r.volumes, false)?;
    for v in &r.volumes {
        let disk = disk_of(vm.as_ref(), &disks, &v.path)?;
        planned.push(BitmapDisk {
            target: disk.target.clone(),
            file: disk.file.clone(),
            dest: v.delta_path_on_store.clone(),
            parent: None,
            format: disk.format.clone(),
        });
    }
    let published = planned.iter().all(|d| d.dest.is_file());
    let finish = published && mode == CleanupMode::Complete;
    let kind = super::kind_of(op, r, false)?;
    let since = match (kind, r.volumes.iter().enumerate().find_map(|(i, v)| Some((i, v.parent_backup_path.as_ref()?))))
    {
        (BackupKind::Incremental, Some((i, p))) => {
            Some(checkpoint_name(&id_of(op, &format!("volumes[{i}].parent_backup_path"), p)?))
        }
        _ => None,
    };
    let plan = BitmapPlan {
        backup_id: id.clone(),
        kind,
        end_of_chain: r.end_of_chain && kind != BackupKind::Isolated,
        // A running guest the backup left frozen (killed between its
        // freeze and its thaw) is thawed: the cleanup's request does not
        // say whether the backup quiesced (CloudStack's cleanup command
        // does not carry it), so its agent is asked.
        quiesce: running,
        work_dir: crate::fsio::parent_dir(&planned[0].file).join(format!(".knib-{id}.nbd")),
        // An incremental's parent, whose raw disks' bitmaps the undo
        // turns on again and merges the backup's own back into (a bitmap
        // that is not there is left alone).
        since,
        // None after an isolated backup or one that ends its chain.
        checkpoint: (kind != BackupKind::Isolated && !r.end_of_chain).then(|| checkpoint_name(&id)),
        disks: planned,
        compress: None,
        check_output: false,
        stopped: !running,
    };
    let store_files: Vec<(&str, &Path)> = plan.disks.iter().map(|d| (d.target.as_str(), d.dest.as_path())).collect();
    let (mut actions, removed_from_store) = clean_store(&store_files, published, finish)?;
    let who = vm.as_ref().map(|v| format!("domain {}", v.name())).unwrap_or_else(|| "a VM without a domain".into());
    let done = match &vm {
        Some(vm) if running => engine_bitmap::recover(vm, &plan, finish),
        _ => engine_stopped::recover(&q, vm.as_ref(), &plan, finish, ctl),
    }
    .map_err(|e| e.context(format!("cleanup of the bitmap backup of {who}")).with_vm_consistent(false))?;
    actions.extend(done);
    for a in &actions {
        log::info!("{op}: {who}: {a}");
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
        vm_running: match &vm {
            Some(vm) => vm.is_running()?,
            None => false,
        },
    })
}

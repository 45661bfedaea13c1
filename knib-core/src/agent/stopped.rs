//! The agent operations for a stopped VM that libvirt does not know
//! (`running: false`, no `domain`): `agent.take_backup`,
//! `agent.cleanup_vm_backup` and `agent.merge_snapshot` on the volumes'
//! files alone, through [`crate::engine::stopped`] (see the module
//! documentation of [`crate::agent`]). Needs no libvirt.

use super::*;
use crate::engine::stopped::{self as files_engine, FilesDisk, FilesPlan};
use crate::engine::take::BackupKind;
use crate::lock::{ensure_unused, hold_for_one_operation};
use crate::qcow2::relative_pointer;

/// The plan of a backup of a VM without a domain, from the request's paths
/// and the files; `take` says whether the backup is about to be taken (the
/// new files must not exist yet, the store directory is created) or
/// cleaned up.
fn plan(op: &str, q: &QemuImg, r: &TakeReq, take: bool, ctl: &Control) -> Result<FilesPlan> {
    non_empty(op, "volumes", &r.volumes)?;
    let kind = kind_of(op, r, true)?;
    let mut disks: Vec<FilesDisk> = Vec::new();
    super::check_volumes(op, &r.volumes, true)?;
    for (i, v) in r.volumes.iter().enumerate() {
        let field = |f: &str| format!("volumes[{i}].{f}");
        // Absolute, as every path (check_volumes).
        if let (Some(p), true) = (&v.parent_backup_path, take) {
            super::check_parent_backup(op, &field("parent_backup_path"), &v.uuid, p)?;
        }
        if let Some(m) = &v.merge {
            match v.vm_snapshot_delta_paths.first() {
                None if !same_file(&m.child, &v.path) => {
                    return Err(KnibError::invalid(format!(
                        "request of {op}: volume {}: `merge.child` ({}) must be the file the volume runs on ({}) when no VM snapshot was taken since the last backup",
                        v.uuid,
                        m.child.display(),
                        v.path.display()
                    )));
                }
                Some(first) if !same_file(first, &m.child) => {
                    return Err(KnibError::invalid(format!(
                        "request of {op}: volume {}: `vm_snapshot_delta_paths[0]` ({}) must be `merge.child` ({}), the delta the VM snapshots since the last backup were taken over",
                        v.uuid,
                        first.display(),
                        m.child.display()
                    )));
                }
                _ => {}
            }
        } else if !v.vm_snapshot_delta_paths.is_empty() {
            return Err(KnibError::invalid(format!(
                "request of {op}: volume {}: `vm_snapshot_delta_paths` needs `merge` (the delta below the VM snapshots as `merge.child`, its base as `merge.parent`)",
                v.uuid
            )));
        }
        // The VM snapshot deltas over `merge.child`, oldest first, ending
        // with the file the volume runs on.
        let snapshots: Vec<PathBuf> = match v.vm_snapshot_delta_paths.split_first() {
            Some((_, rest)) => rest.iter().cloned().chain([v.path.clone()]).collect(),
            None => Vec::new(),
        };
        if let Some(o) = r.volumes[..i].iter().position(|o| same_file(&o.path, &v.path)) {
            return Err(KnibError::invalid(format!(
                "request of {op}: volumes {} and {} are the same file {}",
                r.volumes[o].uuid,
                v.uuid,
                v.path.display()
            )));
        }
        let mut virtual_size = 0;
        if take {
            fsio::require_file(&v.path, &format!("volume {}: ", v.uuid), false)?;
            for (what, f) in [("the new delta", &v.delta_path_on_primary), ("the backup file", &v.delta_path_on_store)]
            {
                // Any entry, a dangling link too (qemu-img would create the
                // new delta where it leads).
                if std::fs::symlink_metadata(f).is_ok() {
                    return Err(KnibError::invalid(format!(
                        "volume {}: {what} {} already exists",
                        v.uuid,
                        f.display()
                    )));
                }
            }
            // The chain below the volume, which the copy reads.
            let chain = super::volume_chain(op, &v.uuid, &v.path, q, ctl)?;
            let info = &chain[0];
            if info.format != "qcow2" {
                return Err(KnibError::invalid(format!(
                    "volume {}: {} is {}, not qcow2",
                    v.uuid,
                    v.path.display(),
                    info.format
                )));
            }
            virtual_size = info.virtual_size;
            match &v.merge {
                Some(m) => {
                    // Below `path`, from the top down: the VM snapshot
                    // deltas but the first, newest first, `merge.child`
                    // (with VM snapshots; else it is `path`),
                    // `merge.parent`.
                    let mut want: Vec<(&str, &Path)> = Vec::new();
                    for s in v.vm_snapshot_delta_paths.iter().skip(1).rev() {
                        want.push(("vm_snapshot_delta_paths", s));
                    }
                    if !v.vm_snapshot_delta_paths.is_empty() {
                        want.push(("merge.child", &m.child));
                    }
                    want.push(("merge.parent", &m.parent));
                    let mut upper = v.path.clone();
                    for (k, (name, f)) in want.iter().enumerate() {
                        let below = chain.get(k + 1).map(|i| PathBuf::from(&i.filename));
                        if !below.as_deref().is_some_and(|b| same_file(b, f)) {
                            return Err(KnibError::invalid(format!(
                                "request of {op}: volume {}: {} has {} below it, not `{name}` {}",
                                v.uuid,
                                upper.display(),
                                below.map(|b| b.display().to_string()).unwrap_or_else(|| "nothing".into()),
                                f.display()
                            )));
                        }
                        upper = f.to_path_buf();
                    }
                }
                None if v.parent_backup_path.is_some() => {
                    return Err(KnibError::invalid(format!(
                        "request of {op}: volume {}: an incremental volume copies the delta written since its parent backup: give it as `merge.child` (with its base as `merge.parent`)",
                        v.uuid
                    )));
                }
                None => {}
            }
        }
        let dest_dir = fsio::parent_dir(&v.delta_path_on_store);
        if take && !dest_dir.is_dir() {
            fsio::create_dir_all_durable(dest_dir)?;
        }
        let (base, old_delta, grand_children) = match &v.merge {
            Some(m) => (m.parent.clone(), Some(m.child.clone()), m.grand_children.clone()),
            None => (v.path.clone(), None, Vec::new()),
        };
        disks.push(FilesDisk {
            name: v.uuid.clone(),
            base,
            old_delta,
            new_delta: v.delta_path_on_primary.clone(),
            dest: v.delta_path_on_store.clone(),
            parent: v.parent_backup_path.as_deref().map(|p| relative_pointer(dest_dir, p)),
            virtual_size,
            grand_children,
            snapshots,
        });
    }
    Ok(FilesPlan {
        kind,
        end_of_chain: r.end_of_chain && kind != BackupKind::Isolated,
        disks,
        data_path: Default::default(),
        compress: None,
        check_output: false,
    })
}

/// Refuse method `bitmap` for a VM without a domain when knib is built
/// without libvirt (the bitmap method's NBD client comes with it).
#[cfg(not(feature = "libvirt"))]
fn refuse_bitmap(op: &str, r: &TakeReq) -> Result<()> {
    if r.method == engine::BackupMethod::Bitmap {
        return Err(KnibError::invalid(format!(
            "request of {op}: method `bitmap` needs knib built with its libvirt part"
        )));
    }
    Ok(())
}

/// `agent.take_backup` of a VM without a domain.
pub(crate) fn take_backup(op: &str, r: &TakeReq, ctl: &Control) -> Result<TakeBackupAnswer> {
    #[cfg(feature = "libvirt")]
    if r.method == engine::BackupMethod::Bitmap {
        return super::bitmap::take_backup(op, r, ctl);
    }
    #[cfg(not(feature = "libvirt"))]
    refuse_bitmap(op, r).map_err(|e| e.with_vm_consistent(true))?;
    let q = QemuImg::new();
    // Until the new deltas exist, nothing has changed.
    let consistent = |e: KnibError| if e.vm_consistent.is_none() { e.with_vm_consistent(true) } else { e };
    ensure_unused(&super::named_files(r), &format!("{op} of a VM without a domain")).map_err(consistent)?;
    let plan = plan(op, &q, r, true, ctl).map_err(consistent)?;
    log::info!("{op}: {} backup of {} volumes without a domain", plan.kind.as_str(), plan.disks.len());
    let answer = files_engine::take(&q, &plan, ctl).map_err(consistent)?;
    Ok(TakeBackupAnswer::of(plan.kind.as_str(), &r.volumes, &answer.volumes, false))
}

/// `agent.cleanup_vm_backup` of a VM without a domain: decided from the
/// files (with mode "complete" and every `delta_path_on_store` present:
/// finish; else discard: the store files removed, the new deltas undone),
/// after testing every file on primary for QEMU's locks.
pub(crate) fn cleanup_vm_backup(
    op: &str,
    r: &TakeReq,
    mode: CleanupMode,
    ctl: &Control,
) -> Result<CleanupVmBackupAnswer> {
    #[cfg(feature = "libvirt")]
    if r.method == engine::BackupMethod::Bitmap {
        return super::bitmap::cleanup_vm_backup(op, r, mode, ctl);
    }
    #[cfg(not(feature = "libvirt"))]
    refuse_bitmap(op, r)?;
    let q = QemuImg::new();
    ensure_unused(&super::named_files(r), &format!("{op} of a VM without a domain"))?;
    let plan = plan(op, &q, r, false, ctl)?;
    files_engine::require_still_described(&plan).map_err(|e| e.context(format_args!("request of {op}")))?;
    let published = plan.disks.iter().all(|d| d.dest.is_file());
    let finish = published && mode == CleanupMode::Complete;
    let store_files: Vec<(&str, &Path)> = plan.disks.iter().map(|d| (d.name.as_str(), d.dest.as_path())).collect();
    let (mut actions, removed_from_store) = clean_store(&store_files, published, finish)?;
    let rep = files_engine::recover(&q, &plan, finish, ctl).map_err(|e| {
        let e = e.context("cleanup of the backup of a VM without a domain");
        if e.vm_consistent.is_none() {
            e.with_vm_consistent(false)
        } else {
            e
        }
    })?;
    actions.extend(rep.actions);
    for a in &actions {
        log::info!("{op}: {a}");
    }
    let volumes = r
        .volumes
        .iter()
        .zip(rep.tops)
        .map(|(v, top)| VolumeState { uuid: Some(v.uuid.clone()), target: None, path: Some(top) })
        .collect();
    Ok(CleanupVmBackupAnswer {
        mode: mode.as_str().to_string(),
        published,
        vm_consistent: true,
        volumes,
        actions,
        removed_from_store,
        // Without a domain the VM does not run (its files are not locked).
        vm_running: false,
    })
}

/// `agent.merge_snapshot` of a VM without a domain: each `child` committed
/// into `parent` (its backing file), each of `grand_children` re-pointed
/// at `parent`, `child` removed.
pub(crate) fn merge_snapshot(op: &str, r: &MergeReq, ctl: &Control) -> Result<MergeSnapshotAnswer> {
    if r.merges.is_empty() {
        // The management server ends every whole-VM restore with this
        // request, its list empty when every volume was in the backup:
        // nothing to merge is a success, as on the Java path.
        return Ok(MergeSnapshotAnswer { volumes: Vec::new() });
    }
    let q = QemuImg::new();
    let mut all: Vec<&Path> = Vec::new();
    for (i, m) in r.merges.iter().enumerate() {
        absolute(op, &format!("merges[{i}].parent"), &m.parent)?;
        absolute(op, &format!("merges[{i}].child"), &m.child)?;
        for (j, g) in m.grand_children.iter().enumerate() {
            absolute(op, &format!("merges[{i}].grand_children[{j}]"), g)?;
        }
        all.push(&m.parent);
        all.push(&m.child);
        all.extend(m.grand_children.iter().map(PathBuf::as_path));
    }
    let _held = hold_for_one_operation(&all, &format!("{op} of a VM without a domain"))?;
    ensure_unused(&all, &format!("{op} of a VM without a domain"))?;
    super::refuse_merging_internal_snapshots(op, &r.merges)?;
    let mut out = Vec::new();
    for (i, m) in r.merges.iter().enumerate() {
        let one = || -> Result<MergedVolume> {
            fsio::require_file(&m.child, "", false)?;
            fsio::require_file(&m.parent, "", false)?;
            let below = q.info(&m.child, ctl)?.full_backing_filename.map(PathBuf::from);
            if !below.as_deref().is_some_and(|b| same_file(b, &m.parent)) {
                return Err(KnibError::invalid(format!(
                    "request of {op}: {} has {} below it, not `parent` {}",
                    m.child.display(),
                    below.map(|b| b.display().to_string()).unwrap_or_else(|| "nothing".into()),
                    m.parent.display()
                )));
            }
            files_engine::merge_into_parent(&q, &m.child, &m.parent, &m.grand_children, Default::default(), ctl)
                .map_err(|e| e.context(format!("merge of {} into {}", m.child.display(), m.parent.display())))?;
            Ok(MergedVolume { uuid: m.uuid.clone(), target: None, path: m.parent.clone() })
        };
        out.push(one().map_err(|e| super::merge_failed(e, i, &r.merges[..i]))?);
    }
    Ok(MergeSnapshotAnswer { volumes: out })
}

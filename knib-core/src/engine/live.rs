//! Backups of libvirt domains, running or stopped, through disk-only
//! external snapshots (DESIGN §1).
//!
//! # Shapes on primary storage
//!
//! A disk runs either on its base alone, or on `base <- D` where `D` is a
//! knib delta: a file named `<base file name>.knib-delta-<backup id>` beside
//! the base, holding every write since that backup. A backup:
//!
//! 1. `Snapshot`: one atomic disk-only external snapshot of all the disks
//!    puts a new delta `D'` on each (`base <- D <- D'`);
//! 2. `Copy`: `D` (incremental, with the parent backup as backing file) or
//!    the flattened `base <- D` (full, isolated) is copied to the store;
//! 3. `Publish`: the caller makes the copies visible (the catalog's manifest);
//! 4. `Merge`: `D` is committed into `base` (block commit of a non-active
//!    layer; `qemu-img commit` + rebase when stopped): `base <- D'`;
//! 5. `Pivot`: at the end of a chain `D'` is committed into `base` (active
//!    commit with pivot): `base` alone. For an isolated backup step 4 is
//!    skipped and `D'` goes back into `D`: the chain is as it was.
//!
//! Each step is handed to a journal before it is taken. [`recover`] reads
//! the plan back, looks at the domain's real chains, and finishes or undoes
//! the backup so that the disk runs on `base` or `base <- one delta` with
//! every guest write kept: a published backup is finished; an unpublished
//! one is undone by committing `D'` back into the layer below it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::native::DataPath;
use crate::engine::take::{BackupKind, TakeBackupAnswer, VolumeResult};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::libvirt::{blockjob, blockwait};
use crate::libvirt::{DiskInfo, Vm};
use crate::progress::Control;
use crate::qemu_img::{CompressionLibrary, QemuImg};

/// The marker in the name of a knib delta.
pub const DELTA_MARKER: &str = ".knib-delta-";

/// A step of a live backup, recorded before it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveStep {
    /// The disk-only snapshot of all disks.
    Snapshot,
    /// The copy to the store.
    Copy,
    /// Making the copies visible on the store.
    Publish,
    /// Committing the old delta into the base.
    Merge,
    /// Committing the new delta down and pivoting (end of chain, isolated).
    Pivot,
}

impl LiveStep {
    /// Every step, in order.
    pub const ALL: [LiveStep; 5] =
        [LiveStep::Snapshot, LiveStep::Copy, LiveStep::Publish, LiveStep::Merge, LiveStep::Pivot];

    /// The step's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LiveStep::Snapshot => "snapshot",
            LiveStep::Copy => "copy",
            LiveStep::Publish => "publish",
            LiveStep::Merge => "merge",
            LiveStep::Pivot => "pivot",
        }
    }
}

/// What a backup does to one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPlan {
    /// The guest target (`vda`).
    pub target: String,
    /// The base file.
    pub base: PathBuf,
    /// The knib delta the disk ran on (`D`), if any.
    pub old_delta: Option<PathBuf>,
    /// The new delta the snapshot creates (`D'`).
    pub new_delta: PathBuf,
    /// The backup file on the store.
    pub dest: PathBuf,
    /// The parent backup's file, as the backing pointer of `dest`.
    pub parent: Option<String>,
    /// The guest-visible size.
    pub virtual_size: u64,
    /// The deltas of the disk-only VM snapshots taken over `old_delta`
    /// since the last backup, oldest first, the last the file the disk ran
    /// on (the agent's `vm_snapshot_delta_paths`); they stay. Empty
    /// without VM snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<PathBuf>,
    /// Files outside the disk's chain whose backing file is `old_delta`
    /// (other branches of a VM snapshot tree, the agent's
    /// `merge.grand_children`): re-pointed at `base` once `old_delta` is
    /// merged into it, before `old_delta` is removed. Each is re-pointed
    /// only while its backing file is `old_delta`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grand_children: Vec<PathBuf>,
}

impl DiskPlan {
    /// The file the disk ran on before the backup.
    pub fn old_top(&self) -> &Path {
        self.snapshots.last().map(PathBuf::as_path).or(self.old_delta.as_deref()).unwrap_or(&self.base)
    }

    /// Where the new delta goes at the end of a chain: the base, or the
    /// last VM snapshot delta (the snapshots' deltas stay).
    pub fn end_of_chain_into(&self) -> &Path {
        self.snapshots.last().unwrap_or(&self.base)
    }
}

/// A backup of a domain, planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivePlan {
    /// The id of the backup (names the new deltas).
    pub backup_id: String,
    /// Full, incremental or isolated.
    pub kind: BackupKind,
    /// Collapse to the base afterwards.
    pub end_of_chain: bool,
    /// Freeze the guest's filesystems for the snapshot (needs the agent).
    pub quiesce: bool,
    /// Whether the domain was running when planned.
    pub running: bool,
    /// One entry per disk.
    pub disks: Vec<DiskPlan>,
    /// Native data path (default) or qemu-img for the copies.
    #[serde(default)]
    pub data_path: DataPath,
    /// Compress the backup files as they are copied (one pass).
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

/// How a disk of a domain looks now.
#[derive(Debug, Clone)]
pub struct DiskShape {
    /// The disk as libvirt shows it.
    pub info: DiskInfo,
    /// The base file.
    pub base: PathBuf,
    /// The knib delta above it, if the disk runs on one.
    pub delta: Option<PathBuf>,
    /// Guest-visible size.
    pub virtual_size: u64,
}

/// Whether `p` is named as a knib delta.
pub fn is_delta_name(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.to_string_lossy().contains(DELTA_MARKER))
}

/// The chain of a disk, top first: from libvirt for a running domain, from
/// the files for a stopped one.
pub(crate) fn chain_of(q: &QemuImg, vm_running: bool, d: &DiskInfo, ctl: &Control) -> Result<Vec<PathBuf>> {
    if vm_running {
        return Ok(d.chain_files().into_iter().map(Path::to_path_buf).collect());
    }
    Ok(q.info_chain(&d.file, ctl)?.into_iter().map(|i| PathBuf::from(i.filename)).collect())
}

/// Inspect every file-backed disk of `vm`: each must be qcow2, with no
/// block job running, on its base or on `base <- one knib delta`.
pub fn inspect(q: &QemuImg, vm: &Vm, ctl: &Control) -> Result<Vec<DiskShape>> {
    let running = vm.is_running()?;
    let mut out = Vec::new();
    let disks = vm.disks_to_back_up()?;
    if disks.is_empty() {
        return Err(KnibError::invalid(format!("domain {} has no file-backed disk", vm.name())));
    }
    for d in disks {
        if d.format != "qcow2" {
            return Err(KnibError::invalid(format!(
                "disk {} of domain {} ({}) is {}, not qcow2",
                d.target,
                vm.name(),
                d.file.display(),
                d.format
            )));
        }
        if running && blockjob::block_job_info(vm, &d.target)?.is_some() {
            return Err(KnibError::busy(format!(
                "a block job is running on disk {} of domain {}",
                d.target,
                vm.name()
            )));
        }
        let chain = chain_of(q, running, &d, ctl)?;
        let info = q.info(&d.file, ctl)?;
        let (base, delta) = if is_delta_name(&chain[0]) && chain.len() > 1 {
            if chain.len() > 2 && is_delta_name(&chain[1]) {
                return Err(KnibError::new(
                    ErrorKind::VmInconsistent,
                    format!(
                        "disk {} of domain {} runs on two knib deltas ({} and {}): an earlier backup was interrupted; run recover",
                        d.target,
                        vm.name(),
                        chain[0].display(),
                        chain[1].display()
                    ),
                ));
            }
            (chain[1].clone(), Some(chain[0].clone()))
        } else {
            (chain[0].clone(), None)
        };
        out.push(DiskShape { info: d, base, delta, virtual_size: info.virtual_size });
    }
    Ok(out)
}

/// The name of the new delta of `base` for backup `id`.
pub fn delta_path(base: &Path, id: &str) -> PathBuf {
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    base.with_file_name(format!("{name}{DELTA_MARKER}{id}"))
}

/// The backup a knib delta of `base` was started for: the id in its name
/// `<base file name>.knib-delta-<id>`, when that is how it is named and the
/// id is a valid backup id.
pub fn delta_backup_id(base: &Path, delta: &Path) -> Option<String> {
    let base_name = base.file_name()?.to_str()?;
    let name = delta.file_name()?.to_str()?;
    let id = name.strip_prefix(base_name)?.strip_prefix(DELTA_MARKER)?;
    crate::names::validate("backup id", id).ok()?;
    Some(id.to_string())
}

/// Take a backup of a domain as `plan` says. `journal` is called before
/// each step; `publish` once every copy is durable on the store. On a
/// failure before publishing, the snapshot is undone and the copies deleted
/// (the error says the VM is consistent); a failure after publishing says
/// the VM is left inconsistent, for [`recover`] to finish.
pub fn take(
    q: &QemuImg,
    vm: &Vm,
    plan: &LivePlan,
    ctl: &Control,
    journal: &mut dyn FnMut(LiveStep) -> Result<()>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<TakeBackupAnswer> {
    take_to(q, vm, plan, ctl, journal, None, publish)
}

/// [`take`] with every disk's copy made by `copy_to` when given (the
/// native data path: a vault's upload), instead of into `DiskPlan::dest`
/// (which then only names it).
pub fn take_to(
    q: &QemuImg,
    vm: &Vm,
    plan: &LivePlan,
    ctl: &Control,
    journal: &mut dyn FnMut(LiveStep) -> Result<()>,
    mut copy_to: Option<&mut super::take::CopyTo<'_>>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<TakeBackupAnswer> {
    let direct = copy_to.is_some();
    if direct {
        for d in &plan.disks {
            let f = d.old_top();
            if let Some(why) = super::native::native_refusal(f, copy_mode(d))? {
                return Err(KnibError::invalid(format!(
                    "disk {}: knib's own data path does not copy {} ({why}), and a backup written straight to a vault needs it: back it up into a store",
                    d.target,
                    f.display()
                ))
                .with_vm_consistent(true));
            }
        }
    }
    let old_deltas = plan.disks.iter().filter_map(|d| Some((d.target.as_str(), d.old_delta.as_deref()?)));
    super::refuse_dropping_internal_snapshots(plan.kind, old_deltas).map_err(|e| e.with_vm_consistent(true))?;
    let running = vm.is_running()?;
    let by = MergeBy { running, data_path: plan.data_path };
    journal(LiveStep::Snapshot)?;
    let files: Vec<(String, PathBuf)> = plan.disks.iter().map(|d| (d.target.clone(), d.new_delta.clone())).collect();
    crate::crashpoint::durable_step(&format!("snapshot of domain {}", vm.name()));
    if let Err(e) = vm.snapshot_disk_only(&files, plan.quiesce) {
        return Err(undo_failed_snapshot(q, vm, by, plan, e.context(format!("snapshot of domain {}", vm.name()))));
    }

    let before_publish = (|| -> Result<Vec<VolumeResult>> {
        journal(LiveStep::Copy)?;
        let mut results = Vec::new();
        for d in &plan.disks {
            ctl.check(&format!("copy of disk {}", d.target))?;
            let what = format!("disk {}", d.target);
            if let Some(copy_to) = copy_to.as_mut() {
                let v = super::take::VolumeBackup {
                    name: d.target.clone(),
                    disk: d.old_top().to_path_buf(),
                    dest: d.dest.clone(),
                    parent: d.parent.clone(),
                };
                let opts = crate::qcow2::CopyOptions {
                    mode: copy_mode(d),
                    format: crate::qcow2::TargetFormat::Qcow2,
                    backing: d.parent.clone().map(|name| crate::qcow2::BackingRef { name, format: "qcow2".into() }),
                    compression: plan.compress.map(crate::qcow2::CompressionType::from),
                    hash: true,
                    sync: false,
                    write_mode: crate::qcow2::WriteMode::Buffered,
                    ..Default::default()
                };
                let c = copy_to(&v, &opts, ctl).map_err(|e| e.context(what.clone()))?;
                results.push(VolumeResult {
                    name: d.target.clone(),
                    active_file: d.new_delta.clone(),
                    dest: d.dest.clone(),
                    size: c.size,
                    virtual_size: d.virtual_size,
                    hash: Some(c.hash),
                    compression: plan.compress,
                    data_bytes: Some(c.bytes_read),
                });
                continue;
            }
            let (hash, compression, data_bytes) = super::stopped::copy_to_store(
                q,
                d.old_top(),
                d.snapshots.len(),
                &d.dest,
                d.parent.as_deref(),
                plan.data_path,
                plan.compress,
                plan.check_output,
                &what,
                ctl,
            )?;
            results.push(VolumeResult {
                name: d.target.clone(),
                active_file: d.new_delta.clone(),
                dest: d.dest.clone(),
                size: fsio::file_size(&d.dest)?,
                virtual_size: d.virtual_size,
                hash,
                compression,
                data_bytes,
            });
        }
        ctl.check("publishing the backup")?;
        journal(LiveStep::Publish)?;
        publish(&results)?;
        Ok(results)
    })();
    let mut results = match before_publish {
        Ok(r) => r,
        Err(e) => {
            // (A direct copy's `dest` only names it: its caller removes it.)
            for d in plan.disks.iter().filter(|_| !direct) {
                let _ = fsio::remove_if_exists(&d.dest);
            }
            // Undo the snapshot: D' goes back into the layer below it.
            let undo = Control::new().with_deadline(crate::Deadline::from_secs(3600));
            let mut consistent = true;
            for d in &plan.disks {
                if let Err(u) = commit_down(q, vm, by, d, &d.new_delta, d.old_top(), &undo) {
                    log::error!("undoing the snapshot of disk {}: {u}", d.target);
                    consistent = false;
                }
            }
            return Err(e.with_vm_consistent(consistent));
        }
    };

    let after = (|| -> Result<()> {
        // The backup is published: its merges run to their end, past the
        // time budget (which bounds the copy, as on the Java path) and a
        // cancel; stopping one would leave the domain for a cleanup.
        let merge_ctl = Control::new();
        let merge_ctl = match &ctl.progress {
            Some(p) => merge_ctl.with_progress(p.clone()),
            None => merge_ctl,
        };
        if plan.kind == BackupKind::Isolated {
            journal(LiveStep::Pivot)?;
            for d in &plan.disks {
                commit_down(q, vm, by, d, &d.new_delta, d.old_top(), &merge_ctl)?;
            }
            return Ok(());
        }
        journal(LiveStep::Merge)?;
        for d in &plan.disks {
            if let Some(old) = &d.old_delta {
                merge_below(q, vm, by, d, old, &merge_ctl)?;
            }
        }
        if plan.end_of_chain {
            journal(LiveStep::Pivot)?;
            for d in &plan.disks {
                if !kept_on_new_delta(q, d, ctl)? {
                    commit_down(q, vm, by, d, &d.new_delta, d.end_of_chain_into(), &merge_ctl)?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = after {
        return Err(e
            .context(format!("the backup is stored, but merging the disks of domain {} afterwards failed", vm.name()))
            .with_vm_consistent(false));
    }
    for (r, d) in results.iter_mut().zip(&plan.disks) {
        r.active_file = match (plan.kind, plan.end_of_chain) {
            (BackupKind::Isolated, _) => d.old_top().to_path_buf(),
            (_, true) if d.new_delta.exists() => d.new_delta.clone(),
            (_, true) => d.end_of_chain_into().to_path_buf(),
            _ => d.new_delta.clone(),
        };
    }
    Ok(TakeBackupAnswer { volumes: results })
}

/// Whether disk `d` stays on its new delta at the end of a chain instead
/// of going back onto the file below (its base): when that file is larger
/// than the new delta, the disk was shrunk since the base was made, and a
/// commit (QEMU's or qemu-img's) never shrinks the file it commits into:
/// the disk would grow back to the old size, and the guest would read
/// again what was past its new end. The chain then goes on (the backup is
/// whole either way), with a warning; the next backup is a full one.
fn kept_on_new_delta(q: &QemuImg, d: &DiskPlan, ctl: &Control) -> Result<bool> {
    let into = d.end_of_chain_into();
    let (top, below) = (q.info(&d.new_delta, ctl)?.virtual_size, q.info(into, ctl)?.virtual_size);
    if below <= top {
        return Ok(false);
    }
    log::warn!(
        "disk {}: stays on {} instead of going back onto {} at the end of the chain: that file is {below} bytes, the disk {top} (it was shrunk), and committing into it would give the disk its old size and data back; shrink {} to {top} bytes while the VM is shut off (qemu-img resize --shrink) to let the chain end",
        d.target,
        d.new_delta.display(),
        into.display(),
        into.display()
    );
    Ok(true)
}

/// How disk `d`'s backup copy reads its old top.
fn copy_mode(d: &DiskPlan) -> crate::qcow2::SourceMode {
    super::native::backup_mode(d.parent.is_some(), d.snapshots.len())
}

/// The error of a snapshot that failed, `e`, once the domain is as it was.
/// libvirt may fail after the snapshot was made (a quiesced snapshot whose
/// thaw of the guest's filesystems fails): each disk's current file is read
/// back, and every disk running on its new delta is committed back into
/// the file it ran on. The error says the VM is consistent only when no
/// disk was on its new delta or every one was undone; otherwise (or when
/// the domain's disks cannot be read) it is left for [`recover`].
fn undo_failed_snapshot(q: &QemuImg, vm: &Vm, by: MergeBy, plan: &LivePlan, e: KnibError) -> KnibError {
    let disks = match vm.disks() {
        Ok(d) => d,
        Err(r) => {
            log::error!("after a failed snapshot of domain {}: {r}", vm.name());
            let mut e = e;
            e.message.push_str(&format!(
                " (the disks of domain {} cannot be read back to see whether the snapshot was taken: {r})",
                vm.name()
            ));
            return e.with_vm_consistent(false);
        }
    };
    let on_new: Vec<&DiskPlan> =
        plan.disks.iter().filter(|d| disks.iter().any(|i| i.target == d.target && i.file == d.new_delta)).collect();
    if on_new.is_empty() {
        return e.with_vm_consistent(true);
    }
    let undo = Control::new().with_deadline(crate::Deadline::from_secs(3600));
    let mut failed = Vec::new();
    for d in &on_new {
        log::warn!(
            "the failed snapshot of domain {} put disk {} on {}: undoing it",
            vm.name(),
            d.target,
            d.new_delta.display()
        );
        if let Err(u) = commit_down(q, vm, by, d, &d.new_delta, d.old_top(), &undo) {
            log::error!("undoing the snapshot of disk {}: {u}", d.target);
            failed.push(format!("disk {}: {u}", d.target));
        }
    }
    let targets: Vec<&str> = on_new.iter().map(|d| d.target.as_str()).collect();
    let mut e = e;
    if failed.is_empty() {
        e.message.push_str(&format!(
            " (the snapshot was taken all the same: disks {} were committed back into the files they ran on)",
            targets.join(", ")
        ));
        e.with_vm_consistent(true)
    } else {
        e.message
            .push_str(&format!(" (the snapshot was taken all the same, and undoing it failed: {})", failed.join("; ")));
        e.with_vm_consistent(false)
    }
}

/// How a domain's disk layers are merged: by block jobs (running) or on the
/// files (stopped), and with which data path.
#[derive(Debug, Clone, Copy)]
struct MergeBy {
    running: bool,
    data_path: DataPath,
}

/// Commit `top` (the active file) into `into` (a layer below it) and make
/// the disk run on `into`; `top` is then removed.
fn commit_down(q: &QemuImg, vm: &Vm, by: MergeBy, d: &DiskPlan, top: &Path, into: &Path, ctl: &Control) -> Result<()> {
    let (running, path) = (by.running, by.data_path);
    let step = format!("active commit of disk {} into {}", d.target, into.display());
    crate::crashpoint::durable_step(&step);
    if running {
        blockwait::commit_and_wait(vm, &d.target, into, top, false, ctl, &step)?;
        let now = vm.disk(&d.target)?;
        if now.file != into {
            return Err(KnibError::hypervisor(format!(
                "{step}: the disk runs on {}, not {}",
                now.file.display(),
                into.display()
            )));
        }
        flush_commit(into, None)?;
    } else {
        commit_files(q, top, into, path, ctl)?;
        crate::crashpoint::durable_step(&format!("pointing disk {} at {}", d.target, into.display()));
        vm.set_disk_sources(&[(d.target.clone(), into.to_path_buf())])?;
    }
    fsio::remove_if_exists(top)
}

/// Commit `layer` (between the base and the active file) into the base; the
/// layer above it (the active file, or the first VM snapshot delta) is
/// re-pointed at the base (by libvirt's block commit when running), each of
/// the plan's grand children still on `layer` too (`rebase -u`), and
/// `layer` is removed.
fn merge_below(q: &QemuImg, vm: &Vm, by: MergeBy, d: &DiskPlan, layer: &Path, ctl: &Control) -> Result<()> {
    let (running, path) = (by.running, by.data_path);
    let step = format!("block commit of {} into {}", layer.display(), d.base.display());
    crate::crashpoint::durable_step(&step);
    if running {
        blockwait::commit_and_wait(vm, &d.target, &d.base, layer, false, ctl, &step)?;
        let above = match d.snapshots.first() {
            Some(s) => s.clone(),
            None => vm.disk(&d.target)?.file,
        };
        flush_commit(&d.base, Some(&above))?;
    } else {
        let above = match d.snapshots.first() {
            Some(s) => s.clone(),
            None => vm.disk(&d.target)?.file,
        };
        commit_files(q, layer, &d.base, path, ctl)?;
        crate::crashpoint::durable_step(&format!("rebase of {} onto {}", above.display(), d.base.display()));
        q.rebase_unsafe(&above, &d.base.to_string_lossy(), "qcow2", ctl)?;
    }
    // Other branches on `layer` read through it to the base: with its data
    // now in the base, they are pointed there before it goes (a recovery
    // running this again finds them on the base already, and leaves them).
    repoint_grand_children(q, d, layer, ctl)?;
    fsio::remove_if_exists(layer)
}

/// Point each of `d`'s grand children still on `layer` (whose data is in
/// the base: it was committed there) at the base, before `layer` goes; see
/// [`super::stopped::repoint_grand_children`]. Returns those re-pointed.
fn repoint_grand_children(q: &QemuImg, d: &DiskPlan, layer: &Path, ctl: &Control) -> Result<Vec<PathBuf>> {
    let to_base = |_: &Path| d.base.to_string_lossy().into_owned();
    super::stopped::repoint_grand_children(q, layer, &d.base, &d.grand_children, &to_base, ctl)
        .map_err(|e| e.context(format!("disk {}", d.target)))
}

/// After a block commit into `base` of a running domain, before the
/// committed layer is removed: QEMU does not flush what the job wrote (the
/// layer's data in `base`, and the header of the file `above` it, now
/// pointing at `base`), so both are made durable here; else a power loss
/// could leave the disk pointing at a removed file, or lose the layer's
/// writes.
fn flush_commit(base: &Path, above: Option<&Path>) -> Result<()> {
    fsio::sync_file(base)?;
    above.map(fsio::sync_file).transpose().map(|_| ())
}

/// Merge `top` into `into`, which must be its backing file (stopped
/// domain): [`super::stopped::commit_files`].
fn commit_files(q: &QemuImg, top: &Path, into: &Path, path: DataPath, ctl: &Control) -> Result<()> {
    super::stopped::commit_files(q, top, into, path, ctl)
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoverReport {
    /// One line per action taken.
    pub actions: Vec<String>,
    /// Files each disk runs on afterwards, active file first.
    pub chains: Vec<(String, Vec<PathBuf>)>,
}

/// Finish or undo an interrupted backup from its plan and the domain's real
/// chains. `published` says whether the backup reached the store.
pub fn recover(q: &QemuImg, vm: &Vm, plan: &LivePlan, published: bool, ctl: &Control) -> Result<RecoverReport> {
    let running = vm.is_running()?;
    let by = MergeBy { running, data_path: plan.data_path };
    let mut rep = RecoverReport::default();
    for d in &plan.disks {
        if running {
            // A job knib started may still run in QEMU: stop it where it is
            // (either side of a commit reads the same bytes).
            if let Some(job) = blockjob::block_job_info(vm, &d.target)? {
                if let Err(e) = blockjob::block_job_abort(vm, &d.target, false) {
                    // The job may have ended between the two calls (a
                    // commit the killed process started goes on in QEMU).
                    if blockjob::block_job_info(vm, &d.target)?.is_some() {
                        return Err(e);
                    }
                    log::info!("{}: a left-over {:?} job ended by itself", d.target, job.kind);
                }
                let t = std::time::Instant::now();
                while blockjob::block_job_info(vm, &d.target)?.is_some() {
                    if t.elapsed() > std::time::Duration::from_secs(60) {
                        return Err(KnibError::hypervisor(format!("the block job on {} does not end", d.target)));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                rep.actions.push(format!("{}: aborted a left-over {:?} job", d.target, job.kind));
            }
        }
        let info = vm.disk(&d.target)?;
        let chain = chain_of(q, running, &info, ctl)?;
        let has = |p: &Path| chain.iter().any(|c| c == p);
        let finish = published && plan.kind != BackupKind::Isolated;
        if has(&d.new_delta) {
            if finish {
                if let Some(old) = d.old_delta.as_deref().filter(|o| has(o)) {
                    merge_below(q, vm, by, d, old, ctl)?;
                    rep.actions.push(format!("{}: merged {} into {}", d.target, old.display(), d.base.display()));
                }
                if plan.end_of_chain && !kept_on_new_delta(q, d, ctl)? {
                    let into = d.end_of_chain_into();
                    commit_down(q, vm, by, d, &d.new_delta, into, ctl)?;
                    rep.actions.push(format!(
                        "{}: committed {} into {} (end of chain)",
                        d.target,
                        d.new_delta.display(),
                        into.display()
                    ));
                }
            } else {
                // An old delta the request did not name (the agent's cleanup
                // gives only the file the volume was to sit on) may lie
                // between the new delta and the base: the new delta goes
                // back into it, and the volume runs on it, as before the
                // backup (folding it into the base too would leave its file
                // behind and the volume on a chain the next backup does not
                // expect).
                let unnamed_old = match (&d.old_delta, chain.get(1), chain.get(2)) {
                    (None, Some(below), Some(b)) if chain[0] == d.new_delta && b == &d.base => Some(below.as_path()),
                    _ => None,
                };
                let into = match d.snapshots.last() {
                    Some(s) => s.as_path(),
                    None => d.old_delta.as_deref().filter(|o| has(o)).or(unnamed_old).unwrap_or(&d.base),
                };
                commit_down(q, vm, by, d, &d.new_delta, into, ctl)?;
                rep.actions.push(format!(
                    "{}: undid the snapshot: committed {} back into {}",
                    d.target,
                    d.new_delta.display(),
                    into.display()
                ));
            }
        }
        // Deltas out of the chain are leftovers of a finished step.
        let info = vm.disk(&d.target)?;
        let chain = chain_of(q, running, &info, ctl)?;
        let leftover = |f: &Path| !chain.iter().any(|c| c == f) && f.exists();
        if running && [Some(d.new_delta.as_path()), d.old_delta.as_deref()].into_iter().flatten().any(leftover) {
            // A block job of the interrupted run took it out of the chain:
            // what the job wrote is made durable before its layer goes, as
            // on the normal path (`merge_below`, `commit_down`): the file
            // committed into (the base, or the active file after a pivot)
            // and the header of the layer that now points at the base.
            flush_commit(&d.base, Some(&chain[0]))?;
            d.snapshots.first().map(|s| fsio::sync_file(s)).transpose()?;
        }
        for f in [Some(d.new_delta.as_path()), d.old_delta.as_deref()].into_iter().flatten() {
            if leftover(f) {
                // An old delta leaves the chain only once committed into the
                // base: branches still on it (a crash before their rebase)
                // go there first, or it is kept.
                if d.old_delta.as_deref() == Some(f) {
                    for g in repoint_grand_children(q, d, f, ctl)? {
                        rep.actions.push(super::stopped::repointed_line(&d.target, &g, &d.base, f));
                    }
                }
                fsio::remove_if_exists(f)?;
                rep.actions.push(format!("{}: removed {} (no longer in the chain)", d.target, f.display()));
            }
        }
        // Done when at most one knib delta is left, on top of the base (whose
        // own backing files, a template for instance, are not knib's).
        let deltas = chain.iter().filter(|c| is_delta_name(c)).count();
        if deltas > 1 || (deltas == 1 && !is_delta_name(&chain[0])) {
            return Err(KnibError::new(
                ErrorKind::VmInconsistent,
                format!("disk {} still runs on {deltas} knib deltas after recovery", d.target),
            ));
        }
        rep.chains.push((d.target.clone(), chain));
    }
    Ok(rep)
}

/// Consolidate a domain after a quick restore: every disk whose chain has
/// backing files gets them pulled in (block pull when running, `qemu-img
/// rebase` when stopped), so it no longer depends on the backup store.
/// Returns the targets consolidated.
pub fn consolidate(q: &QemuImg, vm: &Vm, ctl: &Control) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for d in vm.disks()? {
        if consolidate_disk(q, vm, &d.target, ctl)? {
            done.push(d.target);
        }
    }
    Ok(done)
}

/// Consolidate disk `target` of `vm` as [`consolidate`] does; returns
/// whether it had backing files to pull in.
pub fn consolidate_disk(q: &QemuImg, vm: &Vm, target: &str, ctl: &Control) -> Result<bool> {
    let running = vm.is_running()?;
    let d = vm.disk(target)?;
    let chain = chain_of(q, running, &d, ctl)?;
    if chain.len() < 2 {
        return Ok(false);
    }
    let step = format!("block pull of disk {}", d.target);
    if running {
        blockwait::pull_and_wait(vm, &d.target, None, false, ctl, &step)?;
    } else {
        q.flatten_in_place(&d.file, ctl)?;
    }
    Ok(true)
}

/// Merge a disk-only VM snapshot delta of disk `target` into the layer
/// below it, whatever the domain's state: a block commit while it runs (an
/// active commit with pivot when `delta` is the active file), `qemu-img
/// commit` and a rebase of the layer above when it is stopped. Returns the
/// file the disk runs on afterwards. `others` (other images using `delta`
/// as their backing file, off the disk's chain: branches of a snapshot
/// tree) are pointed at the layer below once the merge is done, before
/// `delta` is removed. `delta` is removed.
pub fn merge_snapshot_delta(
    q: &QemuImg,
    vm: &Vm,
    target: &str,
    delta: &Path,
    others: &[PathBuf],
    ctl: &Control,
) -> Result<PathBuf> {
    let running = vm.is_running()?;
    let info = vm.disk(target)?;
    let chain = chain_of(q, running, &info, ctl)?;
    let i = chain.iter().position(|p| p == delta).ok_or_else(|| {
        KnibError::not_found(format!(
            "{} is not in the chain of disk {target} of domain {} ({})",
            delta.display(),
            vm.name(),
            chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" <- ")
        ))
    })?;
    let below = chain.get(i + 1).cloned().ok_or_else(|| {
        KnibError::invalid(format!(
            "{} is the base of disk {target}: there is nothing to merge it into",
            delta.display()
        ))
    })?;
    let step = format!("merge of {} into {}", delta.display(), below.display());
    // The format the others' pointers name (only asked when there are any).
    let format = if others.is_empty() { String::new() } else { q.info(&below, ctl)?.format };
    if running {
        blockwait::commit_and_wait(vm, target, &below, delta, false, ctl, &step)?;
        flush_commit(&below, i.checked_sub(1).map(|a| chain[a].as_path()))?;
        crate::engine::merge::repoint(q, others, &below, &format, ctl)?;
        fsio::remove_if_exists(delta)?;
    } else if i == 0 {
        commit_files(q, delta, &below, DataPath::Native, ctl)?;
        vm.set_disk_sources(&[(target.to_string(), below.clone())])?;
        crate::engine::merge::repoint(q, others, &below, &format, ctl)?;
        fsio::remove_if_exists(delta)?;
    } else {
        crate::engine::merge::merge_delta_repointing(q, delta, Some(&chain[i - 1]), others, ctl)?;
    }
    Ok(vm.disk(target)?.file)
}

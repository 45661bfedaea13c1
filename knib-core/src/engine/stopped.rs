//! Backups of a VM that no hypervisor knows: a stopped CloudStack VM, whose
//! libvirt domain was transient and is gone, named only by its volumes'
//! files. The steps are those of [`crate::engine::live`] made on the files:
//!
//! 1. `Snapshot`: each volume gets its new delta `D'` over the file it runs
//!    on (`qemu-img create -b`, the pointer relative to `D'`'s directory);
//! 2. `Copy`: the file it ran on (`D`, with the parent backup as backing
//!    file) or the flattened chain (full, isolated) to the store, under a
//!    temporary name, fsynced and renamed;
//! 3. `Merge`: `D` committed into the base (natively when the native merge
//!    applies, with its checks: dirty images repaired first, metadata
//!    guarded), `D'` and every other child of `D` re-pointed at the base
//!    (`rebase -u`), `D` removed;
//! 4. `Pivot`: at the end of a chain `D'` is committed into the base; for
//!    an isolated backup step 3 is skipped and `D'` goes back into `D`.
//!
//! A failure before every copy is complete removes what was written to the
//! store and commits each `D'` back (the error says the VM is consistent);
//! a later failure says it is not, for [`recover`] to finish.
//!
//! # Files in use
//!
//! No domain says whether a QEMU runs on the files, so before anything is
//! written every existing file the backup reads or writes on primary is
//! tested for QEMU's image locks ([`ensure_unused`]): one that a process
//! holds (a VM running on it after all, a `qemu-img` working on it) fails
//! the operation as busy, naming it, with nothing written.

use crate::fsio::same_file;
use std::path::{Path, PathBuf};

use crate::engine::native::{self, DataPath, NativeCopy};
use crate::engine::take::{BackupKind, QemuImgCopy, TakeBackupAnswer, VolumeResult};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::lock::ensure_unused;
use crate::progress::Control;
use crate::qcow2::{relative_pointer, TargetFormat};
use crate::qemu_img::{CompressionLibrary, QemuImg};

/// What a backup does to one volume of a VM without a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct FilesDisk {
    /// The volume's name in messages (the request's uuid).
    pub name: String,
    /// The base file.
    pub base: PathBuf,
    /// The delta the volume ran on (`D`, above `base`), if any.
    pub old_delta: Option<PathBuf>,
    /// The new delta (`D'`).
    pub new_delta: PathBuf,
    /// The backup file on the store.
    pub dest: PathBuf,
    /// The parent backup's file, as the backing pointer of `dest`.
    pub parent: Option<String>,
    /// The guest-visible size.
    pub virtual_size: u64,
    /// Other files whose backing file is `old_delta` (snapshot branches,
    /// the first VM snapshot delta over it), re-pointed at the base when it
    /// is merged.
    pub grand_children: Vec<PathBuf>,
    /// The deltas of the disk-only VM snapshots taken over `old_delta`
    /// since the last backup, oldest first (each the backing file of the
    /// next, the first over `old_delta`): the last is the file the volume
    /// runs on. Empty without VM snapshots.
    pub snapshots: Vec<PathBuf>,
}

impl FilesDisk {
    /// The file the volume ran on before the backup.
    pub fn old_top(&self) -> &Path {
        self.snapshots.last().map(PathBuf::as_path).or(self.old_delta.as_deref()).unwrap_or(&self.base)
    }

    /// How many backing files of `old_top` an incremental backup copies
    /// with it: the layers between it and the base (`old_delta` and the
    /// VM snapshot deltas below the top one).
    pub fn layers_above_base(&self) -> usize {
        self.snapshots.len()
    }
}

/// A backup of the volumes of a VM without a domain, planned.
#[derive(Debug, Clone, PartialEq)]
pub struct FilesPlan {
    /// Full, incremental or isolated.
    pub kind: BackupKind,
    /// Collapse to the base afterwards.
    pub end_of_chain: bool,
    /// One entry per volume.
    pub disks: Vec<FilesDisk>,
    /// Native data path (default) or qemu-img for the copies.
    pub data_path: DataPath,
    /// Compress the backup files as they are copied.
    pub compress: Option<CompressionLibrary>,
    /// With `compress`: read each compressed file back before it is kept
    /// (knib's own data path: [`crate::qcow2::CopyOptions::check_output`];
    /// qemu-img's: compared with the disk by guest bytes).
    pub check_output: bool,
}

/// The backing pointer a file at `from` gets to `to`: relative to `from`'s
/// directory.
fn pointer(from: &Path, to: &Path) -> String {
    relative_pointer(fsio::parent_dir(from), to)
}

/// The file `top`'s backing pointer leads to, as `qemu-img` resolves it.
fn backing_of(q: &QemuImg, top: &Path, ctl: &Control) -> Result<Option<PathBuf>> {
    Ok(q.info(top, ctl)?.full_backing_filename.map(PathBuf::from))
}

/// Copy one volume's `source` to the store at `dest`: its own clusters and
/// those of its first `above` backing files over `parent` (incremental), or
/// the flattened chain. Written under a temporary
/// name, fsynced and renamed; the temporary is removed on a failure.
/// With `check` (and `compress`), the compressed file is read back before
/// it is kept ([`NativeCopy::check`] on knib's own data path; on qemu-img's,
/// compared with `source`: [`native::read_back_qemu_img_copy`]).
/// Returns (hash, compression, guest bytes copied), as the native data path
/// knows them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_to_store(
    q: &QemuImg,
    source: &Path,
    above: usize,
    dest: &Path,
    parent: Option<&str>,
    data_path: DataPath,
    compress: Option<CompressionLibrary>,
    check: bool,
    what: &str,
    ctl: &Control,
) -> Result<(Option<String>, Option<CompressionLibrary>, Option<u64>)> {
    let tmp = fsio::temp_path(dest);
    // Only compressed files are read back.
    let check = check && compress.is_some();
    let mode = native::backup_mode(parent.is_some(), above);
    let refusal = native::not_native(data_path, source, mode).map_err(|e| e.context(format!("backup of {what}")))?;
    crate::crashpoint::durable_step(&format!("copy of {what}"));
    let label = format!("backup of {what}");
    // Written through the file as created, never by name; the name is
    // checked to lead to it before the rename.
    let file = fsio::create_own_temp(&tmp).map_err(|e| e.context(format!("copy of {what}")))?;
    let r = if refusal.is_none() {
        let c = NativeCopy {
            source,
            dest: &tmp,
            dest_file: &file,
            mode,
            format: TargetFormat::Qcow2,
            backing: parent.map(str::to_string),
            compress,
            hash: true,
            check,
            threads: 0,
            rate_limit_mbps: 0,
            what: &label,
        };
        native::copy(&c, ctl).map(|r| (r.hash, compress, Some(r.bytes_read)))
    } else if let (Some(_), true, Some(why)) = (parent, above > 0, &refusal) {
        // `qemu-img convert -B <parent backup> <top>` copies the top's own
        // clusters only (qemu-img 7.2), not those of the layers between it
        // and the base: the backup would miss writes.
        Err(KnibError::invalid(format!(
            "backup of {what}: the layers of VM snapshots over the delta are copied as one file by knib's own data path only (not qemu-img), which does not copy {}: {why}",
            source.display()
        )))
    } else {
        let c = QemuImgCopy {
            source,
            tmp: &tmp,
            file: &file,
            parent,
            v2: false,
            compress,
            check,
            force_share: true,
            what: &label,
        };
        c.run(q, ctl).map(|(hash, compression)| (Some(hash), compression, None))
    };
    match r.and_then(|h| fsio::commit_own_temp(&tmp, &file, dest, true).map(|()| h)) {
        Ok(h) => Ok(h),
        Err(e) => {
            let _ = fsio::remove_if_exists(&tmp);
            Err(e.context(format!("copy of {what}")))
        }
    }
}

/// Commit `top` into `into`, which must be its backing file: natively when
/// the native merge applies (dirty images repaired first, the base's
/// metadata guarded), else `qemu-img commit`. `top` is kept.
pub(crate) fn commit_files(q: &QemuImg, top: &Path, into: &Path, path: DataPath, ctl: &Control) -> Result<()> {
    let backing = backing_of(q, top, ctl)?;
    if !backing.as_deref().is_some_and(|b| same_file(b, into)) {
        return Err(KnibError::invalid(format!(
            "{} does not have {} as its backing file",
            top.display(),
            into.display()
        )));
    }
    native::commit_keep(q, top, path, ctl)
}

/// Merge `child` into `parent` (its backing file), point each of
/// `grand_children` (files whose backing file is `child`) at `parent`, and
/// remove `child`: how a delta of a stopped volume is deleted. Reads
/// through every grand child are the same before and after.
pub fn merge_into_parent(
    q: &QemuImg,
    child: &Path,
    parent: &Path,
    grand_children: &[PathBuf],
    path: DataPath,
    ctl: &Control,
) -> Result<()> {
    for g in grand_children {
        if !backing_of(q, g, ctl)?.is_some_and(|b| same_file(&b, child)) {
            return Err(KnibError::invalid(format!(
                "{} does not have {} as its backing file",
                g.display(),
                child.display()
            )));
        }
    }
    crate::crashpoint::durable_step(&format!("commit of {} into {}", child.display(), parent.display()));
    commit_files(q, child, parent, path, ctl)?;
    for g in grand_children {
        crate::crashpoint::durable_step(&format!("rebase of {} onto {}", g.display(), parent.display()));
        q.rebase_unsafe(g, &pointer(g, parent), "qcow2", ctl)?;
    }
    fsio::remove_if_exists(child)
}

/// The recover report's line for grand child `g` of volume or disk `name`,
/// re-pointed from `old` at `base` ([`repoint_grand_children`]).
pub(crate) fn repointed_line(name: &str, g: &Path, base: &Path, old: &Path) -> String {
    format!("{name}: re-pointed {} at {} (it was on {})", g.display(), base.display(), old.display())
}

/// Before `old`, a delta out of its volume's chain because it was
/// committed into `base` (which holds its data since), is removed: each of
/// `grand_children` whose backing file is still `old` (a merge interrupted
/// between the commit and their rebase) is re-pointed at `base` (`rebase
/// -u`, the pointer `pointer_to_base` gives for it), so it reads the same.
/// Every one is tried; when one cannot be (its header unreadable, the
/// rebase failing), the error names each that failed, and `old` must be
/// kept. Returns those re-pointed.
pub(crate) fn repoint_grand_children(
    q: &QemuImg,
    old: &Path,
    base: &Path,
    grand_children: &[PathBuf],
    pointer_to_base: &dyn Fn(&Path) -> String,
    ctl: &Control,
) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for g in grand_children.iter().filter(|g| g.exists()) {
        let r = backing_of(q, g, ctl).and_then(|b| {
            if !b.is_some_and(|b| same_file(&b, old)) {
                return Ok(false);
            }
            crate::crashpoint::durable_step(&format!("rebase of {} onto {}", g.display(), base.display()));
            q.rebase_unsafe(g, &pointer_to_base(g), "qcow2", ctl).map(|_| true)
        });
        match r {
            Ok(true) => done.push(g.clone()),
            Ok(false) => {}
            Err(e) => failed.push(format!("{} ({e})", g.display())),
        }
    }
    if !failed.is_empty() {
        return Err(KnibError::new(
            ErrorKind::VmInconsistent,
            format!(
                "{} is kept: {} still read through it and could not be re-pointed at {}: {}",
                old.display(),
                if failed.len() == 1 { "a file that" } else { "files that" },
                base.display(),
                failed.join("; ")
            ),
        ));
    }
    Ok(done)
}

/// Commit `top` (the file the volume runs on) into `into` (its backing
/// file) and remove it: the volume then runs on `into`.
fn commit_down(q: &QemuImg, top: &Path, into: &Path, path: DataPath, ctl: &Control) -> Result<()> {
    merge_into_parent(q, top, into, &[], path, ctl)
}

/// Every existing file on primary a backup of `d` reads or writes.
fn touched(d: &FilesDisk) -> Vec<&Path> {
    let mut v: Vec<&Path> = vec![&d.base, &d.new_delta];
    v.extend(d.old_delta.as_deref());
    v.extend(d.grand_children.iter().map(PathBuf::as_path));
    v.extend(d.snapshots.iter().map(PathBuf::as_path));
    v
}

/// The files on primary the copy of `d` reads: its base, old delta and VM
/// snapshot deltas.
fn read_by_copy(d: &FilesDisk) -> Vec<&Path> {
    let mut v: Vec<&Path> = vec![&d.base];
    v.extend(d.old_delta.as_deref());
    v.extend(d.snapshots.iter().map(PathBuf::as_path));
    v
}

/// The files re-pointed at the base when `old_delta` is merged into it:
/// the layer just above it (the new delta, or the first VM snapshot delta)
/// and the other grand children.
fn children_of_old(d: &FilesDisk) -> Vec<PathBuf> {
    let first = d.snapshots.first().unwrap_or(&d.new_delta);
    let mut children = vec![first.clone()];
    children.extend(d.grand_children.iter().filter(|g| g.exists() && !same_file(g, first)).cloned());
    children
}

/// Where the new delta goes at the end of a chain: the base, or, with VM
/// snapshots (whose deltas stay), the last of them.
fn end_of_chain_into(d: &FilesDisk) -> &Path {
    d.snapshots.last().unwrap_or(&d.base)
}

/// Take a backup of the volumes of a VM without a domain as `plan` says
/// (see the module documentation).
pub fn take(q: &QemuImg, plan: &FilesPlan, ctl: &Control) -> Result<TakeBackupAnswer> {
    let consistent = |e: KnibError| e.with_vm_consistent(true);
    let all: Vec<&Path> = plan.disks.iter().flat_map(touched).collect();
    ensure_unused(&all, "the backup").map_err(consistent)?;
    let old_deltas = plan.disks.iter().filter_map(|d| Some((d.name.as_str(), d.old_delta.as_deref()?)));
    super::refuse_dropping_internal_snapshots(plan.kind, old_deltas).map_err(consistent)?;
    // The files the copies read (each volume's old top and the layers
    // below it, down to the base) are held under QEMU's reader locks until
    // the copies end: no VM starts writing them meanwhile (one started on
    // the old top, by HA or by hand, tore the copy, which was answered as
    // a good backup; the lock test above is only a moment). A VM started on
    // the new delta reads them as its backing files, which they allow.
    // Released before the merges, which lock them as writers.
    let read: Vec<&Path> = plan.disks.iter().flat_map(read_by_copy).collect();
    let reading = crate::lock::hold_for_reading(&read, "the backup").map_err(consistent)?;
    crate::crashpoint::pause_point("backup of volumes: the files copied are held");

    // 1. The new deltas.
    let mut made: Vec<&FilesDisk> = Vec::new();
    for d in &plan.disks {
        crate::crashpoint::durable_step(&format!("snapshot of volume {}", d.name));
        let r = q.create_overlay(&d.new_delta, &pointer(&d.new_delta, d.old_top()), "qcow2", Some(d.virtual_size), ctl);
        if let Err(e) = r {
            let _ = fsio::remove_if_exists(&d.new_delta);
            for m in &made {
                let _ = fsio::remove_if_exists(&m.new_delta);
            }
            return Err(consistent(e.context(format!("new delta of volume {}", d.name))));
        }
        made.push(d);
    }

    // 2. The copies.
    let copied = (|| -> Result<Vec<VolumeResult>> {
        let mut results = Vec::new();
        for d in &plan.disks {
            ctl.check(&format!("copy of volume {}", d.name))?;
            let what = format!("volume {}", d.name);
            let (hash, compression, data_bytes) = copy_to_store(
                q,
                d.old_top(),
                d.layers_above_base(),
                &d.dest,
                d.parent.as_deref(),
                plan.data_path,
                plan.compress,
                plan.check_output,
                &what,
                ctl,
            )?;
            results.push(VolumeResult {
                name: d.name.clone(),
                active_file: d.new_delta.clone(),
                dest: d.dest.clone(),
                size: fsio::file_size(&d.dest)?,
                virtual_size: d.virtual_size,
                hash,
                compression,
                data_bytes,
            });
        }
        ctl.check("finishing the backup")?;
        Ok(results)
    })();
    drop(reading);
    let mut results = match copied {
        Ok(r) => r,
        Err(e) => {
            for d in &plan.disks {
                let _ = fsio::remove_if_exists(&d.dest);
            }
            let undo = Control::new().with_deadline(crate::Deadline::from_secs(3600));
            let mut ok = true;
            for d in &plan.disks {
                if let Err(u) = commit_down(q, &d.new_delta, d.old_top(), plan.data_path, &undo) {
                    log::error!("undoing the new delta of volume {}: {u}", d.name);
                    ok = false;
                }
            }
            return Err(e.with_vm_consistent(ok));
        }
    };

    // 3. and 4. The merges.
    let after = (|| -> Result<()> {
        // The backup is published: its merges run to their end, past the
        // time budget (which bounds the copy, as on the Java path);
        // stopping one would leave the volume for a cleanup.
        let mctl = Control::new();
        if plan.kind == BackupKind::Isolated {
            for d in &plan.disks {
                commit_down(q, &d.new_delta, d.old_top(), plan.data_path, &mctl)?;
            }
            return Ok(());
        }
        for d in &plan.disks {
            if let Some(old) = &d.old_delta {
                merge_into_parent(q, old, &d.base, &children_of_old(d), plan.data_path, &mctl)?;
            }
        }
        if plan.end_of_chain {
            for d in &plan.disks {
                commit_down(q, &d.new_delta, end_of_chain_into(d), plan.data_path, &mctl)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = after {
        return Err(e
            .context("the backup is stored, but merging the volumes afterwards failed (agent.cleanup_vm_backup discards it, or with mode \"complete\" finishes it)")
            .with_vm_consistent(false));
    }
    for (r, d) in results.iter_mut().zip(&plan.disks) {
        r.active_file = match (plan.kind, plan.end_of_chain) {
            (BackupKind::Isolated, _) => d.old_top().to_path_buf(),
            (_, true) => end_of_chain_into(d).to_path_buf(),
            _ => d.new_delta.clone(),
        };
    }
    Ok(TakeBackupAnswer { volumes: results })
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilesRecovery {
    /// One line per action taken.
    pub actions: Vec<String>,
    /// The file each volume runs on afterwards, in the plan's order.
    pub tops: Vec<PathBuf>,
}

/// Refuse the chain of the volume file `top` when a file of it is neither
/// a regular file nor a block device (a FIFO, a character device, a
/// directory), found by knib's reader, which never opens such a file,
/// before `qemu-img info --backing-chain` is asked (it would wait on a
/// FIFO until the time budget ends). Anything else the reader refuses (a
/// feature it does not read, damage) is left for qemu-img to say.
pub(crate) fn refuse_special_layers(top: &Path) -> Result<()> {
    match crate::qcow2::Chain::special_file_in(top) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Finish (`published`: every copy reached the store) or undo an
/// interrupted backup of volumes without a domain, from its plan and the
/// files: where `D'` is, which layers are below it. Every file is first
/// tested for QEMU's locks ([`ensure_unused`]). The caller has checked
/// [`require_still_described`] before it changed anything (the agent's
/// cleanup does, before it cleans the store).
pub fn recover(q: &QemuImg, plan: &FilesPlan, published: bool, ctl: &Control) -> Result<FilesRecovery> {
    let all: Vec<&Path> = plan.disks.iter().flat_map(touched).collect();
    ensure_unused(&all, "the cleanup")?;
    let mut rep = FilesRecovery::default();
    let finish = published && plan.kind != BackupKind::Isolated;
    for d in &plan.disks {
        let chain_of = |top: &Path| -> Result<Vec<PathBuf>> {
            refuse_special_layers(top)?;
            Ok(q.info_chain(top, ctl)?.into_iter().map(|i| PathBuf::from(i.filename)).collect())
        };
        let in_chain = |chain: &[PathBuf], p: &Path| chain.iter().any(|c| same_file(c, p));
        // The file the new delta was committed back into, when it was: the
        // volume runs on it. (A file above it, such as an old delta already
        // merged into the base but not yet removed, is a leftover: running
        // on it would hide what was committed.)
        let mut undone_into = None;
        if d.new_delta.exists() {
            let chain = chain_of(&d.new_delta)?;
            // `old_delta`, still in the chain just below the new delta or
            // the first VM snapshot delta.
            let old =
                d.old_delta.as_deref().filter(|o| chain.get(1 + d.snapshots.len()).is_some_and(|c| same_file(c, o)));
            if finish {
                if let Some(old) = old {
                    merge_into_parent(q, old, &d.base, &children_of_old(d), plan.data_path, ctl)?;
                    rep.actions.push(format!("{}: merged {} into {}", d.name, old.display(), d.base.display()));
                }
                if plan.end_of_chain {
                    let into = end_of_chain_into(d);
                    commit_down(q, &d.new_delta, into, plan.data_path, ctl)?;
                    rep.actions.push(format!(
                        "{}: committed {} into {} (end of chain)",
                        d.name,
                        d.new_delta.display(),
                        into.display()
                    ));
                }
            } else {
                let into = chain.get(1).cloned().ok_or_else(|| {
                    KnibError::new(ErrorKind::VmInconsistent, format!("{} has no backing file", d.new_delta.display()))
                })?;
                // A delta between the new delta and the file the volume was
                // to sit on: an old delta the request did not name (the
                // agent's cleanup gives only that file). The new delta goes
                // back into it, and the volume runs on it, as before the
                // backup.
                let unnamed_old = d.old_delta.is_none()
                    && chain.get(2).is_some_and(|b| same_file(b, d.old_top()) || same_file(b, &d.base));
                if !(same_file(&into, d.old_top()) || same_file(&into, &d.base) || old.is_some() || unnamed_old) {
                    return Err(KnibError::new(
                        ErrorKind::VmInconsistent,
                        format!(
                            "volume {}: {} sits on {}, neither {} nor {}",
                            d.name,
                            d.new_delta.display(),
                            into.display(),
                            d.old_top().display(),
                            d.base.display()
                        ),
                    ));
                }
                // An old delta outside the new delta's chain was merged into
                // the base already: it goes first, so that a crash after the
                // commit below never leaves it above what was committed.
                if let Some(o) = d.old_delta.as_deref().filter(|o| o.exists() && !in_chain(&chain, o)) {
                    repoint_before_removal(q, d, o, &mut rep, ctl)?;
                    durable_before_removal(d)?;
                    fsio::remove_if_exists(o)?;
                    rep.actions.push(format!("{}: removed {} (merged, no longer in the chain)", d.name, o.display()));
                }
                commit_down(q, &d.new_delta, &into, plan.data_path, ctl)?;
                rep.actions.push(format!(
                    "{}: undid the new delta: committed {} back into {}",
                    d.name,
                    d.new_delta.display(),
                    into.display()
                ));
                undone_into = Some(into);
            }
        }
        // The volume runs on the file the new delta went back into, else on
        // the highest of its files still there; a file of the backup outside
        // that chain is a leftover of a finished step.
        let top = undone_into
            .into_iter()
            .chain(
                [
                    Some(d.new_delta.as_path()),
                    d.snapshots.last().map(PathBuf::as_path),
                    d.old_delta.as_deref(),
                    Some(d.base.as_path()),
                ]
                .into_iter()
                .flatten()
                .map(Path::to_path_buf),
            )
            .find(|p| p.exists())
            .ok_or_else(|| {
                KnibError::new(
                    ErrorKind::VmInconsistent,
                    format!("volume {}: none of its files is left ({} is missing)", d.name, d.base.display()),
                )
            })?
            .to_path_buf();
        let chain = chain_of(&top)?;
        for f in [Some(d.new_delta.as_path()), d.old_delta.as_deref()].into_iter().flatten() {
            if !in_chain(&chain, f) && f.exists() {
                if d.old_delta.as_deref() == Some(f) {
                    repoint_before_removal(q, d, f, &mut rep, ctl)?;
                }
                durable_before_removal(d)?;
                fsio::remove_if_exists(f)?;
                rep.actions.push(format!("{}: removed {} (no longer in the chain)", d.name, f.display()));
            }
        }
        rep.tops.push(top);
    }
    Ok(rep)
}

/// Before a cleanup changes anything: each volume must still be as
/// `plan` (its request) describes it. When neither the file a volume ran
/// on (an old delta) nor the backup's new delta is there, the volume ran
/// on its base once this backup's steps were done or undone (its delta
/// merged, its new delta committed back or, at the end of a chain, down);
/// but it also looks so when another backup (the same one retried, or run
/// twice, whose request was refused as busy) merged the old delta and put
/// the volume on a new delta of its own. The base's directory then holds a
/// qcow2 file over the base that the request does not name: the volume
/// runs on it, not on the base, and the cleanup is refused (InvalidInput,
/// naming it) instead of answering the base as the volume's file (the
/// management server would start the VM on it, without that delta).
pub fn require_still_described(plan: &FilesPlan) -> Result<()> {
    for d in &plan.disks {
        let Some(old) = d.old_delta.as_deref() else { continue };
        if old.exists() || d.new_delta.exists() || d.snapshots.iter().any(|s| s.exists()) {
            continue;
        }
        let named: Vec<&Path> = [d.base.as_path(), old, d.new_delta.as_path()]
            .into_iter()
            .chain(d.snapshots.iter().map(PathBuf::as_path))
            .chain(d.grand_children.iter().map(PathBuf::as_path))
            .collect();
        if let Some(other) = deltas_over(&d.base, &named)?.first() {
            return Err(KnibError::invalid(format!(
                "volume {}: {} and the new delta {} are gone, and {} sits on the base {}: another backup moved the volume onto it after this one (a backup run twice, or retried); this request no longer describes the volume, nothing was done",
                d.name,
                old.display(),
                d.new_delta.display(),
                other.display(),
                d.base.display()
            )));
        }
    }
    Ok(())
}

/// The regular files beside `base` (in its directory) whose qcow2 backing
/// pointer names `base`, but `named`. Files that cannot be opened or are
/// not qcow2 are passed over; links and special files are never opened.
fn deltas_over(base: &Path, named: &[&Path]) -> Result<Vec<PathBuf>> {
    let dir = fsio::parent_dir(base);
    let entries = std::fs::read_dir(dir).map_err(|e| KnibError::io("cannot list", dir, e))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if !e.file_type().is_ok_and(|t| t.is_file()) || named.iter().any(|n| same_file(n, &p)) {
            continue;
        }
        let Some(backing) = crate::qcow2::header_of_regular_file(&p, true).and_then(|h| h.backing_file) else {
            continue;
        };
        if same_file(&dir.join(&backing), base) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Before [`recover`] removes a layer an interrupted run took out of `d`'s
/// chain (merged into the base, or committed back): the files that hold
/// what it held, or point past it, are made durable first (the base, the
/// first VM snapshot delta or the new delta, the grand children), so that
/// a power loss after the removal finds them as they were read. The run
/// that wrote them may have been killed before its own sync.
fn durable_before_removal(d: &FilesDisk) -> Result<()> {
    let layers = [Some(&d.base), d.snapshots.first(), Some(&d.new_delta)].into_iter().flatten();
    for f in layers.chain(&d.grand_children).filter(|f| f.exists()) {
        fsio::sync_file(f)?;
    }
    Ok(())
}

/// [`repoint_grand_children`] of `d`'s grand children still on `old` (out
/// of the chain: merged into the base), before [`recover`] removes it.
fn repoint_before_removal(
    q: &QemuImg,
    d: &FilesDisk,
    old: &Path,
    rep: &mut FilesRecovery,
    ctl: &Control,
) -> Result<()> {
    let to_base = |g: &Path| pointer(g, &d.base);
    for g in repoint_grand_children(q, old, &d.base, &d.grand_children, &to_base, ctl)
        .map_err(|e| e.context(format!("volume {}", d.name)))?
    {
        rep.actions.push(repointed_line(&d.name, &g, &d.base, old));
    }
    Ok(())
}

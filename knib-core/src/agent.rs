//! The CloudStack KVM agent's operations as JSON requests (`agent.*` ops of
//! [`crate::api::call`]): path-based and stateless, one per agent command
//! wrapper. They are the one form of each piece of work they do: the
//! catalog operations of [`crate::api`] that do the same work on a stored
//! backup make the same engine calls. The Java facade (`io.knib.Knib`) maps each wrapper onto one of
//! these; `java/README.md` maps each transfer-object field onto a request
//! field.
//!
//! Every path is a local path (the agent mounts the store; knib never
//! does). Requests follow the rules of [`crate::wire`]: unknown fields are
//! refused, naming the field; `"schema": 1` may be given. Every request may
//! carry `timeout_secs` (the command's `wait`): the operation's time budget,
//! together with the caller's own (the sooner wins); 0 or absent = none.
//!
//! Their requests are the `*Req` structs of `requests.rs` and their answers
//! the structs of `answers.rs`; this module holds the operations. Their
//! JSON Schema (field types, defaults, nested objects) is
//! `docs/schema.json`, generated from them, and the README's operation
//! table lists their fields. `agent.cleanup_vm_backup`
//! takes the request of the failed `agent.take_backup` (`quiesce` is
//! ignored) and `mode`. `agent.consolidate` without `volumes` consolidates every disk
//! of the domain that has backing files.
//!
//! # Backups (`agent.take_backup`, `agent.cleanup_vm_backup`)
//!
//! Each volume of the domain is named by the file it runs on (`path`, the
//! VolumeObjectTO's path) and finds its disk target by it. Its plan for
//! [`crate::engine::live::take`]: the new delta is `delta_path_on_primary`;
//! the delta written since the last backup is `merge.child` (it must be
//! `path`), committed after the copy into `merge.parent`, the base; without
//! `merge` the volume runs on its base alone. A volume with
//! `parent_backup_path` is copied incrementally (only the delta, the parent
//! backup as its backing file, written relative to the new file); without
//! one, the flattened chain is copied (full). All volumes of a request are
//! of the same kind; `isolated` is a full copy that leaves the chain as it
//! was (`end_of_chain` is then moot). `vm_snapshot_delta_paths` (the
//! disk-only VM snapshots taken since the last backup; the management
//! server sends them only with a parent backup) are accepted for a full
//! backup, whose flattened copy holds them, and taken by an incremental
//! one, with a domain or without (see "VM snapshots since the last backup"
//! below). The directory of each `delta_path_on_store` is created when
//! missing.
//!
//! The agent path keeps no journal (CloudStack's management server keeps
//! the records): a failed `agent.take_backup` says whether the VM was left
//! consistent, and `agent.cleanup_vm_backup`, given the same request, works
//! out the step that was reached from the domain's chains and the files on
//! the store. With `mode: "discard"` (the default, the agent's cleanup:
//! the management server marks the backup failed) the backup is undone
//! even when every store file is complete: the store files are removed and
//! each new delta is committed back into the file below it, so the volume
//! runs on `base <- delta` again (on its base alone if the old delta had
//! already been merged into it) and the next incremental backup still
//! holds every write. With `mode: "complete"` (knib's own), every
//! `delta_path_on_store` present means the copy was complete: the backup
//! is finished (merges, end of chain); otherwise it is undone as above.
//! The request may also be built from the agent's cleanup TOs: `path` the
//! file the failed delta was to sit on, no `merge`; an old delta still
//! between the two (the take failed before merging it) is found in the
//! chain, the failed delta goes back into it, and the volume runs on it.
//! The answer says what was done (`actions`, `removed_from_store`,
//! `published`) and whether the VM runs (`vm_running`: the domain's state,
//! false without a domain), as `CleanupKbossBackupErrorAnswer` does.
//!
//! Answers carry what the agent's answers carry, so a wrapper computes
//! nothing: `agent.take_backup` each volume's `size` (the store file's
//! apparent length, as Java's `Files.size`) and `virtual_size` keyed by
//! `uuid`, and `total_size` (their sum); `agent.finalize_compression`
//! `total_size` (the sum of the finalized files' sizes: the agent's
//! answer details).
//!
//! # Backing pointers
//!
//! knib writes the backing pointers it makes on the store (an incremental
//! backup's parent) and, for a VM without a domain, on primary (a new
//! delta's base) relative to the directory of the file holding them, where the agent writes absolute paths
//! under its own mount points. A relative pointer survives the store being
//! mounted elsewhere (another host, another mount root, another URL
//! spelling for the same export), as long as the store's layout is kept;
//! QEMU and every reader that goes through it (guestfish, quick-restore and
//! validation overlays) resolve it against the image's own directory.
//! Absolute pointers written by the agent are followed too: a chain may
//! mix them (an agent-written parent under a knib child), and restores as
//! long as those absolute paths resolve where it is read.
//!
//! # Stopped VMs that libvirt does not know
//!
//! CloudStack's domains are transient: a stopped VM has no domain, only its
//! volume files. `agent.take_backup`, `agent.cleanup_vm_backup` and
//! `agent.merge_snapshot` with `running: false` and no `domain` work on
//! `volumes[].path` (and the merge trees' files) alone, needing no libvirt
//! ([`crate::engine::stopped`]); `domain` is required when `running` is
//! true or absent. A backup: each new delta is created over `path`
//! (`qemu-img create -b`, the pointer relative to the new delta's
//! directory), the copy is made as above, then `merge.child` (`path`) is
//! committed into `merge.parent` (natively when the native merge applies,
//! with its checks) and the new delta and each of `merge.grand_children`
//! are re-pointed at `merge.parent` (`rebase -u`); end of chain and isolated
//! as above. The failure contract is the same: a failure before every copy
//! is complete removes the copies and commits the new deltas back
//! (`vm_consistent`). `agent.cleanup_vm_backup` decides from the files as
//! above (where the new delta is, what lies below it). `agent.merge_snapshot`
//! commits each `child` into `parent` (which must be its backing file) and
//! re-points each of `grand_children`. Answers are those of the domain
//! path, with `target` null.
//!
//! # VM snapshots since the last backup
//!
//! With disk-only VM snapshots taken since the last backup, the volume's
//! chain is `merge.parent <- merge.child <- X1 <- … <- path`, and
//! `vm_snapshot_delta_paths` is `[merge.child, X1, …]`, oldest first,
//! without `path` (as the management server sends it); the chain must be
//! exactly that. The new delta is created over `path`; the incremental
//! copy is one qcow2 over the parent backup holding every cluster
//! allocated or zeroed in any layer from `path` down to, not including,
//! `merge.parent`, as the topmost of them holds it
//! ([`crate::qcow2::SourceMode::Above`]; the native data path only:
//! `qemu-img convert -B` would copy the top layer alone), so the backup
//! chain reads as the guest did at the snapshot. Then `merge.child` is
//! committed into `merge.parent` and the layer over it (`X1`, or `path`
//! with one VM snapshot) and `merge.grand_children` are re-pointed at
//! `merge.parent` (for a running domain libvirt's block commit of the
//! non-active `merge.child` does the re-pointing; for a stopped one, or a
//! VM without a domain, `qemu-img rebase -u`; with a domain, each of
//! `merge.grand_children` outside the disk's chain, another branch of the
//! snapshot tree, is re-pointed with `rebase -u` before `merge.child` is
//! removed: it must have `merge.child` as its backing file, or the request
//! is refused before anything is written); the VM snapshot deltas stay
//! (they are the snapshots' files). At the end of a chain the new delta
//! goes into `path`, the top snapshot delta.
//!
//! No domain says whether a QEMU runs on the files, so before anything is
//! written (or removed, on the store too) every existing file the request
//! names on primary is tested for QEMU's image locks
//! ([`crate::lock::held_like_qemu`]): one a process holds (the VM runs after
//! all, or a `qemu-img` works on it) fails the operation as `busy`, naming
//! the file, with nothing written. Those files are also held for the
//! whole request ([`crate::lock::hold_for_one_operation`], a lock QEMU does
//! not use): a second `agent.take_backup`, `agent.cleanup_vm_backup`,
//! `agent.merge_snapshot` or `agent.restore` on one of them meanwhile (a
//! retried command) is `busy`, naming it, with nothing written; before, a
//! second backup of the same volume merged the delta a second time and
//! left a new delta without its backing file. `agent.restore` holds each
//! existing `volume_path` the same way, and, for a volume that does not
//! exist yet, an empty lock file `.<volume>.knib-restore.lock` beside it
//! ([`crate::lock::LockFile`], removed when the restore ends).
//!
//! # Hashes
//!
//! CloudStack keeps one hash per backup (xxh3-128 over its chain's files,
//! the `hash` of `agent.take_hash`) and passes none to the compression or
//! the restore commands, so these cannot check the files they read unless
//! the caller gives the per-file hashes (`files[].hash` of
//! `agent.take_hash`): `agent.compress` takes `expected_hashes` (one per
//! file of `files`, in order), and then refuses a file that does not match
//! with a `corrupt` error naming it and answers the compressed file's own
//! `hash`; each volume of `agent.restore` takes `expected_hashes` (files of
//! its chain with their hashes), and a file that does not match fails the
//! restore before any volume is replaced (a quick restore reads no data
//! and checks nothing). Without them nothing is checked.
//!
//! # Restore
//!
//! `agent.restore` writes every volume to a hidden staging file beside its
//! `volume_path` first (a flattened copy, or with `quick_restore` an empty
//! qcow2 overlay whose backing file is the backup), and only when all are
//! written renames them over the volumes; on a failure no volume has
//! changed. Then each of `deltas_to_remove` (files of the old chains on
//! primary) is removed; one that cannot be is logged and left out of the
//! answer's `removed`. The domain must be stopped (the agent's job): a
//! volume or delta a process holds QEMU's image lock on (a running VM, a
//! VM reading it as a backing file) is busy, nothing changed, and QEMU
//! cannot start on them while the restore runs. A volume that is a file of
//! a backup chain read is refused (invalid input).
//! `agent.consolidate` later pulls the backup's data into each quick-restored
//! volume (block pull, polled; aborted when the time budget runs out).
//!
//! # Validation
//!
//! As the agent (issue 14 §3; `java/README.md` maps each field):
//!
//! - `agent.prepare_validation` makes one qcow2 overlay per volume over its
//!   backup file (only ever read), at the volume's `overlay_path` (the
//!   validation VM's volume file, which the management server created): it
//!   replaces that file only when it holds no data (absent, empty, or a
//!   qcow2 image without backing file or allocated cluster) and no QEMU
//!   holds it, all volumes or none (each overlay is made under a temporary
//!   name; the files are replaced once all are whole). Without
//!   `overlay_path`, the overlay is `<vm_name>..<uuid>.knib-validation.qcow2`
//!   in `work_dir`.
//! - `agent.validate` with `domain` validates that running domain (the
//!   validation VM the management server started) by name, creating,
//!   changing and destroying nothing
//!   ([`crate::engine::validate::validate_running`]); with `disks` it boots a
//!   throwaway domain on overlays of its own over them and removes it
//!   afterwards ([`crate::engine::validate::boot_test`]; its guest is
//!   stopped, and the validation fails, when it writes more than
//!   `max_write_mib` or leaves less than 1 GiB free). Either way the
//!   checks run in the agent's order: wait for the guest agent
//!   (`guest-sync`, when `wait_for_boot`), the screenshot after
//!   `screenshot_wait_secs`, the script. The screenshot goes to
//!   `screenshot_path`, or is named as the agent names it,
//!   `<screenshot_next_to>-screenshot-<UTC time>.png`, and answered
//!   relative to `store_root` too. The script's arguments are split at
//!   every comma, nothing trimmed; it has `script_timeout_secs` (default
//!   60) to end; `script_result` is the agent's `scriptResult` (see
//!   [`ValidateAnswer::script_result`]). `passed` and `problems` are knib's:
//!   the agent's answer is a success whatever the checks found.
//! - `agent.cleanup_validation` does nothing by default, as the agent (the
//!   management server destroys the VM and its volumes); `remove_domain`
//!   destroys (and undefines) the domain named `vm_name`, `work_dir`
//!   removes the overlays `prepare_validation` made there.

use crate::fsio::same_file;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::{self, CompressOptions};
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::progress::{Control, Deadline};
use crate::qemu_img::{CompressionLibrary, ImageFormat, QemuImg};
use crate::wire::{absolute, non_empty};

/// The suffix of the overlays `agent.prepare_validation` makes.
pub const VALIDATION_SUFFIX: &str = ".knib-validation.qcow2";

/// The caller's control, with the request's own budget when it is sooner.
pub(crate) fn budget(ctl: &Control, secs: Option<u64>) -> Control {
    match secs.filter(|s| *s > 0).map(Duration::from_secs) {
        Some(b) if ctl.deadline.remaining().is_none_or(|r| r > b) => ctl.clone().with_deadline(Deadline::after(b)),
        _ => ctl.clone(),
    }
}

/// Hold every file on primary a take or cleanup request names
/// ([`named_files`]) for the whole request
/// ([`crate::lock::hold_for_one_operation`]): one take, cleanup, merge or
/// restore at a time on a volume's files, with a domain (`domain`) or
/// without. A second backup of a stopped volume merged the same delta
/// again under the first; a cleanup (CloudStack's, after a take it gave up
/// waiting for) ran beside the take and removed the files it then
/// answered as a backup, or aborted another backup's job.
pub(crate) fn hold_volumes(op: &str, r: &TakeReq, domain: Option<&str>) -> Result<Vec<std::fs::File>> {
    let who = match domain {
        Some(d) => format!("{op} of domain {d}"),
        None => format!("{op} of a VM without a domain"),
    };
    crate::lock::hold_for_one_operation(&named_files(r), &who)
}

/// Every file on primary the request names (those that exist are tested
/// for QEMU's locks before anything is done).
pub(crate) fn named_files(r: &TakeReq) -> Vec<&Path> {
    let mut out: Vec<&Path> = Vec::new();
    for v in &r.volumes {
        out.push(&v.path);
        out.push(&v.delta_path_on_primary);
        if let Some(m) = &v.merge {
            out.push(&m.parent);
            out.push(&m.child);
            out.extend(m.grand_children.iter().map(PathBuf::as_path));
        }
        out.extend(v.vm_snapshot_delta_paths.iter().map(PathBuf::as_path));
    }
    out
}

/// The backing chain of volume `uuid`'s file `path` (`path` first, never
/// empty), as the copy reads it: a FIFO in it is refused before qemu-img is
/// asked (it would wait on it), and so is a device below a volume file
/// ([`refuse_devices_below_a_file`]).
pub(crate) fn volume_chain(
    op: &str,
    uuid: &str,
    path: &Path,
    q: &crate::qemu_img::QemuImg,
    ctl: &Control,
) -> Result<Vec<crate::qemu_img::ImageInfo>> {
    crate::engine::stopped::refuse_special_layers(path)?;
    let chain = q.info_chain(path, ctl)?;
    refuse_devices_below_a_file(op, uuid, path, &chain)?;
    if chain.is_empty() {
        return Err(KnibError::internal(format!("qemu-img info of {} lists no image", path.display())));
    }
    Ok(chain)
}

/// Refuse a volume file `top` that is a regular file when a file below it
/// in its backing chain (`chain`, as `qemu-img info --backing-chain` lists
/// it, `top` first) is not one: a volume on file storage is backed by
/// template and delta files, and a block device under it (a backing pointer
/// of an uploaded image naming `/dev/sda`) would be copied into the store,
/// a host disk handed to whoever may download the backup. (A volume that
/// is itself a block device is left to the caller, which refuses one
/// today.)
pub(crate) fn refuse_devices_below_a_file(
    op: &str,
    uuid: &str,
    top: &Path,
    chain: &[crate::qemu_img::ImageInfo],
) -> Result<()> {
    if !std::fs::metadata(top).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    for (upper, layer) in chain.iter().zip(chain.iter().skip(1)) {
        let f = Path::new(&layer.filename);
        if !std::fs::metadata(f).is_ok_and(|m| m.is_file()) {
            return Err(KnibError::invalid(format!(
                "request of {op}: volume {uuid}: {} is backed by {}, which is not a regular file: a volume file is backed by files only, and it is not read",
                upper.filename,
                f.display()
            )));
        }
    }
    Ok(())
}

/// `p` with symbolic links and `..` resolved, or as given when it does not
/// exist.
fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// `agent.finalize_compression`.
pub(crate) fn finalize_compression(op: &str, r: &FinalizeReq) -> Result<FinalizeAnswer> {
    non_empty(op, "files", &r.files)?;
    for (i, f) in r.files.iter().enumerate() {
        absolute(op, &format!("files[{i}]"), f)?;
    }
    engine::finalize(&r.files, !r.cleanup)?;
    if r.cleanup {
        Ok(FinalizeAnswer { finalized: None, discarded: Some(r.files.clone()), total_size: 0 })
    } else {
        let done = r
            .files
            .iter()
            .map(|f| Ok(SizedFile { path: f.clone(), size: fsio::file_size(f)? }))
            .collect::<Result<Vec<_>>>()?;
        let total_size = done.iter().map(|f| f.size).sum();
        Ok(FinalizeAnswer { finalized: Some(done), discarded: None, total_size })
    }
}

/// `agent.take_hash`.
pub(crate) fn take_hash(op: &str, r: &HashReq, ctl: &Control) -> Result<TakeHashAnswer> {
    non_empty(op, "files", &r.files)?;
    for (i, f) in r.files.iter().enumerate() {
        absolute(op, &format!("files[{i}]"), f)?;
    }
    let ChainHash { hash, files } = chain_hash(&r.files, ctl)?;
    Ok(TakeHashAnswer { backup_uuid: r.backup_uuid.clone(), hash, files })
}

/// The hash of a chain (`files`, root first) and of each of its files: the
/// one hashing call of `agent.take_hash` and `hash`.
pub(crate) fn chain_hash(files: &[PathBuf], ctl: &Control) -> Result<ChainHash> {
    // No merge writes them while they are read (a hash of a parent half
    // merged was answered as the file's).
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let _reading = crate::lock::hold_for_reading(&refs, "the hash")?;
    let (hash, each) = engine::hash::hash_chain(files, ctl)?;
    let files = files.iter().zip(each).map(|(p, h)| FileHash { path: p.clone(), hash: h }).collect();
    Ok(ChainHash { hash, files })
}

/// The compression options of `agent.compress` and `compress`, which take
/// the same fields with the same defaults.
pub(crate) fn compress_options(
    library: CompressionLibrary,
    coroutines: u32,
    rate_limit_mbps: u64,
    min_free_factor: f64,
    check_output: bool,
) -> CompressOptions {
    CompressOptions { library, coroutines, rate_limit_mbps, min_free_factor, check_output, ..Default::default() }
}

/// `min_free_bytes` of `agent.compress` and `compress`: refuse unless that
/// many bytes are free where the compressed files go.
pub(crate) fn require_free(dir: &Path, min_free_bytes: Option<u64>) -> Result<()> {
    match min_free_bytes {
        Some(min) => fsio::require_space(dir, min, "compression (min_free_bytes)"),
        None => Ok(()),
    }
}

/// `agent.compress`.
pub(crate) fn compress(op: &str, r: &CompressReq, ctl: &Control) -> Result<CompressAnswer> {
    non_empty(op, "files", &r.files)?;
    for (i, f) in r.files.iter().enumerate() {
        absolute(op, &format!("files[{i}]"), f)?;
        fsio::require_file(f, "backup file ", false)?;
    }
    let opts = compress_options(r.library, r.coroutines, r.rate_limit_mbps, r.min_free_factor, r.check_output);
    // Beside every file: they may lie on more than one file system.
    let mut dirs: Vec<&Path> = r.files.iter().map(|f| fsio::parent_dir(f)).collect();
    dirs.dedup();
    for d in dirs {
        require_free(d, r.min_free_bytes)?;
    }
    let expected: Vec<Option<String>> = match &r.expected_hashes {
        Some(h) if h.len() != r.files.len() => {
            return Err(KnibError::invalid(format!(
                "request of {op}: {} expected_hashes for {} files (one per file, in order)",
                h.len(),
                r.files.len()
            )))
        }
        Some(h) => h.iter().cloned().map(Some).collect(),
        None => vec![None; r.files.len()],
    };
    let done = engine::compress_verified(&QemuImg::new(), &r.files, &expected, &opts, ctl)?;
    Ok(CompressAnswer { compressed: done.into_iter().map(Into::into).collect() })
}

/// The hidden file a volume is restored to before it replaces the volume.
fn staging_path(volume: &Path) -> PathBuf {
    let name = volume.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    volume.with_file_name(format!(".{name}.knib-restore"))
}

/// The lock file of the restores to `volume` (the volume may not exist
/// yet), beside it; removed when the restore ends.
fn lock_path(volume: &Path) -> PathBuf {
    let name = volume.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    volume.with_file_name(format!(".{name}.knib-restore.lock"))
}

/// `agent.restore`.
pub(crate) fn restore(op: &str, r: &RestoreReq, ctl: &Control) -> Result<RestoreAnswer> {
    non_empty(op, "volumes", &r.volumes)?;
    let q = QemuImg::new();
    for (i, v) in r.volumes.iter().enumerate() {
        absolute(op, &format!("volumes[{i}].backup_path"), &v.backup_path)?;
        absolute(op, &format!("volumes[{i}].volume_path"), &v.volume_path)?;
        fsio::require_file(&v.backup_path, "backup file ", false)?;
        if r.volumes[..i].iter().any(|o| same_file(&o.volume_path, &v.volume_path)) {
            return Err(KnibError::invalid(format!(
                "request of {op}: volume path {} is named twice",
                v.volume_path.display()
            )));
        }
    }
    for (i, f) in r.deltas_to_remove.iter().enumerate() {
        absolute(op, &format!("deltas_to_remove[{i}]"), f)?;
    }
    // Each backup file by its resolved path, once, for every check and for
    // the copy or the overlay alike: a quick restore's overlay names it
    // resolved, so QEMU finds relative parents beside the link's target;
    // checked through the link, another chain (same names beside the
    // link) was checked, hashed and protected from removal.
    let backup_paths: Vec<PathBuf> = r
        .volumes
        .iter()
        .map(|v| v.backup_path.canonicalize().map_err(|e| KnibError::io("cannot resolve", &v.backup_path, e)))
        .collect::<Result<_>>()?;
    // What each volume's file will be renamed over must be a file (or
    // nothing yet): found out before anything is staged or replaced, not at
    // the second rename after the first volume was replaced.
    for (i, v) in r.volumes.iter().enumerate() {
        match std::fs::symlink_metadata(&v.volume_path) {
            Ok(m) if m.is_file() || m.file_type().is_symlink() => {}
            Ok(_) => {
                return Err(KnibError::invalid(format!(
                    "request of {op}: volumes[{i}].volume_path {} is not a regular file",
                    v.volume_path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KnibError::io("cannot stat", &v.volume_path, e)),
        }
    }
    // One restore at a time replaces a volume: a second one to the same
    // file is busy (both wrote one staging file, and the loser answered
    // with a misleading error).
    let targets: Vec<&Path> = r.volumes.iter().map(|v| v.volume_path.as_path()).collect();
    let _claims: Vec<crate::lock::LockFile> = r
        .volumes
        .iter()
        .map(|v| {
            crate::lock::LockFile::hold(
                &lock_path(&v.volume_path),
                &format!("a restore to {}", v.volume_path.display()),
            )
        })
        .collect::<Result<_>>()?;
    let _held = crate::lock::hold_for_one_operation(&targets, "the restore")?;
    crate::crashpoint::pause_point(&format!("{op}: volumes held, {} first", r.volumes[0].volume_path.display()));
    // The backups' chains, read once (their files are held for reading,
    // and none may be among the deltas removed).
    let chains: Vec<Vec<PathBuf>> =
        backup_paths.iter().map(|b| engine::backup_chain_files(b)).collect::<Result<_>>()?;
    // A volume is never a file of a backup read here: the restored copy
    // (or a quick restore's overlay, backed by itself) replaced the backup.
    for (i, v) in r.volumes.iter().enumerate() {
        for (w, chain) in r.volumes.iter().zip(&chains) {
            if let Some(b) = chain.iter().find(|b| same_file(b, &v.volume_path)) {
                return Err(KnibError::invalid(format!(
                    "request of {op}: volumes[{i}].volume_path {} is {} of the backup chain of volume {}: a restore never writes over a backup; nothing was changed",
                    v.volume_path.display(),
                    b.display(),
                    w.uuid.as_deref().unwrap_or("(no uuid)")
                )));
            }
        }
    }
    // The old deltas removed at the end are never a file of a backup read
    // here (a quick-restored volume would lose its backing file, and the
    // backup its data) nor a directory (found before any volume changes).
    if !r.deltas_to_remove.is_empty() {
        for (i, f) in r.deltas_to_remove.iter().enumerate() {
            if std::fs::symlink_metadata(f).is_ok_and(|m| m.is_dir()) {
                return Err(KnibError::invalid(format!(
                    "request of {op}: deltas_to_remove[{i}] {} is a directory",
                    f.display()
                )));
            }
            for (v, chain) in r.volumes.iter().zip(&chains) {
                if let Some(b) = chain.iter().find(|b| same_file(b, f)) {
                    return Err(KnibError::invalid(format!(
                        "request of {op}: deltas_to_remove[{i}] {} is {} of the backup chain of volume {}: a restore never removes a backup; nothing was changed",
                        f.display(),
                        b.display(),
                        v.uuid.as_deref().unwrap_or("(no uuid)")
                    )));
                }
            }
        }
    }
    // (Neither is a file of a backup chain, held for reading below.) No VM runs on what is replaced or removed, nor starts on it until
    // the restore ends (QEMU fails to take its lock): a volume renamed
    // over under a running VM lost every write it made afterwards, and a
    // delta removed under one (a template other VMs read) broke them.
    let replaced: Vec<&Path> = targets.iter().copied().chain(r.deltas_to_remove.iter().map(PathBuf::as_path)).collect();
    let _unused = crate::lock::hold_like_qemu_writer(&replaced, "the restore")?;
    crate::crashpoint::pause_point(&format!("{op}: volumes locked against QEMU"));
    // A quick restore runs the VM on the backups' chains: each is checked
    // before any volume is staged, and the files the caller gave hashes for
    // are held against them (a read of each; a plain restore does it as it
    // copies).
    if r.quick_restore {
        for (v, b) in r.volumes.iter().zip(&backup_paths) {
            let chain = q.info_chain(b, ctl)?;
            let files: Vec<PathBuf> = chain.iter().map(|i| PathBuf::from(&i.filename)).collect();
            // Raw files have no metadata to check.
            let qcow2: Vec<PathBuf> =
                chain.iter().filter(|i| i.format == "qcow2").map(|i| PathBuf::from(&i.filename)).collect();
            engine::require_quick_restorable(&q, &qcow2, ctl)?;
            engine::verify::verify_chain_files(&files, &v.expected_hashes, ctl)?;
        }
    }
    // The backups' files are read under QEMU's reader locks: no merge
    // writes them meanwhile (a restore copied a parent half merged).
    let refs: Vec<&Path> = chains.iter().flatten().map(PathBuf::as_path).collect();
    let _reading = crate::lock::hold_for_reading(&refs, "the restore")?;
    // 1. Every volume to its staging file; on a failure, none is changed.
    // Each staged file is held: it replaces its volume only while its name
    // still leads to it (one swapped for a link meanwhile would have put
    // the file the link leads to in the volume's place).
    let mut staged: Vec<PathBuf> = Vec::new();
    let mut held: Vec<std::fs::File> = Vec::new();
    let written = (|| -> Result<()> {
        for (v, b) in r.volumes.iter().zip(&backup_paths) {
            let stage = staging_path(&v.volume_path);
            fsio::remove_if_exists(&stage)?;
            staged.push(stage.clone());
            held.push(if r.quick_restore {
                engine::restore::create_overlay_held(&q, b, &stage, ctl)?
            } else {
                engine::restore::restore_held(
                    &q,
                    &engine::RestoreRequest {
                        backup_file: b.clone(),
                        dest: stage.clone(),
                        format: ImageFormat::Qcow2,
                        overwrite: false,
                        data_path: Default::default(),
                    },
                    &v.expected_hashes,
                    ctl,
                )?
            });
            crate::crashpoint::pause_point(&format!("{op}: staged {}", stage.display()));
        }
        ctl.check("replacing the volumes")
    })();
    if let Err(e) = written {
        for s in &staged {
            let _ = fsio::remove_if_exists(s);
        }
        return Err(e);
    }
    // 2. The volumes are replaced, then the old deltas removed.
    let mut volumes = Vec::new();
    for (i, ((v, stage), file)) in r.volumes.iter().zip(&staged).zip(&held).enumerate() {
        if let Err(e) = fsio::commit_own_temp(stage, file, &v.volume_path, true) {
            // Say exactly what was and was not replaced; the restored
            // copies of the others stay beside them for a retry.
            let mut done: Vec<String> = volumes.iter().map(|v: &RestoredVolume| v.path.display().to_string()).collect();
            // One in place but not made durable (its directory's sync
            // failed) was replaced: its staged name is gone.
            let in_place = fsio::require_same_file(&v.volume_path, file).is_ok();
            if in_place {
                done.push(v.volume_path.display().to_string());
            }
            // (One refused as not knib's file is not a restored copy.)
            let from = if in_place || e.kind == crate::ErrorKind::Corrupt { i + 1 } else { i };
            let left: Vec<String> = staged[from..].iter().map(|s| s.display().to_string()).collect();
            return Err(e.context(format!(
                "{op}: replaced {} of {} volumes ({}); {}",
                done.len(),
                r.volumes.len(),
                if done.is_empty() { "none".into() } else { done.join(", ") },
                if left.is_empty() {
                    "no restored copy is left".to_string()
                } else {
                    format!("the restored copies of the others are left at {}", left.join(", "))
                }
            )));
        }
        let backing = r.quick_restore.then(|| canonical(&v.backup_path));
        volumes.push(RestoredVolume { uuid: v.uuid.clone(), path: v.volume_path.clone(), backing });
    }
    let mut removed = Vec::new();
    for f in &r.deltas_to_remove {
        if r.volumes.iter().any(|v| same_file(&v.volume_path, f)) {
            log::warn!("{op}: {} is a restored volume; it is not removed", f.display());
            continue;
        }
        // Every volume is restored by now: a delta that cannot be removed
        // is said (logged, and absent from `removed`), not a failure of a
        // restore that happened.
        match std::fs::symlink_metadata(f) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => match fsio::remove_if_exists(f) {
                Ok(()) => removed.push(f.clone()),
                Err(e) => {
                    log::warn!("{op}: the volumes are restored, but the old delta {} was not removed: {e}", f.display())
                }
            },
        }
    }
    Ok(RestoreAnswer { volumes, removed })
}

/// The cleanup's store side: the partial copy beside each store file
/// (`disks`: the volume's name and its store file) removed, and the store
/// file too unless the backup is finished (`finish`); `published` says
/// whether every store file was complete. Returns (actions, files removed).
pub(crate) fn clean_store(
    disks: &[(&str, &Path)],
    published: bool,
    finish: bool,
) -> Result<(Vec<String>, Vec<PathBuf>)> {
    let mut actions = Vec::new();
    let mut removed = Vec::new();
    for (name, dest) in disks {
        let tmp = fsio::temp_path(dest);
        if tmp.exists() {
            fsio::remove_if_exists(&tmp)?;
            actions.push(format!("{name}: removed the partial copy {}", tmp.display()));
            removed.push(tmp);
        }
        if !finish && dest.exists() {
            fsio::remove_if_exists(dest)?;
            let why = if published { "the backup is discarded" } else { "the backup was not complete" };
            actions.push(format!("{name}: removed {} ({why})", dest.display()));
            removed.push(dest.to_path_buf());
        }
    }
    Ok((actions, removed))
}

/// A volume's `parent_backup_path` before a backup is taken on it
/// (`field` names it in messages): absolute, a regular file, and the top
/// of a chain of backup files (all regular qcow2 files, as a restore
/// requires) that leaves room for the new one: a chain holds at most
/// [`crate::qcow2::MAX_CHAIN_DEPTH`] files, and a backup on a deeper
/// one could never be restored. Errors: InvalidInput for a chain that is
/// full, and those of [`engine::backup_chain_files`] (NotFound, Corrupt,
/// InvalidInput) for a parent that is not a backup.
pub(crate) fn check_parent_backup(op: &str, field: &str, uuid: &str, parent: &Path) -> Result<()> {
    absolute(op, field, parent)?;
    fsio::require_file(parent, &format!("volume {uuid}: the parent backup "), false)?;
    let chain =
        engine::backup_chain_files(parent).map_err(|e| e.context(format_args!("request of {op}: volume {uuid}")))?;
    let max = crate::qcow2::MAX_CHAIN_DEPTH;
    if chain.len() >= max {
        return Err(KnibError::invalid(format!(
            "request of {op}: volume {uuid}: the parent backup {} is the last of a chain of {} backup files, the most a chain may have: this backup must be a full one (CloudStack's backup.chain.size, or the offering's BACKUP_CHAIN_SIZE, must be between 1 and {max})",
            parent.display(),
            chain.len()
        )));
    }
    Ok(())
}

/// The error of `merges[i]` of an `agent.merge_snapshot`, saying which
/// merges before it were made (each child is gone, merged into its
/// parent): a retry of the same request fails at the first of them, so
/// the caller must retry with `merges[i..]` only.
pub(crate) fn merge_failed(e: KnibError, i: usize, done: &[requests::SnapshotMerge]) -> KnibError {
    if i == 0 {
        return e;
    }
    let made: Vec<String> = done.iter().map(|m| format!("{} into {}", m.child.display(), m.parent.display())).collect();
    e.context(format_args!(
        "merges[{i}] (merges[0..{i}] were made and their children removed: {}; only merges[{i}..] are left to do)",
        made.join(", ")
    ))
}

/// Refuse an `agent.merge_snapshot` whose `merges[i].child` holds internal
/// qcow2 snapshots (a memory snapshot CloudStack took): the merge removes
/// the file, and the snapshots with it, answered as success. Checked for
/// every merge before any is made.
pub(crate) fn refuse_merging_internal_snapshots(op: &str, merges: &[requests::SnapshotMerge]) -> Result<()> {
    for (i, m) in merges.iter().enumerate() {
        let Some(h) = crate::qcow2::header_of_regular_file(&m.child, false) else { continue };
        if h.nb_snapshots > 0 {
            return Err(KnibError::invalid(format!(
                "request of {op}: merges[{i}].child {} holds {} internal snapshot(s) (`qemu-img snapshot -l` lists them): merging it into its parent removes it, and the snapshots with it; delete them (virsh snapshot-delete) or revert to them first; nothing was changed",
                m.child.display(),
                h.nb_snapshots
            )));
        }
    }
    Ok(())
}

/// The checks every backup volume of a request gets, before anything else
/// is looked at: at most [`crate::wire::MAX_LIST`], each with a uuid, an absolute
/// `path` and `delta_path_on_store` (and `delta_path_on_primary` when the
/// method creates it, `primary`) and every other path absolute; then
/// [`new_files_apart`].
pub(crate) fn check_volumes(op: &str, volumes: &[requests::BackupVolume], primary: bool) -> Result<()> {
    crate::wire::at_most(op, "volumes", volumes)?;
    for (i, v) in volumes.iter().enumerate() {
        let field = |f: &str| format!("volumes[{i}].{f}");
        if v.uuid.is_empty() {
            return Err(KnibError::invalid(format!("request of {op}: field `{}` is empty", field("uuid"))));
        }
        absolute(op, &field("path"), &v.path)?;
        if primary {
            absolute(op, &field("delta_path_on_primary"), &v.delta_path_on_primary)?;
        }
        absolute(op, &field("delta_path_on_store"), &v.delta_path_on_store)?;
        if let Some(p) = &v.parent_backup_path {
            absolute(op, &field("parent_backup_path"), p)?;
        }
        if let Some(m) = &v.merge {
            absolute(op, &field("merge.parent"), &m.parent)?;
            absolute(op, &field("merge.child"), &m.child)?;
            for (j, g) in m.grand_children.iter().enumerate() {
                absolute(op, &field(&format!("merge.grand_children[{j}]")), g)?;
            }
        }
        for (j, s) in v.vm_snapshot_delta_paths.iter().enumerate() {
            absolute(op, &field(&format!("vm_snapshot_delta_paths[{j}]")), s)?;
        }
    }
    new_files_apart(op, volumes, primary)
}

/// The backup files and the new deltas of a request are new files of their
/// own: a cleanup removes or undoes them, so none may be a file any volume
/// of the request runs on, merges or builds on (its parent backup's chain),
/// nor another new file. Before, only a volume's own files were compared:
/// a request whose volume named another volume's disk as its backup file
/// had that disk removed by a cleanup, and two volumes with one backup
/// file had the second copy renamed over the first (the first volume's
/// increment lost, both answered as backed up).
fn new_files_apart(op: &str, volumes: &[requests::BackupVolume], primary: bool) -> Result<()> {
    use std::collections::HashMap;
    let field = |i: usize, f: &str| format!("volumes[{i}].{f}");
    // Every file named, by identity (as fsio::same_file tells files
    // apart), with the volume and field that name it.
    let mut named: HashMap<fsio::FileKey, Vec<(usize, &str, PathBuf)>> = HashMap::new();
    let mut name =
        |f: &Path, i: usize, what: &'static str| named.entry(fsio::file_key(f)).or_default().push((i, what, f.into()));
    for (i, v) in volumes.iter().enumerate() {
        name(&v.path, i, "path");
        if let Some(m) = &v.merge {
            name(&m.parent, i, "merge.parent");
            name(&m.child, i, "merge.child");
            for g in &m.grand_children {
                name(g, i, "merge.grand_children");
            }
        }
        for s in &v.vm_snapshot_delta_paths {
            name(s, i, "vm_snapshot_delta_paths");
        }
        if let Some(p) = &v.parent_backup_path {
            // The parent's whole chain when it opens (else the file named).
            let chain = engine::backup_chain_files(p).unwrap_or_else(|_| vec![p.clone()]);
            for f in chain {
                name(&f, i, "chain of parent_backup_path");
            }
        }
        if primary {
            name(&v.delta_path_on_store, i, "delta_path_on_store");
        }
    }
    let mut new: HashMap<fsio::FileKey, (usize, &str)> = HashMap::new();
    for (i, v) in volumes.iter().enumerate() {
        let mut mine: Vec<(&str, &str, &Path)> =
            vec![("delta_path_on_store", "the backup file", &v.delta_path_on_store)];
        if primary {
            mine.push(("delta_path_on_primary", "the new delta", &v.delta_path_on_primary));
        }
        for (f, role, file) in mine {
            let key = fsio::file_key(file);
            let clash = named.get(&key).and_then(|n| n.iter().find(|(j, what, _)| *j != i || *what != f));
            let is = match (clash, new.get(&key)) {
                (Some((j, what, at)), _) if *j == i => format!("the volume's {what} ({})", at.display()),
                (Some((j, what, at)), _) => {
                    format!("the {what} of volumes[{j}] (volume {}, {})", volumes[*j].uuid, at.display())
                }
                (None, Some((j, other))) => format!("{} too (volume {})", field(*j, other), volumes[*j].uuid),
                (None, None) => {
                    new.insert(key, (i, f));
                    continue;
                }
            };
            return Err(KnibError::invalid(format!(
                "request of {op}: {} {} is {is}: {role} must be a new file of its own",
                field(i, f),
                file.display()
            )));
        }
    }
    Ok(())
}

mod answers;
#[cfg(feature = "libvirt")]
pub(crate) mod bitmap;
// Without libvirt, the requests of the operations that need it are read
// (the dispatcher refuses them) but their fields are not.
#[cfg(feature = "libvirt")]
pub(crate) mod live;
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
mod requests;
pub(crate) mod stopped;
mod validation;

pub use answers::*;
pub use requests::CleanupMode;
pub(crate) use requests::{
    domain_of, kind_of, CleanupReq, CleanupValidationReq, CompressReq, ConsolidateReq, FinalizeReq, HashReq, MergeReq,
    PrepareReq, RestoreReq, TakeReq, ValidateReq,
};
pub(crate) use validation::prepare_validation;
pub use validation::validation_overlay;
#[cfg(feature = "libvirt")]
pub(crate) use validation::{guest_command, script_result};

//! The agent operations that need libvirt (see the module documentation of
//! [`crate::agent`]).

use super::*;
use crate::engine::live::{self as engine_live, chain_of, DiskPlan, LivePlan};
use crate::engine::take::BackupKind;
use crate::engine::validate::{boot_test, validate_running, BootTestRequest, CheckTiming};
use crate::libvirt::{DiskInfo, Hypervisor, Vm};
use crate::qcow2::relative_pointer;

use crate::libvirt::{describe_disks as describe, disk_on, domain};
use crate::lock::hold_for_one_operation;

/// Fail when the request says the domain is running and it is not, or the
/// other way round.
fn check_running(op: &str, vm: &Vm, want: Option<bool>) -> Result<bool> {
    let running = vm.is_running()?;
    match want {
        Some(w) if w != running => Err(KnibError::invalid(format!(
            "request of {op}: field `running` is {w}, but domain {} is {}",
            vm.name(),
            if running { "running" } else { "stopped" }
        ))),
        _ => Ok(running),
    }
}

/// The disk of `vm` whose chain holds one of `files`, and that chain.
fn disk_holding<'a>(
    q: &QemuImg,
    vm: &Vm,
    running: bool,
    disks: &'a [DiskInfo],
    files: &[&Path],
    ctl: &Control,
) -> Result<(&'a DiskInfo, Vec<PathBuf>)> {
    for d in disks {
        let chain = chain_of(q, running, d, ctl)?;
        if chain.iter().any(|c| files.iter().any(|f| same_file(c, f))) {
            return Ok((d, chain));
        }
    }
    Err(KnibError::not_found(format!(
        "no disk of domain {} has {} in its chain (its disks: {})",
        vm.name(),
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" or "),
        describe(disks)
    )))
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Mode {
    Take,
    Cleanup,
}

/// The plan of a backup from the request's explicit paths.
fn plan(op: &str, q: &QemuImg, vm: &Vm, r: &TakeReq, mode: Mode, ctl: &Control) -> Result<LivePlan> {
    non_empty(op, "volumes", &r.volumes)?;
    let running = check_running(op, vm, r.running)?;
    let kind = kind_of(op, r, true)?;
    let disks = vm.disks()?;
    let mut plans: Vec<DiskPlan> = Vec::new();
    super::check_volumes(op, &r.volumes, true)?;
    for (i, v) in r.volumes.iter().enumerate() {
        let field = |f: &str| format!("volumes[{i}].{f}");
        if let Some(p) = &v.parent_backup_path {
            if mode == Mode::Take {
                super::check_parent_backup(op, &field("parent_backup_path"), &v.uuid, p)?;
            } else {
                // Absolute, as every path (check_volumes).
                crate::fsio::require_file(p, &format!("volume {}: the parent backup ", v.uuid), false)?;
            }
        }
        if let Some(m) = &v.merge {
            if let Some(first) = v.vm_snapshot_delta_paths.first() {
                if !same_file(first, &m.child) {
                    return Err(KnibError::invalid(format!(
                        "request of {op}: volume {}: `vm_snapshot_delta_paths[0]` ({}) must be `merge.child` ({}), the delta the VM snapshots since the last backup were taken over",
                        v.uuid,
                        first.display(),
                        m.child.display()
                    )));
                }
            }
        } else if !v.vm_snapshot_delta_paths.is_empty() {
            return Err(KnibError::invalid(format!(
                "request of {op}: volume {}: `vm_snapshot_delta_paths` needs `merge` (the delta below the VM snapshots as `merge.child`, its base as `merge.parent`)",
                v.uuid
            )));
        }
        // The layers between `merge.child` and `merge.parent`: the VM
        // snapshot deltas over the old delta.
        let n = v.vm_snapshot_delta_paths.len();
        let (disk, base, old_delta, snapshots, grand_children) = match mode {
            Mode::Take => {
                let disk = disk_on(vm, &disks, &v.path)?;
                if v.delta_path_on_primary.exists() {
                    return Err(KnibError::invalid(format!(
                        "volume {}: the new delta {} already exists",
                        v.uuid,
                        v.delta_path_on_primary.display()
                    )));
                }
                if v.delta_path_on_store.exists() {
                    return Err(KnibError::invalid(format!(
                        "volume {}: {} already exists on the store",
                        v.uuid,
                        v.delta_path_on_store.display()
                    )));
                }
                // The files as the chain names them (libvirt and the block
                // jobs compare paths as they are written there).
                let chain = chain_of(q, running, disk, ctl)?;
                let (base, old, others) = match &v.merge {
                    Some(m) => {
                        if n == 0 && !same_file(&m.child, &v.path) {
                            return Err(KnibError::invalid(format!(
                                "request of {op}: volume {}: `merge.child` ({}) must be the file the volume runs on ({}) when no VM snapshot was taken since the last backup",
                                v.uuid,
                                m.child.display(),
                                v.path.display()
                            )));
                        }
                        // Below `path`, from the top down: the VM snapshot
                        // deltas, newest first, then `merge.parent`.
                        let mut want: Vec<(&str, &Path)> = v
                            .vm_snapshot_delta_paths
                            .iter()
                            .rev()
                            .map(|s| ("vm_snapshot_delta_paths", s.as_path()))
                            .collect();
                        want.push(("merge.parent", &m.parent));
                        for (k, (name, f)) in want.iter().enumerate() {
                            let below = chain.get(k + 1);
                            if !below.is_some_and(|b| same_file(b, f)) {
                                return Err(KnibError::invalid(format!(
                                    "request of {op}: volume {}: {} has {} below it, not `{name}` {}",
                                    v.uuid,
                                    chain[k].display(),
                                    below.map(|b| b.display().to_string()).unwrap_or_else(|| "nothing".into()),
                                    f.display()
                                )));
                            }
                        }
                        let others =
                            grand_children_off_chain(op, q, &chain, &m.parent, &m.child, &m.grand_children, ctl)?;
                        (chain[n + 1].clone(), Some(chain[n].clone()), others)
                    }
                    None if v.parent_backup_path.is_some() => {
                        return Err(KnibError::invalid(format!(
                            "request of {op}: volume {}: an incremental volume copies the delta written since its parent backup: give it as `merge.child` (with its base as `merge.parent`)",
                            v.uuid
                        )));
                    }
                    None => (chain[0].clone(), None, Vec::new()),
                };
                let snapshots: Vec<PathBuf> = chain[..n].iter().rev().cloned().collect();
                (disk, base, old, snapshots, others)
            }
            Mode::Cleanup => {
                let mut files: Vec<&Path> = vec![&v.path, &v.delta_path_on_primary];
                if let Some(m) = &v.merge {
                    files.push(&m.parent);
                }
                let (disk, chain) = disk_holding(q, vm, running, &disks, &files, ctl)?;
                // As the chain names them, while they are in it.
                let named =
                    |p: &Path| chain.iter().find(|c| same_file(c, p)).cloned().unwrap_or_else(|| p.to_path_buf());
                let snapshots: Vec<PathBuf> = match v.vm_snapshot_delta_paths.split_first() {
                    Some((_, rest)) => rest.iter().chain([&v.path]).map(|p| named(p)).collect(),
                    None => Vec::new(),
                };
                match &v.merge {
                    Some(m) => {
                        let others =
                            grand_children_off_chain(op, q, &chain, &m.parent, &m.child, &m.grand_children, ctl)?;
                        (disk, named(&m.parent), Some(named(&m.child)), snapshots, others)
                    }
                    None => (disk, named(&v.path), None, snapshots, Vec::new()),
                }
            }
        };
        if let Some(other) = plans.iter().position(|p| p.target == disk.target) {
            return Err(KnibError::invalid(format!(
                "request of {op}: volumes {} and {} are the same disk {}",
                r.volumes[other].uuid, v.uuid, disk.target
            )));
        }
        let dest_dir = crate::fsio::parent_dir(&v.delta_path_on_store);
        if mode == Mode::Take && !dest_dir.is_dir() {
            crate::fsio::create_dir_all_durable(dest_dir)?;
        }
        let parent = v.parent_backup_path.as_deref().map(|p| relative_pointer(dest_dir, p));
        let virtual_size = q.info(&disk.file, ctl)?.virtual_size;
        plans.push(DiskPlan {
            target: disk.target.clone(),
            base,
            old_delta,
            new_delta: v.delta_path_on_primary.clone(),
            dest: v.delta_path_on_store.clone(),
            parent,
            virtual_size,
            snapshots,
            grand_children,
        });
    }
    let id = r
        .volumes
        .first()
        .and_then(|v| v.delta_path_on_primary.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(LivePlan {
        backup_id: id,
        kind,
        end_of_chain: r.end_of_chain && kind != BackupKind::Isolated,
        quiesce: r.quiesce,
        running,
        disks: plans,
        data_path: Default::default(),
        compress: None,
        check_output: false,
    })
}

/// Of `grand_children` (files whose backing file is `child`), those outside
/// the disk's `chain` (other branches of a VM snapshot tree) still on
/// `child`: the merge of `child` re-points the one in the chain itself;
/// these are re-pointed at `parent` after it. One already on `parent` (a
/// merge run again, as a clean-up does) is left; one on another file is
/// refused.
fn grand_children_off_chain(
    op: &str,
    q: &QemuImg,
    chain: &[PathBuf],
    parent: &Path,
    child: &Path,
    grand_children: &[PathBuf],
    ctl: &Control,
) -> Result<Vec<PathBuf>> {
    let mut others = Vec::new();
    for g in grand_children {
        if chain.iter().any(|c| same_file(c, g)) {
            continue;
        }
        let info = q.info(g, ctl)?;
        let on = |f: &Path| info.full_backing_filename.as_deref().is_some_and(|b| same_file(Path::new(b), f));
        if on(child) {
            others.push(g.clone());
        } else if !on(parent) {
            return Err(KnibError::invalid(format!(
                "request of {op}: grand child {} does not have {} as its backing file",
                g.display(),
                child.display()
            )));
        }
    }
    Ok(others)
}

/// `agent.take_backup`.
pub(crate) fn take_backup(op: &str, r: &TakeReq, ctl: &Control) -> Result<TakeBackupAnswer> {
    if r.method == engine::BackupMethod::Bitmap {
        return super::bitmap::take_backup(op, r, ctl);
    }
    let q = QemuImg::new();
    // Until the snapshot, nothing has changed: the VM is consistent.
    let consistent = |e: KnibError| if e.vm_consistent.is_none() { e.with_vm_consistent(true) } else { e };
    let vm = domain(r.connect.as_deref(), r.domain.as_deref().unwrap_or_default()).map_err(consistent)?;
    let plan = plan(op, &q, &vm, r, Mode::Take, ctl).map_err(consistent)?;
    log::info!("{op}: {} backup of domain {} ({} volumes)", plan.kind.as_str(), vm.name(), plan.disks.len());
    let answer = engine_live::take(&q, &vm, &plan, ctl, &mut |_| Ok(()), &mut |_| Ok(())).map_err(consistent)?;
    Ok(TakeBackupAnswer::of(plan.kind.as_str(), &r.volumes, &answer.volumes, true))
}

/// `agent.cleanup_vm_backup`.
pub(crate) fn cleanup_vm_backup(
    op: &str,
    r: &TakeReq,
    mode: CleanupMode,
    ctl: &Control,
) -> Result<CleanupVmBackupAnswer> {
    if r.method == engine::BackupMethod::Bitmap {
        return super::bitmap::cleanup_vm_backup(op, r, mode, ctl);
    }
    let q = QemuImg::new();
    let vm = domain(r.connect.as_deref(), r.domain.as_deref().unwrap_or_default())?;
    let plan = plan(op, &q, &vm, r, Mode::Cleanup, ctl)?;
    let published = plan.disks.iter().all(|d| d.dest.is_file());
    let finish = published && mode == CleanupMode::Complete;
    let store_files: Vec<(&str, &Path)> = plan.disks.iter().map(|d| (d.target.as_str(), d.dest.as_path())).collect();
    let (mut actions, removed_from_store) = clean_store(&store_files, published, finish)?;
    let report = engine_live::recover(&q, &vm, &plan, finish, ctl).map_err(|e| {
        let e = e.context(format!("cleanup of the backup of domain {}", vm.name()));
        if e.vm_consistent.is_none() {
            e.with_vm_consistent(false)
        } else {
            e
        }
    })?;
    actions.extend(report.actions);
    let volumes = r
        .volumes
        .iter()
        .zip(&plan.disks)
        .map(|(v, d)| {
            let path = report.chains.iter().find(|(t, _)| *t == d.target).and_then(|(_, c)| c.first().cloned());
            VolumeState { uuid: Some(v.uuid.clone()), target: Some(d.target.clone()), path }
        })
        .collect();
    for a in &actions {
        log::info!("{op}: domain {}: {a}", vm.name());
    }
    let vm_running = vm.is_running()?;
    Ok(CleanupVmBackupAnswer {
        mode: mode.as_str().to_string(),
        published,
        vm_consistent: true,
        volumes,
        actions,
        removed_from_store,
        vm_running,
    })
}

/// `agent.consolidate`: the volumes named, or every disk of the domain.
pub(crate) fn consolidate(op: &str, r: &ConsolidateReq, ctl: &Control) -> Result<ConsolidateAnswer> {
    let q = QemuImg::new();
    let vm = domain(r.connect.as_deref(), &r.domain)?;
    let disks = vm.disks()?;
    // (uuid, target, file) of each volume to consolidate.
    let mut targets: Vec<(Option<String>, String, PathBuf)> = Vec::new();
    for (i, v) in r.volumes.iter().enumerate() {
        absolute(op, &format!("volumes[{i}].path"), &v.path)?;
        targets.push((v.uuid.clone(), disk_on(&vm, &disks, &v.path)?.target.clone(), v.path.clone()));
    }
    if r.volumes.is_empty() {
        targets = disks.iter().map(|d| (None, d.target.clone(), d.file.clone())).collect();
    }
    // Not beside a take, cleanup, merge or restore of the same volumes.
    let files: Vec<&Path> = targets.iter().map(|(_, _, f)| f.as_path()).collect();
    let _held = hold_for_one_operation(&files, &format!("{op} of domain {}", vm.name()))?;
    // After a quick restore from a vault: its NBD server (`knib vault-serve`,
    // found on PATH) is started again if it is gone, so the pull can read.
    let mut spawn = |st: &crate::vault::serve::ServeState, dir: &Path| {
        let program = crate::vault::serve::server_program(None)?;
        crate::vault::serve::spawn_server(&program, &st.vault, &st.backup, dir)
    };
    crate::vault::serve::restart_dead(&vm, &mut spawn, ctl)?;
    let mut done: Vec<(String, bool)> = Vec::new();
    for (_, target, _) in &targets {
        let pulled = engine_live::consolidate_disk(&q, &vm, target, ctl).map_err(|e| {
            let so_far: Vec<&str> = done.iter().map(|(t, _)| t.as_str()).collect();
            e.context(format!(
                "consolidating disk {target} of domain {} (consolidated before it: {})",
                vm.name(),
                if so_far.is_empty() { "none".to_string() } else { so_far.join(", ") }
            ))
        })?;
        done.push((target.clone(), pulled));
    }
    let consolidated = targets
        .into_iter()
        .zip(done)
        .map(|((uuid, _, path), (target, pulled))| Consolidated { uuid, target, path, pulled })
        .collect();
    // The vault's NBD servers no disk needs any more are stopped.
    for r in crate::vault::serve::release_served(&q, &vm, ctl)? {
        log::info!("{op}: domain {}: stopped the vault's NBD server {:?}", vm.name(), r);
    }
    Ok(ConsolidateAnswer { consolidated })
}

/// `agent.validate`: a running domain (`domain`), or a throwaway one on
/// `disks`.
pub(crate) fn validate(op: &str, r: &ValidateReq, ctl: &Control) -> Result<ValidateAnswer> {
    let bad = |m: String| KnibError::invalid(format!("request of {op}: {m}"));
    match (&r.domain, r.disks.is_empty()) {
        (Some(_), false) => {
            return Err(bad("`domain` (a running domain) and `disks` (a throwaway one) exclude each other".into()))
        }
        (None, true) => {
            return Err(bad(
                "give `domain` (validate a running domain) or `disks` (boot a throwaway domain on them)".into()
            ))
        }
        _ => {}
    }
    if r.domain.is_some() {
        let throwaway_only = [
            ("work_dir", r.work_dir.is_some()),
            ("memory_mib", r.memory_mib.is_some()),
            ("kernel", r.kernel.is_some()),
            ("initrd", r.initrd.is_some()),
            ("cmdline", r.cmdline.is_some()),
            ("domain_type", r.domain_type.is_some()),
            ("max_write_mib", r.max_write_mib.is_some()),
        ];
        if let Some((field, _)) = throwaway_only.iter().find(|(_, given)| *given) {
            return Err(bad(format!("`{field}` is for a throwaway domain (`disks`), not with `domain`")));
        }
    }
    if let Some(m) = r.max_write_mib.filter(|m| !(1..=MAX_WRITE_MIB).contains(m)) {
        return Err(bad(format!("`max_write_mib` must be from 1 to {MAX_WRITE_MIB} (MiB), not {m}")));
    }
    // Paths go into the domain's XML, where libvirt and QEMU would resolve
    // a relative one against their own directory, not knib's.
    if let Some(w) = &r.work_dir {
        crate::wire::absolute(op, "work_dir", w)?;
    }
    for (i, d) in r.disks.iter().enumerate() {
        crate::wire::absolute(op, &format!("disks[{i}].path"), &d.path)?;
    }
    for (field, p) in [("kernel", &r.kernel), ("initrd", &r.initrd)] {
        if let Some(p) = p {
            crate::wire::absolute(op, field, p)?;
        }
    }
    if r.screenshot_wait_secs > MAX_SCREENSHOT_WAIT_SECS {
        return Err(bad(format!(
            "`screenshot_wait_secs` is {}, over {MAX_SCREENSHOT_WAIT_SECS} (an hour)",
            r.screenshot_wait_secs
        )));
    }
    let screenshot = screenshot_file(op, r)?;
    let command = if r.execute_script {
        let script = r
            .script
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("`execute_script` needs `script`".into()))?;
        Some(guest_command(script, r.script_arguments.as_deref()))
    } else {
        None
    };
    let script_timeout = r.script_timeout_secs.unwrap_or(crate::engine::validate::COMMAND_TIMEOUT.as_secs());
    let work_dir = match (&r.domain, &r.work_dir) {
        (None, None) => return Err(bad("`disks` needs `work_dir` (where the throwaway domain's overlays go)".into())),
        (_, w) => w.clone().unwrap_or_default(),
    };
    let req = BootTestRequest {
        backup_files: r.disks.iter().map(|d| (d.target.clone(), d.path.clone())).collect(),
        work_dir,
        kernel: r.kernel.clone(),
        initrd: r.initrd.clone(),
        cmdline: r.cmdline.clone(),
        memory_mib: r.memory_mib.unwrap_or(requests::DEFAULT_MEMORY_MIB),
        boot_timeout_secs: r.boot_timeout_secs,
        screenshot: screenshot.clone(),
        command,
        domain_type: r.domain_type.clone(),
        max_write_bytes: r.max_write_mib.map(|m| m << 20),
        timing: CheckTiming {
            wait_for_boot: r.wait_for_boot,
            screenshot_wait_secs: r.screenshot_wait_secs,
            command_timeout_secs: script_timeout,
            judge_command: false,
        },
    };
    let hv = Hypervisor::open(r.connect.as_deref().unwrap_or(crate::libvirt::SYSTEM_URI))?;
    let what = r.vm_name.as_deref().or(r.domain.as_deref()).unwrap_or("a backup");
    let mut rep = match &r.domain {
        Some(name) => validate_running(&hv, &hv.domain(name)?, &req, ctl),
        None => boot_test(&hv, &req, ctl),
    }
    .map_err(|e| e.context(format!("validation of {what}")))?;
    let expected = r.expected_result.as_deref().unwrap_or("0");
    let script_result = rep.command_result.as_ref().and_then(|exec| script_result(expected, exec));
    if let (Some(result), Some(cmd)) = (&script_result, &req.command) {
        rep.problems.push(format!(
            "script {}: result {result:?} (exit code {}), expected {expected:?}",
            cmd.path,
            rep.command_exit.map_or("none".to_string(), |c| c.to_string())
        ));
    }
    let screenshot_store_path = match (&r.store_root, &rep.screenshot) {
        (Some(root), Some(shot)) => shot.strip_prefix(root).ok().map(|p| p.to_string_lossy().into_owned()),
        _ => None,
    };
    Ok(ValidateAnswer {
        boot_validated: rep.booted,
        boot_seconds: rep.boot_seconds,
        screenshot_path: rep.screenshot,
        screenshot_store_path,
        script_result,
        script_output: rep.command_output,
        script_exit_code: rep.command_exit,
        passed: (rep.booted || !r.wait_for_boot) && rep.problems.is_empty(),
        problems: rep.problems,
    })
}

/// Where `agent.validate` saves its screenshot: `screenshot_path`, or
/// `<screenshot_next_to>-screenshot-<UTC time>.png`; `None` when none is
/// asked for.
fn screenshot_file(op: &str, r: &ValidateReq) -> Result<Option<PathBuf>> {
    let bad = |m: &str| KnibError::invalid(format!("request of {op}: {m}"));
    if !r.take_screenshot {
        // The Java wrapper sets where a screenshot would go whatever the
        // offering's steps; without the screenshot step they say nothing
        // (refusing them failed every such validation, and the MS marked
        // the backup not valid).
        return Ok(None);
    }
    let file = match (&r.screenshot_path, &r.screenshot_next_to) {
        (Some(_), Some(_)) => return Err(bad("`screenshot_path` and `screenshot_next_to` exclude each other")),
        (None, None) => return Err(bad("`take_screenshot` needs `screenshot_path` or `screenshot_next_to`")),
        (Some(p), None) => {
            absolute(op, "screenshot_path", p)?;
            p.clone()
        }
        (None, Some(next)) => {
            absolute(op, "screenshot_next_to", next)?;
            let stamp = time::OffsetDateTime::now_utc()
                .format(time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"))
                .map_err(|e| KnibError::internal(format!("formatting the time: {e}")))?;
            let mut name = next.as_os_str().to_owned();
            name.push(format!("-screenshot-{stamp}.png"));
            PathBuf::from(name)
        }
    };
    if let Some(root) = &r.store_root {
        absolute(op, "store_root", root)?;
        let lexical = |p: &Path| p.components().any(|c| matches!(c, std::path::Component::ParentDir));
        if lexical(&file) || lexical(root) || !file.starts_with(root) {
            return Err(bad(&format!(
                "the screenshot {} is not under `store_root` {}",
                file.display(),
                root.display()
            )));
        }
    }
    // The screenshot replaces nothing but an earlier screenshot (or an
    // empty file): a path that names a disk, a backup or any other file is
    // refused before anything runs (the file would have been replaced by a
    // PNG).
    if let Ok(m) = std::fs::symlink_metadata(&file) {
        use std::io::Read;
        let mut head = [0u8; 8];
        let png = m.is_file()
            && (m.len() == 0
                || std::fs::File::open(&file).and_then(|mut f| f.read_exact(&mut head)).is_ok()
                    && head == crate::libvirt::screenshot::PNG_MAGIC);
        if !png {
            return Err(bad(&format!(
                "the screenshot {} exists and is not a PNG image; it is not replaced",
                file.display()
            )));
        }
    }
    Ok(Some(file))
}

/// `agent.cleanup_validation`: nothing by default (as the agent); the
/// domain with `remove_domain`, knib's overlays with `work_dir`.
pub(crate) fn cleanup_validation(op: &str, r: &CleanupValidationReq) -> Result<CleanupValidationAnswer> {
    crate::names::validate("VM name", &r.vm_name)?;
    if let Some(dir) = &r.work_dir {
        absolute(op, "work_dir", dir)?;
    }
    let domain_removed = if r.remove_domain {
        let hv = Hypervisor::open(r.connect.as_deref().unwrap_or(crate::libvirt::SYSTEM_URI))?;
        match hv.domain(&r.vm_name) {
            Ok(vm) => {
                if vm.is_running()? {
                    vm.destroy()?;
                }
                if vm.is_persistent().unwrap_or(false) {
                    vm.undefine()?;
                }
                true
            }
            Err(e) if e.kind == crate::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        }
    } else {
        false
    };
    let mut removed = Vec::new();
    if let Some(dir) = &r.work_dir {
        let entries = std::fs::read_dir(dir).map_err(|e| KnibError::io("cannot read directory", dir, e))?;
        for e in entries {
            let e = e.map_err(|e| KnibError::io("cannot read directory", dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if super::validation::is_validation_overlay_of(&name, &r.vm_name) {
                fsio::remove_if_exists(&e.path())?;
                removed.push(e.path());
            }
        }
    }
    Ok(CleanupValidationAnswer { domain_removed, removed })
}

/// `agent.merge_snapshot`.
pub(crate) fn merge_snapshot(op: &str, r: &MergeReq, ctl: &Control) -> Result<MergeSnapshotAnswer> {
    if r.merges.is_empty() {
        // The management server ends every whole-VM restore with this
        // request, its list empty when every volume was in the backup:
        // nothing to merge is a success, as on the Java path.
        return Ok(MergeSnapshotAnswer { volumes: Vec::new() });
    }
    let q = QemuImg::new();
    let vm = domain(r.connect.as_deref(), r.domain.as_deref().unwrap_or_default())?;
    let running = check_running(op, &vm, r.running)?;
    for (i, m) in r.merges.iter().enumerate() {
        absolute(op, &format!("merges[{i}].parent"), &m.parent)?;
        absolute(op, &format!("merges[{i}].child"), &m.child)?;
        for (j, g) in m.grand_children.iter().enumerate() {
            absolute(op, &format!("merges[{i}].grand_children[{j}]"), g)?;
        }
    }
    // Not beside a take, cleanup, merge or restore of the same volumes.
    let files: Vec<&Path> = r
        .merges
        .iter()
        .flat_map(|m| [&m.parent, &m.child].into_iter().chain(&m.grand_children))
        .map(PathBuf::as_path)
        .collect();
    let _held = hold_for_one_operation(&files, &format!("{op} of domain {}", vm.name()))?;
    super::refuse_merging_internal_snapshots(op, &r.merges)?;
    let mut out = Vec::new();
    for (i, m) in r.merges.iter().enumerate() {
        let one = || -> Result<MergedVolume> {
            let disks = vm.disks()?;
            let (disk, chain) = disk_holding(&q, &vm, running, &disks, &[&m.child], ctl)?;
            let at = chain.iter().position(|c| same_file(c, &m.child)).ok_or_else(|| {
                KnibError::not_found(format!(
                    "request of {op}: {} left the chain of disk {} while it was looked at",
                    m.child.display(),
                    disk.target
                ))
            })?;
            let below = chain.get(at + 1);
            if !below.is_some_and(|b| same_file(b, &m.parent)) {
                return Err(KnibError::invalid(format!(
                    "request of {op}: {} has {} below it in the chain of disk {}, not `parent` {}",
                    m.child.display(),
                    below.map(|b| b.display().to_string()).unwrap_or_else(|| "nothing".into()),
                    disk.target,
                    m.parent.display()
                )));
            }
            // Grand children outside the disk's chain (other branches of a
            // snapshot tree) are pointed at the parent afterwards.
            let others = grand_children_off_chain(op, &q, &chain, &m.parent, &m.child, &m.grand_children, ctl)?;
            let target = disk.target.clone();
            let child = chain[at].clone();
            let now = engine_live::merge_snapshot_delta(&q, &vm, &target, &child, &others, ctl)?;
            Ok(MergedVolume { uuid: m.uuid.clone(), target: Some(target), path: now })
        };
        out.push(one().map_err(|e| super::merge_failed(e, i, &r.merges[..i]))?);
    }
    Ok(MergeSnapshotAnswer { volumes: out })
}

/// The largest `max_write_mib` of `agent.validate` (1 TiB), as the
/// `validation.max_write_mib` setting's.
const MAX_WRITE_MIB: u64 = 1 << 20;

/// The longest wait before a validation's screenshot.
const MAX_SCREENSHOT_WAIT_SECS: u64 = 3600;

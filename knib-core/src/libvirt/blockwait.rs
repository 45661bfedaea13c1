//! Following a block job to its end: progress, pivot, abort on
//! cancellation, and the check of the chain afterwards (the calls
//! themselves are in [`super::blockjob`]).
//!
//! # Invariants
//!
//! - A job that ends by itself (a non-active commit, a pull) is over only
//!   when the domain XML shows its result; a commit whose chain did not get
//!   shorter is an error.
//! - A cancellation or the caller's deadline aborts the job: the domain
//!   stays on the chain it had.
//! - [`commit_and_wait`] and [`pull_and_wait`] compare the chain before
//!   and after, so a job that failed (and vanished) or ended before the
//!   first look is never taken for a success: they are what the engine
//!   calls.

use crate::fsio::same_file;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::blockjob::{
    block_commit, block_job_abort, block_job_info, block_pull, BlockJobKind, CommitFlags, PullFlags,
};
use super::Vm;
use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

/// Number of files in the chain of `disk` (active file included), from the
/// live XML; `None` when the disk is not found by target or active file.
fn chain_len(vm: &Vm, disk: &str) -> Option<usize> {
    let disks = vm.disks().ok()?;
    disks.iter().find(|d| d.target == disk || d.file == Path::new(disk)).map(|d| 1 + d.backing_chain.len())
}

/// How long to wait, after a commit is gone, for libvirt to show its result
/// in the domain XML.
const XML_SETTLE: Duration = Duration::from_secs(10);

/// The same after a pull (whose chain may not get shorter: a pull down to
/// the direct backing file changes nothing).
const XML_SETTLE_PULL: Duration = Duration::from_secs(2);

/// Follow the block job on `disk` until it is over, reporting its progress
/// as `step` through `ctl`, polling every 200 ms at first and every second
/// later on.
///
/// - A commit of a non-active layer or a pull ends by itself: this returns
///   when the job is gone and the domain XML shows the shorter chain (a
///   commit whose chain did not get shorter failed: an error).
/// - An active commit (or a copy) with `pivot_when_ready` is pivoted once
///   ready, and this returns when the domain runs on the new chain. Without
///   `pivot_when_ready` this returns as soon as the job is ready, leaving it
///   running (pivot or abort it with [`block_job_abort`]; libvirt may refuse
///   a pivot for a moment after `cur == end`, until it has handled QEMU's
///   "ready" event: retry).
/// - A pivot is tried again at each poll while libvirt refuses it (ten
///   times at most).
/// - When `ctl` is cancelled or its deadline passes, the job is aborted (the
///   domain stays on the chain it had) and the error is
///   [`ErrorKind::Cancelled`] or [`ErrorKind::Timeout`].
///
/// When there is no job on the disk at the first look, the job already
/// ended (or never started, or failed): this returns at once and checks
/// nothing. [`commit_and_wait`] and [`pull_and_wait`] check the chain.
pub fn wait_block_job(vm: &Vm, disk: &str, ctl: &Control, step: &str, pivot_when_ready: bool) -> Result<()> {
    wait_block_job_from(vm, disk, ctl, step, pivot_when_ready, None)
}

/// [`wait_block_job`] for a job started on a chain of `before` files (the
/// caller read it before starting the job). Without it, the chain is read at
/// the first sight of the job, which may be after libvirt already shows the
/// job's result (a short commit on a busy host), and a commit would then
/// seem to have left the chain as it was.
fn wait_block_job_from(
    vm: &Vm,
    disk: &str,
    ctl: &Control,
    step: &str,
    pivot_when_ready: bool,
    before: Option<usize>,
) -> Result<()> {
    let mut interval = Duration::from_millis(200);
    let mut seen: Option<(BlockJobKind, Option<usize>)> = None;
    let mut pivoted = false;
    let mut pivot_failures = 0u32;
    loop {
        let Some(info) = block_job_info(vm, disk).map_err(|e| e.context(step))? else {
            if let Some((kind, before)) = seen {
                finish(vm, disk, step, kind, before, pivot_when_ready, pivoted)?;
            }
            ctl.report(step, 100.0);
            return Ok(());
        };
        if seen.is_none() {
            seen = Some((info.kind, before.or_else(|| chain_len(vm, disk))));
        }
        ctl.report(step, info.percent());

        let cancelled = ctl.cancel.is_cancelled();
        if cancelled || ctl.deadline.expired() {
            let err = if cancelled {
                KnibError::new(
                    ErrorKind::Cancelled,
                    format!("{step}: cancelled; the {} on disk {disk} was aborted", info.kind),
                )
            } else {
                ctl.timeout_error(step)
            };
            match block_job_abort(vm, disk, false) {
                Ok(()) => return Err(err),
                // The job may have ended between the two calls: look again.
                Err(_) if matches!(block_job_info(vm, disk), Ok(None)) => continue,
                Err(e) => return Err(KnibError::new(err.kind, format!("{}; {}", err.message, e.message))),
            }
        }

        if info.kind.needs_pivot() && info.is_ready() && !pivoted {
            if !pivot_when_ready {
                return Ok(());
            }
            match block_job_abort(vm, disk, true) {
                Ok(()) => {
                    pivoted = true;
                    continue;
                }
                // libvirt refuses a pivot until QEMU said the job is ready;
                // try again at the next poll.
                Err(e) => {
                    pivot_failures += 1;
                    if pivot_failures >= 10 {
                        return Err(e.context(step));
                    }
                    log::debug!("{step}: pivot not possible yet: {}", e.message);
                }
            }
        }

        let mut sleep = interval;
        if let Some(left) = ctl.deadline.remaining() {
            sleep = sleep.min(left);
        }
        std::thread::sleep(sleep);
        interval = (interval * 3 / 2).min(Duration::from_secs(1));
    }
}

/// After a job seen as `kind` is gone: check (and wait for libvirt to show)
/// its result.
fn finish(
    vm: &Vm,
    disk: &str,
    step: &str,
    kind: BlockJobKind,
    before: Option<usize>,
    pivot_when_ready: bool,
    pivoted: bool,
) -> Result<()> {
    if kind.needs_pivot() && pivot_when_ready && !pivoted {
        return Err(KnibError::hypervisor(format!(
            "{step}: the {kind} on disk {disk} of domain {} ended before it could be pivoted \
             (it failed or was aborted by someone else)",
            vm.name()
        )));
    }
    let must_shrink = matches!(kind, BlockJobKind::Commit | BlockJobKind::ActiveCommit);
    let may_shrink = must_shrink || kind == BlockJobKind::Pull;
    let Some(before) = before else { return Ok(()) };
    if !may_shrink || before <= 1 {
        return Ok(());
    }
    let settle = if must_shrink { XML_SETTLE } else { XML_SETTLE_PULL };
    let start = Instant::now();
    loop {
        match chain_len(vm, disk) {
            Some(after) if after < before => return Ok(()),
            None => return Ok(()),
            Some(after) if start.elapsed() >= settle => {
                if must_shrink {
                    return Err(KnibError::hypervisor(format!(
                        "{step}: the {kind} on disk {disk} of domain {} ended but the chain still has \
                         {after} files (it had {before}): the job failed (see the domain's log)",
                        vm.name()
                    )));
                }
                return Ok(());
            }
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn position(chain: &[PathBuf], file: &Path) -> Option<usize> {
    chain.iter().position(|f| same_file(f, file))
}

fn current_chain(vm: &Vm, disk: &str) -> Result<Vec<PathBuf>> {
    Ok(vm.disk(disk)?.chain_files().into_iter().map(Path::to_path_buf).collect())
}

fn show(chain: &[PathBuf]) -> String {
    chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" <- ")
}

/// Wait (up to [`XML_SETTLE`]) until the chain of `disk` is `expected`.
fn expect_chain(vm: &Vm, disk: &str, step: &str, expected: &[PathBuf]) -> Result<()> {
    let start = Instant::now();
    loop {
        let now = current_chain(vm, disk).map_err(|e| e.context(step))?;
        if now.len() == expected.len() && now.iter().zip(expected).all(|(a, b)| same_file(a, b)) {
            return Ok(());
        }
        if start.elapsed() >= XML_SETTLE {
            return Err(KnibError::hypervisor(format!(
                "{step}: the block job on disk {disk} of domain {} ended, but the chain is {} instead of {}: \
                 the job failed (see the domain's log)",
                vm.name(),
                show(&now),
                show(expected)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Commit the layers from `top` down to just above `base` into `base`, on
/// disk `disk` (a target) of a running domain, and wait until it is done,
/// as [`wait_block_job`] does. When `top` is the active file this is an
/// active commit, pivoted when ready: the domain then writes to `base`.
/// Otherwise libvirt points the layer above `top` at `base` (relative name
/// with `relative`, see [`CommitFlags::relative`]).
///
/// Checks that `top` and `base` are in the disk's chain, `base` below `top`
/// ([`ErrorKind::NotFound`] or [`ErrorKind::InvalidInput`]), and afterwards
/// that the chain is the old one without the committed layers (an
/// [`ErrorKind::Hypervisor`] error otherwise). Committed files stay on disk.
pub fn commit_and_wait(
    vm: &Vm,
    disk: &str,
    base: &Path,
    top: &Path,
    relative: bool,
    ctl: &Control,
    step: &str,
) -> Result<()> {
    ctl.check(step)?;
    let chain = current_chain(vm, disk).map_err(|e| e.context(step))?;
    let not_in = |p: &Path| {
        KnibError::not_found(format!(
            "{step}: {} is not in the chain of disk {disk} of domain {} ({})",
            p.display(),
            vm.name(),
            show(&chain)
        ))
    };
    let i_top = position(&chain, top).ok_or_else(|| not_in(top))?;
    let i_base = position(&chain, base).ok_or_else(|| not_in(base))?;
    if i_base <= i_top {
        return Err(KnibError::invalid(format!(
            "{step}: {} is not below {} in the chain of disk {disk} of domain {} ({})",
            base.display(),
            top.display(),
            vm.name(),
            show(&chain)
        )));
    }
    let active = i_top == 0;
    // Name the layers as libvirt shows them.
    let flags = CommitFlags { active, relative, delete: false };
    block_commit(vm, disk, Some(&chain[i_base]), Some(&chain[i_top]), flags).map_err(|e| e.context(step))?;
    wait_block_job_from(vm, disk, ctl, step, true, Some(chain.len()))?;
    let expected: Vec<PathBuf> = chain[..i_top].iter().chain(&chain[i_base..]).cloned().collect();
    expect_chain(vm, disk, step, &expected)
}

/// Pull the data of the backing layers above `base` (all of them when
/// `None`) into the active file of disk `disk` (a target) of a running
/// domain and wait until it is done, as [`wait_block_job`] does; then check
/// that the chain is the active file alone (or on `base`).
pub fn pull_and_wait(
    vm: &Vm,
    disk: &str,
    base: Option<&Path>,
    relative: bool,
    ctl: &Control,
    step: &str,
) -> Result<()> {
    ctl.check(step)?;
    let chain = current_chain(vm, disk).map_err(|e| e.context(step))?;
    let i_base = match base {
        None => chain.len(),
        Some(b) => match position(&chain, b) {
            Some(i) if i > 0 => i,
            _ => {
                return Err(KnibError::not_found(format!(
                    "{step}: {} is not a backing layer of disk {disk} of domain {} ({})",
                    b.display(),
                    vm.name(),
                    show(&chain)
                )))
            }
        },
    };
    let flags = PullFlags { base: base.map(|_| chain[i_base].clone()), relative };
    block_pull(vm, disk, flags).map_err(|e| e.context(step))?;
    wait_block_job_from(vm, disk, ctl, step, false, Some(chain.len()))?;
    let expected: Vec<PathBuf> = std::iter::once(&chain[0]).chain(&chain[i_base..]).cloned().collect();
    expect_chain(vm, disk, step, &expected)
}

//! Block jobs of a running domain: commit, pull, their progress, abort and
//! pivot. The `virt` crate has no safe wrappers for these; each `virt::sys`
//! call is wrapped once here.
//!
//! A disk is named by its target (`vda`) or its active file's path; layers
//! of the chain (`base`, `top`) by their path as the live domain XML shows
//! it (libvirt also accepts `vda[3]`, the `index` of the XML).
//!
//! Behaviour seen with libvirt 9.0 / QEMU 7.2:
//! - a non-active commit (`top` below the active file) and a pull end by
//!   themselves; libvirt then rewrites the backing pointer of the layer
//!   above `top` (to `base`), as an absolute path unless
//!   [`CommitFlags::relative`] is set, which libvirt refuses ("can't keep
//!   relative backing relationship") when the chain's own backing names are
//!   absolute — as those of libvirt's snapshot overlays always are;
//! - an active commit (`top` is the active file) never ends by itself: once
//!   `cur == end` it is ready and must be pivoted (the domain then writes to
//!   `base`) or aborted (it stays on `top`); [`wait_block_job`] does this;
//! - committed files are left on disk unless [`CommitFlags::delete`];
//! - a small commit or pull may be over before the first look at it, and a
//!   job that failed simply disappears: [`commit_and_wait`] and
//!   [`pull_and_wait`] compare the chain before and after, and are what the
//!   engine should call.

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virt::sys;

use super::{last_virt_error, Vm};
use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

/// Options of [`block_commit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitFlags {
    /// `top` is the active file (an active commit: it must be pivoted or
    /// aborted when ready). libvirt refuses to commit the active file
    /// without it.
    pub active: bool,
    /// Keep the backing name written into the layer above `top` relative
    /// (only possible when the chain's backing names are relative).
    pub relative: bool,
    /// Delete the committed files once the job is done. The engine does not
    /// use it: files are removed by knib after it checked the chain.
    pub delete: bool,
}

/// Options of [`block_pull`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullFlags {
    /// Pull only the layers above this one (it stays as the backing file);
    /// `None` pulls everything, leaving the active file without backing.
    pub base: Option<PathBuf>,
    /// With `base`: write the new backing name relative (only possible when
    /// the chain's backing names are relative).
    pub relative: bool,
}

/// The kind of a block job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockJobKind {
    /// A block pull (stream).
    Pull,
    /// A block copy (mirror).
    Copy,
    /// A commit of a layer below the active file.
    Commit,
    /// A commit of the active file.
    ActiveCommit,
    /// A push backup.
    Backup,
    /// A kind this version of knib does not know (the raw number).
    Unknown(i32),
}

impl BlockJobKind {
    fn from_raw(raw: i32) -> Self {
        match raw as sys::virDomainBlockJobType {
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_PULL => BlockJobKind::Pull,
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY => BlockJobKind::Copy,
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT => BlockJobKind::Commit,
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT => BlockJobKind::ActiveCommit,
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP => BlockJobKind::Backup,
            _ => BlockJobKind::Unknown(raw),
        }
    }

    /// Whether the job never ends by itself and must be pivoted (or
    /// aborted) once ready: active commit and copy.
    pub fn needs_pivot(self) -> bool {
        matches!(self, BlockJobKind::ActiveCommit | BlockJobKind::Copy)
    }
}

impl fmt::Display for BlockJobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockJobKind::Pull => f.write_str("block pull"),
            BlockJobKind::Copy => f.write_str("block copy"),
            BlockJobKind::Commit => f.write_str("block commit"),
            BlockJobKind::ActiveCommit => f.write_str("active block commit"),
            BlockJobKind::Backup => f.write_str("backup"),
            BlockJobKind::Unknown(n) => write!(f, "block job of type {n}"),
        }
    }
}

/// The state of a disk's block job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJobInfo {
    /// What the job does.
    pub kind: BlockJobKind,
    /// Progress so far, in units of `end`.
    pub cur: u64,
    /// Progress at the end (it may grow while the guest writes).
    pub end: u64,
}

impl BlockJobInfo {
    /// Whether the job is done copying: for an active commit or a copy,
    /// ready to be pivoted. libvirt keeps `cur` below `end` until QEMU
    /// reports the job ready, so `cur == end > 0` is the signal.
    pub fn is_ready(&self) -> bool {
        self.end > 0 && self.cur >= self.end
    }

    /// Percent done, 0 to 100.
    pub fn percent(&self) -> f64 {
        if self.end == 0 {
            0.0
        } else {
            (self.cur.min(self.end) as f64 * 100.0) / self.end as f64
        }
    }
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| KnibError::invalid(format!("{what}: a NUL byte in {s:?}")))
}

fn c_path(what: &str, p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| KnibError::invalid(format!("{what}: a NUL byte in {}", p.display())))
}

/// Start a block commit on `disk` of a running domain: the data of the
/// layers from `top` (default: the active file's backing file; with
/// [`CommitFlags::active`], the active file) down to just above `base`
/// (default: the bottom of the chain) is written into `base`. Returns once
/// the job started; follow it with [`wait_block_job`].
pub fn block_commit(
    vm: &Vm,
    disk: &str,
    base: Option<&Path>,
    top: Option<&Path>,
    flags: CommitFlags,
) -> Result<()> {
    let what = format!(
        "virDomainBlockCommit on disk {disk} of domain {} (base {}, top {})",
        vm.name(),
        base.map_or_else(|| "bottom of the chain".into(), |p| p.display().to_string()),
        top.map_or_else(
            || if flags.active {
                "active file".into()
            } else {
                "backing file of the active one".into()
            },
            |p| p.display().to_string()
        ),
    );
    let c_disk = c_string(&what, disk)?;
    let c_base = base.map(|p| c_path(&what, p)).transpose()?;
    let c_top = top.map(|p| c_path(&what, p)).transpose()?;
    let mut raw_flags = 0;
    if flags.active {
        raw_flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE;
    }
    if flags.relative {
        raw_flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_RELATIVE;
    }
    if flags.delete {
        raw_flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_DELETE;
    }
    // SAFETY: the domain pointer is valid while `vm` is borrowed (the `Vm`
    // holds a reference on it); the strings are NUL-terminated and outlive
    // the call; libvirt takes null for an absent base or top and does not
    // keep any pointer after returning. Bandwidth 0 means unlimited.
    let ret = unsafe {
        sys::virDomainBlockCommit(
            vm.domain().as_ptr(),
            c_disk.as_ptr(),
            c_base.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            c_top.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            0,
            raw_flags,
        )
    };
    if ret < 0 {
        return Err(last_virt_error(what));
    }
    Ok(())
}

/// Start a block pull on `disk` of a running domain: the data of the
/// backing layers (those above [`PullFlags::base`], or all of them) is
/// copied into the active file, which then no longer needs them. Returns
/// once the job started; follow it with [`wait_block_job`].
pub fn block_pull(vm: &Vm, disk: &str, flags: PullFlags) -> Result<()> {
    let ret;
    let what;
    match &flags.base {
        None => {
            if flags.relative {
                return Err(KnibError::invalid(format!(
                    "block pull on disk {disk} of domain {}: a relative backing name needs a base",
                    vm.name()
                )));
            }
            what = format!("virDomainBlockPull on disk {disk} of domain {}", vm.name());
            let c_disk = c_string(&what, disk)?;
            // SAFETY: the domain pointer is valid while `vm` is borrowed; the
            // disk string is NUL-terminated and outlives the call; libvirt
            // keeps no pointer. Bandwidth 0 means unlimited.
            ret = unsafe { sys::virDomainBlockPull(vm.domain().as_ptr(), c_disk.as_ptr(), 0, 0) };
        }
        Some(base) => {
            what = format!(
                "virDomainBlockRebase (pull) on disk {disk} of domain {} down to {}",
                vm.name(),
                base.display()
            );
            let c_disk = c_string(&what, disk)?;
            let c_base = c_path(&what, base)?;
            let raw_flags = if flags.relative {
                sys::VIR_DOMAIN_BLOCK_REBASE_RELATIVE
            } else {
                0
            };
            // SAFETY: as above; the base string is NUL-terminated and
            // outlives the call. Without the COPY flag a rebase is a pull.
            ret = unsafe {
                sys::virDomainBlockRebase(
                    vm.domain().as_ptr(),
                    c_disk.as_ptr(),
                    c_base.as_ptr(),
                    0,
                    raw_flags,
                )
            };
        }
    }
    if ret < 0 {
        return Err(last_virt_error(what));
    }
    Ok(())
}

/// The block job running on `disk`, or `None` when there is none (it ended,
/// or never started).
pub fn block_job_info(vm: &Vm, disk: &str) -> Result<Option<BlockJobInfo>> {
    let what = format!(
        "virDomainGetBlockJobInfo on disk {disk} of domain {}",
        vm.name()
    );
    let c_disk = c_string(&what, disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the disk
    // string is NUL-terminated; `info` is a properly laid out, writable
    // struct that lives across the call. libvirt returns 1 and fills `info`
    // when there is a job, 0 when there is none, -1 on error.
    let ret = unsafe {
        sys::virDomainGetBlockJobInfo(vm.domain().as_ptr(), c_disk.as_ptr(), &mut info, 0)
    };
    match ret {
        r if r < 0 => Err(last_virt_error(what)),
        0 => Ok(None),
        _ => Ok(Some(BlockJobInfo {
            kind: BlockJobKind::from_raw(info.type_),
            cur: info.cur,
            end: info.end,
        })),
    }
}

/// Stop the block job on `disk`, waiting until it is gone. With `pivot`
/// (for a ready active commit or copy), the domain switches to the job's
/// destination (for an active commit: `base`); without it, the domain stays
/// on the chain it had (a commit's `base` may have received part of the
/// data, which changes nothing the guest sees).
pub fn block_job_abort(vm: &Vm, disk: &str, pivot: bool) -> Result<()> {
    let what = format!(
        "virDomainBlockJobAbort{} on disk {disk} of domain {}",
        if pivot { " (pivot)" } else { "" },
        vm.name()
    );
    let c_disk = c_string(&what, disk)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the disk
    // string is NUL-terminated and outlives the call. Without the ASYNC
    // flag the call returns when the job is gone.
    let ret = unsafe { sys::virDomainBlockJobAbort(vm.domain().as_ptr(), c_disk.as_ptr(), flags) };
    if ret < 0 {
        return Err(last_virt_error(what));
    }
    Ok(())
}

/// Number of files in the chain of `disk` (active file included), from the
/// live XML; `None` when the disk is not found by target or active file.
fn chain_len(vm: &Vm, disk: &str) -> Option<usize> {
    let disks = vm.disks().ok()?;
    disks
        .iter()
        .find(|d| d.target == disk || d.file == Path::new(disk))
        .map(|d| 1 + d.backing_chain.len())
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
pub fn wait_block_job(
    vm: &Vm,
    disk: &str,
    ctl: &Control,
    step: &str,
    pivot_when_ready: bool,
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
            seen = Some((info.kind, chain_len(vm, disk)));
        }
        ctl.report(step, info.percent());

        let cancelled = ctl.cancel.is_cancelled();
        if cancelled || ctl.deadline.expired() {
            let err = if cancelled {
                KnibError::new(
                    ErrorKind::Cancelled,
                    format!(
                        "{step}: cancelled; the {} on disk {disk} was aborted",
                        info.kind
                    ),
                )
            } else {
                ctl.timeout_error(step)
            };
            match block_job_abort(vm, disk, false) {
                Ok(()) => return Err(err),
                // The job may have ended between the two calls: look again.
                Err(_) if matches!(block_job_info(vm, disk), Ok(None)) => continue,
                Err(e) => {
                    return Err(KnibError::new(
                        err.kind,
                        format!("{}; {}", err.message, e.message),
                    ))
                }
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
    let settle = if must_shrink {
        XML_SETTLE
    } else {
        XML_SETTLE_PULL
    };
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

/// Whether `a` and `b` name the same file (equal paths, or equal once
/// resolved).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
}

fn position(chain: &[PathBuf], file: &Path) -> Option<usize> {
    chain.iter().position(|f| same_file(f, file))
}

fn current_chain(vm: &Vm, disk: &str) -> Result<Vec<PathBuf>> {
    Ok(vm
        .disk(disk)?
        .chain_files()
        .into_iter()
        .map(Path::to_path_buf)
        .collect())
}

fn show(chain: &[PathBuf]) -> String {
    chain
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" <- ")
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
    let flags = CommitFlags {
        active,
        relative,
        delete: false,
    };
    block_commit(vm, disk, Some(&chain[i_base]), Some(&chain[i_top]), flags)
        .map_err(|e| e.context(step))?;
    wait_block_job(vm, disk, ctl, step, true)?;
    let expected: Vec<PathBuf> = chain[..i_top]
        .iter()
        .chain(&chain[i_base..])
        .cloned()
        .collect();
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
    let flags = PullFlags {
        base: base.map(|_| chain[i_base].clone()),
        relative,
    };
    block_pull(vm, disk, flags).map_err(|e| e.context(step))?;
    wait_block_job(vm, disk, ctl, step, false)?;
    let expected: Vec<PathBuf> = std::iter::once(&chain[0])
        .chain(&chain[i_base..])
        .cloned()
        .collect();
    expect_chain(vm, disk, step, &expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_info_readiness_and_percent() {
        let mut i = BlockJobInfo {
            kind: BlockJobKind::ActiveCommit,
            cur: 0,
            end: 0,
        };
        assert!(!i.is_ready());
        assert_eq!(i.percent(), 0.0);
        i.end = 4;
        i.cur = 1;
        assert!(!i.is_ready());
        assert_eq!(i.percent(), 25.0);
        i.cur = 4;
        assert!(i.is_ready());
        assert_eq!(i.percent(), 100.0);
    }

    #[test]
    fn kinds() {
        assert_eq!(BlockJobKind::from_raw(1), BlockJobKind::Pull);
        assert_eq!(BlockJobKind::from_raw(3), BlockJobKind::Commit);
        assert_eq!(BlockJobKind::from_raw(4), BlockJobKind::ActiveCommit);
        assert_eq!(BlockJobKind::from_raw(42), BlockJobKind::Unknown(42));
        assert!(BlockJobKind::ActiveCommit.needs_pivot());
        assert!(!BlockJobKind::Commit.needs_pivot());
        assert_eq!(
            BlockJobKind::ActiveCommit.to_string(),
            "active block commit"
        );
    }
}

//! Block jobs of a running domain: commit, pull, their progress, abort and
//! pivot. Each libvirt call is wrapped once here.
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
//!   `base`) or aborted (it stays on `top`); `blockwait::wait_block_job`
//!   does this;
//! - committed files are left on disk unless [`CommitFlags::delete`];
//! - a small commit or pull may be over before the first look at it, and a
//!   job that failed simply disappears: `commit_and_wait` and
//!   `pull_and_wait` (module `blockwait`) compare the chain before and
//!   after, and are what the
//!   engine should call.

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{ffi, last_virt_error, Vm};
use crate::error::{KnibError, Result};

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
        match raw {
            ffi::VIR_DOMAIN_BLOCK_JOB_TYPE_PULL => BlockJobKind::Pull,
            ffi::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY => BlockJobKind::Copy,
            ffi::VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT => BlockJobKind::Commit,
            ffi::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT => BlockJobKind::ActiveCommit,
            ffi::VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP => BlockJobKind::Backup,
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
/// the job started; follow it with `blockwait::wait_block_job`.
pub fn block_commit(vm: &Vm, disk: &str, base: Option<&Path>, top: Option<&Path>, flags: CommitFlags) -> Result<()> {
    let what = format!(
        "virDomainBlockCommit on disk {disk} of domain {} (base {}, top {})",
        vm.name(),
        base.map_or_else(|| "bottom of the chain".into(), |p| p.display().to_string()),
        top.map_or_else(
            || if flags.active { "active file".into() } else { "backing file of the active one".into() },
            |p| p.display().to_string()
        ),
    );
    let c_disk = c_string(&what, disk)?;
    let c_base = base.map(|p| c_path(&what, p)).transpose()?;
    let c_top = top.map(|p| c_path(&what, p)).transpose()?;
    let mut raw_flags = 0;
    if flags.active {
        raw_flags |= ffi::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE;
    }
    if flags.relative {
        raw_flags |= ffi::VIR_DOMAIN_BLOCK_COMMIT_RELATIVE;
    }
    if flags.delete {
        raw_flags |= ffi::VIR_DOMAIN_BLOCK_COMMIT_DELETE;
    }
    // SAFETY: the domain pointer is valid while `vm` is borrowed (the `Vm`
    // holds a reference on it); the strings are NUL-terminated and outlive
    // the call; libvirt takes null for an absent base or top and does not
    // keep any pointer after returning. Bandwidth 0 means unlimited.
    let ret = unsafe {
        (vm.dom().api.virDomainBlockCommit)(
            vm.dom().as_ptr(),
            c_disk.as_ptr(),
            c_base.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            c_top.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            0,
            raw_flags,
        )
    };
    if ret < 0 {
        return Err(last_virt_error(vm.dom(), what));
    }
    Ok(())
}

/// Start a block pull on `disk` of a running domain: the data of the
/// backing layers (those above [`PullFlags::base`], or all of them) is
/// copied into the active file, which then no longer needs them. Returns
/// once the job started; follow it with `blockwait::wait_block_job`.
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
            ret = unsafe { (vm.dom().api.virDomainBlockPull)(vm.dom().as_ptr(), c_disk.as_ptr(), 0, 0) };
        }
        Some(base) => {
            what = format!(
                "virDomainBlockRebase (pull) on disk {disk} of domain {} down to {}",
                vm.name(),
                base.display()
            );
            let c_disk = c_string(&what, disk)?;
            let c_base = c_path(&what, base)?;
            let raw_flags = if flags.relative { ffi::VIR_DOMAIN_BLOCK_REBASE_RELATIVE } else { 0 };
            // SAFETY: as above; the base string is NUL-terminated and
            // outlives the call. Without the COPY flag a rebase is a pull.
            ret = unsafe {
                (vm.dom().api.virDomainBlockRebase)(vm.dom().as_ptr(), c_disk.as_ptr(), c_base.as_ptr(), 0, raw_flags)
            };
        }
    }
    if ret < 0 {
        return Err(last_virt_error(vm.dom(), what));
    }
    Ok(())
}

/// The block job running on `disk`, or `None` when there is none (it ended,
/// or never started).
pub fn block_job_info(vm: &Vm, disk: &str) -> Result<Option<BlockJobInfo>> {
    let what = format!("virDomainGetBlockJobInfo on disk {disk} of domain {}", vm.name());
    let c_disk = c_string(&what, disk)?;
    let mut info = ffi::virDomainBlockJobInfo::default();
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the disk
    // string is NUL-terminated; `info` is a properly laid out, writable
    // struct that lives across the call. libvirt returns 1 and fills `info`
    // when there is a job, 0 when there is none, -1 on error.
    let ret = unsafe { (vm.dom().api.virDomainGetBlockJobInfo)(vm.dom().as_ptr(), c_disk.as_ptr(), &mut info, 0) };
    match ret {
        r if r < 0 => Err(last_virt_error(vm.dom(), what)),
        0 => Ok(None),
        _ => Ok(Some(BlockJobInfo { kind: BlockJobKind::from_raw(info.type_), cur: info.cur, end: info.end })),
    }
}

/// Stop the block job on `disk`, waiting until it is gone. With `pivot`
/// (for a ready active commit or copy), the domain switches to the job's
/// destination (for an active commit: `base`); without it, the domain stays
/// on the chain it had (a commit's `base` may have received part of the
/// data, which changes nothing the guest sees).
pub fn block_job_abort(vm: &Vm, disk: &str, pivot: bool) -> Result<()> {
    let what =
        format!("virDomainBlockJobAbort{} on disk {disk} of domain {}", if pivot { " (pivot)" } else { "" }, vm.name());
    let c_disk = c_string(&what, disk)?;
    let flags = if pivot { ffi::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT } else { 0 };
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the disk
    // string is NUL-terminated and outlives the call. Without the ASYNC
    // flag the call returns when the job is gone.
    let ret = unsafe { (vm.dom().api.virDomainBlockJobAbort)(vm.dom().as_ptr(), c_disk.as_ptr(), flags) };
    if ret < 0 {
        return Err(last_virt_error(vm.dom(), what));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_info_readiness_and_percent() {
        let mut i = BlockJobInfo { kind: BlockJobKind::ActiveCommit, cur: 0, end: 0 };
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
        assert_eq!(BlockJobKind::ActiveCommit.to_string(), "active block commit");
    }
}

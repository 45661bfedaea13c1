//! File-system invariants of the store: nothing is visible until complete
//! (temporary name, fsync, rename, fsync of the directory), and free space is
//! checked before large writes.
//!
//! The directory of a file is always [`parent_dir`]: a bare file name
//! ("bare.raw") has the empty path as its `Path::parent()`, which no system
//! call accepts; it means the working directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, KnibError, Result};

/// The temporary name used while `path`, a file of the store, is being
/// written: a hidden file in the same directory, so the final rename is
/// atomic; one name per file, so that a clean-up finds what a crash left.
/// A destination outside the store takes a [`TempFile`].
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.part"))
}

/// A file that knib made for `dest` under a temporary name beside it
/// (`.<name>.knib-<pid>-<n>.part`), for destinations outside the store: a
/// restored image, an overlay. It is created with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, so a name already taken (a file, a link
/// planted under it, another writer's temporary) is never written through
/// and is skipped for the next one. Dropped before [`TempFile::commit`], it
/// removes its own file and nothing else.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    /// The file as created (written through this, never reopened by name).
    file: fs::File,
    committed: bool,
}

impl TempFile {
    /// Create the temporary file (empty) beside `dest`.
    pub fn beside(dest: &Path) -> Result<TempFile> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        const TRIES: usize = 64;
        let name = dest
            .file_name()
            .ok_or_else(|| KnibError::invalid(format!("{} does not end in a file name", dest.display())))?;
        for _ in 0..TRIES {
            let mut t = std::ffi::OsString::from(".");
            t.push(name);
            t.push(format!(".knib-{}-{}.part", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            let path = dest.with_file_name(t);
            match OpenOptions::new().read(true).write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&path)
            {
                Ok(file) => {
                    crate::crashpoint::pause_point(&format!("created {}", path.display()));
                    return Ok(TempFile { path, file, committed: false });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(KnibError::io("cannot create", &path, e)),
            }
        }
        Err(KnibError::invalid(format!(
            "no temporary name beside {} is free: the next {TRIES} are taken",
            dest.display()
        )))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file it created (open for writing).
    pub fn file(&self) -> &fs::File {
        &self.file
    }

    /// Rename it to `dest`, made durable: over an entry there only with
    /// `replace` (an exchange, taken back when the check below fails);
    /// without, an entry that appeared at `dest` since the caller checked
    /// is left alone and the rename refused (as [`rename_noreplace`]). On an error the temporary file is removed.
    /// The name must still lead to the file it created, and `dest` to it
    /// after the rename: anything swapped in under it is refused, `corrupt`
    /// (never kept at `dest`; and, as on every error, the name is removed
    /// when the value is dropped).
    pub fn commit(self, dest: &Path, replace: bool) -> Result<()> {
        self.commit_held(dest, replace).map(drop)
    }

    /// [`TempFile::commit`], and the file (a descriptor of its own), by
    /// which the caller can tell later that `dest` still leads to it.
    pub(crate) fn commit_held(mut self, dest: &Path, replace: bool) -> Result<File> {
        let held = self.file.try_clone().map_err(|e| KnibError::io("cannot open", &self.path, e))?;
        commit_own_temp(&self.path, &self.file, dest, replace)?;
        self.committed = true;
        Ok(held)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// fsync a file.
///
/// Opened without blocking: a FIFO put under the name (a temporary swapped
/// before its rename) is refused at once instead of waited on for a writer.
pub fn sync_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| KnibError::io("cannot open", path, e))?;
    // A file or a directory (a tree a guestfish extraction renames into
    // place) is made durable as before; a FIFO only is refused.
    let ft = f.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?.file_type();
    if std::os::unix::fs::FileTypeExt::is_fifo(&ft) {
        return Err(KnibError::corrupt(format!("{} is a FIFO, not a file knib made", path.display())));
    }
    f.sync_all().map_err(|e| KnibError::io("cannot fsync", path, e))
}

/// Create directory `dir` and every missing parent, each made durable in
/// its parent (a file later made durable inside a new directory is lost
/// with it if the directory's own entry is not).
pub fn create_dir_all_durable(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent_dir(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(KnibError::io("cannot create", dir, e)),
    }
}

/// Flush every file of the filesystem that holds directory `dir`
/// (`syncfs`): for a tree another program wrote, before it is renamed into
/// place, since knib cannot fsync what it did not write.
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).map_err(|e| KnibError::io("cannot open", dir, e))?;
    // SAFETY: a valid descriptor, owned by `f` for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(KnibError::io("cannot sync the filesystem of", dir, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The directory `path` is in: its parent, or "." for a bare file name
/// (whose `Path::parent()` is the empty path) and for a root.
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// fsync a directory (makes renames and creations in it durable); the empty
/// path is the working directory.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let f = File::open(dir).map_err(|e| KnibError::io("cannot open directory", dir, e))?;
    f.sync_all().map_err(|e| KnibError::io("cannot fsync directory", dir, e))
}

/// Rename `from` to `to` and make it durable (fsync of the file and of the
/// directory of `to`).
pub fn commit_rename(from: &Path, to: &Path) -> Result<()> {
    sync_file(from)?;
    rename_synced(from, to)
}

/// [`commit_rename`] of a file already fsynced.
fn rename_synced(from: &Path, to: &Path) -> Result<()> {
    crate::crashpoint::durable_step(&format!("rename {} to {}", from.display(), to.display()));
    fs::rename(from, to).map_err(|e| KnibError::io(&format!("cannot rename {} to", from.display()), to, e))?;
    sync_dir(parent_dir(to))
}

/// Rename `tmp`, a temporary of knib's own written through `file`, to
/// `dest`, made durable (fsynced through `file`, never reopened by name):
/// over an entry at `dest` only with `replace` (without, an entry that
/// appeared there is left alone: [`rename_noreplace`]). The name must lead
/// to `file` itself before the rename, and `dest` after it: anything swapped
/// in under the name meanwhile (a link, symbolic or hard, or another file)
/// is refused, `corrupt`, naming it, and never kept at `dest`.
///
/// With `replace`, what `dest` held is put back when the check after the
/// rename fails: the rename is an exchange (`renameat2(RENAME_EXCHANGE)`),
/// undone by a second one, and what `dest` held is removed (from the
/// temporary name, where the exchange put it) only once `dest` leads to
/// `file`. A file system that takes no rename flags (NFS) gets a plain
/// rename, whose replaced file is gone; the error says so.
pub(crate) fn commit_own_temp(tmp: &Path, file: &File, dest: &Path, replace: bool) -> Result<()> {
    commit_held_temp(tmp, file, dest, replace, &format!("rename {} to {}", tmp.display(), dest.display()))
}

/// [`commit_own_temp`], its durable step named `step`.
fn commit_held_temp(tmp: &Path, file: &File, dest: &Path, replace: bool, step: &str) -> Result<()> {
    require_same_file(tmp, file)?;
    file.sync_all().map_err(|e| KnibError::io("cannot fsync", tmp, e))?;
    crate::crashpoint::durable_step(step);
    let replaced = if replace {
        exchange_or_rename(tmp, dest)?
    } else {
        rename_noreplace_now(tmp, dest)?;
        Replaced::Nothing
    };
    // What is at `dest` came from the temporary's name: named so. An
    // error of the look itself (I/O) cannot tell: an exchange is taken
    // back, a plain rename left as it is.
    let checked = require_same_file(dest, file).map_err(|e| match e.kind {
        ErrorKind::Corrupt => replaced_error(tmp),
        _ => e,
    });
    match (checked, replaced) {
        (Ok(()), Replaced::Kept) => {
            // What `dest` held, now under the temporary name, removed
            // before the directory is made durable (so that it does not
            // come back after a power loss); one left there is removed as
            // any temporary.
            if let Err(e) = fs::remove_file(tmp) {
                log::warn!("cannot remove {}, what {} held before: {e}", tmp.display(), dest.display());
            }
            sync_dir(parent_dir(dest)).map_err(|e| replaced_not_durable(e, dest))
        }
        (Ok(()), _) => sync_dir(parent_dir(dest)).map_err(|e| replaced_not_durable(e, dest)),
        (Err(mut e), Replaced::Kept) => {
            use rustix::fs::{renameat_with, RenameFlags, CWD};
            match renameat_with(CWD, tmp, CWD, dest, RenameFlags::EXCHANGE) {
                Ok(()) => {
                    let _ = fs::remove_file(tmp);
                    let _ = sync_dir(parent_dir(dest));
                    e.message = format!(
                        "{}; that entry was put at {} and taken back: it holds what it held before",
                        e.message,
                        dest.display()
                    );
                }
                Err(x) => {
                    // What `dest` held is under the temporary's name, which
                    // every caller removes on an error: moved to a name of
                    // its own, which nothing removes.
                    let at = (0..64)
                        .map(|n| {
                            let mut keep = dest.as_os_str().to_owned();
                            keep.push(format!(".knib-replaced-{}-{n}", std::process::id()));
                            PathBuf::from(keep)
                        })
                        .find(|keep| rename_noreplace_now(tmp, keep).is_ok())
                        .unwrap_or_else(|| tmp.to_path_buf());
                    let _ = sync_dir(parent_dir(dest));
                    e.message = format!(
                        "{}; that entry is at {} and could not be taken back ({x}): what it held before is at {}",
                        e.message,
                        dest.display(),
                        at.display()
                    );
                }
            }
            Err(e)
        }
        (Err(mut e), replaced) if e.kind != ErrorKind::Corrupt => {
            e.message = format!(
                "{}; {} was renamed to {}{}, but what is there now could not be checked",
                e.message,
                tmp.display(),
                dest.display(),
                if replaced == Replaced::Gone { ", replacing what it held" } else { "" }
            );
            Err(e)
        }
        (Err(mut e), replaced) => {
            let _ = fs::remove_file(dest);
            e.message = format!("{}; that entry was renamed to {} and removed again", e.message, dest.display());
            if replaced == Replaced::Gone {
                e.message.push_str(", and what it replaced there is gone");
            }
            Err(e)
        }
    }
}

/// The error of a rename that put knib's file at `dest` but whose
/// directory could not be made durable (`e`): the caller must not take
/// the temporary for still there.
fn replaced_not_durable(mut e: KnibError, dest: &Path) -> KnibError {
    e.message = format!("{} (knib's file is at {} now, but a power loss may undo that)", e.message, dest.display());
    e
}

/// What a replacing rename did with the entry at its destination.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Replaced {
    /// There was none.
    Nothing,
    /// It is under the source's name (an exchange).
    Kept,
    /// It is gone (a plain rename over it).
    Gone,
}

/// Put `tmp` at `dest`: exchanged with an entry there (a directory there
/// is refused, as a rename refuses it), renamed where there is none, or
/// renamed over it where the file system takes no rename flags.
fn exchange_or_rename(tmp: &Path, dest: &Path) -> Result<Replaced> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    let fail = |e: std::io::Error| KnibError::io(&format!("cannot rename {} to", tmp.display()), dest, e);
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => return Err(fail(std::io::Error::from_raw_os_error(libc::EISDIR))),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(KnibError::io("cannot stat", dest, e)),
    }
    match renameat_with(CWD, tmp, CWD, dest, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(Replaced::Kept),
        // Nothing at `dest` (or the temporary gone: the rename says which).
        Err(Errno::NOENT) => match fs::rename(tmp, dest) {
            Ok(()) => Ok(Replaced::Nothing),
            // The temporary itself is gone since knib looked at it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(tmp).is_err() => {
                Err(replaced_error(tmp))
            }
            Err(e) => Err(fail(e)),
        },
        Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => {
            let there = fs::symlink_metadata(dest).is_ok();
            fs::rename(tmp, dest).map_err(fail)?;
            Ok(if there { Replaced::Gone } else { Replaced::Nothing })
        }
        Err(e) => Err(fail(e.into())),
    }
}

/// The name by which another program opens `file` itself, whatever its
/// name leads to meanwhile: `/proc/<pid>/fd/<n>` (the descriptor is this
/// process's: a child opens it by this process's id).
pub(crate) fn by_fd(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()))
}

/// [`commit_rename`] that never replaces an entry at `to` (one that
/// appeared since the caller checked): `renameat2(RENAME_NOREPLACE)`.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    sync_file(from)?;
    rename_noreplace_synced(from, to)
}

/// [`rename_noreplace`] of a file already fsynced.
fn rename_noreplace_synced(from: &Path, to: &Path) -> Result<()> {
    crate::crashpoint::durable_step(&format!("rename {} to {}", from.display(), to.display()));
    rename_noreplace_now(from, to)?;
    sync_dir(parent_dir(to))
}

/// The rename of [`rename_noreplace`], not yet made durable.
fn rename_noreplace_now(from: &Path, to: &Path) -> Result<()> {
    use rustix::fs::CWD;
    let appeared = || KnibError::invalid(format!("{} appeared meanwhile; nothing was replaced", to.display()));
    match rename_noreplace_at(CWD, from, CWD, to, Unflagged::Link) {
        Ok(_) => Ok(()),
        Err(NoReplaceError::Exists) => Err(appeared()),
        Err(NoReplaceError::Rename(e)) => Err(KnibError::io(&format!("cannot rename {} to", from.display()), to, e)),
        Err(NoReplaceError::RemoveOld(e)) => Err(KnibError::io("cannot remove", from, e)),
    }
}

/// What [`rename_noreplace_at`] does where the file system takes no rename
/// flags (NFS, CIFS, many FUSE file systems: `renameat2` answers EINVAL,
/// ENOSYS or EOPNOTSUPP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unflagged {
    /// A hard link at the new name (refused, never replacing, when an
    /// entry is there), then the old name removed; a file system that
    /// makes no hard links fails the rename.
    Link,
    /// The same, and where the file system makes no hard links (`linkat`
    /// answers EPERM, ENOSYS or EOPNOTSUPP) a [`Unflagged::CheckedRename`].
    LinkOrCheckedRename,
    /// `fstatat(AT_SYMLINK_NOFOLLOW)` finds nothing at the new name, then
    /// a plain `renameat` (a directory, which cannot be hard-linked). The
    /// window: a plain rename replaces what appears at the new name between
    /// the check and the rename when it may (an empty directory, for a
    /// directory; a file, a symlink or another non-directory, for a file).
    /// Anything else that appeared there is refused by the rename itself
    /// (a directory that is not empty, or of the other kind than the one
    /// renamed).
    CheckedRename,
}

/// How [`rename_noreplace_at`] put the entry at its new name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// `renameat2(RENAME_NOREPLACE)`.
    Renamed,
    /// The file system takes no rename flags: a hard link, then the old
    /// name removed.
    Linked,
    /// The file system takes no rename flags nor a hard link here: checked
    /// that nothing was at the new name, then a plain rename (see
    /// [`Unflagged::CheckedRename`] for what it may replace).
    CheckedRename,
}

/// Why [`rename_noreplace_at`] failed.
#[derive(Debug)]
pub(crate) enum NoReplaceError {
    /// An entry is at the new name: nothing was replaced, the old name is
    /// left as it was.
    Exists,
    /// The rename (or what stands for it) failed; the old name is left as
    /// it was.
    Rename(std::io::Error),
    /// The new name was made a hard link of the old, which could not be
    /// removed then: both names lead to the entry.
    RemoveOld(std::io::Error),
}

/// Whether `e` is `renameat2`'s answer of a file system that takes no
/// rename flags.
fn takes_no_rename_flags(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(e, Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
}

/// `from` (relative to `from_dir`) renamed to `to` (relative to `to_dir`),
/// never replacing an entry at `to`: `renameat2(RENAME_NOREPLACE)`, or,
/// where the file system takes no rename flags, what `unflagged` says.
/// Every step is relative to the two descriptors: no name is resolved from
/// elsewhere (with [`rustix::fs::CWD`], from the working directory).
pub(crate) fn rename_noreplace_at<P: rustix::path::Arg + Copy>(
    from_dir: std::os::fd::BorrowedFd<'_>,
    from: P,
    to_dir: std::os::fd::BorrowedFd<'_>,
    to: P,
    unflagged: Unflagged,
) -> std::result::Result<Placed, NoReplaceError> {
    use rustix::fs::{renameat_with, RenameFlags};
    use rustix::io::Errno;
    match renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(Placed::Renamed),
        Err(Errno::EXIST) => Err(NoReplaceError::Exists),
        Err(e) if takes_no_rename_flags(e) => rename_unflagged_at(from_dir, from, to_dir, to, unflagged),
        Err(e) => Err(NoReplaceError::Rename(e.into())),
    }
}

/// [`rename_noreplace_at`] where the file system takes no rename flags.
fn rename_unflagged_at<P: rustix::path::Arg + Copy>(
    from_dir: std::os::fd::BorrowedFd<'_>,
    from: P,
    to_dir: std::os::fd::BorrowedFd<'_>,
    to: P,
    unflagged: Unflagged,
) -> std::result::Result<Placed, NoReplaceError> {
    use rustix::fs::{linkat, unlinkat, AtFlags};
    use rustix::io::Errno;
    let shown = || to.as_cow_c_str().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    crate::crashpoint::pause_point(&format!("renaming to {} without rename flags", shown()));
    if unflagged != Unflagged::CheckedRename {
        // A hard link never replaces an entry either (EEXIST).
        match linkat(from_dir, from, to_dir, to, AtFlags::empty()) {
            Ok(()) => {
                unlinkat(from_dir, from, AtFlags::empty()).map_err(|e| NoReplaceError::RemoveOld(e.into()))?;
                return Ok(Placed::Linked);
            }
            Err(Errno::EXIST) => return Err(NoReplaceError::Exists),
            Err(Errno::PERM | Errno::NOSYS | Errno::OPNOTSUPP) if unflagged == Unflagged::LinkOrCheckedRename => {}
            Err(e) => return Err(NoReplaceError::Rename(e.into())),
        }
    }
    match rustix::fs::statat(to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => return Err(NoReplaceError::Exists),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(NoReplaceError::Rename(e.into())),
    }
    // The window of `Unflagged::CheckedRename`: from here to the rename.
    crate::crashpoint::pause_point(&format!("nothing at {}: a plain rename to it", shown()));
    match rustix::fs::renameat(from_dir, from, to_dir, to) {
        Ok(()) => Ok(Placed::CheckedRename),
        // What appeared meanwhile and a plain rename does not replace: a
        // directory that is not empty, a directory in place of a file's
        // name, a non-directory in place of a directory's.
        Err(Errno::EXIST | Errno::NOTEMPTY | Errno::ISDIR | Errno::NOTDIR) => Err(NoReplaceError::Exists),
        Err(e) => Err(NoReplaceError::Rename(e.into())),
    }
}

/// Write `data` to `path` atomically: a temporary file, fsync, rename, fsync
/// of the directory. Readers see the old content or the new, never a part.
/// The temporary is knib's own (`create_own_temp`: a stale one, or a link
/// planted under its name, is removed, never followed) and is renamed only
/// while its name leads to the file written (`commit_own_temp`): one
/// swapped meanwhile is refused, `corrupt`, and `path` keeps what it held
/// (on a file system that takes no exchange, NFS, the entry is removed
/// from `path` and what it held is gone; the error says so).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let mut f = create_own_temp(&tmp)?;
    let result = f
        .write_all(data)
        .map_err(|e| KnibError::io("cannot write", &tmp, e))
        .and_then(|()| commit_held_temp(&tmp, &f, path, true, &format!("write {}", path.display())));
    if result.is_err() {
        // Only knib's own file: one swapped in under the name is left.
        if require_same_file(&tmp, &f).is_ok() {
            let _ = fs::remove_file(&tmp);
        }
    }
    result
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| KnibError::invalid(format!("path {} contains a NUL byte", dir.display())))?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a plain struct
    // that statvfs fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(KnibError::io("cannot stat file system of", dir, std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Fail with [`ErrorKind::NoSpace`] unless `dir` has at least `needed` bytes
/// free; `what` names the work.
pub fn require_space(dir: &Path, needed: u64, what: &str) -> Result<()> {
    let free = free_space(dir)?;
    if free < needed {
        return Err(KnibError::new(
            ErrorKind::NoSpace,
            format!("{what}: {} has {} free, {} needed", dir.display(), human_bytes(free), human_bytes(needed)),
        ));
    }
    Ok(())
}

/// Bytes allocated on disk by a file.
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).map_err(|e| KnibError::io("cannot stat", path, e))?;
    Ok(m.blocks() * 512)
}

/// Drop the clean pages of `len` bytes of `file` from `offset` (0: to
/// the end) from the page cache; best effort (a file system may keep them,
/// NFS until its commit). The pages of a large folio go only when the range
/// holds the whole folio.
pub(crate) fn drop_cached(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: fadvise on a descriptor the caller owns.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), to_off(offset), to_off(len), libc::POSIX_FADV_DONTNEED) };
}

/// Make `file` (named `name` in errors) durable and drop its pages from
/// the page cache, so that what reads it next reads it as the device
/// holds it, not as it was written into memory: how a written file is
/// read back. Best effort past the fsync ([`drop_cached`]).
pub(crate) fn uncache_for_read_back(file: &File, name: &Path) -> Result<()> {
    file.sync_data().map_err(|e| KnibError::io("cannot fsync", name, e))?;
    drop_cached(file, 0, 0);
    Ok(())
}

/// A file offset or length for a system call (saturating: no file is
/// that long).
pub(crate) fn to_off(x: u64) -> libc::off64_t {
    libc::off64_t::try_from(x).unwrap_or(libc::off64_t::MAX)
}

/// Check `path`, a file a caller named, before anything opens it: NotFound
/// when there is none, InvalidInput when it is not a regular file (nor,
/// with `block`, a block device). A FIFO would make its reader wait for a
/// writer, a character device (`/dev/zero`) never ends. `what` starts each
/// message ("backup file ", "disk vda: ").
pub(crate) fn require_file(path: &Path, what: &str, block: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match fs::metadata(path) {
        Ok(m) if m.is_file() || (block && m.file_type().is_block_device()) => Ok(()),
        Ok(_) if block => {
            Err(KnibError::invalid(format!("{what}{} is neither a regular file nor a block device", path.display())))
        }
        Ok(_) => Err(KnibError::invalid(format!("{what}{} is not a regular file", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(KnibError::not_found(format!("{what}{} does not exist", path.display())))
        }
        Err(e) => Err(KnibError::io("cannot stat", path, e)),
    }
}

/// Open `path`, a file a caller named, for reading; anything but a regular
/// file is InvalidInput naming it. The file is opened with `O_NONBLOCK`, so
/// a FIFO opens at once (and is refused) instead of waiting for a writer;
/// the flag is cleared again on the file returned. A device or a directory
/// is refused too: a device such as `/dev/zero` never ends.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| KnibError::io("cannot open", path, e))?;
    let meta = f.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?;
    if !meta.is_file() {
        return Err(KnibError::invalid(format!("{} is not a regular file", path.display())));
    }
    let fl = rustix::fs::fcntl_getfl(&f).map_err(|e| KnibError::io("cannot open", path, e.into()))?;
    rustix::fs::fcntl_setfl(&f, fl.difference(rustix::fs::OFlags::NONBLOCK))
        .map_err(|e| KnibError::io("cannot open", path, e.into()))?;
    Ok(f)
}

/// Create `path`, a temporary file of knib's own under a fixed name, for
/// reading and writing, new: whatever has the name (a stale temporary of a
/// killed run, a link put there by someone else, symbolic or hard) is
/// removed first, never followed, truncated or written, and the file is
/// then created exclusively (`O_EXCL`, following no link); an entry that
/// appears under the name in between is refused, `corrupt`, naming it.
pub(crate) fn create_own_temp(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    remove_if_exists(path)?;
    OpenOptions::new().read(true).write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| {
        match e.kind() {
            std::io::ErrorKind::AlreadyExists => KnibError::corrupt(format!(
                "{} appeared while knib made it; knib writes its temporary files only as files of their own",
                path.display()
            )),
            _ => KnibError::io("cannot create", path, e),
        }
    })
}

/// Check that the name `path` leads to `file` itself (the same inode, not
/// through a link): a temporary of knib's own, written through a handle,
/// whose name someone may have replaced meanwhile (with a link to another
/// file, symbolic or hard, or another file). Anything else is `corrupt`,
/// naming it.
pub(crate) fn require_same_file(path: &Path, file: &File) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ours = file.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?;
    let named = fs::symlink_metadata(path).map_err(|e| KnibError::io("cannot stat", path, e))?;
    if named.dev() == ours.dev() && named.ino() == ours.ino() {
        return Ok(());
    }
    Err(replaced_error(path))
}

/// The error of [`require_same_file`]: `path` was replaced.
fn replaced_error(path: &Path) -> KnibError {
    KnibError::corrupt(format!(
        "{} was replaced while knib wrote it (it is no longer the file knib created); knib writes its temporary files only as files of their own",
        path.display()
    ))
}

/// Size of a file in bytes.
pub fn file_size(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).map_err(|e| KnibError::io("cannot stat", path, e))?.len())
}

/// A size for people: "1.5 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Remove a file if it exists; a missing file is fine.
pub fn remove_if_exists(path: &Path) -> Result<()> {
    if cfg!(debug_assertions) && fs::symlink_metadata(path).is_ok() {
        crate::crashpoint::durable_step(&format!("remove {}", path.display()));
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KnibError::io("cannot remove", path, e)),
    }
}

/// Remove the entry at `path`, whatever it is, if there is one: a
/// directory with everything in it, anything else (a link, symbolic or
/// hard, a FIFO) as an entry, never followed. Not made durable (the
/// caller syncs the directory).
pub fn remove_entry(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(|e| KnibError::io("cannot remove", path, e)),
        Ok(_) => remove_if_exists(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KnibError::io("cannot stat", path, e)),
    }
}

/// Why an entry (`meta`, of the entry itself when the name may be a link)
/// is not a file knib may write or put in place of another: a symbolic
/// link, anything but a regular file, or a file with another name (a hard
/// link: that name, anywhere on the file system, would lead to what knib
/// writes). `None` for a regular file with one name; a file with no name
/// left (removed while open) is the caller's to judge.
pub(crate) fn not_own_file(meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if meta.file_type().is_symlink() {
        Some("is a symbolic link".into())
    } else if !meta.is_file() {
        Some("is not a regular file".into())
    } else if meta.nlink() > 1 {
        Some(format!("is a file with {} names (a hard link)", meta.nlink()))
    } else {
        None
    }
}

/// [`remove_if_exists`], then the removal made durable (its directory
/// synced): for a file whose return after a power loss would mean
/// something, such as a journal saying a backup is still running.
pub fn remove_durable(path: &Path) -> Result<()> {
    remove_if_exists(path)?;
    sync_dir(parent_dir(path))
}

/// Whether `a` and `b` name the same file: equal paths; when both exist,
/// one file (the same inode, through links, symbolic or hard, and `..`
/// alike); when neither exists yet, the same name in the same directory
/// (its path resolved), so that a file about to be made under two
/// spellings of its name is seen as one.
pub fn same_file(a: &Path, b: &Path) -> bool {
    a == b || file_key(a) == file_key(b)
}

/// A file's identity as [`same_file`] tells files apart, for comparing
/// many files at once (a map of them): its device and inode when it
/// exists, else its name in its directory resolved, else its path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileKey {
    /// An existing file.
    Inode(u64, u64),
    /// A file not made yet, in a directory that exists.
    New(PathBuf),
    /// Neither.
    Path(PathBuf),
}

/// `p`'s [`FileKey`].
pub fn file_key(p: &Path) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(p) {
        Ok(m) => FileKey::Inode(m.dev(), m.ino()),
        Err(_) => {
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).and_then(|d| d.canonicalize().ok());
            match (dir, p.file_name()) {
                (Some(d), Some(n)) => FileKey::New(d.join(n)),
                _ => FileKey::Path(p.to_path_buf()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback of a file system without rename flags (NFS) never
    /// replaces an entry, and leaves one name.
    #[test]
    fn link_then_unlink_never_replaces() {
        use rustix::fs::CWD;
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, b"new").unwrap();
        fs::write(&b, b"theirs").unwrap();
        let link = |from: &Path, to: &Path| rename_unflagged_at(CWD, from, CWD, to, Unflagged::Link);
        assert!(matches!(link(&a, &b), Err(NoReplaceError::Exists)));
        assert_eq!((fs::read(&a).unwrap(), fs::read(&b).unwrap()), (b"new".to_vec(), b"theirs".to_vec()));
        fs::remove_file(&b).unwrap();
        assert_eq!(link(&a, &b).unwrap(), Placed::Linked);
        assert!(!a.exists());
        assert_eq!(fs::read(&b).unwrap(), b"new");
    }

    /// The checked rename of a directory (which cannot be hard-linked)
    /// never replaces an entry that is there when it checks, whatever its
    /// kind.
    #[test]
    fn a_checked_rename_never_replaces_what_is_there() {
        use rustix::fs::CWD;
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::write(a.join("f"), b"new").unwrap();
        let checked = |from: &Path, to: &Path| rename_unflagged_at(CWD, from, CWD, to, Unflagged::CheckedRename);
        fs::create_dir(&b).unwrap();
        assert!(matches!(checked(&a, &b), Err(NoReplaceError::Exists)), "an empty directory is not replaced");
        fs::remove_dir(&b).unwrap();
        std::os::unix::fs::symlink("nowhere", &b).unwrap();
        assert!(matches!(checked(&a, &b), Err(NoReplaceError::Exists)), "a dangling symlink is not replaced");
        assert_eq!(fs::read_link(&b).unwrap(), Path::new("nowhere"));
        fs::remove_file(&b).unwrap();
        assert_eq!(checked(&a, &b).unwrap(), Placed::CheckedRename);
        assert!(!a.exists());
        assert_eq!(fs::read(b.join("f")).unwrap(), b"new");
        // The link fallback alone (`rename_noreplace`'s) refuses a
        // directory, as `linkat` does, and leaves it where it was.
        let link = rename_unflagged_at(CWD, b.as_path(), CWD, a.as_path(), Unflagged::Link);
        assert!(
            matches!(link, Err(NoReplaceError::Rename(ref e)) if e.raw_os_error() == Some(libc::EPERM)),
            "{link:?}"
        );
        assert!(b.join("f").exists() && !a.exists());
    }

    /// A FIFO under a name to be made durable fails at once, unwaited.
    #[test]
    fn sync_file_refuses_a_fifo_without_waiting() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("x.part");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = sync_file(&fifo).unwrap_err();
        assert_eq!(e.message, format!("{} is a FIFO, not a file knib made", fifo.display()));
        // A file and a directory are made durable.
        let f = d.path().join("f");
        fs::write(&f, b"x").unwrap();
        sync_file(&f).unwrap();
        sync_file(d.path()).unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn space_check_refuses_with_no_space() {
        let d = tempfile::tempdir().unwrap();
        let e = require_space(d.path(), u64::MAX, "compress b1").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert!(e.message.starts_with("compress b1: "), "{e}");
        require_space(d.path(), 1, "x").unwrap();
    }

    #[test]
    fn directories_are_made_with_their_parents_and_a_file_in_the_way_is_named() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        create_dir_all_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all_durable(&deep).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let e = create_dir_all_durable(&d.path().join("f/g")).unwrap_err();
        assert!(e.message.contains(&d.path().join("f").display().to_string()), "{e}");
    }
}

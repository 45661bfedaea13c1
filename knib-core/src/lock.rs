//! File locks: the three kinds knib takes, each on the kernel lock whose
//! owner and lifetime fit its use. Nothing here is `unsafe`: the whole-file
//! locks are [`rustix`]'s, the byte-range OFD locks (which `rustix` does not
//! offer) `nix`'s.
//!
//! | use | kernel lock | owner | blocks ("about 1 s": tried again for about a second before busy) |
//! |---|---|---|---|
//! | one operation per VM ([`try_record_lock`]) | POSIX record lock, `fcntl(F_SETLK)`, whole file, write | the process | no |
//! | the job queue ([`lock_exclusive`]) | `flock(LOCK_EX)` | the open file description | yes |
//! | a qcow2 image being merged ([`lock_like_qemu_writer`]) | OFD byte-range locks, `fcntl(F_OFD_SETLK)`, bytes 100, 101, 201 | the open file description | about 1 s |
//! | is an image in use by a QEMU? ([`held_like_qemu`]; [`ensure_unused`]) | `fcntl(F_OFD_GETLK)`, bytes 100 to 299, nothing taken | — | no ([`ensure_unused`]: about 1 s) |
//! | backup files read by path ([`hold_for_reading`]) | OFD byte-range read locks, bytes 100 and 201, as a QEMU reader | the open file description | about 1 s |
//! | a compression's output under its fixed name ([`try_lock_operation_byte`]) | OFD write lock, byte 0x4b4e4942 ([`OPERATION_BYTE`]) | the open file description | about 1 s |
//! | files on primary an agent request changes ([`hold_for_one_operation`]) | OFD write lock, byte 0x4b4e4942 | the open file description | about 1 s |
//! | a name that does not exist yet ([`LockFile`]) | OFD write lock, byte 0x4b4e4942, of an empty file beside it | the open file description | about 1 s |
//!
//! # Invariants
//!
//! - Every lock is advisory and goes with its owner: a crash never leaves
//!   anything locked.
//! - A record lock belongs to the process: it is not inherited by a fork (a
//!   `qemu-img` spawned by another thread cannot keep it), it does not
//!   exclude threads of one process from each other (the caller keeps a
//!   registry for that), and closing *any* descriptor of the file drops it
//!   (the caller opens and closes the lock file only while its registry is
//!   locked).
//! - An `flock` belongs to the open file description: threads that each open
//!   the file exclude each other, and closing that file releases it.
//! - The OFD locks are QEMU's own image locks (QEMU takes them on the same
//!   bytes), so a QEMU that writes the image and knib exclude each other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use rustix::fs::{fcntl_lock, flock, FlockOperation};

use crate::error::{ErrorKind, KnibError, Result};

/// Take a POSIX record write lock on the whole of `file`, owned by this
/// process, without waiting (`fcntl(F_SETLK)`, `F_WRLCK`): `Ok(false)` when
/// another process holds a lock on the file.
///
/// For the one-operation-per-VM lock: a record lock, not an `flock`,
/// because a child forked by another thread (a `qemu-img` spawned at the
/// same instant) holds a copy of every open file description until it
/// execs, so a released `flock` could still be held for a moment and a
/// later operation of this process be refused; record locks are not
/// inherited by a fork.
pub fn try_record_lock(file: &File) -> io::Result<bool> {
    match fcntl_lock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::ACCESS || e == rustix::io::Errno::AGAIN => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Lock `file` exclusively (`flock(LOCK_EX)`), waiting as long as another
/// open file description holds it; released when `file` is closed.
///
/// For the job queue's lock, held for one short transaction: each thread
/// opens the lock file itself, so threads of one process exclude each
/// other too, which a record lock would not do.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        match flock(file, FlockOperation::LockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// QEMU's image locking: a process holding a permission on an image
/// read-locks byte 100 + bit; one that does not let others have it
/// read-locks byte 200 + bit. Bit 0: consistent read, bit 1: write.
const QEMU_PERM_BASE: i64 = 100;
const QEMU_SHARED_BASE: i64 = 200;
const QEMU_PERM_READ: i64 = 0;
const QEMU_PERM_WRITE: i64 = 1;

/// One byte at `byte` of type `kind` (`F_RDLCK`, `F_WRLCK`).
fn one_byte(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Lock `file` the way a QEMU writer locks an image (it reads and writes
/// it, shares reading, not writing), with OFD byte-range locks
/// (`fcntl(F_OFD_SETLK)`) held as long as `file` stays open: read locks on
/// bytes 100 and 101 (consistent read, write) and 201 (writing not shared).
/// `Ok(false)`, after about a second of tries, when another
/// process writes the image or does not let others write it (a running
/// QEMU, `qemu-img commit`, ...).
///
/// OFD locks, as QEMU's own: they belong to the open file description, so
/// they neither vanish when another descriptor of the file is closed nor
/// pass to a forked child that outlives its exec. While they are held, no
/// QEMU can open the image for writing; readers that share writing
/// (`qemu-img info -U`) can.
pub fn lock_like_qemu_writer(file: &File) -> io::Result<bool> {
    lock_like_qemu(file, &QEMU_WRITER)
}

/// The QEMU image locks one kind of QEMU user takes (read locks), and
/// those whose holder refuses it (tested with `F_OFD_GETLK`: another
/// writer holds byte 101, a process not sharing writing byte 201).
struct QemuLocks {
    take: &'static [i64],
    refused_by: &'static [i64],
}

/// A writer: consistent read, write, writing not shared.
const QEMU_WRITER: QemuLocks = QemuLocks {
    take: &[QEMU_PERM_BASE + QEMU_PERM_READ, QEMU_PERM_BASE + QEMU_PERM_WRITE, QEMU_SHARED_BASE + QEMU_PERM_WRITE],
    refused_by: &[QEMU_PERM_BASE + QEMU_PERM_WRITE, QEMU_SHARED_BASE + QEMU_PERM_WRITE],
};

/// A reader that needs consistent reads and does not share writing.
const QEMU_READER: QemuLocks = QemuLocks {
    take: &[QEMU_PERM_BASE + QEMU_PERM_READ, QEMU_SHARED_BASE + QEMU_PERM_WRITE],
    refused_by: &[QEMU_PERM_BASE + QEMU_PERM_WRITE],
};

/// `locks` taken on `file`, tried for about a second; an attempt that
/// fails releases what it took.
fn lock_like_qemu(file: &File, locks: &QemuLocks) -> io::Result<bool> {
    retrying(|| lock_like_qemu_once(file, locks).and_then(|ok| released_unless(ok, file)))
}

/// One attempt of [`lock_like_qemu`]: the holders that refuse it are
/// looked for before anything is taken (so that a refusal holds none of
/// the bytes a starting QEMU tests), and again after (one may have come
/// meanwhile; our own read locks do not conflict with that test).
fn lock_like_qemu_once(file: &File, locks: &QemuLocks) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    if held_by_another(fd, locks.refused_by)? {
        return Ok(false);
    }
    for &byte in locks.take {
        match fcntl(fd, FcntlArg::F_OFD_SETLK(&one_byte(libc::F_RDLCK, byte))) {
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(!held_by_another(fd, locks.refused_by)?)
}

/// Whether an owner other than `fd`'s open file description holds a lock
/// on one of `bytes` (`fcntl(F_OFD_GETLK)` for a write lock: nothing is
/// taken).
fn held_by_another(fd: std::os::fd::RawFd, bytes: &[i64]) -> io::Result<bool> {
    for &byte in bytes {
        let mut fl = one_byte(libc::F_WRLCK, byte);
        fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl))?;
        if fl.l_type != libc::F_UNLCK as libc::c_short {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Lock `file` the way a QEMU reader that needs consistent reads and does
/// not share writing locks an image (`qemu-img convert` without `-U`):
/// read locks on bytes 100 (consistent read) and 201 (writing not shared),
/// OFD locks held as long as `file` stays open. `Ok(false)`, after about a
/// second of tries, when another process writes the image (holds byte
/// 101: a running VM on it, a merge into it). While they are held no writer that
/// locks as QEMU does (QEMU, `qemu-img commit`, knib's own merge) can
/// start on it; other readers can, a VM reading it as a backing file too.
pub fn lock_like_qemu_reader(file: &File) -> io::Result<bool> {
    lock_like_qemu(file, &QEMU_READER)
}

/// `ok`, after releasing, when not, the QEMU locks (bytes 100 to 299) an
/// attempt took on `file` (one that found the other holder only once it
/// had taken its bytes: the holder came meanwhile): between tries a QEMU
/// starting on the image is not hindered by a lock knib did not get whole.
fn released_unless(ok: bool, file: &File) -> io::Result<bool> {
    if !ok {
        let mut all = one_byte(libc::F_UNLCK, QEMU_PERM_BASE);
        all.l_len = 2 * (QEMU_SHARED_BASE - QEMU_PERM_BASE);
        fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&all))?;
    }
    Ok(ok)
}

/// Which files a lock opens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lockable {
    /// Regular files only (knib's own locks, and the reads of backup files).
    RegularFile,
    /// What QEMU locks: the images it opens, regular files and block devices.
    Image,
}

impl Lockable {
    fn accepts(self, ft: std::fs::FileType) -> bool {
        use std::os::unix::fs::FileTypeExt;
        ft.is_file() || (self == Lockable::Image && ft.is_block_device())
    }
}

/// Open `f` to lock it (for writing with `write`), when its name is a file
/// `kind` accepts: `Ok(None)` when it is not, before anything is opened
/// (the names come from requests not yet checked, and opening a device or a
/// FIFO can act), or when the file opened is not (a name swapped meanwhile:
/// `O_NONBLOCK`, so a FIFO opens at once instead of waiting). No
/// `O_NOFOLLOW`: the volumes of a pool may be links, and the lock is on what
/// they name. The file's metadata comes with it.
fn open_lockable(f: &Path, kind: Lockable, write: bool) -> io::Result<Option<(File, std::fs::Metadata)>> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::metadata(f).is_ok_and(|m| !kind.accepts(m.file_type())) {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new().read(true).write(write).custom_flags(libc::O_NONBLOCK).open(f)?;
    let meta = file.metadata()?;
    Ok(kind.accepts(meta.file_type()).then_some((file, meta)))
}

/// Open each of `files` and lock it as a QEMU reader ([`lock_like_qemu_reader`])
/// for as long as the returned files stay open: what a read of backup files
/// by path holds, so that no merge writes them under it (a hash or a restore
/// read a parent half-merged, and answered success). A file another process
/// writes is busy, naming it and `what`; nothing is read.
pub fn hold_for_reading(files: &[&Path], what: &str) -> Result<Vec<File>> {
    let mut held = Vec::with_capacity(files.len());
    for f in files {
        let Some((file, _)) =
            open_lockable(f, Lockable::RegularFile, false).map_err(|e| KnibError::io("cannot open", f, e))?
        else {
            continue;
        };
        if !lock_like_qemu_reader(&file).map_err(|e| KnibError::io("cannot lock", f, e))? {
            return Err(KnibError::new(
                ErrorKind::Busy,
                format!(
                    "{} is being written by another process (it holds QEMU's write lock: a merge, or a running VM): {what} does not read it",
                    f.display()
                ),
            ));
        }
        held.push(file);
    }
    Ok(held)
}

/// The byte of knib's own one-operation lock, 0x4b4e4942 ("KNIB";
/// `lslocks` shows it as 1263421762): a byte no other locker of disk
/// images uses. Not byte 0, which libvirt's virtlockd locks (a POSIX lock,
/// exclusive for a writable disk) on the disks of a running domain when it
/// locks the files themselves: knib's lock there made every request on a
/// running domain's volumes busy. Not byte 1, which libvirt's security
/// manager locks (POSIX, retried for about ten seconds, then the libvirt
/// call fails) while it relabels a disk file, as for a disk-only snapshot:
/// knib's lock there stalled libvirt's snapshot of a running domain past
/// the request's time budget. Not QEMU's image locks (bytes 100 to 299).
/// Within 31 bits, for lock implementations with 32-bit signed offsets.
/// A knib from before this byte (byte 1, or 0) and this one do not
/// exclude each other: upgrade a host with no knib request running.
pub const OPERATION_BYTE: i64 = 0x4b4e_4942;

/// An OFD write lock on byte [`OPERATION_BYTE`] of `file` (not one of
/// QEMU's locks, bytes 100 to 299), held as long as `file` stays open: one process at a time
/// writes a file knib makes under a fixed name (a compression's output).
/// `Ok(false)` when another holds it.
///
/// A lock refused is tried again for about a second before `Ok(false)`:
/// an OFD lock belongs to its open file description, and a child another
/// thread of this process forks (a `qemu-img` spawned at that instant)
/// holds a copy of it until it execs, so a lock just released (a failed
/// request answered) could still be held for a moment, and the next
/// request on the same files was refused as busy.
pub fn try_lock_operation_byte(file: &File) -> io::Result<bool> {
    retrying(|| match fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&one_byte(libc::F_WRLCK, OPERATION_BYTE))) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    })
}

/// `attempt` (a lock, or a look for one: `Ok(false)` when another holds
/// it) tried for about a second (20 tries, 50 ms apart) before its `Ok(false)` is taken: a lock
/// this process just released may still be held for a moment by a child
/// another thread forked meanwhile (see [`try_lock_operation_byte`]).
fn retrying(mut attempt: impl FnMut() -> io::Result<bool>) -> io::Result<bool> {
    const TRIES: u32 = 20;
    for _ in 1..TRIES {
        if attempt()? {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    attempt()
}

/// Open each of `files` that exists and is a regular file for writing and
/// take an OFD write lock on its byte [`OPERATION_BYTE`] ([`try_lock_operation_byte`], not
/// one of QEMU's or libvirt's locks: QEMU, `qemu-img` and libvirt are not hindered) for as long as the
/// returned files stay open: one knib operation at a time changes a
/// volume's files on primary (two backups of one stopped volume at once
/// merged the same delta twice, and the loser's new delta lost its backing
/// file). A file another operation holds is busy, naming it and `what`;
/// nothing is written. A file that cannot be opened for writing (read-only)
/// is not locked: it is not written either.
pub fn hold_for_one_operation(files: &[&Path], what: &str) -> Result<Vec<File>> {
    use std::os::unix::fs::MetadataExt;
    let mut held: Vec<File> = Vec::with_capacity(files.len());
    let mut ids: Vec<(u64, u64)> = Vec::with_capacity(files.len());
    for f in files {
        // Only a regular file is opened: opening a device can act (a
        // watchdog starts).
        let (file, meta) = match open_lockable(f, Lockable::RegularFile, true) {
            Ok(Some(opened)) => opened,
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EISDIR)
                ) =>
            {
                log::debug!("{} cannot be opened for writing ({e}): not locked for {what}", f.display());
                continue;
            }
            Err(e) => return Err(KnibError::io("cannot open", f, e)),
        };
        // One file named twice (or by two names) is held once.
        let id = (meta.dev(), meta.ino());
        if ids.contains(&id) {
            continue;
        }
        if !try_lock_operation_byte(&file).map_err(|e| KnibError::io("cannot lock", f, e))? {
            return Err(KnibError::new(
                ErrorKind::Busy,
                format!(
                    "{} is being changed by another knib operation (a backup, cleanup, merge or restore of this volume): {what} refused, nothing was written; try again when it ends",
                    f.display()
                ),
            ));
        }
        ids.push(id);
        held.push(file);
    }
    Ok(held)
}

/// Open `path` for writing, creating it (never truncating it), without
/// following a symbolic link or waiting on a FIFO; it must be a regular
/// file with one name (a hard link planted there has another name,
/// anywhere on the file system: the caller writes it). Then take the lock
/// of [`try_lock_operation_byte`] on it: `Ok(None)` when another holds it.
pub fn create_and_lock(path: &Path) -> Result<Option<File>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| KnibError::io("cannot create", path, e))?;
    let meta = file.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?;
    if !meta.is_file() {
        return Err(KnibError::invalid(format!("{} is not a regular file", path.display())));
    }
    // Removed meanwhile (by the holder that just finished with it): taken
    // by another operation, as far as this one knows.
    if meta.nlink() == 0 {
        return Ok(None);
    }
    if let Some(why) = crate::fsio::not_own_file(&meta) {
        return Err(KnibError::corrupt(format!(
            "{} {why}: knib writes no file another name leads to; remove that entry",
            path.display()
        )));
    }
    crate::crashpoint::pause_point(&format!("locking {}", path.display()));
    match try_lock_operation_byte(&file).map_err(|e| KnibError::io("cannot lock", path, e))? {
        true => Ok(Some(file)),
        false => Ok(None),
    }
}

/// [`create_and_lock`], then check that `path` still leads to the file
/// locked, else open it again: a holder that renamed or removed the file
/// before letting it go leaves the lock to whoever opened the old name just
/// before, and that one would take another operation's file for its own.
/// `Ok(None)` when another holds it; busy when the name keeps being
/// replaced.
pub fn create_and_lock_named(path: &Path) -> Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    // Bounded: each round needs another process to remove the file
    // between our open and our lock.
    for _ in 0..100 {
        let Some(file) = create_and_lock(path)? else {
            return Ok(None);
        };
        let meta = file.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?;
        match std::fs::symlink_metadata(path) {
            Ok(now) if now.dev() == meta.dev() && now.ino() == meta.ino() => return Ok(Some(file)),
            // Removed (or replaced) by its last holder meanwhile.
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KnibError::io("cannot stat", path, e)),
        }
    }
    Err(KnibError::new(ErrorKind::Busy, format!("{} keeps being replaced; try again", path.display())))
}

/// An empty lock file, held (an OFD write lock on its byte [`OPERATION_BYTE`]) as long as
/// this value lives and removed when it is dropped: one operation at a
/// time on a name that may not exist yet (a volume a restore creates),
/// where there is no file to lock.
///
/// The file is removed while still locked, and a process that locked it
/// checks that the name still leads to the file it locked, else it opens
/// the name again: whoever opened the old file just before it was removed
/// cannot hold a lock the next one does not see.
#[derive(Debug)]
pub struct LockFile {
    path: std::path::PathBuf,
    file: File,
}

impl LockFile {
    /// Create (or open) and lock `path`, after about a second of tries: another holder
    /// makes it busy, naming `path` and `what`.
    pub fn hold(path: &Path, what: &str) -> Result<LockFile> {
        let named = create_and_lock_named(path).map_err(|e| {
            if e.kind == ErrorKind::Busy {
                e.context(what.to_string())
            } else {
                e
            }
        });
        match named? {
            Some(file) => Ok(LockFile { path: path.to_path_buf(), file }),
            None => Err(KnibError::new(
                ErrorKind::Busy,
                format!(
                    "{what} is running in another request (it holds {}): refused, nothing was written; try again when it ends",
                    path.display()
                ),
            )),
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        // Removed only while it is still the file this value locked.
        let ours = self.file.metadata().ok().map(|m| (m.dev(), m.ino()));
        let named = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == named {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove the lock file {}: {e}", self.path.display());
            }
        }
    }
}

/// Whether another owner holds the lock of [`hold_for_one_operation`] (or
/// [`try_lock_operation_byte`]) on `file`, tested with `fcntl(F_OFD_GETLK)`:
/// nothing is taken.
pub fn held_by_one_operation(file: &File) -> io::Result<bool> {
    let mut fl = one_byte(libc::F_WRLCK, OPERATION_BYTE);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether another owner holds any of QEMU's image locks on `file`
/// (bytes 100 to 299: the permissions a process holds, and those it does
/// not share), tested with `fcntl(F_OFD_GETLK)` for a write lock over that
/// range: nothing is taken. True while a QEMU has the image open, as its
/// active file or as a backing file, and while a `qemu-img` that does not
/// share (`commit`, `rebase`, `check -r`) works on it; readers that share
/// writing (`qemu-img info -U`) take no lock and are not seen. A POSIX
/// record lock of another process on those bytes counts too (QEMU falls
/// back to them without OFD locks).
pub fn held_like_qemu(file: &File) -> io::Result<bool> {
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: QEMU_PERM_BASE,
        l_len: 2 * (QEMU_SHARED_BASE - QEMU_PERM_BASE),
        l_pid: 0,
    };
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Lock each of `files` that exists as a QEMU writer does
/// ([`lock_like_qemu_writer`]) for as long as the returned files stay
/// open: what a step that replaces or removes files holds, so that no VM
/// starts on them meanwhile (QEMU then fails to take its own lock). A file
/// in use (a running VM on it, or reading it as a backing file) is busy,
/// naming it and `what`; nothing is written. Files that do not exist, and
/// those QEMU would not lock (neither a regular file nor a block device:
/// never waited on, a FIFO included), are skipped.
pub fn hold_like_qemu_writer(files: &[&Path], what: &str) -> Result<Vec<File>> {
    use std::os::unix::fs::MetadataExt;
    let mut held = Vec::with_capacity(files.len());
    let mut ids: Vec<(u64, u64)> = Vec::with_capacity(files.len());
    for f in files {
        // QEMU locks only the images it opens. Nothing else is opened.
        let (file, meta) = match open_lockable(f, Lockable::Image, false) {
            Ok(Some(opened)) => opened,
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KnibError::io("cannot open", f, e)),
        };
        // One file named twice (or by two names) is held once: a second
        // description's locks would conflict with the first's.
        let id = (meta.dev(), meta.ino());
        if ids.contains(&id) {
            continue;
        }
        ids.push(id);
        if !lock_like_qemu_writer(&file).map_err(|e| KnibError::io("cannot lock", f, e))? {
            return Err(in_use(f, what));
        }
        held.push(file);
    }
    Ok(held)
}

fn in_use(f: &Path, what: &str) -> KnibError {
    KnibError::new(
        ErrorKind::Busy,
        format!(
            "{} is in use by another process (it holds QEMU's image lock: a running VM, or qemu-img): {what} refused, nothing was written",
            f.display()
        ),
    )
}

/// Fail as busy, naming the file, when a process holds QEMU's image locks
/// on one of `files` ([`held_like_qemu`], for about a second); files that do not exist, and
/// those QEMU would not lock (neither a regular file nor a block device:
/// never waited on, a FIFO included), are skipped. Nothing is written.
pub fn ensure_unused(files: &[&Path], what: &str) -> Result<()> {
    for f in files {
        // QEMU locks only the images it opens. Nothing else is opened; it
        // is the caller's to refuse.
        let file = match open_lockable(f, Lockable::Image, false) {
            Ok(Some((file, _))) => file,
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KnibError::io("cannot open", f, e)),
        };
        // Looked at for about a second, as the locks are tried: a lock
        // this process released a moment before (a request on the same
        // files) may still be held by a child another thread forked.
        if !retrying(|| Ok(!held_like_qemu(&file)?)).map_err(|e| KnibError::io("cannot test the locks of", f, e))? {
            return Err(in_use(f, what));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names that are not regular files (a request's paths, before they
    /// are checked) are not opened at all by the holds (knib's, a QEMU
    /// reader's, a QEMU writer's) or the check for QEMU's locks: opening a
    /// device can act. Seen
    /// with inotify on a FIFO (a device's open would show the same way);
    /// before, each was opened, then skipped.
    #[test]
    fn a_name_that_is_not_a_regular_file_is_never_opened() {
        use rustix::fs::inotify;
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = d.path().join("vol");
        std::fs::write(&file, b"x").unwrap();
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(&watch, &fifo, inotify::WatchFlags::OPEN).unwrap();
        let unopened = |step: &str| {
            let mut buf = [0u8; 4096];
            match rustix::io::read(&watch, &mut buf) {
                Err(e) if e == rustix::io::Errno::AGAIN => {}
                other => panic!("{step} opened the FIFO: {other:?}"),
            }
        };
        let both = [fifo.as_path(), file.as_path()];
        assert_eq!(hold_for_one_operation(&both, "the test").unwrap().len(), 1, "the regular file is held");
        unopened("hold_for_one_operation");
        ensure_unused(&both, "the test").unwrap();
        unopened("ensure_unused");
        assert_eq!(hold_like_qemu_writer(&both, "the test").unwrap().len(), 1);
        unopened("hold_like_qemu_writer");
        assert_eq!(hold_for_reading(&both, "the test").unwrap().len(), 1);
        unopened("hold_for_reading");
    }

    /// A lock released while a child forked meanwhile still holds a copy
    /// of its file description (as one forked by another thread to exec
    /// `qemu-img` does until it execs) is taken again once the child is
    /// gone, not refused as busy: knib's operation lock (the next request
    /// on the same volume was refused), and QEMU's locks as knib takes
    /// them, a reader after a writer and a writer after a reader (a backup
    /// of a disk whose native merge was prepared and given up was refused;
    /// CI, qcow2_damage dirty_disks_through_store_backup_lose_nothing).
    #[test]
    fn locks_released_under_a_forked_child_are_taken_again() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("img");
        std::fs::write(&f, b"x").unwrap();
        type Hold = fn(&[&Path], &str) -> Result<Vec<File>>;
        // The look for QEMU's locks, as a hold of nothing.
        fn unused(files: &[&Path], what: &str) -> Result<Vec<File>> {
            ensure_unused(files, what).and_then(|()| hold_for_one_operation(files, what))
        }
        for (first, then) in [
            (hold_for_one_operation as Hold, hold_for_one_operation as Hold),
            (hold_like_qemu_writer, hold_for_reading),
            (hold_for_reading, hold_like_qemu_writer),
            (hold_like_qemu_writer, unused),
            (hold_for_reading, unused),
        ] {
            let held = first(&[f.as_path()], "the first").unwrap();
            assert_eq!(held.len(), 1);
            // SAFETY: the child calls only async-signal-safe functions
            // (nanosleep, _exit) before it ends.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                unsafe {
                    let t = libc::timespec { tv_sec: 0, tv_nsec: 300_000_000 };
                    libc::nanosleep(&t, std::ptr::null_mut());
                    libc::_exit(0);
                }
            }
            drop(held);
            let again = then(&[f.as_path()], "the second");
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(again.unwrap().len(), 1);
        }
    }

    /// A QEMU-like lock refused because another process writes the image
    /// (byte 101) or does not share writing (byte 201) takes none of
    /// QEMU's bytes, not even for a moment: a QEMU starting on the image at
    /// that instant would find them held and fail to open it. Before, each
    /// of the twenty tries of a refusal took its bytes, then found the
    /// holder, then released them.
    #[test]
    fn a_refused_qemu_like_lock_takes_nothing() {
        let d = tempfile::tempdir().unwrap();
        for (i, (locks, held)) in [
            (&QEMU_WRITER, QEMU_PERM_BASE + QEMU_PERM_WRITE),
            (&QEMU_WRITER, QEMU_SHARED_BASE + QEMU_PERM_WRITE),
            (&QEMU_READER, QEMU_PERM_BASE + QEMU_PERM_WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            // A file of its own each time: a child another test forks may
            // hold a copy of the last holder for a moment.
            let (p, _) = temp_file(&d, &format!("img{i}"));
            let watcher = File::open(&p).unwrap();
            let holder = File::open(&p).unwrap();
            fcntl(holder.as_raw_fd(), FcntlArg::F_OFD_SETLK(&one_byte(libc::F_RDLCK, held))).unwrap();
            let knib = File::open(&p).unwrap();
            assert!(!lock_like_qemu_once(&knib, locks).unwrap(), "byte {held} held, yet locked");
            let free: Vec<i64> = (QEMU_PERM_BASE..QEMU_SHARED_BASE + 100).filter(|&b| b != held).collect();
            assert!(!held_by_another(watcher.as_raw_fd(), &free).unwrap(), "a refusal (byte {held} held) took a byte");
        }
    }

    fn temp_file(dir: &tempfile::TempDir, name: &str) -> (std::path::PathBuf, File) {
        let p = dir.path().join(name);
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn ofd_locks_exclude_a_second_writer_and_go_with_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (p, a) = temp_file(&d, "img");
        assert!(lock_like_qemu_writer(&a).unwrap());
        // A second open file description, even in this process, is another
        // owner: it finds the image in use.
        let b = File::options().read(true).write(true).open(&p).unwrap();
        assert!(!lock_like_qemu_writer(&b).unwrap());
        assert!(held_like_qemu(&b).unwrap());
        drop(a);
        // A child another test forks meanwhile holds a copy of `a` until
        // it ends: gone within the tries.
        assert!(retrying(|| Ok(!held_like_qemu(&b)?)).unwrap());
        assert!(lock_like_qemu_writer(&b).unwrap());
    }

    #[test]
    fn a_lock_file_is_held_once_removed_after_and_a_stale_one_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".v.lock");
        let a = LockFile::hold(&p, "a restore").unwrap();
        let e = LockFile::hold(&p, "a restore").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{e}");
        assert!(e.message.contains(&p.display().to_string()), "{e}");
        assert!(p.exists(), "a refused holder removed the holder's file");
        drop(a);
        assert!(!p.exists(), "left after its holder");
        // One a crash left behind (unlocked) is taken.
        std::fs::write(&p, b"").unwrap();
        let b = LockFile::hold(&p, "a restore").unwrap();
        drop(b);
        assert!(!p.exists());
    }

    #[test]
    fn flock_is_released_with_its_file() {
        let d = tempfile::tempdir().unwrap();
        let (p, a) = temp_file(&d, "q");
        lock_exclusive(&a).unwrap();
        let b = File::open(&p).unwrap();
        assert!(flock(&b, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(a);
        lock_exclusive(&b).unwrap();
    }

    #[test]
    fn a_record_lock_is_the_process_s() {
        let d = tempfile::tempdir().unwrap();
        let (p, a) = temp_file(&d, "vm");
        assert!(try_record_lock(&a).unwrap());
        // Another process sees it held.
        let st = std::process::Command::new("python3")
            .args(["-c", "import fcntl,sys; f=open(sys.argv[1],'r+');\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB); sys.exit(0)\nexcept OSError: sys.exit(3)"])
            .arg(&p)
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(3));
    }
}

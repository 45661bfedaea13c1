//! Writing what `get` extracts: a file or a directory tree under a
//! temporary sibling of the destination, renamed into place at the end.
//!
//! Nothing is ever written through a link: every directory is created by
//! knib in the fresh temporary directory and opened with `O_NOFOLLOW`, and
//! every file, directory and link is created relative to its parent's
//! descriptor (`openat` with `O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`,
//! `symlinkat`). Symlinks are recreated as they are (their targets never
//! followed). Modes and modification times are set on every entry,
//! directories' after their children; setuid and setgid bits are dropped
//! (the files belong to whoever extracts them). The access time is set
//! with the modification time, to the time it is set (the readers give
//! none): a FUSE file system of libfuse 2 (bindfs) ignores a change of the
//! modification time alone.
//!
//! A guest can make a small filesystem hold far more than its size (the
//! same clusters or directory reached from many entries, files whose
//! zeros are holes): an extraction reads at most [`READ_FACTOR`] times
//! the filesystem's size of file data plus [`READ_SLACK`], makes at most
//! as many entries as the filesystem can hold (its size over the fewest
//! bytes an entry takes there), and writes at most its size of data;
//! beyond that it is Corrupt, found while counting (before anything is
//! written) or while writing, and what was made is removed.
//!
//! The final rename never replaces an entry that appeared at the
//! destination while extracting (it fails, InvalidInput, and the temporary
//! is removed): `renameat2(RENAME_NOREPLACE)`. A file system that takes no
//! rename flags (NFS, CIFS, many FUSE file systems: EINVAL, ENOSYS or
//! EOPNOTSUPP) gets a fallback, logged, with the same guarantee for a file:
//! a hard link at the destination (`linkat`, refused when an entry is
//! there), then the temporary name removed. A directory, which cannot be
//! hard-linked (or a file where the file system makes no hard links), is
//! renamed by a plain `renameat` after `fstatat(AT_SYMLINK_NOFOLLOW)`
//! found nothing at the destination. Its window, between that check and
//! the rename: a plain rename replaces what appears at the destination in
//! that moment only if it may, an empty directory (for a directory) or a
//! file, symlink or other non-directory (for a file); a directory with
//! anything in it, or an entry of the other kind, is refused by the
//! rename itself. Every step is relative to the parent directory's
//! descriptor, as everything else here.
//!
//! Neither the walk nor the removal of a failed extraction recurses: a
//! tree [`MAX_DEPTH`] directories deep is extracted (or removed) on any
//! stack, even a JNI or C caller's thread of a few hundred KiB, with a
//! few descriptors open (a directory's parent is reopened through `..`
//! when its children are done, and checked to be the one it left).

use std::ffi::{CStr, CString, OsStr};
use std::fs::{File, Permissions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::Serialize;

use crate::error::{KnibError, Result};
use crate::fsio::{self, NoReplaceError, Placed, Unflagged};
use crate::progress::Control;

use super::fs::{display, Entry, FileRead, Filesystem, FsPath, Kind, Node};

/// Bytes read and written at a time.
pub const CHUNK: usize = 1 << 20;
/// The deepest directory tree extracted.
pub const MAX_DEPTH: usize = 1024;
/// An extraction reads at most this many times its filesystem's size of
/// file data (hard links and sparse files read more than the data
/// stored), plus [`READ_SLACK`].
pub const READ_FACTOR: u64 = 4;
/// See [`READ_FACTOR`].
pub const READ_SLACK: u64 = 1 << 30;
/// The most memory the listings held at once may take (entries listed
/// and not visited yet, in the directories from the top down to the
/// current one), whatever the filesystem's size: a crafted image whose
/// nested directories share one long listing would otherwise take
/// gigabytes from a few MB (a large filesystem's capacity allows many
/// entries). A directory of [`super::fs::MAX_ENTRIES`] entries fits, even
/// of NTFS names of 255 UTF-16 units (765 bytes of UTF-8 each: about 845
/// MiB with what each entry takes besides).
#[cfg(not(test))]
pub const MAX_HELD_BYTES: u64 = 1 << 30;
/// (Smaller in unit tests, which reach it without taking that much.)
#[cfg(test)]
pub const MAX_HELD_BYTES: u64 = 8 << 20;

/// What an entry held in a listing takes, besides its name's bytes.
fn held_bytes(e: &Entry) -> u64 {
    (std::mem::size_of::<Entry>() + e.name.len()) as u64
}

/// What `get` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct GetSummary {
    /// Regular files written.
    pub files: u64,
    /// Directories made (the extracted directory itself included).
    pub dirs: u64,
    /// Symlinks made.
    pub symlinks: u64,
    /// Bytes of file data.
    pub bytes: u64,
}

fn os_err(what: &str, path: &Path) -> KnibError {
    KnibError::io(what, path, std::io::Error::last_os_error())
}

fn cstr(b: &[u8], path: &Path) -> Result<CString> {
    CString::new(b).map_err(|_| KnibError::invalid(format!("{} contains a NUL byte", path.display())))
}

/// The times given to an extracted entry (`utimensat`'s pair): its
/// modification time `n`'s, its access time the time it is set
/// (`UTIME_NOW`: readers give no access time, and the guest's would say
/// nothing of the copy). Never the modification time alone (access time
/// `UTIME_OMIT`): a FUSE file system of libfuse 2 (bindfs) ignores such a
/// change, and the entry keeps the time it was written.
fn times(n: &Node) -> [libc::timespec; 2] {
    [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        libc::timespec { tv_sec: n.mtime as libc::time_t, tv_nsec: n.mtime_nsec.min(999_999_999) as _ },
    ]
}

/// Set mode and times ([`times`]) through an open descriptor.
fn finish(f: &File, n: &Node, path: &Path) -> Result<()> {
    f.set_permissions(Permissions::from_mode(n.mode & 0o1777))
        .map_err(|e| KnibError::io("cannot set the mode of", path, e))?;
    let times = times(n);
    // SAFETY: a valid descriptor and a two-element array.
    if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(os_err("cannot set the mtime of", path));
    }
    Ok(())
}

/// Open `name` in directory `dir` as a directory, never through a link.
fn open_dir_at(dir: &File, name: &CStr, path: &Path) -> Result<File> {
    // SAFETY: valid descriptor and NUL-terminated name; the result is
    // checked and owned by the File.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os_err("cannot open directory", path));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// What identifies an open directory: its device and inode.
fn key_of(f: &File, path: &Path) -> Result<(u64, u64)> {
    let m = f.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?;
    Ok((m.dev(), m.ino()))
}

/// The parent (`..`) of directory `dir` at `path`, which must be the
/// directory whose key is `want` (nobody moved it meanwhile).
fn parent_of(dir: &File, want: (u64, u64), path: &Path) -> Result<File> {
    let up = open_dir_at(dir, c"..", path)?;
    if key_of(&up, path)? != want {
        return Err(KnibError::invalid(format!(
            "the directory above {} was moved while extracting; nothing was written through it",
            path.display()
        )));
    }
    Ok(up)
}

/// A new directory `name` in `dir`, opened.
fn make_dir_at(dir: &File, name: &CString, path: &Path) -> Result<File> {
    mkdir_at(dir, name).map_err(|e| KnibError::io("cannot create directory", path, e))?;
    open_dir_at(dir, name, path)
}

/// `mkdirat` of `name` in `dir`, mode 0700.
fn mkdir_at(dir: &File, name: &CStr) -> std::io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new file `name` in `dir` (never an existing one, never a link).
fn make_file_at(dir: &File, name: &CString, path: &Path) -> Result<File> {
    create_at(dir, name).map_err(|e| KnibError::io("cannot create", path, e))
}

/// A new file `name` in `dir`, mode 0600 (`O_EXCL | O_NOFOLLOW`).
fn create_at(dir: &File, name: &CStr) -> std::io::Result<File> {
    // SAFETY: valid descriptor and NUL-terminated name; the result is
    // checked and owned by the File.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The most temporary names tried when the ones drawn are taken.
const TEMP_TRIES: usize = 64;

/// A new symlink `name` in `dir` pointing at `target`, with [`times`].
fn make_link_at(dir: &File, name: &CString, target: &[u8], n: &Node, path: &Path) -> Result<()> {
    let t = cstr(target, path)?;
    // SAFETY: valid descriptor and NUL-terminated strings.
    if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
        return Err(os_err("cannot create symlink", path));
    }
    let times = times(n);
    // SAFETY: valid descriptor, name and a two-element array.
    if unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(os_err("cannot set the mtime of symlink", path));
    }
    Ok(())
}

/// Whether `name` can be a file name here.
fn check_name(name: &[u8], dir: &FsPath) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(KnibError::corrupt(format!(
            "directory {} has an entry named {:?}, which cannot be a file name",
            display(dir),
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

/// One extraction: the filesystem, the control, the counts.
struct Walk<'a> {
    fs: &'a mut dyn Filesystem,
    ctl: &'a Control,
    step: String,
    /// Only count (the first pass, for progress and early errors).
    counting: bool,
    total: u64,
    summary: GetSummary,
    /// Bytes of data written (holes left out): at most the filesystem's
    /// [`Filesystem::capacity`].
    written: u64,
    dirs_seen: u64,
    /// Entries met (files, directories, links, others).
    entries: u64,
    /// Entries listed and not visited yet, in the directories from the top
    /// down to the current one: what the walk holds in memory.
    held: u64,
    /// What those entries take ([`held_bytes`]).
    held_bytes: u64,
    buf: Vec<u8>,
    last_report: u64,
    /// Where the extracted path goes (for messages), and the length of its
    /// path in the filesystem: `path[base..]` is below it.
    to: PathBuf,
    base: usize,
}

/// A directory being walked.
struct Frame {
    /// Its entries not visited yet, the last one next.
    entries: Vec<Entry>,
    node: Node,
    /// The directory made for it while its own entries are being made
    /// (`None` when counting, and while one of its subdirectories is).
    out: Option<File>,
    /// What identifies the directory made for it.
    key: Option<(u64, u64)>,
}

impl Walk<'_> {
    fn report(&mut self, force: bool) {
        if !self.counting {
            progress(self.ctl, &self.step, self.summary.bytes, self.total, &mut self.last_report, force);
        }
    }

    /// The most entries the filesystem can hold (its capacity over the
    /// fewest bytes an entry takes), with those two figures.
    fn most_entries(&self) -> (u64, u64, u64) {
        let capacity = self.fs.capacity();
        let per = self.fs.min_entry_bytes().max(1);
        ((capacity / per).max(1), capacity, per)
    }

    /// The most bytes of file data read.
    fn read_limit(&self) -> u64 {
        self.fs.capacity().saturating_mul(READ_FACTOR).saturating_add(READ_SLACK)
    }

    /// Count, while counting, one more entry (at `path`) and `size` bytes
    /// of file data to read: Corrupt past what the filesystem can hold.
    fn count(&mut self, path: &FsPath, size: u64) -> Result<()> {
        if !self.counting {
            return Ok(());
        }
        let (most, capacity, per) = self.most_entries();
        self.entries += 1;
        if self.entries > most {
            return Err(KnibError::corrupt(format!(
                "{} meets more than {most} entries (at {}), more than its filesystem of {capacity} bytes can hold ({per} bytes an entry at the least): its directories are cross-linked (one reached from many entries)",
                self.step,
                display(path)
            )));
        }
        self.total = self.total.saturating_add(size);
        if self.total > self.read_limit() {
            return Err(KnibError::corrupt(format!(
                "{} would read {} bytes of file data (at {}), more than {READ_FACTOR} times its filesystem's {capacity} bytes plus 1 GiB: its files share their data or claim sizes far beyond it (cross-linked entries, many hard links, huge sparse files); extract fewer files at a time",
                self.step,
                self.total,
                display(path)
            )));
        }
        Ok(())
    }

    /// The local path of filesystem path `path` (for messages).
    fn local(&self, path: &FsPath) -> PathBuf {
        let mut p = self.to.clone();
        for c in &path[self.base.min(path.len())..] {
            p.push(OsStr::from_bytes(c));
        }
        p
    }

    /// Start on directory `node` at `path`, made as `out` unless counting:
    /// its entries, sorted, checked.
    fn enter(&mut self, path: &FsPath, node: &Node, out: Option<File>) -> Result<Frame> {
        self.dirs_seen += 1;
        if self.dirs_seen > self.fs.max_dirs().max(1) {
            return Err(KnibError::corrupt(format!(
                "walking {} met more directories than the filesystem can hold ({}): its directories loop",
                display(path),
                self.fs.max_dirs()
            )));
        }
        if path.len() > MAX_DEPTH {
            return Err(KnibError::corrupt(format!(
                "directory {} is more than {MAX_DEPTH} levels deep: the directories loop",
                display(&path[..8.min(path.len())])
            )));
        }
        let mut entries = self.fs.read_dir(path, node)?;
        // Last first: entries are taken from the end, in order.
        entries.sort_by(|a, b| b.name.cmp(&a.name));
        if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(KnibError::corrupt(format!(
                "directory {} has two entries named {:?}",
                display(path),
                String::from_utf8_lossy(&w[0].name)
            )));
        }
        // Held until visited, with those of every directory above: bounded
        // by what the filesystem can hold, or a listing shared by many
        // directories, one inside the other, would be held once a level.
        self.held = self.held.saturating_add(entries.len() as u64);
        self.held_bytes = self.held_bytes.saturating_add(entries.iter().map(held_bytes).sum());
        if self.held_bytes > MAX_HELD_BYTES {
            return Err(KnibError::corrupt(format!(
                "{} holds listings of more than {} at once (at {}, {} entries), more than knib holds: its directories are cross-linked (one listing shared by many)",
                self.step,
                crate::fsio::human_bytes(MAX_HELD_BYTES),
                display(path),
                self.held
            )));
        }
        let (most, capacity, per) = self.most_entries();
        if self.held > most {
            return Err(KnibError::corrupt(format!(
                "{} holds more than {most} entries listed at once (at {}), more than its filesystem of {capacity} bytes can hold ({per} bytes an entry at the least): its directories are cross-linked (one listing shared by many)",
                self.step,
                display(path)
            )));
        }
        let key = match &out {
            Some(f) => Some(key_of(f, &self.local(path))?),
            None => None,
        };
        Ok(Frame { entries, node: node.clone(), out, key })
    }

    /// Visit directory `top` at `path` and everything below it, depth
    /// first and without recursion; `out` is the directory made for it
    /// (`None` when counting), given back open at the end.
    fn tree(&mut self, path: &mut Vec<Vec<u8>>, top: &Node, out: Option<File>) -> Result<Option<File>> {
        // The ids of the directories from `top` down to the current one.
        let mut ancestors: Vec<u64> = top.id.into_iter().collect();
        let mut stack = vec![self.enter(path, top, out)?];
        loop {
            let frame = stack.last_mut().expect("the walk has a directory");
            let Some(e) = frame.entries.pop() else {
                // This directory is done: back to its parent.
                let done = stack.pop().expect("the walk has a directory");
                let Some(parent) = stack.last_mut() else { return Ok(done.out) };
                let local = self.local(path);
                if let Some(out) = &done.out {
                    let up = parent_of(out, parent.key.expect("a directory made has its key"), &local)?;
                    finish(out, &done.node, &local)?;
                    parent.out = Some(up);
                }
                if done.node.id.is_some() {
                    ancestors.pop();
                }
                path.pop();
                self.summary.dirs += 1;
                continue;
            };
            self.held = self.held.saturating_sub(1);
            self.held_bytes = self.held_bytes.saturating_sub(held_bytes(&e));
            self.ctl.check(&format!("extracting {}", display(path)))?;
            check_name(&e.name, path)?;
            path.push(e.name);
            let local = self.local(path);
            let n = e.node;
            self.count(path, if n.kind == Kind::File { n.size } else { 0 })?;
            if self.counting && n.kind == Kind::File {
                self.fs.check_readable(path, &n)?;
            }
            match n.kind {
                Kind::Dir => {
                    if let Some(id) = n.id {
                        if ancestors.contains(&id) {
                            return Err(KnibError::corrupt(format!(
                                "directory {} is one of its own ancestors: the directories loop",
                                display(path)
                            )));
                        }
                        ancestors.push(id);
                    }
                    // Only the directory being filled stays open.
                    let sub = match frame.out.take() {
                        Some(dir) => Some(make_dir_at(&dir, &cstr(&path[path.len() - 1], &local)?, &local)?),
                        None => None,
                    };
                    let child = self.enter(path, &n, sub)?;
                    stack.push(child);
                    continue;
                }
                Kind::File => {
                    if let Some(dir) = &frame.out {
                        let f = make_file_at(dir, &cstr(&path[path.len() - 1], &local)?, &local)?;
                        self.copy(path, &n, &f, &local)?;
                        finish(&f, &n, &local)?;
                    }
                    self.summary.files += 1;
                }
                Kind::Symlink => {
                    if let Some(dir) = &frame.out {
                        let target = self.fs.read_link(path, &n)?;
                        make_link_at(dir, &cstr(&path[path.len() - 1], &local)?, &target, &n, &local)?;
                    }
                    self.summary.symlinks += 1;
                }
                Kind::Other => {
                    if !self.counting {
                        log::warn!(target: "knib", "{}: not a file, directory or symlink; left out", display(path));
                    }
                }
            }
            path.pop();
        }
    }

    /// Copy file `n` at `path` into `f`, leaving holes for zero blocks.
    fn copy(&mut self, path: &FsPath, n: &Node, f: &File, local: &Path) -> Result<()> {
        let what = format!("extracting {}", display(path));
        let mut buf = std::mem::take(&mut self.buf);
        let (ctl, step, total) = (self.ctl, &self.step, self.total);
        let (bytes, last, written) = (&mut self.summary.bytes, &mut self.last_report, &mut self.written);
        let fs = &mut *self.fs;
        let capacity = fs.capacity();
        let limit = capacity.saturating_mul(READ_FACTOR).saturating_add(READ_SLACK);
        let r = (|| {
            let mut reader: Box<dyn FileRead + '_> = fs.open(path, n)?;
            let mut off = 0u64;
            loop {
                ctl.check(&what)?;
                let got = reader.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                *written += write_sparse(f, &buf[..got], off, local)?;
                if *written > capacity {
                    return Err(KnibError::corrupt(format!(
                        "extracting {} wrote more data than the filesystem holds ({capacity} bytes): its files share their data (a cross-linked filesystem, or many hard links to large files); extract fewer files at a time",
                        display(path)
                    )));
                }
                off += got as u64;
                *bytes += got as u64;
                if *bytes > limit {
                    return Err(KnibError::corrupt(format!(
                        "extracting {} read more than {READ_FACTOR} times the filesystem's {capacity} bytes plus 1 GiB of file data: its files share their data or claim sizes far beyond it",
                        display(path)
                    )));
                }
                if off > n.size {
                    break;
                }
                progress(ctl, step, *bytes, total, last, false);
            }
            if off != n.size {
                return Err(KnibError::corrupt(format!(
                    "file {}: read {off} bytes, its size is {}",
                    display(path),
                    n.size
                )));
            }
            f.set_len(off).map_err(|e| KnibError::io("cannot set the length of", local, e))
        })();
        self.buf = buf;
        r
    }
}

/// Report `bytes` of `total` under `step`, at most once a chunk unless
/// `force`d.
fn progress(ctl: &Control, step: &str, bytes: u64, total: u64, last: &mut u64, force: bool) {
    if force || bytes >= *last + CHUNK as u64 {
        *last = bytes;
        let pct = if total == 0 { 100.0 } else { bytes as f64 * 100.0 / total as f64 };
        ctl.report(step, pct.min(100.0));
    }
}

/// Write `data` at `off`, skipping 4 KiB blocks of zeros (left as holes);
/// the bytes written.
fn write_sparse(f: &File, data: &[u8], off: u64, local: &Path) -> Result<u64> {
    let mut written = 0;
    const BLOCK: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        let end = (i + BLOCK).min(data.len());
        if data[i..end].iter().all(|&b| b == 0) {
            i = end;
            continue;
        }
        // A run of blocks that are not all zeros.
        let mut j = end;
        while j < data.len() {
            let e = (j + BLOCK).min(data.len());
            if data[j..e].iter().all(|&b| b == 0) {
                break;
            }
            j = e;
        }
        f.write_all_at(&data[i..j], off + i as u64).map_err(|e| KnibError::io("cannot write", local, e))?;
        written += (j - i) as u64;
        i = j;
    }
    Ok(written)
}

/// Remove `name` in directory `parent`, and all below it when it is a
/// directory (what a failed extraction made): directories are made
/// writable (0700) first, links are removed and never followed. Without
/// recursion, with a few descriptors open (a directory's parent is
/// reopened through `..` and checked). Best effort: what cannot be removed
/// is left.
fn remove_tree_at(parent: &File, name: &CStr) {
    let _ = remove_tree_inner(parent, name);
}

/// A directory being emptied: its name in its parent, its descriptor while
/// it is the one being emptied, its key, its subdirectories left.
struct Level {
    name: CString,
    fd: Option<File>,
    key: (u64, u64),
    subdirs: Vec<CString>,
}

/// Open directory `name` in `at` (made writable first), remove what is
/// not a directory in it, and list its subdirectories.
fn open_level(at: &File, name: &CStr) -> std::io::Result<Level> {
    // The directory itself, never what a link swapped in for it leads to:
    // opened refusing a link, then made writable through its descriptor.
    // A directory this user may not read (mode 0, not root) is held first
    // (`O_PATH`, which needs no permission, refusing a link), made
    // readable through that handle (`/proc/self/fd`: the directory held,
    // not a name), then opened from it.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(at, name, flags, Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(rustix::io::Errno::ACCESS) => {
            let held = rustix::fs::openat(
                at,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            use std::os::fd::AsRawFd;
            let _ = rustix::fs::chmod(format!("/proc/self/fd/{}", held.as_raw_fd()).as_str(), Mode::RWXU);
            let again = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            File::from(rustix::fs::openat(&held, c".", again, Mode::empty())?)
        }
        Err(e) => return Err(e.into()),
    };
    let _ = rustix::fs::fchmod(&fd, Mode::RWXU);
    let m = fd.metadata()?;
    let mut names = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(&fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name();
        if n == c"." || n == c".." {
            continue;
        }
        let is_dir = match e.file_type() {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(&fd, n, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|s| FileType::from_raw_mode(s.st_mode).is_dir()),
            _ => false,
        };
        names.push((n.to_owned(), is_dir));
    }
    let mut subdirs = Vec::new();
    for (n, is_dir) in names {
        if is_dir {
            subdirs.push(n);
        } else {
            let _ = rustix::fs::unlinkat(&fd, &n, AtFlags::empty());
        }
    }
    Ok(Level { name: name.to_owned(), fd: Some(fd), key: (m.dev(), m.ino()), subdirs })
}

fn remove_tree_inner(parent: &File, name: &CStr) -> std::io::Result<()> {
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if !FileType::from_raw_mode(st.st_mode).is_dir() {
        return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
    }
    let mut levels = vec![open_level(parent, name)?];
    loop {
        let top = levels.last_mut().expect("a directory is being emptied");
        if let Some(sub) = top.subdirs.pop() {
            let fd = top.fd.take().expect("the directory being emptied is open");
            match open_level(&fd, &sub) {
                Ok(l) => levels.push(l),
                // Left as it is (its parent will not go either).
                Err(_) => top.fd = Some(fd),
            }
            continue;
        }
        let done = levels.pop().expect("a directory is being emptied");
        let fd = done.fd.expect("the directory being emptied is open");
        let Some(up) = levels.last_mut() else {
            drop(fd);
            return Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?);
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let pfd = File::from(rustix::fs::openat(&fd, c"..", flags, Mode::empty())?);
        let m = pfd.metadata()?;
        if (m.dev(), m.ino()) != up.key {
            return Err(std::io::Error::other("a directory being removed was moved"));
        }
        drop(fd);
        let _ = rustix::fs::unlinkat(&pfd, &done.name, AtFlags::REMOVEDIR);
        up.fd = Some(pfd);
    }
}

fn temp_name(name: &OsStr) -> Vec<u8> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    // At most 200 bytes of the name: a destination whose name is near the
    // 255-byte limit still gets a temporary name that fits.
    let mut t = b".".to_vec();
    // Cut where no UTF-8 character is split (some file systems refuse
    // names that are not UTF-8).
    let b = name.as_bytes();
    let mut cut = b.len().min(200);
    while cut > 0 && cut < b.len() && b[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    t.extend_from_slice(&b[..cut]);
    t.extend_from_slice(format!(".knib-{}-{}.part", std::process::id(), N.fetch_add(1, Ordering::Relaxed)).as_bytes());
    t
}

/// Extract `node` (a file or a directory, at canonical `path` of `fs`) to
/// `to`, which must not exist; `request` names what was asked for in
/// progress steps.
pub fn extract(
    fs: &mut dyn Filesystem,
    path: &FsPath,
    node: &Node,
    to: &Path,
    request: &str,
    ctl: &Control,
) -> Result<GetSummary> {
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(KnibError::invalid(format!(
            "{} already exists: give a path that does not exist yet",
            to.display()
        )));
    }
    let name =
        to.file_name().ok_or_else(|| KnibError::invalid(format!("{} does not end in a file name", to.display())))?;
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // O_DIRECTORY: a FIFO named as the parent is refused at once, not
    // waited on for a writer.
    let pfd = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(&parent).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ENOTDIR) => KnibError::invalid(format!("{} is not a directory", parent.display())),
                _ => KnibError::io("cannot open the directory", &parent, e),
            }
        })?
    };
    if !pfd.metadata().map_err(|e| KnibError::io("cannot stat", &parent, e))?.is_dir() {
        return Err(KnibError::invalid(format!("{} is not a directory", parent.display())));
    }
    let mut path = path.to_vec();
    let base = path.len();
    let mut walk = Walk {
        fs,
        ctl,
        step: format!("extract {request}"),
        counting: true,
        total: 0,
        summary: GetSummary::default(),
        written: 0,
        dirs_seen: 0,
        entries: 0,
        held: 0,
        held_bytes: 0,
        buf: Vec::new(),
        last_report: 0,
        to: to.to_path_buf(),
        base,
    };
    match node.kind {
        Kind::Dir => {
            walk.tree(&mut path, node, None)?;
        }
        Kind::File => {
            walk.count(&path, node.size)?;
            walk.fs.check_readable(&path, node)?;
        }
        Kind::Symlink | Kind::Other => {
            return Err(KnibError::invalid(format!("{request} is not a file or a directory: nothing to extract")));
        }
    }
    walk.counting = false;
    walk.summary = GetSummary::default();
    walk.dirs_seen = 0;
    walk.held = 0;
    walk.held_bytes = 0;
    walk.buf = vec![0u8; CHUNK];
    walk.report(true);

    // The temporary entry: a name already taken (a leftover, or anyone
    // else's) is left alone and the next one drawn; only what is made here
    // is ever removed.
    let dir = node.kind == Kind::Dir;
    let mut tries = 0;
    let (tmp_c, tmp_path, file) = loop {
        let tmp = temp_name(name);
        let tmp_c = cstr(&tmp, to)?;
        let tmp_path = parent.join(OsStr::from_bytes(&tmp));
        let made = if dir { mkdir_at(&pfd, &tmp_c).map(|()| None) } else { create_at(&pfd, &tmp_c).map(Some) };
        match made {
            Ok(file) => break (tmp_c, tmp_path, file),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries + 1 < TEMP_TRIES => tries += 1,
            Err(e) => {
                let what = if dir { "cannot create directory" } else { "cannot create" };
                return Err(KnibError::io(what, &tmp_path, e));
            }
        }
    };
    // Removed on any way out (a panic of a reader too) until it is renamed
    // into place; never after (its name may be someone else's by then).
    let mut unmade = Unmade { dir: &pfd, name: &tmp_c, armed: true };
    let result = (|| {
        match file {
            None => {
                let d = open_dir_at(&pfd, &tmp_c, &tmp_path)?;
                let d = walk.tree(&mut path, node, Some(d))?.expect("the top directory comes back open");
                finish(&d, node, to)?;
                walk.summary.dirs += 1;
            }
            Some(f) => {
                walk.copy(&path, node, &f, to)?;
                finish(&f, node, to)?;
                walk.summary.files += 1;
            }
        }
        ctl.check(&format!("renaming {} into place", to.display()))?;
        // SAFETY: a valid descriptor.
        if unsafe { libc::syncfs(pfd.as_raw_fd()) } != 0 {
            return Err(os_err("cannot sync the filesystem of", &parent));
        }
        let to_c = cstr(name.as_bytes(), to)?;
        // Where `to` was hard-linked and its temporary name could not be
        // removed (an error), that name is removed by `unmade`: still
        // knib's own.
        place_noreplace(pfd.as_fd(), &tmp_c, &tmp_path, pfd.as_fd(), &to_c, to, dir)?;
        unmade.armed = false;
        pfd.sync_all().map_err(|e| KnibError::io("cannot fsync directory", &parent, e))?;
        Ok(())
    })();
    drop(unmade);
    result?;
    walk.report(true);
    Ok(walk.summary)
}

/// Put the entry made at `from` (in directory `from_dir`; `from_path` in
/// messages), a directory if `dir`, at `to` (in `to_dir`; `to_path`),
/// never replacing what appeared there: `renameat2(RENAME_NOREPLACE)`.
/// Where the file system takes no rename flags (NFS, CIFS, many FUSE file
/// systems), a file (or a symlink) is hard-linked to `to` (refused when an
/// entry is there) and its name `from` removed, and a directory (which
/// cannot be linked), or a file where the file system makes no hard links,
/// is renamed by a plain `renameat` once `fstatat` found nothing at `to`.
/// That plain rename's window, between the check and the rename: it
/// replaces what appears at `to` meanwhile if it may, an EMPTY directory
/// (for a directory) or a file, symlink or other non-directory (for a
/// file); anything else is refused by the rename itself. Relative to the
/// descriptors: no name is resolved again. The fallback taken is logged.
///
/// An entry at `to` is InvalidInput, "appeared while extracting", and
/// `from` is left as it was. After the hard link, a failure to remove
/// `from` is an error too: `to` is the entry made, and `from` a second
/// name of it left to the caller to remove. Not durable: the caller syncs
/// `to_dir`. Shared with the guestfish fallback, which puts its tree in
/// place with it.
pub(super) fn place_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    from_path: &Path,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    to_path: &Path,
    dir: bool,
) -> Result<()> {
    let unflagged = if dir { Unflagged::CheckedRename } else { Unflagged::LinkOrCheckedRename };
    match fsio::rename_noreplace_at(from_dir, from, to_dir, to, unflagged) {
        Ok(Placed::Renamed) => {}
        Ok(Placed::Linked) => log::info!(
            "{}: its file system takes no rename flags: hard-linked in place, then its temporary name removed",
            to_path.display()
        ),
        Ok(Placed::CheckedRename) => log::info!(
            "{}: its file system takes no rename flags{}: renamed in place after checking nothing was there",
            to_path.display(),
            if dir { "" } else { " nor hard links" }
        ),
        Err(NoReplaceError::Exists) => {
            return Err(KnibError::invalid(format!(
                "{} appeared while extracting; nothing was replaced",
                to_path.display()
            )))
        }
        Err(NoReplaceError::Rename(e)) => {
            return Err(KnibError::io(&format!("cannot rename {} to", from_path.display()), to_path, e))
        }
        Err(NoReplaceError::RemoveOld(e)) => {
            return Err(KnibError::io(
                &format!("{} was written, but cannot remove its temporary name", to_path.display()),
                from_path,
                e,
            ))
        }
    }
    Ok(())
}

/// The temporary entry of an extraction, removed when dropped while
/// `armed`.
struct Unmade<'a> {
    dir: &'a File,
    name: &'a CStr,
    armed: bool,
}

impl Drop for Unmade<'_> {
    fn drop(&mut self) {
        if self.armed {
            remove_tree_at(self.dir, self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emptying a directory never changes what a link in its place leads
    /// to (one swapped in between the listing and the opening): it is
    /// refused, and the directory it leads to keeps its mode and content.
    /// Before, the directory was made writable by its name first, following
    /// the link (run as root: any directory of the host made 0700).
    #[test]
    fn a_link_in_place_of_a_directory_being_emptied_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("sub")).unwrap();
        let at = File::open(d.path()).unwrap();
        assert!(open_level(&at, c"sub").is_err());
        let mode = std::fs::metadata(outside.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert!(outside.path().join("keep").exists());
        // A real directory is emptied as before, whatever its mode.
        let sub = d.path().join("real");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("f"), b"x").unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o500)).unwrap();
        let l = open_level(&at, c"real").unwrap();
        assert!(l.subdirs.is_empty() && !sub.join("f").exists());
    }

    /// Directories one inside the other that share one long listing (a
    /// crafted FAT, ext4 or NTFS image: each directory's chain joins the
    /// same run of entries) are refused once the listings held at once
    /// pass what the filesystem can hold, before memory grows with the
    /// depth. Before, only the entries visited were counted: the walk went
    /// down the first subdirectory of each level, holding every level's
    /// listing, to the depth limit (here about 200 MB; gigabytes from a
    /// 3 MB image with the listings a FAT can share).
    #[test]
    fn listings_shared_by_nested_directories_are_bounded() {
        let e = shared_listings(Shared { capacity: 1 << 20, name: 1 });
        assert!(
            e.message.starts_with("extract / holds more than 32768 entries listed at once (at /0/0/0/0/0/0/0/0/0/0/0/0/0/0/0/0), more than its filesystem of 1048576 bytes"),
            "{e}"
        );
    }

    /// The same on a large filesystem (here 1 TiB, whose capacity allows
    /// billions of entries), with long names: refused once the listings
    /// held take more than [`MAX_HELD_BYTES`] (before, bounded by the
    /// capacity alone, a crafted image of a few MB on a large partition
    /// made the walk take gigabytes).
    #[test]
    fn listings_shared_by_nested_directories_take_bounded_memory_on_a_large_filesystem() {
        let e = shared_listings(Shared { capacity: 1 << 40, name: 200 });
        let want = format!(
            "extract / holds listings of more than {} at once (at /0/0/0/0/0/0/0/0/0/0/0/0/0",
            crate::fsio::human_bytes(MAX_HELD_BYTES)
        );
        assert!(e.message.starts_with(&want) && e.message.contains("entries), more than knib holds"), "{e}");
    }

    /// Directories one inside the other that share one listing of 2,000
    /// entries with names of `name` bytes (and one subdirectory, met
    /// first), on a filesystem of `capacity` bytes.
    struct Shared {
        capacity: u64,
        name: usize,
    }

    /// The error of extracting the root of `fs`; nothing is left.
    fn shared_listings(mut fs: Shared) -> KnibError {
        let d = tempfile::tempdir().unwrap();
        let root = fs.root().unwrap();
        let e = extract(&mut fs, &[], &root, &d.path().join("out"), "/", &Control::new()).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Corrupt, "{e}");
        assert!(std::fs::read_dir(d.path()).unwrap().next().is_none(), "nothing is left");
        e
    }

    mod shared {
        use super::super::*;
        use super::Shared;
        fn node(kind: Kind, id: Option<u64>) -> Node {
            Node { kind, size: 0, mode: 0o755, mtime: 0, mtime_nsec: 0, id, handle: id.unwrap_or(0) }
        }
        impl Filesystem for Shared {
            fn root(&mut self) -> Result<Node> {
                Ok(node(Kind::Dir, Some(1)))
            }
            fn read_dir(&mut self, _: &FsPath, dir: &Node) -> Result<Vec<Entry>> {
                // One subdirectory ("0", met first), then the shared run.
                let mut v = vec![Entry { name: b"0".to_vec(), node: node(Kind::Dir, Some(dir.handle + 1)) }];
                v.extend((0..2000).map(|i| Entry {
                    name: format!("f{i:0>w$}", w = self.name).into_bytes(),
                    node: node(Kind::File, None),
                }));
                Ok(v)
            }
            fn read_link(&mut self, _: &FsPath, _: &Node) -> Result<Vec<u8>> {
                Ok(Vec::new())
            }
            fn open<'a>(&'a mut self, _: &FsPath, _: &Node) -> Result<Box<dyn FileRead + 'a>> {
                Err(KnibError::internal("not read"))
            }
            fn label(&mut self) -> Option<String> {
                None
            }
            fn max_dirs(&self) -> u64 {
                1 << 20
            }
            fn capacity(&self) -> u64 {
                self.capacity
            }
            fn min_entry_bytes(&self) -> u64 {
                32
            }
        }
    }

    /// A reader that panics (a bug) leaves no temporary entry behind: it is
    /// removed as the panic unwinds (before, only an error removed it).
    #[test]
    fn a_reader_panic_leaves_nothing_behind() {
        struct Panics;
        struct Read;
        impl FileRead for Read {
            fn read(&mut self, _: &mut [u8]) -> Result<usize> {
                panic!("a reader's bug");
            }
        }
        fn node(kind: Kind, size: u64) -> Node {
            Node { kind, size, mode: 0o644, mtime: 0, mtime_nsec: 0, id: None, handle: 0 }
        }
        impl Filesystem for Panics {
            fn root(&mut self) -> Result<Node> {
                Ok(node(Kind::Dir, 0))
            }
            fn read_dir(&mut self, _: &FsPath, _: &Node) -> Result<Vec<Entry>> {
                Ok(vec![Entry { name: b"f".to_vec(), node: node(Kind::File, 10) }])
            }
            fn read_link(&mut self, _: &FsPath, _: &Node) -> Result<Vec<u8>> {
                Ok(Vec::new())
            }
            fn open<'a>(&'a mut self, _: &FsPath, _: &Node) -> Result<Box<dyn FileRead + 'a>> {
                Ok(Box::new(Read))
            }
            fn label(&mut self) -> Option<String> {
                None
            }
            fn max_dirs(&self) -> u64 {
                16
            }
            fn capacity(&self) -> u64 {
                1 << 20
            }
            fn min_entry_bytes(&self) -> u64 {
                32
            }
        }
        let d = tempfile::tempdir().unwrap();
        let to = d.path().join("out");
        let r = std::panic::catch_unwind(|| {
            let mut fs = Panics;
            let root = fs.root().unwrap();
            extract(&mut fs, &[], &root, &to, "/", &Control::new())
        });
        assert!(r.is_err(), "the reader panicked");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A destination name near the 255-byte limit gets a temporary name
    /// that fits (before, the added bytes made it too long to create).
    #[test]
    fn a_long_destination_name_gets_a_temporary_name_that_fits() {
        let name = "n".repeat(255);
        let t = temp_name(OsStr::new(&name));
        assert!(t.len() <= 255 && t.starts_with(b".nnn") && t.ends_with(b".part"), "{}", t.len());
        // Not cut inside a character: 199 bytes of 'a', then 'é' (2 bytes).
        let name = format!("{}é{}", "a".repeat(199), "b".repeat(40));
        let t = temp_name(OsStr::new(&name));
        assert!(std::str::from_utf8(&t).is_ok() && t.starts_with(format!(".{}.knib-", "a".repeat(199)).as_bytes()));
    }
}

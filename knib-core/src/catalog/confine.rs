//! Paths inside a store, confined by the kernel.
//!
//! Everything under a store's root is untrusted: a `vms/<vm>` directory, a
//! backup's directory or a volume file may have been replaced by a symbolic
//! link to somewhere else, and knib must then neither read nor write through
//! it. Every store path knib opens, reads or creates is resolved here from
//! the root with `openat2(2)` and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`: the kernel refuses an absolute path, a `..` that
//! would climb out, and any symbolic link on the way (even one that stays
//! inside: knib never makes links in a store, so one is tampering). A string
//! check could not do that: a link is only seen by resolving it.
//!
//! The store's root itself is the operator's choice and may be reached
//! through links; only what is below it is confined.
//!
//! # Invariants
//!
//! - [`open`], [`read`] and [`ensure_dir`] never follow a symbolic link below
//!   the root; a link, or a path that would leave the root, is
//!   [`crate::ErrorKind::Corrupt`] naming the path.
//! - Directories [`ensure_dir`] creates are made one component at a time,
//!   each inside a directory already opened without following links.
//! - Files are checked for their type: a directory where a file is expected
//!   (or the reverse) is `corrupt`, and so is a FIFO, a socket or a device.
//!   A file is opened with `O_NONBLOCK`, so a FIFO planted in its place
//!   cannot make the open wait (forever, holding a VM's lock) for a writer.
//! - [`read`] reads at most [`MAX_STORE_JSON`] bytes: a larger file (a
//!   sparse file of 100 GiB put in place of a manifest) is `corrupt`, not
//!   read into memory.
//!
//! The check is made when a path is opened. Tools that take a path (qemu-img,
//! the qcow2 reader) open it again afterwards, so someone who can rewrite the
//! store *while* knib works on it could still swap a checked directory for a
//! link in between; the guarantee is about a store tampered with at rest.
//!
//! # Why `rustix` and not `cap-std`
//!
//! `rustix` is already in the build (through `tempfile`), exposes
//! `openat2` with its resolve flags directly, and knib only needs a handful
//! of calls (open beneath, mkdir beneath). `cap-std` would do the same with
//! a dozen more crates and an `ambient-authority` model the rest of knib
//! (which hands paths to qemu-img) cannot use anyway. `openat2` needs Linux
//! 5.6; where it is missing (an older kernel, or Valgrind, which does not
//! pass it through) each path is walked one component at a time with
//! `openat(O_NOFOLLOW)` ([`beneath`]), which refuses the same paths.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::error::{KnibError, Result};

/// What a confined path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// A real directory.
    Dir,
    /// A regular file.
    File,
}

/// The most bytes a JSON file of a store may have (a manifest, a journal,
/// a job file, `knib.json`: [`read`], [`read_capped`]). knib writes such
/// files of a few KiB (a manifest with hundreds of volumes stays far below
/// 1 MiB, the vault's cap on manifests); a larger one was not written by
/// knib and is refused before it is read into memory.
pub(crate) const MAX_STORE_JSON: u64 = 16 << 20;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| KnibError::io("cannot open store", root, e.into()))
}

/// The error for `errno` met while resolving `rel` below `root`.
fn refusal(root: &Path, rel: &Path, what: &str, errno: Errno) -> KnibError {
    let full = root.join(rel);
    match errno {
        Errno::LOOP => KnibError::corrupt(format!(
            "{what} {} is, or passes through, a symbolic link: knib follows no link inside a store",
            full.display()
        )),
        Errno::XDEV => KnibError::corrupt(format!("{what} {} leaves the store {}", full.display(), root.display())),
        Errno::NOTDIR => {
            KnibError::corrupt(format!("{what} {}: a part of the path is not a directory", full.display()))
        }
        e => KnibError::io(&format!("cannot open {what}"), &full, e.into()),
    }
}

/// Whether `openat2` is missing (an old kernel, or a tool like Valgrind
/// that does not pass it through): then [`beneath`] walks the path itself.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Open `rel` (a plain path: checked by [`plain`]) below `dir` with
/// `flags`, following no symbolic link. With `openat2` the kernel resolves
/// it (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`); without it, one component
/// at a time with `openat(O_NOFOLLOW)`, each directory opened from the one
/// before: as strict, since `rel` has no `..` and no root, and a link met
/// on the way fails with `ELOOP` (or `ENOTDIR`).
fn beneath(dir: &OwnedFd, rel: &Path, flags: OFlags) -> std::result::Result<OwnedFd, Errno> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match rustix::fs::openat2(dir, rel, flags, Mode::empty(), RESOLVE) {
            Err(Errno::NOSYS) => {
                log::debug!("openat2 is not available: store paths are resolved one component at a time");
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    let parts: Vec<_> = rel.components().collect();
    let mut cur: Option<OwnedFd> = None;
    for (i, c) in parts.iter().enumerate() {
        let at = cur.as_ref().unwrap_or(dir);
        let f = if i + 1 == parts.len() {
            flags | OFlags::NOFOLLOW
        } else {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        };
        let fd = rustix::fs::openat(at, c.as_os_str(), f, Mode::empty())?;
        cur = Some(fd);
    }
    cur.ok_or(Errno::INVAL)
}

/// Check that `rel` is a plain relative path (no root, no `.`, no `..`).
fn plain(root: &Path, rel: &Path, what: &str) -> Result<()> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(KnibError::corrupt(format!(
            "{what} {:?} is not a plain path inside the store {}",
            rel,
            root.display()
        )));
    }
    Ok(())
}

/// Open `root/rel` for reading (a directory: as a handle), refusing any
/// symbolic link below `root` and a path that leaves it; it must be `want`.
/// `what` names the file in errors ("manifest", "backup directory").
///
/// A file is opened with `O_NONBLOCK` (a FIFO then opens at once instead of
/// waiting for a writer, and is refused as not a regular file); the flag is
/// cleared again on the regular file returned.
pub(crate) fn open(root: &Path, rel: &Path, want: Want, what: &str) -> Result<File> {
    plain(root, rel, what)?;
    let dir = open_root(root)?;
    let flags = match want {
        Want::Dir => OFlags::PATH | OFlags::DIRECTORY,
        Want::File => OFlags::RDONLY | OFlags::NONBLOCK,
    } | OFlags::CLOEXEC
        | OFlags::NOFOLLOW;
    let fd = beneath(&dir, rel, flags).map_err(|e| refusal(root, rel, what, e))?;
    let f = File::from(fd);
    let ft = f.metadata().map_err(|e| KnibError::io("cannot stat", &root.join(rel), e))?.file_type();
    match want {
        Want::File if !ft.is_file() => {
            Err(KnibError::corrupt(format!("{what} {} is not a regular file", root.join(rel).display())))
        }
        Want::File => {
            let fl =
                rustix::fs::fcntl_getfl(&f).map_err(|e| KnibError::io("cannot open", &root.join(rel), e.into()))?;
            rustix::fs::fcntl_setfl(&f, fl.difference(OFlags::NONBLOCK))
                .map_err(|e| KnibError::io("cannot open", &root.join(rel), e.into()))?;
            Ok(f)
        }
        Want::Dir => Ok(f),
    }
}

/// Check that `root/rel` exists and is `want`, without following links.
pub(crate) fn check(root: &Path, rel: &Path, want: Want, what: &str) -> Result<()> {
    open(root, rel, want, what).map(drop)
}

/// The bytes of file `root/rel`, or `None` when it does not exist; a link
/// or a path out of the store is `corrupt`.
pub(crate) fn read(root: &Path, rel: &Path, what: &str) -> Result<Option<Vec<u8>>> {
    let f = match open(root, rel, Want::File, what) {
        Ok(f) => f,
        Err(e) if e.kind == crate::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    read_capped(&f, &root.join(rel), what).map(Some)
}

/// The bytes of `f`, the regular file `path` (already opened and checked),
/// refusing one of more than [`MAX_STORE_JSON`] bytes as `corrupt`: its size
/// is checked before reading, and no more than one byte past the cap is
/// read (a file that grows meanwhile is refused all the same).
pub(crate) fn read_capped(f: &File, path: &Path, what: &str) -> Result<Vec<u8>> {
    let too_large = || {
        KnibError::corrupt(format!(
            "{what} {} is larger than {MAX_STORE_JSON} bytes, the most a JSON file of a store may have",
            path.display()
        ))
    };
    let len = f.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?.len();
    if len > MAX_STORE_JSON {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(MAX_STORE_JSON + 1)
        .read_to_end(&mut out)
        .map_err(|e| KnibError::io(&format!("cannot read {what}"), path, e))?;
    if out.len() as u64 > MAX_STORE_JSON {
        return Err(too_large());
    }
    Ok(out)
}

/// Make sure `root/rel` is a real directory, creating what is missing one
/// component at a time, each inside a directory opened without following
/// links.
pub(crate) fn ensure_dir(root: &Path, rel: &Path, what: &str) -> Result<()> {
    plain(root, rel, what)?;
    let mut dir = open_root(root)?;
    let mut done = std::path::PathBuf::new();
    for c in rel.components() {
        done.push(c);
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let next = match beneath(&dir, Path::new(c.as_os_str()), flags) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                    // The new entry made durable in its parent.
                    Ok(()) => crate::fsio::sync_dir(&root.join(done.parent().unwrap_or(Path::new(""))))?,
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(KnibError::io("cannot create", &root.join(&done), e.into())),
                }
                beneath(&dir, Path::new(c.as_os_str()), flags)
            }
            r => r,
        };
        dir = next.map_err(|e| refusal(root, &done, what, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_and_escapes_are_refused_and_nothing_is_made_outside() {
        refuses_links_and_escapes();
    }

    #[test]
    fn without_openat2_the_component_walk_refuses_the_same_paths() {
        // Process-wide: the other tests of this binary may then walk too,
        // which is correct either way.
        NO_OPENAT2.store(true, Ordering::Relaxed);
        refuses_links_and_escapes();
    }

    fn refuses_links_and_escapes() {
        let d = tempfile::tempdir().unwrap();
        let (root, out) = (d.path().join("store"), d.path().join("outside"));
        std::fs::create_dir_all(root.join("vms")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("f"), b"secret").unwrap();
        symlink(&out, root.join("vms/evil")).unwrap();
        symlink("../outside/f", root.join("link")).unwrap();
        symlink("vms", root.join("inner")).unwrap();
        for (rel, want) in [
            ("vms/evil", Want::Dir),
            ("vms/evil/f", Want::File),
            ("link", Want::File),
            ("inner", Want::Dir),
            ("../outside/f", Want::File),
        ] {
            let e = open(&root, Path::new(rel), want, "test path").unwrap_err();
            assert_eq!(e.kind, ErrorKind::Corrupt, "{rel}: {e}");
            assert!(e.message.starts_with("test path "), "{e}");
        }
        let e = open(&root, &out.join("f"), Want::File, "x").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        for rel in ["vms/evil/new", "inner/new"] {
            assert_eq!(ensure_dir(&root, Path::new(rel), "dir").unwrap_err().kind, ErrorKind::Corrupt);
        }
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        assert_eq!(read(&root, Path::new("vms/none"), "x").unwrap(), None);
        ensure_dir(&root, Path::new("vms/a/b"), "dir").unwrap();
        assert!(root.join("vms/a/b").is_dir());
        std::fs::write(root.join("vms/a/file"), b"1").unwrap();
        assert_eq!(open(&root, Path::new("vms/a"), Want::File, "x").unwrap_err().kind, ErrorKind::Corrupt);
        assert_eq!(ensure_dir(&root, Path::new("vms/a/file"), "x").unwrap_err().kind, ErrorKind::Corrupt);
        assert_eq!(read(&root, Path::new("vms/a/file"), "x").unwrap().unwrap(), b"1");
    }

    /// Run `f` in a thread; panic if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the read hung (a FIFO opened without O_NONBLOCK?)")
    }

    #[test]
    fn a_fifo_in_place_of_a_store_file_is_refused_at_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        std::fs::create_dir_all(root.join("vms/vm1/20260101-000000000-0000")).unwrap();
        for (rel, what) in [
            ("vms/vm1/20260101-000000000-0000/manifest.json", "manifest"),
            ("vms/vm1/journal.json", "journal"),
            ("knib.json", "settings"),
        ] {
            nix::unistd::mkfifo(&root.join(rel), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            let r2 = root.clone();
            let e = within_10s(move || read(&r2, Path::new(rel), what)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Corrupt, "{rel}: {e}");
            assert_eq!(e.message, format!("{what} {} is not a regular file", root.join(rel).display()));
            let r2 = root.clone();
            let e = within_10s(move || check(&r2, Path::new(rel), Want::File, what)).unwrap_err();
            assert_eq!(e.message, format!("{what} {} is not a regular file", root.join(rel).display()));
        }
    }

    #[test]
    fn a_regular_file_is_returned_blocking() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let f = open(d.path(), Path::new("f"), Want::File, "file").unwrap();
        assert!(!rustix::fs::fcntl_getfl(&f).unwrap().contains(OFlags::NONBLOCK));
    }

    #[test]
    fn a_store_file_larger_than_the_cap_is_refused_unread() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("vms/vm1/20260101-000000000-0000")).unwrap();
        let rel = "vms/vm1/20260101-000000000-0000/manifest.json";
        // Sparse: 100 GiB that take no room, and would exhaust memory if read.
        std::fs::File::create(root.join(rel)).unwrap().set_len(100 << 30).unwrap();
        let e = read(root, Path::new(rel), "manifest").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert_eq!(
            e.message,
            format!(
                "manifest {} is larger than 16777216 bytes, the most a JSON file of a store may have",
                root.join(rel).display()
            )
        );
        // One byte past the cap is refused; the cap itself is read.
        std::fs::File::create(root.join("knib.json")).unwrap().set_len(MAX_STORE_JSON + 1).unwrap();
        let e = read(root, Path::new("knib.json"), "settings").unwrap_err();
        assert!(e.message.starts_with(&format!("settings {} is larger than", root.join("knib.json").display())));
        std::fs::File::create(root.join("knib.json")).unwrap().set_len(MAX_STORE_JSON).unwrap();
        assert_eq!(read(root, Path::new("knib.json"), "settings").unwrap().unwrap().len() as u64, MAX_STORE_JSON);
    }

    #[test]
    fn no_more_than_one_byte_past_the_cap_is_read_when_the_size_said_less() {
        // A pipe says it is 0 bytes long, as a file that grows after its
        // size was checked would: the read stops one byte past the cap.
        use std::io::Write;
        let (r, mut w) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b' '; 1 << 20];
            let mut sent = 0u64;
            while sent <= MAX_STORE_JSON + (4 << 20) {
                if w.write_all(&chunk).is_err() {
                    break; // the reader stopped and closed its end
                }
                sent += chunk.len() as u64;
            }
        });
        let f = File::from(OwnedFd::from(r));
        let p = Path::new("/store/jobs/x.json");
        let e = within_10s(move || read_capped(&f, p, "job file")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert_eq!(
            e.message,
            "job file /store/jobs/x.json is larger than 16777216 bytes, the most a JSON file of a store may have"
        );
        writer.join().unwrap();
    }
}

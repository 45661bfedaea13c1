//! File-level restore to a destination whose file system takes no rename
//! flags (NFS, CIFS, many FUSE file systems answer
//! `renameat2(RENAME_NOREPLACE)` with EINVAL): here a real one, a FUSE
//! `bindfs` view of a temporary directory. Needs root, /dev/fuse and
//! bindfs (Debian package `bindfs`, installed by scripts/setup.sh); skipped
//! (it says so) without root or /dev/fuse.

#[path = "common/fsimage.rs"]
mod fsimage;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fsimage::*;
use knib_core::files::{Disk, GetSummary};
use knib_core::{Control, ErrorKind};

/// Whether FUSE mounts can be made here: root and /dev/fuse.
fn fuse_usable() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: not root (a bindfs FUSE mount needs root here)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: /dev/fuse is missing (no FUSE: the bindfs mount cannot be made)");
        return false;
    }
    true
}

/// A bindfs mount, unmounted when dropped (a failing test's too).
struct Bindfs {
    at: PathBuf,
}

impl Bindfs {
    /// Mount a bindfs view of directory `src` at `at` (an empty directory),
    /// and check that it refuses rename flags, as NFS does: what these
    /// tests are about.
    fn mount(src: &Path, at: &Path) -> Bindfs {
        let out = Command::new("bindfs").arg(src).arg(at).output().unwrap_or_else(|e| {
            panic!("bindfs does not run ({e}): install the Debian package bindfs (scripts/setup.sh does)")
        });
        assert!(
            out.status.success(),
            "bindfs {} {} failed: {}",
            src.display(),
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let m = Bindfs { at: at.to_path_buf() };
        let (a, b) = (at.join(".probe-a"), at.join(".probe-b"));
        std::fs::write(&a, b"probe").unwrap();
        let r = rustix::fs::renameat_with(rustix::fs::CWD, &a, rustix::fs::CWD, &b, rustix::fs::RenameFlags::NOREPLACE);
        assert_eq!(
            r,
            Err(rustix::io::Errno::INVAL),
            "bindfs no longer refuses RENAME_NOREPLACE: this test tests nothing"
        );
        std::fs::remove_file(&a).unwrap();
        m
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let ok = Command::new("fusermount").arg("-u").arg(&self.at).status().is_ok_and(|s| s.success());
        if !ok {
            // Busy (a file left open by a failed assertion): detached now,
            // unmounted once it is closed.
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// The known tree (no big file, with symlinks) in `w/src`, and the disk
/// image (an ext4 filesystem holding it, in qcow2) opened.
fn known_disk(w: &Path) -> (PathBuf, Disk) {
    let src = w.join("src");
    write_tree(&src, TreeOptions { big: false, symlinks: true });
    let img = w.join("ext.img");
    mkfs_ext4(&src, &img, 32);
    let qcow2 = w.join("ext.qcow2");
    to_qcow2(&img, &qcow2);
    let disk = Disk::open_image(&qcow2, &Control::new()).unwrap();
    (src, disk)
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Assert that `got` (extracted onto the bindfs mount) holds what `want`
/// (the source) holds: the same entries, kinds, bytes, symlink targets and
/// modes. Not mtimes: bindfs 1.14 (libfuse 2) ignores a `futimens` that
/// sets the mtime alone (the access time `UTIME_OMIT`, as knib sets it) and
/// leaves the time of the change (`touch -m -d @0 x` does the same there).
fn assert_same_content(want: &Path, got: &Path) {
    let (w, mut g) = (walk(want), walk(got));
    g.retain(|p, _| !p.starts_with("lost+found"));
    assert_eq!(
        w.keys().collect::<Vec<_>>(),
        g.keys().collect::<Vec<_>>(),
        "entries of {} and {}",
        want.display(),
        got.display()
    );
    for (rel, wm) in &w {
        let gm = &g[rel];
        assert_eq!(wm.file_type(), gm.file_type(), "{}: kind", rel.display());
        if wm.file_type().is_symlink() {
            let t = |p: &Path| std::fs::read_link(p.join(rel)).unwrap();
            assert_eq!(t(want), t(got), "{}: target", rel.display());
        } else {
            assert_eq!(wm.mode() & 0o7777, gm.mode() & 0o7777, "{}: mode", rel.display());
        }
        if wm.is_file() {
            assert!(same_bytes(&want.join(rel), &got.join(rel)), "{}: bytes differ", rel.display());
        }
    }
}

/// A file and a directory tree extracted onto the bindfs mount: the bytes
/// and modes put in the image, and no temporary left. Before, both
/// failed after the whole file or tree was written ("cannot rename ...:
/// Invalid argument"), and the temporary was removed.
#[test]
fn a_file_and_a_tree_are_extracted_where_renames_take_no_flags() {
    if !fuse_usable() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let (src, disk) = known_disk(w);
    let (back, mnt) = (w.join("back"), w.join("mnt"));
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let _mount = Bindfs::mount(&back, &mnt);

    let file = mnt.join("unicode.txt");
    let s = disk.get(None, "/ünïcødé-файл.txt", &file, &Control::new()).unwrap();
    assert_eq!((s.files, s.dirs, s.bytes), (1, 0, 777));
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(src.join("ünïcødé-файл.txt")).unwrap());
    assert_eq!(std::fs::read(back.join("unicode.txt")).unwrap(), std::fs::read(&file).unwrap());

    let tree = mnt.join("docs");
    let s = disk.get(None, "/docs", &tree, &Control::new()).unwrap();
    assert_eq!((s.files, s.dirs), (300, 26));
    assert_same_content(&src.join("docs"), &tree);
    // The whole root, symlinks included.
    let root = mnt.join("root");
    disk.get(None, "/", &root, &Control::new()).unwrap();
    assert_same_content(&src, &root);

    assert_eq!(names_in(&mnt), ["docs", "root", "unicode.txt"]);
}

/// Extract `path` of `disk` to `to`, holding the extraction at the pause
/// point whose name contains `at` while `meanwhile` runs; it must pause
/// there (the fallback taken).
fn get_with(
    disk: &Disk,
    path: &str,
    to: &Path,
    at: &str,
    meanwhile: impl FnOnce() + Send,
) -> knib_core::Result<GetSummary> {
    knib_core::crashpoint::pause_before(at, Duration::from_secs(120));
    let done = AtomicBool::new(false);
    let (got, began) = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            // Until the pause begins, or the extraction ends without it.
            let until = Instant::now() + Duration::from_secs(60);
            let mut began = false;
            while !began && !done.load(Ordering::SeqCst) && Instant::now() < until {
                began = knib_core::crashpoint::wait_for_pause(at, Duration::from_millis(50));
            }
            if began {
                meanwhile();
            }
            knib_core::crashpoint::release_pause(at);
            began
        });
        let got = disk.get(None, path, to, &Control::new());
        done.store(true, Ordering::SeqCst);
        (got, waiter.join().expect("the waiter does not panic"))
    });
    assert!(began, "the extraction never paused at {at:?} (the fallback was not taken): {got:?}");
    got
}

/// Whether `e` is the "appeared" InvalidInput error for `to`.
fn assert_appeared(e: &knib_core::KnibError, to: &Path) {
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let want = format!(": {} appeared while extracting; nothing was replaced", to.display());
    assert!(e.message.ends_with(&want), "{e}");
}

/// What appears at the destination once `renameat2` has refused its flags
/// on the bindfs mount (before the fallback's link or check) is never
/// replaced: a file (the hard link is refused), an empty directory (found
/// by the check before the directory's plain rename); the error is the
/// "appeared" InvalidInput one and the temporary is removed. Before, the
/// extraction failed there with "cannot rename ...: Invalid argument".
/// (A destination there already when `renameat2` is called is refused by
/// the kernel itself, EEXIST, on any file system: not a test of the
/// fallback.)
#[test]
fn what_appears_at_the_destination_on_such_a_mount_is_not_replaced() {
    if !fuse_usable() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let (src, disk) = known_disk(w);
    let (back, mnt) = (w.join("back"), w.join("mnt"));
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let _mount = Bindfs::mount(&back, &mnt);

    let to = mnt.join("appearing-file.txt");
    let at = "renaming to appearing-file.txt without rename flags";
    let e = get_with(&disk, "/with space.txt", &to, at, || std::fs::write(&to, b"theirs").unwrap()).unwrap_err();
    assert_appeared(&e, &to);
    assert_eq!(std::fs::read(&to).unwrap(), b"theirs");
    assert_eq!(std::fs::metadata(&to).unwrap().nlink(), 1);

    let to = mnt.join("appearing-dir");
    let at = "renaming to appearing-dir without rename flags";
    let e = get_with(&disk, "/docs/d1", &to, at, || std::fs::create_dir(&to).unwrap()).unwrap_err();
    assert_appeared(&e, &to);
    assert!(to.is_dir() && names_in(&to).is_empty());

    // Between the check and the plain rename of a directory: a directory
    // with anything in it (or a file) is refused by the rename itself...
    let to = mnt.join("window-full");
    let at = "nothing at window-full: a plain rename to it";
    let e = get_with(&disk, "/docs/d1", &to, at, || {
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("keep"), b"theirs").unwrap();
    })
    .unwrap_err();
    assert_appeared(&e, &to);
    assert_eq!(names_in(&to), ["keep"]);
    let to = mnt.join("window-file");
    let at = "nothing at window-file: a plain rename to it";
    let e = get_with(&disk, "/docs/d1", &to, at, || std::fs::write(&to, b"theirs").unwrap()).unwrap_err();
    assert_appeared(&e, &to);
    assert_eq!(std::fs::read(&to).unwrap(), b"theirs");
    // ... and an empty directory is replaced: the window the module's
    // documentation names (nothing in it is lost).
    let to = mnt.join("window-empty");
    let at = "nothing at window-empty: a plain rename to it";
    get_with(&disk, "/docs/d1", &to, at, || std::fs::create_dir(&to).unwrap()).unwrap();
    assert_same_content(&src.join("docs/d1"), &to);

    assert_eq!(
        names_in(&mnt),
        ["appearing-dir", "appearing-file.txt", "window-empty", "window-file", "window-full"],
        "temporaries left"
    );
}

/// `fsio::rename_noreplace` (whose fallback is a hard link) on the bindfs
/// mount: renames, and refuses to replace an entry that is there.
#[test]
fn rename_noreplace_works_where_renames_take_no_flags() {
    if !fuse_usable() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let (back, mnt) = (w.join("back"), w.join("mnt"));
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let _mount = Bindfs::mount(&back, &mnt);
    let (a, b, c) = (mnt.join("a"), mnt.join("b"), mnt.join("c"));
    std::fs::write(&a, b"mine").unwrap();
    std::fs::write(&b, b"theirs").unwrap();
    let e = knib_core::fsio::rename_noreplace(&a, &b).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(e.message, format!("{} appeared meanwhile; nothing was replaced", b.display()));
    assert_eq!((std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()), (b"mine".to_vec(), b"theirs".to_vec()));
    knib_core::fsio::rename_noreplace(&a, &c).unwrap();
    assert_eq!(std::fs::read(&c).unwrap(), b"mine");
    assert_eq!(names_in(&mnt), ["b", "c"]);
}

//! File-level restore to a destination whose file system takes no rename
//! flags (NFS, CIFS, many FUSE file systems answer
//! `renameat2(RENAME_NOREPLACE)` with EINVAL): here a real one, a FUSE
//! `bindfs` view of a temporary directory. Needs root, /dev/fuse and
//! bindfs (Debian package `bindfs`, installed by scripts/setup.sh); skipped
//! (it says so) without root or /dev/fuse. The guestfish fallback's test
//! is skipped without guestfish too (as in files_guestfish).

#[path = "common/fsimage.rs"]
mod fsimage;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fsimage::*;
use knib_core::files::fallback::find_tool;
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
/// (the source, whose times the image has) holds: the same entries, kinds,
/// bytes, symlink targets, modes and mtimes (`got`'s own too). Before,
/// every mtime there was the time of the extraction: bindfs 1.14 (libfuse
/// 2) ignores a `futimens` that sets the mtime alone (the access time
/// `UTIME_OMIT`), as knib set it (`touch -m -d @0 x` is ignored there too).
fn assert_same_content(want: &Path, got: &Path) {
    assert_same_tree(want, got, &EXT4);
    assert_eq!(mtime_of(want), mtime_of(got), "{}: mtime", got.display());
}

/// The mtime of `p` itself (never followed), with its nanoseconds.
fn mtime_of(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

/// A file and a directory tree extracted onto the bindfs mount: the bytes,
/// modes and mtimes put in the image, and no temporary left. Before, both
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
    assert_eq!(mtime_of(&file), mtime_of(&src.join("ünïcødé-файл.txt")), "the file's mtime");

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
            // (A guestfish appliance, without KVM, takes a while to start.)
            let until = Instant::now() + Duration::from_secs(300);
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

/// An XFS image (which knib does not read natively: the guestfish
/// fallback reads it) made by guestfish in `w`: `/d` holding `plain`
/// ("hello"), `sub/deep` ("deep") and `lnk` (-> `plain`).
fn xfs_disk(w: &Path) -> Disk {
    let image = w.join("xfs.qcow2");
    let st = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("512M").status().unwrap();
    assert!(st.success());
    let script = String::from(
        "run\nmkfs xfs /dev/sda\nmount /dev/sda /\nmkdir /d\nmkdir /d/sub\nwrite /d/plain hello\n\
         write /d/sub/deep deep\nln-s plain /d/lnk\n",
    );
    let file = w.join("make.gf");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("guestfish").arg("-a").arg(&image).arg("-f").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "guestfish: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Disk::open_image(&image, &Control::new()).unwrap()
}

/// Assert that `got` holds what `/d` of [`xfs_disk`] holds. Not mtimes:
/// the tar that guestfish's `copy-out` runs on the host sets the mtime
/// alone (access time `UTIME_OMIT`), which bindfs ignores.
fn assert_xfs_d(got: &Path) {
    assert_eq!(names_in(got), ["lnk", "plain", "sub"]);
    assert_eq!(std::fs::read(got.join("plain")).unwrap(), b"hello");
    assert_eq!(std::fs::read(got.join("sub/deep")).unwrap(), b"deep");
    assert_eq!(std::fs::read_link(got.join("lnk")).unwrap(), Path::new("plain"));
}

/// The guestfish fallback (for file systems the native readers do not
/// read: XFS here) onto the bindfs mount: a directory tree (`/d`, copied
/// out inside the fallback's temporary directory) and the whole root (the
/// temporary directory itself) are put in place, with their bytes and
/// links, by a checked rename; what appears at the destination once
/// `renameat2` refused its flags is not replaced, a file (the hard link is
/// refused) nor an empty directory (found by the check). Before, a tree
/// failed after it was copied out ("cannot rename ...: Operation not
/// permitted": its only fallback was a hard link, which a directory cannot
/// have), and the temporary was removed.
#[test]
fn the_guestfish_fallback_puts_trees_in_place_where_renames_take_no_flags() {
    if !fuse_usable() {
        return;
    }
    if find_tool("guestfish", std::env::var_os("PATH").as_deref()).is_none() {
        eprintln!("SKIPPED the_guestfish_fallback_puts_trees_in_place_where_renames_take_no_flags: no guestfish");
        return;
    }
    // As in files_guestfish: a nested KVM host may refuse the appliance
    // KVM. (Only guestfish reads it; no other test of this binary does.)
    std::env::set_var("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let disk = xfs_disk(w);
    let (back, mnt) = (w.join("back"), w.join("mnt"));
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let _mount = Bindfs::mount(&back, &mnt);

    let tree = mnt.join("d");
    let s = disk.get(None, "/d", &tree, &Control::new()).unwrap();
    assert_eq!((s.files, s.dirs, s.symlinks, s.bytes), (2, 2, 1, 9), "{s:?}");
    assert_xfs_d(&tree);
    let root = mnt.join("root");
    disk.get(None, "/", &root, &Control::new()).unwrap();
    assert_eq!(names_in(&root), ["d"]);
    assert_xfs_d(&root.join("d"));

    // Names of their own: a pause point is matched by a part of its
    // name, and the other tests of this binary pause at theirs meanwhile.
    let to = mnt.join("gf-appearing-file");
    let at = "gf-appearing-file without rename flags";
    let e = get_with(&disk, "/d/plain", &to, at, || std::fs::write(&to, b"theirs").unwrap()).unwrap_err();
    assert_appeared(&e, &to);
    assert_eq!(std::fs::read(&to).unwrap(), b"theirs");
    assert_eq!(std::fs::metadata(&to).unwrap().nlink(), 1);
    let to = mnt.join("gf-appearing-dir");
    let at = "gf-appearing-dir without rename flags";
    let e = get_with(&disk, "/d/sub", &to, at, || std::fs::create_dir(&to).unwrap()).unwrap_err();
    assert_appeared(&e, &to);
    assert!(to.is_dir() && names_in(&to).is_empty());

    assert_eq!(names_in(&mnt), ["d", "gf-appearing-dir", "gf-appearing-file", "root"], "temporaries left");
}

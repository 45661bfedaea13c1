//! File-level restore of crafted images (a backup is hostile input: its
//! guest wrote every byte): directories whose blocks or index records are
//! mapped many times over, trees too deep for a small stack, extractions
//! that would write without end. Each must be a clear error (Corrupt,
//! naming what was wrong) or a success, never a panic, a crash, unbounded
//! memory or a half-written result.

#[path = "common/fsimage.rs"]
mod fsimage;

use std::path::Path;
use std::process::Command;

use fsimage::*;
use knib_core::files::{Disk, EntryInfo};
use knib_core::{Control, ErrorKind, KnibError};

fn ctl() -> Control {
    Control::new()
}

fn assert_err(r: Result<impl std::fmt::Debug, KnibError>, kind: ErrorKind, text: &str) -> KnibError {
    let e = r.unwrap_err();
    assert_eq!(e.kind, kind, "{e}");
    assert!(e.message.contains(text), "{text:?} not in: {e}");
    e
}

/// Nothing but `keep` in `dir` (no temporary leftovers).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut got: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    got.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "contents of {}", dir.display());
}

fn names(entries: &[EntryInfo]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

/// An ext4 image of `size_mb` MiB with 4 KiB blocks holding `src`.
fn ext4_4k(src: &Path, img: &Path, size_mb: u64) {
    let _ = std::fs::remove_file(img);
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-d"]).arg(src).arg(img).arg(format!("{size_mb}M")));
}

/// debugfs's answer to one read-only request (its standard output).
fn debugfs_read(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(img).output().unwrap();
    assert!(out.status.success(), "debugfs -R {request}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The qcow2 disk of raw image `img` (no partition table), opened.
fn open(img: &Path) -> Disk {
    let disk = img.with_extension("qcow2");
    let _ = std::fs::remove_file(&disk);
    to_qcow2(img, &disk);
    Disk::open_image(&disk, &ctl()).unwrap()
}

/// An ext4 directory whose extents map its one block three times over
/// (and whose size says three blocks): ext4-view reads it three times and
/// every name came back three times (extents can map a block thousands of
/// times: a listing without end). Corrupt, naming the directory, for `ls`
/// and `get`; and a directory longer than the filesystem is refused
/// before it is read.
#[test]
fn ext4_directory_with_a_block_mapped_many_times() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("d/file{i}")), format!("{i}\n")).unwrap();
    }
    let img = w.join("ext.img");
    ext4_4k(&src, &img, 32);
    let block: u64 = debugfs_read(&img, "blocks /d").trim().parse().unwrap();
    // The extent header (3 entries of 4, depth 0), then three extents of
    // one block each, at file blocks 0, 1 and 2, all of them `block`.
    let mut cmds =
        vec!["sif /d block[0] 0x0003F30A".to_string(), "sif /d block[1] 4".into(), "sif /d block[2] 0".into()];
    for k in 0..3 {
        cmds.push(format!("sif /d block[{}] {k}", 3 + 3 * k));
        cmds.push(format!("sif /d block[{}] 1", 4 + 3 * k));
        cmds.push(format!("sif /d block[{}] {block}", 5 + 3 * k));
    }
    cmds.push("sif /d size 12288".into());
    debugfs(&img, &cmds);
    let disk = open(&img);
    let e = assert_err(disk.list(None, "/d", &ctl()), ErrorKind::Corrupt, "directory /d has the name");
    assert!(e.message.contains("twice"), "{e}");
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    assert_err(disk.get(None, "/", &out.join("all"), &ctl()), ErrorKind::Corrupt, "directory /d has the name");
    assert_only(&out, &[]);

    // The directory's size says 64 MiB, more than the 32 MiB filesystem.
    debugfs(&img, &["sif /d size 67108864".into()]);
    let disk = open(&img);
    assert_err(
        disk.list(None, "/d", &ctl()),
        ErrorKind::Corrupt,
        "directory /d is 67108864 bytes long, more than the whole filesystem",
    );
    assert_err(disk.list(None, "/d/file1", &ctl()), ErrorKind::Corrupt, "directory /d is 67108864 bytes long");
    // The rest of the filesystem reads.
    assert_eq!(names(&disk.list(None, "/", &ctl()).unwrap()), ["d", "lost+found"]);
}

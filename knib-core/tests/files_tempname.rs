//! An extraction's temporary name (`.<name>.knib-<pid>-<n>.part`, beside
//! the destination) already taken by something else: it is left alone.
//! In a test binary of its own, so that this process's counter `n` starts
//! at 0 and no other extraction runs meanwhile.

#[path = "common/fsimage.rs"]
mod fsimage;

use fsimage::*;
use knib_core::files::Disk;
use knib_core::Control;

/// The first temporary names of `get ... --to DIR/x` exist (files with
/// their own bytes, and a directory with a file in it): before, the
/// extraction failed on the first one ("File exists") and its cleanup
/// then removed that entry, which was not its own. Now each taken name is
/// skipped, the extraction succeeds, and every entry it did not make is
/// left as it was.
#[test]
fn taken_temporary_names_are_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/a.txt"), b"a\n").unwrap();
    let img = w.join("ext.img");
    mkfs_ext4(&src, &img, 8);
    let qcow2 = w.join("ext.qcow2");
    to_qcow2(&img, &qcow2);
    let disk = Disk::open_image(&qcow2, &Control::new()).unwrap();

    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    let pid = std::process::id();
    let taken = |n: u32| out.join(format!(".x.knib-{pid}-{n}.part"));
    for n in 0..4 {
        std::fs::write(taken(n), format!("someone else's {n}\n")).unwrap();
    }
    std::fs::create_dir(taken(4)).unwrap();
    std::fs::write(taken(4).join("keep"), b"mine\n").unwrap();

    let got = disk.get(None, "/sub", &out.join("x"), &Control::new());
    for n in 0..4 {
        let kept = std::fs::read_to_string(taken(n));
        assert_eq!(kept.ok(), Some(format!("someone else's {n}\n")), "{got:?}");
    }
    assert_eq!(std::fs::read(taken(4).join("keep")).unwrap(), b"mine\n");
    let sum = got.unwrap();
    assert_eq!((sum.files, sum.dirs), (1, 1));
    assert_eq!(std::fs::read(out.join("x/a.txt")).unwrap(), b"a\n");
    let mut left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left.len(), 6, "{left:?}");
}

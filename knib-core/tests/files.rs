//! File-level restore against real disks: ext4, FAT and NTFS filesystems
//! made without mounting, partitioned, converted to qcow2, backed up,
//! changed, backed up again (incremental, then compressed); the files of
//! each backup listed and extracted and compared with what was written.

mod common;
#[path = "common/fsimage.rs"]
mod fsimage;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fsimage::*;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::engine::CompressOptions;
use knib_core::files::{self, Disk, EntryInfo};
use knib_core::{CancelToken, Control, ErrorKind, KnibError};
use serde_json::{json, Value};

fn ctl() -> Control {
    Control::new()
}

/// Back up `disk` as volume "root" of VM `vm`.
fn backup(store: &Store, vm: &str, disk: &Path) -> String {
    let disks = vec![DiskSpec { name: "root".into(), path: disk.to_path_buf() }];
    store.backup(vm, &disks, &BackupOptions::default(), &ctl()).unwrap().id
}

fn names(entries: &[EntryInfo]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

fn entry<'a>(entries: &'a [EntryInfo], name: &str) -> &'a EntryInfo {
    entries.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("no {name} in {:?}", names(entries)))
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

/// The acceptance run: a GPT disk with a FAT32 partition (1) and an ext4
/// partition (2), each holding the known tree (hundreds of files, nested
/// directories, a sparse file, a 200 MB file, names with spaces and
/// non-ASCII; symlinks on ext4), backed up full, changed (a file deleted,
/// one rewritten, one added), backed up incrementally, the second backup
/// compressed; every file of each backup extracted with the bytes, modes
/// and mtimes written at that backup.
#[test]
fn ext4_and_fat_trees_from_a_two_backup_chain() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let (src1, src2) = (w.join("src1"), w.join("src2"));
    write_tree(&src1, TreeOptions { big: true, symlinks: true });
    // FAT has no symlinks: the same tree without them.
    let (fat1, fat2) = (w.join("fat1"), w.join("fat2"));
    run(Command::new("cp").arg("-al").arg(&src1).arg(&fat1));
    for l in ["link-inside", "evil-abs", "evil-up"] {
        std::fs::remove_file(fat1.join(l)).unwrap();
    }
    run(Command::new("touch").arg("-d").arg(format!("@{}", T0 + 9000)).arg(&fat1));

    let (ext_img, fat_img) = (w.join("ext.img"), w.join("fat.img"));
    mkfs_ext4(&src1, &ext_img, 320);
    mkfs_fat(&fat1, &fat_img, 320, "EFI");
    let raw = w.join("disk.raw");
    let offsets = partitioned_disk(&[&fat_img, &ext_img], &raw);
    let disk = w.join("disk.qcow2");
    to_qcow2(&raw, &disk);
    std::fs::remove_file(&raw).unwrap();

    let store = Store::create(w.join("store")).unwrap();
    let b1 = backup(&store, "vm1", &disk);

    // State 2, on the images and the sources alike.
    write_tree2(&src1, &src2);
    write_tree2(&fat1, &fat2);
    let scratch = w.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for (img, off, to2) in [
        (&ext_img, offsets[1], ext4_to_state2 as fn(&Path, &Path)),
        (&fat_img, offsets[0], fat_to_state2 as fn(&Path, &Path)),
    ] {
        let old = img.with_extension("old");
        run(Command::new("cp").arg("--sparse=always").arg(img).arg(&old));
        to2(img, if img == &ext_img { &src2 } else { &fat2 });
        write_changes(&disk, off, &old, img, &scratch);
        std::fs::remove_file(&old).unwrap();
    }
    std::fs::remove_file(&ext_img).unwrap();
    std::fs::remove_file(&fat_img).unwrap();
    let b2 = backup(&store, "vm1", &disk);
    let m2 = store.show(&b2).unwrap();
    assert_eq!(m2.parent.as_deref(), Some(b1.as_str()), "the second backup is incremental");
    let m2 = store.compress(&b2, &CompressOptions::default(), &ctl()).unwrap();
    assert!(m2.compression.is_some());

    // The filesystems, the same in both backups.
    for b in [&b1, &b2] {
        let list = files::filesystems(&store, b, "root", &ctl()).unwrap();
        let got: Vec<_> = list
            .iter()
            .map(|f| (f.index, f.partition, f.start, f.size, f.fs_type.as_str(), f.label.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Some(1), 1 << 20, 320 << 20, "vfat", Some("EFI")),
                (2, Some(2), 321 << 20, 320 << 20, "ext4", Some("root")),
            ]
        );
    }
    // Two readable filesystems: `fs` must be given, and the error says so.
    let e = files::list(&store, &b1, "root", None, "/", &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("has 2 filesystems knib can read: 1 (partition 1, vfat \"EFI\"), 2 (partition 2, ext4 \"root\"); choose one with `fs` (--fs N)"), "{e}");
    let e = files::list(&store, &b1, "root", Some(3), "/", &ctl()).unwrap_err();
    assert!(e.message.contains("has no filesystem 3"), "{e}");

    // The deleted file is in the first backup's listing, not the second's.
    for fs in [1, 2] {
        let l1 = files::list(&store, &b1, "root", Some(fs), "/", &ctl()).unwrap();
        let l2 = files::list(&store, &b2, "root", Some(fs), "/", &ctl()).unwrap();
        assert!(names(&l1).contains(&"to-delete.txt"), "fs {fs}: {:?}", names(&l1));
        assert!(!names(&l2).contains(&"to-delete.txt"), "fs {fs}: {:?}", names(&l2));
        assert!(!names(&l1).contains(&"added.txt") && names(&l2).contains(&"added.txt"));
        let (c1, c2) = (entry(&l1, "changing.txt"), entry(&l2, "changing.txt"));
        assert_eq!((c1.size, c1.mtime), (1000, T0 + 4000 + 32));
        assert_eq!((c2.size, c2.mtime), (CHANGED.1, CHANGED.3));
        let big = entry(&l1, "big.bin");
        assert_eq!((big.kind, big.size, big.mtime, big.mtime_nsec), ("file", BIG, T0 + 7000, 0));
        assert_eq!(entry(&l1, "docs").kind, "dir");
        assert!(l1.windows(2).all(|p| p[0].name < p[1].name), "sorted");
    }
    let l1 = files::list(&store, &b1, "root", Some(2), "/", &ctl()).unwrap();
    let evil = entry(&l1, "evil-abs");
    assert_eq!((evil.kind, evil.target.as_deref()), ("symlink", Some("/etc/passwd")));
    assert_eq!(entry(&l1, "docs").mode, 0o750);
    assert_eq!(entry(&l1, "read-only.txt").mode, 0o444);
    assert!(entry(&l1, "docs").target.is_none());
    let l1 = files::list(&store, &b1, "root", Some(1), "/", &ctl()).unwrap();
    assert_eq!(
        (entry(&l1, "docs").mode, entry(&l1, "read-only.txt").mode, entry(&l1, "big.bin").mode),
        (0o755, 0o444, 0o644)
    );
    // A file's path lists that file; FAT names ignore case; a symlink to a
    // directory inside the filesystem is followed.
    let one = files::list(&store, &b2, "root", Some(1), "/DIR WITH SPACE/NAÏVE CAFÉ.TXT", &ctl()).unwrap();
    assert_eq!(names(&one), ["naïve café.txt"]);
    let inside = files::list(&store, &b2, "root", Some(2), "/link-inside", &ctl()).unwrap();
    assert_eq!(names(&inside), ["e0", "e1", "e2", "e3"]);

    // Every file of every backup, through the JSON operation (ext4) and
    // the Rust API (FAT).
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    for (b, src, fat) in [(&b1, &src1, &fat1), (&b2, &src2, &fat2)] {
        let to = out.join(format!("ext4-{b}"));
        let req = json!({"store": store.root(), "backup": b, "volume": "root", "fs": 2, "path": "/", "to": to});
        let ans: Value =
            serde_json::from_str(&knib_core::api::call("files.get", &req.to_string(), &ctl()).unwrap()).unwrap();
        assert_same_tree(src, &to, &EXT4);
        let m = std::fs::metadata(&to).unwrap();
        assert_eq!((m.mode() & 0o7777, m.mtime()), (0o755, T0 + 9000), "the root directory");
        let all = walk(src);
        let count = |f: fn(&std::fs::Metadata) -> bool| all.values().filter(|m| f(m)).count() as u64;
        let bytes: u64 = all.values().filter(|m| m.is_file()).map(|m| m.len()).sum();
        assert_eq!(
            ans,
            json!({"files": count(|m| m.is_file()), "dirs": count(|m| m.is_dir()) + 2, "symlinks": 3, "bytes": bytes}),
            "lost+found and the root count as directories"
        );
        // The sparse file came back sparse.
        assert!(std::fs::metadata(to.join("sparse.img")).unwrap().blocks() * 512 < 4 << 20);

        let to = out.join(format!("fat-{b}"));
        let sum = files::get(&store, b, "root", Some(1), "/", &to, &ctl()).unwrap();
        assert_same_tree(fat, &to, &FAT);
        assert_eq!(sum.symlinks, 0);
        assert_eq!(std::fs::metadata(&to).unwrap().mtime(), 0, "FAT's root has no time");
        std::fs::remove_dir_all(out.join(format!("ext4-{b}"))).unwrap();
        std::fs::remove_dir_all(&to).unwrap();
    }

    // One file, and one directory, alone.
    let to = out.join("changing-1");
    let s = files::get(&store, &b1, "root", Some(2), "changing.txt", &to, &ctl()).unwrap();
    assert_eq!((s.files, s.dirs, s.bytes), (1, 0, 1000));
    assert!(same_bytes(&to, &src1.join("changing.txt")));
    let to2 = out.join("changing-2");
    files::get(&store, &b2, "root", Some(2), "/changing.txt", &to2, &ctl()).unwrap();
    assert!(same_bytes(&to2, &src2.join("changing.txt")));
    let m = std::fs::metadata(&to2).unwrap();
    assert_eq!((m.mode() & 0o7777, m.mtime()), (CHANGED.2, CHANGED.3));
    let sub = out.join("d1");
    files::get(&store, &b2, "root", Some(2), "/docs/d1", &sub, &ctl()).unwrap();
    assert_same_tree(&src2.join("docs/d1"), &sub, &EXT4);
    // `to` must not exist.
    let e = files::get(&store, &b2, "root", Some(2), "/docs/d1", &sub, &ctl()).unwrap_err();
    assert!(e.message.contains("already exists"), "{e}");
    assert_only(&out, &["changing-1", "changing-2", "d1"]);
}

/// A small disk: a GPT with one ext4 partition holding `src` (no big file).
fn small_ext4_disk(w: &Path, name: &str, src: &Path, prepare: impl FnOnce(&Path)) -> PathBuf {
    let img = w.join(format!("{name}.img"));
    mkfs_ext4(src, &img, 32);
    prepare(&img);
    let raw = w.join(format!("{name}.raw"));
    partitioned_disk(&[&img], &raw);
    let disk = w.join(format!("{name}.qcow2"));
    to_qcow2(&raw, &disk);
    disk
}

fn assert_err(r: Result<impl std::fmt::Debug, KnibError>, kind: ErrorKind, text: &str) -> KnibError {
    let e = r.unwrap_err();
    assert_eq!(e.kind, kind, "{e}");
    assert!(e.message.contains(text), "{text:?} not in: {e}");
    e
}

/// Hostile requests and images: `..` in the request, symlinks pointing
/// outside, a directory loop, a corrupted superblock, a FAT cluster chain
/// that loops: each a clear error, nothing written outside DEST (nor
/// left in it), never a panic.
#[test]
fn hostile_paths_links_loops_and_corruption() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    write_tree(&src, TreeOptions { big: false, symlinks: true });
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    let disk = small_ext4_disk(w, "loop", &src, |img| debugfs(img, &["link /a /a/b/loop".into()]));
    let store = Store::create(w.join("store")).unwrap();
    let b = backup(&store, "vm", &disk);
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    let passwd = std::fs::metadata("/etc/passwd").unwrap();

    // `..` in the request.
    for p in ["/docs/../evil-abs", "..", "docs/d0/../../../etc"] {
        assert_err(
            files::get(&store, &b, "root", None, p, &out.join("x"), &ctl()),
            ErrorKind::InvalidInput,
            "has a `..` component",
        );
        assert_err(files::list(&store, &b, "root", None, p, &ctl()), ErrorKind::InvalidInput, p);
    }
    // Symlinks pointing outside, asked for or on the way.
    for (p, link) in [("/evil-abs", "/evil-abs"), ("/evil-up", "/evil-up"), ("/evil-up/etc/passwd", "/evil-up")] {
        let e = assert_err(
            files::get(&store, &b, "root", None, p, &out.join("x"), &ctl()),
            ErrorKind::InvalidInput,
            "outside the filesystem",
        );
        assert!(e.message.contains(&format!("symlink {link} points to")), "{e}");
        assert_err(files::list(&store, &b, "root", None, p, &ctl()), ErrorKind::InvalidInput, "outside the filesystem");
    }
    // A directory loop: /a/b/loop is /a again.
    assert_err(files::list(&store, &b, "root", None, "/a/b/loop", &ctl()), ErrorKind::Corrupt, "loop");
    let e = assert_err(files::get(&store, &b, "root", None, "/", &out.join("x"), &ctl()), ErrorKind::Corrupt, "loop");
    assert!(e.message.contains("/a/b/loop"), "{e}");
    assert_err(files::get(&store, &b, "root", None, "/a", &out.join("x"), &ctl()), ErrorKind::Corrupt, "loop");
    assert_only(&out, &[]);
    // The tree without the loop extracts, its symlinks recreated as links
    // and never followed: nothing written outside DEST.
    let to = out.join("docs-and-links");
    files::get(&store, &b, "root", None, "/docs", &to, &ctl()).unwrap();
    assert_same_tree(&src.join("docs"), &to, &EXT4);
    assert_only(&out, &["docs-and-links"]);
    let after = std::fs::metadata("/etc/passwd").unwrap();
    assert_eq!((passwd.mtime(), passwd.len(), passwd.ino()), (after.mtime(), after.len(), after.ino()));

    // A corrupted superblock (the magic kept, the block size impossible).
    let bad = small_ext4_disk(w, "bad-superblock", &src, |img| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(&50u32.to_le_bytes(), 1024 + 24).unwrap();
    });
    let bb = backup(&store, "vm-bad", &bad);
    let fs = files::filesystems(&store, &bb, "root", &ctl()).unwrap();
    assert_eq!(fs[0].fs_type, "ext4");
    let e = assert_err(files::list(&store, &bb, "root", None, "/", &ctl()), ErrorKind::Corrupt, "superblock");
    assert!(e.message.contains("filesystem 1 (partition 1, ext4"), "{e}");
    assert_err(files::get(&store, &bb, "root", None, "/", &out.join("y"), &ctl()), ErrorKind::Corrupt, "superblock");
    assert_only(&out, &["docs-and-links"]);
}

/// A FAT directory whose cluster chain loops, and a file whose chain
/// loops: Corrupt errors, never a hang.
#[test]
fn fat_cluster_chain_loops() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir_all(src.join("x")).unwrap();
    // 20 entries: the directory takes two 512-byte clusters.
    for i in 0..20 {
        std::fs::write(src.join(format!("x/F{i}.TXT")), format!("file {i}\n").repeat(10)).unwrap();
    }
    std::fs::write(src.join("LONG.BIN"), vec![7u8; 8192]).unwrap();
    let img = w.join("fat.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "16", "-s", "1"]).arg(&img));
    run(Command::new("mcopy").args(["-s", "-i"]).arg(&img).arg(src.join("x")).arg(src.join("LONG.BIN")).arg("::/"));
    // Point the first cluster of ::/x and of ::/LONG.BIN at themselves.
    let first = |path: &str| -> u64 {
        let text = run(Command::new("mshowfat").arg("-i").arg(&img).arg(path));
        let at = text.find('<').unwrap();
        text[at + 1..].split(['-', '>']).next().unwrap().trim().parse().unwrap()
    };
    let (cx, cl) = (first("::/x"), first("::/LONG.BIN"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut b = [0u8; 2];
        f.read_at(&mut b, 14).unwrap();
        let fat = u16::from_le_bytes(b) as u64 * 512;
        f.write_all_at(&(cx as u16).to_le_bytes(), fat + cx * 2).unwrap();
        f.write_all_at(&(cl as u16).to_le_bytes(), fat + cl * 2).unwrap();
    }
    let disk = w.join("disk.qcow2");
    to_qcow2(&img, &disk);
    let disk = Disk::open_image(&disk, &ctl()).unwrap();
    let fs = disk.filesystems();
    assert_eq!((fs.len(), fs[0].partition, fs[0].fs_type.as_str()), (1, None, "vfat"));
    assert_err(disk.list(None, "/x", &ctl()), ErrorKind::Corrupt, "the cluster chain of directory /x loops");
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    assert_err(
        disk.get(None, "/LONG.BIN", &out.join("l"), &ctl()),
        ErrorKind::Corrupt,
        "the cluster chain of file /LONG.BIN loops",
    );
    assert_err(disk.get(None, "/", &out.join("all"), &ctl()), ErrorKind::Corrupt, "loops");
    assert_only(&out, &[]);
}

/// A FAT32 volume with fewer clusters than FAT32 suggests (`mkfs.fat -F
/// 32` makes them, warning; Linux reads them as FAT32, by the boot
/// sector's 16-bit FAT size of 0): read as FAT32 (before, as FAT16 by its
/// count of clusters, its root listed as empty and extracted as nothing).
#[test]
fn fat32_with_few_clusters_is_read_as_fat32() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("dir/a.txt"), "hello\n").unwrap();
    std::fs::write(src.join("TOP.TXT"), "top\n").unwrap();
    let img = w.join("fat.img");
    std::fs::File::create(&img).unwrap().set_len(40 << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "32", "-s", "1"]).arg(&img));
    run(Command::new("mcopy").args(["-s", "-i"]).arg(&img).arg(src.join("dir")).arg(src.join("TOP.TXT")).arg("::/"));
    // The boot sector's count of sectors cut to 60,000 clusters' worth
    // (mtools wrote the files into the first ones).
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut b = [0u8; 512];
        f.read_exact_at(&mut b, 0).unwrap();
        let reserved = u16::from_le_bytes([b[14], b[15]]) as u32;
        let fat = u32::from_le_bytes(b[36..40].try_into().unwrap());
        assert_eq!((b[13], u16::from_le_bytes([b[22], b[23]])), (1, 0), "one sector a cluster, FAT32's boot sector");
        f.write_all_at(&(reserved + b[16] as u32 * fat + 60_000).to_le_bytes(), 32).unwrap();
    }
    let disk = w.join("disk.qcow2");
    to_qcow2(&img, &disk);
    let disk = Disk::open_image(&disk, &ctl()).unwrap();
    let mut root: Vec<String> = disk.list(None, "/", &ctl()).unwrap().iter().map(|e| e.name.clone()).collect();
    root.sort();
    assert_eq!(root, ["TOP.TXT", "dir"]);
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    disk.get(None, "/", &out.join("all"), &ctl()).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("all/dir/a.txt")).unwrap(), "hello\n");
    assert_eq!(std::fs::read_to_string(out.join("all/TOP.TXT")).unwrap(), "top\n");
}

/// A cross-linked FAT: forty entries of the root share the chain of one
/// 1 MiB file, so extracting the root would write 41 MiB out of a 16 MiB
/// filesystem (a guest can make it write without end this way): a Corrupt
/// error once more than the filesystem holds is written, and nothing left.
#[test]
fn fat_cross_linked_files_write_no_more_than_the_filesystem_holds() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(src.join("BIG.BIN"), &big).unwrap();
    let mut args = vec![src.join("BIG.BIN")];
    for i in 0..40 {
        std::fs::write(src.join(format!("F{i}.BIN")), b"x").unwrap();
        args.push(src.join(format!("F{i}.BIN")));
    }
    let img = w.join("fat.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "16"]).arg(&img));
    run(Command::new("mcopy").arg("-i").arg(&img).args(&args).arg("::/"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut bpb = [0u8; 512];
        f.read_at(&mut bpb, 0).unwrap();
        let le16 = |o: usize| u16::from_le_bytes([bpb[o], bpb[o + 1]]) as u64;
        let (bps, reserved, fats, root_entries, fat_sectors) = (le16(11), le16(14), bpb[16] as u64, le16(17), le16(22));
        let root = (reserved + fats * fat_sectors) * bps;
        let mut dir = vec![0u8; root_entries as usize * 32];
        f.read_at(&mut dir, root).unwrap();
        let big_first = dir.chunks(32).find(|e| &e[..11] == b"BIG     BIN").map(|e| [e[26], e[27]]).unwrap();
        let mut shared = 0;
        for (i, e) in dir.chunks_mut(32).enumerate() {
            if e[0] == b'F' && &e[8..11] == b"BIN" {
                e[26..28].copy_from_slice(&big_first);
                e[28..32].copy_from_slice(&(big.len() as u32).to_le_bytes());
                f.write_all_at(e, root + i as u64 * 32).unwrap();
                shared += 1;
            }
        }
        assert_eq!(shared, 40);
    }
    let disk = w.join("disk.qcow2");
    to_qcow2(&img, &disk);
    let disk = Disk::open_image(&disk, &ctl()).unwrap();
    // Each entry alone reads as the big file (the filesystem is damaged, not
    // unreadable).
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    disk.get(None, "/F7.BIN", &out.join("one"), &ctl()).unwrap();
    assert_eq!(std::fs::read(out.join("one")).unwrap(), big);
    std::fs::remove_file(out.join("one")).unwrap();
    let e = assert_err(
        disk.get(None, "/", &out.join("all"), &ctl()),
        ErrorKind::Corrupt,
        "wrote more data than the filesystem holds (16777216 bytes): its files share their data",
    );
    assert!(e.message.contains("extracting /F"), "{e}");
    assert_only(&out, &[]);
}

/// A cancelled extraction leaves nothing; progress goes up to 100.
#[test]
fn cancel_and_progress() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    write_tree(&src, TreeOptions { big: false, symlinks: false });
    let disk = small_ext4_disk(w, "small", &src, |_| {});
    let disk = Disk::open_image(&disk, &ctl()).unwrap();
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    let token = CancelToken::new();
    let t2 = token.clone();
    let c = Control::new().with_cancel(token).with_progress(Arc::new(move |_| t2.cancel()));
    assert_err(disk.get(None, "/", &out.join("x"), &c), ErrorKind::Cancelled, "cancelled");
    assert_only(&out, &[]);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let c = Control::new().with_progress(Arc::new(move |p| s2.lock().unwrap().push((p.step.clone(), p.percent))));
    disk.get(None, "/docs", &out.join("docs"), &c).unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|(s, _)| s == "extract /docs"), "{seen:?}");
    assert!(seen.windows(2).all(|p| p[0].1 <= p[1].1), "{seen:?}");
    assert_eq!(seen.last().map(|p| p.1), Some(100.0));
}

/// NTFS: made by mkntfs + ntfscp (no directories can be made without a
/// mount, so the files are at the top), backed up, a file rewritten and
/// one added, backed up again and compressed.
#[test]
fn ntfs_files_from_a_two_backup_chain() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src1 = w.join("src1");
    std::fs::create_dir(&src1).unwrap();
    for (name, seed, len) in [
        ("with space.txt", 1u64, 5000u64),
        ("ünïcødé-файл.txt", 2, 700),
        ("small.txt", 3, 40),
        ("empty", 4, 0),
        ("large.bin", 5, 20 << 20),
        ("changing.txt", 6, 3000),
    ] {
        let p = src1.join(name);
        write_stream(&p, seed, len);
        run(Command::new("touch").arg("-d").arg(format!("@{}", T0 + seed as i64 * 10)).arg(&p));
    }
    let img = w.join("ntfs.img");
    mkfs_ntfs(&src1, &img, 64, "win");
    // An MS-DOS partition table this time.
    let raw = w.join("disk.raw");
    let offsets = partitioned_disk_with(&[&img], &raw, "dos");
    let disk = w.join("disk.qcow2");
    to_qcow2(&raw, &disk);
    let store = Store::create(w.join("store")).unwrap();
    let b1 = backup(&store, "win", &disk);

    let src2 = w.join("src2");
    run(Command::new("cp").arg("-a").arg(&src1).arg(&src2));
    write_stream(&src2.join("changing.txt"), 7, 3000);
    write_stream(&src2.join("added.txt"), 8, 123);
    // ntfscp -t over an existing file keeps its old mtime.
    run(Command::new("touch").arg("-d").arg(format!("@{}", T0 + 60)).arg(src2.join("changing.txt")));
    run(Command::new("touch").arg("-d").arg(format!("@{}", T0 + 1000)).arg(src2.join("added.txt")));
    let old = w.join("ntfs.old");
    run(Command::new("cp").arg(&img).arg(&old));
    for n in ["changing.txt", "added.txt"] {
        run(Command::new("ntfscp").args(["-q", "-t"]).arg(&img).arg(src2.join(n)).arg(format!("/{n}")));
    }
    let scratch = w.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    write_changes(&disk, offsets[0], &old, &img, &scratch);
    let b2 = backup(&store, "win", &disk);
    store.compress(&b2, &CompressOptions::default(), &ctl()).unwrap();

    let fs = files::filesystems(&store, &b1, "root", &ctl()).unwrap();
    assert_eq!(fs.len(), 1);
    assert_eq!(
        (fs[0].partition, fs[0].start, fs[0].size, fs[0].fs_type.as_str(), fs[0].label.as_deref()),
        (Some(1), 1 << 20, 64 << 20, "ntfs", Some("win"))
    );
    let ntfs = Expect { mode: |_| 0o644, dir_mtimes: false, extra: &[] };
    for (b, src) in [(&b1, &src1), (&b2, &src2)] {
        let l = files::list(&store, b, "root", None, "/", &ctl()).unwrap();
        let mut want: Vec<String> =
            std::fs::read_dir(src).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        want.sort();
        assert_eq!(names(&l), want);
        let to = w.join(format!("out-{b}"));
        let s = files::get(&store, b, "root", None, "/", &to, &ctl()).unwrap();
        assert_eq!(s.files, want.len() as u64);
        assert_same_tree(src, &to, &ntfs);
    }
    // Names ignore case.
    let one = files::list(&store, &b2, "root", None, "/CHANGING.TXT", &ctl()).unwrap();
    assert_eq!((one[0].name.as_str(), one[0].size), ("changing.txt", 3000));
}

/// One `files.*` call through the JSON API.
fn api(op: &str, req: Value) -> Result<Value, KnibError> {
    knib_core::api::call(op, &req.to_string(), &ctl()).map(|s| serde_json::from_str(&s).unwrap())
}

fn qemu_img(args: &[&str], files: &[&Path]) {
    let mut c = Command::new("qemu-img");
    c.args(args);
    for f in files {
        c.arg(f);
    }
    run(&mut c);
}

/// CloudStack's backups, by their paths (no catalog): a full backup and an
/// incremental on top of it whose `changing.txt` was rewritten, chained by
/// a relative backing pointer (as knib writes) and by an absolute one (as
/// the agent writes, `qemu-img rebase -u -b /abs/path`); each file listed
/// and extracted from its own backup, the filesystem named by index and
/// by device; chains that loop, lack a file or hold a non-qcow2 or
/// non-regular file refused naming it.
#[test]
fn backups_by_path_with_relative_and_absolute_pointers() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let (src1, src2) = (w.join("src1"), w.join("src2"));
    write_tree(&src1, TreeOptions { big: false, symlinks: false });
    let disk = small_ext4_disk(w, "vm", &src1, |_| {});
    let img = w.join("vm.img");

    // Relative pointer: rel/inc.qcow2 -> full.qcow2.
    let rel = w.join("rel");
    std::fs::create_dir(&rel).unwrap();
    let (rel_full, rel_inc) = (rel.join("full.qcow2"), rel.join("inc.qcow2"));
    std::fs::copy(&disk, &rel_full).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "full.qcow2"], &[&rel_inc]);
    let old = w.join("vm.old");
    std::fs::copy(&img, &old).unwrap();
    write_tree2(&src1, &src2);
    ext4_to_state2(&img, &src2);
    let scratch = w.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    write_changes(&rel_inc, 1 << 20, &old, &img, &scratch);

    // Absolute pointer, the files in two directories: abs/inc/inc.qcow2 ->
    // <abs>/abs/base/full.qcow2.
    let (abs_base, abs_incd) = (w.join("abs/base"), w.join("abs/inc"));
    std::fs::create_dir_all(&abs_base).unwrap();
    std::fs::create_dir_all(&abs_incd).unwrap();
    let (abs_full, abs_inc) = (abs_base.join("full.qcow2"), abs_incd.join("inc.qcow2"));
    std::fs::copy(&rel_full, &abs_full).unwrap();
    std::fs::copy(&rel_inc, &abs_inc).unwrap();
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", abs_full.to_str().unwrap()], &[&abs_inc]);
    let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&abs_inc));
    assert!(info.contains(&format!("\"backing-filename\": \"{}\"", abs_full.display())), "{info}");

    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    for (kind, full, inc) in [("relative", &rel_full, &rel_inc), ("absolute", &abs_full, &abs_inc)] {
        for b in [full, inc] {
            let fs = api("files.fs", json!({"backup_path": b})).unwrap();
            assert_eq!(
                fs["filesystems"],
                json!([{"index": 1, "partition": 1, "start": 1 << 20, "size": 32 << 20, "type": "ext4",
                        "label": "root", "device": "/dev/sda1"}]),
                "{kind} {}",
                b.display()
            );
        }
        // The listings: by index, by device, and with `fs` left out.
        let l1 = api("files.ls", json!({"backup_path": full, "fs": "/dev/sda1"})).unwrap();
        let l2 = api("files.ls", json!({"backup_path": inc, "fs": 1, "path": "/"})).unwrap();
        let l2b = api("files.ls", json!({"backup_path": inc})).unwrap();
        assert_eq!(l2, l2b);
        let names = |l: &Value| -> Vec<String> {
            l["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()
        };
        let (n1, n2) = (names(&l1), names(&l2));
        assert!(n1.contains(&"to-delete.txt".into()) && !n1.contains(&"added.txt".into()), "{kind}: {n1:?}");
        assert!(!n2.contains(&"to-delete.txt".into()) && n2.contains(&"added.txt".into()), "{kind}: {n2:?}");

        // The incremental's path gives the new bytes, the full's the old.
        let (to1, to2) = (out.join(format!("{kind}-1")), out.join(format!("{kind}-2")));
        let s = api("files.get", json!({"backup_path": full, "fs": "/dev/sda1", "path": "/changing.txt", "to": to1}))
            .unwrap();
        assert_eq!(s, json!({"files": 1, "dirs": 0, "symlinks": 0, "bytes": 1000}));
        api("files.get", json!({"backup_path": inc, "path": "changing.txt", "to": to2})).unwrap();
        assert!(same_bytes(&to1, &src1.join("changing.txt")), "{kind}: the full backup's file");
        assert!(same_bytes(&to2, &src2.join("changing.txt")), "{kind}: the incremental's file");
        assert!(!same_bytes(&to1, &to2));
        // A directory, and an existing destination refused.
        let docs = out.join(format!("{kind}-docs"));
        api("files.get", json!({"backup_path": inc, "fs": 1, "path": "/docs", "to": docs})).unwrap();
        assert_same_tree(&src2.join("docs"), &docs, &EXT4);
        let e = api("files.get", json!({"backup_path": inc, "path": "/changing.txt", "to": to1})).unwrap_err();
        assert!(e.message.contains("already exists"), "{e}");
        assert!(same_bytes(&to1, &src1.join("changing.txt")), "left as it was");
        // A FIFO named as the destination's directory: refused at once
        // (before, opening it waited for a writer, and could not be
        // cancelled).
        let fifo = out.join(format!("{kind}-fifo"));
        run(Command::new("mkfifo").arg(&fifo));
        let (tx, rx) = std::sync::mpsc::channel();
        let req = json!({"backup_path": inc, "path": "/changing.txt", "to": fifo.join("x")});
        std::thread::spawn(move || tx.send(api("files.get", req)));
        let r = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("files.get waited on a FIFO");
        assert_err(r, ErrorKind::InvalidInput, &format!("{} is not a directory", fifo.display()));
        std::fs::remove_file(&fifo).unwrap();
        // An unknown device names the choices.
        let e = api("files.ls", json!({"backup_path": inc, "fs": "/dev/sdb1"})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.message.contains(
                "has no filesystem \"/dev/sdb1\"; it has: 1 (partition 1, ext4 \"root\") (devices /dev/sda1)"
            ),
            "{e}"
        );
    }
    assert_only(&out, &["relative-1", "relative-2", "relative-docs", "absolute-1", "absolute-2", "absolute-docs"]);

    // Both forms, or neither.
    let store = Store::create(w.join("store")).unwrap();
    let e = api("files.fs", json!({"store": store.root(), "backup": "b", "volume": "root", "backup_path": rel_inc}))
        .unwrap_err();
    assert!(e.message.contains("give either `backup_path` or `store`, `backup` and `volume`, not both"), "{e}");
    let e = api("files.ls", json!({"fs": 1})).unwrap_err();
    assert!(e.message.contains("give `backup_path`, or `store`, `backup` and `volume`: none was given"), "{e}");

    // Hostile chains.
    let bad = w.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let (a, b) = (bad.join("a.qcow2"), bad.join("b.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2"], &[&a, Path::new("1M")]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "a.qcow2"], &[&b]);
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "b.qcow2"], &[&a]);
    let e = assert_err(api("files.fs", json!({"backup_path": b})), ErrorKind::Corrupt, "backing chain loops");
    assert!(e.message.contains(&format!("{} -> {} -> {}", b.display(), a.display(), b.display())), "{e}");

    let (c, gone) = (bad.join("c.qcow2"), bad.join("gone.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2"], &[&gone, Path::new("1M")]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", gone.to_str().unwrap()], &[&c]);
    std::fs::remove_file(&gone).unwrap();
    let e = assert_err(api("files.ls", json!({"backup_path": c})), ErrorKind::NotFound, &gone.display().to_string());
    assert!(e.message.contains(&format!("backing chain of {}", c.display())), "{e}");
    let e = assert_err(api("files.fs", json!({"backup_path": gone})), ErrorKind::NotFound, "gone.qcow2");
    assert!(!e.message.contains("backing chain"), "{e}");

    // A raw backing file, and one that is not a regular file: never read.
    let (r, raw) = (bad.join("r.qcow2"), bad.join("disk.raw"));
    std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", raw.to_str().unwrap()], &[&r]);
    let e = assert_err(api("files.fs", json!({"backup_path": r})), ErrorKind::InvalidInput, "is not qcow2");
    assert!(e.message.contains(&raw.display().to_string()), "{e}");
    let fifo = bad.join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", fifo.to_str().unwrap()], &[&r]);
    let e = assert_err(api("files.fs", json!({"backup_path": r})), ErrorKind::InvalidInput, "is not a regular file");
    assert!(e.message.contains(&fifo.display().to_string()), "{e}");
    assert_err(
        api("files.fs", json!({"backup_path": "/dev/null"})),
        ErrorKind::InvalidInput,
        "/dev/null is not a regular file",
    );
    // The store form still works as before (the disk is in state 1), `fs`
    // by device too.
    let sb = backup(&store, "vm", &disk);
    let l = api("files.ls", json!({"store": store.root(), "backup": sb, "volume": "root", "fs": "/dev/sda1"})).unwrap();
    assert!(l["entries"].as_array().unwrap().iter().any(|e| e["name"] == "to-delete.txt"), "state 1: {l}");
}

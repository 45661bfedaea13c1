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

fn le16(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Undo (`apply` false) or redo (`apply` true) the update sequence of an
/// NTFS record (FILE or INDX): the last two bytes of each 512-byte sector
/// are the sequence number on disk, their real values in the array.
fn fixup(rec: &mut [u8], apply: bool) {
    let (at, count) = (le16(rec, 4), le16(rec, 6));
    let usn = [rec[at], rec[at + 1]];
    for i in 1..count {
        let end = i * 512;
        let slot = at + 2 * i;
        if apply {
            rec.copy_within(end - 2..end, slot);
            rec[end - 2..end].copy_from_slice(&usn);
        } else {
            assert_eq!(rec[end - 2..end], usn, "a torn record");
            rec.copy_within(slot..slot + 2, end - 2);
        }
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// An NTFS image of 16 MiB with 200 files at its top: its root index has
/// index records (INDX) below its $INDEX_ROOT.
fn ntfs_200(w: &Path) -> std::path::PathBuf {
    let src = w.join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..200 {
        std::fs::write(src.join(format!("file{i:03}.txt")), format!("file {i}\n")).unwrap();
    }
    let img = w.join("ntfs.img");
    mkfs_ntfs(&src, &img, 16, "t");
    img
}

/// NTFS: every leaf index record of the root directory gets a subnode
/// pointing at itself (its end entry grown by the 8 bytes of a VCN, the
/// update sequence redone). The ntfs crate's iterator pushed the record
/// again and again (each 4 KiB held) until the read budget of four times
/// the disk plus 256 MiB ran out: hundreds of MiB. Now Corrupt at the
/// second visit, naming the directory, in little memory. And a root
/// whose $INDEX_ROOT says its records are 2 GiB each (the crate allocated
/// that much for each) is refused before any record is read.
#[test]
fn ntfs_index_whose_nodes_loop() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let img = ntfs_200(w);
    let mut data = std::fs::read(&img).unwrap();
    let disk = open(&img);
    assert_eq!(disk.list(None, "/", &ctl()).unwrap().len(), 200);
    let mut patched = 0;
    let name: Vec<u8> = "file".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    for off in (0..data.len() - 4096).step_by(512) {
        let rec = &mut data[off..off + 4096];
        if &rec[..4] != b"INDX" || !rec.windows(name.len()).any(|x| x == name) || rec[24 + 12] & 1 != 0 {
            continue;
        }
        fixup(rec, false);
        let vcn: [u8; 8] = rec[16..24].try_into().unwrap();
        let (entries, size, alloc) = (24 + le32(rec, 24) as usize, le32(rec, 28), le32(rec, 32));
        assert!(size + 8 <= alloc);
        // Find the end entry (flag 2) and give it a subnode (flag 1).
        let mut p = entries;
        while le32(rec, p + 12) & 2 == 0 {
            p += le16(rec, p + 8);
        }
        let len = le16(rec, p + 8);
        rec[p + 8..p + 10].copy_from_slice(&((len + 8) as u16).to_le_bytes());
        rec[p + 12] |= 1;
        rec[p + len..p + len + 8].copy_from_slice(&vcn);
        rec[28..32].copy_from_slice(&(size + 8).to_le_bytes());
        fixup(rec, true);
        patched += 1;
    }
    assert!(patched >= 2, "{patched} leaf records");
    std::fs::write(&img, &data).unwrap();
    let disk = open(&img);
    let before = peak_rss();
    let t = std::time::Instant::now();
    let e = assert_err(disk.list(None, "/", &ctl()), ErrorKind::Corrupt, "directory /: its index loops");
    let grew = peak_rss().saturating_sub(before);
    assert!(grew < 32 << 20, "listing the root took {} MiB more: {e}", grew >> 20);
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "{:?}", t.elapsed());
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    assert_err(disk.get(None, "/", &out.join("all"), &ctl()), ErrorKind::Corrupt, "its index loops");
    assert_err(disk.list(None, "/file100.txt", &ctl()), ErrorKind::Corrupt, "its index loops");
    assert_only(&out, &[]);

    // The root's file record (5): its $INDEX_ROOT's index record size.
    let big = w.join("big-records");
    std::fs::create_dir(&big).unwrap();
    let img = ntfs_200(&big);
    let mut data = std::fs::read(&img).unwrap();
    let cluster = le16(&data, 11) * data[13] as usize;
    let mft = u64::from_le_bytes(data[0x30..0x38].try_into().unwrap()) as usize * cluster;
    let rec = &mut data[mft + 5 * 1024..mft + 6 * 1024];
    assert_eq!(&rec[..4], b"FILE");
    fixup(rec, false);
    let mut a = le16(rec, 0x14);
    while le32(rec, a) != 0x90 {
        assert_ne!(le32(rec, a), 0xffff_ffff, "no $INDEX_ROOT");
        a += le32(rec, a + 4) as usize;
    }
    let value = a + le16(rec, a + 0x14);
    assert_eq!(le32(rec, value + 8), 4096);
    rec[value + 8..value + 12].copy_from_slice(&0x8000_0000u32.to_le_bytes());
    fixup(rec, true);
    std::fs::write(&img, &data).unwrap();
    let disk = open(&img);
    assert_err(
        disk.list(None, "/", &ctl()),
        ErrorKind::Corrupt,
        "directory /: its index records are 2147483648 bytes each",
    );
}

/// How deep the deep trees are.
const DEEP: usize = 1000;

/// A tree `DEEP` directories deep (`d/d/.../d`, a file `f<i>` beside each
/// directory) written in `src`.
fn deep_tree(src: &Path) {
    let mut p = src.to_path_buf();
    for i in 0..DEEP {
        p.push("d");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.with_file_name(format!("f{i}")), format!("{i}\n")).unwrap();
    }
}

/// Check the deep tree extracted at `tree`; `bottom` is the deepest
/// directory's file, if it has one.
fn assert_deep_tree(tree: &Path, bottom: Option<&[u8]>) {
    let mut p = tree.to_path_buf();
    for i in 0..DEEP {
        assert_eq!(std::fs::read_to_string(p.join(format!("f{i}"))).unwrap(), format!("{i}\n"), "level {i}");
        p.push("d");
    }
    let got: Vec<_> = std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().file_name()).collect();
    match bottom {
        None => assert!(got.is_empty(), "{got:?}"),
        Some(b) => assert_eq!(std::fs::read(p.join("big.bin")).unwrap(), b),
    }
}

/// Run `f` on a thread of `stack` bytes of stack (as JNI or a C caller
/// may run knib), its panic given back as one.
fn on_small_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(stack).spawn(f).unwrap().join().unwrap()
}

/// Trees 1000 directories deep, extracted and listed from a thread of
/// 256 KiB of stack (a Java thread may have 512 KiB or less): the walk
/// recursed once per level, a stack overflow (SIGSEGV: the whole JVM
/// killed) before; now the trees come back whole. FAT (each directory
/// read by its cluster) and ext4 (ext4-view resolves every path from the
/// root: no path over 1000 components, and each step costs the depth);
/// and an extraction of the FAT tree cancelled in the file at its bottom
/// removes the 1000 levels it made, on the same small stack.
#[test]
fn deep_trees_on_a_small_stack() {
    const STACK: usize = 256 << 10;
    let d = tempfile::tempdir().unwrap();
    let w = d.path().to_path_buf();
    let src = w.join("src");
    deep_tree(&src);
    // Small blocks, no checksums: ext4-view reads the blocks of every level
    // above each step (some 40 s unoptimized even so).
    let ext = w.join("deep-ext4.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "1024", "-O", "^metadata_csum", "-d"])
        .arg(&src)
        .arg(&ext)
        .arg("16M"));
    let mut bottom = src.clone();
    for _ in 0..DEEP {
        bottom.push("d");
    }
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8 + 1).collect();
    std::fs::write(bottom.join("big.bin"), &big).unwrap();
    let fat = w.join("deep-fat.img");
    std::fs::File::create(&fat).unwrap().set_len(32 << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "16"]).arg(&fat));
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-i"])
        .arg(&fat)
        .arg(src.join("d"))
        .arg(src.join("f0"))
        .arg("::/"));
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();

    for (img, bottom) in [(&fat, Some(&big[..])), (&ext, None)] {
        let qcow2 = img.with_extension("qcow2");
        to_qcow2(img, &qcow2);
        let to = out.join(img.file_stem().unwrap());
        let (q, t) = (qcow2.clone(), to.clone());
        let (sum, deepest) = on_small_stack(STACK, move || {
            let disk = Disk::open_image(&q, &ctl()).unwrap();
            let sum = disk.get(None, "/", &t, &ctl()).unwrap();
            let deepest = disk.list(None, &vec!["d"; DEEP].join("/"), &ctl()).unwrap();
            (sum, deepest)
        });
        let files = DEEP as u64 + bottom.is_some() as u64;
        let dirs = DEEP as u64 + 1 + bottom.is_none() as u64; // ext4 has lost+found
        assert_eq!((sum.files, sum.dirs), (files, dirs), "{}: {sum:?}", img.display());
        assert_eq!(names(&deepest), if bottom.is_some() { vec!["big.bin"] } else { vec![] });
        assert_deep_tree(&to, bottom);
    }

    // Cancelled while the bottom file is written: all 1000 levels removed.
    let qcow2 = fat.with_extension("qcow2");
    let to = out.join("cancelled");
    let t = to.clone();
    let e = on_small_stack(STACK, move || {
        let disk = Disk::open_image(&qcow2, &ctl()).unwrap();
        let token = knib_core::CancelToken::new();
        let t2 = token.clone();
        let c = Control::new().with_cancel(token).with_progress(std::sync::Arc::new(move |p| {
            if p.percent > 0.0 {
                t2.cancel()
            }
        }));
        disk.get(None, "/", &t, &c).unwrap_err()
    });
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    assert_only(&out, &["deep-ext4", "deep-fat"]);
}

/// A 16 MiB FAT16 image holding `files` (and directories) at its top.
fn fat16(files: &[std::path::PathBuf], img: &Path) {
    std::fs::File::create(img).unwrap().set_len(16 << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "16"]).arg(img));
    run(Command::new("mcopy").env("MTOOLS_SKIP_CHECK", "1").args(["-s", "-i"]).arg(img).args(files).arg("::/"));
}

/// Rewrite the entries of the FAT16 root directory of `img` for which
/// `f` returns true; the number of them.
fn patch_fat16_root(img: &Path, mut f: impl FnMut(&mut [u8]) -> bool) -> usize {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut bpb = [0u8; 512];
    file.read_at(&mut bpb, 0).unwrap();
    let (bps, reserved, fats, entries, fat_sectors) =
        (le16(&bpb, 11) as u64, le16(&bpb, 14) as u64, bpb[16] as u64, le16(&bpb, 17), le16(&bpb, 22) as u64);
    let root = (reserved + fats * fat_sectors) * bps;
    let mut dir = vec![0u8; entries * 32];
    file.read_at(&mut dir, root).unwrap();
    let n = dir.chunks_mut(32).filter(|e| e[0] != 0 && e[0] != 0xe5).map(&mut f).filter(|&x| x).count();
    file.write_all_at(&dir, root).unwrap();
    n
}

/// A small FAT made to extract without end: 300 entries sharing the
/// chain of one 4 MiB file of zeros (1.2 GB of holes: nothing counted
/// as written, the extraction only bounded by the guest's patience), and
/// 400 entries naming one directory of 2000 files (800,000 files made
/// from a 16 MiB image). Before, both were extracted; now Corrupt before
/// anything is written, naming what was wrong, and nothing is left.
#[test]
fn extractions_are_bounded_by_the_filesystem() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();

    // Zeros shared by 300 entries.
    let src = w.join("zeros");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("BIG.BIN"), vec![0u8; 4 << 20]).unwrap();
    let mut args = vec![src.join("BIG.BIN")];
    for i in 0..300 {
        std::fs::write(src.join(format!("F{i}.BIN")), b"x").unwrap();
        args.push(src.join(format!("F{i}.BIN")));
    }
    let img = w.join("zeros.img");
    fat16(&args, &img);
    let mut first = [0u8; 2];
    patch_fat16_root(&img, |e| {
        if &e[..11] == b"BIG     BIN" {
            first.copy_from_slice(&e[26..28]);
        }
        false
    });
    let shared = patch_fat16_root(&img, |e| {
        if e[0] == b'F' && &e[8..11] == b"BIN" {
            e[26..28].copy_from_slice(&first);
            e[28..32].copy_from_slice(&(4u32 << 20).to_le_bytes());
            return true;
        }
        false
    });
    assert_eq!(shared, 300);
    let disk = open(&img);
    let e = assert_err(
        disk.get(None, "/", &out.join("zeros"), &ctl()),
        ErrorKind::Corrupt,
        "extract / would read 1145044992 bytes of file data (at /F", // 273 files of 4 MiB
    );
    assert!(e.message.contains("more than 4 times its filesystem's 16777216 bytes plus 1 GiB"), "{e}");
    assert_only(&out, &[]);
    // One of them alone is the file of zeros, left as a hole.
    disk.get(None, "/F7.BIN", &out.join("one"), &ctl()).unwrap();
    let m = std::fs::metadata(out.join("one")).unwrap();
    assert_eq!(m.len(), 4 << 20);
    std::fs::remove_file(out.join("one")).unwrap();

    // One directory named by 400 entries.
    let src = w.join("dirs");
    std::fs::create_dir_all(src.join("SUB")).unwrap();
    for i in 0..2000 {
        std::fs::write(src.join(format!("SUB/E{i}")), b"").unwrap();
    }
    let mut args = vec![src.join("SUB")];
    for i in 0..400 {
        std::fs::write(src.join(format!("R{i}")), b"").unwrap();
        args.push(src.join(format!("R{i}")));
    }
    let img = w.join("dirs.img");
    fat16(&args, &img);
    let mut first = [0u8; 2];
    patch_fat16_root(&img, |e| {
        if &e[..11] == b"SUB        " {
            first.copy_from_slice(&e[26..28]);
        }
        false
    });
    let named = patch_fat16_root(&img, |e| {
        if e[0] == b'R' {
            e[11] = 0x10;
            e[26..28].copy_from_slice(&first);
            e[28..32].fill(0);
            return true;
        }
        false
    });
    assert_eq!(named, 400);
    let disk = open(&img);
    assert_eq!(disk.list(None, "/R9", &ctl()).unwrap().len(), 2000);
    let e = assert_err(
        disk.get(None, "/", &out.join("dirs"), &ctl()),
        ErrorKind::Corrupt,
        "extract / meets more than 524288 entries (at /R",
    );
    assert!(e.message.contains("its directories are cross-linked"), "{e}");
    assert_only(&out, &[]);
}

/// The file record of NTFS file `name` in image `img` (read with its
/// update sequence applied) and the offset in it of its unnamed `$DATA`
/// attribute: `(record's byte offset, attribute's offset in it)`.
fn ntfs_data_attribute(img: &[u8], name: &str) -> (usize, usize) {
    let utf16: Vec<u8> = name.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    for start in (0..img.len() - 1024).step_by(1024) {
        if &img[start..start + 4] != b"FILE" {
            continue;
        }
        let mut rec = img[start..start + 1024].to_vec();
        let usa = le16(&rec, 4);
        for i in 1..le16(&rec, 6) {
            rec[i * 512 - 2] = rec[usa + 2 * i];
            rec[i * 512 - 1] = rec[usa + 2 * i + 1];
        }
        let (mut at, mut named, mut data) = (le16(&rec, 0x14), false, None);
        while at + 8 <= rec.len() && le32(&rec, at) != 0xffff_ffff {
            let (ty, len) = (le32(&rec, at), le32(&rec, at + 4));
            if ty == 0x30 && rec[at + 8] == 0 {
                let v = at + le16(&rec, at + 0x14);
                let n = rec[v + 0x40] as usize;
                named |= rec[v + 0x42..v + 0x42 + 2 * n] == utf16[..];
            }
            if ty == 0x80 && rec[at + 9] == 0 {
                data = Some(at);
            }
            if len == 0 {
                break;
            }
            at += len;
        }
        if let (true, Some(data)) = (named, data) {
            return (start, data);
        }
    }
    panic!("no file record of {name}");
}

/// Write `bytes` at offset `at` of a file record at `start` of `img`,
/// keeping its update sequence: a byte at the end of a sector is the
/// array's (the sector's end holds the sequence number on disk).
fn ntfs_patch(img: &mut [u8], start: usize, at: usize, bytes: &[u8]) {
    let usa = u16::from_le_bytes([img[start + 4], img[start + 5]]) as usize;
    for (i, b) in bytes.iter().enumerate() {
        let k = at + i;
        match k % 512 {
            510 | 511 => img[start + usa + 2 * (k / 512 + 1) + k % 512 - 510] = *b,
            _ => img[start + k] = *b,
        }
    }
}

/// NTFS data the way Windows leaves it: a file whose valid data length is
/// below its size (preallocated, written in part: the `$DATA` attribute's
/// initialized size) reads as zeros past it, as Windows reads it (before,
/// the clusters' stale bytes were extracted); a file NTFS-compressed or
/// EFS-encrypted is refused, naming it (before, its bytes as stored were
/// extracted as its data, without an error). ntfscp writes plain files:
/// the attribute headers are set as Windows sets them.
#[test]
fn ntfs_valid_data_length_compression_and_encryption() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir(&src).unwrap();
    let stale: Vec<u8> = (0..64u32 << 10).map(|i| (i % 251) as u8 + 1).collect();
    for n in ["PART.BIN", "PACKED.BIN", "SEALED.BIN", "WHOLE.BIN"] {
        std::fs::write(src.join(n), &stale).unwrap();
    }
    // Small enough to be resident (in its file record): never compressed,
    // even when flagged so.
    std::fs::write(src.join("TINY.TXT"), b"tiny and resident\n").unwrap();
    let img = w.join("ntfs.img");
    mkfs_ntfs(&src, &img, 16, "t");
    let mut bytes = std::fs::read(&img).unwrap();
    let (rec, attr) = ntfs_data_attribute(&bytes, "PART.BIN");
    ntfs_patch(&mut bytes, rec, attr + 0x38, &5000u64.to_le_bytes());
    for (name, flag) in [("PACKED.BIN", 0x0001u16), ("SEALED.BIN", 0x4000), ("TINY.TXT", 0x0001)] {
        let (rec, attr) = ntfs_data_attribute(&bytes, name);
        ntfs_patch(&mut bytes, rec, attr + 0x0c, &flag.to_le_bytes());
    }
    std::fs::write(&img, &bytes).unwrap();
    let disk = w.join("disk.qcow2");
    to_qcow2(&img, &disk);
    let disk = Disk::open_image(&disk, &ctl()).unwrap();
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    disk.get(None, "/PART.BIN", &out.join("part"), &ctl()).unwrap();
    let got = std::fs::read(out.join("part")).unwrap();
    assert_eq!(got.len(), stale.len());
    assert!(got[..5000] == stale[..5000], "the valid data");
    assert!(got[5000..].iter().all(|&b| b == 0), "past the valid data length: zeros");
    disk.get(None, "/WHOLE.BIN", &out.join("whole"), &ctl()).unwrap();
    assert_eq!(std::fs::read(out.join("whole")).unwrap(), stale);
    for (name, how) in [("PACKED.BIN", "compressed (NTFS compression)"), ("SEALED.BIN", "encrypted (EFS)")] {
        let to = out.join(name);
        let e = assert_err(disk.get(None, &format!("/{name}"), &to, &ctl()), ErrorKind::InvalidInput, how);
        assert!(e.message.contains(&format!("file /{name}: its data is {how}, which knib does not read")), "{e}");
        assert!(!to.exists());
    }
    // A tree holding them: refused while the extraction counts, before it
    // writes anything or reports any progress (before, it wrote the files
    // met first, then removed the whole tree).
    let events = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let seen = events.clone();
    let c = Control::new().with_progress(std::sync::Arc::new(move |_| *seen.lock().unwrap() += 1));
    let e = assert_err(disk.get(None, "/", &out.join("all"), &c), ErrorKind::InvalidInput, "which knib does not read");
    assert!(e.message.contains("/PACKED.BIN: its data is compressed"), "{e}");
    assert_eq!(*events.lock().unwrap(), 0, "progress was reported: the extraction had begun");
    // A resident file flagged compressed is read as it is.
    disk.get(None, "/TINY.TXT", &out.join("tiny"), &ctl()).unwrap();
    assert_eq!(std::fs::read(out.join("tiny")).unwrap(), b"tiny and resident\n");
    // Listed all the same, with their sizes.
    let entries = disk.list(None, "/", &ctl()).unwrap();
    assert_eq!(entries.iter().filter(|e| e.size == stale.len() as u64).count(), 4, "{entries:?}");
    assert_only(&out, &["part", "whole", "tiny"]);
}

/// Two NTFS names that differ only in case (ntfs-3g makes them; Windows
/// with per-directory case sensitivity too): each exact name gives its own
/// file (before, the first of the two matching without case was taken for
/// either), a name matching one without case still finds it, and one
/// matching both without case, neither exactly, is refused naming both.
#[test]
fn ntfs_names_differing_in_case_are_told_apart() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("README"), b"upper\n").unwrap();
    std::fs::write(src.join("Readme"), b"mixed\n").unwrap();
    std::fs::write(src.join("Only.txt"), b"only\n").unwrap();
    let img = w.join("ntfs.img");
    mkfs_ntfs(&src, &img, 16, "t");
    let disk = w.join("disk.qcow2");
    to_qcow2(&img, &disk);
    let disk = Disk::open_image(&disk, &ctl()).unwrap();
    let out = w.join("out");
    std::fs::create_dir(&out).unwrap();
    for (asked, want) in [("/Readme", "mixed\n"), ("/README", "upper\n"), ("/ONLY.TXT", "only\n")] {
        let to = out.join(asked.trim_start_matches('/'));
        disk.get(None, asked, &to, &ctl()).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), want, "{asked}");
        let listed = disk.list(None, asked, &ctl()).unwrap();
        assert_eq!(listed.len(), 1, "{asked}: {listed:?}");
        assert_eq!(listed[0].size, want.len() as u64, "{asked}: {listed:?}");
    }
    let e =
        assert_err(disk.get(None, "/readme", &out.join("r"), &ctl()), ErrorKind::InvalidInput, "/readme: the entries");
    assert!(
        e.message.contains("\"README\"") && e.message.contains("\"Readme\"") && e.message.contains("none exactly"),
        "{e}"
    );
    assert_only(&out, &["Readme", "README", "ONLY.TXT"]);
}

//! Disks with filesystems of known files, made without mounting anything:
//! a tree written on the host, an ext4 image by `mkfs.ext4 -d`, a FAT image
//! by `mkfs.vfat` + `mcopy`, an NTFS image by `mkntfs` + `ntfscp`, put in
//! partitions made by `sfdisk`, converted to qcow2 by `qemu-img`. Changes
//! between backups are made on the filesystem images (`debugfs -w`,
//! mtools) and the changed blocks written into the qcow2 disk by
//! `qemu-io`, as a guest would write them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Base of the mtimes of the known tree (2020-09-13).
pub const T0: i64 = 1_600_000_000;
/// Size of the big file.
pub const BIG: u64 = 200 << 20;

/// Run a program; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} does not run: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Deterministic bytes of stream `seed` at `offset` (cheap: 8 bytes a step).
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let p = offset + i as u64;
        let word = (p >> 3) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let v = word.wrapping_mul(0xd6e8_feb8_6659_fd93).rotate_left(29) ^ word;
        let bytes = v.to_le_bytes();
        let start = (p & 7) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
    }
}

/// Write `len` bytes of stream `seed` to a new file `path`.
pub fn write_stream(path: &Path, seed: u64, len: u64) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
}

fn set_mtime(path: &Path, t: i64) {
    let f = if fs::symlink_metadata(path).unwrap().is_dir() {
        File::open(path).unwrap()
    } else {
        fs::OpenOptions::new().write(true).open(path).unwrap()
    };
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64);
    f.set_times(fs::FileTimes::new().set_modified(when).set_accessed(when)).unwrap();
}

fn set_link_mtime(path: &Path, t: i64) {
    run(Command::new("touch").arg("-h").arg("-d").arg(format!("@{t}")).arg(path));
}

/// What the known tree holds besides its many small files.
#[derive(Clone, Copy, Debug)]
pub struct TreeOptions {
    /// The 200 MB file `big.bin`.
    pub big: bool,
    /// Symlinks (ext4 only): one inside, and two pointing outside.
    pub symlinks: bool,
}

/// Write the known tree (state 1) in `dir`, which must not exist:
/// hundreds of files in nested directories, a sparse file, names with
/// spaces and non-ASCII, fixed modes and whole, even mtimes (FAT keeps 2
/// seconds), directories' mtimes set last.
pub fn write_tree(dir: &Path, o: TreeOptions) {
    fs::create_dir(dir).unwrap();
    let mut dirs: Vec<(PathBuf, u32, i64)> = Vec::new();
    let mut n = 0i64;
    for i in 0..5 {
        for j in 0..4 {
            let d = dir.join(format!("docs/d{i}/e{j}"));
            fs::create_dir_all(&d).unwrap();
            for k in 0..15u64 {
                n += 1;
                let p = d.join(format!("f{k}.txt"));
                let len = (i as u64 * 7919 + j as u64 * 104_729 + k * 1_299_709) % 20_000;
                write_stream(&p, n as u64, if k == 0 { 0 } else { len });
                let mode = [0o644, 0o600, 0o755][k as usize % 3];
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
                set_mtime(&p, T0 + 2 * n);
            }
            dirs.push((d, if i == 1 && j == 1 { 0o700 } else { 0o755 }, T0 + 3000 + 2 * (i * 4 + j) as i64));
        }
        dirs.push((dir.join(format!("docs/d{i}")), 0o755, T0 + 3100 + 2 * i as i64));
    }
    dirs.push((dir.join("docs"), 0o750, T0 + 3200));
    let named = [
        ("with space.txt", 11u64, 5000u64, 0o644),
        ("ünïcødé-файл.txt", 12, 777, 0o640),
        ("日本語.txt", 13, 3, 0o644),
        ("read-only.txt", 14, 100, 0o444),
        ("to-delete.txt", 15, 4096, 0o644),
        ("changing.txt", 16, 1000, 0o644),
    ];
    for (name, seed, len, mode) in named {
        let p = dir.join(name);
        write_stream(&p, seed, len);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&p, T0 + 4000 + seed as i64 * 2);
    }
    let sp = dir.join("dir with space");
    fs::create_dir(&sp).unwrap();
    let p = sp.join("naïve café.txt");
    write_stream(&p, 21, 12_345);
    set_mtime(&p, T0 + 5000);
    dirs.push((sp, 0o755, T0 + 5002));
    // A sparse file: data at the start, in the middle and at the end.
    let p = dir.join("sparse.img");
    {
        let f = File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        for (off, len, seed) in [(0u64, 4096u64, 31u64), (7 << 20, 1 << 20, 32), ((16 << 20) - 4096, 4096, 33)] {
            let mut b = vec![0u8; len as usize];
            fill(seed, 0, &mut b);
            f.write_all_at(&b, off).unwrap();
        }
    }
    set_mtime(&p, T0 + 6000);
    if o.big {
        let p = dir.join("big.bin");
        write_stream(&p, 41, BIG);
        set_mtime(&p, T0 + 7000);
    }
    if o.symlinks {
        for (name, target) in [("link-inside", "docs/d0"), ("evil-abs", "/etc/passwd"), ("evil-up", "../../..")] {
            let p = dir.join(name);
            std::os::unix::fs::symlink(target, &p).unwrap();
            set_link_mtime(&p, T0 + 8000);
        }
    }
    for (d, mode, t) in dirs {
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&d, t);
    }
    set_mtime(dir, T0 + 9000);
}

/// The new content of `changing.txt` in state 2.
pub const CHANGED: (u64, u64, u32, i64) = (17, 2500, 0o600, T0 + 10_000);

/// State 2 in `dst` (a copy of state 1 in `src`, big files hard-linked):
/// `to-delete.txt` deleted, `changing.txt` rewritten (new bytes, mode and
/// mtime), `added.txt` added.
pub fn write_tree2(src: &Path, dst: &Path) {
    run(Command::new("cp").arg("-a").arg(src).arg(dst));
    fs::remove_file(dst.join("to-delete.txt")).unwrap();
    let c = dst.join("changing.txt");
    fs::remove_file(&c).unwrap();
    write_stream(&c, CHANGED.0, CHANGED.1);
    fs::set_permissions(&c, fs::Permissions::from_mode(CHANGED.2)).unwrap();
    set_mtime(&c, CHANGED.3);
    let a = dst.join("added.txt");
    write_stream(&a, 18, 300);
    set_mtime(&a, T0 + 10_002);
    set_mtime(dst, T0 + 9000);
}

/// An ext4 image of `size_mb` MiB holding `src`, its root's mode and mtime
/// as `src`'s.
pub fn mkfs_ext4(src: &Path, img: &Path, size_mb: u64) {
    let _ = fs::remove_file(img);
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "root", "-d"]).arg(src).arg(img).arg(format!("{size_mb}M")));
    let m = fs::metadata(src).unwrap();
    debugfs(img, &[format!("sif / mtime @{}", m.mtime()), format!("sif / mode 040{:o}", m.mode() & 0o7777)]);
}

/// Run debugfs commands on `img`, writing.
pub fn debugfs(img: &Path, cmds: &[String]) {
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(cmds.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "debugfs {cmds:?}: {text}");
    for bad in ["not found", "Couldn't", "Invalid", "error", "Error"] {
        assert!(!text.contains(bad), "debugfs {cmds:?}: {text}");
    }
}

/// Apply state 2 (see [`write_tree2`]) to the ext4 image, from `src2`.
pub fn ext4_to_state2(img: &Path, src2: &Path) {
    let c = src2.join("changing.txt");
    let a = src2.join("added.txt");
    debugfs(
        img,
        &[
            "rm /to-delete.txt".into(),
            "rm /changing.txt".into(),
            "cd /".into(),
            format!("write {} changing.txt", c.display()),
            format!("sif /changing.txt mode 0100{:o}", CHANGED.2),
            format!("sif /changing.txt mtime @{}", CHANGED.3),
            format!("write {} added.txt", a.display()),
            "sif /added.txt mode 0100644".into(),
            format!("sif /added.txt mtime @{}", T0 + 10_002),
            format!("sif / mtime @{}", T0 + 9000),
        ],
    );
}

fn mtools(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    c.env("TZ", "UTC").env("LANG", "C.UTF-8").env("LC_ALL", "C.UTF-8").env("MTOOLS_SKIP_CHECK", "1");
    c
}

/// A FAT32 image of `size_mb` MiB labelled `label` holding `src` (mtimes
/// kept by `mcopy -m`; files without write permission get the read-only
/// attribute).
pub fn mkfs_fat(src: &Path, img: &Path, size_mb: u64, label: &str) {
    let _ = fs::remove_file(img);
    File::create(img).unwrap().set_len(size_mb << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "32", "-n", label]).arg(img));
    let mut args: Vec<PathBuf> = fs::read_dir(src).unwrap().map(|e| e.unwrap().path()).collect();
    args.sort();
    run(mtools("mcopy").args(["-s", "-m", "-i"]).arg(img).args(&args).arg("::/"));
    for (rel, m) in walk(src) {
        if m.is_file() && m.mode() & 0o222 == 0 {
            run(mtools("mattrib").arg("-i").arg(img).arg("+r").arg(format!("::/{}", rel.display())));
        }
    }
}

/// Apply state 2 to the FAT image, from `src2`.
pub fn fat_to_state2(img: &Path, src2: &Path) {
    run(mtools("mdel").arg("-i").arg(img).arg("::/to-delete.txt"));
    run(mtools("mcopy").args(["-o", "-m", "-i"]).arg(img).arg(src2.join("changing.txt")).arg("::/changing.txt"));
    run(mtools("mcopy").args(["-m", "-i"]).arg(img).arg(src2.join("added.txt")).arg("::/"));
}

/// An NTFS image of `size_mb` MiB labelled `label` with the regular files
/// of `src`'s top directory (ntfscp makes no directories), mtimes kept.
pub fn mkfs_ntfs(src: &Path, img: &Path, size_mb: u64, label: &str) {
    let _ = fs::remove_file(img);
    File::create(img).unwrap().set_len(size_mb << 20).unwrap();
    run(Command::new("mkntfs").args(["-F", "-q", "-f", "-L", label]).arg(img));
    let mut names: Vec<PathBuf> = fs::read_dir(src).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for p in names {
        if fs::symlink_metadata(&p).unwrap().is_file() {
            let dest = format!("/{}", p.file_name().unwrap().to_str().unwrap());
            run(Command::new("ntfscp").args(["-q", "-t"]).arg(img).arg(&p).arg(dest));
        }
    }
}

/// A raw disk `raw` with a GPT and one partition per image (1 MiB
/// aligned, sized to the image), each image written into its partition.
/// Returns the partitions' byte offsets.
pub fn partitioned_disk(images: &[&Path], raw: &Path) -> Vec<u64> {
    partitioned_disk_with(images, raw, "gpt")
}

/// [`partitioned_disk`] with sfdisk's label `label` ("gpt" or "dos").
pub fn partitioned_disk_with(images: &[&Path], raw: &Path, label: &str) -> Vec<u64> {
    let mut offsets = Vec::new();
    let mut at = 1u64 << 20;
    let mut script = format!("label: {label}\n");
    for img in images {
        let len = fs::metadata(img).unwrap().len();
        assert_eq!(len % (1 << 20), 0, "{} is not whole MiB", img.display());
        script += &format!("start={}, size={}\n", at / 512, len / 512);
        offsets.push(at);
        at += len;
    }
    let _ = fs::remove_file(raw);
    File::create(raw).unwrap().set_len(at + (1 << 20)).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    for (img, off) in images.iter().zip(&offsets) {
        run(Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", raw.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={}", off >> 20)));
    }
    offsets
}

/// Convert a raw disk to a new qcow2 image.
pub fn to_qcow2(raw: &Path, qcow2: &Path) {
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(qcow2));
}

/// Write into the qcow2 disk `disk`, at `offset`, the 64 KiB chunks where
/// image `new` differs from `old` (as a guest writing them would).
pub fn write_changes(disk: &Path, offset: u64, old: &Path, new: &Path, scratch: &Path) {
    const CHUNK: usize = 64 << 10;
    let (mut a, mut b) = (File::open(old).unwrap(), File::open(new).unwrap());
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut a, &mut ba);
        let nb = read_full(&mut b, &mut bb);
        assert_eq!(na, nb, "images differ in length");
        if na == 0 {
            break;
        }
        if ba[..na] != bb[..nb] {
            match runs.last_mut() {
                Some((start, data)) if *start + data.len() as u64 == pos => data.extend_from_slice(&bb[..nb]),
                _ => runs.push((pos, bb[..nb].to_vec())),
            }
        }
        pos += na as u64;
    }
    assert!(!runs.is_empty(), "no change to write");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for (i, (start, data)) in runs.iter().enumerate() {
        let f = scratch.join(format!("run-{i}"));
        fs::write(&f, data).unwrap();
        cmd.arg("-c").arg(format!("write -s {} {} {}", f.display(), offset + start, data.len()));
    }
    let text = run(cmd.arg(disk));
    assert!(!text.contains("error") && !text.contains("failed"), "qemu-io: {text}");
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Every entry under `dir`, by relative path (not following links).
pub fn walk(dir: &Path) -> BTreeMap<PathBuf, fs::Metadata> {
    let mut out = BTreeMap::new();
    fn go(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, fs::Metadata>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), m.clone());
            if m.is_dir() {
                go(root, &p, out);
            }
        }
    }
    go(dir, dir, &mut out);
    out
}

/// Whether files `a` and `b` hold the same bytes (read 1 MiB at a time).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

/// How a filesystem keeps what the source had.
pub struct Expect {
    /// The mode the filesystem gives an entry with these metadata.
    pub mode: fn(&fs::Metadata) -> u32,
    /// Whether directories keep their mtimes.
    pub dir_mtimes: bool,
    /// Entries of the extracted tree that the source has not (relative).
    pub extra: &'static [&'static str],
}

/// ext4 keeps everything.
pub const EXT4: Expect = Expect { mode: |m| m.mode() & 0o7777, dir_mtimes: true, extra: &["lost+found"] };

/// FAT: directories 0o755, files 0o644 or 0o444 (read-only attribute).
pub const FAT: Expect = Expect {
    mode: |m| {
        if m.is_dir() {
            0o755
        } else if m.mode() & 0o222 == 0 {
            0o444
        } else {
            0o644
        }
    },
    dir_mtimes: true,
    extra: &[],
};

/// Assert that `got` (extracted) holds what `want` (the source) holds:
/// the same entries, kinds, bytes, symlink targets, modes and mtimes as
/// `e` says the filesystem keeps them. The top directory's own mode and
/// mtime are not compared (see the callers).
pub fn assert_same_tree(want: &Path, got: &Path, e: &Expect) {
    let w = walk(want);
    let mut g = walk(got);
    for x in e.extra {
        g.retain(|p, _| !p.starts_with(x));
    }
    let wn: Vec<_> = w.keys().collect();
    let gn: Vec<_> = g.keys().collect();
    assert_eq!(wn, gn, "entries of {} and {} differ", want.display(), got.display());
    for (rel, wm) in &w {
        let gm = &g[rel];
        let (wp, gp) = (want.join(rel), got.join(rel));
        assert_eq!(wm.file_type(), gm.file_type(), "{}: kind", rel.display());
        if wm.file_type().is_symlink() {
            assert_eq!(fs::read_link(&wp).unwrap(), fs::read_link(&gp).unwrap(), "{}: target", rel.display());
        } else {
            assert_eq!((e.mode)(wm), gm.mode() & 0o7777, "{}: mode", rel.display());
        }
        if wm.is_file() {
            assert_eq!(wm.len(), gm.len(), "{}: size", rel.display());
            assert!(same_bytes(&wp, &gp), "{}: bytes differ", rel.display());
        }
        if !wm.is_dir() || e.dir_mtimes {
            assert_eq!((wm.mtime(), wm.mtime_nsec()), (gm.mtime(), gm.mtime_nsec()), "{}: mtime", rel.display());
        }
    }
}

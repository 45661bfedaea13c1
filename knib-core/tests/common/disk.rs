//! Disk helpers for tests: images made with the real qemu-img, guest-like
//! writes with the real qemu-io, comparisons with qemu-img compare.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use knib_core::catalog::DiskSpec;
use knib_core::qemu_img::{Convert, QemuImg};
use knib_core::Control;

/// Run qemu-io on a (stopped) disk, as a guest write would; panics on error.
pub fn qemu_io(disk: &Path, cmd: &str) {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(disk).output().expect("qemu-io runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("error") && !text.contains("failed"), "qemu-io {cmd}: {text}");
}

/// Whether `cmd` (a `read -P` check) holds on `disk`.
pub fn qemu_io_ok(disk: &Path, cmd: &str) -> bool {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-U", "-c", cmd]).arg(disk).output().expect("qemu-io runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("Pattern verification failed") && !text.contains("error")
}

/// Make a qcow2 image of `size` bytes with extra `qemu-img create` options.
pub fn make_disk(path: &Path, size: u64, opts: &[&str]) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(opts)
        .arg(path)
        .arg(size.to_string())
        .status()
        .expect("qemu-img runs");
    assert!(st.success());
}

/// A flattened copy of `disk` as it is now (the reference a restore must match).
pub fn snapshot(disk: &Path, dest: &Path) {
    QemuImg::new()
        .convert(
            &Convert { source: disk.to_path_buf(), dest: dest.to_path_buf(), ..Default::default() },
            &Control::new(),
        )
        .expect("reference copy");
}

/// Assert two images have identical guest-visible contents.
pub fn assert_identical(a: &Path, b: &Path) {
    // `qemu-img compare` takes a larger image's tail of zeros as equal: the
    // guest would see another disk size.
    let size = |p: &Path| QemuImg::new().info(p, &Control::new()).expect("qemu-img info").virtual_size;
    assert_eq!(size(a), size(b), "{} and {} differ in virtual size", a.display(), b.display());
    let out = Command::new("qemu-img").args(["compare", "-U"]).arg(a).arg(b).output().expect("qemu-img compare");
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assert `qemu-img check` is clean on a file.
pub fn assert_check_clean(file: &Path) {
    let r = QemuImg::new().check(file, &Control::new()).expect("qemu-img check runs");
    assert!(r.is_clean(), "{}: {r:?}", file.display());
}

/// Number of files in a disk's backing chain.
pub fn chain_len(disk: &Path) -> usize {
    QemuImg::new().info_chain(disk, &Control::new()).expect("info").len()
}

/// Every regular file under `dir` with its bytes, lock files left out:
/// to show that nothing changed.
pub fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p);
            } else if m.is_file() && p.file_name().unwrap() != ".lock" {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Every file under `dir` (relative path -> content of manifests, size of
/// the rest), lock files left out: to show a store is as it was.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), "dir".into());
                walk(root, &p, out);
            } else if p.file_name().unwrap() != ".lock" {
                let v = if p.extension().is_some_and(|x| x == "json") {
                    std::fs::read_to_string(&p).unwrap_or_default()
                } else {
                    std::fs::metadata(&p).map(|m| m.len().to_string()).unwrap_or_default()
                };
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), v);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// A stopped VM made of plain qcow2 files in a temporary directory.
pub struct TestDisks {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// The disks.
    pub disks: Vec<DiskSpec>,
}

impl TestDisks {
    /// Two disks, "root" (64 MiB) and "data" (32 MiB).
    pub fn two() -> TestDisks {
        let dir = tempfile::tempdir().unwrap();
        let mut disks = Vec::new();
        for (name, size) in [("root", 64u64 << 20), ("data", 32 << 20)] {
            let p = dir.path().join(format!("{name}.qcow2"));
            make_disk(&p, size, &[]);
            disks.push(DiskSpec { name: name.into(), path: p });
        }
        TestDisks { dir, disks }
    }

    /// The path of disk `name`.
    pub fn path(&self, name: &str) -> &Path {
        &self.disks.iter().find(|d| d.name == name).unwrap().path
    }

    /// Reference copies of every disk now, in `refs/<tag>-<name>.qcow2`.
    pub fn snapshot_all(&self, tag: &str) -> BTreeMap<String, PathBuf> {
        let refs = self.dir.path().join("refs");
        std::fs::create_dir_all(&refs).unwrap();
        self.disks
            .iter()
            .map(|d| {
                let r = refs.join(format!("{tag}-{}.qcow2", d.name));
                snapshot(&d.path, &r);
                (d.name.clone(), r)
            })
            .collect()
    }
}

/// A control whose operation stops at its first progress report until the
/// test lets it go: (control, "reached" receiver, "go" sender).
pub fn paused_at_first_progress() -> (Control, std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
    use std::sync::{mpsc, Arc, Mutex};
    let (reached_tx, reached_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((reached_tx, go_rx))));
    let ctl = Control::new().with_progress(Arc::new(move |_| {
        if let Some((reached, go)) = gate.lock().unwrap().take() {
            reached.send(()).unwrap();
            go.recv().unwrap();
        }
    }));
    (ctl, reached_rx, go_tx)
}

/// The offset in `file` of its first data cluster (from `qemu-img map`).
pub fn first_data_offset(file: &Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter()
        .find(|e| e["data"] == true && e["offset"].is_u64() && e["depth"] == 0)
        .and_then(|e| e["offset"].as_u64())
        .expect("a data cluster")
}

/// Flip one byte of `file` at `offset`.
pub fn flip_byte(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

/// Set the stored refcount of `file`'s first data cluster to 0, a
/// corruption `qemu-img check` reports (a refcount below the cluster's
/// references). Returns where the refcount is and what it was, for
/// [`put_bytes`] to undo it.
pub fn zero_first_data_refcount(file: &Path) -> (u64, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let data = first_data_offset(file);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let be32 = |at: u64| {
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, at).unwrap();
        u32::from_be_bytes(b) as u64
    };
    let be64 = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let cluster_size = 1u64 << be32(20);
    let order = if be32(4) >= 3 { be32(96) } else { 4 };
    assert!(order >= 3, "refcounts of {order} bits are not whole bytes");
    let bytes = (1u64 << order) / 8;
    let per_block = cluster_size / bytes;
    let index = data / cluster_size;
    let block = be64(be64(48) + index / per_block * 8) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(block, 0, "the data cluster's refcount block is not allocated");
    let at = block + index % per_block * bytes;
    let mut old = vec![0u8; bytes as usize];
    f.read_exact_at(&mut old, at).unwrap();
    assert!(old.iter().any(|&b| b != 0), "the refcount was 0 already");
    f.write_all_at(&vec![0u8; bytes as usize], at).unwrap();
    (at, old)
}

/// Write `bytes` at `offset` of `file`.
pub fn put_bytes(file: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(file).unwrap().write_all_at(bytes, offset).unwrap();
}

/// The temporary name a compression writes `file`'s output under until it
/// is whole (`.<name>.comp.part` beside it).
#[allow(dead_code)]
pub fn comp_part(file: &Path) -> PathBuf {
    file.with_file_name(format!(".{}.comp.part", file.file_name().unwrap().to_string_lossy()))
}

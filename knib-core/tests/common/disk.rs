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

/// How a compression's output is miswritten (the bug or bit flip the
/// read-back is there for): each leaves a file whose refcounts and tables
/// `qemu-img check` may well accept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Miswrite {
    /// Two clusters of other content, each under the other's index.
    Swap,
    /// A cluster's L2 entry pointed at another cluster's data.
    Duplicate,
    /// A cluster's L2 entry emptied (the cluster is lost).
    Lose,
    /// A cluster's L2 entry made a zero cluster.
    Zero,
}

/// Miswrite `file` (a compression's temporary output) as `m` says, in its
/// first L2 table, at clusters drawn from `seed`; returns what was done.
pub fn miswrite(file: &Path, m: Miswrite, seed: u64) -> String {
    use knib_core::qcow2::{ClusterState, Qcow2Image};
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    let mut rng = Pick(seed);
    let mut img = Qcow2Image::open(file).expect("open the output");
    let cs = img.cluster_size();
    let f = OpenOptions::new().read(true).write(true).open(file).expect("open to miswrite");
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, img.header().l1_table_offset).expect("L1");
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    assert!(l2 != 0, "{}: the first L1 entry is empty", file.display());
    let entry = |k: u64| {
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, l2 + k * 8).expect("L2");
        u64::from_be_bytes(e)
    };
    // Clusters holding data, with what they read.
    let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
    for k in 0..(cs / 8).min(img.guest_clusters()) {
        if matches!(img.cluster_state(k).expect("lookup"), ClusterState::Data { .. } | ClusterState::Compressed { .. })
        {
            let mut buf = vec![0u8; cs as usize];
            img.read_at(k * cs, &mut buf).expect("read");
            held.push((k, buf));
        }
    }
    assert!(held.len() >= 2, "{}: {} data clusters", file.display(), held.len());
    let pick = |rng: &mut Pick| held[rng.below(held.len() as u64) as usize].clone();
    let (a, a_data) = pick(&mut rng);
    let mut b = pick(&mut rng);
    while b.1 == a_data {
        b = pick(&mut rng);
    }
    let b = b.0;
    let put = |k: u64, v: u64| f.write_all_at(&v.to_be_bytes(), l2 + k * 8).expect("write L2");
    match m {
        Miswrite::Swap => {
            let (ea, eb) = (entry(a), entry(b));
            put(a, eb);
            put(b, ea);
            format!("clusters {a} and {b} swapped")
        }
        Miswrite::Duplicate => {
            put(b, entry(a));
            format!("cluster {b} pointed at cluster {a}'s data")
        }
        Miswrite::Lose => {
            put(a, 0);
            format!("cluster {a} lost")
        }
        Miswrite::Zero => {
            put(a, 1);
            format!("cluster {a} made zeros")
        }
    }
}

/// Seeded picks (splitmix64) for [`miswrite`].
struct Pick(u64);

impl Pick {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// Run `f` while an operation waits at the pause asked for at `at`
/// (`knib_core::crashpoint::pause_before`): wait (at most 120 s) for the
/// pause to begin, run `f`, then release the pause, also when the wait
/// or `f` panics (the operation then goes on at once).
pub fn while_paused<T>(at: &str, f: impl FnOnce() -> T) -> T {
    struct Release<'a>(&'a str);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            knib_core::crashpoint::release_pause(self.0);
        }
    }
    let _release = Release(at);
    assert!(knib_core::crashpoint::wait_for_pause(at, std::time::Duration::from_secs(120)), "no pause at {at}");
    f()
}

/// Replace the entry at `p` with a link to `victim`: a hard link (`hard`)
/// or a symbolic one: what an adversary who can write the directory puts
/// under a name knib writes.
pub fn replace_with_link(p: &Path, victim: &Path, hard: bool) {
    std::fs::remove_file(p).unwrap();
    if hard {
        std::fs::hard_link(victim, p).unwrap();
    } else {
        std::os::unix::fs::symlink(victim, p).unwrap();
    }
}

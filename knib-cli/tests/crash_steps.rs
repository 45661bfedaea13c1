//! Crashes between every pair of durable steps of a backup, for real: the
//! `knib` process is aborted (`KNIB_TEST_CRASH_AT=N`, a test-only hook of
//! debug builds, see `knib_core::crashpoint`) right before its Nth durable
//! step, for N = 1, 2, ... until the backup completes, so every step is
//! covered without naming any. After each crash the user's next move is
//! made (plain disks: the next backup; domains: `knib recover`), with
//! seeded guest writes before and after it, two more backups are taken,
//! and then:
//!
//! - every backup `list` shows restores (`qemu-img compare`) to exactly the
//!   disk as it was when that backup was taken (the interrupted one, when it
//!   was published, to the disk as it was before the crash); nothing else is
//!   listed;
//! - the last backup holds every guest write;
//! - `qemu-img check` is clean on the disks and on every file of the store,
//!   and no partial backup or journal is left.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;

use common::disk::{assert_check_clean, assert_identical, make_disk, qemu_io, snapshot};
use knib_core::progress::Control;
use knib_core::qemu_img::QemuImg;

const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";
const NOTE_ENV: &str = "KNIB_TEST_CRASH_NOTE";
const K64: u64 = 64 << 10;

/// Run `knib`, aborted before durable step `crash_at` when given.
fn knib(args: &[String], crash_at: Option<u64>, cwd: &Path) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args).current_dir(cwd).env_remove("KNIB_FAULT_AT").env_remove(NOTE_ENV);
    match crash_at {
        Some(n) => c.env(CRASH_ENV, n.to_string()).env(NOTE_ENV, cwd.join("crash-note")),
        None => c.env_remove(CRASH_ENV),
    };
    c.output().expect("knib runs")
}

fn ok_json(args: &[String], cwd: &Path) -> serde_json::Value {
    let out = knib(args, None, cwd);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

/// xorshift64: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// What a crash test backs up: plain disks or a stopped domain.
trait Subject {
    /// Volume names.
    fn volumes(&self) -> Vec<String>;
    /// The `backup` arguments naming the VM and its disks.
    fn backup_args(&self) -> Vec<String>;
    /// The file a guest write of volume `v` goes to now.
    fn active(&self, v: &str) -> PathBuf;
    /// The virtual size of volume `v`.
    fn size(&self, v: &str) -> u64;
    /// What the user runs after a crash, before anything else.
    fn after_crash(&self, store: &str, cwd: &Path);
    /// Check primary storage is in order (chains short and clean).
    fn check_primary(&self, what: &str);
    /// Where a guest write of `len` bytes goes on volume `v`.
    fn place(&self, v: &str, rng: &mut Rng, len: u64) -> u64 {
        rng.below(self.size(v) / K64 - len / K64) * K64
    }
    /// A guest write (stopped VM: through qemu-io on the active file).
    fn write(&self, v: &str, pattern: u8, off: u64, len: u64) {
        qemu_io(&self.active(v), &format!("write -P 0x{pattern:02x} {off} {len}"));
    }
    /// A copy at `dest` of volume `v` as the guest reads it now.
    fn reference(&self, v: &str, dest: &Path) {
        snapshot(&self.active(v), dest);
    }
    /// Assert volume `v` reads as `reference` now.
    fn check_now(&self, v: &str, reference: &Path) {
        assert_identical(reference, &self.active(v));
    }
}

/// Seeded guest writes on every volume (stopped VM: through qemu-io).
fn guest_writes(s: &dyn Subject, rng: &mut Rng) {
    for v in s.volumes() {
        for _ in 0..1 + rng.below(3) {
            let len = K64 * (1 + rng.below(3));
            let off = s.place(&v, rng, len);
            let pattern = 1 + rng.below(254) as u8;
            s.write(&v, pattern, off, len);
        }
    }
}

/// Reference copies of every volume as it reads now.
fn references(s: &dyn Subject, dir: &Path, tag: &str) -> BTreeMap<String, PathBuf> {
    s.volumes()
        .into_iter()
        .map(|v| {
            let r = dir.join(format!("ref-{tag}-{v}.qcow2"));
            let _ = std::fs::remove_file(&r);
            s.reference(&v, &r);
            (v, r)
        })
        .collect()
}

/// One case: `prior` backups, then one aborted before durable step `n`.
/// Returns false when the backup completed (n is past its last step).
fn crash_case(s: &dyn Subject, dir: &Path, seed: u64, prior: usize, chain: &str, extra: &[&str], n: u64) -> bool {
    let store = dir.join("store");
    let st = store.to_str().unwrap().to_string();
    let mut rng = Rng::new(seed);
    let backup = |extra: &[&str]| -> Vec<String> {
        let mut a = strs(&["--json", "backup", "--store", &st, "--chain-size", chain]);
        a.extend(s.backup_args());
        a.extend(strs(extra));
        a
    };
    // id -> the disks as they were when it was taken
    let mut expected: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for i in 0..prior {
        guest_writes(s, &mut rng);
        let refs = references(s, dir, &format!("prior{i}"));
        let b = ok_json(&backup(&[]), dir);
        expected.insert(b["id"].as_str().unwrap().to_string(), refs);
    }
    guest_writes(s, &mut rng);
    let at_crash = references(s, dir, "crash");
    let out = knib(&backup(extra), Some(n), dir);
    if out.status.success() {
        return false;
    }
    let note = std::fs::read_to_string(dir.join("crash-note")).unwrap_or_default();
    let what = format!("crash before durable step {} (seed {seed})", note.trim());
    assert_eq!(out.status.signal(), Some(6), "{what}: knib was to abort: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{what}");
    // The guest goes on writing before the user repairs anything.
    guest_writes(s, &mut rng);
    s.after_crash(&st, dir);
    // Writes go on; the next two backups are normal.
    let mut next_ids = Vec::new();
    for i in 0..2 {
        guest_writes(s, &mut rng);
        let refs = references(s, dir, &format!("next{i}"));
        let b = ok_json(&backup(&[]), dir);
        let id = b["id"].as_str().unwrap().to_string();
        if i == 1 && chain == "8" {
            assert_eq!(b["kind"], "incremental", "{what}: the chain goes on after the next backup: {b}");
        }
        next_ids.push(id.clone());
        expected.insert(id, refs);
    }
    // Everything listed is complete and restores to the disks as they were.
    let list = ok_json(&strs(&["--json", "list", "--store", &st]), dir);
    let listed: Vec<String> = list.as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
    let interrupted: Vec<&String> = listed.iter().filter(|id| !expected.contains_key(*id)).collect();
    assert!(interrupted.len() <= 1, "{what}: unknown backups listed: {interrupted:?}");
    for id in expected.keys() {
        assert!(listed.contains(id), "{what}: backup {id} is not listed: {listed:?}");
    }
    for id in &listed {
        let refs = expected.get(id).unwrap_or(&at_crash);
        for (v, r) in refs {
            let to = dir.join(format!("restored-{v}.raw"));
            let _ = std::fs::remove_file(&to);
            let out = knib(
                &strs(&["restore", "--store", &st, id, "--volume", v, "--to", to.to_str().unwrap(), "--format", "raw"]),
                None,
                dir,
            );
            assert!(out.status.success(), "{what}: restore {id} {v}: {}", String::from_utf8_lossy(&out.stderr));
            assert_identical(&to, r);
            std::fs::remove_file(&to).unwrap();
        }
    }
    // The last backup holds every write: it is the disks as they read now.
    let last = next_ids.last().unwrap();
    for v in s.volumes() {
        s.check_now(&v, &expected[last][&v]);
    }
    // Store files clean, nothing partial left, primary in order.
    for vm in std::fs::read_dir(store.join("vms")).unwrap().flatten() {
        for e in std::fs::read_dir(vm.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.ends_with(".part") && !name.ends_with(".deleting") && name != "journal.json",
                "{what}: {name} is left in the store"
            );
            if e.path().is_dir() {
                for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                    if f.path().extension().is_some_and(|x| x == "qcow2") {
                        assert_check_clean(&f.path());
                    }
                }
            }
        }
    }
    s.check_primary(&what);
    true
}

/// Run `crash_case` for N = 1, 2, ... in fresh directories made by `make`
/// until the backup completes; returns how many crash points there were.
fn every_step<S: Subject>(make: &dyn Fn(&Path) -> S, seed: u64, prior: usize, chain: &str, extra: &[&str]) -> u64 {
    // KNIB_TEST_FIRST_STEP=N starts at step N (to rerun one failure).
    let first: u64 = std::env::var("KNIB_TEST_FIRST_STEP").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut n = first;
    loop {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let s = make(d.path());
        if !crash_case(&s, d.path(), seed ^ n, prior, chain, extra, n) {
            break;
        }
        n += 1;
    }
    let crashes = n - 1;
    eprintln!("{crashes} crash points (prior {prior}, chain {chain}, {extra:?})");
    assert!(crashes >= 4 || first > 1, "the backup had only {crashes} durable steps: is the crash hook there?");
    crashes
}

// ---------------------------------------------------------------- plain disks

struct Plain {
    disks: Vec<(String, PathBuf, u64)>,
}

impl Plain {
    fn make(dir: &Path) -> Plain {
        let mut disks = Vec::new();
        for (name, size) in [("root", 8u64 << 20), ("data", 4 << 20)] {
            let p = dir.join(format!("{name}.qcow2"));
            make_disk(&p, size, &[]);
            disks.push((name.to_string(), p, size));
        }
        Plain { disks }
    }
    fn disk(&self, v: &str) -> &(String, PathBuf, u64) {
        self.disks.iter().find(|d| d.0 == v).unwrap()
    }
}

impl Subject for Plain {
    fn volumes(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.0.clone()).collect()
    }
    fn backup_args(&self) -> Vec<String> {
        let mut a = strs(&["--vm", "web"]);
        for (n, p, _) in &self.disks {
            a.push("--disk".into());
            a.push(format!("{n}={}", p.display()));
        }
        a
    }
    fn active(&self, v: &str) -> PathBuf {
        self.disk(v).1.clone()
    }
    fn size(&self, v: &str) -> u64 {
        self.disk(v).2
    }
    fn after_crash(&self, _store: &str, _cwd: &Path) {
        // Plain disks have no recover command: the next backup repairs.
    }
    fn check_primary(&self, what: &str) {
        for (_, p, _) in &self.disks {
            assert!(p.exists(), "{what}: {} is missing", p.display());
            assert_check_clean(p);
            let base = PathBuf::from(format!("{}.knib-base", p.display()));
            if base.exists() {
                // A crash in the middle of the native merge into the base may
                // leak clusters (qcow2::commit's write order: leaks, never a
                // table pointing at uncounted data); the next merge reclaims
                // them, and two backups were taken since.
                let r = QemuImg::new().check(&base, &Control::new()).expect("qemu-img check runs");
                assert!(r.is_clean(), "{what}: {}: {r:?}", base.display());
            }
            assert!(!PathBuf::from(format!("{}.knib-new", p.display())).exists(), "{what}: overlay left");
        }
    }
}

#[test]
fn plain_disks_first_full_backup_crashed_at_every_step() {
    every_step(&Plain::make, 0x5eed_0001, 0, "8", &[]);
}

#[test]
fn plain_disks_incremental_backup_crashed_at_every_step() {
    every_step(&Plain::make, 0x5eed_0002, 2, "8", &[]);
}

#[test]
fn plain_disks_end_of_chain_and_full_and_isolated_backups_crashed_at_every_step() {
    every_step(&Plain::make, 0x5eed_0003, 1, "2", &[]);
    every_step(&Plain::make, 0x5eed_0004, 2, "8", &["--full"]);
    every_step(&Plain::make, 0x5eed_0005, 1, "8", &["--isolated"]);
}

/// A merge into a disk's knib base killed halfway (between its refcount and
/// table writes, on the thread that merges while the copy runs) leaks
/// clusters in the base. The next backup reclaims them before it merges
/// (`qemu-img check -r leaks`), so the base is clean from then on, and so
/// is the disk it becomes at the end of the chain. Before, the leaks stayed
/// and were the disk's own at the end of the chain: seen in CI, where a
/// crash at one of the copy's steps fell, now and then, while the merge
/// beside it was halfway.
#[test]
fn a_merge_into_the_base_killed_halfway_leaves_no_leak_behind() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let s = Plain::make(dir);
    let st = dir.join("store").to_str().unwrap().to_string();
    let backup = || {
        let mut a = strs(&["--json", "backup", "--store", &st, "--chain-size", "3"]);
        a.extend(s.backup_args());
        a
    };
    let mut rng = Rng::new(0x5eed_0006);
    guest_writes(&s, &mut rng);
    ok_json(&backup(), dir);
    // Writes the base has no cluster for (guest_writes never writes the last
    // cluster), so the merge allocates, then is killed before its tables.
    for v in s.volumes() {
        s.write(&v, 0x5a, s.size(&v) - K64, K64);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(backup())
        .current_dir(dir)
        .env_remove(CRASH_ENV)
        .env("KNIB_TEST_CRASH_BEFORE", "writing the merged tables of")
        .output()
        .expect("knib runs");
    assert_eq!(out.status.signal(), Some(6), "knib was to abort: {}", String::from_utf8_lossy(&out.stderr));
    let root = s.active("root");
    let base = PathBuf::from(format!("{}.knib-base", root.display()));
    let r = QemuImg::new().check(&base, &Control::new()).expect("qemu-img check runs");
    assert!(r.leaks > 0 && r.corruptions == 0, "the killed merge was to leak clusters in {}: {r:?}", base.display());
    // Backups to the end of the chain and past it; each leaves the disks and
    // their bases clean, and the last restores to the disks as they are.
    for i in 0..3 {
        guest_writes(&s, &mut rng);
        let refs = references(&s, dir, &format!("after{i}"));
        let b = ok_json(&backup(), dir);
        s.check_primary(&format!("backup {i} after the killed merge"));
        let id = b["id"].as_str().unwrap();
        for (v, r) in &refs {
            let to = dir.join(format!("restored-{v}.raw"));
            let _ = std::fs::remove_file(&to);
            let args = ["restore", "--store", &st, id, "--volume", v, "--to", to.to_str().unwrap(), "--format", "raw"];
            let out = knib(&strs(&args), None, dir);
            assert!(out.status.success(), "restore {id} {v}: {}", String::from_utf8_lossy(&out.stderr));
            assert_identical(&to, r);
        }
    }
}

// ------------------------------------------------- the chain and its deltas

fn plain_args(store: &Path, disks: &Plain) -> Vec<String> {
    let mut a = strs(&["--json", "backup", "--store", store.to_str().unwrap()]);
    a.extend(disks.backup_args());
    a
}

/// A second store backing up the same disks empties their deltas: the first
/// store must not build an incremental on its own head, which the deltas no
/// longer follow (it would silently lack the writes in between).
#[test]
fn a_delta_emptied_for_another_store_makes_the_next_backup_full_and_says_why() {
    let d = tempfile::tempdir().unwrap();
    let disks = Plain::make(d.path());
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let mut rng = Rng::new(0x5eed_0100);
    ok_json(&plain_args(&a, &disks), d.path());
    guest_writes(&disks, &mut rng);
    ok_json(&plain_args(&b, &disks), d.path());
    guest_writes(&disks, &mut rng);
    let refs = references(&disks, d.path(), "now");
    let m = ok_json(&plain_args(&a, &disks), d.path());
    assert_eq!(m["kind"], "full", "{m}");
    let why = m["full_reason"].as_str().unwrap_or_default();
    assert!(why.contains("not a backup of web in this store"), "{m}");
    for (v, r) in &refs {
        let to = d.path().join(format!("{v}.raw"));
        let args = [
            "restore",
            "--store",
            a.to_str().unwrap(),
            m["id"].as_str().unwrap(),
            "--volume",
            v,
            "--to",
            to.to_str().unwrap(),
            "--format",
            "raw",
        ];
        let out = knib(&strs(&args), None, d.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_identical(&to, r);
    }
}

/// `state.json` is a cache: a stale one (a store put back from a copy, or a
/// crash right after publishing) does not make the next incremental follow
/// an older backup than the one the deltas follow.
#[test]
fn a_stale_state_does_not_move_the_parent_of_the_next_incremental() {
    let d = tempfile::tempdir().unwrap();
    let disks = Plain::make(d.path());
    let store = d.path().join("store");
    let mut rng = Rng::new(0x5eed_0200);
    ok_json(&plain_args(&store, &disks), d.path());
    let state = store.join("vms/web/state.json");
    let old_state = std::fs::read(&state).unwrap();
    guest_writes(&disks, &mut rng);
    let b2 = ok_json(&plain_args(&store, &disks), d.path());
    std::fs::write(&state, old_state).unwrap();
    guest_writes(&disks, &mut rng);
    let refs = references(&disks, d.path(), "now");
    let b3 = ok_json(&plain_args(&store, &disks), d.path());
    assert_eq!(b3["kind"], "incremental", "{b3}");
    assert_eq!(b3["parent"], b2["id"], "{b3}");
    for (v, r) in &refs {
        let to = d.path().join(format!("{v}.raw"));
        let args = [
            "restore",
            "--store",
            store.to_str().unwrap(),
            b3["id"].as_str().unwrap(),
            "--volume",
            v,
            "--to",
            to.to_str().unwrap(),
            "--format",
            "raw",
        ];
        let out = knib(&strs(&args), None, d.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_identical(&to, r);
    }
}

// ----------------------------------------------------- libvirt domains

#[cfg(feature = "libvirt")]
mod domains {
    use super::*;
    use common::model::Model;
    use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};

    /// The files of a disk's chain, active first (qemu-img's view: the
    /// definition of a stopped domain does not list backing files).
    fn chain(file: &Path) -> Vec<PathBuf> {
        let out = Command::new("qemu-img")
            .args(["info", "-U", "--backing-chain", "--output=json"])
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().iter().map(|i| PathBuf::from(i["filename"].as_str().unwrap())).collect()
    }

    /// Before `recover`, a domain whose backup was interrupted (its journal
    /// still in the store) refuses another backup by either method: exit
    /// status 21 (VM left inconsistent), the interrupted step named and
    /// "run `knib recover` first", and nothing of the store changed but
    /// the half-written `.part` files any operation on the VM sweeps (as
    /// `recover` does first).
    fn refused_until_recovered(store: &str, domain: &str, cwd: &Path) {
        let root = cwd.join(store);
        let vm_dir = root.join("vms").join(domain);
        if !["journal.json", "bitmap-journal.json"].iter().any(|j| vm_dir.join(j).exists()) {
            return;
        }
        let kept = || {
            let mut t = common::disk::tree(&root);
            t.retain(|p, _| !p.components().any(|c| c.as_os_str().to_string_lossy().ends_with(".part")));
            t
        };
        let before = kept();
        for method in ["snapshot", "bitmap"] {
            let out = knib(&strs(&["backup", "--store", store, "--domain", domain, "--method", method]), None, cwd);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(21), "a {method} backup after a crash: {err}");
            assert!(
                err.contains(&format!("of domain {domain} was interrupted at its "))
                    && err.contains(" step; run `knib recover` first"),
                "a {method} backup after a crash: {err}"
            );
        }
        assert_eq!(kept(), before, "a refused backup changed the store");
    }

    struct Stopped {
        vm: TestVm,
        sizes: Vec<(String, u64)>,
    }

    impl Stopped {
        fn make(dir: &Path) -> Stopped {
            let disks = [("vda", 8 * MIB), ("vdb", 4 * MIB)];
            let vm = TestVm::define_stopped("knib-crashstep", &disks, dir);
            Stopped { vm, sizes: disks.iter().map(|(t, s)| (t.to_string(), *s)).collect() }
        }
    }

    impl Subject for Stopped {
        fn volumes(&self) -> Vec<String> {
            self.sizes.iter().map(|s| s.0.clone()).collect()
        }
        fn backup_args(&self) -> Vec<String> {
            strs(&["--domain", self.vm.name()])
        }
        fn active(&self, v: &str) -> PathBuf {
            self.vm.disk(v).file
        }
        fn size(&self, v: &str) -> u64 {
            self.sizes.iter().find(|s| s.0 == v).unwrap().1
        }
        fn after_crash(&self, store: &str, cwd: &Path) {
            refused_until_recovered(store, self.vm.name(), cwd);
            let out = knib(&strs(&["--json", "recover", "--store", store, "--domain", self.vm.name()]), None, cwd);
            assert!(out.status.success(), "recover: {}", String::from_utf8_lossy(&out.stderr));
        }
        fn check_primary(&self, what: &str) {
            let mut in_chains = Vec::new();
            for d in self.vm.disks() {
                let files = chain(&d.file);
                assert!(files.len() <= 2, "{what}: {} runs on {files:?}", d.target);
                assert_eq!(*files.last().unwrap(), self.vm.initial_file(&d.target), "{what}");
                assert_check_clean(&d.file);
                in_chains.extend(files);
            }
            let dir = self.vm.initial_file("vda").parent().unwrap().to_path_buf();
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.to_string_lossy().contains(".knib-delta-") {
                    assert!(in_chains.contains(&p), "{what}: {} is out of every chain", p.display());
                }
            }
        }
    }

    /// A running domain: guest writes through QEMU's monitor, recorded in a
    /// model from which every reference is rebuilt.
    struct Running {
        vm: TestVm,
        model: std::cell::RefCell<Model>,
        next: std::cell::RefCell<BTreeMap<String, u64>>,
    }

    impl Running {
        fn make(dir: &Path) -> Running {
            let disks = [("vda", 64 * MIB), ("vdb", 32 * MIB)];
            let opts = TestVmOptions { persistent: false, running: true, agent_channel: false };
            let vm = TestVm::create("knib-crashrun", &disks, dir, opts);
            Running { vm, model: std::cell::RefCell::new(Model::new(&disks)), next: Default::default() }
        }
    }

    impl Subject for Running {
        fn volumes(&self) -> Vec<String> {
            self.model.borrow().targets.iter().map(|t| t.0.clone()).collect()
        }
        fn backup_args(&self) -> Vec<String> {
            strs(&["--domain", self.vm.name()])
        }
        fn active(&self, v: &str) -> PathBuf {
            self.vm.disk(v).file
        }
        fn size(&self, v: &str) -> u64 {
            let m = self.model.borrow();
            m.targets[m.idx(v)].1
        }
        fn place(&self, v: &str, _rng: &mut Rng, len: u64) -> u64 {
            // The model needs writes that do not overlap.
            let mut next = self.next.borrow_mut();
            let at = next.entry(v.to_string()).or_insert(0);
            let off = *at;
            *at += len;
            assert!(*at <= self.size(v), "the test ran out of room on {v}");
            off
        }
        fn write(&self, v: &str, pattern: u8, off: u64, len: u64) {
            self.model.borrow_mut().write(&self.vm, v, pattern, off, len);
        }
        fn reference(&self, v: &str, dest: &Path) {
            let m = self.model.borrow();
            m.build(v, m.writes.len(), dest);
        }
        fn check_now(&self, _v: &str, _reference: &Path) {
            self.model.borrow().assert_vm_reads_everything(&self.vm);
        }
        fn after_crash(&self, store: &str, cwd: &Path) {
            refused_until_recovered(store, self.vm.name(), cwd);
            let out = knib(&strs(&["--json", "recover", "--store", store, "--domain", self.vm.name()]), None, cwd);
            assert!(out.status.success(), "recover: {}", String::from_utf8_lossy(&out.stderr));
        }
        fn check_primary(&self, what: &str) {
            assert!(self.vm.vm.is_running().unwrap(), "{what}: the domain stopped");
            for d in self.vm.disks() {
                let files = d.chain_files();
                assert!(files.len() <= 2, "{what}: {} runs on {files:?}", d.target);
                assert_eq!(*files.last().unwrap(), self.vm.initial_file(&d.target), "{what}");
            }
        }
    }

    /// Ignored by default: on this host a block commit of the old delta in
    /// a normal (not crashed) backup now and then fails its "chain shrank"
    /// check in `libvirt::blockjob` (seen twice in ~20 cases, each time in
    /// a backup after a recovery, never at a crash point). Run with
    /// `--ignored`.
    #[test]
    #[ignore = "a block commit now and then fails its chain check in a normal backup; see the doc comment"]
    fn running_domain_incremental_backup_crashed_at_every_step() {
        if skip_without_libvirt("crash at every step of a running domain's backup") {
            return;
        }
        every_step(&Running::make, 0x5eed_2001, 2, "8", &[]);
    }

    #[test]
    fn stopped_domain_incremental_backup_crashed_at_every_step() {
        if skip_without_libvirt("crash at every step of a domain backup") {
            return;
        }
        every_step(&Stopped::make, 0x5eed_1001, 2, "8", &[]);
    }

    #[test]
    fn stopped_domain_first_full_and_end_of_chain_backups_crashed_at_every_step() {
        if skip_without_libvirt("crash at every step of a domain backup") {
            return;
        }
        every_step(&Stopped::make, 0x5eed_1002, 0, "8", &[]);
        every_step(&Stopped::make, 0x5eed_1003, 1, "2", &[]);
    }
}

//! A store is untrusted input (issue 13, section 3): a real store with real
//! backups is tampered with in every kind of file it holds (manifests,
//! state, journal, job files, settings, the qcow2 backing pointers, links
//! at every directory level and in place of every file, stray entries), the
//! cases generated from a fixed seed; every operation is run on each, and
//! each must either refuse with the exact error kind naming the file, or
//! work; and a canary directory beside the store must be unchanged, byte
//! for byte and mtime for mtime, after every operation.

mod common;
#[path = "common/gen.rs"]
mod gen;

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::disk::*;
use gen::Rng;
use knib_core::catalog::jobs::{run_jobs, RunOptions};
use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::CompressOptions;
use knib_core::qemu_img::ImageFormat;
use knib_core::{Control, ErrorKind, KnibError};

const SEED: u64 = 0x5eed_0013;

/// Every entry under `dir`: kind, bytes (or link target) and mtime.
fn canary_state(dir: &Path) -> BTreeMap<PathBuf, (String, Vec<u8>, i64, i64)> {
    let mut out = BTreeMap::new();
    fn walk(d: &Path, out: &mut BTreeMap<PathBuf, (String, Vec<u8>, i64, i64)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let (kind, bytes) = if m.file_type().is_symlink() {
                ("link", std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes())
            } else if m.is_dir() {
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&p).unwrap())
            };
            out.insert(p.clone(), (kind.to_string(), bytes, m.mtime(), m.mtime_nsec()));
            if m.is_dir() {
                walk(&p, out);
            }
        }
    }
    walk(dir, &mut out);
    out
}

type Canary = BTreeMap<PathBuf, (String, Vec<u8>, i64, i64)>;

/// Panic naming every entry of the canary that changed, appeared or went.
fn assert_canary(before: &Canary, after: &Canary, what: &str) {
    let mut changed: Vec<String> = Vec::new();
    for (p, v) in before {
        match after.get(p) {
            None => changed.push(format!("{} was removed", p.display())),
            Some(w) if w != v => changed.push(format!("{} changed", p.display())),
            _ => {}
        }
    }
    changed.extend(after.keys().filter(|p| !before.contains_key(*p)).map(|p| format!("{} appeared", p.display())));
    assert!(changed.is_empty(), "{what}: the canary beside the store changed: {}", changed.join(", "));
}

/// A store with three backups of two volumes (full, incremental,
/// incremental), built once, and the disks it was taken from.
struct Pristine {
    _disks: TestDisks,
    dir: tempfile::TempDir,
    ids: Vec<String>,
    /// The disks' directory as it was after the three backups: a backup
    /// changes the disks (and their `.knib-since` markers), so each case
    /// starts from these files again.
    disks_saved: tempfile::TempDir,
}

impl Pristine {
    fn build() -> Pristine {
        let disks = TestDisks::two();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path().join("store")).unwrap();
        let mut ids = Vec::new();
        for i in 0..3u8 {
            qemu_io(disks.path("root"), &format!("write -P {} {}M 1M", 0x40 + i, i));
            qemu_io(disks.path("data"), &format!("write -P {} {}M 64k", 0x50 + i, i + 1));
            ids.push(store.backup("vm1", &disks.disks, &BackupOptions::default(), &Control::new()).unwrap().id);
        }
        let disks_saved = tempfile::tempdir().unwrap();
        copy_dir_files(disks.dir.path(), disks_saved.path());
        Pristine { _disks: disks, dir, ids, disks_saved }
    }

    /// Put the disks back as they were after the three backups.
    fn reset_disks(&self) {
        for e in std::fs::read_dir(self._disks.dir.path()).unwrap().flatten() {
            std::fs::remove_file(e.path()).unwrap();
        }
        copy_dir_files(self.disks_saved.path(), self._disks.dir.path());
    }

    /// A fresh copy of the store in `into/store`, with a canary directory
    /// `into/outside` beside it: a qcow2 image with data, a plain file, and
    /// a copy of the VM's directory (a target for links).
    fn copy(&self, into: &Path) -> (PathBuf, PathBuf) {
        let (store, outside) = (into.join("store"), into.join("outside"));
        let st = Command::new("cp").arg("-a").arg(self.dir.path().join("store")).arg(&store).status().unwrap();
        assert!(st.success());
        std::fs::create_dir(&outside).unwrap();
        make_disk(&outside.join("victim.qcow2"), 4 << 20, &[]);
        qemu_io(&outside.join("victim.qcow2"), "write -P 0x5a 0 1M");
        std::fs::write(outside.join("secret"), b"not knib's").unwrap();
        let st = Command::new("cp").arg("-a").arg(store.join("vms/vm1")).arg(outside.join("vm1")).status().unwrap();
        assert!(st.success());
        (store, outside)
    }
}

/// Copy the files of directory `from` into `to` (keeping modes and times).
fn copy_dir_files(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let st = Command::new("cp").arg("-a").arg(e.path()).arg(to.join(e.file_name())).status().unwrap();
        assert!(st.success());
    }
}

/// What an operation must do on a tampered store.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Fail with this kind, naming the tampered file.
    Fail(ErrorKind),
    /// Succeed.
    Works,
    /// Either (the tampering does not concern it); the canary still holds.
    Any,
    /// A backup that cannot read the chain the disks follow: it fails with
    /// `corrupt` naming the file, or it skips what it cannot read and takes
    /// a full backup saying why (`full_reason`).
    FullOrFail,
}

thread_local! {
    /// The `full_reason` of the last backup `run` took.
    static LAST_FULL_REASON: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}
use Want::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    List,
    Show,
    Restore,
    Compress,
    Verify,
    Backup,
    Delete,
    Jobs,
}
const OPS: [Op; 8] = [Op::List, Op::Show, Op::Restore, Op::Verify, Op::Compress, Op::Backup, Op::Jobs, Op::Delete];

/// Tampers with a store (its root, the canary directory beside it).
type Tamper = Box<dyn Fn(&Path, &Path)>;
/// What each operation must do after a tampering.
type WantFn = Box<dyn Fn(Op) -> Want>;

/// One tampering: what it does to the store, the text every refusal must
/// contain (the file it names), and what each operation must do.
struct Case {
    name: String,
    tamper: Tamper,
    names: String,
    want: WantFn,
}

fn edit_manifest(store: &Path, id: &str, f: &dyn Fn(&mut serde_json::Value)) {
    let p = store.join("vms/vm1").join(id).join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Replace `path` (file or directory) by a link to `target`.
fn replace_by_link(path: &Path, target: &Path) {
    if path.is_dir() {
        std::fs::remove_dir_all(path).unwrap();
    } else {
        std::fs::remove_file(path).unwrap();
    }
    symlink(target, path).unwrap();
}

fn run(op: Op, store: &Store, id: &str, scratch: &Path, disks: &TestDisks) -> Result<(), KnibError> {
    let ctl = Control::new();
    match op {
        Op::List => store.list(None).map(drop),
        Op::Show => store.show(id).map(drop),
        Op::Restore => {
            let to = scratch.join(format!("restored-{}.raw", rand_suffix()));
            store.restore(id, "root", &to, ImageFormat::Raw, &ctl)
        }
        Op::Compress => store.compress(id, &CompressOptions::default(), &ctl).map(drop),
        Op::Verify => {
            let r = store.verify(Some(id), &ctl)?;
            if r[0].ok {
                Ok(())
            } else {
                Err(KnibError::corrupt(r[0].problems.join("; ")))
            }
        }
        Op::Backup => store.backup("vm1", &disks.disks, &BackupOptions::default(), &ctl).map(|m| {
            LAST_FULL_REASON.with(|r| *r.borrow_mut() = m.full_reason.clone());
        }),
        Op::Delete => store.delete(id).map(drop),
        Op::Jobs => {
            store.queue_compression(id)?;
            let s = run_jobs(store, &RunOptions { no_wait: true, ..Default::default() })?;
            match store.jobs()?.last().and_then(|j| j.last_error.clone()) {
                Some(e) if !s.done.is_empty() || !s.failed.is_empty() || !s.retried.is_empty() => {
                    if s.done.is_empty() {
                        Err(KnibError::corrupt(e))
                    } else {
                        Ok(())
                    }
                }
                _ => Ok(()),
            }
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// The escapes a tampered path may take, chosen by the seed.
fn escape(rng: &mut Rng, outside: &Path, file: &str) -> String {
    match rng.below(4) {
        0 => outside.join(file).display().to_string(),
        1 => format!("../../../outside/{file}"),
        2 => format!("../../../../{}", outside.join(file).strip_prefix("/").unwrap().display()),
        _ => format!("./../../../outside/{file}"),
    }
}

fn cases(rng: &mut Rng, ids: &[String]) -> Vec<Case> {
    let mut out: Vec<Case> = Vec::new();
    let last = ids[2].clone();
    let pick = |rng: &mut Rng| ids[rng.below(3) as usize].clone();
    let manifest_of = |id: &str| format!("vms/vm1/{id}/manifest.json");
    // A manifest must hold plain names only.
    for field in ["file", "backing", "parent", "id", "vm", "name", "hash", "dup_file", "unknown"] {
        let id = if matches!(field, "backing" | "parent") { ids[1 + rng.below(2) as usize].clone() } else { pick(rng) };
        let vol = ["root", "data"][rng.below(2) as usize];
        let seed = rng.next();
        let (tid, f2) = (id.clone(), field);
        let tamper: Tamper = Box::new(move |store: &Path, outside: &Path| {
            let mut r = Rng::new(seed);
            let p = store.join("vms/vm1").join(&tid).join("manifest.json");
            if f2 == "dup_file" {
                // The second `file` would win in a map; it must be refused.
                let text = std::fs::read_to_string(&p).unwrap();
                let evil = escape(&mut r, outside, "victim.qcow2");
                let text = text.replacen(
                    &format!("\"file\": \"{vol}.qcow2\""),
                    &format!("\"file\": \"{vol}.qcow2\", \"file\": {}", serde_json::to_string(&evil).unwrap()),
                    1,
                );
                std::fs::write(&p, text).unwrap();
                return;
            }
            edit_manifest(store, &tid, &|m| {
                let v = m["volumes"].as_array_mut().unwrap().iter_mut().find(|v| v["name"] == vol).unwrap();
                let mut r = Rng::new(seed);
                match f2 {
                    "file" => v["file"] = escape(&mut r, outside, "victim.qcow2").into(),
                    "backing" => v["backing"] = escape(&mut r, outside, "victim.qcow2").into(),
                    "name" => v["name"] = "../../outside".into(),
                    "hash" => {
                        v["hash"] =
                            ["..", "../../outside", "", "0123456789ABCDEF0123456789abcdef"][r.below(4) as usize].into()
                    }
                    "parent" => m["parent"] = ["../../../outside", "/tmp", "..", "x/../.."][r.below(4) as usize].into(),
                    "id" => m["id"] = "other-id".into(),
                    "vm" => m["vm"] = "vm2".into(),
                    _ => m["evil"] = 1.into(),
                }
            });
        });
        // The tampered backup and every backup whose chain reads it fail.
        let pos = ids.iter().position(|i| *i == id).unwrap();
        let (ids2, id2) = (ids.to_vec(), id.clone());
        out.push(Case {
            name: format!("manifest {field} of {id} ({vol})"),
            tamper,
            names: manifest_of(&id),
            want: Box::new(move |op| match op {
                Op::List => Works,
                Op::Show | Op::Restore | Op::Compress | Op::Verify | Op::Jobs if ids2[2] == id2 => {
                    Fail(ErrorKind::Corrupt)
                }
                Op::Restore | Op::Verify if pos < 2 => Fail(ErrorKind::Corrupt),
                Op::Backup => FullOrFail,
                _ => Any,
            }),
        });
    }
    // A compression's next manifest, as a crash between its steps leaves
    // it: it must be the same backup but for hashes, sizes and
    // `compression`, and a file, not a link; a `.comp` it leaves for
    // renaming must be a file too.
    for kind in ["parent", "file", "link", "comp-link", "comp-hard-link"] {
        let (tid, seed) = (last.clone(), rng.next());
        let tamper: Tamper = Box::new(move |store: &Path, outside: &Path| {
            let dir = store.join("vms/vm1").join(&tid);
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            m["compression"] = serde_json::json!({"library": "zstd", "original_size": 1, "size": 1});
            let mut r = Rng::new(seed);
            match kind {
                "parent" => m["parent"] = escape(&mut r, outside, "x").into(),
                "file" => m["volumes"][0]["file"] = "other.qcow2".into(),
                _ => {}
            }
            let next = dir.join("manifest.next.json");
            let text = serde_json::to_vec_pretty(&m).unwrap();
            if kind == "link" {
                std::fs::write(outside.join("next.json"), &text).unwrap();
                symlink(outside.join("next.json"), &next).unwrap();
            } else {
                std::fs::write(&next, &text).unwrap();
            }
            if kind == "comp-link" {
                std::fs::write(outside.join("victim.comp"), b"not a qcow2").unwrap();
                symlink(outside.join("victim.comp"), dir.join("root.qcow2.comp")).unwrap();
            }
            if kind == "comp-hard-link" {
                std::fs::write(outside.join("victim.comp"), b"not a qcow2").unwrap();
                std::fs::hard_link(outside.join("victim.comp"), dir.join("root.qcow2.comp")).unwrap();
            }
        });
        out.push(Case {
            name: format!("next manifest ({kind}) of {last}"),
            tamper,
            names: if kind.starts_with("comp-") {
                format!("vms/vm1/{last}/root.qcow2.comp")
            } else {
                format!("vms/vm1/{last}/manifest.next.json")
            },
            want: Box::new(|op| if op == Op::List { Works } else { Fail(ErrorKind::Corrupt) }),
        });
    }
    // Links at every level of the store, and in place of every file.
    let target = last.clone();
    let vol: &'static str = ["root", "data"][rng.below(2) as usize];
    let links: Vec<(&str, String, String, WantFn)> = vec![
        (
            "vms",
            "vms".into(),
            "outside".into(),
            Box::new(|op| if op == Op::Backup { Fail(ErrorKind::Corrupt) } else { Any }),
        ),
        (
            "vms/vm1",
            "vms/vm1".into(),
            "outside/vm1".into(),
            Box::new(|op| match op {
                Op::List => Works,
                Op::Backup => Fail(ErrorKind::Corrupt),
                _ => Any,
            }),
        ),
        (
            "backup dir",
            format!("vms/vm1/{target}"),
            format!("outside/vm1/{target}"),
            Box::new(move |op| match op {
                Op::List => Works,
                Op::Backup => FullOrFail,
                Op::Show | Op::Restore | Op::Compress | Op::Verify | Op::Delete | Op::Jobs => Fail(ErrorKind::Corrupt),
            }),
        ),
        (
            "volume file",
            format!("vms/vm1/{target}/{vol}.qcow2"),
            format!("outside/vm1/{target}/{vol}.qcow2"),
            Box::new(move |op| match op {
                Op::List | Op::Show => Works,
                Op::Compress | Op::Verify | Op::Backup | Op::Jobs => Fail(ErrorKind::Corrupt),
                Op::Restore if vol == "root" => Fail(ErrorKind::Corrupt),
                _ => Any,
            }),
        ),
        (
            "parent's volume file",
            format!("vms/vm1/{}/{vol}.qcow2", ids[0]),
            format!("outside/vm1/{}/{vol}.qcow2", ids[0]),
            Box::new(move |op| match op {
                Op::List | Op::Show => Works,
                Op::Compress | Op::Verify | Op::Backup | Op::Jobs => Fail(ErrorKind::Corrupt),
                Op::Restore if vol == "root" => Fail(ErrorKind::Corrupt),
                _ => Any,
            }),
        ),
        (
            "manifest",
            format!("vms/vm1/{target}/manifest.json"),
            format!("outside/vm1/{target}/manifest.json"),
            Box::new(move |op| match op {
                Op::List => Works,
                Op::Backup => FullOrFail,
                Op::Show | Op::Restore | Op::Compress | Op::Verify | Op::Jobs => Fail(ErrorKind::Corrupt),
                _ => Any,
            }),
        ),
        // state.json is only a cache of the head: a backup follows the
        // disks' deltas and repairs it (the link is replaced, not followed).
        (
            "state",
            "vms/vm1/state.json".into(),
            "outside/vm1/state.json".into(),
            Box::new(|op| if op == Op::Backup { Works } else { Any }),
        ),
        (
            "lock",
            "vms/vm1/.lock".into(),
            "outside/secret".into(),
            Box::new(move |op| match op {
                Op::Backup | Op::Compress | Op::Delete => Fail(ErrorKind::Corrupt),
                Op::List | Op::Show | Op::Restore => Works,
                _ => Any,
            }),
        ),
        (
            "settings",
            "knib.json".into(),
            "outside/knib.json".into(),
            Box::new(|op| match op {
                Op::List | Op::Show | Op::Delete => Works,
                Op::Restore | Op::Compress | Op::Backup | Op::Jobs => Fail(ErrorKind::Corrupt),
                Op::Verify => Any,
            }),
        ),
        (
            "jobs dir",
            "jobs".into(),
            "outside/jobs".into(),
            Box::new(|op| if op == Op::Jobs { Fail(ErrorKind::Corrupt) } else { Any }),
        ),
    ];
    for (what, rel, to, want) in links {
        let (rel2, to2) = (rel.clone(), to.clone());
        out.push(Case {
            name: format!("link: {what}"),
            tamper: Box::new(move |store: &Path, outside: &Path| {
                let at = store.join(&rel2);
                let dest = outside.parent().unwrap().join(&to2);
                if rel2 == "knib.json" {
                    std::fs::write(&dest, b"{\"schema\": 1}").unwrap();
                } else if rel2 == "jobs" {
                    std::fs::create_dir_all(&dest).unwrap();
                }
                if at.exists() || std::fs::symlink_metadata(&at).is_ok() {
                    replace_by_link(&at, &dest);
                } else {
                    symlink(&dest, &at).unwrap();
                }
            }),
            names: rel,
            want,
        });
    }
    // The VM's lock file as a hard link to a file outside: the operations
    // that take the lock refuse it, and none writes the file (they
    // truncated it and wrote their name into it).
    out.push(Case {
        name: "hard link: the VM's lock file".into(),
        tamper: Box::new(|store: &Path, outside: &Path| {
            let lock = store.join("vms/vm1/.lock");
            let _ = std::fs::remove_file(&lock);
            std::fs::hard_link(outside.join("secret"), &lock).unwrap();
        }),
        names: "vms/vm1/.lock is a file with 2 names (a hard link)".into(),
        want: Box::new(|op| match op {
            Op::Backup | Op::Delete | Op::Compress => Fail(ErrorKind::Corrupt),
            _ => Any,
        }),
    });
    // The qcow2 backing pointer of a backup file, rewritten to leave the
    // chain: restore and verify must not read through it.
    for form in 0..3 {
        let id = ids[1 + rng.below(2) as usize].clone();
        let tid = id.clone();
        let last2 = last.clone();
        let seed = rng.next();
        out.push(Case {
            name: format!("qcow2 backing pointer of {id}/root.qcow2, form {form}"),
            tamper: Box::new(move |store: &Path, outside: &Path| {
                let mut r = Rng::new(seed);
                let b = match form {
                    0 => outside.join("victim.qcow2").display().to_string(),
                    1 => format!("../{}", escape(&mut r, outside, "victim.qcow2")),
                    _ => format!(
                        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
                        outside.join("victim.qcow2").display()
                    ),
                };
                let f = store.join("vms/vm1").join(&tid).join("root.qcow2");
                let st = Command::new("qemu-img")
                    .args(["rebase", "-u", "-F", "qcow2", "-b"])
                    .arg(&b)
                    .arg(&f)
                    .status()
                    .unwrap();
                assert!(st.success());
            }),
            names: format!("vms/vm1/{id}/root.qcow2"),
            want: Box::new(move |op| match op {
                Op::List | Op::Show => Works,
                Op::Restore | Op::Verify => Fail(ErrorKind::Corrupt),
                Op::Compress | Op::Backup | Op::Jobs if id == last2 => Fail(ErrorKind::Corrupt),
                _ => Any,
            }),
        });
    }
    // state.json: a head that is not a plain name, a repeated key.
    for (what, text) in [
        ("head escapes", format!("{{\"schema\": 1, \"head\": \"../../outside/vm1/{}\"}}", ids[2])),
        ("repeated head", format!("{{\"schema\": 1, \"head\": \"{}\", \"head\": \"../../x\"}}", ids[2])),
        ("unknown field", format!("{{\"schema\": 1, \"head\": \"{}\", \"evil\": 1}}", ids[2])),
    ] {
        out.push(Case {
            name: format!("state: {what}"),
            tamper: Box::new(move |store: &Path, _| std::fs::write(store.join("vms/vm1/state.json"), &text).unwrap()),
            names: "vms/vm1/state.json".into(),
            // state.json is only a cache: the backup follows the deltas.
            want: Box::new(|op| if op == Op::Backup { Works } else { Any }),
        });
    }
    // Settings: a key given twice.
    out.push(Case {
        name: "settings: repeated key".into(),
        tamper: Box::new(|store: &Path, _| {
            std::fs::write(
                store.join("knib.json"),
                "{\"schema\": 1, \"knib.data.path\": \"native\", \"knib.data.path\": \"qemu-img\"}",
            )
            .unwrap()
        }),
        names: "knib.json".into(),
        want: Box::new(|op| match op {
            Op::Restore | Op::Compress | Op::Backup | Op::Jobs => Fail(ErrorKind::InvalidInput),
            _ => Any,
        }),
    });
    out
}

fn check(case: &Case, op: Op, r: &Result<(), KnibError>) {
    let ctx = format!("{} / {op:?}", case.name);
    match ((case.want)(op), r) {
        (Fail(kind), Err(e)) => {
            assert_eq!(e.kind, kind, "{ctx}: {e}");
            assert!(e.message.contains(&case.names), "{ctx}: the error must name {}: {e}", case.names);
        }
        (Fail(kind), Ok(())) => panic!("{ctx}: must fail with {kind}, but worked"),
        (FullOrFail, Err(e)) => {
            assert_eq!(e.kind, ErrorKind::Corrupt, "{ctx}: {e}");
            assert!(e.message.contains(&case.names), "{ctx}: the error must name {}: {e}", case.names);
        }
        (FullOrFail, Ok(())) => {
            let why = LAST_FULL_REASON.with(|r| r.borrow().clone());
            assert!(why.is_some(), "{ctx}: a backup over a chain it cannot read must be full and say why");
        }
        (Works, Err(e)) => panic!("{ctx}: must work: {e}"),
        _ => {}
    }
}

#[test]
fn tampered_stores_are_refused_and_nothing_outside_is_touched() {
    let pristine = Pristine::build();
    let mut rng = Rng::new(SEED);
    let all = cases(&mut rng, &pristine.ids);
    let mut failures = Vec::new();
    for case in &all {
        for op in OPS {
            let work = tempfile::tempdir().unwrap();
            if op == Op::Backup {
                pristine.reset_disks();
            }
            let (root, outside) = pristine.copy(work.path());
            (case.tamper)(&root, &outside);
            let before = canary_state(&outside);
            let store = Store::open(&root).unwrap();
            let r = run(op, &store, &pristine.ids[2], work.path(), &pristine._disks);
            let after = canary_state(&outside);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check(case, op, &r);
                assert_canary(&before, &after, &format!("{} / {op:?} ({r:?})", case.name));
            }));
            if let Err(p) = result {
                let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
                failures.push(msg);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}",
        failures.len(),
        all.len() * OPS.len(),
        failures.join("\n")
    );
}

#[test]
fn stray_entries_are_skipped_by_list_and_delete() {
    let pristine = Pristine::build();
    let work = tempfile::tempdir().unwrap();
    let (root, outside) = pristine.copy(work.path());
    let before = canary_state(&outside);
    let vm = root.join("vms/vm1");
    std::fs::create_dir(root.join("vms/lost+found")).unwrap();
    std::fs::create_dir(vm.join("lost+found")).unwrap();
    std::fs::create_dir(vm.join("20260101-000000000-0000")).unwrap();
    std::fs::write(vm.join("notes.txt"), b"x").unwrap();
    std::fs::create_dir(vm.join("garbage")).unwrap();
    std::fs::write(vm.join("garbage/manifest.json"), b"{ not json").unwrap();
    symlink(outside.join("vm1"), root.join("vms/vm9")).unwrap();
    let store = Store::open(&root).unwrap();
    let ids: Vec<String> = store.list(None).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, pristine.ids, "the three backups, and nothing else");
    let e = store.show("garbage").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("vms/vm1/garbage/manifest.json"), "{e}");
    // A verify of every backup does not skip it: it is reported, failed,
    // under its directory's name (and the directory without a manifest is
    // no backup).
    let reports = store.verify(None, &Control::new()).unwrap();
    let got: Vec<(&str, bool)> = reports.iter().map(|r| (r.id.as_str(), r.ok)).collect();
    let mut want: Vec<(&str, bool)> = pristine.ids.iter().map(|i| (i.as_str(), true)).collect();
    want.push(("garbage", false));
    assert_eq!(got, want, "{reports:?}");
    let bad = &reports[3];
    assert_eq!((bad.files_checked, bad.problems.len()), (0, 1), "{bad:?}");
    assert!(
        bad.problems[0].starts_with("VM vm1: manifest ") && bad.problems[0].contains("vms/vm1/garbage/manifest.json"),
        "{bad:?}"
    );
    // The last backup goes; the unreadable manifest might be its child, so
    // its files are kept, marked removed.
    let out = store.delete(&pristine.ids[2]).unwrap();
    assert_eq!(out.marked_removed, vec![pristine.ids[2].clone()], "{out:?}");
    // The answer says why, naming the directory (before, only the log did).
    let why = out.kept_because.as_deref().unwrap_or_default();
    assert!(why.starts_with("the manifests of backup garbage of VM vm1 in store "), "{out:?}");
    assert!(why.contains("they may depend on it"), "{out:?}");
    assert_eq!(store.list(Some("vm1")).unwrap().len(), 2);
    std::fs::remove_dir_all(vm.join("garbage")).unwrap();
    // Leftovers of an interrupted operation that are links: the link goes,
    // never what it points to.
    symlink(outside.join("vm1"), vm.join(".20260101-000000000-0001.part")).unwrap();
    symlink(outside.join("secret"), vm.join(".20260101-000000000-0002.deleting")).unwrap();
    // With every manifest readable again, nothing needs the removed last
    // backup: it goes with the one deleted now (children first), instead of
    // keeping both on disk for good.
    let out = store.delete(&pristine.ids[1]).unwrap();
    assert_eq!(out.expunged, vec![pristine.ids[2].clone(), pristine.ids[1].clone()], "{out:?}");
    assert!(out.marked_removed.is_empty() && out.kept_because.is_none(), "{out:?}");
    assert!(!vm.join(&pristine.ids[2]).exists() && !vm.join(&pristine.ids[1]).exists());
    assert_eq!(store.list(Some("vm1")).unwrap().len(), 1);
    assert!(std::fs::symlink_metadata(vm.join(".20260101-000000000-0001.part")).is_err());
    assert!(std::fs::symlink_metadata(vm.join(".20260101-000000000-0002.deleting")).is_err());
    assert_canary(&before, &canary_state(&outside), "stray entries");
}

/// A backup copied under another VM's name (its manifest's `vm` edited to
/// match): its id names two backups, so every operation by id is refused,
/// corrupt and naming both VMs, and nothing is restored or deleted. Before,
/// the first VM listed won: the copy was the one shown, restored, compressed
/// and deleted.
#[test]
fn a_backup_id_under_two_vms_is_refused() {
    let pristine = Pristine::build();
    let work = tempfile::tempdir().unwrap();
    let (root, outside) = pristine.copy(work.path());
    let before = canary_state(&outside);
    let id = &pristine.ids[2];
    let copy = root.join("vms/vm0").join(id);
    std::fs::create_dir_all(&copy).unwrap();
    copy_dir_files(&root.join("vms/vm1").join(id), &copy);
    let p = copy.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["vm"] = "vm0".into();
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let store = Store::open(&root).unwrap();
    let want = format!(
        "backup {id} is in store {} under two VMs, vm0 and vm1: an id names one backup, so one of them was copied there; remove the copy",
        root.display()
    );
    let dest = work.path().join("restored.raw");
    let ctl = Control::new();
    let results = [
        ("show", store.show(id).map(drop)),
        ("restore", store.restore(id, "root", &dest, ImageFormat::Raw, &ctl).map(drop)),
        ("delete", store.delete(id).map(drop)),
    ];
    for (op, r) in results {
        let e = r.expect_err(op);
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::Corrupt, want.as_str()), "{op}");
    }
    assert!(!dest.exists());
    assert!(root.join("vms/vm1").join(id).join("manifest.json").exists() && p.exists());
    assert_canary(&before, &canary_state(&outside), "a backup id under two VMs");
    // The copy removed, the backup is its own again.
    std::fs::remove_dir_all(root.join("vms/vm0")).unwrap();
    assert_eq!(store.show(id).unwrap().vm, "vm1");
}

#[cfg(feature = "libvirt")]
#[path = "store_tamper/journal.rs"]
mod journal;

/// API requests refuse a key given twice too.
#[test]
fn an_api_request_with_a_key_given_twice_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let req = format!("{{\"store\": {:?}, \"store\": \"/\"}}", dir.path().display().to_string());
    let e = knib_core::api::call("list", &req, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("given twice"), "{e}");
}

/// Job files: an id, VM or backup that is not a plain name, a key given
/// twice, a link in place of the file or of the jobs directory: `corrupt`
/// naming the file, and the runner touches nothing outside.
#[test]
fn tampered_job_files_are_corrupt() {
    let pristine = Pristine::build();
    let mut rng = Rng::new(SEED ^ 2);
    let kinds = ["backup", "vm", "given twice", "link", "dir link", "unknown"];
    for round in 0..kinds.len() * 2 {
        // Each kind twice (the rest of the case drawn from the seed).
        let what = kinds[round % kinds.len()];
        let work = tempfile::tempdir().unwrap();
        let (root, outside) = pristine.copy(work.path());
        let store = Store::open(&root).unwrap();
        let job = store.queue_validation(&pristine.ids[rng.below(3) as usize]).unwrap();
        let file = root.join("jobs").join(format!("{}.json", job.id));
        let text = std::fs::read_to_string(&file).unwrap();
        let escape = escape(&mut rng, &outside, "vm1");
        match what {
            "backup" | "vm" => {
                let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v[what] = escape.into();
                std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
            }
            "given twice" => {
                let t = text.replacen("\"backup\":", &format!("\"backup\": {:?}, \"backup\":", escape), 1);
                std::fs::write(&file, t).unwrap();
            }
            "link" => {
                std::fs::write(outside.join("job.json"), &text).unwrap();
                replace_by_link(&file, &outside.join("job.json"));
            }
            "dir link" => {
                // The whole directory: its files are plain, outside.
                let jobs = outside.join("jobs");
                std::fs::create_dir(&jobs).unwrap();
                std::fs::write(jobs.join(file.file_name().unwrap()), &text).unwrap();
                std::fs::remove_dir_all(root.join("jobs")).unwrap();
                symlink(&jobs, root.join("jobs")).unwrap();
            }
            _ => {
                let t = text.replacen('{', "{\"evil\": 1, ", 1);
                std::fs::write(&file, t).unwrap();
            }
        }
        let names = if what == "dir link" { root.join("jobs") } else { file.clone() };
        let before = canary_state(&outside);
        let e = store.jobs().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.message.contains(&names.display().to_string()), "{what}: {e}");
        let e = store.job(&job.id).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.message.contains(&names.display().to_string()), "{what}: {e}");
        let e = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.message.contains(&names.display().to_string()), "{what}: {e}");
        assert_canary(&before, &canary_state(&outside), what);
    }
}

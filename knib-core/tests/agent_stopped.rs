//! The agent's backups of a stopped VM that libvirt does not know
//! (`running: false`, no `domain`: the volumes' files alone), through
//! `agent.take_backup`, `agent.cleanup_vm_backup` and
//! `agent.merge_snapshot`, with the real qemu-img and qemu-io and no
//! libvirt: seeded guest writes between backups (full, incrementals with
//! merges, end of chain, isolated), each backup restored and compared with
//! the guest's view when it was taken; a crash at every durable step of an
//! incremental backup (a child process aborted by `KNIB_TEST_CRASH_AT`)
//! followed by the cleanup (mode "complete": finished when stored; the
//! default "discard": the store files removed and the volumes back on
//! `base <- delta`), after which the next backup still holds every write;
//! a chain restored from its store moved elsewhere, and with an absolute
//! (agent-written) pointer in it; volumes a process holds QEMU's image lock on refused
//! with nothing written; and a request whose backup file or new delta
//! names a file the volume runs on or a backup it builds on refused by
//! take and cleanup alike (a cleanup removed the disk the VM ran on).

#[path = "common/disk.rs"]
mod disk;
#[path = "common/gen.rs"]
mod gen;

use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{assert_check_clean, assert_identical, contents, make_disk, qemu_io, snapshot};
use gen::Rng;
use knib_core::api::call;
use knib_core::qemu_img::QemuImg;
use knib_core::{Control, ErrorKind, KnibError};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const VOLS: [(&str, u64); 2] = [("root", 16 * MIB), ("data", 8 * MIB)];
const CHILD_ENV: &str = "KNIB_STOPPED_CHILD_REQUEST";
const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";
const NOTE_ENV: &str = "KNIB_TEST_CRASH_NOTE";

fn agent(op: &str, req: &Value) -> Result<Value, KnibError> {
    call(op, &req.to_string(), &Control::new()).map(|a| serde_json::from_str(&a).expect("answers are JSON"))
}

fn ok(op: &str, req: &Value) -> Value {
    agent(op, req).unwrap_or_else(|e| panic!("{op}: {e}\nrequest: {req:#}"))
}

/// A stopped VM's volumes in a directory, and where each runs now.
struct Vm {
    dir: PathBuf,
    store: PathBuf,
    /// (name, base, file it runs on now)
    vols: Vec<(String, PathBuf, PathBuf)>,
    rng: Rng,
}

impl Vm {
    fn new(dir: &Path, seed: u64) -> Vm {
        Vm::with_options(dir, seed, &[])
    }

    /// [`Vm::new`], the volumes made with these `qemu-img create` options.
    fn with_options(dir: &Path, seed: u64, options: &[&str]) -> Vm {
        let store = dir.join("store");
        let primary = dir.join("primary");
        std::fs::create_dir_all(&primary).unwrap();
        let vols = VOLS
            .iter()
            .map(|(n, size)| {
                let p = primary.join(format!("{n}-vol"));
                make_disk(&p, *size, options);
                (n.to_string(), p.clone(), p)
            })
            .collect();
        Vm { dir: dir.to_path_buf(), store, vols, rng: Rng::new(seed) }
    }

    /// Seeded guest writes (and a discard) into every volume's top file.
    fn write(&mut self, n: usize) {
        for ((_, _, top), (_, size)) in self.vols.iter().zip(VOLS) {
            for _ in 0..n {
                let len = (1 + self.rng.below(8)) * 16 * 1024;
                let off = self.rng.below((size - len) / 512) * 512;
                let pat = 1 + self.rng.below(250);
                qemu_io(top, &format!("write -P {pat} {off} {len}"));
            }
            let off = self.rng.below(size / MIB) * MIB;
            qemu_io(top, &format!("write -z {off} 65536"));
        }
    }

    /// The guest's view of every volume now, flattened.
    fn view(&self, tag: &str) -> Vec<PathBuf> {
        self.vols
            .iter()
            .map(|(n, _, top)| {
                let p = self.dir.join(format!("view-{n}-{tag}.qcow2"));
                snapshot(top, &p);
                p
            })
            .collect()
    }

    fn store_file(&self, backup: &str, vol: &str) -> PathBuf {
        self.store.join(backup).join(format!("{vol}.qcow2"))
    }

    /// The request of a backup named `id`, incremental over `parent`.
    fn request(&self, id: &str, parent: Option<&str>, extra: Value) -> Value {
        let volumes: Vec<Value> = self
            .vols
            .iter()
            .map(|(n, base, top)| {
                let mut v = json!({
                    "uuid": format!("uuid-{n}"),
                    "path": top,
                    "delta_path_on_primary": base.with_file_name(format!("{n}-delta-{id}")),
                    "delta_path_on_store": self.store_file(id, n),
                });
                if top != base {
                    v["merge"] = json!({"parent": base, "child": top});
                }
                if let Some(p) = parent {
                    v["parent_backup_path"] = json!(self.store_file(p, n));
                }
                v
            })
            .collect();
        let mut r = json!({"running": false, "volumes": volumes, "timeout_secs": 600});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    }

    fn take(&mut self, id: &str, parent: Option<&str>, extra: Value) -> Value {
        let a = ok("agent.take_backup", &self.request(id, parent, extra));
        self.follow(&a["volumes"], "new_volume_path");
        a
    }

    /// Each volume runs on the file the answer says.
    fn follow(&mut self, vols: &Value, field: &str) {
        for (v, a) in self.vols.iter_mut().zip(vols.as_array().unwrap()) {
            assert_eq!(a["uuid"], json!(format!("uuid-{}", v.0)));
            assert!(a["target"].is_null(), "{a}");
            v.2 = PathBuf::from(a[field].as_str().unwrap());
        }
    }

    /// Backup `id` restored with `agent.restore` equals `views`.
    fn assert_backup_is(&self, id: &str, views: &[PathBuf]) {
        for ((n, _, _), view) in self.vols.iter().zip(views) {
            let to = self.dir.join(format!("restored-{n}-{id}.qcow2"));
            let _ = std::fs::remove_file(&to);
            ok("agent.restore", &json!({"volumes": [{"backup_path": self.store_file(id, n), "volume_path": to}]}));
            assert_identical(&to, view);
        }
    }

    /// `qemu-img check` of every file on primary and on the store, and the
    /// files on primary are each volume's chain, nothing else.
    fn assert_clean(&self) {
        let q = QemuImg::new();
        let mut in_chains = Vec::new();
        for (_, _, top) in &self.vols {
            for i in q.info_chain(top, &Control::new()).unwrap() {
                in_chains.push(PathBuf::from(i.filename));
            }
        }
        for e in std::fs::read_dir(self.vols[0].1.parent().unwrap()).unwrap() {
            let p = e.unwrap().path();
            assert!(in_chains.contains(&p), "{} is left on primary, outside the chains {in_chains:?}", p.display());
            assert_check_clean(&p);
        }
        for b in std::fs::read_dir(&self.store).into_iter().flatten() {
            for f in std::fs::read_dir(b.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                assert!(p.extension().is_some_and(|x| x == "qcow2"), "{} is left on the store", p.display());
                assert_check_clean(&p);
            }
        }
    }
}

#[test]
fn full_incrementals_end_of_chain_and_isolated_without_a_domain() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 14);
    vm.write(6);
    let v1 = vm.view("b1");
    let a = vm.take("b1", None, json!({}));
    assert_eq!((a["kind"].as_str(), a["vm_consistent"].as_bool()), (Some("full"), Some(true)));
    for (v, a) in vm.vols.iter().zip(a["volumes"].as_array().unwrap()) {
        assert_eq!(v.2, v.1.with_file_name(format!("{}-delta-b1", v.0)), "runs on its new delta");
        assert_eq!(a["virtual_size"].as_u64(), VOLS.iter().find(|x| x.0 == v.0).map(|x| x.1));
        assert!(a["size"].as_u64().unwrap() > 0);
        assert_eq!(
            QemuImg::new().info(&v.2, &Control::new()).unwrap().backing_filename.as_deref(),
            Some(format!("{}-vol", v.0).as_str())
        );
    }
    vm.assert_clean();

    vm.write(5);
    let v2 = vm.view("b2");
    let a = vm.take("b2", Some("b1"), json!({}));
    assert_eq!(a["kind"], "incremental");
    // Sizes as the agent's answer carries them: each store file's apparent
    // length, keyed by uuid, and their sum.
    let mut sum = 0;
    for (v, av) in vm.vols.iter().zip(a["volumes"].as_array().unwrap()) {
        assert_eq!(av["uuid"], json!(format!("uuid-{}", v.0)));
        let len = std::fs::metadata(vm.store_file("b2", &v.0)).unwrap().len();
        assert_eq!(av["size"].as_u64(), Some(len));
        sum += len;
    }
    assert_eq!(a["total_size"].as_u64(), Some(sum));
    for v in &vm.vols {
        assert!(!v.1.with_file_name(format!("{}-delta-b1", v.0)).exists(), "the old delta is merged and removed");
        assert_eq!(disk::chain_len(&v.2), 2);
    }
    // The store's pointers are relative: the store can be mounted elsewhere.
    let b2 = QemuImg::new().info(&vm.store_file("b2", "root"), &Control::new()).unwrap();
    assert_eq!(b2.backing_filename.as_deref(), Some("../b1/root.qcow2"));
    vm.assert_clean();

    vm.write(5);
    let v3 = vm.view("b3");
    let a = vm.take("b3", Some("b2"), json!({"end_of_chain": true}));
    assert_eq!(a["kind"], "incremental");
    for v in &vm.vols {
        assert_eq!(v.2, v.1, "the chain ended: the volume runs on its base alone");
        assert_eq!(disk::chain_len(&v.2), 1);
    }
    vm.assert_clean();

    vm.write(4);
    let v4 = vm.view("b4");
    let a = vm.take("b4", None, json!({"isolated": true}));
    assert_eq!(a["kind"], "isolated");
    for v in &vm.vols {
        assert_eq!(v.2, v.1, "an isolated backup leaves the chain as it was");
    }
    vm.assert_clean();
    // And with a delta under it: still as it was.
    let a = vm.take("b5", None, json!({}));
    assert_eq!(a["kind"], "full");
    vm.write(3);
    let v6 = vm.view("b6");
    let before: Vec<PathBuf> = vm.vols.iter().map(|v| v.2.clone()).collect();
    vm.take("b6", None, json!({"isolated": true}));
    assert_eq!(vm.vols.iter().map(|v| v.2.clone()).collect::<Vec<_>>(), before);
    vm.assert_clean();

    for (id, view) in [("b1", &v1), ("b2", &v2), ("b3", &v3), ("b4", &v4), ("b6", &v6)] {
        vm.assert_backup_is(id, view);
    }
    // The guest still reads everything it wrote.
    let now = vm.view("now");
    for ((_, _, top), view) in vm.vols.iter().zip(&now) {
        assert_identical(top, view);
    }
    assert_identical(&now[0], &v6[0]);
}

/// A volume with extended L2 entries (subclusters, `extended_l2=on`) and
/// one over a template that has them (a linked clone), which the native
/// reader does not read: their copies go through qemu-img (the merges
/// through `qemu-img commit`) instead of failing the backup; a full, an
/// incremental and one that ends the chain each restore to the guest's
/// view, and every file checks clean.
#[test]
fn volumes_with_extended_l2_entries_are_backed_up_without_a_domain() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::with_options(t.path(), 41, &["-o", "extended_l2=on,cluster_size=128k"]);
    let data = vm.vols[1].1.clone();
    let template = data.with_file_name("template");
    std::fs::rename(&data, &template).unwrap();
    qemu_io(&template, "write -P 0x3c 0 3M");
    make_disk(&data, VOLS[1].1, &["-b", "template", "-F", "qcow2"]);
    vm.write(6);
    let v1 = vm.view("b1");
    assert_eq!(vm.take("b1", None, json!({}))["kind"], "full");
    vm.assert_clean();
    vm.write(5);
    let v2 = vm.view("b2");
    assert_eq!(vm.take("b2", Some("b1"), json!({}))["kind"], "incremental");
    vm.assert_clean();
    vm.write(5);
    let v3 = vm.view("b3");
    vm.take("b3", Some("b2"), json!({"end_of_chain": true}));
    vm.assert_clean();
    for (id, view) in [("b1", &v1), ("b2", &v2), ("b3", &v3)] {
        vm.assert_backup_is(id, view);
    }
    for ((_, _, top), view) in vm.vols.iter().zip(&v3) {
        assert_identical(top, view);
    }
}

#[test]
fn domain_is_required_unless_running_is_false() {
    for r in [json!({"volumes": []}), json!({"running": true, "volumes": []})] {
        let e = agent("agent.take_backup", &r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("field `domain` is missing"), "{e}");
        let e = agent("agent.cleanup_vm_backup", &r).unwrap_err();
        assert!(e.message.contains("field `domain` is missing"), "{e}");
    }
    let e = agent("agent.cleanup_vm_backup", &json!({"running": false, "volumes": [], "mode": "keep"})).unwrap_err();
    assert!(e.kind == ErrorKind::InvalidInput && e.message.contains("keep"), "{e}");
    let e = agent("agent.merge_snapshot", &json!({"merges": [{"parent": "/a", "child": "/b"}]})).unwrap_err();
    assert!(e.message.contains("field `domain` is missing"), "{e}");
    // The checks of the request name the field.
    let e = agent("agent.take_backup", &json!({"running": false, "volumes": [{"uuid": "u", "path": "rel", "delta_path_on_primary": "/d", "delta_path_on_store": "/s"}]})).unwrap_err();
    assert!(e.message.contains("volumes[0].path"), "{e}");
}

/// The child process of the crash test: runs the request in
/// `KNIB_STOPPED_CHILD_REQUEST` (the crash hook aborts it).
#[test]
fn child_take_backup() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    let r: Value = serde_json::from_str(&req).unwrap();
    let _ = call("agent.take_backup", &r.to_string(), &Control::new());
}

#[test]
fn a_crash_at_every_step_then_cleanup_complete_then_the_next_incremental_holds_every_write() {
    crash_at_every_step(Some("complete"));
}

#[test]
fn a_crash_at_every_step_then_cleanup_discard_then_the_next_backup_holds_every_write() {
    crash_at_every_step(None);
}

/// A crash at every durable step of an incremental backup, then
/// `agent.cleanup_vm_backup` with `mode` (absent: the default, "discard").
fn crash_at_every_step(mode: Option<&str>) {
    let discard = mode != Some("complete");
    let mut n = 1;
    loop {
        let t = tempfile::tempdir().unwrap();
        let mut vm = Vm::new(t.path(), 100 + n);
        vm.write(4);
        let v1 = vm.view("b1");
        vm.take("b1", None, json!({}));
        vm.write(4);
        let before = vm.view("before");
        let req = vm.request("b2", Some("b1"), json!({}));
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_take_backup", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, req.to_string())
            .env(CRASH_ENV, n.to_string())
            .env(NOTE_ENV, t.path().join("note"))
            .output()
            .unwrap();
        let crashed = !out.status.success();
        let note = std::fs::read_to_string(t.path().join("note")).unwrap_or_default();
        if !crashed {
            assert!(note.is_empty());
            assert!(n > 6, "the backup has more than {n} durable steps");
            break;
        }
        assert!(
            !note.is_empty(),
            "step {n}: the child failed without the crash hook: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The VM ran between the failed backup and its cleanup: it wrote
        // over the whole of each volume into the new delta, where there is
        // one. Those writes must survive the cleanup.
        let mut now = before.clone();
        for (i, ((v, base, _), (_, size))) in vm.vols.iter().zip(VOLS).enumerate() {
            let new_delta = base.with_file_name(format!("{v}-delta-b2"));
            if new_delta.exists() {
                qemu_io(&new_delta, &format!("write -P 238 0 {size}"));
                now[i] = vm.dir.join(format!("view-{v}-ran.qcow2"));
                snapshot(&new_delta, &now[i]);
            }
        }
        // The cleanup, given the failed request, works it out from the files.
        let mut creq = req.clone();
        if let Some(m) = mode {
            creq["mode"] = json!(m);
        }
        let on_store: Vec<PathBuf> =
            vm.vols.iter().map(|(v, _, _)| vm.store_file("b2", v)).filter(|f| f.exists()).collect();
        let c = ok("agent.cleanup_vm_backup", &creq);
        assert_eq!(c["vm_consistent"], true);
        assert_eq!(c["vm_running"], false, "a VM without a domain does not run");
        assert_eq!(c["mode"], if discard { "discard" } else { "complete" });
        vm.follow(&c["volumes"], "path");
        let published = c["published"].as_bool().unwrap();
        assert_eq!(published, on_store.len() == vm.vols.len(), "{c}");
        let finished = published && !discard;
        let mut parent = Some(if finished { "b2" } else { "b1" });
        if finished {
            vm.assert_backup_is("b2", &before);
            assert_eq!(c["removed_from_store"], json!([]));
        } else {
            for (v, _, _) in &vm.vols {
                assert!(
                    !vm.store_file("b2", v).exists(),
                    "step {n} ({note}): the failed backup's store files are removed"
                );
            }
            let removed: Vec<PathBuf> = serde_json::from_value(c["removed_from_store"].clone()).unwrap();
            for f in &on_store {
                assert!(removed.contains(f), "step {n}: {} removed but not said: {c}", f.display());
            }
            // The new delta is committed back: the volume runs on its base
            // and the delta of b1, or (once that was merged, the chain
            // ended) on its base alone.
            for (v, base, top) in &vm.vols {
                let old = base.with_file_name(format!("{v}-delta-b1"));
                assert!(!base.with_file_name(format!("{v}-delta-b2")).exists(), "step {n}: the new delta is gone");
                if old.exists() {
                    assert_eq!(top, &old, "step {n}: back on base <- delta");
                    assert_eq!(disk::chain_len(top), 2);
                } else {
                    assert_eq!(top, base, "step {n}: on the base alone");
                    parent = None;
                }
            }
        }
        vm.assert_clean();
        // The guest's view did not change.
        for ((_, _, top), view) in vm.vols.iter().zip(&now) {
            assert_identical(top, view);
        }
        vm.write(3);
        let v3 = vm.view("b3");
        vm.take("b3", parent, json!({}));
        vm.assert_backup_is("b3", &v3);
        vm.assert_backup_is("b1", &v1);
        vm.assert_clean();
        eprintln!(
            "crash before step {note}: cleanup {}, actions {}",
            if finished { "finished" } else { "undid" },
            c["actions"]
        );
        n += 1;
    }
}

/// Wait until a process holds QEMU's lock on `p`.
fn wait_held(p: &Path) {
    for _ in 0..100 {
        if knib_core::lock::held_like_qemu(&std::fs::File::open(p).unwrap()).unwrap() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} never got locked", p.display());
}

#[test]
fn volumes_a_qemu_holds_are_refused_with_nothing_written() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 7);
    vm.write(3);
    vm.take("b1", None, json!({}));
    vm.write(3);
    let list = |d: &Path| {
        let mut v: Vec<(PathBuf, u64, Option<std::time::SystemTime>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let m = e.unwrap();
                let md = m.metadata().unwrap();
                (m.path(), md.len(), md.modified().ok())
            })
            .collect();
        v.sort();
        v
    };
    let primary = vm.vols[0].1.parent().unwrap().to_path_buf();
    let req = vm.request("b2", Some("b1"), json!({}));
    let merge = json!({"running": false, "merges": [{"parent": vm.vols[1].1, "child": vm.vols[1].2}]});

    // A process holding the lock as a QEMU writer does (knib's own lock),
    // on the base of the second volume; then a real qemu-io on the top of
    // the first.
    let held = std::fs::File::open(&vm.vols[1].1).unwrap();
    assert!(knib_core::lock::lock_like_qemu_writer(&held).unwrap());
    let mut io = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&vm.vols[0].2)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_held(&vm.vols[0].2);
    let (p0, s0) = (list(&primary), list(&vm.store));
    for (op, r, file) in [
        ("agent.take_backup", &req, &vm.vols[0].2),
        ("agent.cleanup_vm_backup", &req, &vm.vols[0].2),
        ("agent.merge_snapshot", &merge, &vm.vols[1].1),
    ] {
        let e = agent(op, r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{op}: {e}");
        assert!(e.message.contains(&file.display().to_string()), "{op}: {e}");
        assert_eq!((list(&primary), list(&vm.store)), (p0.clone(), s0.clone()), "{op} wrote something");
    }
    let e = agent("agent.take_backup", &req).unwrap_err();
    assert_eq!(e.vm_consistent, Some(true));
    io.kill().unwrap();
    io.wait().unwrap();
    let e = agent("agent.take_backup", &req).unwrap_err();
    assert!(e.kind == ErrorKind::Busy && e.message.contains(&vm.vols[1].1.display().to_string()), "{e}");
    drop(held);
    let v2 = vm.view("b2");
    vm.take("b2", Some("b1"), json!({}));
    vm.assert_backup_is("b2", &v2);
    vm.assert_clean();
}

/// While a backup of stopped volumes copies them, no VM can start writing
/// the files it copies (QEMU fails to take its lock: a VM started on the
/// old top by HA or by hand), and the backup holds what the volumes held
/// when it began. Before, the lock test was a moment before the copy, and
/// the copy read the files without any lock: a VM started meanwhile wrote
/// into what was being copied, and the torn copy was answered as a good
/// backup.
#[test]
fn no_vm_writes_the_files_a_stopped_backup_copies() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 11);
    vm.write(3);
    vm.take("b1", None, json!({}));
    vm.write(3);
    let v2 = vm.view("b2");
    let top = vm.vols[0].2.clone();
    let at = "copy of volume";
    knib_core::crashpoint::pause_before(at, std::time::Duration::from_secs(3));
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(knib_core::crashpoint::wait_for_pause(at, std::time::Duration::from_secs(60)));
            let out =
                Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 0 64k"]).arg(&top).output().unwrap();
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && said.contains("lock"),
                "QEMU wrote {} during the copy: {said}",
                top.display()
            );
        });
        vm.take("b2", Some("b1"), json!({}));
    });
    vm.assert_backup_is("b2", &v2);
    vm.assert_clean();
}

#[test]
fn merge_snapshot_without_a_domain() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let q = QemuImg::new();
    let c = Control::new();
    let base = d.join("base");
    make_disk(&base, 8 * MIB, &[]);
    qemu_io(&base, "write -P 1 0 1M");
    let s1 = d.join("s1");
    q.create_overlay(&s1, "base", "qcow2", None, &c).unwrap();
    qemu_io(&s1, "write -P 2 512k 1M");
    let top = d.join("top");
    let other = d.join("other");
    q.create_overlay(&top, "s1", "qcow2", None, &c).unwrap();
    q.create_overlay(&other, "s1", "qcow2", None, &c).unwrap();
    qemu_io(&top, "write -P 3 1M 64k");
    qemu_io(&other, "write -P 4 2M 64k");
    let (vt, vo) = (d.join("vt"), d.join("vo"));
    snapshot(&top, &vt);
    snapshot(&other, &vo);
    // Nothing to merge (a restore of every volume ends with it): done, nothing touched.
    let before: Vec<Vec<u8>> = [&base, &s1, &top, &other].iter().map(|f| std::fs::read(f).unwrap()).collect();
    let a = ok("agent.merge_snapshot", &json!({"running": false, "merges": []}));
    assert_eq!(a, json!({"volumes": []}));
    let after: Vec<Vec<u8>> = [&base, &s1, &top, &other].iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(before == after, "an empty merge changed a file");
    // Not the layer below: refused.
    let e = agent("agent.merge_snapshot", &json!({"running": false, "merges": [{"parent": base, "child": top}]}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    // A child holding an internal snapshot (a memory snapshot) is refused,
    // nothing changed: the merge would remove the snapshot with the file.
    // Before, it was merged and removed, answered as success.
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-c", "mem1"]).arg(&s1).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before: Vec<Vec<u8>> = [&base, &s1, &top, &other].iter().map(|f| std::fs::read(f).unwrap()).collect();
    let req = json!({"running": false, "merges": [{"parent": base, "child": s1, "grand_children": [top, other]}]});
    let e = agent("agent.merge_snapshot", &req).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let says =
        format!("request of agent.merge_snapshot: merges[0].child {} holds 1 internal snapshot(s)", s1.display());
    assert!(e.message.starts_with(&says), "{e}");
    let after: Vec<Vec<u8>> = [&base, &s1, &top, &other].iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(before == after, "a refused merge changed a file");
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-d", "mem1"]).arg(&s1).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = ok(
        "agent.merge_snapshot",
        &json!({"running": false, "merges": [{"uuid": "u", "parent": base, "child": s1, "grand_children": [top, other]}]}),
    );
    assert_eq!(a["volumes"], json!([{"uuid": "u", "target": null, "path": base}]));
    assert!(!s1.exists());
    // A request whose second merge fails after the first was made says so
    // (a retry of the whole request fails at the first, its child gone).
    let gone = d.join("gone");
    let req = json!({"running": false, "merges": [
        {"parent": base, "child": top}, {"parent": base, "child": gone}]});
    let before: Vec<Vec<u8>> = [&base, &top].iter().map(|f| std::fs::read(f).unwrap()).collect();
    let e = agent("agent.merge_snapshot", &req).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let says = format!(
        "merges[1] (merges[0..1] were made and their children removed: {} into {}; only merges[1..] are left to do): ",
        top.display(),
        base.display()
    );
    assert!(e.message.starts_with(&says) && e.message.contains(&gone.display().to_string()), "{e}");
    assert!(!top.exists(), "merges[0] was made");
    assert_identical(&base, &vt);
    // Put back as it was, for the steps below.
    std::fs::write(&base, &before[0]).unwrap();
    std::fs::write(&top, &before[1]).unwrap();
    assert_identical(&top, &vt);
    assert_identical(&other, &vo);
    for f in [&base, &top, &other] {
        assert_check_clean(f);
    }
    assert_eq!(q.info(&top, &c).unwrap().backing_filename.as_deref(), Some("base"));
    // The top merged in too: the volume runs on the base.
    let a = ok("agent.merge_snapshot", &json!({"running": false, "merges": [{"parent": base, "child": top}]}));
    assert_eq!(a["volumes"][0]["path"], json!(base));
    assert_identical(&base, &vt);
}

/// A hard link (to a file outside the store) or a symbolic link put under
/// the fixed temporary name a backup's copy writes (`.<file>.part`) is
/// removed, never written through: the backup succeeds and the linked file
/// is left as it was. Before, the copy opened the name with O_TRUNC (which
/// refuses a symbolic link but not a hard link) and truncated and wrote the
/// linked file.
#[test]
fn links_under_a_copys_temporary_name_are_never_written_through() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 23);
    vm.write(3);
    vm.take("b1", None, json!({}));
    vm.write(3);
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    std::fs::create_dir_all(vm.store.join("b2")).unwrap();
    std::fs::hard_link(&victim, vm.store.join("b2").join(".root.qcow2.part")).unwrap();
    std::os::unix::fs::symlink(&victim, vm.store.join("b2").join(".data.qcow2.part")).unwrap();
    let v2 = vm.view("b2");
    vm.take("b2", Some("b1"), json!({}));
    vm.assert_backup_is("b2", &v2);
    let v = std::fs::read(&victim).unwrap();
    assert!(v == b"not knib's", "the linked file was written ({} bytes)", v.len());
    vm.assert_clean();
}

/// A dangling symbolic link where the new delta goes is an entry that
/// exists: refused, and nothing is made where it leads. Before, the
/// existence check followed the link, and qemu-img created the new delta
/// at its target.
#[test]
fn a_dangling_link_at_the_new_delta_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 29);
    vm.write(2);
    vm.take("b1", None, json!({}));
    let req = vm.request("b2", Some("b1"), json!({}));
    let new_delta = PathBuf::from(req["volumes"][0]["delta_path_on_primary"].as_str().unwrap());
    let target = t.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &new_delta).unwrap();
    let e = agent("agent.take_backup", &req).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains(&format!("the new delta {} already exists", new_delta.display())), "{e}");
    assert!(!target.exists(), "a file was made where the link leads");
    std::fs::remove_file(&new_delta).unwrap();
    vm.take("b2", Some("b1"), json!({}));
    vm.assert_clean();
}

#[test]
fn a_copy_that_fails_is_undone_and_the_vm_left_consistent() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 21);
    vm.write(4);
    vm.take("b1", None, json!({}));
    vm.write(4);
    let before = vm.view("before");
    let tops: Vec<PathBuf> = vm.vols.iter().map(|v| v.2.clone()).collect();
    // The second volume's copy cannot be written (a directory stands where
    // its temporary file goes): the first one's copy is already on the store.
    let req = vm.request("b2", Some("b1"), json!({}));
    let part = vm.store.join("b2").join(".data.qcow2.part");
    std::fs::create_dir_all(part.join("x")).unwrap();
    let e = agent("agent.take_backup", &req).unwrap_err();
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    assert!(e.message.contains("copy of volume uuid-data"), "{e}");
    assert!(!vm.store_file("b2", "root").exists() && !vm.store_file("b2", "data").exists());
    std::fs::remove_dir_all(&part).unwrap();
    for ((v, view), top) in vm.vols.iter().zip(&before).zip(&tops) {
        assert_eq!(&v.2, top);
        assert!(!v.1.with_file_name(format!("{}-delta-b2", v.0)).exists(), "the new delta is committed back");
        assert_identical(&v.2, view);
    }
    vm.assert_clean();
    // Nothing is left to clean up, and the next incremental holds every write.
    let c = ok("agent.cleanup_vm_backup", &req);
    assert_eq!(c["published"], false);
    assert_eq!(c["actions"], json!([]));
    vm.write(2);
    let v2 = vm.view("b2");
    vm.take("b2", Some("b1"), json!({}));
    vm.assert_backup_is("b2", &v2);
    vm.assert_clean();
}

#[test]
fn a_chain_restores_from_a_store_moved_elsewhere_and_with_an_absolute_pointer_in_it() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 33);
    vm.write(4);
    let v1 = vm.view("b1");
    vm.take("b1", None, json!({}));
    vm.write(4);
    let v2 = vm.view("b2");
    vm.take("b2", Some("b1"), json!({}));
    vm.write(4);
    let v3 = vm.view("b3");
    vm.take("b3", Some("b2"), json!({}));

    // The store mounted elsewhere: knib's relative pointers still resolve.
    let moved = t.path().join("mounted").join("elsewhere");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&vm.store, &moved).unwrap();
    vm.store = moved;
    for (id, view) in [("b1", &v1), ("b2", &v2), ("b3", &v3)] {
        vm.assert_backup_is(id, view);
    }

    // A mixed chain: b2's pointer rewritten absolute, as the agent writes
    // them, under b3's relative one.
    for (n, _, _) in &vm.vols {
        let b2 = vm.store_file("b2", n);
        let st = Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "qcow2", "-b"])
            .arg(vm.store_file("b1", n))
            .arg(&b2)
            .status()
            .unwrap();
        assert!(st.success());
        let info = QemuImg::new().info(&b2, &Control::new()).unwrap();
        assert_eq!(info.backing_filename.map(PathBuf::from), Some(vm.store_file("b1", n)));
    }
    for (id, view) in [("b1", &v1), ("b2", &v2), ("b3", &v3)] {
        vm.assert_backup_is(id, view);
    }
}

/// The cleanup request as the agent's cleanup TOs give it (issue 14 §4):
/// `path` is the file the failed delta was to sit on (the cleanup TO's
/// `deltaPathOnPrimary`: the base), and no `merge`. After a backup that
/// failed before the old delta was merged, the failed delta sits on that
/// old delta, which the request does not name: the new delta goes back into
/// it, and the volume runs on it again (base <- delta), with every write
/// the VM made since; the store files are gone and the next incremental
/// over the parent backup holds every write.
#[test]
fn a_cleanup_given_as_the_agents_cleanup_tos_puts_the_volume_back_on_its_delta() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 77);
    vm.write(4);
    let v1 = vm.view("b1");
    vm.take("b1", None, json!({}));
    vm.write(4);
    let req = vm.request("b2", Some("b1"), json!({}));
    // Crash before the first merge (after the copies are published).
    let mut step = 1;
    loop {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_take_backup", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, req.to_string())
            .env(CRASH_ENV, step.to_string())
            .env(NOTE_ENV, t.path().join("note"))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "step {step}: the backup has no merge step: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let note = std::fs::read_to_string(t.path().join("note")).unwrap_or_default();
        if note.contains(": commit of") {
            break;
        }
        // Not there yet: undo this one with the take's own request, try
        // one step further.
        ok("agent.cleanup_vm_backup", &req);
        step += 1;
    }
    let mut now = Vec::new();
    for (v, base, _) in &vm.vols {
        let new_delta = base.with_file_name(format!("{v}-delta-b2"));
        qemu_io(&new_delta, "write -P 238 0 1M");
        let view = vm.dir.join(format!("view-{v}-ran.qcow2"));
        snapshot(&new_delta, &view);
        now.push(view);
    }
    // The request as the wrapper builds it from the cleanup TOs.
    let mut creq = req.clone();
    for (cv, (_, base, _)) in creq["volumes"].as_array_mut().unwrap().iter_mut().zip(&vm.vols) {
        cv["path"] = json!(base);
        cv.as_object_mut().unwrap().remove("merge");
    }
    let c = ok("agent.cleanup_vm_backup", &creq);
    assert_eq!((c["mode"].as_str(), c["published"].as_bool()), (Some("discard"), Some(true)), "{c:#}");
    let olds: Vec<PathBuf> = vm.vols.iter().map(|(_, _, top)| top.clone()).collect();
    vm.follow(&c["volumes"], "path");
    for (((v, _, top), old), view) in vm.vols.iter().zip(&olds).zip(&now) {
        assert_eq!(top, old, "back on base <- delta: {c:#}");
        assert_eq!(disk::chain_len(top), 2);
        assert!(!vm.store_file("b2", v).exists());
        assert_identical(top, view);
    }
    vm.assert_clean();
    vm.write(3);
    let v3 = vm.view("b3");
    vm.take("b3", Some("b1"), json!({}));
    vm.assert_backup_is("b3", &v3);
    vm.assert_backup_is("b1", &v1);
    vm.assert_clean();
}

/// A volume whose delta was merged since the last backup (detached and
/// attached again) is copied whole in the same backup as the others'
/// incrementals: no parent, no merge for it.
#[test]
fn one_backup_without_a_domain_takes_full_and_incremental_volumes_together() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 23);
    vm.write(4);
    vm.take("b1", None, json!({}));
    vm.write(3);
    let (base, top) = (vm.vols[1].1.clone(), vm.vols[1].2.clone());
    ok("agent.merge_snapshot", &json!({"running": false, "merges": [{"parent": base, "child": top}]}));
    vm.vols[1].2 = base.clone();
    vm.write(3);
    let v2 = vm.view("b2");
    let mut req = vm.request("b2", Some("b1"), json!({}));
    assert!(req["volumes"][1]["merge"].is_null());
    req["volumes"][1].as_object_mut().unwrap().remove("parent_backup_path");
    let a = ok("agent.take_backup", &req);
    vm.follow(&a["volumes"], "new_volume_path");
    assert_eq!(a["kind"], "incremental");
    let backing = |f: &Path| QemuImg::new().info(f, &Control::new()).unwrap().backing_filename;
    assert_eq!(backing(&vm.store_file("b2", &vm.vols[0].0)), Some(format!("../b1/{}.qcow2", vm.vols[0].0)));
    assert_eq!(backing(&vm.store_file("b2", &vm.vols[1].0)), None, "copied whole");
    vm.assert_backup_is("b2", &v2);
    vm.assert_clean();
}

/// The time budget bounds the copy, not the merge after it (as on the Java
/// path): a budget that runs out once the backup is published still lets
/// the merge finish, and the backup succeeds with the VM on its new delta.
#[test]
fn the_merge_after_a_published_backup_runs_past_the_time_budget() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 29);
    vm.write(3);
    vm.take("b1", None, json!({}));
    vm.write(3);
    let v2 = vm.view("b2");
    let old = vm.vols[0].2.clone();
    // Time passes between the publication and the first merge: past the budget.
    knib_core::crashpoint::pause_before(&format!("commit of {}", old.display()), std::time::Duration::from_secs(3));
    let mut req = vm.request("b2", Some("b1"), json!({}));
    req["timeout_secs"] = json!(2);
    let a = ok("agent.take_backup", &req);
    vm.follow(&a["volumes"], "new_volume_path");
    assert_eq!(a["vm_consistent"], true);
    assert!(!old.exists(), "the old delta is merged and removed");
    vm.assert_backup_is("b2", &v2);
    vm.assert_clean();
}

#[test]
fn new_files_that_name_a_file_of_the_vm_or_of_the_parent_chain_are_refused_before_anything_changes() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 77);
    vm.write(3);
    vm.take("b1", None, json!({}));
    vm.write(3);
    vm.take("b2", Some("b1"), json!({}));
    vm.write(3);
    // An incremental request whose backup file is a file the VM runs on, its
    // base, or a backup of the parent's chain: a take refuses it as an
    // existing file; a cleanup (discard) removed it. Nor may the new delta
    // on primary be one of them, or the backup file: a cleanup undid it
    // (committed the volume's delta into its base, so the next incremental
    // would have missed the writes since b2).
    let req = vm.request("b3", Some("b2"), json!({}));
    let vol = &req["volumes"][0];
    let named = |f: &str| vol[f].clone();
    let cases = [
        (
            "delta_path_on_store",
            "the backup file",
            vec![
                ("path", named("path")),
                ("merge.parent", vol["merge"]["parent"].clone()),
                ("parent_backup_path", named("parent_backup_path")),
                ("a file of the parent backup's chain", json!(vm.store_file("b1", "root"))),
            ],
        ),
        (
            "delta_path_on_primary",
            "the new delta",
            vec![
                ("path", named("path")),
                ("merge.parent", vol["merge"]["parent"].clone()),
                ("parent_backup_path", named("parent_backup_path")),
                ("delta_path_on_store", named("delta_path_on_store")),
            ],
        ),
    ];
    let before = contents(t.path());
    for (field, role, candidates) in cases {
        for (what, file) in candidates {
            let mut r = req.clone();
            r["volumes"][0][field] = file.clone();
            for mode in [None, Some("complete")] {
                let mut c = r.clone();
                if let Some(m) = mode {
                    c["mode"] = json!(m);
                }
                let e = agent("agent.cleanup_vm_backup", &c).unwrap_err();
                assert_eq!(e.kind, ErrorKind::InvalidInput, "{field} = {what} ({mode:?}): {e}");
                assert!(
                    e.message.contains(&format!("volumes[0].{field} {}", file.as_str().unwrap()))
                        && e.message.contains(&format!("{role} must be a new file of its own")),
                    "{field} = {what}: {e}"
                );
                assert_eq!(contents(t.path()), before, "{field} = {what} ({mode:?}): files changed");
            }
            let e = agent("agent.take_backup", &r).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{field} = {what}: {e}");
            assert_eq!(contents(t.path()), before, "{field} = {what}: files changed");
        }
    }
    // Nor may they be a file of another volume of the request, or a new
    // file of it: a cleanup removed the other volume's disk, and a take
    // renamed the second copy over the first (both volumes answered as
    // backed up, the first one's increment lost).
    let other = &req["volumes"][1];
    let theirs = [
        other["path"].clone(),
        other["merge"]["parent"].clone(),
        other["parent_backup_path"].clone(),
        json!(vm.store_file("b1", "data")),
        other["delta_path_on_store"].clone(),
        other["delta_path_on_primary"].clone(),
    ];
    for field in ["delta_path_on_store", "delta_path_on_primary"] {
        for file in &theirs {
            let mut r = req.clone();
            r["volumes"][0][field] = file.clone();
            let said = |e: &KnibError| {
                e.kind == ErrorKind::InvalidInput
                    && e.message.contains(file.as_str().unwrap())
                    && e.message.contains("volumes[0]")
                    && e.message.contains("volumes[1]")
                    && e.message.contains("must be a new file of its own")
            };
            for mode in [None, Some("complete")] {
                let mut c = r.clone();
                if let Some(m) = mode {
                    c["mode"] = json!(m);
                }
                let e = agent("agent.cleanup_vm_backup", &c).unwrap_err();
                assert!(said(&e), "{field} = {file} ({mode:?}): {e}");
                assert_eq!(contents(t.path()), before, "{field} = {file} ({mode:?}): files changed");
            }
            let e = agent("agent.take_backup", &r).unwrap_err();
            assert!(said(&e), "{field} = {file}: {e}");
            assert_eq!(contents(t.path()), before, "{field} = {file}: files changed");
        }
    }
    // The request as it should be still works.
    vm.take("b3", Some("b2"), json!({}));
    vm.assert_clean();
}

/// A request naming more volumes than a guest has disks (257), or a
/// relative path in any field, is refused before any file is looked at,
/// naming the field (every new file is compared with every file named).
#[test]
fn a_request_of_too_many_volumes_or_a_relative_path_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 78);
    vm.write(2);
    vm.take("b1", None, json!({}));
    vm.write(2);
    let req = vm.request("b2", Some("b1"), json!({}));
    let before = contents(t.path());
    let mut many = req.clone();
    let one = req["volumes"][1].clone();
    many["volumes"] = json!((0..257).map(|_| one.clone()).collect::<Vec<_>>());
    let mut relative = req.clone();
    relative["volumes"][1]["merge"]["grand_children"] = json!(["data-snap"]);
    for op in ["agent.take_backup", "agent.cleanup_vm_backup"] {
        let e = agent(op, &many).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert_eq!(
            e.message,
            format!("request of {op}: field `volumes` has 257 entries, more than the 256 a request may have")
        );
        let e = agent(op, &relative).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert!(e.message.contains("volumes[1].merge.grand_children[0]"), "{e}");
        assert_eq!(contents(t.path()), before, "{op}: files changed");
    }
    // So for the other operations' lists.
    let n = |v: Value| json!((0..257).map(|_| v.clone()).collect::<Vec<_>>());
    let restore = json!({"uuid": "u", "backup_path": "/nonexistent/b", "volume_path": "/nonexistent/v"});
    for (op, field, req) in [
        ("agent.restore", "volumes", json!({"volumes": n(restore)})),
        (
            "agent.merge_snapshot",
            "merges",
            json!({"running": false, "merges": n(json!({"parent": "/a", "child": "/b"}))}),
        ),
        ("agent.take_hash", "files", json!({"files": n(json!("/nonexistent/f"))})),
        ("agent.finalize_compression", "files", json!({"files": n(json!("/nonexistent/f"))})),
        ("agent.compress", "files", json!({"files": n(json!("/nonexistent/f"))})),
    ] {
        let e = agent(op, &req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{op}: {e}");
        assert_eq!(
            e.message,
            format!("request of {op}: field `{field}` has 257 entries, more than the 256 a request may have")
        );
    }
}

/// A chain holds at most 64 backup files (knib's restores open no deeper
/// one): an incremental whose parent already ends a chain of 64 is refused
/// before anything is written, naming the parent and the limit, and one
/// whose parent ends a chain of 63 is taken and restores to the guest's
/// view. (CloudStack decides full or incremental from its
/// `backup.chain.size`, which an operator may set past 64.)
#[test]
fn an_incremental_on_a_chain_of_64_backups_is_refused_and_one_on_63_restores() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 64);
    vm.write(4);
    vm.take("b1", None, json!({}));
    // b2..b64: backups in which the guest wrote nothing (empty deltas over
    // their parents, as the agent names them).
    for i in 2..=64 {
        for (n, _, _) in &vm.vols {
            let f = vm.store_file(&format!("b{i}"), n);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(format!("../b{}/{n}.qcow2", i - 1))
                .arg(&f)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
    assert_eq!(disk::chain_len(&vm.store_file("b64", "root")), 64);
    vm.write(4);
    let tops: Vec<PathBuf> = vm.vols.iter().map(|v| v.2.clone()).collect();
    let e = agent("agent.take_backup", &vm.request("b65", Some("b64"), json!({}))).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(
        e.message,
        format!(
            "request of agent.take_backup: volume uuid-root: the parent backup {} is the last of a chain of 64 backup files, the most a chain may have: this backup must be a full one (CloudStack's backup.chain.size, or the offering's BACKUP_CHAIN_SIZE, must be between 1 and 64)",
            vm.store_file("b64", "root").display()
        )
    );
    assert!(!vm.store.join("b65").exists(), "nothing is written for a refused backup");
    for (v, top) in vm.vols.iter().zip(&tops) {
        assert_eq!(&v.2, top);
        assert!(!v.1.with_file_name(format!("{}-delta-b65", v.0)).exists());
    }
    let view = vm.view("c64");
    vm.take("c64", Some("b63"), json!({}));
    assert_eq!(disk::chain_len(&vm.store_file("c64", "data")), 64);
    vm.assert_backup_is("c64", &view);
    vm.assert_clean();
}

/// An internal snapshot in the delta a volume runs on (`merge.child`,
/// which the backup merges into the base and removes) refuses the
/// backup before anything is written, naming the file; the snapshot stays.
#[test]
fn an_incremental_that_would_remove_an_internal_snapshot_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 65);
    vm.write(2);
    vm.take("b1", None, json!({}));
    vm.write(2);
    let top = vm.vols[0].2.clone();
    let snap = |args: &[&str]| {
        let out = Command::new("qemu-img").arg("snapshot").args(args).arg(&top).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    snap(&["-c", "int1"]);
    let before = contents(t.path());
    let e = agent("agent.take_backup", &vm.request("b2", Some("b1"), json!({}))).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains(&format!("disk uuid-root: {} holds 1 internal snapshot(s)", top.display())), "{e}");
    assert!(contents(t.path()) == before, "the refused backup changed a file");
    assert!(snap(&["-l"]).contains("int1"));
    snap(&["-d", "int1"]);
    let view = vm.view("b2");
    vm.take("b2", Some("b1"), json!({}));
    vm.assert_backup_is("b2", &view);
}

/// A loop device over a file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// `None` where no loop device can be made (a container without them).
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then(|| LoopDevice(PathBuf::from(dev)))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A volume file whose backing pointer names a block device (an uploaded
/// image pointing at `/dev/sda`) is refused before anything is read or
/// written: the copy read the device into the store. The same volume over
/// a regular file (a template) is backed up whole.
#[test]
fn a_volume_file_backed_by_a_block_device_is_refused_unread() {
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::new(t.path(), 31);
    let host_disk = t.path().join("host-disk.raw");
    std::fs::write(&host_disk, vec![0x5a; 4 * MIB as usize]).unwrap();
    let Some(dev) = LoopDevice::attach(&host_disk) else {
        eprintln!("skipped: no loop device can be made here");
        return;
    };
    let root = vm.vols[0].1.clone();
    let over = |backing: &Path| {
        std::fs::remove_file(&root).unwrap();
        make_disk(&root, VOLS[0].1, &["-b", backing.to_str().unwrap(), "-F", "raw"]);
    };
    over(&dev.0);
    // By either method (the bitmap one serves the chain through qemu-nbd).
    for extra in [json!({}), json!({"method": "bitmap"})] {
        let req = vm.request("b1", None, extra.clone());
        let e = agent("agent.take_backup", &req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{extra}: {e}");
        let said = format!("{} is backed by {}, which is not a regular file", root.display(), dev.0.display());
        assert!(e.message.contains(&said), "{extra}: {e}");
        assert!(!vm.store.exists(), "{extra}: nothing is written to the store");
        assert!(!root.with_file_name("root-delta-b1").exists(), "{extra}: no new delta is made");
    }
    drop(dev);

    over(&host_disk);
    vm.write(2);
    let view = vm.view("b1");
    vm.take("b1", None, json!({}));
    assert_identical(&vm.store_file("b1", "root"), &view[0]);
}

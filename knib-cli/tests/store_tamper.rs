//! The `knib` tool on a tampered store (issue 13, section 3): stray entries
//! do not stop `list` or `delete`; a manifest naming a file outside the
//! store makes `restore` and `compress` exit with the corrupt code (20)
//! naming the manifest, and the file outside is left as it was.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn ok_json(args: &[&str]) -> Value {
    let out = knib(args);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

fn qemu(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn stray_entries_and_a_manifest_pointing_outside() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = d.path().join("a.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&a), "16M"]);
    let victim = d.path().join("victim.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&victim), "16M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 1M", s(&victim)]);
    let da = format!("a={}", s(&a));
    let mut ids = Vec::new();
    for i in 0..2 {
        qemu(&["qemu-io", "-f", "qcow2", "-c", &format!("write -P {} 0 1M", 0x31 + i), s(&a)]);
        let b = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "web", "--disk", &da]);
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    std::fs::create_dir(store.join("vms/lost+found")).unwrap();
    std::fs::create_dir(store.join("vms/web/lost+found")).unwrap();
    std::fs::create_dir(store.join("vms/web/20200101-000000000-0000")).unwrap();
    let list = ok_json(&["--json", "list", "--store", s(&store)]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    let manifest = store.join("vms/web").join(&ids[1]).join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["volumes"][0]["file"] = s(&victim).into();
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let before = std::fs::read(&victim).unwrap();
    let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
    let to = d.path().join("r.raw");
    for args in [
        vec!["restore", "--store", s(&store), &ids[1], "--volume", "a", "--to", s(&to), "--format", "raw"],
        vec!["compress", "--store", s(&store), &ids[1]],
    ] {
        let out = knib(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(20), "{args:?}: {err}");
        assert!(err.contains(&manifest.display().to_string()), "{args:?}: {err}");
    }
    assert!(!to.exists());
    assert_eq!(std::fs::read(&victim).unwrap(), before);
    assert_eq!(std::fs::metadata(&victim).unwrap().modified().unwrap(), mtime);
    // The damaged backup is left out of the list; the other one can go.
    let list = ok_json(&["--json", "list", "--store", s(&store)]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let out = knib(&["delete", "--store", s(&store), &ids[0]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `recover --discard` on journals an attacker with write access to the
/// store (or a damaged disk) left: garbage, a link out of the store, a
/// FIFO, a directory, a journal naming a path for its backup id, and a
/// bitmap journal whose work directory is a link out of the store. Each
/// is set aside (a regular file, kept byte for byte) or removed as an
/// entry; nothing outside the store is read through or changed, a FIFO
/// does not hang it, and the published backup stays whole. A work
/// directory holding the freeze marker stays, and the answer says to thaw.
#[test]
fn recover_discard_sets_aside_any_journal_and_touches_nothing_outside_the_store() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = d.path().join("a.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&a), "16M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 1M", s(&a)]);
    let b = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "web", "--disk", &format!("a={}", s(&a))]);
    let vm_dir = store.join("vms/web");
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::create_dir(outside.join("work")).unwrap();
    std::fs::write(outside.join("work/keep"), b"keep").unwrap();
    let snapshot = |dir: &Path| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = walk(dir).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap_or_default())).collect();
        v.sort();
        v
    };
    let disk_before = std::fs::read(&a).unwrap();
    let id = "20261206-101010101-abcd";
    let bitmap = |backup_id: &str| {
        serde_json::json!({
            "schema": 1,
            "step": "copy",
            "plan": {
                "backup_id": backup_id,
                "kind": "full",
                "end_of_chain": false,
                "quiesce": true,
                "disks": [{"target": "vda", "file": s(&a), "dest": s(&vm_dir.join("x.qcow2")), "parent": null}],
                "work_dir": s(&outside.join("work")),
                "since": null,
                "checkpoint": format!("knib-{backup_id}"),
            }
        })
        .to_string()
    };
    // A journal knib would read, were the link followed.
    std::fs::write(outside.join("journal.json"), bitmap(id)).unwrap();
    let outside_before = snapshot(&outside);
    let mut seed = 0x5eed_u64;
    let mut garbage = Vec::new();
    for _ in 0..512 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        garbage.push(seed as u8);
    }
    // (what, journal name, how it is made, backup id answered, regular file)
    type Make<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, &str, Make, Option<&str>, bool)> = vec![
        ("garbage", "journal.json", Box::new(|p: &Path| std::fs::write(p, &garbage).unwrap()), None, true),
        (
            "a link out of the store",
            "bitmap-journal.json",
            Box::new(|p: &Path| std::os::unix::fs::symlink(outside.join("journal.json"), p).unwrap()),
            None,
            false,
        ),
        (
            "a FIFO",
            "bitmap-journal.json",
            Box::new(|p: &Path| {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a valid NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            }),
            None,
            false,
        ),
        (
            "a directory",
            "journal.json",
            Box::new(|p: &Path| {
                std::fs::create_dir(p).unwrap();
                std::fs::write(p.join("inside"), b"x").unwrap();
            }),
            None,
            false,
        ),
        (
            "a path for a backup id",
            "bitmap-journal.json",
            Box::new(|p: &Path| std::fs::write(p, bitmap("../../outside")).unwrap()),
            None,
            true,
        ),
        (
            "a work directory linked out of the store",
            "bitmap-journal.json",
            Box::new(|p: &Path| {
                std::fs::write(p, bitmap(id)).unwrap();
                std::os::unix::fs::symlink(outside.join("work"), vm_dir.join(format!(".{id}.nbd"))).unwrap();
            }),
            Some(id),
            true,
        ),
        (
            "a work directory with the freeze marker",
            "bitmap-journal.json",
            Box::new(|p: &Path| {
                std::fs::write(p, bitmap(id)).unwrap();
                let work = vm_dir.join(format!(".{id}.nbd"));
                std::fs::create_dir(&work).unwrap();
                std::fs::write(work.join("frozen-by-knib"), b"").unwrap();
            }),
            Some(id),
            true,
        ),
    ];
    for (what, name, make, answered, regular) in cases {
        let journal = vm_dir.join(name);
        make(&journal);
        let recorded = regular.then(|| std::fs::read(&journal).unwrap());
        let out = knib(&["--json", "recover", "--store", s(&store), "--domain", "web", "--discard"]);
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let j = &v["discarded"][0];
        assert_eq!(v["discarded"].as_array().unwrap().len(), 1, "{what}: {v}");
        assert_eq!(j["backup_id"].as_str(), answered, "{what}: {v}");
        assert_eq!(j["unreadable"].is_string(), answered.is_none(), "{what}: {v}");
        assert!(std::fs::symlink_metadata(&journal).is_err(), "{what}: the journal's entry is still there");
        match recorded {
            Some(bytes) => {
                let kept = std::path::PathBuf::from(j["kept_as"].as_str().unwrap());
                assert_eq!(kept.parent().unwrap(), vm_dir, "{what}");
                assert_eq!(std::fs::read(&kept).unwrap(), bytes, "{what}: not kept as it was");
                std::fs::remove_file(kept).unwrap();
            }
            None => assert!(j["kept_as"].is_null(), "{what}: {v}"),
        }
        let work = vm_dir.join(format!(".{id}.nbd"));
        if what.contains("freeze marker") {
            assert!(work.join("frozen-by-knib").exists(), "{what}: the marker went");
            let left = j["left"].as_array().unwrap();
            assert!(left.iter().any(|l| l.as_str().unwrap().contains("virsh domfsthaw web")), "{what}: {v}");
            assert!(left.iter().any(|l| l.as_str().unwrap().contains(&format!("checkpoint knib-{id}"))), "{what}: {v}");
            std::fs::remove_dir_all(&work).unwrap();
        } else {
            assert!(std::fs::symlink_metadata(&work).is_err(), "{what}: {} stays", work.display());
        }
        assert_eq!(snapshot(&outside), outside_before, "{what}: a file outside the store changed");
        assert_eq!(std::fs::read(&a).unwrap(), disk_before, "{what}: the disk changed");
        let listed: Vec<String> = std::fs::read_dir(&vm_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock" && n != "state.json" && !n.starts_with("2"))
            .collect();
        assert!(listed.is_empty(), "{what}: left in the VM's directory: {listed:?}");
    }
    let list = ok_json(&["--json", "list", "--store", s(&store)]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], b["id"]);
    let out = knib(&["verify", "--store", s(&store)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // A VM the store does not have: not found, nothing made.
    let out = knib(&["recover", "--store", s(&store), "--domain", "nosuch", "--discard"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("knib: not found: ") && err.contains("no VM nosuch"), "{err}");
    assert!(!store.join("vms/nosuch").exists());
}

/// Every file under `dir`, links not followed.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

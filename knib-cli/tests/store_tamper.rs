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

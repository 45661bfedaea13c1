//! Paths that are not UTF-8: taken as they are without `--json` (the text
//! answer shows them lossily); with `--json`, whose answer names paths as
//! JSON strings (UTF-8 only), refused before anything is done.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A restore to `out/r\xff.qcow2` succeeds and says so (before: the answer
/// was made as JSON even without `--json`, and knib panicked, status 101,
/// after writing the image); with `--json` it is refused with status 2 and
/// nothing is written.
#[test]
fn a_restore_to_a_path_that_is_not_utf8() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("d.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", s(&disk), "8M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 1M", s(&disk)]);
    let store = d.path().join("st");
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["--json", "backup", "--store", s(&store), "--vm", "v", "--disk", &format!("d={}", s(&disk))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_string();
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let to = dir.join(OsStr::from_bytes(b"r\xff.qcow2"));

    let restore = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
        if json {
            c.arg("--json");
        }
        c.args(["restore", "--store", s(&store), &id, "--volume", "d", "--to"]).arg(&to).output().unwrap()
    };
    let out = restore(true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not UTF-8"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "something was written");

    let out = restore(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("restored volume d of backup"), "{out:?}");
    let q = Command::new("qemu-img").args(["compare", "-q", s(&disk)]).arg(&to).status().unwrap();
    assert!(q.success(), "the restored image differs");
}

/// A `--disk` path that is not UTF-8 is taken as it is without `--json`
/// (before, clap refused the argument: the disks were read as text).
#[test]
fn a_disk_path_that_is_not_utf8_is_backed_up() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join(OsStr::from_bytes(b"disk-\xff.qcow2"));
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&a).arg("8M").output().unwrap();
    assert!(out.status.success());
    let mut arg = std::ffi::OsString::from("root=");
    arg.push(&a);
    let store = d.path().join("store");
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["backup", "--store", s(&store), "--vm", "v", "--disk"])
        .arg(&arg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_knib")).args(["--json", "list", "--store", s(&store)]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// `knib group backup --plain VM:NAME=PATH` takes a PATH that is not
/// UTF-8 as `--disk` does (they were read as text: clap refused them), and
/// the member's backup restores to what the disk holds.
#[test]
fn a_group_member_disk_path_that_is_not_utf8_is_backed_up() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join(OsStr::from_bytes(b"disk-\xfe.qcow2"));
    let b = d.path().join("b.qcow2");
    for (p, pattern) in [(&a, 0x61), (&b, 0x62)] {
        let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(p).arg("8M").output().unwrap();
        assert!(out.status.success());
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {pattern} 1M 64k")])
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let mut plain = std::ffi::OsString::from("web:root=");
    plain.push(&a);
    let store = d.path().join("store");
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["group", "backup", "--store", s(&store), "--plain"])
        .arg(&plain)
        .args(["--plain", &format!("db:root={}", s(&b))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_knib")).args(["--json", "list", "--store", s(&store)]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let web = list.as_array().unwrap().iter().find(|m| m["vm"] == "web").unwrap_or_else(|| panic!("{list}"));
    let to = d.path().join("web-root.qcow2");
    run(&[
        env!("CARGO_BIN_EXE_knib"),
        "restore",
        "--store",
        s(&store),
        web["id"].as_str().unwrap(),
        "--volume",
        "root",
        "--to",
        s(&to),
    ]);
    let out = Command::new("qemu-img").args(["compare", "-q"]).arg(&a).arg(&to).output().unwrap();
    assert!(out.status.success(), "the restored disk differs from {}", a.display());
}

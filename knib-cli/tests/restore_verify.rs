//! `knib restore` checks the backup's files against their recorded hashes,
//! and `--no-verify` skips the check (issue 13, section 4).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn restore_refuses_a_damaged_file_unless_told_not_to_check() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = d.path().join("store");
    let a = d.path().join("a.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", s(&a), "8M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 1M", s(&a)]);
    let da = format!("a={}", s(&a));
    let out = knib(&["--json", "backup", "--store", s(&store), "--vm", "v", "--disk", &da]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = b["id"].as_str().expect("id");
    let file = Path::new(b["volumes"][0]["file"].as_str().expect("file")).to_path_buf();
    // A byte of guest data, where `qemu-img map` says the first data is.
    let map: Value = serde_json::from_slice(&run(&["qemu-img", "map", "--output=json", s(&file)]).stdout).expect("map");
    let at = map
        .as_array()
        .expect("map entries")
        .iter()
        .find(|e| e["data"] == true && e["offset"].is_u64())
        .and_then(|e| e["offset"].as_u64())
        .expect("a data cluster");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).expect("open");
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at + 4097).expect("read");
    byte[0] ^= 0x40;
    f.write_all_at(&byte, at + 4097).expect("write");

    let to = d.path().join("r.qcow2");
    let out = knib(&["restore", "--store", s(&store), id, "--volume", "a", "--to", s(&to)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(20), "{err}");
    assert!(err.contains("corrupt") && err.contains(&format!("{id}/a.qcow2")), "{err}");
    assert!(!to.exists());
    let left: Vec<_> = std::fs::read_dir(d.path()).expect("list").flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains("r.qcow2")), "{left:?}");

    let out = knib(&["restore", "--store", s(&store), id, "--volume", "a", "--to", s(&to), "--no-verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(to.exists());

    let help = knib(&["restore", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--no-verify"));
}

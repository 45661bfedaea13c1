//! `knib compress` uses the machine's cores unless told otherwise: its
//! option is `--threads` (`--coroutines`, its old name, is an alias), its
//! default is the number of cores (at most 16), and `-v` logs the number of
//! compression threads a compression used.

use std::path::Path;
use std::process::{Command, Output};

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).env_remove("KNIB_LOG").output().expect("knib runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// "N compression thread(s)", as the log line states it.
fn threads_text(n: usize) -> String {
    format!("with {n} compression thread{} (", if n == 1 { "" } else { "s" })
}

#[test]
fn help_says_threads_and_the_default_is_the_core_count() {
    let help = String::from_utf8_lossy(&knib(&["compress", "--help"]).stdout).into_owned();
    assert!(help.contains("--threads <THREADS>"), "{help}");
    assert!(help.contains("Compression threads"), "{help}");
    assert!(help.contains("[alias: --coroutines]"), "{help}");
    let default = cores().min(16);
    assert!(
        help.contains(&format!("[default: {default}]")),
        "default is not {default} (the cores, at most 16): {help}"
    );
}

/// A full backup of a 16 MiB disk with 4 MiB of data, on a new store in `dir`;
/// returns the store and the backup's id.
fn backup(dir: &Path) -> (String, String) {
    let a = dir.join("a.qcow2");
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(&a), "16M"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -q -P 7 0 4M", s(&a)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = dir.join("store");
    let out = knib(&["backup", "--json", "--store", s(&store), "--vm", "v", "--disk", &format!("a={}", s(&a))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (s(&store).to_string(), m["id"].as_str().unwrap().to_string())
}

#[test]
fn compress_uses_one_thread_per_core_by_default_and_says_so_at_v() {
    let d = tempfile::tempdir().unwrap();
    let (store, id) = backup(d.path());
    let out = knib(&["-v", "compress", "--store", &store, &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = threads_text(cores().min(16));
    assert!(stderr(&out).contains(&want), "no {want:?} in: {}", stderr(&out));
}

#[test]
fn coroutines_is_the_old_name_of_threads() {
    let d = tempfile::tempdir().unwrap();
    let (store, id) = backup(d.path());
    let out = knib(&["-v", "compress", "--store", &store, &id, "--coroutines", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&threads_text(1)), "{}", stderr(&out));
    // Both names at once is one option given twice: a usage error.
    let out = knib(&["compress", "--store", &store, &id, "--threads", "1", "--coroutines", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

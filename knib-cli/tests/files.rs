//! `knib files` as operators use it: filesystems, listings and extraction
//! from a backup, the exit statuses of bad requests, and the peak memory
//! of extracting a 200 MB file.

#[path = "../../knib-core/tests/common/fsimage.rs"]
mod fsimage;

use std::path::Path;
use std::process::{Command, Output};

use fsimage::*;
use serde_json::Value;

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn ok(args: &[&str]) -> String {
    let out = knib(args);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn files_fs_ls_get_and_peak_memory() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    write_tree(&src, TreeOptions { big: true, symlinks: true });
    let img = w.join("ext.img");
    mkfs_ext4(&src, &img, 300);
    let raw = w.join("disk.raw");
    partitioned_disk(&[&img], &raw);
    std::fs::remove_file(&img).unwrap();
    let disk = w.join("disk.qcow2");
    to_qcow2(&raw, &disk);
    std::fs::remove_file(&raw).unwrap();
    let store = w.join("store");
    let b: Value = serde_json::from_str(&ok(&[
        "--json",
        "backup",
        "--store",
        s(&store),
        "--vm",
        "web",
        "--disk",
        &format!("root={}", s(&disk)),
    ]))
    .unwrap();
    let id = b["id"].as_str().unwrap();
    let base = ["--store", s(&store), id, "--volume", "root"];
    let args = |sub: &str, more: &[&str]| -> Vec<String> {
        let mut v = vec!["files".to_string(), sub.to_string()];
        v.extend(base.iter().map(|x| x.to_string()));
        v.extend(more.iter().map(|x| x.to_string()));
        v
    };
    let run_args = |a: &[String]| knib(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let ok_args = |a: &[String]| {
        let out = run_args(a);
        assert!(out.status.success(), "knib {a:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };

    // fs: one line per filesystem; --json as the API answers.
    let text = ok_args(&args("fs", &[]));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("partition 1") && text.contains("ext4") && text.contains("root"), "{text}");
    let mut j = args("fs", &[]);
    j.insert(0, "--json".into());
    let v: Value = serde_json::from_str(&ok_args(&j)).unwrap();
    assert_eq!(v["filesystems"][0]["index"], 1);
    assert_eq!(v["filesystems"][0]["partition"], 1);
    assert_eq!(v["filesystems"][0]["start"], 1 << 20);
    assert_eq!(v["filesystems"][0]["size"], 300 << 20);
    assert_eq!(v["filesystems"][0]["type"], "ext4");
    assert_eq!(v["filesystems"][0]["label"], "root");

    // ls: `ls -l`-like lines; symlinks shown with their targets.
    let text = ok_args(&args("ls", &["--fs", "1", "/"]));
    let big = text.lines().find(|l| l.ends_with(" big.bin")).unwrap_or_else(|| panic!("{text}"));
    assert!(
        big.starts_with("-rw-r--r--") && big.contains(&BIG.to_string()) && big.contains("2020-09-13 14:23:20"),
        "{big}"
    );
    assert!(text.lines().any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("evil-abs -> /etc/passwd")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("drwxr-x---") && l.ends_with(" docs")), "{text}");
    let mut j = args("ls", &["dir with space"]);
    j.push("--json".into());
    let v: Value = serde_json::from_str(&ok_args(&j)).unwrap();
    let e = &v["entries"][0];
    assert_eq!(
        (e["name"].as_str(), e["type"].as_str(), e["size"].as_u64()),
        (Some("naïve café.txt"), Some("file"), Some(12_345))
    );
    assert_eq!(
        (e["mode"].as_u64(), e["mtime"].as_i64(), e["mtime_nsec"].as_u64()),
        (Some(0o644), Some(T0 + 5000), Some(0))
    );
    assert!(e.get("target").is_none());

    // get of the 200 MB file, its peak memory measured by GNU time.
    let to = w.join("big.out");
    let mut a = args("get", &["/big.bin", "--to", s(&to)]);
    a.insert(0, "--json".into());
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kib=%M"])
        .arg(env!("CARGO_BIN_EXE_knib"))
        .args(&a)
        .output()
        .expect("/usr/bin/time (Debian package time) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "knib {a:?}: {stderr}");
    let kib: u64 = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("peak-rss-kib="))
        .unwrap_or_else(|| panic!("no peak RSS in: {stderr}"))
        .trim()
        .parse()
        .unwrap();
    assert!(kib > 0 && kib < 64 * 1024, "peak RSS {kib} KiB, want under 64 MiB");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"files": 1, "dirs": 0, "symlinks": 0, "bytes": BIG}));
    assert!(same_bytes(&to, &src.join("big.bin")));
    eprintln!("peak RSS of extracting {BIG} bytes: {kib} KiB");

    // A directory, in plain text.
    let to = w.join("docs");
    let text = ok_args(&args("get", &["/docs", "--to", s(&to)]));
    assert!(
        text.starts_with("extracted /docs of backup ") && text.contains("300 files, 26 directories, 0 symlinks"),
        "{text}"
    );
    assert_same_tree(&src.join("docs"), &to, &EXT4);

    // Bad requests: one line on stderr, exit 10 + the kind's code.
    for (more, code, text) in [
        (vec!["/docs/../etc", "--to", "x"], 13, "has a `..` component"),
        (vec!["/evil-abs", "--to", "x"], 13, "symlink /evil-abs points to \"/etc/passwd\", outside the filesystem"),
        (vec!["/evil-up", "--to", "x"], 13, "symlink /evil-up points to \"../../..\""),
        (vec!["/docs", "--to", s(&to)], 13, "already exists"),
        (vec!["/nothing", "--to", "x"], 11, "/nothing does not exist"),
        (vec!["--fs", "2", "/", "--to", "x"], 13, "has no filesystem 2"),
    ] {
        let out = run_args(&args("get", &more));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{more:?}: {err}");
        assert!(err.starts_with("knib: ") && err.contains(text) && err.lines().count() == 1, "{more:?}: {err}");
    }
    assert!(!Path::new("x").exists());
}

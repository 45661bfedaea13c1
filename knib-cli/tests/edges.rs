//! Edges of the `knib` tool found from outside (issue 13, section 5): a
//! bare file name as a destination, a refused backup leaves no trace, a
//! damaged store file is `corrupt` while a wrong disk of the caller is
//! `invalid input`, and libvirt's own error printing stays off stderr.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn knib_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).current_dir(dir).args(args).output().expect("knib runs")
}

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok_json_in(dir: &Path, args: &[&str]) -> Value {
    let out = knib_in(dir, args);
    assert!(out.status.success(), "knib {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0]).current_dir(dir).args(&args[1..]).output().expect("runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A small xorshift generator: the cases below come from fixed seeds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every path under `root` (relative), or `None` when `root` is absent.
fn tree(root: &Path) -> Option<BTreeSet<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).expect("inside").to_path_buf());
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            }
        }
    }
    if !root.exists() {
        return None;
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    Some(out)
}

/// `knib restore --to NAME` with a bare file name writes NAME in the working
/// directory and succeeds (it used to write it, then fail to fsync the
/// directory ""), for both formats and for a full and an incremental
/// backup taken with relative store and disk paths.
#[test]
fn restore_to_a_bare_file_name_in_the_working_directory() {
    let d = tempfile::tempdir().expect("temp dir");
    let w = d.path();
    run(w, &["qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "4M"]);
    let mut rng = Rng(0x6261_7265_2e72_6177);
    let mut ids = Vec::new();
    for round in 0..2 {
        let at = rng.below(60) * 64;
        let cmd = format!("write -P {} {at}k 64k", 0x40 + round);
        run(w, &["qemu-io", "-f", "qcow2", "-c", &cmd, "disk.qcow2"]);
        run(w, &["qemu-img", "convert", "-O", "raw", "disk.qcow2", &format!("ref{round}.raw")]);
        let b = ok_json_in(w, &["--json", "backup", "--store", "st", "--vm", "v", "--disk", "vda=disk.qcow2"]);
        assert_eq!(b["kind"], if round == 0 { "full" } else { "incremental" });
        ids.push(b["id"].as_str().expect("id").to_string());
    }
    for (round, id) in ids.iter().enumerate() {
        for format in ["raw", "qcow2"] {
            let to = format!("bare{round}.{format}");
            let out = knib_in(w, &["restore", "--store", "st", id, "--volume", "vda", "--to", &to, "--format", format]);
            assert!(out.status.success(), "restore --to {to}: {}", stderr(&out));
            run(w, &["qemu-img", "compare", "-F", "raw", &to, &format!("ref{round}.raw")]);
        }
    }
    let names: Vec<String> = std::fs::read_dir(w)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".part")), "a partial file is left: {names:?}");
}

/// What a refused `knib backup` is given: its arguments after `--store S`,
/// the exit status and a part of the message.
fn refused_backups(dir: &Path) -> Vec<(Vec<String>, i32, String)> {
    let disk = |name: &str| format!("vda={}", s(&dir.join(name)));
    let mut cases: Vec<(Vec<String>, i32, String)> = Vec::new();
    let mut add = |args: &[&str], code: i32, text: &str| {
        cases.push((args.iter().map(|a| a.to_string()).collect(), code, text.to_string()));
    };
    // Bad VM and volume names, made from a fixed seed: a good name with a
    // character that is not allowed put somewhere, or a name that starts
    // with a dot or holds "..".
    let bad_chars = [" ", "/", "\\", ":", "*", "\u{e9}", "$", "'", "\t", "\n"];
    let mut rng = Rng(0x7265_6675_7365_6421);
    let good = dir.join("good.qcow2");
    for i in 0..12 {
        let base = ["web", "db-1", "vm_2", "a.b"][rng.below(4) as usize];
        let at = rng.below(base.len() as u64 + 1) as usize;
        let name = match i % 4 {
            0 => format!(".{base}"),
            1 => format!("{}..{}", &base[..at], &base[at..]),
            _ => format!("{}{}{}", &base[..at], bad_chars[rng.below(bad_chars.len() as u64) as usize], &base[at..]),
        };
        let good_disk = format!("vda={}", s(&good));
        add(&["--vm", &name, "--disk", &good_disk], 13, "VM name");
        add(&["--vm", "ok", "--disk", &format!("{name}={}", s(&good))], 13, "volume name");
    }
    add(&["--vm", "../x", "--disk", &disk("good.qcow2")], 13, "could escape the store");
    add(&["--vm", "a b", "--disk", &disk("good.qcow2")], 13, "VM name \"a b\"");
    add(&["--vm", "ok", "--disk", &disk("good.qcow2"), "--disk", &disk("good.qcow2")], 13, "given twice");
    // One file under two volume names: as given, through a symbolic link,
    // through a hard link (before, both were copied and published, and the
    // second volume's merge then failed).
    for other in ["good.qcow2", "good-symlink.qcow2", "good-hardlink.qcow2"] {
        let two = format!("vdb={}", s(&dir.join(other)));
        add(&["--vm", "ok", "--disk", &disk("good.qcow2"), "--disk", &two], 13, "are the same file");
    }
    add(&["--vm", "ok", "--disk", &disk("missing.qcow2")], 11, "does not exist");
    add(
        &["--vm", "ok", "--disk", &disk("good.qcow2"), "--disk", &format!("vdb={}", s(&dir.join("gone.qcow2")))],
        11,
        "does not exist",
    );
    add(&["--vm", "ok", "--disk", &disk("raw.img")], 13, "is raw, not qcow2");
    add(&["--vm", "ok", "--disk", "noequals"], 13, "is not NAME=PATH");
    add(&["--vm", "ok"], 2, "--disk");
    cases
}

/// A backup refused for its input (bad VM or volume name, missing or
/// non-qcow2 disk) leaves the store as it was: absent stays absent (no
/// `STORE` and no `STORE/vms` made), an empty one stays empty; through the
/// tool and through the JSON API the bindings use.
#[test]
fn a_refused_backup_creates_nothing() {
    let d = tempfile::tempdir().expect("temp dir");
    run(d.path(), &["qemu-img", "create", "-q", "-f", "qcow2", "good.qcow2", "1M"]);
    run(d.path(), &["qemu-img", "create", "-q", "-f", "raw", "raw.img", "1M"]);
    std::os::unix::fs::symlink("good.qcow2", d.path().join("good-symlink.qcow2")).expect("symlink");
    std::fs::hard_link(d.path().join("good.qcow2"), d.path().join("good-hardlink.qcow2")).expect("hard link");
    let cases = refused_backups(d.path());
    assert!(cases.len() > 30);
    for (i, (args, code, text)) in cases.iter().enumerate() {
        for existing in [false, true] {
            let store = d.path().join(format!("store{i}-{existing}"));
            if existing {
                std::fs::create_dir(&store).expect("mkdir");
            }
            let before = tree(&store);
            let mut all = vec!["backup", "--store", s(&store)];
            all.extend(args.iter().map(String::as_str));
            let out = knib(&all);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(*code), "{all:?}: {err}");
            assert!(err.contains(text.as_str()), "{all:?}: {err}");
            assert_eq!(tree(&store), before, "{all:?} changed the store ({err})");
        }
    }
    // The same through the JSON API (knib_backup, NativeLib.backup).
    let good = d.path().join("good.qcow2");
    let requests = [
        serde_json::json!({"vm": "../x", "disks": [{"name": "vda", "path": good}]}),
        serde_json::json!({"vm": "a b", "disks": [{"name": "vda", "path": good}]}),
        serde_json::json!({"vm": "ok", "disks": [{"name": "a/b", "path": good}]}),
        serde_json::json!({"vm": "ok", "disks": [{"name": "vda", "path": d.path().join("missing.qcow2")}]}),
    ];
    for (i, mut r) in requests.into_iter().enumerate() {
        let store = d.path().join(format!("api-store{i}"));
        r["store"] = Value::from(s(&store));
        let e = knib_core::api::call("backup", &r.to_string(), &knib_core::Control::new())
            .expect_err("the request is refused");
        assert!(matches!(e.kind, knib_core::ErrorKind::InvalidInput | knib_core::ErrorKind::NotFound), "{e}");
        assert!(!store.exists(), "{r}: the store was made ({e})");
    }
}

/// Damage the first four bytes of `file` as case `n` says, from a fixed
/// seed: zeros, a near miss of the qcow2 magic, random bytes, or a file cut
/// to fewer bytes than a magic.
fn damage_magic(file: &Path, n: u64, rng: &mut Rng) {
    let mut bytes = std::fs::read(file).expect("read");
    match n % 4 {
        0 => bytes[..4].copy_from_slice(&[0; 4]),
        1 => bytes[3] ^= 1 << rng.below(8),
        2 => loop {
            let r = rng.next().to_le_bytes();
            if r[..4] != *b"QFI\xfb" {
                bytes[..4].copy_from_slice(&r[..4]);
                break;
            }
        },
        _ => bytes.truncate(rng.below(4) as usize),
    }
    std::fs::write(file, bytes).expect("write");
}

/// A backup file in the store that is not qcow2 (its magic damaged) makes
/// every command that reads it fail `corrupt` (exit 20) naming the file,
/// not `invalid input` (13); a disk of the caller's that is not qcow2 stays
/// `invalid input`.
#[test]
fn a_store_file_with_a_bad_magic_is_corrupt() {
    let d = tempfile::tempdir().expect("temp dir");
    let w = d.path();
    run(w, &["qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "2M"]);
    run(w, &["qemu-io", "-f", "qcow2", "-c", "write -P 0x51 0 256k", "disk.qcow2"]);
    let full = ok_json_in(w, &["--json", "backup", "--store", "st", "--vm", "v", "--disk", "vda=disk.qcow2"]);
    run(w, &["qemu-io", "-f", "qcow2", "-c", "write -P 0x52 1M 64k", "disk.qcow2"]);
    let inc = ok_json_in(w, &["--json", "backup", "--store", "st", "--vm", "v", "--disk", "vda=disk.qcow2"]);
    assert_eq!(inc["kind"], "incremental");
    let backups = [&full, &inc];
    let mut rng = Rng(0x6d61_6769_632e_3230);
    for case in 0..8u64 {
        // Damage the full backup's file (under the incremental too) or the
        // incremental's own.
        let victim = backups[(case / 4) as usize % 2];
        let file = w.join(victim["volumes"][0]["file"].as_str().expect("file"));
        let good = std::fs::read(&file).expect("read");
        damage_magic(&file, case, &mut rng);
        let name = file.file_name().expect("name").to_string_lossy().into_owned();
        for b in backups {
            let id = b["id"].as_str().expect("id");
            // The incremental reads the full backup's file; the full one
            // does not read the incremental's.
            if std::ptr::eq(b, &full) && std::ptr::eq(victim, &inc) {
                continue;
            }
            let to = format!("r{case}-{id}.qcow2");
            let commands: [&[&str]; 4] = [
                &["restore", "--store", "st", id, "--volume", "vda", "--to", &to],
                &["compress", "--store", "st", id],
                &["verify", "--store", "st", id],
                &["files", "fs", "--store", "st", id, "--volume", "vda"],
            ];
            for args in commands {
                let out = knib_in(w, args);
                let err = stderr(&out);
                assert_eq!(out.status.code(), Some(20), "case {case}, {args:?}: {err}");
                assert!(err.starts_with("knib: corrupt: "), "case {case}, {args:?}: {err}");
                assert!(err.contains(&name) && err.contains("not a qcow2 image"), "case {case}, {args:?}: {err}");
            }
            assert!(!w.join(&to).exists(), "case {case}: a restore of a damaged backup was written");
        }
        // A backup that continues the chain refuses to build on it.
        let out = knib_in(w, &["backup", "--store", "st", "--vm", "v", "--disk", "vda=disk.qcow2"]);
        assert_eq!(out.status.code(), Some(20), "case {case}: {}", stderr(&out));
        std::fs::write(&file, good).expect("write back");
    }
    let out = knib_in(w, &["verify", "--store", "st"]);
    assert!(out.status.success(), "the store is whole again: {}", stderr(&out));

    // The caller's own disk that is not qcow2: invalid input.
    std::fs::write(w.join("junk.img"), [0x5a; 4096]).expect("write");
    run(w, &["qemu-img", "create", "-q", "-f", "raw", "raw.img", "1M"]);
    for disk in ["junk.img", "raw.img"] {
        let out = knib_in(w, &["backup", "--store", "st2", "--vm", "v", "--disk", &format!("vda={disk}")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(13), "{disk}: {err}");
        assert!(err.contains("is raw, not qcow2"), "{disk}: {err}");
    }
}

/// libvirt prints each error on stderr unless the program sets a handler;
/// knib routes them to its log, so a failed libvirt call shows only knib's
/// own one-line error: a connection that cannot be opened (libvirt's
/// process-wide handler) and a domain that does not exist (the
/// connection's).
#[test]
fn libvirt_errors_stay_off_stderr() {
    if std::env::var_os("KNIB_TEST_NO_LIBVIRT").is_some() {
        return;
    }
    let d = tempfile::tempdir().expect("temp dir");
    let store = d.path().join("store");
    let domain = format!("knib-no-such-domain-{}", std::process::id());
    let cases: [(&[&str], &str); 6] = [
        (
            &["--json", "backup", "--store", s(&store), "--domain", "x", "--connect", "qemu:///nope"],
            "knib: hypervisor: ",
        ),
        (&["recover", "--store", s(&store), "--domain", "x", "--connect", "qemu:///nope"], "knib: hypervisor: "),
        (&["consolidate", "--domain", "x", "--connect", "qemu:///nope"], "knib: hypervisor: "),
        (&["--json", "backup", "--store", s(&store), "--domain", &domain], "knib: not found: "),
        (&["recover", "--store", s(&store), "--domain", &domain], "knib: not found: "),
        (&["consolidate", "--domain", &domain], "knib: not found: "),
    ];
    for (args, start) in cases {
        let out = knib(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.starts_with(start), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: more than knib's own line on stderr:\n{err}");
        assert!(!err.contains("libvirt: "), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(!store.exists(), "a failed backup made the store");
}

//! What a shell user expects of `knib`: `-v` and `KNIB_LOG` show the
//! library's log, `--help` lists the values an option takes and a bad one is
//! a usage error (status 2), a directory that is not a store is named as
//! such, a refused command leaves nothing behind, and `--connect` goes
//! before or after the subcommand.

use std::path::Path;
use std::process::{Command, Output};

fn knib_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args).env_remove("KNIB_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("knib runs")
}

fn knib(args: &[&str]) -> Output {
    knib_env(args, &[])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 16 MiB qcow2 disk in `dir`, as `a=PATH`.
fn disk(dir: &Path) -> String {
    let a = dir.join("a.qcow2");
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(&a), "16M"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    format!("a={}", s(&a))
}

/// The log line of a backup's decision (at info level).
const DECISION: &str = "backup of v: full backup at position 1";

#[test]
fn verbose_and_knib_log_show_the_library_log_on_stderr() {
    let d = tempfile::tempdir().unwrap();
    let da = disk(d.path());
    let quiet = knib(&["backup", "--store", s(&d.path().join("s1")), "--vm", "v", "--disk", &da, "--full"]);
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    assert!(!stderr(&quiet).contains(DECISION), "{}", stderr(&quiet));

    let loud = knib(&["-v", "backup", "--store", s(&d.path().join("s2")), "--vm", "v", "--disk", &da, "--full"]);
    assert!(loud.status.success(), "{}", stderr(&loud));
    assert!(stderr(&loud).contains(DECISION), "{}", stderr(&loud));
    assert!(!stderr(&loud).contains("DEBUG"), "-v is info, not debug: {}", stderr(&loud));
    // -v after the subcommand too; -vv adds debug lines.
    let louder = knib(&["backup", "--store", s(&d.path().join("s3")), "--vm", "v", "--disk", &da, "--full", "-vv"]);
    assert!(louder.status.success(), "{}", stderr(&louder));
    assert!(stderr(&louder).contains(DECISION) && stderr(&louder).contains("[DEBUG "), "{}", stderr(&louder));

    let env = knib_env(
        &["backup", "--store", s(&d.path().join("s4")), "--vm", "v", "--disk", &da, "--full"],
        &[("KNIB_LOG", "debug")],
    );
    assert!(env.status.success(), "{}", stderr(&env));
    assert!(stderr(&env).contains(DECISION) && stderr(&env).contains("[DEBUG "), "{}", stderr(&env));
    // A filter by module: only that module's lines.
    let env = knib_env(
        &["backup", "--store", s(&d.path().join("s5")), "--vm", "v", "--disk", &da, "--full"],
        &[("KNIB_LOG", "knib_core::catalog=info")],
    );
    assert!(stderr(&env).contains(DECISION), "{}", stderr(&env));
    assert!(!stderr(&env).contains("[DEBUG "), "{}", stderr(&env));
}

#[test]
fn help_lists_the_values_and_a_bad_value_is_a_usage_error() {
    let out = knib(&["backup", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[possible values: zstd, zlib]"), "{help}");
    let help = String::from_utf8_lossy(&knib(&["restore", "--help"]).stdout).into_owned();
    assert!(help.contains("[possible values: qcow2, raw]"), "{help}");
    let help = String::from_utf8_lossy(&knib(&["compress", "--help"]).stdout).into_owned();
    assert!(help.contains("[possible values: zstd, zlib]"), "{help}");
    let help = String::from_utf8_lossy(&knib(&["--help"]).stdout).into_owned();
    assert!(help.contains("--verbose") && help.contains("KNIB_LOG") && help.contains("--connect"), "{help}");

    let d = tempfile::tempdir().unwrap();
    let st = d.path().join("store");
    for args in [
        &["backup", "--store", s(&st), "--vm", "v", "--disk", "a=/x.qcow2", "--compress", "lz4"][..],
        &["compress", "--store", s(&st), "b1", "--library", "gzip"],
        &["compress", "--store", s(&st), "b1", "--coroutines", "17"],
        &["restore", "--store", s(&st), "b1", "--volume", "a", "--to", "/tmp/x", "--format", "vmdk"],
        &["list", "--store", s(&st), "--colour"],
    ] {
        let out = knib(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error: "), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
        assert!(!st.exists(), "{args:?} made the store");
    }
}

#[test]
fn list_on_a_directory_that_is_not_a_store_says_so() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("notes.txt"), "not backups").unwrap();
    for dir in [d.path().to_path_buf(), d.path().join("missing")] {
        let out = knib(&["list", "--store", s(&dir)]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(11), "{err}");
        assert!(err.starts_with("knib: not found: "), "{err}");
        assert!(err.contains(s(&dir)), "{err}");
        assert!(err.contains("is not a knib store") || err.contains("does not exist"), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = knib(&["list", "--store", s(d.path())]);
    assert!(stderr(&out).contains(&format!("{} is not a knib store", s(d.path()))), "{}", stderr(&out));
    // The same for the other commands that read a store.
    for args in [&["jobs", "list", "--store", s(d.path())][..], &["verify", "--store", s(d.path())]] {
        let out = knib(args);
        assert_eq!(out.status.code(), Some(11), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("is not a knib store"), "{args:?}: {}", stderr(&out));
    }
    // A store with no backup yet lists nothing.
    let d2 = tempfile::tempdir().unwrap();
    std::fs::write(d2.path().join("knib.json"), r#"{"schema": 1}"#).unwrap();
    let out = knib(&["list", "--store", s(d2.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no backups");
}

#[test]
fn a_refused_command_creates_nothing() {
    let d = tempfile::tempdir().unwrap();
    let da = disk(d.path());
    let st = d.path().join("new").join("store");
    let missing = format!("a={}", s(&d.path().join("missing.qcow2")));
    let junk = d.path().join("junk.qcow2");
    std::fs::write(&junk, [0x5a; 4096]).unwrap();
    let junk = format!("a={}", s(&junk));
    for (args, code) in [
        (&["backup", "--store", s(&st), "--vm", "v", "--disk", &missing][..], 11),
        (&["backup", "--store", s(&st), "--vm", "v", "--disk", &junk], 13),
        (&["backup", "--store", s(&st), "--vm", "../v", "--disk", &da], 13),
        (&["backup", "--store", s(&st), "--vm", "v", "--disk", "a"], 13),
        (&["backup", "--store", s(&st), "--vm", "v", "--disk", &da, "--disk", &da], 13),
        (&["backup", "--store", s(&st), "--vm", "v", "--disk", &da, "--compress", "lz4"], 2),
        (&["backup", "--store", s(&st), "--domain", "x", "--connect", "qemu:///nope"], 18),
        (&["recover", "--store", s(&st), "--domain", "x", "--connect", "qemu:///nope"], 18),
        (&["jobs", "queue", "--store", s(&st), "b1"], 11),
        (&["restore", "--store", s(&st), "b1", "--volume", "a", "--to", s(&d.path().join("new/r.qcow2"))], 11),
    ] {
        let out = knib(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(!d.path().join("new").exists(), "{args:?} left {}", s(&d.path().join("new")));
    }
}

#[test]
fn connect_is_global_before_or_after_the_subcommand() {
    let d = tempfile::tempdir().unwrap();
    let st = s(d.path());
    for args in [
        &["--connect", "qemu:///nope", "consolidate", "--domain", "x"][..],
        &["consolidate", "--connect", "qemu:///nope", "--domain", "x"],
        &["consolidate", "--domain", "x", "--connect=qemu:///nope"],
        &["--connect", "qemu:///nope", "backup", "--store", st, "--domain", "x"],
        &["--connect", "qemu:///nope", "recover", "--store", st, "--domain", "x"],
        &["--connect", "qemu:///nope", "restore", "--store", st, "b1", "--quick", "--domain", "x"],
    ] {
        let out = knib(args);
        let err = stderr(&out);
        // Not a usage error: the URI reached libvirt (or the store was
        // looked at first), which refused it.
        assert_ne!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("knib: "), "{args:?}: {err}");
        if !args.contains(&"restore") {
            assert!(err.contains("qemu:///nope"), "{args:?}: {err}");
            assert_eq!(out.status.code(), Some(18), "{args:?}: {err}");
        }
    }
    // Commands that do not talk to libvirt take it too (it is global), and
    // ignore it.
    let out = knib(&["--connect", "qemu:///nope", "list", "--store", st]);
    assert!(stderr(&out).contains("is not a knib store"), "{}", stderr(&out));
}

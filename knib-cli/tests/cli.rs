//! The `knib` tool as scripts use it: the exact interface, JSON output,
//! one-line errors on stderr with a non-zero status, and the demo.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

#[path = "../../knib-core/tests/common/cache.rs"]
mod cache;

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

/// knib with the host setting `var` at `value`, or unset when `None`
/// (whatever the tests' own environment holds).
fn knib_with(var: &str, value: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args).env_remove(var);
    if let Some(v) = value {
        c.env(var, v);
    }
    c.output().expect("knib runs")
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
fn backup_list_show_compress_verify_restore_delete() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
    for p in [&a, &b] {
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(p), "16M"]);
    }
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 4M", s(&a)]);
    let da = format!("a={}", s(&a));
    let db = format!("b={}", s(&b));
    let full = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "web", "--disk", &da, "--disk", &db]);
    assert_eq!(full["vm"], "web");
    assert_eq!(full["kind"], "full");
    assert_eq!(full["parent"], Value::Null);
    assert_eq!(full["end_of_chain"], false);
    assert_eq!(full["volumes"][0]["name"], "a");
    assert_eq!(full["volumes"][0]["virtual_size"], 16 << 20);
    assert!(Path::new(full["volumes"][0]["file"].as_str().unwrap()).exists());
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x32 1M 1M", s(&a)]);
    qemu(&["qemu-img", "convert", "-O", "qcow2", s(&a), s(&d.path().join("ref.qcow2"))]);
    // --json may also follow the subcommand.
    let inc = ok_json(&["backup", "--store", s(&store), "--vm", "web", "--disk", &da, "--disk", &db, "--json"]);
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["parent"], full["id"]);
    let list = ok_json(&["--json", "list", "--store", s(&store), "--vm", "web"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[1]["id"], inc["id"]);
    let id = inc["id"].as_str().unwrap();
    let shown = ok_json(&["--json", "show", "--store", s(&store), id]);
    assert_eq!(shown["id"], inc["id"]);
    // One view of a backup: `--json` prints what every binding answers.
    let api: Value = serde_json::from_str(
        &knib_core::api::call(
            "show",
            &serde_json::json!({"store": store, "backup": id}).to_string(),
            &knib_core::Control::new(),
        )
        .expect("show through the API"),
    )
    .expect("JSON");
    assert_eq!(shown, api);
    let out = knib(&[
        "compress",
        "--store",
        s(&store),
        full["id"].as_str().unwrap(),
        "--library",
        "zstd",
        "--coroutines",
        "2",
        "--rate-limit",
        "0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = knib(&["verify", "--store", s(&store)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches(": ok").count(), 2);
    let to = d.path().join("restored.raw");
    let out = knib(&["restore", "--store", s(&store), id, "--volume", "a", "--to", s(&to), "--format", "raw"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    qemu(&["qemu-img", "compare", s(&to), s(&d.path().join("ref.qcow2"))]);
    let out = knib(&["delete", "--store", s(&store), full["id"].as_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("marked removed"));
    let list = ok_json(&["list", "--store", s(&store), "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let plain = knib(&["list", "--store", s(&store)]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains(id));
}

#[test]
fn errors_are_one_line_on_stderr_with_a_status_per_kind() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(store.join("vms")).unwrap();
    let cases: [(&[&str], i32, &str); 6] = [
        (&["show", "--store", s(&store), "nope"], 11, "knib: not found: backup nope does not exist"),
        (&["list", "--store", "/nonexistent/store"], 11, "knib: not found: store /nonexistent/store does not exist"),
        (
            &["backup", "--store", s(&store), "--vm", "../x", "--disk", "a=/nonexistent.qcow2"],
            13,
            "knib: invalid input: VM name \"../x\"",
        ),
        (&["backup", "--store", s(&store), "--vm", "x", "--disk", "noequals"], 13, "is not NAME=PATH"),
        (&["list", "--store", s(d.path())], 11, "is not a knib store"),
        // A value not among those --help lists: a usage error.
        (
            &["restore", "--store", s(&store), "b1", "--volume", "v", "--to", "/tmp/x", "--format", "vmdk"],
            2,
            "error: invalid value 'vmdk' for '--format <FORMAT>'",
        ),
    ];
    for (args, code, text) in cases {
        let out = knib(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
        if code != 2 {
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn demo_runs_to_the_end_and_says_what_it_did() {
    let d = tempfile::tempdir().unwrap();
    let out = knib(&["demo", "--dir", s(d.path())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("taken: full"), "{text}");
    assert_eq!(text.matches("taken: incremental").count(), 2, "{text}");
    assert!(text.contains("compressed full backup"), "{text}");
    assert_eq!(text.matches("identical to the disk at that backup").count(), 6, "{text}");
    assert!(text.contains("demo finished"), "{text}");
}

/// A store with one backup (VM `v`, volume `a`: 8 MiB, its first MiB
/// written): (the temporary directory, the store, the backup as JSON).
fn one_backup() -> (tempfile::TempDir, std::path::PathBuf, Value) {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = d.path().join("a.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&a), "8M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 1M", s(&a)]);
    let da = format!("a={}", s(&a));
    let b = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "v", "--disk", &da]);
    (d, store, b)
}

#[test]
fn jobs_run_exits_non_zero_when_a_job_failed_for_good() {
    let (_dir, store, b) = one_backup();
    std::fs::write(
        store.join("knib.json"),
        r#"{"schema": 1, "compression.max_retries": 1, "compression.retry_interval_secs": 1, "compression.min_free_factor": 1e12}"#,
    )
    .unwrap();
    let out = knib(&["jobs", "queue", "--store", s(&store), b["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = knib(&["jobs", "run", "--store", s(&store)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(14), "{err}");
    assert!(err.contains("1 job(s) failed"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 done, 1 failed, 0 cancelled, 1 retried"), "{text}");
    // While it waited for the retry, it said so.
    assert_eq!(text.matches("waiting for its next attempt at 20").count(), 1, "{text}");
}

#[test]
fn jobs_queue_validate_runs_the_checks_and_a_bad_backup_exits_corrupt() {
    let (_dir, store, b) = one_backup();
    let id = b["id"].as_str().unwrap();
    let job = ok_json(&["--json", "jobs", "queue", "--validate", "--store", s(&store), id]);
    assert_eq!(job["kind"], "validate");
    let out = knib(&["jobs", "run", "--store", s(&store)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 done, 0 failed"));

    // A byte of the backup's data changed: the next validation fails for good.
    let file = b["volumes"][0]["file"].as_str().unwrap();
    let map = Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2", file]).output().unwrap();
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let offset = map.as_array().unwrap().iter().find(|e| e["data"] == true).unwrap()["offset"].as_u64().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.write_all_at(b"\x00", offset + 7).unwrap();
    }
    ok_json(&["--json", "jobs", "queue", "--validate", "--store", s(&store), id]);
    let out = knib(&["jobs", "run", "--store", s(&store)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(20), "{err}");
    let list = ok_json(&["--json", "jobs", "list", "--store", s(&store)]);
    // The JSON API answers the same jobs, field for field.
    let api =
        knib_core::api::call("jobs.list", &serde_json::json!({"store": store}).to_string(), &knib_core::Control::new());
    assert_eq!(serde_json::from_str::<Value>(&api.unwrap()).unwrap(), list);
    let last = &list.as_array().unwrap()[1];
    assert_eq!(last["state"], "failed");
    let why = last["last_error"].as_str().unwrap();
    assert!(why.contains(file) && why.contains("differs from the recorded"), "{why}");
}

#[test]
fn backup_compress_writes_a_compressed_backup_in_one_pass() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = d.path().join("a.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&a), "16M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 4M", s(&a)]);
    qemu(&["qemu-img", "convert", "-O", "qcow2", s(&a), s(&d.path().join("ref.qcow2"))]);
    let da = format!("a={}", s(&a));
    let b = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "v", "--disk", &da, "--compress"]);
    assert_eq!(b["compression"]["library"], "zstd", "{b}");
    let z = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "v", "--disk", &da, "--compress", "zlib"]);
    assert_eq!(z["compression"]["library"], "zlib", "{z}");
    let bad = knib(&["backup", "--store", s(&store), "--vm", "v", "--disk", &da, "--compress", "lz4"]);
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
    let to = d.path().join("restored.raw");
    let id = z["id"].as_str().unwrap();
    let out = knib(&["restore", "--store", s(&store), id, "--volume", "a", "--to", s(&to), "--format", "raw"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    qemu(&["qemu-img", "compare", s(&to), s(&d.path().join("ref.qcow2"))]);
}

/// `KNIB_WRITE_MODE` chooses, host-wide, how knib writes its outputs: a
/// restore written behind (the default, or the variable's `behind`) or
/// O_DIRECT (`direct`) leaves none of its 160 MiB in the page cache; one
/// written `buffered` leaves it there; the bytes are the same each time. A
/// value that is no mode is a warning naming it, and the default. The files
/// are under the target directory, a disk file system (tmpfs keeps every
/// page).
#[test]
fn knib_write_mode_chooses_how_outputs_are_written() {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = d.path().join("store");
    let disk = d.path().join("disk.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&disk), "256M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 96M", "-c", "write -P 0x42 128M 64M", s(&disk)]);
    let da = format!("root={}", s(&disk));
    let full = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "m", "--disk", &da]);
    let id = full["id"].as_str().unwrap();
    let cases: [(Option<&str>, bool); 5] = [
        (None, false),
        (Some("behind"), false),
        (Some("direct"), false),
        (Some("buffered"), true),
        (Some("fast"), false),
    ];
    for (i, (mode, cached)) in cases.iter().enumerate() {
        for format in ["qcow2", "raw"] {
            let out_path = d.path().join(format!("r{i}.{format}"));
            let out = knib_with(
                "KNIB_WRITE_MODE",
                *mode,
                &["restore", "--store", s(&store), id, "--volume", "root", "--format", format, "--to", s(&out_path)],
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{mode:?} {format}: {err}");
            let warned = err
                .contains("KNIB_WRITE_MODE=\"fast\" is not a write mode (behind, direct or buffered); writing behind");
            assert_eq!(warned, *mode == Some("fast"), "{mode:?} {format}: {err}");
            // Before the comparison, which reads the file into the cache.
            let resident = cache::resident(&out_path);
            qemu(&["qemu-img", "compare", "-q", s(&disk), s(&out_path)]);
            if *cached {
                assert!(resident > 128 << 20, "{mode:?} {format}: only {resident} bytes cached");
            } else {
                assert!(resident < 8 << 20, "{mode:?} {format}: {resident} bytes left cached");
            }
            std::fs::remove_file(&out_path).unwrap();
        }
    }
}

/// `KNIB_ZSTD_LEVEL` chooses, host-wide, zstd's level: on real files (the
/// first 24 MiB of a tar of this machine's `/usr/bin`), a backup compressed
/// in one pass at level 3 is smaller than one at the default (2), which is
/// smaller than one at level 1; each restores to the disk's bytes and
/// passes `qemu-img check`. A value that is no level is a warning naming
/// it, and the default's exact output.
#[test]
fn knib_zstd_level_chooses_size_against_cpu() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("files.raw");
    let tar = Command::new("sh")
        .arg("-c")
        .arg(format!("tar -cf - -C / usr/bin 2>/dev/null | head -c {} > '{}'", 24 << 20, s(&raw)))
        .status()
        .unwrap();
    assert!(tar.success());
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 24 << 20, "/usr/bin holds less than 24 MiB");
    let disk = d.path().join("disk.qcow2");
    qemu(&["qemu-img", "convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&disk)]);
    let da = format!("root={}", s(&disk));
    let mut sizes = Vec::new();
    for (i, level) in [None, Some("3"), Some("1"), Some("fast")].iter().enumerate() {
        let store = d.path().join(format!("store{i}"));
        let out = knib_with(
            "KNIB_ZSTD_LEVEL",
            *level,
            &["--json", "backup", "--store", s(&store), "--vm", "m", "--disk", &da, "--compress", "zstd"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{level:?}: {err}");
        let warned = err.contains("KNIB_ZSTD_LEVEL=\"fast\" is not a zstd level (1 to 19); compressing at level 2");
        assert_eq!(warned, *level == Some("fast"), "{level:?}: {err}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let file = v["volumes"][0]["file"].as_str().unwrap().to_string();
        qemu(&["qemu-img", "check", "-q", &file]);
        let to = d.path().join(format!("r{i}.raw"));
        let id = v["id"].as_str().unwrap();
        let out = knib(&["restore", "--store", s(&store), id, "--volume", "root", "--format", "raw", "--to", s(&to)]);
        assert!(out.status.success(), "{level:?}: {}", String::from_utf8_lossy(&out.stderr));
        qemu(&["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", s(&raw), s(&to)]);
        sizes.push(std::fs::metadata(&file).unwrap().len());
    }
    let [default, three, one, bad] = sizes[..] else { unreachable!() };
    assert!(three < default && default < one, "level 3 {three}, level 2 {default}, level 1 {one} bytes");
    assert_eq!(bad, default, "a value that is no level compresses at the default");
}

/// libvirt and libnbd are loaded by the commands that talk to a domain,
/// and by no other: a backup, restore and verify of disk files never map
/// them. The dynamic loader's own trace (`LD_DEBUG=files`) names every
/// library a process loads, at its start or later (`dlopen`).
#[test]
fn libvirt_and_libnbd_are_loaded_only_for_domains() {
    let loaded = |args: &[&str]| -> (String, Vec<String>) {
        let out = Command::new(env!("CARGO_BIN_EXE_knib")).args(args).env("LD_DEBUG", "files").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let libs = err
            .lines()
            .filter_map(|l| l.split("file=").nth(1))
            .filter_map(|l| l.split([' ', '\t']).next())
            .map(str::to_string)
            .collect();
        (err, libs)
    };
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let disk = d.path().join("disk.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&disk), "16M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", s(&disk)]);
    let dd = format!("root={}", s(&disk));
    let full = ok_json(&["--json", "backup", "--store", s(&store), "--vm", "m", "--disk", &dd]);
    let id = full["id"].as_str().unwrap();
    let to = d.path().join("r.qcow2");
    let file_commands: [Vec<&str>; 5] = [
        vec!["--version"],
        vec!["backup", "--store", s(&store), "--vm", "m", "--disk", &dd, "--compress"],
        vec!["list", "--store", s(&store)],
        vec!["verify", "--store", s(&store), id],
        vec!["restore", "--store", s(&store), id, "--volume", "root", "--to", s(&to)],
    ];
    for args in &file_commands {
        let (err, libs) = loaded(args);
        assert!(libs.iter().any(|l| l == "libc.so.6"), "{args:?}: no loader trace: {err}");
        let bad: Vec<_> = libs.iter().filter(|l| l.starts_with("libvirt") || l.starts_with("libnbd")).collect();
        assert!(bad.is_empty(), "{args:?} loaded {bad:?}");
    }
    qemu(&["qemu-img", "compare", "-q", s(&disk), s(&to)]);
    // A command on a domain loads libvirt.
    let (err, libs) = loaded(&["backup", "--store", s(&store), "--domain", "knib-test-no-such-domain"]);
    for lib in ["libvirt.so.0", "libvirt-qemu.so.0"] {
        assert!(libs.iter().any(|l| l == lib), "{lib} not loaded: {err}");
    }
    // libvirt's "no domain" error (its number read through the loaded API).
    assert!(err.contains("knib: not found: domain knib-test-no-such-domain does not exist"), "{err}");
}

/// A disk replaced while its old `.knib-base` is still beside it (an
/// operator copied the disk again from a template): refused before
/// anything is copied, the store not even made. Before, a full backup was
/// copied and published, then the merge failed; each retry added another.
#[test]
fn a_disk_beside_a_base_it_does_not_run_on_is_refused_before_the_copy() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", s(&a), "8M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", s(&a)]);
    let pristine = d.path().join("pristine.qcow2");
    std::fs::copy(&a, &pristine).unwrap();
    let da = format!("root={}", s(&a));
    ok_json(&["--json", "backup", "--store", s(&d.path().join("st1")), "--vm", "v", "--disk", &da]);
    assert!(d.path().join("a.qcow2.knib-base").exists());
    std::fs::copy(&pristine, &a).unwrap();
    let before = std::fs::read(&a).unwrap();
    let st2 = d.path().join("st2");
    for _ in 0..2 {
        let out = knib(&["backup", "--store", s(&st2), "--vm", "v", "--disk", &da]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(13), "{err}");
        assert!(err.contains("a.qcow2.knib-base exists but") && err.contains("does not run on it"), "{err}");
        assert!(!st2.exists(), "a refused backup made the store");
        assert_eq!(std::fs::read(&a).unwrap(), before);
    }
}

//! `knib group`: the group backups from the shell, with plain-disk VMs (no
//! libvirt): argument errors, an empty store, backup, list, show, restore
//! (compared with `qemu-img compare`), delete, and `--json` printing what
//! the `group.*` operations answer.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(args: &[&str]) -> Output {
    let out = knib(args);
    assert!(out.status.success(), "knib {args:?}: {}", stderr(&out));
    out
}

fn ok_json(args: &[&str]) -> Value {
    let out = ok(args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

/// The answer of JSON operation `op` to `req`.
fn api(op: &str, req: Value) -> Value {
    let a =
        knib_core::api::call(op, &req.to_string(), &knib_core::Control::new()).unwrap_or_else(|e| panic!("{op}: {e}"));
    serde_json::from_str(&a).expect("JSON")
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 16 MiB qcow2 image at `p` with `pattern` written at `offset`.
fn image(p: &Path, pattern: u8, offset: &str) {
    run(&["qemu-img", "create", "-q", "-f", "qcow2", s(p), "16M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", &format!("write -P {pattern} {offset} 1M"), s(p)]);
}

#[test]
fn argument_errors_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let st = d.path().join("store");
    let a = format!("web:a={}", s(&d.path().join("a.qcow2")));
    let b = format!("db:b={}", s(&d.path().join("b.qcow2")));
    let gb = ["group", "backup", "--store", s(&st)];
    let cases: [(&[&str], &str); 9] = [
        (&[], "at least two VMs"),
        (&["--plain", &a], "at least two VMs (--domain NAME, --plain VM:NAME=PATH); 1 given"),
        (&["--domain", "x"], "at least two VMs"),
        (&["--plain", "web", "--plain", &b], "\"web\" is not VM:NAME=PATH"),
        (&["--plain", "web:a", "--plain", &b], "\"a\" is not NAME=PATH"),
        (&["--plain", ":a=/x", "--plain", &b], "names no VM"),
        (&["--plain", &a, "--plain", &b, "--on-failure", "retry"], "invalid value 'retry'"),
        (&["--plain", &a, "--plain", &b, "--freeze-timeout", "0"], "--freeze-timeout"),
        (&["restore", "g1"], "--to <DIR>"),
    ];
    for (rest, text) in cases {
        let args: Vec<&str> = if rest.first() == Some(&"restore") {
            ["group", "restore", "--store", s(&st), rest[1]].to_vec()
        } else {
            gb.iter().chain(rest).copied().collect()
        };
        let args = &args[..];
        let out = knib(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
        assert!(err.contains("Usage: knib group ") || err.contains("try '--help'"), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
        assert!(!st.exists(), "{args:?} made the store");
    }
    // A refusal of knib itself (not of the command line): invalid input, 13.
    let out = knib(&["group", "backup", "--store", s(&st), "--plain", &a, "--plain", "web:b=/x.qcow2"]);
    assert_eq!(out.status.code(), Some(13), "{}", stderr(&out));
    assert!(stderr(&out).contains("knib: invalid input: VM web is named twice"), "{}", stderr(&out));
    // `--help` documents the plain-disk form.
    let help = stdout(&ok(&["group", "backup", "--help"]));
    assert!(help.contains("--plain <VM:NAME=PATH[,NAME=PATH]>"), "{help}");
    assert!(help.contains("[possible values: keep, rollback]"), "{help}");
}

#[test]
fn list_and_show_on_an_empty_store() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("knib.json"), r#"{"schema": 1}"#).unwrap();
    let st = s(d.path());
    assert_eq!(stdout(&ok(&["group", "list", "--store", st])).trim(), "no group backups");
    assert_eq!(ok_json(&["--json", "group", "list", "--store", st]), json!([]));
    assert_eq!(ok_json(&["group", "list", "--store", st, "--json"]), api("group.list", json!({"store": st})));
    let out = knib(&["group", "show", "--store", st, "group-nope"]);
    assert_eq!(out.status.code(), Some(11), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("knib: not found: group backup group-nope does not exist"), "{}", stderr(&out));
    let out = knib(&["group", "list", "--store", s(&d.path().join("missing"))]);
    assert_eq!(out.status.code(), Some(11), "{}", stderr(&out));
    // Nothing was interrupted: recover has nothing to do (and needs no libvirt).
    assert_eq!(ok_json(&["--json", "group", "recover", "--store", st]), json!([]));
}

#[test]
fn two_plain_disk_vms_backed_up_restored_and_deleted_as_a_group() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let store = dir.join("store");
    let st = s(&store);
    let (a1, a2, b1) = (dir.join("a1.qcow2"), dir.join("a2.qcow2"), dir.join("b1.qcow2"));
    image(&a1, 0x41, "0");
    image(&a2, 0x42, "4M");
    image(&b1, 0x43, "8M");
    let web = format!("web:root={},data={}", s(&a1), s(&a2));
    let db = format!("db:root={}", s(&b1));

    let full = ok_json(&["--json", "group", "backup", "--store", st, "--plain", &web, "--plain", &db]);
    assert_eq!(full["state"], "complete", "{full}");
    assert_eq!(full["on_failure"], "keep");
    assert_eq!(full["quiesce"], false);
    let members = full["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    for (m, vm) in members.iter().zip(["web", "db"]) {
        assert_eq!(m["vm"], vm);
        assert_eq!(m["domain"], false);
        assert_eq!(m["quiesced"], false);
        assert!(m["backup"].is_string(), "{m}");
        assert_eq!(m["error"], Value::Null);
    }
    let gid = full["id"].as_str().unwrap().to_string();
    // `--json` is the operation's answer: the record the store keeps.
    assert_eq!(full, api("group.show", json!({"store": st, "group": gid})));
    // Each member's backup is an ordinary backup of its VM.
    let web_backup = members[0]["backup"].as_str().unwrap();
    let shown = ok_json(&["--json", "show", "--store", st, web_backup]);
    assert_eq!(shown["vm"], "web");
    assert_eq!(shown["kind"], "full");

    // The disks change; the second group is incremental (then --full starts over).
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 2M 1M", s(&a1)]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x45 12M 1M", s(&b1)]);
    let refs = dir.join("ref");
    std::fs::create_dir(&refs).unwrap();
    for (img, name) in [(&a1, "a1"), (&a2, "a2"), (&b1, "b1")] {
        run(&["qemu-img", "convert", "-O", "raw", s(img), s(&refs.join(name))]);
    }
    let out = ok(&[
        "group",
        "backup",
        "--store",
        st,
        "--plain",
        &web,
        "--plain",
        &db,
        "--on-failure",
        "rollback",
        "--compress",
        "--chain-size",
        "4",
        "--freeze-timeout",
        "5",
    ]);
    let text = stdout(&out);
    assert!(text.contains(" complete "), "{text}");
    assert!(text.contains("on failure rollback"), "{text}");
    assert!(text.contains("  web [plain disks]: backup "), "{text}");
    assert!(text.contains("  db [plain disks]: backup "), "{text}");
    let inc_id = text.split_whitespace().next().unwrap().to_string();
    assert!(inc_id.starts_with("group-"), "{text}");
    let inc = ok_json(&["--json", "group", "show", "--store", st, &inc_id]);
    assert_eq!(inc["on_failure"], "rollback");
    for m in inc["members"].as_array().unwrap() {
        let b = ok_json(&["--json", "show", "--store", st, m["backup"].as_str().unwrap()]);
        assert_eq!(b["kind"], "incremental", "{b}");
        assert!(b["compression"].is_object(), "{b}");
    }

    // list: oldest first, as the operation answers.
    let list = ok_json(&["--json", "group", "list", "--store", st]);
    assert_eq!(list, api("group.list", json!({"store": st})));
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [gid.as_str(), inc_id.as_str()]);
    let text = stdout(&ok(&["group", "list", "--store", st]));
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("2/2 member(s): web, db"), "{text}");

    // restore: every volume, as DIR/<vm>/<volume>.<format>, equal to the disks at the backup.
    let to = dir.join("restored");
    let restored = ok_json(&["--json", "group", "restore", "--store", st, &inc_id, "--to", s(&to), "--format", "raw"]);
    let vols = restored["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3, "{restored}");
    for (vm, volume, reference) in [("web", "root", "a1"), ("web", "data", "a2"), ("db", "root", "b1")] {
        let path = to.join(vm).join(format!("{volume}.raw"));
        assert!(vols.iter().any(|v| v["vm"] == vm && v["volume"] == volume && v["path"] == s(&path)), "{restored}");
        run(&["qemu-img", "compare", "-f", "raw", "-F", "raw", s(&path), s(&refs.join(reference))]);
    }
    // The same through the operation, elsewhere: the same answer but for the paths.
    let to2 = dir.join("restored2");
    let a = api("group.restore", json!({"store": st, "group": inc_id, "to": to2, "format": "raw"}));
    assert_eq!(a.to_string(), restored.to_string().replace(s(&to), s(&to2)));
    // A second restore to the same place writes nothing over what is there.
    let out = knib(&["group", "restore", "--store", st, &inc_id, "--to", s(&to)]);
    assert!(out.status.success(), "qcow2 files do not clash with the raw ones: {}", stderr(&out));
    let out = knib(&["group", "restore", "--store", st, &inc_id, "--to", s(&to), "--format", "raw"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).starts_with("knib: "), "{}", stderr(&out));
    for (vm, volume, reference) in [("web", "root", "a1"), ("db", "root", "b1")] {
        let path = to.join(vm).join(format!("{volume}.raw"));
        run(&["qemu-img", "compare", "-f", "raw", "-F", "raw", s(&path), s(&refs.join(reference))]);
    }
    // The first group restores the disks as they were then (quick: overlays over the backups).
    let to3 = dir.join("quick");
    let text = stdout(&ok(&["group", "restore", "--store", st, &gid, "--to", s(&to3), "--quick"]));
    assert!(text.contains("as overlays over the backups"), "{text}");
    run(&["qemu-img", "compare", "-F", "raw", s(&to3.join("web/data.qcow2")), s(&refs.join("a2"))]);
    let out = Command::new("qemu-img")
        .args(["compare", "-F", "raw", s(&to3.join("web/root.qcow2")), s(&refs.join("a1"))])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the first group's root differs from the later disk");

    // delete: the first group's backups are needed by the second's: marked removed.
    let del = ok_json(&["--json", "group", "delete", "--store", st, &gid]);
    let marked: Vec<&Value> =
        del["members"].as_array().unwrap().iter().flat_map(|o| o["marked_removed"].as_array().unwrap()).collect();
    assert_eq!(marked.len(), 2, "{del}");
    let text = stdout(&ok(&["group", "delete", "--store", st, &inc_id]));
    assert!(text.starts_with(&format!("deleted group {inc_id}; expunged ")), "{text}");
    assert_eq!(ok_json(&["--json", "group", "list", "--store", st]), json!([]));
    assert_eq!(ok_json(&["--json", "list", "--store", st]), json!([]));
    let out = knib(&["group", "delete", "--store", st, &inc_id]);
    assert_eq!(out.status.code(), Some(11), "{}", stderr(&out));
}

/// A qcow2 image damaged past its header (its first L1 entry points past
/// the end of the file): its backup fails when it is copied.
fn damaged(p: &Path) {
    image(p, 0x46, "0");
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut hdr = [0u8; 48];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let l1 = u64::from_be_bytes(hdr[40..48].try_into().unwrap());
    f.write_all_at(&(0x8000_0000_0000_0000u64 | (1u64 << 40)).to_be_bytes(), l1).unwrap();
}

#[test]
fn a_partial_group_prints_its_record_and_fails_and_rollback_publishes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let store = dir.join("store");
    let st = s(&store);
    let (good, bad) = (dir.join("good.qcow2"), dir.join("bad.qcow2"));
    image(&good, 0x41, "0");
    damaged(&bad);
    let good = format!("good:root={}", s(&good));
    let bad = format!("bad:root={}", s(&bad));

    let out = knib(&["group", "backup", "--store", st, "--plain", &good, "--plain", &bad, "--on-failure", "rollback"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(16), "{err}");
    assert!(err.starts_with("knib: cancelled: group backup group-"), "{err}");
    assert!(err.contains("no member was published"), "{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(ok_json(&["--json", "group", "list", "--store", st]), json!([]));
    assert_eq!(ok_json(&["--json", "list", "--store", st]), json!([]));

    let out = knib(&["--json", "group", "backup", "--store", st, "--plain", &good, "--plain", &bad]);
    let err = stderr(&out);
    let code = out.status.code().unwrap();
    assert!(code > 10 && code != 13, "{code}: {err}");
    assert!(err.starts_with("knib: ") && err.contains(" is partial: 1 of 2 member(s) failed, first bad: "), "{err}");
    // The record is printed all the same, as the operation answers it.
    let rec: Value = serde_json::from_slice(&out.stdout).expect("the record");
    assert_eq!(rec["state"], "partial");
    assert!(rec["members"][0]["backup"].is_string() && rec["members"][1]["backup"].is_null(), "{rec}");
    assert!(rec["members"][1]["error"].is_string(), "{rec}");
    assert_eq!(rec, api("group.show", json!({"store": st, "group": rec["id"]})));
}

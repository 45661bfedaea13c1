//! Files the CloudStack agent names that are not files: a FIFO (opening
//! it waits for a writer), a character device (`/dev/zero` never ends), a
//! directory, and a link to each. `agent.take_hash`, `agent.compress`,
//! `agent.restore` (its backup and its expected hashes), `backup` (a disk),
//! `agent.take_backup` (a stopped VM's volume or its parent backup),
//! `agent.merge_snapshot`, `agent.prepare_validation` and `files.fs` must
//! refuse each at once, naming it, and write nothing. Before,
//! `agent.take_hash` on a FIFO or on `/dev/zero` and `backup` of a FIFO
//! never returned (nor stopped on SIGTERM: the process waited in `open`),
//! `agent.take_backup` of a FIFO volume waited in the test of QEMU's image
//! lock, a directory was an I/O error, and the agent called any of them a
//! file that "does not exist".

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use knib_core::api::call;
use knib_core::{Control, ErrorKind, KnibError};
use serde_json::{json, Value};

/// Run `op` in a thread; panic if it has not returned in 10 s.
fn within_10s(op: &'static str, req: Value) -> Result<String, KnibError> {
    let (tx, rx) = mpsc::channel();
    let shown = req.to_string();
    std::thread::spawn(move || tx.send(call(op, &req.to_string(), &Control::new())));
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{op} hung on {shown}"))
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A qcow2 overlay at `over` whose backing file is `special`.
fn overlay_on(special: &Path, over: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        special.to_str().unwrap(),
        over.to_str().unwrap(),
        "1M",
    ]);
}

/// The error of a chain holding `special`: never read.
fn assert_not_read(e: &KnibError, special: &Path) {
    assert_eq!(e.kind, ErrorKind::Io, "{}: {e}", special.display());
    let tail = format!("{} is neither a regular file nor a block device: it is not read", special.display());
    assert!(e.message.ends_with(&tail), "{e}");
}

/// Every file under `dir` with its length, sorted.
fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len()));
        }
    }
    out.sort();
    out
}

/// The special files: a FIFO, a directory, `/dev/zero`, and a link to each
/// (a link's own name is what the caller gave, so the error names it).
fn specials(dir: &Path) -> Vec<PathBuf> {
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sub = dir.join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    let mut all = vec![fifo, sub, PathBuf::from("/dev/zero")];
    for (i, target) in all.clone().iter().enumerate() {
        let link = dir.join(format!("link-{i}"));
        std::os::unix::fs::symlink(target, &link).unwrap();
        all.push(link);
    }
    all
}

fn assert_not_regular(e: &KnibError, what: &str, path: &Path) {
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{}: {e}", path.display());
    assert!(
        e.message.ends_with(&format!("{what}{} is not a regular file", path.display())),
        "must name {}: {e}",
        path.display()
    );
}

#[test]
fn files_that_are_not_regular_files_are_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let good = dir.join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "1M"]);
    let hash: Value =
        serde_json::from_str(&call("agent.take_hash", &json!({"files": [good]}).to_string(), &Control::new()).unwrap())
            .unwrap();
    let good_hash = hash["files"][0]["hash"].as_str().unwrap().to_string();
    let volume = dir.join("volume.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", volume.to_str().unwrap(), "1M"]);
    let specials = specials(&dir);
    let before = listing(&dir);
    for s in &specials {
        // The hash of the file alone, and of a chain it is the second of.
        for files in [json!([s]), json!([good, s])] {
            let e = within_10s("agent.take_hash", json!({"files": files})).unwrap_err();
            assert_not_regular(&e, "", s);
        }
        let e = within_10s("agent.compress", json!({"files": [s]})).unwrap_err();
        assert_not_regular(&e, "backup file ", s);
        // A restore from it, and a restore whose expected hashes name it.
        let e =
            within_10s("agent.restore", json!({"volumes": [{"backup_path": s, "volume_path": volume}]})).unwrap_err();
        assert_not_regular(&e, "backup file ", s);
        let hashes = json!([{"path": good, "hash": good_hash}, {"path": s, "hash": good_hash}]);
        let e = within_10s(
            "agent.restore",
            json!({"volumes": [{"backup_path": good, "volume_path": volume, "expected_hashes": hashes}]}),
        )
        .unwrap_err();
        // Not a file of the chain read: it is never opened.
        assert_eq!(e.kind, ErrorKind::Corrupt, "{}: {e}", s.display());
        assert!(e.message.starts_with(&format!("backup file {} is not in the chain", s.display())), "{e}");
        // A disk to back up (a block device would do) and a stopped VM's
        // volume: refused before a store or a delta is made.
        let store = dir.join("store");
        let e =
            within_10s("backup", json!({"store": store, "vm": "v", "disks": [{"name": "a", "path": s}]})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{}: {e}", s.display());
        assert!(
            e.message.ends_with(&format!("disk a: {} is neither a regular file nor a block device", s.display())),
            "{e}"
        );
        // A disk whose backing file is one: refused, never read (nor handed
        // to qemu-img, which waited on a FIFO).
        let over = dir.join("over.qcow2");
        overlay_on(s, &over);
        let e = within_10s("backup", json!({"store": store, "vm": "v", "disks": [{"name": "a", "path": over}]}))
            .unwrap_err();
        assert_not_read(&e, s);
        std::fs::remove_file(&over).unwrap();
        let volume = json!({"uuid": "u", "path": s, "delta_path_on_primary": dir.join("delta"),
            "delta_path_on_store": store.join("b1/u.qcow2")});
        let e = within_10s("agent.take_backup", json!({"running": false, "volumes": [volume]})).unwrap_err();
        assert_not_regular(&e, "volume u: ", s);
        let volume = json!({"uuid": "u", "path": good, "delta_path_on_primary": dir.join("delta"),
            "delta_path_on_store": store.join("b2/u.qcow2"), "parent_backup_path": s});
        let e = within_10s("agent.take_backup", json!({"running": false, "volumes": [volume]})).unwrap_err();
        assert_not_regular(&e, "volume u: the parent backup ", s);
        // An incremental whose base (the merge's parent, below the volume
        // file) is one: refused by knib's reader before qemu-img is asked
        // for the chain (it waited on a FIFO until the time budget ended).
        let over = dir.join("over.qcow2");
        overlay_on(s, &over);
        let volume = json!({"uuid": "u", "path": over, "delta_path_on_primary": dir.join("delta"),
            "delta_path_on_store": store.join("b3/u.qcow2"), "parent_backup_path": good,
            "merge": {"parent": s, "child": over}});
        let e = within_10s("agent.take_backup", json!({"running": false, "volumes": [volume]})).unwrap_err();
        assert_not_read(&e, s);
        std::fs::remove_file(&over).unwrap();
        // A merge of VM snapshot deltas, either file special.
        for (parent, child) in [(&good, s), (s, &good)] {
            let req = json!({"running": false, "merges": [{"parent": parent, "child": child}]});
            let e = within_10s("agent.merge_snapshot", req).unwrap_err();
            assert_not_regular(&e, "", s);
        }
        // A validation's overlay over it (the error names the file the link
        // leads to), and the filesystems of a backup named by its path.
        let req = json!({"vm_name": "v", "work_dir": dir, "volumes": [{"uuid": "u", "backup_path": s}]});
        let e = within_10s("agent.prepare_validation", req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{}: {e}", s.display());
        let target = s.canonicalize().unwrap();
        assert!(e.message.starts_with("overlay of volume u: backup file "), "{e}");
        assert!(e.message.ends_with(&format!("{} is not a regular file", target.display())), "{e}");
        let e = within_10s("files.fs", json!({"backup_path": s})).unwrap_err();
        assert_not_regular(&e, "", s);
        assert_eq!(listing(&dir), before, "{} left something behind", s.display());
    }
}

//! Quick restore straight from the vault, against a real S3 server (Ceph
//! RGW, see `knib-core/tests/common/s3.rs`) and the real libvirt: a chain
//! of backups synced to the vault, the local store deleted (so only the
//! vault can be read), `knib restore --quick` starts a stopped domain on
//! overlays backed by knib's NBD exports of the vault, the guest reads the
//! backup's data, `knib consolidate` pulls it in (a block pull while the
//! domain runs; offline, after starting again a server that was killed,
//! when it is stopped), stops the server and removes its sockets, and the
//! disk is the backup byte for byte.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;
#[path = "../../knib-core/tests/common/s3.rs"]
mod s3;

use common::disk::{assert_identical, make_disk, qemu_io, snapshot};
use common::vm::{skip_without_libvirt, TestVm, MIB, URI};

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = knib(args);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn wait_gone(pid: u64) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    !alive(pid)
}

/// The server a test started: killed if the test ends before consolidation.
struct Server(u64);

impl Drop for Server {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: kill(2) on the server this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

const SIZE: u64 = 64 * MIB;

/// A backup chain synced to a new vault prefix (the local store deleted),
/// a stopped domain quick-restored from it; the guest reads the backup.
struct Restored {
    _dir: tempfile::TempDir,
    prefix: s3::Prefix,
    /// The backup restored.
    id: String,
    reference: PathBuf,
    target: TestVm,
    serve_dir: PathBuf,
    overlay: PathBuf,
    server: Server,
}

fn quick_restored(name: &str) -> Restored {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    make_disk(&src, SIZE, &[]);
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let disk = format!("vda={}", src.display());
    qemu_io(&src, "write -P 0x71 0 4M");
    qemu_io(&src, "write -P 0x72 40M 2M");
    ok_json(&["--json", "backup", "--store", s, "--vm", "vmq", "--disk", &disk]);
    qemu_io(&src, "write -P 0x73 1M 1M");
    let b2 = ok_json(&["--json", "backup", "--store", s, "--vm", "vmq", "--disk", &disk]);
    let id = b2["id"].as_str().unwrap().to_string();
    let reference = dir.path().join("ref.qcow2");
    snapshot(&src, &reference);
    let prefix = s3::Prefix::new(name);
    let loc = prefix.location();
    ok_json(&["--json", "sync", "--store", s, "--to", &loc]);
    // Only the vault can be read from now on.
    std::fs::remove_dir_all(&store).unwrap();

    let tdir = dir.path().join("target");
    std::fs::create_dir(&tdir).unwrap();
    let target = TestVm::define_stopped("knib-vq", &[("vda", SIZE)], &tdir);
    let r =
        ok_json(&["--json", "--connect", URI, "restore", "--store", &loc, &id, "--quick", "--domain", target.name()]);
    let server = Server(r["server_pid"].as_u64().unwrap());
    assert!(alive(server.0), "{r}");
    assert!(target.vm.is_running().unwrap());
    let serve_dir = std::fs::canonicalize(&tdir).unwrap().join(format!(".knib-vault-{}", target.name()));
    let d = target.disk("vda");
    assert_eq!(d.file, Path::new(r["overlays"][0][1].as_str().unwrap()));
    assert!(std::fs::metadata(&d.file).unwrap().len() < 2 * MIB, "no data copied before the VM runs");
    assert_eq!(d.backing_chain.len(), 1, "{:?}", d.backing_chain);
    assert_eq!(d.backing_chain[0].file, serve_dir.join("vda.sock"));
    // The directory is knib's (QEMU's user passes through it to its
    // socket, and can change nothing in it); the socket is QEMU's user's.
    let m = std::fs::symlink_metadata(&serve_dir).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (rustix_euid(), 0o711), "{}", serve_dir.display());
    let sock = std::fs::symlink_metadata(serve_dir.join("vda.sock")).unwrap();
    assert_eq!((sock.uid(), sock.gid(), sock.mode() & 0o7777), {
        let (u, g) = knib_core::vault::serve::qemu_ids();
        (u, g, 0o600)
    });
    // The guest reads the backup's data through the exports.
    assert!(target.read_check("vda", 0x71, 2 * MIB, 2 * MIB));
    assert!(target.read_check("vda", 0x73, MIB, MIB));
    assert!(target.read_check("vda", 0x72, 40 * MIB, 2 * MIB));
    assert!(target.read_check("vda", 0x00, 50 * MIB, MIB));
    // The vault records what it serves, on which host, to which domain.
    let records: Vec<String> = prefix.keys().into_keys().filter(|k| k.starts_with("serving/")).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].starts_with(&format!("serving/{id}/")), "{records:?}");
    assert!(records[0].ends_with(&format!("/{}.json", target.name())), "{records:?}");
    Restored { _dir: dir, prefix, id, reference, target, serve_dir, overlay: d.file, server }
}

/// After consolidation: the server and its directory are gone, the disk
/// has no backing file and is the backup.
fn assert_consolidated(r: &Restored, c: &serde_json::Value) {
    assert_eq!(c["consolidated"], serde_json::json!(["vda"]), "{c}");
    // The server read each object about once: the data the pull needed
    // (7 MiB written, the rest zeros), not the objects many times.
    let stored: u64 = r.prefix.keys().iter().filter(|(k, _)| k.ends_with(".qcow2")).map(|(_, n)| n).sum();
    let fetched = c["vault_servers_stopped"][0]["bytes_fetched"].as_u64().expect("the server said what it fetched");
    eprintln!("the server fetched {fetched} bytes; the objects hold {stored}");
    assert!(fetched >= 6 * MIB && fetched <= stored + stored / 2, "fetched {fetched} of {stored} stored bytes: {c}");
    let pid = c["vault_servers_stopped"][0]["state"]["pid"].as_u64().unwrap();
    assert!(wait_gone(pid), "the server runs on after consolidation");
    assert!(!r.serve_dir.exists(), "its directory is left");
    let records: Vec<String> = r.prefix.keys().into_keys().filter(|k| k.starts_with("serving/")).collect();
    assert!(records.is_empty(), "the vault's record of the quick restore is left: {records:?}");
    assert_identical(&r.overlay, &r.reference);
    let info = Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&r.overlay).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
}

#[test]
fn quick_restore_from_the_vault_then_consolidate_while_it_runs() {
    if !s3::setup() || skip_without_libvirt("quick restore from the vault") {
        return;
    }
    let r = quick_restored("quick");
    // While the guest reads the backup through the exports, no delete
    // removes it (before, it did, and the guest's reads failed).
    let loc = r.prefix.location();
    let before = r.prefix.keys();
    let out = knib(&["delete", "--store", &loc, &r.id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "busy: {err}");
    assert!(err.contains("a quick restore runs on it") && err.contains(r.target.name()), "{err}");
    assert_eq!(r.prefix.keys(), before, "a refused delete changed the vault");
    let c = ok_json(&["--json", "--connect", URI, "consolidate", "--domain", r.target.name()]);
    assert!(r.target.disk("vda").backing_chain.is_empty());
    assert!(r.target.read_check("vda", 0x73, MIB, MIB));
    r.target.power_off();
    assert_consolidated(&r, &c);
    // Consolidated: the delete goes through.
    ok_json(&["--json", "delete", "--store", &loc, &r.id]);
    assert!(!r.prefix.keys().keys().any(|k| k.contains(&r.id)), "{:?}", r.prefix.keys());
}

#[test]
fn a_killed_server_is_started_again_for_an_offline_consolidation() {
    if !s3::setup() || skip_without_libvirt("quick restore from the vault, server killed") {
        return;
    }
    let r = quick_restored("quick-killed");
    r.target.power_off();
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(r.server.0 as i32, libc::SIGKILL) };
    assert!(wait_gone(r.server.0));
    let c = ok_json(&["--json", "--connect", URI, "consolidate", "--domain", r.target.name()]);
    assert_ne!(c["vault_servers_stopped"][0]["state"]["pid"].as_u64(), Some(r.server.0), "{c}");
    assert_consolidated(&r, &c);
}

fn rustix_euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() }
}

/// The state file of a quick restore steers what knib (as root) removes,
/// gives to QEMU's user and serves: one that names a file outside its
/// directory, or one in a directory somebody else owns, is refused before
/// anything is touched; once it is knib's again, consolidation goes on.
#[test]
fn a_tampered_serve_state_steers_nothing() {
    if !s3::setup() || skip_without_libvirt("quick restore from the vault, state tampered") {
        return;
    }
    let r = quick_restored("quick-tampered");
    r.target.power_off();
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(r.server.0 as i32, libc::SIGKILL) };
    assert!(wait_gone(r.server.0));
    let state_path = r.serve_dir.join("serve.json");
    let good = std::fs::read(&state_path).unwrap();
    let canary = r.serve_dir.parent().unwrap().join("canary");
    std::fs::write(&canary, b"not knib's").unwrap();
    let consolidate = || knib(&["--json", "--connect", URI, "consolidate", "--domain", r.target.name()]);
    let refused = |out: &Output, why: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "expected {why:?}: {err}");
    };
    // A socket outside the directory (restarting a dead server removes its
    // sockets, then gives the new ones to QEMU's user).
    let mut state: serde_json::Value = serde_json::from_slice(&good).unwrap();
    state["disks"][0]["socket"] = serde_json::json!(canary);
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    refused(&consolidate(), "serve.json is not what knib wrote: the socket of vda is");
    assert_eq!(std::fs::read(&canary).unwrap(), b"not knib's");
    assert_eq!(std::fs::metadata(&canary).unwrap().uid(), 0);
    // Another domain's state.
    let mut state: serde_json::Value = serde_json::from_slice(&good).unwrap();
    state["domain"] = serde_json::json!("other-vm");
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    refused(&consolidate(), "it names domain \"other-vm\"");
    // The right state, in a directory QEMU's user could write (as quick
    // restores made before the check left it).
    std::fs::write(&state_path, &good).unwrap();
    std::os::unix::fs::chown(&r.serve_dir, Some(65534), None).unwrap();
    refused(&consolidate(), "is not a directory knib made");
    std::os::unix::fs::chown(&r.serve_dir, Some(0), None).unwrap();
    std::fs::set_permissions(&r.serve_dir, std::os::unix::fs::PermissionsExt::from_mode(0o733)).unwrap();
    refused(&consolidate(), "is not a directory knib made");
    std::fs::set_permissions(&r.serve_dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    // Nothing was touched: the disk is still on its overlay, and with the
    // directory knib's again, the consolidation goes on.
    let info = Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&r.overlay).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["backing-filename"].as_str().is_some_and(|b| b.contains("vda.sock")), "{info}");
    let c = ok_json(&["--json", "--connect", URI, "consolidate", "--domain", r.target.name()]);
    assert_consolidated(&r, &c);
    assert_eq!(std::fs::read(&canary).unwrap(), b"not knib's");
}

/// The same through the JSON API (as C and Java call it): `quick_restore`
/// with the vault as its store and the knib program to run as the server,
/// then `agent.consolidate`, which stops the server.
#[test]
fn quick_restore_from_the_vault_through_the_json_api() {
    if !s3::setup() || skip_without_libvirt("quick restore from the vault (JSON)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    make_disk(&src, SIZE, &[]);
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let disk = format!("vda={}", src.display());
    qemu_io(&src, "write -P 0x61 0 3M");
    let b = ok_json(&["--json", "backup", "--store", s, "--vm", "vmj", "--disk", &disk]);
    let id = b["id"].as_str().unwrap().to_string();
    let reference = dir.path().join("ref.qcow2");
    snapshot(&src, &reference);
    let prefix = s3::Prefix::new("quick-json");
    let loc = prefix.location();
    ok_json(&["--json", "sync", "--store", s, "--to", &loc]);
    std::fs::remove_dir_all(&store).unwrap();
    let tdir = dir.path().join("target");
    std::fs::create_dir(&tdir).unwrap();
    let target = TestVm::define_stopped("knib-vqj", &[("vda", SIZE)], &tdir);
    let call = |op: &str, req: serde_json::Value| {
        knib_core::api::call(op, &req.to_string(), &knib_core::Control::new())
            .map(|a| serde_json::from_str::<serde_json::Value>(&a).unwrap())
    };
    // A program that is not there is named in the error; nothing is changed.
    let e = call(
        "quick_restore",
        serde_json::json!({"store": loc, "backup": id, "domain": target.name(), "connect": URI,
            "server_program": dir.path().join("no-knib")}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no-knib"), "{e}");
    assert!(!target.vm.is_running().unwrap());
    // A server that ends at its start: nothing is left, in the vault either.
    let serving = || prefix.keys().into_keys().filter(|k| k.starts_with("serving/")).collect::<Vec<_>>();
    call(
        "quick_restore",
        serde_json::json!({"store": loc, "backup": id, "domain": target.name(), "connect": URI,
            "server_program": "/bin/false"}),
    )
    .unwrap_err();
    assert!(!target.vm.is_running().unwrap());
    assert!(serving().is_empty(), "{:?}", serving());
    let a = call(
        "quick_restore",
        serde_json::json!({"store": loc, "backup": id, "domain": target.name(), "connect": URI,
            "server_program": env!("CARGO_BIN_EXE_knib")}),
    )
    .unwrap_or_else(|e| panic!("quick_restore: {e}"));
    let overlay = PathBuf::from(a["overlays"][0][1].as_str().unwrap());
    let serve_dir = std::fs::canonicalize(&tdir).unwrap().join(format!(".knib-vault-{}", target.name()));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(serve_dir.join("serve.json")).unwrap()).unwrap();
    let server = Server(state["pid"].as_u64().unwrap());
    assert!(target.vm.is_running().unwrap());
    assert!(target.read_check("vda", 0x61, MIB, 2 * MIB));
    let c = call("agent.consolidate", serde_json::json!({"domain": target.name(), "connect": URI}))
        .unwrap_or_else(|e| panic!("agent.consolidate: {e}"));
    assert_eq!(c["consolidated"][0]["pulled"], true, "{c}");
    assert!(wait_gone(server.0), "the server runs on after agent.consolidate");
    assert!(!serve_dir.exists());
    target.power_off();
    assert_identical(&overlay, &reference);
    assert!(serving().is_empty(), "the record is left after agent.consolidate: {:?}", serving());
    drop(prefix);
}

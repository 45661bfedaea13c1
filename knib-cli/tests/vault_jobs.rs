//! Sync jobs against a real S3 server (Ceph RGW, see
//! `knib-core/tests/common/s3.rs`), through the CLI: `knib sync --queue`
//! and `sync.auto` queue a job per VM, `knib jobs run` sends what the vault
//! lacks (parents first), a missing bucket is retried then fails with a
//! clear `last_error`, and refused credentials fail at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;
#[path = "../../knib-core/tests/common/s3.rs"]
mod s3;

use common::disk::{assert_identical, make_disk, qemu_io, snapshot};
use serde_json::Value;

fn knib(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args).env_remove("KNIB_TEST_CRASH_AT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("knib runs")
}

fn ok_json(args: &[&str]) -> Value {
    let out = knib(args, &[]);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

/// A store whose `knib.json` holds `settings` (flat keys), and a disk.
fn setup(dir: &Path, settings: &str) -> (String, PathBuf) {
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("knib.json"), format!("{{\"schema\": 1, {settings}}}")).unwrap();
    let disk = dir.join("root.qcow2");
    make_disk(&disk, 24 << 20, &[]);
    (store.to_str().unwrap().to_string(), disk)
}

/// Back up `disk` as VM `vm` (plain output: it says when a sync job is queued).
fn backup(store: &str, vm: &str, disk: &Path) -> String {
    let d = format!("root={}", disk.display());
    let out = knib(&["backup", "--store", store, "--vm", vm, "--disk", &d], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn jobs(store: &str) -> Vec<Value> {
    ok_json(&["--json", "jobs", "list", "--store", store]).as_array().unwrap().clone()
}

#[test]
fn queued_and_automatic_sync_jobs_send_what_the_vault_lacks_parents_first() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("jobs");
    let loc = p.location();
    let work = tempfile::tempdir().unwrap();
    let (store, disk) = setup(work.path(), &format!("\"sync.vault\": \"{loc}\", \"sync.part_size_mib\": 5"));

    // Two backups, then one job per VM: queueing again reuses the queued job.
    qemu_io(&disk, "write -P 0x41 0 12M");
    let out = backup(&store, "vm1", &disk);
    assert!(!out.contains("sync"), "sync.auto is off: {out}");
    qemu_io(&disk, "write -P 0x42 4M 2M");
    backup(&store, "vm1", &disk);
    let reference = work.path().join("ref.qcow2");
    snapshot(&disk, &reference);
    let q = ok_json(&["--json", "sync", "--store", &store, "--queue"]);
    let again = ok_json(&["--json", "sync", "--store", &store, "--queue", "--vm", "vm1"]);
    assert_eq!(q[0]["id"], again[0]["id"], "{q} {again}");
    assert_eq!((q[0]["kind"].as_str(), q[0]["vm"].as_str()), (Some("sync"), Some("vm1")));
    assert_eq!(jobs(&store).len(), 1);

    let s = ok_json(&["--json", "jobs", "run", "--store", &store]);
    assert_eq!(s["done"].as_array().unwrap().len(), 1, "{s}");
    let local = ok_json(&["--json", "list", "--store", &store]);
    let ids: Vec<&str> = local.as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    let j = &jobs(&store)[0];
    assert_eq!(j["state"], "done", "{j}");
    let sent: Vec<&str> = j["result"]["sent"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(sent, ids, "parents first: {j}");
    let listed = ok_json(&["--json", "list", "--store", &loc]);
    let vault_ids: Vec<&str> = listed.as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(vault_ids, ids);
    assert!(p.keys().keys().all(|k| k.starts_with("vms/vm1/")), "{:?}", p.keys());
    let to = work.path().join("restored.qcow2");
    ok_json(&["--json", "restore", "--store", &loc, ids[1], "--volume", "root", "--to", to.to_str().unwrap()]);
    assert_identical(&to, &reference);

    // sync.auto: each backup queues the VM's job; only the new one is sent.
    let text = std::fs::read_to_string(Path::new(&store).join("knib.json")).unwrap();
    std::fs::write(
        Path::new(&store).join("knib.json"),
        text.replace("\"schema\": 1,", "\"schema\": 1, \"sync.auto\": true,"),
    )
    .unwrap();
    qemu_io(&disk, "write -P 0x43 20M 1M");
    let out = backup(&store, "vm1", &disk);
    assert!(out.contains("queued job sync-"), "{out}");
    let s = ok_json(&["--json", "jobs", "run", "--store", &store]);
    let done = s["done"].as_array().unwrap();
    assert_eq!(done.len(), 1, "{s}");
    let j = jobs(&store).into_iter().find(|j| j["id"] == done[0]).unwrap();
    let third = ok_json(&["--json", "list", "--store", &store])[2]["id"].clone();
    assert_eq!(j["result"]["sent"], serde_json::json!([third]), "{j}");
    assert_eq!(j["result"]["present"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(ok_json(&["--json", "list", "--store", &loc]).as_array().unwrap().len(), 3);
}

#[test]
fn a_missing_bucket_is_retried_then_fails_and_refused_credentials_fail_at_once() {
    if !s3::setup() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (store, disk) = setup(
        work.path(),
        "\"sync.vault\": \"s3://knib-no-such-bucket-4712/p\", \"sync.max_retries\": 1, \"sync.retry_interval_secs\": 1",
    );
    qemu_io(&disk, "write -P 0x51 0 1M");
    backup(&store, "vm1", &disk);
    ok_json(&["--json", "sync", "--store", &store, "--queue"]);
    let out = knib(&["--json", "jobs", "run", "--store", &store], &[]);
    assert!(!out.status.success());
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((s["retried"].as_array().unwrap().len(), s["failed"].as_array().unwrap().len()), (1, 1), "{s}");
    let j = &jobs(&store)[0];
    assert_eq!((j["state"].as_str(), j["attempts"].as_u64()), (Some("failed"), Some(2)), "{j}");
    let e = j["last_error"].as_str().unwrap();
    assert!(e.contains("s3://knib-no-such-bucket-4712/p") && e.contains("the bucket does not exist"), "{e}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not found"), "the exit says the kind: {stderr}");

    // Refused credentials: failed at the first attempt, whatever the retries.
    let p = s3::Prefix::new("jobs-auth");
    let settings = format!("{{\"schema\": 1, \"sync.vault\": \"{}\", \"sync.max_retries\": 5}}", p.location());
    std::fs::write(Path::new(&store).join("knib.json"), settings).unwrap();
    ok_json(&["--json", "sync", "--store", &store, "--queue"]);
    let wrong = format!("{}-wrong", s3::secret());
    let out = knib(&["--json", "jobs", "run", "--store", &store], &[("AWS_SECRET_ACCESS_KEY", &wrong)]);
    assert!(!out.status.success());
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["retried"].as_array().unwrap().is_empty(), "{s}");
    let j = jobs(&store).into_iter().find(|j| j["state"] == "failed" && j["id"] == s["failed"][0]).unwrap();
    assert_eq!(j["attempts"], 1, "{j}");
    assert!(j["last_error"].as_str().unwrap().contains("refused the credentials"), "{j}");
    let files: String = std::fs::read_dir(Path::new(&store).join("jobs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(!files.contains(&s3::secret()) && !files.contains(&wrong), "a job file shows the secret");
    assert!(p.keys().is_empty(), "{:?}", p.keys());
}

//! A vault's credentials against a real S3 server (Ceph RGW, see
//! `common/s3.rs`): wrong credentials and a missing bucket are clear
//! errors, and the credentials appear in no log record, error, manifest or
//! JSON answer. One test: it changes the process's environment.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::sync::Mutex;

use common::disk::*;
use knib_core::catalog::{BackupOptions, Store};
use knib_core::vault::{SyncOptions, Vault};
use knib_core::{Control, ErrorKind};
use serde_json::json;

/// Every log record, at every level.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0.lock().unwrap().push(format!("{} {}: {}", r.level(), r.target(), r.args()));
    }
    fn flush(&self) {}
}

static LOG: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn wrong_credentials_and_a_missing_bucket_are_clear_and_no_credential_is_ever_shown() {
    if !s3::setup() {
        return;
    }
    log::set_logger(&LOG).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let (secret, key) = (s3::secret(), s3::access_key());
    assert!(secret.len() >= 8 && key.len() >= 8);
    let p = s3::Prefix::new("auth");
    let ctl = Control::new();
    let mut shown: Vec<String> = Vec::new();

    // A missing bucket.
    let e = Vault::open("s3://knib-no-such-bucket-4711/x").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(
        e.message.contains("s3://knib-no-such-bucket-4711/x") && e.message.contains("bucket does not exist"),
        "{e}"
    );
    shown.push(e.to_string());

    // A sync, a restore, a verify and a delete that work, their answers kept.
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x51 0 10M");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    shown.push(format!("{vault:?}"));
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl).unwrap();
    shown.push(serde_json::to_string(&r).unwrap());
    for rel in p.keys().keys() {
        shown.push(String::from_utf8_lossy(&p.get(rel)).into_owned());
    }
    let list = knib_core::api::call("list", &json!({"store": p.location()}).to_string(), &ctl).unwrap();
    shown.push(list);
    let v = knib_core::api::call("verify", &json!({"store": p.location()}).to_string(), &ctl).unwrap();
    shown.push(v);

    // Wrong credentials: a wrong secret, then an unknown key.
    std::env::set_var("AWS_SECRET_ACCESS_KEY", format!("{secret}-wrong"));
    let e = Vault::open(&p.location()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert!(e.message.contains("refused the credentials"), "{e}");
    assert!(!e.message.contains(&format!("{secret}-wrong")), "{e}");
    shown.push(e.to_string());
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &secret);
    std::env::set_var("AWS_ACCESS_KEY_ID", "KNIBNOSUCHKEY0000001");
    let e = Vault::open(&p.location()).unwrap_err();
    assert!(e.message.contains("refused the credentials"), "{e}");
    shown.push(e.to_string());
    std::env::set_var("AWS_ACCESS_KEY_ID", &key);

    // A request that fails after the vault is open: its error too.
    let e = vault.restore("20990101-000000000-0000", "root", &sdir.path().join("x"), Default::default(), true, &ctl);
    shown.push(e.unwrap_err().to_string());
    vault.delete(&m.id).unwrap();

    let logs = LOG.0.lock().unwrap().clone();
    assert!(!logs.is_empty());
    for text in shown.iter().chain(&logs) {
        assert!(!text.contains(&secret), "the secret key is shown: {text}");
        assert!(!text.contains(&key), "the access key is shown: {text}");
    }
}

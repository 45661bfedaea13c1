//! A vault that stops answering in the middle of an operation, against a
//! real S3 server (Ceph RGW, `scripts/ceph.sh`; see `common/s3.rs`) reached
//! through a TCP relay of this test that can be cut: what the vault holds
//! is not judged by a network that failed.
//!
//! The relay is this binary's only endpoint (`AWS_ENDPOINT_URL` is the
//! process's environment), so it has a test binary of its own.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::disk::*;
use knib_core::catalog::{BackupOptions, Store};
use knib_core::vault::{SyncOptions, Vault};
use knib_core::{Control, ErrorKind};

/// Held by each test: the relay is the process's endpoint
/// (`AWS_ENDPOINT_URL`), so the tests take turns.
static ENDPOINT: Mutex<()> = Mutex::new(());

/// This test's turn at the endpoint, set to the S3 server itself (not a
/// relay another test left), and the server's address for a relay.
fn turn() -> (MutexGuard<'static, ()>, String) {
    let turn = ENDPOINT.lock().unwrap_or_else(|e| e.into_inner());
    let endpoint = s3::settings().unwrap()["AWS_ENDPOINT_URL"].clone();
    std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
    (turn, endpoint.trim_start_matches("http://").trim_end_matches('/').to_string())
}

/// A TCP relay from a local port to the S3 server, byte for byte, until
/// [`Relay::cut`]: then every connection through it is shut and new ones
/// are refused.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn new(to: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let to = to.to_string();
        let (c, o) = (Arc::clone(&cut), Arc::clone(&open));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    // Refused: closed before a byte is read.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&to) else { continue };
                let mut kept = o.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(server.try_clone().unwrap());
                for (mut from, mut into) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Relay { port, cut, open }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A verify whose vault stops answering while it reads a backup fails
/// with the I/O error: it does not report the backup as damaged (an
/// operator would delete or send again a backup that is whole).
#[test]
fn a_verify_cut_off_from_the_vault_fails_and_reports_no_damage() {
    if !s3::setup() {
        return;
    }
    let (_turn, server) = turn();
    let p = s3::Prefix::new("cut");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x52 0 8M");
    let m1 = store.backup("vm1", &vm.disks, &BackupOptions::default(), &Control::new()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x53 4M 4M");
    let m2 = store.backup("vm1", &vm.disks, &BackupOptions::default(), &Control::new()).unwrap();
    Vault::open(&p.location()).unwrap().sync_from(&store, &SyncOptions::default(), &Control::new()).unwrap();

    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    // Through the relay, both backups are whole.
    let v = Vault::open(&p.location()).unwrap().verify(None, &Control::new()).unwrap();
    assert!(v.reports.len() == 2 && v.reports.iter().all(|r| r.ok), "{v:?}");

    // Cut while one backup is verified (its chain, both backups), then
    // while the whole vault is (the first backup's turn).
    for (which, at) in [(Some(m2.id.clone()), &m2.id), (None, &m1.id)] {
        let at = format!("verify of {at} in the vault");
        let relay = Relay::new(&server);
        std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
        let vault = Vault::open(&p.location()).unwrap();
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
        let verify = std::thread::spawn(move || vault.verify(which.as_deref(), &Control::new()));
        assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "the verify never began");
        relay.cut();
        let e = match verify.join().unwrap() {
            Ok(v) => panic!("a verify cut off from its vault answered {v:?}"),
            Err(e) => e,
        };
        assert_eq!(e.kind, ErrorKind::Io, "{e}");
        assert!(e.message.contains("cannot read"), "{e}");
    }
}

/// A sync of a whole store whose vault stops answering while it sends the
/// first VM ends there with the vault's error (origin
/// [`knib_core::Origin::Vault`]): it does not take the failure for that
/// VM's own and go on to the next one (each would fail alike, and the
/// error would blame the VMs).
#[test]
fn a_store_sync_cut_off_from_the_vault_ends_at_the_first_vm() {
    if !s3::setup() {
        return;
    }
    let (_turn, server) = turn();
    let p = s3::Prefix::new("netsync");
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let (a, b) = (TestDisks::two(), TestDisks::two());
    qemu_io(a.path("root"), "write -P 0x61 0 4M");
    qemu_io(b.path("root"), "write -P 0x62 0 4M");
    let ma = store.backup("vm-a", &a.disks, &BackupOptions::default(), &Control::new()).unwrap();
    let mb = store.backup("vm-b", &b.disks, &BackupOptions::default(), &Control::new()).unwrap();

    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let vault = Vault::open(&p.location()).unwrap();
    let at = format!("opening {} to send it", store.volume_file(&ma, "root").unwrap().display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
    let e = std::thread::scope(|s| {
        let sync = s.spawn(|| vault.sync_from(&store, &SyncOptions::default(), &Control::new()));
        assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "the sync never began");
        relay.cut();
        match sync.join().unwrap() {
            Ok(r) => panic!("a sync cut off from its vault answered {r:?}"),
            Err(e) => e,
        }
    });
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert_eq!(e.origin, knib_core::Origin::Vault, "{e}");
    assert!(e.message.starts_with(&format!("vault {}: ", p.location())), "{e}");
    assert!(!e.message.contains("VMs unsent") && !e.message.contains("vm-b"), "{e}");

    // Through a relay that answers, the next sync sends both.
    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let r = Vault::open(&p.location()).unwrap().sync_from(&store, &SyncOptions::default(), &Control::new()).unwrap();
    let mut sent = r.sent.clone();
    sent.sort();
    let mut want = vec![ma.id.clone(), mb.id.clone()];
    want.sort();
    assert_eq!(sent, want, "{r:?}");
}

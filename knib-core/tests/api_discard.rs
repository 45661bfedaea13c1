//! `recover` with `discard` through the one API (as C and Java call it): an
//! interrupted backup's journal that recover cannot act on is set aside in
//! the store, without libvirt and without the domain; `discard` with
//! `vault` is refused before anything is done.

mod common;

use common::disk::*;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::{Control, ErrorKind};
use serde_json::json;

fn call(op: &str, req: serde_json::Value) -> knib_core::Result<serde_json::Value> {
    knib_core::api::call(op, &req.to_string(), &Control::new()).map(|t| serde_json::from_str(&t).unwrap())
}

#[test]
fn recover_with_discard_sets_a_damaged_journal_aside_without_the_domain() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("d.qcow2");
    make_disk(&disk, 4 << 20, &[]);
    qemu_io(&disk, "write -P 0x31 0 1M");
    let store_dir = d.path().join("st");
    let store = Store::create(&store_dir).unwrap();
    store
        .backup(
            "gone",
            &[DiskSpec { name: "d".into(), path: disk.clone() }],
            &BackupOptions::default(),
            &Control::new(),
        )
        .unwrap();
    let journal = store_dir.join("vms/gone/journal.json");
    // Half of a journal: a write cut short by a full disk.
    std::fs::write(&journal, b"{\"schema\": 1, \"step\": \"cop").unwrap();
    let disk_before = std::fs::read(&disk).unwrap();

    let e = call("recover", json!({"store": store_dir, "domain": "gone", "discard": true, "vault": "s3://b/p"}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("`discard` and `vault`"), "{e}");
    assert!(journal.exists());

    let a = call("recover", json!({"store": store_dir, "domain": "gone", "discard": true})).unwrap();
    let j = &a["discarded"][0];
    assert_eq!(a["discarded"].as_array().unwrap().len(), 1, "{a}");
    assert_eq!(j["method"], "snapshot", "{a}");
    assert!(j["backup_id"].is_null() && j["unreadable"].as_str().unwrap().contains("is corrupted"), "{a}");
    let kept = std::path::PathBuf::from(j["kept_as"].as_str().unwrap());
    assert_eq!(std::fs::read(&kept).unwrap(), b"{\"schema\": 1, \"step\": \"cop");
    assert!(!journal.exists());
    assert_eq!(a["backup_id"], serde_json::Value::Null, "{a}");
    assert_eq!(std::fs::read(&disk).unwrap(), disk_before);
    assert_eq!(store.list(None).unwrap().len(), 1);

    let a = call("recover", json!({"store": store_dir, "domain": "gone", "discard": true})).unwrap();
    assert_eq!(a["discarded"], json!([]), "{a}");
    let e = call("recover", json!({"store": store_dir, "domain": "never", "discard": true})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(!store_dir.join("vms/never").exists());
}

/// A compression of a published backup that ended while it replaced the
/// backup's files (before the rename of file `replaced`: a panic at that
/// step, which leaves the store as a crash would), and whose next manifest
/// was then damaged (or the `.comp` file it still needs swapped for a
/// hard link to a file outside), stops every operation on the VM:
/// corrupt, naming the file and the way out. Before, `recover` with
/// `discard` was stopped too. It sets the compression aside: the next
/// manifest kept as it was, the `.comp` entries removed (a link never
/// followed). With no file replaced yet, the backup is as its manifest
/// says (it verifies, and restores the disks' bytes). With one replaced,
/// the answer names it. Under knib's next manifest the backup's manifest
/// then records the replaced file's hash, and the backup verifies and
/// restores; under a damaged one, knib cannot tell that hash: `verify`
/// reports the file, and it still restores with `no_verify`. A `.comp`
/// file removed by something else before its rename (case "gone") leaves
/// a file that is not the compressed copy the next manifest describes:
/// before, finishing took the file for replaced, recorded the copy's hash
/// for it and the intact backup failed to verify and to restore; now it
/// is corrupt too, and the discard keeps the file's hash. The backup can
/// be deleted either way. The backup's own manifest damaged (case
/// "manifest") stops the VM too, and the discard sets the compression
/// aside all the same. A `.comp` file cut short (case "short") is refused
/// before it is renamed over its file (before, it replaced the backup's
/// file under the hash of the whole copy).
#[test]
fn recover_with_discard_sets_aside_a_compression_that_cannot_be_finished() {
    use knib_core::engine::CompressOptions;
    use knib_core::qemu_img::ImageFormat;
    for (replaced, damage) in [
        (0usize, "next"),
        (1, "next"),
        (1, "comp"),
        (0, "gone"),
        (1, "manifest"),
        (0, "short"),
        (1, "missing"),
        (1, "newer"),
        (1, "newer-manifest"),
        (1, "flipped"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let disks: Vec<DiskSpec> = ["root", "data"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let path = d.path().join(format!("{n}.qcow2"));
                make_disk(&path, 8 << 20, &[]);
                qemu_io(&path, &format!("write -P 0x{:x} 0 2M", 0x41 + i));
                DiskSpec { name: n.to_string(), path }
            })
            .collect();
        let store_dir = d.path().join("st");
        let store = Store::create(&store_dir).unwrap();
        let m = store.backup("vm1", &disks, &BackupOptions::default(), &Control::new()).unwrap();
        let dir = store_dir.join("vms/vm1").join(&m.id);
        let file = |i: usize| dir.join(&m.volumes[i].file);
        let comp = |i: usize| dir.join(format!("{}.comp", m.volumes[i].file));
        let at = format!("rename {}", comp(replaced).display());
        knib_core::crashpoint::panic_before(&at);
        let (sd, id) = (store_dir.clone(), m.id.clone());
        let ended = std::thread::spawn(move || {
            Store::open(&sd).unwrap().compress(&id, &CompressOptions::default(), &Control::new())
        })
        .join();
        assert!(ended.is_err(), "replaced {replaced}: the compression did not end at {at}");
        assert_eq!((0..2).map(|i| comp(i).exists()).collect::<Vec<_>>(), [replaced < 1, true], "replaced {replaced}");
        let next = dir.join("manifest.next.json");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"not knib's").unwrap();
        let damaged = if damage == "next" {
            let damaged = b"{\"schema\": 1, \"id\": \"".to_vec();
            std::fs::write(&next, &damaged).unwrap();
            damaged
        } else if damage == "manifest" {
            std::fs::write(dir.join("manifest.json"), b"{\"schema\": 1, \"id\": 7").unwrap();
            std::fs::read(&next).unwrap()
        } else if damage == "missing" {
            std::fs::remove_file(dir.join("manifest.json")).unwrap();
            std::fs::read(&next).unwrap()
        } else if damage.starts_with("newer") {
            let at = if damage == "newer" { next.clone() } else { dir.join("manifest.json") };
            let text = String::from_utf8(std::fs::read(&at).unwrap()).unwrap();
            assert!(text.contains("\"schema\": 1"), "{text}");
            std::fs::write(&at, text.replacen("\"schema\": 1", "\"schema\": 2", 1)).unwrap();
            std::fs::read(&next).unwrap()
        } else if damage == "short" {
            std::fs::OpenOptions::new().write(true).open(comp(0)).unwrap().set_len(1000).unwrap();
            std::fs::read(&next).unwrap()
        } else if damage == "gone" {
            std::fs::remove_file(comp(0)).unwrap();
            std::fs::read(&next).unwrap()
        } else if damage == "flipped" {
            // One byte of a `.comp` file changed, its size kept.
            let mut bytes = std::fs::read(comp(1)).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x5a;
            std::fs::write(comp(1), &bytes).unwrap();
            std::fs::read(&next).unwrap()
        } else {
            replace_with_link(&comp(1), &victim, true);
            std::fs::read(&next).unwrap()
        };
        let replaced = format!("{replaced}, damaged {damage}");
        let damage_at = match damage {
            "next" => next.clone(),
            "gone" => file(0),
            "manifest" | "missing" => dir.join("manifest.json"),
            "newer" => next.clone(),
            "newer-manifest" => dir.join("manifest.json"),
            "short" => comp(0),
            _ => comp(1),
        };
        if damage == "manifest" || damage == "missing" {
            // The backup's own manifest unreadable, or gone: every
            // operation on the VM is refused (before, with no way out but
            // by hand), and the discard sets the next manifest aside; the
            // backup's files, its `.comp` file and its manifest are left
            // as they are.
            let bytes = |p: &std::path::Path| std::fs::read(p).ok();
            let kept: Vec<_> = [file(0), file(1), comp(1), damage_at.clone()].iter().map(|p| bytes(p)).collect();
            let e = store.lock_vm("vm1", "a later operation").map(drop).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
            assert!(e.message.contains(&damage_at.display().to_string()), "{e}");
            assert!(e.message.contains("`knib recover --discard`"), "{e}");
            let a = call("recover", json!({"store": store_dir, "domain": "vm1", "discard": true})).unwrap();
            let j = &a["discarded"][0];
            assert_eq!(
                (j["method"].as_str(), a["discarded"].as_array().unwrap().len()),
                (Some("compression"), 1),
                "{a}"
            );
            assert!(j["unreadable"].as_str().unwrap().contains(&damage_at.display().to_string()), "{a}");
            assert_eq!(std::fs::read(j["kept_as"].as_str().unwrap()).unwrap(), damaged);
            assert_eq!(j["left"].as_array().unwrap().len(), 1, "{a}");
            let said = j["left"][0].as_str().unwrap();
            assert!(said.starts_with(&format!("{} cannot be read", damage_at.display())), "{a}");
            assert!(!next.exists(), "{a}");
            let now: Vec<_> = [file(0), file(1), comp(1), damage_at.clone()].iter().map(|p| bytes(p)).collect();
            assert!(now == kept, "{damage}: the backup's files changed");
            // Reported by a verify of every backup (a directory of files
            // without its manifest too: before, skipped as no backup).
            let reports = store.verify(None, &Control::new()).unwrap();
            assert!(reports.iter().any(|r| r.id == m.id && !r.ok), "{damage}: {reports:?}");
            drop(store.lock_vm("vm1", "a later operation").unwrap());
            continue;
        }
        if damage.starts_with("newer") {
            // A newer knib's compression (its next manifest, or the
            // backup's manifest, of a newer schema): neither finished nor
            // set aside (before, the discard set it aside, as damaged);
            // once this knib reads it (here: the schema put back), it is
            // finished.
            let newer = format!("{} has schema 2, newer than this knib's", damage_at.display());
            let e = store.lock_vm("vm1", "a later operation").map(drop).unwrap_err();
            assert!(e.message.contains(&newer) && !e.message.contains("recover --discard"), "{e}");
            // The way out by hand, should no newer knib have written it.
            let by_hand = format!(
                "move {} into {} under a name that starts with `.discarded-`",
                next.display(),
                dir.parent().unwrap().display()
            );
            let after = if damage == "newer" {
                "the compression is then given up"
            } else {
                "this backup stays unreadable to this knib"
            };
            assert!(e.message.contains(&by_hand) && e.message.contains(after), "{e}");
            if damage == "newer" {
                let e = store.show(&m.id).unwrap_err();
                assert!(e.message.contains(&newer) && !e.message.contains("recover --discard"), "{e}");
            }
            let e = call("recover", json!({"store": store_dir, "domain": "vm1", "discard": true})).unwrap_err();
            assert!(e.message.contains(&newer), "{e}");
            assert!(next.exists() && comp(1).exists(), "{e}");
            let text = String::from_utf8(std::fs::read(&damage_at).unwrap()).unwrap();
            std::fs::write(&damage_at, text.replacen("\"schema\": 2", "\"schema\": 1", 1)).unwrap();
            drop(store.lock_vm("vm1", "a later operation").unwrap());
            assert!(!next.exists() && !comp(1).exists());
            assert!(store.show(&m.id).unwrap().compression.is_some());
            assert!(store.verify(Some(&m.id), &Control::new()).unwrap().remove(0).ok);
            continue;
        }

        let e = store.delete(&m.id).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "replaced {replaced}: {e}");
        assert!(e.message.contains(&damage_at.display().to_string()), "replaced {replaced}: {e}");
        assert!(e.message.contains("`knib recover --discard`"), "replaced {replaced}: {e}");
        if damage == "flipped" {
            // Read before it is renamed over its file (before, a `.comp`
            // damaged after the crash replaced the backup's intact file).
            let not = format!("{} is not the compressed copy knib wrote: its bytes hash to ", comp(1).display());
            assert!(e.message.contains(&not), "{e}");
            assert!(comp(1).exists() && next.exists(), "{e}");
        }

        if damage == "comp" {
            // Discards that ended before the backup's manifest was saved,
            // then after it: the next finds the same next manifest.
            let manifest = dir.join("manifest.json");
            let hash_in = |p: &std::path::Path| {
                let j: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                j["volumes"][0]["hash"].as_str().map(String::from)
            };
            let (before, copy) = (hash_in(&manifest), hash_in(&next));
            assert_ne!(before, copy);
            let saved = format!("write {}", manifest.display());
            for (at, hash) in [(saved, &before), (format!("rename {}", next.display()), &copy)] {
                knib_core::crashpoint::panic_before(&at);
                let sd = store_dir.clone();
                let r =
                    std::thread::spawn(move || call("recover", json!({"store": sd, "domain": "vm1", "discard": true})))
                        .join();
                // (A panic, or the error the API made of it.)
                assert!(!matches!(r, Ok(Ok(_))), "the discard did not end at {at}");
                assert!(next.exists() && comp(1).exists(), "{at}");
                // The backup's manifest on disk: saved by the second only.
                assert_eq!(hash_in(&manifest), *hash, "{at}");
            }
        }
        let a = call("recover", json!({"store": store_dir, "domain": "vm1", "discard": true})).unwrap();
        assert_eq!(a["discarded"].as_array().unwrap().len(), 1, "replaced {replaced}: {a}");
        let j = &a["discarded"][0];
        assert_eq!(j["method"], "compression", "{a}");
        assert_eq!(j["backup_id"], m.id.as_str(), "{a}");
        assert_eq!(j["published"], true, "{a}");
        assert!(j["unreadable"].as_str().unwrap().contains(&damage_at.display().to_string()), "{a}");
        let kept = std::path::PathBuf::from(j["kept_as"].as_str().unwrap());
        assert_eq!(kept.parent().unwrap(), store_dir.join("vms/vm1"), "{a}");
        assert_eq!(std::fs::read(&kept).unwrap(), damaged, "replaced {replaced}");
        assert!(!next.exists(), "replaced {replaced}");
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".comp") || n.contains("next"))
            .collect();
        assert!(left.is_empty(), "replaced {replaced}: left {left:?}");
        let said: Vec<&str> = j["left"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        let report = store.verify(Some(&m.id), &Control::new()).unwrap().remove(0);
        let none_replaced = replaced.starts_with('0');
        if damage == "gone" {
            // Its `.comp` gone, yet the file is the one the backup wrote:
            // not taken for replaced, its hash kept.
            assert_eq!(said.len(), 1, "{a}");
            let not =
                format!("{} has no compressed copy beside it, yet it is not that copy: it has ", file(0).display());
            assert!(said[0].starts_with(&not), "{a}");
            assert!(report.ok, "{report:?}");
        } else if none_replaced {
            assert!(said.is_empty(), "{a}");
            assert!(report.ok, "{report:?}");
        } else {
            // Named as replaced only when the next manifest was knib's.
            let how = if damage == "next" { "has no compressed copy beside it" } else { "was already replaced" };
            assert!(said[0].starts_with(&format!("{} {how}", file(0).display())), "{a}");
            if damage == "comp" || damage == "flipped" {
                // knib's next manifest gave the replaced file's hash: the
                // backup's manifest records it, and the backup verifies
                // (the file the damaged `.comp` was to replace is intact).
                if damage == "comp" {
                    assert_eq!(said.len(), 2, "{a}");
                    assert!(said[1].starts_with(&format!("{} is a file with 2 names", comp(1).display())), "{a}");
                } else {
                    assert_eq!(said.len(), 1, "{a}");
                }
                assert!(report.ok, "{report:?}");
            } else {
                assert_eq!(said.len(), 1, "{a}");
                assert!(!report.ok, "{report:?}");
                assert!(report.problems.iter().any(|p| p.contains(&m.volumes[0].file)), "{report:?}");
            }
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"not knib's", "replaced {replaced}");
        for (i, disk) in disks.iter().enumerate() {
            let out = d.path().join(format!("restored-{i}.qcow2"));
            let verify = report.ok;
            store.restore_with(&m.id, &disk.name, &out, ImageFormat::Qcow2, verify, &Control::new()).unwrap();
            assert_identical(&out, &disk.path);
        }
        assert_eq!(store.list(None).unwrap().len(), 1, "replaced {replaced}");
        let again = call("recover", json!({"store": store_dir, "domain": "vm1", "discard": true})).unwrap();
        assert_eq!(again["discarded"], json!([]), "replaced {replaced}: {again}");
        store.delete(&m.id).unwrap();
        assert!(store.list(None).unwrap().is_empty(), "replaced {replaced}");
    }
}

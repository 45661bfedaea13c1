//! `agent.compress` interrupted, and `agent.finalize_compression` called
//! after it as an agent that retries would call it, with the real qemu-img
//! and qemu-io: a compression killed in the middle of its copy (SIGKILL),
//! a crash at every durable step of a compression and its finalize, and
//! `.comp` files that are not a whole compression of their file (cut
//! short, damaged, of another image, a FIFO). Through all of it the
//! backup's chain must read what the guest wrote, and a finalize must never
//! put anything but a whole compression in place of a backup file. Before,
//! a compression killed midway left its `.comp` cut short, and a finalize
//! renamed it over the backup, which no longer opened.

#[path = "common/disk.rs"]
mod disk;
#[path = "common/gen.rs"]
mod gen;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use disk::{assert_check_clean, assert_identical, contents, make_disk, put_bytes, qemu_io, snapshot};
use gen::Rng;
use knib_core::api::call;
use knib_core::engine::{compress, CompressOptions, DataPath};
use knib_core::qemu_img::QemuImg;
use knib_core::{Control, ErrorKind, KnibError};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const CHILD_ENV: &str = "KNIB_COMPRESS_CHILD_REQUEST";
const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";
const NOTE_ENV: &str = "KNIB_TEST_CRASH_NOTE";

fn agent(op: &str, req: &Value) -> Result<Value, KnibError> {
    call(op, &req.to_string(), &Control::new()).map(|a| serde_json::from_str(&a).unwrap())
}

fn ok(op: &str, req: &Value) -> Value {
    agent(op, req).unwrap_or_else(|e| panic!("{op}: {e}"))
}

/// A backup chain in `dir`: a full backup (`full.qcow2`, 24 MiB of random
/// data and seeded writes) and an incremental over it (`inc.qcow2`, a
/// relative backing pointer, seeded writes, some clusters compressed).
/// Returns the files, root first, and a flattened copy of what the
/// chain reads.
fn backup_chain(dir: &Path, seed: u64) -> (Vec<PathBuf>, PathBuf) {
    let mut rng = Rng::new(seed);
    let srcs = gen::sources(dir, &mut rng, 8 * MIB);
    let full = dir.join("full.qcow2");
    let inc = dir.join("inc.qcow2");
    make_disk(&full, 32 * MIB, &[]);
    for i in 0..3 {
        qemu_io(&full, &format!("write -q -s {} {} {}", srcs[0].display(), i * 8 * MIB, 8 * MIB));
    }
    for op in gen::random_ops(&mut rng, 32 * MIB, 64 * 1024, 40, &srcs, false) {
        qemu_io(&full, &op);
    }
    make_disk(&inc, 32 * MIB, &["-F", "qcow2", "-b", "full.qcow2"]);
    for op in gen::random_ops(&mut rng, 32 * MIB, 64 * 1024, 40, &srcs, true) {
        qemu_io(&inc, &op);
    }
    for s in srcs {
        std::fs::remove_file(s).unwrap();
    }
    let reference = dir.join("reference.raw");
    snapshot(&inc, &reference);
    (vec![full, inc], reference)
}

/// What the chain reads is the guest's data, and each file checks clean.
fn assert_chain_reads(files: &[PathBuf], reference: &Path) {
    for f in files {
        assert_check_clean(f);
    }
    assert_identical(files.last().unwrap(), reference);
}

/// The files beside the chain that are not its own, the reference or a
/// `.comp` (what a compression or a finalize left behind).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !matches!(n.as_str(), "full.qcow2" | "inc.qcow2" | "reference.raw" | "note"))
        .collect();
    out.sort();
    out
}

/// The child process of the crash tests: runs the calls in
/// `KNIB_COMPRESS_CHILD_REQUEST` (`[[op, request], ...]`) in order (the
/// crash hook or the test's SIGKILL ends it).
#[test]
fn child_calls() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    let calls: Vec<(String, Value)> = serde_json::from_str(&req).unwrap();
    for (op, r) in calls {
        call(&op, &r.to_string(), &Control::new()).unwrap_or_else(|e| panic!("{op}: {e}"));
    }
}

fn child(calls: &Value) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_calls", "--nocapture", "--test-threads=1"]).env(CHILD_ENV, calls.to_string());
    c
}

/// Start `agent.compress` of `files` (the first is `full.qcow2` in `dir`)
/// at 8 MB/s on another thread, and wait until its temporary holds 1 MiB:
/// a compression surely running. The thread, and the temporary's path.
fn compressing_slowly(dir: &Path, files: &[PathBuf]) -> (std::thread::JoinHandle<Result<Value, KnibError>>, PathBuf) {
    let req = json!({"files": files, "rate_limit_mbps": 8});
    let first = std::thread::spawn(move || agent("agent.compress", &req));
    let tmp = dir.join(".full.qcow2.comp.part");
    let start = Instant::now();
    while std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0) < MIB {
        assert!(start.elapsed() < Duration::from_secs(60), "the first compression never wrote");
        std::thread::sleep(Duration::from_millis(5));
    }
    (first, tmp)
}

/// Compress the chain and finalize it, then check it reads as before and
/// nothing is left beside it.
fn compress_and_finalize(dir: &Path, files: &[PathBuf], reference: &Path) {
    ok("agent.compress", &json!({"files": files}));
    ok("agent.finalize_compression", &json!({"files": files}));
    assert_chain_reads(files, reference);
    assert!(leftovers(dir).is_empty(), "left behind: {:?}", leftovers(dir));
}

#[test]
fn a_compression_killed_midway_leaves_nothing_a_finalize_would_put_in_place_of_a_backup() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x5eed_c0de);
    let before = contents(&dir);
    // A rate limit keeps the copy going long enough to kill it midway,
    // once a megabyte of its output is written, whatever its name.
    let mut c = child(&json!([["agent.compress", {"files": files, "rate_limit_mbps": 4}]]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let written = || {
        std::fs::read_dir(&dir).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().contains(".comp") && e.metadata().is_ok_and(|m| m.len() >= MIB)
        })
    };
    while !written() {
        assert!(c.try_wait().unwrap().is_none(), "the compression ended before a megabyte was written");
        assert!(start.elapsed() < Duration::from_secs(60), "no output after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    c.kill().unwrap();
    c.wait().unwrap();
    // No `.comp` file: nothing to finalize, nothing replaced.
    let e = agent("agent.finalize_compression", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let comp = format!("{}.comp", files[0].display());
    assert!(e.message.ends_with(&format!("compressed file {comp} does not exist")), "{e}");
    let now: Vec<_> = contents(&dir).into_iter().filter(|(p, _)| !p.to_string_lossy().ends_with(".part")).collect();
    assert!(now == before, "a file of the chain changed");
    assert_chain_reads(&files, &reference);
    // The next compression removes what the killed one left.
    compress_and_finalize(&dir, &files, &reference);
}

#[test]
fn a_crash_at_every_step_of_a_compression_and_its_finalize_never_loses_the_chain() {
    let mut n = 1;
    loop {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().canonicalize().unwrap();
        let (files, reference) = backup_chain(&dir, 0xc0 + n);
        let calls = json!([["agent.compress", {"files": files}], ["agent.finalize_compression", {"files": files}]]);
        let out = child(&calls).env(CRASH_ENV, n.to_string()).env(NOTE_ENV, dir.join("note")).output().unwrap();
        let note = std::fs::read_to_string(dir.join("note")).unwrap_or_default();
        if out.status.success() {
            assert!(note.is_empty());
            assert!(n > 4, "a compression of two files and its finalize take more than {n} durable steps");
            assert_chain_reads(&files, &reference);
            assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
            break;
        }
        assert!(
            !note.is_empty(),
            "step {n}: the child failed without the crash hook: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Whatever step it stopped before, the chain reads the guest's data.
        assert_chain_reads(&files, &reference);
        // The agent finalizes what it has (a `.comp` is whole or absent);
        // when there is nothing to finalize, it compresses again.
        match agent("agent.finalize_compression", &json!({"files": files})) {
            Ok(_) => {
                assert_chain_reads(&files, &reference);
                std::fs::remove_file(dir.join("note")).unwrap();
                for l in leftovers(&dir) {
                    assert!(l.starts_with('.') && l.ends_with(".comp.part"), "crash before {note}: {l} is left");
                }
                ok("agent.finalize_compression", &json!({"files": files, "cleanup": true}));
                assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
            }
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::NotFound, "crash before {note}: {e}");
                std::fs::remove_file(dir.join("note")).unwrap();
                compress_and_finalize(&dir, &files, &reference);
            }
        }
        n += 1;
    }
}

#[test]
fn a_comp_file_that_is_not_a_whole_compression_of_its_file_is_never_finalized() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0xbad_c0e9);
    let comp = |f: &Path| PathBuf::from(format!("{}.comp", f.display()));
    ok("agent.compress", &json!({"files": files}));
    // Keep the good compressions aside, to make bad ones from.
    let good: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            let keep = dir.join(format!("good-{}", f.file_name().unwrap().to_string_lossy()));
            std::fs::copy(comp(f), &keep).unwrap();
            keep
        })
        .collect();
    let other = dir.join("other.qcow2");
    make_disk(&other, 16 * MIB, &["-F", "qcow2", "-b", "full.qcow2"]);
    let (full, inc) = (&files[0], &files[1]);
    let truncated = |to: &Path| {
        std::fs::copy(&good[1], to).unwrap();
        let len = std::fs::metadata(to).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(to).unwrap().set_len(len / 2).unwrap();
    };
    let damaged = |to: &Path| {
        std::fs::copy(&good[1], to).unwrap();
        // The refcount table's offset past the end of the file.
        put_bytes(to, 48, &(1u64 << 40).to_be_bytes());
    };
    let of_the_full = |to: &Path| {
        std::fs::copy(&good[0], to).unwrap();
    };
    let of_another_size = |to: &Path| {
        std::fs::copy(&other, to).unwrap();
    };
    let fifo = |to: &Path| {
        nix::unistd::mkfifo(to, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    };
    type Make<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Make, ErrorKind, String); 5] = [
        ("cut short", &truncated, ErrorKind::Corrupt, "is not a whole qcow2 image".into()),
        ("damaged", &damaged, ErrorKind::Corrupt, String::new()),
        ("of the full backup", &of_the_full, ErrorKind::Corrupt, "has backing file none, not `full.qcow2`".into()),
        (
            "of another size",
            &of_another_size,
            ErrorKind::Corrupt,
            format!("has a virtual size of {} bytes, not {}", 16 * MIB, 32 * MIB),
        ),
        ("a FIFO", &fifo, ErrorKind::InvalidInput, "is not a regular file".into()),
    ];
    for (what, make, kind, says) in cases {
        std::fs::remove_file(comp(inc)).unwrap();
        make(&comp(inc));
        let before = contents(&dir);
        let e = agent("agent.finalize_compression", &json!({"files": files})).unwrap_err();
        assert_eq!(e.kind, kind, "{what}: {e}");
        assert!(e.message.contains(&format!("compressed file {}", comp(inc).display())), "{what}: {e}");
        assert!(e.message.contains(&says), "{what}: {e}");
        // Nothing was renamed: not even the full backup's good `.comp`.
        assert!(contents(&dir) == before, "{what}: a file changed");
        assert!(comp(full).exists(), "{what}");
        assert_chain_reads(&files, &reference);
    }
    std::fs::remove_file(comp(inc)).unwrap();
    std::fs::copy(&good[1], comp(inc)).unwrap();
    ok("agent.finalize_compression", &json!({"files": files}));
    assert_chain_reads(&files, &reference);
    for f in good.iter().chain([&other]) {
        std::fs::remove_file(f).unwrap();
    }
    assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
}

/// A second compression of the same files while the first runs (a command
/// retried while the first still works) is busy, naming what it waits
/// for, and leaves the first's work alone. Before, the second removed the
/// first's temporary and the first renamed half of the second's output.
#[test]
fn a_second_compression_of_the_same_files_is_busy() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x2c0);
    let (first, _) = compressing_slowly(&dir, &files);
    let e = agent("agent.compress", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&format!("a compression of {} is running", files[0].display())), "{e}");
    first.join().unwrap().unwrap();
    ok("agent.finalize_compression", &json!({"files": files}));
    assert_chain_reads(&files, &reference);
    assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
}

/// A compression that opened the temporary's name just before the one
/// running renamed it to `.comp` and let it go (a command retried as the
/// first ends) must not take that finished `.comp` for its own temporary.
/// Before, it locked it, emptied it, removed the `.comp` name and failed
/// ("replaced"): the first's answer named a `.comp` that was gone. Now it
/// opens the name again and compresses anew; both `.comp` files stay whole.
#[test]
fn a_compression_that_opened_the_temporary_as_the_first_renamed_it_starts_anew() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x5e7);
    let (first, tmp) = compressing_slowly(&dir, &files);
    // The second opens the first's temporary, then waits before its lock
    // until the first has finished.
    let at = format!("locking {}", tmp.display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(12));
    let req = json!({"files": files});
    let second = std::thread::spawn(move || agent("agent.compress", &req));
    assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(30)), "the second never paused");
    first.join().unwrap().unwrap();
    assert!(dir.join("full.qcow2.comp").exists(), "the first left no .comp");
    second.join().unwrap().unwrap_or_else(|e| panic!("second compression: {e}"));
    for f in &files {
        assert!(knib_core::engine::compress::comp_path(f).exists(), "{} has no .comp", f.display());
    }
    ok("agent.finalize_compression", &json!({"files": files}));
    assert_chain_reads(&files, &reference);
    assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
}

/// A hard link planted at a compression's temporary name (to another
/// backup, a host file, or the file compressed itself) is refused before
/// a byte is written: Corrupt, naming the entry; the file it leads to is
/// untouched.
#[test]
fn a_hard_link_at_the_temporary_name_is_not_written() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x41c);
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"another file's data").unwrap();
    let tmp = dir.join(".full.qcow2.comp.part");
    for target in [victim.clone(), files[0].clone()] {
        std::fs::hard_link(&target, &tmp).unwrap();
        let before = std::fs::read(&target).unwrap();
        let e = agent("agent.compress", &json!({"files": files})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert!(e.message.contains(&format!("{} is a file with 2 names", tmp.display())), "{e}");
        assert!(std::fs::read(&target).unwrap() == before, "{} was written", target.display());
        std::fs::remove_file(&tmp).unwrap();
    }
    assert_chain_reads(&files, &reference);
}

/// qemu-img (which compresses qcow2 v2 files) writes the temporary knib
/// claimed, never what its name leads to: a link swapped in at the name
/// before qemu-img opened it (while the source is hashed) had qemu-img
/// truncate and write a host file. The compression fails (the name no
/// longer leads to its file), the host file is untouched; untampered, the
/// v2 chain compresses, keeps its relative backing pointer and reads as
/// before.
#[test]
fn qemu_img_writes_the_claimed_temporary_never_what_its_name_leads_to() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (full, inc) = (dir.join("full.qcow2"), dir.join("inc.qcow2"));
    make_disk(&full, 16 * MIB, &["-o", "compat=0.10"]);
    qemu_io(&full, "write -P 0x31 0 4M");
    make_disk(&inc, 16 * MIB, &["-o", "compat=0.10", "-F", "qcow2", "-b", "full.qcow2"]);
    qemu_io(&inc, "write -P 0x32 2M 4M");
    let reference = dir.join("reference.raw");
    snapshot(&inc, &reference);
    let files = vec![full.clone(), inc.clone()];
    let host = tempfile::tempdir().unwrap();
    let victim = host.path().join("victim");
    std::fs::write(&victim, b"a host file").unwrap();
    let at = format!("qemu-img compression of {}", inc.display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
    let req = json!({"files": files});
    let run = std::thread::spawn(move || agent("agent.compress", &req));
    assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "never paused");
    let (tmp, link) = (dir.join(".inc.qcow2.comp.part"), dir.join("swapped"));
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    std::fs::rename(&link, &tmp).unwrap();
    let e = run.join().unwrap().unwrap_err();
    assert_eq!(std::fs::read(&victim).unwrap(), b"a host file", "qemu-img wrote through the link ({e})");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("was replaced while knib wrote it"), "{e}");
    assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
    compress_and_finalize(&dir, &files, &reference);
    let info = Command::new("qemu-img").args(["info", "-U"]).arg(&inc).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("backing file: full.qcow2 (") && text.contains("compat: 0.10"), "{text}");
}

/// A `.comp` replaced by a link between the compression and its finalize
/// (to a whole compression of the same file, kept elsewhere: every check
/// of its contents passes) is refused, never renamed over the backup
/// file: Corrupt, naming it; nothing is finalized.
#[test]
fn a_comp_file_replaced_by_a_link_is_not_finalized() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x11c);
    ok("agent.compress", &json!({"files": files}));
    let elsewhere = tempfile::tempdir().unwrap();
    let comp = dir.join("inc.qcow2.comp");
    let moved = elsewhere.path().join("inc.qcow2.comp");
    std::fs::copy(&comp, &moved).unwrap();
    // A symbolic link, then a hard link (its other name would lead to the
    // backup file once renamed).
    for (symbolic, says) in [(true, "is a symbolic link"), (false, "is a file with 2 names (a hard link)")] {
        std::fs::remove_file(&comp).unwrap();
        if symbolic {
            std::os::unix::fs::symlink(&moved, &comp).unwrap();
        } else {
            std::fs::hard_link(&moved, &comp).unwrap();
        }
        let e = agent("agent.finalize_compression", &json!({"files": files})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert!(e.message.contains(&format!("compressed file {} {says}", comp.display())), "{e}");
        for f in &files {
            let m = std::fs::symlink_metadata(f).unwrap();
            assert!(m.is_file() && std::os::unix::fs::MetadataExt::nlink(&m) == 1, "{} was replaced", f.display());
        }
    }
    assert_chain_reads(&files, &reference);
}

/// A backup file holding an internal snapshot is not compressed (its
/// compressed copy would keep the current data only, and the snapshot's
/// data would be lost with the original): InvalidInput, naming the file;
/// nothing changes.
#[test]
fn a_backup_file_with_internal_snapshots_is_not_compressed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, _) = backup_chain(&dir, 0x5a9);
    let st = Command::new("qemu-img").args(["snapshot", "-c", "s1"]).arg(&files[0]).status().unwrap();
    assert!(st.success());
    qemu_io(&files[0], "write -P 0x77 0 1M");
    let before = contents(&dir);
    let e = agent("agent.compress", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let says = format!("backup file {} holds 1 internal snapshot(s)", files[0].display());
    assert!(e.message.contains(&says), "{e}");
    assert!(contents(&dir) == before, "the refused compression changed something");
}

/// A backup file whose refcounts are damaged (a used cluster's refcount
/// 0; its data still reads) is not compressed: the compressed copy would
/// be clean and replace it, hiding the damage. Corrupt, naming it, and
/// nothing is left beside it.
#[test]
fn a_backup_file_with_damaged_metadata_is_not_compressed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, _) = backup_chain(&dir, 0xda3a);
    disk::zero_first_data_refcount(&files[0]);
    let before = contents(&dir);
    let e = agent("agent.compress", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("backup file {} is damaged: ", files[0].display())), "{e}");
    assert!(e.message.contains(": refcount 0, referenced 1 times"), "{e}");
    assert!(contents(&dir) == before, "the refused compression left something");
}

/// A file whose backing file is not qcow2 is not compressed: a compressed
/// copy records its backing file as qcow2, so a raw one (recorded as raw,
/// or of no recorded format) would be read as what it is not. Refused as
/// invalid input naming the file and its backing file, with nothing left.
/// And a `.comp` that records another backing format than its file is
/// refused by the finalize before anything is renamed.
#[test]
fn a_file_whose_backing_file_is_not_qcow2_is_not_compressed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5au8; 4 * MIB as usize]).unwrap();
    let raw_format = dir.join("raw-format.qcow2");
    make_disk(&raw_format, 4 * MIB, &["-F", "raw", "-b", "base.raw"]);
    qemu_io(&raw_format, "write -P 0x21 1M 1M");
    // The same, its backing format extension made one QEMU ignores: no
    // recorded format (QEMU probes it).
    let no_format = dir.join("no-format.qcow2");
    std::fs::copy(&raw_format, &no_format).unwrap();
    let mut bytes = std::fs::read(&no_format).unwrap();
    let at = bytes[..4096].windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).expect("a backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x0b, 0xad, 0xf0, 0x0d]);
    std::fs::write(&no_format, bytes).unwrap();
    let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(&no_format).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename-format"], Value::Null, "{info}");
    for (f, why) in
        [(&raw_format, "of format raw"), (&no_format, "of no recorded format, and it does not open as qcow2")]
    {
        let before = std::fs::read(f).unwrap();
        for path in [DataPath::Native, DataPath::QemuImg] {
            let opts = CompressOptions { data_path: path, ..Default::default() };
            let e = compress(&QemuImg::new(), std::slice::from_ref(f), &opts, &Control::new()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
            let want = format!("backup file {} has backing file `base.raw` {why}", f.display());
            assert!(e.message.contains(&want), "{e}");
            assert!(std::fs::read(f).unwrap() == before, "{} was changed", f.display());
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["base.raw", "no-format.qcow2", "raw-format.qcow2"]);
        }
    }

    // A .comp of a qcow2 chain, then recorded as of a raw backing file.
    let (files, reference) = backup_chain(&dir, 0xbf0);
    ok("agent.compress", &json!({"files": files}));
    let comp = knib_core::engine::compress::comp_path(&files[1]);
    let st =
        Command::new("qemu-img").args(["rebase", "-u", "-F", "raw", "-b", "full.qcow2"]).arg(&comp).status().unwrap();
    assert!(st.success());
    let e = agent("agent.finalize_compression", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(
        e.message.contains(&format!("compressed file {} records its backing file as raw, not qcow2", comp.display())),
        "{e}"
    );
    assert!(knib_core::engine::compress::comp_path(&files[0]).exists(), "the finalize renamed a file");
    assert_chain_reads(&files, &reference);
}

/// A checked compression answers the hash of the file it wrote, read back
/// through its own handle: an entry swapped in at the temporary's name
/// while it is hashed, and swapped out before the name is checked, is not
/// what is hashed. Before, the read-back opened the name and answered the
/// swapped-in file's hash for the compressed file, so a later check of the
/// real one would have called it damaged (or a damaged one good).
#[test]
fn the_answered_hash_is_of_the_file_written_whatever_its_name_led_to_meanwhile() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x4a5);
    let hashes: Vec<String> = files
        .iter()
        .map(|f| knib_core::engine::hash_files(std::slice::from_ref(f), &Control::new()).unwrap())
        .collect();
    let tmp = dir.join(".full.qcow2.comp.part");
    let aside = dir.join("aside");
    let (read_back, written) = (format!("read-back of {}", tmp.display()), format!("written {}", tmp.display()));
    knib_core::crashpoint::pause_before(&read_back, Duration::from_secs(3));
    knib_core::crashpoint::pause_before(&written, Duration::from_secs(3));
    let req = json!({"files": files, "expected_hashes": hashes});
    let compressing = std::thread::spawn(move || agent("agent.compress", &req));
    assert!(knib_core::crashpoint::wait_for_pause(&read_back, Duration::from_secs(60)), "no pause at {read_back}");
    std::fs::rename(&tmp, &aside).unwrap();
    std::fs::write(&tmp, vec![0x5au8; 3 * MIB as usize]).unwrap();
    assert!(knib_core::crashpoint::wait_for_pause(&written, Duration::from_secs(60)), "no pause at {written}");
    std::fs::rename(&aside, &tmp).unwrap();
    let a = compressing.join().unwrap().unwrap_or_else(|e| panic!("compression: {e}"));
    let comp = knib_core::engine::compress::comp_path(&files[0]);
    let real = knib_core::engine::hash_files(std::slice::from_ref(&comp), &Control::new()).unwrap();
    assert_eq!(a["compressed"][0]["hash"], json!(real), "{a}");
    ok("agent.finalize_compression", &json!({"files": files}));
    assert_chain_reads(&files, &reference);
}

/// A compression that fails undoes only its own files: it keeps its
/// temporary claimed until it has removed it, so a second compression of
/// the same file started meanwhile is busy, and never has its temporary
/// removed under it. Before, the first let its claim go, the second
/// claimed a new temporary, and the first's cleanup removed it: the second
/// failed as "replaced".
#[test]
fn a_failed_compression_removes_only_its_own_temporary() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x7d1);
    let full = files[0].clone();
    let at = format!("undoing the compression of {}", full.display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(6));
    // A hash that cannot match: the first fails once it has read the file.
    let req = json!({"files": [full], "expected_hashes": ["0".repeat(32)]});
    let first = std::thread::spawn(move || agent("agent.compress", &req));
    assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "no pause at {at}");
    let req = json!({"files": [full], "rate_limit_mbps": 2});
    let second = std::thread::spawn(move || agent("agent.compress", &req));
    let e = first.join().unwrap().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    let e = second.join().unwrap().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "the second compression: {e}");
    assert!(e.message.contains(&format!("a compression of {} is running", full.display())), "{e}");
    assert_chain_reads(&files, &reference);
    assert!(leftovers(&dir).is_empty(), "left behind: {:?}", leftovers(&dir));
}

/// A `.comp` too large for knib's refcount check (over 64M host clusters:
/// here a whole compression, its file then made 4 TiB long, sparse) is
/// finalized on its header's checks alone, as the compression's own check
/// of its source skips such a file: refused as before ("cannot be
/// checked", corrupt), a backup of 4 TiB or more could be compressed but
/// never finalized. A `.comp` holding an internal snapshot (which a
/// compression never writes, and whose refcounts knib does not check) is
/// refused.
#[test]
fn a_comp_file_too_large_to_check_is_finalized_on_its_header() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (files, reference) = backup_chain(&dir, 0x64d);
    ok("agent.compress", &json!({"files": files}));
    let comp = knib_core::engine::compress::comp_path(&files[1]);
    let st = Command::new("qemu-img").args(["snapshot", "-c", "s1"]).arg(&comp).status().unwrap();
    assert!(st.success());
    let e = agent("agent.finalize_compression", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("compressed file {} holds 1 internal snapshot(s)", comp.display())), "{e}");
    assert!(knib_core::engine::compress::comp_path(&files[0]).exists(), "the finalize renamed a file");
    std::fs::remove_file(&comp).unwrap();
    ok("agent.compress", &json!({"files": [files[1]]}));
    std::fs::OpenOptions::new().write(true).open(&comp).unwrap().set_len((4 << 40) + (1 << 20)).unwrap();
    ok("agent.finalize_compression", &json!({"files": files}));
    assert_identical(files.last().unwrap(), &reference);
}

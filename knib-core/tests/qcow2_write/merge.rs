//! Native merges (commit into the backing file) against `qemu-img commit`:
//! the same guest view, clean images, stops between batches, images in use.

use super::*;

/// Merge the top of `g` into its backing file natively (batches of
/// `batch` bytes of L2 tables), and check it against `qemu-img commit` of a
/// copy of the same chain: the base passes `qemu-img check` and holds what
/// qemu-img's base holds, the top is empty, clean and keeps its backing
/// pointer, and the chain reads as before.
fn check_native_commit(g: &Generated, tag: &str, batch: usize) -> bool {
    let dir = g.top().parent().unwrap();
    let top = g.top();
    let base = &g.files[g.files.len() - 2];
    let top_info = info(top);
    let top_size = Qcow2Image::open(top).unwrap().virtual_size();
    let base_size = Qcow2Image::open(base).unwrap().virtual_size();

    let mut c = match Commit::prepare(top).unwrap() {
        Ok(c) => c.with_batch_bytes(batch),
        Err(why) => {
            // The generator makes some tops larger than their base:
            // qemu-img grows the base then, the native merge does not.
            assert_ne!(top_size, base_size, "{tag}: refused: {why}");
            assert!(why.contains("another virtual size"), "{tag}: {why}");
            return false;
        }
    };
    let before = dir.join("before.raw");
    qemu_img(&["convert", "-U", "-O", "raw", p(top), p(&before)]);
    let reference = dir.join("reference");
    std::fs::create_dir(&reference).unwrap();
    for f in &g.files {
        std::fs::copy(f, reference.join(f.file_name().unwrap())).unwrap();
    }
    qemu_img(&["commit", "-q", p(&reference.join(top.file_name().unwrap()))]);
    assert_eq!(c.base_path(), base.as_path(), "{tag}");
    let r = c.run(&Control::new()).unwrap_or_else(|e| panic!("{tag}: merge: {e}"));
    c.empty_top().unwrap();
    drop(c);
    assert_clean(base);
    assert_clean(top);
    assert_same(base, &reference.join(base.file_name().unwrap()));
    assert_same(top, &before);
    // The top holds nothing now, and points where it pointed.
    let mut t = Qcow2Image::open(top).unwrap();
    for i in 0..t.guest_clusters() {
        assert_eq!(t.cluster_state(i).unwrap(), ClusterState::Unallocated, "{tag}: cluster {i}");
    }
    let after = info(top);
    for k in ["backing-filename", "backing-filename-format", "cluster-size", "virtual-size"] {
        assert_eq!(after[k], top_info[k], "{tag}: {k}");
    }
    assert!(r.data_clusters + r.zero_clusters > 0, "{tag}: {r:?}");
    std::fs::remove_file(&before).unwrap();
    std::fs::remove_dir_all(&reference).unwrap();
    true
}

/// Put a new layer of the same virtual size on top of `g`, with random
/// writes, zero writes and discards (and compressed clusters when asked).
fn add_layer(g: &mut Generated, seed: u64, compressed: bool) {
    let dir = g.top().parent().unwrap().to_path_buf();
    let mut rng = Rng::new(seed);
    let srcs = sources(&dir, &mut rng, 3 * g.cs.max(64 * K));
    let name = format!("l{}.qcow2", g.files.len());
    let below = g.top().file_name().unwrap().to_str().unwrap().to_string();
    let size = Qcow2Image::open(g.top()).unwrap().virtual_size().to_string();
    let opts = format!("cluster_size={}", g.cs);
    must(
        Some(&dir),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opts, "-b", &below, "-F", "qcow2", &name, &size],
    );
    let path = dir.join(name);
    let n = 30 + rng.below(40) as usize;
    let ops = random_ops(&mut rng, size.parse().unwrap(), g.cs, n, &srcs, compressed);
    qemu_io(&path, &ops);
    g.files.push(path);
}

#[test]
fn native_merges_into_the_backing_file_match_qemu_img_commit() {
    // 64 KiB clusters, odd sizes, bases with zstd or zlib compressed
    // clusters (replaced clusters release their references), chains of 2
    // and 3 files; one batch, and one batch per L2 table.
    let mut merged = 0;
    for seed in 300..312u64 {
        let d = tempfile::tempdir().unwrap();
        let depth = 2 + (seed % 2) as usize;
        let size = 3 * M + seed * 7 * 512 + if seed % 2 == 0 { 0 } else { 40 * K };
        let base = match seed % 3 {
            1 => Some("zstd"),
            2 => Some("zlib"),
            _ => None,
        };
        let mut g = generate(d.path(), seed, depth, size, 64 * K, base);
        let batch = if seed % 2 == 0 { usize::MAX } else { 1 };
        merged += usize::from(check_native_commit(&g, &format!("seed {seed}"), batch));
        // A layer of the same size (with compressed clusters) on top of
        // the merged chain: always merged natively.
        add_layer(&mut g, seed + 1000, seed % 2 == 1);
        assert!(check_native_commit(&g, &format!("seed {seed}, added layer"), batch), "seed {seed}");
    }
    eprintln!("{merged} of 12 generated chains merged natively (the others have a top larger than its base)");
    assert!(merged >= 3, "{merged} of 12 generated chains merged natively");
}

#[test]
fn native_merges_with_small_and_large_clusters_add_tables_and_refcount_blocks() {
    // 512-byte clusters: a refcount block covers 128 KiB of file, so the
    // merge adds refcount blocks (and refcount table entries) as the base
    // grows; 2 MiB clusters: few, large tables.
    for (seed, cs, size) in [(320u64, 512u64, 2 * M + 3 * 512), (321, 4 * K, 3 * M), (322, 2 * M, 9 * M + 512)] {
        let d = tempfile::tempdir().unwrap();
        let mut g = generate(d.path(), seed, 1, size, cs, None);
        add_layer(&mut g, seed + 1000, true);
        assert!(check_native_commit(&g, &format!("seed {seed}"), 1), "seed {seed}");
    }
}

#[test]
fn a_merge_stopped_between_batches_leaves_a_clean_base_and_the_same_chain() {
    let d = tempfile::tempdir().unwrap();
    let top = d.path().join("top.qcow2");
    let base = d.path().join("base.qcow2");
    let size = 8 * M;
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p(&base), &size.to_string()]);
    qemu_io(&base, &["write -P 0x11 0 8M".into()]);
    // The base compressed: replacing its clusters releases references.
    let tmp = d.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", p(&base), p(&tmp)]);
    std::fs::rename(&tmp, &base).unwrap();
    must(
        Some(d.path()),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    // Writes across several L2 tables (one maps 2 MiB here).
    qemu_io(&top, &["write -P 0x22 100k 300k".into(), "write -z 3M 64k".into(), "write -P 0x33 5M 2M".into()]);
    let before = d.path().join("before.raw");
    qemu_img(&["convert", "-O", "raw", p(&top), p(&before)]);

    // Cancelled: it stops after the first batch (one table).
    let ctl = Control::new();
    ctl.cancel.cancel();
    let mut c = Commit::prepare(&top).unwrap().unwrap().with_batch_bytes(1);
    let e = c.run(&ctl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    drop(c);
    assert_clean(&base);
    assert_clean(&top);
    assert_same(&top, &before);
    // Run again to the end: the same as one merge.
    let mut c = Commit::prepare(&top).unwrap().unwrap();
    c.run(&Control::new()).unwrap();
    c.empty_top().unwrap();
    drop(c);
    assert_clean(&base);
    assert_same(&base, &before);
    assert_same(&top, &before);
}

/// `base.qcow2` (4 MiB, empty) and `top.qcow2` over it in `dir`, the top's
/// first MiB written with `pattern`.
fn base_and_top(dir: &Path, pattern: u8) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    must(Some(dir), "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    qemu_io(&top, &[format!("write -P {pattern:#x} 0 1M")]);
    (base, top)
}

#[test]
fn a_merge_refuses_images_in_use_and_hands_unsupported_ones_to_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = base_and_top(d.path(), 0x44);

    // A QEMU process (qemu-io) has the base open: busy, nothing written.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", p(&base)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    // Wait until it holds its locks (listed in /proc/locks by inode).
    let ino = format!(":{} ", std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&base).unwrap()));
    let mut locked = false;
    for _ in 0..200 {
        if std::fs::read_to_string("/proc/locks").unwrap().lines().any(|l| l.contains("OFDLCK") && l.contains(&ino)) {
            locked = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(locked, "qemu-io locks {}", base.display());
    let busy = Commit::prepare(&top).err();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let e = busy.expect("the merge sees the image in use");
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("base.qcow2 is in use"), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);

    // A version 2 base: refused before anything is written, with the reason.
    let old = d.path().join("old.qcow2");
    let over = d.path().join("over.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", p(&old), "4M"]);
    must(Some(d.path()), "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", "over.qcow2"]);
    qemu_io(&over, &["write -P 0x55 0 1M".into()]);
    let why = Commit::prepare(&over).unwrap().unwrap_err();
    assert!(why.contains("old.qcow2 is qcow2 version 2"), "{why}");
    // engine::commit merges it with qemu-img then.
    let before = d.path().join("before.raw");
    qemu_img(&["convert", "-O", "raw", p(&over), p(&before)]);
    knib_core::engine::native::commit(
        &knib_core::qemu_img::QemuImg::new(),
        &over,
        knib_core::engine::DataPath::Native,
        &Control::new(),
    )
    .unwrap();
    assert_same(&old, &before);
    assert_clean(&old);

    // No backing file: an invalid-input error naming the file.
    let e = Commit::prepare(&base).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("has no backing file"), "{e}");
}

/// A base whose refcounts count a host cluster far past its end (here a
/// refcount block at index 2^15 of the refcount table of a 2 MiB-cluster
/// image, counting host cluster 2^35 at offset 2^56; `qemu-img check`
/// finds nothing wrong with it) is merged by `qemu-img commit`, and the
/// merged base reads what the chain read. Before, the native merge
/// allocated from past that cluster: at offset 2^56 + 2 MiB, which an L2
/// entry's offset bits cannot hold (QEMU reads another cluster there: the
/// guest's data lost once the top was emptied), or failed with EFBIG where
/// the file system refuses such a size.
#[test]
fn a_base_counting_clusters_past_its_end_is_merged_by_qemu_img() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", p(&base), "16M"]);
    qemu_io(&base, &["write -P 0x21 0 4M".into()]);
    must(
        Some(d.path()),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    qemu_io(&top, &["write -P 0x44 8M 2M".into(), "write -P 0x45 1M 64k".into()]);
    // The crafted refcount block: one more cluster at the end of the file,
    // its first entry 1, itself counted in refcount block 0.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&base).unwrap();
    let be64 = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let cs = 2u64 << 20;
    let len = f.metadata().unwrap().len();
    assert_eq!(len % cs, 0);
    let rt = be64(48);
    let block0 = be64(rt);
    let mut blk = vec![0u8; cs as usize];
    blk[..2].copy_from_slice(&1u16.to_be_bytes());
    f.write_all_at(&blk, len).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), block0 + 2 * (len / cs)).unwrap();
    f.write_all_at(&len.to_be_bytes(), rt + 8 * (1 << 15)).unwrap();
    drop(f);
    let (ok, text) = run(None, "qemu-img", &["check", p(&base)]);
    assert!(ok, "qemu-img accepts the crafted base: {text}");

    let why = Commit::prepare(&top).unwrap().unwrap_err();
    assert!(why.contains("base.qcow2 counts host cluster 34359738368 past its end"), "{why}");
    let before = d.path().join("before.raw");
    qemu_img(&["convert", "-O", "raw", p(&top), p(&before)]);
    knib_core::engine::native::commit(
        &knib_core::qemu_img::QemuImg::new(),
        &top,
        knib_core::engine::DataPath::Native,
        &Control::new(),
    )
    .unwrap();
    assert_same(&base, &before);
    assert_same(&top, &before);
    let (ok, text) = run(None, "qemu-img", &["check", p(&base)]);
    assert!(ok, "{text}");
}

/// The top is locked before its tables are read. A writer that ends
/// while the merge is held right before its lock (here qemu-io writing a
/// cluster the top had not allocated) is seen: the merged base holds its
/// write. Before, the top's tables were read before the lock, and the
/// write, missing from the stale tables, was dropped with the emptied top.
#[test]
fn a_write_before_the_merge_takes_its_lock_is_merged() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "1G"]);
    qemu_io(&base, &["write -P 0x21 0 4M".into()]);
    must(Some(d.path()), "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    qemu_io(&top, &["write -P 0x44 1M 1M".into()]);
    let hold = std::time::Duration::from_secs(6);
    knib_core::crashpoint::pause_before(&format!("locking {} for a merge", top.display()), hold);
    let started = std::time::Instant::now();
    let merge = {
        let top = top.clone();
        std::thread::spawn(move || {
            let mut c = Commit::prepare(&top).unwrap().unwrap();
            c.run(&Control::new()).unwrap();
            c.empty_top().unwrap();
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    // Past 512 MiB: a range of the top's second L2 table, which it did
    // not have (an L1 entry the merge would have read as empty).
    qemu_io(&top, &["write -P 0x66 600M 128k".into()]);
    assert!(started.elapsed() < hold, "the write came after the pause: the test proves nothing");
    let before = d.path().join("before.raw");
    qemu_img(&["convert", "-U", "-O", "raw", p(&top), p(&before)]);
    merge.join().unwrap();
    assert_same(&base, &before);
    assert_same(&top, &before);
    assert_clean(&base);
}

/// The top is emptied under a temporary name beside it, in a directory
/// that may be a primary storage pool. It was the fixed name
/// `.<top>.part`, opened with create+truncate: a link planted there had its
/// target truncated and overwritten with an empty qcow2 header, and was
/// then renamed over the top (the top became the link). The name is now
/// made exclusively and never followed: the planted link and its target
/// stay as they were, the top is a regular file, emptied, and no
/// temporary file is left.
#[test]
fn emptying_the_top_never_writes_through_a_planted_link() {
    let d = tempfile::tempdir().unwrap();
    let (_, top) = base_and_top(d.path(), 0x5e);
    let before = d.path().join("before.raw");
    qemu_img(&["convert", "-O", "raw", p(&top), p(&before)]);
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"an operator's file").unwrap();
    let link = d.path().join(".top.qcow2.part");
    std::os::unix::fs::symlink(&victim, &link).unwrap();

    let mut c = Commit::prepare(&top).unwrap().unwrap();
    c.run(&Control::new()).unwrap();
    c.empty_top().unwrap();
    drop(c);
    let kept = std::fs::read(&victim).unwrap();
    assert!(kept == b"an operator's file", "the planted link's target was overwritten ({} bytes now)", kept.len());
    assert_eq!(std::fs::read_link(&link).unwrap(), victim);
    assert!(std::fs::symlink_metadata(&top).unwrap().file_type().is_file());
    assert_clean(&top);
    assert_same(&top, &before);
    assert_eq!(Qcow2Image::open(&top).unwrap().cluster_state(0).unwrap(), ClusterState::Unallocated);
    let mut names: Vec<String> =
        std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, [".top.qcow2.part", "base.qcow2", "before.raw", "top.qcow2", "victim"]);
}

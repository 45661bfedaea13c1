//! The native qcow2 writer and data path against the real qemu-img, on
//! seeded random images (data, patterns, zero writes, discards, compressed
//! input clusters; chains 1 to 3 deep; odd virtual sizes; clusters of 512
//! bytes, 4 KiB, 64 KiB and 2 MiB):
//!
//! - every image the native path writes (a delta copy with its backing
//!   pointer, plain and compressed with zstd and zlib; a flattened copy,
//!   plain and compressed; a raw restore) passes `qemu-img check`, our own
//!   refcount check, and `qemu-img compare` against its source, and
//!   `qemu-img info` shows the backing pointer and compression type;
//! - the hash the copy reports is xxh3-128 of the file it wrote;
//! - every image qemu-img writes (plain, zlib, zstd) reads natively exactly
//!   as `qemu-img convert -O raw` reads it.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/cache.rs"]
mod cache;
#[path = "common/gen.rs"]
mod gen;
use gen::{random_ops, sources, Rng, K};

use knib_core::engine::hash_files;
use knib_core::qcow2::{
    copy_image, BackingRef, Chain, ClusterState, Commit, CompressionType, CopyOptions, CountSink, ImageSpec, Layout,
    Qcow2Image, SourceMode, TargetFormat,
};
use knib_core::{Control, ErrorKind};

const M: u64 = 1024 * 1024;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Run a program; return (success, stdout + stderr).
fn run(dir: Option<&Path>, program: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(dir: Option<&Path>, program: &str, args: &[&str]) -> String {
    let (ok, text) = run(dir, program, args);
    assert!(ok, "{program} {args:?}: {text}");
    text
}

fn qemu_img(args: &[&str]) -> String {
    must(None, "qemu-img", args)
}

fn qemu_io(path: &Path, cmds: &[String]) {
    for chunk in cmds.chunks(200) {
        let mut args = vec!["-f", "qcow2"];
        for c in chunk {
            args.extend(["-c", c.as_str()]);
        }
        args.push(p(path));
        let out = must(None, "qemu-io", &args);
        assert!(!out.contains("error") && !out.contains("failed"), "qemu-io on {}: {out}", path.display());
    }
}

/// A generated chain, base first; every file in `dir`, backing names relative.
struct Generated {
    files: Vec<PathBuf>,
    cs: u64,
}

impl Generated {
    fn top(&self) -> &Path {
        self.files.last().unwrap()
    }
}

/// A random chain of `depth` files of `size` bytes with clusters of `cs`:
/// the base has compressed clusters (written by qemu-io, or the whole base
/// recompressed by `qemu-img convert -c` in `base_compression`), each layer
/// random writes, zero writes and discards.
fn generate(dir: &Path, seed: u64, depth: usize, size: u64, cs: u64, base_compression: Option<&str>) -> Generated {
    let mut rng = Rng::new(seed);
    let srcs = sources(dir, &mut rng, 3 * cs.max(64 * K));
    let mut files = Vec::new();
    for level in 0..depth {
        let name = format!("l{level}.qcow2");
        let path = dir.join(&name);
        let opts = format!("cluster_size={cs}");
        match files.last() {
            None => qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, p(&path), &size.to_string()]),
            Some(prev) => {
                let prev_name = Path::new(prev).file_name().unwrap().to_str().unwrap().to_string();
                // Some upper layers are larger than their backing file.
                let sz = if rng.below(3) == 0 { size + cs } else { size };
                let sz = sz.to_string();
                must(
                    Some(dir),
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", "-o", &opts, "-b", &prev_name, "-F", "qcow2", &name, &sz],
                )
            }
        };
        let vsize = Qcow2Image::open(&path).unwrap().virtual_size();
        let n = 20 + rng.below(40) as usize;
        let ops = random_ops(&mut rng, vsize, cs, n, &srcs, level == 0);
        qemu_io(&path, &ops);
        if level == 0 {
            if let Some(t) = base_compression {
                let tmp = dir.join("l0.tmp.qcow2");
                let o = format!("compression_type={t},cluster_size={cs}");
                qemu_img(&["convert", "-c", "-O", "qcow2", "-o", &o, p(&path), p(&tmp)]);
                std::fs::rename(&tmp, &path).unwrap();
            }
        }
        files.push(path);
    }
    Generated { files, cs }
}

/// `qemu-img check` must find nothing; our own refcount check neither.
fn assert_clean(img: &Path) {
    let (ok, text) = run(None, "qemu-img", &["check", "--output=json", p(img)]);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("qemu-img check {}: {text}", img.display()));
    for k in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(v.get(k).and_then(|x| x.as_u64()).unwrap_or(0), 0, "{}: {k}: {text}", img.display());
    }
    assert!(ok, "qemu-img check {}: {text}", img.display());
    let r = Qcow2Image::open(img).unwrap().check_refcounts(&knib_core::Control::new()).unwrap();
    assert!(r.is_clean(), "{}: {r:?}", img.display());
}

/// `qemu-img compare` (guest-visible content, chains followed).
fn assert_same(a: &Path, b: &Path) {
    let (ok, text) = run(None, "qemu-img", &["compare", "-U", p(a), p(b)]);
    assert!(ok, "qemu-img compare {} {}: {text}", a.display(), b.display());
}

fn info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p(img)])).unwrap()
}

fn native(
    src: &Path,
    dest: &Path,
    mode: SourceMode,
    format: TargetFormat,
    backing: Option<&str>,
    compression: Option<CompressionType>,
) -> knib_core::qcow2::CopyReport {
    let opts = CopyOptions {
        mode,
        format,
        backing: backing.map(|b| BackingRef { name: b.to_string(), format: "qcow2".into() }),
        compression,
        hash: true,
        check_output: true,
        threads: 2,
        ..Default::default()
    };
    let mut bound = 0;
    let r = copy_image(src, dest, &opts, &Control::new(), &mut |b| {
        bound = b;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dest.display()));
    assert!(
        r.file_len <= bound || format == TargetFormat::Raw,
        "{}: {} over the bound {bound}",
        dest.display(),
        r.file_len
    );
    // The hash reported is the file's, as verify computes it.
    let want = hash_files(&[dest.to_path_buf()], &Control::new()).unwrap();
    assert_eq!(r.hash.as_deref(), Some(want.as_str()), "{}", dest.display());
    // A qcow2 output was read back and found as written; its digest is the
    // same on any number of threads, and a delta's is its source's own.
    if format == TargetFormat::Qcow2 {
        let clusters = r.checked.unwrap_or_else(|| panic!("{}: not read back", dest.display()));
        let digest = |f: &Path, threads: usize| {
            let src = knib_core::qcow2::FileSource::new(std::fs::File::open(f).unwrap()).unwrap();
            let c = Control::new();
            knib_core::qcow2::image_digest("x", std::sync::Arc::new(src), backing.is_some(), threads, &c, "digest")
                .unwrap()
        };
        let one = digest(dest, 1);
        assert_eq!(one.clusters(), clusters, "{}", dest.display());
        assert_eq!(digest(dest, 3), one, "{}", dest.display());
        if mode == SourceMode::Top {
            assert_eq!(digest(src, 2), one, "{}: not its source's own clusters", dest.display());
        }
    } else {
        assert_eq!(r.checked, None, "{}", dest.display());
    }
    r
}

/// Every native output of one generated chain.
fn check_native_outputs(g: &Generated, tag: &str) {
    let dir = g.top().parent().unwrap();
    let top = g.top();
    let backing = g.files.len().checked_sub(2).map(|i| g.files[i].file_name().unwrap().to_str().unwrap().to_string());
    // Delta copies: the top's own clusters, the same backing pointer.
    for (name, comp) in [("plain", None), ("zstd", Some(CompressionType::Zstd)), ("zlib", Some(CompressionType::Zlib))]
    {
        let out = dir.join(format!("delta-{name}.qcow2"));
        let r = native(top, &out, SourceMode::Top, TargetFormat::Qcow2, backing.as_deref(), comp);
        assert_clean(&out);
        assert_same(&out, top);
        if comp.is_some() {
            assert!(r.summary.compressed_clusters > 0 || r.summary.data_clusters == 0, "{tag} {name}: {r:?}");
        } else {
            assert_eq!(r.summary.compressed_clusters, 0, "{tag} {name}");
        }
        let i = info(&out);
        assert_eq!(i["backing-filename"].as_str(), backing.as_deref(), "{tag} {name}");
        if backing.is_some() {
            assert_eq!(i["backing-filename-format"].as_str(), Some("qcow2"), "{tag} {name}");
        }
        assert_eq!(i["cluster-size"].as_u64(), Some(g.cs), "{tag} {name}");
        assert_eq!(i["format-specific"]["data"]["compat"].as_str(), Some("1.1"), "{tag} {name}");
        let ctype = i["format-specific"]["data"]["compression-type"].as_str().unwrap_or("zlib").to_string();
        match comp {
            Some(CompressionType::Zstd) => assert_eq!(ctype, "zstd", "{tag} {name}"),
            _ => assert_eq!(ctype, "zlib", "{tag} {name}"),
        }
        // The top's own clusters only: nothing of the backing file is copied.
        let own = Qcow2Image::open(top).unwrap();
        assert!(r.bytes_read <= own.guest_clusters() * own.cluster_size(), "{tag} {name}");
        std::fs::remove_file(&out).unwrap();
    }
    // Flattened copies and a raw restore.
    for (name, format, comp) in [
        ("flat", TargetFormat::Qcow2, None),
        ("flat-zstd", TargetFormat::Qcow2, Some(CompressionType::Zstd)),
        ("raw", TargetFormat::Raw, None),
    ] {
        let out = dir.join(format!("{name}.out"));
        native(top, &out, SourceMode::Chain, format, None, comp);
        if format == TargetFormat::Qcow2 {
            assert_clean(&out);
            assert!(info(&out)["backing-filename"].is_null(), "{tag} {name}");
        } else {
            assert_eq!(std::fs::metadata(&out).unwrap().len(), Qcow2Image::open(top).unwrap().virtual_size());
        }
        assert_same(&out, top);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn native_copies_of_64k_images_and_chains_pass_check_and_compare() {
    for seed in 0..8u64 {
        let d = tempfile::tempdir().unwrap();
        let depth = 1 + (seed % 3) as usize;
        // Odd sizes: not a multiple of the cluster size.
        let size = 3 * M + seed * 7 * 512 + if seed % 2 == 0 { 0 } else { 40 * K };
        let base = match seed % 4 {
            1 => Some("zstd"),
            3 => Some("zlib"),
            _ => None,
        };
        let g = generate(d.path(), seed, depth, size, 64 * K, base);
        check_native_outputs(&g, &format!("seed {seed}"));
    }
}

#[test]
fn native_copies_with_2m_clusters_pass_check_and_compare() {
    for seed in 100..103u64 {
        let d = tempfile::tempdir().unwrap();
        let size = 9 * M + 3 * 512;
        let g = generate(d.path(), seed, 1 + (seed % 3) as usize, size, 2 * M, (seed == 101).then_some("zstd"));
        check_native_outputs(&g, &format!("seed {seed}"));
    }
}

#[test]
fn native_copies_with_small_clusters_cross_many_tables_and_refcount_blocks() {
    // 512-byte clusters: an L2 table maps 32 KiB, a refcount block covers
    // 128 KiB of file, so a few MiB exercise every boundary of the layout.
    for (seed, cs) in [(200u64, 512u64), (201, 4 * K)] {
        let d = tempfile::tempdir().unwrap();
        let g = generate(d.path(), seed, 2, 2 * M + 3 * 512, cs, None);
        check_native_outputs(&g, &format!("seed {seed}"));
    }
}

/// Read `img` natively and through qemu-img: byte for byte the same.
fn assert_reads_like_qemu(img: &Path) {
    let raw = img.with_extension("reference.raw");
    qemu_img(&["convert", "-U", "-O", "raw", p(img), p(&raw)]);
    let want = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let mut chain = Chain::open(img).unwrap();
    let mut got = vec![0xa5u8; chain.virtual_size() as usize];
    chain.read_at(0, &mut got).unwrap();
    assert_eq!(got.len(), want.len(), "{}", img.display());
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i}", img.display());
    }
}

#[test]
fn images_qemu_img_writes_read_natively_as_qemu_reads_them() {
    for seed in 300..306u64 {
        let d = tempfile::tempdir().unwrap();
        let cs = if seed % 3 == 2 { 2 * M } else { 64 * K };
        let g = generate(d.path(), seed, 1 + (seed % 3) as usize, 5 * M + 512, cs, None);
        let top = g.top();
        assert_reads_like_qemu(top);
        for (name, args) in [
            ("plain", vec!["-O", "qcow2"]),
            ("zlib", vec!["-c", "-O", "qcow2", "-o", "compression_type=zlib"]),
            ("zstd", vec!["-c", "-O", "qcow2", "-o", "compression_type=zstd"]),
            ("v2-zlib", vec!["-c", "-O", "qcow2", "-o", "compat=0.10"]),
        ] {
            let out = d.path().join(format!("qemu-{name}.qcow2"));
            let mut a = vec!["convert"];
            a.extend(args);
            a.extend([p(top), p(&out)]);
            qemu_img(&a);
            assert_reads_like_qemu(&out);
            let r = Qcow2Image::open(&out).unwrap().check_refcounts(&knib_core::Control::new()).unwrap();
            assert!(r.is_clean(), "{name}: our check of a qemu-img image: {r:?}");
        }
        // A delta written by qemu-img with -B on the chain below the top.
        if g.files.len() >= 2 {
            let below = g.files[g.files.len() - 2].file_name().unwrap().to_str().unwrap().to_string();
            let out = d.path().join("qemu-delta.qcow2");
            must(
                Some(d.path()),
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-B", &below, "-F", "qcow2", p(top), p(&out)],
            );
            assert_reads_like_qemu(&out);
        }
    }
}

#[test]
fn refcounts_never_overflow_when_tiny_compressed_clusters_share_a_2m_cluster() {
    // Over 65535 compressed clusters of 20 bytes would share one 2 MiB host
    // cluster and overflow its 16-bit refcount; the writer moves to a fresh
    // cluster first. (Real zstd or deflate frames of a 2 MiB cluster are
    // longer than 32 bytes, so this takes made-up bytes: the refcounts are
    // what is checked, not the data.)
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("tiny.qcow2");
    let cs = 2 * M;
    let n = 140_000u64;
    let spec = ImageSpec { virtual_size: n * cs, cluster_bits: 21, backing: None, compression: CompressionType::Zstd };
    let file = std::fs::File::create(&out).unwrap();
    let sink = knib_core::qcow2::FileSink::new(file, &out, false);
    let mut layout = Layout::new(spec, sink, None).unwrap();
    for i in 0..n {
        layout
            .push_compressed(i, &[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i as u8])
            .unwrap();
    }
    let (header, sink, summary) = layout.finish().unwrap();
    assert_eq!(summary.compressed_clusters, n);
    let (file, _) = sink.finish().unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&header, 0).unwrap();
    drop(file);
    assert_clean(&out);
    let img = Qcow2Image::open(&out).unwrap();
    // Three host clusters of packed data: 65535, 65535 and the rest.
    assert_eq!(img.refcount(1).unwrap(), 65535);
    assert_eq!(img.refcount(2).unwrap(), 65535);
    assert_eq!(img.refcount(3).unwrap(), n - 2 * 65535);
}

#[test]
fn a_plan_gives_the_exact_file_length_of_a_plain_copy() {
    let spec =
        ImageSpec { virtual_size: 10 * M + 512, cluster_bits: 16, backing: None, compression: CompressionType::Zlib };
    let mut l = Layout::new(spec, CountSink::default(), None).unwrap();
    l.push_data(3, &vec![0u8; 2 * 64 * K as usize]).unwrap();
    l.push_zero(10, 5).unwrap();
    let (_, sink, s) = l.finish().unwrap();
    assert_eq!(sink.0, s.file_len);
    // Header, 2 data clusters, 1 L2 table, L1, refcount table, 1 block.
    assert_eq!(s.file_len, 7 * 64 * K);
    assert_eq!((s.data_clusters, s.zero_clusters, s.l2_tables, s.refcount_blocks), (2, 5, 1, 1));
    // Out of order, past the end, and compressed data as long as a cluster are refused.
    let spec = ImageSpec { virtual_size: M, cluster_bits: 16, backing: None, compression: CompressionType::Zstd };
    let mut l = Layout::new(spec, CountSink::default(), None).unwrap();
    l.push_zero(5, 1).unwrap();
    assert_eq!(l.push_zero(5, 1).unwrap_err().kind, ErrorKind::Internal);
    assert_eq!(l.push_zero(16, 1).unwrap_err().kind, ErrorKind::Internal);
    assert_eq!(l.push_compressed(7, &vec![1u8; 64 * K as usize]).unwrap_err().kind, ErrorKind::Internal);
}

#[test]
fn the_native_path_refuses_what_it_does_not_handle_with_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let enc = d.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        p(&enc),
        "1M",
    ]);
    let ext = d.path().join("ext.qcow2");
    let data = d.path().join("ext.data");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", p(&data)), p(&ext), "1M"]);
    for (img, needle) in [(&enc, "encrypted"), (&ext, "external data file")] {
        let out = d.path().join("out.qcow2");
        let e = copy_image(img, &out, &CopyOptions::default(), &Control::new(), &mut |_| Ok(())).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert!(e.message.contains(needle), "{e}");
        assert!(!out.exists());
    }
    // Cancelled before it starts: nothing is written past the plan.
    let g = generate(d.path(), 7, 1, 2 * M, 64 * K, None);
    let ctl = Control::new();
    ctl.cancel.cancel();
    let out = d.path().join("c.qcow2");
    let e = copy_image(g.top(), &out, &CopyOptions::default(), &ctl, &mut |_| Ok(())).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    // A free-space check that fails stops the copy before the file exists.
    let e = copy_image(g.top(), &out, &CopyOptions::default(), &Control::new(), &mut |n| {
        Err(knib_core::KnibError::new(ErrorKind::NoSpace, format!("{n} bytes needed")))
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace);
    assert!(!out.exists());
}

#[test]
fn the_rate_limit_deadline_and_progress_hold_on_the_native_path() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&src), "16M"]);
    qemu_io(&src, &["write -q -P 0x33 0 8M".to_string()]);
    // 8 MB at 1 MB/s takes 8 s; the budget is 1 s: the copy stops on time.
    let ctl = Control::new().with_deadline(knib_core::Deadline::after(std::time::Duration::from_secs(1)));
    let opts =
        CopyOptions { rate_limit_mbps: 1, compression: Some(CompressionType::Zstd), threads: 1, ..Default::default() };
    let out = d.path().join("out.qcow2");
    let e = copy_image(&src, &out, &opts, &ctl, &mut |_| Ok(())).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    // Progress reaches 100% and never goes back.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let ctl = Control::new().with_progress(std::sync::Arc::new(move |p: &knib_core::Progress| {
        s2.lock().unwrap().push(p.percent);
    }));
    copy_image(&src, &out, &CopyOptions::default(), &ctl, &mut |_| Ok(())).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.last().copied(), Some(100.0), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_same(&out, &src);
}

/// Every way of writing an output (written behind, the default; O_DIRECT;
/// plain buffered) gives the same bytes, for qcow2 (plain and compressed)
/// and raw outputs. Written behind or directly, a 300 MiB output is not
/// left in the page cache; written buffered it is (so the measure can see
/// it), but for a compressed image, which is hashed by reading it back:
/// that read drops what it read, whatever the mode. The files are under the target directory, a disk file system
/// (tmpfs would keep every page).
#[test]
fn every_write_mode_writes_the_same_bytes_and_write_behind_leaves_the_cache_clean() {
    use knib_core::qcow2::WriteMode;
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let raw = d.path().join("src.raw");
    let src = d.path().join("src.qcow2");
    // 384 MiB of disk: random runs of 1 to 8 MiB, a third of them holes.
    let mut rng = Rng::new(18);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&raw).unwrap();
        let mut left = 384 * M;
        while left > 0 {
            let n = ((1 + rng.below(8)) * M).min(left);
            if rng.below(3) == 0 {
                f.write_all(&vec![0u8; n as usize]).unwrap();
            } else {
                f.write_all(&rng.bytes(n as usize)).unwrap();
            }
            left -= n;
        }
    }
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", p(&raw), p(&src)]);
    std::fs::remove_file(&raw).unwrap();
    for (name, format, comp) in [
        ("qcow2", TargetFormat::Qcow2, None),
        ("zstd", TargetFormat::Qcow2, Some(CompressionType::Zstd)),
        ("raw", TargetFormat::Raw, None),
    ] {
        let mut hashes = Vec::new();
        for mode in [WriteMode::Behind, WriteMode::Direct, WriteMode::Buffered] {
            let out = d.path().join(format!("{name}-{mode:?}.out"));
            // A raw output's hash is read back (and its pages dropped):
            // the test reads it itself, after looking at the cache.
            let hash = format == TargetFormat::Qcow2;
            let opts =
                CopyOptions { format, compression: comp, hash, threads: 2, write_mode: mode, ..Default::default() };
            let r = copy_image(&src, &out, &opts, &Control::new(), &mut |_| Ok(()))
                .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
            let cached = cache::resident(&out);
            let data = std::fs::metadata(&out).unwrap().len();
            if mode == WriteMode::Buffered && comp.is_none() {
                assert!(cached > 200 * M, "{name} {mode:?}: only {cached} of {data} bytes cached");
            } else {
                // At most the header the copy patches at the end, and a
                // chunk's pages that another raw writer's span left.
                assert!(cached <= 16 * M, "{name} {mode:?}: {cached} of {data} bytes left in the cache");
            }
            assert_same(&out, &src);
            if format == TargetFormat::Qcow2 {
                assert_clean(&out);
                hashes.push(r.hash.clone().expect("hashed"));
            } else {
                hashes.push(hash_files(std::slice::from_ref(&out), &Control::new()).unwrap());
            }
            std::fs::remove_file(&out).unwrap();
        }
        assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{name}: {hashes:?}");
    }
}

#[path = "qcow2_write/merge.rs"]
mod merge;

/// A crafted header can give an image a virtual size in the petabytes
/// with almost nothing mapped (qcow2 allows 2 EiB: 2^40 guest clusters of
/// 2 MiB). The native copy used to resolve every guest cluster twice (the
/// plan, then the read): for the 16 PiB here, 2^33 clusters, hours of work
/// on hostile input, stopped only by a deadline. It now steps over the L1
/// ranges without an L2 table in every layer it reads; the copies (a delta
/// with its data, zero and unmapped ranges, and the chain flattened over a
/// shorter backing file, which reads zeros past its end) hold exactly what
/// qemu reads. The deadline turns the old behaviour into a failure (a
/// Timeout) rather than a hung test; it is not a speed bound. (16 PiB, not
/// 2 EiB: qemu-img's own compare and map take minutes per image there.)
#[test]
fn a_huge_sparse_image_is_copied_by_its_l1_table() {
    const E: u64 = 1 << 53;
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", p(&base), "64M"]);
    qemu_io(&base, &["write -q -P 0x11 0 8M".to_string(), "write -q -P 0x22 62M 2M".to_string()]);
    create_2m_over(&top, "base.qcow2", "16P");
    let end = 2 * E;
    qemu_io(
        &top,
        &[
            "write -q -P 0x5a 2M 2M".to_string(),
            "write -q -z 4M 2M".to_string(),
            format!("write -q -P 0x6b {} 2M", E),
            format!("write -q -z {} 2M", E + (1 << 45)),
            format!("write -q -P 0x7c {} 4M", end - 4 * M),
        ],
    );
    let ctl = || Control::new().with_deadline(knib_core::Deadline::after(std::time::Duration::from_secs(120)));
    for (name, mode, backing) in [("delta", SourceMode::Top, Some("base.qcow2")), ("flat", SourceMode::Chain, None)] {
        let out = d.path().join(format!("{name}.qcow2"));
        let opts = CopyOptions {
            mode,
            backing: backing.map(|b| BackingRef { name: b.to_string(), format: "qcow2".into() }),
            hash: true,
            threads: 2,
            ..Default::default()
        };
        let r = copy_image(&top, &out, &opts, &ctl(), &mut |_| Ok(()))
            .unwrap_or_else(|e| panic!("{name} copy of the 16 PiB image: {e}"));
        assert_clean(&out);
        assert_same(&out, &top);
        // Data: the top's four clusters; flattened, also the base's
        // clusters 0, 3 and 31 (its 1 and 2 are the top's data and zero).
        let data = if mode == SourceMode::Top { 4 } else { 7 };
        assert_eq!(r.summary.data_clusters, data, "{name}: {r:?}");
        let info = info(&out);
        assert_eq!(info["virtual-size"].as_u64(), Some(end), "{name}");
    }
}

/// A qcow2 image of 2 MiB clusters at `file`, of `size`, over the qcow2
/// file `backing` (named relative to it).
fn create_2m_over(file: &Path, backing: &str, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "-b", backing, "-F", "qcow2", p(file), size]);
}

/// The same huge top over a shorter middle layer, copied above the base
/// (as a delta over VM snapshots is): past the middle layer's end the chain
/// reads zeros, so the copy writes zero clusters where its backing file
/// (the base) could show through, and nothing past the base's end, where
/// the output reads zeros anyway. Before, every cluster past the middle
/// layer's end (2^33 here) was read through the chain and written as data:
/// the deadline turns that into a failure, as above.
#[test]
fn a_huge_top_over_a_shorter_layer_is_copied_above_its_base() {
    const E: u64 = 1 << 53;
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let mid = d.path().join("mid.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", p(&base), "64M"]);
    qemu_io(&base, &["write -q -P 0x11 0 64M".to_string()]);
    create_2m_over(&mid, "base.qcow2", "32M");
    qemu_io(&mid, &["write -q -P 0x22 30M 2M".to_string()]);
    create_2m_over(&top, "mid.qcow2", "16P");
    qemu_io(
        &top,
        &[
            "write -q -P 0x5a 2M 2M".to_string(),
            "write -q -P 0x5b 40M 2M".to_string(),
            format!("write -q -P 0x6b {E} 2M"),
        ],
    );
    let ctl = Control::new().with_deadline(knib_core::Deadline::after(std::time::Duration::from_secs(120)));
    let out = d.path().join("above.qcow2");
    let opts = CopyOptions {
        mode: SourceMode::Above(1),
        backing: Some(BackingRef { name: "base.qcow2".into(), format: "qcow2".into() }),
        hash: true,
        ..Default::default()
    };
    let r = copy_image(&top, &out, &opts, &ctl, &mut |_| Ok(()))
        .unwrap_or_else(|e| panic!("copy above the base of the 16 PiB image: {e}"));
    assert_clean(&out);
    assert_same(&out, &top);
    // Data: the top's three clusters and the middle layer's one; zero
    // clusters: the base's 32M to 64M that the middle layer ends before,
    // but the one the top writes (16 clusters of 2M, one of them data).
    assert_eq!((r.summary.data_clusters, r.summary.zero_clusters), (4, 15), "{r:?}");
}

/// The compression's read-back (`check_output`) accepts every correct
/// copy, on both data paths: seeded chains 1 to 3 deep (clusters of 512
/// bytes, 4 KiB and 64 KiB; odd virtual sizes; upper layers larger than
/// their backing file; zero writes, discards, compressed clusters in the
/// base), and a version 2 top (zlib, through qemu-img whatever the path).
/// qemu-img lays out what it copies its own way (64 KiB clusters whatever
/// the source's, zeros past the backing file left to it, a partial last
/// cluster copied whole): its copies are compared by guest bytes. Each
/// compressed copy compares equal to its source with `qemu-img compare`.
#[test]
fn a_compression_read_back_accepts_every_correct_copy() {
    use knib_core::engine::{compress, CompressOptions, DataPath};
    let q = knib_core::qemu_img::QemuImg::new();
    let mut v2_done = false;
    for seed in 0..9u64 {
        let d = tempfile::tempdir().unwrap();
        let cs = [512, 4 * K, 64 * K][(seed % 3) as usize];
        let depth = 1 + (seed / 3) as usize;
        let size = 3 * M + seed * 7 * 512 + if seed % 2 == 0 { 0 } else { 40 * K };
        let g = generate(d.path(), seed + 0x5100, depth, size, cs, (seed % 4 == 1).then_some("zstd"));
        let top = g.top().to_path_buf();
        if seed == 8 {
            // A version 2 top: its zero clusters become data first.
            let (ok, text) = run(None, "qemu-img", &["amend", "-f", "qcow2", "-o", "compat=0.10", p(&top)]);
            assert!(ok, "amend: {text}");
            assert_eq!(info(&top)["format-specific"]["data"]["compat"].as_str(), Some("0.10"));
            v2_done = true;
        }
        for path in [DataPath::QemuImg, DataPath::Native] {
            let tag = format!("seed {seed}, clusters of {cs}, depth {depth}, {}", path.as_str());
            let opts = CompressOptions { data_path: path, check_output: true, coroutines: 2, ..Default::default() };
            let done = compress(&q, std::slice::from_ref(&top), &opts, &Control::new())
                .unwrap_or_else(|e| panic!("{tag}: {e}"));
            assert_same(&done[0].comp_path, &top);
            std::fs::remove_file(&done[0].comp_path).unwrap();
        }
    }
    assert!(v2_done);
}

/// On the qemu-img data path the read-back compares guest bytes through
/// the backup's chain: a backing file found damaged meanwhile (every L1
/// entry of the base given reserved bits, once qemu-img has written the
/// copy) fails as that file's damage (`corrupt`, naming it), not as a
/// faulty copy (`internal`, which a compression job retries); the file
/// compressed is left as it was and no copy is left behind. Seeded: the
/// source's clusters (512 bytes, 4 KiB) are smaller than the copy's, so
/// blocks the top owns part of are read partly from the base.
#[test]
fn the_qemu_img_path_s_read_back_keeps_a_damaged_backing_file_s_error() {
    use knib_core::engine::{compress, CompressOptions, DataPath};
    use std::os::unix::fs::FileExt;
    let q = knib_core::qemu_img::QemuImg::new();
    for seed in 0..2u64 {
        let d = tempfile::tempdir().unwrap();
        let cs = [512, 4 * K][seed as usize];
        let g = generate(d.path(), seed + 0x5200, 2, 3 * M, cs, None);
        let (base, top) = (g.files[0].clone(), g.top().to_path_buf());
        let before = std::fs::read(&top).unwrap();
        let tmp = top.with_file_name(format!(".{}.comp.part", top.file_name().unwrap().to_string_lossy()));
        let at = format!("qemu-img wrote {}", tmp.display());
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let opts = CompressOptions { data_path: DataPath::QemuImg, check_output: true, ..Default::default() };
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                assert!(knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)), "no pause");
                let img = Qcow2Image::open(&base).unwrap();
                let (l1, n) = (img.header().l1_table_offset, img.header().l1_size as u64);
                drop(img);
                let f = std::fs::OpenOptions::new().read(true).write(true).open(&base).unwrap();
                for i in 0..n {
                    let mut e = [0u8; 8];
                    f.read_exact_at(&mut e, l1 + 8 * i).unwrap();
                    f.write_all_at(&(u64::from_be_bytes(e) | 1).to_be_bytes(), l1 + 8 * i).unwrap();
                }
                knib_core::crashpoint::release_pause(&at);
            });
            compress(&q, std::slice::from_ref(&top), &opts, &Control::new()).unwrap_err()
        });
        let tag = format!("seed {seed}, clusters of {cs}");
        assert_eq!(e.kind, ErrorKind::Corrupt, "{tag}: {e}");
        assert!(e.message.contains(p(&base)) && e.message.contains("has reserved bits set"), "{tag}: {e}");
        assert!(!e.message.contains("does not read back"), "{tag}: {e}");
        assert_eq!(std::fs::read(&top).unwrap(), before, "{tag}: the file compressed changed");
        let left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.iter().any(|n| n.contains(".comp")), "{tag}: left {left:?}");
    }
}

/// A flattened copy over a sparse raw backing file (a template) reads the
/// file's data, not its holes: 2 GiB of holes around 200,000 bytes of data
/// (one block at its very end), under a top with two clusters of its own,
/// copied plain, compressed and as a raw restore; each compares equal to
/// the source, the check reading it back passes, and the bytes read are the
/// data's clusters, not the file's size. Before, every cluster of the raw
/// file was read (2 GiB) and its zeros dropped. Copied as one delta over
/// another backing file (with data where the raw file has holes), the holes
/// are written as zeros: the delta still reads as the source.
#[test]
fn a_flattened_copy_over_a_sparse_raw_file_reads_its_data_only() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let raw_path = d.path().join("base.raw");
    let raw = std::fs::File::create(&raw_path).unwrap();
    raw.set_len(2 << 30).unwrap();
    raw.write_all_at(&[7u8; 200_000], 300 << 20).unwrap();
    raw.write_all_at(&[9u8; 4096], 5 << 20).unwrap();
    raw.write_all_at(&[3u8; 4096], (2 << 30) - 4096).unwrap();
    raw.sync_all().unwrap();
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", p(&raw_path), p(&top)]);
    qemu_io(&top, &["write -q -P 1 5M 64k".to_string(), "write -q -P 2 700M 64k".to_string()]);
    for (format, compression) in
        [(TargetFormat::Qcow2, None), (TargetFormat::Qcow2, Some(CompressionType::Zstd)), (TargetFormat::Raw, None)]
    {
        let out = d.path().join("out");
        let check_output = format == TargetFormat::Qcow2;
        let opts = CopyOptions { mode: SourceMode::Chain, format, compression, check_output, ..Default::default() };
        let r = copy_image(&top, &out, &opts, &Control::new(), &mut |_| Ok(())).unwrap();
        assert_same(&out, &top);
        assert!(r.bytes_read <= 16 * M, "{format:?} {compression:?}: {} bytes read", r.bytes_read);
        std::fs::remove_file(&out).unwrap();
    }
    let other = d.path().join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&other), "2G"]);
    qemu_io(&other, &["write -q -P 0x55 0 8M".to_string(), "write -q -P 0x56 400M 1M".to_string()]);
    let out = d.path().join("delta.qcow2");
    let opts = CopyOptions {
        mode: SourceMode::Above(1),
        backing: Some(BackingRef { name: "other.qcow2".into(), format: "qcow2".into() }),
        check_output: true,
        ..Default::default()
    };
    copy_image(&top, &out, &opts, &Control::new(), &mut |_| Ok(())).unwrap();
    assert_same(&out, &top);
}

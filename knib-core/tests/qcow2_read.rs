//! The native qcow2 reader against the real qemu-img: images made with
//! qemu-img and qemu-io (seeded random data, zero and discarded regions,
//! compressed clusters, v2 and v3, 64 KiB and 2 MiB clusters, odd sizes,
//! backing chains with relative names, raw and shorter backing files) are
//! read whole through `Chain` and compared byte for byte with
//! `qemu-img convert -O raw`; cluster states are compared with
//! `qemu-img map`. Then damaged and unsupported images: each must fail with
//! a clear error, never panic.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/gen.rs"]
mod gen;
use gen::{random_ops, sources, Rng, K};

use knib_core::qcow2::{Chain, ClusterState, Qcow2Image};
use knib_core::ErrorKind;

const M: u64 = 1024 * 1024;

fn run_in(dir: Option<&Path>, program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?}: {text}{err}");
    text
}

fn qemu_img(args: &[&str]) -> String {
    run_in(None, "qemu-img", args)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Create a qcow2 image (`opts`: `-o` options, may be empty).
fn create(path: &Path, size: u64, opts: &str) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(path), &size]);
    qemu_img(&args);
}

/// Create an overlay of `path` on `backing` (a name relative to `path`'s
/// directory, as stored).
fn overlay(path: &Path, backing: &str, backing_fmt: &str, size: Option<u64>, opts: &str) {
    let size = size.map(|s| s.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(p(path));
    if let Some(s) = &size {
        args.push(s);
    }
    run_in(path.parent(), "qemu-img", &args);
}

/// Run qemu-io commands on a (stopped) qcow2 image, in one process.
fn qemu_io(path: &Path, cmds: &[String]) {
    for chunk in cmds.chunks(200) {
        let mut args = vec!["-f", "qcow2"];
        for c in chunk {
            args.extend(["-c", c.as_str()]);
        }
        args.push(p(path));
        let out = run_in(None, "qemu-io", &args);
        assert!(!out.contains("error") && !out.contains("failed"), "qemu-io on {}: {out}", path.display());
    }
}

/// The guest-visible content of `img` (with its backing chain), by qemu-img.
fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("reference.raw");
    qemu_img(&["convert", "-U", "-O", "raw", p(img), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// The guest-visible content of `img` through `Chain`, read in chunks of
/// random sizes (some tiny, some over several clusters).
fn native_raw(img: &Path, rng: &mut Rng) -> Vec<u8> {
    let mut chain = Chain::open(img).unwrap_or_else(|e| panic!("open {}: {e}", img.display()));
    let size = chain.virtual_size();
    let mut out = vec![0xa5u8; size as usize];
    let mut pos = 0u64;
    while pos < size {
        let len = if rng.below(4) == 0 { 1 + rng.below(5000) } else { 1 + rng.below(3 * M) }.min(size - pos);
        chain.read_at(pos, &mut out[pos as usize..(pos + len) as usize]).unwrap_or_else(|e| panic!("read: {e}"));
        pos += len;
    }
    out
}

/// Read `img` natively and through qemu-img; they must match byte for byte.
fn compare(img: &Path, rng: &mut Rng) {
    let want = qemu_raw(img);
    let got = native_raw(img, rng);
    assert_eq!(got.len(), want.len(), "{}: virtual size", img.display());
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i} (native {:#04x}, qemu-img {:#04x})", img.display(), got[i], want[i]);
    }
}

/// How many clusters of each kind `check_map` saw.
#[derive(Debug, Default)]
struct Kinds {
    unallocated: u64,
    zero: u64,
    data: u64,
    compressed: u64,
}

/// Compare `cluster_state` of the top image with `qemu-img map`.
fn check_map(img: &Path) -> Kinds {
    let json = qemu_img(&["map", "-U", "--output=json", "-f", "qcow2", p(img)]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let mut top = Qcow2Image::open(img).unwrap();
    let cs = top.cluster_size();
    let mut kinds = Kinds::default();
    let mut seen = std::collections::HashSet::new();
    for e in &entries {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let depth = e["depth"].as_u64().unwrap();
        let present = e["present"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        let data = e["data"].as_bool().unwrap();
        let offset = e.get("offset").and_then(|o| o.as_u64());
        for c in start / cs..(start + length).div_ceil(cs) {
            let state = top.cluster_state(c).unwrap();
            let ok = match state {
                _ if depth > 0 || !present => state == ClusterState::Unallocated,
                ClusterState::Data { host_offset } => {
                    data && offset.map(|o| o as i128 + (c * cs) as i128 - start as i128) == Some(host_offset as i128)
                }
                ClusterState::Compressed { .. } => data && offset.is_none(),
                ClusterState::Zero => zero && !data,
                ClusterState::Unallocated => false,
            };
            assert!(ok, "{}: cluster {c} is {state:?}, qemu-img map says {e}", img.display());
            if seen.insert(c) {
                match state {
                    ClusterState::Unallocated => kinds.unallocated += 1,
                    ClusterState::Zero => kinds.zero += 1,
                    ClusterState::Data { .. } => kinds.data += 1,
                    ClusterState::Compressed { .. } => kinds.compressed += 1,
                }
            }
        }
    }
    assert_eq!(seen.len() as u64, top.guest_clusters(), "{}: map covers every cluster", img.display());
    kinds
}

/// A temporary directory for one test.
fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn v3_64k_mixed_clusters() {
    let dir = tempdir();
    let mut rng = Rng::new(1);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    let img = dir.path().join("v3.qcow2");
    let size = 24 * M + 12345;
    create(&img, size, "");
    qemu_io(&img, &random_ops(&mut rng, size, 64 * K, 120, &srcs, true));
    compare(&img, &mut rng);
    let kinds = check_map(&img);
    assert!(kinds.unallocated > 0 && kinds.zero > 0 && kinds.data > 0 && kinds.compressed > 0, "{kinds:?}");
}

/// An L1 table of six chunks (12 000 entries with 512-byte clusters; the
/// reader holds four chunks of 2048 at a time): reads in a seeded random
/// order, each a few clusters to a few hundred KiB, over the whole disk
/// and across chunk boundaries, return what qemu-img reads; so does a
/// sequential read of the whole image and the map of every cluster.
#[test]
fn an_l1_table_read_in_chunks_in_any_order() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir();
    let mut rng = Rng::new(0x11c4);
    let srcs = sources(dir.path(), &mut rng, 64 * K);
    let img = dir.path().join("small-clusters.qcow2");
    let size = 12_000 * 32 * K - 777;
    create(&img, size, "cluster_size=512");
    qemu_io(&img, &random_ops(&mut rng, size, 512, 400, &srcs, true));
    let reference = img.with_extension("reference.raw");
    qemu_img(&["convert", "-U", "-O", "raw", p(&img), p(&reference)]);
    let reference = std::fs::File::open(&reference).unwrap();
    let mut chain = Chain::open(&img).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for _ in 0..3000 {
        let at = rng.below(size);
        let most = if rng.below(2) == 0 { 4 * K } else { 300 * K };
        let len = (1 + rng.below(most)).min(size - at) as usize;
        got.resize(len, 0xa5);
        want.resize(len, 0x5a);
        chain.read_at(at, &mut got).unwrap();
        reference.read_exact_at(&mut want, at).unwrap();
        assert!(got == want, "{len} bytes at {at} differ from qemu-img's");
    }
    drop(reference);
    compare(&img, &mut rng);
    let kinds = check_map(&img);
    assert!(kinds.data > 0 && kinds.compressed > 0 && kinds.zero > 0, "{kinds:?}");
}

#[test]
fn v2_64k_mixed_clusters() {
    let dir = tempdir();
    let mut rng = Rng::new(2);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    let img = dir.path().join("v2.qcow2");
    let size = 16 * M + 777;
    create(&img, size, "compat=0.10");
    qemu_io(&img, &random_ops(&mut rng, size, 64 * K, 100, &srcs, true));
    assert_eq!(Qcow2Image::open(&img).unwrap().header().version, 2);
    compare(&img, &mut rng);
    let kinds = check_map(&img);
    assert!(kinds.unallocated > 0 && kinds.data > 0 && kinds.compressed > 0, "{kinds:?}");
}

#[test]
fn v3_2m_clusters_odd_size() {
    let dir = tempdir();
    let mut rng = Rng::new(3);
    let srcs = sources(dir.path(), &mut rng, 4 * M);
    let img = dir.path().join("big.qcow2");
    let size = 40 * M + 3;
    create(&img, size, "cluster_size=2M");
    // Random ops over the first 30 MiB, compressed clusters after that (one
    // partly overwritten, and the short last cluster).
    let mut ops = random_ops(&mut rng, 30 * M, 2 * M, 16, &srcs, true);
    let (zsrc, psrc) = (srcs[2].display(), srcs[0].display());
    ops.extend([
        format!("write -q -c -s {zsrc} {} {}", 32 * M, 2 * M),
        format!("write -q -c -P 0x42 {} {}", 36 * M, 2 * M),
        format!("write -q -s {psrc} {} 5000", 36 * M + 1000),
        format!("write -q -c -s {zsrc} {} 512", 40 * M),
    ]);
    qemu_io(&img, &ops);
    assert_eq!(Qcow2Image::open(&img).unwrap().cluster_size(), 2 * M);
    compare(&img, &mut rng);
    let kinds = check_map(&img);
    assert!(kinds.unallocated > 0 && kinds.data > 0 && kinds.compressed >= 2, "{kinds:?}");
    // The same, all compressed with zstd (2 MiB frames).
    let zstd = dir.path().join("big-zstd.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M,compression_type=zstd", p(&img), p(&zstd)]);
    compare(&zstd, &mut rng);
    assert!(check_map(&zstd).compressed > 2);
}

#[test]
fn compressed_images_zlib_zstd_v2() {
    let dir = tempdir();
    let mut rng = Rng::new(4);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    let src = dir.path().join("src.qcow2");
    let size = 12 * M + 4321;
    create(&src, size, "");
    qemu_io(&src, &random_ops(&mut rng, size, 64 * K, 100, &srcs, false));
    for (name, opts) in [
        ("zlib.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
        ("v2c.qcow2", "compat=0.10"),
        ("zstd32k.qcow2", "compression_type=zstd,cluster_size=32k"),
    ] {
        let out = dir.path().join(name);
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", opts, p(&src), p(&out)]);
        compare(&out, &mut rng);
        let kinds = check_map(&out);
        assert!(kinds.compressed > 0 && kinds.unallocated > 0, "{name}: {kinds:?}");
    }
    let zstd = Qcow2Image::open(&dir.path().join("zstd.qcow2")).unwrap();
    assert_eq!(zstd.header().compression_type, knib_core::qcow2::CompressionType::Zstd);
}

#[test]
fn two_deep_chain_relative_name() {
    let dir = tempdir();
    let mut rng = Rng::new(5);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let size = 16 * M + 100;
    create(&base, size, "");
    qemu_io(&base, &random_ops(&mut rng, size, 64 * K, 80, &srcs, true));
    overlay(&top, "base.qcow2", "qcow2", None, "");
    qemu_io(&top, &random_ops(&mut rng, size, 64 * K, 80, &srcs, true));
    let chain = Chain::open(&top).unwrap();
    assert_eq!(chain.depth(), 2);
    assert_eq!(chain.top().header().backing_file.as_deref(), Some("base.qcow2"));
    compare(&top, &mut rng);
    let kinds = check_map(&top);
    assert!(kinds.unallocated > 0 && kinds.zero > 0 && kinds.data > 0, "{kinds:?}");
}

#[test]
fn three_deep_chain_shorter_backing_in_other_directories() {
    let dir = tempdir();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut rng = Rng::new(6);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    // base (v2, 8 MiB + 1000) <- ../base.qcow2 mid (12 MiB + 5) <- mid.qcow2 top (20 MiB + 333)
    let base = dir.path().join("base.qcow2");
    let mid = sub.join("mid.qcow2");
    let top = sub.join("top.qcow2");
    create(&base, 8 * M + 1000, "compat=0.10");
    qemu_io(&base, &random_ops(&mut rng, 8 * M + 1000, 64 * K, 60, &srcs, true));
    overlay(&mid, "../base.qcow2", "qcow2", Some(12 * M + 5), "");
    qemu_io(&mid, &random_ops(&mut rng, 12 * M + 5, 64 * K, 60, &srcs, true));
    overlay(&top, "mid.qcow2", "qcow2", Some(20 * M + 333), "");
    // Leave much of the top unallocated, so reads fall through to short backings.
    qemu_io(&top, &random_ops(&mut rng, 20 * M + 333, 64 * K, 30, &srcs, false));
    assert_eq!(Chain::open(&top).unwrap().depth(), 3);
    compare(&top, &mut rng);
    check_map(&top);
    // The same content, compressed, on the same backing.
    let topc = sub.join("topc.qcow2");
    run_in(
        Some(&sub),
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "topc.qcow2"],
    );
    assert_eq!(qemu_raw(&topc), qemu_raw(&top));
    compare(&topc, &mut rng);
    let kinds = check_map(&topc);
    assert!(kinds.compressed > 0 && kinds.unallocated > 0, "{kinds:?}");
    // A depth limit below the chain's depth.
    let e = Chain::open_with_depth(&top, 2).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("deeper than 2"), "{e}");
}

/// Make the backing format extension of `img` an unknown one, so that the
/// backing file's format has to be probed.
fn forget_backing_format(img: &Path) {
    let mut data = std::fs::read(img).unwrap();
    let at = data[..4096].windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).expect("backing format extension");
    data[at..at + 4].copy_from_slice(&[0x00, 0x00, 0x0f, 0x0f]);
    std::fs::write(img, data).unwrap();
}

#[test]
fn raw_backing_files_and_probing() {
    let dir = tempdir();
    let mut rng = Rng::new(7);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, rng.bytes((5 * M + 1001) as usize)).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.raw", "raw", Some(8 * M), "");
    qemu_io(&top, &random_ops(&mut rng, 8 * M, 64 * K, 40, &srcs, true));
    compare(&top, &mut rng);
    let chain = Chain::open(&top).unwrap();
    assert!(matches!(chain.backing(), [knib_core::qcow2::Layer::Raw(r)] if r.virtual_size() == 5 * M + 1001));
    // No backing format named: probed as raw.
    let want = native_raw(&top, &mut rng);
    forget_backing_format(&top);
    assert_eq!(Chain::open(&top).unwrap().top().header().backing_format, None);
    assert!(native_raw(&top, &mut rng) == want);
    // ... and as qcow2.
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&raw), p(&mid)]);
    let top2 = dir.path().join("top2.qcow2");
    overlay(&top2, "mid.qcow2", "qcow2", None, "");
    qemu_io(&top2, &random_ops(&mut rng, 5 * M + 1001, 64 * K, 20, &srcs, false));
    let want = qemu_raw(&top2);
    forget_backing_format(&top2);
    let chain = Chain::open(&top2).unwrap();
    assert!(matches!(chain.backing(), [knib_core::qcow2::Layer::Qcow2(_)]));
    assert!(native_raw(&top2, &mut rng) == want);
}

/// A backing file of another format QEMU probes (made by qemu-img), its
/// format not recorded in the overlay: QEMU reads it as that format, so
/// the reader refuses it as invalid input naming the file and the format
/// (what the callers leave to qemu-img: the native copy's refusal says
/// so), never as raw. Before, it was read as raw: the other format's
/// metadata as the guest's bytes.
#[test]
fn backing_files_of_other_formats_are_not_probed_as_raw() {
    let dir = tempdir();
    for format in ["vmdk", "qed", "vdi", "vhdx", "vpc", "parallels"] {
        let base = dir.path().join(format!("base.{format}"));
        qemu_img(&["create", "-q", "-f", format, p(&base), "4M"]);
        run_in(None, "qemu-io", &["-f", format, "-c", "write -q -P 66 0 64k", p(&base)]);
        let top = dir.path().join(format!("top-{format}.qcow2"));
        overlay(&top, &format!("base.{format}"), format, None, "");
        forget_backing_format(&top);
        assert_eq!(Qcow2Image::open(&top).unwrap().header().backing_format, None);
        // QEMU probes the format and reads the data.
        let chain = qemu_img(&["info", "-U", "--backing-chain", "--output=json", p(&top)]);
        assert!(chain.contains(&format!("\"format\": \"{format}\"")), "{format}: {chain}");
        assert!(qemu_raw(&top)[..64 * K as usize].iter().all(|&b| b == 66), "{format}: qemu-img reads the data");
        let words = [p(&base), p(&top), format, "no format recorded", "only qcow2 and raw"];
        expect_err(Chain::open(&top), INVALID, &words);
        expect_err(Chain::open_files_only(&top), INVALID, &[p(&base), format]);
        let mode = knib_core::qcow2::SourceMode::Chain;
        let why = knib_core::engine::native::native_refusal(&top, mode).unwrap();
        assert!(why.is_some_and(|w| w.contains(p(&base)) && w.contains(format)), "{format}: copied natively");
    }
}

#[test]
fn dirty_image_reads_and_reports_dirty() {
    let dir = tempdir();
    let img = dir.path().join("dirty.qcow2");
    create(&img, 4 * M, "lazy_refcounts=on");
    // qemu-io's abort leaves the image as a crash would: marked dirty.
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0x33 100k 300k", "-c", "abort", p(&img)])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let image = Qcow2Image::open(&img).unwrap();
    assert!(image.is_dirty() && image.header().is_dirty());
    compare(&img, &mut Rng::new(8));
}

// ---- damaged and unsupported images ----

fn expect_err<T>(r: knib_core::Result<T>, kinds: &[ErrorKind], needles: &[&str]) {
    let Err(e) = r else { panic!("expected an error containing {needles:?}") };
    assert!(kinds.contains(&e.kind), "{e}: kind not in {kinds:?}");
    for n in needles {
        assert!(e.message.contains(n), "{e}: does not contain {n:?}");
    }
}

const CORRUPT: &[ErrorKind] = &[ErrorKind::Corrupt];
const INVALID: &[ErrorKind] = &[ErrorKind::InvalidInput];

/// A small v3 image with data in its first clusters; returns its path and bytes.
fn sample(dir: &Path, name: &str, opts: &str) -> (PathBuf, Vec<u8>) {
    let img = dir.join(name);
    create(&img, 4 * M, opts);
    qemu_io(&img, &["write -q -P 7 0 200k".to_string(), "write -q -c -P 9 1M 64k".to_string()]);
    let bytes = std::fs::read(&img).unwrap();
    (img, bytes)
}

fn write_patched(path: &Path, bytes: &[u8], at: usize, value: &[u8]) {
    let mut b = bytes.to_vec();
    b[at..at + value.len()].copy_from_slice(value);
    std::fs::write(path, b).unwrap();
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn damaged_headers_and_tables_are_refused() {
    let dir = tempdir();
    let (_, good) = sample(dir.path(), "good.qcow2", "");
    let bad = dir.path().join("bad.qcow2");
    let name = p(&bad);
    let open = || Qcow2Image::open(&bad);

    std::fs::write(&bad, &good[..50]).unwrap();
    expect_err(open(), CORRUPT, &[name, "truncated header"]);
    std::fs::write(&bad, &good[..90]).unwrap();
    expect_err(open(), CORRUPT, &[name, "truncated header"]);
    write_patched(&bad, &good, 0, b"QFI\x00");
    expect_err(open(), INVALID, &[name, "bad magic"]);
    expect_err(Chain::open(&bad), INVALID, &[name, "bad magic"]);
    write_patched(&bad, &good, 20, &30u32.to_be_bytes());
    expect_err(open(), INVALID, &[name, "cluster_bits 30"]);
    write_patched(&bad, &good, 32, &1u32.to_be_bytes());
    expect_err(open(), INVALID, &[name, "encrypted"]);
    write_patched(&bad, &good, 40, &(1u64 << 40).to_be_bytes());
    expect_err(open(), CORRUPT, &[name, "L1 table", "outside the file"]);
    write_patched(&bad, &good, 36, &u32::MAX.to_be_bytes());
    expect_err(open(), CORRUPT, &[name, "L1 table", "over the limit"]);
    write_patched(&bad, &good, 36, &0u32.to_be_bytes());
    expect_err(open(), CORRUPT, &[name, "L1 table has 0 entries"]);

    // An L2 entry pointing past the end of the file.
    let l1 = be64(&good, 40) as usize;
    let l2 = (be64(&good, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    assert!(l2 > 0);
    let past = (good.len() as u64).next_multiple_of(65536) + 10 * 65536;
    write_patched(&bad, &good, l2 + 8, &(past | 1 << 63).to_be_bytes());
    expect_err(open().unwrap().cluster_state(1), CORRUPT, &[name, "guest cluster 1", "past the end of the file"]);
    let mut buf = vec![0u8; 4096];
    expect_err(Chain::open(&bad).unwrap().read_at(65536, &mut buf), CORRUPT, &[name, "past the end of the file"]);
    // Guest cluster 0 is still readable.
    Chain::open(&bad).unwrap().read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7));

    // A compressed descriptor (guest cluster 16, at 1 MiB) with the largest
    // sector count, its data near the end of the file.
    let entry = be64(&good, l2 + 16 * 8);
    assert_ne!(entry & (1 << 62), 0, "guest cluster 16 is compressed");
    let huge = (1u64 << 62) | (0xff << 54) | (good.len() as u64 - 1000);
    write_patched(&bad, &good, l2 + 16 * 8, &huge.to_be_bytes());
    expect_err(open().unwrap().cluster_state(16), CORRUPT, &[name, "compressed data", "past the end of the file"]);
    // ... or pointing into garbage.
    let junk = (1u64 << 62) | (3 << 54) | (l1 as u64 + 8);
    write_patched(&bad, &good, l2 + 16 * 8, &junk.to_be_bytes());
    expect_err(Chain::open(&bad).unwrap().read_at(M, &mut buf), CORRUPT, &[name, "compressed cluster"]);
}

/// Two L2 entries naming the same compressed data with different sector
/// counts: the first decompresses, the second is cut short. QEMU fails the
/// second read (EIO); so does knib, whichever is read first. Before, the
/// decompressed cluster was cached by offset alone, and the second entry
/// read the first one's bytes.
#[test]
fn one_compressed_offset_with_two_lengths_reads_each_as_its_entry_says() {
    let dir = tempdir();
    let mut rng = Rng::new(11);
    // Two clusters of half random, half zero bytes: compressed to about half.
    let raw = dir.path().join("src.raw");
    let half: Vec<u8> = rng.bytes(32 * K as usize);
    let cluster = [half.as_slice(), &[0u8; 32 * K as usize]].concat();
    std::fs::write(&raw, cluster.repeat(2)).unwrap();
    let img = dir.path().join("short.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", p(&raw), p(&img)]);
    let good = std::fs::read(&img).unwrap();
    let l1 = be64(&good, 40) as usize;
    let l2 = (be64(&good, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&good, l2);
    assert_ne!(entry & (1 << 62), 0, "guest cluster 0 is compressed");
    // 64 KiB clusters: the sector count (less one) is bits 54..62.
    let sectors = ((entry >> 54) & 0xff) + 1;
    assert!(sectors > 4, "the compressed data takes {sectors} sectors");
    // Guest cluster 1: the same offset, one sector.
    let short = entry & !(0xff << 54);
    write_patched(&img, &good, l2 + 8, &short.to_be_bytes());
    let qemu_read = |off: u64| {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("read -q 0 {off}"), "-c", &format!("read -q {off} 64k"), p(&img)])
            .output()
            .unwrap()
    };
    let out = qemu_read(0);
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "qemu-io reads cluster 0: {out:?}");
    let out = String::from_utf8_lossy(&qemu_read(64 * K).stdout).to_string();
    assert!(out.contains("read failed: Input/output error"), "qemu-io fails cluster 1 after cluster 0: {out}");

    let mut buf = vec![0u8; 64 * K as usize];
    let mut chain = Chain::open(&img).unwrap();
    chain.read_at(0, &mut buf).unwrap();
    assert!(buf == cluster, "guest cluster 0 reads its data");
    expect_err(chain.read_at(64 * K, &mut buf), CORRUPT, &[p(&img), "guest cluster 1", "compressed cluster"]);
    // The other way round, and again.
    let mut chain = Chain::open(&img).unwrap();
    expect_err(chain.read_at(64 * K, &mut buf), CORRUPT, &[p(&img), "guest cluster 1", "compressed cluster"]);
    chain.read_at(0, &mut buf).unwrap();
    assert!(buf == cluster, "guest cluster 0 reads its data");
    expect_err(chain.read_at(64 * K, &mut buf), CORRUPT, &[p(&img), "guest cluster 1", "compressed cluster"]);
    let mut image = Qcow2Image::open(&img).unwrap();
    let ClusterState::Compressed { host_offset, compressed_len } = image.cluster_state(0).unwrap() else {
        panic!("guest cluster 0 is not compressed")
    };
    assert!(image.read_compressed(0, host_offset, compressed_len).unwrap() == cluster.as_slice());
    let ClusterState::Compressed { host_offset: at, compressed_len: short_len } = image.cluster_state(1).unwrap()
    else {
        panic!("guest cluster 1 is not compressed")
    };
    assert_eq!(at, host_offset);
    assert!(short_len < compressed_len);
    expect_err(image.read_compressed(1, at, short_len).map(|_| ()), CORRUPT, &["guest cluster 1"]);
}

#[test]
fn unsupported_features_are_refused() {
    let dir = tempdir();
    let img = dir.path().join("ext_l2.qcow2");
    create(&img, 4 * M, "extended_l2=on");
    expect_err(Qcow2Image::open(&img), INVALID, &[p(&img), "extended L2"]);
    let img = dir.path().join("datafile.qcow2");
    create(&img, 4 * M, &format!("data_file={}", dir.path().join("data.raw").display()));
    expect_err(Qcow2Image::open(&img), INVALID, &[p(&img), "external data file"]);
    let img = dir.path().join("luks.qcow2");
    // qemu-img's PBKDF benchmark often fails on this kind of machine ("Unable
    // to get accurate CPU usage"): retry, and in the end mark a plain image
    // as LUKS-encrypted (crypt_method 2) instead.
    let opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    let made = (0..8).any(|_| {
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=knib", "-o", opts, p(&img), "4M"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !made {
        let (_, plain) = sample(dir.path(), "plain.qcow2", "");
        write_patched(&img, &plain, 32, &2u32.to_be_bytes());
    }
    expect_err(Qcow2Image::open(&img), INVALID, &[p(&img), "encrypted", "LUKS"]);
}

#[test]
fn backing_loops_missing_files_and_past_end_reads() {
    let dir = tempdir();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create(&b, 4 * M, "");
    overlay(&a, "b.qcow2", "qcow2", None, "");
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b)]);
    expect_err(Chain::open(&a), CORRUPT, &["backing chain loops", "a.qcow2 -> ", "b.qcow2 -> "]);
    // Itself.
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&a)]);
    expect_err(Chain::open(&a), CORRUPT, &["backing chain loops"]);
    // Through a hard link to itself.
    std::fs::hard_link(&a, dir.path().join("a-link.qcow2")).unwrap();
    qemu_img(&["rebase", "-u", "-b", "a-link.qcow2", "-F", "qcow2", p(&a)]);
    expect_err(Chain::open(&a), CORRUPT, &["backing chain loops", "a-link.qcow2"]);
    // A missing backing file.
    qemu_img(&["rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", p(&a)]);
    expect_err(Chain::open(&a), &[ErrorKind::NotFound], &["gone.qcow2"]);
    // An unsupported backing format.
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "vmdk", p(&a)]);
    expect_err(Chain::open(&a), INVALID, &["vmdk"]);
    // Reads past the virtual size.
    let c = dir.path().join("c.qcow2");
    create(&c, 4 * M + 1, "");
    let mut chain = Chain::open(&c).unwrap();
    let size = chain.virtual_size();
    assert_eq!(size, 4 * M + 512, "qemu-img rounds sizes up to 512 bytes");
    let mut buf = [0u8; 2];
    expect_err(chain.read_at(size - 1, &mut buf), INVALID, &["past the virtual size"]);
    expect_err(chain.read_at(u64::MAX - 1, &mut buf), INVALID, &["past the virtual size"]);
    chain.read_at(size - 1, &mut buf[..1]).unwrap();
    chain.read_at(size, &mut []).unwrap();
    expect_err(chain.top_mut().cluster_state(65), INVALID, &["past the virtual size"]);
}

/// The parts of `img`'s guest range that hold data in some layer of its
/// chain, as `qemu-img map` says (`"data": true`), merged.
fn mapped_data(img: &Path) -> Vec<(u64, u64)> {
    let json = qemu_img(&["map", "-U", "--output=json", "-f", "qcow2", p(img)]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in entries.iter().filter(|e| e["data"].as_bool().unwrap()) {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l)),
        }
    }
    out
}

/// `ranges` clipped to `offset..offset + len`.
fn clip(ranges: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .filter_map(|&(s, l)| {
            let (a, b) = (s.max(offset), (s + l).min(offset + len));
            (a < b).then(|| (a, b - a))
        })
        .collect()
}

/// `Chain::data_ranges` says which parts of a chain hold data as
/// `qemu-img map` does (data and compressed clusters; not zero clusters,
/// unallocated ones, nor what lies past a shorter backing file), for the
/// whole disk and for seeded sub-ranges: on chains of 64 KiB and 2 MiB
/// clusters written at random, and on a sparse 1 TiB chain whose few data
/// clusters lie far apart (its tables are mostly empty L1 ranges), and
/// over a raw backing file.
#[test]
fn data_ranges_are_the_data_qemu_img_map_reports() {
    let dir = tempdir();
    let mut rng = Rng::new(18);
    let srcs = sources(dir.path(), &mut rng, 256 * K);
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, 24 * M + 4096, "");
    qemu_io(&base, &random_ops(&mut rng, 24 * M + 4096, 64 * K, 80, &srcs, true));
    overlay(&mid, "base.qcow2", "qcow2", Some(40 * M), "cluster_size=2M");
    qemu_io(&mid, &random_ops(&mut rng, 40 * M, 2 * M, 20, &srcs, false));
    overlay(&top, "mid.qcow2", "qcow2", Some(48 * M), "cluster_size=32k");
    qemu_io(&top, &random_ops(&mut rng, 48 * M, 32 * K, 40, &srcs, false));
    // A sparse 1 TiB chain: data far apart, a zero cluster hiding data below.
    const T: u64 = 1 << 40;
    let (sbase, stop) = (dir.path().join("sbase.qcow2"), dir.path().join("stop.qcow2"));
    create(&sbase, T, "");
    let far: Vec<String> =
        [0, 300 << 30, (700 << 30) + 12345, T - 100 * K].iter().map(|o| format!("write -q -P 7 {o} 100k")).collect();
    qemu_io(&sbase, &far);
    overlay(&stop, "sbase.qcow2", "qcow2", None, "");
    qemu_io(&stop, &[format!("write -q -z {} 64k", 300 << 30), format!("write -q -P 9 {} 1", 512 << 30)]);
    // A raw backing file (written whole: qemu-img map says a hole of a
    // sparse one holds no data, where knib counts a raw layer as data).
    let (raw, rtop) = (dir.path().join("raw.img"), dir.path().join("rtop.qcow2"));
    std::fs::write(&raw, rng.bytes((8 * M + 512) as usize)).unwrap();
    overlay(&rtop, "raw.img", "raw", Some(16 * M), "");
    qemu_io(&rtop, &random_ops(&mut rng, 16 * M, 64 * K, 30, &srcs, false));
    // knib's ranges are whole clusters of the chain's smallest size (the
    // grain), qemu-img's end where a shorter backing file ends.
    let cases = [
        (&base, 24 * M + 4096, 64 * K),
        (&mid, 40 * M, 64 * K),
        (&top, 48 * M, 32 * K),
        (&stop, T, 64 * K),
        (&rtop, 16 * M, 64 * K),
    ];
    for (img, size, grain) in cases {
        let mut expected: Vec<(u64, u64)> = Vec::new();
        for (s, l) in mapped_data(img) {
            let (a, b) = (s / grain * grain, (s + l).div_ceil(grain).saturating_mul(grain).min(size));
            match expected.last_mut() {
                Some(last) if last.0 + last.1 >= a => last.1 = b - last.0,
                _ => expected.push((a, b - a)),
            }
        }
        assert!(!expected.is_empty());
        let mut chain = Chain::open(img).unwrap();
        assert_eq!(chain.data_ranges(0, size).unwrap(), expected, "{}", img.display());
        for _ in 0..20 {
            let offset = rng.below(size);
            let len = 1 + rng.below(size - offset);
            assert_eq!(
                chain.data_ranges(offset, len).unwrap(),
                clip(&expected, offset, len),
                "{} at {offset} for {len}",
                img.display()
            );
        }
    }
}

// ---- Memory and time bounds against crafted tables ----

/// A 32 TiB image (64 KiB clusters) whose 65536 L1 entries all name one
/// L2 table of zeros, refcounts consistent (`qemu-img check` finds nothing
/// wrong): each range maps nothing, and each scan steps over it in one go,
/// in milliseconds. They walked it cluster by cluster: 2^29 lookups, over a
/// minute each here (with 2 MiB clusters and a 2 PiB size, 2^40: hours).
#[test]
fn l1_entries_naming_one_l2_table_of_zeros_are_stepped_over() {
    let d = tempdir();
    let path = d.path().join("zeros.qcow2");
    let cs = 1u64 << 16;
    let l1_size = 1u64 << 16; // 512 KiB: host clusters 1 to 8 (a 32 TiB disk)
    let (rt, rb, l2) = (9 * cs, 10 * cs, 11 * cs);
    let mut img = vec![0u8; 12 * cs as usize];
    let wr64 = |img: &mut [u8], at: u64, v: u64| img[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    let wr32 = |img: &mut [u8], at: u64, v: u32| img[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
    img[..4].copy_from_slice(b"QFI\xfb");
    wr32(&mut img, 4, 3);
    wr32(&mut img, 20, 16);
    let size = l1_size * (cs / 8) * cs;
    wr64(&mut img, 24, size);
    wr32(&mut img, 36, l1_size as u32);
    wr64(&mut img, 40, cs);
    wr64(&mut img, 48, rt);
    wr32(&mut img, 56, 1);
    wr32(&mut img, 96, 5); // 32-bit refcounts
    wr32(&mut img, 100, 112);
    for i in 0..l1_size {
        wr64(&mut img, cs + 8 * i, l2);
    }
    wr64(&mut img, rt, rb);
    for c in 0..11 {
        wr32(&mut img, rb + 4 * c, 1);
    }
    wr32(&mut img, rb + 4 * 11, l1_size as u32);
    std::fs::write(&path, &img).unwrap();
    let out = Command::new("qemu-img").args(["check", "-U"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&out.stdout));

    // Not a measure of speed: a bound on walks that took minutes in all
    // (one step per cluster of every range the shared table maps), where
    // stepping over the table takes milliseconds.
    fn within<T>(started: std::time::Instant, what: &str, r: T) -> T {
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(60), "up to {what}: {took:?}");
        r
    }
    let started = std::time::Instant::now();
    let mut top = Qcow2Image::open(&path).unwrap();
    assert!(!within(started, "holds_data", top.holds_data().unwrap()));
    let ctl = knib_core::Control::new();
    assert_eq!(within(started, "first_nonzero_cluster", top.first_nonzero_cluster(&ctl).unwrap()), None);
    let mut chain = Chain::open(&path).unwrap();
    assert_eq!(within(started, "data_ranges", chain.data_ranges(0, size).unwrap()), vec![]);
    let copy = d.path().join("copy.qcow2");
    let opts = knib_core::qcow2::CopyOptions::default();
    within(started, "copy_image", knib_core::qcow2::copy_image(&path, &copy, &opts, &ctl, &mut |_| Ok(())).unwrap());
    assert!(!Qcow2Image::open(&copy).unwrap().holds_data().unwrap());
}

/// A 2 PiB image (2 MiB clusters) over a base, whose first 4095 L1
/// entries name one L2 table holding a single entry, its last (a zero
/// cluster), and whose last names a table holding one compressed cluster
/// (of zeros), also its last: refcounts consistent (`qemu-img check`
/// finds nothing wrong). Every walk steps over the entries of 0 in one
/// go: whether it holds data, the first cluster that is not zeros, its
/// data ranges, its content digest, and the native merge's preparation
/// (which reads every cluster the merge would write). They stepped
/// through every entry of every range: 2^30 lookups, minutes for each
/// walk. (A copy steps over them too, but writes an L2 table for every
/// range, 8 GiB here: its walk is not what takes the time.)
#[test]
fn l1_entries_naming_one_table_with_one_entry_are_walked_by_entry_set() {
    use std::io::Write as _;
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let path = d.path().join("top.qcow2");
    let cs = 2u64 << 20;
    let (l1_size, l2n) = (4096u64, cs / 8);
    let size = l1_size * l2n * cs;
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", p(&base), &size.to_string()]);
    let (l1, rt, rb, shared, own, data) = (cs, 2 * cs, 3 * cs, 4 * cs, 5 * cs, 6 * cs);
    let mut img = vec![0u8; 7 * cs as usize];
    let wr64 = |img: &mut [u8], at: u64, v: u64| img[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    let wr32 = |img: &mut [u8], at: u64, v: u32| img[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
    img[..4].copy_from_slice(b"QFI\xfb");
    wr32(&mut img, 4, 3);
    let backing = b"base.qcow2";
    wr64(&mut img, 8, 128);
    wr32(&mut img, 16, backing.len() as u32);
    img[128..128 + backing.len()].copy_from_slice(backing);
    wr32(&mut img, 20, 21);
    wr64(&mut img, 24, size);
    wr32(&mut img, 36, l1_size as u32);
    wr64(&mut img, 40, l1);
    wr64(&mut img, 48, rt);
    wr32(&mut img, 56, 1);
    wr32(&mut img, 96, 5); // 32-bit refcounts
    wr32(&mut img, 100, 112);
    for i in 0..l1_size - 1 {
        wr64(&mut img, l1 + 8 * i, shared);
    }
    wr64(&mut img, l1 + 8 * (l1_size - 1), own | (1 << 63)); // copied: refcount 1
    wr64(&mut img, shared + 8 * (l2n - 1), 1); // reads as zeros
                                               // One compressed cluster of zeros (raw deflate): offset bits 0-48,
                                               // then the count of 512-byte sectors after the first.
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&vec![0u8; cs as usize]).unwrap();
    let packed = z.finish().unwrap();
    img[data as usize..data as usize + packed.len()].copy_from_slice(&packed);
    let sectors = (packed.len() as u64).div_ceil(512) - 1;
    wr64(&mut img, own + 8 * (l2n - 1), (1 << 62) | (sectors << 49) | data);
    wr64(&mut img, rt, rb);
    for (c, n) in [(0, 1), (1, 1), (2, 1), (3, 1), (4, l1_size as u32 - 1), (5, 1), (6, 1)] {
        wr32(&mut img, rb + 4 * c, n);
    }
    std::fs::write(&path, &img).unwrap();
    let out = Command::new("qemu-img").args(["check", "-U"]).arg(&path).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "qemu-img check: {said}");

    // Not a measure of speed: a bound on walks that took minutes each
    // (one step per entry of every range), where stepping over the
    // entries of 0 takes well under a second in all.
    fn within<T>(started: std::time::Instant, what: &str, r: T) -> T {
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(60), "up to {what}: {took:?}");
        r
    }
    let last = l1_size * l2n - 1;
    let started = std::time::Instant::now();
    let ctl = knib_core::Control::new();
    let mut top = Qcow2Image::open(&path).unwrap();
    assert!(within(started, "holds_data", top.holds_data().unwrap()));
    // The compressed cluster counts as data; zero clusters do not.
    assert_eq!(within(started, "first_nonzero_cluster", top.first_nonzero_cluster(&ctl).unwrap()), Some(last));
    let mut chain = Chain::open(&path).unwrap();
    assert_eq!(within(started, "data_ranges", chain.data_ranges(0, size).unwrap()), vec![(last * cs, cs)]);
    let file = knib_core::qcow2::FileSource::new(std::fs::File::open(&path).unwrap()).unwrap();
    let digest = knib_core::qcow2::image_digest("top", std::sync::Arc::new(file), true, 2, &ctl, "digest");
    assert_eq!(within(started, "image_digest", digest.unwrap()).clusters(), l1_size);
    let prepared = within(started, "Commit::prepare", knib_core::qcow2::Commit::prepare(&path).unwrap());
    assert!(prepared.is_ok(), "{:?}", prepared.err());
}

//! knib-bench: the data-path benchmark (not part of the test suite).
//!
//! ```text
//! cargo run --release -p knib-cli --bin knib-bench -- [--dir DIR] [--size-gib N] [--runs N] [--rows LIST]
//! ```
//!
//! It generates a deterministic disk image (64 KiB clusters; about 35%
//! unallocated or zero, 35% text-like data, 30% random data, in extents of
//! 64 KiB to 4 MiB), a delta with 10% of the clusters rewritten and a third
//! layer with 5% more, then times knib's native data path against qemu-img
//! (and `cp`) on the same files in the same run, alternating the tools, and
//! prints a table: median time, MB/s of allocated data, output size, peak
//! memory (RSS) and the knib/qemu-img ratio. Every timed run ends with its
//! output fsynced (`sync FILE`), whatever the tool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use knib_core::engine::{self, BackupKind, DataPath, TakeBackupRequest, VolumeBackup};
use knib_core::qcow2::{
    copy_image, BackingRef, ClusterState, CompressionType, CopyOptions, FileSink, ImageSpec, Layout, Qcow2Image,
    SourceMode, TargetFormat,
};
use knib_core::qemu_img::QemuImg;
use knib_core::Control;

const CS: u64 = 64 << 10;

mod gen;
use gen::*;

fn qemu_img_ok(args: &[&str]) {
    let st = Command::new("qemu-img").args(args).status().expect("qemu-img runs");
    assert!(st.success(), "qemu-img {args:?}");
}

/// One timed step: a program and its arguments.
type Cmd = Vec<String>;

fn cmd(parts: &[&str]) -> Cmd {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Run the steps of one run (each under /usr/bin/time), then fsync `out`.
/// Returns (seconds, peak RSS in KiB).
fn timed(steps: &[Cmd], out: &Path) -> (f64, u64) {
    let tfile = std::env::temp_dir().join(format!("knib-bench-time-{}", std::process::id()));
    let start = Instant::now();
    let mut rss = 0;
    for s in steps {
        let st = Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&tfile)
            .args(s)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("/usr/bin/time runs (install the `time` package)");
        assert!(st.success(), "{s:?} failed");
        let m: u64 = std::fs::read_to_string(&tfile).unwrap_or_default().trim().lines().last().unwrap_or("0").parse().unwrap_or(0);
        rss = rss.max(m);
    }
    let st = Command::new("sync").arg(out).status().expect("sync runs");
    assert!(st.success());
    (start.elapsed().as_secs_f64(), rss)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

struct Measured {
    secs: f64,
    rss_kib: u64,
    out_bytes: u64,
}

/// Alternate the tools `runs` times; each tool: (steps, output, extra files to remove).
fn compare(runs: usize, tools: &[(&str, Vec<Cmd>, PathBuf, Vec<PathBuf>)]) -> Vec<Measured> {
    let mut times = vec![Vec::new(); tools.len()];
    let mut rss = vec![0u64; tools.len()];
    let mut size = vec![0u64; tools.len()];
    for _ in 0..runs {
        for (t, (name, steps, out, extra)) in tools.iter().enumerate() {
            let _ = std::fs::remove_file(out);
            for e in extra {
                let _ = std::fs::remove_file(e);
            }
            let (s, m) = timed(steps, out);
            eprintln!("  {name}: {s:.2} s, {m} KiB");
            times[t].push(s);
            rss[t] = rss[t].max(m);
            size[t] = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        }
    }
    (0..tools.len()).map(|t| Measured { secs: median(&mut times[t]), rss_kib: rss[t], out_bytes: size[t] }).collect()
}

fn human(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

/// The benchmark's command line.
#[derive(Parser)]
#[command(name = "knib-bench", about = "The data-path benchmark: knib's native data path against qemu-img")]
struct Args {
    /// Work here: the generated images and the outputs of every tool.
    #[arg(long, default_value = "/var/tmp/knib-bench")]
    dir: PathBuf,
    /// Virtual size of the generated disk, in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Timed runs of each tool (the median is shown).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these rows, comma-separated (all when left out).
    #[arg(long, value_delimiter = ',', value_parser = ["compress", "delta", "delta-compressed", "restore", "engine"])]
    rows: Vec<String>,
    #[command(subcommand)]
    op: Option<OpCommand>,
}

#[derive(Subcommand)]
enum OpCommand {
    /// knib's side of one row, run by the benchmark itself under /usr/bin/time.
    #[command(hide = true)]
    Op {
        /// What to run.
        #[arg(value_enum)]
        kind: Op,
        /// Its files: source, destination, then the backing file or parent
        /// (`hash`: the one file).
        #[arg(num_args = 1..=3, required = true)]
        files: Vec<String>,
    },
}

/// The `op` subcommands.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Op {
    Compress,
    Delta,
    DeltaCompressed,
    Restore,
    Hash,
    EngineFull,
    EngineInc,
}

/// knib's side of each row, run under /usr/bin/time.
fn op(kind: Op, args: &[String]) {
    let a = |i: usize| PathBuf::from(&args[i]);
    let ctl = Control::new();
    let mut opts = CopyOptions { hash: false, ..Default::default() };
    match kind {
        Op::Compress => {
            opts.compression = Some(CompressionType::Zstd);
            opts.threads = 8.min(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        }
        Op::Delta | Op::DeltaCompressed => {
            opts.backing = Some(BackingRef { name: args[2].clone(), format: "qcow2".into() });
            opts.hash = true;
            if kind == Op::DeltaCompressed {
                opts.compression = Some(CompressionType::Zstd);
            }
        }
        Op::Restore => {
            opts.mode = SourceMode::Chain;
            opts.format = TargetFormat::Raw;
        }
        Op::Hash => {
            println!("{}", engine::hash_files(&[a(0)], &ctl).expect("hash"));
            return;
        }
        Op::EngineFull | Op::EngineInc => {
            let inc = kind == Op::EngineInc;
            let req = TakeBackupRequest {
                volumes: vec![VolumeBackup {
                    name: "vda".into(),
                    disk: a(0),
                    dest: a(1),
                    parent: inc.then(|| args[2].clone()),
                }],
                kind: if inc { BackupKind::Incremental } else { BackupKind::Full },
                end_of_chain: false,
                data_path: DataPath::Native,
                compress: None,
            };
            engine::take_backup(&QemuImg::new(), &req, &ctl).expect("backup");
            return;
        }
    }
    let r = copy_image(&a(0), &a(1), &opts, &ctl, &mut |_| Ok(())).expect("copy");
    if let Some(h) = r.hash {
        println!("{h}");
    }
}

fn main() {
    let Args { dir, size_gib, runs, rows: only, op: command } = Args::parse();
    if let Some(OpCommand::Op { kind, files }) = command {
        return op(kind, &files);
    }
    std::fs::create_dir_all(&dir).expect("bench directory");
    let me = std::env::current_exe().expect("own path");
    let me = me.to_str().expect("UTF-8 path").to_string();
    let p = |n: &str| dir.join(n);
    let s = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
    let size = size_gib << 30;

    eprintln!("generating a {size_gib} GiB image and its deltas in {}", dir.display());
    let t = Instant::now();
    let mut rng = Rng::new(42);
    let pool = text_pool(&mut rng, 16 << 20);
    let base = gen_layer(&p("disk.qcow2"), size, None, 1, 25, 10, 35, &pool);
    // 10% of the clusters rewritten (half text, half random), then 5% more.
    let delta = gen_layer(&p("delta.qcow2"), size, Some("disk.qcow2"), 2, 90, 0, 5, &pool);
    let delta2 = gen_layer(&p("delta2.qcow2"), size, Some("delta.qcow2"), 3, 95, 0, 3, &pool);
    let st = Command::new("sync").status().expect("sync");
    assert!(st.success());
    for f in ["disk.qcow2", "delta.qcow2", "delta2.qcow2"] {
        qemu_img_ok(&["check", "-q", &s(&p(f))]);
    }
    eprintln!("generated in {:.1} s", t.elapsed().as_secs_f64());
    let alloc = |c: Counts| c.data * CS;
    let base_data = alloc(base);
    let delta_data = alloc(delta);
    // The data the flattened 3-deep chain holds: the topmost allocated
    // state of each cluster.
    let chain_data = {
        let mut layers: Vec<Qcow2Image> =
            ["delta2.qcow2", "delta.qcow2", "disk.qcow2"].iter().map(|f| Qcow2Image::open(&p(f)).expect("open")).collect();
        let mut n = 0;
        for i in 0..size / CS {
            for l in layers.iter_mut() {
                match l.cluster_state(i).expect("state") {
                    ClusterState::Unallocated => continue,
                    ClusterState::Zero => {}
                    _ => n += 1,
                }
                break;
            }
        }
        n * CS
    };
    eprintln!(
        "base: {} of data, {} zero clusters; delta: {} of data; delta2: {} of data",
        human(base_data),
        base.zero,
        human(delta_data),
        human(alloc(delta2))
    );

    let mut rows: Vec<String> = Vec::new();
    let row = |rows: &mut Vec<String>, what: &str, tool: &str, m: &Measured, data: u64, ratio: &str| {
        rows.push(format!(
            "| {what} | {tool} | {:.2} | {:.0} | {} | {:.0} | {ratio} |",
            m.secs,
            data as f64 / 1e6 / m.secs,
            human(m.out_bytes),
            m.rss_kib as f64 / 1024.0
        ));
    };

    let want = |r: &str| only.is_empty() || only.iter().any(|o| o == r);

    // 1. Compress the full image.
    if want("compress") {
    eprintln!("compress the full image");
    let (ko, qo) = (p("c-knib.qcow2"), p("c-qemu.qcow2"));
    let m = compare(
        runs,
        &[
            ("knib", vec![cmd(&[&me, "op", "compress", &s(&p("disk.qcow2")), &s(&ko)])], ko.clone(), vec![]),
            (
                "qemu-img",
                vec![cmd(&[
                    "qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-m", "8", "-W", "-O", "qcow2",
                    &s(&p("disk.qcow2")), &s(&qo),
                ])],
                qo.clone(),
                vec![],
            ),
        ],
    );
    let speed = m[1].secs / m[0].secs;
    let bigger = m[0].out_bytes as f64 / m[1].out_bytes as f64 - 1.0;
    row(&mut rows, "compress full image (zstd)", "knib", &m[0], base_data, &format!("{speed:.2}x faster, output {:+.2}% (target >= 1.5x, <= +2%)", bigger * 100.0));
    row(&mut rows, "", "qemu-img convert -c -m 8 -W", &m[1], base_data, "");
    let _ = std::fs::remove_file(&ko);
    let _ = std::fs::remove_file(&qo);

    }

    // 2. Back up the delta: copy with backing pointer + hash.
    if want("delta") {
    eprintln!("back up the delta (copy + hash)");
    let (ko, qo, co) = (p("d-knib.qcow2"), p("d-qemu.qcow2"), p("d-cp.qcow2"));
    let m = compare(
        3 * runs,
        &[
            ("knib", vec![cmd(&[&me, "op", "delta", &s(&p("delta.qcow2")), &s(&ko), "disk.qcow2"])], ko.clone(), vec![]),
            (
                "qemu-img+hash",
                vec![
                    cmd(&[
                        "qemu-img", "convert", "-m", "8", "-W", "-O", "qcow2", "-B", "disk.qcow2", "-F", "qcow2",
                        &s(&p("delta.qcow2")), &s(&qo),
                    ]),
                    cmd(&[&me, "op", "hash", &s(&qo)]),
                ],
                qo.clone(),
                vec![],
            ),
            (
                "qemu-img",
                vec![cmd(&[
                    "qemu-img", "convert", "-m", "8", "-W", "-O", "qcow2", "-B", "disk.qcow2", "-F", "qcow2",
                    &s(&p("delta.qcow2")), &s(&qo),
                ])],
                qo.clone(),
                vec![],
            ),
            ("cp", vec![cmd(&["cp", &s(&p("delta.qcow2")), &s(&co)])], co.clone(), vec![]),
        ],
    );
    row(
        &mut rows,
        "back up the delta (copy + xxh3-128)",
        "knib (hash in the same pass)",
        &m[0],
        delta_data,
        &format!(
            "{:.2}x qemu-img+hash, {:.2}x qemu-img alone (target >= 1.0x), {:.2}x cp (target >= 0.8x)",
            m[1].secs / m[0].secs,
            m[2].secs / m[0].secs,
            m[3].secs / m[0].secs
        ),
    );
    row(&mut rows, "", "qemu-img convert -m 8 -W -B + hash pass", &m[1], delta_data, "");
    row(&mut rows, "", "qemu-img convert -m 8 -W -B (no hash)", &m[2], delta_data, "");
    row(&mut rows, "", "cp (no hash)", &m[3], delta_data, "");
    for f in [&ko, &qo, &co] {
        let _ = std::fs::remove_file(f);
    }

    }

    // 3. Back up the delta compressed, in one pass.
    if want("delta-compressed") {
    eprintln!("back up the delta compressed");
    let (ko, qt, qo) = (p("dc-knib.qcow2"), p("dc-tmp.qcow2"), p("dc-qemu.qcow2"));
    let m = compare(
        3 * runs,
        &[
            (
                "knib",
                vec![cmd(&[&me, "op", "delta-compressed", &s(&p("delta.qcow2")), &s(&ko), "disk.qcow2"])],
                ko.clone(),
                vec![],
            ),
            (
                "qemu-img x2",
                vec![
                    cmd(&[
                        "qemu-img", "convert", "-m", "8", "-W", "-O", "qcow2", "-B", "disk.qcow2", "-F", "qcow2",
                        &s(&p("delta.qcow2")), &s(&qt),
                    ]),
                    cmd(&[
                        "qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-m", "8", "-W", "-O", "qcow2",
                        "-B", "disk.qcow2", "-F", "qcow2", &s(&qt), &s(&qo),
                    ]),
                ],
                qo.clone(),
                vec![qt.clone()],
            ),
        ],
    );
    row(
        &mut rows,
        "back up the delta compressed (zstd)",
        "knib (one pass, + hash)",
        &m[0],
        delta_data,
        &format!("{:.2}x the time (target <= 0.6x)", m[0].secs / m[1].secs),
    );
    row(&mut rows, "", "qemu-img convert, then convert -c", &m[1], delta_data, "");
    for f in [&ko, &qt, &qo] {
        let _ = std::fs::remove_file(f);
    }

    }

    // 4. Restore a 3-deep chain to raw.
    if want("restore") {
    eprintln!("restore a 3-deep chain to raw");
    let (ko, qo) = (p("r-knib.raw"), p("r-qemu.raw"));
    let m = compare(
        runs,
        &[
            ("knib", vec![cmd(&[&me, "op", "restore", &s(&p("delta2.qcow2")), &s(&ko)])], ko.clone(), vec![]),
            ("qemu-img", vec![cmd(&["qemu-img", "convert", "-O", "raw", &s(&p("delta2.qcow2")), &s(&qo)])], qo.clone(), vec![]),
        ],
    );
    row(
        &mut rows,
        "restore a 3-deep chain to raw",
        "knib",
        &m[0],
        chain_data,
        &format!("{:.2}x faster (target >= 1.0x)", m[1].secs / m[0].secs),
    );
    row(&mut rows, "", "qemu-img convert -O raw", &m[1], chain_data, "");
    for f in [&ko, &qo] {
        let _ = std::fs::remove_file(f);
    }

    }

    // 5. Through the engine: a full backup of the disk, then an incremental
    // one with 1% of the clusters changed.
    if want("engine") {
    eprintln!("engine: full and incremental backups");
    let mut full_t = Vec::new();
    let mut inc_t = Vec::new();
    let (mut full_rss, mut inc_rss) = (0, 0);
    let (mut full_size, mut inc_size) = (0, 0);
    let vm = p("vm");
    for run in 0..3 * runs {
        let _ = std::fs::remove_dir_all(&vm);
        std::fs::create_dir_all(vm.join("store")).expect("vm dir");
        let disk = vm.join("vda.qcow2");
        let st = Command::new("cp").arg("--sparse=always").arg(p("disk.qcow2")).arg(&disk).status().expect("cp");
        assert!(st.success());
        // The copy is setup: flushed now, not by the first fsync timed.
        let st = Command::new("sync").arg(&disk).status().expect("sync");
        assert!(st.success());
        let full = vm.join("store").join("full.qcow2");
        let (t, m) = timed(&[cmd(&[&me, "op", "engine-full", &s(&disk), &s(&full)])], &full);
        eprintln!("  full: {t:.2} s");
        full_t.push(t);
        full_rss = full_rss.max(m);
        full_size = std::fs::metadata(&full).map(|m| m.len()).unwrap_or(0);
        // 1% of the clusters: extents of 64 KiB to 1 MiB written by qemu-io.
        let mut rng = Rng::new(100 + run as u64);
        let target = size / CS / 100;
        let mut written = 0;
        let mut io = vec!["-f".to_string(), "qcow2".to_string()];
        while written < target {
            let n = (1 + rng.below(16)).min(target - written);
            let at = rng.below(size / CS - n);
            io.push("-c".into());
            io.push(format!("write -q -P {} {} {}", 1 + rng.below(250), at * CS, n * CS));
            written += n;
        }
        io.push(s(&disk));
        let st = Command::new("qemu-io").args(&io).status().expect("qemu-io");
        assert!(st.success());
        let inc = vm.join("store").join("inc.qcow2");
        let (t, m) = timed(&[cmd(&[&me, "op", "engine-inc", &s(&disk), &s(&inc), "full.qcow2"])], &inc);
        eprintln!("  incremental: {t:.2} s");
        inc_t.push(t);
        inc_rss = inc_rss.max(m);
        inc_size = std::fs::metadata(&inc).map(|m| m.len()).unwrap_or(0);
    }
    let _ = std::fs::remove_dir_all(&vm);
    let full = Measured { secs: median(&mut full_t), rss_kib: full_rss, out_bytes: full_size };
    let inc = Measured { secs: median(&mut inc_t), rss_kib: inc_rss, out_bytes: inc_size };
    row(
        &mut rows,
        "engine: incremental backup, 1% changed",
        "knib take_backup",
        &inc,
        size / 100,
        &format!("{:.1}% of the full backup's time (target <= 5%)", inc.secs / full.secs * 100.0),
    );
    row(&mut rows, "engine: full backup of the same disk", "knib take_backup", &full, base_data, "");
    }

    println!("| row | tool | median s | MB/s of data | output | peak RSS MiB | knib vs the others |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
    println!(
        "{runs} runs per tool (alternating; {} for the delta and engine rows), median shown; every run ends \
         with its output fsynced.",
        3 * runs
    );
    println!(
        "Data: {} in the image ({} virtual), {} in the delta, {} in the third layer.",
        human(base_data),
        human(size),
        human(delta_data),
        human(alloc(delta2))
    );
}

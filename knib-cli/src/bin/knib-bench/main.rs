//! knib-bench: the data-path benchmark (not part of the test suite).
//!
//! ```text
//! cargo run --release -p knib-cli --bin knib-bench -- [--dir DIR] [--size-gib N] [--big-gib N] [--runs N] [--rows LIST] [--json]
//! cargo run -p knib-cli --bin knib-bench -- --size-mib 64 --runs 1     (a check of the benchmark itself)
//! ```
//!
//! It generates a deterministic disk image (64 KiB clusters; about 35%
//! unallocated or zero, 35% text-like data, 30% random data, in extents of
//! 64 KiB to 4 MiB), a delta with 10% of the clusters rewritten and a third
//! layer with 5% more (and, for the rows that need them, five more layers
//! for an 8-deep chain, and a larger disk with the same data and the same
//! delta; for the `compress-files` row, an image of real files: the first
//! --size-gib of a tar of the machine's `/usr`, which differs from machine
//! to machine), then times knib's native data path against what a user would
//! run instead (qemu-img, `cp`) on the same files in the same run,
//! alternating the tools, and prints a table: median wall time, median CPU
//! time, MB/s of allocated data, output size, peak memory (RSS), the
//! machine's load and stolen CPU during the row, and the ratios. Every
//! tool runs as a child process (knib as `knib-bench op ...`) under
//! `/usr/bin/time` (peak RSS), reaped with `wait4` (CPU time); every timed
//! run ends with its output fsynced (`sync FILE`), whatever the tool. The
//! live row (a running domain, against virtnbdbackup) needs root and
//! libvirt; the vault rows (a sync to S3 and a restore from it, against
//! `cp` into a local store and a restore from it) need an S3 server
//! (`KNIB_S3_ENDPOINT`). A row (and the run) during which the machine was
//! busy is marked noisy, and its ratios are printed as such; so is the
//! whole run on a VM whose balloon reports free memory to its host (the
//! message says how to turn that off for the run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use knib_core::engine::BackupMethod;
use knib_core::engine::{self, BackupKind, DataPath, TakeBackupRequest, VolumeBackup};
use knib_core::qcow2::{
    copy_image, BackingRef, ClusterState, CompressionType, CopyOptions, FileSink, ImageSpec, Layout, Qcow2Image,
    SourceMode, TargetFormat,
};
use knib_core::qemu_img::QemuImg;
use knib_core::Control;
use serde_json::json;

const CS: u64 = 64 << 10;

/// `qemu-img convert` writing a compressed qcow2 as a user would run it
/// (zstd, 8 coroutines, out-of-order writes): the arguments before the
/// backing options and the files.
const QEMU_IMG_COMPRESSED: [&str; 10] =
    ["qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-m", "8", "-W", "-O", "qcow2"];

mod gen;
mod live;
mod measure;
mod vault;
use gen::*;
use measure::*;

fn ok(c: &mut Command) {
    let st = c.status().unwrap_or_else(|e| panic!("{c:?} does not run: {e}"));
    assert!(st.success(), "{c:?} failed");
}

fn qemu_img_ok(args: &[&str]) {
    ok(Command::new("qemu-img").args(args));
}

/// The compression row on `src`: knib against one `qemu-img convert -c`,
/// wall time, CPU and output size.
fn compress_row(res: &mut Results, runs: usize, me: &str, src: &Path, dir: &Path, data: u64, label: &str) {
    let (ko, qo) = (dir.join("c-knib.qcow2"), dir.join("c-qemu.qcow2"));
    let (src_s, qo_s) = (s(src), s(&qo));
    let (m, env) = compare(
        runs,
        &[
            Tool::new("knib", vec![cmd(&[me, "op", "compress", &src_s, &s(&ko)])], &ko),
            Tool::new("qemu-img", vec![cmd(&[&QEMU_IMG_COMPRESSED[..], &[&src_s, &qo_s]].concat())], &qo),
        ],
    );
    let speed = m[1].secs / m[0].secs;
    let bigger = m[0].out_bytes as f64 / m[1].out_bytes as f64 - 1.0;
    res.row(
        label,
        env,
        data,
        format!(
            "{speed:.2}x faster (target >= 2.0x), {:.2}x the CPU (target <= 0.5x), output {:+.2}% (target <= +1%)",
            m[0].cpu / m[1].cpu,
            bigger * 100.0
        ),
        &[("knib", m[0]), ("qemu-img convert -c -m 8 -W", m[1])],
    );
    for f in [&ko, &qo] {
        let _ = std::fs::remove_file(f);
    }
}

/// A qcow2 image of real files, which knib's authors did not generate: the
/// first `size` bytes of a tar of this machine's `/usr` (programs,
/// libraries, documentation), in whole clusters. Its path and its bytes of
/// data.
fn files_image(dir: &Path, size: u64) -> (PathBuf, u64) {
    let (raw, img) = (dir.join("files.raw"), dir.join("files.qcow2"));
    let out = std::fs::File::create(&raw).expect("files.raw");
    let mut tar = Command::new("tar")
        .args(["-cf", "-", "--one-file-system", "-C", "/", "usr"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tar");
    let mut from = tar.stdout.take().expect("tar's output");
    let mut to = std::io::BufWriter::new(out);
    let n = std::io::copy(&mut std::io::Read::take(&mut from, size), &mut to).expect("tar of /usr");
    drop(from);
    let _ = tar.kill();
    let _ = tar.wait();
    let data = n / CS * CS;
    to.into_inner().expect("files.raw").set_len(data).expect("files.raw");
    assert!(data > 0, "the tar of /usr is empty");
    qemu_img_ok(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&img)]);
    let _ = std::fs::remove_file(&raw);
    ok(&mut Command::new("sync"));
    (img, data)
}

fn human(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

const ROWS: [&str; 14] = [
    "compress",
    "compress-files",
    "delta",
    "delta-compressed",
    "restore",
    "engine",
    "engine-compressed",
    "delta-big",
    "engine-big",
    "chain8",
    "live",
    "live-bitmap",
    "vault-sync",
    "vault-restore",
];

/// The benchmark's command line.
#[derive(Parser)]
#[command(name = "knib-bench", about = "The data-path benchmark: knib's native data path against qemu-img and cp")]
struct Args {
    /// Work here: the generated images and the outputs of every tool.
    #[arg(long, default_value = "/var/tmp/knib-bench")]
    dir: PathBuf,
    /// Virtual size of the generated disk, in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Virtual size of the large disk of the `-big` rows, in GiB (a multiple
    /// of --size-gib): the same data and the same delta, spread over it.
    #[arg(long, default_value_t = 32)]
    big_gib: u64,
    /// Instead of --size-gib and --big-gib: a disk of this many MiB and a
    /// large one 8 times as large, to check the benchmark itself quickly
    /// (its figures mean nothing).
    #[arg(long, conflicts_with_all = ["size_gib", "big_gib"])]
    size_mib: Option<u64>,
    /// Timed runs of each tool (the median is shown; 3 times as many for
    /// the short rows).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these rows, comma-separated (all when left out).
    #[arg(long, value_delimiter = ',', value_parser = ROWS)]
    rows: Vec<String>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    op: Option<OpCommand>,
}

#[derive(Subcommand)]
enum OpCommand {
    /// knib's side of one row, run by the benchmark itself as a child.
    #[command(hide = true)]
    Op {
        /// What to run.
        #[arg(value_enum)]
        kind: Op,
        /// Its files: source, destination, then the backing file or parent
        /// (`hash`: the one file; `vault-sync`: store, vault; `vault-restore`:
        /// vault, backup, destination; `store-restore`: store, backup,
        /// destination).
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
    RestoreQcow2,
    Hash,
    EngineFull,
    EngineInc,
    EngineIncCompressed,
    LiveBackup,
    LiveBackupBitmap,
    VaultSync,
    VaultRestore,
    StoreRestore,
}

/// How many times `--runs` the short rows take (the delta copies, the
/// engine incrementals and the bitmap row, 0.05 to 0.6 s each): their runs
/// spread over more than the gaps to their targets.
const SHORT_ROW_RUNS: usize = 3;

/// knib's side of each row.
fn op(kind: Op, args: &[String]) {
    let a = |i: usize| PathBuf::from(&args[i]);
    let ctl = Control::new();
    let mut opts = CopyOptions { hash: false, ..Default::default() };
    // The ways of writing are compared by setting KNIB_WRITE_MODE for a
    // run, as for knib itself (the rows leave it to the host's default).
    match kind {
        Op::Compress => {
            opts.compression = Some(CompressionType::Zstd);
            opts.threads = 8.min(cores());
            // For experiments (not used by the rows): KNIB_BENCH_THREADS=N.
            if let Some(n) = std::env::var("KNIB_BENCH_THREADS").ok().and_then(|v| v.parse().ok()) {
                opts.threads = n;
            }
            // For experiments: KNIB_BENCH_CHECK=1 reads the output back as a
            // compression with `compression.check_output` does (off by default).
            opts.check_output = std::env::var("KNIB_BENCH_CHECK").is_ok_and(|v| v == "1");
            // KNIB_BENCH_HASH=1: the output hashed as a compression job hashes it.
            opts.hash = std::env::var("KNIB_BENCH_HASH").is_ok_and(|v| v == "1");
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
        Op::RestoreQcow2 => {
            opts.mode = SourceMode::Chain;
            opts.format = TargetFormat::Qcow2;
        }
        Op::Hash => {
            println!("{}", engine::hash_files(&[a(0)], &ctl).expect("hash"));
            return;
        }
        Op::LiveBackup => {
            live::knib_backup(&a(0), &args[1], BackupMethod::Snapshot);
            return;
        }
        Op::LiveBackupBitmap => {
            live::knib_backup(&a(0), &args[1], BackupMethod::Bitmap);
            return;
        }
        Op::VaultSync => return vault::knib_sync(&a(0), &args[1]),
        Op::VaultRestore => {
            // As the knib CLI does (it owns its process).
            knib_core::vault::allow_allocator_tuning();
            return vault::knib_restore_vault(&args[0], &args[1], &a(2));
        }
        Op::StoreRestore => return vault::knib_restore_store(&a(0), &args[1], &a(2)),
        Op::EngineFull | Op::EngineInc | Op::EngineIncCompressed => {
            let inc = kind != Op::EngineFull;
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
                compress: (kind == Op::EngineIncCompressed).then_some(knib_core::qemu_img::CompressionLibrary::Zstd),
                check_output: false,
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

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

/// One line of the results: a tool in a row.
struct Line {
    row: String,
    /// The row's first line (knib's): the one with the row's name, its
    /// ratios and the machine's state in the table.
    first: bool,
    tool: String,
    m: Measured,
    /// Bytes of allocated guest data the row moves (for MB/s).
    data: u64,
    ratio: String,
    env: RowEnv,
}

/// The results so far.
#[derive(Default)]
struct Results {
    lines: Vec<Line>,
    /// Rows skipped, with why.
    skipped: Vec<(String, String)>,
}

impl Results {
    /// Add a row: its tools' lines (the first is knib's), the ratio text on
    /// the first, marked noisy when the row was.
    fn row(&mut self, what: &str, env: RowEnv, data: u64, ratio: String, tools: &[(&str, Measured)]) {
        let ratio = if env.noisy { format!("NOISY ({}): {ratio}", env.why()) } else { ratio };
        for (i, (tool, m)) in tools.iter().enumerate() {
            self.lines.push(Line {
                row: what.to_string(),
                first: i == 0,
                tool: tool.to_string(),
                m: *m,
                data,
                ratio: if i == 0 { ratio.clone() } else { String::new() },
                env,
            });
        }
    }

    fn skip(&mut self, row: &str, why: String) {
        eprintln!("skipping the {row} row: {why}");
        self.skipped.push((row.to_string(), why));
    }
}

/// The state of an engine row before each run: a fresh VM directory with
/// a copy of `src` as its disk; with `changed` > 0, also a knib full
/// backup of it (untimed) and then `changed` clusters written over the
/// disk by qemu-io (extents of 1 to 16 clusters, seeded by the run, so the
/// tools of one run get the same writes).
struct EngineSetup<'a> {
    me: &'a str,
    src: PathBuf,
    vm: PathBuf,
    size: u64,
    changed: u64,
}

impl EngineSetup<'_> {
    fn disk(&self) -> PathBuf {
        self.vm.join("vda.qcow2")
    }
    fn store(&self) -> PathBuf {
        self.vm.join("store")
    }

    fn prepare(&self, run: usize) {
        let _ = std::fs::remove_dir_all(&self.vm);
        std::fs::create_dir_all(self.store()).expect("vm dir");
        let disk = self.disk();
        ok(Command::new("cp").arg("--sparse=always").arg(&self.src).arg(&disk));
        // The copy is setup: flushed now, not by the first fsync timed.
        ok(Command::new("sync").arg(&disk));
        if self.changed == 0 {
            return;
        }
        let full = self.store().join("full.qcow2");
        ok(Command::new(self.me).args(["op", "engine-full", &s(&disk), &s(&full)]));
        let mut rng = Rng::new(100 + run as u64);
        let mut written = 0;
        let mut io = vec!["-f".to_string(), "qcow2".to_string()];
        while written < self.changed {
            let n = (1 + rng.below(16)).min(self.changed - written);
            let at = rng.below(self.size / CS - n);
            io.push("-c".into());
            io.push(format!("write -q -P {} {} {}", 1 + rng.below(250), at * CS, n * CS));
            written += n;
        }
        io.push(s(&disk));
        ok(Command::new("qemu-io").args(&io));
        ok(Command::new("sync").arg(&disk));
    }

    /// The base the disk runs on after [`EngineSetup::prepare`] with
    /// changes (the file knib's incremental backup merges the delta into).
    fn base(&self) -> PathBuf {
        let h = Qcow2Image::open(&self.disk()).expect("open the disk").header().clone();
        let b = h.backing_file.expect("the disk runs on a base after a full backup");
        self.vm.join(b)
    }
}

/// An incremental backup through the engine (copy the delta, merge it into
/// the base) against `qemu-img convert -B` of the delta then `qemu-img
/// commit` of the disk into its base.
fn engine_inc(runs: usize, e: &EngineSetup<'_>, compressed: bool) -> (Vec<Measured>, RowEnv) {
    let prep = |run: usize| e.prepare(run);
    // Once before, to learn the base's name.
    e.prepare(0);
    let base = e.base();
    let (disk, store) = (s(&e.disk()), e.store());
    let (ko, qo) = (store.join("inc.qcow2"), store.join("inc-qemu.qcow2"));
    let kop = if compressed { "engine-inc-compressed" } else { "engine-inc" };
    // The same command without compression: `-c -o compression_type=zstd` left out.
    let mut convert: Vec<&str> = QEMU_IMG_COMPRESSED.to_vec();
    if !compressed {
        convert.drain(2..5);
    }
    let (disk_s, qo_s) = (disk.clone(), s(&qo));
    convert.extend(["-B", "full.qcow2", "-F", "qcow2", &disk_s, &qo_s]);
    compare(
        SHORT_ROW_RUNS * runs,
        &[
            Tool::new("knib", vec![cmd(&[e.me, "op", kop, &disk, &s(&ko), "full.qcow2"])], &ko).setup(&prep),
            Tool::new(
                "qemu-img convert -B, commit",
                vec![cmd(&convert), cmd(&["qemu-img", "commit", "-q", &disk])],
                &qo,
            )
            .sync_also(vec![base, e.disk()])
            .setup(&prep),
        ],
    )
}

fn main() {
    let Args { dir, size_gib, big_gib, size_mib, runs, rows: only, json: as_json, op: command } = Args::parse();
    if let Some(OpCommand::Op { kind, files }) = command {
        // knib's log, for profiling one operation: RUST_LOG=debug.
        let _ = env_logger::Builder::from_default_env().format_timestamp_micros().try_init();
        return op(kind, &files);
    }
    assert!(
        size_gib > 0 && big_gib >= size_gib && big_gib % size_gib == 0,
        "--big-gib ({big_gib}) must be a multiple of --size-gib ({size_gib})"
    );
    let (size, big) = match size_mib {
        Some(m) => (m << 20, 8 * (m << 20)),
        None => (size_gib << 30, big_gib << 30),
    };
    // The disks' sizes as the table names them.
    let (size_name, big_name) = (human(size), human(big));
    let want = |r: &str| only.is_empty() || only.iter().any(|o| o == r);
    let ncores = cores();
    // The run is noisy when the machine is busy before it starts (the load
    // average later includes the benchmark's own work).
    let load_at_start = load1();
    let busy_at_start = load_at_start > LOAD_NOISY_PER_CORE * ncores as f64;
    if busy_at_start {
        eprintln!(
            "the machine is busy: load average {load_at_start:.2} on {ncores} cores (over {LOAD_NOISY_PER_CORE} per core); \
             this run is noisy"
        );
    }
    // A VM that reports its free memory to the host makes whichever tool
    // allocates after another freed memory pay for the host's faults.
    let reporting = free_page_reporting();
    if let Some(r) = reporting {
        eprintln!("{}; this run is noisy", reporting_why(r));
    }
    std::fs::create_dir_all(&dir).expect("bench directory");
    let me = std::env::current_exe().expect("own path");
    let me = me.to_str().expect("UTF-8 path").to_string();
    let p = |n: &str| dir.join(n);

    eprintln!("generating a {size_name} image and its deltas in {}", dir.display());
    let t = Instant::now();
    let mut rng = Rng::new(42);
    let pool = text_pool(&mut rng, 16 << 20);
    let base = gen_layer(&p("disk.qcow2"), size, 1, None, 1, 25, 10, 35, &pool);
    // 10% of the clusters rewritten (half text, half random), then 5% more.
    let delta = gen_layer(&p("delta.qcow2"), size, 1, Some("disk.qcow2"), 2, 90, 0, 5, &pool);
    let delta2 = gen_layer(&p("delta2.qcow2"), size, 1, Some("delta.qcow2"), 3, 95, 0, 3, &pool);
    let mut files = vec!["disk.qcow2", "delta.qcow2", "delta2.qcow2"];
    // The 8-deep chain: five more layers like the third.
    const CHAIN8: [&str; 8] = [
        "disk.qcow2",
        "delta.qcow2",
        "delta2.qcow2",
        "delta3.qcow2",
        "delta4.qcow2",
        "delta5.qcow2",
        "delta6.qcow2",
        "delta7.qcow2",
    ];
    if want("chain8") {
        for i in 3..8 {
            gen_layer(&p(CHAIN8[i]), size, 1, Some(CHAIN8[i - 1]), 1 + i as u64, 95, 0, 3, &pool);
            files.push(CHAIN8[i]);
        }
    }
    // The large disk: the same data, the same delta, spread over it.
    let stride = big / size;
    if want("delta-big") || want("engine-big") {
        gen_layer(&p("big.qcow2"), big, stride, None, 1, 25, 10, 35, &pool);
        gen_layer(&p("big-delta.qcow2"), big, stride, Some("big.qcow2"), 2, 90, 0, 5, &pool);
        files.extend(["big.qcow2", "big-delta.qcow2"]);
    }
    ok(&mut Command::new("sync"));
    for f in &files {
        qemu_img_ok(&["check", "-q", &s(&p(f))]);
    }
    eprintln!("generated in {:.1} s", t.elapsed().as_secs_f64());
    let alloc = |c: Counts| c.data * CS;
    let base_data = alloc(base);
    let delta_data = alloc(delta);
    // The data of a flattened chain (top first): the topmost allocated
    // state of each cluster.
    let chain_data = |top_first: &[&str]| {
        let mut layers: Vec<Qcow2Image> = top_first.iter().map(|f| Qcow2Image::open(&p(f)).expect("open")).collect();
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

    let mut res = Results::default();
    // The knib times of the 4 GiB rows, to compare the large disk's with.
    let mut delta_knib: Option<f64> = None;
    let mut inc_knib: Option<f64> = None;

    // 1. Compress the full image, then an image of this machine's files.
    if want("compress") {
        eprintln!("compress the full image");
        compress_row(&mut res, runs, &me, &p("disk.qcow2"), &dir, base_data, "compress full image (zstd)");
    }
    if want("compress-files") {
        eprintln!("compress an image of this machine's files");
        let (img, data) = files_image(&dir, size);
        let label = format!("compress this machine's files (zstd; the first {} of a tar of /usr)", human(data));
        compress_row(&mut res, runs, &me, &img, &dir, data, &label);
        let _ = std::fs::remove_file(&img);
    }

    // 2. Back up the delta: copy with backing pointer + hash (on the disk
    // of --size-gib, and on the large one with the same delta).
    for (row, top, backing, big_disk) in
        [("delta", "delta.qcow2", "disk.qcow2", false), ("delta-big", "big-delta.qcow2", "big.qcow2", true)]
    {
        if !want(row) {
            continue;
        }
        eprintln!("back up the delta (copy + hash){}", if big_disk { ", large disk" } else { "" });
        let (ko, qo, co) = (p("d-knib.qcow2"), p("d-qemu.qcow2"), p("d-cp.qcow2"));
        let convert = cmd(&[
            "qemu-img",
            "convert",
            "-m",
            "8",
            "-W",
            "-O",
            "qcow2",
            "-B",
            backing,
            "-F",
            "qcow2",
            &s(&p(top)),
            &s(&qo),
        ]);
        let (m, env) = compare(
            SHORT_ROW_RUNS * runs,
            &[
                Tool::new("knib", vec![cmd(&[&me, "op", "delta", &s(&p(top)), &s(&ko), backing])], &ko),
                Tool::new("qemu-img+hash", vec![convert.clone(), cmd(&[&me, "op", "hash", &s(&qo)])], &qo),
                Tool::new("qemu-img", vec![convert], &qo),
                Tool::new("cp", vec![cmd(&["cp", &s(&p(top)), &s(&co)])], &co),
            ],
        );
        let mut ratio = format!(
            "{:.2}x qemu-img+hash, {:.2}x qemu-img alone (target >= 1.0x), {:.2}x cp (target >= 0.8x)",
            m[1].secs / m[0].secs,
            m[2].secs / m[0].secs,
            m[3].secs / m[0].secs
        );
        if big_disk {
            ratio = format!("{big_name} disk, same delta: {ratio}");
            if let Some(t) = delta_knib {
                ratio.push_str(&format!("; knib {:.2}x its time on the {size_name} disk", m[0].secs / t));
            }
        } else {
            delta_knib = Some(m[0].secs);
        }
        res.row(
            if big_disk {
                "back up the delta (copy + xxh3-128), large disk"
            } else {
                "back up the delta (copy + xxh3-128)"
            },
            env,
            delta_data,
            ratio,
            &[
                ("knib (hash in the same pass)", m[0]),
                ("qemu-img convert -m 8 -W -B + hash pass", m[1]),
                ("qemu-img convert -m 8 -W -B (no hash)", m[2]),
                ("cp (no hash)", m[3]),
            ],
        );
        for f in [&ko, &qo, &co] {
            let _ = std::fs::remove_file(f);
        }
    }

    // 3. Back up the delta compressed, in one pass; qemu-img does it in
    // one pass too (`convert -c -B`).
    if want("delta-compressed") {
        eprintln!("back up the delta compressed");
        let (ko, qo) = (p("dc-knib.qcow2"), p("dc-qemu.qcow2"));
        let (m, env) = compare(
            SHORT_ROW_RUNS * runs,
            &[
                Tool::new(
                    "knib",
                    vec![cmd(&[&me, "op", "delta-compressed", &s(&p("delta.qcow2")), &s(&ko), "disk.qcow2"])],
                    &ko,
                ),
                Tool::new(
                    "qemu-img convert -c -B",
                    vec![cmd(&[
                        &QEMU_IMG_COMPRESSED[..],
                        &["-B", "disk.qcow2", "-F", "qcow2", &s(&p("delta.qcow2")), &s(&qo)],
                    ]
                    .concat())],
                    &qo,
                ),
            ],
        );
        res.row(
            "back up the delta compressed (zstd)",
            env,
            delta_data,
            format!(
                "{:.2}x the time, {:.2}x the CPU of one qemu-img pass (knib also hashes)",
                m[0].secs / m[1].secs,
                m[0].cpu / m[1].cpu
            ),
            &[("knib (one pass, + hash)", m[0]), ("qemu-img convert -c -m 8 -W -B", m[1])],
        );
        for f in [&ko, &qo] {
            let _ = std::fs::remove_file(f);
        }
    }

    // 4. Restore a chain: 3 deep to raw; 8 deep to raw and to qcow2.
    let mut restores: Vec<(&str, &[&str], Op, &str)> = Vec::new();
    if want("restore") {
        restores.push(("restore a 3-deep chain to raw", &CHAIN8[..3], Op::Restore, "raw"));
    }
    if want("chain8") {
        restores.push(("restore an 8-deep chain to raw", &CHAIN8[..], Op::Restore, "raw"));
        restores.push(("restore an 8-deep chain to qcow2", &CHAIN8[..], Op::RestoreQcow2, "qcow2"));
    }
    for (what, chain, kind, fmt) in restores {
        eprintln!("{what}");
        let top = chain[chain.len() - 1];
        let (ko, qo) = (p(&format!("r-knib.{fmt}")), p(&format!("r-qemu.{fmt}")));
        let kop = if kind == Op::Restore { "restore" } else { "restore-qcow2" };
        let (m, env) = compare(
            runs,
            &[
                Tool::new("knib", vec![cmd(&[&me, "op", kop, &s(&p(top)), &s(&ko)])], &ko),
                Tool::new("qemu-img", vec![cmd(&["qemu-img", "convert", "-O", fmt, &s(&p(top)), &s(&qo)])], &qo),
            ],
        );
        let top_first: Vec<&str> = chain.iter().rev().copied().collect();
        res.row(
            what,
            env,
            chain_data(&top_first),
            format!(
                "{:.2}x faster, {:.2}x the CPU{}",
                m[1].secs / m[0].secs,
                m[0].cpu / m[1].cpu,
                if chain.len() == 3 { " (target >= 1.0x)" } else { " (target >= 1.2x)" }
            ),
            &[
                ("knib", m[0]),
                (if fmt == "raw" { "qemu-img convert -O raw" } else { "qemu-img convert -O qcow2" }, m[1]),
            ],
        );
        for f in [&ko, &qo] {
            let _ = std::fs::remove_file(f);
        }
    }

    // 5. Through the engine: a full backup of the disk against a plain
    // copy, then an incremental one with 1% of the clusters changed against
    // qemu-img convert -B + commit; on the large disk, the same number of
    // clusters changed.
    if want("engine") {
        eprintln!("engine: full backup");
        let e = EngineSetup { me: &me, src: p("disk.qcow2"), vm: p("vm"), size, changed: 0 };
        let prep = |run: usize| e.prepare(run);
        let (disk, store) = (s(&e.disk()), e.store());
        let (ko, co, qo) = (store.join("full.qcow2"), store.join("full-cp.qcow2"), store.join("full-qemu.qcow2"));
        let (full, full_env) = compare(
            runs,
            &[
                Tool::new("knib", vec![cmd(&[&me, "op", "engine-full", &disk, &s(&ko)])], &ko).setup(&prep),
                Tool::new("cp", vec![cmd(&["cp", &disk, &s(&co)])], &co).setup(&prep),
                Tool::new(
                    "qemu-img",
                    vec![cmd(&["qemu-img", "convert", "-m", "8", "-W", "-O", "qcow2", &disk, &s(&qo)])],
                    &qo,
                )
                .setup(&prep),
            ],
        );
        eprintln!("engine: incremental backup, 1% changed");
        let e = EngineSetup { changed: size / CS / 100, ..e };
        let (inc, inc_env) = engine_inc(runs, &e, false);
        let _ = std::fs::remove_dir_all(&e.vm);
        inc_knib = Some(inc[0].secs);
        res.row(
            "engine: incremental backup, 1% changed",
            inc_env,
            size / 100,
            format!(
                "{:.1}% of the full backup's time (target <= 5%); {:.2}x faster, {:.2}x the CPU of qemu-img convert -B + commit",
                inc[0].secs / full[0].secs * 100.0,
                inc[1].secs / inc[0].secs,
                inc[0].cpu / inc[1].cpu
            ),
            &[("knib take_backup", inc[0]), ("qemu-img convert -m 8 -W -B, then commit", inc[1])],
        );
        res.row(
            "engine: full backup of the same disk",
            full_env,
            base_data,
            format!("{:.2}x cp, {:.2}x qemu-img convert", full[1].secs / full[0].secs, full[2].secs / full[0].secs),
            &[("knib take_backup", full[0]), ("cp", full[1]), ("qemu-img convert -m 8 -W", full[2])],
        );
    }
    if want("engine-compressed") {
        eprintln!("engine: incremental backup compressed, 1% changed");
        let e = EngineSetup { me: &me, src: p("disk.qcow2"), vm: p("vm"), size, changed: size / CS / 100 };
        let (inc, env) = engine_inc(runs, &e, true);
        let _ = std::fs::remove_dir_all(&e.vm);
        res.row(
            "engine: incremental backup compressed (zstd), 1% changed",
            env,
            size / 100,
            format!(
                "{:.2}x the time (target <= 0.6x), {:.2}x the CPU of qemu-img convert -c -B + commit (knib also hashes)",
                inc[0].secs / inc[1].secs,
                inc[0].cpu / inc[1].cpu
            ),
            &[("knib take_backup, one pass", inc[0]), ("qemu-img convert -c -m 8 -W -B, then commit", inc[1])],
        );
    }
    if want("engine-big") {
        eprintln!("engine: incremental backup of the large disk, the same clusters changed");
        let e = EngineSetup { me: &me, src: p("big.qcow2"), vm: p("vm"), size: big, changed: size / CS / 100 };
        let (inc, env) = engine_inc(runs, &e, false);
        let _ = std::fs::remove_dir_all(&e.vm);
        let mut ratio = format!(
            "{big_name} disk, {} changed: {:.2}x faster, {:.2}x the CPU of qemu-img convert -B + commit",
            human(size / 100),
            inc[1].secs / inc[0].secs,
            inc[0].cpu / inc[1].cpu
        );
        if let Some(t) = inc_knib {
            ratio.push_str(&format!("; knib {:.2}x its time on the {size_name} disk", inc[0].secs / t));
        }
        res.row(
            "engine: incremental backup, large disk",
            env,
            size / 100,
            ratio,
            &[("knib take_backup", inc[0]), ("qemu-img convert -m 8 -W -B, then commit", inc[1])],
        );
    }

    // The running domain of the live rows: the disk, 1% of it changed.
    let live_setup = || live::Live {
        me: &me,
        src: p("disk.qcow2"),
        dir: p("live"),
        size,
        changed: size / CS / 100,
        name: format!("knib-bench-{}", std::process::id()),
    };
    // 6. A running domain: knib against virtnbdbackup.
    if want("live") {
        match live::unavailable() {
            Some(why) => res.skip("live", why),
            None => {
                eprintln!("running domain: full backup, then incremental backup, 1% changed");
                let l = live_setup();
                let ((f, fenv), (m, env)) = live::rows(&l, runs);
                res.row(
                    "running domain: full backup",
                    fenv,
                    base_data,
                    format!(
                        "{:.2}x faster (target >= 2.0x), {:.2}x the CPU of virtnbdbackup (the CPU of the backup processes, not QEMU's)",
                        f[1].secs / f[0].secs,
                        f[0].cpu / f[1].cpu
                    ),
                    &[("knib (catalog domain backup)", f[0]), ("virtnbdbackup -l full", f[1])],
                );
                res.row(
                    "running domain: incremental backup, 1% changed",
                    env,
                    size / 100,
                    format!(
                        "{:.2}x faster (target >= 1.5x), {:.2}x the CPU of virtnbdbackup (the CPU of the backup processes, not QEMU's: block commit, NBD export)",
                        m[1].secs / m[0].secs,
                        m[0].cpu / m[1].cpu
                    ),
                    &[("knib (catalog domain backup)", m[0]), ("virtnbdbackup -l inc", m[1])],
                );
            }
        }
    }

    // 6b. A running domain's 1%-changed incremental by bitmap against by
    // snapshot (issue 16), with QEMU's writes to primary storage.
    if want("live-bitmap") {
        match live::unavailable() {
            Some(why) => res.skip("live-bitmap", why),
            None => {
                eprintln!("running domain: incremental backup, 1% changed, by bitmap and by snapshot");
                let l = live_setup();
                let ((m, env), writes) = live::method_rows(&l, SHORT_ROW_RUNS * runs);
                res.row(
                    "running domain: incremental backup, 1% changed, by bitmap vs by snapshot",
                    env,
                    size / 100,
                    format!(
                        "{:.2}x the snapshot method's time (target <= 0.5x), {:.2}x its CPU; QEMU wrote {} to primary storage during the bitmap backup, {} during the snapshot backup (its block commit)",
                        m[0].secs / m[1].secs,
                        m[0].cpu / m[1].cpu,
                        human(writes[0]),
                        human(writes[1])
                    ),
                    &[("knib by bitmap", m[0]), ("knib by snapshot", m[1])],
                );
            }
        }
    }

    // 7. The vault: a sync to S3 against cp into a local store, a restore
    // from S3 against one from the local store.
    let (want_sync, want_restore) = (want("vault-sync"), want("vault-restore"));
    if want_sync || want_restore {
        match vault::unavailable() {
            Some(why) => {
                for r in ["vault-sync", "vault-restore"].into_iter().filter(|r| want(r)) {
                    res.skip(r, why.clone());
                }
            }
            None => {
                let b = vault::VaultBench { me: &me, src: p("disk.qcow2"), dir: p("vault"), size };
                let v = vault::rows(&b, runs, want_sync, want_restore);
                if let Some((m, env)) = v.sync {
                    res.row(
                        "vault: sync a full + incremental backup to S3",
                        env,
                        v.bytes,
                        format!(
                            "{:.0} MB/s to the vault: {:.2}x the time, {:.2}x the CPU of cp into a local store directory \
                             (no target: the network and the S3 server bound it)",
                            v.bytes as f64 / 1e6 / m[0].secs,
                            m[0].secs / m[1].secs,
                            m[0].cpu / m[1].cpu
                        ),
                        &[("knib sync (5 MiB parts, 2 in flight)", m[0]), ("cp -r into a local store directory", m[1])],
                    );
                }
                if let Some((m, env)) = v.restore {
                    res.row(
                        "vault: restore the incremental from S3",
                        env,
                        v.bytes,
                        format!(
                            "{:.0} MB/s of backup files from the vault: {:.2}x the time, {:.2}x the CPU of the same \
                             restore from the local store (both verify every file's hash)",
                            v.bytes as f64 / 1e6 / m[0].secs,
                            m[0].secs / m[1].secs,
                            m[0].cpu / m[1].cpu
                        ),
                        &[
                            ("knib restore from the vault (ranged GETs)", m[0]),
                            ("knib restore from the local store", m[1]),
                        ],
                    );
                }
            }
        }
    }

    let noisy = busy_at_start || reporting.is_some() || res.lines.iter().any(|l| l.env.noisy);
    let data_line = format!(
        "Data: {} in the image ({} virtual), {} in the delta, {} in the third layer.",
        human(base_data),
        human(size),
        human(delta_data),
        human(alloc(delta2))
    );
    if as_json {
        let rows: Vec<_> = res
            .lines
            .iter()
            .map(|l| {
                json!({
                    "row": l.row,
                    "tool": l.tool,
                    "median_s": l.m.secs,
                    "cpu_s": l.m.cpu,
                    "mb_per_s": l.data as f64 / 1e6 / l.m.secs,
                    "output_bytes": l.m.out_bytes,
                    "peak_rss_kib": l.m.rss_kib,
                    "ratio": l.ratio,
                    "machine": l.env.json(),
                })
            })
            .collect();
        let out = json!({
            "noisy": noisy,
            "cores": ncores,
            "load_at_start": load_at_start,
            "free_page_reporting_order": reporting.map(|r| r.order),
            "runs": runs,
            "size_bytes": size,
            "big_bytes": big,
            "rows": rows,
            "skipped": res.skipped.iter().map(|(r, w)| json!({"row": r, "why": w})).collect::<Vec<_>>(),
            "data": data_line,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
        return;
    }
    if noisy {
        let mut why = Vec::new();
        if busy_at_start {
            why.push(format!("the load average was {load_at_start:.2} on {ncores} cores at the start"));
        }
        if let Some(r) = reporting {
            why.push(reporting_why(r));
        }
        let rows = res.lines.iter().filter(|l| l.env.noisy && l.first).count();
        if rows > 0 {
            why.push(format!("{rows} rows are marked NOISY below (stolen CPU or other processes)"));
        }
        println!("NOISY RUN: {}: its ratios are not measurements of knib.", why.join("; "));
        println!();
    }
    println!(
        "| row | tool | median s | CPU s | MB/s of data | output | peak RSS MiB | load (start -> end) | steal % | knib vs the others |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for l in &res.lines {
        let (row, load, steal) = if l.first {
            (
                l.row.as_str(),
                format!("{:.2} -> {:.2}", l.env.load_start, l.env.load_end),
                format!("{:.1}", l.env.steal_pct),
            )
        } else {
            ("", String::new(), String::new())
        };
        println!(
            "| {row} | {} | {:.2} | {:.2} | {:.0} | {} | {:.0} | {load} | {steal} | {} |",
            l.tool,
            l.m.secs,
            l.m.cpu,
            l.data as f64 / 1e6 / l.m.secs,
            human(l.m.out_bytes),
            l.m.rss_kib as f64 / 1024.0,
            l.ratio
        );
    }
    println!();
    for (row, why) in &res.skipped {
        println!("Row {row} skipped: {why}.");
    }
    println!(
        "{runs} runs per tool (alternating; {} for the delta, engine incremental and bitmap rows), median shown; every run \
         ends with its output fsynced. CPU s: user + system time of the tool's processes (median). A row is noisy \
         when over {STEAL_NOISY_PCT}% of the CPU time was stolen or other processes kept more than \
         {OTHERS_NOISY_PER_CORE} cores per core busy; the run, also when the load average was over \
         {LOAD_NOISY_PER_CORE} per core at its start, or on a VM whose balloon reports free memory to its host.",
        SHORT_ROW_RUNS * runs
    );
    println!("{data_line}");
}

/// Why a run on a machine with free page reporting is noisy, and what
/// makes it quiet.
fn reporting_why(r: PageReporting) -> String {
    format!(
        "this VM's balloon reports free memory to its host (free page reporting, order {}): memory one tool frees \
         faults on the host when the next tool takes it, so a tool's runs are fast or slow by the order they run in; \
         for a quiet run, as root: echo {} > /sys/module/page_reporting/parameters/page_reporting_order (and back \
         to {} after)",
        r.order, r.off, r.order
    )
}

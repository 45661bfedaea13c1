//! `knib`: backups of KVM virtual machines with qcow2 disks, from the shell.
//!
//! Errors go to standard error as one line, `knib: <kind>: <what was wrong>`,
//! and the exit status is 10 + the error kind's code (see the README); a
//! bad command line (an unknown option, a value not among those `--help`
//! lists) is clap's usage error, status 2. knib's log goes to standard
//! error: warnings always, more with `-v` (info), `-vv` (debug), `-vvv`
//! (trace) or `KNIB_LOG` (an env_logger filter: `KNIB_LOG=debug`,
//! `KNIB_LOG=knib_core::catalog=trace`).

mod boot;
mod demo;
mod files;
mod group;
mod jobs;
mod output;
mod signals;
mod vault;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use knib_core::catalog::{BackupOptions, DiskSpec, Store, DEFAULT_CHAIN_SIZE};
use knib_core::engine::BackupMethod;
use knib_core::engine::CompressOptions;
use knib_core::libvirt::Hypervisor;
use knib_core::qemu_img::{CompressionLibrary, ImageFormat, QemuImg};
use knib_core::{KnibError, Result};

#[derive(Parser)]
#[command(
    name = "knib",
    version,
    about = "Native incremental backups of KVM VMs with qcow2 disks",
    after_help = "Environment:\n  KNIB_LOG=FILTER  show knib's log on stderr by level or module \
                  (KNIB_LOG=debug, KNIB_LOG=knib_core::catalog=trace)\n  \
                  KNIB_WRITE_MODE=MODE  how outputs are written: behind (the default: through the page cache, \
                  each chunk sent to the device at once and dropped from the cache), direct (O_DIRECT) or \
                  buffered (left to the kernel until the final fsync)\n  \
                  KNIB_ZSTD_LEVEL=N  zstd's level for compressed outputs, 1 to 19: 2 by default; 3 is QEMU's, \
                  about 1.5% smaller on programs and libraries for about a fifth more CPU"
)]
struct Cli {
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Show knib's log on stderr: -v info, -vv debug, -vvv trace (warnings
    /// are always shown).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// The libvirt connection URI of the commands that talk to libvirt
    /// (backup --domain, restore --quick, consolidate, recover, verify --boot,
    /// group backup, group recover).
    #[arg(long, global = true, value_name = "URI", default_value = "qemu:///system")]
    connect: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Back up a VM's disks (full or incremental, decided from the chain).
    Backup {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The VM's name (its backups are grouped under it), with --disk.
        #[arg(long, required_unless_present = "domain", conflicts_with = "domain", requires = "disks")]
        vm: Option<String>,
        /// A disk as NAME=PATH of its qcow2 file; repeat for each disk.
        #[arg(long = "disk", value_name = "NAME=PATH")]
        disks: Vec<std::ffi::OsString>,
        /// A libvirt domain, running or stopped: all its disks are backed up
        /// through a disk-only snapshot.
        #[arg(long)]
        domain: Option<String>,
        /// Freeze the guest's filesystems for the snapshot (needs the QEMU
        /// guest agent).
        #[arg(long, requires = "domain")]
        quiesce: bool,
        /// Take a full backup, starting a new chain.
        #[arg(long)]
        full: bool,
        /// Take an isolated backup: full, outside any chain.
        #[arg(long, conflicts_with = "full")]
        isolated: bool,
        /// Backups per chain (1 = always full, less than 1 = unlimited).
        #[arg(long, default_value_t = DEFAULT_CHAIN_SIZE, allow_negative_numbers = true)]
        chain_size: i64,
        /// Compress the backup as it is copied, in one pass (zstd when no
        /// LIBRARY is given).
        #[arg(long, value_enum, value_name = "LIBRARY", num_args = 0..=1, default_missing_value = "zstd")]
        compress: Option<Library>,
        /// With --compress: read each compressed file back before the
        /// backup is kept, and fail (nothing kept) if one does not hold what
        /// was copied into it (the store's compression.check_output turns it
        /// on for every backup into the store; refused with --vault).
        #[arg(long, requires = "compress", conflicts_with = "vault")]
        check_output: bool,
        /// How a domain's changes are found (default: the VM's setting, see
        /// vm-settings): snapshot (external snapshot, copy, merge) or bitmap
        /// (checkpoints and persistent dirty bitmaps; running or stopped).
        #[arg(long, value_enum, requires = "domain")]
        method: Option<Method>,
        /// Write the backup straight to this vault (s3://BUCKET/PREFIX) as
        /// it is copied, instead of into the store (which keeps the VM's
        /// lock, settings and a domain backup's journal); the chain
        /// continued is the vault's.
        #[arg(long, value_name = "S3_URL")]
        vault: Option<String>,
    },
    /// Show or set a VM's settings (its backup method).
    VmSettings {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The VM (a libvirt domain's name).
        #[arg(long)]
        vm: String,
        /// Set how its backups find its changes.
        #[arg(long, value_enum)]
        backup_method: Option<Method>,
    },
    /// List backups, oldest first.
    List {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// Only this VM's backups.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show one backup.
    Show {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
    },
    /// Restore one volume of a backup to a new image.
    Restore {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// The volume to restore.
        #[arg(long, required_unless_present = "quick")]
        volume: Option<String>,
        /// The image to write (must not exist).
        #[arg(long, required_unless_present = "quick")]
        to: Option<PathBuf>,
        /// Its format (a quick restore's overlays are qcow2).
        #[arg(long, value_enum, default_value_t = Format::Qcow2, conflicts_with = "quick")]
        format: Format,
        /// Quick restore: start the (stopped) domain at once on overlays of
        /// the backup; `knib consolidate` later pulls the data in.
        #[arg(long, requires = "domain", conflicts_with_all = ["volume", "to"])]
        quick: bool,
        /// The domain to quick-restore onto (with --quick).
        #[arg(long, conflicts_with_all = ["volume", "to"])]
        domain: Option<String>,
        /// Do not check the backup's files against their recorded hashes
        /// (by default every file of the chain is checked as it is read,
        /// and a damaged one fails the restore): to get out what can be got
        /// from a damaged backup.
        #[arg(long, conflicts_with = "quick")]
        no_verify: bool,
    },
    /// After a quick restore: pull the backup's data into the domain's
    /// disks, so they no longer depend on the store.
    Consolidate {
        /// The domain.
        #[arg(long)]
        domain: String,
    },
    /// Finish or undo a domain backup that was interrupted.
    Recover {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The domain.
        #[arg(long)]
        domain: String,
        /// The vault (s3://BUCKET/PREFIX) the interrupted backup was being
        /// written to (`backup --domain --vault`), when it was.
        #[arg(long)]
        vault: Option<String>,
        /// Give up an interrupted backup that recover cannot finish or undo
        /// (the domain is gone, its disks changed since, its journal is
        /// damaged): its journal is set aside in the store, its unpublished
        /// files removed; the domain and its disks are not touched, and
        /// the answer says what may be left on them.
        #[arg(long, conflicts_with = "vault")]
        discard: bool,
    },
    /// Compress a backup in place (it stays a valid backing file).
    Compress {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// The compression library.
        #[arg(long, value_enum, default_value_t = Library::Zstd)]
        library: Library,
        /// Compression threads, 1 to 16 (at most one per core is used);
        /// by default one per core. `--coroutines` is its old name (on the
        /// qemu-img data path, qemu-img's coroutines, `-m`).
        #[arg(
            long,
            visible_alias = "coroutines",
            default_value_t = default_threads(),
            value_parser = clap::value_parser!(u32).range(1..=16)
        )]
        threads: u32,
        /// Rate limit in MB/s (0 = none).
        #[arg(long, default_value_t = 0)]
        rate_limit: u64,
        /// Read each compressed copy back and compare its data with the
        /// backup's before it replaces the backup (the store's
        /// `compression.check_output` turns it on for every compression).
        #[arg(long)]
        check_output: bool,
    },
    /// Check backups: image checks, backing pointers, sizes, hashes.
    Verify {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// One backup (all when left out).
        backup: Option<String>,
        /// The boot test.
        #[command(flatten)]
        boot: boot::BootArgs,
    },
    /// Delete a backup without breaking any chain.
    Delete {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
    },
    /// Send the backups of a store that a vault on S3 lacks (parents
    /// first, each backup's manifest last; an interrupted sync is cleaned
    /// up and resumed by the next). Endpoint, region and credentials come
    /// from the usual AWS environment variables and files. With --queue,
    /// queue a sync job per VM instead (run by `knib jobs run`, within the
    /// `sync.*` settings of STORE/knib.json, to its `sync.vault`).
    Sync {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The vault: s3://BUCKET/PREFIX.
        #[arg(long, required_unless_present = "queue")]
        to: Option<String>,
        /// Queue a durable sync job of each VM (or of --vm) instead of
        /// sending now; the jobs send to `sync.vault`.
        #[arg(long, conflicts_with_all = ["to", "rate_limit", "parallel_parts", "check"])]
        queue: bool,
        /// Only this VM's backups.
        #[arg(long)]
        vm: Option<String>,
        /// Rate limit in MB/s (0 = none).
        #[arg(long, default_value_t = 0)]
        rate_limit: u64,
        /// Parts of 5 MiB read or sent at once.
        #[arg(long, default_value_t = knib_core::vault::DEFAULT_PARALLEL_PARTS as u32, value_parser = clap::value_parser!(u32).range(1..=16))]
        parallel_parts: u32,
        /// Also read every object the vault holds of these VMs and check its
        /// hash: one whose bytes changed is sent again from the store (a
        /// plain sync only lists the objects).
        #[arg(long)]
        check: bool,
    },
    /// Serve the volumes of a vault's backup over NBD for a quick restore
    /// (started by `knib restore --quick`, stopped by `knib consolidate`).
    #[command(hide = true)]
    VaultServe {
        /// The vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        #[arg(long)]
        backup: String,
        /// The directory of the sockets.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Files of a backup, read straight from the store: list filesystems
    /// and directories, extract files and directories.
    Files {
        #[command(subcommand)]
        command: files::FilesCommand,
    },
    /// Group backups: one backup of each of several VMs at a common instant
    /// (backup, list, show, restore, delete, recover).
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// The store's durable job queue: queue, list and run compression,
    /// validation and sync jobs.
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Run a demo: make a VM's two disks, back them up full, change them
    /// and back them up incrementally twice, compress the full backup,
    /// verify every backup, restore each and compare it with the disks.
    Demo {
        /// Work here (a new temporary directory when left out).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The default of `compress --threads`: one per core of this machine, at
/// most 16 (the most the option takes).
fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(16) as u32
}

/// A compression library, as the command line names it.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Library {
    // No doc comments: `--help` then lists the values on one line.
    Zstd,
    Zlib,
}

impl From<Library> for CompressionLibrary {
    fn from(l: Library) -> Self {
        match l {
            Library::Zstd => CompressionLibrary::Zstd,
            Library::Zlib => CompressionLibrary::Zlib,
        }
    }
}

/// A backup method, as the command line names it.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Method {
    // No doc comments: `--help` then lists the values on one line.
    Snapshot,
    Bitmap,
}

impl From<Method> for BackupMethod {
    fn from(m: Method) -> Self {
        match m {
            Method::Snapshot => BackupMethod::Snapshot,
            Method::Bitmap => BackupMethod::Bitmap,
        }
    }
}

/// An image format a restore writes.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Qcow2,
    Raw,
}

impl From<Format> for ImageFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Qcow2 => ImageFormat::Qcow2,
            Format::Raw => ImageFormat::Raw,
        }
    }
}

/// `NAME=PATH`: the name is text, the path any bytes (a path that is not
/// UTF-8 is taken as it is).
fn parse_disk(arg: &std::ffi::OsStr) -> Result<DiskSpec> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = arg.as_bytes();
    let shown = arg.to_string_lossy();
    let eq = bytes
        .iter()
        .position(|b| *b == b'=')
        .ok_or_else(|| KnibError::invalid(format!("--disk {shown:?} is not NAME=PATH")))?;
    let name = std::str::from_utf8(&bytes[..eq])
        .map_err(|_| KnibError::invalid(format!("--disk {shown:?}: the disk's name is not text")))?;
    let path = std::ffi::OsStr::from_bytes(&bytes[eq + 1..]);
    if path.is_empty() {
        return Err(KnibError::invalid(format!("--disk {shown:?} has no path")));
    }
    let path = PathBuf::from(path);
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir().map_err(|e| KnibError::io("cannot read", &PathBuf::from("."), e))?.join(path)
    };
    Ok(DiskSpec { name: name.to_string(), path })
}

fn run(cli: Cli, cancel: knib_core::CancelToken) -> Result<()> {
    let json = cli.json;
    let connect = cli.connect;
    let ctl = output::control(cancel);
    match cli.command {
        Command::Backup {
            store,
            vm,
            disks,
            domain,
            quiesce,
            full,
            isolated,
            chain_size,
            compress,
            check_output,
            method,
            vault: to,
        } => {
            let compress = compress.map(CompressionLibrary::from);
            let opts = BackupOptions {
                full,
                isolated,
                chain_size,
                compress,
                check_output,
                method: method.map(BackupMethod::from),
                group: None,
            };
            if let (Some(to), Some(vm)) = (&to, &vm) {
                let disks = disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>>>()?;
                return vault::backup(&store, to, vm, &disks, &opts, json, &ctl);
            }
            if let (Some(to), Some(domain)) = (&to, &domain) {
                if !disks.is_empty() {
                    return Err(KnibError::invalid("--disk goes with --vm, not with --domain"));
                }
                let hv = Hypervisor::open(&connect)?;
                return vault::backup_domain(&store, to, &hv.domain(domain)?, &opts, quiesce, json, &ctl);
            }
            let m = match (vm, domain) {
                (Some(vm), None) => {
                    let disks = disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>>>()?;
                    let store = Store::create(&store)?;
                    store.backup(&vm, &disks, &opts, &ctl)?
                }
                (None, Some(domain)) => {
                    if !disks.is_empty() {
                        return Err(KnibError::invalid("--disk goes with --vm, not with --domain"));
                    }
                    let hv = Hypervisor::open(&connect)?;
                    let dom = hv.domain(&domain)?;
                    let store = Store::create(&store)?;
                    store.backup_domain(&dom, &opts, quiesce, &ctl)?
                }
                _ => return Err(KnibError::invalid("give --vm NAME with --disk NAME=PATH, or --domain NAME")),
            };
            let store = Store::open(store)?;
            output::clear_progress();
            output::print_backup(&store, &m, json)?;
            jobs::after_backup(&store, &m.vm, json);
        }
        Command::List { store, vm } if vault::location(&store).is_some() => {
            vault::list(vault::location(&store).unwrap_or_default(), vm.as_deref(), json)?
        }
        Command::Show { store, backup } if vault::location(&store).is_some() => {
            vault::show(vault::location(&store).unwrap_or_default(), &backup, json)?
        }
        Command::Verify { store, backup, boot } if vault::location(&store).is_some() => {
            if boot.boot {
                return Err(KnibError::invalid("--boot needs a store directory, not a vault"));
            }
            vault::verify(vault::location(&store).unwrap_or_default(), backup.as_deref(), json, &ctl)?
        }
        Command::Delete { store, backup } if vault::location(&store).is_some() => {
            vault::delete(vault::location(&store).unwrap_or_default(), &backup, json)?
        }
        Command::Sync { store, queue: true, vm, .. } => jobs::queue_sync(store, vm, json)?,
        Command::Sync { store, to, vm, rate_limit, parallel_parts, check, .. } => {
            let opts = knib_core::vault::SyncOptions {
                vm,
                rate_limit_mbps: rate_limit,
                parallel_parts: parallel_parts as usize,
                check,
                ..Default::default()
            };
            vault::sync(&store, to.as_deref().unwrap_or_default(), &opts, json, &ctl)?
        }
        Command::List { store, vm } => {
            let store = Store::open(store)?;
            let list = store.list(vm.as_deref())?;
            output::print_list(&store, &list, json)?;
        }
        Command::Show { store, backup } => {
            let store = Store::open(store)?;
            let m = store.show(&backup)?;
            output::print_backup(&store, &m, json)?;
        }
        Command::Restore { store, backup, volume, to, format, quick, domain, no_verify } => {
            let format = ImageFormat::from(format);
            if let Some(loc) = vault::location(&store) {
                if quick {
                    let domain = domain.ok_or_else(|| KnibError::invalid("--quick needs --domain"))?;
                    return vault::quick_restore(loc, &backup, &domain, &connect, json, &ctl);
                }
                let (volume, to) = match (volume, to) {
                    (Some(v), Some(t)) => (v, t),
                    _ => return Err(KnibError::invalid("restore needs --volume and --to")),
                };
                return vault::restore(loc, &backup, volume, &to, format, !no_verify, json, &ctl);
            }
            let store = Store::open(store)?;
            if quick {
                let domain = domain.ok_or_else(|| KnibError::invalid("--quick needs --domain"))?;
                let hv = Hypervisor::open(&connect)?;
                let dom = hv.domain(&domain)?;
                let done = store.quick_restore_domain(&backup, &dom, &ctl)?;
                let kept = knib_core::catalog::disks_not_restored(&dom, &done);
                let text: Vec<String> = done.iter().map(|(t, o)| format!("{t} on {}", o.display())).collect();
                output::say(
                    json,
                    || {
                        Ok(serde_json::json!({"restored": backup, "domain": domain, "overlays": serde_json::to_value(&done)?,
                            "kept": serde_json::to_value(&kept)?}))
                    },
                    &format!(
                        "domain {domain} started on overlays of backup {backup}: {}{}; run `knib consolidate --domain {domain}` to pull the data in",
                        text.join(", "),
                        vault::kept_text(&kept)
                    ),
                )?;
                return Ok(());
            }
            let (volume, to) = match (volume, to) {
                (Some(v), Some(t)) => (v, t),
                _ => return Err(KnibError::invalid("restore needs --volume and --to (or --quick --domain)")),
            };
            store.restore_with(&backup, &volume, &to, format, !no_verify, &ctl)?;
            output::clear_progress();
            let text = format!("restored volume {volume} of backup {backup} to {} ({})", to.display(), format.as_str());
            // The answer of the `restore` operation, as every binding prints it.
            output::say(json, || serde_json::to_value(knib_core::api::catalog::restored(volume, to)), &text)?;
        }
        Command::Compress { store, backup, library, threads, rate_limit, check_output } => {
            let library = CompressionLibrary::from(library);
            let store = Store::open(store)?;
            // The engine's field keeps CloudStack's name: on the native data
            // path it is the number of compression threads.
            let opts = CompressOptions {
                library,
                coroutines: threads,
                rate_limit_mbps: rate_limit,
                check_output,
                ..Default::default()
            };
            let m = store.compress(&backup, &opts, &ctl)?;
            output::clear_progress();
            output::print_backup(&store, &m, json)?;
        }
        Command::Verify { store, backup, boot } => {
            let store = Store::open(store)?;
            if boot.boot {
                let id = backup.ok_or_else(|| KnibError::invalid("--boot needs a BACKUP"))?;
                return boot::run(&store, &id, &boot, &connect, json, &ctl);
            }
            let reports = store.verify(backup.as_deref(), &ctl)?;
            output::clear_progress();
            output::print_verify(&reports, json)?;
            if let Some(bad) = reports.iter().find(|r| !r.ok) {
                return Err(KnibError::corrupt(format!(
                    "backup {} failed verification: {}",
                    bad.id,
                    bad.problems.join("; ")
                )));
            }
        }
        Command::Delete { store, backup } => {
            let store = Store::open(store)?;
            let out = store.delete(&backup)?;
            let text = if out.marked_removed.is_empty() {
                format!("deleted {}", out.expunged.join(", "))
            } else {
                format!(
                    "backup {backup} is marked removed: {}",
                    out.kept_because.as_deref().unwrap_or("later backups depend on it")
                )
            };
            output::say(json, || serde_json::to_value(&out), &text)?;
        }
        Command::Consolidate { domain } => {
            let hv = Hypervisor::open(&connect)?;
            let dom = hv.domain(&domain)?;
            let q = QemuImg::new();
            // A quick restore from a vault whose server is gone (the host
            // restarted): serve the exports again first.
            vault::restart_dead_servers(&dom, &ctl)?;
            let done = knib_core::engine::live::consolidate(&q, &dom, &ctl)?;
            // A quick restore from a vault: its server is no longer needed.
            let released = knib_core::vault::serve::release_served(&q, &dom, &ctl)?;
            output::clear_progress();
            let text = if done.is_empty() {
                format!("domain {domain}: no disk depends on a backing file; nothing to consolidate")
            } else {
                format!("domain {domain}: consolidated {}", done.join(", "))
            };
            let answer = || {
                let mut a = serde_json::json!({"domain": domain, "consolidated": done});
                if !released.is_empty() {
                    a["vault_servers_stopped"] = serde_json::to_value(&released)?;
                }
                Ok(a)
            };
            let mut text = text;
            if !released.is_empty() {
                for r in &released {
                    text.push_str(&format!(
                        "; stopped the server of backup {} from {} (it fetched {})",
                        r.state.backup,
                        r.state.vault,
                        r.bytes_fetched.map(knib_core::fsio::human_bytes).unwrap_or_else(|| "an unknown amount".into())
                    ));
                }
            }
            output::say(json, answer, &text)?;
        }
        Command::VmSettings { store, vm, backup_method } => {
            let s = match backup_method {
                Some(m) => {
                    let store = Store::create(&store)?;
                    let mut s = store.vm_settings(&vm)?;
                    s.backup_method = m.into();
                    store.set_vm_settings(&vm, &s)?;
                    s
                }
                None => Store::open(&store)?.vm_settings(&vm)?,
            };
            let text = format!("VM {vm}: backup method {}", s.backup_method);
            output::say(json, || serde_json::to_value(&s), &text)?;
        }
        Command::Recover { store, domain, discard: true, .. } => {
            let out = Store::open(store)?.discard_interrupted(&domain)?;
            let mut text = String::new();
            for d in &out.discarded {
                let file = if d.method == "compression" { "next manifest" } else { "journal" };
                let what = match (&d.backup_id, &d.step) {
                    (Some(id), _) if d.method == "compression" => format!(
                        "the interrupted compression of backup {id} of {domain}, which cannot be finished ({})",
                        d.unreadable.as_deref().unwrap_or("unreadable")
                    ),
                    (Some(id), Some(step)) => {
                        format!("{} backup {id} of {domain} (stopped at its {step} step)", d.method)
                    }
                    _ => format!(
                        "the {} backup of {domain} whose journal cannot be read ({})",
                        d.method,
                        d.unreadable.as_deref().unwrap_or("unreadable")
                    ),
                };
                let kept = match &d.kept_as {
                    Some(p) => format!("its {file} is kept as {}", p.display()),
                    None => format!("its {file} was not a file, and is removed"),
                };
                let state = match d.published {
                    Some(true) => "; it was published, and stays",
                    Some(false) => "; it was not published, and its partial files are removed from the store",
                    None => "",
                };
                text += &format!("discarded {what}: {kept}{state}\n");
                for l in &d.left {
                    text += &format!("  left: {l}\n");
                }
            }
            if out.discarded.is_empty() {
                text = format!("VM {domain}: no interrupted backup to discard");
            }
            output::say(json, || serde_json::to_value(&out), text.trim_end())?;
        }
        Command::Recover { store, domain, vault: to, .. } => {
            let hv = Hypervisor::open(&connect)?;
            let dom = hv.domain(&domain).map_err(|mut e| {
                if e.kind == knib_core::ErrorKind::NotFound {
                    e.message.push_str(
                        " (if the domain is gone, `knib recover --discard` sets its interrupted backup aside)",
                    );
                }
                e
            })?;
            // An existing store only: a mistyped path made an empty store
            // there and answered that nothing was interrupted.
            let store = Store::open(store)?;
            let out = match &to {
                Some(to) => vault::open(to)?.recover_domain(&store, &dom, &ctl)?,
                None => store.recover_domain(&dom, &ctl)?,
            };
            output::clear_progress();
            let text = match (&out.backup_id, out.step) {
                (Some(id), Some(step)) => format!(
                    "backup {id} of {domain} had stopped at its {} step; it was {}. {}",
                    step.as_str(),
                    if out.published { "on the store, and is finished" } else { "not on the store, and is undone" },
                    out.report.actions.join("; ")
                ),
                (Some(id), None) => format!(
                    "bitmap backup {id} of {domain} was interrupted; it was {}. {}",
                    if out.published { "on the store, and is finished" } else { "not on the store, and is undone" },
                    out.report.actions.join("; ")
                ),
                _ => format!("domain {domain}: no interrupted backup; its disks are in order"),
            };
            output::say(json, || serde_json::to_value(&out), &text)?;
        }
        Command::Demo { dir } => demo::run(dir, &ctl)?,
        Command::Jobs { command } => jobs::run(command, json, &ctl)?,
        Command::Group { command } => group::run(command, json, &connect, &ctl)?,
        Command::Files { command } => files::run(command, json, &ctl)?,
        Command::VaultServe { store, backup, dir } => {
            let loc = vault::location(&store).ok_or_else(|| {
                KnibError::invalid(format!("{} is not a vault (s3://BUCKET/PREFIX)", store.display()))
            })?;
            vault::serve(loc, &backup, &dir)?
        }
    }
    Ok(())
}

/// Send knib's log to stderr: warnings, or what `KNIB_LOG` and `-v` ask for
/// (`-v` sets the level of every module, after `KNIB_LOG`).
fn init_log(verbose: u8) {
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Warn);
    if let Ok(filter) = std::env::var("KNIB_LOG") {
        b.parse_filters(&filter);
    }
    match verbose {
        0 => {}
        1 => {
            b.filter_level(log::LevelFilter::Info);
        }
        2 => {
            b.filter_level(log::LevelFilter::Debug);
        }
        _ => {
            b.filter_level(log::LevelFilter::Trace);
        }
    }
    b.format(|out, r| writeln!(out, "[{} {}] {}", r.level(), r.target(), r.args()));
    b.init();
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(boot::exec_words_apart(std::env::args_os()));
    if let Command::Group { command: group::GroupCommand::Backup(a) } = &cli.command {
        if let Err(why) = a.check() {
            use clap::CommandFactory;
            let mut c = Cli::command();
            c.build();
            let sub = c
                .find_subcommand_mut("group")
                .and_then(|g| g.find_subcommand_mut("backup"))
                .expect("knib group backup");
            sub.error(clap::error::ErrorKind::TooFewValues, why).exit();
        }
    }
    if cli.json {
        // Refused before anything is done, rather than after (the answer
        // could not name it).
        if let Some(a) = std::env::args_os().skip(1).find(|a| a.to_str().is_none()) {
            use clap::CommandFactory;
            Cli::command()
                .error(
                    clap::error::ErrorKind::InvalidUtf8,
                    format!(
                        "{:?} is not UTF-8: --json prints paths as JSON strings, which hold only UTF-8 (without --json any path is taken)",
                        a
                    ),
                )
                .exit();
        }
    }
    init_log(cli.verbose);
    // Ctrl-C and SIGTERM cancel (exit status 16), before any thread starts;
    // `vault-serve` waits for them itself.
    let cancel = knib_core::CancelToken::new();
    if !matches!(cli.command, Command::VaultServe { .. }) {
        signals::cancel_on_signals(cancel.clone());
    }
    // The CLI owns its process: a read of a vault chain may tune malloc.
    knib_core::vault::allow_allocator_tuning();
    match run(cli, cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::clear_progress();
            let mut line = format!("knib: {e}");
            line.retain(|c| c != '\n');
            eprintln!("{line}");
            ExitCode::from(10 + e.kind.code() as u8)
        }
    }
}

//! `knib`: backups of KVM virtual machines with qcow2 disks, from the shell.
//!
//! Errors go to standard error as one line, `knib: <kind>: <what was wrong>`,
//! and the exit status is 10 + the error kind's code (see the README).

mod demo;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use knib_core::catalog::{BackupOptions, DiskSpec, Store, DEFAULT_CHAIN_SIZE};
use knib_core::engine::CompressOptions;
use knib_core::qemu_img::{CompressionLibrary, ImageFormat};
use knib_core::{KnibError, Result};

#[derive(Parser)]
#[command(name = "knib", version, about = "Native incremental backups of KVM VMs with qcow2 disks")]
struct Cli {
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
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
        /// The VM's name (its backups are grouped under it).
        #[arg(long)]
        vm: String,
        /// A disk as NAME=PATH of its qcow2 file; repeat for each disk.
        #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
        disks: Vec<String>,
        /// Take a full backup, starting a new chain.
        #[arg(long)]
        full: bool,
        /// Take an isolated backup: full, outside any chain.
        #[arg(long, conflicts_with = "full")]
        isolated: bool,
        /// Backups per chain (1 = always full, less than 1 = unlimited).
        #[arg(long, default_value_t = DEFAULT_CHAIN_SIZE, allow_negative_numbers = true)]
        chain_size: i64,
    },
    /// List backups, oldest first.
    List {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Only this VM's backups.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show one backup.
    Show {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
    },
    /// Restore one volume of a backup to a new image.
    Restore {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// The volume to restore.
        #[arg(long)]
        volume: String,
        /// The image to write (must not exist).
        #[arg(long)]
        to: PathBuf,
        /// Its format.
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    /// Compress a backup in place (it stays a valid backing file).
    Compress {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// zstd or zlib.
        #[arg(long, default_value = "zstd")]
        library: String,
        /// Parallel coroutines of qemu-img (1 to 16).
        #[arg(long, default_value_t = 1)]
        coroutines: u32,
        /// Rate limit in MB/s (0 = none).
        #[arg(long, default_value_t = 0)]
        rate_limit: u64,
    },
    /// Check backups: image checks, backing pointers, sizes, hashes.
    Verify {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// One backup (all when left out).
        backup: Option<String>,
    },
    /// Delete a backup without breaking any chain.
    Delete {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
    },
    /// Run a demo: make a disk, back it up, change it, back it up again,
    /// compress, verify, restore, compare.
    Demo {
        /// Work here (a new temporary directory when left out).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn parse_disk(s: &str) -> Result<DiskSpec> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| KnibError::invalid(format!("--disk {s:?} is not NAME=PATH")))?;
    if path.is_empty() {
        return Err(KnibError::invalid(format!("--disk {s:?} has no path")));
    }
    let path = PathBuf::from(path);
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir().map_err(|e| KnibError::io("cannot read", &PathBuf::from("."), e))?.join(path)
    };
    Ok(DiskSpec { name: name.to_string(), path })
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let ctl = output::control();
    match cli.command {
        Command::Backup { store, vm, disks, full, isolated, chain_size } => {
            let disks = disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>>>()?;
            let store = Store::create(store)?;
            let m = store.backup(&vm, &disks, &BackupOptions { full, isolated, chain_size }, &ctl)?;
            output::clear_progress();
            output::print_backup(&store, &m, json);
        }
        Command::List { store, vm } => {
            let store = Store::open(store)?;
            let list = store.list(vm.as_deref())?;
            output::print_list(&store, &list, json);
        }
        Command::Show { store, backup } => {
            let store = Store::open(store)?;
            let m = store.show(&backup)?;
            output::print_backup(&store, &m, json);
        }
        Command::Restore { store, backup, volume, to, format } => {
            let format: ImageFormat = format.parse()?;
            let store = Store::open(store)?;
            store.restore(&backup, &volume, &to, format, &ctl)?;
            output::clear_progress();
            output::say(json, &serde_json::json!({"restored": backup, "volume": volume, "to": to, "format": format}),
                &format!("restored volume {volume} of backup {backup} to {} ({})", to.display(), format.as_str()));
        }
        Command::Compress { store, backup, library, coroutines, rate_limit } => {
            let library: CompressionLibrary = library.parse()?;
            let store = Store::open(store)?;
            let opts = CompressOptions { library, coroutines, rate_limit_mbps: rate_limit, ..Default::default() };
            let m = store.compress(&backup, &opts, &ctl)?;
            output::clear_progress();
            output::print_backup(&store, &m, json);
        }
        Command::Verify { store, backup } => {
            let store = Store::open(store)?;
            let reports = store.verify(backup.as_deref(), &ctl)?;
            output::clear_progress();
            output::print_verify(&reports, json);
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
                    "backup {backup} is marked removed; its files stay until the backups that depend on it are deleted"
                )
            };
            output::say(json, &serde_json::to_value(&out).expect("serializes"), &text);
        }
        Command::Demo { dir } => demo::run(dir, &ctl)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
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

//! `knib files`: the filesystems and files of a backup, read straight from
//! the store (no restore of the disk, no mount); files and directories
//! extracted with their modes and mtimes.

use std::path::PathBuf;

use clap::Subcommand;
use knib_core::catalog::Store;
use knib_core::files::{self, EntryInfo, FsInfo};
use knib_core::fsio::human_bytes;
use knib_core::{Control, Result};
use serde_json::json;

use crate::output;

/// The `files` subcommands.
#[derive(Subcommand)]
pub enum FilesCommand {
    /// List the filesystems of a volume of a backup (partition, type,
    /// label, size).
    Fs {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// The volume.
        #[arg(long)]
        volume: String,
    },
    /// List a directory (or one file) of a filesystem of a backup.
    Ls {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// The volume.
        #[arg(long)]
        volume: String,
        /// The filesystem, by its number in `knib files fs` (needed when
        /// the volume has more than one that knib reads).
        #[arg(long)]
        fs: Option<u32>,
        /// The path inside the filesystem.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Extract a file or a directory tree (modes and mtimes kept) to a new
    /// local path.
    Get {
        /// The store directory, or a vault (s3://BUCKET/PREFIX).
        #[arg(long)]
        store: PathBuf,
        /// The backup's id.
        backup: String,
        /// The volume.
        #[arg(long)]
        volume: String,
        /// The filesystem, by its number in `knib files fs`.
        #[arg(long)]
        fs: Option<u32>,
        /// The path inside the filesystem.
        path: String,
        /// Where to write it (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
}

fn fs_line(f: &FsInfo) -> String {
    let at = match f.partition {
        Some(n) => format!("partition {n}"),
        None => "whole disk".into(),
    };
    format!(
        "{:>2}  {:<12}  {:<11}  {:<16}  {} at {}",
        f.index,
        at,
        f.fs_type,
        f.label.as_deref().unwrap_or("-"),
        human_bytes(f.size),
        human_bytes(f.start)
    )
}

/// `ls -l`'s mode column.
fn mode_text(e: &EntryInfo) -> String {
    let kind = match e.kind {
        "dir" => 'd',
        "symlink" => 'l',
        "file" => '-',
        _ => '?',
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (e.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn entry_line(e: &EntryInfo) -> String {
    // "YYYY-MM-DD HH:MM:SS" (UTC); a time before 1970 in seconds.
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let when = time::OffsetDateTime::from_unix_timestamp(e.mtime)
        .ok()
        .filter(|_| e.mtime >= 0)
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| format!("{}s", e.mtime));
    let target = e.target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
    format!("{}  {:>12}  {when}  {}{target}", mode_text(e), e.size, e.name)
}

/// The disk of a volume of a backup in a store directory or a vault
/// (`--store s3://bucket/prefix`: read by ranged requests).
fn open_disk(store: &std::path::Path, backup: &str, volume: &str, ctl: &Control) -> Result<files::Disk> {
    match crate::vault::location(store) {
        Some(loc) => files::Disk::open_vault(loc, backup, volume, ctl),
        None => files::Disk::open_backup(&Store::open(store)?, backup, volume, ctl),
    }
}

/// Run a `files` subcommand.
pub fn run(cmd: FilesCommand, json: bool, ctl: &Control) -> Result<()> {
    match cmd {
        FilesCommand::Fs { store, backup, volume } => {
            let list = open_disk(&store, &backup, &volume, ctl)?.filesystems();
            if json {
                println!("{}", json!({ "filesystems": list }));
            } else {
                for f in &list {
                    println!("{}", fs_line(f));
                }
            }
        }
        FilesCommand::Ls { store, backup, volume, fs, path } => {
            let entries = open_disk(&store, &backup, &volume, ctl)?.list(fs, &path, ctl)?;
            if json {
                println!("{}", json!({ "entries": entries }));
            } else {
                for e in &entries {
                    println!("{}", entry_line(e));
                }
            }
        }
        FilesCommand::Get { store, backup, volume, fs, path, to } => {
            let s = open_disk(&store, &backup, &volume, ctl)?.get(fs, &path, &to, ctl)?;
            output::clear_progress();
            output::say(
                json,
                &serde_json::to_value(&s).expect("a summary serializes"),
                &format!(
                    "extracted {path} of backup {backup} to {}: {} files, {} directories, {} symlinks, {}",
                    to.display(),
                    s.files,
                    s.dirs,
                    s.symlinks,
                    human_bytes(s.bytes)
                ),
            );
        }
    }
    Ok(())
}

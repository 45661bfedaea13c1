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

/// A name from the guest as it is shown on a terminal: control characters
/// (escape sequences, newlines, bells) and bidirectional overrides escaped
/// as Rust writes them (`\n`, `\u{1b}`, `\u{202e}`); everything else,
/// any UTF-8 name, as it is. (`--json` output is escaped by JSON.)
fn shown(name: &str) -> String {
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_control() || bidi(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
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
        f.label.as_deref().map(shown).unwrap_or_else(|| "-".into()),
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
    let target = e.target.as_deref().map(|t| format!(" -> {}", shown(t))).unwrap_or_default();
    format!("{}  {:>12}  {when}  {}{target}", mode_text(e), e.size, shown(&e.name))
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
                println!("{}", output::json_value(serde_json::to_value(&list).map(|l| json!({ "filesystems": l })))?);
            } else {
                for f in &list {
                    println!("{}", fs_line(f));
                }
            }
        }
        FilesCommand::Ls { store, backup, volume, fs, path } => {
            let entries = open_disk(&store, &backup, &volume, ctl)?.list(fs, &path, ctl)?;
            if json {
                println!("{}", output::json_value(serde_json::to_value(&entries).map(|e| json!({ "entries": e })))?);
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
                || serde_json::to_value(&s),
                &format!(
                    "extracted {path} of backup {backup} to {}: {} files, {} directories, {} symlinks, {}",
                    to.display(),
                    s.files,
                    s.dirs,
                    s.symlinks,
                    human_bytes(s.bytes)
                ),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: &'static str, target: Option<&str>) -> EntryInfo {
        EntryInfo {
            name: name.into(),
            kind,
            size: 5,
            mode: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            target: target.map(String::from),
        }
    }

    /// Guest names reach the operator's terminal: control characters (an
    /// escape sequence, a newline, a bell) and bidi overrides are shown
    /// escaped, one entry a line; other UTF-8 names are shown as they are.
    #[test]
    fn guest_names_are_shown_with_control_characters_escaped() {
        let evil = entry("a\x1b]0;owned\x07\nb\rc\u{202e}txt.exe", "symlink", Some("t\x1b[2J\u{7f}"));
        let line = entry_line(&evil);
        assert!(line.ends_with(r"a\u{1b}]0;owned\u{7}\nb\rc\u{202e}txt.exe -> t\u{1b}[2J\u{7f}"), "{line}");
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        let fine = entry_line(&entry("naïve café 日本語 \\ \"q\".txt", "file", None));
        assert!(fine.ends_with("  naïve café 日本語 \\ \"q\".txt"), "{fine}");
        let fs = FsInfo {
            index: 1,
            partition: Some(1),
            start: 1 << 20,
            size: 1 << 20,
            fs_type: "vfat".into(),
            label: Some("EFI\x1b[31m\n".into()),
            device: "/dev/sda1".into(),
        };
        let line = fs_line(&fs);
        assert!(line.contains(r"EFI\u{1b}[31m\n"), "{line}");
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
    }
}

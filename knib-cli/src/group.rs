//! `knib group`: group backups, one backup of each of several VMs at a
//! common instant (the `group.*` operations; see the README's "Group
//! backups").
//!
//! With `--json` every subcommand prints what its JSON operation answers
//! (`group.backup`, `group.list`, ...). A group backup some of whose members
//! failed (`"partial"`, with `--on-failure keep`) prints its record, then
//! fails with the first failed member's error kind, so that a scheduler
//! notices.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use knib_core::api::group::{GroupDeleteAnswer, GroupRestoreAnswer};
use knib_core::catalog::group::{GroupOptions, GroupRecord, MemberSpec, OnFailure, DEFAULT_FREEZE_TIMEOUT_SECS};
use knib_core::catalog::{BackupOptions, DiskSpec, Store, DEFAULT_CHAIN_SIZE};
use knib_core::qemu_img::{CompressionLibrary, ImageFormat};
use knib_core::{Control, ErrorKind, KnibError, Result};

use crate::{output, Format, Library};

/// The `group` subcommands.
#[derive(Subcommand)]
pub enum GroupCommand {
    /// Back up several VMs at one instant: every member planned, the guests
    /// frozen together (--quiesce), all snapshotted, thawed, then copied in
    /// parallel.
    Backup(BackupArgs),
    /// List the group backups of a store, oldest first.
    List {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Show one group backup: its members, their backups and its timing.
    Show {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The group backup's id.
        group: String,
    },
    /// Restore every volume of every member to DIR/<vm>/<volume>.<format>
    /// (all or none).
    Restore {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The group backup's id.
        group: String,
        /// The directory to write to (made when missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// The images' format.
        #[arg(long, value_enum, default_value_t = Format::Qcow2, conflicts_with = "quick")]
        format: Format,
        /// Write qcow2 overlays over the backups instead of copies (fast;
        /// they need the store).
        #[arg(long)]
        quick: bool,
        /// Do not check the chains' files against their recorded hashes.
        #[arg(long, conflicts_with = "quick")]
        no_verify: bool,
        /// Restore a partial group: the members that have a backup (without
        /// it, a group with members that have none is refused).
        #[arg(long)]
        partial: bool,
    },
    /// Delete every member's backup of a group (chain-safely), then the group.
    Delete {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The group backup's id.
        group: String,
    },
    /// Finish the group backups a crash interrupted (each member domain is
    /// recovered, then the group's record written, or with rollback undone).
    Recover {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
}

/// The arguments of `group backup`.
#[derive(Args)]
pub struct BackupArgs {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// A libvirt domain (running or stopped), all its disks; repeat for each.
    #[arg(long = "domain", value_name = "NAME")]
    domains: Vec<String>,
    /// A plain-disk VM (stopped, not a libvirt domain) as VM:NAME=PATH, more
    /// disks after commas (VM:a=/d/a.qcow2,b=/d/b.qcow2); repeat for each VM.
    #[arg(long = "plain", value_name = "VM:NAME=PATH[,NAME=PATH]", value_parser = plain_parser())]
    plains: Vec<Plain>,
    /// Freeze the running guests that have a guest agent channel, all at
    /// once, for the snapshots.
    #[arg(long)]
    quiesce: bool,
    /// The bound on freezing and snapshotting all members while guests are
    /// frozen (--quiesce), in seconds: past it every guest is thawed and the
    /// group fails.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_FREEZE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    freeze_timeout: u64,
    /// When a member fails after the snapshots: keep the others' backups,
    /// or roll every member back.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = OnFailureArg::Keep)]
    on_failure: OnFailureArg,
    /// Members copied at once after the thaw (default: the store's
    /// `group.max_concurrent_copies`, 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_parallel: Option<u64>,
    /// Take full backups, starting new chains.
    #[arg(long)]
    full: bool,
    /// Backups per chain (1 = always full, less than 1 = unlimited).
    #[arg(long, default_value_t = DEFAULT_CHAIN_SIZE, allow_negative_numbers = true)]
    chain_size: i64,
    /// Compress the backups as they are copied (zstd when no LIBRARY is
    /// given).
    #[arg(long, value_enum, value_name = "LIBRARY", num_args = 0..=1, default_missing_value = "zstd")]
    compress: Option<Library>,
    /// With --compress: read each compressed file back before the
    /// backup is kept, and fail (nothing kept) if one does not hold what
    /// was copied into it (the store's compression.check_output turns it
    /// on for every backup into the store).
    #[arg(long, requires = "compress")]
    check_output: bool,
}

impl BackupArgs {
    /// The usage error of a group of fewer than two VMs (clap cannot count
    /// two options together).
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.domains.len() + self.plains.len();
        if n < 2 {
            return Err(format!(
                "a group backup names at least two VMs (--domain NAME, --plain VM:NAME=PATH); {n} given"
            ));
        }
        Ok(())
    }
}

/// What `--on-failure` takes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnFailureArg {
    // No doc comments: `--help` then lists the values on one line.
    Keep,
    Rollback,
}

/// A `--plain` VM: its name and disks.
#[derive(Clone, Debug)]
pub struct Plain {
    vm: String,
    disks: Vec<DiskSpec>,
}

/// clap's parser of `--plain`: [`parse_plain`] on the argument as given,
/// its error a usage error as clap's own.
fn plain_parser() -> impl clap::builder::TypedValueParser<Value = Plain> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().try_map(|s: std::ffi::OsString| parse_plain(&s))
}

/// `--plain VM:NAME=PATH[,NAME=PATH]`, read as bytes: a PATH need not be
/// UTF-8 (as `--disk`'s); the VM and disk names must be.
fn parse_plain(arg: &std::ffi::OsStr) -> std::result::Result<Plain, String> {
    use std::os::unix::ffi::OsStrExt;
    let shown = arg.to_string_lossy();
    let bytes = arg.as_bytes();
    let colon =
        bytes.iter().position(|b| *b == b':').ok_or_else(|| format!("{shown:?} is not VM:NAME=PATH[,NAME=PATH]"))?;
    let vm = std::str::from_utf8(&bytes[..colon]).map_err(|_| format!("{shown:?}: the VM's name is not text"))?;
    if vm.is_empty() {
        return Err(format!("{shown:?} names no VM before ':'"));
    }
    let disks = bytes[colon + 1..]
        .split(|b| *b == b',')
        .map(|d| crate::parse_disk(std::ffi::OsStr::from_bytes(d)).map_err(|e| e.message.replace("--disk ", "disk ")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Plain { vm: vm.to_string(), disks })
}

fn member_line(r: &GroupRecord) -> String {
    let ok = r.members.iter().filter(|m| m.backup.is_some()).count();
    let mut s = format!(
        "{}  {}  {:<8}  {}/{} member(s): {}",
        r.id,
        r.created,
        r.state,
        ok,
        r.members.len(),
        r.members.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>().join(", ")
    );
    if r.recovered {
        s += "  (recovered)";
    }
    s
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into())
}

fn print_record(r: &GroupRecord, json: bool) -> Result<()> {
    if json {
        println!("{}", output::json_value(serde_json::to_value(r))?);
        return Ok(());
    }
    println!("{}", member_line(r));
    let on_failure = match r.on_failure {
        OnFailure::Keep => "keep",
        OnFailure::Rollback => "rollback",
    };
    println!(
        "  instant {}  snapshot skew {}  freeze to thaw {}  quiesce {}  on failure {on_failure}",
        r.instant.as_deref().unwrap_or("-"),
        ms(r.snapshot_skew_ms),
        ms(r.freeze_to_thaw_ms),
        if r.quiesce { "yes" } else { "no" },
    );
    for m in &r.members {
        let what = if m.domain { "domain" } else { "plain disks" };
        let state = match (&m.backup, &m.error) {
            (Some(b), _) => format!("backup {b}"),
            (None, Some(e)) => format!("FAILED: {e}"),
            (None, None) => "no backup".into(),
        };
        let mut flags = Vec::new();
        if m.running {
            flags.push("running");
        }
        if m.quiesced {
            flags.push("quiesced");
        }
        let flags = if flags.is_empty() { String::new() } else { format!(" ({})", flags.join(", ")) };
        let at = m.snapshot_at.as_deref().map(|t| format!(", snapshot at {t}")).unwrap_or_default();
        println!("  {} [{what}{flags}]: {state}{at}", m.vm);
    }
    Ok(())
}

/// The error kind a member's error line (`"<kind>: <message>"`) names.
fn kind_of(error: &str) -> ErrorKind {
    ErrorKind::of_message(error).unwrap_or(ErrorKind::Internal)
}

/// Run a `group` subcommand.
pub fn run(cmd: GroupCommand, json: bool, connect: &str, ctl: &Control) -> Result<()> {
    match cmd {
        GroupCommand::Backup(a) => {
            let mut members: Vec<MemberSpec> =
                a.domains.into_iter().map(|d| MemberSpec { domain: Some(d), vm: None, disks: Vec::new() }).collect();
            members.extend(a.plains.into_iter().map(|p| MemberSpec { domain: None, vm: Some(p.vm), disks: p.disks }));
            let opts = GroupOptions {
                backup: BackupOptions {
                    full: a.full,
                    isolated: false,
                    chain_size: a.chain_size,
                    compress: a.compress.map(CompressionLibrary::from),
                    check_output: a.check_output,
                    method: None,
                    group: None,
                },
                quiesce: a.quiesce,
                freeze_timeout: Duration::from_secs(a.freeze_timeout),
                on_failure: match a.on_failure {
                    OnFailureArg::Keep => OnFailure::Keep,
                    OnFailureArg::Rollback => OnFailure::Rollback,
                },
                connect: Some(connect.to_string()),
                max_parallel: a.max_parallel.map(|n| n as usize),
            };
            let store = Store::create(&a.store)?;
            let r = store.backup_group(&members, &opts, ctl)?;
            output::clear_progress();
            print_record(&r, json)?;
            for m in r.members.iter().filter(|m| m.backup.is_some()) {
                crate::jobs::after_backup(&store, &m.vm, json);
            }
            if let Some(m) = r.members.iter().find(|m| m.backup.is_none()) {
                let e = m.error.as_deref().unwrap_or("no backup");
                let failed = r.members.iter().filter(|m| m.backup.is_none()).count();
                return Err(KnibError::new(
                    kind_of(e),
                    format!(
                        "group backup {} is partial: {failed} of {} member(s) failed, first {}: {e}",
                        r.id,
                        r.members.len(),
                        m.vm
                    ),
                ));
            }
        }
        GroupCommand::List { store } => {
            let list = Store::open(store)?.groups()?;
            if json {
                println!("{}", output::json_value(serde_json::to_value(&list))?);
            } else if list.is_empty() {
                println!("no group backups");
            } else {
                for r in &list {
                    println!("{}", member_line(r));
                }
            }
        }
        GroupCommand::Show { store, group } => {
            let r = Store::open(store)?.group(&group)?;
            print_record(&r, json)?;
        }
        GroupCommand::Restore { store, group, to, format, quick, no_verify, partial } => {
            let format = ImageFormat::from(format);
            let (volumes, skipped) =
                Store::open(store)?.restore_group(&group, &to, format, quick, !no_verify, partial, ctl)?;
            output::clear_progress();
            if json {
                let a = GroupRestoreAnswer { volumes, skipped };
                println!("{}", output::json_value(serde_json::to_value(&a))?);
            } else {
                let how = if quick { "as overlays over the backups" } else { format.as_str() };
                println!("restored group {group} to {} ({how}):", to.display());
                for v in &volumes {
                    println!("  {} {} (backup {}): {}", v.vm, v.volume, v.backup, v.path.display());
                }
                for m in &skipped {
                    println!(
                        "  {}: left out, it has no backup ({})",
                        m.vm,
                        m.error.as_deref().unwrap_or("no error recorded")
                    );
                }
            }
        }
        GroupCommand::Delete { store, group } => {
            let members = Store::open(store)?.delete_group(&group)?;
            let expunged: Vec<&str> = members.iter().flat_map(|o| o.expunged.iter().map(String::as_str)).collect();
            let marked: Vec<String> = members
                .iter()
                .flat_map(|o| {
                    let why = o.kept_because.as_deref().unwrap_or("later backups depend on it");
                    o.marked_removed.iter().map(move |id| format!("\n  {id}: {why}"))
                })
                .collect();
            let mut text = format!("deleted group {group}");
            if !expunged.is_empty() {
                text += &format!("; expunged {}", expunged.join(", "));
            }
            if !marked.is_empty() {
                text += &format!("; marked removed:{}", marked.concat());
            }
            let a = GroupDeleteAnswer { members };
            output::say(json, || serde_json::to_value(&a), &text)?;
        }
        GroupCommand::Recover { store } => {
            let done = Store::open(store)?.recover_groups(Some(connect), ctl)?;
            output::clear_progress();
            if json {
                println!("{}", output::json_value(serde_json::to_value(&done))?);
            } else if done.is_empty() {
                println!("no interrupted group backup was left to finish");
            } else {
                for r in &done {
                    println!("recovered {}", member_line(r));
                }
            }
        }
    }
    Ok(())
}

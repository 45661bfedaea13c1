//! What the `knib` tool prints: plain lines for people, JSON for programs,
//! and progress on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use knib_core::api::BackupView;
use knib_core::catalog::{Manifest, Store, VerifyReport};
use knib_core::{Control, KnibError, Result};
use serde_json::Value;

/// A control that `cancel` stops, whose progress goes to standard error
/// when it is a terminal.
pub fn control(cancel: knib_core::CancelToken) -> Control {
    let mut ctl = Control::new().with_cancel(cancel);
    if std::io::stderr().is_terminal() {
        ctl = ctl.with_progress(Arc::new(|p| {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[K{} {:5.1}%", p.step, p.percent);
            let _ = e.flush();
        }));
    }
    ctl
}

/// Clear the progress line, if one was drawn.
pub fn clear_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
}

/// A backup as the tool shows it to programs: the same object as every
/// binding's answer ([`BackupView`]).
pub fn backup_json(store: &Store, m: &Manifest) -> Result<Value> {
    json_value(serde_json::to_value(BackupView::new(store, m)))
}

/// The JSON of an answer, or the error that it has none: JSON strings
/// hold only UTF-8, so a path that is not (the working directory's, say)
/// cannot be printed as JSON. The work is done by then; the error says so.
pub fn json_value(v: serde_json::Result<Value>) -> Result<Value> {
    v.map_err(|e| {
        KnibError::invalid(format!(
            "done, but the answer cannot be printed as JSON ({e}: JSON strings hold only UTF-8); without --json it is printed as text"
        ))
    })
}

pub fn backup_line(m: &Manifest) -> String {
    let size: u64 = m.volumes.iter().map(|v| v.size).sum();
    let parent = m.parent.as_deref().map(|p| format!(" parent {p}")).unwrap_or_default();
    let eoc = if m.end_of_chain { " end-of-chain" } else { "" };
    let comp = m.compression.as_ref().map(|c| format!(" compressed({})", c.library.as_str())).unwrap_or_default();
    format!(
        "{}  {}  {:<11} #{}{eoc}{comp}  {}  {} volume(s), {}{parent}",
        m.id,
        m.vm,
        m.kind.as_str(),
        m.position,
        m.created,
        m.volumes.len(),
        knib_core::fsio::human_bytes(size)
    )
}

/// Print one backup.
pub fn print_backup(store: &Store, m: &Manifest, json: bool) -> Result<()> {
    if json {
        println!("{}", backup_json(store, m)?);
    } else {
        println!("{}", backup_line(m));
        if let Some(why) = &m.full_reason {
            println!("  full because {why}");
        }
        for v in &m.volumes {
            println!(
                "  {}: {} ({} virtual, {} stored)",
                v.name,
                store.backup_dir(m).join(&v.file).display(),
                knib_core::fsio::human_bytes(v.virtual_size),
                knib_core::fsio::human_bytes(v.size)
            );
        }
    }
    Ok(())
}

/// Print a list of backups.
pub fn print_list(store: &Store, list: &[Manifest], json: bool) -> Result<()> {
    if json {
        let arr = list.iter().map(|m| backup_json(store, m)).collect::<Result<Vec<Value>>>()?;
        println!("{}", Value::Array(arr));
    } else if list.is_empty() {
        println!("no backups");
    } else {
        for m in list {
            println!("{}", backup_line(m));
        }
    }
    Ok(())
}

/// Print verification reports.
pub fn print_verify(reports: &[VerifyReport], json: bool) -> Result<()> {
    if json {
        println!("{}", json_value(serde_json::to_value(reports))?);
        return Ok(());
    }
    for r in reports {
        if r.ok {
            println!("{}: ok ({} files checked)", r.id, r.files_checked);
        } else {
            println!("{}: FAILED", r.id);
            for p in &r.problems {
                println!("  {p}");
            }
        }
    }
    Ok(())
}

/// Print a result as a line of text, or with `json` as the JSON `value`
/// makes (only then: a path that JSON cannot hold fails only `--json`).
pub fn say(json: bool, value: impl FnOnce() -> serde_json::Result<Value>, text: &str) -> Result<()> {
    if json {
        println!("{}", json_value(value())?);
    } else {
        println!("{text}");
    }
    Ok(())
}

//! What the `knib` tool prints: plain lines for people, JSON for programs,
//! and progress on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use knib_core::api::BackupView;
use knib_core::catalog::{Manifest, Store, VerifyReport};
use knib_core::Control;
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
pub fn backup_json(store: &Store, m: &Manifest) -> Value {
    serde_json::to_value(BackupView::new(store, m)).expect("a backup view serializes")
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
pub fn print_backup(store: &Store, m: &Manifest, json: bool) {
    if json {
        println!("{}", backup_json(store, m));
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
}

/// Print a list of backups.
pub fn print_list(store: &Store, list: &[Manifest], json: bool) {
    if json {
        let arr: Vec<Value> = list.iter().map(|m| backup_json(store, m)).collect();
        println!("{}", Value::Array(arr));
    } else if list.is_empty() {
        println!("no backups");
    } else {
        for m in list {
            println!("{}", backup_line(m));
        }
    }
}

/// Print verification reports.
pub fn print_verify(reports: &[VerifyReport], json: bool) {
    if json {
        println!("{}", serde_json::to_string(reports).expect("reports serialize"));
        return;
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
}

/// Print a result as JSON or as a line of text.
pub fn say(json: bool, value: &Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

//! Who runs a job: this process as an owner (pid, hostname, boot id, the
//! pid's start time), and whether the owner of a running job still runs.
//!
//! # Invariants
//!
//! - An owner on another host is never judged dead from here
//!   ([`OwnerStatus::OtherHost`]).
//! - On this host an owner is dead when its boot id differs, its pid is gone
//!   or a zombie, or the pid now belongs to a process started at another
//!   time (a reused pid) or the owner records no start time (every runner
//!   records one); a pid that exists but may not be signalled is alive.

use std::fs::{self};
use std::sync::OnceLock;

use super::model::{JobOwner, OwnerStatus};

/// This process, as a job owner.
pub(super) struct Me {
    pub(super) pid: u32,
    pub(super) hostname: String,
    pub(super) boot_id: Option<String>,
    pub(super) pid_start: Option<u64>,
}

pub(super) fn me() -> &'static Me {
    static ME: OnceLock<Me> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        Me { pid, hostname: hostname(), boot_id: boot_id(), pid_start: proc_stat(pid).map(|(_, start)| start) }
    })
}

/// This host's name (`gethostname`), `localhost` when it has none.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return String::from("localhost");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// The state letter and start time of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl JobOwner {
    /// Whether the owner still runs, as far as this host can tell.
    pub fn status(&self) -> OwnerStatus {
        let me = me();
        if self.hostname != me.hostname {
            return OwnerStatus::OtherHost;
        }
        if let (Some(a), Some(b)) = (&self.boot_id, &me.boot_id) {
            if a != b {
                return OwnerStatus::Dead;
            }
        }
        if self.pid == 0 || self.pid > i32::MAX as u32 {
            return OwnerStatus::Dead;
        }
        match proc_stat(self.pid) {
            Some((state, start)) => {
                // knib always records its runner's start time: an owner on
                // this host without one was not written by a runner (a
                // tampered job naming pid 1 held its VM's jobs forever).
                if matches!(state, 'Z' | 'X') || self.pid_start.is_none_or(|s| s != start) {
                    OwnerStatus::Dead
                } else {
                    OwnerStatus::Alive
                }
            }
            None => {
                // SAFETY: signal 0 only checks that the process exists.
                let rc = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
                let err = std::io::Error::last_os_error().raw_os_error();
                if rc == 0 || err == Some(libc::EPERM) {
                    OwnerStatus::Alive
                } else {
                    OwnerStatus::Dead
                }
            }
        }
    }
}

//! The guest agent of a running domain: waiting for it to answer
//! (`guest-sync`) and running a command in the guest (`guest-exec`, polled
//! with `guest-exec-status`).
//!
//! # Invariants
//!
//! - A `guest-sync` id is fresh for every attempt and below 2^53, so an
//!   earlier, stale answer cannot pass for this one and any JSON reader
//!   reads it exactly.
//! - One agent command waits at most [`AGENT_TIMEOUT_SECS`] seconds; a
//!   command in the guest at most the timeout given; a cancellation or the
//!   caller's deadline is seen within 100 ms (200 ms while a command runs).
//! - What the guest did wrong (no answer, a refused command, a bad exit code
//!   or output) is a problem line, never an error: an error is a
//!   cancellation or the caller's deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{qemu_agent_command, Vm};
use crate::error::Result;
use crate::progress::Control;

/// How often the guest agent is asked `guest-sync` while the guest boots.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// How long one agent command may wait for its answer, in seconds.
pub const AGENT_TIMEOUT_SECS: i32 = 5;

/// How long a command run through `guest-exec` may take unless told
/// otherwise.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A command to run in the guest through `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCommand {
    /// The program, an absolute path in the guest (`/bin/cat`).
    pub path: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The exit code it must end with. When neither this nor
    /// `expect_output` is given, the command must exit with 0.
    #[serde(default)]
    pub expect_exit: Option<i64>,
    /// What it must print on its standard output (compared without
    /// trailing white space on either side).
    #[serde(default)]
    pub expect_output: Option<String>,
}

/// An id for `guest-sync` that an earlier, stale answer cannot carry: the
/// time, the pid and a counter mixed (below 2^53, exact in any JSON reader).
fn sync_id() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ COUNTER.fetch_add(1, Ordering::SeqCst).rotate_left(17);
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    x & ((1 << 53) - 1)
}

/// Ask `guest-sync` every [`SYNC_INTERVAL`] until the agent echoes the id or
/// `timeout` from `started` passes: (answered, the last failure).
pub fn wait_for_agent(vm: &Vm, started: Instant, timeout: Duration, ctl: &Control) -> Result<(bool, Option<String>)> {
    // A timeout past what the clock can represent has no end.
    let until = started.checked_add(timeout);
    let mut last_error;
    loop {
        ctl.check("waiting for the guest to boot")?;
        if !vm.is_running().unwrap_or(false) {
            return Ok((false, Some("the domain stopped".into())));
        }
        let id = sync_id();
        let cmd = format!(r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#);
        // libvirt's own message ("Guest agent is not responding: QEMU guest
        // agent is not connected") says enough.
        match vm.dom().qemu_agent_command(&cmd, AGENT_TIMEOUT_SECS) {
            Ok(answer) => match serde_json::from_str::<Value>(&answer) {
                Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => return Ok((true, None)),
                _ => last_error = Some(format!("guest-sync answered {answer:?}, not the id {id}")),
            },
            Err(e) => last_error = Some(e.message().to_string()),
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok((false, last_error));
        }
        // Sleep to the next attempt (the last one at the deadline), in
        // short steps so that a cancellation is seen at once.
        let next = Instant::now() + SYNC_INTERVAL;
        let wake = until.map_or(next, |u| next.min(u));
        while Instant::now() < wake {
            ctl.check("waiting for the guest to boot")?;
            std::thread::sleep(Duration::from_millis(100).min(wake.saturating_duration_since(Instant::now())));
        }
    }
}

/// What a command run through `guest-exec` did, when it ran to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Its exit code, when it exited.
    pub exit: Option<i64>,
    /// The signal that killed it, when one did.
    pub signal: Option<i64>,
    /// Its standard output, decoded (invalid UTF-8 replaced).
    pub stdout: String,
    /// Its standard output as the agent sent it (`out-data`, base64; empty
    /// when the agent sent none).
    pub stdout_base64: String,
    /// Its standard error, decoded.
    pub stderr: String,
}

/// How a command run through `guest-exec` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// It ran to its end.
    Ended(CommandOutcome),
    /// It did not run to its end: the agent refused it, failed, or answered
    /// something unreadable (the message says which, libvirt's own words
    /// where there are some).
    Failed(String),
    /// It had not ended when the timeout ran out.
    TimedOut,
}

fn describe(cmd: &GuestCommand) -> String {
    std::iter::once(cmd.path.as_str()).chain(cmd.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
}

/// Run `cmd` in the guest and wait at most `timeout` (from the
/// `guest-exec`) for its end. `Err` only on a cancellation or the caller's
/// deadline; whatever the guest or its agent did is in the [`Exec`].
pub fn run_command(vm: &Vm, cmd: &GuestCommand, timeout: Duration, ctl: &Control) -> Result<Exec> {
    let shown = describe(cmd);
    let exec = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": cmd.path, "arg": cmd.args, "capture-output": true},
    });
    let answer = match qemu_agent_command(vm, &exec.to_string(), AGENT_TIMEOUT_SECS) {
        Ok(a) => a,
        Err(e) => return Ok(Exec::Failed(e.message)),
    };
    let Some(pid) = serde_json::from_str::<Value>(&answer).ok().and_then(|v| v["return"]["pid"].as_i64()) else {
        return Ok(Exec::Failed(format!("command {shown}: guest-exec answered {answer:?}, without a pid")));
    };
    let until = Instant::now().checked_add(timeout);
    let status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string();
    loop {
        ctl.check(&format!("waiting for command {shown}"))?;
        let answer = match qemu_agent_command(vm, &status, AGENT_TIMEOUT_SECS) {
            Ok(a) => a,
            Err(e) => return Ok(Exec::Failed(format!("command {shown}: guest-exec-status failed: {}", e.message))),
        };
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        let r = &v["return"];
        if r["exited"].as_bool() == Some(true) {
            let text = |key: &str| -> std::result::Result<String, String> {
                match r[key].as_str() {
                    None => Ok(String::new()),
                    Some(b64) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .map_err(|e| format!("command {shown}: its {key} is not base64: {e}")),
                }
            };
            return Ok(match (text("out-data"), text("err-data")) {
                (Ok(stdout), Ok(stderr)) => Exec::Ended(CommandOutcome {
                    exit: r["exitcode"].as_i64(),
                    signal: r["signal"].as_i64(),
                    stdout,
                    stdout_base64: r["out-data"].as_str().unwrap_or_default().to_string(),
                    stderr,
                }),
                (Err(p), _) | (_, Err(p)) => Exec::Failed(p),
            });
        }
        if r.is_null() {
            return Ok(Exec::Failed(format!("command {shown}: guest-exec-status answered {answer:?}")));
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(Exec::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The problem line of a command that did not run to its end.
pub fn exec_problem(cmd: &GuestCommand, exec: &Exec, timeout: Duration) -> Option<String> {
    match exec {
        Exec::Ended(_) => None,
        Exec::Failed(m) if m.starts_with("command ") => Some(m.clone()),
        Exec::Failed(m) => Some(format!("command {} was not started: {m}", describe(cmd))),
        Exec::TimedOut => Some(format!("command {} did not end within {} s", describe(cmd), timeout.as_secs())),
    }
}

/// The problems of a command's outcome against what was expected.
pub fn compare_command(cmd: &GuestCommand, out: &CommandOutcome) -> Vec<String> {
    let shown = describe(cmd);
    let mut problems = Vec::new();
    let expect_exit = match (cmd.expect_exit, &cmd.expect_output) {
        (Some(code), _) => Some(code),
        (None, None) => Some(0),
        (None, Some(_)) => None,
    };
    if let Some(code) = expect_exit {
        if out.exit != Some(code) {
            let got = match (out.exit, out.signal) {
                (Some(c), _) => format!("exited with {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                (None, None) => "ended without an exit code".to_string(),
            };
            let stderr = out.stderr.trim();
            let stderr = if stderr.is_empty() { String::new() } else { format!(" (stderr: {stderr:?})") };
            problems.push(format!("command {shown} {got}, expected exit code {code}{stderr}"));
        }
    }
    if let Some(expected) = &cmd.expect_output {
        if out.stdout.trim_end() != expected.trim_end() {
            problems.push(format!(
                "command {shown} printed {:?}, expected {:?}",
                out.stdout.trim_end(),
                expected.trim_end()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(exit: Option<i64>, stdout: &str) -> CommandOutcome {
        CommandOutcome {
            exit,
            signal: None,
            stdout: stdout.into(),
            stdout_base64: String::new(),
            stderr: String::new(),
        }
    }

    fn cmd(expect_exit: Option<i64>, expect_output: Option<&str>) -> GuestCommand {
        GuestCommand {
            path: "/bin/cat".into(),
            args: vec!["/etc/x".into()],
            expect_exit,
            expect_output: expect_output.map(str::to_string),
        }
    }

    #[test]
    fn compares_commands() {
        assert!(compare_command(&cmd(None, None), &outcome(Some(0), "")).is_empty());
        let p = compare_command(&cmd(None, None), &outcome(Some(1), ""));
        assert_eq!(p, ["command /bin/cat /etc/x exited with 1, expected exit code 0"]);
        assert!(compare_command(&cmd(None, Some("hello\n")), &outcome(Some(3), "hello")).is_empty());
        let p = compare_command(&cmd(Some(0), Some("bye")), &outcome(Some(0), "hello\n"));
        assert_eq!(p, [r#"command /bin/cat /etc/x printed "hello", expected "bye""#]);
        let p = compare_command(&cmd(Some(0), None), &outcome(None, ""));
        assert_eq!(p, ["command /bin/cat /etc/x ended without an exit code, expected exit code 0"]);
    }

    #[test]
    fn sync_ids_differ_and_fit_json() {
        let a = sync_id();
        let b = sync_id();
        assert_ne!(a, b);
        assert!(a < 1 << 53 && b < 1 << 53);
    }
}

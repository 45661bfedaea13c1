//! Running external programs: an argument vector (never a shell), output
//! captured, progress lines parsed, the child killed when the caller cancels
//! or the deadline passes.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

/// What a finished program printed and how it ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output, less progress lines.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// One program to run, with its arguments.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The program (looked up on PATH when not absolute).
    pub program: PathBuf,
    /// Its arguments, one element each.
    pub args: Vec<OsString>,
    /// Parse `(NN.NN/100%)` progress from standard output.
    pub progress_step: Option<String>,
}

impl Invocation {
    /// A new invocation of `program` with no arguments.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Invocation { program: program.into(), args: Vec::new(), progress_step: None }
    }
    /// Add one argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Add several arguments.
    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    /// Report progress lines printed by `-p` under this step name.
    pub fn progress(mut self, step: impl Into<String>) -> Self {
        self.progress_step = Some(step.into());
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Run to the end, or until `ctl` cancels or times out (the child is
    /// then killed and the error says so).
    pub fn run(&self, ctl: &Control) -> Result<Finished> {
        let what = self.display();
        ctl.check(&what)?;
        children_reapable(&self.program)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // A killed knib never leaves a qemu-img writing into the store
        // behind it.
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Io };
            KnibError::new(kind, format!("cannot run {}: {e}", self.program.display()))
        })?;
        let mut out = child.stdout.take().expect("stdout was piped");
        let mut err = child.stderr.take().expect("stderr was piped");
        let progress_ctl = ctl.clone();
        let step = self.progress_step.clone();
        let out_thread = thread::spawn(move || {
            let mut text = Vec::new();
            let mut line = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for &b in &buf[..n] {
                    if b == b'\r' || b == b'\n' {
                        handle_line(&line, &mut text, step.as_deref(), &progress_ctl, b);
                        line.clear();
                    } else {
                        line.push(b);
                    }
                }
            }
            handle_line(&line, &mut text, step.as_deref(), &progress_ctl, b'\n');
            String::from_utf8_lossy(&text).into_owned()
        });
        let err_thread = thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let mut stop: Option<KnibError> = None;
        // Poll soon at first (most runs of qemu-img take milliseconds), then
        // every 20 ms.
        let mut nap = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    // The host reaped the child itself (its own waitpid, or
                    // SIGCHLD ignored since the check above): it is gone,
                    // its pipes close. The reader threads end with them;
                    // joined, so that none reports progress after this call
                    // returns.
                    let _ = out_thread.join();
                    let _ = err_thread.join();
                    let why = if e.raw_os_error() == Some(libc::ECHILD) {
                        " (something else in this process reaped it, so whether it succeeded is unknown: the host must not wait for children it did not start)"
                    } else {
                        ""
                    };
                    return Err(KnibError::new(ErrorKind::Io, format!("waiting for {what}: {e}{why}")));
                }
            }
            if stop.is_none() {
                if ctl.cancel.is_cancelled() {
                    stop = Some(KnibError::new(ErrorKind::Cancelled, format!("cancelled: {what} was killed")));
                } else if ctl.deadline.expired() {
                    stop = Some(ctl.timeout_error(&format!("{what} was killed")));
                }
                if stop.is_some() {
                    let _ = child.kill();
                }
            }
            thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        };
        let stdout = out_thread.join().unwrap_or_default();
        let stderr = err_thread.join().unwrap_or_default();
        if let Some(e) = stop {
            return Err(e);
        }
        if interrupted_with(status, ctl) {
            return Err(KnibError::new(ErrorKind::Cancelled, format!("cancelled: {what} ended by a signal")));
        }
        Ok(Finished { code: status.code(), stdout, stderr })
    }

    /// Run and fail unless the exit code is 0; the error carries `kind` and
    /// the program's last error line.
    pub fn run_ok(&self, ctl: &Control, kind: ErrorKind) -> Result<Finished> {
        let f = self.run(ctl)?;
        if f.code == Some(0) {
            Ok(f)
        } else {
            Err(self.failure(&f, kind))
        }
    }

    /// The error for a run that ended badly.
    pub fn failure(&self, f: &Finished, kind: ErrorKind) -> KnibError {
        let detail = f.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no message)").trim().to_string();
        let code = f.code.map(|c| c.to_string()).unwrap_or_else(|| "a signal".into());
        KnibError::new(kind, format!("{} failed (exit {code}): {detail}", self.display()))
    }
}

fn handle_line(line: &[u8], text: &mut Vec<u8>, step: Option<&str>, ctl: &Control, end: u8) {
    if let Some(step) = step {
        if let Some(p) = parse_progress(line) {
            ctl.report(step, p);
            return;
        }
    }
    if line.iter().all(|b| b.is_ascii_whitespace()) && end == b'\r' {
        return;
    }
    text.extend_from_slice(line);
    text.push(b'\n');
}

/// Whether a child ended by SIGINT or SIGTERM went with its caller's
/// cancellation: a Ctrl-C on a terminal reaches every process of the
/// group, so the child may end before the caller's own cancel is seen (it
/// is waited for a moment). Anything else is the child's own failure.
fn interrupted_with(status: std::process::ExitStatus, ctl: &Control) -> bool {
    use std::os::unix::process::ExitStatusExt;
    if !matches!(status.signal(), Some(libc::SIGINT | libc::SIGTERM)) {
        return false;
    }
    for _ in 0..20 {
        if ctl.cancel.is_cancelled() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Parse a qemu-img `-p` line such as `    (42.17/100%)`.
pub fn parse_progress(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.trim().parse::<f64>().ok()
}

/// Fail, before `program` is started, when this process cannot learn how
/// its children end: SIGCHLD ignored (`SIG_IGN`) or handled with
/// `SA_NOCLDWAIT` makes the kernel reap every child at once, so whether a
/// `qemu-img` that wrote into the store succeeded could never be known
/// (each wait fails with `ECHILD`). Nothing is run then.
pub fn children_reapable(program: &std::path::Path) -> Result<()> {
    // SAFETY: all-zero is a valid `sigaction` (no handler, no flags).
    let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `now` is a valid place to fill.
    if unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut now) } != 0 {
        return Ok(());
    }
    let how = if now.sa_sigaction == libc::SIG_IGN {
        "ignores SIGCHLD (SIG_IGN)"
    } else if now.sa_flags & libc::SA_NOCLDWAIT != 0 {
        "handles SIGCHLD with SA_NOCLDWAIT"
    } else {
        return Ok(());
    };
    Err(KnibError::new(
        ErrorKind::Io,
        format!(
            "cannot run {}: this process {how}, so the kernel reaps knib's children and their exit status is lost; leave SIGCHLD at its default action in the host (nothing was run)",
            program.display()
        ),
    ))
}

/// Have the kernel kill the child `cmd` starts (SIGKILL) when its parent
/// dies: a killed knib leaves no helper of its own behind (a qemu-img
/// writing into the store, a qemu-nbd export holding a disk's lock).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing
    // of the parent's; it only sets the child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{CancelToken, Deadline};
    use parking_lot::Mutex;
    use std::sync::Arc;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_progress(b"    (42.17/100%)"), Some(42.17));
        assert_eq!(parse_progress(b"(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress(b"image: x"), None);
    }

    #[test]
    fn deadline_kills_the_child_and_says_so() {
        let ctl = Control::new().with_deadline(Deadline::after(Duration::from_millis(300)));
        let t = std::time::Instant::now();
        let e = Invocation::new("sleep").arg("30").run(&ctl).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(e.message.contains("sleep 30 was killed"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn cancel_from_another_thread_kills_the_child() {
        let cancel = CancelToken::new();
        let ctl = Control::new().with_cancel(cancel.clone());
        let h = thread::spawn(move || Invocation::new("sleep").arg("30").run(&ctl));
        thread::sleep(Duration::from_millis(200));
        cancel.cancel();
        let e = h.join().unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled);
    }

    /// A Ctrl-C on a terminal reaches the child too: one that ends by
    /// SIGINT just before the caller cancels is cancelled (before: a
    /// failure of the program, "exit a signal"); one that ends by it with
    /// no cancel is the program's own end. The child is perl, which resets
    /// SIGINT to its default first: a shell cannot, and tests started in
    /// the background of a non-interactive shell inherit SIGINT ignored
    /// (`sh -c 'kill -INT $$'` then exits 0, which failed this test once).
    #[test]
    fn a_child_ended_by_sigint_as_the_caller_cancels_is_cancelled() {
        const SELF_SIGINT: [&str; 2] = ["-e", "$SIG{INT} = 'DEFAULT'; kill 'INT', $$; sleep 5; exit 3"];
        let cancel = CancelToken::new();
        let ctl = Control::new().with_cancel(cancel.clone());
        let later = thread::spawn(move || {
            thread::sleep(Duration::from_millis(60));
            cancel.cancel();
        });
        let e = Invocation::new("perl").args(SELF_SIGINT).run(&ctl).unwrap_err();
        later.join().unwrap();
        assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
        let f = Invocation::new("perl").args(SELF_SIGINT).run(&Control::new()).unwrap();
        assert_eq!(f.code, None);
    }

    #[test]
    fn progress_is_reported_and_other_output_kept() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let ctl = Control::new().with_progress(Arc::new(move |p| s2.lock().push(p.percent)));
        let f = Invocation::new("printf")
            .arg("    (0.00/100%%)\r    (50.00/100%%)\rhello\n    (100.00/100%%)\r")
            .progress("copy")
            .run(&ctl)
            .unwrap();
        assert_eq!(*seen.lock(), vec![0.0, 50.0, 100.0]);
        assert_eq!(f.stdout.trim(), "hello");
    }

    #[test]
    fn missing_program_is_not_found() {
        let e = Invocation::new("/nonexistent/knib-tool").run(&Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
    }
}

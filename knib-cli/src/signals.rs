//! Ctrl-C (SIGINT) and SIGTERM: the first one cancels what knib is doing,
//! which then cleans up as any cancelled operation does (temporary files
//! removed, a VM taken off its snapshot overlay) and ends with exit status
//! 16, `cancelled`; a second one ends knib at once, by that signal's
//! default action.

use std::io::{IsTerminal, Write};

use knib_core::progress::CancelToken;

/// Block SIGINT and SIGTERM in this thread, and so in every thread started
/// after it, and start the thread that takes them: the first one cancels
/// `token`, the next one is raised again with its default action. Call
/// before any other thread starts. The children knib runs get an empty
/// mask (the standard library resets it before `exec`), so they still
/// take the signal a terminal sends to the whole process group.
pub fn cancel_on_signals(token: CancelToken) {
    // SAFETY: plain signal-mask calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let taken = std::thread::Builder::new().name("knib-signals".into()).spawn(move || {
        let mut first = true;
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals of `set`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if first {
                first = false;
                token.cancel();
                if std::io::stderr().is_terminal() {
                    let mut e = std::io::stderr();
                    let _ = write!(e, "\r\x1b[Kknib: cancelling (again to end knib at once)\n");
                    let _ = e.flush();
                }
                continue;
            }
            // SAFETY: the signal's default action restored and the signal
            // unblocked in this thread, then raised in it: the process
            // ends as if knib had never taken it.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(sig);
            }
        }
    });
    if let Err(e) = taken {
        // Without the thread the signals would stay blocked: let them act
        // as before.
        log::warn!("cannot start the thread that takes SIGINT and SIGTERM: {e}");
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

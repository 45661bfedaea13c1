//! A panic (a bug) of the library goes to its log, never to stderr.
//!
//! The C and JNI boundaries catch every panic and turn it into an error,
//! but Rust's default panic hook has already written "thread '…' panicked
//! at …" to the process's stderr by then: in the CloudStack agent, the
//! agent's own stderr. [`log_panics`] replaces the hook, once per process,
//! with one that logs the panic (thread, place, message) at error level.
//! The boundaries call it on every entry; the `knib` program does not, and
//! keeps the default hook.

use std::sync::Once;

/// The message a panic was raised with (its payload as text), or
/// "(no message)" for a payload that is not text.
pub fn payload_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Send every panic of this process to the log instead of stderr (idempotent).
pub fn log_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let what = payload_message(info.payload());
            let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_else(|| "?".into());
            let thread = std::thread::current();
            log::error!(
                target: "knib",
                "panic in thread {} at {at}: {what} (a bug in knib; the call that met it fails)",
                thread.name().unwrap_or("unnamed")
            );
        }));
    });
}

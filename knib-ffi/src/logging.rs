//! Forwarding knib's log records to a C callback.

use std::ffi::{c_char, c_void};
use std::sync::{OnceLock, RwLock};

use crate::boundary::{c_string, guard};
use crate::context::UserData;
use crate::result::knib_result;

/// The level of a log record, most severe first. Also the values of
/// `knib_set_log_callback`'s `max_level` (0 turns logging off).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum knib_log_level {
    /// Something failed.
    Error = 1,
    /// Something unexpected that knib handled (an interrupted operation
    /// cleaned up, a full backup taken where an incremental was asked).
    Warn = 2,
    /// One line per operation: its end and how long it took, or its error.
    Info = 3,
    /// Steps inside an operation.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

/// Receives one log record: its level and its text (`"<module>: <what>"`),
/// valid only during the call. Called on whatever thread logged, possibly
/// several at once.
pub type knib_log_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, level: knib_log_level, message: *const c_char)>;

#[derive(Clone, Copy)]
struct Target {
    callback: unsafe extern "C" fn(*mut c_void, knib_log_level, *const c_char),
    userdata: UserData,
}

static TARGET: RwLock<Option<Target>> = RwLock::new(None);

thread_local! {
    /// Whether this thread is inside the C callback: a record it logs
    /// meanwhile is dropped, and it may not change the callback.
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
/// Whether knib's forwarder is the process's logger (decided at the first call).
static INSTALLED: OnceLock<bool> = OnceLock::new();

struct Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        TARGET.read().map(|t| t.is_some()).unwrap_or(false)
    }

    fn log(&self, record: &log::Record<'_>) {
        if IN_CALLBACK.with(|c| c.get()) {
            return;
        }
        // Held during the call: once `knib_set_log_callback` has replaced
        // the callback, the old one is running nowhere and is never called
        // again (its userdata may be freed).
        let guard = match TARGET.read() {
            Ok(t) => t,
            Err(_) => return,
        };
        let Some(t) = *guard else { return };
        let level = match record.level() {
            log::Level::Error => knib_log_level::Error,
            log::Level::Warn => knib_log_level::Warn,
            log::Level::Info => knib_log_level::Info,
            log::Level::Debug => knib_log_level::Debug,
            log::Level::Trace => knib_log_level::Trace,
        };
        let text = c_string(&format!("{}: {}", record.target(), record.args()));
        IN_CALLBACK.with(|c| c.set(true));
        // SAFETY: the caller registered this callback and userdata for log
        // records; `text` lives until it returns.
        unsafe { (t.callback)(t.userdata.0, level, text.as_ptr()) }
        IN_CALLBACK.with(|c| c.set(false));
        drop(guard);
    }

    fn flush(&self) {}
}

static FORWARDER: Forwarder = Forwarder;

/// Send knib's log records up to `max_level` (a `knib_log_level`; 0 = none)
/// to `callback` with `userdata` (which may be NULL), for the whole process;
/// a NULL `callback` stops logging. May be called again to change either:
/// it waits for calls of the previous callback running on other threads,
/// so once it returns the previous callback is never called again and its
/// userdata may be freed. Fails with `KNIB_RESULT_INVALID_INPUT` for a
/// `max_level` above 5, and with `KNIB_RESULT_BUSY` when another Rust
/// logger already serves this process (a program that links knib with
/// other Rust code using the `log` crate) or when called from inside the
/// log callback (records knib logs from inside the callback are dropped).
#[no_mangle]
pub extern "C" fn knib_set_log_callback(
    callback: knib_log_callback,
    userdata: *mut c_void,
    max_level: u32,
) -> knib_result {
    guard(|| {
        let filter = match max_level {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            5 => log::LevelFilter::Trace,
            _ => return knib_result::InvalidInput,
        };
        if IN_CALLBACK.with(|c| c.get()) {
            return knib_result::Busy;
        }
        if !*INSTALLED.get_or_init(|| log::set_logger(&FORWARDER).is_ok()) {
            return knib_result::Busy;
        }
        let target = callback.map(|callback| Target { callback, userdata: UserData(userdata) });
        let mut t = TARGET.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *t = target;
        // Under the same lock: two callers at once leave one's callback
        // with that caller's level, never the other's.
        log::set_max_level(if target.is_some() { filter } else { log::LevelFilter::Off });
        drop(t);
        knib_result::Ok
    })
}

//! The one panic boundary every entry point goes through, the failure it
//! records, and the checks of raw arguments.

use std::any::Any;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use knib_core::KnibError;

use crate::result::knib_result;

/// A failed call: its code and what the context's last error will say.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    pub code: knib_result,
    pub message: String,
    pub vm_consistent: Option<bool>,
}

impl Fail {
    pub fn new(code: knib_result, message: impl Into<String>) -> Self {
        Fail { code, message: message.into(), vm_consistent: None }
    }

    /// A NULL given for argument `name`.
    pub fn null(name: &str) -> Self {
        Fail::new(knib_result::NullArgument, format!("null argument: `{name}` is NULL"))
    }

    /// A caught panic with payload `p`.
    pub fn panic(p: &(dyn Any + Send)) -> Self {
        let what = knib_core::panic_log::payload_message(p);
        Fail::new(knib_result::Panic, format!("panic: knib panicked (a bug) and recovered: {what}"))
    }
}

impl From<KnibError> for Fail {
    fn from(e: KnibError) -> Self {
        Fail { code: e.kind.into(), message: e.to_string(), vm_consistent: e.vm_consistent }
    }
}

/// Run `f`, turning a panic into [`knib_result::Panic`]. Every entry point
/// runs inside this (directly or through `context::with_context`).
pub(crate) fn guard(f: impl FnOnce() -> knib_result) -> knib_result {
    knib_core::panic_log::log_panics();
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(knib_result::Panic)
}

/// Run `f` for an entry point that returns nothing; a panic is swallowed.
pub(crate) fn guard_void(f: impl FnOnce()) {
    knib_core::panic_log::log_panics();
    let _ = catch_unwind(AssertUnwindSafe(f));
}

/// Run `f`, turning a panic into a [`Fail`].
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, Fail>) -> Result<T, Fail> {
    knib_core::panic_log::log_panics();
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(Fail::panic(&*p)))
}

/// Fail unless `p` is non-NULL.
pub(crate) fn non_null<T>(p: *const T, name: &str) -> Result<(), Fail> {
    if p.is_null() {
        Err(Fail::null(name))
    } else {
        Ok(())
    }
}

/// The UTF-8 text of C string argument `name`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn text<'a>(p: *const c_char, name: &str) -> Result<&'a str, Fail> {
    non_null(p, name)?;
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| Fail::new(knib_result::InvalidInput, format!("invalid input: `{name}` is not UTF-8: {e}")))
}

/// `s` as a C string; a NUL byte inside (never in knib's JSON, which
/// escapes it) becomes U+FFFD.
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{fffd}")).unwrap_or_default()
}

//! `knib_context`: the handle C holds, and the table of live contexts.
//!
//! A handle is a token of `knib_core::session::Handles`, never a pointer
//! knib dereferences: it is looked up in the table of live contexts on every
//! call, so a freed, never-allocated or garbage handle gives
//! [`knib_result::BadHandle`], never undefined behaviour. Tokens are never
//! reused. A running call holds its own reference to the context, so freeing
//! a context while another thread runs an operation on it is safe (the
//! operation finishes, then the context goes). The settings, cancellation
//! and one-operation-at-a-time rule are `knib_core::session::Session`'s,
//! shared with the JNI bridge.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use knib_core::session::{Handles, Session};
use knib_core::Progress;
use parking_lot::Mutex;

use crate::boundary::{c_string, catch, guard, guard_void, non_null, Fail};
use crate::result::knib_result;

/// An opaque context: the settings (progress callback, time budget), the
/// cancellation and the last error of the operations run with it.
///
/// Made by `knib_context_new`, owned by the caller, released once by
/// `knib_context_free`. One operation at a time per context (a second one
/// started meanwhile fails with `KNIB_RESULT_BUSY`, leaving the last error
/// to the operation running); it may be used from any
/// thread, and `knib_context_cancel` may be called from another thread while
/// an operation runs. Use one context per thread for parallel operations.
pub struct knib_context {
    _opaque: [u8; 0],
}

/// Receives the progress of an operation: `step` names what is being done
/// ("convert ...", "commit ...") and `percent` is that step's progress, 0 to
/// 100. Called on a thread of knib's (not always the caller's) while the
/// operation runs, never after it returned; `step` is valid only during the
/// call.
pub type knib_progress_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, step: *const c_char, percent: f64)>;

/// A `void *` given by the caller, handed back to its callback on whatever
/// thread knib calls it from: the caller promised that this is safe.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub *mut c_void);
// SAFETY: knib only passes the pointer back to the caller's own callback;
// the header documents that callbacks may run on other threads.
unsafe impl Send for UserData {}
// SAFETY: as above; knib never reads through it.
unsafe impl Sync for UserData {}

#[derive(Clone, Copy)]
struct ProgressTarget {
    callback: unsafe extern "C" fn(*mut c_void, *const c_char, f64),
    userdata: UserData,
}

impl ProgressTarget {
    fn report(&self, p: &Progress) {
        let step = c_string(&p.step);
        // SAFETY: the caller gave this callback and userdata for progress
        // reports; `step` lives until it returns.
        unsafe { (self.callback)(self.userdata.0, step.as_ptr(), p.percent) }
    }
}

/// The state behind a handle: the shared session, and the last error.
#[derive(Default)]
pub(crate) struct Context {
    pub session: Session,
    last_error: Mutex<Option<Fail>>,
}

/// What a call does with the context's last error.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// An operation: clears it on success, sets it on failure.
    Operation,
    /// A setting: sets it on failure.
    Setting,
    /// Reads it: never changes it.
    Reader,
}

impl Context {
    fn set_error(&self, fail: Fail) {
        *self.last_error.lock() = Some(fail);
    }

    fn clear_error(&self) {
        *self.last_error.lock() = None;
    }
}

/// Handles are `TAG + n * 16`: on 64-bit machines a non-canonical address,
/// so a C program that dereferences one by mistake faults at once.
const TAG: u64 = if usize::BITS == 64 { 0x6b6e_6962_0000_0000 } else { 0x1000_0000 };

static CONTEXTS: Handles<Context> = Handles::new(TAG);

fn register(ctx: Context) -> *mut knib_context {
    CONTEXTS.insert(ctx) as usize as *mut knib_context
}

fn find(h: *const knib_context) -> Result<Arc<Context>, knib_result> {
    if h.is_null() {
        return Err(knib_result::NullArgument);
    }
    CONTEXTS.get(h as usize as u64).ok_or(knib_result::BadHandle)
}

/// The shape of every entry point that takes a context: find the context
/// (NULL and dead handles give their codes), run `f` behind the panic
/// boundary, and record its failure in the context as `record` says; a
/// "busy" failure is never recorded (the last error is the running
/// operation's).
pub(crate) fn with_context(
    h: *const knib_context,
    record: Record,
    f: impl FnOnce(&Context) -> Result<(), Fail>,
) -> knib_result {
    guard(|| {
        let ctx = match find(h) {
            Ok(c) => c,
            Err(code) => return code,
        };
        match catch(|| f(&ctx)) {
            Ok(()) => {
                if record == Record::Operation {
                    ctx.clear_error();
                }
                knib_result::Ok
            }
            Err(fail) => {
                let code = fail.code;
                // A call refused because the context runs another
                // operation leaves the last error alone: it is the running
                // operation's, which sets it when it ends (or has just set
                // it, and its caller is about to read it). An operation's
                // own "busy" (a VM another process backs up) is its error.
                // (The whole message, as the session makes it: an
                // operation's busy error that quotes the text is its own.)
                let context_busy = code == knib_result::Busy
                    && fail.message == knib_core::KnibError::busy(knib_core::session::CONTEXT_BUSY).to_string();
                if record != Record::Reader && !context_busy {
                    ctx.set_error(fail);
                }
                code
            }
        }
    })
}

/// Make a new context (no progress callback, no time limit) and write its
/// handle to `*context_out`.
///
/// # Safety
/// `context_out` is NULL or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn knib_context_new(context_out: *mut *mut knib_context) -> knib_result {
    guard(|| {
        if context_out.is_null() {
            return knib_result::NullArgument;
        }
        let h = register(Context::default());
        // SAFETY: non-NULL and writable, as the caller promised.
        unsafe { *context_out = h };
        knib_result::Ok
    })
}

/// Release a context. NULL, and a handle that is not live (already freed,
/// never made), are ignored. The handle is dead from now on; an operation
/// still running on it on another thread goes on to its end (cancel it
/// first to stop it), calling its callbacks, and the context is released
/// when it returns.
#[no_mangle]
pub extern "C" fn knib_context_free(context: *mut knib_context) {
    guard_void(|| {
        if !context.is_null() {
            drop(CONTEXTS.remove(context as usize as u64));
        }
    })
}

/// Set (or, with a NULL `callback`, remove) the progress callback of the
/// context's next operations. `userdata` is handed back to each call; it
/// may be NULL. The callback may run on a thread that is not the caller's.
#[no_mangle]
pub extern "C" fn knib_context_set_progress(
    context: *mut knib_context,
    callback: knib_progress_callback,
    userdata: *mut c_void,
) -> knib_result {
    with_context(context, Record::Setting, |ctx| {
        let sink = callback.map(|callback| {
            let target = ProgressTarget { callback, userdata: UserData(userdata) };
            Arc::new(move |p: &Progress| target.report(p)) as knib_core::ProgressSink
        });
        ctx.session.set_progress(sink);
        Ok(())
    })
}

/// Set the time budget of each of the context's next operations, in
/// seconds; 0 or less means no limit (the default), and so does a budget
/// too large for the clock (`INT64_MAX`). An operation still
/// working when its budget runs out stops (any external program it runs is
/// killed) and fails with `KNIB_RESULT_TIMEOUT`.
#[no_mangle]
pub extern "C" fn knib_context_set_timeout(context: *mut knib_context, seconds: i64) -> knib_result {
    with_context(context, Record::Setting, |ctx| {
        ctx.session.set_timeout(seconds);
        Ok(())
    })
}

/// Ask the operation running on the context to stop; it then fails with
/// `KNIB_RESULT_CANCELLED`, having removed what it had written (a backup or
/// compression leaves no partial file). Safe to call from any thread at any
/// time. When no operation is running, the next one to start on the context
/// is cancelled at once. Either way the context is usable again once the
/// cancelled operation has returned.
#[no_mangle]
pub extern "C" fn knib_context_cancel(context: *mut knib_context) -> knib_result {
    with_context(context, Record::Setting, |ctx| {
        ctx.session.cancel();
        Ok(())
    })
}

/// Copy the message of the context's last error, NUL-terminated, into
/// `buf` of `len` bytes, and write its size (with the NUL) to `*needed`.
/// The message is empty when the last operation succeeded. When `len` is
/// too small, nothing is copied, `*needed` is written all the same, and the
/// result is `KNIB_RESULT_BUFFER_TOO_SMALL`. This call leaves the last error
/// as it is.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes; `needed` is NULL or
/// points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn knib_context_error_message(
    context: *const knib_context,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> knib_result {
    with_context(context, Record::Reader, |ctx| {
        non_null(buf, "buf")?;
        non_null(needed, "needed")?;
        let message = ctx.last_error.lock().as_ref().map(|f| c_string(&f.message)).unwrap_or_default();
        let bytes = message.as_bytes_with_nul();
        // SAFETY: `needed` is non-NULL and writable, as the caller promised.
        unsafe { *needed = bytes.len() };
        if len < bytes.len() {
            return Err(Fail::new(knib_result::BufferTooSmall, "buffer too small"));
        }
        // SAFETY: `buf` has `len` >= `bytes.len()` writable bytes, and a
        // fresh CString cannot overlap the caller's buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len()) };
        Ok(())
    })
}

/// Write to `*consistent_out` whether the last failed backup left the VM
/// consistent: 1 yes, 0 no (run `knib_recover`), -1 unknown or not about a
/// VM (no error, or an operation that does not touch a VM's disks).
///
/// # Safety
/// `consistent_out` is NULL or points to a writable `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn knib_context_error_vm_consistent(
    context: *const knib_context,
    consistent_out: *mut i32,
) -> knib_result {
    with_context(context, Record::Reader, |ctx| {
        non_null(consistent_out, "consistent_out")?;
        let v = match ctx.last_error.lock().as_ref().and_then(|f| f.vm_consistent) {
            Some(true) => 1,
            Some(false) => 0,
            None => -1,
        };
        // SAFETY: non-NULL and writable, as the caller promised.
        unsafe { *consistent_out = v };
        Ok(())
    })
}

//! The boundary seen from Rust; the C programs in `tests/c` test it from C.

use std::ffi::{c_char, CStr};
use std::ptr;

use crate::context::*;
use crate::ops::*;
use crate::*;

fn new_context() -> *mut knib_context {
    let mut ctx = ptr::null_mut();
    // SAFETY: `ctx` is a writable pointer.
    assert_eq!(unsafe { knib_context_new(&mut ctx) }, knib_result::Ok);
    ctx
}

fn message(ctx: *mut knib_context) -> String {
    let mut buf = [0 as c_char; 1024];
    let mut needed = 0;
    // SAFETY: `buf` has `buf.len()` bytes, `needed` is writable.
    let r = unsafe { knib_context_error_message(ctx, buf.as_mut_ptr(), buf.len(), &mut needed) };
    assert_eq!(r, knib_result::Ok);
    // SAFETY: written NUL-terminated on success.
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

#[test]
fn version_defines_match_cargo_toml() {
    assert_eq!(KNIB_VERSION_MAJOR.to_string(), env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(KNIB_VERSION_MINOR.to_string(), env!("CARGO_PKG_VERSION_MINOR"));
    assert_eq!(KNIB_VERSION_PATCH.to_string(), env!("CARGO_PKG_VERSION_PATCH"));
    let define = format!("#define KNIB_VERSION \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(include_str!("../cbindgen.toml").contains(&define), "cbindgen.toml lacks {define}");
    assert_eq!(KNIB_SCHEMA, knib_core::api::SCHEMA);
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(knib_version()) };
    assert_eq!(v.to_str().expect("ASCII"), env!("CARGO_PKG_VERSION"));
}

#[test]
fn an_answer_comes_back_and_is_freed() {
    let ctx = new_context();
    let mut answer: *mut c_char = ptr::null_mut();
    // SAFETY: valid strings and a writable out-pointer.
    let r = unsafe { knib_call(ctx, c"version".as_ptr(), c"{}".as_ptr(), &mut answer) };
    assert_eq!(r, knib_result::Ok);
    // SAFETY: an answer string from knib.
    let text = unsafe { CStr::from_ptr(answer) }.to_string_lossy().into_owned();
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    // SAFETY: freed once.
    unsafe { knib_string_free(answer) };
    knib_context_free(ctx);
}

#[test]
fn nulls_bad_handles_and_panics_come_back_as_codes() {
    let ctx = new_context();
    let mut answer: *mut c_char = ptr::null_mut();
    // SAFETY: NULLs are allowed to be given; the rest is valid.
    unsafe {
        assert_eq!(knib_context_new(ptr::null_mut()), knib_result::NullArgument);
        assert_eq!(knib_list(ptr::null_mut(), c"{}".as_ptr(), &mut answer), knib_result::NullArgument);
        assert_eq!(knib_list(ctx, ptr::null(), &mut answer), knib_result::NullArgument);
        assert!(message(ctx).contains("`request_json` is NULL"));
        assert_eq!(knib_call(ctx, ptr::null(), c"{}".as_ptr(), &mut answer), knib_result::NullArgument);
        assert!(message(ctx).contains("`op` is NULL"));
        assert_eq!(knib_list(ctx, c"{}".as_ptr(), ptr::null_mut()), knib_result::NullArgument);
        assert!(answer.is_null());

        let e = knib_list(ctx, cr#"{"store": "/nonexistent", "vmm": "x"}"#.as_ptr(), &mut answer);
        assert_eq!(e, knib_result::InvalidInput);
        assert!(message(ctx).contains("unknown field `vmm`"), "{}", message(ctx));
        let bad = 0x1234_5670 as *mut knib_context;
        assert_eq!(knib_list(bad, c"{}".as_ptr(), &mut answer), knib_result::BadHandle);

        assert_eq!(knib_test_panic(ctx), knib_result::Panic);
        assert!(message(ctx).contains("knib_test_panic was called"));
        assert_eq!(knib_call(ctx, c"version".as_ptr(), c"{}".as_ptr(), &mut answer), knib_result::Ok);
        assert_eq!(message(ctx), "");
        knib_string_free(answer);
        knib_context_free(ctx);
        assert_eq!(knib_context_cancel(ctx), knib_result::BadHandle);
        knib_context_free(ctx);
        knib_context_free(ptr::null_mut());
    }
}

/// Replacing the log callback waits for calls of the old one running on
/// other threads (after it returns, the old userdata may be freed), and
/// the callback cannot replace itself (it would wait for itself).
#[test]
fn replacing_the_log_callback_waits_for_its_running_calls() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    static EVENTS: Mutex<Vec<&str>> = Mutex::new(Vec::new());
    static STARTED: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn slow(_: *mut std::ffi::c_void, _: crate::logging::knib_log_level, text: *const c_char) {
        // SAFETY: knib passes a NUL-terminated string valid during the call.
        if !unsafe { CStr::from_ptr(text) }.to_string_lossy().contains("slow record") {
            return;
        }
        let inside = crate::logging::knib_set_log_callback(None, ptr::null_mut(), 0);
        EVENTS.lock().expect("events").push(if inside == knib_result::Busy { "busy" } else { "changed from inside" });
        STARTED.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(300));
        EVENTS.lock().expect("events").push("callback ended");
    }
    assert_eq!(crate::logging::knib_set_log_callback(Some(slow), ptr::null_mut(), 2), knib_result::Ok);
    let t = std::thread::spawn(|| log::warn!("slow record"));
    while !STARTED.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(crate::logging::knib_set_log_callback(None, ptr::null_mut(), 0), knib_result::Ok);
    EVENTS.lock().expect("events").push("replaced");
    t.join().expect("the logging thread");
    assert_eq!(*EVENTS.lock().expect("events"), ["busy", "callback ended", "replaced"]);
}

/// A cancel made while no operation runs cancels the next one, whatever it
/// is: `version` and `delete` take no control and never looked at it, so
/// the cancel was used up unseen and `delete` went ahead. The call after
/// runs normally.
#[test]
fn a_cancel_between_operations_cancels_the_next_one_whatever_it_is() {
    let ctx = new_context();
    let mut answer: *mut c_char = ptr::null_mut();
    // SAFETY: valid strings and a writable out-pointer.
    unsafe {
        assert_eq!(knib_context_cancel(ctx), knib_result::Ok);
        assert_eq!(knib_call(ctx, c"version".as_ptr(), c"{}".as_ptr(), &mut answer), knib_result::Cancelled);
        assert!(answer.is_null());
        assert!(message(ctx).contains("version: cancelled before it started"), "{}", message(ctx));
        assert_eq!(knib_call(ctx, c"version".as_ptr(), c"{}".as_ptr(), &mut answer), knib_result::Ok);
        knib_string_free(answer);
        answer = ptr::null_mut();

        let delete = cr#"{"store": "/nonexistent/knib-store", "backup": "b1"}"#;
        assert_eq!(knib_context_cancel(ctx), knib_result::Ok);
        assert_eq!(knib_delete(ctx, delete.as_ptr(), &mut answer), knib_result::Cancelled, "{}", message(ctx));
        assert_eq!(knib_delete(ctx, delete.as_ptr(), &mut answer), knib_result::NotFound, "{}", message(ctx));
        assert!(answer.is_null());
    }
    knib_context_free(ctx);
}

/// A call with a NULL argument on a context whose operation runs is
/// refused as busy, as any second operation on it is (the header says
/// so); before, its arguments were checked first and it failed with
/// NULL_ARGUMENT, its error recorded in the running operation's context.
/// The operation then ends as it would have.
#[test]
fn a_null_argument_on_a_busy_context_is_busy() {
    use std::sync::Mutex;
    static INSIDE: Mutex<Vec<knib_result>> = Mutex::new(Vec::new());
    static CTX: Mutex<usize> = Mutex::new(0);
    unsafe extern "C" fn progress(_: *mut std::ffi::c_void, _: *const c_char, _: f64) {
        let ctx = *CTX.lock().expect("ctx") as *mut knib_context;
        let mut answer: *mut c_char = ptr::null_mut();
        // SAFETY: a valid operation name and out-pointer; the NULL request is the point.
        let r = unsafe { knib_call(ctx, c"list".as_ptr(), ptr::null(), &mut answer) };
        INSIDE.lock().expect("inside").push(r);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let f = dir.path().join("v.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&f)
        .arg("4M")
        .status()
        .expect("qemu-img runs");
    assert!(st.success());
    let ctx = new_context();
    *CTX.lock().expect("ctx") = ctx as usize;
    assert_eq!(knib_context_set_progress(ctx, Some(progress), ptr::null_mut()), knib_result::Ok);
    let request = std::ffi::CString::new(serde_json::json!({"files": [f]}).to_string()).expect("no NUL");
    let mut answer: *mut c_char = ptr::null_mut();
    // SAFETY: valid strings and a writable out-pointer.
    let r = unsafe { knib_call(ctx, c"agent.compress".as_ptr(), request.as_ptr(), &mut answer) };
    assert_eq!(r, knib_result::Ok, "{}", message(ctx));
    assert_eq!(message(ctx), "");
    // SAFETY: an answer knib gave, freed once.
    unsafe { knib_string_free(answer) };
    let inside = INSIDE.lock().expect("inside").clone();
    assert!(!inside.is_empty() && inside.iter().all(|r| *r == knib_result::Busy), "{inside:?}");
    knib_context_free(ctx);
}

//! The JNI bridge of knib (`libknib_jni.so`), loaded by the Java classes of
//! package `io.knib` (see `java/README.md`). It translates and holds no
//! logic: every operation is `knib_core::api::call` with a JSON request, run
//! through a `knib_core::session::Session` found by its handle.
//!
//! The native methods are the static methods of `io.knib.NativeLib`:
//!
//! | method | what |
//! |---|---|
//! | `String version()` | knib's version |
//! | `long contextNew()` | a new context; its handle is a token |
//! | `void contextClose(long)` | release it (a dead handle is ignored) |
//! | `String call(long, String op, String json)` | run `op`; the JSON answer |
//! | `void cancel(long)` | stop the call running on the context (a dead handle is ignored) |
//! | `void setTimeout(long, long seconds)` | the time budget of each call |
//! | `void setProgressListener(long, ProgressListener)` | `null` removes it |
//! | `boolean setLogLevel(int)` | forward knib's logs up to this level |
//! | `void testPanic(long)` | tests only: panics inside knib (debug builds; a release build throws `UnsupportedOperationException`) |
//!
//! Every native method runs inside one panic boundary
//! (`boundary::guard`): a failure is thrown as the `KnibException`
//! subclass of its kind (message, kind, and whether the VM was left
//! consistent), a panic as `KnibPanicError` (an unchecked `Error`: a bug
//! is not an operational failure), a dead handle as
//! `IllegalStateException` (but for `contextClose` and `cancel`, which
//! ignore it); no panic ever reaches the JVM. Progress
//! listeners are called on whatever thread reports progress (attached to
//! the JVM for the call), each call in its own local reference frame; an
//! exception a listener throws is cleared and logged. The native context
//! holds its listener weakly (the `Knib` object holds it strongly), so a
//! listener that refers to an unclosed `Knib` does not keep it alive.

#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]

mod boundary;
mod logging;

use std::ffi::c_void;
use std::sync::Arc;

use jni::objects::{JClass, JObject, JString, JValue, WeakRef};
use jni::sys::{jboolean, jint, jlong, jstring, JNI_FALSE, JNI_TRUE, JNI_VERSION_1_8};
use jni::{JNIEnv, JavaVM};
use knib_core::session::{Handles, Session};
use knib_core::Progress;

use boundary::{guard, text, Failure};

pub use knib_core::VERSION;

/// Handles are `TAG + n * 16`: a non-canonical address on 64-bit machines.
const TAG: u64 = 0x6b6e_6a6e_0000_0000;

static CONTEXTS: Handles<Session> = Handles::new(TAG);

fn session(handle: jlong) -> Result<Arc<Session>, Failure> {
    CONTEXTS.get(handle as u64).ok_or(Failure::BadHandle(handle))
}

/// The JNI version this library needs.
#[no_mangle]
pub extern "system" fn JNI_OnLoad(_vm: *mut jni::sys::JavaVM, _reserved: *mut c_void) -> jint {
    JNI_VERSION_1_8
}

/// `String NativeLib.version()`.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_version<'l>(mut env: JNIEnv<'l>, _class: JClass<'l>) -> jstring {
    guard(&mut env, std::ptr::null_mut(), |env| Ok(env.new_string(VERSION)?.into_raw()))
}

/// `long NativeLib.contextNew()`.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_contextNew<'l>(mut env: JNIEnv<'l>, _class: JClass<'l>) -> jlong {
    guard(&mut env, 0, |_| Ok(CONTEXTS.insert(Session::new()) as jlong))
}

/// `void NativeLib.contextClose(long)`: a dead handle is ignored.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_contextClose<'l>(mut env: JNIEnv<'l>, _class: JClass<'l>, handle: jlong) {
    guard(&mut env, (), |_| {
        drop(CONTEXTS.remove(handle as u64));
        Ok(())
    })
}

/// `String NativeLib.call(long, String op, String json)`.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_call<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    op: JString<'l>,
    request: JString<'l>,
) -> jstring {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let s = session(handle)?;
        let op = text(env, &op, "op")?;
        let request = text(env, &request, "request")?;
        let answer = s.call(&op, &request)?;
        Ok(env.new_string(answer)?.into_raw())
    })
}

/// `void NativeLib.cancel(long)`: a dead handle is ignored, as by
/// `contextClose`. `Knib.cancel()` reads its handle, then calls this: a
/// `close()` on another thread in between releases the handle, and cancel
/// is documented to do nothing on a closed context.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_cancel<'l>(mut env: JNIEnv<'l>, _class: JClass<'l>, handle: jlong) {
    guard(&mut env, (), |_| {
        if let Some(s) = CONTEXTS.get(handle as u64) {
            s.cancel();
        }
        Ok(())
    })
}

/// `void NativeLib.setTimeout(long, long seconds)`.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_setTimeout<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    seconds: jlong,
) {
    guard(&mut env, (), |_| {
        session(handle)?.set_timeout(seconds);
        Ok(())
    })
}

/// A Java `ProgressListener`, called from whatever thread reports. It is
/// held weakly: the `Knib` object holds it strongly in a field, so a
/// listener that refers to its `Knib` (a lambda using it) does not keep an
/// unclosed `Knib` from being collected and its context released, as a
/// global reference, which is a root to the collector, did.
struct JavaProgress {
    vm: JavaVM,
    listener: WeakRef,
}

impl JavaProgress {
    fn report(&self, p: &Progress) {
        let Ok(mut env) = self.vm.attach_current_thread() else { return };
        let _ = env.with_local_frame(4, |env| -> jni::errors::Result<()> {
            // Collected only once its `Knib` was: nobody is listening.
            let Some(listener) = self.listener.upgrade_local(env)? else { return Ok(()) };
            let step = env.new_string(&p.step)?;
            let r = env.call_method(
                &listener,
                "onProgress",
                "(Ljava/lang/String;D)V",
                &[JValue::Object(&step), JValue::Double(p.percent)],
            );
            if env.exception_check()? {
                env.exception_clear()?;
                log::warn!(target: "knib_jni", "the progress listener threw an exception (ignored) at {}: {:.0}%", p.step, p.percent);
            }
            r.map(|_| ())
        });
        // A JNI call that failed before the check above (the string's
        // OutOfMemoryError, the frame's push) leaves its exception pending:
        // it must not reach the next JNI call of this thread.
        if env.exception_check().unwrap_or(false) {
            let _ = env.exception_clear();
        }
    }
}

/// `void NativeLib.setProgressListener(long, ProgressListener)`.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_setProgressListener<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    listener: JObject<'l>,
) {
    guard(&mut env, (), |env| {
        let s = session(handle)?;
        if listener.is_null() {
            s.set_progress(None);
        } else {
            let Some(weak) = env.new_weak_ref(&listener)? else { return Err(Failure::Null("listener")) };
            let target = JavaProgress { vm: env.get_java_vm()?, listener: weak };
            s.set_progress(Some(Arc::new(move |p: &Progress| target.report(p))));
        }
        Ok(())
    })
}

/// `boolean NativeLib.setLogLevel(int)`: 0 off, 1 error, 2 warn, 3 info,
/// 4 debug, 5 trace. False when another Rust logger serves the process.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_setLogLevel<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    level: jint,
) -> jboolean {
    guard(&mut env, JNI_FALSE, |env| Ok(if logging::set_level(env, level)? { JNI_TRUE } else { JNI_FALSE }))
}

/// `void NativeLib.testPanic(long)`: tests only, in debug builds. Panics
/// inside knib while the context runs an operation, to show that the panic
/// arrives as a `KnibPanicError` and that the JVM and the context go on. A
/// release build has no such hook: it throws `UnsupportedOperationException`.
#[no_mangle]
pub extern "system" fn Java_io_knib_NativeLib_testPanic<'l>(mut env: JNIEnv<'l>, _class: JClass<'l>, handle: jlong) {
    guard(&mut env, (), |env| {
        let s = session(handle)?;
        #[cfg(debug_assertions)]
        {
            let _ = env;
            s.exclusive(|| -> Result<(), knib_core::KnibError> {
                panic!("knib test panic: NativeLib.testPanic was called")
            })?;
        }
        #[cfg(not(debug_assertions))]
        {
            drop(s);
            env.throw_new(
                "java/lang/UnsupportedOperationException",
                "testPanic exists in debug builds of knib-jni only",
            )?;
        }
        Ok(())
    })
}

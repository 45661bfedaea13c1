//! The one panic boundary every native method goes through, and how a
//! failure becomes a Java exception.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use jni::objects::{JString, JThrowable, JValue};
use jni::sys::jlong;
use jni::JNIEnv;
use knib_core::{ErrorKind, KnibError};

/// Why a native method failed.
pub(crate) enum Failure {
    /// An error of knib: thrown as the `KnibException` subclass of its kind.
    Knib(KnibError),
    /// knib panicked (a bug, not a failure): thrown as `KnibPanicError`,
    /// an unchecked `java.lang.Error`.
    Panic(String),
    /// The handle is not a live context: `IllegalStateException`.
    BadHandle(jlong),
    /// A `null` given for a parameter that needs a value: `NullPointerException`.
    Null(&'static str),
    /// A JNI call failed; a Java exception may be pending already.
    Jni(jni::errors::Error),
}

impl From<KnibError> for Failure {
    fn from(e: KnibError) -> Self {
        Failure::Knib(e)
    }
}

impl From<jni::errors::Error> for Failure {
    fn from(e: jni::errors::Error) -> Self {
        Failure::Jni(e)
    }
}

impl Failure {
    fn panic(p: &(dyn Any + Send)) -> Self {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Failure::Panic(format!("internal: knib panicked (a bug) and recovered: {what}"))
    }
}

/// The Java class thrown for a panic: a bug is an unchecked `Error`, not a
/// `KnibException`.
pub(crate) const PANIC_ERROR: &str = "io/knib/KnibPanicError";

/// The Java class of the exception of each kind (a `KnibException`
/// subclass whose constructor takes the message and whether the VM was left
/// consistent: 1 yes, 0 no, -1 unknown).
pub(crate) fn exception_class(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "io/knib/NotFoundException",
        ErrorKind::Busy => "io/knib/BusyException",
        ErrorKind::InvalidInput => "io/knib/InvalidInputException",
        ErrorKind::NoSpace => "io/knib/NoSpaceException",
        ErrorKind::Timeout => "io/knib/KnibTimeoutException",
        ErrorKind::Cancelled => "io/knib/CancelledException",
        ErrorKind::ImageTool => "io/knib/ImageToolException",
        ErrorKind::Hypervisor => "io/knib/HypervisorException",
        ErrorKind::Io => "io/knib/KnibIoException",
        ErrorKind::Corrupt => "io/knib/CorruptException",
        ErrorKind::VmInconsistent => "io/knib/VmInconsistentException",
        ErrorKind::Internal => "io/knib/InternalException",
    }
}

/// Run the body of a native method: its value, or `default` with a Java
/// exception thrown for its failure or panic. No panic leaves this function.
pub(crate) fn guard<'local, T>(
    env: &mut JNIEnv<'local>,
    default: T,
    f: impl FnOnce(&mut JNIEnv<'local>) -> Result<T, Failure>,
) -> T {
    knib_core::panic_log::log_panics();
    let outcome = catch_unwind(AssertUnwindSafe(|| f(env)));
    let failure = match outcome {
        Ok(Ok(v)) => return v,
        Ok(Err(failure)) => failure,
        Err(p) => Failure::panic(&*p),
    };
    // Throwing must not panic either.
    let _ = catch_unwind(AssertUnwindSafe(|| throw(env, failure)));
    default
}

/// Throw the exception of `failure`, unless one is pending already (a
/// failed JNI call's, which says more).
fn throw(env: &mut JNIEnv<'_>, failure: Failure) {
    if env.exception_check().unwrap_or(true) {
        return;
    }
    let (class, message, consistent) = match failure {
        Failure::Knib(e) => {
            let consistent = match e.vm_consistent {
                Some(true) => 1,
                Some(false) => 0,
                None => -1,
            };
            (exception_class(e.kind), e.to_string(), consistent)
        }
        Failure::Panic(message) => {
            let _ = env.throw_new(PANIC_ERROR, &message);
            if !env.exception_check().unwrap_or(true) {
                let _ = env.throw_new("java/lang/Error", message);
            }
            return;
        }
        Failure::BadHandle(h) => {
            let _ = env.throw_new(
                "java/lang/IllegalStateException",
                format!("knib context handle {h:#x} is not live: it was closed, or never made"),
            );
            return;
        }
        Failure::Null(what) => {
            let _ = env.throw_new("java/lang/NullPointerException", format!("{what} is null"));
            return;
        }
        Failure::Jni(e) => {
            let _ = env.throw_new("java/lang/IllegalStateException", format!("knib: a JNI call failed: {e}"));
            return;
        }
    };
    let made = env.with_local_frame(4, |env| -> jni::errors::Result<()> {
        let text = env.new_string(&message)?;
        let obj = env.new_object(class, "(Ljava/lang/String;I)V", &[JValue::Object(&text), JValue::Int(consistent)])?;
        env.throw(JThrowable::from(obj))
    });
    if made.is_err() && !env.exception_check().unwrap_or(true) {
        let _ = env.throw_new("java/lang/IllegalStateException", format!("{message} (and {class} could not be made)"));
    }
}

/// The text of string parameter `what`.
pub(crate) fn text(env: &mut JNIEnv<'_>, s: &JString<'_>, what: &'static str) -> Result<String, Failure> {
    if s.is_null() {
        return Err(Failure::Null(what));
    }
    Ok(env.get_string(s)?.into())
}

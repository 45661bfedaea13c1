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
        let what = knib_core::panic_log::payload_message(p);
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

/// The text of string parameter `what`. A Java string that is no text (a
/// lone UTF-16 surrogate) is refused as invalid input naming `what`, as the
/// C API refuses bytes that are not UTF-8: the jni crate's own conversion
/// would replace it with U+FFFD, and knib would act on another string (look
/// for another file) than the one given.
pub(crate) fn text(env: &mut JNIEnv<'_>, s: &JString<'_>, what: &'static str) -> Result<String, Failure> {
    if s.is_null() {
        return Err(Failure::Null(what));
    }
    let chars = env.get_string(s)?;
    from_modified_utf8(chars.to_bytes())
        .map_err(|e| Failure::Knib(KnibError::invalid(format!("`{what}` is not valid Unicode: {e}"))))
}

/// A string from the JVM's modified UTF-8 (each UTF-16 unit encoded on its
/// own, NUL as `C0 80`): an error naming the first lone surrogate, or the
/// first malformed byte (the JVM makes none).
fn from_modified_utf8(bytes: &[u8]) -> Result<String, String> {
    // The same bytes as UTF-8 unless there is a NUL, a surrogate or a
    // malformed byte, all of which UTF-8 refuses.
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok(s.to_owned());
    }
    let continuation = |i: usize| bytes.get(i).filter(|b| *b & 0xc0 == 0x80).map(|b| u16::from(b & 0x3f));
    let mut units = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = u16::from(bytes[i]);
        let (unit, len) = match (bytes[i], continuation(i + 1), continuation(i + 2)) {
            (0x00..=0x7f, _, _) => (b, 1),
            (0xc0..=0xdf, Some(c1), _) => ((b & 0x1f) << 6 | c1, 2),
            (0xe0..=0xef, Some(c1), Some(c2)) => ((b & 0x0f) << 12 | c1 << 6 | c2, 3),
            _ => return Err(format!("malformed modified UTF-8 at byte {i}")),
        };
        units.push(unit);
        i += len;
    }
    let mut text = String::with_capacity(bytes.len());
    for (at, c) in char::decode_utf16(units.iter().copied()).enumerate() {
        match c {
            Ok(c) => text.push(c),
            Err(e) => {
                return Err(format!(
                    "a lone UTF-16 surrogate U+{:04X} (char {at}), which is no character",
                    e.unpaired_surrogate()
                ))
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::from_modified_utf8;

    fn refused(bytes: &[u8]) -> String {
        from_modified_utf8(bytes).err().unwrap_or_else(|| panic!("{bytes:x?} was taken"))
    }

    #[test]
    fn modified_utf8_is_decoded_and_lone_surrogates_are_refused() {
        assert_eq!(from_modified_utf8(b"/tmp/a").as_deref(), Ok("/tmp/a"));
        assert_eq!(from_modified_utf8("\u{e9}\u{fffd}".as_bytes()).as_deref(), Ok("\u{e9}\u{fffd}"));
        // NUL is C0 80; U+1F600 is the pair D83D DE00, each unit on its own.
        assert_eq!(from_modified_utf8(b"a\xc0\x80b").as_deref(), Ok("a\0b"));
        assert_eq!(from_modified_utf8(b"x\xed\xa0\xbd\xed\xb8\x80y").as_deref(), Ok("x\u{1f600}y"));
        let lone_high = refused(b"/tmp/a\xed\xa0\x80");
        assert!(lone_high.contains("U+D800 (char 6)"), "{lone_high}");
        let lone_low = refused(b"\xed\xb0\x80");
        assert!(lone_low.contains("U+DC00 (char 0)"), "{lone_low}");
        let reversed = refused(b"\xed\xb8\x80\xed\xa0\xbd");
        assert!(reversed.contains("U+DE00"), "{reversed}");
        assert!(refused(b"a\xe9").contains("malformed modified UTF-8 at byte 1"));
        assert!(from_modified_utf8(b"\xf0\x9f\x98\x80").is_ok(), "plain UTF-8 of U+1F600 (the JVM never gives it)");
    }
}

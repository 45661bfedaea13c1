//! The result code of every fallible entry point, with fixed numbers.

use std::ffi::c_char;

use knib_core::ErrorKind;

/// The result of every fallible knib function. The numbers are fixed: 0 is
/// success, 1 to 12 are the kinds of knib's errors (the same numbers as the
/// Java binding's and, plus 10, the `knib` tool's exit status), and 100 and
/// up are failures of the C boundary itself. Read the message of a failure
/// with `knib_context_error_message`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum knib_result {
    /// Success; the outputs were written.
    Ok = 0,
    /// A backup, volume, file or domain that was named does not exist.
    NotFound = 1,
    /// Another operation holds the VM (or this context) right now; try later.
    Busy = 2,
    /// The request is wrong: bad JSON, an unknown or missing field, a field of
    /// the wrong type (the message names the field), a bad name or option,
    /// a string argument that is not UTF-8.
    InvalidInput = 3,
    /// Not enough free space where the work would write.
    NoSpace = 4,
    /// The context's time budget ran out; what the operation started was stopped.
    Timeout = 5,
    /// The operation was cancelled with `knib_context_cancel`.
    Cancelled = 6,
    /// `qemu-img` (or another image tool) failed.
    ImageTool = 7,
    /// libvirt or QEMU refused or failed.
    Hypervisor = 8,
    /// Reading or writing a file failed.
    Io = 9,
    /// Stored data is damaged.
    Corrupt = 10,
    /// A backup failed and left the VM with extra layers or a half-done
    /// merge: run `knib_recover` before its next backup.
    VmInconsistent = 11,
    /// A bug in knib (an invariant broken).
    Internal = 12,
    /// A pointer argument that must not be NULL was NULL.
    NullArgument = 100,
    /// knib panicked (a bug); the panic was caught and the process goes on.
    /// The context stays usable.
    Panic = 101,
    /// The caller's buffer is too small; `*needed` holds the size to give.
    BufferTooSmall = 102,
    /// The context handle is not a live context: never made by
    /// `knib_context_new`, or already freed.
    BadHandle = 103,
}

impl From<ErrorKind> for knib_result {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::NotFound => knib_result::NotFound,
            ErrorKind::Busy => knib_result::Busy,
            ErrorKind::InvalidInput => knib_result::InvalidInput,
            ErrorKind::NoSpace => knib_result::NoSpace,
            ErrorKind::Timeout => knib_result::Timeout,
            ErrorKind::Cancelled => knib_result::Cancelled,
            ErrorKind::ImageTool => knib_result::ImageTool,
            ErrorKind::Hypervisor => knib_result::Hypervisor,
            ErrorKind::Io => knib_result::Io,
            ErrorKind::Corrupt => knib_result::Corrupt,
            ErrorKind::VmInconsistent => knib_result::VmInconsistent,
            ErrorKind::Internal => knib_result::Internal,
        }
    }
}

/// A short, static, lower-case name of a result code ("ok", "not found",
/// "null argument", ...); "unknown" for a number that is no code. Never
/// NULL; never free it.
#[no_mangle]
pub extern "C" fn knib_result_name(code: u32) -> *const c_char {
    let name: &'static std::ffi::CStr = match code {
        0 => c"ok",
        1 => c"not found",
        2 => c"busy",
        3 => c"invalid input",
        4 => c"no space",
        5 => c"timeout",
        6 => c"cancelled",
        7 => c"image tool failed",
        8 => c"hypervisor",
        9 => c"I/O",
        10 => c"corrupt",
        11 => c"VM left inconsistent",
        12 => c"internal",
        100 => c"null argument",
        101 => c"panic",
        102 => c"buffer too small",
        103 => c"bad handle",
        _ => c"unknown",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [ErrorKind; 12] = ErrorKind::ALL;

    #[test]
    fn codes_are_the_core_kinds_numbers_and_names() {
        for kind in KINDS {
            let code = knib_result::from(kind) as u32;
            assert_eq!(code, kind.code(), "{kind:?}");
            // SAFETY: knib_result_name returns a static NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(knib_result_name(code)) };
            assert_eq!(name.to_str().expect("ASCII"), kind.as_str());
        }
        assert_eq!(knib_result::Ok as u32, 0);
        assert_eq!(knib_result::NullArgument as u32, 100);
        assert_eq!(knib_result::Panic as u32, 101);
        assert_eq!(knib_result::BufferTooSmall as u32, 102);
        assert_eq!(knib_result::BadHandle as u32, 103);
    }
}

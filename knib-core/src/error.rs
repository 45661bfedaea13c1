//! One error type for all of knib, with kinds a caller can act on.
//!
//! Every binding maps [`ErrorKind`] to its own shape (a C result code, a Java
//! exception class, a CLI exit status); the numbers in [`ErrorKind::code`] are
//! fixed and shared by all of them.

use std::fmt;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A backup, volume, file or domain that was named does not exist.
    NotFound,
    /// Another operation holds the VM (or the object) right now; try later.
    Busy,
    /// The request itself is wrong: a bad name, a bad option, a wrong format.
    InvalidInput,
    /// Not enough free space where the work would write.
    NoSpace,
    /// The operation's time budget ran out; what it started was stopped.
    Timeout,
    /// The operation was cancelled by the caller.
    Cancelled,
    /// `qemu-img` (or another image tool) failed.
    ImageTool,
    /// libvirt or QEMU refused or failed.
    Hypervisor,
    /// Reading or writing a file failed.
    Io,
    /// Stored data is damaged (a manifest that does not parse, an image that
    /// fails its check, a hash that does not match).
    Corrupt,
    /// A backup failed and the VM was left with extra layers or a half-done
    /// merge: it needs `recover`/`cleanup` before its next backup.
    VmInconsistent,
    /// A bug in knib (a panic caught at a boundary, an invariant broken),
    /// or an output knib wrote that does not read back as written (a fault
    /// of the host or of knib; its source is sound, and a retry may work).
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order of their codes.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::NotFound,
        ErrorKind::Busy,
        ErrorKind::InvalidInput,
        ErrorKind::NoSpace,
        ErrorKind::Timeout,
        ErrorKind::Cancelled,
        ErrorKind::ImageTool,
        ErrorKind::Hypervisor,
        ErrorKind::Io,
        ErrorKind::Corrupt,
        ErrorKind::VmInconsistent,
        ErrorKind::Internal,
    ];

    /// The kind an error's text (`"<kind>: <message>"`, as [`KnibError`]
    /// displays) starts with; `None` when it starts with none.
    pub fn of_message(text: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| text.strip_prefix(k.as_str()).is_some_and(|rest| rest.starts_with(':')))
    }

    /// The fixed number of this kind, shared by the C and Java bindings.
    pub fn code(self) -> u32 {
        match self {
            ErrorKind::NotFound => 1,
            ErrorKind::Busy => 2,
            ErrorKind::InvalidInput => 3,
            ErrorKind::NoSpace => 4,
            ErrorKind::Timeout => 5,
            ErrorKind::Cancelled => 6,
            ErrorKind::ImageTool => 7,
            ErrorKind::Hypervisor => 8,
            ErrorKind::Io => 9,
            ErrorKind::Corrupt => 10,
            ErrorKind::VmInconsistent => 11,
            ErrorKind::Internal => 12,
        }
    }

    /// A short lower-case name ("not found", "busy", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Busy => "busy",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::ImageTool => "image tool failed",
            ErrorKind::Hypervisor => "hypervisor",
            ErrorKind::Io => "I/O",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::VmInconsistent => "VM left inconsistent",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every fallible knib operation. Shown as `<kind>: <message>`,
/// then whether the VM was left consistent when that is known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{kind}: {message}{}", consistency_note(*.vm_consistent))]
pub struct KnibError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// One line naming what was wrong (the object, the path, the step).
    pub message: String,
    /// For a failed backup: whether the VM was left consistent (its disks run
    /// on `base <- one delta` and nothing of the failed backup is on the
    /// store). `None` when the operation does not touch a VM's disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_consistent: Option<bool>,
    /// Where the failure arose; not serialized (a caller over JSON has the
    /// kind and the message), so an error read back from its JSON is
    /// [`Origin::Local`] and does not equal one marked otherwise.
    #[serde(skip)]
    pub origin: Origin,
}

/// Where a [`KnibError`] arose, for a caller that goes on past some
/// failures and not others (a sync of a whole store goes on past one VM's
/// but not past the vault's own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Origin {
    /// In knib or on this host (the store, a disk, a hypervisor).
    #[default]
    Local,
    /// In a request to a vault's object store: the vault unreachable,
    /// refusing the credentials, without its bucket, or the request failing
    /// on its way (a body that could not be read while it was sent, too).
    Vault,
}

impl KnibError {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        KnibError { kind, message: message.into(), vm_consistent: None, origin: Origin::Local }
    }
    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// Shorthand for [`ErrorKind::Busy`].
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, message)
    }
    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// Shorthand for [`ErrorKind::Hypervisor`].
    pub fn hypervisor(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Hypervisor, message)
    }
    /// An I/O error on `path` while doing `what`.
    pub fn io(what: &str, path: &std::path::Path, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{what} {}: {err}", path.display()))
    }
    /// The same error with `context` put in front of its message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
    /// The same error, marked as arising in `origin`.
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }
    /// The same error, saying whether the VM was left consistent.
    pub fn with_vm_consistent(mut self, consistent: bool) -> Self {
        self.vm_consistent = Some(consistent);
        if !consistent {
            self.kind = ErrorKind::VmInconsistent;
        }
        self
    }
}

/// What [`KnibError`]'s text says after its message about the VM.
fn consistency_note(vm_consistent: Option<bool>) -> &'static str {
    match vm_consistent {
        Some(true) => " (the VM was left consistent)",
        Some(false) => " (the VM was left inconsistent: run recover)",
        None => "",
    }
}

/// The result of every fallible knib operation.
pub type Result<T, E = KnibError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_kind_message_and_the_vm_state() {
        let e = KnibError::busy("vm1 is being backed up");
        assert_eq!(e.to_string(), "busy: vm1 is being backed up");
        assert_eq!(
            e.clone().with_vm_consistent(true).to_string(),
            "busy: vm1 is being backed up (the VM was left consistent)"
        );
        assert_eq!(
            e.with_vm_consistent(false).to_string(),
            "VM left inconsistent: vm1 is being backed up (the VM was left inconsistent: run recover)"
        );
        let boxed: Box<dyn std::error::Error> = Box::new(KnibError::internal("x"));
        assert_eq!(boxed.to_string(), "internal: x");
    }
}

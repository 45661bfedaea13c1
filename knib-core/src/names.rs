//! Names that come from callers (VM names, volume names, backup ids) are
//! used as file names in the store. They must never escape the directory
//! they are meant for: only `[A-Za-z0-9._-]`, not starting with a dot, at
//! most 128 bytes.

use crate::error::{KnibError, Result};

/// Check that `name` is a safe single path component; `what` says what the
/// name is ("VM name", "volume name", "backup id") in the error.
pub fn validate(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(KnibError::invalid(format!("{what} is empty")));
    }
    if name.len() > 128 {
        return Err(KnibError::invalid(format!("{what} {name:?} is longer than 128 bytes")));
    }
    if name.starts_with('.') || name.contains("..") {
        return Err(KnibError::invalid(format!(
            "{what} {name:?} starts with a dot or contains \"..\": it could escape the store"
        )));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(KnibError::invalid(format!(
            "{what} {name:?} contains {c:?}: only letters, digits, '.', '_' and '-' are allowed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn escaping_names_are_refused() {
        for bad in ["../x", "a/b", "..", ".hidden", "", "a b", "x\0y", "a/../../etc"] {
            let e = validate("VM name", bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.message.starts_with("VM name"), "{e}");
        }
        for good in ["vm-1", "i-2-34-VM", "root.disk", "ROOT_5"] {
            validate("VM name", good).unwrap();
        }
    }
}

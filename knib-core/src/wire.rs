//! The wire format every operation shares: how a JSON request is read, how
//! an answer is written, and the errors a bad request gives. It sits below
//! every module that takes requests ([`crate::agent`], [`crate::files`])
//! and below the dispatcher ([`crate::api`]), and imports none of them, so
//! the request modules never import the dispatcher.
//!
//! # Invariants
//!
//! - A request is a JSON object, no key repeated in any object of it. Its `"schema"` field, when present, is
//!   checked and removed here, once: any number but [`SCHEMA`] is refused,
//!   and no request struct carries the field.
//! - Unknown, missing and mistyped fields are `invalid input` errors that
//!   name the operation and the field's path, e.g. "request of
//!   agent.restore: missing field \`volume_path\`" or "... field
//!   \`coroutines\`: invalid type ...".
//! - Answers are serialized here; a failure to serialize is `internal`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{KnibError, Result};

/// The request schema version.
pub const SCHEMA: u32 = 1;

/// The default libvirt URI (libvirt's `SYSTEM_URI`, named here too so a
/// knib built without libvirt has it).
pub const DEFAULT_URI: &str = "qemu:///system";

/// The JSON object of the request of `op`, its `"schema"` field checked
/// and removed.
pub fn object(op: &str, json: &str) -> Result<Value> {
    crate::json::check_unique_keys(json.as_bytes())
        .map_err(|e| KnibError::invalid(format!("request of {op} is not valid JSON: {e}")))?;
    let mut v: Value = serde_json::from_str(json)
        .map_err(|e| KnibError::invalid(format!("request of {op} is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(KnibError::invalid(format!("request of {op} must be a JSON object")));
    };
    if let Some(s) = obj.remove("schema") {
        if s.as_u64() != Some(SCHEMA as u64) {
            return Err(KnibError::invalid(format!(
                "request of {op}: field `schema` is {s}; this knib reads schema {SCHEMA}"
            )));
        }
    }
    Ok(v)
}

/// The request of `op` from its JSON object, errors naming the field.
pub fn from_value<T: DeserializeOwned>(op: &str, v: Value) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            KnibError::invalid(format!("request of {op}: {inner}"))
        } else {
            KnibError::invalid(format!("request of {op}: field `{path}`: {inner}"))
        }
    })
}

/// The request of `op` from its JSON text: [`object`], then [`from_value`].
pub fn parse<T: DeserializeOwned>(op: &str, json: &str) -> Result<T> {
    from_value(op, object(op, json)?)
}

/// `v`, or the error naming field `field` of the request of `op` missing.
pub fn need<T>(op: &str, field: &str, v: Option<T>) -> Result<T> {
    v.ok_or_else(|| KnibError::invalid(format!("request of {op}: missing field `{field}`")))
}

/// An answer as JSON.
pub fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| KnibError::internal(format!("answer does not serialize: {e}")))
}

/// Fail unless `p` (field `field` of the request of `op`) is absolute: a
/// relative one would be read from the working directory of whatever
/// process hosts knib. A `..` component is refused too.
pub fn absolute(op: &str, field: &str, p: &Path) -> Result<()> {
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        // One file under two spellings (`/pool/x/../v` and `/pool/v`) was
        // taken for two: a backup file that was the volume's new delta.
        Err(KnibError::invalid(format!(
            "request of {op}: field `{field}`: {} has a `..` component; name the file without one",
            p.display()
        )))
    } else if p.is_absolute() {
        Ok(())
    } else if p.as_os_str().is_empty() {
        Err(KnibError::invalid(format!("request of {op}: field `{field}` is empty")))
    } else {
        Err(KnibError::invalid(format!("request of {op}: field `{field}`: {} is not an absolute path", p.display())))
    }
}

/// [`absolute`] for the `store` field of an operation that needs a store
/// directory: a vault (`s3://BUCKET/PREFIX`) there is named as one.
pub fn store_dir(op: &str, p: &Path) -> Result<()> {
    if p.to_str().is_some_and(crate::vault::is_vault) {
        return Err(KnibError::invalid(format!(
            "request of {op}: field `store`: {} is a vault, and {op} needs a store directory (a vault takes {})",
            p.display(),
            crate::vault::VAULT_TAKES
        )));
    }
    absolute(op, "store", p)
}

/// [`absolute`] for a `store` field that may also name a vault
/// (`s3://BUCKET/PREFIX`).
pub fn store_or_vault(op: &str, field: &str, p: &Path) -> Result<()> {
    if p.to_str().is_some_and(crate::vault::is_vault) {
        return Ok(());
    }
    absolute(op, field, p)
}

/// Fail when list `v` (field `field` of the request of `op`) is empty.
pub fn non_empty<T>(op: &str, field: &str, v: &[T]) -> Result<()> {
    if v.is_empty() {
        Err(KnibError::invalid(format!("request of {op}: field `{field}` is empty")))
    } else {
        at_most(op, field, v)
    }
}

/// The most entries a list of a request may have (volumes, files, merges):
/// a VM has far fewer disks, and the files of a request are compared with
/// each other.
pub const MAX_LIST: usize = 256;

/// Fail when list `field` of a request of `op` has more than [`MAX_LIST`]
/// entries.
pub fn at_most<T>(op: &str, field: &str, v: &[T]) -> Result<()> {
    if v.len() > MAX_LIST {
        return Err(KnibError::invalid(format!(
            "request of {op}: field `{field}` has {} entries, more than the {MAX_LIST} a request may have",
            v.len()
        )));
    }
    Ok(())
}

/// Fail when a backup request of `op` asks for `check_output` without
/// `compress` (`compressed`): the read-back reads compressed files.
pub fn check_goes_with_compress(op: &str, check_output: bool, compressed: bool) -> Result<()> {
    if check_output && !compressed {
        return Err(KnibError::invalid(format!(
            "request of {op}: field `check_output` goes with `compress` (it reads the compressed files back)"
        )));
    }
    Ok(())
}

/// The error of an operation that needs libvirt in a knib built without it.
pub fn no_libvirt(op: &str) -> KnibError {
    KnibError::invalid(format!("{op} needs libvirt, and this knib was built without it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_must_be_absolute_and_without_dot_dot() {
        absolute("op", "f", Path::new("/pool/v.qcow2")).unwrap();
        for (p, says) in [
            (
                "/pool/x/../v.qcow2",
                "request of op: field `f`: /pool/x/../v.qcow2 has a `..` component; name the file without one",
            ),
            ("../v", "request of op: field `f`: ../v has a `..` component; name the file without one"),
            ("v", "request of op: field `f`: v is not an absolute path"),
            ("", "request of op: field `f` is empty"),
        ] {
            let e = absolute("op", "f", Path::new(p)).unwrap_err();
            assert_eq!((e.kind, e.message.as_str()), (crate::ErrorKind::InvalidInput, says), "{p}");
        }
    }
}

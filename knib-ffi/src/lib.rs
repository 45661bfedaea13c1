//! The C ABI of knib: `libknib.so` / `libknib.a` and `include/knib.h`
//! (generated from this crate by cbindgen; the conventions are in the
//! header's preamble, `knib-ffi/cbindgen.toml`).
//!
//! This crate translates and holds no logic: every operation is
//! `knib_core::api::call` with a JSON request, and this crate turns its
//! `KnibError` into a `knib_result` code plus a message kept in the
//! context. Every entry point runs inside one panic boundary
//! (`boundary::guard`).

#![deny(missing_docs)]
#![allow(non_camel_case_types)] // C names: knib_context, knib_result, ...
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::unwrap_used)]

mod boundary;
pub mod context;
pub mod logging;
pub mod ops;
pub mod result;

pub use context::{knib_context, knib_progress_callback};
pub use logging::{knib_log_callback, knib_log_level};
pub use result::knib_result;

use std::ffi::c_char;

// `KNIB_VERSION` (the text) is written by cbindgen.toml's `after_includes`,
// as cbindgen emits no string constants; `tests.rs` checks all four.

/// The major version of this header; `knib_version()` tells the library's.
pub const KNIB_VERSION_MAJOR: u32 = 0;
/// The minor version of this header.
pub const KNIB_VERSION_MINOR: u32 = 1;
/// The patch version of this header.
pub const KNIB_VERSION_PATCH: u32 = 0;
/// The version of the JSON request schema this header documents.
pub const KNIB_SCHEMA: u32 = 1;

/// The library's version ("0.1.0"): a static string, never freed. Compare
/// it with `KNIB_VERSION` to catch a header and a library that differ.
#[no_mangle]
pub extern "C" fn knib_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests;

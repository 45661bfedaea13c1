//! The C ABI of knib. Filled by the C-bindings work; for now it only links the core.
pub use knib_core::VERSION;

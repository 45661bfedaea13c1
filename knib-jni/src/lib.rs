//! The JNI bridge of knib. Filled by the Java-bindings work; for now it only links the core.
pub use knib_core::VERSION;

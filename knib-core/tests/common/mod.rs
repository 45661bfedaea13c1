//! Helpers shared by the integration tests.

pub mod bitmaps;
pub mod disk;
pub mod guest;
pub mod model;
pub mod vm;

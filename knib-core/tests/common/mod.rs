//! Helpers shared by the integration tests.

pub mod disk;
pub mod vm;
pub mod model;

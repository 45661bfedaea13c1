//! knib-core: native incremental backups of KVM virtual machines whose disks
//! are qcow2 files.
//!
//! Layers, bottom up (see the README):
//! - ground: [`error`], [`lock`] (the file locks: the VM's record lock, the
//!   job queue's `flock`, QEMU's OFD image locks), [`json`], [`fsio`]
//!   (atomic writes, free space), [`progress`], [`names`], [`hash`] (the
//!   xxh3-128 of a chain's files);
//! - parts: [`process`] and [`qemu_img`] (external programs, run safely),
//!   `libvirt` (running VMs: domains, their XML, block jobs, the guest
//!   agent, screenshots), [`qcow2`] (images and chains read and written
//!   natively);
//! - [`engine`]: the operations of the CloudStack KVM agent, path-based and
//!   stateless (take, merge, restore, overlay, compress, finalize, hash);
//! - [`catalog`]: standalone backup chains in a store directory, with
//!   manifests, chain policy, locks and safe deletion;
//! - the one API: [`wire`] (reading requests, writing answers; below
//!   everything that takes requests), the request modules [`agent`] and
//!   [`files`], and on top [`api`], the one typed set of operations and its
//!   dispatcher, which nothing below imports.

#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod catalog;
pub mod crashpoint;
#[cfg(feature = "libvirt")]
mod dynlib;
pub mod engine;
pub mod error;
pub mod files;
pub mod fsio;
pub mod hash;
pub mod json;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod lock;
pub mod names;
#[cfg(feature = "libvirt")]
pub mod nbd;
pub mod nbd_server;
pub mod panic_log;
pub mod process;
pub mod progress;
pub mod qcow2;
pub mod qemu_img;
pub mod session;
pub mod vault;
pub mod wire;

pub use error::{ErrorKind, KnibError, Origin, Result};
pub use progress::{CancelToken, Control, Deadline, Progress, ProgressSink};

/// The version of knib (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

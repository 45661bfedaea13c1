//! The libvirt part: domains, their disks and chains, disk-only snapshots,
//! block jobs and the QEMU monitor and guest agent.
//!
//! [`Hypervisor`] is a connection (`qemu:///system`), [`Vm`] one domain.
//! libvirt's C library is loaded on the first connection, not when the
//! process starts (`ffi` says why and how); its calls are wrapped once,
//! here, in [`blockjob`] and in [`backup`], and every libvirt failure becomes a
//! [`KnibError`] of kind [`ErrorKind::Hypervisor`] (or
//! [`ErrorKind::NotFound`] for a domain that does not exist) whose message
//! names the call, the domain and the disk.
//!
//! What works on which domain state (libvirt 9.0, QEMU 7.2):
//! - running domain: everything here.
//! - stopped, persistent domain: [`Vm::snapshot_disk_only`] works (libvirt
//!   creates the overlays with `qemu-img` itself, with absolute backing
//!   names, and rewrites the persistent definition; `quiesce` is ignored),
//!   but its XML carries no backing chain, so [`Vm::disks`] shows no
//!   backing layers. Block jobs and the monitor and agent commands fail
//!   (mostly "domain is not running"; a block commit without a base says
//!   "could not find base image in chain"): use `qemu-img` instead.
//!
//! libvirt prints every error on the process's stderr unless an error
//! handler is set, and a library must not write there. Before knib opens
//! its first connection it sets libvirt's process-wide handler (once), and
//! on each of its connections their own, to `log_libvirt_error`: libvirt's
//! reports go to knib's log (errors at debug level, as knib returns them as
//! [`KnibError`]s anyway; warnings at warn level). A host that wants its own
//! process-wide handler sets it after knib's first connection.

pub mod backup;
pub mod blockjob;
pub mod blockwait;
pub mod boot_domain;
mod ffi;
pub mod freeze;
pub mod guest;
pub mod qemu;
pub mod screenshot;
pub mod xml;

use crate::fsio::same_file;
use std::fmt;
use std::os::raw::c_void;
use std::path::{Path, PathBuf};
use std::sync::Once;

use ffi::{Conn, Dom, VirtError};

use crate::error::{ErrorKind, KnibError, Result};

pub use blockjob::{
    block_commit, block_job_abort, block_job_info, block_pull, BlockJobInfo, BlockJobKind, CommitFlags, PullFlags,
};
pub use blockwait::{commit_and_wait, pull_and_wait, wait_block_job};
pub use qemu::{qemu_agent_command, qemu_monitor_command_hmp, qemu_monitor_command_qmp};
pub use xml::{disk_targets, parse_disks, replace_disk_sources, snapshot_xml, BackingLayer, DiskInfo};

/// The URI of the local system QEMU driver, the default of every request's
/// `connect` field (the wire names it too, for builds without libvirt).
pub const SYSTEM_URI: &str = "qemu:///system";

/// Domain `name` on the hypervisor at `uri` (default [`SYSTEM_URI`]);
/// [`ErrorKind::NotFound`] when there is none.
pub fn domain(uri: Option<&str>, name: &str) -> Result<Vm> {
    Hypervisor::open(uri.unwrap_or(SYSTEM_URI))?.domain(name)
}

/// The disk of `vm` (its disks being `disks`) whose active file is `path`
/// (the same file: symbolic links and `..` resolved);
/// [`ErrorKind::NotFound`] naming the disks there are when none is.
pub fn disk_on<'a>(vm: &Vm, disks: &'a [DiskInfo], path: &Path) -> Result<&'a DiskInfo> {
    disks.iter().find(|d| same_file(&d.file, path)).ok_or_else(|| {
        KnibError::not_found(format!(
            "domain {} has no disk running on {} (its disks: {})",
            vm.name(),
            path.display(),
            describe_disks(disks)
        ))
    })
}

/// Disks as `target on file, ...`, for messages.
pub fn describe_disks(disks: &[DiskInfo]) -> String {
    disks.iter().map(|d| format!("{} on {}", d.target, d.file.display())).collect::<Vec<_>>().join(", ")
}

/// A libvirt error as a [`KnibError`]: `what` names the call and its
/// object. A missing domain becomes [`ErrorKind::NotFound`], the rest
/// [`ErrorKind::Hypervisor`].
fn virt_error(what: impl fmt::Display, e: &VirtError) -> KnibError {
    let kind = if e.code() == ffi::VIR_ERR_NO_DOMAIN { ErrorKind::NotFound } else { ErrorKind::Hypervisor };
    KnibError::new(kind, format!("{what}: {}", e.message()))
}

/// The calling thread's last libvirt error as a [`KnibError`] (see
/// [`virt_error`]), right after the failed call on `dom`.
fn last_virt_error(dom: &Dom, what: impl fmt::Display) -> KnibError {
    virt_error(what, &VirtError::last(dom.api))
}

/// libvirt's error handler of knib (process-wide and on each connection):
/// the report goes to knib's log instead of stderr. Never unwinds into C.
unsafe extern "C" fn log_libvirt_error(_user_data: *mut c_void, error: *mut ffi::virError) {
    if error.is_null() {
        return;
    }
    // SAFETY: libvirt passes a valid `virError` that lives for this call;
    // its message is NULL or a NUL-terminated string.
    let (code, domain, level, message) = unsafe {
        let e = &*error;
        (e.code, e.domain, e.level, ffi::c_str(e.message).unwrap_or_else(|| "(no message)".into()))
    };
    let _ = std::panic::catch_unwind(|| {
        if level == ffi::VIR_ERR_WARNING {
            log::warn!(target: "knib::libvirt", "libvirt warning (code {code}, domain {domain}): {message}");
        } else {
            log::debug!(target: "knib::libvirt", "libvirt error (code {code}, domain {domain}): {message}");
        }
    });
}

/// Set libvirt's process-wide error handler to [`log_libvirt_error`], once:
/// errors raised outside a connection (a connection that cannot be opened)
/// would otherwise be printed on stderr.
fn install_error_handler(api: &ffi::Api) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handler is a `'static` function that only reads the
        // error it is given; a null user-data pointer is allowed.
        unsafe { (api.virSetErrorFunc)(std::ptr::null_mut(), Some(log_libvirt_error)) };
    });
}

/// A connection to libvirt.
pub struct Hypervisor {
    conn: Conn,
    uri: String,
}

impl fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hypervisor").field("uri", &self.uri).finish()
    }
}

impl Hypervisor {
    /// Connect to `uri` (`qemu:///system`, see [`SYSTEM_URI`]), read-write.
    pub fn open(uri: &str) -> Result<Self> {
        let api = ffi::api().map_err(|e| e.context(format_args!("cannot connect to libvirt at {uri}")))?;
        install_error_handler(api);
        let conn = Conn::open(api, uri)
            .map_err(|e| KnibError::hypervisor(format!("cannot connect to libvirt at {uri}: {}", e.message())))?;
        // SAFETY: `conn` owns a valid connection pointer for the duration of
        // the call; the handler is a `'static` function that only reads the
        // error it is given, and a null user-data pointer is allowed. The
        // thread's last error is still recorded for `virGetLastError`.
        unsafe { (conn.api().virConnSetErrorFunc)(conn.as_ptr(), std::ptr::null_mut(), Some(log_libvirt_error)) };
        Ok(Hypervisor { conn, uri: uri.to_string() })
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The connection, for the calls wrapped in this module's parts.
    pub(crate) fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The domain called `name`; [`ErrorKind::NotFound`] when there is none.
    pub fn domain(&self, name: &str) -> Result<Vm> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Vm { dom, name: name.to_string() }),
            Err(e) if e.code() == ffi::VIR_ERR_NO_DOMAIN => {
                Err(KnibError::not_found(format!("domain {name} does not exist")))
            }
            Err(e) => Err(virt_error(format_args!("looking up domain {name} at {}", self.uri), &e)),
        }
    }

    /// Every domain, running or not.
    pub fn domains(&self) -> Result<Vec<Vm>> {
        let doms = self
            .conn
            .list_all_domains()
            .map_err(|e| virt_error(format_args!("listing the domains at {}", self.uri), &e))?;
        doms.into_iter().map(Vm::from_domain).collect()
    }

    /// Create and start a transient domain from `xml` (it disappears when it
    /// stops).
    pub fn create_transient(&self, xml: &str) -> Result<Vm> {
        let dom = self
            .conn
            .create_domain_xml(xml, 0)
            .map_err(|e| virt_error(format_args!("creating a domain at {}", self.uri), &e))?;
        Vm::from_domain(dom)
    }

    /// Define (but do not start) a persistent domain from `xml`.
    pub fn define(&self, xml: &str) -> Result<Vm> {
        let dom = self
            .conn
            .define_domain_xml(xml)
            .map_err(|e| virt_error(format_args!("defining a domain at {}", self.uri), &e))?;
        Vm::from_domain(dom)
    }
}

/// One libvirt domain.
#[derive(Debug, Clone)]
pub struct Vm {
    dom: Dom,
    name: String,
}

impl Vm {
    fn from_domain(dom: Dom) -> Result<Self> {
        let name = dom.name().map_err(|e| virt_error("reading a domain's name", &e))?;
        Ok(Vm { dom, name })
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's handle, for the calls wrapped in this module's parts.
    pub(crate) fn dom(&self) -> &Dom {
        &self.dom
    }

    /// Whether the domain is running (active: running or paused).
    pub fn is_running(&self) -> Result<bool> {
        self.dom.is_active().map_err(|e| virt_error(format_args!("reading the state of domain {}", self.name), &e))
    }

    /// Whether the domain is persistent (defined), rather than transient.
    pub fn is_persistent(&self) -> Result<bool> {
        self.dom
            .is_persistent()
            .map_err(|e| virt_error(format_args!("reading the persistence of domain {}", self.name), &e))
    }

    /// The domain's live XML (for a stopped domain, its definition).
    pub fn xml(&self) -> Result<String> {
        self.dom.xml_desc(0).map_err(|e| virt_error(format_args!("reading the XML of domain {}", self.name), &e))
    }

    /// The domain's file disks with their backing chains (see
    /// [`parse_disks`]; a stopped domain's chains are not known to libvirt
    /// and come back empty).
    pub fn disks(&self) -> Result<Vec<DiskInfo>> {
        parse_disks(&self.xml()?).map_err(|e| e.context(format_args!("domain {}", self.name)))
    }

    /// The file disks a backup of the domain takes ([`Vm::disks`]), from
    /// one read of its XML, with a warning logged for each disk the guest
    /// may write that the backup leaves out (not a file: block, network,
    /// volume; or a LUN passed through, or a floppy; see
    /// [`xml::left_out_disks`]): its data is in no backup, and nothing else
    /// would say so.
    pub fn disks_to_back_up(&self) -> Result<Vec<DiskInfo>> {
        let x = self.xml()?;
        let disks = parse_disks(&x).map_err(|e| e.context(format_args!("domain {}", self.name)))?;
        for d in xml::left_out_disks(&x)? {
            log::warn!(
                "domain {}: disk {d} is left out of the backup: its data is in no backup (only file disks of device 'disk' are backed up)",
                self.name
            );
        }
        Ok(disks)
    }

    /// The file disk with target `target`; [`ErrorKind::NotFound`] when the
    /// domain has none.
    pub fn disk(&self, target: &str) -> Result<DiskInfo> {
        self.disks()?
            .into_iter()
            .find(|d| d.target == target)
            .ok_or_else(|| KnibError::not_found(format!("domain {} has no file disk {target}", self.name)))
    }

    /// Start the (defined, stopped) domain.
    pub fn start(&self) -> Result<()> {
        self.dom.create().map_err(|e| virt_error(format_args!("starting domain {}", self.name), &e))
    }

    /// Stop the domain at once (power off); a transient domain disappears.
    pub fn destroy(&self) -> Result<()> {
        self.dom.destroy().map_err(|e| virt_error(format_args!("destroying domain {}", self.name), &e))
    }

    /// Remove the domain's persistent definition, with its checkpoints'
    /// metadata (libvirt refuses a domain that has checkpoints otherwise;
    /// their bitmaps stay in the disks' files).
    pub fn undefine(&self) -> Result<()> {
        self.dom
            .undefine_flags(ffi::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            .map_err(|e| virt_error(format_args!("undefining domain {}", self.name), &e))
    }

    /// Point disks of a stopped, persistent domain at other files (its
    /// definition is rewritten; `<backingStore>` elements of those disks are
    /// dropped, libvirt reads the chain from the images).
    pub fn set_disk_sources(&self, sources: &[(String, PathBuf)]) -> Result<()> {
        self.redefine_disk_sources(sources, None).map(drop)
    }

    /// [`Vm::set_disk_sources`] for qcow2 files (a quick restore's
    /// overlays): those disks' driver type is set to qcow2 too. Returns the
    /// definition before, for [`Vm::put_back_definition`].
    pub fn set_disk_sources_qcow2(&self, sources: &[(String, PathBuf)]) -> Result<String> {
        self.redefine_disk_sources(sources, Some("qcow2"))
    }

    /// Redefine the domain with disks `sources` pointed at other files (and
    /// their driver type set to `format` when given); returns the
    /// definition before.
    fn redefine_disk_sources(&self, sources: &[(String, PathBuf)], format: Option<&str>) -> Result<String> {
        let xml = self
            .dom
            .xml_desc(ffi::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| KnibError::hypervisor(format!("reading the definition of domain {}: {e}", self.name())))?;
        let new = xml::replace_disk_sources_as(&xml, sources, format)?;
        self.dom
            .redefine(&new)
            .map_err(|e| KnibError::hypervisor(format!("redefining domain {}: {e}", self.name())))?;
        Ok(xml)
    }

    /// Define the domain as `xml` says again (what
    /// [`Vm::set_disk_sources_qcow2`] returned).
    pub fn put_back_definition(&self, xml: &str) -> Result<()> {
        self.dom.redefine(xml).map_err(|e| KnibError::hypervisor(format!("redefining domain {}: {e}", self.name())))
    }

    /// Take a disk-only external snapshot, atomically and without snapshot
    /// metadata (flags DISK_ONLY | ATOMIC | NO_METADATA, and QUIESCE when
    /// `quiesce`): each disk named in `new_files` (target, absolute path of
    /// a file that must not exist yet) gets a new qcow2 overlay there, on top
    /// of its current active file, and the domain writes to the overlay from
    /// then on. Every other disk of the domain is listed with
    /// `snapshot='no'`.
    ///
    /// libvirt writes the overlay's backing name as an absolute path. Either
    /// every disk got its overlay or none did.
    ///
    /// With `quiesce`, the guest agent freezes the guest's filesystems
    /// around the snapshot; when there is no agent, or it does not answer,
    /// the snapshot fails with an [`ErrorKind::Hypervisor`] error saying so,
    /// and nothing is changed. libvirt also fails when the thaw after the
    /// snapshot fails: the disks then run on their overlays, and the error
    /// says the snapshot was taken (the caller undoes it). On a stopped
    /// domain libvirt creates the overlays itself and `quiesce` is ignored.
    pub fn snapshot_disk_only<S: AsRef<str>, P: AsRef<Path>>(&self, new_files: &[(S, P)], quiesce: bool) -> Result<()> {
        if new_files.is_empty() {
            return Err(KnibError::invalid(format!("disk-only snapshot of domain {}: no disk was named", self.name)));
        }
        let targets = disk_targets(&self.xml()?).map_err(|e| e.context(format_args!("domain {}", self.name)))?;
        let snap_xml = snapshot_xml(&targets, new_files)
            .map_err(|e| e.context(format_args!("disk-only snapshot of domain {}", self.name)))?;
        let mut flags = ffi::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | ffi::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | ffi::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA;
        if quiesce {
            flags |= ffi::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE;
        }
        let what = || {
            let disks: Vec<String> =
                new_files.iter().map(|(t, p)| format!("{} -> {}", t.as_ref(), p.as_ref().display())).collect();
            format!(
                "disk-only snapshot{} of domain {} ({})",
                if quiesce { " with quiesce" } else { "" },
                self.name,
                disks.join(", ")
            )
        };
        match self.dom.create_snapshot_xml(&snap_xml, flags) {
            // With NO_METADATA libvirt keeps no record: the handle is dropped.
            Ok(()) => Ok(()),
            // Only a failure before the snapshot (the freeze) changes
            // nothing: libvirt also fails when the thaw after it fails.
            Err(e) if quiesce && is_agent_error(&e) && !self.on_any(new_files) => {
                Err(KnibError::hypervisor(format!(
                    "{}: the guest agent did not answer, so the guest could not be quiesced; nothing was changed ({})",
                    what(),
                    e.message()
                )))
            }
            Err(e) if quiesce && is_agent_error(&e) => Err(KnibError::hypervisor(format!(
                "{}: the snapshot was taken, but the guest agent failed afterwards (thawing the guest's filesystems): {}",
                what(),
                e.message()
            ))),
            Err(e) => Err(virt_error(what(), &e)),
        }
    }

    /// Whether any disk named in `new_files` (target, file) runs on that
    /// file now; a domain whose disks cannot be read is taken to.
    fn on_any<S: AsRef<str>, P: AsRef<Path>>(&self, new_files: &[(S, P)]) -> bool {
        match self.disks() {
            Ok(disks) => {
                new_files.iter().any(|(t, f)| disks.iter().any(|d| d.target == t.as_ref() && d.file == f.as_ref()))
            }
            Err(_) => true,
        }
    }
}

/// Whether a libvirt error says the guest agent is missing, not connected or
/// not answering.
fn is_agent_error(e: &VirtError) -> bool {
    matches!(e.code(), ffi::VIR_ERR_AGENT_UNRESPONSIVE | ffi::VIR_ERR_AGENT_UNSYNCED)
        || e.message().to_ascii_lowercase().contains("agent")
}

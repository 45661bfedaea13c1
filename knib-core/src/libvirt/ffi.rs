//! libvirt's C API, loaded the first time knib talks to libvirt.
//!
//! knib used the `virt` crate (libvirt's own Rust binding) until it
//! measured what linking libvirt costs every process (`crate::dynlib` says
//! how much, and why no crate serves). This module declares the calls knib
//! makes, about forty, from `libvirt.so.0` and `libvirt-qemu.so.0`, and
//! wraps the objects they hand over.
//!
//! # Invariants
//!
//! - The libraries are loaded on the first connection, once per process,
//!   and never unloaded (`crate::dynlib`).
//! - Each type here owns one libvirt reference and releases it once, on
//!   drop ([`Conn`] with `virConnectClose`, [`Dom`] with `virDomainFree`,
//!   [`Stream`] with `virStreamFree`); a clone takes a reference of its
//!   own (`virConnectRef`, `virDomainRef`).
//! - Strings libvirt hands over (`char *`) are copied and freed with
//!   `free`, as libvirt's documentation says; `const char *` answers
//!   belong to their object and are only copied.
//! - The declarations follow libvirt's public headers (`libvirt-domain.h`,
//!   `libvirt-qemu.h`, `virterror.h`) of libvirt 9.0; every call used is
//!   older than libvirt 7.2, so the ABI is stable across the versions knib
//!   supports.

#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void, CStr, CString};
use std::fmt;
use std::sync::OnceLock;

use crate::dynlib::{self, dyn_api};
use crate::error::{KnibError, Result};

/// The library of libvirt's API, by its soname.
pub(crate) const LIBVIRT: &str = "libvirt.so.0";
/// The library of libvirt's QEMU-specific calls (monitor and guest agent).
pub(crate) const LIBVIRT_QEMU: &str = "libvirt-qemu.so.0";

/// `virConnect` (opaque).
pub(crate) enum virConnect {}
/// `virDomain` (opaque).
pub(crate) enum virDomain {}
/// `virDomainSnapshot` (opaque).
pub(crate) enum virDomainSnapshot {}
/// `virDomainCheckpoint` (opaque).
pub(crate) enum virDomainCheckpoint {}
/// `virStream` (opaque).
pub(crate) enum virStream {}

pub(crate) type virConnectPtr = *mut virConnect;
pub(crate) type virDomainPtr = *mut virDomain;
pub(crate) type virDomainCheckpointPtr = *mut virDomainCheckpoint;
pub(crate) type virStreamPtr = *mut virStream;

/// `struct _virError` (virterror.h); only its first fields are read, but
/// the whole layout is declared.
#[repr(C)]
pub(crate) struct virError {
    pub code: c_int,
    pub domain: c_int,
    pub message: *mut c_char,
    pub level: c_int,
    conn: virConnectPtr,
    dom: virDomainPtr,
    str1: *mut c_char,
    str2: *mut c_char,
    str3: *mut c_char,
    int1: c_int,
    int2: c_int,
    net: *mut c_void,
}

/// `virErrorFunc`.
pub(crate) type virErrorFunc = Option<unsafe extern "C" fn(*mut c_void, *mut virError)>;

/// `struct _virDomainBlockInfo`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct virDomainBlockInfo {
    pub capacity: u64,
    pub allocation: u64,
    pub physical: u64,
}

/// `struct _virDomainBlockJobInfo`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct virDomainBlockJobInfo {
    pub type_: c_int,
    pub bandwidth: c_ulong,
    pub cur: u64,
    pub end: u64,
}

// virErrorLevel, virErrorNumber.
pub(crate) const VIR_ERR_WARNING: c_int = 1;
pub(crate) const VIR_ERR_NO_DOMAIN: c_int = 42;
pub(crate) const VIR_ERR_AGENT_UNRESPONSIVE: c_int = 86;
pub(crate) const VIR_ERR_AGENT_UNSYNCED: c_int = 97;
/// No backup job on the domain (`virErrorNumber`, libvirt 5.2 and later).
pub(crate) const VIR_ERR_NO_DOMAIN_BACKUP: c_int = 104;
// Flags.
pub(crate) const VIR_DOMAIN_XML_INACTIVE: c_uint = 1 << 1;
pub(crate) const VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA: c_uint = 1 << 4;
pub(crate) const VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT: c_uint = 0;
pub(crate) const VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP: c_uint = 1 << 0;
pub(crate) const VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA: c_uint = 1 << 2;
pub(crate) const VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY: c_uint = 1 << 4;
pub(crate) const VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE: c_uint = 1 << 6;
pub(crate) const VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC: c_uint = 1 << 7;
pub(crate) const VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE: c_uint = 1 << 0;
pub(crate) const VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY: c_uint = 1 << 1;
pub(crate) const VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL: c_uint = 1 << 0;
pub(crate) const VIR_DOMAIN_BLOCK_COMMIT_DELETE: c_uint = 1 << 1;
pub(crate) const VIR_DOMAIN_BLOCK_COMMIT_ACTIVE: c_uint = 1 << 2;
pub(crate) const VIR_DOMAIN_BLOCK_COMMIT_RELATIVE: c_uint = 1 << 3;
pub(crate) const VIR_DOMAIN_BLOCK_REBASE_RELATIVE: c_uint = 1 << 4;
pub(crate) const VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT: c_uint = 1 << 1;
// virDomainBlockJobType.
pub(crate) const VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: c_int = 1;
pub(crate) const VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: c_int = 2;
pub(crate) const VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: c_int = 3;
pub(crate) const VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: c_int = 4;
pub(crate) const VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: c_int = 5;

dyn_api! {
    /// The libvirt calls knib makes, resolved in the loaded libraries.
    pub(crate) struct Api {
    libvirt virSetErrorFunc: fn(*mut c_void, virErrorFunc) -> ();
    libvirt virConnSetErrorFunc: fn(virConnectPtr, *mut c_void, virErrorFunc) -> ();
    libvirt virGetLastError: fn() -> *mut virError;
    libvirt virConnectOpen: fn(*const c_char) -> virConnectPtr;
    libvirt virConnectClose: fn(virConnectPtr) -> c_int;
    libvirt virConnectRef: fn(virConnectPtr) -> c_int;
    libvirt virDomainLookupByName: fn(virConnectPtr, *const c_char) -> virDomainPtr;
    libvirt virConnectListAllDomains: fn(virConnectPtr, *mut *mut virDomainPtr, c_uint) -> c_int;
    libvirt virDomainCreateXML: fn(virConnectPtr, *const c_char, c_uint) -> virDomainPtr;
    libvirt virDomainDefineXML: fn(virConnectPtr, *const c_char) -> virDomainPtr;
    libvirt virDomainGetConnect: fn(virDomainPtr) -> virConnectPtr;
    libvirt virDomainGetName: fn(virDomainPtr) -> *const c_char;
    libvirt virDomainIsActive: fn(virDomainPtr) -> c_int;
    libvirt virDomainIsPersistent: fn(virDomainPtr) -> c_int;
    libvirt virDomainGetXMLDesc: fn(virDomainPtr, c_uint) -> *mut c_char;
    libvirt virDomainCreate: fn(virDomainPtr) -> c_int;
    libvirt virDomainDestroy: fn(virDomainPtr) -> c_int;
    libvirt virDomainUndefineFlags: fn(virDomainPtr, c_uint) -> c_int;
    libvirt virDomainRef: fn(virDomainPtr) -> c_int;
    libvirt virDomainFree: fn(virDomainPtr) -> c_int;
    libvirt virDomainSnapshotCreateXML: fn(virDomainPtr, *const c_char, c_uint) -> *mut virDomainSnapshot;
    libvirt virDomainSnapshotFree: fn(*mut virDomainSnapshot) -> c_int;
    libvirt virDomainGetBlockInfo: fn(virDomainPtr, *const c_char, *mut virDomainBlockInfo, c_uint) -> c_int;
    libvirt virDomainScreenshot: fn(virDomainPtr, virStreamPtr, c_uint, c_uint) -> *mut c_char;
    libvirt virStreamNew: fn(virConnectPtr, c_uint) -> virStreamPtr;
    libvirt virStreamRecv: fn(virStreamPtr, *mut c_char, usize) -> c_int;
    libvirt virStreamFinish: fn(virStreamPtr) -> c_int;
    libvirt virStreamAbort: fn(virStreamPtr) -> c_int;
    libvirt virStreamFree: fn(virStreamPtr) -> c_int;
    libvirt virDomainCheckpointCreateXML: fn(virDomainPtr, *const c_char, c_uint) -> virDomainCheckpointPtr;
    libvirt virDomainCheckpointLookupByName: fn(virDomainPtr, *const c_char, c_uint) -> virDomainCheckpointPtr;
    libvirt virDomainCheckpointGetName: fn(virDomainCheckpointPtr) -> *const c_char;
    libvirt virDomainCheckpointDelete: fn(virDomainCheckpointPtr, c_uint) -> c_int;
    libvirt virDomainCheckpointFree: fn(virDomainCheckpointPtr) -> c_int;
    libvirt virDomainListAllCheckpoints: fn(virDomainPtr, *mut *mut virDomainCheckpointPtr, c_uint) -> c_int;
    libvirt virDomainBackupBegin: fn(virDomainPtr, *const c_char, *const c_char, c_uint) -> c_int;
    libvirt virDomainBackupGetXMLDesc: fn(virDomainPtr, c_uint) -> *mut c_char;
    libvirt virDomainAbortJob: fn(virDomainPtr) -> c_int;
    libvirt virDomainBlockCommit:
        fn(virDomainPtr, *const c_char, *const c_char, *const c_char, c_ulong, c_uint) -> c_int;
    libvirt virDomainBlockPull: fn(virDomainPtr, *const c_char, c_ulong, c_uint) -> c_int;
    libvirt virDomainBlockRebase: fn(virDomainPtr, *const c_char, *const c_char, c_ulong, c_uint) -> c_int;
    libvirt virDomainGetBlockJobInfo: fn(virDomainPtr, *const c_char, *mut virDomainBlockJobInfo, c_uint) -> c_int;
    libvirt virDomainBlockJobAbort: fn(virDomainPtr, *const c_char, c_uint) -> c_int;
    qemu virDomainQemuMonitorCommand: fn(virDomainPtr, *const c_char, *mut *mut c_char, c_uint) -> c_int;
    qemu virDomainQemuAgentCommand: fn(virDomainPtr, *const c_char, c_int, c_uint) -> *mut c_char;
    }
}

/// libvirt's calls, the libraries loaded on the first call (see the module
/// doc); a [`KnibError`] of kind `hypervisor` naming the library and the
/// loader's reason when they cannot be.
pub(crate) fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|e| KnibError::hypervisor(e.clone()))
}

fn load() -> std::result::Result<Api, String> {
    load_from(LIBVIRT, LIBVIRT_QEMU)
}

fn load_from(libvirt: &str, qemu: &str) -> std::result::Result<Api, String> {
    let v = dynlib::open(libvirt, "libvirt's library", "libvirt0")?;
    let q = dynlib::open(qemu, "libvirt's QEMU library", "libvirt0")?;
    // SAFETY: the declarations of `Api` follow libvirt's headers.
    let api = unsafe { Api::resolve(vec![("libvirt", v), ("qemu", q)]) }?;
    log::debug!(target: "knib::libvirt", "loaded {libvirt} and {qemu}");
    Ok(api)
}

/// A libvirt error: the thread's last one, copied.
#[derive(Debug, Clone)]
pub(crate) struct VirtError {
    code: c_int,
    message: String,
}

impl VirtError {
    /// The calling thread's last libvirt error (right after a failed call).
    pub(crate) fn last(api: &Api) -> VirtError {
        // SAFETY: virGetLastError returns null or the thread's own error,
        // valid until the thread's next libvirt call; it is copied here.
        unsafe {
            let e = (api.virGetLastError)();
            if e.is_null() {
                return VirtError { code: 0, message: "an unknown libvirt error".into() };
            }
            VirtError { code: (*e).code, message: c_str((*e).message).unwrap_or_else(|| "(no message)".into()) }
        }
    }

    /// The error number (`virErrorNumber`).
    pub(crate) fn code(&self) -> c_int {
        self.code
    }

    /// libvirt's message.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for VirtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A copy of a `const char *` libvirt keeps (None for null).
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
pub(crate) unsafe fn c_str(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A copy of a `char *` libvirt handed over, which is then freed (None for
/// null).
///
/// # Safety
/// `p` is null or a NUL-terminated string from libvirt's allocator, owned by
/// the caller.
pub(crate) unsafe fn owned_str(p: *mut c_char) -> Option<String> {
    // SAFETY: per the contract; `free` is libvirt's deallocator for strings.
    let s = unsafe { c_str(p) };
    if !p.is_null() {
        unsafe { libc::free(p.cast()) };
    }
    s
}

/// `s` as a C string; a string with a NUL byte becomes a [`VirtError`].
fn cstring(s: &str) -> std::result::Result<CString, VirtError> {
    CString::new(s).map_err(|_| VirtError { code: 0, message: format!("a NUL byte in {s:?}") })
}

type VResult<T> = std::result::Result<T, VirtError>;

/// A connection (`virConnectPtr`), closed on drop.
pub(crate) struct Conn {
    api: &'static Api,
    ptr: virConnectPtr,
}

// SAFETY: libvirt's connections and domains may be used from any thread
// (libvirt locks them itself); each wrapper owns one reference.
unsafe impl Send for Conn {}
unsafe impl Sync for Conn {}

impl Conn {
    /// `virConnectOpen(uri)`.
    pub(crate) fn open(api: &'static Api, uri: &str) -> VResult<Conn> {
        let u = cstring(uri)?;
        // SAFETY: the URI outlives the call; null means failure.
        let ptr = unsafe { (api.virConnectOpen)(u.as_ptr()) };
        if ptr.is_null() {
            return Err(VirtError::last(api));
        }
        Ok(Conn { api, ptr })
    }

    pub(crate) fn api(&self) -> &'static Api {
        self.api
    }

    pub(crate) fn as_ptr(&self) -> virConnectPtr {
        self.ptr
    }

    fn domain(&self, ptr: virDomainPtr) -> VResult<Dom> {
        if ptr.is_null() {
            return Err(VirtError::last(self.api));
        }
        Ok(Dom { api: self.api, ptr })
    }

    pub(crate) fn lookup_domain_by_name(&self, name: &str) -> VResult<Dom> {
        let n = cstring(name)?;
        // SAFETY: the connection is open; the name outlives the call.
        self.domain(unsafe { (self.api.virDomainLookupByName)(self.ptr, n.as_ptr()) })
    }

    /// Every domain of the connection, running or not
    /// (`virConnectListAllDomains`).
    pub(crate) fn list_all_domains(&self) -> VResult<Vec<Dom>> {
        let mut list: *mut virDomainPtr = std::ptr::null_mut();
        // SAFETY: the connection is open; libvirt fills `list` with `n`
        // domain references and a NULL, all ours to free.
        let n = unsafe { (self.api.virConnectListAllDomains)(self.ptr, &mut list, 0) };
        if n < 0 {
            return Err(VirtError::last(self.api));
        }
        // SAFETY: `i < n`: each entry is a live reference, owned by the
        // `Dom` made of it (freed once, on its drop).
        let out = (0..n as usize).map(|i| Dom { api: self.api, ptr: unsafe { *list.add(i) } }).collect();
        if !list.is_null() {
            // SAFETY: the array came from libvirt's allocator.
            unsafe { libc::free(list.cast()) };
        }
        Ok(out)
    }

    pub(crate) fn create_domain_xml(&self, xml: &str, flags: c_uint) -> VResult<Dom> {
        let x = cstring(xml)?;
        // SAFETY: as above.
        self.domain(unsafe { (self.api.virDomainCreateXML)(self.ptr, x.as_ptr(), flags) })
    }

    pub(crate) fn define_domain_xml(&self, xml: &str) -> VResult<Dom> {
        let x = cstring(xml)?;
        // SAFETY: as above.
        self.domain(unsafe { (self.api.virDomainDefineXML)(self.ptr, x.as_ptr()) })
    }

    /// A new stream on this connection (`virStreamNew`).
    pub(crate) fn new_stream(&self, flags: c_uint) -> VResult<Stream> {
        // SAFETY: the connection is open.
        let ptr = unsafe { (self.api.virStreamNew)(self.ptr, flags) };
        if ptr.is_null() {
            return Err(VirtError::last(self.api));
        }
        Ok(Stream { api: self.api, ptr, finished: false })
    }
}

impl Clone for Conn {
    fn clone(&self) -> Self {
        // SAFETY: the connection is open; the new reference is released by
        // the clone's drop.
        unsafe { (self.api.virConnectRef)(self.ptr) };
        Conn { api: self.api, ptr: self.ptr }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: this wrapper's reference, released once.
        unsafe { (self.api.virConnectClose)(self.ptr) };
    }
}

/// A domain (`virDomainPtr`), freed on drop.
pub(crate) struct Dom {
    pub(crate) api: &'static Api,
    ptr: virDomainPtr,
}

// SAFETY: as for `Conn`.
unsafe impl Send for Dom {}
unsafe impl Sync for Dom {}

impl fmt::Debug for Dom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dom({:p})", self.ptr)
    }
}

impl Clone for Dom {
    fn clone(&self) -> Self {
        // SAFETY: the domain reference is live; the clone releases its own.
        unsafe { (self.api.virDomainRef)(self.ptr) };
        Dom { api: self.api, ptr: self.ptr }
    }
}

impl Drop for Dom {
    fn drop(&mut self) {
        // SAFETY: this wrapper's reference, released once.
        unsafe { (self.api.virDomainFree)(self.ptr) };
    }
}

impl Dom {
    pub(crate) fn as_ptr(&self) -> virDomainPtr {
        self.ptr
    }

    /// `r` when it is not negative, else the thread's last error.
    fn ok(&self, r: c_int) -> VResult<c_int> {
        if r < 0 {
            Err(VirtError::last(self.api))
        } else {
            Ok(r)
        }
    }

    /// A string handed over by a call, or its error when null.
    fn owned(&self, p: *mut c_char) -> VResult<String> {
        if p.is_null() {
            return Err(VirtError::last(self.api));
        }
        // SAFETY: a non-null string from libvirt's allocator, ours.
        Ok(unsafe { owned_str(p) }.unwrap_or_default())
    }

    pub(crate) fn name(&self) -> VResult<String> {
        // SAFETY: the domain reference is live; the name belongs to it.
        let p = unsafe { (self.api.virDomainGetName)(self.ptr) };
        // SAFETY: null or a string of the domain, copied at once.
        unsafe { c_str(p) }.ok_or_else(|| VirtError::last(self.api))
    }

    pub(crate) fn is_active(&self) -> VResult<bool> {
        // SAFETY: the domain reference is live.
        self.ok(unsafe { (self.api.virDomainIsActive)(self.ptr) }).map(|r| r == 1)
    }

    pub(crate) fn is_persistent(&self) -> VResult<bool> {
        // SAFETY: the domain reference is live.
        self.ok(unsafe { (self.api.virDomainIsPersistent)(self.ptr) }).map(|r| r == 1)
    }

    pub(crate) fn xml_desc(&self, flags: c_uint) -> VResult<String> {
        // SAFETY: the domain reference is live; the answer is ours.
        self.owned(unsafe { (self.api.virDomainGetXMLDesc)(self.ptr, flags) })
    }

    pub(crate) fn create(&self) -> VResult<()> {
        // SAFETY: the domain reference is live.
        self.ok(unsafe { (self.api.virDomainCreate)(self.ptr) }).map(drop)
    }

    pub(crate) fn destroy(&self) -> VResult<()> {
        // SAFETY: the domain reference is live.
        self.ok(unsafe { (self.api.virDomainDestroy)(self.ptr) }).map(drop)
    }

    pub(crate) fn undefine_flags(&self, flags: c_uint) -> VResult<()> {
        // SAFETY: the domain reference is live.
        self.ok(unsafe { (self.api.virDomainUndefineFlags)(self.ptr, flags) }).map(drop)
    }

    /// Define `xml` on the domain's own connection (`virDomainGetConnect`,
    /// `virDomainDefineXML`).
    pub(crate) fn redefine(&self, xml: &str) -> VResult<()> {
        let x = cstring(xml)?;
        // SAFETY: the domain reference is live, and so is its connection
        // (no reference is taken on it); the domain answered is freed once.
        unsafe {
            let conn = (self.api.virDomainGetConnect)(self.ptr);
            if conn.is_null() {
                return Err(VirtError::last(self.api));
            }
            let d = (self.api.virDomainDefineXML)(conn, x.as_ptr());
            if d.is_null() {
                return Err(VirtError::last(self.api));
            }
            (self.api.virDomainFree)(d);
        }
        Ok(())
    }

    /// `virDomainSnapshotCreateXML`; the snapshot's handle is dropped.
    pub(crate) fn create_snapshot_xml(&self, xml: &str, flags: c_uint) -> VResult<()> {
        let x = cstring(xml)?;
        // SAFETY: the domain reference is live; the XML outlives the call;
        // the handle answered is freed once.
        unsafe {
            let s = (self.api.virDomainSnapshotCreateXML)(self.ptr, x.as_ptr(), flags);
            if s.is_null() {
                return Err(VirtError::last(self.api));
            }
            (self.api.virDomainSnapshotFree)(s);
        }
        Ok(())
    }

    /// The capacity of disk `disk` (`virDomainGetBlockInfo`).
    pub(crate) fn block_capacity(&self, disk: &str) -> VResult<u64> {
        let d = cstring(disk)?;
        let mut info = virDomainBlockInfo::default();
        // SAFETY: the domain reference is live; `info` is writable and laid
        // out as libvirt's struct.
        self.ok(unsafe { (self.api.virDomainGetBlockInfo)(self.ptr, d.as_ptr(), &mut info, 0) })?;
        Ok(info.capacity)
    }

    /// Start a screenshot of screen `screen` into `stream`; its MIME type.
    pub(crate) fn screenshot(&self, stream: &Stream, screen: c_uint) -> VResult<String> {
        // SAFETY: the domain and stream references are live.
        self.owned(unsafe { (self.api.virDomainScreenshot)(self.ptr, stream.ptr, screen, 0) })
    }

    /// `virDomainQemuMonitorCommand`: QEMU's answer.
    pub(crate) fn qemu_monitor_command(&self, cmd: &str, flags: c_uint) -> VResult<String> {
        let c = cstring(cmd)?;
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: the domain reference is live; `out` receives a string
        // that is ours.
        self.ok(unsafe { (self.api.virDomainQemuMonitorCommand)(self.ptr, c.as_ptr(), &mut out, flags) })?;
        // SAFETY: null or a string from libvirt's allocator, ours.
        Ok(unsafe { owned_str(out) }.unwrap_or_default())
    }

    /// `virDomainQemuAgentCommand`: the agent's answer.
    pub(crate) fn qemu_agent_command(&self, cmd: &str, timeout: c_int) -> VResult<String> {
        let c = cstring(cmd)?;
        // SAFETY: the domain reference is live; the answer is ours.
        self.owned(unsafe { (self.api.virDomainQemuAgentCommand)(self.ptr, c.as_ptr(), timeout, 0) })
    }
}

/// A stream (`virStreamPtr`): aborted unless finished, then freed, on drop.
pub(crate) struct Stream {
    api: &'static Api,
    ptr: virStreamPtr,
    finished: bool,
}

impl Stream {
    /// Bytes received into `buf` (0 at the end of the stream).
    pub(crate) fn recv(&self, buf: &mut [u8]) -> VResult<usize> {
        // SAFETY: the stream reference is live; `buf` is writable for its
        // length.
        let n = unsafe { (self.api.virStreamRecv)(self.ptr, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(VirtError::last(self.api));
        }
        Ok(n as usize)
    }

    /// End the stream (`virStreamFinish`).
    pub(crate) fn finish(mut self) -> VResult<()> {
        self.finished = true;
        // SAFETY: the stream reference is live.
        if unsafe { (self.api.virStreamFinish)(self.ptr) } < 0 {
            return Err(VirtError::last(self.api));
        }
        Ok(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: this wrapper's reference, released once (after an abort
        // when the stream was not finished).
        unsafe {
            if !self.finished {
                (self.api.virStreamAbort)(self.ptr);
            }
            (self.api.virStreamFree)(self.ptr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_load_and_every_call_resolves() {
        let api = api().expect("libvirt's libraries load");
        // A second call answers the same table.
        assert!(std::ptr::eq(api, api_again()));
    }

    fn api_again() -> &'static Api {
        api().unwrap()
    }

    #[test]
    fn a_library_that_is_not_there_is_a_clear_error() {
        let e = load_from("libknib-no-such-library.so.0", LIBVIRT_QEMU).map(drop).unwrap_err();
        assert!(
            e.starts_with(
                "cannot load libknib-no-such-library.so.0, libvirt's library (is it installed? libvirt0 on Debian): "
            ),
            "{e}"
        );
        let e = load_from(LIBVIRT, "libknib-no-such-qemu.so.0").map(drop).unwrap_err();
        assert!(e.starts_with("cannot load libknib-no-such-qemu.so.0"), "{e}");
    }
}

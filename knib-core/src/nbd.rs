//! An NBD client for the exports knib reads a disk through: the pull-mode
//! backup job of a running domain, or a `qemu-nbd` knib starts over a
//! stopped VM's qcow2 file. Reads (`pread`) and block status on the
//! `base:allocation` and `qemu:dirty-bitmap:<name>` meta contexts, over a
//! UNIX socket only (never TCP: the export is reachable by knib and QEMU
//! alone, through a directory only they may enter).
//!
//! # Why libnbd
//!
//! The client is libnbd (Debian's `libnbd0`), the NBD project's own
//! client library, used by `nbdcopy`, `nbdinfo` and virt-v2v, through the
//! thin safe binding below (a handful of calls, loaded with the library on
//! first use: `crate::dynlib` says why). What knib needs of the
//! protocol is exactly what libnbd is tested for against QEMU's server: the
//! fixed newstyle handshake with `NBD_OPT_GO`, `NBD_OPT_SET_META_CONTEXT`
//! with two contexts, structured replies, and block status answers split
//! across several chunks and contexts. No Rust crate on crates.io
//! implements block status with meta contexts (the `nbd` crate has reads
//! and writes only), and a hand-written client would be a second
//! implementation of a protocol whose corner cases (short block status
//! replies, per-context lengths, error chunks) decide whether an
//! incremental backup holds every changed byte.
//!
//! # Invariants
//!
//! - A [`Nbd`] handle is used by one thread at a time (`&mut self`): libnbd
//!   handles are thread-safe, but knib reads each export from one thread,
//!   with several reads in flight ([`Nbd::pread_pipelined`]), taken in order.
//! - A buffer lent to an asynchronous read is neither touched nor freed
//!   until libnbd has retired the read or the handle is closed, on every
//!   path (errors included).
//! - Waiting for the server sees the caller's cancellation and deadline
//!   every 200 ms, and a server that answers nothing for [`REPLY_TIMEOUT`]
//!   fails the call: the connection and its handshake, block status and
//!   pipelined reads (every call that waits is libnbd's asynchronous form,
//!   polled). Closing a connection tells the server for at most 2 s, then
//!   cuts it.
//! - No Rust panic crosses into libnbd: the block status and read callbacks
//!   catch unwinding and report an error to libnbd instead.
//! - A read succeeds only when the server's reply covered its range exactly
//!   once (data and hole chunks, in any order). libnbd checks only that
//!   the lengths of a read's chunks add up to the read's (it does not
//!   check that chunks do not overlap): a chunk sent twice would hide a
//!   range never sent, which libnbd leaves zero and reports as read, and
//!   the backup would hold zeros for guest data.
//! - Block status is asked for in pieces of at most [`STATUS_CHUNK`] bytes;
//!   a server may answer for less than asked: [`Nbd::block_status`]
//!   returns the extents of every context up to the shortest answer, and
//!   the caller asks again from there.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::dynlib::{self, dyn_api};
use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

/// The largest range one block status request covers.
pub const STATUS_CHUNK: u64 = 1 << 30;

/// `base:allocation`: the range is a hole (not allocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*`: the range is dirty (changed since the bitmap began).
pub const STATE_DIRTY: u32 = 1;

/// The allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The meta context of QEMU's dirty bitmap `name` on an export.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

#[repr(C)]
struct NbdHandle {
    _private: [u8; 0],
}

type ExtentFn = unsafe extern "C" fn(*mut c_void, *const c_char, u64, *mut u32, usize, *mut c_int) -> c_int;

#[repr(C)]
struct ExtentCallback {
    callback: Option<ExtentFn>,
    user_data: *mut c_void,
    free: Option<unsafe extern "C" fn(*mut c_void)>,
}

type ChunkFn = unsafe extern "C" fn(*mut c_void, *const c_void, usize, u64, c_uint, *mut c_int) -> c_int;

/// libnbd's `nbd_chunk_callback`, called for each chunk of a read's reply.
#[repr(C)]
struct ChunkCallback {
    callback: Option<ChunkFn>,
    user_data: *mut c_void,
    free: Option<unsafe extern "C" fn(*mut c_void)>,
}

/// A read's chunk of data (`LIBNBD_READ_DATA`).
const READ_DATA: c_uint = 1;
/// A read's chunk that is a hole, which libnbd fills with zeros (`LIBNBD_READ_HOLE`).
const READ_HOLE: c_uint = 2;

type CompletionFn = unsafe extern "C" fn(*mut c_void, *mut c_int) -> c_int;

/// libnbd's `nbd_completion_callback`; knib passes none (commands are polled).
#[repr(C)]
struct CompletionCallback {
    callback: Option<CompletionFn>,
    user_data: *mut c_void,
    free: Option<unsafe extern "C" fn(*mut c_void)>,
}

const NO_COMPLETION: CompletionCallback =
    CompletionCallback { callback: None, user_data: std::ptr::null_mut(), free: None };

dyn_api! {
    /// The libnbd calls knib makes (`libnbd.so.0`, loaded on first use:
    /// `crate::dynlib`), as declared in `libnbd.h`.
    struct Api {
    nbd nbd_create: fn() -> *mut NbdHandle;
    nbd nbd_close: fn(*mut NbdHandle) -> ();
    nbd nbd_get_error: fn() -> *const c_char;
    nbd nbd_get_errno: fn() -> c_int;
    nbd nbd_set_export_name: fn(*mut NbdHandle, *const c_char) -> c_int;
    nbd nbd_add_meta_context: fn(*mut NbdHandle, *const c_char) -> c_int;
    nbd nbd_aio_connect_unix: fn(*mut NbdHandle, *const c_char) -> c_int;
    nbd nbd_aio_is_connecting: fn(*mut NbdHandle) -> c_int;
    nbd nbd_aio_is_ready: fn(*mut NbdHandle) -> c_int;
    nbd nbd_aio_is_closed: fn(*mut NbdHandle) -> c_int;
    nbd nbd_aio_is_dead: fn(*mut NbdHandle) -> c_int;
    nbd nbd_aio_disconnect: fn(*mut NbdHandle, u32) -> c_int;
    nbd nbd_get_size: fn(*mut NbdHandle) -> i64;
    nbd nbd_can_meta_context: fn(*mut NbdHandle, *const c_char) -> c_int;
    nbd nbd_pread_structured: fn(*mut NbdHandle, *mut c_void, usize, u64, ChunkCallback, u32) -> c_int;
    nbd nbd_aio_block_status: fn(*mut NbdHandle, u64, u64, ExtentCallback, CompletionCallback, u32) -> i64;
    nbd nbd_aio_pread_structured:
        fn(*mut NbdHandle, *mut c_void, usize, u64, ChunkCallback, CompletionCallback, u32) -> i64;
    nbd nbd_aio_command_completed: fn(*mut NbdHandle, u64) -> c_int;
    nbd nbd_poll: fn(*mut NbdHandle, c_int) -> c_int;
    }
}

/// The library's soname.
const LIBNBD: &str = "libnbd.so.0";

/// libnbd's calls, the library loaded on the first call; an
/// [`ErrorKind::Io`] error naming the library when it cannot be.
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = dynlib::open(LIBNBD, "the NBD client library", "libnbd0")?;
        // SAFETY: the declarations of `Api` follow libnbd.h.
        unsafe { Api::resolve(vec![("nbd", lib)]) }
    })
    .as_ref()
    .map_err(|e| KnibError::new(ErrorKind::Io, e.clone()))
}

/// The calling thread's last libnbd error, as a knib error about `what`.
fn last_error(api: &Api, what: &str) -> KnibError {
    // SAFETY: libnbd returns a thread-local NUL-terminated string or NULL.
    let (msg, errno) = unsafe {
        let p = (api.nbd_get_error)();
        let m = if p.is_null() { "(no message)".to_string() } else { CStr::from_ptr(p).to_string_lossy().into_owned() };
        (m, (api.nbd_get_errno)())
    };
    let kind = if errno == libc::ENOENT { ErrorKind::NotFound } else { ErrorKind::Io };
    KnibError::new(kind, format!("NBD {what}: {msg}"))
}

/// Poll connection `h` until `done` says so, seeing `ctl` every
/// [`POLL_MS`]; a server that answers nothing for `timeout` is an error
/// (the caller then closes the connection or drains it: what is in flight
/// stays in flight), as is an error of `done`.
fn wait_on(
    api: &Api,
    h: *mut NbdHandle,
    what: &str,
    ctl: &Control,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let mut heard = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        // SAFETY: `h` is a live handle (the caller's).
        match unsafe { (api.nbd_poll)(h, POLL_MS) } {
            -1 => return Err(last_error(api, what)),
            0 => {
                ctl.check(what)?;
                if heard.elapsed() >= timeout {
                    return Err(silent(what, timeout));
                }
            }
            _ => heard = Instant::now(),
        }
    }
}

/// Whether command `cookie` of `h` is done; an error when libnbd retired
/// it with one.
fn completed(api: &Api, h: *mut NbdHandle, cookie: u64, what: &str) -> Result<bool> {
    // SAFETY: `h` is a live handle, `cookie` one of its commands.
    match unsafe { (api.nbd_aio_command_completed)(h, cookie) } {
        1 => Ok(true),
        0 => Ok(false),
        _ => Err(last_error(api, what)),
    }
}

/// The error for a server that answered nothing for `t` during `what`.
fn silent(what: &str, t: Duration) -> KnibError {
    KnibError::new(ErrorKind::Timeout, format!("{what}: the NBD server answered nothing for {} s", t.as_secs()))
}

fn cstring(what: &str, s: &[u8]) -> Result<CString> {
    CString::new(s).map_err(|_| KnibError::invalid(format!("{what} holds a NUL byte")))
}

/// One extent of a meta context: `length` bytes from `offset` with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where it starts.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// The context's flags ([`STATE_HOLE`], [`STATE_ZERO`], [`STATE_DIRTY`]).
    pub flags: u32,
}

/// A connection to one NBD export.
pub struct Nbd {
    api: &'static Api,
    h: NonNull<NbdHandle>,
    export: String,
    /// How long a call waits for the server to answer anything before it
    /// gives up ([`REPLY_TIMEOUT`]).
    reply_timeout: Duration,
    /// The handle was closed (reads were abandoned after an error): every
    /// call is then an error, and `drop` closes nothing.
    closed: bool,
}

/// How long the server may answer nothing while a call waits: QEMU
/// serving a host's disk answers within seconds; a server that says
/// nothing for this long (hung storage, a stuck QEMU) fails the copy
/// instead of holding the VM's lock and its backup job for ever.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long reads still in flight after an error are waited for before
/// the connection is cut.
const DRAIN: Duration = Duration::from_secs(2);

/// One wait for the server, between two looks at the caller's
/// cancellation and deadline, in milliseconds.
const POLL_MS: c_int = 200;

// SAFETY: a libnbd handle may be used from any thread (libnbd locks it);
// knib uses it from one thread at a time (`&mut self`).
unsafe impl Send for Nbd {}

impl std::fmt::Debug for Nbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nbd({})", self.export)
    }
}

/// What a block status request gathers: per meta context, its extents.
pub type Gathered = Vec<(String, Vec<Extent>)>;

unsafe extern "C" fn gather(
    user_data: *mut c_void,
    context: *const c_char,
    offset: u64,
    entries: *mut u32,
    n: usize,
    error: *mut c_int,
) -> c_int {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `user_data` is the `Gathered` that `block_status` lends for
        // the call; libnbd passes a valid context name and `n` entries.
        let out = unsafe { &mut *(user_data as *mut Gathered) };
        let name = unsafe { CStr::from_ptr(context) }.to_string_lossy().into_owned();
        let pairs = if entries.is_null() { &[][..] } else { unsafe { std::slice::from_raw_parts(entries, n) } };
        let mut at = offset;
        let mut list = Vec::with_capacity(n / 2);
        for p in pairs.chunks_exact(2) {
            list.push(Extent { offset: at, length: p[0] as u64, flags: p[1] });
            at += p[0] as u64;
        }
        // One chunk per context and request (the protocol's rule): a second
        // one starts over at the request's offset, and merged after the
        // first it was never read (a clean first answer hid a dirty
        // second): the command fails instead.
        if out.iter().any(|(c, _)| *c == name) {
            return false;
        }
        out.push((name, list));
        true
    }));
    match r {
        Ok(true) => 0,
        Ok(false) => {
            // SAFETY: libnbd passes a valid pointer for the error.
            unsafe { *error = libc::EPROTO };
            -1
        }
        Err(_) => {
            // SAFETY: libnbd passes a valid pointer for the error.
            unsafe { *error = libc::EIO };
            -1
        }
    }
}

/// The ranges (offset, length) of a read that the chunks of the server's
/// reply covered, as they came.
#[derive(Default)]
struct Coverage(Vec<(u64, u64)>);

impl Coverage {
    /// The chunk callback of a read recording into `self`, which must stay
    /// where it is until libnbd has retired the read or the handle is closed.
    fn callback(&mut self) -> ChunkCallback {
        ChunkCallback { callback: Some(cover as ChunkFn), user_data: (self as *mut Coverage).cast(), free: None }
    }

    /// Whether the chunks recorded covered `[offset, offset + len)` exactly
    /// once; else what went wrong: the first range never sent and the bytes
    /// missing in all, the first range sent twice. Empties the record for
    /// the next read.
    fn check(&mut self, offset: u64, len: u64) -> std::result::Result<(), String> {
        let end = offset.saturating_add(len);
        self.0.sort_unstable();
        let (mut at, mut missing) = (offset, 0u64);
        let (mut gap, mut twice) = (None, None);
        for &(o, n) in self.0.iter().filter(|c| c.1 > 0) {
            let e = o.saturating_add(n);
            if o < at {
                twice = twice.or(Some((o, e.min(at))));
            } else if o > at {
                gap = gap.or(Some((at, o)));
                missing += o - at;
            }
            at = at.max(e);
        }
        if at < end {
            gap = gap.or(Some((at, end)));
            missing += end - at;
        } else if at > end {
            twice = twice.or(Some((end, at)));
        }
        self.0.clear();
        let mut why = Vec::new();
        if let Some((a, b)) = gap {
            why.push(format!("bytes [{a}, {b}) were never sent ({missing} bytes missing in all)"));
        }
        if let Some((a, b)) = twice {
            why.push(format!("bytes [{a}, {b}) were sent twice or outside the read"));
        }
        if why.is_empty() {
            return Ok(());
        }
        Err(format!("the server's reply does not cover the read exactly once: {}", why.join("; ")))
    }
}

/// A [`Coverage`] on the heap that libnbd holds the address of while a
/// pipelined read is in flight: a raw allocation, not a `Box` (moving a
/// `Box` claims its contents unaliased), freed on drop.
struct Lent(NonNull<Coverage>);

impl Lent {
    fn new() -> Lent {
        Lent(NonNull::from(Box::leak(Box::default())))
    }

    /// The chunk callback of a read recording into this coverage.
    fn callback(&self) -> ChunkCallback {
        ChunkCallback { callback: Some(cover as ChunkFn), user_data: self.0.as_ptr().cast(), free: None }
    }

    /// The coverage, once libnbd has retired the read it was lent to.
    fn get(&mut self) -> &mut Coverage {
        // SAFETY: allocated by `new`, freed only by drop; the caller has
        // seen the read retired, so libnbd no longer calls into it.
        unsafe { self.0.as_mut() }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // SAFETY: allocated by `Box` in `new`, freed once, here; a read it
        // was lent to is retired or its handle closed before a `Lent` goes.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// libnbd's chunk callback of a read: records the range a data or hole
/// chunk covered (error chunks fail the read in libnbd).
unsafe extern "C" fn cover(
    user_data: *mut c_void,
    _subbuf: *const c_void,
    count: usize,
    offset: u64,
    status: c_uint,
    error: *mut c_int,
) -> c_int {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if status == READ_DATA || status == READ_HOLE {
            // SAFETY: `user_data` is the read's `Coverage`, alive until the
            // read is retired or the handle closed (`Coverage::callback`).
            let c = unsafe { &mut *(user_data as *mut Coverage) };
            c.0.push((offset, count as u64));
        }
    }));
    match r {
        Ok(()) => 0,
        Err(_) => {
            // SAFETY: libnbd passes a valid pointer for the error.
            unsafe { *error = libc::EIO };
            -1
        }
    }
}

/// The error of a read of `len` bytes at `offset` from `export` whose reply
/// did not cover it (`why`, from [`Coverage::check`]).
fn uncovered(export: &str, offset: u64, len: usize, why: String) -> KnibError {
    KnibError::new(ErrorKind::Io, format!("NBD read of {len} bytes at {offset} from export {export}: {why}"))
}

impl Nbd {
    /// Connect to export `export` on the UNIX socket `socket`, asking for
    /// the meta contexts `contexts` (e.g. [`BASE_ALLOCATION`]). The
    /// connection and its handshake see `ctl` every 200 ms, and fail when
    /// the server answers nothing for [`REPLY_TIMEOUT`].
    pub fn connect_unix(socket: &Path, export: &str, contexts: &[&str], ctl: &Control) -> Result<Nbd> {
        Self::connect_unix_within(socket, export, contexts, ctl, REPLY_TIMEOUT)
    }

    /// [`Nbd::connect_unix`], the server given `timeout` (for the
    /// connection and every later call) instead of [`REPLY_TIMEOUT`].
    pub fn connect_unix_within(
        socket: &Path,
        export: &str,
        contexts: &[&str],
        ctl: &Control,
        timeout: Duration,
    ) -> Result<Nbd> {
        let sock = cstring("the NBD socket path", socket.as_os_str().as_bytes())?;
        let name = cstring("the NBD export name", export.as_bytes())?;
        let ctxs = contexts.iter().map(|c| cstring("an NBD meta context", c.as_bytes())).collect::<Result<Vec<_>>>()?;
        let api = api()?;
        // SAFETY: plain constructor; NULL on failure.
        let h = NonNull::new(unsafe { (api.nbd_create)() }).ok_or_else(|| last_error(api, "handle creation"))?;
        let mut nbd = Nbd { api, h, export: export.to_string(), reply_timeout: timeout, closed: false };
        let what = format!("connection to export {export} on {}", socket.display());
        // SAFETY: `h` is a live handle, the strings outlive the calls.
        unsafe {
            if (api.nbd_set_export_name)(nbd.h.as_ptr(), name.as_ptr()) == -1 {
                return Err(last_error(api, &format!("export name {export}")));
            }
            for c in &ctxs {
                if (api.nbd_add_meta_context)(nbd.h.as_ptr(), c.as_ptr()) == -1 {
                    return Err(last_error(api, &format!("meta context {}", c.to_string_lossy())));
                }
            }
            if (api.nbd_aio_connect_unix)(nbd.h.as_ptr(), sock.as_ptr()) == -1 {
                return Err(last_error(api, &what));
            }
        }
        let h = nbd.h.as_ptr();
        // SAFETY: live handle.
        let r = wait_on(api, h, &what, ctl, timeout, || Ok(unsafe { (api.nbd_aio_is_connecting)(h) } != 1));
        if let Err(e) = r {
            nbd.close(false);
            return Err(e);
        }
        // SAFETY: live handle.
        if unsafe { (api.nbd_aio_is_ready)(h) } != 1 {
            let e = last_error(api, &what);
            nbd.close(false);
            return Err(e);
        }
        Ok(nbd)
    }

    /// The export's size in bytes.
    pub fn size(&mut self) -> Result<u64> {
        let api = self.api;
        // SAFETY: live handle.
        let n = unsafe { (api.nbd_get_size)(self.live()?) };
        u64::try_from(n).map_err(|_| last_error(api, &format!("size of export {}", self.export)))
    }

    /// Whether the server agreed to meta context `name`.
    pub fn can_meta_context(&mut self, name: &str) -> Result<bool> {
        let api = self.api;
        let c = cstring("an NBD meta context", name.as_bytes())?;
        // SAFETY: live handle, `c` outlives the call.
        match unsafe { (api.nbd_can_meta_context)(self.live()?, c.as_ptr()) } {
            -1 => Err(last_error(api, &format!("meta context {name} of export {}", self.export))),
            v => Ok(v == 1),
        }
    }

    /// Read `buf.len()` bytes at `offset`; an error unless the server's
    /// reply covered them exactly once.
    pub fn pread(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let api = self.api;
        let mut cov = Coverage::default();
        // SAFETY: live handle; `buf` is valid for writes of its length;
        // `cov` outlives the call, which retires the read before returning.
        let r = unsafe {
            (api.nbd_pread_structured)(self.live()?, buf.as_mut_ptr().cast(), buf.len(), offset, cov.callback(), 0)
        };
        if r == -1 {
            return Err(last_error(
                api,
                &format!("read of {} bytes at {offset} from export {}", buf.len(), self.export),
            ));
        }
        cov.check(offset, buf.len() as u64).map_err(|w| uncovered(&self.export, offset, buf.len(), w))
    }

    /// Give up on a server that answers nothing for `t` (instead of
    /// [`REPLY_TIMEOUT`] or the connection's timeout).
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.reply_timeout = t;
    }

    /// Read each range of `ranges` (offset, length) with up to `depth` of
    /// them in flight at once (the server works on them together), and hand
    /// each one's bytes to `each`, with its index, strictly in the order
    /// given. An error of a read or of `each` stops the reading; the reads
    /// still in flight are waited for before their buffers are freed (for
    /// at most 2 s: the connection is then closed, so libnbd lets go of
    /// them, and every later call on it is an error). While waiting,
    /// `ctl`'s cancellation and deadline are seen every 200 ms, and a
    /// server that answers nothing for the reply timeout is an error, as is
    /// a read whose reply did not cover its range exactly once.
    pub fn pread_pipelined(
        &mut self,
        ranges: &[(u64, usize)],
        depth: usize,
        ctl: &Control,
        each: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        /// A read in flight: its cookie, its index in `ranges`, its buffer
        /// (which libnbd writes into until the read completes) and the
        /// record of its reply's chunks (libnbd holds its address).
        struct Flight {
            cookie: u64,
            idx: usize,
            buf: Vec<u8>,
            len: usize,
            cov: Lent,
        }
        let (api, h, timeout) = (self.api, self.live()?, self.reply_timeout);
        let export = self.export.clone();
        let mut ring: std::collections::VecDeque<Flight> = std::collections::VecDeque::new();
        let mut spare: Vec<(Vec<u8>, Lent)> = Vec::new();
        let longest = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let what = |i: usize| {
            let (off, len) = ranges[i];
            format!("read of {len} bytes at {off} from export {export}")
        };
        let mut run = || -> Result<()> {
            let mut next = 0;
            while next < ranges.len() || !ring.is_empty() {
                while next < ranges.len() && ring.len() < depth.max(1) {
                    let (off, len) = ranges[next];
                    // Each buffer is made once, as long as the longest read
                    // (zeroing and faulting in a buffer per read cost more
                    // than the read's copy).
                    let (mut buf, cov) = spare.pop().unwrap_or_else(|| (vec![0; longest], Lent::new()));
                    // SAFETY: live handle; `buf` and `cov` stay allocated,
                    // unmoved (heap blocks), and untouched until the command
                    // is retired: they sit in `ring` until then, and the
                    // drain below waits for every command left in flight
                    // (or closes the handle, after which libnbd calls and
                    // writes nothing of it).
                    let cookie = unsafe {
                        let cb = cov.callback();
                        (api.nbd_aio_pread_structured)(h, buf.as_mut_ptr().cast(), len, off, cb, NO_COMPLETION, 0)
                    };
                    let Ok(cookie) = u64::try_from(cookie) else { return Err(last_error(api, &what(next))) };
                    ring.push_back(Flight { cookie, idx: next, buf, len, cov });
                    next += 1;
                }
                let front = ring.front().expect("a read in flight");
                let (cookie, idx) = (front.cookie, front.idx);
                // A read retired with an error stays in `ring`: the drain
                // below finds it retired at once.
                wait_on(api, h, &what(idx), ctl, timeout, || completed(api, h, cookie, &what(idx)))?;
                let mut f = ring.pop_front().expect("the front read");
                let (off, len) = ranges[f.idx];
                f.cov.get().check(off, len as u64).map_err(|w| uncovered(&export, off, len, w))?;
                each(f.idx, &f.buf[..f.len])?;
                spare.push((f.buf, f.cov));
            }
            Ok(())
        };
        let r = run();
        // Wait for what is still in flight (after an error) before its
        // buffers go; a connection that died writes into them no more. A
        // server still silent after a short while is cut off: the handle is
        // closed (libnbd abandons what is in flight and touches no buffer
        // after), and the buffers freed.
        let started = Instant::now();
        let mut cut = false;
        for f in ring.iter() {
            // SAFETY (both calls): live handle; a cookie of this handle.
            while unsafe { (api.nbd_aio_command_completed)(h, f.cookie) } == 0 {
                if unsafe { (api.nbd_poll)(h, POLL_MS) } == -1 || started.elapsed() >= DRAIN {
                    cut = true;
                    break;
                }
            }
            if cut {
                break;
            }
        }
        if cut {
            self.close(false);
        }
        ring.clear();
        r
    }

    /// Close the handle; later calls are errors. `graceful`: tell the
    /// server first (NBD's disconnect, after what is in flight), waiting at
    /// most 2 s for it to close the connection; else cut the connection at
    /// once, abandoning it.
    fn close(&mut self, graceful: bool) {
        if !self.closed {
            self.closed = true;
            let (api, h) = (self.api, self.h.as_ptr());
            // SAFETY: live handle, closed once.
            unsafe {
                if graceful && (api.nbd_aio_is_ready)(h) == 1 && (api.nbd_aio_disconnect)(h, 0) == 0 {
                    let started = Instant::now();
                    while (api.nbd_aio_is_closed)(h) != 1
                        && (api.nbd_aio_is_dead)(h) != 1
                        && started.elapsed() < DRAIN
                        && (api.nbd_poll)(h, POLL_MS) != -1
                    {}
                }
                (api.nbd_close)(h);
            }
        }
    }

    /// The handle, unless it was closed.
    fn live(&self) -> Result<*mut NbdHandle> {
        if self.closed {
            return Err(KnibError::new(
                ErrorKind::Io,
                format!("the connection to NBD export {} was closed after an earlier error", self.export),
            ));
        }
        Ok(self.h.as_ptr())
    }

    /// Block status of `count` bytes (at most [`STATUS_CHUNK`]) from
    /// `offset`, for every context asked for at connection. Returns the end
    /// of the range every context answered for (the server may answer for
    /// less than asked) and each context's extents, cut at that end. The
    /// wait sees `ctl` every 200 ms and fails after the reply timeout of
    /// silence; the connection is then closed (every later call is an
    /// error).
    pub fn block_status(&mut self, offset: u64, count: u64, ctl: &Control) -> Result<(u64, Gathered)> {
        let (api, h, timeout) = (self.api, self.live()?, self.reply_timeout);
        let count = count.min(STATUS_CHUNK);
        let mut got: Gathered = Vec::new();
        let cb = ExtentCallback {
            callback: Some(gather as ExtentFn),
            user_data: (&mut got as *mut Gathered).cast(),
            free: None,
        };
        let what = format!("block status of {count} bytes at {offset} of export {}", self.export);
        // SAFETY: live handle; `got` outlives the command: libnbd calls the
        // callback only while the command is in flight, and it is retired
        // below or the handle closed (libnbd then calls nothing of it) before
        // `got` goes. No `free` is needed.
        let cookie = unsafe { (api.nbd_aio_block_status)(h, count, offset, cb, NO_COMPLETION, 0) };
        let Ok(cookie) = u64::try_from(cookie) else { return Err(last_error(api, &what)) };
        let mut retired = false;
        let waited = wait_on(api, h, &what, ctl, timeout, || {
            let r = completed(api, h, cookie, &what);
            retired = r.is_err();
            r
        });
        if let Err(e) = waited {
            // Still in flight (silence, a cancel): the callback is called
            // no more once the handle is closed. A command the server
            // answered with an error leaves the connection as it was.
            if !retired {
                self.close(false);
            }
            return Err(e);
        }
        let end = got
            .iter()
            .map(|(_, l)| l.last().map(|e| e.offset + e.length).unwrap_or(offset))
            .min()
            .unwrap_or(offset)
            .min(offset + count);
        if end <= offset {
            return Err(KnibError::new(
                ErrorKind::Io,
                format!("NBD block status of export {} at {offset}: the server described no bytes", self.export),
            ));
        }
        for (_, l) in got.iter_mut() {
            l.retain(|e| e.offset < end);
            if let Some(last) = l.last_mut() {
                last.length = last.length.min(end - last.offset);
            }
        }
        Ok((end, got))
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        self.close(true);
    }
}

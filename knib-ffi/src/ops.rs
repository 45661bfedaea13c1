//! The operations: each takes a JSON request and gives a JSON answer, all
//! through `knib_core::api::call`. The named functions are `knib_call`
//! with a catalog operation filled in; the path-based `agent.*` operations
//! are reached through `knib_call` by name.

use std::ffi::c_char;

use crate::boundary::{c_string, non_null, text, Fail};
use crate::context::{knib_context, with_context, Record};
use crate::result::knib_result;

/// The operation to run: named by the function, or given by the caller.
#[derive(Clone, Copy)]
enum Op {
    Named(&'static str),
    Given(*const c_char),
}

/// Run `op` on `request` with `context`; on success the answer goes to
/// `*answer_out`.
///
/// # Safety
/// As `knib_call`.
unsafe fn run(context: *mut knib_context, op: Op, request: *const c_char, answer_out: *mut *mut c_char) -> knib_result {
    with_context(context, Record::Operation, |ctx| {
        // The arguments are read once the context's one operation slot is
        // taken: bad ones on a busy context are refused as busy, and their
        // error does not replace the running operation's.
        let answer = ctx.session.call_with(|| {
            let op = match op {
                Op::Named(name) => name,
                // SAFETY: the caller promises a NUL-terminated string or NULL.
                Op::Given(p) => unsafe { text(p, "op") }?,
            };
            // SAFETY: as above.
            let request = unsafe { text(request, "request_json") }?;
            non_null(answer_out, "answer_out")?;
            Ok::<_, Fail>((op, request))
        })?;
        // SAFETY: `answer_out` is non-NULL and writable, as the caller promised.
        unsafe { *answer_out = c_string(&answer).into_raw() };
        Ok(())
    })
}

/// Run operation `op` (see the table in the preamble) on the JSON request
/// `request_json`. On success `*answer_out` gets the JSON answer, a string
/// the caller owns and frees with `knib_string_free`. On failure nothing is
/// written; the code says what kind of failure it was and
/// `knib_context_error_message` what was wrong (but for
/// `KNIB_RESULT_BUSY`, which leaves the last error as it was: it belongs to
/// the operation running on the context).
///
/// # Safety
/// `op` and `request_json` are NULL or NUL-terminated strings;
/// `answer_out` is NULL or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn knib_call(
    context: *mut knib_context,
    op: *const c_char,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Given(op), request_json, answer_out) }
}

/// Free a string knib gave (an answer). NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from knib not freed before.
#[no_mangle]
pub unsafe extern "C" fn knib_string_free(s: *mut c_char) {
    crate::boundary::guard_void(|| {
        if !s.is_null() {
            // SAFETY: made by CString::into_raw in `run`, freed once.
            drop(unsafe { std::ffi::CString::from_raw(s) });
        }
    })
}

/// Test only: panics inside knib, to show that the panic comes back as
/// `KNIB_RESULT_PANIC` (with a message in the context) and that the process
/// and the context go on. Never call it otherwise.
#[no_mangle]
pub extern "C" fn knib_test_panic(context: *mut knib_context) -> knib_result {
    with_context(context, Record::Operation, |ctx| {
        ctx.session.exclusive(|| -> Result<(), Fail> { panic!("knib_test_panic was called") })
    })
}

/// Operation `backup`: back up all the disks of one VM together, full or
/// incremental as its chain decides. Request: `store`, `vm` with `disks`
/// (`[{"name", "path"}]`) or `domain` (+ `connect`, `quiesce`), `full`,
/// `isolated`, `chain_size` (default 8). Answer: the backup.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_backup(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("backup"), request_json, answer_out) }
}

/// Operation `list`: the backups of a store that were not deleted.
/// Request: `store`, `vm` (optional). Answer: an array of backups.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_list(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("list"), request_json, answer_out) }
}

/// Operation `show`: one backup. Request: `store`, `backup`. Answer: the
/// backup.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_show(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("show"), request_json, answer_out) }
}

/// Operation `delete`: delete a backup without breaking its chain.
/// Request: `store`, `backup`. Answer: `{"expunged": [...],
/// "marked_removed": [...]}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_delete(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("delete"), request_json, answer_out) }
}

/// Operation `restore`: write one volume of a backup, its chain flattened,
/// to a new image. Request: `store`, `backup`, `volume`, `to`, `format`
/// (`qcow2` or `raw`), `no_verify` (false: each file of the chain is
/// checked against its recorded hash as it is read, and a damaged one fails
/// the restore with `corrupt`), `timeout_secs`. Answer: that of
/// `agent.restore`, `{"volumes": [{"uuid": volume, "path": to, "backing":
/// null}], "removed": []}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_restore(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("restore"), request_json, answer_out) }
}

/// Operation `quick_restore`: run a libvirt domain at once on overlays
/// over a backup. Request: `store`, `backup`, `domain`, `connect`.
/// Answer: `{"overlays": [[target, path], ...]}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_quick_restore(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("quick_restore"), request_json, answer_out) }
}

/// Operation `compress`: compress a catalog backup's files and finalize
/// them (the two steps `agent.compress` and `agent.finalize_compression`
/// take on explicit files), recording it in the manifest. Request: `store`,
/// `backup`, `library` (`zstd`/`zlib`), `coroutines` (1), `rate_limit_mbps`
/// (0 = none), `min_free_factor` (1.0). Answer: the backup.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_compress(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("compress"), request_json, answer_out) }
}

/// Operation `verify`: check one backup (`backup` given) or all of a store:
/// `qemu-img check`, backing pointers, sizes, the whole chain present,
/// hashes. Request: `store`, `backup` (optional). Answer: `[{"id", "ok",
/// "problems", "files_checked", "chain_hashes"}]`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_verify(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("verify"), request_json, answer_out) }
}

/// Operation `hash`: the xxh3-128 hash of each volume's chain of a backup
/// (as `agent.take_hash` computes it on explicit files).
/// Request: `store`, `backup`, `timeout_secs`. Answer: `{"backup",
/// "volumes": {volume: {"hash", "files": [{"path", "hash"}]}}}`, each
/// volume's the `hash` and `files` of `agent.take_hash` on its chain.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_hash(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("hash"), request_json, answer_out) }
}

/// Operation `recover` (the clean-up after a failed live backup): finish or
/// undo the interrupted backup of a libvirt domain from its journal, so the
/// VM is consistent again. Request: `store`, `domain`, `connect`. Answer:
/// `{"backup_id", "step", "published", "report"}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_recover(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("recover"), request_json, answer_out) }
}

/// Operation `files.fs`: the filesystems of a volume of a backup, read
/// straight from the store. Request: `store`, `backup`, `volume`. Answer:
/// `{"filesystems": [{"index", "partition" (number or null for the whole
/// disk), "start", "size" (bytes), "type" ("ext4", "vfat", "ntfs", or one
/// knib does not read: "xfs", "LVM2_member", ...), "label"}]}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_files_fs(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("files.fs"), request_json, answer_out) }
}

/// Operation `files.ls`: the entries of a directory (or one file) of a
/// filesystem of a backup. Request: `store`, `backup`, `volume`, `fs`
/// (the `index` from `files.fs`; optional when one filesystem is
/// readable), `path` (default "/"; `..` refused, symlinks followed only
/// inside the filesystem). Answer: `{"entries": [{"name", "type" ("file",
/// "dir", "symlink", "other"), "size", "mode", "mtime", "mtime_nsec",
/// "target" (symlinks only)}]}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_files_ls(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("files.ls"), request_json, answer_out) }
}

/// Operation `files.get`: extract a file or a directory tree of a
/// filesystem of a backup to a new local path, modes and mtimes kept,
/// symlinks recreated as links. `to` must not exist; the result appears
/// there only when complete (nothing is left on failure or cancellation).
/// Request: `store`, `backup`, `volume`, `fs`, `path`, `to`. Answer:
/// `{"files", "dirs", "symlinks", "bytes"}`.
///
/// # Safety
/// As `knib_call`.
#[no_mangle]
pub unsafe extern "C" fn knib_files_get(
    context: *mut knib_context,
    request_json: *const c_char,
    answer_out: *mut *mut c_char,
) -> knib_result {
    // SAFETY: the caller's promises, passed on.
    unsafe { run(context, Op::Named("files.get"), request_json, answer_out) }
}

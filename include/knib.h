/*
 * knib.h: the C interface of knib, native incremental backups of KVM
 * virtual machines whose disks are qcow2 files.
 *
 * Link with -lknib (libknib.so, soname libknib.so.0.1: within 0.y each
 * minor release may change the ABI; or libknib.a with the libraries of
 * `cargo rustc -p knib-ffi --crate-type staticlib -- --print
 * native-static-libs`, libvirt among them).
 *
 * CONVENTIONS
 *
 * Results. Every function that can fail returns a knib_result: 0
 * (KNIB_RESULT_OK) for success, 1 to 12 for knib's error kinds (not found,
 * busy, invalid input, ...), 100 and up for the boundary itself: a NULL
 * argument (KNIB_RESULT_NULL_ARGUMENT), a caught panic (KNIB_RESULT_PANIC:
 * a bug in knib; the process and the context go on), a buffer too small,
 * a bad handle. The numbers are fixed. knib_result_name() names a code.
 *
 * Outputs. Out-parameters (`*_out`) are written only on success. The one
 * exception: knib_context_error_message() writes `*needed` also when it
 * returns KNIB_RESULT_BUFFER_TOO_SMALL.
 *
 * Errors. A failure on a context is recorded in it: read its message into
 * your own buffer with knib_context_error_message() (it names the field,
 * file, backup or step that was wrong) and, after a failed backup, whether
 * the VM was left consistent with knib_context_error_vm_consistent(). A
 * successful operation clears it. Failures that have no live context to
 * record in (KNIB_RESULT_NULL_ARGUMENT for the context itself,
 * KNIB_RESULT_BAD_HANDLE) carry no message. A message is one line that
 * starts with the kind's name: "not found: disk root: /vms/root.qcow2 does
 * not exist".
 *
 * Pointers. Every pointer argument must be non-NULL unless its
 * documentation says otherwise (callbacks and their `userdata` may be
 * NULL); a NULL one gives KNIB_RESULT_NULL_ARGUMENT and nothing happens.
 * Strings are NUL-terminated UTF-8 (other bytes give
 * KNIB_RESULT_INVALID_INPUT). Strings knib returns through a `char **`
 * belong to the caller: free each once with knib_string_free(). Strings
 * returned as `const char *` are static: never free them.
 *
 * Handles. A knib_context is opaque. knib_context_new() makes one, the
 * caller owns it, knib_context_free() releases it once; freeing NULL, or a
 * handle already freed, does nothing. knib never dereferences a handle: it
 * looks it up among the live contexts on every call, so a freed,
 * never-made or garbage handle gives KNIB_RESULT_BAD_HANDLE, never a crash
 * (handle values are never reused).
 *
 * Threads. Every function may be called from any thread. A context runs
 * one operation at a time (a second one started meanwhile fails with
 * KNIB_RESULT_BUSY); use one context per thread to run operations in
 * parallel. While an operation runs, another thread may call
 * knib_context_cancel() (the operation stops, removes its partial files
 * and returns KNIB_RESULT_CANCELLED), the setters (they apply to the next
 * operation), the error readers, and knib_context_free() (the handle is
 * dead at once; the running operation goes on to its end, calling its
 * callbacks, and the context is released when it returns). Operations on one VM exclude each other
 * across contexts and processes: the second fails with KNIB_RESULT_BUSY.
 *
 * Callbacks. The progress and log callbacks may be called on threads that
 * are not the caller's, while an operation runs and never after it has
 * returned; their string arguments are valid only during the call. They
 * must not unwind (no C++ exceptions, no longjmp) through knib.
 *
 * REQUESTS AND ANSWERS: JSON, SCHEMA 1 (KNIB_SCHEMA)
 *
 * Each operation is run by knib_call() with its name; the catalog
 * operations (those without a dot: backup, list, show, ...) and files.*
 * also have a function of their own (knib_backup(), knib_list(), ...,
 * knib_files_fs(), _ls(), _get()). Each takes a request as a JSON object
 * and, on success, gives back a JSON answer. The request may carry
 * "schema": 1; another number is refused. Fields not listed are refused,
 * naming the field; so are missing and mistyped fields ("request of
 * restore: missing field `to`", "request of compress: field `coroutines`:
 * invalid type: string \"many\", expected u32"). Paths are strings. The
 * path-based agent.* operations take the files themselves (as CloudStack's
 * KVM agent runs them); the catalog ones take a store and a backup id and
 * make the same engine calls. The JSON Schema of every request and answer
 * is docs/schema.json (the reference); this table is generated from it
 * (`?`: optional field; [...]: an array of objects with these fields):
 *
 *   (generated from docs/schema.json by knib-core/tests/schema.rs)
 *   agent.cleanup_validation
 *       request: connect?, timeout_secs?, vm_name, work_dir?
 *       answer:  domain_removed, removed
 *   agent.cleanup_vm_backup
 *       request: connect?, domain, end_of_chain?, isolated?, quiesce?,
 *                running?, timeout_secs?, volumes
 *       answer:  actions, published, vm_consistent, volumes
 *   agent.compress
 *       request: coroutines?, expected_hashes?, files, library?,
 *                min_free_bytes?, min_free_factor?, rate_limit_mbps?,
 *                timeout_secs?
 *       answer:  compressed
 *   agent.consolidate
 *       request: connect?, domain, timeout_secs?, volumes?
 *       answer:  consolidated
 *   agent.finalize_compression
 *       request: cleanup?, files, timeout_secs?
 *       answer:  discarded, finalized
 *   agent.merge_snapshot
 *       request: connect?, domain, merges, running?, timeout_secs?
 *       answer:  volumes
 *   agent.prepare_validation
 *       request: timeout_secs?, vm_name, volumes, work_dir
 *       answer:  volumes
 *   agent.restore
 *       request: deltas_to_remove?, quick_restore?, timeout_secs?, volumes
 *       answer:  removed, volumes
 *   agent.take_backup
 *       request: connect?, domain, end_of_chain?, isolated?, quiesce?,
 *                running?, timeout_secs?, volumes
 *       answer:  kind, vm_consistent, volumes
 *   agent.take_hash
 *       request: backup_uuid?, files, timeout_secs?
 *       answer:  backup_uuid, files, hash
 *   agent.validate
 *       request: boot_timeout_secs?, cmdline?, connect?, disks, domain_type?,
 *                execute_script?, expected_result?, initrd?, kernel?,
 *                memory_mib?, screenshot_path?, script?, script_arguments?,
 *                take_screenshot?, timeout_secs?, vm_name?, wait_for_boot?,
 *                work_dir
 *       answer:  boot_seconds, boot_validated, passed, problems,
 *                screenshot_path, script_exit_code, script_result
 *   backup
 *       request: chain_size?, compress?, connect?, disks?, domain?, full?,
 *                isolated?, quiesce?, store, timeout_secs?, vm?
 *       answer:  compression, created, end_of_chain, full_reason, id, kind,
 *                parent, position, removed, vm, volumes
 *   compress
 *       request: backup, coroutines?, library?, min_free_bytes?,
 *                min_free_factor?, rate_limit_mbps?, store, timeout_secs?
 *       answer:  compression, created, end_of_chain, full_reason, id, kind,
 *                parent, position, removed, vm, volumes
 *   delete
 *       request: backup, store
 *       answer:  expunged, marked_removed
 *   files.fs
 *       request: backup, store, volume
 *       answer:  filesystems
 *   files.get
 *       request: backup, fs?, path, store, to, volume
 *       answer:  bytes, dirs, files, symlinks
 *   files.ls
 *       request: backup, fs?, path?, store, volume
 *       answer:  entries
 *   hash
 *       request: backup, store, timeout_secs?
 *       answer:  backup, volumes
 *   list
 *       request: store, vm?
 *       answer:  [compression, created, end_of_chain, full_reason, id, kind,
 *                parent, position, removed, vm, volumes]
 *   quick_restore
 *       request: backup, connect?, domain, store
 *       answer:  overlays
 *   recover
 *       request: connect?, domain, store
 *       answer:  backup_id, published, report, step
 *   restore
 *       request: backup, format?, no_verify?, store, timeout_secs?, to,
 *                volume
 *       answer:  removed, volumes
 *   show
 *       request: backup, store
 *       answer:  compression, created, end_of_chain, full_reason, id, kind,
 *                parent, position, removed, vm, volumes
 *   verify
 *       request: backup?, store, timeout_secs?
 *       answer:  [chain_hashes, files_checked, id, ok, problems]
 *   version
 *       request: (none)
 *       answer:  schema, version
 *   (end of the generated table)
 *
 * A backup is {"id", "vm", "kind" ("full", "incremental", "isolated"),
 * "parent", "position", "end_of_chain", "created", "compression",
 * "removed", "volumes": [{"name", "file" (absolute path), "virtual_size",
 * "size", "source", "backing", "hash"}]}. A later schema only adds
 * optional fields to requests and fields to answers; anything else bumps
 * KNIB_SCHEMA.
 *
 * EXAMPLE
 *
 *   knib_context *ctx;
 *   char *answer, msg[512];
 *   size_t needed;
 *   if (knib_context_new(&ctx) != KNIB_RESULT_OK) abort();
 *   knib_result r = knib_backup(ctx,
 *       "{\"store\": \"/backups\", \"vm\": \"web\","
 *       " \"disks\": [{\"name\": \"root\", \"path\": \"/vms/web/root.qcow2\"}]}",
 *       &answer);
 *   if (r == KNIB_RESULT_OK) {
 *       puts(answer);
 *       knib_string_free(answer);
 *   } else {
 *       knib_context_error_message(ctx, msg, sizeof msg, &needed);
 *       fprintf(stderr, "backup failed: %s\n", msg);  // "not found: disk root: ..."
 *   }
 *   knib_context_free(ctx);
 */

#ifndef KNIB_H
#define KNIB_H

/* Generated by cbindgen 0.29.4 from knib-ffi; do not edit. Regenerate: bash scripts/test-c.sh --write-header */

#include <stdint.h>
#include <stddef.h>
/* The version of this header, as text (also KNIB_VERSION_MAJOR, _MINOR,
 * _PATCH below). knib_version() gives the library's. */
#define KNIB_VERSION "0.1.0"


/**
 * The major version of this header; `knib_version()` tells the library's.
 */
#define KNIB_VERSION_MAJOR 0

/**
 * The minor version of this header.
 */
#define KNIB_VERSION_MINOR 1

/**
 * The patch version of this header.
 */
#define KNIB_VERSION_PATCH 0

/**
 * The version of the JSON request schema this header documents.
 */
#define KNIB_SCHEMA 1

/**
 * The result of every fallible knib function. The numbers are fixed: 0 is
 * success, 1 to 12 are the kinds of knib's errors (the same numbers as the
 * Java binding's and, plus 10, the `knib` tool's exit status), and 100 and
 * up are failures of the C boundary itself. Read the message of a failure
 * with `knib_context_error_message`.
 */
enum knib_result
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /**
   * Success; the outputs were written.
   */
  KNIB_RESULT_OK = 0,
  /**
   * A backup, volume, file or domain that was named does not exist.
   */
  KNIB_RESULT_NOT_FOUND = 1,
  /**
   * Another operation holds the VM (or this context) right now; try later.
   */
  KNIB_RESULT_BUSY = 2,
  /**
   * The request is wrong: bad JSON, an unknown or missing field, a field of
   * the wrong type (the message names the field), a bad name or option,
   * a string argument that is not UTF-8.
   */
  KNIB_RESULT_INVALID_INPUT = 3,
  /**
   * Not enough free space where the work would write.
   */
  KNIB_RESULT_NO_SPACE = 4,
  /**
   * The context's time budget ran out; what the operation started was stopped.
   */
  KNIB_RESULT_TIMEOUT = 5,
  /**
   * The operation was cancelled with `knib_context_cancel`.
   */
  KNIB_RESULT_CANCELLED = 6,
  /**
   * `qemu-img` (or another image tool) failed.
   */
  KNIB_RESULT_IMAGE_TOOL = 7,
  /**
   * libvirt or QEMU refused or failed.
   */
  KNIB_RESULT_HYPERVISOR = 8,
  /**
   * Reading or writing a file failed.
   */
  KNIB_RESULT_IO = 9,
  /**
   * Stored data is damaged.
   */
  KNIB_RESULT_CORRUPT = 10,
  /**
   * A backup failed and left the VM with extra layers or a half-done
   * merge: run `knib_recover` before its next backup.
   */
  KNIB_RESULT_VM_INCONSISTENT = 11,
  /**
   * A bug in knib (an invariant broken).
   */
  KNIB_RESULT_INTERNAL = 12,
  /**
   * A pointer argument that must not be NULL was NULL.
   */
  KNIB_RESULT_NULL_ARGUMENT = 100,
  /**
   * knib panicked (a bug); the panic was caught and the process goes on.
   * The context stays usable.
   */
  KNIB_RESULT_PANIC = 101,
  /**
   * The caller's buffer is too small; `*needed` holds the size to give.
   */
  KNIB_RESULT_BUFFER_TOO_SMALL = 102,
  /**
   * The context handle is not a live context: never made by
   * `knib_context_new`, or already freed.
   */
  KNIB_RESULT_BAD_HANDLE = 103,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum knib_result knib_result;
#else
typedef uint32_t knib_result;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * The level of a log record, most severe first. Also the values of
 * `knib_set_log_callback`'s `max_level` (0 turns logging off).
 */
enum knib_log_level
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /**
   * Something failed.
   */
  KNIB_LOG_LEVEL_ERROR = 1,
  /**
   * Something unexpected that knib handled (an interrupted operation
   * cleaned up, a full backup taken where an incremental was asked).
   */
  KNIB_LOG_LEVEL_WARN = 2,
  /**
   * One line per operation: its end and how long it took, or its error.
   */
  KNIB_LOG_LEVEL_INFO = 3,
  /**
   * Steps inside an operation.
   */
  KNIB_LOG_LEVEL_DEBUG = 4,
  /**
   * Everything.
   */
  KNIB_LOG_LEVEL_TRACE = 5,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum knib_log_level knib_log_level;
#else
typedef uint32_t knib_log_level;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * An opaque context: the settings (progress callback, time budget), the
 * cancellation and the last error of the operations run with it.
 *
 * Made by `knib_context_new`, owned by the caller, released once by
 * `knib_context_free`. One operation at a time per context (a second one
 * started meanwhile fails with `KNIB_RESULT_BUSY`); it may be used from any
 * thread, and `knib_context_cancel` may be called from another thread while
 * an operation runs. Use one context per thread for parallel operations.
 */
typedef struct knib_context knib_context;

/**
 * Receives the progress of an operation: `step` names what is being done
 * ("convert ...", "commit ...") and `percent` is that step's progress, 0 to
 * 100. Called on a thread of knib's (not always the caller's) while the
 * operation runs, never after it returned; `step` is valid only during the
 * call.
 */
typedef void (*knib_progress_callback)(void *userdata, const char *step, double percent);

/**
 * Receives one log record: its level and its text (`"<module>: <what>"`),
 * valid only during the call. Called on whatever thread logged, possibly
 * several at once.
 */
typedef void (*knib_log_callback)(void *userdata, knib_log_level level, const char *message);

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The library's version ("0.1.0"): a static string, never freed. Compare
 * it with `KNIB_VERSION` to catch a header and a library that differ.
 */
const char *knib_version(void);

/**
 * Make a new context (no progress callback, no time limit) and write its
 * handle to `*context_out`.
 *
 * # Safety
 * `context_out` is NULL or points to writable memory for one pointer.
 */
knib_result knib_context_new(struct knib_context **context_out);

/**
 * Release a context. NULL, and a handle that is not live (already freed,
 * never made), are ignored. The handle is dead from now on; an operation
 * still running on it on another thread goes on to its end (cancel it
 * first to stop it), calling its callbacks, and the context is released
 * when it returns.
 */
void knib_context_free(struct knib_context *context);

/**
 * Set (or, with a NULL `callback`, remove) the progress callback of the
 * context's next operations. `userdata` is handed back to each call; it
 * may be NULL. The callback may run on a thread that is not the caller's.
 */
knib_result knib_context_set_progress(struct knib_context *context,
                                      knib_progress_callback callback,
                                      void *userdata);

/**
 * Set the time budget of each of the context's next operations, in
 * seconds; 0 or less means no limit (the default), and so does a budget
 * too large for the clock (`INT64_MAX`). An operation still
 * working when its budget runs out stops (any external program it runs is
 * killed) and fails with `KNIB_RESULT_TIMEOUT`.
 */
knib_result knib_context_set_timeout(struct knib_context *context, int64_t seconds);

/**
 * Ask the operation running on the context to stop; it then fails with
 * `KNIB_RESULT_CANCELLED`, having removed what it had written (a backup or
 * compression leaves no partial file). Safe to call from any thread at any
 * time. When no operation is running, the next one to start on the context
 * is cancelled at once. Either way the context is usable again once the
 * cancelled operation has returned.
 */
knib_result knib_context_cancel(struct knib_context *context);

/**
 * Copy the message of the context's last error, NUL-terminated, into
 * `buf` of `len` bytes, and write its size (with the NUL) to `*needed`.
 * The message is empty when the last operation succeeded. When `len` is
 * too small, nothing is copied, `*needed` is written all the same, and the
 * result is `KNIB_RESULT_BUFFER_TOO_SMALL`. This call leaves the last error
 * as it is.
 *
 * # Safety
 * `buf` is NULL or points to `len` writable bytes; `needed` is NULL or
 * points to a writable `size_t`.
 */
knib_result knib_context_error_message(const struct knib_context *context,
                                       char *buf,
                                       size_t len,
                                       size_t *needed);

/**
 * Write to `*consistent_out` whether the last failed backup left the VM
 * consistent: 1 yes, 0 no (run `knib_recover`), -1 unknown or not about a
 * VM (no error, or an operation that does not touch a VM's disks).
 *
 * # Safety
 * `consistent_out` is NULL or points to a writable `int32_t`.
 */
knib_result knib_context_error_vm_consistent(const struct knib_context *context,
                                             int32_t *consistent_out);

/**
 * Send knib's log records up to `max_level` (a `knib_log_level`; 0 = none)
 * to `callback` with `userdata` (which may be NULL), for the whole process;
 * a NULL `callback` stops logging. May be called again to change either.
 * Fails with `KNIB_RESULT_INVALID_INPUT` for a `max_level` above 5, and with
 * `KNIB_RESULT_BUSY` when another Rust logger already serves this process
 * (a program that links knib with other Rust code using the `log` crate).
 */
knib_result knib_set_log_callback(knib_log_callback callback, void *userdata, uint32_t max_level);

/**
 * Run operation `op` (see the table in the preamble) on the JSON request
 * `request_json`. On success `*answer_out` gets the JSON answer, a string
 * the caller owns and frees with `knib_string_free`. On failure nothing is
 * written; the code says what kind of failure it was and
 * `knib_context_error_message` what was wrong.
 *
 * # Safety
 * `op` and `request_json` are NULL or NUL-terminated strings;
 * `answer_out` is NULL or points to writable memory for one pointer.
 */
knib_result knib_call(struct knib_context *context,
                      const char *op,
                      const char *request_json,
                      char **answer_out);

/**
 * Free a string knib gave (an answer). NULL is ignored.
 *
 * # Safety
 * `s` is NULL or a string from knib not freed before.
 */
void knib_string_free(char *s);

/**
 * Test only: panics inside knib, to show that the panic comes back as
 * `KNIB_RESULT_PANIC` (with a message in the context) and that the process
 * and the context go on. Never call it otherwise.
 */
knib_result knib_test_panic(struct knib_context *context);

/**
 * Operation `backup`: back up all the disks of one VM together, full or
 * incremental as its chain decides. Request: `store`, `vm` with `disks`
 * (`[{"name", "path"}]`) or `domain` (+ `connect`, `quiesce`), `full`,
 * `isolated`, `chain_size` (default 8). Answer: the backup.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_backup(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `list`: the backups of a store that were not deleted.
 * Request: `store`, `vm` (optional). Answer: an array of backups.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_list(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `show`: one backup. Request: `store`, `backup`. Answer: the
 * backup.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_show(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `delete`: delete a backup without breaking its chain.
 * Request: `store`, `backup`. Answer: `{"expunged": [...],
 * "marked_removed": [...]}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_delete(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `restore`: write one volume of a backup, its chain flattened,
 * to a new image. Request: `store`, `backup`, `volume`, `to`, `format`
 * (`qcow2` or `raw`), `no_verify` (false: each file of the chain is
 * checked against its recorded hash as it is read, and a damaged one fails
 * the restore with `corrupt`), `timeout_secs`. Answer: that of
 * `agent.restore`, `{"volumes": [{"uuid": volume, "path": to, "backing":
 * null}], "removed": []}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_restore(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `quick_restore`: run a libvirt domain at once on overlays
 * over a backup. Request: `store`, `backup`, `domain`, `connect`.
 * Answer: `{"overlays": [[target, path], ...]}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_quick_restore(struct knib_context *context,
                               const char *request_json,
                               char **answer_out);

/**
 * Operation `compress`: compress a catalog backup's files and finalize
 * them (the two steps `agent.compress` and `agent.finalize_compression`
 * take on explicit files), recording it in the manifest. Request: `store`,
 * `backup`, `library` (`zstd`/`zlib`), `coroutines` (1), `rate_limit_mbps`
 * (0 = none), `min_free_factor` (1.0). Answer: the backup.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_compress(struct knib_context *context,
                          const char *request_json,
                          char **answer_out);

/**
 * Operation `verify`: check one backup (`backup` given) or all of a store:
 * `qemu-img check`, backing pointers, sizes, the whole chain present,
 * hashes. Request: `store`, `backup` (optional). Answer: `[{"id", "ok",
 * "problems", "files_checked", "chain_hashes"}]`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_verify(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `hash`: the xxh3-128 hash of each volume's chain of a backup
 * (as `agent.take_hash` computes it on explicit files).
 * Request: `store`, `backup`, `timeout_secs`. Answer: `{"backup",
 * "volumes": {volume: {"hash", "files": [{"path", "hash"}]}}}`, each
 * volume's the `hash` and `files` of `agent.take_hash` on its chain.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_hash(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `recover` (the clean-up after a failed live backup): finish or
 * undo the interrupted backup of a libvirt domain from its journal, so the
 * VM is consistent again. Request: `store`, `domain`, `connect`. Answer:
 * `{"backup_id", "step", "published", "report"}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_recover(struct knib_context *context, const char *request_json, char **answer_out);

/**
 * Operation `files.fs`: the filesystems of a volume of a backup, read
 * straight from the store. Request: `store`, `backup`, `volume`. Answer:
 * `{"filesystems": [{"index", "partition" (number or null for the whole
 * disk), "start", "size" (bytes), "type" ("ext4", "vfat", "ntfs", or one
 * knib does not read: "xfs", "LVM2_member", ...), "label"}]}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_files_fs(struct knib_context *context,
                          const char *request_json,
                          char **answer_out);

/**
 * Operation `files.ls`: the entries of a directory (or one file) of a
 * filesystem of a backup. Request: `store`, `backup`, `volume`, `fs`
 * (the `index` from `files.fs`; optional when one filesystem is
 * readable), `path` (default "/"; `..` refused, symlinks followed only
 * inside the filesystem). Answer: `{"entries": [{"name", "type" ("file",
 * "dir", "symlink", "other"), "size", "mode", "mtime", "mtime_nsec",
 * "target" (symlinks only)}]}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_files_ls(struct knib_context *context,
                          const char *request_json,
                          char **answer_out);

/**
 * Operation `files.get`: extract a file or a directory tree of a
 * filesystem of a backup to a new local path, modes and mtimes kept,
 * symlinks recreated as links. `to` must not exist; the result appears
 * there only when complete (nothing is left on failure or cancellation).
 * Request: `store`, `backup`, `volume`, `fs`, `path`, `to`. Answer:
 * `{"files", "dirs", "symlinks", "bytes"}`.
 *
 * # Safety
 * As `knib_call`.
 */
knib_result knib_files_get(struct knib_context *context,
                           const char *request_json,
                           char **answer_out);

/**
 * A short, static, lower-case name of a result code ("ok", "not found",
 * "null argument", ...); "unknown" for a number that is no code. Never
 * NULL; never free it.
 */
const char *knib_result_name(uint32_t code);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* KNIB_H */

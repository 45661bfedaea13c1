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
 * NULL); a NULL one gives KNIB_RESULT_NULL_ARGUMENT and nothing happens
 * (but an operation's arguments are read once the context is free: on a
 * context running an operation, the call gives KNIB_RESULT_BUSY first).
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
 * and returns KNIB_RESULT_CANCELLED; the short operations on a store's
 * records, version, list, show, delete, vm.settings, group.list,
 * group.show, group.delete, jobs.list, jobs.show, jobs.queue,
 * agent.finalize_compression and agent.cleanup_validation, are not
 * stopped once started: they run to
 * their end, and neither a cancellation asked for meanwhile nor the time
 * budget applies to them), the setters (they apply to the next
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
 * is docs/schema.json (the reference); what follows is generated from it,
 * and checked against it by `cargo test -p knib-core --test schema`: each
 * operation with its request's fields (`?`: optional; [T]: an array of T;
 * "a" | "b": one of these strings), the type of its answer, and a worked
 * example (its request, and an abridged answer: some fields left out,
 * arrays cut short); then every object type named, with its fields. The
 * examples live in knib-ffi/examples.json: each request is parsed as its
 * operation's, and each answer field must be the schema's.
 *
 *   (generated from docs/schema.json by knib-core/tests/schema.rs)
 *
 *   agent.cleanup_validation: Nothing by default (as the agent); with
 *                             remove_domain the validation's domain, with
 *                             work_dir knib's overlays.
 *     request:
 *       connect?       string or null: The libvirt URI (default
 *                      `qemu:///system`).
 *       remove_domain? boolean, default false: Destroy (and undefine) the
 *                      domain of that name, if there is one.
 *       timeout_secs?  integer or null: Accepted for symmetry.
 *       vm_name        string: The validation VM's name.
 *       work_dir?      string or null: Where `agent.prepare_validation` put
 *                      the overlays of the volumes without `overlay_path`
 *                      (they are removed).
 *     answer: CleanupValidationAnswer
 *     example request:
 *       {"vm_name": "v-10"}
 *     example answer (abridged):
 *       {"domain_removed": false, "removed": []}
 *
 *   agent.cleanup_vm_backup: Discard a failed agent.take_backup (store files
 *                            removed, VM back on base <- delta), or with mode
 *                            "complete" finish it when it is stored, given
 *                            its request.
 *     request:
 *       connect?      string or null: The libvirt URI (default
 *                     `qemu:///system`).
 *       domain?       string or null: The libvirt domain; may be absent only
 *                     with `running: false` (a stopped VM libvirt does not
 *                     know: the volumes' files alone).
 *       end_of_chain? boolean, default false: As the failed backup's: whether
 *                     the backup ended the chain.
 *       isolated?     boolean, default false: As the failed backup's: whether
 *                     it was an isolated full copy.
 *       method?       "snapshot" | "bitmap", default "snapshot": As the
 *                     failed backup's: "snapshot" (the default) or "bitmap".
 *       mode?         "discard" | "complete": "discard" (the default, the
 *                     agent's cleanup: the store files are removed and the VM
 *                     put back on `base <- delta`) or "complete" (a backup
 *                     whose every store file is present is finished).
 *       quiesce?      boolean, default false: As the failed backup's
 *                     (ignored).
 *       running?      boolean or null: Whether the VM runs (absent: asked of
 *                     libvirt).
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *       volumes       [BackupVolume]: The failed backup's volumes, as its
 *                     request gave them.
 *     answer: CleanupVmBackupAnswer
 *     example request:
 *       {
 *         "domain": "i-2-10-VM",
 *         "volumes": [
 *           {
 *             "delta_path_on_primary": "/mnt/primary/0c6f2a4e-d1",
 *             "delta_path_on_store": "/mnt/store/backups/b1/0c6f2a4e",
 *             "path": "/mnt/primary/0c6f2a4e",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *     example answer (abridged):
 *       {
 *         "mode": "discard",
 *         "published": true,
 *         "removed_from_store": ["/mnt/store/backups/b1/0c6f2a4e"],
 *         "vm_consistent": true,
 *         "vm_running": true,
 *         "volumes": [
 *           {
 *             "path": "/mnt/primary/0c6f2a4e",
 *             "target": "vda",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.compress: Write `<file>.comp` beside each file, each under a
 *                   temporary name until whole (all removed on failure).
 *     request:
 *       check_output?    boolean, default false: Read each `.comp` back
 *                        before it counts as written and compare its data
 *                        with the file's: one that differs fails as an
 *                        internal error (the copy is faulty, not the file),
 *                        and no `.comp` is left. It costs about 1.5x the CPU
 *                        of the compression.
 *       coroutines?      integer, default 1: qemu-img's `-m`, 1 to 16.
 *       expected_hashes? [string] or null: One xxh3-128 per file, in order: a
 *                        file that does not match is refused as corrupt.
 *       files            [string]: The backup files to compress (absolute);
 *                        `<file>.comp` is written beside each.
 *       library?         "zstd" | "zlib", default "zstd": "zstd" (default) or
 *                        "zlib".
 *       min_free_bytes?  integer or null: Refuse unless this many bytes are
 *                        free beside the files.
 *       min_free_factor? number, default 1.0: Refuse unless this many times
 *                        each file's size is free.
 *       rate_limit_mbps? integer, default 0: MB/s; 0 = no limit.
 *       timeout_secs?    integer or null: The time budget in seconds; 0 or
 *                        absent = none.
 *     answer: CompressAnswer
 *     example request:
 *       {
 *         "coroutines": 2,
 *         "files": ["/mnt/store/backups/b1/0c6f2a4e"],
 *         "library": "zstd"
 *       }
 *     example answer (abridged):
 *       {
 *         "compressed": [
 *           {
 *             "comp_path": "/mnt/store/backups/b1/0c6f2a4e.comp",
 *             "compressed_size": 402653184,
 *             "original_size": 1073741824,
 *             "path": "/mnt/store/backups/b1/0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.consolidate: Pull the backing files into a domain's volumes (after
 *                      a quick restore).
 *     request:
 *       connect?      string or null: The libvirt URI (default
 *                     `qemu:///system`).
 *       domain        string: The libvirt domain.
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *       volumes?      [VolumeRef]: The volumes to consolidate; absent or
 *                     empty: every disk of the domain that has backing files.
 *     answer: ConsolidateAnswer
 *     example request:
 *       {
 *         "domain": "i-2-10-VM",
 *         "volumes": [{"path": "/mnt/primary/0c6f2a4e", "uuid": "0c6f2a4e"}]
 *       }
 *     example answer (abridged):
 *       {
 *         "consolidated": [
 *           {
 *             "path": "/mnt/primary/0c6f2a4e",
 *             "pulled": true,
 *             "target": "vda",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.finalize_compression: Rename each `<file>.comp` over its file (each
 *                               first checked to be a whole qcow2 image with
 *                               its file's size and backing pointer), or with
 *                               `cleanup` remove them.
 *     request:
 *       cleanup?      boolean, default false: Remove the `<file>.comp` files
 *                     instead (a failed compression).
 *       files         [string]: The files whose `<file>.comp` is renamed over
 *                     them (or removed).
 *       timeout_secs? integer or null: Accepted for symmetry; finalizing is a
 *                     rename.
 *     answer: FinalizeAnswer
 *     example request:
 *       {"files": ["/mnt/store/backups/b1/0c6f2a4e"]}
 *     example answer (abridged):
 *       {
 *         "finalized": [
 *           {"path": "/mnt/store/backups/b1/0c6f2a4e", "size": 402653184}
 *         ],
 *         "total_size": 402653184
 *       }
 *
 *   agent.merge_snapshot: Merge disk-only VM snapshot deltas into the layer
 *                         below them.
 *     request:
 *       connect?      string or null: The libvirt URI (default
 *                     `qemu:///system`).
 *       domain?       string or null: The libvirt domain; may be absent only
 *                     with `running: false`.
 *       merges        [SnapshotMerge]: One merge per volume; empty: nothing
 *                     to do (an empty answer), as the management server sends
 *                     it after a restore of every volume.
 *       running?      boolean or null: Whether the VM runs (absent: asked of
 *                     libvirt).
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *     answer: MergeSnapshotAnswer
 *     example request:
 *       {
 *         "domain": "i-2-10-VM",
 *         "merges": [
 *           {
 *             "child": "/mnt/primary/0c6f2a4e-s1",
 *             "parent": "/mnt/primary/0c6f2a4e",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *     example answer (abridged):
 *       {
 *         "volumes": [
 *           {
 *             "path": "/mnt/primary/0c6f2a4e",
 *             "target": "vda",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.prepare_validation: One qcow2 overlay per volume of a backup, for a
 *                             validation: at each volume's overlay_path (an
 *                             empty volume file) or in work_dir.
 *     request:
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *       vm_name       string: The validation VM's name (names the overlays in
 *                     `work_dir`).
 *       volumes       [PrepareVolume]: The backup's volumes.
 *       work_dir?     string or null: Where the overlays of the volumes
 *                     without `overlay_path` go.
 *     answer: PrepareValidationAnswer
 *     example request:
 *       {
 *         "vm_name": "v-10",
 *         "volumes": [
 *           {
 *             "backup_path": "/mnt/store/backups/2/7/b1",
 *             "overlay_path": "/mnt/primary/5e6f7a8b",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *     example answer (abridged):
 *       {
 *         "volumes": [
 *           {
 *             "backup_path": "/mnt/store/backups/2/7/b1",
 *             "overlay_path": "/mnt/primary/5e6f7a8b",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.restore: Restore volumes from backup files (all or none replaced),
 *                  or quickly onto overlays.
 *     request:
 *       deltas_to_remove? [string], default []: Files of the old chains on
 *                         primary, removed after the restore (a file of a
 *                         backup's chain or a directory refuses the request).
 *       quick_restore?    boolean, default false: Write empty qcow2 overlays
 *                         over the backups instead of copies (consolidate
 *                         later).
 *       timeout_secs?     integer or null: The time budget in seconds; 0 or
 *                         absent = none.
 *       volumes           [RestoreVolume]: The volumes to restore, all or
 *                         none.
 *     answer: RestoreAnswer
 *     example request:
 *       {
 *         "volumes": [
 *           {
 *             "backup_path": "/mnt/store/backups/b1/0c6f2a4e",
 *             "uuid": "0c6f2a4e",
 *             "volume_path": "/mnt/primary/0c6f2a4e"
 *           }
 *         ]
 *       }
 *     example answer (abridged):
 *       {
 *         "removed": [],
 *         "volumes": [
 *           {
 *             "backing": null,
 *             "path": "/mnt/primary/0c6f2a4e",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.take_backup: Snapshot a domain's volumes, copy them to the store,
 *                      merge (CloudStack's TakeKbossBackupCommand); or, with
 *                      method bitmap, copy what a checkpoint tracked.
 *     request:
 *       connect?      string or null: The libvirt URI (default
 *                     `qemu:///system`).
 *       domain?       string or null: The libvirt domain; may be absent only
 *                     with `running: false` (a stopped VM libvirt does not
 *                     know: the volumes' files alone).
 *       end_of_chain? boolean, default false: End the chain: the new delta is
 *                     committed into the base too, and the disk runs on its
 *                     base alone.
 *       isolated?     boolean, default false: A full copy outside the chain;
 *                     the disks' chains stay as they were.
 *       method?       "snapshot" | "bitmap", default "snapshot": "snapshot"
 *                     (the default: KBOSS's external snapshot, copy and
 *                     merge) or "bitmap" (a running domain only: libvirt
 *                     checkpoints and a pull-mode backup job; the disks'
 *                     chains are left as they are, so `delta_path_on_primary`
 *                     is not created and `merge` and
 *                     `vm_snapshot_delta_paths` must be absent).
 *       quiesce?      boolean, default false: Freeze the guest's filesystems
 *                     (guest agent) for the snapshot.
 *       running?      boolean or null: Whether the VM runs (absent: asked of
 *                     libvirt).
 *       timeout_secs? integer or null: The time budget in seconds (the
 *                     command's `wait`); 0 or absent = none. It bounds the
 *                     snapshot and the copy; once the backup is published its
 *                     merges run to their end, as on the Java path.
 *       volumes       [BackupVolume]: Every volume of the VM, backed up at
 *                     one instant.
 *     answer: TakeBackupAnswer
 *     example request:
 *       {
 *         "domain": "i-2-10-VM",
 *         "running": true,
 *         "volumes": [
 *           {
 *             "delta_path_on_primary": "/mnt/primary/0c6f2a4e-d1",
 *             "delta_path_on_store": "/mnt/store/backups/b1/0c6f2a4e",
 *             "path": "/mnt/primary/0c6f2a4e",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *     example answer (abridged):
 *       {
 *         "kind": "full",
 *         "total_size": 1073741824,
 *         "vm_consistent": true,
 *         "volumes": [
 *           {
 *             "new_volume_path": "/mnt/primary/0c6f2a4e-d1",
 *             "size": 1073741824,
 *             "target": "vda",
 *             "uuid": "0c6f2a4e"
 *           }
 *         ]
 *       }
 *
 *   agent.take_hash: xxh3-128 of a backup's chain, root first, and of each
 *                    file.
 *     request:
 *       backup_uuid?  string or null: Echoed in the answer.
 *       files         [string]: The backup's chain, root first (absolute
 *                     paths), hashed in this order.
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *     answer: TakeHashAnswer
 *     example request:
 *       {
 *         "backup_uuid": "b2",
 *         "files": [
 *           "/mnt/store/backups/b1/0c6f2a4e",
 *           "/mnt/store/backups/b2/0c6f2a4e"
 *         ]
 *       }
 *     example answer (abridged):
 *       {
 *         "backup_uuid": "b2",
 *         "files": [
 *           {
 *             "hash": "9f2c4e1a7b3d5f60182a4c6e8b0d2f41",
 *             "path": "/mnt/store/backups/b1/0c6f2a4e"
 *           }
 *         ],
 *         "hash": "5d1e0b7c93a24f68a1c2e3f405162738"
 *       }
 *
 *   agent.validate: Validate a running domain (CloudStack's validation VM) or
 *                   a throwaway one booted on backup files: boot, screenshot,
 *                   script.
 *     request:
 *       boot_timeout_secs?    integer, default 300: How long to wait for the
 *                             guest agent.
 *       cmdline?              string or null: Its command line.
 *       connect?              string or null: The libvirt URI (default
 *                             `qemu:///system`).
 *       disks?                [ValidateDisk]: The disks to boot a throwaway
 *                             domain on, first the boot disk (not with
 *                             `domain`).
 *       domain?               string or null: The running domain to validate,
 *                             by name: knib creates, changes and destroys
 *                             nothing (not with `disks`).
 *       domain_type?          string or null: `kvm` or `qemu` (default:
 *                             chosen by the host; with `disks`).
 *       execute_script?       boolean, default false: Run `script` in the
 *                             guest through the guest agent.
 *       expected_result?      string or null: What the script must give, as
 *                             the agent compares it: `"0"` (the default)
 *                             matches an exit code of 0; any value matches a
 *                             standard output whose base64 (as the guest
 *                             agent sends it) equals it.
 *       initrd?               string or null: Its initrd.
 *       kernel?               string or null: Boot this kernel directly (else
 *                             the first disk through the firmware; with
 *                             `disks`).
 *       max_write_mib?        integer or null: The most the throwaway
 *                             domain's guest may write to its overlays and
 *                             serial console log, in MiB (1 to 1048576; with
 *                             `disks`): past it the guest is stopped and the
 *                             validation fails, saying so. Default: no limit
 *                             of its own, but a guest is stopped the same way
 *                             whenever the work directory's file system has
 *                             less than 1 GiB free.
 *       memory_mib?           integer or null: The throwaway domain's memory
 *                             in MiB (default 512).
 *       screenshot_next_to?   string or null: Name the screenshot as the
 *                             agent does:
 *                             `<screenshot_next_to>-screenshot-<UTC
 *                             time>.png`, next to this file (the backup's
 *                             first file on the store).
 *       screenshot_path?      string or null: Where the screenshot goes (not
 *                             with `screenshot_next_to`); an existing file
 *                             there is replaced only when it is a PNG image
 *                             or empty.
 *       screenshot_wait_secs? integer, default 0: Seconds to wait before the
 *                             screenshot (the agent's `screenshotWait`).
 *       script?               string or null: The program to run in the guest
 *                             (an absolute path).
 *       script_arguments?     string or null: Its arguments, split at every
 *                             comma, nothing trimmed (as the agent splits
 *                             them).
 *       script_timeout_secs?  integer or null: How long the script may run,
 *                             in seconds (the agent's `scriptTimeout`;
 *                             default 60).
 *       store_root?           string or null: The store's mount point: the
 *                             answer's `screenshot_store_path` is the
 *                             screenshot relative to it, as the agent
 *                             answers.
 *       take_screenshot?      boolean, default false: Save a PNG screenshot
 *                             after the boot; without it the screenshot
 *                             fields below are ignored (the Java wrapper sets
 *                             them whatever the offering's steps).
 *       timeout_secs?         integer or null: The time budget in seconds; 0
 *                             or absent = none.
 *       vm_name?              string or null: The validated VM's name (in
 *                             messages).
 *       wait_for_boot?        boolean, default true: Wait for the guest agent
 *                             to answer `guest-sync` (else the boot is not
 *                             validated and the other checks run at once).
 *       work_dir?             string or null: Where the throwaway domain's
 *                             overlays go (with `disks`).
 *     answer: ValidateAnswer
 *     example request:
 *       {
 *         "boot_timeout_secs": 120,
 *         "domain": "v-10",
 *         "execute_script": true,
 *         "expected_result": "0",
 *         "screenshot_next_to": "/mnt/store/backups/2/7/b1",
 *         "screenshot_wait_secs": 5,
 *         "script": "/usr/local/bin/check",
 *         "script_arguments": "--quick,db",
 *         "script_timeout_secs": 60,
 *         "store_root": "/mnt/store",
 *         "take_screenshot": true
 *       }
 *     example answer (abridged):
 *       {
 *         "boot_seconds": 14.2,
 *         "boot_validated": true,
 *         "passed": true,
 *         "problems": [],
 *         "screenshot_path": "/mnt/store/backups/2/7/b1-screenshot-20261201T120000Z.png",
 *         "screenshot_store_path": "backups/2/7/b1-screenshot-20261201T120000Z.png",
 *         "script_exit_code": 0,
 *         "script_output": "ok",
 *         "script_result": null
 *       }
 *
 *   backup: Back up all the disks of one VM together, full or incremental as
 *           its chain decides.
 *     request:
 *       chain_size?   integer, default 8: Backups per chain (default 8).
 *       check_output? boolean, default false: With `compress`: read each
 *                     compressed file back before the backup is kept; one
 *                     that does not hold what was copied into it fails the
 *                     backup as an internal error (nothing kept). The store's
 *                     `compression.check_output` turns it on whatever is
 *                     asked, for backups into the store. A file copied by
 *                     qemu-img is compared with its source by guest bytes;
 *                     one whose source knib's reader does not read is not
 *                     read back (a warning is logged). Refused without
 *                     `compress`, and for a backup sent straight to a vault
 *                     (no file of its own is left to read).
 *       compress?     "zstd" | "zlib" or null: Compress as copied, in one
 *                     pass.
 *       connect?      string or null: The libvirt URI (default
 *                     `qemu:///system`).
 *       disks?        [DiskSpec], default []: The VM's disks (with `vm`).
 *       domain?       string or null: A libvirt domain, instead of `vm` and
 *                     `disks`.
 *       full?         boolean, default false: Start a new chain.
 *       isolated?     boolean, default false: A full backup outside the
 *                     chain.
 *       method?       "snapshot" | "bitmap" or null: With `domain`: how
 *                     changes are found, `snapshot` or `bitmap` (checkpoints
 *                     and dirty bitmaps, running domains); absent: the VM's
 *                     setting (`vm.settings`), `snapshot` by default.
 *       quiesce?      boolean, default false: With `domain`: freeze the
 *                     guest's filesystems (guest agent) for the snapshot.
 *       store         string: The store directory (made when missing).
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none. It bounds the snapshot and the copy;
 *                     once the backup is published the merge of the disks
 *                     runs to its end (stopping it would leave them for
 *                     `recover`).
 *       vault?        string or null: Write the backup straight to this vault
 *                     (`s3://bucket/prefix`) as it is copied, instead of into
 *                     the store (which keeps the VM's lock, settings and, for
 *                     a domain, the journal); the chain continued is the
 *                     vault's.
 *       vm?           string or null: The VM's name, with `disks`.
 *     answer: BackupView
 *     example request:
 *       {
 *         "disks": [{"name": "root", "path": "/vms/web/root.qcow2"}],
 *         "store": "/backups",
 *         "vm": "web"
 *       }
 *     example answer (abridged):
 *       {
 *         "id": "20260301T020000Z-web",
 *         "kind": "full",
 *         "parent": null,
 *         "position": 0,
 *         "vm": "web",
 *         "volumes": [
 *           {
 *             "file": "/backups/web/20260301T020000Z-web/root.qcow2",
 *             "name": "root",
 *             "size": 1073741824
 *           }
 *         ]
 *       }
 *
 *   compress: Compress a backup's files and finalize them, recording it in
 *             the manifest.
 *     request:
 *       backup           string: The backup's id.
 *       check_output?    boolean, default false: Read each compressed copy
 *                        back before it replaces the backup's file and
 *                        compare its data with the file's: one that differs
 *                        fails as an internal error (the copy is faulty, not
 *                        the backup) and the backup is kept. The store's
 *                        `compression.check_output` turns it on whatever is
 *                        asked. It costs about 1.5x the CPU.
 *       coroutines?      integer, default 1: qemu-img's `-m`, 1 to 16.
 *       library?         "zstd" | "zlib", default "zstd": "zstd" (default) or
 *                        "zlib".
 *       min_free_bytes?  integer or null: Refuse unless this many bytes are
 *                        free in the backup's directory.
 *       min_free_factor? number, default 1.0: Refuse unless this many times
 *                        each file's size is free.
 *       rate_limit_mbps? integer, default 0: MB/s; 0 = no limit.
 *       store            string: The store directory.
 *       timeout_secs?    integer or null: The time budget in seconds; 0 or
 *                        absent = none.
 *     answer: BackupView
 *     example request:
 *       {
 *         "backup": "20260301T020000Z-web",
 *         "coroutines": 4,
 *         "library": "zstd",
 *         "store": "/backups"
 *       }
 *     example answer (abridged):
 *       {
 *         "compression": {
 *           "library": "zstd",
 *           "original_size": 1073741824,
 *           "size": 402653184
 *         },
 *         "id": "20260301T020000Z-web"
 *       }
 *
 *   delete: Delete a backup without breaking its chain.
 *     request:
 *       backup  string: The backup's id.
 *       store   string: The store directory, or a vault
 *               (`s3://BUCKET/PREFIX`).
 *     answer: DeleteOutcome
 *     example request:
 *       {"backup": "20260301T020000Z-web", "store": "/backups"}
 *     example answer (abridged):
 *       {"expunged": ["20260301T020000Z-web"], "marked_removed": []}
 *
 *   files.fs: The filesystems of a backup's volume (from the catalog, or a
 *             backup file by its path).
 *     request:
 *       backup?      string or null: The backup's id.
 *       backup_path? string or null: The absolute path of a backup's qcow2
 *                    file (its chain follows the backing pointers), instead
 *                    of `store`, `backup` and `volume`.
 *       store?       string or null: The store directory, or a vault
 *                    (`s3://BUCKET/PREFIX`) (with `backup` and `volume`; or
 *                    `backup_path`).
 *       volume?      string or null: The volume's name.
 *     answer: FilesystemsAnswer
 *     example request:
 *       {"backup_path": "/mnt/store/backups/b2/0c6f2a4e"}
 *     example answer (abridged):
 *       {
 *         "filesystems": [
 *           {
 *             "device": "/dev/sda1",
 *             "index": 1,
 *             "label": "root",
 *             "partition": 1,
 *             "size": 1072693248,
 *             "start": 1048576,
 *             "type": "ext4"
 *           }
 *         ]
 *       }
 *
 *   files.get: Extract a file or directory tree of a backup to a new local
 *              path.
 *     request:
 *       backup?      string or null: The backup's id.
 *       backup_path? string or null: The absolute path of a backup's qcow2
 *                    file (its chain follows the backing pointers), instead
 *                    of `store`, `backup` and `volume`.
 *       fs?          integer | string or null: The filesystem's `index` or
 *                    `device`; optional when one is read natively.
 *       path         string: The file or directory to extract.
 *       store?       string or null: The store directory, or a vault
 *                    (`s3://BUCKET/PREFIX`) (with `backup` and `volume`; or
 *                    `backup_path`).
 *       to           string: Where to put it (must not exist).
 *       volume?      string or null: The volume's name.
 *     answer: GetSummary
 *     example request:
 *       {
 *         "backup": "20260301T020000Z-web",
 *         "fs": 1,
 *         "path": "/etc/hosts",
 *         "store": "/backups",
 *         "to": "/restore/hosts",
 *         "volume": "root"
 *       }
 *     example answer (abridged):
 *       {"bytes": 221, "dirs": 0, "files": 1, "symlinks": 0}
 *
 *   files.ls: The entries of a directory (or one file) of a filesystem of a
 *             backup.
 *     request:
 *       backup?      string or null: The backup's id.
 *       backup_path? string or null: The absolute path of a backup's qcow2
 *                    file (its chain follows the backing pointers), instead
 *                    of `store`, `backup` and `volume`.
 *       fs?          integer | string or null: The filesystem's `index` or
 *                    `device` (from `files.fs`); optional when one is read
 *                    natively.
 *       path?        string or null: The directory (or file); default `/`.
 *       store?       string or null: The store directory, or a vault
 *                    (`s3://BUCKET/PREFIX`) (with `backup` and `volume`; or
 *                    `backup_path`).
 *       volume?      string or null: The volume's name.
 *     answer: EntriesAnswer
 *     example request:
 *       {
 *         "backup_path": "/mnt/store/backups/b2/0c6f2a4e",
 *         "fs": "/dev/sda1",
 *         "path": "/etc"
 *       }
 *     example answer (abridged):
 *       {
 *         "entries": [
 *           {
 *             "mode": 420,
 *             "mtime": 1772330400,
 *             "mtime_nsec": 0,
 *             "name": "hosts",
 *             "size": 221,
 *             "type": "file"
 *           }
 *         ]
 *       }
 *
 *   group.backup: One backup of each of several VMs at a common instant
 *                 (guests frozen together), recorded as a group.
 *     request:
 *       chain_size?          integer, default 8: Backups per chain (default
 *                            8).
 *       check_output?        boolean, default false: With `compress`: read
 *                            each compressed file back before the backup is
 *                            kept; one that does not hold what was copied
 *                            into it fails the backup as an internal error
 *                            (nothing kept). The store's
 *                            `compression.check_output` turns it on whatever
 *                            is asked, for backups into the store. A file
 *                            copied by qemu-img is compared with its source
 *                            by guest bytes; one whose source knib's reader
 *                            does not read is not read back (a warning is
 *                            logged). Refused without `compress`.
 *       compress?            "zstd" | "zlib" or null: Compress as copied:
 *                            "zstd" or "zlib".
 *       connect?             string or null: The libvirt URI (default
 *                            `qemu:///system`).
 *       freeze_timeout_secs? integer, default 30: The bound on freezing and
 *                            snapshotting while guests are frozen, in seconds
 *                            (1 or more, default 30): past it every guest is
 *                            thawed and the group fails. A group with no
 *                            guest frozen is not bounded by it.
 *       full?                boolean, default false: Start new chains.
 *       max_parallel?        integer or null: Members copied at once after
 *                            the thaw (1 or more; default: the store's
 *                            `group.max_concurrent_copies`, 4).
 *       members              [MemberSpec]: The VMs, at least two: each a
 *                            `domain`, or a `vm` with `disks`.
 *       on_failure?          "keep" | "rollback", default "keep": `"keep"`
 *                            (default: publish the members that succeeded) or
 *                            `"rollback"` (publish none unless all succeed).
 *       quiesce?             boolean, default false: Freeze every running
 *                            guest that has a guest agent channel for the
 *                            snapshots (all at once).
 *       store                string: The store directory (made when missing).
 *       timeout_secs?        integer or null: The time budget in seconds; 0
 *                            or absent = none.
 *     answer: GroupRecord
 *     example request:
 *       {
 *         "freeze_timeout_secs": 20,
 *         "members": [{"domain": "db"}, {"domain": "app"}],
 *         "on_failure": "keep",
 *         "quiesce": true,
 *         "store": "/backups"
 *       }
 *     example answer (abridged):
 *       {
 *         "created": "2026-12-01T12:00:00.123Z",
 *         "freeze_to_thaw_ms": 412.5,
 *         "id": "group-20261201-120000123-1a2b",
 *         "instant": "2026-12-01T12:00:01.342Z",
 *         "members": [
 *           {
 *             "backup": "20261201-120000124-3c4d",
 *             "domain": true,
 *             "error": null,
 *             "quiesced": true,
 *             "running": true,
 *             "snapshot_at": "2026-12-01T12:00:01.310Z",
 *             "vm": "db"
 *           },
 *           {
 *             "backup": "20261201-120000125-5e6f",
 *             "domain": true,
 *             "error": null,
 *             "quiesced": true,
 *             "running": true,
 *             "snapshot_at": "2026-12-01T12:00:01.342Z",
 *             "vm": "app"
 *           }
 *         ],
 *         "on_failure": "keep",
 *         "quiesce": true,
 *         "recovered": false,
 *         "schema": 1,
 *         "snapshot_skew_ms": 32.0,
 *         "state": "complete"
 *       }
 *
 *   group.delete: Delete every member's backup of a group (chain-safely),
 *                 then the group.
 *     request:
 *       group  string: The group backup's id.
 *       store  string: The store directory.
 *     answer: GroupDeleteAnswer
 *     example request:
 *       {"group": "group-20261201-120000123-1a2b", "store": "/backups"}
 *     example answer (abridged):
 *       {
 *         "members": [
 *           {"expunged": ["20261201-120000124-3c4d"], "marked_removed": []},
 *           {"expunged": ["20261201-120000125-5e6f"], "marked_removed": []}
 *         ]
 *       }
 *
 *   group.list: The group backups of a store.
 *     request:
 *       store  string: The store directory.
 *     answer: [GroupRecord]
 *     example request:
 *       {"store": "/backups"}
 *     example answer (abridged):
 *       [
 *         {
 *           "created": "2026-12-01T12:00:00.123Z",
 *           "freeze_to_thaw_ms": 412.5,
 *           "id": "group-20261201-120000123-1a2b",
 *           "instant": "2026-12-01T12:00:01.342Z",
 *           "members": [
 *             {
 *               "backup": "20261201-120000124-3c4d",
 *               "domain": true,
 *               "error": null,
 *               "quiesced": true,
 *               "running": true,
 *               "snapshot_at": "2026-12-01T12:00:01.310Z",
 *               "vm": "db"
 *             },
 *             {
 *               "backup": "20261201-120000125-5e6f",
 *               "domain": true,
 *               "error": null,
 *               "quiesced": true,
 *               "running": true,
 *               "snapshot_at": "2026-12-01T12:00:01.342Z",
 *               "vm": "app"
 *             }
 *           ],
 *           "on_failure": "keep",
 *           "quiesce": true,
 *           "recovered": false,
 *           "schema": 1,
 *           "snapshot_skew_ms": 32.0,
 *           "state": "complete"
 *         }
 *       ]
 *
 *   group.recover: Finish the group backups a crash interrupted (each member
 *                  recovered).
 *     request:
 *       connect? string or null: The libvirt URI.
 *       store    string: The store directory.
 *     answer: [GroupRecord]
 *     example request:
 *       {"store": "/backups"}
 *     example answer (abridged):
 *       []
 *
 *   group.restore: Restore every member of a group backup (copies, or quick
 *                  overlays).
 *     request:
 *       format?       "qcow2" | "raw", default "qcow2": Their format
 *                     (flattened copies).
 *       group         string: The group backup's id.
 *       no_verify?    boolean, default false: Skip checking the chains'
 *                     hashes as they are read (copies only: a quick restore
 *                     reads nothing whole, and its files always pass
 *                     `qemu-img check` first).
 *       partial?      boolean, default false: Restore a partial group's
 *                     members that have a backup (without it, a group with
 *                     members that have none is refused, naming them).
 *       quick?        boolean, default false: qcow2 overlays over the backups
 *                     instead of copies.
 *       store         string: The store directory.
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *       to            string: The directory the volumes go to, as
 *                     `<to>/<vm>/<volume>.<format>`.
 *     answer: GroupRestoreAnswer
 *     example request:
 *       {
 *         "format": "qcow2",
 *         "group": "group-20261201-120000123-1a2b",
 *         "store": "/backups",
 *         "to": "/restore"
 *       }
 *     example answer (abridged):
 *       {
 *         "volumes": [
 *           {
 *             "backup": "20261201-120000124-3c4d",
 *             "path": "/restore/db/vda.qcow2",
 *             "vm": "db",
 *             "volume": "vda"
 *           },
 *           {
 *             "backup": "20261201-120000125-5e6f",
 *             "path": "/restore/app/vda.qcow2",
 *             "vm": "app",
 *             "volume": "vda"
 *           }
 *         ]
 *       }
 *
 *   group.show: One group backup.
 *     request:
 *       group  string: The group backup's id.
 *       store  string: The store directory.
 *     answer: GroupRecord
 *     example request:
 *       {"group": "group-20261201-120000123-1a2b", "store": "/backups"}
 *     example answer (abridged):
 *       {
 *         "created": "2026-12-01T12:00:00.123Z",
 *         "freeze_to_thaw_ms": 412.5,
 *         "id": "group-20261201-120000123-1a2b",
 *         "instant": "2026-12-01T12:00:01.342Z",
 *         "members": [
 *           {
 *             "backup": "20261201-120000124-3c4d",
 *             "domain": true,
 *             "error": null,
 *             "quiesced": true,
 *             "running": true,
 *             "snapshot_at": "2026-12-01T12:00:01.310Z",
 *             "vm": "db"
 *           },
 *           {
 *             "backup": "20261201-120000125-5e6f",
 *             "domain": true,
 *             "error": null,
 *             "quiesced": true,
 *             "running": true,
 *             "snapshot_at": "2026-12-01T12:00:01.342Z",
 *             "vm": "app"
 *           }
 *         ],
 *         "on_failure": "keep",
 *         "quiesce": true,
 *         "recovered": false,
 *         "schema": 1,
 *         "snapshot_skew_ms": 32.0,
 *         "state": "complete"
 *       }
 *
 *   hash: The xxh3-128 of each volume's chain of a backup.
 *     request:
 *       backup        string: The backup's id.
 *       store         string: The store directory.
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *     answer: HashAnswer
 *     example request:
 *       {"backup": "20260301T020000Z-web", "store": "/backups"}
 *     example answer (abridged):
 *       {
 *         "backup": "20260301T020000Z-web",
 *         "volumes": {
 *           "root": {
 *             "files": [
 *               {
 *                 "hash": "9f2c4e1a7b3d5f60182a4c6e8b0d2f41",
 *                 "path": "/backups/web/20260301T020000Z-web/root.qcow2"
 *               }
 *             ],
 *             "hash": "9f2c4e1a7b3d5f60182a4c6e8b0d2f41"
 *           }
 *         }
 *       }
 *
 *   jobs.cancel: Cancel a job: a queued one at once, a running one by asking
 *                its runner to stop it (its backup left as it was).
 *     request:
 *       force?     boolean, default false: When the runner of a running job
 *                  does not stop it within the wait (its host is down, say),
 *                  record it cancelled all the same.
 *       job        string: The job's id.
 *       store      string: The store directory.
 *       wait_secs? integer or null: How long to wait for the runner of a
 *                  running job to stop it, in seconds; absent: 30. A queued
 *                  job is cancelled at once. A call cancelled, or out of its
 *                  time budget, before the wait ends fails so and forces
 *                  nothing; the request to stop stands, and the runner still
 *                  stops the job when it sees it.
 *     answer: JobView
 *     example request:
 *       {"job": "compress-20261201-120500000-7e8f", "store": "/backups"}
 *     example answer (abridged):
 *       {
 *         "attempts": 0,
 *         "backup": "20261201-120000000-a1b2",
 *         "created_at": 1796126700,
 *         "finished_at": 1796126720,
 *         "id": "compress-20261201-120500000-7e8f",
 *         "kind": "compress",
 *         "last_error": "cancelled by the operator while it ran",
 *         "next_attempt_at": 1796126700,
 *         "owner": null,
 *         "owner_status": null,
 *         "schema": 1,
 *         "state": "cancelled",
 *         "updated_at": 1796126720,
 *         "vm": "web"
 *       }
 *
 *   jobs.list: The store's jobs (compression, validation, sync), oldest
 *              first.
 *     request:
 *       store  string: The store directory.
 *     answer: [JobView]
 *     example request:
 *       {"store": "/backups"}
 *     example answer (abridged):
 *       [
 *         {
 *           "attempts": 0,
 *           "backup": "20261201-120000000-a1b2",
 *           "created_at": 1796126700,
 *           "finished_at": null,
 *           "id": "compress-20261201-120500000-7e8f",
 *           "kind": "compress",
 *           "last_error": null,
 *           "next_attempt_at": 1796126700,
 *           "owner": {
 *             "hostname": "kvm-host-1",
 *             "pid": 4242,
 *             "started_at": 1796126710
 *           },
 *           "owner_status": "alive",
 *           "schema": 1,
 *           "state": "running",
 *           "updated_at": 1796126710,
 *           "vm": "web"
 *         },
 *         {
 *           "attempts": 0,
 *           "backup": "20261201-120000000-a1b2",
 *           "created_at": 1796126760,
 *           "finished_at": null,
 *           "id": "validate-20261201-120600000-9a0b",
 *           "kind": "validate",
 *           "last_error": null,
 *           "next_attempt_at": 1796126760,
 *           "owner": null,
 *           "owner_status": null,
 *           "schema": 1,
 *           "state": "queued",
 *           "updated_at": 1796126760,
 *           "vm": "web"
 *         }
 *       ]
 *
 *   jobs.queue: Queue a compression or validation of a backup, or a sync of a
 *               VM to the store's vault (run by `knib jobs run`).
 *     request:
 *       backup? string or null: The backup's id: required for `compress` and
 *               `validate`; for `sync`, its VM is synced (or give `vm`).
 *       kind    "compress" | "validate" | "sync": `compress` (the backup
 *               compressed in place), `validate` (file checks, hashes and,
 *               when `validation.boot` is set in the store's `knib.json`, a
 *               boot test) or `sync` (every backup of the VM that the vault
 *               of `sync.vault` lacks sent to it).
 *       store   string: The store directory.
 *       vm?     string or null: For `sync`: the VM whose backups are sent.
 *     answer: JobView
 *     example request:
 *       {
 *         "backup": "20261201-120000000-a1b2",
 *         "kind": "compress",
 *         "store": "/backups"
 *       }
 *     example answer (abridged):
 *       {
 *         "attempts": 0,
 *         "backup": "20261201-120000000-a1b2",
 *         "created_at": 1796126700,
 *         "finished_at": null,
 *         "id": "compress-20261201-120500000-7e8f",
 *         "kind": "compress",
 *         "last_error": null,
 *         "next_attempt_at": 1796126700,
 *         "owner": null,
 *         "owner_status": null,
 *         "schema": 1,
 *         "state": "queued",
 *         "updated_at": 1796126700,
 *         "vm": "web"
 *       }
 *
 *   jobs.show: One job of the store's queue.
 *     request:
 *       job    string: The job's id (`jobs.list`).
 *       store  string: The store directory.
 *     answer: JobView
 *     example request:
 *       {"job": "compress-20261201-120500000-7e8f", "store": "/backups"}
 *     example answer (abridged):
 *       {
 *         "attempts": 0,
 *         "backup": "20261201-120000000-a1b2",
 *         "created_at": 1796126700,
 *         "finished_at": 1796126742,
 *         "id": "compress-20261201-120500000-7e8f",
 *         "kind": "compress",
 *         "last_error": null,
 *         "next_attempt_at": 1796126700,
 *         "owner": null,
 *         "owner_status": null,
 *         "schema": 1,
 *         "state": "done",
 *         "updated_at": 1796126742,
 *         "vm": "web"
 *       }
 *
 *   list: The backups of a store that were not deleted.
 *     request:
 *       store  string: The store directory, or a vault
 *              (`s3://BUCKET/PREFIX`).
 *       vm?    string or null: Only this VM's backups.
 *     answer: [BackupView]
 *     example request:
 *       {"store": "/backups", "vm": "web"}
 *     example answer (abridged):
 *       [
 *         {
 *           "id": "20260301T020000Z-web",
 *           "kind": "full",
 *           "position": 0,
 *           "vm": "web"
 *         }
 *       ]
 *
 *   quick_restore: Run a stopped libvirt domain at once on overlays over a
 *                  backup.
 *     request:
 *       backup          string: The backup's id.
 *       connect?        string or null: The libvirt URI.
 *       domain          string: The libvirt domain (stopped).
 *       server_program? string or null: From a vault only: the `knib` program
 *                       to run as the NBD server (default: `knib` on `PATH`).
 *       store           string: The store directory, or a vault
 *                       (`s3://BUCKET/PREFIX`): the disks then read the vault
 *                       through knib's NBD server, a `knib vault-serve`
 *                       process that runs until `agent.consolidate` (or `knib
 *                       consolidate`) has pulled the data in.
 *     answer: QuickRestoreAnswer
 *     example request:
 *       {
 *         "backup": "20260301T020000Z-web",
 *         "domain": "web",
 *         "store": "/backups"
 *       }
 *     example answer (abridged):
 *       {"overlays": ["/vms/web/root.qcow2"]}
 *
 *   recover: Finish or undo the interrupted live backup of a domain from its
 *            journal.
 *     request:
 *       connect? string or null: The libvirt URI.
 *       discard? boolean, default false: Give up an interrupted backup that
 *                recover cannot finish or undo (the domain is gone, its disks
 *                were changed by hand, its journal is damaged): its journal
 *                is set aside in the store and its unpublished files removed;
 *                the domain and its disks are not touched (nor looked up:
 *                `domain` names the VM in the store). The answer's
 *                `discarded` says what was done and what may be left outside
 *                the store. Not with `vault`.
 *       domain   string: The libvirt domain.
 *       store    string: The store directory.
 *       vault?   string or null: The vault (`s3://bucket/prefix`) the
 *                interrupted backup was being written to, when its journal
 *                names one: it says whether the backup was published, and
 *                loses the objects of one that was not.
 *     answer: RecoverAnswer
 *     example request:
 *       {"domain": "web", "store": "/backups"}
 *     example answer (abridged):
 *       {"backup_id": null, "published": false, "step": null}
 *
 *   restore: Write one volume of a backup, its chain flattened, to a new
 *            image.
 *     request:
 *       backup        string: The backup's id.
 *       format?       "qcow2" | "raw", default "qcow2": Its format.
 *       no_verify?    boolean, default false: Skip checking every file of the
 *                     chain against its recorded hash as it is read (checked
 *                     by default).
 *       store         string: The store directory, or a vault
 *                     (`s3://BUCKET/PREFIX`).
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *       to            string: The new image (must not exist).
 *       volume        string: The volume's name.
 *     answer: RestoreAnswer
 *     example request:
 *       {
 *         "backup": "20260301T020000Z-web",
 *         "store": "/backups",
 *         "to": "/vms/web/root-restored.qcow2",
 *         "volume": "root"
 *       }
 *     example answer (abridged):
 *       {
 *         "removed": [],
 *         "volumes": [
 *           {
 *             "backing": null,
 *             "path": "/vms/web/root-restored.qcow2",
 *             "uuid": "root"
 *           }
 *         ]
 *       }
 *
 *   show: One backup.
 *     request:
 *       backup  string: The backup's id.
 *       store   string: The store directory, or a vault
 *               (`s3://BUCKET/PREFIX`).
 *     answer: BackupView
 *     example request:
 *       {"backup": "20260301T020000Z-web", "store": "/backups"}
 *     example answer (abridged):
 *       {
 *         "created": "2026-03-01T02:00:00Z",
 *         "end_of_chain": false,
 *         "id": "20260301T020000Z-web",
 *         "kind": "full"
 *       }
 *
 *   sync: Send the backups of a store that an S3 vault lacks (parents first,
 *         each manifest last).
 *     request:
 *       check?           boolean, default false: Also read every object of
 *                        the vault's backups of the VMs synced and hold it
 *                        against its manifest's hash; an object whose bytes
 *                        changed is sent again like a lost one (default
 *                        false: objects are only listed, which finds those
 *                        gone or of another length).
 *       parallel_parts?  integer or null: Parts of a multipart upload in
 *                        flight at once, 1 to 16 (default 2; each holds 5
 *                        MiB).
 *       rate_limit_mbps? integer, default 0: Read (and send) at most this
 *                        many MB/s; 0 or absent = no limit.
 *       store            string: The store directory the backups are sent
 *                        from.
 *       timeout_secs?    integer or null: The time budget in seconds; 0 or
 *                        absent = none.
 *       to               string: The vault they are sent to:
 *                        `s3://bucket/prefix` (endpoint, region and
 *                        credentials from the usual AWS environment variables
 *                        and files).
 *       vm?              string or null: Only this VM's backups.
 *     answer: SyncReport
 *     example request:
 *       {
 *         "rate_limit_mbps": 100,
 *         "store": "/backups",
 *         "to": "s3://knib-vault/site-a",
 *         "vm": "web"
 *       }
 *     example answer (abridged):
 *       {
 *         "aborted_uploads": 0,
 *         "bytes_sent": 1073741824,
 *         "present": [],
 *         "sent": ["20260301T020000Z-web"]
 *       }
 *
 *   verify: Check one backup or all: qemu-img check, backing pointers, sizes,
 *           chains, hashes.
 *     request:
 *       backup?       string or null: One backup; absent: every backup of the
 *                     store.
 *       store         string: The store directory, or a vault
 *                     (`s3://BUCKET/PREFIX`).
 *       timeout_secs? integer or null: The time budget in seconds; 0 or
 *                     absent = none.
 *     answer: [VerifyReport]
 *     example request:
 *       {"store": "/backups"}
 *     example answer (abridged):
 *       [
 *         {
 *           "files_checked": 1,
 *           "id": "20260301T020000Z-web",
 *           "ok": true,
 *           "problems": []
 *         }
 *       ]
 *
 *   version: knib's version and the schema it reads.
 *     request: no fields
 *     answer: VersionAnswer
 *     example request:
 *       {}
 *     example answer (abridged):
 *       {"schema": 1, "version": "0.1.0"}
 *
 *   vm.settings: A VM's settings (its backup method), set when given.
 *     request:
 *       backup_method? "snapshot" | "bitmap" or null: Set the VM's backup
 *                      method: `snapshot` or `bitmap`; absent: leave it.
 *       store          string: The store directory (made when a setting is
 *                      given and it is missing).
 *       vm             string: The VM's name (a libvirt domain's name).
 *     answer: VmSettings
 *     example request:
 *       {"backup_method": "bitmap", "store": "/backups", "vm": "web"}
 *     example answer (abridged):
 *       {"backup_method": "bitmap"}
 *
 *   OBJECT TYPES (`?`: optional field)
 *
 *   BackupView: A backup as every binding and `knib --json` show it.
 *       compression?  CompressionInfo or null: Compression, if compressed.
 *       created       string: When it was taken.
 *       end_of_chain  boolean: Whether it ended its chain.
 *       full_reason?  string or null: Why it is full where an incremental
 *                     backup was asked for (the chain could not be continued
 *                     safely); null otherwise.
 *       id            string: Its id.
 *       kind          string: "full", "incremental" or "isolated".
 *       parent?       string or null: The parent backup.
 *       position      integer: Position in the chain.
 *       removed       boolean: Whether it was deleted (kept for its
 *                     children).
 *       vm            string: Its VM.
 *       volumes       [VolumeView]: Its volumes, with absolute file paths.
 *
 *   BackupVolume: One volume of a backup, as the agent's KbossTO describes
 *                 it.
 *       delta_path_on_primary    string: The new delta the disk runs on after
 *                                the backup (created).
 *       delta_path_on_store      string: The backup file written on the store
 *                                (its directory made when missing).
 *       merge?                   MergeTree or null: The delta written since
 *                                the last backup and the base it is committed
 *                                into after the copy.
 *       parent_backup_path?      string or null: The parent backup on the
 *                                store: the copy is incremental, with it as
 *                                backing file; absent: a full copy of this
 *                                volume (method `snapshot` takes full and
 *                                incremental volumes in one backup; method
 *                                `bitmap` all or none).
 *       path                     string: The file the disk runs on now
 *                                (VolumeObjectTO path, absolute).
 *       uuid                     string: The volume's uuid (the key of its
 *                                results in the answer).
 *       vm_snapshot_delta_paths? [string], default []: Disk-only VM snapshot
 *                                deltas taken since the last backup, oldest
 *                                first: `[merge.child, X1, …]`, the layers
 *                                between `merge.parent` and `path` (sent with
 *                                a parent backup).
 *
 *   CleanupValidationAnswer: The answer of `agent.cleanup_validation`.
 *       domain_removed  boolean: Whether a domain was destroyed (only with
 *                       `remove_domain`).
 *       removed         [string]: The overlays removed.
 *
 *   CleanupVmBackupAnswer: The answer of `agent.cleanup_vm_backup`.
 *       actions             [string]: What was done, one line each.
 *       mode                string: The request's mode: "discard" or
 *                           "complete".
 *       published           boolean: Whether every store file of the backup
 *                           was present: with mode "complete" the backup was
 *                           then finished; otherwise (and always with
 *                           "discard") it was undone.
 *       removed_from_store  [string]: The backup's files removed from the
 *                           store (partial copies too).
 *       vm_consistent       boolean: Always true on success.
 *       vm_running          boolean: Whether the VM runs after the cleanup:
 *                           its domain's state, false for a VM without a
 *                           domain.
 *       volumes             [VolumeState]: The file each volume runs on now.
 *
 *   CompressAnswer: The answer of `agent.compress`.
 *       compressed  [CompressedFile]: One per file, in the request's order.
 *
 *   CompressedFile: One compressed copy, not yet finalized.
 *       comp_path        string: Its compressed copy (`<path>.comp`).
 *       compressed_size  integer: Bytes after.
 *       hash?            string or null: xxh3-128 of the compressed file,
 *                        when its source was checked against an expected hash
 *                        (`expected_hashes`).
 *       library          "zstd" | "zlib": The library used.
 *       original_size    integer: Bytes before.
 *       path             string: The backup file.
 *
 *   CompressionInfo: Compression of a backup.
 *       library        "zstd" | "zlib": The library used.
 *       original_size  integer: Bytes of all the volume files before.
 *       size           integer: Bytes after.
 *
 *   ConsolidateAnswer: The answer of `agent.consolidate`.
 *       consolidated  [Consolidated]: Each volume (or, without `volumes` in
 *                     the request, each disk).
 *
 *   Consolidated: One volume consolidated.
 *       path    string: The file it runs on.
 *       pulled  boolean: Whether it had backing files to pull in.
 *       target  string: Its disk target.
 *       uuid?   string or null: The request's uuid.
 *
 *   DeleteOutcome: What a delete did.
 *       expunged        [string]: Backups whose files were removed.
 *       kept_because?   string or null: Why the backup asked for was kept,
 *                       marked removed, instead of expunged, and what lets
 *                       its files go: the later backups that read it (by id),
 *                       or the backups of the VM whose manifests cannot be
 *                       read (they may). `None` when it was expunged.
 *       marked_removed  [string]: Backups kept on disk, marked removed (see
 *                       `kept_because`).
 *
 *   DiskSpec: A disk of a VM to back up.
 *       name  string: The volume's name in the backup.
 *       path  string: The disk's qcow2 file.
 *
 *   EntriesAnswer: The answer of `files.ls`.
 *       entries  [EntryInfo]: The entries, sorted by name.
 *
 *   EntryInfo: One directory entry as `ls` gives it.
 *       mode        integer: Permission bits.
 *       mtime       integer: Modification time, seconds since the epoch.
 *       mtime_nsec  integer: Its nanoseconds.
 *       name        string: Its name (lossy when not UTF-8).
 *       size        integer: Length in bytes.
 *       target?     string or null: A symlink's target (only for symlinks).
 *       type        string: "file", "dir", "symlink" or "other".
 *
 *   FilesystemsAnswer: The answer of `files.fs`.
 *       filesystems  [FsInfo]: The filesystems found.
 *
 *   FinalizeAnswer: The answer of `agent.finalize_compression`: `finalized`
 *                   or, with `cleanup`, `discarded`.
 *       discarded?  [string] or null: The files whose `.comp` copies were
 *                   removed.
 *       finalized?  [SizedFile] or null: Each file, now compressed, and its
 *                   size.
 *       total_size  integer: Bytes of the finalized files together (the
 *                   agent's answer details); 0 with `cleanup`.
 *
 *   FsInfo: One filesystem of a volume.
 *       device     string: The name libguestfs gives it: `/dev/sdaN`, or
 *                  `/dev/sda` for the whole disk (what CloudStack's agent
 *                  calls the filesystem).
 *       index      integer: What `fs` names it by (1, 2, ...).
 *       label?     string or null: Its label.
 *       partition? integer or null: The partition's number, `None` for the
 *                  whole disk.
 *       size       integer: Length in bytes.
 *       start      integer: First byte on the disk.
 *       type       string: blkid's name of its type ("ext4", "vfat", "ntfs",
 *                  "xfs", ..., "unknown").
 *
 *   GetSummary: What `get` wrote.
 *       bytes     integer: Bytes of file data.
 *       dirs      integer: Directories made (the extracted directory itself
 *                 included).
 *       files     integer: Regular files written.
 *       symlinks  integer: Symlinks made.
 *
 *   GroupDeleteAnswer: The answer of `group.delete`.
 *       members  [DeleteOutcome]: Each member backup's deletion.
 *
 *   GroupRecord: A group backup: its record in the store (and its journal
 *                while it runs).
 *       created            string: When it started (UTC).
 *       freeze_to_thaw_ms? number or null: Milliseconds from the first freeze
 *                          to the last thaw (with quiesce).
 *       id                 string: The group backup's id.
 *       instant?           string or null: The group's instant: when the last
 *                          snapshot was done (UTC).
 *       members            [GroupMember]: The members.
 *       on_failure         "keep" | "rollback": What a failure after the
 *                          snapshots does.
 *       quiesce            boolean: Whether quiescing was asked for.
 *       recovered?         boolean, default false: Whether the record was
 *                          finished by `recover` after a crash.
 *       schema             integer: Schema version (1).
 *       snapshot_skew_ms?  number or null: Milliseconds between the first and
 *                          the last member's snapshot.
 *       state              string: `"complete"` (every member backed up),
 *                          `"partial"` (some failed, `on_failure: "keep"`) or
 *                          `"running"` (a journal).
 *
 *   GroupMember: One member in a group's record.
 *       backup?      string or null: Its backup's id (planned in a journal;
 *                    in a record, published).
 *       domain       boolean: Whether it is a libvirt domain (else a
 *                    plain-disk VM).
 *       error?       string or null: Why it has no backup.
 *       quiesced?    boolean, default false: Whether its guest was frozen for
 *                    the snapshot.
 *       running?     boolean, default false: Whether the VM was running at
 *                    its snapshot.
 *       snapshot_at? string or null: When its snapshot was done (UTC).
 *       vm           string: The VM's name in the store.
 *
 *   GroupRestoreAnswer: The answer of `group.restore`.
 *       skipped  [SkippedMember]: The members left out of a partial restore
 *                (they have no backup).
 *       volumes  [RestoredMember]: Every volume written.
 *
 *   HashAnswer: The answer of `hash`.
 *       backup   string: The backup's id.
 *       volumes  {string: ChainHash}: Each volume's chain (by volume name):
 *                its xxh3-128, root first, and each file's, as
 *                `agent.take_hash` answers them.
 *
 *   ChainHash: The hash of one volume's chain of a backup (in the answer of
 *              `hash`): the same values as the `hash` and `files` of
 *              `agent.take_hash` given the files of that chain.
 *       files  [FileHash]: Each file's own hash, root first.
 *       hash   string: xxh3-128 of the whole chain, 32 hex digits.
 *
 *   FileHash: One file's hash.
 *       hash  string: Its xxh3-128.
 *       path  string: The file.
 *
 *   JobView: A job, as its file holds it, and whether its runner still runs:
 *            the answer of the `jobs.*` operations and of `knib jobs list
 *            --json`.
 *       attempts         integer: Failed attempts so far (interrupted ones
 *                        are not counted).
 *       backup           string: The backup it works on (a sync job: the VM's
 *                        newest backup when it was queued; it sends that one
 *                        and every other the vault lacks).
 *       created_at       integer: When it was queued (unix seconds).
 *       finished_at?     integer or null: When it ended (done, failed or
 *                        cancelled), unix seconds.
 *       id               string: The job's id (its file's name without
 *                        `.json`).
 *       kind             "compress" | "validate" | "sync": What it does.
 *       last_error?      string or null: Why the last attempt failed (or why
 *                        it was cancelled or taken back).
 *       next_attempt_at  integer: When it may run (again), unix seconds.
 *       owner?           JobOwner or null: The runner holding it, while it is
 *                        running.
 *       owner_status?    "alive" | "dead" | "other_host" or null: For a
 *                        running job: `alive` (its runner on this host runs),
 *                        `dead` (it is gone: the next `knib jobs run` takes
 *                        the job back) or `other_host` (nothing can be told
 *                        from here); null otherwise.
 *       result?          any: What the last attempt found (a validation's
 *                        report).
 *       schema           integer: Schema version (1).
 *       state            "queued" | "running" | "done" | "failed" |
 *                        "cancelled": Where it is in its life.
 *       updated_at       integer: When its file last changed (unix seconds).
 *       vm               string: The VM of the backup.
 *
 *   JobOwner: The runner process holding a running job.
 *       boot_id?    string or null: The Linux boot id of its host when it
 *                   claimed the job.
 *       hostname    string: Its host.
 *       pid         integer: Its process id.
 *       pid_start?  integer or null: The start time of its process (clock
 *                   ticks after boot), so a reused pid is not taken for it.
 *       started_at  integer: When it claimed the job (unix seconds).
 *
 *   MemberSpec: One VM of a group backup.
 *       disks?  [DiskSpec], default []: The plain-disk VM's disks.
 *       domain? string or null: A libvirt domain (running or stopped), by
 *               name.
 *       vm?     string or null: A plain-disk VM's name (with `disks`).
 *
 *   MergeSnapshotAnswer: The answer of `agent.merge_snapshot`.
 *       volumes  [MergedVolume]: The file each merged volume runs on now.
 *
 *   MergeTree: A DeltaMergeTreeTO: `child` is committed into `parent`;
 *              `grand_children` used `child` as their backing file.
 *       child           string: The delta committed (it must be `path`).
 *       grand_children? [string], default []: Files whose backing file is
 *                       `child`. With a domain, the one in the disk's chain
 *                       is moved onto `parent` by the merge itself, and each
 *                       outside it (another branch of a VM snapshot tree)
 *                       must have `child` as its backing file and is
 *                       re-pointed at `parent` after the merge, before
 *                       `child` is removed. Without a domain, each (other
 *                       than the new delta, always moved) is re-pointed at
 *                       `parent` after the merge.
 *       parent          string: The base the delta is committed into.
 *
 *   MergedVolume: One merge done.
 *       path    string: The file it runs on now.
 *       target? string or null: Its disk target; null for a VM without a
 *               domain.
 *       uuid?   string or null: The request's uuid.
 *
 *   PrepareValidationAnswer: The answer of `agent.prepare_validation`.
 *       volumes  [PreparedVolume]: One overlay per volume.
 *
 *   PrepareVolume: One volume of `agent.prepare_validation`.
 *       backup_path   string: The backup file the overlay is made over (only
 *                     read).
 *       overlay_path? string or null: Where the overlay goes: the validation
 *                     VM's volume file, as CloudStack's management server
 *                     created it. An existing file is replaced only when it
 *                     holds no data (empty, or a qcow2 image with no backing
 *                     file and no allocated cluster) and no QEMU holds it.
 *                     Without it the overlay goes to `work_dir`.
 *       uuid          string: The volume's uuid (names the overlay in
 *                     `work_dir`).
 *
 *   PreparedVolume: The overlay of one volume.
 *       backup_path   string: The backup file under it.
 *       overlay_path  string: The overlay made.
 *       uuid          string: The request's uuid.
 *
 *   QuickRestoreAnswer: The answer of `quick_restore`.
 *       kept      [[any]]: `[target, file]` of each writable disk of the
 *                 domain that the backup does not have (added after it was
 *                 taken): it was left on its file, as it is now.
 *       overlays  [[any]]: `[target, overlay]` of each disk.
 *
 *   RecoverAnswer: The answer of `recover`.
 *       backup_id? string or null: The interrupted backup, if a journal was
 *                  found.
 *       discarded? [DiscardedJournal] or null: With `discard`: the journals
 *                  set aside, one per interrupted backup (none: nothing was
 *                  interrupted); the other fields then say nothing was
 *                  recovered.
 *       published  boolean: Whether it had reached the store (then finished,
 *                  else undone).
 *       report     RecoverReport: What was done.
 *       step?      string or null: The step it had reached ("snapshot",
 *                  "copy", "publish", "merge", "pivot").
 *
 *   DiscardedJournal: One interrupted backup's journal, set aside (`recover`
 *                     with `discard`).
 *       backup_id?  string or null: The interrupted backup's id, when the
 *                   journal could be read.
 *       kept_as?    string or null: Where the journal is kept now (null: it
 *                   was not a regular file, and its entry was removed).
 *       left        [string]: What may be left outside the store, for the
 *                   operator to look at; for a compression, the backup's
 *                   files it may have replaced, and those it did not although
 *                   their `.comp` files are gone.
 *       method      string: "snapshot" or "bitmap": the method of the
 *                   interrupted backup; "compression": a compression of a
 *                   published backup, interrupted while it replaced the
 *                   backup's files, that cannot be finished (its
 *                   `manifest.next.json` is kept in `kept_as`).
 *       published?  boolean or null: Whether it had been published in this
 *                   store (it then stays); null when that cannot be told (the
 *                   journal unreadable, or the backup written to a vault).
 *       step?       string or null: The step it had reached, when the journal
 *                   could be read.
 *       unreadable? string or null: Why the journal could not be read, when
 *                   it could not; for a compression, why it cannot be
 *                   finished.
 *
 *   RecoverReport: What `recover` did.
 *       actions  [string]: One line per action.
 *       chains   [[any]]: `[target, [file, ...]]`: the files each disk runs
 *                on, active first.
 *
 *   RestoreAnswer: The answer of `agent.restore`.
 *       removed  [string]: The old deltas removed (one that could not be
 *                removed, once every volume was restored, is logged as a
 *                warning and left out).
 *       volumes  [RestoredVolume]: Each volume restored.
 *
 *   RestoreVolume: One volume of `agent.restore`.
 *       backup_path      string: The backup file (its chain follows its
 *                        backing pointers).
 *       expected_hashes? [ExpectedHash], default []: Files of the backup's
 *                        chain with their xxh3-128: a mismatch fails the
 *                        restore before any volume is replaced.
 *       uuid?            string or null: The volume's uuid, echoed in the
 *                        answer.
 *       volume_path      string: The volume file replaced.
 *
 *   ExpectedHash: The hash a file must have.
 *       hash  string: Its xxh3-128, 32 hex digits (as `agent.take_hash` gives
 *             it per file).
 *       path  string: The file.
 *
 *   RestoredMember: One volume a group restore wrote.
 *       backup  string: Its backup.
 *       path    string: The file written.
 *       vm      string: The member VM.
 *       volume  string: The volume.
 *
 *   RestoredVolume: One volume restored.
 *       backing? string or null: Its backing file (the backup) after a quick
 *                restore.
 *       path     string: The volume's file.
 *       uuid?    string or null: The request's uuid.
 *
 *   SizedFile: A file and its size.
 *       path  string: The file.
 *       size  integer: Its size in bytes.
 *
 *   SkippedMember: A member of a partial group that a group restore left out:
 *                  it has no backup.
 *       error? string or null: Why it has no backup (the group record's
 *              error).
 *       vm     string: The member VM.
 *
 *   SnapshotMerge: One merge of `agent.merge_snapshot`.
 *       child           string: The snapshot delta committed.
 *       grand_children? [string], default []: The files whose backing file
 *                       was `child`: they are moved onto `parent`.
 *       parent          string: The layer the delta is committed into.
 *       uuid?           string or null: The volume's uuid, echoed in the
 *                       answer.
 *
 *   SyncReport: What a sync did.
 *       aborted_uploads  integer: Interrupted uploads found and aborted.
 *       bytes_checked?   integer, default 0: Bytes of the vault's objects
 *                        read and checked against their hashes (with
 *                        [`SyncOptions::check`]; 0 without).
 *       bytes_sent       integer: Bytes of volume files sent.
 *       damaged?         [string], default []: Objects lost from backups the
 *                        vault has that this store cannot send again (it has
 *                        no such backup, or its file is not the one the
 *                        vault's manifest describes), one line each: those
 *                        backups cannot be restored from the vault (`knib
 *                        verify` says the same).
 *       present          [string]: Backups the vault already had.
 *       repaired?        [string], default []: Backups the vault had whose
 *                        objects were lost (gone, or of another length than
 *                        their manifest's) and were sent again from the
 *                        store.
 *       sent             [string]: Backups sent, in the order sent (parents
 *                        first).
 *       unmended?        [string], default []: The backups among `damaged`
 *                        that this store has, whose file could not mend the
 *                        vault's (it is not the one sent): a sync job fails
 *                        on them (`knib sync` exits `corrupt`). Damage to
 *                        backups only the vault keeps is reported in
 *                        `damaged` alone (no sync of this store can mend it,
 *                        and a job failing on it would fail for good).
 *
 *   TakeBackupAnswer: The answer of `agent.take_backup`.
 *       full_reason?   string or null: Method `bitmap` only, when an
 *                      incremental backup could not follow its parent's
 *                      checkpoint (why: the checkpoint or a bitmap is
 *                      missing, inconsistent or not recording, or a disk is
 *                      raw): every cluster was copied over the parent, so the
 *                      file is as large as a full backup but still an exact
 *                      incremental of its parent.
 *       kind           string: "full", "incremental" or "isolated".
 *       total_size     integer: Bytes of the backup: the sum of the volumes'
 *                      `size`.
 *       vm_consistent  boolean: Always true on success (a failure says it in
 *                      its error).
 *       volumes        [TakenVolume]: One per volume of the request, in its
 *                      order.
 *
 *   TakeHashAnswer: The answer of `agent.take_hash`.
 *       backup_uuid? string or null: The request's `backup_uuid`.
 *       files        [FileHash]: Each file's own hash.
 *       hash         string: xxh3-128 of the whole chain, 32 hex digits.
 *
 *   TakenVolume: One volume backed up.
 *       delta_path_on_store  string: Its backup file.
 *       new_volume_path      string: The file the volume runs on now.
 *       size                 integer: Bytes of the backup file (its apparent
 *                            length, as Java's `Files.size`).
 *       target?              string or null: The disk target it runs as; null
 *                            for a VM without a domain.
 *       uuid                 string: The request's uuid.
 *       virtual_size         integer: Guest-visible size.
 *
 *   ValidateAnswer: The answer of `agent.validate`. The agent's
 *                   `ValidateKbossVmAnswer` is `boot_validated`,
 *                   `screenshot_store_path` and `script_result`, as they are;
 *                   the rest is knib's.
 *       boot_seconds           number: Seconds to its first answer (or to
 *                              giving up).
 *       boot_validated         boolean: Whether the guest agent answered
 *                              (false when it was not waited for).
 *       passed                 boolean: Whether every check passed (the boot
 *                              when waited for, the screenshot, the script).
 *       problems               [string]: What failed, one line each.
 *       screenshot_path?       string or null: The screenshot taken
 *                              (absolute).
 *       screenshot_store_path? string or null: The screenshot relative to the
 *                              request's `store_root`, as the agent answers
 *                              `screenshotPath`.
 *       script_exit_code?      integer or null: The script's exit code.
 *       script_output?         string or null: The script's standard output,
 *                              decoded.
 *       script_result?         string or null: The agent's `scriptResult`:
 *                              null when the script gave the expected result
 *                              (or was not asked for); else its standard
 *                              output in base64 (as the guest agent sent it;
 *                              `"exit code N, no output"` when it printed
 *                              nothing), `"Timeout"`, or the error that kept
 *                              it from running.
 *
 *   ValidateDisk: One disk of `agent.validate`.
 *       path    string: Its file (a prepared overlay or a backup file; only
 *               read).
 *       target  string: The disk's target name in the guest (`vda`, ...).
 *
 *   VerifyReport: The result of verifying one backup.
 *       chain_hashes   {string: string}: The xxh3-128 of the backup's chain
 *                      (files root first), per volume.
 *       files_checked  integer: Files checked.
 *       id             string: The backup.
 *       ok             boolean: Whether every check passed.
 *       problems       [string]: What failed, one line each.
 *
 *   VersionAnswer: The answer of `version`.
 *       schema   integer: The request schema it reads.
 *       version  string: knib's version.
 *
 *   VmSettings: The settings of one VM.
 *       backup_method? "snapshot" | "bitmap", default "snapshot": How backups
 *                      of the VM find its changes.
 *
 *   VolumeRef: One volume of `agent.consolidate`.
 *       path  string: The volume's file.
 *       uuid? string or null: The volume's uuid, echoed in the answer.
 *
 *   VolumeState: A volume and the file it runs on.
 *       path?   string or null: The file it runs on now.
 *       target? string or null: Its disk target; null for a VM without a
 *               domain.
 *       uuid?   string or null: The request's uuid.
 *
 *   VolumeView: A volume of a backup as every binding shows it.
 *       backing?      string or null: The backing pointer in the file.
 *       file          string: The backup file (absolute).
 *       hash?         string or null: The recorded hash.
 *       name          string: The volume's name.
 *       size          integer: Bytes on the store.
 *       source        string: The disk it came from.
 *       virtual_size  integer: Guest-visible size.
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
 * started meanwhile fails with `KNIB_RESULT_BUSY`, leaving the last error
 * to the operation running); it may be used from any
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
 * a NULL `callback` stops logging. May be called again to change either:
 * it waits for calls of the previous callback running on other threads,
 * so once it returns the previous callback is never called again and its
 * userdata may be freed. Fails with `KNIB_RESULT_INVALID_INPUT` for a
 * `max_level` above 5, and with `KNIB_RESULT_BUSY` when another Rust
 * logger already serves this process (a program that links knib with
 * other Rust code using the `log` crate) or when called from inside the
 * log callback (records knib logs from inside the callback are dropped).
 */
knib_result knib_set_log_callback(knib_log_callback callback, void *userdata, uint32_t max_level);

/**
 * Run operation `op` (see the table in the preamble) on the JSON request
 * `request_json`. On success `*answer_out` gets the JSON answer, a string
 * the caller owns and frees with `knib_string_free`. On failure nothing is
 * written; the code says what kind of failure it was and
 * `knib_context_error_message` what was wrong (but for
 * `KNIB_RESULT_BUSY`, which leaves the last error as it was: it belongs to
 * the operation running on the context).
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

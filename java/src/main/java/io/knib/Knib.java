package io.knib;

import com.google.gson.JsonParseException;
import com.google.gson.reflect.TypeToken;
import java.lang.ref.Cleaner;
import java.lang.ref.Reference;
import java.time.Duration;
import java.util.List;
import java.util.Objects;
import java.util.concurrent.atomic.AtomicLong;
import java.util.logging.Level;

/**
 * knib from Java: one method per CloudStack KVM agent backup command, each taking a request object and
 * returning an answer object (see {@code java/README.md} for which agent wrapper each replaces and how the
 * transfer objects' fields map).
 *
 * <p>A {@code Knib} is one native context: it runs one operation at a time (a second one started meanwhile
 * on the same instance fails with {@link BusyException}); use one instance per thread, or per command. Its
 * settings (time budget, progress listener) apply to each of its next operations. {@link #cancel()} may be
 * called from any other thread while an operation runs: the operation ends with {@link CancelledException}
 * having removed what it wrote (the short operations on a store's records, {@code list}, {@code show},
 * {@code delete}, {@code vm.settings}, {@code group.list}, {@code group.show}, {@code group.delete},
 * {@code jobs.list}, {@code jobs.show}, {@code jobs.queue}, {@code agent.finalize_compression} and {@code agent.cleanup_validation}, run to their end once started:
 * neither a cancellation asked for meanwhile nor the time budget applies to them). {@link #close()} releases the native context exactly once; closing again
 * does nothing, and using a closed instance throws {@link IllegalStateException}. An instance that is never
 * closed is released when it is garbage collected.
 *
 * <p>Requests are immutable records (built with their {@code builder()} or constructors); answers are
 * immutable too, read through accessor methods. Every failure is a {@link KnibException} (checked) of the
 * subclass of its kind; a failed backup's says whether the VM was left consistent. A panic inside knib (a
 * bug, not a failure) is a {@link KnibPanicError} (unchecked); the JVM and the context go on. knib's native
 * log records go to {@code java.util.logging} (logger {@code io.knib.native}), but never to the console handler
 * the JDK puts on the root logger by itself: knib writes nothing to stdout or stderr unless the host configured
 * logging so (see {@code java/README.md}, "Logs").
 */
public final class Knib implements AutoCloseable {
    private static final Cleaner CLEANER = Cleaner.create();

    /** The native handle, released once by whoever clears it first. */
    private static final class Handle implements Runnable {
        final AtomicLong value;

        Handle(long value) {
            this.value = new AtomicLong(value);
        }

        @Override
        public void run() {
            long h = value.getAndSet(0);
            if (h != 0) {
                NativeLib.contextClose(h);
            }
        }
    }

    private final Handle handle;
    private final Cleaner.Cleanable cleanable;
    /**
     * The progress listener, held here: the native context holds it weakly, so that a listener referring to
     * this instance does not keep an unclosed one from being collected (and its context released).
     */
    private volatile ProgressListener listener;

    /** A new context, with no time budget and no progress listener; loads the native library on first use. */
    public Knib() {
        NativeLib.load();
        this.handle = new Handle(NativeLib.contextNew());
        this.cleanable = CLEANER.register(this, handle);
    }

    /** @return the version of the native library ("0.1.0") */
    public static String version() {
        NativeLib.load();
        return NativeLib.version();
    }

    /**
     * Forward knib's native log records up to {@code level} (and set the level of logger {@code
     * io.knib.native}); {@code Level.OFF} stops them. By default the logger's effective level at load time
     * is used.
     *
     * @param level the most detailed level to forward
     * @throws NullPointerException when {@code level} is null (nothing is changed)
     */
    public static void setLogLevel(Level level) {
        java.util.Objects.requireNonNull(level, "level");
        NativeLib.load();
        int nativeLevel = KnibLog.nativeLevel(level);
        KnibLog.LOGGER.setLevel(level);
        NativeLib.setLogLevel(nativeLevel);
    }

    private long live() {
        long h = handle.value.get();
        if (h == 0) {
            throw new IllegalStateException("this Knib context was closed");
        }
        return h;
    }

    /** Release the native context; a second call does nothing. */
    @Override
    public void close() {
        cleanable.clean();
    }

    /** @return whether {@link #close()} was called */
    public boolean isClosed() {
        return handle.value.get() == 0;
    }

    /**
     * @param budget the time budget of each next operation (CloudStack's {@code kboss.timeout} or the
     *     command's wait), rounded up to whole seconds (500 ms is one second); zero, negative or null for
     *     none, and so is one too long for the clock (such as {@code Duration.ofSeconds(Long.MAX_VALUE)})
     * @return this context
     */
    public Knib setTimeout(Duration budget) {
        NativeLib.setTimeout(live(), timeoutSeconds(budget));
        return this;
    }

    /**
     * The native budget of {@code budget}: whole seconds, rounded up, so that a positive budget is never 0
     * (which means none); 0 for null, zero or negative.
     */
    static long timeoutSeconds(Duration budget) {
        if (budget == null || budget.isNegative() || budget.isZero()) {
            return 0;
        }
        long seconds = budget.getSeconds();
        return budget.getNano() > 0 && seconds < Long.MAX_VALUE ? seconds + 1 : seconds;
    }

    /**
     * @param listener receives the progress of each next operation; null for none
     * @return this context
     */
    public synchronized Knib setProgressListener(ProgressListener listener) {
        // Under this instance's lock: the strong reference kept here is always the listener the native side
        // holds weakly (two threads setting listeners at once cannot leave it holding one collected).
        NativeLib.setProgressListener(live(), listener);
        this.listener = listener;
        return this;
    }

    /**
     * Ask the operation running on this context (from another thread) to stop; when none runs, the next one
     * is cancelled at once, whatever it is. Does nothing on a closed context, nor on one another thread is
     * closing meanwhile.
     */
    public void cancel() {
        long h = handle.value.get();
        if (h != 0) {
            NativeLib.cancel(h);
        }
    }

    /**
     * Run any operation of knib's JSON API by name.
     *
     * @param op the operation ("agent.take_backup", "version", ...)
     * @param requestJson its request, a JSON object
     * @return its answer, JSON
     * @throws KnibException when it fails
     */
    public String call(String op, String requestJson) throws KnibException {
        Objects.requireNonNull(op, "op");
        Objects.requireNonNull(requestJson, "requestJson");
        try {
            return NativeLib.call(live(), op, requestJson);
        } finally {
            // This instance, and so its listener, stays reachable while the call runs.
            Reference.reachabilityFence(this);
        }
    }

    private <A> A run(String op, Object request, Class<A> answer) throws KnibException {
        Objects.requireNonNull(request, "request");
        // JSON has no NaN or Infinity: Gson would throw an unchecked exception naming no field.
        if (request instanceof CompressBackup.Request r && !Double.isFinite(r.minFreeFactor())) {
            throw new InvalidInputException("invalid input: " + op + ": `min_free_factor` (minFreeFactor) must be "
                    + "a finite number, not " + r.minFreeFactor(), -1);
        }
        String json = call(op, Json.GSON.toJson(request));
        try {
            A a = Json.GSON.fromJson(json, answer);
            if (a == null) {
                throw new InternalException("the answer of " + op + " is empty", -1);
            }
            return a;
        } catch (JsonParseException e) {
            throw new InternalException("the answer of " + op + " does not parse (" + e.getMessage() + "): " + json, -1);
        }
    }

    /** An operation whose answer is a JSON array of {@code element}s; a read-only list. */
    private <E> List<E> runList(String op, Object request, Class<E> element) throws KnibException {
        Objects.requireNonNull(request, "request");
        String json = call(op, Json.GSON.toJson(request));
        try {
            @SuppressWarnings("unchecked")
            List<E> a = (List<E>) Json.GSON.fromJson(json, TypeToken.getParameterized(List.class, element).getType());
            if (a == null) {
                throw new InternalException("the answer of " + op + " is empty", -1);
            }
            return Json.view(a);
        } catch (JsonParseException e) {
            throw new InternalException("the answer of " + op + " does not parse (" + e.getMessage() + "): " + json, -1);
        }
    }

    /**
     * Replaces {@code LibvirtTakeKbossBackupCommandWrapper}: snapshot, copy to the store, merge.
     *
     * @param request the backup
     * @return each volume's new path and its backup file and size
     * @throws KnibException on failure; {@link KnibException#isVmConsistent()} says whether the VM is
     *     consistent ({@link VmInconsistentException} when not)
     */
    public TakeBackup.Answer takeBackup(TakeBackup.Request request) throws KnibException {
        return run("agent.take_backup", request, TakeBackup.Answer.class);
    }

    /**
     * Replaces {@code LibvirtCompressBackupCommandWrapper}. A rate limit below 1 means none, as CloudStack's
     * setting (the request keeps it as 0).
     *
     * @param request the files and how to compress them
     * @return each compressed copy
     * @throws KnibException on failure (the {@code .comp} files written are removed); {@link
     *     InvalidInputException} for a {@code minFreeFactor} that is NaN or infinite
     */
    public CompressBackup.Answer compressBackup(CompressBackup.Request request) throws KnibException {
        return run("agent.compress", request, CompressBackup.Answer.class);
    }

    /**
     * Replaces {@code LibvirtFinalizeBackupCompressionCommandWrapper}.
     *
     * @param request the files, and whether the backup went away meanwhile
     * @return the files finalized, or discarded
     * @throws KnibException on failure
     */
    public FinalizeCompression.Answer finalizeBackupCompression(FinalizeCompression.Request request) throws KnibException {
        return run("agent.finalize_compression", request, FinalizeCompression.Answer.class);
    }

    /**
     * Replaces {@code LibvirtRestoreKbossBackupCommandWrapper} (the store already mounted).
     *
     * @param request the volumes to restore
     * @return the volumes restored
     * @throws KnibException on failure (no volume was changed)
     */
    public RestoreBackup.Answer restoreBackup(RestoreBackup.Request request) throws KnibException {
        return run("agent.restore", request, RestoreBackup.Answer.class);
    }

    /**
     * Replaces {@code LibvirtConsolidateVolumesCommandWrapper}.
     *
     * @param request the domain and its quick-restored volumes
     * @return the volumes consolidated
     * @throws KnibException on failure
     */
    public ConsolidateVolumes.Answer consolidateVolumes(ConsolidateVolumes.Request request) throws KnibException {
        return run("agent.consolidate", request, ConsolidateVolumes.Answer.class);
    }

    /**
     * Replaces {@code LibvirtPrepareValidationCommandWrapper}.
     *
     * @param request the backup's files and where the overlays go
     * @return the overlays made
     * @throws KnibException on failure (none is left)
     */
    public PrepareValidation.Answer prepareValidation(PrepareValidation.Request request) throws KnibException {
        return run("agent.prepare_validation", request, PrepareValidation.Answer.class);
    }

    /**
     * Replaces {@code LibvirtValidateKbossVmCommandWrapper}.
     *
     * @param request the disks and the checks
     * @return what the checks found (a guest that fails a check is an answer, not an exception)
     * @throws KnibException when the validation could not be run
     */
    public ValidateVm.Answer validateVm(ValidateVm.Request request) throws KnibException {
        return run("agent.validate", request, ValidateVm.Answer.class);
    }

    /**
     * Replaces {@code LibvirtTakeBackupHashCommandWrapper}.
     *
     * @param request the backup's chain, root first
     * @return its hash
     * @throws KnibException on failure
     */
    public TakeBackupHash.Answer takeBackupHash(TakeBackupHash.Request request) throws KnibException {
        return run("agent.take_hash", request, TakeBackupHash.Answer.class);
    }

    /**
     * Replaces {@code LibvirtCleanupKbossValidationCommandWrapper}.
     *
     * @param request the validation VM's name and work directory
     * @return what was removed
     * @throws KnibException on failure
     */
    public CleanupValidation.Answer cleanupValidation(CleanupValidation.Request request) throws KnibException {
        return run("agent.cleanup_validation", request, CleanupValidation.Answer.class);
    }

    /**
     * Replaces {@code LibvirtCleanupKbossVmBackupCommandWrapper}: discards a failed backup as the agent does (its
     * store files removed, each volume back on {@code base <- delta}), or with mode {@code "complete"} finishes
     * it when every store file is present.
     *
     * @param request what the failed backup was given, and the mode
     * @return the file each volume runs on now, what was done, and whether the VM runs
     * @throws KnibException on failure ({@link VmInconsistentException} when the VM is still inconsistent)
     */
    public CleanupVmBackup.Answer cleanupVmBackup(CleanupVmBackup.Request request) throws KnibException {
        return run("agent.cleanup_vm_backup", request, CleanupVmBackup.Answer.class);
    }

    /**
     * Replaces {@code LibvirtMergeDiskOnlyVMSnapshotCommandWrapper}.
     *
     * @param request the merges
     * @return the file each volume runs on now
     * @throws KnibException on failure
     */
    public MergeSnapshot.Answer mergeSnapshot(MergeSnapshot.Request request) throws KnibException {
        return run("agent.merge_snapshot", request, MergeSnapshot.Answer.class);
    }

    /**
     * The file systems of a volume of a catalog backup, or of a backup file ({@code files.fs}).
     *
     * @param request the store, the backup's id and the volume's name, or the backup file
     * @return its file systems
     * @throws KnibException on failure
     */
    public FileRestore.Filesystems listFilesystems(FileRestore.Volume request) throws KnibException {
        return run("files.fs", request, FileRestore.Filesystems.class);
    }

    /**
     * The entries of a directory in a backup ({@code files.ls}).
     *
     * @param request the volume, and which file system and directory (by default the only readable one, and
     *     its root)
     * @return its entries
     * @throws KnibException on failure
     */
    public FileRestore.Listing listFiles(FileRestore.ListRequest request) throws KnibException {
        return run("files.ls", request, FileRestore.Listing.class);
    }

    /**
     * Copy a file or directory out of a backup ({@code files.get}).
     *
     * @param request the volume, what to copy and where to, and which file system (by default the only
     *     readable one)
     * @return what was written
     * @throws KnibException on failure
     */
    public FileRestore.Extracted extractFiles(FileRestore.GetRequest request) throws KnibException {
        return run("files.get", request, FileRestore.Extracted.class);
    }

    /**
     * One backup of each of several VMs at a common instant, recorded as a group ({@code group.backup}; see
     * {@link GroupBackup}).
     *
     * @param request the store, the members and how
     * @return the group's record: each member's backup, and the timing ({@code "partial"} when a member failed
     *     after the snapshots with {@code onFailure "keep"})
     * @throws KnibException when the group failed as a whole (no member was published); {@link
     *     KnibException#isVmConsistent()} says whether every VM is consistent
     */
    public GroupBackup.Group groupBackup(GroupBackup.Request request) throws KnibException {
        return run("group.backup", request, GroupBackup.Group.class);
    }

    /**
     * The group backups of a store, oldest first ({@code group.list}).
     *
     * @param request the store
     * @return their records
     * @throws KnibException on failure
     */
    public List<GroupBackup.Group> groupList(GroupBackup.ListRequest request) throws KnibException {
        return runList("group.list", request, GroupBackup.Group.class);
    }

    /**
     * One group backup ({@code group.show}).
     *
     * @param request the store and the group's id
     * @return its record
     * @throws KnibException on failure ({@link NotFoundException} when there is no such group)
     */
    public GroupBackup.Group groupShow(GroupBackup.ShowRequest request) throws KnibException {
        return run("group.show", request, GroupBackup.Group.class);
    }

    /**
     * Restore every volume of every member of a group backup ({@code group.restore}).
     *
     * @param request the group, where to and how
     * @return every volume written
     * @throws KnibException on failure (the files already written are removed)
     */
    public GroupBackup.Restored groupRestore(GroupBackup.RestoreRequest request) throws KnibException {
        return run("group.restore", request, GroupBackup.Restored.class);
    }

    /**
     * Delete every member's backup of a group (chain-safely), then the group ({@code group.delete}).
     *
     * @param request the store and the group's id
     * @return each member backup's deletion
     * @throws KnibException on failure
     */
    public GroupBackup.Deleted groupDelete(GroupBackup.DeleteRequest request) throws KnibException {
        return run("group.delete", request, GroupBackup.Deleted.class);
    }

    /**
     * Finish the group backups a crash interrupted: each member domain recovered, then the group's record
     * written, or with {@code "rollback"} the group undone ({@code group.recover}).
     *
     * @param request the store
     * @return the records written
     * @throws KnibException on failure
     */
    public List<GroupBackup.Group> groupRecover(GroupBackup.RecoverRequest request) throws KnibException {
        return runList("group.recover", request, GroupBackup.Group.class);
    }

    /**
     * Send the backups of a store that an off-site vault on S3 lacks: parents first, each backup's manifest
     * last; an interrupted sync is cleaned up and resumed by the next ({@code sync}). The other catalog
     * operations take the vault ({@code s3://BUCKET/PREFIX}) as their store through {@link #call}.
     *
     * @param request the store, the vault and the limits
     * @return what was sent
     * @throws KnibException on failure
     */
    public VaultSync.Report sync(VaultSync.Request request) throws KnibException {
        return run("sync", request, VaultSync.Report.class);
    }

    /**
     * Read a VM's settings in a store, and set its backup method when the request gives one
     * ({@code vm.settings}): {@code "snapshot"} (KBOSS's external snapshot, copy and merge) or {@code "bitmap"}
     * (libvirt checkpoints; the disks' chains are left alone). The next backup after a change of method is full.
     *
     * @param request the store, the VM and the method to set, if any
     * @return the VM's settings after the request
     * @throws KnibException on failure (an unknown method is {@link InvalidInputException})
     */
    public VmSettings.Settings vmSettings(VmSettings.Request request) throws KnibException {
        return run("vm.settings", request, VmSettings.Settings.class);
    }

    /**
     * Queue a job in the store ({@code jobs.queue}): the compression or validation of a backup, or the sync of a
     * VM to the store's vault. {@code knib jobs run} runs it.
     *
     * @param request the store, the kind of job and its backup or VM
     * @return the job, queued (a sync job already queued for the VM is answered instead, set to send the newest
     *     backup too)
     * @throws KnibException on failure ({@link InvalidInputException} for a backup already compressed or with
     *     such a job queued or running, {@link NotFoundException} for an unknown backup)
     */
    public Jobs.Job jobsQueue(Jobs.QueueRequest request) throws KnibException {
        return run("jobs.queue", request, Jobs.Job.class);
    }

    /**
     * The store's jobs, oldest first ({@code jobs.list}).
     *
     * @param request the store
     * @return every job, ended ones too
     * @throws KnibException on failure
     */
    public List<Jobs.Job> jobsList(Jobs.ListRequest request) throws KnibException {
        return runList("jobs.list", request, Jobs.Job.class);
    }

    /**
     * One job ({@code jobs.show}).
     *
     * @param request the store and the job's id
     * @return the job
     * @throws KnibException on failure ({@link NotFoundException} when there is no such job)
     */
    public Jobs.Job jobsShow(Jobs.ShowRequest request) throws KnibException {
        return run("jobs.show", request, Jobs.Job.class);
    }

    /**
     * Cancel a job ({@code jobs.cancel}): a queued one at once; a running one by asking its runner to stop it (a
     * compression stopped so leaves its backup as it was). {@link #cancel()} or the time budget ends the wait
     * with {@link CancelledException} or {@link KnibTimeoutException}, forcing nothing: the request to stop
     * stands, and the runner still stops the job when it sees it.
     *
     * @param request the store, the job, the wait and whether to force
     * @return the job afterwards: {@code "cancelled"}, or {@code "done"}/{@code "failed"} when its attempt ended
     *     first
     * @throws KnibException on failure ({@link BusyException} when its runner did not stop it in time and force
     *     was not asked; {@link InvalidInputException} for a job that had ended)
     */
    public Jobs.Job jobsCancel(Jobs.CancelRequest request) throws KnibException {
        return run("jobs.cancel", request, Jobs.Job.class);
    }

    /** Tests only: the native handle. */
    long handleForTests() {
        return live();
    }

    /** Tests only (debug builds of the library): panics inside the native library. */
    void testPanic() throws KnibException {
        NativeLib.testPanic(live());
    }

    /**
     * Prints the version and where the native library came from (for checking an installation).
     *
     * @param args ignored
     */
    public static void main(String[] args) {
        System.out.println("knib " + version() + " (native library from " + NativeLib.origin() + ")");
    }
}

package io.knib;

import com.google.gson.JsonElement;

/**
 * {@link Knib#jobsQueue}, {@link Knib#jobsList}, {@link Knib#jobsShow} and {@link Knib#jobsCancel}: the store's
 * durable queue of compression, validation and sync jobs ({@code jobs.*}). The jobs are run by {@code knib jobs
 * run} (a timer or cron on each host sharing the store); these operations queue, read and stop them.
 */
public final class Jobs {
    private Jobs() {}

    /**
     * The request of {@code jobs.queue}. Immutable; made by {@link #compress}, {@link #validate} or {@link #sync}.
     *
     * @param store the store directory
     * @param kind {@code "compress"}, {@code "validate"} or {@code "sync"}
     * @param backup the backup's id (compress, validate; or sync: its VM)
     * @param vm for sync: the VM whose backups are sent to the store's vault
     */
    public record QueueRequest(String store, String kind, String backup, String vm) {
        /**
         * @param store the store directory
         * @param backup the backup's id
         * @return the request to compress the backup in place
         */
        public static QueueRequest compress(String store, String backup) {
            return new QueueRequest(store, "compress", backup, null);
        }

        /**
         * @param store the store directory
         * @param backup the backup's id
         * @return the request to validate the backup (file checks, hashes and, when the store's settings say so, a
         *     boot test)
         */
        public static QueueRequest validate(String store, String backup) {
            return new QueueRequest(store, "validate", backup, null);
        }

        /**
         * @param store the store directory
         * @param vm the VM
         * @return the request to send every backup of the VM that the store's vault ({@code sync.vault}) lacks
         */
        public static QueueRequest sync(String store, String vm) {
            return new QueueRequest(store, "sync", null, vm);
        }
    }

    /**
     * The request of {@code jobs.list}.
     *
     * @param store the store directory
     */
    public record ListRequest(String store) {}

    /**
     * The request of {@code jobs.show}.
     *
     * @param store the store directory
     * @param job the job's id
     */
    public record ShowRequest(String store, String job) {}

    /**
     * The request of {@code jobs.cancel}: a queued job is cancelled at once; a running one is asked to stop (its
     * runner looks every quarter second), waiting up to {@code waitSecs}. Immutable.
     *
     * @param store the store directory
     * @param job the job's id
     * @param force record the job cancelled when its runner does not stop it within the wait (its host is down)
     * @param waitSecs how long to wait for the runner, in seconds; null for 30 (the wait ends earlier, forcing
     *     nothing, when the call is cancelled or its time budget runs out)
     */
    public record CancelRequest(String store, String job, boolean force, Long waitSecs) {
        /**
         * @param store the store directory
         * @param job the job's id
         * @return the request, without force, waiting 30 s
         */
        public static CancelRequest of(String store, String job) {
            return new CancelRequest(store, job, false, null);
        }

        /** @param v record it cancelled when its runner does not stop it in time @return this request with it */
        public CancelRequest withForce(boolean v) {
            return new CancelRequest(store, job, v, waitSecs);
        }

        /** @param v the wait in seconds @return this request with it */
        public CancelRequest withWaitSecs(Long v) {
            return new CancelRequest(store, job, force, v);
        }
    }

    /** The runner holding a running job. */
    public static final class Owner {
        private final long pid;
        private final String hostname;
        private final long startedAt;
        private final String bootId;
        private final Long pidStart;

        private Owner() {
            pid = 0;
            hostname = null;
            startedAt = 0;
            bootId = null;
            pidStart = null;
        }

        /** @return its process id */
        public long pid() { return pid; }

        /** @return its host */
        public String hostname() { return hostname; }

        /** @return when it claimed the job (unix seconds) */
        public long startedAt() { return startedAt; }

        /** @return the Linux boot id of its host when it claimed the job; null if not recorded */
        public String bootId() { return bootId; }

        /** @return the start time of its process (clock ticks after boot), so a reused pid is not taken for it */
        public Long pidStart() { return pidStart; }
    }

    /** A job, as its file in the store holds it. */
    public static final class Job {
        private final int schema;
        private final String id;
        private final String kind;
        private final String vm;
        private final String backup;
        private final String state;
        private final long attempts;
        private final long nextAttemptAt;
        private final String lastError;
        private final Owner owner;
        private final long createdAt;
        private final long updatedAt;
        private final Long finishedAt;
        private final JsonElement result;
        private final String ownerStatus;

        private Job() {
            schema = 0;
            id = null;
            kind = null;
            vm = null;
            backup = null;
            state = null;
            attempts = 0;
            nextAttemptAt = 0;
            lastError = null;
            owner = null;
            createdAt = 0;
            updatedAt = 0;
            finishedAt = null;
            result = null;
            ownerStatus = null;
        }

        /** @return the job file's schema version (1) */
        public int schema() { return schema; }

        /** @return the job's id */
        public String id() { return id; }

        /** @return {@code "compress"}, {@code "validate"} or {@code "sync"} */
        public String kind() { return kind; }

        /** @return the VM of its backup */
        public String vm() { return vm; }

        /** @return the backup it works on (a sync job: the VM's newest when it was queued) */
        public String backup() { return backup; }

        /** @return {@code "queued"}, {@code "running"}, {@code "done"}, {@code "failed"} or {@code "cancelled"} */
        public String state() { return state; }

        /** @return its failed attempts so far */
        public long attempts() { return attempts; }

        /** @return when it may run (again), unix seconds */
        public long nextAttemptAt() { return nextAttemptAt; }

        /** @return why its last attempt failed, or why it was cancelled; null if neither */
        public String lastError() { return lastError; }

        /** @return the runner holding it while it runs; null otherwise */
        public Owner owner() { return owner; }

        /** @return when it was queued, unix seconds */
        public long createdAt() { return createdAt; }

        /** @return when its file last changed, unix seconds */
        public long updatedAt() { return updatedAt; }

        /** @return when it ended, unix seconds; null while queued or running */
        public Long finishedAt() { return finishedAt; }

        /** @return what its last attempt found (a validation's report), a copy; null if nothing */
        public JsonElement result() { return result == null ? null : result.deepCopy(); }

        /**
         * @return for a running job, {@code "alive"}, {@code "dead"} (the next {@code knib jobs run} takes it back)
         *     or {@code "other_host"}; null otherwise
         */
        public String ownerStatus() { return ownerStatus; }
    }
}

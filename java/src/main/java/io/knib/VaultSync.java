package io.knib;

import java.util.List;

/**
 * {@link Knib#sync}: send the backups of a store that an off-site vault on S3 lacks ({@code sync}). The
 * endpoint, region and credentials come from the usual AWS environment variables and files of the process.
 */
public final class VaultSync {
    private VaultSync() {}

    /**
     * The request. Immutable.
     *
     * @param store the store directory the backups are sent from
     * @param to the vault, {@code s3://BUCKET/PREFIX}
     * @param vm only this VM's backups; null for every VM
     * @param rateLimitMbps read (and send) at most this many MB/s; 0 for no limit
     * @param parallelParts parts of 5 MiB in flight at once, 1 to 16; null for 2
     * @param check also read every object the vault holds of these VMs and check its hash: one whose bytes
     *     changed is sent again from the store (a plain sync only lists the objects)
     * @param timeoutSecs the time budget in seconds; null for none
     */
    public record Request(
            String store, String to, String vm, long rateLimitMbps, Integer parallelParts, boolean check, Long timeoutSecs) {
        /**
         * Every VM, no rate limit, the default parallelism, no time budget.
         *
         * @param store the store directory
         * @param to the vault
         */
        public Request(String store, String to) {
            this(store, to, null, 0, null, false, null);
        }

        /** @param v only this VM's backups @return this request with it */
        public Request withVm(String v) {
            return new Request(store, to, v, rateLimitMbps, parallelParts, check, timeoutSecs);
        }

        /** @param v the rate limit in MB/s @return this request with it */
        public Request withRateLimitMbps(long v) {
            return new Request(store, to, vm, v, parallelParts, check, timeoutSecs);
        }

        /** @param v whether to check every object's hash @return this request with it */
        public Request withCheck(boolean v) {
            return new Request(store, to, vm, rateLimitMbps, parallelParts, v, timeoutSecs);
        }
    }

    /** What a sync did. */
    public static final class Report {
        private final List<String> sent;
        private final List<String> present;
        private final long bytesSent;
        private final long abortedUploads;
        private final List<String> repaired;
        private final List<String> damaged;
        private final List<String> unmended;
        private final long bytesChecked;

        private Report() {
            sent = null;
            present = null;
            bytesSent = 0;
            abortedUploads = 0;
            repaired = null;
            damaged = null;
            unmended = null;
            bytesChecked = 0;
        }

        /** @return the backups sent, parents first */
        public List<String> sent() { return Json.view(sent); }

        /** @return the backups the vault already had */
        public List<String> present() { return Json.view(present); }

        /** @return the bytes of volume files sent */
        public long bytesSent() { return bytesSent; }

        /** @return the interrupted uploads found and aborted */
        public long abortedUploads() { return abortedUploads; }

        /** @return the backups whose objects lost from the vault were sent again */
        public List<String> repaired() { return Json.view(repaired); }

        /**
         * @return the objects lost from backups the vault has that this store
         *     cannot send again, one line each
         */
        public List<String> damaged() { return Json.view(damaged); }

        /**
         * @return the backups among {@link #damaged()} that this store has
         *     but could not mend the vault's copy of
         */
        public List<String> unmended() { return Json.view(unmended); }

        /** @return the bytes of the vault's objects read and checked (with {@code check}; else 0) */
        public long bytesChecked() { return bytesChecked; }
    }
}

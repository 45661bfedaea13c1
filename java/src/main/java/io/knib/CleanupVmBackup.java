package io.knib;

import java.util.List;

/**
 * {@link Knib#cleanupVmBackup}: CloudStack's {@code CleanupKbossBackupErrorCommand}. Give it what the failed
 * {@link Knib#takeBackup} was given. By default ({@code "discard"}) it does what the agent's cleanup does: the
 * backup's store files are removed, even when complete, and each volume is put back on {@code base <- delta}
 * (the new delta committed back), so the next incremental backup holds every write. With {@code "complete"} it
 * finishes a backup whose every volume's file is on the store, and discards it otherwise.
 */
public final class CleanupVmBackup {
    private CleanupVmBackup() {}

    /**
     * The command: the failed backup's request, as {@link #of} makes it. Immutable.
     *
     * @param domain the libvirt domain ({@code vmName}); null for a stopped VM libvirt does not know (its
     *     domain was transient): then {@code running} must be false, and the volumes' files alone are worked on
     *     (every file is first tested for QEMU's image lock: one a process holds fails with {@link BusyException})
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param running whether the VM runs ({@code runningVM}); null to take the domain's state as it is; must be
     *     false when {@code domain} is null
     * @param quiesce as the failed backup's
     * @param endOfChain as the failed backup's
     * @param isolated as the failed backup's
     * @param volumes the failed backup's volumes ({@code kbossTOs})
     * @param timeoutSecs the command's time budget in seconds; null for none
     * @param mode {@code "discard"} (null means it too) or {@code "complete"}
     * @param method as the failed backup's: {@code "snapshot"} (null means it too) or {@code "bitmap"}
     */
    public record Request(
            String domain,
            String connect,
            Boolean running,
            boolean quiesce,
            boolean endOfChain,
            boolean isolated,
            List<TakeBackup.Volume> volumes,
            Long timeoutSecs,
            String mode,
            String method) {
        /** Copies {@code volumes} (null: none). */
        public Request {
            volumes = Json.copy(volumes);
        }

        /**
         * @param failed the request of the failed backup
         * @return the clean-up of that backup
         */
        public static Request of(TakeBackup.Request failed) {
            return new Request(failed.domain(), failed.connect(), failed.running(), failed.quiesce(),
                    failed.endOfChain(), failed.isolated(), failed.volumes(), failed.timeoutSecs(), null,
                    failed.method());
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(domain, connect, running, quiesce, endOfChain, isolated, volumes, v, mode, method);
        }

        /** @param v {@code "discard"} or {@code "complete"} @return this request with it */
        public Request withMode(String v) {
            return new Request(domain, connect, running, quiesce, endOfChain, isolated, volumes, timeoutSecs, v,
                    method);
        }
    }

    /** The answer ({@code CleanupKbossBackupErrorAnswer}). */
    public static final class Answer {
        private final String mode;
        private final boolean published;
        private final boolean vmConsistent;
        private final List<VolumeState> volumes;
        private final List<String> actions;
        private final List<String> removedFromStore;
        private final boolean vmRunning;

        private Answer() {
            mode = null;
            published = false;
            vmConsistent = false;
            volumes = null;
            actions = null;
            removedFromStore = null;
            vmRunning = false;
        }

        /** @return the request's mode, {@code "discard"} or {@code "complete"} */
        public String mode() { return mode; }

        /**
         * @return whether every store file of the backup was present (with {@code "complete"} it was then
         *     finished; otherwise it was discarded)
         */
        public boolean published() { return published; }

        /** @return true: the VM runs on {@code base} or {@code base <- one delta} again */
        public boolean vmConsistent() { return vmConsistent; }

        /** @return each volume and the file it runs on now */
        public List<VolumeState> volumes() { return Json.view(volumes); }

        /** @return what was done, one line each */
        public List<String> actions() { return Json.view(actions); }

        /** @return the backup's files removed from the store (partial copies too) */
        public List<String> removedFromStore() { return Json.view(removedFromStore); }

        /**
         * @return {@code CleanupKbossBackupErrorAnswer.vmRunning}: whether the VM runs after the cleanup (the
         *     domain's state; false for a VM without a domain)
         */
        public boolean vmRunning() { return vmRunning; }
    }

    /** A volume after the clean-up. */
    public static final class VolumeState {
        private final String uuid;
        private final String target;
        private final String path;

        private VolumeState() {
            uuid = null;
            target = null;
            path = null;
        }

        /** @return the volume's uuid */
        public String uuid() { return uuid; }

        /** @return its disk target; null for a VM without a domain */
        public String target() { return target; }

        /** @return the file it runs on now */
        public String path() { return path; }
    }
}

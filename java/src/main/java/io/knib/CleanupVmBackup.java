package io.knib;

import java.util.List;

/**
 * {@link Knib#cleanupVmBackup}: CloudStack's {@code CleanupKbossBackupErrorCommand}. Give it what the failed
 * {@link Knib#takeBackup} was given: it finishes the backup when every volume's file is on the store, and
 * undoes it otherwise.
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
     */
    public record Request(
            String domain,
            String connect,
            Boolean running,
            boolean quiesce,
            boolean endOfChain,
            boolean isolated,
            List<TakeBackup.Volume> volumes,
            Long timeoutSecs) {
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
                    failed.endOfChain(), failed.isolated(), failed.volumes(), failed.timeoutSecs());
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(domain, connect, running, quiesce, endOfChain, isolated, volumes, v);
        }
    }

    /** The answer ({@code CleanupKbossBackupErrorAnswer}). */
    public static final class Answer {
        private final boolean published;
        private final boolean vmConsistent;
        private final List<VolumeState> volumes;
        private final List<String> actions;

        private Answer() {
            published = false;
            vmConsistent = false;
            volumes = null;
            actions = null;
        }

        /** @return whether the backup had reached the store (it was then finished, else undone) */
        public boolean published() { return published; }

        /** @return true: the VM runs on {@code base} or {@code base <- one delta} again */
        public boolean vmConsistent() { return vmConsistent; }

        /** @return each volume and the file it runs on now */
        public List<VolumeState> volumes() { return Json.view(volumes); }

        /** @return what was done, one line each */
        public List<String> actions() { return Json.view(actions); }
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

package io.knib;

import java.util.List;

/** {@link Knib#mergeSnapshot}: CloudStack's {@code MergeDiskOnlyVmSnapshotCommand}. */
public final class MergeSnapshot {
    private MergeSnapshot() {}

    /**
     * The command. Immutable.
     *
     * @param domain the libvirt domain ({@code vmName}); null for a stopped VM libvirt does not know (its
     *     domain was transient): then {@code running} must be false, and the volumes' files alone are worked on
     *     (every file is first tested for QEMU's image lock: one a process holds fails with {@link BusyException})
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param running whether the VM runs ({@code isVmRunning}); null to take the domain's state as it is; must be
     *     false when {@code domain} is null
     * @param merges the merges, in order ({@code snapshotMergeTreeToList})
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(String domain, String connect, Boolean running, List<Merge> merges, Long timeoutSecs) {
        /** Copies {@code merges} (null: none). */
        public Request {
            merges = Json.copy(merges);
        }

        /**
         * The local libvirt, the domain's state as it is, no time budget of its own.
         *
         * @param domain the libvirt domain
         * @param merges the merges, in order
         */
        public Request(String domain, List<Merge> merges) {
            this(domain, null, null, merges, null);
        }

        /** @param v the libvirt URI @return this request with it */
        public Request withConnect(String v) {
            return new Request(domain, v, running, merges, timeoutSecs);
        }

        /** @param v whether the VM runs @return this request with it */
        public Request withRunning(Boolean v) {
            return new Request(domain, connect, v, merges, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(domain, connect, running, merges, v);
        }
    }

    /**
     * One {@code DeltaMergeTreeTO}: {@code child} goes into {@code parent}.
     *
     * @param uuid the volume's uuid (echoed)
     * @param parent the file below the child
     * @param child the snapshot delta to merge
     * @param grandChildren files that use the child as backing file (other branches are pointed at the parent)
     */
    public record Merge(String uuid, String parent, String child, List<String> grandChildren) {
        /** Copies {@code grandChildren} (null: none). */
        public Merge {
            grandChildren = Json.copy(grandChildren);
        }

        /**
         * @param uuid the volume's uuid
         * @param parent the file below the child
         * @param child the delta to merge
         */
        public Merge(String uuid, String parent, String child) {
            this(uuid, parent, child, List.of());
        }
    }

    /** The answer. */
    public static final class Answer {
        private final List<Merged> volumes;

        private Answer() {
            volumes = null;
        }

        /** @return each merged volume and the file it runs on now */
        public List<Merged> volumes() { return Json.view(volumes); }
    }

    /** A volume after its merge. */
    public static final class Merged {
        private final String uuid;
        private final String target;
        private final String path;

        private Merged() {
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

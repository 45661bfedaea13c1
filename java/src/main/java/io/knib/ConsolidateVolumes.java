package io.knib;

import java.util.List;

/** {@link Knib#consolidateVolumes}: CloudStack's {@code ConsolidateVolumesCommand}, after a quick restore. */
public final class ConsolidateVolumes {
    private ConsolidateVolumes() {}

    /**
     * The command. Immutable.
     *
     * @param domain the libvirt domain ({@code vmName})
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param volumes the volumes to consolidate ({@code volumesToConsolidate})
     * @param timeoutSecs the command's time budget in seconds (a block pull still running then is aborted); null for none
     */
    public record Request(String domain, String connect, List<VolumeRef> volumes, Long timeoutSecs) {
        /** Copies {@code volumes} (null: none). */
        public Request {
            volumes = Json.copy(volumes);
        }

        /**
         * The volumes of a domain of the local libvirt, with no time budget of its own.
         *
         * @param domain the libvirt domain
         * @param volumes the volumes to consolidate
         */
        public Request(String domain, List<VolumeRef> volumes) {
            this(domain, null, volumes, null);
        }

        /** @param v the libvirt URI @return this request with it */
        public Request withConnect(String v) {
            return new Request(domain, v, volumes, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(domain, connect, volumes, v);
        }
    }

    /**
     * A volume by the file it runs on.
     *
     * @param uuid the volume's uuid
     * @param path the file it runs on (the quick-restore overlay)
     */
    public record VolumeRef(String uuid, String path) {}

    /** The answer ({@code successfullyConsolidatedVolumes}). */
    public static final class Answer {
        private final List<Consolidated> consolidated;

        private Answer() {
            consolidated = null;
        }

        /** @return each volume consolidated */
        public List<Consolidated> consolidated() { return Json.view(consolidated); }
    }

    /** One consolidated volume. */
    public static final class Consolidated {
        private final String uuid;
        private final String target;
        private final String path;
        private final boolean pulled;

        private Consolidated() {
            uuid = null;
            target = null;
            path = null;
            pulled = false;
        }

        /** @return the volume's uuid */
        public String uuid() { return uuid; }

        /** @return its disk target */
        public String target() { return target; }

        /** @return its file, which no longer has a backing file */
        public String path() { return path; }

        /** @return whether it had backing data to pull in */
        public boolean pulled() { return pulled; }
    }
}

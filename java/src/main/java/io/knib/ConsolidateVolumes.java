package io.knib;

import java.util.ArrayList;
import java.util.List;

/** {@link Knib#consolidateVolumes}: CloudStack's {@code ConsolidateVolumesCommand}, after a quick restore. */
public final class ConsolidateVolumes {
    private ConsolidateVolumes() {}

    /** The command. */
    public static final class Request {
        /** The libvirt domain ({@code vmName}). */
        public String domain;
        /** The libvirt URI; null for {@code qemu:///system}. */
        public String connect;
        /** The volumes to consolidate ({@code volumesToConsolidate}). */
        public List<VolumeRef> volumes = new ArrayList<>();
        /** The command's time budget in seconds (a block pull still running then is aborted); null for none. */
        public Long timeoutSecs;
    }

    /** A volume by the file it runs on. */
    public static final class VolumeRef {
        /** The volume's uuid. */
        public String uuid;
        /** The file it runs on (the quick-restore overlay). */
        public String path;

        /** An empty reference. */
        public VolumeRef() {}

        /**
         * @param uuid the volume's uuid
         * @param path the file it runs on
         */
        public VolumeRef(String uuid, String path) {
            this.uuid = uuid;
            this.path = path;
        }
    }

    /** The answer ({@code successfullyConsolidatedVolumes}). */
    public static final class Answer {
        /** Each volume consolidated. */
        public List<Consolidated> consolidated = new ArrayList<>();
    }

    /** One consolidated volume. */
    public static final class Consolidated {
        /** The volume's uuid. */
        public String uuid;
        /** Its disk target. */
        public String target;
        /** Its file, which no longer has a backing file. */
        public String path;
        /** Whether it had backing data to pull in. */
        public boolean pulled;
    }
}

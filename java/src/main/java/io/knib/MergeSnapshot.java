package io.knib;

import java.util.ArrayList;
import java.util.List;

/** {@link Knib#mergeSnapshot}: CloudStack's {@code MergeDiskOnlyVmSnapshotCommand}. */
public final class MergeSnapshot {
    private MergeSnapshot() {}

    /** The command. */
    public static final class Request {
        /** The libvirt domain ({@code vmName}). */
        public String domain;
        /** The libvirt URI; null for {@code qemu:///system}. */
        public String connect;
        /** Whether the VM runs ({@code isVmRunning}); null to take the domain's state as it is. */
        public Boolean running;
        /** The merges, in order ({@code snapshotMergeTreeToList}). */
        public List<Merge> merges = new ArrayList<>();
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;
    }

    /** One {@code DeltaMergeTreeTO}: {@code child} goes into {@code parent}. */
    public static final class Merge {
        /** The volume's uuid (echoed). */
        public String uuid;
        /** The file below the child. */
        public String parent;
        /** The snapshot delta to merge. */
        public String child;
        /** Files that use the child as backing file (other branches are pointed at the parent). */
        public List<String> grandChildren = new ArrayList<>();

        /** An empty merge. */
        public Merge() {}

        /**
         * @param uuid the volume's uuid
         * @param parent the file below the child
         * @param child the delta to merge
         */
        public Merge(String uuid, String parent, String child) {
            this.uuid = uuid;
            this.parent = parent;
            this.child = child;
        }
    }

    /** The answer. */
    public static final class Answer {
        /** Each merged volume and the file it runs on now. */
        public List<Merged> volumes = new ArrayList<>();
    }

    /** A volume after its merge. */
    public static final class Merged {
        /** The volume's uuid. */
        public String uuid;
        /** Its disk target. */
        public String target;
        /** The file it runs on now. */
        public String path;
    }
}

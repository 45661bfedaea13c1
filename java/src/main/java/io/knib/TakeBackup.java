package io.knib;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** {@link Knib#takeBackup}: CloudStack's {@code TakeKbossBackupCommand} and its answer. */
public final class TakeBackup {
    private TakeBackup() {}

    /**
     * The command: one backup of all the volumes of one VM. Immutable; make one with {@link #builder()}.
     *
     * @param domain the libvirt domain ({@code vmName}); null for a stopped VM libvirt does not know (its
     *     domain was transient): then {@code running} must be false, and the volumes' files alone are worked on
     *     (every file is first tested for QEMU's image lock: one a process holds fails with {@link BusyException})
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param running whether the VM runs ({@code runningVM}); null to take the domain's state as it is; must be
     *     false when {@code domain} is null
     * @param quiesce freeze the guest's file systems for the snapshot ({@code quiesceVm}; needs the guest agent)
     * @param endOfChain the backup ends its chain: the disks go back to their base afterwards ({@code endChain})
     * @param isolated a full copy outside any chain; the disks are left as they were ({@code isolated})
     * @param volumes one entry per volume ({@code kbossTOs})
     * @param timeoutSecs the command's time budget in seconds ({@code wait}); null for none
     * @param method {@code "snapshot"} (null means it too: KBOSS's external snapshot, copy and merge) or
     *     {@code "bitmap"} (a running domain only: libvirt checkpoints and a pull-mode backup job; the disks'
     *     chains are left as they are, {@code deltaPathOnPrimary} is not created, and no volume may have a
     *     {@code merge} or VM snapshot deltas)
     */
    public record Request(
            String domain,
            String connect,
            Boolean running,
            boolean quiesce,
            boolean endOfChain,
            boolean isolated,
            List<Volume> volumes,
            Long timeoutSecs,
            String method) {
        /** Copies {@code volumes} (null: none). */
        public Request {
            volumes = Json.copy(volumes);
        }

        /** @return an empty builder */
        public static Builder builder() {
            return new Builder();
        }

        /** Builds a {@link Request}; every setter returns the builder. */
        public static final class Builder {
            private String domain;
            private String connect;
            private Boolean running;
            private boolean quiesce;
            private boolean endOfChain;
            private boolean isolated;
            private final List<Volume> volumes = new ArrayList<>();
            private Long timeoutSecs;
            private String method;

            private Builder() {}

            /** @param v {@link Request#domain()} @return this builder */
            public Builder domain(String v) { domain = v; return this; }

            /** @param v {@link Request#connect()} @return this builder */
            public Builder connect(String v) { connect = v; return this; }

            /** @param v {@link Request#running()} @return this builder */
            public Builder running(Boolean v) { running = v; return this; }

            /** @param v {@link Request#quiesce()} @return this builder */
            public Builder quiesce(boolean v) { quiesce = v; return this; }

            /** @param v {@link Request#endOfChain()} @return this builder */
            public Builder endOfChain(boolean v) { endOfChain = v; return this; }

            /** @param v {@link Request#isolated()} @return this builder */
            public Builder isolated(boolean v) { isolated = v; return this; }

            /** @param v one more volume @return this builder */
            public Builder volume(Volume v) { volumes.add(v); return this; }

            /** @param v the volumes, in place of those added so far @return this builder */
            public Builder volumes(List<Volume> v) { volumes.clear(); volumes.addAll(v); return this; }

            /** @param v {@link Request#timeoutSecs()} @return this builder */
            public Builder timeoutSecs(Long v) { timeoutSecs = v; return this; }
            /** @param v {@link Request#method()}: {@code "snapshot"} or {@code "bitmap"} @return this builder */
            public Builder method(String v) { method = v; return this; }

            /** @return the request */
            public Request build() {
                return new Request(domain, connect, running, quiesce, endOfChain, isolated, volumes, timeoutSecs,
                        method);
            }
        }
    }

    /**
     * One volume of a backup: CloudStack's {@code KbossTO}.
     *
     * @param uuid the volume's uuid (answers are keyed by it)
     * @param path the file the volume runs on now ({@code volumeObjectTO.path}, as a local path)
     * @param deltaPathOnPrimary the new delta the snapshot creates ({@code deltaPathOnPrimary})
     * @param deltaPathOnStore the backup file to write on the store ({@code deltaPathOnSecondary}, under the mounted store)
     * @param parentBackupPath the parent backup's file ({@code pathBackupParentOnSecondary}); null for a full backup
     * @param merge the delta written since the last backup and its base ({@code deltaMergeTreeTO}); null when
     *     the volume runs on its base alone
     * @param vmSnapshotDeltaPaths VM snapshot deltas taken since the last backup ({@code vmSnapshotDeltaPaths})
     */
    public record Volume(
            String uuid,
            String path,
            String deltaPathOnPrimary,
            String deltaPathOnStore,
            String parentBackupPath,
            MergeTree merge,
            List<String> vmSnapshotDeltaPaths) {
        /** Copies {@code vmSnapshotDeltaPaths} (null: none). */
        public Volume {
            vmSnapshotDeltaPaths = Json.copy(vmSnapshotDeltaPaths);
        }

        /**
         * A volume of a full backup (no parent, nothing to merge).
         *
         * @param uuid the volume's uuid
         * @param path the file it runs on now
         * @param deltaPathOnPrimary the new delta
         * @param deltaPathOnStore the backup file on the store
         */
        public Volume(String uuid, String path, String deltaPathOnPrimary, String deltaPathOnStore) {
            this(uuid, path, deltaPathOnPrimary, deltaPathOnStore, null, null, List.of());
        }

        /** @param v the parent backup's file @return this volume with it */
        public Volume withParentBackupPath(String v) {
            return new Volume(uuid, path, deltaPathOnPrimary, deltaPathOnStore, v, merge, vmSnapshotDeltaPaths);
        }

        /** @param v the merge @return this volume with it */
        public Volume withMerge(MergeTree v) {
            return new Volume(uuid, path, deltaPathOnPrimary, deltaPathOnStore, parentBackupPath, v, vmSnapshotDeltaPaths);
        }

        /** @param v the VM snapshot deltas @return this volume with them */
        public Volume withVmSnapshotDeltaPaths(List<String> v) {
            return new Volume(uuid, path, deltaPathOnPrimary, deltaPathOnStore, parentBackupPath, merge, v);
        }
    }

    /**
     * CloudStack's {@code DeltaMergeTreeTO}: {@code child} is committed into {@code parent}.
     *
     * @param parent the file below the child (the base)
     * @param child the delta to merge
     * @param grandChildren files that use the child as their backing file
     */
    public record MergeTree(String parent, String child, List<String> grandChildren) {
        /** Copies {@code grandChildren} (null: none). */
        public MergeTree {
            grandChildren = Json.copy(grandChildren);
        }

        /**
         * @param parent the file below the child
         * @param child the delta to merge into it
         */
        public MergeTree(String parent, String child) {
            this(parent, child, List.of());
        }
    }

    /** The answer ({@code TakeKbossBackupAnswer}). */
    public static final class Answer {
        private final String kind;
        private final boolean vmConsistent;
        private final List<VolumeResult> volumes;
        private final long totalSize;
        private final String fullReason;

        private Answer() {
            kind = null;
            vmConsistent = false;
            volumes = null;
            totalSize = 0;
            fullReason = null;
        }

        /** @return "full", "incremental" or "isolated" */
        public String kind() { return kind; }

        /** @return always true on success (a failure throws, saying whether the VM is consistent) */
        public boolean vmConsistent() { return vmConsistent; }

        /** @return one entry per volume, in request order */
        public List<VolumeResult> volumes() { return Json.view(volumes); }

        /** @return bytes of the backup: the sum of the volumes' {@link VolumeResult#size()} */
        public long totalSize() { return totalSize; }

        /**
         * @return method {@code "bitmap"} only, null otherwise: why an incremental backup could not follow its
         *     parent's checkpoint and copied every cluster over the parent (still an exact incremental, as large
         *     as a full backup)
         */
        public String fullReason() { return fullReason; }

        /** @return {@code mapVolumeUuidToNewVolumePath}: each volume's uuid and the file it runs on now */
        public Map<String, String> newVolumePaths() {
            Map<String, String> m = new LinkedHashMap<>();
            for (VolumeResult v : volumes()) {
                m.put(v.uuid(), v.newVolumePath());
            }
            return m;
        }
    }

    /** What the backup did to one volume. */
    public static final class VolumeResult {
        private final String uuid;
        private final String target;
        private final String newVolumePath;
        private final String deltaPathOnStore;
        private final long size;
        private final long virtualSize;

        private VolumeResult() {
            uuid = null;
            target = null;
            newVolumePath = null;
            deltaPathOnStore = null;
            size = 0;
            virtualSize = 0;
        }

        /** @return the volume's uuid */
        public String uuid() { return uuid; }

        /** @return the disk target in the domain ({@code vda}); null for a VM without a domain */
        public String target() { return target; }

        /** @return the file the volume runs on now */
        public String newVolumePath() { return newVolumePath; }

        /** @return the backup file on the store */
        public String deltaPathOnStore() { return deltaPathOnStore; }

        /** @return its size in bytes ({@code mapVolumeUuidToDeltaPathOnSecondaryAndSize}) */
        public long size() { return size; }

        /** @return the volume's guest-visible size */
        public long virtualSize() { return virtualSize; }
    }
}

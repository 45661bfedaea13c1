package io.knib;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** {@link Knib#takeBackup}: CloudStack's {@code TakeKbossBackupCommand} and its answer. */
public final class TakeBackup {
    private TakeBackup() {}

    /** The command: one backup of all the volumes of one VM. */
    public static final class Request {
        /** The libvirt domain ({@code vmName}). */
        public String domain;
        /** The libvirt URI; null for {@code qemu:///system}. */
        public String connect;
        /** Whether the VM runs ({@code runningVM}); null to take the domain's state as it is. */
        public Boolean running;
        /** Freeze the guest's file systems for the snapshot ({@code quiesceVm}; needs the guest agent). */
        public boolean quiesce;
        /** The backup ends its chain: the disks go back to their base afterwards ({@code endChain}). */
        public boolean endOfChain;
        /** A full copy outside any chain; the disks are left as they were ({@code isolated}). */
        public boolean isolated;
        /** One entry per volume ({@code kbossTOs}). */
        public List<Volume> volumes = new ArrayList<>();
        /** The command's time budget in seconds ({@code wait}); null for none. */
        public Long timeoutSecs;
    }

    /** One volume of a backup: CloudStack's {@code KbossTO}. */
    public static final class Volume {
        /** The volume's uuid (answers are keyed by it). */
        public String uuid;
        /** The file the volume runs on now ({@code volumeObjectTO.path}, as a local path). */
        public String path;
        /** The new delta the snapshot creates ({@code deltaPathOnPrimary}). */
        public String deltaPathOnPrimary;
        /** The backup file to write on the store ({@code deltaPathOnSecondary}, under the mounted store). */
        public String deltaPathOnStore;
        /** The parent backup's file ({@code pathBackupParentOnSecondary}); null for a full backup. */
        public String parentBackupPath;
        /** The delta written since the last backup and its base ({@code deltaMergeTreeTO}); null when the volume runs on its base alone. */
        public MergeTree merge;
        /** VM snapshot deltas taken since the last backup ({@code vmSnapshotDeltaPaths}). */
        public List<String> vmSnapshotDeltaPaths = new ArrayList<>();

        /** An empty volume, to fill field by field. */
        public Volume() {}

        /**
         * @param uuid the volume's uuid
         * @param path the file it runs on now
         * @param deltaPathOnPrimary the new delta
         * @param deltaPathOnStore the backup file on the store
         */
        public Volume(String uuid, String path, String deltaPathOnPrimary, String deltaPathOnStore) {
            this.uuid = uuid;
            this.path = path;
            this.deltaPathOnPrimary = deltaPathOnPrimary;
            this.deltaPathOnStore = deltaPathOnStore;
        }
    }

    /** CloudStack's {@code DeltaMergeTreeTO}: {@code child} is committed into {@code parent}. */
    public static final class MergeTree {
        /** The file below the child (the base). */
        public String parent;
        /** The delta to merge. */
        public String child;
        /** Files that use the child as their backing file. */
        public List<String> grandChildren = new ArrayList<>();

        /** An empty tree. */
        public MergeTree() {}

        /**
         * @param parent the file below the child
         * @param child the delta to merge into it
         */
        public MergeTree(String parent, String child) {
            this.parent = parent;
            this.child = child;
        }
    }

    /** The answer ({@code TakeKbossBackupAnswer}). */
    public static final class Answer {
        /** "full", "incremental" or "isolated". */
        public String kind;
        /** Always true on success (a failure throws, saying whether the VM is consistent). */
        public boolean vmConsistent;
        /** One entry per volume, in request order. */
        public List<VolumeResult> volumes = new ArrayList<>();

        /** @return {@code mapVolumeUuidToNewVolumePath}: each volume's uuid and the file it runs on now */
        public Map<String, String> newVolumePaths() {
            Map<String, String> m = new LinkedHashMap<>();
            for (VolumeResult v : volumes) {
                m.put(v.uuid, v.newVolumePath);
            }
            return m;
        }
    }

    /** What the backup did to one volume. */
    public static final class VolumeResult {
        /** The volume's uuid. */
        public String uuid;
        /** The disk target in the domain ({@code vda}). */
        public String target;
        /** The file the volume runs on now. */
        public String newVolumePath;
        /** The backup file on the store. */
        public String deltaPathOnStore;
        /** Its size in bytes ({@code mapVolumeUuidToDeltaPathOnSecondaryAndSize}). */
        public long size;
        /** The volume's guest-visible size. */
        public long virtualSize;
    }
}

package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#cleanupVmBackup}: CloudStack's {@code CleanupKbossBackupErrorCommand}. Give it what the failed
 * {@link Knib#takeBackup} was given: it finishes the backup when every volume's file is on the store, and
 * undoes it otherwise.
 */
public final class CleanupVmBackup {
    private CleanupVmBackup() {}

    /** The command. */
    public static final class Request {
        /** The libvirt domain ({@code vmName}). */
        public String domain;
        /** The libvirt URI; null for {@code qemu:///system}. */
        public String connect;
        /** Whether the VM runs ({@code runningVM}); null to take the domain's state as it is. */
        public Boolean running;
        /** As the failed backup's. */
        public boolean endOfChain;
        /** As the failed backup's. */
        public boolean isolated;
        /** The failed backup's volumes ({@code kbossTOs}). */
        public List<TakeBackup.Volume> volumes = new ArrayList<>();
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;

        /** An empty request. */
        public Request() {}

        /** @param failed the request of the failed backup */
        public Request(TakeBackup.Request failed) {
            this.domain = failed.domain;
            this.connect = failed.connect;
            this.running = failed.running;
            this.endOfChain = failed.endOfChain;
            this.isolated = failed.isolated;
            this.volumes = new ArrayList<>(failed.volumes);
            this.timeoutSecs = failed.timeoutSecs;
        }
    }

    /** The answer ({@code CleanupKbossBackupErrorAnswer}). */
    public static final class Answer {
        /** Whether the backup had reached the store (it was then finished, else undone). */
        public boolean published;
        /** True: the VM runs on {@code base} or {@code base <- one delta} again. */
        public boolean vmConsistent;
        /** Each volume and the file it runs on now. */
        public List<VolumeState> volumes = new ArrayList<>();
        /** What was done, one line each. */
        public List<String> actions = new ArrayList<>();
    }

    /** A volume after the clean-up. */
    public static final class VolumeState {
        /** The volume's uuid. */
        public String uuid;
        /** Its disk target. */
        public String target;
        /** The file it runs on now. */
        public String path;
    }
}

package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#prepareValidation}: CloudStack's {@code PrepareValidationCommand}. One qcow2 overlay per volume
 * of the backup, named {@code <vmName>-<uuid>.knib-validation.qcow2} in {@code workDir}, for the validation VM
 * to run on (the backup itself is only read).
 */
public final class PrepareValidation {
    private PrepareValidation() {}

    /** The command. */
    public static final class Request {
        /** The validation VM's name (names the overlays). */
        public String vmName;
        /** Where the overlays go. */
        public String workDir;
        /** Backup file and volume pairs ({@code backupToVolumeList}). */
        public List<Volume> volumes = new ArrayList<>();
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;
    }

    /** One volume of the backup. */
    public static final class Volume {
        /** The volume's uuid. */
        public String uuid;
        /** The backup's file for it. */
        public String backupPath;

        /** An empty volume. */
        public Volume() {}

        /**
         * @param uuid the volume's uuid
         * @param backupPath the backup's file
         */
        public Volume(String uuid, String backupPath) {
            this.uuid = uuid;
            this.backupPath = backupPath;
        }
    }

    /** The answer. */
    public static final class Answer {
        /** Each overlay made. */
        public List<Prepared> volumes = new ArrayList<>();
    }

    /** One overlay. */
    public static final class Prepared {
        /** The volume's uuid. */
        public String uuid;
        /** The backup's file. */
        public String backupPath;
        /** The overlay. */
        public String overlayPath;
    }
}

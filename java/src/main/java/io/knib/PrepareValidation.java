package io.knib;

import java.util.List;

/**
 * {@link Knib#prepareValidation}: CloudStack's {@code PrepareValidationCommand}. One qcow2 overlay per volume
 * of the backup, for the validation VM to run on (the backup itself is only read): at the volume's
 * {@code overlayPath} (the validation VM's volume file, as the agent does; replaced only when it holds no data and
 * no QEMU holds it), or named {@code <vmName>..<uuid>.knib-validation.qcow2} in {@code workDir}. All or none.
 */
public final class PrepareValidation {
    private PrepareValidation() {}

    /**
     * The command. Immutable.
     *
     * @param vmName the validation VM's name (names the overlays)
     * @param workDir where the overlays of volumes without {@code overlayPath} go; null when every volume has one
     * @param volumes backup file and volume pairs ({@code backupToVolumeList})
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(String vmName, String workDir, List<Volume> volumes, Long timeoutSecs) {
        /** Copies {@code volumes} (null: none). */
        public Request {
            volumes = Json.copy(volumes);
        }

        /**
         * With no time budget of its own.
         *
         * @param vmName the validation VM's name
         * @param workDir where the overlays go
         * @param volumes the backup's volumes
         */
        public Request(String vmName, String workDir, List<Volume> volumes) {
            this(vmName, workDir, volumes, null);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(vmName, workDir, volumes, v);
        }
    }

    /**
     * One volume of the backup.
     *
     * @param uuid the volume's uuid
     * @param backupPath the backup's file for it
     * @param overlayPath the validation VM's volume file, replaced by the overlay; null: in {@code workDir}
     */
    public record Volume(String uuid, String backupPath, String overlayPath) {
        /**
         * An overlay in {@code workDir}.
         *
         * @param uuid the volume's uuid
         * @param backupPath the backup's file for it
         */
        public Volume(String uuid, String backupPath) {
            this(uuid, backupPath, null);
        }
    }

    /** The answer. */
    public static final class Answer {
        private final List<Prepared> volumes;

        private Answer() {
            volumes = null;
        }

        /** @return each overlay made */
        public List<Prepared> volumes() { return Json.view(volumes); }
    }

    /** One overlay. */
    public static final class Prepared {
        private final String uuid;
        private final String backupPath;
        private final String overlayPath;

        private Prepared() {
            uuid = null;
            backupPath = null;
            overlayPath = null;
        }

        /** @return the volume's uuid */
        public String uuid() { return uuid; }

        /** @return the backup's file */
        public String backupPath() { return backupPath; }

        /** @return the overlay */
        public String overlayPath() { return overlayPath; }
    }
}

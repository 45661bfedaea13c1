package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#restoreBackup}: CloudStack's {@code RestoreKbossBackupCommand}. Every volume is written beside
 * its path first and replaces it only when all are written.
 */
public final class RestoreBackup {
    private RestoreBackup() {}

    /**
     * The command. Immutable; make one with {@link #builder()}.
     *
     * @param volumes backup file and volume pairs ({@code backupAndVolumePairs})
     * @param quickRestore make each volume an overlay on the backup instead of a copy ({@code quickRestore})
     * @param deltasToRemove files of the old chains on primary to delete afterwards ({@code deltasToRemove})
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(List<Volume> volumes, boolean quickRestore, List<String> deltasToRemove, Long timeoutSecs) {
        /** Copies the lists (null: none). */
        public Request {
            volumes = Json.copy(volumes);
            deltasToRemove = Json.copy(deltasToRemove);
        }

        /** @return an empty builder */
        public static Builder builder() {
            return new Builder();
        }

        /** Builds a {@link Request}; every setter returns the builder. */
        public static final class Builder {
            private final List<Volume> volumes = new ArrayList<>();
            private boolean quickRestore;
            private final List<String> deltasToRemove = new ArrayList<>();
            private Long timeoutSecs;

            private Builder() {}

            /** @param v one more volume @return this builder */
            public Builder volume(Volume v) { volumes.add(v); return this; }

            /** @param v the volumes, in place of those added so far @return this builder */
            public Builder volumes(List<Volume> v) { volumes.clear(); volumes.addAll(v); return this; }

            /** @param v {@link Request#quickRestore()} @return this builder */
            public Builder quickRestore(boolean v) { quickRestore = v; return this; }

            /** @param v one more file to delete afterwards @return this builder */
            public Builder deltaToRemove(String v) { deltasToRemove.add(v); return this; }

            /** @param v the files to delete, in place of those added so far @return this builder */
            public Builder deltasToRemove(List<String> v) { deltasToRemove.clear(); deltasToRemove.addAll(v); return this; }

            /** @param v {@link Request#timeoutSecs()} @return this builder */
            public Builder timeoutSecs(Long v) { timeoutSecs = v; return this; }

            /** @return the request */
            public Request build() {
                return new Request(volumes, quickRestore, deltasToRemove, timeoutSecs);
            }
        }
    }

    /**
     * A file with the hash it must have.
     *
     * @param path the file
     * @param hash its xxh3-128, 32 hex digits
     */
    public record ExpectedHash(String path, String hash) {}

    /**
     * One volume to restore.
     *
     * @param uuid the volume's uuid (echoed in the answer); may be null
     * @param backupPath the backup's file on the store (the top of its chain)
     * @param volumePath where the volume goes ({@code volumeObjectTO.path}); replaced when it exists
     * @param expectedHashes files of the backup's chain with the xxh3-128 each must have (the {@code files} of
     *     {@link Knib#takeBackupHash}); a file that does not match fails the restore before any volume is
     *     replaced. Empty: nothing is checked
     */
    public record Volume(String uuid, String backupPath, String volumePath, List<ExpectedHash> expectedHashes) {
        /** Copies {@code expectedHashes} (null: none). */
        public Volume {
            expectedHashes = Json.copy(expectedHashes);
        }

        /**
         * A volume restored without checking hashes.
         *
         * @param uuid the volume's uuid
         * @param backupPath the backup's file
         * @param volumePath where the volume goes
         */
        public Volume(String uuid, String backupPath, String volumePath) {
            this(uuid, backupPath, volumePath, List.of());
        }

        /** @param v the hashes to check @return this volume with them */
        public Volume withExpectedHashes(List<ExpectedHash> v) {
            return new Volume(uuid, backupPath, volumePath, v);
        }
    }

    /** The answer. */
    public static final class Answer {
        private final List<Restored> volumes;
        private final List<String> removed;

        private Answer() {
            volumes = null;
            removed = null;
        }

        /** @return each volume restored */
        public List<Restored> volumes() { return Json.view(volumes); }

        /** @return the old deltas removed */
        public List<String> removed() { return Json.view(removed); }
    }

    /** One restored volume. */
    public static final class Restored {
        private final String uuid;
        private final String path;
        private final String backing;

        private Restored() {
            uuid = null;
            path = null;
            backing = null;
        }

        /** @return the volume's uuid */
        public String uuid() { return uuid; }

        /** @return its file */
        public String path() { return path; }

        /** @return for a quick restore, its backing file (the backup); else null */
        public String backing() { return backing; }
    }
}

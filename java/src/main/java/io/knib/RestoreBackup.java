package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#restoreBackup}: CloudStack's {@code RestoreKbossBackupCommand}. Every volume is written beside
 * its path first and replaces it only when all are written.
 */
public final class RestoreBackup {
    private RestoreBackup() {}

    /** The command. */
    public static final class Request {
        /** Backup file and volume pairs ({@code backupAndVolumePairs}). */
        public List<Volume> volumes = new ArrayList<>();
        /** Make each volume an overlay on the backup instead of a copy ({@code quickRestore}). */
        public boolean quickRestore;
        /** Files of the old chains on primary to delete afterwards ({@code deltasToRemove}). */
        public List<String> deltasToRemove = new ArrayList<>();
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;
    }

    /** A file with the hash it must have. */
    public static final class ExpectedHash {
        /** The file. */
        public String path;
        /** Its xxh3-128, 32 hex digits. */
        public String hash;

        /** An empty entry. */
        public ExpectedHash() {}

        /**
         * @param path the file
         * @param hash its xxh3-128
         */
        public ExpectedHash(String path, String hash) {
            this.path = path;
            this.hash = hash;
        }
    }

    /** One volume to restore. */
    public static final class Volume {
        /** The volume's uuid (echoed in the answer); may be null. */
        public String uuid;
        /** The backup's file on the store (the top of its chain). */
        public String backupPath;
        /** Where the volume goes ({@code volumeObjectTO.path}); replaced when it exists. */
        public String volumePath;
        /**
         * Files of the backup's chain with the xxh3-128 each must have (the
         * {@code files} of {@link Knib#takeBackupHash}); a file that does not match
         * fails the restore before any volume is replaced. Empty: nothing is checked.
         */
        public List<ExpectedHash> expectedHashes = new ArrayList<>();

        /** An empty volume. */
        public Volume() {}

        /**
         * @param uuid the volume's uuid
         * @param backupPath the backup's file
         * @param volumePath where the volume goes
         */
        public Volume(String uuid, String backupPath, String volumePath) {
            this.uuid = uuid;
            this.backupPath = backupPath;
            this.volumePath = volumePath;
        }
    }

    /** The answer. */
    public static final class Answer {
        /** Each volume restored. */
        public List<Restored> volumes = new ArrayList<>();
        /** The old deltas removed. */
        public List<String> removed = new ArrayList<>();
    }

    /** One restored volume. */
    public static final class Restored {
        /** The volume's uuid. */
        public String uuid;
        /** Its file. */
        public String path;
        /** For a quick restore, its backing file (the backup); else null. */
        public String backing;
    }
}

package io.knib;

import java.util.List;

/** {@link Knib#takeBackupHash}: CloudStack's {@code TakeBackupHashCommand}: xxh3-128 over the files of a backup's chain. */
public final class TakeBackupHash {
    private TakeBackupHash() {}

    /**
     * The command. Immutable.
     *
     * @param files the backup's chain, root (full backup) first ({@code backupDeltaTOList})
     * @param backupUuid echoed in the answer ({@code backupUuid}); may be null
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(List<String> files, String backupUuid, Long timeoutSecs) {
        /** Copies {@code files} (null: none). */
        public Request {
            files = Json.copy(files);
        }

        /**
         * With no backup uuid and no time budget of its own.
         *
         * @param files the backup's chain, root first
         */
        public Request(List<String> files) {
            this(files, null, null);
        }

        /** @param v the backup's uuid @return this request with it */
        public Request withBackupUuid(String v) {
            return new Request(files, v, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(files, backupUuid, v);
        }
    }

    /** The answer. */
    public static final class Answer {
        private final String backupUuid;
        private final String hash;
        private final List<FileHash> files;

        private Answer() {
            backupUuid = null;
            hash = null;
            files = null;
        }

        /** @return the request's backup uuid */
        public String backupUuid() { return backupUuid; }

        /** @return the hash of the whole chain, 32 hex digits */
        public String hash() { return hash; }

        /** @return each file's own hash */
        public List<FileHash> files() { return Json.view(files); }
    }

    /** One file's hash. */
    public static final class FileHash {
        private final String path;
        private final String hash;

        private FileHash() {
            path = null;
            hash = null;
        }

        /** @return the file */
        public String path() { return path; }

        /** @return its hash */
        public String hash() { return hash; }
    }
}

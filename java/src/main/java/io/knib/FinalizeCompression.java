package io.knib;

import java.util.List;

/** {@link Knib#finalizeBackupCompression}: CloudStack's {@code FinalizeBackupCompressionCommand}. */
public final class FinalizeCompression {
    private FinalizeCompression() {}

    /**
     * The command. Immutable.
     *
     * @param files the backup files whose {@code .comp} copies are finished ({@code backupDeltaTOList})
     * @param cleanup the backup was removed meanwhile: delete the {@code .comp} files instead ({@code cleanup})
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(List<String> files, boolean cleanup, Long timeoutSecs) {
        /** Copies {@code files} (null: none). */
        public Request {
            files = Json.copy(files);
        }

        /**
         * Finalize {@code files}, with no time budget of its own.
         *
         * @param files the backup files
         */
        public Request(List<String> files) {
            this(files, false, null);
        }

        /** @return this request with {@code cleanup} set: the {@code .comp} files are deleted instead */
        public Request withCleanup() {
            return new Request(files, true, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(files, cleanup, v);
        }
    }

    /** The answer. */
    public static final class Answer {
        private final List<SizedFile> finalized;
        private final List<String> discarded;
        private final long totalSize;

        private Answer() {
            finalized = null;
            discarded = null;
            totalSize = 0;
        }

        /** @return each file, now compressed, and its new size (empty with {@code cleanup}) */
        public List<SizedFile> finalized() { return Json.view(finalized); }

        /** @return the files whose {@code .comp} copies were deleted (with {@code cleanup}) */
        public List<String> discarded() { return Json.view(discarded); }

        /**
         * @return bytes of the finalized files together (0 with {@code cleanup}): the agent's answer details,
         *     {@code Long.toString(totalSize())}
         */
        public long totalSize() { return totalSize; }
    }

    /** A file and its size. */
    public static final class SizedFile {
        private final String path;
        private final long size;

        private SizedFile() {
            path = null;
            size = 0;
        }

        /** @return the file */
        public String path() { return path; }

        /** @return its size in bytes */
        public long size() { return size; }
    }
}

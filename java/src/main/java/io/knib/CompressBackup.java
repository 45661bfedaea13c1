package io.knib;

import java.util.ArrayList;
import java.util.List;

/** {@link Knib#compressBackup}: CloudStack's {@code CompressBackupCommand}. Writes {@code <file>.comp} beside each file. */
public final class CompressBackup {
    private CompressBackup() {}

    /**
     * The command. Immutable; make one with {@link #builder()}.
     *
     * @param files the backup files to compress ({@code backupDeltasToCompress})
     * @param library "zstd" or "zlib" ({@code compressionLib}); qcow2 v2 files always get zlib
     * @param coroutines qemu-img's {@code -m}, 1 to 16 ({@code coroutines})
     * @param rateLimitMbps MB/s; below 1 means no limit ({@code rateLimit}), as CloudStack's setting (kept as 0)
     * @param minFreeFactor refuse unless the store has this many times each file's size free; a finite number
     *     ({@link Knib#compressBackup} refuses NaN and infinities with {@link InvalidInputException})
     * @param minFreeBytes refuse unless the store has this many bytes free ({@code minFreeStorage}); null for no such check
     * @param expectedHashes the xxh3-128 each file must have, one per file of {@code files} in order (the
     *     {@code files[].hash} of {@link Knib#takeBackupHash}); a file that does not match fails with a corrupt
     *     error. Null: nothing is checked
     * @param checkOutput read each {@code .comp} back before it counts as written and compare its data with the
     *     file's: one that differs fails with {@link InternalException} (the copy is faulty, not the file). False by
     *     default: it costs about 1.5x the compression's CPU
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(
            List<String> files,
            String library,
            int coroutines,
            long rateLimitMbps,
            double minFreeFactor,
            Long minFreeBytes,
            List<String> expectedHashes,
            boolean checkOutput,
            Long timeoutSecs) {
        /**
         * The request without {@code checkOutput} (false), as before that field.
         *
         * @param files {@link #files()}
         * @param library {@link #library()}
         * @param coroutines {@link #coroutines()}
         * @param rateLimitMbps {@link #rateLimitMbps()}
         * @param minFreeFactor {@link #minFreeFactor()}
         * @param minFreeBytes {@link #minFreeBytes()}
         * @param expectedHashes {@link #expectedHashes()}
         * @param timeoutSecs {@link #timeoutSecs()}
         */
        public Request(List<String> files, String library, int coroutines, long rateLimitMbps, double minFreeFactor,
                Long minFreeBytes, List<String> expectedHashes, Long timeoutSecs) {
            this(files, library, coroutines, rateLimitMbps, minFreeFactor, minFreeBytes, expectedHashes, false,
                    timeoutSecs);
        }

        /** Copies the lists; a rate limit below 1 becomes 0 (none). */
        public Request {
            files = Json.copy(files);
            expectedHashes = Json.copyOrNull(expectedHashes);
            rateLimitMbps = Math.max(0, rateLimitMbps);
        }

        /** @return a builder with the defaults: zstd, 1 coroutine, no rate limit, a free factor of 1 */
        public static Builder builder() {
            return new Builder();
        }

        /** Builds a {@link Request}; every setter returns the builder. */
        public static final class Builder {
            private final List<String> files = new ArrayList<>();
            private String library = "zstd";
            private int coroutines = 1;
            private long rateLimitMbps;
            private double minFreeFactor = 1.0;
            private Long minFreeBytes;
            private List<String> expectedHashes;
            private boolean checkOutput;
            private Long timeoutSecs;

            private Builder() {}

            /** @param v one more file @return this builder */
            public Builder file(String v) { files.add(v); return this; }

            /** @param v the files, in place of those added so far @return this builder */
            public Builder files(List<String> v) { files.clear(); files.addAll(v); return this; }

            /** @param v {@link Request#library()} @return this builder */
            public Builder library(String v) { library = v; return this; }

            /** @param v {@link Request#coroutines()} @return this builder */
            public Builder coroutines(int v) { coroutines = v; return this; }

            /** @param v {@link Request#rateLimitMbps()} @return this builder */
            public Builder rateLimitMbps(long v) { rateLimitMbps = v; return this; }

            /** @param v {@link Request#minFreeFactor()} @return this builder */
            public Builder minFreeFactor(double v) { minFreeFactor = v; return this; }

            /** @param v {@link Request#minFreeBytes()} @return this builder */
            public Builder minFreeBytes(Long v) { minFreeBytes = v; return this; }

            /** @param v {@link Request#expectedHashes()} @return this builder */
            public Builder expectedHashes(List<String> v) { expectedHashes = v; return this; }

            /** @param v {@link Request#checkOutput()} @return this builder */
            public Builder checkOutput(boolean v) { checkOutput = v; return this; }

            /** @param v {@link Request#timeoutSecs()} @return this builder */
            public Builder timeoutSecs(Long v) { timeoutSecs = v; return this; }

            /** @return the request */
            public Request build() {
                return new Request(files, library, coroutines, rateLimitMbps, minFreeFactor, minFreeBytes,
                        expectedHashes, checkOutput, timeoutSecs);
            }
        }
    }

    /** The answer. */
    public static final class Answer {
        private final List<Compressed> compressed;

        private Answer() {
            compressed = null;
        }

        /** @return one entry per file */
        public List<Compressed> compressed() { return Json.view(compressed); }
    }

    /** One compressed file, not yet finalized. */
    public static final class Compressed {
        private final String path;
        private final String compPath;
        private final long originalSize;
        private final long compressedSize;
        private final String library;
        private final String hash;

        private Compressed() {
            path = null;
            compPath = null;
            originalSize = 0;
            compressedSize = 0;
            library = null;
            hash = null;
        }

        /** @return the backup file */
        public String path() { return path; }

        /** @return its compressed copy */
        public String compPath() { return compPath; }

        /** @return bytes before */
        public long originalSize() { return originalSize; }

        /** @return bytes after */
        public long compressedSize() { return compressedSize; }

        /** @return the library used */
        public String library() { return library; }

        /** @return xxh3-128 of the compressed file, when {@code expectedHashes} were given; else null */
        public String hash() { return hash; }
    }
}

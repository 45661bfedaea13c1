package io.knib;

import java.util.ArrayList;
import java.util.List;

/** {@link Knib#compressBackup}: CloudStack's {@code CompressBackupCommand}. Writes {@code <file>.comp} beside each file. */
public final class CompressBackup {
    private CompressBackup() {}

    /** The command. */
    public static final class Request {
        /** The backup files to compress ({@code backupDeltasToCompress}). */
        public List<String> files = new ArrayList<>();
        /** "zstd" or "zlib" ({@code compressionLib}); qcow2 v2 files always get zlib. */
        public String library = "zstd";
        /** qemu-img's {@code -m}, 1 to 16 ({@code coroutines}). */
        public int coroutines = 1;
        /** MB/s; below 1 means no limit ({@code rateLimit}). */
        public long rateLimitMbps;
        /** Refuse unless the store has this many times each file's size free. */
        public double minFreeFactor = 1.0;
        /** Refuse unless the store has this many bytes free ({@code minFreeStorage}); null for no such check. */
        public Long minFreeBytes;
        /**
         * The xxh3-128 each file must have, one per file of {@code files} in order
         * (the {@code files[].hash} of {@link Knib#takeBackupHash}); a file that does
         * not match fails with a corrupt error. Null: nothing is checked.
         */
        public List<String> expectedHashes;
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;
    }

    /** The answer. */
    public static final class Answer {
        /** One entry per file. */
        public List<Compressed> compressed = new ArrayList<>();
    }

    /** One compressed file, not yet finalized. */
    public static final class Compressed {
        /** The backup file. */
        public String path;
        /** Its compressed copy. */
        public String compPath;
        /** Bytes before. */
        public long originalSize;
        /** Bytes after. */
        public long compressedSize;
        /** The library used. */
        public String library;
        /** xxh3-128 of the compressed file, when {@code expectedHashes} were given; else null. */
        public String hash;
    }
}

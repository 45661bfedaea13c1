package io.knib;

import java.util.ArrayList;
import java.util.List;

/** {@link Knib#finalizeBackupCompression}: CloudStack's {@code FinalizeBackupCompressionCommand}. */
public final class FinalizeCompression {
    private FinalizeCompression() {}

    /** The command. */
    public static final class Request {
        /** The backup files whose {@code .comp} copies are finished ({@code backupDeltaTOList}). */
        public List<String> files = new ArrayList<>();
        /** The backup was removed meanwhile: delete the {@code .comp} files instead ({@code cleanup}). */
        public boolean cleanup;
    }

    /** The answer. */
    public static final class Answer {
        /** Each file, now compressed, and its new size (empty with {@code cleanup}). */
        public List<SizedFile> finalized = new ArrayList<>();
        /** The files whose {@code .comp} copies were deleted (with {@code cleanup}). */
        public List<String> discarded = new ArrayList<>();
    }

    /** A file and its size. */
    public static final class SizedFile {
        /** The file. */
        public String path;
        /** Its size in bytes. */
        public long size;
    }
}

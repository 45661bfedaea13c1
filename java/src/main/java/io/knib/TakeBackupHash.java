package io.knib;

import java.util.ArrayList;
import java.util.List;

/** {@link Knib#takeBackupHash}: CloudStack's {@code TakeBackupHashCommand}: xxh3-128 over the files of a backup's chain. */
public final class TakeBackupHash {
    private TakeBackupHash() {}

    /** The command. */
    public static final class Request {
        /** The backup's chain, root (full backup) first ({@code backupDeltaTOList}). */
        public List<String> files = new ArrayList<>();
        /** Echoed in the answer ({@code backupUuid}). */
        public String backupUuid;
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;
    }

    /** The answer. */
    public static final class Answer {
        /** The request's backup uuid. */
        public String backupUuid;
        /** The hash of the whole chain, 32 hex digits. */
        public String hash;
        /** Each file's own hash. */
        public List<FileHash> files = new ArrayList<>();
    }

    /** One file's hash. */
    public static final class FileHash {
        /** The file. */
        public String path;
        /** Its hash. */
        public String hash;
    }
}

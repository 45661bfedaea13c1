package io.knib;

import java.util.ArrayList;
import java.util.List;

/** The answers of file-level restore ({@link Knib#listFilesystems}, {@link Knib#listFiles}, {@link Knib#extractFiles}). */
public final class FileRestore {
    private FileRestore() {}

    /** The answer of {@code files.fs}. */
    public static final class Filesystems {
        /** Each file system found in the volume. */
        public List<Filesystem> filesystems = new ArrayList<>();
    }

    /** A file system of a volume. */
    public static final class Filesystem {
        /** Its index (what {@code fs} names). */
        public Integer index;
        /** Its partition number, if on a partition. */
        public Integer partition;
        /** Where it starts, in bytes. */
        public Long start;
        /** Its size in bytes. */
        public Long size;
        /** Its type ("ext4", ...). */
        public String type;
        /** Its label. */
        public String label;
    }

    /** The answer of {@code files.ls}. */
    public static final class Listing {
        /** The entries of the directory. */
        public List<Entry> entries = new ArrayList<>();
    }

    /** A directory entry. */
    public static final class Entry {
        /** Its name. */
        public String name;
        /** "file", "dir", "symlink", ... */
        public String type;
        /** Its size in bytes. */
        public Long size;
        /** Its permission bits (e.g. 0644 as 420). */
        public Integer mode;
        /** Its modification time, seconds since the epoch. */
        public Long mtime;
        /** The nanoseconds of its modification time. */
        public Long mtimeNsec;
        /** A symbolic link's target. */
        public String target;
    }

    /** The answer of {@code files.get}. */
    public static final class Extracted {
        /** Files written. */
        public long files;
        /** Directories made. */
        public long dirs;
        /** Symbolic links made. */
        public long symlinks;
        /** Bytes written. */
        public long bytes;
    }
}

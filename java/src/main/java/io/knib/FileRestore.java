package io.knib;

import java.util.List;
import java.util.Objects;
import java.util.Optional;
import java.util.OptionalInt;

/**
 * File-level restore from a catalog backup: the requests and answers of {@link Knib#listFilesystems},
 * {@link Knib#listFiles} and {@link Knib#extractFiles}.
 *
 * <pre>{@code
 * FileRestore.Volume v = new FileRestore.Volume("/backups", backupId, "root");
 * k.listFilesystems(v);
 * k.listFiles(FileRestore.ListRequest.of(v).withPath("/etc").withFs(1));
 * k.extractFiles(FileRestore.GetRequest.of(v, "/etc/hosts", "/restore/out"));
 * }</pre>
 */
public final class FileRestore {
    private FileRestore() {}

    /**
     * A volume of a catalog backup; the request of {@code files.fs}.
     *
     * @param store the store directory
     * @param backup the backup's id
     * @param volume the volume's name
     */
    public record Volume(String store, String backup, String volume) {
        /** Refuses nulls. */
        public Volume {
            Objects.requireNonNull(store, "store");
            Objects.requireNonNull(backup, "backup");
            Objects.requireNonNull(volume, "volume");
        }
    }

    /** The request of {@code files.ls}: a directory of a file system of a volume. Immutable. */
    public static final class ListRequest {
        private final String store;
        private final String backup;
        private final String volume;
        private final Integer fs;
        private final String path;

        private ListRequest(Volume v, Integer fs, String path) {
            this.store = v.store();
            this.backup = v.backup();
            this.volume = v.volume();
            this.fs = fs;
            this.path = path;
        }

        /**
         * @param volume the volume
         * @return the root of its only readable file system
         */
        public static ListRequest of(Volume volume) {
            return new ListRequest(Objects.requireNonNull(volume, "volume"), null, null);
        }

        /** @param index a file system's index, as {@link Knib#listFilesystems} gives it @return this request with it */
        public ListRequest withFs(int index) {
            return new ListRequest(volume(), index, path);
        }

        /** @param directory the directory to list @return this request with it */
        public ListRequest withPath(String directory) {
            return new ListRequest(volume(), fs, Objects.requireNonNull(directory, "directory"));
        }

        /** @return the volume */
        public Volume volume() { return new Volume(store, backup, volume); }

        /** @return the file system's index; empty for the only readable one */
        public OptionalInt fs() { return fs == null ? OptionalInt.empty() : OptionalInt.of(fs); }

        /** @return the directory; empty for the root */
        public Optional<String> path() { return Optional.ofNullable(path); }
    }

    /** The request of {@code files.get}: copy a file or directory out of a backup. Immutable. */
    public static final class GetRequest {
        private final String store;
        private final String backup;
        private final String volume;
        private final Integer fs;
        private final String path;
        private final String to;

        private GetRequest(Volume v, Integer fs, String path, String to) {
            this.store = v.store();
            this.backup = v.backup();
            this.volume = v.volume();
            this.fs = fs;
            this.path = path;
            this.to = to;
        }

        /**
         * @param volume the volume
         * @param path what to copy, in its only readable file system
         * @param to where to put it
         * @return the request
         */
        public static GetRequest of(Volume volume, String path, String to) {
            return new GetRequest(Objects.requireNonNull(volume, "volume"), null,
                    Objects.requireNonNull(path, "path"), Objects.requireNonNull(to, "to"));
        }

        /** @param index a file system's index, as {@link Knib#listFilesystems} gives it @return this request with it */
        public GetRequest withFs(int index) {
            return new GetRequest(volume(), index, path, to);
        }

        /** @return the volume */
        public Volume volume() { return new Volume(store, backup, volume); }

        /** @return the file system's index; empty for the only readable one */
        public OptionalInt fs() { return fs == null ? OptionalInt.empty() : OptionalInt.of(fs); }

        /** @return what to copy */
        public String path() { return path; }

        /** @return where to put it */
        public String to() { return to; }
    }

    /** The answer of {@code files.fs}. */
    public static final class Filesystems {
        private final List<Filesystem> filesystems;

        private Filesystems() {
            filesystems = null;
        }

        /** @return each file system found in the volume */
        public List<Filesystem> filesystems() { return Json.view(filesystems); }
    }

    /** A file system of a volume. */
    public static final class Filesystem {
        private final Integer index;
        private final Integer partition;
        private final Long start;
        private final Long size;
        private final String type;
        private final String label;
        private final String device;

        private Filesystem() {
            index = null;
            partition = null;
            start = null;
            size = null;
            type = null;
            label = null;
            device = null;
        }

        /** @return its index (what {@code fs} names) */
        public Integer index() { return index; }

        /** @return its partition number, if on a partition; else null */
        public Integer partition() { return partition; }

        /** @return where it starts, in bytes */
        public Long start() { return start; }

        /** @return its size in bytes */
        public Long size() { return size; }

        /** @return its type ("ext4", ...) */
        public String type() { return type; }

        /** @return its label */
        public String label() { return label; }

        /**
         * @return the name libguestfs gives it ({@code /dev/sda1}, or {@code /dev/sda} for the whole disk): what
         *     CloudStack's agent calls the file system, and what {@code withFs(String)} takes
         */
        public String device() { return device; }
    }

    /** The answer of {@code files.ls}. */
    public static final class Listing {
        private final List<Entry> entries;

        private Listing() {
            entries = null;
        }

        /** @return the entries of the directory */
        public List<Entry> entries() { return Json.view(entries); }
    }

    /** A directory entry. */
    public static final class Entry {
        private final String name;
        private final String type;
        private final Long size;
        private final Integer mode;
        private final Long mtime;
        private final Long mtimeNsec;
        private final String target;

        private Entry() {
            name = null;
            type = null;
            size = null;
            mode = null;
            mtime = null;
            mtimeNsec = null;
            target = null;
        }

        /** @return its name */
        public String name() { return name; }

        /** @return "file", "dir", "symlink", ... */
        public String type() { return type; }

        /** @return its size in bytes */
        public Long size() { return size; }

        /** @return its permission bits (e.g. 0644 as 420) */
        public Integer mode() { return mode; }

        /** @return its modification time, seconds since the epoch */
        public Long mtime() { return mtime; }

        /** @return the nanoseconds of its modification time */
        public Long mtimeNsec() { return mtimeNsec; }

        /** @return a symbolic link's target; else null */
        public String target() { return target; }
    }

    /** The answer of {@code files.get}. */
    public static final class Extracted {
        private final long files;
        private final long dirs;
        private final long symlinks;
        private final long bytes;

        private Extracted() {
            files = 0;
            dirs = 0;
            symlinks = 0;
            bytes = 0;
        }

        /** @return files written */
        public long files() { return files; }

        /** @return directories made */
        public long dirs() { return dirs; }

        /** @return symbolic links made */
        public long symlinks() { return symlinks; }

        /** @return bytes written */
        public long bytes() { return bytes; }
    }
}

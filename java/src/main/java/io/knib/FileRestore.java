package io.knib;

import java.nio.file.Path;
import java.util.List;
import java.util.Objects;
import java.util.Optional;
import java.util.OptionalInt;

/**
 * File-level restore from a backup: the requests and answers of {@link Knib#listFilesystems},
 * {@link Knib#listFiles} and {@link Knib#extractFiles}. The backup is a volume of a catalog backup
 * ({@code new Volume(store, backup, volume)}) or a backup file given by its path, as CloudStack's agent has it
 * ({@link Volume#ofBackupFile}; its chain follows the backing pointers, relative or absolute).
 *
 * <pre>{@code
 * FileRestore.Volume v = new FileRestore.Volume("/backups", backupId, "root");
 * k.listFilesystems(v);
 * k.listFiles(FileRestore.ListRequest.of(v).withPath("/etc").withFs(1));
 * k.extractFiles(FileRestore.GetRequest.of(v, "/etc/hosts", "/restore/out"));
 *
 * FileRestore.Volume b = FileRestore.Volume.ofBackupFile(Path.of("/mnt/store/backups/i-2-10/0c6f2a4e"));
 * k.extractFiles(FileRestore.GetRequest.of(b, "/etc/hosts", "/restore/out").withFs("/dev/sda1"));
 * }</pre>
 */
public final class FileRestore {
    private FileRestore() {}

    /**
     * The backup a request reads, in one of two forms: a volume of a catalog backup (store, backup id, volume
     * name), or a backup file by its path. The request of {@code files.fs}. Immutable.
     */
    public static final class Volume {
        private final String store;
        private final String backup;
        private final String volume;
        private final String backupPath;

        /**
         * A volume of a catalog backup.
         *
         * @param store the store directory
         * @param backup the backup's id
         * @param volume the volume's name
         */
        public Volume(String store, String backup, String volume) {
            this.store = Objects.requireNonNull(store, "store");
            this.backup = Objects.requireNonNull(backup, "backup");
            this.volume = Objects.requireNonNull(volume, "volume");
            this.backupPath = null;
        }

        private Volume(String backupPath) {
            this.store = null;
            this.backup = null;
            this.volume = null;
            this.backupPath = backupPath;
        }

        /**
         * A backup file by its path (CloudStack's {@code backupPath}, resolved on the store's mount): its chain
         * follows the backing pointers, every file of it a regular qcow2 file, read-only.
         *
         * @param backupFile the absolute path of the backup's qcow2 file
         * @return the volume
         */
        public static Volume ofBackupFile(Path backupFile) {
            return new Volume(Objects.requireNonNull(backupFile, "backupFile").toString());
        }

        /** @return the store directory; empty for a backup file */
        public Optional<String> store() { return Optional.ofNullable(store); }

        /** @return the backup's id; empty for a backup file */
        public Optional<String> backup() { return Optional.ofNullable(backup); }

        /** @return the volume's name; empty for a backup file */
        public Optional<String> volume() { return Optional.ofNullable(volume); }

        /** @return the backup file's path; empty for a catalog backup */
        public Optional<Path> backupFile() { return Optional.ofNullable(backupPath).map(Path::of); }

        @Override
        public boolean equals(Object o) {
            return o instanceof Volume v && Objects.equals(store, v.store) && Objects.equals(backup, v.backup)
                    && Objects.equals(volume, v.volume) && Objects.equals(backupPath, v.backupPath);
        }

        @Override
        public int hashCode() { return Objects.hash(store, backup, volume, backupPath); }

        @Override
        public String toString() {
            return backupPath != null ? "Volume[backupFile=" + backupPath + "]"
                    : "Volume[store=" + store + ", backup=" + backup + ", volume=" + volume + "]";
        }
    }

    /** The request of {@code files.ls}: a directory of a file system of a volume. Immutable. */
    public static final class ListRequest {
        private final String store;
        private final String backup;
        private final String volume;
        private final String backupPath;
        /** An Integer (the index) or a String (the device name), or null. */
        private final Object fs;
        private final String path;

        private ListRequest(Volume v, Object fs, String path) {
            this.store = v.store;
            this.backup = v.backup;
            this.volume = v.volume;
            this.backupPath = v.backupPath;
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

        /**
         * @param device a file system's device name ({@code /dev/sda1}), as {@link Knib#listFilesystems} gives it
         * @return this request with it
         */
        public ListRequest withFs(String device) {
            return new ListRequest(volume(), Objects.requireNonNull(device, "device"), path);
        }

        /** @param directory the directory to list @return this request with it */
        public ListRequest withPath(String directory) {
            return new ListRequest(volume(), fs, Objects.requireNonNull(directory, "directory"));
        }

        /** @return the volume */
        public Volume volume() {
            return backupPath != null ? new Volume(backupPath) : new Volume(store, backup, volume);
        }

        /** @return the file system's index; empty for the only readable one or one named by device */
        public OptionalInt fs() { return fs instanceof Integer i ? OptionalInt.of(i) : OptionalInt.empty(); }

        /** @return the file system's device name; empty for the only readable one or one named by index */
        public Optional<String> fsDevice() { return fs instanceof String d ? Optional.of(d) : Optional.empty(); }

        /** @return the directory; empty for the root */
        public Optional<String> path() { return Optional.ofNullable(path); }
    }

    /** The request of {@code files.get}: copy a file or directory out of a backup. Immutable. */
    public static final class GetRequest {
        private final String store;
        private final String backup;
        private final String volume;
        private final String backupPath;
        /** An Integer (the index) or a String (the device name), or null. */
        private final Object fs;
        private final String path;
        private final String to;

        private GetRequest(Volume v, Object fs, String path, String to) {
            this.store = v.store;
            this.backup = v.backup;
            this.volume = v.volume;
            this.backupPath = v.backupPath;
            this.fs = fs;
            this.path = path;
            this.to = to;
        }

        /**
         * @param volume the volume
         * @param path what to copy, in its only readable file system
         * @param to where to put it (must not exist)
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

        /**
         * @param device a file system's device name ({@code /dev/sda1}), as {@link Knib#listFilesystems} gives it
         * @return this request with it
         */
        public GetRequest withFs(String device) {
            return new GetRequest(volume(), Objects.requireNonNull(device, "device"), path, to);
        }

        /** @return the volume */
        public Volume volume() {
            return backupPath != null ? new Volume(backupPath) : new Volume(store, backup, volume);
        }

        /** @return the file system's index; empty for the only readable one or one named by device */
        public OptionalInt fs() { return fs instanceof Integer i ? OptionalInt.of(i) : OptionalInt.empty(); }

        /** @return the file system's device name; empty for the only readable one or one named by index */
        public Optional<String> fsDevice() { return fs instanceof String d ? Optional.of(d) : Optional.empty(); }

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

package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.FileTime;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.Map;
import java.util.Optional;
import java.util.OptionalInt;
import java.util.stream.Collectors;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** File-level restore from Java: an ext4 disk made without mounting, backed up, listed and extracted. */
class FileRestoreTest {
    @TempDir
    Path dir;

    @Test
    void filesystemsAndFilesOfABackupAreListedAndExtracted() throws Exception {
        Path tree = dir.resolve("tree");
        Files.createDirectories(tree.resolve("etc/app"));
        Path conf = tree.resolve("etc/app/app.conf");
        Files.writeString(conf, "answer = 42\n", StandardCharsets.UTF_8);
        Files.setPosixFilePermissions(conf, PosixFilePermissions.fromString("rw-r-----"));
        Files.setLastModifiedTime(conf, FileTime.fromMillis(1_600_000_000_000L));
        Path raw = dir.resolve("disk.raw");
        Sh.run("mkfs.ext4", "-q", "-F", "-L", "jroot", "-d", tree.toString(), raw.toString(), "16M");
        Path disk = dir.resolve("disk.qcow2");
        Sh.run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw.toString(), disk.toString());
        Path store = dir.resolve("store");

        try (Knib k = new Knib()) {
            String backup = k.call("backup", Json.GSON.toJson(Map.of(
                    "store", store.toString(), "vm", "jfiles",
                    "disks", java.util.List.of(Map.of("name", "root", "path", disk.toString())))));
            String id = Json.GSON.fromJson(backup, com.google.gson.JsonObject.class).get("id").getAsString();

            FileRestore.Volume root = new FileRestore.Volume(store.toString(), id, "root");
            FileRestore.Filesystems fss = k.listFilesystems(root);
            assertEquals(1, fss.filesystems().size());
            FileRestore.Filesystem fs = fss.filesystems().get(0);
            assertEquals("ext4", fs.type());
            assertEquals("jroot", fs.label());

            // The root of the only file system, then a directory of the file system named by its index.
            FileRestore.ListRequest top = FileRestore.ListRequest.of(root);
            assertEquals(OptionalInt.empty(), top.fs());
            assertEquals(Optional.empty(), top.path());
            assertTrue(k.listFiles(top).entries().stream().anyMatch(e -> e.name().equals("etc")));
            FileRestore.ListRequest app = top.withPath("/etc/app").withFs(fs.index());
            assertEquals(OptionalInt.of(fs.index()), app.fs());
            assertEquals(Optional.empty(), top.path(), "withPath made a new request");
            FileRestore.Listing ls = k.listFiles(app);
            Map<String, FileRestore.Entry> byName = ls.entries().stream().collect(Collectors.toMap(FileRestore.Entry::name, e -> e));
            FileRestore.Entry e = byName.get("app.conf");
            assertEquals("file", e.type());
            assertEquals(12L, e.size());
            assertEquals(0640, e.mode() & 07777);
            assertEquals(1_600_000_000L, e.mtime());

            Path to = dir.resolve("out");
            FileRestore.Extracted x = k.extractFiles(FileRestore.GetRequest.of(root, "/etc", to.toString()));
            assertEquals(1, x.files());
            Path got = to.resolve("app/app.conf");
            assertEquals("answer = 42\n", Files.readString(got));
            assertEquals("rw-r-----", PosixFilePermissions.toString(Files.getPosixFilePermissions(got)));
            assertEquals(1_600_000_000_000L, Files.getLastModifiedTime(got).toMillis());

            // A path that climbs out, and a file that is not there.
            Path bad = dir.resolve("bad");
            assertThrows(InvalidInputException.class,
                    () -> k.extractFiles(FileRestore.GetRequest.of(root, "/etc/../../x", bad.toString())));
            assertThrows(NotFoundException.class, () -> k.listFiles(FileRestore.ListRequest.of(root).withPath("/nope")));
            // A file system index the volume does not have.
            assertThrows(InvalidInputException.class,
                    () -> k.extractFiles(FileRestore.GetRequest.of(root, "/etc", bad.toString()).withFs(fs.index() + 7)));
            assertThrows(NullPointerException.class, () -> FileRestore.GetRequest.of(root, null, bad.toString()));
            assertFalse(Files.exists(bad));
            assertTrue(Files.exists(store));
        }
    }

    /**
     * A backup by its file path, as CloudStack's agent has it: a full backup and an incremental on top of it (its
     * backing pointer absolute, as the agent writes it, the two in different directories) whose file changed; each
     * path gives its own content; the file system named by its device; both forms checked for nulls; a chain that
     * names a missing file refused naming it.
     */
    @Test
    void backupFilesByPathWithAnAbsoluteBackingPointer() throws Exception {
        Path tree = dir.resolve("tree");
        Files.createDirectories(tree.resolve("etc"));
        Path conf = tree.resolve("etc/app.conf");
        Files.writeString(conf, "version = 1\n", StandardCharsets.UTF_8);
        Path raw1 = dir.resolve("disk1.raw");
        Sh.run("mkfs.ext4", "-q", "-F", "-L", "agent", "-d", tree.toString(), raw1.toString(), "16M");
        Files.writeString(conf, "version = 2, longer\n", StandardCharsets.UTF_8);
        Path raw2 = dir.resolve("disk2.raw");
        Sh.run("mkfs.ext4", "-q", "-F", "-L", "agent", "-d", tree.toString(), raw2.toString(), "16M");
        Path full = dir.resolve("store/backups/vol/full");
        Path inc = dir.resolve("store/backups/vol2/inc");
        Files.createDirectories(full.getParent());
        Files.createDirectories(inc.getParent());
        Sh.run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw1.toString(), full.toString());
        Sh.run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-F", "qcow2", "-B", full.toAbsolutePath().toString(),
                raw2.toString(), inc.toString());

        try (Knib k = new Knib()) {
            FileRestore.Volume fullV = FileRestore.Volume.ofBackupFile(full.toAbsolutePath());
            FileRestore.Volume incV = FileRestore.Volume.ofBackupFile(inc.toAbsolutePath());
            assertEquals(Optional.of(inc.toAbsolutePath()), incV.backupFile());
            assertEquals(Optional.empty(), incV.store());
            assertEquals(incV, FileRestore.ListRequest.of(incV).withFs("/dev/sda").volume());

            FileRestore.Filesystem fs = k.listFilesystems(incV).filesystems().get(0);
            assertEquals("/dev/sda", fs.device(), "a file system on the whole disk");
            assertEquals("agent", fs.label());
            FileRestore.ListRequest etc = FileRestore.ListRequest.of(incV).withPath("/etc").withFs(fs.device());
            assertEquals(Optional.of("/dev/sda"), etc.fsDevice());
            assertEquals(OptionalInt.empty(), etc.fs());
            assertEquals(20L, k.listFiles(etc).entries().get(0).size());

            Path old = dir.resolve("old.conf");
            Path now = dir.resolve("new.conf");
            k.extractFiles(FileRestore.GetRequest.of(fullV, "/etc/app.conf", old.toString()).withFs("/dev/sda"));
            k.extractFiles(FileRestore.GetRequest.of(incV, "/etc/app.conf", now.toString()).withFs(fs.index()));
            assertEquals("version = 1\n", Files.readString(old));
            assertEquals("version = 2, longer\n", Files.readString(now));
            // An existing destination is left alone.
            InvalidInputException e = assertThrows(InvalidInputException.class,
                    () -> k.extractFiles(FileRestore.GetRequest.of(incV, "/etc/app.conf", old.toString())));
            assertTrue(e.getMessage().contains("already exists"), e.getMessage());
            assertEquals("version = 1\n", Files.readString(old));
            // A device the disk does not have.
            assertThrows(InvalidInputException.class, () -> k.listFiles(FileRestore.ListRequest.of(incV).withFs("/dev/sdb1")));

            // The chain's full backup gone: the error names it.
            Files.delete(full);
            NotFoundException nf = assertThrows(NotFoundException.class, () -> k.listFilesystems(incV));
            assertTrue(nf.getMessage().contains(full.toAbsolutePath().toString()), nf.getMessage());
        }
        assertThrows(NullPointerException.class, () -> FileRestore.Volume.ofBackupFile(null));
        assertThrows(NullPointerException.class, () -> new FileRestore.Volume(null, "b", "v"));
    }
}

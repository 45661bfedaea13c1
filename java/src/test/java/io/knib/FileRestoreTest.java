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

            FileRestore.Filesystems fss = k.listFilesystems(store.toString(), id, "root");
            assertEquals(1, fss.filesystems.size());
            assertEquals("ext4", fss.filesystems.get(0).type);
            assertEquals("jroot", fss.filesystems.get(0).label);

            FileRestore.Listing ls = k.listFiles(store.toString(), id, "root", null, "/etc/app");
            Map<String, FileRestore.Entry> byName = ls.entries.stream().collect(Collectors.toMap(e -> e.name, e -> e));
            FileRestore.Entry e = byName.get("app.conf");
            assertEquals("file", e.type);
            assertEquals(12L, e.size);
            assertEquals(0640, e.mode & 07777);
            assertEquals(1_600_000_000L, e.mtime);

            Path to = dir.resolve("out");
            FileRestore.Extracted x = k.extractFiles(store.toString(), id, "root", null, "/etc", to.toString());
            assertEquals(1, x.files);
            Path got = to.resolve("app/app.conf");
            assertEquals("answer = 42\n", Files.readString(got));
            assertEquals("rw-r-----", PosixFilePermissions.toString(Files.getPosixFilePermissions(got)));
            assertEquals(1_600_000_000_000L, Files.getLastModifiedTime(got).toMillis());

            // A path that climbs out, and a file that is not there.
            Path bad = dir.resolve("bad");
            assertThrows(InvalidInputException.class,
                    () -> k.extractFiles(store.toString(), id, "root", null, "/etc/../../x", bad.toString()));
            assertThrows(NotFoundException.class,
                    () -> k.listFiles(store.toString(), id, "root", null, "/nope"));
            assertFalse(Files.exists(bad));
            assertTrue(Files.exists(store));
        }
    }
}

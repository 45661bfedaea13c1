package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The vault from Java, against the real S3 server the tests run with (Ceph RGW, started by {@code
 * scripts/ceph.sh}, whose settings {@code scripts/test-all.sh} exports): a backup synced, listed, restored
 * from the bucket identical, and deleted.
 */
class VaultTest {
    static final long MIB = TestVm.MIB;

    @TempDir
    Path dir;

    /** The test bucket, from the exported S3 settings. */
    private static String bucket() {
        String b = System.getenv("KNIB_S3_BUCKET");
        if (b == null || System.getenv("AWS_ENDPOINT_URL") == null) {
            Assumptions.assumeFalse("1".equals(System.getenv("KNIB_NO_S3")), "KNIB_NO_S3=1: no S3 server");
            fail("no S3 server: start one with `bash scripts/ceph.sh start` and export its settings "
                    + "(eval \"$(bash scripts/ceph.sh env)\")");
        }
        return b;
    }

    @Test
    void aBackupSyncedToTheVaultRestoresFromItIdentical() throws Exception {
        String loc = "s3://" + bucket() + "/t-java-" + ProcessHandle.current().pid() + "-" + System.nanoTime();
        Path disk = dir.resolve("root.qcow2");
        Sh.qcow2(disk, 16 * MIB);
        Sh.write(disk, 0x31, 0, 9 * MIB);
        Path reference = dir.resolve("reference.qcow2");
        Sh.flatten(disk, reference);
        Path store = dir.resolve("store");
        try (Knib k = new Knib()) {
            JsonObject backup = new JsonObject();
            backup.addProperty("store", store.toString());
            backup.addProperty("vm", "web");
            JsonArray disks = new JsonArray();
            JsonObject root = new JsonObject();
            root.addProperty("name", "root");
            root.addProperty("path", disk.toString());
            disks.add(root);
            backup.add("disks", disks);
            String id = JsonParser.parseString(k.call("backup", backup.toString())).getAsJsonObject().get("id").getAsString();

            VaultSync.Report r = k.sync(new VaultSync.Request(store.toString(), loc).withVm("web"));
            assertEquals(List.of(id), r.sent());
            assertTrue(r.bytesSent() > 9 * MIB);
            assertEquals(List.of(), k.sync(new VaultSync.Request(store.toString(), loc)).sent(), "nothing is sent twice");
            VaultSync.Report checked = k.sync(new VaultSync.Request(store.toString(), loc).withCheck(true));
            assertEquals(r.bytesSent(), checked.bytesChecked(), "every object sent is read back and checked");
            assertEquals(List.of(), checked.repaired());
            assertEquals(0, k.sync(new VaultSync.Request(store.toString(), loc)).bytesChecked());

            JsonObject list = new JsonObject();
            list.addProperty("store", loc);
            JsonArray listed = JsonParser.parseString(k.call("list", list.toString())).getAsJsonArray();
            assertEquals(1, listed.size());
            assertEquals(id, listed.get(0).getAsJsonObject().get("id").getAsString());

            Path restored = dir.resolve("restored.qcow2");
            JsonObject restore = new JsonObject();
            restore.addProperty("store", loc);
            restore.addProperty("backup", id);
            restore.addProperty("volume", "root");
            restore.addProperty("to", restored.toString());
            k.call("restore", restore.toString());
            assertTrue(Sh.identical(restored, reference), "the restore from the vault is the disk");

            JsonObject delete = new JsonObject();
            delete.addProperty("store", loc);
            delete.addProperty("backup", id);
            k.call("delete", delete.toString());
            assertEquals(0, JsonParser.parseString(k.call("list", list.toString())).getAsJsonArray().size());
        }
    }
}

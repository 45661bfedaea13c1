package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * A VM's backup method from Java: {@link Knib#vmSettings} sets and reads it in a real store; the agent's
 * {@link TakeBackup.Request} and {@link CleanupVmBackup.Request} carry it.
 */
class VmSettingsTest {
    @TempDir
    Path dir;

    @Test
    void theBackupMethodIsSetAndReadBack() throws Exception {
        Path store = dir.resolve("store");
        try (Knib k = new Knib()) {
            VmSettings.Settings set = k.vmSettings(new VmSettings.Request(store.toString(), "web").withBackupMethod("bitmap"));
            assertEquals("bitmap", set.backupMethod());
            assertTrue(Files.isRegularFile(store.resolve("vms/web/settings.json")));
            assertEquals("bitmap", k.vmSettings(new VmSettings.Request(store.toString(), "web")).backupMethod());
            assertEquals("snapshot", k.vmSettings(new VmSettings.Request(store.toString(), "db")).backupMethod(),
                    "a VM without settings has the default");
            InvalidInputException e = assertThrows(InvalidInputException.class,
                    () -> k.vmSettings(new VmSettings.Request(store.toString(), "web").withBackupMethod("bitmaps")));
            assertTrue(e.getMessage().contains("bitmaps"), e.getMessage());
            assertEquals("bitmap", k.vmSettings(new VmSettings.Request(store.toString(), "web")).backupMethod(),
                    "a refused request changes nothing");
        }
    }

    @Test
    void theAgentRequestsCarryTheMethod() {
        TakeBackup.Request take = TakeBackup.Request.builder().domain("d").method("bitmap")
                .volume(new TakeBackup.Volume("u", "/a", "/b", "/c")).build();
        JsonObject j = Json.GSON.toJsonTree(take).getAsJsonObject();
        assertEquals("bitmap", j.get("method").getAsString());
        JsonObject c = Json.GSON.toJsonTree(CleanupVmBackup.Request.of(take)).getAsJsonObject();
        assertEquals("bitmap", c.get("method").getAsString(), "a cleanup keeps the failed backup's method");
        JsonObject plain = Json.GSON.toJsonTree(TakeBackup.Request.builder().domain("d").build()).getAsJsonObject();
        assertFalse(plain.has("method"), "no method: the default, snapshot");
    }
}

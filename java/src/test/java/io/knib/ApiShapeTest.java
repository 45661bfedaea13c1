package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import java.lang.reflect.Field;
import java.lang.reflect.Modifier;
import java.net.URI;
import java.util.ArrayList;
import java.util.Enumeration;
import java.util.List;
import java.util.jar.JarEntry;
import java.util.jar.JarFile;
import org.junit.jupiter.api.Test;

/** The shape of the Java API: immutable requests and answers, the JSON names, every resource closeable. */
class ApiShapeTest {
    /** Every class of package io.knib, read from the jar the tests run against. */
    static List<Class<?>> knibClasses() throws Exception {
        URI jar = Knib.class.getProtectionDomain().getCodeSource().getLocation().toURI();
        List<Class<?>> out = new ArrayList<>();
        try (JarFile f = new JarFile(new java.io.File(jar))) {
            for (Enumeration<JarEntry> e = f.entries(); e.hasMoreElements(); ) {
                String n = e.nextElement().getName();
                if (n.startsWith("io/knib/") && n.endsWith(".class") && !n.contains("-")) {
                    out.add(Class.forName(n.substring(0, n.length() - 6).replace('/', '.')));
                }
            }
        }
        assertTrue(out.size() > 30, "classes: " + out);
        return out;
    }

    @Test
    void noClassHasAPublicFieldAndRequestsAndAnswersHaveOnlyFinalOnes() throws Exception {
        List<String> problems = new ArrayList<>();
        int requests = 0;
        for (Class<?> c : knibClasses()) {
            for (Field f : c.getDeclaredFields()) {
                int m = f.getModifiers();
                if (f.isSynthetic() || (Modifier.isStatic(m) && Modifier.isFinal(m))) {
                    continue;
                }
                if (Modifier.isPublic(m)) {
                    problems.add(c.getName() + "." + f.getName() + " is public");
                }
                // A builder is the one mutable thing a caller holds; what it builds is not.
                boolean builder = c.getSimpleName().equals("Builder");
                boolean exchanged = c.isRecord() || c.getEnclosingClass() != null && c.getEnclosingClass() != Knib.class;
                if (exchanged && !builder && !Modifier.isFinal(m)) {
                    problems.add(c.getName() + "." + f.getName() + " is not final");
                }
            }
            if (c.getSimpleName().endsWith("Request") || c == FileRestore.Volume.class) {
                requests++;
            }
        }
        assertTrue(problems.isEmpty(), String.join("\n", problems));
        assertEquals(26, requests, "one request type per operation of the facade");
    }

    @Test
    void requestsAreRecordsOrFinalClassesAndTheirListsCannotBeChanged() {
        for (Class<?> c : List.of(TakeBackup.Request.class, CompressBackup.Request.class, FinalizeCompression.Request.class,
                RestoreBackup.Request.class, ConsolidateVolumes.Request.class, PrepareValidation.Request.class,
                ValidateVm.Request.class, TakeBackupHash.Request.class, CleanupValidation.Request.class,
                CleanupVmBackup.Request.class, MergeSnapshot.Request.class, GroupBackup.Request.class,
                GroupBackup.Member.class, GroupBackup.Disk.class, GroupBackup.ListRequest.class,
                GroupBackup.ShowRequest.class, GroupBackup.RestoreRequest.class, GroupBackup.DeleteRequest.class,
                GroupBackup.RecoverRequest.class, Jobs.QueueRequest.class, Jobs.ListRequest.class,
                Jobs.ShowRequest.class, Jobs.CancelRequest.class)) {
            assertTrue(c.isRecord(), c + " is a record");
        }
        // Two forms, no nullable positional argument: a final class.
        assertTrue(Modifier.isFinal(FileRestore.Volume.class.getModifiers()));
        assertTrue(Modifier.isFinal(FileRestore.ListRequest.class.getModifiers()));
        assertTrue(Modifier.isFinal(FileRestore.GetRequest.class.getModifiers()));
        List<TakeBackup.Volume> given = new ArrayList<>();
        given.add(new TakeBackup.Volume("u", "/a", "/b", "/c"));
        TakeBackup.Request r = TakeBackup.Request.builder().domain("d").volumes(given).build();
        given.clear();
        assertEquals(1, r.volumes().size(), "the request copied the list");
        assertThrows(UnsupportedOperationException.class, () -> r.volumes().add(null));
        // A builder used again makes a new request and leaves the first alone.
        TakeBackup.Request.Builder b = TakeBackup.Request.builder().domain("d");
        TakeBackup.Request first = b.build();
        b.domain("e").volume(new TakeBackup.Volume("u", "/a", "/b", "/c"));
        assertEquals("d", first.domain());
        assertEquals(List.of(), first.volumes());
    }

    @Test
    void requestsWriteTheSchemasSnakeCaseNamesAndNoOthers() {
        TakeBackup.Volume v = new TakeBackup.Volume("u", "/a", "/b", "/c")
                .withParentBackupPath("/p")
                .withMerge(new TakeBackup.MergeTree("/base", "/a"));
        JsonObject j = Json.GSON.toJsonTree(TakeBackup.Request.builder().domain("d").endOfChain(true).volume(v).build())
                .getAsJsonObject();
        assertEquals("d", j.get("domain").getAsString());
        assertTrue(j.get("end_of_chain").getAsBoolean());
        assertFalse(j.has("connect"), "null fields are left out");
        JsonObject vol = j.getAsJsonArray("volumes").get(0).getAsJsonObject();
        assertEquals("/b", vol.get("delta_path_on_primary").getAsString());
        assertEquals("/p", vol.get("parent_backup_path").getAsString());
        assertEquals("/base", vol.getAsJsonObject("merge").get("parent").getAsString());

        FileRestore.Volume root = new FileRestore.Volume("/s", "b1", "root");
        JsonObject ls = Json.GSON.toJsonTree(FileRestore.ListRequest.of(root).withFs(2)).getAsJsonObject();
        assertEquals("{\"store\":\"/s\",\"backup\":\"b1\",\"volume\":\"root\",\"fs\":2}", ls.toString());
        JsonObject get = Json.GSON.toJsonTree(FileRestore.GetRequest.of(root, "/etc", "/out")).getAsJsonObject();
        assertEquals("{\"store\":\"/s\",\"backup\":\"b1\",\"volume\":\"root\",\"path\":\"/etc\",\"to\":\"/out\"}", get.toString());
        FileRestore.Volume file = FileRestore.Volume.ofBackupFile(java.nio.file.Path.of("/mnt/s/b2/v"));
        assertEquals("{\"backup_path\":\"/mnt/s/b2/v\"}", Json.GSON.toJson(file));
        JsonObject byDevice = Json.GSON.toJsonTree(FileRestore.GetRequest.of(file, "/etc", "/out").withFs("/dev/sda1"))
                .getAsJsonObject();
        assertEquals("{\"backup_path\":\"/mnt/s/b2/v\",\"fs\":\"/dev/sda1\",\"path\":\"/etc\",\"to\":\"/out\"}",
                byDevice.toString());

        GroupBackup.Request g = GroupBackup.Request.builder().store("/s").domain("web")
                .member(GroupBackup.Member.plain("db", List.of(new GroupBackup.Disk("root", "/d/root.qcow2"))))
                .freezeTimeoutSecs(5L).onFailure("rollback").build();
        assertEquals("{\"store\":\"/s\",\"members\":[{\"domain\":\"web\",\"disks\":[]},"
                + "{\"vm\":\"db\",\"disks\":[{\"name\":\"root\",\"path\":\"/d/root.qcow2\"}]}],"
                + "\"quiesce\":false,\"freeze_timeout_secs\":5,\"on_failure\":\"rollback\",\"full\":false,"
                + "\"check_output\":false}",
                Json.GSON.toJson(g));
        assertEquals("{\"store\":\"/s\",\"group\":\"g1\",\"to\":\"/r\",\"format\":\"raw\",\"quick\":false,\"no_verify\":true,"
                + "\"partial\":false}",
                Json.GSON.toJson(GroupBackup.RestoreRequest.of("/s", "g1", "/r").withFormat("raw").withNoVerify(true)));
        assertEquals("{\"store\":\"/s\",\"group\":\"g1\",\"to\":\"/r\",\"quick\":false,\"no_verify\":false,\"partial\":true}",
                Json.GSON.toJson(GroupBackup.RestoreRequest.of("/s", "g1", "/r").withPartial(true)));
    }

    @Test
    void answersAreReadOnly() {
        TakeBackup.Answer a = Json.GSON.fromJson(
                "{\"kind\":\"full\",\"vm_consistent\":true,\"volumes\":[{\"uuid\":\"u\",\"new_volume_path\":\"/n\",\"size\":7}]}",
                TakeBackup.Answer.class);
        assertEquals("full", a.kind());
        assertTrue(a.vmConsistent());
        assertEquals(7, a.volumes().get(0).size());
        assertEquals("/n", a.newVolumePaths().get("u"));
        assertThrows(UnsupportedOperationException.class, () -> a.volumes().clear());
        assertEquals(List.of(), Json.GSON.fromJson("{}", RestoreBackup.Answer.class).removed());
    }

    @Test
    void everyClassHoldingANativeResourceIsAutoCloseable() throws Exception {
        // Knib holds the one native handle (a context); nothing else of the API does.
        for (Class<?> c : knibClasses()) {
            for (Field f : c.getDeclaredFields()) {
                boolean handle = f.getType() == long.class && f.getName().toLowerCase().contains("handle")
                        || f.getType().getSimpleName().equals("Handle");
                if (handle && !Modifier.isStatic(f.getModifiers())) {
                    Class<?> owner = c.getEnclosingClass() != null ? c.getEnclosingClass() : c;
                    assertTrue(AutoCloseable.class.isAssignableFrom(owner), owner + " holds " + f + " and is not AutoCloseable");
                }
            }
        }
        assertTrue(AutoCloseable.class.isAssignableFrom(Knib.class));
    }
}

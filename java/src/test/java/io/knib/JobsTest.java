package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The store's job queue from Java, on a real store and the real qemu-img: {@link Knib#jobsQueue}, {@link
 * Knib#jobsList}, {@link Knib#jobsShow}, {@link Knib#jobsCancel}; the job as its file holds it; each error's
 * exception.
 */
class JobsTest {
    static final long MIB = 1 << 20;

    @TempDir
    Path dir;

    @Test
    void aJobIsQueuedListedShownAndCancelledAndBadRequestsAreRefused() throws Exception {
        Path disk = dir.resolve("root.qcow2");
        Sh.qcow2(disk, 16 * MIB);
        Sh.write(disk, 0x41, 0, 2 * MIB);
        String store = dir.resolve("store").toString();
        try (Knib k = new Knib()) {
            JsonObject req = new JsonObject();
            req.addProperty("store", store);
            req.addProperty("vm", "web");
            req.add("disks", JsonParser.parseString("[{\"name\": \"root\", \"path\": \"" + disk + "\"}]"));
            String backup = JsonParser.parseString(k.call("backup", req.toString())).getAsJsonObject().get("id").getAsString();

            assertEquals(List.of(), k.jobsList(new Jobs.ListRequest(store)));
            Jobs.Job q = k.jobsQueue(Jobs.QueueRequest.compress(store, backup));
            assertEquals("compress", q.kind());
            assertEquals("queued", q.state());
            assertEquals("web", q.vm());
            assertEquals(backup, q.backup());
            assertEquals(0, q.attempts());
            assertNull(q.owner());
            assertNull(q.ownerStatus());
            assertNull(q.finishedAt());
            assertTrue(Files.isRegularFile(Path.of(store, "jobs", q.id() + ".json")), "the job is a file of the store");

            List<Jobs.Job> list = k.jobsList(new Jobs.ListRequest(store));
            assertEquals(List.of(q.id()), list.stream().map(Jobs.Job::id).toList());
            assertThrows(UnsupportedOperationException.class, () -> list.clear());
            assertEquals(q.createdAt(), k.jobsShow(new Jobs.ShowRequest(store, q.id())).createdAt());

            // A second compression of the backup, and requests that name nothing.
            InvalidInputException twice = assertThrows(InvalidInputException.class,
                    () -> k.jobsQueue(Jobs.QueueRequest.compress(store, backup)));
            assertTrue(twice.getMessage().contains(backup), twice.getMessage());
            assertThrows(NotFoundException.class, () -> k.jobsQueue(Jobs.QueueRequest.validate(store, "20990101-000000000-0000")));
            assertThrows(NotFoundException.class, () -> k.jobsShow(new Jobs.ShowRequest(store, "compress-20990101-000000000-0000")));
            assertThrows(InvalidInputException.class, () -> k.jobsShow(new Jobs.ShowRequest(store, "../knib")));
            InvalidInputException noVault = assertThrows(InvalidInputException.class,
                    () -> k.jobsQueue(Jobs.QueueRequest.sync(store, "web")));
            assertTrue(noVault.getMessage().contains("has no vault for sync jobs"), noVault.getMessage());
            assertThrows(InvalidInputException.class,
                    () -> k.jobsQueue(new Jobs.QueueRequest(store, "validate", backup, "web")));

            Jobs.Job c = k.jobsCancel(Jobs.CancelRequest.of(store, q.id()).withWaitSecs(1L));
            assertEquals("cancelled", c.state());
            assertEquals("cancelled by the operator before it ran", c.lastError());
            assertNotNull(c.finishedAt());
            assertEquals("cancelled", k.jobsShow(new Jobs.ShowRequest(store, q.id())).state());

            // A validation job, queued after the cancelled compression.
            Jobs.Job v = k.jobsQueue(Jobs.QueueRequest.validate(store, backup));
            assertEquals("validate", v.kind());
            assertEquals(2, k.jobsList(new Jobs.ListRequest(store)).size());

            // Held by a runner of another host, as its job file says: its owner and status read, a cancel
            // that waits no time is busy, one with force cancels it.
            Path file = Path.of(store, "jobs", v.id() + ".json");
            JsonObject j = JsonParser.parseString(Files.readString(file)).getAsJsonObject();
            j.addProperty("state", "running");
            j.add("owner", JsonParser.parseString(
                    "{\"pid\": 4242, \"hostname\": \"other-host.example\", \"started_at\": 7, \"pid_start\": 99}"));
            Files.writeString(file, j.toString());
            Jobs.Job running = k.jobsShow(new Jobs.ShowRequest(store, v.id()));
            assertEquals("running", running.state());
            assertEquals("other_host", running.ownerStatus());
            assertEquals(4242, running.owner().pid());
            assertEquals("other-host.example", running.owner().hostname());
            assertEquals(7, running.owner().startedAt());
            assertEquals(99L, running.owner().pidStart());
            assertNull(running.owner().bootId());
            assertThrows(BusyException.class, () -> k.jobsCancel(Jobs.CancelRequest.of(store, v.id()).withWaitSecs(0L)));
            Jobs.Job forced = k.jobsCancel(Jobs.CancelRequest.of(store, v.id()).withWaitSecs(0L).withForce(true));
            assertEquals("cancelled", forced.state());
            assertNull(forced.owner());
            assertNull(forced.ownerStatus());
            assertTrue(forced.lastError().startsWith("cancelled by the operator with force"), forced.lastError());
        }
    }
}

package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Group backups from Java, for real: two running domains backed up at one instant, restored, listed, deleted. */
class GroupBackupTest {
    static final long MIB = TestVm.MIB;

    @TempDir
    Path dir;

    private final List<TestVm> vms = new ArrayList<>();

    @AfterEach
    void removeDomains() {
        vms.forEach(TestVm::close);
    }

    private TestVm track(TestVm vm) {
        vms.add(vm);
        return vm;
    }

    @Test
    void twoRunningDomainsBackedUpAsAGroupAreRestoredByteIdenticalThenListedShownAndDeleted() throws Exception {
        TestVm web = track(TestVm.running(dir, "vda"));
        TestVm db = track(TestVm.running(dir, "vda", "vdb"));
        web.write("vda", 0x31, 0, MIB);
        web.write("vda", 0x32, 20 * MIB, 256 * 1024);
        db.write("vda", 0x41, 2 * MIB, MIB);
        db.write("vdb", 0x42, 40 * MIB, 512 * 1024);
        // What each disk holds at the backup, flattened (after QEMU wrote out what it holds).
        Map<String, Path> refs = new LinkedHashMap<>();
        for (TestVm vm : List.of(web, db)) {
            for (String t : vm.disks.keySet()) {
                vm.flush(t);
                Path ref = dir.resolve("ref-" + vm.name + "-" + t + ".qcow2");
                Sh.flatten(vm.activeFile(t), ref);
                refs.put(vm.name + "/" + t, ref);
            }
        }
        String store = dir.resolve("store").toString();

        try (Knib k = new Knib()) {
            GroupBackup.Group g = k.groupBackup(GroupBackup.Request.builder()
                    .store(store).domain(web.name).domain(db.name).connect(TestVm.URI).freezeTimeoutSecs(20L).build());
            assertEquals(1, g.schema());
            assertTrue(g.id().startsWith("group-"), g.id());
            assertEquals("complete", g.state());
            assertEquals("keep", g.onFailure());
            assertFalse(g.quiesce());
            assertFalse(g.recovered());
            assertNotNull(g.instant(), "the group's instant");
            assertNotNull(g.snapshotSkewMs());
            assertTrue(g.snapshotSkewMs() >= 0, "skew " + g.snapshotSkewMs());
            assertNull(g.freezeToThawMs(), "no guest was frozen");
            assertEquals(List.of(web.name, db.name), g.members().stream().map(GroupBackup.MemberResult::vm).toList());
            for (GroupBackup.MemberResult m : g.members()) {
                assertTrue(m.domain(), m.vm());
                assertTrue(m.running(), m.vm());
                assertFalse(m.quiesced(), m.vm());
                assertNotNull(m.backup(), m.vm());
                assertNotNull(m.snapshotAt(), m.vm());
                assertNull(m.error(), m.vm());
                assertTrue(m.snapshotAt().compareTo(g.instant()) <= 0, "the instant is the last snapshot");
            }
            assertThrows(UnsupportedOperationException.class, () -> g.members().clear());

            // The guests write on after the backup; the restore is what they held at it.
            web.write("vda", 0x51, 0, 64 * 1024);
            db.write("vdb", 0x52, 40 * MIB, 64 * 1024);

            Path to = dir.resolve("restored");
            GroupBackup.Restored r = k.groupRestore(GroupBackup.RestoreRequest.of(store, g.id(), to.toString()));
            assertEquals(3, r.volumes().size());
            assertEquals(List.of(), r.skipped(), "a complete group leaves no member out");
            for (GroupBackup.RestoredVolume v : r.volumes()) {
                Path ref = refs.get(v.vm() + "/" + v.volume());
                assertNotNull(ref, v.vm() + "/" + v.volume() + " is a disk of the group");
                assertEquals(to.resolve(v.vm()).resolve(v.volume() + ".qcow2").toString(), v.path());
                String backup = g.members().stream().filter(m -> m.vm().equals(v.vm())).findFirst().orElseThrow().backup();
                assertEquals(backup, v.backup());
                assertNull(Sh.backing(Path.of(v.path())), "a restore is flattened");
                assertTrue(Sh.identical(Path.of(v.path()), ref), v.path() + " is the disk at the backup");
            }
            assertTrue(Sh.has(Path.of(r.volumes().get(0).path()), 0x31, 0, 64 * 1024), "not the write after the backup");

            List<GroupBackup.Group> list = k.groupList(new GroupBackup.ListRequest(store));
            assertEquals(List.of(g.id()), list.stream().map(GroupBackup.Group::id).toList());
            assertThrows(UnsupportedOperationException.class, () -> list.clear());
            GroupBackup.Group shown = k.groupShow(new GroupBackup.ShowRequest(store, g.id()));
            assertEquals(g.instant(), shown.instant());
            assertEquals(g.snapshotSkewMs(), shown.snapshotSkewMs());
            assertEquals(g.members().get(1).backup(), shown.members().get(1).backup());
            assertEquals(List.of(), k.groupRecover(new GroupBackup.RecoverRequest(store, TestVm.URI)),
                    "nothing was interrupted");

            GroupBackup.Deleted d = k.groupDelete(new GroupBackup.DeleteRequest(store, g.id()));
            assertEquals(2, d.members().size());
            for (int i = 0; i < 2; i++) {
                assertEquals(List.of(g.members().get(i).backup()), d.members().get(i).expunged());
                assertEquals(List.of(), d.members().get(i).markedRemoved());
                assertEquals(Optional.empty(), d.members().get(i).keptBecause());
            }
            assertEquals(List.of(), k.groupList(new GroupBackup.ListRequest(store)));
            assertThrows(NotFoundException.class, () -> k.groupShow(new GroupBackup.ShowRequest(store, g.id())));
        }
        // The domains run on, and read what they wrote.
        assertTrue(web.reads("vda", 0x51, 0, 64 * 1024));
        assertTrue(db.reads("vdb", 0x42, 40 * MIB + 64 * 1024, 448 * 1024));
    }

    @Test
    void aGroupOfOneVmIsRefusedAsInvalidInput() throws Exception {
        try (Knib k = new Knib()) {
            KnibException e = assertThrows(InvalidInputException.class, () -> k.groupBackup(
                    GroupBackup.Request.builder().store(dir.resolve("s").toString()).domain("only-one").build()));
            assertTrue(e.getMessage().contains("at least two VMs"), e.getMessage());
        }
    }

    @Test
    void checkOutputWithoutCompressionIsRefusedAsInvalidInput() throws Exception {
        try (Knib k = new Knib()) {
            KnibException e = assertThrows(InvalidInputException.class, () -> k.groupBackup(
                    GroupBackup.Request.builder().store(dir.resolve("s").toString()).domain("a").domain("b")
                            .checkOutput(true).build()));
            assertEquals("invalid input: request of group.backup: field `check_output` goes with `compress` (it reads "
                    + "the compressed files back)", e.getMessage());
        }
    }
}

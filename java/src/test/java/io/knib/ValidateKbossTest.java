package io.knib;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.Base64;
import java.util.List;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Validation as the KBOSS agent validates (issue 14 §3): the management server makes the validation VM's volume,
 * {@code prepareValidation} turns it into an overlay of the backup, the management server starts the VM (a
 * transient domain on the Debian-built test guest, which runs the QEMU guest agent), and {@code validateVm}
 * validates that running domain by name: a script with comma-split arguments, its timeout, the screenshot named and
 * answered as the agent does, {@code scriptResult} as the agent's; {@code cleanupValidation} does nothing.
 */
class ValidateKbossTest {
    private static final byte[] PNG_MAGIC = {(byte) 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

    @TempDir
    Path dir;

    private String domain;

    @AfterEach
    void destroyDomain() {
        if (domain != null) {
            Sh.exec(List.of("virsh", "-q", "-c", TestVm.URI, "destroy", domain));
        }
    }

    /** The test guest, built from Debian packages by scripts/build-test-guest.sh (cached). */
    private static Path guest() {
        String env = System.getenv("KNIB_TEST_GUEST_DIR");
        Path out = Path.of(env != null ? env : "/var/tmp/knib-test-guest");
        Sh.run("bash", Path.of("scripts/build-test-guest.sh").toAbsolutePath().toString(), out.toString());
        return out;
    }

    /** kvm unless the host's KVM is PVM (an ordinary kernel crawls there) or absent. */
    private static String domainType() {
        boolean kvm = Files.exists(Path.of("/dev/kvm"));
        boolean pvm = Files.exists(Path.of("/sys/module/kvm_pvm")) && !Files.exists(Path.of("/sys/module/kvm_intel"))
                && !Files.exists(Path.of("/sys/module/kvm_amd"));
        return kvm && !pvm ? "kvm" : "qemu";
    }

    /** The management server starts the validation VM: a transient domain on {@code volume}. */
    private void startValidationVm(Path guest, Path volume) throws Exception {
        domain = TestVm.newName();
        String cmdline = Files.readString(guest.resolve("cmdline")).trim();
        String xml = "<domain type='" + domainType() + "'><name>" + domain + "</name>"
                + "<memory unit='MiB'>256</memory><vcpu>1</vcpu>"
                + "<os><type>hvm</type><kernel>" + guest.resolve("vmlinuz") + "</kernel><initrd>"
                + guest.resolve("initrd.img") + "</initrd><cmdline>" + cmdline + "</cmdline></os>"
                + "<features><acpi/><apic/></features><devices>"
                + "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='" + volume
                + "'/><target dev='vda' bus='virtio'/></disk>"
                + "<serial type='pty'/><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
                + "</channel><video><model type='vga'/></video><memballoon model='none'/></devices>"
                + "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>";
        Path x = dir.resolve("validation-vm.xml");
        Files.writeString(x, xml);
        Sh.run("virsh", "-q", "-c", TestVm.URI, "create", x.toString());
    }

    private boolean running() {
        return Sh.run("virsh", "-c", TestVm.URI, "domstate", domain).trim().equals("running");
    }

    @Test
    void theRunningValidationVmIsValidatedAsTheAgentDoes() throws Exception {
        Path guest = guest();
        Path storeRoot = dir.resolve("mnt-store");
        Path backup = storeRoot.resolve("backups/2/7/0b1c2d3e");
        Files.createDirectories(backup.getParent());
        Files.copy(guest.resolve("disk.qcow2"), backup);
        byte[] backupBytes = Files.readAllBytes(backup);
        Path volume = dir.resolve("primary/5e6f7a8b");
        Files.createDirectories(volume.getParent());
        Sh.qcow2(volume, 64 * TestVm.MIB);

        try (Knib knib = new Knib()) {
            PrepareValidation.Answer prepared = knib.prepareValidation(new PrepareValidation.Request("v-7", null,
                    List.of(new PrepareValidation.Volume("5e6f7a8b", backup.toString(), volume.toString()))));
            assertEquals(volume.toString(), prepared.volumes().get(0).overlayPath());
            assertEquals(backup.toRealPath().toString(), Sh.backing(volume));
            startValidationVm(guest, volume);

            // Boot, a screenshot after its wait, a script that prints and exits 3.
            ValidateVm.Request.Builder base = ValidateVm.Request.builder()
                    .vmName("v-7")
                    .domain(domain)
                    .bootTimeoutSecs(300)
                    .executeScript(true)
                    .script("/bin/sh")
                    .scriptArguments("-c,echo a b; exit 3")
                    .scriptTimeoutSecs(30L);
            ValidateVm.Answer a = knib.validateVm(base.takeScreenshot(true)
                    .screenshotWaitSecs(1)
                    .screenshotNextTo(backup.toString())
                    .storeRoot(storeRoot.toString())
                    .expectedResult("0")
                    .build());
            String outB64 = Base64.getEncoder().encodeToString("a b\n".getBytes(StandardCharsets.UTF_8));
            assertTrue(a.bootValidated(), a.problems().toString());
            assertEquals(outB64, a.scriptResult(), "the output in base64, as the agent answers");
            assertEquals(3L, a.scriptExitCode());
            assertEquals("a b\n", a.scriptOutput());
            assertFalse(a.passed());
            String rel = a.screenshotStorePath();
            assertNotNull(rel);
            assertTrue(rel.startsWith("backups/2/7/0b1c2d3e-screenshot-") && rel.endsWith(".png"), rel);
            Path shot = storeRoot.resolve(rel);
            assertEquals(shot.toString(), a.screenshotPath());
            assertArrayEquals(PNG_MAGIC, Arrays.copyOf(Files.readAllBytes(shot), PNG_MAGIC.length));

            // No screenshot from here on; the wrapper still sets where one would go (the
            // offering's steps decide takeScreenshot only), and none is taken.
            base.takeScreenshot(false).screenshotWaitSecs(0);
            // The output expected in base64, as the management server keeps it: matched, null.
            a = knib.validateVm(base.expectedResult(outB64).build());
            assertNull(a.scriptResult());
            assertTrue(a.passed(), a.problems().toString());
            assertNull(a.screenshotPath(), "no screenshot step, no screenshot");
            assertNull(a.screenshotStorePath());
            // "0" matches an exit code of 0.
            a = knib.validateVm(base.scriptArguments("-c,exit 0").expectedResult(null).build());
            assertNull(a.scriptResult());
            // A script that outlives its timeout.
            long started = System.nanoTime();
            a = knib.validateVm(base.script("/bin/sleep").scriptArguments("60").scriptTimeoutSecs(2L).build());
            assertEquals("Timeout", a.scriptResult());
            assertTrue(System.nanoTime() - started < 30_000_000_000L, "the timeout was not honoured");
            // A program the guest does not have: the error.
            a = knib.validateVm(base.script("/no/such/program").scriptArguments(null).build());
            assertNotNull(a.scriptResult());
            assertNotEquals("Timeout", a.scriptResult());
            assertFalse(a.passed());

            // knib created, changed and destroyed nothing.
            assertTrue(running(), "the validation VM was stopped");
            assertArrayEquals(backupBytes, Files.readAllBytes(backup), "the backup changed");

            // As the agent, the clean-up does nothing.
            CleanupValidation.Answer c = knib.cleanupValidation(new CleanupValidation.Request(domain));
            assertFalse(c.domainRemoved());
            assertTrue(c.removed().isEmpty());
            assertTrue(running());
            assertTrue(Files.exists(volume));
        }
    }

    /**
     * {@code maxWriteMib} reaches knib as {@code max_write_mib} (the boot test's write limit, which the Rust test
     * {@code a_guest_writing_past_its_limit_is_stopped_and_the_test_fails} holds a throwaway domain to): it is for a
     * throwaway domain, so with {@code domain} the request is refused, naming it, before anything runs.
     */
    @Test
    void theWriteLimitIsSentAndIsForAThrowawayDomain() throws Exception {
        try (Knib knib = new Knib()) {
            InvalidInputException e = assertThrows(InvalidInputException.class,
                    () -> knib.validateVm(ValidateVm.Request.builder().domain("v").maxWriteMib(8L).build()));
            assertTrue(e.getMessage().contains("`max_write_mib` is for a throwaway domain"), e.getMessage());
            e = assertThrows(InvalidInputException.class, () -> knib.validateVm(ValidateVm.Request.builder()
                    .disk(new ValidateVm.Disk("vda", dir.resolve("d").toString())).workDir(dir.toString())
                    .maxWriteMib(0L).build()));
            assertTrue(e.getMessage().contains("`max_write_mib` must be from 1 to 1048576"), e.getMessage());
        }
    }
}

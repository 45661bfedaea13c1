package io.knib;

import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * A throwaway libvirt domain on {@code qemu:///system} with no operating system (it sits in the firmware)
 * and qcow2 virtio disks, named {@code knib-jtest-<pid>-<n>}; destroyed and undefined by {@link #close()}.
 * Guest writes are injected through the QEMU monitor ({@code qemu-io -d <device>}), as the guest would make
 * them; their results are read from the domain's log.
 */
final class TestVm implements AutoCloseable {
    static final String URI = "qemu:///system";
    static final long MIB = 1L << 20;
    private static final AtomicInteger COUNTER = new AtomicInteger();

    final String name;
    final Map<String, Path> disks = new LinkedHashMap<>();
    private final boolean persistent;

    private TestVm(String name, boolean persistent) {
        this.name = name;
        this.persistent = persistent;
    }

    /** A running transient domain with one new disk per target (64 MiB each) in {@code dir}. */
    static TestVm running(Path dir, String... targets) {
        return make(dir, false, true, targets);
    }

    /** A defined, stopped domain with one new disk per target (16 MiB each) in {@code dir}. */
    static TestVm stopped(Path dir, String... targets) {
        return make(dir, true, false, targets);
    }

    /** A running transient domain on existing qcow2 files. */
    static TestVm runningOn(Map<String, Path> files) {
        TestVm vm = new TestVm(newName(), false);
        vm.disks.putAll(files);
        vm.start(false);
        return vm;
    }

    static String newName() {
        return "knib-jtest-" + ProcessHandle.current().pid() + "-" + COUNTER.getAndIncrement();
    }

    private static TestVm make(Path dir, boolean persistent, boolean running, String... targets) {
        TestVm vm = new TestVm(newName(), persistent);
        for (String t : targets) {
            Path f = dir.resolve(vm.name + "-" + t + ".qcow2");
            Sh.qcow2(f, running ? 64 * MIB : 16 * MIB);
            vm.disks.put(t, f);
        }
        vm.start(persistent && !running);
        return vm;
    }

    private void start(boolean defineOnly) {
        String kind = Files.exists(Path.of("/dev/kvm")) ? "kvm" : "qemu";
        StringBuilder devices = new StringBuilder();
        for (Map.Entry<String, Path> d : disks.entrySet()) {
            devices.append("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='")
                    .append(d.getValue()).append("'/><target dev='").append(d.getKey()).append("' bus='virtio'/></disk>\n");
        }
        String xml = "<domain type='" + kind + "'><name>" + name + "</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
                + "<os><type>hvm</type><boot dev='hd'/></os><devices>\n" + devices
                + "<serial type='pty'/><memballoon model='none'/></devices>"
                + "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>";
        try {
            Path x = Files.createTempFile("knib-jtest-", ".xml");
            Files.writeString(x, xml);
            try {
                Sh.run("virsh", "-q", "-c", URI, defineOnly ? "define" : "create", x.toString());
            } finally {
                Files.deleteIfExists(x);
            }
        } catch (IOException e) {
            throw new AssertionError(e);
        }
    }

    /** Start the defined domain. */
    void boot() {
        Sh.run("virsh", "-q", "-c", URI, "start", name);
    }

    /** The file disk {@code target} runs on now (its active file). */
    Path activeFile(String target) {
        for (String line : Sh.run("virsh", "-q", "-c", URI, "domblklist", name).split("\n")) {
            String[] f = line.trim().split("\\s+", 2);
            if (f.length == 2 && f[0].equals(target)) {
                return Path.of(f[1]);
            }
        }
        throw new AssertionError(name + " has no disk " + target);
    }

    /** Write as the guest would; fails the test unless QEMU says it wrote. */
    void write(String target, int pattern, long offset, long len) {
        String out = qemuIo(target, String.format("write -P 0x%02x %d %d", pattern, offset, len),
                "wrote " + len + "/" + len + " bytes at offset " + offset);
        if (out.contains(" failed: ")) {
            fail("write on " + name + ": " + out);
        }
    }

    /** Whether the guest reads {@code len} bytes of {@code pattern} at {@code offset} of disk {@code target}. */
    boolean reads(String target, int pattern, long offset, long len) {
        String out = qemuIo(target, String.format("read -P 0x%02x %d %d", pattern, offset, len),
                "read " + len + "/" + len + " bytes at offset " + offset);
        if (out.contains("read failed")) {
            fail("read on " + name + ": " + out);
        }
        return !out.contains("Pattern verification failed");
    }

    /** Flush what QEMU holds of disk {@code target} (data and qcow2 metadata) to its file. */
    void flush(String target) {
        String device = device(target);
        String answer = Sh.run("virsh", "-c", URI, "qemu-monitor-command", name, "--hmp", "qemu-io -d " + device + " flush");
        assertTrue(answer.isBlank(), "qemu-io flush on " + name + ": " + answer);
    }

    /**
     * A disk-only snapshot of the running domain, as CloudStack takes a VM snapshot without memory: each disk
     * named goes on a new file (over the one it ran on); libvirt keeps no metadata (the domain is transient).
     */
    void snapshot(Map<String, Path> newFiles) {
        List<String> cmd = new ArrayList<>(List.of("virsh", "-q", "-c", URI, "snapshot-create-as", name,
                "--disk-only", "--atomic", "--no-metadata"));
        for (Map.Entry<String, Path> f : newFiles.entrySet()) {
            cmd.add("--diskspec");
            cmd.add(f.getKey() + ",snapshot=external,file=" + f.getValue());
        }
        Sh.run(cmd.toArray(new String[0]));
    }

    private String device(String target) {
        List<String> targets = new ArrayList<>(disks.keySet());
        return "/machine/peripheral/virtio-disk" + targets.indexOf(target) + "/virtio-backend";
    }

    /** Run qemu-io command {@code cmd} on disk {@code target} through the monitor; QEMU's output until {@code done}. */
    private String qemuIo(String target, String cmd, String done) {
        Path log = Path.of("/var/log/libvirt/qemu/" + name + ".log");
        long start = size(log);
        String answer = Sh.run("virsh", "-c", URI, "qemu-monitor-command", name, "--hmp", "qemu-io -d " + device(target) + " \"" + cmd + "\"");
        assertTrue(answer.isBlank(), "qemu-io on " + name + ": " + answer);
        // QEMU prints qemu-io's result on its standard output, into the log.
        for (int i = 0; i < 1500; i++) {
            String text = tail(log, start);
            if (text.contains(done) || text.contains(" failed: ")) {
                return text;
            }
            sleep(20);
        }
        fail(cmd + " on " + name + ": no result in " + log);
        return "";
    }

    private static long size(Path p) {
        try {
            return Files.exists(p) ? Files.size(p) : 0;
        } catch (IOException e) {
            return 0;
        }
    }

    private static String tail(Path p, long from) {
        try {
            byte[] b = Files.readAllBytes(p);
            int start = b.length < from ? 0 : (int) from;
            return new String(b, start, b.length - start, StandardCharsets.UTF_8);
        } catch (IOException e) {
            return "";
        }
    }

    static void sleep(long ms) {
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new AssertionError(e);
        }
    }

    /** Destroy (and undefine) the domain; again does nothing. QEMU writes all it holds before it goes. */
    @Override
    public void close() {
        Sh.exec(List.of("virsh", "-q", "-c", URI, "destroy", name));
        if (persistent) {
            Sh.exec(List.of("virsh", "-q", "-c", URI, "undefine", name));
        }
    }
}

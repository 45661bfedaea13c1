package io.knib;

import static org.junit.jupiter.api.Assertions.fail;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.List;

/** External programs for the tests (qemu-img, qemu-io, virsh), run with an argument vector. */
final class Sh {
    private Sh() {}

    /** What a program did. */
    record Result(int code, String stdout, String stderr) {}

    static Result exec(List<String> cmd) {
        try {
            ProcessBuilder pb = new ProcessBuilder(cmd);
            Path err = java.nio.file.Files.createTempFile("knib-jtest-", ".err");
            pb.redirectError(err.toFile());
            Process p = pb.start();
            p.getOutputStream().close();
            String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
            int code = p.waitFor();
            String e = java.nio.file.Files.readString(err);
            java.nio.file.Files.deleteIfExists(err);
            return new Result(code, out, e);
        } catch (IOException e) {
            throw new AssertionError("cannot run " + cmd + ": " + e, e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new AssertionError("interrupted running " + cmd, e);
        }
    }

    /** Run and fail the test unless it exits with 0; its standard output. */
    static String run(String... cmd) {
        Result r = exec(Arrays.asList(cmd));
        if (r.code != 0) {
            fail(String.join(" ", cmd) + " exited with " + r.code + ": " + r.stderr + r.stdout);
        }
        return r.stdout;
    }

    /** A new qcow2 image. */
    static void qcow2(Path file, long size) {
        run("qemu-img", "create", "-q", "-f", "qcow2", file.toString(), Long.toString(size));
    }

    /** Write {@code len} bytes of {@code pattern} at {@code offset} of a qcow2 image not in use. */
    static void write(Path file, int pattern, long offset, long len) {
        run("qemu-io", "-f", "qcow2", "-c", String.format("write -P 0x%02x %d %d", pattern, offset, len), file.toString());
    }

    /** Whether image {@code file} (read with -U) holds {@code len} bytes of {@code pattern} at {@code offset}. */
    static boolean has(Path file, int pattern, long offset, long len) {
        String out = run("qemu-io", "-r", "-U", "-c", String.format("read -P 0x%02x %d %d", pattern, offset, len), file.toString());
        if (!out.contains("read ")) {
            fail("qemu-io read on " + file + ": " + out);
        }
        return !out.contains("Pattern verification failed");
    }

    /** Whether the two images (read with -U, through their chains) have the same guest-visible contents. */
    static boolean identical(Path a, Path b) {
        Result r = exec(List.of("qemu-img", "compare", "-U", a.toString(), b.toString()));
        if (r.code > 1) {
            fail("qemu-img compare " + a + " " + b + ": " + r.stderr + r.stdout);
        }
        return r.code == 0;
    }

    /** The files of {@code file}'s chain (read with -U), from the top down, as qemu-img resolves them. */
    static List<Path> chain(Path file) {
        String out = run("qemu-img", "info", "-U", "--backing-chain", "--output=json", file.toString());
        List<Path> files = new java.util.ArrayList<>();
        for (com.google.gson.JsonElement e : com.google.gson.JsonParser.parseString(out).getAsJsonArray()) {
            files.add(Path.of(e.getAsJsonObject().get("filename").getAsString()));
        }
        return files;
    }

    /** Fail the test unless {@code qemu-img check} finds {@code file} clean (no corruption, no leak). */
    static void check(Path file) {
        Result r = exec(List.of("qemu-img", "check", "-q", file.toString()));
        if (r.code != 0) {
            fail("qemu-img check " + file + " exited with " + r.code + ": " + r.stderr + r.stdout);
        }
    }

    /** What image {@code from} reads now (through its chain, with -U), as a new flat qcow2 image {@code to}. */
    static void flatten(Path from, Path to) {
        run("qemu-img", "convert", "-U", "-O", "qcow2", from.toString(), to.toString());
    }

    /** The backing file qemu-img reads in {@code file}'s header, or null. */
    static String backing(Path file) {
        String out = run("qemu-img", "info", "-U", "--output=json", file.toString());
        com.google.gson.JsonObject o = com.google.gson.JsonParser.parseString(out).getAsJsonObject();
        return o.has("backing-filename") ? o.get("backing-filename").getAsString() : null;
    }
}

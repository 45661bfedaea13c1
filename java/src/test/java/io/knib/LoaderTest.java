package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The native library is found by the explicit property, by System.loadLibrary, or inside the jar. */
class LoaderTest {
    @TempDir
    Path dir;

    /** The library file the build made (the script names it). */
    static Path builtLibrary() {
        String p = System.getProperty("knib.test.library");
        assertNotNull(p, "run through scripts/test-java.sh: -Dknib.test.library names libknib_jni.so");
        return Path.of(p);
    }

    /** {@code java -cp <this class path> [props] io.knib.Knib}: what it prints. */
    static String runMain(String... props) {
        String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
        List<String> cmd = new ArrayList<>(List.of(java, "-Xcheck:jni"));
        cmd.addAll(List.of(props));
        cmd.addAll(List.of("-cp", System.getProperty("java.class.path"), "io.knib.Knib"));
        Sh.Result r = Sh.exec(cmd);
        assertEquals(0, r.code(), "java " + cmd + ": " + r.stderr() + r.stdout());
        assertTrue(!r.stdout().contains("WARNING") && !r.stderr().contains("WARNING"), r.stdout() + r.stderr());
        return r.stdout();
    }

    @Test
    void theTestsLoadTheLibraryFromTheJar() {
        assertTrue(Knib.version().matches("\\d+\\.\\d+\\.\\d+.*"), Knib.version());
        assertEquals("jar", NativeLib.origin());
    }

    @Test
    void anExplicitPathPropertyWins() {
        String out = runMain("-Dknib.library.path=" + builtLibrary());
        assertTrue(out.contains("native library from property"), out);
    }

    @Test
    void systemLoadLibraryFindsItOnTheLibraryPath() throws Exception {
        Files.copy(builtLibrary(), dir.resolve("libknib_jni.so"));
        String out = runMain("-Djava.library.path=" + dir);
        assertTrue(out.contains("native library from library path"), out);
    }
}

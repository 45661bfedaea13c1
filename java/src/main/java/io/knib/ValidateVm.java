package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#validateVm}: CloudStack's {@code ValidateKbossVmCommand}. A throwaway domain boots on the disks
 * (with overlays of its own on top, removed afterwards) and the checks asked for run.
 */
public final class ValidateVm {
    private ValidateVm() {}

    /**
     * The command. Immutable; make one with {@link #builder()}.
     *
     * @param vmName the validation VM's name (used in messages)
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param disks the disks in boot order: the prepared overlays or backup files
     * @param workDir where the throwaway overlays and the console log go while the test runs
     * @param memoryMib the guest's memory, in MiB
     * @param waitForBoot a guest agent that does not answer fails the validation ({@code waitForBoot})
     * @param bootTimeoutSecs how long the guest has to answer the agent ({@code bootTimeout})
     * @param takeScreenshot save a screenshot ({@code takeScreenshot}) to {@code screenshotPath}
     * @param screenshotPath where the PNG goes ({@code backupDeltaTO.screenshotPath})
     * @param executeScript run {@code script} in the guest ({@code executeScript})
     * @param script the program in the guest, an absolute path ({@code scriptToExecute})
     * @param scriptArguments its arguments, split at white space ({@code scriptArguments})
     * @param expectedResult an integer: the exit code expected; anything else: the output expected ({@code expectedResult})
     * @param kernel a kernel to boot directly (tests); null boots the first disk through the firmware
     * @param initrd the kernel's initrd
     * @param cmdline the kernel's command line
     * @param domainType "kvm" or "qemu"; null picks
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(
            String vmName,
            String connect,
            List<Disk> disks,
            String workDir,
            long memoryMib,
            boolean waitForBoot,
            long bootTimeoutSecs,
            boolean takeScreenshot,
            String screenshotPath,
            boolean executeScript,
            String script,
            String scriptArguments,
            String expectedResult,
            String kernel,
            String initrd,
            String cmdline,
            String domainType,
            Long timeoutSecs) {
        /** Copies {@code disks} (null: none). */
        public Request {
            disks = Json.copy(disks);
        }

        /** @return a builder with the defaults: 512 MiB, wait for boot, 300 s to boot, no screenshot, no script */
        public static Builder builder() {
            return new Builder();
        }

        /** Builds a {@link Request}; every setter returns the builder. */
        public static final class Builder {
            private String vmName;
            private String connect;
            private final List<Disk> disks = new ArrayList<>();
            private String workDir;
            private long memoryMib = 512;
            private boolean waitForBoot = true;
            private long bootTimeoutSecs = 300;
            private boolean takeScreenshot;
            private String screenshotPath;
            private boolean executeScript;
            private String script;
            private String scriptArguments;
            private String expectedResult;
            private String kernel;
            private String initrd;
            private String cmdline;
            private String domainType;
            private Long timeoutSecs;

            private Builder() {}

            /** @param v {@link Request#vmName()} @return this builder */
            public Builder vmName(String v) { vmName = v; return this; }

            /** @param v {@link Request#connect()} @return this builder */
            public Builder connect(String v) { connect = v; return this; }

            /** @param v one more disk @return this builder */
            public Builder disk(Disk v) { disks.add(v); return this; }

            /** @param v the disks, in place of those added so far @return this builder */
            public Builder disks(List<Disk> v) { disks.clear(); disks.addAll(v); return this; }

            /** @param v {@link Request#workDir()} @return this builder */
            public Builder workDir(String v) { workDir = v; return this; }

            /** @param v {@link Request#memoryMib()} @return this builder */
            public Builder memoryMib(long v) { memoryMib = v; return this; }

            /** @param v {@link Request#waitForBoot()} @return this builder */
            public Builder waitForBoot(boolean v) { waitForBoot = v; return this; }

            /** @param v {@link Request#bootTimeoutSecs()} @return this builder */
            public Builder bootTimeoutSecs(long v) { bootTimeoutSecs = v; return this; }

            /** @param v {@link Request#takeScreenshot()} @return this builder */
            public Builder takeScreenshot(boolean v) { takeScreenshot = v; return this; }

            /** @param v {@link Request#screenshotPath()} @return this builder */
            public Builder screenshotPath(String v) { screenshotPath = v; return this; }

            /** @param v {@link Request#executeScript()} @return this builder */
            public Builder executeScript(boolean v) { executeScript = v; return this; }

            /** @param v {@link Request#script()} @return this builder */
            public Builder script(String v) { script = v; return this; }

            /** @param v {@link Request#scriptArguments()} @return this builder */
            public Builder scriptArguments(String v) { scriptArguments = v; return this; }

            /** @param v {@link Request#expectedResult()} @return this builder */
            public Builder expectedResult(String v) { expectedResult = v; return this; }

            /** @param v {@link Request#kernel()} @return this builder */
            public Builder kernel(String v) { kernel = v; return this; }

            /** @param v {@link Request#initrd()} @return this builder */
            public Builder initrd(String v) { initrd = v; return this; }

            /** @param v {@link Request#cmdline()} @return this builder */
            public Builder cmdline(String v) { cmdline = v; return this; }

            /** @param v {@link Request#domainType()} @return this builder */
            public Builder domainType(String v) { domainType = v; return this; }

            /** @param v {@link Request#timeoutSecs()} @return this builder */
            public Builder timeoutSecs(Long v) { timeoutSecs = v; return this; }

            /** @return the request */
            public Request build() {
                return new Request(vmName, connect, disks, workDir, memoryMib, waitForBoot, bootTimeoutSecs,
                        takeScreenshot, screenshotPath, executeScript, script, scriptArguments, expectedResult,
                        kernel, initrd, cmdline, domainType, timeoutSecs);
            }
        }
    }

    /**
     * One disk of the validation VM.
     *
     * @param target its target ({@code vda})
     * @param path its file
     */
    public record Disk(String target, String path) {}

    /** The answer ({@code ValidateKbossVmAnswer}). */
    public static final class Answer {
        private final boolean bootValidated;
        private final double bootSeconds;
        private final String screenshotPath;
        private final String scriptResult;
        private final Long scriptExitCode;
        private final boolean passed;
        private final List<String> problems;

        private Answer() {
            bootValidated = false;
            bootSeconds = 0;
            screenshotPath = null;
            scriptResult = null;
            scriptExitCode = null;
            passed = false;
            problems = null;
        }

        /** @return whether the guest agent answered ({@code bootValidated}) */
        public boolean bootValidated() { return bootValidated; }

        /** @return seconds to the agent's first answer (or to giving up) */
        public double bootSeconds() { return bootSeconds; }

        /** @return the screenshot, when taken ({@code screenshotPath}); else null */
        public String screenshotPath() { return screenshotPath; }

        /** @return the script's output ({@code scriptResult}); null when none ran */
        public String scriptResult() { return scriptResult; }

        /** @return the script's exit code; null when none ran */
        public Long scriptExitCode() { return scriptExitCode; }

        /** @return whether every check asked for passed */
        public boolean passed() { return passed; }

        /** @return what failed, one line each */
        public List<String> problems() { return Json.view(problems); }
    }
}

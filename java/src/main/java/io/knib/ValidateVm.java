package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#validateVm}: CloudStack's {@code ValidateKbossVmCommand}. Two ways: {@code domain} validates the
 * running validation VM the management server started, as the agent does (knib creates, changes and destroys
 * nothing); {@code disks} boots a throwaway domain on them (with overlays of its own on top, removed
 * afterwards). The checks run in the agent's order: wait for the guest agent, the screenshot, the script.
 */
public final class ValidateVm {
    private ValidateVm() {}

    /**
     * The command. Immutable; make one with {@link #builder()}.
     *
     * @param vmName the validation VM's name (used in messages)
     * @param domain the running domain to validate, by name ({@code vm.getName()}); null with {@code disks}
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param disks a throwaway domain's disks in boot order: the prepared overlays or backup files; empty with
     *     {@code domain}
     * @param workDir where the throwaway domain's overlays and console log go while the test runs
     * @param memoryMib the throwaway domain's memory, in MiB; null for 512
     * @param waitForBoot wait for the guest agent ({@code waitForBoot}); without, the boot is not validated
     * @param bootTimeoutSecs how long the guest has to answer the agent ({@code bootTimeout})
     * @param takeScreenshot save a screenshot ({@code takeScreenshot})
     * @param screenshotWaitSecs seconds to wait before the screenshot ({@code screenshotWait})
     * @param screenshotPath where the PNG goes; null with {@code screenshotNextTo}
     * @param screenshotNextTo the local path of {@code backupDeltaTO.path}: the PNG is saved next to it as
     *     {@code <it>-screenshot-<UTC time>.png}, as the agent names it
     * @param storeRoot the store's mount point: {@link Answer#screenshotStorePath()} is relative to it
     * @param executeScript run {@code script} in the guest ({@code executeScript})
     * @param script the program in the guest, an absolute path ({@code scriptToExecute})
     * @param scriptArguments its arguments, split at every comma, nothing trimmed ({@code scriptArguments})
     * @param scriptTimeoutSecs how long the script may run ({@code scriptTimeout}); null for 60 s
     * @param expectedResult compared as the agent compares it: "0" (null means "0") matches an exit code of 0,
     *     any value matches an output whose base64 equals it ({@code expectedResult})
     * @param kernel a kernel to boot directly (tests); null boots the first disk through the firmware
     * @param initrd the kernel's initrd
     * @param cmdline the kernel's command line
     * @param domainType "kvm" or "qemu"; null picks
     * @param maxWriteMib the most the throwaway domain's guest may write to its overlays and console log, in MiB
     *     (1 to 1048576; with {@code disks}): past it the guest is stopped and the validation fails; null for no
     *     limit of its own (a guest is stopped the same way when the work directory has less than 1 GiB free)
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(
            String vmName,
            String domain,
            String connect,
            List<Disk> disks,
            String workDir,
            Long memoryMib,
            boolean waitForBoot,
            long bootTimeoutSecs,
            boolean takeScreenshot,
            long screenshotWaitSecs,
            String screenshotPath,
            String screenshotNextTo,
            String storeRoot,
            boolean executeScript,
            String script,
            String scriptArguments,
            Long scriptTimeoutSecs,
            String expectedResult,
            String kernel,
            String initrd,
            String cmdline,
            String domainType,
            Long maxWriteMib,
            Long timeoutSecs) {
        /** Copies {@code disks} (null: none). */
        public Request {
            disks = Json.copy(disks);
        }

        /** @return a builder with the defaults: wait for boot, 300 s to boot, no screenshot, no script */
        public static Builder builder() {
            return new Builder();
        }

        /** Builds a {@link Request}; every setter returns the builder. */
        public static final class Builder {
            private String vmName;
            private String domain;
            private String connect;
            private final List<Disk> disks = new ArrayList<>();
            private String workDir;
            private Long memoryMib;
            private boolean waitForBoot = true;
            private long bootTimeoutSecs = 300;
            private boolean takeScreenshot;
            private long screenshotWaitSecs;
            private String screenshotPath;
            private String screenshotNextTo;
            private String storeRoot;
            private boolean executeScript;
            private String script;
            private String scriptArguments;
            private Long scriptTimeoutSecs;
            private String expectedResult;
            private String kernel;
            private String initrd;
            private String cmdline;
            private String domainType;
            private Long maxWriteMib;
            private Long timeoutSecs;

            private Builder() {}

            /** @param v {@link Request#vmName()} @return this builder */
            public Builder vmName(String v) { vmName = v; return this; }

            /** @param v {@link Request#domain()} @return this builder */
            public Builder domain(String v) { domain = v; return this; }

            /** @param v {@link Request#connect()} @return this builder */
            public Builder connect(String v) { connect = v; return this; }

            /** @param v one more disk @return this builder */
            public Builder disk(Disk v) { disks.add(v); return this; }

            /** @param v the disks, in place of those added so far @return this builder */
            public Builder disks(List<Disk> v) { disks.clear(); disks.addAll(v); return this; }

            /** @param v {@link Request#workDir()} @return this builder */
            public Builder workDir(String v) { workDir = v; return this; }

            /** @param v {@link Request#memoryMib()} @return this builder */
            public Builder memoryMib(Long v) { memoryMib = v; return this; }

            /** @param v {@link Request#waitForBoot()} @return this builder */
            public Builder waitForBoot(boolean v) { waitForBoot = v; return this; }

            /** @param v {@link Request#bootTimeoutSecs()} @return this builder */
            public Builder bootTimeoutSecs(long v) { bootTimeoutSecs = v; return this; }

            /** @param v {@link Request#takeScreenshot()} @return this builder */
            public Builder takeScreenshot(boolean v) { takeScreenshot = v; return this; }

            /** @param v {@link Request#screenshotWaitSecs()} @return this builder */
            public Builder screenshotWaitSecs(long v) { screenshotWaitSecs = v; return this; }

            /** @param v {@link Request#screenshotPath()} @return this builder */
            public Builder screenshotPath(String v) { screenshotPath = v; return this; }

            /** @param v {@link Request#screenshotNextTo()} @return this builder */
            public Builder screenshotNextTo(String v) { screenshotNextTo = v; return this; }

            /** @param v {@link Request#storeRoot()} @return this builder */
            public Builder storeRoot(String v) { storeRoot = v; return this; }

            /** @param v {@link Request#executeScript()} @return this builder */
            public Builder executeScript(boolean v) { executeScript = v; return this; }

            /** @param v {@link Request#script()} @return this builder */
            public Builder script(String v) { script = v; return this; }

            /** @param v {@link Request#scriptArguments()} @return this builder */
            public Builder scriptArguments(String v) { scriptArguments = v; return this; }

            /** @param v {@link Request#scriptTimeoutSecs()} @return this builder */
            public Builder scriptTimeoutSecs(Long v) { scriptTimeoutSecs = v; return this; }

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

            /** @param v {@link Request#maxWriteMib()} @return this builder */
            public Builder maxWriteMib(Long v) { maxWriteMib = v; return this; }

            /** @param v {@link Request#timeoutSecs()} @return this builder */
            public Builder timeoutSecs(Long v) { timeoutSecs = v; return this; }

            /** @return the request */
            public Request build() {
                return new Request(vmName, domain, connect, disks, workDir, memoryMib, waitForBoot, bootTimeoutSecs,
                        takeScreenshot, screenshotWaitSecs, screenshotPath, screenshotNextTo, storeRoot,
                        executeScript, script, scriptArguments, scriptTimeoutSecs, expectedResult, kernel, initrd,
                        cmdline, domainType, maxWriteMib, timeoutSecs);
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

    /**
     * The answer. {@code ValidateKbossVmAnswer} is {@link #bootValidated()}, {@link #screenshotStorePath()} and
     * {@link #scriptResult()}, as they are (its result is true: {@link #passed()} false is no failed Answer).
     */
    public static final class Answer {
        private final boolean bootValidated;
        private final double bootSeconds;
        private final String screenshotPath;
        private final String screenshotStorePath;
        private final String scriptResult;
        private final String scriptOutput;
        private final Long scriptExitCode;
        private final boolean passed;
        private final List<String> problems;

        private Answer() {
            bootValidated = false;
            bootSeconds = 0;
            screenshotPath = null;
            screenshotStorePath = null;
            scriptResult = null;
            scriptOutput = null;
            scriptExitCode = null;
            passed = false;
            problems = null;
        }

        /** @return whether the guest agent answered ({@code bootValidated}) */
        public boolean bootValidated() { return bootValidated; }

        /** @return seconds to the agent's first answer (or to giving up) */
        public double bootSeconds() { return bootSeconds; }

        /** @return the screenshot's absolute path, when taken; else null */
        public String screenshotPath() { return screenshotPath; }

        /** @return the screenshot relative to {@code storeRoot} ({@code screenshotPath} of the answer); else null */
        public String screenshotStorePath() { return screenshotStorePath; }

        /**
         * @return the agent's {@code scriptResult}: null when the script gave the expected result or was not
         *     asked for; else its output in base64 ("exit code N, no output" when it printed nothing),
         *     "Timeout", or the error that kept it from running
         */
        public String scriptResult() { return scriptResult; }

        /** @return the script's standard output, decoded; null when none ran */
        public String scriptOutput() { return scriptOutput; }

        /** @return the script's exit code; null when none ran */
        public Long scriptExitCode() { return scriptExitCode; }

        /** @return whether every check asked for passed */
        public boolean passed() { return passed; }

        /** @return what failed, one line each */
        public List<String> problems() { return Json.view(problems); }
    }
}

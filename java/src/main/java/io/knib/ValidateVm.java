package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#validateVm}: CloudStack's {@code ValidateKbossVmCommand}. A throwaway domain boots on the disks
 * (with overlays of its own on top, removed afterwards) and the checks asked for run.
 */
public final class ValidateVm {
    private ValidateVm() {}

    /** The command. */
    public static final class Request {
        /** The validation VM's name (used in messages). */
        public String vmName;
        /** The libvirt URI; null for {@code qemu:///system}. */
        public String connect;
        /** The disks in boot order: the prepared overlays or backup files. */
        public List<Disk> disks = new ArrayList<>();
        /** Where the throwaway overlays and the console log go while the test runs. */
        public String workDir;
        /** The guest's memory, in MiB. */
        public long memoryMib = 512;
        /** A guest agent that does not answer fails the validation ({@code waitForBoot}). */
        public boolean waitForBoot = true;
        /** How long the guest has to answer the agent ({@code bootTimeout}). */
        public long bootTimeoutSecs = 300;
        /** Save a screenshot ({@code takeScreenshot}) to {@link #screenshotPath}. */
        public boolean takeScreenshot;
        /** Where the PNG goes ({@code backupDeltaTO.screenshotPath}). */
        public String screenshotPath;
        /** Run {@link #script} in the guest ({@code executeScript}). */
        public boolean executeScript;
        /** The program in the guest, an absolute path ({@code scriptToExecute}). */
        public String script;
        /** Its arguments, split at white space ({@code scriptArguments}). */
        public String scriptArguments;
        /** An integer: the exit code expected; anything else: the output expected ({@code expectedResult}). */
        public String expectedResult;
        /** A kernel to boot directly (tests); null boots the first disk through the firmware. */
        public String kernel;
        /** The kernel's initrd. */
        public String initrd;
        /** The kernel's command line. */
        public String cmdline;
        /** "kvm" or "qemu"; null picks. */
        public String domainType;
        /** The command's time budget in seconds; null for none. */
        public Long timeoutSecs;
    }

    /** One disk of the validation VM. */
    public static final class Disk {
        /** Its target ({@code vda}). */
        public String target;
        /** Its file. */
        public String path;

        /** An empty disk. */
        public Disk() {}

        /**
         * @param target its target
         * @param path its file
         */
        public Disk(String target, String path) {
            this.target = target;
            this.path = path;
        }
    }

    /** The answer ({@code ValidateKbossVmAnswer}). */
    public static final class Answer {
        /** Whether the guest agent answered ({@code bootValidated}). */
        public boolean bootValidated;
        /** Seconds to the agent's first answer (or to giving up). */
        public double bootSeconds;
        /** The screenshot, when taken ({@code screenshotPath}). */
        public String screenshotPath;
        /** The script's output ({@code scriptResult}). */
        public String scriptResult;
        /** The script's exit code. */
        public Long scriptExitCode;
        /** Whether every check asked for passed. */
        public boolean passed;
        /** What failed, one line each. */
        public List<String> problems = new ArrayList<>();
    }
}

package io.knib;

import java.util.List;

/**
 * {@link Knib#cleanupValidation}: CloudStack's {@code CleanupKbossValidationCommand}: the validation domain
 * (destroyed and undefined, if there is one) and the overlays {@link Knib#prepareValidation} made go.
 */
public final class CleanupValidation {
    private CleanupValidation() {}

    /**
     * The command. Immutable.
     *
     * @param vmName the validation VM's name ({@code vmName})
     * @param workDir where the overlays were made; null to leave files alone
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(String vmName, String workDir, String connect, Long timeoutSecs) {
        /**
         * The local libvirt, with no time budget of its own.
         *
         * @param vmName the validation VM's name
         * @param workDir where the overlays were made; null to leave files alone
         */
        public Request(String vmName, String workDir) {
            this(vmName, workDir, null, null);
        }

        /** @param v the libvirt URI @return this request with it */
        public Request withConnect(String v) {
            return new Request(vmName, workDir, v, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(vmName, workDir, connect, v);
        }
    }

    /** The answer. */
    public static final class Answer {
        private final boolean domainRemoved;
        private final List<String> removed;

        private Answer() {
            domainRemoved = false;
            removed = null;
        }

        /** @return whether a domain of that name was removed */
        public boolean domainRemoved() { return domainRemoved; }

        /** @return the overlays removed */
        public List<String> removed() { return Json.view(removed); }
    }
}

package io.knib;

import java.util.List;

/**
 * {@link Knib#cleanupValidation}: CloudStack's {@code CleanupKbossValidationCommand}. By default nothing is done,
 * as the agent does (the management server destroys the validation VM and its volumes); {@code removeDomain}
 * destroys (and undefines) the domain, {@code workDir} removes the overlays {@link Knib#prepareValidation} made
 * there.
 */
public final class CleanupValidation {
    private CleanupValidation() {}

    /**
     * The command. Immutable.
     *
     * @param vmName the validation VM's name ({@code vmName})
     * @param removeDomain destroy and undefine the domain of that name, if there is one
     * @param workDir where {@link Knib#prepareValidation} made overlays of its own; null to leave files alone
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param timeoutSecs the command's time budget in seconds; null for none
     */
    public record Request(String vmName, boolean removeDomain, String workDir, String connect, Long timeoutSecs) {
        /**
         * As the agent: nothing removed.
         *
         * @param vmName the validation VM's name
         */
        public Request(String vmName) {
            this(vmName, false, null, null, null);
        }

        /** @param v remove the domain @return this request with it */
        public Request withRemoveDomain(boolean v) {
            return new Request(vmName, v, workDir, connect, timeoutSecs);
        }

        /** @param v where the overlays were made @return this request with it */
        public Request withWorkDir(String v) {
            return new Request(vmName, removeDomain, v, connect, timeoutSecs);
        }

        /** @param v the libvirt URI @return this request with it */
        public Request withConnect(String v) {
            return new Request(vmName, removeDomain, workDir, v, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public Request withTimeoutSecs(Long v) {
            return new Request(vmName, removeDomain, workDir, connect, v);
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

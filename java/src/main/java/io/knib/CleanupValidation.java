package io.knib;

import java.util.ArrayList;
import java.util.List;

/**
 * {@link Knib#cleanupValidation}: CloudStack's {@code CleanupKbossValidationCommand}: the validation domain
 * (destroyed and undefined, if there is one) and the overlays {@link Knib#prepareValidation} made go.
 */
public final class CleanupValidation {
    private CleanupValidation() {}

    /** The command. */
    public static final class Request {
        /** The validation VM's name ({@code vmName}). */
        public String vmName;
        /** Where the overlays were made; null to leave files alone. */
        public String workDir;
        /** The libvirt URI; null for {@code qemu:///system}. */
        public String connect;
    }

    /** The answer. */
    public static final class Answer {
        /** Whether a domain of that name was removed. */
        public boolean domainRemoved;
        /** The overlays removed. */
        public List<String> removed = new ArrayList<>();
    }
}

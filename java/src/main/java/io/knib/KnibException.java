package io.knib;

import java.util.Optional;

/**
 * A failure of a knib operation. Its subclass (one per {@link ErrorKind}) says what kind of failure it
 * is; the message names what was wrong. For a failed backup, {@link #vmConsistent()} says whether the VM
 * was left consistent (its disks run on {@code base <- one delta} and nothing of the failed backup is on
 * the store) or needs {@link Knib#cleanupVmBackup} first, as CloudStack's {@code isVmConsistent} does.
 */
public class KnibException extends Exception {
    private static final long serialVersionUID = 1L;

    private final ErrorKind kind;
    private final Boolean vmConsistent;

    /**
     * @param kind the kind of failure
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    protected KnibException(ErrorKind kind, String message, int vmConsistent) {
        super(message);
        this.kind = kind;
        this.vmConsistent = vmConsistent < 0 ? null : vmConsistent > 0;
    }

    /** @return the kind of failure */
    public ErrorKind kind() {
        return kind;
    }

    /** @return the kind's fixed number (1 to 12) */
    public int code() {
        return kind.code();
    }

    /** @return whether the VM was left consistent; empty when the operation does not touch a VM's disks */
    public Optional<Boolean> vmConsistent() {
        return Optional.ofNullable(vmConsistent);
    }

    /**
     * @return false only when the failure says the VM was left inconsistent (CloudStack's answer defaults to
     *     true, as here)
     */
    public boolean isVmConsistent() {
        return vmConsistent == null || vmConsistent;
    }
}

package io.knib;

/** A backup failed and left the VM with extra layers or a half-done merge: run {@link Knib#cleanupVmBackup} before its next backup. */
public class VmInconsistentException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public VmInconsistentException(String message, int vmConsistent) {
        super(ErrorKind.VM_INCONSISTENT, message, vmConsistent);
    }
}

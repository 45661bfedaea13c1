package io.knib;

/** libvirt or QEMU refused or failed. */
public class HypervisorException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public HypervisorException(String message, int vmConsistent) {
        super(ErrorKind.HYPERVISOR, message, vmConsistent);
    }
}

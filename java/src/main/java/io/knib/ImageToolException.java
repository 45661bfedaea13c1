package io.knib;

/** {@code qemu-img} (or another image tool) failed. */
public class ImageToolException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public ImageToolException(String message, int vmConsistent) {
        super(ErrorKind.IMAGE_TOOL, message, vmConsistent);
    }
}

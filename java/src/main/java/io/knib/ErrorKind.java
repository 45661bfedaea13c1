package io.knib;

/** What went wrong, with the fixed numbers shared by every binding of knib (C result codes, {@code knib} exit status minus 10). */
public enum ErrorKind {
    /** A backup, volume, file or domain that was named does not exist. */
    NOT_FOUND(1, "not found"),
    /** Another operation holds the VM (or the context) right now. */
    BUSY(2, "busy"),
    /** The request itself is wrong. */
    INVALID_INPUT(3, "invalid input"),
    /** Not enough free space. */
    NO_SPACE(4, "no space"),
    /** The time budget ran out. */
    TIMEOUT(5, "timeout"),
    /** Cancelled by the caller. */
    CANCELLED(6, "cancelled"),
    /** qemu-img failed. */
    IMAGE_TOOL(7, "image tool failed"),
    /** libvirt or QEMU failed. */
    HYPERVISOR(8, "hypervisor"),
    /** Reading or writing a file failed. */
    IO(9, "I/O"),
    /** Stored data is damaged. */
    CORRUPT(10, "corrupt"),
    /** A failed backup left the VM inconsistent. */
    VM_INCONSISTENT(11, "VM left inconsistent"),
    /** A bug in knib. */
    INTERNAL(12, "internal");

    private final int code;
    private final String label;

    ErrorKind(int code, String label) {
        this.code = code;
        this.label = label;
    }

    /** @return the fixed number of this kind (1 to 12) */
    public int code() {
        return code;
    }

    /** @return the short lower-case name knib uses in messages ("not found") */
    public String label() {
        return label;
    }

    /**
     * @param code a kind's number
     * @return the kind of that number
     * @throws IllegalArgumentException for a number that is no kind's
     */
    public static ErrorKind fromCode(int code) {
        for (ErrorKind k : values()) {
            if (k.code == code) {
                return k;
            }
        }
        throw new IllegalArgumentException("no knib error kind has code " + code);
    }
}

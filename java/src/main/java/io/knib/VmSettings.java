package io.knib;

/**
 * {@link Knib#vmSettings}: a VM's settings in a store ({@code vm.settings}), kept in
 * {@code STORE/vms/<vm>/settings.json}: how the VM's backups find its changes.
 */
public final class VmSettings {
    private VmSettings() {}

    /**
     * The request. Immutable.
     *
     * @param store the store directory (made when a setting is given and it is missing)
     * @param vm the VM's name (its libvirt domain's name)
     * @param backupMethod {@code "snapshot"} or {@code "bitmap"} to set the VM's backup method; null to read the
     *     settings only
     */
    public record Request(String store, String vm, String backupMethod) {
        /**
         * Read the settings only.
         *
         * @param store the store directory
         * @param vm the VM's name
         */
        public Request(String store, String vm) {
            this(store, vm, null);
        }

        /** @param v {@code "snapshot"} or {@code "bitmap"} @return this request, setting it */
        public Request withBackupMethod(String v) {
            return new Request(store, vm, v);
        }
    }

    /** A VM's settings, after the request. */
    public static final class Settings {
        private final String backupMethod;

        private Settings() {
            backupMethod = null;
        }

        /** @return {@code "snapshot"} (the default) or {@code "bitmap"} */
        public String backupMethod() { return backupMethod; }
    }
}

package io.knib;

import java.util.ArrayList;
import java.util.List;
import java.util.Optional;

/**
 * Group backups: one backup of each of several VMs at a common instant, recorded as a group in a store (the
 * requests and answers of {@link Knib#groupBackup}, {@link Knib#groupList}, {@link Knib#groupShow},
 * {@link Knib#groupRestore}, {@link Knib#groupDelete} and {@link Knib#groupRecover}; the {@code group.*}
 * operations).
 *
 * <p>Every member is planned at once (all or nothing before the snapshots); with {@code quiesce} the running
 * guests that have a guest agent channel are frozen together, within {@code freezeTimeoutSecs}; all are
 * snapshotted, thawed, then copied in parallel. With {@code onFailure "rollback"} a member that fails after the
 * snapshots undoes the others; with {@code "keep"} (the default) the others are published and the group is
 * {@code "partial"}.
 *
 * <pre>{@code
 * GroupBackup.Group g = k.groupBackup(GroupBackup.Request.builder()
 *         .store("/backups").domain("web").domain("db").quiesce(true).onFailure("rollback").build());
 * k.groupRestore(GroupBackup.RestoreRequest.of("/backups", g.id(), "/restore"));
 * }</pre>
 */
public final class GroupBackup {
    private GroupBackup() {}

    /**
     * The request of {@code group.backup}. Immutable; make one with {@link #builder()}.
     *
     * @param store the store directory (made when missing)
     * @param members the VMs, at least two
     * @param connect the libvirt URI; null for {@code qemu:///system}
     * @param quiesce freeze every running guest that has a guest agent channel for the snapshots (all at once)
     * @param freezeTimeoutSecs the bound on freezing and snapshotting all members, in seconds (past it every guest
     *     is thawed and the group fails); null for 30
     * @param onFailure {@code "keep"} (null means it too: publish the members that succeeded) or {@code "rollback"}
     *     (publish none unless all succeed)
     * @param maxParallel members copied at once after the thaw; null for the store's
     *     {@code group.max_concurrent_copies} (4)
     * @param full start new chains
     * @param chainSize backups per chain; null for 8
     * @param compress "zstd" or "zlib" to compress as copied; null for none
     * @param checkOutput with {@code compress}: read each compressed file back before the member's backup is kept;
     *     one that does not hold what was copied into it fails that backup with {@link InternalException} (nothing
     *     of it kept). Refused without {@code compress} ({@link InvalidInputException}). The store's
     *     {@code compression.check_output} turns it on whatever is asked
     * @param timeoutSecs the time budget in seconds; null for none
     */
    public record Request(
            String store,
            List<Member> members,
            String connect,
            boolean quiesce,
            Long freezeTimeoutSecs,
            String onFailure,
            Long maxParallel,
            boolean full,
            Long chainSize,
            String compress,
            boolean checkOutput,
            Long timeoutSecs) {
        /** Copies {@code members} (null: none). */
        public Request {
            members = Json.copy(members);
        }

        /**
         * The request without {@code checkOutput} (false), as before that field.
         *
         * @param store {@link #store()}
         * @param members {@link #members()}
         * @param connect {@link #connect()}
         * @param quiesce {@link #quiesce()}
         * @param freezeTimeoutSecs {@link #freezeTimeoutSecs()}
         * @param onFailure {@link #onFailure()}
         * @param maxParallel {@link #maxParallel()}
         * @param full {@link #full()}
         * @param chainSize {@link #chainSize()}
         * @param compress {@link #compress()}
         * @param timeoutSecs {@link #timeoutSecs()}
         */
        public Request(String store, List<Member> members, String connect, boolean quiesce, Long freezeTimeoutSecs,
                String onFailure, Long maxParallel, boolean full, Long chainSize, String compress, Long timeoutSecs) {
            this(store, members, connect, quiesce, freezeTimeoutSecs, onFailure, maxParallel, full, chainSize, compress,
                    false, timeoutSecs);
        }

        /** @return an empty builder */
        public static Builder builder() {
            return new Builder();
        }

        /** Builds a {@link Request}; every setter returns the builder. */
        public static final class Builder {
            private String store;
            private final List<Member> members = new ArrayList<>();
            private String connect;
            private boolean quiesce;
            private Long freezeTimeoutSecs;
            private Long maxParallel;
            private String onFailure;
            private boolean full;
            private Long chainSize;
            private String compress;
            private boolean checkOutput;
            private Long timeoutSecs;

            private Builder() {}

            /** @param v {@link Request#store()} @return this builder */
            public Builder store(String v) { store = v; return this; }

            /** @param v one more member @return this builder */
            public Builder member(Member v) { members.add(v); return this; }

            /** @param name one more member: a libvirt domain @return this builder */
            public Builder domain(String name) { members.add(Member.domain(name)); return this; }

            /** @param v the members, in place of those added so far @return this builder */
            public Builder members(List<Member> v) { members.clear(); members.addAll(v); return this; }

            /** @param v {@link Request#connect()} @return this builder */
            public Builder connect(String v) { connect = v; return this; }

            /** @param v {@link Request#quiesce()} @return this builder */
            public Builder quiesce(boolean v) { quiesce = v; return this; }

            /** @param v {@link Request#freezeTimeoutSecs()} @return this builder */
            public Builder freezeTimeoutSecs(Long v) { freezeTimeoutSecs = v; return this; }

            /** @param v {@link Request#onFailure()} @return this builder */
            public Builder onFailure(String v) { onFailure = v; return this; }

            /** @param v {@link Request#maxParallel()} @return this builder */
            public Builder maxParallel(Long v) { maxParallel = v; return this; }

            /** @param v {@link Request#full()} @return this builder */
            public Builder full(boolean v) { full = v; return this; }

            /** @param v {@link Request#chainSize()} @return this builder */
            public Builder chainSize(Long v) { chainSize = v; return this; }

            /** @param v {@link Request#compress()} @return this builder */
            public Builder compress(String v) { compress = v; return this; }

            /** @param v {@link Request#checkOutput()} @return this builder */
            public Builder checkOutput(boolean v) { checkOutput = v; return this; }

            /** @param v {@link Request#timeoutSecs()} @return this builder */
            public Builder timeoutSecs(Long v) { timeoutSecs = v; return this; }

            /** @return the request */
            public Request build() {
                return new Request(store, members, connect, quiesce, freezeTimeoutSecs, onFailure, maxParallel, full,
                        chainSize, compress, checkOutput, timeoutSecs);
            }
        }
    }

    /**
     * One VM of a group backup: a libvirt domain ({@link #domain(String)}), or a plain-disk VM, stopped, that
     * libvirt does not run ({@link #plain(String, List)}).
     *
     * @param domain the libvirt domain (running or stopped); null for a plain-disk VM
     * @param vm the plain-disk VM's name in the store; null for a domain
     * @param disks the plain-disk VM's disks; empty for a domain
     */
    public record Member(String domain, String vm, List<Disk> disks) {
        /** Copies {@code disks} (null: none). */
        public Member {
            disks = Json.copy(disks);
        }

        /** @param name the domain's name @return a libvirt domain, all its disks */
        public static Member domain(String name) {
            return new Member(name, null, List.of());
        }

        /**
         * @param vm the VM's name in the store
         * @param disks its disks
         * @return a plain-disk VM
         */
        public static Member plain(String vm, List<Disk> disks) {
            return new Member(null, vm, disks);
        }
    }

    /**
     * A disk of a plain-disk VM.
     *
     * @param name the volume's name in the backup
     * @param path its qcow2 file
     */
    public record Disk(String name, String path) {}

    /**
     * The request of {@code group.list}.
     *
     * @param store the store directory
     */
    public record ListRequest(String store) {}

    /**
     * The request of {@code group.show}.
     *
     * @param store the store directory
     * @param group the group backup's id
     */
    public record ShowRequest(String store, String group) {}

    /**
     * The request of {@code group.restore}: every volume of every member, to {@code <to>/<vm>/<volume>.<format>}
     * (all or none). A partial group (members without a backup) is refused, naming them, unless {@code partial}.
     * Immutable.
     *
     * @param store the store directory
     * @param group the group backup's id
     * @param to the directory the volumes go to (made when missing)
     * @param format "qcow2" (null means it too) or "raw": flattened copies
     * @param quick qcow2 overlays over the backups instead of copies
     * @param noVerify skip checking the chains' hashes as they are read
     * @param partial restore a partial group's members that have a backup ({@link Restored#skipped} names the
     *     others)
     * @param timeoutSecs the time budget in seconds; null for none
     */
    public record RestoreRequest(
            String store,
            String group,
            String to,
            String format,
            boolean quick,
            boolean noVerify,
            boolean partial,
            Long timeoutSecs) {
        /**
         * @param store the store directory
         * @param group the group backup's id
         * @param to the directory the volumes go to
         * @return flattened qcow2 copies, their hashes checked
         */
        public static RestoreRequest of(String store, String group, String to) {
            return new RestoreRequest(store, group, to, null, false, false, false, null);
        }

        /** @param v "qcow2" or "raw" @return this request with it */
        public RestoreRequest withFormat(String v) {
            return new RestoreRequest(store, group, to, v, quick, noVerify, partial, timeoutSecs);
        }

        /** @param v overlays instead of copies @return this request with it */
        public RestoreRequest withQuick(boolean v) {
            return new RestoreRequest(store, group, to, format, v, noVerify, partial, timeoutSecs);
        }

        /** @param v skip the hash checks @return this request with it */
        public RestoreRequest withNoVerify(boolean v) {
            return new RestoreRequest(store, group, to, format, quick, v, partial, timeoutSecs);
        }

        /** @param v restore a partial group's members that have a backup @return this request with it */
        public RestoreRequest withPartial(boolean v) {
            return new RestoreRequest(store, group, to, format, quick, noVerify, v, timeoutSecs);
        }

        /** @param v the time budget in seconds @return this request with it */
        public RestoreRequest withTimeoutSecs(Long v) {
            return new RestoreRequest(store, group, to, format, quick, noVerify, partial, v);
        }
    }

    /**
     * The request of {@code group.delete}.
     *
     * @param store the store directory
     * @param group the group backup's id
     */
    public record DeleteRequest(String store, String group) {}

    /**
     * The request of {@code group.recover}.
     *
     * @param store the store directory
     * @param connect the libvirt URI; null for {@code qemu:///system}
     */
    public record RecoverRequest(String store, String connect) {
        /** @param store the store directory */
        public RecoverRequest(String store) {
            this(store, null);
        }
    }

    /** A group backup's record: the answer of {@code group.backup} and {@code group.show}. */
    public static final class Group {
        private final int schema;
        private final String id;
        private final String created;
        private final String state;
        private final List<MemberResult> members;
        private final boolean quiesce;
        private final String onFailure;
        private final String instant;
        private final Double freezeToThawMs;
        private final Double snapshotSkewMs;
        private final boolean recovered;

        private Group() {
            schema = 0;
            id = null;
            created = null;
            state = null;
            members = null;
            quiesce = false;
            onFailure = null;
            instant = null;
            freezeToThawMs = null;
            snapshotSkewMs = null;
            recovered = false;
        }

        /** @return the record's schema version (1) */
        public int schema() { return schema; }

        /** @return the group backup's id */
        public String id() { return id; }

        /** @return when it started (UTC, RFC 3339) */
        public String created() { return created; }

        /** @return "complete" (every member backed up) or "partial" (some failed, with onFailure "keep") */
        public String state() { return state; }

        /** @return the members, in request order */
        public List<MemberResult> members() { return Json.view(members); }

        /** @return whether quiescing was asked for */
        public boolean quiesce() { return quiesce; }

        /** @return "keep" or "rollback" */
        public String onFailure() { return onFailure; }

        /** @return the group's instant: when the last snapshot was done (UTC); null if none was */
        public String instant() { return instant; }

        /** @return milliseconds from the first freeze to the last thaw; null when no guest was frozen */
        public Double freezeToThawMs() { return freezeToThawMs; }

        /** @return milliseconds between the first and the last member's snapshot; null if none was done */
        public Double snapshotSkewMs() { return snapshotSkewMs; }

        /** @return whether the record was finished by {@link Knib#groupRecover} after a crash */
        public boolean recovered() { return recovered; }
    }

    /** One member in a group's record. */
    public static final class MemberResult {
        private final String vm;
        private final boolean domain;
        private final String backup;
        private final boolean running;
        private final boolean quiesced;
        private final String snapshotAt;
        private final String error;

        private MemberResult() {
            vm = null;
            domain = false;
            backup = null;
            running = false;
            quiesced = false;
            snapshotAt = null;
            error = null;
        }

        /** @return the VM's name in the store (a domain's name) */
        public String vm() { return vm; }

        /** @return whether it is a libvirt domain (else a plain-disk VM) */
        public boolean domain() { return domain; }

        /** @return its backup's id (an ordinary backup of its VM); null when it failed */
        public String backup() { return backup; }

        /** @return whether the VM was running at its snapshot */
        public boolean running() { return running; }

        /** @return whether its guest was frozen for the snapshot */
        public boolean quiesced() { return quiesced; }

        /** @return when its snapshot was done (UTC); null if it was not */
        public String snapshotAt() { return snapshotAt; }

        /** @return why it has no backup; null when it has one */
        public String error() { return error; }
    }

    /** The answer of {@code group.restore}. */
    public static final class Restored {
        private final List<RestoredVolume> volumes;
        private final List<SkippedMember> skipped;

        private Restored() {
            volumes = null;
            skipped = null;
        }

        /** @return every volume written */
        public List<RestoredVolume> volumes() { return Json.view(volumes); }

        /** @return the members a partial restore left out (they have no backup); empty otherwise */
        public List<SkippedMember> skipped() { return Json.view(skipped); }
    }

    /** A member of a partial group that a restore left out. */
    public static final class SkippedMember {
        private final String vm;
        private final String error;

        private SkippedMember() {
            vm = null;
            error = null;
        }

        /** @return the member VM */
        public String vm() { return vm; }

        /** @return why it has no backup; null when the record says nothing */
        public String error() { return error; }
    }

    /** One volume a group restore wrote. */
    public static final class RestoredVolume {
        private final String vm;
        private final String backup;
        private final String volume;
        private final String path;

        private RestoredVolume() {
            vm = null;
            backup = null;
            volume = null;
            path = null;
        }

        /** @return the member VM */
        public String vm() { return vm; }

        /** @return its backup's id */
        public String backup() { return backup; }

        /** @return the volume's name (a domain's disk target) */
        public String volume() { return volume; }

        /** @return the file written */
        public String path() { return path; }
    }

    /** The answer of {@code group.delete}. */
    public static final class Deleted {
        private final List<Deletion> members;

        private Deleted() {
            members = null;
        }

        /** @return each member backup's deletion */
        public List<Deletion> members() { return Json.view(members); }
    }

    /** What deleting one member's backup did (chain-safely). */
    public static final class Deletion {
        private final List<String> expunged;
        private final List<String> markedRemoved;
        private final String keptBecause;

        private Deletion() {
            expunged = null;
            markedRemoved = null;
            keptBecause = null;
        }

        /** @return the backups whose files were removed */
        public List<String> expunged() { return Json.view(expunged); }

        /** @return the backups kept on disk, marked removed, because later backups need them */
        public List<String> markedRemoved() { return Json.view(markedRemoved); }

        /**
         * @return why the member's backup was kept, marked removed, and what lets its files go (the later
         *     backups that read it, or backups whose manifests cannot be read); empty when it was expunged
         */
        public Optional<String> keptBecause() { return Optional.ofNullable(keptBecause); }
    }
}

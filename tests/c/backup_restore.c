/* Backs up a qcow2 disk through the C API, changes it, backs it up again,
 * and restores both backups, checking the bytes; along the way lists,
 * shows, verifies, hashes, compresses (both ways) and deletes. Real
 * qemu-img and qemu-io, nothing mocked. */
#include "common.h"

#define MiB (1024L * 1024L)
#define DISK_SIZE (8 * MiB)

static atomic_int progress_calls;
static atomic_int log_lines;

static void on_progress(void *userdata, const char *step, double percent) {
    CHECK(userdata == &progress_calls, "userdata %p", userdata);
    CHECK(step && *step, "empty step");
    CHECK(percent >= 0.0 && percent <= 100.0, "percent %f", percent);
    atomic_fetch_add(&progress_calls, 1);
}

static void on_log(void *userdata, knib_log_level level, const char *message) {
    CHECK(userdata == &log_lines, "userdata %p", userdata);
    CHECK(level >= KNIB_LOG_LEVEL_ERROR && level <= KNIB_LOG_LEVEL_INFO, "level %u", (unsigned)level);
    if (getenv("KNIB_TEST_VERBOSE"))
        fprintf(stderr, "log %u: %s\n", (unsigned)level, message);
    atomic_fetch_add(&log_lines, 1);
}

/* One range of a restored image and the byte it must hold. */
struct range {
    long offset, length;
    unsigned char byte;
};

static void check_image(const char *path, const struct range *ranges, size_t n) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f)
        return;
    unsigned char *data = malloc(DISK_SIZE);
    size_t got = fread(data, 1, DISK_SIZE, f);
    CHECK(got == DISK_SIZE, "%s has %zu bytes, want %ld", path, got, DISK_SIZE);
    CHECK(fgetc(f) == EOF, "%s is longer than the disk", path);
    fclose(f);
    /* Every byte not in a range must be zero. */
    unsigned char *want = calloc(DISK_SIZE, 1);
    for (size_t i = 0; i < n; i++)
        memset(want + ranges[i].offset, ranges[i].byte, (size_t)ranges[i].length);
    for (long i = 0; i < (long)got; i++) {
        if (data[i] != want[i]) {
            CHECK(0, "%s: byte %ld is 0x%02x, want 0x%02x", path, i, data[i], want[i]);
            break;
        }
    }
    free(want);
    free(data);
}

int main(void) {
    CHECK(strcmp(knib_version(), KNIB_VERSION) == 0, "library %s, header %s", knib_version(), KNIB_VERSION);
    EXPECT(knib_set_log_callback(on_log, &log_lines, KNIB_LOG_LEVEL_INFO), KNIB_RESULT_OK, NULL);

    const char *dir = make_temp_dir();
    char disk[600], store[600], r1[600], r2[600], r2c[600], loose[600], loose_copy[600];
    snprintf(disk, sizeof disk, "%s/disk.qcow2", dir);
    snprintf(store, sizeof store, "%s/store", dir);
    snprintf(r1, sizeof r1, "%s/r1.raw", dir);
    snprintf(r2, sizeof r2, "%s/r2.raw", dir);
    snprintf(r2c, sizeof r2c, "%s/r2c.raw", dir);
    snprintf(loose, sizeof loose, "%s/loose.qcow2", dir);
    snprintf(loose_copy, sizeof loose_copy, "%s/loose-copy.qcow2", dir);

    RUN_OK("qemu-img create -q -f qcow2 '%s' %ld", disk, DISK_SIZE);
    RUN_OK("qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 4M 1M' '%s'", disk);

    knib_context *ctx = NULL;
    EXPECT(knib_context_new(&ctx), KNIB_RESULT_OK, NULL);
    EXPECT(knib_context_set_progress(ctx, on_progress, &progress_calls), KNIB_RESULT_OK, ctx);
    EXPECT(knib_context_set_timeout(ctx, 300), KNIB_RESULT_OK, ctx);

    char id1[128] = "", id2[128] = "", parent[128] = "";
    char *a = call(ctx, knib_backup, "{\"schema\": 1, \"store\": \"%s\", \"vm\": \"web\", "
                   "\"disks\": [{\"name\": \"root\", \"path\": \"%s\"}]}", store, disk);
    if (a) {
        CHECK(strstr(a, "\"kind\":\"full\""), "first backup: %s", a);
        CHECK(json_string(a, "id", id1, sizeof id1), "no id: %s", a);
        knib_string_free(a);
    }

    RUN_OK("qemu-io -c 'write -P 0x33 0 512K' -c 'write -P 0x44 7M 64K' '%s'", disk);
    a = call(ctx, knib_backup, "{\"store\": \"%s\", \"vm\": \"web\", "
             "\"disks\": [{\"name\": \"root\", \"path\": \"%s\"}]}", store, disk);
    if (a) {
        CHECK(strstr(a, "\"kind\":\"incremental\""), "second backup: %s", a);
        CHECK(json_string(a, "id", id2, sizeof id2), "no id: %s", a);
        CHECK(json_string(a, "parent", parent, sizeof parent) && strcmp(parent, id1) == 0,
              "parent %s, want %s", parent, id1);
        knib_string_free(a);
    }

    a = call(ctx, knib_list, "{\"store\": \"%s\", \"vm\": \"web\"}", store);
    if (a) {
        CHECK(count(a, "\"id\":") == 2, "list: %s", a);
        knib_string_free(a);
    }
    a = call(ctx, knib_show, "{\"store\": \"%s\", \"backup\": \"%s\"}", store, id2);
    if (a) {
        CHECK(strstr(a, id2) && strstr(a, "\"volumes\":[{\"name\":\"root\""), "show: %s", a);
        knib_string_free(a);
    }
    a = call(ctx, knib_verify, "{\"store\": \"%s\"}", store);
    if (a) {
        CHECK(count(a, "\"ok\":true") == 2 && !strstr(a, "\"ok\":false"), "verify: %s", a);
        knib_string_free(a);
    }
    a = call(ctx, knib_hash, "{\"store\": \"%s\", \"backup\": \"%s\"}", store, id2);
    if (a) {
        CHECK(strstr(a, "\"volumes\":{\"root\":{\"hash\":\"") && strstr(a, "\"files\":[{\"path\":"), "hash: %s", a);
        knib_string_free(a);
    }

    const struct range first[] = {{0, MiB, 0x11}, {4 * MiB, MiB, 0x22}};
    const struct range second[] = {{0, MiB / 2, 0x33}, {MiB / 2, MiB / 2, 0x11}, {4 * MiB, MiB, 0x22},
                                   {7 * MiB, 64 * 1024, 0x44}};
    a = call(ctx, knib_restore, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
             "\"to\": \"%s\", \"format\": \"raw\"}", store, id1, r1);
    knib_string_free(a);
    check_image(r1, first, 2);
    a = call(ctx, knib_restore, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
             "\"to\": \"%s\", \"format\": \"raw\"}", store, id2, r2);
    knib_string_free(a);
    check_image(r2, second, 4);

    /* Compress the full backup: the incremental one still restores. */
    a = call(ctx, knib_compress, "{\"store\": \"%s\", \"backup\": \"%s\", \"library\": \"zstd\"}", store, id1);
    if (a) {
        CHECK(strstr(a, "\"compression\":{\"library\":\"zstd\""), "compress: %s", a);
        knib_string_free(a);
    }
    a = call(ctx, knib_restore, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
             "\"to\": \"%s\", \"format\": \"raw\"}", store, id2, r2c);
    knib_string_free(a);
    check_image(r2c, second, 4);

    /* The two compression steps on a loose file (agent.*, by name). */
    RUN_OK("qemu-img create -q -f qcow2 '%s' 4M && qemu-io -c 'write -P 0x55 0 2M' '%s' && cp '%s' '%s'",
           loose, loose, loose, loose_copy);
    a = call_op(ctx, "agent.compress", "{\"files\": [\"%s\"], \"library\": \"zlib\"}", loose);
    if (a) {
        CHECK(strstr(a, "\"comp_path\":\"") && strstr(a, ".comp\""), "agent.compress: %s", a);
        knib_string_free(a);
    }
    char comp[700];
    snprintf(comp, sizeof comp, "%s.comp", loose);
    CHECK(access(comp, F_OK) == 0, "%s missing", comp);
    a = call_op(ctx, "agent.finalize_compression", "{\"files\": [\"%s\"], \"cleanup\": false}", loose);
    if (a) {
        CHECK(strstr(a, "\"finalized\":[{\"path\""), "agent.finalize_compression: %s", a);
        knib_string_free(a);
    }
    CHECK(access(comp, F_OK) != 0, "%s left", comp);
    CHECK(run("qemu-img compare -q '%s' '%s'", loose, loose_copy) == 0, "finalized file differs");

    /* Delete the newest backup; one is left. Then knib_call by name. */
    a = call(ctx, knib_delete, "{\"store\": \"%s\", \"backup\": \"%s\"}", store, id2);
    if (a) {
        CHECK(strstr(a, "\"expunged\":[\"") && strstr(a, id2), "delete: %s", a);
        knib_string_free(a);
    }
    char req[1024];
    snprintf(req, sizeof req, "{\"store\": \"%s\"}", store);
    a = NULL;
    EXPECT(knib_call(ctx, "list", req, &a), KNIB_RESULT_OK, ctx);
    if (a) {
        CHECK(count(a, "\"id\":") == 1, "list after delete: %s", a);
        knib_string_free(a);
    }

    CHECK(atomic_load(&progress_calls) > 0, "the progress callback was never called");
    CHECK(atomic_load(&log_lines) > 0, "the log callback was never called");
    knib_context_free(ctx);
    EXPECT(knib_set_log_callback(NULL, NULL, 0), KNIB_RESULT_OK, NULL);
    remove_tree(dir);

    printf("backup_restore: %s (%d progress reports, %d log lines)\n", failures ? "FAILED" : "ok",
           atomic_load(&progress_calls), atomic_load(&log_lines));
    return failures ? 1 : 0;
}

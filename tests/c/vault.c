/* The vault through the C API's generic JSON call (knib_call): a small
 * store (a full and an incremental backup of a qcow2 disk) synced to an S3
 * vault at a prefix of its own, listed there, the incremental restored from
 * the vault and its bytes compared with the disk's; then the backups are
 * deleted from the vault (chain-safe: the child, then the parent), which
 * leaves the prefix empty.
 *
 * Needs a real S3 server: KNIB_S3_ENDPOINT (and the AWS_* credentials,
 * KNIB_S3_BUCKET) as `eval "$(bash scripts/ceph.sh env)"` sets them; CI
 * (scripts/test-all.sh) starts Ceph RGW first. Without KNIB_S3_ENDPOINT the
 * test is skipped, saying so. */
#include "common.h"

#define MiB (1024L * 1024L)
#define DISK_SIZE (16 * MiB)

/* The whole of a DISK_SIZE file, or NULL (a CHECK failed). */
static unsigned char *read_image(const char *path) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f)
        return NULL;
    unsigned char *data = malloc(DISK_SIZE);
    size_t got = fread(data, 1, DISK_SIZE, f);
    int longer = fgetc(f) != EOF;
    fclose(f);
    CHECK(got == DISK_SIZE && !longer, "%s has %zu bytes%s, want %ld", path, got, longer ? " or more" : "",
          DISK_SIZE);
    if (got != DISK_SIZE || longer) {
        free(data);
        return NULL;
    }
    return data;
}

int main(void) {
    const char *endpoint = getenv("KNIB_S3_ENDPOINT");
    if (!endpoint || !*endpoint) {
        printf("vault: SKIPPED: KNIB_S3_ENDPOINT is not set (no S3 server): start one with "
               "`bash scripts/ceph.sh start` and `eval \"$(bash scripts/ceph.sh env)\"`\n");
        return 0;
    }
    /* The vault reads the endpoint from AWS_ENDPOINT_URL. */
    setenv("AWS_ENDPOINT_URL", endpoint, 0);
    const char *bucket = getenv("KNIB_S3_BUCKET");
    if (!bucket || !*bucket)
        bucket = "knib-test";
    char vault[256];
    snprintf(vault, sizeof vault, "s3://%s/c-vault-%ld-%ld", bucket, (long)getpid(), (long)time(NULL));

    const char *dir = make_temp_dir();
    char disk[600], store[600], out[600], src[600];
    snprintf(disk, sizeof disk, "%s/root.qcow2", dir);
    snprintf(store, sizeof store, "%s/store", dir);
    snprintf(out, sizeof out, "%s/restored.raw", dir);
    snprintf(src, sizeof src, "%s/source.raw", dir);
    RUN_OK("qemu-img create -q -f qcow2 '%s' %ld", disk, DISK_SIZE);

    knib_context *ctx = NULL;
    EXPECT(knib_context_new(&ctx), KNIB_RESULT_OK, NULL);

    /* The store: a full backup, a change, an incremental. */
    char full[128] = "", inc[128] = "";
    RUN_OK("qemu-io -f qcow2 -c 'write -P 0x5a 0 3M' -c 'write -P 0x17 9M 64k' '%s'", disk);
    char *a = call_op(ctx, "backup", "{\"schema\": 1, \"store\": \"%s\", \"vm\": \"c-vault\", "
                      "\"disks\": [{\"name\": \"root\", \"path\": \"%s\"}]}", store, disk);
    if (a) {
        CHECK(json_string(a, "id", full, sizeof full), "no id: %s", a);
        knib_string_free(a);
    }
    RUN_OK("qemu-io -f qcow2 -c 'write -P 0xa5 1M 2M' -c 'write -z 9M 32k' -c 'write -P 0x33 15M 1M' '%s'", disk);
    a = call_op(ctx, "backup", "{\"schema\": 1, \"store\": \"%s\", \"vm\": \"c-vault\", "
                "\"disks\": [{\"name\": \"root\", \"path\": \"%s\"}]}", store, disk);
    if (a) {
        CHECK(json_string(a, "id", inc, sizeof inc), "no id: %s", a);
        CHECK(strstr(a, "\"kind\":\"incremental\""), "the second backup: %s", a);
        knib_string_free(a);
    }
    /* The disk's bytes now: what the incremental holds. */
    RUN_OK("qemu-img convert -q -O raw '%s' '%s'", disk, src);

    /* Sync: both backups sent, parent first; a second sync sends nothing. */
    a = call_op(ctx, "sync", "{\"schema\": 1, \"store\": \"%s\", \"to\": \"%s\", \"parallel_parts\": 2}", store,
                vault);
    if (a) {
        char want[400];
        snprintf(want, sizeof want, "\"sent\":[\"%s\",\"%s\"]", full, inc);
        CHECK(strstr(a, want) && strstr(a, "\"present\":[]"), "sync: %s", a);
        knib_string_free(a);
    }
    a = call_op(ctx, "sync", "{\"schema\": 1, \"store\": \"%s\", \"to\": \"%s\"}", store, vault);
    if (a) {
        CHECK(strstr(a, "\"sent\":[]") && strstr(a, "\"bytes_sent\":0"), "second sync: %s", a);
        knib_string_free(a);
    }

    /* List the vault: the two backups. */
    a = call_op(ctx, "list", "{\"schema\": 1, \"store\": \"%s\"}", vault);
    if (a) {
        CHECK(count(a, "\"id\":") == 2 && strstr(a, full) && strstr(a, inc), "list: %s", a);
        knib_string_free(a);
    }

    /* Restore the incremental from the vault: the disk's bytes exactly. */
    a = call_op(ctx, "restore", "{\"schema\": 1, \"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
                "\"to\": \"%s\", \"format\": \"raw\"}", vault, inc, out);
    knib_string_free(a);
    unsigned char *want = read_image(src), *got = read_image(out);
    if (want && got) {
        for (long i = 0; i < DISK_SIZE; i++) {
            if (want[i] != got[i]) {
                CHECK(0, "restored byte %ld is 0x%02x, the disk's is 0x%02x", i, got[i], want[i]);
                break;
            }
        }
    }
    free(want);
    free(got);

    /* A backup the vault does not have: not found, naming it. */
    char *none = NULL;
    char req[1024];
    snprintf(req, sizeof req, "{\"schema\": 1, \"store\": \"%s\", \"backup\": \"20000101-000000000-0000\"}", vault);
    EXPECT(knib_call(ctx, "show", req, &none), KNIB_RESULT_NOT_FOUND, ctx);
    CHECK(none == NULL, "an answer on failure");
    CHECK(strstr(last_error(ctx), "20000101-000000000-0000"), "message: %s", last_error(ctx));

    /* Clean up the vault: the child, then the parent; nothing is left. */
    a = call_op(ctx, "delete", "{\"schema\": 1, \"store\": \"%s\", \"backup\": \"%s\"}", vault, inc);
    knib_string_free(a);
    a = call_op(ctx, "delete", "{\"schema\": 1, \"store\": \"%s\", \"backup\": \"%s\"}", vault, full);
    knib_string_free(a);
    a = call_op(ctx, "list", "{\"schema\": 1, \"store\": \"%s\"}", vault);
    if (a) {
        CHECK(strcmp(a, "[]") == 0, "the vault after the deletes: %s", a);
        knib_string_free(a);
    }

    knib_context_free(ctx);
    remove_tree(dir);
    printf("vault: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}

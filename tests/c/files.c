/* File-level restore through the C API: a disk with a GPT and an ext4
 * partition made without mounting (mkfs.ext4 -d, sfdisk, qemu-img), backed
 * up; its filesystems listed, a directory listed, one file extracted with
 * its bytes, mode and mtime; a path with `..` refused. */
#include "common.h"

int main(void) {
    const char *dir = make_temp_dir();
    char src[600], img[600], raw[600], disk[600], store[600], out[600];
    snprintf(src, sizeof src, "%s/src", dir);
    snprintf(img, sizeof img, "%s/ext.img", dir);
    snprintf(raw, sizeof raw, "%s/disk.raw", dir);
    snprintf(disk, sizeof disk, "%s/disk.qcow2", dir);
    snprintf(store, sizeof store, "%s/store", dir);
    snprintf(out, sizeof out, "%s/hello.out", dir);

    /* In braces: run() sends the whole command's output to /dev/null. */
    RUN_OK("mkdir -p '%s/etc/app' && { printf 'hello, world\\n' > '%s/etc/app/hello.conf'; }", src, src);
    RUN_OK("chmod 0640 '%s/etc/app/hello.conf' && touch -d @1600000000 '%s/etc/app/hello.conf'", src, src);
    RUN_OK("mkfs.ext4 -q -F -L data -d '%s' '%s' 16M", src, img);
    RUN_OK("truncate -s 18M '%s' && echo 'label: gpt\nstart=2048, size=32768' | sfdisk -q '%s'", raw, raw);
    RUN_OK("dd if='%s' of='%s' bs=1M seek=1 conv=notrunc status=none", img, raw);
    RUN_OK("qemu-img convert -q -f raw -O qcow2 '%s' '%s'", raw, disk);

    knib_context *ctx = NULL;
    EXPECT(knib_context_new(&ctx), KNIB_RESULT_OK, NULL);
    char id[128] = "";
    char *a = call(ctx, knib_backup, "{\"store\": \"%s\", \"vm\": \"app\", "
                   "\"disks\": [{\"name\": \"root\", \"path\": \"%s\"}]}", store, disk);
    if (a) {
        CHECK(json_string(a, "id", id, sizeof id), "no id: %s", a);
        knib_string_free(a);
    }

    a = call(ctx, knib_files_fs, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\"}", store, id);
    if (a) {
        CHECK(count(a, "\"index\":") == 1 && strstr(a, "\"index\":1") && strstr(a, "\"partition\":1") &&
                  strstr(a, "\"start\":1048576") && strstr(a, "\"size\":16777216") &&
                  strstr(a, "\"type\":\"ext4\"") && strstr(a, "\"label\":\"data\""),
              "files_fs: %s", a);
        knib_string_free(a);
    }
    a = call(ctx, knib_files_ls, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
             "\"fs\": 1, \"path\": \"/etc/app\"}", store, id);
    if (a) {
        CHECK(count(a, "\"name\":") == 1 && strstr(a, "\"name\":\"hello.conf\"") && strstr(a, "\"mode\":416") &&
                  strstr(a, "\"mtime\":1600000000") && strstr(a, "\"size\":13") &&
                  strstr(a, "\"type\":\"file\"") && !strstr(a, "\"target\""),
              "files_ls: %s", a);
        knib_string_free(a);
    }
    a = call(ctx, knib_files_get, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
             "\"path\": \"/etc/app/hello.conf\", \"to\": \"%s\"}", store, id, out);
    if (a) {
        CHECK(strstr(a, "\"files\":1") && strstr(a, "\"dirs\":0") && strstr(a, "\"symlinks\":0") &&
                  strstr(a, "\"bytes\":13"),
              "files_get: %s", a);
        knib_string_free(a);
    }
    char buf[64] = "";
    FILE *f = fopen(out, "r");
    CHECK(f != NULL, "cannot open %s", out);
    if (f) {
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
    }
    CHECK(strcmp(buf, "hello, world\n") == 0, "extracted: %s", buf);
    struct stat st;
    CHECK(stat(out, &st) == 0 && (st.st_mode & 07777) == 0640 && st.st_mtime == 1600000000,
          "mode %o mtime %ld", (unsigned)(st.st_mode & 07777), (long)st.st_mtime);

    /* A path with `..`: refused, naming it; nothing written. */
    char *none = NULL;
    char req[2048], bad[700];
    snprintf(bad, sizeof bad, "%s/bad.out", dir);
    snprintf(req, sizeof req, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\", "
             "\"path\": \"/etc/../../etc/passwd\", \"to\": \"%s\"}", store, id, bad);
    EXPECT(knib_files_get(ctx, req, &none), KNIB_RESULT_INVALID_INPUT, ctx);
    CHECK(none == NULL, "an answer on failure");
    CHECK(strstr(last_error(ctx), "has a `..` component"), "message: %s", last_error(ctx));
    CHECK(access(bad, F_OK) != 0, "%s was written", bad);
    /* The same operation by name. */
    snprintf(req, sizeof req, "{\"store\": \"%s\", \"backup\": \"%s\", \"volume\": \"root\"}", store, id);
    EXPECT(knib_call(ctx, "files.fs", req, &none), KNIB_RESULT_OK, ctx);
    knib_string_free(none);

    knib_context_free(ctx);
    remove_tree(dir);
    printf("files: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}

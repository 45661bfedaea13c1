/* Feeds every entry point NULLs, bad handles and bad JSON, forces a panic
 * inside the library, and cancels (and times out) an operation halfway:
 * each must come back as its code, with nothing written to the outputs,
 * no partial file left, and the process going on. */
#include "common.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>

typedef knib_result (*op_fn)(knib_context *, const char *, char **);

static const struct {
    const char *name;
    op_fn fn;
} OPS[] = {
    {"backup", knib_backup},
    {"list", knib_list},
    {"show", knib_show},
    {"delete", knib_delete},
    {"restore", knib_restore},
    {"quick_restore", knib_quick_restore},
    {"compress", knib_compress},
    {"verify", knib_verify},
    {"hash", knib_hash},
    {"recover", knib_recover},
    {"files.fs", knib_files_fs},
    {"files.ls", knib_files_ls},
    {"files.get", knib_files_get},
};
#define N_OPS (sizeof OPS / sizeof OPS[0])

/* What a `char *` output must still hold after a failed call. */
static char untouched_target;
#define UNTOUCHED (&untouched_target)

/* A handle knib never made (the freed one is made in main). */
#define NEVER_MADE ((knib_context *)(uintptr_t)0x7ead0000beef0010ULL)

/* Names of partial files no failed operation may leave behind. */
#define PARTIAL_NAMES ".comp\0.part\0.tmp\0"

static void count_progress(void *userdata, const char *step, double percent) {
    (void)step;
    (void)percent;
    atomic_fetch_add((atomic_int *)userdata, 1);
}

static void noop_log(void *userdata, knib_log_level level, const char *message) {
    (void)userdata;
    (void)level;
    (void)message;
}

/* Every operation, through its function and through knib_call. */
static void operations_get_nulls_and_bad_handles(knib_context *ctx, knib_context *freed) {
    for (size_t i = 0; i < N_OPS; i++) {
        const char *op = OPS[i].name;
        char *out = UNTOUCHED;
        EXPECT(OPS[i].fn(NULL, "{}", &out), KNIB_RESULT_NULL_ARGUMENT, NULL);
        EXPECT(OPS[i].fn(ctx, NULL, &out), KNIB_RESULT_NULL_ARGUMENT, NULL);
        CHECK(strstr(last_error(ctx), "`request_json` is NULL"), "%s: %s", op, last_error(ctx));
        EXPECT(OPS[i].fn(ctx, "{}", NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
        CHECK(strstr(last_error(ctx), "`answer_out` is NULL"), "%s: %s", op, last_error(ctx));
        EXPECT(OPS[i].fn(NEVER_MADE, "{}", &out), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(OPS[i].fn(freed, "{}", &out), KNIB_RESULT_BAD_HANDLE, NULL);

        EXPECT(knib_call(NULL, op, "{}", &out), KNIB_RESULT_NULL_ARGUMENT, NULL);
        EXPECT(knib_call(ctx, op, NULL, &out), KNIB_RESULT_NULL_ARGUMENT, NULL);
        EXPECT(knib_call(ctx, op, "{}", NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
        EXPECT(knib_call(NEVER_MADE, op, "{}", &out), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(knib_call(freed, op, "{}", &out), KNIB_RESULT_BAD_HANDLE, NULL);
        CHECK(out == UNTOUCHED, "%s wrote its output on failure", op);
    }
    char *out = UNTOUCHED;
    EXPECT(knib_call(ctx, NULL, "{}", &out), KNIB_RESULT_NULL_ARGUMENT, NULL);
    CHECK(strstr(last_error(ctx), "`op` is NULL"), "%s", last_error(ctx));
    EXPECT(knib_call(ctx, "explode", "{}", &out), KNIB_RESULT_INVALID_INPUT, NULL);
    CHECK(strstr(last_error(ctx), "unknown operation \"explode\""), "%s", last_error(ctx));
    EXPECT(knib_call(ctx, "version", "{\"x\": \"\xff\"}", &out), KNIB_RESULT_INVALID_INPUT, NULL);
    CHECK(strstr(last_error(ctx), "`request_json` is not UTF-8"), "%s", last_error(ctx));
    EXPECT(knib_call(ctx, "vers\xffion", "{}", &out), KNIB_RESULT_INVALID_INPUT, NULL);
    CHECK(strstr(last_error(ctx), "`op` is not UTF-8"), "%s", last_error(ctx));
    CHECK(out == UNTOUCHED, "knib_call wrote its output on failure");
}

/* The entry points that are not operations. */
static void the_rest_gets_nulls_and_bad_handles(knib_context *ctx, knib_context *freed) {
    knib_context *const handles[] = {NEVER_MADE, freed};
    EXPECT(knib_context_new(NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_set_progress(NULL, count_progress, NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_set_timeout(NULL, 5), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_cancel(NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_test_panic(NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);

    char buf[64] = "";
    size_t needed = 12345;
    int consistent = 7;
    EXPECT(knib_context_error_message(NULL, buf, sizeof buf, &needed), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_error_message(ctx, NULL, sizeof buf, &needed), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_error_message(ctx, buf, sizeof buf, NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_error_vm_consistent(NULL, &consistent), KNIB_RESULT_NULL_ARGUMENT, NULL);
    EXPECT(knib_context_error_vm_consistent(ctx, NULL), KNIB_RESULT_NULL_ARGUMENT, NULL);
    for (size_t i = 0; i < 2; i++) {
        knib_context *h = handles[i];
        EXPECT(knib_context_set_progress(h, count_progress, NULL), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(knib_context_set_timeout(h, 5), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(knib_context_cancel(h), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(knib_test_panic(h), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(knib_context_error_message(h, buf, sizeof buf, &needed), KNIB_RESULT_BAD_HANDLE, NULL);
        EXPECT(knib_context_error_vm_consistent(h, &consistent), KNIB_RESULT_BAD_HANDLE, NULL);
    }
    CHECK(needed == 12345 && consistent == 7 && buf[0] == 0, "an output was written on failure");

    /* NULL callbacks and userdata are allowed: they remove the callback. */
    EXPECT(knib_context_set_progress(ctx, NULL, NULL), KNIB_RESULT_OK, ctx);
    EXPECT(knib_set_log_callback(noop_log, NULL, 6), KNIB_RESULT_INVALID_INPUT, NULL);
    EXPECT(knib_set_log_callback(noop_log, NULL, KNIB_LOG_LEVEL_TRACE), KNIB_RESULT_OK, NULL);
    EXPECT(knib_set_log_callback(NULL, NULL, KNIB_LOG_LEVEL_TRACE), KNIB_RESULT_OK, NULL);

    /* Freeing NULL, a handle never made, or twice, does nothing. */
    knib_string_free(NULL);
    knib_context_free(NULL);
    knib_context_free(NEVER_MADE);
    knib_context_free(freed);
    CHECK(strcmp(knib_result_name(KNIB_RESULT_BAD_HANDLE), "bad handle") == 0, "name");
    CHECK(strcmp(knib_result_name(9999), "unknown") == 0, "name of 9999");
}

/* Calls `fn` with `request`; it must fail with `want` and a message
 * holding `needle`, writing no answer. */
static void refused(knib_context *ctx, const char *op, op_fn fn, const char *request, knib_result want,
                    const char *needle) {
    char *out = UNTOUCHED;
    knib_result r = fn(ctx, request, &out);
    CHECK(r == want, "%s %s: got %s, want %s: %s", op, request, knib_result_name(r), knib_result_name(want),
          last_error(ctx));
    CHECK(strstr(last_error(ctx), needle), "%s %s: message lacks [%s]: %s", op, request, needle, last_error(ctx));
    CHECK(out == UNTOUCHED, "%s wrote its output on failure", op);
    int consistent = 7;
    EXPECT(knib_context_error_vm_consistent(ctx, &consistent), KNIB_RESULT_OK, ctx);
    CHECK(consistent == -1, "vm_consistent %d after a bad request", consistent);
}

static void bad_requests_name_the_field(knib_context *ctx) {
    for (size_t i = 0; i < N_OPS; i++) {
        const char *op = OPS[i].name;
        refused(ctx, op, OPS[i].fn, "{not json", KNIB_RESULT_INVALID_INPUT, "is not valid JSON");
        refused(ctx, op, OPS[i].fn, "[1, 2]", KNIB_RESULT_INVALID_INPUT, "must be a JSON object");
        refused(ctx, op, OPS[i].fn, "{\"bogus_field\": 1}", KNIB_RESULT_INVALID_INPUT,
                "unknown field `bogus_field`");
        refused(ctx, op, OPS[i].fn, "{\"schema\": 2}", KNIB_RESULT_INVALID_INPUT, "field `schema` is 2");
    }
    refused(ctx, "restore", knib_restore, "{\"store\": \"/x\", \"backup\": \"b\", \"volume\": \"v\"}",
            KNIB_RESULT_INVALID_INPUT, "missing field `to`");
    refused(ctx, "backup", knib_backup, "{\"vm\": \"v\"}", KNIB_RESULT_INVALID_INPUT, "missing field `store`");
    /* A field of the wrong type: the message shows the value and the type
     * that was expected. */
    refused(ctx, "compress", knib_compress, "{\"store\": \"/x\", \"backup\": \"b\", \"coroutines\": \"many\"}",
            KNIB_RESULT_INVALID_INPUT, "invalid type: string \"many\", expected u32");
    refused(ctx, "backup", knib_backup, "{\"store\": \"/x\", \"vm\": \"v\", \"full\": \"yes\"}",
            KNIB_RESULT_INVALID_INPUT, "invalid type: string \"yes\", expected a boolean");
    refused(ctx, "show", knib_show, "{\"store\": \"/nonexistent/store\", \"backup\": \"b\"}",
            KNIB_RESULT_NOT_FOUND, "/nonexistent/store");
}

static void a_small_buffer_gets_the_size(knib_context *ctx) {
    char *out = UNTOUCHED;
    EXPECT(knib_show(ctx, "{\"bogus_field\": true}", &out), KNIB_RESULT_INVALID_INPUT, NULL);
    char full[1024];
    size_t needed = 0;
    EXPECT(knib_context_error_message(ctx, full, sizeof full, &needed), KNIB_RESULT_OK, ctx);
    CHECK(needed == strlen(full) + 1 && needed > 8, "needed %zu for [%s]", needed, full);

    char small[8];
    memset(small, 'Z', sizeof small);
    size_t needed2 = 0;
    EXPECT(knib_context_error_message(ctx, small, sizeof small, &needed2), KNIB_RESULT_BUFFER_TOO_SMALL, NULL);
    CHECK(needed2 == needed, "needed %zu, want %zu", needed2, needed);
    for (size_t i = 0; i < sizeof small; i++)
        CHECK(small[i] == 'Z', "byte %zu of a too small buffer was written", i);
    EXPECT(knib_context_error_message(ctx, small, 0, &needed2), KNIB_RESULT_BUFFER_TOO_SMALL, NULL);

    char *exact = malloc(needed);
    EXPECT(knib_context_error_message(ctx, exact, needed, &needed2), KNIB_RESULT_OK, ctx);
    CHECK(strcmp(exact, full) == 0, "[%s] != [%s]", exact, full);
    free(exact);
}

static void a_panic_comes_back_as_a_code(knib_context *ctx) {
    EXPECT(knib_test_panic(ctx), KNIB_RESULT_PANIC, NULL);
    CHECK(strstr(last_error(ctx), "knib_test_panic was called"), "%s", last_error(ctx));
    EXPECT(knib_test_panic(ctx), KNIB_RESULT_PANIC, NULL);
    /* The process and the context go on. */
    char *out = NULL;
    EXPECT(knib_call(ctx, "version", "{}", &out), KNIB_RESULT_OK, ctx);
    CHECK(out && strstr(out, KNIB_VERSION), "version: %s", out ? out : "(null)");
    knib_string_free(out);
    CHECK(strcmp(last_error(ctx), "") == 0, "error not cleared: %s", last_error(ctx));
}

/* A budget too large for the clock is no limit: every call works as with
 * none (and never comes back as a panic). */
static void a_huge_timeout_means_no_limit(knib_context *ctx) {
    const int64_t budgets[] = {INT64_MAX, INT64_MAX - 1, INT64_MAX / 2, (int64_t)1 << 40, UINT32_MAX, INT64_MIN};
    for (size_t i = 0; i < sizeof budgets / sizeof budgets[0]; i++) {
        EXPECT(knib_context_set_timeout(ctx, budgets[i]), KNIB_RESULT_OK, ctx);
        char *out = NULL;
        EXPECT(knib_call(ctx, "version", "{}", &out), KNIB_RESULT_OK, ctx);
        CHECK(out && strstr(out, KNIB_VERSION), "budget %lld: version: %s", (long long)budgets[i],
              out ? out : "(null)");
        knib_string_free(out);
        out = UNTOUCHED;
        EXPECT(knib_list(ctx, "{\"store\": \"/nonexistent/store\"}", &out), KNIB_RESULT_NOT_FOUND, ctx);
        CHECK(strstr(last_error(ctx), "/nonexistent/store"), "budget %lld: %s", (long long)budgets[i],
              last_error(ctx));
        CHECK(out == UNTOUCHED, "output written on failure");
    }
    EXPECT(knib_context_set_timeout(ctx, 0), KNIB_RESULT_OK, ctx);
}

struct job {
    knib_context *ctx;
    op_fn fn;
    char request[2048];
    knib_result result;
    char *answer;
};

static void *run_job(void *arg) {
    struct job *j = arg;
    j->answer = UNTOUCHED;
    j->result = j->fn(j->ctx, j->request, &j->answer);
    return NULL;
}

/* Wait until `counter` is positive (at most a minute). */
static int wait_for(atomic_int *counter) {
    for (int i = 0; i < 6000 && atomic_load(counter) == 0; i++)
        sleep_ms(10);
    return atomic_load(counter) > 0;
}

static void stopped_halfway(const char *dir) {
    char disk[600], store[600], req[2048];
    snprintf(disk, sizeof disk, "%s/big.qcow2", dir);
    snprintf(store, sizeof store, "%s/store", dir);
    /* 32 MiB of data: at 1 MB/s a compression takes half a minute. */
    RUN_OK("qemu-img create -q -f qcow2 '%s' 128M", disk);
    RUN_OK("qemu-io -c 'write -P 0x5a 0 16M' -c 'write -P 0xa5 64M 16M' '%s'", disk);

    knib_context *ctx = NULL;
    EXPECT(knib_context_new(&ctx), KNIB_RESULT_OK, NULL);
    atomic_int progress = 0;
    EXPECT(knib_context_set_progress(ctx, count_progress, &progress), KNIB_RESULT_OK, ctx);
    snprintf(req, sizeof req, "{\"store\": \"%s\", \"vm\": \"big\", \"disks\": [{\"name\": \"d\", \"path\": \"%s\"}]}",
             store, disk);
    char *out = NULL, id[128] = "";
    EXPECT(knib_backup(ctx, req, &out), KNIB_RESULT_OK, ctx);
    CHECK(out && json_string(out, "id", id, sizeof id), "backup: %s", out ? out : "(null)");
    knib_string_free(out);

    /* Cancelled before it starts: the next operation stops at once, then
     * the context works again. */
    EXPECT(knib_context_cancel(ctx), KNIB_RESULT_OK, ctx);
    out = UNTOUCHED;
    EXPECT(knib_backup(ctx, req, &out), KNIB_RESULT_CANCELLED, NULL);
    CHECK(out == UNTOUCHED, "output written on cancel");
    /* The same for an operation that takes no control (delete, version):
     * the cancel was used up unseen and the backup deleted. */
    char del[1024];
    snprintf(del, sizeof del, "{\"store\": \"%s\", \"backup\": \"%s\"}", store, id);
    EXPECT(knib_context_cancel(ctx), KNIB_RESULT_OK, ctx);
    out = UNTOUCHED;
    EXPECT(knib_delete(ctx, del, &out), KNIB_RESULT_CANCELLED, ctx);
    CHECK(out == UNTOUCHED, "output written on cancel");
    CHECK(strstr(last_error(ctx), "cancelled"), "%s", last_error(ctx));
    EXPECT(knib_context_cancel(ctx), KNIB_RESULT_OK, ctx);
    out = UNTOUCHED;
    EXPECT(knib_call(ctx, "version", "{}", &out), KNIB_RESULT_CANCELLED, ctx);
    CHECK(out == UNTOUCHED, "output written on cancel");
    snprintf(req, sizeof req, "{\"store\": \"%s\"}", store);
    out = NULL;
    EXPECT(knib_list(ctx, req, &out), KNIB_RESULT_OK, ctx);
    CHECK(out && count(out, "\"id\":") == 1, "list: %s", out ? out : "(null)");
    knib_string_free(out);

    /* Cancelled from this thread while it runs on another. */
    struct job j = {.ctx = ctx, .fn = knib_compress};
    snprintf(j.request, sizeof j.request, "{\"store\": \"%s\", \"backup\": \"%s\", \"rate_limit_mbps\": 1}", store, id);
    atomic_store(&progress, 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, run_job, &j) == 0, "pthread_create");
    CHECK(wait_for(&progress), "no progress from the compression");
    out = UNTOUCHED;
    EXPECT(knib_list(ctx, req, &out), KNIB_RESULT_BUSY, NULL);
    CHECK(out == UNTOUCHED, "output written when busy");
    /* The refused call leaves the last error alone: it is the running
     * operation's (none yet: the list before it succeeded). */
    CHECK(strcmp(last_error(ctx), "") == 0, "a busy call set the last error: %s", last_error(ctx));
    EXPECT(knib_context_cancel(ctx), KNIB_RESULT_OK, ctx);
    pthread_join(t, NULL);
    EXPECT(j.result, KNIB_RESULT_CANCELLED, ctx);
    CHECK(strstr(last_error(ctx), "cancelled"), "%s", last_error(ctx));
    CHECK(j.answer == UNTOUCHED, "output written on cancel");
    const char *left = find_name(store, PARTIAL_NAMES);
    CHECK(left == NULL, "a partial file is left: %s", left);

    /* The backup is intact and uncompressed. */
    snprintf(req, sizeof req, "{\"store\": \"%s\", \"backup\": \"%s\"}", store, id);
    out = NULL;
    EXPECT(knib_verify(ctx, req, &out), KNIB_RESULT_OK, ctx);
    CHECK(out && strstr(out, "\"ok\":true"), "verify: %s", out ? out : "(null)");
    knib_string_free(out);
    out = NULL;
    EXPECT(knib_show(ctx, req, &out), KNIB_RESULT_OK, ctx);
    CHECK(out && strstr(out, "\"compression\":null"), "show: %s", out ? out : "(null)");
    knib_string_free(out);

    /* A VM another process works on: the busy error is the operation's
     * own and says who holds the VM (the C API left it empty before). */
    int ready[2];
    CHECK(pipe(ready) == 0, "pipe");
    pid_t holder = fork();
    if (holder == 0) {
        char lock[700];
        snprintf(lock, sizeof lock, "%s/vms/big/.lock", store);
        int fd = open(lock, O_RDWR | O_CREAT, 0644);
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
        if (fd < 0 || fcntl(fd, F_SETLK, &fl) != 0 || ftruncate(fd, 0) != 0 || write(fd, "a C test", 8) != 8 ||
            write(ready[1], "x", 1) != 1)
            _exit(1);
        pause();
        _exit(0);
    }
    char got = 0;
    CHECK(read(ready[0], &got, 1) == 1, "the lock holder did not start");
    out = UNTOUCHED;
    EXPECT(knib_delete(ctx, del, &out), KNIB_RESULT_BUSY, NULL);
    CHECK(out == UNTOUCHED, "output written when busy");
    CHECK(strstr(last_error(ctx), "VM big is busy: a C test is running"), "%s", last_error(ctx));
    kill(holder, SIGKILL);
    waitpid(holder, NULL, 0);
    close(ready[0]);
    close(ready[1]);

    /* Out of time: the same, with KNIB_RESULT_TIMEOUT. */
    EXPECT(knib_context_set_timeout(ctx, 1), KNIB_RESULT_OK, ctx);
    out = UNTOUCHED;
    EXPECT(knib_compress(ctx, j.request, &out), KNIB_RESULT_TIMEOUT, NULL);
    CHECK(strstr(last_error(ctx), "time budget"), "%s", last_error(ctx));
    CHECK(out == UNTOUCHED, "output written on timeout");
    left = find_name(store, PARTIAL_NAMES);
    CHECK(left == NULL, "a partial file is left: %s", left);
    EXPECT(knib_context_set_timeout(ctx, 0), KNIB_RESULT_OK, ctx);

    /* Freed while an operation runs on another thread: the operation ends
     * (cancelled here), and the handle is dead at once. */
    struct job k = j;
    atomic_store(&progress, 0);
    CHECK(pthread_create(&t, NULL, run_job, &k) == 0, "pthread_create");
    CHECK(wait_for(&progress), "no progress from the compression");
    EXPECT(knib_context_cancel(ctx), KNIB_RESULT_OK, ctx);
    knib_context_free(ctx);
    EXPECT(knib_context_cancel(ctx), KNIB_RESULT_BAD_HANDLE, NULL);
    pthread_join(t, NULL);
    CHECK(k.result == KNIB_RESULT_CANCELLED, "got %s", knib_result_name(k.result));
    left = find_name(store, PARTIAL_NAMES);
    CHECK(left == NULL, "a partial file is left: %s", left);
}

/* The operations on running VMs reach libvirt: a domain that does not
 * exist is not found (or, with no libvirt daemon, a hypervisor error). */
static void live_operations_reach_libvirt(knib_context *ctx, const char *dir) {
    char reqs[4][1024];
    snprintf(reqs[0], sizeof reqs[0], "{\"store\": \"%s/store\", \"backup\": \"b\", \"domain\": \"knib-c-none\"}", dir);
    snprintf(reqs[1], sizeof reqs[1], "{\"domain\": \"knib-c-none\"}");
    snprintf(reqs[2], sizeof reqs[2], "{\"store\": \"%s/store\", \"domain\": \"knib-c-none\"}", dir);
    snprintf(reqs[3], sizeof reqs[3],
             "{\"domain\": \"knib-c-none\", \"merges\": [{\"parent\": \"/x\", \"child\": \"/y\"}]}");
    const char *ops[4] = {"quick_restore", "agent.consolidate", "recover", "agent.merge_snapshot"};
    for (int i = 0; i < 4; i++) {
        char *out = UNTOUCHED;
        knib_result r = knib_call(ctx, ops[i], reqs[i], &out);
        CHECK(r == KNIB_RESULT_NOT_FOUND || r == KNIB_RESULT_HYPERVISOR, "%s %s: got %s: %s", ops[i], reqs[i],
              knib_result_name(r), last_error(ctx));
        CHECK(out == UNTOUCHED, "output written on failure");
    }
}

int main(void) {
    knib_context *ctx = NULL, *freed = NULL;
    EXPECT(knib_context_new(&ctx), KNIB_RESULT_OK, NULL);
    EXPECT(knib_context_new(&freed), KNIB_RESULT_OK, NULL);
    CHECK(ctx && freed && ctx != freed, "handles %p %p", (void *)ctx, (void *)freed);
    knib_context_free(freed);

    const char *dir = make_temp_dir();
    operations_get_nulls_and_bad_handles(ctx, freed);
    the_rest_gets_nulls_and_bad_handles(ctx, freed);
    bad_requests_name_the_field(ctx);
    a_small_buffer_gets_the_size(ctx);
    a_panic_comes_back_as_a_code(ctx);
    a_huge_timeout_means_no_limit(ctx);
    if (!getenv("KNIB_TEST_NO_LIBVIRT"))
        live_operations_reach_libvirt(ctx, dir);
    stopped_halfway(dir);
    knib_context_free(ctx);
    remove_tree(dir);

    printf("hostile: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}

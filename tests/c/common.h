/* Helpers shared by the C tests of knib: checks, commands, temporary
 * directories, error messages and a little JSON picking. */
#ifndef KNIB_TEST_COMMON_H
#define KNIB_TEST_COMMON_H

#define _XOPEN_SOURCE 700

#include <knib.h>

#include <dirent.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HELPER static __attribute__((unused))

static int failures;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        if (!(cond)) {                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                         \
            fputc('\n', stderr);                                                  \
            failures++;                                                           \
        }                                                                         \
    } while (0)

/* The last error of `ctx` (empty when none), in a static buffer. */
HELPER const char *last_error(knib_context *ctx) {
    static char buf[4096];
    size_t needed = 0;
    knib_result r = knib_context_error_message(ctx, buf, sizeof buf, &needed);
    if (r != KNIB_RESULT_OK)
        snprintf(buf, sizeof buf, "(no message: %s)", knib_result_name(r));
    return buf;
}

/* Fail the test unless `r` is `want`, showing the context's message. */
#define EXPECT(r, want, ctx)                                                           \
    do {                                                                               \
        knib_result got_ = (r);                                                        \
        CHECK(got_ == (want), "got %u (%s), want %u (%s): %s", (unsigned)got_,          \
              knib_result_name(got_), (unsigned)(want), knib_result_name(want),        \
              (ctx) ? last_error(ctx) : "");                                           \
    } while (0)

/* Run a shell command line built like printf; its output goes to
 * /dev/null. Returns its exit status (-1 if it could not run). */
HELPER int run(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char line[4200];
    snprintf(line, sizeof line, "%s >/dev/null 2>&1", cmd);
    int st = system(line);
    if (st == -1 || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

#define RUN_OK(...)                                                 \
    do {                                                            \
        int rc_ = run(__VA_ARGS__);                                 \
        if (rc_ != 0) {                                             \
            fprintf(stderr, "%s:%d: command failed (%d)\n", __FILE__, __LINE__, rc_); \
            exit(2);                                                \
        }                                                           \
    } while (0)

HELPER char *make_temp_dir(void) {
    const char *tmp = getenv("TMPDIR");
    static char path[512];
    snprintf(path, sizeof path, "%s/knib-c-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(path)) {
        perror("mkdtemp");
        exit(2);
    }
    return path;
}

HELPER int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

HELPER void remove_tree(const char *path) {
    nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *names_found;
static char found_name[1024];

HELPER int look_for_names(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    const char *base = path + ftw->base;
    for (const char *n = names_found; *n; n += strlen(n) + 1) {
        if (strstr(base, n)) {
            snprintf(found_name, sizeof found_name, "%s", path);
            return 1;
        }
    }
    return 0;
}

/* The first path under `dir` whose name contains one of the strings of
 * `needles` (separated by NULs, ended by an empty one), or NULL. */
HELPER const char *find_name(const char *dir, const char *needles) {
    names_found = needles;
    found_name[0] = 0;
    return nftw(dir, look_for_names, 16, FTW_PHYS) == 1 ? found_name : NULL;
}

/* The string value of the first `"key":"..."` in `json`, copied into
 * `out`; 0 when there is none. knib's answers are compact JSON. */
HELPER int json_string(const char *json, const char *key, char *out, size_t len) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(json, pat);
    if (!p)
        return 0;
    p += strlen(pat);
    const char *end = strchr(p, '"');
    if (!end || (size_t)(end - p) >= len)
        return 0;
    memcpy(out, p, (size_t)(end - p));
    out[end - p] = 0;
    return 1;
}

HELPER int count(const char *haystack, const char *needle) {
    int n = 0;
    for (const char *p = strstr(haystack, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

HELPER void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Run operation function `op` with the request built like printf;
 * returns the answer (free it) or NULL after reporting the failure. */
HELPER char *call(knib_context *ctx, knib_result (*op)(knib_context *, const char *, char **),
                  const char *fmt, ...) {
    char req[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(req, sizeof req, fmt, ap);
    va_end(ap);
    char *answer = NULL;
    knib_result r = op(ctx, req, &answer);
    EXPECT(r, KNIB_RESULT_OK, ctx);
    if (getenv("KNIB_TEST_VERBOSE") && answer)
        fprintf(stderr, "%s\n  -> %s\n", req, answer);
    return r == KNIB_RESULT_OK ? answer : NULL;
}

/* As call(), for an operation named (knib_call). */
HELPER char *call_op(knib_context *ctx, const char *op, const char *fmt, ...) {
    char req[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(req, sizeof req, fmt, ap);
    va_end(ap);
    char *answer = NULL;
    knib_result r = knib_call(ctx, op, req, &answer);
    EXPECT(r, KNIB_RESULT_OK, ctx);
    if (getenv("KNIB_TEST_VERBOSE") && answer)
        fprintf(stderr, "%s %s\n  -> %s\n", op, req, answer);
    return r == KNIB_RESULT_OK ? answer : NULL;
}

#endif

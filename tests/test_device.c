/* Device selection, context lifetime, errors and the program cache. */
#include "program_cache.h"
#include "test_util.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define N_ITEMS 64

static const char *const SELFTEST[] = {"selftest.cl"};

/* ------------------------------------------------------------ helpers */

/* A context of its own (fresh in-memory cache) on the test device: what a
 * second process would see, without the cost of a new cl_context. */
static clkvq_context *fresh_ctx(void) {
    clkvq_context *base = test_ctx(), *ctx = NULL;
    ck_assert_int_eq(clkvq_context_wrap(&ctx, clkvq_context_cl_context(base),
                                        clkvq_context_cl_device(base),
                                        clkvq_context_cl_queue(base)),
                     CLKVQ_OK);
    return ctx;
}

static clkvq_program_stats stats_of(const clkvq_context *ctx) {
    clkvq_program_stats s;
    clkvq_program_stats_get(ctx, &s);
    return s;
}

/* Builds (or loads) selftest.cl on ctx and checks that it adds 1 everywhere. */
static void check_selftest_runs(clkvq_context *ctx) {
    cl_kernel kernel;
    clkvq_status st = clkvq_kernel_get(ctx, SELFTEST, 1, "", "clkvq_selftest", &kernel);
    ck_assert_msg(st == CLKVQ_OK, "%s: %s", clkvq_status_string(st), clkvq_last_error(ctx));
    int host[N_ITEMS];
    for (int i = 0; i < N_ITEMS; i++) host[i] = 3 * i;
    cl_int err;
    cl_mem buf = clCreateBuffer(clkvq_context_cl_context(ctx),
                                CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, sizeof host, host, &err);
    ck_assert_int_eq(err, CL_SUCCESS);
    cl_command_queue queue = clkvq_context_cl_queue(ctx);
    size_t global = N_ITEMS;
    ck_assert_int_eq(clSetKernelArg(kernel, 0, sizeof buf, &buf), CL_SUCCESS);
    ck_assert_int_eq(clEnqueueNDRangeKernel(queue, kernel, 1, NULL, &global, NULL, 0, NULL, NULL),
                     CL_SUCCESS);
    ck_assert_int_eq(clEnqueueReadBuffer(queue, buf, CL_TRUE, 0, sizeof host, host, 0, NULL, NULL),
                     CL_SUCCESS);
    clReleaseMemObject(buf);
    for (int i = 0; i < N_ITEMS; i++) ck_assert_int_eq(host[i], 3 * i + 1);
}

static char g_tmp_dir[256];
static char *g_saved_cache_env;

/* Each cache test gets an empty CLKVQ_CACHE_DIR, so counters are exact. */
static void cache_setup(void) {
    const char *old = getenv("CLKVQ_CACHE_DIR");
    g_saved_cache_env = old ? strdup(old) : NULL;
    snprintf(g_tmp_dir, sizeof g_tmp_dir, "/tmp/clkvq-test-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_tmp_dir));
    setenv("CLKVQ_CACHE_DIR", g_tmp_dir, 1);
}

static void remove_tree(const char *path) {
    DIR *dir = opendir(path);
    if (dir) {
        struct dirent *e;
        while ((e = readdir(dir))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char child[1024];
            snprintf(child, sizeof child, "%s/%s", path, e->d_name);
            remove_tree(child);
        }
        closedir(dir);
    }
    remove(path);
}

static void cache_teardown(void) {
    remove_tree(g_tmp_dir);
    if (g_saved_cache_env)
        setenv("CLKVQ_CACHE_DIR", g_saved_cache_env, 1);
    else
        unsetenv("CLKVQ_CACHE_DIR");
    free(g_saved_cache_env);
    g_saved_cache_env = NULL;
}

/* Entries in dir whose name contains `part`; the last one's path in path. */
static int count_files(const char *dir_path, const char *part, char *path, size_t size) {
    int n = 0;
    DIR *dir = opendir(dir_path);
    if (!dir) return 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (e->d_name[0] == '.' || !strstr(e->d_name, part)) continue;
        n++;
        /* a cut path would name the wrong file: leave it empty instead */
        if (path && snprintf(path, size, "%s/%s", dir_path, e->d_name) >= (int)size)
            path[0] = '\0';
    }
    closedir(dir);
    return n;
}

/* The one program file in the current cache dir (tests build one program). */
static void program_file(char *path, size_t size) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/programs", g_tmp_dir);
    ck_assert_int_eq(count_files(dir, ".bin", path, size), 1);
    ck_assert_int_eq(count_files(dir, ".tmp", NULL, 0), 0);
}

static unsigned char *slurp(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    *size = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(*size + 1);
    ck_assert_uint_eq(fread(data, 1, *size, f), *size);
    fclose(f);
    data[*size] = 0;
    return data;
}

static void spit(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, size, f), size);
    fclose(f);
}

/* Byte offset of the binary in a program file (see program_cache.h). */
static size_t binary_offset(const unsigned char *data) {
    size_t key_len =
        data[8] | (size_t)data[9] << 8 | (size_t)data[10] << 16 | (size_t)data[11] << 24;
    return 8 + 4 + key_len + 8 + 8;
}

/* Builds selftest.cl once so the cache dir holds a good file. */
static void populate_cache(void) {
    clkvq_context *ctx = fresh_ctx();
    check_selftest_runs(ctx);
    ck_assert_int_eq(stats_of(ctx).builds, 1);
    clkvq_context_release(ctx);
}

/* After a damaged file: rejected, rebuilt, correct, rewritten whole. */
static void check_rejected_and_healed(void) {
    clkvq_context *ctx = fresh_ctx();
    check_selftest_runs(ctx);
    clkvq_program_stats s = stats_of(ctx);
    ck_assert_int_ge(s.disk_rejects, 1);
    ck_assert_int_eq(s.disk_hits, 0);
    ck_assert_int_eq(s.builds, 1);
    clkvq_context_release(ctx);

    ctx = fresh_ctx();
    check_selftest_runs(ctx);
    s = stats_of(ctx);
    ck_assert_int_eq(s.disk_hits, 1);
    ck_assert_int_eq(s.disk_rejects, 0);
    ck_assert_int_eq(s.builds, 0);
    clkvq_context_release(ctx);
}

/* ------------------------------------------------------------ status, context */

START_TEST(test_status_strings) {
    for (int a = CLKVQ_OK; a <= CLKVQ_ERR_OUT_OF_BLOCKS; a++) {
        const char *sa = clkvq_status_string((clkvq_status)a);
        ck_assert_ptr_nonnull(sa);
        ck_assert_msg(strncmp(sa, "CLKVQ_", 6) == 0, "status %d: \"%s\"", a, sa);
        for (int b = CLKVQ_OK; b < a; b++)
            ck_assert_str_ne(sa, clkvq_status_string((clkvq_status)b));
    }
}
END_TEST

START_TEST(test_create_default_and_index) {
    const char *specs[] = {NULL, "", "0"};
    for (int i = 0; i < 3; i++) {
        clkvq_context *ctx = NULL;
        clkvq_status st = clkvq_context_create(&ctx, specs[i]);
        ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
        ck_assert_ptr_nonnull(clkvq_context_cl_context(ctx));
        ck_assert_ptr_nonnull(clkvq_context_cl_device(ctx));
        ck_assert_ptr_nonnull(clkvq_context_cl_queue(ctx));
        ck_assert(clkvq_last_device_ms(ctx) == -1.0);
        cl_command_queue_properties props = 0;
        clGetCommandQueueInfo(clkvq_context_cl_queue(ctx), CL_QUEUE_PROPERTIES, sizeof props,
                              &props, NULL);
        ck_assert(props & CL_QUEUE_PROFILING_ENABLE);
        clkvq_context_release(ctx);
    }
}
END_TEST

START_TEST(test_create_by_name) {
    clkvq_device_info info;
    ck_assert_int_eq(clkvq_context_device_info(test_ctx(), &info), CLKVQ_OK);
    /* A case-changed piece of the device name must select it too. */
    char spec[8];
    snprintf(spec, sizeof spec, "%.4s", info.name);
    for (char *p = spec; *p; p++)
        *p = (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : (*p >= 'A' && *p <= 'Z' ? *p + 32 : *p));
    clkvq_context *ctx = NULL;
    ck_assert_int_eq(clkvq_context_create(&ctx, spec), CLKVQ_OK);
    clkvq_context_release(ctx);
}
END_TEST

START_TEST(test_create_no_match) {
    clkvq_context *ctx = (clkvq_context *)1;
    const char *spec = "no-such-device-zq9";
    ck_assert_int_eq(clkvq_context_create(&ctx, spec), CLKVQ_ERR_NO_DEVICE);
    ck_assert_ptr_null(ctx);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(NULL), spec));
    ck_assert_int_eq(clkvq_context_create(&ctx, "999"), CLKVQ_ERR_NO_DEVICE);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(NULL), "999"));
}
END_TEST

START_TEST(test_wrap_builds_and_runs) {
    clkvq_context *ctx = fresh_ctx();
    ck_assert_ptr_eq(clkvq_context_cl_queue(ctx), clkvq_context_cl_queue(test_ctx()));
    check_selftest_runs(ctx);
    clkvq_context_release(ctx);
    /* The wrapper retained, so releasing it left the owner's objects alive. */
    check_selftest_runs(test_ctx());
}
END_TEST

START_TEST(test_wrap_mismatched_queue) {
    clkvq_context *other = NULL, *ctx = NULL;
    ck_assert_int_eq(clkvq_context_create(&other, NULL), CLKVQ_OK);
    clkvq_context *base = test_ctx();
    ck_assert_int_eq(clkvq_context_wrap(&ctx, clkvq_context_cl_context(base),
                                        clkvq_context_cl_device(base),
                                        clkvq_context_cl_queue(other)),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(NULL), "queue"));
    clkvq_context_release(other);
}
END_TEST

START_TEST(test_null_args) {
    clkvq_context *ctx = test_ctx(), *out = NULL;
    clkvq_device_info info;
    cl_program program;
    cl_kernel kernel;

    ck_assert_int_eq(clkvq_context_create(NULL, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_str_ne(clkvq_last_error(NULL), "");
    ck_assert_int_eq(clkvq_context_wrap(&out, NULL, NULL, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(NULL), "cl_ctx"));
    ck_assert_int_eq(clkvq_context_device_info(NULL, &info), CLKVQ_ERR_INVALID_ARG);
    ck_assert_str_ne(clkvq_last_error(NULL), "");
    ck_assert_int_eq(clkvq_context_device_info(ctx, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_str_ne(clkvq_last_error(ctx), "");
    ck_assert_int_eq(clkvq_list_devices(NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_dir(ctx, "x", NULL, 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_atomic_write(ctx, NULL, "", 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_program_get(NULL, SELFTEST, 1, "", &program), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_program_get(ctx, NULL, 1, "", &program), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_program_get(ctx, SELFTEST, 1, "", NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_kernel_get(ctx, SELFTEST, 1, "", NULL, &kernel), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_program_get(ctx, (const char *[]){"missing.cl"}, 1, "", &program),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "missing.cl"));
    ck_assert_int_eq(clkvq_kernel_get(ctx, SELFTEST, 1, "", "no_such_kernel", &kernel),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "no_such_kernel"));
    ck_assert_ptr_null(clkvq_context_cl_context(NULL));
    ck_assert_ptr_null(clkvq_context_cl_device(NULL));
    ck_assert_ptr_null(clkvq_context_cl_queue(NULL));
    ck_assert(clkvq_last_device_ms(NULL) == -1.0);
    clkvq_context_release(NULL);
}
END_TEST

START_TEST(test_device_info_and_list) {
    clkvq_device_info info;
    ck_assert_int_eq(clkvq_context_device_info(test_ctx(), &info), CLKVQ_OK);
    ck_assert_str_ne(info.name, "");
    ck_assert_str_ne(info.platform, "");
    ck_assert_int_gt(info.compute_units, 0);
    ck_assert_uint_gt(info.max_work_group_size, 0);
    ck_assert_uint_gt(info.local_mem_bytes, 0);
    ck_assert_uint_ge(info.global_mem_bytes, info.max_alloc_bytes);
    size_t len = strlen(info.device_key);
    ck_assert_uint_gt(len, 3);
    ck_assert_ptr_null(strstr(info.device_key, "__"));
    ck_assert(info.device_key[0] != '_' && info.device_key[len - 1] != '_');
    for (size_t i = 0; i < len; i++) {
        char c = info.device_key[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '_' || c == '-';
        ck_assert_msg(ok, "bad character '%c' in device key %s", c, info.device_key);
    }
    char cu[16];
    snprintf(cu, sizeof cu, "_%d", info.compute_units);
    ck_assert_str_eq(info.device_key + len - strlen(cu), cu);

    char listing[4096] = "";
    FILE *f = tmpfile();
    ck_assert_int_eq(clkvq_list_devices(f), CLKVQ_OK);
    rewind(f);
    size_t n = fread(listing, 1, sizeof listing - 1, f);
    listing[n] = '\0';
    fclose(f);
    ck_assert_msg(strncmp(listing, "0: ", 3) == 0, "listing: %s", listing);
    ck_assert_ptr_nonnull(strstr(listing, info.name));
}
END_TEST

/* ------------------------------------------------------------ program cache */

static double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

START_TEST(test_cache_build_memory_disk) {
    clkvq_context *ctx = fresh_ctx();
    double t0 = wall_seconds();
    check_selftest_runs(ctx);
    double first_run = wall_seconds() - t0;
    clkvq_program_stats s = stats_of(ctx);
    ck_assert_int_eq(s.builds, 1);
    ck_assert_int_eq(s.disk_hits, 0);
    double first_build = s.build_seconds;

    cl_program a, b;
    ck_assert_int_eq(clkvq_program_get(ctx, SELFTEST, 1, "", &a), CLKVQ_OK);
    ck_assert_int_eq(clkvq_program_get(ctx, SELFTEST, 1, NULL, &b), CLKVQ_OK);
    ck_assert_ptr_eq(a, b);
    s = stats_of(ctx);
    ck_assert_int_ge(s.memory_hits, 2);
    ck_assert_int_eq(s.builds, 1);
    clkvq_context_release(ctx);

    /* A whole new context (not a wrap) on the same cache dir. */
    ck_assert_int_eq(clkvq_context_create(&ctx, NULL), CLKVQ_OK);
    t0 = wall_seconds();
    check_selftest_runs(ctx);
    double disk_run = wall_seconds() - t0;
    s = stats_of(ctx);
    ck_assert_int_eq(s.disk_hits, 1);
    ck_assert_int_eq(s.builds, 0);
    ck_assert_int_eq(s.disk_rejects, 0);
    /* Wall times include the first launch: some drivers (PoCL) finish compiling there. */
    printf("selftest.cl: clBuildProgram %.3f s from source, %.3f s from disk cache; "
           "first run %.3f s vs %.3f s\n",
           first_build, s.build_seconds, first_run, disk_run);
    clkvq_context_release(ctx);

    char path[512];
    program_file(path, sizeof path);
}
END_TEST

START_TEST(test_cache_options_in_key) {
    clkvq_context *ctx = fresh_ctx();
    cl_program a, b;
    ck_assert_int_eq(clkvq_program_get(ctx, SELFTEST, 1, "", &a), CLKVQ_OK);
    ck_assert_int_eq(clkvq_program_get(ctx, SELFTEST, 1, "-DUNUSED_DEFINE=1", &b), CLKVQ_OK);
    ck_assert_ptr_ne(a, b);
    ck_assert_int_eq(stats_of(ctx).builds, 2);
    clkvq_context_release(ctx);
}
END_TEST

START_TEST(test_cache_key_records_exact_division) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    size_t size;
    unsigned char *data = slurp(path, &size);
    ck_assert(memcmp(data, "CLKVQPB1", 8) == 0);
    cl_device_fp_config fp = 0;
    clGetDeviceInfo(clkvq_context_cl_device(test_ctx()), CL_DEVICE_SINGLE_FP_CONFIG, sizeof fp, &fp,
                    NULL);
    data[binary_offset(data) - 16] = 0; /* the key string ends there */
    int has_option = strstr((char *)data + 12, "-cl-fp32-correctly-rounded-divide-sqrt") != NULL;
    ck_assert_int_eq(has_option, (fp & CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT) != 0);
    free(data);
}
END_TEST

START_TEST(test_cache_flipped_binary) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    size_t size;
    unsigned char *data = slurp(path, &size);
    size_t off = binary_offset(data);
    ck_assert_uint_gt(size, off + 16);
    for (size_t i = off + (size - off) / 2; i < off + (size - off) / 2 + 8; i++) data[i] ^= 0x5a;
    spit(path, data, size);
    free(data);
    check_rejected_and_healed();
}
END_TEST

START_TEST(test_cache_truncated) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    size_t size;
    unsigned char *data = slurp(path, &size);
    spit(path, data, size / 2);
    free(data);
    check_rejected_and_healed();
    /* Cut inside the header too. */
    program_file(path, sizeof path);
    spit(path, "CLKVQPB1\x05", 9);
    check_rejected_and_healed();
}
END_TEST

START_TEST(test_cache_garbage) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    unsigned char junk[4096];
    uint64_t seed = 42;
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (unsigned char)(test_uniform(&seed) * 256);
    spit(path, junk, sizeof junk);
    check_rejected_and_healed();
}
END_TEST

START_TEST(test_cache_wrong_key) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    size_t size;
    unsigned char *data = slurp(path, &size);
    data[12 + 3] ^= 0x20; /* same length, different key string */
    spit(path, data, size);
    free(data);
    check_rejected_and_healed();
}
END_TEST

/* A file that passes every header check but holds a binary the driver
 * refuses: the last line of defence. */
START_TEST(test_cache_driver_rejects) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    size_t size;
    unsigned char *data = slurp(path, &size);
    size_t off = binary_offset(data);
    for (size_t i = off; i < size; i++) data[i] = (unsigned char)(i * 131 + 7);
    uint64_t sum = clkvq_fnv1a64(CLKVQ_FNV_OFFSET, data + off, size - off);
    for (int i = 0; i < 8; i++) data[off - 8 + i] = (unsigned char)(sum >> (8 * i));
    spit(path, data, size);
    free(data);
    check_rejected_and_healed();
}
END_TEST

/* A directory where the entry should be: not read (stdio would report it as
 * LONG_MAX bytes, and an ASan build aborts on that allocation), counted as a
 * reject, rebuilt; a directory cannot be replaced, so every process pays a
 * build, and it stays as it was. */
START_TEST(test_cache_directory_entry) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    ck_assert_int_eq(remove(path), 0);
    ck_assert_int_eq(mkdir(path, 0755), 0);
    for (int round = 0; round < 2; round++) {
        clkvq_context *ctx = fresh_ctx();
        check_selftest_runs(ctx);
        clkvq_program_stats s = stats_of(ctx);
        ck_assert_int_eq(s.disk_rejects, 1);
        ck_assert_int_eq(s.disk_hits, 0);
        ck_assert_int_eq(s.builds, 1);
        clkvq_context_release(ctx);
    }
    struct stat sb;
    ck_assert(stat(path, &sb) == 0 && S_ISDIR(sb.st_mode));
}
END_TEST

/* A FIFO there must not block the open (nobody will ever write to it). */
START_TEST(test_cache_fifo_entry) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    ck_assert_int_eq(remove(path), 0);
    ck_assert_int_eq(mkfifo(path, 0644), 0);
    check_rejected_and_healed();
}
END_TEST

/* A file past CLKVQ_PROGRAM_FILE_MAX is refused by its size, unread, and
 * replaced by a good entry: one just past the cap, and one (8 TiB, where the
 * file system allows it) that no allocation could hold, which a reader that
 * tried would take for a missing file or, under ASan, abort on. Sparse:
 * they cost no disk. */
START_TEST(test_cache_oversized_entry) {
    populate_cache();
    char path[512];
    program_file(path, sizeof path);
    struct stat sb;
    ck_assert_int_eq(stat(path, &sb), 0);
    const off_t good_size = sb.st_size;
    const off_t sizes[] = {(off_t)CLKVQ_PROGRAM_FILE_MAX + 1, (off_t)1 << 43};
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(path, "r+b");
        ck_assert_ptr_nonnull(f);
        int cut = ftruncate(fileno(f), sizes[i]);
        fclose(f);
        if (cut != 0 && i > 0) continue; /* the file system's limit is lower */
        ck_assert_int_eq(cut, 0);
        ck_assert(stat(path, &sb) == 0 && sb.st_size == sizes[i]);
        check_rejected_and_healed();
        ck_assert(stat(path, &sb) == 0 && sb.st_size == good_size);
    }
}
END_TEST

START_TEST(test_cache_unwritable_dir) {
    /* A cache path under a regular file can never be created. */
    char file[512], dir[600];
    snprintf(file, sizeof file, "%s/plain-file", g_tmp_dir);
    spit(file, "x", 1);
    snprintf(dir, sizeof dir, "%s/sub", file);
    setenv("CLKVQ_CACHE_DIR", dir, 1);
    clkvq_context *ctx = fresh_ctx();
    check_selftest_runs(ctx);
    ck_assert_int_eq(stats_of(ctx).builds, 1);
    ck_assert_str_eq(clkvq_last_error(ctx), "");
    char buf[1024];
    ck_assert_int_eq(clkvq_cache_dir(ctx, "programs", buf, sizeof buf), CLKVQ_ERR_IO);
    ck_assert_str_ne(clkvq_last_error(ctx), "");
    clkvq_context_release(ctx);
}
END_TEST

START_TEST(test_build_errors) {
    clkvq_context *ctx = fresh_ctx();
    cl_program program;
    clkvq_status st =
        clkvq_program_get(ctx, SELFTEST, 1, "-DCLKVQ_SELFTEST_SYNTAX_ERROR", &program);
    ck_assert_int_eq(st, CLKVQ_ERR_BUILD);
    const char *msg = clkvq_last_error(ctx);
    ck_assert_ptr_nonnull(strstr(msg, "build log"));
    ck_assert_msg(strstr(msg, "undeclared_name") != NULL, "log lacks the error: %s", msg);

    st = clkvq_program_get(ctx, SELFTEST, 1, "-cl-no-such-option-zq", &program);
    ck_assert_int_eq(st, CLKVQ_ERR_BUILD);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "-cl-no-such-option-zq"));
    /* Failures are not cached: the good program still builds. */
    check_selftest_runs(ctx);
    clkvq_context_release(ctx);
}
END_TEST

/* ------------------------------------------------------------ files */

static void check_dir_is(clkvq_context *ctx, const char *expect) {
    char buf[1024];
    ck_assert_int_eq(clkvq_cache_dir(ctx, "tuning", buf, sizeof buf), CLKVQ_OK);
    ck_assert_str_eq(buf, expect);
    struct stat sb;
    ck_assert_int_eq(stat(buf, &sb), 0);
    ck_assert(S_ISDIR(sb.st_mode));
}

START_TEST(test_cache_dir_precedence) {
    clkvq_context *ctx = test_ctx();
    const char *names[] = {"XDG_CACHE_HOME", "HOME"};
    char *saved[2];
    for (int i = 0; i < 2; i++) saved[i] = getenv(names[i]) ? strdup(getenv(names[i])) : NULL;
    char a[400], x[400], h[400], expect[600];
    snprintf(a, sizeof a, "%s/a/deep", g_tmp_dir);
    snprintf(x, sizeof x, "%s/xdg", g_tmp_dir);
    snprintf(h, sizeof h, "%s/home", g_tmp_dir);
    setenv("CLKVQ_CACHE_DIR", a, 1);
    setenv("XDG_CACHE_HOME", x, 1);
    setenv("HOME", h, 1);
    snprintf(expect, sizeof expect, "%s/tuning", a);
    check_dir_is(ctx, expect);
    setenv("CLKVQ_CACHE_DIR", "", 1); /* empty means unset */
    snprintf(expect, sizeof expect, "%s/clkvq/tuning", x);
    check_dir_is(ctx, expect);
    unsetenv("XDG_CACHE_HOME");
    snprintf(expect, sizeof expect, "%s/.cache/clkvq/tuning", h);
    check_dir_is(ctx, expect);

    char small[8];
    ck_assert_int_eq(clkvq_cache_dir(ctx, "tuning", small, sizeof small),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);
    for (int i = 0; i < 2; i++) {
        if (saved[i])
            setenv(names[i], saved[i], 1);
        else
            unsetenv(names[i]);
        free(saved[i]);
    }
}
END_TEST

START_TEST(test_atomic_write) {
    clkvq_context *ctx = test_ctx();
    char path[512];
    snprintf(path, sizeof path, "%s/file.json", g_tmp_dir);
    ck_assert_int_eq(clkvq_atomic_write(ctx, path, "first", 5), CLKVQ_OK);
    ck_assert_int_eq(clkvq_atomic_write(ctx, path, "second!", 7), CLKVQ_OK);
    size_t size;
    unsigned char *data = slurp(path, &size);
    ck_assert_uint_eq(size, 7);
    ck_assert_str_eq((char *)data, "second!");
    free(data);
    ck_assert_int_eq(count_files(g_tmp_dir, "", NULL, 0), 1);

    snprintf(path, sizeof path, "%s/missing-dir/file.json", g_tmp_dir);
    ck_assert_int_eq(clkvq_atomic_write(ctx, path, "x", 1), CLKVQ_ERR_IO);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "missing-dir"));
    ck_assert_int_eq(count_files(g_tmp_dir, "", NULL, 0), 1);
}
END_TEST

static Suite *device_suite(void) {
    Suite *s = suite_create("device");
    TCase *tc = tcase_create("context");
    tcase_add_test(tc, test_status_strings);
    tcase_add_test(tc, test_create_default_and_index);
    tcase_add_test(tc, test_create_by_name);
    tcase_add_test(tc, test_create_no_match);
    tcase_add_test(tc, test_wrap_builds_and_runs);
    tcase_add_test(tc, test_wrap_mismatched_queue);
    tcase_add_test(tc, test_null_args);
    tcase_add_test(tc, test_device_info_and_list);
    suite_add_tcase(s, tc);

    tc = tcase_create("program_cache");
    tcase_add_checked_fixture(tc, cache_setup, cache_teardown);
    tcase_add_test(tc, test_cache_build_memory_disk);
    tcase_add_test(tc, test_cache_options_in_key);
    tcase_add_test(tc, test_cache_key_records_exact_division);
    tcase_add_test(tc, test_cache_flipped_binary);
    tcase_add_test(tc, test_cache_truncated);
    tcase_add_test(tc, test_cache_garbage);
    tcase_add_test(tc, test_cache_wrong_key);
    tcase_add_test(tc, test_cache_driver_rejects);
    tcase_add_test(tc, test_cache_directory_entry);
    tcase_add_test(tc, test_cache_fifo_entry);
    tcase_add_test(tc, test_cache_oversized_entry);
    tcase_add_test(tc, test_cache_unwritable_dir);
    tcase_add_test(tc, test_build_errors);
    tcase_add_test(tc, test_cache_dir_precedence);
    tcase_add_test(tc, test_atomic_write);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return test_run_suite(device_suite());
}

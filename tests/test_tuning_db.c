/* The tuning database (lib/tuning_db.c): the file format's parser and
 * writer, merge-on-store under concurrent writers, the lookup chain and
 * what clkvq_tuning_show reports. Each test has its own cache directory. */
#include "test_hooks.h"
#include "test_util.h"
#include "tuning_db.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* the build's embedded results/tuning/ files (cmake/embed_tuning.cmake) */
typedef struct {
    const char *name;
    const char *text;
} embedded_tuning_file;
extern const embedded_tuning_file clkvq_embedded_tuning[];

/* ------------------------------------------------------------ fixtures */

static char g_dir[256];

static void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char sub[1024];
            snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
            remove_tree(sub);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* A fresh, empty cache directory per test: nothing one test stores can
 * reach another, nor the user's ~/.cache. */
static void setup(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/clkvq-tuning-test-XXXXXX");
    if (!mkdtemp(g_dir) || setenv("CLKVQ_CACHE_DIR", g_dir, 1) != 0) {
        perror("mkdtemp/setenv");
        exit(1);
    }
    clkvq_tuning_set_shipped(NULL, NULL, 0); /* no vendor level unless a test plants one */
}

static void teardown(void)
{
    clkvq_tuning_set_shipped(NULL, NULL, -1);
    remove_tree(g_dir);
}

static void device_path(char *buf, size_t size)
{
    clkvq_device_info info;
    clkvq_context_device_info(test_ctx(), &info);
    snprintf(buf, size, "%s/tuning/%s.json", g_dir, info.device_key);
}

static void write_text(const char *path, const char *text)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/tuning", g_dir);
    mkdir(dir, 0755);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)n + 1);
    size_t got = fread(text, 1, (size_t)n, f);
    text[got] = '\0';
    fclose(f);
    return text;
}

/* What show prints, as a string (free it). */
static char *show_text(void)
{
    char *buf = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&buf, &size);
    clkvq_status st = clkvq_tuning_show(test_ctx(), f);
    fclose(f);
    ck_assert_int_eq(st, CLKVQ_OK);
    return buf;
}

/* ------------------------------------------------------------ entries */

static clkvq_tune_shape base_shape(void)
{
    clkvq_tune_shape s = {CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, 32, 128, 32, 8, 4096, 1};
    return s;
}

static clkvq_tune_result make_entry(clkvq_tune_shape shape, clkvq_attn_variant variant, int wgs,
                                    int chunk, int vw, clkvq_layout lk, clkvq_layout lv)
{
    clkvq_tune_result r;
    memset(&r, 0, sizeof r);
    snprintf(r.kernel, sizeof r.kernel, "decode");
    r.shape = shape;
    r.params.attn.variant = variant;
    r.params.attn.wgs = wgs;
    r.params.attn.chunk = chunk;
    r.params.attn.vw = vw;
    r.params.attn.tpl = 4;
    r.params.attn.vwpl = 0;
    r.params.attn.waves = 2;
    r.params.layout_k = lk;
    r.params.layout_v = lv;
    r.default_ms = 2.5;
    r.tuned_ms = 1.25;
    return r;
}

static int params_equal(const clkvq_tune_params *a, const clkvq_tune_params *b)
{
    return a->attn.variant == b->attn.variant && a->attn.wgs == b->attn.wgs &&
           a->attn.chunk == b->attn.chunk && a->attn.vw == b->attn.vw &&
           a->attn.tpl == b->attn.tpl && a->attn.vwpl == b->attn.vwpl &&
           a->attn.waves == b->attn.waves && a->layout_k == b->layout_k &&
           a->layout_v == b->layout_v;
}

static int results_equal(const clkvq_tune_result *a, const clkvq_tune_result *b)
{
    return !strcmp(a->kernel, b->kernel) && !memcmp(&a->shape, &b->shape, sizeof a->shape) &&
           params_equal(&a->params, &b->params) && a->default_ms == b->default_ms &&
           a->tuned_ms == b->tuned_ms;
}

/* A file for any device, written by the test itself from tuning_db.h's
 * format description (an independent writer for the reader to accept). */
static char *file_text(const char *vendor, const char *name, const char *type,
                       const clkvq_tune_result *e, int n)
{
    static const char *const layouts[] = {"token", "planar"};
    size_t cap = 1024 + (size_t)n * 1024;
    char *text = malloc(cap);
    size_t at = (size_t)snprintf(text, cap,
                                 "{\"clkvq_tuning\": 2, \"device\": {\"vendor\": \"%s\", "
                                 "\"name\": \"%s\", \"driver\": \"9.9\", \"compute_units\": 7, "
                                 "\"type\": \"%s\"}, \"entries\": [",
                                 vendor, name, type);
    for (int i = 0; i < n; i++)
        at += (size_t)snprintf(
            text + at, cap - at,
            "%s{\"kernel\": \"decode\", \"shape\": {\"scheme\": \"%s\", \"format_k\": \"%s\", "
            "\"format_v\": \"%s\", \"group_size\": %d, \"head_dim\": %d, \"n_q_heads\": %d, "
            "\"n_kv_heads\": %d, \"tokens\": %d, \"batch\": %d}, \"params\": {\"variant\": "
            "\"%s\", \"wgs\": %d, \"chunk\": %d, \"vw\": %d, \"tpl\": %d, \"vwpl\": %d, "
            "\"waves\": %d, \"layout_k\": \"%s\", \"layout_v\": \"%s\"}, \"default_ms\": %.17g, "
            "\"tuned_ms\": %.17g}",
            i ? ", " : "", clkvq_scheme_name(e[i].shape.scheme),
            clkvq_format_get(e[i].shape.format_k)->name,
            clkvq_format_get(e[i].shape.format_v)->name, e[i].shape.group_size, e[i].shape.head_dim,
            e[i].shape.n_q_heads, e[i].shape.n_kv_heads, e[i].shape.tokens, e[i].shape.batch,
            e[i].params.attn.variant == CLKVQ_ATTN_SERIAL ? "serial" : "cooperative",
            e[i].params.attn.wgs, e[i].params.attn.chunk, e[i].params.attn.vw,
            e[i].params.attn.tpl, e[i].params.attn.vwpl, e[i].params.attn.waves,
            layouts[e[i].params.layout_k], layouts[e[i].params.layout_v], e[i].default_ms,
            e[i].tuned_ms);
    snprintf(text + at, cap - at, "]}\n");
    return text;
}

/* ------------------------------------------------------------ parser */

static const char GOOD[] =
    "{\"clkvq_tuning\": 2,\n"
    " \"device\": {\"vendor\": \"Acme\", \"name\": \"Rocket 9000\", \"driver\": \"1.2.3\",\n"
    "            \"compute_units\": 64, \"type\": \"gpu\"},\n"
    " \"entries\": [\n"
    "  {\"kernel\": \"decode\",\n"
    "   \"shape\": {\"scheme\": \"token\", \"format_k\": \"q4\", \"format_v\": \"q2\",\n"
    "             \"group_size\": 32, \"head_dim\": 128, \"n_q_heads\": 32,\n"
    "             \"n_kv_heads\": 8, \"tokens\": 4096, \"batch\": 1},\n"
    "   \"params\": {\"variant\": \"cooperative\", \"wgs\": 64, \"chunk\": 512,\n"
    "              \"vw\": 16, \"tpl\": 4, \"vwpl\": 0, \"waves\": 2,\n"
    "              \"layout_k\": \"token\", \"layout_v\": \"planar\"},\n"
    "   \"default_ms\": 2.5, \"tuned_ms\": 1.9},\n"
    "  {\"kernel\": \"prefill\", \"anything\": [1, {\"a\": null}]},\n"
    "  {\"kernel\": \"decode\",\n"
    "   \"shape\": {\"scheme\": \"skvq\", \"format_k\": \"q8\", \"format_v\": \"t1.5\",\n"
    "             \"group_size\": 128, \"head_dim\": 128, \"n_q_heads\": 8,\n"
    "             \"n_kv_heads\": 8, \"tokens\": 1024, \"batch\": 4},\n"
    "   \"params\": {\"variant\": \"serial\", \"wgs\": 64, \"chunk\": 256,\n"
    "              \"vw\": 8, \"tpl\": 4, \"vwpl\": 0, \"waves\": 2,\n"
    "              \"layout_k\": \"planar\", \"layout_v\": \"planar\"},\n"
    "   \"default_ms\": 0.75, \"tuned_ms\": 0.5}\n"
    " ]}\n";

START_TEST(parse_good_file)
{
    clkvq_tune_result *e = NULL;
    int n = -1;
    clkvq_device_info dev;
    ck_assert_int_eq(clkvq_tuning_parse(test_ctx(), GOOD, &e, &n, &dev), CLKVQ_OK);
    ck_assert_int_eq(n, 2); /* the prefill entry is skipped */
    clkvq_tune_shape s0 = {CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, 32, 128, 32, 8, 4096, 1};
    clkvq_tune_result want0 = make_entry(s0, CLKVQ_ATTN_COOPERATIVE, 64, 512, 16,
                                         CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_GROUP_PLANAR);
    want0.default_ms = 2.5;
    want0.tuned_ms = 1.9;
    clkvq_tune_shape s1 = {CLKVQ_SCHEME_SKVQ, CLKVQ_FMT_Q8, CLKVQ_FMT_T15, 128, 128, 8, 8, 1024, 4};
    clkvq_tune_result want1 = make_entry(s1, CLKVQ_ATTN_SERIAL, 64, 256, 8,
                                         CLKVQ_LAYOUT_GROUP_PLANAR, CLKVQ_LAYOUT_GROUP_PLANAR);
    want1.default_ms = 0.75;
    want1.tuned_ms = 0.5;
    ck_assert(results_equal(&e[0], &want0) && results_equal(&e[1], &want1));
    ck_assert(!strcmp(dev.vendor, "Acme") && !strcmp(dev.name, "Rocket 9000") &&
              !strcmp(dev.driver_version, "1.2.3") && dev.compute_units == 64 && dev.is_gpu == 1);
    free(e);
    /* device_out may be NULL */
    ck_assert_int_eq(clkvq_tuning_parse(test_ctx(), GOOD, &e, &n, NULL), CLKVQ_OK);
    free(e);
}
END_TEST

/* One edit of GOOD that must make it CORRUPT (first occurrence of from). */
typedef struct {
    const char *from, *to;
} edit;

static const edit BAD_EDITS[] = {
    /* not JSON */
    {"\"entries\": [", "\"entries\": [,"},
    {"\"tuned_ms\": 1.9}", "\"tuned_ms\": 1.9"},
    {" ]}\n", " ]}x\n"},
    {"\"clkvq_tuning\": 2,", "\"clkvq_tuning\": 2,,"},
    {"{\"clkvq_tuning\"", "[{\"clkvq_tuning\""},
    /* wrong types */
    {"\"clkvq_tuning\": 2", "\"clkvq_tuning\": \"2\""},
    {"\"vendor\": \"Acme\"", "\"vendor\": 7"},
    {"\"compute_units\": 64", "\"compute_units\": \"64\""},
    {"\"compute_units\": 64", "\"compute_units\": 64.5"},
    {"\"entries\": [", "\"entries\": 3, \"x\": ["},
    {"\"entries\": [", "\"entries\": [5, "},
    {"\"kernel\": \"decode\"", "\"kernel\": 1"},
    {"\"shape\": {", "\"shape\": 1, \"x\": {"},
    {"\"params\": {", "\"params\": \"p\", \"x\": {"},
    {"\"head_dim\": 128", "\"head_dim\": \"128\""},
    {"\"head_dim\": 128", "\"head_dim\": 128.5"},
    {"\"head_dim\": 128", "\"head_dim\": null"},
    {"\"batch\": 1", "\"batch\": true"},
    {"\"tuned_ms\": 1.9", "\"tuned_ms\": \"fast\""},
    {"\"variant\": \"cooperative\"", "\"variant\": [\"cooperative\"]"},
    /* bad values */
    {"\"type\": \"gpu\"", "\"type\": \"fpga\""},
    {"\"head_dim\": 128", "\"head_dim\": 1e12"},
    {"\"head_dim\": 128", "\"head_dim\": 0"},
    {"\"tokens\": 4096", "\"tokens\": 0"},
    {"\"tokens\": 4096", "\"tokens\": -5"},
    {"\"batch\": 1", "\"batch\": 0"},
    {"\"wgs\": 64", "\"wgs\": 48"},
    {"\"wgs\": 64", "\"wgs\": 0"},
    {"\"chunk\": 512", "\"chunk\": 0"},
    {"\"wgs\": 64", "\"wgs\": 8"},         /* cooperative: under 16 */
    {"\"tpl\": 4", "\"tpl\": 3"},
    {"\"tpl\": 4", "\"tpl\": 0"},
    {"\"vwpl\": 0", "\"vwpl\": 3"},
    {"\"vwpl\": 0", "\"vwpl\": -1"},
    {"\"waves\": 2", "\"waves\": 0"},
    {"\"waves\": 2", "\"waves\": 65"},
    {"\"chunk\": 256,", "\"chunk\": 260,"}, /* serial: not a multiple of vw */
    {"\"vw\": 8", "\"vw\": 12"},           /* serial */
    {"\"variant\": \"cooperative\"", "\"variant\": \"default\""},
    {"\"layout_k\": \"token\"", "\"layout_k\": \"tiled\""},
    {"\"layout_k\": \"planar\"", "\"layout_k\": \"token\""}, /* serial (the first planar) */
    {"\"scheme\": \"token\"", "\"scheme\": \"int4\""},
    {"\"format_k\": \"q4\"", "\"format_k\": \"4\""}, /* the writer never writes aliases */
    {"\"format_v\": \"q2\"", "\"format_v\": \"q5\""},
    {"\"group_size\": 32", "\"group_size\": 48"},
    {"\"group_size\": 32", "\"group_size\": 256"}, /* does not divide head_dim */
    {"\"n_q_heads\": 32", "\"n_q_heads\": 30"},    /* not a multiple of n_kv_heads */
    {"\"tuned_ms\": 1.9", "\"tuned_ms\": 0"},
    {"\"default_ms\": 2.5", "\"default_ms\": -1"},
    {"\"default_ms\": 2.5", "\"default_ms\": 1e999"},
    {"\"name\": \"Rocket 9000\"",
     "\"name\": \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
     "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
     "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
     "xx\""}, /* longer than the info field: truncating would mis-match devices */
};

/* Every field, renamed away (the first occurrence: in the first entry for
 * shape and params fields). */
static const char *const FIELDS[] = {
    "clkvq_tuning", "device",     "vendor",     "name",      "driver",     "compute_units",
    "type",         "entries",    "kernel",     "shape",     "scheme",     "format_k",
    "format_v",     "group_size", "head_dim",   "n_q_heads", "n_kv_heads", "tokens",
    "batch",        "params",     "variant",    "wgs",       "chunk",      "vw",
    "tpl",          "vwpl",       "waves",      "layout_k",  "layout_v",   "default_ms",
    "tuned_ms",
};

/* Applies one edit; NULL when `from` is not in GOOD (a broken test table). */
static char *apply_edit(const char *from, const char *to)
{
    const char *at = strstr(GOOD, from);
    if (!at) return NULL;
    size_t head = (size_t)(at - GOOD), len = strlen(GOOD) + strlen(to) + 1;
    char *text = malloc(len);
    snprintf(text, len, "%.*s%s%s", (int)head, GOOD, to, at + strlen(from));
    return text;
}

/* 1 when text is refused as CORRUPT with a reason and nothing handed out. */
static int refused(const char *text)
{
    clkvq_context *ctx = test_ctx();
    clkvq_tune_result *e = (clkvq_tune_result *)&e;
    int n = -1;
    clkvq_status st = clkvq_tuning_parse(ctx, text, &e, &n, NULL);
    int ok = st == CLKVQ_ERR_CORRUPT && e == NULL && n == 0 && clkvq_last_error(ctx)[0];
    if (st == CLKVQ_OK) free(e);
    return ok;
}

START_TEST(parse_refuses_corrupt_files)
{
    char first_bad[256] = "";
    int n_bad = 0;
    for (size_t i = 0; i < sizeof BAD_EDITS / sizeof BAD_EDITS[0]; i++) {
        char *text = apply_edit(BAD_EDITS[i].from, BAD_EDITS[i].to);
        if (!text || !refused(text)) {
            if (!n_bad++)
                snprintf(first_bad, sizeof first_bad, "edit %zu: %s -> %.60s", i, BAD_EDITS[i].from,
                         BAD_EDITS[i].to);
        }
        free(text);
    }
    for (size_t i = 0; i < sizeof FIELDS / sizeof FIELDS[0]; i++) {
        char from[64], to[64];
        snprintf(from, sizeof from, "\"%s\":", FIELDS[i]);
        snprintf(to, sizeof to, "\"%s_renamed\":", FIELDS[i]);
        char *text = apply_edit(from, to);
        if (!text || !refused(text)) {
            if (!n_bad++) snprintf(first_bad, sizeof first_bad, "missing field %s", FIELDS[i]);
        }
        free(text);
    }
    ck_assert_msg(n_bad == 0, "%d corrupt files accepted, first: %s", n_bad, first_bad);
    ck_assert(refused("") && refused("null") && refused("[]") && refused("{}"));
}
END_TEST

START_TEST(parse_reports_the_reason)
{
    clkvq_context *ctx = test_ctx();
    char *text = apply_edit("\"tpl\": 4", "\"tpl\": 3");
    clkvq_tune_result *e;
    int n;
    ck_assert_int_eq(clkvq_tuning_parse(ctx, text, &e, &n, NULL), CLKVQ_ERR_CORRUPT);
    ck_assert_msg(strstr(clkvq_last_error(ctx), "entries[0]") &&
                      strstr(clkvq_last_error(ctx), "tpl"),
                  "message: %s", clkvq_last_error(ctx));
    free(text);
}
END_TEST

START_TEST(parse_refuses_every_truncation)
{
    /* every prefix that stops before the closing brace; the whole text
     * less its final newline is still the whole file */
    size_t end = (size_t)(strrchr(GOOD, '}') - GOOD);
    char *prefix = malloc(end + 1);
    size_t accepted = 0, first = 0;
    for (size_t len = 0; len <= end; len++) {
        memcpy(prefix, GOOD, len);
        prefix[len] = '\0';
        if (!refused(prefix) && !accepted++) first = len;
    }
    free(prefix);
    ck_assert_msg(accepted == 0, "%zu truncated files accepted, first of %zu bytes", accepted,
                  first);
}
END_TEST

START_TEST(parse_refuses_foreign_version)
{
    clkvq_context *ctx = test_ctx();
    /* version 1 timed the cooperative kernel before the tiled one */
    char *text = apply_edit("\"clkvq_tuning\": 2", "\"clkvq_tuning\": 1");
    clkvq_tune_result *e;
    int n;
    ck_assert_int_eq(clkvq_tuning_parse(ctx, text, &e, &n, NULL), CLKVQ_ERR_CORRUPT);
    ck_assert_msg(strstr(clkvq_last_error(ctx), "version 1"), "message: %s", clkvq_last_error(ctx));
    free(text);
}
END_TEST

START_TEST(parse_refuses_repeated_shapes)
{
    clkvq_tune_result two[2];
    two[0] = make_entry(base_shape(), CLKVQ_ATTN_COOPERATIVE, 64, 256, 16, CLKVQ_LAYOUT_TOKEN_MAJOR,
                        CLKVQ_LAYOUT_TOKEN_MAJOR);
    two[1] = two[0];
    two[1].params.attn.chunk = 512;
    char *text = clkvq_tuning_serialize(test_ctx(), two, 2);
    ck_assert(refused(text));
    free(text);
}
END_TEST

START_TEST(parse_null_arguments)
{
    clkvq_tune_result *e;
    int n;
    ck_assert_int_eq(clkvq_tuning_parse(test_ctx(), NULL, &e, &n, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_tuning_parse(test_ctx(), GOOD, NULL, &n, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_null(clkvq_tuning_serialize(NULL, NULL, 0));
    ck_assert_ptr_null(clkvq_tuning_serialize(test_ctx(), NULL, 1));
}
END_TEST

/* A shipped file that does not parse would silently count for nothing at
 * the vendor level: catch it here instead. */
START_TEST(shipped_files_parse)
{
    int n_files = 0, n_bad = 0;
    char first_bad[512] = "";
    for (const embedded_tuning_file *f = clkvq_embedded_tuning; f->name; f++, n_files++) {
        clkvq_tune_result *e;
        int n;
        if (clkvq_tuning_parse(test_ctx(), f->text, &e, &n, NULL) != CLKVQ_OK) {
            if (!n_bad++)
                snprintf(first_bad, sizeof first_bad, "%s: %s", f->name,
                         clkvq_last_error(test_ctx()));
            continue;
        }
        free(e);
    }
    printf("shipped_files_parse: %d shipped tuning file%s\n", n_files, n_files == 1 ? "" : "s");
    ck_assert_msg(n_bad == 0, "%d of %d shipped files do not parse, first: %s", n_bad, n_files,
                  first_bad);
}
END_TEST

/* ------------------------------------------------------------ serialize */

static clkvq_tune_result random_entry(uint64_t *rng)
{
    static const int dims[] = {64, 96, 128, 256};
    static const int groups[] = {1, 2, 4, 8};
    clkvq_tune_shape s;
    s.scheme = (clkvq_scheme)(test_uniform(rng) * CLKVQ_SCHEME_COUNT);
    s.format_k = (clkvq_format)(test_uniform(rng) * CLKVQ_FMT_COUNT);
    s.format_v = (clkvq_format)(test_uniform(rng) * CLKVQ_FMT_COUNT);
    s.head_dim = dims[(int)(test_uniform(rng) * 4)];
    s.group_size = s.head_dim % 64 == 0 && test_uniform(rng) < 0.5 ? 64 : 32;
    s.n_kv_heads = 1 + (int)(test_uniform(rng) * 8);
    s.n_q_heads = s.n_kv_heads * groups[(int)(test_uniform(rng) * 4)];
    s.tokens = 1 + (int)(test_uniform(rng) * 200000);
    s.batch = 1 + (int)(test_uniform(rng) * 16);
    int serial = test_uniform(rng) < 0.5;
    int wgs = 16 << (int)(test_uniform(rng) * 5), vw = 4 << (int)(test_uniform(rng) * 3);
    int chunk = (serial ? vw : wgs) * (1 + (int)(test_uniform(rng) * 16));
    clkvq_layout lk =
        serial || test_uniform(rng) < 0.5 ? CLKVQ_LAYOUT_GROUP_PLANAR : CLKVQ_LAYOUT_TOKEN_MAJOR;
    clkvq_layout lv =
        serial || test_uniform(rng) < 0.5 ? CLKVQ_LAYOUT_GROUP_PLANAR : CLKVQ_LAYOUT_TOKEN_MAJOR;
    clkvq_tune_result r =
        make_entry(s, serial ? CLKVQ_ATTN_SERIAL : CLKVQ_ATTN_COOPERATIVE, wgs, chunk, vw, lk, lv);
    r.params.attn.tpl = 1 << (int)(test_uniform(rng) * 3);
    r.params.attn.vwpl = (int)(test_uniform(rng) * 3) * 2; /* 0, 2, 4 */
    r.params.attn.waves = 1 + (int)(test_uniform(rng) * 64);
    /* doubles with every bit in use, to see they come back exactly */
    r.tuned_ms = 1e-3 + test_uniform(rng) * 10;
    r.default_ms = r.tuned_ms * (1 + test_uniform(rng));
    return r;
}

START_TEST(serialize_parse_identity)
{
    enum { N = 300 };
    clkvq_tune_result *in = malloc(N * sizeof *in);
    uint64_t rng = 42;
    int n = 0;
    /* random shapes may repeat; the file must not hold a shape twice */
    while (n < N) {
        in[n] = random_entry(&rng);
        int dup = 0;
        for (int j = 0; j < n && !dup; j++)
            dup = clkvq_tuning_shape_distance(&in[j].shape, &in[n].shape) == 0.0;
        n += !dup;
    }
    clkvq_context *ctx = test_ctx();
    char *text = clkvq_tuning_serialize(ctx, in, N);
    ck_assert_ptr_nonnull(text);
    clkvq_tune_result *out;
    int n_out;
    clkvq_device_info dev, info;
    ck_assert_int_eq(clkvq_tuning_parse(ctx, text, &out, &n_out, &dev), CLKVQ_OK);
    ck_assert_int_eq(n_out, N);
    int mismatches = 0;
    for (int i = 0; i < N; i++) mismatches += !results_equal(&in[i], &out[i]);
    ck_assert_int_eq(mismatches, 0);
    clkvq_context_device_info(ctx, &info);
    ck_assert(!strcmp(dev.vendor, info.vendor) && !strcmp(dev.name, info.name) &&
              !strcmp(dev.driver_version, info.driver_version) &&
              dev.compute_units == info.compute_units && dev.is_gpu == info.is_gpu);
    /* and the text is a fixed point */
    char *again = clkvq_tuning_serialize(ctx, out, n_out);
    ck_assert_str_eq(text, again);
    free(again);
    free(text);
    free(out);
    free(in);
}
END_TEST

START_TEST(test_writer_agrees_with_library)
{
    /* the test's own writer (from the header's format description) and
     * the library read the same entries */
    uint64_t rng = 7;
    clkvq_tune_result in[3] = {random_entry(&rng), random_entry(&rng), random_entry(&rng)};
    char *text = file_text("V \\\"x", "N", "cpu", in, 3);
    clkvq_tune_result *out;
    int n;
    ck_assert_int_eq(clkvq_tuning_parse(test_ctx(), text, &out, &n, NULL), CLKVQ_OK);
    ck_assert(n == 3 && results_equal(&in[0], &out[0]) && results_equal(&in[1], &out[1]) &&
              results_equal(&in[2], &out[2]));
    free(out);
    free(text);
}
END_TEST

/* ------------------------------------------------------------ distance */

START_TEST(shape_distance)
{
    clkvq_tune_shape a = base_shape(), b = a;
    ck_assert(clkvq_tuning_shape_distance(&a, &b) == 0.0);
    b.tokens = 8192;
    double tokens = clkvq_tuning_shape_distance(&a, &b);
    b.tokens = 65536;
    double tokens_far = clkvq_tuning_shape_distance(&a, &b);
    b = a;
    b.batch = 8;
    double batch = clkvq_tuning_shape_distance(&a, &b);
    b = a;
    b.head_dim = 64;
    double dim = clkvq_tuning_shape_distance(&a, &b);
    b = a;
    b.n_q_heads = 8; /* GQA group 4 -> 1 */
    double group = clkvq_tuning_shape_distance(&a, &b);
    b = a;
    b.format_v = CLKVQ_FMT_Q2;
    double fmt = clkvq_tuning_shape_distance(&a, &b);
    b = a;
    b.scheme = CLKVQ_SCHEME_KIVI;
    double scheme = clkvq_tuning_shape_distance(&a, &b);
    ck_assert(tokens > 0 && tokens < tokens_far && tokens_far < 100 && batch < 100);
    ck_assert(dim >= 1000 && group >= 1000 && fmt >= 1000 && scheme >= 1000);
    ck_assert(clkvq_tuning_shape_distance(&b, &a) == scheme); /* symmetric */
    /* fp16 packs nothing: formats and group size do not matter */
    a.scheme = b.scheme = CLKVQ_SCHEME_FP16;
    b.format_k = CLKVQ_FMT_Q8;
    b.group_size = 0;
    ck_assert(clkvq_tuning_shape_distance(&a, &b) == 0.0);
}
END_TEST

/* ------------------------------------------------------------ store */

START_TEST(store_merges_by_shape)
{
    clkvq_context *ctx = test_ctx();
    clkvq_tune_shape s2 = base_shape();
    s2.tokens = 1024;
    clkvq_tune_result two[2] = {make_entry(base_shape(), CLKVQ_ATTN_COOPERATIVE, 64, 256, 16,
                                           CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR),
                                make_entry(s2, CLKVQ_ATTN_SERIAL, 64, 128, 8,
                                           CLKVQ_LAYOUT_GROUP_PLANAR, CLKVQ_LAYOUT_GROUP_PLANAR)};
    char path[1024], want[1024];
    ck_assert_int_eq(clkvq_tuning_store(ctx, two, 2, path, sizeof path), CLKVQ_OK);
    device_path(want, sizeof want);
    ck_assert_str_eq(path, want);
    clkvq_tune_result again = two[0];
    again.params.attn.chunk = 1024;
    again.tuned_ms = 0.5;
    ck_assert_int_eq(clkvq_tuning_store(ctx, &again, 1, NULL, 0), CLKVQ_OK);

    char *text = read_text(path);
    clkvq_tune_result *e;
    int n;
    ck_assert_int_eq(clkvq_tuning_parse(ctx, text, &e, &n, NULL), CLKVQ_OK);
    ck_assert(n == 2 && results_equal(&e[0], &again) && results_equal(&e[1], &two[1]));
    free(e);
    free(text);
}
END_TEST

START_TEST(store_refuses_bad_results)
{
    clkvq_context *ctx = test_ctx();
    char path[1024];
    device_path(path, sizeof path);
    clkvq_tune_result r = make_entry(base_shape(), CLKVQ_ATTN_DEFAULT, 64, 256, 16,
                                     CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    ck_assert_int_eq(clkvq_tuning_store(ctx, &r, 1, NULL, 0), CLKVQ_ERR_INVALID_ARG);
    r.params.attn.variant = CLKVQ_ATTN_COOPERATIVE;
    r.tuned_ms = NAN;
    ck_assert_int_eq(clkvq_tuning_store(ctx, &r, 1, NULL, 0), CLKVQ_ERR_INVALID_ARG);
    r.tuned_ms = 1;
    r.kernel[0] = '\0';
    ck_assert_int_eq(clkvq_tuning_store(ctx, &r, 1, NULL, 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(access(path, F_OK), -1); /* nothing written */
    snprintf(r.kernel, sizeof r.kernel, "decode");
    char tiny[4];
    ck_assert_int_eq(clkvq_tuning_store(ctx, &r, 1, tiny, sizeof tiny), CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(clkvq_tuning_store(NULL, &r, 1, NULL, 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_tuning_store(ctx, NULL, 1, NULL, 0), CLKVQ_ERR_INVALID_ARG);
}
END_TEST

/* Two processes store 50 times each at once; with the lock no read-merge-
 * write overlaps, so no entry is lost and the file always parses. */
START_TEST(concurrent_stores_keep_every_entry)
{
    enum { ROUNDS = 50 };
    clkvq_context *ctx = test_ctx();
    pid_t pids[2];
    for (int c = 0; c < 2; c++) {
        pids[c] = fork();
        ck_assert_int_ge(pids[c], 0);
        if (pids[c] == 0) {
            /* the child touches no OpenCL: store reads ctx->info only.
             * _exit: nothing of the parent is torn down twice. */
            int bad = 0;
            for (int i = 0; i < ROUNDS && !bad; i++) {
                clkvq_tune_shape s = base_shape();
                s.batch = c + 1;
                s.tokens = 64 * (i + 1);
                clkvq_tune_result r =
                    make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 32 * (i + 1), 16,
                               CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_GROUP_PLANAR);
                bad = clkvq_tuning_store(ctx, &r, 1, NULL, 0) != CLKVQ_OK;
                clkvq_tune_params p;
                bad |= clkvq_tuning_lookup(ctx, &s, &p, NULL) != CLKVQ_OK ||
                       clkvq_last_error(ctx)[0] != '\0'; /* never saw a broken file */
            }
            _exit(bad);
        }
    }
    int status[2];
    for (int c = 0; c < 2; c++) waitpid(pids[c], &status[c], 0);
    ck_assert(WIFEXITED(status[0]) && WEXITSTATUS(status[0]) == 0 && WIFEXITED(status[1]) &&
              WEXITSTATUS(status[1]) == 0);

    char path[1024];
    device_path(path, sizeof path);
    char *text = read_text(path);
    clkvq_tune_result *e;
    int n, per_child[2] = {0, 0}, wrong = 0;
    ck_assert_int_eq(clkvq_tuning_parse(ctx, text, &e, &n, NULL), CLKVQ_OK);
    ck_assert_int_eq(n, 2 * ROUNDS);
    for (int i = 0; i < n; i++) {
        per_child[e[i].shape.batch - 1]++;
        wrong += e[i].params.attn.chunk != e[i].shape.tokens / 2;
    }
    ck_assert(per_child[0] == ROUNDS && per_child[1] == ROUNDS && wrong == 0);
    free(e);
    free(text);

    /* no temp files left behind: only the file and its lock */
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/tuning", g_dir);
    DIR *d = opendir(dir);
    int others = 0;
    struct dirent *de;
    while ((de = readdir(d))) others += de->d_name[0] != '.' && !strstr(path, de->d_name);
    closedir(d);
    ck_assert_int_eq(others, 1); /* <key>.json.lock is not a substring of the path */
}
END_TEST

/* ------------------------------------------------------------ lookup */

static clkvq_tune_params builtin(void)
{
    clkvq_device_info info;
    clkvq_context_device_info(test_ctx(), &info);
    clkvq_tune_params p;
    memset(&p, 0, sizeof p);
    p.attn.variant = info.is_gpu ? CLKVQ_ATTN_COOPERATIVE : CLKVQ_ATTN_SERIAL;
    p.attn.wgs = info.is_gpu ? 128 : 64;
    p.attn.chunk = 256;
    p.attn.vw = 16;
    p.attn.tpl = 4;
    p.attn.vwpl = 0;
    p.attn.waves = 2;
    /* GPUs: group-planar K (a lane's tokens in one load), token-major V */
    p.layout_k = CLKVQ_LAYOUT_GROUP_PLANAR;
    p.layout_v = info.is_gpu ? CLKVQ_LAYOUT_TOKEN_MAJOR : CLKVQ_LAYOUT_GROUP_PLANAR;
    return p;
}

static clkvq_tuning_source lookup(const clkvq_tune_shape *s, clkvq_tune_params *p)
{
    clkvq_tuning_source src = (clkvq_tuning_source)-1;
    ck_assert_int_eq(clkvq_tuning_lookup(test_ctx(), s, p, &src), CLKVQ_OK);
    return src;
}

START_TEST(lookup_builtin_when_nothing_is_tuned)
{
    clkvq_tune_shape s = base_shape();
    clkvq_tune_params p, want = builtin();
    ck_assert_int_eq(lookup(&s, &p), CLKVQ_TUNED_BUILTIN);
    ck_assert(params_equal(&p, &want));
    ck_assert_str_eq(clkvq_last_error(test_ctx()), "");
    /* source may be NULL; the other arguments may not */
    ck_assert_int_eq(clkvq_tuning_lookup(test_ctx(), &s, &p, NULL), CLKVQ_OK);
    ck_assert_int_eq(clkvq_tuning_lookup(NULL, &s, &p, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_tuning_lookup(test_ctx(), NULL, &p, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_tuning_lookup(test_ctx(), &s, NULL, NULL), CLKVQ_ERR_INVALID_ARG);
    s.tokens = 0;
    ck_assert_int_eq(clkvq_tuning_lookup(test_ctx(), &s, &p, NULL), CLKVQ_ERR_INVALID_ARG);
}
END_TEST

START_TEST(lookup_exact_then_nearest)
{
    clkvq_tune_shape s = base_shape(), s2 = s;
    s2.tokens = 1024;
    clkvq_tune_result r[2] = {make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 128, 16,
                                         CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_GROUP_PLANAR),
                              make_entry(s2, CLKVQ_ATTN_COOPERATIVE, 64, 512, 16,
                                         CLKVQ_LAYOUT_GROUP_PLANAR, CLKVQ_LAYOUT_TOKEN_MAJOR)};
    ck_assert_int_eq(clkvq_tuning_store(test_ctx(), r, 2, NULL, 0), CLKVQ_OK);
    clkvq_tune_params p, want = builtin();
    ck_assert(lookup(&s, &p) == CLKVQ_TUNED_EXACT && params_equal(&p, &r[0].params));
    ck_assert(lookup(&s2, &p) == CLKVQ_TUNED_EXACT && params_equal(&p, &r[1].params));
    clkvq_tune_shape q = s;
    q.tokens = 32768; /* nearer 4096 than 1024 */
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_NEAREST && params_equal(&p, &r[0].params));
    q.tokens = 1500;
    q.batch = 2;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_NEAREST && params_equal(&p, &r[1].params));
    /* another head_dim, format or GQA group is not "near": built-in */
    q = s;
    q.head_dim = 64;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_BUILTIN && params_equal(&p, &want));
    q = s;
    q.format_k = CLKVQ_FMT_Q8;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_BUILTIN);
    q = s;
    q.n_q_heads = 8;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_BUILTIN);
    ck_assert_str_eq(clkvq_last_error(test_ctx()), "");
}
END_TEST

START_TEST(lookup_vendor_level)
{
    clkvq_device_info info;
    clkvq_context_device_info(test_ctx(), &info);
    const char *type = info.is_gpu ? "gpu" : "cpu", *other_type = info.is_gpu ? "cpu" : "gpu";
    clkvq_tune_shape s = base_shape(), s64 = s;
    s64.head_dim = 64;
    /* ours: same vendor and type, another model (the file is not this
     * device's, so it only counts as a vendor default) */
    clkvq_tune_result mine[2] = {make_entry(s64, CLKVQ_ATTN_COOPERATIVE, 16, 64, 4,
                                            CLKVQ_LAYOUT_GROUP_PLANAR, CLKVQ_LAYOUT_GROUP_PLANAR),
                                 make_entry(s, CLKVQ_ATTN_COOPERATIVE, 128, 64, 4,
                                            CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR)};
    /* closer shapes, but another type or another vendor */
    clkvq_tune_result theirs = make_entry(s64, CLKVQ_ATTN_COOPERATIVE, 256, 8, 4,
                                          CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    char *texts[3] = {file_text(info.vendor, "Some Other Model", type, mine, 2),
                      file_text(info.vendor, info.name, other_type, &theirs, 1),
                      file_text("Not The Vendor", info.name, type, &theirs, 1)};
    const char *names[3] = {"ours.json", "other-type.json", "other-vendor.json"};
    clkvq_tuning_set_shipped(names, (const char *const *)texts, 3);

    clkvq_tune_params p;
    ck_assert(lookup(&s64, &p) == CLKVQ_TUNED_VENDOR && params_equal(&p, &mine[0].params));
    clkvq_tune_shape q = s;
    q.tokens = 100;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_VENDOR && params_equal(&p, &mine[1].params));
    /* any distance counts at the vendor level: nearest of ours */
    q = s;
    q.scheme = CLKVQ_SCHEME_KIVI;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_VENDOR && params_equal(&p, &mine[1].params));
    /* this device's own file still wins, even when only near */
    clkvq_tune_result own = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 64, 8,
                                       CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_GROUP_PLANAR);
    ck_assert_int_eq(clkvq_tuning_store(test_ctx(), &own, 1, NULL, 0), CLKVQ_OK);
    q = s;
    q.tokens = 100;
    ck_assert(lookup(&q, &p) == CLKVQ_TUNED_NEAREST && params_equal(&p, &own.params));
    ck_assert(lookup(&s64, &p) == CLKVQ_TUNED_VENDOR && params_equal(&p, &mine[0].params));

    char *shown = show_text();
    ck_assert_msg(strstr(shown, "ours.json") && !strstr(shown, "other-type.json") &&
                      !strstr(shown, "other-vendor.json"),
                  "%s", shown);
    free(shown);
    for (int i = 0; i < 3; i++) free(texts[i]);
}
END_TEST

START_TEST(lookup_skips_params_beyond_the_device)
{
    clkvq_device_info info;
    clkvq_context_device_info(test_ctx(), &info);
    clkvq_tune_shape s = base_shape();
    /* a bigger device of the vendor: a work-group this one cannot run */
    clkvq_tune_result big = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 65536, 65536, 16,
                                       CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    /* serial entry of an fp16 shape on token-major layouts: valid there,
     * not for a quantized shape */
    clkvq_tune_shape f = s;
    f.scheme = CLKVQ_SCHEME_FP16;
    clkvq_tune_result fp16 = make_entry(f, CLKVQ_ATTN_SERIAL, 64, 256, 16, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        CLKVQ_LAYOUT_TOKEN_MAJOR);
    clkvq_tune_result both[2] = {big, fp16};
    char *text = file_text(info.vendor, "Bigger", info.is_gpu ? "gpu" : "cpu", both, 2);
    const char *names[1] = {"big.json"};
    const char *texts[1] = {text};
    clkvq_tuning_set_shipped(names, texts, 1);
    clkvq_tune_params p, want = builtin();
    ck_assert(lookup(&s, &p) == CLKVQ_TUNED_BUILTIN && params_equal(&p, &want));
    ck_assert(lookup(&f, &p) == CLKVQ_TUNED_VENDOR && params_equal(&p, &fp16.params));
    free(text);
}
END_TEST

START_TEST(corrupt_file_falls_back_and_is_reported)
{
    clkvq_context *ctx = test_ctx();
    clkvq_device_info info;
    clkvq_context_device_info(ctx, &info);
    char path[1024];
    device_path(path, sizeof path);
    clkvq_tune_shape s = base_shape();
    clkvq_tune_result r = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 128, 16,
                                     CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    char *good = clkvq_tuning_serialize(ctx, &r, 1);
    good[strlen(good) / 2] = '\0'; /* a torn write, as a crash without rename would leave */
    write_text(path, good);
    free(good);

    clkvq_tune_params p, want = builtin();
    ck_assert(lookup(&s, &p) == CLKVQ_TUNED_BUILTIN && params_equal(&p, &want));
    ck_assert_msg(strstr(clkvq_last_error(ctx), "ignored") && strstr(clkvq_last_error(ctx), path),
                  "message: %s", clkvq_last_error(ctx));
    char *shown = show_text();
    ck_assert_msg(strstr(shown, "IGNORED") && strstr(shown, "not JSON") &&
                      strstr(shown, info.device_key),
                  "%s", shown);
    free(shown);

    /* with a vendor file the fallback is the vendor level */
    clkvq_tune_result v = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 16, 64, 16,
                                     CLKVQ_LAYOUT_GROUP_PLANAR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    char *vt = file_text(info.vendor, "Sibling", info.is_gpu ? "gpu" : "cpu", &v, 1);
    const char *names[1] = {"sibling.json"};
    const char *texts[1] = {vt};
    clkvq_tuning_set_shipped(names, texts, 1);
    ck_assert(lookup(&s, &p) == CLKVQ_TUNED_VENDOR && params_equal(&p, &v.params));
    free(vt);

    /* store replaces the corrupt file */
    ck_assert_int_eq(clkvq_tuning_store(ctx, &r, 1, NULL, 0), CLKVQ_OK);
    ck_assert(lookup(&s, &p) == CLKVQ_TUNED_EXACT && params_equal(&p, &r.params));
    ck_assert_str_eq(clkvq_last_error(ctx), "");
}
END_TEST

/* Not a regular file where this device's file belongs: a directory (stdio
 * would call it LONG_MAX bytes long) or a FIFO (an open that waits for a
 * writer would hang every lookup). Reported and ignored, never read. */
START_TEST(non_regular_file_is_ignored)
{
    clkvq_context *ctx = test_ctx();
    char path[1024];
    device_path(path, sizeof path);
    clkvq_tune_shape s = base_shape();
    clkvq_tune_params p, want = builtin();
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/tuning", g_dir);
    mkdir(dir, 0755); /* may exist */
    for (int kind = 0; kind < 2; kind++) {
        ck_assert_int_eq(kind ? mkfifo(path, 0644) : mkdir(path, 0755), 0);
        ck_assert(lookup(&s, &p) == CLKVQ_TUNED_BUILTIN && params_equal(&p, &want));
        ck_assert_msg(strstr(clkvq_last_error(ctx), "not a regular file") &&
                          strstr(clkvq_last_error(ctx), path),
                      "message: %s", clkvq_last_error(ctx));
        char *shown = show_text();
        ck_assert_msg(strstr(shown, "IGNORED") && strstr(shown, "not a regular file"), "%s",
                      shown);
        free(shown);
        ck_assert_int_eq(remove(path), 0);
    }
}
END_TEST

START_TEST(foreign_device_file_is_not_trusted)
{
    clkvq_context *ctx = test_ctx();
    clkvq_device_info info;
    clkvq_context_device_info(ctx, &info);
    char path[1024];
    device_path(path, sizeof path);
    clkvq_tune_shape s = base_shape();
    clkvq_tune_result r = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 128, 16,
                                     CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    /* copied from another machine under this device's name */
    char *text = file_text(info.vendor, "Another Model", info.is_gpu ? "gpu" : "cpu", &r, 1);
    write_text(path, text);
    free(text);
    clkvq_tune_params p;
    ck_assert_int_eq(lookup(&s, &p), CLKVQ_TUNED_BUILTIN);
    ck_assert_msg(strstr(clkvq_last_error(ctx), "another device"), "message: %s",
                  clkvq_last_error(ctx));
    char *shown = show_text();
    ck_assert_msg(strstr(shown, "another device") && strstr(shown, "Another Model"), "%s", shown);
    free(shown);
    /* and a foreign version the same way */
    text = file_text(info.vendor, info.name, info.is_gpu ? "gpu" : "cpu", &r, 1);
    char *v2 = strstr(text, "\"clkvq_tuning\": 2");
    v2[strlen("\"clkvq_tuning\": ")] = '3';
    write_text(path, text);
    free(text);
    ck_assert_int_eq(lookup(&s, &p), CLKVQ_TUNED_BUILTIN);
    ck_assert_msg(strstr(clkvq_last_error(ctx), "version 3"), "message: %s", clkvq_last_error(ctx));
}
END_TEST

START_TEST(show_lists_the_entries)
{
    clkvq_context *ctx = test_ctx();
    char path[1024];
    device_path(path, sizeof path);
    char *shown = show_text();
    ck_assert_msg(strstr(shown, path) && strstr(shown, "not tuned yet") &&
                      strstr(shown, "none shipped") && strstr(shown, "built-in defaults"),
                  "%s", shown);
    free(shown);
    clkvq_tune_shape s = base_shape();
    s.scheme = CLKVQ_SCHEME_KIVI;
    clkvq_tune_result r = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 128, 16,
                                     CLKVQ_LAYOUT_TOKEN_MAJOR, CLKVQ_LAYOUT_TOKEN_MAJOR);
    r.default_ms = 3.0;
    r.tuned_ms = 1.5;
    ck_assert_int_eq(clkvq_tuning_store(ctx, &r, 1, NULL, 0), CLKVQ_OK);
    shown = show_text();
    ck_assert_msg(strstr(shown, "1 tuned shape") && strstr(shown, "kivi") &&
                      strstr(shown, "2.00x") && strstr(shown, "cooperative wgs 32 tpl 4 vwpl 0 waves 2"),
                  "%s", shown);
    free(shown);
    ck_assert_int_eq(clkvq_tuning_show(ctx, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_tuning_show(NULL, stdout), CLKVQ_ERR_INVALID_ARG);
}
END_TEST

static double now_s(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Lookups re-read the file (the context has no place to keep it): they
 * must stay cheap next to creating a cache. */
START_TEST(lookup_cost)
{
    enum { N = 64, LOOKUPS = 2000 };
    clkvq_tune_result r[N];
    for (int i = 0; i < N; i++) {
        clkvq_tune_shape s = base_shape();
        s.tokens = 256 * (i + 1);
        r[i] = make_entry(s, CLKVQ_ATTN_COOPERATIVE, 32, 128, 16, CLKVQ_LAYOUT_TOKEN_MAJOR,
                          CLKVQ_LAYOUT_TOKEN_MAJOR);
    }
    ck_assert_int_eq(clkvq_tuning_store(test_ctx(), r, N, NULL, 0), CLKVQ_OK);
    clkvq_tune_shape s = base_shape();
    clkvq_tune_params p;
    int wrong = 0;
    /* CPU time is what the lookup costs; wall time on a shared machine
     * also counts other processes */
    double t0 = now_s(CLOCK_MONOTONIC), c0 = now_s(CLOCK_PROCESS_CPUTIME_ID);
    for (int i = 0; i < LOOKUPS; i++) {
        clkvq_tuning_source src;
        wrong +=
            clkvq_tuning_lookup(test_ctx(), &s, &p, &src) != CLKVQ_OK || src != CLKVQ_TUNED_EXACT;
    }
    double cpu_us = (now_s(CLOCK_PROCESS_CPUTIME_ID) - c0) / LOOKUPS * 1e6;
    double wall_us = (now_s(CLOCK_MONOTONIC) - t0) / LOOKUPS * 1e6;
    printf("lookup_cost: %.1f us CPU, %.1f us wall per lookup (%d entries in the file)\n", cpu_us,
           wall_us, N);
    ck_assert_int_eq(wrong, 0);
    ck_assert_msg(cpu_us < 5000, "%.1f us per lookup", cpu_us);
}
END_TEST

/* ------------------------------------------------------------ a cache's sources */

static clkvq_cache *sources_cache(clkvq_layout layout, const clkvq_layer_config *layers)
{
    clkvq_cache_config cfg = {.n_layers = 4, .n_seqs = 2, .capacity = 64, .n_kv_heads = 2,
                              .n_q_heads = 4, .head_dim = 64, .layout_k = layout,
                              .layout_v = layout, .layers = layers};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(test_ctx(), &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(test_ctx()));
    return cache;
}

static void expect_sources(const clkvq_cache *cache, const int *want)
{
    for (int l = 0; l < 4; l++) {
        clkvq_tuning_source src = (clkvq_tuning_source)-1;
        clkvq_status st = clkvq_cache_tuning_source(cache, l, &src);
        ck_assert_msg(st == CLKVQ_OK, "layer %d: %s", l, clkvq_last_error(test_ctx()));
        ck_assert_msg((int)src == want[l], "layer %d: %s, want %s", l,
                      clkvq_tuning_source_name(src),
                      clkvq_tuning_source_name((clkvq_tuning_source)want[l]));
    }
}

/* Each layer of a cache says where its decode tunables come from: its
 * shape's exact entry, a nearest one, built-in defaults (nothing tuned, or a
 * serial entry the cache's layouts cannot run), the caller's override; a
 * later retuning does not change what a cache took. */
START_TEST(cache_reports_each_layers_tuning_source)
{
    clkvq_layer_config layers[4];
    const clkvq_format fk[4] = {CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4};
    const clkvq_format fv[4] = {CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2};
    for (int l = 0; l < 4; l++) {
        layers[l] = clkvq_layer_config_default(l == 3 ? CLKVQ_SCHEME_KIVI : CLKVQ_SCHEME_TOKEN);
        layers[l].format_k = fk[l];
        layers[l].format_v = fv[l];
        layers[l].group_size = 32;
        if (l == 3)
            layers[l].residual = 32;
    }
    const clkvq_layout P = CLKVQ_LAYOUT_GROUP_PLANAR, T = CLKVQ_LAYOUT_TOKEN_MAJOR;
    clkvq_tune_shape k4v4 = {CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, 32, 64, 4, 2, 64, 2};
    clkvq_tune_shape k2v2 = k4v4;
    k2v2.format_k = k2v2.format_v = CLKVQ_FMT_Q2;
    k2v2.tokens = 128; /* not the cache's capacity: nearest */
    clkvq_tune_result e[2] = {make_entry(k4v4, CLKVQ_ATTN_SERIAL, 64, 64, 8, P, P),
                              make_entry(k2v2, CLKVQ_ATTN_COOPERATIVE, 32, 64, 16, P, P)};
    ck_assert_int_eq(clkvq_tuning_store(test_ctx(), e, 2, NULL, 0), CLKVQ_OK);

    clkvq_cache *cache = sources_cache(CLKVQ_LAYOUT_AUTO, layers);
    const int tuned[4] = {CLKVQ_TUNED_EXACT, CLKVQ_TUNED_NEAREST, CLKVQ_TUNED_EXACT,
                          CLKVQ_TUNED_BUILTIN};
    expect_sources(cache, tuned);
    clkvq_attn_tuning chunk = {CLKVQ_ATTN_DEFAULT, 0, 128, 0, 0, 0, 0};
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &chunk), CLKVQ_OK);
    const int caller[4] = {CLKVQ_TUNED_CALLER, CLKVQ_TUNED_CALLER, CLKVQ_TUNED_CALLER,
                           CLKVQ_TUNED_CALLER};
    expect_sources(cache, caller);
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, NULL), CLKVQ_OK);
    expect_sources(cache, tuned);
    clkvq_tuning_source src;
    ck_assert_int_eq(clkvq_cache_tuning_source(cache, 4, &src), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_tuning_source(NULL, 0, &src), CLKVQ_ERR_INVALID_ARG);

    /* retuned since: the cache keeps the parameters, and the source, it
     * was created with */
    clkvq_tune_result again = make_entry(k4v4, CLKVQ_ATTN_SERIAL, 64, 128, 8, P, P);
    ck_assert_int_eq(clkvq_tuning_store(test_ctx(), &again, 1, NULL, 0), CLKVQ_OK);
    expect_sources(cache, tuned);
    clkvq_cache_release(cache);

    /* token-major layouts cannot run the serial entry: built-in defaults */
    cache = sources_cache(T, layers);
    const int token_major[4] = {CLKVQ_TUNED_BUILTIN, CLKVQ_TUNED_NEAREST, CLKVQ_TUNED_BUILTIN,
                                CLKVQ_TUNED_BUILTIN};
    expect_sources(cache, token_major);
    clkvq_cache_release(cache);
    ck_assert_str_eq(clkvq_tuning_source_name(CLKVQ_TUNED_EXACT), "exact");
    ck_assert_str_eq(clkvq_tuning_source_name(CLKVQ_TUNED_CALLER), "caller");
    ck_assert_str_eq(clkvq_tuning_source_name((clkvq_tuning_source)99), "?");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("tuning_db");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, parse_good_file);
    tcase_add_test(tc, parse_refuses_corrupt_files);
    tcase_add_test(tc, parse_reports_the_reason);
    tcase_add_test(tc, parse_refuses_every_truncation);
    tcase_add_test(tc, parse_refuses_foreign_version);
    tcase_add_test(tc, parse_refuses_repeated_shapes);
    tcase_add_test(tc, parse_null_arguments);
    tcase_add_test(tc, shipped_files_parse);
    tcase_add_test(tc, serialize_parse_identity);
    tcase_add_test(tc, test_writer_agrees_with_library);
    tcase_add_test(tc, shape_distance);
    tcase_add_test(tc, store_merges_by_shape);
    tcase_add_test(tc, store_refuses_bad_results);
    tcase_add_test(tc, concurrent_stores_keep_every_entry);
    tcase_add_test(tc, lookup_builtin_when_nothing_is_tuned);
    tcase_add_test(tc, lookup_exact_then_nearest);
    tcase_add_test(tc, lookup_vendor_level);
    tcase_add_test(tc, lookup_skips_params_beyond_the_device);
    tcase_add_test(tc, corrupt_file_falls_back_and_is_reported);
    tcase_add_test(tc, non_regular_file_is_ignored);
    tcase_add_test(tc, foreign_device_file_is_not_trusted);
    tcase_add_test(tc, show_lists_the_entries);
    tcase_add_test(tc, lookup_cost);
    tcase_add_test(tc, cache_reports_each_layers_tuning_source);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(suite());
}

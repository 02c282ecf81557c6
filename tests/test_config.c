/* Layer precision configs: KVTuner's published files load as they are and
 * reproduce their README's numbers; our own fields round-trip through
 * save/load; every malformed input is one clear error with its line; a
 * loaded config builds a cache that appends and decodes. */
#include "config_fields.h"
#include "test_util.h"

#include <dirent.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* configs/kvtuner/: KVTuner's published files as shipped, and the README
 * that lists what each must load as */
#define KVTUNER_DIR CLKVQ_PRESET_DIR
#define MAX_ROWS 64
#define REPORT_MAX 8192

/* Failures gathered over a loop, asserted once (a passing ck_assert costs a
 * syscall; one per file or element would dominate the suite). */
typedef struct {
    char text[REPORT_MAX];
    int n;
} report;

__attribute__((format(printf, 2, 3))) static void note(report *r, const char *fmt, ...)
{
    size_t used = strlen(r->text);
    va_list ap;
    va_start(ap, fmt);
    if (used + 2 < sizeof r->text)
        vsnprintf(r->text + used, sizeof r->text - used, fmt, ap);
    va_end(ap);
    used = strlen(r->text);
    if (used + 1 < sizeof r->text)
        strcat(r->text, "\n");
    r->n++;
}

/* ------------------------------------------------------------ README */

typedef struct {
    char file[160];
    int layers;
    double bits;
    int seen;
} readme_row;

/* The README's table rows "| <file>.yaml | <layers> | <bits> |". */
static int read_readme(readme_row *rows)
{
    FILE *f = fopen(KVTUNER_DIR "/README.md", "r");
    ck_assert_msg(f != NULL, "cannot open %s", KVTUNER_DIR "/README.md");
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f) && n < MAX_ROWS) {
        readme_row r = {{0}, 0, 0.0, 0};
        if (sscanf(line, "| %159[^ |] | %d | %lf |", r.file, &r.layers, &r.bits) == 3 &&
            strstr(r.file, ".yaml"))
            rows[n++] = r;
    }
    fclose(f);
    return n;
}

static readme_row *find_row(readme_row *rows, int n, const char *file)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(rows[i].file, file))
            return &rows[i];
    return NULL;
}

/* ------------------------------------------------------------ KVTuner */

/* A file the README does not list (the two k8_v4 files): every pair is K8V4,
 * as its name says, so the average is 6 and per-head layers have 8 heads
 * (Llama-3-8B's kv heads). */
static void check_unlisted(report *r, const char *name, const clkvq_precision_config *cfg)
{
    if (!strstr(name, "_k8_v4")) {
        note(r, "%s: not in the README and no k/v in its name", name);
        return;
    }
    if (clkvq_config_n_layers(cfg) != 32 || fabs(clkvq_config_average_bits(cfg) - 6.0) > 1e-12)
        note(r, "%s: %d layers, %.4f bits; expected 32, 6", name, clkvq_config_n_layers(cfg),
             clkvq_config_average_bits(cfg));
    int per_head = strstr(name, "per_head") != NULL;
    for (int l = 0; l < clkvq_config_n_layers(cfg); l++) {
        int heads = clkvq_config_n_heads(cfg, l);
        clkvq_layer_config lc;
        clkvq_config_layer(cfg, l, &lc);
        int bad = heads != (per_head ? 8 : 0) || lc.format_k != CLKVQ_FMT_Q8 ||
                  lc.format_v != CLKVQ_FMT_Q4;
        for (int h = 0; h < heads; h++) {
            clkvq_format fk, fv;
            bad |= clkvq_config_head(cfg, l, h, &fk, &fv) != CLKVQ_OK || fk != CLKVQ_FMT_Q8 ||
                   fv != CLKVQ_FMT_Q4;
        }
        if (bad) {
            note(r, "%s: layer %d: %d heads or bits differ from K8V4", name, l, heads);
            return;
        }
    }
}

static void check_file(report *r, readme_row *rows, int n_rows, const char *dir, const char *name)
{
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    clkvq_precision_config *cfg = NULL;
    clkvq_status st = clkvq_config_load(NULL, path, NULL, &cfg);
    if (st != CLKVQ_OK) {
        note(r, "%s: %s: %s", name, clkvq_status_string(st), clkvq_last_error(NULL));
        return;
    }
    readme_row *row = find_row(rows, n_rows, name);
    if (row) {
        row->seen = 1;
        double bits = clkvq_config_average_bits(cfg);
        /* the README rounds to 4 decimals */
        if (clkvq_config_n_layers(cfg) != row->layers || fabs(bits - row->bits) > 0.00005 ||
            clkvq_config_check_model(NULL, cfg, row->layers) != CLKVQ_OK)
            note(r, "%s: %d layers, %.6f bits; README says %d, %.4f", name,
                 clkvq_config_n_layers(cfg), bits, row->layers, row->bits);
    } else {
        check_unlisted(r, name, cfg);
    }
    clkvq_config_free(cfg);
}

/* Every .yaml in configs/kvtuner/, whatever is there. */
static int check_folder(report *r, readme_row *rows, int n_rows)
{
    DIR *dir = opendir(KVTUNER_DIR);
    ck_assert_msg(dir != NULL, "cannot open %s", KVTUNER_DIR);
    int files = 0;
    struct dirent *f;
    while ((f = readdir(dir))) {
        size_t len = strlen(f->d_name);
        if (len > 5 && !strcmp(f->d_name + len - 5, ".yaml")) {
            check_file(r, rows, n_rows, KVTUNER_DIR, f->d_name);
            files++;
        }
    }
    closedir(dir);
    return files;
}

START_TEST(kvtuner_files_load_as_published)
{
    readme_row rows[MAX_ROWS];
    int n_rows = read_readme(rows);
    report r = {{0}, 0};
    int files = check_folder(&r, rows, n_rows);
    for (int i = 0; i < n_rows; i++)
        if (!rows[i].seen)
            note(&r, "%s: listed in the README, not found or not loaded", rows[i].file);
    /* the README's 32 presets, plus the k8_v4 per-head and per-layer files */
    ck_assert_msg(n_rows == 32 && files == 34 && r.n == 0,
                  "%d README rows, %d files, %d problems:\n%s", n_rows, files, r.n, r.text);
}
END_TEST

/* ------------------------------------------------------------ round trip */

#define RT_HEADS 2
#define RT_DIM 32

static void fill_perm(int32_t *perm, int heads, int dim, int shift)
{
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < dim; c++)
            perm[h * dim + c] = (c * 5 + shift + h) % dim; /* 5 is coprime to dim = 32 */
}

/* Means that test the float text: negative zero, tiny, values with no
 * short decimal form (fp16's limits: created_config_round_trips). */
static void fill_mean(float *mean, int heads, int dim, int shift)
{
    static const float special[] = {-0.0f, 1e-7f, 1e-30f, -2.5f, 0.1f, 1.0f / 3.0f};
    for (int i = 0; i < heads * dim; i++)
        mean[i] = i < 6 ? special[(i + shift) % 6] : (float)(i * 0.037 - 0.51) * (float)shift;
}

static void append_mean_row(char *buf, size_t cap, const float *row, int dim)
{
    strncat(buf, "    - [", cap - strlen(buf) - 1);
    for (int c = 0; c < dim; c++) {
        char num[32];
        snprintf(num, sizeof num, c ? ", %.9g" : "%.9g", (double)row[c]);
        strncat(buf, num, cap - strlen(buf) - 1);
    }
    strncat(buf, "]\n", cap - strlen(buf) - 1);
}

static void append_row(char *buf, size_t cap, const int32_t *row, int dim)
{
    strncat(buf, "    - [", cap - strlen(buf) - 1);
    for (int c = 0; c < dim; c++) {
        char num[16];
        snprintf(num, sizeof num, c ? ", %d" : "%d", row[c]);
        strncat(buf, num, cap - strlen(buf) - 1);
    }
    strncat(buf, "]\n", cap - strlen(buf) - 1);
}

/* A config with every field set somewhere: skvq with 2-head perms and
 * means, per-channel keys, rotation, fp8 params, int zero and 1.5-bit
 * values; kivi; a per-head layer; a top-level rot_seed (a base: layers
 * without their own get base + index); a model name that needs quoting;
 * CRLF line ends. */
static char *full_yaml(int32_t *perm_k, int32_t *perm_v, float *mean_k, float *mean_v)
{
    size_t cap = 32768;
    char *y = calloc(cap, 1);
    fill_perm(perm_k, RT_HEADS, RT_DIM, 3);
    fill_perm(perm_v, RT_HEADS, RT_DIM, 7);
    fill_mean(mean_k, RT_HEADS, RT_DIM, 1);
    fill_mean(mean_v, RT_HEADS, RT_DIM, 4);
    strcat(y, "model: \"llama: \\\"x\\\" #1\"\r\nrot_seed: 7\r\n"
              "0:\r\n  nbits_key: 8\r\n  nbits_value: 1.5\r\n  scheme: skvq\r\n"
              "  group_size: 32\r\n  clip_k: 0.92\r\n  clip_v: 0.875\r\n  window: 16\r\n"
              "  n_sink: 3\r\n  param_type: fp8\r\n  zero_mode: int\r\n  key_axis: channel\r\n"
              "  rot: true\r\n  rot_seed: 4000000000\r\n  perm_k:\r\n");
    for (int h = 0; h < RT_HEADS; h++)
        append_row(y, cap, perm_k + h * RT_DIM, RT_DIM);
    strcat(y, "  perm_v:\n");
    for (int h = 0; h < RT_HEADS; h++)
        append_row(y, cap, perm_v + h * RT_DIM, RT_DIM);
    strcat(y, "  mean_k:\n");
    for (int h = 0; h < RT_HEADS; h++)
        append_mean_row(y, cap, mean_k + h * RT_DIM, RT_DIM);
    strcat(y, "  mean_v:\n");
    for (int h = 0; h < RT_HEADS; h++)
        append_mean_row(y, cap, mean_v + h * RT_DIM, RT_DIM);
    strcat(y, "1: {nbits_key: 2, nbits_value: 3, scheme: kivi, residual: 64, clip_k: 0.3}\r\n"
              "2:\r\n  0: {nbits_key: 4, nbits_value: 1.5}\r\n"
              "  1: {nbits_key: 2, nbits_value: 1.5}\r\n  zero_mode: int\r\n");
    return y;
}

static int same_perm(const int32_t *a, const int32_t *b, size_t n)
{
    if (!a || !b)
        return a == b;
    return !memcmp(a, b, n * sizeof *a);
}

/* Bit for bit (a -0 mean must come back as -0). */
static int same_mean(const float *a, const float *b, size_t n)
{
    if (!a || !b)
        return a == b;
    return !memcmp(a, b, n * sizeof *a);
}

/* Every field of every layer and head; perms of heads x dim. */
static int configs_equal(const clkvq_precision_config *a, const clkvq_precision_config *b,
                         size_t perm_len, char *why, size_t why_size)
{
    if (clkvq_config_n_layers(a) != clkvq_config_n_layers(b) ||
        strcmp(clkvq_config_model(a), clkvq_config_model(b))) {
        snprintf(why, why_size, "layers %d/%d, model '%s'/'%s'", clkvq_config_n_layers(a),
                 clkvq_config_n_layers(b), clkvq_config_model(a), clkvq_config_model(b));
        return 0;
    }
    for (int l = 0; l < clkvq_config_n_layers(a); l++) {
        clkvq_layer_config x, y;
        clkvq_config_layer(a, l, &x);
        clkvq_config_layer(b, l, &y);
        int same = x.scheme == y.scheme && x.format_k == y.format_k &&
                   x.format_v == y.format_v && x.group_size == y.group_size &&
                   x.clip_k == y.clip_k && x.clip_v == y.clip_v && x.param_type == y.param_type &&
                   x.zero_mode == y.zero_mode && x.window == y.window && x.n_sink == y.n_sink &&
                   x.residual == y.residual && same_perm(x.perm_k, y.perm_k, perm_len) &&
                   same_perm(x.perm_v, y.perm_v, perm_len) && x.key_axis == y.key_axis &&
                   x.rotate == y.rotate && x.rot_seed == y.rot_seed &&
                   same_mean(x.mean_k, y.mean_k, perm_len) &&
                   same_mean(x.mean_v, y.mean_v, perm_len) &&
                   clkvq_config_n_heads(a, l) == clkvq_config_n_heads(b, l);
        for (int h = 0; same && h < clkvq_config_n_heads(a, l); h++) {
            clkvq_format ak, av, bk, bv;
            clkvq_config_head(a, l, h, &ak, &av);
            clkvq_config_head(b, l, h, &bk, &bv);
            same = ak == bk && av == bv;
        }
        if (!same) {
            snprintf(why, why_size, "layer %d differs", l);
            return 0;
        }
    }
    return 1;
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = calloc(1 << 20, 1);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* load(save(c)) == c, and saving that again gives the same bytes. */
static void check_round_trip(const clkvq_precision_config *c, size_t perm_len, const char *tag)
{
    char p1[] = "/tmp/clkvq_cfg_XXXXXX", p2[] = "/tmp/clkvq_cfg_XXXXXX";
    int fd1 = mkstemp(p1), fd2 = mkstemp(p2);
    ck_assert(fd1 >= 0 && fd2 >= 0);
    close(fd1);
    close(fd2);
    clkvq_precision_config *back = NULL;
    clkvq_status s1 = clkvq_config_save(NULL, c, p1);
    clkvq_status s2 = s1 == CLKVQ_OK ? clkvq_config_load(NULL, p1, NULL, &back) : s1;
    clkvq_status s3 = s2 == CLKVQ_OK ? clkvq_config_save(NULL, back, p2) : s2;
    char why[256] = "";
    int equal = s3 == CLKVQ_OK && configs_equal(c, back, perm_len, why, sizeof why);
    char *t1 = read_text(p1), *t2 = read_text(p2);
    ck_assert_msg(equal && t1 && t2 && !strcmp(t1, t2), "%s: %s %s (%s)\n%s", tag,
                  clkvq_status_string(s3), clkvq_last_error(NULL), why, t1 ? t1 : "");
    free(t1);
    free(t2);
    clkvq_config_free(back);
    unlink(p1);
    unlink(p2);
}

START_TEST(every_field_round_trips)
{
    int32_t perm_k[RT_HEADS * RT_DIM], perm_v[RT_HEADS * RT_DIM];
    float mean_k[RT_HEADS * RT_DIM], mean_v[RT_HEADS * RT_DIM];
    char *y = full_yaml(perm_k, perm_v, mean_k, mean_v);
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_parse(NULL, y, strlen(y), NULL, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s\n%s", clkvq_last_error(NULL), y);
    free(y);

    /* what was parsed is what the text says */
    clkvq_layer_config l0, l1, l2;
    clkvq_config_layer(c, 0, &l0);
    clkvq_config_layer(c, 1, &l1);
    clkvq_config_layer(c, 2, &l2);
    clkvq_format h1k, h1v;
    clkvq_config_head(c, 2, 1, &h1k, &h1v);
    ck_assert_msg(
        !strcmp(clkvq_config_model(c), "llama: \"x\" #1") && l0.scheme == CLKVQ_SCHEME_SKVQ &&
            l0.format_k == CLKVQ_FMT_Q8 && l0.format_v == CLKVQ_FMT_T15 && l0.group_size == 32 &&
            l0.clip_k == 0.92f && l0.clip_v == 0.875f && l0.window == 16 && l0.n_sink == 3 &&
            l0.param_type == CLKVQ_PARAM_FP8_E4M3 && l0.zero_mode == CLKVQ_ZERO_INT &&
            same_perm(l0.perm_k, perm_k, RT_HEADS * RT_DIM) &&
            same_perm(l0.perm_v, perm_v, RT_HEADS * RT_DIM) &&
            same_mean(l0.mean_k, mean_k, RT_HEADS * RT_DIM) &&
            same_mean(l0.mean_v, mean_v, RT_HEADS * RT_DIM) &&
            l0.key_axis == CLKVQ_AXIS_CHANNEL && l0.rotate == 1 && l0.rot_seed == 4000000000u &&
            /* the top-level rot_seed 7 is a base: layer l without its own gets 7 + l */
            l1.rot_seed == 8 && l2.rot_seed == 9 && !l1.rotate && !l1.mean_k &&
            l1.key_axis == CLKVQ_AXIS_TOKEN &&
            /* kivi brings its own defaults (group 32) where the file is silent */
            l1.scheme == CLKVQ_SCHEME_KIVI && l1.residual == 64 && l1.group_size == 32 &&
            l1.format_k == CLKVQ_FMT_Q2 && l1.format_v == CLKVQ_FMT_Q3 && l1.clip_k == 0.3f &&
            !l1.perm_k && clkvq_config_n_heads(c, 1) == 0 &&
            /* per-head: the layer reports the widest of its heads */
            clkvq_config_n_heads(c, 2) == 2 && h1k == CLKVQ_FMT_Q2 && h1v == CLKVQ_FMT_T15 &&
            l2.format_k == CLKVQ_FMT_Q4 && l2.format_v == CLKVQ_FMT_T15 &&
            l2.zero_mode == CLKVQ_ZERO_INT && l2.scheme == CLKVQ_SCHEME_TOKEN,
        "parsed values differ from the text");
    /* ((8 + 1.5) / 2 + (2 + 3) / 2 + (4 + 1.5 + 2 + 1.5) / 4) / 3 */
    ck_assert_double_eq_tol(clkvq_config_average_bits(c), (4.75 + 2.5 + 2.25) / 3.0, 1e-12);
    check_round_trip(c, RT_HEADS * RT_DIM, "parsed");
    clkvq_config_free(c);
}
END_TEST

/* A top-level perm is every layer's default: shared by all layers it is
 * written back once at the top; overridden by one layer, per layer. */
START_TEST(shared_perms_round_trip)
{
    const char *texts[2] = {
        "perm_v: [[1, 0, 3, 2], [3, 2, 1, 0]]\n0: {nbits_key: 4, nbits_value: 2}\n"
        "1: {nbits_key: 2, nbits_value: 4}\n",
        "perm_v: [[1, 0, 3, 2], [3, 2, 1, 0]]\n0: {nbits_key: 4, nbits_value: 2}\n"
        "1: {nbits_key: 2, nbits_value: 4, perm_v: [[0, 1, 2, 3], [1, 2, 3, 0]]}\n"};
    for (int i = 0; i < 2; i++) {
        clkvq_precision_config *c = NULL;
        clkvq_status st = clkvq_config_parse(NULL, texts[i], strlen(texts[i]), NULL, &c);
        ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
        clkvq_layer_config l0, l1;
        clkvq_config_layer(c, 0, &l0);
        clkvq_config_layer(c, 1, &l1);
        ck_assert_msg(l0.perm_v && l0.perm_v[0] == 1 && l0.perm_v[7] == 0 && !l0.perm_k &&
                          l1.perm_v && l1.perm_v[0] == (i ? 0 : 1),
                      "perm defaults not applied");
        check_round_trip(c, 8, i ? "partly shared perm" : "shared perm");
        clkvq_config_free(c);
    }
}
END_TEST

/* Built in memory (perms and means of one head, as clkvq_config_create
 * takes them). */
START_TEST(created_config_round_trips)
{
    int32_t perm[RT_DIM];
    float mean[RT_DIM];
    fill_perm(perm, 1, RT_DIM, 11);
    fill_mean(mean, 1, RT_DIM, 2);
    mean[7] = 65504.0f; /* fp16's limits are means a cache takes */
    mean[8] = -65504.0f;
    mean[9] = FLT_MIN / 4; /* subnormal */
    clkvq_layer_config layers[3] = {clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ),
                                    clkvq_layer_config_default(CLKVQ_SCHEME_FP16),
                                    clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN)};
    layers[0].format_v = CLKVQ_FMT_T15;
    layers[0].clip_k = 0.1f; /* not exact in decimal: the shortest text must still round-trip */
    layers[0].perm_k = perm;
    layers[0].key_axis = CLKVQ_AXIS_CHANNEL;
    layers[0].mean_v = mean;
    layers[1].rotate = 1;
    layers[1].rot_seed = 0xffffffffu;
    layers[2].format_k = CLKVQ_FMT_Q3;
    layers[2].param_type = CLKVQ_PARAM_FP8_E4M3;
    layers[2].perm_v = perm;
    layers[2].mean_k = mean;
    layers[2].rotate = 1;
    layers[2].rot_seed = 5;
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_create(NULL, NULL, 3, layers, 1, RT_DIM, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    perm[0] = 99; /* the config holds its own copies */
    float mean0 = mean[0];
    mean[0] = 42.0f;
    clkvq_layer_config l0, l1, l2;
    clkvq_config_layer(c, 0, &l0);
    clkvq_config_layer(c, 1, &l1);
    clkvq_config_layer(c, 2, &l2);
    ck_assert_msg(l0.perm_k && l0.perm_k[0] == 11 && !strcmp(clkvq_config_model(c), "") &&
                      l0.mean_v && !memcmp(&l0.mean_v[0], &mean0, sizeof mean0) &&
                      l0.mean_v != l2.mean_k && l1.rot_seed == 0xffffffffu && l2.rot_seed == 5,
                  "perm or mean not copied");
    check_round_trip(c, RT_DIM, "created");
    clkvq_config_free(c);

    layers[0].perm_k = perm; /* perm[0] = 99: no longer a permutation */
    st = clkvq_config_create(NULL, "m", 3, layers, 1, RT_DIM, &c);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG && strstr(clkvq_last_error(NULL), "perm_k"),
                  "%s", clkvq_last_error(NULL));
    perm[0] = 11;
    mean[3] = NAN; /* a mean the cache would refuse */
    st = clkvq_config_create(NULL, "m", 3, layers, 1, RT_DIM, &c);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG &&
                      strstr(clkvq_last_error(NULL), "layer 0: mean_v head 0 channel 3") &&
                      strstr(clkvq_last_error(NULL), "not a finite number"),
                  "%s", clkvq_last_error(NULL));
    mean[3] = 65505.0f;
    layers[0].mean_v = NULL;
    st = clkvq_config_create(NULL, "m", 3, layers, 1, RT_DIM, &c);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG &&
                      strstr(clkvq_last_error(NULL), "layer 2: mean_k head 0 channel 3"),
                  "%s", clkvq_last_error(NULL));
}
END_TEST

/* ------------------------------------------------------------ errors */

typedef struct {
    const char *name;
    const char *yaml;
    clkvq_status status;
    const char *needles[4]; /* all must appear in the message */
} error_case;

#define OK_LAYER "{nbits_key: 4, nbits_value: 4}"

static const error_case g_errors[] = {
    {"missing layer", "0: " OK_LAYER "\n2: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:2:", "layer 1 is missing", "found 2"}},
    {"duplicate layer key", "0: " OK_LAYER "\n1: " OK_LAYER "\n0: " OK_LAYER "\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:3:", "duplicate layer key 0", "line 1"}},
    {"duplicate key, CRLF", "0:\r\n  nbits_key: 4\r\n  nbits_value: 4\r\n0:\r\n  nbits_key: 2\r\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:4:", "duplicate layer key 0", "line 1"}},
    {"bits not in the table", "0:\n  nbits_key: 5\n  nbits_value: 4\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:2:", "layer 0: nbits_key", "'5' is not in the format table"}},
    {"unknown field", "0:\n  nbits_key: 4\n  nbits_value: 4\n  nbits_kye: 4\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:4:", "unknown field 'nbits_kye'", "valid fields: nbits_key"}},
    {"unknown top-level field", "modle: x\n0: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "unknown field 'modle'", "model, n_q_heads, n_kv_heads, head_dim, nbits_key"}},
    {"not a permutation", "0:\n  nbits_key: 4\n  nbits_value: 4\n  perm_k: [[0, 1, 1, 3]]\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:4:", "perm_k", "not a permutation"}},
    {"perm index out of range", "0:\n  nbits_key: 4\n  nbits_value: 4\n  perm_v:\n    - [0, 4]\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:5:", "perm_v head 0 channel 1", "'4' is not an integer in 0..1"}},
    {"perm rows differ", "0:\n  nbits_key: 4\n  nbits_value: 4\n  perm_v:\n    - [0, 1]\n    - [0]\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:6:", "head 1 has 1 channels, head 0 has 2"}},
    {"perms of two shapes",
     "perm_k: [[1, 0]]\n0:\n  nbits_key: 4\n  nbits_value: 4\n  perm_v: [[2, 1, 0]]\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:5:", "perm_v", "earlier perms/means are 1 x 2"}},
    {"bits of the wrong type", "0:\n  nbits_key: [4]\n  nbits_value: 4\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:2:", "nbits_key", "expected a number of bits, got a sequence"}},
    {"layer not a mapping", "0: 4\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "layer 0", "expected a mapping", "got a scalar"}},
    {"top level not a mapping", "- 4\n- 4\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "top level", "got a sequence"}},
    {"not YAML", "0: {nbits_key: 4\n1: [\n", CLKVQ_ERR_CORRUPT, {"<memory>:", "not valid YAML"}},
    {"empty", "", CLKVQ_ERR_CORRUPT, {"<memory>:1:", "empty document"}},
    {"no layers", "model: x\n", CLKVQ_ERR_CORRUPT, {"<memory>:1:", "no layers"}},
    {"negative layer key", "-1: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "layer key '-1' is not an integer"}},
    {"alias", "0: &a " OK_LAYER "\n1: *a\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:", "alias", "not supported"}},
    {"two documents", "0: " OK_LAYER "\n---\n0: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:3:", "second YAML document"}},
    {"bits missing", "0: {nbits_key: 4}\n1: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "layer 0: nbits_value missing"}},
    {"duplicate field", "0:\n  nbits_key: 4\n  nbits_value: 4\n  nbits_key: 2\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:4:", "nbits_key: duplicate field", "line 2"}},
    {"head and layer bits", "0:\n  nbits_key: 4\n  0: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:2:", "layer 0", "for the layer and per head"}},
    {"head gap", "0:\n  0: " OK_LAYER "\n  2: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:3:", "layer 0 head 1 is missing"}},
    {"head field", "0:\n  0: {nbits_key: 4, nbits_value: 4, scheme: kivi}\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:2:", "layer 0 head 0", "unknown field 'scheme'"}},
    {"window without skvq", "0: {nbits_key: 4, nbits_value: 4, window: 8}\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "window/n_sink are skvq settings"}},
    {"bad clip", "0: {nbits_key: 4, nbits_value: 4, clip_k: 1.5}\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "clip_k", "'1.5' is not a clip ratio"}},
    {"bad group", "group_size: 48\n0: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "top level: group_size", "48 is not a multiple of 32"}},
    {"bad scheme", "0: {nbits_key: 4, nbits_value: 4, scheme: gptq}\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "scheme", "'gptq' is not one of fp16, token, kivi, skvq"}},
    {"bad param type", "0: {nbits_key: 4, nbits_value: 4, param_type: bf16}\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:1:", "param_type", "'bf16' is not one of fp16, fp8"}},
    {"kivi residual", "0: {nbits_key: 4, nbits_value: 4, scheme: kivi, residual: 40}\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:1:", "residual 40 must be a positive multiple"}},
    {"integer overflow", "0: {nbits_key: 4, nbits_value: 4, window: 99999999999999999999}\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:1:", "window", "not an integer"}},
    {"mean not a number", "0:\n  nbits_key: 4\n  nbits_value: 4\n  mean_v: [[0.5, x]]\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:4:", "mean_v head 0 channel 1", "'x' is not a finite number"}},
    {"mean not finite", "0:\n  nbits_key: 4\n  nbits_value: 4\n  mean_k: [[.nan, 1]]\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:4:", "mean_k head 0 channel 0", "not a finite number"}},
    {"mean and perm shapes", "perm_k: [[1, 0]]\n0:\n  nbits_key: 4\n  nbits_value: 4\n"
     "  mean_v: [[1, 2], [3, 4]]\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:5:", "mean_v", "2 heads x 2 channels, earlier perms/means are 1 x 2"}},
    {"mean rows differ", "0:\n  nbits_key: 4\n  nbits_value: 4\n  mean_v:\n    - [0, 1]\n"
     "    - [0]\n", CLKVQ_ERR_CORRUPT, {"<memory>:6:", "head 1 has 1 channels, head 0 has 2"}},
    {"rot not a bool", "0: {nbits_key: 4, nbits_value: 4, rot: 2}\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "layer 0: rot", "'2' is not true or false"}},
    {"rot_seed too big", "rot_seed: 4294967296\n0: " OK_LAYER "\n", CLKVQ_ERR_CORRUPT,
     {"<memory>:1:", "top level: rot_seed", "not an integer in 0..4294967295"}},
    {"key_axis unknown", "0: {nbits_key: 4, nbits_value: 4, scheme: skvq, key_axis: head}\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:1:", "key_axis", "'head' is not one of token, channel"}},
    {"channel keys without skvq", "0: {nbits_key: 4, nbits_value: 4, key_axis: channel}\n",
     CLKVQ_ERR_CORRUPT, {"<memory>:1:", "layer 0: key_axis channel is an skvq setting"}},
};

/* Every case: its status, and a message naming the input, line and field. */
START_TEST(malformed_configs_are_reported)
{
    report r = {{0}, 0};
    int n = (int)(sizeof g_errors / sizeof g_errors[0]);
    for (int i = 0; i < n; i++) {
        const error_case *e = &g_errors[i];
        clkvq_precision_config *c = (clkvq_precision_config *)&r; /* must be reset to NULL */
        clkvq_status st = clkvq_config_parse(NULL, e->yaml, strlen(e->yaml), NULL, &c);
        const char *msg = clkvq_last_error(NULL);
        int ok = st == e->status && c == NULL;
        for (int j = 0; j < 4 && e->needles[j]; j++)
            ok &= strstr(msg, e->needles[j]) != NULL;
        if (!ok)
            note(&r, "%s: %s: %s", e->name, clkvq_status_string(st), msg);
        if (st == CLKVQ_OK)
            clkvq_config_free(c);
    }
    ck_assert_msg(r.n == 0, "%d of %d cases wrong:\n%s", r.n, n, r.text);
}
END_TEST

/* File errors name the path; layer counts are checked against the model. */
START_TEST(file_and_model_errors)
{
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_load(NULL, "/nonexistent/x.yaml", NULL, &c);
    ck_assert_msg(st == CLKVQ_ERR_IO && strstr(clkvq_last_error(NULL), "/nonexistent/x.yaml"),
                  "%s", clkvq_last_error(NULL));

    char path[] = "/tmp/clkvq_bad_XXXXXX";
    int fd = mkstemp(path);
    ck_assert(fd >= 0);
    const char *bad = "0: " OK_LAYER "\r\n1:\r\n  nbits_key: 4\r\n  nbits_value: 6\r\n";
    ck_assert(write(fd, bad, strlen(bad)) == (ssize_t)strlen(bad));
    close(fd);
    st = clkvq_config_load(NULL, path, NULL, &c);
    char expect[64];
    snprintf(expect, sizeof expect, "%s:4:", path);
    ck_assert_msg(st == CLKVQ_ERR_CORRUPT && strstr(clkvq_last_error(NULL), expect) &&
                      strstr(clkvq_last_error(NULL), "nbits_value"),
                  "%s", clkvq_last_error(NULL));
    unlink(path);

    clkvq_context *ctx = test_ctx();
    st = clkvq_config_load(ctx, KVTUNER_DIR "/Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml", NULL, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    st = clkvq_config_check_model(ctx, c, 32);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG && strstr(clkvq_last_error(ctx), "28 layers") &&
                      strstr(clkvq_last_error(ctx), "32"),
                  "%s", clkvq_last_error(ctx));
    ck_assert_int_eq(clkvq_config_check_model(ctx, c, 28), CLKVQ_OK);
    /* a KVTuner file knows none of our transforms: none is on, and each
     * layer's rot_seed is the default's plus its index */
    for (int l = 0; l < 28; l++) {
        clkvq_layer_config lc;
        clkvq_config_layer(c, l, &lc);
        ck_assert_msg(!lc.rotate && lc.rot_seed == (uint32_t)l && !lc.mean_k && !lc.mean_v &&
                          lc.key_axis == CLKVQ_AXIS_TOKEN,
                      "layer %d: rot %d seed %u", l, lc.rotate, (unsigned)lc.rot_seed);
    }
    clkvq_config_free(c);

    /* defaults cannot carry means (their shape is the file's) */
    float mean[4] = {0};
    clkvq_layer_config d = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    d.mean_v = mean;
    const char *y = "0: " OK_LAYER "\n";
    st = clkvq_config_parse(ctx, y, strlen(y), &d, &c);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG && !c &&
                      strstr(clkvq_last_error(ctx), "perm_k/perm_v/mean_k/mean_v must be NULL"),
                  "%s", clkvq_last_error(ctx));
}
END_TEST

/* ------------------------------------------------------------ the field table */

/* Every scalar layer field of the table, over values of its kind (each in
 * every scheme that allows it): one layer per value, saved and loaded back,
 * every field compared. A field the writer or reader forgot comes back as
 * its default and fails here. */
#define TF_MAX_LAYERS 1024

/* Values of f's kind to try; n of them. */
static int table_candidates(const config_field *f, double *vals)
{
    int n = 0;
    switch (f->kind) {
    case CONFIG_KIND_BITS:
        for (int i = 0; i < CLKVQ_FMT_COUNT; i++)
            vals[n++] = i;
        break;
    case CONFIG_KIND_ENUM:
        for (int i = 0; i < f->count; i++)
            vals[n++] = i;
        break;
    case CONFIG_KIND_INT: {
        const double ints[] = {(double)f->lo, (double)f->lo + 1, 32, 64, 96, 128, (double)f->hi};
        for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
            vals[n++] = ints[i];
        break;
    }
    case CONFIG_KIND_CLIP: {
        const double clips[] = {1.0, 0.1, 0.92, 1e-3, FLT_MIN, nextafterf(1.0f, 0.0f)};
        for (size_t i = 0; i < sizeof clips / sizeof clips[0]; i++)
            vals[n++] = clips[i];
        break;
    }
    case CONFIG_KIND_BOOL:
        vals[n++] = 0;
        vals[n++] = 1;
        break;
    case CONFIG_KIND_U32: {
        const double seeds[] = {0, 1, 2147483648.0, 4294967295.0};
        for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++)
            vals[n++] = seeds[i];
        break;
    }
    default: break; /* not a scalar layer field: covered by the tests above */
    }
    return n;
}

static void table_set(const config_field *f, clkvq_layer_config *c, double v)
{
    void *dst = config_field_value(f, c, NULL);
    if (f->kind == CONFIG_KIND_CLIP) {
        float x = (float)v;
        memcpy(dst, &x, sizeof x);
    } else if (f->kind == CONFIG_KIND_U32) {
        uint32_t x = (uint32_t)v;
        memcpy(dst, &x, sizeof x);
    } else {
        int x = (int)v;
        memcpy(dst, &x, sizeof x);
    }
}

START_TEST(table_fields_round_trip)
{
    clkvq_layer_config *layers = calloc(TF_MAX_LAYERS, sizeof *layers);
    int n = 0, per_field[CONFIG_FIELD_MAX] = {0};
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        double vals[16];
        int nv = (f->scopes & CONFIG_IN_LAYER) ? table_candidates(f, vals) : 0;
        for (int k = 0; k < nv; k++)
            for (int s = 0; s < CLKVQ_SCHEME_COUNT; s++) {
                clkvq_layer_config c = clkvq_layer_config_default((clkvq_scheme)s);
                table_set(f, &c, vals[k]);
                char why[256];
                if (!config_field_check(f, config_field_cvalue(f, &c, NULL), why, sizeof why) ||
                    !config_layer_rules(&c, why, sizeof why))
                    continue;
                ck_assert(n < TF_MAX_LAYERS);
                layers[n++] = c;
                per_field[i]++;
            }
    }
    /* a model name longer than the writer's small buffer, that needs quoting */
    char model[200];
    snprintf(model, sizeof model, "%s", "m: \"q\" #");
    for (size_t i = strlen(model); i < sizeof model - 1; i++)
        model[i] = (char)('a' + i % 26);
    model[sizeof model - 1] = '\0';
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_create(NULL, model, n, layers, 0, 0, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    char path[] = "/tmp/clkvq_table_XXXXXX";
    int fd = mkstemp(path);
    ck_assert(fd >= 0);
    close(fd);
    clkvq_precision_config *back = NULL;
    st = clkvq_config_save(NULL, c, path);
    if (st == CLKVQ_OK)
        st = clkvq_config_load(NULL, path, NULL, &back);
    unlink(path);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    ck_assert_str_eq(clkvq_config_model(back), model);
    ck_assert_int_eq(clkvq_config_n_layers(back), n);
    report r = {{0}, 0};
    for (int l = 0; l < n; l++) {
        clkvq_layer_config x;
        clkvq_config_layer(back, l, &x);
        for (int i = 0; i < config_field_count; i++) {
            const config_field *f = &config_fields[i];
            if (!(f->scopes & CONFIG_IN_LAYER) || !config_field_is_scalar(f) ||
                !memcmp(config_field_cvalue(f, &x, NULL), config_field_cvalue(f, &layers[l], NULL),
                        f->size))
                continue;
            char want[64], got[64];
            config_field_format(f, config_field_cvalue(f, &layers[l], NULL), want, sizeof want);
            config_field_format(f, config_field_cvalue(f, &x, NULL), got, sizeof got);
            note(&r, "layer %d: %s: wrote %s, read %s", l, f->name, want, got);
        }
    }
    for (int i = 0; i < config_field_count; i++)
        if ((config_fields[i].scopes & CONFIG_IN_LAYER) && config_field_is_scalar(&config_fields[i]) &&
            per_field[i] < 2)
            note(&r, "%s: %d values tried (no candidates for its kind?)", config_fields[i].name,
                 per_field[i]);
    ck_assert_msg(r.n == 0, "%d of %d layers differ:\n%s", r.n, n, r.text);
    clkvq_config_free(back);
    clkvq_config_free(c);
    free(layers);
}
END_TEST

/* A value out of range for each kind, as built in memory: what the
 * message must say. 0 when the kind has no such value. */
static int table_bad_value(const config_field *f, int which, double *v, const char **says)
{
    switch (f->kind) {
    case CONFIG_KIND_BITS: *says = "is not in the format table"; break;
    case CONFIG_KIND_ENUM: *says = "is not one of"; break;
    case CONFIG_KIND_INT: *says = which == 2 ? "is not a multiple of" : "is not in"; break;
    case CONFIG_KIND_CLIP: *says = "is not a clip ratio in (0, 1]"; break;
    case CONFIG_KIND_BOOL:
        *says = "is not true (1) or false (0)";
        if (which >= 2)
            return 0;
        *v = which ? 2 : -1;
        return 1;
    default: return 0; /* U32: every value is a seed */
    }
    double lo = f->kind == CONFIG_KIND_BITS   ? 0
                : f->kind == CONFIG_KIND_ENUM ? 0
                : f->kind == CONFIG_KIND_INT  ? (double)f->lo
                                              : 0.0;
    double hi = f->kind == CONFIG_KIND_BITS   ? CLKVQ_FMT_COUNT - 1
                : f->kind == CONFIG_KIND_ENUM ? f->count - 1
                : f->kind == CONFIG_KIND_INT  ? (double)f->hi
                                              : 1.0;
    if (f->kind == CONFIG_KIND_CLIP) {
        const double bad[] = {0.0, 1.5, -1.0, NAN};
        if (which >= 4)
            return 0;
        *v = bad[which];
        return 1;
    }
    if (which == 0 && lo > INT_MIN) {
        *v = lo - 1;
        return 1;
    }
    if (which == 1 && hi < INT_MAX) {
        *v = hi + 1;
        return 1;
    }
    if (which == 2 && f->kind == CONFIG_KIND_INT && f->multiple) {
        *v = lo + 1;
        return 1;
    }
    return 0;
}

/* Every scalar layer field out of range, in a created layer and in the
 * loader's defaults: INVALID_ARG naming where, the field and why. */
START_TEST(table_fields_reject_bad_values)
{
    report r = {{0}, 0};
    int cases = 0;
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        if (!(f->scopes & CONFIG_IN_LAYER))
            continue;
        for (int which = 0; which < 4; which++) {
            double v;
            const char *says = NULL;
            if (!table_bad_value(f, which, &v, &says))
                continue;
            cases++;
            clkvq_layer_config c = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
            table_set(f, &c, v);
            char where[64];
            clkvq_precision_config *cfg = NULL;
            clkvq_status st = clkvq_config_create(NULL, "m", 1, &c, 0, 0, &cfg);
            snprintf(where, sizeof where, "layer 0: %s: ", f->name);
            if (st != CLKVQ_ERR_INVALID_ARG || cfg || !strstr(clkvq_last_error(NULL), where) ||
                !strstr(clkvq_last_error(NULL), says))
                note(&r, "create %s = %g: %s", f->name, v, clkvq_last_error(NULL));
            clkvq_config_free(cfg);
            const char *y = "0: " OK_LAYER "\n";
            st = clkvq_config_parse(NULL, y, strlen(y), &c, &cfg);
            snprintf(where, sizeof where, "defaults: %s: ", f->name);
            if (st != CLKVQ_ERR_INVALID_ARG || cfg || !strstr(clkvq_last_error(NULL), where) ||
                !strstr(clkvq_last_error(NULL), says))
                note(&r, "defaults %s = %g: %s", f->name, v, clkvq_last_error(NULL));
            clkvq_config_free(cfg);
        }
    }
    ck_assert_msg(r.n == 0 && cases >= 20, "%d of %d cases wrong:\n%s", r.n, cases, r.text);
}
END_TEST

/* Text a field's kind cannot read, and what the message must say. */
static const char *table_bad_text(const config_field *f, const char **says)
{
    switch (f->kind) {
    case CONFIG_KIND_BITS: *says = "'5' is not in the format table"; return "5";
    case CONFIG_KIND_INT: *says = "'x1' is not an integer in"; return "x1";
    case CONFIG_KIND_CLIP: *says = "'2' is not a clip ratio in (0, 1]"; return "2";
    case CONFIG_KIND_ENUM: *says = "'nonesuch' is not one of"; return "nonesuch";
    case CONFIG_KIND_PERM: *says = "not a permutation"; return "[[0, 0]]";
    case CONFIG_KIND_TEXT: *says = "expected a string, got a sequence"; return "[x]";
    case CONFIG_KIND_BOOL: *says = "'maybe' is not true or false"; return "maybe";
    case CONFIG_KIND_U32: *says = "'-1' is not an integer in 0..4294967295"; return "-1";
    case CONFIG_KIND_MEAN: *says = "head 1 has 2 channels, head 0 has 1"; return "[[1], [1, 2]]";
    default: return NULL;
    }
}

/* Every field of the table in the YAML it may appear in (the top level, a
 * layer): a value of the wrong shape, a value its kind cannot read, twice
 * the same field, and the field where it may not be. CORRUPT, naming
 * "<memory>", the line, the scope and the field. */
START_TEST(table_fields_yaml_errors)
{
    report r = {{0}, 0};
    int cases = 0;
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        const char *says = NULL, *bad = table_bad_text(f, &says);
        ck_assert_msg(bad != NULL, "%s: no bad text for its kind", f->name);
        for (int top = 0; top < 2; top++) {
            unsigned scope = top ? CONFIG_IN_TOP : CONFIG_IN_LAYER;
            char y[512], need[4][128];
            /* the field on line 1 (top) or 4 (layer); the bits where it is not */
            const char *fmt = top ? "%s: %s\n0:\n  nbits_key: 4\n  nbits_value: 4\n"
                                  : "nbits_key: 4\nnbits_value: 4\n0:\n  %s: %s\n";
            const char *scope_name = top ? "top level" : "layer 0";
            int line = top ? 1 : 4;
            const char *tries[3] = {bad, "{a: 1}", NULL};
            for (int t = 0; t < 2; t++) {
                snprintf(y, sizeof y, fmt, f->name, tries[t]);
                snprintf(need[0], sizeof need[0], "<memory>:%d:", line);
                if (!(f->scopes & scope)) {
                    snprintf(need[1], sizeof need[1], "%s: unknown field '%s'", scope_name,
                             f->name);
                    snprintf(need[2], sizeof need[2], "valid fields: ");
                } else {
                    snprintf(need[1], sizeof need[1], "%s: %s: ", scope_name, f->name);
                    if (t == 0)
                        snprintf(need[2], sizeof need[2], "%s", says);
                    else
                        snprintf(need[2], sizeof need[2], "expected %s, got a mapping",
                                 config_field_expect(f));
                }
                clkvq_precision_config *c = NULL;
                clkvq_status st = clkvq_config_parse(NULL, y, strlen(y), NULL, &c);
                const char *msg = clkvq_last_error(NULL);
                cases++;
                if (st != CLKVQ_ERR_CORRUPT || c || !strstr(msg, need[0]) ||
                    !strstr(msg, need[1]) || !strstr(msg, need[2]))
                    note(&r, "%s in %s, '%s': %s", f->name, scope_name, tries[t], msg);
                clkvq_config_free(c);
                if (!(f->scopes & scope))
                    break;
            }
            if (!(f->scopes & scope))
                continue;
            /* twice: the second names the first's line */
            const char *good = config_field_is_matrix(f) ? "[[0]]"
                               : f->kind == CONFIG_KIND_BITS ? "4"
                               : NULL;
            char text[64];
            if (!good) {
                clkvq_layer_config d = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
                /* valid values of every top-level field */
                config_top t0 = {.model = "m", .n_q_heads = 8, .n_kv_heads = 8, .head_dim = 64};
                config_field_format(f, config_field_cvalue(f, &d, &t0), text, sizeof text);
                good = text;
            }
            if (top)
                snprintf(y, sizeof y, "%s: %s\n%s: %s\n0: " OK_LAYER "\n", f->name, good,
                         f->name, good);
            else
                snprintf(y, sizeof y, "nbits_key: 4\nnbits_value: 4\n0:\n  %s: %s\n  %s: %s\n",
                         f->name, good, f->name, good);
            snprintf(need[0], sizeof need[0], "<memory>:%d:", top ? 2 : 5);
            snprintf(need[1], sizeof need[1], "%s: %s: duplicate field (first at line ",
                     scope_name, f->name);
            clkvq_precision_config *c = NULL;
            clkvq_status st = clkvq_config_parse(NULL, y, strlen(y), NULL, &c);
            const char *msg = clkvq_last_error(NULL);
            cases++;
            if (st != CLKVQ_ERR_CORRUPT || c || !strstr(msg, need[0]) || !strstr(msg, need[1]))
                note(&r, "%s twice in %s: %s", f->name, scope_name, msg);
            clkvq_config_free(c);
        }
    }
    ck_assert_msg(r.n == 0 && cases >= 3 * config_field_count, "%d of %d cases wrong:\n%s", r.n,
                  cases, r.text);
}
END_TEST

/* ------------------------------------------------------------ caches */

/* Appends tokens to every layer of the cache and decodes each against
 * attention over the cache's own read-back (dequantized) K and V. */
static void append_and_decode(clkvq_cache *cache, int n_layers, int n_tokens, int kv_heads,
                              int q_heads, int dim)
{
    size_t kv_n = (size_t)kv_heads * n_tokens * dim;
    float *k = malloc(kv_n * sizeof *k), *v = malloc(kv_n * sizeof *v);
    float *kr = malloc(kv_n * sizeof *kr), *vr = malloc(kv_n * sizeof *vr);
    float *q = malloc((size_t)q_heads * dim * sizeof *q), *o = malloc((size_t)q_heads * dim * 4);
    float scale = 1.0f / sqrtf((float)dim);
    double worst = 0.0;
    clkvq_status st = CLKVQ_OK;
    for (int l = 0; l < n_layers && st == CLKVQ_OK; l++) {
        test_fill_normal(100 + l, k, kv_n, 1.0f);
        test_fill_normal(200 + l, v, kv_n, 1.0f);
        test_fill_normal(300 + l, q, (size_t)q_heads * dim, 1.0f);
        st = clkvq_cache_append(cache, l, 0, n_tokens, k, v);
        if (st == CLKVQ_OK)
            st = clkvq_cache_decode_host(cache, l, q, o, scale);
        if (st == CLKVQ_OK)
            st = clkvq_cache_read(cache, l, 0, kr, vr);
        for (int h = 0; h < q_heads && st == CLKVQ_OK; h++) {
            const float *qh = q + (size_t)h * dim;
            int kvh = h / (q_heads / kv_heads);
            double s[256], mx = -1e300, sum = 0.0;
            for (int t = 0; t < n_tokens; t++) {
                s[t] = 0.0;
                for (int c = 0; c < dim; c++)
                    s[t] += (double)qh[c] * kr[((size_t)kvh * n_tokens + t) * dim + c];
                s[t] *= scale;
                mx = s[t] > mx ? s[t] : mx;
            }
            for (int t = 0; t < n_tokens; t++)
                sum += s[t] = exp(s[t] - mx);
            for (int c = 0; c < dim; c++) {
                double ref = 0.0;
                for (int t = 0; t < n_tokens; t++)
                    ref += s[t] / sum * vr[((size_t)kvh * n_tokens + t) * dim + c];
                double err = fabs(ref - o[(size_t)h * dim + c]);
                worst = err > worst || isnan(err) ? err : worst;
            }
        }
    }
    free(k);
    free(v);
    free(kr);
    free(vr);
    free(q);
    free(o);
    ck_assert_msg(st == CLKVQ_OK, "%s: %s", clkvq_status_string(st), clkvq_last_error(test_ctx()));
    ck_assert_msg(worst < 2e-3, "decode differs from attention over read-back by %g", worst);
}

/* A real KVTuner preset (Qwen2.5-7B, kivi mode: 28 layers, 4 kv heads, GQA
 * 7) with KVTuner's kivi settings as the defaults: residual 32, group 32. */
START_TEST(kvtuner_preset_builds_a_cache)
{
    clkvq_context *ctx = test_ctx();
    clkvq_layer_config kivi = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    kivi.residual = 32;
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_load(
        ctx, KVTUNER_DIR "/Qwen2.5-7B-Instruct_kivi_KVTuner4_1.yaml", &kivi,
        &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    clkvq_cache *cache = NULL;
    st = clkvq_cache_create_from_config(ctx, c, 1, 64, 4, 28, 128, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        CLKVQ_LAYOUT_GROUP_PLANAR, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    append_and_decode(cache, 3, 40, 4, 28, 128); /* 32 keys quantized, 8 in the residual */
    clkvq_cache_release(cache);
    clkvq_config_free(c);
}
END_TEST

/* Our own fields drive the cache: skvq with 2-head perms, fp8 and 1.5 bits,
 * a kivi layer, a per-head layer whose heads agree. */
START_TEST(own_config_builds_a_cache)
{
    int32_t perm_k[RT_HEADS * RT_DIM], perm_v[RT_HEADS * RT_DIM];
    float mean_k[RT_HEADS * RT_DIM], mean_v[RT_HEADS * RT_DIM];
    char *y = full_yaml(perm_k, perm_v, mean_k, mean_v);
    /* layer 2's heads must agree to run: head 1 becomes head 0's K4 V1.5 */
    char *diff = strstr(y, "{nbits_key: 2, nbits_value: 1.5}");
    ck_assert(diff != NULL);
    diff[strlen("{nbits_key: ")] = '4';
    /* and layer 0 K4: the cache cannot store q8's integer zeros in fp8 */
    char *k8 = strstr(y, "nbits_key: 8");
    ck_assert(k8 != NULL);
    k8[strlen("nbits_key: ")] = '4';
    clkvq_context *ctx = test_ctx();
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_parse(ctx, y, strlen(y), NULL, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s\n%s", clkvq_last_error(ctx), y);
    free(y);
    clkvq_cache *cache = NULL;
    st = clkvq_cache_create_from_config(ctx, c, 1, 48, RT_HEADS, 2 * RT_HEADS, RT_DIM,
                                        CLKVQ_LAYOUT_GROUP_PLANAR, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    append_and_decode(cache, 3, 40, RT_HEADS, 2 * RT_HEADS, RT_DIM);
    clkvq_cache_release(cache);

    /* perms of 2 heads x 32 do not fit 4 kv heads or head_dim 64 */
    st = clkvq_cache_create_from_config(ctx, c, 1, 48, 4, 4, RT_DIM, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        CLKVQ_LAYOUT_TOKEN_MAJOR, &cache);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG && strstr(clkvq_last_error(ctx), "perms/means are 2 heads"),
                  "%s", clkvq_last_error(ctx));
    clkvq_config_free(c);
}
END_TEST

/* Heads with their own bits run (one share per pair, tests/test_heads.c
 * goes further), as do heads that agree. */
START_TEST(per_head_bits)
{
    clkvq_context *ctx = test_ctx();
    const char *differ = "0:\n  0: {nbits_key: 8, nbits_value: 4}\n"
                         "  1: {nbits_key: 4, nbits_value: 4}\n";
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_parse(ctx, differ, strlen(differ), NULL, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    ck_assert_double_eq_tol(clkvq_config_average_bits(c), 5.0, 1e-12);
    clkvq_cache *cache = NULL;
    st = clkvq_cache_create_from_config(ctx, c, 1, 32, 2, 2, 64, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        CLKVQ_LAYOUT_TOKEN_MAJOR, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    append_and_decode(cache, 1, 5, 2, 2, 64);
    clkvq_cache_release(cache);
    clkvq_config_free(c);

    /* KVTuner's per-head file: all heads K8V4, Llama-3-8B's 8 kv heads */
    st = clkvq_config_load(
        ctx, KVTUNER_DIR "/meta-llama_Meta-Llama-3-8B-Instruct_k8_v4._per_head.yaml", NULL,
        &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    st = clkvq_cache_create_from_config(ctx, c, 1, 32, 8, 32, 64, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        CLKVQ_LAYOUT_TOKEN_MAJOR, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    append_and_decode(cache, 1, 5, 8, 32, 64);
    clkvq_cache_release(cache);
    st = clkvq_cache_create_from_config(ctx, c, 1, 32, 4, 32, 64, CLKVQ_LAYOUT_TOKEN_MAJOR,
                                        CLKVQ_LAYOUT_TOKEN_MAJOR, &cache);
    ck_assert_msg(st == CLKVQ_ERR_INVALID_ARG && strstr(clkvq_last_error(ctx), "8 heads"), "%s",
                  clkvq_last_error(ctx));
    clkvq_config_free(c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, kvtuner_files_load_as_published);
    tcase_add_test(tc, every_field_round_trips);
    tcase_add_test(tc, shared_perms_round_trip);
    tcase_add_test(tc, created_config_round_trips);
    tcase_add_test(tc, malformed_configs_are_reported);
    tcase_add_test(tc, file_and_model_errors);
    tcase_add_test(tc, table_fields_round_trip);
    tcase_add_test(tc, table_fields_reject_bad_values);
    tcase_add_test(tc, table_fields_yaml_errors);
    tcase_add_test(tc, per_head_bits);
    tcase_add_test(tc, kvtuner_preset_builds_a_cache);
    tcase_add_test(tc, own_config_builds_a_cache);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}

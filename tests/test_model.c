/* Models: the geometry table and the explicit form, configs that carry a
 * geometry (and are refused by one they do not fit), the layer settings a
 * config needs tuned, KVTuner presets loaded the way they were searched,
 * and configs stored per model beside the tuning results. */
#include "test_util.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KVTUNER_DIR CLKVQ_PRESET_DIR
#define LLAMA_KIVI_325 KVTUNER_DIR "/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml"

static void expect_error(clkvq_status got, clkvq_status want, const char *msg, int n, ...)
{
    ck_assert_msg(got == want, "status %s, want %s: %s", clkvq_status_string(got),
                  clkvq_status_string(want), msg);
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *part = va_arg(ap, const char *);
        ck_assert_msg(strstr(msg, part), "'%s' not in: %s", part, msg);
    }
    va_end(ap);
}

static clkvq_model_geometry geo(int layers, int q, int kv, int d)
{
    return (clkvq_model_geometry){layers, q, kv, d};
}

static void expect_geometry(const char *name, clkvq_model_geometry want)
{
    clkvq_model_geometry g = {0, 0, 0, 0};
    clkvq_status st = clkvq_model_lookup(name, &g);
    ck_assert_msg(st == CLKVQ_OK, "%s: %s", name, clkvq_last_error(NULL));
    ck_assert_msg(g.n_layers == want.n_layers && g.n_q_heads == want.n_q_heads &&
                      g.n_kv_heads == want.n_kv_heads && g.head_dim == want.head_dim,
                  "%s: l%d q%d kv%d d%d, want l%d q%d kv%d d%d", name, g.n_layers, g.n_q_heads,
                  g.n_kv_heads, g.head_dim, want.n_layers, want.n_q_heads, want.n_kv_heads,
                  want.head_dim);
}

/* ------------------------------------------------------------ the table */

/* The models the table must hold, from their config.json; Gemma-2's head_dim is
 * its own field (256), not hidden / heads; Phi-3-mini is MHA with 96. */
START_TEST(table_has_the_published_geometries)
{
    expect_geometry("llama-3.2-1b", geo(16, 32, 8, 64));
    expect_geometry("llama-3.2-3b", geo(28, 24, 8, 128));
    expect_geometry("llama-3.1-8b", geo(32, 32, 8, 128));
    expect_geometry("llama-3.1-70b", geo(80, 64, 8, 128));
    expect_geometry("mistral-7b", geo(32, 32, 8, 128));
    expect_geometry("qwen2.5-0.5b", geo(24, 14, 2, 64));
    expect_geometry("qwen2.5-1.5b", geo(28, 12, 2, 128));
    expect_geometry("qwen2.5-3b", geo(36, 16, 2, 128));
    expect_geometry("qwen2.5-7b", geo(28, 28, 4, 128));
    expect_geometry("qwen2.5-14b", geo(48, 40, 8, 128));
    expect_geometry("qwen2.5-32b", geo(64, 40, 8, 128));
    expect_geometry("qwen2.5-72b", geo(80, 64, 8, 128));
    expect_geometry("phi-3-mini", geo(32, 32, 32, 96));
    expect_geometry("gemma-2-2b", geo(26, 8, 4, 256));
    expect_geometry("gemma-2-9b", geo(42, 16, 8, 256));
    expect_geometry("all-minilm-l6-v2", geo(6, 12, 12, 32));
    /* every row is a model: positive, GQA groups whole, names unique */
    ck_assert_int_ge(clkvq_model_count(), 20);
    for (int i = 0; i < clkvq_model_count(); i++) {
        clkvq_model_geometry g;
        const char *name = clkvq_model_name(i);
        ck_assert_int_eq(clkvq_model_lookup(name, &g), CLKVQ_OK);
        ck_assert_str_eq(clkvq_model_canonical(name), name);
        ck_assert(g.n_layers > 0 && g.n_kv_heads > 0 && g.head_dim > 0 &&
                  g.n_q_heads % g.n_kv_heads == 0);
        for (int j = 0; j < i; j++)
            ck_assert_str_ne(clkvq_model_name(j), name);
    }
    ck_assert_ptr_null(clkvq_model_name(-1));
    ck_assert_ptr_null(clkvq_model_name(clkvq_model_count()));
}
END_TEST

/* Hugging Face ids, KVTuner's file names and the old --shape names find
 * their row; anything else lists the table. */
START_TEST(names_are_matched_loosely_and_unknown_ones_listed)
{
    static const char *const pairs[][2] = {
        {"meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"},
        {"Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"},
        {"meta-llama/Meta-Llama-3-8B", "llama-3-8b"},
        {"llama3-8b", "llama-3-8b"},
        {"mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"},
        {"Mistral-7B-v0.1", "mistral-7b-v0.1"},
        {"Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"},
        {"microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"},
        {"phi3-mini", "phi-3-mini"},
        {"google/gemma-2-9b-it", "gemma-2-9b"},
        {"sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2"},
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        const char *c = clkvq_model_canonical(pairs[i][0]);
        ck_assert_msg(c && !strcmp(c, pairs[i][1]), "%s -> %s, want %s", pairs[i][0],
                      c ? c : "NULL", pairs[i][1]);
    }
    ck_assert_ptr_null(clkvq_model_canonical("llama-3.1-8b-extra"));
    ck_assert_ptr_null(clkvq_model_canonical(""));
    clkvq_model_geometry g;
    expect_error(clkvq_model_lookup("llama-4-400b", &g), CLKVQ_ERR_INVALID_ARG,
                 clkvq_last_error(NULL), 4, "unknown model 'llama-4-400b'", "llama-3.1-8b",
                 "qwen2.5-72b", "q32:kv8:d128:l32");
}
END_TEST

/* Every KVTuner preset names a model of the table whose layer count is the
 * preset's: the table and the published data agree. */
START_TEST(presets_name_models_of_the_table)
{
    DIR *d = opendir(KVTUNER_DIR);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strstr(e->d_name, "_KVTuner"))
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", KVTUNER_DIR, e->d_name);
        clkvq_precision_config *cfg = NULL;
        clkvq_status st = clkvq_config_load_for_model(NULL, path, NULL, NULL, &cfg);
        ck_assert_msg(st == CLKVQ_OK, "%s: %s", e->d_name, clkvq_last_error(NULL));
        clkvq_model_geometry g, row;
        ck_assert(clkvq_config_geometry(cfg, &g));
        ck_assert_int_eq(clkvq_model_lookup(clkvq_config_model(cfg), &row), CLKVQ_OK);
        ck_assert_int_eq(g.n_layers, row.n_layers);
        ck_assert_int_eq(g.n_kv_heads, row.n_kv_heads);
        clkvq_config_free(cfg);
        n++;
    }
    closedir(d);
    ck_assert_int_eq(n, 32);
}
END_TEST

/* ------------------------------------------------------------ explicit form */

START_TEST(explicit_geometry_parses_and_prints)
{
    clkvq_model_geometry g;
    ck_assert_int_eq(clkvq_model_parse("q32:kv8:d128:l32", &g), CLKVQ_OK);
    ck_assert(g.n_q_heads == 32 && g.n_kv_heads == 8 && g.head_dim == 128 && g.n_layers == 32);
    ck_assert_int_eq(clkvq_model_parse("l28:d128:kv4:q28", &g), CLKVQ_OK);
    ck_assert(g.n_q_heads == 28 && g.n_kv_heads == 4 && g.head_dim == 128 && g.n_layers == 28);
    char text[64];
    ck_assert_int_eq(clkvq_model_format(&g, text, sizeof text), (int)strlen("q28:kv4:d128:l28"));
    ck_assert_str_eq(text, "q28:kv4:d128:l28");
    static const struct {
        const char *text, *says;
    } bad[] = {
        {"", "part '' is not"},
        {"q32:kv8:d128", "layers missing"},
        {"q32:kv8:d128:l32:q16", "query heads given twice"},
        {"q32:kv5:d128:l32", "not a multiple of 5 kv heads"},
        {"q0:kv8:d128:l32", "query heads '0' is not an integer in 1..1024"},
        {"q32:kv8:d-128:l32", "head_dim '-128' is not an integer"},
        {"q32:kv8:d128:l32x", "layers '32x' is not an integer"},
        {"q32::kv8:d128:l32", "part '' is not"},
        {"h32:kv8:d128:l32", "part 'h32' is not q<n>, kv<n>, d<n> or l<n>"},
        {"q99999999999:kv8:d128:l32", "is not an integer"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error(clkvq_model_parse(bad[i].text, &g), CLKVQ_ERR_INVALID_ARG,
                     clkvq_last_error(NULL), 2, bad[i].says, "geometry '");
}
END_TEST

/* ------------------------------------------------------------ configs with a geometry */

#define LAYER(k, v) "{nbits_key: " #k ", nbits_value: " #v "}"

START_TEST(config_geometry_round_trips)
{
    const char *y = "model: m\nn_q_heads: 8\nn_kv_heads: 2\nhead_dim: 64\n0: " LAYER(4, 4)
                    "\n1: " LAYER(2, 2) "\n";
    clkvq_precision_config *c = NULL, *back = NULL;
    ck_assert_int_eq(clkvq_config_parse(NULL, y, strlen(y), NULL, &c), CLKVQ_OK);
    clkvq_model_geometry g;
    ck_assert(clkvq_config_geometry(c, &g));
    ck_assert(g.n_layers == 2 && g.n_q_heads == 8 && g.n_kv_heads == 2 && g.head_dim == 64);
    char path[] = "/tmp/clkvq_geo_XXXXXX";
    int fd = mkstemp(path);
    ck_assert(fd >= 0);
    close(fd);
    ck_assert_int_eq(clkvq_config_save(NULL, c, path), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_load(NULL, path, NULL, &back), CLKVQ_OK);
    clkvq_model_geometry g2;
    ck_assert(clkvq_config_geometry(back, &g2) && !memcmp(&g, &g2, sizeof g));
    clkvq_config_free(back);
    clkvq_config_free(c);

    /* built in memory: none, until set (checked), then saved with it */
    clkvq_layer_config layer = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    ck_assert_int_eq(clkvq_config_create(NULL, NULL, 1, &layer, 0, 0, &c), CLKVQ_OK);
    ck_assert(!clkvq_config_geometry(c, NULL));
    clkvq_model_geometry wrong = geo(2, 8, 2, 64);
    expect_error(clkvq_config_set_geometry(NULL, c, &wrong), CLKVQ_ERR_INVALID_ARG,
                 clkvq_last_error(NULL), 1, "the config has 1 layers, the model 2");
    ck_assert(!clkvq_config_geometry(c, NULL));
    clkvq_model_geometry right = geo(1, 8, 2, 64);
    ck_assert_int_eq(clkvq_config_set_geometry(NULL, c, &right), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_save(NULL, c, path), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_load(NULL, path, NULL, &back), CLKVQ_OK);
    ck_assert(clkvq_config_geometry(back, &g2) && !memcmp(&right, &g2, sizeof g2));
    clkvq_config_free(back);
    clkvq_config_free(c);
    unlink(path);
}
END_TEST

/* A file whose layers do not fit its own geometry: one error with the line. */
START_TEST(config_geometry_errors_in_files)
{
    static const struct {
        const char *yaml, *says[3];
    } bad[] = {
        {"n_q_heads: 8\nn_kv_heads: 2\n0: " LAYER(4, 4) "\n",
         {"<memory>:1:", "head_dim missing", "together"}},
        {"head_dim: 64\nn_q_heads: 6\nn_kv_heads: 4\n0: " LAYER(4, 4) "\n",
         {"<memory>:1:", "n_q_heads 6 is not a multiple of n_kv_heads 4", NULL}},
        {"n_q_heads: 8\nn_kv_heads: 4\nhead_dim: 64\n0:\n  0: " LAYER(4, 4) "\n  1: " LAYER(4, 4)
         "\n",
         {"<memory>:1:", "layer 0 has bits for 2 kv heads, the model has 4", NULL}},
        {"n_q_heads: 4\nn_kv_heads: 4\nhead_dim: 96\ngroup_size: 64\n0: " LAYER(4, 4) "\n",
         {"<memory>:1:", "layer 0: group_size 64 does not divide the model's head_dim 96", NULL}},
        {"n_q_heads: 2\nn_kv_heads: 2\nhead_dim: 2\nperm_k: [[1, 0]]\n0: " LAYER(4, 4) "\n",
         {"<memory>:1:", "perms and means are 1 heads x 2 channels", NULL}},
        {"n_q_heads: 0\nn_kv_heads: 2\nhead_dim: 64\n0: " LAYER(4, 4) "\n",
         {"<memory>:1:", "n_q_heads", "'0' is not an integer in 1..1024"}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        clkvq_precision_config *c = NULL;
        clkvq_status st = clkvq_config_parse(NULL, bad[i].yaml, strlen(bad[i].yaml), NULL, &c);
        ck_assert_msg(c == NULL, "case %zu loaded", i);
        for (int k = 0; k < 3 && bad[i].says[k]; k++)
            expect_error(st, CLKVQ_ERR_CORRUPT, clkvq_last_error(NULL), 1, bad[i].says[k]);
    }
}
END_TEST

/* A config that does not fit a model is refused with the mismatch named:
 * layers, heads, head_dim, per-head counts; at check and at cache creation. */
START_TEST(config_that_does_not_fit_is_refused)
{
    clkvq_layer_config kivi = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    kivi.residual = 32;
    clkvq_precision_config *c = NULL;
    ck_assert_int_eq(clkvq_config_load(NULL, KVTUNER_DIR "/Qwen2.5-7B-Instruct_kivi_KVTuner4_1.yaml",
                                       &kivi, &c),
                     CLKVQ_OK);
    clkvq_model_geometry qwen, llama;
    ck_assert_int_eq(clkvq_model_lookup("qwen2.5-7b", &qwen), CLKVQ_OK);
    ck_assert_int_eq(clkvq_model_lookup("llama-3.1-8b", &llama), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_check_geometry(NULL, c, &qwen), CLKVQ_OK);
    expect_error(clkvq_config_check_geometry(NULL, c, &llama), CLKVQ_ERR_INVALID_ARG,
                 clkvq_last_error(NULL), 2, "the config has 28 layers, the model 32",
                 "q32:kv8:d128:l32");
    ck_assert_int_eq(clkvq_config_set_geometry(NULL, c, &qwen), CLKVQ_OK);
    clkvq_model_geometry other = qwen;
    other.head_dim = 64;
    other.n_kv_heads = 7;
    expect_error(clkvq_config_check_geometry(NULL, c, &other), CLKVQ_ERR_INVALID_ARG,
                 clkvq_last_error(NULL), 2, "n_kv_heads: the config says 4, the model has 7",
                 "head_dim: the config says 128, the model has 64");
    /* the cache refuses other heads than the config carries */
    clkvq_context *ctx = test_ctx();
    clkvq_cache *cache = NULL;
    expect_error(clkvq_cache_create_from_config(ctx, c, 1, 64, 4, 28, 64,
                                                CLKVQ_LAYOUT_TOKEN_MAJOR,
                                                CLKVQ_LAYOUT_TOKEN_MAJOR, &cache),
                 CLKVQ_ERR_INVALID_ARG, clkvq_last_error(ctx), 1,
                 "head_dim: the config says 128, the model has 64");
    ck_assert_ptr_null(cache);
    clkvq_config_free(c);

    /* KVTuner's per-head file: 8 kv heads per layer */
    ck_assert_int_eq(clkvq_config_load(NULL, KVTUNER_DIR
                                       "/meta-llama_Meta-Llama-3-8B-Instruct_k8_v4._per_head.yaml",
                                       NULL, &c),
                     CLKVQ_OK);
    clkvq_model_geometry four = geo(32, 32, 4, 128);
    expect_error(clkvq_config_check_geometry(NULL, c, &four), CLKVQ_ERR_INVALID_ARG,
                 clkvq_last_error(NULL), 1, "layer 0 has bits for 8 kv heads, the model has 4");
    clkvq_model_geometry l3;
    ck_assert_int_eq(clkvq_model_lookup("llama-3-8b", &l3), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_check_geometry(NULL, c, &l3), CLKVQ_OK);
    clkvq_config_free(c);
}
END_TEST

/* ------------------------------------------------------------ layer settings */

/* The 3.25-bit Llama-3.1-8B kivi preset uses K2V2, K4V4, K4V2 and K8V4: four
 * shapes, in order of first use, and each layer's heads all have its own
 * pair's ([layer][kv head] entries). */
START_TEST(tune_shapes_of_a_preset)
{
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_load_for_model(NULL, LLAMA_KIVI_325, NULL, NULL, &c);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    clkvq_model_geometry g;
    ck_assert(clkvq_config_geometry(c, &g));
    clkvq_tune_shape shapes[8];
    int n = 0, heads[32 * 8], of[32], first[8];
    ck_assert_int_eq(clkvq_config_tune_shapes(NULL, c, &g, 4096, 2, shapes, 8, &n, heads, first),
                     CLKVQ_OK);
    ck_assert_int_eq(n, 4);
    for (int l = 0; l < 32; l++) {
        of[l] = heads[l * 8];
        for (int h = 1; h < 8; h++)
            ck_assert_int_eq(heads[l * 8 + h], of[l]);
    }
    const clkvq_format want[4][2] = {{CLKVQ_FMT_Q2, CLKVQ_FMT_Q2},
                                     {CLKVQ_FMT_Q4, CLKVQ_FMT_Q4},
                                     {CLKVQ_FMT_Q4, CLKVQ_FMT_Q2},
                                     {CLKVQ_FMT_Q8, CLKVQ_FMT_Q4}};
    for (int i = 0; i < 4; i++) {
        ck_assert(shapes[i].scheme == CLKVQ_SCHEME_KIVI && shapes[i].group_size == 32);
        ck_assert(shapes[i].format_k == want[i][0] && shapes[i].format_v == want[i][1]);
        ck_assert(shapes[i].head_dim == 128 && shapes[i].n_q_heads == 32 &&
                  shapes[i].n_kv_heads == 8 && shapes[i].tokens == 4096 && shapes[i].batch == 2);
        ck_assert_int_eq(of[first[i]], i);
        for (int l = 0; l < first[i]; l++)
            ck_assert_int_ne(of[l], i);
    }
    for (int l = 0; l < 32; l++) {
        clkvq_layer_config lc;
        clkvq_config_layer(c, l, &lc);
        ck_assert(lc.format_k == shapes[of[l]].format_k && lc.format_v == shapes[of[l]].format_v);
    }
    expect_error(clkvq_config_tune_shapes(NULL, c, &g, 4096, 1, shapes, 2, &n, NULL, NULL),
                 CLKVQ_ERR_BUFFER_TOO_SMALL, clkvq_last_error(NULL), 1, "4 shapes, room for 2");
    ck_assert_int_eq(n, 4);
    clkvq_model_geometry qwen;
    clkvq_model_lookup("qwen2.5-7b", &qwen);
    expect_error(clkvq_config_tune_shapes(NULL, c, &qwen, 4096, 1, shapes, 8, &n, NULL, NULL),
                 CLKVQ_ERR_INVALID_ARG, clkvq_last_error(NULL), 1, "32 layers, the model 28");
    clkvq_config_free(c);

    /* heads with their own bits: one shape per share, on its heads */
    const char *y = "0:\n  0: " LAYER(8, 4) "\n  1: " LAYER(4, 4) "\n";
    ck_assert_int_eq(clkvq_config_parse(NULL, y, strlen(y), NULL, &c), CLKVQ_OK);
    clkvq_model_geometry two = geo(1, 4, 2, 64);
    ck_assert_int_eq(clkvq_config_tune_shapes(NULL, c, &two, 64, 1, shapes, 8, &n, heads, NULL),
                     CLKVQ_OK);
    ck_assert_int_eq(n, 2);
    ck_assert(heads[0] == 0 && heads[1] == 1);
    for (int i = 0; i < 2; i++)
        ck_assert(shapes[i].n_kv_heads == 1 && shapes[i].n_q_heads == 2 &&
                  shapes[i].format_k == (i ? CLKVQ_FMT_Q4 : CLKVQ_FMT_Q8));
    clkvq_config_free(c);
}
END_TEST

/* ------------------------------------------------------------ presets */

/* A preset loads as it was searched: kivi (group 32, residual 32) or
 * pertoken (token scheme, one group per head), with its model's geometry. */
START_TEST(presets_load_the_way_they_were_searched)
{
    clkvq_precision_config *c = NULL;
    ck_assert_int_eq(clkvq_config_load_for_model(NULL, LLAMA_KIVI_325, NULL, NULL, &c), CLKVQ_OK);
    ck_assert_str_eq(clkvq_config_model(c), "llama-3.1-8b");
    ck_assert_double_eq_tol(clkvq_config_average_bits(c), 3.25, 1e-12);
    for (int l = 0; l < 32; l++) {
        clkvq_layer_config lc;
        clkvq_config_layer(c, l, &lc);
        ck_assert(lc.scheme == CLKVQ_SCHEME_KIVI && lc.group_size == 32 && lc.residual == 32);
    }
    clkvq_config_free(c);

    ck_assert_int_eq(clkvq_config_load_for_model(
                         NULL, KVTUNER_DIR "/Qwen2.5-3B-Instruct_pertoken_KVTuner4_0.yaml", NULL,
                         NULL, &c),
                     CLKVQ_OK);
    clkvq_model_geometry g;
    ck_assert(clkvq_config_geometry(c, &g) && g.n_layers == 36 && g.n_kv_heads == 2);
    clkvq_layer_config lc;
    clkvq_config_layer(c, 0, &lc);
    ck_assert(lc.scheme == CLKVQ_SCHEME_TOKEN && lc.group_size == 128 && lc.residual == 0);
    clkvq_config_free(c);

    /* the caller's settings win over the preset's mode */
    clkvq_layer_config mine = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    mine.residual = 128;
    ck_assert_int_eq(clkvq_config_load_for_model(NULL, LLAMA_KIVI_325, &mine, NULL, &c), CLKVQ_OK);
    clkvq_config_layer(c, 5, &lc);
    ck_assert(lc.scheme == CLKVQ_SCHEME_KIVI && lc.residual == 128);
    clkvq_config_free(c);

    /* another name says nothing of the model: a geometry is needed */
    char path[] = "/tmp/clkvq_preset_XXXXXX";
    int fd = mkstemp(path);
    ck_assert(fd >= 0);
    FILE *in = fopen(LLAMA_KIVI_325, "rb");
    ck_assert_ptr_nonnull(in);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf, in);
    fclose(in);
    ck_assert(write(fd, buf, n) == (ssize_t)n);
    close(fd);
    expect_error(clkvq_config_load_for_model(NULL, path, NULL, NULL, &c), CLKVQ_ERR_INVALID_ARG,
                 clkvq_last_error(NULL), 2, "no model geometry", path);
    ck_assert_ptr_null(c);
    clkvq_model_geometry explicit_g = geo(32, 16, 4, 64);
    ck_assert_int_eq(clkvq_config_load_for_model(NULL, path, NULL, &explicit_g, &c), CLKVQ_OK);
    ck_assert(clkvq_config_geometry(c, &g) && g.n_q_heads == 16 && g.head_dim == 64);
    ck_assert_str_eq(clkvq_config_model(c), "");
    clkvq_config_free(c);
    unlink(path);

    /* a geometry that is not the named model's: loaded, but no longer named for it */
    ck_assert_int_eq(clkvq_config_load_for_model(NULL, LLAMA_KIVI_325, NULL, &explicit_g, &c),
                     CLKVQ_OK);
    ck_assert_str_eq(clkvq_config_model(c), "");
    clkvq_config_free(c);
}
END_TEST

/* ------------------------------------------------------------ the store */

static char g_dir[256];

static void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char sub[1024];
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        remove_tree(sub);
    }
    closedir(d);
    rmdir(path);
}

static void store_setup(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/clkvq-model-test-XXXXXX");
    if (!mkdtemp(g_dir) || setenv("CLKVQ_CACHE_DIR", g_dir, 1) != 0) {
        perror("mkdtemp/setenv");
        exit(1);
    }
}

static void store_teardown(void) { remove_tree(g_dir); }

static int same_layers(const clkvq_precision_config *a, const clkvq_precision_config *b)
{
    if (clkvq_config_n_layers(a) != clkvq_config_n_layers(b))
        return 0;
    for (int l = 0; l < clkvq_config_n_layers(a); l++) {
        clkvq_layer_config x, y;
        clkvq_config_layer(a, l, &x);
        clkvq_config_layer(b, l, &y);
        if (x.scheme != y.scheme || x.format_k != y.format_k || x.format_v != y.format_v ||
            x.group_size != y.group_size || x.residual != y.residual)
            return 0;
    }
    return 1;
}

/* Nothing stored: the shipped default preset (the rule of config_store.c:
 * kivi, 4-bit limit, more average bits). Stored: the user's, under every
 * spelling of the model. */
START_TEST(configs_are_found_by_model_name)
{
    clkvq_context *ctx = test_ctx();
    clkvq_precision_config *c = NULL, *want = NULL;
    char origin[1024];
    clkvq_status st = clkvq_config_for_model(ctx, "llama-3.1-8b", &c, origin, sizeof origin);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    ck_assert_str_eq(origin, "shipped:Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml");
    ck_assert_int_eq(clkvq_config_load_for_model(ctx, LLAMA_KIVI_325, NULL, NULL, &want),
                     CLKVQ_OK);
    ck_assert(same_layers(c, want));
    clkvq_model_geometry g;
    ck_assert(clkvq_config_geometry(c, &g) && g.n_layers == 32 && g.n_kv_heads == 8);
    clkvq_config_free(c);
    clkvq_config_free(want);
    static const char *const defaults[][2] = {
        {"mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B-Instruct-v0.3_kivi_KVTuner4_0.yaml"},
        {"qwen2.5-3b", "Qwen2.5-3B-Instruct_kivi_KVTuner4_1.yaml"},
        {"Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml"},
    };
    for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; i++) {
        st = clkvq_config_for_model(ctx, defaults[i][0], &c, origin, sizeof origin);
        ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
        ck_assert_str_eq(origin + strlen("shipped:"), defaults[i][1]);
        clkvq_config_free(c);
    }

    /* the user's own, stored under the HF id, found by KVTuner's spelling */
    const char *six = KVTUNER_DIR "/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner6_0.yaml";
    ck_assert_int_eq(clkvq_config_load_for_model(ctx, six, NULL, NULL, &want), CLKVQ_OK);
    char path[1024], expect_path[1024];
    st = clkvq_config_store(ctx, want, "meta-llama/Llama-3.1-8B-Instruct", path, sizeof path);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    snprintf(expect_path, sizeof expect_path, "%s/configs/llama-3.1-8b.yaml", g_dir);
    ck_assert_str_eq(path, expect_path);
    st = clkvq_config_for_model(ctx, "Meta-Llama-3.1-8B-Instruct", &c, origin, sizeof origin);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    ck_assert_str_eq(origin, expect_path);
    ck_assert(same_layers(c, want));
    ck_assert_str_eq(clkvq_config_model(c), "llama-3.1-8b");
    clkvq_config_free(c);

    /* a model the table does not know: stored only with its geometry */
    clkvq_layer_config layer = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    ck_assert_int_eq(clkvq_config_create(ctx, NULL, 1, &layer, 0, 0, &c), CLKVQ_OK);
    st = clkvq_config_store(ctx, c, "acme/My-Model_7B", path, sizeof path);
    expect_error(st, CLKVQ_ERR_INVALID_ARG, clkvq_last_error(ctx), 1, "carries no geometry");
    clkvq_config_free(c);
    clkvq_config_free(want);
    clkvq_model_geometry mine = geo(32, 16, 4, 128);
    ck_assert_int_eq(clkvq_config_load_for_model(ctx, six, NULL, &mine, &want), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_store(ctx, want, "acme/My-Model_7B", path, sizeof path),
                     CLKVQ_OK);
    snprintf(expect_path, sizeof expect_path, "%s/configs/my-model_7b.yaml", g_dir);
    ck_assert_str_eq(path, expect_path);
    ck_assert_int_eq(clkvq_config_for_model(ctx, "my-model_7b", &c, NULL, 0), CLKVQ_OK);
    ck_assert(clkvq_config_geometry(c, &g) && g.n_q_heads == 16 && g.n_kv_heads == 4);
    clkvq_config_free(c);

    /* a config that is not the model's is not stored under its name */
    ck_assert_int_eq(clkvq_config_store(ctx, want, "qwen2.5-7b", path, sizeof path),
                     CLKVQ_ERR_INVALID_ARG);
    snprintf(expect_path, sizeof expect_path, "%s/configs/qwen2.5-7b.yaml", g_dir);
    ck_assert_int_ne(access(expect_path, F_OK), 0);
    clkvq_config_free(want);
}
END_TEST

START_TEST(missing_configs_say_what_is_known)
{
    clkvq_context *ctx = test_ctx();
    clkvq_precision_config *c = NULL;
    clkvq_status st = clkvq_config_for_model(ctx, "llama-4-400b", &c, NULL, 0);
    expect_error(st, CLKVQ_ERR_INVALID_ARG, clkvq_last_error(ctx), 4, "llama-4-400b",
                 "/configs/llama-4-400b.yaml", "known models:", "qwen2.5-7b");
    st = clkvq_config_for_model(ctx, "gemma-2-2b", &c, NULL, 0);
    expect_error(st, CLKVQ_ERR_IO, clkvq_last_error(ctx), 3, "no config for gemma-2-2b",
                 "/configs/gemma-2-2b.yaml", "presets ship for llama-3.1-8b");
    ck_assert_ptr_null(c);
    clkvq_cache *cache = NULL;
    st = clkvq_cache_create_for_model(ctx, "gemma-2-2b", 1, 64, CLKVQ_LAYOUT_AUTO,
                                      CLKVQ_LAYOUT_AUTO, &cache);
    ck_assert_int_eq(st, CLKVQ_ERR_IO);
    ck_assert_ptr_null(cache);
}
END_TEST

/* --show's half on configs: each stored one, its settings and layers, which
 * are tuned; then the shipped default per model. */
START_TEST(show_lists_stored_configs)
{
    clkvq_context *ctx = test_ctx();
    clkvq_precision_config *c = NULL;
    ck_assert_int_eq(clkvq_config_load_for_model(ctx, LLAMA_KIVI_325, NULL, NULL, &c), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_store(ctx, c, NULL, NULL, 0), CLKVQ_OK);
    clkvq_config_free(c);
    char path[512];
    snprintf(path, sizeof path, "%s/configs/broken.yaml", g_dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("0: {nbits_key: 5}\n", f);
    fclose(f);
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    ck_assert_int_eq(clkvq_config_show(ctx, out), CLKVQ_OK);
    fclose(out);
    static const char *const want[] = {
        "(2 stored)",
        "broken.yaml: NOT USABLE",
        "llama-3.1-8b.yaml: model llama-3.1-8b, q32:kv8:d128:l32, 32 layers",
        "kivi K2V2 g32",
        "layers 0,4,25,27",
        "kivi K8V4 g32",
        "layers 13,17",
        "not tuned at this geometry",
        "0 of 4 layer settings tuned on this device",
        "llama-3.1-8b     Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml (3.25 bits)",
        "qwen2.5-7b       Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ck_assert_msg(strstr(text, want[i]), "'%s' not in:\n%s", want[i], text);
    free(text);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("model");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, table_has_the_published_geometries);
    tcase_add_test(tc, names_are_matched_loosely_and_unknown_ones_listed);
    tcase_add_test(tc, presets_name_models_of_the_table);
    tcase_add_test(tc, explicit_geometry_parses_and_prints);
    tcase_add_test(tc, config_geometry_round_trips);
    tcase_add_test(tc, config_geometry_errors_in_files);
    tcase_add_test(tc, config_that_does_not_fit_is_refused);
    tcase_add_test(tc, tune_shapes_of_a_preset);
    tcase_add_test(tc, presets_load_the_way_they_were_searched);
    suite_add_tcase(s, tc);
    TCase *store = tcase_create("store");
    tcase_set_timeout(store, 600);
    tcase_add_checked_fixture(store, store_setup, store_teardown);
    tcase_add_test(store, configs_are_found_by_model_name);
    tcase_add_test(store, missing_configs_say_what_is_known);
    tcase_add_test(store, show_lists_stored_configs);
    suite_add_tcase(s, store);
    return test_run_suite(s);
}

/* The autotuner: verification rejects wrong candidates, results round-trip
 * through the tuning file, and the library then uses what was tuned. */
#include "test_hooks.h"
#include "test_util.h"
#include "tuning_db.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static clkvq_tune_shape small_shape(void)
{
    clkvq_tune_shape sh;
    memset(&sh, 0, sizeof sh);
    sh.scheme = CLKVQ_SCHEME_TOKEN;
    sh.format_k = CLKVQ_FMT_Q4;
    sh.format_v = CLKVQ_FMT_Q2;
    sh.group_size = 32;
    sh.head_dim = 64;
    sh.n_q_heads = 8;
    sh.n_kv_heads = 2;
    sh.tokens = 700;
    sh.batch = 2;
    return sh;
}

static void fresh_cache_dir(void)
{
    static char dir[64];
    snprintf(dir, sizeof dir, "/tmp/clkvq-tune-test-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    setenv("CLKVQ_CACHE_DIR", dir, 1);
}

static clkvq_cache *cache_for_shape(const clkvq_tune_shape *sh, clkvq_layout layout)
{
    clkvq_layer_config lc = clkvq_layer_config_default(sh->scheme);
    lc.format_k = sh->format_k;
    lc.format_v = sh->format_v;
    lc.group_size = sh->group_size;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = sh->batch, .capacity = sh->tokens,
                              .n_kv_heads = sh->n_kv_heads, .n_q_heads = sh->n_q_heads,
                              .head_dim = sh->head_dim, .layout_k = layout, .layout_v = layout,
                              .layers = &lc};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(test_ctx(), &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(test_ctx()));
    return cache;
}

/* The tuner's verification on a candidate known to be wrong: a copy of the
 * default whose output is scaled by 1.01 between read-back and check (a
 * test hook of the static library). It must be rejected and never win. */
START_TEST(planted_wrong_candidate_is_rejected)
{
    fresh_cache_dir();
    clkvq_tune_shape sh = small_shape();
    clkvq_tune_options opt = {0, 1, 2, 1, NULL, NULL, NULL};
    clkvq_tune_result res;
    clkvq_tune_perturb_for_tests = 1;
    clkvq_status st = clkvq_tune_decode(test_ctx(), &sh, &opt, &res);
    clkvq_tune_perturb_for_tests = 0;
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(test_ctx()));
    ck_assert_int_eq(res.n_rejected, 1);
    ck_assert_int_ge(res.n_candidates, 2);
    ck_assert(res.tuned_ms > 0 && res.tuned_ms <= res.default_ms);
}
END_TEST

/* A real quick tune: stored, then looked up as this device's exact entry,
 * and a cache with AUTO layouts takes the tuned layouts and tunables. */
START_TEST(tuned_result_is_what_the_library_uses)
{
    fresh_cache_dir();
    clkvq_context *ctx = test_ctx();
    clkvq_tune_shape sh = small_shape();
    clkvq_tune_options opt = {0, 1, 2, 1, NULL, NULL, NULL};
    clkvq_tune_result res;
    ck_assert_int_eq(clkvq_tune_decode(ctx, &sh, &opt, &res), CLKVQ_OK);
    ck_assert_int_eq(res.n_rejected, 0);
    char path[1024];
    ck_assert_int_eq(clkvq_tuning_store(ctx, &res, 1, path, sizeof path), CLKVQ_OK);
    ck_assert_int_eq(access(path, R_OK), 0);

    clkvq_tune_params found;
    clkvq_tuning_source source;
    ck_assert_int_eq(clkvq_tuning_lookup(ctx, &sh, &found, &source), CLKVQ_OK);
    ck_assert_int_eq(source, CLKVQ_TUNED_EXACT);
    ck_assert_int_eq(found.attn.variant, res.params.attn.variant);
    ck_assert_int_eq(found.attn.chunk, res.params.attn.chunk);

    clkvq_cache *cache = cache_for_shape(&sh, CLKVQ_LAYOUT_AUTO);
    clkvq_attn_tuning used;
    ck_assert_int_eq(clkvq_cache_get_tuning(cache, &used), CLKVQ_OK);
    ck_assert_int_eq(used.variant, res.params.attn.variant);
    ck_assert_int_eq(used.chunk, res.params.attn.chunk);
    clkvq_cache_release(cache);
}
END_TEST

/* An entry that says "cooperative" switches the variant the library uses
 * for that shape (the CPU's built-in default is serial), and decoding
 * through it still matches the serial result. */
START_TEST(stored_entry_changes_the_variant)
{
    fresh_cache_dir();
    clkvq_context *ctx = test_ctx();
    clkvq_tune_shape sh = small_shape();
    clkvq_cache *before = cache_for_shape(&sh, CLKVQ_LAYOUT_GROUP_PLANAR);
    clkvq_attn_tuning t0;
    clkvq_cache_get_tuning(before, &t0);

    clkvq_tune_result res;
    memset(&res, 0, sizeof res);
    snprintf(res.kernel, sizeof res.kernel, "decode");
    res.shape = sh;
    clkvq_attn_variant other = t0.variant == CLKVQ_ATTN_SERIAL ? CLKVQ_ATTN_COOPERATIVE
                                                                 : CLKVQ_ATTN_SERIAL;
    res.params.attn.variant = other;
    res.params.attn.wgs = 32;
    res.params.attn.chunk = 128;
    res.params.attn.vw = 8;
    res.params.attn.tpl = 2;
    res.params.attn.waves = 1;
    res.params.layout_k = res.params.layout_v = CLKVQ_LAYOUT_GROUP_PLANAR;
    res.default_ms = 2.0;
    res.tuned_ms = 1.0;
    ck_assert_int_eq(clkvq_tuning_store(ctx, &res, 1, NULL, 0), CLKVQ_OK);

    clkvq_cache *after = cache_for_shape(&sh, CLKVQ_LAYOUT_GROUP_PLANAR);
    clkvq_attn_tuning t1;
    clkvq_cache_get_tuning(after, &t1);
    ck_assert_int_eq(t1.variant, other);
    ck_assert_int_eq(t1.chunk, 128);

    /* same data, both variants: the outputs agree */
    size_t kv = (size_t)sh.n_kv_heads * 300 * sh.head_dim;
    float *k = malloc(kv * sizeof(float)), *v = malloc(kv * sizeof(float));
    clkvq_shape part = {sh.n_kv_heads, 300, sh.head_dim};
    clkvq_synth_kv(3, &part, k, v);
    for (int s = 0; s < sh.batch; s++) {
        ck_assert_int_eq(clkvq_cache_append(before, 0, s, 300, k, v), CLKVQ_OK);
        ck_assert_int_eq(clkvq_cache_append(after, 0, s, 300, k, v), CLKVQ_OK);
    }
    size_t nq = (size_t)sh.batch * sh.n_q_heads * sh.head_dim;
    float *q = malloc(nq * sizeof(float)), *o0 = malloc(nq * sizeof(float)),
          *o1 = malloc(nq * sizeof(float));
    test_fill_normal(4, q, nq, 1.0f);
    ck_assert_int_eq(clkvq_cache_decode_host(before, 0, q, o0, 0.125f), CLKVQ_OK);
    ck_assert_int_eq(clkvq_cache_decode_host(after, 0, q, o1, 0.125f), CLKVQ_OK);
    double num = 0, den = 0;
    for (size_t i = 0; i < nq; i++) {
        num += (double)(o0[i] - o1[i]) * (o0[i] - o1[i]);
        den += (double)o0[i] * o0[i];
    }
    ck_assert_double_le(sqrt(num / den), 1e-5);
    free(k);
    free(v);
    free(q);
    free(o0);
    free(o1);
    clkvq_cache_release(before);
    clkvq_cache_release(after);
}
END_TEST

/* Split and chunk choices are keyed by length: of two entries for one
 * structure, a decode uses the one tuned nearest its longest sequence. */
START_TEST(decode_takes_the_entry_nearest_its_length)
{
    fresh_cache_dir();
    clkvq_context *ctx = test_ctx();
    clkvq_tune_shape sh = small_shape();
    sh.tokens = 4096;
    clkvq_tune_result res[2];
    memset(res, 0, sizeof res);
    for (int i = 0; i < 2; i++) {
        snprintf(res[i].kernel, sizeof res[i].kernel, "decode");
        res[i].shape = sh;
        res[i].shape.tokens = i ? 4096 : 128;
        res[i].params = clkvq_tuning_builtin(ctx);
        res[i].params.attn.variant = CLKVQ_ATTN_SERIAL;
        res[i].params.attn.chunk = i ? 1024 : 64;
        res[i].params.layout_k = res[i].params.layout_v = CLKVQ_LAYOUT_GROUP_PLANAR;
        res[i].default_ms = 2.0;
        res[i].tuned_ms = 1.0;
    }
    ck_assert_int_eq(clkvq_tuning_store(ctx, res, 2, NULL, 0), CLKVQ_OK);
    clkvq_cache *cache = cache_for_shape(&sh, CLKVQ_LAYOUT_GROUP_PLANAR);
    clkvq_attn_tuning t;
    ck_assert_int_eq(clkvq_cache_get_tuning(cache, &t), CLKVQ_OK);
    ck_assert_int_eq(t.chunk, 64); /* empty: nearest the short entry */
    size_t kv = (size_t)sh.n_kv_heads * 3000 * sh.head_dim;
    float *k = malloc(kv * sizeof(float)), *v = malloc(kv * sizeof(float));
    clkvq_shape part = {sh.n_kv_heads, 3000, sh.head_dim};
    clkvq_synth_kv(5, &part, k, v);
    ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 3000, k, v), CLKVQ_OK);
    ck_assert_int_eq(clkvq_cache_get_tuning(cache, &t), CLKVQ_OK);
    ck_assert_int_eq(t.chunk, 1024);
    free(k);
    free(v);
    clkvq_cache_release(cache);
}
END_TEST

START_TEST(tune_bad_arguments)
{
    clkvq_tune_shape sh = small_shape();
    clkvq_tune_result res;
    ck_assert_int_eq(clkvq_tune_decode(NULL, &sh, NULL, &res), CLKVQ_ERR_INVALID_ARG);
    sh.tokens = 0;
    ck_assert_int_eq(clkvq_tune_decode(test_ctx(), &sh, NULL, &res), CLKVQ_ERR_INVALID_ARG);
    ck_assert_str_ne(clkvq_last_error(test_ctx()), "");
}
END_TEST

/* The suite's own cache dir (ctest's build/test-cache), before any test
 * points CLKVQ_CACHE_DIR at a fresh one. */
static char g_suite_cache_dir[1024];

/* The programs already built by the suites (the suite's cache dir's) serve
 * the fresh one too: only the tuning results must start empty. */
static void fresh_cache_dir_sharing_programs(void)
{
    char programs[1100] = "";
    if (g_suite_cache_dir[0])
        snprintf(programs, sizeof programs, "%s/programs", g_suite_cache_dir);
    fresh_cache_dir();
    char link_path[1024];
    snprintf(link_path, sizeof link_path, "%s/programs", getenv("CLKVQ_CACHE_DIR"));
    if (programs[0] && access(programs, F_OK) == 0)
        ck_assert_int_eq(symlink(programs, link_path), 0);
}

/* Tunes every shape of the config in y (stored as model test-model) at
 * tokens and batch 1 and checks that a cache opened by the model's name
 * then finds an exact entry for every layer; n_shapes: the shapes the
 * config must have. Returns the config (the caller frees it). */
static clkvq_precision_config *tune_config_for(const char *y, int n_shapes, int tokens)
{
    clkvq_context *ctx = test_ctx();
    clkvq_precision_config *cfg = NULL;
    ck_assert_int_eq(clkvq_config_parse(ctx, y, strlen(y), NULL, &cfg), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_store(ctx, cfg, NULL, NULL, 0), CLKVQ_OK);
    int n_layers = clkvq_config_n_layers(cfg);
    clkvq_cache *cache = NULL;
    clkvq_tuning_source src;
    ck_assert_int_eq(clkvq_cache_create_for_model(ctx, "test-model", 1, tokens,
                                                  CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO, &cache),
                     CLKVQ_OK);
    for (int l = 0; l < n_layers; l++) {
        ck_assert_int_eq(clkvq_cache_tuning_source(cache, l, &src), CLKVQ_OK);
        ck_assert_int_eq(src, CLKVQ_TUNED_BUILTIN);
    }
    clkvq_cache_release(cache);

    clkvq_model_geometry g;
    ck_assert(clkvq_config_geometry(cfg, &g));
    clkvq_tune_shape shapes[8];
    int n = 0, first[8];
    ck_assert_int_eq(clkvq_config_tune_shapes(ctx, cfg, &g, tokens, 1, shapes, 8, &n, NULL,
                                              first),
                     CLKVQ_OK);
    ck_assert_int_eq(n, n_shapes);
    clkvq_tune_result res[8];
    for (int i = 0; i < n; i++) {
        /* the layer's settings with the shape's pair (a per-head layer's share) */
        clkvq_layer_config lc;
        clkvq_config_layer(cfg, first[i], &lc);
        lc.format_k = shapes[i].format_k;
        lc.format_v = shapes[i].format_v;
        ck_assert_int_eq(lc.residual, 32);
        clkvq_tune_options opt = {0, 1, 1, 1, NULL, NULL, &lc};
        clkvq_status st = clkvq_tune_decode(ctx, &shapes[i], &opt, &res[i]);
        ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
        ck_assert_int_eq(res[i].n_rejected, 0);
    }
    ck_assert_int_eq(clkvq_tuning_store(ctx, res, n, NULL, 0), CLKVQ_OK);

    ck_assert_int_eq(clkvq_cache_create_for_model(ctx, "test-model", 1, tokens,
                                                  CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO, &cache),
                     CLKVQ_OK);
    for (int l = 0; l < n_layers; l++) {
        ck_assert_int_eq(clkvq_cache_tuning_source(cache, l, &src), CLKVQ_OK);
        ck_assert_msg(src == CLKVQ_TUNED_EXACT, "layer %d: %s", l, clkvq_tuning_source_name(src));
    }
    clkvq_cache_release(cache);
    /* another capacity: the nearest entry, not an exact one */
    ck_assert_int_eq(clkvq_cache_create_for_model(ctx, "test-model", 1, 2 * tokens,
                                                  CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO, &cache),
                     CLKVQ_OK);
    for (int l = 0; l < n_layers; l++) {
        ck_assert_int_eq(clkvq_cache_tuning_source(cache, l, &src), CLKVQ_OK);
        ck_assert_int_eq(src, CLKVQ_TUNED_NEAREST);
    }
    clkvq_cache_release(cache);
    return cfg;
}

/* clkvq-tune --config in the library's terms: every distinct layer setting
 * of a config, tuned at the model's geometry and a cache's capacity and
 * batch, with the settings of the layers it serves; afterwards a cache
 * opened by model name finds an exact entry for every layer, and one of
 * another capacity does not. */
START_TEST(config_tuned_for_gives_every_layer_an_exact_entry)
{
    fresh_cache_dir_sharing_programs();
    clkvq_tuning_set_shipped(NULL, NULL, 0); /* no vendor level: before = built-in */
    clkvq_context *ctx = test_ctx();
    const char *y = "model: test-model\nn_q_heads: 8\nn_kv_heads: 2\nhead_dim: 64\n"
                    "scheme: kivi\nresidual: 32\n"
                    "0: {nbits_key: 2, nbits_value: 2}\n1: {nbits_key: 4, nbits_value: 4}\n"
                    "2: {nbits_key: 2, nbits_value: 2}\n3: {nbits_key: 8, nbits_value: 4}\n";
    clkvq_precision_config *cfg = tune_config_for(y, 3, 192);
    clkvq_model_geometry g;
    ck_assert(clkvq_config_geometry(cfg, &g));
    clkvq_tune_shape shapes[8];
    int n = 0, first[8];
    ck_assert_int_eq(clkvq_config_tune_shapes(ctx, cfg, &g, 192, 1, shapes, 8, &n, NULL, first),
                     CLKVQ_OK);
    /* the layer given must be the shape's */
    clkvq_layer_config other;
    clkvq_config_layer(cfg, 1, &other); /* K4V4, not K2V2 */
    clkvq_tune_options opt = {0, 1, 1, 1, NULL, NULL, &other};
    clkvq_tune_result res;
    ck_assert_int_eq(clkvq_tune_decode(ctx, &shapes[0], &opt, &res), CLKVQ_ERR_INVALID_ARG);
    ck_assert(strstr(clkvq_last_error(ctx), "options->layer"));
    clkvq_tuning_set_shipped(NULL, NULL, -1);
    clkvq_config_free(cfg);
}
END_TEST

/* The same for a config with per-head bits: each share of a per-head layer
 * is a setting of its own (its pair on its head count), and once every
 * one is tuned the per-head layer finds exact entries for all its shares. */
START_TEST(per_head_config_tuned_for_gives_every_layer_an_exact_entry)
{
    fresh_cache_dir_sharing_programs();
    clkvq_tuning_set_shipped(NULL, NULL, 0);
    const char *y = "model: test-model\nn_q_heads: 8\nn_kv_heads: 2\nhead_dim: 64\n"
                    "scheme: kivi\nresidual: 32\n"
                    "0:\n  0: {nbits_key: 2, nbits_value: 2}\n"
                    "  1: {nbits_key: 4, nbits_value: 4}\n"
                    "1: {nbits_key: 2, nbits_value: 2}\n";
    clkvq_config_free(tune_config_for(y, 3, 192));
    clkvq_tuning_set_shipped(NULL, NULL, -1);
}
END_TEST

int main(void)
{
    const char *dir = getenv("CLKVQ_CACHE_DIR");
    if (dir)
        snprintf(g_suite_cache_dir, sizeof g_suite_cache_dir, "%s", dir);
    Suite *s = suite_create("autotune");
    TCase *tc = tcase_create("autotune");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, tune_bad_arguments);
    tcase_add_test(tc, planted_wrong_candidate_is_rejected);
    tcase_add_test(tc, tuned_result_is_what_the_library_uses);
    tcase_add_test(tc, stored_entry_changes_the_variant);
    tcase_add_test(tc, config_tuned_for_gives_every_layer_an_exact_entry);
    tcase_add_test(tc, per_head_config_tuned_for_gives_every_layer_an_exact_entry);
    tcase_add_test(tc, decode_takes_the_entry_nearest_its_length);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}

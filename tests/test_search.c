/* The layer precision search: planted sensitive layers get more bits, the
 * front is monotone, the config it writes loads and runs, and it minimizes
 * exactly the pooled error clkvq-eval reports (no configuration within the
 * budget does better; the written config measures what it predicted). */
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LAYERS 6
#define KV_HEADS 2
#define Q_HEADS 4
#define DIM 64
#define TOKENS 256

static const int g_sensitive[LAYERS] = {0, 1, 0, 0, 1, 0};

/* Sensitive layers: key outlier channels 40x, and each query copies the key
 * of one earlier token (scaled), so attention is peaked and a few score
 * errors move the output. Other layers: diffuse, small queries. */
static void make_layer(int l, float *q, float *k, float *v)
{
    clkvq_shape shape = {KV_HEADS, TOKENS, DIM};
    clkvq_synth_kv(100 + (uint64_t)l, &shape, k, v);
    uint64_t rng = 7 + (uint64_t)l;
    if (g_sensitive[l])
        for (int h = 0; h < KV_HEADS; h++)
            for (int t = 0; t < TOKENS; t++)
                for (int c = 0; c < 4; c++)
                    k[((size_t)h * TOKENS + t) * DIM + 9 * c + 2] *= 40.0f;
    for (int qh = 0; qh < Q_HEADS; qh++)
        for (int t = 0; t < TOKENS; t++) {
            float *row = q + ((size_t)qh * TOKENS + t) * DIM;
            int src = (int)(test_uniform(&rng) * (t + 1));
            const float *key = k + ((size_t)(qh / (Q_HEADS / KV_HEADS)) * TOKENS + src) * DIM;
            for (int c = 0; c < DIM; c++)
                row[c] = g_sensitive[l] ? 0.2f * key[c] + (float)test_normal(&rng) * 0.1f
                                        : (float)test_normal(&rng) * 0.05f;
        }
}

static char *write_dump(void)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/clkvq-search-XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    size_t qn = (size_t)Q_HEADS * TOKENS * DIM, kvn = (size_t)KV_HEADS * TOKENS * DIM;
    float *q[LAYERS], *k[LAYERS], *v[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        q[l] = malloc(qn * sizeof(float));
        k[l] = malloc(kvn * sizeof(float));
        v[l] = malloc(kvn * sizeof(float));
        make_layer(l, q[l], k[l], v[l]);
    }
    clkvq_dump_info info;
    memset(&info, 0, sizeof info);
    info.n_layers = LAYERS;
    info.n_q_heads = Q_HEADS;
    info.n_kv_heads = KV_HEADS;
    info.n_tokens = TOKENS;
    info.head_dim = DIM;
    snprintf(info.model, sizeof info.model, "planted-sensitive");
    clkvq_status st = clkvq_dump_write(test_ctx(), path, &info, (const float *const *)q,
                                       (const float *const *)k, (const float *const *)v, 0);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(test_ctx()));
    for (int l = 0; l < LAYERS; l++) {
        free(q[l]);
        free(k[l]);
        free(v[l]);
    }
    return path;
}

static const clkvq_bit_pair g_pairs[] = {
    {CLKVQ_FMT_Q8, CLKVQ_FMT_Q8}, {CLKVQ_FMT_Q4, CLKVQ_FMT_Q4}, {CLKVQ_FMT_Q4, CLKVQ_FMT_Q2},
    {CLKVQ_FMT_Q2, CLKVQ_FMT_Q4}, {CLKVQ_FMT_Q2, CLKVQ_FMT_Q2}, {CLKVQ_FMT_Q2, CLKVQ_FMT_T15},
};

static double bits_of(clkvq_format f) { return atof(clkvq_format_get(f)->bits_name); }

START_TEST(sensitive_layers_get_more_bits)
{
    clkvq_context *ctx = test_ctx();
    char *path = write_dump();
    clkvq_kv_dump *dump = NULL;
    ck_assert_int_eq(clkvq_dump_open(ctx, path, &dump), CLKVQ_OK);
    clkvq_layer_config defaults = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    clkvq_search_options opt = {.defaults = &defaults, .pairs = g_pairs,
                                .n_pairs = (int)(sizeof g_pairs / sizeof g_pairs[0]),
                                .n_queries = 8};
    clkvq_search_result *res = NULL;
    clkvq_status st = clkvq_precision_search(ctx, dump, &opt, &res);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));

    /* the front: bits up, error down, strictly */
    int n = clkvq_search_front_size(res);
    ck_assert_int_ge(n, 3);
    clkvq_front_point prev, pt;
    clkvq_search_front_point(res, 0, &prev);
    int monotone = 1;
    for (int i = 1; i < n; i++) {
        clkvq_search_front_point(res, i, &pt);
        monotone &= pt.avg_bits > prev.avg_bits && pt.total_error < prev.total_error;
        prev = pt;
    }
    ck_assert(monotone);

    clkvq_precision_config *cfg = NULL;
    ck_assert_int_eq(clkvq_search_config(ctx, res, 3.25, &cfg), CLKVQ_OK);
    ck_assert_double_le(clkvq_config_average_bits(cfg), 3.25 + 1e-9);
    double sens = 0, rest = 0;
    for (int l = 0; l < LAYERS; l++) {
        clkvq_layer_config lc;
        clkvq_config_layer(cfg, l, &lc);
        double b = (bits_of(lc.format_k) + bits_of(lc.format_v)) / 2;
        if (g_sensitive[l])
            sens += b / 2;
        else
            rest += b / (LAYERS - 2);
    }
    ck_assert_msg(sens > rest, "sensitive layers %.3f bits, others %.3f", sens, rest);

    /* what it writes loads and runs in the cache */
    char yaml[80];
    snprintf(yaml, sizeof yaml, "%s.yaml", path);
    ck_assert_int_eq(clkvq_config_save(ctx, cfg, yaml), CLKVQ_OK);
    clkvq_precision_config *back = NULL;
    ck_assert_int_eq(clkvq_config_load(ctx, yaml, NULL, &back), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_n_layers(back), LAYERS);
    clkvq_cache *cache = NULL;
    st = clkvq_cache_create_from_config(ctx, back, 1, 64, KV_HEADS, Q_HEADS, DIM,
                                        CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    float k[KV_HEADS * 40 * DIM], v[KV_HEADS * 40 * DIM], q[Q_HEADS * DIM], o[Q_HEADS * DIM];
    clkvq_shape shape = {KV_HEADS, 40, DIM};
    clkvq_synth_kv(5, &shape, k, v);
    test_fill_normal(6, q, Q_HEADS * DIM, 1.0f);
    for (int l = 0; l < LAYERS; l++) {
        ck_assert_int_eq(clkvq_cache_append(cache, l, 0, 40, k, v), CLKVQ_OK);
        ck_assert_int_eq(clkvq_cache_decode_host(cache, l, q, o, 0.125f), CLKVQ_OK);
    }
    int finite = 1;
    for (int i = 0; i < Q_HEADS * DIM; i++)
        finite &= isfinite(o[i]) != 0;
    ck_assert(finite);
    clkvq_cache_release(cache);
    clkvq_config_free(back);
    clkvq_config_free(cfg);
    clkvq_search_free(res);
    clkvq_dump_close(dump);
    unlink(yaml);
    unlink(path);
}
END_TEST


/* ------------------------------------------------------------ optimality */

/* What clkvq-eval measures for layer l under pair p, computed here on its
 * own: the layer's config (rotation seed + l), fitted per (layer, pair)
 * with clkvq_calibrate_layer, evaluated with clkvq_eval_layer. */
typedef struct {
    double err_sq[LAYERS][8], ref_sq[LAYERS], bits_long[8];
} layer_table;

static void measure_all(const clkvq_layer_config *defaults, unsigned fit,
                        const clkvq_bit_pair *pairs, int n_pairs, const clkvq_kv_dump *dump,
                        int queries, layer_table *t)
{
    clkvq_context *ctx = test_ctx();
    size_t qn = (size_t)Q_HEADS * TOKENS * DIM, kvn = (size_t)KV_HEADS * TOKENS * DIM;
    float *q = malloc(qn * sizeof(float)), *k = malloc(kvn * sizeof(float)),
          *v = malloc(kvn * sizeof(float));
    float means[2][KV_HEADS * DIM];
    int32_t perms[2][KV_HEADS * DIM];
    for (int l = 0; l < LAYERS; l++) {
        ck_assert_int_eq(clkvq_dump_read(dump, l, 'q', q), CLKVQ_OK);
        ck_assert_int_eq(clkvq_dump_read(dump, l, 'k', k), CLKVQ_OK);
        ck_assert_int_eq(clkvq_dump_read(dump, l, 'v', v), CLKVQ_OK);
        for (int p = 0; p < n_pairs; p++) {
            clkvq_layer_config lc = *defaults;
            lc.format_k = pairs[p].format_k;
            lc.format_v = pairs[p].format_v;
            lc.rot_seed = defaults->rot_seed + (uint32_t)l;
            clkvq_calib_options opt = {.fit = fit, .mean_k = means[0], .mean_v = means[1],
                                       .perm_k = perms[0], .perm_v = perms[1]};
            if (fit)
                ck_assert_msg(clkvq_calibrate_layer(ctx, &lc, KV_HEADS, TOKENS, DIM, k, v, &opt,
                                                    &lc) == CLKVQ_OK,
                              "%s", clkvq_last_error(ctx));
            clkvq_eval_result r;
            clkvq_status st = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, DIM, q, k, v,
                                               queries, &r);
            ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
            t->err_sq[l][p] = r.err_sq;
            t->ref_sq[l] = r.ref_sq;
            t->bits_long[p] = r.bits_long;
        }
    }
    free(q);
    free(k);
    free(v);
}

/* The pooled error clkvq-eval reports for a choice of pairs. */
static double pooled(const layer_table *t, const int *choice)
{
    double num = 0.0, den = 0.0;
    for (int l = 0; l < LAYERS; l++) {
        num += t->err_sq[l][choice[l]];
        den += t->ref_sq[l];
    }
    return sqrt(num / den);
}

/*
 * The search minimizes exactly what clkvq-eval reports: its front point's
 * error is the pooled error of its choice, measured independently here; no
 * configuration within the budget scores lower (all 6^6 are tried); and
 * the config it writes, loaded back and evaluated layer by layer as
 * clkvq-eval does, gives the error it predicted. Twice: the token scheme
 * under KVTuner's bits, and skvq with per-channel keys, rotation, centered
 * values and fitted clips under bits_long.
 */
static void check_search_is_optimal(const clkvq_layer_config *defaults, unsigned fit,
                                    clkvq_search_weight weight, const clkvq_bit_pair *pairs,
                                    int n_pairs, double budget)
{
    clkvq_context *ctx = test_ctx();
    char *path = write_dump();
    clkvq_kv_dump *dump = NULL;
    ck_assert_int_eq(clkvq_dump_open(ctx, path, &dump), CLKVQ_OK);
    const int queries = 8;
    clkvq_search_options opt = {.defaults = defaults, .pairs = pairs, .n_pairs = n_pairs,
                                .n_queries = queries, .calibrate = fit != 0, .fit = fit,
                                .weight = weight};
    clkvq_search_result *res = NULL;
    clkvq_status st = clkvq_precision_search(ctx, dump, &opt, &res);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    int best = clkvq_search_front_index(res, budget);
    ck_assert_int_ge(best, 0);
    clkvq_front_point pt;
    ck_assert_int_eq(clkvq_search_front_point(res, best, &pt), CLKVQ_OK);

    layer_table t;
    measure_all(defaults, fit, pairs, n_pairs, dump, queries, &t);
    double mine = pooled(&t, pt.choice);
    ck_assert_msg(fabs(pt.total_error - mine) <= 1e-9 * mine,
                  "search says %.12g, the same choice measures %.12g", pt.total_error, mine);

    /* every configuration within the budget */
    int choice[LAYERS] = {0}, tried = 0, within = 0;
    double lowest = INFINITY;
    for (;;) {
        double bits = 0.0;
        for (int l = 0; l < LAYERS; l++)
            bits += (weight == CLKVQ_SEARCH_WEIGHT_BITS_LONG
                         ? t.bits_long[choice[l]]
                         : (bits_of(pairs[choice[l]].format_k) +
                            bits_of(pairs[choice[l]].format_v)) / 2) / LAYERS;
        tried++;
        if (bits <= budget + 1e-9) {
            within++;
            double e = pooled(&t, choice);
            lowest = e < lowest ? e : lowest;
        }
        int l = 0;
        while (l < LAYERS && ++choice[l] == n_pairs)
            choice[l++] = 0;
        if (l == LAYERS)
            break;
    }
    ck_assert_msg(within > 1 && lowest >= mine * (1 - 1e-12),
                  "%d of %d configs within %.3g bits; the best scores %.9g, the search's %.9g",
                  within, tried, budget, lowest, mine);

    /* the config it writes: what clkvq-eval --config measures */
    clkvq_precision_config *cfg = NULL, *back = NULL;
    ck_assert_int_eq(clkvq_search_config(ctx, res, budget, &cfg), CLKVQ_OK);
    char yaml[80];
    snprintf(yaml, sizeof yaml, "%s.yaml", path);
    ck_assert_int_eq(clkvq_config_save(ctx, cfg, yaml), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_load(ctx, yaml, NULL, &back), CLKVQ_OK);
    size_t qn = (size_t)Q_HEADS * TOKENS * DIM, kvn = (size_t)KV_HEADS * TOKENS * DIM;
    float *q = malloc(qn * sizeof(float)), *k = malloc(kvn * sizeof(float)),
          *v = malloc(kvn * sizeof(float));
    double num = 0.0, den = 0.0;
    for (int l = 0; l < LAYERS; l++) {
        clkvq_layer_config lc;
        clkvq_config_layer(back, l, &lc);
        ck_assert_msg(lc.rot_seed == defaults->rot_seed + (uint32_t)l &&
                          lc.rotate == defaults->rotate && lc.key_axis == defaults->key_axis &&
                          (!(fit & CLKVQ_FIT_MEAN_V) || lc.mean_v),
                      "layer %d: seed %u rot %d axis %d", l, (unsigned)lc.rot_seed, lc.rotate,
                      (int)lc.key_axis);
        ck_assert_int_eq(clkvq_dump_read(dump, l, 'q', q), CLKVQ_OK);
        ck_assert_int_eq(clkvq_dump_read(dump, l, 'k', k), CLKVQ_OK);
        ck_assert_int_eq(clkvq_dump_read(dump, l, 'v', v), CLKVQ_OK);
        clkvq_eval_result r;
        st = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, DIM, q, k, v, queries, &r);
        ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
        num += r.err_sq;
        den += r.ref_sq;
    }
    double measured = sqrt(num / den);
    ck_assert_msg(fabs(measured - pt.total_error) <= 1e-6 * measured,
                  "the written config measures %.9g, the search predicted %.9g", measured,
                  pt.total_error);
    free(q);
    free(k);
    free(v);
    clkvq_config_free(back);
    clkvq_config_free(cfg);
    clkvq_search_free(res);
    clkvq_dump_close(dump);
    unlink(yaml);
    unlink(path);
}

START_TEST(search_minimizes_the_pooled_error_kvtuner_bits)
{
    clkvq_layer_config d = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    check_search_is_optimal(&d, 0, CLKVQ_SEARCH_WEIGHT_KVTUNER, g_pairs,
                            (int)(sizeof g_pairs / sizeof g_pairs[0]), 3.25);
}
END_TEST

START_TEST(search_minimizes_the_pooled_error_bits_long_kc_rot)
{
    static const clkvq_bit_pair pairs[] = {
        {CLKVQ_FMT_Q4, CLKVQ_FMT_Q4}, {CLKVQ_FMT_Q4, CLKVQ_FMT_Q3}, {CLKVQ_FMT_Q3, CLKVQ_FMT_Q2},
        {CLKVQ_FMT_Q2, CLKVQ_FMT_Q3}, {CLKVQ_FMT_Q2, CLKVQ_FMT_Q2}, {CLKVQ_FMT_Q2, CLKVQ_FMT_T15},
    };
    clkvq_layer_config d = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    d.group_size = 32;
    d.window = 64;
    d.key_axis = CLKVQ_AXIS_CHANNEL;
    d.param_type = CLKVQ_PARAM_FP8_E4M3;
    d.rotate = 1;
    d.rot_seed = 11;
    check_search_is_optimal(&d, CLKVQ_FIT_CLIP | CLKVQ_FIT_MEAN_V, CLKVQ_SEARCH_WEIGHT_BITS_LONG,
                            pairs, (int)(sizeof pairs / sizeof pairs[0]), 3.0);
}
END_TEST

START_TEST(search_bad_arguments)
{
    clkvq_context *ctx = test_ctx();
    clkvq_search_result *res = NULL;
    clkvq_search_options opt = {.pairs = g_pairs, .n_queries = 8};
    ck_assert_int_eq(clkvq_precision_search(ctx, NULL, &opt, &res), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_null(res);
    char *path = write_dump();
    clkvq_kv_dump *dump = NULL;
    ck_assert_int_eq(clkvq_dump_open(ctx, path, &dump), CLKVQ_OK);
    opt.n_pairs = 1;
    opt.weight = (clkvq_search_weight)7;
    ck_assert_int_eq(clkvq_precision_search(ctx, dump, &opt, &res), CLKVQ_ERR_INVALID_ARG);
    ck_assert_msg(strstr(clkvq_last_error(ctx), "weight 7"), "%s", clkvq_last_error(ctx));
    opt.weight = CLKVQ_SEARCH_WEIGHT_KVTUNER;
    opt.fit = 1u << 12;
    opt.calibrate = 1;
    ck_assert_int_eq(clkvq_precision_search(ctx, dump, &opt, &res), CLKVQ_ERR_INVALID_ARG);
    ck_assert_msg(strstr(clkvq_last_error(ctx), "unknown flags"), "%s", clkvq_last_error(ctx));
    ck_assert_ptr_null(res);
    ck_assert_int_eq(clkvq_search_front_index(NULL, 3.0), -1);
    clkvq_dump_close(dump);
    unlink(path);
    ck_assert_int_eq(clkvq_search_front_size(NULL), 0);
    ck_assert_double_eq(clkvq_search_layer_error(NULL, 0, 0), -1.0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("search");
    TCase *tc = tcase_create("search");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, search_bad_arguments);
    tcase_add_test(tc, sensitive_layers_get_more_bits);
    tcase_add_test(tc, search_minimizes_the_pooled_error_kvtuner_bits);
    tcase_add_test(tc, search_minimizes_the_pooled_error_bits_long_kc_rot);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}

/* Fused decode attention against plain-C double-precision attention over
 * the cache's own read-back (dequantized K/V), so only kernel error shows:
 * every scheme, format pairs, GQA 1..8, head_dim 64/96/128/256, windows and
 * sinks, chunk boundaries, token counts 1, 7, 129, 1000. */
#include "kv_cache.h"
#include "attn_fit.h"
#include "quant_format.h"
#include "reference.h"
#include "test_hooks.h"
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define KV_HEADS 2
#define N_SEQS 2
#define CAPACITY 1100
#define TOLERANCE 1e-5

typedef struct {
    const char *name;
    clkvq_scheme scheme;
    clkvq_format fk, fv;
    int group, qpk, head_dim, window, n_sink, residual, chunk, wgs;
    clkvq_layout layout_k, layout_v;
    clkvq_param_type param;
    clkvq_zero_mode zero;
    int permute;
    float clip;
    int tpl, vwpl, waves; /* the cooperative variant's (waves 64: several splits and the merge
                             on a small device; 1: one split, written directly) */
} attn_case;

static const attn_case g_cases[] = {
    {"fp16 gqa4 d128", CLKVQ_SCHEME_FP16, 0, 0, 0, 4, 128, 0, 0, 0, 64, 32, 0, 0, 0, 0, 0, 1, 4, 0, 64},
    {"token k8v8 mha d64", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q8, CLKVQ_FMT_Q8, 32, 1, 64, 0, 0, 0,
     128, 64, 0, 0, 0, 0, 0, 1, 2, 1, 1},
    {"token k4v4 gqa4 d128 planar-k", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, 32, 4,
     128, 0, 0, 0, 128, 64, 1, 0, 0, 0, 0, 1, 4, 2, 64},
    {"token k4v2 gqa7 d128 g64 planar", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, 64, 7,
     128, 0, 0, 0, 64, 64, 1, 1, 0, 0, 0, 1, 1, 0, 8},
    {"token k3v1.5 gqa2 d96 fp8 int-zero", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q3, CLKVQ_FMT_T15, 32,
     2, 96, 0, 0, 0, 64, 32, 0, 1, CLKVQ_PARAM_FP8_E4M3, CLKVQ_ZERO_INT, 0, 1, 2, 0, 64},
    {"kivi k2v2 gqa4 d128 R64", CLKVQ_SCHEME_KIVI, CLKVQ_FMT_Q2, CLKVQ_FMT_Q2, 32, 4, 128, 0,
     0, 64, 128, 64, 0, 0, 0, 0, 0, 1, 4, 1, 1},
    {"kivi k4v2 gqa8 d64 R128", CLKVQ_SCHEME_KIVI, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, 32, 8, 64, 0,
     0, 128, 64, 32, 0, 1, 0, 0, 0, 1, 2, 2, 64},
    {"skvq k2v1.5 gqa4 d128 g128 w32 s5", CLKVQ_SCHEME_SKVQ, CLKVQ_FMT_Q2, CLKVQ_FMT_T15, 128,
     4, 128, 32, 5, 0, 128, 64, 1, 0, 0, 0, 1, 0.9f, 1, 4, 64},
    {"skvq k4v4 mha d256 g64 w16 s2", CLKVQ_SCHEME_SKVQ, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, 64, 1, 256,
     16, 2, 0, 64, 64, 0, 1, 0, 0, 1, 0.95f, 4, 0, 1},
    {"skvq k8v4 gqa5 d96 w8 s0", CLKVQ_SCHEME_SKVQ, CLKVQ_FMT_Q8, CLKVQ_FMT_Q4, 32, 5, 96, 8, 0,
     0, 128, 64, 1, 1, 0, 0, 1, 1, 2, 1, 64},
    {"token k4v4 gqa6 d256 g128 fp8", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, 128, 6,
     256, 0, 0, 0, 32, 32, 0, 0, CLKVQ_PARAM_FP8_E4M3, 0, 0, 1, 4, 0, 8},
    /* base-3 keys (the serial kernel's float digits, a group ending in a
     * partial word) and 3-bit values that straddle words */
    {"token k1.5v3 gqa4 d128 g64 int-zero", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_T15, CLKVQ_FMT_Q3, 64,
     4, 128, 0, 0, 0, 128, 64, 0, 0, 0, CLKVQ_ZERO_INT, 1, 1, 2, 0, 64},
};

/* variant CLKVQ_ATTN_SERIAL forces group-planar layouts (which it needs);
 * block_size 0 is the contiguous cache, else pages of that many tokens. */
/* Transforms the transform test sets on the next caches (rotation with a
 * seed, means, skvq's per-channel keys). */
static struct {
    int rotate;
    const float *mean_k, *mean_v;
    clkvq_axis key_axis;
} g_xf;

static clkvq_cache *cache_for_paged(const attn_case *c, clkvq_attn_variant variant, int vw,
                                    int block_size, int32_t **perm_k, int32_t **perm_v)
{
    clkvq_layer_config lc = clkvq_layer_config_default(c->scheme);
    lc.rotate = g_xf.rotate;
    lc.rot_seed = 99u;
    lc.mean_k = g_xf.mean_k;
    lc.mean_v = g_xf.mean_v;
    lc.key_axis = c->scheme == CLKVQ_SCHEME_SKVQ ? g_xf.key_axis : CLKVQ_AXIS_TOKEN;
    lc.format_k = c->fk;
    lc.format_v = c->fv;
    if (c->scheme != CLKVQ_SCHEME_FP16)
        lc.group_size = c->group;
    lc.window = c->window;
    lc.n_sink = c->n_sink;
    lc.residual = c->residual;
    lc.param_type = c->param;
    lc.zero_mode = c->zero;
    lc.clip_k = lc.clip_v = c->clip;
    *perm_k = *perm_v = NULL;
    if (c->permute) {
        *perm_k = test_random_perm(11, KV_HEADS, c->head_dim);
        *perm_v = test_random_perm(12, KV_HEADS, c->head_dim);
        lc.perm_k = *perm_k;
        lc.perm_v = *perm_v;
    }
    int serial = variant == CLKVQ_ATTN_SERIAL;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = N_SEQS, .capacity = CAPACITY,
                              .n_kv_heads = KV_HEADS, .n_q_heads = KV_HEADS * c->qpk,
                              .head_dim = c->head_dim,
                              .layout_k = serial ? CLKVQ_LAYOUT_GROUP_PLANAR : c->layout_k,
                              .layout_v = serial ? CLKVQ_LAYOUT_GROUP_PLANAR : c->layout_v,
                              .layers = &lc, .block_size = block_size};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(test_ctx(), &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s: create: %s", c->name, clkvq_last_error(test_ctx()));
    clkvq_attn_tuning tuning = {variant, c->wgs, c->chunk, vw, c->tpl, c->vwpl, c->waves};
    st = clkvq_cache_set_tuning(cache, &tuning);
    ck_assert_msg(st == CLKVQ_OK, "%s: tuning: %s", c->name, clkvq_last_error(test_ctx()));
    return cache;
}

static clkvq_cache *cache_for(const attn_case *c, clkvq_attn_variant variant, int vw,
                              int32_t **perm_k, int32_t **perm_v)
{
    return cache_for_paged(c, variant, vw, 0, perm_k, perm_v);
}

/* Appends n tokens to seq: a prefill chunk, then single decode tokens. */
static void fill_sequence(clkvq_cache *cache, int seq, int n, int d, uint64_t seed)
{
    float *k = malloc(sizeof(float) * KV_HEADS * (size_t)(n + 1) * d);
    float *v = malloc(sizeof(float) * KV_HEADS * (size_t)(n + 1) * d);
    int done = 0;
    while (done < n) {
        int step = n - done > 3 ? n - done - 3 : 1;
        size_t count = (size_t)KV_HEADS * step * d;
        test_fill_normal(seed + (uint64_t)done, k, count, 1.0f);
        test_fill_normal(seed + 7919 + (uint64_t)done, v, count, 1.0f);
        for (int h = 0; h < KV_HEADS; h++)
            for (int t = 0; t < step; t++)
                k[((size_t)h * step + t) * d + 3] *= 6.0f; /* an outlier channel */
        clkvq_status st = clkvq_cache_append(cache, 0, seq, step, k, v);
        ck_assert_msg(st == CLKVQ_OK, "append: %s", clkvq_last_error(test_ctx()));
        done += step;
    }
    free(k);
    free(v);
}

/* Worst relative error over (sequence, query, query head) of decode with
 * nq queries per sequence (1: clkvq_cache_decode) vs the causal reference. */
static double decode_error_nq(clkvq_cache *cache, int qpk, int d, const int *lengths, int nq)
{
    int n_q = KV_HEADS * qpk;
    size_t q_count = (size_t)N_SEQS * nq * n_q * d;
    float *q = malloc(sizeof(float) * q_count), *out = malloc(sizeof(float) * q_count);
    test_fill_normal(99, q, q_count, 1.0f);
    float scale = 1.0f / sqrtf((float)d);
    clkvq_status st;
    if (nq == 1) {
        st = clkvq_cache_decode_host(cache, 0, q, out, scale);
    } else {
        clkvq_context *ctx = test_ctx();
        cl_int err;
        cl_mem qm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR,
                                   q_count * 4, q, &err);
        cl_mem om = clCreateBuffer(clkvq_context_cl_context(ctx), 0, q_count * 4, NULL, &err);
        st = clkvq_cache_decode_multi(cache, 0, nq, qm, om, scale);
        clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om, CL_TRUE, 0, q_count * 4, out, 0,
                            NULL, NULL);
        clReleaseMemObject(qm);
        clReleaseMemObject(om);
    }
    ck_assert_msg(st == CLKVQ_OK, "decode: %s", clkvq_last_error(test_ctx()));
    double worst = test_decode_error(cache, N_SEQS, lengths, KV_HEADS, qpk, d, nq, q, out, scale);
    free(q);
    free(out);
    return worst;
}

static double decode_error(clkvq_cache *cache, int qpk, int d, const int *lengths)
{
    return decode_error_nq(cache, qpk, d, lengths, 1);
}

/* Both variants: cooperative on the case's layouts, serial on planar ones
 * with a vector width that cycles through 16, 8, 4. */
START_TEST(decode_matches_reference)
{
    const attn_case *c = &g_cases[_i / 2];
    clkvq_attn_variant variant = _i % 2 ? CLKVQ_ATTN_SERIAL : CLKVQ_ATTN_COOPERATIVE;
    int vw = 16 >> (_i / 2 % 3);
    const int token_counts[] = {1, 7, 129, 1000};
    for (int ti = 0; ti < 4; ti++) {
        int32_t *perm_k, *perm_v;
        clkvq_cache *cache = cache_for(c, variant, vw, &perm_k, &perm_v);
        int lengths[N_SEQS] = {token_counts[ti], token_counts[ti] / 2 + 1};
        for (int s = 0; s < N_SEQS; s++)
            fill_sequence(cache, s, lengths[s], c->head_dim, 1000 * (uint64_t)s + ti);
        double err = decode_error(cache, c->qpk, c->head_dim, lengths);
        ck_assert_msg(err <= TOLERANCE, "%s (%s vw %d), %d tokens: relative error %.3g", c->name,
                      variant == CLKVQ_ATTN_SERIAL ? "serial" : "cooperative", vw,
                      token_counts[ti], err);
        clkvq_cache_release(cache);
        free(perm_k);
        free(perm_v);
    }
}
END_TEST

/* Chunk edges: lengths just around multiples of the chunk, default tunables. */
START_TEST(decode_chunk_boundaries)
{
    attn_case c = g_cases[2];
    c.chunk = 64;
    c.wgs = 64;
    const int lengths_to_try[][2] = {{63, 64}, {65, 128}, {127, 129}, {0, 5}};
    for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= CLKVQ_ATTN_SERIAL; variant++)
        for (int i = 0; i < 4; i++) {
            int32_t *pk, *pv;
            clkvq_cache *cache = cache_for(&c, (clkvq_attn_variant)variant, 16, &pk, &pv);
            int lengths[N_SEQS] = {lengths_to_try[i][0], lengths_to_try[i][1]};
            for (int s = 0; s < N_SEQS; s++)
                if (lengths[s] > 0)
                    fill_sequence(cache, s, lengths[s], c.head_dim, 5 + (uint64_t)s);
            double err = decode_error(cache, c.qpk, c.head_dim, lengths);
            ck_assert_msg(err <= TOLERANCE, "variant %d lengths %d/%d: %.3g", variant,
                          lengths[0], lengths[1], err);
            clkvq_cache_release(cache);
            free(pk);
            free(pv);
        }
}
END_TEST

/* Truncation then decode: the window refilled from packed tokens is read. */
START_TEST(decode_after_truncate)
{
    const attn_case *c = &g_cases[7];
    int32_t *pk, *pv;
    clkvq_cache *cache = cache_for(c, CLKVQ_ATTN_SERIAL, 8, &pk, &pv);
    fill_sequence(cache, 0, 300, c->head_dim, 1);
    fill_sequence(cache, 1, 90, c->head_dim, 2);
    ck_assert_int_eq(clkvq_cache_truncate(cache, 0, 200), CLKVQ_OK);
    int lengths[N_SEQS] = {200, 90};
    double err = decode_error(cache, c->qpk, c->head_dim, lengths);
    ck_assert_msg(err <= TOLERANCE, "after truncate: %.3g", err);
    clkvq_cache_release(cache);
    free(pk);
    free(pv);
}
END_TEST

/* Poisons every store with 0xff bytes (NaN as fp16, fp32 and params), so
 * memory past the written tokens can never reach a result unnoticed. */
static void poison(clkvq_cache *cache)
{
    cl_command_queue q = clkvq_context_cl_queue(test_ctx());
    const cl_uchar ff = 0xff;
    for (int l = 0; l < cache->cfg.n_layers; l++) {
        clkvq_tensor_store *stores[2] = {&cache->layers[l].k, &cache->layers[l].v};
        for (int i = 0; i < 2; i++) {
            cl_mem bufs[3] = {stores[i]->codes, stores[i]->params, stores[i]->fp};
            for (int b = 0; b < 3; b++) {
                size_t size = 0;
                if (!bufs[b])
                    continue;
                clGetMemObjectInfo(bufs[b], CL_MEM_SIZE, sizeof size, &size, NULL);
                ck_assert_int_eq(clEnqueueFillBuffer(q, bufs[b], &ff, 1, 0, size, 0, NULL, NULL),
                                 CL_SUCCESS);
            }
        }
    }
    clFinish(q);
}

START_TEST(decode_ignores_unwritten_memory)
{
    for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= CLKVQ_ATTN_SERIAL; variant++)
        for (int ci = 0; ci < (int)(sizeof g_cases / sizeof g_cases[0]); ci += 3) {
            int32_t *pk, *pv;
            clkvq_cache *cache = cache_for(&g_cases[ci], (clkvq_attn_variant)variant, 16, &pk, &pv);
            poison(cache);
            int lengths[N_SEQS] = {333, 70};
            for (int s = 0; s < N_SEQS; s++)
                fill_sequence(cache, s, lengths[s], g_cases[ci].head_dim, 9 + (uint64_t)s);
            double err = decode_error(cache, g_cases[ci].qpk, g_cases[ci].head_dim, lengths);
            ck_assert_msg(err <= TOLERANCE, "%s variant %d: %.3g", g_cases[ci].name, variant, err);
            clkvq_cache_release(cache);
            free(pk);
            free(pv);
        }
}
END_TEST

/* Pages of 32 and 64 tokens (the kivi case's groups fit both), every
 * fourth case, both variants: the same results as the contiguous cache's
 * reference, with sinks shifting the first chunk off a page boundary. */
START_TEST(decode_paged_matches_reference)
{
    const int blocks[] = {32, 64};
    for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= CLKVQ_ATTN_SERIAL; variant++)
        for (int ci = 0; ci < (int)(sizeof g_cases / sizeof g_cases[0]); ci++) {
            const attn_case *c = &g_cases[ci];
            if (ci % 4 != 3 && c->n_sink == 0)
                continue;
            int block = blocks[ci % 2];
            if (c->scheme == CLKVQ_SCHEME_KIVI && block % c->group != 0)
                block = c->group;
            int32_t *pk, *pv;
            clkvq_cache *cache =
                cache_for_paged(c, (clkvq_attn_variant)variant, 8, block, &pk, &pv);
            poison(cache);
            int lengths[N_SEQS] = {517, 140};
            for (int s = 0; s < N_SEQS; s++)
                fill_sequence(cache, s, lengths[s], c->head_dim, 31 + (uint64_t)s);
            double err = decode_error(cache, c->qpk, c->head_dim, lengths);
            ck_assert_msg(err <= TOLERANCE, "%s variant %d pages of %d: %.3g", c->name, variant,
                          block, err);
            clkvq_cache_release(cache);
            free(pk);
            free(pv);
        }
}
END_TEST

/* Multi-query decode: query i of n_queries attends causally up to its own
 * position; 1, 3 and 16 queries, both variants, short and long sequences
 * (a sequence shorter than n_queries gives zeros to the queries that see
 * nothing, as the reference does). */
START_TEST(decode_multi_query_matches_reference)
{
    const int cases[] = {2, 7, 10};
    const int nqs[] = {3, 16};
    for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= CLKVQ_ATTN_SERIAL; variant++)
        for (int ci = 0; ci < 3; ci++)
            for (int k = 0; k < 2; k++) {
                const attn_case *c = &g_cases[cases[ci]];
                int32_t *pk, *pv;
                clkvq_cache *cache = cache_for_paged(c, (clkvq_attn_variant)variant, 8,
                                                     ci == 1 ? 64 : 0, &pk, &pv);
                int lengths[N_SEQS] = {300, k ? 9 : 40};
                for (int s = 0; s < N_SEQS; s++)
                    fill_sequence(cache, s, lengths[s], c->head_dim, 77 + (uint64_t)s);
                double err = decode_error_nq(cache, c->qpk, c->head_dim, lengths, nqs[k]);
                ck_assert_msg(err <= TOLERANCE, "%s variant %d %d queries: %.3g", c->name,
                              variant, nqs[k], err);
                clkvq_cache_release(cache);
                free(pk);
                free(pv);
            }
}
END_TEST

/* Rotation, centering and skvq's per-channel keys: decode equals fp64
 * attention over the read-back (which maps the stored rows back), for
 * every fourth case, both variants, contiguous and paged. */
START_TEST(decode_transforms_match_reference)
{
    static float means[2][KV_HEADS * 256];
    uint64_t rng = 5;
    for (int i = 0; i < KV_HEADS * 256; i++) {
        means[0][i] = (float)(3.0 * test_normal(&rng));
        means[1][i] = (float)test_normal(&rng);
    }
    const int n_cases = (int)(sizeof g_cases / sizeof g_cases[0]);
    for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= CLKVQ_ATTN_SERIAL; variant++)
        for (int ci = variant - 1; ci < n_cases; ci += 3) {
            const attn_case *c = &g_cases[ci];
            g_xf.rotate = 1;
            g_xf.mean_k = ci % 2 ? means[0] : NULL;
            g_xf.mean_v = means[1];
            g_xf.key_axis = CLKVQ_AXIS_CHANNEL;
            /* per-channel key groups (kivi's, skvq's kc) must fit a page */
            int block = c->group > 64 ? c->group : 64;
            int32_t *pk, *pv;
            clkvq_cache *cache = cache_for_paged(c, (clkvq_attn_variant)variant, 8,
                                                 ci % 2 ? block : 0, &pk, &pv);
            memset(&g_xf, 0, sizeof g_xf);
            int lengths[N_SEQS] = {413, 100};
            for (int s = 0; s < N_SEQS; s++)
                fill_sequence(cache, s, lengths[s], c->head_dim, 51 + (uint64_t)s);
            double err = decode_error(cache, c->qpk, c->head_dim, lengths);
            ck_assert_msg(err <= TOLERANCE, "%s variant %d rot/mean/kc: %.3g", c->name, variant,
                          err);
            clkvq_cache_release(cache);
            free(pk);
            free(pv);
        }
}
END_TEST

/* The tests can fail: the cooperative kernel built with its online
 * softmax's rescale skipped (a test hook) is far off over many tiles, and
 * right again without it. */
START_TEST(planted_bug_is_caught)
{
    attn_case c = g_cases[2];
    c.wgs = 64;
    c.tpl = 1;
    c.waves = 1;
    const int lengths[N_SEQS] = {1000, 300};
    for (int planted = 1; planted >= 0; planted--) {
        int32_t *pk, *pv;
        clkvq_cache *cache = cache_for(&c, CLKVQ_ATTN_COOPERATIVE, 16, &pk, &pv);
        for (int s = 0; s < N_SEQS; s++)
            fill_sequence(cache, s, lengths[s], c.head_dim, 61 + (uint64_t)s);
        clkvq_attn_planted_bug_for_tests = planted;
        double err = decode_error(cache, c.qpk, c.head_dim, lengths);
        clkvq_attn_planted_bug_for_tests = 0;
        if (planted)
            ck_assert_msg(err > 1e-3, "the planted bug went unnoticed: error %.3g", err);
        else
            ck_assert_msg(err <= TOLERANCE, "without the planted bug: %.3g", err);
        clkvq_cache_release(cache);
        free(pk);
        free(pv);
    }
}
END_TEST

/* Decode is asynchronous: two decodes with an append between them, read
 * back only at the end, each see the lengths of their own moment (the
 * non-blocking length upload), and the device time is there once asked. */
START_TEST(decode_is_asynchronous)
{
    for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= CLKVQ_ATTN_SERIAL; variant++) {
        const attn_case *c = &g_cases[2];
        int32_t *pk, *pv;
        clkvq_cache *cache = cache_for_paged(c, (clkvq_attn_variant)variant, 8, 32, &pk, &pv);
        clkvq_context *ctx = test_ctx();
        int d = c->head_dim, n_q = KV_HEADS * c->qpk, lengths[2][N_SEQS] = {{200, 33}, {0, 0}};
        size_t qn = (size_t)N_SEQS * n_q * d;
        float *q = malloc(qn * sizeof(float)), *out[2];
        test_fill_normal(5, q, qn, 1.0f);
        cl_int err;
        cl_mem qm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR,
                                   qn * sizeof(float), q, &err);
        cl_mem om[2];
        for (int s = 0; s < N_SEQS; s++)
            fill_sequence(cache, s, lengths[0][s], d, 71 + (uint64_t)s);
        for (int step = 0; step < 2; step++) {
            om[step] = clCreateBuffer(clkvq_context_cl_context(ctx), 0, qn * sizeof(float), NULL,
                                      &err);
            ck_assert_int_eq(clkvq_cache_decode(cache, 0, qm, om[step], 0.1f), CLKVQ_OK);
            ck_assert(clkvq_last_device_ms(ctx) > 0.0);
            if (step == 0) { /* one more token for seq 0, then the second decode */
                fill_sequence(cache, 0, 1, d, 99);
                lengths[1][0] = lengths[0][0] + 1;
                lengths[1][1] = lengths[0][1];
            }
        }
        for (int step = 0; step < 2; step++) {
            out[step] = malloc(qn * sizeof(float));
            clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om[step], CL_TRUE, 0,
                                qn * sizeof(float), out[step], 0, NULL, NULL);
        }
        /* the read-back of step 0 is the first lengths[0] tokens of today's */
        double *ref = malloc((size_t)n_q * d * sizeof(double)), worst = 0.0;
        for (int s = 0; s < N_SEQS; s++) {
            int n_now = lengths[1][s];
            float *k = malloc((size_t)KV_HEADS * n_now * d * sizeof(float));
            float *v = malloc((size_t)KV_HEADS * n_now * d * sizeof(float));
            ck_assert_int_eq(clkvq_cache_read(cache, 0, s, k, v), CLKVQ_OK);
            for (int step = 0; step < 2; step++) {
                int n = lengths[step][s];
                float *kk = malloc((size_t)KV_HEADS * n * d * sizeof(float) + 4);
                float *vv = malloc((size_t)KV_HEADS * n * d * sizeof(float) + 4);
                for (int h = 0; h < KV_HEADS; h++) {
                    memcpy(kk + (size_t)h * n * d, k + (size_t)h * n_now * d,
                           (size_t)n * d * sizeof(float));
                    memcpy(vv + (size_t)h * n * d, v + (size_t)h * n_now * d,
                           (size_t)n * d * sizeof(float));
                }
                test_attention_reference(q + (size_t)s * n_q * d, kk, vv, n, n_q, c->qpk, d, 0.1f,
                                         ref);
                for (int h = 0; h < n_q; h++) {
                    double num = 0.0, den = 0.0;
                    for (int ch = 0; ch < d; ch++) {
                        double r = ref[(size_t)h * d + ch];
                        double o = out[step][((size_t)s * n_q + h) * d + ch];
                        num += (o - r) * (o - r);
                        den += r * r;
                    }
                    double e = sqrt(num / den);
                    worst = e > worst || isnan(e) ? e : worst;
                }
                free(kk);
                free(vv);
            }
            free(k);
            free(v);
        }
        ck_assert_msg(worst <= TOLERANCE, "variant %d: %.3g", variant, worst);
        for (int step = 0; step < 2; step++) {
            clReleaseMemObject(om[step]);
            free(out[step]);
        }
        clReleaseMemObject(qm);
        free(q);
        free(ref);
        clkvq_cache_release(cache);
        free(pk);
        free(pv);
    }
}
END_TEST

/* A runtime's block table naming a page outside the pool: decode masks
 * that page's tokens (both variants; the reference leaves them out)
 * instead of reading out of bounds. */
START_TEST(decode_masks_bad_page_ids)
{
    clkvq_context *ctx = test_ctx();
    const int d = 64, qpk = 4, capacity = 256, block = 32, n_q = KV_HEADS * qpk;
    const int max_blocks = capacity / block, n_pages = N_SEQS * max_blocks;
    const int lengths[N_SEQS] = {230, 75}, bad_block = 2;
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = N_SEQS, .capacity = capacity,
                              .n_kv_heads = KV_HEADS, .n_q_heads = n_q, .head_dim = d,
                              .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = &lc,
                              .block_size = block, .runtime_tables = 1};
    clkvq_cache *cache = NULL;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_OK);
    int table[N_SEQS * 8];
    for (int i = 0; i < n_pages; i++)
        table[i] = (i * 5 + 3) % n_pages;
    cl_int err;
    cl_mem tmem = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR,
                                 sizeof table, table, &err);
    size_t big = (size_t)KV_HEADS * capacity * d;
    float *k = malloc(big * sizeof(float)), *v = malloc(big * sizeof(float));
    cl_mem km = clCreateBuffer(clkvq_context_cl_context(ctx), 0, big * 4, NULL, &err);
    cl_mem vm = clCreateBuffer(clkvq_context_cl_context(ctx), 0, big * 4, NULL, &err);
    for (int s = 0; s < N_SEQS; s++) {
        size_t n = (size_t)KV_HEADS * lengths[s] * d;
        test_fill_normal(3 + (uint64_t)s, k, n, 1.0f);
        test_fill_normal(13 + (uint64_t)s, v, n, 1.0f);
        clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), km, CL_TRUE, 0, n * 4, k, 0, NULL, NULL);
        clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), vm, CL_TRUE, 0, n * 4, v, 0, NULL, NULL);
        ck_assert_int_eq(clkvq_cache_append_paged(cache, 0, s, lengths[s], km, vm, tmem,
                                                  max_blocks),
                         CLKVQ_OK);
    }
    float *rk[N_SEQS], *rv[N_SEQS];
    for (int s = 0; s < N_SEQS; s++) {
        rk[s] = malloc((size_t)KV_HEADS * lengths[s] * d * sizeof(float));
        rv[s] = malloc((size_t)KV_HEADS * lengths[s] * d * sizeof(float));
        ck_assert_int_eq(clkvq_cache_read(cache, 0, s, rk[s], rv[s]), CLKVQ_OK);
    }
    table[bad_block] = n_pages + 5; /* seq 0's tokens 64..95 */
    clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), tmem, CL_TRUE, 0, sizeof table, table, 0,
                         NULL, NULL);
    size_t qn = (size_t)N_SEQS * n_q * d;
    float *q = malloc(qn * sizeof(float)), *out = malloc(qn * sizeof(float));
    double *ref = malloc((size_t)n_q * d * sizeof(double));
    test_fill_normal(23, q, qn, 1.0f);
    cl_mem qm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR, qn * 4, q,
                               &err);
    cl_mem om = clCreateBuffer(clkvq_context_cl_context(ctx), 0, qn * 4, NULL, &err);
    const clkvq_attn_tuning tunings[] = {{CLKVQ_ATTN_COOPERATIVE, 32, 0, 0, 1, 0, 64},
                                         {CLKVQ_ATTN_COOPERATIVE, 64, 0, 0, 4, 0, 1},
                                         {CLKVQ_ATTN_SERIAL, 0, 64, 16, 0, 0, 0}};
    for (int ti = 0; ti < 3; ti++) {
        ck_assert_int_eq(clkvq_cache_set_tuning(cache, &tunings[ti]), CLKVQ_OK);
        ck_assert_int_eq(clkvq_cache_decode_paged(cache, 0, 1, qm, om, 0.125f, tmem, max_blocks),
                         CLKVQ_OK);
        clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om, CL_TRUE, 0, qn * 4, out, 0, NULL,
                            NULL);
        double worst = 0.0;
        for (int s = 0; s < N_SEQS; s++) {
            /* the tokens that stay: all but the bad page's */
            int lo = s == 0 ? bad_block * block : lengths[s], hi = s == 0 ? lo + block : lo;
            int n = lengths[s] - (hi - lo);
            float *kk = malloc((size_t)KV_HEADS * n * d * sizeof(float));
            float *vv = malloc((size_t)KV_HEADS * n * d * sizeof(float));
            for (int h = 0; h < KV_HEADS; h++)
                for (int t = 0, j = 0; t < lengths[s]; t++) {
                    if (t >= lo && t < hi)
                        continue;
                    memcpy(kk + ((size_t)h * n + j) * d, rk[s] + ((size_t)h * lengths[s] + t) * d,
                           (size_t)d * sizeof(float));
                    memcpy(vv + ((size_t)h * n + j) * d, rv[s] + ((size_t)h * lengths[s] + t) * d,
                           (size_t)d * sizeof(float));
                    j++;
                }
            test_attention_reference(q + (size_t)s * n_q * d, kk, vv, n, n_q, qpk, d, 0.125f, ref);
            for (int h = 0; h < n_q; h++) {
                double num = 0.0, den = 0.0;
                for (int ch = 0; ch < d; ch++) {
                    double r = ref[(size_t)h * d + ch], o = out[((size_t)s * n_q + h) * d + ch];
                    num += (o - r) * (o - r);
                    den += r * r;
                }
                double e = sqrt(num / den);
                worst = e > worst || isnan(e) ? e : worst;
            }
            free(kk);
            free(vv);
        }
        ck_assert_msg(worst <= TOLERANCE, "tuning %d: %.3g", ti, worst);
    }
    for (int s = 0; s < N_SEQS; s++) {
        free(rk[s]);
        free(rv[s]);
    }
    clReleaseMemObject(qm);
    clReleaseMemObject(om);
    clReleaseMemObject(km);
    clReleaseMemObject(vm);
    clReleaseMemObject(tmem);
    clkvq_cache_release(cache);
    free(k);
    free(v);
    free(q);
    free(out);
    free(ref);
}
END_TEST

/* The cooperative plan for every format, group, GQA group and vwpl: the V
 * unit is whole units of the format dividing its groups, a token row's
 * lanes fit the work-group, automatic widths keep 64 accumulators where a
 * unit allows and always fit a small device's local memory, and several
 * queries shrink the tile until they fit too. */
START_TEST(coop_plan_follows_the_rules)
{
    clkvq_device_info dev;
    memset(&dev, 0, sizeof dev);
    dev.max_work_group_size = 256;
    dev.local_mem_bytes = 32768;
    const int groups[] = {32, 64, 128}, qpks[] = {1, 4, 7, 8}, vwpls[] = {0, 1, 2, 4};
    int checked = 0;
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++)
        for (int gi = 0; gi < 3; gi++)
            for (int qi = 0; qi < 4; qi++)
                for (int vi = 0; vi < 4; vi++)
                    for (int nq = 1; nq <= 16; nq += 15) {
                        clkvq_attn_fit_shape sh = {qpks[qi], nq, 128, 1,
                                                   CLKVQ_LAYOUT_GROUP_PLANAR,
                                                   CLKVQ_LAYOUT_TOKEN_MAJOR, (clkvq_format)f,
                                                   groups[gi], gi == 1};
                        clkvq_attn_tuning t = {CLKVQ_ATTN_COOPERATIVE, 128, 0, 0, 4, vwpls[vi], 2};
                        clkvq_attn_coop_plan p;
                        char why[256];
                        clkvq_status st = clkvq_attn_coop_plan_get(&t, &sh, &dev, &p, why,
                                                                   sizeof why);
                        int gw = clkvq_group_words((clkvq_format)f, groups[gi]);
                        int unit = clkvq_format_unit_words((clkvq_format)f);
                        int rows = qpks[qi] * nq;
                        /* an explicit width may not fit; the automatic one always does */
                        ck_assert_msg(st == CLKVQ_OK ||
                                          (vwpls[vi] && st == CLKVQ_ERR_DEVICE_LIMIT),
                                      "format %d group %d qpk %d nq %d vwpl %d: %s", f,
                                      groups[gi], qpks[qi], nq, vwpls[vi], why);
                        if (st != CLKVQ_OK)
                            continue;
                        ck_assert(p.vu % unit == 0 && gw % p.vu == 0);
                        ck_assert((128 / groups[gi]) * (gw / p.vu) <= p.wgs);
                        ck_assert(p.rb >= 1 && p.rb <= 8 && p.rb * p.n_rb >= rows &&
                                  (p.rb - 1) * p.n_rb < rows);
                        ck_assert(p.local_bytes <= dev.local_mem_bytes);
                        if (vwpls[vi] == 0 && p.vu > unit)
                            ck_assert(clkvq_format_unit_codes((clkvq_format)f, p.vu) * p.rb <= 64);
                        if (vwpls[vi] > 0)
                            ck_assert(p.vu <= vwpls[vi] * unit);
                        if (nq == 1) /* the tile shrinks for several queries only */
                            ck_assert(p.wgs == 128 && p.tpl == 4 && p.rb == qpks[qi]);
                        checked++;
                    }
    ck_assert_int_gt(checked, 400);
}
END_TEST

START_TEST(decode_bad_arguments)
{
    const attn_case *c = &g_cases[1];
    int32_t *pk, *pv;
    clkvq_cache *cache = cache_for(c, CLKVQ_ATTN_COOPERATIVE, 0, &pk, &pv);
    clkvq_context *ctx = test_ctx();
    float q[N_SEQS * KV_HEADS * 64], out[N_SEQS * KV_HEADS * 64];
    ck_assert_int_eq(clkvq_cache_decode_host(NULL, 0, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_decode_host(cache, 3, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "layer 3"));
    ck_assert_int_eq(clkvq_cache_decode_host(cache, 0, NULL, out, 1.0f), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_decode_host(cache, 0, q, out, NAN), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_decode_host(cache, 0, q, out, INFINITY), CLKVQ_ERR_INVALID_ARG);
    cl_int err;
    cl_mem small = clCreateBuffer(clkvq_context_cl_context(ctx), 0, 16, NULL, &err);
    ck_assert_int_eq(clkvq_cache_decode(cache, 0, small, small, 1.0f), CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(clkvq_cache_decode_multi(cache, 0, 0, small, small, 1.0f),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_decode_multi(cache, 0, 17, small, small, 1.0f),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "n_queries"));
    ck_assert_int_eq(clkvq_cache_decode_paged(cache, 0, 1, small, small, 1.0f, small, 1),
                     CLKVQ_ERR_INVALID_ARG); /* this cache manages its own pages */
    clReleaseMemObject(small);
    clkvq_attn_tuning bad = {CLKVQ_ATTN_COOPERATIVE, 48, 0, 0, 0, 0, 0};
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &bad), CLKVQ_ERR_INVALID_ARG);
    bad.wgs = 8; /* a 16-token segment must fit a tile's lanes */
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &bad), CLKVQ_ERR_INVALID_ARG);
    bad.wgs = 64;
    bad.tpl = 3;
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &bad), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "tpl"));
    bad.tpl = 4;
    bad.vwpl = 3;
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &bad), CLKVQ_ERR_INVALID_ARG);
    bad.vwpl = 0;
    bad.waves = 65;
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &bad), CLKVQ_ERR_INVALID_ARG);
    bad.waves = 0;
    bad.wgs = 1 << 16; /* more work-items and local memory than any device has */
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &bad), CLKVQ_ERR_DEVICE_LIMIT);
    clkvq_attn_tuning serial = {CLKVQ_ATTN_SERIAL, 0, 64, 16, 0, 0, 0};
    /* this cache is token-major: the serial variant cannot read it */
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &serial), CLKVQ_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "group-planar"));
    serial.vw = 5;
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &serial), CLKVQ_ERR_INVALID_ARG);
    serial.variant = (clkvq_attn_variant)7;
    ck_assert_int_eq(clkvq_cache_set_tuning(cache, &serial), CLKVQ_ERR_INVALID_ARG);
    clkvq_cache_release(cache);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("attention");
    TCase *tc = tcase_create("attention");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, decode_bad_arguments);
    tcase_add_test(tc, coop_plan_follows_the_rules);
    tcase_add_loop_test(tc, decode_matches_reference, 0,
                        2 * (int)(sizeof g_cases / sizeof g_cases[0]));
    tcase_add_test(tc, decode_chunk_boundaries);
    tcase_add_test(tc, decode_after_truncate);
    tcase_add_test(tc, decode_ignores_unwritten_memory);
    suite_add_tcase(s, tc);
    TCase *pages = tcase_create("pages");
    tcase_set_timeout(pages, 900);
    tcase_add_test(pages, decode_paged_matches_reference);
    tcase_add_test(pages, decode_multi_query_matches_reference);
    tcase_add_test(pages, decode_transforms_match_reference);
    tcase_add_test(pages, decode_masks_bad_page_ids);
    tcase_add_test(pages, decode_is_asynchronous);
    tcase_add_test(pages, planted_bug_is_caught);
    suite_add_tcase(s, pages);
    return test_run_suite(s);
}

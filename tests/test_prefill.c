/* The CLBlast attention paths against a double-precision C reference:
 * clkvq_gemv_decode (fp32 decode baseline) and clkvq_cache_prefill_host
 * (causal prefill over the cache), plus their argument checks. */
#include "reference.h"
#include "test_hooks.h"
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ reference */

/* Causal attention in double (lib/reference.c): k, v [n_kv][n][hd], q and
 * out [n_q][nq][hd]; query i attends to tokens 0..n - nq + i. */
static void ref_attention(int n_q, int n_kv, int hd, int n, int nq, const float *k,
                          const float *v, const float *q, double scale, double *out)
{
    clkvq_ref_attn_shape rs = {n_q, n_kv, hd, n, (size_t)n * hd, nq, (size_t)nq * hd, scale};
    clkvq_ref_attention(&rs, q, k, v, out);
}

/* Largest per-head relative error ||o - ref|| / ||ref|| over n_heads blocks
 * of block floats each; NaN anywhere gives NaN (so it fails the bound). */
static double max_rel_err(const float *o, const double *ref, int n_heads, size_t block)
{
    double worst = 0.0;
    for (int h = 0; h < n_heads; h++) {
        double num = 0.0, den = 0.0;
        for (size_t j = 0; j < block; j++) {
            double d = (double)o[h * block + j] - ref[h * block + j];
            num += d * d;
            den += ref[h * block + j] * ref[h * block + j];
        }
        double e = sqrt(num) / (den > 0.0 ? sqrt(den) : 1.0);
        if (!(e <= worst))
            worst = e; /* also takes NaN */
    }
    return worst;
}

static cl_mem device_copy(const float *host, size_t n)
{
    clkvq_context *ctx = test_ctx();
    cl_int err;
    cl_mem m = clCreateBuffer(clkvq_context_cl_context(ctx),
                              CL_MEM_READ_WRITE | (host ? CL_MEM_COPY_HOST_PTR : 0),
                              n * sizeof(float), (void *)host, &err);
    ck_assert_int_eq(err, CL_SUCCESS);
    return m;
}

/* ------------------------------------------------------------ GEMV decode */

typedef struct {
    float *k, *v, *q, *out;
    double *ref;
    cl_mem km, vm, qm, om;
} gemv_case;

static gemv_case gemv_setup(uint64_t seed, int n_q, int n_kv, int hd, int n, float q_sigma)
{
    size_t kv = (size_t)n_kv * n * hd, qn = (size_t)n_q * hd;
    gemv_case g;
    g.k = malloc(sizeof(float) * (kv ? kv : 1));
    g.v = malloc(sizeof(float) * (kv ? kv : 1));
    g.q = malloc(sizeof(float) * qn);
    g.out = malloc(sizeof(float) * qn);
    g.ref = malloc(sizeof(double) * qn);
    test_fill_normal(seed, g.k, kv, 1.0f);
    test_fill_normal(seed + 1, g.v, kv, 1.0f);
    test_fill_normal(seed + 2, g.q, qn, q_sigma);
    g.km = device_copy(kv ? g.k : NULL, kv ? kv : 1);
    g.vm = device_copy(kv ? g.v : NULL, kv ? kv : 1);
    g.qm = device_copy(g.q, qn);
    g.om = device_copy(NULL, qn);
    return g;
}

static void gemv_free(gemv_case *g)
{
    clReleaseMemObject(g->km);
    clReleaseMemObject(g->vm);
    clReleaseMemObject(g->qm);
    clReleaseMemObject(g->om);
    free(g->k);
    free(g->v);
    free(g->q);
    free(g->out);
    free(g->ref);
}

/* Runs one shape; returns the worst per-head relative error. */
static double gemv_run(int n_q, int n_kv, int hd, int n, float q_sigma, float scale)
{
    clkvq_context *ctx = test_ctx();
    gemv_case g = gemv_setup((uint64_t)(n_q * 131 + hd * 7 + n), n_q, n_kv, hd, n, q_sigma);
    clkvq_status st = clkvq_gemv_decode(ctx, n_q, n_kv, hd, n, g.km, g.vm, g.qm, g.om, scale);
    ck_assert_msg(st == CLKVQ_OK, "gemv %d/%d hd %d n %d: %s: %s", n_q, n_kv, hd, n,
                  clkvq_status_string(st), clkvq_last_error(ctx));
    ck_assert_msg(clkvq_last_device_ms(ctx) >= 0.0, "no device time after gemv decode");
    cl_int err = clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), g.om, CL_TRUE, 0,
                                     sizeof(float) * n_q * hd, g.out, 0, NULL, NULL);
    ck_assert_int_eq(err, CL_SUCCESS);
    ref_attention(n_q, n_kv, hd, n, 1, g.k, g.v, g.q, scale, g.ref);
    double e = max_rel_err(g.out, g.ref, n_q, (size_t)hd);
    gemv_free(&g);
    return e;
}

START_TEST(test_gemv_matches_reference)
{
    static const int groups[][2] = {{4, 4}, {8, 2}, {28, 4}}; /* GQA 1, 4, 7 */
    static const int dims[] = {64, 96, 128};
    static const int tokens[] = {1, 7, 129, 1000};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 3; b++)
            for (size_t c = 0; c < 4; c++) {
                int hd = dims[b];
                double e = gemv_run(groups[a][0], groups[a][1], hd, tokens[c], 1.0f,
                                    1.0f / sqrtf((float)hd));
                ck_assert_msg(e <= 1e-5, "gemv %d/%d hd %d n %d: rel err %g", groups[a][0],
                              groups[a][1], hd, tokens[c], e);
            }
}
END_TEST

/* Scores up to ~200 (exp overflows fp32 past 88): only the max-subtracted
 * softmax survives. The fp32 scores themselves carry an absolute error of
 * ~1e-5 at that size, which the exp turns into a relative error of the
 * probabilities, hence the looser bound. */
START_TEST(test_gemv_large_scores)
{
    double e = gemv_run(8, 2, 128, 1000, 4.0f, 1.0f);
    ck_assert_msg(e <= 1e-4, "large scores: rel err %g", e);
}
END_TEST

START_TEST(test_gemv_empty_sequence_gives_zeros)
{
    clkvq_context *ctx = test_ctx();
    gemv_case g = gemv_setup(5, 4, 2, 64, 0, 1.0f);
    float nan_fill = NAN;
    cl_int err = clEnqueueFillBuffer(clkvq_context_cl_queue(ctx), g.om, &nan_fill,
                                     sizeof nan_fill, 0, sizeof(float) * 4 * 64, 0, NULL, NULL);
    ck_assert_int_eq(err, CL_SUCCESS);
    clkvq_status st = clkvq_gemv_decode(ctx, 4, 2, 64, 0, g.km, g.vm, g.qm, g.om, 0.125f);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    err = clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), g.om, CL_TRUE, 0,
                              sizeof(float) * 4 * 64, g.out, 0, NULL, NULL);
    ck_assert_int_eq(err, CL_SUCCESS);
    int i = 0;
    while (i < 4 * 64 && g.out[i] == 0.0f)
        i++;
    ck_assert_msg(i == 4 * 64, "out[%d] = %g, not 0", i, (double)g.out[i]);
    gemv_free(&g);
}
END_TEST

/* An output buffer full of NaN must not leak into the result (CLBlast
 * reads y even with beta 0). */
START_TEST(test_gemv_ignores_old_output)
{
    clkvq_context *ctx = test_ctx();
    gemv_case g = gemv_setup(9, 8, 2, 64, 33, 1.0f);
    float nan_fill = NAN;
    cl_int err = clEnqueueFillBuffer(clkvq_context_cl_queue(ctx), g.om, &nan_fill,
                                     sizeof nan_fill, 0, sizeof(float) * 8 * 64, 0, NULL, NULL);
    ck_assert_int_eq(err, CL_SUCCESS);
    clkvq_status st = clkvq_gemv_decode(ctx, 8, 2, 64, 33, g.km, g.vm, g.qm, g.om, 0.125f);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    err = clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), g.om, CL_TRUE, 0,
                              sizeof(float) * 8 * 64, g.out, 0, NULL, NULL);
    ck_assert_int_eq(err, CL_SUCCESS);
    ref_attention(8, 2, 64, 33, 1, g.k, g.v, g.q, 0.125, g.ref);
    double e = max_rel_err(g.out, g.ref, 8, 64);
    ck_assert_msg(e <= 1e-5, "rel err %g", e);
    gemv_free(&g);
}
END_TEST

static void expect_fail(clkvq_status st, clkvq_status want, const char *label)
{
    clkvq_context *ctx = test_ctx();
    ck_assert_msg(st == want, "%s: got %s, want %s", label, clkvq_status_string(st),
                  clkvq_status_string(want));
    ck_assert_msg(clkvq_last_error(ctx)[0] != '\0', "%s: no message", label);
}

START_TEST(test_gemv_bad_args)
{
    clkvq_context *ctx = test_ctx();
    gemv_case g = gemv_setup(3, 8, 2, 64, 16, 1.0f);
    clkvq_status st = clkvq_gemv_decode(NULL, 8, 2, 64, 16, g.km, g.vm, g.qm, g.om, 1.0f);
    ck_assert_int_eq(st, CLKVQ_ERR_INVALID_ARG);
    ck_assert_msg(clkvq_last_error(NULL)[0] != '\0', "NULL context: no message");
    expect_fail(clkvq_gemv_decode(ctx, 6, 4, 64, 16, g.km, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "6 q heads over 4 kv heads");
    expect_fail(clkvq_gemv_decode(ctx, 0, 2, 64, 16, g.km, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "0 q heads");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 0, 16, g.km, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "head_dim 0");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 64, -1, g.km, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "negative n_tokens");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 64, 16, g.km, g.vm, g.qm, g.om, NAN),
                CLKVQ_ERR_INVALID_ARG, "NaN scale");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 64, 16, NULL, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "NULL k");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 64, 16, g.km, g.vm, NULL, g.om, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "NULL q");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 64, 16, g.km, g.vm, g.qm, NULL, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "NULL out");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 64, 17, g.km, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_BUFFER_TOO_SMALL, "k/v one token short");
    expect_fail(clkvq_gemv_decode(ctx, 8, 2, 128, 8, g.km, g.vm, g.qm, g.om, 1.0f),
                CLKVQ_ERR_BUFFER_TOO_SMALL, "q/out too small for head_dim 128");
    gemv_free(&g);
}
END_TEST

/* ------------------------------------------------------------ prefill */

enum { PF_CAPACITY = 128, PF_KV = 2, PF_LAYERS = 2, PF_SEQS = 2 };

typedef struct {
    const char *name;
    clkvq_layer_config cfg;
} pf_scheme;

static pf_scheme pf_schemes(int i)
{
    pf_scheme s;
    if (i == 0) {
        s.name = "fp16";
        s.cfg = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
    } else if (i == 1) {
        s.name = "token q4";
        s.cfg = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    } else {
        s.name = "skvq k2/v1.5 w16 s2";
        s.cfg = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
        s.cfg.format_k = CLKVQ_FMT_Q2;
        s.cfg.format_v = CLKVQ_FMT_T15;
        s.cfg.group_size = 32;
        s.cfg.window = 16;
        s.cfg.n_sink = 2;
    }
    return s;
}

static clkvq_cache *pf_cache(const clkvq_layer_config *lc, int n_q, int hd)
{
    clkvq_context *ctx = test_ctx();
    clkvq_layer_config layers[PF_LAYERS] = {*lc, *lc};
    clkvq_cache_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_layers = PF_LAYERS;
    cfg.n_seqs = PF_SEQS;
    cfg.capacity = PF_CAPACITY;
    cfg.n_kv_heads = PF_KV;
    cfg.n_q_heads = n_q;
    cfg.head_dim = hd;
    cfg.layout_k = cfg.layout_v = CLKVQ_LAYOUT_TOKEN_MAJOR;
    cfg.layers = layers;
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(ctx, &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "cache create: %s: %s", clkvq_status_string(st),
                  clkvq_last_error(ctx));
    return cache;
}

/* Appends n0 then n1 random tokens to (layer, seq). */
static void pf_append(clkvq_cache *cache, int layer, int seq, int hd, int n0, int n1,
                      uint64_t seed)
{
    clkvq_context *ctx = test_ctx();
    int chunks[2] = {n0, n1};
    for (int c = 0; c < 2; c++) {
        size_t n = (size_t)PF_KV * chunks[c] * hd;
        float *k = malloc(sizeof(float) * n), *v = malloc(sizeof(float) * n);
        test_fill_normal(seed + 2 * c, k, n, 1.0f);
        test_fill_normal(seed + 2 * c + 1, v, n, 1.0f);
        clkvq_status st = clkvq_cache_append(cache, layer, seq, chunks[c], k, v);
        ck_assert_msg(st == CLKVQ_OK, "append: %s: %s", clkvq_status_string(st),
                      clkvq_last_error(ctx));
        free(k);
        free(v);
    }
}

/* Prefills the last nq tokens of (layer, seq) and compares with the
 * reference over the cache's own (dequantized) K/V: only the attention
 * kernels' error is measured. */
static double pf_check(clkvq_cache *cache, int layer, int seq, int n_q, int hd, int nq,
                       uint64_t seed)
{
    clkvq_context *ctx = test_ctx();
    int n = 0;
    ck_assert_int_eq(clkvq_cache_length(cache, layer, seq, &n), CLKVQ_OK);
    size_t kv = (size_t)PF_KV * n * hd, qn = (size_t)n_q * nq * hd;
    float *k = malloc(sizeof(float) * kv), *v = malloc(sizeof(float) * kv);
    float *q = malloc(sizeof(float) * qn), *out = malloc(sizeof(float) * qn);
    double *ref = malloc(sizeof(double) * qn);
    clkvq_status st = clkvq_cache_read(cache, layer, seq, k, v);
    ck_assert_msg(st == CLKVQ_OK, "read: %s", clkvq_last_error(ctx));
    test_fill_normal(seed, q, qn, 1.0f);
    float scale = 1.0f / sqrtf((float)hd);
    st = clkvq_cache_prefill_host(cache, layer, seq, nq, q, out, scale);
    ck_assert_msg(st == CLKVQ_OK, "prefill n %d nq %d: %s: %s", n, nq, clkvq_status_string(st),
                  clkvq_last_error(ctx));
    ck_assert_msg(clkvq_last_device_ms(ctx) >= 0.0, "no device time after prefill");
    ref_attention(n_q, PF_KV, hd, n, nq, k, v, q, scale, ref);
    double e = max_rel_err(out, ref, n_q, (size_t)nq * hd);
    free(k);
    free(v);
    free(q);
    free(out);
    free(ref);
    return e;
}

START_TEST(test_prefill_matches_reference)
{
    static const int gqa[] = {1, 4};
    static const int dims[] = {64, 128};
    for (int si = 0; si < 3; si++)
        for (int gi = 0; gi < 2; gi++)
            for (int di = 0; di < 2; di++) {
                pf_scheme s = pf_schemes(si);
                int n_q = PF_KV * gqa[gi], hd = dims[di];
                clkvq_cache *cache = pf_cache(&s.cfg, n_q, hd);
                /* seq 0 of layer 1 gets other data and another length: a
                 * prefill that read the wrong sequence or layer would show */
                pf_append(cache, 1, 0, hd, 11, 20, 100 + si);
                pf_append(cache, 0, 1, hd, 50, 3, 200 + si);
                pf_append(cache, 1, 1, hd, 37, 60, 300 + si);
                const int nqs[] = {1, 5, 97};
                for (int k = 0; k < 3; k++) {
                    double e = pf_check(cache, 1, 1, n_q, hd, nqs[k], 400 + k);
                    ck_assert_msg(e <= 1e-5, "%s, GQA %d, hd %d, nq %d: rel err %g", s.name,
                                  gqa[gi], hd, nqs[k], e);
                }
                clkvq_cache_release(cache);
            }
}
END_TEST

/* A small score budget forces several query chunks (each with its own
 * causal offset and trimmed key range); the result must not change. */
START_TEST(test_prefill_chunked)
{
    size_t saved = clkvq_prefill_score_budget;
    pf_scheme s = pf_schemes(1);
    clkvq_cache *cache = pf_cache(&s.cfg, 8, 64);
    pf_append(cache, 0, 0, 64, 70, 45, 500);
    /* 8 heads x 115 tokens x 4 bytes = 3680 bytes per query: 7 queries a chunk */
    clkvq_prefill_score_budget = 7 * 8 * 115 * sizeof(float) + 100;
    double e1 = pf_check(cache, 0, 0, 8, 64, 115, 600);
    double e2 = pf_check(cache, 0, 0, 8, 64, 30, 601);
    clkvq_prefill_score_budget = saved;
    ck_assert_msg(e1 <= 1e-5 && e2 <= 1e-5, "chunked prefill: rel err %g / %g", e1, e2);
    clkvq_cache_release(cache);
}
END_TEST

START_TEST(test_prefill_bad_args)
{
    clkvq_context *ctx = test_ctx();
    pf_scheme s = pf_schemes(0);
    clkvq_cache *cache = pf_cache(&s.cfg, 8, 64);
    pf_append(cache, 0, 0, 64, 4, 6, 700);
    float q[8 * 11 * 64] = {0}, out[8 * 11 * 64];
    clkvq_status st = clkvq_cache_prefill_host(NULL, 0, 0, 1, q, out, 1.0f);
    ck_assert_int_eq(st, CLKVQ_ERR_INVALID_ARG);
    ck_assert_msg(clkvq_last_error(NULL)[0] != '\0', "NULL cache: no message");
    expect_fail(clkvq_cache_prefill_host(cache, 0, 0, 0, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG,
                "n_queries 0");
    expect_fail(clkvq_cache_prefill_host(cache, 0, 0, 11, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG,
                "n_queries past the length");
    expect_fail(clkvq_cache_prefill_host(cache, 0, 1, 1, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG,
                "empty sequence");
    expect_fail(clkvq_cache_prefill_host(cache, -1, 0, 1, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG,
                "layer -1");
    expect_fail(clkvq_cache_prefill_host(cache, PF_LAYERS, 0, 1, q, out, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "layer past the end");
    expect_fail(clkvq_cache_prefill_host(cache, 0, PF_SEQS, 1, q, out, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "seq past the end");
    expect_fail(clkvq_cache_prefill_host(cache, 0, -1, 1, q, out, 1.0f), CLKVQ_ERR_INVALID_ARG,
                "seq -1");
    expect_fail(clkvq_cache_prefill_host(cache, 0, 0, 1, NULL, out, 1.0f),
                CLKVQ_ERR_INVALID_ARG, "NULL q");
    expect_fail(clkvq_cache_prefill_host(cache, 0, 0, 1, q, NULL, 1.0f), CLKVQ_ERR_INVALID_ARG,
                "NULL out");
    expect_fail(clkvq_cache_prefill_host(cache, 0, 0, 1, q, out, INFINITY),
                CLKVQ_ERR_INVALID_ARG, "infinite scale");
    /* and a good call still works after the failures */
    st = clkvq_cache_prefill_host(cache, 0, 0, 10, q, out, 1.0f);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    clkvq_cache_release(cache);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("prefill");
    TCase *gemv = tcase_create("gemv_decode");
    tcase_add_test(gemv, test_gemv_matches_reference);
    tcase_add_test(gemv, test_gemv_large_scores);
    tcase_add_test(gemv, test_gemv_empty_sequence_gives_zeros);
    tcase_add_test(gemv, test_gemv_ignores_old_output);
    tcase_add_test(gemv, test_gemv_bad_args);
    suite_add_tcase(s, gemv);
    TCase *pf = tcase_create("cache_prefill");
    tcase_add_test(pf, test_prefill_matches_reference);
    tcase_add_test(pf, test_prefill_chunked);
    tcase_add_test(pf, test_prefill_bad_args);
    suite_add_tcase(s, pf);
    return s;
}

int main(void) { return test_run_suite(suite()); }

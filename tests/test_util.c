#include "test_util.h"

#include "reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static clkvq_context *g_ctx;

clkvq_context *test_ctx(void)
{
    if (!g_ctx) {
        clkvq_status st = clkvq_context_create(&g_ctx, NULL);
        if (st != CLKVQ_OK) {
            fprintf(stderr, "no OpenCL context: %s: %s\n", clkvq_status_string(st),
                    clkvq_last_error(NULL));
            exit(1);
        }
    }
    return g_ctx;
}

double test_uniform(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

double test_normal(uint64_t *state)
{
    double u1 = test_uniform(state), u2 = test_uniform(state);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void test_fill_normal(uint64_t seed, float *x, size_t n, float sigma)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(sigma * test_normal(&s));
}

int32_t *test_random_perm(uint64_t seed, int n_heads, int head_dim)
{
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)n_heads * head_dim);
    uint64_t s = seed;
    for (int h = 0; h < n_heads; h++) {
        int32_t *p = perm + (size_t)h * head_dim;
        for (int c = 0; c < head_dim; c++)
            p[c] = c;
        for (int c = head_dim - 1; c > 0; c--) { /* Fisher-Yates */
            int j = (int)(test_uniform(&s) * (c + 1));
            int32_t t = p[c];
            p[c] = p[j];
            p[j] = t;
        }
    }
    return perm;
}

void test_attention_reference(const float *q, const float *k, const float *v, int n, int n_q,
                              int qpk, int d, float scale, double *out)
{
    clkvq_ref_attn_shape rs = {n_q, n_q / qpk, d, n, (size_t)n * d, 1, (size_t)d, scale};
    clkvq_ref_attention(&rs, q, k, v, out);
}

int test_run_suite(Suite *suite)
{
    SRunner *runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    /* Released here, not from an atexit handler: exit handlers registered
     * after ours (the OpenCL implementation's lazily created statics; e.g.
     * the LLVM state of Oclgrind's programs) would run first, and releasing
     * programs after them aborts ("free(): corrupted unsorted chunks"). */
    clkvq_context_release(g_ctx);
    g_ctx = NULL;
    return failed == 0 ? 0 : 1;
}

double test_decode_error(clkvq_cache *cache, int n_seqs, const int *lengths, int n_kv, int qpk,
                         int d, int nq, const float *q, const float *out, float scale)
{
    int n_q = n_kv * qpk;
    double worst = 0.0;
    double *ref = malloc(sizeof(double) * (size_t)n_q * nq * d);
    float *qt = malloc(sizeof(float) * (size_t)n_q * nq * d);
    for (int s = 0; s < n_seqs; s++) {
        int n = lengths[s];
        size_t kv_count = (size_t)n_kv * (n > 0 ? n : 1) * d;
        float *k = malloc(sizeof(float) * kv_count), *v = malloc(sizeof(float) * kv_count);
        ck_assert_int_eq(clkvq_cache_read(cache, 0, s, k, v), CLKVQ_OK);
        /* [query][head] -> the reference's [head][query] */
        for (int i = 0; i < nq; i++)
            for (int h = 0; h < n_q; h++)
                memcpy(qt + ((size_t)h * nq + i) * d, q + (((size_t)s * nq + i) * n_q + h) * d,
                       sizeof(float) * d);
        clkvq_ref_attn_shape rs = {n_q, n_kv, d, n, (size_t)n * d, nq, (size_t)nq * d, scale};
        clkvq_ref_attention(&rs, qt, k, v, ref);
        for (int r = 0; r < n_q * nq; r++) {
            int h = r % n_q, i = r / n_q;
            double num = 0.0, den = 0.0;
            for (int c = 0; c < d; c++) {
                double rr = ref[((size_t)h * nq + i) * d + c];
                double o = out[(((size_t)s * nq + i) * n_q + h) * d + c];
                num += (o - rr) * (o - rr);
                den += rr * rr;
            }
            double err = den > 0 ? sqrt(num / den) : sqrt(num);
            worst = err > worst || isnan(err) ? err : worst;
        }
        free(k);
        free(v);
    }
    free(ref);
    free(qt);
    return worst;
}

void test_expect_model(clkvq_cache *cache, clkvq_ref_cache **model, int n_seqs, int heads,
                       int dim, const char *label)
{
    for (int s = 0; s < n_seqs; s++) {
        int n = clkvq_ref_cache_length(model[s]), got;
        ck_assert_int_eq(clkvq_cache_length(cache, 0, s, &got), CLKVQ_OK);
        ck_assert_int_eq(got, n);
        size_t count = (size_t)heads * n * dim;
        float *k = malloc(count * sizeof(float) + 4), *v = malloc(count * sizeof(float) + 4);
        float *rk = malloc(count * sizeof(float) + 4), *rv = malloc(count * sizeof(float) + 4);
        ck_assert_int_eq(clkvq_cache_read(cache, 0, s, k, v), CLKVQ_OK);
        clkvq_ref_cache_read(model[s], rk, rv);
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < count; i++)
            if (k[i] != rk[i] || v[i] != rv[i]) {
                if (!bad)
                    first = i;
                bad++;
            }
        ck_assert_msg(bad == 0,
                      "%s seq %d len %d: %zu mismatches, first at %zu (head %zu): k %g/%g v %g/%g",
                      label, s, n, bad, first, first / ((size_t)(n > 0 ? n : 1) * dim),
                      (double)k[first], (double)rk[first], (double)v[first], (double)rv[first]);
        free(k);
        free(v);
        free(rk);
        free(rv);
    }
}

#include "test_util.h"

#include "reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

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

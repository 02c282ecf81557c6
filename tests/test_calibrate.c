/* Calibration (channel permutation, clip search, a layer's fits) and the
 * synthetic KV generator. All host-side: no OpenCL context is needed. */
#include "test_util.h"
#include "clkvq_packing.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float *alloc_floats(size_t n)
{
    float *p = malloc(n * sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

static size_t n_elements(const clkvq_shape *s)
{
    return (size_t)s->n_heads * (size_t)s->n_tokens * (size_t)s->head_dim;
}

static int is_permutation(const int32_t *perm, int n_heads, int head_dim)
{
    char *seen = calloc((size_t)head_dim, 1);
    ck_assert_ptr_nonnull(seen);
    int ok = 1;
    for (int h = 0; h < n_heads && ok; h++) {
        memset(seen, 0, (size_t)head_dim);
        for (int c = 0; c < head_dim && ok; c++) {
            int32_t p = perm[(size_t)h * (size_t)head_dim + (size_t)c];
            if (p < 0 || p >= head_dim || seen[p])
                ok = 0;
            else
                seen[p] = 1;
        }
    }
    free(seen);
    return ok;
}

/* Range over the tokens of channel c of head h. */
static double channel_range_of(const float *x, const clkvq_shape *s, int h, int c)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < s->n_tokens; t++) {
        double v = x[((size_t)h * (size_t)s->n_tokens + (size_t)t) * (size_t)s->head_dim +
                     (size_t)c];
        lo = fmin(lo, v);
        hi = fmax(hi, v);
    }
    return hi - lo;
}

/* ------------------------------------------------------------ permutation */

START_TEST(perm_is_permutation_and_sorted_by_group)
{
    static const int head_dims[] = {64, 96, 128, 256};
    static const int group_sizes[] = {32, 64, 128};
    for (size_t i = 0; i < sizeof head_dims / sizeof *head_dims; i++) {
        for (size_t j = 0; j < sizeof group_sizes / sizeof *group_sizes; j++) {
            int head_dim = head_dims[i], group_size = group_sizes[j];
            if (head_dim % group_size != 0)
                continue;
            clkvq_shape s = {3, 200, head_dim};
            float *k = alloc_floats(n_elements(&s));
            ck_assert_int_eq(clkvq_synth_kv(7, &s, k, NULL), CLKVQ_OK);
            int32_t *perm = malloc((size_t)s.n_heads * (size_t)head_dim * sizeof *perm);
            ck_assert_ptr_nonnull(perm);
            ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, k, group_size, perm),
                             CLKVQ_OK);
            ck_assert_msg(is_permutation(perm, s.n_heads, head_dim),
                          "not a permutation: head_dim %d group %d", head_dim, group_size);
            /* Groups follow the range order: every channel of group g has a
             * range no larger than any of group g+1; inside a group, indices
             * ascend. */
            for (int h = 0; h < s.n_heads; h++) {
                const int32_t *p = perm + (size_t)h * (size_t)head_dim;
                for (int g = 0; g + group_size < head_dim; g += group_size) {
                    double max_here = 0.0, min_next = INFINITY;
                    for (int c = 0; c < group_size; c++) {
                        max_here = fmax(max_here, channel_range_of(k, &s, h, p[g + c]));
                        min_next = fmin(min_next,
                                        channel_range_of(k, &s, h, p[g + group_size + c]));
                    }
                    ck_assert_msg(max_here <= min_next, "group %d of head %d out of order",
                                  g / group_size, h);
                }
                for (int c = 1; c < head_dim; c++)
                    if (c % group_size != 0)
                        ck_assert_int_lt(p[c - 1], p[c]);
            }
            free(perm);
            free(k);
        }
    }
}
END_TEST

/* Shuffles 0..n-1 into order with the test's own generator. */
static void shuffle(uint64_t *state, int *order, int n)
{
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(test_uniform(state) * (double)(i + 1));
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
}

START_TEST(perm_groups_planted_ranges)
{
    enum { HEAD_DIM = 128, GROUP = 32 };
    clkvq_shape s = {2, 300, HEAD_DIM};
    float *x = alloc_floats(n_elements(&s));
    int32_t perm[2 * HEAD_DIM];
    int set_of[2][HEAD_DIM]; /* 0: range ~20, 1: range ~5, 2: the rest, range ~1 */
    uint64_t state = 12345;
    for (int h = 0; h < s.n_heads; h++) {
        int order[HEAD_DIM];
        shuffle(&state, order, HEAD_DIM);
        double range[HEAD_DIM], offset[HEAD_DIM];
        for (int i = 0; i < HEAD_DIM; i++) {
            int c = order[i];
            set_of[h][c] = i < 32 ? 0 : i < 64 ? 1 : 2;
            double nominal = set_of[h][c] == 0 ? 20.0 : set_of[h][c] == 1 ? 5.0 : 1.0;
            range[c] = nominal * (0.9 + 0.2 * test_uniform(&state));
            /* Large offsets: the grouping must follow max - min, not max |x|. */
            offset[c] = 60.0 * (test_uniform(&state) - 0.5);
        }
        for (int t = 0; t < s.n_tokens; t++)
            for (int c = 0; c < HEAD_DIM; c++) {
                /* The first two tokens pin each channel's exact range. */
                double u = t == 0 ? 0.0 : t == 1 ? 1.0 : test_uniform(&state);
                x[((size_t)h * (size_t)s.n_tokens + (size_t)t) * HEAD_DIM + (size_t)c] =
                    (float)(offset[c] + range[c] * (u - 0.5));
            }
    }
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, x, GROUP, perm), CLKVQ_OK);
    ck_assert(is_permutation(perm, s.n_heads, HEAD_DIM));
    for (int h = 0; h < s.n_heads; h++) {
        int group_of_set[3] = {-1, -1, -1};
        int rest_groups = 0;
        for (int pos = 0; pos < HEAD_DIM; pos++) {
            int set = set_of[h][perm[h * HEAD_DIM + pos]], group = pos / GROUP;
            if (set == 2) {
                rest_groups |= 1 << group;
                continue;
            }
            if (group_of_set[set] < 0)
                group_of_set[set] = group;
            ck_assert_msg(group_of_set[set] == group,
                          "head %d: planted set %d split over groups %d and %d", h, set,
                          group_of_set[set], group);
        }
        ck_assert_int_ne(group_of_set[0], group_of_set[1]);
        /* The 64 small-range channels fill exactly the two other groups. */
        int n_rest_groups = 0;
        for (int g = 0; g < HEAD_DIM / GROUP; g++)
            n_rest_groups += (rest_groups >> g) & 1;
        ck_assert_int_eq(n_rest_groups, 2);
    }
    free(x);
}
END_TEST

START_TEST(perm_deterministic)
{
    clkvq_shape s = {4, 257, 128};
    float *k = alloc_floats(n_elements(&s));
    ck_assert_int_eq(clkvq_synth_kv(3, &s, k, NULL), CLKVQ_OK);
    int32_t a[4 * 128], b[4 * 128];
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, k, 32, a), CLKVQ_OK);
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, k, 32, b), CLKVQ_OK);
    ck_assert_mem_eq(a, b, sizeof a);
    /* Ties (a constant tensor: every range 0) resolve by channel index. */
    for (size_t i = 0; i < n_elements(&s); i++)
        k[i] = 1.5f;
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, k, 64, a), CLKVQ_OK);
    for (int h = 0; h < s.n_heads; h++)
        for (int c = 0; c < 128; c++)
            ck_assert_int_eq(a[h * 128 + c], c);
    free(k);
}
END_TEST

#define EXPECT_FAIL(call, status)                                                            \
    do {                                                                                     \
        ck_assert_int_eq((call), (status));                                                  \
        ck_assert_msg(clkvq_last_error(NULL)[0] != '\0', "no message for %s", #call);         \
    } while (0)

START_TEST(perm_bad_args)
{
    clkvq_shape s = {2, 16, 64};
    float *x = alloc_floats(n_elements(&s));
    test_fill_normal(1, x, n_elements(&s), 1.0f);
    int32_t perm[2 * 64];
    clkvq_shape zero_heads = {0, 16, 64}, neg_dim = {2, 16, -64}, zero_tokens = {2, 0, 64};
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, NULL, x, 32, perm), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &zero_heads, x, 32, perm),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &neg_dim, x, 32, perm), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &zero_tokens, x, 32, perm),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, NULL, 32, perm), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, 32, NULL), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, 0, perm), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, -32, perm), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, 48, perm), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, 128, perm), CLKVQ_ERR_INVALID_ARG);
    x[100] = NAN;
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, 32, perm), CLKVQ_ERR_NONFINITE);
    x[100] = -INFINITY;
    EXPECT_FAIL(clkvq_calibrate_permutation(NULL, &s, x, 32, perm), CLKVQ_ERR_NONFINITE);
    x[100] = 0.0f;
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, x, 32, perm), CLKVQ_OK);
    ck_assert_str_eq(clkvq_last_error(NULL), "");
    free(x);
}
END_TEST

/* ------------------------------------------------------------ clip search */

/* Gaussian with rare 30x spikes: the heavy tail that makes clipping pay. */
static void fill_spiky(uint64_t seed, float *x, size_t n)
{
    uint64_t state = seed * 0x9E3779B97F4A7C15ULL + 11;
    for (size_t i = 0; i < n; i++) {
        double v = test_normal(&state);
        if (test_uniform(&state) < 0.01)
            v *= 30.0;
        x[i] = (float)v;
    }
}

static clkvq_quant_params token_params(clkvq_format format, int group_size)
{
    clkvq_quant_params qp = clkvq_quant_params_default();
    qp.format = format;
    qp.axis = CLKVQ_AXIS_TOKEN;
    qp.group_size = group_size;
    qp.param_type = CLKVQ_PARAM_FP16;
    qp.zero_mode = CLKVQ_ZERO_FLOAT;
    return qp;
}

START_TEST(clip_beats_no_clip_on_heavy_tails)
{
    static const struct {
        clkvq_format format;
        int group_size;
    } cases[] = {{CLKVQ_FMT_Q4, 32}, {CLKVQ_FMT_Q4, 128}, {CLKVQ_FMT_Q2, 32}, {CLKVQ_FMT_Q2, 128}};
    clkvq_shape s = {2, 512, 128};
    float *x = alloc_floats(n_elements(&s));
    fill_spiky(5, x, n_elements(&s));
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        clkvq_quant_params qp = token_params(cases[i].format, cases[i].group_size);
        qp.clip_alpha = 0.25f; /* ignored by the search */
        float alpha = 0.0f, alpha_one = 0.0f;
        double mse = 0.0, mse_one = 0.0;
        ck_assert_int_eq(
            clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.02f, &alpha, &mse),
            CLKVQ_OK);
        ck_assert_int_eq(
            clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 1.0f, 1.0f, 0.01f, &alpha_one, &mse_one),
            CLKVQ_OK);
        ck_assert_float_eq(alpha_one, 1.0f);
        ck_assert_msg(alpha < 1.0f && alpha >= 0.5f, "case %zu: alpha %g", i, (double)alpha);
        ck_assert_msg(mse < mse_one, "case %zu: mse %g at alpha %g, %g at 1", i, mse,
                      (double)alpha, mse_one);
        /* The reported MSE is the MSE at the reported alpha. */
        float alpha_again = 0.0f;
        double mse_again = 0.0;
        ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, alpha, alpha, 0.01f,
                                              &alpha_again, &mse_again),
                         CLKVQ_OK);
        ck_assert_float_eq(alpha_again, alpha);
        ck_assert_double_eq(mse_again, mse);
    }
    free(x);
}
END_TEST

START_TEST(clip_grid_includes_hi_and_identity_perm)
{
    clkvq_shape s = {2, 64, 64};
    float *x = alloc_floats(n_elements(&s));
    test_fill_normal(9, x, n_elements(&s), 1.0f);
    clkvq_quant_params qp = token_params(CLKVQ_FMT_Q8, 32);
    /* Plain Gaussian at 8 bits: clipping only hurts, so the best point is
     * hi, which 0.9 + 10 * 0.01 reaches only up to rounding. */
    float alpha = 0.0f;
    double mse = 0.0;
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.9f, 1.0f, 0.01f, &alpha, &mse),
                     CLKVQ_OK);
    ck_assert_float_eq(alpha, 1.0f);
    ck_assert(mse > 0.0 && isfinite(mse));

    int32_t identity[2 * 64];
    for (int i = 0; i < 2 * 64; i++)
        identity[i] = i % 64;
    float alpha_perm = 0.0f;
    double mse_perm = 0.0;
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, x, identity, 0.9f, 1.0f, 0.01f,
                                          &alpha_perm, &mse_perm),
                     CLKVQ_OK);
    ck_assert_float_eq(alpha_perm, alpha);
    ck_assert_double_eq(mse_perm, mse);
    free(x);
}
END_TEST

START_TEST(clip_with_calibrated_perm_on_synth_keys)
{
    /* Reorder + clip (SKVQ) must not lose to clip alone on outlier keys. */
    clkvq_shape s = {2, 512, 128};
    float *k = alloc_floats(n_elements(&s));
    ck_assert_int_eq(clkvq_synth_kv(1, &s, k, NULL), CLKVQ_OK);
    int32_t perm[2 * 128];
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &s, k, 32, perm), CLKVQ_OK);
    clkvq_quant_params qp = token_params(CLKVQ_FMT_Q4, 32);
    float alpha_plain, alpha_perm;
    double mse_plain, mse_perm;
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, k, NULL, 0.5f, 1.0f, 0.02f,
                                          &alpha_plain, &mse_plain),
                     CLKVQ_OK);
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, k, perm, 0.5f, 1.0f, 0.02f, &alpha_perm,
                                          &mse_perm),
                     CLKVQ_OK);
    ck_assert_msg(mse_perm < mse_plain, "reordered mse %g vs plain %g", mse_perm, mse_plain);
    free(k);
}
END_TEST

START_TEST(clip_bad_args)
{
    clkvq_shape s = {2, 32, 64};
    float *x = alloc_floats(n_elements(&s));
    test_fill_normal(2, x, n_elements(&s), 1.0f);
    clkvq_quant_params qp = token_params(CLKVQ_FMT_Q4, 32);
    float a;
    double m;
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, NULL, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, NULL, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, NULL, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.1f, NULL, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, NULL),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.0f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.9f, 0.8f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.1f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, NAN, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.0f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, -0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, NAN, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.1f, 1.0f, 1e-9f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);

    clkvq_quant_params bad = qp;
    bad.group_size = 48;
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &bad, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);
    bad = qp;
    bad.format = (clkvq_format)99;
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &bad, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_UNSUPPORTED);

    int32_t perm[2 * 64];
    for (int i = 0; i < 2 * 64; i++)
        perm[i] = i % 64;
    perm[70] = perm[71]; /* a duplicate in head 1 */
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, perm, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_INVALID_ARG);

    x[5] = NAN;
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_NONFINITE);
    x[5] = INFINITY;
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_NONFINITE);
    x[5] = 1e5f;
    EXPECT_FAIL(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                CLKVQ_ERR_NONFINITE);
    x[5] = 0.5f;
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, x, NULL, 0.5f, 1.0f, 0.1f, &a, &m),
                     CLKVQ_OK);
    ck_assert_str_eq(clkvq_last_error(NULL), "");
    free(x);
}
END_TEST

/* ------------------------------------------------------------ synthetic KV */

START_TEST(synth_deterministic_and_seeded)
{
    clkvq_shape s = {2, 300, 128};
    size_t n = n_elements(&s);
    float *k1 = alloc_floats(n), *v1 = alloc_floats(n), *k2 = alloc_floats(n),
          *v2 = alloc_floats(n);
    ck_assert_int_eq(clkvq_synth_kv(42, &s, k1, v1), CLKVQ_OK);
    ck_assert_int_eq(clkvq_synth_kv(42, &s, k2, v2), CLKVQ_OK);
    ck_assert_mem_eq(k1, k2, n * sizeof *k1);
    ck_assert_mem_eq(v1, v2, n * sizeof *v1);

    /* k does not depend on v being asked for, and the reverse. */
    ck_assert_int_eq(clkvq_synth_kv(42, &s, k2, NULL), CLKVQ_OK);
    ck_assert_mem_eq(k1, k2, n * sizeof *k1);
    ck_assert_int_eq(clkvq_synth_kv(42, &s, NULL, v2), CLKVQ_OK);
    ck_assert_mem_eq(v1, v2, n * sizeof *v1);

    /* Fewer tokens: each head is a prefix of the longer sequence. */
    clkvq_shape short_s = {2, 100, 128};
    ck_assert_int_eq(clkvq_synth_kv(42, &short_s, k2, v2), CLKVQ_OK);
    for (int h = 0; h < 2; h++) {
        ck_assert_mem_eq(k2 + (size_t)h * 100 * 128, k1 + (size_t)h * 300 * 128,
                         100 * 128 * sizeof(float));
        ck_assert_mem_eq(v2 + (size_t)h * 100 * 128, v1 + (size_t)h * 300 * 128,
                         100 * 128 * sizeof(float));
    }

    ck_assert_int_eq(clkvq_synth_kv(43, &s, k2, v2), CLKVQ_OK);
    size_t k_same = 0, v_same = 0;
    for (size_t i = 0; i < n; i++) {
        k_same += k1[i] == k2[i];
        v_same += v1[i] == v2[i];
    }
    ck_assert_msg(k_same < n / 100 && v_same < n / 100, "seeds 42 and 43 share %zu/%zu of %zu",
                  k_same, v_same, n);
    free(k1);
    free(v1);
    free(k2);
    free(v2);
}
END_TEST

/* One assertion per tensor, not per element: Check records every passing
 * assertion, which makes a per-element ck_assert cost a syscall. */
static int all_in_fp16_range(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]) || fabsf(x[i]) >= 65504.0f)
            return 0;
    return 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void check_synth_features(uint64_t seed, const clkvq_shape *s)
{
    size_t n = n_elements(s);
    float *k = alloc_floats(n), *v = alloc_floats(n);
    ck_assert_int_eq(clkvq_synth_kv(seed, s, k, v), CLKVQ_OK);
    ck_assert_msg(all_in_fp16_range(k, n) && all_in_fp16_range(v, n), "seed %llu: k or v out of "
                  "range", (unsigned long long)seed);
    const size_t tokens = (size_t)s->n_tokens, dim = (size_t)s->head_dim;
    double *mean_abs = malloc(dim * sizeof *mean_abs);
    ck_assert_ptr_nonnull(mean_abs);
    for (int h = 0; h < s->n_heads; h++) {
        const float *kh = k + (size_t)h * tokens * dim, *vh = v + (size_t)h * tokens * dim;

        /* Outlier channels (token 0 left out: it is the sink). */
        for (size_t c = 0; c < dim; c++) {
            double sum = 0.0;
            for (size_t t = 1; t < tokens; t++)
                sum += fabs(kh[t * dim + c]);
            mean_abs[c] = sum / (double)(tokens - 1);
        }
        qsort(mean_abs, dim, sizeof *mean_abs, cmp_double);
        double median = mean_abs[dim / 2], largest = mean_abs[dim - 1];
        ck_assert_msg(largest >= 10.0 * median,
                      "seed %llu head %d: largest channel mean |k| %g, median %g",
                      (unsigned long long)seed, h, largest, median);

        /* The sink: the head's largest |k| is in token 0. */
        double max_first = 0.0, max_rest = 0.0;
        for (size_t c = 0; c < dim; c++)
            max_first = fmax(max_first, fabs(kh[c]));
        for (size_t i = dim; i < tokens * dim; i++)
            max_rest = fmax(max_rest, fabs(kh[i]));
        ck_assert_msg(max_first > max_rest, "seed %llu head %d: token 0 max %g, rest %g",
                      (unsigned long long)seed, h, max_first, max_rest);

        /* Values: per-token scale varies. */
        double rms_min = INFINITY, rms_max = 0.0;
        for (size_t t = 0; t < tokens; t++) {
            double sum = 0.0;
            for (size_t c = 0; c < dim; c++)
                sum += (double)vh[t * dim + c] * vh[t * dim + c];
            double rms = sqrt(sum / (double)dim);
            rms_min = fmin(rms_min, rms);
            rms_max = fmax(rms_max, rms);
        }
        ck_assert_msg(rms_max > 2.0 * rms_min, "seed %llu head %d: value rms %g..%g",
                      (unsigned long long)seed, h, rms_min, rms_max);
    }
    free(mean_abs);
    free(k);
    free(v);
}

START_TEST(synth_has_the_features)
{
    static const int head_dims[] = {64, 96, 128, 256};
    for (uint64_t seed = 1; seed <= 4; seed++)
        for (size_t i = 0; i < sizeof head_dims / sizeof *head_dims; i++) {
            clkvq_shape s = {4, 512, head_dims[i]};
            check_synth_features(seed, &s);
        }
}
END_TEST

START_TEST(synth_odd_shapes_finite)
{
    /* No shape restriction beyond positive sizes; an odd head_dim leaves its
     * last channel unrotated. */
    static const clkvq_shape shapes[] = {{1, 1, 1}, {3, 5, 33}, {1, 2, 2}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
        size_t n = n_elements(&shapes[i]);
        float *k = alloc_floats(n), *v = alloc_floats(n);
        ck_assert_int_eq(clkvq_synth_kv(i, &shapes[i], k, v), CLKVQ_OK);
        ck_assert(all_in_fp16_range(k, n) && all_in_fp16_range(v, n));
        free(k);
        free(v);
    }
}
END_TEST

START_TEST(synth_bad_args)
{
    float buf[64];
    clkvq_shape ok = {1, 2, 32}, zero_heads = {0, 2, 32}, neg_tokens = {1, -2, 32},
                zero_dim = {1, 2, 0};
    EXPECT_FAIL(clkvq_synth_kv(1, NULL, buf, NULL), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_synth_kv(1, &zero_heads, buf, NULL), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_synth_kv(1, &neg_tokens, buf, NULL), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_synth_kv(1, &zero_dim, buf, NULL), CLKVQ_ERR_INVALID_ARG);
    EXPECT_FAIL(clkvq_synth_kv(1, &ok, NULL, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_synth_kv(1, &ok, NULL, buf), CLKVQ_OK);
    ck_assert_str_eq(clkvq_last_error(NULL), "");
}
END_TEST


/* ------------------------------------------------------------ a layer */

#define LH 2    /* kv heads */
#define LT 133  /* tokens: 5 sinks + 128, so 4 whole blocks of 32 */
#define LD 64   /* head_dim */

/* Keys and values with per-channel offsets (what centering removes), a
 * heavy-tailed channel and a huge first token (a sink the fits must not
 * see). */
static void layer_data(uint64_t seed, float *k, float *v)
{
    clkvq_shape s = {LH, LT, LD};
    ck_assert_int_eq(clkvq_synth_kv(seed, &s, k, v), CLKVQ_OK);
    for (int h = 0; h < LH; h++)
        for (int t = 0; t < LT; t++)
            for (int c = 0; c < LD; c++) {
                size_t i = ((size_t)h * LT + t) * LD + c;
                v[i] += (float)(c % 7) - 3.0f;
                if (t == 0)
                    k[i] = v[i] = 3000.0f * (float)((c % 3) - 1);
            }
}

/* tokens [first, LT) of x, centered by mean (may be NULL) and rotated as
 * the cache stores them: the expectation the fits are checked against */
static float *stored(const float *x, const float *mean, int rotate, uint32_t seed, int first)
{
    int n = LT - first;
    float *y = alloc_floats((size_t)LH * n * LD);
    for (int h = 0; h < LH; h++)
        for (int t = 0; t < n; t++) {
            float *o = y + ((size_t)h * n + t) * LD;
            for (int c = 0; c < LD; c++)
                o[c] = x[((size_t)h * LT + first + t) * LD + c] -
                       (mean ? mean[(size_t)h * LD + c] : 0.0f);
            if (rotate)
                kvq_rotate(o, LD, seed, h);
        }
    return y;
}

/* Whether alpha is a point of the grid lo + i * step (as the search forms it). */
static int on_grid(float alpha, double lo, double hi, double step)
{
    for (int i = 0; lo + i * step <= hi + 1e-6; i++)
        if (alpha == (float)fmin(lo + i * step, hi))
            return 1;
    return 0;
}

static clkvq_layer_config skvq_layer(clkvq_format fk, clkvq_format fv)
{
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc.format_k = fk;
    lc.format_v = fv;
    lc.group_size = 32;
    lc.n_sink = 5;
    return lc;
}

/* Means over the tokens after the sinks, exactly (double sums), and the
 * clips fitted on the centered, rotated rows: the same alpha that
 * clkvq_calibrate_clip finds there, a point of the wide default grid. */
START_TEST(layer_means_exact_clips_on_rotated_centered_rows)
{
    float *k = alloc_floats((size_t)LH * LT * LD), *v = alloc_floats((size_t)LH * LT * LD);
    layer_data(3, k, v);
    clkvq_layer_config in = skvq_layer(CLKVQ_FMT_Q3, CLKVQ_FMT_Q2);
    in.rotate = 1;
    in.rot_seed = 17;
    in.param_type = CLKVQ_PARAM_FP8_E4M3;
    float mean_k[LH * LD], mean_v[LH * LD];
    clkvq_calib_options opt = {.fit = CLKVQ_FIT_CLIP | CLKVQ_FIT_MEAN, .mean_k = mean_k,
                               .mean_v = mean_v};
    clkvq_layer_config out;
    clkvq_status st = clkvq_calibrate_layer(NULL, &in, LH, LT, LD, k, v, &opt, &out);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    ck_assert_ptr_eq(out.mean_k, mean_k);
    ck_assert_ptr_eq(out.mean_v, mean_v);
    ck_assert_ptr_null(out.perm_k);
    ck_assert_int_eq(out.rotate, 1);
    ck_assert_uint_eq(out.rot_seed, 17);
    int bad_mean = 0;
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < LH; h++)
            for (int c = 0; c < LD; c++) {
                double sum = 0.0;
                for (int t = 5; t < LT; t++)
                    sum += (i ? v : k)[((size_t)h * LT + t) * LD + c];
                float want = (float)(sum / (LT - 5));
                bad_mean += (i ? mean_v : mean_k)[h * LD + c] != want;
            }
    ck_assert_msg(bad_mean == 0, "%d means differ from the double mean after the sinks", bad_mean);

    for (int i = 0; i < 2; i++) {
        float *y = stored(i ? v : k, i ? mean_v : mean_k, 1, 17, 5);
        clkvq_quant_params qp = clkvq_quant_params_default();
        qp.format = i ? CLKVQ_FMT_Q2 : CLKVQ_FMT_Q3;
        qp.param_type = CLKVQ_PARAM_FP8_E4M3;
        clkvq_shape s = {LH, LT - 5, LD};
        float alpha;
        double mse;
        ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &s, y, NULL, 0.40f, 1.00f, 0.02f,
                                              &alpha, &mse),
                         CLKVQ_OK);
        float got = i ? out.clip_v : out.clip_k;
        ck_assert_msg(got == alpha && on_grid(got, 0.40, 1.00, 0.02),
                      "clip_%c %.9g, expected %.9g (on the grid 0.40..1.00 step 0.02)",
                      i ? 'v' : 'k', (double)got, (double)alpha);
        free(y);
    }
    /* 2-bit values: the optimum is well inside the wide grid, below the
     * old 0.80 edge */
    ck_assert_msg(out.clip_v < 0.80f, "clip_v %.3g", (double)out.clip_v);
    free(k);
    free(v);
}
END_TEST

/* Per-channel keys (skvq key_axis channel): the key clip sees whole blocks
 * of 32 tokens after the sinks, per channel, as the cache packs them; a
 * key permutation is not fitted (it changes nothing there), the value one
 * is, on the centered rows; an explicit grid is used as given. */
START_TEST(layer_channel_keys_and_perms)
{
    float *k = alloc_floats((size_t)LH * LT * LD), *v = alloc_floats((size_t)LH * LT * LD);
    layer_data(4, k, v);
    /* 100 tokens after the sinks: 3 whole blocks of 32 */
    const int T = 105;
    float *k2 = alloc_floats((size_t)LH * T * LD), *v2 = alloc_floats((size_t)LH * T * LD);
    for (int h = 0; h < LH; h++) {
        memcpy(k2 + (size_t)h * T * LD, k + (size_t)h * LT * LD, sizeof(float) * T * LD);
        memcpy(v2 + (size_t)h * T * LD, v + (size_t)h * LT * LD, sizeof(float) * T * LD);
    }
    clkvq_layer_config in = skvq_layer(CLKVQ_FMT_Q2, CLKVQ_FMT_Q4);
    in.key_axis = CLKVQ_AXIS_CHANNEL;
    float mean_v[LH * LD];
    int32_t perm_k[LH * LD], perm_v[LH * LD];
    perm_k[0] = -7;
    clkvq_calib_options opt = {.fit = CLKVQ_FIT_CLIP | CLKVQ_FIT_MEAN_V | CLKVQ_FIT_PERM,
                               .clip_lo = 0.5f, .clip_hi = 1.0f, .clip_step = 0.05f,
                               .mean_v = mean_v, .perm_k = perm_k, .perm_v = perm_v};
    clkvq_layer_config out;
    clkvq_status st = clkvq_calibrate_layer(NULL, &in, LH, T, LD, k2, v2, &opt, &out);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    ck_assert_msg(!out.perm_k && perm_k[0] == -7 && out.perm_v == perm_v && !out.mean_k &&
                      out.mean_v == mean_v,
                  "perm_k %p, perm_v %p", (const void *)out.perm_k, (const void *)out.perm_v);

    /* keys: raw, the first 96 tokens after the sinks, channel groups of 32 */
    float *yk = alloc_floats((size_t)LH * 96 * LD);
    for (int h = 0; h < LH; h++)
        memcpy(yk + (size_t)h * 96 * LD, k2 + ((size_t)h * T + 5) * LD, sizeof(float) * 96 * LD);
    clkvq_quant_params qp = clkvq_quant_params_default();
    qp.format = CLKVQ_FMT_Q2;
    qp.axis = CLKVQ_AXIS_CHANNEL;
    clkvq_shape sk = {LH, 96, LD};
    float alpha;
    double mse;
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &sk, yk, NULL, 0.5f, 1.0f, 0.05f, &alpha, &mse),
                     CLKVQ_OK);
    ck_assert_msg(out.clip_k == alpha, "clip_k %.9g, expected %.9g", (double)out.clip_k,
                  (double)alpha);

    /* values: centered, permuted by the perm fitted on the centered rows */
    float *yv = alloc_floats((size_t)LH * (T - 5) * LD);
    for (int h = 0; h < LH; h++)
        for (int t = 0; t < T - 5; t++)
            for (int c = 0; c < LD; c++)
                yv[((size_t)h * (T - 5) + t) * LD + c] =
                    v2[((size_t)h * T + 5 + t) * LD + c] - mean_v[h * LD + c];
    clkvq_shape sv = {LH, T - 5, LD};
    int32_t want_perm[LH * LD];
    ck_assert_int_eq(clkvq_calibrate_permutation(NULL, &sv, yv, 32, want_perm), CLKVQ_OK);
    ck_assert_msg(!memcmp(want_perm, perm_v, sizeof want_perm), "perm_v differs");
    qp.format = CLKVQ_FMT_Q4;
    qp.axis = CLKVQ_AXIS_TOKEN;
    ck_assert_int_eq(clkvq_calibrate_clip(NULL, &qp, &sv, yv, want_perm, 0.5f, 1.0f, 0.05f, &alpha,
                                          &mse),
                     CLKVQ_OK);
    ck_assert_msg(out.clip_v == alpha && on_grid(out.clip_v, 0.5, 1.0, 0.05),
                  "clip_v %.9g, expected %.9g", (double)out.clip_v, (double)alpha);
    free(yk);
    free(yv);
    free(k);
    free(v);
    free(k2);
    free(v2);
}
END_TEST

/* Bad input: a clear status naming the problem, and out and the storage
 * untouched. NaN in a sink is fine (never fitted on). */
START_TEST(layer_bad_args)
{
    float *k = alloc_floats((size_t)LH * LT * LD), *v = alloc_floats((size_t)LH * LT * LD);
    layer_data(5, k, v);
    float mean[LH * LD];
    for (int i = 0; i < LH * LD; i++)
        mean[i] = 123.0f;
    clkvq_layer_config in = skvq_layer(CLKVQ_FMT_Q2, CLKVQ_FMT_Q2), out, sentinel;
    memset(&sentinel, 0x5a, sizeof sentinel);
    struct {
        const char *what;
        clkvq_layer_config lc;
        int tokens;
        clkvq_calib_options opt;
        int nan_at; /* token of k set to NaN, or -1 */
        clkvq_status status;
        const char *needle;
    } cases[] = {
        {"mean storage", in, LT, {.fit = CLKVQ_FIT_MEAN_K}, -1, CLKVQ_ERR_INVALID_ARG,
         "options->mean_k"},
        {"perm storage", in, LT, {.fit = CLKVQ_FIT_PERM_V, .mean_k = mean}, -1,
         CLKVQ_ERR_INVALID_ARG, "options->perm_v"},
        {"unknown flag", in, LT, {.fit = 1u << 9}, -1, CLKVQ_ERR_INVALID_ARG, "unknown flags"},
        {"bad grid", in, LT, {.fit = CLKVQ_FIT_CLIP, .clip_lo = 0.9f, .clip_hi = 0.5f,
         .clip_step = 0.1f}, -1, CLKVQ_ERR_INVALID_ARG, "clip grid"},
        {"only sinks", in, 5, {.fit = CLKVQ_FIT_CLIP}, -1, CLKVQ_ERR_INVALID_ARG,
         "within the 5 sinks"},
        {"NaN after the sinks", in, LT, {.fit = CLKVQ_FIT_MEAN_K, .mean_k = mean}, 40,
         CLKVQ_ERR_NONFINITE, "k[head 0][token 40]"},
        {"group vs head_dim", in, LT, {.fit = CLKVQ_FIT_CLIP}, -1, CLKVQ_ERR_INVALID_ARG,
         "clip_k"},
        {"fp16", clkvq_layer_config_default(CLKVQ_SCHEME_FP16), LT, {.fit = CLKVQ_FIT_CLIP}, -1,
         CLKVQ_ERR_INVALID_ARG, "fp16"},
        {"short channel blocks", in, 30, {.fit = CLKVQ_FIT_CLIP_K}, -1, CLKVQ_ERR_INVALID_ARG,
         "whole blocks"},
    };
    cases[6].lc.group_size = 128; /* does not divide head_dim 64 */
    cases[8].lc.key_axis = CLKVQ_AXIS_CHANNEL;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (cases[i].nan_at >= 0)
            k[(size_t)cases[i].nan_at * LD] = NAN;
        out = sentinel;
        clkvq_status st = clkvq_calibrate_layer(NULL, &cases[i].lc, LH, cases[i].tokens, LD, k, v,
                                                &cases[i].opt, &out);
        const char *msg = clkvq_last_error(NULL);
        ck_assert_msg(st == cases[i].status && strstr(msg, cases[i].needle) &&
                          !memcmp(&out, &sentinel, sizeof out) && mean[0] == 123.0f,
                      "%s: %s: %s", cases[i].what, clkvq_status_string(st), msg);
        if (cases[i].nan_at >= 0)
            k[(size_t)cases[i].nan_at * LD] = 0.0f;
    }
    ck_assert_int_eq(clkvq_calibrate_layer(NULL, NULL, LH, LT, LD, k, v, &cases[0].opt, &out),
                     CLKVQ_ERR_INVALID_ARG);
    /* a NaN in a sink is never fitted on */
    k[3] = NAN;
    clkvq_calib_options opt = {.fit = CLKVQ_FIT_MEAN_K | CLKVQ_FIT_CLIP, .mean_k = mean};
    clkvq_status st = clkvq_calibrate_layer(NULL, &in, LH, LT, LD, k, v, &opt, &out);
    ck_assert_msg(st == CLKVQ_OK && isfinite(mean[3]), "%s", clkvq_last_error(NULL));
    free(k);
    free(v);
}
END_TEST

static Suite *calibrate_suite(void)
{
    Suite *suite = suite_create("calibrate");
    TCase *perm = tcase_create("permutation");
    tcase_add_test(perm, perm_is_permutation_and_sorted_by_group);
    tcase_add_test(perm, perm_groups_planted_ranges);
    tcase_add_test(perm, perm_deterministic);
    tcase_add_test(perm, perm_bad_args);
    suite_add_tcase(suite, perm);

    TCase *clip = tcase_create("clip");
    tcase_set_timeout(clip, 600);
    tcase_add_test(clip, clip_beats_no_clip_on_heavy_tails);
    tcase_add_test(clip, clip_grid_includes_hi_and_identity_perm);
    tcase_add_test(clip, clip_with_calibrated_perm_on_synth_keys);
    tcase_add_test(clip, clip_bad_args);
    suite_add_tcase(suite, clip);

    TCase *layer = tcase_create("layer");
    tcase_set_timeout(layer, 600);
    tcase_add_test(layer, layer_means_exact_clips_on_rotated_centered_rows);
    tcase_add_test(layer, layer_channel_keys_and_perms);
    tcase_add_test(layer, layer_bad_args);
    suite_add_tcase(suite, layer);

    TCase *synth = tcase_create("synth");
    tcase_set_timeout(synth, 600);
    tcase_add_test(synth, synth_deterministic_and_seeded);
    tcase_add_test(synth, synth_has_the_features);
    tcase_add_test(synth, synth_odd_shapes_finite);
    tcase_add_test(synth, synth_bad_args);
    suite_add_tcase(suite, synth);
    return suite;
}

int main(void) { return test_run_suite(calibrate_suite()); }

/* Quantize/dequantize kernels against the C reference: bit-exact codes and
 * params, round-trip bounds, adversarial data, rejected input, bad args. */
#include "quant_format.h"
#include "reference.h"
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    size_t code_bytes, params_bytes;
    uint8_t *codes, *params, *ref_codes, *ref_params;
    float *deq, *ref_deq;
} run_result;

static void free_result(run_result *r)
{
    free(r->codes);
    free(r->params);
    free(r->ref_codes);
    free(r->ref_params);
    free(r->deq);
    free(r->ref_deq);
}

/* Quantizes x through the device and the reference; asserts both agree
 * byte for byte, and dequantizations agree bit for bit. */
static run_result run_both(const clkvq_quant_params *qp, const clkvq_shape *shape,
                           const float *x, const int32_t *perm, const char *label)
{
    clkvq_context *ctx = test_ctx();
    clkvq_quant_layout layout;
    ck_assert_int_eq(clkvq_quant_layout_get(qp, shape, &layout), CLKVQ_OK);
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    run_result r = {layout.code_bytes, layout.params_bytes,
                    malloc(layout.code_bytes), malloc(layout.params_bytes),
                    malloc(layout.code_bytes), malloc(layout.params_bytes),
                    malloc(n * sizeof(float)), malloc(n * sizeof(float))};
    clkvq_status st = clkvq_quantize_host(ctx, qp, shape, x, perm, r.codes, r.code_bytes,
                                          r.params, r.params_bytes);
    ck_assert_msg(st == CLKVQ_OK, "%s: %s: %s", label, clkvq_status_string(st),
                  clkvq_last_error(ctx));
    ck_assert_int_eq(clkvq_ref_quantize(qp, shape, x, perm, r.ref_codes, r.ref_params), CLKVQ_OK);
    /* Check's passing asserts are costly: find the first difference, assert once */
    size_t i = 0;
    while (i < r.params_bytes && r.params[i] == r.ref_params[i])
        i++;
    ck_assert_msg(i == r.params_bytes, "%s: param byte %zu: kernel %02x ref %02x", label, i,
                  i < r.params_bytes ? r.params[i] : 0, i < r.params_bytes ? r.ref_params[i] : 0);
    i = 0;
    while (i < r.code_bytes && r.codes[i] == r.ref_codes[i])
        i++;
    ck_assert_msg(i == r.code_bytes, "%s: code byte %zu: kernel %02x ref %02x", label, i,
                  i < r.code_bytes ? r.codes[i] : 0, i < r.code_bytes ? r.ref_codes[i] : 0);
    st = clkvq_dequantize_host(ctx, qp, shape, r.codes, r.params, perm, r.deq);
    ck_assert_msg(st == CLKVQ_OK, "%s: dequantize: %s", label, clkvq_last_error(ctx));
    clkvq_ref_dequantize(qp, shape, r.ref_codes, r.ref_params, perm, r.ref_deq);
    ck_assert_msg(memcmp(r.deq, r.ref_deq, n * sizeof(float)) == 0, "%s: dequantized differ",
                  label);
    return r;
}

/* Gaussian data with outlier channels (like keys) and a loud first token. */
static float *kv_like(uint64_t seed, const clkvq_shape *shape)
{
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    float *x = malloc(n * sizeof(float));
    test_fill_normal(seed, x, n, 1.0f);
    for (int h = 0; h < shape->n_heads; h++)
        for (int t = 0; t < shape->n_tokens; t++) {
            float *row = x + ((size_t)h * shape->n_tokens + t) * shape->head_dim;
            row[(3 + 5 * h) % shape->head_dim] *= 25.0f;
            row[(17 + h) % shape->head_dim] += 8.0f;
            if (t == 0)
                row[1] *= 60.0f;
        }
    return x;
}

/* The parameter-storage variants the matrix runs; each is one program. */
typedef struct {
    clkvq_param_type param_type;
    clkvq_zero_mode zero_mode;
} variant;

static const variant g_variants[] = {
    {CLKVQ_PARAM_FP16, CLKVQ_ZERO_FLOAT},
    {CLKVQ_PARAM_FP8_E4M3, CLKVQ_ZERO_FLOAT},
    {CLKVQ_PARAM_FP16, CLKVQ_ZERO_INT},
};

/* Every format x axis x group {32,64,128} x head_dim {64,96,128,256} x
 * reorder x clip, with fp16/float params; the other parameter variants on
 * a diagonal of the same space, to keep the number of programs small. */
START_TEST(kernel_matches_reference_matrix)
{
    const int groups[] = {32, 64, 128};
    const int dims[] = {64, 96, 128, 256};
    int cases = 0;
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++)
        for (int axis = 0; axis < 2; axis++)
            for (int gi = 0; gi < 3; gi++)
                for (int di = 0; di < 4; di++)
                    for (int reorder = 0; reorder < 2; reorder++)
                        for (int clip = 0; clip < 2; clip++) {
                            clkvq_quant_params qp = clkvq_quant_params_default();
                            qp.format = (clkvq_format)f;
                            qp.axis = (clkvq_axis)axis;
                            qp.group_size = groups[gi];
                            qp.clip_alpha = clip ? 0.9f : 1.0f;
                            const variant *v = &g_variants[(f + gi + di + reorder) % 3];
                            if (f == CLKVQ_FMT_Q8 && v->param_type == CLKVQ_PARAM_FP8_E4M3 &&
                                v->zero_mode == CLKVQ_ZERO_INT)
                                v = &g_variants[0];
                            if ((gi + di) % 2 == 0) {
                                qp.param_type = v->param_type;
                                qp.zero_mode = v->zero_mode;
                            }
                            /* 37 tokens: not a multiple of any group */
                            clkvq_shape shape = {2, 37, dims[di]};
                            if (clkvq_quant_params_validate(NULL, &qp, &shape) != CLKVQ_OK)
                                continue;
                            float *x = kv_like((uint64_t)(f * 1000 + gi * 100 + di * 10 + axis),
                                               &shape);
                            int32_t *perm = reorder ? test_random_perm(99 + di, 2, dims[di]) : NULL;
                            char label[160];
                            snprintf(label, sizeof label,
                                     "%s axis=%d g=%d d=%d reorder=%d alpha=%.2f fp8=%d int=%d",
                                     clkvq_format_get(qp.format)->name, axis, qp.group_size,
                                     dims[di], reorder, (double)qp.clip_alpha, qp.param_type,
                                     qp.zero_mode);
                            run_result r = run_both(&qp, &shape, x, perm, label);
                            free_result(&r);
                            free(x);
                            free(perm);
                            cases++;
                        }
    ck_assert_int_gt(cases, 150);
}
END_TEST

/* |x - dequant(quant(x))| <= scale/2 (+ fp32 rounding) for x inside the
 * range the stored params can represent. */
static void check_round_trip(const clkvq_quant_params *qp, const clkvq_shape *shape,
                             const float *x, const run_result *r)
{
    int levels = clkvq_format_get(qp->format)->levels;
    size_t pb = clkvq_param_bytes(qp->param_type);
    int dim = shape->head_dim, tokens = shape->n_tokens, g = qp->group_size;
    int inside = 0, bad = 0;
    for (int h = 0; h < shape->n_heads; h++)
        for (int t = 0; t < tokens; t++)
            for (int c = 0; c < dim; c++) {
                size_t gi = qp->axis == CLKVQ_AXIS_TOKEN
                                ? ((size_t)h * tokens + t) * (dim / g) + c / g
                                : ((size_t)h * ((tokens + g - 1) / g) + t / g) * dim + c;
                float scale, zero;
                clkvq_ref_decode_params(qp, r->params + gi * pb, &scale, &zero);
                float lo = qp->zero_mode == CLKVQ_ZERO_FLOAT ? zero : -zero * scale;
                float hi = lo + (float)(levels - 1) * scale;
                size_t i = ((size_t)h * tokens + t) * dim + c;
                if (x[i] < lo || x[i] > hi)
                    continue;
                inside++;
                float err = fabsf(x[i] - r->deq[i]);
                if (!(err <= scale * 0.5f * (1.0f + 1e-5f) + 1e-6f * fabsf(x[i])) && !bad++)
                    ck_abort_msg("x=%g deq=%g scale=%g", (double)x[i], (double)r->deq[i],
                                 (double)scale);
            }
    ck_assert_int_eq(bad, 0);
    ck_assert_int_gt(inside, 0);
}

START_TEST(round_trip_error_bound)
{
    clkvq_shape shape = {2, 70, 128};
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++)
        for (int axis = 0; axis < 2; axis++)
            for (int v = 0; v < 3; v++) {
                clkvq_quant_params qp = clkvq_quant_params_default();
                qp.format = (clkvq_format)f;
                qp.axis = (clkvq_axis)axis;
                qp.clip_alpha = 0.95f;
                qp.param_type = g_variants[v].param_type;
                qp.zero_mode = g_variants[v].zero_mode;
                float *x = kv_like(500 + f, &shape);
                if (qp.param_type == CLKVQ_PARAM_FP8_E4M3) /* e4m3 holds +-448 */
                    for (size_t i = 0; i < (size_t)2 * 70 * 128; i++)
                        x[i] = fmaxf(fminf(x[i], 400.0f), -400.0f);
                run_result r = run_both(&qp, &shape, x, NULL, "round trip");
                check_round_trip(&qp, &shape, x, &r);
                free_result(&r);
                free(x);
            }
}
END_TEST

static void run_adversarial(float *x, const clkvq_shape *shape, const char *label)
{
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++)
        for (int axis = 0; axis < 2; axis++) {
            clkvq_quant_params qp = clkvq_quant_params_default();
            qp.format = (clkvq_format)f;
            qp.axis = (clkvq_axis)axis;
            qp.clip_alpha = axis ? 1.0f : 0.9f;
            run_result r = run_both(&qp, shape, x, NULL, label);
            if (qp.clip_alpha == 1.0f) {
                /* without clipping every value is inside its group's range */
                size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
                size_t finite = 0;
                for (size_t i = 0; i < n; i++)
                    finite += isfinite(r.deq[i]) != 0;
                ck_assert_uint_eq(finite, n);
                check_round_trip(&qp, shape, x, &r);
            }
            free_result(&r);
        }
}

START_TEST(adversarial_constant_groups)
{
    clkvq_shape shape = {1, 64, 64};
    float *x = malloc(sizeof(float) * 64 * 64);
    for (int i = 0; i < 64 * 64; i++)
        x[i] = (i / 32) % 3 == 0 ? 3.7f : (i / 32) % 3 == 1 ? 0.0f : -1234.5f;
    run_adversarial(x, &shape, "constant");
    /* a constant group comes back within fp16 rounding of its value */
    clkvq_quant_params qp = clkvq_quant_params_default();
    run_result r = run_both(&qp, &shape, x, NULL, "constant q4");
    int far = 0;
    for (int i = 0; i < 64 * 64; i++)
        far += !(fabsf(r.deq[i] - x[i]) <= fabsf(x[i]) * 1e-3f + 1e-5f);
    ck_assert_int_eq(far, 0);
    free_result(&r);
    free(x);
}
END_TEST

START_TEST(adversarial_outliers_negative_denormal)
{
    clkvq_shape shape = {2, 45, 96};
    size_t n = (size_t)2 * 45 * 96;
    float *x = malloc(n * sizeof(float));
    test_fill_normal(3, x, n, 1.0f);
    for (size_t i = 0; i < n; i += 32) /* one huge outlier per group */
        x[i + (i / 32) % 32] = (i / 32) % 2 ? 30000.0f : -30000.0f;
    run_adversarial(x, &shape, "outlier");
    for (size_t i = 0; i < n; i++) /* all negative */
        x[i] = -5.0f - fabsf(x[i]);
    run_adversarial(x, &shape, "negative");
    test_fill_normal(4, x, n, 1e-39f); /* fp32 denormals */
    run_adversarial(x, &shape, "denormal");
    test_fill_normal(5, x, n, 65000.0f / 5.0f); /* near the fp16 edge */
    for (size_t i = 0; i < n; i++)
        x[i] = fmaxf(fminf(x[i], 65504.0f), -65504.0f);
    x[7] = 65504.0f;
    x[8] = -65504.0f;
    run_adversarial(x, &shape, "fp16 edge");
    free(x);
}
END_TEST

/* Bad values are rejected before a byte of output is written. */
START_TEST(nonfinite_input_rejected_nothing_written)
{
    clkvq_context *ctx = test_ctx();
    cl_context clc = clkvq_context_cl_context(ctx);
    cl_command_queue q = clkvq_context_cl_queue(ctx);
    clkvq_shape shape = {2, 33, 64};
    size_t n = (size_t)2 * 33 * 64;
    const float bad_values[] = {NAN, INFINITY, -INFINITY, 70000.0f, -65505.0f};
    for (int axis = 0; axis < 2; axis++)
        for (size_t b = 0; b < sizeof bad_values / sizeof bad_values[0]; b++) {
            clkvq_quant_params qp = clkvq_quant_params_default();
            qp.axis = (clkvq_axis)axis;
            clkvq_quant_layout layout;
            ck_assert_int_eq(clkvq_quant_layout_get(&qp, &shape, &layout), CLKVQ_OK);
            float *x = malloc(n * sizeof(float));
            test_fill_normal(8, x, n, 1.0f);
            size_t where = 1000 + 77 * b;
            x[where] = bad_values[b];
            cl_int err;
            cl_mem xm = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, n * sizeof(float), x, &err);
            uint8_t *pattern = malloc(layout.code_bytes + layout.params_bytes);
            memset(pattern, 0xab, layout.code_bytes + layout.params_bytes);
            cl_mem cm = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, layout.code_bytes, pattern, &err);
            cl_mem pm = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, layout.params_bytes, pattern, &err);
            clkvq_status st = clkvq_quantize(ctx, &qp, &shape, xm, NULL, cm, pm);
            ck_assert_int_eq(st, CLKVQ_ERR_NONFINITE);
            char expect[32];
            snprintf(expect, sizeof expect, "element %zu", where);
            ck_assert_msg(strstr(clkvq_last_error(ctx), expect), "message: %s",
                          clkvq_last_error(ctx));
            uint8_t *back = malloc(layout.code_bytes + layout.params_bytes);
            clEnqueueReadBuffer(q, cm, CL_TRUE, 0, layout.code_bytes, back, 0, NULL, NULL);
            clEnqueueReadBuffer(q, pm, CL_TRUE, 0, layout.params_bytes, back + layout.code_bytes,
                                0, NULL, NULL);
            ck_assert(memcmp(back, pattern, layout.code_bytes + layout.params_bytes) == 0);
            /* the reference agrees */
            ck_assert_int_eq(clkvq_ref_quantize(&qp, &shape, x, NULL, back, back),
                             CLKVQ_ERR_NONFINITE);
            clReleaseMemObject(xm);
            clReleaseMemObject(cm);
            clReleaseMemObject(pm);
            free(x);
            free(pattern);
            free(back);
        }
}
END_TEST

START_TEST(bad_arguments)
{
    clkvq_context *ctx = test_ctx();
    cl_context clc = clkvq_context_cl_context(ctx);
    clkvq_quant_params qp = clkvq_quant_params_default();
    clkvq_shape shape = {2, 40, 64};
    size_t n = (size_t)2 * 40 * 64;
    clkvq_quant_layout layout;
    ck_assert_int_eq(clkvq_quant_layout_get(&qp, &shape, &layout), CLKVQ_OK);
    float *x = calloc(n, sizeof(float));
    uint8_t *codes = malloc(layout.code_bytes), *params = malloc(layout.params_bytes);
    cl_int err;
    cl_mem xm = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, n * sizeof(float), x, &err);
    cl_mem cm = clCreateBuffer(clc, 0, layout.code_bytes, NULL, &err);
    cl_mem pm = clCreateBuffer(clc, 0, layout.params_bytes, NULL, &err);
    cl_mem small = clCreateBuffer(clc, 0, 16, NULL, &err);

    ck_assert_int_eq(clkvq_quantize(NULL, &qp, &shape, xm, NULL, cm, pm), CLKVQ_ERR_INVALID_ARG);
    ck_assert_str_ne(clkvq_last_error(NULL), "");
    ck_assert_int_eq(clkvq_quantize(ctx, NULL, &shape, xm, NULL, cm, pm), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_quantize(ctx, &qp, NULL, xm, NULL, cm, pm), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_quantize(ctx, &qp, &shape, NULL, NULL, cm, pm), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "x buffer"));

    clkvq_quant_params bad = qp;
    bad.format = (clkvq_format)12;
    ck_assert_int_eq(clkvq_quantize(ctx, &bad, &shape, xm, NULL, cm, pm), CLKVQ_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "not in the table"));
    bad = qp;
    bad.group_size = 128; /* does not divide head_dim 64 */
    ck_assert_int_eq(clkvq_quantize(ctx, &bad, &shape, xm, NULL, cm, pm), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "does not divide"));

    ck_assert_int_eq(clkvq_quantize(ctx, &qp, &shape, xm, NULL, small, pm),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "codes"));
    ck_assert_int_eq(clkvq_quantize(ctx, &qp, &shape, xm, NULL, cm, small),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(clkvq_quantize(ctx, &qp, &shape, small, NULL, cm, pm),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(clkvq_quantize_host(ctx, &qp, &shape, x, NULL, codes, 3, params,
                                         layout.params_bytes),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);

    /* a duplicate entry, and an entry out of range */
    int32_t *perm = test_random_perm(1, 2, 64);
    perm[64 + 5] = perm[64 + 6];
    ck_assert_int_eq(clkvq_quantize_host(ctx, &qp, &shape, x, perm, codes, layout.code_bytes,
                                         params, layout.params_bytes),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "not a permutation"));
    free(perm);
    perm = test_random_perm(1, 2, 64);
    perm[3] = 64;
    ck_assert_int_eq(clkvq_quantize_host(ctx, &qp, &shape, x, perm, codes, layout.code_bytes,
                                         params, layout.params_bytes),
                     CLKVQ_ERR_INVALID_ARG);
    free(perm);
    ck_assert_int_eq(clkvq_quantize(ctx, &qp, &shape, xm, small, cm, pm),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(clkvq_dequantize(ctx, &qp, &shape, cm, pm, NULL, small),
                     CLKVQ_ERR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(clkvq_dequantize_host(ctx, &qp, &shape, NULL, params, NULL, x),
                     CLKVQ_ERR_INVALID_ARG);
    clReleaseMemObject(xm);
    clReleaseMemObject(cm);
    clReleaseMemObject(pm);
    clReleaseMemObject(small);
    free(x);
    free(codes);
    free(params);
}
END_TEST

/* Reorder really gathers: quantizing x with perm equals quantizing the
 * explicitly permuted copy without one. */
START_TEST(reorder_equals_explicit_permuted_copy)
{
    clkvq_shape shape = {3, 20, 128};
    size_t n = (size_t)3 * 20 * 128;
    float *x = kv_like(42, &shape), *xp = malloc(n * sizeof(float));
    int32_t *perm = test_random_perm(5, 3, 128);
    for (int h = 0; h < 3; h++)
        for (int t = 0; t < 20; t++)
            for (int c = 0; c < 128; c++)
                xp[((size_t)h * 20 + t) * 128 + c] =
                    x[((size_t)h * 20 + t) * 128 + perm[h * 128 + c]];
    clkvq_quant_params qp = clkvq_quant_params_default();
    run_result a = run_both(&qp, &shape, x, perm, "perm");
    run_result b = run_both(&qp, &shape, xp, NULL, "copy");
    ck_assert(memcmp(a.codes, b.codes, a.code_bytes) == 0);
    ck_assert(memcmp(a.params, b.params, a.params_bytes) == 0);
    /* and dequantization with perm puts channels back where they came from */
    size_t moved_wrong = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (int)(i % 128), row = (int)(i / 128), h = row / 20;
        moved_wrong += a.deq[(size_t)row * 128 + perm[h * 128 + c]] != b.deq[i];
    }
    ck_assert_uint_eq(moved_wrong, 0);
    free_result(&a);
    free_result(&b);
    free(x);
    free(xp);
    free(perm);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("quantize");
    TCase *tc = tcase_create("quantize");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, bad_arguments);
    tcase_add_test(tc, nonfinite_input_rejected_nothing_written);
    tcase_add_test(tc, kernel_matches_reference_matrix);
    tcase_add_test(tc, round_trip_error_bound);
    tcase_add_test(tc, adversarial_constant_groups);
    tcase_add_test(tc, adversarial_outliers_negative_denormal);
    tcase_add_test(tc, reorder_equals_explicit_permuted_copy);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}

/*
 * Offline calibration (SKVQ): the channel permutation that puts channels of
 * similar range into the same quantization group, and the clip ratio alpha
 * that minimizes the reconstruction error. Host only; ctx (may be NULL)
 * only receives the error message.
 */
#include "internal.h"
#include "reference.h"
#include "quant_format.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A grid of more points than this is a typo in the step, not a search. */
#define CLKVQ_CLIP_MAX_GRID_POINTS 100000
/* How far past alpha_hi the last grid point may land and still count as hi. */
#define CLKVQ_CLIP_GRID_SLACK 1e-6

static clkvq_status check_shape(clkvq_context *ctx, const char *fn, const clkvq_shape *shape)
{
    if (!shape)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: shape is NULL", fn);
    if (shape->n_heads <= 0 || shape->n_tokens <= 0 || shape->head_dim <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: shape %d heads x %d tokens x %d head_dim: all must be positive", fn,
                          shape->n_heads, shape->n_tokens, shape->head_dim);
    if ((size_t)shape->n_heads >
        SIZE_MAX / (size_t)shape->n_tokens / (size_t)shape->head_dim / sizeof(double))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %d x %d x %d elements overflow size_t",
                          fn, shape->n_heads, shape->n_tokens, shape->head_dim);
    return CLKVQ_OK;
}

static size_t shape_elements(const clkvq_shape *shape)
{
    return (size_t)shape->n_heads * (size_t)shape->n_tokens * (size_t)shape->head_dim;
}

/* Names the first offending element, so a caller can find the bad token. */
static clkvq_status check_values(clkvq_context *ctx, const char *fn, const clkvq_shape *shape,
                                 const float *x, float max_abs)
{
    size_t n = shape_elements(shape);
    for (size_t i = 0; i < n; i++) {
        if (isfinite(x[i]) && fabsf(x[i]) <= max_abs)
            continue;
        size_t head_dim = (size_t)shape->head_dim, n_tokens = (size_t)shape->n_tokens;
        return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                          "%s: x[head %zu][token %zu][channel %zu] = %g is %s", fn,
                          i / head_dim / n_tokens, i / head_dim % n_tokens, i % head_dim,
                          (double)x[i], isfinite(x[i]) ? "beyond fp16 range (|x| > 65504)"
                                                       : "not finite");
    }
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ permutation */

typedef struct {
    double range;
    int32_t channel;
} channel_range;

/* Total order (range, then channel index): qsort is not stable, but with no
 * two keys equal its result is the same on every libc. */
static int by_range_then_channel(const void *a, const void *b)
{
    const channel_range *x = a, *y = b;
    if (x->range != y->range)
        return x->range < y->range ? -1 : 1;
    return (x->channel > y->channel) - (x->channel < y->channel);
}

static int by_channel(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/*
 * Why sorting and not k-means (SKVQ clusters with k-means): a fused
 * per-head attention kernel needs every group of a head to hold exactly
 * group_size channels, so the clustering is a balanced one. A group's
 * scale is set by the largest range among its members, so what matters is
 * how far the ranges inside a group spread. For a 1-D quantity the
 * equal-size partition with the least within-group spread is made of
 * consecutive runs of the sorted order (if two groups interleave, swapping
 * members so that each holds a contiguous run widens neither), and with equal
 * sizes there is only one such partition: cut the sorted list every
 * group_size. So sorting is what balanced k-means reduces to here, and it
 * is deterministic (no seeds, no iterations to converge) and O(d log d).
 *
 * The range is max - min over the tokens (not max |x|): with asymmetric
 * min/max groups, a channel with a large bias but little spread costs
 * nothing, and it is the spread that a group's step size must cover.
 */
static void permute_head(const float *x, int n_tokens, int head_dim, int group_size,
                         channel_range *ranges, double *lo, double *hi, int32_t *perm)
{
    for (int c = 0; c < head_dim; c++) {
        lo[c] = x[c];
        hi[c] = x[c];
    }
    for (int t = 1; t < n_tokens; t++) {
        const float *row = x + (size_t)t * (size_t)head_dim;
        for (int c = 0; c < head_dim; c++) {
            if (row[c] < lo[c])
                lo[c] = row[c];
            if (row[c] > hi[c])
                hi[c] = row[c];
        }
    }
    for (int c = 0; c < head_dim; c++) {
        /* In double: max - min of two finite floats can overflow float. */
        ranges[c].range = hi[c] - lo[c];
        ranges[c].channel = c;
    }
    qsort(ranges, (size_t)head_dim, sizeof *ranges, by_range_then_channel);
    for (int c = 0; c < head_dim; c++)
        perm[c] = ranges[c].channel;
    /* Order inside a group changes no code or scale; ascending channel
     * indices make each group's gather a monotone walk through the row (and
     * a folded W_k/W_v keep its rows in order within a group). */
    for (int g = 0; g < head_dim; g += group_size)
        qsort(perm + g, (size_t)group_size, sizeof *perm, by_channel);
}

clkvq_status clkvq_calibrate_permutation(clkvq_context *ctx, const clkvq_shape *shape,
                                         const float *x, int group_size, int32_t *perm_out)
{
    static const char fn[] = "clkvq_calibrate_permutation";
    clkvq_clear_error(ctx);
    clkvq_status st = check_shape(ctx, fn, shape);
    if (st != CLKVQ_OK)
        return st;
    if (!x || !perm_out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %s is NULL", fn,
                          !x ? "x" : "perm_out");
    if (group_size <= 0 || shape->head_dim % group_size != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: group_size %d must be positive and divide head_dim %d", fn,
                          group_size, shape->head_dim);
    /* Range only needs finite values; |x| > 65504 is the quantizer's to refuse. */
    st = check_values(ctx, fn, shape, x, INFINITY);
    if (st != CLKVQ_OK)
        return st;

    const int head_dim = shape->head_dim, n_tokens = shape->n_tokens;
    channel_range *ranges = malloc((size_t)head_dim * sizeof *ranges);
    double *lo = malloc((size_t)head_dim * sizeof *lo);
    double *hi = malloc((size_t)head_dim * sizeof *hi);
    if (!ranges || !lo || !hi) {
        free(ranges);
        free(lo);
        free(hi);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: no memory for %d channel ranges",
                          fn, head_dim);
    }
    for (int h = 0; h < shape->n_heads; h++)
        permute_head(x + (size_t)h * (size_t)n_tokens * (size_t)head_dim, n_tokens, head_dim,
                     group_size, ranges, lo, hi, perm_out + (size_t)h * (size_t)head_dim);
    free(ranges);
    free(lo);
    free(hi);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ clip search */

/* Mean squared error of x through quantize + dequantize at qp. */
static clkvq_status reconstruction_mse(clkvq_context *ctx, const clkvq_quant_params *qp,
                                       const clkvq_shape *shape, const float *x,
                                       const int32_t *perm, uint8_t *codes, uint8_t *params,
                                       float *decoded, double *mse)
{
    clkvq_status st = clkvq_ref_quantize(qp, shape, x, perm, codes, params);
    if (st != CLKVQ_OK)
        return clkvq_fail(ctx, st, "clkvq_calibrate_clip: reference quantize at alpha %g: %s",
                          (double)qp->clip_alpha, clkvq_status_string(st));
    /* With perm the channels come back in x's order: compare directly. */
    clkvq_ref_dequantize(qp, shape, codes, params, perm, decoded);
    size_t n = shape_elements(shape);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)decoded[i] - (double)x[i];
        sum += d * d;
    }
    *mse = sum / (double)n;
    return CLKVQ_OK;
}

clkvq_status clkvq_calibrate_clip(clkvq_context *ctx, const clkvq_quant_params *qp,
                                  const clkvq_shape *shape, const float *x,
                                  const int32_t *perm, float alpha_lo, float alpha_hi,
                                  float alpha_step, float *best_alpha, double *best_mse)
{
    static const char fn[] = "clkvq_calibrate_clip";
    clkvq_clear_error(ctx);
    if (!qp || !x || !best_alpha || !best_mse)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %s is NULL", fn,
                          !qp ? "qp" : !x ? "x" : !best_alpha ? "best_alpha" : "best_mse");
    clkvq_status st = check_shape(ctx, fn, shape);
    if (st != CLKVQ_OK)
        return st;
    if (!(alpha_lo > 0.0f && alpha_lo <= alpha_hi && alpha_hi <= 1.0f))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: need 0 < alpha_lo <= alpha_hi <= 1, got [%g, %g]", fn,
                          (double)alpha_lo, (double)alpha_hi);
    if (!(alpha_step > 0.0f) || !isfinite(alpha_step))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: alpha_step %g must be positive", fn,
                          (double)alpha_step);
    double span = (double)alpha_hi - (double)alpha_lo;
    double n_points = floor((span + CLKVQ_CLIP_GRID_SLACK) / (double)alpha_step) + 1.0;
    if (n_points > CLKVQ_CLIP_MAX_GRID_POINTS)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: alpha_step %g gives %.0f grid points over [%g, %g] (max %d)", fn,
                          (double)alpha_step, n_points, (double)alpha_lo, (double)alpha_hi,
                          CLKVQ_CLIP_MAX_GRID_POINTS);

    clkvq_quant_params trial = *qp;
    trial.clip_alpha = alpha_lo; /* qp->clip_alpha is ignored, not validated */
    st = clkvq_quant_params_validate(ctx, &trial, shape);
    if (st != CLKVQ_OK)
        return st;
    if (perm && !clkvq_ref_is_permutation(perm, shape->n_heads, shape->head_dim))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: perm is not a permutation of 0..%d in every head", fn,
                          shape->head_dim - 1);
    st = check_values(ctx, fn, shape, x, CLKVQ_INPUT_MAX);
    if (st != CLKVQ_OK)
        return st;

    clkvq_quant_layout layout;
    st = clkvq_quant_layout_get(&trial, shape, &layout);
    if (st != CLKVQ_OK)
        return clkvq_fail(ctx, st, "%s: %s", fn, clkvq_last_error(NULL));
    uint8_t *codes = malloc(layout.code_bytes ? layout.code_bytes : 1);
    uint8_t *params = malloc(layout.params_bytes ? layout.params_bytes : 1);
    float *decoded = malloc(shape_elements(shape) * sizeof *decoded);
    if (!codes || !params || !decoded) {
        free(codes);
        free(params);
        free(decoded);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                          "%s: no memory for %zu code + %zu param bytes and %zu floats", fn,
                          layout.code_bytes, layout.params_bytes, shape_elements(shape));
    }

    float found_alpha = alpha_lo;
    double found_mse = INFINITY;
    for (int i = 0; i < (int)n_points; i++) {
        /* lo + i*step, not a running sum, so the grid does not drift; the
         * last point may land just past hi by rounding: it is hi. */
        double alpha = (double)alpha_lo + (double)i * (double)alpha_step;
        if (alpha > (double)alpha_hi)
            alpha = (double)alpha_hi;
        trial.clip_alpha = (float)alpha;
        double mse = INFINITY;
        st = reconstruction_mse(ctx, &trial, shape, x, perm, codes, params, decoded, &mse);
        if (st != CLKVQ_OK)
            break;
        /* Strictly smaller: on ties the first (smallest) alpha wins. */
        if (mse < found_mse) {
            found_mse = mse;
            found_alpha = trial.clip_alpha;
        }
    }
    free(codes);
    free(params);
    free(decoded);
    if (st != CLKVQ_OK)
        return st;
    *best_alpha = found_alpha;
    *best_mse = found_mse;
    return CLKVQ_OK;
}

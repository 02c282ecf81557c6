/*
 * Offline calibration: the channel permutation that puts channels of
 * similar range into the same quantization group (SKVQ), the clip ratio
 * alpha that minimizes the reconstruction error, and the per-channel means
 * a layer centers by; clkvq_calibrate_layer fits them together for one
 * layer config. Host only; ctx (may be NULL) only receives the error
 * message.
 */
#include "kv_cache.h"
#include "quant_format.h"
#include "reference.h"

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

/* ------------------------------------------------------------ a layer */

/*
 * clkvq_calibrate_layer: the fits of one layer config, on the tokens the
 * cache will quantize and in the space it stores them in (clkvq_packing.h
 * "transforms": y = P(R(x - mean))). Order: means (raw tokens), then the
 * centered and rotated rows, the permutation on those, the clip under it.
 */

typedef struct {
    clkvq_context *ctx;
    const clkvq_layer_config *in;
    int heads, n_tokens, dim, first; /* first: the first token fitted on (after sinks) */
    float *row;                      /* scratch, one row */
} layer_fit;

static const char g_fit_fn[] = "clkvq_calibrate_layer";

/* Per (head, channel) means of tokens [first, n_tokens), summed in double. */
static clkvq_status fit_means(const layer_fit *lf, const float *x, float *mean)
{
    const int n = lf->n_tokens - lf->first, dim = lf->dim;
    double *sum = calloc((size_t)dim, sizeof *sum);
    if (!sum)
        return clkvq_fail(lf->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: %d channel sums", g_fit_fn, dim);
    for (int h = 0; h < lf->heads; h++) {
        memset(sum, 0, sizeof *sum * (size_t)dim);
        for (int t = lf->first; t < lf->n_tokens; t++) {
            const float *r = x + ((size_t)h * lf->n_tokens + t) * dim;
            for (int c = 0; c < dim; c++)
                sum[c] += r[c];
        }
        for (int c = 0; c < dim; c++)
            mean[(size_t)h * dim + c] = (float)(sum[c] / n);
    }
    free(sum);
    return CLKVQ_OK;
}

/* Tokens [first, n_tokens) of x as stored before the permutation: centered
 * (mean may be NULL), then rotated when the layer rotates. Same float
 * operations in the same order as the cache's transform. */
static void stored_rows(const layer_fit *lf, const float *x, const float *mean, float *y)
{
    const int n = lf->n_tokens - lf->first, dim = lf->dim;
    for (int h = 0; h < lf->heads; h++)
        for (int t = 0; t < n; t++) {
            const float *r = x + ((size_t)h * lf->n_tokens + lf->first + t) * dim;
            float *o = y + ((size_t)h * n + t) * dim;
            for (int c = 0; c < dim; c++)
                o[c] = mean ? r[c] - mean[(size_t)h * dim + c] : r[c];
            if (lf->in->rotate)
                kvq_rotate(o, dim, lf->in->rot_seed, h);
        }
}

/* The clip of one tensor under cfg (its format, axis, group, params and
 * perm) over y ([heads][n][dim], stored space). Per-channel groups see
 * whole blocks of group_size tokens only, as the cache packs them. */
static clkvq_status fit_clip(const layer_fit *lf, const clkvq_layer_config *cfg, int is_v,
                             const float *y, const float grid[3], float *clip)
{
    const int n = lf->n_tokens - lf->first;
    clkvq_quant_params qp = clkvq_layer_quant_params(cfg, is_v);
    const int32_t *perm = is_v ? cfg->perm_v : cfg->perm_k;
    int used = n;
    if (qp.axis == CLKVQ_AXIS_CHANNEL) {
        used = n / qp.group_size * qp.group_size;
        if (used == 0)
            return clkvq_fail(lf->ctx, CLKVQ_ERR_INVALID_ARG,
                              "%s: per-channel keys are fitted on whole blocks of group_size "
                              "%d tokens; only %d calibration tokens after the sinks",
                              g_fit_fn, qp.group_size, n);
    }
    float *data = (float *)y;
    if (used < n) { /* the first `used` tokens of each head, contiguous */
        data = malloc(sizeof(float) * (size_t)lf->heads * used * lf->dim);
        if (!data)
            return clkvq_fail(lf->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: clip data", g_fit_fn);
        for (int h = 0; h < lf->heads; h++)
            memcpy(data + (size_t)h * used * lf->dim, y + (size_t)h * n * lf->dim,
                   sizeof(float) * (size_t)used * lf->dim);
    }
    clkvq_shape shape = {lf->heads, used, lf->dim};
    double mse;
    clkvq_status st = clkvq_calibrate_clip(lf->ctx, &qp, &shape, data, perm, grid[0], grid[1],
                                           grid[2], clip, &mse);
    if (st != CLKVQ_OK) {
        char detail[CLKVQ_MSG_MAX / 2];
        snprintf(detail, sizeof detail, "%s", clkvq_last_error(lf->ctx));
        st = clkvq_fail(lf->ctx, st, "%s: clip_%c: %s", g_fit_fn, is_v ? 'v' : 'k', detail);
    }
    if (data != y)
        free(data);
    return st;
}

/* The fits of one tensor into cfg (means and perms in the scratch arrays
 * mean/perm). */
static clkvq_status fit_tensor(const layer_fit *lf, clkvq_layer_config *cfg, int is_v,
                               const float *x, unsigned fit, const float grid[3], float *mean,
                               int32_t *perm, float *y)
{
    const unsigned f_mean = is_v ? CLKVQ_FIT_MEAN_V : CLKVQ_FIT_MEAN_K;
    const unsigned f_perm = is_v ? CLKVQ_FIT_PERM_V : CLKVQ_FIT_PERM_K;
    const unsigned f_clip = is_v ? CLKVQ_FIT_CLIP_V : CLKVQ_FIT_CLIP_K;
    const float **cfg_mean = is_v ? &cfg->mean_v : &cfg->mean_k;
    const int32_t **cfg_perm = is_v ? &cfg->perm_v : &cfg->perm_k;
    clkvq_status st = CLKVQ_OK;
    if (fit & f_mean) {
        if ((st = fit_means(lf, x, mean)) != CLKVQ_OK)
            return st;
        *cfg_mean = mean;
    }
    if (!(fit & (f_perm | f_clip)))
        return CLKVQ_OK;
    stored_rows(lf, x, *cfg_mean, y);
    if ((fit & f_perm) && clkvq_layer_quant_params(cfg, is_v).axis == CLKVQ_AXIS_TOKEN) {
        clkvq_shape shape = {lf->heads, lf->n_tokens - lf->first, lf->dim};
        st = clkvq_calibrate_permutation(lf->ctx, &shape, y, cfg->group_size, perm);
        if (st != CLKVQ_OK)
            return st;
        *cfg_perm = perm;
    }
    if (fit & f_clip)
        st = fit_clip(lf, cfg, is_v, y, grid, is_v ? &cfg->clip_v : &cfg->clip_k);
    return st;
}

/* The raw tokens fitted on are inputs the cache would take: finite, within
 * fp16 range. */
static clkvq_status check_layer_values(clkvq_context *ctx, const layer_fit *lf, const float *x,
                                       char which)
{
    for (int h = 0; h < lf->heads; h++)
        for (int t = lf->first; t < lf->n_tokens; t++)
            for (int c = 0; c < lf->dim; c++) {
                float v = x[((size_t)h * lf->n_tokens + t) * lf->dim + c];
                if (!(fabsf(v) <= CLKVQ_INPUT_MAX))
                    return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                                      "%s: %c[head %d][token %d][channel %d] = %g is not finite "
                                      "within +-65504",
                                      g_fit_fn, which, h, t, c, (double)v);
            }
    return CLKVQ_OK;
}

static clkvq_status check_fit_args(clkvq_context *ctx, const clkvq_layer_config *in, int heads,
                                   int n_tokens, int dim, const float *k, const float *v,
                                   const clkvq_calib_options *o, clkvq_layer_config *out)
{
    if (!in || !o || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %s is NULL", g_fit_fn,
                          !in ? "in" : !o ? "options" : "out");
    if (heads <= 0 || n_tokens <= 0 || dim <= 0 || dim > 65536 ||
        (size_t)heads > SIZE_MAX / sizeof(float) / (size_t)n_tokens / (size_t)dim)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: %d kv heads x %d tokens x head_dim %d: all must be positive "
                          "(head_dim at most 65536)",
                          g_fit_fn, heads, n_tokens, dim);
    if (o->fit & ~(unsigned)(CLKVQ_FIT_CLIP | CLKVQ_FIT_MEAN | CLKVQ_FIT_PERM))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: fit 0x%x has unknown flags", g_fit_fn,
                          o->fit);
    if (o->fit && in->scheme == CLKVQ_SCHEME_FP16)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: the fp16 scheme quantizes nothing to fit", g_fit_fn);
    int need_k = (o->fit & (CLKVQ_FIT_CLIP_K | CLKVQ_FIT_MEAN_K | CLKVQ_FIT_PERM_K)) != 0;
    int need_v = (o->fit & (CLKVQ_FIT_CLIP_V | CLKVQ_FIT_MEAN_V | CLKVQ_FIT_PERM_V)) != 0;
    if ((need_k && !k) || (need_v && !v))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %s is NULL but fitted", g_fit_fn,
                          need_k && !k ? "k" : "v");
    const struct {
        unsigned flag;
        const void *storage;
        const char *name;
    } need[] = {{CLKVQ_FIT_MEAN_K, o->mean_k, "mean_k"}, {CLKVQ_FIT_MEAN_V, o->mean_v, "mean_v"},
                {CLKVQ_FIT_PERM_K, o->perm_k, "perm_k"}, {CLKVQ_FIT_PERM_V, o->perm_v, "perm_v"}};
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
        if ((o->fit & need[i].flag) && !need[i].storage)
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "%s: options->%s (storage for the fitted %s) is NULL", g_fit_fn,
                              need[i].name, need[i].name);
    int grid_default = o->clip_lo == 0.0f && o->clip_hi == 0.0f && o->clip_step == 0.0f;
    if (!grid_default && !(o->clip_lo > 0.0f && o->clip_lo <= o->clip_hi &&
                           o->clip_hi <= 1.0f && o->clip_step > 0.0f))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: clip grid [%g, %g] step %g: need 0 < lo <= hi <= 1, step > 0 (or "
                          "all 0 for the default)",
                          g_fit_fn, (double)o->clip_lo, (double)o->clip_hi,
                          (double)o->clip_step);
    if (in->rotate != 0 && in->rotate != 1)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: rotate %d is neither 0 nor 1",
                          g_fit_fn, in->rotate);
    return CLKVQ_OK;
}

clkvq_status clkvq_calibrate_layer(clkvq_context *ctx, const clkvq_layer_config *in,
                                   int n_kv_heads, int n_tokens, int head_dim, const float *k,
                                   const float *v, const clkvq_calib_options *options,
                                   clkvq_layer_config *out)
{
    clkvq_clear_error(ctx);
    clkvq_status st =
        check_fit_args(ctx, in, n_kv_heads, n_tokens, head_dim, k, v, options, out);
    if (st != CLKVQ_OK)
        return st;
    const unsigned fit = options->fit;
    layer_fit lf = {ctx, in, n_kv_heads, n_tokens, head_dim, 0, NULL};
    if (in->scheme == CLKVQ_SCHEME_SKVQ)
        lf.first = in->n_sink;
    if (fit && lf.first >= n_tokens)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: %d tokens, all of them within the %d sinks: nothing to fit on",
                          g_fit_fn, n_tokens, in->n_sink);
    const float *x[2] = {k, v};
    const unsigned tensor_flags[2] = {CLKVQ_FIT_CLIP_K | CLKVQ_FIT_MEAN_K | CLKVQ_FIT_PERM_K,
                                      CLKVQ_FIT_CLIP_V | CLKVQ_FIT_MEAN_V | CLKVQ_FIT_PERM_V};
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++)
        if (fit & tensor_flags[i])
            st = check_layer_values(ctx, &lf, x[i], i ? 'v' : 'k');
    if (st != CLKVQ_OK)
        return st;
    const float grid[3] = {
        options->clip_step > 0.0f ? options->clip_lo : CLKVQ_CLIP_GRID_LO,
        options->clip_step > 0.0f ? options->clip_hi : CLKVQ_CLIP_GRID_HI,
        options->clip_step > 0.0f ? options->clip_step : CLKVQ_CLIP_GRID_STEP};

    /* Fitted into scratch, copied to the caller's storage on success. */
    const size_t hd = (size_t)n_kv_heads * head_dim;
    const size_t rows = (size_t)n_kv_heads * (size_t)(n_tokens - lf.first) * head_dim;
    float *means = malloc(sizeof(float) * 2 * hd);
    int32_t *perms = malloc(sizeof(int32_t) * 2 * hd);
    float *y = (fit & (CLKVQ_FIT_CLIP | CLKVQ_FIT_PERM)) ? malloc(sizeof(float) * rows) : NULL;
    if (!means || !perms || ((fit & (CLKVQ_FIT_CLIP | CLKVQ_FIT_PERM)) && !y)) {
        free(means);
        free(perms);
        free(y);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: %zu floats of scratch", g_fit_fn,
                          rows);
    }
    clkvq_layer_config c = *in;
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++)
        if (fit & tensor_flags[i])
            st = fit_tensor(&lf, &c, i, x[i], fit & tensor_flags[i], grid, means + i * hd,
                            perms + i * hd, y);
    if (st == CLKVQ_OK) {
        float *mean_dst[2] = {options->mean_k, options->mean_v};
        int32_t *perm_dst[2] = {options->perm_k, options->perm_v};
        const float **mean_of[2] = {&c.mean_k, &c.mean_v};
        const int32_t **perm_of[2] = {&c.perm_k, &c.perm_v};
        for (int i = 0; i < 2; i++) {
            if (*mean_of[i] == means + i * hd) {
                memcpy(mean_dst[i], means + i * hd, sizeof(float) * hd);
                *mean_of[i] = mean_dst[i];
            }
            if (*perm_of[i] == perms + i * hd) {
                memcpy(perm_dst[i], perms + i * hd, sizeof(int32_t) * hd);
                *perm_of[i] = perm_dst[i];
            }
        }
        *out = c;
    }
    free(means);
    free(perms);
    free(y);
    return st;
}

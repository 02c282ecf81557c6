/* Plain-C model of the KV cache's contents; see reference_cache.h. */
#include "reference_cache.h"

#include "kv_cache.h"
#include "quant_format.h"
#include "reference.h"

#include <stdlib.h>
#include <string.h>

/* Values are kept as the cache stores them: y = P(R(x - mean)), packed
 * channel order (clkvq_packing.h "transforms"); read-back maps them back. */
struct clkvq_ref_cache {
    clkvq_cache_layer layer; /* only cfg is used, for the token regions */
    int heads, dim, capacity, length;
    int32_t *perm[2];
    float *mean[2];
    float *val[2]; /* [heads][capacity][dim], stored space */
    /* per-head bits: each head's formats, and its index within the heads
     * sharing its pair (what its rotation signs are drawn by, kv_shares.c) */
    clkvq_format *fmt[2];
    int *rot_head;
};

clkvq_ref_cache *clkvq_ref_cache_create(const clkvq_layer_config *cfg, int n_kv_heads,
                                        int head_dim, int capacity)
{
    clkvq_ref_cache *rc = calloc(1, sizeof *rc);
    rc->layer.cfg = *cfg;
    rc->heads = n_kv_heads;
    rc->dim = head_dim;
    rc->capacity = capacity;
    const int32_t *perms[2] = {cfg->perm_k, cfg->perm_v};
    const float *means[2] = {cfg->mean_k, cfg->mean_v};
    size_t n = (size_t)n_kv_heads * head_dim;
    for (int i = 0; i < 2; i++) {
        rc->val[i] = calloc((size_t)n_kv_heads * capacity * head_dim, sizeof(float));
        if (perms[i]) {
            rc->perm[i] = malloc(sizeof(int32_t) * n);
            memcpy(rc->perm[i], perms[i], sizeof(int32_t) * n);
        }
        if (means[i]) {
            rc->mean[i] = malloc(sizeof(float) * n);
            memcpy(rc->mean[i], means[i], sizeof(float) * n);
        }
    }
    rc->layer.cfg.perm_k = rc->layer.cfg.perm_v = NULL;
    rc->layer.cfg.mean_k = rc->layer.cfg.mean_v = NULL;
    rc->layer.cfg.head_format_k = rc->layer.cfg.head_format_v = NULL;
    rc->fmt[0] = malloc(sizeof(clkvq_format) * n_kv_heads);
    rc->fmt[1] = malloc(sizeof(clkvq_format) * n_kv_heads);
    rc->rot_head = malloc(sizeof(int) * n_kv_heads);
    int *share_of = malloc(sizeof(int) * n_kv_heads);
    int n_shares = clkvq_head_shares(cfg, n_kv_heads, rc->fmt[0], rc->fmt[1], share_of);
    clkvq_format pk[1024], pv[1024];
    memcpy(pk, rc->fmt[0], sizeof(clkvq_format) * n_shares);
    memcpy(pv, rc->fmt[1], sizeof(clkvq_format) * n_shares);
    for (int h = 0; h < n_kv_heads; h++) {
        rc->fmt[0][h] = pk[share_of[h]];
        rc->fmt[1][h] = pv[share_of[h]];
        rc->rot_head[h] = h;
        if (n_shares > 1) {
            rc->rot_head[h] = 0;
            for (int e = 0; e < h; e++)
                rc->rot_head[h] += share_of[e] == share_of[h];
        }
    }
    free(share_of);
    return rc;
}

void clkvq_ref_cache_free(clkvq_ref_cache *rc)
{
    if (!rc)
        return;
    for (int i = 0; i < 2; i++) {
        free(rc->perm[i]);
        free(rc->mean[i]);
        free(rc->val[i]);
        free(rc->fmt[i]);
    }
    free(rc->rot_head);
    free(rc);
}

int clkvq_ref_cache_length(const clkvq_ref_cache *rc) { return rc->length; }

static float f16_round(float x) { return clkvq_f16_to_f32(clkvq_f32_to_f16(x)); }

static float *at(clkvq_ref_cache *rc, int i, int h, int t, int c)
{
    return &rc->val[i][((size_t)h * rc->capacity + t) * rc->dim + c];
}

/* Tensor i of head h: the head's own formats. */
static clkvq_quant_params params_of(const clkvq_ref_cache *rc, int i, int h)
{
    clkvq_layer_config c = rc->layer.cfg;
    c.format_k = rc->fmt[0][h];
    c.format_v = rc->fmt[1][h];
    return clkvq_layer_quant_params(&c, i);
}

/* Quantizes and dequantizes n values in place (one group). */
static void round_trip_group(const clkvq_quant_params *qp, float **slots, int n)
{
    float values[256] = {0}, scale, zero;
    uint8_t param[4];
    for (int j = 0; j < n; j++)
        values[j] = *slots[j];
    clkvq_ref_group_params(qp, values, n, &scale, &zero, param);
    for (int j = 0; j < n; j++)
        *slots[j] = clkvq_ref_dequant_value(qp, clkvq_ref_code(qp, values[j], scale, zero),
                                            scale, zero);
}

/* Tokens [q0, q1) of tensor i get packed: values already hold what they are
 * quantized from, in stored (packed) channel order. Per-channel groups sit
 * at multiples of the group; a first one may start after the sinks (skvq
 * with per-channel keys) and then holds only its tokens from q0. */
static void quantize_tokens(clkvq_ref_cache *rc, int i, int q0, int q1)
{
    float *slots[256];
    for (int h = 0; h < rc->heads; h++) {
        clkvq_quant_params qp = params_of(rc, i, h);
        int g = qp.group_size;
        if (qp.axis == CLKVQ_AXIS_TOKEN) {
            for (int t = q0; t < q1; t++)
                for (int c0 = 0; c0 < rc->dim; c0 += g) {
                    for (int j = 0; j < g; j++)
                        slots[j] = at(rc, i, h, t, c0 + j);
                    round_trip_group(&qp, slots, g);
                }
        } else {
            for (int b = q0 / g * g; b < q1; b += g) {
                int t0 = b > q0 ? b : q0;
                for (int c = 0; c < rc->dim; c++) {
                    for (int t = t0; t < b + g; t++)
                        slots[t - t0] = at(rc, i, h, t, c);
                    round_trip_group(&qp, slots, b + g - t0);
                }
            }
        }
    }
}

/* Row x (model order, head h of tensor i) as the cache stores it. */
static void to_stored(const clkvq_ref_cache *rc, int i, int h, const float *x, float *y)
{
    float row[256];
    const float *mean = rc->mean[i] ? rc->mean[i] + (size_t)h * rc->dim : NULL;
    for (int c = 0; c < rc->dim; c++)
        row[c] = mean ? x[c] - mean[c] : x[c];
    if (rc->layer.cfg.rotate)
        kvq_rotate(row, rc->dim, rc->layer.cfg.rot_seed, rc->rot_head[h]);
    const int32_t *perm = rc->perm[i] ? rc->perm[i] + (size_t)h * rc->dim : NULL;
    for (int c = 0; c < rc->dim; c++)
        y[c] = row[perm ? perm[c] : c];
}

/* The inverse: a stored row back in the model's space. */
static void from_stored(const clkvq_ref_cache *rc, int i, int h, const float *y, float *x)
{
    float row[256];
    const int32_t *perm = rc->perm[i] ? rc->perm[i] + (size_t)h * rc->dim : NULL;
    for (int c = 0; c < rc->dim; c++)
        row[perm ? perm[c] : c] = y[c];
    if (rc->layer.cfg.rotate)
        kvq_unrotate(row, rc->dim, rc->layer.cfg.rot_seed, rc->rot_head[h]);
    const float *mean = rc->mean[i] ? rc->mean[i] + (size_t)h * rc->dim : NULL;
    for (int c = 0; c < rc->dim; c++)
        x[c] = mean ? row[c] + mean[c] : row[c];
}

void clkvq_ref_cache_append(clkvq_ref_cache *rc, int n_tokens, const float *k, const float *v)
{
    const float *in[2] = {k, v};
    int n_old = rc->length, n_new = n_old + n_tokens;
    for (int i = 0; i < 2; i++) {
        int q0 = clkvq_cache_pack_from(&rc->layer, i, n_old, n_new);
        int q1 = clkvq_cache_q_end(&rc->layer, i, n_new);
        /* new tokens: raw input if packed right away, else fp16-rounded */
        float y[256];
        for (int h = 0; h < rc->heads; h++)
            for (int r = 0; r < n_tokens; r++) {
                int t = n_old + r;
                int packed_now = t >= rc->layer.cfg.n_sink && t < q1;
                to_stored(rc, i, h, in[i] + ((size_t)h * n_tokens + r) * rc->dim, y);
                for (int c = 0; c < rc->dim; c++)
                    *at(rc, i, h, t, c) = packed_now ? y[c] : f16_round(y[c]);
            }
        if (q1 > q0 && rc->layer.cfg.scheme != CLKVQ_SCHEME_FP16)
            quantize_tokens(rc, i, q0, q1);
    }
    rc->length = n_new;
}

void clkvq_ref_cache_truncate(clkvq_ref_cache *rc, int n_tokens)
{
    for (int i = 0; i < 2; i++) {
        int q_old = clkvq_cache_q_end(&rc->layer, i, rc->length);
        int q_new = clkvq_cache_q_end(&rc->layer, i, n_tokens);
        int to = q_old < n_tokens ? q_old : n_tokens;
        for (int h = 0; h < rc->heads; h++)
            for (int t = q_new; t < to; t++)
                for (int c = 0; c < rc->dim; c++)
                    *at(rc, i, h, t, c) = f16_round(*at(rc, i, h, t, c));
    }
    rc->length = n_tokens;
}

void clkvq_ref_cache_read(const clkvq_ref_cache *rc, float *k, float *v)
{
    float *out[2] = {k, v};
    for (int i = 0; i < 2; i++)
        if (out[i])
            for (int h = 0; h < rc->heads; h++)
                for (int t = 0; t < rc->length; t++)
                    from_stored(rc, i, h, rc->val[i] + ((size_t)h * rc->capacity + t) * rc->dim,
                                out[i] + ((size_t)h * rc->length + t) * rc->dim);
}

void clkvq_ref_cache_copy(clkvq_ref_cache *dst, const clkvq_ref_cache *src)
{
    size_t n = (size_t)src->heads * src->capacity * src->dim;
    for (int i = 0; i < 2; i++)
        memcpy(dst->val[i], src->val[i], n * sizeof(float));
    dst->length = src->length;
}

/*
 * Accuracy of one layer under one layer config (clkvq_eval_layer), measured
 * through the library's own cache and fused decode kernels, so what it
 * reports is what a runtime would get, not what a host model of the format
 * predicts.
 *
 * Procedure (the order matters: it is the order a runtime appends in):
 *   1. a one-layer, one-sequence cache of capacity n_tokens, layouts AUTO;
 *   2. tokens [0, n_tokens - n_queries) appended as prefill (chunks of at
 *      most EVAL_PREFILL_CHUNK tokens);
 *   3. for each position p of the last n_queries: token p appended alone
 *      (a decode step, so windows slide and KIVI blocks close exactly as at
 *      run time), then query p decoded over the cache as it stands and
 *      compared with fp64 attention over the ORIGINAL K/V[0..p];
 *   4. the final cache read back and compared with K and V.
 *
 * bits_per_element counts the final state honestly: per tensor, the packed
 * tokens at their packed size (codes + scale/zero, from the format table)
 * plus every token the scheme keeps in fp16 (sinks, window, residual) at 16
 * bits, over n_tokens x head_dim; K and V averaged. It does not count the
 * capacity padding the cache allocates (clkvq_cache_plan reports that).
 * bits_long is its limit as n_tokens grows: the packed size alone.
 */
#include "kv_cache.h"
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Prefill in chunks so the scratch and the device staging stay bounded for
 * long dumps; the chunking does not change what is stored (appends of any
 * size give the same cache). */
#define EVAL_PREFILL_CHUNK 4096

typedef struct {
    double num, den;     /* sums of squared differences and squared references */
    double cos_sum;      /* sum of per-(head, query) cosines */
    long cos_count;
} eval_accum;

/* Copies tokens [t0, t0 + n) of a [heads][n_tokens][hd] tensor into a
 * [heads][n][hd] one (what clkvq_cache_append takes). */
static void gather_tokens(const float *x, int heads, int n_tokens, int hd, int t0, int n,
                          float *dst)
{
    for (int h = 0; h < heads; h++)
        memcpy(dst + (size_t)h * n * hd, x + ((size_t)h * n_tokens + t0) * hd,
               sizeof(float) * (size_t)n * hd);
}

/*
 * fp64 attention of query p (every q head) over the original K/V [0..p]
 * (lib/reference.c's oracle), compared with the kernel's out [n_q][hd].
 * ref is scratch of n_q * hd doubles.
 */
static void compare_query(const float *q, const float *k, const float *v, const float *out,
                          int n_q, int n_kv, int n_tokens, int hd, int p, double scale,
                          double *ref, eval_accum *acc)
{
    const size_t head = (size_t)n_tokens * hd;
    clkvq_ref_attn_shape rs = {n_q, n_kv, hd, p + 1, head, 1, head, scale};
    clkvq_ref_attention(&rs, q + (size_t)p * hd, k, v, ref);
    for (int qh = 0; qh < n_q; qh++) {
        const float *o = out + (size_t)qh * hd;
        const double *r = ref + (size_t)qh * hd;
        double num = 0.0, den = 0.0, dot = 0.0, oo = 0.0;
        for (int c = 0; c < hd; c++) {
            double d = (double)o[c] - r[c];
            num += d * d;
            den += r[c] * r[c];
            dot += (double)o[c] * r[c];
            oo += (double)o[c] * (double)o[c];
        }
        acc->num += num;
        acc->den += den;
        /* Two zero vectors agree; one zero vector against another has no
         * direction at all: count it as orthogonal rather than divide by 0. */
        acc->cos_sum += (den > 0.0 && oo > 0.0) ? dot / sqrt(den * oo) : (den == oo ? 1.0 : 0.0);
        acc->cos_count++;
    }
}

static double relative(double num, double den)
{
    /* An all-zero reference has no scale: report the absolute error. */
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/* Sums of squared read-back errors and of squared values. */
static void tensor_sums(const float *x, const float *back, size_t n, double *num, double *den)
{
    *num = *den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)back[i] - (double)x[i];
        *num += d * d;
        *den += (double)x[i] * (double)x[i];
    }
}

/* Storage bits of one packed element as the context grows: one group's
 * codes and params over its elements (a token's row when groups run along
 * channels, group_size tokens of a channel when they run along tokens). */
static clkvq_status tensor_bits_long(clkvq_context *ctx, const clkvq_layer_config *lc, int is_v,
                                     int hd, double *bits)
{
    if (lc->scheme == CLKVQ_SCHEME_FP16) {
        *bits = 16.0;
        return CLKVQ_OK;
    }
    clkvq_quant_params qp = clkvq_layer_quant_params(lc, is_v);
    int n = qp.axis == CLKVQ_AXIS_CHANNEL ? qp.group_size : 1;
    clkvq_shape shape = {1, n, hd};
    clkvq_quant_layout layout;
    clkvq_status s = clkvq_quant_layout_get(&qp, &shape, &layout);
    if (s != CLKVQ_OK)
        return clkvq_fail(ctx, s, "clkvq_eval_layer: packed size of %c: %s", is_v ? 'V' : 'K',
                          clkvq_last_error(NULL));
    *bits = 8.0 * (double)(layout.code_bytes + layout.params_bytes) / ((double)n * hd);
    return CLKVQ_OK;
}

/*
 * Storage bits of one tensor of the final state, per element. The regions
 * come from the cache's own q_end (lib/kv_cache.h), so this cannot drift
 * from what append really packs.
 */
static clkvq_status tensor_bits(clkvq_context *ctx, const clkvq_cache_layer *layer, int is_v,
                                int n, int hd, double *bits)
{
    const clkvq_layer_config *lc = &layer->cfg;
    if (lc->scheme == CLKVQ_SCHEME_FP16) {
        *bits = 16.0;
        return CLKVQ_OK;
    }
    const int sink_end = clkvq_cache_n_sink_eff(layer, n);
    const int q_end = clkvq_cache_q_end(layer, is_v, n);
    const int packed = q_end > sink_end ? q_end - sink_end : 0;
    const int fp_tokens = n - packed;
    double packed_bits = 0.0;
    if (packed > 0) {
        clkvq_quant_params qp = clkvq_layer_quant_params(lc, is_v);
        /* One head: per-token groups are exact for any token count; KIVI's
         * per-channel key blocks only ever hold whole blocks of R tokens,
         * a multiple of the group, so no partial group is counted. */
        clkvq_shape shape = {1, packed, hd};
        clkvq_quant_layout layout;
        clkvq_status s = clkvq_quant_layout_get(&qp, &shape, &layout);
        if (s != CLKVQ_OK)
            return clkvq_fail(ctx, s, "clkvq_eval_layer: packed size of %c: %s", is_v ? 'V' : 'K',
                              clkvq_last_error(NULL));
        packed_bits = 8.0 * (double)(layout.code_bytes + layout.params_bytes);
    }
    *bits = (packed_bits + 16.0 * (double)fp_tokens * hd) / ((double)n * hd);
    return CLKVQ_OK;
}

static clkvq_status check_finite(clkvq_context *ctx, const char *name, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE, "clkvq_eval_layer: %s[%zu] = %g is not finite",
                              name, i, (double)x[i]);
    return CLKVQ_OK;
}

clkvq_status clkvq_eval_layer(clkvq_context *ctx, const clkvq_layer_config *cfg, int n_q_heads,
                              int n_kv_heads, int n_tokens, int head_dim, const float *q,
                              const float *k, const float *v, int n_queries,
                              clkvq_eval_result *out)
{
    static const char fn[] = "clkvq_eval_layer";
    if (!ctx)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "%s: context is NULL", fn);
    clkvq_clear_error(ctx);
    if (!cfg || !q || !k || !v || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %s is NULL", fn,
                          !cfg ? "cfg" : !q ? "q" : !k ? "k" : !v ? "v" : "out");
    if (n_q_heads <= 0 || n_kv_heads <= 0 || n_tokens <= 0 || head_dim <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: %d q heads, %d kv heads, %d tokens, head_dim %d: all must be "
                          "positive",
                          fn, n_q_heads, n_kv_heads, n_tokens, head_dim);
    if (n_q_heads % n_kv_heads != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: n_q_heads %d is not a multiple of n_kv_heads %d", fn, n_q_heads,
                          n_kv_heads);
    if (n_queries < 1 || n_queries > n_tokens)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: n_queries %d must be in [1, n_tokens = %d]", fn, n_queries,
                          n_tokens);
    if ((size_t)n_q_heads > SIZE_MAX / sizeof(float) / (size_t)n_tokens / (size_t)head_dim)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: %d x %d x %d floats overflow size_t",
                          fn, n_q_heads, n_tokens, head_dim);
    const size_t q_count = (size_t)n_q_heads * n_tokens * head_dim;
    const size_t kv_count = (size_t)n_kv_heads * n_tokens * head_dim;
    /* K/V NaN/Inf are the cache's to reject (with the token named); q goes
     * straight to the kernel, so it is checked here. */
    clkvq_status st = check_finite(ctx, "q", q, q_count);
    if (st != CLKVQ_OK)
        return st;

    clkvq_cache_config cc = {.n_layers = 1, .n_seqs = 1, .capacity = n_tokens,
                             .n_kv_heads = n_kv_heads, .n_q_heads = n_q_heads,
                             .head_dim = head_dim, .layout_k = CLKVQ_LAYOUT_AUTO,
                             .layout_v = CLKVQ_LAYOUT_AUTO, .layers = cfg};
    clkvq_cache *cache = NULL;
    st = clkvq_cache_create(ctx, &cc, &cache);
    if (st != CLKVQ_OK)
        return st; /* create's message names the bad field */

    const int n_prefill = n_tokens - n_queries;
    const int chunk_max = n_prefill < EVAL_PREFILL_CHUNK ? n_prefill : EVAL_PREFILL_CHUNK;
    const size_t stage_tokens = chunk_max > 1 ? (size_t)chunk_max : 1;
    float *k_stage = malloc(sizeof(float) * n_kv_heads * stage_tokens * head_dim);
    float *v_stage = malloc(sizeof(float) * n_kv_heads * stage_tokens * head_dim);
    float *q_step = malloc(sizeof(float) * (size_t)n_q_heads * head_dim);
    float *o_step = malloc(sizeof(float) * (size_t)n_q_heads * head_dim);
    double *ref = malloc(sizeof(double) * (size_t)n_q_heads * head_dim);
    float *k_back = malloc(sizeof(float) * kv_count);
    float *v_back = malloc(sizeof(float) * kv_count);
    if (!k_stage || !v_stage || !q_step || !o_step || !ref || !k_back || !v_back) {
        st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: no host memory for %d tokens", fn,
                        n_tokens);
        goto done;
    }

    for (int t0 = 0; t0 < n_prefill; t0 += chunk_max) {
        int n = n_prefill - t0 < chunk_max ? n_prefill - t0 : chunk_max;
        gather_tokens(k, n_kv_heads, n_tokens, head_dim, t0, n, k_stage);
        gather_tokens(v, n_kv_heads, n_tokens, head_dim, t0, n, v_stage);
        st = clkvq_cache_append(cache, 0, 0, n, k_stage, v_stage);
        if (st != CLKVQ_OK)
            goto done;
    }

    const double scale = 1.0 / sqrt((double)head_dim);
    eval_accum acc = {0.0, 0.0, 0.0, 0};
    for (int p = n_prefill; p < n_tokens; p++) {
        gather_tokens(k, n_kv_heads, n_tokens, head_dim, p, 1, k_stage);
        gather_tokens(v, n_kv_heads, n_tokens, head_dim, p, 1, v_stage);
        st = clkvq_cache_append(cache, 0, 0, 1, k_stage, v_stage);
        if (st != CLKVQ_OK)
            goto done;
        gather_tokens(q, n_q_heads, n_tokens, head_dim, p, 1, q_step);
        st = clkvq_cache_decode_host(cache, 0, q_step, o_step, (float)scale);
        if (st != CLKVQ_OK)
            goto done;
        /* The reference uses the same scale as the kernel gets, rounded to
         * float, so the comparison does not carry a scale mismatch. */
        compare_query(q, k, v, o_step, n_q_heads, n_kv_heads, n_tokens, head_dim, p,
                      (double)(float)scale, ref, &acc);
    }

    st = clkvq_cache_read(cache, 0, 0, k_back, v_back);
    if (st != CLKVQ_OK)
        goto done;
    /* per-head bits: the shares' bits weighted by their heads */
    double bits_k = 0.0, bits_v = 0.0, long_k = 0.0, long_v = 0.0;
    for (int s = 0; s < clkvq_cache_n_shares(cache, 0) && st == CLKVQ_OK; s++) {
        const clkvq_cache_layer *share = clkvq_cache_share(cache, 0, s);
        double b[4] = {0.0, 0.0, 0.0, 0.0}, w = (double)share->n_kv_heads / n_kv_heads;
        for (int is_v = 0; is_v < 2 && st == CLKVQ_OK; is_v++) {
            st = tensor_bits(ctx, share, is_v, n_tokens, head_dim, &b[is_v]);
            if (st == CLKVQ_OK)
                st = tensor_bits_long(ctx, &share->cfg, is_v, head_dim, &b[2 + is_v]);
        }
        bits_k += w * b[0];
        bits_v += w * b[1];
        long_k += w * b[2];
        long_v += w * b[3];
    }
    if (st != CLKVQ_OK)
        goto done;

    memset(out, 0, sizeof *out);
    out->bits_per_element = 0.5 * (bits_k + bits_v);
    out->bits_long = 0.5 * (long_k + long_v);
    out->err_sq = acc.num;
    out->ref_sq = acc.den;
    out->rel_err = relative(acc.num, acc.den);
    out->cosine = acc.cos_sum / (double)acc.cos_count;
    tensor_sums(k, k_back, kv_count, &out->k_err_sq, &out->k_ref_sq);
    tensor_sums(v, v_back, kv_count, &out->v_err_sq, &out->v_ref_sq);
    out->k_rel_err = relative(out->k_err_sq, out->k_ref_sq);
    out->v_rel_err = relative(out->v_err_sq, out->v_ref_sq);
    out->n_queries = n_queries;

done:
    free(k_stage);
    free(v_stage);
    free(q_step);
    free(o_step);
    free(ref);
    free(k_back);
    free(v_back);
    clkvq_cache_release(cache);
    return st;
}

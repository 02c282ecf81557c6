/*
 * Per-head bits. A model layer whose kv heads carry different (K, V)
 * pairs is stored as shares, one per distinct pair (kv_cache.h): to the
 * kernels each share is a layer of its own heads, with its own program
 * variant, pages and tuning. This module owns the mapping: which share a
 * head belongs to, and the copies that gather a share's heads out of the
 * model's layouts into contiguous scratch and scatter results back.
 *
 * Why shares and not one launch over a per-head format table: the format
 * is a compile-time constant of every kernel (unpacking, vector widths and
 * the serial kernels' unrolling follow from it), so a table-driven kernel
 * would branch per head on what is now folded away; the shares' launches
 * run exactly the uniform layer's kernels on fewer heads, plus a copy of
 * the queries and outputs (results/per-head-pocl-cpu.md measures the
 * cost against uniform layers).
 */
#include "kv_cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BUF_K, BUF_V, BUF_Q, BUF_OUT };

int clkvq_head_shares(const clkvq_layer_config *lc, int n_kv_heads, clkvq_format *share_k,
                      clkvq_format *share_v, int *share_of)
{
    /* the fp16 scheme reads no format: one share whatever the heads say */
    int per_head = lc->scheme != CLKVQ_SCHEME_FP16 && (lc->head_format_k || lc->head_format_v);
    int n = 0;
    for (int h = 0; h < n_kv_heads; h++) {
        clkvq_format fk = per_head && lc->head_format_k ? lc->head_format_k[h] : lc->format_k;
        clkvq_format fv = per_head && lc->head_format_v ? lc->head_format_v[h] : lc->format_v;
        int j = 0;
        while (j < n && (share_k[j] != fk || share_v[j] != fv))
            j++;
        if (j == n) {
            share_k[n] = fk;
            share_v[n] = fv;
            n++;
        }
        if (share_of)
            share_of[h] = j;
    }
    return n;
}

static clkvq_status ensure(clkvq_cache *cache, int which, size_t bytes)
{
    return clkvq_scratch_ensure(cache->ctx, &cache->share_buf[which], &cache->share_bytes[which],
                                bytes ? bytes : 4, "per-head scratch");
}

/* The share's heads in runs of consecutive model heads: *run gets the
 * length of the run starting at the share's head i. */
static int run_at(const clkvq_cache_layer *share, int i, int *run)
{
    int n = 1;
    while (i + n < share->n_kv_heads && share->heads[i + n] == share->heads[i] + n)
        n++;
    *run = n;
    return share->heads[i];
}

/*
 * Copies between the model's layout, rows of model heads, and the share's,
 * rows of its heads: `rows` rows (sequences x queries; 1 for a [heads]
 * [tokens][dim] tensor) of head_bytes per head. to_share: model -> share.
 */
static clkvq_status copy_heads(clkvq_cache *cache, const clkvq_cache_layer *share, cl_mem model,
                               int model_heads, cl_mem shared, size_t head_bytes, size_t rows,
                               int to_share)
{
    for (int i = 0, run; i < share->n_kv_heads; i += run) {
        int h = run_at(share, i, &run);
        size_t model_at[3] = {(size_t)h * head_bytes, 0, 0};
        size_t share_at[3] = {(size_t)i * head_bytes, 0, 0};
        size_t region[3] = {(size_t)run * head_bytes, rows, 1};
        size_t model_pitch = (size_t)model_heads * head_bytes;
        size_t share_pitch = (size_t)share->n_kv_heads * head_bytes;
        cl_int err =
            to_share ? clEnqueueCopyBufferRect(cache->ctx->queue, model, shared, model_at,
                                               share_at, region, model_pitch, 0, share_pitch, 0,
                                               0, NULL, NULL)
                     : clEnqueueCopyBufferRect(cache->ctx->queue, shared, model, share_at,
                                               model_at, region, share_pitch, 0, model_pitch, 0,
                                               0, NULL, NULL);
        if (err != CL_SUCCESS)
            return clkvq_cl_fail(cache->ctx, err, to_share ? "gathering a share's heads"
                                                           : "scattering a share's heads");
    }
    return CLKVQ_OK;
}

/* K and V rows ([n_kv_heads][n_tokens][head_dim]) of one share's heads
 * into share_buf[BUF_K], [BUF_V]. */
static clkvq_status gather_rows(clkvq_cache *cache, const clkvq_cache_layer *share, cl_mem k,
                                cl_mem v, int n_tokens)
{
    size_t head_bytes = (size_t)n_tokens * cache->cfg.head_dim * sizeof(float);
    size_t need = head_bytes * share->n_kv_heads;
    clkvq_status st = ensure(cache, BUF_K, need);
    if (st == CLKVQ_OK)
        st = ensure(cache, BUF_V, need);
    if (st == CLKVQ_OK)
        st = copy_heads(cache, share, k, cache->cfg.n_kv_heads, cache->share_buf[BUF_K],
                        head_bytes, 1, 1);
    if (st == CLKVQ_OK)
        st = copy_heads(cache, share, v, cache->cfg.n_kv_heads, cache->share_buf[BUF_V],
                        head_bytes, 1, 1);
    return st;
}

clkvq_status clkvq_shares_append(clkvq_cache *cache, int l, int seq, int n_tokens, cl_mem k,
                                 cl_mem v)
{
    int first = cache->first_stored[l], n = clkvq_cache_n_shares(cache, l);
    int n_old = cache->layers[first].length[seq];
    clkvq_status st = CLKVQ_OK;
    /* Every refusal comes before the first write: the input was checked,
     * the shares' pools hold the same pages (the first reservation fails
     * where any would), and the range check after centering/rotation runs
     * on every share first. */
    if (clkvq_layer_transforms(&cache->layers[first]))
        for (int p = first; p < first + n && st == CLKVQ_OK; p++) {
            st = gather_rows(cache, &cache->layers[p], k, v, n_tokens);
            if (st == CLKVQ_OK)
                st = clkvq_cache_write_stored(cache, p, seq, n_tokens, cache->share_buf[BUF_K],
                                              cache->share_buf[BUF_V], 1);
        }
    for (int p = first; p < first + n && st == CLKVQ_OK; p++) {
        st = gather_rows(cache, &cache->layers[p], k, v, n_tokens);
        if (st == CLKVQ_OK)
            st = clkvq_cache_write_stored(cache, p, seq, n_tokens, cache->share_buf[BUF_K],
                                          cache->share_buf[BUF_V], 0);
        if (st != CLKVQ_OK && p > first) {
            /* a device failure after earlier shares wrote: they go back to
             * the old length, so the layer's heads agree on what it holds */
            char why[CLKVQ_MSG_MAX];
            snprintf(why, sizeof why, "%s", clkvq_last_error(cache->ctx));
            for (int q = first; q < p; q++)
                clkvq_cache_truncate_stored(cache, q, seq, n_old);
            clkvq_fail(cache->ctx, st, "%s", why);
        }
    }
    return st;
}

clkvq_status clkvq_shares_read(clkvq_cache *cache, int l, int seq, cl_mem k_out, cl_mem v_out)
{
    int first = cache->first_stored[l], n = clkvq_cache_n_shares(cache, l);
    int n_tokens = cache->layers[first].length[seq];
    size_t head_bytes = (size_t)n_tokens * cache->cfg.head_dim * sizeof(float);
    clkvq_status st = CLKVQ_OK;
    for (int p = first; p < first + n && st == CLKVQ_OK; p++) {
        const clkvq_cache_layer *share = &cache->layers[p];
        size_t need = head_bytes * share->n_kv_heads;
        if (k_out)
            st = ensure(cache, BUF_K, need);
        if (st == CLKVQ_OK && v_out)
            st = ensure(cache, BUF_V, need);
        if (st == CLKVQ_OK)
            st = clkvq_cache_read_stored(cache, p, seq, k_out ? cache->share_buf[BUF_K] : NULL,
                                         v_out ? cache->share_buf[BUF_V] : NULL);
        if (st == CLKVQ_OK && k_out)
            st = copy_heads(cache, share, k_out, cache->cfg.n_kv_heads, cache->share_buf[BUF_K],
                            head_bytes, 1, 0);
        if (st == CLKVQ_OK && v_out)
            st = copy_heads(cache, share, v_out, cache->cfg.n_kv_heads, cache->share_buf[BUF_V],
                            head_bytes, 1, 0);
    }
    return st;
}

clkvq_status clkvq_shares_decode(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                                 float scale)
{
    const clkvq_cache_config *cfg = &cache->cfg;
    int first = cache->first_stored[l], n = clkvq_cache_n_shares(cache, l);
    int qpk = cfg->n_q_heads / cfg->n_kv_heads;
    /* a kv head's queries are qpk consecutive query heads: one block */
    size_t head_bytes = (size_t)qpk * cfg->head_dim * sizeof(float);
    size_t rows = (size_t)cfg->n_seqs * n_queries;
    clkvq_status st = CLKVQ_OK;
    for (int p = first; p < first + n && st == CLKVQ_OK; p++) {
        const clkvq_cache_layer *share = &cache->layers[p];
        size_t need = rows * share->n_kv_heads * head_bytes;
        if ((st = ensure(cache, BUF_Q, need)) != CLKVQ_OK ||
            (st = ensure(cache, BUF_OUT, need)) != CLKVQ_OK)
            break;
        st = copy_heads(cache, share, q, cfg->n_kv_heads, cache->share_buf[BUF_Q], head_bytes,
                        rows, 1);
        if (st == CLKVQ_OK)
            st = clkvq_cache_decode_stored(cache, p, n_queries, cache->share_buf[BUF_Q],
                                           cache->share_buf[BUF_OUT], scale);
        if (st == CLKVQ_OK)
            st = copy_heads(cache, share, out, cfg->n_kv_heads, cache->share_buf[BUF_OUT],
                            head_bytes, rows, 0);
    }
    return st;
}

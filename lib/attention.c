/* Fused decode attention: host side (tunables, scratch, launches). The
 * kernels are cl_kernels/attention.cl; the cache layout is kv_cache.h's. */
#include "kv_cache.h"
#include "attn_fit.h"
#include "kernel_args.h"
#include "kernel_defines.h"
#include "program_cache.h"
#include "quant_format.h"
#include "tuning_db.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MERGE_LOCAL_SIZE 64
/* Queries per sequence a decode takes (speculative drafts). */
#define CLKVQ_MAX_QUERIES 16

static const char *const g_attn_sources[] = {"attention.cl", "attention_serial.cl"};

static int planar_layouts(const clkvq_cache *cache)
{
    return cache->cfg.layout_v == CLKVQ_LAYOUT_GROUP_PLANAR &&
           cache->cfg.layout_k == CLKVQ_LAYOUT_GROUP_PLANAR;
}

/* Built-in defaults (tuning_db.c), except that the serial variant needs
 * group-planar packed layouts: a token-major cache falls back to the
 * cooperative one. */
static clkvq_attn_tuning default_tuning(const clkvq_cache *cache)
{
    clkvq_attn_tuning t = clkvq_tuning_builtin(cache->ctx).attn;
    if (t.variant == CLKVQ_ATTN_SERIAL && !planar_layouts(cache))
        t.variant = CLKVQ_ATTN_COOPERATIVE;
    return t;
}

/* The tunables for layer l: the tuning database's choice for the layer's
 * shape when the cache's layouts allow it, else built-in defaults; then
 * the caller's non-zero overrides. */
static void resolve_tuning(const clkvq_cache *cache, int l, const clkvq_attn_tuning *in,
                           clkvq_attn_tuning *t)
{
    *t = default_tuning(cache);
    const clkvq_tune_params *tuned = cache->tuned ? &cache->tuned[l] : NULL;
    if (tuned && tuned->attn.variant &&
        (tuned->attn.variant != CLKVQ_ATTN_SERIAL || planar_layouts(cache))) {
        t->variant = tuned->attn.variant;
        if (tuned->attn.wgs)
            t->wgs = tuned->attn.wgs;
        if (tuned->attn.chunk)
            t->chunk = tuned->attn.chunk;
        if (tuned->attn.vw)
            t->vw = tuned->attn.vw;
    }
    if (in->variant)
        t->variant = in->variant;
    if (in->wgs)
        t->wgs = in->wgs;
    if (in->vw)
        t->vw = in->vw;
    if (in->chunk)
        t->chunk = in->chunk;
}

static clkvq_status check_tuning(clkvq_context *ctx, const clkvq_cache *cache,
                                 const clkvq_attn_tuning *t, int n_queries)
{
    clkvq_attn_fit_shape shape = {cache->cfg.n_q_heads / cache->cfg.n_kv_heads, n_queries,
                                  cache->cfg.head_dim, 0, cache->cfg.layout_k,
                                  cache->cfg.layout_v};
    for (int l = 0; l < cache->cfg.n_layers; l++)
        if (cache->layers[l].cfg.scheme != CLKVQ_SCHEME_FP16)
            shape.packed = 1;
    char why[512];
    clkvq_status st = clkvq_attn_tuning_check(t, &shape, &ctx->info, why, sizeof why);
    return st == CLKVQ_OK ? st : clkvq_fail(ctx, st, "%s", why);
}

/* Multi-query decode multiplies the rows a chunk keeps (scores, outputs):
 * halve the chunk until they fit the variant's budget (private arrays of
 * the serial variant, local memory of the cooperative one). */
static void fit_chunk_to_rows(const clkvq_cache *cache, clkvq_attn_tuning *t, int n_queries)
{
    if (n_queries <= 1)
        return;
    int rows = cache->cfg.n_q_heads / cache->cfg.n_kv_heads * n_queries;
    if (t->variant == CLKVQ_ATTN_SERIAL) {
        while ((size_t)rows * t->chunk > 8192 && t->chunk / 2 >= t->vw &&
               (t->chunk / 2) % t->vw == 0)
            t->chunk /= 2;
        return;
    }
    while (clkvq_attn_local_bytes(t, rows, cache->cfg.head_dim) >
           cache->ctx->info.local_mem_bytes) {
        if (t->chunk / 2 >= t->wgs && (t->chunk / 2) % t->wgs == 0)
            t->chunk /= 2;
        else if (t->wgs > 1 && t->chunk % 2 == 0) {
            t->wgs /= 2;
            t->chunk /= 2;
        } else
            break; /* check_tuning reports what does not fit */
    }
}

clkvq_status clkvq_cache_set_tuning(clkvq_cache *cache, const clkvq_attn_tuning *tuning)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_set_tuning: cache is NULL");
    if (!tuning) {
        memset(&cache->tuning, 0, sizeof cache->tuning);
        return CLKVQ_OK;
    }
    clkvq_attn_tuning t;
    resolve_tuning(cache, 0, tuning, &t);
    clkvq_status st = check_tuning(cache->ctx, cache, &t, 1);
    if (st == CLKVQ_OK)
        cache->tuning = *tuning;
    return st;
}

clkvq_status clkvq_cache_get_tuning(const clkvq_cache *cache, clkvq_attn_tuning *out)
{
    if (!cache || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_get_tuning: NULL argument");
    resolve_tuning(cache, 0, &cache->tuning, out);
    return CLKVQ_OK;
}

/* The program variant of a layer's decode: shape, tunables, scheme and
 * both formats' rows of the table. */
static const char *attn_options(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                                const clkvq_attn_tuning *t, int n_queries, clkvq_defines *d)
{
    const clkvq_layer_config *lc = &layer->cfg;
    int fp16 = lc->scheme == CLKVQ_SCHEME_FP16;
    clkvq_defines_init(d);
    clkvq_defines_int(d, "HEAD_DIM", cache->cfg.head_dim);
    clkvq_defines_int(d, "GROUP_SIZE", fp16 ? 32 : lc->group_size);
    clkvq_defines_int(d, "QPK", cache->cfg.n_q_heads / cache->cfg.n_kv_heads);
    clkvq_defines_int(d, "NQ", n_queries);
    clkvq_defines_int(d, "CHUNK", t->chunk);
    clkvq_defines_int(d, "WGS", t->wgs);
    clkvq_defines_int(d, "VW", t->vw);
    clkvq_defines_int(d, "SCHEME", (int)lc->scheme);
    /* fp16 packs nothing: any row keeps the packed kernels compilable */
    clkvq_defines_format(d, "K_", fp16 ? CLKVQ_FMT_Q8 : lc->format_k);
    clkvq_defines_format(d, "V_", fp16 ? CLKVQ_FMT_Q8 : lc->format_v);
    clkvq_defines_int(d, "K_GW", fp16 ? 1 : layer->k.group_words);
    clkvq_defines_int(d, "V_GW", fp16 ? 1 : layer->v.group_words);
    clkvq_defines_params(d, lc->param_type, lc->zero_mode);
    clkvq_defines_int(d, "LAYOUT_K", (int)layer->k.layout);
    clkvq_defines_int(d, "LAYOUT_V", (int)layer->v.layout);
    clkvq_defines_int(d, "K_CHANNEL", !fp16 && layer->k.axis == CLKVQ_AXIS_CHANNEL);
    clkvq_defines_int(d, "QBLOCK", clkvq_layer_block(lc));
    clkvq_defines_int(d, "ROT", lc->rotate);
    return clkvq_defines_get(cache->ctx, d);
}

static clkvq_status ensure_buffer(clkvq_context *ctx, cl_mem *mem, size_t *have, size_t need,
                                  const char *what)
{
    if (*mem && *have >= need)
        return CLKVQ_OK;
    if (*mem)
        clReleaseMemObject(*mem);
    cl_int err;
    *mem = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_WRITE, need, NULL, &err);
    if (err != CL_SUCCESS) {
        *mem = NULL;
        *have = 0;
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s (%zu bytes): %s", what,
                          need, clkvq_cl_error_name(err));
    }
    *have = need;
    return CLKVQ_OK;
}

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

/* Chunks the longest sequence needs, for packed and for fp16 tokens.
 * Packed chunks sit at multiples of the chunk (attention.cl), from the one
 * holding the first packed token. */
static void count_chunks(const clkvq_cache *cache, const clkvq_cache_layer *layer, int chunk,
                         int *n_packed, int *n_fp)
{
    *n_packed = *n_fp = 0;
    for (int s = 0; s < cache->cfg.n_seqs; s++) {
        int n = layer->length[s];
        int sink_end = clkvq_cache_n_sink_eff(layer, n);
        int qk = clkvq_cache_q_end(layer, 0, n);
        int packed = layer->cfg.scheme == CLKVQ_SCHEME_FP16 || qk <= sink_end
                         ? 0
                         : ceil_div(qk, chunk) - sink_end / chunk;
        int fp = ceil_div(sink_end + (n - qk), chunk);
        if (packed > *n_packed)
            *n_packed = packed;
        if (fp > *n_fp)
            *n_fp = fp;
    }
    if (*n_packed + *n_fp == 0)
        *n_fp = 1; /* every sequence empty: one empty chunk keeps the merge uniform */
}

typedef struct {
    cl_event ev[4];
    int n;
} event_list;

static clkvq_status enqueue(clkvq_context *ctx, cl_kernel k, cl_uint dims, const size_t *global,
                            const size_t *local, event_list *events, const char *what)
{
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, k, dims, NULL, global, local, 0, NULL,
                                        &events->ev[events->n]);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, what);
    events->n++;
    return CLKVQ_OK;
}

/* The page and region arguments of both chunk kernels, in their order. */
static void args_regions(clkvq_args *a, const clkvq_cache *cache, const clkvq_cache_layer *layer,
                         int max_blocks)
{
    clkvq_args_int(a, cache->block_size);
    clkvq_args_int(a, max_blocks);
    clkvq_args_int(a, cache->n_pages);
    clkvq_args_int(a, layer->fp_slots);
    clkvq_args_int(a, layer->ring);
    clkvq_args_int(a, layer->cfg.n_sink);
    clkvq_args_int(a, layer->cfg.window);
    clkvq_args_int(a, layer->cfg.residual);
}

static clkvq_status run_decode(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                               float scale, event_list *events)
{
    clkvq_context *ctx = cache->ctx;
    const clkvq_cache_config *cfg = &cache->cfg;
    clkvq_cache_layer *layer = &cache->layers[l];
    clkvq_attn_tuning t;
    resolve_tuning(cache, l, &cache->tuning, &t);
    fit_chunk_to_rows(cache, &t, n_queries);
    clkvq_status st = check_tuning(ctx, cache, &t, n_queries);
    if (st != CLKVQ_OK)
        return st;
    cl_mem table;
    int max_blocks;
    if ((st = clkvq_cache_table(cache, l, &table, &max_blocks)) != CLKVQ_OK)
        return st;
    int fp16 = layer->cfg.scheme == CLKVQ_SCHEME_FP16;
    int group = fp16 ? 32 : layer->cfg.group_size, n_groups = cfg->head_dim / group;
    int n_packed, n_fp;
    count_chunks(cache, layer, t.chunk, &n_packed, &n_fp);
    int n_slots = n_packed + n_fp;
    size_t n_rows = (size_t)cfg->n_seqs * n_queries; /* (sequence, query) pairs */
    size_t n_q = n_rows * cfg->n_q_heads;

    size_t qs_bytes = n_q * cfg->head_dim * sizeof(float);
    size_t qsum_bytes = n_q * n_groups * sizeof(float);
    if ((st = ensure_buffer(ctx, &cache->q_scratch, &cache->q_scratch_bytes, qs_bytes,
                            "query scratch")) != CLKVQ_OK ||
        (st = ensure_buffer(ctx, &cache->qsum_scratch, &cache->qsum_scratch_bytes, qsum_bytes,
                            "query-sum scratch")) != CLKVQ_OK ||
        (st = ensure_buffer(ctx, &cache->partials, &cache->partials_bytes,
                            n_q * n_slots * (cfg->head_dim + 2) * sizeof(float),
                            "partial results")) != CLKVQ_OK)
        return st;
    cl_mem qs = cache->q_scratch, qsum = cache->qsum_scratch;
    cl_int err = CL_SUCCESS;
    for (int s = 0; s < cfg->n_seqs; s++)
        cache->host_len[s] = layer->length[s];
    err = clEnqueueWriteBuffer(ctx->queue, cache->seq_len, CL_TRUE, 0,
                               sizeof(int) * (size_t)cfg->n_seqs, cache->host_len, 0, NULL, NULL);
    if (err != CL_SUCCESS)
        st = clkvq_cl_fail(ctx, err, "uploading sequence lengths");

    clkvq_defines defines;
    const char *options = attn_options(cache, layer, &t, n_queries, &defines);
    if (st == CLKVQ_OK && !options)
        st = CLKVQ_ERR_BUILD;
    cl_kernel prep = NULL, packed = NULL, fpk = NULL, merge = NULL;
    if (st == CLKVQ_OK)
        st = clkvq_kernel_get(ctx, g_attn_sources, 2, options, "clkvq_attn_prepare_q", &prep);
    int serial = t.variant == CLKVQ_ATTN_SERIAL;
    if (st == CLKVQ_OK && !fp16)
        st = clkvq_kernel_get(ctx, g_attn_sources, 2, options,
                              serial ? "clkvq_attn_packed_serial" : "clkvq_attn_packed_chunk",
                              &packed);
    if (st == CLKVQ_OK)
        st = clkvq_kernel_get(ctx, g_attn_sources, 2, options,
                              serial ? "clkvq_attn_fp16_serial" : "clkvq_attn_fp16_chunk", &fpk);
    /* transformed layers map outputs back row by row: the row merge */
    int row_merge = serial || clkvq_layer_transforms(layer);
    if (st == CLKVQ_OK)
        st = clkvq_kernel_get(ctx, g_attn_sources, 2, options,
                              row_merge ? "clkvq_attn_merge_serial" : "clkvq_attn_merge", &merge);

    clkvq_args a;
    if (st == CLKVQ_OK) {
        clkvq_args_begin(&a, prep, 0);
        clkvq_args_mem(&a, q);
        clkvq_args_mem(&a, layer->k.perm);
        clkvq_args_mem(&a, qs);
        clkvq_args_mem(&a, qsum);
        clkvq_args_int(&a, (int)n_rows);
        clkvq_args_int(&a, cfg->n_q_heads);
        clkvq_args_float(&a, scale);
        clkvq_args_int(&a, (int)layer->cfg.rot_seed);
        size_t local = MERGE_LOCAL_SIZE, global = clkvq_round_up(n_q, local);
        if ((st = clkvq_args_end(ctx, &a, "prepare_q")) == CLKVQ_OK)
            st = enqueue(ctx, prep, 1, &global, &local, events, "prepare_q");
    }
    size_t wg = serial ? 1 : (size_t)t.wgs;
    size_t local3[3] = {wg, 1, 1};
    if (st == CLKVQ_OK && !fp16 && n_packed > 0) {
        clkvq_args_begin(&a, packed, 0);
        clkvq_args_mem(&a, qs);
        clkvq_args_mem(&a, qsum);
        clkvq_args_mem(&a, layer->k.codes);
        clkvq_args_mem(&a, layer->k.params);
        clkvq_args_mem(&a, layer->v.codes);
        clkvq_args_mem(&a, layer->v.params);
        clkvq_args_mem(&a, layer->v.fp);
        clkvq_args_mem(&a, cache->seq_len);
        clkvq_args_mem(&a, table);
        clkvq_args_mem(&a, cache->partials);
        clkvq_args_int(&a, cfg->n_q_heads);
        clkvq_args_int(&a, cfg->n_kv_heads);
        args_regions(&a, cache, layer, max_blocks);
        clkvq_args_int(&a, n_slots);
        size_t global[3] = {(size_t)n_packed * wg, (size_t)cfg->n_kv_heads, (size_t)cfg->n_seqs};
        if ((st = clkvq_args_end(ctx, &a, "packed attention chunks")) == CLKVQ_OK)
            st = enqueue(ctx, packed, 3, global, local3, events, "packed attention chunks");
    }
    if (st == CLKVQ_OK && n_fp > 0) {
        clkvq_args_begin(&a, fpk, 0);
        clkvq_args_mem(&a, qs);
        clkvq_args_mem(&a, layer->k.fp);
        clkvq_args_mem(&a, layer->v.fp);
        clkvq_args_mem(&a, cache->seq_len);
        clkvq_args_mem(&a, table);
        clkvq_args_mem(&a, cache->partials);
        clkvq_args_int(&a, cfg->n_q_heads);
        clkvq_args_int(&a, cfg->n_kv_heads);
        args_regions(&a, cache, layer, max_blocks);
        clkvq_args_int(&a, n_packed); /* the first fp16 slot */
        clkvq_args_int(&a, n_slots);
        size_t global[3] = {(size_t)n_fp * wg, (size_t)cfg->n_kv_heads, (size_t)cfg->n_seqs};
        if ((st = clkvq_args_end(ctx, &a, "fp16 attention chunks")) == CLKVQ_OK)
            st = enqueue(ctx, fpk, 3, global, local3, events, "fp16 attention chunks");
    }
    if (st == CLKVQ_OK) {
        clkvq_args_begin(&a, merge, 0);
        clkvq_args_mem(&a, cache->partials);
        clkvq_args_mem(&a, layer->v.perm);
        clkvq_args_mem(&a, cache->seq_len);
        clkvq_args_mem(&a, out);
        clkvq_args_int(&a, (int)n_rows);
        clkvq_args_int(&a, cfg->n_q_heads);
        clkvq_args_int(&a, n_slots);
        if (row_merge) {
            clkvq_args_mem(&a, layer->v.mean);
            clkvq_args_int(&a, (int)layer->cfg.rot_seed);
        }
        size_t local = row_merge ? 1 : MERGE_LOCAL_SIZE;
        size_t global = row_merge ? n_q : clkvq_round_up(n_q * cfg->head_dim, local);
        if ((st = clkvq_args_end(ctx, &a, "merge")) == CLKVQ_OK)
            st = enqueue(ctx, merge, 1, &global, &local, events, "merge");
    }
    if (events->n > 0) {
        err = clWaitForEvents((cl_uint)events->n, events->ev);
        if (err != CL_SUCCESS && st == CLKVQ_OK)
            st = clkvq_cl_fail(ctx, err, "waiting for decode attention");
    }
    return st;
}

static clkvq_status decode_impl(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                                float scale)
{
    clkvq_context *ctx = cache->ctx;
    ctx->last_device_ms = -1.0;
    if (l < 0 || l >= cache->cfg.n_layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d is outside 0..%d", l,
                          cache->cfg.n_layers - 1);
    if (n_queries < 1 || n_queries > CLKVQ_MAX_QUERIES)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "n_queries %d is outside 1..%d", n_queries,
                          CLKVQ_MAX_QUERIES);
    if (!isfinite(scale) || scale == 0.0f)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "scale %g must be finite and non-zero",
                          (double)scale);
    size_t need = (size_t)cache->cfg.n_seqs * n_queries * cache->cfg.n_q_heads *
                  cache->cfg.head_dim * sizeof(float);
    clkvq_status st;
    if ((st = clkvq_check_buffer(ctx, q, "q", need)) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, out, "out", need)) != CLKVQ_OK)
        return st;
    event_list events = {{0}, 0};
    st = run_decode(cache, l, n_queries, q, out, scale, &events);
    if (st == CLKVQ_OK)
        ctx->last_device_ms = clkvq_events_ms(events.ev, events.n);
    for (int i = 0; i < events.n; i++)
        clReleaseEvent(events.ev[i]);
    return st;
}

/* The library's own pages: the runtime-table calls are the others. */
static clkvq_status own_pages(clkvq_cache *cache, const char *fn)
{
    if (!cache->cfg.runtime_tables)
        return CLKVQ_OK;
    return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                      "%s: this cache's pages belong to the runtime: decode with "
                      "clkvq_cache_decode_paged and its block table",
                      fn);
}

clkvq_status clkvq_cache_decode(clkvq_cache *cache, int l, cl_mem q, cl_mem out, float scale)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_decode: cache is NULL");
    clkvq_clear_error(cache->ctx);
    clkvq_status st = own_pages(cache, "clkvq_cache_decode");
    return st == CLKVQ_OK ? decode_impl(cache, l, 1, q, out, scale) : st;
}

clkvq_status clkvq_cache_decode_multi(clkvq_cache *cache, int l, int n_queries, cl_mem q,
                                      cl_mem out, float scale)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_decode_multi: cache is NULL");
    clkvq_clear_error(cache->ctx);
    clkvq_status st = own_pages(cache, "clkvq_cache_decode_multi");
    return st == CLKVQ_OK ? decode_impl(cache, l, n_queries, q, out, scale) : st;
}

clkvq_status clkvq_cache_decode_paged(clkvq_cache *cache, int l, int n_queries, cl_mem q,
                                      cl_mem out, float scale, cl_mem block_table,
                                      int max_blocks)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_decode_paged: cache is NULL");
    clkvq_clear_error(cache->ctx);
    clkvq_status st = clkvq_cache_use_table(cache, block_table, max_blocks);
    return st == CLKVQ_OK ? decode_impl(cache, l, n_queries, q, out, scale) : st;
}

clkvq_status clkvq_cache_decode_host(clkvq_cache *cache, int l, const float *q, float *out,
                                     float scale)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_decode_host: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    if (!q || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_decode_host: q or out is NULL");
    size_t bytes = (size_t)cache->cfg.n_seqs * cache->cfg.n_q_heads * cache->cfg.head_dim *
                   sizeof(float);
    cl_int err;
    cl_mem qm = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, bytes,
                               (void *)q, &err);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "uploading q");
    cl_mem om = clCreateBuffer(ctx->cl_ctx, CL_MEM_WRITE_ONLY, bytes, NULL, &err);
    if (err != CL_SUCCESS) {
        clReleaseMemObject(qm);
        return clkvq_cl_fail(ctx, err, "allocating out");
    }
    clkvq_status st = clkvq_cache_decode(cache, l, qm, om, scale);
    if (st == CLKVQ_OK) {
        double ms = ctx->last_device_ms;
        err = clEnqueueReadBuffer(ctx->queue, om, CL_TRUE, 0, bytes, out, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "reading out");
        ctx->last_device_ms = ms;
    }
    clReleaseMemObject(qm);
    clReleaseMemObject(om);
    return st;
}

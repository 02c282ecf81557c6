/* Fused decode attention: host side (tunables, scratch, launches). The
 * kernels are cl_kernels/attention.cl; the cache layout is kv_cache.h's. */
#include "kv_cache.h"
#include "program_cache.h"
#include "quant_format.h"
#include "tuning_db.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MERGE_LOCAL_SIZE 64

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
                                 const clkvq_attn_tuning *t)
{
    int qpk = cache->cfg.n_q_heads / cache->cfg.n_kv_heads;
    if (t->variant != CLKVQ_ATTN_COOPERATIVE && t->variant != CLKVQ_ATTN_SERIAL)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "attention variant %d is unknown",
                          (int)t->variant);
    if (t->variant == CLKVQ_ATTN_SERIAL) {
        if (t->vw != 4 && t->vw != 8 && t->vw != 16)
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "vw %d must be 4, 8 or 16", t->vw);
        if (t->chunk <= 0 || t->chunk % t->vw != 0)
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "chunk %d must be a positive multiple of vw %d", t->chunk, t->vw);
        for (int l = 0; l < cache->cfg.n_layers; l++)
            if (cache->layers[l].cfg.scheme != CLKVQ_SCHEME_FP16 && !planar_layouts(cache))
                return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                                  "the serial variant reads group-planar packed layouts; this "
                                  "cache is token-major");
        return CLKVQ_OK;
    }
    if (t->wgs <= 0 || (t->wgs & (t->wgs - 1)) != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "wgs %d must be a power of two", t->wgs);
    if (t->chunk <= 0 || t->chunk % t->wgs != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "chunk %d must be a positive multiple of wgs %d",
                          t->chunk, t->wgs);
    if ((size_t)t->wgs > ctx->info.max_work_group_size)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT, "wgs %d exceeds the device's %zu", t->wgs,
                          ctx->info.max_work_group_size);
    size_t local = sizeof(float) * (size_t)qpk *
                   ((size_t)cache->cfg.head_dim * 2 + (size_t)t->chunk + (size_t)t->wgs);
    if (local > ctx->info.local_mem_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "chunk %d x %d query heads needs %zu bytes of local memory, the device "
                          "has %llu",
                          t->chunk, qpk, local, (unsigned long long)ctx->info.local_mem_bytes);
    return CLKVQ_OK;
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
    clkvq_status st = check_tuning(cache->ctx, cache, &t);
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

static void attn_options(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                         const clkvq_attn_tuning *t, char *buf, size_t size)
{
    const clkvq_layer_config *lc = &layer->cfg;
    int fp16 = lc->scheme == CLKVQ_SCHEME_FP16;
    snprintf(buf, size,
             "-D HEAD_DIM=%d -D GROUP_SIZE=%d -D QPK=%d -D CHUNK=%d -D WGS=%d -D SCHEME=%d "
             "-D K_FMT=%d -D V_FMT=%d -D K_GW=%d -D V_GW=%d -D PARAM_FP8=%d -D ZERO_INT=%d "
             "-D LAYOUT_K=%d -D LAYOUT_V=%d -D VW=%d",
             cache->cfg.head_dim, fp16 ? 32 : lc->group_size,
             cache->cfg.n_q_heads / cache->cfg.n_kv_heads, t->chunk, t->wgs, (int)lc->scheme,
             fp16 ? 0 : (int)lc->format_k, fp16 ? 0 : (int)lc->format_v,
             fp16 ? 1 : layer->k.group_words, fp16 ? 1 : layer->v.group_words,
             lc->param_type == CLKVQ_PARAM_FP8_E4M3, lc->zero_mode == CLKVQ_ZERO_INT,
             (int)layer->k.layout, (int)layer->v.layout, t->vw);
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

/* Chunks the longest sequence needs, for packed and for fp16 tokens. */
static void count_chunks(const clkvq_cache *cache, const clkvq_cache_layer *layer, int chunk,
                         int *n_packed, int *n_fp)
{
    *n_packed = *n_fp = 0;
    for (int s = 0; s < cache->cfg.n_seqs; s++) {
        int n = layer->length[s];
        int sink_end = clkvq_cache_n_sink_eff(layer, n);
        int qk = clkvq_cache_q_end(layer, 0, n);
        int packed = layer->cfg.scheme == CLKVQ_SCHEME_FP16 ? 0 : ceil_div(qk - sink_end, chunk);
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

static cl_int set_args(cl_kernel k, int n, const void *const *values, const size_t *sizes)
{
    cl_int err = CL_SUCCESS;
    for (int i = 0; i < n; i++)
        err |= clSetKernelArg(k, (cl_uint)i, sizes[i], values[i]);
    return err;
}

#define MEM_ARG(m) ((m) ? (const void *)&(m) : NULL)

static clkvq_status run_decode(clkvq_cache *cache, int l, cl_mem q, cl_mem out, float scale,
                               event_list *events)
{
    clkvq_context *ctx = cache->ctx;
    const clkvq_cache_config *cfg = &cache->cfg;
    clkvq_cache_layer *layer = &cache->layers[l];
    clkvq_attn_tuning t;
    resolve_tuning(cache, l, &cache->tuning, &t);
    clkvq_status st = check_tuning(ctx, cache, &t);
    if (st != CLKVQ_OK)
        return st;
    int fp16 = layer->cfg.scheme == CLKVQ_SCHEME_FP16;
    int group = fp16 ? 32 : layer->cfg.group_size, n_groups = cfg->head_dim / group;
    int n_packed, n_fp;
    count_chunks(cache, layer, t.chunk, &n_packed, &n_fp);
    int n_slots = n_packed + n_fp;
    size_t n_q = (size_t)cfg->n_seqs * cfg->n_q_heads;

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

    char options[512];
    attn_options(cache, layer, &t, options, sizeof options);
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
    if (st == CLKVQ_OK)
        st = clkvq_kernel_get(ctx, g_attn_sources, 2, options,
                              serial ? "clkvq_attn_merge_serial" : "clkvq_attn_merge", &merge);

    cl_int n_seqs = cfg->n_seqs, n_qh = cfg->n_q_heads, n_kv = cfg->n_kv_heads;
    cl_int cap = clkvq_cache_stride(cfg->capacity), fp_slots = layer->fp_slots, ring = layer->ring;
    cl_int n_sink = layer->cfg.n_sink, window = layer->cfg.window, residual = layer->cfg.residual;
    cl_int slots = n_slots, slot0 = n_packed;
    if (st == CLKVQ_OK) {
        const void *v[] = {&q, MEM_ARG(layer->k.perm), &qs, &qsum, &n_seqs, &n_qh, &scale};
        const size_t z[] = {sizeof(cl_mem), sizeof(cl_mem), sizeof(cl_mem), sizeof(cl_mem),
                            sizeof(cl_int), sizeof(cl_int), sizeof(float)};
        size_t local = MERGE_LOCAL_SIZE, global = clkvq_round_up(n_q * n_groups, local);
        if ((err = set_args(prep, 7, v, z)) != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "setting prepare_q arguments");
        else
            st = enqueue(ctx, prep, 1, &global, &local, events, "prepare_q");
    }
    size_t wg = serial ? 1 : (size_t)t.wgs;
    size_t local3[3] = {wg, 1, 1};
    if (st == CLKVQ_OK && !fp16 && n_packed > 0) {
        const void *v[] = {&qs, &qsum, &layer->k.codes, &layer->k.params, &layer->v.codes,
                           &layer->v.params, &layer->v.fp, &cache->seq_len, &cache->partials,
                           &n_qh, &n_kv, &cap, &fp_slots, &ring, &n_sink, &window, &residual,
                           &slots};
        size_t z[18];
        for (int i = 0; i < 18; i++)
            z[i] = i < 9 ? sizeof(cl_mem) : sizeof(cl_int);
        size_t global[3] = {(size_t)n_packed * wg, (size_t)n_kv, (size_t)n_seqs};
        if ((err = set_args(packed, 18, v, z)) != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "setting packed chunk arguments");
        else
            st = enqueue(ctx, packed, 3, global, local3, events, "packed attention chunks");
    }
    if (st == CLKVQ_OK && n_fp > 0) {
        const void *v[] = {&qs, &layer->k.fp, &layer->v.fp, &cache->seq_len, &cache->partials,
                           &n_qh, &n_kv, &fp_slots, &ring, &n_sink, &window, &residual, &slot0,
                           &slots};
        size_t z[14];
        for (int i = 0; i < 14; i++)
            z[i] = i < 5 ? sizeof(cl_mem) : sizeof(cl_int);
        size_t global[3] = {(size_t)n_fp * wg, (size_t)n_kv, (size_t)n_seqs};
        if ((err = set_args(fpk, 14, v, z)) != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "setting fp16 chunk arguments");
        else
            st = enqueue(ctx, fpk, 3, global, local3, events, "fp16 attention chunks");
    }
    if (st == CLKVQ_OK) {
        const void *v[] = {&cache->partials, MEM_ARG(layer->v.perm), &cache->seq_len, &out,
                           &n_seqs, &n_qh, &slots};
        const size_t z[] = {sizeof(cl_mem), sizeof(cl_mem), sizeof(cl_mem), sizeof(cl_mem),
                            sizeof(cl_int), sizeof(cl_int), sizeof(cl_int)};
        size_t local = serial ? 1 : MERGE_LOCAL_SIZE;
        size_t global = serial ? n_q : clkvq_round_up(n_q * cfg->head_dim, local);
        if ((err = set_args(merge, 7, v, z)) != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "setting merge arguments");
        else
            st = enqueue(ctx, merge, 1, &global, &local, events, "merge");
    }
    if (events->n > 0) {
        err = clWaitForEvents((cl_uint)events->n, events->ev);
        if (err != CL_SUCCESS && st == CLKVQ_OK)
            st = clkvq_cl_fail(ctx, err, "waiting for decode attention");
    }
    return st;
}

clkvq_status clkvq_cache_decode(clkvq_cache *cache, int l, cl_mem q, cl_mem out, float scale)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_decode: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    clkvq_clear_error(ctx);
    ctx->last_device_ms = -1.0;
    if (l < 0 || l >= cache->cfg.n_layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d is outside 0..%d", l,
                          cache->cfg.n_layers - 1);
    if (!(scale == scale) || scale == 0.0f)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "scale %g must be finite and non-zero",
                          (double)scale);
    size_t need = (size_t)cache->cfg.n_seqs * cache->cfg.n_q_heads * cache->cfg.head_dim *
                  sizeof(float);
    clkvq_status st;
    if ((st = clkvq_check_buffer(ctx, q, "q", need)) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, out, "out", need)) != CLKVQ_OK)
        return st;
    event_list events = {{0}, 0};
    st = run_decode(cache, l, q, out, scale, &events);
    if (st == CLKVQ_OK)
        ctx->last_device_ms = clkvq_events_ms(events.ev, events.n);
    for (int i = 0; i < events.n; i++)
        clReleaseEvent(events.ev[i]);
    return st;
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

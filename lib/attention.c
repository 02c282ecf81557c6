/* Fused decode attention: host side (tunables, split sizing, launches).
 * The kernels are cl_kernels/attention.cl (shared) with attention_coop.cl
 * (the cooperative variant) or attention_serial.cl (the serial one); the
 * cache layout is kv_cache.h's.
 *
 * No host round trip per decode: the sequence lengths go up with a
 * non-blocking write when they changed, the kernels are enqueued, and the
 * call returns (include/clkvq.h, clkvq_cache_decode). Profiling events, when
 * the queue has them, are handed to the context and waited for only when
 * clkvq_last_device_ms asks. */
#include "kv_cache.h"
#include "attn_fit.h"
#include "kernel_args.h"
#include "kernel_defines.h"
#include "program_cache.h"
#include "quant_format.h"
#include "tuning_db.h"
#ifdef CLKVQ_TESTING
#include "test_hooks.h"
#endif

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef CLKVQ_TESTING
int clkvq_attn_planted_bug_for_tests;
#endif

#define PREPARE_LOCAL_SIZE 64
#define MERGE_LOCAL_SIZE 64
/* Queries per sequence a decode takes (speculative drafts). */
#define CLKVQ_MAX_QUERIES 16
#define LOG2_E 1.4426950408889634

static const char *const g_coop_sources[] = {"attention.cl", "attention_coop.cl"};
static const char *const g_serial_sources[] = {"attention.cl", "attention_serial.cl"};

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

/* The non-zero fields of from over t (vwpl 0, "automatic", is a value:
 * it comes along with a variant). */
static void take_fields(clkvq_attn_tuning *t, const clkvq_attn_tuning *from, int with_vwpl)
{
    if (from->variant)
        t->variant = from->variant;
    if (from->wgs)
        t->wgs = from->wgs;
    if (from->chunk)
        t->chunk = from->chunk;
    if (from->vw)
        t->vw = from->vw;
    if (from->tpl)
        t->tpl = from->tpl;
    if (from->vwpl || with_vwpl)
        t->vwpl = from->vwpl;
    if (from->waves)
        t->waves = from->waves;
}

/* The tunables for layer l: the tuning database's entry nearest this
 * decode's batch and length (max_len < 0: the capacity, as at create) when
 * the cache's layouts allow it, else built-in defaults; then the caller's
 * non-zero overrides. */
static void resolve_tuning(const clkvq_cache *cache, int l, int max_len,
                           const clkvq_attn_tuning *in, clkvq_attn_tuning *t)
{
    *t = default_tuning(cache);
    const clkvq_cache_layer *layer = &cache->layers[l];
    const clkvq_tune_params *tuned = cache->tuned ? &cache->tuned[l] : NULL;
    if (max_len >= 0 && layer->n_tuned_set > 0) {
        const clkvq_layer_config *lc = &layer->cfg;
        clkvq_tune_shape now = {lc->scheme, lc->format_k, lc->format_v, lc->group_size,
                                cache->cfg.head_dim, layer->n_q_heads,
                                layer->n_kv_heads, max_len > 0 ? max_len : 1,
                                cache->cfg.n_seqs};
        int i = clkvq_tuning_nearest(layer->tuned_set, layer->n_tuned_set, &now);
        if (i >= 0)
            tuned = &layer->tuned_set[i].params;
    }
    if (tuned && tuned->attn.variant &&
        (tuned->attn.variant != CLKVQ_ATTN_SERIAL || planar_layouts(cache)))
        take_fields(t, &tuned->attn, 1);
    take_fields(t, in, 0);
}

/* What attn_fit.c checks a layer against; the fp16 scheme's V lanes follow
 * q8 in groups of 32 (attn_options builds it so). */
static clkvq_attn_fit_shape fit_shape(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                                      int n_queries)
{
    int fp16 = layer->cfg.scheme == CLKVQ_SCHEME_FP16;
    clkvq_attn_fit_shape shape = {cache->cfg.n_q_heads / cache->cfg.n_kv_heads, n_queries,
                                  cache->cfg.head_dim, !fp16, cache->cfg.layout_k,
                                  cache->cfg.layout_v, fp16 ? CLKVQ_FMT_Q8 : layer->cfg.format_v,
                                  fp16 ? 32 : layer->cfg.group_size, layer->cfg.rotate};
    return shape;
}

static clkvq_status check_layer(clkvq_context *ctx, const clkvq_cache *cache, int l,
                                const clkvq_attn_tuning *t, int n_queries)
{
    clkvq_attn_fit_shape shape = fit_shape(cache, &cache->layers[l], n_queries);
    char why[512];
    clkvq_status st = clkvq_attn_tuning_check(t, &shape, &ctx->info, why, sizeof why);
    return st == CLKVQ_OK ? st
                          : clkvq_fail(ctx, st, "layer %d: %s", cache->layers[l].model_layer, why);
}

clkvq_status clkvq_cache_set_tuning(clkvq_cache *cache, const clkvq_attn_tuning *tuning)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_set_tuning: cache is NULL");
    if (!tuning) {
        memset(&cache->tuning, 0, sizeof cache->tuning);
        return CLKVQ_OK;
    }
    for (int l = 0; l < cache->n_stored; l++) {
        clkvq_attn_tuning t;
        resolve_tuning(cache, l, -1, tuning, &t);
        clkvq_status st = check_layer(cache->ctx, cache, l, &t, 1);
        if (st != CLKVQ_OK)
            return st;
    }
    cache->tuning = *tuning;
    return CLKVQ_OK;
}

/* The longest sequence of layer l: the length a decode's tunables key on. */
static int max_length(const clkvq_cache *cache, int l)
{
    int max_len = 0;
    for (int s = 0; s < cache->cfg.n_seqs; s++)
        max_len = cache->layers[l].length[s] > max_len ? cache->layers[l].length[s] : max_len;
    return max_len;
}

clkvq_status clkvq_cache_get_tuning(const clkvq_cache *cache, clkvq_attn_tuning *out)
{
    if (!cache || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_get_tuning: NULL argument");
    resolve_tuning(cache, 0, max_length(cache, 0), &cache->tuning, out);
    return CLKVQ_OK;
}

/* The serial variant's chunk keeps ROWS x chunk scores in private arrays:
 * several queries per sequence halve it until they fit. */
static void fit_serial_chunk(const clkvq_cache *cache, clkvq_attn_tuning *t, int n_queries)
{
    int rows = cache->cfg.n_q_heads / cache->cfg.n_kv_heads * n_queries;
    while (n_queries > 1 && (size_t)rows * t->chunk > 8192 && t->chunk / 2 >= t->vw &&
           (t->chunk / 2) % t->vw == 0)
        t->chunk /= 2;
}

/* What both variants' programs are built for: the shape, the scheme and
 * both formats' rows of the table. */
static void common_defines(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                           int n_queries, int fp16_gw, clkvq_defines *d)
{
    const clkvq_layer_config *lc = &layer->cfg;
    int fp16 = lc->scheme == CLKVQ_SCHEME_FP16;
    clkvq_defines_int(d, "HEAD_DIM", cache->cfg.head_dim);
    clkvq_defines_int(d, "GROUP_SIZE", fp16 ? 32 : lc->group_size);
    clkvq_defines_int(d, "QPK", cache->cfg.n_q_heads / cache->cfg.n_kv_heads);
    clkvq_defines_int(d, "NQ", n_queries);
    clkvq_defines_int(d, "SCHEME", (int)lc->scheme);
    /* fp16 packs nothing: a row of the table keeps the kernels compilable */
    clkvq_defines_format(d, "K_", fp16 ? CLKVQ_FMT_Q8 : lc->format_k);
    clkvq_defines_format(d, "V_", fp16 ? CLKVQ_FMT_Q8 : lc->format_v);
    clkvq_defines_int(d, "K_GW", fp16 ? fp16_gw : layer->k.group_words);
    clkvq_defines_int(d, "V_GW", fp16 ? fp16_gw : layer->v.group_words);
    clkvq_defines_params(d, lc->param_type, lc->zero_mode);
    clkvq_defines_int(d, "LAYOUT_K", (int)layer->k.layout);
    clkvq_defines_int(d, "LAYOUT_V", (int)layer->v.layout);
    clkvq_defines_int(d, "K_CHANNEL", !fp16 && layer->k.axis == CLKVQ_AXIS_CHANNEL);
    clkvq_defines_int(d, "QBLOCK", clkvq_layer_block(lc));
    clkvq_defines_int(d, "ROT", lc->rotate);
}

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

/* The device's copy of the layer's lengths, written without blocking when
 * an append, truncate or fork changed them (kv_cache.h says why the host
 * array outlives the write). */
static clkvq_status upload_lengths(clkvq_cache *cache, clkvq_cache_layer *layer)
{
    if (!layer->len_dirty)
        return CLKVQ_OK;
    cl_int err = clEnqueueWriteBuffer(cache->ctx->queue, layer->len_mem, CL_FALSE, 0,
                                      sizeof(cl_int) * (size_t)cache->cfg.n_seqs, layer->length,
                                      0, NULL, NULL);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(cache->ctx, err, "uploading sequence lengths");
    layer->len_dirty = 0;
    cache->async_writes = 1;
    return CLKVQ_OK;
}

typedef struct {
    cl_event ev[4];
    int n;
    int timed; /* collect events (the queue has profiling) */
} event_list;

static clkvq_status enqueue(clkvq_context *ctx, cl_kernel k, cl_uint dims, const size_t *global,
                            const size_t *local, event_list *events, const char *what)
{
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, k, dims, NULL, global, local, 0, NULL,
                                        events->timed ? &events->ev[events->n] : NULL);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, what);
    if (events->timed)
        events->n++;
    return CLKVQ_OK;
}

/* The page and region arguments of the chunk kernels, in their order. */
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

/* A built kernel against what it was planned for: the driver may allow
 * fewer work-items (registers) or count more local memory than the plan. */
static clkvq_status check_built(clkvq_context *ctx, cl_kernel k, size_t wgs, const char *what)
{
    size_t max_wg = 0;
    cl_ulong local = 0;
    cl_int err = clGetKernelWorkGroupInfo(k, ctx->device, CL_KERNEL_WORK_GROUP_SIZE,
                                          sizeof max_wg, &max_wg, NULL);
    if (err == CL_SUCCESS)
        err = clGetKernelWorkGroupInfo(k, ctx->device, CL_KERNEL_LOCAL_MEM_SIZE, sizeof local,
                                       &local, NULL);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, what);
    if (max_wg < wgs || local > ctx->info.local_mem_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "%s as built runs at most %zu work-items (needs %zu) and uses %llu "
                          "bytes of local memory (the device has %llu)",
                          what, max_wg, wgs, (unsigned long long)local,
                          (unsigned long long)ctx->info.local_mem_bytes);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ cooperative */

/* Tiles of a sequence of length n, as attention_coop.cl's seq_tiles. */
static int seq_tiles(const clkvq_cache_layer *layer, int n, int tile)
{
    int sink_end = clkvq_cache_n_sink_eff(layer, n);
    int qk = clkvq_cache_q_end(layer, 0, n);
    int n_pk = qk > sink_end ? ceil_div(qk, tile) - sink_end / tile : 0;
    return n_pk + ceil_div(sink_end + (n - qk), tile);
}

/* Work-groups the decode needs with tps tiles per split. */
static long split_groups(const clkvq_cache_layer *layer, int n_seqs, int tile, int tps,
                         long per_split)
{
    long groups = 0;
    for (int s = 0; s < n_seqs; s++)
        groups += ceil_div(seq_tiles(layer, layer->length[s], tile), tps) * per_split;
    return groups;
}

/* FlashInfer's rule (PartitionPagedKVCacheBinarySearchMinNumPagePerBatch):
 * no split when sequences x kv heads (x row blocks) already fill max_grid
 * work-groups; else the fewest tiles per split whose work-groups still fit
 * in max_grid. *n_slots: splits of the longest sequence. */
static int choose_split(const clkvq_cache_layer *layer, int n_seqs, int tile, long per_split,
                        long max_grid, int *n_slots)
{
    int hi = 1;
    for (int s = 0; s < n_seqs; s++) {
        int t = seq_tiles(layer, layer->length[s], tile);
        hi = t > hi ? t : hi;
    }
    int tps = hi;
    if ((long)n_seqs * per_split < max_grid) {
        int lo = 1;
        while (lo < hi) {
            int mid = lo + (hi - lo) / 2;
            if (split_groups(layer, n_seqs, tile, mid, per_split) > max_grid)
                lo = mid + 1;
            else
                hi = mid;
        }
        tps = lo;
    }
    *n_slots = 1;
    for (int s = 0; s < n_seqs; s++) {
        int k = ceil_div(seq_tiles(layer, layer->length[s], tile), tps);
        *n_slots = k > *n_slots ? k : *n_slots;
    }
    return tps;
}

static const char *coop_options(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                                const clkvq_attn_coop_plan *plan, int n_queries,
                                clkvq_defines *d)
{
    clkvq_defines_init(d);
    common_defines(cache, layer, n_queries, clkvq_group_words(CLKVQ_FMT_Q8, 32), d);
    clkvq_defines_int(d, "WGS", plan->wgs);
    clkvq_defines_int(d, "TPL", plan->tpl);
    clkvq_defines_int(d, "VU", plan->vu);
    clkvq_defines_int(d, "RB", plan->rb);
    clkvq_defines_int(d, "MWGS", plan->mwgs);
#ifdef CLKVQ_TESTING
    if (clkvq_attn_planted_bug_for_tests)
        clkvq_defines_int(d, "CLKVQ_PLANTED_BUG", 1);
#endif
    return clkvq_defines_get(cache->ctx, d);
}

static clkvq_status run_coop(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                             float scale, const clkvq_attn_tuning *t, event_list *events)
{
    clkvq_context *ctx = cache->ctx;
    const clkvq_cache_config *cfg = &cache->cfg;
    clkvq_cache_layer *layer = &cache->layers[l];
    clkvq_attn_fit_shape shape = fit_shape(cache, layer, n_queries);
    clkvq_attn_coop_plan plan;
    char why[512];
    clkvq_status st = clkvq_attn_coop_plan_get(t, &shape, &ctx->info, &plan, why, sizeof why);
    if (st != CLKVQ_OK)
        return clkvq_fail(ctx, st, "layer %d: %s", layer->model_layer, why);
    /* page rows travel as int through local memory */
    if ((long long)cache->n_pages * layer->n_kv_heads > INT_MAX)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "%d pages x %d kv heads exceed the cooperative variant's page rows",
                          cache->n_pages, layer->n_kv_heads);
    cl_mem table;
    int max_blocks;
    if ((st = clkvq_cache_table(cache, l, &table, &max_blocks)) != CLKVQ_OK)
        return st;
    clkvq_defines defines;
    const char *options = coop_options(cache, layer, &plan, n_queries, &defines);
    if (!options)
        return CLKVQ_ERR_BUILD;
    cl_kernel decode, merge = NULL;
    if ((st = clkvq_kernel_get(ctx, g_coop_sources, 2, options, "clkvq_attn_decode", &decode)) !=
            CLKVQ_OK ||
        (st = check_built(ctx, decode, (size_t)plan.wgs, "the decode kernel")) != CLKVQ_OK)
        return st;

    int tile = plan.wgs * plan.tpl, n_slots;
    long per_split = (long)layer->n_kv_heads * plan.n_rb;
    long max_grid = (long)(ctx->info.compute_units > 0 ? ctx->info.compute_units : 1) * plan.waves;
    int tps = choose_split(layer, cfg->n_seqs, tile, per_split, max_grid, &n_slots);
    size_t n_rows = (size_t)cfg->n_seqs * n_queries; /* (sequence, query) pairs */
    if (n_slots > 1) {
        if ((st = clkvq_kernel_get(ctx, g_coop_sources, 2, options, "clkvq_attn_merge", &merge)) !=
                CLKVQ_OK ||
            (st = check_built(ctx, merge, (size_t)plan.mwgs, "the merge kernel")) != CLKVQ_OK ||
            (st = clkvq_scratch_ensure(ctx, &cache->partials, &cache->partials_bytes,
                                n_rows * layer->n_q_heads * n_slots * (cfg->head_dim + 2) *
                                    sizeof(float),
                                "partial results")) != CLKVQ_OK)
            return st;
    }
    if ((st = upload_lengths(cache, layer)) != CLKVQ_OK)
        return st;

    clkvq_args a;
    clkvq_args_begin(&a, decode, 0);
    clkvq_args_mem(&a, q);
    clkvq_args_mem(&a, layer->k.perm);
    clkvq_args_mem(&a, layer->v.perm);
    clkvq_args_mem(&a, layer->v.mean);
    clkvq_args_mem(&a, layer->k.codes);
    clkvq_args_mem(&a, layer->k.params);
    clkvq_args_mem(&a, layer->v.codes);
    clkvq_args_mem(&a, layer->v.params);
    clkvq_args_mem(&a, layer->k.fp);
    clkvq_args_mem(&a, layer->v.fp);
    clkvq_args_mem(&a, table);
    clkvq_args_mem(&a, layer->len_mem);
    clkvq_args_mem(&a, n_slots > 1 ? cache->partials : NULL);
    clkvq_args_mem(&a, out);
    clkvq_args_int(&a, layer->n_q_heads);
    clkvq_args_int(&a, layer->n_kv_heads);
    clkvq_args_int(&a, max_blocks);
    clkvq_args_int(&a, cache->block_size);
    clkvq_args_int(&a, cache->n_pages);
    clkvq_args_int(&a, layer->fp_slots);
    clkvq_args_int(&a, layer->ring);
    clkvq_args_int(&a, layer->cfg.n_sink);
    clkvq_args_int(&a, layer->cfg.window);
    clkvq_args_int(&a, layer->cfg.residual);
    clkvq_args_int(&a, tps);
    clkvq_args_int(&a, n_slots);
    clkvq_args_float(&a, (float)(scale * LOG2_E));
    clkvq_args_int(&a, (int)layer->cfg.rot_seed);
    size_t global[3] = {(size_t)n_slots * plan.wgs, (size_t)per_split, (size_t)cfg->n_seqs};
    size_t local[3] = {(size_t)plan.wgs, 1, 1};
    if ((st = clkvq_args_end(ctx, &a, "decode")) != CLKVQ_OK ||
        (st = enqueue(ctx, decode, 3, global, local, events, "decode")) != CLKVQ_OK)
        return st;
    if (n_slots == 1)
        return CLKVQ_OK;
    clkvq_args_begin(&a, merge, 0);
    clkvq_args_mem(&a, cache->partials);
    clkvq_args_mem(&a, layer->v.perm);
    clkvq_args_mem(&a, layer->v.mean);
    clkvq_args_mem(&a, out);
    clkvq_args_int(&a, layer->n_q_heads);
    clkvq_args_int(&a, n_slots);
    clkvq_args_int(&a, (int)layer->cfg.rot_seed);
    size_t mglobal[2] = {(size_t)layer->n_q_heads * plan.mwgs, n_rows};
    size_t mlocal[2] = {(size_t)plan.mwgs, 1};
    if ((st = clkvq_args_end(ctx, &a, "merge")) != CLKVQ_OK)
        return st;
    return enqueue(ctx, merge, 2, mglobal, mlocal, events, "merge");
}

/* ------------------------------------------------------------ serial */

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

static const char *serial_options(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                                  const clkvq_attn_tuning *t, int n_queries, clkvq_defines *d)
{
    clkvq_defines_init(d);
    common_defines(cache, layer, n_queries, 1, d);
    clkvq_defines_int(d, "CHUNK", t->chunk);
    clkvq_defines_int(d, "VW", t->vw);
    if (strstr(cache->ctx->info.platform, "Oclgrind")) {
        /* Oclgrind's interpreter lacks the vector intrinsics (llvm.floor,
         * llvm.fshl) that the optimizer makes of these kernels' unrolled
         * shifts and floors: unoptimized there, same arithmetic */
        clkvq_defines_int(d, "KVQ_INTERPRETER", 1);
        clkvq_defines_option(d, "-cl-opt-disable");
    }
    return clkvq_defines_get(cache->ctx, d);
}

static clkvq_status run_serial(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                               float scale, clkvq_attn_tuning t, event_list *events)
{
    clkvq_context *ctx = cache->ctx;
    const clkvq_cache_config *cfg = &cache->cfg;
    clkvq_cache_layer *layer = &cache->layers[l];
    fit_serial_chunk(cache, &t, n_queries);
    cl_mem table;
    int max_blocks;
    clkvq_status st = clkvq_cache_table(cache, l, &table, &max_blocks);
    if (st != CLKVQ_OK)
        return st;
    int fp16 = layer->cfg.scheme == CLKVQ_SCHEME_FP16;
    int group = fp16 ? 32 : layer->cfg.group_size, n_groups = cfg->head_dim / group;
    int n_packed, n_fp;
    count_chunks(cache, layer, t.chunk, &n_packed, &n_fp);
    int n_slots = n_packed + n_fp;
    size_t n_rows = (size_t)cfg->n_seqs * n_queries; /* (sequence, query) pairs */
    size_t n_q = n_rows * layer->n_q_heads;
    if ((st = clkvq_scratch_ensure(ctx, &cache->q_scratch, &cache->q_scratch_bytes,
                            n_q * cfg->head_dim * sizeof(float), "query scratch")) != CLKVQ_OK ||
        (st = clkvq_scratch_ensure(ctx, &cache->qsum_scratch, &cache->qsum_scratch_bytes,
                            n_q * n_groups * sizeof(float), "query-sum scratch")) != CLKVQ_OK ||
        (st = clkvq_scratch_ensure(ctx, &cache->partials, &cache->partials_bytes,
                            n_q * n_slots * (cfg->head_dim + 2) * sizeof(float),
                            "partial results")) != CLKVQ_OK)
        return st;
    cl_mem qs = cache->q_scratch, qsum = cache->qsum_scratch;

    clkvq_defines defines;
    const char *options = serial_options(cache, layer, &t, n_queries, &defines);
    if (!options)
        return CLKVQ_ERR_BUILD;
    cl_kernel prep = NULL, packed = NULL, fpk = NULL, merge = NULL;
    if ((st = clkvq_kernel_get(ctx, g_serial_sources, 2, options, "clkvq_attn_prepare_q",
                               &prep)) != CLKVQ_OK ||
        (!fp16 && (st = clkvq_kernel_get(ctx, g_serial_sources, 2, options,
                                         "clkvq_attn_packed_serial", &packed)) != CLKVQ_OK) ||
        (st = clkvq_kernel_get(ctx, g_serial_sources, 2, options, "clkvq_attn_fp16_serial",
                               &fpk)) != CLKVQ_OK ||
        (st = clkvq_kernel_get(ctx, g_serial_sources, 2, options, "clkvq_attn_merge_serial",
                               &merge)) != CLKVQ_OK)
        return st;
    if ((st = upload_lengths(cache, layer)) != CLKVQ_OK)
        return st;

    clkvq_args a;
    clkvq_args_begin(&a, prep, 0);
    clkvq_args_mem(&a, q);
    clkvq_args_mem(&a, layer->k.perm);
    clkvq_args_mem(&a, qs);
    clkvq_args_mem(&a, qsum);
    clkvq_args_int(&a, (int)n_rows);
    clkvq_args_int(&a, layer->n_q_heads);
    clkvq_args_float(&a, scale);
    clkvq_args_int(&a, (int)layer->cfg.rot_seed);
    size_t plocal = PREPARE_LOCAL_SIZE, pglobal = clkvq_round_up(n_q, plocal);
    if ((st = clkvq_args_end(ctx, &a, "prepare_q")) != CLKVQ_OK ||
        (st = enqueue(ctx, prep, 1, &pglobal, &plocal, events, "prepare_q")) != CLKVQ_OK)
        return st;
    size_t local3[3] = {1, 1, 1};
    if (!fp16 && n_packed > 0) {
        clkvq_args_begin(&a, packed, 0);
        clkvq_args_mem(&a, qs);
        clkvq_args_mem(&a, qsum);
        clkvq_args_mem(&a, layer->k.codes);
        clkvq_args_mem(&a, layer->k.params);
        clkvq_args_mem(&a, layer->v.codes);
        clkvq_args_mem(&a, layer->v.params);
        clkvq_args_mem(&a, layer->v.fp);
        clkvq_args_mem(&a, layer->len_mem);
        clkvq_args_mem(&a, table);
        clkvq_args_mem(&a, cache->partials);
        clkvq_args_int(&a, layer->n_q_heads);
        clkvq_args_int(&a, layer->n_kv_heads);
        args_regions(&a, cache, layer, max_blocks);
        clkvq_args_int(&a, n_slots);
        size_t global[3] = {(size_t)n_packed, (size_t)layer->n_kv_heads, (size_t)cfg->n_seqs};
        if ((st = clkvq_args_end(ctx, &a, "packed attention chunks")) != CLKVQ_OK ||
            (st = enqueue(ctx, packed, 3, global, local3, events, "packed attention chunks")) !=
                CLKVQ_OK)
            return st;
    }
    if (n_fp > 0) {
        clkvq_args_begin(&a, fpk, 0);
        clkvq_args_mem(&a, qs);
        clkvq_args_mem(&a, layer->k.fp);
        clkvq_args_mem(&a, layer->v.fp);
        clkvq_args_mem(&a, layer->len_mem);
        clkvq_args_mem(&a, table);
        clkvq_args_mem(&a, cache->partials);
        clkvq_args_int(&a, layer->n_q_heads);
        clkvq_args_int(&a, layer->n_kv_heads);
        args_regions(&a, cache, layer, max_blocks);
        clkvq_args_int(&a, n_packed); /* the first fp16 slot */
        clkvq_args_int(&a, n_slots);
        size_t global[3] = {(size_t)n_fp, (size_t)layer->n_kv_heads, (size_t)cfg->n_seqs};
        if ((st = clkvq_args_end(ctx, &a, "fp16 attention chunks")) != CLKVQ_OK ||
            (st = enqueue(ctx, fpk, 3, global, local3, events, "fp16 attention chunks")) !=
                CLKVQ_OK)
            return st;
    }
    clkvq_args_begin(&a, merge, 0);
    clkvq_args_mem(&a, cache->partials);
    clkvq_args_mem(&a, layer->v.perm);
    clkvq_args_mem(&a, layer->len_mem);
    clkvq_args_mem(&a, out);
    clkvq_args_int(&a, (int)n_rows);
    clkvq_args_int(&a, layer->n_q_heads);
    clkvq_args_int(&a, n_slots);
    clkvq_args_mem(&a, layer->v.mean);
    clkvq_args_int(&a, (int)layer->cfg.rot_seed);
    size_t mlocal = 1, mglobal = n_q;
    if ((st = clkvq_args_end(ctx, &a, "merge")) != CLKVQ_OK)
        return st;
    return enqueue(ctx, merge, 1, &mglobal, &mlocal, events, "merge");
}

/* ------------------------------------------------------------ entry points */

static clkvq_status decode_impl(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                                float scale)
{
    clkvq_context *ctx = cache->ctx;
    clkvq_timing_reset(ctx);
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
    if (clkvq_cache_n_shares(cache, l) > 1)
        return clkvq_shares_decode(cache, l, n_queries, q, out, scale);
    return clkvq_cache_decode_stored(cache, cache->first_stored[l], n_queries, q, out, scale);
}

clkvq_status clkvq_cache_decode_stored(clkvq_cache *cache, int l, int n_queries, cl_mem q,
                                       cl_mem out, float scale)
{
    clkvq_context *ctx = cache->ctx;
    clkvq_status st;
    clkvq_attn_tuning t;
    resolve_tuning(cache, l, max_length(cache, l), &cache->tuning, &t);
    if ((st = check_layer(ctx, cache, l, &t, n_queries)) != CLKVQ_OK)
        return st;
    event_list events;
    memset(&events, 0, sizeof events);
    events.timed = ctx->profiling;
    st = t.variant == CLKVQ_ATTN_SERIAL
             ? run_serial(cache, l, n_queries, q, out, scale, t, &events)
             : run_coop(cache, l, n_queries, q, out, scale, &t, &events);
    if (st == CLKVQ_OK) {
        clkvq_timing_defer(ctx, events.ev, events.n);
    } else {
        /* what was enqueued before the failure still runs; its events go */
        for (int i = 0; i < events.n; i++)
            clReleaseEvent(events.ev[i]);
    }
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
    /* the blocking read waits for the decode; its events stay the
     * context's timing (clkvq_last_device_ms) */
    if (st == CLKVQ_OK) {
        err = clEnqueueReadBuffer(ctx->queue, om, CL_TRUE, 0, bytes, out, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "reading out");
    }
    clReleaseMemObject(qm);
    clReleaseMemObject(om);
    return st;
}

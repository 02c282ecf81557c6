/* The KV cache object: configuration, memory plan, append, truncate, read.
 * lib/kv_cache.h documents the token regions and the layouts. */
#include "kv_cache.h"

#include "kernel_args.h"
#include "kernel_defines.h"
#include "kv_pages.h"
#include "program_cache.h"
#include "quant_format.h"
#include "quantize.h"
#include "reference.h"
#include "tuning_db.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CACHE_LOCAL_SIZE 64
#define MAX_GQA_GROUP 8
#define MAX_HEAD_DIM 256
#define MAX_KV_HEADS 1024

static const char *const g_cache_sources[] = {"quant_common.cl", "kv_cache.cl"};
static const char *const g_scheme_names[CLKVQ_SCHEME_COUNT] = {"fp16", "token", "kivi", "skvq"};

const char *clkvq_scheme_name(clkvq_scheme scheme)
{
    return (int)scheme >= 0 && scheme < CLKVQ_SCHEME_COUNT ? g_scheme_names[scheme] : "?";
}

clkvq_status clkvq_scheme_parse(const char *text, clkvq_scheme *out)
{
    if (!text || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_scheme_parse: NULL argument");
    for (int s = 0; s < CLKVQ_SCHEME_COUNT; s++)
        if (!strcasecmp(text, g_scheme_names[s])) {
            *out = (clkvq_scheme)s;
            return CLKVQ_OK;
        }
    return clkvq_fail(NULL, CLKVQ_ERR_UNSUPPORTED,
                      "scheme '%s' is not one of fp16, token, kivi, skvq", text);
}

clkvq_layer_config clkvq_layer_config_default(clkvq_scheme scheme)
{
    clkvq_layer_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.scheme = scheme;
    cfg.format_k = CLKVQ_FMT_Q4;
    cfg.format_v = CLKVQ_FMT_Q4;
    cfg.group_size = 32;
    cfg.clip_k = cfg.clip_v = 1.0f;
    cfg.param_type = CLKVQ_PARAM_FP16;
    cfg.zero_mode = CLKVQ_ZERO_FLOAT;
    if (scheme == CLKVQ_SCHEME_SKVQ) {
        cfg.group_size = 128;
        cfg.window = 128;
        cfg.n_sink = 5;
    } else if (scheme == CLKVQ_SCHEME_KIVI) {
        cfg.residual = 128;
    }
    return cfg;
}

int clkvq_cache_q_end(const clkvq_cache_layer *layer, int is_v, int n)
{
    const clkvq_layer_config *cfg = &layer->cfg;
    return kvq_q_end((int)cfg->scheme, is_v, n, cfg->n_sink, cfg->window, cfg->residual,
                     clkvq_layer_block(cfg));
}

int clkvq_cache_pack_from(const clkvq_cache_layer *layer, int is_v, int n_old, int n_new)
{
    int q0 = clkvq_cache_q_end(layer, is_v, n_old);
    int sink_end = clkvq_cache_n_sink_eff(layer, n_new);
    return q0 > sink_end ? q0 : sink_end;
}

/* ------------------------------------------------------------ validation */

/* Keys in per-channel groups along tokens: kivi, and skvq's key_axis. */
static int channel_keys(const clkvq_layer_config *lc)
{
    return clkvq_layer_quant_params(lc, 0).axis == CLKVQ_AXIS_CHANNEL;
}

clkvq_quant_params clkvq_layer_quant_params(const clkvq_layer_config *cfg, int is_v)
{
    clkvq_quant_params qp = clkvq_quant_params_default();
    qp.format = is_v ? cfg->format_v : cfg->format_k;
    qp.axis = !is_v && (cfg->scheme == CLKVQ_SCHEME_KIVI ||
                        (cfg->scheme == CLKVQ_SCHEME_SKVQ && cfg->key_axis == CLKVQ_AXIS_CHANNEL))
                  ? CLKVQ_AXIS_CHANNEL
                  : CLKVQ_AXIS_TOKEN;
    qp.group_size = cfg->group_size;
    qp.clip_alpha = is_v ? cfg->clip_v : cfg->clip_k;
    qp.param_type = cfg->param_type;
    qp.zero_mode = cfg->zero_mode;
    return qp;
}

static clkvq_status validate_layer(clkvq_context *ctx, const clkvq_cache_config *cfg, int l)
{
    const clkvq_layer_config *lc = &cfg->layers[l];
    if ((int)lc->scheme < 0 || lc->scheme >= CLKVQ_SCHEME_COUNT)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED, "layer %d: scheme %d is unknown", l,
                          (int)lc->scheme);
    if (lc->scheme != CLKVQ_SCHEME_SKVQ && (lc->window != 0 || lc->n_sink != 0))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: window/n_sink are skvq settings, %s has none", l,
                          clkvq_scheme_name(lc->scheme));
    if (lc->scheme != CLKVQ_SCHEME_KIVI && lc->residual != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: residual is a kivi setting, %s has none", l,
                          clkvq_scheme_name(lc->scheme));
    if (lc->window < 0 || lc->n_sink < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d: negative window or n_sink", l);
    if (lc->scheme == CLKVQ_SCHEME_FP16)
        return CLKVQ_OK;
    if (lc->scheme == CLKVQ_SCHEME_KIVI &&
        (lc->residual <= 0 || lc->group_size <= 0 || lc->residual % lc->group_size != 0))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: kivi residual %d must be a positive multiple of group_size %d",
                          l, lc->residual, lc->group_size);
    clkvq_shape shape = {cfg->n_kv_heads, cfg->capacity, cfg->head_dim};
    clkvq_format pair_k[MAX_KV_HEADS], pair_v[MAX_KV_HEADS];
    int n_pairs = clkvq_head_shares(lc, cfg->n_kv_heads, pair_k, pair_v, NULL);
    if (n_pairs > 1 && lc->rotate && (lc->perm_k || lc->perm_v))
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "layer %d: its kv heads carry %d bit pairs and it rotates with perms; "
                          "a share of the heads draws its rotation signs by its own head "
                          "numbers, so perms fitted to the model's would not match",
                          l, n_pairs);
    for (int is_v = 0; is_v < 2; is_v++) {
        for (int p = 0; p < n_pairs; p++) {
            clkvq_layer_config share = *lc;
            share.format_k = pair_k[p];
            share.format_v = pair_v[p];
            clkvq_quant_params qp = clkvq_layer_quant_params(&share, is_v);
            clkvq_status st = clkvq_quant_params_validate(ctx, &qp, &shape);
            if (st != CLKVQ_OK) {
                char detail[CLKVQ_MSG_MAX / 2];
                snprintf(detail, sizeof detail, "%s", clkvq_last_error(ctx));
                return clkvq_fail(ctx, st, "layer %d %s: %s", l, is_v ? "V" : "K", detail);
            }
        }
        const int32_t *perm = is_v ? lc->perm_v : lc->perm_k;
        if (perm && !clkvq_ref_is_permutation(perm, cfg->n_kv_heads, cfg->head_dim))
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "layer %d: perm_%c is not a permutation of 0..%d per kv head", l,
                              is_v ? 'v' : 'k', cfg->head_dim - 1);
    }
    return CLKVQ_OK;
}

/* The fields every scheme may carry: key axis, rotation, means. */
static clkvq_status validate_transforms(clkvq_context *ctx, const clkvq_cache_config *cfg, int l)
{
    const clkvq_layer_config *lc = &cfg->layers[l];
    if (lc->key_axis != CLKVQ_AXIS_TOKEN && lc->key_axis != CLKVQ_AXIS_CHANNEL)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d: key_axis %d is neither token "
                          "nor channel", l, (int)lc->key_axis);
    if (lc->key_axis == CLKVQ_AXIS_CHANNEL && lc->scheme != CLKVQ_SCHEME_SKVQ)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: key_axis channel is an skvq setting (%s keys are %s)", l,
                          clkvq_scheme_name(lc->scheme),
                          lc->scheme == CLKVQ_SCHEME_KIVI ? "always per channel" : "per token");
    if (lc->rotate != 0 && lc->rotate != 1)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d: rotate %d is neither 0 nor 1",
                          l, lc->rotate);
    for (int is_v = 0; is_v < 2; is_v++) {
        const float *mean = is_v ? lc->mean_v : lc->mean_k;
        size_t n = (size_t)cfg->n_kv_heads * cfg->head_dim;
        for (size_t i = 0; mean && i < n; i++)
            if (!(fabsf(mean[i]) <= CLKVQ_INPUT_MAX))
                return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                                  "layer %d: mean_%c[%zu] = %g is not finite within +-65504", l,
                                  is_v ? 'v' : 'k', i, (double)mean[i]);
    }
    return CLKVQ_OK;
}

static clkvq_status validate_config(clkvq_context *ctx, const clkvq_cache_config *cfg)
{
    if (!cfg || !cfg->layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "cache config or its layers is NULL");
    if (cfg->n_layers <= 0 || cfg->n_seqs <= 0 || cfg->capacity <= 0 || cfg->n_kv_heads <= 0 ||
        cfg->n_q_heads <= 0 || cfg->head_dim <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "cache sizes must be positive: %d layers, %d seqs, capacity %d, "
                          "%d kv heads, %d q heads, head_dim %d",
                          cfg->n_layers, cfg->n_seqs, cfg->capacity, cfg->n_kv_heads,
                          cfg->n_q_heads, cfg->head_dim);
    if (cfg->n_q_heads % cfg->n_kv_heads != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "n_q_heads %d is not a multiple of n_kv_heads %d", cfg->n_q_heads,
                          cfg->n_kv_heads);
    if (cfg->n_q_heads / cfg->n_kv_heads > MAX_GQA_GROUP)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED, "GQA group %d exceeds %d query heads per kv head",
                          cfg->n_q_heads / cfg->n_kv_heads, MAX_GQA_GROUP);
    if (cfg->n_kv_heads > MAX_KV_HEADS)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED, "%d kv heads: at most %d", cfg->n_kv_heads,
                          MAX_KV_HEADS);
    if (cfg->head_dim % 32 != 0 || cfg->head_dim > MAX_HEAD_DIM)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "head_dim %d: must be a multiple of 32 and at most %d", cfg->head_dim,
                          MAX_HEAD_DIM);
    for (int i = 0; i < 2; i++) {
        clkvq_layout layout = i ? cfg->layout_v : cfg->layout_k;
        if (((int)layout < 0 || layout >= CLKVQ_LAYOUT_COUNT) && layout != CLKVQ_LAYOUT_AUTO)
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layout_%c %d is unknown", i ? 'v' : 'k',
                              (int)layout);
    }
    for (int l = 0; l < cfg->n_layers; l++) {
        clkvq_status st = validate_layer(ctx, cfg, l);
        if (st == CLKVQ_OK)
            st = validate_transforms(ctx, cfg, l);
        if (st != CLKVQ_OK)
            return st;
    }
    if (cfg->block_size < 0 || cfg->n_blocks < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "block_size %d and n_blocks %d must not be "
                          "negative", cfg->block_size, cfg->n_blocks);
    if (cfg->block_size == 0 && (cfg->n_blocks != 0 || cfg->runtime_tables))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "n_blocks and runtime_tables need pages: set block_size");
    if (cfg->runtime_tables != 0 && cfg->runtime_tables != 1)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "runtime_tables %d is neither 0 nor 1",
                          cfg->runtime_tables);
    if (cfg->block_size > 0) {
        /* aligned vectors of up to 16 tokens stay in one page */
        if (cfg->block_size % 16 != 0)
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "block_size %d must be a multiple of 16", cfg->block_size);
        for (int l = 0; l < cfg->n_layers; l++) {
            const clkvq_layer_config *lc = &cfg->layers[l];
            if (channel_keys(lc) && cfg->block_size % lc->group_size != 0)
                return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                                  "layer %d: block_size %d must be a multiple of the group size "
                                  "%d of its per-channel keys (key groups run along tokens "
                                  "inside a page)",
                                  l, cfg->block_size, lc->group_size);
        }
        if ((long long)cfg->n_seqs * ((cfg->capacity + cfg->block_size - 1) / cfg->block_size) >
            (1LL << 28))
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "%d sequences of %d tokens in pages of %d need too large a block "
                              "table", cfg->n_seqs, cfg->capacity, cfg->block_size);
    }
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ geometry */

static int ring_slots(const clkvq_layer_config *lc)
{
    switch (lc->scheme) {
    case CLKVQ_SCHEME_KIVI: return lc->residual;
    /* blocks of per-channel keys wait up to block - 1 tokens past the window */
    case CLKVQ_SCHEME_SKVQ: return lc->window + clkvq_layer_block(lc) - 1 > 0
                                       ? lc->window + clkvq_layer_block(lc) - 1
                                       : 1;
    /* token: nothing stays fp16; fp16: every token is in pages. One slot
     * keeps indexing simple. */
    default: return 1;
    }
}

static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

typedef struct {
    int block_size, max_blocks, n_pages;
} page_geometry;

/* The contiguous cache is one page per sequence: the capacity rounded up
 * to 256 and to every per-channel key group (groups never straddle). */
static page_geometry page_geometry_of(const clkvq_cache_config *cfg)
{
    page_geometry pg;
    if (cfg->block_size > 0) {
        pg.block_size = cfg->block_size;
        pg.max_blocks = (cfg->capacity + cfg->block_size - 1) / cfg->block_size;
        pg.n_pages = cfg->n_blocks > 0 ? cfg->n_blocks : cfg->n_seqs * pg.max_blocks;
        return pg;
    }
    int unit = 256;
    for (int l = 0; l < cfg->n_layers; l++)
        if (channel_keys(&cfg->layers[l]))
            unit = unit / gcd(unit, cfg->layers[l].group_size) * cfg->layers[l].group_size;
    pg.block_size = (int)clkvq_round_up((size_t)cfg->capacity, (size_t)unit);
    pg.max_blocks = 1;
    pg.n_pages = cfg->n_seqs;
    return pg;
}

/* Placement and page sizes of one tensor (K or V) of a layer. */
static void fill_store_geometry(const clkvq_cache_config *cfg, const clkvq_layer_config *lc,
                                int n_heads, int is_v, int block_size, clkvq_tensor_store *st)
{
    clkvq_quant_params qp = clkvq_layer_quant_params(lc, is_v);
    memset(st, 0, sizeof *st);
    st->layout = is_v ? cfg->layout_v : cfg->layout_k;
    size_t heads = (size_t)n_heads, dim = (size_t)cfg->head_dim;
    if (lc->scheme == CLKVQ_SCHEME_FP16) { /* nothing is packed: formats are not read */
        st->page_fp = heads * block_size * dim * 2;
        return;
    }
    st->format = qp.format;
    st->axis = qp.axis;
    st->clip = qp.clip_alpha;
    st->group_words = clkvq_group_words(qp.format, qp.group_size);
    st->n_groups = qp.axis == CLKVQ_AXIS_TOKEN ? cfg->head_dim / qp.group_size : 0;
    st->row_words = st->n_groups * st->group_words;
    size_t groups = qp.axis == CLKVQ_AXIS_TOKEN
                        ? heads * block_size * st->n_groups
                        : heads * (size_t)(block_size / qp.group_size) * dim;
    st->page_codes = groups * st->group_words * 4;
    st->page_params = groups * clkvq_param_bytes(lc->param_type);
}

typedef struct {
    size_t codes, params, fp;
} store_bytes;

static store_bytes store_size(const clkvq_cache_config *cfg, const clkvq_tensor_store *st,
                              int n_heads, int n_pages, int fp_slots)
{
    store_bytes b;
    b.codes = st->page_codes * n_pages;
    b.params = st->page_params * n_pages;
    b.fp = st->page_fp ? st->page_fp * n_pages
                       : (size_t)cfg->n_seqs * n_heads * fp_slots * cfg->head_dim * 2;
    return b;
}

/* Model layer l's shares: count, and each one's layer settings and head
 * count (shares[] and n_heads[] hold cfg->n_kv_heads entries). */
static int layer_shares(const clkvq_cache_config *cfg, int l, clkvq_layer_config *shares,
                        int *n_heads, int *share_of)
{
    const clkvq_layer_config *lc = &cfg->layers[l];
    clkvq_format pk[MAX_KV_HEADS], pv[MAX_KV_HEADS];
    int n = clkvq_head_shares(lc, cfg->n_kv_heads, pk, pv, share_of);
    for (int p = 0; p < n; p++) {
        shares[p] = *lc;
        shares[p].format_k = pk[p];
        shares[p].format_v = pv[p];
        shares[p].head_format_k = shares[p].head_format_v = NULL;
        n_heads[p] = n == 1 ? cfg->n_kv_heads : 0;
    }
    for (int h = 0; n > 1 && h < cfg->n_kv_heads; h++)
        n_heads[share_of[h]]++;
    return n;
}

clkvq_status clkvq_cache_plan(clkvq_context *ctx, const clkvq_cache_config *cfg,
                              clkvq_cache_memory *out)
{
    if (ctx)
        clkvq_clear_error(ctx);
    clkvq_status st = validate_config(ctx, cfg);
    if (st != CLKVQ_OK)
        return st;
    if (!out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "memory plan output is NULL");
    memset(out, 0, sizeof *out);
    page_geometry pg = page_geometry_of(cfg);
    size_t n_stored = 0;
    clkvq_layer_config *shares = malloc((size_t)cfg->n_kv_heads * sizeof *shares);
    int n_heads[MAX_KV_HEADS], share_of[MAX_KV_HEADS];
    if (!shares)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "planning the cache's layers");
    for (int l = 0; l < cfg->n_layers; l++) {
        int n_shares = layer_shares(cfg, l, shares, n_heads, share_of);
        n_stored += (size_t)n_shares;
        for (int p = 0; p < n_shares; p++) {
            const clkvq_layer_config *lc = &shares[p];
            int fp_slots = ring_slots(lc) + lc->n_sink;
            for (int is_v = 0; is_v < 2; is_v++) {
                clkvq_tensor_store ts;
                fill_store_geometry(cfg, lc, n_heads[p], is_v, pg.block_size, &ts);
                store_bytes b = store_size(cfg, &ts, n_heads[p], pg.n_pages, fp_slots);
                out->quantized_bytes += b.codes + b.params;
                out->fp16_bytes += b.fp;
            }
        }
    }
    free(shares);
    /* the block tables (one per stored layer) */
    size_t tables = cfg->runtime_tables ? 0 : n_stored * cfg->n_seqs * pg.max_blocks * 4;
    out->device_bytes = out->quantized_bytes + out->fp16_bytes + tables;
    double elements = 2.0 * cfg->n_layers * (double)cfg->n_seqs * cfg->capacity *
                      cfg->n_kv_heads * cfg->head_dim;
    out->bits_per_element = 8.0 * (double)out->device_bytes / elements;
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ create */

clkvq_status clkvq_scratch_ensure(clkvq_context *ctx, cl_mem *mem, size_t *have, size_t need,
                                  const char *what)
{
    if (*mem && *have >= need)
        return CLKVQ_OK;
    /* a kernel still queued keeps the old buffer alive (OpenCL reference
     * counting): releasing it here is safe */
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


static clkvq_status create_buffer(clkvq_context *ctx, size_t size, const void *host,
                                  cl_mem *out, const char *what)
{
    if (size > ctx->info.max_alloc_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "%s needs %zu bytes, the device allows %llu per buffer", what, size,
                          (unsigned long long)ctx->info.max_alloc_bytes);
    cl_int err;
    cl_mem_flags flags = CL_MEM_READ_WRITE | (host ? CL_MEM_COPY_HOST_PTR : 0);
    *out = clCreateBuffer(ctx->cl_ctx, flags, size ? size : 4, (void *)host, &err);
    if (err != CL_SUCCESS) {
        *out = NULL;
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s (%zu bytes): %s", what,
                          size, clkvq_cl_error_name(err));
    }
    return CLKVQ_OK;
}

static void release_mem(cl_mem *m)
{
    if (*m)
        clReleaseMemObject(*m);
    *m = NULL;
}

/* Copies the rows of the stored layer's heads out of a model-wide
 * [n_kv_heads][head_dim] matrix of elem-byte entries. */
static void *share_rows(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                        const void *matrix, size_t elem)
{
    size_t row = (size_t)cache->cfg.head_dim * elem;
    char *out = malloc((size_t)layer->n_kv_heads * row);
    for (int i = 0; out && i < layer->n_kv_heads; i++)
        memcpy(out + i * row, (const char *)matrix + (layer->heads ? layer->heads[i] : i) * row,
               row);
    return out;
}

static clkvq_status create_store(clkvq_cache *cache, clkvq_cache_layer *layer, int is_v,
                                 const int32_t *perm, const float *mean)
{
    clkvq_context *ctx = cache->ctx;
    const clkvq_cache_config *cfg = &cache->cfg;
    clkvq_tensor_store *st = is_v ? &layer->v : &layer->k;
    fill_store_geometry(cfg, &layer->cfg, layer->n_kv_heads, is_v, cache->block_size, st);
    store_bytes b = store_size(cfg, st, layer->n_kv_heads, cache->n_pages, layer->fp_slots);
    clkvq_status s = create_buffer(ctx, b.fp, NULL, &st->fp,
                                   st->page_fp ? "fp16 page pool" : "fp16 rings");
    if (s == CLKVQ_OK && b.codes)
        s = create_buffer(ctx, b.codes, NULL, &st->codes, "packed code pages");
    if (s == CLKVQ_OK && b.params)
        s = create_buffer(ctx, b.params, NULL, &st->params, "packed parameter pages");
    size_t n = (size_t)layer->n_kv_heads * cfg->head_dim;
    if (s == CLKVQ_OK && perm) {
        st->perm_host = share_rows(cache, layer, perm, sizeof(int32_t));
        if (!st->perm_host)
            return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "copying a permutation");
        s = create_buffer(ctx, n * sizeof(int32_t), st->perm_host, &st->perm, "permutation");
    }
    if (s == CLKVQ_OK && mean) {
        st->mean_host = share_rows(cache, layer, mean, sizeof(float));
        if (!st->mean_host)
            return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "copying a mean");
        s = create_buffer(ctx, n * sizeof(float), st->mean_host, &st->mean, "channel means");
    }
    return s;
}

static void release_store(clkvq_tensor_store *st)
{
    release_mem(&st->codes);
    release_mem(&st->params);
    release_mem(&st->fp);
    release_mem(&st->perm);
    free(st->perm_host);
    st->perm_host = NULL;
    release_mem(&st->mean);
    free(st->mean_host);
    st->mean_host = NULL;
}

void clkvq_cache_release(clkvq_cache *cache)
{
    if (!cache)
        return;
    /* a decode's non-blocking length write may still read layer->length */
    if (cache->async_writes)
        clFinish(cache->ctx->queue);
    if (cache->layers) {
        for (int l = 0; l < cache->n_stored; l++) {
            release_store(&cache->layers[l].k);
            release_store(&cache->layers[l].v);
            clkvq_pages_release(&cache->layers[l].pages);
            release_mem(&cache->layers[l].len_mem);
            free(cache->layers[l].length);
            free(cache->layers[l].tuned_set);
            free(cache->layers[l].heads);
        }
        free(cache->layers);
    }
    free(cache->first_stored);
    for (int i = 0; i < 4; i++)
        release_mem(&cache->share_buf[i]);
    release_mem(&cache->rt_table);
    release_mem(&cache->partials);
    release_mem(&cache->q_scratch);
    release_mem(&cache->qsum_scratch);
    release_mem(&cache->xform[0]);
    release_mem(&cache->xform[1]);
    free(cache->tuned);
    free(cache->tuned_source);
    free(cache);
}

/* Whether two stored layers decode with the same tuned parameters: one
 * tune shape (scheme, formats, group, heads). */
static int same_shape(const clkvq_cache_layer *a, const clkvq_cache_layer *b)
{
    return a->cfg.scheme == b->cfg.scheme && a->cfg.format_k == b->cfg.format_k &&
           a->cfg.format_v == b->cfg.format_v && a->cfg.group_size == b->cfg.group_size &&
           a->n_kv_heads == b->n_kv_heads;
}

static clkvq_tune_shape tune_shape_of(const clkvq_cache *cache, const clkvq_cache_layer *layer)
{
    const clkvq_layer_config *lc = &layer->cfg;
    const clkvq_cache_config *cfg = &cache->cfg;
    return (clkvq_tune_shape){lc->scheme,        lc->format_k,       lc->format_v,
                              lc->group_size,    cfg->head_dim,      layer->n_q_heads,
                              layer->n_kv_heads, cfg->capacity,      cfg->n_seqs};
}

/* This device's tuned entries for stored layer l's shape on the cache's
 * layouts: decode picks among them by its batch and length (attention.c).
 * A missing or unreadable file leaves none, never an error. */
static clkvq_status tuned_entries(clkvq_cache *cache, int l)
{
    clkvq_cache_layer *layer = &cache->layers[l];
    /* layers of one shape share the entries (each read parses the file) */
    for (int e = 0; e < l; e++) {
        if (!same_shape(&cache->layers[e], layer))
            continue;
        int n = cache->layers[e].n_tuned_set;
        if (n > 0) {
            layer->tuned_set = malloc((size_t)n * sizeof *layer->tuned_set);
            if (!layer->tuned_set)
                return clkvq_fail(cache->ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                                  "copying the tuning entries of layer %d", e);
            memcpy(layer->tuned_set, cache->layers[e].tuned_set,
                   (size_t)n * sizeof *layer->tuned_set);
            layer->n_tuned_set = n;
        }
        return CLKVQ_OK;
    }
    clkvq_tune_shape shape = tune_shape_of(cache, layer);
    clkvq_status st = clkvq_tuning_entries_for(cache->ctx, &shape, cache->cfg.layout_k,
                                               cache->cfg.layout_v, &layer->tuned_set,
                                               &layer->n_tuned_set);
    clkvq_clear_error(cache->ctx);
    return st == CLKVQ_ERR_OUT_OF_MEMORY
               ? clkvq_fail(cache->ctx, st, "reading the tuning entries of layer %d", l)
               : CLKVQ_OK;
}

/* Lays out the stored layers: one per model layer, or one per distinct
 * (K, V) pair of its kv heads, each with its heads' settings. */
static clkvq_status plan_stored(clkvq_cache *cache, const clkvq_cache_config *cfg)
{
    clkvq_context *ctx = cache->ctx;
    clkvq_layer_config *shares = malloc((size_t)cfg->n_kv_heads * sizeof *shares);
    int n_heads[MAX_KV_HEADS], share_of[MAX_KV_HEADS];
    cache->first_stored = calloc((size_t)cfg->n_layers + 1, sizeof *cache->first_stored);
    if (!shares || !cache->first_stored) {
        free(shares);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating the cache's layers");
    }
    int total = 0;
    for (int l = 0; l < cfg->n_layers; l++)
        total += layer_shares(cfg, l, shares, n_heads, share_of);
    cache->layers = calloc((size_t)total, sizeof *cache->layers);
    clkvq_status st = cache->layers ? CLKVQ_OK
                                    : clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                                                 "allocating cache layers");
    int qpk = cfg->n_q_heads / cfg->n_kv_heads;
    for (int l = 0; l < cfg->n_layers && st == CLKVQ_OK; l++) {
        int n = layer_shares(cfg, l, shares, n_heads, share_of);
        cache->first_stored[l] = cache->n_stored;
        for (int p = 0; p < n && st == CLKVQ_OK; p++) {
            clkvq_cache_layer *layer = &cache->layers[cache->n_stored++];
            layer->cfg = shares[p];
            layer->cfg.perm_k = layer->cfg.perm_v = NULL;
            layer->cfg.mean_k = layer->cfg.mean_v = NULL;
            layer->model_layer = l;
            layer->n_kv_heads = n_heads[p];
            layer->n_q_heads = n_heads[p] * qpk;
            if (n == 1)
                continue;
            layer->heads = malloc((size_t)n_heads[p] * sizeof *layer->heads);
            if (!layer->heads) {
                st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a head map");
                break;
            }
            for (int h = 0, i = 0; h < cfg->n_kv_heads; h++)
                if (share_of[h] == p)
                    layer->heads[i++] = h;
        }
    }
    cache->first_stored[cfg->n_layers] = cache->n_stored;
    free(shares);
    return st;
}

clkvq_status clkvq_cache_create(clkvq_context *ctx, const clkvq_cache_config *cfg,
                                clkvq_cache **out)
{
    if (!ctx || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_create: NULL context or out");
    *out = NULL;
    clkvq_cache_memory plan;
    clkvq_status st = clkvq_cache_plan(ctx, cfg, &plan);
    if (st != CLKVQ_OK)
        return st;
    if (plan.device_bytes > ctx->info.global_mem_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "the cache needs %zu bytes, the device has %llu", plan.device_bytes,
                          (unsigned long long)ctx->info.global_mem_bytes);
    clkvq_cache *cache = calloc(1, sizeof *cache);
    if (!cache)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating the cache object");
    cache->ctx = ctx;
    cache->cfg = *cfg;
    cache->cfg.layers = NULL;
    page_geometry pg = page_geometry_of(cfg);
    cache->block_size = pg.block_size;
    cache->max_blocks = pg.max_blocks;
    cache->n_pages = pg.n_pages;
    cache->paged = cfg->block_size > 0;
    if ((st = plan_stored(cache, cfg)) != CLKVQ_OK) {
        clkvq_cache_release(cache);
        return st;
    }
    cache->tuned = calloc((size_t)cache->n_stored, sizeof *cache->tuned);
    cache->tuned_source = calloc((size_t)cache->n_stored, sizeof *cache->tuned_source);
    if (!cache->tuned || !cache->tuned_source) {
        clkvq_cache_release(cache);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating tuning slots");
    }
    /* what tuning found for each stored layer's shape (never fails: it
     * falls back to vendor, then built-in defaults); AUTO layouts follow
     * the first */
    for (int l = 0; l < cache->n_stored; l++) {
        /* layers of one shape share a lookup (each reads the tuning file) */
        int same = -1;
        for (int e = 0; e < l && same < 0; e++)
            if (same_shape(&cache->layers[e], &cache->layers[l]))
                same = e;
        if (same >= 0) {
            cache->tuned[l] = cache->tuned[same];
            cache->tuned_source[l] = cache->tuned_source[same];
            continue;
        }
        clkvq_tune_shape shape = tune_shape_of(cache, &cache->layers[l]);
        if (clkvq_tuning_lookup(ctx, &shape, &cache->tuned[l], &cache->tuned_source[l]) !=
            CLKVQ_OK) {
            memset(&cache->tuned[l], 0, sizeof cache->tuned[l]);
            cache->tuned_source[l] = CLKVQ_TUNED_BUILTIN;
        }
    }
    if (cache->cfg.layout_k == CLKVQ_LAYOUT_AUTO)
        cache->cfg.layout_k = cache->tuned[0].layout_k;
    if (cache->cfg.layout_v == CLKVQ_LAYOUT_AUTO)
        cache->cfg.layout_v = cache->tuned[0].layout_v;
    clkvq_clear_error(ctx);
    for (int l = 0; l < cache->n_stored && st == CLKVQ_OK; l++) {
        clkvq_cache_layer *layer = &cache->layers[l];
        const clkvq_layer_config *lc = &cfg->layers[layer->model_layer];
        layer->ring = ring_slots(&layer->cfg);
        layer->fp_slots = layer->ring + layer->cfg.n_sink;
        layer->length = calloc((size_t)cfg->n_seqs, sizeof(int));
        if (!layer->length)
            st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating sequence lengths");
        if (st == CLKVQ_OK)
            st = create_store(cache, layer, 0, lc->perm_k, lc->mean_k);
        if (st == CLKVQ_OK)
            st = create_store(cache, layer, 1, lc->perm_v, lc->mean_v);
        if (st == CLKVQ_OK)
            st = create_buffer(ctx, (size_t)cfg->n_seqs * sizeof(cl_int), layer->length,
                               &layer->len_mem, "sequence lengths");
        if (st == CLKVQ_OK)
            st = clkvq_pages_init(cache, l);
        if (st == CLKVQ_OK)
            st = tuned_entries(cache, l);
    }
    if (st != CLKVQ_OK) {
        clkvq_cache_release(cache);
        return st;
    }
    *out = cache;
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ kernels */

/* The program variant of one tensor store: its format's row of the table,
 * parameter storage, axis and layout; everything else is an argument. */
static clkvq_status store_kernel(clkvq_cache *cache, const clkvq_cache_layer *layer,
                                 const clkvq_tensor_store *store, const char *name,
                                 cl_kernel *out)
{
    clkvq_defines d;
    clkvq_defines_init(&d);
    /* the fp16 scheme packs nothing; its store kernels still need a format */
    clkvq_defines_format(&d, "", layer->cfg.scheme == CLKVQ_SCHEME_FP16 ? CLKVQ_FMT_Q8
                                                                         : store->format);
    clkvq_defines_params(&d, layer->cfg.param_type, layer->cfg.zero_mode);
    clkvq_defines_int(&d, "AXIS_CHANNEL", store->axis == CLKVQ_AXIS_CHANNEL);
    clkvq_defines_int(&d, "LAYOUT", (int)store->layout);
    clkvq_defines_int(&d, "FP_PAGED", layer->cfg.scheme == CLKVQ_SCHEME_FP16);
    const char *options = clkvq_defines_get(cache->ctx, &d);
    if (!options)
        return CLKVQ_ERR_BUILD;
    return clkvq_kernel_get(cache->ctx, g_cache_sources, 2, options, name, out);
}

/* The geometry every cache kernel takes, in GEOM_ARGS order (kv_cache.cl),
 * with the layer's block table. */
static clkvq_status args_geometry(clkvq_args *a, clkvq_cache *cache,
                                  const clkvq_cache_layer *layer,
                                  const clkvq_tensor_store *store, int seq)
{
    const clkvq_cache_config *cfg = &cache->cfg;
    cl_mem table;
    int max_blocks;
    clkvq_status st = clkvq_cache_table(cache, (int)(layer - cache->layers), &table, &max_blocks);
    if (st != CLKVQ_OK)
        return st;
    clkvq_args_mem(a, table);
    clkvq_args_int(a, layer->n_kv_heads);
    clkvq_args_int(a, cfg->head_dim);
    clkvq_args_int(a, cache->block_size);
    clkvq_args_int(a, layer->cfg.group_size);
    clkvq_args_int(a, store->group_words);
    clkvq_args_int(a, store->n_groups);
    clkvq_args_int(a, layer->fp_slots);
    clkvq_args_int(a, layer->ring);
    clkvq_args_int(a, layer->cfg.n_sink);
    clkvq_args_int(a, seq);
    clkvq_args_int(a, max_blocks);
    return CLKVQ_OK;
}

static clkvq_status run_1d(clkvq_context *ctx, cl_kernel k, size_t items, const char *what)
{
    size_t local = CACHE_LOCAL_SIZE;
    size_t global = clkvq_round_up(items ? items : 1, local);
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, k, 1, NULL, &global, &local, 0, NULL, NULL);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, what);
}

/* ------------------------------------------------------------ append */

static clkvq_status check_seq(clkvq_cache *cache, int layer, int seq)
{
    if (layer < 0 || layer >= cache->cfg.n_layers)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG, "layer %d is outside 0..%d", layer,
                          cache->cfg.n_layers - 1);
    if (seq < 0 || seq >= cache->cfg.n_seqs)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG, "sequence %d is outside 0..%d", seq,
                          cache->cfg.n_seqs - 1);
    return CLKVQ_OK;
}

/* Quantizes tokens [q0, q1) of one tensor straight from where they are
 * (old fp16 rows or new input, gathered into packed channel order) into
 * the packed store: one kernel, no staging copy. */
static clkvq_status quantize_range(clkvq_cache *cache, clkvq_cache_layer *layer,
                                   clkvq_tensor_store *store, int seq, cl_mem in, cl_mem perm,
                                   int n_old, int n_in, int q0, int q1)
{
    int n_stage = q1 - q0;
    int token_axis = store->axis == CLKVQ_AXIS_TOKEN;
    cl_kernel quant;
    clkvq_status st = store_kernel(cache, layer, store,
                                   token_axis ? "clkvq_cache_quantize_token"
                                              : "clkvq_cache_quantize_channel",
                                   &quant);
    if (st != CLKVQ_OK)
        return st;
    clkvq_args a;
    clkvq_args_begin(&a, quant, 0);
    clkvq_args_mem(&a, store->fp);
    clkvq_args_mem(&a, in);
    clkvq_args_mem(&a, perm);
    clkvq_args_mem(&a, store->codes);
    clkvq_args_mem(&a, store->params);
    if ((st = args_geometry(&a, cache, layer, store, seq)) != CLKVQ_OK)
        return st;
    clkvq_args_float(&a, store->clip);
    clkvq_args_int(&a, q0);
    clkvq_args_int(&a, n_stage);
    clkvq_args_int(&a, n_old);
    clkvq_args_int(&a, n_in);
    if ((st = clkvq_args_end(cache->ctx, &a, "cache quantize")) != CLKVQ_OK)
        return st;
    /* token axis: one work-item per 16 groups; channel axis: one per block
     * touched (a first one after the sinks may be partial) */
    int g = layer->cfg.group_size;
    size_t items = token_axis ? ((size_t)layer->n_kv_heads * n_stage * store->n_groups + 15) / 16
                              : (size_t)layer->n_kv_heads * ((q1 + g - 1) / g - q0 / g);
    return run_1d(cache->ctx, quant, items, "cache quantize");
}

static clkvq_status store_fp16(clkvq_cache *cache, clkvq_cache_layer *layer,
                               clkvq_tensor_store *store, int seq, cl_mem in, cl_mem perm,
                               int n_old, int n_in, int q_end_new)
{
    cl_kernel k;
    clkvq_status st = store_kernel(cache, layer, store, "clkvq_cache_store_fp16", &k);
    if (st != CLKVQ_OK)
        return st;
    clkvq_args a;
    clkvq_args_begin(&a, k, 0);
    clkvq_args_mem(&a, in);
    clkvq_args_mem(&a, perm);
    clkvq_args_mem(&a, store->fp);
    if ((st = args_geometry(&a, cache, layer, store, seq)) != CLKVQ_OK)
        return st;
    clkvq_args_int(&a, n_old);
    clkvq_args_int(&a, n_in);
    clkvq_args_int(&a, q_end_new);
    if ((st = clkvq_args_end(cache->ctx, &a, "fp16 store")) != CLKVQ_OK)
        return st;
    return run_1d(cache->ctx, k, (size_t)layer->n_kv_heads * n_in, "fp16 store");
}

void clkvq_cache_page_writes(const clkvq_cache_layer *layer, int n_old, int n_new, int *t0,
                             int *t1)
{
    if (layer->cfg.scheme == CLKVQ_SCHEME_FP16) {
        *t0 = n_old;
        *t1 = n_new;
        return;
    }
    *t0 = n_new;
    *t1 = 0;
    for (int i = 0; i < 2; i++) {
        int q0 = clkvq_cache_pack_from(layer, i, n_old, n_new);
        int q1 = clkvq_cache_q_end(layer, i, n_new);
        if (q1 > q0) {
            *t0 = q0 < *t0 ? q0 : *t0;
            *t1 = q1 > *t1 ? q1 : *t1;
        }
    }
}

int clkvq_cache_pages_kept(const clkvq_cache_layer *layer, int n_tokens)
{
    if (layer->cfg.scheme == CLKVQ_SCHEME_FP16)
        return n_tokens;
    int qk = clkvq_cache_q_end(layer, 0, n_tokens), qv = clkvq_cache_q_end(layer, 1, n_tokens);
    return qk > qv ? qk : qv;
}

/* Runtime tables: the page ids an append writes through must name pages
 * of the pool (a bad one would write out of bounds). */
static clkvq_status check_runtime_pages(clkvq_cache *cache, int seq, int t0, int t1)
{
    if (t1 <= t0)
        return CLKVQ_OK;
    int b0 = t0 / cache->block_size, b1 = (t1 - 1) / cache->block_size;
    if (b1 >= cache->rt_max_blocks)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                          "token %d of sequence %d needs block %d, the block table has %d per "
                          "sequence; nothing was appended",
                          t1 - 1, seq, b1, cache->rt_max_blocks);
    int ids[64];
    for (int b = b0; b <= b1; b += 64) {
        int n = b1 - b + 1 < 64 ? b1 - b + 1 : 64;
        cl_int err = clEnqueueReadBuffer(cache->ctx->queue, cache->rt_table, CL_TRUE,
                                         ((size_t)seq * cache->rt_max_blocks + b) * sizeof(int),
                                         (size_t)n * sizeof(int), ids, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            return clkvq_cl_fail(cache->ctx, err, "reading the block table");
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= cache->n_pages)
                return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                                  "block table entry [%d][%d] = %d is not a page of the pool "
                                  "(0..%d); nothing was appended",
                                  seq, b + i, ids[i], cache->n_pages - 1);
    }
    return CLKVQ_OK;
}

/* Centers, rotates and permutes the n_in appended rows of tensor is_v
 * into cache->xform[is_v] (clkvq_cache_transform), and refuses rows that
 * leave the fp16 range on the way (a rotation can concentrate a row's
 * norm in one channel): nothing is written to the cache before. */
static clkvq_status transform_rows(clkvq_cache *cache, clkvq_cache_layer *layer, int is_v,
                                   cl_mem in, int n_in)
{
    clkvq_context *ctx = cache->ctx;
    const clkvq_cache_config *cfg = &cache->cfg;
    clkvq_tensor_store *store = is_v ? &layer->v : &layer->k;
    size_t n_values = (size_t)layer->n_kv_heads * n_in * cfg->head_dim;
    size_t bytes = n_values * sizeof(float);
    if (!cache->xform[is_v] || cache->xform_bytes[is_v] < bytes) {
        release_mem(&cache->xform[is_v]);
        cache->xform_bytes[is_v] = 0;
        clkvq_status st = create_buffer(ctx, bytes, NULL, &cache->xform[is_v], "transform scratch");
        if (st != CLKVQ_OK)
            return st;
        cache->xform_bytes[is_v] = bytes;
    }
    cl_kernel k;
    clkvq_status st = store_kernel(cache, layer, store, "clkvq_cache_transform", &k);
    if (st != CLKVQ_OK)
        return st;
    clkvq_args a;
    clkvq_args_begin(&a, k, 0);
    clkvq_args_mem(&a, in);
    clkvq_args_mem(&a, store->perm);
    clkvq_args_mem(&a, store->mean);
    clkvq_args_mem(&a, cache->xform[is_v]);
    clkvq_args_int(&a, layer->n_kv_heads);
    clkvq_args_int(&a, n_in);
    clkvq_args_int(&a, cfg->head_dim);
    clkvq_args_int(&a, layer->cfg.rotate);
    clkvq_args_int(&a, (int)layer->cfg.rot_seed);
    if ((st = clkvq_args_end(ctx, &a, "transform")) != CLKVQ_OK ||
        (st = run_1d(ctx, k, (size_t)layer->n_kv_heads * n_in, "transform")) != CLKVQ_OK)
        return st;
    cl_event ev = NULL;
    st = clkvq_check_finite(ctx, NULL, cache->xform[is_v], n_values, &ev);
    if (ev)
        clReleaseEvent(ev);
    if (st == CLKVQ_ERR_NONFINITE)
        return clkvq_fail(ctx, st, "%s: a value leaves the fp16 range after centering/rotation; "
                          "nothing was appended", is_v ? "v" : "k");
    return st;
}

/* The input check's message, naming the tensor ("k" or "v"). */
static clkvq_status nonfinite(clkvq_context *ctx, int is_v, long index)
{
    return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                      "%s: input element %ld is NaN, Inf or beyond +-65504; nothing was written",
                      is_v ? "v" : "k", index);
}

/* Writes n_tokens checked tokens (k and v on the device) into stored
 * layer l (check_only: runs the transform's range check alone). */
clkvq_status clkvq_cache_write_stored(clkvq_cache *cache, int l, int seq, int n_tokens, cl_mem k,
                                      cl_mem v, int check_only)
{
    clkvq_context *ctx = cache->ctx;
    clkvq_cache_layer *layer = &cache->layers[l];
    const clkvq_cache_config *cfg = &cache->cfg;
    int n_old = layer->length[seq];
    cl_mem inputs[2] = {k, v};
    clkvq_status st = CLKVQ_OK;

    /* The token range each tensor packs (quantized straight from its fp16
     * rows or the input: no staging buffer). */
    int n_new = n_old + n_tokens;
    int q0[2], q1[2];
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++) {
        q0[i] = clkvq_cache_pack_from(layer, i, n_old, n_new);
        q1[i] = clkvq_cache_q_end(layer, i, n_new);
    }
    /* centering/rotation first, into scratch: the kernels below then read
     * packed-order rows without a permutation */
    cl_mem perms[2] = {layer->k.perm, layer->v.perm};
    if (clkvq_layer_transforms(layer))
        for (int i = 0; i < 2 && st == CLKVQ_OK; i++) {
            st = transform_rows(cache, layer, i, inputs[i], n_tokens);
            if (st == CLKVQ_OK) {
                inputs[i] = cache->xform[i];
                perms[i] = NULL;
            }
        }
    if (st != CLKVQ_OK || check_only)
        return st;
    int w0, w1;
    clkvq_cache_page_writes(layer, n_old, n_new, &w0, &w1);
    clkvq_page_undo undo;
    memset(&undo, 0, sizeof undo);
    if (cfg->runtime_tables)
        st = check_runtime_pages(cache, seq, w0, w1);
    else
        st = clkvq_pages_reserve(cache, l, seq, w0, w1, &undo);
    if (st != CLKVQ_OK)
        return st;
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++) {
        clkvq_tensor_store *store = i ? &layer->v : &layer->k;
        /* quantizing reads old fp16 rows that the new tokens may overwrite:
         * the in-order queue runs it first */
        if (q1[i] > q0[i])
            st = quantize_range(cache, layer, store, seq, inputs[i], perms[i], n_old, n_tokens,
                                q0[i], q1[i]);
        /* new tokens kept in fp16: sinks, and those from q_end on (none for
         * the token scheme past its sinks: no launch for nothing) */
        if (st == CLKVQ_OK && (n_old < layer->cfg.n_sink || n_new > q1[i]))
            st = store_fp16(cache, layer, store, seq, inputs[i], perms[i], n_old, n_tokens,
                            q1[i]);
    }
    if (st == CLKVQ_OK) {
        cl_int err = clFinish(ctx->queue);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "finishing the append");
    }
    if (!cfg->runtime_tables) {
        if (st != CLKVQ_OK)
            clkvq_pages_rollback(cache, &undo);
        clkvq_pages_undo_free(&undo);
    }
    if (st == CLKVQ_OK) {
        layer->length[seq] = n_new;
        layer->len_dirty = 1;
    }
    return st;
}


/* Checks the arguments and the input (device buffers k, v, or host arrays
 * hk, hv: checked on the host, then uploaded), then appends. */
static clkvq_status append_impl(clkvq_cache *cache, int l, int seq, int n_tokens, cl_mem k,
                                cl_mem v, const float *hk, const float *hv)
{
    clkvq_context *ctx = cache->ctx;
    clkvq_status st = check_seq(cache, l, seq);
    if (st != CLKVQ_OK)
        return st;
    const clkvq_cache_config *cfg = &cache->cfg;
    int n_old = cache->layers[cache->first_stored[l]].length[seq];
    if (n_tokens <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "n_tokens %d must be positive", n_tokens);
    if (n_tokens > cfg->capacity - n_old)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "appending %d tokens to sequence %d of layer %d (length %d) exceeds "
                          "its capacity %d; nothing was appended",
                          n_tokens, seq, l, n_old, cfg->capacity);
    size_t n_values = (size_t)cfg->n_kv_heads * n_tokens * cfg->head_dim;
    size_t bytes = n_values * sizeof(float);
    cl_mem up[2] = {NULL, NULL};
    if (hk) {
        /* still on the host: checked here, before the upload, instead of a
         * device pass and a round trip to read its verdict */
        long bad_k = clkvq_first_nonfinite(hk, n_values);
        long bad_v = bad_k < 0 ? clkvq_first_nonfinite(hv, n_values) : -1;
        if (bad_k >= 0 || bad_v >= 0)
            return nonfinite(ctx, bad_k < 0, bad_k >= 0 ? bad_k : bad_v);
        st = create_buffer(ctx, bytes, hk, &up[0], "k upload");
        if (st == CLKVQ_OK)
            st = create_buffer(ctx, bytes, hv, &up[1], "v upload");
        k = up[0];
        v = up[1];
    } else {
        if ((st = clkvq_check_buffer(ctx, k, "k", bytes)) != CLKVQ_OK ||
            (st = clkvq_check_buffer(ctx, v, "v", bytes)) != CLKVQ_OK)
            return st;
        /* both tensors, one wait */
        cl_mem inputs[2] = {k, v};
        size_t counts[2] = {n_values, n_values};
        int bad = 0;
        st = clkvq_check_finite_n(ctx, NULL, inputs, counts, 2, &bad, NULL);
        if (st == CLKVQ_ERR_NONFINITE) {
            char detail[CLKVQ_MSG_MAX / 2];
            snprintf(detail, sizeof detail, "%s", clkvq_last_error(ctx));
            return clkvq_fail(ctx, st, "%s: %s", bad ? "v" : "k", detail);
        }
    }
    if (st == CLKVQ_OK)
        st = clkvq_cache_n_shares(cache, l) > 1
                 ? clkvq_shares_append(cache, l, seq, n_tokens, k, v)
                 : clkvq_cache_write_stored(cache, cache->first_stored[l], seq, n_tokens, k, v, 0);
    release_mem(&up[0]);
    release_mem(&up[1]);
    return st;
}

clkvq_status clkvq_cache_append_mem(clkvq_cache *cache, int l, int seq, int n_tokens, cl_mem k,
                                    cl_mem v)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_append: cache is NULL");
    clkvq_clear_error(cache->ctx);
    if (cache->cfg.runtime_tables)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                          "this cache's pages belong to the runtime: append with "
                          "clkvq_cache_append_paged and its block table");
    return append_impl(cache, l, seq, n_tokens, k, v, NULL, NULL);
}

/* Runtime tables: takes the runtime's block table for this and later
 * calls (read, truncate, prefill use the last one given). */
clkvq_status clkvq_cache_use_table(clkvq_cache *cache, cl_mem table, int max_blocks)
{
    if (!cache->cfg.runtime_tables)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                          "this cache manages its own pages (runtime_tables is 0)");
    if (max_blocks <= 0 || (long long)max_blocks * cache->block_size < cache->cfg.capacity)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                          "max_blocks %d x block_size %d does not cover the capacity %d",
                          max_blocks, cache->block_size, cache->cfg.capacity);
    clkvq_status st = clkvq_check_buffer(cache->ctx, table, "block_table",
                                         (size_t)cache->cfg.n_seqs * max_blocks * sizeof(int));
    if (st != CLKVQ_OK)
        return st;
    if (table != cache->rt_table) {
        clRetainMemObject(table);
        release_mem(&cache->rt_table);
        cache->rt_table = table;
    }
    cache->rt_max_blocks = max_blocks;
    return CLKVQ_OK;
}

clkvq_status clkvq_cache_append_paged(clkvq_cache *cache, int l, int seq, int n_tokens, cl_mem k,
                                      cl_mem v, cl_mem block_table, int max_blocks)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_append_paged: cache is NULL");
    clkvq_clear_error(cache->ctx);
    clkvq_status st = clkvq_cache_use_table(cache, block_table, max_blocks);
    return st == CLKVQ_OK ? append_impl(cache, l, seq, n_tokens, k, v, NULL, NULL) : st;
}

clkvq_status clkvq_cache_append(clkvq_cache *cache, int layer, int seq, int n_tokens,
                                const float *k, const float *v)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_append: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    if (!k || !v)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_append: k or v is NULL");
    if (n_tokens <= 0 || n_tokens > cache->cfg.capacity)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "n_tokens %d is outside 1..capacity %d",
                          n_tokens, cache->cfg.capacity);
    if (cache->cfg.runtime_tables)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "this cache's pages belong to the runtime: append with "
                          "clkvq_cache_append_paged and its block table");
    clkvq_clear_error(ctx);
    return append_impl(cache, layer, seq, n_tokens, NULL, NULL, k, v);
}

clkvq_status clkvq_cache_length(const clkvq_cache *cache, int layer, int seq, int *n_tokens)
{
    if (!cache || !n_tokens)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_length: NULL argument");
    clkvq_status st = check_seq((clkvq_cache *)cache, layer, seq);
    if (st == CLKVQ_OK)
        *n_tokens = cache->layers[cache->first_stored[layer]].length[seq];
    return st;
}

/* ------------------------------------------------------------ truncate */

static clkvq_status refill(clkvq_cache *cache, clkvq_cache_layer *layer,
                           clkvq_tensor_store *store, int seq, int t_from, int t_count)
{
    cl_kernel k;
    clkvq_status st = store_kernel(cache, layer, store, "clkvq_cache_refill_fp16", &k);
    if (st != CLKVQ_OK)
        return st;
    clkvq_args a;
    clkvq_args_begin(&a, k, 0);
    clkvq_args_mem(&a, store->codes);
    clkvq_args_mem(&a, store->params);
    clkvq_args_mem(&a, store->fp);
    if ((st = args_geometry(&a, cache, layer, store, seq)) != CLKVQ_OK)
        return st;
    clkvq_args_int(&a, t_from);
    clkvq_args_int(&a, t_count);
    if ((st = clkvq_args_end(cache->ctx, &a, "refill")) != CLKVQ_OK)
        return st;
    return run_1d(cache->ctx, k, (size_t)layer->n_kv_heads * t_count * cache->cfg.head_dim,
                  "refill");
}

/* Refills what the shorter sequence keeps in fp16 from the packed codes
 * (enqueued), for stored layer l. */
static clkvq_status truncate_refill(clkvq_cache *cache, int l, int seq, int n_tokens)
{
    clkvq_cache_layer *layer = &cache->layers[l];
    int n_old = layer->length[seq];
    clkvq_status st = CLKVQ_OK;
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++) {
        int q_old = clkvq_cache_q_end(layer, i, n_old);
        int q_new = clkvq_cache_q_end(layer, i, n_tokens);
        int to = q_old < n_tokens ? q_old : n_tokens;
        if (to > q_new)
            st = refill(cache, layer, i ? &layer->v : &layer->k, seq, q_new, to - q_new);
    }
    return st;
}

/* After the refills ran: pages left with no packed token go back to the
 * pool, and the length drops. */
static void truncate_commit(clkvq_cache *cache, int l, int seq, int n_tokens)
{
    clkvq_cache_layer *layer = &cache->layers[l];
    clkvq_pages_drop_from(cache, l, seq, clkvq_cache_pages_kept(layer, n_tokens));
    layer->length[seq] = n_tokens;
    layer->len_dirty = 1;
}

static clkvq_status finish(clkvq_context *ctx, clkvq_status st, const char *what)
{
    if (st != CLKVQ_OK)
        return st;
    cl_int err = clFinish(ctx->queue);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, what);
}

clkvq_status clkvq_cache_truncate_stored(clkvq_cache *cache, int l, int seq, int n_tokens)
{
    clkvq_status st = finish(cache->ctx, truncate_refill(cache, l, seq, n_tokens),
                             "finishing the truncation");
    if (st == CLKVQ_OK)
        truncate_commit(cache, l, seq, n_tokens);
    return st;
}

clkvq_status clkvq_cache_truncate(clkvq_cache *cache, int seq, int n_tokens)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_truncate: cache is NULL");
    clkvq_clear_error(cache->ctx);
    clkvq_status st = check_seq(cache, 0, seq);
    if (st != CLKVQ_OK)
        return st;
    for (int l = 0; l < cache->n_stored; l++)
        if (n_tokens < 0 || n_tokens > cache->layers[l].length[seq])
            return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                              "cannot truncate sequence %d to %d tokens: layer %d holds %d", seq,
                              n_tokens, cache->layers[l].model_layer,
                              cache->layers[l].length[seq]);
    for (int l = 0; l < cache->n_stored && st == CLKVQ_OK; l++)
        st = truncate_refill(cache, l, seq, n_tokens);
    st = finish(cache->ctx, st, "finishing the truncation");
    if (st == CLKVQ_OK)
        for (int l = 0; l < cache->n_stored; l++)
            truncate_commit(cache, l, seq, n_tokens);
    return st;
}

/* ------------------------------------------------------------ fork */

/* Copies seq_src's fp16 ring rows (every kv head) over seq_dst's. */
static clkvq_status copy_rings(clkvq_cache *cache, clkvq_cache_layer *layer, int src, int dst)
{
    for (int i = 0; i < 2; i++) {
        clkvq_tensor_store *ts = i ? &layer->v : &layer->k;
        if (ts->page_fp) /* the fp16 scheme keeps its rows in pages */
            continue;
        size_t bytes = (size_t)layer->n_kv_heads * layer->fp_slots * cache->cfg.head_dim * 2;
        cl_int err = clEnqueueCopyBuffer(cache->ctx->queue, ts->fp, ts->fp, (size_t)src * bytes,
                                         (size_t)dst * bytes, bytes, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            return clkvq_cl_fail(cache->ctx, err, "copying fp16 rings");
    }
    return CLKVQ_OK;
}

clkvq_status clkvq_cache_fork(clkvq_cache *cache, int seq_src, int seq_dst)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_fork: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    clkvq_clear_error(ctx);
    clkvq_status st = check_seq(cache, 0, seq_src);
    if (st == CLKVQ_OK)
        st = check_seq(cache, 0, seq_dst);
    if (st != CLKVQ_OK)
        return st;
    if (seq_src == seq_dst)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "cannot fork sequence %d into itself",
                          seq_src);
    for (int l = 0; l < cache->n_stored; l++)
        if (cache->layers[l].length[seq_dst] != 0)
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "fork target sequence %d holds %d tokens in layer %d: truncate it "
                              "to 0 first",
                              seq_dst, cache->layers[l].length[seq_dst],
                              cache->layers[l].model_layer);
    for (int l = 0; l < cache->n_stored && st == CLKVQ_OK; l++) {
        clkvq_cache_layer *layer = &cache->layers[l];
        st = copy_rings(cache, layer, seq_src, seq_dst);
        /* the contiguous cache's pages belong to their sequences: copy */
        if (st == CLKVQ_OK && !cache->paged)
            st = clkvq_pages_copy(cache, l, seq_src, seq_dst);
    }
    if (st == CLKVQ_OK) {
        cl_int err = clFinish(ctx->queue);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "finishing the fork");
    }
    if (st != CLKVQ_OK)
        return st;
    for (int l = 0; l < cache->n_stored; l++) {
        if (cache->paged && !cache->cfg.runtime_tables)
            clkvq_pages_share(cache, l, seq_src, seq_dst);
        cache->layers[l].length[seq_dst] = cache->layers[l].length[seq_src];
        cache->layers[l].len_dirty = 1;
    }
    return CLKVQ_OK;
}

clkvq_status clkvq_cache_copy_blocks(clkvq_cache *cache, const int *src, const int *dst, int n)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_copy_blocks: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    clkvq_clear_error(ctx);
    if (!cache->cfg.runtime_tables)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "this cache manages its own pages: clkvq_cache_fork shares them");
    if (n < 0 || (n > 0 && (!src || !dst)))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "copy_blocks: %d pages, src or dst NULL",
                          n);
    for (int i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= cache->n_pages || dst[i] < 0 || dst[i] >= cache->n_pages ||
            src[i] == dst[i])
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "copy_blocks: pair %d (%d -> %d) is not two different pages of "
                              "0..%d; nothing was copied",
                              i, src[i], dst[i], cache->n_pages - 1);
    clkvq_status st = CLKVQ_OK;
    for (int l = 0; l < cache->n_stored && st == CLKVQ_OK; l++)
        for (int i = 0; i < n && st == CLKVQ_OK; i++)
            st = clkvq_pages_copy(cache, l, src[i], dst[i]);
    if (st == CLKVQ_OK) {
        cl_int err = clFinish(ctx->queue);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "finishing the page copies");
    }
    return st;
}

/* ------------------------------------------------------------ read */

static clkvq_status read_tensor(clkvq_cache *cache, clkvq_cache_layer *layer,
                                clkvq_tensor_store *store, int is_v, int seq, cl_mem out)
{
    int n = layer->length[seq];
    /* a transformed layer maps whole rows back (one work-item per row) */
    int rows = clkvq_layer_transforms(layer);
    cl_kernel k;
    clkvq_status st =
        store_kernel(cache, layer, store, rows ? "clkvq_cache_read_rows" : "clkvq_cache_read", &k);
    if (st != CLKVQ_OK)
        return st;
    clkvq_args a;
    clkvq_args_begin(&a, k, 0);
    clkvq_args_mem(&a, store->codes);
    clkvq_args_mem(&a, store->params);
    clkvq_args_mem(&a, store->fp);
    clkvq_args_mem(&a, store->perm);
    clkvq_args_mem(&a, out);
    if ((st = args_geometry(&a, cache, layer, store, seq)) != CLKVQ_OK)
        return st;
    clkvq_args_int(&a, n);
    clkvq_args_int(&a, clkvq_cache_q_end(layer, is_v, n));
    clkvq_args_int(&a, 0);
    clkvq_args_int(&a, n);
    if (rows) {
        clkvq_args_mem(&a, store->mean);
        clkvq_args_int(&a, layer->cfg.rotate);
        clkvq_args_int(&a, (int)layer->cfg.rot_seed);
    }
    if ((st = clkvq_args_end(cache->ctx, &a, "read")) != CLKVQ_OK)
        return st;
    size_t items = (size_t)layer->n_kv_heads * n * (rows ? 1 : cache->cfg.head_dim);
    return run_1d(cache->ctx, k, items, "read");
}

clkvq_status clkvq_cache_read_stored(clkvq_cache *cache, int l, int seq, cl_mem k, cl_mem v)
{
    clkvq_cache_layer *layer = &cache->layers[l];
    clkvq_status st = CLKVQ_OK;
    if (k)
        st = read_tensor(cache, layer, &layer->k, 0, seq, k);
    if (st == CLKVQ_OK && v)
        st = read_tensor(cache, layer, &layer->v, 1, seq, v);
    return st;
}

clkvq_status clkvq_cache_read_device(clkvq_cache *cache, int l, int seq, cl_mem k_out,
                                     cl_mem v_out)
{
    clkvq_status st = check_seq(cache, l, seq);
    if (st != CLKVQ_OK)
        return st;
    int n = cache->layers[cache->first_stored[l]].length[seq];
    size_t need = (size_t)cache->cfg.n_kv_heads * n * cache->cfg.head_dim * sizeof(float);
    if (n == 0)
        return CLKVQ_OK;
    if (k_out && (st = clkvq_check_buffer(cache->ctx, k_out, "k_out", need)) != CLKVQ_OK)
        return st;
    if (v_out && (st = clkvq_check_buffer(cache->ctx, v_out, "v_out", need)) != CLKVQ_OK)
        return st;
    return clkvq_cache_n_shares(cache, l) > 1
               ? clkvq_shares_read(cache, l, seq, k_out, v_out)
               : clkvq_cache_read_stored(cache, cache->first_stored[l], seq, k_out, v_out);
}

clkvq_status clkvq_cache_read(clkvq_cache *cache, int l, int seq, float *k, float *v)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_read: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    clkvq_clear_error(ctx);
    clkvq_status st = check_seq(cache, l, seq);
    if (st != CLKVQ_OK)
        return st;
    int n = cache->layers[cache->first_stored[l]].length[seq];
    if (n == 0)
        return CLKVQ_OK;
    size_t bytes = (size_t)cache->cfg.n_kv_heads * n * cache->cfg.head_dim * sizeof(float);
    cl_mem km = NULL, vm = NULL;
    if (k)
        st = create_buffer(ctx, bytes, NULL, &km, "k read-back");
    if (st == CLKVQ_OK && v)
        st = create_buffer(ctx, bytes, NULL, &vm, "v read-back");
    if (st == CLKVQ_OK)
        st = clkvq_cache_read_device(cache, l, seq, km, vm);
    cl_int err = CL_SUCCESS;
    if (st == CLKVQ_OK && k)
        err = clEnqueueReadBuffer(ctx->queue, km, CL_TRUE, 0, bytes, k, 0, NULL, NULL);
    if (st == CLKVQ_OK && err == CL_SUCCESS && v)
        err = clEnqueueReadBuffer(ctx->queue, vm, CL_TRUE, 0, bytes, v, 0, NULL, NULL);
    if (st == CLKVQ_OK && err != CL_SUCCESS)
        st = clkvq_cl_fail(ctx, err, "reading the cache back");
    release_mem(&km);
    release_mem(&vm);
    return st;
}

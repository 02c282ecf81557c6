/*
 * The KV cache object's internals, shared by kv_cache.c (state, append,
 * truncate, read), attention.c (fused decode) and prefill.c (CLBlast).
 *
 * The token regions of a sequence (sinks / quantized / recent), the fp16
 * store's slots and the packed layouts are defined once, in
 * cl_kernels/clkvq_packing.h, which the kernels compile too, as are the
 * pages: every kernel that touches packed tokens reads a block table
 * (lib/kv_pages.c owns the pools). Channels in both stores are in packed
 * (permuted) order.
 */
#ifndef CLKVQ_KV_CACHE_H
#define CLKVQ_KV_CACHE_H

#include "internal.h"
#include "clkvq_packing.h"

typedef struct {
    clkvq_format format;
    clkvq_axis axis;
    float clip;
    int group_words;      /* words per packed group */
    int n_groups;         /* per-token groups per row (token axis) */
    int row_words;        /* n_groups * group_words (token axis) */
    clkvq_layout layout;  /* token axis only */
    cl_mem codes, params; /* page pools; NULL when the scheme stores no packed tokens */
    cl_mem fp;            /* fp16 rings, or the fp16 scheme's page pool */
    size_t page_codes, page_params, page_fp; /* bytes of one page in each pool */
    cl_mem perm;          /* int32 [n_kv_heads][head_dim] or NULL */
    int32_t *perm_host;
    cl_mem mean;          /* float [n_kv_heads][head_dim] or NULL (centering) */
    float *mean_host;
} clkvq_tensor_store;

/* The page pool of one layer, shared by K and V (a page id names both). */
typedef struct {
    int *table;           /* [n_seqs][max_blocks] page ids, -1: none (NULL: runtime tables) */
    int *refs;            /* [n_pages] sequences holding each page */
    int *free_ids;        /* stack of free page ids */
    int n_free;
    cl_mem table_mem;     /* the device copy of table */
    int dirty;            /* table changed since the last upload */
} clkvq_page_pool;

/* A stored layer: one model layer, or (per-head bits) the share of its kv
 * heads that carries one (K, V) pair. Kernels see a stored layer as a
 * layer of n_kv_heads heads; lib/kv_shares.c maps the model's heads in and
 * out. */
typedef struct {
    clkvq_layer_config cfg; /* perm, mean and head format pointers cleared: see the stores */
    int model_layer;        /* the model layer it stores (heads of) */
    int n_kv_heads, n_q_heads; /* its heads (the model's, or its share of them) */
    int *heads;             /* the model's kv head of each of them; NULL: all, in order */
    int ring;               /* fp16 ring slots for recent tokens */
    int fp_slots;           /* ring + n_sink */
    clkvq_tensor_store k, v;
    int *length;            /* per sequence */
    /* the device copy of length the decode kernels read: written without
     * blocking when a decode finds it stale. The host array is changed only
     * after a clFinish (append, truncate, fork), so such a write has always
     * read it by then. */
    cl_mem len_mem;
    int len_dirty;
    clkvq_page_pool pages;
    /* this device's tuned entries for the layer's shape and the cache's
     * layouts (decode picks the one nearest its batch and length) */
    clkvq_tune_result *tuned_set;
    int n_tuned_set;
} clkvq_cache_layer;

struct clkvq_cache {
    clkvq_context *ctx;
    clkvq_cache_config cfg; /* layers pointer cleared */
    clkvq_cache_layer *layers; /* n_stored stored layers, model layer by model layer */
    int n_stored;
    int *first_stored;      /* [n_layers + 1]: model layer l is layers[first_stored[l] ..
                               first_stored[l + 1]) */
    int block_size;         /* tokens per page (the contiguous cache: the capacity, rounded) */
    int max_blocks;         /* pages one sequence can hold */
    int n_pages;            /* pages per layer pool */
    int paged;              /* pages taken and returned as tokens come and go */
    cl_mem rt_table;        /* runtime tables: the block table last given (retained) */
    int rt_max_blocks;      /* its width */
    int async_writes;       /* a non-blocking length write was enqueued (release waits) */
    cl_mem partials;        /* decode split-K partial results */
    size_t partials_bytes;
    cl_mem q_scratch;       /* permuted, scaled queries (serial variant) */
    size_t q_scratch_bytes;
    cl_mem qsum_scratch;    /* their per-group sums */
    size_t qsum_scratch_bytes;
    clkvq_attn_tuning tuning; /* 0 fields: defaults */
    clkvq_tune_params *tuned; /* per layer, from the tuning lookup at create */
    clkvq_tuning_source *tuned_source; /* the chain's level each of them came from */
    cl_mem xform[2];        /* appended K, V rows after centering/rotation (packed order) */
    size_t xform_bytes[2];
    /* split layers (kv_shares.c): one share's heads of K/V rows, queries,
     * outputs, read-back rows, contiguous */
    cl_mem share_buf[4];
    size_t share_bytes[4];
};

/* A model layer's stored layers (more than one: its heads carry different
 * pairs). */
static inline int clkvq_cache_n_shares(const clkvq_cache *cache, int l)
{
    return cache->first_stored[l + 1] - cache->first_stored[l];
}
static inline clkvq_cache_layer *clkvq_cache_share(const clkvq_cache *cache, int l, int s)
{
    return &cache->layers[cache->first_stored[l] + s];
}

/* Whether a layer stores transformed rows (centering or rotation): its
 * appends go through clkvq_cache_transform and its read-back back. */
static inline int clkvq_layer_transforms(const clkvq_cache_layer *layer)
{
    return layer->cfg.rotate || layer->k.mean || layer->v.mean;
}

/* The alignment of skvq's packed region: the key group with per-channel
 * keys, else 1 (kvq_q_end's `block`). */
static inline int clkvq_layer_block(const clkvq_layer_config *cfg)
{
    return cfg->scheme == CLKVQ_SCHEME_SKVQ && cfg->key_axis == CLKVQ_AXIS_CHANNEL
               ? cfg->group_size
               : 1;
}

/* First quantized token (see above) for one tensor of a layer. */
int clkvq_cache_q_end(const clkvq_cache_layer *layer, int is_v, int n_tokens);
/* First token an append from n_old to n_new tokens packs: the old q_end,
 * but never a sink (a short sequence's q_end sits inside the sinks). */
int clkvq_cache_pack_from(const clkvq_cache_layer *layer, int is_v, int n_old, int n_new);
/* The tokens [*t0, *t1) an append from n_old to n_new writes into pages:
 * what it quantizes, and every new token of the fp16 scheme (an empty
 * range when it writes none). */
void clkvq_cache_page_writes(const clkvq_cache_layer *layer, int n_old, int n_new, int *t0,
                             int *t1);
/* The end of the tokens a sequence of n_tokens holds in pages (later ones
 * live in the fp16 rings; the fp16 scheme pages them all): truncation
 * returns the pages past it. */
int clkvq_cache_pages_kept(const clkvq_cache_layer *layer, int n_tokens);
static inline int clkvq_cache_n_sink_eff(const clkvq_cache_layer *layer, int n_tokens)
{
    return n_tokens < layer->cfg.n_sink ? n_tokens : layer->cfg.n_sink;
}

/* Runtime tables: takes the runtime's block table (retained) for this and
 * later calls. */
clkvq_status clkvq_cache_use_table(clkvq_cache *cache, cl_mem table, int max_blocks);

/* The block table kernels read for layer l and its width: the runtime's
 * last one (runtime tables) or the layer's own, uploaded if it changed. */
clkvq_status clkvq_cache_table(clkvq_cache *cache, int l, cl_mem *table, int *max_blocks);

/*
 * Reads seq of layer into device buffers as fp32 [n_kv_heads][length]
 * [head_dim] in the model's channel order (dequantized where packed); the
 * scratch prefill and read-back use. Enqueues only (in-order queue).
 */
clkvq_status clkvq_cache_read_device(clkvq_cache *cache, int layer, int seq, cl_mem k_out,
                                     cl_mem v_out);

/* Grows a scratch buffer (*mem of *have bytes) to at least need bytes;
 * what names it in the error. Kernels still queued on the old buffer keep
 * it alive. */
clkvq_status clkvq_scratch_ensure(clkvq_context *ctx, cl_mem *mem, size_t *have, size_t need,
                                  const char *what);

/* One stored layer's part of the public calls (kv_cache.c, attention.c):
 * an append of n_tokens checked device rows ([its heads][n_tokens]
 * [head_dim]; check_only: the centering/rotation range check alone, nothing
 * written), a read-back into [its heads][length][head_dim] (k or v may be
 * NULL), a decode with queries and outputs [n_seqs][n_queries][its q heads]
 * [head_dim], and the truncation that undoes a share's append when a later
 * share's fails. */
clkvq_status clkvq_cache_write_stored(clkvq_cache *cache, int stored, int seq, int n_tokens,
                                      cl_mem k, cl_mem v, int check_only);
clkvq_status clkvq_cache_read_stored(clkvq_cache *cache, int stored, int seq, cl_mem k,
                                     cl_mem v);
clkvq_status clkvq_cache_decode_stored(clkvq_cache *cache, int stored, int n_queries, cl_mem q,
                                       cl_mem out, float scale);
clkvq_status clkvq_cache_truncate_stored(clkvq_cache *cache, int stored, int seq, int n_tokens);

/* The same for a model layer split into shares (kv_shares.c): each share's
 * heads gathered from the model's layout into scratch, and back. An append
 * checks every share before it writes one. */
clkvq_status clkvq_shares_append(clkvq_cache *cache, int l, int seq, int n_tokens, cl_mem k,
                                 cl_mem v);
clkvq_status clkvq_shares_read(clkvq_cache *cache, int l, int seq, cl_mem k_out, cl_mem v_out);
clkvq_status clkvq_shares_decode(clkvq_cache *cache, int l, int n_queries, cl_mem q, cl_mem out,
                                 float scale);

/* How one tensor (K or V) of a layer is quantized: format, axis (KIVI keys
 * run along tokens), group, clip, parameter storage. The one mapping from
 * a layer config to quantization parameters (cache, reference, eval). */
clkvq_quant_params clkvq_layer_quant_params(const clkvq_layer_config *cfg, int is_v);

#endif

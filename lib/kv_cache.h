/*
 * The KV cache object's internals, shared by kv_cache.c (state, append,
 * truncate, read), attention.c (fused decode) and prefill.c (CLBlast).
 *
 * The token regions of a sequence (sinks / quantized / recent), the fp16
 * store's slots and the packed layouts are defined once, in
 * cl_kernels/clkvq_packing.h, which the kernels compile too. `capacity` in
 * every kernel argument so named is the token stride clkvq_cache_stride():
 * the capacity rounded up to 256, so vector loads of up to 16 tokens past
 * the last one stay inside the buffer and KIVI blocks of any group size
 * divide it. Channels in both stores are in packed (permuted) order.
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
    cl_mem codes, params; /* NULL when the scheme stores no packed tokens */
    cl_mem fp;            /* fp16 store */
    cl_mem perm;          /* int32 [n_kv_heads][head_dim] or NULL */
    int32_t *perm_host;
} clkvq_tensor_store;

typedef struct {
    clkvq_layer_config cfg; /* perm pointers cleared: see the stores */
    int ring;               /* fp16 ring slots for recent tokens */
    int fp_slots;           /* ring + n_sink */
    clkvq_tensor_store k, v;
    int *length;            /* per sequence */
} clkvq_cache_layer;

struct clkvq_cache {
    clkvq_context *ctx;
    clkvq_cache_config cfg; /* layers pointer cleared */
    clkvq_cache_layer *layers;
    cl_mem seq_len;         /* int32 [n_seqs], lengths of the layer last decoded */
    cl_mem partials;        /* decode split-K partial results */
    size_t partials_bytes;
    cl_mem q_scratch;       /* permuted, scaled queries */
    size_t q_scratch_bytes;
    cl_mem qsum_scratch;    /* their per-group sums */
    size_t qsum_scratch_bytes;
    clkvq_attn_tuning tuning; /* 0 fields: defaults */
    int planted_bug;        /* tests only: kernels built to give wrong output */
    clkvq_tune_params *tuned; /* per layer, from the tuning lookup (lazy) */
    int *host_len;          /* staging for seq_len uploads */
};

static inline int clkvq_cache_stride(int capacity) { return (capacity + 255) / 256 * 256; }

/* First quantized token (see above) for one tensor of a layer. */
int clkvq_cache_q_end(const clkvq_cache_layer *layer, int is_v, int n_tokens);
/* First token an append from n_old to n_new tokens packs: the old q_end,
 * but never a sink (a short sequence's q_end sits inside the sinks). */
int clkvq_cache_pack_from(const clkvq_cache_layer *layer, int is_v, int n_old, int n_new);
static inline int clkvq_cache_n_sink_eff(const clkvq_cache_layer *layer, int n_tokens)
{
    return n_tokens < layer->cfg.n_sink ? n_tokens : layer->cfg.n_sink;
}

/*
 * Reads seq of layer into device buffers as fp32 [n_kv_heads][length]
 * [head_dim] in the model's channel order (dequantized where packed); the
 * scratch prefill and read-back use. Enqueues only (in-order queue).
 */
clkvq_status clkvq_cache_read_device(clkvq_cache *cache, int layer, int seq, cl_mem k_out,
                                     cl_mem v_out);

/* How one tensor (K or V) of a layer is quantized: format, axis (KIVI keys
 * run along tokens), group, clip, parameter storage. The one mapping from
 * a layer config to quantization parameters (cache, reference, eval). */
clkvq_quant_params clkvq_layer_quant_params(const clkvq_layer_config *cfg, int is_v);

#endif

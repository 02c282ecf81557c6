/*
 * The KV cache object's internals, shared by kv_cache.c (state, append,
 * truncate, read), attention.c (fused decode) and prefill.c (CLBlast).
 *
 * Token regions of one tensor (K or V) of a sequence of length n:
 *   sinks      [0, n_sink_eff)           fp16, n_sink_eff = min(n, n_sink)
 *   quantized  [n_sink_eff, q_end)       packed codes + params
 *   recent     [q_end, n)                fp16 (window / residual)
 * q_end by scheme: fp16 -> n_sink_eff (0); token -> n; skvq -> max(n_sink_eff,
 * n - window); kivi K -> floor(n / R) * R; kivi V -> max(0, n - R).
 * For every scheme q_end(V) <= q_end(K): tokens in [q_end(V), q_end(K)) have
 * packed K but fp16 V (KIVI), and the fused kernel handles that.
 *
 * fp16 store per (seq, kv head): `fp_slots` rows of head_dim halves; token
 * t lives in slot t < n_sink ? ring + t : t % ring. A token's slot never
 * changes, so truncation and window moves never copy fp16 rows.
 *
 * Packed store (per-token groups) per (seq, kv head), in 32-bit words; a
 * group takes group_words = ceil(group_bytes / 4) words (ternary pads):
 *   TOKEN_MAJOR   word(t, g, w) = (sh * capacity + t) * row_words + g * group_words + w
 *   GROUP_PLANAR  word(t, g, w) = (sh * row_words + g * group_words + w) * capacity + t
 * with sh = seq * n_kv_heads + head and row_words = n_groups * group_words.
 * `capacity` in these formulas (and in every kernel argument so named) is
 * the token stride clkvq_cache_stride(): the capacity rounded up to 256, so
 * vector loads of up to 16 tokens past the last one stay inside the buffer
 * and KIVI blocks of any group size divide it.
 * Params (one entry per group: 2 halves or 2 fp8 bytes, scale first):
 *   TOKEN_MAJOR   (sh * capacity + t) * n_groups + g
 *   GROUP_PLANAR  (sh * n_groups + g) * capacity + t
 * KIVI keys (per-channel groups of group_size tokens) instead use
 *   word(b, c, w) = ((sh * n_blocks + b) * head_dim + c) * group_words + w
 *   param (sh * n_blocks + b) * head_dim + c,  n_blocks = capacity / group_size.
 * Channels in both stores are in packed (permuted) order.
 */
#ifndef CLKVQ_KV_CACHE_H
#define CLKVQ_KV_CACHE_H

#include "internal.h"

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

/* Build options every cache kernel of this tensor store compiles with. */
void clkvq_cache_store_options(const clkvq_cache *cache, const clkvq_cache_layer *layer,
                               const clkvq_tensor_store *store, char *buf, size_t size);

#endif

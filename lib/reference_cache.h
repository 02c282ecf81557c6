/*
 * Plain-C model of the KV cache's contents (reference for tests): what
 * clkvq_cache_read must return after any sequence of appends/truncations.
 * It keeps, per token, the value the cache holds: the input rounded to
 * fp16 while a token stays in the fp16 store, its dequantized value once
 * packed (quantized from the fp16 value if it passed through the window,
 * from the fp32 input if it left the window within the same append).
 */
#ifndef CLKVQ_REFERENCE_CACHE_H
#define CLKVQ_REFERENCE_CACHE_H

#include "clkvq.h"

typedef struct clkvq_ref_cache clkvq_ref_cache;

/* One layer of one sequence; perms, means and per-head formats as in
 * clkvq_layer_config (copied). */
clkvq_ref_cache *clkvq_ref_cache_create(const clkvq_layer_config *cfg, int n_kv_heads,
                                        int head_dim, int capacity);
void clkvq_ref_cache_free(clkvq_ref_cache *rc);
/* k, v: [n_kv_heads][n_tokens][head_dim] in model order. */
void clkvq_ref_cache_append(clkvq_ref_cache *rc, int n_tokens, const float *k, const float *v);
void clkvq_ref_cache_truncate(clkvq_ref_cache *rc, int n_tokens);
int clkvq_ref_cache_length(const clkvq_ref_cache *rc);
/* dst becomes a copy of src's tokens (a fork); same config and shape. */
void clkvq_ref_cache_copy(clkvq_ref_cache *dst, const clkvq_ref_cache *src);
/* [n_kv_heads][length][head_dim], model order. */
void clkvq_ref_cache_read(const clkvq_ref_cache *rc, float *k, float *v);

#endif

/*
 * Which tuning a cache's layers decode with (clkvq_cache_tuning_source).
 *
 * At creation kv_cache.c keeps the parameters each layer's lookup gave
 * (cache->tuned), not the level of the chain they came from. This module
 * asks the chain again with the layer's shape, built as kv_cache.c builds
 * it, and answers only when that still gives the parameters the layer
 * holds: the level is then the one they came from (or one holding the
 * very same parameters). attention.c's resolve_tuning decides what a
 * layer runs; the two cases it overrides the lookup in are mirrored here.
 */
#include "kv_cache.h"
#include "tuning_db.h"

#include <string.h>

static int same_params(const clkvq_tune_params *a, const clkvq_tune_params *b)
{
    return a->attn.variant == b->attn.variant && a->attn.wgs == b->attn.wgs &&
           a->attn.chunk == b->attn.chunk && a->attn.vw == b->attn.vw &&
           a->layout_k == b->layout_k && a->layout_v == b->layout_v;
}

clkvq_status clkvq_cache_tuning_source(const clkvq_cache *cache, int layer,
                                       clkvq_tuning_source *out)
{
    if (!cache || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_tuning_source: %s is NULL",
                          !cache ? "cache" : "out");
    clkvq_context *ctx = cache->ctx;
    clkvq_clear_error(ctx);
    const clkvq_cache_config *cfg = &cache->cfg;
    if (layer < 0 || layer >= cfg->n_layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_cache_tuning_source: layer %d is not in 0..%d", layer,
                          cfg->n_layers - 1);
    const clkvq_attn_tuning *o = &cache->tuning;
    if (o->variant || o->wgs || o->chunk || o->vw) {
        *out = CLKVQ_TUNED_CALLER;
        return CLKVQ_OK;
    }
    /* resolve_tuning: a layer without tuned parameters, or whose serial
     * variant the cache's layouts cannot run, gets the built-in defaults */
    const clkvq_tune_params *held = &cache->tuned[layer];
    int planar = cfg->layout_k == CLKVQ_LAYOUT_GROUP_PLANAR &&
                 cfg->layout_v == CLKVQ_LAYOUT_GROUP_PLANAR;
    if (!held->attn.variant || (held->attn.variant == CLKVQ_ATTN_SERIAL && !planar)) {
        *out = CLKVQ_TUNED_BUILTIN;
        return CLKVQ_OK;
    }
    const clkvq_layer_config *lc = &cache->layers[layer].cfg;
    clkvq_tune_shape shape = {lc->scheme,      lc->format_k,   lc->format_v,
                              lc->group_size,  cfg->head_dim,  cfg->n_q_heads,
                              cfg->n_kv_heads, cfg->capacity,  cfg->n_seqs};
    clkvq_tune_params now;
    clkvq_tuning_source source;
    clkvq_status st = clkvq_tuning_lookup(ctx, &shape, &now, &source);
    if (st != CLKVQ_OK)
        return st;
    if (!same_params(&now, held))
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "clkvq_cache_tuning_source: layer %d: the tuning results changed since "
                          "the cache was created (the lookup now gives other parameters than the "
                          "layer took); its source cannot be told",
                          layer);
    *out = source;
    return CLKVQ_OK;
}

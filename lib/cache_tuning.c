/*
 * Which tuning a cache's layers decode with (clkvq_cache_tuning_source):
 * the level of the lookup chain each layer's parameters came from at
 * creation (kv_cache.c), unless attention.c's resolve_tuning overrides
 * them: the caller's clkvq_cache_set_tuning, or built-in defaults for a
 * layer with nothing tuned or a serial entry the layouts cannot run.
 */
#include "kv_cache.h"
#include "tuning_db.h"

#include <string.h>

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
    int planar = cfg->layout_k == CLKVQ_LAYOUT_GROUP_PLANAR &&
                 cfg->layout_v == CLKVQ_LAYOUT_GROUP_PLANAR;
    /* a split layer reports its least exact share (the chain's order) */
    *out = CLKVQ_TUNED_EXACT;
    for (int s = cache->first_stored[layer]; s < cache->first_stored[layer + 1]; s++) {
        const clkvq_tune_params *held = &cache->tuned[s];
        clkvq_tuning_source src = cache->tuned_source[s];
        if (!held->attn.variant || (held->attn.variant == CLKVQ_ATTN_SERIAL && !planar))
            src = CLKVQ_TUNED_BUILTIN;
        if (src > *out)
            *out = src;
    }
    return CLKVQ_OK;
}

/*
 * model_cache_check MODEL CAPACITY N_SEQS: opens MODEL's cache in one call
 * (clkvq_cache_create_for_model: its stored or shipped config, its
 * geometry, this device's tuning) and prints where each layer's decode
 * tunables come from. Exit 0 when every layer found an exact tuning entry,
 * 1 when some did not, 2 on an error. Uses the public API only (it links
 * the shared library), as a runtime would.
 */
#include "clkvq.h"
#include "cli_parse.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    int capacity, n_seqs;
    if (argc != 4 || cli_parse_int("model_cache_check", "CAPACITY", argv[2], 1, 1 << 24,
                                   &capacity) ||
        cli_parse_int("model_cache_check", "N_SEQS", argv[3], 1, 1 << 16, &n_seqs)) {
        fprintf(stderr, "usage: model_cache_check MODEL CAPACITY N_SEQS\n");
        return 2;
    }
    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, NULL);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "model_cache_check: %s\n", clkvq_last_error(NULL));
        return 2;
    }
    clkvq_precision_config *cfg = NULL;
    char origin[1024];
    clkvq_cache *cache = NULL;
    st = clkvq_config_for_model(ctx, argv[1], &cfg, origin, sizeof origin);
    if (st == CLKVQ_OK)
        st = clkvq_cache_create_for_model(ctx, argv[1], n_seqs, capacity, CLKVQ_LAYOUT_AUTO,
                                          CLKVQ_LAYOUT_AUTO, &cache);
    int n = clkvq_config_n_layers(cfg), exact = 0;
    for (int l = 0; l < n && st == CLKVQ_OK; l++) {
        clkvq_tuning_source src;
        st = clkvq_cache_tuning_source(cache, l, &src);
        if (st == CLKVQ_OK) {
            printf("layer %d: %s\n", l, clkvq_tuning_source_name(src));
            exact += src == CLKVQ_TUNED_EXACT;
        }
    }
    if (st == CLKVQ_OK)
        printf("config %s\nexact %d/%d\n", origin, exact, n);
    else
        fprintf(stderr, "model_cache_check: %s: %s\n", clkvq_status_string(st),
                clkvq_last_error(ctx));
    clkvq_cache_release(cache);
    clkvq_config_free(cfg);
    clkvq_context_release(ctx);
    return st != CLKVQ_OK ? 2 : exact == n ? 0 : 1;
}

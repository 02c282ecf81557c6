/*
 * The precision config object, shared by its own module
 * (precision_config.c) and the YAML reader and writer
 * (config_yaml_read.c, config_yaml_write.c). Not installed.
 */
#ifndef CLKVQ_PRECISION_CONFIG_H
#define CLKVQ_PRECISION_CONFIG_H

#include "config_fields.h"
#include "internal.h"

#include <stdint.h>

/* The bits of one kv head: the CONFIG_IN_HEAD fields. */
typedef struct {
    clkvq_format k, v;
} head_pair;

typedef struct {
    clkvq_layer_config cfg; /* perm_k ... mean_v: matrix[], the shared one, or NULL */
    void *matrix[CONFIG_MATRIX_SLOTS]; /* the layer's own, [matrix_heads][head_dim], or NULL */
    int n_heads;            /* heads with their own bits; 0 = one pair */
    head_pair *heads;
    clkvq_format *head_formats; /* [2][n_heads]: K then V, what cfg.head_format_k/v show */
    int line;               /* of the layer key (0 when built in memory) */
} config_layer;

struct clkvq_precision_config {
    config_top top;
    int n_layers;
    int matrix_heads, head_dim; /* the shape every perm and mean has (0, 0 if none) */
    /* Top-level perm_k ... mean_v, shared by every layer without its own:
     * one copy, so a file cannot multiply one matrix by its layer count. */
    void *shared_matrix[CONFIG_MATRIX_SLOTS];
    config_layer *layers;
};

/* A head's bits as the layer fields they are, and back. */
static inline void head_to_layer(const head_pair *h, clkvq_layer_config *c)
{
    c->format_k = h->k;
    c->format_v = h->v;
}

static inline head_pair head_from_layer(const clkvq_layer_config *c)
{
    return (head_pair){c->format_k, c->format_v};
}

/* Points l's cfg.head_format_k/v at its heads' formats (NULL without
 * heads) and makes format_k/format_v the widest head's; 0 when out of
 * memory. Called whenever heads are set. */
int config_layer_sync_heads(config_layer *cl);

/* Every scalar field of c in range (CLKVQ_ERR_INVALID_ARG naming layer l,
 * or "defaults" when l < 0); matrices are the caller's to check. */
clkvq_status config_check_layer(clkvq_context *ctx, const clkvq_layer_config *c, int l);

/* 1 when cfg fits a model of geometry g; else 0 and the first mismatch in
 * why (clkvq_config_check_geometry's rules). g->n_layers 0: the config's. */
int config_geometry_fits(const clkvq_precision_config *cfg, const clkvq_model_geometry *g,
                         char *why, size_t why_size);

/* Replaces cfg's model name (a copy); 0 when out of memory. */
int config_set_model(clkvq_precision_config *cfg, const char *model);

#endif

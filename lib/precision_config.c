/*
 * Layer precision configs (KVTuner): the object. Built in memory here or
 * by the YAML reader (config_yaml_read.c), written by the YAML writer
 * (config_yaml_write.c); its fields are the table of config_fields.c.
 * Answers queries and builds a cache from one.
 */
#include "precision_config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ life */

void clkvq_config_free(clkvq_precision_config *cfg)
{
    if (!cfg)
        return;
    for (int l = 0; cfg->layers && l < cfg->n_layers; l++) {
        for (int i = 0; i < CONFIG_MATRIX_SLOTS; i++)
            free(cfg->layers[l].matrix[i]);
        free(cfg->layers[l].heads);
        free(cfg->layers[l].head_formats);
    }
    free(cfg->layers);
    for (int i = 0; i < CONFIG_MATRIX_SLOTS; i++)
        free(cfg->shared_matrix[i]);
    for (int i = 0; i < config_field_count; i++)
        if (!(config_fields[i].scopes & CONFIG_IN_LAYER))
            config_field_release(&config_fields[i],
                                 config_field_value(&config_fields[i], NULL, &cfg->top));
    free(cfg);
}

/* ------------------------------------------------------------ building */

clkvq_status config_check_layer(clkvq_context *ctx, const clkvq_layer_config *c, int l)
{
    char why[256];
    if (config_fields_check(c, why, sizeof why))
        return CLKVQ_OK;
    if (l < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "defaults: %s", why);
    return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d: %s", l, why);
}

int config_layer_sync_heads(config_layer *cl)
{
    free(cl->head_formats);
    cl->head_formats = NULL;
    cl->cfg.head_format_k = cl->cfg.head_format_v = NULL;
    if (!cl->n_heads)
        return 1;
    if (!(cl->head_formats = malloc(2 * (size_t)cl->n_heads * sizeof *cl->head_formats)))
        return 0;
    for (int h = 0; h < cl->n_heads; h++) {
        cl->head_formats[h] = cl->heads[h].k;
        cl->head_formats[cl->n_heads + h] = cl->heads[h].v;
        /* the widest head: the smallest enum */
        if (h == 0 || cl->heads[h].k < cl->cfg.format_k)
            cl->cfg.format_k = cl->heads[h].k;
        if (h == 0 || cl->heads[h].v < cl->cfg.format_v)
            cl->cfg.format_v = cl->heads[h].v;
    }
    cl->cfg.head_format_k = cl->head_formats;
    cl->cfg.head_format_v = cl->head_formats + cl->n_heads;
    return 1;
}

/* The caller's head formats (n_heads of each given array) as out's heads. */
static clkvq_status create_heads(clkvq_context *ctx, const clkvq_layer_config *src, int l,
                                 int n_heads, config_layer *out)
{
    out->cfg.head_format_k = out->cfg.head_format_v = NULL;
    if (!src->head_format_k && !src->head_format_v)
        return CLKVQ_OK;
    if (n_heads <= 0 || n_heads > MAX_HEADS)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: head formats given but n_kv_heads %d is not in 1..%d", l,
                          n_heads, MAX_HEADS);
    if (!(out->heads = malloc((size_t)n_heads * sizeof *out->heads)))
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating heads");
    out->n_heads = n_heads;
    for (int h = 0; h < n_heads; h++) {
        out->heads[h].k = src->head_format_k ? src->head_format_k[h] : src->format_k;
        out->heads[h].v = src->head_format_v ? src->head_format_v[h] : src->format_v;
        for (int i = 0; i < 2; i++) {
            clkvq_format f = i ? out->heads[h].v : out->heads[h].k;
            if ((int)f < 0 || f >= CLKVQ_FMT_COUNT)
                return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d head %d: format_%c %d "
                                  "is unknown", l, h, i ? 'v' : 'k', (int)f);
        }
    }
    return config_layer_sync_heads(out)
               ? CLKVQ_OK
               : clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating head formats");
}

/* src checked, its matrices (perms, means: heads x head_dim 4-byte
 * values) copied; out owns the copies. */
static clkvq_status create_layer(clkvq_context *ctx, const clkvq_layer_config *src, int l,
                                 int n_heads, int head_dim, config_layer *out)
{
    clkvq_status st = config_check_layer(ctx, src, l);
    if (st != CLKVQ_OK)
        return st;
    out->cfg = *src;
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        if (!config_field_is_matrix(f))
            continue;
        void *value = config_field_value(f, &out->cfg, NULL);
        const void *m = config_matrix_get(value);
        if (!m)
            continue;
        char why[256];
        if (!config_matrix_check(f, m, n_heads, head_dim, why, sizeof why))
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d: %s", l, why);
        size_t bytes = sizeof(float) * (size_t)n_heads * (size_t)head_dim;
        if (!(out->matrix[f->slot] = malloc(bytes)))
            return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s", f->name);
        memcpy(out->matrix[f->slot], m, bytes);
        config_matrix_set(value, out->matrix[f->slot]);
    }
    return CLKVQ_OK;
}

/* perms and means, when given, are [n_kv_heads][head_dim] like the cache's. */
clkvq_status clkvq_config_create(clkvq_context *ctx, const char *model, int n_layers,
                                 const clkvq_layer_config *layers, int n_kv_heads, int head_dim,
                                 clkvq_precision_config **out)
{
    clkvq_clear_error(ctx);
    if (!out || !layers || n_layers <= 0 || n_layers > MAX_LAYERS)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_config_create: out/layers NULL or n_layers %d not in 1..%d",
                          n_layers, MAX_LAYERS);
    *out = NULL;
    int has_matrix = 0;
    for (int l = 0; l < n_layers; l++)
        has_matrix |= config_has_matrix(&layers[l]);
    if (has_matrix && (head_dim <= 0 || head_dim > MAX_HEAD_DIM || n_kv_heads <= 0 ||
                       n_kv_heads > MAX_HEADS))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_config_create: perms or means given but head_dim %d not in "
                          "1..%d or n_kv_heads %d not in 1..%d",
                          head_dim, MAX_HEAD_DIM, n_kv_heads, MAX_HEADS);
    clkvq_precision_config *cfg = calloc(1, sizeof *cfg);
    if (!cfg || !(cfg->layers = calloc((size_t)n_layers, sizeof *cfg->layers)) ||
        !(cfg->top.model = strdup(model ? model : ""))) {
        clkvq_config_free(cfg);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a config");
    }
    cfg->n_layers = n_layers;
    cfg->matrix_heads = has_matrix ? n_kv_heads : 0;
    cfg->head_dim = has_matrix ? head_dim : 0;
    clkvq_status st = CLKVQ_OK;
    for (int l = 0; l < n_layers && st == CLKVQ_OK; l++) {
        st = create_layer(ctx, &layers[l], l, has_matrix ? n_kv_heads : 1, head_dim,
                          &cfg->layers[l]);
        if (st == CLKVQ_OK)
            st = create_heads(ctx, &layers[l], l, n_kv_heads, &cfg->layers[l]);
    }
    if (st != CLKVQ_OK) {
        clkvq_config_free(cfg);
        return st;
    }
    *out = cfg;
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ queries */

int clkvq_config_n_layers(const clkvq_precision_config *cfg) { return cfg ? cfg->n_layers : 0; }

const char *clkvq_config_model(const clkvq_precision_config *cfg)
{
    return cfg && cfg->top.model ? cfg->top.model : "";
}

static const config_layer *get_layer(const clkvq_precision_config *cfg, int layer)
{
    return cfg && layer >= 0 && layer < cfg->n_layers ? &cfg->layers[layer] : NULL;
}

clkvq_status clkvq_config_layer(const clkvq_precision_config *cfg, int layer,
                                clkvq_layer_config *out)
{
    const config_layer *cl = get_layer(cfg, layer);
    if (!cl || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_config_layer: NULL argument or layer %d out of range", layer);
    *out = cl->cfg;
    return CLKVQ_OK;
}

int clkvq_config_n_heads(const clkvq_precision_config *cfg, int layer)
{
    const config_layer *cl = get_layer(cfg, layer);
    return cl ? cl->n_heads : 0;
}

clkvq_status clkvq_config_head(const clkvq_precision_config *cfg, int layer, int head,
                               clkvq_format *format_k, clkvq_format *format_v)
{
    const config_layer *cl = get_layer(cfg, layer);
    if (!cl || head < 0 || head >= cl->n_heads)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_config_head: layer %d head %d out of range", layer, head);
    if (format_k)
        *format_k = cl->heads[head].k;
    if (format_v)
        *format_v = cl->heads[head].v;
    return CLKVQ_OK;
}

/* The layer's (k + v) / 2, averaged over its heads when it has some. */
static double layer_bits(const config_layer *cl)
{
    if (!cl->n_heads)
        return (config_format_bits(cl->cfg.format_k) + config_format_bits(cl->cfg.format_v)) / 2.0;
    double sum = 0.0;
    for (int h = 0; h < cl->n_heads; h++)
        sum += config_format_bits(cl->heads[h].k) + config_format_bits(cl->heads[h].v);
    return sum / (2.0 * cl->n_heads);
}

double clkvq_config_average_bits(const clkvq_precision_config *cfg)
{
    if (!cfg || cfg->n_layers <= 0)
        return 0.0;
    double sum = 0.0;
    for (int l = 0; l < cfg->n_layers; l++)
        sum += layer_bits(&cfg->layers[l]);
    return sum / cfg->n_layers;
}

clkvq_status clkvq_config_check_model(clkvq_context *ctx, const clkvq_precision_config *cfg,
                                      int n_layers)
{
    clkvq_clear_error(ctx);
    if (!cfg)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_config_check_model: cfg is NULL");
    if (cfg->n_layers != n_layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "config%s%s has %d layers, the model has %d",
                          cfg->top.model && *cfg->top.model ? " for " : "",
                          cfg->top.model ? cfg->top.model : "",
                          cfg->n_layers, n_layers);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ geometry */

int config_set_model(clkvq_precision_config *cfg, const char *model)
{
    char *copy = strdup(model ? model : "");
    if (!copy)
        return 0;
    free(cfg->top.model);
    cfg->top.model = copy;
    return 1;
}

/* "<a>: the config says x, the model has y" for each differing field. */
static int carried_mismatch(const config_top *t, const clkvq_model_geometry *g, char *why,
                            size_t n)
{
    const struct {
        const char *name;
        int mine, theirs;
    } f[3] = {{"n_q_heads", t->n_q_heads, g->n_q_heads},
              {"n_kv_heads", t->n_kv_heads, g->n_kv_heads},
              {"head_dim", t->head_dim, g->head_dim}};
    size_t used = 0;
    why[0] = '\0';
    for (int i = 0; i < 3; i++)
        if (f[i].mine != f[i].theirs && used < n)
            used += (size_t)snprintf(why + used, n - used, "%s%s: the config says %d, the model has %d",
                                     used ? "; " : "", f[i].name, f[i].mine, f[i].theirs);
    return used == 0;
}

int config_geometry_fits(const clkvq_precision_config *cfg, const clkvq_model_geometry *g,
                         char *why, size_t n)
{
    if (g->n_q_heads <= 0 || g->n_kv_heads <= 0 || g->head_dim <= 0 || g->n_layers < 0 ||
        g->n_q_heads % g->n_kv_heads) {
        snprintf(why, n,
                 "the geometry (n_q_heads %d, n_kv_heads %d, head_dim %d, layers %d) is not a "
                 "model's: positive, and n_q_heads a multiple of n_kv_heads",
                 g->n_q_heads, g->n_kv_heads, g->head_dim, g->n_layers);
        return 0;
    }
    if (g->n_layers && cfg->n_layers != g->n_layers) {
        snprintf(why, n, "the config has %d layers, the model %d", cfg->n_layers, g->n_layers);
        return 0;
    }
    if (cfg->top.head_dim && !carried_mismatch(&cfg->top, g, why, n))
        return 0;
    if (cfg->matrix_heads &&
        (cfg->matrix_heads != g->n_kv_heads || cfg->head_dim != g->head_dim)) {
        snprintf(why, n,
                 "perms and means are %d heads x %d channels, the model has %d kv heads x "
                 "head_dim %d",
                 cfg->matrix_heads, cfg->head_dim, g->n_kv_heads, g->head_dim);
        return 0;
    }
    for (int l = 0; l < cfg->n_layers; l++) {
        const config_layer *cl = &cfg->layers[l];
        if (cl->n_heads && cl->n_heads != g->n_kv_heads) {
            snprintf(why, n, "layer %d has bits for %d kv heads, the model has %d", l,
                     cl->n_heads, g->n_kv_heads);
            return 0;
        }
        /* V is grouped along head_dim in every quantized scheme */
        if (cl->cfg.scheme != CLKVQ_SCHEME_FP16 && g->head_dim % cl->cfg.group_size) {
            snprintf(why, n, "layer %d: group_size %d does not divide the model's head_dim %d", l,
                     cl->cfg.group_size, g->head_dim);
            return 0;
        }
    }
    return 1;
}

int clkvq_config_geometry(const clkvq_precision_config *cfg, clkvq_model_geometry *out)
{
    if (!cfg || !cfg->top.head_dim)
        return 0;
    if (out)
        *out = (clkvq_model_geometry){cfg->n_layers, cfg->top.n_q_heads, cfg->top.n_kv_heads,
                                      cfg->top.head_dim};
    return 1;
}

/* "config for llama-3.1-8b" or "config" */
static void config_name(const clkvq_precision_config *cfg, char *buf, size_t n)
{
    const char *model = clkvq_config_model(cfg);
    snprintf(buf, n, "config%s%.200s", *model ? " for " : "", model);
}

clkvq_status clkvq_config_check_geometry(clkvq_context *ctx, const clkvq_precision_config *cfg,
                                         const clkvq_model_geometry *g)
{
    clkvq_clear_error(ctx);
    if (!cfg || !g)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_config_check_geometry: %s is NULL",
                          !cfg ? "cfg" : "g");
    char why[512], name[256], text[64];
    if (config_geometry_fits(cfg, g, why, sizeof why))
        return CLKVQ_OK;
    config_name(cfg, name, sizeof name);
    clkvq_model_format(g, text, sizeof text);
    return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s does not fit the model (%s): %s", name, text,
                      why);
}

clkvq_status clkvq_config_set_geometry(clkvq_context *ctx, clkvq_precision_config *cfg,
                                       const clkvq_model_geometry *g)
{
    clkvq_status st = clkvq_config_check_geometry(ctx, cfg, g);
    if (st != CLKVQ_OK)
        return st;
    cfg->top.n_q_heads = g->n_q_heads;
    cfg->top.n_kv_heads = g->n_kv_heads;
    cfg->top.head_dim = g->head_dim;
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ the cache */

/* A per-head layer needs a pair for every kv head; perms and means must
 * have the cache's shape. */
static clkvq_status check_layer_fits(clkvq_context *ctx, const clkvq_precision_config *cfg,
                                     int l, int n_kv_heads, int head_dim)
{
    const config_layer *cl = &cfg->layers[l];
    if (cl->n_heads && cl->n_heads != n_kv_heads)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d has bits for %d heads, the cache %d kv heads", l, cl->n_heads,
                          n_kv_heads);
    if (config_has_matrix(&cl->cfg) &&
        (cfg->matrix_heads != n_kv_heads || cfg->head_dim != head_dim))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: perms/means are %d heads x %d channels, the cache %d x %d", l,
                          cfg->matrix_heads, cfg->head_dim, n_kv_heads, head_dim);
    return CLKVQ_OK;
}

clkvq_status clkvq_cache_create_from_config(clkvq_context *ctx,
                                            const clkvq_precision_config *cfg, int n_seqs,
                                            int capacity, int n_kv_heads, int n_q_heads,
                                            int head_dim, clkvq_layout layout_k,
                                            clkvq_layout layout_v, clkvq_cache **out)
{
    clkvq_clear_error(ctx);
    if (!cfg || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_create_from_config: %s is NULL",
                          !cfg ? "cfg" : "out");
    clkvq_model_geometry carried;
    if (clkvq_config_geometry(cfg, &carried)) {
        clkvq_model_geometry asked = {cfg->n_layers, n_q_heads, n_kv_heads, head_dim};
        char why[512], name[256];
        if (!config_geometry_fits(cfg, &asked, why, sizeof why)) {
            config_name(cfg, name, sizeof name);
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "clkvq_cache_create_from_config: %s does not fit the cache: %s",
                              name, why);
        }
    }
    clkvq_layer_config *layers = calloc((size_t)cfg->n_layers, sizeof *layers);
    if (!layers)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating layer configs");
    clkvq_status st = CLKVQ_OK;
    for (int l = 0; l < cfg->n_layers && st == CLKVQ_OK; l++) {
        st = check_layer_fits(ctx, cfg, l, n_kv_heads, head_dim);
        layers[l] = cfg->layers[l].cfg;
    }
    if (st == CLKVQ_OK) {
        clkvq_cache_config cc = {.n_layers = cfg->n_layers, .n_seqs = n_seqs,
                                 .capacity = capacity, .n_kv_heads = n_kv_heads,
                                 .n_q_heads = n_q_heads, .head_dim = head_dim,
                                 .layout_k = layout_k, .layout_v = layout_v, .layers = layers};
        st = clkvq_cache_create(ctx, &cc, out);
    }
    free(layers);
    return st;
}


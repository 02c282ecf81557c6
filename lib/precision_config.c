/*
 * Layer precision configs (KVTuner): the object. Built in memory here or
 * by the YAML reader (config_yaml_read.c), written by the YAML writer
 * (config_yaml_write.c); its fields are the table of config_fields.c.
 * Answers queries and builds a cache from one.
 */
#include "precision_config.h"
#include "reference.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ life */

void clkvq_config_free(clkvq_precision_config *cfg)
{
    if (!cfg)
        return;
    for (int l = 0; cfg->layers && l < cfg->n_layers; l++) {
        for (int i = 0; i < CONFIG_PERM_SLOTS; i++)
            free(cfg->layers[l].perm[i]);
        free(cfg->layers[l].heads);
    }
    free(cfg->layers);
    for (int i = 0; i < CONFIG_PERM_SLOTS; i++)
        free(cfg->shared_perm[i]);
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

/* A copy of perm (perm_heads x head_dim) for one layer. */
static clkvq_status copy_perm(clkvq_context *ctx, const int32_t *perm, int heads, int dim,
                              int32_t **out)
{
    *out = NULL;
    if (!perm)
        return CLKVQ_OK;
    size_t bytes = sizeof *perm * (size_t)heads * (size_t)dim;
    *out = malloc(bytes);
    if (!*out)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a permutation");
    memcpy(*out, perm, bytes);
    return CLKVQ_OK;
}

/* src checked, its perms copied (out owns the copies). */
static clkvq_status create_layer(clkvq_context *ctx, const clkvq_layer_config *src, int l,
                                 int n_heads, int head_dim, config_layer *out)
{
    clkvq_status st = config_check_layer(ctx, src, l);
    if (st != CLKVQ_OK)
        return st;
    out->cfg = *src;
    for (int i = 0; i < config_field_count && st == CLKVQ_OK; i++) {
        const config_field *f = &config_fields[i];
        if (f->kind != CONFIG_KIND_PERM)
            continue;
        const int32_t **perm = config_field_value(f, &out->cfg, NULL);
        if (*perm && !clkvq_ref_is_permutation(*perm, n_heads, head_dim))
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "layer %d: %s is not a permutation of 0..%d per kv head", l,
                              f->name, head_dim - 1);
        st = copy_perm(ctx, *perm, n_heads, head_dim, &out->perm[f->slot]);
        *perm = out->perm[f->slot];
    }
    return st;
}

/* perms, when given, are [n_kv_heads][head_dim] like the cache's. */
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
    int has_perm = 0;
    for (int l = 0; l < n_layers; l++)
        has_perm |= config_has_perm(&layers[l]);
    if (has_perm && (head_dim <= 0 || head_dim > MAX_HEAD_DIM || n_kv_heads <= 0))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_config_create: perms given but head_dim %d not in 1..%d or "
                          "n_kv_heads %d not positive",
                          head_dim, MAX_HEAD_DIM, n_kv_heads);
    clkvq_precision_config *cfg = calloc(1, sizeof *cfg);
    if (!cfg || !(cfg->layers = calloc((size_t)n_layers, sizeof *cfg->layers)) ||
        !(cfg->top.model = strdup(model ? model : ""))) {
        clkvq_config_free(cfg);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a config");
    }
    cfg->n_layers = n_layers;
    cfg->perm_heads = has_perm ? n_kv_heads : 0;
    cfg->head_dim = has_perm ? head_dim : 0;
    clkvq_status st = CLKVQ_OK;
    for (int l = 0; l < n_layers && st == CLKVQ_OK; l++)
        st = create_layer(ctx, &layers[l], l, has_perm ? n_kv_heads : 1, head_dim, &cfg->layers[l]);
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
    if (cfg->perm_heads && (cfg->perm_heads != g->n_kv_heads || cfg->head_dim != g->head_dim)) {
        snprintf(why, n, "perms are %d heads x %d channels, the model has %d kv heads x head_dim %d",
                 cfg->perm_heads, cfg->head_dim, g->n_kv_heads, g->head_dim);
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

/* Per-head bits can run only when a layer's heads all agree (the kernels
 * take one pair per layer); perms must have the cache's shape. */
static clkvq_status check_layer_fits(clkvq_context *ctx, const clkvq_precision_config *cfg,
                                     int l, int n_kv_heads, int head_dim)
{
    const config_layer *cl = &cfg->layers[l];
    if (cl->n_heads && cl->n_heads != n_kv_heads)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d has bits for %d heads, the cache %d kv heads", l, cl->n_heads,
                          n_kv_heads);
    for (int h = 1; h < cl->n_heads; h++)
        if (cl->heads[h].k != cl->heads[0].k || cl->heads[h].v != cl->heads[0].v)
            return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                              "layer %d: head %d is K%sV%s, head 0 K%sV%s; the kernels take one "
                              "bit pair per layer (per-head bits are not supported)",
                              l, h, clkvq_format_get(cl->heads[h].k)->bits_name,
                              clkvq_format_get(cl->heads[h].v)->bits_name,
                              clkvq_format_get(cl->heads[0].k)->bits_name,
                              clkvq_format_get(cl->heads[0].v)->bits_name);
    if (config_has_perm(&cl->cfg) &&
        (cfg->perm_heads != n_kv_heads || cfg->head_dim != head_dim))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "layer %d: perms are %d heads x %d channels, the cache %d x %d", l,
                          cfg->perm_heads, cfg->head_dim, n_kv_heads, head_dim);
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


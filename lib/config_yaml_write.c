/*
 * The YAML writer of precision configs: a clkvq_precision_config -> a file
 * (libyaml's emitter, then an atomic write). Every field of every layer is
 * written, in the field table's order, so the file stands alone (no
 * defaults needed) and load(save(c)) == c.
 */
#include "precision_config.h"
#include "program_cache.h"

#include <yaml.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *data;
    size_t size, cap;
} out_buf;

static int buf_write(void *data, unsigned char *bytes, size_t size)
{
    out_buf *b = data;
    if (b->size + size > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->size + size)
            cap *= 2;
        char *bigger = realloc(b->data, cap);
        if (!bigger)
            return 0;
        b->data = bigger;
        b->cap = cap;
    }
    memcpy(b->data + b->size, bytes, size);
    b->size += size;
    return 1;
}

/* Emits one event; 0 (and the emitter's error) when it fails. */
static int emit(yaml_emitter_t *em, yaml_event_t *ev) { return yaml_emitter_emit(em, ev); }

static int emit_scalar(yaml_emitter_t *em, const char *text, yaml_scalar_style_t style)
{
    yaml_event_t ev;
    return yaml_scalar_event_initialize(&ev, NULL, NULL, (yaml_char_t *)text, (int)strlen(text),
                                        1, 1, style) &&
           emit(em, &ev);
}

static int emit_mapping_start(yaml_emitter_t *em, yaml_mapping_style_t style)
{
    yaml_event_t ev;
    return yaml_mapping_start_event_initialize(&ev, NULL, NULL, 1, style) && emit(em, &ev);
}

static int emit_mapping_end(yaml_emitter_t *em)
{
    yaml_event_t ev;
    return yaml_mapping_end_event_initialize(&ev) && emit(em, &ev);
}

static int emit_sequence(yaml_emitter_t *em, int start, yaml_sequence_style_t style)
{
    yaml_event_t ev;
    return (start ? yaml_sequence_start_event_initialize(&ev, NULL, NULL, 1, style)
                  : yaml_sequence_end_event_initialize(&ev)) &&
           emit(em, &ev);
}

/* One scalar field of `layer` / `top`: its name and its value. */
static int emit_field(yaml_emitter_t *em, const config_field *f, const clkvq_layer_config *layer,
                      const config_top *top)
{
    const void *value = config_field_cvalue(f, layer, top);
    char small[64], *text = small;
    int n = config_field_format(f, value, small, sizeof small);
    if (n < 0)
        return 0;
    if ((size_t)n >= sizeof small) { /* free text (a long model name) */
        text = malloc((size_t)n + 1);
        if (!text)
            return 0;
        config_field_format(f, value, text, (size_t)n + 1);
    }
    int ok = emit_scalar(em, f->name, YAML_PLAIN_SCALAR_STYLE) &&
             emit_scalar(em, text,
                         config_field_is_text(f) ? YAML_ANY_SCALAR_STYLE : YAML_PLAIN_SCALAR_STYLE);
    if (text != small)
        free(text);
    return ok;
}

/* A matrix (perm, mean): a block sequence of flow rows, one row per kv head. */
static int emit_matrix(yaml_emitter_t *em, const config_field *f, const void *m, int heads,
                       int dim)
{
    if (!emit_scalar(em, f->name, YAML_PLAIN_SCALAR_STYLE) ||
        !emit_sequence(em, 1, YAML_BLOCK_SEQUENCE_STYLE))
        return 0;
    for (int h = 0; h < heads; h++) {
        if (!emit_sequence(em, 1, YAML_FLOW_SEQUENCE_STYLE))
            return 0;
        for (int c = 0; c < dim; c++) {
            char text[32];
            config_matrix_format(f, m, (size_t)h * dim + c, text, sizeof text);
            if (!emit_scalar(em, text, YAML_PLAIN_SCALAR_STYLE))
                return 0;
        }
        if (!emit_sequence(em, 0, 0))
            return 0;
    }
    return emit_sequence(em, 0, 0);
}

/* Each head: a mapping of the head fields. */
static int emit_heads(yaml_emitter_t *em, const config_layer *cl)
{
    for (int h = 0; h < cl->n_heads; h++) {
        clkvq_layer_config c = cl->cfg;
        head_to_layer(&cl->heads[h], &c);
        char key[16];
        snprintf(key, sizeof key, "%d", h);
        if (!emit_scalar(em, key, YAML_PLAIN_SCALAR_STYLE) ||
            !emit_mapping_start(em, YAML_BLOCK_MAPPING_STYLE))
            return 0;
        for (int f = 0; f < config_field_count; f++)
            if ((config_fields[f].scopes & CONFIG_IN_HEAD) &&
                !emit_field(em, &config_fields[f], &c, NULL))
                return 0;
        if (!emit_mapping_end(em))
            return 0;
    }
    return 1;
}

/* A top-level matrix that every layer uses is written once, at the top, as
 * it was read. */
static int shared_by_all(const clkvq_precision_config *cfg, const config_field *f)
{
    const void *shared = cfg->shared_matrix[f->slot];
    if (!shared)
        return 0;
    for (int l = 0; l < cfg->n_layers; l++)
        if (config_matrix_get(config_field_cvalue(f, &cfg->layers[l].cfg, NULL)) != shared)
            return 0;
    return 1;
}

static int emit_layer(yaml_emitter_t *em, const clkvq_precision_config *cfg, int l)
{
    const config_layer *cl = &cfg->layers[l];
    char key[16];
    snprintf(key, sizeof key, "%d", l);
    if (!emit_scalar(em, key, YAML_PLAIN_SCALAR_STYLE) ||
        !emit_mapping_start(em, YAML_BLOCK_MAPPING_STYLE))
        return 0;
    int heads_done = 0;
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        int ok = 1;
        if (!(f->scopes & CONFIG_IN_LAYER))
            continue;
        if ((f->scopes & CONFIG_IN_HEAD) && cl->n_heads) { /* the heads in place of these */
            ok = heads_done++ || emit_heads(em, cl);
        } else if (config_field_is_matrix(f)) {
            const void *m = config_matrix_get(config_field_cvalue(f, &cl->cfg, NULL));
            ok = !m || shared_by_all(cfg, f) ||
                 emit_matrix(em, f, m, cfg->matrix_heads, cfg->head_dim);
        } else {
            ok = emit_field(em, f, &cl->cfg, NULL);
        }
        if (!ok)
            return 0;
    }
    return emit_mapping_end(em);
}

static int emit_config(yaml_emitter_t *em, const clkvq_precision_config *cfg)
{
    yaml_event_t ev;
    if (!yaml_stream_start_event_initialize(&ev, YAML_UTF8_ENCODING) || !emit(em, &ev) ||
        !yaml_document_start_event_initialize(&ev, NULL, NULL, NULL, 1) || !emit(em, &ev) ||
        !emit_mapping_start(em, YAML_BLOCK_MAPPING_STYLE))
        return 0;
    for (int i = 0; i < config_field_count; i++) { /* top-level fields, shared matrices */
        const config_field *f = &config_fields[i];
        int ok = 1;
        if (!(f->scopes & CONFIG_IN_LAYER)) {
            if (config_field_present(f, config_field_cvalue(f, NULL, &cfg->top)))
                ok = emit_field(em, f, NULL, &cfg->top);
        } else if (config_field_is_matrix(f) && shared_by_all(cfg, f)) {
            ok = emit_matrix(em, f, cfg->shared_matrix[f->slot], cfg->matrix_heads,
                             cfg->head_dim);
        }
        if (!ok)
            return 0;
    }
    for (int l = 0; l < cfg->n_layers; l++)
        if (!emit_layer(em, cfg, l))
            return 0;
    return emit_mapping_end(em) && yaml_document_end_event_initialize(&ev, 1) &&
           emit(em, &ev) && yaml_stream_end_event_initialize(&ev) && emit(em, &ev) &&
           yaml_emitter_flush(em);
}

clkvq_status clkvq_config_save(clkvq_context *ctx, const clkvq_precision_config *cfg,
                               const char *path)
{
    clkvq_clear_error(ctx);
    if (!cfg || !path)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_config_save: %s is NULL",
                          !cfg ? "cfg" : "path");
    yaml_emitter_t em;
    if (!yaml_emitter_initialize(&em))
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "initializing the libyaml emitter");
    out_buf buf = {0};
    yaml_emitter_set_output(&em, buf_write, &buf);
    yaml_emitter_set_unicode(&em, 1);
    yaml_emitter_set_width(&em, -1); /* a perm or mean row stays on one line */
    config_c_numeric loc;
    config_c_numeric_enter(&loc);
    int ok = emit_config(&em, cfg);
    config_c_numeric_leave(&loc);
    clkvq_status st =
        ok ? clkvq_atomic_write(ctx, path, buf.data, buf.size)
           : clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: cannot write the config as YAML: %s",
                        path,
                        em.problem ? em.problem
                                   : "invalid UTF-8 in the model name, or out of memory");
    yaml_emitter_delete(&em);
    free(buf.data);
    return st;
}

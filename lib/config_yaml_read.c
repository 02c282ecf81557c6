/*
 * The YAML reader of precision configs (KVTuner files and ours): libyaml's
 * document API -> a clkvq_precision_config. Which fields exist, what they
 * hold and how their text reads is the field table's (config_fields.c);
 * this file knows the file's shape.
 *
 * The file is a YAML mapping. Integer keys are layers (0..L-1, no gaps, no
 * duplicates); each layer is a mapping of layer fields and, in a per-head
 * file, of integer head keys -> the head fields. String keys at the top are
 * top-level fields (`model`) or any layer field, a default for all layers.
 *
 * One value of a layer comes from, weakest first: the caller's defaults
 * (token-scheme defaults when NULL), the scheme's own defaults when the file
 * picks another scheme than the caller's (so `scheme: kivi` brings a kivi
 * residual rather than the token scheme's 0), the top-level fields, the
 * layer's fields. Bits never come from the caller: a precision config is
 * its bits, and a layer that gives none is a malformed file, not a q4 layer.
 *
 * Every malformed input ends in one clkvq_fail naming the file, the line
 * (libyaml's marks, 1-based) and the field; nothing half-built escapes.
 * The walk follows the schema (fixed depth) and refuses to visit a node
 * twice, so YAML aliases cannot multiply the work ("billion laughs").
 */
#include "precision_config.h"
#include "reference.h"

#include <yaml.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ the parser */

typedef struct {
    clkvq_context *ctx;
    const char *name; /* the file, or "<memory>" */
    yaml_document_t doc;
    unsigned char *visited; /* per node: walked already (an alias) */
    size_t n_nodes;
    clkvq_precision_config *cfg;
} parser;

static size_t node_line(const yaml_node_t *node) { return node->start_mark.line + 1; }

/* The one error path of the parser: "<file>:<line>: <where>: <what>". */
__attribute__((format(printf, 3, 4))) static clkvq_status perr(parser *p, size_t line,
                                                              const char *fmt, ...)
{
    char what[CLKVQ_MSG_MAX / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return clkvq_fail(p->ctx, CLKVQ_ERR_CORRUPT, "%s:%zu: %s", p->name, line, what);
}

static const char *kind_name(const yaml_node_t *node)
{
    switch (node->type) {
    case YAML_SCALAR_NODE: return "a scalar";
    case YAML_SEQUENCE_NODE: return "a sequence";
    case YAML_MAPPING_NODE: return "a mapping";
    default: return "nothing";
    }
}

/* Node `index`, refusing one already walked: only an alias can reach a
 * node twice, and expanding aliases is how small files become huge. */
static clkvq_status get_node(parser *p, int index, size_t from_line, yaml_node_t **out)
{
    yaml_node_t *node = yaml_document_get_node(&p->doc, index);
    if (!node)
        return perr(p, from_line, "dangling node reference");
    size_t i = (size_t)(index - 1);
    if (p->visited[i])
        return perr(p, from_line,
                    "the node of line %zu is used twice (a YAML alias); aliases are not "
                    "supported in configs",
                    node_line(node));
    p->visited[i] = 1;
    *out = node;
    return CLKVQ_OK;
}

/* A scalar's text, refusing other kinds and embedded NULs. */
static clkvq_status scalar_text(parser *p, const yaml_node_t *node, const char *where,
                                const char *expect, const char **out)
{
    if (node->type != YAML_SCALAR_NODE)
        return perr(p, node_line(node), "%s: expected %s, got %s", where, expect,
                    kind_name(node));
    const char *text = (const char *)node->data.scalar.value;
    if (strlen(text) != node->data.scalar.length)
        return perr(p, node_line(node), "%s: contains a NUL byte", where);
    *out = text;
    return CLKVQ_OK;
}

/* Keys that start like a number name layers (or heads); others name fields.
 * Quoted keys ('0') are strings in YAML, so they are field names. */
static int is_index_key(const yaml_node_t *key)
{
    if (key->type != YAML_SCALAR_NODE || key->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return 0;
    const char *t = (const char *)key->data.scalar.value;
    return (t[0] >= '0' && t[0] <= '9') || t[0] == '-' || t[0] == '+';
}

/* ------------------------------------------------------------ fields */

/* The fields one mapping (the top level, a layer or a head) gave. */
typedef struct {
    unsigned set;                 /* bit f: config_fields[f] was given */
    int line[CONFIG_FIELD_MAX];   /* where */
    clkvq_layer_config layer;     /* the values given of layer fields */
    config_top top;               /* of top-level fields */
} field_set;

static void field_set_free(field_set *fs)
{
    for (int f = 0; f < config_field_count; f++)
        config_field_release(&config_fields[f],
                             config_field_value(&config_fields[f], &fs->layer, &fs->top));
    memset(fs, 0, sizeof *fs);
}

static int field_given(const field_set *fs, const config_field *f)
{
    return fs->set >> (f - config_fields) & 1u;
}

/* The matrix of field f (a PERM or MEAN), handed over by fs. */
static void *take_matrix(field_set *fs, const config_field *f)
{
    void *value = config_field_value(f, &fs->layer, &fs->top);
    void *m = (void *)config_matrix_get(value);
    config_matrix_set(value, NULL);
    return m;
}

/* ---- matrices (perm_k, perm_v, mean_k, mean_v) */

/* The row node of head h: a sequence of *dim items (any length for head 0,
 * which then sets *dim). */
static clkvq_status matrix_row_node(parser *p, const yaml_node_t *node, const char *where, int h,
                                    long *dim, yaml_node_t **out)
{
    clkvq_status st = get_node(p, node->data.sequence.items.start[h], node_line(node), out);
    if (st != CLKVQ_OK)
        return st;
    yaml_node_t *row = *out;
    if (row->type != YAML_SEQUENCE_NODE)
        return perr(p, node_line(row), "%s: head %d: expected a sequence of channel values, got %s",
                    where, h, kind_name(row));
    long n = row->data.sequence.items.top - row->data.sequence.items.start;
    if (h == 0)
        *dim = n;
    else if (n != *dim)
        return perr(p, node_line(row), "%s: head %d has %ld channels, head 0 has %ld", where, h,
                    n, *dim);
    return CLKVQ_OK;
}

/* One row of a matrix: dim values of f's kind. */
static clkvq_status parse_matrix_row(parser *p, const config_field *f, const yaml_node_t *row,
                                     const char *where, int head, int dim, void *matrix)
{
    yaml_node_item_t *items = row->data.sequence.items.start;
    for (int c = 0; c < dim; c++) {
        yaml_node_t *item = NULL;
        clkvq_status st = get_node(p, items[c], node_line(row), &item);
        if (st != CLKVQ_OK)
            return st;
        char what[192];
        snprintf(what, sizeof what, "%s head %d channel %d", where, head, c);
        const char *text = NULL;
        st = scalar_text(p, item, what, f->kind == CONFIG_KIND_PERM ? "an integer" : "a number",
                         &text);
        if (st != CLKVQ_OK)
            return st;
        char why[128];
        if (!config_matrix_parse(f, text, dim, matrix, (size_t)head * dim + c, why, sizeof why))
            return perr(p, node_line(item), "%s: %s", what, why);
    }
    return CLKVQ_OK;
}

/* The shape of a matrix node: every row checked before anything is
 * allocated, so the allocation is paid for by items really in the file. */
static clkvq_status matrix_shape(parser *p, const yaml_node_t *node, const char *where,
                                 yaml_node_t **rows, long *dim)
{
    long heads = node->data.sequence.items.top - node->data.sequence.items.start;
    *dim = 0;
    for (int h = 0; h < heads; h++) {
        clkvq_status st = matrix_row_node(p, node, where, h, dim, &rows[h]);
        if (st != CLKVQ_OK)
            return st;
    }
    if (*dim < 1 || *dim > MAX_HEAD_DIM)
        return perr(p, node_line(node), "%s: %ld channels per head, expected 1..%d", where, *dim,
                    MAX_HEAD_DIM);
    clkvq_precision_config *cfg = p->cfg;
    if (cfg->head_dim && (cfg->matrix_heads != heads || cfg->head_dim != *dim))
        return perr(p, node_line(node),
                    "%s: %ld heads x %ld channels, earlier perms/means are %d x %d", where, heads,
                    *dim, cfg->matrix_heads, cfg->head_dim);
    return CLKVQ_OK;
}

/* perm_k / perm_v / mean_k / mean_v: one sequence of head_dim values per
 * kv head (a permutation each, or finite means), and the same shape as
 * every other matrix of the file. */
static clkvq_status parse_matrix_value(parser *p, const config_field *f, const yaml_node_t *node,
                                       const char *where, void **out)
{
    if (node->type != YAML_SEQUENCE_NODE)
        return perr(p, node_line(node), "%s: expected %s, got %s", where, config_field_expect(f),
                    kind_name(node));
    long heads = node->data.sequence.items.top - node->data.sequence.items.start;
    if (heads < 1 || heads > MAX_HEADS)
        return perr(p, node_line(node), "%s: %ld kv heads, expected 1..%d", where, heads,
                    MAX_HEADS);
    yaml_node_t **rows = calloc((size_t)heads, sizeof *rows);
    if (!rows)
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s", where);
    long dim;
    clkvq_status st = matrix_shape(p, node, where, rows, &dim);
    void *m = NULL;
    if (st == CLKVQ_OK && !(m = malloc(sizeof(float) * (size_t)heads * (size_t)dim)))
        st = clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s", where);
    for (int h = 0; h < heads && st == CLKVQ_OK; h++)
        st = parse_matrix_row(p, f, rows[h], where, h, (int)dim, m);
    free(rows);
    if (st == CLKVQ_OK && f->kind == CONFIG_KIND_PERM &&
        !clkvq_ref_is_permutation(m, (int)heads, (int)dim))
        st = perr(p, node_line(node),
                  "%s: not a permutation of 0..%ld in every head (a channel repeats)", where,
                  dim - 1);
    if (st != CLKVQ_OK) {
        free(m);
        return st;
    }
    p->cfg->matrix_heads = (int)heads;
    p->cfg->head_dim = (int)dim;
    *out = m;
    return CLKVQ_OK;
}

/* ---- one field */

/* Field f's value (node `value`, under `key`) into fs. */
static clkvq_status parse_field(parser *p, field_set *fs, const config_field *f,
                                const yaml_node_t *key, const yaml_node_t *value,
                                const char *scope)
{
    char where[128];
    snprintf(where, sizeof where, "%s: %s", scope, f->name);
    int i = (int)(f - config_fields);
    if (field_given(fs, f))
        return perr(p, node_line(key), "%s: duplicate field (first at line %d)", where,
                    fs->line[i]);
    fs->set |= 1u << i;
    fs->line[i] = (int)node_line(key);
    void *dst = config_field_value(f, &fs->layer, &fs->top);
    if (config_field_is_matrix(f)) {
        void *m = NULL;
        clkvq_status st = parse_matrix_value(p, f, value, where, &m);
        config_matrix_set(dst, m);
        return st;
    }
    const char *text = NULL;
    clkvq_status st = scalar_text(p, value, where, config_field_expect(f), &text);
    if (st != CLKVQ_OK)
        return st;
    char why[CLKVQ_MSG_MAX / 4];
    switch (config_field_parse(f, text, dst, why, sizeof why)) {
    case CONFIG_VALUE_OK: return CLKVQ_OK;
    case CONFIG_VALUE_NOMEM:
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s", where);
    default: return perr(p, node_line(value), "%s: %s", where, why);
    }
}

/* The fields of a mapping into fs: those valid in `scope` (CONFIG_IN_*);
 * index keys are the layers or heads below, walked by their own code
 * (a head has none). */
static clkvq_status parse_fields(parser *p, const yaml_node_t *map, const char *where,
                                 unsigned scope, field_set *fs)
{
    clkvq_status st = CLKVQ_OK;
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start;
         q < map->data.mapping.pairs.top && st == CLKVQ_OK; q++) {
        yaml_node_t *key = yaml_document_get_node(&p->doc, q->key), *value = NULL;
        if (scope != CONFIG_IN_HEAD && key && is_index_key(key))
            continue;
        const char *name = NULL;
        st = get_node(p, q->key, node_line(map), &key);
        if (st == CLKVQ_OK)
            st = scalar_text(p, key, where, "a field name", &name);
        if (st != CLKVQ_OK)
            break;
        const config_field *f = config_field_find(name);
        if (!f || !(f->scopes & scope)) {
            char valid[512];
            config_field_names(scope, CONFIG_KIND_COUNT, ", ", valid, sizeof valid);
            if (scope == CONFIG_IN_HEAD)
                return perr(p, node_line(key), "%s: unknown field '%s'; a head takes only %s",
                            where, name, valid);
            return perr(p, node_line(key),
                        "%s: unknown field '%s'; valid fields: %s, and integer %s keys", where,
                        name, valid, scope == CONFIG_IN_TOP ? "layer" : "head");
        }
        st = get_node(p, q->value, node_line(key), &value);
        if (st == CLKVQ_OK)
            st = parse_field(p, fs, f, key, value, where);
    }
    return st;
}

/* The head fields missing from fs: "<where>: <field> missing". */
static clkvq_status check_head_fields(parser *p, const field_set *fs, unsigned also_given,
                                      size_t line, const char *where)
{
    for (int f = 0; f < config_field_count; f++)
        if ((config_fields[f].scopes & CONFIG_IN_HEAD) && !((fs->set | also_given) >> f & 1u))
            return perr(p, line, "%s: %s missing", where, config_fields[f].name);
    return CLKVQ_OK;
}

/* ---- integer-keyed mappings (layers, heads) */

/* An index key: a non-negative decimal integer below `limit`. */
static clkvq_status parse_index_key(parser *p, const yaml_node_t *key, const char *what,
                                    long limit, long *out)
{
    const char *text = NULL;
    clkvq_status st = scalar_text(p, key, what, "an index", &text);
    if (st != CLKVQ_OK)
        return st;
    if (!config_parse_long(text, 0, limit - 1, out))
        return perr(p, node_line(key), "%s key '%s' is not an integer in 0..%ld", what, text,
                    limit - 1);
    return CLKVQ_OK;
}

/* Checks index keys: slot[i] = the pair index of key i; keys must be
 * 0..n-1, each once. keys[] are the pairs with index keys, in file order. */
static clkvq_status check_index_keys(parser *p, const char *what, yaml_node_pair_t *const *keys,
                                     int n, int *slot)
{
    int *line = calloc((size_t)n, sizeof *line);
    if (!line)
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s keys", what);
    clkvq_status st = CLKVQ_OK;
    long far = -1, far_line = 0; /* a key >= n: some index below n is missing */
    for (int j = 0; j < n && st == CLKVQ_OK; j++) {
        yaml_node_t *key = NULL;
        long k = 0;
        st = get_node(p, keys[j]->key, 0, &key);
        if (st == CLKVQ_OK)
            st = parse_index_key(p, key, what, MAX_INDEX_KEY + 1, &k);
        if (st != CLKVQ_OK)
            break;
        if (k >= n) {
            if (far < 0) {
                far = k;
                far_line = (long)node_line(key);
            }
            continue;
        }
        if (line[k])
            st = perr(p, node_line(key), "duplicate %s key %ld (first at line %d)", what, k,
                      line[k]);
        line[k] = (int)node_line(key);
        slot[k] = j;
    }
    for (int k = 0; k < n && st == CLKVQ_OK; k++)
        if (!line[k])
            st = far >= 0 ? perr(p, (size_t)far_line,
                                 "%s %d is missing: %s keys must be 0..%d with no gaps, found %ld",
                                 what, k, what, n - 1, far)
                          : perr(p, 1, "%s %d is missing", what, k); /* unreachable: n keys < n */
    free(line);
    return st;
}

/* Pointers to the pairs of `map` whose keys are index keys, in file order. */
static clkvq_status collect_index_pairs(parser *p, const yaml_node_t *map, yaml_node_pair_t ***out,
                                        int *n_out)
{
    yaml_node_pair_t *start = map->data.mapping.pairs.start, *top = map->data.mapping.pairs.top;
    int n = 0;
    for (yaml_node_pair_t *q = start; q < top; q++) {
        const yaml_node_t *key = yaml_document_get_node(&p->doc, q->key);
        n += key && is_index_key(key);
    }
    *out = NULL;
    *n_out = n;
    if (!n)
        return CLKVQ_OK;
    *out = malloc(sizeof **out * (size_t)n);
    if (!*out)
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating mapping keys");
    n = 0;
    for (yaml_node_pair_t *q = start; q < top; q++) {
        const yaml_node_t *key = yaml_document_get_node(&p->doc, q->key);
        if (key && is_index_key(key))
            (*out)[n++] = q;
    }
    return CLKVQ_OK;
}

/* ---- heads */

/* One head: every head field, nothing else. */
static clkvq_status parse_head(parser *p, const yaml_node_pair_t *pair, int layer, int head,
                               head_pair *out)
{
    yaml_node_t *map = NULL;
    clkvq_status st = get_node(p, pair->value, 0, &map);
    if (st != CLKVQ_OK)
        return st;
    char where[64];
    snprintf(where, sizeof where, "layer %d head %d", layer, head);
    if (map->type != YAML_MAPPING_NODE) {
        char fields[128];
        config_field_names(CONFIG_IN_HEAD, CONFIG_KIND_COUNT, ", ", fields, sizeof fields);
        return perr(p, node_line(map), "%s: expected a mapping of %s, got %s", where, fields,
                    kind_name(map));
    }
    field_set fs = {0};
    st = parse_fields(p, map, where, CONFIG_IN_HEAD, &fs);
    if (st == CLKVQ_OK)
        st = check_head_fields(p, &fs, 0, node_line(map), where);
    *out = head_from_layer(&fs.layer);
    field_set_free(&fs);
    return st;
}

static clkvq_status parse_heads(parser *p, const yaml_node_t *map, yaml_node_pair_t *const *pairs,
                                int n, int layer, config_layer *out)
{
    if (n > MAX_HEADS)
        return perr(p, node_line(map), "layer %d: %d heads, at most %d", layer, n, MAX_HEADS);
    int *slot = calloc((size_t)n, sizeof *slot);
    out->heads = calloc((size_t)n, sizeof *out->heads);
    if (!slot || !out->heads) {
        free(slot);
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating heads");
    }
    out->n_heads = n;
    char what[32];
    snprintf(what, sizeof what, "layer %d head", layer);
    clkvq_status st = check_index_keys(p, what, pairs, n, slot);
    for (int h = 0; h < n && st == CLKVQ_OK; h++)
        st = parse_head(p, pairs[slot[h]], layer, h, &out->heads[h]);
    free(slot);
    return st;
}

/* ---- layers */

/* Combines defaults, top-level fields and the layer's own (see the top of
 * the file) into out->cfg; out takes own's matrices over. */
static clkvq_status compose_layer(parser *p, const clkvq_layer_config *base,
                                  const field_set *top, field_set *own, int l,
                                  config_layer *out)
{
    clkvq_layer_config c = *base;
    config_fields_apply(&c, &top->layer, top->set);
    config_fields_plus_layer(&c, l, own->set);
    config_fields_apply(&c, &own->layer, own->set);
    config_fields_scheme_defaults(&c, base->scheme, top->set | own->set);
    char where[32];
    snprintf(where, sizeof where, "layer %d", l);
    if (!out->n_heads) {
        clkvq_status st = check_head_fields(p, own, top->set, (size_t)out->line, where);
        if (st != CLKVQ_OK)
            return st;
    }
    for (int f = 0; f < config_field_count && out->n_heads; f++)
        if ((config_fields[f].scopes & CONFIG_IN_HEAD) && (own->set >> f & 1u))
            return perr(p, (size_t)own->line[f],
                        "layer %d: bits given for the layer and per head; give one", l);
    for (int i = 0; i < config_field_count; i++) { /* own matrices, else the shared ones */
        const config_field *f = &config_fields[i];
        if (!config_field_is_matrix(f))
            continue;
        out->matrix[f->slot] = take_matrix(own, f);
        config_matrix_set(config_field_value(f, &c, NULL), out->matrix[f->slot]
                                                              ? out->matrix[f->slot]
                                                              : p->cfg->shared_matrix[f->slot]);
    }
    out->cfg = c;
    if (!config_layer_sync_heads(out))
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating head formats");
    c = out->cfg;
    char why[256];
    if (!config_layer_rules(&c, why, sizeof why))
        return perr(p, (size_t)out->line, "layer %d: %s", l, why);
    return CLKVQ_OK;
}

static clkvq_status parse_layer(parser *p, const yaml_node_pair_t *pair, int l,
                                const clkvq_layer_config *base, const field_set *top)
{
    config_layer *out = &p->cfg->layers[l];
    out->line = (int)node_line(yaml_document_get_node(&p->doc, pair->key));
    yaml_node_t *map = NULL;
    clkvq_status st = get_node(p, pair->value, (size_t)out->line, &map);
    if (st != CLKVQ_OK)
        return st;
    if (map->type != YAML_MAPPING_NODE) {
        char fields[128];
        config_field_names(CONFIG_IN_HEAD, CONFIG_KIND_COUNT, ", ", fields, sizeof fields);
        return perr(p, node_line(map), "layer %d: expected a mapping (%s, ...), got %s", l,
                    fields, kind_name(map));
    }
    char where[32];
    snprintf(where, sizeof where, "layer %d", l);
    yaml_node_pair_t **heads = NULL;
    int n_heads = 0;
    field_set own = {0};
    st = collect_index_pairs(p, map, &heads, &n_heads);
    if (st == CLKVQ_OK && n_heads)
        st = parse_heads(p, map, heads, n_heads, l, out);
    if (st == CLKVQ_OK)
        st = parse_fields(p, map, where, CONFIG_IN_LAYER, &own);
    if (st == CLKVQ_OK)
        st = compose_layer(p, base, top, &own, l, out);
    field_set_free(&own);
    free(heads);
    return st;
}

/* ---- the geometry */

/* The top-level geometry fields, all three or none, and the layers that
 * must fit them (per-head counts, perms, group sizes). */
static clkvq_status check_geometry(parser *p, const field_set *top)
{
    static const char *const names[3] = {"n_q_heads", "n_kv_heads", "head_dim"};
    int given = 0, line = 0;
    const char *missing = NULL;
    for (int i = 0; i < 3; i++) {
        const config_field *f = config_field_find(names[i]);
        if (field_given(top, f)) {
            given++;
            if (!line || top->line[f - config_fields] < line)
                line = top->line[f - config_fields];
        } else if (!missing) {
            missing = names[i];
        }
    }
    if (!given)
        return CLKVQ_OK;
    if (missing)
        return perr(p, (size_t)line,
                    "top level: %s missing: the model's geometry is n_q_heads, n_kv_heads and "
                    "head_dim together",
                    missing);
    const config_top *t = &p->cfg->top;
    clkvq_model_geometry g = {p->cfg->n_layers, t->n_q_heads, t->n_kv_heads, t->head_dim};
    char why[512];
    if (t->n_q_heads % t->n_kv_heads)
        return perr(p, (size_t)line, "top level: n_q_heads %d is not a multiple of n_kv_heads %d",
                    t->n_q_heads, t->n_kv_heads);
    if (!config_geometry_fits(p->cfg, &g, why, sizeof why))
        return perr(p, (size_t)line, "the layers do not fit the file's geometry: %s", why);
    return CLKVQ_OK;
}

/* ---- the document */

static clkvq_status parse_layers(parser *p, const yaml_node_t *root,
                                 const clkvq_layer_config *base, const field_set *top)
{
    yaml_node_pair_t **pairs = NULL;
    int n = 0;
    clkvq_status st = collect_index_pairs(p, root, &pairs, &n);
    if (st != CLKVQ_OK)
        return st;
    int *slot = NULL;
    if (n == 0)
        st = perr(p, node_line(root), "no layers: expected integer layer keys 0, 1, ...");
    else if (n > MAX_LAYERS)
        st = perr(p, node_line(root), "%d layers, at most %d", n, MAX_LAYERS);
    else if (!(slot = calloc((size_t)n, sizeof *slot)) ||
             !(p->cfg->layers = calloc((size_t)n, sizeof *p->cfg->layers)))
        st = clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %d layers", n);
    if (st == CLKVQ_OK) {
        p->cfg->n_layers = n;
        st = check_index_keys(p, "layer", pairs, n, slot);
    }
    for (int l = 0; l < n && st == CLKVQ_OK; l++)
        st = parse_layer(p, pairs[slot[l]], l, base, top);
    free(slot);
    free(pairs);
    return st;
}

static clkvq_status parse_document(parser *p, const clkvq_layer_config *base)
{
    yaml_node_t *root = yaml_document_get_root_node(&p->doc);
    if (!root)
        return perr(p, 1, "empty document: expected a mapping of layers");
    p->visited[0] = 1; /* the root is node 1 */
    if (root->type != YAML_MAPPING_NODE)
        return perr(p, node_line(root), "top level: expected a mapping of layers, got %s",
                    kind_name(root));
    field_set top = {0};
    clkvq_status st = parse_fields(p, root, "top level", CONFIG_IN_TOP, &top);
    for (int i = 0; i < config_field_count; i++) { /* the config owns top values, matrices */
        const config_field *f = &config_fields[i];
        if (config_field_is_matrix(f))
            p->cfg->shared_matrix[f->slot] = take_matrix(&top, f);
        else if (!(f->scopes & CONFIG_IN_LAYER))
            config_field_move(f, config_field_value(f, NULL, &p->cfg->top),
                              config_field_value(f, &top.layer, &top.top));
    }
    if (st == CLKVQ_OK)
        st = parse_layers(p, root, base, &top);
    if (st == CLKVQ_OK)
        st = check_geometry(p, &top);
    field_set_free(&top);
    return st;
}

/* libyaml's own complaint (syntax, encoding) with its line. */
static clkvq_status yaml_syntax_error(parser *p, const yaml_parser_t *yp)
{
    if (yp->error == YAML_MEMORY_ERROR)
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: out of memory parsing YAML",
                          p->name);
    return clkvq_fail(p->ctx, CLKVQ_ERR_CORRUPT, "%s:%zu: not valid YAML: %s%s%s", p->name,
                      yp->problem_mark.line + 1, yp->problem ? yp->problem : "unknown error",
                      yp->context ? " " : "", yp->context ? yp->context : "");
}

/* Loads the one document of the stream; a second document is an error
 * (a file with two configs would otherwise lose one silently). */
static clkvq_status load_document(parser *p, yaml_parser_t *yp)
{
    if (!yaml_parser_load(yp, &p->doc))
        return yaml_syntax_error(p, yp);
    yaml_document_t extra;
    if (!yaml_parser_load(yp, &extra)) {
        yaml_document_delete(&p->doc);
        return yaml_syntax_error(p, yp);
    }
    yaml_node_t *extra_root = yaml_document_get_root_node(&extra);
    size_t line = extra_root ? node_line(extra_root) : 0;
    yaml_document_delete(&extra);
    if (extra_root) {
        yaml_document_delete(&p->doc);
        return perr(p, line, "a second YAML document; a config is one document");
    }
    return CLKVQ_OK;
}

/* The caller's defaults obey the same ranges as the file's fields (a
 * group_size of 0 would divide by zero in config_layer_rules). */
static clkvq_status check_defaults(clkvq_context *ctx, const clkvq_layer_config *d)
{
    clkvq_status st = config_check_layer(ctx, d, -1);
    if (st != CLKVQ_OK)
        return st;
    if (!config_has_matrix(d))
        return CLKVQ_OK;
    char perms[64], means[64];
    config_field_names(CONFIG_IN_LAYER, CONFIG_KIND_PERM, "/", perms, sizeof perms);
    config_field_names(CONFIG_IN_LAYER, CONFIG_KIND_MEAN, "/", means, sizeof means);
    return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                      "defaults: %s/%s must be NULL (their shape is unknown to the loader); put "
                      "them in the file",
                      perms, means);
}

static clkvq_status parse_impl(clkvq_context *ctx, const char *name, const char *text,
                               size_t size, const clkvq_layer_config *defaults,
                               clkvq_precision_config **out)
{
    clkvq_layer_config base =
        defaults ? *defaults : clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    clkvq_status st = check_defaults(ctx, &base);
    if (st != CLKVQ_OK)
        return st;
    parser p = {.ctx = ctx, .name = name};
    if (!(p.cfg = calloc(1, sizeof *p.cfg)))
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a config");
    yaml_parser_t yp;
    if (!yaml_parser_initialize(&yp)) {
        free(p.cfg);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "initializing libyaml");
    }
    yaml_parser_set_input_string(&yp, (const unsigned char *)text, size);
    config_c_numeric loc;
    config_c_numeric_enter(&loc);
    st = load_document(&p, &yp);
    if (st == CLKVQ_OK) {
        p.n_nodes = (size_t)(p.doc.nodes.top - p.doc.nodes.start);
        p.visited = calloc(p.n_nodes ? p.n_nodes : 1, 1);
        st = p.visited ? parse_document(&p, &base)
                       : clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a node map");
        free(p.visited);
        yaml_document_delete(&p.doc);
    }
    config_c_numeric_leave(&loc);
    yaml_parser_delete(&yp);
    if (st != CLKVQ_OK) {
        clkvq_config_free(p.cfg);
        return st;
    }
    *out = p.cfg;
    return CLKVQ_OK;
}

clkvq_status clkvq_config_parse(clkvq_context *ctx, const char *text, size_t size,
                                const clkvq_layer_config *defaults,
                                clkvq_precision_config **out)
{
    clkvq_clear_error(ctx);
    if (!out || (!text && size))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_config_parse: %s is NULL",
                          !out ? "out" : "text");
    *out = NULL;
    return parse_impl(ctx, "<memory>", text ? text : "", size, defaults, out);
}

/* The whole file; CLKVQ_ERR_IO when it cannot be read. */
static clkvq_status read_whole(clkvq_context *ctx, const char *path, char **data, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return clkvq_fail(ctx, CLKVQ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap)
            break;
        char *bigger = realloc(buf, cap * 2);
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    int failed = ferror(f);
    fclose(f);
    if (!buf)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "%s: reading into memory", path);
    if (failed) {
        free(buf);
        return clkvq_fail(ctx, CLKVQ_ERR_IO, "%s: read error", path);
    }
    *data = buf;
    *size = n;
    return CLKVQ_OK;
}

clkvq_status clkvq_config_load(clkvq_context *ctx, const char *path,
                               const clkvq_layer_config *defaults,
                               clkvq_precision_config **out)
{
    clkvq_clear_error(ctx);
    if (!path || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_config_load: %s is NULL",
                          !path ? "path" : "out");
    *out = NULL;
    char *data = NULL;
    size_t size = 0;
    clkvq_status st = read_whole(ctx, path, &data, &size);
    if (st != CLKVQ_OK)
        return st;
    st = parse_impl(ctx, path, data, size, defaults, out);
    free(data);
    return st;
}

/*
 * Layer precision configs (KVTuner): load through libyaml's document API,
 * validate, save through libyaml's emitter, and build a cache from one.
 *
 * The file is a YAML mapping. Integer keys are layers (0..L-1, no gaps, no
 * duplicates); each layer is a mapping of fields (see g_fields) and, in a
 * per-head file, of integer head keys -> {nbits_key, nbits_value}. String
 * keys at the top are `model` or any layer field, a default for all layers.
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
#include "internal.h"
#include "program_cache.h"
#include "reference.h"

#include <yaml.h>

#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Bounds that keep a hostile file from asking for absurd allocations; a
 * real model is far inside them. */
#define MAX_LAYERS 4096
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 65536
#define MAX_INDEX_KEY MAX_LAYERS /* the largest layer or head key parsed (>= MAX_HEADS) */

typedef struct {
    clkvq_format k, v;
} head_pair;

typedef struct {
    clkvq_layer_config cfg; /* perm_k/perm_v: perm[], the shared perm, or NULL */
    int32_t *perm[2];       /* the layer's own, [perm_heads][head_dim], or NULL */
    int n_heads;            /* heads with their own bits; 0 = one pair */
    head_pair *heads;
    int line;               /* of the layer key (0 when built in memory) */
} config_layer;

struct clkvq_precision_config {
    char *model;
    int n_layers;
    int perm_heads, head_dim; /* the shape every perm has (0, 0 if none) */
    /* Top-level perm_k/perm_v, shared by every layer without its own: one
     * copy, so a file cannot multiply one perm by its layer count. */
    int32_t *shared_perm[2];
    config_layer *layers;
};

/* ------------------------------------------------------------ fields */

enum {
    F_NBITS_K, F_NBITS_V, F_SCHEME, F_GROUP, F_CLIP_K, F_CLIP_V, F_WINDOW, F_SINK,
    F_RESIDUAL, F_PARAM, F_ZERO, F_PERM_K, F_PERM_V, F_COUNT
};

static const char *const g_fields[F_COUNT] = {
    "nbits_key", "nbits_value", "scheme", "group_size", "clip_k", "clip_v", "window",
    "n_sink", "residual", "param_type", "zero_mode", "perm_k", "perm_v"};

#define VALID_FIELDS                                                                         \
    "nbits_key, nbits_value, scheme, group_size, clip_k, clip_v, window, n_sink, residual, " \
    "param_type, zero_mode, perm_k, perm_v"

static const char *const g_param_names[] = {"fp16", "fp8"};
static const char *const g_zero_names[] = {"float", "int"};

/* The fields one mapping (a layer, or the top level) gave. */
typedef struct {
    unsigned set;          /* bit f: field f was given */
    int line[F_COUNT];     /* where */
    clkvq_layer_config v;  /* the given values (perm pointers unused) */
    int32_t *perm[2];      /* owned */
} field_set;

static void field_set_free(field_set *fs)
{
    free(fs->perm[0]);
    free(fs->perm[1]);
    memset(fs, 0, sizeof *fs);
}

/* ------------------------------------------------------------ numbers */

/* strtod and printf follow the caller's LC_NUMERIC ("0,92" under de_DE);
 * configs always use '.', so conversions run under the C locale of this
 * thread only (uselocale), leaving the application's locale alone. */
typedef struct {
    locale_t c, old;
} c_numeric;

static void c_numeric_enter(c_numeric *s)
{
    s->c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    s->old = s->c ? uselocale(s->c) : (locale_t)0;
}

static void c_numeric_leave(c_numeric *s)
{
    if (s->c) {
        uselocale(s->old);
        freelocale(s->c);
    }
}

/* A whole decimal integer ("+" / "-" allowed, nothing else); 0 if not. */
static int parse_long(const char *text, long lo, long hi, long *out)
{
    const char *p = text;
    if (*p == '+' || *p == '-')
        p++;
    if (*p < '0' || *p > '9')
        return 0;
    for (const char *q = p; *q; q++)
        if (*q < '0' || *q > '9')
            return 0;
    errno = 0;
    long v = strtol(text, NULL, 10);
    if (errno == ERANGE || v < lo || v > hi)
        return 0;
    *out = v;
    return 1;
}

/* A whole finite number; 0 if not (text must be all consumed). */
static int parse_double(const char *text, double *out)
{
    char *end = NULL;
    if (!*text)
        return 0;
    errno = 0;
    double v = strtod(text, &end);
    if (*end || errno == ERANGE || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

static int parse_float(const char *text, float *out)
{
    char *end = NULL;
    if (!*text)
        return 0;
    errno = 0;
    float v = strtof(text, &end);
    if (*end || errno == ERANGE || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

/* Bits as configs write them: the format table's bits_name ("8" ... "1.5"),
 * compared as numbers so that "8.0" is 8 too. */
static int bits_to_format(const char *text, clkvq_format *out)
{
    double v = 0.0;
    if (!parse_double(text, &v))
        return 0;
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++)
        if (v == atof(clkvq_format_get((clkvq_format)f)->bits_name)) {
            *out = (clkvq_format)f;
            return 1;
        }
    return 0;
}

static double format_bits(clkvq_format f) { return atof(clkvq_format_get(f)->bits_name); }

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

static int field_index(const char *name)
{
    for (int f = 0; f < F_COUNT; f++)
        if (!strcmp(name, g_fields[f]))
            return f;
    return -1;
}

/* ---- one field value */

static clkvq_status parse_bits_value(parser *p, const yaml_node_t *node, const char *where,
                                     clkvq_format *out)
{
    const char *text = NULL;
    clkvq_status st = scalar_text(p, node, where, "a number of bits", &text);
    if (st != CLKVQ_OK)
        return st;
    if (!bits_to_format(text, out))
        return perr(p, node_line(node),
                    "%s: '%s' is not in the format table (8, 4, 3, 2, 1.5 bits)", where, text);
    return CLKVQ_OK;
}

static clkvq_status parse_int_value(parser *p, const yaml_node_t *node, const char *where,
                                    long lo, long hi, int *out)
{
    const char *text = NULL;
    clkvq_status st = scalar_text(p, node, where, "an integer", &text);
    if (st != CLKVQ_OK)
        return st;
    long v;
    if (!parse_long(text, lo, hi, &v))
        return perr(p, node_line(node), "%s: '%s' is not an integer in %ld..%ld", where, text,
                    lo, hi);
    *out = (int)v;
    return CLKVQ_OK;
}

static clkvq_status parse_clip_value(parser *p, const yaml_node_t *node, const char *where,
                                     float *out)
{
    const char *text = NULL;
    clkvq_status st = scalar_text(p, node, where, "a number", &text);
    if (st != CLKVQ_OK)
        return st;
    float v;
    if (!parse_float(text, &v) || !(v > 0.0f && v <= 1.0f))
        return perr(p, node_line(node), "%s: '%s' is not a clip ratio in (0, 1]", where, text);
    *out = v;
    return CLKVQ_OK;
}

/* One of `names` (case-insensitive); the index. */
static clkvq_status parse_name_value(parser *p, const yaml_node_t *node, const char *where,
                                     const char *const *names, int n, const char *valid,
                                     int *out)
{
    const char *text = NULL;
    clkvq_status st = scalar_text(p, node, where, "a name", &text);
    if (st != CLKVQ_OK)
        return st;
    for (int i = 0; i < n; i++)
        if (!strcasecmp(text, names[i])) {
            *out = i;
            return CLKVQ_OK;
        }
    return perr(p, node_line(node), "%s: '%s' is not one of %s", where, text, valid);
}

/* The row node of head h: a sequence of *dim items (any length for head 0,
 * which then sets *dim). */
static clkvq_status perm_row_node(parser *p, const yaml_node_t *node, const char *where, int h,
                                  long *dim, yaml_node_t **out)
{
    clkvq_status st = get_node(p, node->data.sequence.items.start[h], node_line(node), out);
    if (st != CLKVQ_OK)
        return st;
    yaml_node_t *row = *out;
    if (row->type != YAML_SEQUENCE_NODE)
        return perr(p, node_line(row),
                    "%s: head %d: expected a sequence of channel indices, got %s", where, h,
                    kind_name(row));
    long n = row->data.sequence.items.top - row->data.sequence.items.start;
    if (h == 0)
        *dim = n;
    else if (n != *dim)
        return perr(p, node_line(row), "%s: head %d has %ld channels, head 0 has %ld", where, h,
                    n, *dim);
    return CLKVQ_OK;
}

/* One row of a perm: dim integers in 0..dim-1. */
static clkvq_status parse_perm_row(parser *p, const yaml_node_t *row, const char *where,
                                   int head, int dim, int32_t *out)
{
    yaml_node_item_t *items = row->data.sequence.items.start;
    for (int c = 0; c < dim; c++) {
        yaml_node_t *item = NULL;
        clkvq_status st = get_node(p, items[c], node_line(row), &item);
        if (st != CLKVQ_OK)
            return st;
        char what[160];
        snprintf(what, sizeof what, "%s head %d channel %d", where, head, c);
        int v = 0;
        st = parse_int_value(p, item, what, 0, dim - 1, &v);
        if (st != CLKVQ_OK)
            return st;
        out[c] = v;
    }
    return CLKVQ_OK;
}

/* The shape of a perm node: every row checked before anything is
 * allocated, so the allocation is paid for by items really in the file. */
static clkvq_status perm_shape(parser *p, const yaml_node_t *node, const char *where,
                               yaml_node_t **rows, long *dim)
{
    long heads = node->data.sequence.items.top - node->data.sequence.items.start;
    *dim = 0;
    for (int h = 0; h < heads; h++) {
        clkvq_status st = perm_row_node(p, node, where, h, dim, &rows[h]);
        if (st != CLKVQ_OK)
            return st;
    }
    if (*dim < 1 || *dim > MAX_HEAD_DIM)
        return perr(p, node_line(node), "%s: %ld channels per head, expected 1..%d", where, *dim,
                    MAX_HEAD_DIM);
    clkvq_precision_config *cfg = p->cfg;
    if (cfg->head_dim && (cfg->perm_heads != heads || cfg->head_dim != *dim))
        return perr(p, node_line(node), "%s: %ld heads x %ld channels, earlier perms are %d x %d",
                    where, heads, *dim, cfg->perm_heads, cfg->head_dim);
    return CLKVQ_OK;
}

/* perm_k / perm_v: one sequence of head_dim ints per kv head, a
 * permutation each, and the same shape as every other perm of the file. */
static clkvq_status parse_perm_value(parser *p, const yaml_node_t *node, const char *where,
                                     int32_t **out)
{
    if (node->type != YAML_SEQUENCE_NODE)
        return perr(p, node_line(node), "%s: expected a sequence (one per kv head), got %s",
                    where, kind_name(node));
    long heads = node->data.sequence.items.top - node->data.sequence.items.start;
    if (heads < 1 || heads > MAX_HEADS)
        return perr(p, node_line(node), "%s: %ld kv heads, expected 1..%d", where, heads,
                    MAX_HEADS);
    yaml_node_t **rows = calloc((size_t)heads, sizeof *rows);
    if (!rows)
        return clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s", where);
    long dim;
    clkvq_status st = perm_shape(p, node, where, rows, &dim);
    int32_t *perm = NULL;
    if (st == CLKVQ_OK && !(perm = malloc(sizeof *perm * (size_t)heads * (size_t)dim)))
        st = clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating %s", where);
    for (int h = 0; h < heads && st == CLKVQ_OK; h++)
        st = parse_perm_row(p, rows[h], where, h, (int)dim, perm + (size_t)h * dim);
    free(rows);
    if (st == CLKVQ_OK && !clkvq_ref_is_permutation(perm, (int)heads, (int)dim))
        st = perr(p, node_line(node),
                  "%s: not a permutation of 0..%ld in every head (a channel repeats)", where,
                  dim - 1);
    if (st != CLKVQ_OK) {
        free(perm);
        return st;
    }
    p->cfg->perm_heads = (int)heads;
    p->cfg->head_dim = (int)dim;
    *out = perm;
    return CLKVQ_OK;
}

/* Field f of a mapping: its value into fs. */
static clkvq_status parse_field(parser *p, field_set *fs, int f, const yaml_node_t *key,
                                const yaml_node_t *value, const char *scope)
{
    char where[128];
    snprintf(where, sizeof where, "%s: %s", scope, g_fields[f]);
    if (fs->set & (1u << f))
        return perr(p, node_line(key), "%s: duplicate field (first at line %d)", where,
                    fs->line[f]);
    fs->set |= 1u << f;
    fs->line[f] = (int)node_line(key);
    clkvq_layer_config *v = &fs->v;
    int i = 0;
    clkvq_status st = CLKVQ_OK;
    switch (f) {
    case F_NBITS_K: return parse_bits_value(p, value, where, &v->format_k);
    case F_NBITS_V: return parse_bits_value(p, value, where, &v->format_v);
    case F_SCHEME: {
        const char *names[CLKVQ_SCHEME_COUNT];
        for (int s = 0; s < CLKVQ_SCHEME_COUNT; s++)
            names[s] = clkvq_scheme_name((clkvq_scheme)s);
        st = parse_name_value(p, value, where, names, CLKVQ_SCHEME_COUNT,
                              "fp16, token, kivi, skvq", &i);
        v->scheme = (clkvq_scheme)i;
        return st;
    }
    case F_GROUP:
        st = parse_int_value(p, value, where, 32, MAX_HEAD_DIM, &v->group_size);
        if (st == CLKVQ_OK && v->group_size % 32 != 0)
            return perr(p, node_line(value), "%s: %d is not a multiple of 32", where,
                        v->group_size);
        return st;
    case F_CLIP_K: return parse_clip_value(p, value, where, &v->clip_k);
    case F_CLIP_V: return parse_clip_value(p, value, where, &v->clip_v);
    case F_WINDOW: return parse_int_value(p, value, where, 0, INT_MAX, &v->window);
    case F_SINK: return parse_int_value(p, value, where, 0, INT_MAX, &v->n_sink);
    case F_RESIDUAL: return parse_int_value(p, value, where, 0, INT_MAX, &v->residual);
    case F_PARAM:
        st = parse_name_value(p, value, where, g_param_names, 2, "fp16, fp8", &i);
        v->param_type = i ? CLKVQ_PARAM_FP8_E4M3 : CLKVQ_PARAM_FP16;
        return st;
    case F_ZERO:
        st = parse_name_value(p, value, where, g_zero_names, 2, "float, int", &i);
        v->zero_mode = i ? CLKVQ_ZERO_INT : CLKVQ_ZERO_FLOAT;
        return st;
    case F_PERM_K: return parse_perm_value(p, value, where, &fs->perm[0]);
    case F_PERM_V: return parse_perm_value(p, value, where, &fs->perm[1]);
    }
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
    if (!parse_long(text, 0, limit - 1, out))
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

/* One head: {nbits_key, nbits_value}, both required, nothing else. */
static clkvq_status parse_head(parser *p, const yaml_node_pair_t *pair, int layer, int head,
                               head_pair *out)
{
    yaml_node_t *map = NULL;
    clkvq_status st = get_node(p, pair->value, 0, &map);
    if (st != CLKVQ_OK)
        return st;
    char where[64];
    snprintf(where, sizeof where, "layer %d head %d", layer, head);
    if (map->type != YAML_MAPPING_NODE)
        return perr(p, node_line(map), "%s: expected a mapping of nbits_key, nbits_value, got %s",
                    where, kind_name(map));
    field_set fs = {0};
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start;
         q < map->data.mapping.pairs.top && st == CLKVQ_OK; q++) {
        yaml_node_t *key = NULL, *value = NULL;
        const char *name = NULL;
        st = get_node(p, q->key, node_line(map), &key);
        if (st == CLKVQ_OK)
            st = scalar_text(p, key, where, "a field name", &name);
        if (st == CLKVQ_OK && strcmp(name, "nbits_key") && strcmp(name, "nbits_value"))
            st = perr(p, node_line(key),
                      "%s: unknown field '%s'; a head takes only nbits_key, nbits_value", where,
                      name);
        if (st == CLKVQ_OK)
            st = get_node(p, q->value, node_line(key), &value);
        if (st == CLKVQ_OK)
            st = parse_field(p, &fs, field_index(name), key, value, where);
    }
    for (int f = F_NBITS_K; f <= F_NBITS_V && st == CLKVQ_OK; f++)
        if (!(fs.set & (1u << f)))
            st = perr(p, node_line(map), "%s: %s missing", where, g_fields[f]);
    out->k = fs.v.format_k;
    out->v = fs.v.format_v;
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

/* The fields of a mapping (not its index keys) into fs. top: the top
 * level, where `model` is also valid. */
static clkvq_status parse_fields(parser *p, const yaml_node_t *map, const char *scope, int top,
                                 field_set *fs)
{
    clkvq_status st = CLKVQ_OK;
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start;
         q < map->data.mapping.pairs.top && st == CLKVQ_OK; q++) {
        yaml_node_t *key = yaml_document_get_node(&p->doc, q->key), *value = NULL;
        if (key && is_index_key(key))
            continue; /* a layer or head: walked by its own code */
        const char *name = NULL;
        st = get_node(p, q->key, node_line(map), &key);
        if (st == CLKVQ_OK)
            st = scalar_text(p, key, scope, "a field name", &name);
        if (st != CLKVQ_OK)
            break;
        int f = field_index(name);
        if (f < 0 && !(top && !strcmp(name, "model")))
            return perr(p, node_line(key), "%s: unknown field '%s'; valid fields: %s%s%s", scope,
                        name, top ? "model, " : "",
                        VALID_FIELDS, top ? ", and integer layer keys" : ", and integer head keys");
        st = get_node(p, q->value, node_line(key), &value);
        if (st != CLKVQ_OK)
            break;
        if (f >= 0) {
            st = parse_field(p, fs, f, key, value, scope);
            continue;
        }
        const char *model = NULL;
        if (p->cfg->model)
            return perr(p, node_line(key), "model: duplicate field");
        st = scalar_text(p, value, "model", "a string", &model);
        if (st == CLKVQ_OK && !(p->cfg->model = strdup(model)))
            st = clkvq_fail(p->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating the model name");
    }
    return st;
}

static void apply_fields(clkvq_layer_config *cfg, const field_set *fs)
{
    const clkvq_layer_config *v = &fs->v;
#define TAKE(f, member) \
    if (fs->set & (1u << (f))) cfg->member = v->member
    TAKE(F_NBITS_K, format_k);
    TAKE(F_NBITS_V, format_v);
    TAKE(F_GROUP, group_size);
    TAKE(F_CLIP_K, clip_k);
    TAKE(F_CLIP_V, clip_v);
    TAKE(F_WINDOW, window);
    TAKE(F_SINK, n_sink);
    TAKE(F_RESIDUAL, residual);
    TAKE(F_PARAM, param_type);
    TAKE(F_ZERO, zero_mode);
#undef TAKE
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

/* The scheme settings the kv cache would refuse, caught here with a line. */
static clkvq_status check_layer(parser *p, const config_layer *cl, int l)
{
    const clkvq_layer_config *c = &cl->cfg;
    const char *s = clkvq_scheme_name(c->scheme);
    if (c->scheme != CLKVQ_SCHEME_SKVQ && (c->window || c->n_sink))
        return perr(p, (size_t)cl->line, "layer %d: window/n_sink are skvq settings, scheme %s has none",
                    l, s);
    if (c->scheme != CLKVQ_SCHEME_KIVI && c->residual)
        return perr(p, (size_t)cl->line, "layer %d: residual is a kivi setting, scheme %s has none",
                    l, s);
    if (c->scheme == CLKVQ_SCHEME_KIVI && (c->residual <= 0 || c->residual % c->group_size))
        return perr(p, (size_t)cl->line,
                    "layer %d: kivi residual %d must be a positive multiple of group_size %d", l,
                    c->residual, c->group_size);
    return CLKVQ_OK;
}

/* Combines defaults, top-level fields and the layer's own (see the top of
 * the file) into out->cfg. */
static clkvq_status compose_layer(parser *p, const clkvq_layer_config *base,
                                  const field_set *top, field_set *own, int l,
                                  config_layer *out)
{
    clkvq_layer_config c = *base;
    const field_set *scheme_src = own->set & (1u << F_SCHEME) ? own
                                  : top->set & (1u << F_SCHEME) ? top : NULL;
    if (scheme_src && scheme_src->v.scheme != c.scheme) {
        clkvq_layer_config sd = clkvq_layer_config_default(scheme_src->v.scheme);
        c.scheme = sd.scheme;
        c.group_size = sd.group_size;
        c.window = sd.window;
        c.n_sink = sd.n_sink;
        c.residual = sd.residual;
    }
    apply_fields(&c, top);
    apply_fields(&c, own);
    for (int f = F_NBITS_K; f <= F_NBITS_V && !out->n_heads; f++)
        if (!((own->set | top->set) & (1u << f)))
            return perr(p, (size_t)out->line, "layer %d: %s missing", l, g_fields[f]);
    if (out->n_heads && (own->set & (3u << F_NBITS_K)))
        return perr(p, (size_t)own->line[own->set & (1u << F_NBITS_K) ? F_NBITS_K : F_NBITS_V],
                    "layer %d: bits given for the layer and per head; give one", l);
    for (int h = 0; h < out->n_heads; h++) { /* the widest head: the smallest enum */
        if (h == 0 || out->heads[h].k < c.format_k)
            c.format_k = out->heads[h].k;
        if (h == 0 || out->heads[h].v < c.format_v)
            c.format_v = out->heads[h].v;
    }
    for (int i = 0; i < 2; i++) { /* the layer takes its own perms over */
        out->perm[i] = own->perm[i];
        own->perm[i] = NULL;
    }
    c.perm_k = out->perm[0] ? out->perm[0] : p->cfg->shared_perm[0];
    c.perm_v = out->perm[1] ? out->perm[1] : p->cfg->shared_perm[1];
    out->cfg = c;
    return check_layer(p, out, l);
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
    if (map->type != YAML_MAPPING_NODE)
        return perr(p, node_line(map), "layer %d: expected a mapping (nbits_key, nbits_value, ...), got %s",
                    l, kind_name(map));
    char scope[32];
    snprintf(scope, sizeof scope, "layer %d", l);
    yaml_node_pair_t **heads = NULL;
    int n_heads = 0;
    field_set own = {0};
    st = collect_index_pairs(p, map, &heads, &n_heads);
    if (st == CLKVQ_OK && n_heads)
        st = parse_heads(p, map, heads, n_heads, l, out);
    if (st == CLKVQ_OK)
        st = parse_fields(p, map, scope, 0, &own);
    if (st == CLKVQ_OK)
        st = compose_layer(p, base, top, &own, l, out);
    field_set_free(&own);
    free(heads);
    return st;
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
    clkvq_status st = parse_fields(p, root, "top level", 1, &top);
    for (int i = 0; i < 2; i++) { /* the config owns the shared perms */
        p->cfg->shared_perm[i] = top.perm[i];
        top.perm[i] = NULL;
    }
    if (st == CLKVQ_OK)
        st = parse_layers(p, root, base, &top);
    field_set_free(&top);
    return st;
}

static void config_free_layers(clkvq_precision_config *cfg)
{
    for (int l = 0; cfg->layers && l < cfg->n_layers; l++) {
        free(cfg->layers[l].perm[0]);
        free(cfg->layers[l].perm[1]);
        free(cfg->layers[l].heads);
    }
    free(cfg->layers);
    free(cfg->shared_perm[0]);
    free(cfg->shared_perm[1]);
}

void clkvq_config_free(clkvq_precision_config *cfg)
{
    if (!cfg)
        return;
    config_free_layers(cfg);
    free(cfg->model);
    free(cfg);
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

static clkvq_status check_layer_config(clkvq_context *ctx, const clkvq_layer_config *c, int l);

/* The caller's defaults obey the same ranges as the file's fields (a
 * group_size of 0 would divide by zero in check_layer). */
static clkvq_status check_defaults(clkvq_context *ctx, const clkvq_layer_config *d)
{
    clkvq_status st = check_layer_config(ctx, d, -1);
    if (st != CLKVQ_OK)
        return st;
    if (d->perm_k || d->perm_v)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "defaults: perm_k/perm_v must be NULL (their shape is unknown to the "
                          "loader); put perms in the file");
    return CLKVQ_OK;
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
    c_numeric loc;
    c_numeric_enter(&loc);
    st = load_document(&p, &yp);
    if (st == CLKVQ_OK) {
        p.n_nodes = (size_t)(p.doc.nodes.top - p.doc.nodes.start);
        p.visited = calloc(p.n_nodes ? p.n_nodes : 1, 1);
        st = p.visited ? parse_document(&p, &base)
                       : clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a node map");
        free(p.visited);
        yaml_document_delete(&p.doc);
    }
    c_numeric_leave(&loc);
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

/* ------------------------------------------------------------ building */

/* What the parser checks per field, for layer configs built in memory
 * (layer l) and for the caller's defaults (l < 0). */
static clkvq_status check_layer_config(clkvq_context *ctx, const clkvq_layer_config *c, int l)
{
    char who[32];
    snprintf(who, sizeof who, l < 0 ? "defaults" : "layer %d", l);
    if ((int)c->scheme < 0 || c->scheme >= CLKVQ_SCHEME_COUNT || (int)c->format_k < 0 ||
        c->format_k >= CLKVQ_FMT_COUNT || (int)c->format_v < 0 || c->format_v >= CLKVQ_FMT_COUNT ||
        (int)c->param_type < 0 || c->param_type > CLKVQ_PARAM_FP8_E4M3 || (int)c->zero_mode < 0 ||
        c->zero_mode > CLKVQ_ZERO_INT)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: scheme, format, param_type or zero_mode out of range", who);
    if (c->group_size < 32 || c->group_size % 32 || c->group_size > MAX_HEAD_DIM ||
        !(c->clip_k > 0.0f && c->clip_k <= 1.0f) || !(c->clip_v > 0.0f && c->clip_v <= 1.0f) ||
        c->window < 0 || c->n_sink < 0 || c->residual < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s: group_size %d (a multiple of 32), clip %g/%g (in (0, 1]) or "
                          "window/n_sink/residual %d/%d/%d (>= 0) out of range",
                          who, c->group_size, (double)c->clip_k, (double)c->clip_v, c->window,
                          c->n_sink, c->residual);
    return CLKVQ_OK;
}

static clkvq_status create_layer(clkvq_context *ctx, const clkvq_layer_config *src, int l,
                                 int n_heads, int head_dim, config_layer *out)
{
    clkvq_status st = check_layer_config(ctx, src, l);
    if (st != CLKVQ_OK)
        return st;
    out->cfg = *src;
    const int32_t *perms[2] = {src->perm_k, src->perm_v};
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++) {
        if (perms[i] && !clkvq_ref_is_permutation(perms[i], n_heads, head_dim))
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                              "layer %d: perm_%c is not a permutation of 0..%d per kv head", l,
                              "kv"[i], head_dim - 1);
        st = copy_perm(ctx, perms[i], n_heads, head_dim, &out->perm[i]);
    }
    out->cfg.perm_k = out->perm[0];
    out->cfg.perm_v = out->perm[1];
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
        has_perm |= layers[l].perm_k || layers[l].perm_v;
    if (has_perm && (head_dim <= 0 || head_dim > MAX_HEAD_DIM || n_kv_heads <= 0))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_config_create: perms given but head_dim %d not in 1..%d or "
                          "n_kv_heads %d not positive",
                          head_dim, MAX_HEAD_DIM, n_kv_heads);
    clkvq_precision_config *cfg = calloc(1, sizeof *cfg);
    if (!cfg || !(cfg->layers = calloc((size_t)n_layers, sizeof *cfg->layers)) ||
        !(cfg->model = strdup(model ? model : ""))) {
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
    return cfg && cfg->model ? cfg->model : "";
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
        return (format_bits(cl->cfg.format_k) + format_bits(cl->cfg.format_v)) / 2.0;
    double sum = 0.0;
    for (int h = 0; h < cl->n_heads; h++)
        sum += format_bits(cl->heads[h].k) + format_bits(cl->heads[h].v);
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
                          cfg->model && *cfg->model ? " for " : "", cfg->model ? cfg->model : "",
                          cfg->n_layers, n_layers);
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
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "layer %d has bits for %d heads, the cache %d kv heads",
                          l, cl->n_heads, n_kv_heads);
    for (int h = 1; h < cl->n_heads; h++)
        if (cl->heads[h].k != cl->heads[0].k || cl->heads[h].v != cl->heads[0].v)
            return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                              "layer %d: head %d is K%sV%s, head 0 K%sV%s; the kernels take one "
                              "bit pair per layer (per-head bits are not supported)",
                              l, h, clkvq_format_get(cl->heads[h].k)->bits_name,
                              clkvq_format_get(cl->heads[h].v)->bits_name,
                              clkvq_format_get(cl->heads[0].k)->bits_name,
                              clkvq_format_get(cl->heads[0].v)->bits_name);
    if ((cl->cfg.perm_k || cl->cfg.perm_v) &&
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
    clkvq_layer_config *layers = calloc((size_t)cfg->n_layers, sizeof *layers);
    if (!layers)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating layer configs");
    clkvq_status st = CLKVQ_OK;
    for (int l = 0; l < cfg->n_layers && st == CLKVQ_OK; l++) {
        st = check_layer_fits(ctx, cfg, l, n_kv_heads, head_dim);
        layers[l] = cfg->layers[l].cfg;
    }
    if (st == CLKVQ_OK) {
        clkvq_cache_config cc = {cfg->n_layers, n_seqs,   capacity, n_kv_heads, n_q_heads,
                                 head_dim,       layout_k, layout_v, layers};
        st = clkvq_cache_create(ctx, &cc, out);
    }
    free(layers);
    return st;
}

/* ------------------------------------------------------------ saving */

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

static int emit_pair(yaml_emitter_t *em, const char *key, const char *value)
{
    return emit_scalar(em, key, YAML_PLAIN_SCALAR_STYLE) &&
           emit_scalar(em, value, YAML_PLAIN_SCALAR_STYLE);
}

static int emit_int_pair(yaml_emitter_t *em, const char *key, int value)
{
    char text[16];
    snprintf(text, sizeof text, "%d", value);
    return emit_pair(em, key, text);
}

/* The shortest text that reads back as the same float. */
static int emit_float_pair(yaml_emitter_t *em, const char *key, float value)
{
    char text[32];
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, (double)value);
        if (strtof(text, NULL) == value)
            break;
    }
    return emit_pair(em, key, text);
}

static int emit_bits(yaml_emitter_t *em, clkvq_format k, clkvq_format v)
{
    return emit_pair(em, "nbits_key", clkvq_format_get(k)->bits_name) &&
           emit_pair(em, "nbits_value", clkvq_format_get(v)->bits_name);
}

/* perm: a block sequence of flow rows, one row per kv head. */
static int emit_perm(yaml_emitter_t *em, const char *key, const int32_t *perm, int heads, int dim)
{
    if (!emit_scalar(em, key, YAML_PLAIN_SCALAR_STYLE) ||
        !emit_sequence(em, 1, YAML_BLOCK_SEQUENCE_STYLE))
        return 0;
    for (int h = 0; h < heads; h++) {
        if (!emit_sequence(em, 1, YAML_FLOW_SEQUENCE_STYLE))
            return 0;
        for (int c = 0; c < dim; c++) {
            char text[16];
            snprintf(text, sizeof text, "%d", (int)perm[(size_t)h * dim + c]);
            if (!emit_scalar(em, text, YAML_PLAIN_SCALAR_STYLE))
                return 0;
        }
        if (!emit_sequence(em, 0, 0))
            return 0;
    }
    return emit_sequence(em, 0, 0);
}

static int emit_heads(yaml_emitter_t *em, const config_layer *cl)
{
    for (int h = 0; h < cl->n_heads; h++) {
        char key[16];
        snprintf(key, sizeof key, "%d", h);
        if (!emit_scalar(em, key, YAML_PLAIN_SCALAR_STYLE) ||
            !emit_mapping_start(em, YAML_BLOCK_MAPPING_STYLE) ||
            !emit_bits(em, cl->heads[h].k, cl->heads[h].v) || !emit_mapping_end(em))
            return 0;
    }
    return 1;
}

/* A top-level perm that every layer uses is written once, at the top, as
 * it was read. */
static int shared_by_all(const clkvq_precision_config *cfg, int i)
{
    if (!cfg->shared_perm[i])
        return 0;
    for (int l = 0; l < cfg->n_layers; l++)
        if ((i ? cfg->layers[l].cfg.perm_v : cfg->layers[l].cfg.perm_k) != cfg->shared_perm[i])
            return 0;
    return 1;
}

/* Every field of a layer, so the file stands alone (no defaults needed). */
static int emit_layer(yaml_emitter_t *em, const clkvq_precision_config *cfg, int l)
{
    const config_layer *cl = &cfg->layers[l];
    const clkvq_layer_config *c = &cl->cfg;
    char key[16];
    snprintf(key, sizeof key, "%d", l);
    int ok = emit_scalar(em, key, YAML_PLAIN_SCALAR_STYLE) &&
             emit_mapping_start(em, YAML_BLOCK_MAPPING_STYLE) &&
             (cl->n_heads ? emit_heads(em, cl) : emit_bits(em, c->format_k, c->format_v)) &&
             emit_pair(em, "scheme", clkvq_scheme_name(c->scheme)) &&
             emit_int_pair(em, "group_size", c->group_size) &&
             emit_float_pair(em, "clip_k", c->clip_k) && emit_float_pair(em, "clip_v", c->clip_v) &&
             emit_int_pair(em, "window", c->window) && emit_int_pair(em, "n_sink", c->n_sink) &&
             emit_int_pair(em, "residual", c->residual) &&
             emit_pair(em, "param_type", g_param_names[c->param_type == CLKVQ_PARAM_FP8_E4M3]) &&
             emit_pair(em, "zero_mode", g_zero_names[c->zero_mode == CLKVQ_ZERO_INT]);
    const int32_t *perms[2] = {c->perm_k, c->perm_v};
    for (int i = 0; i < 2 && ok; i++)
        if (perms[i] && !shared_by_all(cfg, i))
            ok = emit_perm(em, i ? "perm_v" : "perm_k", perms[i], cfg->perm_heads,
                           cfg->head_dim);
    return ok && emit_mapping_end(em);
}

static int emit_config(yaml_emitter_t *em, const clkvq_precision_config *cfg)
{
    yaml_event_t ev;
    if (!yaml_stream_start_event_initialize(&ev, YAML_UTF8_ENCODING) || !emit(em, &ev) ||
        !yaml_document_start_event_initialize(&ev, NULL, NULL, NULL, 1) || !emit(em, &ev) ||
        !emit_mapping_start(em, YAML_BLOCK_MAPPING_STYLE))
        return 0;
    if (cfg->model && *cfg->model &&
        !(emit_scalar(em, "model", YAML_PLAIN_SCALAR_STYLE) &&
          emit_scalar(em, cfg->model, YAML_ANY_SCALAR_STYLE)))
        return 0;
    for (int i = 0; i < 2; i++)
        if (shared_by_all(cfg, i) && !emit_perm(em, i ? "perm_v" : "perm_k", cfg->shared_perm[i],
                                                cfg->perm_heads, cfg->head_dim))
            return 0;
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
    yaml_emitter_set_width(&em, -1); /* a perm row stays on one line */
    c_numeric loc;
    c_numeric_enter(&loc);
    int ok = emit_config(&em, cfg);
    c_numeric_leave(&loc);
    clkvq_status st =
        ok ? clkvq_atomic_write(ctx, path, buf.data, buf.size)
           : clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s: cannot write the config as YAML: %s",
                        path, em.problem ? em.problem : "invalid UTF-8 in the model name, or out of memory");
    yaml_emitter_delete(&em);
    free(buf.data);
    return st;
}

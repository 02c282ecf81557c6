/*
 * The fields of a precision config, one row each: what the YAML reader
 * accepts, what defaults and overrides copy, what in-memory configs are
 * checked against, and what the YAML writer emits all come from
 * config_fields[]. A new field is one row; a new kind of value is one
 * entry in the kind table of config_fields.c.
 *
 * Knows nothing of libyaml or of the config object: values are read from
 * and written to a clkvq_layer_config (layer fields) or a config_top (top
 * level only fields) at the row's offset.
 *
 * Adding a field: a per-layer flag (say `rot`) is a clkvq_layer_config
 * member, a row {IN_TOP | IN_LAYER, LAYER_AT(rot)} and, for a new kind
 * (a boolean), one g_kinds entry with its parse/format/check. A top-level
 * only field (say n_kv_heads) is a config_top member and a row {IN_TOP,
 * CONFIG_KIND_INT, TOP_AT(n_kv_heads), bounds}; the reader stores it, the
 * writer writes it when present (not 0), free releases what it owns.
 */
#ifndef CLKVQ_CONFIG_FIELDS_H
#define CLKVQ_CONFIG_FIELDS_H

#include "clkvq.h"

#include <locale.h>
#include <stddef.h>

/* Bounds that keep a hostile file from asking for absurd allocations; a
 * real model is far inside them. */
#define MAX_LAYERS 4096
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 65536
#define MAX_INDEX_KEY MAX_LAYERS /* the largest layer or head key parsed (>= MAX_HEADS) */

/* Values of the fields that exist only at the top of a file. */
typedef struct {
    char *model; /* owned; NULL when the file names none */
    /* the model's geometry (clkvq_model_geometry less the layer count, which
     * is the config's): all three set, or all 0 when the config has none */
    int n_q_heads, n_kv_heads, head_dim;
} config_top;

typedef enum {
    CONFIG_KIND_BITS, /* clkvq_format, written as its bits_name ("8" ... "1.5") */
    CONFIG_KIND_INT,  /* int in lo..hi, a multiple of `multiple` when that is set */
    CONFIG_KIND_CLIP, /* float in (0, 1] */
    CONFIG_KIND_ENUM, /* an enum 0..count-1, written as name(value) */
    CONFIG_KIND_TEXT, /* char *, owned */
    CONFIG_KIND_PERM, /* const int32_t * [heads][dim], owned by the config (not the value) */
    CONFIG_KIND_COUNT
} config_kind;

/* Where a field may appear; IN_LAYER fields live in clkvq_layer_config,
 * the others in config_top. */
enum {
    CONFIG_IN_TOP = 1u,   /* at the top level: the field itself, or every layer's default */
    CONFIG_IN_LAYER = 2u, /* in a layer mapping */
    CONFIG_IN_HEAD = 4u,  /* in a head mapping too; a layer needs it from itself, the top,
                             or per head, and not from both itself and its heads */
};

typedef struct {
    const char *name; /* as YAML spells it */
    config_kind kind;
    unsigned scopes;      /* CONFIG_IN_* */
    int follows_scheme;   /* its default is the scheme's (clkvq_layer_config_default) */
    size_t offset, size;  /* of the value in clkvq_layer_config or config_top */
    long lo, hi;          /* INT: bounds */
    int multiple;         /* INT: 0, or what the value must be a multiple of */
    const char *(*name_of)(int value); /* ENUM: the name of 0..count-1 */
    int count;                         /* ENUM */
    int slot;                          /* PERM: which of the config's perm arrays */
} config_field;

/* PERM fields: their slots are 0..CONFIG_PERM_SLOTS-1. */
#define CONFIG_PERM_SLOTS 2

/* At most this many rows: field sets keep one bit per field. */
#define CONFIG_FIELD_MAX 32

extern const config_field config_fields[];
extern const int config_field_count;

/* The row named `name`, or NULL. */
const config_field *config_field_find(const char *name);

/* Names of the fields valid in `scope` (any of CONFIG_IN_*) and of `kind`
 * (CONFIG_KIND_COUNT: any), in table order, joined by sep into buf. */
void config_field_names(unsigned scope, config_kind kind, const char *sep, char *buf,
                        size_t size);

/* Where f's value lies: in layer (IN_LAYER fields) or in top. */
void *config_field_value(const config_field *f, clkvq_layer_config *layer, config_top *top);
const void *config_field_cvalue(const config_field *f, const clkvq_layer_config *layer,
                                const config_top *top);

/* ---- what the kind of a field says */

/* What a YAML value of f must be ("a number of bits"), for messages. */
const char *config_field_expect(const config_field *f);
/* 1 when f's value is one plain YAML scalar (not PERM). */
int config_field_is_scalar(const config_field *f);
/* 1 when the value may need quoting in YAML (free text). */
int config_field_is_text(const config_field *f);
/* 1 when the value is memory the holder owns (TEXT, PERM): copied by
 * moving, never by config_fields_apply. */
int config_field_owns(const config_field *f);

typedef enum { CONFIG_VALUE_OK, CONFIG_VALUE_BAD, CONFIG_VALUE_NOMEM } config_value_result;

/* A scalar's text into f's value; BAD puts the reason, e.g. "'5' is not in
 * the format table (8, 4, 3, 2, 1.5 bits)", into why. Under the C locale. */
config_value_result config_field_parse(const config_field *f, const char *text, void *value,
                                       char *why, size_t why_size);
/* A scalar's value as YAML text (the shortest float that reads back the
 * same), snprintf's way: the length it needs, cut to fit size. Under the
 * C locale. */
int config_field_format(const config_field *f, const void *value, char *text, size_t size);
/* 0 when a scalar value is out of its range, the reason in why, e.g.
 * "group_size: 48 is not a multiple of 32". */
int config_field_check(const config_field *f, const void *value, char *why, size_t why_size);
/* 1 when a top-level value is there to be written (not NULL, "" or 0). */
int config_field_present(const config_field *f, const void *value);
/* Frees an owned value (TEXT, PERM) and leaves NULL; nothing for others. */
void config_field_release(const config_field *f, void *value);
/* The value from src to dst, leaving src zero (so an owned value moves). */
void config_field_move(const config_field *f, void *dst, void *src);

/* ---- whole layers */

/* dst's fields in `given` (bit i: config_fields[i]) from src, except owned
 * values (perms). */
void config_fields_apply(clkvq_layer_config *dst, const clkvq_layer_config *src, unsigned given);
/* When c's scheme differs from `was`, the fields that follow the scheme
 * and are not in `given` take the scheme's defaults. */
void config_fields_scheme_defaults(clkvq_layer_config *c, clkvq_scheme was, unsigned given);
/* 1 when c has any perm. */
int config_has_perm(const clkvq_layer_config *c);
/* Every scalar layer field of c in range; 0 and the reason when not. */
int config_fields_check(const clkvq_layer_config *c, char *why, size_t why_size);
/* The settings of c's scheme that the kv cache would refuse together
 * ("window/n_sink are skvq settings, ..."); 0 and the reason when any. */
int config_layer_rules(const clkvq_layer_config *c, char *why, size_t why_size);

/* ---- numbers */

/* A whole decimal integer in lo..hi ("+" / "-" allowed, nothing else). */
int config_parse_long(const char *text, long lo, long hi, long *out);
/* What a format counts as in average bits (1.5 for ternary). */
double config_format_bits(clkvq_format f);

/* strtod and printf follow the caller's LC_NUMERIC ("0,92" under de_DE);
 * configs always use '.', so conversions run under the C locale of this
 * thread only (uselocale), leaving the application's locale alone. */
typedef struct {
    locale_t c, old;
} config_c_numeric;

void config_c_numeric_enter(config_c_numeric *s);
void config_c_numeric_leave(config_c_numeric *s);

#endif

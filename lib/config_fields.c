/*
 * The field table of precision configs and the handlers of each kind of
 * value: text -> value (reader), value -> text (writer), range checks of
 * values built in memory, and copying values between layers.
 */
#include "config_fields.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Enum values are read and written as int. */
_Static_assert(sizeof(clkvq_scheme) == sizeof(int) && sizeof(clkvq_param_type) == sizeof(int) &&
                   sizeof(clkvq_zero_mode) == sizeof(int) && sizeof(clkvq_format) == sizeof(int),
               "config enums are int-sized");
_Static_assert(CLKVQ_PARAM_FP16 == 0 && CLKVQ_PARAM_FP8_E4M3 == 1 && CLKVQ_ZERO_FLOAT == 0 &&
                   CLKVQ_ZERO_INT == 1,
               "param_type and zero_mode names are indexed by value");

static const char *scheme_name(int v) { return clkvq_scheme_name((clkvq_scheme)v); }

static const char *param_name(int v)
{
    static const char *const names[] = {"fp16", "fp8"};
    return names[v];
}

static const char *zero_name(int v)
{
    static const char *const names[] = {"float", "int"};
    return names[v];
}

/* ------------------------------------------------------------ the table */

#define LAYER_AT(m) \
    .offset = offsetof(clkvq_layer_config, m), .size = sizeof(((clkvq_layer_config *)0)->m)
#define TOP_AT(m) .offset = offsetof(config_top, m), .size = sizeof(((config_top *)0)->m)
#define ANY_LAYER (CONFIG_IN_TOP | CONFIG_IN_LAYER) /* per layer, or every layer's default */

/* In the order files are written and fields listed in messages. */
const config_field config_fields[] = {
    {.name = "model", .kind = CONFIG_KIND_TEXT, .scopes = CONFIG_IN_TOP, TOP_AT(model)},
    {.name = "n_q_heads", .kind = CONFIG_KIND_INT, .scopes = CONFIG_IN_TOP, TOP_AT(n_q_heads),
     .lo = 1, .hi = MAX_HEADS},
    {.name = "n_kv_heads", .kind = CONFIG_KIND_INT, .scopes = CONFIG_IN_TOP, TOP_AT(n_kv_heads),
     .lo = 1, .hi = MAX_HEADS},
    {.name = "head_dim", .kind = CONFIG_KIND_INT, .scopes = CONFIG_IN_TOP, TOP_AT(head_dim),
     .lo = 1, .hi = MAX_HEAD_DIM},
    {.name = "nbits_key", .kind = CONFIG_KIND_BITS, .scopes = ANY_LAYER | CONFIG_IN_HEAD,
     LAYER_AT(format_k)},
    {.name = "nbits_value", .kind = CONFIG_KIND_BITS, .scopes = ANY_LAYER | CONFIG_IN_HEAD,
     LAYER_AT(format_v)},
    {.name = "scheme", .kind = CONFIG_KIND_ENUM, .scopes = ANY_LAYER, LAYER_AT(scheme),
     .name_of = scheme_name, .count = CLKVQ_SCHEME_COUNT},
    {.name = "group_size", .kind = CONFIG_KIND_INT, .scopes = ANY_LAYER, .follows_scheme = 1,
     LAYER_AT(group_size), .lo = 32, .hi = MAX_HEAD_DIM, .multiple = 32},
    {.name = "clip_k", .kind = CONFIG_KIND_CLIP, .scopes = ANY_LAYER, LAYER_AT(clip_k)},
    {.name = "clip_v", .kind = CONFIG_KIND_CLIP, .scopes = ANY_LAYER, LAYER_AT(clip_v)},
    {.name = "window", .kind = CONFIG_KIND_INT, .scopes = ANY_LAYER, .follows_scheme = 1,
     LAYER_AT(window), .lo = 0, .hi = INT_MAX},
    {.name = "n_sink", .kind = CONFIG_KIND_INT, .scopes = ANY_LAYER, .follows_scheme = 1,
     LAYER_AT(n_sink), .lo = 0, .hi = INT_MAX},
    {.name = "residual", .kind = CONFIG_KIND_INT, .scopes = ANY_LAYER, .follows_scheme = 1,
     LAYER_AT(residual), .lo = 0, .hi = INT_MAX},
    {.name = "param_type", .kind = CONFIG_KIND_ENUM, .scopes = ANY_LAYER, LAYER_AT(param_type),
     .name_of = param_name, .count = 2},
    {.name = "zero_mode", .kind = CONFIG_KIND_ENUM, .scopes = ANY_LAYER, LAYER_AT(zero_mode),
     .name_of = zero_name, .count = 2},
    {.name = "perm_k", .kind = CONFIG_KIND_PERM, .scopes = ANY_LAYER, LAYER_AT(perm_k),
     .slot = 0},
    {.name = "perm_v", .kind = CONFIG_KIND_PERM, .scopes = ANY_LAYER, LAYER_AT(perm_v),
     .slot = 1},
};

const int config_field_count = (int)(sizeof config_fields / sizeof config_fields[0]);

_Static_assert(sizeof config_fields / sizeof config_fields[0] <= CONFIG_FIELD_MAX,
               "field sets keep one bit per field");

const config_field *config_field_find(const char *name)
{
    for (int i = 0; i < config_field_count; i++)
        if (!strcmp(name, config_fields[i].name))
            return &config_fields[i];
    return NULL;
}

/* Appends text to buf (always terminated, cut when full). */
static void append(char *buf, size_t size, const char *text)
{
    size_t used = strlen(buf);
    if (used + 1 < size)
        snprintf(buf + used, size - used, "%s", text);
}

void config_field_names(unsigned scope, config_kind kind, const char *sep, char *buf,
                        size_t size)
{
    buf[0] = '\0';
    int n = 0;
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        if (!(f->scopes & scope) || (kind != CONFIG_KIND_COUNT && f->kind != kind))
            continue;
        if (n++)
            append(buf, size, sep);
        append(buf, size, f->name);
    }
}

void *config_field_value(const config_field *f, clkvq_layer_config *layer, config_top *top)
{
    return (char *)(f->scopes & CONFIG_IN_LAYER ? (void *)layer : (void *)top) + f->offset;
}

const void *config_field_cvalue(const config_field *f, const clkvq_layer_config *layer,
                                const config_top *top)
{
    return (const char *)(f->scopes & CONFIG_IN_LAYER ? (const void *)layer : (const void *)top) +
           f->offset;
}

/* ------------------------------------------------------------ numbers */

void config_c_numeric_enter(config_c_numeric *s)
{
    s->c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    s->old = s->c ? uselocale(s->c) : (locale_t)0;
}

void config_c_numeric_leave(config_c_numeric *s)
{
    if (s->c) {
        uselocale(s->old);
        freelocale(s->c);
    }
}

int config_parse_long(const char *text, long lo, long hi, long *out)
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

double config_format_bits(clkvq_format f) { return atof(clkvq_format_get(f)->bits_name); }

/* ------------------------------------------------------------ kinds */

static int get_int(const void *value)
{
    int v;
    memcpy(&v, value, sizeof v);
    return v;
}

static void set_int(void *value, int v) { memcpy(value, &v, sizeof v); }

/* ---- bits: the format table's bits_name, compared as numbers ("8.0" is 8) */

static void bits_names(char *buf, size_t size)
{
    buf[0] = '\0';
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++) {
        if (f)
            append(buf, size, ", ");
        append(buf, size, clkvq_format_get((clkvq_format)f)->bits_name);
    }
}

static config_value_result bits_parse(const config_field *f, const char *text, void *value,
                                      char *why, size_t n)
{
    (void)f;
    double v = 0.0;
    if (parse_double(text, &v))
        for (int fmt = 0; fmt < CLKVQ_FMT_COUNT; fmt++)
            if (v == config_format_bits((clkvq_format)fmt)) {
                set_int(value, fmt);
                return CONFIG_VALUE_OK;
            }
    char names[64];
    bits_names(names, sizeof names);
    snprintf(why, n, "'%s' is not in the format table (%s bits)", text, names);
    return CONFIG_VALUE_BAD;
}

static int bits_format(const config_field *f, const void *value, char *text, size_t n)
{
    (void)f;
    return snprintf(text, n, "%s", clkvq_format_get((clkvq_format)get_int(value))->bits_name);
}

static int bits_check(const config_field *f, const void *value, char *why, size_t n)
{
    int v = get_int(value);
    if (v >= 0 && v < CLKVQ_FMT_COUNT)
        return 1;
    char names[64];
    bits_names(names, sizeof names);
    snprintf(why, n, "%s: format %d is not in the format table (%s bits)", f->name, v, names);
    return 0;
}

/* ---- int */

static config_value_result int_parse(const config_field *f, const char *text, void *value,
                                     char *why, size_t n)
{
    long v;
    if (!config_parse_long(text, f->lo, f->hi, &v)) {
        snprintf(why, n, "'%s' is not an integer in %ld..%ld", text, f->lo, f->hi);
        return CONFIG_VALUE_BAD;
    }
    if (f->multiple && v % f->multiple) {
        snprintf(why, n, "%ld is not a multiple of %d", v, f->multiple);
        return CONFIG_VALUE_BAD;
    }
    set_int(value, (int)v);
    return CONFIG_VALUE_OK;
}

static int int_format(const config_field *f, const void *value, char *text, size_t n)
{
    (void)f;
    return snprintf(text, n, "%d", get_int(value));
}

static int int_check(const config_field *f, const void *value, char *why, size_t n)
{
    int v = get_int(value);
    if (v < f->lo || v > f->hi)
        snprintf(why, n, "%s: %d is not in %ld..%ld", f->name, v, f->lo, f->hi);
    else if (f->multiple && v % f->multiple)
        snprintf(why, n, "%s: %d is not a multiple of %d", f->name, v, f->multiple);
    else
        return 1;
    return 0;
}

/* ---- clip ratio */

static int clip_ok(float v) { return v > 0.0f && v <= 1.0f; }

static config_value_result clip_parse(const config_field *f, const char *text, void *value,
                                      char *why, size_t n)
{
    (void)f;
    float v;
    if (!parse_float(text, &v) || !clip_ok(v)) {
        snprintf(why, n, "'%s' is not a clip ratio in (0, 1]", text);
        return CONFIG_VALUE_BAD;
    }
    memcpy(value, &v, sizeof v);
    return CONFIG_VALUE_OK;
}

/* The shortest text that reads back as the same float. */
static int clip_format(const config_field *f, const void *value, char *text, size_t n)
{
    (void)f;
    float v;
    memcpy(&v, value, sizeof v);
    char buf[32];
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, (double)v);
        if (strtof(buf, NULL) == v)
            break;
    }
    return snprintf(text, n, "%s", buf);
}

static int clip_check(const config_field *f, const void *value, char *why, size_t n)
{
    float v;
    memcpy(&v, value, sizeof v);
    if (clip_ok(v))
        return 1;
    snprintf(why, n, "%s: %g is not a clip ratio in (0, 1]", f->name, (double)v);
    return 0;
}

/* ---- enum: one of f->name_of(0 .. count-1), case-insensitive */

static void enum_names(const config_field *f, char *buf, size_t size)
{
    buf[0] = '\0';
    for (int i = 0; i < f->count; i++) {
        if (i)
            append(buf, size, ", ");
        append(buf, size, f->name_of(i));
    }
}

static config_value_result enum_parse(const config_field *f, const char *text, void *value,
                                      char *why, size_t n)
{
    for (int i = 0; i < f->count; i++)
        if (!strcasecmp(text, f->name_of(i))) {
            set_int(value, i);
            return CONFIG_VALUE_OK;
        }
    char names[128];
    enum_names(f, names, sizeof names);
    snprintf(why, n, "'%s' is not one of %s", text, names);
    return CONFIG_VALUE_BAD;
}

static int enum_format(const config_field *f, const void *value, char *text, size_t n)
{
    return snprintf(text, n, "%s", f->name_of(get_int(value)));
}

static int enum_check(const config_field *f, const void *value, char *why, size_t n)
{
    int v = get_int(value);
    if (v >= 0 && v < f->count)
        return 1;
    char names[128];
    enum_names(f, names, sizeof names);
    snprintf(why, n, "%s: %d is not one of %s (0..%d)", f->name, v, names, f->count - 1);
    return 0;
}

/* ---- text */

static char *get_ptr(const void *value)
{
    char *p;
    memcpy(&p, value, sizeof p);
    return p;
}

static config_value_result text_parse(const config_field *f, const char *text, void *value,
                                      char *why, size_t n)
{
    (void)f;
    char *copy = strdup(text);
    if (!copy) {
        snprintf(why, n, "out of memory");
        return CONFIG_VALUE_NOMEM;
    }
    free(get_ptr(value));
    memcpy(value, &copy, sizeof copy);
    return CONFIG_VALUE_OK;
}

static int text_format(const config_field *f, const void *value, char *text, size_t n)
{
    (void)f;
    const char *v = get_ptr(value);
    return snprintf(text, n, "%s", v ? v : "");
}

/* ---- the kind table */

typedef struct {
    const char *expect; /* what the YAML value must be */
    int owns;           /* a pointer its holder frees */
    int text;           /* free text: the writer lets libyaml quote it */
    config_value_result (*parse)(const config_field *, const char *, void *, char *, size_t);
    int (*format)(const config_field *, const void *, char *, size_t);
    int (*check)(const config_field *, const void *, char *, size_t);
} kind_ops;

/* PERM is a nested sequence, read and written by the YAML modules; its
 * check needs the perm's shape (clkvq_config_create). */
static const kind_ops g_kinds[CONFIG_KIND_COUNT] = {
    [CONFIG_KIND_BITS] = {"a number of bits", 0, 0, bits_parse, bits_format, bits_check},
    [CONFIG_KIND_INT] = {"an integer", 0, 0, int_parse, int_format, int_check},
    [CONFIG_KIND_CLIP] = {"a number", 0, 0, clip_parse, clip_format, clip_check},
    [CONFIG_KIND_ENUM] = {"a name", 0, 0, enum_parse, enum_format, enum_check},
    [CONFIG_KIND_TEXT] = {"a string", 1, 1, text_parse, text_format, NULL},
    [CONFIG_KIND_PERM] = {"a sequence (one per kv head)", 1, 0, NULL, NULL, NULL},
};

const char *config_field_expect(const config_field *f) { return g_kinds[f->kind].expect; }

int config_field_is_scalar(const config_field *f) { return g_kinds[f->kind].parse != NULL; }

int config_field_is_text(const config_field *f) { return g_kinds[f->kind].text; }

int config_field_owns(const config_field *f) { return g_kinds[f->kind].owns; }

config_value_result config_field_parse(const config_field *f, const char *text, void *value,
                                       char *why, size_t why_size)
{
    return g_kinds[f->kind].parse(f, text, value, why, why_size);
}

int config_field_format(const config_field *f, const void *value, char *text, size_t size)
{
    return g_kinds[f->kind].format(f, value, text, size);
}

int config_field_check(const config_field *f, const void *value, char *why, size_t why_size)
{
    return !g_kinds[f->kind].check || g_kinds[f->kind].check(f, value, why, why_size);
}

int config_field_present(const config_field *f, const void *value)
{
    if (g_kinds[f->kind].owns) {
        const char *p = get_ptr(value);
        return p && (f->kind != CONFIG_KIND_TEXT || *p);
    }
    return f->kind != CONFIG_KIND_INT || get_int(value) != 0;
}

void config_field_release(const config_field *f, void *value)
{
    if (!g_kinds[f->kind].owns)
        return;
    free(get_ptr(value));
    memset(value, 0, f->size);
}

void config_field_move(const config_field *f, void *dst, void *src)
{
    memcpy(dst, src, f->size);
    memset(src, 0, f->size);
}

/* ------------------------------------------------------------ layers */

void config_fields_apply(clkvq_layer_config *dst, const clkvq_layer_config *src, unsigned given)
{
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        if ((given >> i & 1u) && (f->scopes & CONFIG_IN_LAYER) && !config_field_owns(f))
            memcpy((char *)dst + f->offset, (const char *)src + f->offset, f->size);
    }
}

void config_fields_scheme_defaults(clkvq_layer_config *c, clkvq_scheme was, unsigned given)
{
    if (c->scheme == was)
        return;
    clkvq_layer_config sd = clkvq_layer_config_default(c->scheme);
    for (int i = 0; i < config_field_count; i++)
        if (config_fields[i].follows_scheme && !(given >> i & 1u))
            memcpy((char *)c + config_fields[i].offset, (const char *)&sd + config_fields[i].offset,
                   config_fields[i].size);
}

int config_has_perm(const clkvq_layer_config *c)
{
    for (int i = 0; i < config_field_count; i++)
        if (config_fields[i].kind == CONFIG_KIND_PERM &&
            *(const int32_t *const *)config_field_cvalue(&config_fields[i], c, NULL))
            return 1;
    return 0;
}

int config_fields_check(const clkvq_layer_config *c, char *why, size_t why_size)
{
    for (int i = 0; i < config_field_count; i++) {
        const config_field *f = &config_fields[i];
        if ((f->scopes & CONFIG_IN_LAYER) &&
            !config_field_check(f, config_field_cvalue(f, c, NULL), why, why_size))
            return 0;
    }
    return 1;
}

int config_layer_rules(const clkvq_layer_config *c, char *why, size_t n)
{
    const char *s = clkvq_scheme_name(c->scheme);
    if (c->scheme != CLKVQ_SCHEME_SKVQ && (c->window || c->n_sink))
        snprintf(why, n, "window/n_sink are skvq settings, scheme %s has none", s);
    else if (c->scheme != CLKVQ_SCHEME_KIVI && c->residual)
        snprintf(why, n, "residual is a kivi setting, scheme %s has none", s);
    else if (c->scheme == CLKVQ_SCHEME_KIVI && (c->residual <= 0 || c->residual % c->group_size))
        snprintf(why, n, "kivi residual %d must be a positive multiple of group_size %d",
                 c->residual, c->group_size);
    else
        return 1;
    return 0;
}

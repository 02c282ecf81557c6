/*
 * clkvq-eval: attention-output accuracy of KV-cache schemes on a
 * calibration dump, measured through the library's own cache and decode
 * kernels (clkvq_eval_layer), one row per scheme.
 *
 *   clkvq-eval --calib FILE --scheme SPEC [--scheme SPEC ...] [--config FILE]
 *              [--fit FILE] [--queries M] [--per-layer] [--json] [--device D]
 *
 * Aggregates over layers: errors as sqrt(sum num / sum den) (every layer's
 * squared error over every layer's squared reference, from the sums
 * clkvq_eval_result carries, so a layer counts by its share of the signal,
 * not by its ratio), cosine and bits as means (every layer has the same
 * number of elements and (head, query) pairs). The layer precision search
 * minimizes exactly this pooled error.
 *
 * Rows that fit something (calib, perm, center) fit it per layer with
 * clkvq_calibrate_layer: on the evaluated dump itself (in-sample, an
 * optimistic number) or, with --fit FILE, on another dump of the same
 * model (out of sample).
 *
 * Public API only: this is what a user of the installed library can run.
 * Exit status: 0 done, 1 a library/IO failure, 2 a usage error.
 */
#include "clkvq.h"
#include "cli_parse.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 64

typedef struct {
    double bits, bits_long, num, den, cos, k_num, k_den, v_num, v_den;
    float clip_k, clip_v; /* what the layer ran with (fitted rows: found) */
} layer_result;

typedef struct {
    char name[256];
    clkvq_layer_config base; /* spec rows; rot_seed is layer 0's (layer l: + l) */
    unsigned fit;            /* CLKVQ_FIT_* the spec asks for (calib, perm, center) */
    int have_group;          /* gN given; else skvq takes min(128, head_dim) */
    clkvq_precision_config *config; /* --config rows */
    layer_result *layers;
} eval_row;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: clkvq-eval --calib FILE --scheme SPEC [--scheme SPEC ...] [--config FILE]\n"
            "                  [--config-scheme SPEC] [--fit FILE] [--queries M] [--per-layer]\n"
            "                  [--json] [--device D]\n"
            "Attention-output error of KV-cache schemes on a calibration dump (layers.<i>.q/k/v),\n"
            "through the library's cache and fused decode kernels, against fp64 attention over\n"
            "the original K/V, for the last M positions of every layer.\n"
            "\n"
            "SPEC: SCHEME[:FIELD]... with SCHEME fp16 | token | kivi | skvq, fields:\n"
            "  kBvB     key and value bits, B in 8, 4, 3, 2, 1.5   (default k4v4)\n"
            "  gN       group size, a multiple of 32 (token/kivi 32, skvq min(128, head_dim))\n"
            "  rN       kivi residual R, a multiple of the group    (default 128)\n"
            "  wN       skvq fp16 window of recent tokens           (default 128)\n"
            "  sN       skvq fp16 attention sinks (first tokens)    (default 5)\n"
            "  kc       skvq: keys per channel in blocks of N tokens (KIVI's key groups) inside\n"
            "           the sinks/window layout; values stay per token\n"
            "  fp8      scale/zero as fp8 e4m3 instead of fp16\n"
            "  int      integer zero point (KVTuner) instead of a float one\n"
            "  aX       clip ratio X in (0, 1] for K and V (default 1)\n"
            "  rot[S]   randomized Walsh-Hadamard rotation per kv head, signs from seed S\n"
            "           (default 0) plus the layer index\n"
            "  center   subtract per-channel means (fitted): values, and keys unless they are\n"
            "           grouped per channel (kivi, kc), where the zero point already holds them\n"
            "  calib    clip per layer, K and V apart, by reconstruction MSE over 0.40..1.00\n"
            "           step 0.02 on the rows as stored (centered, rotated, permuted)\n"
            "  perm     channel permutation per layer (range-sorted groups, per-token tensors)\n"
            "  calib, perm and center are fitted per layer (clkvq_calibrate_layer) on this dump\n"
            "  (in-sample, optimistic) or, with --fit, on another (out of sample)\n"
            "  e.g. fp16  token:k4v4:g32  kivi:k2v2:g32:r128  skvq:k2v1.5:w128:s5:a0.92\n"
            "       skvq:k2v2:g32:w128:s5:rot:calib  skvq:k2v1.5:g32:w128:s5:rot:calib\n"
            "       skvq:k3v2:g32:w128:s5:fp8:rot:calib\n"
            "       skvq:k3v2:g32:w128:s5:kc:fp8:center:calib   (per-channel 3-bit keys, centered\n"
            "                                                   2-bit values: bits_long 3.0)\n"
            "\n"
            "  --calib FILE          the dump evaluated on (safetensors, F32/F16/BF16)\n"
            "  --scheme SPEC         a row (repeatable)\n"
            "  --config FILE         a layer precision config (YAML) as one more row named after\n"
            "                        the file, each layer with its own settings (repeatable)\n"
            "  --config-scheme SPEC  what the config leaves out (default: token defaults)\n"
            "  --fit FILE            fit calib/perm/center on this dump instead (same layers,\n"
            "                        kv heads and head_dim; another text): out of sample\n"
            "  --queries M           evaluated positions per layer (default %d)\n"
            "  --per-layer           a row per layer too\n"
            "  --json                one JSON object instead of a Markdown table\n"
            "  --device D            OpenCL device: index or name substring ($CLKVQ_DEVICE)\n"
            "Columns: bits/elem = storage at this length (packed codes + params + fp16 sinks,\n"
            "window, residual); bits_long = as the context grows without bound (packed only).\n"
            "Exit status: 0 ok, 1 library or I/O failure, 2 usage error.\n",
            CLKVQ_DEFAULT_QUERIES);
}

/* ------------------------------------------------------------ SPEC */

static int parse_positive(const char *text, const char *spec, const char *what, int *out)
{
    long v;
    if (cli_long(text, 1, 1L << 24, &v)) {
        fprintf(stderr, "clkvq-eval: scheme '%s': %s '%s' is not an integer in [1, %ld]\n", spec,
                what, text, 1L << 24);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* "k2v1.5" -> formats */
static int parse_bits(const char *field, const char *spec, clkvq_format *fk, clkvq_format *fv)
{
    const char *vpos = strchr(field, 'v');
    char kbits[16];
    size_t klen = vpos ? (size_t)(vpos - field - 1) : 0;
    if (!vpos || klen == 0 || klen >= sizeof kbits) {
        fprintf(stderr, "clkvq-eval: scheme '%s': bits field '%s' is not kBvB (e.g. k4v2)\n",
                spec, field);
        return -1;
    }
    memcpy(kbits, field + 1, klen);
    kbits[klen] = '\0';
    /* only bit counts here: "q4" style names would read as fields */
    if (strchr(kbits, 'q') || strchr(vpos + 1, 'q') || clkvq_format_parse(kbits, fk) != CLKVQ_OK ||
        clkvq_format_parse(vpos + 1, fv) != CLKVQ_OK) {
        fprintf(stderr, "clkvq-eval: scheme '%s': bits in '%s' must be 8, 4, 3, 2 or 1.5\n", spec,
                field);
        return -1;
    }
    return 0;
}

/* A field that takes no value and belongs to some schemes: 0, or -1
 * after saying why not. */
static int scheme_field_ok(const char *spec, const char *field, int ok, const char *schemes)
{
    if (ok)
        return 0;
    fprintf(stderr, "clkvq-eval: scheme '%s': %s is a%s %s field\n", spec, field,
            schemes[0] == 's' ? "n" : "", schemes);
    return -1;
}

static int parse_spec(const char *spec, eval_row *row)
{
    char buf[256];
    if (strlen(spec) >= sizeof buf) {
        fprintf(stderr, "clkvq-eval: scheme '%.40s...' is too long\n", spec);
        return -1;
    }
    strcpy(buf, spec);
    char *save = NULL, *field = strtok_r(buf, ":", &save);
    clkvq_scheme scheme;
    if (!field || clkvq_scheme_parse(field, &scheme) != CLKVQ_OK) {
        fprintf(stderr, "clkvq-eval: scheme '%s': '%s' is not fp16, token, kivi or skvq\n", spec,
                field ? field : "");
        return -1;
    }
    clkvq_layer_config lc = clkvq_layer_config_default(scheme);
    int have_clip = 0, center = 0;
    row->fit = 0;
    row->have_group = 0;
    while ((field = strtok_r(NULL, ":", &save))) {
        int is_skvq = scheme == CLKVQ_SCHEME_SKVQ, n;
        if (scheme == CLKVQ_SCHEME_FP16) {
            fprintf(stderr, "clkvq-eval: scheme '%s': fp16 takes no fields ('%s')\n", spec, field);
            return -1;
        }
        if (!strcmp(field, "fp8")) {
            lc.param_type = CLKVQ_PARAM_FP8_E4M3;
        } else if (!strcmp(field, "int")) {
            lc.zero_mode = CLKVQ_ZERO_INT;
        } else if (!strcmp(field, "calib")) {
            row->fit |= CLKVQ_FIT_CLIP;
        } else if (!strcmp(field, "perm")) {
            row->fit |= CLKVQ_FIT_PERM;
        } else if (!strcmp(field, "center")) {
            center = 1;
        } else if (!strcmp(field, "kc")) {
            if (scheme_field_ok(spec, "kc", is_skvq, "skvq"))
                return -1;
            lc.key_axis = CLKVQ_AXIS_CHANNEL;
        } else if (!strncmp(field, "rot", 3)) {
            uint64_t seed = 0;
            if (field[3] && (cli_u64(field + 3, &seed) || seed > UINT32_MAX)) {
                fprintf(stderr, "clkvq-eval: scheme '%s': rotation seed '%s' is not an integer "
                                "in [0, 4294967295]\n",
                        spec, field + 3);
                return -1;
            }
            lc.rotate = 1;
            lc.rot_seed = (uint32_t)seed;
        } else if (field[0] == 'k') {
            if (parse_bits(field, spec, &lc.format_k, &lc.format_v))
                return -1;
        } else if (field[0] == 'g') {
            if (parse_positive(field + 1, spec, "group", &lc.group_size))
                return -1;
            row->have_group = 1;
        } else if (field[0] == 'r' || field[0] == 'w' || field[0] == 's') {
            const char *what = field[0] == 'r' ? "residual" : field[0] == 'w' ? "window" : "sinks";
            int ok_scheme = field[0] == 'r' ? scheme == CLKVQ_SCHEME_KIVI : is_skvq;
            if (!ok_scheme) {
                fprintf(stderr, "clkvq-eval: scheme '%s': %s ('%c') is a%s field\n", spec, what,
                        field[0], field[0] == 'r' ? " kivi" : "n skvq");
                return -1;
            }
            /* window and sinks may be 0 (no fp16 part) */
            if (field[0] != 'r' && !strcmp(field + 1, "0"))
                n = 0;
            else if (parse_positive(field + 1, spec, what, &n))
                return -1;
            *(field[0] == 'r' ? &lc.residual : field[0] == 'w' ? &lc.window : &lc.n_sink) = n;
        } else if (field[0] == 'a') {
            double a;
            if (cli_double(field + 1, 0.0, 1.0, &a) || a == 0.0) {
                fprintf(stderr, "clkvq-eval: scheme '%s': clip '%s' must be in (0, 1]\n", spec,
                        field + 1);
                return -1;
            }
            lc.clip_k = lc.clip_v = (float)a;
            have_clip = 1;
        } else {
            fprintf(stderr, "clkvq-eval: scheme '%s': unknown field '%s' (see --help)\n", spec,
                    field);
            return -1;
        }
    }
    if (have_clip && (row->fit & CLKVQ_FIT_CLIP)) {
        fprintf(stderr, "clkvq-eval: scheme '%s': aX fixes the clip, calib fits it: pick one\n",
                spec);
        return -1;
    }
    /* keys grouped per channel keep their offsets in the zero points */
    int channel_keys = scheme == CLKVQ_SCHEME_KIVI || lc.key_axis == CLKVQ_AXIS_CHANNEL;
    if (center)
        row->fit |= CLKVQ_FIT_MEAN_V | (channel_keys ? 0u : (unsigned)CLKVQ_FIT_MEAN_K);
    row->base = lc;
    return 0;
}

/* ------------------------------------------------------------ evaluation */

static void aggregate(const eval_row *row, int n_layers, layer_result *out)
{
    memset(out, 0, sizeof *out);
    for (int l = 0; l < n_layers; l++) {
        const layer_result *r = &row->layers[l];
        out->bits += r->bits / n_layers;
        out->bits_long += r->bits_long / n_layers;
        out->cos += r->cos / n_layers;
        out->num += r->num;
        out->den += r->den;
        out->k_num += r->k_num;
        out->k_den += r->k_den;
        out->v_num += r->v_num;
        out->v_den += r->v_den;
    }
}

static double ratio(double num, double den) { return den > 0.0 ? sqrt(num / den) : sqrt(num); }

/* What a row's fits are: "-" (none), "in-sample" or "out-of-sample". */
static const char *fit_kind(const eval_row *row, const char *fit_path)
{
    return !row->fit ? "-" : fit_path ? "out-of-sample" : "in-sample";
}

/* ------------------------------------------------------------ output */

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void json_numbers(const layer_result *r)
{
    printf("\"bits_per_element\": %.6f, \"bits_long\": %.6f, \"rel_err\": %.6e, "
           "\"cosine\": %.9f, \"k_rel_err\": %.6e, \"v_rel_err\": %.6e",
           r->bits, r->bits_long, ratio(r->num, r->den), r->cos, ratio(r->k_num, r->k_den),
           ratio(r->v_num, r->v_den));
}

static void print_json(const char *calib, const char *fit_path, const clkvq_dump_info *info,
                       int n_queries, const eval_row *rows, int n_rows, int per_layer)
{
    printf("{\"calib\": ");
    json_string(calib);
    printf(", \"fit\": ");
    if (fit_path)
        json_string(fit_path);
    else
        printf("null");
    printf(", \"model\": ");
    json_string(info->model);
    printf(", \"n_layers\": %d, \"n_tokens\": %d, \"n_q_heads\": %d, \"n_kv_heads\": %d, "
           "\"head_dim\": %d, \"queries\": %d,\n \"results\": [",
           info->n_layers, info->n_tokens, info->n_q_heads, info->n_kv_heads, info->head_dim,
           n_queries);
    for (int i = 0; i < n_rows; i++) {
        layer_result all;
        aggregate(&rows[i], info->n_layers, &all);
        printf("%s\n  {\"scheme\": ", i ? "," : "");
        json_string(rows[i].name);
        printf(", ");
        json_numbers(&all);
        printf(", \"fitted\": ");
        json_string(fit_kind(&rows[i], fit_path));
        printf(", \"in_sample\": %s", rows[i].fit && !fit_path ? "true" : "false");
        if (per_layer) {
            printf(",\n   \"layers\": [");
            for (int l = 0; l < info->n_layers; l++) {
                const layer_result *r = &rows[i].layers[l];
                printf("%s\n    {\"layer\": %d, ", l ? "," : "", l);
                json_numbers(r);
                printf(", \"clip_k\": %.6g, \"clip_v\": %.6g}", (double)r->clip_k,
                       (double)r->clip_v);
            }
            printf("]");
        }
        printf("}");
    }
    printf("]}\n");
}

static void print_row(const char *name, const char *fit, const char *layer,
                      const layer_result *r, int per_layer)
{
    printf("| %-40s | %-13s |", name, fit);
    if (per_layer)
        printf(" %5s |", layer);
    printf(" %9.4f | %9.4f | %9.3e | %9.6f | %9.3e | %9.3e |\n", r->bits, r->bits_long,
           ratio(r->num, r->den), r->cos, ratio(r->k_num, r->k_den), ratio(r->v_num, r->v_den));
}

static void print_table(const char *calib, const char *fit_path, const clkvq_dump_info *info,
                        int n_queries, const eval_row *rows, int n_rows, int per_layer)
{
    int any_fit = 0;
    for (int i = 0; i < n_rows; i++)
        any_fit |= rows[i].fit != 0;
    printf("calib: %s (%s%s%d layers x %d tokens, %d q / %d kv heads, head_dim %d); last %d "
           "positions per layer decoded\n",
           calib, info->model, info->model[0] ? ", " : "", info->n_layers, info->n_tokens,
           info->n_q_heads, info->n_kv_heads, info->head_dim, n_queries);
    if (any_fit && fit_path)
        printf("note: calib/perm/center rows are fitted on %s: out of sample\n", fit_path);
    else if (any_fit)
        printf("note: calib/perm/center rows are fitted on this same dump: in-sample\n");
    printf("\n| %-40s | %-13s |", "scheme", "fit");
    if (per_layer)
        printf(" layer |");
    printf(" bits/elem | bits_long |   rel_err |    cosine | k_rel_err | v_rel_err |\n|:%s|:%s|",
           "-----------------------------------------", "-------------");
    if (per_layer)
        printf("------:|");
    printf("----------:|----------:|----------:|----------:|----------:|----------:|\n");
    for (int i = 0; i < n_rows; i++) {
        layer_result all;
        aggregate(&rows[i], info->n_layers, &all);
        const char *fit = fit_kind(&rows[i], fit_path);
        print_row(rows[i].name, fit, "all", &all, per_layer);
        if (per_layer)
            for (int l = 0; l < info->n_layers; l++) {
                char lname[16];
                snprintf(lname, sizeof lname, "%d", l);
                print_row(rows[i].name, fit, lname, &rows[i].layers[l], per_layer);
            }
    }
}

/* ------------------------------------------------------------ main */

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Layer l of a row: its config (spec rows: rotation seed + l), fitted when
 * the row asks, on fk/fv (n_fit tokens). Storage: 4 arrays of heads x dim. */
static clkvq_status row_layer(clkvq_context *ctx, const eval_row *row, int l,
                              const clkvq_dump_info *info, int n_fit, const float *fk,
                              const float *fv, float *store_f, int32_t *store_i,
                              clkvq_layer_config *lc)
{
    if (row->config)
        return clkvq_config_layer(row->config, l, lc);
    *lc = row->base;
    lc->rot_seed = row->base.rot_seed + (uint32_t)l; /* as a config's layers get them */
    if (!row->fit)
        return CLKVQ_OK;
    const size_t hd = (size_t)info->n_kv_heads * info->head_dim;
    clkvq_calib_options opt = {.fit = row->fit, .mean_k = store_f, .mean_v = store_f + hd,
                               .perm_k = store_i, .perm_v = store_i + hd};
    return clkvq_calibrate_layer(ctx, lc, info->n_kv_heads, n_fit, info->head_dim, fk, fv, &opt,
                                 lc);
}

int main(int argc, char **argv)
{
    const char *calib = NULL, *device = NULL, *config_scheme = NULL, *fit_path = NULL;
    const char *specs[MAX_ROWS], *configs[MAX_ROWS];
    int n_specs = 0, n_configs = 0, n_queries = CLKVQ_DEFAULT_QUERIES, per_layer = 0, json = 0;
    enum { OPT_CALIB = 256, OPT_SCHEME, OPT_CONFIG, OPT_CONFIG_SCHEME, OPT_FIT, OPT_QUERIES,
           OPT_PER_LAYER, OPT_JSON, OPT_DEVICE };
    static const struct option opts[] = {
        {"calib", required_argument, NULL, OPT_CALIB},
        {"scheme", required_argument, NULL, OPT_SCHEME},
        {"config", required_argument, NULL, OPT_CONFIG},
        {"config-scheme", required_argument, NULL, OPT_CONFIG_SCHEME},
        {"fit", required_argument, NULL, OPT_FIT},
        {"queries", required_argument, NULL, OPT_QUERIES},
        {"per-layer", no_argument, NULL, OPT_PER_LAYER},
        {"json", no_argument, NULL, OPT_JSON},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'h': usage(stdout); return 0;
        case OPT_CALIB: calib = optarg; break;
        case OPT_SCHEME:
        case OPT_CONFIG:
            if (n_specs + n_configs == MAX_ROWS) {
                fprintf(stderr, "clkvq-eval: at most %d rows\n", MAX_ROWS);
                return 2;
            }
            if (c == OPT_SCHEME)
                specs[n_specs++] = optarg;
            else
                configs[n_configs++] = optarg;
            break;
        case OPT_CONFIG_SCHEME: config_scheme = optarg; break;
        case OPT_FIT: fit_path = optarg; break;
        case OPT_QUERIES:
            if (cli_parse_int("clkvq-eval", "--queries", optarg, 1, 1 << 24, &n_queries))
                return 2;
            break;
        case OPT_PER_LAYER: per_layer = 1; break;
        case OPT_JSON: json = 1; break;
        case OPT_DEVICE: device = optarg; break;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc || !calib || n_specs + n_configs == 0) {
        fprintf(stderr, "clkvq-eval: %s\n",
                optind < argc ? "unexpected argument"
                : !calib      ? "--calib FILE is required"
                              : "give at least one --scheme or --config");
        usage(stderr);
        return 2;
    }

    /* Every SPEC is checked before anything is opened: a typo costs nothing. */
    eval_row rows[MAX_ROWS];
    memset(rows, 0, sizeof rows);
    int n_rows = 0;
    for (int i = 0; i < n_specs; i++, n_rows++) {
        if (parse_spec(specs[i], &rows[n_rows]))
            return 2;
        snprintf(rows[n_rows].name, sizeof rows[n_rows].name, "%s", specs[i]);
    }
    clkvq_layer_config config_defaults = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    if (config_scheme) {
        eval_row def;
        memset(&def, 0, sizeof def);
        if (parse_spec(config_scheme, &def))
            return 2;
        if (def.fit) {
            fprintf(stderr, "clkvq-eval: --config-scheme cannot fit (calib, perm, center): a "
                            "config carries its own clips, permutations and means\n");
            return 2;
        }
        config_defaults = def.base;
    }

    int rc = 1;
    clkvq_context *ctx = NULL;
    clkvq_kv_dump *dump = NULL, *fit_dump = NULL;
    float *q = NULL, *k = NULL, *v = NULL, *fk = NULL, *fv = NULL, *store_f = NULL;
    int32_t *store_i = NULL;
    clkvq_status st = clkvq_context_create(&ctx, device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-eval: %s: %s\n", clkvq_status_string(st), clkvq_last_error(NULL));
        return 1;
    }
    clkvq_dump_info info, fit_info;
    if ((st = clkvq_dump_open(ctx, calib, &dump)) != CLKVQ_OK ||
        (st = clkvq_dump_info_get(dump, &info)) != CLKVQ_OK)
        goto fail;
    fit_info = info;
    if (fit_path && ((st = clkvq_dump_open(ctx, fit_path, &fit_dump)) != CLKVQ_OK ||
                     (st = clkvq_dump_info_get(fit_dump, &fit_info)) != CLKVQ_OK))
        goto fail;
    if (fit_info.n_layers != info.n_layers || fit_info.n_kv_heads != info.n_kv_heads ||
        fit_info.head_dim != info.head_dim) {
        fprintf(stderr, "clkvq-eval: --fit %s has %d layers x %d kv heads x head_dim %d, --calib "
                        "%s %d x %d x %d: fit on a dump of the same model\n",
                fit_path, fit_info.n_layers, fit_info.n_kv_heads, fit_info.head_dim, calib,
                info.n_layers, info.n_kv_heads, info.head_dim);
        rc = 2;
        goto out;
    }
    if (n_queries > info.n_tokens) {
        fprintf(stderr, "clkvq-eval: --queries %d is more than the dump's %d tokens\n", n_queries,
                info.n_tokens);
        rc = 2;
        goto out;
    }
    /* skvq's group follows the head (min(128, head_dim)) unless given. A
     * SPEC the cache would refuse for this dump's shape (group vs head_dim,
     * residual vs group, ...) is a usage error: say so before an hour of
     * evaluation, with the cache's own reason. */
    for (int i = 0; i < n_rows; i++) {
        if (rows[i].base.scheme == CLKVQ_SCHEME_SKVQ && !rows[i].have_group)
            rows[i].base.group_size = info.head_dim < 128 ? info.head_dim : 128;
        clkvq_cache_config plan = {.n_layers = 1, .n_seqs = 1, .capacity = info.n_tokens,
                                   .n_kv_heads = info.n_kv_heads, .n_q_heads = info.n_q_heads,
                                   .head_dim = info.head_dim, .layout_k = CLKVQ_LAYOUT_AUTO,
                                   .layout_v = CLKVQ_LAYOUT_AUTO, .layers = &rows[i].base};
        clkvq_cache_memory mem;
        if (clkvq_cache_plan(ctx, &plan, &mem) != CLKVQ_OK) {
            fprintf(stderr, "clkvq-eval: scheme '%s': %s\n", rows[i].name, clkvq_last_error(ctx));
            rc = 2;
            goto out;
        }
    }
    for (int i = 0; i < n_configs; i++, n_rows++) {
        eval_row *row = &rows[n_rows];
        snprintf(row->name, sizeof row->name, "%s", base_name(configs[i]));
        if ((st = clkvq_config_load(ctx, configs[i], &config_defaults, &row->config)) !=
                CLKVQ_OK ||
            (st = clkvq_config_check_model(ctx, row->config, info.n_layers)) != CLKVQ_OK)
            goto fail;
        /* per-head bits run (one share per pair) when they name every kv head */
        for (int l = 0; l < info.n_layers; l++)
            if (clkvq_config_n_heads(row->config, l) > 0 &&
                clkvq_config_n_heads(row->config, l) != info.n_kv_heads) {
                fprintf(stderr, "clkvq-eval: %s: layer %d has bits for %d kv heads, the dump %d\n",
                        configs[i], l, clkvq_config_n_heads(row->config, l), info.n_kv_heads);
                goto out;
            }
    }
    for (int i = 0; i < n_rows; i++)
        if (!(rows[i].layers = calloc((size_t)info.n_layers, sizeof(layer_result)))) {
            st = CLKVQ_ERR_OUT_OF_MEMORY;
            goto fail;
        }

    const size_t q_count = (size_t)info.n_q_heads * info.n_tokens * info.head_dim;
    const size_t kv_count = (size_t)info.n_kv_heads * info.n_tokens * info.head_dim;
    const size_t fit_count = (size_t)info.n_kv_heads * fit_info.n_tokens * info.head_dim;
    const size_t hd = (size_t)info.n_kv_heads * info.head_dim;
    q = malloc(sizeof(float) * q_count);
    k = malloc(sizeof(float) * kv_count);
    v = malloc(sizeof(float) * kv_count);
    store_f = malloc(sizeof(float) * 2 * hd);
    store_i = malloc(sizeof(int32_t) * 2 * hd);
    if (fit_dump) {
        fk = malloc(sizeof(float) * fit_count);
        fv = malloc(sizeof(float) * fit_count);
    }
    if (!q || !k || !v || !store_f || !store_i || (fit_dump && (!fk || !fv))) {
        st = CLKVQ_ERR_OUT_OF_MEMORY;
        goto fail;
    }

    /* Layers outer: each layer's tensors are read once for every row. */
    for (int l = 0; l < info.n_layers; l++) {
        if ((st = clkvq_dump_read(dump, l, 'q', q)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'k', k)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'v', v)) != CLKVQ_OK)
            goto fail;
        if (fit_dump && ((st = clkvq_dump_read(fit_dump, l, 'k', fk)) != CLKVQ_OK ||
                         (st = clkvq_dump_read(fit_dump, l, 'v', fv)) != CLKVQ_OK))
            goto fail;
        for (int i = 0; i < n_rows; i++) {
            eval_row *row = &rows[i];
            clkvq_layer_config lc;
            clkvq_eval_result r;
            st = row_layer(ctx, row, l, &info, fit_info.n_tokens, fit_dump ? fk : k,
                           fit_dump ? fv : v, store_f, store_i, &lc);
            if (st == CLKVQ_OK)
                st = clkvq_eval_layer(ctx, &lc, info.n_q_heads, info.n_kv_heads, info.n_tokens,
                                      info.head_dim, q, k, v, n_queries, &r);
            if (st != CLKVQ_OK) {
                fprintf(stderr, "clkvq-eval: layer %d, %s: %s: %s\n", l, row->name,
                        clkvq_status_string(st), clkvq_last_error(ctx));
                goto out;
            }
            layer_result *lr = &row->layers[l];
            lr->bits = r.bits_per_element;
            lr->bits_long = r.bits_long;
            lr->num = r.err_sq;
            lr->den = r.ref_sq;
            lr->cos = r.cosine;
            lr->k_num = r.k_err_sq;
            lr->k_den = r.k_ref_sq;
            lr->v_num = r.v_err_sq;
            lr->v_den = r.v_ref_sq;
            lr->clip_k = lc.clip_k;
            lr->clip_v = lc.clip_v;
            fprintf(stderr, "layer %d/%d  %-40s rel_err %.3e  bits %.3f\n", l + 1,
                    info.n_layers, row->name, r.rel_err, r.bits_per_element);
        }
    }
    if (json)
        print_json(calib, fit_path, &info, n_queries, rows, n_rows, per_layer);
    else
        print_table(calib, fit_path, &info, n_queries, rows, n_rows, per_layer);
    rc = fflush(stdout) == 0 ? 0 : 1;
    goto out;

fail:
    fprintf(stderr, "clkvq-eval: %s: %s\n", clkvq_status_string(st), clkvq_last_error(ctx));
    rc = 1;
out:
    for (int i = 0; i < n_rows; i++) {
        free(rows[i].layers);
        clkvq_config_free(rows[i].config);
    }
    free(q);
    free(k);
    free(v);
    free(fk);
    free(fv);
    free(store_f);
    free(store_i);
    clkvq_dump_close(dump);
    clkvq_dump_close(fit_dump);
    clkvq_context_release(ctx);
    return rc;
}

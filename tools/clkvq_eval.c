/*
 * clkvq-eval: attention-output accuracy of KV-cache schemes on a
 * calibration dump, measured through the library's own cache and decode
 * kernels (clkvq_eval_layer), one row per scheme.
 *
 *   clkvq-eval --calib FILE --scheme SPEC [--scheme SPEC ...] [--config FILE]
 *              [--queries M] [--per-layer] [--json] [--device D]
 *
 * Aggregates over layers: errors as sqrt(sum num / sum den) (every layer's
 * squared error over every layer's squared reference, so a layer counts by
 * its share of the signal, not by its ratio), cosine and bits as means
 * (every layer has the same number of elements and (head, query) pairs).
 * clkvq_eval_result carries ratios only, so the per-layer denominators
 * (|o_ref|^2 over the evaluated queries, |K|^2, |V|^2) are computed here
 * once per layer, with the same fp64 attention the library uses.
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
#define CLIP_LO 0.80f
#define CLIP_HI 1.00f
#define CLIP_STEP 0.01f

typedef struct {
    double bits, num, den, cos, k_num, k_den, v_num, v_den;
    float clip_k, clip_v; /* what the layer ran with (calibrated rows: found) */
} layer_result;

typedef struct {
    char name[256];
    clkvq_layer_config base; /* spec rows */
    int calib;               /* skvq :calib (1): perm + clip per layer, in-sample;
                                :perm (2): the permutation alone, clip as given */
    clkvq_precision_config *config; /* --config rows */
    layer_result *layers;
} eval_row;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: clkvq-eval --calib FILE --scheme SPEC [--scheme SPEC ...] [--config FILE]\n"
            "                  [--config-scheme SPEC] [--queries M] [--per-layer] [--json]\n"
            "                  [--device D]\n"
            "Attention-output error of KV-cache schemes on a calibration dump (layers.<i>.q/k/v),\n"
            "through the library's cache and fused decode kernels, against fp64 attention over\n"
            "the original K/V, for the last M positions of every layer.\n"
            "\n"
            "SPEC: SCHEME[:FIELD]... with SCHEME fp16 | token | kivi | skvq, fields:\n"
            "  kBvB     key and value bits, B in 8, 4, 3, 2, 1.5   (default k4v4)\n"
            "  gN       group size, a multiple of 32 (token/kivi 32, skvq 128)\n"
            "  rN       kivi residual R, a multiple of the group    (default 128)\n"
            "  wN       skvq fp16 window of recent tokens           (default 128)\n"
            "  sN       skvq fp16 attention sinks (first tokens)    (default 5)\n"
            "  fp8      scale/zero as fp8 e4m3 instead of fp16\n"
            "  int      integer zero point (KVTuner) instead of a float one\n"
            "  aX       clip ratio X in (0, 1] for K and V (default 1)\n"
            "  calib    skvq: per layer, K and V apart, channel permutation\n"
            "           (clkvq_calibrate_permutation) and clip searched over\n"
            "           0.80..1.00 step 0.01 (clkvq_calibrate_clip) on this dump's own K/V:\n"
            "           in-sample, so an optimistic number\n"
            "  perm     skvq: the calibrated permutation alone (clip from aX, default 1)\n"
            "  e.g. fp16  token:k4v4:g32  kivi:k2v2:g32:r128  skvq:k2v1.5:g128:w128:s5:a0.92\n"
            "       skvq:k2v1.5:g128:w128:s5:fp8:calib\n"
            "\n"
            "  --calib FILE          the dump (safetensors, F32/F16/BF16)\n"
            "  --scheme SPEC         a row (repeatable)\n"
            "  --config FILE         a layer precision config (YAML) as one more row named after\n"
            "                        the file, each layer with its own settings (repeatable)\n"
            "  --config-scheme SPEC  what the config leaves out (default: token defaults)\n"
            "  --queries M           evaluated positions per layer (default 128)\n"
            "  --per-layer           a row per layer too\n"
            "  --json                one JSON object instead of a Markdown table\n"
            "  --device D            OpenCL device: index or name substring ($CLKVQ_DEVICE)\n"
            "Exit status: 0 ok, 1 library or I/O failure, 2 usage error.\n");
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

static int parse_spec(const char *spec, clkvq_layer_config *out, int *calib)
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
    int have_clip = 0;
    *calib = 0;
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
            if (!is_skvq) {
                fprintf(stderr, "clkvq-eval: scheme '%s': calib is an skvq field\n", spec);
                return -1;
            }
            *calib = 1;
        } else if (!strcmp(field, "perm")) {
            if (!is_skvq) {
                fprintf(stderr, "clkvq-eval: scheme '%s': perm is an skvq field\n", spec);
                return -1;
            }
            *calib = 2;
        } else if (field[0] == 'k') {
            if (parse_bits(field, spec, &lc.format_k, &lc.format_v))
                return -1;
        } else if (field[0] == 'g') {
            if (parse_positive(field + 1, spec, "group", &lc.group_size))
                return -1;
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
    if (have_clip && *calib == 1) {
        fprintf(stderr, "clkvq-eval: scheme '%s': aX fixes the clip, calib searches it: pick one\n",
                spec);
        return -1;
    }
    *out = lc;
    return 0;
}

/* ------------------------------------------------------------ evaluation */

/* Sum over q heads and the last n_queries positions of |o_ref|^2, fp64
 * causal attention over the original K/V: the denominator clkvq_eval_layer
 * divides by, which its result does not carry. */
static double reference_sq_norm(const float *q, const float *k, const float *v, int n_q,
                                int n_kv, int n_tokens, int hd, int n_queries)
{
    const int group = n_q / n_kv;
    const double scale = (double)(float)(1.0 / sqrt((double)hd));
    double *s = malloc(sizeof(double) * (size_t)n_tokens);
    double *o = malloc(sizeof(double) * (size_t)hd);
    double total = 0.0;
    for (int h = 0; h < n_q; h++) {
        const float *kb = k + (size_t)(h / group) * n_tokens * hd;
        const float *vb = v + (size_t)(h / group) * n_tokens * hd;
        for (int p = n_tokens - n_queries; p < n_tokens; p++) {
            const float *qv = q + ((size_t)h * n_tokens + p) * hd;
            double m = -INFINITY, l = 0.0;
            for (int t = 0; t <= p; t++) {
                double d = 0.0;
                for (int c = 0; c < hd; c++)
                    d += (double)qv[c] * kb[(size_t)t * hd + c];
                s[t] = d * scale;
                m = s[t] > m ? s[t] : m;
            }
            for (int t = 0; t <= p; t++)
                l += s[t] = exp(s[t] - m);
            for (int c = 0; c < hd; c++)
                o[c] = 0.0;
            for (int t = 0; t <= p; t++)
                for (int c = 0; c < hd; c++)
                    o[c] += s[t] / l * vb[(size_t)t * hd + c];
            for (int c = 0; c < hd; c++)
                total += o[c] * o[c];
        }
    }
    free(s);
    free(o);
    return total;
}

static double sq_norm(const float *x, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    return s;
}

/* Tokens [n_sink, n_tokens) of x [heads][n_tokens][hd], contiguous. */
static float *drop_sinks(const float *x, int heads, int n_tokens, int hd, int n_sink)
{
    int n = n_tokens - n_sink;
    float *out = malloc(sizeof(float) * (size_t)heads * n * hd);
    if (!out)
        return NULL;
    for (int h = 0; h < heads; h++)
        memcpy(out + (size_t)h * n * hd, x + ((size_t)h * n_tokens + n_sink) * hd,
               sizeof(float) * (size_t)n * hd);
    return out;
}

/*
 * SKVQ calibration of one tensor: permutation, then (search_clip) the clip
 * under it.
 * Calibrated on the tokens that are ever quantized: the sinks stay fp16,
 * and the synthetic (and real) sink token carries channels far larger than
 * anything else, which would set those channels' ranges on its own.
 */
static clkvq_status calibrate_tensor(clkvq_context *ctx, const clkvq_layer_config *lc, int is_v,
                                     const float *x, int n_kv, int n_tokens, int hd,
                                     int search_clip, int32_t *perm, float *clip)
{
    int n_sink = lc->n_sink < n_tokens - 1 ? lc->n_sink : 0;
    float *data = drop_sinks(x, n_kv, n_tokens, hd, n_sink);
    if (!data)
        return CLKVQ_ERR_OUT_OF_MEMORY;
    clkvq_shape shape = {n_kv, n_tokens - n_sink, hd};
    clkvq_status st = clkvq_calibrate_permutation(ctx, &shape, data, lc->group_size, perm);
    if (st == CLKVQ_OK && search_clip) {
        clkvq_quant_params qp = clkvq_quant_params_default();
        qp.format = is_v ? lc->format_v : lc->format_k;
        qp.axis = CLKVQ_AXIS_TOKEN;
        qp.group_size = lc->group_size;
        qp.param_type = lc->param_type;
        qp.zero_mode = lc->zero_mode;
        double mse;
        st = clkvq_calibrate_clip(ctx, &qp, &shape, data, perm, CLIP_LO, CLIP_HI, CLIP_STEP,
                                  clip, &mse);
    }
    free(data);
    return st;
}

static void aggregate(const eval_row *row, int n_layers, layer_result *out)
{
    memset(out, 0, sizeof *out);
    for (int l = 0; l < n_layers; l++) {
        const layer_result *r = &row->layers[l];
        out->bits += r->bits / n_layers;
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
    printf("\"bits_per_element\": %.6f, \"rel_err\": %.6e, \"cosine\": %.9f, "
           "\"k_rel_err\": %.6e, \"v_rel_err\": %.6e",
           r->bits, ratio(r->num, r->den), r->cos, ratio(r->k_num, r->k_den),
           ratio(r->v_num, r->v_den));
}

static void print_json(const char *calib, const clkvq_dump_info *info, int n_queries,
                       const eval_row *rows, int n_rows, int per_layer)
{
    printf("{\"calib\": ");
    json_string(calib);
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
        printf(", \"in_sample\": %s", rows[i].calib ? "true" : "false");
        if (per_layer) {
            printf(",\n   \"layers\": [");
            for (int l = 0; l < info->n_layers; l++) {
                const layer_result *r = &rows[i].layers[l];
                printf("%s\n    {\"layer\": %d, ", l ? "," : "", l);
                json_numbers(r);
                printf(", \"clip_k\": %.2f, \"clip_v\": %.2f}", (double)r->clip_k,
                       (double)r->clip_v);
            }
            printf("]");
        }
        printf("}");
    }
    printf("]}\n");
}

static void print_row(const char *name, const char *layer, const layer_result *r, int per_layer)
{
    printf("| %-40s |", name);
    if (per_layer)
        printf(" %5s |", layer);
    printf(" %9.4f | %9.3e | %9.6f | %9.3e | %9.3e |\n", r->bits, ratio(r->num, r->den), r->cos,
           ratio(r->k_num, r->k_den), ratio(r->v_num, r->v_den));
}

static void print_table(const char *calib, const clkvq_dump_info *info, int n_queries,
                        const eval_row *rows, int n_rows, int per_layer)
{
    int any_calib = 0;
    for (int i = 0; i < n_rows; i++)
        any_calib |= rows[i].calib;
    printf("calib: %s (%s%s%d layers x %d tokens, %d q / %d kv heads, head_dim %d); last %d "
           "positions per layer decoded\n",
           calib, info->model, info->model[0] ? ", " : "", info->n_layers, info->n_tokens,
           info->n_q_heads, info->n_kv_heads, info->head_dim, n_queries);
    if (any_calib)
        printf("note: ':calib' and ':perm' rows are calibrated (permutation, clip) on this "
               "same dump: in-sample\n");
    printf("\n| %-40s |", "scheme");
    if (per_layer)
        printf(" layer |");
    printf(" bits/elem |   rel_err |    cosine | k_rel_err | v_rel_err |\n|:%s|", 
           "-----------------------------------------");
    if (per_layer)
        printf("------:|");
    printf("----------:|----------:|----------:|----------:|----------:|\n");
    for (int i = 0; i < n_rows; i++) {
        layer_result all;
        aggregate(&rows[i], info->n_layers, &all);
        print_row(rows[i].name, "all", &all, per_layer);
        if (per_layer)
            for (int l = 0; l < info->n_layers; l++) {
                char lname[16];
                snprintf(lname, sizeof lname, "%d", l);
                print_row(rows[i].name, lname, &rows[i].layers[l], per_layer);
            }
    }
}

/* ------------------------------------------------------------ main */

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

int main(int argc, char **argv)
{
    const char *calib = NULL, *device = NULL, *config_scheme = NULL;
    const char *specs[MAX_ROWS], *configs[MAX_ROWS];
    int n_specs = 0, n_configs = 0, n_queries = 128, per_layer = 0, json = 0;
    enum { OPT_CALIB = 256, OPT_SCHEME, OPT_CONFIG, OPT_CONFIG_SCHEME, OPT_QUERIES,
           OPT_PER_LAYER, OPT_JSON, OPT_DEVICE };
    static const struct option opts[] = {
        {"calib", required_argument, NULL, OPT_CALIB},
        {"scheme", required_argument, NULL, OPT_SCHEME},
        {"config", required_argument, NULL, OPT_CONFIG},
        {"config-scheme", required_argument, NULL, OPT_CONFIG_SCHEME},
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
        if (parse_spec(specs[i], &rows[n_rows].base, &rows[n_rows].calib))
            return 2;
        snprintf(rows[n_rows].name, sizeof rows[n_rows].name, "%s", specs[i]);
    }
    clkvq_layer_config config_defaults = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    int config_calib = 0;
    if (config_scheme && parse_spec(config_scheme, &config_defaults, &config_calib))
        return 2;
    if (config_calib) {
        fprintf(stderr, "clkvq-eval: --config-scheme cannot calibrate: a config carries its own "
                        "permutations and clips\n");
        return 2;
    }

    int rc = 1;
    clkvq_context *ctx = NULL;
    clkvq_kv_dump *dump = NULL;
    float *q = NULL, *k = NULL, *v = NULL;
    int32_t *perm_k = NULL, *perm_v = NULL;
    clkvq_status st = clkvq_context_create(&ctx, device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-eval: %s: %s\n", clkvq_status_string(st), clkvq_last_error(NULL));
        return 1;
    }
    clkvq_dump_info info;
    if ((st = clkvq_dump_open(ctx, calib, &dump)) != CLKVQ_OK ||
        (st = clkvq_dump_info_get(dump, &info)) != CLKVQ_OK)
        goto fail;
    if (n_queries > info.n_tokens) {
        fprintf(stderr, "clkvq-eval: --queries %d is more than the dump's %d tokens\n", n_queries,
                info.n_tokens);
        rc = 2;
        goto out;
    }
    /* A SPEC the cache would refuse for this dump's shape (group vs
     * head_dim, residual vs group, ...) is a usage error: say so before an
     * hour of evaluation, with the cache's own reason. */
    for (int i = 0; i < n_rows; i++) {
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
        for (int l = 0; l < info.n_layers; l++)
            if (clkvq_config_n_heads(row->config, l) > 0) {
                fprintf(stderr, "clkvq-eval: %s: layer %d has per-head bits, which the kernels "
                                "do not support\n",
                        configs[i], l);
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
    const size_t perm_count = (size_t)info.n_kv_heads * info.head_dim;
    q = malloc(sizeof(float) * q_count);
    k = malloc(sizeof(float) * kv_count);
    v = malloc(sizeof(float) * kv_count);
    perm_k = malloc(sizeof(int32_t) * perm_count);
    perm_v = malloc(sizeof(int32_t) * perm_count);
    if (!q || !k || !v || !perm_k || !perm_v) {
        st = CLKVQ_ERR_OUT_OF_MEMORY;
        goto fail;
    }

    /* Layers outer: each layer's tensors are read and its reference norms
     * computed once for every row. */
    for (int l = 0; l < info.n_layers; l++) {
        if ((st = clkvq_dump_read(dump, l, 'q', q)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'k', k)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'v', v)) != CLKVQ_OK)
            goto fail;
        double out_den = reference_sq_norm(q, k, v, info.n_q_heads, info.n_kv_heads,
                                           info.n_tokens, info.head_dim, n_queries);
        double k_den = sq_norm(k, kv_count), v_den = sq_norm(v, kv_count);
        for (int i = 0; i < n_rows; i++) {
            eval_row *row = &rows[i];
            clkvq_layer_config lc = row->base;
            if (row->config && (st = clkvq_config_layer(row->config, l, &lc)) != CLKVQ_OK)
                goto fail;
            if (row->calib) {
                int search = row->calib == 1;
                if ((st = calibrate_tensor(ctx, &lc, 0, k, info.n_kv_heads, info.n_tokens,
                                           info.head_dim, search, perm_k, &lc.clip_k)) !=
                        CLKVQ_OK ||
                    (st = calibrate_tensor(ctx, &lc, 1, v, info.n_kv_heads, info.n_tokens,
                                           info.head_dim, search, perm_v, &lc.clip_v)) !=
                        CLKVQ_OK)
                    goto fail;
                lc.perm_k = perm_k;
                lc.perm_v = perm_v;
            }
            clkvq_eval_result r;
            st = clkvq_eval_layer(ctx, &lc, info.n_q_heads, info.n_kv_heads, info.n_tokens,
                                  info.head_dim, q, k, v, n_queries, &r);
            if (st != CLKVQ_OK) {
                fprintf(stderr, "clkvq-eval: layer %d, %s: %s: %s\n", l, row->name,
                        clkvq_status_string(st), clkvq_last_error(ctx));
                goto out;
            }
            layer_result *lr = &row->layers[l];
            lr->bits = r.bits_per_element;
            lr->num = r.rel_err * r.rel_err * out_den;
            lr->den = out_den;
            lr->cos = r.cosine;
            lr->k_num = r.k_rel_err * r.k_rel_err * k_den;
            lr->k_den = k_den;
            lr->v_num = r.v_rel_err * r.v_rel_err * v_den;
            lr->v_den = v_den;
            lr->clip_k = lc.clip_k;
            lr->clip_v = lc.clip_v;
            fprintf(stderr, "layer %d/%d  %-40s rel_err %.3e  bits %.3f\n", l + 1,
                    info.n_layers, row->name, r.rel_err, r.bits_per_element);
        }
    }
    if (json)
        print_json(calib, &info, n_queries, rows, n_rows, per_layer);
    else
        print_table(calib, &info, n_queries, rows, n_rows, per_layer);
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
    free(perm_k);
    free(perm_v);
    clkvq_dump_close(dump);
    clkvq_context_release(ctx);
    return rc;
}

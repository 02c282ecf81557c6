/*
 * clkvq-tune: fits the decode kernels to this machine's OpenCL device and
 * caches the result where the library looks it up. A thin user of the
 * public API (include/clkvq.h), like any runtime.
 *
 * Exit codes: 0 success, 1 runtime failure (device, tuning, file), 2 usage.
 */
#include "clkvq.h"
#include "cli_parse.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXIT_RUNTIME 1
#define EXIT_USAGE 2
#define MAX_SHAPES 64

typedef struct {
    const char *name;
    int n_q_heads, n_kv_heads, head_dim;
} model_shape;

static const model_shape g_models[] = {
    {"llama3-8b", 32, 8, 128},
    {"qwen2.5-7b", 28, 4, 128},
    {"phi3-mini", 32, 32, 96},
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: clkvq-tune [options]\n"
            "       clkvq-tune precision --calib FILE --budget BITS [...] (see --help there)\n"
            "Tunes fused decode attention (variant, work-group size, chunk, vector width,\n"
            "packed layouts) for this machine's device, checks every candidate against a\n"
            "double-precision reference, and caches the fastest per shape in\n"
            "<cache dir>/tuning/<device key>.json, which the library reads at run time.\n"
            "With no options: the default device, Llama-3-8B shape at 4k and 32k tokens,\n"
            "formats k4v4 and k2v2 (per-token groups of 32), batch 1.\n\n"
            "options:\n"
            "  --device SPEC     device index or name substring (default: $CLKVQ_DEVICE,\n"
            "                    else the first GPU, else the first device)\n"
            "  --shape NAME      llama3-8b | qwen2.5-7b | phi3-mini (repeatable)\n"
            "  --tokens N[,N..]  context lengths (default 4096,32768)\n"
            "  --formats LIST    e.g. fp16,k8v8,k4v4,k4v2,k2v2,k2v1.5 (default k4v4,k2v2)\n"
            "  --group G         group size of the packed formats (default 32)\n"
            "  --batch N         sequences per decode step (default 1)\n"
            "  --budget SECONDS  per shape: random sampling + local search within it\n"
            "                    (default 0 = the whole space)\n"
            "  --quick           a small space (a few candidates: CI, demos)\n"
            "  --reps N          timed runs per candidate, median (default 5)\n"
            "  --no-store        do not write the tuning file\n"
            "  --json            print one JSON object instead of the table\n"
            "  --show            print what is cached for this device and exit\n"
            "  --list-devices    list OpenCL devices and exit\n"
            "  --help            this text\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n"
            "environment: CLKVQ_DEVICE, CLKVQ_CACHE_DIR (else $XDG_CACHE_HOME/clkvq, else\n"
            "~/.cache/clkvq)\n");
}

/* ------------------------------------------------------------ progress */

typedef struct {
    int tty;
    double start;
    int shape_index, n_shapes;
    char label[96];
} progress_state;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A bar with an ETA on a terminal; a plain line per candidate otherwise
 * (logs and CI read those). */
static void on_progress(void *user, int done, int total, const char *what)
{
    progress_state *ps = user;
    double elapsed = now_s() - ps->start;
    double eta = done > 0 ? elapsed / done * (total - done) : 0.0;
    if (ps->tty) {
        int width = 24, filled = total > 0 ? width * done / total : width;
        fprintf(stderr, "\r[%d/%d] %-28.28s [", ps->shape_index + 1, ps->n_shapes, ps->label);
        for (int i = 0; i < width; i++)
            fputc(i < filled ? '#' : ' ', stderr);
        fprintf(stderr, "] %3d/%-3d ETA %4.0fs", done, total, eta);
        if (done == total)
            fputc('\n', stderr);
    } else {
        fprintf(stderr, "[%d/%d] %s: %d/%d %s (%.1fs)\n", ps->shape_index + 1, ps->n_shapes,
                ps->label, done, total, what, elapsed);
    }
    fflush(stderr);
}

/* ------------------------------------------------------------ parsing */

static int parse_format_pair(const char *text, clkvq_tune_shape *sh)
{
    if (!strcmp(text, "fp16")) {
        sh->scheme = CLKVQ_SCHEME_FP16;
        sh->format_k = sh->format_v = CLKVQ_FMT_Q8;
        return 0;
    }
    char k[16], v[16];
    int used = -1;
    if (sscanf(text, "k%15[0-9.]v%15[0-9.]%n", k, v, &used) != 2 || used < 0 || text[used])
        return -1; /* "k4v4x" is not k4v4 */
    sh->scheme = CLKVQ_SCHEME_TOKEN;
    return clkvq_format_parse(k, &sh->format_k) == CLKVQ_OK &&
                   clkvq_format_parse(v, &sh->format_v) == CLKVQ_OK
               ? 0
               : -1;
}

/* "4096,32768": every item an integer in [1, 2^24], none empty. */
static int parse_int_list(const char *text, int *out, int max)
{
    char buf[256];
    if (snprintf(buf, sizeof buf, "%s", text) >= (int)sizeof buf || !*buf ||
        buf[strlen(buf) - 1] == ',')
        return -1;
    int n = 0;
    for (char *p = buf, *next; p; p = next) {
        next = strchr(p, ',');
        if (next)
            *next++ = '\0';
        long v;
        if (n == max || cli_long(p, 1, 1 << 24, &v))
            return -1;
        out[n++] = (int)v;
    }
    return n;
}

static const char *format_label(const clkvq_tune_shape *sh, char *buf, size_t size)
{
    if (sh->scheme == CLKVQ_SCHEME_FP16)
        snprintf(buf, size, "fp16");
    else
        snprintf(buf, size, "k%sv%s g%d", clkvq_format_get(sh->format_k)->bits_name,
                 clkvq_format_get(sh->format_v)->bits_name, sh->group_size);
    return buf;
}

static const char *params_label(const clkvq_tune_params *p, char *buf, size_t size)
{
    const clkvq_attn_tuning *a = &p->attn;
    if (a->variant == CLKVQ_ATTN_SERIAL)
        snprintf(buf, size, "serial vw=%d chunk=%d", a->vw, a->chunk);
    else
        snprintf(buf, size, "cooperative wgs=%d chunk=%d", a->wgs, a->chunk);
    size_t used = strlen(buf);
    snprintf(buf + used, size - used, " K:%s V:%s",
             p->layout_k == CLKVQ_LAYOUT_GROUP_PLANAR ? "planar" : "token",
             p->layout_v == CLKVQ_LAYOUT_GROUP_PLANAR ? "planar" : "token");
    return buf;
}

/* ------------------------------------------------------------ output */

static void print_table(const clkvq_device_info *info, const clkvq_tune_result *res, int n,
                        const char *const *models, const char *cache_file)
{
    printf("clkvq-tune: %s / %s (driver %s, %d CUs)\n", info->platform, info->name,
           info->driver_version, info->compute_units);
    printf("device key: %s\n\n", info->device_key);
    printf("| kernel | shape | tokens | format | default ms | tuned ms | speedup | params | "
           "candidates (rejected) |\n");
    printf("|:--|:--|--:|:--|--:|--:|--:|:--|--:|\n");
    for (int i = 0; i < n; i++) {
        char f[32], p[96];
        printf("| %s | %s | %d | %s | %.3f | %.3f | %.2fx | %s | %d (%d) |\n", res[i].kernel,
               models[i], res[i].shape.tokens, format_label(&res[i].shape, f, sizeof f),
               res[i].default_ms, res[i].tuned_ms, res[i].default_ms / res[i].tuned_ms,
               params_label(&res[i].params, p, sizeof p), res[i].n_candidates,
               res[i].n_rejected);
    }
    if (cache_file)
        printf("\ncached in %s\n", cache_file);
}

static void print_json(const clkvq_device_info *info, const clkvq_tune_result *res, int n,
                       const char *const *models, const char *cache_file)
{
    cJSON *root = cJSON_CreateObject();
    char device[512];
    snprintf(device, sizeof device, "%s / %s", info->platform, info->name);
    cJSON_AddStringToObject(root, "device", device);
    cJSON_AddStringToObject(root, "device_key", info->device_key);
    cJSON_AddStringToObject(root, "cache_file", cache_file ? cache_file : "");
    cJSON *list = cJSON_AddArrayToObject(root, "results");
    for (int i = 0; i < n; i++) {
        cJSON *r = cJSON_CreateObject();
        char f[32], p[96];
        char shape[160];
        snprintf(shape, sizeof shape, "%s %s tokens=%d batch=%d", models[i],
                 format_label(&res[i].shape, f, sizeof f), res[i].shape.tokens,
                 res[i].shape.batch);
        cJSON_AddStringToObject(r, "kernel", res[i].kernel);
        cJSON_AddStringToObject(r, "shape", shape);
        cJSON_AddNumberToObject(r, "default_ms", res[i].default_ms);
        cJSON_AddNumberToObject(r, "tuned_ms", res[i].tuned_ms);
        cJSON *params = cJSON_AddObjectToObject(r, "params");
        const clkvq_attn_tuning *a = &res[i].params.attn;
        cJSON_AddStringToObject(params, "variant",
                                a->variant == CLKVQ_ATTN_SERIAL ? "serial" : "cooperative");
        cJSON_AddNumberToObject(params, "wgs", a->wgs);
        cJSON_AddNumberToObject(params, "chunk", a->chunk);
        cJSON_AddNumberToObject(params, "vw", a->vw);
        cJSON_AddStringToObject(params, "layout_k",
                                res[i].params.layout_k == CLKVQ_LAYOUT_GROUP_PLANAR ? "planar"
                                                                                    : "token");
        cJSON_AddStringToObject(params, "layout_v",
                                res[i].params.layout_v == CLKVQ_LAYOUT_GROUP_PLANAR ? "planar"
                                                                                    : "token");
        cJSON_AddStringToObject(params, "summary", params_label(&res[i].params, p, sizeof p));
        cJSON_AddNumberToObject(r, "candidates", res[i].n_candidates);
        cJSON_AddNumberToObject(r, "rejected", res[i].n_rejected);
        cJSON_AddItemToArray(list, r);
    }
    char *text = cJSON_Print(root);
    printf("%s\n", text);
    free(text);
    cJSON_Delete(root);
}

/* ------------------------------------------------------------ precision */

static void precision_usage(FILE *out)
{
    fprintf(out,
            "usage: clkvq-tune precision --calib FILE --budget BITS [options]\n"
            "KVTuner's layer-wise precision search on a calibration dump (safetensors with\n"
            "layers.<i>.q/k/v; tools/dump_kv.py, tools/dump_minilm.py or clkvq-synth-dump make\n"
            "one): per layer and candidate pair the attention-output error with the dump's real\n"
            "queries, run through the library's kernels after the layer's fits; dominated pairs\n"
            "pruned per layer; optional k-means clustering of layers; an exact multiple-choice\n"
            "knapsack for the Pareto front of (average bits, error). The error is the one\n"
            "clkvq-eval reports for a config, pooled over layers (sqrt(sum err^2 / sum ref^2));\n"
            "with the same dump and --queries, clkvq-eval --config on the written file prints\n"
            "the predicted error. Prints the front and writes the lowest-error config whose\n"
            "average bits fit the budget.\n\n"
            "options:\n"
            "  --calib FILE      calibration dump (required)\n"
            "  --budget BITS     average bits in [1.5, 16], e.g. 3.25 (required): KVTuner's\n"
            "                    (k+v)/2 without params, or bits_long with --weight bits_long\n"
            "  --weight W        kvtuner (default) | bits_long (codes + params per element as\n"
            "                    the context grows, K and V averaged)\n"
            "  --pairs LIST      default K8V8,K8V4,K4V8,K4V4,K4V2,K2V4,K2V2,K2V1.5\n"
            "  --scheme S        token | kivi | skvq (default token)\n"
            "  --group G         group size (default 32; skvq min(128, head_dim))\n"
            "  --window W --sinks S   skvq fp16 window and sinks (default 128, 5)\n"
            "  --residual R      kivi fp16 residual (default 128)\n"
            "  --kc              skvq: keys per channel in blocks of G tokens\n"
            "  --fp8             scale/zero as fp8 e4m3\n"
            "  --rot             randomized Hadamard rotation per kv head (layer l: seed + l)\n"
            "  --rot-seed N      its seed (default 0)\n"
            "  --fit LIST        what each layer fits on the dump: any of clip (least MSE over\n"
            "                    0.40..1.00), perm, center (means: V, and K unless per channel),\n"
            "                    or none; default: skvq perm,clip, other schemes none\n"
            "  --no-calib        the same as --fit none\n"
            "  --queries M       last positions evaluated per layer (default %d, as clkvq-eval)\n"
            "  --clusters K      cluster layers into K groups sharing a pair (default: none)\n"
            "  -o FILE           where to write the config (default clkvq-precision.yaml)\n"
            "  --device SPEC     OpenCL device\n"
            "  --json            print one JSON object (front + chosen config)\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n",
            CLKVQ_DEFAULT_QUERIES);
}

static void precision_progress(void *user, int done, int total, const char *what)
{
    (void)user;
    if (isatty(fileno(stderr)))
        fprintf(stderr, "\r%4d/%-4d %-60.60s", done, total, what);
    else if (done == total || done % 16 == 0)
        fprintf(stderr, "%d/%d %s\n", done, total, what);
    if (done == total && isatty(fileno(stderr)))
        fputc('\n', stderr);
}

static int parse_pairs(const char *text, clkvq_bit_pair *pairs, int max)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", text);
    int n = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        char k[16], v[16];
        int used = -1;
        if (n >= max || sscanf(t, "%*[Kk]%15[0-9.]%*[Vv]%15[0-9.]%n", k, v, &used) != 2 ||
            used < 0 || t[used] ||
            clkvq_format_parse(k, &pairs[n].format_k) != CLKVQ_OK ||
            clkvq_format_parse(v, &pairs[n].format_v) != CLKVQ_OK)
            return -1;
        n++;
    }
    return n;
}

/* "clip,perm,center" or "none" -> CLKVQ_FIT_* (center: means of V, and of
 * K unless keys are grouped per channel); -1 when a word is unknown. */
static long parse_fit(const char *text, int channel_keys)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", text);
    if (!strcmp(buf, "none"))
        return 0;
    unsigned fit = 0;
    int n = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "clip"))
            fit |= CLKVQ_FIT_CLIP;
        else if (!strcmp(t, "perm"))
            fit |= CLKVQ_FIT_PERM;
        else if (!strcmp(t, "center"))
            fit |= CLKVQ_FIT_MEAN_V | (channel_keys ? 0u : (unsigned)CLKVQ_FIT_MEAN_K);
        else
            return -1;
        n++;
    }
    return n ? (long)fit : -1;
}

static int precision_main(int argc, char **argv)
{
    enum { OPT_KC = 256, OPT_FP8, OPT_ROT, OPT_ROT_SEED, OPT_FIT, OPT_WEIGHT };
    static const struct option longopts[] = {
        {"calib", required_argument, 0, 'c'},   {"budget", required_argument, 0, 'B'},
        {"pairs", required_argument, 0, 'p'},   {"scheme", required_argument, 0, 's'},
        {"group", required_argument, 0, 'g'},   {"window", required_argument, 0, 'w'},
        {"sinks", required_argument, 0, 'k'},   {"residual", required_argument, 0, 'r'},
        {"no-calib", no_argument, 0, 'N'},      {"queries", required_argument, 0, 'q'},
        {"clusters", required_argument, 0, 'K'}, {"device", required_argument, 0, 'd'},
        {"json", no_argument, 0, 'j'},          {"help", no_argument, 0, 'h'},
        {"kc", no_argument, 0, OPT_KC},         {"fp8", no_argument, 0, OPT_FP8},
        {"rot", no_argument, 0, OPT_ROT},       {"rot-seed", required_argument, 0, OPT_ROT_SEED},
        {"fit", required_argument, 0, OPT_FIT}, {"weight", required_argument, 0, OPT_WEIGHT},
        {0, 0, 0, 0}};
    const char *calib = NULL, *device = NULL, *output = "clkvq-precision.yaml";
    const char *pairs_text = "K8V8,K8V4,K4V8,K4V4,K4V2,K2V4,K2V2,K2V1.5", *fit_text = NULL;
    static const char prog[] = "clkvq-tune precision";
    double budget = -1;
    clkvq_scheme scheme = CLKVQ_SCHEME_TOKEN;
    clkvq_search_weight weight = CLKVQ_SEARCH_WEIGHT_KVTUNER;
    int group = 0, window = 128, sinks = 5, residual = 128, calibrate = 1, queries = 0;
    int clusters = 0, json = 0, kc = 0, fp8 = 0, rot = 0, c;
    uint64_t rot_seed = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': calib = optarg; break;
        case 'B': /* KVTuner's average bits, (k + v) / 2, or bits_long */
            if (cli_parse_double(prog, "--budget", optarg, 1.5, 16.0, &budget)) return EXIT_USAGE;
            break;
        case 'p': pairs_text = optarg; break;
        case 's':
            if (clkvq_scheme_parse(optarg, &scheme) != CLKVQ_OK || scheme == CLKVQ_SCHEME_FP16) {
                fprintf(stderr, "clkvq-tune precision: --scheme is token, kivi or skvq\n");
                return EXIT_USAGE;
            }
            break;
        case 'g':
            if (cli_parse_int(prog, "--group", optarg, 32, 1 << 16, &group)) return EXIT_USAGE;
            break;
        case 'w':
            if (cli_parse_int(prog, "--window", optarg, 0, 1 << 24, &window)) return EXIT_USAGE;
            break;
        case 'k':
            if (cli_parse_int(prog, "--sinks", optarg, 0, 1 << 24, &sinks)) return EXIT_USAGE;
            break;
        case 'r':
            if (cli_parse_int(prog, "--residual", optarg, 0, 1 << 24, &residual)) return EXIT_USAGE;
            break;
        case 'N': calibrate = 0; break;
        case 'q':
            if (cli_parse_int(prog, "--queries", optarg, 1, 1 << 24, &queries)) return EXIT_USAGE;
            break;
        case 'K':
            if (cli_parse_int(prog, "--clusters", optarg, 0, 1 << 16, &clusters)) return EXIT_USAGE;
            break;
        case 'd': device = optarg; break;
        case 'j': json = 1; break;
        case 'o': output = optarg; break;
        case OPT_KC: kc = 1; break;
        case OPT_FP8: fp8 = 1; break;
        case OPT_ROT: rot = 1; break;
        case OPT_ROT_SEED:
            if (cli_u64(optarg, &rot_seed) || rot_seed > UINT32_MAX) {
                fprintf(stderr, "%s: --rot-seed '%s' is not an integer in [0, 4294967295]\n", prog,
                        optarg);
                return EXIT_USAGE;
            }
            break;
        case OPT_FIT: fit_text = optarg; break;
        case OPT_WEIGHT:
            if (!strcmp(optarg, "kvtuner")) {
                weight = CLKVQ_SEARCH_WEIGHT_KVTUNER;
            } else if (!strcmp(optarg, "bits_long")) {
                weight = CLKVQ_SEARCH_WEIGHT_BITS_LONG;
            } else {
                fprintf(stderr, "%s: --weight '%s' is not kvtuner or bits_long\n", prog, optarg);
                return EXIT_USAGE;
            }
            break;
        case 'h': precision_usage(stdout); return 0;
        default: precision_usage(stderr); return EXIT_USAGE;
        }
    }
    clkvq_bit_pair pairs[32];
    int n_pairs = parse_pairs(pairs_text, pairs, 32);
    if (n_pairs <= 0) {
        fprintf(stderr, "clkvq-tune precision: --pairs '%s' is not a list of KxVy pairs "
                        "(e.g. K4V4,K2V1.5)\n", pairs_text);
        return EXIT_USAGE;
    }
    if (!calib || budget < 0) {
        fprintf(stderr, "clkvq-tune precision: need --calib FILE and --budget BITS\n");
        return EXIT_USAGE;
    }
    if (kc && scheme != CLKVQ_SCHEME_SKVQ) {
        fprintf(stderr, "clkvq-tune precision: --kc is an skvq setting (--scheme skvq)\n");
        return EXIT_USAGE;
    }
    long fit = 0;
    if (fit_text && (fit = parse_fit(fit_text, kc || scheme == CLKVQ_SCHEME_KIVI)) < 0) {
        fprintf(stderr, "%s: --fit '%s' is not a list of clip, perm, center (or none)\n", prog,
                fit_text);
        return EXIT_USAGE;
    }
    if (fit_text && !fit)
        calibrate = 0;
    clkvq_layer_config defaults = clkvq_layer_config_default(scheme);
    if (group > 0)
        defaults.group_size = group;
    if (scheme == CLKVQ_SCHEME_SKVQ) {
        defaults.window = window;
        defaults.n_sink = sinks;
        defaults.key_axis = kc ? CLKVQ_AXIS_CHANNEL : CLKVQ_AXIS_TOKEN;
    } else if (scheme == CLKVQ_SCHEME_KIVI) {
        defaults.residual = residual;
    }
    if (fp8)
        defaults.param_type = CLKVQ_PARAM_FP8_E4M3;
    defaults.rotate = rot;
    defaults.rot_seed = (uint32_t)rot_seed;

    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-tune: %s: %s\n", clkvq_status_string(st), clkvq_last_error(NULL));
        return EXIT_RUNTIME;
    }
    clkvq_kv_dump *dump = NULL;
    clkvq_search_result *res = NULL;
    clkvq_precision_config *cfg = NULL;
    st = clkvq_dump_open(ctx, calib, &dump);
    clkvq_dump_info info;
    if (st == CLKVQ_OK)
        st = clkvq_dump_info_get(dump, &info);
    if (st == CLKVQ_OK) {
        /* skvq's group follows the head unless given, as in clkvq-eval */
        if (scheme == CLKVQ_SCHEME_SKVQ && group <= 0)
            defaults.group_size = info.head_dim < 128 ? info.head_dim : 128;
        clkvq_search_options opt = {.defaults = &defaults, .pairs = pairs, .n_pairs = n_pairs,
                                    .n_queries = queries, .n_clusters = clusters,
                                    .calibrate = calibrate, .progress = precision_progress,
                                    .fit = (unsigned)fit, .weight = weight};
        st = clkvq_precision_search(ctx, dump, &opt, &res);
    }
    if (st == CLKVQ_OK)
        st = clkvq_search_config(ctx, res, budget, &cfg);
    if (st == CLKVQ_OK)
        st = clkvq_config_save(ctx, cfg, output);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-tune precision: %s: %s\n", clkvq_status_string(st),
                clkvq_last_error(ctx));
    } else {
        int n_front = clkvq_search_front_size(res), n_layers = clkvq_config_n_layers(cfg);
        cJSON *root = json ? cJSON_CreateObject() : NULL;
        cJSON *front = root ? cJSON_AddArrayToObject(root, "front") : NULL;
        if (!json) {
            printf("Pareto front (%s scheme, %d layers, %d pairs; budget %.3g bits%s)\n\n",
                   clkvq_scheme_name(scheme), n_layers, n_pairs, budget,
                   weight == CLKVQ_SEARCH_WEIGHT_BITS_LONG ? " bits_long" : " (k+v)/2");
            printf("| avg bits (k+v)/2 | bits_long | bits/elem (ours) | error (pooled) | "
                   "decode us/token | pairs used |\n|--:|--:|--:|--:|--:|:--|\n");
        }
        for (int f = 0; f < n_front; f++) {
            clkvq_front_point pt;
            clkvq_search_front_point(res, f, &pt);
            int count[32] = {0};
            for (int l = 0; l < n_layers; l++)
                count[pt.choice[l]]++;
            char used[512] = "";
            for (int p = 0; p < n_pairs; p++)
                if (count[p]) {
                    size_t len = strlen(used);
                    snprintf(used + len, sizeof used - len, "%sK%sV%s x%d", len ? ", " : "",
                             clkvq_format_get(pairs[p].format_k)->bits_name,
                             clkvq_format_get(pairs[p].format_v)->bits_name, count[p]);
                }
            if (json) {
                cJSON *o = cJSON_CreateObject();
                cJSON_AddNumberToObject(o, "avg_bits", pt.avg_bits);
                cJSON_AddNumberToObject(o, "bits_long", pt.bits_long);
                cJSON_AddNumberToObject(o, "bits_per_element", pt.bits_per_element);
                cJSON_AddNumberToObject(o, "total_error", pt.total_error);
                cJSON_AddNumberToObject(o, "latency_us", pt.latency_us);
                cJSON_AddStringToObject(o, "pairs", used);
                cJSON_AddItemToArray(front, o);
            } else {
                char lat[32] = "-";
                if (pt.latency_us >= 0)
                    snprintf(lat, sizeof lat, "%.1f", pt.latency_us);
                printf("| %.4f | %.4f | %.3f | %.5f | %s | %s |\n", pt.avg_bits, pt.bits_long,
                       pt.bits_per_element, pt.total_error, lat, used);
            }
        }
        clkvq_front_point chosen;
        clkvq_search_front_point(res, clkvq_search_front_index(res, budget), &chosen);
        int n_q = queries > 0 ? queries : CLKVQ_DEFAULT_QUERIES;
        if (n_q > info.n_tokens)
            n_q = info.n_tokens;
        if (json) {
            cJSON_AddStringToObject(root, "config", output);
            cJSON_AddNumberToObject(root, "average_bits", clkvq_config_average_bits(cfg));
            cJSON_AddNumberToObject(root, "bits_long", chosen.bits_long);
            cJSON_AddNumberToObject(root, "predicted_error", chosen.total_error);
            cJSON_AddNumberToObject(root, "queries", n_q);
            char *text = cJSON_Print(root);
            printf("%s\n", text);
            free(text);
            cJSON_Delete(root);
        } else {
            printf("\nwrote %s: average %.4f bits (k+v)/2, bits_long %.4f (budget %.3g)\n"
                   "predicted error %.6e: what clkvq-eval --calib %s --queries %d --config %s "
                   "reports\n",
                   output, clkvq_config_average_bits(cfg), chosen.bits_long, budget,
                   chosen.total_error, calib, n_q, output);
            for (int l = 0; l < n_layers; l++) {
                clkvq_layer_config lc;
                clkvq_config_layer(cfg, l, &lc);
                printf("%s%d:K%sV%s", l % 8 ? "  " : (l ? "\n  " : "  "), l,
                       clkvq_format_get(lc.format_k)->bits_name,
                       clkvq_format_get(lc.format_v)->bits_name);
            }
            printf("\n");
        }
    }
    clkvq_config_free(cfg);
    clkvq_search_free(res);
    clkvq_dump_close(dump);
    clkvq_context_release(ctx);
    return st == CLKVQ_OK ? 0 : EXIT_RUNTIME;
}

/* ------------------------------------------------------------ main */

typedef struct {
    const char *device;
    const model_shape *models[8];
    int n_models;
    int tokens[16], n_tokens;
    char formats[256];
    int group, batch, quick, reps, store, json;
    double budget;
} cli_options;

static int parse_args(int argc, char **argv, cli_options *o, int *show, int *list)
{
    static const char prog[] = "clkvq-tune";
    static const struct option longopts[] = {
        {"device", required_argument, 0, 'd'}, {"shape", required_argument, 0, 's'},
        {"tokens", required_argument, 0, 't'}, {"formats", required_argument, 0, 'f'},
        {"group", required_argument, 0, 'g'},  {"batch", required_argument, 0, 'b'},
        {"budget", required_argument, 0, 'B'}, {"quick", no_argument, 0, 'q'},
        {"reps", required_argument, 0, 'r'},   {"no-store", no_argument, 0, 'n'},
        {"json", no_argument, 0, 'j'},         {"show", no_argument, 0, 'S'},
        {"list-devices", no_argument, 0, 'L'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'd': o->device = optarg; break;
        case 's': {
            int found = 0;
            for (size_t i = 0; i < sizeof g_models / sizeof g_models[0]; i++)
                if (!strcmp(optarg, g_models[i].name) && o->n_models < 8) {
                    o->models[o->n_models++] = &g_models[i];
                    found = 1;
                }
            if (!found) {
                fprintf(stderr, "clkvq-tune: unknown shape '%s'\n", optarg);
                return EXIT_USAGE;
            }
            break;
        }
        case 't':
            o->n_tokens = parse_int_list(optarg, o->tokens, 16);
            if (o->n_tokens <= 0) {
                fprintf(stderr,
                        "clkvq-tune: --tokens '%s' is not a list of up to 16 integers in "
                        "[1, %d]\n",
                        optarg, 1 << 24);
                return EXIT_USAGE;
            }
            break;
        case 'f': snprintf(o->formats, sizeof o->formats, "%s", optarg); break;
        case 'g':
            if (cli_parse_int(prog, "--group", optarg, 32, 1 << 16, &o->group)) return EXIT_USAGE;
            break;
        case 'b':
            if (cli_parse_int(prog, "--batch", optarg, 1, 1 << 16, &o->batch)) return EXIT_USAGE;
            break;
        case 'B': /* a week is more than any search needs */
            if (cli_parse_double(prog, "--budget", optarg, 0.0, 7 * 86400.0, &o->budget))
                return EXIT_USAGE;
            break;
        case 'q': o->quick = 1; break;
        case 'r':
            if (cli_parse_int(prog, "--reps", optarg, 0, 100000, &o->reps)) return EXIT_USAGE;
            break;
        case 'n': o->store = 0; break;
        case 'j': o->json = 1; break;
        case 'S': *show = 1; break;
        case 'L': *list = 1; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "clkvq-tune: unexpected argument '%s'\n", argv[optind]);
        return EXIT_USAGE;
    }
    if (o->group % 32 != 0) {
        fprintf(stderr, "clkvq-tune: --group %d is not a multiple of 32\n", o->group);
        return EXIT_USAGE;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "precision"))
        return precision_main(argc - 1, argv + 1);
    cli_options o;
    memset(&o, 0, sizeof o);
    o.group = 32;
    o.batch = 1;
    o.store = 1;
    snprintf(o.formats, sizeof o.formats, "k4v4,k2v2");
    int show = 0, list = 0;
    int rc = parse_args(argc, argv, &o, &show, &list);
    if (rc)
        return rc;
    if (list)
        return clkvq_list_devices(stdout) == CLKVQ_OK ? 0 : EXIT_RUNTIME;
    if (o.n_models == 0)
        o.models[o.n_models++] = &g_models[0];
    if (o.n_tokens == 0) {
        o.tokens[0] = 4096;
        o.tokens[1] = 32768;
        o.n_tokens = 2;
    }

    /* shapes: model x format x tokens */
    clkvq_tune_shape pairs[16];
    int n_pairs = 0;
    char formats[256];
    snprintf(formats, sizeof formats, "%s", o.formats);
    for (char *save = NULL, *f = strtok_r(formats, ",", &save); f && n_pairs < 16;
         f = strtok_r(NULL, ",", &save)) {
        memset(&pairs[n_pairs], 0, sizeof pairs[n_pairs]);
        if (parse_format_pair(f, &pairs[n_pairs]) != 0) {
            fprintf(stderr, "clkvq-tune: bad format '%s' (e.g. fp16, k4v4, k2v1.5)\n", f);
            return EXIT_USAGE;
        }
        n_pairs++;
    }
    static clkvq_tune_shape shapes[MAX_SHAPES];
    static const char *shape_models[MAX_SHAPES];
    int n_shapes = 0;
    for (int m = 0; m < o.n_models; m++)
        for (int f = 0; f < n_pairs; f++)
            for (int t = 0; t < o.n_tokens && n_shapes < MAX_SHAPES; t++) {
                clkvq_tune_shape *sh = &shapes[n_shapes];
                *sh = pairs[f];
                sh->group_size = o.group;
                sh->head_dim = o.models[m]->head_dim;
                sh->n_q_heads = o.models[m]->n_q_heads;
                sh->n_kv_heads = o.models[m]->n_kv_heads;
                sh->tokens = o.tokens[t];
                sh->batch = o.batch;
                shape_models[n_shapes++] = o.models[m]->name;
            }

    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, o.device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-tune: %s: %s\n", clkvq_status_string(st), clkvq_last_error(NULL));
        return EXIT_RUNTIME;
    }
    if (show) {
        st = clkvq_tuning_show(ctx, stdout);
        clkvq_context_release(ctx);
        return st == CLKVQ_OK ? 0 : EXIT_RUNTIME;
    }
    clkvq_device_info info;
    clkvq_context_device_info(ctx, &info);

    clkvq_tune_result *results = calloc((size_t)n_shapes, sizeof *results);
    progress_state ps = {isatty(fileno(stderr)), 0.0, 0, n_shapes, ""};
    for (int i = 0; i < n_shapes && st == CLKVQ_OK; i++) {
        char f[32];
        ps.shape_index = i;
        ps.start = now_s();
        snprintf(ps.label, sizeof ps.label, "%s %dk %s", shape_models[i],
                 shapes[i].tokens / 1024, format_label(&shapes[i], f, sizeof f));
        clkvq_tune_options opt = {o.budget, o.quick, o.reps, 1, on_progress, &ps};
        st = clkvq_tune_decode(ctx, &shapes[i], &opt, &results[i]);
        if (st != CLKVQ_OK)
            fprintf(stderr, "clkvq-tune: %s: %s: %s\n", ps.label, clkvq_status_string(st),
                    clkvq_last_error(ctx));
    }
    char path[1024] = "";
    if (st == CLKVQ_OK && o.store) {
        st = clkvq_tuning_store(ctx, results, n_shapes, path, sizeof path);
        if (st != CLKVQ_OK)
            fprintf(stderr, "clkvq-tune: storing results: %s: %s\n", clkvq_status_string(st),
                    clkvq_last_error(ctx));
    }
    if (st == CLKVQ_OK) {
        if (o.json)
            print_json(&info, results, n_shapes, shape_models, o.store ? path : NULL);
        else
            print_table(&info, results, n_shapes, shape_models, o.store ? path : NULL);
    }
    free(results);
    clkvq_context_release(ctx);
    return st == CLKVQ_OK ? 0 : EXIT_RUNTIME;
}

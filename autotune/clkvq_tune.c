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

static void usage(FILE *out)
{
    fprintf(out,
            "usage: clkvq-tune [options]                 tune formats at model shapes\n"
            "       clkvq-tune --config FILE [options]   tune every layer setting of a config\n"
            "       clkvq-tune precision --calib FILE --budget BITS [...] (see --help there)\n"
            "Tunes fused decode attention (variant, work-group size, chunk, vector width,\n"
            "packed layouts) for this machine's device, checks every candidate against a\n"
            "double-precision reference, and caches the fastest per shape in\n"
            "<cache dir>/tuning/<device key>.json, which the library reads at run time.\n"
            "With no options: the default device, Llama-3-8B shape at 4k and 32k tokens,\n"
            "formats k4v4 and k2v2 (per-token groups of 32), batch 1.\n"
            "With --config: every distinct (scheme, K bits, V bits, group) of the config's\n"
            "layers at the model's geometry and each --tokens length, so that a cache of\n"
            "that capacity and --batch sequences finds an exact entry for every layer; the\n"
            "config is stored as <cache dir>/configs/<model>.yaml, where\n"
            "clkvq_cache_create_for_model finds it. The geometry comes from --geometry, else\n"
            "--model, else the file (its n_q_heads/n_kv_heads/head_dim, its model, or the\n"
            "model in a KVTuner preset's file name). KVTuner presets load with the settings\n"
            "they were searched under (kivi: group 32, residual 32; pertoken: one group per\n"
            "head) unless --scheme/--group/--residual say otherwise.\n\n"
            "options:\n"
            "  --device SPEC     device index or name substring (default: $CLKVQ_DEVICE,\n"
            "                    else the first GPU, else the first device)\n"
            "  --model NAME      a model of the table (--list-models; repeatable); with\n"
            "                    --config also any other name to store the config under\n"
            "                    (its geometry from --geometry or the file)\n"
            "  --shape NAME      the same as --model\n"
            "  --geometry G      any model: q<heads>:kv<kv heads>:d<head_dim>:l<layers>,\n"
            "                    e.g. q32:kv8:d128:l32 (repeatable)\n"
            "  --config FILE     a layer precision config (YAML, e.g. a KVTuner preset)\n"
            "  --scheme S        --config: the scheme of layers the file leaves open\n"
            "  --residual R      --config: the kivi residual the file leaves open\n"
            "  --tokens N[,N..]  context lengths (repeatable; default 4096,32768)\n"
            "  --formats LIST    e.g. fp16,k8v8,k4v4,k4v2,k2v2,k2v1.5 (default k4v4,k2v2)\n"
            "  --group G         group size of the packed formats (default 32; with\n"
            "                    --config, of layers the file leaves open)\n"
            "  --batch N         sequences per decode step (default 1)\n"
            "  --budget SECONDS  per shape: random sampling + local search within it\n"
            "                    (default 0 = the whole space)\n"
            "  --quick           a small space (a few candidates: CI, demos)\n"
            "  --reps N          timed runs per candidate, median (default 5)\n"
            "  --no-store        write neither the tuning file nor the config\n"
            "  --json            print one JSON object instead of the table\n"
            "  --show            print what is cached for this device (tuning, stored\n"
            "                    configs and which of their settings are tuned) and exit\n"
            "  --list-devices    list OpenCL devices and exit\n"
            "  --list-models     list the model table (name, geometry) and exit\n"
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
            "average bits fit the budget. The config carries the dump's geometry (layers,\n"
            "heads, head_dim).\n\n"
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
            "  --model NAME      the model the config is for (default: the dump's)\n"
            "  -o FILE           where to write the config (default: stored as the model's,\n"
            "                    <cache dir>/configs/<model>.yaml, where\n"
            "                    clkvq_cache_create_for_model finds it)\n"
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
        {"model", required_argument, 0, 'm'},   {0, 0, 0, 0}};
    const char *calib = NULL, *device = NULL, *output = NULL, *model = NULL;
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
        case 'm': model = optarg; break;
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
    char stored[1024] = "";
    clkvq_dump_info info;
    st = clkvq_dump_open(ctx, calib, &dump);
    if (st == CLKVQ_OK)
        st = clkvq_dump_info_get(dump, &info);
    /* where it goes is settled before the search, not after */
    if (st == CLKVQ_OK && !output) {
        if (!model)
            model = info.model;
        clkvq_model_geometry row;
        int bad = 0;
        if (!*model) {
            fprintf(stderr, "clkvq-tune precision: the dump names no model: give --model NAME "
                            "(to store the config as that model's) or -o FILE\n");
            bad = 1;
        } else if (clkvq_model_canonical(model) && clkvq_model_lookup(model, &row) == CLKVQ_OK &&
                   (row.n_layers != info.n_layers || row.n_q_heads != info.n_q_heads ||
                    row.n_kv_heads != info.n_kv_heads || row.head_dim != info.head_dim)) {
            char want[64];
            clkvq_model_format(&row, want, sizeof want);
            fprintf(stderr,
                    "clkvq-tune precision: the dump (%d layers, q%d:kv%d:d%d) is not %s's "
                    "geometry (%s): store it under another --model name, or -o FILE\n",
                    info.n_layers, info.n_q_heads, info.n_kv_heads, info.head_dim,
                    clkvq_model_canonical(model), want);
            bad = 1;
        }
        if (bad) {
            clkvq_dump_close(dump);
            clkvq_context_release(ctx);
            return EXIT_USAGE;
        }
    }
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
    if (st == CLKVQ_OK && output)
        st = clkvq_config_save(ctx, cfg, output);
    else if (st == CLKVQ_OK)
        st = clkvq_config_store(ctx, cfg, model, stored, sizeof stored);
    if (!output)
        output = stored;
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

/* ------------------------------------------------------------ options */

#define MAX_MODELS 8

typedef struct {
    const char *device;
    const char *models[MAX_MODELS]; /* --model / --shape, as typed */
    int n_models;
    clkvq_model_geometry geoms[MAX_MODELS]; /* --geometry */
    const char *geom_text[MAX_MODELS];
    int n_geoms;
    const char *config;
    int tokens[16], n_tokens;
    char formats[256];
    int formats_given;
    clkvq_scheme scheme;
    int scheme_given;
    int group, group_given, residual, residual_given;
    int batch, quick, reps, store, json;
    double budget;
} cli_options;

static int parse_args(int argc, char **argv, cli_options *o, int *show, int *list)
{
    static const char prog[] = "clkvq-tune";
    static const struct option longopts[] = {
        {"device", required_argument, 0, 'd'},   {"shape", required_argument, 0, 's'},
        {"model", required_argument, 0, 's'},    {"geometry", required_argument, 0, 'G'},
        {"config", required_argument, 0, 'c'},   {"scheme", required_argument, 0, 'S'},
        {"residual", required_argument, 0, 'R'}, {"tokens", required_argument, 0, 't'},
        {"formats", required_argument, 0, 'f'},  {"group", required_argument, 0, 'g'},
        {"batch", required_argument, 0, 'b'},    {"budget", required_argument, 0, 'B'},
        {"quick", no_argument, 0, 'q'},          {"reps", required_argument, 0, 'r'},
        {"no-store", no_argument, 0, 'n'},       {"json", no_argument, 0, 'j'},
        {"show", no_argument, 0, 'w'},           {"list-devices", no_argument, 0, 'L'},
        {"list-models", no_argument, 0, 'M'},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'd': o->device = optarg; break;
        case 's':
            if (o->n_models == MAX_MODELS) {
                fprintf(stderr, "clkvq-tune: at most %d --model / --shape\n", MAX_MODELS);
                return EXIT_USAGE;
            }
            o->models[o->n_models++] = optarg;
            break;
        case 'G':
            if (o->n_geoms == MAX_MODELS) {
                fprintf(stderr, "clkvq-tune: at most %d --geometry\n", MAX_MODELS);
                return EXIT_USAGE;
            }
            if (clkvq_model_parse(optarg, &o->geoms[o->n_geoms]) != CLKVQ_OK) {
                fprintf(stderr, "clkvq-tune: --geometry: %s\n", clkvq_last_error(NULL));
                return EXIT_USAGE;
            }
            o->geom_text[o->n_geoms++] = optarg;
            break;
        case 'c': o->config = optarg; break;
        case 'S':
            if (clkvq_scheme_parse(optarg, &o->scheme) != CLKVQ_OK) {
                fprintf(stderr, "clkvq-tune: --scheme '%s' is not fp16, token, kivi or skvq\n",
                        optarg);
                return EXIT_USAGE;
            }
            o->scheme_given = 1;
            break;
        case 'R':
            if (cli_parse_int(prog, "--residual", optarg, 32, 1 << 24, &o->residual))
                return EXIT_USAGE;
            o->residual_given = 1;
            break;
        case 't': { /* repeatable: the lists add up */
            int n = parse_int_list(optarg, o->tokens + o->n_tokens, 16 - o->n_tokens);
            if (n <= 0) {
                fprintf(stderr,
                        "clkvq-tune: --tokens '%s' is not a list of integers in [1, %d] (at most "
                        "16 lengths in all)\n",
                        optarg, 1 << 24);
                return EXIT_USAGE;
            }
            o->n_tokens += n;
            break;
        }
        case 'f':
            snprintf(o->formats, sizeof o->formats, "%s", optarg);
            o->formats_given = 1;
            break;
        case 'g':
            if (cli_parse_int(prog, "--group", optarg, 32, 1 << 16, &o->group)) return EXIT_USAGE;
            o->group_given = 1;
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
        case 'w': *show = 1; break;
        case 'L': *list = 1; break;
        case 'M': *list = 2; break;
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
    if (o->config) {
        if (o->n_models > 1 || o->n_geoms > 1) {
            fprintf(stderr, "clkvq-tune: --config tunes one model: one --model and/or one "
                            "--geometry\n");
            return EXIT_USAGE;
        }
        if (o->formats_given) {
            fprintf(stderr, "clkvq-tune: --formats and --config exclude each other (a config "
                            "names its own pairs)\n");
            return EXIT_USAGE;
        }
    } else if (o->scheme_given || o->residual_given) {
        fprintf(stderr, "clkvq-tune: --scheme and --residual go with --config\n");
        return EXIT_USAGE;
    }
    /* a model name is looked up in the table, except with --config: there a
     * name the table does not know only names the model, whose geometry
     * then comes from --geometry or the file */
    for (int m = 0; m < o->n_models; m++) {
        clkvq_model_geometry g;
        if (!o->config && clkvq_model_lookup(o->models[m], &g) != CLKVQ_OK) {
            fprintf(stderr, "clkvq-tune: --model: %s\n", clkvq_last_error(NULL));
            return EXIT_USAGE;
        }
    }
    return 0;
}

static void list_models(void)
{
    for (int i = 0; i < clkvq_model_count(); i++) {
        clkvq_model_geometry g;
        char text[64];
        clkvq_model_lookup(clkvq_model_name(i), &g);
        clkvq_model_format(&g, text, sizeof text);
        printf("%-18s %s\n", clkvq_model_name(i), text);
    }
}

/* ------------------------------------------------------------ --config */

/* Whether a kv head of layer l has setting `which` (head_shape:
 * clkvq_config_tune_shapes' [n_layers][n_heads]). */
static int layer_uses(const int *head_shape, int n_heads, int l, int which)
{
    for (int h = 0; h < n_heads; h++)
        if (head_shape[(size_t)l * n_heads + h] == which)
            return 1;
    return 0;
}

/* "0-3,5,7-9": the layers with a head whose setting is `which`. */
static void layer_ranges(const int *head_shape, int n_layers, int n_heads, int which, char *buf,
                         size_t size)
{
    buf[0] = '\0';
    for (int l = 0; l < n_layers; l++) {
        if (!layer_uses(head_shape, n_heads, l, which))
            continue;
        int end = l;
        while (end + 1 < n_layers && layer_uses(head_shape, n_heads, end + 1, which))
            end++;
        size_t used = strlen(buf);
        if (used + 1 >= size)
            return;
        snprintf(buf + used, size - used, end > l ? "%s%d-%d" : "%s%d", used ? "," : "", l, end);
        l = end;
    }
}

static const char *setting_label(const clkvq_tune_shape *s, char *buf, size_t size)
{
    if (s->scheme == CLKVQ_SCHEME_FP16)
        snprintf(buf, size, "fp16");
    else
        snprintf(buf, size, "%s K%sV%s g%d", clkvq_scheme_name(s->scheme),
                 clkvq_format_get(s->format_k)->bits_name,
                 clkvq_format_get(s->format_v)->bits_name, s->group_size);
    return buf;
}

typedef struct {
    clkvq_tune_result res;
    char layers[256];
    clkvq_tuning_source after; /* what a cache's lookup finds once stored */
} config_row;

static void print_config_table(const clkvq_device_info *info, const char *path,
                               const char *model, const clkvq_precision_config *cfg,
                               const config_row *rows, int n)
{
    clkvq_model_geometry g;
    char geo[64];
    clkvq_config_geometry(cfg, &g);
    clkvq_model_format(&g, geo, sizeof geo);
    printf("clkvq-tune: %s / %s (driver %s, %d CUs)\n", info->platform, info->name,
           info->driver_version, info->compute_units);
    printf("device key: %s\n", info->device_key);
    printf("config: %s (model %s, %s, %.4g average bits)\n\n", path, *model ? model : "unnamed",
           geo, clkvq_config_average_bits(cfg));
    printf("| setting | layers | tokens | batch | default ms | tuned ms | speedup | params | "
           "candidates (rejected) |\n");
    printf("|:--|:--|--:|--:|--:|--:|--:|:--|--:|\n");
    for (int i = 0; i < n; i++) {
        const clkvq_tune_result *r = &rows[i].res;
        char s[64], p[96];
        printf("| %s | %s | %d | %d | %.3f | %.3f | %.2fx | %s | %d (%d) |\n",
               setting_label(&r->shape, s, sizeof s), rows[i].layers, r->shape.tokens,
               r->shape.batch, r->default_ms, r->tuned_ms, r->default_ms / r->tuned_ms,
               params_label(&r->params, p, sizeof p), r->n_candidates, r->n_rejected);
    }
}

static void print_config_json(const clkvq_device_info *info, const char *path,
                              const char *model, const clkvq_precision_config *cfg,
                              const config_row *rows, int n, const char *tuning_file,
                              const char *config_file)
{
    clkvq_model_geometry g;
    char geo[64];
    clkvq_config_geometry(cfg, &g);
    clkvq_model_format(&g, geo, sizeof geo);
    cJSON *root = cJSON_CreateObject();
    char device[512];
    snprintf(device, sizeof device, "%s / %s", info->platform, info->name);
    cJSON_AddStringToObject(root, "device", device);
    cJSON_AddStringToObject(root, "device_key", info->device_key);
    cJSON_AddStringToObject(root, "config", path);
    cJSON_AddStringToObject(root, "model", model);
    cJSON_AddStringToObject(root, "geometry", geo);
    cJSON_AddNumberToObject(root, "average_bits", clkvq_config_average_bits(cfg));
    cJSON_AddStringToObject(root, "tuning_file", tuning_file);
    cJSON_AddStringToObject(root, "config_file", config_file);
    cJSON *list = cJSON_AddArrayToObject(root, "results");
    for (int i = 0; i < n; i++) {
        const clkvq_tune_result *r = &rows[i].res;
        cJSON *o = cJSON_CreateObject();
        char s[64], p[96];
        cJSON_AddStringToObject(o, "setting", setting_label(&r->shape, s, sizeof s));
        cJSON_AddStringToObject(o, "layers", rows[i].layers);
        cJSON_AddNumberToObject(o, "tokens", r->shape.tokens);
        cJSON_AddNumberToObject(o, "batch", r->shape.batch);
        cJSON_AddNumberToObject(o, "default_ms", r->default_ms);
        cJSON_AddNumberToObject(o, "tuned_ms", r->tuned_ms);
        cJSON_AddStringToObject(o, "params", params_label(&r->params, p, sizeof p));
        cJSON_AddNumberToObject(o, "candidates", r->n_candidates);
        cJSON_AddNumberToObject(o, "rejected", r->n_rejected);
        cJSON_AddStringToObject(o, "lookup", clkvq_tuning_source_name(rows[i].after));
        cJSON_AddItemToArray(list, o);
    }
    char *text = cJSON_Print(root);
    printf("%s\n", text);
    free(text);
    cJSON_Delete(root);
}

#define MAX_SETTINGS 64

/* Tunes every distinct layer setting of the config at the model's geometry
 * and each length asked for, so that every layer of a cache of that
 * capacity and batch finds an exact entry; stores both. */
static int config_main(const cli_options *o, clkvq_context *ctx)
{
    clkvq_layer_config defaults, *dp = NULL;
    if (o->scheme_given || o->group_given || o->residual_given) {
        defaults = clkvq_layer_config_default(o->scheme_given ? o->scheme : CLKVQ_SCHEME_TOKEN);
        if (o->group_given)
            defaults.group_size = o->group;
        if (o->residual_given)
            defaults.residual = o->residual;
        dp = &defaults;
    }
    clkvq_model_geometry g, *gp = NULL;
    int named_unknown = o->n_models && !clkvq_model_canonical(o->models[0]);
    if (o->n_geoms)
        gp = &g, g = o->geoms[0];
    else if (o->n_models && !named_unknown)
        gp = &g, clkvq_model_lookup(o->models[0], &g);
    clkvq_precision_config *cfg = NULL;
    clkvq_status st = clkvq_config_load_for_model(ctx, o->config, dp, gp, &cfg);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-tune: %s: %s%s\n", clkvq_status_string(st), clkvq_last_error(ctx),
                gp ? ""
                : named_unknown
                    ? " (--model names no model of the table, see --list-models; give "
                      "--geometry q<h>:kv<h>:d<dim>:l<layers>)"
                    : " (--model NAME or --geometry q<h>:kv<h>:d<dim>:l<layers>)");
        return EXIT_RUNTIME;
    }
    clkvq_config_geometry(cfg, &g);
    const char *model = o->n_models ? o->models[0] : clkvq_config_model(cfg);
    /* a model of the table must have this geometry to be stored under its
     * name: say so before tuning, not after */
    clkvq_model_geometry row;
    if (o->store && clkvq_model_canonical(model) && clkvq_model_lookup(model, &row) == CLKVQ_OK &&
        clkvq_config_check_geometry(ctx, cfg, &row) != CLKVQ_OK) {
        fprintf(stderr, "clkvq-tune: cannot store the config as %s: %s\n", model,
                clkvq_last_error(ctx));
        clkvq_config_free(cfg);
        return EXIT_RUNTIME;
    }
    int n_layers = clkvq_config_n_layers(cfg);
    int *of = calloc((size_t)n_layers * g.n_kv_heads, sizeof *of);
    config_row *rows = calloc((size_t)MAX_SETTINGS * (size_t)o->n_tokens, sizeof *rows);
    clkvq_tune_shape shapes[MAX_SETTINGS];
    int first[MAX_SETTINGS], n_rows = 0, n_shapes = 0;
    if (!of || !rows)
        st = CLKVQ_ERR_OUT_OF_MEMORY;
    /* every length asked for: the settings are the same, the shapes' tokens differ */
    for (int t = 0; t < o->n_tokens && st == CLKVQ_OK; t++) {
        st = clkvq_config_tune_shapes(ctx, cfg, &g, o->tokens[t], o->batch, shapes, MAX_SETTINGS,
                                      &n_shapes, of, first);
        for (int i = 0; i < n_shapes && st == CLKVQ_OK; i++) {
            rows[n_rows].res.shape = shapes[i];
            config_row *r = &rows[n_rows];
            layer_ranges(of, n_layers, g.n_kv_heads, i, r->layers, sizeof r->layers);
            if (shapes[i].n_kv_heads < g.n_kv_heads) { /* a share of per-head layers */
                size_t used = strlen(r->layers);
                snprintf(r->layers + used, sizeof r->layers - used, " (%d of %d kv heads)",
                         shapes[i].n_kv_heads, g.n_kv_heads);
            }
            n_rows++;
        }
    }
    if (st != CLKVQ_OK && st != CLKVQ_ERR_OUT_OF_MEMORY)
        fprintf(stderr, "clkvq-tune: %s: %s\n", clkvq_status_string(st), clkvq_last_error(ctx));
    progress_state ps = {isatty(fileno(stderr)), 0.0, 0, n_rows, ""};
    for (int i = 0; i < n_rows && st == CLKVQ_OK; i++) {
        char s[64];
        clkvq_layer_config lc;
        clkvq_config_layer(cfg, first[i % n_shapes], &lc);
        lc.format_k = rows[i].res.shape.format_k; /* a per-head layer: this share's pair */
        lc.format_v = rows[i].res.shape.format_v;
        ps.shape_index = i;
        ps.start = now_s();
        snprintf(ps.label, sizeof ps.label, "%s %dk %s", model, rows[i].res.shape.tokens / 1024,
                 setting_label(&rows[i].res.shape, s, sizeof s));
        clkvq_tune_options opt = {o->budget, o->quick, o->reps, 1, on_progress, &ps, &lc};
        clkvq_tune_shape shape = rows[i].res.shape;
        st = clkvq_tune_decode(ctx, &shape, &opt, &rows[i].res);
        if (st != CLKVQ_OK)
            fprintf(stderr, "clkvq-tune: %s: %s: %s\n", ps.label, clkvq_status_string(st),
                    clkvq_last_error(ctx));
    }
    char tuning_path[1024] = "", config_path[1024] = "";
    clkvq_tune_result *results = st == CLKVQ_OK ? calloc((size_t)n_rows + 1, sizeof *results)
                                                : NULL;
    if (st == CLKVQ_OK && !results)
        st = CLKVQ_ERR_OUT_OF_MEMORY;
    for (int i = 0; i < n_rows && results; i++)
        results[i] = rows[i].res;
    if (st == CLKVQ_OK && o->store) {
        st = clkvq_tuning_store(ctx, results, n_rows, tuning_path, sizeof tuning_path);
        if (st == CLKVQ_OK && *model)
            st = clkvq_config_store(ctx, cfg, model, config_path, sizeof config_path);
        if (st != CLKVQ_OK)
            fprintf(stderr, "clkvq-tune: storing: %s: %s\n", clkvq_status_string(st),
                    clkvq_last_error(ctx));
    }
    /* what a cache of each capacity will find, layer by layer */
    int exact = 0;
    for (int i = 0; i < n_rows && st == CLKVQ_OK; i++) {
        clkvq_tune_params p;
        rows[i].after = CLKVQ_TUNED_BUILTIN;
        if (clkvq_tuning_lookup(ctx, &rows[i].res.shape, &p, &rows[i].after) != CLKVQ_OK)
            rows[i].after = CLKVQ_TUNED_BUILTIN;
        exact += rows[i].after == CLKVQ_TUNED_EXACT;
    }
    clkvq_device_info info;
    clkvq_context_device_info(ctx, &info);
    if (st == CLKVQ_OK && o->json)
        print_config_json(&info, o->config, model, cfg, rows, n_rows, tuning_path, config_path);
    if (st == CLKVQ_OK && !o->json) {
        print_config_table(&info, o->config, model, cfg, rows, n_rows);
        printf("\n");
        if (exact == n_rows)
            printf("lookup: every layer finds an exact tuning entry (%d layers, %d setting%s, "
                   "at each length for batch %d)\n",
                   n_layers, n_shapes, n_shapes == 1 ? "" : "s", o->batch);
        else
            printf("lookup: %d of %d (setting, length) pairs find an exact entry%s\n", exact,
                   n_rows, o->store ? "" : " (--no-store: nothing was written)");
        for (int t = 0; t < o->n_tokens; t++) { /* a cache takes layer 0's layouts (AUTO) */
            const clkvq_tune_params *p0 = &rows[t * n_shapes].res.params;
            for (int i = 1; i < n_shapes; i++) {
                const clkvq_tune_params *p = &rows[t * n_shapes + i].res.params;
                if (p->layout_k != p0->layout_k || p->layout_v != p0->layout_v) {
                    printf("note: at %d tokens the settings chose different layouts; a cache "
                           "with AUTO layouts takes layer 0's for every layer\n",
                           o->tokens[t]);
                    break;
                }
            }
        }
        if (*tuning_path)
            printf("tuning cached in %s\n", tuning_path);
        if (*config_path)
            printf("config stored as %s (clkvq_cache_create_for_model(ctx, \"%s\", ...) opens "
                   "it)\n",
                   config_path, model);
        else if (o->store)
            printf("config not stored: it names no model (give --model NAME)\n");
    }
    free(results);
    free(rows);
    free(of);
    clkvq_config_free(cfg);
    if (st == CLKVQ_ERR_OUT_OF_MEMORY)
        fprintf(stderr, "clkvq-tune: out of memory\n");
    return st == CLKVQ_OK ? 0 : EXIT_RUNTIME;
}

/* ------------------------------------------------------------ main */

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
    if (list == 1)
        return clkvq_list_devices(stdout) == CLKVQ_OK ? 0 : EXIT_RUNTIME;
    if (list == 2) {
        list_models();
        return 0;
    }
    if (o.n_tokens == 0) {
        o.tokens[0] = 4096;
        o.tokens[1] = 32768;
        o.n_tokens = 2;
    }

    /* format mode: shapes = model x format x tokens */
    static clkvq_tune_shape shapes[MAX_SHAPES];
    static char shape_labels[MAX_SHAPES][64];
    static const char *shape_models[MAX_SHAPES];
    int n_shapes = 0;
    if (!o.config) {
        clkvq_tune_shape pairs[16];
        int n_pairs = 0;
        char formats[256];
        snprintf(formats, sizeof formats, "%s", o.formats);
        for (char *save = NULL, *f = strtok_r(formats, ",", &save); f;
             f = strtok_r(NULL, ",", &save)) {
            int ok = n_pairs < 16;
            if (ok) {
                memset(&pairs[n_pairs], 0, sizeof pairs[n_pairs]);
                ok = parse_format_pair(f, &pairs[n_pairs]) == 0;
            }
            if (!ok) {
                fprintf(stderr, "clkvq-tune: bad format '%s' (e.g. fp16, k4v4, k2v1.5; at most "
                                "16)\n", f);
                return EXIT_USAGE;
            }
            n_pairs++;
        }
        clkvq_model_geometry geos[2 * MAX_MODELS];
        int n_geos = 0;
        for (int m = 0; m < o.n_models; m++) {
            clkvq_model_lookup(o.models[m], &geos[n_geos]);
            snprintf(shape_labels[n_geos++], sizeof shape_labels[0], "%s",
                     clkvq_model_canonical(o.models[m]));
        }
        for (int m = 0; m < o.n_geoms; m++) {
            geos[n_geos] = o.geoms[m];
            snprintf(shape_labels[n_geos++], sizeof shape_labels[0], "%s", o.geom_text[m]);
        }
        if (n_geos == 0) { /* the default: Llama-3-8B's attention */
            clkvq_model_lookup("llama-3-8b", &geos[0]);
            snprintf(shape_labels[n_geos++], sizeof shape_labels[0], "llama-3-8b");
        }
        for (int m = 0; m < n_geos; m++)
            for (int f = 0; f < n_pairs; f++)
                for (int t = 0; t < o.n_tokens; t++) {
                    if (n_shapes == MAX_SHAPES) {
                        fprintf(stderr, "clkvq-tune: more than %d shapes asked for\n",
                                MAX_SHAPES);
                        return EXIT_USAGE;
                    }
                    clkvq_tune_shape *sh = &shapes[n_shapes];
                    *sh = pairs[f];
                    sh->group_size = o.group;
                    sh->head_dim = geos[m].head_dim;
                    sh->n_q_heads = geos[m].n_q_heads;
                    sh->n_kv_heads = geos[m].n_kv_heads;
                    sh->tokens = o.tokens[t];
                    sh->batch = o.batch;
                    shape_models[n_shapes++] = shape_labels[m];
                }
    }

    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, o.device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-tune: %s: %s\n", clkvq_status_string(st), clkvq_last_error(NULL));
        return EXIT_RUNTIME;
    }
    if (show) {
        st = clkvq_tuning_show(ctx, stdout);
        if (st == CLKVQ_OK) {
            printf("\n");
            st = clkvq_config_show(ctx, stdout);
        }
        if (st != CLKVQ_OK)
            fprintf(stderr, "clkvq-tune: %s: %s\n", clkvq_status_string(st),
                    clkvq_last_error(ctx));
        clkvq_context_release(ctx);
        return st == CLKVQ_OK ? 0 : EXIT_RUNTIME;
    }
    if (o.config) {
        rc = config_main(&o, ctx);
        clkvq_context_release(ctx);
        return rc;
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
        clkvq_tune_options opt = {o.budget, o.quick, o.reps, 1, on_progress, &ps, NULL};
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

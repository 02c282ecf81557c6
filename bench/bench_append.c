/*
 * clkvq-bench append: what one decode step's cache append costs next to
 * the step's attention, per cache format. A runtime appends each new
 * token's K and V to every layer and then attends over the layer; this
 * mode times both on the same one-layer cache (Llama-3-8B by default),
 * filled with --tokens synthetic tokens first.
 *
 * One rep = append one token to the sequence (clkvq_cache_append from host
 * arrays, then clkvq_cache_append_mem from device buffers, the path a
 * runtime whose K/V live on the device takes), then one decode
 * (clkvq_cache_decode on device buffers). Times are wall clock around each
 * call (appends return finished; a decode only enqueues, so its time runs
 * to a clFinish after it; append includes its input check, its
 * kernels and, from the host, the upload), plus the decode's device time
 * (clkvq_last_device_ms); medians of --reps after 2 warm-up reps. The
 * cache grows by two tokens a rep, which changes the decode by nothing
 * measurable at thousands of tokens.
 */
#include "bench_util.h"

#include "clkvq.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WARMUPS 2
#define FILL_CHUNK 4096
#define SYNTH_SEED 1
#define Q_SEED 12345u

typedef struct {
    const char *name;
    int fp16;
    clkvq_format format_k, format_v;
} append_format;

static const append_format g_formats[] = {
    {"fp16", 1, CLKVQ_FMT_Q8, CLKVQ_FMT_Q8},  {"k8v8", 0, CLKVQ_FMT_Q8, CLKVQ_FMT_Q8},
    {"k4v4", 0, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4},  {"k4v2", 0, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2},
    {"k2v2", 0, CLKVQ_FMT_Q2, CLKVQ_FMT_Q2},  {"k2v1.5", 0, CLKVQ_FMT_Q2, CLKVQ_FMT_T15},
};
#define N_FORMATS ((int)(sizeof g_formats / sizeof g_formats[0]))

typedef struct {
    int n_q_heads, n_kv_heads, head_dim;
    int tokens, reps, json;
    int formats[N_FORMATS];
    const char *device;
} append_options;

typedef struct {
    int format;
    double append_host_ms, append_mem_ms, decode_ms, decode_device_ms;
} append_result;

static const char *const g_prog = "clkvq-bench append";

static void usage(FILE *out) {
    fprintf(out,
            "usage: clkvq-bench append [options]\n"
            "\n"
            "The cost of a decode step's one-token append to a layer's cache next to the\n"
            "step's attention over it, per cache format (per-token scheme, group 32, fp16\n"
            "scale/zero, group-planar layouts, the device's default decode tunables; fp16 =\n"
            "the unquantized cache). The cache is filled with --tokens synthetic tokens,\n"
            "then each rep appends one token (from host arrays, then from device buffers)\n"
            "and decodes once. Wall time of each call, and the decode's device time;\n"
            "medians of --reps after %d warm-up reps.\n"
            "\n"
            "options:\n"
            "  -t, --tokens N     tokens in the cache before the reps (default 4096)\n"
            "  -f, --formats LIST fp16,k8v8,k4v4,k4v2,k2v2,k2v1.5 (default all)\n"
            "  -r, --reps N       timed reps; median (default 20)\n"
            "  -d, --device S     device index or name substring (default $CLKVQ_DEVICE, else\n"
            "                     the first GPU, else the first device)\n"
            "  -j, --json         print one JSON object instead of the table\n"
            "  -h, --help         this text\n"
            "\n"
            "Shape: Llama-3-8B (32 q heads, 8 kv heads, head_dim 128), one layer, batch 1.\n"
            "columns: append host / append mem = wall ms of clkvq_cache_append (host arrays,\n"
            "uploaded) / clkvq_cache_append_mem (device buffers); decode = wall ms of\n"
            "clkvq_cache_decode, decode dev = its device time; %% of decode = append mem /\n"
            "decode wall\n"
            "\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n",
            WARMUPS);
}

static int parse_options(int argc, char **argv, append_options *opt) {
    static const struct option longopts[] = {{"tokens", required_argument, NULL, 't'},
                                             {"formats", required_argument, NULL, 'f'},
                                             {"reps", required_argument, NULL, 'r'},
                                             {"device", required_argument, NULL, 'd'},
                                             {"json", no_argument, NULL, 'j'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    memset(opt, 0, sizeof *opt);
    opt->n_q_heads = 32;
    opt->n_kv_heads = 8;
    opt->head_dim = 128;
    opt->tokens = 4096;
    opt->reps = 20;
    for (int i = 0; i < N_FORMATS; i++) opt->formats[i] = 1;
    long value;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "t:f:r:d:jh", longopts, NULL)) != -1) {
        switch (c) {
        case 't':
            if (bench_parse_int(optarg, 1, 1 << 20, &value)) {
                fprintf(stderr, "%s: --tokens wants 1..%d, got '%s'\n", g_prog, 1 << 20, optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->tokens = (int)value;
            break;
        case 'f': {
            char buf[256];
            if (strlen(optarg) >= sizeof buf) {
                fprintf(stderr, "%s: --formats: list too long\n", g_prog);
                return BENCH_EXIT_USAGE;
            }
            strcpy(buf, optarg);
            memset(opt->formats, 0, sizeof opt->formats);
            int any = 0;
            char *save = NULL;
            for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
                int found = 0;
                for (int i = 0; i < N_FORMATS; i++)
                    if (!strcmp(item, g_formats[i].name) || !strcmp(item, "all"))
                        opt->formats[i] = found = 1;
                if (!found) {
                    fprintf(stderr,
                            "%s: --formats: unknown format '%s' (fp16, k8v8, k4v4, k4v2, "
                            "k2v2, k2v1.5, all)\n",
                            g_prog, item);
                    return BENCH_EXIT_USAGE;
                }
                any = 1;
            }
            if (!any) {
                fprintf(stderr, "%s: --formats: empty list\n", g_prog);
                return BENCH_EXIT_USAGE;
            }
            break;
        }
        case 'r':
            if (bench_parse_int(optarg, 1, 100000, &value)) {
                fprintf(stderr, "%s: --reps wants 1..100000, got '%s'\n", g_prog, optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->reps = (int)value;
            break;
        case 'd':
            opt->device = optarg;
            break;
        case 'j':
            opt->json = 1;
            break;
        case 'h':
            usage(stdout);
            return -1;
        default:
            usage(stderr);
            return BENCH_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", g_prog, argv[optind]);
        usage(stderr);
        return BENCH_EXIT_USAGE;
    }
    return BENCH_EXIT_OK;
}

static int fail(clkvq_context *ctx, clkvq_status st, const char *what) {
    fprintf(stderr, "%s: %s: %s: %s\n", g_prog, what, clkvq_status_string(st),
            clkvq_last_error(ctx));
    return BENCH_EXIT_FAILURE;
}

typedef struct {
    clkvq_context *ctx;
    clkvq_cache *cache;
    float *k, *v;         /* host staging, FILL_CHUNK tokens */
    cl_mem k1, v1, q, out; /* one token's K/V on the device; decode buffers */
} append_state;

static void state_release(append_state *st) {
    cl_mem mems[] = {st->k1, st->v1, st->q, st->out};
    for (int i = 0; i < 4; i++)
        if (mems[i]) clReleaseMemObject(mems[i]);
    clkvq_cache_release(st->cache);
    free(st->k);
    free(st->v);
    memset(st, 0, sizeof *st);
}

static cl_mem device_buffer(clkvq_context *ctx, const float *host, size_t n, cl_int *err) {
    return clCreateBuffer(clkvq_context_cl_context(ctx),
                          CL_MEM_READ_WRITE | (host ? CL_MEM_COPY_HOST_PTR : 0),
                          n * sizeof(float), (void *)host, err);
}

static int run_format(clkvq_context *ctx, const append_options *opt, append_result *res) {
    const append_format *f = &g_formats[res->format];
    clkvq_layer_config layer =
        clkvq_layer_config_default(f->fp16 ? CLKVQ_SCHEME_FP16 : CLKVQ_SCHEME_TOKEN);
    layer.format_k = f->format_k;
    layer.format_v = f->format_v;
    int extra = 2 * (WARMUPS + opt->reps);
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 1, .capacity = opt->tokens + extra,
                              .n_kv_heads = opt->n_kv_heads, .n_q_heads = opt->n_q_heads,
                              .head_dim = opt->head_dim,
                              .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = &layer};
    append_state s = {ctx, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    clkvq_status st = clkvq_cache_create(ctx, &cfg, &s.cache);
    if (st != CLKVQ_OK) return fail(ctx, st, "cache create");
    size_t row = (size_t)opt->n_kv_heads * opt->head_dim;
    s.k = malloc(row * FILL_CHUNK * sizeof(float));
    s.v = malloc(row * FILL_CHUNK * sizeof(float));
    double *times = malloc(4 * (size_t)opt->reps * sizeof(double));
    int rc = s.k && s.v && times ? BENCH_EXIT_OK : BENCH_EXIT_FAILURE;
    if (rc) fprintf(stderr, "%s: out of host memory\n", g_prog);
    for (int t0 = 0, c = 0; rc == BENCH_EXIT_OK && t0 < opt->tokens; t0 += FILL_CHUNK, c++) {
        int len = opt->tokens - t0 < FILL_CHUNK ? opt->tokens - t0 : FILL_CHUNK;
        clkvq_shape shape = {opt->n_kv_heads, len, opt->head_dim};
        if ((st = clkvq_synth_kv(SYNTH_SEED + (uint64_t)c, &shape, s.k, s.v)) != CLKVQ_OK ||
            (st = clkvq_cache_append(s.cache, 0, 0, len, s.k, s.v)) != CLKVQ_OK)
            rc = fail(ctx, st, "fill");
    }
    /* one more synthetic token per append (its values only need to be
     * finite and KV-like) */
    clkvq_shape one = {opt->n_kv_heads, 1, opt->head_dim};
    if (rc == BENCH_EXIT_OK &&
        (st = clkvq_synth_kv(SYNTH_SEED + 1000, &one, s.k, s.v)) != CLKVQ_OK)
        rc = fail(ctx, st, "synthetic token");
    size_t nq = (size_t)opt->n_q_heads * opt->head_dim;
    float *qh = rc == BENCH_EXIT_OK ? malloc(nq * sizeof(float)) : NULL;
    cl_int err = CL_SUCCESS;
    if (rc == BENCH_EXIT_OK && !qh) {
        fprintf(stderr, "%s: out of host memory\n", g_prog);
        rc = BENCH_EXIT_FAILURE;
    }
    if (rc == BENCH_EXIT_OK) {
        bench_fill_random(qh, nq, Q_SEED);
        s.k1 = device_buffer(ctx, s.k, row, &err);
        if (err == CL_SUCCESS) s.v1 = device_buffer(ctx, s.v, row, &err);
        if (err == CL_SUCCESS) s.q = device_buffer(ctx, qh, nq, &err);
        if (err == CL_SUCCESS) s.out = device_buffer(ctx, NULL, nq, &err);
        if (err != CL_SUCCESS) {
            fprintf(stderr, "%s: creating buffers: OpenCL error %d\n", g_prog, (int)err);
            rc = BENCH_EXIT_FAILURE;
        }
    }
    free(qh);
    float scale = 1.0f / sqrtf((float)opt->head_dim);
    double *t_host = times, *t_mem = times + opt->reps, *t_dec = times + 2 * opt->reps,
           *t_dev = times + 3 * opt->reps;
    for (int r = -WARMUPS; rc == BENCH_EXIT_OK && r < opt->reps; r++) {
        double a = 1e3 * bench_now_s();
        st = clkvq_cache_append(s.cache, 0, 0, 1, s.k, s.v);
        double b = 1e3 * bench_now_s();
        if (st == CLKVQ_OK) st = clkvq_cache_append_mem(s.cache, 0, 0, 1, s.k1, s.v1);
        double c = 1e3 * bench_now_s();
        if (st == CLKVQ_OK) st = clkvq_cache_decode(s.cache, 0, s.q, s.out, scale);
        /* a decode only enqueues: its wall time runs until the output is there */
        if (st == CLKVQ_OK && clFinish(clkvq_context_cl_queue(ctx)) != CL_SUCCESS)
            st = CLKVQ_ERR_OPENCL;
        double d = 1e3 * bench_now_s();
        if (st != CLKVQ_OK) {
            rc = fail(ctx, st, "append or decode");
        } else if (r >= 0) {
            t_host[r] = b - a;
            t_mem[r] = c - b;
            t_dec[r] = d - c;
            t_dev[r] = clkvq_last_device_ms(ctx);
        }
    }
    if (rc == BENCH_EXIT_OK) {
        res->append_host_ms = bench_median(t_host, opt->reps);
        res->append_mem_ms = bench_median(t_mem, opt->reps);
        res->decode_ms = bench_median(t_dec, opt->reps);
        res->decode_device_ms = bench_median(t_dev, opt->reps);
        fprintf(stderr, "%s: %-7s append %.3f / %.3f ms, decode %.3f ms (device %.3f)\n",
                g_prog, f->name, res->append_host_ms, res->append_mem_ms, res->decode_ms,
                res->decode_device_ms);
    }
    free(times);
    state_release(&s);
    return rc;
}

static void print_table(const clkvq_device_info *info, const append_options *opt,
                        const append_result *rows, int n) {
    printf("clkvq-bench append\n");
    printf("device:  %s / %s (driver %s)\n", info->platform, info->name, info->driver_version);
    printf("cache:   Llama-3-8B (%d q / %d kv heads, head_dim %d), 1 layer, batch 1, %d tokens, "
           "scheme token (fp16: fp16), group 32\n",
           opt->n_q_heads, opt->n_kv_heads, opt->head_dim, opt->tokens);
    printf("timing:  wall ms per call (decode dev: device time), median of %d after %d warm-ups\n\n",
           opt->reps, WARMUPS);
    static const char *const headers[] = {"format",    "append host", "append mem",
                                          "decode",    "decode dev",  "% of decode"};
    bench_table *t = bench_table_new(6, headers, "lrrrrr");
    if (!t) return;
    for (int i = 0; i < n; i++) {
        if (bench_table_add_row(t) < 0) break;
        bench_table_cell(t, 0, "%s", g_formats[rows[i].format].name);
        bench_table_cell(t, 1, "%.3f", rows[i].append_host_ms);
        bench_table_cell(t, 2, "%.3f", rows[i].append_mem_ms);
        bench_table_cell(t, 3, "%.3f", rows[i].decode_ms);
        bench_table_cell(t, 4, "%.3f", rows[i].decode_device_ms);
        bench_table_cell(t, 5, "%.1f",
                         rows[i].decode_ms > 0 ? 100.0 * rows[i].append_mem_ms / rows[i].decode_ms
                                               : 0.0);
    }
    bench_table_print(t, stdout);
    bench_table_free(t);
}

static int print_json(const clkvq_device_info *info, const append_options *opt,
                      const append_result *rows, int n) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return BENCH_EXIT_FAILURE;
    char device[400];
    snprintf(device, sizeof device, "%s / %s", info->platform, info->name);
    cJSON_AddStringToObject(root, "device", device);
    cJSON_AddNumberToObject(root, "tokens", opt->tokens);
    cJSON_AddNumberToObject(root, "reps", opt->reps);
    cJSON *results = cJSON_AddArrayToObject(root, "results");
    for (int i = 0; results && i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        if (!e) break;
        cJSON_AddItemToArray(results, e);
        cJSON_AddStringToObject(e, "format", g_formats[rows[i].format].name);
        cJSON_AddNumberToObject(e, "append_host_ms", rows[i].append_host_ms);
        cJSON_AddNumberToObject(e, "append_mem_ms", rows[i].append_mem_ms);
        cJSON_AddNumberToObject(e, "decode_ms", rows[i].decode_ms);
        cJSON_AddNumberToObject(e, "decode_device_ms", rows[i].decode_device_ms);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return BENCH_EXIT_FAILURE;
    puts(text);
    cJSON_free(text);
    return BENCH_EXIT_OK;
}

int bench_append_main(int argc, char **argv) {
    append_options opt;
    int rc = parse_options(argc, argv, &opt);
    if (rc < 0) return BENCH_EXIT_OK; /* --help */
    if (rc != BENCH_EXIT_OK) return rc;
    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, opt.device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "%s: open device: %s: %s\n", g_prog, clkvq_status_string(st),
                clkvq_last_error(NULL));
        return BENCH_EXIT_FAILURE;
    }
    clkvq_device_info info;
    append_result rows[N_FORMATS];
    int n = 0;
    st = clkvq_context_device_info(ctx, &info);
    if (st != CLKVQ_OK) rc = fail(ctx, st, "device info");
    for (int f = 0; rc == BENCH_EXIT_OK && f < N_FORMATS; f++) {
        if (!opt.formats[f]) continue;
        memset(&rows[n], 0, sizeof rows[n]);
        rows[n].format = f;
        rc = run_format(ctx, &opt, &rows[n]);
        if (rc == BENCH_EXIT_OK) n++;
    }
    if (rc == BENCH_EXIT_OK) {
        if (opt.json)
            rc = print_json(&info, &opt, rows, n);
        else
            print_table(&info, &opt, rows, n);
    }
    clkvq_context_release(ctx);
    return rc;
}

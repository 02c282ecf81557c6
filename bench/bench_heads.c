/*
 * clkvq-bench heads: what per-head bits cost. A layer whose kv heads carry
 * two (K, V) pairs is stored as two shares and decoded by one launch per
 * share (its queries gathered, outputs scattered back); this mode times it
 * next to the two uniform layers on the same data, and next to the mix a
 * single launch reading a per-head format table could at best reach: each
 * head at its own pair's uniform speed, (n_A t_A + n_B t_B) / n_heads.
 *
 * Rows: uniform A, uniform B, per-head alternating (A on even heads, B on
 * odd: every head its own run of copies), per-head halves (A on the first
 * half: one run per share). Every cache is filled with the same synthetic
 * tokens; one rep decodes each cache in turn (wall time to a clFinish, and
 * the device time of its kernels) and then appends one token to each
 * (clkvq_cache_append_mem, wall). Alternating the caches puts the
 * machine's noise on every row alike; medians (and the decode's minimum)
 * of --reps after 2 warm-up reps.
 */
#include "bench_util.h"

#include "clkvq.h"

#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WARMUPS 2
#define FILL_CHUNK 2048
#define N_ROWS 4

static const char *const g_prog = "clkvq-bench heads";
static const char *const g_row_names[N_ROWS] = {"uniform A", "uniform B", "per-head alternating",
                                                "per-head halves"};

typedef struct {
    clkvq_model_geometry g;
    const char *model;
    clkvq_scheme scheme;
    clkvq_format pair[2][2]; /* [A, B][K, V] */
    const char *pair_text;
    int tokens, reps;
    const char *device;
} heads_options;

typedef struct {
    double decode_ms, decode_min_ms, device_ms, append_ms;
} heads_result;

static void usage(FILE *out) {
    fprintf(out,
            "usage: clkvq-bench heads [options]\n"
            "\n"
            "Decode and one-token append on a layer with per-head bits (two (K, V) pairs\n"
            "over its kv heads: one launch per pair's share) next to the two uniform\n"
            "layers, on the same synthetic tokens. 'vs mix' = the per-head decode over\n"
            "(n_A t_A + n_B t_B) / n_heads, the time a single launch reading a per-head\n"
            "format table would need to match to be as fast as running every head at its\n"
            "own pair's uniform speed. Medians of --reps after %d warm-ups.\n"
            "\n"
            "options:\n"
            "  -m, --model M      a model of the table or q<h>:kv<h>:d<dim>:l<layers>\n"
            "                     (default llama-3.1-8b; one layer is timed)\n"
            "  -p, --pairs A,B    the two pairs, K then V bits (default k8v4,k2v2)\n"
            "  -s, --scheme S     kivi, token or skvq (default kivi: group 32, residual 128)\n"
            "  -t, --tokens N     tokens in the cache (default 4096)\n"
            "  -r, --reps N       timed reps (default 20)\n"
            "  -d, --device S     device index or name substring\n"
            "  -h, --help         this text\n"
            "\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n",
            WARMUPS);
}

/* "k8v4" -> K and V formats. */
static int parse_pair(const char *text, clkvq_format *k, clkvq_format *v) {
    char kbuf[8], vbuf[8];
    if (text[0] != 'k' && text[0] != 'K') return -1;
    const char *sep = strpbrk(text + 1, "vV");
    if (!sep || sep - text - 1 <= 0 || sep - text - 1 >= (long)sizeof kbuf ||
        strlen(sep + 1) >= sizeof vbuf)
        return -1;
    memcpy(kbuf, text + 1, (size_t)(sep - text - 1));
    kbuf[sep - text - 1] = '\0';
    strcpy(vbuf, sep + 1);
    return clkvq_format_parse(kbuf, k) == CLKVQ_OK && clkvq_format_parse(vbuf, v) == CLKVQ_OK
               ? 0
               : -1;
}

static int parse_options(int argc, char **argv, heads_options *opt) {
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'}, {"pairs", required_argument, NULL, 'p'},
        {"scheme", required_argument, NULL, 's'}, {"tokens", required_argument, NULL, 't'},
        {"reps", required_argument, NULL, 'r'},   {"device", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0}};
    memset(opt, 0, sizeof *opt);
    opt->model = "llama-3.1-8b";
    opt->pair_text = "k8v4,k2v2";
    opt->scheme = CLKVQ_SCHEME_KIVI;
    opt->tokens = 4096;
    opt->reps = 20;
    long value;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "m:p:s:t:r:d:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': opt->model = optarg; break;
        case 'p': opt->pair_text = optarg; break;
        case 's':
            if (clkvq_scheme_parse(optarg, &opt->scheme) != CLKVQ_OK ||
                opt->scheme == CLKVQ_SCHEME_FP16) {
                fprintf(stderr, "%s: --scheme wants kivi, token or skvq, got '%s'\n", g_prog,
                        optarg);
                return BENCH_EXIT_USAGE;
            }
            break;
        case 't':
        case 'r':
            if (bench_parse_int(optarg, 1, c == 't' ? 1 << 20 : 100000, &value)) {
                fprintf(stderr, "%s: --%s wants a positive integer, got '%s'\n", g_prog,
                        c == 't' ? "tokens" : "reps", optarg);
                return BENCH_EXIT_USAGE;
            }
            *(c == 't' ? &opt->tokens : &opt->reps) = (int)value;
            break;
        case 'd': opt->device = optarg; break;
        case 'h': usage(stdout); return -1;
        default: usage(stderr); return BENCH_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", g_prog, argv[optind]);
        return BENCH_EXIT_USAGE;
    }
    if (clkvq_model_lookup(opt->model, &opt->g) != CLKVQ_OK &&
        clkvq_model_parse(opt->model, &opt->g) != CLKVQ_OK) {
        fprintf(stderr, "%s: --model: %s\n", g_prog, clkvq_last_error(NULL));
        return BENCH_EXIT_USAGE;
    }
    char a[16], b[16];
    const char *comma = strchr(opt->pair_text, ',');
    if (!comma || comma - opt->pair_text >= (long)sizeof a || strlen(comma + 1) >= sizeof b) {
        fprintf(stderr, "%s: --pairs wants two pairs like k8v4,k2v2\n", g_prog);
        return BENCH_EXIT_USAGE;
    }
    memcpy(a, opt->pair_text, (size_t)(comma - opt->pair_text));
    a[comma - opt->pair_text] = '\0';
    strcpy(b, comma + 1);
    if (parse_pair(a, &opt->pair[0][0], &opt->pair[0][1]) ||
        parse_pair(b, &opt->pair[1][0], &opt->pair[1][1])) {
        fprintf(stderr, "%s: --pairs: '%s' is not two pairs like k8v4,k2v2 (bits 8, 4, 3, 2, "
                        "1.5)\n",
                g_prog, opt->pair_text);
        return BENCH_EXIT_USAGE;
    }
    return BENCH_EXIT_OK;
}

static int fail(clkvq_context *ctx, clkvq_status st, const char *what) {
    fprintf(stderr, "%s: %s: %s: %s\n", g_prog, what, clkvq_status_string(st),
            clkvq_last_error(ctx));
    return BENCH_EXIT_FAILURE;
}

/* Which pair (0: A, 1: B) head h of row r has. */
static int pair_of(int r, int h, int n_heads) {
    switch (r) {
    case 0: return 0;
    case 1: return 1;
    case 2: return h % 2;
    default: return h >= n_heads / 2;
    }
}

static int create_cache(clkvq_context *ctx, const heads_options *opt, int r,
                        clkvq_format *head_k, clkvq_format *head_v, clkvq_cache **out) {
    const clkvq_model_geometry *g = &opt->g;
    clkvq_layer_config lc = clkvq_layer_config_default(opt->scheme);
    lc.group_size = 32;
    if (opt->scheme == CLKVQ_SCHEME_SKVQ) lc.window = 128;
    for (int h = 0; h < g->n_kv_heads; h++) {
        head_k[h] = opt->pair[pair_of(r, h, g->n_kv_heads)][0];
        head_v[h] = opt->pair[pair_of(r, h, g->n_kv_heads)][1];
    }
    lc.format_k = head_k[0];
    lc.format_v = head_v[0];
    if (r >= 2) {
        lc.head_format_k = head_k;
        lc.head_format_v = head_v;
    }
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 1,
                              .capacity = opt->tokens + WARMUPS + opt->reps,
                              .n_kv_heads = g->n_kv_heads, .n_q_heads = g->n_q_heads,
                              .head_dim = g->head_dim, .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = &lc};
    clkvq_status st = clkvq_cache_create(ctx, &cfg, out);
    return st == CLKVQ_OK ? BENCH_EXIT_OK : fail(ctx, st, "cache create");
}

static int run(clkvq_context *ctx, const heads_options *opt, heads_result *res) {
    const clkvq_model_geometry *g = &opt->g;
    clkvq_cache *caches[N_ROWS] = {NULL};
    clkvq_format *formats = malloc(sizeof(clkvq_format) * 2 * N_ROWS * g->n_kv_heads);
    size_t row = (size_t)g->n_kv_heads * g->head_dim, nq = (size_t)g->n_q_heads * g->head_dim;
    float *k = malloc(row * FILL_CHUNK * sizeof(float)), *v = malloc(row * FILL_CHUNK * 4);
    float *q = malloc(nq * sizeof(float));
    double *t = malloc(sizeof(double) * 4 * N_ROWS * (size_t)opt->reps);
    int rc = formats && k && v && q && t ? BENCH_EXIT_OK : BENCH_EXIT_FAILURE;
    if (rc) fprintf(stderr, "%s: out of host memory\n", g_prog);
    for (int r = 0; r < N_ROWS && rc == BENCH_EXIT_OK; r++)
        rc = create_cache(ctx, opt, r, formats + (size_t)2 * r * g->n_kv_heads,
                          formats + (size_t)(2 * r + 1) * g->n_kv_heads, &caches[r]);
    clkvq_status st;
    for (int t0 = 0, c = 0; rc == BENCH_EXIT_OK && t0 < opt->tokens; t0 += FILL_CHUNK, c++) {
        int len = opt->tokens - t0 < FILL_CHUNK ? opt->tokens - t0 : FILL_CHUNK;
        clkvq_shape shape = {g->n_kv_heads, len, g->head_dim};
        if ((st = clkvq_synth_kv(1 + (uint64_t)c, &shape, k, v)) != CLKVQ_OK)
            rc = fail(ctx, st, "synthetic tokens");
        for (int r = 0; r < N_ROWS && rc == BENCH_EXIT_OK; r++)
            if ((st = clkvq_cache_append(caches[r], 0, 0, len, k, v)) != CLKVQ_OK)
                rc = fail(ctx, st, "fill");
    }
    clkvq_shape one = {g->n_kv_heads, 1, g->head_dim};
    if (rc == BENCH_EXIT_OK && (st = clkvq_synth_kv(999, &one, k, v)) != CLKVQ_OK)
        rc = fail(ctx, st, "synthetic token");
    cl_int err = CL_SUCCESS;
    cl_context clc = clkvq_context_cl_context(ctx);
    cl_mem bufs[4] = {NULL};
    if (rc == BENCH_EXIT_OK) {
        bench_fill_random(q, nq, 12345u);
        bufs[0] = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, row * 4, k, &err);
        if (err == CL_SUCCESS) bufs[1] = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, row * 4, v, &err);
        if (err == CL_SUCCESS) bufs[2] = clCreateBuffer(clc, CL_MEM_COPY_HOST_PTR, nq * 4, q, &err);
        if (err == CL_SUCCESS) bufs[3] = clCreateBuffer(clc, CL_MEM_READ_WRITE, nq * 4, NULL, &err);
        if (err != CL_SUCCESS) {
            fprintf(stderr, "%s: creating buffers: OpenCL error %d\n", g_prog, (int)err);
            rc = BENCH_EXIT_FAILURE;
        }
    }
    float scale = 1.0f / sqrtf((float)g->head_dim);
    for (int rep = -WARMUPS; rc == BENCH_EXIT_OK && rep < opt->reps; rep++)
        for (int r = 0; r < N_ROWS && rc == BENCH_EXIT_OK; r++) {
            double a = 1e3 * bench_now_s();
            st = clkvq_cache_decode(caches[r], 0, bufs[2], bufs[3], scale);
            if (st == CLKVQ_OK && clFinish(clkvq_context_cl_queue(ctx)) != CL_SUCCESS)
                st = CLKVQ_ERR_OPENCL;
            double b = 1e3 * bench_now_s();
            double dev = st == CLKVQ_OK ? clkvq_last_device_ms(ctx) : 0.0;
            if (st == CLKVQ_OK)
                st = clkvq_cache_append_mem(caches[r], 0, 0, 1, bufs[0], bufs[1]);
            double c = 1e3 * bench_now_s();
            if (st != CLKVQ_OK) {
                rc = fail(ctx, st, g_row_names[r]);
            } else if (rep >= 0) {
                double *tr = t + (size_t)4 * r * opt->reps;
                tr[rep] = b - a;
                tr[opt->reps + rep] = dev;
                tr[2 * opt->reps + rep] = c - b;
            }
        }
    for (int r = 0; r < N_ROWS && rc == BENCH_EXIT_OK; r++) {
        double *tr = t + (size_t)4 * r * opt->reps;
        res[r].decode_ms = bench_median(tr, opt->reps); /* sorts: tr[0] is the minimum */
        res[r].decode_min_ms = tr[0];
        res[r].device_ms = bench_median(tr + opt->reps, opt->reps);
        res[r].append_ms = bench_median(tr + 2 * opt->reps, opt->reps);
    }
    for (int i = 0; i < 4; i++)
        if (bufs[i]) clReleaseMemObject(bufs[i]);
    for (int r = 0; r < N_ROWS; r++) clkvq_cache_release(caches[r]);
    free(formats);
    free(k);
    free(v);
    free(q);
    free(t);
    return rc;
}

static void print_table(const clkvq_device_info *info, const heads_options *opt,
                        const heads_result *res) {
    const clkvq_model_geometry *g = &opt->g;
    char geo[64];
    clkvq_model_format(g, geo, sizeof geo);
    printf("clkvq-bench heads\n");
    printf("device:  %s / %s (driver %s)\n", info->platform, info->name, info->driver_version);
    printf("layer:   %s (%s), batch 1, %d tokens, scheme %s group 32, group-planar layouts; "
           "A, B = %s\n",
           opt->model, geo, opt->tokens, clkvq_scheme_name(opt->scheme), opt->pair_text);
    printf("timing:  wall ms per call (decode to a clFinish; dev: its kernels' device time), "
           "median of %d after %d warm-ups\n\n",
           opt->reps, WARMUPS);
    static const char *const headers[] = {"layer",    "launches", "decode", "decode min",
                                          "decode dev", "vs mix", "append"};
    bench_table *tb = bench_table_new(7, headers, "lrrrrrr");
    if (!tb) return;
    int n_b[N_ROWS];
    for (int r = 0; r < N_ROWS; r++) {
        n_b[r] = 0;
        for (int h = 0; h < g->n_kv_heads; h++) n_b[r] += pair_of(r, h, g->n_kv_heads);
    }
    for (int r = 0; r < N_ROWS; r++) {
        if (bench_table_add_row(tb) < 0) break;
        double mix = ((g->n_kv_heads - n_b[r]) * res[0].decode_ms + n_b[r] * res[1].decode_ms) /
                     g->n_kv_heads;
        bench_table_cell(tb, 0, "%s", g_row_names[r]);
        bench_table_cell(tb, 1, "%d", r < 2 ? 1 : 2);
        bench_table_cell(tb, 2, "%.3f", res[r].decode_ms);
        bench_table_cell(tb, 3, "%.3f", res[r].decode_min_ms);
        bench_table_cell(tb, 4, "%.3f", res[r].device_ms);
        if (r >= 2)
            bench_table_cell(tb, 5, "%.2fx", res[r].decode_ms / mix);
        bench_table_cell(tb, 6, "%.3f", res[r].append_ms);
    }
    bench_table_print(tb, stdout);
    bench_table_free(tb);
}

int bench_heads_main(int argc, char **argv) {
    heads_options opt;
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
    heads_result res[N_ROWS];
    st = clkvq_context_device_info(ctx, &info);
    rc = st == CLKVQ_OK ? run(ctx, &opt, res) : fail(ctx, st, "device info");
    if (rc == BENCH_EXIT_OK) print_table(&info, &opt, res);
    clkvq_context_release(ctx);
    return rc;
}

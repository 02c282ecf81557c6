/*
 * clkvq-bench attention: decode attention over a one-layer KV cache, per
 * model shape, context length, batch and cache format, against the fp16
 * cache, the CLBlast fp32 GEMV baseline and the device's copy bandwidth.
 *
 * One row = one cache (n_seqs = batch, capacity = tokens) filled with
 * synthetic K/V (clkvq_synth_kv, appended in chunks of at most 4096 tokens,
 * seeded by sequence and chunk), then clkvq_cache_decode on device buffers:
 * 2 warm-up calls, then --reps timed calls; the row's time is the median of
 * clkvq_last_device_ms (profiling events of the decode kernels only; the
 * fill is never timed). Each row runs with the device's default tunables,
 * or once per --kernel candidate; its "kernel" column names the decode
 * kernels and tunables that ran.
 *
 * Metrics:
 *   GB/s     = the cache's device bytes (clkvq_cache_plan at capacity =
 *              tokens: everything one decode step reads) / time
 *   GFLOP/s  = 4 * n_q_heads * head_dim * tokens * batch / time
 *              (q.k and p.v: a multiply-add each, per query head and token)
 *   x fp16   = ms(fp16 cache) / ms(row), same shape/tokens/batch, same run
 *   x roof   = GB/s / copy GB/s (clkvq_copy_bandwidth over 256 MiB, once)
 * The roof counts bytes read + written by a copy while decode only reads,
 * so x roof compares a read stream against a read+write stream; it is the
 * number other clkvq benches quote, kept for consistency.
 *
 * --block-size N adds, per cache row, the same decode through a paged cache
 * of N-token pages whose block table is a seeded random permutation of the
 * pool (runtime tables: pages in a scrambled order, never accidentally
 * contiguous), filled with the same data. The two decodes are timed in
 * alternation (contiguous, paged, contiguous, ...) so that machine noise
 * falls on both alike; both medians and minima are reported, and the two
 * outputs are compared bit for bit.
 */
#include "bench_util.h"

#include "clkvq.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WARMUPS 2
#define FILL_CHUNK 4096                 /* most tokens per clkvq_cache_append */
#define ROOF_BYTES ((size_t)256 << 20) /* copy-bandwidth buffer */
#define ROOF_REPS 10
#define MEM_FRACTION 0.6 /* most of the device's global memory one row may use */
#define SYNTH_SEED_BASE 1
#define Q_SEED 12345u
#define MAX_LIST 32
#define MAX_KERNELS 8 /* --kernel candidates */
#define SYNTH_CACHE_MB 3072 /* default --synth-cache-mb */
#define TABLE_SEED 7u       /* the scrambled block table of --block-size */

/* ------------------------------------------------------------ tables */

typedef struct {
    const char *name;  /* --shape value */
    const char *label; /* table heading */
    int n_q_heads, n_kv_heads, head_dim;
} attn_shape;

static const attn_shape g_shapes[] = {
    {"llama3-8b", "Llama-3-8B", 32, 8, 128},
    {"qwen2.5-7b", "Qwen2.5-7B", 28, 4, 128},
    {"phi3-mini", "Phi-3-mini", 32, 32, 96},
};
#define N_SHAPES ((int)(sizeof g_shapes / sizeof g_shapes[0]))

typedef enum { ROW_FP16, ROW_QUANT, ROW_GEMV } row_kind;

typedef struct {
    const char *name;
    row_kind kind;
    clkvq_format format_k, format_v; /* ROW_QUANT only */
} attn_format;

/* fp16 comes first: every later row's "x fp16" needs its time, measured in
 * the same run. gemv-fp32 runs at batch 1 only (clkvq_gemv_decode takes one
 * sequence). */
static const attn_format g_formats[] = {
    {"fp16", ROW_FP16, CLKVQ_FMT_Q8, CLKVQ_FMT_Q8},
    {"k8v8", ROW_QUANT, CLKVQ_FMT_Q8, CLKVQ_FMT_Q8},
    {"k4v4", ROW_QUANT, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4},
    {"k4v2", ROW_QUANT, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2},
    {"k2v2", ROW_QUANT, CLKVQ_FMT_Q2, CLKVQ_FMT_Q2},
    {"k2v1.5", ROW_QUANT, CLKVQ_FMT_Q2, CLKVQ_FMT_T15},
    {"gemv-fp32", ROW_GEMV, CLKVQ_FMT_Q8, CLKVQ_FMT_Q8},
};
#define N_FORMATS ((int)(sizeof g_formats / sizeof g_formats[0]))

/* ------------------------------------------------------------ options */

/* A --kernel candidate: decode tunables to set on every cache, or the
 * device's defaults (variant 0). */
typedef struct {
    clkvq_attn_tuning tuning;
} kernel_choice;

typedef struct {
    int shapes[N_SHAPES], n_shapes;
    int tokens[MAX_LIST], n_tokens;
    int batches[MAX_LIST], n_batches;
    int formats[N_FORMATS]; /* 1 = selected, indexed like g_formats */
    int group_size;
    int reps;
    int json;
    int synth_mb; /* host memory for reused synthetic chunks */
    int block_size; /* > 0: time a paged cache of these pages next to each cache row */
    int sequential_pages; /* --page-order sequential: the paged twin's table is 0, 1, 2, ... */
    const char *device;
    kernel_choice kernels[MAX_KERNELS];
    int n_kernels;
} attn_options;

typedef struct {
    int shape, tokens, batch, format;
    int kernel;                /* index into attn_options.kernels */
    clkvq_attn_tuning tuning;  /* what the cache resolved (cache rows) */
    int skipped;
    char note[256]; /* why it was skipped */
    double bits_per_element;
    double ms, gbps, gflops;
    double ratio_fp16; /* < 0: no fp16 time to compare with */
    double ratio_roof;
    double ms_min;
    int has_paged;          /* --block-size: the paged twin below was timed */
    double paged_ms, paged_ms_min;
    int paged_same;         /* its outputs equal the contiguous cache's bit for bit */
} attn_result;

typedef struct {
    attn_result *rows;
    int n, cap;
} result_list;

/* Synthetic K/V chunks kept across rows (see synth_chunk). */
typedef struct {
    int seq, chunk;
    float *kv; /* K then V, each [n_kv][FILL_CHUNK][hd] */
} synth_entry;

typedef struct {
    int shape; /* -1: empty */
    synth_entry *entries;
    int n, cap;
    size_t bytes, budget;
    float *k, *v;     /* staging for one appended chunk */
    size_t staging_n; /* floats in each of k, v */
} synth_cache;

typedef struct {
    clkvq_context *ctx;
    clkvq_device_info info;
    double roof_gbps;
    clkvq_attn_tuning tuning; /* of the first cache created */
    int have_tuning;
    int tuning_varies; /* a later cache resolved other tunables */
    double mem_limit;  /* bytes: MEM_FRACTION of global memory */
    synth_cache synth;
} attn_bench;

static const char *const g_prog = "clkvq-bench attention";

static void usage(FILE *out) {
    fprintf(out,
            "usage: clkvq-bench attention [options]\n"
            "\n"
            "Decode attention (one query token per sequence) over a one-layer KV cache filled\n"
            "with synthetic K/V, per model shape, context length, batch and cache format.\n"
            "Quantized formats use the per-token scheme (clkvq_layer_config_default(token)),\n"
            "group-planar K and V layouts and the device's default decode tunables; fp16 is\n"
            "the unquantized cache, gemv-fp32 the CLBlast fp32 GEMV baseline (batch 1 only).\n"
            "Time: device time of clkvq_cache_decode, median of --reps runs after %d warm-ups.\n"
            "\n"
            "options:\n"
            "  -s, --shape LIST    llama3-8b (32 q / 8 kv heads, head_dim 128), qwen2.5-7b\n"
            "                      (28/4/128), phi3-mini (32/32/96), or all (default all)\n"
            "  -t, --tokens LIST   context lengths (default 1024,4096,16384,32768)\n"
            "  -b, --batch LIST    sequences per cache (default 1,8)\n"
            "  -f, --formats LIST  fp16,k8v8,k4v4,k4v2,k2v2,k2v1.5,gemv-fp32 (default all);\n"
            "                      kXvY = X-bit keys, Y-bit values (1.5 = ternary)\n"
            "  -k, --kernel LIST   decode kernel candidates, each row runs once per item:\n"
            "                      default (the device's tunables: tuning file, shipped\n"
            "                      entries, built-in), serial:VW:CHUNK (one work-item per\n"
            "                      chunk, VW tokens per vector: 4, 8, 16) or\n"
            "                      cooperative:WGS:CHUNK (a work-group per chunk)\n"
            "                      (default: default)\n"
            "  -g, --group N       channels per quantization group, a multiple of 32 that\n"
            "                      divides every chosen shape's head_dim (default 32)\n"
            "  -r, --reps N        timed repetitions; median (default 10)\n"
            "  -d, --device S      device index or name substring (default $CLKVQ_DEVICE, else\n"
            "                      the first GPU, else the first device)\n"
            "  -m, --synth-cache-mb N  host memory (MiB) for synthetic K/V chunks reused across\n"
            "                      rows of a shape; 0 regenerates them per row (default %d).\n"
            "                      The data is the same either way: only the fill is faster\n"
            "  -p, --block-size N  also time each cache row through a paged cache of N-token\n"
            "                      pages (a multiple of 16) in a scrambled order, alternating\n"
            "                      with the contiguous one; reports both (default: off)\n"
            "  -o, --page-order O  scrambled (default: a seeded permutation of the pool) or\n"
            "                      sequential (page i of sequence s is s * max_blocks + i)\n"
            "  -j, --json          print one JSON object instead of the tables\n"
            "  -h, --help          this text\n"
            "\n"
            "LIST is comma-separated. A row whose cache would need more than %.0f%% of the\n"
            "device's global memory, or a buffer over its largest allocation, is skipped\n"
            "with a note. Progress goes to stderr.\n"
            "\n"
            "columns: kernel = the decode kernels that ran (float-unrolled: the serial variant,\n"
            "vN cM its vector width and chunk; float-cooperative: wN work-group size) or\n"
            "clblast-gemv; bits/elem = cache device bytes * 8 / (K+V elements); GB/s = cache\n"
            "bytes read per decode / time; GFLOP/s = 4 * q_heads * head_dim * tokens * batch /\n"
            "time; x fp16 = ms(fp16, same kernel candidate) / ms; x roof = GB/s / copy\n"
            "bandwidth (read + write, 256 MiB)\n"
            "\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n",
            WARMUPS, SYNTH_CACHE_MB, MEM_FRACTION * 100.0);
}

/* Splits a comma list into ints in [lo, hi]; -1 on a bad item or too many. */
static int parse_int_list(const char *text, long lo, long hi, int *out, int max, int *n) {
    char buf[512];
    if (!text || strlen(text) >= sizeof buf) return -1;
    strcpy(buf, text);
    *n = 0;
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        long v;
        if (*n >= max || bench_parse_int(item, lo, hi, &v)) return -1;
        out[(*n)++] = (int)v;
    }
    return *n > 0 ? 0 : -1;
}

/* Each comma item must be one of names[0..count) (or "all" when allow_all);
 * sets picked[i] = 1. Returns the offending item's copy in bad on error. */
static int parse_name_list(const char *text, const char *const *names, int count, int *picked,
                           char *bad, size_t bad_size) {
    char buf[512];
    if (!text || strlen(text) >= sizeof buf) {
        snprintf(bad, bad_size, "%s", text ? "(too long)" : "");
        return -1;
    }
    strcpy(buf, text);
    memset(picked, 0, (size_t)count * sizeof *picked);
    int any = 0;
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        int found = 0;
        if (!strcmp(item, "all")) {
            for (int i = 0; i < count; i++) picked[i] = 1;
            found = 1;
        }
        for (int i = 0; i < count && !found; i++)
            if (!strcmp(item, names[i])) picked[i] = found = 1;
        if (!found) {
            snprintf(bad, bad_size, "%s", item);
            return -1;
        }
        any = 1;
    }
    if (!any) snprintf(bad, bad_size, "%s", text);
    return any ? 0 : -1;
}

/* "default", "serial:VW:CHUNK" or "cooperative:WGS:CHUNK", comma-separated;
 * the library checks the numbers when a cache takes them. */
static int parse_kernel_list(const char *text, attn_options *opt) {
    char buf[512];
    if (!text || strlen(text) >= sizeof buf) return -1;
    strcpy(buf, text);
    opt->n_kernels = 0;
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (opt->n_kernels == MAX_KERNELS) return -1;
        kernel_choice *k = &opt->kernels[opt->n_kernels++];
        memset(k, 0, sizeof *k);
        if (!strcmp(item, "default")) continue;
        char *save2 = NULL;
        const char *name = strtok_r(item, ":", &save2);
        const char *a = strtok_r(NULL, ":", &save2), *c = strtok_r(NULL, ":", &save2);
        long va, vc;
        if (!name || !a || !c || strtok_r(NULL, ":", &save2) ||
            bench_parse_int(a, 1, 65536, &va) || bench_parse_int(c, 1, 1 << 24, &vc))
            return -1;
        k->tuning.chunk = (int)vc;
        if (!strcmp(name, "serial")) {
            k->tuning.variant = CLKVQ_ATTN_SERIAL;
            k->tuning.vw = (int)va;
        } else if (!strcmp(name, "cooperative")) {
            k->tuning.variant = CLKVQ_ATTN_COOPERATIVE;
            k->tuning.wgs = (int)va;
        } else {
            return -1;
        }
    }
    return opt->n_kernels > 0 ? 0 : -1;
}

static int parse_options(int argc, char **argv, attn_options *opt) {
    static const struct option longopts[] = {{"shape", required_argument, NULL, 's'},
                                             {"tokens", required_argument, NULL, 't'},
                                             {"batch", required_argument, NULL, 'b'},
                                             {"formats", required_argument, NULL, 'f'},
                                             {"group", required_argument, NULL, 'g'},
                                             {"kernel", required_argument, NULL, 'k'},
                                             {"reps", required_argument, NULL, 'r'},
                                             {"device", required_argument, NULL, 'd'},
                                             {"synth-cache-mb", required_argument, NULL, 'm'},
                                             {"block-size", required_argument, NULL, 'p'},
                                             {"page-order", required_argument, NULL, 'o'},
                                             {"json", no_argument, NULL, 'j'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    memset(opt, 0, sizeof *opt);
    for (int i = 0; i < N_SHAPES; i++) opt->shapes[opt->n_shapes++] = i;
    static const int default_tokens[] = {1024, 4096, 16384, 32768};
    for (int i = 0; i < 4; i++) opt->tokens[opt->n_tokens++] = default_tokens[i];
    opt->batches[0] = 1;
    opt->batches[1] = 8;
    opt->n_batches = 2;
    for (int i = 0; i < N_FORMATS; i++) opt->formats[i] = 1;
    opt->group_size = 32;
    opt->reps = 10;
    opt->synth_mb = SYNTH_CACHE_MB;
    opt->n_kernels = 1; /* the device's defaults */

    const char *shape_names[N_SHAPES], *format_names[N_FORMATS];
    for (int i = 0; i < N_SHAPES; i++) shape_names[i] = g_shapes[i].name;
    for (int i = 0; i < N_FORMATS; i++) format_names[i] = g_formats[i].name;
    char bad[128];
    long value;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "s:t:b:f:g:k:r:d:m:p:o:jh", longopts, NULL)) != -1) {
        switch (c) {
        case 's': {
            int picked[N_SHAPES];
            if (parse_name_list(optarg, shape_names, N_SHAPES, picked, bad, sizeof bad)) {
                fprintf(stderr, "%s: --shape: unknown shape '%s' (llama3-8b, qwen2.5-7b, "
                                "phi3-mini, all)\n",
                        g_prog, bad);
                return BENCH_EXIT_USAGE;
            }
            opt->n_shapes = 0;
            for (int i = 0; i < N_SHAPES; i++)
                if (picked[i]) opt->shapes[opt->n_shapes++] = i;
            break;
        }
        case 't':
            if (parse_int_list(optarg, 1, 1 << 20, opt->tokens, MAX_LIST, &opt->n_tokens)) {
                fprintf(stderr, "%s: --tokens wants up to %d numbers in 1..%d, got '%s'\n",
                        g_prog, MAX_LIST, 1 << 20, optarg);
                return BENCH_EXIT_USAGE;
            }
            break;
        case 'b':
            if (parse_int_list(optarg, 1, 1024, opt->batches, MAX_LIST, &opt->n_batches)) {
                fprintf(stderr, "%s: --batch wants up to %d numbers in 1..1024, got '%s'\n",
                        g_prog, MAX_LIST, optarg);
                return BENCH_EXIT_USAGE;
            }
            break;
        case 'f':
            if (parse_name_list(optarg, format_names, N_FORMATS, opt->formats, bad,
                                sizeof bad)) {
                fprintf(stderr,
                        "%s: --formats: unknown format '%s' (fp16, k8v8, k4v4, k4v2, k2v2, "
                        "k2v1.5, gemv-fp32, all)\n",
                        g_prog, bad);
                return BENCH_EXIT_USAGE;
            }
            break;
        case 'g':
            if (bench_parse_int(optarg, 32, 4096, &value) || value % 32) {
                fprintf(stderr, "%s: --group wants a multiple of 32, got '%s'\n", g_prog,
                        optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->group_size = (int)value;
            break;
        case 'k':
            if (parse_kernel_list(optarg, opt)) {
                fprintf(stderr,
                        "%s: --kernel wants up to %d of default, serial:VW:CHUNK, "
                        "cooperative:WGS:CHUNK, got '%s'\n",
                        g_prog, MAX_KERNELS, optarg);
                return BENCH_EXIT_USAGE;
            }
            break;
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
        case 'm':
            if (bench_parse_int(optarg, 0, 1 << 20, &value)) {
                fprintf(stderr, "%s: --synth-cache-mb wants 0..%d, got '%s'\n", g_prog, 1 << 20,
                        optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->synth_mb = (int)value;
            break;
        case 'p':
            if (bench_parse_int(optarg, 16, 1 << 20, &value) || value % 16) {
                fprintf(stderr, "%s: --block-size wants a multiple of 16, got '%s'\n", g_prog,
                        optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->block_size = (int)value;
            break;
        case 'o':
            if (strcmp(optarg, "scrambled") && strcmp(optarg, "sequential")) {
                fprintf(stderr, "%s: --page-order wants scrambled or sequential, got '%s'\n",
                        g_prog, optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->sequential_pages = !strcmp(optarg, "sequential");
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
    /* The group divides head_dim for quantized rows only; fp16 and the
     * GEMV baseline have no groups, so check only when a quantized format
     * is asked for. */
    int any_quant = 0;
    for (int f = 0; f < N_FORMATS; f++)
        if (opt->formats[f] && g_formats[f].kind == ROW_QUANT) any_quant = 1;
    for (int i = 0; any_quant && i < opt->n_shapes; i++) {
        const attn_shape *s = &g_shapes[opt->shapes[i]];
        if (s->head_dim % opt->group_size) {
            fprintf(stderr, "%s: --group %d does not divide %s's head_dim %d\n", g_prog,
                    opt->group_size, s->name, s->head_dim);
            return BENCH_EXIT_USAGE;
        }
    }
    return BENCH_EXIT_OK;
}

/* ------------------------------------------------------------ helpers */

static int report(const attn_bench *b, clkvq_status st, const char *what) {
    fprintf(stderr, "%s: %s: %s", g_prog, what, clkvq_status_string(st));
    const char *detail = clkvq_last_error(b->ctx);
    if (detail && *detail) fprintf(stderr, ": %s", detail);
    fputc('\n', stderr);
    return BENCH_EXIT_FAILURE;
}

static int report_cl(cl_int err, const char *what) {
    fprintf(stderr, "%s: %s: OpenCL error %d\n", g_prog, what, (int)err);
    return BENCH_EXIT_FAILURE;
}

static cl_mem upload(const attn_bench *b, const float *host, size_t bytes, cl_int *err) {
    return clCreateBuffer(clkvq_context_cl_context(b->ctx),
                          CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, bytes, (void *)host, err);
}

/* The decode kernels a row ran: the serial variant's unrolled float kernels
 * (cl_kernels/attention_serial.cl) or the cooperative ones, with their
 * tunables; the GEMV baseline is CLBlast's. */
static void kernel_name(const attn_result *r, char *buf, size_t size) {
    if (g_formats[r->format].kind == ROW_GEMV)
        snprintf(buf, size, "clblast-gemv");
    else if (r->tuning.variant == CLKVQ_ATTN_SERIAL)
        snprintf(buf, size, "float-unrolled v%d c%d", r->tuning.vw, r->tuning.chunk);
    else
        snprintf(buf, size, "float-cooperative w%d c%d", r->tuning.wgs, r->tuning.chunk);
}

static attn_result *result_add(result_list *list) {
    if (list->n == list->cap) {
        int cap = list->cap ? 2 * list->cap : 64;
        attn_result *p = realloc(list->rows, (size_t)cap * sizeof *p);
        if (!p) return NULL;
        list->rows = p;
        list->cap = cap;
    }
    attn_result *r = &list->rows[list->n++];
    memset(r, 0, sizeof *r);
    r->ratio_fp16 = -1.0;
    return r;
}

/* A decode on a cache (through its runtime block table when table is set)
 * or the GEMV baseline (cache NULL). */
typedef struct {
    clkvq_cache *cache;
    const attn_shape *shape;
    int tokens;
    cl_mem k, v, q, out;
    float scale;
    cl_mem table; /* runtime tables: [batch][max_blocks] page ids */
    int max_blocks;
} decode_call;

static clkvq_status run_decode_call(attn_bench *b, const decode_call *call) {
    if (call->cache && call->table)
        return clkvq_cache_decode_paged(call->cache, 0, 1, call->q, call->out, call->scale,
                                        call->table, call->max_blocks);
    if (call->cache) return clkvq_cache_decode(call->cache, 0, call->q, call->out, call->scale);
    return clkvq_gemv_decode(b->ctx, call->shape->n_q_heads, call->shape->n_kv_heads,
                             call->shape->head_dim, call->tokens, call->k, call->v, call->q,
                             call->out, call->scale);
}

/* Times n calls in alternation (call 0, 1, .., n-1, call 0, ...), WARMUPS +
 * reps rounds; ms[i] and ms_min[i] (may be NULL) = median and minimum
 * device time of call i. Alternating puts the machine's noise on every
 * call alike. */
static int time_decodes(attn_bench *b, const decode_call *calls, int n, int reps, double *ms,
                        double *ms_min) {
    double *times = malloc((size_t)reps * (size_t)n * sizeof *times);
    if (!times) {
        fprintf(stderr, "%s: out of host memory\n", g_prog);
        return BENCH_EXIT_FAILURE;
    }
    int rc = BENCH_EXIT_OK;
    for (int r = -WARMUPS; r < reps && rc == BENCH_EXIT_OK; r++) {
        for (int i = 0; i < n && rc == BENCH_EXIT_OK; i++) {
            clkvq_status st = run_decode_call(b, &calls[i]);
            if (st != CLKVQ_OK) {
                rc = report(b, st, calls[i].cache ? "decode" : "gemv decode");
                break;
            }
            double t = clkvq_last_device_ms(b->ctx);
            if (t < 0.0) {
                fprintf(stderr, "%s: the queue reports no device time (no profiling)\n", g_prog);
                rc = BENCH_EXIT_FAILURE;
            } else if (r >= 0) {
                times[(size_t)i * reps + r] = t;
            }
        }
    }
    for (int i = 0; i < n && rc == BENCH_EXIT_OK; i++) {
        double *ti = times + (size_t)i * reps;
        ms[i] = bench_median(ti, reps); /* sorts: ti[0] is the minimum */
        if (ms_min) ms_min[i] = ti[0];
    }
    free(times);
    return rc;
}

static int time_decode(attn_bench *b, const decode_call *call, int reps, double *ms) {
    return time_decodes(b, call, 1, reps, ms, NULL);
}

/*
 * Synthetic chunks, generated once per shape and reused. Chunk (seq, c) is
 * clkvq_synth_kv with seed (seq, c) over FILL_CHUNK tokens; it does not
 * depend on the row's context length, batch or format, and a shorter chunk
 * (the tail of a context, or a context under FILL_CHUNK) is its per-head
 * prefix (clkvq_synth_kv's determinism contract). So every row gets exactly
 * the data it would get from generating its own chunks, while the host
 * generator (about 3x slower than the append itself on the 2-core PoCL
 * machine) runs once per chunk per shape instead of once per row. Chunks
 * past the memory budget are regenerated each time.
 */
static void synth_cache_clear(synth_cache *sc) {
    for (int i = 0; i < sc->n; i++) free(sc->entries[i].kv);
    sc->n = 0;
    sc->bytes = 0;
    sc->shape = -1;
}

static void synth_cache_free(synth_cache *sc) {
    synth_cache_clear(sc);
    free(sc->entries);
    free(sc->k);
    free(sc->v);
    memset(sc, 0, sizeof *sc);
}

static uint64_t chunk_seed(int seq, int chunk) {
    /* sequences differ, and a chunk is not a copy of the one before it */
    return SYNTH_SEED_BASE + ((uint64_t)seq << 32) + (uint64_t)chunk;
}

static int synth(uint64_t seed, const attn_shape *s, int len, float *k, float *v) {
    clkvq_shape shape = {s->n_kv_heads, len, s->head_dim};
    clkvq_status st = clkvq_synth_kv(seed, &shape, k, v);
    if (st == CLKVQ_OK) return BENCH_EXIT_OK;
    fprintf(stderr, "%s: synthetic K/V: %s: %s\n", g_prog, clkvq_status_string(st),
            clkvq_last_error(NULL));
    return BENCH_EXIT_FAILURE;
}

/* Points k and v at chunk (seq, c)'s first len tokens, [n_kv][len][hd]. */
static int synth_chunk(synth_cache *sc, int shape_idx, int seq, int c, int len, const float **k,
                       const float **v) {
    const attn_shape *s = &g_shapes[shape_idx];
    if (sc->shape != shape_idx) synth_cache_clear(sc);
    sc->shape = shape_idx;
    size_t row = (size_t)s->head_dim, full = (size_t)s->n_kv_heads * FILL_CHUNK * row;
    if (sc->staging_n < full) {
        free(sc->k);
        free(sc->v);
        sc->k = malloc(full * sizeof(float));
        sc->v = malloc(full * sizeof(float));
        sc->staging_n = sc->k && sc->v ? full : 0;
        if (!sc->staging_n) {
            fprintf(stderr, "%s: out of host memory (synthetic chunk)\n", g_prog);
            return BENCH_EXIT_FAILURE;
        }
    }
    const float *kv = NULL;
    for (int i = 0; i < sc->n && !kv; i++)
        if (sc->entries[i].seq == seq && sc->entries[i].chunk == c) kv = sc->entries[i].kv;
    size_t entry_bytes = 2 * full * sizeof(float);
    if (!kv && sc->bytes + entry_bytes <= sc->budget) {
        if (sc->n == sc->cap) {
            int cap = sc->cap ? 2 * sc->cap : 64;
            synth_entry *p = realloc(sc->entries, (size_t)cap * sizeof *p);
            if (p) {
                sc->entries = p;
                sc->cap = cap;
            }
        }
        float *mem = sc->n < sc->cap ? malloc(entry_bytes) : NULL;
        if (mem) { /* no memory for the cache only means regenerating below */
            if (synth(chunk_seed(seq, c), s, FILL_CHUNK, mem, mem + full)) {
                free(mem);
                return BENCH_EXIT_FAILURE;
            }
            sc->entries[sc->n++] = (synth_entry){seq, c, mem};
            sc->bytes += entry_bytes;
            kv = mem;
        }
    }
    if (!kv) { /* over the budget: generate just this prefix */
        *k = sc->k;
        *v = sc->v;
        return synth(chunk_seed(seq, c), s, len, sc->k, sc->v);
    }
    if (len == FILL_CHUNK) {
        *k = kv;
        *v = kv + full;
        return BENCH_EXIT_OK;
    }
    /* a shorter chunk: the first len tokens of every head */
    for (int is_v = 0; is_v < 2; is_v++) {
        const float *src = kv + (is_v ? full : 0);
        float *dst = is_v ? sc->v : sc->k;
        for (int h = 0; h < s->n_kv_heads; h++)
            memcpy(dst + (size_t)h * (size_t)len * row, src + (size_t)h * FILL_CHUNK * row,
                   (size_t)len * row * sizeof(float));
    }
    *k = sc->k;
    *v = sc->v;
    return BENCH_EXIT_OK;
}

/* Appends batch sequences of tokens synthetic tokens, FILL_CHUNK at a time:
 * the way a runtime prefills, and it bounds the staging to one chunk
 * whatever the context length. */
static int fill_cache(attn_bench *b, clkvq_cache *cache, int shape_idx, int tokens, int batch) {
    for (int seq = 0; seq < batch; seq++) {
        for (int t0 = 0, c = 0; t0 < tokens; t0 += FILL_CHUNK, c++) {
            int len = tokens - t0 < FILL_CHUNK ? tokens - t0 : FILL_CHUNK;
            const float *k, *v;
            if (synth_chunk(&b->synth, shape_idx, seq, c, len, &k, &v)) return BENCH_EXIT_FAILURE;
            clkvq_status st = clkvq_cache_append(cache, 0, seq, len, k, v);
            if (st != CLKVQ_OK) return report(b, st, "append");
        }
    }
    return BENCH_EXIT_OK;
}

static void skip_row(attn_result *res, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void skip_row(attn_result *res, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res->note, sizeof res->note, fmt, ap);
    va_end(ap);
    res->skipped = 1;
}

/* The query and output buffers of a decode ([batch][n_q][hd] fp32). */
static int make_q_out(attn_bench *b, const attn_shape *s, int batch, cl_mem *q, cl_mem *out) {
    size_t n = (size_t)batch * s->n_q_heads * s->head_dim;
    float *host = malloc(n * sizeof *host);
    if (!host) {
        fprintf(stderr, "%s: out of host memory\n", g_prog);
        return BENCH_EXIT_FAILURE;
    }
    bench_fill_random(host, n, Q_SEED);
    cl_int err;
    *q = upload(b, host, n * sizeof *host, &err);
    free(host);
    if (err != CL_SUCCESS) return report_cl(err, "create q");
    *out = clCreateBuffer(clkvq_context_cl_context(b->ctx), CL_MEM_READ_WRITE, n * sizeof(float),
                          NULL, &err);
    if (err != CL_SUCCESS) {
        clReleaseMemObject(*q);
        *q = NULL;
        return report_cl(err, "create out");
    }
    return BENCH_EXIT_OK;
}

static void fill_metrics(const attn_bench *b, const attn_shape *s, attn_result *res,
                         double bytes) {
    double seconds = res->ms * 1e-3;
    double flops = 4.0 * s->n_q_heads * s->head_dim * (double)res->tokens * res->batch;
    res->gbps = seconds > 0.0 ? bytes / seconds / 1e9 : 0.0;
    res->gflops = seconds > 0.0 ? flops / seconds / 1e9 : 0.0;
    res->ratio_roof = b->roof_gbps > 0.0 ? res->gbps / b->roof_gbps : 0.0;
}

/* ------------------------------------------------------------ paged twin */

/* --block-size: a cache row's twin in pages, through a runtime block table
 * that is a seeded random permutation of the pool. */
typedef struct {
    clkvq_cache *cache;
    cl_mem table, out;
    int max_blocks;
} paged_twin;

static void paged_twin_release(paged_twin *p) {
    if (p->table) clReleaseMemObject(p->table);
    if (p->out) clReleaseMemObject(p->out);
    clkvq_cache_release(p->cache);
    memset(p, 0, sizeof *p);
}

static int make_paged_twin(attn_bench *b, const attn_options *opt, const clkvq_cache_config *base,
                           const clkvq_attn_tuning *tuning, attn_result *res, paged_twin *p) {
    const attn_shape *s = &g_shapes[res->shape];
    clkvq_cache_config cfg = *base;
    cfg.block_size = opt->block_size;
    cfg.runtime_tables = 1;
    clkvq_status st = clkvq_cache_create(b->ctx, &cfg, &p->cache);
    if (st != CLKVQ_OK) return report(b, st, "paged cache create");
    /* the same tunables as the contiguous cache, whatever the lookup says */
    if ((st = clkvq_cache_set_tuning(p->cache, tuning)) != CLKVQ_OK)
        return report(b, st, "paged cache tuning");
    p->max_blocks = (res->tokens + opt->block_size - 1) / opt->block_size;
    int n_pages = res->batch * p->max_blocks;
    int *ids = malloc((size_t)n_pages * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "%s: out of host memory\n", g_prog);
        return BENCH_EXIT_FAILURE;
    }
    for (int i = 0; i < n_pages; i++) ids[i] = i;
    uint32_t r = TABLE_SEED;
    for (int i = n_pages - 1; i > 0 && !opt->sequential_pages; i--) { /* Fisher-Yates */
        r ^= r << 13;
        r ^= r >> 17;
        r ^= r << 5;
        int j = (int)(r % (uint32_t)(i + 1)), t = ids[i];
        ids[i] = ids[j];
        ids[j] = t;
    }
    cl_int err;
    p->table = clCreateBuffer(clkvq_context_cl_context(b->ctx),
                              CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                              (size_t)n_pages * sizeof *ids, ids, &err);
    free(ids);
    if (err != CL_SUCCESS) return report_cl(err, "create the block table");
    size_t row = (size_t)s->n_kv_heads * s->head_dim * sizeof(float);
    for (int seq = 0; seq < res->batch; seq++)
        for (int t0 = 0, c = 0; t0 < res->tokens; t0 += FILL_CHUNK, c++) {
            int len = res->tokens - t0 < FILL_CHUNK ? res->tokens - t0 : FILL_CHUNK;
            const float *k, *v;
            if (synth_chunk(&b->synth, res->shape, seq, c, len, &k, &v)) return BENCH_EXIT_FAILURE;
            cl_mem km = upload(b, k, row * (size_t)len, &err), vm = NULL;
            if (err == CL_SUCCESS) vm = upload(b, v, row * (size_t)len, &err);
            st = err == CL_SUCCESS ? clkvq_cache_append_paged(p->cache, 0, seq, len, km, vm,
                                                              p->table, p->max_blocks)
                                   : CLKVQ_OK;
            if (km) clReleaseMemObject(km);
            if (vm) clReleaseMemObject(vm);
            if (err != CL_SUCCESS) return report_cl(err, "upload a chunk");
            if (st != CLKVQ_OK) return report(b, st, "paged append");
        }
    p->out = clCreateBuffer(clkvq_context_cl_context(b->ctx), CL_MEM_READ_WRITE,
                            (size_t)res->batch * s->n_q_heads * s->head_dim * sizeof(float), NULL,
                            &err);
    return err == CL_SUCCESS ? BENCH_EXIT_OK : report_cl(err, "create paged out");
}

/* 1 when the two decode outputs are equal bit for bit. */
static int same_output(attn_bench *b, const attn_shape *s, int batch, cl_mem x, cl_mem y) {
    size_t bytes = (size_t)batch * s->n_q_heads * s->head_dim * sizeof(float);
    unsigned char *hx = malloc(bytes), *hy = malloc(bytes);
    cl_command_queue queue = clkvq_context_cl_queue(b->ctx);
    int same = hx && hy &&
               clEnqueueReadBuffer(queue, x, CL_TRUE, 0, bytes, hx, 0, NULL, NULL) == CL_SUCCESS &&
               clEnqueueReadBuffer(queue, y, CL_TRUE, 0, bytes, hy, 0, NULL, NULL) == CL_SUCCESS &&
               memcmp(hx, hy, bytes) == 0;
    free(hx);
    free(hy);
    return same;
}

/* ------------------------------------------------------------ rows */

/* One cache row (fp16 or quantized): plan, create, fill, time. */
static int run_cache_row(attn_bench *b, const attn_options *opt, attn_result *res) {
    const attn_shape *s = &g_shapes[res->shape];
    const attn_format *f = &g_formats[res->format];
    clkvq_layer_config layer = clkvq_layer_config_default(
        f->kind == ROW_FP16 ? CLKVQ_SCHEME_FP16 : CLKVQ_SCHEME_TOKEN);
    layer.format_k = f->format_k;
    layer.format_v = f->format_v;
    layer.group_size = opt->group_size;
    clkvq_cache_config cfg = {
        .n_layers = 1,
        .n_seqs = res->batch,
        .capacity = res->tokens,
        .n_kv_heads = s->n_kv_heads,
        .n_q_heads = s->n_q_heads,
        .head_dim = s->head_dim,
        /* the CPU's serial decode kernel reads group-planar codes only */
        .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
        .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR,
        .layers = &layer,
    };
    clkvq_cache_memory mem;
    clkvq_status st = clkvq_cache_plan(b->ctx, &cfg, &mem);
    if (st != CLKVQ_OK) return report(b, st, "cache plan");
    res->bits_per_element = mem.bits_per_element;
    if ((double)mem.device_bytes > b->mem_limit) {
        skip_row(res, "needs %.2f GB, over %.0f%% of the device's %.2f GB", mem.device_bytes / 1e9,
                 MEM_FRACTION * 100.0, (double)b->info.global_mem_bytes / 1e9);
        return BENCH_EXIT_OK;
    }

    clkvq_cache *cache = NULL;
    st = clkvq_cache_create(b->ctx, &cfg, &cache);
    if (st == CLKVQ_ERR_DEVICE_LIMIT || st == CLKVQ_ERR_OUT_OF_MEMORY) {
        /* e.g. one tensor's store over the device's largest allocation */
        skip_row(res, "%s", clkvq_last_error(b->ctx));
        return BENCH_EXIT_OK;
    }
    if (st != CLKVQ_OK) return report(b, st, "cache create");

    const kernel_choice *choice = &opt->kernels[res->kernel];
    if (choice->tuning.variant) {
        st = clkvq_cache_set_tuning(cache, &choice->tuning);
        if (st != CLKVQ_OK) { /* a candidate this shape or device cannot run */
            skip_row(res, "kernel candidate: %s", clkvq_last_error(b->ctx));
            clkvq_cache_release(cache);
            return BENCH_EXIT_OK;
        }
    }
    clkvq_attn_tuning tuning;
    double t0 = bench_now_s();
    int rc = fill_cache(b, cache, res->shape, res->tokens, res->batch);
    /* read after the fill: a decode takes the tuned entry nearest its
     * length, so this is what the timed decodes run (and the twin gets) */
    st = rc == BENCH_EXIT_OK ? clkvq_cache_get_tuning(cache, &tuning) : CLKVQ_OK;
    if (rc != BENCH_EXIT_OK) {
        /* the fill said why */
    } else if (st != CLKVQ_OK) {
        rc = report(b, st, "get tuning");
    } else {
        res->tuning = tuning;
        /* a candidate's tunables: the kernel column shows them */
        if (choice->tuning.variant) {
        } else if (!b->have_tuning) {
            b->tuning = tuning;
            b->have_tuning = 1;
        } else if (memcmp(&tuning, &b->tuning, sizeof tuning)) {
            b->tuning_varies = 1;
        }
    }

    paged_twin twin = {NULL, NULL, NULL, 0};
    int with_twin = opt->block_size > 0 && 2.0 * (double)mem.device_bytes <= b->mem_limit;
    if (rc == BENCH_EXIT_OK && with_twin) rc = make_paged_twin(b, opt, &cfg, &tuning, res, &twin);
    double fill_s = bench_now_s() - t0;
    cl_mem q = NULL, out = NULL;
    if (rc == BENCH_EXIT_OK) rc = make_q_out(b, s, res->batch, &q, &out);
    if (rc == BENCH_EXIT_OK) {
        float scale = 1.0f / sqrtf((float)s->head_dim);
        decode_call calls[2] = {{cache, s, res->tokens, NULL, NULL, q, out, scale, NULL, 0},
                                {twin.cache, s, res->tokens, NULL, NULL, q, twin.out, scale,
                                 twin.table, twin.max_blocks}};
        double ms[2], ms_min[2];
        rc = time_decodes(b, calls, with_twin ? 2 : 1, opt->reps, ms, ms_min);
        if (rc == BENCH_EXIT_OK) {
            res->ms = ms[0];
            res->ms_min = ms_min[0];
        }
        if (rc == BENCH_EXIT_OK && with_twin) {
            res->has_paged = 1;
            res->paged_ms = ms[1];
            res->paged_ms_min = ms_min[1];
            res->paged_same = same_output(b, s, res->batch, out, twin.out);
        }
    }
    if (rc == BENCH_EXIT_OK) {
        fill_metrics(b, s, res, (double)mem.device_bytes);
        char kname[64];
        kernel_name(res, kname, sizeof kname);
        fprintf(stderr, "%s: %s %6d tok x%d %-9s %-26s %9.3f ms  (fill %.1f s)", g_prog, s->name,
                res->tokens, res->batch, f->name, kname, res->ms, fill_s);
        if (res->has_paged)
            fprintf(stderr, "; paged %.3f ms (%s output)", res->paged_ms,
                    res->paged_same ? "same" : "DIFFERENT");
        fputc('\n', stderr);
    }
    if (q) clReleaseMemObject(q);
    if (out) clReleaseMemObject(out);
    paged_twin_release(&twin);
    clkvq_cache_release(cache);
    return rc;
}

/* The CLBlast fp32 baseline for one sequence: random fp32 K and V. */
static int run_gemv_row(attn_bench *b, const attn_options *opt, attn_result *res) {
    const attn_shape *s = &g_shapes[res->shape];
    size_t n_kv = (size_t)s->n_kv_heads * (size_t)res->tokens * (size_t)s->head_dim;
    size_t kv_bytes = n_kv * sizeof(float);
    size_t scores = (size_t)s->n_q_heads * (size_t)res->tokens * sizeof(float);
    res->bits_per_element = 32.0;
    if (2.0 * (double)kv_bytes + (double)scores > b->mem_limit) {
        skip_row(res, "needs %.2f GB, over %.0f%% of the device's %.2f GB",
                 (2.0 * (double)kv_bytes + (double)scores) / 1e9, MEM_FRACTION * 100.0,
                 (double)b->info.global_mem_bytes / 1e9);
        return BENCH_EXIT_OK;
    }
    if (kv_bytes > b->info.max_alloc_bytes) {
        skip_row(res, "an fp32 K of %zu bytes exceeds the device's largest allocation (%llu)",
                 kv_bytes, (unsigned long long)b->info.max_alloc_bytes);
        return BENCH_EXIT_OK;
    }
    float *host = malloc(kv_bytes);
    if (!host) {
        fprintf(stderr, "%s: out of host memory (%zu bytes)\n", g_prog, kv_bytes);
        return BENCH_EXIT_FAILURE;
    }
    cl_int err;
    int rc = BENCH_EXIT_OK;
    bench_fill_random(host, n_kv, 1u);
    cl_mem k = upload(b, host, kv_bytes, &err), v = NULL;
    if (err == CL_SUCCESS) {
        bench_fill_random(host, n_kv, 2u);
        v = upload(b, host, kv_bytes, &err);
    }
    free(host);
    if (err != CL_SUCCESS) rc = report_cl(err, "create fp32 K/V");
    cl_mem q = NULL, out = NULL;
    if (rc == BENCH_EXIT_OK) rc = make_q_out(b, s, 1, &q, &out);
    if (rc == BENCH_EXIT_OK) {
        decode_call call = {NULL, s,   res->tokens, k, v, q, out, 1.0f / sqrtf((float)s->head_dim),
                            NULL, 0};
        rc = time_decode(b, &call, opt->reps, &res->ms);
    }
    if (rc == BENCH_EXIT_OK) {
        fill_metrics(b, s, res, 2.0 * (double)kv_bytes);
        fprintf(stderr, "%s: %s %6d tok x1 %-9s %9.3f ms\n", g_prog, s->name, res->tokens,
                g_formats[res->format].name, res->ms);
    }
    cl_mem mems[] = {k, v, q, out};
    for (int i = 0; i < 4; i++)
        if (mems[i]) clReleaseMemObject(mems[i]);
    return rc;
}

/* ------------------------------------------------------------ output */

static void print_header(const attn_bench *b, const attn_options *opt) {
    printf("clkvq-bench attention\n");
    printf("device:  %s / %s (driver %s, %d CUs, %.2f GB global memory, %.2f GB max "
           "allocation)\n",
           b->info.platform, b->info.name, b->info.driver_version, b->info.compute_units,
           (double)b->info.global_mem_bytes / 1e9, (double)b->info.max_alloc_bytes / 1e9);
    printf("roof:    %.2f GB/s (float4 copy of %zu MiB, read + write, median of %d)\n",
           b->roof_gbps, ROOF_BYTES >> 20, ROOF_REPS);
    if (b->have_tuning)
        printf("tuning:  variant %s, chunk %d, vw %d, wgs %d (clkvq_cache_get_tuning, "
               "defaults)%s\n",
               bench_variant_name(b->tuning.variant), b->tuning.chunk, b->tuning.vw, b->tuning.wgs,
               b->tuning_varies ? "; some caches resolved other tunables" : "");
    if (opt->n_kernels > 1 || opt->kernels[0].tuning.variant)
        printf("kernels: %d candidate%s per row (--kernel; the kernel column)\n",
               opt->n_kernels, opt->n_kernels > 1 ? "s" : "");
    printf("cache:   1 layer, scheme token (fp16: fp16), group %d, fp16 params, group-planar "
           "K/V, synthetic K/V in chunks of %d\n",
           opt->group_size, FILL_CHUNK);
    printf("timing:  device time of one decode step, median of %d after %d warm-ups\n",
           opt->reps, WARMUPS);
    if (opt->block_size > 0)
        printf("paged:   each cache row also through pages of %d tokens in %s (runtime block "
               "table), timed alternately with the contiguous cache\n",
               opt->block_size,
               opt->sequential_pages ? "sequential order" : "a scrambled order (a seeded "
                                                            "permutation of the pool)");
    printf("\n");
}

static void print_shape_table(const attn_shape *s, const result_list *list, int shape_idx) {
    printf("### %s (%d q heads, %d kv heads, head_dim %d)\n\n", s->label, s->n_q_heads,
           s->n_kv_heads, s->head_dim);
    static const char *const headers[] = {"tokens", "batch",  "format",  "kernel", "bits/elem",
                                          "ms",     "GB/s",   "GFLOP/s", "x fp16", "x roof"};
    bench_table *t = bench_table_new(10, headers, "rrllrrrrrr");
    if (!t) return;
    for (int i = 0; i < list->n; i++) {
        const attn_result *r = &list->rows[i];
        if (r->shape != shape_idx || r->skipped || bench_table_add_row(t) < 0) continue;
        bench_table_cell(t, 0, "%d", r->tokens);
        bench_table_cell(t, 1, "%d", r->batch);
        bench_table_cell(t, 2, "%s", g_formats[r->format].name);
        char kname[64];
        kernel_name(r, kname, sizeof kname);
        bench_table_cell(t, 3, "%s", kname);
        bench_table_cell(t, 4, "%.3f", r->bits_per_element);
        bench_table_cell(t, 5, "%.3f", r->ms);
        bench_table_cell(t, 6, "%.1f", r->gbps);
        bench_table_cell(t, 7, "%.1f", r->gflops);
        if (r->ratio_fp16 >= 0.0)
            bench_table_cell(t, 8, "%.2f", r->ratio_fp16);
        else
            bench_table_cell(t, 8, "-");
        bench_table_cell(t, 9, "%.2f", r->ratio_roof);
    }
    bench_table_print(t, stdout);
    bench_table_free(t);
    for (int i = 0; i < list->n; i++) {
        const attn_result *r = &list->rows[i];
        if (r->shape == shape_idx && r->skipped)
            printf("\nskipped: %d tokens, batch %d, %s: %s", r->tokens, r->batch,
                   g_formats[r->format].name, r->note);
    }
    printf("\n\n");
    fflush(stdout);
}

static void print_paged_table(const attn_shape *s, const result_list *list, int shape_idx,
                              int block_size) {
    printf("### %s: contiguous vs pages of %d tokens (same run, alternating)\n\n", s->label,
           block_size);
    static const char *const headers[] = {"tokens", "batch", "format", "contig ms", "contig min",
                                          "paged ms", "paged min", "paged/contig",
                                          "paged/contig (min)", "same output"};
    bench_table *t = bench_table_new(10, headers, "rrlrrrrrrl");
    if (!t) return;
    for (int i = 0; i < list->n; i++) {
        const attn_result *r = &list->rows[i];
        if (r->shape != shape_idx || !r->has_paged || bench_table_add_row(t) < 0) continue;
        bench_table_cell(t, 0, "%d", r->tokens);
        bench_table_cell(t, 1, "%d", r->batch);
        bench_table_cell(t, 2, "%s", g_formats[r->format].name);
        bench_table_cell(t, 3, "%.3f", r->ms);
        bench_table_cell(t, 4, "%.3f", r->ms_min);
        bench_table_cell(t, 5, "%.3f", r->paged_ms);
        bench_table_cell(t, 6, "%.3f", r->paged_ms_min);
        bench_table_cell(t, 7, "%.3f", r->ms > 0 ? r->paged_ms / r->ms : 0.0);
        bench_table_cell(t, 8, "%.3f", r->ms_min > 0 ? r->paged_ms_min / r->ms_min : 0.0);
        bench_table_cell(t, 9, "%s", r->paged_same ? "bit-exact" : "DIFFERENT");
    }
    bench_table_print(t, stdout);
    bench_table_free(t);
    printf("\n\n");
    fflush(stdout);
}

static int print_json(const attn_bench *b, const attn_options *opt, const result_list *list) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return BENCH_EXIT_FAILURE;
    char device[400];
    snprintf(device, sizeof device, "%s / %s", b->info.platform, b->info.name);
    cJSON_AddStringToObject(root, "device", device);
    cJSON_AddStringToObject(root, "device_key", b->info.device_key);
    cJSON_AddStringToObject(root, "driver_version", b->info.driver_version);
    /* PoCL sizes its global memory from the host's free memory when the
     * process starts, so the skip rule's limit can differ from run to run */
    cJSON_AddNumberToObject(root, "global_mem_bytes", (double)b->info.global_mem_bytes);
    cJSON_AddNumberToObject(root, "max_alloc_bytes", (double)b->info.max_alloc_bytes);
    cJSON_AddNumberToObject(root, "roof_gbps", b->roof_gbps);
    cJSON *tuning = cJSON_AddObjectToObject(root, "tuning");
    if (tuning && b->have_tuning) {
        cJSON_AddStringToObject(tuning, "variant", bench_variant_name(b->tuning.variant));
        cJSON_AddNumberToObject(tuning, "wgs", b->tuning.wgs);
        cJSON_AddNumberToObject(tuning, "chunk", b->tuning.chunk);
        cJSON_AddNumberToObject(tuning, "vw", b->tuning.vw);
        cJSON_AddBoolToObject(tuning, "varies", b->tuning_varies);
    }
    cJSON_AddNumberToObject(root, "group_size", opt->group_size);
    cJSON_AddNumberToObject(root, "reps", opt->reps);
    cJSON_AddNumberToObject(root, "warmups", WARMUPS);
    cJSON_AddNumberToObject(root, "block_size", opt->block_size);
    cJSON_AddStringToObject(root, "page_order", opt->sequential_pages ? "sequential" : "scrambled");
    cJSON *results = cJSON_AddArrayToObject(root, "results");
    cJSON *skipped = cJSON_AddArrayToObject(root, "skipped");
    for (int i = 0; results && skipped && i < list->n; i++) {
        const attn_result *r = &list->rows[i];
        cJSON *e = cJSON_CreateObject();
        if (!e) break;
        cJSON_AddItemToArray(r->skipped ? skipped : results, e);
        cJSON_AddStringToObject(e, "shape", g_shapes[r->shape].name);
        cJSON_AddNumberToObject(e, "tokens", r->tokens);
        cJSON_AddNumberToObject(e, "batch", r->batch);
        cJSON_AddStringToObject(e, "format", g_formats[r->format].name);
        if (g_formats[r->format].kind != ROW_GEMV) {
            const clkvq_attn_tuning *k = &opt->kernels[r->kernel].tuning;
            cJSON_AddStringToObject(e, "candidate", k->variant ? bench_variant_name(k->variant)
                                                               : "default");
        }
        if (r->skipped) {
            cJSON_AddStringToObject(e, "reason", r->note);
            continue;
        }
        char kname[64];
        kernel_name(r, kname, sizeof kname);
        cJSON_AddStringToObject(e, "kernel", kname);
        if (g_formats[r->format].kind != ROW_GEMV) {
            cJSON_AddStringToObject(e, "variant", bench_variant_name(r->tuning.variant));
            cJSON_AddNumberToObject(e, "vw", r->tuning.vw);
            cJSON_AddNumberToObject(e, "chunk", r->tuning.chunk);
            cJSON_AddNumberToObject(e, "wgs", r->tuning.wgs);
        }
        cJSON_AddNumberToObject(e, "bits_per_element", r->bits_per_element);
        cJSON_AddNumberToObject(e, "ms", r->ms);
        cJSON_AddNumberToObject(e, "gbps", r->gbps);
        cJSON_AddNumberToObject(e, "gflops", r->gflops);
        if (r->ratio_fp16 >= 0.0)
            cJSON_AddNumberToObject(e, "ratio_fp16", r->ratio_fp16);
        else
            cJSON_AddNullToObject(e, "ratio_fp16");
        cJSON_AddNumberToObject(e, "ratio_roof", r->ratio_roof);
        cJSON_AddNumberToObject(e, "ms_min", r->ms_min);
        if (r->has_paged) {
            cJSON_AddNumberToObject(e, "paged_ms", r->paged_ms);
            cJSON_AddNumberToObject(e, "paged_ms_min", r->paged_ms_min);
            cJSON_AddNumberToObject(e, "paged_ratio", r->ms > 0 ? r->paged_ms / r->ms : 0.0);
            cJSON_AddBoolToObject(e, "paged_same", r->paged_same);
        }
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return BENCH_EXIT_FAILURE;
    puts(text);
    cJSON_free(text);
    return BENCH_EXIT_OK;
}

/* ------------------------------------------------------------ main */

/* Every selected format of one (shape, tokens, batch) and kernel candidate,
 * fp16 first (the candidate's x fp16 divides by its fp16 row). The GEMV
 * baseline runs once, after the candidates. */
static int run_point(attn_bench *b, const attn_options *opt, result_list *list, int shape,
                     int tokens, int batch) {
    for (int k = 0; k <= opt->n_kernels; k++) {
        double fp16_ms = -1.0;
        for (int f = 0; f < N_FORMATS; f++) {
            int gemv = g_formats[f].kind == ROW_GEMV;
            if (!opt->formats[f] || gemv != (k == opt->n_kernels) || (gemv && batch != 1))
                continue;
            attn_result *res = result_add(list);
            if (!res) {
                fprintf(stderr, "%s: out of host memory\n", g_prog);
                return BENCH_EXIT_FAILURE;
            }
            res->shape = shape;
            res->tokens = tokens;
            res->batch = batch;
            res->format = f;
            res->kernel = gemv ? 0 : k;
            int rc = gemv ? run_gemv_row(b, opt, res) : run_cache_row(b, opt, res);
            if (rc != BENCH_EXIT_OK) return rc;
            if (res->skipped) {
                fprintf(stderr, "%s: %s %d tok x%d %s skipped: %s\n", g_prog,
                        g_shapes[shape].name, tokens, batch, g_formats[f].name, res->note);
                continue;
            }
            if (g_formats[f].kind == ROW_FP16) fp16_ms = res->ms;
            if (gemv) { /* against the first candidate's fp16 row */
                for (int i = 0; i < list->n; i++) {
                    const attn_result *r = &list->rows[i];
                    if (r->shape == shape && r->tokens == tokens && r->batch == batch &&
                        r->kernel == 0 && !r->skipped && g_formats[r->format].kind == ROW_FP16)
                        fp16_ms = r->ms;
                }
            }
            if (fp16_ms > 0.0 && res->ms > 0.0) res->ratio_fp16 = fp16_ms / res->ms;
        }
    }
    return BENCH_EXIT_OK;
}

int bench_attention_main(int argc, char **argv) {
    attn_options opt;
    int rc = parse_options(argc, argv, &opt);
    if (rc < 0) return BENCH_EXIT_OK; /* --help */
    if (rc != BENCH_EXIT_OK) return rc;

    attn_bench b;
    memset(&b, 0, sizeof b);
    clkvq_status st = clkvq_context_create(&b.ctx, opt.device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "%s: open device: %s: %s\n", g_prog, clkvq_status_string(st),
                clkvq_last_error(NULL));
        return BENCH_EXIT_FAILURE;
    }
    result_list list = {NULL, 0, 0};
    double t_start = bench_now_s();
    st = clkvq_context_device_info(b.ctx, &b.info);
    if (st != CLKVQ_OK) {
        rc = report(&b, st, "device info");
        goto out;
    }
    b.mem_limit = MEM_FRACTION * (double)b.info.global_mem_bytes;
    b.synth.shape = -1;
    b.synth.budget = (size_t)opt.synth_mb << 20;
    /* once per run: every row's x roof divides by the same number */
    size_t roof_bytes = ROOF_BYTES;
    if (roof_bytes > b.info.max_alloc_bytes) roof_bytes = (size_t)b.info.max_alloc_bytes;
    st = clkvq_copy_bandwidth(b.ctx, roof_bytes, ROOF_REPS, &b.roof_gbps);
    if (st != CLKVQ_OK) {
        rc = report(&b, st, "copy bandwidth");
        goto out;
    }
    fprintf(stderr, "%s: roof %.2f GB/s\n", g_prog, b.roof_gbps);

    for (int si = 0; si < opt.n_shapes; si++) {
        int shape = opt.shapes[si];
        for (int ti = 0; ti < opt.n_tokens; ti++)
            for (int bi = 0; bi < opt.n_batches; bi++) {
                rc = run_point(&b, &opt, &list, shape, opt.tokens[ti], opt.batches[bi]);
                if (rc != BENCH_EXIT_OK) goto out;
            }
        if (!opt.json) {
            /* a table per shape as soon as it is done: a long run shows
             * results early, and a later failure keeps them */
            if (si == 0) print_header(&b, &opt);
            print_shape_table(&g_shapes[shape], &list, shape);
            if (opt.block_size > 0)
                print_paged_table(&g_shapes[shape], &list, shape, opt.block_size);
        }
    }
    if (opt.json)
        rc = print_json(&b, &opt, &list);
    else if (b.tuning_varies)
        printf("note: not every cache resolved the header's tunables\n");
    fprintf(stderr, "%s: total %.1f s\n", g_prog, bench_now_s() - t_start);
out:
    free(list.rows);
    synth_cache_free(&b.synth);
    clkvq_context_release(b.ctx);
    return rc;
}
